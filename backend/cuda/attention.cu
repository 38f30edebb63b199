/*
 * attention.cu — pie's attention kernels over the paged KV cache: the
 * CUDA-core kernel (any head dim, split partials), the merge of split
 * partials, the tensor-core prefill kernel (flash_attn_kernel) and the
 * tensor-core decode kernel on a persistent grid (flash_dec_kernel, its
 * plans in dec_plan.c; at small and, below head dim 128, mid batch on
 * thread-block clusters that merge in distributed shared memory,
 * dec_cluster_store). Each has a C twin in
 * tests/cuda/test_cuda_kernels.c; the KV pool layout is in cuda_kernels.h.
 */
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <type_traits>

#include <cooperative_groups.h>

#include "backend/cuda/kernel_util.cuh"

/* ------------------------------------------------------------ attention */

/*
 * One block per work item: up to RMAX query rows (nt tokens x G heads of
 * one kv head) over slots [s0, s1). Lanes form groups of LG = hd/8; a group
 * handles one slot at a time with 16-byte loads, so every K and V byte is
 * read once per item and shared by the G heads (and nt tokens).
 *   pass 1: scores into shared memory (masked slots -inf)
 *   pass 2: per-row max and sum; scores become exp(s - max)
 *   pass 3: P·V accumulated in registers, reduced across groups in smem
 * Shared memory (floats): qs[RMAX][hd], sc[RMAX][cs], os[5][RMAX][hd]
 * (one partial per warp, then the sum), ml[RMAX][2].
 */
#define RMAX PIE_CUDA_ATTN_RMAX
#define CHUNK PIE_CUDA_ATTN_CHUNK
#define ATT_THREADS 128
#define U 4                /* slots per group in flight */

static __device__ __forceinline__ void load8(const uint16_t *p, float *f)
{
    uint4 v = *reinterpret_cast<const uint4 *>(p);
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

/* f[u] = the 8 values at src of slots j0 + u * step (zeros from s1 on);
 * src: the lane's columns of layer + kv head + K or V in page 0. */
static __device__ __forceinline__ void load_slots(float (*f)[8],
                                                  const uint16_t *src,
                                                  const int *pages, int64_t pe,
                                                  int ps, int hd, int j0,
                                                  int step, int s1)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        int j = j0 + u * step;
        if (j < s1) {
            load8(src + pages[j / ps] * pe + (int64_t)(j % ps) * hd, f[u]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) f[u][e] = 0.0f;
        }
    }
}

static __device__ __forceinline__ bool attn_allowed(const pie_cuda_tokmeta &tm,
                                                    int t, int j)
{
    int mo = tm.mask_off ? tm.mask_off[t] : -1;
    if (mo < 0) return j <= tm.tok_slot[t];
    return (tm.mask_bits[mo + j / 32] >> (j % 32)) & 1u;
}

__global__ void __launch_bounds__(ATT_THREADS, 4)
attention_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                 const pie_cuda_attn_item *items, pie_cuda_tokmeta tm,
                 pie_cuda_kv kv, int layer, int nh, int cs)
{
    pdl_begin();
    // out (n, nh*hd) bf16, q (n, nh*hd) f32
    extern __shared__ float smem[];
    pie_cuda_attn_item it = items[blockIdx.x];
    int hd = kv.head_dim, nkv = kv.n_kv, ps = kv.page_size;
    int G = nh / nkv, R = it.nt * G, n = it.s1 - it.s0;
    int LG = hd / 8, NG = ATT_THREADS / LG;
    int gi = threadIdx.x / LG, li = threadIdx.x % LG;
    float *qs = smem, *sc = qs + RMAX * hd, *os = sc + RMAX * cs;
    float *ml = os + (ATT_THREADS / WARP + 1) * RMAX * hd;
    /* the item's page ids, so the slot loops read them from shared memory */
    int *pg = (int *)(ml + 2 * RMAX);
    int p0 = it.s0 / ps, np_ = it.s1 > it.s0 ? (it.s1 - 1) / ps - p0 + 1 : 0;
    float scale = rsqrtf((float)hd);
    for (int k = threadIdx.x; k < RMAX * hd; k += ATT_THREADS) {
        int r = k / hd, d = k % hd;
        float v = 0.0f;
        if (r < R) {
            int t = it.t0 + r / G, h = it.kvh * G + r % G;
            v = q[(int64_t)t * nh * hd + h * hd + d] * scale;
        }
        qs[k] = v;
    }
    __syncthreads();
    const int32_t *pages_g = tm.pages + tm.kv_indptr[it.req];
    for (int k = threadIdx.x; k < np_; k += ATT_THREADS) pg[k] = pages_g[p0 + k];
    __syncthreads();
    const int *pages = pg - p0;
    int64_t page_elems = pie_cuda_kv_page_elems(&kv);
    int64_t lay = pie_cuda_kv_k_off(&kv, layer, it.kvh);
    int64_t voff = pie_cuda_kv_voff(&kv);
    /* pass 1: U slots per group in flight */
    for (int base = it.s0; base < it.s1; base += NG * U) {
        float kf[U][8];
        load_slots(kf, kv.pool + lay + li * 8, pages, page_elems, ps, hd,
                   base + gi, NG, it.s1);
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            if (r >= R) break;
            float qr[8];
#pragma unroll
            for (int e = 0; e < 8; e++) qr[e] = qs[r * hd + li * 8 + e];
            int t = it.t0 + r / G;
#pragma unroll
            for (int u = 0; u < U; u++) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) d += qr[e] * kf[u][e];
                for (int o = LG / 2; o > 0; o >>= 1)
                    d += __shfl_xor_sync(0xffffffffu, d, o);
                int j = base + u * NG + gi;
                if (j < it.s1 && li == 0)
                    sc[r * cs + (j - it.s0)] = attn_allowed(tm, t, j) ? d : -INFINITY;
            }
        }
    }
    __syncthreads();
    /* pass 2 */
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    for (int r = w; r < R; r += ATT_THREADS / WARP) {
        float m = -INFINITY;
        for (int j = lane; j < n; j += WARP) m = fmaxf(m, sc[r * cs + j]);
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < n; j += WARP) {
            float v = sc[r * cs + j];
            float p = (v == -INFINITY) ? 0.0f : __expf(v - m);
            sc[r * cs + j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            ml[2 * r] = m;
            ml[2 * r + 1] = l;
        }
    }
    __syncthreads();
    /* pass 3 */
    float acc[RMAX][8];
#pragma unroll
    for (int r = 0; r < RMAX; r++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r][e] = 0.0f;
    for (int base = it.s0 + gi; base < it.s1; base += NG * U) {
        float vf[U][8];
        load_slots(vf, kv.pool + lay + voff + li * 8, pages, page_elems, ps,
                   hd, base, NG, it.s1);
#pragma unroll
        for (int u = 0; u < U; u++) {
            int j = base + u * NG;
            if (j >= it.s1) break;
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                if (r < R) {
                    float p = sc[r * cs + (j - it.s0)];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][e] += p * vf[u][e];
                }
            }
        }
    }
    /* reduce across the groups of a warp with shuffles, then across the
     * 4 warps through shared memory (no atomics: they serialize) */
#pragma unroll
    for (int r = 0; r < RMAX; r++) {
        if (r >= R) break;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float v = acc[r][e];
            for (int o = LG; o < WARP; o <<= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][e] = v;
        }
        if (lane < LG)
#pragma unroll
            for (int e = 0; e < 8; e++)
                os[(w * RMAX + r) * hd + li * 8 + e] = acc[r][e];
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * hd; k += ATT_THREADS) {
        float v = 0.0f;
#pragma unroll
        for (int ww = 0; ww < ATT_THREADS / WARP; ww++) v += os[ww * RMAX * hd + k];
        os[k + (ATT_THREADS / WARP) * RMAX * hd] = v;
    }
    __syncthreads();
    os += (ATT_THREADS / WARP) * RMAX * hd;
    for (int k = threadIdx.x; k < R * hd; k += ATT_THREADS) {
        int r = k / hd, d = k % hd;
        float l = ml[2 * r + 1];
        if (it.part < 0) {
            int t = it.t0 + r / G, h = it.kvh * G + r % G;
            out[(int64_t)t * nh * hd + h * hd + d] = f2bf(l > 0.0f ? os[k] / l : 0.0f);
        } else {
            part_o[(int64_t)(it.part + r) * hd + d] = os[k];
            if (d == 0) {
                part_ml[2 * (int64_t)(it.part + r)] = ml[2 * r];
                part_ml[2 * (int64_t)(it.part + r) + 1] = l;
            }
        }
    }
}

static size_t attn_smem(int hd, int cs)
{
    return sizeof(float) * ((size_t)RMAX * hd * (2 + ATT_THREADS / WARP) +
                            (size_t)RMAX * cs + 2 * RMAX + cs + 2);
}

