/*
 * mega.cu — every layer of a batch-1 decode step in one persistent kernel.
 *
 * Why: at batch 1 a step only streams the weights, but as ~9 kernels a
 * layer it loses 15-25 us a layer to kernel starts and tails and to DRAM
 * idling while the small kernels between the matmuls (RoPE, attention,
 * merge) run (NOTES.md, rounds 9-10). Here one grid of one block per SM,
 * all resident (a cooperative launch), runs the layers' phases back to
 * back, separated by grid barriers, and each warp issues its first weight
 * loads of the next phase before it waits at the barrier, so DRAM keeps
 * streaming across phase boundaries.
 *
 * Phases of layer l (barrier k of the step ends phase k; a phase waits
 * for the one before it):
 *   1 qkv    every block normalizes x itself (RMSNorm into shared memory),
 *            then qkv = xb . Wqkv^T (+ bias), rounded to bf16 as in the
 *            unfused path, into a f32 scratch
 *   2 attn   block b < nkv * S takes kv head b / S, split b % S of the
 *            context (S = splits, from the context length; its page
 *            numbers staged before the barrier): RoPE of its G query heads
 *            (and, in the split holding the new slot, of the new K,
 *            appended with V to its page), one pass over K and V with an
 *            online softmax per warp, the warps combined into a partial;
 *            the last split of a head to finish (an atomic count) merges
 *            the partials into att (bf16 values as f32)
 *   3 wo     x += att . Wo^T
 *   4 gate/up  RMSNorm of x again, h = silu(gate) * up (bf16 values)
 *   5 down   x += h . Wdown^T
 *
 * Matmuls: a unit is two weight rows (for gate/up, the gate and up rows
 * of one feature); units go round-robin to blocks, then to warps. A warp
 * computes a unit's two dot products on CUDA cores: per batch each lane
 * loads 4 chunks of 8 bf16 (16 bytes) of each row, two batches in flight,
 * against x in shared memory, then the warp sums. At batch 1 the
 * arithmetic is far below what CUDA cores do in the time the bytes take.
 *
 * Data written by one block and read by others inside the kernel (x, qkv,
 * att, h, partials) is read with ld.global.cg (L2), never through L1,
 * which is not coherent across SMs. The barrier is a counter zeroed
 * before each launch: arrive = block barrier, fence, atomic add; wait =
 * one thread spins (ld.acquire.gpu) until the counter reaches k * blocks.
 */
#include <cuda_bf16.h>
#include <stdint.h>

#include "backend/cuda/kernel_util.cuh"

#define MEGA_THREADS 384   /* 12 warps: 167 registers, no spills (512: 128
                              * registers, which spilled) */
#define MEGA_WARPS (MEGA_THREADS / WARP)
#define MEGA_CH 4          /* 16-byte chunks a lane loads per row, batch */
#define MEGA_PHASES 5      /* barriers per layer */
#define MEGA_U 4           /* slots a warp handles at once in attention */

/* the softmax takes one warp per query head of a kv head */
static_assert(PIE_CUDA_MEGA_GMAX <= MEGA_WARPS, "a warp per query head");

/* ------------------------------------------------------------ helpers */

static __device__ __forceinline__ uint32_t ld_kv(const uint16_t *p)
{
    return __ldcg(reinterpret_cast<const unsigned int *>(p));
}

static __device__ void bar_arrive(unsigned *bar)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(bar, 1u);
    }
}

static __device__ void bar_wait(const unsigned *bar, unsigned target)
{
    if (threadIdx.x == 0 && target > 0) {
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                         : "=r"(v) : "l"(bar) : "memory");
        } while (v < target);
        __threadfence();
    }
    __syncthreads();
}

/* Which barrier ends phase p (1..MEGA_PHASES) of layer l, times blocks. */
static __device__ __forceinline__ unsigned bar_at(int l, int p)
{
    return (unsigned)(l * MEGA_PHASES + p) * gridDim.x;
}

