/*
 * skinny.cu — a matmul for decode batches of 17..64 rows: y (m, n) =
 * x (m, k) . W^T, W (n, k) bf16 row-major, x bf16, with the epilogues of
 * the backend's matmuls (bf16 or f32 out, f32 added into y, or the SwiGLU
 * of a gate/up pair; the modes of wgmm.cu, PIE_CUDA_WGMM_*).
 *
 * Why: at 17..64 rows a decode matmul still only streams W (its FLOPs are
 * a third of the tensor cores' time at most), but cuBLASLt's tiles cover
 * the 1B shapes' n = 2048 with 16 blocks (wo) and its matmuls ran at about
 * half the HBM bandwidth there (NOTES.md, round 21); gemv.cu's 16-row
 * blocks would read x from L2 once per 16 rows (8x the weights' bytes at
 * 64 rows).
 *
 * Work split:
 * - A tile is SK_ROWS = 128 rows of W (GLU: 64 features, their gate and
 *   up rows) against all m rows of x (padded to 8 NT, NT = 4 or 8 column
 *   tiles of 8 rows). k is cut into steps of 64, and the steps into
 *   `splits` even ranges; block b runs tile b / splits over range
 *   b % splits.
 * - Warp w of a block owns 16 rows of the tile (GLU: 8 gate rows and the
 *   up rows of the same features) and streams them from HBM into
 *   registers, SK_WBUF steps ahead (the first ones before
 *   griddepcontrol.wait: the weights do not depend on the kernel before).
 *   Its loads and tensor-core fragments are gemv.cu's: lane (g, c) loads
 *   16 bytes of k from each of rows g and g + 8 per chunk, the k order of
 *   the mma permuted to match.
 * - The block's slice of x (8 NT rows x its range of k) is copied into
 *   shared memory once, after the wait, and read by all 8 warps: x crosses
 *   L2 once per 128 W rows, and the warps then stream W with no barrier
 *   (one barrier a 64-k step, x going through a ring of 3 step tiles, ran
 *   at half cuBLASLt's speed: NOTES.md, round 21). So a range holds at
 *   most SK_SMEM bytes of x, which bounds the splits from below. Rows of
 *   x past m are zero and never stored.
 * - splits > 1: each block stores its f32 sums (in thread order) to the
 *   workspace and counts itself in its tile's counter; the block that
 *   counts last adds the ranges' sums in range order (the result does not
 *   depend on which finished last), runs the epilogue and zeroes the
 *   counter for the next call.
 * A column's sums do not depend on m or on the other rows of x, for a
 * given number of splits.
 */
#include <cuda_bf16.h>
#include <stdint.h>

#include "backend/cuda/kernel_util.cuh"

#define SK_WARPS   8
#define SK_THREADS (SK_WARPS * 32)
#define SK_ROWS    (16 * SK_WARPS)  /* W rows a tile (GLU: half as many features) */
#define SK_STEP    64               /* k a step: 4 lanes x 2 chunks of 8   */
#define SK_WBUF    3                /* W steps a warp holds in registers   */
#define SK_SMEM    (100 * 1024)     /* x a block at most: two an SM        */

typedef struct sk_args {
    void           *y;
    const uint16_t *W, *x;
    float          *part;   /* workspace: (grid, NT, SK_THREADS) float4 */
    int            *cnt;    /* (tiles) ranges counted in; zero between calls */
    int             mode, m, n, k, steps, splits;
    int             ld;     /* the x slice's row stride (elements): its
                             * longest range + 8, so that the lanes'
                             * 16-byte reads of 8 rows fall in distinct
                             * banks */
} sk_args;

/* The W rows of warp w's fragment rows g (ra) and g + 8 (rb) in tile
 * `tile`, clamped to W (rows past n are computed, never stored). */
static __device__ __forceinline__ void sk_rows(const sk_args &a, int tile,
                                               int w, int g, int &ra, int &rb)
{
    if (a.mode == PIE_CUDA_WGMM_GLU) {      /* n = hid: gate rows, then up */
        ra = min(tile * (SK_ROWS / 2) + 8 * w + g, a.n - 1);
        rb = a.n + ra;
    } else {
        int r = tile * SK_ROWS + 16 * w + g;
        ra = min(r, a.n - 1);
        rb = min(r + 8, a.n - 1);
    }
}

/* This lane's two chunks of step s of rows wa and wb (zeros past k). */
static __device__ __forceinline__ void sk_load_w(uint4 *A, uint4 *B,
                                                 const uint16_t *wa,
                                                 const uint16_t *wb, int s,
                                                 int kc, int k)
{
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int kk = s * SK_STEP + kc + 8 * j;
        A[j] = kk < k ? ld_stream(wa + kk) : make_uint4(0, 0, 0, 0);
        B[j] = kk < k ? ld_stream(wb + kk) : make_uint4(0, 0, 0, 0);
    }
}

/* Copies x's rows [0, 8 NT) x steps [s0, s0 + ns) into xs (row stride
 * a.ld; zeros past m or k), then waits for them: every thread calls it. */
