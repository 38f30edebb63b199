/*
 * cuda_kernels.h — pie's own CUDA kernels, callable from C.
 *
 * Every launcher takes device pointers and a stream and returns nothing; the
 * caller checks cudaGetLastError() once per step. bf16 data is passed as
 * uint16_t (the bit pattern), f32 as float. The differential test
 * (tests/cuda/test_cuda_kernels.c) runs each launcher against a plain C twin.
 *
 * KV pool layout (bf16), one page contiguous so page moves are one memcpy:
 *
 *   pool[page][layer][k_or_v][kv_head][slot_in_page][head_dim]
 *
 * Token metadata used by the attention kernels, all device arrays:
 *   tok_slot[t]   KV slot of token t in its request (kv_len - n_new + i)
 *   tok_req[t]    request of token t
 *   kv_indptr[r]  first entry of request r in pages[] (n_reqs+1 entries)
 *   kv_len[r]     slots of request r including the new tokens
 *   mask_off[t]   -1 = causal, else word offset of token t's bitmap in
 *                 mask_bits (bit j set = slot j attended)
 */
#ifndef PIE_CUDA_KERNELS_H
#define PIE_CUDA_KERNELS_H

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pie_cuda_kv {
    uint16_t *pool;          /* device, see layout above                    */
    int32_t   n_layers;
    int32_t   n_kv;
    int32_t   page_size;
    int32_t   head_dim;
} pie_cuda_kv;

#ifdef __CUDACC__
#define PIE_HD __host__ __device__
#else
#define PIE_HD
#endif

/* Elements of one page (every layer, K and V). */
static inline PIE_HD int64_t pie_cuda_kv_page_elems(const pie_cuda_kv *kv)
{
    return (int64_t)kv->n_layers * 2 * kv->n_kv * kv->page_size * kv->head_dim;
}

/* Within a page: where kv head h's K rows of a layer begin (elements), and
 * how much further its V rows are. */
static inline PIE_HD int64_t pie_cuda_kv_k_off(const pie_cuda_kv *kv, int layer,
                                               int h)
{
    return ((int64_t)layer * 2 * kv->n_kv + h) * kv->page_size * kv->head_dim;
}

static inline PIE_HD int64_t pie_cuda_kv_voff(const pie_cuda_kv *kv)
{
    return (int64_t)kv->n_kv * kv->page_size * kv->head_dim;
}

#ifdef __CUDACC__
#include <math.h>
/* silu(g) * u, the SwiGLU of one element: silu_mul (kernels.cu) and the
 * fused gate/up epilogue of gemv.cu share it, so both round alike. */
static __device__ __forceinline__ float pie_silu_mul(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}

/* RoPE of the pair (x0, x1) = (element i, element i + hd/2) of a head at
 * the angle whose cosine and sine are c and s: qkv_post (kernels.cu) and
 * the fused qkv epilogue of gemv.cu share it, each product rounded on its
 * own (no contraction into an fma that could differ between the two). */
static __device__ __forceinline__ float2 pie_rope(float x0, float x1, float c,
                                                  float s)
{
    return make_float2(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)),
                       __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
}
#endif

typedef struct pie_cuda_tokmeta {
    const int32_t  *tok_slot;    /* (n_tokens)                              */
    const int32_t  *tok_req;     /* (n_tokens)                              */
    const int32_t  *positions;   /* (n_tokens)                              */
    const int32_t  *kv_indptr;   /* (n_reqs+1)                              */
    const int32_t  *kv_len;      /* (n_reqs)                                */
    const int32_t  *pages;       /* (kv_indptr[n_reqs])                     */
    const int32_t  *mask_off;    /* (n_tokens) or NULL = all causal         */
    const uint32_t *mask_bits;
} pie_cuda_tokmeta;

