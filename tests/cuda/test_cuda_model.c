/*
 * test_cuda_model.c — the CUDA backend on whole models:
 *   - logits of every prompt position against ../shared/models/X/
 *     reference.json (Hugging Face transformers, f32): the full last-position
 *     vector (relative L2 error, bf16 tolerance), top-1 ids wherever the
 *     reference's top-1/top-2 gap exceeds the measured error, logsumexp
 *   - greedy continuations against the reference greedy ids (exact while the
 *     reference gap exceeds twice the measured logit error; the steps
 *     compared are printed)
 *   - batched (two requests, shuffled pages) vs single, an explicit mask vs
 *     the equivalent shorter sequence, page download/upload and copy_slots,
 *     device samplers vs pie_sample_row on the same logits, the CPU backend
 *   - bad batches return errors and change nothing
 *   - steady decode batches replay CUDA graphs with the same logits as
 *     direct kernel launches
 *   - decode batches on pie's own matmuls (gemv.cu, wgmm.cu) against
 *     cuBLASLt
 *   - batch-1 decode as one kernel (mega.cu) against the kernel-per-
 *     operation path, over several attention splits (also on the
 *     PIE_CUDA_HF_DIRS models: the Llama-3.2-1B and 3.1-8B shapes)
 * Skips (77) without a GPU or without ../shared.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "common/pie_err.h"
#include "model/model.h"
#include "tests/test_util.h"

#define MAXP 512
#define MAXR 32     /* requests a forward of this test may hold */

typedef struct seq {
    int32_t pages[MAXP];
    int     np, len;
} seq;

static int next_page, n_pool;
static int32_t perm[4096];

static void pages_reset(int n, int shuffle)
{
    n_pool = n;
    next_page = 0;
    for (int i = 0; i < n; i++) perm[i] = i;
    uint64_t r = 99;
    if (shuffle)
        for (int i = n - 1; i > 0; i--) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            int j = (int)((r >> 33) % (uint64_t)(i + 1)), t = perm[i];
            perm[i] = perm[j]; perm[j] = t;
        }
}

static void seq_grow(seq *s, int add, int ps)
{
    s->len += add;
    while (s->np * ps < s->len) {
        CHECK(next_page < n_pool, "test ran out of pages");
        s->pages[s->np++] = perm[next_page++];
    }
}

/* One forward over n requests; toks/npos per request; outputs given by
 * (request, index within its new tokens) pairs; returns rc. */
typedef struct req_in {
    seq           *s;
    const int32_t *tok;
    const int32_t *pos;       /* NULL = s->len .. */
    int            n;
} req_in;

static int forward(pie_backend *b, req_in *r, int nr, const int32_t *out_tok,
                   const pie_sampler *smp, int n_out, const uint32_t *mind,
                   const uint32_t *mruns, const uint32_t *lmind,
                   const uint32_t *lmruns, pie_forward_out *out)
{
    int ps = b->page_size, nt = 0, np = 0;
    CHECK(nr <= MAXR, "the test's forward holds at most %d requests", MAXR);
    for (int i = 0; i < nr; i++) nt += r[i].n;
    int32_t *tok = malloc(4 * (nt + 1)), *pos = malloc(4 * (nt + 1));
    int32_t qo[MAXR + 1], kvi[MAXR + 1], last[MAXR], *pg = malloc(4 * MAXR * MAXP);
    qo[0] = kvi[0] = 0;
    int t = 0;
    for (int i = 0; i < nr; i++) {
        int start = r[i].s->len;
        seq_grow(r[i].s, r[i].n, ps);
        for (int k = 0; k < r[i].n; k++, t++) {
            tok[t] = r[i].tok[k];
            pos[t] = r[i].pos ? r[i].pos[k] : start + k;
        }
        qo[i + 1] = t;
        for (int k = 0; k < r[i].s->np; k++) pg[np++] = r[i].s->pages[k];
        kvi[i + 1] = np;
        last[i] = r[i].s->len - (r[i].s->np - 1) * ps;
    }
    pie_forward_batch fb = { nt, nr, tok, pos, qo, pg, kvi, last, mind, mruns,
                             n_out, out_tok, smp, lmind, lmruns };
    int rc = pie_forward_out_alloc(&fb, b->cfg->vocab_size, out);
    if (!rc) rc = pie_backend_forward(b, &fb, out);
    if (rc) {   /* roll back the sequence lengths */
        for (int i = 0; i < nr; i++) r[i].s->len -= r[i].n;
    }
    free(tok); free(pos); free(pg);
    return rc;
}

/* ------------------------------------------------------------ reference */

static int b64val(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

static float *b64_floats(const char *s, int *n)
{
    size_t len = strlen(s), k = 0;
    uint8_t *buf = malloc(len);
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64val(s[i]);
        if (v < 0) continue;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            buf[k++] = (uint8_t)(acc >> bits);
        }
    }
    *n = (int)(k / 4);
    return (float *)buf;
}

static int32_t *json_ints(json_t *a, int *n)
{
    *n = (int)json_array_size(a);
    int32_t *v = malloc(4 * (*n + 1));
    for (int i = 0; i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return v;
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

static double lse(const float *x, int n)
{
    float m = x[argmax(x, n)];
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)x[i] - m);
    return m + log(s);
}

/* Relative L2 distance of a from the reference b. */
static double rel_l2(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den + 1e-30));
}

