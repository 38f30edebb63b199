/*
 * test_control.c — the control layer against the deterministic fake backend
 * (fake_backend.h): generation alone and batched, chained steps, quotas and
 * admission, priority, cancel and rollback, exports and imports with their
 * quotas and caps, dedup and the prefix cache, chunked prefill, rows and
 * masks, bad input and page copies. Expected tokens come from
 * fake_expected_next(), which computes the fake model's function from a
 * plain token history with no pages, batches or scheduler: every mistake
 * in batching, paging, chaining, chunking or dedup shows up as a wrong
 * token. The same fake backend serves test_control_persist.c (persisted
 * exports), test_control_pressure.c (memory pressure) and
 * test_control_inflight.c (forwards that do not complete); ctl_test_util.h
 * holds what they share. `test_control NAME...` runs named tests.
 */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/ctl_test_util.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

/* Checks that n of ctl's pages are free and that no export is left. */
static void check_unexported(pie_ctl *ctl, int32_t n)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_free == n && st.exports == 0, "at the end: %d pages "
          "free, %d exports; expected %d and 0", st.pages_free, st.exports,
          n);
}

/* ---- tests ---------------------------------------------------------------- */

static void test_generate_alone(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(64, 0, NULL, &b);
    int32_t prompt[11], want[30], got[30], n = 0;
    make_prompt(prompt, 11, 7);
    reference(prompt, 11, 30, want);
    pie_ctl_gen_opts o = { .prompt = prompt, .n_prompt = 11, .max_tokens = 30,
                           .lookahead = 4, .timeout_ms = 1000 };
    CHECK_OK(pie_ctl_generate(ctl, &o, got, 30, &n));
    CHECK(n == 30, "generated %d tokens, expected 30", n);
    check_same(want, got, 30, "native generation alone");
    /* stop id: generation ends right after it */
    o.stop_ids = &want[9];
    o.n_stop = 1;
    CHECK_OK(pie_ctl_generate(ctl, &o, got, 30, &n));
    int32_t first = 0;
    while (want[first] != want[9]) first++;
    CHECK(n == first + 1, "stopped after %d tokens, expected %d", n, first + 1);
    pie_ctl_stats st;
    usleep(200000);
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_free == st.pages_total, "%d of %d pages free after "
          "generation (queue %d)", st.pages_free, st.pages_total, st.queue_depth);
    printf("generate alone: 30 tokens match the reference; stop id ok\n");
    done_ctl(ctl, b);
}

typedef struct gen_job {
    pie_ctl *ctl;
    int32_t  prompt[40], n_prompt, n_gen, lookahead;
    int32_t  got[64], n;
    int      rc;
} gen_job;

static void *gen_thread(void *arg)
{
    gen_job *j = arg;
    pie_ctl_gen_opts o = { .prompt = j->prompt, .n_prompt = j->n_prompt,
                           .max_tokens = j->n_gen, .lookahead = j->lookahead,
                           .timeout_ms = 5000 };
    j->rc = pie_ctl_generate(j->ctl, &o, j->got, 64, &j->n);
    return NULL;
}

static void run_jobs(pie_ctl *ctl, gen_job *jobs, int nj)
{
    pthread_t th[64];
    for (int i = 0; i < nj; i++) {
        jobs[i].ctl = ctl;
        pthread_create(&th[i], NULL, gen_thread, &jobs[i]);
    }
    for (int i = 0; i < nj; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < nj; i++) {
        CHECK(jobs[i].rc == 0, "job %d failed: %d", i, jobs[i].rc);
        int32_t want[64];
        reference(jobs[i].prompt, jobs[i].n_prompt, jobs[i].n_gen, want);
        CHECK(jobs[i].n == jobs[i].n_gen, "job %d: %d tokens", i, jobs[i].n);
        char what[64];
        snprintf(what, sizeof what, "concurrent job %d", i);
        check_same(want, jobs[i].got, jobs[i].n_gen, what);
    }
}

static void test_generate_mixed(void)
{
    pie_backend *b;
    pie_ctl_opts co = { .prefill_chunk = 8 };
    pie_ctl *ctl = make_ctl(1024, 300, &co, &b);
    enum { NJ = 24 };
    static gen_job jobs[NJ];
    for (int i = 0; i < NJ; i++) {
        jobs[i].n_prompt = 1 + (i * 7) % 37;
        jobs[i].n_gen = 5 + (i * 13) % 40;
        jobs[i].lookahead = 1 + i % 6;
        make_prompt(jobs[i].prompt, jobs[i].n_prompt, 100 + i);
    }
    run_jobs(ctl, jobs, NJ);
    fake_stats *fs = fake_backend_stats(b);
    CHECK(fs->max_reqs >= 4, "largest batch had %d requests; expected the "
          "scheduler to batch concurrent generations", fs->max_reqs);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_free == st.pages_total, "%d of %d pages free",
          st.pages_free, st.pages_total);
    CHECK(st.fires == (uint64_t)fs->calls, "fires %llu vs backend calls %d",
          (unsigned long long)st.fires, fs->calls);
    printf("generate mixed: %d concurrent generations match the reference; "
           "%d fires, largest batch %d, mean %.1f\n", NJ, fs->calls,
           fs->max_reqs, (double)fs->total_reqs / fs->calls);
    done_ctl(ctl, b);
}

/* Step-by-step (wait for each token, feed it) vs k steps chained ahead. */
static void test_chained(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(64, 200, NULL, &b);
    uint32_t pages[8];
    pie_ctl_client *c = open_holding(ctl, NULL, 7, pages);
    int32_t prompt[6], want[20], got[20];
    make_prompt(prompt, 6, 3);
    reference(prompt, 6, 20, want);
    /* step by step */
    got[0] = fwd_token(c, prompt, 6, 0, pages);
    for (int32_t i = 1; i < 20; i++)
        got[i] = fwd_token(c, &got[i - 1], 1, 6 + i - 1, pages);
    check_same(want, got, 20, "step by step");
    /* all 20 steps queued at once, each chained to the previous; the fills
     * of the pages are rewritten from position 6 on */
    pie_ctl_future *fs[20];
    int32_t zero = 0;
    fake_stats *st = fake_backend_stats(b);
    int32_t calls0 = st->calls;
    CHECK_OK(fwd(c, prompt, 6, 0, pages, NULL, &fs[0]));
    for (int32_t i = 1; i < 20; i++)
        CHECK_OK(fwd(c, &zero, 1, 6 + i - 1, pages, fs[i - 1], &fs[i]));
    for (int32_t i = 0; i < 20; i++) got[i] = wait_token(fs[i]);
    for (int32_t i = 0; i < 20; i++) pie_ctl_future_release(fs[i]);
    check_same(want, got, 20, "chained 20 ahead");
    CHECK(st->calls - calls0 == 20, "chained run took %d fires, expected 20",
          st->calls - calls0);
    int32_t fill;
    CHECK_OK(pie_ctl_page_fill(c, pages[6], &fill));
    CHECK(fill == 1, "last page fill %d, expected 1", fill);
    pie_ctl_client_close(c);
    printf("chained: 20 steps queued ahead equal step-by-step and the "
           "reference\n");
    done_ctl(ctl, b);
}

static void test_quotas(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c;
    pie_ctl_client_opts co = { .max_pages = 3, .max_tokens = 10,
                               .name = "q" };
    CHECK_OK(pie_ctl_client_open(ctl, &co, &c));
    uint32_t h[8];
    CHECK_OK(pie_ctl_page_alloc(c, 2, 0, h));
    int rc = pie_ctl_page_alloc(c, 2, 0, h + 2);
    CHECK(rc == PIE_ELIMIT, "alloc beyond page quota returned %d", rc);
    CHECK(strstr(pie_err_msg(), "quota") != NULL, "message: %s", pie_err_msg());
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, h + 2));
    CHECK_OK(pie_ctl_page_free(c, 1, h + 2));
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, h + 2));
    int32_t toks[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
    fwd_token(c, toks, 8, 0, h);
    pie_ctl_future *f;
    rc = fwd(c, toks, 3, 8, h, NULL, &f);
    CHECK(rc == PIE_ELIMIT, "forward beyond token quota returned %d", rc);
    CHECK(strstr(pie_err_msg(), "token quota") != NULL, "message: %s",
          pie_err_msg());
    fwd_token(c, toks, 2, 8, h);
    pie_ctl_client_close(c);
    printf("quotas: page and token limits enforced with clear errors\n");
    done_ctl(ctl, b);
}

