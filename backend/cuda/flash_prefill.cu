/*
 * flash_prefill.cu — the tensor-core prefill attention kernels and their
 * launch (pie__cuda_attention_flash): flash_attn_kernel (mma.sync, every
 * built head dim; also grouped items with split partials) and
 * flash_wg_kernel (wgmma, sm_90a, head dims 64 and 128). Their shared per-block
 * math is in flash.cuh.
 */
#include <stdlib.h>

#include "backend/cuda/flash.cuh"

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

/* ------------------------------------------- prefill attention, wgmma */

/*
 * flash_wg_kernel: the prefill kernel's items and math on Hopper's
 * warp-group MMA (wgmma.mma_async, sm_90a), head dims 128 and 64 (other
 * head dims, or PIE_CUDA_NO_WGMMA=1: flash_attn_kernel above;
 * PIE_CUDA_NO_WGMMA64=1 at head dim 64 only).
 * - A block is one warp group of 64 query rows, half an item; an SM holds
 *   three (head dim 128, 168 registers) or four (64), which run their MMAs
 *   and softmax out of phase. (One block of two warp groups sharing the KV
 *   blocks ran in lockstep, slower; so did one warp group overlapping its
 *   softmax with its own P V at two blocks an SM: NOTES.md, round 7.)
 * - S = Q K^T is one m64n64 wgmma per 16 of the head dim and O += P V one
 *   m64nHD wgmma per 16 slots, reading K and V straight from shared memory
 *   (mma.sync needs an ldmatrix per fragment and warp). P is the A operand
 *   from registers. Q is one too at head dim 128: a warp keeps its 16
 *   rows' fragments (fa_qfrag) for the whole item. At head dim 64, Q is
 *   staged once in shared memory instead (Qs, A from a descriptor):
 *   ptxas 13.0 there gave P's registers the loop-invariant Q fragments'
 *   registers, so every KV block after the first computed S from the
 *   previous block's P (the SASS; NOTES.md, round 24). The accumulators
 *   have mma.sync's fragment layout (warp w of a group: rows 16 w + g and
 *   + 8, n-tiles of 8 columns), so the softmax is fa_softmax.
 * - Shared memory, per stage: K and V of FA_BN slots in wgmma's canonical
 *   128-byte swizzled layout (without a swizzle, wgmma's reads conflict in
 *   the banks: 124 TFLOP/s at 2048 tokens): atoms of 8 slots x 64 columns
 *   (1024 bytes, 1024-aligned), the 16-byte chunk c of slot s stored at
 *   chunk c ^ (s % 8) of the slot's 128-byte row; atoms of 8 slots are
 *   1024 bytes apart, the two halves of head dim 128 WG_HALF. The same
 *   layout is K in K-major form (B of S; d is the reduction: the
 *   descriptor's SBO steps 8 slots, a k-step moves its start 32 bytes), V
 *   in MN-major form (B of P V, transposed; slots are the reduction: SBO
 *   steps 8 slots, LBO the half of the head dim) and Qs (rows for slots,
 *   K-major like K).
 */
#define WG_THREADS 128
#define WG_BLK(HD) (FA_BN * (HD))       /* elements of K (or V) a stage */
#define WG_HALF (FA_BN * 128)           /* bytes between the d halves */

/* Byte offset of 16-byte chunk cd (columns 8 cd ..) of slot s. */
static __device__ __forceinline__ int wg_off(int s, int cd)
{
    return (cd / 8) * WG_HALF + (s / 8) * 1024 + (s % 8) * 128 +
           ((cd % 8) ^ (s % 8)) * 16;
}

