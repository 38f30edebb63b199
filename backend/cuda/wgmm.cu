/*
 * wgmm.cu — a Hopper matmul for decode steps of 17..256 rows: y (m, n) =
 * x (m, k) . W^T, W (n, k) and x bf16, on TMA copies and warp-group MMA
 * (wgmma, sm_90a), with the epilogues of the backend's matmuls (bf16 or
 * f32 out, f32 accumulated into y, or the SwiGLU of a gate/up pair).
 *
 * Why: at 64-256 rows a decode matmul is bound by both the weights'
 * bytes and the tensor cores, and cuBLASLt's tiles leave a fraction of a
 * wave idle (8B gate/up at 256 rows: 224 tiles on 132 SMs). This kernel
 * is persistent and splits the work evenly over the SMs ("stream-K").
 *
 * Data structures:
 * - A tile is 128 rows of W (output columns n0 .. n0 + 127) against all m
 *   rows of x, padded to MT (64, 128 or 256: the wgmma's N). Its work is
 *   kb = k / 64 iterations, one 64-wide slice of k each.
 * - The grid's G blocks split the tiles x kb iterations into G even,
 *   contiguous ranges (wgmm_begin). A tile is a "piece" of every block
 *   whose range meets it; a tile of one piece is written by its block, a
 *   tile of several by the last of its pieces to finish: each piece stores
 *   its f32 accumulators to the workspace (two slots a block: its range's
 *   first and last tile), counts itself in the tile's counter, and the
 *   block that counts last adds the pieces in their order (the sum does
 *   not depend on which finished last), writes the tile and zeroes the
 *   counter for the next call.
 * - A block: a producer warp group (threads 0-127; thread 0 issues the TMA
 *   copies, the group gives its registers to the others) and two consumer
 *   warp groups (128-383), each 64 W rows of the tile (wgmma m64nMTk16,
 *   accumulators in registers, up to 232 of them a thread). Shared
 *   memory holds S stages of (W: 128 rows x 128 bytes, x: MT rows x 128
 *   bytes), both in TMA's 128-byte swizzle, which is wgmma's K-major
 *   layout; stage s has a "full" barrier (the copies landed: the
 *   producer's expected bytes) and an "empty" one (both groups' MMAs read
 *   it: two arrivals). After the stages, each consumer group has two
 *   staging buffers of 8 KB for its output (wgmm_store): a finished tile
 *   leaves in chunks of 32 tokens through them by TMA stores (TMA
 *   reduce-adds for the residual) that run while the group computes its
 *   next tile. (Stored from registers, the residual's read-modify-write
 *   took wo at 256 rows 90 us instead of 41: NOTES.md, round 18.)
 * - SwiGLU (mode PIE_CUDA_WGMM_GLU): W is the gate/up pair (2 hid, k) and a tile
 *   covers 64 features j0 .. j0 + 63; its W rows are loaded as one box of
 *   a 4-D view of W (wgmm_map_glu), interleaved so that each warp's 16
 *   rows are 8 gate rows and the same 8 up rows: a thread's accumulator
 *   rows r and r + 8 are then gate and up of one feature, and h = silu(g)
 *   up is formed in registers (g and up rounded to bf16 first, as the
 *   unfused matmul + silu_mul). (As 16 boxes of 8 rows, one TMA copy
 *   each, the SwiGLU matmul took 5-25% longer: NOTES.md, round 18.)
 */
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include "backend/cuda/kernel_util.cuh"
#include "backend/cuda/wgmm_ops.cuh"

#define WGMM_THREADS 384        /* a producer warp group + two consumer ones */
#define WGMM_TILE_BYTES 16384   /* W rows of a stage: 128 x 128 bytes */
#define WGMM_SMEM_MAX (227 * 1024)   /* the H100's opt-in limit a block */
#define WGMM_STAGE_OUT 8192          /* a group's staged chunk of output  */
#define WGMM_OUT_BYTES (2 * 2 * WGMM_STAGE_OUT)  /* 2 groups x 2 buffers */