/* One attention work item: a tile of nt consecutive tokens of request req
 * (global token indices t0..t0+nt), one kv head, slots [s0, s1). part < 0:
 * the item covers all slots and writes the output; else it writes partial
 * rows part .. part + nt*G - 1 for pie__cuda_attn_merge. pad = 1: the
 * rows are grouped (tokens x the G heads of kv head kvh). */
typedef struct pie_cuda_attn_item {
    int32_t req, t0, nt, kvh, s0, s1, part, pad;
} pie_cuda_attn_item;

/* Merge item: the tile t0..t0+nt of kv head kvh was split nsplit ways;
 * split s's rows start at part + s*nt*G. */
typedef struct pie_cuda_merge_item {
    int32_t t0, nt, kvh, nsplit, part, pad[3];
} pie_cuda_merge_item;

#define PIE_CUDA_ATTN_RMAX 8       /* query rows (token, head) per item     */
#define PIE_CUDA_ATTN_CHUNK 1024   /* max slots per item                    */

/* x[t] = embed[tok[t]] as f32.  x (n, dim) */
void pie__cuda_embed(float *x, const uint16_t *embed, const int32_t *tok,
                     int n, int dim, cudaStream_t s);
/* out[i] = bf16(rmsnorm(x[rows ? rows[i] : i]) * w).  out (n, dim) */
void pie__cuda_rmsnorm(uint16_t *out, const float *x, const float *w,
                       const int32_t *rows, int n, int dim, float eps,
                       cudaStream_t s);
/* Post-projection of fused qkv (n, (nh+2nkv)*hd) bf16: + bias, per-head
 * q/k RMSNorm (qwen3), RoPE (half-split) at positions; q out (n, nh*hd) f32,
 * K and V appended into the pool at each token's slot for this layer. */
void pie__cuda_qkv_post(float *q, const uint16_t *qkv, const float *bias,
                        const float *q_norm, const float *k_norm, float eps,
                        const float *inv_freq, const pie_cuda_tokmeta *tm,
                        const pie_cuda_kv *kv, int layer, int n, int nh,
                        cudaStream_t s);
/* Paged attention over work items; out (n, nh*hd) bf16. part_o/part_ml
 * hold split partials (rows, hd) and (rows, 2). max_slots >= every item's
 * s1 - s0 (<= PIE_CUDA_ATTN_CHUNK) sizes the shared score buffer. */
void pie__cuda_attention(uint16_t *out, float *part_o, float *part_ml,
                         const float *q, const pie_cuda_attn_item *items,
                         int n_items, const pie_cuda_tokmeta *tm,
                         const pie_cuda_kv *kv, int layer, int nh,
                         int max_slots, cudaStream_t s);
void pie__cuda_attn_merge(uint16_t *out, const float *part_o,
                          const float *part_ml,
                          const pie_cuda_merge_item *items, int n_items,
                          int nh, int nkv, int hd, cudaStream_t s);
/* Tensor-core (mma.sync) attention, items of up to PIE_CUDA_FLASH_ROWS
 * query rows over slots [s0, s1), causal or bitmap masks as for
 * pie__cuda_attention. pad = 0 (prefill): rows are tokens t0..t0+nt of
 * request req and ONE query head (held in kvh), output always written.
 * pad = 1 (grouped): rows are nt tokens x the G heads of kv head kvh
 * (nt * G <= PIE_CUDA_FLASH_ROWS) and part >= 0 writes split partials
 * for pie__cuda_attn_merge. Head dims with pie__cuda_flash_supported(). */
#define PIE_CUDA_FLASH_ROWS 128
#define PIE_CUDA_FLASH_DEC_ROWS 16
int pie__cuda_flash_supported(int hd);
void pie__cuda_attention_flash(uint16_t *out, float *part_o, float *part_ml,
                               const float *q,
                               const pie_cuda_attn_item *items, int n_items,
                               const pie_cuda_tokmeta *tm,
                               const pie_cuda_kv *kv, int layer, int nh,
                               cudaStream_t s);