extern "C" void pie__cuda_attention(uint16_t *out, float *part_o,
                                    float *part_ml, const float *q,
                                    const pie_cuda_attn_item *items,
                                    int n_items, const pie_cuda_tokmeta *tm,
                                    const pie_cuda_kv *kv, int layer, int nh,
                                    int max_slots, cudaStream_t s)
{
    if (n_items <= 0) return;
    int cs = (max_slots + 3) & ~3;
    if (cs < 4) cs = 4;
    size_t sm = attn_smem(kv->head_dim, cs);
    static size_t set;
    if (sm > 48 * 1024 && set < sm) {
        cudaFuncSetAttribute(attention_kernel,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
        set = sm;
    }
    launch_pdl(attention_kernel, n_items, ATT_THREADS, sm, s, out, part_o,
               part_ml, q, items, *tm, *kv, layer, nh, cs);
}

/* Merge of split partials. Each warp takes partial rows r of the item: its
 * lanes reduce the splits' max and mass in one round of loads and store
 * the split weights exp(m_s - M) / L in shared memory; then every thread
 * sums part_o over the splits for its (row, d) elements, loads independent
 * of each other. Items with more than MERGE_W row x split weights take
 * the slow path (weights recomputed per element). */
#define MERGE_W 4096
__global__ void attn_merge_kernel(uint16_t *out, const float *part_o,
                                  const float *part_ml,
                                  const pie_cuda_merge_item *items, int nh,
                                  int nkv, int hd)
{
    pdl_begin();
    // out (n, nh*hd) bf16; partial rows (rows, hd)
    __shared__ float wt[MERGE_W];
    pie_cuda_merge_item it = items[blockIdx.x];
    if (it.nsplit <= 0) return;         /* padding of a fixed-size list */
    int G = nh / nkv, R = it.nt * G, ns = it.nsplit, lane = threadIdx.x % WARP;
    bool fast = R * ns <= MERGE_W;
    for (int r = threadIdx.x / WARP; fast && r < R; r += blockDim.x / WARP) {
        float M = -INFINITY, L = 0.0f;
        for (int s = lane; s < ns; s += WARP)
            M = fmaxf(M, part_ml[2 * (int64_t)(it.part + s * R + r)]);
        M = warp_max(M);
        for (int s = lane; s < ns; s += WARP) {
            int64_t row = it.part + s * R + r;
            float m = part_ml[2 * row];
            float e = m == -INFINITY ? 0.0f : __expf(m - M);
            wt[r * ns + s] = e;
            L += part_ml[2 * row + 1] * e;
        }
        L = warp_sum(L);
        float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int s = lane; s < ns; s += WARP) wt[r * ns + s] *= inv;
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * hd; k += blockDim.x) {
        int r = k / hd, d = k % hd;
        float O = 0.0f;
        if (fast) {
#pragma unroll 8
            for (int s = 0; s < ns; s++) {
                float w = wt[r * ns + s];
                float v = part_o[(int64_t)(it.part + s * R + r) * hd + d];
                O += w != 0.0f ? w * v : 0.0f;
            }
        } else {
            float M = -INFINITY, L = 0.0f;
            for (int s = 0; s < ns; s++)
                M = fmaxf(M, part_ml[2 * (int64_t)(it.part + s * R + r)]);
            for (int s = 0; M != -INFINITY && s < ns; s++) {
                int64_t row = it.part + s * R + r;
                float m = part_ml[2 * row];
                if (m == -INFINITY) continue;
                float e = __expf(m - M);
                L += part_ml[2 * row + 1] * e;
                O += part_o[row * hd + d] * e;
            }
            O = L > 0.0f ? O / L : 0.0f;
        }
        int t = it.t0 + r / G, h = it.kvh * G + r % G;
        out[(int64_t)t * nh * hd + h * hd + d] = f2bf(O);
    }
}

extern "C" void pie__cuda_attn_merge(uint16_t *out, const float *part_o,
                                     const float *part_ml,
                                     const pie_cuda_merge_item *items,
                                     int n_items, int nh, int nkv, int hd,
                                     cudaStream_t s)
{
    if (n_items > 0)
        launch_pdl(attn_merge_kernel, n_items, 256, 0, s, out, part_o,
                   part_ml, items, nh, nkv, hd);
}

/* ------------------------------------------------------ flash attention */

/*
 * Tensor-core attention for prefill tiles (FlashAttention-2 layout). One
 * block per item: FA_BM = 128 query rows (consecutive tokens t0.. of one
 * request, one query head it.kvh): every KV block loaded into shared
 * memory serves 128 rows. At hd 128, 4 warps of 32 rows, so that every K
 * or V fragment a warp loads serves two m-tiles of 16 rows (8 warps of 16
 * rows ran at 146-185 TFLOP/s, this at 178-232); smaller heads keep 8
 * warps of 16 rows, whose lower register count allows twice the warps. KV blocks of FA_BN
 * = 64 slots are gathered from the pages into shared memory (K row-major,
 * V transposed), S = Q K^T and O += P V run on mma.sync m16n8k16 (bf16 in,
 * f32 accumulate), softmax is online in base 2 (scale * log2 e folded into
 * Q). Prefill items (pad 0): nt <= 64 tokens, kvh holds the query head.
 * Grouped items (pad 1): nt * G <= 128 rows of nt tokens x the G query
 * heads of kv head kvh, split partials as attention_kernel's when part >=
 * 0 (decode steps take flash_dec_kernel below, which shares the per-block
 * math). KV blocks are double-buffered with cp.async (the next block's
 * copies fly while this one is computed). In the fragment layout of
 * m16n8k16 (kernel_util.cuh) the S accumulators of two adjacent n-tiles
 * are the A operand of P V.
 * Shared memory (bf16): Q[FA_BM][HD+8] (scaled, read by ldmatrix once per
 * k-step) and two buffers of K[FA_BN][HD+8] and V, row-major; V's B
 * fragments come from ldmatrix.trans. The +8 padding makes every fragment
 * load bank-conflict free.
 */
#define FA_BM 128
#define FA_BN 64
/* prefill threads: hd 128, 4 warps of 32 rows (two m-tiles); smaller
 * heads, 8 warps of 16 rows (their registers allow 16 warps per SM) */
#define FA_THREADS(HD) ((HD) >= 128 ? 128 : 256)
#define FA_DEC_THREADS 128     /* the decode kernel: 4 warps               */
#define FA_STAGES 2            /* KV blocks in flight; 3 and 4 measured no
                                * faster (NOTES.md, round 5) */


/* Whether row (mask offset mo, causal limit lim) attends slot j. */
static __device__ __forceinline__ bool fa_allowed(const uint32_t *bits, int mo,
                                                  int lim, int j)
{
    if (mo < 0) return j <= lim;
    return (bits[mo + j / 32] >> (j % 32)) & 1u;
}

/* Query row r of an item: token and head. Prefill items (pad 0): r = token
 * offset, head it.kvh. Grouped items (pad 1, decode): r = token * G + i,
 * head it.kvh * G + i. */
struct fa_rows {
    int grouped, G, t0, hbase;
    __device__ int tok(int r) const { return t0 + (grouped ? r / G : r); }
    __device__ int head(int r) const { return hbase + (grouped ? r % G : 0); }
};

/* Issues the cp.async copies of KV block [s0, s0 + FA_BN) into Kb/Vb
 * (TH threads). Warp w copies slots w * SPW .. + SPW of the block. Where
 * those lie in one page (ps a power of two >= SPW, s0 a multiple of SPW:
 * every decode block), the warp reads that page's index once; otherwise
 * each 16-byte chunk looks its page up. ncu showed the per-chunk lookups
 * (8 dependent loads per thread per block at hd 128) as the top stall. */
/* One warp's SPW slots of a KV block, all in one page: base points at the
 * first slot's K, n (<= SPW, may be <= 0) slots exist, the rest are zero
 * filled. kd: the first slot's K row in shared memory (V at +vs). */
template <int HD, int SPW>
static __device__ __forceinline__ void fa_load_group(uint16_t *kd, int64_t vs,
                                                     const uint16_t *base,
                                                     const uint16_t *pool,
                                                     int64_t voff, int n)
{
    constexpr int LD = HD + 8, CPR = HD / 8, NI = SPW * CPR / WARP;
    static_assert(SPW * CPR % WARP == 0, "whole rounds of the warp");
    int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < NI; i++) {
        int k = lane + i * WARP, sl = k / CPR, d = (k % CPR) * 8;
        bool in = sl < n;
        const uint16_t *src = in ? base + sl * HD + d : pool;
        cp_async16(&kd[sl * LD + d], src, in);
        cp_async16(&kd[sl * LD + d + vs], in ? src + voff : pool, in);
    }
}

/* Where an item's K and V lie in the pool: its request's page list, a
 * page's size in elements, the layer + kv head offset of K, and V's offset
 * from K. row(j) is slot j's K (psh = log2(ps) where ps is a power of
 * two: no division). */
struct fa_kvsrc {
    const uint16_t *pool;
    const int32_t *pages;
    int64_t pe, lay, voff;
    int ps, psh;
    template <int HD>
    __device__ __forceinline__ const uint16_t *row(int j) const
    {
        int pg = psh >= 0 ? j >> psh : j / ps, off = psh >= 0 ? j & (ps - 1) : j % ps;
        return pool + pages[pg] * pe + lay + (int64_t)off * HD;
    }
};

template <int HD>
static __device__ __forceinline__ fa_kvsrc fa_kvsrc_of(const pie_cuda_kv &kv,
                                                       const pie_cuda_tokmeta &tm,
                                                       int req, int kvh,
                                                       int layer, int psh)
{
    int ps = kv.page_size;
    return { kv.pool, tm.pages + tm.kv_indptr[req], pie_cuda_kv_page_elems(&kv),
             pie_cuda_kv_k_off(&kv, layer, kvh), pie_cuda_kv_voff(&kv), ps, psh };
}