template <int NT>
static __device__ __forceinline__ void sk_load_x(uint16_t *xs, const sk_args &a,
                                                 int s0, int ns)
{
    int cpr = ns * SK_STEP / 8, n = 8 * NT * cpr;       /* 16-byte chunks */
    for (int q = threadIdx.x; q < n; q += SK_THREADS) {
        int r = q / cpr, kk = s0 * SK_STEP + (q % cpr) * 8;
        bool in = r < a.m && kk < a.k;
        cp_async16(&xs[r * a.ld + (q % cpr) * 8],
                   in ? a.x + (size_t)r * a.k + kk : a.x, in);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

/* d[t] += W's step (A, B) times column tile t of the x slice at xt (its
 * first column: the step's). */
template <int NT>
static __device__ __forceinline__ void sk_mma(float (*d)[4], const uint4 *A,
                                              const uint4 *B, const uint16_t *xt,
                                              int ld, int g, int kc)
{
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const uint32_t lo[4] = { A[j].x, B[j].x, A[j].y, B[j].y };
        const uint32_t hi[4] = { A[j].z, B[j].z, A[j].w, B[j].w };
#pragma unroll
        for (int t = 0; t < NT; t++) {
            uint4 xv = *reinterpret_cast<const uint4 *>(&xt[(8 * t + g) * ld + kc + 8 * j]);
            mma16816(d[t], lo, xv.x, xv.y);
            mma16816(d[t], hi, xv.z, xv.w);
        }
    }
}

/* Steps [s0, s0 + ns) of this warp's rows into d, the x slice in xs: W
 * SK_WBUF steps ahead in registers (the first ones already in A, B). */
template <int NT>
static __device__ __forceinline__ void sk_steps(float (*d)[4],
                                                uint4 (*A)[2], uint4 (*B)[2],
                                                const uint16_t *xs,
                                                const sk_args &a,
                                                const uint16_t *wa,
                                                const uint16_t *wb, int s0,
                                                int ns, int g, int kc)
{
    for (int i = 0; i < ns; i += SK_WBUF) {
#pragma unroll
        for (int b = 0; b < SK_WBUF; b++) {
            int j = i + b;
            if (j >= ns) break;
            sk_mma<NT>(d, A[b], B[b], xs + j * SK_STEP, a.ld, g, kc);
            if (j + SK_WBUF < ns)
                sk_load_w(A[b], B[b], wa, wb, s0 + j + SK_WBUF, kc, a.k);
        }
    }
}

/* Writes lane (g, c)'s sums of tile `tile`, warp w: rows ra / rb (d[t][0,
 * 1] / d[t][2, 3]) of x rows 8t + 2c and + 1. */
template <int NT>
static __device__ __forceinline__ void sk_store(const sk_args &a, int tile,
                                                int w, int g, int c,
                                                const float (*d)[4])
{
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int col = 8 * t + 2 * c + i;
            if (col >= a.m) continue;
            if (a.mode == PIE_CUDA_WGMM_GLU) {
                int f = tile * (SK_ROWS / 2) + 8 * w + g;
                if (f < a.n)
                    static_cast<uint16_t *>(a.y)[(size_t)col * a.n + f] =
                        f2bf(pie_silu_mul(bf16_round(d[t][i]), bf16_round(d[t][2 + i])));
                continue;
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = tile * SK_ROWS + 16 * w + g + 8 * h;
                if (row >= a.n) continue;
                size_t at = (size_t)col * a.n + row;
                float v = d[t][2 * h + i];
                if (a.mode == PIE_CUDA_WGMM_ACC) static_cast<float *>(a.y)[at] += v;
                else if (a.mode == PIE_CUDA_WGMM_F32) static_cast<float *>(a.y)[at] = v;
                else static_cast<uint16_t *>(a.y)[at] = f2bf(v);
            }
        }
}

/* splits > 1: stores this block's sums; returns whether it is the tile's
 * last, in which case d holds the ranges' sums added in range order. */
template <int NT>
static __device__ bool sk_gather(const sk_args &a, int tile, float (*d)[4])
{
    __shared__ int last;
    float4 *part = reinterpret_cast<float4 *>(a.part);
    int tid = threadIdx.x;
#pragma unroll
    for (int t = 0; t < NT; t++)
        part[((size_t)blockIdx.x * NT + t) * SK_THREADS + tid] =
            make_float4(d[t][0], d[t][1], d[t][2], d[t][3]);
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&a.cnt[tile], 1) == a.splits - 1;
    __syncthreads();
    if (!last) return false;
    __threadfence();
#pragma unroll
    for (int t = 0; t < NT; t++) d[t][0] = d[t][1] = d[t][2] = d[t][3] = 0.0f;
    for (int sp = 0; sp < a.splits; sp++) {
        size_t b = (size_t)tile * a.splits + sp;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float4 v = __ldcg(&part[(b * NT + t) * SK_THREADS + tid]);
            d[t][0] += v.x; d[t][1] += v.y; d[t][2] += v.z; d[t][3] += v.w;
        }
    }
    if (tid == 0) a.cnt[tile] = 0;
    return true;
}