/* dot of 8 bf16 (one chunk) with 8 floats of x in shared memory */
static __device__ __forceinline__ float dot8(uint4 w, const float *xs)
{
    float4 a = *reinterpret_cast<const float4 *>(xs);
    float4 b = *reinterpret_cast<const float4 *>(xs + 4);
    return __uint_as_float(w.x << 16) * a.x + __uint_as_float(w.x & 0xffff0000u) * a.y +
           __uint_as_float(w.y << 16) * a.z + __uint_as_float(w.y & 0xffff0000u) * a.w +
           __uint_as_float(w.z << 16) * b.x + __uint_as_float(w.z & 0xffff0000u) * b.y +
           __uint_as_float(w.w << 16) * b.z + __uint_as_float(w.w & 0xffff0000u) * b.w;
}

/* ------------------------------------------------------------ matmuls */

/* The two weight rows of unit u: rows 2u, 2u + 1 of an n-row matrix, or
 * (glu) the gate row u and the up row n + u of the feature u. */
struct mm_rows {
    int n, glu;
    __device__ __forceinline__ int units() const { return glu ? n : (n + 1) / 2; }
    __device__ __forceinline__ int ra(int u) const { return glu ? u : 2 * u; }
    __device__ __forceinline__ int rb(int u) const
    {
        return glu ? n + u : min(2 * u + 1, n - 1);
    }
};

/* A warp's units: u = block + blocks * (warp + warps * i). */
static __device__ __forceinline__ int unit_of(int i)
{
    return blockIdx.x + gridDim.x * (threadIdx.x / WARP + MEGA_WARPS * i);
}

/* One batch of a unit: chunks c = 128 b + lane + 32 j of both rows. */
struct mm_batch {
    uint4 a[MEGA_CH], b[MEGA_CH];

    __device__ __forceinline__ void load(const uint16_t *W, int k, int ra,
                                         int rb, int bi)
    {
        int lane = threadIdx.x % WARP, nc = k / 8;
        const uint16_t *pa = W + (int64_t)ra * k, *pb = W + (int64_t)rb * k;
#pragma unroll
        for (int j = 0; j < MEGA_CH; j++) {
            int c = bi * WARP * MEGA_CH + lane + WARP * j;
            a[j] = c < nc ? ld_stream(pa + 8 * c) : make_uint4(0, 0, 0, 0);
            b[j] = c < nc ? ld_stream(pb + 8 * c) : make_uint4(0, 0, 0, 0);
        }
    }

    __device__ __forceinline__ void mul(const float *xs, int k, int bi,
                                        float &da, float &db) const
    {
        int lane = threadIdx.x % WARP, nc = k / 8;
#pragma unroll
        for (int j = 0; j < MEGA_CH; j++) {
            int c = bi * WARP * MEGA_CH + lane + WARP * j;
            if (c < nc) {
                da += dot8(a[j], xs + 8 * c);
                db += dot8(b[j], xs + 8 * c);
            }
        }
    }
};

/* A warp's stream through one matmul: its units' batches in order
 * (q = unit index * nb + batch), two batches in flight: batch q + 2 is
 * issued as soon as batch q has been multiplied. start() issues the first
 * two before the phase's barrier (the weights do not depend on it); run()
 * multiplies against xs (k floats in shared memory), calling out(u, da,
 * db) on lane 0 at the end of each unit. */
struct mm_stream {
    mm_batch b0, b1;
    const uint16_t *W;
    int k, nb, nq;
    mm_rows r;

    __device__ __forceinline__ void load(mm_batch &bt, int q)
    {
        int u = unit_of(q / nb);
        bt.load(W, k, r.ra(u), r.rb(u), q % nb);
    }

    __device__ __forceinline__ void start(const uint16_t *W_, int k_, mm_rows r_)
    {
        W = W_; k = k_; r = r_;
        nb = (k / 8 + WARP * MEGA_CH - 1) / (WARP * MEGA_CH);
        int nu = 0;
        while (unit_of(nu) < r.units()) nu++;
        nq = nu * nb;
        if (nq > 0) load(b0, 0);
        if (nq > 1) load(b1, 1);
    }

