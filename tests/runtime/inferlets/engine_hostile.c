/*
 * engine_hostile.c — test inferlet for test_rt_engine.c: a hostile author
 * calling the engine host functions (runtime/host_engine.c) with bad
 * counts, handles, masks and sampler parameters.
 *
 *   argv: codes          a table of bad calls, each with the error code it
 *                        must return; sends "ok" or the calls that did not
 *                        ("name: got X, want Y; ...")
 *   argv: mask_indptr J  sets an attention mask whose indptr is
 *                        [0, J, 2] over 2 runs (it jumps past the runs and
 *                        comes back), submits it, then runs a good forward;
 *                        sends "set S submit U good G"
 *   argv: cancel_running cancels a long forward 20 ms after submitting it
 *                        (sooner if it was done by then) and reads it at
 *                        once; sends "status S read R
 *                        values V" (future_status, forward_read_tokens,
 *                        forward_read_values)
 *   argv: import_badptr  kv_import of an existing name into a page buffer
 *                        outside memory (must trap)
 *   argv: export_badptr  kv_export of a good name from a page list outside
 *                        memory (must trap)
 *   argv: outputs [hold] submits forwards of one LOGITS row each and frees
 *                        none, until a submit fails (at most 4096); then
 *                        frees one and submits again; chains a builder
 *                        from a second one, frees that future and submits
 *                        again; drops the builder and submits again;
 *                        sends "n N rc R again A held H after F" (N
 *                        accepted, R the failing code, A/H/F a submit's
 *                        code, 0 for a future). With hold it then waits
 *                        for a message from its client, holding them all
 *   argv: inputs [hold]  as outputs, with forwards of one token whose
 *                        attention mask is 4096 runs (all but the last
 *                        empty: 16 KiB of input the host keeps until the
 *                        future is freed) and one greedy row; submits
 *                        until one fails (at most 4096), frees one and
 *                        submits again; sends "n N rc R again A"
 *   argv: copies         submits a long forward (896 tokens over 56 pages,
 *                        about 140 ms on the CPU backend) that writes
 *                        page A, then queues kv_copy of slot 0 of A into
 *                        slot 0 of page B until one fails (at most
 *                        200,000): each waits for the forward (its source)
 *                        and for the copy before it (its destination), so
 *                        they run one per batch once it is done; notes
 *                        whether the forward was still pending when the
 *                        loop stopped, waits for it (keeping its future),
 *                        then retries a copy every millisecond for up to
 *                        10 s while the queued ones run; sends "n N rc R
 *                        again A pending P" (A the retry's code, P 1 if
 *                        the forward was pending)
 *   argv: import_loop    imports an export "loop_x" (made by the test)
 *                        until an import fails (at most 1,000,000), frees
 *                        the handles of one and imports again; sends
 *                        "n N rc R again A" (A the page count or error)
 *   argv: import_quota   imports an export "quota_x" (made by the test)
 *                        beside its 4 pages and sends "import R" (the
 *                        number of pages or an error)
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie_api.h"

#define BAD_PTR 0xfffffff0u   /* 16 bytes below 4 GiB: past any memory */

static int32_t m, vocab, ps;
static int32_t pg[4];          /* 4 writable pages */
static char report[4096];
static int len, fails;

static void expect(const char *name, int32_t got, int32_t want)
{
    if (got == want) return;
    fails++;
    len += snprintf(report + len, sizeof report - len, "%s: got %d, want %d; ",
                    name, got, want);
    if (len >= (int)sizeof report) len = sizeof report - 1;
}

/* A builder with one token (id 1 at position last - 1) over pages[0..n) with
 * the last one filled to last. */
/* A forward of token tok at position pos on pages (n, the last holding
 * last slots). */
static int32_t token_at(int32_t tok, int32_t pos, const int32_t *pages,
                        uint32_t n, uint32_t last)
{
    int32_t f = pie_forward_new(m);
    pie_forward_tokens(f, &tok, &pos, 1);
    pie_forward_pages(f, pages, n, last);
    return f;
}

static int32_t one_token(const int32_t *pages, uint32_t n, uint32_t last)
{
    return token_at(1, (int32_t)last - 1, pages, n, last);
}

