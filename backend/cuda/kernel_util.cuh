/*
 * kernel_util.cuh — device helpers shared by pie's CUDA kernel files
 * (kernels.cu, attention.cu, flash.cuh, gemv.cu, mega.cu): bf16
 * conversions, streaming loads, warp and block sums,
 * programmatic dependent launch (PDL), tensor-core fragments, cp.async
 * copies and the shared-memory opt-in. Only .cu files include it.
 */
#ifndef PIE_CUDA_KERNEL_UTIL_CUH
#define PIE_CUDA_KERNEL_UTIL_CUH

#include <cuda_bf16.h>
#include <stdint.h>

#include "backend/cuda/cuda_kernels.h"

#define WARP 32

__device__ __forceinline__ float bf2f(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

__device__ __forceinline__ uint16_t f2bf(float f)
{
    __nv_bfloat16 b = __float2bfloat16_rn(f);
    return *reinterpret_cast<uint16_t *>(&b);
}

/* v rounded to the nearest bf16, as a float */
__device__ __forceinline__ float bf16_round(float v)
{
    return bf2f(f2bf(v));
}

/* Two floats as bf16, lo in the low half (the layout of adjacent bf16s). */
__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* 16 bytes of weights, streamed once: read-only, bypassing L1 (what every
 * block reuses, such as x, goes through it). */
__device__ __forceinline__ uint4 ld_stream(const uint16_t *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = WARP / 2; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/*
 * Programmatic dependent launch (PDL). A kernel launched as a programmatic
 * dependent (gemv.cu, qkv_post, the decode attention kernel; with
 * PIE_CUDA_PDL_ALL=1 every layer kernel launched through launch_pdl) may
 * start while the kernel before it still runs. Every layer kernel (all but
 * the embedding, which follows host copies) begins with pdl_begin
 * (qkv_post and the decode attention kernel split it: pdl_trigger, what
 * the step's metadata alone gives, pdl_wait): it lets the next kernel
 * start its blocks (griddepcontrol.launch_dependents, effective once all
 * of this grid's blocks have run it), then waits until the kernel before has
 * completed and its writes are visible (griddepcontrol.wait; a no-op
 * under a plain launch) before it reads or writes anything. Since every
 * kernel waits before it completes, completion stays ordered along the
 * stream; what overlaps is a kernel's launch and start-up (gemv.cu: its
 * first weight loads) with the tail of the one before. Measured on the
 * H100 (NOTES.md), PDL for gemv.cu, qkv_post (its token's slot and RoPE
 * angles before the wait) and the decode attention kernel (its work list)
 * is the default; PIE_CUDA_NO_PDL=1
 * turns it off (the environment is read once per process).
 */
__device__ __forceinline__ void pdl_trigger(void)
{
    asm volatile("griddepcontrol.launch_dependents;");
}

__device__ __forceinline__ void pdl_wait(void)
{
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void pdl_begin(void)
{
    pdl_trigger();
    pdl_wait();
}


/* kernel<<<grid, block, smem, s>>>(args...), as a programmatic dependent
 * of the stream's previous kernel where on, asking for a shared-memory
 * carveout of carve percent of the SM's unified L1 and shared memory
 * (negative: the driver's choice). Errors surface in cudaGetLastError. */
template <typename... P, typename... A>
inline void launch_pdl_carve(bool on, int carve, void (*kernel)(P...),
                             dim3 grid, dim3 block, size_t smem,
                             cudaStream_t s, A... args)
{
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[2];
    unsigned na = 0;
    if (on) {
        at[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (carve >= 0) {
        at[na].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
        at[na++].val.sharedMemCarveout = (unsigned)carve;
    }
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = at;
    cfg.numAttrs = na;
    cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* The same with the driver's carveout. */
template <typename... P, typename... A>
inline void launch_pdl_if(bool on, void (*kernel)(P...), dim3 grid,
                          dim3 block, size_t smem, cudaStream_t s, A... args)
{
    launch_pdl_carve(on, -1, kernel, grid, block, smem, s, args...);
}

/* ... where PIE_CUDA_PDL_ALL=1 */
template <typename... P, typename... A>
inline void launch_pdl(void (*kernel)(P...), dim3 grid, dim3 block,
                       size_t smem, cudaStream_t s, A... args)
{
    launch_pdl_if(pie__cuda_pdl() >= 2, kernel, grid, block, smem, s, args...);
}


/* Sum over the block (blockDim.x a multiple of 32, <= 1024). */
__device__ inline float block_sum(float v, float *red)
{
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    int nw = blockDim.x / WARP;
    v = threadIdx.x < nw ? red[threadIdx.x] : 0.0f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) red[0] = v;
    __syncthreads();
    return red[0];
}

/* ------------------------------------ tensor cores and async copies.
 * Fragment layout of mma.m16n8k16, g = lane / 4, c = lane % 4:
 *   A (16x16): a0 (g, 2c..2c+1) a1 (g+8, 2c..) a2 (g, 2c+8..) a3 (g+8, 2c+8..)
 *   B (16x8):  b0 (k 2c..2c+1, n g)  b1 (k 2c+8.., n g)
 *   C (16x8):  c0,c1 (g, 2c..2c+1)    c2,c3 (g+8, 2c..2c+1)
 */

/* c (16x8 f32) += a (16x16 bf16) . b (16x8 bf16) */
__device__ __forceinline__ void mma16816(float *c, const uint32_t *a,
                                                uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* wgmma (sm_90a; flash_prefill.cu, wgmm.cu): a shared-memory matrix
 * descriptor in the 128-byte swizzle (lbo, sbo bytes), and the fence
 * before MMAs whose accumulators other instructions touched. */
__device__ __forceinline__ uint64_t wg_desc(const void *p, uint32_t lbo,
                                           uint32_t sbo)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3ffff) >> 4) | (uint64_t)(lbo >> 4) << 16 |
           (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wg_fence(void)
{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

/* Four 8x8 bf16 matrices from shared memory, lane l giving the address of
 * row l % 8 of matrix l / 8; register i of lane (g, c) receives row g,
 * columns 2c..2c+1 of matrix i: the B fragment of m16n8k16 where a row is
 * an n index with k contiguous (K of S = Q K^T). TRANS transposes each
 * matrix: B fragments of a row-major [k][n] tile (V of P V; rows
 * k0..k0+15 given by lanes 0-15, columns +8 by lanes 16-31). */
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t *r, const uint16_t *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 "
                     "{%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 "
                     "{%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

/* 16 bytes global -> shared, in the current group (pred false: zeros) */
__device__ __forceinline__ void cp_async16(void *dst, const void *src,
                                                  bool pred)
{
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    int n = pred ? 16 : 0;      /* 0: the 16 bytes are zero-filled */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(d), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

/* Raises the kernel's dynamic shared-memory limit once per device (set:
 * one bit per device ordinal, static in the caller). Returns whether
 * launches may ask for sm bytes (no opt-in needed, or it succeeded). */
template <typename K>
static inline int allow_smem(K kernel, size_t sm, uint64_t *set)
{
    int dev = 0;
    if (sm <= 48 * 1024) return 1;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    uint64_t bit = 1ull << (dev & 63);
    if (!(*set & bit) &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)sm) == cudaSuccess)
        *set |= bit;
    return (*set & bit) != 0;
}

#endif
