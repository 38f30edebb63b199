/*
 * cuda_backend.c — the CUDA backend: bf16 weights and KV pages on one GPU,
 * fp32 accumulation, cuBLASLt for the dense matmuls (gemv.cu instead in
 * decode steps of <= 16 rows where it times faster, see try_gemv) and
 * pie's own kernels (kernels.cu, attention.cu, sample.cu) for the rest.
 *
 * Device memory, allocated once at create time in this order:
 *   weights     embed (vocab, dim) bf16; per layer fused wqkv
 *               ((nh+2nkv)*hd, dim), wo (dim, nh*hd), fused w_gu
 *               (2*hidden, dim: gate rows then up rows), w_down (dim, hidden),
 *               all bf16; norms, biases f32; lm_head bf16 unless tied
 *   workspace   activations for up to MAX_TOKENS tokens per forward, split
 *               attention partials, logits and sort buffers for OUT_CHUNK
 *               output rows, the batch metadata buffer, cuBLASLt workspace
 *   KV pool     n_pages pages laid out as in cuda_kernels.h, sized from the
 *               free memory left (opts->mem_fraction, default 0.9) unless
 *               opts->n_pages asks for a number
 *
 * One forward: validate (pie_batch_validate, so a bad batch changes
 * nothing), pack every index array into one pinned buffer and copy it with
 * one cudaMemcpyAsync, run the layers on one stream, then the LM head over
 * the output rows only, OUT_CHUNK rows at a time, sampling on the device;
 * only sampled tokens and probe values are copied back. The residual stream
 * x is fp32; the wo and w_down matmuls add their products into it in their
 * epilogues (mm_add: cuBLASLt with beta = 1, gemv.cu's accumulating store),
 * so each RMSNorm only reads x. Steady decode batches replay a CUDA graph
 * of the layers (see run_layers_graphed).
 *
 * Attention work is planned on the host each forward (plan_attention):
 * prompts of FLASH_MIN tokens or more take the tensor-core prefill kernel
 * in 128-row tiles (fitems); decode steps and short chunks take the
 * tensor-core decode kernel, their items cut for its persistent grid
 * (gitems -> pieces, plan_dec / dec_plan.c) and cut items merged after it;
 * head dims the tensor-core kernels lack take the CUDA-core kernel (items,
 * split for occupancy, then merged).
 */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/prof.h"
#include "common/pie_err.h"

#define MAX_TOKENS  8192        /* tokens per forward                      */
#define OUT_CHUNK   256         /* output rows per LM-head pass            */
#define MM_CACHE    96          /* cached cuBLASLt plans                    */
#define TUNED_MAX   256         /* timed algorithm choices (shape, m bucket) */
#define LT_WS_BYTES (32u << 20)
#define GRAPH_CACHE 32          /* captured layer sequences (decode shapes) */
#define GRAPH_MAX_TOKENS 512    /* larger steps launch kernels directly     */

#define CK(call)                                                              \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess)                                                \
            return pie_err_set(PIE_EDEVICE, "cuda: %s (%s:%d: %s)",          \
                               cudaGetErrorString(e_), __FILE__, __LINE__,    \
                               #call);                                        \
    } while (0)

#define CKLT(call)                                                            \
    do {                                                                      \
        cublasStatus_t s_ = (call);                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                      \
            return pie_err_set(PIE_EDEVICE, "cublasLt: status %d (%s:%d)",   \
                               (int)s_, __FILE__, __LINE__);                  \
    } while (0)

typedef struct cuda_layer {
    float    *attn_norm;   /* (dim)                                        */
    uint16_t *wqkv;        /* ((nh+2nkv)*hd, dim)                          */
    float    *bqkv;        /* ((nh+2nkv)*hd) or NULL                       */
    float    *q_norm;      /* (hd) or NULL                                 */
    float    *k_norm;      /* (hd) or NULL                                 */
    uint16_t *wo;          /* (dim, nh*hd)                                 */
    float    *ffn_norm;    /* (dim)                                        */
    uint16_t *wgu;         /* (2*hidden, dim)                              */
    uint16_t *wdown;       /* (dim, hidden)                                */
} cuda_layer;

typedef struct mm_plan {
    int                     used;
    int32_t                 m, n, k, y_f32;
    cublasLtMatmulDesc_t    desc;
    cublasLtMatrixLayout_t  a, b, c;
    cublasLtMatmulAlgo_t    algo;
    int                     gemv_r; /* > 0: gemv.cu, r warps per block     */
} mm_plan;

/* The kernel arguments of one step's layers: two steps with equal keys
 * launch the same kernels with the same arguments (the data they read lives
 * at the same device addresses), so a graph captured for one replays the
 * other. */
typedef struct graph_key {
    void    *meta_dev;
    size_t   tok, pos, slot, req, kv_indptr, kv_len, pages, mask_off,
             mask_bits, items, merges, fitems, gitems, bstart, dmerges;
    int64_t  n, n_items, n_fitems, n_gitems, n_merges, max_slots, decode;
} graph_key;

typedef struct step_graph {
    graph_key        key;
    cudaGraphExec_t  exec;      /* NULL = free entry                        */
    uint64_t         used;      /* clock of the last launch (LRU)           */
} step_graph;

/* The timed winner for one matmul shape and bucket of m (see pick_algo). */
typedef struct tuned_algo {
    int32_t               n, k, y_f32, mb;
    cublasLtMatmulAlgo_t  algo;
    int32_t               gemv_r;  /* > 0: gemv.cu won (m <= 16 only)      */
} tuned_algo;

typedef struct cuda_backend {
    pie_backend       base;
    pie_model_config  cfg;
    int               device, n_sm, l2_bytes;
    int               split_blocks; /* PIE_CUDA_SPLIT_BLOCKS (default 2)   */
    int               random_fill; /* random:SHAPE: absent tensors filled  */
    cudaStream_t      st;
    cublasLtHandle_t  lt;
    void             *lt_ws;
    mm_plan           plans[MM_CACHE];
    int               plan_next;
    tuned_algo        tuned[TUNED_MAX];
    int               n_tuned, tuned_next;
    /* weights */
    uint16_t         *embed;      /* (vocab, dim)                           */
    uint16_t         *lm_head;    /* (vocab, dim); == embed when tied       */
    float            *final_norm; /* (dim)                                  */
    float            *inv_freq;   /* (hd/2) RoPE frequencies, llama3-scaled */
    cuda_layer       *layers;     /* (n_layers)                             */
    pie_cuda_kv       kv;
    /* workspace */
    float            *x;          /* (MAX_TOKENS, dim) residual stream      */
    float            *dx;         /* (MAX_TOKENS, dim) scratch output of    */
                                  /* wo / w_down plans at creation (steps   */
                                  /* add into x in the matmul: mm_add)      */
    uint16_t         *xb;         /* (MAX_TOKENS, max(dim, nh*hd))          */
    uint16_t         *qkv;        /* (MAX_TOKENS, (nh+2nkv)*hd)             */
    float            *q;          /* (MAX_TOKENS, nh*hd)                    */
    uint16_t         *att;        /* (MAX_TOKENS, nh*hd)                    */
    uint16_t         *gu;         /* (MAX_TOKENS, 2*hidden)                 */
    uint16_t         *h;          /* (MAX_TOKENS, hidden)                   */
    float            *part_o;     /* (max_parts, hd)                        */
    float            *part_ml;    /* (max_parts, 2)                         */
    int64_t           max_parts;
    uint16_t         *xo;         /* (OUT_CHUNK, dim)                       */
    float            *logits;     /* (OUT_CHUNK, vocab)                     */
    float            *sort_k[2];  /* (OUT_CHUNK, vocab)                     */
    int32_t          *sort_v[2];
    int32_t          *seg_off;    /* (OUT_CHUNK+1)                          */
    void             *sort_tmp;
    size_t            sort_tmp_bytes;
    int32_t          *d_tokens;   /* (OUT_CHUNK)                            */
    float            *d_values;   /* (OUT_CHUNK * vocab)                    */
    int32_t          *d_ids;      /* (OUT_CHUNK * vocab)                    */
    /* batch metadata: built in host, copied to pinned, then to device */
    uint8_t          *meta;       /* host build buffer                      */
    uint8_t          *meta_pin;   /* pinned copy                            */
    uint8_t          *meta_dev;
    size_t            meta_cap, meta_len, meta_dev_cap;
    int               meta_oom;
    pie_cuda_attn_item  *items;   /* host staging of attention work       */
    pie_cuda_merge_item *merges;
    int64_t           n_items, cap_items, n_merges, cap_merges;
    pie_cuda_attn_item  *fitems;  /* tensor-core prefill tiles             */
    int64_t           n_fitems, cap_fitems;
    pie_cuda_attn_item  *gitems;  /* tensor-core grouped (decode) items,   */
    int64_t           n_gitems, cap_gitems; /* whole, one per tile x head */
    pie_cuda_attn_item  *pieces;  /* gitems cut for the persistent grid    */
    int32_t          *bstart;     /* (dec_blocks + 1) see dec_plan.c       */
    pie_cuda_merge_item *dmerges; /* (dec_blocks) merges of cut items      */
    int64_t           cap_pieces;
    int               n_pieces, n_dmerges, dec_blocks; /* grid of the     */
                                                       /* decode kernel   */
    int               max_slots;  /* longest item of the current step     */
    /* CUDA graphs of the layer sequence, keyed by the kernel arguments */
    step_graph        graphs[GRAPH_CACHE];
    graph_key         last_key;   /* previous eager step's key              */
    uint64_t          graph_clock;
    int               graphs_off; /* PIE_CUDA_NO_GRAPH set                  */
    int               capture_failed; /* a capture failed: direct launches  */
    int64_t           n_captured, n_replayed;
    int64_t           n_gemv;      /* matmuls run by gemv.cu               */
    int               decode_step; /* this forward adds one token to every */
                                   /* request: gemv.cu may run (mm)        */
    pie_cuda_prof     prof;        /* PIE_CUDA_PROFILE=1 (prof.h)          */
    /* every device allocation, freed at destroy */
    void            **allocs;
    int               n_allocs, cap_allocs;
} cuda_backend;

/* ------------------------------------------------------------ allocation */

