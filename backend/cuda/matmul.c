/*
 * matmul.c — the CUDA backend's dense matmuls: one cuBLASLt plan per
 * (m, n, k, output type), cached (MM_CACHE); up to TUNE_MAX_M rows the
 * heuristic's candidates and their split-K variants, and for decode-sized
 * m gemv.cu (m <= 16) and wgmm.cu (17..256), are timed once per weight
 * shape and bucket of m (m_bucket) and the fastest is kept (tuned_algo).
 * State lives in cuda_backend (cuda_internal.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

/* y = x W^T, or (acc, f32 y) y += x W^T in the matmul's epilogue. */
static cublasStatus_t mm_run(cuda_backend *c, mm_plan *p,
                             const cublasLtMatmulAlgo_t *a, const uint16_t *W,
                             const uint16_t *x, void *y, int acc)
{
    float alpha = 1.0f, beta = acc ? 1.0f : 0.0f;
    return cublasLtMatmul(c->lt, p->desc, &alpha, W, p->a, x, p->b, &beta, y,
                          p->c, y, p->c, a, c->lt_ws, LT_WS_BYTES, c->st);
}

/* One candidate of a timing run: cuBLASLt algo a, or (gemv_r > 0) gemv.cu
 * with gemv_r warps per block over gemv_m rows of x (>= the plan's m: the
 * operands must hold gemv_m rows; warm_plans' buffers hold >= OUT_CHUNK),
 * or (wg) wgmm.cu. */
typedef struct mm_cand {
    const cublasLtMatmulAlgo_t *a;
    int                         gemv_r, gemv_m, wg;
} mm_cand;

/* wgmm.cu on one block an SM; mode as pie__cuda_wgmm. */
static int wgmm_run(cuda_backend *c, void *y, int mode, const uint16_t *W,
                    int n, int k, const uint16_t *x, int m)
{
    return pie__cuda_wgmm(y, mode, W, n, k, x, m, &c->wgmm, c->n_sm,
                          pie__cuda_pdl(), c->st);
}

static int cand_run(cuda_backend *c, mm_plan *p, mm_cand k, const uint16_t *W,
                    const uint16_t *x, void *y)
{
    if (k.wg && p->wmode == PIE_CUDA_WGMM_GLU)  /* (into h: y is gu) */
        return wgmm_run(c, c->h, p->wmode, W, p->n / 2, p->k, x, p->m) == 0;
    if (k.wg)
        return wgmm_run(c, y, p->wmode, W, p->n, p->k, x, p->m) == 0;
    if (k.gemv_r > 0)
        return pie__cuda_gemv(y, p->y_f32, W, p->n, p->k, x, k.gemv_m,
                              k.gemv_r, pie__cuda_pdl(), c->st) == 0;
    return mm_run(c, p, k.a, W, x, y, 0) == CUBLAS_STATUS_SUCCESS;
}

/* Fastest of `reps` runs (ms) of candidate k, writing y (the call's own
 * output, overwritten by the real call next, or scratch for a call that
 * accumulates into its output); W and x are the real operands (their
 * values do not matter).
 * Before each run a read of a sampler buffer twice as large as the L2
 * cache evicts W, as in a real step where the weights stream from memory
 * (a read, not a memset: dirty lines would be written back during the
 * timed run). */