/* Submits f and waits: the submit's error, or the forward's status. */
static int32_t run(int32_t f)
{
    int32_t fut = pie_forward_submit(f);
    if (fut < 0) return fut;
    int32_t st = pie_future_wait(fut);
    pie_future_free(fut);
    return st;
}

/* A one-token forward with one output row of the given sampler. */
static int32_t sampler(int32_t kind, float t, int32_t k, float p, float mp)
{
    int32_t f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, kind, t, k, p, mp, 7);
    return run(f);
}

static void codes(void)
{
    int32_t tok = 1, pos = 0, f = pie_forward_new(m);
    /* counts: refused before the pointer is looked at, not wrapped */
    expect("tokens n=0 ptr=0", pie_forward_tokens(f, 0, 0, 0), 0);
    expect("tokens n=2^31-1", pie_forward_tokens(f, 0, 0, 0x7fffffff),
           PIE_ELIMIT);
    expect("tokens n=2^32-1", pie_forward_tokens(f, 0, 0, 0xffffffff),
           PIE_ELIMIT);
    expect("pages n=2^32-1", pie_forward_pages(f, pg, 0xffffffff, 1),
           PIE_ERANGE);
    expect("mask n_runs=2^26+1", pie_forward_mask(f, 0, 0, (1u << 26) + 1),
           PIE_ELIMIT);
    expect("output token_idx=2^32-1",
           pie_forward_output(f, 0xffffffff, 0, 0, 0, 1, 0, 0), PIE_ERANGE);
    expect("output_ids n=2^32-1", pie_forward_output_ids(f, 0, 0, 0xffffffff),
           PIE_ELIMIT);
    expect("logit_mask n=2^32-1", pie_forward_logit_mask(f, 0, 0, 0xffffffff),
           PIE_ELIMIT);
    expect("output_ids row 0 of none", pie_forward_output_ids(f, 0, &tok, 1),
           PIE_EINVAL);
    expect("submit without tokens", pie_forward_submit(f), PIE_EINVAL);
    expect("submit again", pie_forward_submit(f), PIE_EINVAL);
    expect("builder 0", pie_forward_tokens(0, &tok, &pos, 1), PIE_EINVAL);
    expect("builder -1", pie_forward_submit(-1), PIE_EINVAL);

    /* pages and fills */
    int32_t bad[3] = { 0, 99999, -1 };
    expect("fill 0", run(one_token(pg, 1, 0)), PIE_ERANGE);
    expect("fill page_size+1", run(one_token(pg, 1, (uint32_t)ps + 1)),
           PIE_ERANGE);
    for (int k = 0; k < 3; k++)
        expect("bad page handle", run(one_token(bad + k, 1, 1)), PIE_EINVAL);
    int32_t freed[1];
    pie_kv_alloc(m, 1, freed);
    pie_kv_free(m, freed, 1);
    expect("freed page", run(one_token(freed, 1, 1)), PIE_EINVAL);
    int32_t twice[2] = { pg[0], pg[0] };
    f = pie_forward_new(m);
    int32_t ids[32], poss[32];
    for (int k = 0; k < 32; k++) ids[k] = 1, poss[k] = k;
    pie_forward_tokens(f, ids, poss, (uint32_t)ps + 1);
    pie_forward_pages(f, twice, 2, 1);
    expect("page written twice", run(f), PIE_EINVAL);
    pie_kv_export(m, "hostile", 7, pg + 3, 1);
    int32_t ro[1] = { 0 };
    expect("import", pie_kv_import(m, "hostile", 7, ro, 1), 1);
    expect("write imported page", run(one_token(ro, 1, 1)), PIE_EPERM);
    expect("write exported page", run(one_token(pg + 3, 1, 1)), PIE_EPERM);
    pie_kv_unexport(m, "hostile", 7);

    /* tokens and positions */
    int32_t neg = -1, big = 0x7fffffff;
    expect("token id = vocab", run(token_at(vocab, pos, pg, 1, 1)), PIE_ERANGE);
    expect("token id -1", run(token_at(neg, pos, pg, 1, 1)), PIE_ERANGE);
    expect("position -1", run(token_at(tok, neg, pg, 1, 1)), PIE_ERANGE);
    f = token_at(tok, big, pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    expect("position 2^31-1 runs", run(f), 0);
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 1, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    expect("output past the tokens", run(f), PIE_ERANGE);

    /* sampler parameters (api.def, forward_output) */
    expect("random T NaN", sampler(1, NAN, 0, 1, 0), PIE_EINVAL);
    expect("random T inf", sampler(1, INFINITY, 0, 1, 0), PIE_EINVAL);
    expect("random T -inf", sampler(1, -INFINITY, 0, 1, 0), PIE_EINVAL);
    expect("random T -1 (greedy)", sampler(1, -1, 0, 1, 0), 0);
    expect("random T 1e-45", sampler(1, 1e-45f, 0, 1, 0), 0);
    expect("random T 3e38", sampler(1, 3e38f, 0, 1, 0), 0);
    expect("random top_p NaN", sampler(1, 1, 0, NAN, 0), PIE_EINVAL);
    expect("random top_p -1", sampler(1, 1, 0, -1, 0), PIE_EINVAL);
    expect("random top_p inf", sampler(1, 1, 0, INFINITY, 0), 0);
    expect("random top_p 0", sampler(1, 1, 0, 0, 0), 0);
    expect("random min_p NaN", sampler(1, 1, 0, 1, NAN), PIE_EINVAL);
    expect("random min_p -0.5", sampler(1, 1, 0, 1, -0.5f), PIE_EINVAL);
    expect("random min_p 1.5", sampler(1, 1, 0, 1, 1.5f), PIE_EINVAL);
    expect("random min_p 1", sampler(1, 1, 0, 1, 1), 0);
    expect("random top_k 2^31-1", sampler(1, 1, 0x7fffffff, 1, 0), 0);
    expect("random top_k -5", sampler(1, 1, -5, 1, 0), 0);
    expect("random top_k vocab+1", sampler(1, 1, vocab + 1, 1, 0), 0);
    expect("topk k 0", sampler(2, 1, 0, 1, 0), PIE_ERANGE);
    expect("topk k vocab", sampler(2, 1, vocab, 1, 0), 0);
    expect("topk k vocab+1", sampler(2, 1, vocab + 1, 1, 0), PIE_ERANGE);
    expect("topk T NaN", sampler(2, NAN, 3, 1, 0), PIE_EINVAL);
    expect("kind 99", sampler(99, 1, 0, 1, 0), PIE_EINVAL);
    expect("kind -1", sampler(-1, 1, 0, 1, 0), PIE_EINVAL);
    int32_t lp[3] = { 0, -1, 5 };
    for (int k = 0; k < 2; k++) {
        f = one_token(pg, 1, 1);
        pie_forward_output(f, 0, PIE_PROBE_LOGPROBS, 1, 0, 1, 0, 0);
        pie_forward_output_ids(f, 0, lp, 3);
        expect("logprobs id out of vocab", run(f), PIE_ERANGE);
        lp[1] = vocab;
    }

    /* logit masks: runs over the vocabulary */
    uint32_t runs[3] = { 0, (uint32_t)vocab + 1, 0 };
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    expect("logit mask row 1 of 1", pie_forward_logit_mask(f, 1, runs, 2),
           PIE_EINVAL);
    expect("logit mask of 0 runs", pie_forward_logit_mask(f, 0, runs, 0), 0);
    expect("logit mask allowing nothing", run(f), PIE_EINVAL);
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    pie_forward_logit_mask(f, 0, runs, 2);
    expect("logit mask past the vocab", run(f), PIE_ERANGE);
    runs[0] = runs[1] = 0xffffffff, runs[2] = 2;
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    pie_forward_logit_mask(f, 0, runs, 3);
    expect("logit mask summing past 2^32", run(f), PIE_ERANGE);
    runs[0] = 10, runs[1] = 3;       /* shorter than the vocab: 10..12 */
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_RANDOM, 1, 0, 1, 0, 3);
    pie_forward_logit_mask(f, 0, runs, 2);
    int32_t fut = pie_forward_submit(f), out = -1;
    pie_future_wait(fut);
    pie_forward_read_tokens(fut, &out, 1);
    pie_future_free(fut);
    expect("short logit mask keeps the token in 10..12",
           out >= 10 && out <= 12, 1);

    /* attention masks: runs over the KV slots */
    uint32_t ip[2] = { 0, 2 }, mr[2] = { 0, 2 };
    f = one_token(pg, 1, 1);
    pie_forward_mask(f, ip, mr, 2);
    expect("attention mask past kv_len", run(f), PIE_ERANGE);
    mr[0] = 0xffffffff;
    f = one_token(pg, 1, 1);
    pie_forward_mask(f, ip, mr, 2);
    expect("attention mask summing past 2^32", run(f), PIE_ERANGE);
    ip[1] = 3;
    expect("attention indptr past the runs",
           pie_forward_mask(one_token(pg, 1, 1), ip, mr, 2), PIE_ERANGE);
    ip[0] = 1;
    ip[1] = 2;
    f = one_token(pg, 1, 1);
    pie_forward_mask(f, ip, mr, 2);
    expect("attention indptr[0] = 1", run(f), PIE_EINVAL);
    f = pie_forward_new(m);
    ip[0] = 0;
    pie_forward_mask(f, ip, mr, 0);
    pie_forward_tokens(f, &tok, &pos, 1);
    pie_forward_pages(f, pg, 1, 1);
    expect("attention mask set before the tokens", run(f), PIE_EINVAL);

    /* futures and chains */
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    pie_forward_output(f, 0, PIE_PROBE_LOGITS, 1, 0, 1, 0, 0);
    fut = pie_forward_submit(f);
    expect("wait", pie_future_wait(fut), 0);
    expect("wait again", pie_future_wait(fut), 0);
    expect("read_values row 2^32-1",
           pie_forward_read_values(fut, 0xffffffff, 0, 0, 0), PIE_ERANGE);
    f = pie_forward_new(m);
    expect("chain row 2^31", pie_forward_token_from(f, fut, 0x80000000u, 1),
           PIE_EINVAL);
    pie_forward_token_from(f, fut, 1, 1);          /* a probe row */
    pie_forward_pages(f, pg, 1, 2);
    expect("chain from a probe row", run(f), PIE_EINVAL);
    f = pie_forward_new(m);
    pie_forward_token_from(f, fut, 5, 1);
    pie_forward_pages(f, pg, 1, 2);
    expect("chain from row 5 of 2", run(f), PIE_EINVAL);
    f = pie_forward_new(m);
    pie_forward_token_from(f, fut, 0, -1);
    pie_forward_pages(f, pg, 1, 2);
    expect("chain at position -1", run(f), PIE_ERANGE);
    pie_future_free(fut);
    expect("wait after free", pie_future_wait(fut), PIE_EINVAL);
    expect("read after free", pie_forward_read_tokens(fut, &tok, 1),
           PIE_EINVAL);
    expect("free after free", pie_future_free(fut), PIE_EINVAL);
    expect("chain from a freed future",
           pie_forward_token_from(pie_forward_new(m), fut, 0, 1), PIE_EINVAL);
    int32_t sl = pie_sleep(1);
    expect("chain from a sleep",
           pie_forward_token_from(pie_forward_new(m), sl, 0, 1), PIE_EINVAL);
    expect("read a sleep", pie_forward_read_tokens(sl, &tok, 1), PIE_EINVAL);
    pie_future_free(sl);
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    fut = pie_forward_submit(f);
    f = pie_forward_new(m);
    pie_forward_token_from(f, fut, 0, 1);
    pie_forward_pages(f, pg, 1, 2);
    pie_future_free(fut);       /* cancels what f reads, unless it ran */
    int32_t rc = run(f);
    expect("chain from a future freed before submit",
           rc == PIE_ECANCELED || rc == 0, 1);
    f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    fut = pie_forward_submit(f);
    pie_future_cancel(fut);     /* no effect if it already ran */
    rc = pie_forward_read_tokens(fut, &tok, 1);
    expect("read a cancelled forward", rc == PIE_ECANCELED || rc == 1, 1);
    pie_future_free(fut);
}