template <int HD, int TH>
static __device__ __forceinline__ void fa_load(uint16_t *Kb, uint16_t *Vb,
                                               const fa_kvsrc &src, int s0,
                                               int s1)
{
    constexpr int LD = HD + 8, CPR = HD / 8, SPW = FA_BN / (TH / WARP);
    if constexpr (SPW * CPR % WARP == 0) {    /* whole warp rounds a group */
        if (src.psh >= 0 && src.ps >= SPW && (s0 & (SPW - 1)) == 0) {
            int g0 = s0 + threadIdx.x / WARP * SPW;
            const uint16_t *base = g0 < s1 ? src.row<HD>(g0) : src.pool;
            fa_load_group<HD, SPW>(Kb + (threadIdx.x / WARP) * SPW * LD,
                                   Vb - Kb, base, src.pool, src.voff, s1 - g0);
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < (FA_BN * HD / 8 + TH - 1) / TH; i++) {
        int k = threadIdx.x + i * TH;
        if (k >= FA_BN * HD / 8) break;
        int sl = k / (HD / 8), d = (k % (HD / 8)) * 8, j = s0 + sl;
        bool in = j < s1;
        const uint16_t *p = in ? src.row<HD>(j) + d : src.pool;
        cp_async16(&Kb[sl * LD + d], p, in);
        cp_async16(&Vb[sl * LD + d], in ? p + src.voff : src.pool, in);
    }
}

/* Per-lane view of its two query rows ra = 16w + g and rb = ra + 8: whether
 * each exists (r < R), its token, mask offset (-1: causal) and causal limit
 * (the last slot it may see). */
struct fa_rowmask {
    bool va, vb;
    int ta, tb, moa, mob, lima, limb;
};

static __device__ __forceinline__ fa_rowmask fa_rowmask_of(
    const fa_rows &rows, const pie_cuda_tokmeta &tm, int ra, int rb, int R)
{
    fa_rowmask m;
    m.va = ra < R;
    m.vb = rb < R;
    m.ta = m.va ? rows.tok(ra) : 0;
    m.tb = m.vb ? rows.tok(rb) : 0;
    m.moa = m.mob = m.lima = m.limb = -1;
    if (m.va) {
        m.moa = tm.mask_off ? tm.mask_off[m.ta] : -1;
        m.lima = tm.tok_slot[m.ta];
    }
    if (m.vb) {
        m.mob = tm.mask_off ? tm.mask_off[m.tb] : -1;
        m.limb = tm.tok_slot[m.tb];
    }
    return m;
}

/* Online-softmax state of a lane's two rows: O (HD / 8 n-tiles of the C
 * fragment), running max in base 2 and mass (per lane until fa_mass). */
template <int HD>
struct fa_state {
    float o[HD / 8][4];
    float ma, mb, la, lb;
    __device__ __forceinline__ void reset()
    {
#pragma unroll
        for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
        ma = mb = -INFINITY;
        la = lb = 0.0f;
    }
};

/* The online softmax of one m-tile's S (NS n-tiles of 8 slots from n-tile
 * n8o of the KV block at s0): masks, raises the running max, rescales O
 * and the mass, and leaves P (bf16) as the A fragments of P V (pa, NS / 2
 * k-steps of 16 slots: the S accumulators of two adjacent n-tiles). */
template <int HD, int NS>
static __device__ __forceinline__ void fa_softmax(float (*s)[4], fa_state<HD> &t,
                                                  const fa_rowmask &m, int n8o,
                                                  int s0, int s1,
                                                  const uint32_t *bits,
                                                  uint32_t (*pa)[4])
{
    constexpr int ND = HD / 8, KS = NS / 2;
    int c = threadIdx.x % WARP & 3;
    /* a block wholly below both rows' causal limits needs no per-slot
     * mask test (most blocks of a long prompt, every full decode block) */
    int last = s0 + FA_BN - 1;
    bool full = __all_sync(0xffffffffu, last < s1 && m.va && m.vb &&
                           m.moa < 0 && m.mob < 0 && m.lima >= last &&
                           m.limb >= last);
    float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
    for (int n8 = 0; n8 < NS; n8++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int j = s0 + (n8o + n8) * 8 + 2 * c + e;
            bool in = j < s1;
            if (!full && !(in && m.va && fa_allowed(bits, m.moa, m.lima, j)))
                s[n8][e] = -INFINITY;
            if (!full && !(in && m.vb && fa_allowed(bits, m.mob, m.limb, j)))
                s[n8][2 + e] = -INFINITY;
            mxa = fmaxf(mxa, s[n8][e]);
            mxb = fmaxf(mxb, s[n8][2 + e]);
        }
    }
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, x));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, x));
    }
    float na = fmaxf(t.ma, mxa), nb = fmaxf(t.mb, mxb);
    float ba = na == -INFINITY ? 0.0f : na, bb = nb == -INFINITY ? 0.0f : nb;
    float aa = exp2f(t.ma - ba), ab = exp2f(t.mb - bb);
    t.ma = na;
    t.mb = nb;
    t.la *= aa;
    t.lb *= ab;
    /* O changes only where a row's max grew (aa, ab exactly 1 else):
     * later blocks of a long row rarely raise it */
    if (__any_sync(0xffffffffu, aa != 1.0f || ab != 1.0f)) {
#pragma unroll
        for (int i = 0; i < ND; i++) {
            t.o[i][0] *= aa; t.o[i][1] *= aa;
            t.o[i][2] *= ab; t.o[i][3] *= ab;
        }
    }
#pragma unroll
    for (int n8 = 0; n8 < NS; n8++) {
        s[n8][0] = exp2f(s[n8][0] - ba);
        s[n8][1] = exp2f(s[n8][1] - ba);
        s[n8][2] = exp2f(s[n8][2] - bb);
        s[n8][3] = exp2f(s[n8][3] - bb);
        t.la += s[n8][0] + s[n8][1];
        t.lb += s[n8][2] + s[n8][3];
    }
    /* the S accumulators of two adjacent n-tiles are the A operand
     * of P V */
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        pa[kk][0] = pack_bf2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack_bf2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

/* One KV block for one warp and its MT m-tiles of 16 query rows: S = Q K^T
 * over NS n-tiles of 8 slots from n-tile n8o of the block (slots s0 + 8 n8o
 * ..), masked, folded into each m-tile's online softmax, then O += P V over
 * KS k-steps of 16 slots. Q's A fragments come from registers (qa, MT = 1)
 * or, QS, by ldmatrix from shared memory (qs: the warp's first row, rows
 * HD + 8 apart), once per k-step for all n-tiles. One ldmatrix.x4 gives the
 * K fragments of two n-tiles (lanes 0-15 the first, 16-31 the second;
 * lanes 8-15 and 24-31 the upper 8 of the k-step) and one the V fragments
 * of two 8-column tiles; each feeds all MT m-tiles. */
template <int HD, int NS, int KS, int MT, bool QS>
static __device__ __forceinline__ void fa_block(fa_state<HD> *st,
                                                const uint32_t (*qa)[4],
                                                const uint16_t *qs,
                                                const uint16_t *Ks,
                                                const uint16_t *Vs, int n8o,
                                                int s0, int s1,
                                                const fa_rowmask *rm,
                                                const uint32_t *bits)
{
    constexpr int LD = HD + 8, NK = HD / 16, ND = HD / 8;
    static_assert(NS % 2 == 0 && NS == 2 * KS, "n-tile pairs, 16-slot k-steps");
    static_assert(QS || MT == 1, "register Q for one m-tile");
    int lane = threadIdx.x % WARP;
    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n8 = 0; n8 < NS; n8++)
            s[mt][n8][0] = s[mt][n8][1] = s[mt][n8][2] = s[mt][n8][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < NK; kk++) {
        uint32_t qf[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            if (QS)
                ldsm_x4<false>(qf[mt], &qs[(mt * 16 + (lane & 15)) * LD + kk * 16 +
                                          (lane >> 4) * 8]);
            else
                for (int i = 0; i < 4; i++) qf[mt][i] = qa[kk][i];
        }
#pragma unroll
        for (int n8 = 0; n8 < NS; n8 += 2) {
            uint32_t kb[4];
            ldsm_x4<false>(kb, &Ks[((n8o + n8 + (lane >> 4)) * 8 + (lane & 7)) * LD +
                                   kk * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma16816(s[mt][n8], qf[mt], kb[0], kb[1]);
                mma16816(s[mt][n8 + 1], qf[mt], kb[2], kb[3]);
            }
        }
    }
    uint32_t pa[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
        fa_softmax<HD, NS>(s[mt], st[mt], rm[mt], n8o, s0, s1, bits, pa[mt]);
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
        for (int i = 0; i < ND; i += 2) {
            uint32_t vb4[4];
            ldsm_x4<true>(vb4, &Vs[((n8o / 2 + kk) * 16 + (lane & 15)) * LD +
                                   i * 8 + (lane >> 4) * 8]);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                mma16816(st[mt].o[i], pa[mt][kk], vb4[0], vb4[1]);
                mma16816(st[mt].o[i + 1], pa[mt][kk], vb4[2], vb4[3]);
            }
        }
    }
}