static __device__ __forceinline__ void wg_commit_wait(void)
{
    asm volatile("wgmma.commit_group.sync.aligned;\n"
                 "wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

#define WG_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_O32(d) "+f"((d)[0][0]), "+f"((d)[0][1]), "+f"((d)[0][2]), "+f"((d)[0][3]), "+f"((d)[1][0]), "+f"((d)[1][1]), "+f"((d)[1][2]), "+f"((d)[1][3]), "+f"((d)[2][0]), "+f"((d)[2][1]), "+f"((d)[2][2]), "+f"((d)[2][3]), "+f"((d)[3][0]), "+f"((d)[3][1]), "+f"((d)[3][2]), "+f"((d)[3][3]), "+f"((d)[4][0]), "+f"((d)[4][1]), "+f"((d)[4][2]), "+f"((d)[4][3]), "+f"((d)[5][0]), "+f"((d)[5][1]), "+f"((d)[5][2]), "+f"((d)[5][3]), "+f"((d)[6][0]), "+f"((d)[6][1]), "+f"((d)[6][2]), "+f"((d)[6][3]), "+f"((d)[7][0]), "+f"((d)[7][1]), "+f"((d)[7][2]), "+f"((d)[7][3])

/* d (m64n64, f32) (+)= a (registers, bf16 m64k16) x B (desc, K-major) */
static __device__ __forceinline__ void wg_mma_s(float (*d)[4], const uint32_t *a,
                                                uint64_t desc, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 WG_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : WG_O32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc),
                   "r"(acc));
}

/* d (m64n64, f32) (+)= A (desc, K-major) x B (desc, K-major) */
static __device__ __forceinline__ void wg_mma_s_ss(float (*d)[4], uint64_t da,
                                                   uint64_t db, int acc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 WG_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : WG_O32(d)
                 : "l"(da), "l"(db), "r"(acc));
}

/* d (m64n64, f32) += a (registers, bf16 m64k16) x B (desc, MN-major) */
static __device__ __forceinline__ void wg_mma_o64(float (*d)[4],
                                                  const uint32_t *a,
                                                  uint64_t desc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 WG_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : WG_O32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

/* d (m64n128, f32) += a (registers, bf16 m64k16) x B (desc, MN-major) */
static __device__ __forceinline__ void wg_mma_o(float (*d)[4], const uint32_t *a,
                                                uint64_t desc)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WG_O32(d), WG_O32(d + 8)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

/* A warp's 16 rows of Q (A fragments qa, head dim 64) into Qs (64 rows,
 * K-major, the layout above) by stmatrix: lanes 8 m .. 8 m + 7 give the
 * rows of fragment register m (rows + 8 for odd m, columns + 8 for m >= 2). */
static __device__ __forceinline__ void wg_stage_q64(uint16_t *Qs,
                                                    const uint32_t (*qa)[4])
{
    int w = threadIdx.x / WARP, lane = threadIdx.x % WARP, m = lane >> 3;
    int row = 16 * w + (m & 1) * 8 + (lane & 7);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint32_t a = (uint32_t)__cvta_generic_to_shared(
            Qs + wg_off(row, 2 * kk + (m >> 1)) / 2);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], "
                     "{%1, %2, %3, %4};" :: "r"(a), "r"(qa[kk][0]),
                     "r"(qa[kk][1]), "r"(qa[kk][2]), "r"(qa[kk][3]) : "memory");
    }
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

/* S of one KV block (K at Ks): head dim 128 from Q's fragments qa, 64
 * from Qs. */
template <int HD>
static __device__ __forceinline__ void wg_scores(float (*s)[4],
                                                 const uint32_t (*qa)[4],
                                                 const uint16_t *Qs,
                                                 const uint16_t *Ks)
{
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        uint64_t kd = wg_desc((const char *)Ks + (kk / 4) * WG_HALF +
                              (kk % 4) * 32, 16, 1024);
        if constexpr (HD == 64)
            wg_mma_s_ss(s, wg_desc((const char *)Qs + kk * 32, 16, 1024), kd,
                        kk);
        else
            wg_mma_s(s, qa[kk], kd, kk);
    }
}

/* Block b: rows 64 (b % 2) .. + 63 of item b / 2. HD: 64 or 128; OCC
 * blocks an SM. */