typedef struct freer { pie_ctl_client *c; uint32_t h; int delay_ms; } freer;

static void *free_later(void *arg)
{
    freer *fr = arg;
    usleep(fr->delay_ms * 1000);
    pie_ctl_page_free(fr->c, 1, &fr->h);
    return NULL;
}

static void test_admission(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, NULL, &b);
    pie_ctl_client *a, *c;
    open_clients(ctl, &a, &c, NULL);
    uint32_t ha[8], hc[2];
    CHECK_OK(pie_ctl_page_alloc(a, 8, 0, ha));
    double t = now_ms();
    int rc = pie_ctl_page_alloc(c, 1, 100, hc);
    double waited = now_ms() - t;
    CHECK(rc == PIE_EBUSY, "alloc from a full pool returned %d", rc);
    CHECK(waited >= 90, "gave up after %.1f ms, expected ~100", waited);
    t = now_ms();
    rc = pie_ctl_page_alloc(c, 9, 1000, hc);     /* waiting cannot help */
    CHECK(rc == PIE_ENOMEM && strstr(pie_err_msg(), "pool has only 8"),
          "alloc beyond the pool size returned %d: %s", rc, pie_err_msg());
    CHECK(now_ms() - t < 500, "alloc beyond the pool size waited %.1f ms",
          now_ms() - t);
    pthread_t th;
    freer fr = { a, ha[3], 50 };
    pthread_create(&th, NULL, free_later, &fr);
    t = now_ms();
    CHECK_OK(pie_ctl_page_alloc(c, 1, 5000, hc));
    waited = now_ms() - t;
    pthread_join(th, NULL);
    CHECK(waited >= 40 && waited < 4000, "waited %.1f ms", waited);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.alloc_waits >= 2, "alloc_waits %llu",
          (unsigned long long)st.alloc_waits);
    close_clients(a, c, NULL);
    printf("admission: a full pool waits (%.0f ms) then succeeds; times out "
           "otherwise\n", waited);
    done_ctl(ctl, b);
}

/* ---- priority ------------------------------------------------------------- */

static pthread_mutex_t order_mu = PTHREAD_MUTEX_INITIALIZER;

static int order[64], n_order;

static void record_done(void *user, pie_ctl_future *f, int status)
{
    (void)f;
    pthread_mutex_lock(&order_mu);
    order[n_order++] = status == 0 ? (int)(intptr_t)user : -1;
    pthread_mutex_unlock(&order_mu);
}

static void test_priority(void)
{
    pie_backend *b;
    pie_ctl_opts co = { .max_batch_reqs = 1 };
    pie_ctl *ctl = make_ctl(64, 20000, &co, &b);
    pie_ctl_client *lo, *hi, *blk;
    pie_ctl_client_opts ol = { .priority = 5 }, oh = { .priority = 1 },
                        ob = { .priority = 0 };
    CHECK_OK(pie_ctl_client_open(ctl, &ol, &lo));
    CHECK_OK(pie_ctl_client_open(ctl, &oh, &hi));
    CHECK_OK(pie_ctl_client_open(ctl, &ob, &blk));
    uint32_t hb[1], hl[4], hh[4];
    CHECK_OK(pie_ctl_page_alloc(blk, 1, 0, hb));
    CHECK_OK(pie_ctl_page_alloc(lo, 4, 0, hl));
    CHECK_OK(pie_ctl_page_alloc(hi, 4, 0, hh));
    int32_t tok = 5;
    pie_ctl_future *fb, *f[8];
    n_order = 0;
    CHECK_OK(fwd(blk, &tok, 1, 0, hb, NULL, &fb));   /* occupies the device */
    usleep(5000);
    for (int i = 0; i < 4; i++) {   /* low first, then high, interleaved */
        int32_t pos[1] = { 0 }, oi = 0, one = 1 + i;
        pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
        pie_ctl_forward fl = { .n_tokens = 1, .tokens = &one, .positions = pos,
                               .n_pages = 1, .pages = &hl[i],
                               .last_page_len = 1, .n_outputs = 1,
                               .output_idx = &oi, .samplers = &s };
        CHECK_OK(pie_ctl_forward_submit(lo, &fl, record_done,
                                        (void *)(intptr_t)(10 + i), &f[i]));
        fl.pages = &hh[i];
        CHECK_OK(pie_ctl_forward_submit(hi, &fl, record_done,
                                        (void *)(intptr_t)(20 + i), &f[4 + i]));
    }
    for (int i = 0; i < 8; i++) CHECK_OK(pie_ctl_future_wait(f[i], 10000));
    CHECK_OK(pie_ctl_future_wait(fb, 10000));
    for (int i = 0; i < 8; i++) pie_ctl_future_release(f[i]);
    pie_ctl_future_release(fb);
    pie_ctl_free(ctl);   /* callbacks have all run once the scheduler joined */
    pie_backend_free(b);
    /* the first low one may have been pre-staged while the blocker ran (one
     * batch of bounded inversion); after it, all high before all low, FIFO
     * within each class */
    int expect_hi[4] = { 20, 21, 22, 23 }, k = 0, first_lo = -1;
    for (int i = 0; i < n_order; i++)
        if (order[i] >= 10 && order[i] < 20) { first_lo = i; break; }
    CHECK(n_order == 8, "%d callbacks", n_order);
    int hi_seen = 0;
    for (int i = 0; i < 8; i++) {
        if (order[i] >= 20) {
            CHECK(order[i] == expect_hi[hi_seen], "high priority out of FIFO "
                  "order: %d at %d", order[i], i);
            hi_seen++;
        }
    }
    int lo_after = 0;
    for (int i = 0; i < 8; i++)
        if (order[i] >= 10 && order[i] < 20) {
            CHECK(order[i] == 10 + k, "low priority out of FIFO order: %d", order[i]);
            k++;
            if (hi_seen > 0 && i > first_lo) lo_after++;
        }
    int last_hi = 0;
    for (int i = 0; i < 8; i++) if (order[i] >= 20) last_hi = i;
    int lo_before_last_hi = 0;
    for (int i = 0; i < last_hi; i++)
        if (order[i] >= 10 && order[i] < 20) lo_before_last_hi++;
    CHECK(lo_before_last_hi <= 1, "%d low-priority forwards ran before the "
          "last high-priority one", lo_before_last_hi);
    printf("priority: completion order");
    for (int i = 0; i < 8; i++) printf(" %d", order[i]);
    printf("\n");
}

/* ---- cancel and rollback --------------------------------------------------- */

static void test_cancel(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(64, 3000, NULL, &b);
    uint32_t pages[10];
    pie_ctl_client *c = open_holding(ctl, NULL, 9, pages);
    int32_t prompt[5], want[30], got[30], zero = 0;
    make_prompt(prompt, 5, 11);
    reference(prompt, 5, 30, want);
    pie_ctl_future *fs[30];
    CHECK_OK(fwd(c, prompt, 5, 0, pages, NULL, &fs[0]));
    for (int32_t i = 1; i < 30; i++)
        CHECK_OK(fwd(c, &zero, 1, 5 + i - 1, pages, fs[i - 1], &fs[i]));
    int32_t fill_all;
    CHECK_OK(pie_ctl_page_fill(c, pages[8], &fill_all));
    CHECK(fill_all == 2, "fill of page 8 with 30 queued steps: %d", fill_all);
    for (int32_t i = 0; i < 3; i++) got[i] = wait_token(fs[i]);
    pie_ctl_future_cancel(fs[6]);
    int done_ok = 0;
    for (int32_t i = 3; i < 30; i++) {
        int rc = pie_ctl_future_wait(fs[i], 10000);
        if (i >= 6) CHECK(rc == PIE_ECANCELED, "step %d after cancel: %d", i, rc);
        else if (rc == 0) got[i] = wait_token(fs[i]), done_ok++;
    }
    CHECK(done_ok == 3, "%d of steps 3..5 completed", done_ok);
    /* kv now holds the prompt + inputs of steps 1..5: 10 slots */
    int32_t fill;
    CHECK_OK(pie_ctl_page_fill(c, pages[2], &fill));
    CHECK(fill == 2, "page 2 fill after cancel %d, expected 2", fill);
    for (int32_t k = 3; k < 9; k++) {
        CHECK_OK(pie_ctl_page_fill(c, pages[k], &fill));
        CHECK(fill == 0, "page %d fill after cancel %d, expected 0", k, fill);
    }
    for (int32_t i = 0; i < 30; i++) pie_ctl_future_release(fs[i]);
    /* continue from the rolled-back state */
    for (int32_t i = 6; i < 30; i++)
        got[i] = fwd_token(c, &got[i - 1], 1, 5 + i - 1, pages);
    check_same(want, got, 30, "generation resumed after cancel");
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.cancelled == 24, "cancelled %llu, expected 24",
          (unsigned long long)st.cancelled);
    pie_ctl_client_close(c);
    printf("cancel: 24 queued steps cancelled, fills rolled back, resumed "
           "generation matches\n");
    done_ctl(ctl, b);
}

