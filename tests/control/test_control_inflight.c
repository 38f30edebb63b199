/*
 * test_control_inflight.c — forwards that do not complete, against the
 * deterministic fake backend (fake_backend.h): forwards the device fails,
 * forwards cancelled while staged or wired, rewrites of KV in flight, a
 * batch that cannot be allocated, a bad row in a batch, unwritten slots,
 * failed and cancelled writers with their readers and copies, deep and
 * many chains, and what is refused before a forward is staged (writes to
 * imported pages, copies out of range, too many probes, mask offsets,
 * duplicate handles), with the memory cancelled and completed chains give
 * back. Failures are injected on demand: forwards and copies in the fake
 * backend, reallocs through a linker wrap (test_batch_oom). Expected
 * tokens come from fake_expected_next() (see test_control.c).
 * `test_control_inflight NAME...` runs named tests.
 */
#include <math.h>
#include <sys/mman.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define HAVE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HAVE_ASAN 1
#endif
#endif
#ifdef HAVE_ASAN
#include <stddef.h>
/* (sanitizer/allocator_interface.h, which not every compiler installs) */
size_t __sanitizer_get_current_allocated_bytes(void);
#else
#define HAVE_ASAN 0
#include <malloc.h>
#endif

#include "common/pie_err.h"
#include "control/control.h"
#include "control/ctl_int.h"     /* last_writer, for lw_check */
#include "tests/control/ctl_test_util.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

/* ---- forwards that do not complete ----------------------------------- */

/* 3 greedy tokens after prompt from a fresh generation (its own client and
 * pages; prefix caching applies) must equal the reference. */
static void check_fresh(pie_ctl *ctl, const int32_t *prompt, int32_t np,
                        const char *what)
{
    int32_t want[3], got[3], n = 0;
    reference(prompt, np, 3, want);
    pie_ctl_gen_opts o = { .prompt = prompt, .n_prompt = np, .max_tokens = 3,
                           .timeout_ms = 1000 };
    CHECK_OK(pie_ctl_generate(ctl, &o, got, 3, &n));
    CHECK(n == 3, "%s: %d tokens", what, n);
    check_same(want, got, 3, what);
}

/* The rewrite tests. c computes prompt T (8 tokens) into pages h[0..1]:
 * both full, so hashed and in the dedup table. U is T with tokens 1..3
 * changed: what a rewrite of slots 1..3 of h[0] writes (rewrite()). */
static void rewrite_setup(pie_ctl_client *c, uint32_t *h, int32_t *T,
                          int32_t *U)
{
    CHECK_OK(pie_ctl_page_alloc(c, 3, 0, h));
    make_prompt(T, 8, 31);
    memcpy(U, T, 8 * sizeof *T);
    for (int32_t i = 1; i < 4; i++) U[i] = (T[i] + 100 + i) % VOCAB;
    fwd_token(c, T, 8, 0, h);
}

static int rewrite(pie_ctl_client *c, const uint32_t *h, const int32_t *U,
                   pie_ctl_future **f)
{
    return fwd(c, U + 1, 3, 1, h, NULL, f);
}

/* After a rewrite of h[0] that did not complete: c goes on from h[0] into
 * h[2] -- a forward that succeeds, so its completion hashes the full
 * pages of its list -- then fresh prompts starting with U's and with T's
 * first page must continue exactly. h[0] holds T but U[1] after a failed
 * rewrite (the fake wrote half of it), T after a cancelled one: the
 * rewrite's record (U) is never true of it, nor, after a failure, the
 * record from before (T). */
static void check_after_lost_rewrite(pie_ctl *ctl, pie_ctl_client *c,
                                     const uint32_t *h, const int32_t *T,
                                     const int32_t *U, const char *what)
{
    uint32_t pages[2] = { h[0], h[2] };
    int32_t x = 7;
    fwd_token(c, &x, 1, 4, pages);
    char msg[128];
    snprintf(msg, sizeof msg, "%s: a prompt starting with the rewrite's "
             "page", what);
    check_fresh(ctl, U, 6, msg);
    snprintf(msg, sizeof msg, "%s: a prompt starting with the page before "
             "the rewrite", what);
    check_fresh(ctl, T, 6, msg);
}

/* A forward the device fails leaves no slot content recorded for the slots
 * it was to write: no prefix match reuses them; retried, it works. */
static void test_forward_failure(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h[3];
    int32_t T[8], U[8], fill = -1;
    rewrite_setup(c, h, T, U);
    fake_backend_fail_forwards(b, 1);
    pie_ctl_future *f;
    CHECK_OK(rewrite(c, h, U, &f));
    int rc = pie_ctl_future_wait(f, 10000);
    CHECK(rc == PIE_EIO, "failed rewrite completed with %d, expected %d", rc,
          PIE_EIO);
    pie_ctl_future_release(f);
    CHECK_OK(pie_ctl_page_fill(c, h[0], &fill));
    CHECK(fill == PS, "fill %d after a failed rewrite of a full page", fill);
    check_after_lost_rewrite(ctl, c, h, T, U, "after a failed forward");
    /* retried, the rewrite succeeds and c continues U exactly */
    CHECK_OK(rewrite(c, h, U, &f));
    wait_token(f);
    pie_ctl_future_release(f);
    uint32_t pages[2] = { h[0], h[2] };
    int32_t x = 7, hist[5] = { U[0], U[1], U[2], U[3], 7 };
    int32_t got = fwd_token(c, &x, 1, 4, pages);
    int32_t want = fake_expected_next(hist, 5, VOCAB);
    CHECK(got == want, "after the retried rewrite: expected %d, got %d", want,
          got);
    CHECK(fake_backend_stats(b)->failed == 1, "%d forwards failed",
          fake_backend_stats(b)->failed);
    pie_ctl_client_close(c);
    printf("forward failure: the slots it did not compute are not reused by "
           "prefix matches; the retry continues exactly\n");
    done_ctl(ctl, b);
}

/* A forward cancelled while staged (recorded, never run) likewise. */
static void test_cancel_staged(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c, *z;
    open_clients(ctl, &c, &z, NULL);
    uint32_t h[3], hz[1];
    int32_t T[8], U[8], tok = 5;
    rewrite_setup(c, h, T, U);
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, hz));
    int32_t calls0 = fake_backend_stats(b)->calls;
    pie_ctl_future *f;
    pie_ctl_future *fz = hold_device(b, z, &tok, 1, 0, hz);  /* device idle */
    CHECK_OK(rewrite(c, h, U, &f));                /* staged behind it */
    usleep(20000);
    pie_ctl_future_cancel(f);
    int rc = pie_ctl_future_wait(f, 10000);
    CHECK(rc == PIE_ECANCELED, "cancelled rewrite completed with %d", rc);
    pie_ctl_future_release(f);
    wait_token(fz);
    pie_ctl_future_release(fz);
    fake_backend_set_delay(b, 0);
    CHECK(fake_backend_stats(b)->calls == calls0 + 1, "%d forwards ran, "
          "expected 1 (the cancelled rewrite must not)",
          fake_backend_stats(b)->calls - calls0);
    check_after_lost_rewrite(ctl, c, h, T, U, "after a cancelled forward");
    pie_ctl_client_close(c);
    pie_ctl_client_close(z);
    printf("cancel while staged: the slots it did not compute are not reused "
           "by prefix matches\n");
    done_ctl(ctl, b);
}

/* While a rewrite of a page is staged or running, the page's slot records
 * already describe the rewrite: the completion of another forward over the
 * page (here: one that ran just before it) must not hash it, or a prompt
 * submitted meanwhile matches it, keeps it, and reads whatever the rewrite
 * left -- here a failed one. */
static void test_rewrite_in_flight(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c, *d;
    open_clients(ctl, &c, &d, NULL);
    uint32_t h[3], hd[2];
    int32_t T[8], U[8], x = 7;
    rewrite_setup(c, h, T, U);
    CHECK_OK(pie_ctl_page_alloc(d, 2, 0, hd));
    uint32_t pages[2] = { h[0], h[2] };
    pie_ctl_future *fa, *fm;
    pie_ctl_future *fy = hold_device(b, c, &x, 1, 4, pages);  /* reads h[0] */
    fake_backend_fail_forwards(b, 1);              /* the next one to start */
    CHECK_OK(rewrite(c, h, U, &fa));               /* staged behind it */
    wait_token(fy);             /* its completion walked h[0]; fa now runs */
    CHECK_OK(fwd(d, U, 6, 0, hd, NULL, &fm));
    int rc = pie_ctl_future_wait(fa, 10000);
    CHECK(rc == PIE_EIO, "failed rewrite completed with %d", rc);
    int32_t got = wait_token(fm), want = fake_expected_next(U, 6, VOCAB);
    CHECK(got == want, "a prompt submitted while a rewrite of its first page "
          "ran: expected %d, got %d", want, got);
    pie_ctl_future_release(fy);
    pie_ctl_future_release(fa);
    pie_ctl_future_release(fm);
    fake_backend_set_delay(b, 0);
    pie_ctl_client_close(c);
    pie_ctl_client_close(d);
    printf("rewrite in flight: its page is not hashed until it completes\n");
    done_ctl(ctl, b);
}

/* Submits prompt P (6 tokens) into pages h of d with its output row at
 * token 2, so no prefix match applies (a match stops before an output):
 * the forward computes page h[0] itself. */