/* Submits a forward of one token with one LOGITS row (kept by the
 * control layer until its future is freed); the future or the error. */
static int32_t logits_forward(void)
{
    int32_t f = one_token(pg, 1, 1);
    pie_forward_output(f, 0, PIE_PROBE_LOGITS, 1, 0, 1, 0, 0);
    return pie_forward_submit(f);
}

static int32_t code_of(int32_t fut) { return fut < 0 ? fut : 0; }

/* Submits a forward of one token with a mask of 4096 runs (the host's
 * copy kept until the future is freed) and one greedy row. */
static int32_t mask_forward(void)
{
    static uint32_t runs[4096];
    uint32_t indptr[2] = { 0, 4096 };
    runs[4095] = 1;                 /* runs alternate: the last (odd) one
                                       allows slot 0 */
    int32_t f = one_token(pg, 1, 1);
    pie_forward_mask(f, indptr, runs, 4096);
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    return pie_forward_submit(f);
}

static void inputs(bool hold)
{
    static int32_t futs[4096];
    int32_t n = 0, rc = 0, again = PIE_EINVAL;
    while (n < 4096 && (rc = mask_forward()) > 0) futs[n++] = rc;
    rc = code_of(rc);
    if (n >= 1) {
        pie_future_wait(futs[0]);            /* collected: room for one */
        pie_future_free(futs[0]);
        again = code_of(futs[0] = mask_forward());
    }
    char msg[128];
    int len = snprintf(msg, sizeof msg, "n %d rc %d again %d", n, rc, again);
    pie_send(msg, (uint32_t)len);
    if (hold) pie_future_wait(pie_receive());
}

