/*
 * test_control_faults.c — the control layer when the backend fails, against
 * the fake backend (fake_backend.h):
 *
 *   rerun_*     a batched forward fails: each request of the fire runs
 *               again alone (sched.c, rerun_alone), so only a request that
 *               fails alone fails; the others' tokens are exactly the
 *               reference's (fake_expected_next)
 *   device_lost the backend reports PIE_EDEVLOST: every op of that fire,
 *               every queued one and every later one completes with it,
 *               nothing more reaches the backend, nothing hangs
 *   max_tokens  the backend's per-forward limit (pie_backend.max_tokens)
 *               bounds the fires even where the user asked for more
 *
 * Every test arms a watchdog: a regression that hangs fails.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/ctl_fwd.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

#define VOCAB   1000
#define PS      16
#define N_GEN   8
#define GEN_TOK 24

static void make_prompt(int32_t *p, int32_t n, uint32_t seed)
{
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 8) % VOCAB);
    }
}

/* The reference continuation: n greedy tokens after prompt. */
static void reference(const int32_t *prompt, int32_t np, int32_t n,
                      int32_t *out)
{
    fake_expected_gen(prompt, np, n, VOCAB, out);
}

static void wait_started(pie_backend *b, int32_t n)
{
    for (int k = 0; k < 30000 && fake_backend_started(b) < n; k++) usleep(1000);
    CHECK(fake_backend_started(b) >= n, "forward %d never started", n);
}

static pie_ctl_stats stats(pie_ctl *ctl)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    return st;
}

/* ---- concurrent generations ---------------------------------------------- */

typedef struct gen_job {
    pie_ctl *ctl;
    int32_t  prompt[512], n_prompt;
    int32_t  out[GEN_TOK], n;
    int      rc;
    char     msg[256];          /* pie_err_msg of the generating thread   */
} gen_job;

static void *gen_main(void *arg)
{
    gen_job *j = arg;
    pie_ctl_gen_opts o = { .prompt = j->prompt, .n_prompt = j->n_prompt,
                           .max_tokens = GEN_TOK, .lookahead = 4,
                           .timeout_ms = 10000 };
    j->rc = pie_ctl_generate(j->ctl, &o, j->out, GEN_TOK, &j->n);
    snprintf(j->msg, sizeof j->msg, "%s", pie_err_msg());
    return NULL;
}

/* Occupies the device with a forward of its own client (held by
 * fake_backend_hold), starts the n jobs and returns once every one queued
 * its first steps (prefill and 4 chained decodes): when the caller lets
 * the hold end (fake_backend_hold off), their prefills, ready together, go
 * out in the next fire as one batch. */
static pie_ctl_future *start_behind_hold(pie_ctl *ctl, pie_backend *b,
                                         pie_ctl_client *z, gen_job *jobs,
                                         int n, pthread_t *th)
{
    uint32_t h;
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, &h));
    int32_t tok = 1, pos = 0, oi = 0, s0 = fake_backend_started(b);
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_forward f = { .n_tokens = 1, .tokens = &tok, .positions = &pos,
                          .n_pages = 1, .pages = &h, .last_page_len = 1,
                          .n_outputs = 1, .output_idx = &oi, .samplers = &s };
    pie_ctl_future *fh;
    fake_backend_hold(b, true);
    CHECK_OK(pie_ctl_forward_submit(z, &f, NULL, NULL, &fh));
    wait_started(b, s0 + 1);
    for (int i = 0; i < n; i++) {
        jobs[i].ctl = ctl;
        CHECK(pthread_create(&th[i], NULL, gen_main, &jobs[i]) == 0,
              "cannot start generation %d", i);
    }
    int32_t want = 1 + n * 5;
    for (int k = 0; k < 300000 && stats(ctl).queue_depth < want; k++)
        usleep(100);
    CHECK(stats(ctl).queue_depth >= want, "queue depth %d, expected %d",
          stats(ctl).queue_depth, want);
    CHECK(fake_backend_started(b) == s0 + 1, "a forward started beside the "
          "hold");
    return fh;
}