static int fwd_unmatched(pie_ctl_client *d, const int32_t *P,
                         const uint32_t *h, pie_ctl_future **f)
{
    int32_t pos[6] = { 0, 1, 2, 3, 4, 5 }, oi[2] = { 2, 5 };
    pie_sampler s[2] = { { .kind = PIE_SAMPLER_GREEDY },
                         { .kind = PIE_SAMPLER_GREEDY } };
    pie_ctl_forward fw = {
        .n_tokens = 6, .tokens = P, .positions = pos, .n_pages = 2,
        .pages = h, .last_page_len = 2, .n_outputs = 2, .output_idx = oi,
        .samplers = s,
    };
    return pie_ctl_forward_submit(d, &fw, NULL, NULL, f);
}

/* While a rewrite of a hashed page is wired but not staged (here: chained
 * on forwards that the busy device has not finished), the page must serve
 * no other prompt: neither another client's through a prefix match at
 * submission (d) nor through a dedup merge at completion (e) -- either
 * reader is ordered after the rewrite and would read the rewritten KV,
 * not what the hash promised -- nor the rewriter's own next forward as
 * the head of a chain (c): the page after it in the table was computed
 * against the old content. The fake's KV does not depend on context, so
 * that last reuse changes no token here; the skipped-token count shows it. */
static void test_rewrite_wired(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c, *d, *e;
    open_clients(ctl, &c, &d, &e, NULL);
    uint32_t h[5], hd[2], he[2];
    int32_t T[8], U[8], x = 7;
    rewrite_setup(c, h, T, U);                     /* h[0], h[1] hashed */
    CHECK_OK(pie_ctl_page_alloc(c, 2, 0, h + 3));
    CHECK_OK(pie_ctl_page_alloc(d, 2, 0, hd));
    CHECK_OK(pie_ctl_page_alloc(e, 2, 0, he));
    fake_backend_set_delay(b, HOLD_US);         /* the device is idle */
    uint32_t pages[2] = { h[0], h[2] };
    pie_ctl_future *f1, *f2, *fa, *fd, *fe, *fc, *fn;
    CHECK_OK(fwd(c, &x, 1, 4, pages, NULL, &f1));  /* reads h[0]: runs */
    CHECK_OK(fwd(c, &x, 1, 5, pages, f1, &f2));    /* waits for f1 */
    CHECK_OK(fwd(c, U + 1, 3, 1, h, f2, &fa));     /* rewrite: waits */
    CHECK_OK(fwd(d, T, 6, 0, hd, NULL, &fd));      /* h[0]'s old prefix */
    CHECK_OK(fwd_unmatched(e, T, he, &fe));        /* runs beside f2 */
    /* c past the rewrite: T[4..8) and x into pages of its own */
    int32_t ct[5] = { T[4], T[5], T[6], T[7], x };
    uint32_t pc[3] = { h[0], h[3], h[4] };
    pie_ctl_stats st0, st1;
    pie_ctl_get_stats(ctl, &st0);
    CHECK_OK(fwd(c, ct, 5, 4, pc, NULL, &fc));     /* ordered after fa */
    pie_ctl_get_stats(ctl, &st1);
    CHECK(st1.prefix_tokens_skipped == st0.prefix_tokens_skipped,
          "c past its wired rewrite reused %llu tokens computed against the "
          "old page", (unsigned long long)(st1.prefix_tokens_skipped -
                                          st0.prefix_tokens_skipped));
    int32_t got = wait_token(fd), want = fake_expected_next(T, 6, VOCAB);
    CHECK(got == want, "a prompt matching a page whose rewrite is wired: "
          "expected %d, got %d", want, got);
    CHECK_OK(pie_ctl_future_wait(fe, 10000));
    int32_t y = wait_token(f2);                    /* fa's token 0 */
    fake_backend_set_delay(b, 0);
    int32_t eh[7];
    memcpy(eh, T, 6 * sizeof *T);
    eh[6] = fake_expected_next(T, 6, VOCAB);
    CHECK_OK(fwd(e, eh + 6, 1, 6, he, NULL, &fn));
    got = wait_token(fn);
    want = fake_expected_next(eh, 7, VOCAB);
    CHECK(got == want, "a prompt merged at completion into a page whose "
          "rewrite is wired: expected %d, got %d", want, got);
    int32_t ch[9] = { T[0], y, U[2], U[3], T[4], T[5], T[6], T[7], x };
    got = wait_token(fc);
    want = fake_expected_next(ch, 9, VOCAB);
    CHECK(got == want, "c past its rewrite: expected %d, got %d", want, got);
    pie_ctl_future *fs[7] = { f1, f2, fa, fd, fe, fc, fn };
    for (int i = 0; i < 7; i++) pie_ctl_future_release(fs[i]);
    pie_ctl_client_close(c);
    pie_ctl_client_close(d);
    pie_ctl_client_close(e);
    printf("rewrite wired: a page whose rewrite waits to be staged is "
           "neither matched nor merged into\n");
    done_ctl(ctl, b);
}

/* A rewrite cancelled while wired (waiting on a chained token, never
 * staged) took its page out of the dedup table but changed nothing in it:
 * the page still holds, and its records still describe, the old content,
 * so the next completion over it hashes it again and prompts continue
 * exactly. */
static void test_cancel_wired(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h[3];
    int32_t T[8], U[8], x = 7, fill = -1;
    rewrite_setup(c, h, T, U);
    fake_backend_set_delay(b, HOLD_US);         /* the device is idle */
    uint32_t pages[2] = { h[0], h[2] };
    pie_ctl_future *f1, *fa;
    CHECK_OK(fwd(c, &x, 1, 4, pages, NULL, &f1));  /* reads h[0]: runs */
    CHECK_OK(fwd(c, U + 1, 3, 1, h, f1, &fa));     /* rewrite: waits */
    pie_ctl_future_cancel(fa);
    int rc = pie_ctl_future_wait(fa, 10000);
    CHECK(rc == PIE_ECANCELED, "cancelled rewrite completed with %d", rc);
    pie_ctl_future_release(fa);
    wait_token(f1);              /* its completion walked h[0] again */
    pie_ctl_future_release(f1);
    fake_backend_set_delay(b, 0);
    CHECK_OK(pie_ctl_page_fill(c, h[0], &fill));
    CHECK(fill == PS, "fill %d after a cancelled rewrite of a full page",
          fill);
    pie_ctl_stats st0, st1;
    pie_ctl_get_stats(ctl, &st0);
    check_fresh(ctl, T, 6, "a prompt starting with the page whose rewrite "
                "was cancelled while wired");
    pie_ctl_get_stats(ctl, &st1);
    CHECK(st1.prefix_tokens_skipped - st0.prefix_tokens_skipped == PS,
          "the page is found again: %llu tokens skipped, expected %d",
          (unsigned long long)(st1.prefix_tokens_skipped -
                               st0.prefix_tokens_skipped), PS);
    check_after_lost_rewrite(ctl, c, h, T, U, "after a rewrite cancelled "
                             "while wired");
    pie_ctl_client_close(c);
    printf("cancel while wired: the page keeps its content and is hashed "
           "again\n");
    done_ctl(ctl, b);
}

/* test_control_inflight links with -Wl,--wrap=realloc (CMakeLists.txt): every
 * realloc in the binary, the control layer's included, comes here. While
 * fail_realloc_over is nonzero, a request for more bytes than that fails,
 * as the allocator does when memory runs out. The scheduler grows its
 * batch arrays with realloc only (batch_reserve, control/sched.c), so a
 * forward that needs big ones cannot be staged. */
static atomic_size_t fail_realloc_over;

void *__real_realloc(void *p, size_t n);

void *__wrap_realloc(void *p, size_t n);

void *__wrap_realloc(void *p, size_t n)
{
    size_t lim = atomic_load(&fail_realloc_over);
    if (lim > 0 && n > lim) return NULL;
    return __real_realloc(p, n);
}

static void note_status(void *user, pie_ctl_future *f, int status)
{
    (void)f;
    atomic_store((atomic_int *)user, status);
}

/* Waits up to 5 s for note_status to report (st starts at 1). */
static int wait_status(atomic_int *st)
{
    for (int k = 0; k < 5000 && atomic_load(st) == 1; k++) usleep(1000);
    return atomic_load(st);
}

/* A forward of one token (position 0 of page h) with 64 logits probes:
 * 64 * VOCAB output values, 256 KiB of batch arrays; calls note_status
 * with st unless st is NULL. */
static void big_fwd(pie_ctl_client *c, uint32_t h, atomic_int *st,
                    pie_ctl_future **out)
{
    int32_t tok = 3, pos = 0, oi[64] = { 0 };
    pie_sampler s[64];
    for (int i = 0; i < 64; i++)
        s[i] = (pie_sampler){ .kind = PIE_PROBE_LOGITS };
    pie_ctl_forward f = { .n_tokens = 1, .tokens = &tok, .positions = &pos,
                          .n_pages = 1, .pages = &h, .last_page_len = 1,
                          .n_outputs = 64, .output_idx = oi, .samplers = s };
    if (st) atomic_store(st, 1);
    CHECK_OK(pie_ctl_forward_submit(c, &f, st ? note_status : NULL, st, out));
}

/* A forward whose batch cannot be allocated fails with PIE_ENOMEM (future
 * and callback) instead of waiting forever, alone or behind others; the
 * scheduler goes on. */