/* Sums each row's mass over the 4 lanes that share it. */
template <int HD>
static __device__ __forceinline__ void fa_mass(fa_state<HD> &st)
{
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        st.la += __shfl_xor_sync(0xffffffffu, st.la, x);
        st.lb += __shfl_xor_sync(0xffffffffu, st.lb, x);
    }
}

/* Writes a lane's two rows: the normalized output (bf16), or for a split
 * (it.part >= 0) the unnormalized O and (natural-log max, mass) for
 * pie__cuda_attn_merge. */
template <int HD>
static __device__ __forceinline__ void fa_store(const fa_state<HD> &st,
                                                const pie_cuda_attn_item &it,
                                                const fa_rows &rows,
                                                const fa_rowmask &rm, int ra,
                                                int rb, uint16_t *out,
                                                float *part_o, float *part_ml,
                                                int nh)
{
    constexpr int ND = HD / 8;
    int c = threadIdx.x % WARP & 3;
    if (it.part >= 0) {
        const float ln2 = 0.6931471805599453f;
#pragma unroll
        for (int i = 0; i < ND; i++) {
            int d = i * 8 + 2 * c;
            if (rm.va)
                *reinterpret_cast<float2 *>(part_o + (int64_t)(it.part + ra) * HD + d) =
                    make_float2(st.o[i][0], st.o[i][1]);
            if (rm.vb)
                *reinterpret_cast<float2 *>(part_o + (int64_t)(it.part + rb) * HD + d) =
                    make_float2(st.o[i][2], st.o[i][3]);
        }
        if (c == 0 && rm.va) {
            part_ml[2 * (int64_t)(it.part + ra)] = st.ma == -INFINITY ? st.ma : st.ma * ln2;
            part_ml[2 * (int64_t)(it.part + ra) + 1] = st.la;
        }
        if (c == 0 && rm.vb) {
            part_ml[2 * (int64_t)(it.part + rb)] = st.mb == -INFINITY ? st.mb : st.mb * ln2;
            part_ml[2 * (int64_t)(it.part + rb) + 1] = st.lb;
        }
        return;
    }
    float ia = st.la > 0.0f ? 1.0f / st.la : 0.0f;
    float ib = st.lb > 0.0f ? 1.0f / st.lb : 0.0f;
#pragma unroll
    for (int i = 0; i < ND; i++) {
        int d = i * 8 + 2 * c;
        if (rm.va)
            *reinterpret_cast<uint32_t *>(
                &out[(int64_t)rm.ta * nh * HD + rows.head(ra) * HD + d]) =
                pack_bf2(st.o[i][0] * ia, st.o[i][1] * ia);
        if (rm.vb)
            *reinterpret_cast<uint32_t *>(
                &out[(int64_t)rm.tb * nh * HD + rows.head(rb) * HD + d]) =
                pack_bf2(st.o[i][2] * ib, st.o[i][3] * ib);
    }
}

template <int HD>
__global__ void __launch_bounds__(FA_THREADS(HD), 2)
flash_attn_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                  const pie_cuda_attn_item *items, pie_cuda_tokmeta tm,
                  pie_cuda_kv kv, int layer, int nh, int psh)
{
    pdl_begin();
    // out (n, nh*HD) bf16, q (n, nh*HD) f32; smem Q, FA_STAGES x (K, V)
    constexpr int LD = HD + 8, BLK = FA_BN * LD, ST = FA_STAGES;
    constexpr int TH = FA_THREADS(HD), MT = FA_BM / 16 / (TH / WARP);
    extern __shared__ __align__(16) uint16_t fa_sm[];
    pie_cuda_attn_item it = items[blockIdx.x];
    int G = nh / kv.n_kv;
    fa_rows rows = { it.pad, G, it.t0, it.pad ? it.kvh * G : it.kvh };
    int kvh = it.pad ? it.kvh : it.kvh / G, R = it.pad ? it.nt * G : it.nt;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2;
    float scale = rsqrtf((float)HD) * 1.4426950408889634f;
    /* the first KV blocks' copies fly while Q is staged */
    fa_kvsrc src = fa_kvsrc_of<HD>(kv, tm, it.req, kvh, layer, psh);
    uint16_t *Qs = fa_sm, *kvb = fa_sm + FA_BM * LD;
#pragma unroll
    for (int t = 0; t < ST - 1; t++) {
        int a = it.s0 + t * FA_BN;
        if (a < it.s1)
            fa_load<HD, TH>(kvb + t * 2 * BLK, kvb + t * 2 * BLK + BLK, src, a,
                            it.s1);
        cp_async_commit();
    }
    for (int k = threadIdx.x; k < FA_BM * HD / 2; k += TH) {
        int r = k / (HD / 2), d = (k % (HD / 2)) * 2;
        float a = 0.0f, b = 0.0f;
        if (r < R) {
            const float *src = q + (int64_t)rows.tok(r) * nh * HD +
                               rows.head(r) * HD + d;
            a = src[0] * scale;
            b = src[1] * scale;
        }
        *reinterpret_cast<uint32_t *>(&Qs[r * LD + d]) = pack_bf2(a, b);
    }
    int r0 = warp * 16 * MT;        /* the warp's rows: r0 .. r0 + 16 MT */
    fa_rowmask rm[MT];
    fa_state<HD> st[MT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        rm[mt] = fa_rowmask_of(rows, tm, r0 + 16 * mt + g, r0 + 16 * mt + g + 8, R);
        st[mt].reset();
    }
    bool active = r0 < R;
    for (int s0 = it.s0, bi = 0; s0 < it.s1;
         s0 += FA_BN, bi = bi + 1 == ST ? 0 : bi + 1) {
        /* prefetch block ST - 1 ahead into the buffer freed last, wait
         * for this one (the first wait also covers Q's stores) */
        int nx = s0 + (ST - 1) * FA_BN, nb = bi + ST - 1 >= ST ? bi - 1 : bi + ST - 1;
        if (nx < it.s1)
            fa_load<HD, TH>(kvb + nb * 2 * BLK, kvb + nb * 2 * BLK + BLK, src,
                            nx, it.s1);
        cp_async_commit();
        cp_async_wait<ST - 1>();
        __syncthreads();
        const uint16_t *Ks = kvb + bi * 2 * BLK;
        /* hd 128 takes a KV block in two halves of 32 slots: S of 64
         * slots x two m-tiles did not fit in registers next to O */
        constexpr int NS = HD >= 128 ? FA_BN / 16 : FA_BN / 8;
#pragma unroll 1
        for (int h = 0; active && h < FA_BN / 8 / NS; h++)
            fa_block<HD, NS, NS / 2, MT, true>(st, NULL, Qs + r0 * LD, Ks,
                                               Ks + BLK, h * NS, s0, it.s1,
                                               rm, tm.mask_bits);
        __syncthreads();    /* this buffer is refilled next iteration */
    }
    cp_async_wait<0>();
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        fa_mass(st[mt]);
        fa_store(st[mt], it, rows, rm[mt], r0 + 16 * mt + g,
                 r0 + 16 * mt + g + 8, out, part_o, part_ml, nh);
    }
}

/* Q rows ra, rb (rm) as A fragments, scaled by log2(e) / sqrt(HD), bf16,
 * straight from global memory; rows that do not exist are zero. */
template <int HD>
static __device__ __forceinline__ void fa_qfrag(uint32_t (*qa)[4], const float *q,
                                                const fa_rows &rows,
                                                const fa_rowmask &rm, int ra,
                                                int rb, int nh)
{
    int c = threadIdx.x % WARP & 3;
    float scale = rsqrtf((float)HD) * 1.4426950408889634f;
    const float *qra = q + (int64_t)rm.ta * nh * HD + rows.head(ra) * HD + 2 * c;
    const float *qrb = q + (int64_t)rm.tb * nh * HD + rows.head(rb) * HD + 2 * c;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        float2 a0 = rm.va ? *reinterpret_cast<const float2 *>(qra + kk * 16) : make_float2(0, 0);
        float2 a2 = rm.va ? *reinterpret_cast<const float2 *>(qra + kk * 16 + 8) : make_float2(0, 0);
        float2 b0 = rm.vb ? *reinterpret_cast<const float2 *>(qrb + kk * 16) : make_float2(0, 0);
        float2 b2 = rm.vb ? *reinterpret_cast<const float2 *>(qrb + kk * 16 + 8) : make_float2(0, 0);
        qa[kk][0] = pack_bf2(a0.x * scale, a0.y * scale);
        qa[kk][1] = pack_bf2(b0.x * scale, b0.y * scale);
        qa[kk][2] = pack_bf2(a2.x * scale, a2.y * scale);
        qa[kk][3] = pack_bf2(b2.x * scale, b2.y * scale);
    }
}

/* ------------------------------------------- prefill attention, wgmma */