template <int NT>
__global__ void __launch_bounds__(SK_THREADS, 2) skinny_kernel(sk_args a)
{
    extern __shared__ __align__(16) uint16_t sk_xs[];
    int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    int kc = 16 * c, tile = blockIdx.x / a.splits, sp = blockIdx.x % a.splits;
    int s0 = sp * a.steps / a.splits, ns = (sp + 1) * a.steps / a.splits - s0;
    int ra, rb;
    sk_rows(a, tile, w, g, ra, rb);
    const uint16_t *wa = a.W + (size_t)ra * a.k, *wb = a.W + (size_t)rb * a.k;
    uint4 A[SK_WBUF][2], B[SK_WBUF][2];
    float d[NT][4] = {};
    asm volatile("griddepcontrol.launch_dependents;");
#pragma unroll
    for (int b = 0; b < SK_WBUF; b++)
        if (b < ns) sk_load_w(A[b], B[b], wa, wb, s0 + b, kc, a.k);
    asm volatile("griddepcontrol.wait;" ::: "memory");   /* x, y: after */
    sk_load_x<NT>(sk_xs, a, s0, ns);
    sk_steps<NT>(d, A, B, sk_xs, a, wa, wb, s0, ns, g, kc);
    if (a.splits > 1 && !sk_gather<NT>(a, tile, d)) return;
    sk_store<NT>(a, tile, w, g, c, d);
}

static int sk_tiles(int mode, int n)
{
    int rows = mode == PIE_CUDA_WGMM_GLU ? SK_ROWS / 2 : SK_ROWS;
    return (n + rows - 1) / rows;
}

static int sk_nt(int m) { return m <= 32 ? 4 : 8; }

/* The x slice's row stride (elements) and bytes for k in `splits` ranges. */
static int sk_ld(int k, int splits)
{
    int steps = (k + SK_STEP - 1) / SK_STEP;
    return (steps + splits - 1) / splits * SK_STEP + 8;
}

static size_t sk_smem(int m, int k, int splits)
{
    return (size_t)8 * sk_nt(m) * sk_ld(k, splits) * sizeof(uint16_t);
}

extern "C" int pie__cuda_skinny_supported(int m, int k, const void *W,
                                          const void *x)
{
    return m >= 1 && m <= PIE_CUDA_SKINNY_MAX_M && k > 0 && k % 8 == 0 &&
           (uintptr_t)W % 16 == 0 && (uintptr_t)x % 16 == 0;
}

extern "C" int pie__cuda_skinny_room(int mode, int n, int k, int m, int splits,
                                     const pie_cuda_wgmm_ws *ws)
{
    int tiles = sk_tiles(mode, n), steps = (k + SK_STEP - 1) / SK_STEP;
    if (n <= 0 || splits < 1 || splits > steps || sk_smem(m, k, splits) > SK_SMEM)
        return 0;
    if (splits == 1) return 1;
    return ws && ws->part && ws->cnt && tiles <= PIE_CUDA_WGMM_MAX_TILES &&
           (size_t)tiles * splits * sk_nt(m) * SK_THREADS * 4 <=
               pie__cuda_wgmm_part_floats(ws->max_grid);
}

extern "C" int pie__cuda_skinny(void *y, int mode, const uint16_t *W, int n,
                                int k, const uint16_t *x, int m, int splits,
                                const pie_cuda_wgmm_ws *ws, int pdl,
                                cudaStream_t s)
{
    if (!pie__cuda_skinny_supported(m, k, W, x) || mode < PIE_CUDA_WGMM_BF16 ||
        mode > PIE_CUDA_WGMM_GLU || !pie__cuda_skinny_room(mode, n, k, m, splits, ws))
        return -1;
    sk_args a = { y, W, x, splits > 1 ? ws->part : NULL,
                  splits > 1 ? ws->cnt : NULL, mode, m, n, k,
                  (k + SK_STEP - 1) / SK_STEP, splits, sk_ld(k, splits) };
    static uint64_t set4, set8;     /* the shared-memory opt-ins, per device */
    if (!(sk_nt(m) == 4 ? allow_smem(skinny_kernel<4>, SK_SMEM, &set4)
                        : allow_smem(skinny_kernel<8>, SK_SMEM, &set8)))
        return -1;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(sk_tiles(mode, n) * splits);
    cfg.blockDim = dim3(SK_THREADS);
    cfg.dynamicSmemBytes = sk_smem(m, k, splits);
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t e = sk_nt(m) == 4 ? cudaLaunchKernelEx(&cfg, skinny_kernel<4>, a)
                                  : cudaLaunchKernelEx(&cfg, skinny_kernel<8>, a);
    if (e == cudaSuccess) return 0;
    cudaGetLastError();
    return -1;
}