static void test_batch_oom(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    uint32_t h[4];
    CHECK_OK(pie_ctl_page_alloc(c, 4, 0, h));
    atomic_int st;
    int32_t tok = 9, want = fake_expected_next(&tok, 1, VOCAB);
    pie_ctl_future *fx, *fz, *fs;
    atomic_store(&fail_realloc_over, 128 << 10);
    /* alone in the batch: nothing else would wake the scheduler for it */
    big_fwd(c, h[0], &st, &fx);
    int rc = pie_ctl_future_wait(fx, 30000);
    CHECK(rc == PIE_ENOMEM, "a forward whose batch cannot be allocated, "
          "alone: %d%s, expected PIE_ENOMEM", rc,
          rc == PIE_EAGAIN ? " (stalled for 30 s)" : "");
    rc = wait_status(&st);
    CHECK(rc == PIE_ENOMEM, "its callback reported %d", rc);
    pie_ctl_future_release(fx);
    /* the scheduler goes on under the same limit: a forward ordered
     * after it (all three write page h[0]) completes at its failure --
     * cancelled, as a writer's failure cancels what waits on its pages
     * (failed_writer_readers); no callbacks here, so no completion wakes
     * the scheduler */
    fake_backend_set_delay(b, 50000);            /* the device is idle */
    CHECK_OK(fwd(c, &tok, 1, 0, &h[0], NULL, &fz));  /* occupies the device */
    big_fwd(c, h[0], NULL, &fx);
    CHECK_OK(fwd(c, &tok, 1, 0, &h[0], NULL, &fs));
    rc = pie_ctl_future_wait(fx, 30000);
    CHECK(rc == PIE_ENOMEM, "the failing forward, ordered: %d", rc);
    rc = pie_ctl_future_wait(fs, 30000);
    CHECK(rc == PIE_ECANCELED, "the forward ordered after the failed one: "
          "%d%s, expected PIE_ECANCELED", rc,
          rc == PIE_EAGAIN ? " (stalled for 30 s)" : "");
    CHECK(wait_token(fz) == want, "the forward before both");
    pie_ctl_future_release(fx);
    pie_ctl_future_release(fs);
    pie_ctl_future_release(fz);
    /* behind a small forward staged with it while the device is busy */
    CHECK_OK(fwd(c, &tok, 1, 0, &h[2], NULL, &fz));  /* occupies the device */
    usleep(10000);
    CHECK_OK(fwd(c, &tok, 1, 0, &h[3], NULL, &fs));
    big_fwd(c, h[0], &st, &fx);
    rc = pie_ctl_future_wait(fx, 30000);
    CHECK(rc == PIE_ENOMEM, "a forward whose batch cannot be allocated, "
          "behind another: %d%s, expected PIE_ENOMEM", rc,
          rc == PIE_EAGAIN ? " (stalled for 30 s)" : "");
    rc = wait_status(&st);
    CHECK(rc == PIE_ENOMEM, "its callback reported %d", rc);
    CHECK(wait_token(fs) == want, "the forward staged with it");
    CHECK(wait_token(fz) == want, "the forward before it");
    pie_ctl_future_release(fx);
    pie_ctl_future_release(fs);
    pie_ctl_future_release(fz);
    fake_backend_set_delay(b, 0);                /* idle again */
    /* with memory back, the same forward runs */
    atomic_store(&fail_realloc_over, 0);
    big_fwd(c, h[0], &st, &fx);
    CHECK_OK(pie_ctl_future_wait(fx, 30000));
    CHECK(wait_status(&st) == 0, "callback of the forward that ran");
    pie_ctl_future_release(fx);
    pie_ctl_stats s;
    pie_ctl_get_stats(ctl, &s);
    CHECK(s.failed == 3, "%llu forwards failed, expected 3",
          (unsigned long long)s.failed);
    pie_ctl_client_close(c);
    printf("batch out of memory: the forward fails with PIE_ENOMEM, alone or "
           "behind others; the scheduler goes on\n");
    done_ctl(ctl, b);
}

/* A page stays read-only while imported, even after its export is gone:
 * before, unexport dropped the page's share count to 0 although the
 * importer still held it, and the exporter could write it (a forward or a
 * copy), changing the KV the importer reads. */
static void test_import_readonly(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(4, 0, NULL, &b);
    pie_ctl_client *a, *c;
    open_clients(ctl, &a, &c, NULL);
    uint32_t ha[2], imp[1];
    int32_t toks[4], ni, fill;
    make_prompt(toks, 4, 77);
    CHECK_OK(pie_ctl_page_alloc(a, 2, 0, ha));
    pie_ctl_future *f;
    CHECK_OK(fwd(a, toks, 2, 0, ha, NULL, &f));
    CHECK_OK(pie_ctl_future_wait(f, 30000));
    pie_ctl_future_release(f);
    CHECK_OK(pie_ctl_export(a, "x", 1, ha));
    CHECK_OK(pie_ctl_import(c, "x", 1, imp, &ni));
    CHECK_OK(pie_ctl_unexport(a, "x"));
    int rc = fwd(a, toks + 2, 2, 2, ha, NULL, &f);
    CHECK(rc == PIE_EPERM, "the exporter wrote a page another client has "
          "imported: rc %d, expected %d", rc, PIE_EPERM);
    if (rc == 0) {
        pie_ctl_future_wait(f, 30000);
        pie_ctl_future_release(f);
    }
    CHECK(pie_ctl_page_copy(a, ha[1], 0, ha[0], 2, 1) == PIE_EPERM,
          "the exporter copied into a page another client has imported");
    CHECK_OK(pie_ctl_page_fill(c, imp[0], &fill));
    CHECK(fill == 2, "the imported page's fill is %d, expected 2", fill);
    /* once the importer lets go, the page is its writer's again */
    CHECK_OK(pie_ctl_page_free(c, 1, imp));
    CHECK_OK(fwd(a, toks + 2, 2, 2, ha, NULL, &f));
    CHECK_OK(pie_ctl_future_wait(f, 30000));
    pie_ctl_future_release(f);
    pie_ctl_client_close(a);
    pie_ctl_client_close(c);
    printf("import: a page stays read-only while imported, whatever became "
           "of its export\n");
    done_ctl(ctl, b);
}

/* Copy offsets near INT32_MAX: offset + n wraps in 32 bits and must not
 * pass as "fits in the page". Each is refused at submit; the server goes on
 * and a following forward over the pages is exact. */
static void test_copy_overflow(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    uint32_t h[3];
    pie_ctl_client *c = open_holding(ctl, NULL, 3, h);
    int32_t hist[7];
    make_prompt(hist, 6, 41);
    pie_ctl_future *f;
    CHECK_OK(fwd(c, hist, 6, 0, h, NULL, &f));
    pie_ctl_future_release(f);
    static const struct { int32_t src_off, dst_off, n; } bad[] = {
        { 0, 0x7fffffff, 1 },          /* dst_off + n wraps negative */
        { 0x7fffffff, 0, 1 },          /* src_off + n wraps negative */
        { 1, 1, 0x7fffffff },          /* off + n wraps negative      */
        { 0x7fffffff, 0x7fffffff, 0x7fffffff },
    };
    for (int i = 0; i < 4; i++) {
        int rc = pie_ctl_page_copy(c, h[1], bad[i].src_off, h[2],
                                   bad[i].dst_off, bad[i].n);
        CHECK(rc == PIE_ERANGE, "copy of %d slots from offset %d to %d: "
              "returned %d, expected PIE_ERANGE", bad[i].n, bad[i].src_off,
              bad[i].dst_off, rc);
    }
    hist[6] = 77;
    int32_t got = fwd_token(c, &hist[6], 1, 6, h);
    int32_t want = fake_expected_next(hist, 7, VOCAB);
    CHECK(got == want, "forward after the refused copies: expected %d, got "
          "%d", want, got);
    CHECK(fake_backend_stats(b)->copies == 0, "%d copies ran, expected none",
          fake_backend_stats(b)->copies);
    pie_ctl_client_close(c);
    printf("copy overflow: offsets that wrap int32 refused; the next forward "
           "matches\n");
    done_ctl(ctl, b);
}

/* Probe values of one forward are capped (PIE_CTL_MAX_VALUES = 2^28):
 * 2048 LOGITS rows over a vocab of 2^21 ask for 2^32 values, which wrap to
 * 0 in int32; refused at submit, before anything is allocated for them. */
static void test_probe_cap(void)
{
    enum { V = 1 << 21, NT = 32, NO = 2048 };
    pie_backend *b;
    CHECK_OK(fake_backend_create(V, PS, 16, 0, &b));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    uint32_t h[NT / PS];
    pie_ctl_client *c = open_holding(ctl, NULL, NT / PS, h);
    int32_t t[NT], pos[NT];
    make_prompt(t, NT, 5);
    for (int32_t i = 0; i < NT; i++) pos[i] = i;
    static int32_t oi[NO];
    static pie_sampler s[NO];
    for (int32_t o = 0; o < NO; o++) {
        oi[o] = o % NT;
        s[o] = (pie_sampler){ .kind = PIE_PROBE_LOGITS };
    }
    pie_ctl_forward f = { .n_tokens = NT, .tokens = t, .positions = pos,
                          .n_pages = NT / PS, .pages = h, .last_page_len = PS,
                          .n_outputs = NO, .output_idx = oi, .samplers = s };
    pie_ctl_future *fut = NULL;
    int rc = pie_ctl_forward_submit(c, &f, NULL, NULL, &fut);
    CHECK(rc == PIE_ELIMIT, "%d LOGITS rows over vocab %d: submit returned "
          "%d, expected PIE_ELIMIT", NO, V, rc);
    CHECK(strstr(pie_err_msg(), "probe values") != NULL, "message: %s",
          pie_err_msg());
    /* TOPK with k = vocab: 129 rows are 2^28 + 2^21 values, over the cap */
    for (int32_t o = 0; o < NO; o++)
        s[o] = (pie_sampler){ .kind = PIE_PROBE_TOPK, .top_k = V };
    f.n_outputs = 129;
    rc = pie_ctl_forward_submit(c, &f, NULL, NULL, &fut);
    CHECK(rc == PIE_ELIMIT, "129 TOPK rows of k = %d: submit returned %d, "
          "expected PIE_ELIMIT", V, rc);
    /* within the cap: two such rows run, and the forward is exact */
    f.n_outputs = 2;
    CHECK_OK(pie_ctl_forward_submit(c, &f, NULL, NULL, &fut));
    CHECK_OK(pie_ctl_future_wait(fut, 10000));
    const pie_forward_out *out;
    CHECK_OK(pie_ctl_future_result(fut, &out, NULL));
    CHECK(out->value_indptr[2] == 2u * V, "value_indptr[2] = %u, expected %u",
          out->value_indptr[2], 2u * V);
    pie_ctl_future_release(fut);
    int32_t x = 3, hist[NT + 1];
    memcpy(hist, t, sizeof t);
    hist[NT] = x;
    uint32_t pages[NT / PS + 1];
    memcpy(pages, h, sizeof h);
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, &pages[NT / PS]));
    int32_t got = fwd_token(c, &x, 1, NT, pages);
    int32_t want = fake_expected_next(hist, NT + 1, V);
    CHECK(got == want, "forward after the refused ones: expected %d, got %d",
          want, got);
    pie_ctl_client_close(c);
    printf("probe cap: 2^32 and 2^28+2^21 probe values refused at submit; "
           "2 * 2^21 run\n");
    done_ctl(ctl, b);
}

