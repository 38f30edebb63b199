/*
 * gemv.cu — a hand-written matmul for decode batches of at most 16 rows,
 * y (m, n) = x (m, k) · W^T with W (n, k) bf16 row-major, x bf16, y f32 or
 * bf16, fp32 accumulation.
 *
 * Why: at m <= 16 a matmul only streams W, and cuBLASLt reaches 1.0–2.4 TB/s
 * there (backend/cuda/NOTES.md, round 3). cuda_backend.c times this kernel
 * against cuBLASLt's candidates for each weight shape when the backend is
 * created and keeps whichever is faster (PIE_CUDA_NO_GEMV=1: cuBLASLt only).
 * pie__cuda_gemv_glu is the fused gate/up matmul with the SwiGLU in its
 * epilogue: a block takes 8 gate rows and the 8 up rows of the same
 * features, so each lane holds both halves of its outputs.
 * pie__cuda_gemv_qkv is the qkv matmul of a decode step with qkv_post
 * (bias, RoPE, q out in f32, K and V into their pages) in its epilogue: a
 * block takes 8 RoPE pairs (i, i + hd/2) of one q or k head, or 16 rows of
 * a v head, so again each lane holds both halves of its pairs.
 *
 * Work split: one block owns 16 output rows; its WARPS warps share the k
 * dimension in steps of GEMV_STEP (warp w takes steps w, w + WARPS, ...)
 * and add their partial sums in shared memory, in a fixed order.
 *
 * Per step each lane loads GEMV_CH adjacent 16-byte chunks (8 bf16 each)
 * of two weight rows and of one x row per column tile, and the warp runs
 * two tensor-core mma.m16n8k16 (bf16 in, f32 accumulate) per chunk and
 * tile: W is the 16x16 A operand, each 8 rows of x (one or two tiles) a
 * 16x8 B operand. A dot product does not care in which order k is visited,
 * so the k index of the fragments is permuted to match the loads: lane
 * (g = lane/4, c = lane%4) holds, per chunk, 8 consecutive k of rows g and
 * g+8 of W and of row g of x; words 0,1 feed the first mma in the slots of
 * logical k 2c,2c+1 / 2c+8,2c+9, words 2,3 the second. No value is
 * converted. The 4 lanes of a row read 4 * GEMV_CH * 16 = 128 contiguous
 * bytes (one L2 line) per step: 64 bytes (GEMV_CH = 1) ran at 2.0-2.7
 * TB/s, 128 at 2.4-3.1. Loads run a round ahead of the multiplies.
 *
 * Rows of x past m repeat row m-1 and are not stored; a column of the
 * product does not depend on the others, so for a given r a row's result
 * does not depend on m (batched and single decode agree bit for bit while
 * the batch stays in one bucket of m, 1..8 or 9..16, each tuned on its
 * own).
 */
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdlib.h>

#include "backend/cuda/kernel_util.cuh"

#define GEMV_ROWS 16               /* output rows per block (mma M)         */
#define GEMV_CH   2                /* 16-byte chunks per lane per row, step */
#define GEMV_STEP (32 * GEMV_CH)   /* k per step                            */

/* What a kernel instance does with its sums (EPI): store them (y), the
 * SwiGLU of gate and up rows (h), or qkv_post (q and the KV pages). */
enum { GV_STORE, GV_GLU, GV_QKV };

/* The shape of a kernel instance: WARPS warps per block splitting k, NT
 * column tiles of 8 rows of x (m <= 8 NT), U steps per load round (two
 * rounds live in registers: U = 2 for one tile, 1 for two). */
template <int WARPS, int NT>
struct gv {
    static constexpr int U = NT == 1 ? 2 : 1;
    static constexpr int N = U * GEMV_CH;           /* chunks per round */
    /* k of chunk i of a round from step s0, for a lane whose chunks
     * start at kc within each step */
    static __device__ __forceinline__ int chunk_k(int s0, int i, int kc)
    {
        return (s0 + (i / GEMV_CH) * WARPS) * GEMV_STEP + kc + (i % GEMV_CH) * 8;
    }
};

