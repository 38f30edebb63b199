/*
 * cuda_backend.c — the CUDA backend: bf16 weights and KV pages on one GPU,
 * fp32 accumulation, cuBLASLt for the dense matmuls (matmul.c; gemv.cu
 * instead in decode steps of <= 16 rows where it times faster) and pie's
 * own kernels (kernels.cu, attention.cu, flash_prefill.cu,
 * flash_decode.cu, sample.cu) for the rest. Its state (cuda_backend) is
 * described in cuda_internal.h.
 *
 * Device memory, allocated once at create time (cuda_setup.c):
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
 * Attention work is planned on the host each forward (attn_plan.c):
 * prompts of FLASH_MIN tokens or more take the tensor-core prefill kernel
 * in 128-row tiles (fitems); decode steps and short chunks take the
 * tensor-core decode kernel, their items cut for its persistent grid
 * (gitems -> pieces, plan_dec / dec_plan.c) and cut items merged after it;
 * head dims the tensor-core kernels lack take the CUDA-core kernel (items,
 * split for occupancy, then merged).
 *
 * Failures: a bad batch is refused before any device work. A call that
 * fails on the device waits for what it queued and clears the error, so
 * the next call starts clean (after_failure); an error the context does
 * not survive (an illegal address, ...) makes this and every later call
 * answer PIE_EDEVLOST at once. A refused cluster launch re-plans the step
 * without clusters; metadata buffers that cannot grow fail only the
 * forward that needed them.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/trace.h"

/* ---------------------------------------------------------------- errors */

/* The errors after which "the process must be terminated and relaunched"
 * (driver_types.h): the context is lost and every later call fails. */
int pie__cuda_sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchTimeout:
    case cudaErrorAssert: case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction: case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace: case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure: case cudaErrorTensorMemoryLeak:
    case cudaErrorMpsClientTerminated: case cudaErrorExternalDevice:
    case cudaErrorContained: case cudaErrorUnsupportedDevSideSync:
    case cudaErrorECCUncorrectable:
        return 1;
    default:
        return 0;
    }
}