/* One client's bad sampler or logit mask must fail only its own forward:
 * a good forward of another client staged beside it (behind a slow one
 * that holds the device) runs and is exact. */
static void test_bad_row_isolated(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(32, 0, NULL, &b);
    pie_ctl_client *z, *good, *bad;
    open_clients(ctl, &z, &good, &bad, NULL);
    uint32_t hz[1], hg[2], hb[1];
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, hz));
    CHECK_OK(pie_ctl_page_alloc(good, 2, 0, hg));
    CHECK_OK(pie_ctl_page_alloc(bad, 1, 0, hb));
    int32_t prompt[6], want[1], tok = 5;
    make_prompt(prompt, 6, 61);
    reference(prompt, 6, 1, want);
    int32_t t[4] = { 1, 2, 3, 4 }, pos[4] = { 0, 1, 2, 3 }, oi = 3;
    uint32_t lm_indptr[2] = { 0, 1 }, lm_runs[1] = { 5 };  /* allows none */
    struct { const char *what; pie_sampler s; bool mask; } cases[] = {
        { "random temperature NaN",
          { .kind = PIE_SAMPLER_RANDOM, .temperature = NAN, .top_p = 1 } },
        { "random temperature +inf",
          { .kind = PIE_SAMPLER_RANDOM, .temperature = INFINITY, .top_p = 1 } },
        { "random temperature -inf",
          { .kind = PIE_SAMPLER_RANDOM, .temperature = -INFINITY, .top_p = 1 } },
        { "random top_p NaN",
          { .kind = PIE_SAMPLER_RANDOM, .temperature = 1, .top_p = NAN } },
        { "random min_p NaN",
          { .kind = PIE_SAMPLER_RANDOM, .temperature = 1, .top_p = 1,
            .min_p = NAN } },
        { "TOPK temperature inf",
          { .kind = PIE_PROBE_TOPK, .top_k = 3, .temperature = INFINITY } },
        { "logit mask allowing no id", { .kind = PIE_SAMPLER_GREEDY }, true },
    };
    fake_backend_set_delay(b, 50000);            /* the device is idle */
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pie_ctl_future *fz, *fb = NULL, *fg;
        CHECK_OK(fwd(z, &tok, 1, 0, hz, NULL, &fz));  /* holds the device */
        usleep(10000);
        pie_ctl_forward f = { .n_tokens = 4, .tokens = t, .positions = pos,
                              .n_pages = 1, .pages = hb, .last_page_len = 4,
                              .n_outputs = 1, .output_idx = &oi,
                              .samplers = &cases[i].s };
        if (cases[i].mask) {
            f.logit_mask_indptr = lm_indptr;
            f.logit_mask_runs = lm_runs;
        }
        int rc_bad = pie_ctl_forward_submit(bad, &f, NULL, NULL, &fb);
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pie_err_msg());
        CHECK_OK(fwd(good, prompt, 6, 0, hg, NULL, &fg));  /* staged beside */
        int rc = pie_ctl_future_wait(fg, 10000);
        CHECK(rc == 0, "%s: the good forward of another client staged with "
              "it failed with %d", cases[i].what, rc);
        CHECK(wait_token(fg) == want[0], "%s: good forward: expected %d, got "
              "%d", cases[i].what, want[0], wait_token(fg));
        wait_token(fz);
        if (fb) {
            pie_ctl_future_wait(fb, 10000);
            pie_ctl_future_release(fb);
        }
        CHECK(rc_bad == PIE_EINVAL, "%s: submit returned %d, expected "
              "PIE_EINVAL", cases[i].what, rc_bad);
        CHECK(strstr(msg, "output 0") != NULL, "%s: message '%s'",
              cases[i].what, msg);
        pie_ctl_future_release(fg);
        pie_ctl_future_release(fz);
    }
    fake_backend_set_delay(b, 0);
    pie_ctl_client_close(z);
    pie_ctl_client_close(good);
    pie_ctl_client_close(bad);
    printf("bad row isolated: NaN/inf sampler parameters and an empty logit "
           "mask fail their own submit; the forward beside them is exact\n");
    done_ctl(ctl, b);
}

/* One forward of n tokens at slots [kv - n, kv) over pages, no outputs. */
static int fwd_at(pie_ctl_client *c, int32_t n, int32_t kv,
                  const uint32_t *pages, pie_ctl_future **f)
{
    int32_t t[8], pos[8], np = (kv + PS - 1) / PS;
    for (int32_t i = 0; i < n; i++) t[i] = 7 + i, pos[i] = kv - n + i;
    pie_ctl_forward x = { .n_tokens = n, .tokens = t, .positions = pos,
                          .n_pages = np, .pages = pages,
                          .last_page_len = kv - (np - 1) * PS };
    return pie_ctl_forward_submit(c, &x, NULL, NULL, f);
}

/* Pages are not cleared when reused: a forward may only read slots that a
 * forward or copy of theirs wrote (fill), and writes leave no gap. A page
 * another client filled and freed, reallocated, is refused as context; a
 * copy from unwritten source slots raises no fill. */
static void test_unwritten_slots(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(4, 0, NULL, &b);
    pie_ctl_client *a, *c;
    open_clients(ctl, &a, &c, NULL);
    uint32_t ha[4], h[4];
    pie_ctl_future *f;
    /* a fills the whole pool with its KV and frees it */
    CHECK_OK(pie_ctl_page_alloc(a, 4, 0, ha));
    int32_t secret[16];
    make_prompt(secret, 16, 99);
    CHECK_OK(fwd(a, secret, 16, 0, ha, NULL, &f));
    CHECK_OK(pie_ctl_future_wait(f, 5000));
    pie_ctl_future_release(f);
    CHECK_OK(pie_ctl_page_free(a, 4, ha));
    /* c gets a's pages back (the pool has no others) */
    CHECK_OK(pie_ctl_page_alloc(c, 4, 0, h));
    int32_t fill = -1;
    CHECK_OK(pie_ctl_page_fill(c, h[0], &fill));
    CHECK(fill == 0, "reallocated page fill %d, expected 0", fill);
    /* one token at slot 5 would attend to slots 0..4, never written by c */
    int rc = fwd_at(c, 1, 6, h, &f);
    CHECK(rc == PIE_ERANGE, "forward over unwritten slots: expected %d, "
          "got %d", PIE_ERANGE, rc);
    CHECK(strstr(pie_err_msg(), "nothing wrote") != NULL, "msg %s",
          pie_err_msg());
    /* a write that starts past the fill leaves a gap: refused */
    CHECK_OK(fwd_at(c, 2, 2, h, &f));               /* slots 0..1 */
    pie_ctl_future_release(f);
    rc = fwd_at(c, 1, 4, h, &f);                    /* slot 3, gap at 2 */
    CHECK(rc == PIE_ERANGE, "gap write: expected %d, got %d", PIE_ERANGE, rc);
    CHECK_OK(fwd_at(c, 1, 3, h, &f));               /* slot 2: in order */
    pie_ctl_future_release(f);
    CHECK_OK(fwd_at(c, 1, 2, h, &f));               /* rewrite slot 1 */
    pie_ctl_future_release(f);
    rc = fwd_at(c, 1, 5, h, &f);         /* page 0 has fill 3, not 4 */
    CHECK(rc == PIE_ERANGE, "partial page before: expected %d, got %d",
          PIE_ERANGE, rc);
    CHECK_OK(fwd_at(c, 2, 5, h, &f));               /* slots 3..4 */
    CHECK_OK(pie_ctl_future_wait(f, 5000));
    pie_ctl_future_release(f);
    /* a copy of unwritten slots (h[3]) over written ones takes them back */
    CHECK_OK(pie_ctl_page_copy(c, h[3], 0, h[2], 0, PS));
    CHECK_OK(pie_ctl_page_fill(c, h[2], &fill));
    CHECK(fill == 0, "copy of unwritten slots: fill %d, expected 0", fill);
    uint32_t via[2] = { h[2], h[3] };
    rc = fwd_at(c, 1, 5, via, &f);
    CHECK(rc == PIE_ERANGE, "forward over copied stale slots: expected %d, "
          "got %d", PIE_ERANGE, rc);
    /* a copy past the destination's fill leaves a gap: no fill raised */
    CHECK_OK(pie_ctl_page_copy(c, h[0], 0, h[2], 2, 2));
    CHECK_OK(pie_ctl_page_fill(c, h[2], &fill));
    CHECK(fill == 0, "copy past the fill: fill %d, expected 0", fill);
    /* a copy of written slots in order counts: h[1] holds slot 4 */
    CHECK_OK(pie_ctl_page_copy(c, h[0], 0, h[2], 0, PS));
    CHECK_OK(pie_ctl_page_copy(c, h[1], 0, h[3], 0, 1));
    CHECK_OK(pie_ctl_page_fill(c, h[3], &fill));
    CHECK(fill == 1, "copy of a written slot: fill %d, expected 1", fill);
    CHECK_OK(fwd_at(c, 1, 6, via, &f));
    CHECK_OK(pie_ctl_future_wait(f, 5000));
    pie_ctl_future_release(f);
    pie_ctl_client_close(a);
    pie_ctl_client_close(c);
    printf("unwritten slots: forwards reading slots nobody wrote (reused "
           "pages, gaps, copies of stale slots) refused with PIE_ERANGE\n");
    done_ctl(ctl, b);
}