/* The weight chunks of a round from step s0 (zeros past k). */
template <int WARPS, int NT>
static __device__ __forceinline__ void load_w(uint4 *A, uint4 *B,
                                              const uint16_t *wa,
                                              const uint16_t *wb, int s0,
                                              int kc, int k)
{
    using G = gv<WARPS, NT>;
#pragma unroll
    for (int i = 0; i < G::N; i++) {
        int kk = G::chunk_k(s0, i, kc);
        A[i] = kk < k ? ld_stream(wa + kk) : make_uint4(0, 0, 0, 0);
        B[i] = kk < k ? ld_stream(wb + kk) : make_uint4(0, 0, 0, 0);
    }
}

/* The x chunks of the same round, tile t at X[t * N + i] (zeros past k). */
template <int WARPS, int NT>
static __device__ __forceinline__ void load_x(uint4 *X,
                                              const uint16_t *const *xr,
                                              int s0, int kc, int k)
{
    using G = gv<WARPS, NT>;
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int i = 0; i < G::N; i++) {
            int kk = G::chunk_k(s0, i, kc);
            /* a plain load: under PDL the kernel before writes x while
             * this grid is resident (these loads follow the wait) */
            X[t * G::N + i] =
                kk < k ? *reinterpret_cast<const uint4 *>(xr[t] + kk)
                       : make_uint4(0, 0, 0, 0);
        }
}

/* d[t] += the round from s0 held in A, B (W) and X. */
template <int WARPS, int NT>
static __device__ __forceinline__ void mma_round(float (*d)[4], const uint4 *A,
                                                 const uint4 *B,
                                                 const uint4 *X, int s0,
                                                 int steps)
{
    using G = gv<WARPS, NT>;
#pragma unroll
    for (int i = 0; i < G::N; i++) {
        if (s0 + (i / GEMV_CH) * WARPS >= steps) break;  /* warp-uniform */
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const uint4 &x = X[t * G::N + i];
            const uint32_t lo[4] = { A[i].x, B[i].x, A[i].y, B[i].y };
            const uint32_t hi[4] = { A[i].z, B[i].z, A[i].w, B[i].w };
            mma16816(d[t], lo, x.x, x.y);
            mma16816(d[t], hi, x.z, x.w);
        }
    }
}

/* GLU blocks: rows g of the fragment are gate rows row0 + g, rows g + 8
 * the up rows of the same features, so lane (g, c) holds gate and up of
 * feature row0 + g for x rows 2c, 2c + 1 of tile t: h = silu(gate) * up,
 * each rounded to bf16 first as gu is in the unfused path. */
static __device__ __forceinline__ void store_glu(uint16_t *h, int hid, int m,
                                                 int row0, int t, int g,
                                                 int c, const float *d)
{
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int row = row0 + g, col = 8 * t + 2 * c + i;
        if (row >= hid || col >= m) continue;
        h[(size_t)col * hid + row] =
            f2bf(pie_silu_mul(bf16_round(d[i]), bf16_round(d[2 + i])));
    }
}

/* QKV: lane (g, c) holds rows ra (d[i]) and rb (d[2 + i]) of x rows
 * (tokens) 8t + 2c + i of tile t. As qkv_post reads them from the bf16
 * qkv buffer: rounded to bf16, plus the bias; for a q or k head, rotated
 * as the RoPE pair (ra, rb); q out in f32, K and V into the token's slot
 * of its page (a head's K rows, then 0.. n_kv V heads at the same stride). */
