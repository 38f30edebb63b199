/*
 * cpu.c — the CPU backend: float32 weights, a float32 paged KV pool, and the
 * batched forward of backend.h.
 *
 * Weights. pie_backend_cpu_create() converts every tensor of the model to
 * float32 (pie_tensor_to_f32) into buffers the backend owns, so the model
 * may be freed afterwards. A tied LM head shares the embedding buffer. Per
 * layer, wq/wk/wv are stacked into one (q_dim + 2*kv_dim, dim) matrix and
 * w_gate/w_up into one (2*hidden_dim, dim) matrix, so each is one matmul.
 *
 * KV pool. One calloc'ed float array of n_pages pages. A page holds, for
 * every layer, page_size K rows then page_size V rows of kv_dim =
 * n_kv_heads * head_dim floats:
 *
 *     kv[page][layer][0 = K, 1 = V][slot 0..page_size)[kv_head][head_dim]
 *
 * so a page is contiguous (page_bytes = n_layers * 2 * page_size * kv_dim
 * * 4) and download/upload are one memcpy per page; copy_slots copies
 * 2 * n_layers runs of n * kv_dim floats. Default n_pages (opts->n_pages
 * 0): enough pages for 8192 tokens. The pool is zeroed at creation; a slot
 * holds garbage only in the sense that it holds whatever was last written.
 *
 * Forward. After pie_batch_validate() nothing can fail except allocation,
 * which happens before the first KV write. All n_tokens tokens of all
 * requests go through each layer together: one sgemm per projection
 * (sgemv when there is one token), element-wise stages (RMSNorm, bias,
 * q/k norm, RoPE, KV append, SiLU) over chunks of CPU_ROWS tokens on the
 * worker pool. Attention is per request: a request with CPU_PREFILL_MIN or
 * more new tokens gathers its K/V into contiguous buffers and runs two
 * sgemms per head (scores, then probabilities times V) with the softmax
 * rows on the pool; smaller ones (decode) run one pool task per (token,
 * head) that reads the pages slot by slot. The final norm and the LM head
 * run only on output rows; sampling runs one output row per pool task.
 *
 * Threads: the pool has n_threads workers (the calling thread is one of
 * them) and does all the splitting: dense matmuls by slices of W's rows,
 * attention by (token, head) or (head, row block), element-wise stages by
 * token chunks. OpenBLAS runs single-threaded inside each task
 * (openblas_set_num_threads(1), process-wide), so two thread pools never
 * spin against each other. A backend runs one forward
 * at a time; callers serialize (the scheduler has one thread per device).
 *
 * Tokens a forward: no limit of its own; PIE_CPU_MAX_TOKENS=N (1..2^24)
 * sets one (max_tokens), refusing larger batches as the GPU refuses more
 * than 8192, so that the callers' splitting (chunked prompts, grouped
 * decode steps, the scheduler's batch cap) is tested without a GPU.
 */
#define _GNU_SOURCE
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_internal.h"
#include "common/pie_err.h"

#define CPU_DEFAULT_TOKENS 8192
#define CPU_PREFILL_MIN    8         /* new tokens for the sgemm attention */
#define CPU_ATT_FLOATS     (1 << 20) /* per-worker scores of the sgemm path */
#define CPU_ATT_ROWS       64        /* query rows per sgemm-path task     */
#define CPU_ROWS           16        /* tokens per element-wise pool task  */
#define CPU_MM_INLINE      (1 << 16) /* multiply-adds below which a matmul
                                        is not split across the pool       */

typedef struct cpu_layer {
    float *attn_norm;   /* (dim)                                */
    float *wqkv;        /* (q_dim + 2*kv_dim, dim): wq; wk; wv  */
    float *wo;          /* (dim, n_heads*head_dim)              */
    float *bq, *bk, *bv;/* (q_dim), (kv_dim), (kv_dim) or NULL  */
    float *q_norm;      /* (head_dim) or NULL                   */
    float *k_norm;      /* (head_dim) or NULL                   */
    float *ffn_norm;    /* (dim)                                */
    float *w_gu;        /* (2*hidden_dim, dim): w_gate; w_up    */
    float *w_down;      /* (dim, hidden_dim)                    */
} cpu_layer;

/* Per-forward buffers, grown on demand and kept between forwards. */
typedef struct cpu_state {
    int64_t  cap_tokens, cap_out, cap_kv;
    float   *x;         /* (n, dim) residual stream             */
    float   *xb;        /* (n, dim) normed input                */
    float   *q;         /* (n, q_dim)                           */
    float   *k, *v;     /* (n, kv_dim)                          */
    float   *att;       /* (n, q_dim) attention output          */
    float   *qkv;       /* (n, q_dim + 2*kv_dim) fused q|k|v    */
    float   *gu;        /* (n, 2*hidden_dim) fused gate|up      */
    float   *hb;        /* (n, hidden_dim) silu(gate) * up      */
    int32_t *tok_req;   /* (n) request of each token            */
    int32_t *tok_slot;  /* (n) KV slot of each token            */
    int32_t *req_kv;    /* (cap_reqs) kv_len of each request    */
    int64_t  cap_reqs;
    float   *xo;        /* (n_out, dim)                         */
    float   *logits;    /* (n_out, vocab)                       */
    int     *rcs;       /* (n_out) sampler results              */
    float   *scores;    /* (n_threads, cap_kv)                  */
    int32_t *att_tok;   /* (n) decode-path tokens               */
    float   *kbuf, *vbuf; /* (cap_kv, kv_dim) gathered K / V    */
    float   *att_s;     /* (n_threads, cap_s) prefill score rows */
    int64_t  cap_s;
} cpu_state;

