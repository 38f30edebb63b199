/*
 * test_rt_waiters.c — futures that wait in host lists (receive, queue_pull,
 * subscription_next) and sleep timers, abandoned by an inferlet in a loop:
 * the host must drop them at once, keep each call O(1) (O(log n) for
 * timers) and cap what one list may hold.
 *
 *   test_rt_waiters loop_pull    queue_pull + cancel/free, 20,000 times
 *   test_rt_waiters loop_recv    receive + cancel/free
 *   test_rt_waiters loop_sub     subscription_next + cancel/free
 *       each: no waiter left while the instance still runs, the second
 *       half of the loop no slower than the first, delivery still works
 *   test_rt_waiters cap          65,537 pending pulls: the last fails with
 *                                PIE_ELIMIT; none left after the instance
 *   test_rt_waiters sleeps       freeing sleeps from a heap of 100,000 costs
 *                                about what it costs in an empty heap
 *   test_rt_waiters launch       an instance may have 256 live descendants:
 *                                the 257th child fails PIE_ELIMIT, and an
 *                                inferlet launching itself stops there
 */
#define _GNU_SOURCE
#include <unistd.h>

#include "runtime/rt_internal.h"      /* white-box: waiter count, timers */
#include "tests/runtime/rt_test_util.h"

#define LOOP_N 20000

/* What the instance reported with its one send(), and the number of
 * waiters the runtime held at that moment. */
typedef struct report {
    pthread_mutex_t lock;
    pthread_cond_t  cv;
    pie_rt         *rt;
    int             got;
    long long       t1, t2;
    int32_t         waiters;
} report;

static void on_report(void *u, pie_rt_instance *i, const void *b, size_t len)
{
    report *r = u;
    char s[64];
    (void)i;
    snprintf(s, sizeof s, "%.*s", (int)(len < 63 ? len : 63), (const char *)b);
    int32_t w = pie__rt_waiter_count(r->rt);
    pthread_mutex_lock(&r->lock);
    if (sscanf(s, "%lld %lld", &r->t1, &r->t2) == 2)
        r->got = 1;
    else
        r->got = -1;
    r->waiters = w;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->lock);
}

static void wait_report(report *r)
{
    pthread_mutex_lock(&r->lock);
    while (!r->got)
        pthread_cond_wait(&r->cv, &r->lock);
    pthread_mutex_unlock(&r->lock);
    CHECK(r->got == 1, "the instance's report was malformed");
}

static pie_rt_instance *launch_report(pie_rt *rt, pie_rt_module *m,
                                      report *r, const char **argv)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->rt = rt;
    pie_rt_launch_cbs cbs = {.user = r, .on_message = on_report};
    return launch_v(rt, m, &cbs, argv);
}

static int32_t finish(pie_rt_instance *i, report *r)
{
    char reason[256];
    int32_t st = pie_rt_wait(i, reason, sizeof reason);
    pie_rt_instance_unref(i);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cv);
    return st;
}

static void test_loop(const char *kind)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    char n[16];
    snprintf(n, sizeof n, "%d", LOOP_N);
    const char *argv[] = {"waiters", "loop", kind, n, NULL};
    report r;
    pie_rt_instance *i = launch_report(rt, m, &r, argv);
    wait_report(&r);
    printf("%s: %d abandoned waiters, halves took %.1f and %.1f ms, "
           "%d waiters left\n", kind, LOOP_N, r.t1 / 1e6, r.t2 / 1e6,
           r.waiters);
    CHECK(r.waiters == 0, "expected 0 waiters after the loop, got %d",
          r.waiters);
    /* Linear work: each half costs the same; a list walked per call makes
     * the second half about 3x the first. */
    CHECK(r.t2 < 2 * r.t1 + 20000000ll,
          "second half took %lld ns, first %lld ns: the cost per call grows",
          r.t2, r.t1);
    CHECK_OK(pie_rt_send(i, "go", 2));
    int32_t st = finish(i, &r);
    CHECK(st == 2, "expected status 2 (length of \"go\"), got %d", st);
    int32_t w = pie__rt_waiter_count(rt);
    CHECK(w == 0, "expected 0 waiters after the instance, got %d", w);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_cap(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *argv[] = {"waiters", "cap", NULL};
    report r;
    pie_rt_instance *i = launch_report(rt, m, &r, argv);
    int32_t st = finish(i, &r);
    CHECK(st == 0, "expected status 0, got %d (20: a pull was not pending, "
          "21: no PIE_ELIMIT past the cap, 22: freeing made no room)", st);
    int32_t w = pie__rt_waiter_count(rt);
    printf("cap: 65536 pending pulls held, the next refused; "
           "%d waiters after the instance\n", w);
    CHECK(w == 0, "expected 0 waiters after the instance ended, got %d", w);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_sleeps(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *argv[] = {"waiters", "sleeps", "100000", "2000", NULL};
    report r;
    pie_rt_instance *i = launch_report(rt, m, &r, argv);
    wait_report(&r);
    int32_t st = finish(i, &r);
    CHECK(st == 0, "expected status 0, got %d", st);
    printf("sleeps: 2000 frees took %.2f ms with an empty heap, %.2f ms "
           "from a heap of 100000\n", r.t1 / 1e6, r.t2 / 1e6);
    /* O(log n) per cancel: the big heap costs a few times the small one at
     * most; a scan of the heap per cancel costs ~100000 steps each. */
    CHECK(r.t2 < 5 * r.t1 + 2000000ll,
          "frees from a heap of 100000 took %lld ns vs %lld ns from an "
          "empty one: cancel scans the heap", r.t2, r.t1);
    pthread_mutex_lock(&rt->lock);
    int32_t nt = rt->n_timers;
    pthread_mutex_unlock(&rt->lock);
    CHECK(nt == 0, "expected an empty timer heap, got %d entries", nt);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_launch(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    CHECK_OK(pie_rt_module_register(rt, "waiters", m));
    const char *spawn[] = {"waiters", "spawn", "300", NULL};
    report r;
    int32_t st = finish(launch_report(rt, m, &r, spawn), &r);
    printf("launch: %d of 300 children started\n", st);
    CHECK(st == 256, "expected 256 children to start, got %d", st);
    const char *fork[] = {"waiters", "fork", NULL};
    st = finish(launch_report(rt, m, &r, fork), &r);
    printf("launch: a self-launching inferlet ended with %d\n", st);
    CHECK(st == PIE_ELIMIT, "expected PIE_ELIMIT (%d) from the recursion, "
          "got %d", PIE_ELIMIT, st);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "loop_pull")) test_loop("pull");
    else if (!strcmp(t, "loop_recv")) test_loop("recv");
    else if (!strcmp(t, "loop_sub")) test_loop("sub");
    else if (!strcmp(t, "cap")) test_cap();
    else if (!strcmp(t, "sleeps")) test_sleeps();
    else if (!strcmp(t, "launch")) test_launch();
    else {
        fprintf(stderr, "usage: test_rt_waiters loop_pull|loop_recv|"
                        "loop_sub|cap|sleeps|launch\n");
        return 2;
    }
    TEST_DONE();
}