static int dalloc(cuda_backend *c, void **p, size_t bytes, const char *what)
{
    *p = NULL;
    if (bytes == 0) bytes = 16;
    if (c->n_allocs == c->cap_allocs) {
        int cap = c->cap_allocs ? 2 * c->cap_allocs : 64;
        void **a = realloc(c->allocs, sizeof *a * (size_t)cap);
        if (!a) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
        c->allocs = a;
        c->cap_allocs = cap;
    }
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        return pie_err_set(PIE_ENOMEM,
                           "cuda: cannot allocate %.2f GiB for %s (GPU %d has "
                           "%.2f of %.2f GiB free): the model does not fit; "
                           "use a GPU with more memory or a smaller model",
                           bytes / 1073741824.0, what, c->device,
                           fr / 1073741824.0, tot / 1073741824.0);
    }
    c->allocs[c->n_allocs++] = *p;
    return 0;
}

/* ------------------------------------------------------------- weights */

/* Copies tensor t (any dtype) into dst on the device as bf16 (bf16 = 1) or
 * f32, checking its size. A NULL tensor of a random:SHAPE model is filled on
 * the device (N(0, 0.02), or ones for norms). */
static int put_tensor(cuda_backend *c, void *dst, int bf16,
                      const pie_tensor *t, int64_t n, const char *name,
                      int layer, uint64_t seed, int is_norm)
{
    if (!t->data) {
        if (!c->random_fill)
            return pie_err_set(PIE_EFORMAT, "cuda: tensor %s of layer %d is "
                               "missing", name, layer);
        if (bf16)
            pie__cuda_fill_bf16(dst, n, seed, is_norm ? 1.0f : 0.02f, is_norm,
                                c->st);
        else
            pie__cuda_fill_f32(dst, n, 1.0f, c->st);
        CK(cudaGetLastError());
        return 0;
    }
    if (pie_tensor_numel(t) != n)
        return pie_err_set(PIE_EFORMAT,
                           "cuda: tensor %s of layer %d has %lld elements, "
                           "expected %lld", name, layer,
                           (long long)pie_tensor_numel(t), (long long)n);
    if (bf16 && t->dtype == PIE_DT_BF16) {
        CK(cudaMemcpy(dst, t->data, (size_t)n * 2, cudaMemcpyHostToDevice));
        return 0;
    }
    enum { CH = 1 << 22 };
    float *buf = malloc(sizeof(float) * CH);
    uint16_t *hb = bf16 ? malloc(sizeof(uint16_t) * CH) : NULL;
    if (!buf || (bf16 && !hb)) {
        free(buf); free(hb);
        return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    }
    int rc = 0;
    for (int64_t off = 0; off < n && !rc; off += CH) {
        int64_t k = n - off < CH ? n - off : CH;
        pie_tensor_to_f32(t, off, k, buf);
        cudaError_t e;
        if (bf16) {
            for (int64_t i = 0; i < k; i++) hb[i] = pie_f32_to_bf16(buf[i]);
            e = cudaMemcpy((uint16_t *)dst + off, hb, (size_t)k * 2,
                           cudaMemcpyHostToDevice);
        } else {
            e = cudaMemcpy((float *)dst + off, buf, (size_t)k * 4,
                           cudaMemcpyHostToDevice);
        }
        if (e != cudaSuccess)
            rc = pie_err_set(PIE_EDEVICE, "cuda: upload of %s: %s", name,
                             cudaGetErrorString(e));
    }
    free(buf);
    free(hb);
    return rc;
}

static int upload_layer(cuda_backend *c, const pie_model *m, int l)
{
    const pie_model_config *g = &c->cfg;
    const pie_layer_weights *w = &m->w.layers[l];
    cuda_layer *L = &c->layers[l];
    int64_t dim = g->dim, hd = g->head_dim, qd = (int64_t)g->n_heads * hd;
    int64_t kvd = (int64_t)g->n_kv_heads * hd, hid = g->hidden_dim;
    int64_t qkvd = qd + 2 * kvd;
    uint64_t s = 1000 + (uint64_t)l * 16;
    int rc;
#define TRY(x) do { if ((rc = (x))) return rc; } while (0)
    TRY(dalloc(c, (void **)&L->attn_norm, dim * 4, "attn_norm"));
    TRY(dalloc(c, (void **)&L->ffn_norm, dim * 4, "ffn_norm"));
    TRY(dalloc(c, (void **)&L->wqkv, qkvd * dim * 2, "wqkv"));
    TRY(dalloc(c, (void **)&L->wo, dim * qd * 2, "wo"));
    TRY(dalloc(c, (void **)&L->wgu, 2 * hid * dim * 2, "w_gate/w_up"));
    TRY(dalloc(c, (void **)&L->wdown, dim * hid * 2, "w_down"));
    TRY(put_tensor(c, L->attn_norm, 0, &w->attn_norm, dim, "attn_norm", l, s, 1));
    TRY(put_tensor(c, L->ffn_norm, 0, &w->ffn_norm, dim, "ffn_norm", l, s + 1, 1));
    TRY(put_tensor(c, L->wqkv, 1, &w->wq, qd * dim, "wq", l, s + 2, 0));
    TRY(put_tensor(c, L->wqkv + qd * dim, 1, &w->wk, kvd * dim, "wk", l, s + 3, 0));
    TRY(put_tensor(c, L->wqkv + (qd + kvd) * dim, 1, &w->wv, kvd * dim, "wv",
                   l, s + 4, 0));
    TRY(put_tensor(c, L->wo, 1, &w->wo, dim * qd, "wo", l, s + 5, 0));
    TRY(put_tensor(c, L->wgu, 1, &w->w_gate, hid * dim, "w_gate", l, s + 6, 0));
    TRY(put_tensor(c, L->wgu + hid * dim, 1, &w->w_up, hid * dim, "w_up", l,
                   s + 7, 0));
    TRY(put_tensor(c, L->wdown, 1, &w->w_down, dim * hid, "w_down", l, s + 8, 0));
    if (g->qkv_bias) {
        TRY(dalloc(c, (void **)&L->bqkv, qkvd * 4, "qkv bias"));
        if (!w->bq.data || !w->bk.data || !w->bv.data)
            return pie_err_set(PIE_EFORMAT, "cuda: layer %d lacks q/k/v bias", l);
        TRY(put_tensor(c, L->bqkv, 0, &w->bq, qd, "bq", l, 0, 0));
        TRY(put_tensor(c, L->bqkv + qd, 0, &w->bk, kvd, "bk", l, 0, 0));
        TRY(put_tensor(c, L->bqkv + qd + kvd, 0, &w->bv, kvd, "bv", l, 0, 0));
    }
    if (g->qk_norm) {
        TRY(dalloc(c, (void **)&L->q_norm, hd * 4, "q_norm"));
        TRY(dalloc(c, (void **)&L->k_norm, hd * 4, "k_norm"));
        TRY(put_tensor(c, L->q_norm, 0, &w->q_norm, hd, "q_norm", l, 0, 1));
        TRY(put_tensor(c, L->k_norm, 0, &w->k_norm, hd, "k_norm", l, 0, 1));
    }
    return 0;
}

/* RoPE inverse frequencies as Hugging Face computes them, with the llama3
 * rescaling when configured. */
static void rope_freqs(const pie_model_config *g, float *f)
{
    int half = g->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float inv = (float)(1.0 / pow((double)g->rope_theta,
                                      (double)(2 * i) / g->head_dim));
        if (g->rope_llama3) {
            double lo = g->rope_orig_max_pos / (double)g->rope_low_freq_factor;
            double hi = g->rope_orig_max_pos / (double)g->rope_high_freq_factor;
            double wl = 2.0 * M_PI / inv;
            if (wl > lo) {
                inv = inv / g->rope_factor;
            } else if (!(wl < hi)) {
                double sm = (g->rope_orig_max_pos / wl - g->rope_low_freq_factor) /
                            (g->rope_high_freq_factor - g->rope_low_freq_factor);
                inv = (float)((1.0 - sm) * inv / g->rope_factor + sm * inv);
            }
        }
        f[i] = inv;
    }
}

static int upload_weights(cuda_backend *c, const pie_model *m)
{
    const pie_model_config *g = &c->cfg;
    int64_t vd = (int64_t)g->vocab_size * g->dim;
    int rc;
    c->layers = calloc((size_t)g->n_layers, sizeof *c->layers);
    if (!c->layers) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    TRY(dalloc(c, (void **)&c->embed, vd * 2, "embedding"));
    TRY(put_tensor(c, c->embed, 1, &m->w.tok_embed, vd, "tok_embed", -1, 7, 0));
    int tied = g->tie_embeddings || !m->w.lm_head.data ||
               m->w.lm_head.data == m->w.tok_embed.data;
    if (c->random_fill && !m->w.lm_head.data) tied = g->tie_embeddings;
    if (tied) {
        c->lm_head = c->embed;
    } else {
        TRY(dalloc(c, (void **)&c->lm_head, vd * 2, "lm_head"));
        TRY(put_tensor(c, c->lm_head, 1, &m->w.lm_head, vd, "lm_head", -1, 8, 0));
    }
    TRY(dalloc(c, (void **)&c->final_norm, g->dim * 4, "final_norm"));
    TRY(put_tensor(c, c->final_norm, 0, &m->w.final_norm, g->dim, "final_norm",
                   -1, 9, 1));
    for (int l = 0; l < g->n_layers; l++) TRY(upload_layer(c, m, l));
    float f[512];
    rope_freqs(g, f);
    TRY(dalloc(c, (void **)&c->inv_freq, sizeof(float) * g->head_dim / 2, "rope"));
    CK(cudaMemcpy(c->inv_freq, f, sizeof(float) * g->head_dim / 2,
                  cudaMemcpyHostToDevice));
    return 0;
}

/* --------------------------------------------------------------- matmul */

/* y = x W^T, or (acc, f32 y) y += x W^T in the matmul's epilogue. */
static cublasStatus_t mm_run(cuda_backend *c, mm_plan *p,
                             const cublasLtMatmulAlgo_t *a, const uint16_t *W,
                             const uint16_t *x, void *y, int acc)
{
    float alpha = 1.0f, beta = acc ? 1.0f : 0.0f;
    return cublasLtMatmul(c->lt, p->desc, &alpha, W, p->a, x, p->b, &beta, y,
                          p->c, y, p->c, a, c->lt_ws, LT_WS_BYTES, c->st);
}

/* One candidate of a timing run: cuBLASLt algo a, or (gemv_r > 0) gemv.cu
 * with gemv_r warps per block over gemv_m rows of x (>= the plan's m: the
 * operands must hold gemv_m rows; warm_plans' buffers hold >= OUT_CHUNK). */
typedef struct mm_cand {
    const cublasLtMatmulAlgo_t *a;
    int                         gemv_r, gemv_m;
} mm_cand;