typedef struct cpu_backend {
    pie_backend      base;       /* must stay first                     */
    pie_model_config cfg;        /* copy; base.cfg points here          */
    int32_t          q_dim, kv_dim;
    float           *tok_embed;  /* (vocab, dim)                        */
    float           *lm_head;    /* (vocab, dim); == tok_embed if tied  */
    float           *final_norm; /* (dim)                               */
    cpu_layer       *layers;     /* (n_layers)                          */
    float           *inv_freq;   /* (head_dim/2)                        */
    float           *kv;         /* (n_pages, page_floats), see above   */
    int64_t          page_floats;
    int32_t          n_threads;
    pie__cpu_pool   *pool;
    cpu_state        st;
} cpu_backend;

/* ------------------------------------------------------------- weights */

/* Converts tensor t (expected numel n) into a new float buffer. A missing
 * optional tensor leaves *dst NULL. */
static int load_into(const pie_tensor *t, int64_t n, int optional,
                     const char *name, int32_t layer, float *dst, int *found)
{
    char where[48] = "";
    if (layer >= 0) snprintf(where, sizeof where, "layer %d: ", layer);
    *found = 0;
    if (!t->data) {
        if (optional) return 0;
        return pie_err_set(PIE_ENOTFOUND, "cpu backend: %smissing tensor %s",
                           where, name);
    }
    if (pie_tensor_numel(t) != n)
        return pie_err_set(PIE_EFORMAT, "cpu backend: %stensor %s has %lld "
                           "elements, expected %lld", where, name,
                           (long long)pie_tensor_numel(t), (long long)n);
    pie_tensor_to_f32(t, 0, n, dst);
    *found = 1;
    return 0;
}

/* Converts tensor t (expected numel n) into a new float buffer. A missing
 * optional tensor leaves *dst NULL. */
static int load_f32(const pie_tensor *t, int64_t n, int optional,
                    const char *name, int32_t layer, float **dst)
{
    *dst = NULL;
    if (!t->data && optional) return 0;
    float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (!p)
        return pie_err_set(PIE_ENOMEM, "cpu backend: out of memory for %s",
                           name);
    int found, rc = load_into(t, n, optional, name, layer, p, &found);
    if (rc) { free(p); return rc; }
    *dst = p;
    return 0;
}

/* Loads tensors ts[0..k) (ns[i] elements each) one after another into one
 * new buffer, for fused matmuls. */
static int load_fused(const pie_tensor *const *ts, const int64_t *ns, int k,
                      const char *const *names, int32_t layer, float **dst)
{
    int64_t total = 0;
    for (int i = 0; i < k; i++) total += ns[i];
    *dst = malloc(sizeof(float) * (size_t)total);
    if (!*dst)
        return pie_err_set(PIE_ENOMEM, "cpu backend: out of memory for %s",
                           names[0]);
    for (int i = 0, found, off = 0; i < k; off += (int)ns[i], i++) {
        int rc = load_into(ts[i], ns[i], 0, names[i], layer, *dst + off,
                           &found);
        if (rc) return rc;
    }
    return 0;
}

static int load_layer(cpu_backend *b, const pie_layer_weights *w, int32_t l)
{
    const pie_model_config *c = &b->cfg;
    cpu_layer *L = &b->layers[l];
    int64_t d = c->dim, hd = c->head_dim, h = c->hidden_dim;
    int64_t qd = b->q_dim, kd = b->kv_dim;
    int rc;
    const pie_tensor *qkv[3] = { &w->wq, &w->wk, &w->wv };
    const pie_tensor *gu[2] = { &w->w_gate, &w->w_up };
    const char *qkv_names[3] = { "wq", "wk", "wv" };
    const char *gu_names[2] = { "w_gate", "w_up" };
    int64_t qkv_n[3] = { qd * d, kd * d, kd * d }, gu_n[2] = { h * d, h * d };
    if ((rc = load_f32(&w->attn_norm, d, 0, "attn_norm", l, &L->attn_norm)) ||
        (rc = load_fused(qkv, qkv_n, 3, qkv_names, l, &L->wqkv)) ||
        (rc = load_f32(&w->wo, d * qd, 0, "wo", l, &L->wo)) ||
        (rc = load_f32(&w->ffn_norm, d, 0, "ffn_norm", l, &L->ffn_norm)) ||
        (rc = load_fused(gu, gu_n, 2, gu_names, l, &L->w_gu)) ||
        (rc = load_f32(&w->w_down, d * h, 0, "w_down", l, &L->w_down)))
        return rc;
    int nb = !c->qkv_bias, nn = !c->qk_norm;
    if ((rc = load_f32(&w->bq, qd, nb, "bq", l, &L->bq)) ||
        (rc = load_f32(&w->bk, kd, nb, "bk", l, &L->bk)) ||
        (rc = load_f32(&w->bv, kd, nb, "bv", l, &L->bv)) ||
        (rc = load_f32(&w->q_norm, hd, nn, "q_norm", l, &L->q_norm)) ||
        (rc = load_f32(&w->k_norm, hd, nn, "k_norm", l, &L->k_norm)))
        return rc;
    return 0;
}

static int check_config(const pie_model_config *c)
{
    if (c->dim < 1 || c->n_layers < 1 || c->n_layers > PIE_MAX_LAYERS ||
        c->n_heads < 1 || c->n_kv_heads < 1 || c->head_dim < 2 ||
        c->head_dim % 2 || c->hidden_dim < 1 || c->vocab_size < 1 ||
        c->n_heads % c->n_kv_heads)
        return pie_err_set(PIE_EUNSUPPORTED, "cpu backend: unsupported "
                           "shape (dim %d, layers %d, heads %d/%d, head_dim "
                           "%d, hidden %d, vocab %d)", c->dim, c->n_layers,
                           c->n_heads, c->n_kv_heads, c->head_dim,
                           c->hidden_dim, c->vocab_size);
    return 0;
}