static void test_close_pending(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(128, 2000, NULL, &b);
    pie_ctl_future *keep[8][20];
    for (int k = 0; k < 8; k++) {
        uint32_t pages[10];
        pie_ctl_client *c = open_holding(ctl, NULL, 10, pages);
        int32_t prompt[7], zero = 0;
        make_prompt(prompt, 7, 50 + k);
        CHECK_OK(fwd(c, prompt, 7, 0, pages, NULL, &keep[k][0]));
        for (int32_t i = 1; i < 20; i++)
            CHECK_OK(fwd(c, &zero, 1, 7 + i - 1, pages, keep[k][i - 1],
                         &keep[k][i]));
        if (k < 2) CHECK_OK(pie_ctl_export(c, k == 0 ? "closing" : "x", 1,
                                           pages));
        usleep(k * 1000);
        pie_ctl_client_close(c);
    }
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < 20; i++) {
            int rc = pie_ctl_future_wait(keep[k][i], 10000);
            CHECK(rc == 0 || rc == PIE_ECANCELED, "future %d/%d: %d", k, i, rc);
            pie_ctl_future_release(keep[k][i]);
        }
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_used == 2, "pages used after closing with pending work: "
          "%d (expected the 2 exported)", st.pages_used);
    CHECK(st.clients == 0, "%d clients", st.clients);
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    CHECK_OK(pie_ctl_unexport(c, "closing"));
    CHECK_OK(pie_ctl_unexport(c, "x"));
    pie_ctl_client_close(c);
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_free == st.pages_total, "%d of %d free", st.pages_free,
          st.pages_total);
    printf("close with pending work: no page leaks (cancelled %llu)\n",
           (unsigned long long)st.cancelled);
    done_ctl(ctl, b);
}

static void test_exports(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client *a, *c;
    open_clients(ctl, &a, &c, NULL);
    int32_t prompt[8], want[3];
    make_prompt(prompt, 8, 9);
    uint32_t ha[2];
    CHECK_OK(pie_ctl_page_alloc(a, 2, 0, ha));
    fwd_token(a, prompt, 8, 0, ha);
    CHECK_OK(pie_ctl_export(a, "sys", 2, ha));
    CHECK(pie_ctl_export(a, "sys", 1, ha) == PIE_EBUSY, "duplicate name");
    uint32_t hi[4];
    int32_t n = 0;
    CHECK(pie_ctl_import(c, "nope", 4, hi, &n) == PIE_ENOTFOUND, "unknown");
    CHECK(pie_ctl_import(c, "sys", 1, hi, &n) == PIE_ERANGE && n == 2,
          "small buffer: n=%d", n);
    CHECK_OK(pie_ctl_import(c, "sys", 4, hi, &n));
    CHECK(n == 2, "imported %d pages", n);
    char names[64];
    int32_t len, cnt;
    CHECK_OK(pie_ctl_export_list(ctl, names, sizeof names, &len, &cnt));
    CHECK(cnt == 1 && strcmp(names, "sys") == 0, "list: %d '%s'", cnt, names);
    /* writing into an imported page is refused */
    int32_t t9 = 9;
    uint32_t bad[3] = { hi[0], hi[1], 0 };
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, &bad[2]));
    pie_ctl_future *f;
    int rc = fwd(c, &t9, 1, 7, bad, NULL, &f);
    CHECK(rc == PIE_EPERM, "write into imported page returned %d", rc);
    /* continue the shared prefix in a private page: 3 tokens */
    int32_t hist[11];
    memcpy(hist, prompt, sizeof prompt);
    reference(prompt, 8, 3, want);
    int32_t x[3] = { 17, 18, 19 };
    int32_t tok = fwd_token(c, x, 3, 8, bad);
    memcpy(hist + 8, x, sizeof x);
    CHECK(tok == fake_expected_next(hist, 11, VOCAB), "forward over imported "
          "pages: got %d, expected %d", tok, fake_expected_next(hist, 11, VOCAB));
    CHECK_OK(pie_ctl_unexport(a, "sys"));
    CHECK(pie_ctl_unexport(a, "sys") == PIE_ENOTFOUND, "double unexport");
    pie_ctl_client_close(a);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_used == 3, "pages used %d, expected 3 (2 imported live on)",
          st.pages_used);
    pie_ctl_client_close(c);
    check_free(ctl, 16);
    printf("exports: import is read-only and refcounted; pages outlive the "
           "exporter\n");
    done_ctl(ctl, b);
}

/* Same prompts with and without dedup: same tokens, fewer pages. */
static void test_dedup(void)
{
    int32_t results[2][6][20];
    int32_t used[2];
    int64_t computed[2];
    uint64_t hits = 0, skipped = 0;
    for (int mode = 0; mode < 2; mode++) {
        pie_backend *b;
        pie_ctl_opts co = { .no_dedup = mode == 1 };
        pie_ctl *ctl = make_ctl(256, 0, &co, &b);
        pie_ctl_client *cs[6];
        uint32_t pages[6][8];
        int32_t prompt[23];
        make_prompt(prompt, 23, 77);
        for (int k = 0; k < 6; k++) {
            cs[k] = open_holding(ctl, NULL, 8, pages[k]);
            /* clients 0..2 share a prompt; 3..5 change its last token */
            prompt[22] = k < 3 ? 5 : 6 + k;
            int32_t *got = results[mode][k];
            got[0] = fwd_token(cs[k], prompt, 23, 0, pages[k]);
            for (int32_t i = 1; i < 6; i++)
                got[i] = fwd_token(cs[k], &got[i - 1], 1, 23 + i - 1,
                                   pages[k]);
            int32_t hist[40], want[6];
            memcpy(hist, prompt, sizeof prompt);
            reference(hist, 23, 6, want);
            check_same(want, results[mode][k], 6, mode ? "no dedup" : "dedup");
        }
        pie_ctl_stats st;
        pie_ctl_get_stats(ctl, &st);
        used[mode] = st.pages_used;
        computed[mode] = fake_backend_stats(b)->total_tokens;
        if (mode == 0) hits = st.dedup_hits, skipped = st.prefix_tokens_skipped;
        for (int k = 0; k < 6; k++) pie_ctl_client_close(cs[k]);
        pie_ctl_get_stats(ctl, &st);
        CHECK(st.pages_free == st.pages_total, "leak with dedup=%d", !mode);
        done_ctl(ctl, b);
    }
    /* 23+5 = 28 slots = 7 pages each. Pages 0..4 (slots 0..19) are the same
     * prompt for all 6; page 5 (20..23) differs from client 3 on. */
    CHECK(used[1] == 6 * 8, "without dedup %d pages used", used[1]);
    CHECK(hits >= 5 * 5, "dedup hits %llu, expected >= 25",
          (unsigned long long)hits);
    CHECK(used[0] <= used[1] - 25, "with dedup %d pages used vs %d", used[0],
          used[1]);
    /* clients 1..5 find the 5 full prompt pages (20 tokens) cached */
    CHECK(skipped == 100, "prefix tokens skipped %llu, expected 100",
          (unsigned long long)skipped);
    CHECK(computed[1] - computed[0] == 100, "tokens computed: %lld with "
          "dedup, %lld without", (long long)computed[0],
          (long long)computed[1]);
    printf("dedup: identical outputs; %d pages with dedup vs %d without "
           "(%llu hits); %lld vs %lld tokens computed\n", used[0], used[1],
           (unsigned long long)hits, (long long)computed[0],
           (long long)computed[1]);
}