static float time_cand(cuda_backend *c, mm_plan *p, mm_cand k,
                       const uint16_t *W, const uint16_t *x, void *y, int reps)
{
    size_t flush = (size_t)OUT_CHUNK * c->cfg.vocab_size * 4;
    if (flush > (size_t)c->l2_bytes * 2) flush = (size_t)c->l2_bytes * 2;
    /* As in a step, a small kernel runs just before (an RMSNorm of m rows
     * into the sampler's scratch), so the timing includes how each
     * candidate starts after a kernel (gemv.cu: early, under PDL). */
    int lead = (size_t)p->m * c->cfg.dim * 2 <= (size_t)OUT_CHUNK *
                                                c->cfg.vocab_size * 4;
    float best = INFINITY;
    cudaEvent_t e0, e1;
    if (cudaEventCreate(&e0) != cudaSuccess) return INFINITY;
    if (cudaEventCreate(&e1) != cudaSuccess) { cudaEventDestroy(e0); return INFINITY; }
    int ok = cand_run(c, p, k, W, x, y);
    for (int i = 0; ok && i < reps; i++) {
        float ms = INFINITY;
        pie__cuda_l2_flush(c->sort_k[1], (int64_t)(flush / 4), c->sort_k[0],
                           c->st);
        cudaEventRecord(e0, c->st);
        if (lead)
            pie__cuda_rmsnorm((uint16_t *)c->sort_k[0], c->x, c->final_norm,
                              NULL, p->m, c->cfg.dim, c->cfg.norm_eps, c->st);
        ok = cand_run(c, p, k, W, x, y);
        cudaEventRecord(e1, c->st);
        if (ok && cudaEventSynchronize(e1) == cudaSuccess &&
            cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms < best)
            best = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaGetLastError();
    return ok ? best : INFINITY;
}

/* cuBLASLt's first heuristic is often not the fastest (small m: split-K
 * choices; the 1B shape's prefill matmuls too): the candidates are timed
 * once per (shape, bucket of m: see m_bucket), when a plan is made outside
 * graph capture, and the winner is reused for every m of the bucket it is
 * valid for (batch sizes vary step to step in serving). Decode buckets (m
 * <= TUNE_WARM_M) are timed when the backend starts (cuda_warm_plans);
 * prefill buckets up to TUNE_MAX_M on their first forward (at m = 4096:
 * 76 ms for the 1B shape's four matmuls, 126 ms for the 8B's, once a
 * process and bucket). That gave the 1B prefill 1-3% (4 x 2048: 242-244k
 * -> 245-252k tok/s in two calls), and the 8B nothing: the first
 * heuristic wins each of its shapes at m 512, 2048 and 4096 (NOTES.md,
 * round 24). Since the choice is timed in each process, a prefill's last
 * bits may differ between processes, as a decode step's already could
 * (TUNE_MARGIN makes near ties rarer, not impossible). */
#define TUNE_WARM_M 256
#define TUNE_MAX_M 8192
#define TUNE_ALGOS 16

/* A later candidate (the heuristic's order, then split-K variants)
 * replaces the best so far only if it is this much faster: near ties went
 * one way in one process and the other in the next, which moved 8B
 * batch-256 steps by 0.1-0.2 ms between runs of one binary (NOTES.md,
 * round 9). */
#define TUNE_MARGIN 0.97f

static int beats(float ms, float best)
{
    return ms < best * TUNE_MARGIN;     /* (best may be INFINITY) */
}

/* Buckets of m: 1..8 (decode of a few sequences: one choice, so forwards
 * of different small row counts round alike), then powers of two. */
static int m_bucket(int m)
{
    int b = 8;
    while (b < m) b *= 2;
    return b;
}

static tuned_algo *tuned_find(cuda_backend *c, const mm_plan *p, int mb)
{
    for (int i = 0; i < c->n_tuned; i++) {
        tuned_algo *t = &c->tuned[i];
        if (t->n == p->n && t->k == p->k && t->y_f32 == p->y_f32 &&
            t->mb == mb)
            return t;
    }
    return NULL;
}

/* Timing runs kernels, which must not land in a graph being captured. */
static int can_time(cuda_backend *c)
{
    enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(c->st, &cs) == cudaSuccess &&
           cs == cudaStreamCaptureStatusNone;
}

/* The heuristic rarely offers split-K for square decode matmuls (wo: n = k
 * = dim), whose few output tiles leave most SMs idle at m <= 8: the
 * candidates are also timed with their K split 2, 4 and 8 ways (reduced
 * in the workspace) where cuBLASLt accepts that configuration. */
static void try_split_k(cuda_backend *c, mm_plan *p,
                        const cublasLtMatmulHeuristicResult_t *res, int found,
                        const uint16_t *W, const uint16_t *x, void *y,
                        float *best)
{
    for (int i = 0; i < found; i++)
        for (uint32_t sk = 2; sk <= 8; sk *= 2) {
            cublasLtMatmulAlgo_t a = res[i].algo;
            uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
            cublasLtMatmulHeuristicResult_t chk;
            if (cublasLtMatmulAlgoConfigSetAttribute(
                    &a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &sk, sizeof sk) ||
                cublasLtMatmulAlgoConfigSetAttribute(
                    &a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                    sizeof scheme) ||
                cublasLtMatmulAlgoCheck(c->lt, p->desc, p->a, p->b, p->c, p->c,
                                        &a, &chk) != CUBLAS_STATUS_SUCCESS ||
                chk.workspaceSize > LT_WS_BYTES)
                continue;
            float ms = time_cand(c, p, (mm_cand){ &a, 0, 0, 0 }, W, x, y, 2);
            if (beats(ms, *best)) { *best = ms; p->algo = a; }
        }
}

/* "NxK:r,..." lists (cuda_internal.h) */
int cuda_gemv_warps_listed(const char *list, int n, int k)
{
    int fn, fk, fr, used;
    while (list && sscanf(list, "%dx%d:%d%n", &fn, &fk, &fr, &used) == 3) {
        if (fn == n && fk == k && (fr == 1 || fr == 2 || fr == 4 || fr == 8))
            return fr;
        list += used;
        list += *list == ',';
    }
    return 0;
}

/* The warps a block of gemv.cu takes for the weight of n x k in the
 * bucket of gm rows of x, from the times t of 1, 2, 4 and 8 warps
 * (fastest gbest). At gm = 8 (batches of 1..8): the most warps within
 * PIE_CUDA_GEMV_TIE (a fraction, default 0.02) of the fastest. Timed
 * alone, 1B's gate/up ties at 1, 2 and 4 warps and went either way from
 * one process to the next, but 4 made batch-1 steps 4% faster (NOTES.md,
 * round 22: under PDL a block issues two rounds of loads a warp before the
 * kernel before it ends). At gm = 16, or with a tie of 0: the fastest,
 * the fewest warps of equal times (the rule above made 8B batch 16 1.3%
 * slower: gate/up at 8 warps). */
static int gemv_warps_pick(int n, int k, int gm, const float *t, float gbest)
{
    /* PIE_CUDA_GEMV_FORCE: pinned (comparisons; in both buckets) */
    int fr = cuda_gemv_warps_listed(getenv("PIE_CUDA_GEMV_FORCE"), n, k);
    if (fr) return fr;
    const char *e = getenv("PIE_CUDA_GEMV_TIE");
    double tie = gm > 8 ? 0.0 : e ? atof(e) : 0.02;
    if (tie > 0.0)                  /* (NaN and negatives: the fastest) */
        for (int r = 8, i = 3; r >= 1; r /= 2, i--)
            if (t[i] <= gbest * (1.0 + tie)) return r;
    for (int r = 1, i = 0; r <= 8; r *= 2, i++)
        if (t[i] == gbest) return r;
    return 1;
}

/* Decode matmuls (m <= 16) stream W once; gemv.cu does that at a higher
 * bandwidth than cuBLASLt for most weight shapes. Its variants are timed
 * at the bucket's largest m (8 or 16, its slowest row count) and win only
 * where they beat cuBLASLt's best (timed at the plan's m) there too. */
static void try_gemv(cuda_backend *c, mm_plan *p, const uint16_t *W,
                     const uint16_t *x, void *y, float best)
{
    const int gm = m_bucket(p->m);
    p->gemv_r = 0;
    if (gm > PIE_CUDA_GEMV_MAX_M || getenv("PIE_CUDA_NO_GEMV") ||
        !pie__cuda_gemv_supported(gm, p->k, W, x))
        return;
    float lt = best, t[4], gbest = INFINITY;
    for (int r = 1, i = 0; r <= 8; r *= 2, i++) {
        t[i] = time_cand(c, p, (mm_cand){ NULL, r, gm, 0 }, W, x, y, 3);
        if (t[i] < gbest) gbest = t[i];
    }
    int gr = gemv_warps_pick(p->n, p->k, gm, t, gbest);
    float tg = t[__builtin_ctz((unsigned)gr)];   /* r = 1, 2, 4, 8 */
    /* PIE_CUDA_GEMV=1 (comparisons, tests): gemv.cu wherever it runs,
     * also where cuBLASLt is faster than the warps forced */
    if (tg < lt || (getenv("PIE_CUDA_GEMV") && tg < INFINITY))
        p->gemv_r = gr;
    if (getenv("PIE_CUDA_TUNE_LOG"))
        fprintf(stderr, "pie: tune n %d k %d: cublasLt %.1f us, gemv r1/2/4/8 "
                "%.1f/%.1f/%.1f/%.1f us (m %d) -> %s r%d\n", p->n, p->k,
                lt * 1e3, t[0] * 1e3, t[1] * 1e3, t[2] * 1e3, t[3] * 1e3, gm,
                p->gemv_r ? "gemv" : "cublasLt", p->gemv_r);
}

/* Decode matmuls of 17..256 rows: wgmm.cu, timed at the plan's m in the
 * mode decode steps run (p->wmode: the residual add, the SwiGLU), wins
 * where it beats cuBLASLt's best (for gate/up, without the silu_mul that
 * follows cuBLASLt: a margin in cuBLASLt's favour). PIE_CUDA_NO_WGMM=1:
 * never; PIE_CUDA_WGMM=1 (comparisons, tests): wherever it runs. */
static void try_wgmm(cuda_backend *c, mm_plan *p, const uint16_t *W,
                     const uint16_t *x, void *y, float best)
{
    p->wg = 0;
    if (p->m <= PIE_CUDA_GEMV_MAX_M || getenv("PIE_CUDA_NO_WGMM") ||
        !c->wgmm.part ||
        !pie__cuda_wgmm_supported(PIE_CUDA_WGMM_BF16, p->m, p->n, p->k, W, x))
        return;
    float ms = time_cand(c, p, (mm_cand){ NULL, 0, 0, 1 }, W, x, y, 3);
    if (beats(ms, best) || (getenv("PIE_CUDA_WGMM") && ms < INFINITY))
        p->wg = 1;
    if (getenv("PIE_CUDA_TUNE_LOG"))
        fprintf(stderr, "pie: tune n %d k %d m %d: cublasLt %.1f us, wgmm "
                "%.1f us -> %s\n", p->n, p->k, p->m, best * 1e3, ms * 1e3,
                p->wg ? "wgmm" : "cublasLt");
}

/* The largest m timed: TUNE_MAX_M, or PIE_CUDA_TUNE_MAX_M (256: decode
 * sizes only, as before round 24; 0: none, as PIE_CUDA_NO_TUNE=1). Read
 * once; a value that is not a count keeps the default, with a warning. */
static int tune_max_m(void)
{
    static int v = -1;
    if (v < 0)
        v = getenv("PIE_CUDA_NO_TUNE") ? 0
            : pie__cuda_env_int("PIE_CUDA_TUNE_MAX_M", 0, 1L << 30, TUNE_MAX_M);
    return v;
}

static void pick_algo(cuda_backend *c, mm_plan *p,
                      const cublasLtMatmulHeuristicResult_t *res, int found,
                      const uint16_t *W, const uint16_t *x, void *y)
{
    p->algo = res[0].algo;
    p->gemv_r = 0;
    p->wg = 0;
    if (p->m > tune_max_m()) return;        /* (no gemv.cu, no wgmm.cu) */
    int mb = m_bucket(p->m);
    tuned_algo *t = tuned_find(c, p, mb);
    cublasLtMatmulHeuristicResult_t chk;
    if (t) {                       /* every m of the bucket: the same choice */
        p->gemv_r = t->gemv_r;     /* (the heuristic's algo where the timed */
        p->wg = t->wg;
        if (cublasLtMatmulAlgoCheck(c->lt, p->desc, p->a, p->b, p->c, p->c,
                                    &t->algo, &chk) == CUBLAS_STATUS_SUCCESS &&
            chk.workspaceSize <= LT_WS_BYTES)   /* one does not fit this m) */
            p->algo = t->algo;
        return;
    }
    if (!can_time(c)) return;
    double t0 = pie_cuda_now_s();
    float best = INFINITY, first = INFINITY, heur;
    for (int i = 0; i < found; i++) {
        float ms = time_cand(c, p, (mm_cand){ &res[i].algo, 0, 0, 0 }, W, x, y, 3);
        if (i == 0) first = ms;
        if (beats(ms, best)) { best = ms; p->algo = res[i].algo; }
    }
    heur = best;
    try_split_k(c, p, res, found, W, x, y, &best);
    if (getenv("PIE_CUDA_TUNE_LOG"))
        fprintf(stderr, "pie: tune n %d k %d m %d: cublasLt first %.1f us, "
                "best of %d %.1f, with split-k %.1f (timed in %.1f ms)\n",
                p->n, p->k, mb, first * 1e3, found, heur * 1e3, best * 1e3,
                (pie_cuda_now_s() - t0) * 1e3);
    try_gemv(c, p, W, x, y, best);
    if (!p->gemv_r) try_wgmm(c, p, W, x, y, best);
    t = &c->tuned[c->n_tuned < TUNED_MAX ? c->n_tuned++
                                         : (c->tuned_next++ % TUNED_MAX)];
    *t = (tuned_algo){ p->n, p->k, p->y_f32, mb, p->algo, p->gemv_r, p->wg };
}

static int plan_make(cuda_backend *c, mm_plan *p, int m, int n, int k,
                     int y_f32, int wmode, const uint16_t *W,
                     const uint16_t *x, void *y)
{
    cudaDataType_t yt = y_f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasOperation_t ta = CUBLAS_OP_T;
    memset(p, 0, sizeof *p);
    p->used = 1;            /* the descriptors made so far are freed with */
                            /* the plan, should a later step fail         */
    CKLT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CKLT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                        &ta, sizeof ta));
    CKLT(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k, n, k));
    CKLT(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, k, m, k));
    CKLT(cublasLtMatrixLayoutCreate(&p->c, yt, n, m, n));
    cublasLtMatmulPreference_t pref;
    CKLT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = LT_WS_BYTES;
    cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res[TUNE_ALGOS];
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(
        c->lt, p->desc, p->a, p->b, p->c, p->c, pref, TUNE_ALGOS, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    p->m = m; p->n = n; p->k = k; p->y_f32 = y_f32; p->wmode = wmode;
    if (s != CUBLAS_STATUS_SUCCESS || found == 0)
        return pie_err_set(PIE_EDEVICE, "cublasLt: no algorithm for %dx%dx%d",
                           m, n, k);
    pick_algo(c, p, res, found, W, x, y);
    return 0;
}

