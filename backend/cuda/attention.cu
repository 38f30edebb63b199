/*
 * attention.cu — pie's CUDA-core attention kernel over the paged KV cache
 * (any head dim, split partials) and the merge of split partials, which
 * the tensor-core decode kernel's cut plan also uses. The tensor-core
 * kernels are in flash_prefill.cu and flash_decode.cu, their shared
 * per-block math in flash.cuh. Each kernel has a C twin in
 * tests/cuda/test_cuda_kernels.c; the KV pool layout is in cuda_kernels.h.
 */
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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

/* One work item's shape and this thread's place in it, for the passes. */
struct att_geo {
    pie_cuda_attn_item it;
    int hd, ps, G, R, cs;   /* head dim, page size, heads a kv head, rows, */
                            /* score stride */
    int LG, NG, gi, li;     /* lanes a group, groups, this thread's group */
                            /* and lane in it */
    const int *pages;       /* the item's page ids (shared memory), by page */
    int64_t pe, k_src, voff;  /* page elems, K of this layer and kv head, */
                              /* V's offset from K */
};

/* Q of the item's R rows, scaled, into qs (RMAX x hd, zero rows past R),
 * and its page ids into pg; returns the geometry. */
static __device__ __forceinline__ att_geo att_stage(
    float *qs, int *pg, const float *q, const pie_cuda_attn_item &it,
    const pie_cuda_tokmeta &tm, const pie_cuda_kv &kv, int layer, int nh,
    int cs)
{
    att_geo a;
    a.it = it;
    a.hd = kv.head_dim;
    a.ps = kv.page_size;
    a.G = nh / kv.n_kv;
    a.R = it.nt * a.G;
    a.cs = cs;
    a.LG = a.hd / 8;
    a.NG = ATT_THREADS / a.LG;
    a.gi = threadIdx.x / a.LG;
    a.li = threadIdx.x % a.LG;
    int hd = a.hd, G = a.G, R = a.R, ps = a.ps;
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
    a.pages = pg - p0;
    a.pe = pie_cuda_kv_page_elems(&kv);
    a.k_src = pie_cuda_kv_k_off(&kv, layer, it.kvh);
    a.voff = pie_cuda_kv_voff(&kv);
    return a;
}

/* Pass 1: every row's scores into sc (RMAX x cs; masked slots -inf), U
 * slots per group in flight. */
static __device__ __forceinline__ void att_scores(float *sc, const float *qs,
                                                  const att_geo &a,
                                                  const pie_cuda_tokmeta &tm,
                                                  const uint16_t *pool)
{
    const pie_cuda_attn_item &it = a.it;
    for (int base = it.s0; base < it.s1; base += a.NG * U) {
        float kf[U][8];
        load_slots(kf, pool + a.k_src + a.li * 8, a.pages, a.pe, a.ps, a.hd,
                   base + a.gi, a.NG, it.s1);
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            if (r >= a.R) break;
            float qr[8];
#pragma unroll
            for (int e = 0; e < 8; e++) qr[e] = qs[r * a.hd + a.li * 8 + e];
            int t = it.t0 + r / a.G;
#pragma unroll
            for (int u = 0; u < U; u++) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; e++) d += qr[e] * kf[u][e];
                for (int o = a.LG / 2; o > 0; o >>= 1)
                    d += __shfl_xor_sync(0xffffffffu, d, o);
                int j = base + u * a.NG + a.gi;
                if (j < it.s1 && a.li == 0)
                    sc[r * a.cs + (j - it.s0)] = attn_allowed(tm, t, j) ? d : -INFINITY;
            }
        }
    }
    __syncthreads();
}

/* Pass 2: a warp a row: its max and mass into ml, its scores become
 * exp(s - max). */
static __device__ __forceinline__ void att_softmax(float *sc, float *ml,
                                                   const att_geo &a)
{
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    int n = a.it.s1 - a.it.s0;
    for (int r = w; r < a.R; r += ATT_THREADS / WARP) {
        float m = -INFINITY;
        for (int j = lane; j < n; j += WARP) m = fmaxf(m, sc[r * a.cs + j]);
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < n; j += WARP) {
            float v = sc[r * a.cs + j];
            float p = (v == -INFINITY) ? 0.0f : __expf(v - m);
            sc[r * a.cs + j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) {
            ml[2 * r] = m;
            ml[2 * r + 1] = l;
        }
    }
    __syncthreads();
}