static int load_weights(cpu_backend *b, const pie_model *m)
{
    const pie_model_config *c = &b->cfg;
    int64_t vd = (int64_t)c->vocab_size * c->dim;
    int rc = load_f32(&m->w.tok_embed, vd, 0, "tok_embed", -1, &b->tok_embed);
    if (!rc) rc = load_f32(&m->w.final_norm, c->dim, 0, "final_norm", -1,
                           &b->final_norm);
    if (rc) return rc;
    if (m->w.lm_head.data == NULL || m->w.lm_head.data == m->w.tok_embed.data)
        b->lm_head = b->tok_embed;
    else if ((rc = load_f32(&m->w.lm_head, vd, 0, "lm_head", -1, &b->lm_head)))
        return rc;
    b->layers = calloc((size_t)c->n_layers, sizeof *b->layers);
    if (!b->layers) return pie_err_set(PIE_ENOMEM, "cpu backend: out of memory");
    for (int32_t l = 0; l < c->n_layers; l++)
        if ((rc = load_layer(b, &m->w.layers[l], l))) return rc;
    return 0;
}

/* ------------------------------------------------------------- state */

static int grow(void **p, int64_t n, size_t elem)
{
    void *q = realloc(*p, (size_t)(n > 0 ? n : 1) * elem);
    if (!q) return pie_err_set(PIE_ENOMEM, "cpu backend: out of memory for "
                               "forward buffers");
    *p = q;
    return 0;
}

static int state_reserve(cpu_backend *b, int64_t n, int64_t n_reqs,
                         int64_t n_out, int64_t max_kv)
{
    cpu_state *s = &b->st;
    const pie_model_config *c = &b->cfg;
    int rc = 0;
    if (n_reqs > s->cap_reqs) {
        if ((rc = grow((void **)&s->req_kv, n_reqs, 4))) return rc;
        s->cap_reqs = n_reqs;
    }
    if (n > s->cap_tokens) {
        if ((rc = grow((void **)&s->x, n * c->dim, 4)) ||
            (rc = grow((void **)&s->xb, n * c->dim, 4)) ||
            (rc = grow((void **)&s->q, n * b->q_dim, 4)) ||
            (rc = grow((void **)&s->k, n * b->kv_dim, 4)) ||
            (rc = grow((void **)&s->v, n * b->kv_dim, 4)) ||
            (rc = grow((void **)&s->att, n * b->q_dim, 4)) ||
            (rc = grow((void **)&s->hb, n * c->hidden_dim, 4)) ||
            (rc = grow((void **)&s->qkv, n * (b->q_dim + 2 * b->kv_dim), 4)) ||
            (rc = grow((void **)&s->gu, n * 2 * c->hidden_dim, 4)) ||
            (rc = grow((void **)&s->tok_req, n, 4)) ||
            (rc = grow((void **)&s->tok_slot, n, 4)) ||
            (rc = grow((void **)&s->att_tok, n, 4)))
            return rc;
        s->cap_tokens = n;
    }
    if (n_out > s->cap_out) {
        if ((rc = grow((void **)&s->xo, n_out * c->dim, 4)) ||
            (rc = grow((void **)&s->logits, n_out * c->vocab_size, 4)) ||
            (rc = grow((void **)&s->rcs, n_out, sizeof(int))))
            return rc;
        s->cap_out = n_out;
    }
    if (max_kv > s->cap_kv) {
        if ((rc = grow((void **)&s->scores, max_kv * b->n_threads, 4)) ||
            (rc = grow((void **)&s->kbuf, max_kv * b->kv_dim, 4)) ||
            (rc = grow((void **)&s->vbuf, max_kv * b->kv_dim, 4)))
            return rc;
        s->cap_kv = max_kv;
    }
    int64_t need_s = max_kv > CPU_ATT_FLOATS ? max_kv : CPU_ATT_FLOATS;
    if (n > 0 && need_s > s->cap_s) {
        if ((rc = grow((void **)&s->att_s, need_s * b->n_threads, 4)))
            return rc;
        s->cap_s = need_s;
    }
    return 0;
}

static void state_free(cpu_state *s)
{
    free(s->x); free(s->xb); free(s->q); free(s->k); free(s->v);
    free(s->att); free(s->hb); free(s->qkv);
    free(s->gu); free(s->tok_req);
    free(s->tok_slot); free(s->req_kv); free(s->xo); free(s->logits);
    free(s->rcs); free(s->scores); free(s->att_tok); free(s->kbuf);
    free(s->vbuf); free(s->att_s);
}

/* ------------------------------------------------------------- forward */

static inline float *kv_row(cpu_backend *b, int32_t page, int32_t layer,
                            int which, int32_t off)
{
    int64_t ps = b->base.page_size;
    return b->kv + page * b->page_floats +
           (((int64_t)layer * 2 + which) * ps + off) * b->kv_dim;
}

typedef struct fwd_ctx {
    cpu_backend             *b;
    const pie_forward_batch *batch;
    pie_forward_out         *out;
    int32_t                  layer;
    int32_t                 *tokens;   /* decode-path token list          */
    int64_t                  kv_len;   /* prefill: current request's kv   */
    int32_t                  q0;       /* prefill: request's first token  */
    int32_t                  n_new;    /* prefill: its new tokens         */
    int32_t                  rows;     /* prefill: query rows per task    */
    int                      stage;    /* element-wise stage (STAGE_*)    */
} fwd_ctx;

/* The allowed-slot runs of token t: its mask, or {0, slot+1} (causal),
 * the latter stored in tmp[2]. */
static const uint32_t *token_runs(fwd_ctx *c, int32_t t, uint32_t tmp[2],
                                  uint32_t *n)
{
    const pie_forward_batch *bt = c->batch;
    if (bt->mask_indptr) {
        *n = bt->mask_indptr[t + 1] - bt->mask_indptr[t];
        return bt->mask_runs + bt->mask_indptr[t];
    }
    tmp[0] = 0;
    tmp[1] = (uint32_t)c->b->st.tok_slot[t] + 1;
    *n = 2;
    return tmp;
}

