/*
 * pool.c — a small fork-join worker pool for the CPU backend.
 *
 * The caller of pie__cpu_pool_run() is worker 0; n_threads - 1 pthreads
 * sleep on `wake` between jobs. A job is (fn, ctx, n_tasks) published under
 * the mutex with a new generation number; every thread, the caller
 * included, takes task indices from the atomic counter `next` until they
 * run out, counting finished tasks in `n_done`.
 *
 * A worker joins a job only under the mutex (active++) and leaves it under
 * the mutex (active--). The caller returns as soon as n_done == n_tasks:
 * it never waits for a worker the OS has not scheduled yet (on a busy
 * machine that wait would cost a time slice per job). A worker still
 * inside a finished job can only find the task counter exhausted and
 * leave; it never touches ctx again, so ctx may live on the caller's
 * stack. The next job is published only once active == 0, so no worker
 * ever reads fn/ctx/n_tasks while they change. A worker that wakes after
 * its job ended joins it, finds no task and leaves. Jobs never overlap:
 * the backend runs one forward at a time.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"
#include "common/pie_err.h"

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() atomic_signal_fence(memory_order_seq_cst)
#endif

struct pie__cpu_pool {
    int32_t          n_threads;   /* workers including the caller          */
    pthread_t       *threads;     /* (n_threads - 1)                       */
    pthread_mutex_t  mu;
    pthread_cond_t   wake;        /* new generation or stop                */
    pthread_cond_t   done;        /* a worker left a job (broadcast)       */
    uint64_t         generation;  /* bumped per job, under mu              */
    int32_t          active;      /* workers inside the current job, mu    */
    int              stop;
    pie__cpu_task_fn fn;
    void            *ctx;
    int64_t          n_tasks;
    _Atomic int64_t  next;        /* next task index to take               */
    _Atomic int64_t  n_done;      /* tasks finished                        */
};

typedef struct { pie__cpu_pool *p; int32_t id; } worker_arg;

static void run_tasks(pie__cpu_pool *p, int32_t worker)
{
    for (;;) {
        int64_t t = atomic_fetch_add(&p->next, 1);
        if (t >= p->n_tasks) return;
        p->fn(p->ctx, t, worker);
        atomic_fetch_add(&p->n_done, 1);
    }
}

static void *worker_main(void *arg)
{
    worker_arg a = *(worker_arg *)arg;
    free(arg);
    pie__cpu_pool *p = a.p;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        p->active++;
        pthread_mutex_unlock(&p->mu);
        run_tasks(p, a.id);
        pthread_mutex_lock(&p->mu);
        p->active--;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int pie__cpu_pool_create(int32_t n_threads, pie__cpu_pool **out)
{
    pie__cpu_pool *p = calloc(1, sizeof *p);
    if (!p) return pie_err_set(PIE_ENOMEM, "cpu pool: out of memory");
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = calloc((size_t)p->n_threads, sizeof *p->threads);
    if (!p->threads) goto err;
    for (int32_t i = 1; i < p->n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) goto err_started;
        *a = (worker_arg){ p, i };
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, a) != 0) {
            free(a);
            goto err_started;
        }
        continue;
    err_started:
        p->n_threads = i;   /* only threads 1..i-1 exist */
        pie__cpu_pool_free(p);
        return pie_err_set(PIE_ENOMEM, "cpu pool: cannot start thread %d", i);
    }
    *out = p;
    return 0;
err:
    free(p);
    return pie_err_set(PIE_ENOMEM, "cpu pool: out of memory");
}

void pie__cpu_pool_run(pie__cpu_pool *p, int64_t n_tasks, pie__cpu_task_fn fn,
                       void *ctx)
{
    if (n_tasks <= 0) return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (p->active > 0) pthread_cond_wait(&p->done, &p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->n_done, 0);
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, 0);
    /* Spin briefly for tasks a worker is finishing, then sleep. */
    for (int i = 0; i < 4000 && atomic_load(&p->n_done) < n_tasks; i++)
        CPU_RELAX();
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->n_done) < n_tasks)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void pie__cpu_pool_free(pie__cpu_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 1; i < p->n_threads; i++)
        pthread_join(p->threads[i - 1], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}