static void copies(void)
{
    static int32_t pages[56], t[896], p[896];
    if (pie_kv_alloc(m, 56, pages) != 0) {
        pie_send("alloc failed", 12);
        return;
    }
    for (int32_t k = 0; k < 896; k++) t[k] = 1 + k % 100, p[k] = k;
    int32_t f = pie_forward_new(m);
    pie_forward_tokens(f, t, p, 896);
    pie_forward_pages(f, pages, 56, (uint32_t)ps);
    pie_forward_output(f, 895, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    int32_t fut = pie_forward_submit(f);
    int32_t n = 0, rc = 0, again = PIE_EINVAL;
    while (n < 200000 &&
           (rc = pie_kv_copy(m, pages[0], 0, pg[0], 0, 1)) == 0)
        n++;
    int32_t pending = pie_future_status(fut) == PIE_EAGAIN;
    if (fut > 0) pie_future_wait(fut);
    /* the queued copies drain, one a fire (each waits on the one before
     * on its destination): seconds on a loaded machine */
    for (int k = 0; k < 60000; k++) {
        if ((again = pie_kv_copy(m, pages[0], 0, pg[0], 0, 1)) != PIE_ELIMIT)
            break;
        int32_t sl = pie_sleep(1000000);
        pie_future_wait(sl);
        pie_future_free(sl);
    }
    if (fut > 0) pie_future_free(fut);
    char msg[128];
    int len = snprintf(msg, sizeof msg, "n %d rc %d again %d pending %d", n,
                       rc, again, pending);
    pie_send(msg, (uint32_t)len);
}

static void import_loop(void)
{
    int32_t n = 0, rc = 0, again = PIE_EINVAL, h[2], last[2] = { 0, 0 };
    while (n < 1000000 && (rc = pie_kv_import(m, "loop_x", 6, h, 2)) > 0) {
        last[0] = h[0];
        n++;
    }
    if (n >= 1) {
        pie_kv_free(m, last, 1);             /* one handle back: room */
        again = pie_kv_import(m, "loop_x", 6, h, 2);
    }
    char msg[128];
    int len = snprintf(msg, sizeof msg, "n %d rc %d again %d", n,
                       code_of(rc), again);
    pie_send(msg, (uint32_t)len);
}

static void outputs(bool hold)
{
    static int32_t futs[4096];
    int32_t n = 0, rc = 0;
    while (n < 4096 && (rc = logits_forward()) > 0) futs[n++] = rc;
    rc = code_of(rc);
    int32_t again = PIE_EINVAL, held = PIE_EINVAL, after = PIE_EINVAL;
    if (n >= 2) {
        pie_future_wait(futs[0]);            /* collected: room for one */
        pie_future_free(futs[0]);
        again = logits_forward();
        futs[0] = again > 0 ? again : 0;
        again = code_of(again);
        pie_future_wait(futs[1]);            /* a builder keeps its results */
        int32_t b = pie_forward_new(m);
        pie_forward_token_from(b, futs[1], 0, 1);
        pie_future_free(futs[1]);
        futs[1] = logits_forward();
        held = code_of(futs[1]);
        pie_forward_submit(b);               /* no pages: refused, dropped */
        if (futs[1] < 0) futs[1] = logits_forward();
        after = code_of(futs[1]);
    }
    char msg[128];
    int len = snprintf(msg, sizeof msg, "n %d rc %d again %d held %d after "
                       "%d", n, rc, again, held, after);
    pie_send(msg, (uint32_t)len);
    if (hold) pie_future_wait(pie_receive());
}

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    m = pie_model_open(0, 0);
    vocab = pie_model_vocab_size(m);
    ps = pie_model_page_size(m);
    if (m < 0 || pie_kv_alloc(m, 4, pg) != 0) return 3;
    if (strcmp(argv[1], "codes") == 0) {
        codes();
        if (!fails) pie_send("ok", 2);
        else pie_send(report, (uint32_t)len);
        return 0;
    }
    if (strcmp(argv[1], "mask_indptr") == 0 && argc > 2) {
        int32_t f = pie_forward_new(m), t[2] = { 1, 1 }, p[2] = { 0, 1 };
        pie_forward_tokens(f, t, p, 2);
        pie_forward_pages(f, pg, 1, 2);
        uint32_t ip[3] = { 0, (uint32_t)strtoul(argv[2], NULL, 10), 2 };
        uint32_t runs[2] = { 0, 1 };
        int32_t set = pie_forward_mask(f, ip, runs, 2);
        int32_t sub = run(f);
        f = one_token(pg, 1, 1);
        pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
        int32_t good = run(f);
        char msg[96];
        int n = snprintf(msg, sizeof msg, "set %d submit %d good %d", set, sub,
                         good);
        pie_send(msg, (uint32_t)n);
        return 0;
    }
    if (strcmp(argv[1], "cancel_running") == 0) {
        /* a forward of 896 tokens (about 140 ms on the CPU backend),
         * cancelled once it had 20 ms to start (5, then 1, if it was
         * already done), then read at once */
        static int32_t pages[56], t[896], p[896];
        if (pie_kv_alloc(m, 56, pages) != 0) return 4;
        for (int32_t k = 0; k < 896; k++) t[k] = 1 + k % 100, p[k] = k;
        const int64_t waits[3] = { 20000000, 5000000, 1000000 };
        int32_t st = 0, rd = 0, rv = 0, tok = -1;
        for (int k = 0; k < 3 && st == 0; k++) {
            int32_t f = pie_forward_new(m);
            pie_forward_tokens(f, t, p, 896);
            pie_forward_pages(f, pages, 56, (uint32_t)ps);
            pie_forward_output(f, 895, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
            int32_t fut = pie_forward_submit(f);
            int32_t sl = pie_sleep(waits[k]);
            pie_future_wait(sl);
            pie_future_free(sl);
            pie_future_cancel(fut);
            st = pie_future_status(fut);
            rd = pie_forward_read_tokens(fut, &tok, 1);
            rv = pie_forward_read_values(fut, 0, 0, 0, 0);
            pie_future_free(fut);
        }
        char msg[96];
        int n = snprintf(msg, sizeof msg, "status %d read %d values %d", st,
                         rd, rv);
        pie_send(msg, (uint32_t)n);
        return 0;
    }
    if (strcmp(argv[1], "outputs") == 0) {
        outputs(argc > 2 && strcmp(argv[2], "hold") == 0);
        return 0;
    }
    if (strcmp(argv[1], "inputs") == 0) {
        inputs(argc > 2 && strcmp(argv[2], "hold") == 0);
        return 0;
    }
    if (strcmp(argv[1], "copies") == 0) {
        copies();
        return 0;
    }
    if (strcmp(argv[1], "import_loop") == 0) {
        import_loop();
        return 0;
    }
    if (strcmp(argv[1], "import_quota") == 0) {
        int32_t imp[8];
        int32_t r = pie_kv_import(m, "quota_x", 7, imp, 8);
        char msg[64];
        int len = snprintf(msg, sizeof msg, "import %d", r);
        pie_send(msg, (uint32_t)len);
        return 0;
    }
    if (strcmp(argv[1], "import_badptr") == 0) {
        pie_kv_export(m, "hostile_imp", 11, pg, 1);
        pie_kv_import(m, "hostile_imp", 11, (int32_t *)BAD_PTR, 4);
        return 4;                                   /* not reached */
    }
    if (strcmp(argv[1], "export_badptr") == 0) {
        pie_kv_export(m, "hostile_exp", 11, (int32_t *)BAD_PTR, 4);
        return 4;
    }
    return 2;
}