static inline float dot(const float *a, const float *b, int32_t n)
{
    float s[8] = { 0 };
    int32_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int j = 0; j < 8; j++) s[j] += a[d + j] * b[d + j];
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; d < n; d++) r += a[d] * b[d];
    return r;
}

static inline void axpy(float *o, float a, const float *x, int32_t n)
{
    for (int32_t d = 0; d < n; d++) o[d] += a * x[d];
}

/* Scores q·k * scale over slots [lo, hi) into sc[slot]; returns the max of
 * mx and those scores. Walks the request's pages a page at a time. */
static float attn_scores(fwd_ctx *c, const float *q, const int32_t *pages,
                         int32_t kvh, int64_t lo, int64_t hi, float *sc,
                         float mx)
{
    cpu_backend *b = c->b;
    int32_t hd = b->cfg.head_dim, ps = b->base.page_size, kd = b->kv_dim;
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t s = lo; s < hi;) {
        int32_t off = (int32_t)(s % ps);
        int64_t end = s - off + ps < hi ? s - off + ps : hi;
        const float *k = kv_row(b, pages[s / ps], c->layer, 0, off) +
                         (int64_t)kvh * hd;
        for (; s < end; s++, k += kd) {
            sc[s] = dot(q, k, hd) * scale;
            if (sc[s] > mx) mx = sc[s];
        }
    }
    return mx;
}

static double attn_values(fwd_ctx *c, float *o, const int32_t *pages,
                          int32_t kvh, int64_t lo, int64_t hi, float *sc,
                          float mx)
{
    cpu_backend *b = c->b;
    int32_t hd = b->cfg.head_dim, ps = b->base.page_size, kd = b->kv_dim;
    double sum = 0.0;
    for (int64_t s = lo; s < hi;) {
        int32_t off = (int32_t)(s % ps);
        int64_t end = s - off + ps < hi ? s - off + ps : hi;
        const float *v = kv_row(b, pages[s / ps], c->layer, 1, off) +
                         (int64_t)kvh * hd;
        for (; s < end; s++, v += kd) {
            float e = expf(sc[s] - mx);
            sum += e;
            axpy(o, e, v, hd);
        }
    }
    return sum;
}

/* Decode path: one (token, head) of paged attention read slot by slot. */
static void attn_task(void *ctx, int64_t task, int32_t worker)
{
    fwd_ctx *c = ctx;
    cpu_backend *b = c->b;
    const pie_forward_batch *bt = c->batch;
    int32_t nh = b->cfg.n_heads, hd = b->cfg.head_dim;
    int32_t t = c->tokens[task / nh], h = (int32_t)(task % nh);
    int32_t kvh = h / (nh / b->cfg.n_kv_heads), r = b->st.tok_req[t];
    const int32_t *pages = bt->kv_page_indices + bt->kv_page_indptr[r];
    const float *q = b->st.q + ((int64_t)t * nh + h) * hd;
    float *o = b->st.att + ((int64_t)t * nh + h) * hd;
    float *sc = b->st.scores + (int64_t)worker * b->st.cap_kv;
    memset(o, 0, sizeof *o * (size_t)hd);
    uint32_t tmp[2], n_runs;
    const uint32_t *runs = token_runs(c, t, tmp, &n_runs);
    float mx = -INFINITY;
    int64_t pos = 0;
    for (uint32_t i = 0; i < n_runs; pos += runs[i], i++)
        if (i & 1) mx = attn_scores(c, q, pages, kvh, pos, pos + runs[i], sc,
                                    mx);
    if (mx == -INFINITY) return;   /* attends to nothing: zero output */
    double sum = 0.0;
    pos = 0;
    for (uint32_t i = 0; i < n_runs; pos += runs[i], i++)
        if (i & 1) sum += attn_values(c, o, pages, kvh, pos, pos + runs[i],
                                      sc, mx);
    float inv = (float)(1.0 / sum);
    for (int32_t d = 0; d < hd; d++) o[d] *= inv;
}

/* Prefill path: softmax of one score row (kv_len slots) over token t's
 * allowed runs; every other slot becomes 0. */
static void softmax_row(fwd_ctx *c, float *row, int32_t t)
{
    uint32_t tmp[2], n_runs;
    const uint32_t *runs = token_runs(c, t, tmp, &n_runs);
    float mx = -INFINITY;
    int64_t pos = 0;
    for (uint32_t j = 0; j < n_runs; pos += runs[j], j++)
        for (int64_t s = pos; (j & 1) && s < pos + runs[j]; s++)
            if (row[s] > mx) mx = row[s];
    double sum = 0.0;
    pos = 0;
    for (uint32_t j = 0; j < n_runs; pos += runs[j], j++)
        for (int64_t s = pos; s < pos + runs[j]; s++) {
            row[s] = (j & 1) ? expf(row[s] - mx) : 0.0f;
            sum += row[s];
        }
    for (int64_t s = pos; s < c->kv_len; s++) row[s] = 0.0f;
    if (sum == 0.0) return;   /* attends to nothing: zero output */
    float inv = (float)(1.0 / sum);
    for (int64_t s = 0; s < pos; s++) row[s] *= inv;
}

/* Copies request r's K and V rows of the current layer into kbuf/vbuf,
 * (kv_len, kv_dim) each, contiguous. */
