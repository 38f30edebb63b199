/*
 * test_sdk_mock.c — the C SDK (sdk/c) compiled natively against the
 * deterministic host stand-in of mock_host.c. Every generation is compared
 * with a reference computed directly from the token history (next token =
 * f(hash of every (token, position) attended)), so wrong pages, fills,
 * positions, chains, rollbacks after a cancel, forks or imports show up as
 * a different token.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mock_host.h"
/* CHECK_OK prints pie_err_msg(): here the SDK holds the message. */
#define pie_err_msg pie_sdk_error
#include "tests/test_util.h"

/* Reference: n greedy/random steps after hist[0..len) (all attended).
 * Stops after EOS when eos_stop. Returns the count. */
static int ref_gen(const int32_t *hist, int len, int n, int kind,
                   uint64_t seed, bool eos_stop, int32_t *out)
{
    int32_t *t = malloc(sizeof(int32_t) * (size_t)(len + n));
    int32_t *p = malloc(sizeof(int32_t) * (size_t)(len + n));
    memcpy(t, hist, sizeof(int32_t) * (size_t)len);
    for (int i = 0; i < len + n; i++) p[i] = i;
    int k = 0;
    for (; k < n; k++) {
        int32_t nx = mock_next(mock_hash(t, p, len + k), kind, seed + (uint64_t)k);
        out[k] = t[len + k] = nx;
        if (eos_stop && nx == 0) { k++; break; }
    }
    free(t);
    free(p);
    return k;
}

typedef struct sink { char buf[8192]; size_t len; } sink;

static void collect(void *user, const char *s, size_t n)
{
    sink *k = user;
    CHECK(k->len + n < sizeof k->buf, "stream overflow");
    memcpy(k->buf + k->len, s, n);
    k->len += n;
}

static void check_ids(const char *what, const int32_t *got, int ng,
                      const int32_t *want, int nw)
{
    CHECK(ng == nw, "%s: expected %d ids, got %d", what, nw, ng);
    for (int i = 0; i < nw; i++)
        CHECK(got[i] == want[i], "%s: expected id %d, got %d at step %d", what,
              want[i], got[i], i);
}

static void check_ctx_state(const pie_ctx *c)
{
    CHECK(c->n_kv == c->n_tokens - 1, "n_kv %d, n_tokens %d", c->n_kv,
          c->n_tokens);
    CHECK(c->kv_len == c->n_kv, "kv_len %d != n_kv %d", c->kv_len, c->n_kv);
    CHECK(c->n_pages == (c->kv_len + MOCK_PS - 1) / MOCK_PS,
          "%d pages for %d slots", c->n_pages, c->kv_len);
}

static void test_greedy(pie_lm *lm, int lookahead)
{
    pie_ctx c;
    pie_gen g;
    sink s = {0};
    int32_t want[64];
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "hello world", true));
    int nw = ref_gen(c.tokens, c.n_tokens, 30, PIE_SAMPLER_GREEDY, 0, false,
                     want);
    pie_gen_opts o = { .max_tokens = 30, .lookahead = lookahead,
                       .on_text = collect, .user = &s };
    int chained0 = mock.chained;
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("greedy", g.ids, g.n_ids, want, nw);
    CHECK(g.stop == PIE_STOP_MAX, "stop reason %d", g.stop);
    CHECK(s.len == g.text_len && !memcmp(s.buf, g.text, s.len),
          "streamed text differs from the result");
    for (int i = 0; i < nw; i++)
        CHECK(g.text[i] == (char)want[i], "text byte %d", i);
    if (lookahead > 1)
        CHECK(mock.chained > chained0, "no chained forwards at lookahead %d",
              lookahead);
    check_ctx_state(&c);
    /* continuing equals the reference continuation of the whole history */
    int32_t want2[64];
    int n2 = ref_gen(c.tokens, c.n_tokens, 9, PIE_SAMPLER_GREEDY, 0, false,
                     want2);
    pie_gen_free(&g);
    o.max_tokens = 9;
    o.on_text = NULL;
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("continued", g.ids, g.n_ids, want2, n2);
    pie_gen_free(&g);
    pie_ctx_release(&c);
}

