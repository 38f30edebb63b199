/*
 * bench_kv_read.cu — how fast can the decode attention's KV reads go on
 * this GPU, without attention? A benchmark (prints numbers, never
 * pass/fail), standalone: it does not link pie.
 *
 * The pool is laid out as the backend's (pages of 16 slots holding every
 * layer and kv head; a kv head's 16 K rows of 256 bytes, head dim 128, are
 * one 4 KB chunk, its V rows another at a fixed offset), 16 GB of pages in
 * shuffled order. One "call" reads ITEMS items (a sequence x kv head) of
 * NB KV blocks of 64 slots: per KV block, 4 chunks of K and 4 of V (32 KB),
 * as flash_dec_kernel (flash_decode.cu) reads them: 4 warps, each 16 slots
 * of one page, cp.async 16 bytes a lane. Calls rotate over 8 layers so that
 * none finds the last one's data in L2. Kernels:
 *
 *   seq    the same bytes read contiguously (ld.global.nc): the streaming
 *          rate
 *   rr     KV blocks dealt round-robin over the grid, 2 cp.async stages a
 *          block of 4 warps: the access pattern alone
 *   piece  as flash_dec_kernel's cut plan: each block runs consecutive
 *          items; an item's chunk list is found through two dependent loads
 *          (item -> request -> chunk table), and each chunk's entry is read
 *          just before its copies
 *   math   piece, plus C cycles of dependent FMAs per KV block (the math's
 *          stand-in) and E cycles between two barriers at each item's end
 *          (the combine and store's stand-in), copies issued at the top of
 *          each iteration as in flash_dec_kernel
 *   cp.async S   math (no item-end stand-in) with a ring of S KV blocks,
 *          S - 1 in flight while one is consumed (piece, math and this are
 *          one kernel, ring_kernel)
 *   bulk   a producer warp fills a ring of S stages by cp.async.bulk
 *          (completion counted on an mbarrier a stage) for 4 consumer
 *          warps: each 4 KB chunk in one copy ("4KB"), or each slot's 256-
 *          byte K or V row in its own copy into the padded rows the
 *          attention's ldmatrix reads ("rows")
 *
 * Usage: bench_kv_read [ITEMS NB] (default 2048 8: 8B shape B=256 ctx 512;
 * 128 32 is B=16 ctx 2048). Results: backend/cuda/NOTES.md, rounds 16 and
 * 23.
 */
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(x)                                                              \
    do {                                                                   \
        cudaError_t e_ = (x);                                              \
        if (e_ != cudaSuccess) {                                           \
            printf("%s: %s\n", #x, cudaGetErrorString(e_));                \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

constexpr int CHUNK = 4096;            /* 16 slots x 256 bytes              */
constexpr int KVBLK = 32768;           /* 4 chunks of K and 4 of V          */

/* what the kernels read: chunk c's K at pool + tab[c] * CHUNK, V at + voff */
struct kv_args {
    const char *pool;
    size_t      voff;
    const int  *tab;                   /* chunk entries, item-major         */
    const int  *item_req, *req_base;   /* item -> request -> first entry    */
    int         n_items, nb;           /* items, KV blocks an item          */
    int         C, E;                  /* math stand-ins (cycles)           */
    unsigned   *out;                   /* keeps the reads alive             */
};

__device__ __forceinline__ void cpa16(void *d, const void *s)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"((uint32_t)__cvta_generic_to_shared(d)), "l"(s) : "memory");
}

/* Warp w's chunk (entry e) of a KV block into stage buffer d (K, then V). */
__device__ __forceinline__ void copy_chunk(char *d, const kv_args &a, int e, int lane)
{
    const char *k = a.pool + (size_t)e * CHUNK;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        cpa16(d + (lane + 32 * i) * 16, k + (lane + 32 * i) * 16);
        cpa16(d + 4096 + (lane + 32 * i) * 16, k + a.voff + (lane + 32 * i) * 16);
    }
}

__device__ __forceinline__ void spin(int cyc, unsigned &acc)
{
    float x = __uint_as_float(acc | 0x3f800000u);
    for (int i = 0; i < cyc / 4; i++) x = fmaf(x, 1.0000001f, 1e-7f);
    acc ^= __float_as_uint(x);
}

__device__ __forceinline__ void touch(const char *buf, unsigned &acc)
{
    const uint32_t *x = (const uint32_t *)buf;
    acc ^= x[threadIdx.x * 7] ^ x[threadIdx.x * 13 + 4096];
}

__global__ void seq_kernel(const uint4 *p, size_t n16, unsigned *out)
{
    unsigned acc = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16;
         i += (size_t)gridDim.x * blockDim.x) {
        uint4 v;
        asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678) out[0] = acc;
}