/* A reader ordered after a writer of its page reads the slots that writer
 * was to write, counted as written (fill) since its submission. When the
 * writer fails or is cancelled, those slots hold whatever the page held
 * before -- here another client's KV -- so every op waiting on it through
 * the page, and every op waiting on those, is cancelled, never run, and
 * its fills are taken back. X fills the pool and frees it; c gets X's
 * pages; A writes slots 0..3 of h[0] (the device fails it after slots
 * 0..1); B reads them and writes h[1]; a copy of h[0] into h[2]; D reads
 * h[2] (waits on the copy only). Before, B and D ran: B's token was the
 * one after A[0], A[1], X[2], X[3] -- X's stale KV. */
static void test_failed_writer_readers(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(5, 0, NULL, &b);
    pie_ctl_client *x, *c, *z;
    open_clients(ctl, &z, &x, &c, NULL);
    uint32_t hz[1], hx[4], h[4];
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, hz));
    CHECK_OK(pie_ctl_page_alloc(x, 4, 0, hx));
    int32_t secret[16], A[4], y = 11, y2 = 12, tz = 5;
    make_prompt(secret, 16, 77);
    make_prompt(A, 4, 78);
    pie_ctl_future *f, *fz, *fa, *fb, *fd;
    fwd_token(x, secret, 16, 0, hx);
    CHECK_OK(pie_ctl_page_free(x, 4, hx));
    CHECK_OK(pie_ctl_page_alloc(c, 4, 0, h));       /* X's pages: no others */
    int32_t calls0 = fake_backend_stats(b)->calls;
    fz = hold_device(b, z, &tz, 1, 0, hz);
    fake_backend_set_delay(b, 0);
    fake_backend_fail_forwards(b, 1);               /* A's batch fails */
    CHECK_OK(fwd(c, A, 4, 0, h, NULL, &fa));        /* slots 0..3 of h[0] */
    CHECK_OK(fwd(c, &y, 1, 4, h, NULL, &fb));       /* reads them */
    CHECK_OK(pie_ctl_page_copy(c, h[0], 0, h[2], 0, PS));
    uint32_t via[2] = { h[2], h[3] };
    CHECK_OK(fwd(c, &y2, 1, 4, via, NULL, &fd));    /* reads the copy */
    int rc = pie_ctl_future_wait(fa, 10000);
    CHECK(rc == PIE_EIO, "A completed with %d, expected %d", rc, PIE_EIO);
    int32_t stale[5] = { A[0], A[1], secret[2], secret[3], y };
    rc = pie_ctl_future_wait(fb, 10000);
    if (rc == 0) {
        const pie_forward_out *o;
        CHECK_OK(pie_ctl_future_result(fb, &o, NULL));
        CHECK(0, "B ran after A failed: token %d (the one after X's stale "
              "KV in slots 2..3: %d)", o->tokens[0],
              fake_expected_next(stale, 5, VOCAB));
    }
    CHECK(rc == PIE_ECANCELED, "B completed with %d, expected %d", rc,
          PIE_ECANCELED);
    rc = pie_ctl_future_wait(fd, 10000);
    CHECK(rc == PIE_ECANCELED, "D (after the copy of A's page) completed "
          "with %d, expected %d", rc, PIE_ECANCELED);
    wait_token(fz);
    CHECK(fake_backend_stats(b)->calls == calls0 + 1 &&
          fake_backend_stats(b)->failed == 1, "%d forwards ran and %d "
          "failed, expected z's and A's (failed) only",
          fake_backend_stats(b)->calls - calls0,
          fake_backend_stats(b)->failed);
    for (int32_t k = 0; k < 4; k++) {
        int32_t fill = -1;
        CHECK_OK(pie_ctl_page_fill(c, h[k], &fill));
        CHECK(fill == 0, "h[%d] fill %d after its writers were cancelled", k,
              fill);
    }
    rc = fwd(c, &y, 1, 4, h, NULL, &f);
    CHECK(rc == PIE_ERANGE, "a new reader of A's slots: %d, expected %d", rc,
          PIE_ERANGE);
    pie_ctl_future *fs[4] = { fz, fa, fb, fd };
    for (int i = 0; i < 4; i++) pie_ctl_future_release(fs[i]);
    pie_ctl_client_close(z);
    pie_ctl_client_close(x);
    pie_ctl_client_close(c);
    printf("failed writer: its readers (and theirs) are cancelled, not run "
           "over a previous owner's KV\n");
    done_ctl(ctl, b);
}

/* A copy's completion callback: stores its status. */
static void copy_status(void *user, pie_ctl_future *f, int status)
{
    (void)f;
    atomic_store((atomic_int *)user, status);
}

/* For the copy-after-cancel tests: two clients on a 4-page pool, z with
 * one page (hz, to hold the device) and c with two (h[0], h[1]). */
typedef struct copy_fx {
    pie_backend    *b;
    pie_ctl        *ctl;
    pie_ctl_client *c, *z;
    uint32_t        hz[1], h[2];
} copy_fx;

static void copy_fx_open(copy_fx *x)
{
    x->ctl = make_ctl(4, 0, NULL, &x->b);
    open_clients(x->ctl, &x->z, &x->c, NULL);
    CHECK_OK(pie_ctl_page_alloc(x->z, 1, 0, x->hz));
    CHECK_OK(pie_ctl_page_alloc(x->c, 2, 0, x->h));
}

static void copy_fx_close(copy_fx *x)
{
    close_clients(x->z, x->c, NULL);
    done_ctl(x->ctl, x->b);
}

/* The status copy_status left in *st once the copy ended (1: pending). */
static int copy_wait(atomic_int *st)
{
    for (int k = 0; k < 30000 && atomic_load(st) == 1; k++) usleep(1000);
    return atomic_load(st);
}

/* A forward at slot 2 of page h1 continues tokens A[0..1]: the copy into
 * h1 brought A's KV. */
static void check_copy_kv(copy_fx *x, const int32_t *A, const char *what)
{
    int32_t y2 = 12, hist[3] = { A[0], A[1], y2 }, fill = -1;
    CHECK_OK(pie_ctl_page_fill(x->c, x->h[1], &fill));
    CHECK(fill == 2, "%s: the copy's destination: fill %d, expected 2",
          what, fill);
    uint32_t br[1] = { x->h[1] };
    int32_t got = fwd_token(x->c, &y2, 1, 2, br);
    int32_t want = fake_expected_next(hist, 3, VOCAB);
    CHECK(got == want, "%s: a forward over the copy: token %d, expected %d "
          "(the copy did not bring its source's KV)", what, got, want);
}

/* A copy that reads only slots a completed forward wrote is not cancelled
 * with a later writer of other slots of its source page: W0 writes slots
 * 0..1 of h[0] and completes; W1 (slot 2 of h[0]) is queued behind a
 * forward holding the device; a copy of slots 0..1 of h[0] into h[1]
 * waits on W1, h[0]'s newest writer. W1 is cancelled: the copy runs
 * (its callback says 0, h[1] holds 2 written slots) and a forward over
 * h[1] continues W0's tokens. Before, the copy was cancelled with W1
 * (and h[1]'s fill taken back to 0), though none of its slots were W1's. */
static void test_copy_after_cancelled_writer(void)
{
    copy_fx x;
    copy_fx_open(&x);
    int32_t A[2], y = 11, tz = 5;
    make_prompt(A, 2, 81);
    pie_ctl_future *fz, *w1;
    fwd_token(x.c, A, 2, 0, x.h);                       /* W0: slots 0..1 */
    fz = hold_device(x.b, x.z, &tz, 1, 0, x.hz);
    fake_backend_set_delay(x.b, 0);
    CHECK_OK(fwd(x.c, &y, 1, 2, x.h, NULL, &w1));       /* W1: slot 2 */
    atomic_int st = 1;
    CHECK_OK(pie_ctl_page_copy_cb(x.c, x.h[0], 0, x.h[1], 0, 2, copy_status,
                                  &st));
    pie_ctl_future_cancel(w1);
    CHECK(pie_ctl_future_poll(w1) == PIE_ECANCELED, "W1: %d, expected %d",
          pie_ctl_future_poll(w1), PIE_ECANCELED);
    wait_token(fz);
    int rc = copy_wait(&st);
    CHECK(rc == 0, "the copy of slots 0..1 (written by a completed forward) "
          "completed with %d after a writer of slot 2 was cancelled, "
          "expected 0", rc);
    check_copy_kv(&x, A, "copy after a cancelled writer");
    pie_ctl_future_release(w1);
    pie_ctl_future_release(fz);
    printf("copy after a cancelled writer: a copy of slots a completed "
           "forward wrote runs\n");
    copy_fx_close(&x);
}

