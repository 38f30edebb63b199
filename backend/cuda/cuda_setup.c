/*
 * cuda_setup.c — what the CUDA backend does once, at create: it checks the
 * model's shape, opens the device (stream, cuBLASLt handle), then lays out
 * device memory in this order (cuda_setup_device):
 *   weights     uploaded from the checkpoint (converted to bf16 or f32 as
 *               cuda_backend.c's header lists) or, for random:SHAPE
 *               models, filled on the device
 *   workspace   activations for MAX_TOKENS tokens, attention partials,
 *               OUT_CHUNK rows of logits and sort buffers, the cuBLASLt
 *               and wgmm.cu workspaces, the one-kernel decode's scratch
 *   KV pool     sized from the free memory left (a fraction) unless the
 *               options ask for a number of pages
 * and plans what depends on the GPU: the decode attention's grids, its
 * one-per-SM length bound (timed), the matmul choices (timed). Every
 * allocation is recorded in c->allocs (dalloc) and freed by
 * cuda_backend.c's destroy, so a create that fails half way leaks
 * nothing; a model that does not fit gets an error naming what did not.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

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

/* Fills n values at dst on the device for a tensor a random:SHAPE model
 * lacks: N(0, 0.02) as bf16, or ones for norms (and for f32). */
static int fill_random(cuda_backend *c, void *dst, int bf16, int64_t n,
                       uint64_t seed, int is_norm)
{
    if (bf16)
        pie__cuda_fill_bf16(dst, n, seed, is_norm ? 1.0f : 0.02f, is_norm, c->st);
    else
        pie__cuda_fill_f32(dst, n, 1.0f, c->st);
    CK(cudaGetLastError());
    return 0;
}

/* Converts tensor t's n values to f32 (then bf16 where bf16 = 1) on the
 * host, a chunk at a time, and copies them to dst. */