/* Decode attention (grouped items of at most PIE_CUDA_FLASH_DEC_ROWS rows)
 * on a persistent grid of n_blocks blocks: block b runs the pieces
 * pieces[bstart[b] .. bstart[b + 1]) of pie_cuda_dec_plan; the partials of
 * cut items are then combined by pie__cuda_attn_merge over its merges.
 * per_sm > 0: the blocks take enough shared memory that at most per_sm
 * share an SM (the whole-item plan's grid of 1, 2 or 4 blocks per SM; at
 * 4, the kernel's build for 4 resident blocks); 0: as many as fit (the
 * cut plan's grid). */
void pie__cuda_attention_dec(uint16_t *out, float *part_o, float *part_ml,
                             const float *q, const pie_cuda_attn_item *pieces,
                             const int32_t *bstart, int n_blocks,
                             const pie_cuda_tokmeta *tm, const pie_cuda_kv *kv,
                             int layer, int nh, int per_sm, cudaStream_t s);
/* Blocks of pie__cuda_attention_dec resident per SM: on the cut plan's
 * grid (whole = 0), or at most on a whole-item plan's (whole = 1). */
int pie__cuda_attention_dec_occupancy(int hd, int whole);

/* Decode plan (dec_plan.c, host): cuts grouped items (pad = 1, part
 * ignored) on 64-slot KV blocks into pieces so that each of n_blocks
 * blocks streams an equal share (+-1) of all KV blocks (an empty item
 * counts one), at least min_kv of them (fewer blocks work otherwise). Pieces come out in block order, block b's being
 * pieces[bstart[b] .. bstart[b + 1]); capacities: pieces n_items +
 * n_blocks, bstart n_blocks + 1, merges n_blocks. An item kept whole writes
 * its output (part = -1); the pieces of a cut item write partial rows
 * (nt * G each) from part0 on, combined by one merge item. Returns part0
 * plus the partial rows used. */
#define PIE_CUDA_DEC_BLOCK 64
int64_t pie_cuda_dec_plan(const pie_cuda_attn_item *items, int n_items, int G,
                          int n_blocks, int min_kv, int64_t part0,
                          pie_cuda_attn_item *pieces, int *n_pieces,
                          int32_t *bstart, pie_cuda_merge_item *merges,
                          int *n_merges);
/* Whole-item decode plan (dec_plan.c, host): the items, none cut, onto
 * n_blocks blocks (k per SM), longest first onto the least loaded; block
 * b's pieces are pieces[bstart[b] .. bstart[b + 1]) (capacities n_items,
 * n_blocks + 1; part = -1). Returns the most KV blocks (64 slots; an empty
 * item one) of any block, or -1 without memory. Launch it with
 * pie__cuda_attention_dec(..., per_sm = k); no merge follows.
 * pie_cuda_dec_try_whole makes it where it beats the cut plan (measured),
 * trying in turn:
 *   - n_sm blocks: at most one item per SM, PIE_CUDA_DEC_WHOLE_MIN to
 *     max1 KV blocks each on average (PIE_CUDA_DEC_WHOLE_MAX, or what
 *     pie_cuda_dec_calibrate measured), head dim >= 128;
 *   - 4 n_sm blocks: head dim below 128 (where 4 blocks are resident),
 *     at most 40 KV blocks a grid block on average;
 *   - 2 n_sm blocks: at head dim >= 128 at least PIE_CUDA_DEC_WHOLE_MIN
 *     KV blocks an item on average; below, at least
 *     PIE_CUDA_DEC_WHOLE_MIN64 and at most 32 a grid block;
 * each only if its largest block is within 6% of an even share (on four
 * an SM also: more items than SMs, at most one a block, each of at most
 * 16 KV blocks), and only where per_sm
 * (pie__cuda_attention_dec_occupancy(hd, 1)) allows k.
 * force = k >= 1 makes it on k blocks per SM whatever the shape. Returns
 * the blocks per SM (k) if made, 0 if not (pieces and bstart then
 * undefined), -1 without memory. bstart needs k n_sm + 1 entries.
 * pie_cuda_dec_whole_switch reads PIE_CUDA_DEC_WHOLE for the backend and
 * the bench alike: -1 never (=0), 0 by the rule (unset), k = 1..8 forced
 * onto k blocks per SM. */
