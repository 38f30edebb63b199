/*
 * rt_test_util.h — helpers shared by the runtime tests and benchmark:
 * the resident set size, reading a test inferlet, a runtime with a
 * private cache dir, and a capture of what one instance printed and sent
 * (static inline here).
 * At the end, what test_runtime.c, test_rt_limits.c and test_rt_cache.c
 * also share, defined in rt_test_util.c: waiting for an instance,
 * launching one into a capture and checking how it ended, the alarm that
 * fails a hung test, and the count of the CHECKs those helpers passed.
 */
#ifndef PIE_RT_TEST_UTIL_H
#define PIE_RT_TEST_UTIL_H

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/pie_err.h"
#include "runtime/runtime.h"
#include "tests/test_util.h"

/* This process's resident set (VmRSS), KiB; -1 if unknown. */
static inline long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            v = atol(line + 6);
    if (f)
        fclose(f);
    return v;
}

static inline unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(n > 0 ? n : 1);
    CHECK(b && fread(b, 1, n, f) == (size_t)n, "read %s", path);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static inline pie_rt_module *load_wasm(pie_rt *rt, const char *name, int *cached)
{
    char path[1024];
    size_t len;
    snprintf(path, sizeof path, "%s/%s", TEST_WASM_DIR, name);
    unsigned char *b = read_file(path, &len);
    pie_rt_module *m = NULL;
    int rc = pie_rt_module_load(rt, b, len, &m, cached);
    CHECK(rc == 0, "loading %s: %s", name, pie_err_msg());
    free(b);
    return m;
}

typedef struct capture {
    pthread_mutex_t lock;
    char out[8192], err[8192], msg[8192];
    size_t n_out, n_err, n_msg;
    int n_msgs;
} capture;

static inline void cap_append(capture *c, char *dst, size_t *n, const void *b,
                       size_t len)
{
    pthread_mutex_lock(&c->lock);
    if (*n + len >= 8191)
        len = 8191 - *n;
    memcpy(dst + *n, b, len);
    *n += len;
    dst[*n] = 0;
    pthread_mutex_unlock(&c->lock);
}

static inline void cap_output(void *u, pie_rt_instance *i, int fd, const char *b,
                       size_t len)
{
    capture *c = u;
    (void)i;
    if (fd == 1)
        cap_append(c, c->out, &c->n_out, b, len);
    else
        cap_append(c, c->err, &c->n_err, b, len);
}

static inline void cap_message(void *u, pie_rt_instance *i, const void *b, size_t len)
{
    capture *c = u;
    (void)i;
    cap_append(c, c->msg, &c->n_msg, b, len);
    pthread_mutex_lock(&c->lock);
    c->n_msgs++;
    pthread_mutex_unlock(&c->lock);
}

static inline capture *cap_new(pie_rt_launch_cbs *cbs)
{
    capture *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    cbs->user = c;
    cbs->on_output = cap_output;
    cbs->on_message = cap_message;
    cbs->on_exit = NULL;
    return c;
}

static inline void cap_free(capture *c)
{
    pthread_mutex_destroy(&c->lock);
    free(c);
}

/* Launches m with a NULL-terminated argument list; returns the instance. */
static inline pie_rt_instance *launch_v(pie_rt *rt, pie_rt_module *m,
                                 pie_rt_launch_cbs *cbs, const char **argv)
{
    int argc = 0;
    while (argv[argc])
        argc++;
    pie_rt_instance *i = NULL;
    int rc = pie_rt_launch(rt, m, argc, argv, cbs, &i);
    CHECK(rc == 0, "launch %s: %s", argv[0], pie_err_msg());
    return i;
}

static inline pie_rt *make_rt(pie_rt_opts *o)
{
    static char dir[256];
    const char *e = getenv("PIE_TEST_CACHE_DIR");
    snprintf(dir, sizeof dir, "%s", e && *e ? e : TEST_CACHE_DIR);
    o->cache_dir = dir;
    pie_rt *rt = NULL;
    int rc = pie_rt_create(o, &rt);
    CHECK(rc == 0, "pie_rt_create: %s", pie_err_msg());
    return rt;
}

/* ---- defined in rt_test_util.c ----------------------------------------- */

/* Waits for i to end (its reason, up to 256 bytes, into reason unless
 * NULL), drops the caller's reference and returns its exit status. */
int32_t wait_inst(pie_rt_instance *i, char *reason);

/* Launches m with argv (NULL-terminated) into a new capture, *c; the
 * caller ends both with finish_msg() or frees *c with cap_free(). */
pie_rt_instance *launch_msg(pie_rt *rt, pie_rt_module *m, capture **c,
                            const char **argv);

/* Waits for i (wait_inst) and checks that it ended with status and, unless
 * want is NULL, that what it sent was exactly want; frees c. */
void finish_msg(pie_rt_instance *i, capture *c, int32_t status,
                const char *want);

/* A SIGALRM handler: fails the test at once (the runtime hung). */
void hang_alarm(int sig);

/* The CHECKs that passed inside the helpers above, for main to add to its
 * test_n_checks (test_util.h counts per source file) before TEST_DONE(). */
int rt_test_checks(void);

#endif
