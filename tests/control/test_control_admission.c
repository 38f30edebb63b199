/*
 * test_control_admission.c — page admission under an over-committed KV pool
 * (the `wait` policy), against the fake backend (fake_backend.h).
 *
 * Before the wait-cycle fix these hung: clients that each hold part of the
 * pool and each wait for one more page waited for one another forever, and
 * a request that waiting could never satisfy waited forever too. Now such
 * an allocation fails at once with PIE_ENOMEM ("KV pool exhausted"): the
 * hopeless one itself, and in a cycle the newest waiter of the lowest
 * priority class, while the older waiters get its pages when it lets go.
 * Every test arms alarm(): a regression that hangs dies with SIGALRM (a
 * failure) instead of stalling ctest, which also has a TIMEOUT.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

#define VOCAB 1000
#define PS    4
#define GUARD_S 30      /* no test here needs more than a fraction of this */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static pie_ctl *make_ctl(int32_t n_pages, int32_t delay_us, pie_backend **b)
{
    CHECK_OK(fake_backend_create(VOCAB, PS, n_pages, delay_us, b));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(*b, NULL, &ctl));
    return ctl;
}

static pie_ctl_client *open_client(pie_ctl *ctl, const char *name, int prio)
{
    pie_ctl_client_opts o = { .name = name, .priority = prio };
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, &o, &c));
    return c;
}

static pie_ctl_stats stats(pie_ctl *ctl)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    return st;
}

/* Every page is back and nothing is queued once all clients closed. */
static void done_ctl(pie_ctl *ctl, pie_backend *b)
{
    pie_ctl_stats st = stats(ctl);
    CHECK(st.pages_free == st.pages_total, "%d of %d pages free at the end",
          st.pages_free, st.pages_total);
    CHECK(st.queue_depth == 0 && st.clients == 0, "queue %d, clients %d at "
          "the end", st.queue_depth, st.clients);
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

/* rc must be PIE_ENOMEM with a message containing want. */
static void check_enomem(int rc, const char *want, const char *what)
{
    CHECK(rc == PIE_ENOMEM, "%s: expected PIE_ENOMEM (%d), got %d (%s)", what,
          PIE_ENOMEM, rc, pie_err_msg());
    CHECK(strstr(pie_err_msg(), want) != NULL, "%s: message lacks '%s': %s",
          what, want, pie_err_msg());
}

/* ---- an allocation on another thread ------------------------------------ */

typedef struct waiter {
    pie_ctl_client *c;
    int32_t         n, timeout_ms;
    uint32_t        h[8];
    int             rc;
    char            msg[512];
    double          ms;             /* how long the call took              */
    volatile int    done;
    pthread_t       th;
} waiter;

static void *waiter_main(void *arg)
{
    waiter *w = arg;
    double t = now_ms();
    w->rc = pie_ctl_page_alloc(w->c, w->n, w->timeout_ms, w->h);
    w->ms = now_ms() - t;
    snprintf(w->msg, sizeof w->msg, "%s", pie_err_msg());
    w->done = 1;
    return NULL;
}

/* Starts w's allocation and returns once it sleeps in admission (the
 * alloc_waits counter moves under the lock the sleeper holds until it
 * sleeps). */
static void waiter_start(pie_ctl *ctl, waiter *w)
{
    uint64_t before = stats(ctl).alloc_waits;
    w->done = 0;
    CHECK(pthread_create(&w->th, NULL, waiter_main, w) == 0, "thread");
    while (stats(ctl).alloc_waits == before && !w->done) usleep(1000);
    CHECK(!w->done, "allocation returned %d at once instead of waiting (%s)",
          w->rc, w->msg);
}

static void waiter_join(waiter *w)
{
    pthread_join(w->th, NULL);
}

/* ---- tests ---------------------------------------------------------------- */

/* Requests that no wait can satisfy fail at once, even with timeout < 0;
 * a short pool that another, running client may still free does not. */
static void test_refused_at_once(void)
{
    alarm(GUARD_S);
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, &b);
    pie_ctl_client *c = open_client(ctl, "c", 0), *e = open_client(ctl, "e", 0);
    uint32_t h[8], he[2];
    CHECK_OK(pie_ctl_page_alloc(c, 6, 0, h));
    double t = now_ms();
    check_enomem(pie_ctl_page_alloc(c, 3, -1, h + 6), "waiting cannot help",
                 "6 held + 3 asked of 8, timeout < 0");
    printf("refused at once: %s\n", pie_err_msg());
    check_enomem(pie_ctl_page_alloc(c, 9, -1, h), "pool has only 8",
                 "9 pages of 8, timeout < 0");
    CHECK(now_ms() - t < 1000, "refusals took %.0f ms", now_ms() - t);
    /* exported pages are pinned too: 2 held + 2 exported + 5 > 8 */
    CHECK_OK(pie_ctl_page_free(c, 4, h + 2));
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, he));
    CHECK_OK(pie_ctl_export(e, "sys", 2, he));
    pie_ctl_client_close(e);
    check_enomem(pie_ctl_page_alloc(c, 5, -1, h + 2), "KV pool exhausted",
                 "2 held + 2 exported + 5 asked of 8");
    CHECK_OK(pie_ctl_page_alloc(c, 4, -1, h + 2));
    CHECK_OK(pie_ctl_unexport(c, "sys"));
    /* beyond a quota: PIE_ELIMIT at once */
    pie_ctl_client_opts qo = { .name = "q", .max_pages = 1 };
    pie_ctl_client *q;
    CHECK_OK(pie_ctl_client_open(ctl, &qo, &q));
    CHECK(pie_ctl_page_alloc(q, 2, -1, he) == PIE_ELIMIT, "quota: %s",
          pie_err_msg());
    /* c and x hold the pool but do not wait: q waits for them, times out */
    uint32_t hq[1], hx[2];
    pie_ctl_client *x = open_client(ctl, "x", 0);
    CHECK_OK(pie_ctl_page_alloc(x, 2, 0, hx));
    t = now_ms();
    int rc = pie_ctl_page_alloc(q, 1, 100, hq);
    CHECK(rc == PIE_EBUSY, "a pool held by clients that do not wait: "
          "expected PIE_EBUSY after the timeout, got %d (%s)", rc,
          pie_err_msg());
    CHECK(now_ms() - t >= 90, "gave up after %.0f ms, expected ~100",
          now_ms() - t);
    pie_ctl_client_close(q);
    pie_ctl_client_close(x);
    pie_ctl_client_close(c);
    printf("refused at once: hopeless requests get PIE_ENOMEM, a pool others "
           "may free gets PIE_EBUSY after the wait\n");
    done_ctl(ctl, b);
    alarm(0);
}