static double maxdiff(const float *a, const float *b, int n)
{
    double m = 0;
    for (int i = 0; i < n; i++) if (fabs(a[i] - b[i]) > m) m = fabs(a[i] - b[i]);
    return m;
}

static double rel_tol = 2e-2;   /* bf16: METHOD.md's 1e-3..1e-2, doubled */

/* Prefill + greedy check of one prompt; returns the max abs error of the
 * last logits. */
static double check_prompt(pie_backend *b, json_t *p, const char *name, int pi)
{
    int V = b->cfg->vocab_size, n, ng, nl;
    int32_t *ids = json_ints(json_object_get(p, "input_ids"), &n);
    int32_t *greedy = json_ints(json_object_get(p, "greedy_ids"), &ng);
    float *ref_last = b64_floats(json_string_value(json_object_get(p, "last_logits_f32_b64")), &nl);
    CHECK(nl == V, "%s: reference has %d logits, model vocab %d", name, nl, V);
    json_t *top5 = json_object_get(p, "top5_ids"), *top5l = json_object_get(p, "top5_logits");
    json_t *lsej = json_object_get(p, "logsumexp"), *gaps = json_object_get(p, "greedy_top2_gap");
    seq s = { .np = 0, .len = 0 };
    pie_sampler *smp = calloc((size_t)n, sizeof *smp);
    int32_t *ot = malloc(4 * n);
    for (int i = 0; i < n; i++) { smp[i].kind = PIE_PROBE_LOGITS; ot[i] = i; }
    req_in r = { &s, ids, NULL, n };
    pie_forward_out out;
    CHECK_OK(forward(b, &r, 1, ot, smp, n, NULL, NULL, NULL, NULL, &out));
    /* last position: full vector */
    const float *last = out.values + out.value_indptr[n - 1];
    double rel = rel_l2(last, ref_last, V), maxerr = maxdiff(last, ref_last, V);
    CHECK(rel <= rel_tol, "%s prompt %d: last logits rel L2 error %.3g > %.3g "
          "(max abs %.3g)", name, pi, rel, rel_tol, maxerr);
    /* every position: top-1 where separated, logsumexp */
    int top_checked = 0;
    double lse_err = 0;
    for (int i = 0; i < n; i++) {
        const float *row = out.values + out.value_indptr[i];
        int rt = (int)json_integer_value(json_array_get(json_array_get(top5, i), 0));
        double g = json_real_value(json_array_get(json_array_get(top5l, i), 0)) -
                   json_real_value(json_array_get(json_array_get(top5l, i), 1));
        if (g > 2 * maxerr + 1e-3) {
            CHECK(argmax(row, V) == rt, "%s prompt %d pos %d: top-1 %d, "
                  "reference %d (gap %.3g)", name, pi, i, argmax(row, V), rt, g);
            top_checked++;
        }
        double d = fabs(lse(row, V) - json_real_value(json_array_get(lsej, i)));
        if (d > lse_err) lse_err = d;
    }
    CHECK(lse_err <= 4 * maxerr + 1e-3, "%s prompt %d: logsumexp error %.3g "
          "exceeds 4x the logit error %.3g", name, pi, lse_err, maxerr);
    int last_top = argmax(last, V);
    pie_forward_out_free(&out);
    /* greedy continuation */
    double gap_tol = 2 * maxerr > 0.02 ? 2 * maxerr : 0.02;
    int32_t cur = greedy[0];
    pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
    int32_t zero = 0;
    int compared = 0;
    /* The token after the prompt comes from the prefill's last logits. */
    if (json_real_value(json_array_get(gaps, 0)) > gap_tol) {
        CHECK(last_top == greedy[0], "%s prompt %d greedy step 0: %d, "
              "reference %d", name, pi, last_top, greedy[0]);
        compared++;
        for (int k = 1; k < ng; k++) {
            req_in rr = { &s, &cur, NULL, 1 };
            CHECK_OK(forward(b, &rr, 1, &zero, &g, 1, NULL, NULL, NULL, NULL, &out));
            int32_t got = out.tokens[0];
            pie_forward_out_free(&out);
            if (json_real_value(json_array_get(gaps, k)) <= gap_tol) break;
            CHECK(got == greedy[k], "%s prompt %d greedy step %d: %d, "
                  "reference %d (gap %.3g)", name, pi, k, got, greedy[k],
                  json_real_value(json_array_get(gaps, k)));
            compared++;
            cur = got;
        }
    }
    printf("%s prompt %d: %d tokens, last logits rel L2 %.2e max abs %.3g, "
           "top-1 checked at %d/%d positions, lse err %.3g, greedy exact for "
           "%d/%d steps (gap tol %.3g)\n", name, pi, n, rel, maxerr, top_checked,
           n, lse_err, compared, ng, gap_tol);
    free(ids); free(greedy); free(ref_last); free(smp); free(ot);
    return maxerr;
}

/* Last logits of prompt ids run alone (fresh sequence). */
static float *last_logits(pie_backend *b, const int32_t *ids, int n, seq *s)
{
    int V = b->cfg->vocab_size;
    pie_sampler lp = { .kind = PIE_PROBE_LOGITS };
    int32_t o = n - 1;
    req_in r = { s, ids, NULL, n };
    pie_forward_out out;
    CHECK_OK(forward(b, &r, 1, &o, &lp, 1, NULL, NULL, NULL, NULL, &out));
    float *v = malloc(4 * (size_t)V);
    memcpy(v, out.values, 4 * (size_t)V);
    pie_forward_out_free(&out);
    return v;
}