    template <typename Out>
    __device__ __forceinline__ void step(mm_batch &bt, int q, const float *xs,
                                         float &da, float &db, Out &out)
    {
        bt.mul(xs, k, q % nb, da, db);
        if (q + 2 < nq) load(bt, q + 2);
        if (q % nb == nb - 1) {
            da = warp_sum(da);
            db = warp_sum(db);
            if (threadIdx.x % WARP == 0) out(unit_of(q / nb), da, db);
            da = db = 0.0f;
        }
    }

    template <typename Out>
    __device__ __forceinline__ void run(const float *xs, Out out)
    {
        float da = 0.0f, db = 0.0f;
        for (int q = 0; q < nq; q += 2) {
            step(b0, q, xs, da, db, out);
            if (q + 1 < nq) step(b1, q + 1, xs, da, db, out);
        }
    }
};

/* xs = src (n floats, n % 4 == 0, written by other blocks) in float4
 * loads, MEGA_F4 a thread in flight at once; returns the thread's sum of
 * squares of what it copied. No barrier. */
#define MEGA_F4 8
static __device__ float copy_sq(float *xs, const float *src, int n)
{
    float ss = 0.0f;
    float4 *x4 = reinterpret_cast<float4 *>(xs);
    const float4 *s4 = reinterpret_cast<const float4 *>(src);
    for (int i0 = 0; i0 < n / 4; i0 += MEGA_THREADS * MEGA_F4) {
        float4 v[MEGA_F4];
#pragma unroll
        for (int j = 0; j < MEGA_F4; j++) {
            int i = i0 + threadIdx.x + MEGA_THREADS * j;
            v[j] = i < n / 4 ? __ldcg(s4 + i) : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < MEGA_F4; j++) {
            int i = i0 + threadIdx.x + MEGA_THREADS * j;
            if (i < n / 4) x4[i] = v[j];
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
    }
    return ss;
}

static __device__ void copy_into(float *xs, const float *src, int n)
{
    copy_sq(xs, src, n);
    __syncthreads();
}

/* xs = bf16(rmsnorm(x) * w), as rmsnorm_vec_kernel rounds it. */
static __device__ void norm_into(float *xs, const float *x, const float *w,
                                 int dim, float eps, float *red)
{
    float ss = warp_sum(copy_sq(xs, x, dim));
    if (threadIdx.x % WARP == 0) red[threadIdx.x / WARP] = ss;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < MEGA_WARPS; i++) t += red[i];
    float r = rsqrtf(t / dim + eps);
    for (int i = threadIdx.x; i < dim; i += MEGA_THREADS)
        xs[i] = bf16_round(xs[i] * r * w[i]);
    __syncthreads();
}

/* ---------------------------------------------------------- attention */

/* This block's share of phase 2: kv head h, split s of S, slots [lo, hi)
 * (active = 0: none), whose pages are staged in shared memory. */
struct att_job {
    int active, S, h, s, lo, hi, p0;
};

/* Shared memory of the attention phase (floats): q (G x hd), each warp's
 * softmax state (warps x G x (hd + 2): o, then m and l), the split's page
 * numbers (ints). */
static __device__ __forceinline__ float *att_ws(float *sm, int G, int hd)
{
    return sm + G * hd;
}

static __device__ __forceinline__ int32_t *att_pg(float *sm, int G, int hd)
{
    return reinterpret_cast<int32_t *>(sm + G * hd + MEGA_WARPS * G * (hd + 2));
}

/* Picks this block's split and stages its page numbers: before the
 * phase's barrier (the step's metadata does not depend on it; the shared
 * memory is free once the block has arrived). */