/* A copy behind a cancelled writer may run only once every earlier writer
 * of its source page is done. E writes slots 0..1 of h[0] (queued behind
 * a forward holding the device); W1 (slot 2) waits on E and is cancelled;
 * W2 (slot 2 again) must then wait on E too, and so must a copy of slots
 * 0..1 of h[0] into h[1] queued behind W2; W2 is cancelled. The copy may
 * be cancelled with W2 or run after E, never copy slots E has not yet
 * written. Before, W1's end left h[0] without a pending writer: W2 waited
 * on nothing, the copy was released at W2's cancel (copy_unaffected took
 * W2's n_pending == 0 as "every earlier writer is done") and ran in E's
 * batch before E (copies go first), copying h[0]'s unwritten slots. */
static void test_copy_after_cancelled_writers(void)
{
    copy_fx x;
    copy_fx_open(&x);
    int32_t A[2], y = 11, tz = 5, fill = -1;
    make_prompt(A, 2, 83);
    pie_ctl_future *fz, *fe, *w1, *w2;
    fz = hold_device(x.b, x.z, &tz, 1, 0, x.hz);
    fake_backend_set_delay(x.b, 0);
    CHECK_OK(fwd(x.c, A, 2, 0, x.h, NULL, &fe));        /* E: slots 0..1 */
    CHECK_OK(fwd(x.c, &y, 1, 2, x.h, NULL, &w1));       /* W1: slot 2 */
    pie_ctl_future_cancel(w1);
    CHECK_OK(fwd(x.c, &y, 1, 2, x.h, NULL, &w2));       /* W2: slot 2 */
    atomic_int st = 1;
    CHECK_OK(pie_ctl_page_copy_cb(x.c, x.h[0], 0, x.h[1], 0, 2, copy_status,
                                  &st));
    pie_ctl_future_cancel(w2);
    wait_token(fz);
    wait_token(fe);
    int rc = copy_wait(&st);
    CHECK(rc == 0 || rc == PIE_ECANCELED, "the copy completed with %d", rc);
    CHECK_OK(pie_ctl_page_fill(x.c, x.h[1], &fill));
    printf("copy behind a cancelled writer of slots an earlier pending "
           "writer fills: status %d, destination fill %d\n", rc, fill);
    if (rc == 0)                    /* it ran: after E, with E's KV */
        check_copy_kv(&x, A, "copy behind cancelled writers");
    else
        CHECK(fill == 0, "the cancelled copy's destination: fill %d, "
              "expected 0", fill);
    pie_ctl_future *fs[4] = { fz, fe, w1, w2 };
    for (int i = 0; i < 4; i++) pie_ctl_future_release(fs[i]);
    copy_fx_close(&x);
}

/* Checks, under ctl->mu, that every page's last_writer is the newest
 * not-DONE op that writes it (by seq; NULL when none), or a pending op of
 * a closed client newer than any listed one. Returns 1 and says why when
 * not. */
static int lw_check(pie_ctl *ctl, char *why, size_t n)
{
    int bad = 0;
    pthread_mutex_lock(&ctl->mu);
    for (int32_t pg = 0; pg < ctl->n_pages && !bad; pg++) {
        ctl_op *best = NULL;
        for (pie_ctl_client *c = ctl->clients; c; c = c->next)
            for (ctl_op *op = c->ops; op; op = op->cnext) {
                if (atomic_load(&op->state) == OP_DONE) continue;
                for (int32_t w = 0; w < op->n_writes; w++)
                    if (op->writes[w].page == pg &&
                        (!best || op->seq > best->seq))
                        best = op;
            }
        ctl_op *lw = ctl->pages[pg].last_writer;
        if (lw && atomic_load(&lw->state) == OP_DONE) {
            snprintf(why, n, "page %d: last_writer is DONE", pg);
            bad = 1;
        } else if (lw != best && !(lw && !lw->c && (!best || lw->seq > best->seq))) {
            snprintf(why, n, "page %d: last_writer seq %lld, newest pending "
                     "writer seq %lld", pg, lw ? (long long)lw->seq : -1LL,
                     best ? (long long)best->seq : -1LL);
            bad = 1;
        }
    }
    pthread_mutex_unlock(&ctl->mu);
    return bad;
}

/* Random forwards (chained or not, rewriting slots, across pages), copies,
 * cancels, injected forward and copy failures, page free and realloc and
 * client close and reopen on two clients, with chunking and small batches
 * in some rounds: after each step every page's last_writer is its newest
 * pending writer (lw_check), and every fifth round frees the engine with
 * ops pending (ASan's leak check then finds any write record's reference
 * to its page's previous writer that was never dropped). */
static void test_writer_stress(void)
{
    uint32_t seed = 12345;
#define RND(m) (seed = seed * 1103515245u + 12345u, (int32_t)((seed >> 8) % (uint32_t)(m)))
    for (int round = 0; round < 200; round++) {
        seed += round * 7919u;
        pie_backend *b;
        pie_ctl_opts o = { .prefill_chunk = round % 3 == 0 ? 2 : 0,
                           .max_batch_reqs = round % 2 ? 2 : 0 };
        pie_ctl *ctl = make_ctl(16, 700 * (round % 4), &o, &b);
        pie_ctl_client *cl[2];
        uint32_t h[2][3];
        for (int i = 0; i < 2; i++) cl[i] = open_holding(ctl, NULL, 3, h[i]);
        pie_ctl_future *fs[96];
        int fc[96];
        int nf = 0;
        for (int step = 0; step < 200; step++) {
            int ci = RND(2);
            pie_ctl_client *c = cl[ci];
            int a = RND(12);
            if (a < 4 && nf < 96) {
                int32_t fl[3], pos0, n;
                for (int k = 0; k < 3; k++) pie_ctl_page_fill(c, h[ci][k], &fl[k]);
                int k = RND(3);
                while (k > 0 && fl[k - 1] < PS) k--;
                pos0 = k * PS + RND(fl[k] + 1);
                if (RND(4) == 0) pos0 = RND(pos0 + 1);
                n = 1 + RND(6);
                if (pos0 + n > 3 * PS) n = 3 * PS - pos0;
                if (n < 1) continue;
                int32_t toks[8];
                make_prompt(toks, n, seed);
                pie_ctl_future *from = NULL;
                if (nf > 0 && RND(3) == 0) {
                    int j = RND(nf);
                    if (fc[j] == ci) from = fs[j];
                }
                pie_ctl_future *f = NULL;
                if (fwd(c, toks, n, pos0, h[ci], from, &f) == 0) {
                    fc[nf] = ci;
                    fs[nf++] = f;
                }
            } else if (a < 6) {
                int s = RND(3), d = RND(3);
                int32_t cn = 1 + RND(PS);
                int32_t so = RND(PS - cn + 1), dof = RND(PS - cn + 1);
                pie_ctl_page_copy(c, h[ci][s], so, h[ci][d], dof, cn);
            } else if (a < 8 && nf > 0) {
                pie_ctl_future_cancel(fs[RND(nf)]);
            } else if (a == 8) {
                if (RND(3) == 0) fake_backend_fail_forwards(b, 1);
                else if (RND(2)) fake_backend_fail_copies(b, 1);
                else usleep(RND(2000));
            } else if (a == 9 && RND(3) == 0) {
                int k = RND(3);
                pie_ctl_page_free(c, 1, &h[ci][k]);
                CHECK_OK(pie_ctl_page_alloc(c, 1, 2000, &h[ci][k]));
            } else if (a == 10 && RND(8) == 0) {
                pie_ctl_client_close(c);
                CHECK_OK(pie_ctl_client_open(ctl, NULL, &cl[ci]));
                CHECK_OK(pie_ctl_page_alloc(cl[ci], 3, 2000, h[ci]));
                for (int i = 0; i < nf; i++)
                    if (fc[i] == ci) fc[i] = -1;
            } else if (a == 11) {
                int32_t tok = 7;
                pie_ctl_future *f = NULL;
                uint32_t pg[1] = { h[ci][0] };
                int32_t fl0;
                pie_ctl_page_fill(c, h[ci][0], &fl0);
                if (nf < 96 && fl0 > 0 && fwd(c, &tok, 1, RND(fl0) , pg, NULL, &f) == 0) {
                    fc[nf] = ci;
                    fs[nf++] = f;
                }
            }
            char why[200];
            if (lw_check(ctl, why, sizeof why)) {
                CHECK(0, "round %d step %d: %s", round, step, why);
            }
        }
        if (round % 5 == 4) {             /* free with ops pending */
            for (int i = 0; i < nf; i++) pie_ctl_future_release(fs[i]);
            pie_ctl_free(ctl);
            pie_backend_free(b);
            continue;
        }
        for (int i = 0; i < nf; i++) {
            pie_ctl_future_wait(fs[i], 10000);
            pie_ctl_future_release(fs[i]);
        }
        fake_backend_fail_forwards(b, 0);
        fake_backend_fail_copies(b, 0);
        pie_ctl_stats st;
        for (int k = 0; k < 30000; k++) {   /* copies have no futures */
            pie_ctl_get_stats(ctl, &st);
            if (st.queue_depth == 0) break;
            usleep(1000);
        }
        CHECK(st.queue_depth == 0, "round %d: queue depth %d after all "
              "futures ended", round, st.queue_depth);
        if (round % 5 == 3) {                /* close with none pending */
            for (int i = 0; i < 2; i++) pie_ctl_client_close(cl[i]);
            pie_ctl_get_stats(ctl, &st);
            CHECK(st.pages_free == st.pages_total, "round %d: %d of %d "
                  "pages free", round, st.pages_free, st.pages_total);
        }
        done_ctl(ctl, b);
    }
#undef RND
    printf("writer stress: last_writer is the newest pending writer\n");
}