/* Two prompts batched (pages shuffled) vs each alone. */
static void check_batched(pie_backend *b, json_t *prompts, const char *name)
{
    int V = b->cfg->vocab_size, n0, n1;
    int32_t *a = json_ints(json_object_get(json_array_get(prompts, 0), "input_ids"), &n0);
    int32_t *c = json_ints(json_object_get(json_array_get(prompts, 1), "input_ids"), &n1);
    pages_reset(b->n_pages, 1);      /* all four sequences share the pool */
    seq s0 = { .np = 0 }, s1 = { .np = 0 };
    float *l0 = last_logits(b, a, n0, &s0), *l1 = last_logits(b, c, n1, &s1);
    seq t0 = { .np = 0 }, t1 = { .np = 0 };
    req_in r[2] = { { &t0, a, NULL, n0 }, { &t1, c, NULL, n1 } };
    pie_sampler lp[2] = { { .kind = PIE_PROBE_LOGITS }, { .kind = PIE_PROBE_LOGITS } };
    int32_t ot[2] = { n0 - 1, n0 + n1 - 1 };
    pie_forward_out out;
    CHECK_OK(forward(b, r, 2, ot, lp, 2, NULL, NULL, NULL, NULL, &out));
    double d0 = maxdiff(out.values, l0, V), d1 = maxdiff(out.values + V, l1, V);
    CHECK(d0 < 2e-2 && d1 < 2e-2, "%s: batched vs single differ by %.3g / %.3g",
          name, d0, d1);
    pie_forward_out_free(&out);
    /* decode one more token in both requests of the batch vs alone */
    int32_t nx[2] = { 5, 7 };
    req_in d[2] = { { &t0, &nx[0], NULL, 1 }, { &t1, &nx[1], NULL, 1 } };
    int32_t od[2] = { 0, 1 };
    CHECK_OK(forward(b, d, 2, od, lp, 2, NULL, NULL, NULL, NULL, &out));
    float *e0 = last_logits(b, &nx[0], 1, &s0), *e1 = last_logits(b, &nx[1], 1, &s1);
    double d2 = maxdiff(out.values, e0, V), d3 = maxdiff(out.values + V, e1, V);
    CHECK(d2 < 2e-2 && d3 < 2e-2, "%s: batched decode vs single differ by "
          "%.3g / %.3g", name, d2, d3);
    pie_forward_out_free(&out);
    printf("%s: batched+shuffled vs single: prefill %.2g %.2g, decode %.2g %.2g ok\n",
           name, d0, d1, d2, d3);
    free(a); free(c); free(l0); free(l1); free(e0); free(e1);
}

/* nq <= DEC_MAX prompts decoded greedily in one batch for `steps` steps,
 * the last request leaving halfway (a new batch shape); every step's
 * logits into lg (steps x nq x V, rows of a finished request left 0). */
#define DEC_MAX MAXR
static void decode_run(pie_backend *b, int steps, float *lg, int nq)
{
    int V = b->cfg->vocab_size;
    pages_reset(b->n_pages, 1);
    seq s[DEC_MAX];
    memset(s, 0, sizeof s);
    int32_t cur[DEC_MAX];
    for (int i = 0; i < nq; i++) {
        int32_t p[5];
        for (int k = 0; k < 5; k++) p[k] = (7 * i + 3 * k + 1) % V;
        float *l = last_logits(b, p, 5, &s[i]);
        cur[i] = argmax(l, V);
        free(l);
    }
    pie_sampler lp[DEC_MAX];
    int32_t ot[DEC_MAX];
    for (int i = 0; i < nq; i++) {
        lp[i] = (pie_sampler){ .kind = PIE_PROBE_LOGITS };
        ot[i] = i;
    }
    memset(lg, 0, sizeof(float) * (size_t)steps * nq * V);
    for (int t = 0; t < steps; t++) {
        int nr = t < steps / 2 ? nq : nq - 1;
        req_in r[DEC_MAX];
        for (int i = 0; i < nr; i++) r[i] = (req_in){ &s[i], &cur[i], NULL, 1 };
        pie_forward_out out;
        CHECK_OK(forward(b, r, nr, ot, lp, nr, NULL, NULL, NULL, NULL, &out));
        for (int i = 0; i < nr; i++) {
            memcpy(lg + ((size_t)t * nq + i) * V, out.values + (size_t)i * V,
                   4 * (size_t)V);
            cur[i] = argmax(out.values + (size_t)i * V, V);
        }
        pie_forward_out_free(&out);
    }
}

/* Steady decode batches replay CUDA graphs of the layers; their logits
 * equal those of the same backend launching every kernel
 * (PIE_CUDA_NO_GRAPH, read at each forward; the same backend, so the same
 * tuned matmul algorithms). */