static int put_converted(void *dst, int bf16, const pie_tensor *t, int64_t n,
                         const char *name)
{
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

/* Copies tensor t (any dtype) into dst on the device as bf16 (bf16 = 1) or
 * f32, checking its size. A NULL tensor of a random:SHAPE model is filled on
 * the device (fill_random). */
static int put_tensor(cuda_backend *c, void *dst, int bf16,
                      const pie_tensor *t, int64_t n, const char *name,
                      int layer, uint64_t seed, int is_norm)
{
    if (!t->data) {
        if (!c->random_fill)
            return pie_err_set(PIE_EFORMAT, "cuda: tensor %s of layer %d is "
                               "missing", name, layer);
        return fill_random(c, dst, bf16, n, seed, is_norm);
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
    return put_converted(dst, bf16, t, n, name);
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

/* ------------------------------------------- batch-1 decode in one kernel */

/* Arguments and scratch of the batch-1 kernel, where it runs (at create:
 * the layer table on the device, small scratch buffers). */
static int mega_setup(cuda_backend *c)
{
    const pie_model_config *g = &c->cfg;
    const char *e = getenv("PIE_CUDA_MEGA");
    /* (q/k norms: not in the kernel; more kv heads than SMs: a block of
     * the grid for each head's attention at least) */
    if (!e || strcmp(e, "1") || c->layers[0].q_norm || c->layers[0].k_norm ||
        g->n_kv_heads > c->n_sm)
        return 0;
    pie_cuda_mega_args *a = &c->mega;
    int nkv = g->n_kv_heads, G = g->n_heads / nkv, hd = g->head_dim, rc;
    *a = (pie_cuda_mega_args){ .n_layers = g->n_layers, .dim = g->dim,
        .nh = g->n_heads, .nkv = nkv, .hd = hd, .hid = g->hidden_dim,
        .eps = g->norm_eps, .inv_freq = c->inv_freq, .x = c->x,
        .smax = c->n_sm / nkv > 0 ? c->n_sm / nkv : 1,
        .split_slots = MEGA_SPLIT, .split_slots_max = MEGA_SPLIT_MAX };
    if (!pie__cuda_mega_supported(a, c->n_sm)) return 0;
    pie_cuda_mega_layer *t = malloc(sizeof *t * (size_t)g->n_layers);
    if (!t) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    for (int l = 0; l < g->n_layers; l++) {
        const cuda_layer *L = &c->layers[l];
        t[l] = (pie_cuda_mega_layer){ L->attn_norm, L->bqkv, L->ffn_norm,
                                      L->wqkv, L->wo, L->wgu, L->wdown };
    }
    int64_t qkvd = (int64_t)(g->n_heads + 2 * nkv) * hd;
    int64_t parts = (int64_t)nkv * a->smax * G;
    rc = dalloc(c, (void **)&a->layers, sizeof *t * (size_t)g->n_layers, "layers");
    if (!rc) rc = cudaMemcpy((void *)a->layers, t, sizeof *t * (size_t)g->n_layers,
                             cudaMemcpyHostToDevice) == cudaSuccess
                      ? 0 : pie_err_set(PIE_EDEVICE, "cuda: layer table copy");
    free(t);
    if (rc) return rc;
    TRY(dalloc(c, (void **)&a->qkv, 4 * qkvd, "decode scratch"));
    TRY(dalloc(c, (void **)&a->att, 4 * (int64_t)g->n_heads * hd, "decode scratch"));
    TRY(dalloc(c, (void **)&a->h, 4 * (int64_t)g->hidden_dim, "decode scratch"));
    TRY(dalloc(c, (void **)&a->part_o, 4 * parts * hd, "decode scratch"));
    TRY(dalloc(c, (void **)&a->part_ml, 8 * parts, "decode scratch"));
    TRY(dalloc(c, (void **)&a->bar, 4 * (1 + (int64_t)nkv), "decode scratch"));
    c->mega_ok = 1;
    return 0;
}

/* ---------------------------------------------------------------- create */

int cuda_check_shape(const pie_model_config *g)
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
    if ((int64_t)g->vocab_size * OUT_CHUNK > INT32_MAX)
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: vocabulary of %d tokens; "
                           "sampling offsets hold at most %d", g->vocab_size,
                           INT32_MAX / OUT_CHUNK);
    return 0;
}

/* The decode kernel's persistent grid: its resident blocks on every SM,
 * or PIE_CUDA_DEC_BLOCKS (for experiments). */
static int plan_dec_grid(cuda_backend *c)
{
    if (!pie__cuda_flash_supported(c->cfg.head_dim)) return 0;
    const char *e = getenv("PIE_CUDA_DEC_BLOCKS");
    c->dec_per_sm = pie__cuda_attention_dec_occupancy(c->cfg.head_dim, 0);
    c->dec_whole_max = pie__cuda_attention_dec_occupancy(c->cfg.head_dim, 1);
    c->dec_blocks = e && atoi(e) > 0 ? atoi(e) : c->dec_per_sm * c->n_sm;
    c->dec_cluster_max = pie__cuda_attention_dec_cluster_max(c->cfg.head_dim, 0);
    for (int k = 1; k <= 3; k++)
        c->dec_cluster_max_pad[k] =
            pie__cuda_attention_dec_cluster_max(c->cfg.head_dim, k);
    /* the whole-item plan's grid: up to the resident blocks an SM (forced
     * ones too: PIE_CUDA_DEC_WHOLE=k) */
    int whole = c->dec_whole_max * c->n_sm;
    c->cap_bstart = c->dec_blocks > whole ? c->dec_blocks : whole;
    c->bstart = malloc(4 * ((size_t)c->cap_bstart + 1));
    c->dmerges = malloc(sizeof *c->dmerges * (size_t)c->dec_blocks);
    if (!c->bstart || !c->dmerges)
        return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    return 0;
}

/* wgmm.cu's workspace (about 33 MiB on 132 SMs), where it may be tried:
 * not with PIE_CUDA_NO_WGMM=1 or PIE_CUDA_NO_TUNE=1. Its counters are
 * zeroed on the backend's stream, before any matmul there. */
static int alloc_wgmm(cuda_backend *c)
{
    int rc;
    c->wgmm.max_grid = c->n_sm;
    if (getenv("PIE_CUDA_NO_WGMM") || getenv("PIE_CUDA_NO_TUNE")) return 0;
    TRY(dalloc(c, (void **)&c->wgmm.part,
               pie__cuda_wgmm_part_floats(c->n_sm) * 4, "matmul splits"));
    TRY(dalloc(c, (void **)&c->wgmm.cnt, PIE_CUDA_WGMM_MAX_TILES * 4,
               "matmul splits"));
    CK(cudaMemsetAsync(c->wgmm.cnt, 0, PIE_CUDA_WGMM_MAX_TILES * 4, c->st));
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
    return alloc_wgmm(c);
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
    c->base.max_tokens = MAX_TOKENS;
    return 0;
}

/* The one-per-SM decode plan's bound on item length for this GPU, timed
 * on the empty KV pool (dec_calib.c); PIE_CUDA_DEC_CALIB=0 keeps the fixed
 * bound, PIE_CUDA_TUNE_LOG=1 prints the times. */
static void calibrate_dec(cuda_backend *c)
{
    double tw, tc;
    const char *e = getenv("PIE_CUDA_DEC_CALIB");
    c->dec_max1 = PIE_CUDA_DEC_WHOLE_MAX;
    if (e && *e == '0') return;
    c->dec_max1 = pie_cuda_dec_calibrate(&c->kv, c->base.n_pages,
                                         c->cfg.n_heads, c->n_sm,
                                         c->dec_blocks, c->st, &tw, &tc);
    if (getenv("PIE_CUDA_TUNE_LOG"))
        fprintf(stderr, "pie: cuda: decode attention, one block an SM %.1f us,"
                " cut plan %.1f us: long items %s\n", tw, tc,
                c->dec_max1 > PIE_CUDA_DEC_WHOLE_MAX ? "on one an SM"
                                                     : "cut");
}

/* The device ordinal opts ask for (0 by default), checked against the
 * GPUs this machine has. */
int cuda_pick_device(const pie_backend_opts *o, int *dev)
{
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        cudaGetLastError();
        return pie_err_set(PIE_EUNSUPPORTED, "cuda: no usable GPU (%s)",
                           e != cudaSuccess ? cudaGetErrorString(e)
                                            : "no devices");
    }
    *dev = o ? o->device : 0;
    if (*dev < 0 || *dev >= ndev)
        return pie_err_set(PIE_EINVAL, "cuda: no device %d (this machine "
                           "has %d GPU%s, ordinals 0..%d)", *dev, ndev,
                           ndev == 1 ? "" : "s", ndev - 1);
    return 0;
}