static int cand_run(cuda_backend *c, mm_plan *p, mm_cand k, const uint16_t *W,
                    const uint16_t *x, void *y)
{
    if (k.gemv_r > 0)
        return pie__cuda_gemv(y, p->y_f32, W, p->n, p->k, x, k.gemv_m,
                              k.gemv_r, pie__cuda_pdl(), c->st) == 0;
    return mm_run(c, p, k.a, W, x, y, 0) == CUBLAS_STATUS_SUCCESS;
}

/* Fastest of `reps` runs (ms) of candidate k, writing y, the call's own output
 * (overwritten by the real call next); W and x are the real operands
 * (their values do not matter).
 * Before each run a read of a sampler buffer twice as large as the L2
 * cache evicts W, as in a real step where the weights stream from memory
 * (a read, not a memset: dirty lines would be written back during the
 * timed run). */
static float time_cand(cuda_backend *c, mm_plan *p, mm_cand k,
                       const uint16_t *W, const uint16_t *x, void *y, int reps)
{
    size_t flush = (size_t)OUT_CHUNK * c->cfg.vocab_size * 4;
    if (flush > (size_t)c->l2_bytes * 2) flush = (size_t)c->l2_bytes * 2;
    /* As in a step, a small kernel runs just before (an RMSNorm of m rows
     * into the sampler's scratch), so the timing includes how each
     * candidate starts after a kernel (gemv.cu: early, under PDL). */
    int lead = (size_t)p->m * c->cfg.dim * 2 <= (size_t)OUT_CHUNK *
                                                c->cfg.vocab_size * 4;
    float best = INFINITY;
    cudaEvent_t e0, e1;
    if (cudaEventCreate(&e0) != cudaSuccess) return INFINITY;
    if (cudaEventCreate(&e1) != cudaSuccess) { cudaEventDestroy(e0); return INFINITY; }
    int ok = cand_run(c, p, k, W, x, y);
    for (int i = 0; ok && i < reps; i++) {
        float ms = INFINITY;
        pie__cuda_l2_flush(c->sort_k[1], (int64_t)(flush / 4), c->sort_k[0],
                           c->st);
        cudaEventRecord(e0, c->st);
        if (lead)
            pie__cuda_rmsnorm((uint16_t *)c->sort_k[0], c->x, c->final_norm,
                              NULL, p->m, c->cfg.dim, c->cfg.norm_eps, c->st);
        ok = cand_run(c, p, k, W, x, y);
        cudaEventRecord(e1, c->st);
        if (ok && cudaEventSynchronize(e1) == cudaSuccess &&
            cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms < best)
            best = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaGetLastError();
    return ok ? best : INFINITY;
}

/* Small-m matmuls (decode batches) are memory-bound and cuBLASLt's first
 * heuristic is often not the fastest for them (split-K choices): the
 * candidates are timed once per (shape, bucket of m: see m_bucket), when a
 * plan is made outside graph capture, and the winner is reused for every m
 * of the bucket it is valid for (batch sizes vary step to step in serving).
 * Larger shapes keep the first heuristic (they vary with prefill sizes,
 * and timing them up to m = 8192 changed 8B prefill by under 1%). */
#define TUNE_MAX_M 256     /* timing up to 4096 rows (prefill) gained nothing */
#define TUNE_ALGOS 16

/* Buckets of m: 1..8 (decode of a few sequences: one choice, so forwards
 * of different small row counts round alike), then powers of two. */
static int m_bucket(int m)
{
    int b = 8;
    while (b < m) b *= 2;
    return b;
}

static tuned_algo *tuned_find(cuda_backend *c, const mm_plan *p, int mb)
{
    for (int i = 0; i < c->n_tuned; i++) {
        tuned_algo *t = &c->tuned[i];
        if (t->n == p->n && t->k == p->k && t->y_f32 == p->y_f32 &&
            t->mb == mb)
            return t;
    }
    return NULL;
}

/* Timing runs kernels, which must not land in a graph being captured. */
static int can_time(cuda_backend *c)
{
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(c->st, &cs) == cudaSuccess &&
           cs == cudaStreamCaptureStatusNone;
}

/* The heuristic rarely offers split-K for square decode matmuls (wo: n = k
 * = dim), whose few output tiles leave most SMs idle at m <= 8: the
 * candidates are also timed with their K split 2, 4 and 8 ways (reduced
 * in the workspace) where cuBLASLt accepts that configuration. */
static void try_split_k(cuda_backend *c, mm_plan *p,
                        const cublasLtMatmulHeuristicResult_t *res, int found,
                        const uint16_t *W, const uint16_t *x, void *y,
                        float *best)
{
    for (int i = 0; i < found; i++)
        for (uint32_t sk = 2; sk <= 8; sk *= 2) {
            cublasLtMatmulAlgo_t a = res[i].algo;
            uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
            cublasLtMatmulHeuristicResult_t chk;
            if (cublasLtMatmulAlgoConfigSetAttribute(
                    &a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof sk) ||
                cublasLtMatmulAlgoConfigSetAttribute(
                    &a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                    sizeof scheme) ||
                cublasLtMatmulAlgoCheck(c->lt, p->desc, p->a, p->b, p->c, p->c,
                                        &a, &chk) != CUBLAS_STATUS_SUCCESS ||
                chk.workspaceSize > LT_WS_BYTES)
                continue;
            float ms = time_cand(c, p, (mm_cand){ &a, 0, 0 }, W, x, y, 2);
            if (ms < *best) { *best = ms; p->algo = a; }
        }
}

/* Decode matmuls (m <= 16) stream W once; gemv.cu does that at a higher
 * bandwidth than cuBLASLt for most weight shapes. Its variants are timed
 * at the bucket's largest m (8 or 16, its slowest row count) and win only
 * where they beat cuBLASLt's best (timed at the plan's m) there too. */
static void try_gemv(cuda_backend *c, mm_plan *p, const uint16_t *W,
                     const uint16_t *x, void *y, float best)
{
    const int gm = m_bucket(p->m);
    p->gemv_r = 0;
    if (gm > PIE_CUDA_GEMV_MAX_M || getenv("PIE_CUDA_NO_GEMV") ||
        !pie__cuda_gemv_supported(gm, p->k, W, x))
        return;
    float lt = best, t[4], gbest = INFINITY;
    int gr = 0;
    for (int r = 1, i = 0; r <= 8; r *= 2, i++) {
        t[i] = time_cand(c, p, (mm_cand){ NULL, r, gm }, W, x, y, 3);
        if (t[i] < gbest) { gbest = t[i]; gr = r; }
    }
    /* PIE_CUDA_GEMV=1 (comparisons, tests): gemv.cu wherever it runs */
    if (gbest < lt || (getenv("PIE_CUDA_GEMV") && gbest < INFINITY))
        p->gemv_r = gr;
    if (getenv("PIE_CUDA_TUNE_LOG"))
        fprintf(stderr, "pie: tune n %d k %d: cublasLt %.1f us, gemv r1/2/4/8 "
                "%.1f/%.1f/%.1f/%.1f us (m %d) -> %s\n", p->n, p->k,
                lt * 1e3, t[0] * 1e3, t[1] * 1e3, t[2] * 1e3, t[3] * 1e3, gm,
                p->gemv_r ? "gemv" : "cublasLt");
}

static void pick_algo(cuda_backend *c, mm_plan *p,
                      const cublasLtMatmulHeuristicResult_t *res, int found,
                      const uint16_t *W, const uint16_t *x, void *y)
{
    p->algo = res[0].algo;
    p->gemv_r = 0;
    if (p->m > TUNE_MAX_M || getenv("PIE_CUDA_NO_TUNE")) return;  /* no gemv */
    int mb = m_bucket(p->m);
    tuned_algo *t = tuned_find(c, p, mb);
    cublasLtMatmulHeuristicResult_t chk;
    if (t) {                       /* every m of the bucket: the same choice */
        p->gemv_r = t->gemv_r;     /* (the heuristic's algo where the timed */
        if (cublasLtMatmulAlgoCheck(c->lt, p->desc, p->a, p->b, p->c, p->c,
                                    &t->algo, &chk) == CUBLAS_STATUS_SUCCESS &&
            chk.workspaceSize <= LT_WS_BYTES)   /* one does not fit this m) */
            p->algo = t->algo;
        return;
    }
    if (!can_time(c)) return;
    float best = INFINITY;
    for (int i = 0; i < found; i++) {
        float ms = time_cand(c, p, (mm_cand){ &res[i].algo, 0, 0 }, W, x, y, 3);
        if (ms < best) { best = ms; p->algo = res[i].algo; }
    }
    try_split_k(c, p, res, found, W, x, y, &best);
    try_gemv(c, p, W, x, y, best);
    t = &c->tuned[c->n_tuned < TUNED_MAX ? c->n_tuned++
                                         : (c->tuned_next++ % TUNED_MAX)];
    *t = (tuned_algo){ p->n, p->k, p->y_f32, mb, p->algo, p->gemv_r };
}

static int plan_make(cuda_backend *c, mm_plan *p, int m, int n, int k,
                     int y_f32, const uint16_t *W,
                     const uint16_t *x, void *y)
{
    cudaDataType_t yt = y_f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasOperation_t ta = CUBLAS_OP_T;
    CKLT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CKLT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                        &ta, sizeof ta));
    CKLT(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k, n, k));
    CKLT(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, k, m, k));
    CKLT(cublasLtMatrixLayoutCreate(&p->c, yt, n, m, n));
    cublasLtMatmulPreference_t pref;
    CKLT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = LT_WS_BYTES;
    cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res[TUNE_ALGOS];
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(
        c->lt, p->desc, p->a, p->b, p->c, p->c, pref, TUNE_ALGOS, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    p->m = m; p->n = n; p->k = k; p->y_f32 = y_f32;
    p->used = 1;            /* the descriptors are freed with the plan */
    if (s != CUBLAS_STATUS_SUCCESS || found == 0)
        return pie_err_set(PIE_EDEVICE, "cublasLt: no algorithm for %dx%dx%d",
                           m, n, k);
    pick_algo(c, p, res, found, W, x, y);
    return 0;
}

static void plan_free(mm_plan *p)
{
    if (!p->used) return;
    cublasLtMatmulDescDestroy(p->desc);
    cublasLtMatrixLayoutDestroy(p->a);
    cublasLtMatrixLayoutDestroy(p->b);
    cublasLtMatrixLayoutDestroy(p->c);
    p->used = 0;
}