static void check_graphs(pie_backend *b, const char *name)
{
    int V = b->cfg->vocab_size, steps = 40;
    int64_t cap0, rep0, cap1, rep1, cap2, rep2;
    float *g = malloc(sizeof(float) * (size_t)steps * 3 * V);
    float *e = malloc(sizeof(float) * (size_t)steps * 3 * V);
    pie_backend_cuda_graphs(b, &cap0, &rep0);
    decode_run(b, steps, g, 3);
    pie_backend_cuda_graphs(b, &cap1, &rep1);
    CHECK(cap1 - cap0 >= 2 && rep1 - rep0 >= steps - 8, "%s: %lld graphs "
          "captured, %lld replayed in %d steady decode steps", name,
          (long long)(cap1 - cap0), (long long)(rep1 - rep0), steps);
    setenv("PIE_CUDA_NO_GRAPH", "1", 1);
    decode_run(b, steps, e, 3);
    unsetenv("PIE_CUDA_NO_GRAPH");
    pie_backend_cuda_graphs(b, &cap2, &rep2);
    CHECK(cap2 == cap1 && rep2 == rep1, "%s: PIE_CUDA_NO_GRAPH still used "
          "graphs", name);
    double d = maxdiff(g, e, steps * 3 * V);
    CHECK(d == 0, "%s: graph replay vs direct launches differ by %.3g", name, d);
    printf("%s: %d decode steps, %lld graphs captured, %lld replays, logits "
           "equal to direct launches\n", name, steps,
           (long long)(cap1 - cap0), (long long)(rep1 - rep0));
    free(g); free(e);
}

/* A capture that fails (forced by a test hook that synchronizes inside it)
 * leaves a working backend that launches kernels directly from then on. */
static void check_graph_failure(const pie_model *m, const char *name)
{
    pie_backend *b;
    pie_backend_opts o = { .page_size = 16, .n_pages = 256 };
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    int V = b->cfg->vocab_size, steps = 12;
    float *g = malloc(sizeof(float) * (size_t)steps * 3 * V);
    float *e = malloc(sizeof(float) * (size_t)steps * 3 * V);
    setenv("PIE_CUDA_TEST_BREAK_CAPTURE", "1", 1);
    decode_run(b, steps, g, 3);
    unsetenv("PIE_CUDA_TEST_BREAK_CAPTURE");
    int64_t cap, rep;
    pie_backend_cuda_graphs(b, &cap, &rep);
    CHECK(cap == 0 && rep == 0, "%s: %lld graphs after a failed capture",
          name, (long long)cap);
    setenv("PIE_CUDA_NO_GRAPH", "1", 1);
    decode_run(b, steps, e, 3);
    unsetenv("PIE_CUDA_NO_GRAPH");
    double d = maxdiff(g, e, steps * 3 * V);
    CHECK(d == 0, "%s: after a failed capture logits differ by %.3g", name, d);
    printf("%s: failed graph capture falls back to direct launches\n", name);
    pie_backend_free(b);
    free(g); free(e);
}

/* pie's own decode matmul (gemv.cu for <= 16 rows, wgmm.cu for 17..256)
 * against cuBLASLt: two backends, one forced to use it wherever it runs
 * (PIE_CUDA_GEMV=1 / PIE_CUDA_WGMM=1), one with cuBLASLt only
 * (PIE_CUDA_NO_GEMV=1 / PIE_CUDA_NO_WGMM=1), decode the same greedy batches
 * of nq rows; their logits agree within bf16 rounding up to the first step
 * where a greedy choice flips (later steps feed different tokens). calls
 * counts the kernel's matmuls. */
static void own_vs_cublaslt(pie_backend *bg, pie_backend *bl, int nq,
                            int64_t (*calls)(const pie_backend *),
                            const char *kernel, const char *name)
{
    int V = bg->cfg->vocab_size, steps = 12;
    float *g = malloc(sizeof(float) * (size_t)steps * nq * V);
    float *e = malloc(sizeof(float) * (size_t)steps * nq * V);
    int64_t g0 = calls(bg);
    decode_run(bg, steps, g, nq);
    CHECK(calls(bg) > g0, "%s: %s forced ran none at %d rows", name, kernel, nq);
    decode_run(bl, steps, e, nq);
    CHECK(calls(bl) == 0, "%s: %s turned off still ran", name, kernel);
    double worst = 0;
    int same = 0;
    for (int t = 0; t < steps; t++) {
        int nr = t < steps / 2 ? nq : nq - 1, flip = 0;
        for (int i = 0; i < nr; i++) {
            const float *a = g + ((size_t)t * nq + i) * V;
            const float *b = e + ((size_t)t * nq + i) * V;
            double rel = rel_l2(a, b, V);
            CHECK(rel < rel_tol, "%s: %d rows, step %d row %d: %s vs "
                  "cuBLASLt rel L2 %.3g", name, nq, t, i, kernel, rel);
            if (rel > worst) worst = rel;
            flip |= argmax(a, V) != argmax(b, V);
        }
        same++;
        if (flip) break;
    }
    printf("%s: %s vs cuBLASLt decode logits at %d rows: rel L2 <= %.2g "
           "over %d steps\n", name, kernel, nq, worst, same);
    free(g); free(e);
}

/* Two backends of model m, created with env var on (=1) and off (=1). */
static void backend_pair(const pie_model *m, const char *on, const char *off,
                         pie_backend **bon, pie_backend **boff)
{
    pie_backend_opts o = { .page_size = 16, .n_pages = 256 };
    setenv(on, "1", 1);
    CHECK_OK(pie_backend_cuda_create(m, &o, bon));
    unsetenv(on);
    setenv(off, "1", 1);
    CHECK_OK(pie_backend_cuda_create(m, &o, boff));
    unsetenv(off);
}