static void gather_kv(fwd_ctx *c, int32_t r)
{
    cpu_backend *b = c->b;
    const pie_forward_batch *bt = c->batch;
    int32_t ps = b->base.page_size;
    for (int64_t s = 0; s < c->kv_len; s += ps) {
        int32_t page = bt->kv_page_indices[bt->kv_page_indptr[r] + s / ps];
        int64_t n = c->kv_len - s < ps ? c->kv_len - s : ps;
        size_t bytes = sizeof(float) * (size_t)(n * b->kv_dim);
        memcpy(b->st.kbuf + s * b->kv_dim, kv_row(b, page, c->layer, 0, 0),
               bytes);
        memcpy(b->st.vbuf + s * b->kv_dim, kv_row(b, page, c->layer, 1, 0),
               bytes);
    }
}

/* Prefill path, one task = (head, block of CPU_ATT_ROWS query rows) of
 * request c->req: S = Q·Kᵀ, softmax rows, O = S·V, on the worker's own
 * score buffer, over the K/V that gather_kv() laid out contiguously. */
static void prefill_task(void *ctx, int64_t task, int32_t worker)
{
    fwd_ctx *c = ctx;
    cpu_backend *b = c->b;
    int32_t nh = b->cfg.n_heads, hd = b->cfg.head_dim, kd = b->kv_dim;
    int32_t qd = b->q_dim, group = nh / b->cfg.n_kv_heads;
    int32_t n_blocks = (c->n_new + c->rows - 1) / c->rows;
    int32_t h = (int32_t)(task / n_blocks), i0 = (int32_t)(task % n_blocks) *
                                                 c->rows;
    int32_t m = c->n_new - i0 < c->rows ? c->n_new - i0 : c->rows;
    int32_t kv = (int32_t)c->kv_len;
    float *S = b->st.att_s + (int64_t)worker * b->st.cap_s;
    const float *K = b->st.kbuf + (int64_t)(h / group) * hd;
    const float *V = b->st.vbuf + (int64_t)(h / group) * hd;
    int64_t row0 = (int64_t)(c->q0 + i0) * qd + (int64_t)h * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, kv, hd,
                1.0f / sqrtf((float)hd), b->st.q + row0, qd, K, kd, 0.0f, S,
                kv);
    for (int32_t i = 0; i < m; i++)
        softmax_row(c, S + (int64_t)i * kv, c->q0 + i0 + i);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, kv, 1.0f, S,
                kv, V, kd, 0.0f, b->st.att + row0, qd);
}

/* Prefill path for request r: gather its K/V once, then (head, row block)
 * tasks on the pool. */
static void attn_prefill(fwd_ctx *c, int32_t r)
{
    cpu_backend *b = c->b;
    const pie_forward_batch *bt = c->batch;
    c->q0 = bt->qo_indptr[r];
    c->n_new = bt->qo_indptr[r + 1] - c->q0;
    c->kv_len = b->st.req_kv[r];
    gather_kv(c, r);
    int64_t rows = b->st.cap_s / c->kv_len;
    c->rows = (int32_t)(rows < CPU_ATT_ROWS ? rows : CPU_ATT_ROWS);
    int32_t n_blocks = (c->n_new + c->rows - 1) / c->rows;
    pie__cpu_pool_run(b->pool, (int64_t)n_blocks * b->cfg.n_heads,
                      prefill_task, c);
}

/* Attention of every new token: requests with at least CPU_PREFILL_MIN new
 * tokens take the sgemm path, the rest the slot-by-slot path on the pool. */
static void attention(fwd_ctx *c)
{
    cpu_backend *b = c->b;
    const pie_forward_batch *bt = c->batch;
    int32_t n_small = 0;
    for (int32_t r = 0; r < bt->n_reqs; r++) {
        int32_t q0 = bt->qo_indptr[r], n_new = bt->qo_indptr[r + 1] - q0;
        if (n_new >= CPU_PREFILL_MIN) {
            attn_prefill(c, r);
            continue;
        }
        for (int32_t i = 0; i < n_new; i++) c->tokens[n_small++] = q0 + i;
    }
    pie__cpu_pool_run(b->pool, (int64_t)n_small * b->cfg.n_heads, attn_task,
                      c);
}

/* Writes K and V rows of layer l of tokens [t0, t1) into their slots. */
static void kv_append(cpu_backend *b, const pie_forward_batch *bt, int32_t l,
                      int32_t t0, int32_t t1)
{
    int32_t ps = b->base.page_size;
    size_t row = sizeof(float) * (size_t)b->kv_dim;
    for (int32_t t = t0; t < t1; t++) {
        int32_t r = b->st.tok_req[t], s = b->st.tok_slot[t];
        int32_t page = bt->kv_page_indices[bt->kv_page_indptr[r] + s / ps];
        memcpy(kv_row(b, page, l, 0, s % ps), b->st.k + (int64_t)t * b->kv_dim,
               row);
        memcpy(kv_row(b, page, l, 1, s % ps), b->st.v + (int64_t)t * b->kv_dim,
               row);
    }
}

/* Dense matmuls split W's rows (output columns) across the pool, each
 * slice one OpenBLAS call; small products run inline. */
typedef struct mm_job {
    float       *out;
    const float *x, *w;
    int32_t      n, in, outd, rows;
    float        beta;
} mm_job;

static void mm_task(void *ctx, int64_t task, int32_t worker)
{
    mm_job *j = ctx;
    int32_t r0 = (int32_t)task * j->rows;
    int32_t m = j->outd - r0 < j->rows ? j->outd - r0 : j->rows;
    pie__cpu_matmul(j->out + r0, j->outd, j->x, j->w + (int64_t)r0 * j->in,
                    j->n, j->in, m, j->beta);
}