__global__ void __launch_bounds__(128) rr_kernel(kv_args a)
{
    extern __shared__ __align__(16) char sm[];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32, n = a.n_items * a.nb;
    unsigned acc = 0;
    auto issue = [&](int kb, int st) {
        if (kb < n) copy_chunk(sm + st * KVBLK + w * 8192, a, a.tab[kb * 4 + w], lane);
        asm volatile("cp.async.commit_group;");
    };
    int it = 0;
    issue(blockIdx.x, 0);
    for (int kb = blockIdx.x; kb < n; kb += gridDim.x, it++) {
        issue(kb + gridDim.x, (it + 1) % 2);
        asm volatile("cp.async.wait_group 1;");
        __syncthreads();
        touch(sm + (it % 2) * KVBLK, acc);
        __syncthreads();
    }
    asm volatile("cp.async.wait_group 0;");
    if (acc == 0x12345678) a.out[0] = acc;
}

/* Block b's items, [b ipb, (b + 1) ipb), and the next KV block to copy:
 * KV block ckb of item ci, whose chunk entries start at base (found
 * through two dependent loads, item -> request -> entry, as the decode
 * kernel finds its pages). */
struct block_items {
    int i0, i1, ci, ckb, base;

    /* false where this block has no items */
    __device__ bool start(const kv_args &a)
    {
        int ipb = (a.n_items + gridDim.x - 1) / gridDim.x;
        i0 = blockIdx.x * ipb;
        i1 = min(a.n_items, i0 + ipb);
        if (i0 >= i1) return false;
        ci = i0;
        ckb = 0;
        base = a.req_base[a.item_req[i0]];
        return true;
    }
    __device__ bool more(void) const { return ci < i1; }
    /* the entry of chunk c (0..3) of the next KV block */
    __device__ int entry(const kv_args &a, int c) const { return a.tab[base + ckb * 4 + c]; }
    __device__ void next(const kv_args &a)
    {
        if (++ckb < a.nb) return;
        ckb = 0;
        if (++ci < i1) base = a.req_base[a.item_req[ci]];
    }
    /* warp w's copies of the next KV block into stage buffer buf, as one
     * commit group (empty past the last item) */
    __device__ void issue(char *buf, const kv_args &a, int w, int lane)
    {
        if (more()) {
            copy_chunk(buf + w * 8192, a, entry(a, w), lane);
            next(a);
        }
        asm volatile("cp.async.commit_group;");
    }
};

/* Block b's items through a ring of S KV blocks (S - 1 in flight while
 * one is consumed). MATH = 0: piece (S = 2), the loads alone; 1: C cycles
 * of math a KV block and (E != 0) E cycles between two barriers at each
 * item's end: math (S = 2), or cp.async S. */