/* Whether wgmm.cu runs at least one of a model's decode matmuls at 24 rows
 * (on this GPU and driver). */
static int wgmm_runs(const pie_model_config *g)
{
    uint16_t al[8] __attribute__((aligned(16))) = { 0 };
    int qd = g->n_heads * g->head_dim, qkv = qd + 2 * g->n_kv_heads * g->head_dim;
    return pie__cuda_wgmm_supported(PIE_CUDA_WGMM_F32, 24, g->vocab_size, g->dim, al, al) ||
           pie__cuda_wgmm_supported(PIE_CUDA_WGMM_BF16, 24, qkv, g->dim, al, al) ||
           pie__cuda_wgmm_supported(PIE_CUDA_WGMM_ACC, 24, g->dim, qd, al, al) ||
           pie__cuda_wgmm_supported(PIE_CUDA_WGMM_GLU, 24, g->hidden_dim, g->dim, al, al) ||
           pie__cuda_wgmm_supported(PIE_CUDA_WGMM_ACC, 24, g->dim, g->hidden_dim, al, al);
}

/* Both column-tile counts of gemv.cu: 3 rows (then 2) and 12 (then 11);
 * wgmm.cu at 24 rows (then 23) where the model's shapes suit it. */
static void check_gemv(const pie_model *m, const char *name)
{
    pie_backend *bg, *bl;
    backend_pair(m, "PIE_CUDA_GEMV", "PIE_CUDA_NO_GEMV", &bg, &bl);
    own_vs_cublaslt(bg, bl, 3, pie_backend_cuda_gemv_calls, "gemv.cu", name);
    own_vs_cublaslt(bg, bl, 12, pie_backend_cuda_gemv_calls, "gemv.cu", name);
    pie_backend_free(bg);
    pie_backend_free(bl);
    if (!wgmm_runs(&m->cfg)) {
        printf("%s: wgmm.cu runs none of this model's shapes here, skipped\n",
               name);
        return;
    }
    backend_pair(m, "PIE_CUDA_WGMM", "PIE_CUDA_NO_WGMM", &bg, &bl);
    own_vs_cublaslt(bg, bl, 24, pie_backend_cuda_wgmm_calls, "wgmm.cu", name);
    pie_backend_free(bg);
    pie_backend_free(bl);
}

/* Greedy decode of `steps` tokens after an n-token prompt on shuffled
 * pages, the same tokens fed to b and b0; returns the largest relative L2
 * distance of their logits over the steps. */
static double mega_run(pie_backend *b, pie_backend *b0, int n, int steps,
                       const char *name)
{
    int V = b->cfg->vocab_size;
    int32_t *p = malloc(4 * (size_t)n);
    for (int i = 0; i < n; i++) p[i] = (37 * i + 11) % V;
    pages_reset(b->n_pages, 1);
    seq s = { .np = 0 }, s0 = { .np = 0 };
    free(last_logits(b, p, n, &s));
    float *l0 = last_logits(b0, p, n, &s0);
    int32_t cur = argmax(l0, V);
    free(l0);
    double worst = 0;
    for (int t = 0; t < steps; t++) {
        float *a = last_logits(b, &cur, 1, &s), *e = last_logits(b0, &cur, 1, &s0);
        double rel = rel_l2(a, e, V);
        CHECK(rel < rel_tol, "%s: step %d (context %d): one-kernel decode vs "
              "per-operation rel L2 %.3g", name, t, n + t + 1, rel);
        if (rel > worst) worst = rel;
        cur = argmax(e, V);
        free(a);
        free(e);
    }
    free(p);
    return worst;
}

/* Batch-1 decode as one kernel (mega.cu, PIE_CUDA_MEGA=1) against the
 * kernel-per-operation path (the default, backend b0): after a 200-token
 * prompt the context spans 4 attention splits, after a 20-token one a
 * single split; the logits agree within bf16 rounding at every step.
 * must: the model is one the kernel runs (else no step may take it). */
static void check_mega(const pie_model *m, pie_backend *b0, const char *name,
                       int must)
{
    pie_backend *b;
    pie_backend_opts o = { .page_size = b0->page_size, .n_pages = b0->n_pages };
    setenv("PIE_CUDA_MEGA", "1", 1);
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    unsetenv("PIE_CUDA_MEGA");
    int64_t k0 = pie_backend_cuda_mega_steps(b);
    double w1 = mega_run(b, b0, 200, 24, name), w2 = mega_run(b, b0, 20, 8, name);
    int64_t k = pie_backend_cuda_mega_steps(b) - k0;
    CHECK(pie_backend_cuda_mega_steps(b0) == 0, "%s: the default ran the "
          "one-kernel decode", name);
    CHECK(k == (must ? 32 : 0), "%s: %lld of 32 decode steps ran as one "
          "kernel", name, (long long)k);
    printf("%s: one-kernel batch-1 decode (%lld of 32 steps) vs per-operation: "
           "rel L2 <= %.2g (context 200+), %.2g (20+)\n", name, (long long)k,
           w1, w2);
    pie_backend_free(b);
}

/* Token c masked to skip b equals the sequence without b (positions are
 * explicit). Also: a token whose mask is empty gets finite logits. */