/* Freed pages with cached content are reused by a later identical prompt,
 * and evicted (oldest first) when an allocation needs them. */
static void test_prefix_cache_lru(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, NULL, &b);
    cache_prompt(ctl, b, 99);
    int64_t t = gen_run(ctl, b, 99, "second run from the cache");
    CHECK(t == 1 + 2, "second run computed %lld tokens, expected 3 "
          "(12 prompt tokens cached)", (long long)t);
    uint32_t h[8];
    pie_ctl_client *c = open_holding(ctl, NULL, 8, h);  /* evicts the cache */
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_cached == 0 && st.pages_free == 0, "after eviction: %d "
          "cached, %d free", st.pages_cached, st.pages_free);
    pie_ctl_client_close(c);
    t = gen_run(ctl, b, 99, "run after eviction");
    CHECK(t == 13 + 2, "after eviction the prompt is computed again");
    printf("prefix cache: reuse after exit (3 of 15 tokens computed), LRU "
           "eviction under pressure\n");
    done_ctl(ctl, b);
}

/* ---- export and import quotas ----------------------------------------- */

/* max_pages counts the pages a client's live exports pin (once, if it
 * also holds them). Before, alloc, export, free in a loop pinned any
 * number of pages under max_pages 2. Exports outlive their exporter and
 * then count against no client. */
static void test_export_quota(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts o = { .max_pages = 2, .name = "q" };
    pie_ctl_client *q, *q2;
    CHECK_OK(pie_ctl_client_open(ctl, &o, &q));
    uint32_t h[2];
    char nm[8];
    for (int k = 0; k < 2; k++) {
        snprintf(nm, sizeof nm, "q%d", k);
        CHECK_OK(pie_ctl_page_alloc(q, 1, 0, h));
        CHECK_OK(pie_ctl_export(q, nm, 1, h));
        CHECK_OK(pie_ctl_page_free(q, 1, h));
    }
    int rc = pie_ctl_page_alloc(q, 1, 0, h);
    CHECK(rc == PIE_ELIMIT, "alloc with 2 exported pages and max_pages 2: "
          "expected %d, got %d", PIE_ELIMIT, rc);
    CHECK_OK(pie_ctl_unexport(q, "q0"));
    CHECK_OK(pie_ctl_page_alloc(q, 1, 0, h));
    CHECK_OK(pie_ctl_page_free(q, 1, h));
    CHECK_OK(pie_ctl_unexport(q, "q1"));
    /* held and exported: counted once; freed, the export still pins it */
    CHECK_OK(pie_ctl_page_alloc(q, 2, 0, h));
    CHECK_OK(pie_ctl_export(q, "both", 2, h));
    CHECK_OK(pie_ctl_page_free(q, 1, h));
    rc = pie_ctl_page_alloc(q, 1, 0, h);
    CHECK(rc == PIE_ELIMIT, "alloc with 1 held + 1 exported page: expected "
          "%d, got %d", PIE_ELIMIT, rc);
    pie_ctl_client_close(q);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.exports == 1 && st.pages_used == 2, "after the exporter closed: "
          "%d exports, %d pages used; expected 1 and 2", st.exports,
          st.pages_used);
    CHECK_OK(pie_ctl_client_open(ctl, &o, &q2));
    CHECK_OK(pie_ctl_page_alloc(q2, 2, 0, h));   /* not charged to q2 */
    CHECK_OK(pie_ctl_unexport(q2, "both"));
    pie_ctl_client_close(q2);
    check_free(ctl, 16);
    printf("export quota: a client's live exports count against its "
           "max_pages\n");
    done_ctl(ctl, b);
}

/* Exports outlive their exporter, and max_pages bounds a client only while
 * it is open: before, a chain of clients that each exported 2 pages under
 * max_pages 2 and closed pinned the whole pool. All exports together now
 * pin at most opts.max_export_pages (default: half the pool); past it an
 * export fails with PIE_ELIMIT and takes nothing. */
static void test_export_cap(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts o = { .max_pages = 2, .name = "link" };
    pie_ctl_client *q;
    uint32_t h[8];
    char nm[16];
    for (int k = 0; k < 8; k++) {
        CHECK_OK(pie_ctl_client_open(ctl, &o, &q));
        CHECK_OK(pie_ctl_page_alloc(q, 2, 0, h));
        snprintf(nm, sizeof nm, "link%d", k);
        int rc = pie_ctl_export(q, nm, 2, h);
        pie_ctl_stats st;
        pie_ctl_get_stats(ctl, &st);
        if (k < 4) {
            CHECK(rc == 0, "link %d: export of 2 pages (%d pinned of 16) "
                  "failed: %d (%s)", k, 2 * k, rc, pie_err_msg());
        } else {
            CHECK(rc == PIE_ELIMIT, "link %d: export of 2 more pages with "
                  "%d of 16 pinned by exports whose clients are gone: "
                  "expected %d, got %d", k, 2 * k, PIE_ELIMIT, rc);
            CHECK(strstr(pie_err_msg(), "max_export_pages") != NULL,
                  "message names no option: %s", pie_err_msg());
            CHECK(st.exports == 4 && st.pages_used == 10, "after a refused "
                  "export: %d exports, %d pages used; expected 4 and 10 "
                  "(8 exported + 2 held)", st.exports, st.pages_used);
        }
        pie_ctl_client_close(q);
    }
    printf("export cap: %s\n", pie_err_msg());
    /* the other half stays for work */
    pie_ctl_client *w = open_holding(ctl, NULL, 8, h);
    CHECK(pie_ctl_export(w, "more", 1, h) == PIE_ELIMIT, "export past the "
          "cap by a client with no quota");
    /* pages already exported count once: a second name for them fits */
    uint32_t imp[2];
    int32_t ni;
    CHECK_OK(pie_ctl_import(w, "link0", 2, imp, &ni));
    CHECK_OK(pie_ctl_export(w, "alias", 2, imp));
    CHECK_OK(pie_ctl_unexport(w, "link1"));
    CHECK_OK(pie_ctl_export(w, "more", 2, h));
    CHECK(pie_ctl_export(w, "more2", 1, h + 2) == PIE_ELIMIT, "cap after "
          "an unexport");
    CHECK_OK(pie_ctl_page_free(w, 8, h));
    CHECK_OK(pie_ctl_page_free(w, 2, imp));
    unexport_all(w, "link0", "link2", "link3", "alias", "more", NULL);
    pie_ctl_client_close(w);
    check_unexported(ctl, 16);
    printf("export cap: exports whose clients closed pin at most half the "
           "pool by default\n");
    done_ctl(ctl, b);
}

/* opts.max_export_pages: an explicit cap (the pool's size: none), a
 * negative one refused; loading a saved export counts against it too, and
 * a refused load takes no page. (Loading a file again under another name
 * is an alias of the pages loaded first: it adds none.) */