static void matmul(cpu_backend *b, float *out, const float *x, const float *w,
                   int32_t n, int32_t in, int32_t outd, float beta)
{
    /* x (n, in), w (outd, in) -> out (n, outd) */
    mm_job j = { out, x, w, n, in, outd, outd, beta };
    int64_t work = (int64_t)n * in * outd;
    int32_t tasks = work < CPU_MM_INLINE ? 1 : b->n_threads;
    j.rows = (outd + tasks - 1) / tasks;
    j.rows = (j.rows + 15) / 16 * 16;
    pie__cpu_pool_run(b->pool, (outd + j.rows - 1) / j.rows, mm_task, &j);
}

/* Element-wise stages run over chunks of CPU_ROWS tokens on the pool. */
enum { STAGE_ATTN_NORM, STAGE_QKV, STAGE_FFN_NORM, STAGE_SILU };

/* Token rows [t0, t1) of stage c->stage. STAGE_QKV adds biases, applies
 * q/k RMSNorm and RoPE, and writes K/V into the tokens' slots (distinct
 * slots: pie_batch_validate rejects a batch writing one slot twice). */
static void stage_task(void *ctx, int64_t task, int32_t worker)
{
    fwd_ctx *c = ctx;
    cpu_backend *b = c->b;
    const pie_model_config *cf = &b->cfg;
    const cpu_layer *L = &b->layers[c->layer];
    cpu_state *s = &b->st;
    int32_t t0 = (int32_t)task * CPU_ROWS, d = cf->dim, hd = cf->head_dim;
    int32_t n = c->batch->n_tokens - t0 < CPU_ROWS ? c->batch->n_tokens - t0
                                                   : CPU_ROWS;
    int64_t qo = (int64_t)t0 * b->q_dim, ko = (int64_t)t0 * b->kv_dim;
    switch (c->stage) {
    case STAGE_ATTN_NORM:
    case STAGE_FFN_NORM:
        pie__cpu_rmsnorm(s->xb + (int64_t)t0 * d, s->x + (int64_t)t0 * d,
                         c->stage == STAGE_ATTN_NORM ? L->attn_norm
                                                     : L->ffn_norm,
                         n, d, cf->norm_eps);
        return;
    case STAGE_SILU:
        for (int32_t t = t0; t < t0 + n; t++) {
            int64_t h = cf->hidden_dim;
            float *g = s->gu + t * 2 * h;
            pie__cpu_silu_mul(g, g + h, h);
            memcpy(s->hb + t * h, g, sizeof(float) * (size_t)h);
        }
        return;
    }
    int32_t w = b->q_dim + 2 * b->kv_dim;
    for (int32_t t = t0; t < t0 + n; t++) {   /* split the fused q|k|v */
        const float *r = s->qkv + (int64_t)t * w;
        memcpy(s->q + (int64_t)t * b->q_dim, r, sizeof(float) * b->q_dim);
        memcpy(s->k + (int64_t)t * b->kv_dim, r + b->q_dim,
               sizeof(float) * b->kv_dim);
        memcpy(s->v + (int64_t)t * b->kv_dim, r + b->q_dim + b->kv_dim,
               sizeof(float) * b->kv_dim);
    }
    if (L->bq) {
        pie__cpu_add_bias(s->q + qo, L->bq, n, b->q_dim);
        pie__cpu_add_bias(s->k + ko, L->bk, n, b->kv_dim);
        pie__cpu_add_bias(s->v + ko, L->bv, n, b->kv_dim);
    }
    if (L->q_norm) {
        pie__cpu_rmsnorm(s->q + qo, s->q + qo, L->q_norm, n * cf->n_heads, hd,
                         cf->norm_eps);
        pie__cpu_rmsnorm(s->k + ko, s->k + ko, L->k_norm, n * cf->n_kv_heads,
                         hd, cf->norm_eps);
    }
    const int32_t *pos = c->batch->positions + t0;
    pie__cpu_rope(s->q + qo, pos, n, cf->n_heads, hd, b->inv_freq);
    pie__cpu_rope(s->k + ko, pos, n, cf->n_kv_heads, hd, b->inv_freq);
    kv_append(b, c->batch, c->layer, t0, t0 + n);
}

static void run_stage(fwd_ctx *c, int stage)
{
    c->stage = stage;
    int32_t n = c->batch->n_tokens;
    pie__cpu_pool_run(c->b->pool, (n + CPU_ROWS - 1) / CPU_ROWS, stage_task,
                      c);
}

static void layer_forward(cpu_backend *b, fwd_ctx *c, int32_t n)
{
    const pie_model_config *cf = &b->cfg;
    const cpu_layer *L = &b->layers[c->layer];
    cpu_state *s = &b->st;
    int32_t d = cf->dim;
    run_stage(c, STAGE_ATTN_NORM);
    matmul(b, s->qkv, s->xb, L->wqkv, n, d, b->q_dim + 2 * b->kv_dim, 0.0f);
    run_stage(c, STAGE_QKV);
    attention(c);
    matmul(b, s->x, s->att, L->wo, n, b->q_dim, d, 1.0f);
    run_stage(c, STAGE_FFN_NORM);
    matmul(b, s->gu, s->xb, L->w_gu, n, d, 2 * cf->hidden_dim, 0.0f);
    run_stage(c, STAGE_SILU);
    matmul(b, s->x, s->hb, L->w_down, n, cf->hidden_dim, d, 1.0f);
}

static void sample_task(void *ctx, int64_t o, int32_t worker)
{
    fwd_ctx *c = ctx;
    const pie_forward_batch *bt = c->batch;
    int32_t vocab = c->b->cfg.vocab_size;
    const uint32_t *runs = NULL;
    uint32_t n_runs = 0;
    if (bt->logit_mask_indptr) {
        static const uint32_t none[1];
        runs = bt->logit_mask_runs ? bt->logit_mask_runs +
                                         bt->logit_mask_indptr[o] : none;
        n_runs = bt->logit_mask_indptr[o + 1] - bt->logit_mask_indptr[o];
    }
    uint32_t off = c->out->value_indptr[o];
    c->b->st.rcs[o] = pie_sample_row(c->b->st.logits + o * vocab, vocab,
                                     &bt->samplers[o], runs, n_runs,
                                     &c->out->tokens[o],
                                     c->out->values + off, c->out->ids + off);
}