void cuda_plan_free(mm_plan *p)
{
    if (!p->used) return;
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof *p);
}

/* The cached plan of (m, n, k, y_f32), made (and timed) on first use,
 * wgmm.cu in mode wmode (PIE_CUDA_WGMM_*: how the caller runs it). */
static int plan_for(cuda_backend *c, mm_plan **out, void *y, int y_f32,
                    int wmode, const uint16_t *W, int n, int k,
                    const uint16_t *x, int m)
{
    for (int i = 0; i < MM_CACHE; i++) {
        mm_plan *q = &c->plans[i];
        if (q->used && q->m == m && q->n == n && q->k == k &&
            q->y_f32 == y_f32) {
            *out = q;
            return 0;
        }
    }
    mm_plan *p = &c->plans[c->plan_next];
    c->plan_next = (c->plan_next + 1) % MM_CACHE;
    cuda_plan_free(p);
    int rc = plan_make(c, p, m, n, k, y_f32, wmode, W, x, y);
    if (rc) { cuda_plan_free(p); return rc; }
    p->gemv_r_tuned = p->gemv_r;
    *out = p;
    return 0;
}

/* y (m, n) = x (m, k) · W^T, W (n, k) bf16, x bf16, y f32 or bf16.
 * gemv.cu and wgmm.cu run only in decode steps (is_decode), so a prompt's
 * prefill takes the same kernels alone or batched, and a sequence's
 * decode logits do not depend on how many others decode with it while the
 * batch stays in one bucket of m (1..8, 9..16, then powers of two: gemv.cu
 * is m-invariant for a given r, wgmm.cu for any m). */