/* The cached plan of (m, n, k, y_f32), made (and timed) on first use. */
static int plan_for(cuda_backend *c, mm_plan **out, void *y, int y_f32,
                    const uint16_t *W, int n, int k, const uint16_t *x, int m)
{
    for (int i = 0; i < MM_CACHE; i++) {
        mm_plan *q = &c->plans[i];
        if (q->used && q->m == m && q->n == n && q->k == k &&
            q->y_f32 == y_f32) {
            *out = q;
            return 0;
        }
    }
    mm_plan *p = &c->plans[c->plan_next];
    c->plan_next = (c->plan_next + 1) % MM_CACHE;
    plan_free(p);
    int rc = plan_make(c, p, m, n, k, y_f32, W, x, y);
    if (rc) { plan_free(p); return rc; }
    *out = p;
    return 0;
}

/* y (m, n) = x (m, k) · W^T, W (n, k) bf16, x bf16, y f32 or bf16.
 * gemv.cu runs only in decode steps (is_decode), so a prompt's prefill
 * takes the same kernels alone or batched, and a sequence's decode logits
 * do not depend on how many others decode with it while the batch stays
 * in one bucket of m (1..8, 9..16: gemv.cu is m-invariant for a given r). */
static int mm_to(cuda_backend *c, void *y, int y_f32, int acc,
                 const uint16_t *W, int n, int k, const uint16_t *x, int m)
{
    mm_plan *p;
    /* a plan made here times its candidates into its output: never into
     * the residual stream an accumulating call adds to */
    int rc = plan_for(c, &p, acc ? (void *)c->dx : y, y_f32, W, n, k, x, m);
    if (rc) return rc;
    if (p->gemv_r > 0 && c->decode_step &&
        pie__cuda_gemv(y, acc ? 2 : y_f32, W, n, k, x, m, p->gemv_r,
                       pie__cuda_pdl(), c->st) == 0) {
        c->n_gemv++;
        return 0;
    }
    CKLT(mm_run(c, p, &p->algo, W, x, y, acc));
    return 0;
}

static int mm(cuda_backend *c, void *y, int y_f32,
              const uint16_t *W, int n, int k, const uint16_t *x, int m)
{
    return mm_to(c, y, y_f32, 0, W, n, k, x, m);
}

/* y (f32) += x W^T: the residual add of wo and w_down, in the matmul's
 * epilogue (one f32 rounding, as the add of a separate kernel had). */
static int mm_add(cuda_backend *c, float *y, const uint16_t *W, int n, int k,
                  const uint16_t *x, int m)
{
    return mm_to(c, y, 1, 1, W, n, k, x, m);
}

/* h (m, hid) = silu(gate) * up of gu = x . Wgu^T: in decode steps where
 * gemv.cu won the gate/up shape, one kernel with the SwiGLU in its
 * epilogue (gu is not written); else the matmul into gu, then silu_mul.
 * Both give the same bits. */
static int mm_glu(cuda_backend *c, uint16_t *h, uint16_t *gu,
                  const uint16_t *Wgu, int hid, int k, const uint16_t *x,
                  int m)
{
    mm_plan *p;
    int rc = plan_for(c, &p, gu, 0, Wgu, 2 * hid, k, x, m);
    if (rc) return rc;
    if (p->gemv_r > 0 && c->decode_step &&
        pie__cuda_gemv_glu(h, Wgu, hid, k, x, m, p->gemv_r, pie__cuda_pdl(),
                           c->st) == 0) {
        c->n_gemv++;
        return 0;
    }
    CKLT(mm_run(c, p, &p->algo, Wgu, x, gu, 0));  /* the plan found above */
    pie__cuda_silu_mul(h, gu, m, hid, c->st);
    return 0;
}

/* ------------------------------------------------------------ metadata */

/* Appends bytes (or zeros when src is NULL) to the metadata buffer, 16-byte
 * aligned; returns the offset. On allocation failure sets meta_oom. */
static size_t meta_put(cuda_backend *c, const void *src, size_t bytes)
{
    size_t off = (c->meta_len + 15) & ~(size_t)15;
    if (off + bytes > c->meta_cap) {
        size_t cap = c->meta_cap ? c->meta_cap : 1 << 16;
        while (cap < off + bytes) cap *= 2;
        uint8_t *m = realloc(c->meta, cap);
        if (!m) { c->meta_oom = 1; return 0; }
        c->meta = m;
        c->meta_cap = cap;
    }
    if (src) memcpy(c->meta + off, src, bytes);
    else memset(c->meta + off, 0, bytes);
    c->meta_len = off + bytes;
    return off;
}

#define META(c, off) ((void *)((c)->meta + (off)))
#define DEV(c, off)  ((void *)((c)->meta_dev + (off)))

/* Copies the built metadata to the device (growing the buffers). */
static int meta_upload(cuda_backend *c)
{
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    if (c->meta_len > c->meta_dev_cap) {
        size_t cap = c->meta_cap;
        if (c->meta_pin) cudaFreeHost(c->meta_pin);
        if (c->meta_dev) cudaFree(c->meta_dev);
        c->meta_pin = NULL; c->meta_dev = NULL; c->meta_dev_cap = 0;
        CK(cudaMallocHost((void **)&c->meta_pin, cap));
        CK(cudaMalloc((void **)&c->meta_dev, cap));
        c->meta_dev_cap = cap;
    }
    /* The previous step's copy must be done before the pinned buffer is
     * rewritten; forwards synchronize at their end, so it is. */
    memcpy(c->meta_pin, c->meta, c->meta_len);
    CK(cudaMemcpyAsync(c->meta_dev, c->meta_pin, c->meta_len,
                       cudaMemcpyHostToDevice, c->st));
    return 0;
}

/* Expands run-length list runs[0..n) (not-allowed first) into bits. */
static void runs_to_bits(const uint32_t *runs, uint32_t n, uint32_t *bits,
                         int64_t nbits)
{
    memset(bits, 0, sizeof(uint32_t) * (size_t)((nbits + 31) / 32));
    int64_t pos = 0;
    for (uint32_t i = 0; i < n && pos < nbits; i++) {
        int64_t end = pos + runs[i];
        if (end > nbits) end = nbits;
        if (i & 1)
            for (int64_t j = pos; j < end; j++) bits[j / 32] |= 1u << (j % 32);
        pos = end;
    }
}

static uint64_t runs_total(const uint32_t *runs, uint32_t n)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < n; i++) s += runs[i];
    return s;
}

/* ------------------------------------------------------------- forward */

static int64_t kv_len_of(const pie_forward_batch *b, int r, int ps)
{
    int np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
    return (int64_t)(np - 1) * ps + b->kv_last_page_len[r];
}

/* Grows a host array to hold n elements of size sz. */
static int grow(void **p, int64_t *cap, int64_t n, size_t sz)
{
    if (n <= *cap) return 0;
    int64_t nc = *cap ? *cap : 256;
    while (nc < n) nc *= 2;
    void *q = realloc(*p, (size_t)nc * sz);
    if (!q) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    *p = q;
    *cap = nc;
    return 0;
}

/* Prompts of at least FLASH_MIN new tokens go to the tensor-core kernel. */
#define FLASH_MIN 16

static int use_flash(const cuda_backend *c, int n_new)
{
    return n_new >= FLASH_MIN && pie__cuda_flash_supported(c->cfg.head_dim) &&
           !getenv("PIE_CUDA_NO_FLASH");
}

/* Decode and short chunks: grouped tensor-core items (tokens x the G heads
 * of a kv head) unless PIE_CUDA_NO_FLASH(_DECODE) is set, else the CUDA-core
 * kernel. Tokens per tile of either. */
static int use_flash_dec(const cuda_backend *c)
{
    return pie__cuda_flash_supported(c->cfg.head_dim) &&
           !getenv("PIE_CUDA_NO_FLASH") && !getenv("PIE_CUDA_NO_FLASH_DECODE");
}

static int tile_tokens(const cuda_backend *c)
{
    int G = c->cfg.n_heads / c->cfg.n_kv_heads;
    /* G <= PIE_CUDA_ATTN_RMAX (check_shape): at least one token */
    return (use_flash_dec(c) ? PIE_CUDA_FLASH_DEC_ROWS : PIE_CUDA_ATTN_RMAX) / G;
}

/* Tiles of PIE_CUDA_FLASH_ROWS tokens x one query head of request r into
 * c->fitems; a tile reads the slots its last token (or widest mask) sees. */
/* Longest prefill tiles first (then token, head): with causal prompts the
 * last tiles of a prompt read the most slots, and launched last they ran
 * alone at the end of the grid. */
static int cmp_longest(const void *a, const void *b)
{
    const pie_cuda_attn_item *x = a, *y = b;
    int lx = x->s1 - x->s0, ly = y->s1 - y->s0;
    if (lx != ly) return ly - lx;
    if (x->t0 != y->t0) return x->t0 - y->t0;
    return x->kvh - y->kvh;
}

static int plan_flash(cuda_backend *c, const pie_forward_batch *b, int r,
                      const uint32_t *range_of)
{
    int q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
    int64_t kv_len = kv_len_of(b, r, c->base.page_size);
    int nh = c->cfg.n_heads, T = PIE_CUDA_FLASH_ROWS;
    int64_t tiles = (n_new + T - 1) / T;
    int rc = grow((void **)&c->fitems, &c->cap_fitems,
                  c->n_fitems + tiles * nh, sizeof *c->fitems);
    if (rc) return rc;
    for (int i = 0; i < n_new; i += T) {
        int nt = n_new - i < T ? n_new - i : T, t0 = q0 + i;
        int64_t range = kv_len - n_new + i + nt;
        if (b->mask_indptr) {
            range = 0;
            for (int t = t0; t < t0 + nt; t++)
                if (range_of[t] > range) range = range_of[t];
        }
        for (int h = 0; h < nh; h++) {
            pie_cuda_attn_item it = { r, t0, nt, h, 0, (int)range, -1, 0 };
            c->fitems[c->n_fitems++] = it;
        }
    }
    return 0;
}

/* KV blocks (64 slots) a decode attention block streams at least: 1 made
 * batch-1 steps slower (more partials to merge), 2 and 4 tie elsewhere */
#define DEC_MIN_KV 2

/* Cuts the whole grouped items for the decode kernel's persistent grid
 * (dec_plan.c). The piece and merge lists are stored at their capacities,
 * so a decode step's kernel arguments, and its CUDA graph, do not change
 * as contexts grow. Returns the partial rows used, or a negative code. */
static int64_t plan_dec(cuda_backend *c, int64_t parts)
{
    int rc = grow((void **)&c->pieces, &c->cap_pieces,
                  c->n_gitems + c->dec_blocks, sizeof *c->pieces);
    if (rc) return rc;
    parts = pie_cuda_dec_plan(c->gitems, (int)c->n_gitems,
                              c->cfg.n_heads / c->cfg.n_kv_heads, c->dec_blocks,
                              DEC_MIN_KV, parts, c->pieces, &c->n_pieces,
                              c->bstart, c->dmerges, &c->n_dmerges);
    /* a fixed-size merge list for the merge kernel (empty items skip) */
    memset(c->dmerges + c->n_dmerges, 0,
           sizeof *c->dmerges * (size_t)(c->dec_blocks - c->n_dmerges));
    return parts;
}

