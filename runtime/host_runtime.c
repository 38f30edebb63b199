/*
 * host_runtime.c — host functions of the `runtime` group and the WASI
 * preview1 subset (see runtime/api.def for each function's contract).
 *
 * Every guest (pointer, length) pair is checked with pie_rt_guest_ptr
 * before any lock is taken or memory allocated: a bad one traps the
 * instance (pie_rt_trap longjmps out of the host function).
 */
#define _GNU_SOURCE
#include <sodium.h>
#include <string.h>
#include <time.h>

#include "runtime/rt_internal.h"
#include "pie_api_host.h"

#define WASI_EBADF  8
#define WASI_EINVAL 28
#define WASI_ESPIPE 70

typedef struct Z_pie_instance_t I;
typedef struct Z_wasi_snapshot_preview1_instance_t W;
#define INST(w) ((I *)(void *)(w))

static void put32(I *i, uint32_t off, uint32_t v) { pie_rt_copy_out(i, off, &v, 4); }
static void put64(I *i, uint32_t off, uint64_t v) { pie_rt_copy_out(i, off, &v, 8); }

/* Copies min(len, cap) bytes to guest buf; returns len (as int32). */
static uint32_t give(I *i, uint32_t buf, uint32_t cap, const void *src,
                     size_t len)
{
    pie_rt_copy_out(i, buf, src, len < cap ? len : cap);
    return (uint32_t)(len > INT32_MAX ? INT32_MAX : len);
}

__attribute__((noreturn)) static void do_exit(I *i, int32_t status)
{
    i->status = status;
    i->exited = true;
    siglongjmp(*i->trap_jb, 2);
}

/* ---- runtime group ------------------------------------------------------ */

uint32_t Z_pieZ_arg_count(I *i) { return (uint32_t)i->argc; }

uint32_t Z_pieZ_arg_get(I *i, uint32_t k, uint32_t buf, uint32_t cap)
{
    pie_rt_guest_ptr(i, buf, cap);
    if ((int32_t)k < 0 || (int32_t)k >= i->argc)
        return (uint32_t)PIE_ERANGE;
    return give(i, buf, cap, i->argv[k], strlen(i->argv[k]));
}

uint32_t Z_pieZ_instance_id(I *i) { return i->id; }

uint32_t Z_pieZ_set_return(I *i, uint32_t buf, uint32_t len)
{
    if (len > PIE_RT_MAX_MSG)
        return (uint32_t)PIE_ELIMIT;
    const void *p = pie_rt_guest_ptr(i, buf, len);
    unsigned char *r = malloc(len ? len : 1);
    if (!r)
        return (uint32_t)PIE_ENOMEM;
    memcpy(r, p, len);
    free(i->ret);
    i->ret = r;
    i->ret_len = len;
    return 0;
}

void Z_pieZ_exit(I *i, uint32_t status) { do_exit(i, (int32_t)status); }

uint64_t Z_pieZ_clock_ns(I *i) { (void)i; return pie__rt_now_ns(); }

uint32_t Z_pieZ_sleep(I *i, uint64_t ns)
{
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_SLEEP, NULL,
                                  pie__rt_timer_cancel, NULL, &f);
    if (h < 0)
        return (uint32_t)h;
    f->data = f;
    int64_t d = (int64_t)ns < 0 ? 0 : (int64_t)ns;
    pthread_mutex_lock(&i->rt->lock);
    pie__rt_timer_add_locked(i->rt, pie__rt_now_ns() + (uint64_t)d, f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

uint32_t Z_pieZ_future_wait(I *i, uint32_t h)
{
    return (uint32_t)pie_rt_future_wait(i, (int32_t)h);
}

uint32_t Z_pieZ_future_wait_any(I *i, uint32_t futs, uint32_t n,
                                uint64_t timeout)
{
    int32_t hs[1024];
    if (n == 0 || n > 1024)
        return (uint32_t)PIE_EINVAL;
    pie_rt_copy_in(i, hs, futs, (uint64_t)n * 4);
    int64_t to = (int64_t)timeout;
    if (to == 0) {
        for (uint32_t k = 0; k < n; k++) {
            int32_t st = pie_rt_future_status(i, hs[k]);
            if (st == PIE_EINVAL)
                return (uint32_t)st;
            if (st != PIE_EAGAIN)
                return k;
        }
        return (uint32_t)PIE_EAGAIN;
    }
    int32_t th = 0;
    pie_rt_future *tf = NULL;
    if (to > 0) {
        th = (int32_t)Z_pieZ_sleep(i, (uint64_t)to);
        if (th < 0)
            return (uint32_t)th;
        tf = pie__rt_future_get(i, th);
    }
    int32_t rc = pie__rt_wait(i, hs, (int32_t)n, tf);
    if (th > 0)
        pie__rt_future_free(i, th);
    if (rc == (int32_t)n)
        return (uint32_t)PIE_EAGAIN;
    return (uint32_t)rc;
}

uint32_t Z_pieZ_future_status(I *i, uint32_t h)
{
    return (uint32_t)pie_rt_future_status(i, (int32_t)h);
}

uint32_t Z_pieZ_future_payload(I *i, uint32_t h, uint32_t buf, uint32_t cap)
{
    unsigned char *dst = pie_rt_guest_ptr(i, buf, cap);
    pie_rt_future *f = pie__rt_future_get(i, (int32_t)h);
    if (!f)
        return (uint32_t)PIE_EINVAL;
    pthread_mutex_lock(&i->rt->lock);
    int32_t rc = PIE_EAGAIN;
    if (f->done) {
        size_t len = f->payload_len;
        if (len)
            memcpy(dst, f->payload, len < cap ? len : cap);
        rc = (int32_t)(len > INT32_MAX ? INT32_MAX : len);
    }
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)rc;
}

