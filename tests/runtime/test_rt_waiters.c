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
 *   test_rt_waiters names        52,400 queue names (and 13,100 topics)
 *                                left empty are freed at once: none left
 *                                after, and another instance can still
 *                                make names (the runtime's 65,536 names
 *                                were used up before)
 *   test_rt_waiters subs         the 4,097th subscription of an instance
 *                                fails PIE_ELIMIT; freeing one makes room
 *   test_rt_waiters fill         1 MiB pushes until PIE_ELIMIT: 255 fit an
 *                                instance's 256 MiB; another instance can
 *                                still push, and a message it pulls gives
 *                                the first room again; bytes left queued
 *                                by an ended instance stay charged
 *   test_rt_waiters pub          publishing 1 MiB to 8 subscriptions: the
 *                                32nd publish fails PIE_ELIMIT
 *   test_rt_waiters pulls        an instance may have 65,536 pulls waiting
 *                                on queues, each its own name: the next
 *                                fails PIE_ELIMIT while another instance
 *                                can still pull; a pull ended by a
 *                                message, a cancel or a free makes room
 *                                for one more; ending or killing the
 *                                instance leaves no queue behind
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
    /* (The halves' times are printed, not checked: a pass/fail test must
     * not depend on the machine's load. The waiters left behind are what
     * made each call walk a longer list, and they are checked above.) */
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
    /* (O(log n) per cancel shows in the two times printed; a pass/fail
     * test does not check times, which depend on the machine's load.) */
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

static int32_t name_count(pie_rt *rt)
{
    pthread_mutex_lock(&rt->lock);
    int32_t n = rt->n_names;
    pthread_mutex_unlock(&rt->lock);
    return n;
}

static int32_t run_plain(pie_rt *rt, pie_rt_module *m, const char **argv)
{
    report r;
    return finish(launch_report(rt, m, &r, argv), &r);
}