/* Work items of the attention kernel into c->items / c->merges. want =
 * splits wished per tile for occupancy; range_of[t] = slots token t may see
 * under its mask. Returns the number of partial rows or a negative code. */
static int64_t plan_attention(cuda_backend *c, const pie_forward_batch *b,
                              int want, const uint32_t *range_of)
{
    const pie_model_config *g = &c->cfg;
    int G = g->n_heads / g->n_kv_heads, T = tile_tokens(c);
    int ps = c->base.page_size, fd = use_flash_dec(c);
    int64_t parts = 0;
    c->n_items = c->n_merges = c->n_fitems = c->n_gitems = 0;
    c->max_slots = 0;
    for (int r = 0; r < b->n_reqs; r++) {
        int q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
        int64_t kv_len = kv_len_of(b, r, ps);
        if (use_flash(c, n_new)) {
            int rc = plan_flash(c, b, r, range_of);
            if (rc) return rc;
            continue;
        }
        for (int i = 0; i < n_new; i += T) {
            int nt = n_new - i < T ? n_new - i : T, t0 = q0 + i;
            int64_t range = 0;
            if (!b->mask_indptr) {
                range = kv_len - n_new + i + nt;
            } else {
                for (int t = t0; t < t0 + nt; t++)
                    if (range_of[t] > range) range = range_of[t];
            }
            int64_t need = (range + PIE_CUDA_ATTN_CHUNK - 1) / PIE_CUDA_ATTN_CHUNK;
            int64_t opt = (range + 127) / 128;
            int64_t ns = want < opt ? want : opt;
            if (ns < need) ns = need;
            if (ns < 1 || fd) ns = 1;       /* fd: dec_plan balances */
            int rc = fd ? grow((void **)&c->gitems, &c->cap_gitems,
                               c->n_gitems + ns * g->n_kv_heads, sizeof *c->gitems)
                        : grow((void **)&c->items, &c->cap_items,
                               c->n_items + ns * g->n_kv_heads, sizeof *c->items);
            if (!rc)
                rc = grow((void **)&c->merges, &c->cap_merges,
                          c->n_merges + g->n_kv_heads, sizeof *c->merges);
            if (rc) return rc;
            for (int h = 0; h < g->n_kv_heads; h++) {
                if (ns > 1) {
                    pie_cuda_merge_item mi = { t0, nt, h, (int)ns, (int)parts,
                                               {0, 0, 0} };
                    c->merges[c->n_merges++] = mi;
                }
                for (int64_t s = 0; s < ns; s++) {
                    int sl = (int)(range * (s + 1) / ns - range * s / ns);
                    if (sl > c->max_slots) c->max_slots = sl;
                    pie_cuda_attn_item it = {
                        r, t0, nt, h, (int)(range * s / ns),
                        (int)(range * (s + 1) / ns),
                        ns > 1 ? (int)(parts + s * nt * G) : -1, fd };
                    if (fd) c->gitems[c->n_gitems++] = it;
                    else c->items[c->n_items++] = it;
                }
                if (ns > 1) parts += ns * nt * G;
            }
        }
    }
    /* Sizes the CUDA-core kernel's score buffer; rounded so that decode
     * steps keep the same launch (and graph) for 64 slots of growth. */
    c->max_slots = (c->max_slots + 63) & ~63;
    return c->n_gitems ? plan_dec(c, parts) : parts;
}

/* Fills per-token and per-request arrays and the attention masks. Returns
 * 0 or an error; range_of (host, n_tokens) receives each token's mask
 * length when the batch has masks. */
typedef struct step_meta {
    size_t tok, pos, slot, req, kv_indptr, kv_len, pages, mask_off, mask_bits;
    size_t items, merges, fitems, gitems, bstart, dmerges, rows, srow, lp_ids,
           lmask;
} step_meta;

static int build_tokens(cuda_backend *c, const pie_forward_batch *b,
                        step_meta *sm, uint32_t *range_of)
{
    int n = b->n_tokens, nr = b->n_reqs, ps = c->base.page_size;
    sm->tok = meta_put(c, b->token_ids, 4 * (size_t)n);
    sm->pos = meta_put(c, b->positions, 4 * (size_t)n);
    sm->kv_indptr = meta_put(c, b->kv_page_indptr, 4 * (size_t)(nr + 1));
    sm->slot = meta_put(c, NULL, 4 * (size_t)n);
    sm->req = meta_put(c, NULL, 4 * (size_t)n);
    sm->kv_len = meta_put(c, NULL, 4 * (size_t)nr);
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    int32_t *slot = META(c, sm->slot), *req = META(c, sm->req);
    int32_t *kvl = META(c, sm->kv_len);
    int64_t words = 0;
    for (int r = 0; r < nr; r++) {
        int q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
        int64_t kv_len = kv_len_of(b, r, ps);
        kvl[r] = (int32_t)kv_len;
        for (int i = 0; i < n_new; i++) {
            slot[q0 + i] = (int32_t)(kv_len - n_new + i);
            req[q0 + i] = r;
        }
        words += (int64_t)n_new * ((kv_len + 31) / 32);
    }
    if (!b->mask_indptr) return 0;
    sm->mask_off = meta_put(c, NULL, 4 * (size_t)n);
    sm->mask_bits = meta_put(c, NULL, 4 * (size_t)words);
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    int32_t *mo = META(c, sm->mask_off);
    uint32_t *bits = META(c, sm->mask_bits);
    int64_t w = 0;
    for (int r = 0; r < nr; r++) {
        int64_t kv_len = kv_len_of(b, r, ps);
        for (int t = b->qo_indptr[r]; t < b->qo_indptr[r + 1]; t++) {
            const uint32_t *runs = b->mask_runs + b->mask_indptr[t];
            uint32_t nrun = b->mask_indptr[t + 1] - b->mask_indptr[t];
            mo[t] = (int32_t)w;
            runs_to_bits(runs, nrun, bits + w, kv_len);
            range_of[t] = (uint32_t)runs_total(runs, nrun);
            w += (kv_len + 31) / 32;
        }
    }
    if (w > INT32_MAX)
        return pie_err_set(PIE_ELIMIT, "cuda: attention masks too large");
    return 0;
}

static int is_sorted_row(const pie_sampler *s)
{
    return s->kind == PIE_PROBE_TOPK ||
           (s->kind == PIE_SAMPLER_RANDOM && s->temperature > 0.0f);
}

/* Sampler rows, LOGPROBS ids and logit masks of every output. */
static int build_outputs(cuda_backend *c, const pie_forward_batch *b,
                         const pie_forward_out *out, step_meta *sm)
{
    int no = b->n_outputs, V = c->cfg.vocab_size;
    int64_t n_ids = 0, lwords = b->logit_mask_indptr ? (int64_t)no * ((V + 31) / 32) : 0;
    for (int o = 0; o < no; o++)
        if (b->samplers[o].kind == PIE_PROBE_LOGPROBS) n_ids += b->samplers[o].n_ids;
    for (int o0 = 0; o0 < no; o0 += OUT_CHUNK) {
        int o1 = o0 + OUT_CHUNK < no ? o0 + OUT_CHUNK : no;
        if ((int64_t)out->value_indptr[o1] - out->value_indptr[o0] >
            (int64_t)OUT_CHUNK * V)
            return pie_err_set(PIE_ELIMIT, "cuda: outputs %d..%d ask for %u "
                               "probe values, more than %lld", o0, o1 - 1,
                               out->value_indptr[o1] - out->value_indptr[o0],
                               (long long)OUT_CHUNK * V);
    }
    if (lwords > INT32_MAX || n_ids > INT32_MAX)
        return pie_err_set(PIE_ELIMIT, "cuda: too many logit masks or ids");
    sm->rows = meta_put(c, b->output_token_idx, 4 * (size_t)no);
    sm->srow = meta_put(c, NULL, sizeof(pie_cuda_srow) * (size_t)no);
    sm->lp_ids = meta_put(c, NULL, 4 * (size_t)n_ids);
    sm->lmask = meta_put(c, NULL, 4 * (size_t)lwords);
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    pie_cuda_srow *sr = META(c, sm->srow);
    int32_t *ids = META(c, sm->lp_ids);
    uint32_t *bits = META(c, sm->lmask);
    int64_t io = 0;
    int n_sort = 0;
    for (int o = 0; o < no; o++) {
        const pie_sampler *s = &b->samplers[o];
        int o0 = o - o % OUT_CHUNK;
        if (o == o0) n_sort = 0;
        pie_cuda_srow r = { s->kind, s->temperature, s->top_k, s->top_p,
                            s->min_p, 0.0f,
                            (int32_t)(out->value_indptr[o] - out->value_indptr[o0]),
                            0, 0, -1, -1, 0 };
        if (s->kind == PIE_SAMPLER_RANDOM) r.u = pie_sample_uniform(s->seed);
        if (s->kind == PIE_PROBE_TOPK) r.n_ids = s->top_k;
        if (s->kind == PIE_PROBE_LOGPROBS) {
            r.n_ids = s->n_ids;
            r.ids_off = (int32_t)io;
            if (s->n_ids > 0) memcpy(ids + io, s->ids, 4 * (size_t)s->n_ids);
            io += s->n_ids;
        }
        if (is_sorted_row(s)) r.sort_row = n_sort++;
        if (b->logit_mask_indptr) {
            int64_t w = (int64_t)o * ((V + 31) / 32);
            r.mask_off = (int32_t)w;
            runs_to_bits(b->logit_mask_runs + b->logit_mask_indptr[o],
                         b->logit_mask_indptr[o + 1] - b->logit_mask_indptr[o],
                         bits + w, V);
        }
        sr[o] = r;
    }
    return 0;
}

/* Decode attention of layer l: the persistent grid, then the merges of
 * the items it cut (a fixed-size list: graphs keep their arguments). */
static void run_dec_attention(cuda_backend *c, int l,
                              const pie_cuda_tokmeta *tm, const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    pie__cuda_attention_dec(c->att, c->part_o, c->part_ml, c->q,
                            DEV(c, sm->gitems), DEV(c, sm->bstart),
                            c->dec_blocks, tm, &c->kv, l, g->n_heads, c->st);
    pie__cuda_attn_merge(c->att, c->part_o, c->part_ml, DEV(c, sm->dmerges),
                         c->dec_blocks, g->n_heads, g->n_kv_heads, g->head_dim,
                         c->st);
}