static __device__ __forceinline__ void store_qkv(const pie_cuda_qkv_epi &e,
                                                 int ra, int rb, int m, int t,
                                                 int c, const float *d)
{
    const pie_cuda_kv &kv = e.kv;
    const pie_cuda_tokmeta &tm = e.tm;
    int hd = kv.head_dim, ps = kv.page_size, h = ra / hd;
    int ia = ra - h * hd, ib = rb - h * hd, rope = h < e.nh + kv.n_kv;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int tok = 8 * t + 2 * c + i;
        if (tok >= m) continue;
        float x0 = bf16_round(d[i]), x1 = bf16_round(d[2 + i]);
        if (rope) {
            if (e.bias) {
                x0 += e.bias[ra];
                x1 += e.bias[rb];
            }
            float sn, cs;
            sincosf((float)tm.positions[tok] * e.inv_freq[ia], &sn, &cs);
            float2 y = pie_rope(x0, x1, cs, sn);
            x0 = y.x;
            x1 = y.y;
        } else {                    /* (qkv_post adds 0 where no bias) */
            x0 += e.bias ? e.bias[ra] : 0.0f;
            x1 += e.bias ? e.bias[rb] : 0.0f;
        }
        if (h < e.nh) {
            float *qd = e.q + ((int64_t)tok * e.nh + h) * hd;
            qd[ia] = x0;
            qd[ib] = x1;
            continue;
        }
        int slot = tm.tok_slot[tok], req = tm.tok_req[tok];
        int page = tm.pages[tm.kv_indptr[req] + slot / ps], off = slot % ps;
        uint16_t *kvd = kv.pool + page * pie_cuda_kv_page_elems(&kv) +
                        pie_cuda_kv_k_off(&kv, e.layer, 0) +
                        ((int64_t)(h - e.nh) * ps + off) * hd;
        kvd[ia] = f2bf(x0);
        kvd[ib] = f2bf(x1);
    }
}

/* The weight rows of block b's fragment rows g (ra) and g + 8 (rb). */
template <int EPI>
static __device__ __forceinline__ void gv_rows(int &ra, int &rb, int b, int g,
                                               int n,
                                               const pie_cuda_qkv_epi &e)
{
    if (EPI == GV_GLU) {            /* 8 features: gate rows, up rows */
        ra = min(b * (GEMV_ROWS / 2) + g, n - 1);
        rb = n + ra;
    } else if (EPI == GV_QKV) {     /* n = (nh + 2 n_kv) hd, hd % 16 == 0 */
        int hd = e.kv.head_dim, per = hd / 16, h = b / per, j = b % per;
        ra = h * hd + (h < e.nh + e.kv.n_kv ? 8 * j + g : 16 * j + g);
        rb = ra + (h < e.nh + e.kv.n_kv ? hd / 2 : 8);
    } else {
        ra = min(b * GEMV_ROWS + g, n - 1);
        rb = min(b * GEMV_ROWS + g + 8, n - 1);
    }
}

/* Writes the 16 x 8 block of tile t of y from the C fragment of lane
 * (g, c); y_f32 = 2 adds it to y (f32). */
static __device__ __forceinline__ void store_c(void *y, int y_f32, int n,
                                               int m, int row0, int t, int g,
                                               int c, const float *d)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = row0 + g + (i / 2) * 8, col = 8 * t + 2 * c + i % 2;
        if (row >= n || col >= m) continue;
        size_t at = (size_t)col * n + row;
        if (y_f32 == 2) static_cast<float *>(y)[at] += d[i];
        else if (y_f32) static_cast<float *>(y)[at] = d[i];
        else static_cast<uint16_t *>(y)[at] = f2bf(d[i]);
    }
}

/* GLU: W is (2n, k), gate rows then up rows, and y the (m, n) bf16 SwiGLU
 * of the two halves (a block owns 8 features: their gate and up rows).
 * QKV: e says where the outputs go (y unused). */