static void test_export_cap_opt(void)
{
    char path[256], path2[256];
    snprintf(path, sizeof path, "/tmp/pie_test_ctl_%d_cap.kv", (int)getpid());
    snprintf(path2, sizeof path2, "/tmp/pie_test_ctl_%d_cap2.kv",
             (int)getpid());
    pie_backend *b;
    CHECK_OK(fake_backend_create(VOCAB, PS, 16, 0, &b));
    pie_ctl *ctl = NULL;
    pie_ctl_opts co = { .max_export_pages = -1 };
    int rc = pie_ctl_create(b, &co, &ctl);
    CHECK(rc == PIE_EINVAL && !ctl, "max_export_pages -1: expected %d, got "
          "%d", PIE_EINVAL, rc);
    co.max_export_pages = 3;
    CHECK_OK(pie_ctl_create(b, &co, &ctl));
    uint32_t h[4];
    pie_ctl_client *c = open_holding(ctl, NULL, 4, h);
    int32_t prompt[10];
    make_prompt(prompt, 10, 4242);
    fwd_token(c, prompt, 10, 0, h);
    CHECK_OK(pie_ctl_export(c, "p", 3, h));
    rc = pie_ctl_export(c, "q", 1, h + 3);
    CHECK(rc == PIE_ELIMIT, "a 4th page under max_export_pages 3: expected "
          "%d, got %d", PIE_ELIMIT, rc);
    CHECK_OK(pie_ctl_export_save(ctl, "p", path));
    CHECK_OK(pie_ctl_unexport(c, "p"));
    CHECK_OK(pie_ctl_export(c, "q", 1, h + 3));
    CHECK_OK(pie_ctl_export_save(ctl, "q", path2));
    CHECK_OK(pie_ctl_unexport(c, "q"));
    CHECK_OK(pie_ctl_export_load(ctl, path, "p2"));
    pie_ctl_stats st0, st;
    pie_ctl_get_stats(ctl, &st0);
    rc = pie_ctl_export_load(ctl, path2, "q2");
    pie_ctl_get_stats(ctl, &st);
    CHECK(rc == PIE_ELIMIT && st.pages_used == st0.pages_used &&
          st.exports == 1 && st.pages_exported == 3, "a load past the cap: "
          "%d, %d pages used (before %d), %d exports pinning %d pages; "
          "expected %d, no page taken, 1 export of 3", rc, st.pages_used,
          st0.pages_used, st.exports, st.pages_exported, PIE_ELIMIT);
    rc = pie_ctl_export_load(ctl, path, "p3");
    pie_ctl_get_stats(ctl, &st);
    CHECK(rc == 0 && st.pages_used == st0.pages_used && st.exports == 2 &&
          st.pages_exported == 3, "the same file again, as p3: %d (%s), %d "
          "pages used (before %d), %d exports pinning %d pages; expected 0, "
          "no page taken, 2 exports of 3", rc, rc ? pie_err_msg() : "",
          st.pages_used, st0.pages_used, st.exports, st.pages_exported);
    unexport_all(c, "p3", "p2", NULL);
    pie_ctl_client_close(c);
    pie_ctl_free(ctl);
    co.max_export_pages = 16;                  /* the pool: no cap */
    CHECK_OK(pie_ctl_create(b, &co, &ctl));
    uint32_t all[16];
    c = open_holding(ctl, NULL, 16, all);
    CHECK_OK(pie_ctl_export(c, "all", 16, all));
    pie_ctl_client_close(c);
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    CHECK_OK(pie_ctl_unexport(c, "all"));
    pie_ctl_client_close(c);
    printf("export cap: max_export_pages set, checked on load, refused "
           "when negative\n");
    done_ctl(ctl, b);
    remove(path);
    remove(path2);
}

/* kv_export answers PIE_ELIMIT past the instance's page quota (api.def):
 * max_pages counts the pages its live exports list, so re-exporting pages
 * it imported adds them, while pages it holds count once. Before,
 * pie_ctl_export never checked the quota: q (max_pages 2) re-exported 4
 * imported pages and its next allocation of 1 failed, "holds 4". (Such an
 * import is refused itself since (test import_quota): q imports within
 * its quota here, then allocates beside the live import.) */
static void test_export_reexport_quota(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts oa = { .name = "a" };
    pie_ctl_client_opts oq = { .name = "q", .max_pages = 4 };
    pie_ctl_client *a, *q;
    CHECK_OK(pie_ctl_client_open(ctl, &oa, &a));
    CHECK_OK(pie_ctl_client_open(ctl, &oq, &q));
    uint32_t ha[4], hq[4], hown[4];
    int32_t ni;
    CHECK_OK(pie_ctl_page_alloc(a, 4, 0, ha));
    CHECK_OK(pie_ctl_export(a, "x", 4, ha));
    CHECK_OK(pie_ctl_import(q, "x", 4, hq, &ni));
    CHECK_OK(pie_ctl_page_alloc(q, 1, 0, hown));       /* 1 of 4 counted */
    int rc = pie_ctl_export(q, "y", 4, hq);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(rc == PIE_ELIMIT && st.exports == 1, "q (max_pages 4, holding 1) "
          "re-exports 4 imported pages: %d, %d exports; expected %d and 1",
          rc, st.exports, PIE_ELIMIT);
    CHECK(strstr(pie_err_msg(), "quota") != NULL, "message: %s",
          pie_err_msg());
    printf("export quota: %s\n", pie_err_msg());
    CHECK_OK(pie_ctl_export(q, "y2", 3, hq));          /* exactly 4 */
    rc = pie_ctl_page_alloc(q, 1, 0, hown + 1);
    CHECK(rc == PIE_ELIMIT, "alloc with 3 re-exported pages, 1 held and "
          "max_pages 4: expected %d, got %d", PIE_ELIMIT, rc);
    CHECK_OK(pie_ctl_unexport(q, "y2"));
    /* pages it holds count once, exported or not */
    CHECK_OK(pie_ctl_page_alloc(q, 3, 0, hown + 1));
    CHECK_OK(pie_ctl_export(q, "own", 4, hown));
    CHECK_OK(pie_ctl_export(q, "own2", 1, hown));
    rc = pie_ctl_export(q, "mix", 2, (uint32_t[]){ hown[0], hq[0] });
    CHECK(rc == PIE_ELIMIT, "an export adding an imported page to 4 held: "
          "expected %d, got %d", PIE_ELIMIT, rc);
    unexport_all(q, "x", "own", "own2", NULL);
    close_clients(q, a, NULL);
    check_unexported(ctl, 16);
    printf("export quota: re-exported imported pages count against "
           "max_pages\n");
    done_ctl(ctl, b);
}

/* The export cap counts distinct pages: handles naming pages already
 * exported add nothing, however many. Before, a pre-check refused any
 * export of more handles than the cap: 5 handles of 1 exported page
 * under a cap of 4. */
static void test_export_cap_distinct(void)
{
    pie_backend *b;
    pie_ctl_opts co = { .max_export_pages = 4 };
    pie_ctl *ctl = make_ctl(16, 0, &co, &b);
    pie_ctl_client *a;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &a));
    uint32_t h1, hh[5], h4[4];
    int32_t ni;
    CHECK_OK(pie_ctl_page_alloc(a, 1, 0, &h1));
    CHECK_OK(pie_ctl_export(a, "one", 1, &h1));
    hh[0] = h1;
    for (int k = 1; k < 5; k++)
        CHECK_OK(pie_ctl_import(a, "one", 1, &hh[k], &ni));
    int rc = pie_ctl_export(a, "alias5", 5, hh);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(rc == 0 && st.exports == 2 && st.pages_exported == 1, "export of "
          "5 handles naming 1 exported page under a cap of 4: %d (%s), %d "
          "exports pinning %d pages; expected 0, 2 and 1", rc,
          rc ? pie_err_msg() : "", st.exports, st.pages_exported);
    CHECK_OK(pie_ctl_page_alloc(a, 4, 0, h4));
    rc = pie_ctl_export(a, "four", 4, h4);
    CHECK(rc == PIE_ELIMIT, "4 new pages beside 1 exported under a cap of "
          "4: expected %d, got %d", PIE_ELIMIT, rc);
    CHECK_OK(pie_ctl_export(a, "three", 3, h4));
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_exported == 4, "pages exported %d, expected 4",
          st.pages_exported);
    unexport_all(a, "one", "alias5", "three", NULL);
    pie_ctl_client_close(a);
    check_free(ctl, 16);
    printf("export cap: each distinct page counts once, however many "
           "handles name it\n");
    done_ctl(ctl, b);
}

/* max_pages counts imported pages once no live export lists them: the
 * importer alone keeps them. Imports of a live export cost allocations
 * nothing (its exporter's quota and the server's cap count them). Before,
 * q (max_pages 2) held 12 of 16 pages through export, import, unexport and
 * then allocated more; the allocation is refused since, and the imports
 * that piled the pages up are too (test import_quota). */
