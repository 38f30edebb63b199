/*
 * test_cpu.c — the CPU backend against reference outputs of Hugging Face
 * transformers (../shared/models/ * /reference.json), and its invariances:
 * batching, page order, page size, masks, page copy/transfer, validation.
 *
 * A test request ("seq") owns a list of pool pages and a KV length; step()
 * appends new tokens to several seqs in one batched forward, asking either
 * a LOGITS probe at every new token or greedy at the last one.
 */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "model/model.h"
#include "tests/test_util.h"

#define MAXP 256

typedef struct seq {
    int32_t pages[MAXP];
    int32_t len;            /* KV slots filled */
} seq;

typedef struct step_req {
    seq           *s;
    int32_t        n_new;
    const int32_t *toks;
    const int32_t *pos;     /* NULL: s->len + i */
    int            logits;  /* 1: LOGITS at every token; 0: greedy at last */
} step_req;

static pie_model *load_model(const char *name)
{
    char rel[256];
    snprintf(rel, sizeof rel, "models/%s", name);
    pie_model *m = NULL;
    CHECK_OK(pie_model_load(test_shared_path(rel), NULL, NULL, &m));
    return m;
}

static int32_t n_threads = 2;

static pie_backend *make_backend(pie_model *m, int32_t ps, int32_t n_pages)
{
    pie_backend_opts o = { .page_size = ps, .n_pages = n_pages,
                           .n_threads = n_threads };
    pie_backend *b = NULL;
    CHECK_OK(pie_backend_cpu_create(m, &o, &b));
    CHECK(b->page_size == ps && b->n_pages == n_pages, "pool %dx%d", b->n_pages,
          b->page_size);
    return b;
}

static uint64_t rng_state = 42;
static uint32_t rng(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}

/* Gives s pages [first, first + n) in order, or shuffled. */
static void seq_init(seq *s, int32_t first, int32_t n, int shuffle)
{
    CHECK(n <= MAXP, "too many pages %d", n);
    memset(s, 0, sizeof *s);
    for (int32_t i = 0; i < n; i++) s->pages[i] = first + i;
    for (int32_t i = n - 1; shuffle && i > 0; i--) {
        int32_t j = (int32_t)(rng() % (uint32_t)(i + 1)), t = s->pages[i];
        s->pages[i] = s->pages[j];
        s->pages[j] = t;
    }
}

/* Runs one batched forward; returns its rc. out is allocated here. */
static int step_rc(pie_backend *b, step_req *rq, int n, pie_forward_out *out,
                   const uint32_t *mask_indptr, const uint32_t *mask_runs)
{
    int32_t ps = b->page_size, n_tok = 0, n_out = 0, np_total = 0;
    for (int i = 0; i < n; i++) {
        n_tok += rq[i].n_new;
        n_out += rq[i].logits ? rq[i].n_new : 1;
    }
    int32_t *toks = malloc(4 * (n_tok + 1)), *pos = malloc(4 * (n_tok + 1));
    int32_t *qo = malloc(4 * (n + 1)), *kvp = malloc(4 * (n + 1));
    int32_t *last = malloc(4 * n), *pages = malloc(4 * (n * MAXP + 1));
    int32_t *oidx = malloc(4 * (n_out + 1));
    pie_sampler *smp = calloc(n_out + 1, sizeof *smp);
    qo[0] = kvp[0] = 0;
    int32_t t = 0, o = 0;
    for (int i = 0; i < n; i++) {
        seq *s = rq[i].s;
        int32_t kv = s->len + rq[i].n_new, np = (kv + ps - 1) / ps;
        for (int32_t j = 0; j < rq[i].n_new; j++, t++) {
            toks[t] = rq[i].toks[j];
            pos[t] = rq[i].pos ? rq[i].pos[j] : s->len + j;
            if (rq[i].logits || j == rq[i].n_new - 1) {
                oidx[o] = t;
                smp[o++].kind = rq[i].logits ? PIE_PROBE_LOGITS
                                             : PIE_SAMPLER_GREEDY;
            }
        }
        for (int32_t j = 0; j < np; j++) pages[np_total++] = s->pages[j];
        qo[i + 1] = t;
        kvp[i + 1] = np_total;
        last[i] = kv - (np - 1) * ps;
    }
    pie_forward_batch bt = {
        .n_tokens = n_tok, .n_reqs = n, .token_ids = toks, .positions = pos,
        .qo_indptr = qo, .kv_page_indices = pages, .kv_page_indptr = kvp,
        .kv_last_page_len = last, .mask_indptr = mask_indptr,
        .mask_runs = mask_runs, .n_outputs = n_out, .output_token_idx = oidx,
        .samplers = smp,
    };
    CHECK_OK(pie_forward_out_alloc(&bt, b->cfg->vocab_size, out));
    int rc = pie_backend_forward(b, &bt, out);
    if (rc == 0)
        for (int i = 0; i < n; i++) rq[i].s->len += rq[i].n_new;
    free(toks); free(pos); free(qo); free(kvp); free(last); free(pages);
    free(oidx); free(smp);
    return rc;
}

