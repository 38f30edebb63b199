/*
 * instance.c — instances, fibers, workers, futures, the watchdog.
 *
 * Each instance runs on its own fiber: an mmap'ed stack (fiber_stack bytes,
 * the lowest 64 KiB a PROT_NONE guard) and a hand-written context switch
 * (callee-saved registers + MXCSR/x87 control word; no signal-mask syscall).
 * An instance is pinned to one worker thread. A worker loops: pop a runnable
 * instance from its queue, switch to its fiber, and when the fiber switches
 * back (it parked or ended) account its CPU time; an ended fiber's stack is
 * unmapped there, off the fiber.
 *
 * Parking: a host call that waits (future_wait*) sets state PARKED under
 * rt->lock and switches to the scheduler. Completing any future of a parked
 * instance (pie_rt_future_complete, any thread, under rt->lock) makes it
 * RUNNABLE and queues it on its worker; the fiber re-checks what it waits
 * for, so wakeups may be spurious. A fiber may be queued before it finished
 * switching out: only its own worker dequeues it, after the switch.
 *
 * The watchdog thread fires timers (sleep futures, wait timeouts; a binary
 * heap) and every 10 ms reads each worker's thread CPU clock: an instance
 * over its budget, or one being killed, gets PIE_RT_SIG_CPU on its worker;
 * the handler (wasm_rt.c) unwinds only while the instance is in guest code
 * (i->in_guest: generated code or a libc leaf it called, such as the
 * memmove of a memory.copy), never from host code that may hold a lock.
 *
 * References: an instance holds one reference for being alive (dropped by
 * its worker after it ended) plus one per embedder handle; futures are
 * referenced by their handle slot and by their producer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/rt_internal.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/asan_interface.h>
#define ASAN_START(fake, bottom, size) \
    __sanitizer_start_switch_fiber(fake, bottom, size)
#define ASAN_FINISH(fake, bottom, size) \
    __sanitizer_finish_switch_fiber(fake, bottom, size)
#else
#define ASAN_START(fake, bottom, size) ((void)0)
#define ASAN_FINISH(fake, bottom, size) ((void)0)
#endif

#define STACK_GUARD (64u << 10)
/* Live instances launched, directly or not, by one embedder-launched
 * instance: an inferlet that launches itself recursively stops here. */
#define MAX_DESCENDANTS 256

/* ---- context switch ----------------------------------------------------- */

void pie__fiber_switch(void **save_sp, void *to_sp);
#if defined(__x86_64__)
__asm__(".text\n"
        ".globl pie__fiber_switch\n.hidden pie__fiber_switch\n"
        ".type pie__fiber_switch,@function\n"
        "pie__fiber_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n"
        "  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n"
        "  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
        ".size pie__fiber_switch, .-pie__fiber_switch\n"
        "pie__fiber_tramp:\n  movq %r12, %rdi\n  callq *%r13\n  ud2\n");
extern char pie__fiber_tramp[];

/* Lays out the first frame so the first switch "returns" to the trampoline,
 * which calls fn(arg) on a 16-byte aligned stack. */
static void *fiber_init(void *stack, size_t size, void (*fn)(void *),
                        void *arg)
{
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 64);
    uint32_t csr[2];
    __asm__ volatile("stmxcsr %0\n fnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    sp[0] = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
    sp[1] = 0;                   /* r15 */
    sp[2] = 0;                   /* r14 */
    sp[3] = (uint64_t)fn;        /* r13 */
    sp[4] = (uint64_t)arg;       /* r12 */
    sp[5] = 0;                   /* rbx */
    sp[6] = 0;                   /* rbp */
    sp[7] = (uint64_t)pie__fiber_tramp;
    return sp;
}
#else
#error "pie's fibers need x86-64 (add a context switch for this architecture)"
#endif

/* ---- fiber stacks (a bounded pool: map/unmap and faults are costly) ----- */

#define STACK_POOL_MAX 256
static pthread_mutex_t stack_lock = PTHREAD_MUTEX_INITIALIZER;
static void *stack_pool[STACK_POOL_MAX];
static size_t stack_pool_size[STACK_POOL_MAX];
static int n_stack_pool;