#define PIE_CUDA_DEC_WHOLE_MIN 4
#define PIE_CUDA_DEC_WHOLE_MIN64 24
#define PIE_CUDA_DEC_WHOLE_MAX 64
int64_t pie_cuda_dec_plan_whole(const pie_cuda_attn_item *items, int n_items,
                                int n_blocks, pie_cuda_attn_item *pieces,
                                int32_t *bstart);
int pie_cuda_dec_try_whole(const pie_cuda_attn_item *items, int n_items,
                           int n_sm, int per_sm, int hd, int force,
                           int64_t max1, pie_cuda_attn_item *pieces,
                           int32_t *bstart);
/* The one-per-SM plan's max1 for this GPU (dec_calib.c): times it against
 * the cut plan's grid of cut_blocks on n_sm / n_kv requests of 8192 slots
 * (pages 0.. of kv's pool, which must hold no request; n_pages of them),
 * and returns INT32_MAX where it was at least 3% faster, else
 * PIE_CUDA_DEC_WHOLE_MAX (also where it cannot run: head dim below 128
 * or not built, too few pages, pages not of 16 slots, a device error). *t_whole and
 * *t_cut: the times (us), or -1. */
int64_t pie_cuda_dec_calibrate(const pie_cuda_kv *kv, int64_t n_pages, int nh,
                               int n_sm, int cut_blocks, cudaStream_t s,
                               double *t_whole, double *t_cut);
int pie_cuda_dec_whole_switch(void);
/* The cluster plan (dec_plan.c, host): item i's KV blocks split evenly
 * over pieces[i C .. i C + C), one a block of a cluster of C (an empty
 * rank: s0 = s1), for pie__cuda_attention_dec_cluster; no merge follows.
 * Two rules pick C (NOTES.md, rounds 13 and 14):
 * - pie_cuda_dec_cluster_size, at small batch, before the other plans:
 *   the smallest power of two from 2 to min(max_c,
 *   PIE_CUDA_DEC_CLUSTER_MAX) that leaves at most PIE_CUDA_DEC_CLUSTER_PER
 *   KV blocks a piece of the longest item, if n_items C <= min(n_sm, grid)
 *   (a grid no larger than the SMs; grid: the pieces' room beyond
 *   n_items). 8B batch 1 gained 0.2-1.7%, 1B 0.5-1.5%; 8B batch 4 (256
 *   blocks) lost 2% and clusters of 16 lost at head dim 64 ctx 2048.
 *   *per_sm: 1 where the grid is at most half the SMs (its shared memory
 *   padded to one block an SM: 8B B=1 ctx 512 -1.2 to -2.2%; at a grid of
 *   128, 1B B=2, +6%: clusters of 8 at one an SM no longer all fit at
 *   once), else 0 (NOTES.md, round 15).
 *   force = C (PIE_CUDA_DEC_CLUSTER=C, 2..16, read by
 *   pie_cuda_dec_cluster_switch) takes C <= max_c wherever n_items C <=
 *   grid; force < 0 (=0) never.
 * - pie_cuda_dec_cluster_mid, where neither that nor a whole-item plan is
 *   taken (batches of about 5 to 16): the largest C of
 *   PIE_CUDA_DEC_CLUSTER_MID, halved down to 2, with n_sm <= n_items C <=
 *   2 n_sm (and <= grid) and at most PIE_CUDA_DEC_CLUSTER_LONG KV blocks a
 *   piece; 4 only below head dim 128. *per_sm: 2 for clusters of 2 (their
 *   shared memory padded to allow at most two blocks an SM; unpadded, the
 *   scheduler put three on some SMs and 8B B=16 steps ran either as fast
 *   as the cut plan or 6% slower), else 0 (padded, clusters of 4 lost 20-
 *   50%). About two blocks an SM: three (clusters of 3 at B=16), fewer
 *   than one (B=4) and long pieces were slower. Steps: 8B B=16 ctx 512
 *   -3%, 1B B=8 ctx 2048 -3% (NOTES.md, round 14). Never where force != 0.
 * 0: none (the other plans). */