/*
 * flash_wg_kernel: the prefill kernel's items and math on Hopper's
 * warp-group MMA (wgmma.mma_async, sm_90a), head dim 128 (other head dims,
 * or PIE_CUDA_NO_WGMMA=1: flash_attn_kernel above).
 * - A block is one warp group of 64 query rows, half an item; at 168
 *   registers an SM holds three, which run their MMAs and softmax out of
 *   phase. (One block of two warp groups sharing the KV blocks ran in
 *   lockstep, slower; so did one warp group overlapping its softmax with
 *   its own P V at two blocks an SM: NOTES.md, round 7.)
 * - A warp keeps its 16 rows' Q as register A fragments (fa_qfrag). S =
 *   Q K^T is one m64n64 wgmma per 16 of the head dim and O += P V one
 *   m64n128 wgmma per 16 slots, both reading K and V straight from shared
 *   memory (mma.sync needs an ldmatrix per fragment and warp). The
 *   accumulators have mma.sync's fragment layout (warp w of a group: rows
 *   16 w + g and + 8, n-tiles of 8 columns), so the softmax is fa_softmax.
 * - Shared memory, per stage: K and V of FA_BN slots in wgmma's canonical
 *   128-byte swizzled layout (without a swizzle, wgmma's reads conflict in
 *   the banks: 124 TFLOP/s at 2048 tokens): atoms of 8 slots x 64 columns
 *   (1024 bytes, 1024-aligned), the 16-byte chunk c of slot s stored at
 *   chunk c ^ (s % 8) of the slot's 128-byte row; atoms of 8 slots are
 *   1024 bytes apart, the two halves of the head dim WG_HALF. The same
 *   layout is K in K-major form (B of S; d is the reduction: the
 *   descriptor's SBO steps 8 slots, a k-step moves its start 32 bytes) and
 *   V in MN-major form (B of P V, transposed; slots are the reduction:
 *   SBO steps 8 slots, LBO the half of the head dim).
 */
#define WG_HD 128
#define WG_THREADS 128
#define WG_BLK (FA_BN * WG_HD)          /* elements of K (or V) a stage */
#define WG_HALF (FA_BN * 128)           /* bytes between the d halves */

/* Byte offset of 16-byte chunk cd (columns 8 cd ..) of slot s. */
static __device__ __forceinline__ int wg_off(int s, int cd)
{
    return (cd / 8) * WG_HALF + (s / 8) * 1024 + (s % 8) * 128 +
           ((cd % 8) ^ (s % 8)) * 16;
}

/* A shared-memory matrix descriptor, 128-byte swizzle (lbo, sbo bytes). */
static __device__ __forceinline__ uint64_t wg_desc(const void *p, uint32_t lbo,
                                                   uint32_t sbo)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3ffff) >> 4) | (uint64_t)(lbo >> 4) << 16 |
           (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}

static __device__ __forceinline__ void wg_fence(void)
{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

static __device__ __forceinline__ void wg_commit_wait(void)
{
    asm volatile("wgmma.commit_group.sync.aligned;\n"
                 "wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

/* d (m64n64, f32) (+)= a (registers, bf16 m64k16) x B (desc, K-major) */
static __device__ __forceinline__ void wg_mma_s(float (*d)[4], const uint32_t *a,
                                                uint64_t desc, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc),
                   "r"(acc));
}

/* d (m64n128, f32) += a (registers, bf16 m64k16) x B (desc, MN-major) */
static __device__ __forceinline__ void wg_mma_o(float (*d)[4], const uint32_t *a,
                                                uint64_t desc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

/* Issues the copies of KV block [s0, s0 + FA_BN) into K / V in the layout
 * above (WG_THREADS threads): each warp copies groups of 8 slots, eight
 * adjacent lanes one 16-byte column chunk of them, the group's page looked
 * up once where its slots lie in one page; slots past s1 are zero filled.
 * (fa_kvsrc::row, which picks a shift or a division per slot, made this
 * kernel spill; the division path is spelled out.) */
template <int HD>
static __device__ __forceinline__ void wg_load(uint16_t *K, uint16_t *V,
                                               const fa_kvsrc &src, int s0,
                                               int s1)
{
    constexpr int NW = WG_THREADS / WARP;
    int w = threadIdx.x / WARP, lane = threadIdx.x % WARP, sl = lane & 7;
    /* a group of 8 slots in one page: one page index for its lanes */
    bool grp = src.psh >= 0 && src.ps >= 8 && (s0 & 7) == 0;
#pragma unroll
    for (int gi = w; gi < FA_BN / 8; gi += NW) {
        int j = s0 + gi * 8 + sl;
        bool in = j < s1;
        const uint16_t *row = src.pool;
        if (in && grp) {
            int64_t pg = src.pages[(s0 + gi * 8) >> src.psh];
            row = src.pool + pg * src.pe + src.lay + (int64_t)(j & (src.ps - 1)) * HD;
        }
        else if (in) {
            int64_t pg = src.pages[j / src.ps];
            row = src.pool + pg * src.pe + src.lay + (int64_t)(j % src.ps) * HD;
        }
#pragma unroll
        for (int i = 0; i < HD / 8 / 4; i++) {
            int cd = lane / 8 + 4 * i, e = wg_off(gi * 8 + sl, cd) / 2;
            cp_async16(&K[e], in ? row + cd * 8 : src.pool, in);
            cp_async16(&V[e], in ? row + src.voff + cd * 8 : src.pool, in);
        }
    }
}

/* Block b: rows 64 (b % 2) .. + 63 of item b / 2. */
__global__ void __launch_bounds__(WG_THREADS, 3)
flash_wg_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                const pie_cuda_attn_item *items, pie_cuda_tokmeta tm,
                pie_cuda_kv kv, int layer, int nh, int psh)
{
    constexpr int HD = WG_HD;
    pdl_begin();
    extern __shared__ __align__(128) uint16_t wg_sm_raw[];
    /* the swizzle atoms are 1024-aligned (the launch adds the slack) */
    uint16_t *fa_sm = (uint16_t *)(((uintptr_t)wg_sm_raw + 1023) & ~(uintptr_t)1023);
    pie_cuda_attn_item it = items[blockIdx.x / 2];
    int G = nh / kv.n_kv;
    fa_rows rows = { it.pad, G, it.t0, it.pad ? it.kvh * G : it.kvh };
    int kvh = it.pad ? it.kvh : it.kvh / G, R = it.pad ? it.nt * G : it.nt;
    int warp = threadIdx.x / WARP, g = threadIdx.x % WARP >> 2;
    int r0 = (blockIdx.x % 2) * 64 + warp * 16;     /* the warp's 16 rows */
    if ((blockIdx.x % 2) * 64 >= R) return;
    const fa_kvsrc src = fa_kvsrc_of<HD>(kv, tm, it.req, kvh, layer, psh);
    if (it.s0 < it.s1) wg_load<HD>(fa_sm, fa_sm + WG_BLK, src, it.s0, it.s1);
    cp_async_commit();
    fa_rowmask rm = fa_rowmask_of(rows, tm, r0 + g, r0 + g + 8, R);
    uint32_t qa[HD / 16][4];
    fa_qfrag<HD>(qa, q, rows, rm, r0 + g, r0 + g + 8, nh);
    fa_state<HD> st;
    st.reset();
    for (int s0 = it.s0, bi = 0; s0 < it.s1; s0 += FA_BN, bi ^= 1) {
        uint16_t *Ks = fa_sm + bi * 2 * WG_BLK, *Vs = Ks + WG_BLK;
        uint16_t *Kn = fa_sm + (bi ^ 1) * 2 * WG_BLK;
        if (s0 + FA_BN < it.s1)
            wg_load<HD>(Kn, Kn + WG_BLK, src, s0 + FA_BN, it.s1);
        cp_async_commit();
        cp_async_wait<1>();
        /* the copies (generic proxy) become visible to wgmma (async proxy) */
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        float s[FA_BN / 8][4];
        uint32_t pa[FA_BN / 16][4];
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
            wg_mma_s(s, qa[kk], wg_desc((const char *)Ks + (kk / 4) * WG_HALF +
                                        (kk % 4) * 32, 16, 1024), kk);
        wg_commit_wait();
        fa_softmax<HD, FA_BN / 8>(s, st, rm, 0, s0, it.s1, tm.mask_bits, pa);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++)
            wg_mma_o(st.o, pa[kk], wg_desc((const char *)Vs + kk * 2048, WG_HALF, 1024));
        wg_commit_wait();
        __syncthreads();    /* this buffer is refilled next iteration */
    }
    cp_async_wait<0>();
    fa_mass(st);
    fa_store(st, it, rows, rm, r0 + g, r0 + g + 8, out, part_o, part_ml, nh);
}

/* ------------------------------------------------- decode attention */

/*
 * Decode (grouped) attention as a persistent grid. The host cuts the
 * grouped items (nt tokens x the G heads of a kv head, nt * G <= 16 rows)
 * into pieces on 64-slot block boundaries so that every block of the grid
 * streams the same number of KV blocks (pie_cuda_dec_plan); block b runs
 * pieces[bstart[b] .. bstart[b + 1]) one after another. The cp.async
 * pipeline runs across piece boundaries: while a piece's last KV block is
 * computed, the next piece's first one is already in flight. The 4 warps
 * share the 16 rows and each takes 16 slots of every KV block, with its own
 * online softmax; at the end of a piece their states are combined through
 * the buffer just consumed, and all 4 warps write the output, or for a
 * piece of a cut item its partials, which attn_merge_kernel combines
 * (dec_combine_store). A warp whose 16 slots of a piece's last KV block
 * all lie past the piece's end neither copies nor computes them. (Merging
 * in the last piece to finish, counted with atomics, was tried: its serial
 * tail made batch-1 steps slower; NOTES.md, round 5.)
 */