static void test_eos(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    int32_t want[256];
    mock.eos_every = 11;
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "the eos test", true));
    int nw = ref_gen(c.tokens, c.n_tokens, 200, PIE_SAMPLER_GREEDY, 0, true,
                     want);
    CHECK(want[nw - 1] == 0, "reference never hit EOS; pick another prompt");
    int cancels0 = mock.cancels;
    pie_gen_opts o = { .max_tokens = 200, .lookahead = 8 };
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("eos", g.ids, g.n_ids, want, nw);
    CHECK(g.stop == PIE_STOP_EOS, "stop reason %d", g.stop);
    CHECK(g.text_len == (size_t)nw - 1, "EOS must not be in the text");
    CHECK(nw < 8 || mock.cancels > cancels0, "no queued step was cancelled");
    check_ctx_state(&c);
    pie_gen_free(&g);
    /* after the rollback the context continues correctly */
    int32_t want2[16];
    int n2 = ref_gen(c.tokens, c.n_tokens, 5, PIE_SAMPLER_GREEDY, 0, false,
                     want2);
    o = (pie_gen_opts){ .max_tokens = 5, .lookahead = 3, .ignore_eos = true };
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("after eos", g.ids, g.n_ids, want2, n2);
    pie_gen_free(&g);
    pie_ctx_release(&c);
    mock.eos_every = 0;
}

static void test_stop_string(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    sink s = {0};
    int32_t want[80];
    char text[81];
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "stop strings", true));
    int nw = ref_gen(c.tokens, c.n_tokens, 80, PIE_SAMPLER_GREEDY, 0, false,
                     want);
    for (int i = 0; i < nw; i++) text[i] = (char)want[i];
    text[nw] = 0;
    char stop[4];
    memcpy(stop, text + 30, 3);
    stop[3] = 0;
    const char *cut = strstr(text, stop);
    const char *stops[] = { "never-there", stop };
    pie_gen_opts o = { .max_tokens = 80, .lookahead = 4, .stop = stops,
                       .n_stop = 2, .on_text = collect, .user = &s };
    CHECK_OK(pie_generate(&c, &o, &g));
    CHECK(g.stop == PIE_STOP_STRING, "stop reason %d", g.stop);
    CHECK(g.text_len == (size_t)(cut - text) && !memcmp(g.text, text, g.text_len),
          "expected text cut at %d, got %zu bytes", (int)(cut - text),
          g.text_len);
    CHECK(s.len == g.text_len && !memcmp(s.buf, g.text, s.len),
          "streamed %zu bytes, result %zu", s.len, g.text_len);
    pie_gen_free(&g);
    pie_ctx_release(&c);
}

static void test_fork(pie_lm *lm)
{
    pie_ctx a, b;
    pie_gen ga, gb;
    int32_t wa[32], wb[32];
    pie_ctx_init(&a, lm);
    CHECK_OK(pie_ctx_fill(&a, "fork me: ", true));   /* 10 tokens */
    CHECK_OK(pie_ctx_fork(&a, &b));
    int copies0 = mock.copies, allocs0 = mock.allocs;
    CHECK(b.n_pages == a.n_pages && !memcmp(a.pages, b.pages,
          sizeof(int32_t) * (size_t)a.n_pages), "fork must share pages");
    CHECK_OK(pie_ctx_fill(&a, "x", false));
    CHECK_OK(pie_ctx_fill(&b, "y", false));
    int na = ref_gen(a.tokens, a.n_tokens, 20, PIE_SAMPLER_GREEDY, 0, false, wa);
    int nb = ref_gen(b.tokens, b.n_tokens, 20, PIE_SAMPLER_GREEDY, 0, false, wb);
    pie_gen_opts o = { .max_tokens = 20 };
    CHECK_OK(pie_generate(&a, &o, &ga));
    CHECK_OK(pie_generate(&b, &o, &gb));
    check_ids("fork a", ga.ids, ga.n_ids, wa, na);
    check_ids("fork b", gb.ids, gb.n_ids, wb, nb);
    CHECK(mock.copies == copies0 + 1, "expected 1 page copy, got %d",
          mock.copies - copies0);
    CHECK(a.pages[0] == b.pages[0], "full pages must stay shared");
    (void)allocs0;
    pie_gen_free(&ga);
    pie_gen_free(&gb);
    pie_ctx_release(&a);
    pie_ctx_release(&b);
}