template <int WARPS, int NT, int EPI>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)
gemv_kernel(void *y, int y_f32, const uint16_t *W, const uint16_t *x, int n,
            int k, int m, const pie_cuda_qkv_epi e)
{
    using G = gv<WARPS, NT>;
    __shared__ float red[WARPS > 1 ? WARPS : 1][32 * 4 * NT];
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    int g = lane / 4, c = lane % 4, kc = 8 * GEMV_CH * c;
    int row0 = blockIdx.x * (EPI == GV_GLU ? GEMV_ROWS / 2 : GEMV_ROWS);
    int ra, rb;
    gv_rows<EPI>(ra, rb, blockIdx.x, g, n, e);
    const uint16_t *wa = W + (size_t)ra * k, *wb = W + (size_t)rb * k;
    const uint16_t *xr[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) xr[t] = x + (size_t)min(8 * t + g, m - 1) * k;
    int steps = (k + GEMV_STEP - 1) / GEMV_STEP;
    float d[NT][4] = {};
    /* Two rounds of loads in flight: round i+1 is issued before round i
     * is multiplied. The weights do not depend on the kernel before (which
     * writes x): under programmatic dependent launch the first two rounds
     * of them are issued while it finishes, and only then does the grid
     * wait for it (two rounds rather than one: 1B batch-1 steps 1.1%
     * faster; NOTES.md, round 10). */
    uint4 A0[G::N], B0[G::N], X0[NT * G::N], A1[G::N], B1[G::N], X1[NT * G::N];
    const int R = G::U * WARPS;                     /* steps per round */
    asm volatile("griddepcontrol.launch_dependents;");
    load_w<WARPS, NT>(A0, B0, wa, wb, w, kc, k);
    if (w + R < steps) load_w<WARPS, NT>(A1, B1, wa, wb, w + R, kc, k);
    asm volatile("griddepcontrol.wait;" ::: "memory");
    load_x<WARPS, NT>(X0, xr, w, kc, k);
    if (w + R < steps) load_x<WARPS, NT>(X1, xr, w + R, kc, k);
    for (int s0 = w; s0 < steps; s0 += 2 * R) {
        if (s0 != w && s0 + R < steps) {    /* (the first: loaded above) */
            load_w<WARPS, NT>(A1, B1, wa, wb, s0 + R, kc, k);
            load_x<WARPS, NT>(X1, xr, s0 + R, kc, k);
        }
        mma_round<WARPS, NT>(d, A0, B0, X0, s0, steps);
        if (s0 + 2 * R < steps) {
            load_w<WARPS, NT>(A0, B0, wa, wb, s0 + 2 * R, kc, k);
            load_x<WARPS, NT>(X0, xr, s0 + 2 * R, kc, k);
        }
        if (s0 + R < steps) mma_round<WARPS, NT>(d, A1, B1, X1, s0 + R, steps);
    }
    if (WARPS > 1) {
        float *r = red[w] + lane * 4 * NT;
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) r[t * 4 + i] = d[t][i];
        __syncthreads();
        if (w != 0) return;
        for (int v = 1; v < WARPS; v++)
#pragma unroll
            for (int t = 0; t < NT; t++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    d[t][i] += red[v][lane * 4 * NT + t * 4 + i];
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (EPI == GV_GLU)
            store_glu(static_cast<uint16_t *>(y), n, m, row0, t, g, c, d[t]);
        else if (EPI == GV_QKV)
            store_qkv(e, ra, rb, m, t, c, d[t]);
        else
            store_c(y, y_f32, n, m, row0, t, g, c, d[t]);
    }
}

/* The shared-memory carveout of a launch at m rows of x (percent of the
 * SM's unified L1 and shared memory; -1 leaves it to the driver). At m <= 4
 * the kernel asks for half: the configuration the decode attention kernel
 * of a small batch takes anyway (its padded block, dec_pad_smem(1), is half
 * an SM's shared memory), so an SM going from one kernel to the other may
 * keep its configuration. Measured on the H100, alternating in one call
 * (NOTES.md, round 20): 1B steps at batch 1 2.5% faster (three calls),
 * batch 4 2%, 8B batch 1 and 4 within the noise; at batch 8 and 16 the
 * same setting was 2-3% slower, and every kernel of a step at 0% or 100%
 * made 8B batch 1 7-10% slower. PIE_CUDA_GEMV_CARVEOUT=p (0..100) asks
 * for p at every launch (-1: the driver's choice). */
static int gemv_carveout(int m)
{
    int env = pie__cuda_carveout(PIE_CUDA_CARVE_GEMV);
    return env != -2 ? env : m <= 4 ? 50 : -1;
}

/* pdl: launched as a programmatic dependent of the stream's previous
 * kernel (which lets it start early: see pdl_begin in kernel_util.cuh). */