/* Fills tok_req / tok_slot / req_kv for a validated batch. */
static void plan_tokens(cpu_backend *b, const pie_forward_batch *bt)
{
    int32_t ps = b->base.page_size;
    for (int32_t r = 0; r < bt->n_reqs; r++) {
        int32_t np = bt->kv_page_indptr[r + 1] - bt->kv_page_indptr[r];
        int32_t kv_len = (np - 1) * ps + bt->kv_last_page_len[r];
        int32_t n_new = bt->qo_indptr[r + 1] - bt->qo_indptr[r];
        b->st.req_kv[r] = kv_len;
        for (int32_t i = 0; i < n_new; i++) {
            b->st.tok_req[bt->qo_indptr[r] + i] = r;
            b->st.tok_slot[bt->qo_indptr[r] + i] = kv_len - n_new + i;
        }
    }
}

static int64_t batch_max_kv(const pie_forward_batch *bt, int32_t ps)
{
    int64_t m = 0;
    for (int32_t r = 0; r < bt->n_reqs; r++) {
        int64_t np = bt->kv_page_indptr[r + 1] - bt->kv_page_indptr[r];
        int64_t kv = (np - 1) * ps + bt->kv_last_page_len[r];
        if (kv > m) m = kv;
    }
    return m;
}

static int cpu_forward(pie_backend *base, const pie_forward_batch *bt,
                       pie_forward_out *out)
{
    cpu_backend *b = (cpu_backend *)base;
    const pie_model_config *cf = &b->cfg;
    int rc = pie_batch_validate(bt, cf->vocab_size, base->page_size,
                                base->n_pages);
    if (!rc) rc = pie_forward_out_check(bt, cf->vocab_size, out);
    if (rc) return rc;
    if (base->max_tokens > 0 && bt->n_tokens > base->max_tokens)
        return pie_err_set(PIE_ELIMIT, "cpu backend: batch has %d tokens, at "
                           "most %d per forward (PIE_CPU_MAX_TOKENS); split "
                           "the prefill", bt->n_tokens, base->max_tokens);
    int32_t n = bt->n_tokens, d = cf->dim;
    rc = state_reserve(b, n, bt->n_reqs, bt->n_outputs,
                       batch_max_kv(bt, base->page_size));
    if (rc) return rc;
    if (n == 0) return 0;
    plan_tokens(b, bt);
    openblas_set_num_threads(1);
    cpu_state *s = &b->st;
    for (int32_t t = 0; t < n; t++)
        memcpy(s->x + (int64_t)t * d,
               b->tok_embed + (int64_t)bt->token_ids[t] * d,
               sizeof(float) * (size_t)d);
    fwd_ctx c = { .b = b, .batch = bt, .out = out, .tokens = s->att_tok };
    for (c.layer = 0; c.layer < cf->n_layers; c.layer++) layer_forward(b, &c, n);
    if (bt->n_outputs == 0) return 0;
    for (int32_t o = 0; o < bt->n_outputs; o++)
        memcpy(s->xo + (int64_t)o * d,
               s->x + (int64_t)bt->output_token_idx[o] * d,
               sizeof(float) * (size_t)d);
    pie__cpu_rmsnorm(s->xo, s->xo, b->final_norm, bt->n_outputs, d,
                     cf->norm_eps);
    matmul(b, s->logits, s->xo, b->lm_head, bt->n_outputs, d, cf->vocab_size,
           0.0f);
    pie__cpu_pool_run(b->pool, bt->n_outputs, sample_task, &c);
    /* only allocation can fail here, after the KV writes */
    for (int32_t o = 0; o < bt->n_outputs; o++)
        if (s->rcs[o])
            return pie_err_set(s->rcs[o], "cpu forward: sampling output %d "
                               "failed", o);
    return 0;
}

/* ------------------------------------------------------------- pages */

static int check_page(cpu_backend *b, int32_t page, const char *what)
{
    if (page < 0 || page >= b->base.n_pages)
        return pie_err_set(PIE_ERANGE, "cpu backend: %s page %d outside "
                           "0..%d", what, page, b->base.n_pages - 1);
    return 0;
}

static int cpu_copy_slots(pie_backend *base, int32_t src, int32_t src_off,
                          int32_t dst, int32_t dst_off, int32_t n)
{
    cpu_backend *b = (cpu_backend *)base;
    int32_t ps = base->page_size;
    int rc = check_page(b, src, "source");
    if (!rc) rc = check_page(b, dst, "destination");
    if (rc) return rc;
    if (n < 0 || src_off < 0 || dst_off < 0 || src_off > ps - n ||
        dst_off > ps - n)
        return pie_err_set(PIE_ERANGE, "cpu backend: copy of %d slots at "
                           "offsets %d -> %d exceeds page size %d", n,
                           src_off, dst_off, ps);
    for (int32_t l = 0; l < b->cfg.n_layers; l++)
        for (int which = 0; which < 2; which++)
            memmove(kv_row(b, dst, l, which, dst_off),
                    kv_row(b, src, l, which, src_off),
                    sizeof(float) * (size_t)n * (size_t)b->kv_dim);
    return 0;
}

static int check_pages(cpu_backend *b, const int32_t *pages, int32_t n,
                       const void *host)
{
    if (n < 0 || (n > 0 && (!pages || !host)))
        return pie_err_set(PIE_EINVAL, "cpu backend: bad page transfer "
                           "(%d pages)", n);
    for (int32_t i = 0; i < n; i++) {
        int rc = check_page(b, pages[i], "transfer");
        if (rc) return rc;
    }
    return 0;
}