static void test_export_import(pie_lm *lm)
{
    pie_ctx a, b;
    pie_gen g;
    int32_t w[32];
    pie_ctx_init(&a, lm);
    CHECK_OK(pie_ctx_fill(&a, "shared prefix", true));
    CHECK_OK(pie_ctx_export(&a, "pfx"));
    CHECK_OK(pie_ctx_import(&b, lm, "pfx", a.tokens, a.n_tokens, a.n_kv));
    CHECK(b.n_kv == a.n_kv && b.n_tokens == a.n_tokens, "import state");
    CHECK(pie_ctx_import(&(pie_ctx){0}, lm, "nope", a.tokens, 1, 0) ==
          PIE_ENOTFOUND, "importing a missing name must fail");
    int n = ref_gen(b.tokens, b.n_tokens, 12, PIE_SAMPLER_GREEDY, 0, false, w);
    pie_gen_opts o = { .max_tokens = 12, .lookahead = 4 };
    CHECK_OK(pie_generate(&b, &o, &g));
    check_ids("imported", g.ids, g.n_ids, w, n);
    pie_gen_free(&g);
    /* the exporter's partial page is read-only now: it must copy */
    n = ref_gen(a.tokens, a.n_tokens, 12, PIE_SAMPLER_GREEDY, 0, false, w);
    CHECK_OK(pie_generate(&a, &o, &g));
    check_ids("exporter", g.ids, g.n_ids, w, n);
    pie_gen_free(&g);
    CHECK(pie_kv_unexport(lm->h, "pfx", 3) == 0, "unexport");
    pie_ctx_release(&a);
    pie_ctx_release(&b);
}

static void test_concurrent(pie_lm *lm)
{
    enum { N = 5 };
    pie_ctx c[N];
    pie_gen g[N];
    int32_t w[N][40];
    int nw[N];
    for (int i = 0; i < N; i++) {
        char p[32];
        snprintf(p, sizeof p, "prompt number %d%s", i, i & 1 ? "!!" : "");
        pie_ctx_init(&c[i], lm);
        CHECK_OK(pie_ctx_fill(&c[i], p, true));
        nw[i] = ref_gen(c[i].tokens, c[i].n_tokens, 10 + 5 * i,
                        PIE_SAMPLER_RANDOM, 100 + (uint64_t)i, false, w[i]);
        pie_gen_opts o = { .s = { .temperature = 0.8f, .seed = 100 + (uint64_t)i },
                           .max_tokens = 10 + 5 * i, .lookahead = 1 + i };
        CHECK_OK(pie_gen_start(&g[i], &c[i], &o));
    }
    CHECK_OK(pie_gen_run(g, N));
    for (int i = 0; i < N; i++) {
        char what[32];
        snprintf(what, sizeof what, "concurrent %d", i);
        check_ids(what, g[i].ids, g[i].n_ids, w[i], nw[i]);
        pie_gen_free(&g[i]);
        pie_ctx_release(&c[i]);
    }
}

/* The pool is short once: with steps queued the generation goes on and
 * is still correct; with nothing queued it ends with the error. PIE_ENOMEM
 * (waiting cannot help) ends it at once, queued steps or not. */