/* z's forward of one token into hz, returned once it holds the device for
 * 6 * HOLD_US (while many forwards are queued); later ones take no time. */
static pie_ctl_future *hold_device_long(pie_backend *b, pie_ctl_client *z,
                                        const uint32_t *hz)
{
    int32_t tz = 5, s0 = fake_backend_started(b);
    pie_ctl_future *fz;
    fake_backend_set_delay(b, 6 * HOLD_US);
    CHECK_OK(fwd(z, &tz, 1, 0, hz, NULL, &fz));
    wait_started(b, s0 + 1);
    fake_backend_set_delay(b, 0);
    return fz;
}

/* Cancelling the first of N forwards queued on one page cancels all N
 * (each rewrites slot 0, so each is ordered after the one before), on a
 * small stack: the cascade once recursed once per queued forward. */
static void *cancel_small_stack(void *f)
{
    pie_ctl_future_cancel(f);
    return NULL;
}

static void test_deep_cancel(void)
{
    enum { N = 100000 };
    pie_backend *b;
    pie_ctl *ctl = make_ctl(4, 0, NULL, &b);
    pie_ctl_client *c, *z;
    open_clients(ctl, &z, &c, NULL);
    uint32_t hz[1], h[1];
    pie_ctl_future **f = malloc(sizeof *f * N), *fz;
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, hz));
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, h));
    fz = hold_device_long(b, z, hz);
    for (int32_t i = 0; i < N; i++) {
        int32_t t = i % VOCAB;
        CHECK_OK(fwd(c, &t, 1, 0, h, NULL, &f[i]));
    }
    pthread_attr_t at;
    pthread_t th;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 256 << 10);
    CHECK(pthread_create(&th, &at, cancel_small_stack, f[0]) == 0, "thread");
    pthread_join(th, NULL);
    pthread_attr_destroy(&at);
    for (int32_t i = 0; i < N; i++) {
        int rc = pie_ctl_future_wait(f[i], 10000);
        CHECK(rc == PIE_ECANCELED, "forward %d of the chain: %d, expected %d",
              i, rc, PIE_ECANCELED);
        pie_ctl_future_release(f[i]);
    }
    int32_t fill = -1;
    CHECK_OK(pie_ctl_page_fill(c, h[0], &fill));
    CHECK(fill == 0, "page fill %d after its writers were cancelled", fill);
    wait_token(fz);
    pie_ctl_future_release(fz);
    pie_ctl_client_close(z);
    pie_ctl_client_close(c);
    free(f);
    printf("deep cancel: %d queued forwards cancelled on a 256 KiB stack\n", N);
    done_ctl(ctl, b);
}

/* A mask indptr that is not monotone is refused before any run is read:
 * [0, J, 2] once summed runs[0..J) of a 2-entry array. The runs sit at the
 * end of a mapping followed by an inaccessible page. */
static void test_mask_indptr_first(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    uint32_t h[1];
    pie_ctl_client *c = open_holding(ctl, NULL, 1, h);
    long pg = sysconf(_SC_PAGESIZE);
    char *m = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    CHECK_OK(mprotect(m + pg, pg, PROT_NONE));
    uint32_t *runs = (uint32_t *)(m + pg) - 2;
    runs[0] = 0, runs[1] = 1;
    int32_t t[2] = { 1, 2 }, pos[2] = { 0, 1 };
    uint32_t mi[3] = { 0, 1u << 20, 2 };
    pie_ctl_forward x = { .n_tokens = 2, .tokens = t, .positions = pos,
                          .n_pages = 1, .pages = h, .last_page_len = 2,
                          .mask_indptr = mi, .mask_runs = runs };
    pie_ctl_future *f;
    int rc = pie_ctl_forward_submit(c, &x, NULL, NULL, &f);
    CHECK(rc == PIE_EINVAL, "indptr [0, 2^20, 2]: expected %d, got %d",
          PIE_EINVAL, rc);
    CHECK(strstr(pie_err_msg(), "not monotone") != NULL, "msg %s",
          pie_err_msg());
    /* the same for a logit mask */
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    int32_t oi[2] = { 0, 1 };
    pie_sampler ss[2] = { s, s };
    x.mask_indptr = NULL, x.mask_runs = NULL;
    x.n_outputs = 2, x.output_idx = oi, x.samplers = ss;
    x.logit_mask_indptr = mi, x.logit_mask_runs = runs;
    rc = pie_ctl_forward_submit(c, &x, NULL, NULL, &f);
    CHECK(rc == PIE_EINVAL, "logit indptr [0, 2^20, 2]: expected %d, got %d",
          PIE_EINVAL, rc);
    munmap(m, 2 * pg);
    pie_ctl_client_close(c);
    printf("mask indptr first: a non-monotone indptr is refused before its "
           "runs are read\n");
    done_ctl(ctl, b);
}

/* 2^20 tokens with 2^20 chains: the chained-token check is linear (it was
 * tokens x chains, minutes). Chained tokens' ids are ignored, an unchained
 * bad id is refused. */
static void test_many_chains(void)
{
    pie_backend *bk;
    int32_t ps = 4096, np = 256, n = 1 << 20;
    CHECK_OK(fake_backend_create(VOCAB, ps, np, 0, &bk));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(bk, NULL, &ctl));
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, NULL, &c));
    int32_t *t = malloc(n * sizeof *t), *pos = malloc(n * sizeof *pos);
    uint32_t *h = malloc(np * sizeof *h);
    pie_ctl_chain *ch = malloc(n * sizeof *ch);
    CHECK(t && pos && h && ch, "malloc");
    for (int32_t i = 0; i < np; i++) h[i] = (uint32_t)i + 1;
    for (int32_t i = 0; i < n; i++) {
        t[i] = -1, pos[i] = i;
        ch[i] = (pie_ctl_chain){ .token_idx = n - 1 - i, .from = NULL };
    }
    /* every token chained: the token check passes; n_outputs -1 is the
     * next refusal */
    pie_ctl_forward x = { .n_tokens = n, .tokens = t, .positions = pos,
                          .n_pages = np, .pages = h, .last_page_len = ps,
                          .n_outputs = -1, .n_chains = n, .chains = ch };
    pie_ctl_future *f;
    double t0 = now_ms();
    int rc = pie_ctl_forward_submit(c, &x, NULL, NULL, &f);
    CHECK(rc == PIE_EINVAL && strstr(pie_err_msg(), "output rows"),
          "all chained: expected the output-row refusal, got %d (%s)", rc,
          pie_err_msg());
    /* token 12345 unchained (chain fed 0 twice) with id -1: refused */
    ch[n - 1 - 12345].token_idx = 0;
    rc = pie_ctl_forward_submit(c, &x, NULL, NULL, &f);
    CHECK(rc == PIE_ERANGE && strstr(pie_err_msg(), "at 12345"),
          "unchained bad id: expected %d at 12345, got %d (%s)", PIE_ERANGE,
          rc, pie_err_msg());
    printf("many chains: 2^20 tokens x 2^20 chains checked twice in %.1f ms\n",
           now_ms() - t0);
    free(t), free(pos), free(h), free(ch);
    pie_ctl_client_close(c);
    pie_ctl_free(ctl);
    pie_backend_free(bk);
}

/* Freeing 2^20 handles at once: duplicates still refused with nothing
 * freed, and the check is not pairwise under the pool lock (it was: 1.2 s
 * for 2^16 handles, minutes for 2^20). */
static void test_free_many(void)
{
    pie_backend *b;
    int32_t n = 1 << 20;
    pie_ctl *ctl = make_ctl(n, 0, NULL, &b);
    uint32_t *h = malloc(n * sizeof *h);
    CHECK(h != NULL, "malloc");
    pie_ctl_client *c = open_holding(ctl, NULL, n, h);
    uint32_t last = h[n - 1];
    h[n - 1] = h[0];
    double t0 = now_ms();
    int rc = pie_ctl_page_free(c, n, h);
    double dt = now_ms() - t0;
    CHECK(rc == PIE_EINVAL && strstr(pie_err_msg(), "twice"),
          "duplicate handle: expected %d, got %d (%s)", PIE_EINVAL, rc,
          pie_err_msg());
    int32_t fill;
    CHECK_OK(pie_ctl_page_fill(c, h[1], &fill));     /* nothing freed */
    h[n - 1] = last;
    CHECK_OK(pie_ctl_page_free(c, n, h));
    CHECK(pie_ctl_page_fill(c, h[1], &fill) == PIE_EINVAL, "freed");
    printf("free many: %d handles, duplicate refused in %.1f ms, then all "
           "freed\n", n, dt);
    free(h);
    pie_ctl_client_close(c);
    done_ctl(ctl, b);
}

/* Bytes the heap holds now (the allocator's own count: ASan's under
 * PIE_SANITIZE, glibc's over all arenas otherwise). */
static size_t heap_bytes(void)
{
#if HAVE_ASAN
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
#endif
}

/* A forward cancelled and released while a forward it chains from is
 * still pending stays in that parent's dependents until the parent
 * completes (the runtime gives its budget back as the future goes). Its
 * copies (here a 16 KiB attention mask) and, as it failed, its results
 * (a LOGITS row, 8 KB) are freed when it finishes, and its entry leaves
 * the parent's list when that list next grows: N such forwards behind one
 * pending parent add next to nothing to the heap. They held N x 24 KiB
 * until the parent completed. */
