/*
 * sample.cu — samplers and probes on the device, following backend.h and
 * its host reference pie_sample_row() (backend/batch.c) step for step:
 *
 *   mask      logits outside the allowed bitmap become -inf
 *   greedy    argmax, lowest id on ties (also RANDOM with temperature <= 0)
 *   random    p = softmax(l / T) exactly as the host computes it (expf of
 *             (l - max) / T, double sum, times float(1 / sum)); the rows are
 *             sorted by (p desc, id asc) with a stable segmented radix sort;
 *             the kept prefix is min(top_k, #p>0, top-p prefix, min-p
 *             prefix) and the token is the first whose cumulative mass
 *             exceeds u * kept mass (u = pie_sample_uniform(seed), computed
 *             on the host)
 *   TOPK      the first k of the same sorted distribution (at T, 1 if <= 0)
 *   LOGITS    the masked row; LOGPROBS l - logsumexp(l); ENTROPY -sum p ln p
 *
 * One block of SAMPLE_THREADS per row; only tokens and probe values leave
 * the device.
 */
#include <cub/cub.cuh>
#include <math.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"

#define SAMPLE_THREADS 1024

/* Block-wide reductions over SAMPLE_THREADS threads. */
template <typename T, typename Op>
static __device__ T block_reduce(T v, Op op, T *red)
{
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        v = red[lane];
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    T r = red[0];
    __syncthreads();
    return r;
}

struct SumOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
    __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};

/* Argmax of a row, lowest index on ties; NaN never wins. Each thread
 * visits its indices in increasing order; rows of a multiple of 4 floats
 * are read as float4, 4 loads in flight per thread (a greedy step at batch
 * 1 reads a whole vocabulary row with one block). */
static __device__ __forceinline__ void arg_step(float v, int i, float *best,
                                                int *bi)
{
    if (v > *best || (*bi == 0x7fffffff && !isnan(v))) { *best = v; *bi = i; }
}

static __device__ int row_argmax(const float *x, int n, float *fred, int *ired)
{
    float best = -INFINITY;
    int bi = 0x7fffffff;
    if (n % 4 == 0 && ((uintptr_t)x & 15) == 0) {
        const float4 *x4 = reinterpret_cast<const float4 *>(x);
        int n4 = n / 4, T = blockDim.x;
        for (int j = threadIdx.x; j < n4; j += 4 * T) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (j + u * T < n4) v[u] = x4[j + u * T];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                if (j + u * T >= n4) break;
                int i = 4 * (j + u * T);
                arg_step(v[u].x, i, &best, &bi);
                arg_step(v[u].y, i + 1, &best, &bi);
                arg_step(v[u].z, i + 2, &best, &bi);
                arg_step(v[u].w, i + 3, &best, &bi);
            }
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) arg_step(x[i], i, &best, &bi);
    }
    float m = block_reduce(best, MaxOp(), fred);
    int cand = (best == m) ? bi : 0x7fffffff;
    int r = block_reduce(cand, MinOp(), ired);
    return r == 0x7fffffff ? 0 : r;
}

__global__ void mask_kernel(float *logits, int vocab, const pie_cuda_srow *sr,
                            const uint32_t *bits)
{
    // logits (rows, vocab)
    int row = blockIdx.x, mo = sr[row].mask_off;
    if (mo < 0) return;
    float *l = logits + (int64_t)row * vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (!((bits[mo + i / 32] >> (i % 32)) & 1u)) l[i] = -INFINITY;
}

/* Greedy, LOGITS, LOGPROBS, ENTROPY, and the softmax of sorted rows. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
row_kernel(pie_cuda_sample_args a)
{
    // logits (rows, vocab)
    __shared__ float fred[32];
    __shared__ int ired[32];
    __shared__ double dred[32];
    int row = blockIdx.x, V = a.vocab;
    pie_cuda_srow s = a.srow[row];
    const float *l = a.logits + (int64_t)row * V;
    float *vals = a.values + s.val_off;
    bool sorted = s.sort_row >= 0;
    if (s.kind == PIE_SAMPLER_GREEDY ||
        (s.kind == PIE_SAMPLER_RANDOM && !sorted)) {
        int am = row_argmax(l, V, fred, ired);
        if (threadIdx.x == 0) a.tokens[row] = am;
        return;
    }
    if (threadIdx.x == 0) a.tokens[row] = -1;
    if (s.kind == PIE_PROBE_LOGITS) {
        for (int i = threadIdx.x; i < V; i += blockDim.x) vals[i] = l[i];
        return;
    }
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
    mx = block_reduce(mx, MaxOp(), fred);
    if (sorted) {
        float T = s.kind == PIE_PROBE_TOPK && !(s.temp > 0.0f) ? 1.0f : s.temp;
        double sum = 0.0;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            sum += (double)expf((l[i] - mx) / T);
        sum = block_reduce(sum, SumOp(), dred);
        float inv = (float)(1.0 / sum);
        float *k = a.sort_kin + (int64_t)s.sort_row * V;
        int32_t *id = a.sort_vin + (int64_t)s.sort_row * V;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            k[i] = expf((l[i] - mx) / T) * inv;
            id[i] = i;
        }
        if (threadIdx.x == 0) {
            a.seg_off[s.sort_row] = s.sort_row * V;
            a.seg_off[s.sort_row + 1] = (s.sort_row + 1) * V;
        }
        return;
    }
    double sum = 0.0, sx = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        if (l[i] == -INFINITY) continue;
        double d = (double)l[i] - mx, e = exp(d);
        sum += e;
        sx += e * d;
    }
    sum = block_reduce(sum, SumOp(), dred);
    if (s.kind == PIE_PROBE_ENTROPY) {
        sx = block_reduce(sx, SumOp(), dred);
        if (threadIdx.x == 0) vals[0] = (float)(log(sum) - sx / sum);
        return;
    }
    /* LOGPROBS */
    double lse = mx + log(sum);
    for (int i = threadIdx.x; i < s.n_ids; i += blockDim.x)
        vals[i] = (float)((double)l[a.lp_ids[s.ids_off + i]] - lse);
}