#define PIE_CUDA_DEC_CLUSTER_PER 2
#define PIE_CUDA_DEC_CLUSTER_MAX 8
#define PIE_CUDA_DEC_CLUSTER_MID 4
#define PIE_CUDA_DEC_CLUSTER_LONG 17
void pie_cuda_dec_plan_cluster(const pie_cuda_attn_item *items, int n_items,
                               int C, pie_cuda_attn_item *pieces);
int pie_cuda_dec_cluster_size(const pie_cuda_attn_item *items, int n_items,
                              int n_sm, int grid, int max_c, int force,
                              int *per_sm);
int pie_cuda_dec_cluster_mid(const pie_cuda_attn_item *items, int n_items,
                             int n_sm, int grid, int hd, int max_c, int force,
                             int *per_sm);
int pie_cuda_dec_cluster_switch(void);
/* PIE_CUDA_DEC_CLUSTER_PAD=k (0..3): the cluster plan's blocks an SM at
 * most, whichever rule picked it (0: unpadded); -1 where unset or out of
 * range (the rule's choice). For experiments (NOTES.md, round 14: one an
 * SM at batch 1). */
int pie_cuda_dec_cluster_pad_switch(void);
/* The padding a cluster plan of C blocks a cluster runs with: pad (1..3
 * blocks an SM at most, the rule's or the switch's choice) where clusters
 * of C still run padded so (C <= max_pad[pad], the largest such cluster,
 * pie__cuda_attention_dec_cluster_max(hd, pad)), else the next looser
 * padding that runs, else 0 (unpadded: max_c already checked C). Keeps a
 * padded launch that no GPC could hold from failing a step. */
int pie_cuda_dec_cluster_pad_fit(int C, int pad, const int *max_pad);
/* Decode attention on the cluster plan: n_blocks = items x C pieces,
 * clusters of C (2..16) blocks, each combining its item's C states in
 * distributed shared memory and writing out; part buffers unused. per_sm
 * > 0: shared memory padded so that at most per_sm blocks share an SM
 * (where the device allows it). Returns 0 if launched, -1 if not (bad
 * arguments, or the launch failed: its error stays for cudaGetLastError). */
int pie__cuda_attention_dec_cluster(uint16_t *out, const float *q,
                                    const pie_cuda_attn_item *pieces,
                                    int n_blocks, int C, int per_sm,
                                    const pie_cuda_tokmeta *tm,
                                    const pie_cuda_kv *kv, int layer, int nh,
                                    cudaStream_t s);
/* The largest cluster (16, 8, 4 or 2 blocks) of the cluster plan's kernel
 * at head dim hd that can be resident on this GPU, its shared memory
 * padded to at most per_sm blocks an SM (0: unpadded); 0: none. A padded
 * cluster of C needs C SMs of one GPC with room, which a GPU partitioned
 * into small GPCs (MIG) or limited by MPS may not have. */
int pie__cuda_attention_dec_cluster_max(int hd, int per_sm);
/* out (n, hidden) bf16 = silu(gu[:, :hidden]) * gu[:, hidden:], gu bf16 */
void pie__cuda_silu_mul(uint16_t *out, const uint16_t *gu, int n, int hidden,
                        cudaStream_t s);