static int run_layers(cuda_backend *c, int n, const pie_cuda_tokmeta *tm,
                      const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    int dim = g->dim, nh = g->n_heads, hd = g->head_dim, hid = g->hidden_dim;
    int qkvd = (nh + 2 * g->n_kv_heads) * hd;
    const pie_cuda_attn_item *items = DEV(c, sm->items);
    const pie_cuda_merge_item *merges = DEV(c, sm->merges);
    const pie_cuda_attn_item *fitems = DEV(c, sm->fitems);
    int rc;
    pie_cuda_prof *P = &c->prof;
    pie__cuda_embed(c->x, c->embed, DEV(c, sm->tok), n,
                    dim, c->st);
    pie_cuda_prof_mark(P, PROF_EMBED, c->st);
    for (int l = 0; l < g->n_layers; l++) {
        const cuda_layer *L = &c->layers[l];
        pie__cuda_rmsnorm(c->xb, c->x, L->attn_norm, NULL, n, dim,
                          g->norm_eps, c->st);
        pie_cuda_prof_mark(P, PROF_NORM, c->st);
        if ((rc = mm(c, c->qkv, 0, L->wqkv, qkvd, dim, c->xb, n))) return rc;
        pie_cuda_prof_mark(P, PROF_QKV, c->st);
        pie__cuda_qkv_post(c->q, c->qkv, L->bqkv, L->q_norm, L->k_norm,
                           g->norm_eps, c->inv_freq, tm, &c->kv, l, n, nh,
                           c->st);
        pie_cuda_prof_mark(P, PROF_QKV_POST, c->st);
        pie__cuda_attention(c->att, c->part_o, c->part_ml, c->q, items,
                            (int)c->n_items, tm, &c->kv, l, nh, c->max_slots,
                            c->st);
        pie__cuda_attention_flash(c->att, c->part_o, c->part_ml, c->q, fitems,
                                  (int)c->n_fitems, tm, &c->kv, l, nh, c->st);
        if (c->n_gitems)
            run_dec_attention(c, l, tm, sm);
        pie_cuda_prof_mark(P, PROF_ATTN, c->st);
        pie__cuda_attn_merge(c->att, c->part_o, c->part_ml, merges,
                             (int)c->n_merges, nh, g->n_kv_heads, hd, c->st);
        pie_cuda_prof_mark(P, PROF_MERGE, c->st);
        if ((rc = mm_add(c, c->x, L->wo, dim, nh * hd, c->att, n))) return rc;
        pie_cuda_prof_mark(P, PROF_WO, c->st);
        pie__cuda_rmsnorm(c->xb, c->x, L->ffn_norm, NULL, n, dim,
                          g->norm_eps, c->st);
        pie_cuda_prof_mark(P, PROF_NORM, c->st);
        if ((rc = mm_glu(c, c->h, c->gu, L->wgu, hid, dim, c->xb, n))) return rc;
        pie_cuda_prof_mark(P, PROF_GATE_UP, c->st);
        if ((rc = mm_add(c, c->x, L->wdown, dim, hid, c->h, n))) return rc;
        pie_cuda_prof_mark(P, PROF_DOWN, c->st);
    }
    CK(cudaGetLastError());
    return 0;
}

/* ------------------------------------------------------------ graphs */

static graph_key key_of(const cuda_backend *c, int n, const step_meta *sm,
                        const pie_cuda_tokmeta *tm)
{
    graph_key k;
    memset(&k, 0, sizeof k);            /* padding too: keys are memcmp'd */
    k.meta_dev = c->meta_dev;
    k.tok = sm->tok; k.pos = sm->pos; k.slot = sm->slot; k.req = sm->req;
    k.kv_indptr = sm->kv_indptr; k.kv_len = sm->kv_len; k.pages = sm->pages;
    k.mask_off = tm->mask_off ? sm->mask_off : (size_t)-1;
    k.mask_bits = tm->mask_off ? sm->mask_bits : (size_t)-1;
    k.items = sm->items; k.merges = sm->merges; k.fitems = sm->fitems;
    k.gitems = sm->gitems;
    k.bstart = sm->bstart;
    k.dmerges = sm->dmerges;
    k.n = n; k.n_items = c->n_items; k.n_fitems = c->n_fitems;
    k.n_gitems = c->n_gitems;
    k.n_merges = c->n_merges;
    k.max_slots = c->n_items ? c->max_slots : 0;
    k.decode = c->decode_step;
    return k;
}

static step_graph *graph_find(cuda_backend *c, const graph_key *k)
{
    for (int i = 0; i < GRAPH_CACHE; i++)
        if (c->graphs[i].exec && !memcmp(&c->graphs[i].key, k, sizeof *k))
            return &c->graphs[i];
    return NULL;
}

/* A free entry, or the least recently launched one (its graph destroyed). */
static step_graph *graph_slot(cuda_backend *c)
{
    step_graph *v = &c->graphs[0];
    for (int i = 0; i < GRAPH_CACHE; i++) {
        if (!c->graphs[i].exec) return &c->graphs[i];
        if (c->graphs[i].used < v->used) v = &c->graphs[i];
    }
    cudaGraphExecDestroy(v->exec);
    v->exec = NULL;
    return v;
}

/* Captures run_layers on the stream into a graph stored under key k. */
static int graph_capture(cuda_backend *c, const graph_key *k, int n,
                         const pie_cuda_tokmeta *tm, const step_meta *sm,
                         step_graph **out)
{
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal);
    int rc = e == cudaSuccess ? run_layers(c, n, tm, sm) : 0;
    if (e == cudaSuccess && getenv("PIE_CUDA_TEST_BREAK_CAPTURE"))
        cudaStreamSynchronize(c->st);   /* test hook: not allowed in capture */
    if (e == cudaSuccess) {
        cudaError_t e2 = cudaStreamEndCapture(c->st, &g);
        if (rc) e = cudaErrorStreamCaptureInvalidated;   /* a launch failed */
        else e = e2;
    }
    step_graph *s = NULL;
    if (e == cudaSuccess) {
        s = graph_slot(c);
        e = cudaGraphInstantiate(&s->exec, g, 0);
        if (e != cudaSuccess) s->exec = NULL;
    }
    if (g) cudaGraphDestroy(g);
    if (e != cudaSuccess) {   /* no graph: the caller launches directly,
                               * where a real launch error shows again */
        cudaGetLastError();
        c->capture_failed = 1;
        return pie_err_set(PIE_EDEVICE, "cuda: graph capture: %s",
                           cudaGetErrorString(e));
    }
    s->key = *k;
    c->n_captured++;
    *out = s;
    return 0;
}

/* Runs the layers of one step: replays a captured graph when an earlier
 * step had the same kernel arguments (decode steps of a steady batch),
 * captures one when this step repeats the previous step's arguments, and
 * launches kernels directly otherwise (prefill, masks of growing size,
 * PIE_CUDA_NO_GRAPH=1). Launching ~11 kernels per layer one by one costs
 * more than a small batch's GPU time; a graph is one launch. */
static int run_layers_graphed(cuda_backend *c, int n,
                              const pie_cuda_tokmeta *tm, const step_meta *sm)
{
    if (c->graphs_off || c->prof.on || c->capture_failed ||
        n > GRAPH_MAX_TOKENS)
        return run_layers(c, n, tm, sm);
    graph_key k = key_of(c, n, sm, tm);
    step_graph *s = graph_find(c, &k);
    if (!s) {
        int repeat = !memcmp(&k, &c->last_key, sizeof k);
        c->last_key = k;
        if (!repeat) return run_layers(c, n, tm, sm);
        int rc = graph_capture(c, &k, n, tm, sm, &s);
        if (rc == PIE_EDEVICE && c->capture_failed) {
            /* graphs are an optimization: carry on without them */
            fprintf(stderr, "pie: %s; launching kernels directly from now "
                    "on\n", pie_err_msg());
            pie_err_clear();
            return run_layers(c, n, tm, sm);
        }
        if (rc) return rc;
    } else {
        c->n_replayed++;
    }
    s->used = ++c->graph_clock;
    CK(cudaGraphLaunch(s->exec, c->st));
    return 0;
}

static int run_outputs(cuda_backend *c, const pie_forward_batch *b,
                       pie_forward_out *out, const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    int V = g->vocab_size, rc;
    const pie_cuda_srow *hs = META(c, sm->srow);
    for (int o0 = 0; o0 < b->n_outputs; o0 += OUT_CHUNK) {
        int rows = b->n_outputs - o0 < OUT_CHUNK ? b->n_outputs - o0 : OUT_CHUNK;
        pie__cuda_rmsnorm(c->xo, c->x, c->final_norm,
                        (const int32_t *)DEV(c, sm->rows) + o0, rows,
                        g->dim, g->norm_eps, c->st);
        if ((rc = mm(c, c->logits, 1, c->lm_head, V, g->dim, c->xo, rows)))
            return rc;
        int n_sort = 0;
        for (int i = 0; i < rows; i++) n_sort += hs[o0 + i].sort_row >= 0;
        uint32_t v0 = out->value_indptr[o0], nv = out->value_indptr[o0 + rows] - v0;
        if (nv) CK(cudaMemsetAsync(c->d_ids, 0, 4 * (size_t)nv, c->st));
        pie_cuda_sample_args a = {
            c->logits, rows, V, (const pie_cuda_srow *)DEV(c, sm->srow) + o0,
            DEV(c, sm->lmask), DEV(c, sm->lp_ids), n_sort, c->sort_k[0],
            c->sort_k[1], c->sort_v[0], c->sort_v[1], c->seg_off, c->sort_tmp,
            c->sort_tmp_bytes, c->d_tokens, c->d_values, c->d_ids };
        int e = pie__cuda_sample(&a, c->st);
        if (e) return pie_err_set(PIE_EDEVICE, "cuda: sampling: %s",
                                  cudaGetErrorString((cudaError_t)e));
        CK(cudaMemcpyAsync(out->tokens + o0, c->d_tokens, 4 * (size_t)rows,
                           cudaMemcpyDeviceToHost, c->st));
        if (nv) {
            CK(cudaMemcpyAsync(out->values + v0, c->d_values, 4 * (size_t)nv,
                               cudaMemcpyDeviceToHost, c->st));
            CK(cudaMemcpyAsync(out->ids + v0, c->d_ids, 4 * (size_t)nv,
                               cudaMemcpyDeviceToHost, c->st));
        }
        pie_cuda_prof_mark(&c->prof, PROF_OUTPUT, c->st);
        CK(cudaStreamSynchronize(c->st));
    }
    return 0;
}