static int cpu_download(pie_backend *base, const int32_t *pages, int32_t n,
                        void *host)
{
    cpu_backend *b = (cpu_backend *)base;
    int rc = check_pages(b, pages, n, host);
    if (rc) return rc;
    for (int32_t i = 0; i < n; i++)
        memcpy((char *)host + (size_t)i * base->page_bytes,
               b->kv + pages[i] * b->page_floats, base->page_bytes);
    return 0;
}

static int cpu_upload(pie_backend *base, const int32_t *pages, int32_t n,
                      const void *host)
{
    cpu_backend *b = (cpu_backend *)base;
    int rc = check_pages(b, pages, n, host);
    if (rc) return rc;
    for (int32_t i = 0; i < n; i++)
        memcpy(b->kv + pages[i] * b->page_floats,
               (const char *)host + (size_t)i * base->page_bytes,
               base->page_bytes);
    return 0;
}

/* ------------------------------------------------------------- lifetime */

static void cpu_destroy(pie_backend *base)
{
    cpu_backend *b = (cpu_backend *)base;
    if (!b) return;
    pie__cpu_pool_free(b->pool);
    if (b->layers) {
        for (int32_t l = 0; l < b->cfg.n_layers; l++) {
            cpu_layer *L = &b->layers[l];
            free(L->attn_norm); free(L->wqkv);
            free(L->wo); free(L->bq); free(L->bk); free(L->bv);
            free(L->q_norm); free(L->k_norm); free(L->ffn_norm);
            free(L->w_gu); free(L->w_down);
        }
        free(b->layers);
    }
    if (b->lm_head != b->tok_embed) free(b->lm_head);
    free(b->tok_embed);
    free(b->final_norm);
    free(b->inv_freq);
    free(b->kv);
    state_free(&b->st);
    free(b);
}

static const pie_backend_ops cpu_ops = {
    .forward    = cpu_forward,
    .copy_slots = cpu_copy_slots,
    .download   = cpu_download,
    .upload     = cpu_upload,
    .destroy    = cpu_destroy,
};

static int make_pool(cpu_backend *b, const pie_backend_opts *o)
{
    const pie_model_config *c = &b->cfg;
    int32_t ps = o && o->page_size > 0 ? o->page_size : 16;
    int32_t np = o && o->n_pages > 0 ? o->n_pages
                                     : (CPU_DEFAULT_TOKENS + ps - 1) / ps;
    if ((o && (o->page_size < 0 || o->n_pages < 0)) || ps > (1 << 20))
        return pie_err_set(PIE_EINVAL, "cpu backend: bad page_size %d or "
                           "n_pages %d", o ? o->page_size : ps,
                           o ? o->n_pages : np);
    b->page_floats = (int64_t)c->n_layers * 2 * ps * b->kv_dim;
    double bytes = (double)b->page_floats * 4.0 * np;
    if (bytes > 1e12)
        return pie_err_set(PIE_ENOMEM, "cpu backend: KV pool of %.0f bytes "
                           "is too large", bytes);
    b->kv = calloc((size_t)np * (size_t)b->page_floats, sizeof(float));
    if (!b->kv)
        return pie_err_set(PIE_ENOMEM, "cpu backend: cannot allocate a KV "
                           "pool of %d pages (%.0f MiB)", np,
                           bytes / 1048576.0);
    b->base.page_size = ps;
    b->base.n_pages = np;
    b->base.page_bytes = (uint64_t)b->page_floats * 4;
    return 0;
}

/* PIE_CPU_MAX_TOKENS (see the header) into *most: 0 where unset. */
static int env_max_tokens(int32_t *most)
{
    const char *e = getenv("PIE_CPU_MAX_TOKENS");
    char *end = NULL;
    long v = e ? strtol(e, &end, 10) : 0;
    *most = 0;
    if (!e) return 0;
    if (end == e || *end || v < 1 || v > (1L << 24))
        return pie_err_set(PIE_EINVAL, "cpu backend: PIE_CPU_MAX_TOKENS must "
                           "be 1..16777216 (got '%s')", e);
    *most = (int32_t)v;
    return 0;
}

int pie_backend_cpu_create(const pie_model *m, const pie_backend_opts *o,
                           pie_backend **out)
{
    *out = NULL;
    if (!m) return pie_err_set(PIE_EINVAL, "cpu backend: no model");
    int32_t most;
    int rc = check_config(&m->cfg);
    if (!rc) rc = env_max_tokens(&most);
    if (rc) return rc;
    cpu_backend *b = calloc(1, sizeof *b);
    if (!b) return pie_err_set(PIE_ENOMEM, "cpu backend: out of memory");
    b->cfg = m->cfg;
    b->base.ops = &cpu_ops;
    b->base.cfg = &b->cfg;
    b->base.name = "cpu";
    b->base.max_tokens = most;
    b->q_dim = m->cfg.n_heads * m->cfg.head_dim;
    b->kv_dim = m->cfg.n_kv_heads * m->cfg.head_dim;
    long nc = sysconf(_SC_NPROCESSORS_ONLN);
    b->n_threads = o && o->n_threads > 0 ? o->n_threads
                                         : (int32_t)(nc > 0 ? nc : 1);
    b->inv_freq = malloc(sizeof(float) * (size_t)(m->cfg.head_dim / 2));
    if (!b->inv_freq) {
        rc = pie_err_set(PIE_ENOMEM, "cpu backend: out of memory");
        goto err;
    }
    pie__cpu_rope_freqs(b->inv_freq, &b->cfg);
    if ((rc = load_weights(b, m)) || (rc = make_pool(b, o)) ||
        (rc = pie__cpu_pool_create(b->n_threads, &b->pool)))
        goto err;
    *out = &b->base;
    return 0;
err:
    cpu_destroy(&b->base);
    return rc;
}