/* Joins the jobs; each but `bad` (-1: none) generated its reference. */
static void check_jobs(gen_job *jobs, int n, pthread_t *th, int bad,
                       const char *what)
{
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < n; i++) {
        if (i == bad) continue;
        CHECK(jobs[i].rc == 0 && jobs[i].n == GEN_TOK, "%s: generation %d: "
              "rc %d (%s), %d of %d tokens", what, i, jobs[i].rc, jobs[i].msg,
              jobs[i].n, GEN_TOK);
        int32_t want[GEN_TOK];
        reference(jobs[i].prompt, jobs[i].n_prompt, GEN_TOK, want);
        for (int t = 0; t < GEN_TOK; t++)
            CHECK(want[t] == jobs[i].out[t], "%s: generation %d: expected "
                  "%d, got %d at step %d", what, i, want[t], jobs[i].out[t],
                  t);
    }
    printf("%s: %d generations produced the reference tokens\n", what,
           bad >= 0 ? n - 1 : n);
}

/* An id in none of the jobs' prompts and reference continuations. */
static int32_t unused_id(gen_job *jobs, int n)
{
    static bool used[VOCAB];
    memset(used, 0, sizeof used);
    for (int i = 0; i < n; i++) {
        int32_t ref[GEN_TOK];
        reference(jobs[i].prompt, jobs[i].n_prompt, GEN_TOK, ref);
        for (int t = 0; t < jobs[i].n_prompt; t++) used[jobs[i].prompt[t]] = 1;
        for (int t = 0; t < GEN_TOK; t++) used[ref[t]] = 1;
    }
    for (int32_t id = VOCAB / 2; id < VOCAB; id++)
        if (!used[id]) return id;
    CHECK(0, "no unused token id");
    return -1;
}

enum { FAIL_POISON, FAIL_LIMIT, FAIL_ONCE, FAIL_ALL };

/* N_GEN generations whose prefills share one fire that fails: through a
 * poisoned request (which alone fails again), a whole-batch token limit
 * the backend did not report, or a one-time fault that half-wrote every
 * request's KV. Every request but the poisoned one must generate exactly
 * the reference. FAIL_ALL: a limit no request fits alone either, so that
 * the re-runs stop after the first RERUN_GIVE_UP (4) and all fail. */
static void run_rerun(int mode, const char *what)
{
    test_watchdog(what, 60);
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, PS, 256, 0, &b));
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    gen_job *jobs = calloc(N_GEN, sizeof *jobs);
    pthread_t th[N_GEN];
    int bad = mode == FAIL_POISON ? 3 : -1;
    for (int i = 0; i < N_GEN; i++) {
        jobs[i].n_prompt = 16;
        make_prompt(jobs[i].prompt, 16, 100 + i);
    }
    int32_t poison = unused_id(jobs, N_GEN);
    if (mode == FAIL_POISON) {
        jobs[bad].prompt[5] = poison;
        fake_backend_poison(b, poison);
    }
    if (mode == FAIL_LIMIT) fake_backend_fail_tokens_over(b, 40);
    if (mode == FAIL_ALL) fake_backend_fail_tokens_over(b, 8);
    pie_ctl_client *z;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &z));
    pie_ctl_future *fh = start_behind_hold(ctl, b, z, jobs, N_GEN, th);
    if (mode == FAIL_ONCE) fake_backend_fail_forwards(b, 1);
    fake_backend_hold(b, false);    /* (the prefills' fire fails, not later) */
    CHECK_OK(pie_ctl_future_wait(fh, 10000));
    pie_ctl_future_release(fh);
    fake_stats *fs = fake_backend_stats(b);
    if (mode == FAIL_ALL) {
        for (int i = 0; i < N_GEN; i++) pthread_join(th[i], NULL);
        for (int i = 0; i < N_GEN; i++)
            CHECK(jobs[i].rc == PIE_ELIMIT, "%s: generation %d: rc %d (%s)",
                  what, i, jobs[i].rc, jobs[i].msg);
        CHECK(fs->refused == 1 + 4, "%d forwards refused, expected 5 (the "
              "batch, then 4 requests alone)", fs->refused);
    } else {
        check_jobs(jobs, N_GEN, th, bad, what);
    }
    if (mode == FAIL_POISON) {
        CHECK(jobs[bad].rc == PIE_EINVAL, "the poisoned generation: rc %d "
              "(%s), expected %d", jobs[bad].rc, jobs[bad].msg, PIE_EINVAL);
        CHECK(fs->refused == 2, "%d forwards refused, expected 2 (the batch "
              "of %d prefills, then the poisoned one alone)", fs->refused,
              N_GEN);
    } else if (mode == FAIL_LIMIT) {
        CHECK(fs->refused == 1, "%d forwards refused, expected 1 (the batch "
              "of %d prefills)", fs->refused, N_GEN);
    } else if (mode == FAIL_ONCE) {
        CHECK(fs->failed == 1, "%d forwards failed, expected 1", fs->failed);
    }
    pie_ctl_stats st = stats(ctl);
    unsigned want = mode == FAIL_POISON ? 1u : mode == FAIL_ALL ? N_GEN : 0u;
    CHECK(st.failed == want, "stats.failed %llu, expected %u",
          (unsigned long long)st.failed, want);
    CHECK(!st.device_lost, "device_lost set by an ordinary failure");
    pie_ctl_client_close(z);
    free(jobs);
    CHECK(stats(ctl).queue_depth == 0, "queue depth %d at the end",
          stats(ctl).queue_depth);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    test_watchdog_off();
}