/* Every request of the batch extends a sequence it already has by one
 * token (a one-token prompt is a prefill: it takes the prefill kernels,
 * alone or batched with longer prompts). */
static int is_decode(const cuda_backend *c, const pie_forward_batch *b)
{
    for (int r = 0; r < b->n_reqs; r++)
        if (b->qo_indptr[r + 1] - b->qo_indptr[r] != 1 ||
            kv_len_of(b, r, c->base.page_size) < 2)
            return 0;
    return 1;
}

static int cuda_forward(pie_backend *bb, const pie_forward_batch *b,
                        pie_forward_out *out)
{
    cuda_backend *c = (cuda_backend *)bb;
    const pie_model_config *g = &c->cfg;
    int rc = pie_batch_validate(b, g->vocab_size, bb->page_size, bb->n_pages);
    if (rc) return rc;
    if (b->n_tokens > MAX_TOKENS)
        return pie_err_set(PIE_ELIMIT, "cuda: batch has %d tokens, at most %d "
                           "per forward; split the prefill", b->n_tokens,
                           MAX_TOKENS);
    if (b->n_outputs > 0 && (!out || !out->tokens || !out->value_indptr))
        return pie_err_set(PIE_EINVAL, "cuda: output arrays are NULL "
                           "(allocate them with pie_forward_out_alloc)");
    if (b->n_tokens == 0) return 0;
    CK(cudaSetDevice(c->device));
    c->graphs_off = getenv("PIE_CUDA_NO_GRAPH") != NULL;
    pie_cuda_prof_init(&c->prof);
    c->decode_step = is_decode(c, b);
    c->meta_len = 0;
    c->meta_oom = 0;
    step_meta sm = { 0 };
    uint32_t *range_of = NULL;
    if (b->mask_indptr && !(range_of = malloc(4 * (size_t)b->n_tokens)))
        return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    rc = build_tokens(c, b, &sm, range_of);
    int64_t parts = 0;
    if (!rc) {
        int T = tile_tokens(c);
        int64_t tiles = 0;
        for (int r = 0; r < b->n_reqs; r++) {
            int n_new = b->qo_indptr[r + 1] - b->qo_indptr[r];
            if (!use_flash(c, n_new)) tiles += (n_new + T - 1) / T;
        }
        /* splits so that about split_blocks attention blocks per SM exist */
        int64_t goal = (int64_t)c->split_blocks * c->n_sm;
        int64_t base = tiles * g->n_kv_heads, want = 1;
        if (base > 0 && base < goal) want = (goal + base - 1) / base;
        if (want > 32) want = 32;
        parts = plan_attention(c, b, (int)want, range_of);
        if (parts > c->max_parts) parts = plan_attention(c, b, 1, range_of);
        if (parts < 0) rc = (int)parts;
        else if (parts > c->max_parts)
            rc = pie_err_set(PIE_ELIMIT, "cuda: attention needs %lld split "
                             "rows, workspace holds %lld; use shorter "
                             "prefill chunks", (long long)parts,
                             (long long)c->max_parts);
    }
    free(range_of);
    if (rc) return rc;
    sm.items = meta_put(c, c->items, sizeof *c->items * (size_t)c->n_items);
    sm.merges = meta_put(c, c->merges, sizeof *c->merges * (size_t)c->n_merges);
    if (c->n_fitems > 1)
        qsort(c->fitems, (size_t)c->n_fitems, sizeof *c->fitems, cmp_longest);
    sm.fitems = meta_put(c, c->fitems, sizeof *c->fitems * (size_t)c->n_fitems);
    sm.gitems = meta_put(c, c->pieces, c->n_gitems ? sizeof *c->pieces *
                         (size_t)(c->n_gitems + c->dec_blocks) : 0);
    sm.bstart = meta_put(c, c->bstart, c->n_gitems ? 4 * (size_t)(c->dec_blocks + 1) : 0);
    sm.dmerges = meta_put(c, c->dmerges, c->n_gitems ? sizeof *c->dmerges *
                          (size_t)c->dec_blocks : 0);
    /* after everything of fixed size, so decode steps keep their offsets */
    sm.pages = meta_put(c, b->kv_page_indices,
                        4 * (size_t)b->kv_page_indptr[b->n_reqs]);
    if ((rc = build_outputs(c, b, out, &sm))) return rc;
    if ((rc = meta_upload(c))) return rc;
    pie_cuda_tokmeta tm = {
        DEV(c, sm.slot), DEV(c, sm.req), DEV(c, sm.pos), DEV(c, sm.kv_indptr),
        DEV(c, sm.kv_len), DEV(c, sm.pages),
        b->mask_indptr ? DEV(c, sm.mask_off) : NULL,
        b->mask_indptr ? DEV(c, sm.mask_bits) : NULL };
    pie_cuda_prof_begin(&c->prof, c->decode_step, c->st);
    if ((rc = run_layers_graphed(c, b->n_tokens, &tm, &sm))) return rc;
    if ((rc = run_outputs(c, b, out, &sm))) return rc;
    CK(cudaStreamSynchronize(c->st));
    pie_cuda_prof_end(&c->prof);
    CK(cudaGetLastError());
    return 0;
}

/* ---------------------------------------------------------- page moves */

static int check_pages(cuda_backend *c, const int32_t *pages, int32_t n)
{
    if (n < 0 || (n > 0 && !pages))
        return pie_err_set(PIE_EINVAL, "cuda: bad page list (n = %d)", n);
    for (int32_t i = 0; i < n; i++)
        if (pages[i] < 0 || pages[i] >= c->base.n_pages)
            return pie_err_set(PIE_ERANGE, "cuda: page id %d outside 0..%d",
                               pages[i], c->base.n_pages - 1);
    return 0;
}

static int cuda_copy_slots(pie_backend *bb, int32_t src, int32_t src_off,
                           int32_t dst, int32_t dst_off, int32_t n)
{
    cuda_backend *c = (cuda_backend *)bb;
    int ps = bb->page_size;
    if (src < 0 || src >= bb->n_pages || dst < 0 || dst >= bb->n_pages)
        return pie_err_set(PIE_ERANGE, "cuda: copy_slots pages %d -> %d "
                           "outside 0..%d", src, dst, bb->n_pages - 1);
    if (n < 0 || src_off < 0 || dst_off < 0 || src_off + n > ps ||
        dst_off + n > ps)
        return pie_err_set(PIE_ERANGE, "cuda: copy_slots of %d slots at "
                           "offsets %d -> %d outside the page (%d)", n,
                           src_off, dst_off, ps);
    if (n == 0) return 0;
    CK(cudaSetDevice(c->device));
    if (src == dst && src_off != dst_off) {
        /* Overlapping ranges: go through scratch (d_values holds a page). */
        int64_t pe = pie_cuda_kv_page_elems(&c->kv);
        CK(cudaMemcpyAsync(c->d_values, c->kv.pool + (int64_t)src * pe,
                           (size_t)pe * 2, cudaMemcpyDeviceToDevice, c->st));
        /* then from the scratch image of page src into page dst */
        int64_t rows = (int64_t)c->kv.n_layers * 2 * c->kv.n_kv;
        size_t row = (size_t)ps * c->kv.head_dim * 2;
        CK(cudaMemcpy2DAsync(c->kv.pool + (int64_t)dst * pe +
                                 (int64_t)dst_off * c->kv.head_dim, row,
                             (uint16_t *)c->d_values +
                                 (int64_t)src_off * c->kv.head_dim, row,
                             (size_t)n * c->kv.head_dim * 2, (size_t)rows,
                             cudaMemcpyDeviceToDevice, c->st));
    } else if (src != dst) {
        pie__cuda_copy_slots(&c->kv, src, src_off, dst, dst_off, n, c->st);
    }
    CK(cudaStreamSynchronize(c->st));
    CK(cudaGetLastError());
    return 0;
}

static int cuda_download(pie_backend *bb, const int32_t *pages, int32_t n,
                         void *host)
{
    cuda_backend *c = (cuda_backend *)bb;
    int rc = check_pages(c, pages, n);
    if (rc) return rc;
    CK(cudaSetDevice(c->device));
    int64_t pe = pie_cuda_kv_page_elems(&c->kv);
    for (int32_t i = 0; i < n; i++)
        CK(cudaMemcpyAsync((uint8_t *)host + (size_t)i * bb->page_bytes,
                           c->kv.pool + (int64_t)pages[i] * pe, bb->page_bytes,
                           cudaMemcpyDeviceToHost, c->st));
    CK(cudaStreamSynchronize(c->st));
    return 0;
}

static int cuda_upload(pie_backend *bb, const int32_t *pages, int32_t n,
                       const void *host)
{
    cuda_backend *c = (cuda_backend *)bb;
    int rc = check_pages(c, pages, n);
    if (rc) return rc;
    CK(cudaSetDevice(c->device));
    int64_t pe = pie_cuda_kv_page_elems(&c->kv);
    for (int32_t i = 0; i < n; i++)
        CK(cudaMemcpyAsync(c->kv.pool + (int64_t)pages[i] * pe,
                           (const uint8_t *)host + (size_t)i * bb->page_bytes,
                           bb->page_bytes, cudaMemcpyHostToDevice, c->st));
    CK(cudaStreamSynchronize(c->st));
    return 0;
}

static void cuda_destroy(pie_backend *bb)
{
    cuda_backend *c = (cuda_backend *)bb;
    if (!c) return;
    cudaSetDevice(c->device);
    if (c->st) cudaStreamSynchronize(c->st);
    pie_cuda_prof_done(&c->prof);
    for (int i = 0; i < GRAPH_CACHE; i++)
        if (c->graphs[i].exec) cudaGraphExecDestroy(c->graphs[i].exec);
    for (int i = 0; i < MM_CACHE; i++) plan_free(&c->plans[i]);
    if (c->lt) cublasLtDestroy(c->lt);
    for (int i = 0; i < c->n_allocs; i++) cudaFree(c->allocs[i]);
    if (c->meta_pin) cudaFreeHost(c->meta_pin);
    if (c->meta_dev) cudaFree(c->meta_dev);
    if (c->st) cudaStreamDestroy(c->st);
    free(c->allocs);
    free(c->layers);
    free(c->meta);
    free(c->items);
    free(c->fitems);
    free(c->gitems);
    free(c->pieces);
    free(c->bstart);
    free(c->dmerges);
    free(c->merges);
    free(c);
}

static const pie_backend_ops CUDA_OPS = {
    cuda_forward, cuda_copy_slots, cuda_download, cuda_upload, cuda_destroy,
};