static void check_mask(pie_backend *b, const char *name)
{
    int V = b->cfg->vocab_size;
    pages_reset(b->n_pages, 1);
    int32_t tok[4] = { 3 % V, 17 % V, 29 % V, 11 % V }, pos[4] = { 0, 1, 2, 3 };
    /* a b c d: c skips b, d attends a and d only (runs: not, yes, ...) */
    uint32_t mind[5] = { 0, 2, 4, 8, 12 };
    uint32_t runs[12] = { 0, 1,  0, 2,  0, 1, 1, 1,  0, 1, 2, 1 };
    seq s = { .np = 0 };
    req_in r = { &s, tok, pos, 4 };
    pie_sampler lp[2] = { { .kind = PIE_PROBE_LOGITS }, { .kind = PIE_PROBE_LOGITS } };
    int32_t ot[2] = { 2, 3 };
    pie_forward_out out;
    CHECK_OK(forward(b, &r, 1, ot, lp, 2, mind, runs, NULL, NULL, &out));
    seq s2 = { .np = 0 };
    int32_t t2[2] = { tok[0], tok[2] }, p2[2] = { 0, 2 };
    req_in r2 = { &s2, t2, p2, 2 };
    int32_t o2 = 1;
    pie_forward_out o2o;
    CHECK_OK(forward(b, &r2, 1, &o2, lp, 1, NULL, NULL, NULL, NULL, &o2o));
    double d = maxdiff(out.values, o2o.values, V);
    pie_forward_out_free(&o2o);
    seq s3 = { .np = 0 };
    int32_t t3[2] = { tok[0], tok[3] }, p3[2] = { 0, 3 };
    req_in r3 = { &s3, t3, p3, 2 };
    CHECK_OK(forward(b, &r3, 1, &o2, lp, 1, NULL, NULL, NULL, NULL, &o2o));
    double d2 = maxdiff(out.values + V, o2o.values, V);
    pie_forward_out_free(&o2o);
    pie_forward_out_free(&out);
    CHECK(d < 1e-2 && d2 < 1e-2, "%s: masked token vs shorter sequence differ "
          "by %.3g / %.3g", name, d, d2);
    printf("%s: RLE masks match the equivalent sequences (%.2g, %.2g)\n", name, d, d2);
}

/* Device samplers vs pie_sample_row on the returned logits. */
static void check_samplers(pie_backend *b, const char *name)
{
    int V = b->cfg->vocab_size;
    enum { R = 10 };
    pages_reset(b->n_pages, 0);
    int32_t tok[3] = { 1, 2 % V, 5 % V };
    seq s = { .np = 0 };
    req_in r = { &s, tok, NULL, 3 };
    pie_sampler sm[R];
    memset(sm, 0, sizeof sm);
    int32_t ot[R], lpids[3] = { 0, (int32_t)(V / 2), V - 1 };
    for (int i = 0; i < R; i++) { ot[i] = 2; sm[i].seed = 7 + 31 * i; sm[i].top_p = 1; }
    sm[0].kind = PIE_PROBE_LOGITS;
    sm[1].kind = PIE_SAMPLER_GREEDY;
    sm[2].kind = PIE_SAMPLER_RANDOM; sm[2].temperature = 1.0f;
    sm[3].kind = PIE_SAMPLER_RANDOM; sm[3].temperature = 0.6f; sm[3].top_k = 20; sm[3].top_p = 0.8f;
    sm[4].kind = PIE_SAMPLER_RANDOM; sm[4].temperature = 1.5f; sm[4].min_p = 0.1f;
    sm[5].kind = PIE_PROBE_TOPK; sm[5].top_k = 7; sm[5].temperature = 0.9f;
    sm[6].kind = PIE_PROBE_LOGPROBS; sm[6].ids = lpids; sm[6].n_ids = 3;
    sm[7].kind = PIE_PROBE_ENTROPY;
    sm[8].kind = PIE_SAMPLER_RANDOM; sm[8].temperature = 2.0f;   /* masked */
    sm[9].kind = PIE_SAMPLER_GREEDY;                            /* masked */
    /* rows 0..7 allow everything (runs 0, V); rows 8, 9 a real mask */
    uint32_t lmind[R + 1], lmruns[2 * 8 + 8];
    for (int i = 0; i < 8; i++) { lmruns[2 * i] = 0; lmruns[2 * i + 1] = (uint32_t)V; }
    uint32_t mk[4] = { (uint32_t)(V / 3), (uint32_t)(V / 4), (uint32_t)(V / 8), 3 };
    memcpy(lmruns + 16, mk, sizeof mk);
    memcpy(lmruns + 20, mk, sizeof mk);
    for (int i = 0; i <= R; i++) lmind[i] = i <= 8 ? (uint32_t)(2 * i) : (uint32_t)(16 + 4 * (i - 8));
    pie_forward_out out;
    CHECK_OK(forward(b, &r, 1, ot, sm, R, NULL, NULL, lmind, lmruns, &out));
    float *row = malloc(4 * (size_t)V), *vals = malloc(4 * (size_t)V);
    int32_t *ids = malloc(4 * (size_t)V);
    for (int i = 1; i < R; i++) {
        memcpy(row, out.values, 4 * (size_t)V);
        int32_t t;
        const uint32_t *mr = i >= 8 ? mk : NULL;
        CHECK_OK(pie_sample_row(row, V, &sm[i], mr, mr ? 4 : 0, &t, vals, ids));
        CHECK(out.tokens[i] == t, "%s sampler %d: gpu token %d, cpu %d", name,
              i, out.tokens[i], t);
        for (uint32_t k = out.value_indptr[i]; k < out.value_indptr[i + 1]; k++) {
            float g = out.values[k], c = vals[k - out.value_indptr[i]];
            CHECK(fabsf(g - c) <= 1e-5f + 1e-4f * fabsf(c), "%s sampler %d value "
                  "%u: gpu %g cpu %g", name, i, k - out.value_indptr[i], g, c);
            if (sm[i].kind == PIE_PROBE_TOPK)
                CHECK(out.ids[k] == ids[k - out.value_indptr[i]], "%s TOPK rank "
                      "%u: gpu %d cpu %d", name, k - out.value_indptr[i],
                      out.ids[k], ids[k - out.value_indptr[i]]);
        }
    }
    printf("%s: device samplers and probes match pie_sample_row\n", name);
    pie_forward_out_free(&out);
    free(row); free(vals); free(ids);
}