template <int S, int MATH>
__global__ void __launch_bounds__(128) ring_kernel(kv_args a)
{
    extern __shared__ __align__(16) char sm[];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    block_items bi;
    if (!bi.start(a)) return;
    unsigned acc = 0;
    int n = (bi.i1 - bi.i0) * a.nb;
    for (int k = 0; k < S - 1; k++) bi.issue(sm + k * KVBLK, a, w, lane);
    for (int it = 0, kbi = 0; it < n; it++) {
        bi.issue(sm + (it + S - 1) % S * KVBLK, a, w, lane);
        asm volatile("cp.async.wait_group %0;" :: "n"(S - 1));
        __syncthreads();
        touch(sm + (it % S) * KVBLK, acc);
        if (MATH) spin(a.C, acc);
        __syncthreads();
        if (MATH && a.E && ++kbi == a.nb) {
            kbi = 0;
            spin(a.E, acc);
            __syncthreads();
        }
    }
    asm volatile("cp.async.wait_group 0;");
    if (acc == 0x12345678) a.out[0] = acc;
}

/* Mean time of `reps` calls, rotating over the layers; prints TB/s. */
template <typename F>
static void timeit(const char *name, double bytes, int layers, F launch)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; i++) launch(i % layers);
    CK(cudaDeviceSynchronize());
    const int reps = 24;
    CK(cudaEventRecord(e0));
    for (int i = 0; i < reps; i++) launch(i % layers);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaGetLastError());
    double us = ms * 1e3 / reps;
    printf("%-28s %8.1f us  %.2f TB/s\n", name, us, bytes / (us * 1e-6) / 1e12);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
}

__device__ __forceinline__ uint32_t sm32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mb_init(uint64_t *b, int n)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(sm32(b)), "r"(n) : "memory");
}

__device__ __forceinline__ void mb_expect(uint64_t *b, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 :: "r"(sm32(b)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mb_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(sm32(b)) : "memory");
}

__device__ __forceinline__ void mb_wait(uint64_t *b, uint32_t par)
{
    asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra W;\n}" :: "r"(sm32(b)), "r"(par) : "memory");
}

__device__ __forceinline__ void bulk(void *d, const void *s, uint32_t n, uint64_t *b)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1], %2, [%3];"
                 :: "r"(sm32(d)), "l"(s), "r"(n), "r"(sm32(b)) : "memory");
}

/* The bytes of a bulk kernel's stage: 32 KB, or for ROW 64 slots of K and
 * of V in rows 272 bytes apart. */
template <int ROW>
__host__ __device__ constexpr int bulk_stage(void) { return ROW ? 64 * 272 * 2 : KVBLK; }

/* Stage buffer d of the next KV block by bulk copies, completed on mbar
 * (the producer warp's lanes; the caller has set the expected bytes). */
template <int ROW>
__device__ __forceinline__ void bulk_issue(char *d, const kv_args &a,
                                           const block_items &bi, int lane,
                                           uint64_t *mbar)
{
    if constexpr (!ROW) {
        if (lane < 8) {
            const char *k = a.pool + (size_t)bi.entry(a, lane & 3) * CHUNK;
            bulk(d + (lane >> 2) * 16384 + (lane & 3) * CHUNK,
                 k + (lane >> 2) * a.voff, CHUNK, mbar);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int s = lane + 32 * j;
            const char *k = a.pool + (size_t)bi.entry(a, s / 16) * CHUNK + (s % 16) * 256;
            bulk(d + s * 272, k, 256, mbar);
            bulk(d + 64 * 272 + s * 272, k + a.voff, 256, mbar);
        }
    }
}

/* A producer warp (warp 4) fills a ring of S stages by bulk copies (one
 * thread a copy, completion counted on the stage's mbarrier), ROW = 0:
 * each 4 KB chunk in one copy (32 KB a stage); ROW = 1: each slot's 256-
 * byte K or V row in its own copy into rows 272 bytes apart, the padded
 * layout the attention's ldmatrix reads (34 KB a stage). The 4 consumer
 * warps wait for a stage, touch it, run C cycles and free it. */