/* Pass 3: this group's share of P V for every row, in acc. */
static __device__ __forceinline__ void att_pv(float (*acc)[8], const float *sc,
                                              const att_geo &a,
                                              const uint16_t *pool)
{
    const pie_cuda_attn_item &it = a.it;
#pragma unroll
    for (int r = 0; r < RMAX; r++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r][e] = 0.0f;
    for (int base = it.s0 + a.gi; base < it.s1; base += a.NG * U) {
        float vf[U][8];
        load_slots(vf, pool + a.k_src + a.voff + a.li * 8, a.pages, a.pe,
                   a.ps, a.hd, base, a.NG, it.s1);
#pragma unroll
        for (int u = 0; u < U; u++) {
            int j = base + u * a.NG;
            if (j >= it.s1) break;
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                if (r < a.R) {
                    float p = sc[r * a.cs + (j - it.s0)];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][e] += p * vf[u][e];
                }
            }
        }
    }
}

/* The groups' acc summed: across the groups of a warp with shuffles, then
 * across the 4 warps through os (no atomics: they serialize). Returns
 * where the sums lie (R x hd floats). */
static __device__ __forceinline__ float *att_reduce(float *os,
                                                    float (*acc)[8],
                                                    const att_geo &a)
{
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, hd = a.hd;
#pragma unroll
    for (int r = 0; r < RMAX; r++) {
        if (r >= a.R) break;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float v = acc[r][e];
            for (int o = a.LG; o < WARP; o <<= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][e] = v;
        }
        if (lane < a.LG)
#pragma unroll
            for (int e = 0; e < 8; e++)
                os[(w * RMAX + r) * hd + a.li * 8 + e] = acc[r][e];
    }
    __syncthreads();
    for (int k = threadIdx.x; k < a.R * hd; k += ATT_THREADS) {
        float v = 0.0f;
#pragma unroll
        for (int ww = 0; ww < ATT_THREADS / WARP; ww++) v += os[ww * RMAX * hd + k];
        os[k + (ATT_THREADS / WARP) * RMAX * hd] = v;
    }
    __syncthreads();
    return os + (ATT_THREADS / WARP) * RMAX * hd;
}

/* The rows out: normalized as bf16, or for a split item its partials (O,
 * max and mass) for attn_merge_kernel. */
static __device__ __forceinline__ void att_store(uint16_t *out, float *part_o,
                                                 float *part_ml, const float *os,
                                                 const float *ml,
                                                 const att_geo &a, int nh)
{
    const pie_cuda_attn_item &it = a.it;
    int hd = a.hd;
    for (int k = threadIdx.x; k < a.R * hd; k += ATT_THREADS) {
        int r = k / hd, d = k % hd;
        float l = ml[2 * r + 1];
        if (it.part < 0) {
            int t = it.t0 + r / a.G, h = it.kvh * a.G + r % a.G;
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

__global__ void __launch_bounds__(ATT_THREADS, 4)
attention_kernel(uint16_t *out, float *part_o, float *part_ml, const float *q,
                 const pie_cuda_attn_item *items, pie_cuda_tokmeta tm,
                 pie_cuda_kv kv, int layer, int nh, int cs)
{
    pdl_begin();
    // out (n, nh*hd) bf16, q (n, nh*hd) f32
    extern __shared__ float smem[];
    int hd = kv.head_dim;
    float *qs = smem, *sc = qs + RMAX * hd, *os = sc + RMAX * cs;
    float *ml = os + (ATT_THREADS / WARP + 1) * RMAX * hd;
    /* the item's page ids, so the slot loops read them from shared memory */
    int *pg = (int *)(ml + 2 * RMAX);
    att_geo a = att_stage(qs, pg, q, items[blockIdx.x], tm, kv, layer, nh, cs);
    att_scores(sc, qs, a, tm, kv.pool);
    att_softmax(sc, ml, a);
    float acc[RMAX][8];
    att_pv(acc, sc, a, kv.pool);
    os = att_reduce(os, acc, a);
    att_store(out, part_o, part_ml, os, ml, a, nh);
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
    static size_t set[64];      /* per device ordinal: the limit raised to */
    int dev = 0;
    if (sm > 48 * 1024 && cudaGetDevice(&dev) == cudaSuccess &&
        set[dev & 63] < sm) {
        if (cudaFuncSetAttribute(attention_kernel,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)sm) == cudaSuccess)
            set[dev & 63] = sm;
        else
            cudaGetLastError();     /* (the launch fails and says why) */
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