static void test_alloc_failure(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    int32_t w[40];
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "pool", true));            /* 5 tokens */
    int n = ref_gen(c.tokens, c.n_tokens, 30, PIE_SAMPLER_GREEDY, 0, false, w);
    mock.fail_alloc_at = mock.alloc_calls + 2;          /* the 2nd page */
    pie_gen_opts o = { .max_tokens = 30, .lookahead = 4 };
    CHECK_OK(pie_generate(&c, &o, &g));
    CHECK(mock.alloc_calls >= mock.fail_alloc_at, "the failure was not hit");
    check_ids("after a transient pool failure", g.ids, g.n_ids, w, n);
    CHECK(g.stop == PIE_STOP_MAX, "stop %d", g.stop);
    pie_gen_free(&g);
    mock.fail_alloc_at = mock.alloc_calls + 1;          /* next page */
    o = (pie_gen_opts){ .max_tokens = 30, .lookahead = 1 };
    int rc = pie_generate(&c, &o, &g);
    CHECK(rc == PIE_EBUSY && g.stop == PIE_STOP_ERROR,
          "pool failure with nothing queued: rc %d stop %d", rc, g.stop);
    CHECK(g.n_ids < 30, "generation must stop at the failure");
    check_ctx_state(&c);
    pie_gen_free(&g);
    int calls = mock.alloc_calls;
    mock.fail_alloc_at = calls + 2;
    mock.fail_alloc_rc = PIE_ENOMEM;
    o = (pie_gen_opts){ .max_tokens = 30, .lookahead = 4 };
    rc = pie_generate(&c, &o, &g);
    CHECK(rc == PIE_ENOMEM && g.stop == PIE_STOP_ERROR,
          "PIE_ENOMEM with steps queued: rc %d stop %d", rc, g.stop);
    CHECK(mock.alloc_calls == mock.fail_alloc_at, "retried after PIE_ENOMEM: "
          "%d kv_alloc calls, expected %d", mock.alloc_calls - calls,
          mock.fail_alloc_at - calls);
    CHECK(strstr(pie_sdk_error(), "waiting cannot help") != NULL,
          "message: %s", pie_sdk_error());
    check_ctx_state(&c);
    printf("alloc failure: PIE_ENOMEM ends the generation at once: %s\n",
           pie_sdk_error());
    pie_gen_free(&g);
    mock.fail_alloc_at = 0;
    mock.fail_alloc_rc = 0;
    pie_ctx_release(&c);
}

static int live_futures(void)
{
    int live = 0;
    for (int i = 0; i < MOCK_MAX_FWD; i++) live += mock.fwd[i].used;
    return live;
}

/* A failure while adding a token (here the host returns an id outside the
 * vocabulary, so pie_ctx_fill_ids refuses it) ends the generation at once:
 * error recorded, stop = PIE_STOP_ERROR, queued futures cancelled and
 * freed, the context rolled back to the ids kept (the bad token is in
 * neither), and no forward submitted after the failure. */