static void test_import_orphan_quota(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts oq = { .name = "q", .max_pages = 2 };
    pie_ctl_client_opts oe = { .name = "e", .max_pages = 2 };
    pie_ctl_client *q, *e;
    CHECK_OK(pie_ctl_client_open(ctl, &oq, &q));
    uint32_t h[2], imp[64], more[2];
    int32_t ni, total = 0;
    /* a live export's pages are free to import */
    CHECK_OK(pie_ctl_client_open(ctl, &oe, &e));
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, h));
    CHECK_OK(pie_ctl_export(e, "x", 2, h));
    CHECK_OK(pie_ctl_import(q, "x", 2, imp, &ni));
    CHECK_OK(pie_ctl_page_alloc(q, 2, 0, more));
    CHECK_OK(pie_ctl_page_free(q, 2, more));
    /* gone: q's imports count (e still holds them, but q keeps them too) */
    CHECK_OK(pie_ctl_unexport(q, "x"));
    int rc = pie_ctl_page_alloc(q, 1, 0, more);
    CHECK(rc == PIE_ELIMIT, "alloc of 1 with 2 imported pages whose export "
          "is gone, max_pages 2: expected %d, got %d", PIE_ELIMIT, rc);
    printf("import quota: %s\n", pie_err_msg());
    CHECK(strstr(pie_err_msg(), "import") != NULL, "message: %s",
          pie_err_msg());
    /* listed again (an alias): free again */
    CHECK_OK(pie_ctl_export(e, "x2", 2, h));
    CHECK_OK(pie_ctl_page_alloc(q, 2, 0, more));
    CHECK_OK(pie_ctl_page_free(q, 2, more));
    CHECK_OK(pie_ctl_unexport(q, "x2"));
    pie_ctl_client_close(e);
    total = ni;
    for (int k = 0; k < 5; k++) {
        CHECK_OK(pie_ctl_client_open(ctl, &oe, &e));
        CHECK_OK(pie_ctl_page_alloc(e, 2, 0, h));
        CHECK_OK(pie_ctl_export(e, "x", 2, h));
        rc = pie_ctl_import(q, "x", 2, imp + total, &ni);
        CHECK(rc == PIE_ELIMIT, "q (max_pages 2) holding %d imported pages "
              "no export lists imports 2 more: expected %d, got %d", total,
              PIE_ELIMIT, rc);
        CHECK_OK(pie_ctl_unexport(q, "x"));
        pie_ctl_client_close(e);
    }
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_used == total, "%d pages used after the refused imports, "
          "expected q's %d", st.pages_used, total);
    rc = pie_ctl_page_alloc(q, 2, 0, more);
    CHECK(rc == PIE_ELIMIT, "q (max_pages 2) holding %d imported pages no "
          "export lists (%d of 16 used) allocates 2 more: expected %d, got "
          "%d", total, st.pages_used, PIE_ELIMIT, rc);
    rc = pie_ctl_export(q, "back", 2, imp);
    CHECK(rc == 0, "re-exporting q's 2 counted imports adds nothing: %d "
          "(%s)", rc, rc ? pie_err_msg() : "");
    CHECK_OK(pie_ctl_unexport(q, "back"));
    CHECK_OK(pie_ctl_page_free(q, 2, imp));
    CHECK_OK(pie_ctl_page_alloc(q, 2, 0, more));
    pie_ctl_client_close(q);
    check_unexported(ctl, 16);
    printf("import quota: imported pages count against max_pages once no "
           "live export lists them\n");
    done_ctl(ctl, b);
}

/* Imports of one export again and again each make new handles though
 * they add no page (the page quota allows them): the client's live
 * handles are capped (max_handles; by default PIE_CTL_MAX_HANDLES, the
 * pool being small). A refused import or allocation takes nothing, and
 * freed handles make room again. Before, the handle table grew without
 * bound (the default loop's 65,537th import succeeded). */
static void test_import_handles(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts oq = { .name = "q", .max_handles = 8 };
    pie_ctl_client *q, *e, *d;
    CHECK_OK(pie_ctl_client_open(ctl, &oq, &q));
    open_clients(ctl, &e, &d, NULL);
    uint32_t ha[2], one, ih[8][2], x[2] = { 0, 0 }, mine;
    int32_t ni = 0;
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, ha));
    CHECK_OK(pie_ctl_export(e, "a", 2, ha));
    for (int k = 0; k < 4; k++) CHECK_OK(pie_ctl_import(q, "a", 2, ih[k], &ni));
    pie_ctl_stats st0, st;
    pie_ctl_get_stats(ctl, &st0);
    int rc = pie_ctl_import(q, "a", 2, x, &ni);
    CHECK(rc == PIE_ELIMIT, "q (max_handles 8) holding 8 imported handles "
          "imports 2 more: expected %d, got %d", PIE_ELIMIT, rc);
    CHECK(strstr(pie_err_msg(), "limit 8 handles"), "message: %s",
          pie_err_msg());
    printf("import handles: %s\n", pie_err_msg());
    rc = pie_ctl_page_alloc(q, 1, 0, &mine);
    CHECK(rc == PIE_ELIMIT, "q at its handle cap allocates: expected %d, "
          "got %d", PIE_ELIMIT, rc);
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_shared == st0.pages_shared &&
          st.pages_used == st0.pages_used && x[0] == 0 && x[1] == 0,
          "a refused import or allocation took something: %d pages shared, "
          "%d used (before %d, %d), handles %u %u written", st.pages_shared,
          st.pages_used, st0.pages_shared, st0.pages_used, x[0], x[1]);
    /* one handle back: room for one page, not for a 2-page import */
    CHECK_OK(pie_ctl_page_free(q, 1, &ih[0][0]));
    rc = pie_ctl_import(q, "a", 2, x, &ni);
    CHECK(rc == PIE_ELIMIT, "7 handles + 2 of max 8: expected %d, got %d",
          PIE_ELIMIT, rc);
    CHECK_OK(pie_ctl_page_alloc(q, 1, 0, &mine));
    CHECK_OK(pie_ctl_page_free(q, 1, &mine));
    CHECK_OK(pie_ctl_page_free(q, 1, &ih[0][1]));
    CHECK_OK(pie_ctl_import(q, "a", 2, x, &ni));          /* room again */
    /* the default cap: one page imported again and again */
    CHECK_OK(pie_ctl_page_alloc(e, 1, 0, &one));
    CHECK_OK(pie_ctl_export(e, "one", 1, &one));
    int n = 0;
    uint32_t h;
    while (n < 2 * PIE_CTL_MAX_HANDLES &&
           (rc = pie_ctl_import(d, "one", 1, &h, &ni)) == 0)
        n++;
    CHECK(n == PIE_CTL_MAX_HANDLES && rc == PIE_ELIMIT, "imports of one "
          "1-page export: %d, then %d; expected %d (the default cap) and %d",
          n, rc, PIE_CTL_MAX_HANDLES, PIE_ELIMIT);
    CHECK_OK(pie_ctl_page_free(d, 1, &h));
    CHECK_OK(pie_ctl_import(d, "one", 1, &h, &ni));       /* room again */
    unexport_all(e, "a", "one", NULL);
    close_clients(d, q, e, NULL);
    check_empty(ctl);
    printf("import handles: %d imports of one page by default, then "
           "PIE_ELIMIT; freeing a handle makes room\n", n);
    done_ctl(ctl, b);
}

/* kv_import answers PIE_ELIMIT where the importer could not keep the
 * pages should their export go: every page it reaches counts, imports of
 * live exports too, and a refused import takes nothing. Before,
 * pie_ctl_import never checked the quota: q (max_pages 2) imported a
 * second live export of 2 pages beside a first one, and once both were
 * unexported held 4 pages; an exporter that exports, lets q import and
 * unexports, again and again, had q hold any number of pages. */