static __device__ att_job att_prepare(const pie_cuda_mega_args &a, float *sm)
{
    att_job j = { 0 };
    int nkv = a.nkv, G = a.nh / nkv, ps = a.kv.page_size;
    int L = a.tm.kv_len[0];
    j.S = pie_cuda_mega_splits(L, a.smax, a.split_slots);
    if ((int)blockIdx.x >= nkv * j.S) return j;
    j.active = 1;
    j.h = blockIdx.x / j.S;
    j.s = blockIdx.x % j.S;
    j.lo = (int)((int64_t)L * j.s / j.S);
    j.hi = (int)((int64_t)L * (j.s + 1) / j.S);
    j.p0 = j.lo / ps;
    const int32_t *pages = a.tm.pages + a.tm.kv_indptr[0];
    int32_t *pg = att_pg(sm, G, a.hd);
    for (int i = threadIdx.x; i <= (j.hi - 1) / ps - j.p0; i += MEGA_THREADS)
        pg[i] = pages[j.p0 + i];
    return j;
}

/* Where slot t lies (K; V is pie_cuda_kv_voff further): koff, the kv
 * head's offset within a page (pie_cuda_kv_k_off), pg the split's pages
 * from page p0. */
static __device__ __forceinline__ uint16_t *kv_row(const pie_cuda_mega_args &a,
                                                   const int32_t *pg, int p0,
                                                   int64_t koff, int t)
{
    const pie_cuda_kv &kv = a.kv;
    int ps = kv.page_size;
    return kv.pool + (int64_t)pg[t / ps - p0] * pie_cuda_kv_page_elems(&kv) +
           koff + (int64_t)(t % ps) * kv.head_dim;
}

/* RoPE (half-split pairs i, i + hd/2) of the f32 head src into dst. */
static __device__ void rope_into(float *dst, const float *src, int hd,
                                 float pos, const float *inv_freq)
{
    int half = hd / 2;
    for (int i = threadIdx.x; i < half; i += MEGA_THREADS) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float x0 = __ldcg(src + i), x1 = __ldcg(src + i + half);
        dst[i] = x0 * c - x1 * s;
        dst[i + half] = x1 * c + x0 * s;
    }
}

/* Appends the new slot's K (RoPE, bf16) and V of the job's kv head, tmp
 * (hd floats of shared memory) for the rotated K. */
static __device__ void append_kv(const pie_cuda_mega_args &a, const att_job &j,
                                 const int32_t *pg, int l, float pos, float *tmp)
{
    int hd = a.hd, nh = a.nh, nkv = a.nkv;
    uint16_t *k = kv_row(a, pg, j.p0, pie_cuda_kv_k_off(&a.kv, l, j.h), j.hi - 1);
    uint16_t *v = k + pie_cuda_kv_voff(&a.kv);
    rope_into(tmp, a.qkv + (nh + j.h) * hd, hd, pos, a.inv_freq);
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += MEGA_THREADS) {
        k[d] = f2bf(tmp[d]);
        v[d] = f2bf(__ldcg(a.qkv + (nh + nkv + j.h) * hd + d));
    }
    __threadfence_block();
    __syncthreads();
}

/* One pass over K and V: warp w takes MEGA_U slots at a time (K and V
 * loaded together), lanes split the head dim in pairs (2 lane + 64 p),
 * an online softmax per query head in registers (base 2: the scale holds
 * log2 e); the warp's state then goes to ws[w][g] = (o[hd], m, l). */