uint32_t Z_pieZ_future_cancel(I *i, uint32_t h)
{
    pie_rt_future *f = pie__rt_future_get(i, (int32_t)h);
    if (!f)
        return (uint32_t)PIE_EINVAL;
    pie__rt_future_cancel(i, f);
    return 0;
}

uint32_t Z_pieZ_future_free(I *i, uint32_t h)
{
    return (uint32_t)pie__rt_future_free(i, (int32_t)h);
}

uint32_t Z_pieZ_random_u64(I *i, uint32_t out)
{
    uint64_t v;
    pie_rt_guest_ptr(i, out, 8);
    randombytes_buf(&v, sizeof v);
    pie_rt_copy_out(i, out, &v, 8);
    return 0;
}

/* ---- WASI --------------------------------------------------------------- */

uint32_t Z_wasi_snapshot_preview1Z_args_sizes_get(W *w, uint32_t argc,
                                                  uint32_t size)
{
    I *i = INST(w);
    uint64_t total = 0;
    for (int k = 0; k < i->argc; k++)
        total += strlen(i->argv[k]) + 1;
    put32(i, argc, (uint32_t)i->argc);
    put32(i, size, (uint32_t)total);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_args_get(W *w, uint32_t argv, uint32_t buf)
{
    I *i = INST(w);
    uint64_t total = 0;
    for (int k = 0; k < i->argc; k++)
        total += strlen(i->argv[k]) + 1;
    pie_rt_guest_ptr(i, argv, (uint64_t)i->argc * 4);
    pie_rt_guest_ptr(i, buf, total);
    uint32_t off = buf;
    for (int k = 0; k < i->argc; k++) {
        size_t n = strlen(i->argv[k]) + 1;
        put32(i, argv + 4 * k, off);
        pie_rt_copy_out(i, off, i->argv[k], n);
        off += (uint32_t)n;
    }
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_environ_get(W *w, uint32_t env, uint32_t buf)
{
    (void)w; (void)env; (void)buf;
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_environ_sizes_get(W *w, uint32_t n,
                                                     uint32_t size)
{
    put32(INST(w), n, 0);
    put32(INST(w), size, 0);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_clock_res_get(W *w, uint32_t id,
                                                 uint32_t res)
{
    if (id > 3)
        return WASI_EINVAL;
    put64(INST(w), res, 1);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_clock_time_get(W *w, uint32_t id,
                                                  uint64_t prec, uint32_t out)
{
    (void)prec;
    static const clockid_t ids[] = {CLOCK_REALTIME, CLOCK_MONOTONIC,
                                    CLOCK_THREAD_CPUTIME_ID,
                                    CLOCK_THREAD_CPUTIME_ID};
    if (id > 3)
        return WASI_EINVAL;
    struct timespec ts;
    clock_gettime(ids[id], &ts);
    put64(INST(w), out, (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_close(W *w, uint32_t fd)
{
    (void)w;
    return fd <= 2 ? 0 : WASI_EBADF;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_fdstat_get(W *w, uint32_t fd,
                                                 uint32_t st)
{
    if (fd > 2)
        return WASI_EBADF;
    unsigned char s[24] = {0};
    s[0] = 2;                               /* character device          */
    memset(s + 8, 0xff, 16);                /* all rights                */
    pie_rt_copy_out(INST(w), st, s, sizeof s);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_fdstat_set_flags(W *w, uint32_t fd,
                                                       uint32_t flags)
{
    (void)w; (void)flags;
    return fd <= 2 ? 0 : WASI_EBADF;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_prestat_get(W *w, uint32_t fd,
                                                  uint32_t buf)
{
    (void)w; (void)fd; (void)buf;
    return WASI_EBADF;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_prestat_dir_name(W *w, uint32_t fd,
                                                       uint32_t p, uint32_t n)
{
    (void)w; (void)fd; (void)p; (void)n;
    return WASI_EBADF;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_seek(W *w, uint32_t fd, uint64_t off,
                                           uint32_t whence, uint32_t out)
{
    (void)w; (void)off; (void)whence; (void)out;
    return fd <= 2 ? WASI_ESPIPE : WASI_EBADF;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_write(W *w, uint32_t fd, uint32_t iovs,
                                            uint32_t n, uint32_t nwritten)
{
    I *i = INST(w);
    if (fd != 1 && fd != 2)
        return WASI_EBADF;
    pie_rt_guest_ptr(i, iovs, (uint64_t)n * 8);
    pie_rt_guest_ptr(i, nwritten, 4);
    uint64_t total = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t io[2];
        pie_rt_copy_in(i, io, iovs + 8 * k, 8);
        const char *p = pie_rt_guest_ptr(i, io[0], io[1]);
        if (io[1] && i->cbs.on_output)
            i->cbs.on_output(i->cbs.user, i, (int)fd, p, io[1]);
        total += io[1];
    }
    put32(i, nwritten, (uint32_t)total);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_fd_read(W *w, uint32_t fd, uint32_t iovs,
                                           uint32_t n, uint32_t nread)
{
    (void)iovs; (void)n;
    if (fd != 0)
        return WASI_EBADF;
    put32(INST(w), nread, 0);
    return 0;
}

void Z_wasi_snapshot_preview1Z_proc_exit(W *w, uint32_t code)
{
    do_exit(INST(w), (int32_t)code);
}

uint32_t Z_wasi_snapshot_preview1Z_random_get(W *w, uint32_t buf, uint32_t len)
{
    void *p = pie_rt_guest_ptr(INST(w), buf, len);
    randombytes_buf(p, len);
    return 0;
}

uint32_t Z_wasi_snapshot_preview1Z_sched_yield(W *w)
{
    pie__rt_yield(INST(w));
    return 0;
}