static void test_gen_error(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    int32_t want[64];
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "hello", true));            /* 6 tokens */
    int p0 = c.n_tokens;
    pie_gen_opts o = { .max_tokens = 200, .lookahead = 4, .ignore_eos = true };
    /* pie_gen_step: the first token is bad */
    mock.bad_tok_at = mock.read_calls + 1;
    CHECK_OK(pie_gen_start(&g, &c, &o));
    int rc = pie_gen_step(&g);
    CHECK(rc == PIE_ERANGE, "step: expected PIE_ERANGE, got %d", rc);
    CHECK(g.stop == PIE_STOP_ERROR && g.err == rc,
          "step: after the error stop %d err %d", g.stop, g.err);
    CHECK(g.nq == 0 && live_futures() == 0,
          "step: %d futures queued, %d live after the error", g.nq,
          live_futures());
    CHECK(g.n_ids == 0 && c.n_tokens == p0, "step: %d ids, %d tokens (want "
          "0, %d)", g.n_ids, c.n_tokens, p0);
    check_ctx_state(&c);
    int submits = mock.submits;
    CHECK(pie_gen_step(&g) == rc && mock.submits == submits,
          "a failed generation must stay stopped");
    pie_gen_free(&g);
    printf("gen error: pie_gen_step stops at once: %s\n", pie_sdk_error());

    /* pie_gen_run: the third token is bad; two are kept */
    int n = ref_gen(c.tokens, c.n_tokens, 2, PIE_SAMPLER_GREEDY, 0, false,
                    want);
    mock.bad_tok_at = mock.read_calls + 3;
    submits = mock.submits;
    rc = pie_generate(&c, &o, &g);
    CHECK(rc == PIE_ERANGE && g.stop == PIE_STOP_ERROR && g.err == rc,
          "run: rc %d stop %d err %d", rc, g.stop, g.err);
    check_ids("run until the error", g.ids, g.n_ids, want, n);
    CHECK(c.n_tokens == p0 + 2, "run: history %d tokens, expected %d",
          c.n_tokens, p0 + 2);
    CHECK(mock.submits - submits <= 3 + o.lookahead,
          "run: %d forwards submitted for 3 tokens at lookahead %d",
          mock.submits - submits, o.lookahead);
    CHECK(g.nq == 0 && live_futures() == 0, "run: %d live futures",
          live_futures());
    check_ctx_state(&c);
    pie_gen_free(&g);
    mock.bad_tok_at = 0;
    /* the context continues as the reference of its history */
    n = ref_gen(c.tokens, c.n_tokens, 10, PIE_SAMPLER_GREEDY, 0, false, want);
    o.max_tokens = 10;
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("after the error", g.ids, g.n_ids, want, n);
    pie_gen_free(&g);

    /* a detokenizer failure (after the token was added) stops it too */
    mock.fail_detok_at = mock.detok_calls + 5;
    p0 = c.n_tokens;
    o.max_tokens = 200;
    rc = pie_generate(&c, &o, &g);
    CHECK(rc == PIE_EINVAL && g.stop == PIE_STOP_ERROR,
          "detokenize failure: rc %d stop %d", rc, g.stop);
    CHECK(g.n_ids < 10 && c.n_tokens == p0 + g.n_ids,
          "detokenize failure: %d ids, history %d (from %d)", g.n_ids,
          c.n_tokens, p0);
    CHECK(live_futures() == 0, "%d live futures", live_futures());
    check_ctx_state(&c);
    pie_gen_free(&g);
    mock.fail_detok_at = 0;
    pie_ctx_release(&c);
}

/* A fast host: the steps queued past EOS completed before the cancel. The
 * rollback still leaves the last token pending, so the context continues. */
static void test_eos_eager(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    int32_t want[256];
    mock.eos_every = 11;
    mock.eager = 1;
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "the eos test", true));
    int nw = ref_gen(c.tokens, c.n_tokens, 200, PIE_SAMPLER_GREEDY, 0, true,
                     want);
    pie_gen_opts o = { .max_tokens = 200, .lookahead = 8 };
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("eos, eager host", g.ids, g.n_ids, want, nw);
    CHECK(g.stop == PIE_STOP_EOS, "stop reason %d", g.stop);
    check_ctx_state(&c);
    pie_gen_free(&g);
    nw = ref_gen(c.tokens, c.n_tokens, 5, PIE_SAMPLER_GREEDY, 0, false, want);
    o = (pie_gen_opts){ .max_tokens = 5, .lookahead = 3, .ignore_eos = true };
    CHECK_OK(pie_generate(&c, &o, &g));
    check_ids("after eos, eager host", g.ids, g.n_ids, want, nw);
    pie_gen_free(&g);
    pie_ctx_release(&c);
    mock.eos_every = 0;
    mock.eager = 0;
}

/* Sampling parameters out of range are refused by pie_gen_start, before
 * anything is submitted; the boundaries and defaults are accepted. */