/* Two clients hold the whole pool and each waits for one more page: the
 * newest fails at once, the older one gets its pages once it lets go. With
 * priorities, the lower class fails first even when it is older. */
static void cycle_of_two(int old_prio, int young_prio, int32_t timeout_ms)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, &b);
    pie_ctl_client *old = open_client(ctl, "old", old_prio);
    pie_ctl_client *young = open_client(ctl, "young", young_prio);
    bool young_loses = young_prio >= old_prio;
    pie_ctl_client *loser = young_loses ? young : old;
    uint32_t ho[4], hy[4], extra[1];
    CHECK_OK(pie_ctl_page_alloc(old, 4, 0, ho));
    CHECK_OK(pie_ctl_page_alloc(young, 4, 0, hy));
    waiter w = { .c = young_loses ? old : young, .n = 1,
                 .timeout_ms = timeout_ms };
    waiter_start(ctl, &w);
    double t = now_ms();
    int rc = pie_ctl_page_alloc(loser, 1, timeout_ms, extra);
    check_enomem(rc, "KV pool exhausted", "the cycle's victim");
    CHECK(strstr(pie_err_msg(), young_loses ? "'young'" : "'old'"),
          "victim named wrongly: %s", pie_err_msg());
    CHECK(now_ms() - t < 1000, "the victim waited %.0f ms", now_ms() - t);
    usleep(20000);
    CHECK(!w.done, "the survivor's allocation ended (%d: %s) before the "
          "victim let go of its pages", w.rc, w.msg);
    CHECK(stats(ctl).alloc_cycles_broken == 1, "cycles broken: %llu",
          (unsigned long long)stats(ctl).alloc_cycles_broken);
    CHECK_OK(pie_ctl_page_free(loser, 4, young_loses ? hy : ho));
    waiter_join(&w);
    CHECK(w.rc == 0, "the survivor got %d: %s", w.rc, w.msg);
    printf("cycle of two (priorities %d/%d, timeout %d): %s failed at once: "
           "%s\n", old_prio, young_prio, timeout_ms, loser == old ? "old" :
           "young", pie_err_msg());
    pie_ctl_client_close(old);
    pie_ctl_client_close(young);
    done_ctl(ctl, b);
}

static void test_cycle_of_two(void)
{
    alarm(GUARD_S);
    cycle_of_two(0, 0, -1);         /* the newest fails                    */
    cycle_of_two(0, 0, 10000);      /* timed waits: at once, not at 10 s   */
    cycle_of_two(3, 0, -1);         /* the lower class fails, though older */
    alarm(0);
}

/* An inferlet's host call polls with timeout 0 (runtime/host_engine.c):
 * a poller counts as waiting, fails when it is the newest of a cycle, and
 * dooms a newer blocked waiter otherwise. */