int pie__cuda_fail(cudaError_t e, const char *file, int line, const char *call)
{
    cudaGetLastError();     /* a transient error must not fail the next call */
    if (pie__cuda_sticky(e))
        return pie_err_set(PIE_EDEVLOST, "cuda: device lost: %s (%s:%d: %s); "
                           "nothing more runs on it until the process "
                           "restarts", cudaGetErrorString(e), file, line, call);
    return pie_err_set(PIE_EDEVICE, "cuda: %s (%s:%d: %s)",
                       cudaGetErrorString(e), file, line, call);
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

/* Replaces the pinned and device metadata buffers by ones of the host
 * buffer's capacity. The new ones are allocated first: where that fails,
 * this forward fails (PIE_ENOMEM) and the old ones still serve smaller
 * forwards. PIE_CUDA_TEST_META_FAIL=1 (a test hook) asks for more device
 * memory than any GPU has: a real allocation failure. */
static int meta_grow(cuda_backend *c)
{
    size_t cap = c->meta_cap;
    size_t ask = getenv("PIE_CUDA_TEST_META_FAIL") ? (size_t)1 << 50 : cap;
    uint8_t *pin = NULL, *dev = NULL;
    cudaError_t e = cudaMallocHost((void **)&pin, cap);
    if (e == cudaSuccess) e = cudaMalloc((void **)&dev, ask);
    if (e != cudaSuccess) {
        if (pin) cudaFreeHost(pin);
        int rc = pie__cuda_fail(e, __FILE__, __LINE__, "metadata buffers");
        if (rc == PIE_EDEVLOST) return rc;
        return pie_err_set(PIE_ENOMEM, "cuda: no memory for this forward's "
                           "%zu bytes of metadata (%s); forwards of up to %zu "
                           "bytes still run", c->meta_len,
                           cudaGetErrorString(e), c->meta_dev_cap);
    }
    /* (no forward is in flight: each synchronizes before it returns) */
    if (c->meta_pin) cudaFreeHost(c->meta_pin);
    if (c->meta_dev) cudaFree(c->meta_dev);
    c->meta_pin = pin;
    c->meta_dev = dev;
    c->meta_dev_cap = cap;
    return 0;
}

/* Copies the built metadata to the device (growing the buffers). */
static int meta_upload(cuda_backend *c)
{
    int rc;
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    if (c->meta_len > c->meta_dev_cap) TRY(meta_grow(c));
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
        int64_t kv_len = cuda_kv_len(b, r, ps);
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
        int64_t kv_len = cuda_kv_len(b, r, ps);
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

/* Counts the outputs' LOGPROBS ids and logit mask words, refusing a batch
 * past the sampler's limits (probe values per OUT_CHUNK chunk too). */
static int output_sizes(const cuda_backend *c, const pie_forward_batch *b,
                        const pie_forward_out *out, int64_t *n_ids_out,
                        int64_t *lwords_out)
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
    *n_ids_out = n_ids;
    *lwords_out = lwords;
    return 0;
}

/* The sampler row of sampler s whose values start val_off into its
 * chunk's; build_outputs adds LOGPROBS ids, the sort row and the mask. */
static pie_cuda_srow srow_of(const pie_sampler *s, uint32_t val_off)
{
    pie_cuda_srow r = { s->kind, s->temperature, s->top_k, s->top_p,
                        s->min_p, 0.0f, (int32_t)val_off, 0, 0, -1, -1, 0 };
    if (s->kind == PIE_SAMPLER_RANDOM) r.u = pie_sample_uniform(s->seed);
    if (s->kind == PIE_PROBE_TOPK) r.n_ids = s->top_k;
    return r;
}

/* Fills the sampler rows, LOGPROBS ids and logit mask bits of every output
 * into the metadata build_outputs placed. */
static void fill_srows(cuda_backend *c, const pie_forward_batch *b,
                       const pie_forward_out *out, const step_meta *sm)
{
    int V = c->cfg.vocab_size;
    pie_cuda_srow *sr = META(c, sm->srow);
    int32_t *ids = META(c, sm->lp_ids);
    uint32_t *bits = META(c, sm->lmask);
    int64_t io = 0;
    int n_sort = 0;
    for (int o = 0; o < b->n_outputs; o++) {
        const pie_sampler *s = &b->samplers[o];
        int o0 = o - o % OUT_CHUNK;
        if (o == o0) n_sort = 0;
        pie_cuda_srow r = srow_of(s, out->value_indptr[o] - out->value_indptr[o0]);
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
}

/* Sampler rows, LOGPROBS ids and logit masks of every output. */
static int build_outputs(cuda_backend *c, const pie_forward_batch *b,
                         const pie_forward_out *out, step_meta *sm)
{
    int no = b->n_outputs;
    int64_t n_ids = 0, lwords = 0;
    int rc = output_sizes(c, b, out, &n_ids, &lwords);
    if (rc) return rc;
    sm->rows = meta_put(c, b->output_token_idx, 4 * (size_t)no);
    sm->srow = meta_put(c, NULL, sizeof(pie_cuda_srow) * (size_t)no);
    sm->lp_ids = meta_put(c, NULL, 4 * (size_t)n_ids);
    sm->lmask = meta_put(c, NULL, 4 * (size_t)lwords);
    if (c->meta_oom) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    fill_srows(c, b, out, sm);
    return 0;
}

/* Decode attention of layer l: the persistent grid, then the merges of
 * the items it cut (a fixed-size list: graphs keep their arguments); or
 * the whole-item plan's grid of 1, 2 or 4 blocks per SM, which cuts
 * nothing; or at small and mid batch the cluster plan, which merges in
 * the clusters' shared memory. */
static int run_dec_attention(cuda_backend *c, int l,
                             const pie_cuda_tokmeta *tm, const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    if (c->dec_cluster) {
        if (!c->refuse_clusters &&
            !pie__cuda_attention_dec_cluster(c->att, c->q, DEV(c, sm->gitems),
                                             (int)c->n_gitems * c->dec_cluster,
                                             c->dec_cluster, c->dec_cluster_pad,
                                             tm, &c->kv, l,
                                             g->n_heads, c->st))
            return 0;
        /* refused (a shared GPU's limits; or the test hook): the step
         * stops here, and cuda_forward runs it again planned without
         * clusters, as every later step is */
        c->dec_cluster_max = 0;
        c->cluster_refused = 1;
        return pie_err_set(PIE_EDEVICE, "cuda: the cluster decode plan did "
                           "not launch (%s)",
                           cudaGetErrorString(cudaGetLastError()));
    }
    pie__cuda_attention_dec(c->att, c->part_o, c->part_ml, c->q,
                            DEV(c, sm->gitems), DEV(c, sm->bstart),
                            c->dec_whole ? c->dec_whole * c->n_sm : c->dec_blocks,
                            tm, &c->kv, l, g->n_heads, c->dec_whole, c->st);
    if (!c->dec_whole)
        pie__cuda_attn_merge(c->att, c->part_o, c->part_ml,
                             DEV(c, sm->dmerges), c->dec_blocks, g->n_heads,
                             g->n_kv_heads, g->head_dim, c->st);
    return 0;
}

/* The qkv matmul of layer l and qkv_post (bias, RoPE, q out, K and V into
 * the pages): one kernel where cuda_mm_qkv takes it (decode steps on
 * gemv.cu, no q/k norms; PIE_CUDA_NO_QKV_FUSE=1 never), else two. */
static int layer_qkv(cuda_backend *c, const cuda_layer *L, int l,
                     const pie_cuda_tokmeta *tm, int n)
{
    const pie_model_config *g = &c->cfg;
    int nh = g->n_heads, qkvd = (nh + 2 * g->n_kv_heads) * g->head_dim, rc;
    pie_cuda_prof *P = &c->prof;
    if (!c->qkv_unfused && !L->q_norm && !L->k_norm) {
        pie_cuda_qkv_epi e = { c->q, L->bqkv, c->inv_freq, *tm, c->kv, l, nh };
        rc = cuda_mm_qkv(c, &e, L->wqkv, qkvd, g->dim, c->xb, n);
        if (rc <= 0) {
            pie_cuda_prof_mark(P, PROF_QKV, c->st);
            return rc;
        }
    }
    if ((rc = cuda_mm(c, c->qkv, 0, L->wqkv, qkvd, g->dim, c->xb, n))) return rc;
    pie_cuda_prof_mark(P, PROF_QKV, c->st);
    pie__cuda_qkv_post(c->q, c->qkv, L->bqkv, L->q_norm, L->k_norm,
                       g->norm_eps, c->inv_freq, tm, &c->kv, l, n, nh, c->st);
    pie_cuda_prof_mark(P, PROF_QKV_POST, c->st);
    return 0;
}

/* Launches the batch-1 kernel over every layer; 0 where it was refused
 * (MPS limits, a shared GPU): it is off from now on, and the caller takes
 * the per-operation path. */
static int mega_launch(cuda_backend *c, const pie_cuda_tokmeta *tm)
{
    c->mega.tm = *tm;
    c->mega.kv = c->kv;
    if (!pie__cuda_mega(&c->mega, c->n_sm, c->st)) return 1;
    fprintf(stderr, "pie: the batch-1 decode kernel did not launch (%s); "
            "running kernels per operation from now on\n",
            cudaGetErrorString(cudaGetLastError()));
    c->mega_ok = c->mega_step = 0;
    return 0;
}

/* The attention half of layer l: RMSNorm, qkv, the step's attention
 * kernels and their merges, wo added into x. */
static int layer_attn(cuda_backend *c, int l, int n,
                      const pie_cuda_tokmeta *tm, const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    const cuda_layer *L = &c->layers[l];
    int dim = g->dim, nh = g->n_heads, hd = g->head_dim;
    const pie_cuda_attn_item *items = DEV(c, sm->items);
    const pie_cuda_merge_item *merges = DEV(c, sm->merges);
    const pie_cuda_attn_item *fitems = DEV(c, sm->fitems);
    int rc;
    pie_cuda_prof *P = &c->prof;
    pie__cuda_rmsnorm(c->xb, c->x, L->attn_norm, NULL, n, dim,
                      g->norm_eps, c->st);
    pie_cuda_prof_mark(P, PROF_NORM, c->st);
    if ((rc = layer_qkv(c, L, l, tm, n))) return rc;
    pie__cuda_attention(c->att, c->part_o, c->part_ml, c->q, items,
                        (int)c->n_items, tm, &c->kv, l, nh, c->max_slots,
                        c->st);
    pie__cuda_attention_flash(c->att, c->part_o, c->part_ml, c->q, fitems,
                              (int)c->n_fitems, tm, &c->kv, l, nh, c->st);
    if (c->n_gitems && (rc = run_dec_attention(c, l, tm, sm))) return rc;
    pie_cuda_prof_mark(P, PROF_ATTN, c->st);
    pie__cuda_attn_merge(c->att, c->part_o, c->part_ml, merges,
                         (int)c->n_merges, nh, g->n_kv_heads, hd, c->st);
    pie_cuda_prof_mark(P, PROF_MERGE, c->st);
    if ((rc = cuda_mm_add(c, c->x, L->wo, dim, nh * hd, c->att, n))) return rc;
    pie_cuda_prof_mark(P, PROF_WO, c->st);
    return 0;
}

/* The feed-forward half of layer L: RMSNorm, gate/up and the GLU, w_down
 * added into x. */
static int layer_ffn(cuda_backend *c, const cuda_layer *L, int n)
{
    const pie_model_config *g = &c->cfg;
    int dim = g->dim, hid = g->hidden_dim;
    int rc;
    pie_cuda_prof *P = &c->prof;
    pie__cuda_rmsnorm(c->xb, c->x, L->ffn_norm, NULL, n, dim,
                      g->norm_eps, c->st);
    pie_cuda_prof_mark(P, PROF_NORM, c->st);
    if ((rc = cuda_mm_glu(c, c->h, c->gu, L->wgu, hid, dim, c->xb, n))) return rc;
    pie_cuda_prof_mark(P, PROF_GATE_UP, c->st);
    if ((rc = cuda_mm_add(c, c->x, L->wdown, dim, hid, c->h, n))) return rc;
    pie_cuda_prof_mark(P, PROF_DOWN, c->st);
    return 0;
}

/* The embedding, then every layer: the batch-1 kernel where this step
 * takes it (mega_step), else kernels per operation. */
static int run_layers(cuda_backend *c, int n, const pie_cuda_tokmeta *tm,
                      const step_meta *sm)
{
    const pie_model_config *g = &c->cfg;
    int rc;
    pie__cuda_embed(c->x, c->embed, DEV(c, sm->tok), n,
                    g->dim, c->st);
    pie_cuda_prof_mark(&c->prof, PROF_EMBED, c->st);
    if (c->mega_step && mega_launch(c, tm)) {
        CK(cudaGetLastError());
        return 0;
    }
    for (int l = 0; l < g->n_layers; l++) {
        if ((rc = layer_attn(c, l, n, tm, sm))) return rc;
        if ((rc = layer_ffn(c, &c->layers[l], n))) return rc;
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
    k.dec_whole = c->n_gitems ? c->dec_whole : 0;
    k.dec_cluster = c->n_gitems ? c->dec_cluster : 0;
    k.dec_cluster_pad = c->n_gitems ? c->dec_cluster_pad : 0;
    k.mega = c->mega_step;
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
    if (rc && c->cluster_refused) {   /* not the graph's fault */
        cudaGetLastError();
        return rc;
    }
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
        if ((rc = cuda_mm(c, c->logits, 1, c->lm_head, V, g->dim, c->xo, rows)))
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
        if (e) return pie__cuda_fail((cudaError_t)e, __FILE__, __LINE__,
                                     "sampling");
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
            cuda_kv_len(b, r, c->base.page_size) < 2)
            return 0;
    return 1;
}

/* ----------------------------------------- batch-1 decode in one kernel */

/* Whether this forward runs its layers as one kernel (mega.cu): a decode
 * step of one request without a mask, on a backend where the kernel runs
 * and PIE_CUDA_MEGA=1 asked for it (off by default: slower than the
 * kernel-per-operation path so far; NOTES.md, round 10). */
static int use_mega(const cuda_backend *c, const pie_forward_batch *b)
{
    if (!c->mega_ok || !c->decode_step || b->n_tokens != 1 ||
        b->n_reqs != 1 || b->mask_indptr)
        return 0;
    int64_t L = cuda_kv_len(b, 0, c->base.page_size);
    if (L > INT32_MAX) return 0;
    int S = pie_cuda_mega_splits((int)L, c->mega.smax, c->mega.split_slots);
    return (L + S - 1) / S <= MEGA_SPLIT_MAX;
}

/* The step's settings (environment, profiling, decode or not, batch-1
 * kernel or not) and an empty metadata buffer. */
static void step_begin(cuda_backend *c, const pie_forward_batch *b)
{
    c->graphs_off = getenv("PIE_CUDA_NO_GRAPH") != NULL;
    c->qkv_unfused = getenv("PIE_CUDA_NO_QKV_FUSE") != NULL;
    c->refuse_clusters = getenv("PIE_CUDA_TEST_REFUSE_CLUSTER") != NULL;
    pie_cuda_prof_init(&c->prof);
    c->decode_step = is_decode(c, b);
    c->mega_step = use_mega(c, b);
    c->n_mega += c->mega_step;
    pie_cuda_steps_enter(&c->steps, c->decode_step);
    if (c->decode_step) pie_cuda_trace_decode();
    c->meta_len = 0;
    c->meta_oom = 0;
}

/* Plans the batch's attention, its CUDA-core tiles split for occupancy
 * (unsplit where the splits overflow the workspace; PIE_ELIMIT where even
 * that does). */
static int plan_attn(cuda_backend *c, const pie_forward_batch *b,
                     const uint32_t *range_of)
{
    const pie_model_config *g = &c->cfg;
    int T = cuda_tile_tokens(c);
    int64_t tiles = 0;
    for (int r = 0; r < b->n_reqs; r++) {
        int n_new = b->qo_indptr[r + 1] - b->qo_indptr[r];
        if (!cuda_use_flash(c, n_new)) tiles += (n_new + T - 1) / T;
    }
    /* splits so that about split_blocks attention blocks per SM exist */
    int64_t goal = (int64_t)c->split_blocks * c->n_sm;
    int64_t base = tiles * g->n_kv_heads, want = 1;
    if (base > 0 && base < goal) want = (goal + base - 1) / base;
    if (want > 32) want = 32;
    int64_t parts = cuda_plan_attention(c, b, (int)want, range_of);
    if (parts > c->max_parts) parts = cuda_plan_attention(c, b, 1, range_of);
    if (parts < 0) return (int)parts;
    if (parts > c->max_parts)
        return pie_err_set(PIE_ELIMIT, "cuda: attention needs %lld split "
                           "rows, workspace holds %lld; use shorter "
                           "prefill chunks", (long long)parts,
                           (long long)c->max_parts);
    return 0;
}

/* The per-token metadata into sm, then the attention plan; range_of (each
 * token's mask length, where the batch has masks) lives only meanwhile. */
static int plan_step(cuda_backend *c, const pie_forward_batch *b,
                     step_meta *sm)
{
    uint32_t *range_of = NULL;
    if (b->mask_indptr && !(range_of = malloc(4 * (size_t)b->n_tokens)))
        return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    int rc = build_tokens(c, b, sm, range_of);
    if (!rc) rc = plan_attn(c, b, range_of);
    free(range_of);
    return rc;
}

/* Appends the attention plan's item lists (prefill tiles longest first)
 * and the page lists to the metadata. */
static void put_plan(cuda_backend *c, const pie_forward_batch *b,
                     step_meta *sm)
{
    sm->items = meta_put(c, c->items, sizeof *c->items * (size_t)c->n_items);
    sm->merges = meta_put(c, c->merges, sizeof *c->merges * (size_t)c->n_merges);
    if (c->n_fitems > 1)
        qsort(c->fitems, (size_t)c->n_fitems, sizeof *c->fitems, cuda_cmp_longest);
    sm->fitems = meta_put(c, c->fitems, sizeof *c->fitems * (size_t)c->n_fitems);
    sm->gitems = meta_put(c, c->pieces, c->n_gitems ? sizeof *c->pieces *
                          (size_t)(c->n_gitems + c->dec_blocks) : 0);
    sm->bstart = meta_put(c, c->bstart,
                          c->n_gitems ? 4 * (size_t)(c->cap_bstart + 1) : 0);
    sm->dmerges = meta_put(c, c->dmerges, c->n_gitems ? sizeof *c->dmerges *
                           (size_t)c->dec_blocks : 0);
    /* after everything of fixed size, so decode steps keep their offsets */
    sm->pages = meta_put(c, b->kv_page_indices,
                         4 * (size_t)b->kv_page_indptr[b->n_reqs]);
}

/* One forward on a valid batch: plan, upload the metadata, run the layers
 * and the outputs, synchronize. */
static int forward_run(cuda_backend *c, const pie_forward_batch *b,
                       pie_forward_out *out)
{
    int rc;
    CK(cudaSetDevice(c->device));
    step_begin(c, b);
    step_meta sm = { 0 };
    if ((rc = plan_step(c, b, &sm))) return rc;
    put_plan(c, b, &sm);
    if ((rc = build_outputs(c, b, out, &sm))) return rc;
    pie_cuda_steps_upload(&c->steps, c->st);
    if ((rc = meta_upload(c))) return rc;
    pie_cuda_tokmeta tm = {
        DEV(c, sm.slot), DEV(c, sm.req), DEV(c, sm.pos), DEV(c, sm.kv_indptr),
        DEV(c, sm.kv_len), DEV(c, sm.pages),
        b->mask_indptr ? DEV(c, sm.mask_off) : NULL,
        b->mask_indptr ? DEV(c, sm.mask_bits) : NULL };
    pie_cuda_prof_begin(&c->prof, c->decode_step, c->st);
    if ((rc = run_layers_graphed(c, b->n_tokens, &tm, &sm))) return rc;
    if ((rc = run_outputs(c, b, out, &sm))) return rc;
    pie_cuda_steps_enqueued(&c->steps, c->st);
    CK(cudaStreamSynchronize(c->st));
    pie_cuda_steps_end(&c->steps);
    pie_cuda_prof_end(&c->prof);
    CK(cudaGetLastError());
    return 0;
}

/* After a call on the device failed: waits for the work it queued (kernels
 * and copies may still read its metadata and write its pages), clears a
 * transient error, and remembers a lost context (an error the wait alone
 * shows counts too). Returns rc, or PIE_EDEVLOST. */
static int after_failure(cuda_backend *c, int rc)
{
    cudaError_t e = cudaStreamSynchronize(c->st);
    cudaGetLastError();
    if (rc != PIE_EDEVLOST && pie__cuda_sticky(e))
        rc = pie__cuda_fail(e, __FILE__, __LINE__, "after a failed call");
    if (rc == PIE_EDEVLOST && !c->lost) {
        c->lost = 1;
        snprintf(c->lost_msg, sizeof c->lost_msg, "%s", pie_err_msg());
    }
    return rc;
}

static int lost_error(const cuda_backend *c)
{
    return pie_err_set(PIE_EDEVLOST, "%s", c->lost_msg);
}

/* Validates, then runs the forward; a step whose cluster launch was refused
 * runs once more, planned without clusters (dec_cluster_max is 0 now). */
static int cuda_forward(pie_backend *bb, const pie_forward_batch *b,
                        pie_forward_out *out)
{
    cuda_backend *c = (cuda_backend *)bb;
    if (c->lost) return lost_error(c);
    int rc = pie_batch_validate(b, c->cfg.vocab_size, bb->page_size,
                                bb->n_pages);
    if (!rc) rc = pie_forward_out_check(b, c->cfg.vocab_size, out);
    if (rc) return rc;
    if (b->n_tokens > MAX_TOKENS)
        return pie_err_set(PIE_ELIMIT, "cuda: batch has %d tokens, at most %d "
                           "per forward; split the prefill", b->n_tokens,
                           MAX_TOKENS);
    if (b->n_tokens == 0) return 0;
    c->cluster_refused = 0;
    int dec = c->sweep ? is_decode(c, b) : 0;
    cuda_sweep_before(c, dec, b->n_tokens);
    rc = forward_run(c, b, out);
    cuda_sweep_after(c, dec, b->n_tokens, rc);
    if (rc && c->cluster_refused) {
        rc = after_failure(c, rc);
        c->cluster_refused = 0;
        if (rc == PIE_EDEVLOST) return rc;
        pie_err_clear();
        c->n_replans++;
        rc = forward_run(c, b, out);
    }
    return rc ? after_failure(c, rc) : 0;
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

static int copy_slots_run(cuda_backend *c, int32_t src, int32_t src_off,
                          int32_t dst, int32_t dst_off, int32_t n)
{
    pie_backend *bb = &c->base;
    int ps = bb->page_size;
    if (src < 0 || src >= bb->n_pages || dst < 0 || dst >= bb->n_pages)
        return pie_err_set(PIE_ERANGE, "cuda: copy_slots pages %d -> %d "
                           "outside 0..%d", src, dst, bb->n_pages - 1);
    if (n < 0 || src_off < 0 || dst_off < 0 || src_off > ps - n ||
        dst_off > ps - n)
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

static int cuda_copy_slots(pie_backend *bb, int32_t src, int32_t src_off,
                           int32_t dst, int32_t dst_off, int32_t n)
{
    cuda_backend *c = (cuda_backend *)bb;
    if (c->lost) return lost_error(c);
    int rc = copy_slots_run(c, src, src_off, dst, dst_off, n);
    return rc ? after_failure(c, rc) : 0;
}

/* Copies pages between the pool and host (page_bytes each, in order):
 * to the device where `up`, else from it. */
static int transfer_run(cuda_backend *c, const int32_t *pages, int32_t n,
                        uint8_t *host, int up)
{
    pie_backend *bb = &c->base;
    int rc = check_pages(c, pages, n);
    if (rc) return rc;
    CK(cudaSetDevice(c->device));
    int64_t pe = pie_cuda_kv_page_elems(&c->kv);
    for (int32_t i = 0; i < n; i++) {
        uint8_t *h = host + (size_t)i * bb->page_bytes;
        uint16_t *d = c->kv.pool + (int64_t)pages[i] * pe;
        CK(cudaMemcpyAsync(up ? (void *)d : (void *)h, up ? (void *)h : (void *)d,
                           bb->page_bytes, up ? cudaMemcpyHostToDevice
                                              : cudaMemcpyDeviceToHost, c->st));
    }
    CK(cudaStreamSynchronize(c->st));
    return 0;
}

static int page_transfer(pie_backend *bb, const int32_t *pages, int32_t n,
                         uint8_t *host, int up)
{
    cuda_backend *c = (cuda_backend *)bb;
    if (c->lost) return lost_error(c);
    int rc = transfer_run(c, pages, n, host, up);
    return rc ? after_failure(c, rc) : 0;
}

static int cuda_download(pie_backend *bb, const int32_t *pages, int32_t n,
                         void *host)
{
    return page_transfer(bb, pages, n, host, 0);
}

static int cuda_upload(pie_backend *bb, const int32_t *pages, int32_t n,
                       const void *host)
{
    return page_transfer(bb, pages, n, (uint8_t *)host, 1);
}

static void cuda_destroy(pie_backend *bb)
{
    cuda_backend *c = (cuda_backend *)bb;
    if (!c) return;
    cudaSetDevice(c->device);
    if (c->st) cudaStreamSynchronize(c->st);
    pie_cuda_prof_done(&c->prof);
    pie_cuda_steps_done(&c->steps);
    cuda_sweep_done(c);
    pie_cuda_trace_stop();
    for (int i = 0; i < GRAPH_CACHE; i++)
        if (c->graphs[i].exec) cudaGraphExecDestroy(c->graphs[i].exec);
    for (int i = 0; i < MM_CACHE; i++) cuda_plan_free(&c->plans[i]);
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

int64_t pie_backend_cuda_wgmm_calls(const pie_backend *b)
{
    if (!b || b->ops != &CUDA_OPS) return 0;
    return ((const cuda_backend *)b)->n_wgmm;
}

int64_t pie_backend_cuda_mega_steps(const pie_backend *b)
{
    if (!b || b->ops != &CUDA_OPS) return 0;
    return ((const cuda_backend *)b)->n_mega;
}

int64_t pie_backend_cuda_replans(const pie_backend *b)
{
    if (!b || b->ops != &CUDA_OPS) return 0;
    return ((const cuda_backend *)b)->n_replans;
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

/* The host-side fields of a new backend for model m on device dev. */
static void init_backend(cuda_backend *c, const pie_model *m,
                         const pie_backend_opts *o, int dev)
{
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
}

int pie_backend_cuda_create(const pie_model *m, const pie_backend_opts *o,
                            pie_backend **out)
{
    *out = NULL;
    int dev = 0;
    int rc = cuda_pick_device(o, &dev);
    if (rc) return rc;
    rc = cuda_check_shape(&m->cfg);
    if (rc) return rc;
    cuda_backend *c = calloc(1, sizeof *c);
    if (!c) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    init_backend(c, m, o, dev);
    if ((rc = cuda_open_device(c))) goto err;
    if ((rc = cuda_setup_device(c, m, o))) goto err;
    pie_cuda_trace_start();
    pie_cuda_steps_init(&c->steps);
    cuda_sweep_init(c);
    *out = &c->base;
    return 0;
err:
    cuda_destroy(&c->base);
    return rc;
}