/* download/upload and copy_slots keep a sequence's continuation. */
static void check_pages(pie_backend *b, const char *name)
{
    int V = b->cfg->vocab_size, ps = b->page_size;
    pages_reset(b->n_pages, 1);
    int32_t tok[40];
    for (int i = 0; i < 40; i++) tok[i] = (i * 7 + 3) % V;
    int n = ps * 2 + 3;
    if (n > 40) n = 40;
    seq s = { .np = 0 };
    float *l0 = last_logits(b, tok, n, &s);
    free(l0);
    /* copy: whole pages through the host, partial last page by copy_slots */
    seq c = s;
    uint8_t *host = malloc(b->page_bytes * (size_t)s.np);
    CHECK_OK(b->ops->download(b, s.pages, s.np - 1, host));
    for (int i = 0; i < s.np; i++) c.pages[i] = perm[next_page++];
    CHECK_OK(b->ops->upload(b, c.pages, s.np - 1, host));
    int fill = s.len - (s.np - 1) * ps;
    CHECK_OK(b->ops->copy_slots(b, s.pages[s.np - 1], 0, c.pages[s.np - 1], 0, fill));
    int32_t nx = 9 % V;
    float *a = last_logits(b, &nx, 1, &s), *bb = last_logits(b, &nx, 1, &c);
    double d = maxdiff(a, bb, V);
    CHECK(d < 1e-3, "%s: continuation from copied pages differs by %g", name, d);
    CHECK(b->ops->copy_slots(b, 0, ps - 1, 1, 0, 2) != 0, "copy_slots past the "
          "page end accepted");
    int32_t badp = b->n_pages;
    CHECK(b->ops->download(b, &badp, 1, host) == PIE_ERANGE, "bad page accepted");
    printf("%s: download/upload/copy_slots continuation identical\n", name);
    free(host); free(a); free(bb);
}

/* Bad batches fail cleanly and leave the pool as it was. */
static void check_bad(pie_backend *b, const char *name)
{
    int V = b->cfg->vocab_size;
    pages_reset(b->n_pages, 0);
    int32_t tok[3] = { 1, 2, 3 };
    seq s = { .np = 0 };
    float *l0 = last_logits(b, tok, 3, &s);
    seq s_before = s;
    int32_t bad = V, nx = 4;
    req_in r = { &s, &bad, NULL, 1 };
    pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
    int32_t o = 0;
    pie_forward_out out;
    CHECK(forward(b, &r, 1, &o, &g, 1, NULL, NULL, NULL, NULL, &out) == PIE_ERANGE,
          "token id = vocab accepted");
    pie_forward_out_free(&out);
    int32_t obad = 5;
    req_in r2 = { &s, &nx, NULL, 1 };
    CHECK(forward(b, &r2, 1, &obad, &g, 1, NULL, NULL, NULL, NULL, &out) != 0,
          "output index out of range accepted");
    pie_forward_out_free(&out);
    /* state unchanged: the same continuation as a fresh run */
    s = s_before;
    float *a = last_logits(b, &nx, 1, &s);
    seq f = { .np = 0 };
    free(last_logits(b, tok, 3, &f));
    float *c = last_logits(b, &nx, 1, &f);
    CHECK(maxdiff(a, c, V) < 1e-2, "%s: state changed after bad batches", name);
    printf("%s: bad batches rejected, state unchanged\n", name);
    free(l0); free(a); free(c);
}

static void check_cpu(pie_backend *b, const pie_model *m, json_t *prompts,
                      const char *name)
{
    pie_backend *cpu;
    pie_backend_opts o = { .page_size = b->page_size, .n_pages = 64, .n_threads = 2 };
    if (pie_backend_cpu_create(m, &o, &cpu) != 0) {
        printf("%s: CPU backend unavailable (%s), skipped\n", name, pie_err_msg());
        return;
    }
    int V = b->cfg->vocab_size, n;
    int32_t *ids = json_ints(json_object_get(json_array_get(prompts, 0), "input_ids"), &n);
    pages_reset(64, 0);
    seq s = { .np = 0 };
    float *c = last_logits(cpu, ids, n, &s);
    pages_reset(b->n_pages, 0);
    seq t = { .np = 0 };
    float *g = last_logits(b, ids, n, &t);
    double rel = rel_l2(g, c, V);
    CHECK(rel < 2e-2, "%s: CUDA vs CPU rel L2 %.3g", name, rel);
    printf("%s: CUDA vs CPU backend last logits rel L2 %.2e\n", name, rel);
    pie_backend_free(cpu);
    free(ids); free(c); free(g);
}