/* Programmatic dependent launch level (kernels.cu): 0 off
 * (PIE_CUDA_NO_PDL=1), 1 gemv.cu, qkv_post and decode attention (default),
 * 2 every layer kernel (PIE_CUDA_PDL_ALL=1). */
int pie__cuda_pdl(void);
/* The environment variable name as an integer in lo..hi; dflt where it is
 * unset, or (with a warning) not such an integer (kernels.cu). */
int pie__cuda_env_int(const char *name, long lo, long hi, int dflt);
/* The shared-memory carveout (percent of the SM's unified L1 and shared
 * memory; -1: the driver's choice) asked for in the environment by a class
 * of launches, read once; -2 where not set (or not -1..100):
 * PIE_CUDA_CARVE_DEC the decode attention outside clusters
 * (PIE_CUDA_DEC_CARVEOUT=p, else flash_decode.cu's dec_carveout),
 * PIE_CUDA_CARVE_GEMV gemv.cu (PIE_CUDA_GEMV_CARVEOUT=p, else
 * gemv_carveout's rule). */
enum { PIE_CUDA_CARVE_DEC, PIE_CUDA_CARVE_GEMV, PIE_CUDA_CARVE_N };
int pie__cuda_carveout(int what);

/* ---- small-m matmul (gemv.cu) ---- */
#define PIE_CUDA_GEMV_MAX_M 16
/* 1 when pie__cuda_gemv can run this shape: 1 <= m <= 16, k % 8 == 0,
 * W and x 16-byte aligned. */
int pie__cuda_gemv_supported(int m, int k, const void *W, const void *x);
/* y (m, n) = x (m, k) . W^T, W (n, k) bf16, x bf16, y f32 (y_f32 = 1) or
 * bf16 (0); y_f32 = 2: y (f32) += x . W^T. r = warps per block of 16
 * output rows, splitting k (1, 2, 4 or 8); pdl = 1 launches it as a
 * programmatic dependent of the previous kernel (its weight loads start
 * before that kernel ends). Returns -1 (nothing launched) for an
 * unsupported shape or r, or a failed launch. */
int pie__cuda_gemv(void *y, int y_f32, const uint16_t *W, int n, int k,
                   const uint16_t *x, int m, int r, int pdl, cudaStream_t s);
/* h (m, hid) bf16 = silu(gate) * up of gu = x . Wgu^T, Wgu (2 hid, k):
 * gate rows then up rows, as pie__cuda_gemv (gu rounded to bf16) followed
 * by pie__cuda_silu_mul, bit for bit, without writing gu. Same refusals. */
int pie__cuda_gemv_glu(uint16_t *h, const uint16_t *Wgu, int hid, int k,
                       const uint16_t *x, int m, int r, int pdl,
                       cudaStream_t s);

/* ---- the Hopper matmul for 17..256 rows (wgmm.cu) ---- */
#define PIE_CUDA_WGMM_MAX_M 256
#define PIE_CUDA_WGMM_MAX_TILES 4096
enum {
    PIE_CUDA_WGMM_BF16 = 0,     /* y bf16 */
    PIE_CUDA_WGMM_F32 = 1,      /* y f32 */
    PIE_CUDA_WGMM_ACC = 2,      /* y f32 += */
    PIE_CUDA_WGMM_GLU = 3       /* the SwiGLU of a gate/up pair, bf16 */
};
/* Its workspace, zeroed once at allocation: part holds
 * pie__cuda_wgmm_part_floats(max_grid) floats, cnt PIE_CUDA_WGMM_MAX_TILES
 * ints (every call leaves them zero again). Calls sharing one must run in
 * stream order. */
typedef struct pie_cuda_wgmm_ws {
    float *part;
    int   *cnt;
    int    max_grid;
} pie_cuda_wgmm_ws;
size_t pie__cuda_wgmm_part_floats(int max_grid);
/* 1 when pie__cuda_wgmm can run this mode and shape: 1 <= m <= 256, k a
 * multiple of 64 (at most 65536), n a multiple of 128 (GLU: hid a
 * multiple of 64), W and x 16-byte aligned, and the driver offers tensor
 * maps. */