static void test_names(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *many[] = {"waiters", "names", "52400", "", NULL};
    int32_t st = run_plain(rt, m, many);
    CHECK(st == 0, "expected status 0 from 52400 names, got %d", st);
    int32_t n = name_count(rt);
    printf("names: 52400 queues and 13100 topics left empty, %d names "
           "left\n", n);
    CHECK(n == 0, "expected 0 names after the instance, got %d", n);
    const char *more[] = {"waiters", "names", "100", "z", NULL};
    st = run_plain(rt, m, more);
    CHECK(st == 0, "another instance could not make names: status %d "
          "(50-53: a push, pull or subscribe failed)", st);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_subs(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *argv[] = {"waiters", "subs", "5000", NULL};
    int32_t st = run_plain(rt, m, argv);
    printf("subs: %d subscriptions before PIE_ELIMIT\n", st);
    CHECK(st == 4096, "expected 4096 subscriptions before PIE_ELIMIT, got "
          "%d (-1: another error, -2: none of 5000 refused, -3: freeing "
          "one made no room)", st);
    CHECK(name_count(rt) == 0, "expected 0 names after the instance");
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

#define MIB_COST ((1 << 20) + 512)   /* a queued 1 MiB message's charge */

static void test_fill(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *fill[] = {"waiters", "fill", NULL};
    const char *drain[] = {"waiters", "drain", NULL};
    report r;
    pie_rt_instance *i = launch_report(rt, m, &r, fill);
    wait_report(&r);
    printf("fill: %lld pushes of 1 MiB before PIE_ELIMIT\n", r.t1);
    CHECK(r.t1 == 255, "expected 255 pushes of 1 MiB before PIE_ELIMIT, "
          "got %lld (-1: none of 320 refused)", r.t1);
    int32_t st = run_plain(rt, m, drain);
    CHECK(st == 0, "another instance could not push or pull: status %d", st);
    CHECK_OK(pie_rt_send(i, "go", 2));
    st = finish(i, &r);
    CHECK(st == 255, "expected 255 (a push fits after one was pulled), got "
          "%d (41: no PIE_ELIMIT, 42: the push after the pull failed)", st);
    st = run_plain(rt, m, drain);
    CHECK(st == 0, "with an ended instance's messages queued, another "
          "could not push or pull: status %d", st);
    pthread_mutex_lock(&rt->lock);
    size_t q = rt->queued_bytes;
    pthread_mutex_unlock(&rt->lock);
    printf("fill: %zu bytes charged for the 254 messages an ended instance "
           "left queued\n", q);
    CHECK(q == 254u * MIB_COST, "expected %u bytes charged, got %zu",
          254u * MIB_COST, q);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_pub(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    const char *argv[] = {"waiters", "pub", "8", NULL};
    int32_t st = run_plain(rt, m, argv);
    printf("pub: %d publishes of 1 MiB to 8 subscriptions before "
           "PIE_ELIMIT\n", st);
    CHECK(st == 31, "expected 31 publishes before PIE_ELIMIT, got %d "
          "(-1: none of 100 refused, -2: one reached fewer than 8)", st);
    pthread_mutex_lock(&rt->lock);
    size_t q = rt->queued_bytes;
    pthread_mutex_unlock(&rt->lock);
    CHECK(q == 0, "expected 0 bytes charged after the instance, got %zu", q);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

#define MAX_PULLS 65536               /* pulls waiting per instance */

/* Launches "waiters pulls" and checks what it holds at its report. */
static pie_rt_instance *launch_pulls(pie_rt *rt, pie_rt_module *m, report *r)
{
    const char *argv[] = {"waiters", "pulls", NULL};
    pie_rt_instance *i = launch_report(rt, m, r, argv);
    wait_report(r);
    int32_t n = name_count(rt);
    printf("pulls: %lld pulls waiting on their own queues before "
           "PIE_ELIMIT; %d waiters, %d names\n", r->t1, r->waiters, n);
    CHECK(r->t1 == MAX_PULLS, "expected %d pulls waiting before PIE_ELIMIT, "
          "got %lld (-60: a pull did not wait, -61: a pull on a new name past "
          "the cap did not fail PIE_ELIMIT, -62: a pull that found a message "
          "failed)", MAX_PULLS, r->t1);
    CHECK(r->waiters == MAX_PULLS, "expected %d waiters, got %d", MAX_PULLS,
          r->waiters);
    CHECK(n == MAX_PULLS, "expected %d queue names, got %d", MAX_PULLS, n);
    return i;
}

static void test_pulls(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "waiters.wasm", NULL);
    report r;
    pie_rt_instance *i = launch_pulls(rt, m, &r);
    const char *other[] = {"waiters", "names", "100", "o", NULL};
    int32_t st = run_plain(rt, m, other);
    CHECK(st == 0, "with one instance at its pull cap, another could not "
          "pull or push: status %d (50-53: a push, pull or subscribe "
          "failed)", st);
    CHECK_OK(pie_rt_send(i, "go", 2));
    st = finish(i, &r);
    CHECK(st == 0, "expected status 0, got %d (63: a push did not reach its "
          "pull; no room for one new pull, or room for two, after a pull "
          "was 64: delivered, 65: cancelled, 66: freed)", st);
    int32_t w = pie__rt_waiter_count(rt), n = name_count(rt);
    printf("pulls: after the instance, %d waiters, %d names\n", w, n);
    CHECK(w == 0 && n == 0, "expected 0 waiters and 0 names after the "
          "instance ended, got %d and %d", w, n);
    i = launch_pulls(rt, m, &r);
    CHECK_OK(pie_rt_kill(i, "test"));
    st = finish(i, &r);
    w = pie__rt_waiter_count(rt);
    n = name_count(rt);
    printf("pulls: killed with %d pulls waiting (status %d): %d waiters, "
           "%d names left\n", MAX_PULLS, st, w, n);
    CHECK(w == 0 && n == 0, "expected 0 waiters and 0 names after the "
          "instance was killed, got %d and %d", w, n);
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
    else if (!strcmp(t, "names")) test_names();
    else if (!strcmp(t, "subs")) test_subs();
    else if (!strcmp(t, "fill")) test_fill();
    else if (!strcmp(t, "pub")) test_pub();
    else if (!strcmp(t, "pulls")) test_pulls();
    else {
        fprintf(stderr, "usage: test_rt_waiters loop_pull|loop_recv|"
                        "loop_sub|cap|sleeps|launch|names|subs|fill|pub|"
                        "pulls\n");
        return 2;
    }
    TEST_DONE();
}