typedef struct wgmm_args {
    void    *y;
    float   *part;      /* workspace: (G, 2 slots, 2 groups, 64 x MT) f32 */
    int     *cnt;       /* (tiles) pieces counted in; zero between calls */
    int      mode, m, n, k, kb, tiles;
    int      exp;       /* PIE_CUDA_WGMM_EXP, timing only (output wrong):
                         * bit 1 no copies of x, 2 no stream-K fix-ups (a
                         * piece stores its own sums), 4 no stores */
} wgmm_args;

/* ------------------------------------------------------------ PTX bits */

static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void mbar_init(uint64_t *b, uint32_t n)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)),
                 "r"(n));
}

static __device__ __forceinline__ void mbar_expect(uint64_t *b, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                     smem_u32(b)), "r"(bytes) : "memory");
}

static __device__ __forceinline__ void mbar_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b))
                 : "memory");
}

/* Waits until the phase of parity `par` has completed. */
static __device__ __forceinline__ void mbar_wait(uint64_t *b, uint32_t par)
{
    uint32_t ok;
    do
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok) : "r"(smem_u32(b)), "r"(par) : "memory");
    while (!ok);
}

/* TMA: box (c0, c1) of map into dst, counted on barrier bar. */
static __device__ __forceinline__ void tma_2d(void *dst, const CUtensorMap *map,
                                              int c0, int c1, uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
                 "complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
                     smem_u32(dst)), "l"(map), "r"(c0), "r"(c1),
                 "r"(smem_u32(bar)) : "memory");
}

/* TMA: box (c0, c1, c2, c3) of a 4-D map into dst, counted on bar. */
static __device__ __forceinline__ void tma_4d(void *dst, const CUtensorMap *map,
                                              int c0, int c1, int c2, int c3,
                                              uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::"
                 "complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(
                     smem_u32(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
                 "r"(smem_u32(bar)) : "memory");
}

/* TMA store of box (c0, c1) of map from shared memory src (bulk group). */
static __device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, int c0,
                                                    int c1, const void *src)
{
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group "
                 "[%0, {%1, %2}], [%3];" ::"l"(map), "r"(c0), "r"(c1),
                 "r"(smem_u32(src)) : "memory");
}

/* The same, adding into global memory (in L2) instead of writing. */
static __device__ __forceinline__ void tma_add_2d(const CUtensorMap *map, int c0,
                                                  int c1, const void *src)
{
    asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile."
                 "bulk_group [%0, {%1, %2}], [%3];" ::"l"(map), "r"(c0), "r"(c1),
                 "r"(smem_u32(src)) : "memory");
}

/* A K-major tile's descriptor: 8-row groups 1024 bytes apart (the leading
 * offset is unused in this layout). */
static __device__ __forceinline__ uint64_t wgmm_desc(const void *p)
{
    return wg_desc(p, 16, 1024);
}

/* Arrives on barrier b's twin in the cluster's block `peer`. */
static __device__ __forceinline__ void mbar_arrive_peer(uint64_t *b, uint32_t peer)
{
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
                 "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}"
                 ::"r"(smem_u32(b)), "r"(peer) : "memory");
}

/* TMA box (c0, c1) into dst of every block of the cluster in mask, each
 * counting it on its own barrier at bar's offset. */
static __device__ __forceinline__ void tma_2d_mc(void *dst, const CUtensorMap *map,
                                                 int c0, int c1, uint64_t *bar,
                                                 uint16_t mask)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
                 "complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3}], "
                 "[%4], %5;" ::"r"(smem_u32(dst)), "l"(map), "r"(c0), "r"(c1),
                 "r"(smem_u32(bar)), "h"(mask) : "memory");
}

static __device__ __forceinline__ void cluster_sync(void)
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/* ------------------------------------------------------- the schedule */

/* The block's place in the schedule: units are CL tiles side by side (a
 * cluster's blocks take one tile each, so they walk the same k slices and
 * share x); the G = grid / CL clusters split units x kb evenly. */
struct wgmm_sched {
    int T, G, cl, rank;
};

/* First iteration of cluster c's range. */
static __device__ __forceinline__ int wgmm_begin(const wgmm_sched &q, int c)
{
    return (int)((long long)q.T * c / q.G);
}