static void test_rerun_poison(void)
{
    run_rerun(FAIL_POISON, "rerun_poison: a poisoned request in a batch of 8");
}

static void test_rerun_limit(void)
{
    run_rerun(FAIL_LIMIT, "rerun_limit: a batch of 8 x 16 tokens over a "
              "40-token limit");
}

static void test_rerun_once(void)
{
    run_rerun(FAIL_ONCE, "rerun_once: a batch of 8 that faults once, its KV "
              "half written");
}

static void test_rerun_all(void)
{
    run_rerun(FAIL_ALL, "rerun_all: a batch of 8 whose requests all fail "
              "alone too");
}

/* ---- device lost --------------------------------------------------------- */

typedef struct copy_note {
    atomic_int status;          /* 1 until the callback ran                */
} copy_note;

static void on_copy(void *user, pie_ctl_future *f, int status)
{
    (void)f;
    atomic_store(&((copy_note *)user)->status, status);
}

static int wait_note(copy_note *n)
{
    for (int k = 0; k < 10000 && atomic_load(&n->status) == 1; k++)
        usleep(1000);
    return atomic_load(&n->status);
}

/* ctl_test_fwd (ctl_fwd.h) without a callback. */
static int fwd(pie_ctl_client *c, const int32_t *toks, int32_t n, int32_t pos0,
               const uint32_t *pages, pie_ctl_future *from,
               pie_ctl_future **out)
{
    return ctl_test_fwd(c, PS, toks, n, pos0, pages, from, NULL, NULL, out);
}

static void expect_lost(pie_ctl_future *f, const char *what)
{
    int rc = pie_ctl_future_wait(f, 10000);
    CHECK(rc == PIE_EDEVLOST, "%s: completed with %d (%s), expected %d", what,
          rc, pie_err_msg(), PIE_EDEVLOST);
    CHECK(strstr(pie_err_msg(), "device lost") &&
          strstr(pie_err_msg(), "restart"), "%s: message '%s' does not say "
          "the device is lost and to restart", what, pie_err_msg());
    const pie_forward_out *o;
    rc = pie_ctl_future_result(f, &o, NULL);
    CHECK(rc == PIE_EDEVLOST && strstr(pie_err_msg(), "device lost"),
          "%s: result %d (%s)", what, rc, pie_err_msg());
    pie_ctl_future_release(f);
}

/* The device is lost while a forward (D) runs, with a forward of another
 * client staged behind it (Q), one chained from D (C) and a copy ordered
 * after D queued: all four complete with PIE_EDEVLOST, and so do a
 * forward, a copy and a generation submitted afterwards, and saving an
 * export fails with it, without one more call reaching the backend. The
 * clients close and the pool comes back whole. */