/* Selects the device; creates the stream and the cuBLASLt handle, reads
 * the SM count and L2 size. */
int cuda_open_device(cuda_backend *c)
{
    cudaError_t e;
    int dev = c->device;
    if ((e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking)) !=
            cudaSuccess ||
        (e = cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount,
                                    dev)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&c->l2_bytes, cudaDevAttrL2CacheSize,
                                    dev)) != cudaSuccess)
        return pie_err_set(PIE_EDEVICE, "cuda: %s", cudaGetErrorString(e));
    if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS)
        return pie_err_set(PIE_EDEVICE, "cuda: cublasLtCreate failed");
    return 0;
}

/* Everything on the device, in the order of the file header (plans,
 * weights, workspace, KV pool, tuned matmuls), then waits for it. */
int cuda_setup_device(cuda_backend *c, const pie_model *m,
                      const pie_backend_opts *o)
{
    cudaError_t e;
    int rc;
    TRY(plan_dec_grid(c));
    TRY(upload_weights(c, m));
    TRY(alloc_workspace(c));
    TRY(mega_setup(c));
    TRY(plan_pool(c, o));
    calibrate_dec(c);
    TRY(cuda_warm_plans(c));
    if ((e = cudaDeviceSynchronize()) != cudaSuccess)
        return pie_err_set(PIE_EDEVICE, "cuda: %s", cudaGetErrorString(e));
    return 0;
}