/* The cluster whose range holds iteration i. */
static __device__ __forceinline__ int wgmm_owner(const wgmm_sched &q, int i)
{
    return (int)(((long long)(i + 1) * q.G + q.T - 1) / q.T) - 1;
}

/* ------------------------------------------------------------ producer */

template <int MT, int CL>
static __device__ void wgmm_produce(const CUtensorMap *tw, const CUtensorMap *tx,
                                    const wgmm_args &a, const wgmm_sched &q,
                                    char *sm, uint64_t *full, uint64_t *empty,
                                    int S)
{
    const uint32_t bytes = WGMM_TILE_BYTES + (a.exp & 1 ? 0 : MT * 128);
    asm volatile("prefetch.tensormap [%0];" ::"l"(tw) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(tx) : "memory");
    int it = wgmm_begin(q, q.cl), end = wgmm_begin(q, q.cl + 1);
    for (int s = 0, ph = 0; it < end; it++) {
        int t = it / a.kb * CL + q.rank, k0 = it % a.kb * 64;
        char *st = sm + (size_t)s * bytes;
        mbar_wait(&empty[s], ph ^ 1);
        mbar_expect(&full[s], bytes);
        if (a.mode == PIE_CUDA_WGMM_GLU)    /* g0-7, u0-7, g8-15, .. */
            tma_4d(st, tw, k0, 0, 0, t * 8, &full[s]);
        else
            tma_2d(st, tw, k0, t * 128, &full[s]);
        if (a.exp & 1)
            ;
        else if (CL == 1)
            tma_2d(st + WGMM_TILE_BYTES, tx, k0, 0, &full[s]);
        else                            /* this block's share of x, to both */
            tma_2d_mc(st + WGMM_TILE_BYTES + q.rank * (MT / CL) * 128, tx, k0,
                      q.rank * (MT / CL), &full[s], (1 << CL) - 1);
        if (++s == S) { s = 0; ph ^= 1; }
    }
}

/* ------------------------------------------------------------ epilogue */

static __device__ __forceinline__ void group_sync(int grp)
{
    asm volatile("bar.sync %0, 128;" ::"r"(2 + grp) : "memory");
}

/* A tile's output leaves through shared memory, in chunks of 32 tokens:
 * every thread of the group puts its part of the chunk in the group's
 * staging buffer (two of WGMM_STAGE_OUT bytes, used in turn), laid out as
 * the box of the output's map ty (swizzled: the fragment's stores are then
 * free of bank conflicts), and the group's first thread sends it with a
 * TMA store, or for the residual a TMA reduce-add (one add an element in
 * L2: the same bits as y += d), without waiting for it: the group goes on
 * with its next tile while the copy engine writes. Rows of the box past m
 * are clipped by the map. *sent counts the group's chunks (its buffer is
 * sent % 2).
 *
 * Thread's fragment: d[4 j + e] is row 8 (lane / 4) + w 16 (+ 8 for e >= 2)
 * of its group's 64, column (token) 8 j + 2 (lane % 4) (+ 1 for odd e).
 * Staged layouts (tk the token within the chunk, 128-byte swizzle unless
 * said): f32 two boxes of 32 columns x 32 tokens; bf16 one box of 64
 * columns; the SwiGLU's h one box of the group's 32 features (64-byte
 * swizzle). */
static __device__ __forceinline__ int out_f32(int col, int tk)
{
    int cc = col & 31;
    return (col >> 5) * 4096 + tk * 128 + (((cc >> 2) ^ (tk & 7)) << 4) + (cc & 3) * 4;
}

static __device__ __forceinline__ int out_bf16(int col, int tk)
{
    return tk * 128 + (((col >> 3) ^ (tk & 7)) << 4) + (col & 7) * 2;
}

static __device__ __forceinline__ int out_glu(int f, int tk)
{
    return tk * 64 + (((f >> 3) ^ ((tk >> 1) & 3)) << 4) + (f & 7) * 2;
}