static void test_device_lost(void)
{
    test_watchdog("device_lost", 60);
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, PS, 64, 0, &b));
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    pie_ctl_client *c, *d;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &d));
    uint32_t h[4], hd[4];
    CHECK_OK(pie_ctl_page_alloc(c, 4, 0, h));
    CHECK_OK(pie_ctl_page_alloc(d, 4, 0, hd));
    int32_t A[4] = { 5, 6, 7, 8 }, x = 9;
    pie_ctl_future *fd, *fq, *fc, *f;
    CHECK_OK(fwd(d, A, 4, 0, hd, NULL, &f));          /* the device works */
    CHECK_OK(pie_ctl_future_wait(f, 10000));
    pie_ctl_future_release(f);
    int32_t s0 = fake_backend_started(b);
    fake_backend_hold(b, true);
    CHECK_OK(fwd(c, A, 4, 0, h, NULL, &fd));
    wait_started(b, s0 + 1);
    CHECK_OK(fwd(d, &x, 1, 4, hd, NULL, &fq));         /* staged behind D */
    CHECK_OK(fwd(c, &x, 1, 4, h, fd, &fc));            /* chained from D */
    copy_note cn = { 1 }, cn2 = { 1 };
    CHECK_OK(pie_ctl_page_copy_cb(c, h[0], 0, h[1], 0, 4, on_copy, &cn));
    fake_backend_lose(b);
    CHECK(fake_backend_started(b) == s0 + 1, "a forward started beside D");
    fake_backend_hold(b, false);
    expect_lost(fd, "the forward running at the loss");
    expect_lost(fq, "a forward staged behind it");
    expect_lost(fc, "a forward chained from it");
    int rc = wait_note(&cn);
    CHECK(rc == PIE_EDEVLOST, "a copy queued behind it: %d", rc);
    /* after */
    CHECK_OK(fwd(d, A, 4, 0, &hd[2], NULL, &f));
    expect_lost(f, "a forward submitted after the loss");
    CHECK_OK(pie_ctl_page_copy_cb(d, hd[0], 0, hd[3], 0, 4, on_copy, &cn2));
    rc = wait_note(&cn2);
    CHECK(rc == PIE_EDEVLOST, "a copy submitted after the loss: %d", rc);
    gen_job *j = calloc(1, sizeof *j);
    j->ctl = ctl;
    j->n_prompt = 8;
    make_prompt(j->prompt, 8, 7);
    gen_main(j);
    CHECK(j->rc == PIE_EDEVLOST && strstr(j->msg, "device lost"), "a "
          "generation after the loss: rc %d (%s)", j->rc, j->msg);
    free(j);
    CHECK_OK(pie_ctl_export(d, "lost", 1, hd));
    rc = pie_ctl_export_save(ctl, "lost", "/nonexistent/lost.kv");
    CHECK(rc == PIE_EDEVLOST && strstr(pie_err_msg(), "device lost"),
          "saving an export after the loss: %d (%s)", rc, pie_err_msg());
    CHECK_OK(pie_ctl_unexport(d, "lost"));
    pie_ctl_stats st = stats(ctl);
    CHECK(st.device_lost, "stats.device_lost not set");
    CHECK(st.queue_depth == 0, "queue depth %d after the loss",
          st.queue_depth);
    CHECK(fake_backend_stats(b)->after_lost == 0, "%d backend calls after "
          "the loss", fake_backend_stats(b)->after_lost);
    pie_ctl_client_close(c);
    pie_ctl_client_close(d);
    st = stats(ctl);
    CHECK(st.pages_free == st.pages_total, "%d of %d pages free after the "
          "clients closed", st.pages_free, st.pages_total);
    printf("device lost: the running, staged, chained and queued ops, and "
           "those submitted later, completed with PIE_EDEVLOST; no call "
           "reached the backend after the loss\n");
    pie_ctl_free(ctl);
    pie_backend_free(b);
    test_watchdog_off();
}