static void test_cycle_poller(void)
{
    alarm(GUARD_S);
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, &b);
    pie_ctl_client *old = open_client(ctl, "old", 0);
    pie_ctl_client *young = open_client(ctl, "young", 0);
    uint32_t ho[5], hy[4];
    CHECK_OK(pie_ctl_page_alloc(old, 4, 0, ho));
    CHECK_OK(pie_ctl_page_alloc(young, 4, 0, hy));
    /* the young one polls while the old one is blocked */
    waiter w = { .c = old, .n = 1, .timeout_ms = -1 };
    waiter_start(ctl, &w);
    check_enomem(pie_ctl_page_alloc(young, 1, 0, hy), "KV pool exhausted",
                 "newest poller in a cycle");
    CHECK_OK(pie_ctl_page_free(young, 1, hy));
    waiter_join(&w);
    CHECK(w.rc == 0, "the blocked old client got %d: %s", w.rc, w.msg);
    /* the old one polls while the young one is blocked: the young fails */
    CHECK_OK(pie_ctl_page_free(old, 1, w.h));
    CHECK_OK(pie_ctl_page_alloc(young, 1, 0, hy));
    waiter v = { .c = young, .n = 1, .timeout_ms = -1 };
    waiter_start(ctl, &v);
    int rc = pie_ctl_page_alloc(old, 1, 0, ho + 4);
    CHECK(rc == PIE_EBUSY, "the older poller: expected PIE_EBUSY, got %d "
          "(%s)", rc, pie_err_msg());
    waiter_join(&v);
    CHECK(v.rc == PIE_ENOMEM && strstr(v.msg, "'young'"), "the blocked young "
          "client: expected PIE_ENOMEM, got %d (%s)", v.rc, v.msg);
    pie_ctl_client_close(young);
    CHECK_OK(pie_ctl_page_alloc(old, 1, 0, ho + 4));
    CHECK(stats(ctl).alloc_cycles_broken == 2, "cycles broken: %llu",
          (unsigned long long)stats(ctl).alloc_cycles_broken);
    pie_ctl_client_close(old);
    printf("pollers: the newest of a cycle fails, blocked or polling\n");
    done_ctl(ctl, b);
    alarm(0);
}

/* ---- native generations on an over-committed pool ------------------------- */

typedef struct gen_run {
    pie_ctl *ctl;
    int32_t  prompt[8], out[40], n_out, timeout_ms;
    int      rc;
    char     msg[512];
} gen_run;

static void *gen_main(void *arg)
{
    gen_run *g = arg;
    pie_ctl_gen_opts o = { .prompt = g->prompt, .n_prompt = 8,
                           .max_tokens = 40, .lookahead = 4,
                           .timeout_ms = g->timeout_ms };
    g->rc = pie_ctl_generate(g->ctl, &o, g->out, 40, &g->n_out);
    snprintf(g->msg, sizeof g->msg, "%s", pie_err_msg());
    return NULL;
}

/* 4 generations that each need 13 pages of 4 tokens (8 + 40 + lookahead)
 * share 16: all start, all run out, and each cycle fails its newest. */
static void generate_overcommitted(int32_t timeout_ms)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 300, &b);
    gen_run g[4];
    pthread_t th[4];
    double t = now_ms();
    for (int i = 0; i < 4; i++) {
        g[i] = (gen_run){ .ctl = ctl, .timeout_ms = timeout_ms };
        uint32_t seed = 101 + (uint32_t)i;
        for (int j = 0; j < 8; j++) {
            seed = seed * 1103515245u + 12345u;
            g[i].prompt[j] = (int32_t)((seed >> 8) % VOCAB);
        }
        CHECK(pthread_create(&th[i], NULL, gen_main, &g[i]) == 0, "thread");
    }
    int ok = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        if (g[i].rc != 0) {
            CHECK(g[i].rc == PIE_ENOMEM && strstr(g[i].msg, "KV pool "
                  "exhausted"), "generation %d: expected PIE_ENOMEM, got %d "
                  "(%s)", i, g[i].rc, g[i].msg);
            continue;
        }
        int32_t h[48];
        memcpy(h, g[i].prompt, sizeof g[i].prompt);
        CHECK(g[i].n_out == 40, "generation %d: %d tokens", i, g[i].n_out);
        for (int k = 0; k < 40; k++) {
            h[8 + k] = fake_expected_next(h, 8 + k, VOCAB);
            CHECK(g[i].out[k] == h[8 + k], "generation %d: expected %d, got "
                  "%d at step %d", i, h[8 + k], g[i].out[k], k);
        }
        ok++;
    }
    pie_ctl_stats st = stats(ctl);
    CHECK(ok >= 1, "no generation finished");
    CHECK(st.alloc_cycles_broken == (uint64_t)(4 - ok), "%d failed but %llu "
          "cycles were broken", 4 - ok,
          (unsigned long long)st.alloc_cycles_broken);
    printf("over-committed pool (timeout %d): %d/4 generations finished, "
           "the others failed at once (%.0f ms in all)\n", timeout_ms, ok,
           now_ms() - t);
    done_ctl(ctl, b);
}

static void test_generate_overcommitted(void)
{
    alarm(GUARD_S);
    generate_overcommitted(-1);
    double t = now_ms();
    generate_overcommitted(20000);  /* the cycle breaks, nobody times out */
    CHECK(now_ms() - t < 10000, "took %.0f ms with 20 s timeouts",
          now_ms() - t);
    alarm(0);
}

int main(void)
{
    test_refused_at_once();
    test_cycle_of_two();
    test_cycle_poller();
    test_generate_overcommitted();
    TEST_DONE();
}