template <int S, int ROW>
__global__ void __launch_bounds__(160) bulk_kernel(kv_args a)
{
    constexpr int STG = bulk_stage<ROW>();
    extern __shared__ __align__(128) char sm[];
    __shared__ __align__(8) uint64_t full[S], empty[S];
    int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    block_items bi;
    if (!bi.start(a)) return;
    if (threadIdx.x == 0)
        for (int k = 0; k < S; k++) {
            mb_init(&full[k], 1);
            mb_init(&empty[k], 4);
        }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    int n = (bi.i1 - bi.i0) * a.nb;
    unsigned acc = 0;
    for (int it = 0; it < n; it++) {
        int st = it % S;
        if (w == 4) {           /* the producer */
            if (it >= S) mb_wait(&empty[st], (it / S - 1) & 1);
            if (lane == 0) mb_expect(&full[st], ROW ? 64 * 512 : KVBLK);
            __syncwarp();
            bulk_issue<ROW>(sm + st * STG, a, bi, lane, &full[st]);
            bi.next(a);
        } else {                /* the 4 consumers */
            mb_wait(&full[st], (it / S) & 1);
            touch(sm + st * STG, acc);
            spin(a.C, acc);
            __syncwarp();
            if (lane == 0) mb_arrive(&empty[st]);
        }
    }
    if (acc == 0x12345678) a.out[0] = acc;
}

template <int S, int ROW, typename A>
static void run_bulk(int per_sm, double bytes, int layers, int nsm, int C, A args)
{
    constexpr int STG = bulk_stage<ROW>();
    CK(cudaFuncSetAttribute(bulk_kernel<S, ROW>,
                            cudaFuncAttributeMaxDynamicSharedMemorySize, S * STG));
    char name[64];
    snprintf(name, sizeof name, "bulk %s S %d C %d, %d an SM", ROW ? "rows" : "4KB", S,
             C, per_sm);
    timeit(name, bytes, layers, [&](int l) {
        bulk_kernel<S, ROW><<<nsm * per_sm, 160, S * STG>>>(args(l, C, 0));
    });
}

template <int S, typename A>
static void run_stages(int per_sm, double bytes, int layers, int nsm, int C, A args)
{
    CK(cudaFuncSetAttribute(ring_kernel<S, 1>,
                            cudaFuncAttributeMaxDynamicSharedMemorySize, S * KVBLK));
    char name[64];
    snprintf(name, sizeof name, "cp.async S %d C %d, %d an SM", S, C, per_sm);
    timeit(name, bytes, layers, [&](int l) {
        ring_kernel<S, 1><<<nsm * per_sm, 128, S * KVBLK>>>(args(l, C, 0));
    });
}