/* Puts this warp's softmax state of rows g and g + 8 (those below R) in
 * shared memory: so (4 * 16 * (HD + 8) floats, the KV buffer just
 * consumed; warp w's rows at 16 w) and sml (4 * 16 * 2 floats: the max, in
 * base 2, and the mass a row). O rows are HD + 8 floats apart and move as
 * float2, so no two lanes of a half-warp share a bank. */
template <int HD>
static __device__ __forceinline__ void fa_put_state(float *so, float *sml,
                                                    const fa_state<HD> &st,
                                                    int R)
{
    constexpr int ND = HD / 8, S = HD + 8;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int g = lane >> 2, c = lane & 3, ra = warp * 16 + g, rb = ra + 8;
    if (c == 0 && g < R) {
        sml[2 * ra] = st.ma;
        sml[2 * ra + 1] = st.la;
    }
    if (c == 0 && g + 8 < R) {
        sml[2 * rb] = st.mb;
        sml[2 * rb + 1] = st.lb;
    }
#pragma unroll
    for (int i = 0; i < ND; i++) {
        int d = i * 8 + 2 * c;
        if (g < R)
            *reinterpret_cast<float2 *>(&so[ra * S + d]) =
                make_float2(st.o[i][0], st.o[i][1]);
        if (g + 8 < R)
            *reinterpret_cast<float2 *>(&so[rb * S + d]) =
                make_float2(st.o[i][2], st.o[i][3]);
    }
}

/* Combines the 4 warps' softmax states of rows g and g + 8 into warp 0's
 * registers through shared memory (fa_put_state's so and sml). Every
 * thread must call it; warp 0 holds the result. */
template <int HD>
static __device__ __forceinline__ void fa_combine(float *so, float *sml,
                                                  fa_state<HD> &st)
{
    constexpr int ND = HD / 8, S = HD + 8;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int g = lane >> 2, c = lane & 3;
    fa_put_state<HD>(so, sml, st, 16);
    __syncthreads();
    if (warp) return;
    float Ma = -INFINITY, Mb = -INFINITY;
    for (int w = 0; w < 4; w++) {
        Ma = fmaxf(Ma, sml[2 * (w * 16 + g)]);
        Mb = fmaxf(Mb, sml[2 * (w * 16 + g + 8)]);
    }
    float fa[4], fb[4];
    st.la = st.lb = 0.0f;
    for (int w = 0; w < 4; w++) {
        float m0 = sml[2 * (w * 16 + g)], m1 = sml[2 * (w * 16 + g + 8)];
        fa[w] = m0 == -INFINITY ? 0.0f : exp2f(m0 - Ma);
        fb[w] = m1 == -INFINITY ? 0.0f : exp2f(m1 - Mb);
        st.la += fa[w] * sml[2 * (w * 16 + g) + 1];
        st.lb += fb[w] * sml[2 * (w * 16 + g + 8) + 1];
    }
#pragma unroll
    for (int i = 0; i < ND; i++) {
        int d = i * 8 + 2 * c;
        float a0 = 0.0f, a1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
        for (int w = 0; w < 4; w++) {
            float2 a = *reinterpret_cast<const float2 *>(&so[(w * 16 + g) * S + d]);
            float2 b = *reinterpret_cast<const float2 *>(&so[(w * 16 + g + 8) * S + d]);
            a0 += fa[w] * a.x;
            a1 += fa[w] * a.y;
            b0 += fb[w] * b.x;
            b1 += fb[w] * b.y;
        }
        st.o[i][0] = a0; st.o[i][1] = a1; st.o[i][2] = b0; st.o[i][3] = b1;
    }
    st.ma = Ma;
    st.mb = Mb;
}

/* The end of a piece (flash_dec_kernel, not CL): the 4 warps' states of
 * its R rows (fa_put_state) combined and written by all 4 warps, warp w
 * taking rows w, w + 4, .. and each lane the columns lane, lane + 32, ..:
 * coalesced stores of the output (bf16) or, for a piece of a cut item, of
 * its partials (O in f32, and a row's natural-log max and mass) for
 * attn_merge_kernel. The same sums in the same order as fa_combine and
 * fa_store. (Warp 0 alone combining all 16 rows and storing its lanes'
 * scattered columns, as before: hd 128 B=256 ctx 512 207.6 against 206.3
 * us, where a grid block ends about 5 pieces; NOTES.md, round 14.) Every
 * thread must call it; so may be refilled after it returns. */
template <int HD>
static __device__ void dec_combine_store(const fa_state<HD> &st, float *so,
                                         float *sml, const pie_cuda_attn_item &it,
                                         const fa_rows &rows, int nh,
                                         uint16_t *out, float *part_o,
                                         float *part_ml)
{
    constexpr int S = HD + 8;
    const float ln2 = 0.6931471805599453f;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int R = it.nt * rows.G;
    fa_put_state<HD>(so, sml, st, R);
    __syncthreads();
    for (int r = warp; r < R; r += 4) {
        float m[4], f[4], M = -INFINITY, L = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; w++) M = fmaxf(M, m[w] = sml[2 * (w * 16 + r)]);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            f[w] = m[w] == -INFINITY ? 0.0f : exp2f(m[w] - M);
            L += f[w] * sml[2 * (w * 16 + r) + 1];
        }
        if (it.part >= 0 && lane == 0) {
            part_ml[2 * (int64_t)(it.part + r)] = M == -INFINITY ? M : M * ln2;
            part_ml[2 * (int64_t)(it.part + r) + 1] = L;
        }
        float inv = L > 0.0f ? 1.0f / L : 0.0f;
        float *po = it.part >= 0 ? part_o + (int64_t)(it.part + r) * HD : NULL;
        uint16_t *o = out + (int64_t)rows.tok(r) * nh * HD + rows.head(r) * HD;
#pragma unroll
        for (int d = lane; d < HD; d += WARP) {
            float a = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; w++) a += f[w] * so[(w * 16 + r) * S + d];
            if (it.part >= 0) po[d] = a;
            else o[d] = f2bf(a * inv);
        }
    }
    __syncthreads();
}

/* Where the next KV block to load lies: piece p (of this block's [p, p1))
 * from slot s; where its K and V lie (src, as for the prefill kernels),
 * and (fast: page size a power of two >= 16 and s0 a multiple of 16) the page
 * of this warp's 16 slots of that block, loaded one block ahead so that
 * its latency hides behind a block's math. issue() copies the block into
 * buf (on the fast path a warp whose 16 slots all lie past the piece's
 * end copies nothing: the compute skips them) and moves on; a piece always has at least one block (an empty one:
 * one fully masked block), as the compute side counts them. */
struct dec_cursor {
    const pie_cuda_attn_item *pieces;
    int p, p1, s, s1, fast, pg;
    fa_kvsrc src;

    template <int HD>
    __device__ __forceinline__ void enter(int np, const pie_cuda_tokmeta &tm,
                                          const pie_cuda_kv &kv, int layer,
                                          int psh)
    {
        p = np;
        if (p >= p1) return;
        pie_cuda_attn_item it = pieces[p];
        s = it.s0;
        s1 = it.s1;
        src = fa_kvsrc_of<HD>(kv, tm, it.req, it.kvh, layer, psh);
        fast = psh >= 0 && src.ps >= 16 && (s & 15) == 0;
        prefetch();
    }
    __device__ __forceinline__ void prefetch(void)
    {
        int g0 = s + threadIdx.x / WARP * 16;
        pg = fast && g0 < s1 ? src.pages[g0 >> src.psh] : 0;
    }
    template <int HD>
    __device__ __forceinline__ void issue(uint16_t *buf, const pie_cuda_tokmeta &tm,
                                          const pie_cuda_kv &kv, int layer, int psh)
    {
        constexpr int LD = HD + 8, BLK = FA_BN * LD;
        static_assert(FA_BN / (FA_DEC_THREADS / WARP) == 16, "16 slots a warp");
        if (p < p1) {
            int w = threadIdx.x / WARP, g0 = s + w * 16;
            if (!fast)
                fa_load<HD, FA_DEC_THREADS>(buf, buf + BLK, src, s, s1);
            else if (g0 < s1)   /* src.row(g0) with the page loaded ahead */
                fa_load_group<HD, 16>(buf + w * 16 * LD, BLK, src.pool + pg * src.pe +
                                      src.lay + (int64_t)(g0 & (src.ps - 1)) * HD,
                                      src.pool, src.voff, s1 - g0);
            /* else: slots past the piece's end, which the compute skips */
            s += FA_BN;
            if (s < s1) prefetch();
            else enter<HD>(p + 1, tm, kv, layer, psh);
        }
        cp_async_commit();
    }
};

/* A piece's rows and this lane's masks of them (host metadata only). */
static __device__ __forceinline__ void dec_mask(fa_rowmask &rm, fa_rows &rows,
                                                const pie_cuda_attn_item &it,
                                                const pie_cuda_tokmeta &tm,
                                                int G)
{
    int g = threadIdx.x % WARP >> 2;
    rows = (fa_rows){ 1, G, it.t0, it.kvh * G };
    rm = fa_rowmask_of(rows, tm, g, g + 8, it.nt * G);
}

/* A piece's rows into registers: the masks, and Q as the A fragments. */
template <int HD>
static __device__ __forceinline__ void dec_rows(uint32_t (*qa)[4],
                                                fa_rowmask &rm, fa_rows &rows,
                                                const pie_cuda_attn_item &it,
                                                const float *q,
                                                const pie_cuda_tokmeta &tm,
                                                int G, int nh)
{
    int g = threadIdx.x % WARP >> 2;
    dec_mask(rm, rows, it, tm, G);
    fa_qfrag<HD>(qa, q, rows, rm, g, g + 8, nh);
}