template <int P>
static __device__ void att_pass(const pie_cuda_mega_args &a, const att_job &j,
                                const float *q, float *ws, const int32_t *pg,
                                int l, int G, float scale)
{
    int hd = a.hd, lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    int64_t voff = pie_cuda_kv_voff(&a.kv), koff = pie_cuda_kv_k_off(&a.kv, l, j.h);
    float acc[PIE_CUDA_MEGA_GMAX][P][2] = {}, m[PIE_CUDA_MEGA_GMAX],
          sum[PIE_CUDA_MEGA_GMAX];
#pragma unroll
    for (int g = 0; g < PIE_CUDA_MEGA_GMAX; g++) { m[g] = -INFINITY; sum[g] = 0.0f; }
    for (int t0 = j.lo + w * MEGA_U; t0 < j.hi; t0 += MEGA_WARPS * MEGA_U) {
        uint32_t kk[MEGA_U][P], vv[MEGA_U][P];
#pragma unroll
        for (int u = 0; u < MEGA_U; u++) {
            const uint16_t *kr = t0 + u < j.hi ? kv_row(a, pg, j.p0, koff, t0 + u) : NULL;
#pragma unroll
            for (int p = 0; p < P; p++) {
                int d = 2 * lane + 64 * p;
                kk[u][p] = kr && d < hd ? ld_kv(kr + d) : 0u;
                vv[u][p] = kr && d < hd ? ld_kv(kr + voff + d) : 0u;
            }
        }
#pragma unroll
        for (int g = 0; g < PIE_CUDA_MEGA_GMAX; g++) {
            if (g >= G) break;
            const float *qg = q + g * hd;
            float sc[MEGA_U], mx = m[g];
#pragma unroll
            for (int u = 0; u < MEGA_U; u++) {
                float d_ = 0.0f;
#pragma unroll
                for (int p = 0; p < P; p++) {
                    int d = 2 * lane + 64 * p;
                    if (d < hd)
                        d_ += qg[d] * __uint_as_float(kk[u][p] << 16) +
                              qg[d + 1] * __uint_as_float(kk[u][p] & 0xffff0000u);
                }
                sc[u] = t0 + u < j.hi ? warp_sum(d_) * scale : -INFINITY;
                mx = fmaxf(mx, sc[u]);
            }
            float f = exp2f(m[g] - mx);     /* 0 while m[g] is -inf */
            sum[g] *= f;
#pragma unroll
            for (int p = 0; p < P; p++) { acc[g][p][0] *= f; acc[g][p][1] *= f; }
#pragma unroll
            for (int u = 0; u < MEGA_U; u++) {
                float pu = exp2f(sc[u] - mx);
                sum[g] += pu;
#pragma unroll
                for (int p = 0; p < P; p++) {
                    acc[g][p][0] += pu * __uint_as_float(vv[u][p] << 16);
                    acc[g][p][1] += pu * __uint_as_float(vv[u][p] & 0xffff0000u);
                }
            }
            m[g] = mx;
        }
    }
#pragma unroll
    for (int g = 0; g < PIE_CUDA_MEGA_GMAX; g++) {
        if (g >= G) break;
        float *st = ws + (w * G + g) * (hd + 2);
#pragma unroll
        for (int p = 0; p < P; p++) {
            int d = 2 * lane + 64 * p;
            if (d < hd) { st[d] = acc[g][p][0]; st[d + 1] = acc[g][p][1]; }
        }
        if (lane == 0) { st[hd] = m[g]; st[hd + 1] = sum[g]; }
    }
    __syncthreads();
}

/* Combines the warps' states into the split's partial (o, m, l). */
static __device__ void att_partial(const pie_cuda_mega_args &a, const att_job &j,
                                   const float *ws, int G)
{
    int hd = a.hd;
    int64_t base = (int64_t)(j.h * a.smax + j.s) * G;
    for (int e = threadIdx.x; e < G * hd; e += MEGA_THREADS) {
        int g = e / hd, d = e % hd;
        float M = -INFINITY;
        for (int w = 0; w < MEGA_WARPS; w++) M = fmaxf(M, ws[(w * G + g) * (hd + 2) + hd]);
        float o = 0.0f, den = 0.0f;
        for (int w = 0; w < MEGA_WARPS; w++) {
            const float *st = ws + (w * G + g) * (hd + 2);
            float f = st[hd] == -INFINITY ? 0.0f : exp2f(st[hd] - M);
            o += f * st[d];
            den += f * st[hd + 1];
        }
        a.part_o[base * hd + e] = o;
        if (d == 0) {
            a.part_ml[(base + g) * 2] = M;
            a.part_ml[(base + g) * 2 + 1] = den;
        }
    }
}

