/*
 * flash.cuh — what the tensor-core attention kernels (flash_prefill.cu,
 * flash_decode.cu) share: tile sizes, the copies of KV blocks from the
 * pages into shared memory, masks, the online-softmax state and one KV
 * block's math (fa_block), the output store, Q fragments from global
 * memory, and on the host the head-dim dispatch and shared-memory sizes.
 * Only those two files include it.
 */
#ifndef PIE_CUDA_FLASH_CUH
#define PIE_CUDA_FLASH_CUH

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <type_traits>

#include "backend/cuda/kernel_util.cuh"

/* ------------------------------------------------------ flash attention */

/*
 * Tensor-core attention for prefill tiles (FlashAttention-2 layout). One
 * block per item: FA_BM = 128 query rows (consecutive tokens t0.. of one
 * request, one query head it.kvh): every KV block loaded into shared
 * memory serves 128 rows. At hd 128, 4 warps of 32 rows, so that every K
 * or V fragment a warp loads serves two m-tiles of 16 rows (8 warps of 16
 * rows ran at 146-185 TFLOP/s, this at 178-232); smaller heads keep 8
 * warps of 16 rows, whose lower register count allows twice the warps. KV blocks of FA_BN
 * = 64 slots are gathered from the pages into shared memory (K and V
 * row-major), S = Q K^T and O += P V run on mma.sync m16n8k16 (bf16 in,
 * f32 accumulate), softmax is online in base 2 (scale * log2 e folded into
 * Q). Prefill items (pad 0): nt <= 64 tokens, kvh holds the query head.
 * Grouped items (pad 1): nt * G <= 128 rows of nt tokens x the G query
 * heads of kv head kvh, split partials as attention_kernel's when part >=
 * 0 (decode steps take flash_dec_kernel, flash_decode.cu, which shares
 * the per-block math). KV blocks are double-buffered with cp.async (the next block's
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

#endif