static int mm_to(cuda_backend *c, void *y, int y_f32, int acc,
                 const uint16_t *W, int n, int k, const uint16_t *x, int m)
{
    mm_plan *p;
    int wmode = acc ? PIE_CUDA_WGMM_ACC
                    : y_f32 ? PIE_CUDA_WGMM_F32 : PIE_CUDA_WGMM_BF16;
    /* a plan made here times its candidates into its output: never into
     * the residual stream an accumulating call adds to */
    int rc = plan_for(c, &p, acc ? (void *)c->dx : y, y_f32, wmode, W, n, k,
                      x, m);
    if (rc) return rc;
    if (p->gemv_r > 0 && c->decode_step &&
        pie__cuda_gemv(y, acc ? 2 : y_f32, W, n, k, x, m, p->gemv_r,
                       pie__cuda_pdl(), c->st) == 0) {
        c->n_gemv++;
        return 0;
    }
    if (p->wg && c->decode_step && wgmm_run(c, y, wmode, W, n, k, x, m) == 0) {
        c->n_wgmm++;
        return 0;
    }
    CKLT(mm_run(c, p, &p->algo, W, x, y, acc));
    return 0;
}

int cuda_mm(cuda_backend *c, void *y, int y_f32,
            const uint16_t *W, int n, int k, const uint16_t *x, int m)
{
    return mm_to(c, y, y_f32, 0, W, n, k, x, m);
}