/* ---------------------------------------------------------------- create */

void pie_backend_cuda_graphs(const pie_backend *b, int64_t *captured,
                             int64_t *replayed)
{
    *captured = *replayed = 0;
    if (!b || b->ops != &CUDA_OPS) return;
    const cuda_backend *c = (const cuda_backend *)b;
    *captured = c->n_captured;
    *replayed = c->n_replayed;
}

int64_t pie_backend_cuda_gemv_calls(const pie_backend *b)
{
    if (!b || b->ops != &CUDA_OPS) return 0;
    return ((const cuda_backend *)b)->n_gemv;
}

int pie_backend_cuda_available(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n > 0;
}

static int check_shape(const pie_model_config *g)
{
    int hd = g->head_dim;
    if (g->n_heads < 1 || g->n_kv_heads < 1 || g->n_heads % g->n_kv_heads)
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: %d query heads and %d kv "
                           "heads", g->n_heads, g->n_kv_heads);
    if (g->n_heads / g->n_kv_heads > PIE_CUDA_ATTN_RMAX)
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: GQA group of %d heads, at "
                           "most %d supported", g->n_heads / g->n_kv_heads,
                           PIE_CUDA_ATTN_RMAX);
    if (hd < 8 || hd > 256 || (hd & (hd - 1)))
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: head_dim %d (supported: "
                           "8, 16, 32, 64, 128, 256)", hd);
    if (g->dim < 1 || g->hidden_dim < 1 || g->vocab_size < 1 || g->n_layers < 1)
        return pie_err_set(PIE_EINVAL, "cuda: bad model dimensions");
    return 0;
}

/* The decode kernel's persistent grid: its resident blocks on every SM,
 * or PIE_CUDA_DEC_BLOCKS (for experiments). */
static int plan_dec_grid(cuda_backend *c)
{
    if (!pie__cuda_flash_supported(c->cfg.head_dim)) return 0;
    const char *e = getenv("PIE_CUDA_DEC_BLOCKS");
    c->dec_blocks = e && atoi(e) > 0 ? atoi(e)
                  : pie__cuda_attention_dec_occupancy(c->cfg.head_dim) * c->n_sm;
    c->bstart = malloc(4 * ((size_t)c->dec_blocks + 1));
    c->dmerges = malloc(sizeof *c->dmerges * (size_t)c->dec_blocks);
    if (!c->bstart || !c->dmerges)
        return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    return 0;
}

static int alloc_workspace(cuda_backend *c)
{
    const pie_model_config *g = &c->cfg;
    int64_t T = MAX_TOKENS, nh = g->n_heads, hd = g->head_dim, V = g->vocab_size;
    int64_t qd = nh * hd, qkvd = qd + 2 * (int64_t)g->n_kv_heads * hd;
    int64_t xbw = g->dim > qd ? g->dim : qd;
    int rc;
    c->max_parts = T * nh * 4;
    if (c->max_parts < 65536) c->max_parts = 65536;
    TRY(dalloc(c, &c->lt_ws, LT_WS_BYTES, "cuBLASLt workspace"));
    TRY(dalloc(c, (void **)&c->x, T * g->dim * 4, "activations"));
    TRY(dalloc(c, (void **)&c->dx, T * g->dim * 4, "activations"));
    TRY(dalloc(c, (void **)&c->xb, T * xbw * 2, "activations"));
    TRY(dalloc(c, (void **)&c->qkv, T * qkvd * 2, "activations"));
    TRY(dalloc(c, (void **)&c->q, T * qd * 4, "activations"));
    TRY(dalloc(c, (void **)&c->att, T * qd * 2, "activations"));
    TRY(dalloc(c, (void **)&c->gu, T * 2 * g->hidden_dim * 2, "activations"));
    TRY(dalloc(c, (void **)&c->h, T * g->hidden_dim * 2, "activations"));
    TRY(dalloc(c, (void **)&c->part_o, c->max_parts * hd * 4, "attention splits"));
    TRY(dalloc(c, (void **)&c->part_ml, c->max_parts * 2 * 4, "attention splits"));
    TRY(dalloc(c, (void **)&c->xo, (int64_t)OUT_CHUNK * g->dim * 2, "outputs"));
    TRY(dalloc(c, (void **)&c->logits, OUT_CHUNK * V * 4, "logits"));
    for (int i = 0; i < 2; i++) {
        TRY(dalloc(c, (void **)&c->sort_k[i], OUT_CHUNK * V * 4, "sampler"));
        TRY(dalloc(c, (void **)&c->sort_v[i], OUT_CHUNK * V * 4, "sampler"));
    }
    TRY(dalloc(c, (void **)&c->seg_off, (OUT_CHUNK + 1) * 4, "sampler"));
    /* the largest sort is OUT_CHUNK rows; smaller ones need no more */
    c->sort_tmp_bytes = pie__cuda_sort_tmp_bytes(OUT_CHUNK, (int)V);
    TRY(dalloc(c, &c->sort_tmp, c->sort_tmp_bytes, "sampler"));
    TRY(dalloc(c, (void **)&c->d_tokens, OUT_CHUNK * 4, "outputs"));
    int64_t pe = pie_cuda_kv_page_elems(&c->kv);
    int64_t nval = OUT_CHUNK * V > pe / 2 + 1 ? OUT_CHUNK * V : pe / 2 + 1;
    TRY(dalloc(c, (void **)&c->d_values, nval * 4, "outputs"));
    TRY(dalloc(c, (void **)&c->d_ids, nval * 4, "outputs"));
    return 0;
}

/* Times the algorithms of the five matmul shapes for every tuned bucket of
 * m (1..8, 16, .., 256) at creation: tuning one bucket costs tens of ms,
 * which a server must not pay in the middle of a step when a new batch
 * size first appears. Operands are workspace buffers; nothing read later
 * is written. */
static int warm_plans(cuda_backend *c)
{
    const pie_model_config *g = &c->cfg;
    const cuda_layer *L = &c->layers[0];
    int dim = g->dim, qd = g->n_heads * g->head_dim, hid = g->hidden_dim;
    int qkvd = qd + 2 * g->n_kv_heads * g->head_dim, rc;
    for (int m = 1; m <= TUNE_MAX_M; m = m < 16 ? 16 : 2 * m) {
        TRY(mm(c, c->qkv, 0, L->wqkv, qkvd, dim, c->xb, m));
        TRY(mm(c, c->dx, 1, L->wo, dim, qd, c->att, m));
        TRY(mm(c, c->gu, 0, L->wgu, 2 * hid, dim, c->xb, m));
        TRY(mm(c, c->dx, 1, L->wdown, dim, hid, c->h, m));
        TRY(mm(c, c->logits, 1, c->lm_head, g->vocab_size, dim, c->xo, m));
    }
    CK(cudaStreamSynchronize(c->st));
    return 0;
}

static int plan_pool(cuda_backend *c, const pie_backend_opts *o)
{
    int64_t pe = pie_cuda_kv_page_elems(&c->kv);
    size_t page = (size_t)pe * 2, fr = 0, tot = 0;
    CK(cudaMemGetInfo(&fr, &tot));
    size_t reserve = 256u << 20;              /* cuBLASLt, graphs, driver */
    size_t avail = fr > reserve ? fr - reserve : 0;
    int64_t n = o && o->n_pages > 0 ? o->n_pages : 0;
    if (n == 0) {
        double f = o && o->mem_fraction > 0 && o->mem_fraction <= 1
                       ? o->mem_fraction : 0.9;
        n = (int64_t)(avail * f / page);
        if (n > INT32_MAX) n = INT32_MAX;
    }
    if (n < 1 || (size_t)n * page > avail)
        return pie_err_set(PIE_ENOMEM, "cuda: no room for %lld KV pages of "
                           "%.2f MiB: %.2f GiB free after weights and "
                           "workspace; use fewer pages or a larger GPU",
                           (long long)(n < 1 ? 1 : n), page / 1048576.0,
                           avail / 1073741824.0);
    int rc = dalloc(c, (void **)&c->kv.pool, (size_t)n * page, "KV pool");
    if (rc) return rc;
    c->base.n_pages = (int32_t)n;
    c->base.page_bytes = page;
    return 0;
}

int pie_backend_cuda_create(const pie_model *m, const pie_backend_opts *o,
                            pie_backend **out)
{
    *out = NULL;
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        cudaGetLastError();
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: no usable GPU (%s)",
                           e != cudaSuccess ? cudaGetErrorString(e)
                                            : "no devices");
    }
    int dev = o ? o->device : 0;
    if (dev < 0 || dev >= ndev)
        return pie_err_set(PIE_EINVAL, "cuda: device %d, have %d", dev, ndev);
    int rc = check_shape(&m->cfg);
    if (rc) return rc;
    cuda_backend *c = calloc(1, sizeof *c);
    if (!c) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    c->cfg = m->cfg;
    c->device = dev;
    c->random_fill = m->dir && !strncmp(m->dir, "random:", 7);
    const char *sb = getenv("PIE_CUDA_SPLIT_BLOCKS");
    c->split_blocks = sb && atoi(sb) > 0 ? atoi(sb) : 2;
    c->base.ops = &CUDA_OPS;
    c->base.cfg = &c->cfg;
    c->base.name = "cuda";
    c->base.page_size = o && o->page_size > 0 ? o->page_size : 16;
    c->kv = (pie_cuda_kv){ NULL, m->cfg.n_layers, m->cfg.n_kv_heads,
                           c->base.page_size, m->cfg.head_dim };
    if ((e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking)) !=
            cudaSuccess ||
        (e = cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount,
                                    dev)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&c->l2_bytes, cudaDevAttrL2CacheSize,
                                    dev)) != cudaSuccess) {
        rc = pie_err_set(PIE_EDEVICE, "cuda: %s", cudaGetErrorString(e));
        goto err;
    }
    if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS) {
        rc = pie_err_set(PIE_EDEVICE, "cuda: cublasLtCreate failed");
        goto err;
    }
    if ((rc = plan_dec_grid(c))) goto err;
    if ((rc = upload_weights(c, m))) goto err;
    if ((rc = alloc_workspace(c))) goto err;
    if ((rc = plan_pool(c, o))) goto err;
    if ((rc = warm_plans(c))) goto err;
    if ((e = cudaDeviceSynchronize()) != cudaSuccess) {
        rc = pie_err_set(PIE_EDEVICE, "cuda: %s", cudaGetErrorString(e));
        goto err;
    }
    *out = &c->base;
    return 0;
err:
    cuda_destroy(&c->base);
    return rc;
}