static void test_sampling_range(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "range", true));
    struct { const char *what, *param; pie_sampling s; } bad[] = {
        { "temperature NaN", "temperature", { .temperature = NAN } },
        { "temperature -0.5", "temperature", { .temperature = -0.5f } },
        { "temperature inf", "temperature", { .temperature = INFINITY } },
        { "top_k -1", "top_k", { .temperature = 1, .top_k = -1 } },
        { "top_p 1.5", "top_p", { .temperature = 1, .top_p = 1.5f } },
        { "top_p -0.1", "top_p", { .temperature = 1, .top_p = -0.1f } },
        { "top_p NaN", "top_p", { .temperature = 1, .top_p = NAN } },
        { "min_p 1.5", "min_p", { .temperature = 1, .min_p = 1.5f } },
        { "min_p -0.1", "min_p", { .temperature = 1, .min_p = -0.1f } },
        { "min_p NaN", "min_p", { .temperature = 1, .min_p = NAN } },
    };
    int submits = mock.submits;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pie_gen_opts o = { .s = bad[i].s, .max_tokens = 3 };
        int rc = pie_gen_start(&g, &c, &o);
        CHECK(rc == PIE_EINVAL, "%s: expected PIE_EINVAL, got %d", bad[i].what,
              rc);
        CHECK(strstr(pie_sdk_error(), bad[i].param) != NULL,
              "%s: message does not name %s: %s", bad[i].what, bad[i].param,
              pie_sdk_error());
        CHECK(g.stop == PIE_STOP_ERROR && g.err == rc, "%s: stop %d err %d",
              bad[i].what, g.stop, g.err);
        CHECK(pie_gen_run(&g, 1) == rc, "%s: pie_gen_run after a failed "
              "start must report it", bad[i].what);
        rc = pie_generate(&c, &o, &g);
        CHECK(rc == PIE_EINVAL, "%s: pie_generate gave %d", bad[i].what, rc);
        pie_gen_free(&g);
    }
    CHECK(mock.submits == submits, "%d forwards submitted with bad sampling",
          mock.submits - submits);
    printf("sampling range: refused, e.g. %s\n", pie_sdk_error());
    pie_sampling good[] = {
        { .temperature = 0 }, { .temperature = 1, .top_p = 1, .min_p = 1 },
        { .temperature = 0.5f, .top_k = 0, .top_p = 0.5f, .min_p = 0 },
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        pie_gen_opts o = { .s = good[i], .max_tokens = 3 };
        CHECK_OK(pie_generate(&c, &o, &g));
        CHECK(g.n_ids == 3, "good sampling %zu: %d ids", i, g.n_ids);
        pie_gen_free(&g);
    }
    pie_ctx_release(&c);
}

/* Sizes that would overflow are refused (the wasm32 cases can't be built
 * natively; these are the ones a 64-bit host shares). */
static void test_overflow(pie_lm *lm)
{
    pie_ctx c;
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "ab", false));
    /* a history at the int32 limit: appending must fail, not wrap */
    int32_t n0 = c.n_tokens, cap0 = c.cap_tokens;
    c.n_tokens = c.cap_tokens = INT32_MAX - 1;
    int32_t two[2] = { 'x', 'y' };
    int rc = pie_ctx_fill_ids(&c, two, 2);
    CHECK(rc == PIE_ENOMEM, "fill past INT32_MAX tokens: rc %d", rc);
    CHECK(c.n_tokens == INT32_MAX - 1, "history changed: %d", c.n_tokens);
    printf("overflow: %s\n", pie_sdk_error());
    c.n_tokens = n0;
    c.cap_tokens = cap0;
    char *t = NULL;
    CHECK(pie_lm_decode(lm, two, -1, true, &t) == PIE_EINVAL && !t,
          "decode of -1 ids must fail");
    pie_ctx_release(&c);
    /* a model reporting no vocabulary is refused and its handle closed */
    pie_lm bad;
    int open0 = mock.models_open;
    mock.bad_model = 1;
    rc = pie_lm_open(&bad, NULL);
    mock.bad_model = 0;
    CHECK(rc == PIE_EINVAL, "vocab 0 accepted (rc %d)", rc);
    CHECK(mock.models_open == open0, "pie_lm_open leaked the model handle "
          "(%d open, %d before)", mock.models_open, open0);
}