/* Chunked inclusive scan helper: thread t owns [t*C, min((t+1)*C, n)). */
__global__ void __launch_bounds__(SAMPLE_THREADS)
finalize_kernel(pie_cuda_sample_args a)
{
    // sorted p (n_sort, vocab) desc, ids same
    __shared__ double dscan[SAMPLE_THREADS];
    __shared__ int ired[32];
    __shared__ double mass_s;
    int row = blockIdx.x, V = a.vocab;
    pie_cuda_srow s = a.srow[row];
    if (s.sort_row < 0) return;
    const float *p = a.sort_kout + (int64_t)s.sort_row * V;
    const int32_t *id = a.sort_vout + (int64_t)s.sort_row * V;
    if (s.kind == PIE_PROBE_TOPK) {
        for (int i = threadIdx.x; i < s.n_ids; i += blockDim.x) {
            a.values[s.val_off + i] = p[i];
            a.ids[s.val_off + i] = id[i];
        }
        return;
    }
    int C = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    int b0 = threadIdx.x * C, b1 = min(b0 + C, V);
    double local = 0.0;
    for (int i = b0; i < b1; i++) local += p[i];
    dscan[threadIdx.x] = local;
    __syncthreads();
    if (threadIdx.x == 0) {          /* exclusive scan, sequential: 1024 adds */
        double c = 0.0;
        for (int t = 0; t < SAMPLE_THREADS; t++) {
            double v = dscan[t];
            dscan[t] = c;
            c += v;
        }
    }
    __syncthreads();
    float floor_p = s.min_p > 0.0f ? s.min_p * p[0] : 0.0f;
    int n_pos = V, n_topp = V, n_minp = V;
    double cum = dscan[threadIdx.x];
    for (int i = b0; i < b1; i++) {
        if (!(p[i] > 0.0f) && i < n_pos) n_pos = i;
        if (i > 0 && p[i] < floor_p && i < n_minp) n_minp = i;
        cum += p[i];
        if (s.top_p < 1.0f && cum >= s.top_p && i + 1 < n_topp) n_topp = i + 1;
    }
    n_pos = block_reduce(n_pos, MinOp(), ired);
    n_minp = block_reduce(n_minp, MinOp(), ired);
    n_topp = block_reduce(n_topp, MinOp(), ired);
    if (n_pos == 0) n_pos = V;       /* no p > 0: all ids are candidates */
    int k = (s.top_k <= 0 || s.top_k > V) ? V : s.top_k;
    int n = min(min(k, n_pos), min(n_topp, n_minp));
    if (n < 1) n = 1;
    cum = dscan[threadIdx.x];
    for (int i = b0; i < b1; i++) {
        cum += p[i];
        if (i == n - 1) mass_s = cum;
    }
    __syncthreads();
    double target = (double)s.u * mass_s;
    int first = n - 1;
    cum = dscan[threadIdx.x];
    for (int i = b0; i < b1 && i < n; i++) {
        cum += p[i];
        if (cum > target) { first = i; break; }
    }
    first = block_reduce(first, MinOp(), ired);
    if (threadIdx.x == 0) a.tokens[row] = id[first];
}

extern "C" size_t pie__cuda_sort_tmp_bytes(int n_sort, int vocab)
{
    size_t bytes = 0;
    if (n_sort <= 0) return 0;
    cub::DeviceSegmentedRadixSort::SortPairsDescending(
        (void *)NULL, bytes, (const float *)NULL, (float *)NULL,
        (const int32_t *)NULL, (int32_t *)NULL, n_sort * vocab, n_sort,
        (const int32_t *)NULL, (const int32_t *)NULL + 1, 0, 32, (cudaStream_t)0);
    return bytes;
}

extern "C" int pie__cuda_sample(const pie_cuda_sample_args *a, cudaStream_t st)
{
    if (a->rows <= 0) return 0;
    mask_kernel<<<a->rows, 256, 0, st>>>(a->logits, a->vocab, a->srow,
                                         a->mask_bits);
    row_kernel<<<a->rows, SAMPLE_THREADS, 0, st>>>(*a);
    if (a->n_sort > 0) {
        size_t bytes = a->sort_tmp_bytes;
        cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
            a->sort_tmp, bytes, a->sort_kin, a->sort_kout, a->sort_vin,
            a->sort_vout, a->n_sort * a->vocab, a->n_sort, a->seg_off,
            a->seg_off + 1, 0, 32, st);
        if (e != cudaSuccess) return (int)e;
        finalize_kernel<<<a->rows, SAMPLE_THREADS, 0, st>>>(*a);
    }
    return (int)cudaGetLastError();
}