int main(int argc, char **argv)
{
    int items = argc > 2 ? atoi(argv[1]) : 2048, nb = argc > 2 ? atoi(argv[2]) : 8;
    int nsm = 0;
    if (cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess) {
        printf("bench_kv_read: no GPU: skipped\n");
        return 0;
    }
    /* pages of 16 slots x 32 layers x 8 kv heads x (K, V) 4 KB: 2 MB */
    const int layers = 8, heads = 8, page_layers = 32, n_pages = 8192;
    const size_t page = (size_t)2 * CHUNK * heads * page_layers;
    const size_t voff = (size_t)CHUNK * heads * page_layers;
    const int per_item = nb * 4;                       /* chunks an item */
    if (items <= 0 || nb <= 0 || (size_t)items * per_item > (size_t)n_pages * heads) {
        printf("bench_kv_read: ITEMS x NB x 4 must be at most %d\n", n_pages * heads);
        return 1;
    }
    char *pool;
    unsigned *out;
    CK(cudaMalloc(&pool, page * n_pages));
    CK(cudaMemset(pool, 1, page * n_pages));
    CK(cudaMalloc(&out, 4));
    std::mt19937 rng(1);
    std::vector<int> perm(n_pages);
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    /* item i (kv head i % 8) takes the next per_item pages of the shuffled
     * order; requests are numbered in a shuffled order too */
    std::vector<int> req(items), base(items), ord(items);
    for (int i = 0; i < items; i++) ord[i] = i;
    std::shuffle(ord.begin(), ord.end(), rng);
    for (int i = 0; i < items; i++) {
        req[i] = ord[i];
        base[ord[i]] = i * per_item;
    }
    int *d_req, *d_base, *d_tab[layers];
    CK(cudaMalloc(&d_req, 4 * items));
    CK(cudaMalloc(&d_base, 4 * items));
    CK(cudaMemcpy(d_req, req.data(), 4 * items, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_base, base.data(), 4 * items, cudaMemcpyHostToDevice));
    std::vector<int> tab((size_t)items * per_item);
    for (int l = 0; l < layers; l++) {
        for (size_t c = 0; c < tab.size(); c++) {
            size_t i = c / per_item, pg = (i / heads * per_item + c % per_item) % n_pages;
            tab[c] = (int)((perm[pg] * page + (size_t)(l * heads + i % heads) * CHUNK) / CHUNK);
        }
        CK(cudaMalloc(&d_tab[l], 4 * tab.size()));
        CK(cudaMemcpy(d_tab[l], tab.data(), 4 * tab.size(), cudaMemcpyHostToDevice));
    }
    double bytes = (double)items * nb * KVBLK;
    printf("bench_kv_read: %d items x %d KV blocks (%.0f MB a call), %d SMs\n",
           items, nb, bytes / 1e6, nsm);
    auto args = [&](int l, int C, int E) {
        return kv_args{ pool, voff, d_tab[l], d_req, d_base, items, nb, C, E, out };
    };
    timeit("seq", bytes, layers, [&](int l) {
        seq_kernel<<<nsm * 8, 512>>>((const uint4 *)(pool + (size_t)l * (page * 64)),
                                     (size_t)bytes / 16, out);
    });
    CK(cudaFuncSetAttribute(rr_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * KVBLK));
    CK(cudaFuncSetAttribute(ring_kernel<2, 0>, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * KVBLK));
    CK(cudaFuncSetAttribute(ring_kernel<2, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * KVBLK));
    char name[64];
    for (int k = 2; k <= 3; k++) {
        snprintf(name, sizeof name, "rr, %d an SM", k);
        timeit(name, bytes, layers, [&](int l) {
            rr_kernel<<<nsm * k, 128, 2 * KVBLK>>>(args(l, 0, 0));
        });
        snprintf(name, sizeof name, "piece, %d an SM", k);
        timeit(name, bytes, layers, [&](int l) {
            ring_kernel<2, 0><<<nsm * k, 128, 2 * KVBLK>>>(args(l, 0, 0));
        });
    }
    for (int C : { 0, 800, 1500 }) {
        for (int k = 1; k <= 3; k++) {
            snprintf(name, sizeof name, "math C %d E 3000, %d an SM", C, k);
            timeit(name, bytes, layers, [&](int l) {
                ring_kernel<2, 1><<<nsm * k, 128, 2 * KVBLK>>>(args(l, C, 3000));
            });
        }
    }
    /* deeper rings: cp.async and bulk copies (per_sm 2: rings that let
     * two blocks share an SM) */
    for (int C : { 0, 800 }) {
        run_stages<2>(1, bytes, layers, nsm, C, args);
        run_stages<3>(1, bytes, layers, nsm, C, args);
        run_stages<4>(1, bytes, layers, nsm, C, args);
        run_stages<6>(1, bytes, layers, nsm, C, args);
        run_bulk<2, 0>(1, bytes, layers, nsm, C, args);
        run_bulk<4, 0>(1, bytes, layers, nsm, C, args);
        run_bulk<6, 0>(1, bytes, layers, nsm, C, args);
        run_bulk<2, 1>(1, bytes, layers, nsm, C, args);
        run_bulk<3, 1>(1, bytes, layers, nsm, C, args);
        run_bulk<4, 1>(1, bytes, layers, nsm, C, args);
        run_bulk<6, 1>(1, bytes, layers, nsm, C, args);
        run_bulk<3, 1>(2, bytes, layers, nsm, C, args);
    }
    return 0;
}