/* The last split of kv head h to finish merges the S partials into att. */
static __device__ void att_merge(const pie_cuda_mega_args &a, int h, int S,
                                 int G, int *last)
{
    int hd = a.hd;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        *last = atomicAdd(a.bar + 1 + h, 1u) == (unsigned)S - 1;
    }
    __syncthreads();
    if (!*last) return;
    __threadfence();
    for (int e = threadIdx.x; e < G * hd; e += MEGA_THREADS) {
        int g = e / hd, d = e % hd;
        float M = -INFINITY;
        for (int s = 0; s < S; s++)
            M = fmaxf(M, __ldcg(a.part_ml + ((h * a.smax + s) * G + g) * 2));
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < S; s++) {
            const float *ml = a.part_ml + ((h * a.smax + s) * G + g) * 2;
            float f = exp2f(__ldcg(ml) - M);
            den += f * __ldcg(ml + 1);
            num += f * __ldcg(a.part_o + ((int64_t)(h * a.smax + s) * G + g) * hd + d);
        }
        a.att[(h * G + g) * hd + d] = bf16_round(num / den);
    }
    if (threadIdx.x == 0) a.bar[1 + h] = 0;
}

/* Phase 2 for this block (after its barrier): RoPE of its query heads,
 * the new slot's K and V where its split holds it, one pass, partial,
 * merge. */
static __device__ void att_run(const pie_cuda_mega_args &a, const att_job &j,
                               float *sm, int l, float *red)
{
    if (!j.active) return;
    int hd = a.hd, G = a.nh / a.nkv;
    float pos = (float)a.tm.positions[0];
    float *q = sm, *ws = att_ws(sm, G, hd);
    const int32_t *pg = att_pg(sm, G, hd);
    for (int g = 0; g < G; g++)
        rope_into(q + g * hd, a.qkv + (j.h * G + g) * hd, hd, pos, a.inv_freq);
    if (j.hi == a.tm.kv_len[0])     /* the new slot is L - 1 (decode) */
        append_kv(a, j, pg, l, pos, ws);
    __syncthreads();
    float scale = rsqrtf((float)hd) * 1.4426950408889634f;
    if (hd <= 64) att_pass<1>(a, j, q, ws, pg, l, G, scale);
    else att_pass<2>(a, j, q, ws, pg, l, G, scale);
    att_partial(a, j, ws, G);
    att_merge(a, j.h, j.S, G, reinterpret_cast<int *>(red + 2 * PIE_CUDA_MEGA_GMAX));
}

/* ------------------------------------------------------------- kernel */