static void step(pie_backend *b, step_req *rq, int n, pie_forward_out *out)
{
    CHECK_OK(step_rc(b, rq, n, out, NULL, NULL));
}

/* ------------------------------------------------------------ references */

static int b64v(int c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decodes base64 into a new buffer; *n = bytes. */
static unsigned char *b64_decode(const char *s, size_t *n)
{
    size_t len = strlen(s);
    unsigned char *out = malloc(len / 4 * 3 + 3);
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len && s[i] != '='; i++) {
        int v = b64v((unsigned char)s[i]);
        CHECK(v >= 0, "bad base64 character at %zu", i);
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[k++] = (unsigned char)(acc >> bits);
        }
    }
    *n = k;
    return out;
}

static json_t *load_ref(const char *model)
{
    char rel[256];
    snprintf(rel, sizeof rel, "models/%s/reference.json", model);
    json_error_t e;
    json_t *j = json_load_file(test_shared_path(rel), 0, &e);
    CHECK(j, "%s: %s", rel, e.text);
    return j;
}

static int32_t *json_ids(json_t *a, int32_t *n)
{
    *n = (int32_t)json_array_size(a);
    int32_t *v = malloc(4 * (*n + 1));
    for (int32_t i = 0; i < *n; i++)
        v[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return v;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

static double lse(const float *x, int32_t n)
{
    double mx = x[argmax(x, n)], s = 0;
    for (int32_t i = 0; i < n; i++) s += exp(x[i] - mx);
    return mx + log(s);
}

/* Compares top-5, logsumexp and (last position) full logits of one row. */
static void check_row(const float *row, int32_t vocab, json_t *p, int32_t i,
                      const char *what, int last)
{
    json_t *ids = json_array_get(json_object_get(p, "top5_ids"), i);
    json_t *lg = json_array_get(json_object_get(p, "top5_logits"), i);
    for (int k = 0; k < 5; k++) {
        int32_t id = (int32_t)json_integer_value(json_array_get(ids, k));
        double want = json_number_value(json_array_get(lg, k));
        /* rank check: exactly k entries must beat this id */
        int32_t above = 0;
        for (int32_t v = 0; v < vocab; v++)
            above += row[v] > row[id] || (row[v] == row[id] && v < id);
        CHECK(above == k, "%s pos %d: ref top%d id %d has rank %d", what, i, k,
              id, above);
        CHECK(fabs(row[id] - want) < 1e-3, "%s pos %d: logit[%d] = %.6f, "
              "reference %.6f", what, i, id, row[id], want);
    }
    double want = json_number_value(
        json_array_get(json_object_get(p, "logsumexp"), i));
    CHECK(fabs(lse(row, vocab) - want) < 1e-3, "%s pos %d: logsumexp %.6f, "
          "reference %.6f", what, i, lse(row, vocab), want);
    if (!last) return;
    size_t nb;
    unsigned char *raw = b64_decode(
        json_string_value(json_object_get(p, "last_logits_f32_b64")), &nb);
    CHECK(nb == (size_t)vocab * 4, "%s: last logits %zu bytes, vocab %d", what,
          nb, vocab);
    double maxd = 0;
    for (int32_t v = 0; v < vocab; v++) {
        float r;
        memcpy(&r, raw + 4 * v, 4);
        double d = fabs(r - row[v]);
        if (d > maxd) maxd = d;
    }
    free(raw);
    printf("  %s: last-position logits max |diff| %.2e over %d ids\n", what,
           maxd, vocab);
    CHECK(maxd < 1e-3, "%s: last logits differ by %g", what, maxd);
}

/* Greedy decode from a filled seq: feeds ids[j], expects ids[j+1]. */
static void check_greedy(pie_backend *b, seq *s, const int32_t *ids,
                         int32_t n, const char *what)
{
    for (int32_t j = 0; j + 1 < n; j++) {
        pie_forward_out out;
        step_req rq = { s, 1, &ids[j], NULL, 0 };
        step(b, &rq, 1, &out);
        CHECK(out.tokens[0] == ids[j + 1], "%s greedy step %d: expected %d, "
              "got %d", what, j + 1, ids[j + 1], out.tokens[0]);
        pie_forward_out_free(&out);
    }
}

/* Every prompt of a reference: per-position logits, then greedy. */
static void check_reference(const char *model, pie_model *m, int32_t ps,
                            int shuffle, int full)
{
    int32_t vocab = m->cfg.vocab_size, n_pages = 4096 / ps + 8;
    pie_backend *b = make_backend(m, ps, n_pages);
    json_t *ref = load_ref(model), *prompts = json_object_get(ref, "prompts");
    for (size_t pi = 0; pi < json_array_size(prompts); pi++) {
        json_t *p = json_array_get(prompts, pi);
        int32_t n_in, n_gr;
        int32_t *in = json_ids(json_object_get(p, "input_ids"), &n_in);
        int32_t *gr = json_ids(json_object_get(p, "greedy_ids"), &n_gr);
        char what[128];
        snprintf(what, sizeof what, "%s prompt %zu (page %d%s)", model, pi, ps,
                 shuffle ? ", shuffled" : "");
        seq s;
        int32_t need = (n_in + n_gr + ps - 1) / ps;
        seq_init(&s, (int32_t)(pi * (n_pages / 2)), need, shuffle);
        pie_forward_out out;
        step_req rq = { &s, n_in, in, NULL, full };
        step(b, &rq, 1, &out);
        if (full) {
            for (int32_t i = 0; i < n_in; i++)
                check_row(out.values + out.value_indptr[i], vocab, p, i, what,
                          i == n_in - 1);
            const float *lastrow = out.values + out.value_indptr[n_in - 1];
            CHECK(argmax(lastrow, vocab) == gr[0], "%s: first greedy %d, "
                  "expected %d", what, argmax(lastrow, vocab), gr[0]);
        } else {
            CHECK(out.tokens[0] == gr[0], "%s: first greedy %d, expected %d",
                  what, out.tokens[0], gr[0]);
        }
        pie_forward_out_free(&out);
        check_greedy(b, &s, gr, n_gr, what);
        printf("  %s: %d prompt positions and %d greedy ids match\n", what,
               full ? n_in : 0, n_gr);
        free(in);
        free(gr);
    }
    json_decref(ref);
    pie_backend_free(b);
}

/* ------------------------------------------------------------ invariances */

/* Logits of every token of toks[0..n) computed in one prefill alone. */
static float *alone_logits(pie_model *m, const int32_t *toks, int32_t n)
{
    int32_t vocab = m->cfg.vocab_size;
    pie_backend *b = make_backend(m, 16, 16);
    seq s;
    seq_init(&s, 0, 16, 0);
    pie_forward_out out;
    step_req rq = { &s, n, toks, NULL, 1 };
    step(b, &rq, 1, &out);
    float *r = malloc(sizeof(float) * (size_t)n * vocab);
    memcpy(r, out.values, sizeof(float) * (size_t)n * vocab);
    pie_forward_out_free(&out);
    pie_backend_free(b);
    return r;
}

static double max_diff(const float *a, const float *b, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

/* Three requests fed in chunks, prefill and decode mixed, equal alone. */
static void test_batch_mix(pie_model *m)
{
    int32_t vocab = m->cfg.vocab_size;
    int32_t A[20], B[9], C[6];
    for (int i = 0; i < 20; i++) A[i] = (int32_t)(rng() % vocab);
    for (int i = 0; i < 9; i++) B[i] = (int32_t)(rng() % vocab);
    for (int i = 0; i < 6; i++) C[i] = (int32_t)(rng() % vocab);
    n_threads = 1;   /* the references alone run single-threaded */
    float *la = alone_logits(m, A, 20), *lb = alone_logits(m, B, 9),
          *lc = alone_logits(m, C, 6);
    n_threads = 3;   /* the batched runs on three workers */
    pie_backend *b = make_backend(m, 4, 64);
    seq sa, sb, sc;
    seq_init(&sa, 0, 8, 1);
    seq_init(&sb, 8, 8, 1);
    seq_init(&sc, 16, 8, 1);
    /* chunks: (A 13, B 1) ; (A 1, B 7, C 6) ; (A 6, B 1) */
    int plan[3][3] = { { 13, 1, 0 }, { 1, 7, 6 }, { 6, 1, 0 } };
    const int32_t *tok[3] = { A, B, C };
    seq *ss[3] = { &sa, &sb, &sc };
    float *ref[3] = { la, lb, lc };
    double worst = 0;
    for (int c = 0; c < 3; c++) {
        step_req rq[3];
        int n = 0;
        for (int r = 0; r < 3; r++)
            if (plan[c][r])
                rq[n++] = (step_req){ ss[r], plan[c][r], tok[r] + ss[r]->len,
                                      NULL, 1 };
        int32_t start[3];
        for (int i = 0; i < n; i++) start[i] = rq[i].s->len;
        pie_forward_out out;
        step(b, rq, n, &out);
        int32_t o = 0;
        for (int i = 0; i < n; i++) {
            int r = (int)(rq[i].s - &sa == 0 ? 0 : rq[i].s == &sb ? 1 : 2);
            for (int32_t j = 0; j < rq[i].n_new; j++, o++) {
                double d = max_diff(out.values + out.value_indptr[o],
                                    ref[r] + (int64_t)(start[i] + j) * vocab,
                                    vocab);
                if (d > worst) worst = d;
                CHECK(d < 1e-4, "batched request %d token %d differs from "
                      "alone by %g", r, start[i] + j, d);
            }
        }
        pie_forward_out_free(&out);
    }
    printf("  batch mix: 3 requests in 3 mixed batches (3 threads) vs alone "
           "(1 thread), max |diff| %.2e\n", worst);
    n_threads = 2;
    free(la); free(lb); free(lc);
    pie_backend_free(b);
}

/* A token that attends to nothing gets a zero attention output in every
 * layer, so its logits depend on its id alone: the same id with an empty
 * mask gives the same logits at another position, after another context,
 * and through either attention path (>= 8 new tokens: sgemm; fewer:
 * slot by slot). */
static void test_empty_mask(pie_backend *b, const int32_t *toks)
{
    int32_t vocab = b->cfg->vocab_size, x = toks[2];
    float *ref = NULL;
    int lens[3] = { 10, 3, 1 };
    for (int v = 0; v < 3; v++) {
        int32_t n = lens[v], t[10], pos[10];
        uint32_t indptr[11], runs[20], k = 0;
        indptr[0] = 0;
        for (int32_t i = 0; i < n; i++) {
            t[i] = i == n - 1 ? x : toks[(i + 3 * v) % 10];
            pos[i] = 7 * v + i;
            if (i < n - 1) { runs[k++] = 0; runs[k++] = (uint32_t)i + 1; }
            indptr[i + 1] = k;    /* the last token: no runs at all */
        }
        seq s;
        seq_init(&s, 4, 4, v == 1);
        pie_forward_out out;
        step_req rq = { &s, n, t, pos, 1 };
        CHECK_OK(step_rc(b, &rq, 1, &out, indptr, runs));
        const float *row = out.values + out.value_indptr[n - 1];
        if (!ref) {
            ref = malloc(sizeof(float) * vocab);
            memcpy(ref, row, sizeof(float) * vocab);
        } else {
            double d = max_diff(ref, row, vocab);
            CHECK(d < 1e-4, "empty-mask token: variant %d differs by %g", v,
                  d);
        }
        pie_forward_out_free(&out);
    }
    free(ref);
    printf("  mask: a token attending to nothing depends on its id only\n");
}

/* Masking out slots [3,6) equals a sequence that never had them. */
static void test_mask(pie_model *m)
{
    int32_t vocab = m->cfg.vocab_size, toks[10];
    for (int i = 0; i < 10; i++) toks[i] = (int32_t)(rng() % vocab);
    uint32_t indptr[11], runs[40];
    uint32_t k = 0;
    indptr[0] = 0;
    for (uint32_t i = 0; i < 10; i++) {
        if (i < 6) { runs[k++] = 0; runs[k++] = i + 1; }
        else { runs[k++] = 0; runs[k++] = 3; runs[k++] = 3; runs[k++] = i - 5; }
        indptr[i + 1] = k;
    }
    pie_backend *b = make_backend(m, 4, 16);
    seq s;
    seq_init(&s, 0, 4, 1);
    pie_forward_out out;
    step_req rq = { &s, 10, toks, NULL, 1 };
    CHECK_OK(step_rc(b, &rq, 1, &out, indptr, runs));
    int32_t stoks[7] = { toks[0], toks[1], toks[2], toks[6], toks[7], toks[8],
                         toks[9] };
    int32_t spos[7] = { 0, 1, 2, 6, 7, 8, 9 };
    seq s2;
    seq_init(&s2, 8, 4, 0);
    pie_forward_out o2;
    step_req r2 = { &s2, 7, stoks, spos, 1 };
    step(b, &r2, 1, &o2);
    double worst = 0;
    for (int i = 0; i < 7; i++) {
        int mi = i < 3 ? i : i + 3;
        double d = max_diff(out.values + out.value_indptr[mi],
                            o2.values + o2.value_indptr[i], vocab);
        if (d > worst) worst = d;
        CHECK(d < 1e-4, "masked token %d differs from short sequence by %g",
              mi, d);
    }
    pie_forward_out_free(&out);
    /* the same in two batches: 6 causal tokens, then 4 masked ones (few
     * new tokens take the slot-by-slot attention path) */
    seq s5;
    seq_init(&s5, 4, 4, 1);
    step_req r5 = { &s5, 6, toks, NULL, 1 };
    step(b, &r5, 1, &out);
    pie_forward_out_free(&out);
    uint32_t ind4[5], base = indptr[6];
    for (int i = 0; i < 5; i++) ind4[i] = indptr[6 + i] - base;
    r5.n_new = 4;
    r5.toks = toks + 6;
    CHECK_OK(step_rc(b, &r5, 1, &out, ind4, runs + base));
    for (int i = 0; i < 4; i++) {
        double d = max_diff(out.values + out.value_indptr[i],
                            o2.values + o2.value_indptr[3 + i], vocab);
        if (d > worst) worst = d;
        CHECK(d < 1e-4, "masked decode token %d differs from short sequence "
              "by %g", 6 + i, d);
    }
    pie_forward_out_free(&out);
    pie_forward_out_free(&o2);
    /* an explicit causal mask equals no mask */
    k = 0;
    for (uint32_t i = 0; i < 10; i++) {
        runs[k++] = 0; runs[k++] = i + 1; indptr[i + 1] = k;
    }
    seq s3, s4;
    seq_init(&s3, 4, 4, 0);   /* reuses s5's pages */
    seq_init(&s4, 12, 4, 0);
    rq.s = &s3;
    CHECK_OK(step_rc(b, &rq, 1, &out, indptr, runs));
    rq.s = &s4;
    step(b, &rq, 1, &o2);
    double d = max_diff(out.values, o2.values, (int64_t)10 * vocab);
    CHECK(d == 0, "causal mask differs from no mask by %g", d);
    pie_forward_out_free(&out);
    pie_forward_out_free(&o2);
    printf("  mask: masked middle block equals short sequence (max |diff| "
           "%.2e); causal mask equals none\n", worst);
    test_empty_mask(b, toks);
    pie_backend_free(b);
}

/* Page copy (fork) and download/upload give the same next-token logits. */
static void test_pages(pie_model *m)
{
    int32_t vocab = m->cfg.vocab_size, toks[11];
    for (int i = 0; i < 11; i++) toks[i] = (int32_t)(rng() % vocab);
    pie_backend *b = make_backend(m, 4, 16);
    seq s;
    seq_init(&s, 0, 3, 0);
    pie_forward_out out;
    step_req rq = { &s, 10, toks, NULL, 0 };
    step(b, &rq, 1, &out);
    pie_forward_out_free(&out);
    /* fork: pages 0,1 whole + 2 slots of page 2 into 5,6,7 */
    CHECK_OK(b->ops->copy_slots(b, 0, 0, 5, 0, 4));
    CHECK_OK(b->ops->copy_slots(b, 1, 0, 6, 0, 4));
    CHECK_OK(b->ops->copy_slots(b, 2, 0, 7, 0, 2));
    CHECK(b->ops->copy_slots(b, 2, 2, 7, 3, 2) < 0, "copy past page end "
          "accepted");
    CHECK(b->ops->copy_slots(b, 16, 0, 7, 0, 1) < 0, "bad page accepted");
    /* swap: download 0..2, upload into 9..11 */
    char *host = malloc(b->page_bytes * 3);
    int32_t src[3] = { 0, 1, 2 }, dst[3] = { 9, 10, 11 }, bad[1] = { 99 };
    CHECK_OK(b->ops->download(b, src, 3, host));
    CHECK_OK(b->ops->upload(b, dst, 3, host));
    CHECK(b->ops->download(b, bad, 1, host) < 0, "download of page 99 "
          "accepted");
    CHECK(b->ops->upload(b, bad, 1, host) < 0, "upload to page 99 accepted");
    free(host);
    seq f = { .pages = { 5, 6, 7 }, .len = 10 };
    seq g = { .pages = { 9, 10, 11 }, .len = 10 };
    step_req rr[3] = { { &s, 1, &toks[10], NULL, 1 },
                       { &f, 1, &toks[10], NULL, 1 },
                       { &g, 1, &toks[10], NULL, 1 } };
    step(b, rr, 3, &out);
    double d1 = max_diff(out.values, out.values + vocab, vocab);
    double d2 = max_diff(out.values, out.values + 2 * vocab, vocab);
    CHECK(d1 < 1e-5, "forked pages differ by %g", d1);
    CHECK(d2 < 1e-5, "uploaded pages differ by %g", d2);
    pie_forward_out_free(&out);
    printf("  pages: copy_slots fork and download/upload reproduce logits\n");
    pie_backend_free(b);
}

/* Logit mask and probes through the backend. */
static void test_outputs(pie_model *m)
{
    int32_t vocab = m->cfg.vocab_size, toks[5] = { 1, 2, 3, 4, 5 };
    pie_backend *b = make_backend(m, 16, 4);
    int32_t qo[2] = { 0, 5 }, pages[1] = { 0 }, kvp[2] = { 0, 1 }, last = 5;
    int32_t pos[5] = { 0, 1, 2, 3, 4 }, oidx[4] = { 4, 4, 4, 4 };
    int32_t lp_ids[2] = { 7, 300 };
    pie_sampler smp[4] = {
        { .kind = PIE_PROBE_LOGITS },
        { .kind = PIE_SAMPLER_GREEDY },
        { .kind = PIE_PROBE_ENTROPY },
        { .kind = PIE_PROBE_LOGPROBS, .ids = lp_ids, .n_ids = 2 },
    };
    uint32_t lm_indptr[5] = { 0, 0, 2, 2, 2 }, lm_runs[2] = { 100, 100 };
    /* row 0 has an empty run list: nothing allowed, which is rejected */
    pie_forward_batch bt = {
        .n_tokens = 5, .n_reqs = 1, .token_ids = toks, .positions = pos,
        .qo_indptr = qo, .kv_page_indices = pages, .kv_page_indptr = kvp,
        .kv_last_page_len = &last, .n_outputs = 4, .output_token_idx = oidx,
        .samplers = smp, .logit_mask_indptr = lm_indptr,
        .logit_mask_runs = lm_runs,
    };
    pie_forward_out out;
    CHECK_OK(pie_forward_out_alloc(&bt, vocab, &out));
    CHECK(pie_backend_forward(b, &bt, &out) == PIE_EINVAL,
          "mask allowing nothing accepted");
    bt.logit_mask_indptr = NULL;
    CHECK_OK(pie_backend_forward(b, &bt, &out));
    float *row = malloc(sizeof(float) * vocab);
    memcpy(row, out.values, sizeof(float) * vocab);
    double l = lse(row, vocab), h = 0;
    for (int32_t v = 0; v < vocab; v++) {
        double p = exp(row[v] - l);
        if (p > 0) h -= p * log(p);
    }
    CHECK(out.tokens[1] == argmax(row, vocab), "greedy %d vs argmax %d",
          out.tokens[1], argmax(row, vocab));
    CHECK(fabs(out.values[out.value_indptr[2]] - h) < 1e-3, "entropy %g vs %g",
          out.values[out.value_indptr[2]], h);
    /* value offsets that do not give row 0 its vocab logits */
    out.value_indptr[1]--;
    CHECK(pie_backend_forward(b, &bt, &out) == PIE_EINVAL,
          "value offsets short of a row's probe values accepted");
    out.value_indptr[1]++;
    for (int j = 0; j < 2; j++)
        CHECK(fabs(out.values[out.value_indptr[3] + j] - (row[lp_ids[j]] - l))
              < 1e-4, "logprob of %d: %g vs %g", lp_ids[j],
              out.values[out.value_indptr[3] + j], row[lp_ids[j]] - l);
    /* greedy under a mask allowing [100, 200) */
    lm_indptr[0] = 0; lm_indptr[1] = 2; lm_indptr[2] = 2;
    lm_indptr[3] = 2; lm_indptr[4] = 2;
    bt.logit_mask_indptr = lm_indptr;
    bt.n_outputs = 2;
    uint32_t ind2[3] = { 0, 2, 4 }, runs2[4] = { 100, 100, 100, 100 };
    bt.logit_mask_indptr = ind2;
    bt.logit_mask_runs = runs2;
    /* the same 5 tokens again into a fresh page */
    pages[0] = 1;
    CHECK_OK(pie_backend_forward(b, &bt, &out));
    int32_t best = 100;
    for (int32_t v = 100; v < 200; v++) if (row[v] > row[best]) best = v;
    CHECK(out.tokens[1] == best, "masked greedy %d, expected %d",
          out.tokens[1], best);
    CHECK(out.values[0] == -INFINITY && out.values[99] == -INFINITY &&
          fabs(out.values[150] - row[150]) < 1e-5 &&
          out.values[200] == -INFINITY, "masked LOGITS probe wrong");
    free(row);
    pie_forward_out_free(&out);
    printf("  outputs: logit mask, greedy, entropy and logprob probes agree "
           "with direct computation\n");
    pie_backend_free(b);
}

/* ------------------------------------------------------------ validation */

typedef struct bad_case {
    const char *what;
    int32_t toks[5], qo[3], kvp[3], pages[3], last[2], oidx[1];
    uint32_t *mask_indptr, *mask_runs;
    pie_sampler smp;
    uint32_t *lm_indptr, *lm_runs;
} bad_case;

static void test_invalid(pie_model *m)
{
    int32_t vocab = m->cfg.vocab_size;
    pie_backend *b = make_backend(m, 4, 8);
    seq s;
    seq_init(&s, 0, 2, 0);
    int32_t pre[6] = { 1, 2, 3, 4, 5, 6 };
    pie_forward_out out;
    step_req rq = { &s, 6, pre, NULL, 0 };
    step(b, &rq, 1, &out);
    pie_forward_out_free(&out);
    int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
    char *before = malloc(b->page_bytes * 8), *after = malloc(b->page_bytes * 8);
    CHECK_OK(b->ops->download(b, all, 8, before));

    /* template: req0 appends 2 tokens on pages {0,1} (kv 6 -> 8),
     * req1 prefills 3 tokens on page {2} */
    bad_case good = { "valid", { 7, 8, 9, 10, 11 }, { 0, 2, 5 }, { 0, 2, 3 },
                      { 0, 1, 2 }, { 4, 3 }, { 4 }, NULL, NULL,
                      { .kind = PIE_SAMPLER_GREEDY } };
    uint32_t mi[6] = { 0, 2, 4, 6, 8, 10 };
    uint32_t mr[10] = { 0, 7, 0, 8, 0, 1, 0, 2, 0, 4 };   /* last: 4 > kv 3 */
    uint32_t mi2[6] = { 0, 2, 4, 6, 8, 6 };
    uint32_t lmi[2] = { 0, 2 }, lmr[2] = { 512, 0 }, lmr2[2] = { 0, 513 };
    int32_t bad_ids[2] = { 3, 512 };
    bad_case cases[24];
    int n = 0;
#define BAD(desc, stmt) do { cases[n] = good; cases[n].what = desc; \
        { bad_case *c = &cases[n]; stmt; } n++; } while (0)
    BAD("token id = vocab", c->toks[3] = vocab);
    BAD("negative token id", c->toks[0] = -1);
    BAD("page id out of range", c->pages[2] = 8);
    BAD("negative page id", c->pages[0] = -3);
    BAD("last page fill 0", c->last[1] = 0);
    BAD("last page fill > page size", c->last[0] = 5);
    BAD("non-monotone qo_indptr", (c->qo[1] = 6, c->qo[2] = 5));
    BAD("qo_indptr total != n_tokens", c->qo[2] = 4);
    BAD("non-monotone kv_page_indptr", (c->kvp[1] = 3, c->kvp[2] = 2));
    BAD("output index out of range", c->oidx[0] = 5);
    BAD("mask longer than kv", (c->mask_indptr = mi, c->mask_runs = mr));
    BAD("two tokens write one slot", c->pages[2] = 1);
    BAD("TOPK k = 0", c->smp = (pie_sampler){ .kind = PIE_PROBE_TOPK });
    BAD("unknown sampler kind", c->smp.kind = 99);
    BAD("infinite temperature", (c->smp.kind = PIE_SAMPLER_RANDOM,
                                 c->smp.temperature = INFINITY));
    BAD("NaN top_p", (c->smp.kind = PIE_SAMPLER_RANDOM,
                      c->smp.temperature = 1, c->smp.top_p = NAN));
    BAD("min_p > 1", (c->smp.kind = PIE_SAMPLER_RANDOM,
                      c->smp.temperature = 1, c->smp.top_p = 1,
                      c->smp.min_p = 1.5f));
    BAD("negative top_p", (c->smp.kind = PIE_SAMPLER_RANDOM,
                           c->smp.temperature = 1, c->smp.top_p = -0.5f));
    BAD("LOGPROBS id out of range", (c->smp.kind = PIE_PROBE_LOGPROBS,
                                     c->smp.ids = bad_ids, c->smp.n_ids = 2));
    BAD("non-monotone mask_indptr", (c->mask_indptr = mi2,
                                     c->mask_runs = mr));
    BAD("logit mask allows nothing", (c->lm_indptr = lmi, c->lm_runs = lmr));
    BAD("logit mask longer than vocab", (c->lm_indptr = lmi, c->lm_runs = lmr2));
#undef BAD
    for (int i = 0; i <= n; i++) {
        bad_case *c = i < n ? &cases[i] : &good;
        pie_forward_batch bt = {
            .n_tokens = 5, .n_reqs = 2, .token_ids = c->toks,
            .positions = (int32_t[]){ 6, 7, 0, 1, 2 }, .qo_indptr = c->qo,
            .kv_page_indices = c->pages, .kv_page_indptr = c->kvp,
            .kv_last_page_len = c->last, .mask_indptr = c->mask_indptr,
            .mask_runs = c->mask_runs, .n_outputs = 1,
            .output_token_idx = c->oidx, .samplers = &c->smp,
            .logit_mask_indptr = c->lm_indptr, .logit_mask_runs = c->lm_runs,
        };
        pie_forward_out o;
        pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
        pie_forward_batch ab = bt;
        ab.samplers = &g;   /* allocation sized for a valid sampler */
        CHECK_OK(pie_forward_out_alloc(&ab, vocab, &o));
        int rc = pie_backend_forward(b, &bt, &o);
        pie_forward_out_free(&o);
        if (i == n) {
            CHECK(rc == 0, "valid template rejected: %s", pie_err_msg());
            break;
        }
        CHECK(rc == PIE_EINVAL || rc == PIE_ERANGE, "%s: rc %d (%s)", c->what,
              rc, pie_err_msg());
        CHECK(strlen(pie_err_msg()) > 0, "%s: no message", c->what);
        CHECK_OK(b->ops->download(b, all, 8, after));
        CHECK(memcmp(before, after, b->page_bytes * 8) == 0,
              "%s: rejected batch changed the KV pool", c->what);
        printf("  rejected %-32s %s\n", c->what, pie_err_msg());
    }
    /* the empty batch is a no-op; outputs without tokens are not */
    pie_forward_batch empty = { 0 };
    CHECK_OK(pie_backend_forward(b, &empty, NULL));
    empty.n_outputs = 1;
    empty.output_token_idx = (int32_t[]){ 0 };
    empty.samplers = &good.smp;
    pie_forward_out o;
    CHECK_OK(pie_forward_out_alloc(&empty, vocab, &o));
    CHECK(pie_backend_forward(b, &empty, &o) < 0, "output of an empty batch "
          "accepted");
    pie_forward_out_free(&o);
    free(before);
    free(after);
    pie_backend_free(b);
}

/* A model whose tensors do not match its config is refused, not read. */
static void test_bad_model(pie_model *m)
{
    pie_backend *b = NULL;
    pie_backend_opts o = { .n_threads = 1 };
    pie_tensor saved = m->w.layers[1].wq;
    m->w.layers[1].wq.shape[0] += 1;
    int rc = pie_backend_cpu_create(m, &o, &b);
    CHECK(rc == PIE_EFORMAT && !b, "wrong wq shape: rc %d", rc);
    printf("  refused: %s\n", pie_err_msg());
    m->w.layers[1].wq = saved;
    saved = m->w.layers[0].w_down;
    m->w.layers[0].w_down.data = NULL;
    rc = pie_backend_cpu_create(m, &o, &b);
    CHECK(rc == PIE_ENOTFOUND && !b, "missing w_down: rc %d", rc);
    printf("  refused: %s\n", pie_err_msg());
    m->w.layers[0].w_down = saved;
    pie_backend_opts bad = { .page_size = -4 };
    rc = pie_backend_cpu_create(m, &bad, &b);
    CHECK(rc == PIE_EINVAL && !b, "page_size -4: rc %d", rc);
    int32_t heads = m->cfg.n_kv_heads;
    m->cfg.n_kv_heads = 3;   /* 8 heads are not a multiple of 3 */
    rc = pie_backend_cpu_create(m, &o, &b);
    CHECK(rc == PIE_EUNSUPPORTED && !b, "3 kv heads: rc %d", rc);
    m->cfg.n_kv_heads = heads;
    CHECK_OK(pie_backend_cpu_create(m, &o, &b));
    CHECK(b->n_pages == 8192 / 16 && b->page_size == 16,
          "default pool %d pages of %d", b->n_pages, b->page_size);
    pie_backend_free(b);
}

/* PIE_CPU_MAX_TOKENS=5: a forward of 6 tokens is refused with PIE_ELIMIT
 * and leaves the pool as it was, one of 5 runs; values outside 1..2^24
 * stop creation with PIE_EINVAL. */
static void test_max_tokens(pie_model *m)
{
    const char *bad[3] = { "0", "16777217", "5x" };
    pie_backend_opts o = { .n_threads = 1 };
    pie_backend *b = NULL;
    for (int i = 0; i < 3; i++) {
        setenv("PIE_CPU_MAX_TOKENS", bad[i], 1);
        int rc = pie_backend_cpu_create(m, &o, &b);
        CHECK(rc == PIE_EINVAL && !b, "PIE_CPU_MAX_TOKENS=%s: rc %d", bad[i], rc);
    }
    setenv("PIE_CPU_MAX_TOKENS", "5", 1);
    b = make_backend(m, 4, 8);
    unsetenv("PIE_CPU_MAX_TOKENS");
    CHECK(b->max_tokens == 5, "max_tokens %d, expected 5", b->max_tokens);
    int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 }, toks[6] = { 1, 2, 3, 4, 5, 6 };
    char *before = malloc(b->page_bytes * 8), *after = malloc(b->page_bytes * 8);
    CHECK_OK(b->ops->download(b, all, 8, before));
    seq s;
    seq_init(&s, 0, 2, 0);
    pie_forward_out out;
    step_req rq = { &s, 6, toks, NULL, 0 };
    int rc = step_rc(b, &rq, 1, &out, NULL, NULL);
    pie_forward_out_free(&out);
    CHECK(rc == PIE_ELIMIT && s.len == 0, "6 tokens of at most 5: rc %d", rc);
    CHECK_OK(b->ops->download(b, all, 8, after));
    CHECK(memcmp(before, after, b->page_bytes * 8) == 0,
          "a refused forward wrote the pool");
    rq.n_new = 5;
    step(b, &rq, 1, &out);
    pie_forward_out_free(&out);
    CHECK(s.len == 5, "5 tokens: kv %d", s.len);
    printf("  PIE_CPU_MAX_TOKENS=5: 6 tokens refused (%s), 5 run\n",
           pie_err_name(rc));
    free(before); free(after);
    pie_backend_free(b);
}

int main(int argc, char **argv)
{
    const char *only = argc > 1 ? argv[1] : NULL;
    if (!only || !strcmp(only, "stories")) {
        pie_model *m = load_model("stories260K");
        check_reference("stories260K", m, 16, 0, 1);
        check_reference("stories260K", m, 3, 1, 0);
        pie_model_free(m);
    }
    const char *tiny[3] = { "tiny-llama3", "tiny-qwen2", "tiny-qwen3" };
    for (int i = 0; i < 3 && (!only || !strcmp(only, "tiny")); i++) {
        pie_model *m = load_model(tiny[i]);
        check_reference(tiny[i], m, 16, 0, 1);
        /* page sizes 1, 3, 64 with shuffled pages on one model */
        int32_t sizes[3] = { 1, 3, 64 };
        for (int j = 0; j < 3 && i == 2; j++)
            check_reference(tiny[i], m, sizes[j], 1, 1);
        pie_model_free(m);
    }
    if (!only || !strcmp(only, "invariance")) {
        pie_model *m = load_model("stories260K");
        test_batch_mix(m);
        test_mask(m);
        test_pages(m);
        test_outputs(m);
        test_invalid(m);
        test_bad_model(m);
        test_max_tokens(m);
        pie_model_free(m);
    }
    TEST_DONE();
}