/* ---- the backend's token limit ------------------------------------------- */

/* A backend that takes 64 tokens a forward, under a control layer asked
 * for 1000-token fires without prefill chunks: a 300-token prompt still
 * runs in fires of at most 64 tokens, beside a short generation, and
 * both generate the reference. A masked forward (never split) longer
 * than the backend takes is refused at submit. */
static void test_max_tokens(void)
{
    test_watchdog("max_tokens", 60);
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, PS, 256, 0, &b));
    fake_backend_set_max_tokens(b, 64);
    pie_ctl_opts o = { .max_batch_tokens = 1000, .prefill_chunk = -1 };
    CHECK_OK(pie_ctl_create(b, &o, &ctl));
    gen_job *jobs = calloc(2, sizeof *jobs);
    pthread_t th[2];
    jobs[0].n_prompt = 300;
    make_prompt(jobs[0].prompt, 300, 11);
    jobs[1].n_prompt = 10;
    make_prompt(jobs[1].prompt, 10, 12);
    for (int i = 0; i < 2; i++) {
        jobs[i].ctl = ctl;
        CHECK(pthread_create(&th[i], NULL, gen_main, &jobs[i]) == 0,
              "cannot start");
    }
    check_jobs(jobs, 2, th, -1, "max_tokens: a 300-token prompt on a "
               "64-token backend");
    fake_stats *fs = fake_backend_stats(b);
    CHECK(fs->refused == 0 && fs->max_tokens <= 64, "%d forwards refused, "
          "the largest ran %d tokens; expected none and at most 64",
          fs->refused, fs->max_tokens);
    CHECK(fs->max_tokens == 64, "largest forward %d tokens, expected 64 (the "
          "prompt in full chunks)", fs->max_tokens);
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h[8];
    CHECK_OK(pie_ctl_page_alloc(c, 8, 0, h));
    static int32_t tok[100], pos[100];
    static uint32_t mi[101], mr[200];
    for (int32_t t = 0; t < 100; t++) {
        tok[t] = 3, pos[t] = t;
        mi[t + 1] = 2 * (t + 1);
        mr[2 * t] = 0, mr[2 * t + 1] = t + 1;
    }
    int32_t oi = 99;
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_forward f = { .n_tokens = 100, .tokens = tok, .positions = pos,
                          .n_pages = 7, .pages = h, .last_page_len = 4,
                          .mask_indptr = mi, .mask_runs = mr, .n_outputs = 1,
                          .output_idx = &oi, .samplers = &s };
    pie_ctl_future *fut = NULL;
    int rc = pie_ctl_forward_submit(c, &f, NULL, NULL, &fut);
    CHECK(rc == PIE_ELIMIT, "a masked forward of 100 tokens on a 64-token "
          "backend: submit returned %d (%s), expected %d", rc, pie_err_msg(),
          PIE_ELIMIT);
    printf("max_tokens: fires of at most %d tokens; a masked 100-token "
           "forward refused: %s\n", fs->max_tokens, pie_err_msg());
    pie_ctl_client_close(c);
    free(jobs);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    test_watchdog_off();
}

typedef struct alloc_job {
    pie_ctl_client *c;
    int             rc;
} alloc_job;

static void *alloc_main(void *arg)
{
    alloc_job *j = arg;
    uint32_t h;
    j->rc = pie_ctl_page_alloc(j->c, 1, -1, &h);
    return NULL;
}

/* Under the suspend policy, once the device is lost an allocation the
 * pool cannot serve answers PIE_EDEVLOST: no swap can free a page any
 * more (two clients holding the whole pool, each asking for one more page,
 * waited forever before). */