static void test_drop_page(pie_lm *lm)
{
    pie_ctx c;
    pie_gen g;
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "a sink and a window", true)); /* 20 tokens */
    CHECK_OK(pie_ctx_flush(&c));                              /* 19 in KV */
    CHECK_OK(pie_ctx_drop_page(&c, 1));
    CHECK(pie_ctx_drop_page(&c, c.n_pages - 1) == PIE_ERANGE,
          "dropping the last page must fail");
    CHECK(c.kv_len == 19 - MOCK_PS && c.n_pages == 4, "kv_len %d pages %d",
          c.kv_len, c.n_pages);
    /* reference: slots of page 1 (tokens 4..7) are no longer attended */
    int32_t t[32], p[32];
    int n = 0;
    for (int i = 0; i < c.n_tokens; i++)
        if (i < MOCK_PS || i >= 2 * MOCK_PS) { t[n] = c.tokens[i]; p[n++] = i; }
    int32_t want = mock_next(mock_hash(t, p, n), PIE_SAMPLER_GREEDY, 0);
    pie_gen_opts o = { .max_tokens = 1 };
    CHECK_OK(pie_generate(&c, &o, &g));
    CHECK(g.n_ids == 1 && g.ids[0] == want, "after drop: expected %d, got %d",
          want, g.ids[0]);
    pie_gen_free(&g);
    pie_ctx_release(&c);
}

static void test_topk(pie_lm *lm)
{
    pie_ctx c;
    float pr[4];
    int32_t ids[4];
    pie_ctx_init(&c, lm);
    CHECK_OK(pie_ctx_fill(&c, "top k", true));
    int32_t h = (int32_t)mock_hash(c.tokens, (int32_t[]){0, 1, 2, 3, 4, 5}, 6);
    CHECK(pie_ctx_next_topk(&c, 4, pr, ids) == 4, "topk count");
    CHECK(ids[0] == 'a' + (int32_t)((uint32_t)h % 26), "top-1 id %d", ids[0]);
    CHECK(c.n_kv == c.n_tokens, "top-k forwards every pending token");
    pie_ctx_release(&c);
}