int pie__cuda_wgmm_supported(int mode, int m, int n, int k, const void *W,
                             const void *x);
/* BF16 / F32: y (m, n) = x (m, k) . W^T; ACC: y (f32) += x . W^T; GLU:
 * y = h (m, hid = n) bf16 = silu(gate) * up of x . Wgu^T, Wgu (2 hid, k)
 * gate rows then up rows, gate and up rounded to bf16 first as the bf16
 * matmul + pie__cuda_silu_mul (bit for bit where no tile is split). On at
 * most `grid` blocks (and ws->max_grid; the SM count: one block an SM).
 * Its results do not depend on m or on the other rows of x. -1:
 * unsupported, or the launch failed (nothing ran). */
int pie__cuda_wgmm(void *y, int mode, const uint16_t *W, int n, int k,
                   const uint16_t *x, int m, const pie_cuda_wgmm_ws *ws,
                   int grid, int pdl, cudaStream_t s);

/* The qkv matmul of a decode step with qkv_post in its epilogue
 * (pie__cuda_gemv_qkv): where q (f32), K and V (bf16, into the pages of
 * layer `layer`) go, the bias (or NULL) and the RoPE frequencies. No q/k
 * norms: those need a whole head, which no block holds. */
typedef struct pie_cuda_qkv_epi {
    float          *q;
    const float    *bias;
    const float    *inv_freq;
    pie_cuda_tokmeta tm;
    pie_cuda_kv     kv;
    int32_t         layer, nh;
} pie_cuda_qkv_epi;
/* pie__cuda_gemv into a bf16 qkv (m, (nh + 2 n_kv) hd) followed by
 * pie__cuda_qkv_post without q/k norms, bit for bit, without writing qkv:
 * a block's 16 rows are 8 RoPE pairs (i, i + hd/2) of one q or k head, or
 * 16 rows of a v head, so each lane holds both halves of its pairs. Refuses
 * (-1) as pie__cuda_gemv, and where hd % 16 != 0. */
int pie__cuda_gemv_qkv(const pie_cuda_qkv_epi *e, const uint16_t *Wqkv, int k,
                       const uint16_t *x, int m, int r, int pdl,
                       cudaStream_t s);

/* Fills n bf16 values with N(0, std) from seed (or the constant std when
 * constant != 0). */
void pie__cuda_fill_bf16(uint16_t *p, int64_t n, uint64_t seed, float std,
                         int constant, cudaStream_t s);
void pie__cuda_fill_f32(float *p, int64_t n, float v, cudaStream_t s);
/* Reads n floats of p (16-byte aligned): evicts the L2 cache before a
 * timed run. sink receives a value only in the unlikely case the sum is
 * 1.2345. */
void pie__cuda_l2_flush(const float *p, int64_t n, float *sink, cudaStream_t s);
/* f32 -> bf16 conversion on the device. */
void pie__cuda_f32_to_bf16(uint16_t *dst, const float *src, int64_t n,
                           cudaStream_t s);
/* Copies n slots of every layer (K and V) from (src, src_off) to (dst,
 * dst_off). */
void pie__cuda_copy_slots(const pie_cuda_kv *kv, int src, int src_off,
                          int dst, int dst_off, int n, cudaStream_t s);

/* ---- sampling (sample.cu) ---- */

