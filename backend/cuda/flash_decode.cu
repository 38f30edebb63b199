/*
 * flash_decode.cu — the tensor-core decode attention kernel on a
 * persistent grid (flash_dec_kernel) and its launches. Its plans are made
 * on the host (dec_plan.c): the cut plan (pieces of items, combined by
 * attention.cu's merge kernel), whole items on 1, 2 or 4 blocks an SM, and
 * thread-block clusters whose blocks merge in distributed shared memory
 * (dec_cluster_store) at small and mid batch. Its per-block math is in
 * flash.cuh.
 */
#include <stdlib.h>

#include <cooperative_groups.h>

#include "backend/cuda/flash.cuh"

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

/* The carveout a launch of the decode kernel asks for (percent of the SM's
 * unified L1 and shared memory; -1 the driver's choice). Whole items on two
 * blocks an SM ask for all of it: their padded blocks (dec_pad_smem(2))
 * need only a 164 KB configuration, which the driver then took, while the
 * cuBLASLt matmuls before and after them run in the largest; an SM that
 * changes configuration must drain first, so the attention's blocks could
 * not start early under PDL nor the next matmul's. 8B decode steps with
 * it, alternating in one call (NOTES.md, round 25): B=64 ctx 2048 12.656
 * -> 12.526 ms (not repeated on another H100: a tie); with it this plan
 * also pays for short items (dec_plan.c): ctx 512 B=32 7.296 -> 7.099,
 * B=64 8.226 -> 8.024 against the cut plan, B=256 14.761 -> 14.712
 * (noise). Other plans keep the driver's choice (the one-an-SM plans
 * share half an SM with gemv.cu's launches, round 20; the cut plan's three
 * blocks fill the largest configuration anyway; 100 for clusters padded to
 * two an SM made 8B B=16 1.6% slower, round 25). PIE_CUDA_DEC_CARVEOUT=p
 * asks for p at every launch outside clusters. */
static int dec_carveout(int per_sm)
{
    int env = pie__cuda_carveout(PIE_CUDA_CARVE_DEC);
    return env != -2 ? env : per_sm == 2 ? 100 : -1;
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
            launch_pdl_carve(pie__cuda_pdl() >= 1,
                             dec_carveout(per_sm),
                             flash_dec_kernel<HD, OCC, false>, n_blocks,
                             FA_DEC_THREADS, dec_smem<HD, OCC>(per_sm), s, out,
                             part_o, part_ml, q, pieces, bstart, *tm, *kv,
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

extern "C" int pie__cuda_attention_dec_cluster_max(int hd, int per_sm)
{
    int most = 0;
    with_head_dim(hd, [&](auto H) {
        constexpr int HD = decltype(H)::value;
        for (int C = 16; C >= 2 && !most; C /= 2) {
            auto kern = dec_cluster_kernel<HD>(C);
            cudaLaunchAttribute at[2];
            cudaLaunchConfig_t cfg = dec_cluster_cfg<HD>(at, C, C, per_sm, 0);
            int n = 0;
            cfg.numAttrs = 1;           /* residency: the cluster alone */
            if (kern && cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess)
                cudaGetLastError();
            if (n > 0) most = C;
        }
    });
    return most;
}