/* The end of a cluster plan's piece (flash_dec_kernel with CL): the C
 * blocks of a cluster hold the softmax states of one item's C slices of
 * KV blocks (warp 0 of each, after fa_combine: rows g and g + 8). Each
 * block puts its state in its own shared memory at the same offset (so:
 * 16 rows of HD + 8 floats at the start of the KV buffers, free once the
 * piece is done; sml: max (base 2) and mass a row);
 * after a cluster barrier, block `rank` writes dims [rank HD / C,
 * (rank + 1) HD / C) of every row, reading the C states through distributed
 * shared memory; a second barrier keeps each block's shared memory alive
 * until its peers have read it. No partials go to global memory and no
 * merge kernel runs. */
template <int HD>
static __device__ void dec_cluster_store(const fa_state<HD> &st, float *so,
                                         float *sml,
                                         const pie_cuda_attn_item &it, int G,
                                         int nh, uint16_t *out)
{
    namespace cg = cooperative_groups;
    constexpr int S = HD + 8;
    int lane = threadIdx.x % WARP, g = lane >> 2, c = lane & 3;
    if (threadIdx.x < WARP) {
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            int d = i * 8 + 2 * c;
            *reinterpret_cast<float2 *>(&so[g * S + d]) =
                make_float2(st.o[i][0], st.o[i][1]);
            *reinterpret_cast<float2 *>(&so[(g + 8) * S + d]) =
                make_float2(st.o[i][2], st.o[i][3]);
        }
        if (c == 0) {
            sml[2 * g] = st.ma;
            sml[2 * g + 1] = st.la;
            sml[2 * (g + 8)] = st.mb;
            sml[2 * (g + 8) + 1] = st.lb;
        }
    }
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    int C = (int)cl.num_blocks(), rank = (int)cl.block_rank();
    int R = it.nt * G, d0 = rank * HD / C, W = (rank + 1) * HD / C - d0;
    for (int k = threadIdx.x; k < R * W; k += blockDim.x) {
        int r = k / W, d = d0 + k % W;
        float M = -INFINITY, L = 0.0f, O = 0.0f;
        for (int j = 0; j < C; j++)
            M = fmaxf(M, cl.map_shared_rank(sml, j)[2 * r]);
        for (int j = 0; M != -INFINITY && j < C; j++) {
            const float *ml = cl.map_shared_rank(sml, j);
            float m = ml[2 * r];
            if (m == -INFINITY) continue;
            float e = exp2f(m - M);
            L += e * ml[2 * r + 1];
            O += e * cl.map_shared_rank(so, j)[r * S + d];
        }
        int t = it.t0 + r / G, h = it.kvh * G + r % G;
        out[(int64_t)t * nh * HD + h * HD + d] = f2bf(L > 0.0f ? O / L : 0.0f);
    }
    cl.sync();
}

/* The decode kernel is built for OCC resident blocks an SM: 3 (at head dim
 * 128: 168 registers, and shared memory allows 3), and below head dim 128
 * also 4 (128 registers, no spills) for the whole-item plan on four
 * blocks an SM. The cut plan keeps 3 there: its grid of 4 an SM made 1B
 * decode steps slower at B=1 (1.202-1.245 -> 1.247-1.261 ms) and B=16 ctx
 * 512 (1.434-1.457 -> 1.501-1.505); 5 and 6 spill or starve the loop of
 * registers (hd 64 B=64 ctx 520, whole items: 29.9 us at 4, 31.3 at 5,
 * 34.3 at 6; NOTES.md, round 12). */
/* CL: the cluster plan (pie__cuda_attention_dec_cluster): block b runs
 * piece b alone, and the blocks of a cluster combine their states
 * (dec_cluster_store); bstart is not read. */
template <int HD, int OCC, bool CL>
__global__ void __launch_bounds__(FA_DEC_THREADS, OCC)
flash_dec_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                 const pie_cuda_attn_item *pieces, const int32_t *bstart,
                 pie_cuda_tokmeta tm, pie_cuda_kv kv, int layer, int nh, int psh)
{
    /* the step's metadata (host copies) may be read before the kernel
     * before has finished; q and the KV cache only after */
    pdl_trigger();
    // out (n, nh*HD) bf16, q (n, nh*HD) f32; smem 2 x (K, V) blocks
    constexpr int BLK = FA_BN * (HD + 8), NS = FA_BN / 8 / 4;
    static_assert(FA_STAGES == 2, "the combine reuses the other buffer");
    extern __shared__ __align__(16) uint16_t fa_sm[];
    __shared__ float sml[4 * 16 * 2];
    int p = CL ? blockIdx.x : bstart[blockIdx.x];
    int p1 = CL ? p + 1 : bstart[blockIdx.x + 1];
    if (p >= p1) {
        pdl_wait();
        return;
    }
    int G = nh / kv.n_kv, warp = threadIdx.x / WARP, g = threadIdx.x % WARP >> 2;
    dec_cursor ld;
    ld.pieces = pieces;
    ld.p1 = p1;
    ld.enter<HD>(p, tm, kv, layer, psh);
    /* the first piece's rows (host metadata) before the wait, and its Q
     * before the first KV copies: a load issued behind those copies
     * returns after them. Issued after them, this chain of three loads
     * took B=16 ctx 2048 from 52.3 to 61.3 us on one H100 (NOTES.md,
     * round 11) */
    pie_cuda_attn_item it = pieces[p];
    uint32_t qa[HD / 16][4];
    fa_rows rows;
    fa_rowmask rm;
    dec_mask(rm, rows, it, tm, G);
    pdl_wait();
    fa_qfrag<HD>(qa, q, rows, rm, g, g + 8, nh);
    ld.issue<HD>(fa_sm, tm, kv, layer, psh);
    fa_state<HD> st;
    st.reset();
    for (int s0 = it.s0, bi = 0;; bi ^= 1) {
        ld.issue<HD>(fa_sm + (bi ^ 1) * 2 * BLK, tm, kv, layer, psh);
        cp_async_wait<1>();
        __syncthreads();
        const uint16_t *Ks = fa_sm + bi * 2 * BLK;
        /* a warp whose 16 slots all lie past the piece's end (in its tail
         * block) would only fold masked scores in: nothing to do */
        if (s0 + warp * 16 < it.s1)
            fa_block<HD, NS, NS / 2, 1, false>(&st, qa, NULL, Ks, Ks + BLK,
                                               warp * NS, s0, it.s1, &rm,
                                               tm.mask_bits);
        __syncthreads();
        if ((s0 += FA_BN) < it.s1) continue;
        /* the piece is done: combine in this buffer, refilled only after
         * the combine's last barrier (the next piece's first KV block is
         * in flight in the other) */
        fa_mass(st);
        float *so = reinterpret_cast<float *>(fa_sm + bi * 2 * BLK);
        if (CL) {
            fa_combine<HD>(so, sml, st);
            __syncthreads();
            /* at a fixed place: peers end in either buffer */
            dec_cluster_store<HD>(st, reinterpret_cast<float *>(fa_sm), sml,
                                  it, G, nh, out);
            break;
        }
        dec_combine_store<HD>(st, so, sml, it, rows, nh, out, part_o, part_ml);
        if (++p >= p1) break;
        it = pieces[p];
        s0 = it.s0;
        dec_rows<HD>(qa, rm, rows, it, q, tm, G, nh);
        st.reset();
    }
    cp_async_wait<0>();
}

/* Calls f(std::integral_constant<int, HD>()) for the head dim hd if the
 * tensor-core kernels are built for it; returns 0 (f not called) if not.
 * The one list of those head dims. */
template <typename F>
static int with_head_dim(int hd, F f)
{
    switch (hd) {
    case 16: f(std::integral_constant<int, 16>()); return 1;
    case 32: f(std::integral_constant<int, 32>()); return 1;
    case 64: f(std::integral_constant<int, 64>()); return 1;
    case 128: f(std::integral_constant<int, 128>()); return 1;
    default: return 0;
    }
}

extern "C" int pie__cuda_flash_supported(int hd)
{
    return with_head_dim(hd, [](auto) {});
}

/* dynamic shared memory of the flash kernels: FA_STAGES KV blocks, and
 * for the prefill kernel Q (FA_BM rows) */
template <int HD>
static size_t fa_smem(int with_q)
{
    return (FA_STAGES * 2 * FA_BN + (with_q ? FA_BM : 0)) * sizeof(uint16_t) *
           (HD + 8);
}

static int page_shift(const pie_cuda_kv *kv)
{
    int ps = kv->page_size;
    return (ps & (ps - 1)) ? -1 : __builtin_ctz(ps);
}

/* Whether the wgmma prefill kernel runs (PIE_CUDA_NO_WGMMA=1: the mma.sync
 * kernel at every head dim, for comparison). Read once. */
static int wg_on(void)
{
    static int on = -1;
    if (on < 0) on = getenv("PIE_CUDA_NO_WGMMA") == NULL;
    return on;
}