/* Per-row parameters of the output rows of one chunk. */
typedef struct pie_cuda_srow {
    int32_t  kind;       /* pie_sampler_kind                               */
    float    temp;
    int32_t  top_k;
    float    top_p;
    float    min_p;
    float    u;          /* pie_sample_uniform(seed)                        */
    int32_t  val_off;    /* offset into the chunk's values/ids              */
    int32_t  n_ids;      /* LOGPROBS ids count; TOPK k                      */
    int32_t  ids_off;    /* LOGPROBS: offset into lp_ids                    */
    int32_t  mask_off;   /* logit mask bitmap word offset, -1 = none        */
    int32_t  sort_row;   /* row in the sort buffers, -1 = not sorted        */
    int32_t  pad;
} pie_cuda_srow;

typedef struct pie_cuda_sample_args {
    float               *logits;     /* (rows, vocab), masked in place      */
    int32_t              rows;
    int32_t              vocab;
    const pie_cuda_srow *srow;       /* (rows)                              */
    const uint32_t      *mask_bits;
    const int32_t       *lp_ids;
    int32_t              n_sort;     /* rows needing a sorted distribution  */
    float               *sort_kin, *sort_kout;   /* (n_sort, vocab)         */
    int32_t             *sort_vin, *sort_vout;
    int32_t             *seg_off;    /* (n_sort+1) device                   */
    void                *sort_tmp;
    size_t               sort_tmp_bytes;
    int32_t             *tokens;     /* (rows) out                          */
    float               *values;     /* out                                 */
    int32_t             *ids;        /* out                                 */
} pie_cuda_sample_args;

/* ---- mega.cu: the layers of a batch-1 decode step in one kernel ---- */

#define PIE_CUDA_MEGA_GMAX 8        /* query heads per kv head, at most */

typedef struct pie_cuda_mega_layer {
    const float    *attn_norm, *bqkv, *ffn_norm;   /* bqkv may be NULL */
    const uint16_t *wqkv, *wo, *wgu, *wdown;
} pie_cuda_mega_layer;

typedef struct pie_cuda_mega_args {
    const pie_cuda_mega_layer *layers;   /* device, n_layers            */
    int32_t          n_layers, dim, nh, nkv, hd, hid;
    float            eps;
    const float     *inv_freq;     /* (hd / 2) RoPE frequencies          */
    float           *x;            /* (dim) the residual stream, in/out  */
    float           *qkv;          /* ((nh + 2 nkv) hd) scratch          */
    float           *att;          /* (nh hd) scratch                    */
    float           *h;            /* (hid) scratch                      */
    float           *part_o;       /* (nkv smax G hd) scratch            */
    float           *part_ml;      /* (nkv smax G 2) scratch             */
    unsigned        *bar;          /* (1 + nkv): the grid barrier, then  */
                                   /* each kv head's finished splits     */
    pie_cuda_tokmeta tm;           /* one token, one request, no mask    */
    pie_cuda_kv      kv;
    int32_t          smax;         /* splits of a kv head, at most       */
    int32_t          split_slots;  /* slots a split aims at              */
    int32_t          split_slots_max;  /* slots a split may hold         */
} pie_cuda_mega_args;

/* Splits of the context of L slots per kv head (host and device agree). */
static inline PIE_HD int pie_cuda_mega_splits(int L, int smax, int split_slots)
{
    int s = (L + split_slots - 1) / split_slots;
    return s < 1 ? 1 : s > smax ? smax : s;
}

/* Whether the kernel runs for these shapes on this device, one block per
 * SM all resident (sets its shared-memory opt-in). */
int pie__cuda_mega_supported(const pie_cuda_mega_args *a, int n_sm);
/* Zeroes a->bar, then runs every layer (a cooperative launch of n_blocks,
 * at most one per SM). Returns 0 or -1 (launch refused). */
int pie__cuda_mega(const pie_cuda_mega_args *a, int n_blocks, cudaStream_t s);

/* Temporary bytes the sort needs for n_sort rows of vocab. */
size_t pie__cuda_sort_tmp_bytes(int n_sort, int vocab);
/* Runs masks, samplers and probes of one chunk. Returns 0 or a CUDA error
 * code. */
int pie__cuda_sample(const pie_cuda_sample_args *a, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif
