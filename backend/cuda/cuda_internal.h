/*
 * cuda_internal.h — the CUDA backend's state, shared by its C files:
 * cuda_backend.c (metadata, the forward, graphs, page moves, destroy),
 * cuda_setup.c (what create does once: weights, workspace, KV pool),
 * attn_plan.c (the attention work items of a forward) and matmul.c
 * (cuBLASLt plans, their timing, gemv.cu's choice). Not part of any public
 * interface.
 *
 * cuda_backend holds the device, the weights (cuda_layer per layer), the
 * activation workspace, the KV pool, the matmul plan cache and tuned
 * choices, the staging of each step's metadata and work items, the CUDA
 * graphs of decode steps, and every device allocation (freed at destroy).
 */
#ifndef PIE_CUDA_INTERNAL_H
#define PIE_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/prof.h"
#include "common/pie_err.h"

#define MAX_TOKENS  8192        /* tokens per forward                      */
#define OUT_CHUNK   256         /* output rows per LM-head pass            */
#define MM_CACHE    96          /* cached cuBLASLt plans                    */
#define TUNED_MAX   256         /* timed algorithm choices (shape, m bucket) */
#define LT_WS_BYTES (32u << 20)
#define GRAPH_CACHE 32          /* captured layer sequences (decode shapes) */
#define GRAPH_MAX_TOKENS 512    /* larger steps launch kernels directly     */

/* A failed CUDA call: returns PIE_EDEVICE, the call's error cleared so
 * that the next, unrelated call does not fail with it, or PIE_EDEVLOST
 * where the error is one the context does not survive (pie__cuda_sticky:
 * every later call fails the same way until the process restarts). */
int pie__cuda_fail(cudaError_t e, const char *file, int line,
                   const char *call);
int pie__cuda_sticky(cudaError_t e);

#define CK(call)                                                              \
    do {                                                                      \
        cudaError_t e_ = (call);                                              \
        if (e_ != cudaSuccess)                                                \
            return pie__cuda_fail(e_, __FILE__, __LINE__, #call);             \
    } while (0)

#define CKLT(call)                                                            \
    do {                                                                      \
        cublasStatus_t s_ = (call);                                           \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                      \
            return pie_err_set(PIE_EDEVICE, "cublasLt: status %d (%s:%d)",   \
                               (int)s_, __FILE__, __LINE__);                  \
    } while (0)

typedef struct cuda_layer {
    float    *attn_norm;   /* (dim)                                        */
    uint16_t *wqkv;        /* ((nh+2nkv)*hd, dim)                          */
    float    *bqkv;        /* ((nh+2nkv)*hd) or NULL                       */
    float    *q_norm;      /* (hd) or NULL                                 */
    float    *k_norm;      /* (hd) or NULL                                 */
    uint16_t *wo;          /* (dim, nh*hd)                                 */
    float    *ffn_norm;    /* (dim)                                        */
    uint16_t *wgu;         /* (2*hidden, dim)                              */
    uint16_t *wdown;       /* (dim, hidden)                                */
} cuda_layer;

typedef struct mm_plan {
    int                     used;
    int32_t                 m, n, k, y_f32;
    cublasLtMatmulDesc_t    desc;
    cublasLtMatrixLayout_t  a, b, c;
    cublasLtMatmulAlgo_t    algo;
    int                     gemv_r; /* > 0: gemv.cu, r warps per block     */
    int                     gemv_r_tuned; /* the tuner's (sweep.c may set  */
                                          /* gemv_r otherwise)             */
    int                     wg;     /* 1: wgmm.cu (17..256 rows)            */
    int                     wmode;  /* its PIE_CUDA_WGMM_* mode, timed      */
} mm_plan;

/* The kernel arguments of one step's layers: two steps with equal keys
 * launch the same kernels with the same arguments (the data they read lives
 * at the same device addresses), so a graph captured for one replays the
 * other. */
typedef struct graph_key {
    void    *meta_dev;
    size_t   tok, pos, slot, req, kv_indptr, kv_len, pages, mask_off,
             mask_bits, items, merges, fitems, gitems, bstart, dmerges;
    int64_t  n, n_items, n_fitems, n_gitems, n_merges, max_slots, decode,
             dec_whole, dec_cluster, dec_cluster_pad, mega;
} graph_key;

typedef struct step_graph {
    graph_key        key;
    cudaGraphExec_t  exec;      /* NULL = free entry                        */
    uint64_t         used;      /* clock of the last launch (LRU)           */
} step_graph;

/* The timed winner for one matmul shape and bucket of m (see pick_algo). */
typedef struct tuned_algo {
    int32_t               n, k, y_f32, mb;
    cublasLtMatmulAlgo_t  algo;
    int32_t               gemv_r;  /* > 0: gemv.cu won (m <= 16 only)      */
    int32_t               wg;      /* 1: wgmm.cu won (17..256 rows)        */
} tuned_algo;

typedef struct cuda_sweep cuda_sweep;   /* sweep.c */

typedef struct cuda_backend {
    pie_backend       base;
    pie_model_config  cfg;
    int               device, n_sm, l2_bytes;
    int               split_blocks; /* PIE_CUDA_SPLIT_BLOCKS (default 2)   */
    int               random_fill; /* random:SHAPE: absent tensors filled  */
    cudaStream_t      st;
    cublasLtHandle_t  lt;
    void             *lt_ws;
    mm_plan           plans[MM_CACHE];
    int               plan_next;
    tuned_algo        tuned[TUNED_MAX];
    int               n_tuned, tuned_next;
    /* weights */
    uint16_t         *embed;      /* (vocab, dim)                           */
    uint16_t         *lm_head;    /* (vocab, dim); == embed when tied       */
    float            *final_norm; /* (dim)                                  */
    float            *inv_freq;   /* (hd/2) RoPE frequencies, llama3-scaled */
    cuda_layer       *layers;     /* (n_layers)                             */
    pie_cuda_kv       kv;
    /* workspace */
    float            *x;          /* (MAX_TOKENS, dim) residual stream      */
    float            *dx;         /* (MAX_TOKENS, dim) scratch output of    */
                                  /* wo / w_down plans at creation (steps   */
                                  /* add into x in the matmul: mm_add)      */
    uint16_t         *xb;         /* (MAX_TOKENS, max(dim, nh*hd))          */
    uint16_t         *qkv;        /* (MAX_TOKENS, (nh+2nkv)*hd)             */
    float            *q;          /* (MAX_TOKENS, nh*hd)                    */
    uint16_t         *att;        /* (MAX_TOKENS, nh*hd)                    */
    uint16_t         *gu;         /* (MAX_TOKENS, 2*hidden)                 */
    uint16_t         *h;          /* (MAX_TOKENS, hidden)                   */
    float            *part_o;     /* (max_parts, hd)                        */
    float            *part_ml;    /* (max_parts, 2)                         */
    int64_t           max_parts;
    uint16_t         *xo;         /* (OUT_CHUNK, dim)                       */
    float            *logits;     /* (OUT_CHUNK, vocab)                     */
    float            *sort_k[2];  /* (OUT_CHUNK, vocab)                     */
    int32_t          *sort_v[2];
    int32_t          *seg_off;    /* (OUT_CHUNK+1)                          */
    void             *sort_tmp;
    size_t            sort_tmp_bytes;
    int32_t          *d_tokens;   /* (OUT_CHUNK)                            */
    float            *d_values;   /* (OUT_CHUNK * vocab)                    */
    int32_t          *d_ids;      /* (OUT_CHUNK * vocab)                    */
    /* batch metadata: built in host, copied to pinned, then to device */
    uint8_t          *meta;       /* host build buffer                      */
    uint8_t          *meta_pin;   /* pinned copy                            */
    uint8_t          *meta_dev;
    size_t            meta_cap, meta_len, meta_dev_cap;
    int               meta_oom;
    pie_cuda_attn_item  *items;   /* host staging of attention work       */
    pie_cuda_merge_item *merges;
    int64_t           n_items, cap_items, n_merges, cap_merges;
    pie_cuda_attn_item  *fitems;  /* tensor-core prefill tiles             */
    int64_t           n_fitems, cap_fitems;
    pie_cuda_attn_item  *gitems;  /* tensor-core grouped (decode) items,   */
    int64_t           n_gitems, cap_gitems; /* whole, one per tile x head */
    pie_cuda_attn_item  *pieces;  /* gitems cut for the persistent grid    */
    int32_t          *bstart;     /* (cap_bstart + 1), see dec_plan.c     */
    pie_cuda_merge_item *dmerges; /* (dec_blocks) merges of cut items      */
    int64_t           cap_pieces;
    int               n_pieces, n_dmerges;
    int               dec_blocks; /* the cut plan's grid                   */
    int               dec_per_sm; /* decode blocks resident per SM (cut)   */
    int               dec_whole_max; /* and at most, of any build (whole */
                                  /* plans)                                */
    int64_t           dec_max1;   /* one-per-SM plan's bound (dec_calib.c) */
    int               cap_bstart; /* the largest grid: max(dec_blocks,     */
                                  /* dec_whole_max x SMs)                  */
    int               dec_cluster_max; /* largest cluster plan that runs */
    int               dec_cluster_max_pad[4]; /* [k]: padded to k an SM  */
    int               dec_cluster; /* this step: the cluster plan, clusters */
                                   /* of dec_cluster blocks; 0: not        */
    int               dec_cluster_pad; /* its blocks an SM at most; 0: any */
    int               dec_whole;  /* this step: the whole-item plan on    */
                                  /* dec_whole blocks per SM, no merge     */
                                  /* (dec_plan.c); 0: the cut plan         */
    int               max_slots;  /* longest item of the current step     */
    /* CUDA graphs of the layer sequence, keyed by the kernel arguments */
    step_graph        graphs[GRAPH_CACHE];
    graph_key         last_key;   /* previous eager step's key              */
    uint64_t          graph_clock;
    int               graphs_off; /* PIE_CUDA_NO_GRAPH set                  */
    int               qkv_unfused;/* PIE_CUDA_NO_QKV_FUSE set (cuda_mm_qkv) */
    int               capture_failed; /* a capture failed: direct launches  */
    int               cluster_refused; /* this step's cluster launch was    */
                                   /* refused: it runs again, planned      */
                                   /* without clusters (cuda_forward)      */
    int               refuse_clusters; /* PIE_CUDA_TEST_REFUSE_CLUSTER set  */
    int64_t           n_replans;   /* steps run again without clusters    */
    int               lost;        /* the context is lost (PIE_EDEVLOST):  */
    char              lost_msg[256]; /* every later call fails at once     */
    int64_t           n_captured, n_replayed;
    int64_t           n_gemv;      /* matmuls run by gemv.cu               */
    int64_t           n_wgmm;      /* matmuls run by wgmm.cu               */
    pie_cuda_wgmm_ws  wgmm;        /* its workspace (one block an SM)      */
    int               decode_step; /* this forward adds one token to every */
                                   /* request: gemv.cu may run (mm)        */
    /* batch-1 decode steps in one kernel (mega.cu); mega_ok: supported
     * here and not turned off, mega_step: this step takes it */
    pie_cuda_mega_args mega;
    int               mega_ok, mega_step;
    int64_t           n_mega;      /* steps that took it                 */
    pie_cuda_prof     prof;        /* PIE_CUDA_PROFILE=1 (prof.h)          */
    pie_cuda_steps    steps;       /* PIE_CUDA_STEPS=1 (prof.h)            */
    cuda_sweep       *sweep;       /* PIE_CUDA_GEMV_SWEEP (sweep.c), NULL  */
    /* every device allocation, freed at destroy */
    void            **allocs;
    int               n_allocs, cap_allocs;
} cuda_backend;

#define TRY(x) do { if ((rc = (x))) return rc; } while (0)

/* ---- matmul.c ---- */

/* y (m, n) = x (m, k) . W^T, W (n, k) bf16, x bf16, y f32 (y_f32) or
 * bf16: cuBLASLt with the plan (and timed algorithm) of this shape, or
 * gemv.cu in decode steps where it timed faster. */
int cuda_mm(cuda_backend *c, void *y, int y_f32, const uint16_t *W, int n,
            int k, const uint16_t *x, int m);
/* y (m, n) f32 += x . W^T (the residual add of wo and w_down). */
int cuda_mm_add(cuda_backend *c, float *y, const uint16_t *W, int n, int k,
                const uint16_t *x, int m);
/* h (m, hid) = silu(gate) * up of x . Wgu^T (Wgu: gate rows, then up rows),
 * through gu (m, 2 hid) unless gemv.cu fuses it. */
int cuda_mm_glu(cuda_backend *c, uint16_t *h, uint16_t *gu,
                const uint16_t *Wgu, int hid, int k, const uint16_t *x, int m);
/* The qkv matmul (W: qkv rows, n = (nh + 2 n_kv) hd) with qkv_post (e)
 * fused, in decode steps where gemv.cu won the qkv shape (qkv is not
 * written): 0 done, 1 not taken (the caller runs cuda_mm and qkv_post),
 * or an error. */
int cuda_mm_qkv(cuda_backend *c, const pie_cuda_qkv_epi *e, const uint16_t *W,
                int n, int k, const uint16_t *x, int m);
/* The warps (1, 2, 4 or 8) a list "NxK:r,..." gives gemv.cu for the
 * weight of n x k; 0 where it names none (or list is NULL). The format of
 * PIE_CUDA_GEMV_FORCE and of each PIE_CUDA_GEMV_SWEEP configuration. */
int cuda_gemv_warps_listed(const char *list, int n, int k);
/* Frees a plan's cuBLASLt descriptors. */
void cuda_plan_free(mm_plan *p);
/* Makes and times the plans of every decode-sized m bucket at creation. */
int cuda_warm_plans(cuda_backend *c);

/* ---- cuda_setup.c: what create does once ---- */

/* Slots one attention split of the one-kernel batch-1 decode (mega.cu)
 * aims at, and holds at most (its scores live in shared memory). */
#define MEGA_SPLIT 64
#define MEGA_SPLIT_MAX 1024

/* 0 if the CUDA kernels support the model's shape, else an error saying
 * what they lack. */
int cuda_check_shape(const pie_model_config *g);
/* The device ordinal o asks for (0 by default), checked against the GPUs
 * this machine has. */
int cuda_pick_device(const pie_backend_opts *o, int *dev);
/* Selects c->device; creates the stream and the cuBLASLt handle; reads
 * the SM count and L2 size. */
int cuda_open_device(cuda_backend *c);
/* Plans, weights, workspace, KV pool and timed matmuls (cuda_setup.c's
 * header), then waits for the device. On failure what was allocated is in
 * c->allocs for destroy. */
int cuda_setup_device(cuda_backend *c, const pie_model *m,
                      const pie_backend_opts *o);

/* ---- sweep.c: gemv.cu's warps compared as whole decode steps ---- */

/* Reads PIE_CUDA_GEMV_SWEEP (off where unset). */
void cuda_sweep_init(cuda_backend *c);
/* Around each forward (decode: a decode step of n tokens; rc: its
 * result). */
void cuda_sweep_before(cuda_backend *c, int decode, int n);
void cuda_sweep_after(cuda_backend *c, int decode, int n, int rc);
/* Prints the configurations' mean step times; frees the state. */
void cuda_sweep_done(cuda_backend *c);

/* ---- attn_plan.c ---- */

/* Request r's KV length in slots (its pages, the last one partly). */
int64_t cuda_kv_len(const pie_forward_batch *b, int r, int ps);
/* Whether a prompt of n_new tokens takes the tensor-core prefill kernel. */
int cuda_use_flash(const cuda_backend *c, int n_new);
/* Tokens a tile of the decode (or CUDA-core) attention kernel holds. */
int cuda_tile_tokens(const cuda_backend *c);
/* qsort order of prefill tiles: the longest (most slots) first. */
int cuda_cmp_longest(const void *a, const void *b);
/* Plans the batch's attention into c's item lists (attn_plan.c's header);
 * want = splits wished per tile of the CUDA-core kernel, range_of[t] =
 * slots token t may see under its mask. Returns the partial rows the
 * split items need, or a negative code. */
int64_t cuda_plan_attention(cuda_backend *c, const pie_forward_batch *b,
                            int want, const uint32_t *range_of);

#endif