extern "C" void pie__cuda_attention_flash(uint16_t *out, float *part_o,
                                          float *part_ml, const float *q,
                                          const pie_cuda_attn_item *items,
                                          int n_items,
                                          const pie_cuda_tokmeta *tm,
                                          const pie_cuda_kv *kv, int layer,
                                          int nh, cudaStream_t s)
{
    if (n_items <= 0) return;
    if (kv->head_dim == WG_HD && wg_on()) {
        static uint64_t set;
        size_t smem = 2 * FA_STAGES * WG_BLK * sizeof(uint16_t) + 1024;
        allow_smem(flash_wg_kernel, smem, &set);
        launch_pdl(flash_wg_kernel, 2 * n_items, WG_THREADS, smem, s, out, part_o,
                   part_ml, q, items, *tm, *kv, layer, nh, page_shift(kv));
        return;
    }
    with_head_dim(kv->head_dim, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        static uint64_t set;
        allow_smem(flash_attn_kernel<HD>, fa_smem<HD>(1), &set);
        launch_pdl(flash_attn_kernel<HD>, n_items, FA_THREADS(HD),
                   fa_smem<HD>(1), s, out, part_o, part_ml, q, items, *tm, *kv,
                   layer, nh, page_shift(kv));
    });
}

/* Dynamic shared memory that keeps more than per_sm blocks of the decode
 * kernel off an SM (over 1 / (per_sm + 1) of what an SM has: half for the
 * whole-item plan's grid of one block per SM, a third for two, a fifth for
 * four): with three
 * allowed, the block scheduler put two blocks of a one-per-SM grid on some
 * SMs, and those set the pace (B=16 ctx 2048: 54.8 us on 132 blocks,
 * 63.5-68.6 on 126-131 or 133; NOTES.md, round 8). The space is not used:
 * 3, 4 or 6 KV blocks in flight instead of 2 were no faster (2.16-2.23
 * TB/s at B=16 ctx 2048; 2 blocks gave 2.22 on an H100 as slow as that
 * one, 2.53 on others). */
static size_t dec_pad_smem(int per_sm)
{
    static size_t bytes[64];            /* per device: the SM's */
    int dev = 0, sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (!bytes[dev & 63] &&
        cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                               dev) == cudaSuccess)
        bytes[dev & 63] = (size_t)sm;
    return bytes[dev & 63] / (per_sm + 1) + 1024;
}

/* The decode kernel's shared memory (per_sm > 0: at least dec_pad_smem)
 * and its opt-ins (once per device, head dim and build: its own size, then
 * the one-per-SM size, the largest; should the second fail, the first
 * still holds and launches take the kernel's own size), for its launches
 * and its occupancy query alike. */
template <int HD, int OCC>
static size_t dec_smem(int per_sm)
{
    static uint64_t set, set_one;
    size_t need = fa_smem<HD>(0), most = dec_pad_smem(1);
    allow_smem(flash_dec_kernel<HD, OCC, false>, need, &set);
    int padded = most <= need ||
                 allow_smem(flash_dec_kernel<HD, OCC, false>, most, &set_one);
    size_t pad = per_sm > 0 && padded ? dec_pad_smem(per_sm) : 0;
    return pad > need ? pad : need;
}

/* Calls f(std::integral_constant<int, OCC>()) with the build of the decode
 * kernel for a plan of per_sm blocks an SM (0: the cut plan's grid). One
 * or two an SM take the 3-an-SM build, which fits them as the 4-an-SM one
 * does (same shared memory; dec_plan.c's "below head dim 128" rule for
 * four is this one's condition). */
template <int HD, typename F>
static void with_dec_build(int per_sm, F f)
{
    if constexpr (HD < 128)
        if (per_sm >= 4) {
            f(std::integral_constant<int, 4>());
            return;
        }
    f(std::integral_constant<int, 3>());
}

extern "C" void pie__cuda_attention_dec(uint16_t *out, float *part_o,
                                        float *part_ml, const float *q,
                                        const pie_cuda_attn_item *pieces,
                                        const int32_t *bstart, int n_blocks,
                                        const pie_cuda_tokmeta *tm,
                                        const pie_cuda_kv *kv, int layer,
                                        int nh, int per_sm, cudaStream_t s)
{
    if (n_blocks <= 0) return;
    with_head_dim(kv->head_dim, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        with_dec_build<HD>(per_sm, [&](auto O) {
            constexpr int OCC = decltype(O)::value;
            /* a programmatic dependent (unless PIE_CUDA_NO_PDL): its
             * blocks read the step's metadata while the kernel before
             * finishes */
            launch_pdl_if(pie__cuda_pdl() >= 1, flash_dec_kernel<HD, OCC, false>,
                          n_blocks, FA_DEC_THREADS, dec_smem<HD, OCC>(per_sm),
                          s, out, part_o, part_ml, q, pieces, bstart, *tm, *kv,
                          layer, nh, page_shift(kv));
        });
    });
}

/* Resident blocks of the decode kernel per SM: of the cut plan's build
 * (whole = 0; its persistent grid is this times the SM count), or the
 * most of any build (whole = 1: what a whole-item plan may take). */
extern "C" int pie__cuda_attention_dec_occupancy(int hd, int whole)
{
    int n = 0;
    with_head_dim(hd, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        with_dec_build<HD>(whole ? 4 : 0, [&](auto O) {
            constexpr int OCC = decltype(O)::value;
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &n, flash_dec_kernel<HD, OCC, false>, FA_DEC_THREADS,
                dec_smem<HD, OCC>(0));
        });
    });
    return n > 0 ? n : 1;
}

/* The cluster plan's kernel at head dim HD with its opt-ins done (its
 * shared memory; C > 8 needs the non-portable cluster size), once per
 * device; NULL if refused. */
template <int HD>
static void (*dec_cluster_kernel(int C))(uint16_t *, float *, float *,
                                         const float *,
                                         const pie_cuda_attn_item *,
                                         const int32_t *, pie_cuda_tokmeta,
                                         pie_cuda_kv, int, int, int)
{
    auto kern = flash_dec_kernel<HD, 3, true>;
    static uint64_t set, set16;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return NULL;
    if (!allow_smem(kern, fa_smem<HD>(0), &set)) return NULL;
    uint64_t bit = 1ull << (dev & 63);
    if (C > 8 && !(set16 & bit)) {
        if (cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed,
                                 1) != cudaSuccess)
            return cudaGetLastError(), (decltype(kern))NULL;
        set16 |= bit;
    }
    return kern;
}

/* The cluster kernel's shared memory: its own, or (per_sm > 0) padded so
 * that at most per_sm blocks share an SM, where the device allows that
 * (opted in once per device). */
template <int HD>
static size_t dec_cluster_smem(int per_sm)
{
    static uint64_t set_pad;
    size_t need = fa_smem<HD>(0), pad = per_sm > 0 ? dec_pad_smem(per_sm) : 0;
    if (pad <= need) return need;
    /* opted in once, to the largest padding: one an SM */
    if (!allow_smem(flash_dec_kernel<HD, 3, true>, dec_pad_smem(1), &set_pad))
        return need;
    return pad;
}

/* A launch of n_blocks in clusters of C (at[0]), as a programmatic
 * dependent where PDL is on (at[1]), at most per_sm blocks an SM (> 0). */
template <int HD>
static cudaLaunchConfig_t dec_cluster_cfg(cudaLaunchAttribute *at, int C,
                                          int n_blocks, int per_sm,
                                          cudaStream_t s)
{
    cudaLaunchConfig_t cfg = {};
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = C;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(n_blocks);
    cfg.blockDim = dim3(FA_DEC_THREADS);
    cfg.dynamicSmemBytes = dec_cluster_smem<HD>(per_sm);
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = pie__cuda_pdl() >= 1 ? 2 : 1;
    return cfg;
}

extern "C" int pie__cuda_attention_dec_cluster(uint16_t *out, const float *q,
                                               const pie_cuda_attn_item *pieces,
                                               int n_blocks, int C,
                                               int per_sm,
                                               const pie_cuda_tokmeta *tm,
                                               const pie_cuda_kv *kv, int layer,
                                               int nh, cudaStream_t s)
{
    int rc = -1;
    if (n_blocks <= 0 || C < 2 || C > 16 || n_blocks % C) return -1;
    with_head_dim(kv->head_dim, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        auto kern = dec_cluster_kernel<HD>(C);
        cudaLaunchAttribute at[2];
        cudaLaunchConfig_t cfg = dec_cluster_cfg<HD>(at, C, n_blocks, per_sm, s);
        /* (on failure the caller reads the error) */
        if (kern && cudaLaunchKernelEx(&cfg, kern, out, (float *)NULL,
                                       (float *)NULL, q, pieces,
                                       (const int32_t *)NULL, *tm, *kv, layer,
                                       nh, page_shift(kv)) == cudaSuccess)
            rc = 0;
    });
    return rc;
}

extern "C" int pie__cuda_attention_dec_cluster_max(int hd)
{
    int most = 0;
    with_head_dim(hd, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        for (int C = 16; C >= 2 && !most; C /= 2) {
            auto kern = dec_cluster_kernel<HD>(C);
            cudaLaunchAttribute at[2];
            cudaLaunchConfig_t cfg = dec_cluster_cfg<HD>(at, C, C, 0, 0);
            int n = 0;
            cfg.numAttrs = 1;           /* residency: the cluster alone */
            if (kern && cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess)
                cudaGetLastError();
            if (n > 0) most = C;
        }
    });
    return most;
}