static void test_lost_alloc(void)
{
    test_watchdog("lost_alloc: allocations after the loss", 30);
    pie_backend *b;
    pie_ctl *ctl;
    pie_ctl_opts o = { .policy = PIE_CTL_POLICY_SUSPEND };
    CHECK_OK(fake_backend_create(VOCAB, PS, 8, 0, &b));
    CHECK_OK(pie_ctl_create(b, &o, &ctl));
    pie_ctl_client *c, *a, *d;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h, ha[4], hd[4];
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, &h));
    int32_t tok = 5;
    pie_ctl_future *f;
    fake_backend_lose(b);
    CHECK_OK(fwd(c, &tok, 1, 0, &h, NULL, &f));
    expect_lost(f, "the forward that finds the device lost");  /* frees f */
    CHECK_OK(pie_ctl_page_free(c, 1, &h));
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &a));
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &d));
    CHECK_OK(pie_ctl_page_alloc(a, 4, 0, ha));  /* served at once */
    CHECK_OK(pie_ctl_page_alloc(d, 4, 0, hd));
    alloc_job ja = { a, 0 }, jd = { d, 0 };
    pthread_t ta, td;
    CHECK(pthread_create(&ta, NULL, alloc_main, &ja) == 0, "thread");
    CHECK(pthread_create(&td, NULL, alloc_main, &jd) == 0, "thread");
    pthread_join(ta, NULL);
    pthread_join(td, NULL);
    CHECK(ja.rc == PIE_EDEVLOST && jd.rc == PIE_EDEVLOST, "allocations past "
          "the pool after the loss: rc %d and %d", ja.rc, jd.rc);
    pie_ctl_client_close(a);
    pie_ctl_client_close(d);
    pie_ctl_client_close(c);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    test_watchdog_off();
}

/* A forward listing one page twice, written, is refused, also where
 * prefix caching would take its first listing from a cached twin (found
 * by fuzz/fuzz_ctl.c: before, it was accepted, and closing the client
 * released a page twice: 17 free pages of 16). */
static void test_dup_pages(void)
{
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, 4, 16, 0, &b));
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h[3];
    CHECK_OK(pie_ctl_page_alloc(c, 3, 0, h));
    int32_t t[5] = { 7, 8, 9, 10, 11 };
    pie_ctl_future *f;
    CHECK_OK(ctl_test_fwd(c, 4, t, 5, 0, h, NULL, NULL, NULL, &f));
    CHECK_OK(pie_ctl_future_wait(f, 10000));   /* page h[0] full: cached */
    pie_ctl_future_release(f);
    uint32_t twice[2] = { h[2], h[2] };
    int rc = ctl_test_fwd(c, 4, t, 5, 0, twice, NULL, NULL, NULL, &f);
    CHECK(rc == PIE_EINVAL, "a forward writing one page twice (its first "
          "listing a cached prefix): rc %d", rc);
    uint32_t plain[2] = { h[1], h[1] };
    rc = ctl_test_fwd(c, 4, t + 1, 4, 1, plain, NULL, NULL, NULL, &f);
    CHECK(rc == PIE_EINVAL || rc == PIE_ERANGE, "a page read and written in "
          "one forward: rc %d", rc);
    pie_ctl_client_close(c);
    pie_ctl_stats st = stats(ctl);
    CHECK(st.pages_free == 16 && st.pages_used == 0, "after the client: %d "
          "free, %d used of 16", st.pages_free, st.pages_used);
    printf("dup_pages: a page listed twice and written is refused; the pool "
           "is whole\n");
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

static const struct { const char *name; void (*fn)(void); } tests[] = {
    { "rerun_poison", test_rerun_poison },
    { "rerun_limit", test_rerun_limit },
    { "rerun_once", test_rerun_once },
    { "rerun_all", test_rerun_all },
    { "device_lost", test_device_lost },
    { "lost_alloc", test_lost_alloc },
    { "dup_pages", test_dup_pages },
    { "max_tokens", test_max_tokens },
};

/* No argument: every test; else the ones named. */
int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    int n = (int)(sizeof tests / sizeof tests[0]), ran = 0;
    for (int i = 0; i < n; i++) {
        bool pick = argc < 2;
        for (int a = 1; a < argc; a++)
            if (strcmp(argv[a], tests[i].name) == 0) pick = true;
        if (pick) tests[i].fn(), ran++;
    }
    CHECK(ran > 0, "no test named %s", argc > 1 ? argv[1] : "");
    TEST_DONE();
}