static void test_import_quota(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client_opts oq = { .name = "q", .max_pages = 2 };
    pie_ctl_client *q, *e;
    CHECK_OK(pie_ctl_client_open(ctl, &oq, &q));
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &e));
    uint32_t ha[2], hb[2], hc[2], ia[2], ia2[2], ib[2] = { 0, 0 }, mine[2];
    int32_t ni = 0;
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, ha));
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, hb));
    CHECK_OK(pie_ctl_export(e, "a", 2, ha));
    CHECK_OK(pie_ctl_export(e, "b", 2, hb));
    CHECK_OK(pie_ctl_import(q, "a", 2, ia, &ni));        /* 2 of 2 */
    CHECK_OK(pie_ctl_import(q, "a", 2, ia2, &ni));       /* the same pages */
    pie_ctl_stats st0, st;
    pie_ctl_get_stats(ctl, &st0);
    int rc = pie_ctl_import(q, "b", 2, ib, &ni);
    pie_ctl_get_stats(ctl, &st);
    CHECK(rc == PIE_ELIMIT, "q (max_pages 2) holding 2 imported pages "
          "imports 2 more: expected %d (quota), got %d", PIE_ELIMIT, rc);
    printf("import quota: %s\n", pie_err_msg());
    CHECK(strstr(pie_err_msg(), "quota") && strstr(pie_err_msg(), "'b'"),
          "message: %s", pie_err_msg());
    CHECK(st.pages_shared == st0.pages_shared && ib[0] == 0 && ib[1] == 0,
          "a refused import took something: %d pages shared (before %d), "
          "handles %u %u written", st.pages_shared, st0.pages_shared, ib[0],
          ib[1]);
    /* live imports still cost allocations nothing */
    CHECK_OK(pie_ctl_page_alloc(q, 2, 0, mine));
    CHECK_OK(pie_ctl_page_free(q, 2, mine));
    /* the exporter drops "a": q keeps its pages, at its quota; a new export
     * is refused to it, not piled on */
    CHECK_OK(pie_ctl_unexport(e, "a"));
    CHECK_OK(pie_ctl_page_free(e, 2, ha));
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, hc));
    CHECK_OK(pie_ctl_export(e, "c", 2, hc));
    rc = pie_ctl_import(q, "c", 2, ib, &ni);
    CHECK(rc == PIE_ELIMIT, "q (max_pages 2) holding 2 imported pages of a "
          "gone export imports 2 more: expected %d, got %d", PIE_ELIMIT, rc);
    /* freeing makes room again; the refused imports left nothing behind */
    CHECK_OK(pie_ctl_page_free(q, 2, ia));
    CHECK_OK(pie_ctl_page_free(q, 2, ia2));
    CHECK_OK(pie_ctl_import(q, "c", 2, ib, &ni));
    CHECK_OK(pie_ctl_page_free(q, 2, ib));
    unexport_all(e, "b", "c", NULL);
    close_clients(e, q, NULL);
    check_empty(ctl);
    printf("import quota: an import the importer could not keep is refused "
           "with PIE_ELIMIT and takes nothing\n");
    done_ctl(ctl, b);
}

/* ---- chunked prefill, rows and masks, bad input, copies --------------- */

static void test_chunked_prefill(void)
{
    pie_backend *b;
    pie_ctl_opts co = { .prefill_chunk = 16 };
    pie_ctl *ctl = make_ctl(64, 0, &co, &b);
    int32_t prompt[150], want[5], got[5], n;
    make_prompt(prompt, 150, 1234);
    reference(prompt, 150, 5, want);
    pie_ctl_gen_opts o = { .prompt = prompt, .n_prompt = 150, .max_tokens = 5,
                           .timeout_ms = 100 };
    CHECK_OK(pie_ctl_generate(ctl, &o, got, 5, &n));
    check_same(want, got, 5, "chunked prefill");
    fake_stats *fs = fake_backend_stats(b);
    CHECK(fs->calls >= 10 + 4, "%d fires for a 150-token prompt in chunks of "
          "16 plus 4 decodes", fs->calls);
    printf("chunked prefill: 150-token prompt in %d fires, output matches\n",
           fs->calls);
    done_ctl(ctl, b);
}

/* Probes, logit masks and explicit masks pass through unchanged. */
static void test_rows_and_masks(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    uint32_t h[3];
    pie_ctl_client *c = open_holding(ctl, NULL, 3, h);
    int32_t toks[9], pos[9];
    make_prompt(toks, 9, 4);
    for (int i = 0; i < 9; i++) pos[i] = i;
    /* explicit causal mask written as runs: equals the default */
    uint32_t mi[10], mr[18];
    for (int i = 0; i < 9; i++) {
        mi[i] = 2 * i;
        mr[2 * i] = 0;
        mr[2 * i + 1] = i + 1;
    }
    mi[9] = 18;
    int32_t oi[4] = { 8, 8, 3, 8 };
    int32_t lp_ids[2] = { 7, 900 };
    pie_sampler s[4] = { { .kind = PIE_SAMPLER_GREEDY },
                         { .kind = PIE_PROBE_TOPK, .top_k = 3 },
                         { .kind = PIE_PROBE_LOGPROBS, .ids = lp_ids, .n_ids = 2 },
                         { .kind = PIE_SAMPLER_GREEDY } };
    uint32_t li[5] = { 0, 2, 4, 6, 8 }, lr[8] = { 0, 1000, 0, 1000, 0, 1000,
                                                  500, 1 };
    pie_ctl_forward f = { .n_tokens = 9, .tokens = toks, .positions = pos,
                          .n_pages = 3, .pages = h, .last_page_len = 1,
                          .mask_indptr = mi, .mask_runs = mr, .n_outputs = 4,
                          .output_idx = oi, .samplers = s,
                          .logit_mask_indptr = li, .logit_mask_runs = lr };
    pie_ctl_future *fu;
    CHECK_OK(pie_ctl_forward_submit(c, &f, NULL, NULL, &fu));
    lp_ids[0] = -5;   /* the control layer copied the ids */
    CHECK_OK(pie_ctl_future_wait(fu, 5000));
    const pie_forward_out *o;
    int32_t no;
    CHECK_OK(pie_ctl_future_result(fu, &o, &no));
    CHECK(no == 4, "%d rows", no);
    int32_t want = fake_expected_next(toks, 9, VOCAB);
    CHECK(o->tokens[0] == want, "greedy under explicit causal mask: %d vs %d",
          o->tokens[0], want);
    CHECK(o->tokens[3] == 500, "logit mask allowing only 500 gave %d",
          o->tokens[3]);
    CHECK(o->tokens[1] == -1 && o->value_indptr[2] - o->value_indptr[1] == 3,
          "top-k row: token %d, %u values", o->tokens[1],
          o->value_indptr[2] - o->value_indptr[1]);
    CHECK(o->ids[o->value_indptr[1]] == want, "top-k first id %d vs %d",
          o->ids[o->value_indptr[1]], want);
    CHECK(o->value_indptr[3] - o->value_indptr[2] == 2, "logprob values");
    pie_ctl_future_release(fu);
    pie_ctl_client_close(c);
    printf("rows and masks: probes, logit masks, explicit masks pass "
           "through\n");
    done_ctl(ctl, b);
}