/* y (f32) += x W^T: the residual add of wo and w_down, in the matmul's
 * epilogue (one f32 rounding, as the add of a separate kernel had). */
int cuda_mm_add(cuda_backend *c, float *y, const uint16_t *W, int n, int k,
                const uint16_t *x, int m)
{
    return mm_to(c, y, 1, 1, W, n, k, x, m);
}

/* h (m, hid) = silu(gate) * up of gu = x . Wgu^T: in decode steps where
 * gemv.cu or wgmm.cu won the gate/up shape, one kernel with the SwiGLU in
 * its epilogue (gu is not written); else the matmul into gu, then
 * silu_mul. gemv.cu's gives the same bits as its matmul + silu_mul. */
int cuda_mm_glu(cuda_backend *c, uint16_t *h, uint16_t *gu,
                const uint16_t *Wgu, int hid, int k, const uint16_t *x, int m)
{
    mm_plan *p;
    int rc = plan_for(c, &p, gu, 0, PIE_CUDA_WGMM_GLU, Wgu, 2 * hid, k, x, m);
    if (rc) return rc;
    if (p->gemv_r > 0 && c->decode_step &&
        pie__cuda_gemv_glu(h, Wgu, hid, k, x, m, p->gemv_r, pie__cuda_pdl(),
                           c->st) == 0) {
        c->n_gemv++;
        return 0;
    }
    if (p->wg && c->decode_step &&
        wgmm_run(c, h, PIE_CUDA_WGMM_GLU, Wgu, hid, k, x, m) == 0) {
        c->n_wgmm++;
        return 0;
    }
    CKLT(mm_run(c, p, &p->algo, Wgu, x, gu, 0));  /* the plan found above */
    pie__cuda_silu_mul(h, gu, m, hid, c->st);
    return 0;
}