static void test_chat_and_args(pie_lm *lm)
{
    char *p = pie_chat_prompt(PIE_CHAT_LLAMA3, "S", "U");
    CHECK(!strcmp(p, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>"
                     "\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
                     "\n\nU<|eot_id|><|start_header_id|>assistant"
                     "<|end_header_id|>\n\n"), "llama3 template: %s", p);
    free(p);
    p = pie_chat_prompt(PIE_CHAT_CHATML, NULL, "U");
    CHECK(!strcmp(p, "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"),
          "chatml template: %s", p);
    free(p);
    p = pie_chat_prompt(PIE_CHAT_NONE, "ignored", "Once upon a time");
    CHECK(!strcmp(p, "Once upon a time"), "plain prompt: %s", p);
    free(p);
    CHECK(pie_chat_detect(lm) == PIE_CHAT_NONE, "mock has no chat tokens");
    CHECK(pie_chat_parse("chatml") == PIE_CHAT_CHATML && pie_chat_parse("x") < 0,
          "chat names");

    const char *s = NULL;
    int32_t n = 5;
    float f = 1;
    bool b = false;
    uint64_t u = 0;
    const pie_arg a[] = { { "prompt", PIE_ARG_STR, &s, "" },
                          { "max-tokens", PIE_ARG_INT, &n, "" },
                          { "temperature", PIE_ARG_FLOAT, &f, "" },
                          { "seed", PIE_ARG_U64, &u, "" },
                          { "json", PIE_ARG_FLAG, &b, "" }, { 0 } };
    char *ok[] = { "x", "--prompt", "hi there", "--max-tokens=40", "--json",
                   "--temperature", "0", "--seed", "9" };
    CHECK(pie_args_parse(9, ok, a, NULL) == 0, "good args");
    CHECK(!strcmp(s, "hi there") && n == 40 && f == 0 && b && u == 9,
          "parsed values");
    char *bad1[] = { "x", "--max-tokens", "4x" };
    char *bad2[] = { "x", "--nope" };
    char *bad3[] = { "x", "--prompt" };
    char *bad4[] = { "x", "--seed", "-1" };
    CHECK(pie_args_parse(3, bad1, a, NULL) < 0, "bad int accepted");
    CHECK(pie_args_parse(2, bad2, a, NULL) < 0, "unknown option accepted");
    CHECK(pie_args_parse(2, bad3, a, NULL) < 0, "missing value accepted");
    CHECK(pie_args_parse(3, bad4, a, NULL) < 0, "negative u64 accepted");

    /* flags with a value: parsed, not taken as "on" */
    struct { const char *arg; bool want; } flags[] = {
        { "--json=false", false }, { "--json=true", true },
        { "--json=0", false },     { "--json=1", true },
        { "--json=no", false },    { "--json=yes", true },
        { "--json=off", false },   { "--json=FALSE", false },
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        char *av[] = { "x", (char *)flags[i].arg };
        b = !flags[i].want;
        CHECK(pie_args_parse(2, av, a, NULL) == 0, "%s refused", flags[i].arg);
        CHECK(b == flags[i].want, "%s set the flag %s", flags[i].arg,
              b ? "on" : "off");
    }
    const char *bad_flags[] = { "--json=maybe", "--json=", "--json=2" };
    for (size_t i = 0; i < sizeof bad_flags / sizeof bad_flags[0]; i++) {
        char *av[] = { "x", (char *)bad_flags[i] };
        b = false;
        CHECK(pie_args_parse(2, av, a, NULL) < 0, "%s accepted", bad_flags[i]);
        CHECK(!b, "%s turned the flag on", bad_flags[i]);
    }
    /* numbers: no leading space (strtoull would skip it, then wrap " -1"),
     * no sign on unsigned, finite floats */
    const char *bad_nums[][2] = {
        { "--seed", " -1" }, { "--seed", " 5" }, { "--seed", "+5" },
        { "--seed", "" },    { "--max-tokens", " 5" }, { "--max-tokens", "" },
        { "--temperature", "nan" }, { "--temperature", "inf" },
        { "--temperature", " 1" },
    };
    for (size_t i = 0; i < sizeof bad_nums / sizeof bad_nums[0]; i++) {
        char *av[] = { "x", (char *)bad_nums[i][0], (char *)bad_nums[i][1] };
        u = 77;
        CHECK(pie_args_parse(3, av, a, NULL) < 0, "%s '%s' accepted (seed now "
              "%llu)", bad_nums[i][0], bad_nums[i][1], (unsigned long long)u);
    }
    char *big[] = { "x", "--seed=18446744073709551615", "--max-tokens=-7" };
    CHECK(pie_args_parse(3, big, a, NULL) == 0 && u == UINT64_MAX && n == -7,
          "good numbers: seed %llu max-tokens %d", (unsigned long long)u, n);
}

int main(void)
{
    pie_lm lm;
    CHECK_OK(pie_lm_open(&lm, NULL));
    CHECK(lm.page_size == MOCK_PS && lm.n_eos == 1 && lm.eos[0] == 0, "facts");
    test_greedy(&lm, 1);
    test_greedy(&lm, 4);
    test_greedy(&lm, 16);
    test_eos(&lm);
    test_stop_string(&lm);
    test_fork(&lm);
    test_export_import(&lm);
    test_concurrent(&lm);
    test_alloc_failure(&lm);
    test_gen_error(&lm);
    test_eos_eager(&lm);
    test_sampling_range(&lm);
    test_overflow(&lm);
    test_drop_page(&lm);
    test_topk(&lm);
    test_chat_and_args(&lm);
    CHECK(mock.pages_live == 0, "%d pages leaked", mock.pages_live);
    CHECK(live_futures() == 0, "%d future handles leaked", live_futures());
    TEST_DONE();
}