template <int HD, int OCC>
__global__ void __launch_bounds__(WG_THREADS, OCC)
flash_wg_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                const pie_cuda_attn_item *items, pie_cuda_tokmeta tm,
                pie_cuda_kv kv, int layer, int nh, int psh)
{
    static_assert(HD == 64 || HD == 128, "wgmma prefill: head dim 64 or 128");
    static_assert(FA_STAGES == 2, "two KV buffers (bi ^= 1), then Qs");
    constexpr int BLK = WG_BLK(HD);
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
    uint16_t *Qs = fa_sm + 4 * BLK;     /* head dim 64 */
    if (it.s0 < it.s1) wg_load<HD>(fa_sm, fa_sm + BLK, src, it.s0, it.s1);
    cp_async_commit();
    fa_rowmask rm = fa_rowmask_of(rows, tm, r0 + g, r0 + g + 8, R);
    uint32_t qa[HD / 16][4];
    fa_qfrag<HD>(qa, q, rows, rm, r0 + g, r0 + g + 8, nh);
    if constexpr (HD == 64) wg_stage_q64(Qs, qa);   /* fenced in the loop */
    fa_state<HD> st;
    st.reset();
    for (int s0 = it.s0, bi = 0; s0 < it.s1; s0 += FA_BN, bi ^= 1) {
        uint16_t *Ks = fa_sm + bi * 2 * BLK, *Vs = Ks + BLK;
        uint16_t *Kn = fa_sm + (bi ^ 1) * 2 * BLK;
        if (s0 + FA_BN < it.s1)
            wg_load<HD>(Kn, Kn + BLK, src, s0 + FA_BN, it.s1);
        cp_async_commit();
        cp_async_wait<1>();
        /* the copies (and Qs; generic proxy) become visible to wgmma
         * (async proxy) */
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        float s[FA_BN / 8][4];
        uint32_t pa[FA_BN / 16][4];
        wg_fence();
        wg_scores<HD>(s, qa, Qs, Ks);
        wg_commit_wait();
        fa_softmax<HD, FA_BN / 8>(s, st, rm, 0, s0, it.s1, tm.mask_bits, pa);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++) {
            uint64_t vd = wg_desc((const char *)Vs + kk * 2048, WG_HALF, 1024);
            if constexpr (HD == 64)
                wg_mma_o64(st.o, pa[kk], vd);
            else
                wg_mma_o(st.o, pa[kk], vd);
        }
        wg_commit_wait();
        __syncthreads();    /* this buffer is refilled next iteration */
    }
    cp_async_wait<0>();
    fa_mass(st);
    fa_store(st, it, rows, rm, r0 + g, r0 + g + 8, out, part_o, part_ml, nh);
}

extern "C" int pie__cuda_flash_supported(int hd)
{
    return with_head_dim(hd, [](auto) {});
}

/* Whether the wgmma prefill kernel runs at head dim hd (PIE_CUDA_NO_WGMMA=1:
 * the mma.sync kernel at every head dim, PIE_CUDA_NO_WGMMA64=1 at 64, for
 * comparison). Read once. */
static int wg_on(int hd)
{
    static int on = -1, on64 = -1;
    if (on < 0) {
        on = getenv("PIE_CUDA_NO_WGMMA") == NULL;
        on64 = on && getenv("PIE_CUDA_NO_WGMMA64") == NULL;
    }
    return hd == 128 ? on : hd == 64 ? on64 : 0;
}

/* The wgmma prefill kernel at head dim HD: its shared memory (two stages,
 * at head dim 64 Qs, and the slack that aligns the swizzle atoms) opted
 * into once. */
template <int HD, int OCC>
static void wg_launch(uint16_t *out, float *part_o, float *part_ml,
                      const float *q, const pie_cuda_attn_item *items,
                      int n_items, const pie_cuda_tokmeta *tm,
                      const pie_cuda_kv *kv, int layer, int nh, cudaStream_t s)
{
    static uint64_t set;
    size_t smem = (2 * FA_STAGES + (HD == 64)) * WG_BLK(HD) * sizeof(uint16_t) +
                  1024;
    allow_smem(flash_wg_kernel<HD, OCC>, smem, &set);
    launch_pdl(flash_wg_kernel<HD, OCC>, 2 * n_items, WG_THREADS, smem, s, out,
               part_o, part_ml, q, items, *tm, *kv, layer, nh, page_shift(kv));
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
    if (wg_on(kv->head_dim)) {
        if (kv->head_dim == 128)
            wg_launch<128, 3>(out, part_o, part_ml, q, items, n_items, tm, kv,
                              layer, nh, s);
        else    /* 124 registers, four an SM: 200 / 271 TFLOP/s at 2048 /
                 * 8192 tokens, where three gave 178 / 241 */
            wg_launch<64, 4>(out, part_o, part_ml, q, items, n_items, tm, kv,
                             layer, nh, s);
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