static void *stack_get(size_t size)
{
    void *s = NULL;
    pthread_mutex_lock(&stack_lock);
    for (int k = n_stack_pool - 1; k >= 0; k--)
        if (stack_pool_size[k] == size) {
            s = stack_pool[k];
            stack_pool[k] = stack_pool[--n_stack_pool];
            stack_pool_size[k] = stack_pool_size[n_stack_pool];
            break;
        }
    pthread_mutex_unlock(&stack_lock);
    if (s)
        return s;
    s = mmap(NULL, size, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (s == MAP_FAILED)
        return NULL;
    if (mprotect(s, STACK_GUARD, PROT_NONE) != 0) {
        munmap(s, size);
        return NULL;
    }
    return s;
}

static void stack_put(void *s, size_t size)
{
#ifdef __SANITIZE_ADDRESS__
    /* frames unwound by a trap may leave poisoned shadow behind */
    __asan_unpoison_memory_region((char *)s + STACK_GUARD, size - STACK_GUARD);
#endif
    pthread_mutex_lock(&stack_lock);
    if (n_stack_pool < STACK_POOL_MAX) {
        stack_pool[n_stack_pool] = s;
        stack_pool_size[n_stack_pool++] = size;
        s = NULL;
    }
    pthread_mutex_unlock(&stack_lock);
    if (s)
        munmap(s, size);
}

/* ---- small helpers ------------------------------------------------------ */

uint64_t pie__rt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t clock_ns(clockid_t c)
{
    struct timespec ts;
    if (clock_gettime(c, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

pie_rt_msg *pie__rt_msg_new(const void *buf, size_t len)
{
    pie_rt_msg *m = malloc(sizeof *m + len);
    if (!m)
        return NULL;
    m->next = NULL;
    m->acct = NULL;
    m->len = len;
    if (len)
        memcpy(m->data, buf, len);
    return m;
}

void pie__rt_msgq_push(pie_rt_msgq *q, pie_rt_msg *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
    q->n++;
    q->bytes += m->len;
}

pie_rt_msg *pie__rt_msgq_pop(pie_rt_msgq *q)
{
    pie_rt_msg *m = q->head;
    if (m) {
        q->head = m->next;
        if (!q->head)
            q->tail = NULL;
        q->n--;
        q->bytes -= m->len;
        if (m->acct)           /* under rt->lock: charged messages are */
            pie__rt_msg_uncharge(m);   /* only ever queued under it */
    }
    return m;
}

void pie__rt_msgq_clear(pie_rt_msgq *q)
{
    pie_rt_msg *m;
    while ((m = pie__rt_msgq_pop(q)))
        free(m);
}

/* ---- workers ------------------------------------------------------------ */

static void worker_push(pie_rt_worker *w, pie_rt_instance *i)
{
    pthread_mutex_lock(&w->lock);
    i->qnext = NULL;
    if (w->qtail)
        w->qtail->qnext = i;
    else
        w->qhead = i;
    w->qtail = i;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->lock);
}

/* Under rt->lock: a parked (or new) instance becomes runnable. */
void pie__rt_wake_locked(pie_rt_instance *i)
{
    if (i->state != INST_PARKED)
        return;
    i->state = INST_RUNNABLE;
    worker_push(i->worker, i);
}

static void instance_free(pie_rt_instance *i)
{
    for (int k = 0; k < i->argc; k++)
        free(i->argv[k]);
    free(i->argv);
    free(i->ret);
    free(i->futs);
    free(i->free_slots);
    /* Empty once the instance ran (messaging_instance_end); one that never
     * ran holds only the launcher's messages, which no account is charged
     * for, so this needs no rt->lock. */
    pie__rt_msgq_clear(&i->inbox);
    pthread_cond_destroy(&i->done_cv);
    if (i->parent)
        pie_rt_instance_unref(i->parent);
    pie_rt_module_unref(i->mod);
    free(i);
}

void pie_rt_instance_ref(pie_rt_instance *i) { atomic_fetch_add(&i->refs, 1); }

void pie_rt_instance_unref(pie_rt_instance *i)
{
    if (i && atomic_fetch_sub(&i->refs, 1) == 1)
        instance_free(i);
}

/* Switches from the running fiber back to its worker's scheduler. */
static void to_scheduler(pie_rt_instance *i, bool final)
{
    pie_rt_worker *w = i->worker;
    ASAN_START(final ? NULL : &i->asan_fake, w->asan_bottom, w->asan_size);
    pie__fiber_switch(&i->sp, w->sched_sp);
    ASAN_FINISH(i->asan_fake, NULL, NULL);
}

static void instance_ended(pie_rt_instance *i);

static void run_one(pie_rt_worker *w, pie_rt_instance *i)
{
    pthread_mutex_lock(&i->rt->lock);
    i->state = INST_RUNNING;
    pthread_mutex_unlock(&i->rt->lock);
    pthread_mutex_lock(&w->lock);
    w->slice_start = clock_ns(w->cpu_clock);
    atomic_store(&w->current, i);
    pthread_mutex_unlock(&w->lock);
    pie__rt_set_current(i);
    ASAN_START(&w->asan_fake, i->stack, i->stack_size);
    pie__fiber_switch(&w->sched_sp, i->sp);
    ASAN_FINISH(w->asan_fake, &w->asan_bottom, &w->asan_size);
    pie__rt_set_current(NULL);
    pthread_mutex_lock(&w->lock);
    i->cpu_ns += clock_ns(w->cpu_clock) - w->slice_start;
    atomic_store(&w->current, NULL);
    pthread_mutex_unlock(&w->lock);
    pthread_mutex_lock(&i->rt->lock);
    bool done = i->state == INST_DONE;
    pthread_mutex_unlock(&i->rt->lock);
    if (done)
        instance_ended(i);
}

static void *worker_main(void *arg)
{
    pie_rt_worker *w = arg;
    pthread_getcpuclockid(pthread_self(), &w->cpu_clock);
    pie__rt_thread_signals(w);
    for (;;) {
        pthread_mutex_lock(&w->lock);
        while (!w->qhead && !w->stop)
            pthread_cond_wait(&w->cv, &w->lock);
        pie_rt_instance *i = w->qhead;
        if (!i) {
            pthread_mutex_unlock(&w->lock);
            break;
        }
        w->qhead = i->qnext;
        if (!w->qhead)
            w->qtail = NULL;
        pthread_mutex_unlock(&w->lock);
        run_one(w, i);
    }
    stack_t ss = {.ss_flags = SS_DISABLE};
    sigaltstack(&ss, NULL);
    if (w->altstack)
        munmap(w->altstack, 64 << 10);
    return NULL;
}

/* ---- futures ------------------------------------------------------------ */

/* Doubles the handle table and the stack of free slots beside it. */
static int32_t handles_grow(pie_rt_instance *i)
{
    if (i->cap_futs >= (1 << 20))
        return pie_err_set(PIE_ELIMIT, "too many open handles");
    int32_t c = i->cap_futs ? 2 * i->cap_futs : 16;
    pie_rt_future **t = realloc(i->futs, c * sizeof *t);
    if (!t)
        return PIE_ENOMEM;
    i->futs = t;
    int32_t *fs = realloc(i->free_slots, c * sizeof *fs);
    if (!fs)
        return PIE_ENOMEM;       /* futs is larger, harmlessly */
    i->free_slots = fs;
    i->cap_futs = c;
    return 0;
}

/* Gives f a handle: the slot freed last, else a new one (O(1) either way,
 * so a guest holding many handles does not slow down each call). */
int32_t pie__rt_future_handle(pie_rt_instance *i, pie_rt_future *f)
{
    if (i->n_free > 0) {
        int32_t k = i->free_slots[--i->n_free];
        i->futs[k] = f;
        return k + 1;
    }
    if (i->n_futs == i->cap_futs) {
        int32_t rc = handles_grow(i);
        if (rc < 0)
            return rc;
    }
    i->futs[i->n_futs++] = f;
    return i->n_futs;
}

pie_rt_future *pie__rt_future_get(pie_rt_instance *i, int32_t h)
{
    if (h <= 0 || h > i->n_futs)
        return NULL;
    return i->futs[h - 1];
}

int32_t pie_rt_future_new(pie_rt_instance *i, int32_t kind, void *data,
                          void (*cancel)(void *), void (*destroy)(void *),
                          pie_rt_future **out)
{
    pie_rt_future *f = calloc(1, sizeof *f);
    if (!f)
        return PIE_ENOMEM;
    f->rt = i->rt;
    f->inst = i;
    f->kind = kind;
    f->data = data;
    f->cancel = cancel;
    f->destroy = destroy;
    f->theap = -1;
    f->refs = out ? 2 : 1;
    int32_t h = pie__rt_future_handle(i, f);
    if (h < 0) {
        free(f);
        return h;
    }
    if (out)
        *out = f;
    return h;
}

void pie__rt_future_unref_locked(pie_rt_future *f)
{
    if (--f->refs > 0)
        return;
    if (f->destroy)
        f->destroy(f->data);
    free(f->payload);
    free(f);
}

void pie__rt_future_complete_locked(pie_rt_future *f, int32_t status,
                                    const void *payload, size_t len)
{
    if (f->done)
        return;
    if (len) {
        f->payload = malloc(len);
        if (f->payload) {
            memcpy(f->payload, payload, len);
            f->payload_len = len;
        } else {
            status = PIE_ENOMEM;
        }
    }
    f->status = status;
    f->done = true;
    if (f->inst)
        pie__rt_wake_locked(f->inst);
}

void pie_rt_future_complete(pie_rt_future *f, int32_t status,
                            const void *payload, size_t len)
{
    pie_rt *rt = f->rt;
    pthread_mutex_lock(&rt->lock);
    pie__rt_future_complete_locked(f, status, payload, len);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&rt->lock);
}

void *pie_rt_future_data(pie_rt_instance *i, int32_t h, int32_t kind)
{
    pie_rt_future *f = pie__rt_future_get(i, h);
    return f && f->kind == kind ? f->data : NULL;
}

int32_t pie_rt_future_status(pie_rt_instance *i, int32_t h)
{
    pie_rt_future *f = pie__rt_future_get(i, h);
    if (!f)
        return PIE_EINVAL;
    pthread_mutex_lock(&i->rt->lock);
    int32_t st = f->done ? f->status : PIE_EAGAIN;
    pthread_mutex_unlock(&i->rt->lock);
    return st;
}

/* Cancels a pending future: it leaves its wait list, if on one, and
 * completes with PIE_ECANCELED at once (a producer's later completion is
 * ignored), then the producer's cancel hook runs outside the lock to stop
 * the work. */
void pie__rt_future_cancel(pie_rt_instance *i, pie_rt_future *f)
{
    pthread_mutex_lock(&i->rt->lock);
    bool pending = !f->done && !f->cancelled;
    f->cancelled = true;
    f->refs++;
    pie__rt_waitq_remove_locked(f);
    pie__rt_future_complete_locked(f, PIE_ECANCELED, NULL, 0);
    pthread_mutex_unlock(&i->rt->lock);
    if (pending && f->cancel)
        f->cancel(f->data);
    pthread_mutex_lock(&i->rt->lock);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
}

int32_t pie__rt_future_free(pie_rt_instance *i, int32_t h)
{
    pie_rt_future *f = pie__rt_future_get(i, h);
    if (!f)
        return PIE_EINVAL;
    pie__rt_future_cancel(i, f);
    i->futs[h - 1] = NULL;
    i->free_slots[i->n_free++] = h - 1;
    pthread_mutex_lock(&i->rt->lock);
    f->inst = NULL;
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return 0;
}

/* Parks the fiber until one of hs[0..n) is done or timer t (may be NULL) is;
 * returns the index of the first done one, n if the timer fired, or
 * PIE_EINVAL if a handle is bad. Traps the instance if it is being killed
 * or over its CPU budget. */
int32_t pie__rt_wait(pie_rt_instance *i, const int32_t *hs, int32_t n,
                     pie_rt_future *t)
{
    pie_rt *rt = i->rt;
    for (int32_t k = 0; k < n; k++)
        if (!pie__rt_future_get(i, hs[k]))
            return pie_err_set(PIE_EINVAL, "bad future handle %d", hs[k]);
    pthread_mutex_lock(&rt->lock);
    for (;;) {
        if (atomic_load(&i->kill_req) || atomic_load(&i->cpu_over)) {
            pthread_mutex_unlock(&rt->lock);
            if (atomic_load(&i->kill_req))
                pie_rt_trap(i, "killed: %s", i->kill_reason);
            pie_rt_trap(i, "CPU time limit exceeded");
        }
        for (int32_t k = 0; k < n; k++) {
            if (i->futs[hs[k] - 1]->done) {
                pthread_mutex_unlock(&rt->lock);
                return k;
            }
        }
        if (t && t->done) {
            pthread_mutex_unlock(&rt->lock);
            return n;
        }
        i->state = INST_PARKED;
        pthread_mutex_unlock(&rt->lock);
        to_scheduler(i, false);
        pthread_mutex_lock(&rt->lock);
    }
}

/* Gives the worker to other runnable fibers, then continues (sched_yield). */
void pie__rt_yield(pie_rt_instance *i)
{
    pthread_mutex_lock(&i->rt->lock);
    i->state = INST_PARKED;
    pie__rt_wake_locked(i);             /* back of its worker's queue */
    pthread_mutex_unlock(&i->rt->lock);
    to_scheduler(i, false);
    if (atomic_load(&i->kill_req))
        pie_rt_trap(i, "killed: %s", i->kill_reason);
    if (atomic_load(&i->cpu_over))
        pie_rt_trap(i, "CPU time limit exceeded");
}

int32_t pie_rt_future_wait(pie_rt_instance *i, int32_t h)
{
    int32_t rc = pie__rt_wait(i, &h, 1, NULL);
    if (rc < 0)
        return rc;
    return pie_rt_future_status(i, h);
}

/* ---- timers (heap under rt->lock) --------------------------------------- */

/* Each future in the heap knows its slot (theap), so cancelling one is
 * O(log n): a guest that creates and frees many sleeps never scans. */

static void timer_put(pie_rt *rt, int32_t k, pie_rt_timer t)
{
    rt->timers[k] = t;
    t.fut->theap = k;
}

/* Moves the entry at k up or down to its place. */
static void timer_sift(pie_rt *rt, int32_t k)
{
    pie_rt_timer x = rt->timers[k];
    while (k > 0 && rt->timers[(k - 1) / 2].when > x.when) {
        timer_put(rt, k, rt->timers[(k - 1) / 2]);
        k = (k - 1) / 2;
    }
    for (;;) {
        int32_t c = 2 * k + 1;
        if (c >= rt->n_timers)
            break;
        if (c + 1 < rt->n_timers && rt->timers[c + 1].when < rt->timers[c].when)
            c++;
        if (rt->timers[c].when >= x.when)
            break;
        timer_put(rt, k, rt->timers[c]);
        k = c;
    }
    timer_put(rt, k, x);
}

/* Takes the entry at k out of the heap; the heap's reference to its future
 * passes to the caller. */
static pie_rt_future *timer_remove(pie_rt *rt, int32_t k)
{
    pie_rt_future *f = rt->timers[k].fut;
    f->theap = -1;
    pie_rt_timer last = rt->timers[--rt->n_timers];
    if (k < rt->n_timers) {
        timer_put(rt, k, last);
        timer_sift(rt, k);
    }
    return f;
}

void pie__rt_timer_add_locked(pie_rt *rt, uint64_t when, pie_rt_future *f)
{
    if (rt->n_timers == rt->cap_timers) {
        int32_t c = rt->cap_timers ? 2 * rt->cap_timers : 64;
        pie_rt_timer *t = realloc(rt->timers, c * sizeof *t);
        if (!t) {
            pie__rt_future_complete_locked(f, PIE_ENOMEM, NULL, 0);
            pie__rt_future_unref_locked(f);
            return;
        }
        rt->timers = t;
        rt->cap_timers = c;
    }
    int32_t k = rt->n_timers++;
    timer_put(rt, k, (pie_rt_timer){when, f});
    timer_sift(rt, k);
    if (f->theap == 0)
        pthread_cond_signal(&rt->timer_cv);
}

/* Cancel hook of sleep futures: drops the timer entry now, so a guest that
 * creates and frees long sleeps cannot grow the heap. data = the future. */
void pie__rt_timer_cancel(void *data)
{
    pie_rt_future *f = data;
    pie_rt *rt = f->rt;
    pthread_mutex_lock(&rt->lock);
    if (f->theap >= 0) {
        timer_remove(rt, f->theap);
        pie__rt_future_unref_locked(f);
    }
    pthread_mutex_unlock(&rt->lock);
}

/* The CPU budget in ns: UINT64_MAX (none) for a negative limit or one too
 * large for the ns count (converting it would be undefined); pie_rt_create
 * replaced NaN by the default. */
static uint64_t cpu_budget_ns(double s)
{
    if (!(s >= 0) || s >= 18446744073.0)   /* UINT64_MAX ns, in seconds */
        return UINT64_MAX;
    return (uint64_t)(s * 1e9);
}

/* Signals workers whose instance is over budget or being killed. */
static void watchdog_cpu(pie_rt *rt)
{
    uint64_t budget = cpu_budget_ns(rt->o.cpu_limit_s);
    for (int32_t k = 0; k < rt->n_workers; k++) {
        pie_rt_worker *w = &rt->workers[k];
        pthread_mutex_lock(&w->lock);
        pie_rt_instance *i = atomic_load(&w->current);
        if (i) {
            uint64_t used = i->cpu_ns + (clock_ns(w->cpu_clock) - w->slice_start);
            if (used > budget)
                atomic_store(&i->cpu_over, true);
            if (atomic_load(&i->cpu_over) || atomic_load(&i->kill_req))
                pthread_kill(w->thread, PIE_RT_SIG_CPU);
        }
        pthread_mutex_unlock(&w->lock);
    }
}

static void *watchdog_main(void *arg)
{
    pie_rt *rt = arg;
    uint64_t next_cpu = pie__rt_now_ns();
    pthread_mutex_lock(&rt->lock);
    while (!rt->stopping) {
        uint64_t now = pie__rt_now_ns();
        while (rt->n_timers && rt->timers[0].when <= now) {
            pie_rt_future *f = timer_remove(rt, 0);
            pie__rt_future_complete_locked(f, 0, NULL, 0);
            pie__rt_future_unref_locked(f);
        }
        if (now >= next_cpu) {
            pthread_mutex_unlock(&rt->lock);
            watchdog_cpu(rt);
            pthread_mutex_lock(&rt->lock);
            next_cpu = now + 10000000ull;
        }
        uint64_t until = next_cpu;
        if (rt->n_timers && rt->timers[0].when < until)
            until = rt->timers[0].when;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t abs = (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
        abs += until > now ? until - now : 0;
        ts.tv_sec = abs / 1000000000ull;
        ts.tv_nsec = abs % 1000000000ull;
        pthread_cond_timedwait(&rt->timer_cv, &rt->lock, &ts);
    }
    pthread_mutex_unlock(&rt->lock);
    return NULL;
}

/* ---- instance life ------------------------------------------------------ */

/* Everything that happens after the guest stopped, on the fiber. */
static void instance_finish(pie_rt_instance *i)
{
    pie_rt *rt = i->rt;
    if (i->wasm) {
        i->mod->free_inst(i->wasm);
        free(i->wasm);
        i->wasm = NULL;
        i->mem = NULL;
    }
    for (int32_t h = 1; h <= i->n_futs; h++)
        if (i->futs[h - 1])
            pie__rt_future_free(i, h);
    pthread_mutex_lock(&rt->lock);
    pie__rt_messaging_instance_end(i);
    pthread_mutex_unlock(&rt->lock);
    if (rt->o.hooks.on_instance_end)
        rt->o.hooks.on_instance_end(rt->o.hooks.user, i);
    int32_t status = i->trapped ? PIE_ETRAP : i->status;
    if (i->cbs.on_exit)
        i->cbs.on_exit(i->cbs.user, i, status, i->trapped ? i->reason : NULL,
                       i->ret, i->ret_len);
    pthread_mutex_lock(&rt->lock);
    if (i->root)                /* before the parent can see us end */
        i->root->n_tree--;
    if (i->child_fut) {
        pie__rt_future_complete_locked(i->child_fut, status, i->ret,
                                       i->ret_len);
        pie__rt_future_unref_locked(i->child_fut);
        i->child_fut = NULL;
    }
    i->state = INST_DONE;       /* the worker finishes the job: run_one */
    pthread_mutex_unlock(&rt->lock);
}

/* On the worker, once the ended fiber has switched out for good: return its
 * stack, then announce the end, so that a waiter sees every resource back. */
static void instance_ended(pie_rt_instance *i)
{
    pie_rt *rt = i->rt;
    stack_put(i->stack, i->stack_size);
    i->stack = NULL;
    pthread_mutex_lock(&rt->lock);
    i->ended = true;
    if (i->lprev)
        i->lprev->lnext = i->lnext;
    else
        rt->live = i->lnext;
    if (i->lnext)
        i->lnext->lprev = i->lprev;
    rt->n_live--;
    pthread_cond_broadcast(&i->done_cv);
    pthread_cond_broadcast(&rt->live_cv);
    pthread_mutex_unlock(&rt->lock);
    pie_rt_instance_unref(i);
}

static void fiber_main(void *arg)
{
    pie_rt_instance *i = arg;
    ASAN_FINISH(NULL, &i->worker->asan_bottom, &i->worker->asan_size);
    sigjmp_buf jb;
    i->trap_jb = &jb;
    if (sigsetjmp(jb, 0) == 0) {
        if (atomic_load(&i->kill_req))
            pie_rt_trap(i, "killed: %s", i->kill_reason);
        pie_rt *rt = i->rt;
        int rc = rt->o.hooks.on_instance_start
                     ? rt->o.hooks.on_instance_start(rt->o.hooks.user, i) : 0;
        if (rc < 0) {
            i->status = rc;
        } else {
            /* The memory struct lives in the (zeroed) wasm2c instance, so
             * host calls from a start section see it once it is allocated. */
            i->mem = i->mod->memory(i->wasm);
            i->in_guest = 1;     /* signal handlers may unwind from here  */
            i->mod->instantiate(i->wasm, i);   /* runs the start section */
            i->mod->start(i->wasm);
            i->in_guest = 0;
            i->status = 0;
        }
    }
    i->in_guest = 0;             /* trap_with cleared it too              */
    i->trap_jb = NULL;
    instance_finish(i);
    to_scheduler(i, true);
    abort(); /* a finished fiber is never resumed */
}

static char **copy_argv(int argc, const char *const *argv)
{
    char **a = calloc(argc + 1, sizeof *a);
    if (!a)
        return NULL;
    for (int k = 0; k < argc; k++) {
        a[k] = strdup(argv[k] ? argv[k] : "");
        if (!a[k]) {
            while (k--)
                free(a[k]);
            free(a);
            return NULL;
        }
    }
    return a;
}

/* Under rt->lock: may i start? A child counts against its root's tree. */
static int launch_check_locked(pie_rt *rt, pie_rt_instance *i)
{
    if (rt->closing)
        return pie_err_set(PIE_EBUSY, "runtime is shutting down");
    if (!i->parent)
        return 0;
    i->root = i->parent->root ? i->parent->root : i->parent;
    if (i->root->n_tree >= MAX_DESCENDANTS)
        return pie_err_set(PIE_ELIMIT, "launch: instance %u already has %d "
                           "live descendants (the limit)", i->root->id,
                           MAX_DESCENDANTS);
    i->root->n_tree++;
    return 0;
}

/* Allocates an instance of m with its copy of argv, its (zeroed) wasm2c
 * instance and its fiber stack into *out; 0, or PIE_ENOMEM with nothing
 * left allocated. */
static int instance_alloc(pie_rt *rt, pie_rt_module *m, int argc,
                          const char *const *argv, pie_rt_instance **out)
{
    pie_rt_instance *i = calloc(1, sizeof *i);
    if (!i)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    i->rt = rt;
    i->argc = argc;
    i->argv = copy_argv(argc, argv);
    i->wasm = calloc(1, m->inst_size);
    i->stack_size = rt->o.fiber_stack;
    i->stack = stack_get(i->stack_size);
    if (!i->argv || !i->wasm || !i->stack) {
        if (i->stack)
            stack_put(i->stack, i->stack_size);
        for (int k = 0; i->argv && k < argc; k++)
            free(i->argv[k]);
        free(i->argv);
        free(i->wasm);
        free(i);
        return pie_err_set(PIE_ENOMEM, "out of memory launching an instance");
    }
    *out = i;
    return 0;
}

/* Frees an instance that launch_check_locked refused (rt->lock not held):
 * it never ran, so its stack and wasm2c instance go here, and the rest
 * with its last reference. */
static void launch_undo(pie_rt_instance *i)
{
    stack_put(i->stack, i->stack_size);
    i->stack = NULL;
    free(i->wasm);           /* never instantiated: instance_finish */
    i->wasm = NULL;          /* would have freed it                 */
    atomic_store(&i->refs, 1);
    pie_rt_instance_unref(i);
}

/* Under rt->lock: links i into the live list, runnable. */
static void live_add_locked(pie_rt *rt, pie_rt_instance *i)
{
    i->lnext = rt->live;
    if (rt->live)
        rt->live->lprev = i;
    rt->live = i;
    rt->n_live++;
    i->state = INST_RUNNABLE;
}

int pie__rt_launch(pie_rt *rt, pie_rt_module *m, int argc,
                   const char *const *argv, const pie_rt_launch_cbs *cbs,
                   pie_rt_instance *parent, pie_rt_future *child_fut,
                   pie_rt_instance **out)
{
    if (argc < 1 || !argv)
        return pie_err_set(PIE_EINVAL, "launch needs argv[0]");
    pie_rt_instance *i = NULL;
    int rc = instance_alloc(rt, m, argc, argv, &i);
    if (rc < 0)
        return rc;
    pie_rt_module_ref(m);
    i->mod = m;
    i->id = atomic_fetch_add(&rt->next_id, 1) + 1;
    atomic_init(&i->refs, out ? 2 : 1);
    if (cbs)
        i->cbs = *cbs;
    i->parent = parent;
    if (parent)
        pie_rt_instance_ref(parent);
    i->child_fut = child_fut;
    pthread_cond_init(&i->done_cv, NULL);
    i->worker = &rt->workers[atomic_fetch_add(&rt->next_worker, 1) %
                             rt->n_workers];
    i->sp = fiber_init(i->stack, i->stack_size, fiber_main, i);
    pthread_mutex_lock(&rt->lock);
    rc = launch_check_locked(rt, i);
    if (rc < 0) {
        pthread_mutex_unlock(&rt->lock);
        launch_undo(i);
        return rc;
    }
    live_add_locked(rt, i);
    pthread_mutex_unlock(&rt->lock);
    if (out)
        *out = i;
    worker_push(i->worker, i);
    return 0;
}

int pie_rt_launch(pie_rt *rt, pie_rt_module *m, int argc,
                  const char *const *argv, const pie_rt_launch_cbs *cbs,
                  pie_rt_instance **out)
{
    return pie__rt_launch(rt, m, argc, argv, cbs, NULL, NULL, out);
}

int32_t pie_rt_wait(pie_rt_instance *i, char *reason, size_t cap)
{
    pthread_mutex_lock(&i->rt->lock);
    while (!i->ended)
        pthread_cond_wait(&i->done_cv, &i->rt->lock);
    pthread_mutex_unlock(&i->rt->lock);
    if (reason && cap)
        snprintf(reason, cap, "%s", i->trapped ? i->reason : "");
    return i->trapped ? PIE_ETRAP : i->status;
}

int pie_rt_kill(pie_rt_instance *i, const char *reason)
{
    pthread_mutex_lock(&i->rt->lock);
    if (!i->ended && !atomic_load(&i->kill_req)) {
        snprintf(i->kill_reason, sizeof i->kill_reason, "%s",
                 reason ? reason : "");
        atomic_store(&i->kill_req, true);
        pie__rt_wake_locked(i);
    }
    pthread_mutex_unlock(&i->rt->lock);
    return 0;
}

uint32_t pie_rt_instance_id(const pie_rt_instance *i) { return i->id; }
void *pie_rt_engine_ctx(pie_rt_instance *i) { return i->engine_ctx; }
void pie_rt_set_engine_ctx(pie_rt_instance *i, void *c) { i->engine_ctx = c; }
pie_rt *pie_rt_of(pie_rt_instance *i) { return i->rt; }

int32_t pie_rt_live_instances(pie_rt *rt)
{
    pthread_mutex_lock(&rt->lock);
    int32_t n = rt->n_live;
    pthread_mutex_unlock(&rt->lock);
    return n;
}

/* ---- guest memory ------------------------------------------------------- */

void *pie_rt_guest_ptr(pie_rt_instance *i, uint32_t off, uint64_t len)
{
    const struct { uint8_t *data; uint32_t pages, max_pages, size; } *m = i->mem;
    if (!m || (uint64_t)off + len > m->size)
        pie_rt_trap(i, "bad pointer passed to a host call: [%u, +%llu) "
                       "outside linear memory of %u bytes", off,
                       (unsigned long long)len, m ? m->size : 0);
    return m->data + off;
}

void pie_rt_copy_in(pie_rt_instance *i, void *dst, uint32_t off, uint64_t len)
{
    void *p = pie_rt_guest_ptr(i, off, len);
    if (len)
        memcpy(dst, p, len);
}

void pie_rt_copy_out(pie_rt_instance *i, uint32_t off, const void *src,
                     uint64_t len)
{
    void *p = pie_rt_guest_ptr(i, off, len);
    if (len)
        memcpy(p, src, len);
}

/* ---- create / free ------------------------------------------------------ */

static char *default_cache_dir(void)
{
    const char *e = getenv("PIE_CACHE_DIR");
    char buf[4096];
    if (e && *e) {
        snprintf(buf, sizeof buf, "%s", e);
    } else {
        const char *home = getenv("HOME");
        if (home && *home)
            snprintf(buf, sizeof buf, "%s/.cache/pie", home);
        else            /* straight under sticky /tmp: no parent of others */
            snprintf(buf, sizeof buf, "/tmp/pie-cache-%u", (unsigned)geteuid());
    }
    return strdup(buf);
}

static int mkdir_p(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        mkdir(path, 0700);
        *p = '/';
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return pie_err_set(PIE_EIO, "cannot create cache dir %s: %s", path,
                           strerror(errno));
    return 0;
}

/* Whether the directory holding path lets no one else rename path: owned
 * by this user or root, and not writable by group or others unless sticky
 * (as /tmp). Another user owning it could swap the cache dir itself. */
static int check_cache_parent(const char *path)
{
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", path);
    size_t n = strlen(parent);
    while (n > 1 && parent[n - 1] == '/') parent[--n] = 0;
    char *slash = strrchr(parent, '/');
    if (!slash) snprintf(parent, sizeof parent, ".");
    else if (slash == parent) parent[1] = 0;
    else *slash = 0;
    struct stat st;
    if (stat(parent, &st) != 0)
        return pie_err_set(PIE_EIO, "cache dir's parent %s: %s", parent,
                           strerror(errno));
    if (st.st_uid != geteuid() && st.st_uid != 0)
        return pie_err_set(PIE_EPERM, "cache dir %s is in %s, owned by uid %u "
                           "(not this user, not root), who could replace it: "
                           "set PIE_CACHE_DIR to a directory of your own", path,
                           parent, (unsigned)st.st_uid);
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
        return pie_err_set(PIE_EPERM, "cache dir %s is in %s, which group or "
                           "others can write (mode %03o, not sticky): set "
                           "PIE_CACHE_DIR to a directory of your own", path,
                           parent, (unsigned)(st.st_mode & 0777));
    return 0;
}

/* The compile cache holds code the server runs: refuse a directory that
 * someone else could write to (another user's, a symlink, group/world
 * writable), or whose parent lets someone else replace it (e.g. a
 * /tmp/.cache made by another user). */
static int check_cache_dir(const char *path)
{
    int rc = check_cache_parent(path);
    if (rc)
        return rc;
    struct stat st;
    if (lstat(path, &st) != 0)
        return pie_err_set(PIE_EIO, "cache dir %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return pie_err_set(PIE_EPERM, "cache dir %s is not a directory (a "
                           "symlink?): set PIE_CACHE_DIR to a directory of "
                           "your own", path);
    if (st.st_uid != geteuid())
        return pie_err_set(PIE_EPERM, "cache dir %s is owned by uid %u, not "
                           "by this user (uid %u): set PIE_CACHE_DIR to a "
                           "directory of your own", path, (unsigned)st.st_uid,
                           (unsigned)geteuid());
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return pie_err_set(PIE_EPERM, "cache dir %s is writable by group or "
                           "others (mode %03o): chmod 700 it or set "
                           "PIE_CACHE_DIR", path, (unsigned)(st.st_mode & 0777));
    return 0;
}

/* Fills in the defaults for the options left at zero (or out of range). */
static void apply_defaults(pie_rt_opts *o)
{
    if (o->n_workers <= 0) o->n_workers = 2;
    if (!o->memory_limit) o->memory_limit = 1ull << 30;
    if (o->cpu_limit_s == 0 || isnan(o->cpu_limit_s))
        o->cpu_limit_s = 60;
    if (o->compile_cpu_s <= 0) o->compile_cpu_s = 60;
    if (!o->compile_mem) o->compile_mem = 2ull << 30;
    if (o->fiber_stack < (256u << 10)) o->fiber_stack = 1u << 20;
    o->fiber_stack = (o->fiber_stack + 4095) & ~4095u;
}

/* Copies cache dir and HTTP allow list into rt; PIE_ENOMEM, freeing both. */
static int copy_strings(pie_rt *rt)
{
    rt->cache_dir = rt->o.cache_dir ? strdup(rt->o.cache_dir)
                                    : default_cache_dir();
    rt->http_allow = calloc(rt->o.n_http_allow + 1, sizeof(char *));
    if (!rt->cache_dir || !rt->http_allow) {
        free(rt->cache_dir);
        free(rt->http_allow);
        return pie_err_set(PIE_ENOMEM, "out of memory");
    }
    for (int k = 0; k < rt->o.n_http_allow; k++)
        rt->http_allow[k] = strdup(rt->o.http_allow[k]);
    rt->o.http_allow = (const char *const *)rt->http_allow;
    rt->o.cache_dir = rt->cache_dir;
    return 0;
}

/* Initializes rt's lock and condvars (timer_cv on CLOCK_MONOTONIC). */
static void init_sync(pie_rt *rt)
{
    pthread_mutex_init(&rt->lock, NULL);
    pthread_cond_init(&rt->live_cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&rt->timer_cv, &ca);
    pthread_condattr_destroy(&ca);
}

/* Starts the worker threads; on failure rt->n_workers counts those started. */
static int start_workers(pie_rt *rt)
{
    rt->n_workers = rt->o.n_workers;
    rt->workers = calloc(rt->n_workers, sizeof *rt->workers);
    if (!rt->workers)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    for (int k = 0; k < rt->n_workers; k++) {
        pie_rt_worker *w = &rt->workers[k];
        w->rt = rt;
        w->idx = k;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cv, NULL);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            rt->n_workers = k;
            return pie_err_set(PIE_EIO, "cannot start worker threads");
        }
    }
    return 0;
}

/* pie_rt_create's error path: stops the workers started, frees rt. */
static void create_undo(pie_rt *rt)
{
    if (rt->workers) {
        for (int k = 0; k < rt->n_workers; k++) {
            pthread_mutex_lock(&rt->workers[k].lock);
            rt->workers[k].stop = true;
            pthread_cond_signal(&rt->workers[k].cv);
            pthread_mutex_unlock(&rt->workers[k].lock);
            pthread_join(rt->workers[k].thread, NULL);
        }
    }
    for (int k = 0; k < rt->o.n_http_allow; k++)
        free(rt->http_allow[k]);
    free(rt->http_allow);
    free(rt->workers);
    free(rt->cache_dir);
    free(rt);
}

int pie_rt_create(const pie_rt_opts *o, pie_rt **out)
{
    *out = NULL;
    pie_rt *rt = calloc(1, sizeof *rt);
    if (!rt)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    if (o)
        rt->o = *o;
    apply_defaults(&rt->o);
    int rc = copy_strings(rt);
    if (rc) {
        free(rt);
        return rc;
    }
    rc = mkdir_p(rt->cache_dir);
    if (!rc)
        rc = check_cache_dir(rt->cache_dir);
    if (rc)
        goto err;
    pie__rt_cache_sweep(rt->cache_dir);
    pie__rt_signals_init();
    init_sync(rt);
    rc = start_workers(rt);
    if (rc)
        goto err;
    if (pthread_create(&rt->watchdog, NULL, watchdog_main, rt) != 0) {
        rc = pie_err_set(PIE_EIO, "cannot start the watchdog thread");
        goto err;
    }
    *out = rt;
    return 0;
err:
    create_undo(rt);
    return rc;
}

void pie_rt_free(pie_rt *rt)
{
    if (!rt)
        return;
    pthread_mutex_lock(&rt->lock);
    rt->closing = true;
    pthread_mutex_unlock(&rt->lock);
    /* Kill what still runs; the watchdog keeps signalling until it ends. */
    for (;;) {
        pthread_mutex_lock(&rt->lock);
        pie_rt_instance *i = rt->live;
        while (i && atomic_load(&i->kill_req))
            i = i->lnext;
        if (i)
            pie_rt_instance_ref(i);
        pthread_mutex_unlock(&rt->lock);
        if (!i)
            break;
        pie_rt_kill(i, "runtime shutting down");
        pie_rt_instance_unref(i);
    }
    pthread_mutex_lock(&rt->lock);
    while (rt->n_live > 0 || rt->n_http > 0 || rt->n_engine > 0)
        pthread_cond_wait(&rt->live_cv, &rt->lock);
    rt->stopping = true;
    pthread_cond_signal(&rt->timer_cv);
    pthread_mutex_unlock(&rt->lock);
    pthread_join(rt->watchdog, NULL);
    for (int k = 0; k < rt->n_workers; k++) {
        pie_rt_worker *w = &rt->workers[k];
        pthread_mutex_lock(&w->lock);
        w->stop = true;
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL);
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->cv);
    }
    while (rt->n_timers)
        pie__rt_future_unref_locked(timer_remove(rt, 0));
    free(rt->timers);
    pie__rt_messaging_free(rt);
    for (int k = 0; k < rt->o.n_http_allow; k++)
        free(rt->http_allow[k]);
    free(rt->http_allow);
    free(rt->workers);
    free(rt->cache_dir);
    pthread_mutex_destroy(&rt->lock);
    pthread_cond_destroy(&rt->live_cv);
    pthread_cond_destroy(&rt->timer_cv);
    free(rt);
}