int cuda_mm_qkv(cuda_backend *c, const pie_cuda_qkv_epi *e, const uint16_t *W,
                int n, int k, const uint16_t *x, int m)
{
    mm_plan *p;
    int rc = plan_for(c, &p, c->qkv, 0, PIE_CUDA_WGMM_BF16, W, n, k, x, m);
    if (rc) return rc;
    if (p->gemv_r > 0 && c->decode_step &&
        pie__cuda_gemv_qkv(e, W, k, x, m, p->gemv_r, pie__cuda_pdl(), c->st) == 0) {
        c->n_gemv++;
        return 0;
    }
    return 1;
}

/* Plans (and times) every matmul shape of a layer and the LM head for the
 * decode-sized buckets of m, so that no step pays for it: each through the
 * call decode steps make (wo and w_down add into scratch here). */
int cuda_warm_plans(cuda_backend *c)
{
    const pie_model_config *g = &c->cfg;
    const cuda_layer *L = &c->layers[0];
    int dim = g->dim, qd = g->n_heads * g->head_dim, hid = g->hidden_dim;
    int qkvd = qd + 2 * g->n_kv_heads * g->head_dim, rc;
    for (int m = 1; m <= TUNE_WARM_M; m = m < 16 ? 16 : 2 * m) {
        TRY(cuda_mm(c, c->qkv, 0, L->wqkv, qkvd, dim, c->xb, m));
        TRY(cuda_mm_add(c, c->dx, L->wo, dim, qd, c->att, m));
        TRY(cuda_mm_glu(c, c->h, c->gu, L->wgu, hid, dim, c->xb, m));
        TRY(cuda_mm_add(c, c->dx, L->wdown, dim, hid, c->h, m));
        TRY(cuda_mm(c, c->logits, 1, c->lm_head, g->vocab_size, dim, c->xo, m));
    }
    CK(cudaStreamSynchronize(c->st));
    return 0;
}