__global__ void __launch_bounds__(MEGA_THREADS, 1)
mega_kernel(pie_cuda_mega_args a)
{
    extern __shared__ __align__(16) float sm[];
    __shared__ float red[MEGA_WARPS + 2 * PIE_CUDA_MEGA_GMAX + 4];
    int dim = a.dim, qd = a.nh * a.hd, qkvd = qd + 2 * a.nkv * a.hd;
    float *x = a.x, *qkv = a.qkv;
    for (int l = 0; l < a.n_layers; l++) {
        const pie_cuda_mega_layer L = a.layers[l];
        mm_stream ms;
        /* 1: qkv */
        mm_rows rq = { qkvd, 0 };
        ms.start(L.wqkv, dim, rq);
        bar_wait(a.bar, l ? bar_at(l - 1, MEGA_PHASES) : 0);
        norm_into(sm, x, L.attn_norm, dim, a.eps, red);
        const float *bq = L.bqkv;
        ms.run(sm, [&](int u, float da, float db) {
            int ra = rq.ra(u), rb = rq.rb(u);
            qkv[ra] = bf16_round(da) + (bq ? bq[ra] : 0.0f);
            if (rb != ra) qkv[rb] = bf16_round(db) + (bq ? bq[rb] : 0.0f);
        });
        bar_arrive(a.bar);
        /* 2: attention */
        att_job job = att_prepare(a, sm);
        bar_wait(a.bar, bar_at(l, 1));
        att_run(a, job, sm, l, red);
        bar_arrive(a.bar);
        /* 3: wo, into the residual */
        mm_rows ro = { dim, 0 };
        ms.start(L.wo, qd, ro);
        bar_wait(a.bar, bar_at(l, 2));
        copy_into(sm, a.att, qd);
        ms.run(sm, [&](int u, float da, float db) {
            int ra = ro.ra(u), rb = ro.rb(u);
            x[ra] = __ldcg(x + ra) + da;
            if (rb != ra) x[rb] = __ldcg(x + rb) + db;
        });
        bar_arrive(a.bar);
        /* 4: gate/up and SwiGLU */
        mm_rows rg = { a.hid, 1 };
        ms.start(L.wgu, dim, rg);
        bar_wait(a.bar, bar_at(l, 3));
        norm_into(sm, x, L.ffn_norm, dim, a.eps, red);
        float *hb = a.h;
        ms.run(sm, [&](int u, float da, float db) {
            hb[u] = bf16_round(pie_silu_mul(bf16_round(da), bf16_round(db)));
        });
        bar_arrive(a.bar);
        /* 5: down, into the residual */
        mm_rows rd = { dim, 0 };
        ms.start(L.wdown, a.hid, rd);
        bar_wait(a.bar, bar_at(l, 4));
        copy_into(sm, a.h, a.hid);
        ms.run(sm, [&](int u, float da, float db) {
            int ra = rd.ra(u), rb = rd.rb(u);
            x[ra] = __ldcg(x + ra) + da;
            if (rb != ra) x[rb] = __ldcg(x + rb) + db;
        });
        bar_arrive(a.bar);
    }
}

/* ------------------------------------------------------------- launch */

/* Dynamic shared memory: the largest of x for a matmul (dim, nh * hd or
 * hidden floats) and the attention phase's buffers. */
static size_t mega_smem(const pie_cuda_mega_args *a)
{
    int G = a->nh / a->nkv, hd = a->hd;
    size_t xs = a->dim;
    if ((size_t)a->nh * hd > xs) xs = (size_t)a->nh * hd;
    if ((size_t)a->hid > xs) xs = a->hid;
    size_t att = (size_t)G * hd + (size_t)MEGA_WARPS * G * (hd + 2) +
                 (size_t)a->split_slots_max + 2;
    return 4 * (xs > att ? xs : att);
}

extern "C" int pie__cuda_mega_supported(const pie_cuda_mega_args *a, int n_sm)
{
    int G = a->nkv > 0 ? a->nh / a->nkv : 0;
    if (G < 1 || G > PIE_CUDA_MEGA_GMAX || a->nh % a->nkv || a->hd % 2 ||
        a->hd > 128 || a->dim % 8 || a->hid % 8 || (a->nh * a->hd) % 8)
        return 0;
    size_t smem = mega_smem(a);
    if (cudaFuncSetAttribute(mega_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)smem) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    int per = 0, coop = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, mega_kernel,
                                                      MEGA_THREADS, smem) !=
        cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return coop && per >= 1 && n_sm > 0;
}

extern "C" int pie__cuda_mega(const pie_cuda_mega_args *a, int n_blocks,
                              cudaStream_t s)
{
    /* the opt-in belongs to the function, not to a backend: another
     * backend's model may have set a smaller one since */
    if (cudaFuncSetAttribute(mega_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)mega_smem(a)) != cudaSuccess ||
        cudaMemsetAsync(a->bar, 0, sizeof(unsigned) * (1 + a->nkv), s) !=
            cudaSuccess)
        return -1;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeCooperative;
    at[0].val.cooperative = 1;
    cfg.gridDim = dim3(n_blocks);
    cfg.blockDim = dim3(MEGA_THREADS);
    cfg.dynamicSmemBytes = mega_smem(a);
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, mega_kernel, *a) == cudaSuccess ? 0 : -1;
}