/* Puts chunk ch of the fragment d in buffer buf, as mode's box wants. */
template <int MT>
static __device__ __forceinline__ void wgmm_stage(int mode, int ch, const float *d,
                                                  char *buf)
{
    int lane = threadIdx.x % 32, w = (threadIdx.x % 128) / 32;
    int g = lane / 4, c2 = 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int i = ch * 4 + j;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int tk = 8 * j + c2 + (e & 1), col = w * 16 + g + (e >> 1) * 8;
            float v = d[4 * i + e];
            if (mode == PIE_CUDA_WGMM_GLU) {
                if (e < 2)
                    *(uint16_t *)(buf + out_glu(w * 8 + g, tk)) =
                        f2bf(pie_silu_mul(bf16_round(v), bf16_round(d[4 * i + 2 + e])));
            } else if (mode == PIE_CUDA_WGMM_BF16) {
                *(uint16_t *)(buf + out_bf16(col, tk)) = f2bf(v);
            } else {
                *(float *)(buf + out_f32(col, tk)) = v;
            }
        }
    }
}

/* Sends a staged chunk (the group's first thread): tile t, tokens 32 ch. */
static __device__ __forceinline__ void wgmm_send(const CUtensorMap *ty, int mode,
                                                 int t, int grp, int ch,
                                                 const char *buf)
{
    int tok = 32 * ch;
    if (mode == PIE_CUDA_WGMM_GLU) {
        tma_store_2d(ty, t * 64 + grp * 32, tok, buf);
    } else if (mode == PIE_CUDA_WGMM_BF16) {
        tma_store_2d(ty, t * 128 + grp * 64, tok, buf);
    } else if (mode == PIE_CUDA_WGMM_F32) {
        tma_store_2d(ty, t * 128 + grp * 64, tok, buf);
        tma_store_2d(ty, t * 128 + grp * 64 + 32, tok, buf + 4096);
    } else {
        tma_add_2d(ty, t * 128 + grp * 64, tok, buf);
        tma_add_2d(ty, t * 128 + grp * 64 + 32, tok, buf + 4096);
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

template <int MT>
static __device__ void wgmm_store(const wgmm_args &a, const CUtensorMap *ty,
                                  int t, int grp, const float *d, char *stage,
                                  int *sent)
{
    const bool lead = threadIdx.x % 128 == 0;
#pragma unroll
    for (int ch = 0; ch < MT / 32; ch++) {
        if (ch * 32 >= a.m) break;
        char *buf = stage + (*sent & 1) * WGMM_STAGE_OUT;
        /* the buffer's previous chunk read out: at most one group pending */
        if (lead && *sent >= 2)
            asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        group_sync(grp);
        wgmm_stage<MT>(a.mode, ch, d, buf);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        group_sync(grp);
        if (lead) wgmm_send(ty, a.mode, t, grp, ch, buf);
        ++*sent;
    }
}

/* Cluster c's slot for unit u's piece (0 if its range starts in u, else 1),
 * for the tile of rank `rank` and consumer group grp: float4s. */
template <int MT, int CL>
static __device__ __forceinline__ float4 *wgmm_slot(const wgmm_args &a,
                                                    const wgmm_sched &q, int c,
                                                    int u, int grp)
{
    int slot = wgmm_begin(q, c) >= u * a.kb ? 0 : 1;
    return (float4 *)a.part +
           ((size_t)((c * CL + q.rank) * 2 + slot) * 2 + grp) * 16 * MT;
}

/* A piece of unit u (not the whole of it): stores the accumulators, counts
 * in on the tile's counter; the last piece adds all of them in order into
 * d. Returns whether this block writes the tile. Called by both consumer
 * groups. */
template <int MT, int CL>
static __device__ bool wgmm_fixup(const wgmm_args &a, const wgmm_sched &q, int u,
                                  int grp, float *d, int *last)
{
    int tid = threadIdx.x % 128, t = u * CL + q.rank;
    float4 *mine = wgmm_slot<MT, CL>(a, q, q.cl, u, grp) + tid;
#pragma unroll
    for (int i = 0; i < MT / 8; i++)
        mine[i * 128] = make_float4(d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]);
    __threadfence();
    asm volatile("bar.sync 1, 256;" ::: "memory");
    int first = wgmm_owner(q, u * a.kb);
    int np = wgmm_owner(q, (u + 1) * a.kb - 1) - first + 1;
    if (threadIdx.x == 128) {      /* the first consumer thread */
        int done = atomicAdd(&a.cnt[t], 1) == np - 1;
        if (done) a.cnt[t] = 0;         /* every piece has counted in */
        *last = done;
    }
    asm volatile("bar.sync 1, 256;" ::: "memory");
    if (!*last) return false;
    __threadfence();
    /* every piece, this block's too, from the workspace, in piece order */
    const float4 *src = wgmm_slot<MT, CL>(a, q, first, u, grp) + tid;
#pragma unroll
    for (int i = 0; i < MT / 8; i++) {
        float4 v = __ldcg(src + i * 128);
        d[4 * i] = v.x; d[4 * i + 1] = v.y; d[4 * i + 2] = v.z; d[4 * i + 3] = v.w;
    }
#pragma unroll 1
    for (int p = 1; p < np; p++) {
        src = wgmm_slot<MT, CL>(a, q, first + p, u, grp) + tid;
#pragma unroll
        for (int i = 0; i < MT / 8; i++) {
            float4 v = __ldcg(src + i * 128);
            d[4 * i] += v.x; d[4 * i + 1] += v.y;
            d[4 * i + 2] += v.z; d[4 * i + 3] += v.w;
            if (i % 4 == 3) asm volatile("" ::: "memory");  /* (as above) */
        }
    }
    return true;
}

/* ------------------------------------------------------------ consumer */

/* Stage s read: this group's arrival on its block's empty barrier and on
 * its twins in the cluster's other blocks (whose producers fill this
 * block's share of x too). */
template <int CL>
static __device__ __forceinline__ void wgmm_release(uint64_t *empty, int s,
                                                    const wgmm_sched &q)
{
    if (threadIdx.x % 128) return;
    mbar_arrive(&empty[s]);
    for (int r = 0; r < CL; r++)
        if (r != q.rank) mbar_arrive_peer(&empty[s], r);
}

template <int MT, int CL>
static __device__ void wgmm_consume(const wgmm_args &a, const CUtensorMap *ty,
                                    const wgmm_sched &q, char *sm, uint64_t *full,
                                    uint64_t *empty, int S, int *last)
{
    const uint32_t bytes = WGMM_TILE_BYTES + MT * 128;
    const int grp = threadIdx.x / 128 - 1;   /* after the producer group */
    char *stage = sm + (size_t)S * bytes + grp * 2 * WGMM_STAGE_OUT;
    float d[MT / 2];
    int s = 0, ph = 0, sent = 0;
    int it = wgmm_begin(q, q.cl), end = wgmm_begin(q, q.cl + 1);
    while (it < end) {
        int u = it / a.kb;
        int u0 = u * a.kb, stop = min(end, u0 + a.kb), prev = -1;
        bool whole = it == u0 && stop == u0 + a.kb;
        for (int first = 1; it < stop; it++, first = 0) {
            const char *st = sm + (size_t)s * bytes;
            mbar_wait(&full[s], ph);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wgmm_mma<MT>(d, wgmm_desc(st + grp * 8192 + kk * 32),
                             wgmm_desc(st + WGMM_TILE_BYTES + kk * 32),
                             !(first && kk == 0));
            /* one group in flight: the stage before this one is read */
            asm volatile("wgmma.commit_group.sync.aligned;\n"
                         "wgmma.wait_group.sync.aligned 1;" ::: "memory");
            if (prev >= 0) wgmm_release<CL>(empty, prev, q);
            prev = s;
            if (++s == S) { s = 0; ph ^= 1; }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        wgmm_release<CL>(empty, prev, q);
        if (a.exp & 2) whole = true;
        if ((whole || wgmm_fixup<MT, CL>(a, q, u, grp, d, last)) && !(a.exp & 4))
            wgmm_store<MT>(a, ty, u * CL + q.rank, grp, d, stage, &sent);
    }
    /* the output written (and the staging read) before the block ends */
    if (threadIdx.x % 128 == 0)
        asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

template <int MT, int CL>
__global__ void __launch_bounds__(WGMM_THREADS, 1)
wgmm_kernel(const __grid_constant__ CUtensorMap tw,
            const __grid_constant__ CUtensorMap tx,
            const __grid_constant__ CUtensorMap ty, wgmm_args a, int S)
{
    extern __shared__ __align__(128) char wgmm_raw[];
    char *sm = (char *)(((uintptr_t)wgmm_raw + 1023) & ~(uintptr_t)1023);
    uint64_t *full = (uint64_t *)(sm + (size_t)S * (WGMM_TILE_BYTES + MT * 128) +
                                  WGMM_OUT_BYTES);
    uint64_t *empty = full + S;
    int *last = (int *)(empty + S);
    const wgmm_sched q = { a.tiles / CL * a.kb, (int)gridDim.x / CL,
                           (int)blockIdx.x / CL, (int)blockIdx.x % CL };
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 2 * CL);   /* both groups of every block */
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (CL > 1) cluster_sync(); else __syncthreads();
    pdl_begin();
    if (threadIdx.x < 128) {       /* the producer: one thread, few registers */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (threadIdx.x == 0)
            wgmm_produce<MT, CL>(&tw, &tx, a, q, sm, full, empty, S);
        __syncwarp();
    }
    else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        wgmm_consume<MT, CL>(a, &ty, q, sm, full, empty, S, last);
    }
    /* no block leaves while its peers may still arrive on its barriers */
    if (CL > 1) cluster_sync();
}

/* ---------------------------------------------------------------- host */

typedef CUresult (*encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t,
                              void *, const cuuint64_t *, const cuuint64_t *,
                              const cuuint32_t *, const cuuint32_t *,
                              CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static encode_fn wgmm_lookup(void)
{
    cudaDriverEntryPointQueryResult q;
    void *p = NULL;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                         cudaEnableDefault, &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        return (encode_fn)p;
    cudaGetLastError();
    return NULL;
}

/* cuTensorMapEncodeTiled through the runtime (pie links no libcuda);
 * looked up once (a function-local static: thread-safe). */
static encode_fn wgmm_encoder(void)
{
    static const encode_fn fn = wgmm_lookup();
    return fn;
}

/* A tiled map of a rank-r tensor at p (dims and byte strides innermost
 * first; es all 1, no interleave, rows past the end read as zeros):
 * 0, or -1 where the driver refuses it. */
static int wgmm_encode(CUtensorMap *map, CUtensorMapDataType type, int r,
                       void *p, const cuuint64_t *dim, const cuuint64_t *stride,
                       const cuuint32_t *box, CUtensorMapSwizzle sw,
                       CUtensorMapL2promotion promo)
{
    const cuuint32_t es[4] = { 1, 1, 1, 1 };
    encode_fn enc = wgmm_encoder();
    return enc && enc(map, type, (cuuint32_t)r, p, dim, stride, box, es,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, sw, promo,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS
               ? 0 : -1;
}

/* A bf16 row-major (rows, k) matrix's map: boxes of 64 columns x box_rows
 * rows, 128-byte swizzle. */
static int wgmm_map(CUtensorMap *map, const uint16_t *p, int rows, int k,
                    int box_rows)
{
    cuuint64_t dim[2] = { (cuuint64_t)k, (cuuint64_t)rows };
    cuuint64_t stride[1] = { (cuuint64_t)k * 2 };
    cuuint32_t box[2] = { 64, (cuuint32_t)box_rows };
    return wgmm_encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)p, dim,
                       stride, box, CU_TENSOR_MAP_SWIZZLE_128B,
                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

/* The gate/up pair's map for the SwiGLU (W: gate rows [0, hid), then up
 * rows [hid, 2 hid), each k long), as 4-D: (k, 8 rows, gate or up, 8-row
 * group). One box of (64, 8, 2, 8) lands as the 128 rows g0-7, u0-7,
 * g8-15, u8-15, ..: 64 features' gate and up rows, each 8 of them a
 * 1024-byte swizzle atom, as each warp's 16 rows need them. */
static int wgmm_map_glu(CUtensorMap *map, const uint16_t *p, int hid, int k)
{
    cuuint64_t dim[4] = { (cuuint64_t)k, 8, 2, (cuuint64_t)hid / 8 };
    cuuint64_t stride[3] = { (cuuint64_t)k * 2, (cuuint64_t)hid * k * 2,
                             (cuuint64_t)k * 16 };
    cuuint32_t box[4] = { 64, 8, 2, 8 };
    return wgmm_encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void *)p, dim,
                       stride, box, CU_TENSOR_MAP_SWIZZLE_128B,
                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

/* The output's map, for the epilogue's TMA stores (wgmm_send): y (m, n)
 * row-major, f32 in boxes of 32 columns x 32 rows, bf16 in boxes of 64
 * (the SwiGLU's h (m, hid): 32, 64-byte swizzle); rows past m clipped. */
static int wgmm_map_out(CUtensorMap *map, void *y, int mode, int m, int n)
{
    int f32 = mode == PIE_CUDA_WGMM_F32 || mode == PIE_CUDA_WGMM_ACC;
    int glu = mode == PIE_CUDA_WGMM_GLU;
    cuuint64_t dim[2] = { (cuuint64_t)n, (cuuint64_t)m };
    cuuint64_t stride[1] = { (cuuint64_t)n * (f32 ? 4 : 2) };
    cuuint32_t box[2] = { f32 || glu ? 32u : 64u, 32 };
    if ((uintptr_t)y % 16) return -1;
    return wgmm_encode(map, f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                       2, y, dim, stride, box,
                       glu ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B,
                       CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

static int wgmm_mt(int m)
{
    return m <= 64 ? 64 : m <= 128 ? 128 : 256;
}

/* Stages that fit the shared memory beside the epilogue's staging (4 at
 * 256 rows, 6 at 128, 8 at 64). */
static int wgmm_stages(int mt)
{
    int s = (WGMM_SMEM_MAX - 2048 - WGMM_OUT_BYTES) / (WGMM_TILE_BYTES + mt * 128);
    return s > 8 ? 8 : s;
}

static size_t wgmm_smem(int mt)
{
    return (size_t)wgmm_stages(mt) * (WGMM_TILE_BYTES + mt * 128) +
           WGMM_OUT_BYTES + 1024 + 256;
}

extern "C" int pie__cuda_wgmm_supported(int mode, int m, int n, int k,
                                        const void *W, const void *x)
{
    int cols = mode == PIE_CUDA_WGMM_GLU ? 64 : 128;
    return m >= 1 && m <= PIE_CUDA_WGMM_MAX_M && k >= 64 && k % 64 == 0 &&
           k <= 65536 &&
           n >= cols && n % cols == 0 && n / cols <= PIE_CUDA_WGMM_MAX_TILES &&
           (uintptr_t)W % 16 == 0 && (uintptr_t)x % 16 == 0 &&
           wgmm_encoder() != NULL;
}

/* The kernel's launch: blocks (a multiple of CL), smem, PDL, clusters. */
template <int MT, int CL>
static cudaLaunchConfig_t wgmm_cfg(cudaLaunchAttribute *at, int blocks, int pdl,
                                   cudaStream_t s)
{
    cudaLaunchConfig_t cfg = {};
    int n = 0;
    at[n].id = cudaLaunchAttributeClusterDimension;
    at[n].val.clusterDim.x = CL;
    at[n].val.clusterDim.y = at[n].val.clusterDim.z = 1;
    n++;
    if (pdl) {
        at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(WGMM_THREADS);
    cfg.dynamicSmemBytes = wgmm_smem(MT);
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = n;
    return cfg;
}

/* How many blocks of an instantiation can be resident at once on the
 * current device (clusters of CL need CL SMs of one GPC), after its
 * shared-memory opt-in there; 0: it cannot run. Asked once per device
 * (the tuner's first call, outside any graph capture, since the tuner
 * times every instantiation a decode step can launch: MT follows m's
 * bucket and CL the tile count, both the same in the timed mode). */
template <int MT, int CL>
static int wgmm_resident(void)
{
    static uint64_t smem_set;
    static int blocks[64];          /* per device ordinal; 0: not asked */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    dev &= 63;
    if (blocks[dev] > 0) return blocks[dev];
    int clusters = 0;
    cudaLaunchAttribute at[2];
    cudaLaunchConfig_t cfg = wgmm_cfg<MT, CL>(at, CL, 0, 0);
    if (!allow_smem(wgmm_kernel<MT, CL>, wgmm_smem(MT), &smem_set) ||
        cudaOccupancyMaxActiveClusters(&clusters, wgmm_kernel<MT, CL>, &cfg) !=
            cudaSuccess) {
        cudaGetLastError();
        return 0;                   /* not cached: asked again next time */
    }
    blocks[dev] = clusters * CL;
    return blocks[dev];
}

template <int MT, int CL>
static int wgmm_launch(const CUtensorMap &tw, const CUtensorMap &tx,
                       const CUtensorMap &ty,
                       const wgmm_args &a, int grid, int pdl, cudaStream_t s)
{
    int units = a.tiles / CL, res = wgmm_resident<MT, CL>();
    long long T = (long long)units * a.kb;
    int blocks = grid < res ? grid : res;
    if (blocks > T * CL) blocks = (int)(T * CL);
    blocks -= blocks % CL;
    if (blocks < CL) return -1;
    cudaLaunchAttribute at[2];
    cudaLaunchConfig_t cfg = wgmm_cfg<MT, CL>(at, blocks, pdl, s);
    if (cudaLaunchKernelEx(&cfg, wgmm_kernel<MT, CL>, tw, tx, ty, a,
                           wgmm_stages(MT)) == cudaSuccess)
        return 0;
    cudaGetLastError();
    return -1;
}

/* PIE_CUDA_WGMM_EXP (read once; timing experiments, output wrong). */
static int wgmm_exp(void)
{
    static int exp = -1;
    if (exp < 0) {
        const char *e = getenv("PIE_CUDA_WGMM_EXP");
        exp = e ? atoi(e) & 7 : 0;
    }
    return exp;
}

/* Clusters of 2 sharing x where the tiles pair up: PIE_CUDA_WGMM_CL=2
 * (read once). Off by default: on the H100 they measured 1.3-1.6x slower
 * than single blocks (NOTES.md, round 17). */
static int wgmm_cl(const wgmm_args &a)
{
    static int two = -1;
    if (two < 0) {
        const char *e = getenv("PIE_CUDA_WGMM_CL");
        two = e && atoi(e) == 2;
    }
    return two && a.tiles % 2 == 0 ? 2 : 1;
}

extern "C" int pie__cuda_wgmm(void *y, int mode, const uint16_t *W, int n,
                              int k, const uint16_t *x, int m,
                              const pie_cuda_wgmm_ws *ws, int grid, int pdl,
                              cudaStream_t s)
{
    if (!pie__cuda_wgmm_supported(mode, m, n, k, W, x) || grid < 1) return -1;
    int mt = wgmm_mt(m), glu = mode == PIE_CUDA_WGMM_GLU;
    wgmm_args a = { y, ws->part, ws->cnt, mode, m, n, k, k / 64,
                    n / (glu ? 64 : 128) };
    int cl = wgmm_cl(a);
    if (grid > ws->max_grid) grid = ws->max_grid;
    if (grid < cl) grid = cl;
    if (grid > ws->max_grid) return -1;     /* a workspace for fewer blocks */
    CUtensorMap tw, tx, ty;
    a.exp = wgmm_exp();
    if ((glu ? wgmm_map_glu(&tw, W, n, k) : wgmm_map(&tw, W, n, k, 128)) ||
        wgmm_map(&tx, x, m, k, mt / cl) || wgmm_map_out(&ty, y, mode, m, n))
        return -1;
    if (cl == 1)
        switch (mt) {
        case 64:  return wgmm_launch<64, 1>(tw, tx, ty, a, grid, pdl, s);
        case 128: return wgmm_launch<128, 1>(tw, tx, ty, a, grid, pdl, s);
        default:  return wgmm_launch<256, 1>(tw, tx, ty, a, grid, pdl, s);
        }
    switch (mt) {
    case 64:  return wgmm_launch<64, 2>(tw, tx, ty, a, grid, pdl, s);
    case 128: return wgmm_launch<128, 2>(tw, tx, ty, a, grid, pdl, s);
    default:  return wgmm_launch<256, 2>(tw, tx, ty, a, grid, pdl, s);
    }
}

extern "C" size_t pie__cuda_wgmm_part_floats(int max_grid)
{
    return (size_t)max_grid * 2 * 2 * 64 * PIE_CUDA_WGMM_MAX_M;
}