template <int WARPS, int NT, int EPI>
static int gemv_launch(void *y, int y_f32, const uint16_t *W, int n, int k,
                       const uint16_t *x, int m, const pie_cuda_qkv_epi &e,
                       int pdl, cudaStream_t s)
{
    int rows = EPI == GV_GLU ? GEMV_ROWS / 2 : GEMV_ROWS;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[2];
    unsigned na = 0;
    if (pdl) {
        at[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    int carve = gemv_carveout(m);
    if (carve >= 0) {
        at[na].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
        at[na++].val.sharedMemCarveout = (unsigned)carve;
    }
    cfg.gridDim = dim3((n + rows - 1) / rows);
    cfg.blockDim = dim3(WARPS * 32);
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = na;
    if (cudaLaunchKernelEx(&cfg, gemv_kernel<WARPS, NT, EPI>, y, y_f32, W, x,
                           n, k, m, e) == cudaSuccess)
        return 0;
    cudaGetLastError();
    return -1;
}

template <int NT, int EPI>
static int gemv_warps(void *y, int y_f32, const uint16_t *W, int n, int k,
                      const uint16_t *x, int m, const pie_cuda_qkv_epi &e,
                      int r, int pdl, cudaStream_t s)
{
    switch (r) {
    case 1: return gemv_launch<1, NT, EPI>(y, y_f32, W, n, k, x, m, e, pdl, s);
    case 2: return gemv_launch<2, NT, EPI>(y, y_f32, W, n, k, x, m, e, pdl, s);
    case 4: return gemv_launch<4, NT, EPI>(y, y_f32, W, n, k, x, m, e, pdl, s);
    case 8: return gemv_launch<8, NT, EPI>(y, y_f32, W, n, k, x, m, e, pdl, s);
    default: return -1;
    }
}

/* The NT = 1 (m <= 8) or 2 build of gemv_warps. */
template <int EPI>
static int gemv_tiles(void *y, int y_f32, const uint16_t *W, int n, int k,
                      const uint16_t *x, int m, const pie_cuda_qkv_epi &e,
                      int r, int pdl, cudaStream_t s)
{
    return m <= 8 ? gemv_warps<1, EPI>(y, y_f32, W, n, k, x, m, e, r, pdl, s)
                  : gemv_warps<2, EPI>(y, y_f32, W, n, k, x, m, e, r, pdl, s);
}

extern "C" int pie__cuda_gemv_supported(int m, int k, const void *W,
                                        const void *x)
{
    return m >= 1 && m <= PIE_CUDA_GEMV_MAX_M && k > 0 && k % 8 == 0 &&
           (uintptr_t)W % 16 == 0 && (uintptr_t)x % 16 == 0;
}

extern "C" int pie__cuda_gemv(void *y, int y_f32, const uint16_t *W, int n,
                              int k, const uint16_t *x, int m, int r,
                              int pdl, cudaStream_t s)
{
    if (!pie__cuda_gemv_supported(m, k, W, x) || n <= 0) return -1;
    return gemv_tiles<GV_STORE>(y, y_f32, W, n, k, x, m, pie_cuda_qkv_epi{},
                                r, pdl, s);
}

extern "C" int pie__cuda_gemv_glu(uint16_t *h, const uint16_t *Wgu, int hid,
                                  int k, const uint16_t *x, int m, int r,
                                  int pdl, cudaStream_t s)
{
    if (!pie__cuda_gemv_supported(m, k, Wgu, x) || hid <= 0) return -1;
    return gemv_tiles<GV_GLU>(h, 0, Wgu, hid, k, x, m, pie_cuda_qkv_epi{}, r,
                              pdl, s);
}

extern "C" int pie__cuda_gemv_qkv(const pie_cuda_qkv_epi *e,
                                  const uint16_t *Wqkv, int k,
                                  const uint16_t *x, int m, int r, int pdl,
                                  cudaStream_t s)
{
    int hd = e->kv.head_dim, n = (e->nh + 2 * e->kv.n_kv) * hd;
    if (!pie__cuda_gemv_supported(m, k, Wqkv, x) || hd <= 0 || hd % 16 ||
        e->nh <= 0 || e->kv.n_kv <= 0)
        return -1;
    return gemv_tiles<GV_QKV>(NULL, 0, Wqkv, n, k, x, m, *e, r, pdl, s);
}