static void test_cancelled_dependents_freed(void)
{
    enum { N = 2000, RUNS = 4096 };
    pie_backend *b;
    pie_ctl *ctl = make_ctl(16, 0, NULL, &b);
    pie_ctl_client *c, *z;
    open_clients(ctl, &z, &c, NULL);
    uint32_t hz[1], h[2];
    CHECK_OK(pie_ctl_page_alloc(z, 1, 0, hz));
    CHECK_OK(pie_ctl_page_alloc(c, 2, 0, h));
    int32_t tp = 7;
    pie_ctl_future *fz = hold_device_long(b, z, hz), *fp;
    CHECK_OK(fwd(c, &tp, 1, 0, h, NULL, &fp));      /* P: pending behind it */
    /* each child: one token chained from P into slot 0 of h[1], a mask of
     * RUNS runs (one slot attended), a LOGITS row */
    uint32_t mi[2] = { 0, RUNS }, *runs = calloc(RUNS, sizeof *runs);
    CHECK(runs != NULL, "calloc");
    runs[0] = 1;
    int32_t t = 0, pos = 0, oi = 0;
    pie_sampler s = { .kind = PIE_PROBE_LOGITS };
    pie_ctl_chain ch = { 0, fp, 0 };
    pie_ctl_forward x = {
        .n_tokens = 1, .tokens = &t, .positions = &pos, .n_pages = 1,
        .pages = &h[1], .last_page_len = 1, .mask_indptr = mi,
        .mask_runs = runs, .n_outputs = 1, .output_idx = &oi, .samplers = &s,
        .n_chains = 1, .chains = &ch,
    };
    size_t before = heap_bytes();
    for (int32_t i = 0; i < N; i++) {
        pie_ctl_future *f;
        CHECK_OK(pie_ctl_forward_submit(c, &x, NULL, NULL, &f));
        pie_ctl_future_cancel(f);
        CHECK(pie_ctl_future_poll(f) == PIE_ECANCELED, "child %d: %d", i,
              pie_ctl_future_poll(f));
        pie_ctl_future_release(f);
    }
    size_t after = heap_bytes();
    CHECK(pie_ctl_future_poll(fp) == PIE_EAGAIN, "the parent completed "
          "while its children were queued: the test proves nothing");
    long long grew = (long long)after - (long long)before;
    printf("cancelled dependents: %d cancelled children of a pending "
           "parent left %lld heap bytes (%lld each)\n", N, grew,
           grew / N);
    CHECK(grew < (long long)N * 64, "%d cancelled children of a pending "
          "parent hold %lld heap bytes, expected under %lld (their masks "
          "and results are %lld)", N, grew, (long long)N * 64,
          (long long)N * (RUNS * 4 + VOCAB * 8));
    wait_token(fp);
    wait_token(fz);
    pie_ctl_future_release(fp);
    pie_ctl_future_release(fz);
    free(runs);
    pie_ctl_client_close(z);
    pie_ctl_client_close(c);
    done_ctl(ctl, b);
}

/* A forward chained from one that is done already takes its token at
 * submit and holds no reference to it: releasing the parent frees its
 * results then, though the child still waits (here behind W, a prefill
 * run 4 tokens a fire). The runtime gives a future's budget back as it is
 * freed; before, each parent's results (16 LOGITS rows, 128 KB) stayed
 * until its child became ready, N of them held at once. */
static void test_chain_from_done_frees(void)
{
    enum { N = 20, WARM = 2, NW = 512, R = 16 };
    pie_backend *b;
    pie_ctl_opts o = { .prefill_chunk = PS };
    pie_ctl *ctl = make_ctl(NW / PS + 1, 1000, &o, &b);
    uint32_t hw[NW / PS], hp[1];
    pie_ctl_client *c = open_holding(ctl, NULL, NW / PS, hw);
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, hp));
    int32_t *tw = malloc(NW * sizeof *tw), *pw = malloc(NW * sizeof *pw);
    CHECK(tw && pw, "malloc");
    make_prompt(tw, NW, 91);
    for (int32_t i = 0; i < NW; i++) pw[i] = i;
    int32_t ow = NW - 1;
    pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_forward w = {
        .n_tokens = NW, .tokens = tw, .positions = pw, .n_pages = NW / PS,
        .pages = hw, .last_page_len = PS, .n_outputs = 1, .output_idx = &ow,
        .samplers = &g,
    };
    pie_ctl_future *fw, *fc[WARM + N];
    CHECK_OK(pie_ctl_forward_submit(c, &w, NULL, NULL, &fw));
    /* each parent: one token into slot 0 of hp, a greedy row and R
     * LOGITS rows; each child: one token chained from it, rewriting the
     * last slot of W's first page (so it waits for W) */
    pie_sampler ps_[R + 1];
    int32_t oi[R + 1];
    for (int32_t r = 0; r <= R; r++) {
        ps_[r] = (pie_sampler){ .kind = r ? PIE_PROBE_LOGITS
                                          : PIE_SAMPLER_GREEDY };
        oi[r] = 0;
    }
    int32_t tp = 3, pp = 0, tc = 0, pc = PS - 1;
    pie_ctl_forward x = {
        .n_tokens = 1, .tokens = &tp, .positions = &pp, .n_pages = 1,
        .pages = hp, .last_page_len = 1, .n_outputs = R + 1,
        .output_idx = oi, .samplers = ps_,
    };
    size_t before = 0;
    for (int32_t i = 0; i < WARM + N; i++) {
        if (i == WARM) before = heap_bytes();   /* both batches grown */
        pie_ctl_future *fp;
        CHECK_OK(pie_ctl_forward_submit(c, &x, NULL, NULL, &fp));
        CHECK_OK(pie_ctl_future_wait(fp, 10000));
        pie_ctl_chain ch = { 0, fp, 0 };
        int32_t zero = 0;
        pie_ctl_forward y = {
            .n_tokens = 1, .tokens = &tc, .positions = &pc, .n_pages = 1,
            .pages = hw, .last_page_len = PS, .n_outputs = 1,
            .output_idx = &zero, .samplers = &g, .n_chains = 1,
            .chains = &ch,
        };
        CHECK_OK(pie_ctl_forward_submit(c, &y, NULL, NULL, &fc[i]));
        pie_ctl_future_release(fp);
    }
    size_t after = heap_bytes();
    CHECK(pie_ctl_future_poll(fw) == PIE_EAGAIN, "W completed while the "
          "children were queued: the test proves nothing");
    long long grew = (long long)after - (long long)before;
    printf("chain from done: %d released parents of waiting children left "
           "%lld heap bytes (%lld each; their results are %d)\n", N, grew,
           grew / N, R * VOCAB * 8);
    CHECK(grew < (long long)N * 16384, "%d released parents of waiting "
          "children hold %lld heap bytes, expected under %lld", N, grew,
          (long long)N * 16384);
    CHECK_OK(pie_ctl_future_wait(fw, 30000));
    for (int32_t i = 0; i < WARM + N; i++) {
        CHECK_OK(pie_ctl_future_wait(fc[i], 10000));
        pie_ctl_future_release(fc[i]);
    }
    pie_ctl_future_release(fw);
    free(tw), free(pw);
    pie_ctl_client_close(c);
    done_ctl(ctl, b);
}

/* A forward chained from one that failed before it was submitted is
 * refused with PIE_ECANCELED: a failed forward's samplers and results are
 * freed as it finishes (op_shed), so its row is not looked at. */
static void test_chain_from_failed(void)
{
    pie_backend *b;
    pie_ctl *ctl = make_ctl(8, 0, NULL, &b);
    uint32_t h[2];
    pie_ctl_client *c = open_holding(ctl, NULL, 2, h);
    int32_t t = 3;
    pie_ctl_future *fa, *fb;
    fake_backend_fail_forwards(b, 1);
    CHECK_OK(fwd(c, &t, 1, 0, &h[0], NULL, &fa));
    int rc = pie_ctl_future_wait(fa, 10000);
    CHECK(rc == PIE_EIO, "the failing forward: %d, expected %d", rc, PIE_EIO);
    rc = fwd(c, &t, 1, 0, &h[1], fa, &fb);
    CHECK(rc == PIE_ECANCELED, "chained from a failed forward: %d, expected "
          "%d", rc, PIE_ECANCELED);
    fwd_token(c, &t, 1, 0, &h[1]);                   /* the page is clean */
    pie_ctl_future_release(fa);
    pie_ctl_client_close(c);
    printf("chain from failed: refused with PIE_ECANCELED\n");
    done_ctl(ctl, b);
}

static const ctl_test tests[] = {
    { "forward_failure", test_forward_failure },
    { "cancel_staged", test_cancel_staged },
    { "rewrite_in_flight", test_rewrite_in_flight },
    { "rewrite_wired", test_rewrite_wired },
    { "cancel_wired", test_cancel_wired },
    { "batch_oom", test_batch_oom },
    { "copy_overflow", test_copy_overflow },
    { "import_readonly", test_import_readonly },
    { "probe_cap", test_probe_cap },
    { "bad_row_isolated", test_bad_row_isolated },
    { "unwritten_slots", test_unwritten_slots },
    { "mask_indptr_first", test_mask_indptr_first },
    { "many_chains", test_many_chains },
    { "free_many", test_free_many },
    { "failed_writer_readers", test_failed_writer_readers },
    { "deep_cancel", test_deep_cancel },
    { "copy_after_cancelled_writer", test_copy_after_cancelled_writer },
    { "copy_after_cancelled_writers", test_copy_after_cancelled_writers },
    { "writer_stress", test_writer_stress },
    { "cancelled_dependents_freed", test_cancelled_dependents_freed },
    { "chain_from_done_frees", test_chain_from_done_frees },
    { "chain_from_failed", test_chain_from_failed },
};

/* test_control_inflight [NAME...]: the named tests, or all in order. */
int main(int argc, char **argv)
{
    ctl_test_run(argc, argv, tests, sizeof tests / sizeof tests[0],
                 &test_n_checks);
    TEST_DONE();
}