/* A model directory with a reference.json of the same format made by
 * scripts/hf_random_compare.py (random Llama-3.2-1B / 3.1-8B shapes):
 * prompts only. */
static void run_hf_dir(const char *dir)
{
    char ref[1100];
    snprintf(ref, sizeof ref, "%s/reference.json", dir);
    pie_model *m;
    CHECK_OK(pie_model_load(dir, NULL, NULL, &m));
    pie_backend *b;
    pie_backend_opts o = { .page_size = 16, .n_pages = 64 };
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    json_error_t je;
    json_t *root = json_load_file(ref, 0, &je);
    CHECK(root, "%s: %s", ref, je.text);
    json_t *prompts = json_object_get(root, "prompts");
    /* transformers' own bf16 run vs its f32 reference, when recorded: we
     * may differ from f32 by up to twice what bf16 costs transformers */
    double hf_bf16 = json_real_value(json_object_get(root, "hf_bf16_rel_l2"));
    rel_tol = 2 * hf_bf16 > 2e-2 ? 2 * hf_bf16 : 2e-2;
    printf("%s: transformers bf16 vs f32 rel L2 %.3g -> tolerance %.3g\n", dir,
           hf_bf16, rel_tol);
    for (size_t i = 0; i < json_array_size(prompts); i++) {
        pages_reset(b->n_pages, 1);
        check_prompt(b, json_array_get(prompts, i), dir, (int)i);
    }
    check_mega(m, b, dir, 1);
    json_decref(root);
    pie_backend_free(b);
    pie_model_free(m);
}

static void run_model(const char *name, int page_size)
{
    char dir[1024], ref[1100];
    snprintf(dir, sizeof dir, "%s/models/%s", PIE_SHARED_DIR, name);
    snprintf(ref, sizeof ref, "%s/reference.json", dir);
    FILE *f = fopen(ref, "r");
    if (!f && getenv("PIE_CUDA_PARTIAL_SHARED")) {
        printf("%s: not present here, skipped\n", name);
        return;
    }
    CHECK(f, "%s missing", ref);
    fclose(f);
    pie_model *m;
    CHECK_OK(pie_model_load(dir, NULL, NULL, &m));
    pie_backend *b;
    pie_backend_opts o = { .page_size = page_size, .n_pages = 256, .mem_fraction = 0.9 };
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    CHECK(b->n_pages == 256 && b->page_size == page_size, "pool %d x %d",
          b->n_pages, b->page_size);
    json_error_t je;
    json_t *root = json_load_file(ref, 0, &je);
    CHECK(root, "%s: %s", ref, je.text);
    json_t *prompts = json_object_get(root, "prompts");
    for (size_t i = 0; i < json_array_size(prompts); i++) {
        pages_reset(b->n_pages, i & 1);
        check_prompt(b, json_array_get(prompts, i), name, (int)i);
    }
    check_batched(b, prompts, name);
    check_mask(b, name);
    check_samplers(b, name);
    check_pages(b, name);
    check_bad(b, name);
    check_cpu(b, m, prompts, name);
    check_graphs(b, name);
    check_gemv(m, name);
    /* (stories260K: hidden 172 is not a multiple of 8; tiny-qwen3: q/k
     * norms; both stay on the per-operation path) */
    check_mega(m, b, name, !strcmp(name, "tiny-llama3") || !strcmp(name, "tiny-qwen2"));
    if (!strcmp(name, "stories260K")) check_graph_failure(m, name);
    json_decref(root);
    pie_backend_free(b);
    pie_model_free(m);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!pie_backend_cuda_available()) TEST_SKIP("no CUDA GPU");
    test_shared_path("models");
    const char *hf = getenv("PIE_CUDA_HF_DIRS");
    if (hf) {   /* only the given directories (colon-separated) */
        char buf[4096];
        snprintf(buf, sizeof buf, "%s", hf);
        for (char *save, *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save))
            run_hf_dir(d);
        TEST_DONE();
    }
    run_model("stories260K", 16);
    run_model("tiny-llama3", 16);
    run_model("tiny-qwen2", 5);
    run_model("tiny-qwen3", 16);
    /* memory planning: a pool larger than the GPU is a clear error */
    pie_model *m;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/stories260K", PIE_SHARED_DIR);
    struct stat st;
    if (stat(dir, &st) != 0 && getenv("PIE_CUDA_PARTIAL_SHARED")) TEST_DONE();
    CHECK_OK(pie_model_load(dir, NULL, NULL, &m));
    pie_backend *b = NULL;
    pie_backend_opts o = { .page_size = 16, .n_pages = 2000000000 };
    int rc = pie_backend_cuda_create(m, &o, &b);
    CHECK(rc == PIE_ENOMEM && b == NULL, "oversized pool: rc %d", rc);
    printf("oversized pool rejected: %s\n", pie_err_msg());
    pie_backend_opts d = { .page_size = 16 };
    CHECK_OK(pie_backend_cuda_create(m, &d, &b));
    CHECK(b->n_pages > 1000, "pool from mem_fraction: %d pages", b->n_pages);
    printf("pool from free memory: %d pages of %llu bytes\n", b->n_pages,
           (unsigned long long)b->page_bytes);
    pie_backend_free(b);
    pie_model_free(m);
    TEST_DONE();
}