static void test_bad_input(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client *c, *d;
    open_clients(ctl, &c, &d, NULL);
    uint32_t h[4];
    CHECK_OK(pie_ctl_page_alloc(c, 2, 0, h));
    int32_t t[4] = { 1, 2, 3, 4 }, pos[4] = { 0, 1, 2, 3 }, oi = 3;
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_future *f;
    pie_ctl_forward base = { .n_tokens = 4, .tokens = t, .positions = pos,
                             .n_pages = 1, .pages = h, .last_page_len = 4,
                             .n_outputs = 1, .output_idx = &oi, .samplers = &s };
    pie_ctl_forward x;
    uint32_t bogus[1] = { 999 };
    x = base; x.pages = bogus;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_EINVAL,
          "bogus handle");
    CHECK(strstr(pie_err_msg(), "handle") != NULL, "msg %s", pie_err_msg());
    CHECK(pie_ctl_forward_submit(d, &base, NULL, NULL, &f) == PIE_EINVAL,
          "another client's handle");
    x = base; x.last_page_len = 5;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE, "fill");
    x = base; x.last_page_len = 3;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE,
          "tokens beyond kv");
    int32_t badt[4] = { 1, 2, VOCAB, 4 };
    x = base; x.tokens = badt;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE, "vocab");
    int32_t badpos[4] = { 0, -1, 2, 3 };
    x = base; x.positions = badpos;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE, "pos");
    int32_t badoi = 4;
    x = base; x.output_idx = &badoi;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE, "row");
    pie_sampler bs = { .kind = 99 };
    x = base; x.samplers = &bs;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_EINVAL, "kind");
    uint32_t mi[5] = { 0, 2, 4, 6, 8 }, mr[8] = { 0, 1, 0, 2, 0, 3, 0, 5 };
    x = base; x.mask_indptr = mi; x.mask_runs = mr;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_ERANGE,
          "mask longer than kv");
    uint32_t mi2[5] = { 0, 2, 1, 6, 8 };
    x = base; x.mask_indptr = mi2; x.mask_runs = mr;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_EINVAL,
          "mask indptr not monotone");
    uint32_t dup[2] = { h[0], h[0] };
    int32_t t8[8] = { 1 }, p8[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
    x = base; x.pages = dup; x.n_pages = 2; x.n_tokens = 8; x.tokens = t8;
    x.positions = p8;
    CHECK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f) == PIE_EINVAL,
          "same page written twice");
    /* chain from a probe row is refused; from another client too */
    pie_sampler ps = { .kind = PIE_PROBE_ENTROPY };
    x = base; x.samplers = &ps;
    pie_ctl_future *probe;
    CHECK_OK(pie_ctl_forward_submit(c, &x, NULL, NULL, &probe));
    pie_ctl_chain ch = { 0, probe, 0 };
    int32_t one = 0, p4 = 4;
    pie_ctl_forward y = { .n_tokens = 1, .tokens = &one, .positions = &p4,
                          .n_pages = 2, .pages = h, .last_page_len = 1,
                          .n_outputs = 1, .output_idx = (int32_t[]){ 0 },
                          .samplers = &s, .n_chains = 1, .chains = &ch };
    CHECK(pie_ctl_forward_submit(c, &y, NULL, NULL, &f) == PIE_EINVAL,
          "chain from probe row");
    ch.row = 3;
    CHECK(pie_ctl_forward_submit(c, &y, NULL, NULL, &f) == PIE_EINVAL,
          "chain row out of range");
    CHECK_OK(pie_ctl_future_wait(probe, 5000));
    pie_ctl_future_release(probe);
    CHECK(pie_ctl_page_free(c, 1, bogus) == PIE_EINVAL, "free bogus");
    uint32_t twice[2] = { h[1], h[1] };
    CHECK(pie_ctl_page_free(c, 2, twice) == PIE_EINVAL, "free twice");
    CHECK(pie_ctl_page_copy(c, h[0], 2, h[1], 3, 2) == PIE_ERANGE, "copy range");
    CHECK(pie_ctl_page_copy(c, h[0], 0, 77, 0, 1) == PIE_EINVAL, "copy handle");
    CHECK(pie_ctl_export(c, "", 1, h) == PIE_EINVAL, "empty export name");
    pie_ctl_client_opts bo = { .priority = 8 };
    pie_ctl_client *e;
    CHECK(pie_ctl_client_open(ctl, &bo, &e) == PIE_EINVAL, "priority 8");
    close_clients(c, d, NULL);
    printf("bad input: every malformed request refused with a clear error\n");
    done_ctl(ctl, b);
}

/* Fork a partial page by copy, then continue two branches. */
static void test_copy_fork(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 500, NULL, &b);
    uint32_t h[4];
    pie_ctl_client *c = open_holding(ctl, NULL, 3, h);
    int32_t prompt[6];
    make_prompt(prompt, 6, 21);
    pie_ctl_future *f;
    CHECK_OK(fwd(c, prompt, 6, 0, h, NULL, &f));
    pie_ctl_future_release(f);        /* not waited: the copy is ordered */
    CHECK_OK(pie_ctl_page_copy(c, h[1], 0, h[2], 0, 2));
    uint32_t br[2] = { h[0], h[2] };
    int32_t x = 33, y = 44, hist[7];
    pie_ctl_future *fa, *fb;
    CHECK_OK(fwd(c, &x, 1, 6, h, NULL, &fa));
    CHECK_OK(fwd(c, &y, 1, 6, br, NULL, &fb));
    memcpy(hist, prompt, sizeof prompt);
    hist[6] = x;
    int32_t wa = fake_expected_next(hist, 7, VOCAB);
    hist[6] = y;
    int32_t wb = fake_expected_next(hist, 7, VOCAB);
    CHECK(wait_token(fa) == wa, "branch a");
    CHECK(wait_token(fb) == wb, "branch b after copy-fork");
    pie_ctl_future_release(fa);
    pie_ctl_future_release(fb);
    CHECK(fake_backend_stats(b)->copies == 1, "copies %d",
          fake_backend_stats(b)->copies);
    pie_ctl_client_close(c);
    printf("copy fork: two branches from a partial page both match\n");
    done_ctl(ctl, b);
}

/* A copy the device fails takes back the fill it raised at submit (the
 * destination reads as before), and the next copy works: a branch over it
 * continues the prompt exactly. */
static void test_copy_failure(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    uint32_t h[3];
    pie_ctl_client *c = open_holding(ctl, NULL, 3, h);
    int32_t prompt[6], fill = -1;
    make_prompt(prompt, 6, 5);
    fwd_token(c, prompt, 6, 0, h);
    fake_backend_fail_copies(b, 1);
    CHECK_OK(pie_ctl_page_copy(c, h[1], 0, h[2], 0, 2));
    CHECK_OK(pie_ctl_page_fill(c, h[2], &fill));
    CHECK(fill == 0 || fill == 2, "fill %d while the copy runs", fill);
    for (int k = 0; k < 5000 && fill != 0; k++) {     /* up to 5 s */
        usleep(1000);
        CHECK_OK(pie_ctl_page_fill(c, h[2], &fill));
    }
    CHECK(fill == 0, "fill %d after a failed copy, expected 0", fill);
    CHECK_OK(pie_ctl_page_copy(c, h[1], 0, h[2], 0, 2));
    CHECK_OK(pie_ctl_page_fill(c, h[2], &fill));
    CHECK(fill == 2, "fill %d after the next copy", fill);
    /* a branch over the copied page (ordered after the copy) continues
     * the prompt exactly */
    uint32_t br[2] = { h[0], h[2] };
    int32_t y = 44, hist[7];
    memcpy(hist, prompt, sizeof prompt);
    hist[6] = y;
    CHECK(fwd_token(c, &y, 1, 6, br) == fake_expected_next(hist, 7, VOCAB),
          "branch after a failed then a good copy");
    pie_ctl_client_close(c);
    printf("copy failure: the destination's fill is taken back; the next "
           "copy works\n");
    done_ctl(ctl, b);
}

static const ctl_test tests[] = {
    { "generate_alone", test_generate_alone },
    { "chained", test_chained },
    { "generate_mixed", test_generate_mixed },
    { "quotas", test_quotas },
    { "admission", test_admission },
    { "priority", test_priority },
    { "cancel", test_cancel },
    { "close_pending", test_close_pending },
    { "exports", test_exports },
    { "dedup", test_dedup },
    { "prefix_cache_lru", test_prefix_cache_lru },
    { "export_quota", test_export_quota },
    { "export_cap", test_export_cap },
    { "export_cap_opt", test_export_cap_opt },
    { "export_reexport_quota", test_export_reexport_quota },
    { "export_cap_distinct", test_export_cap_distinct },
    { "import_orphan_quota", test_import_orphan_quota },
    { "import_quota", test_import_quota },
    { "import_handles", test_import_handles },
    { "chunked_prefill", test_chunked_prefill },
    { "rows_and_masks", test_rows_and_masks },
    { "bad_input", test_bad_input },
    { "copy_fork", test_copy_fork },
    { "copy_failure", test_copy_failure },
};

/* test_control [NAME...]: the named tests, or all of them in order. */
int main(int argc, char **argv)
{
    ctl_test_run(argc, argv, tests, sizeof tests / sizeof tests[0],
                 &test_n_checks);
    TEST_DONE();
}
