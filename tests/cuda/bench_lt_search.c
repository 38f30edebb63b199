/*
 * bench_lt_search.c — how far cuBLASLt's heuristic candidates are from its
 * best configuration, for the decode matmuls of the throughput targets
 * (y = x W^T as matmul.c runs it: W (n, k) bf16 transposed, x (m, k) bf16,
 * y bf16, or f32 with the residual add, beta = 1). A benchmark: it prints
 * times, never pass/fail.
 *
 * For each shape it times (µs, W evicted from L2 before every run, as in a
 * step):
 *   heur    the heuristic's first 16 candidates (matmul.c's tuner: TUNE_ALGOS)
 *   heur64  its first 64
 *   all     every configuration cublasLtMatmulAlgoCheck accepts of: each
 *           algorithm id x tile x stages x CTA swizzle x custom option
 *           (Hopper's kernels, which list no stages: x the AUTO depths x
 *           cluster shapes), where none of Hopper's passes the check; and
 *           the heuristic's candidates with one field changed (another
 *           tile, or custom option x cluster shape x swizzle); once each,
 *           the 8 fastest again, best of 5
 * and prints the best of each with its configuration. Found on the H100
 * (NOTES.md, round 19): the heuristic returns 8 candidates however many
 * are asked for; the one-field variants are up to 5% faster here, but the
 * tuner taking them (timed in its step-like setting) did not make steps
 * faster.
 * PIE_LT_SHAPES="m,n,k,f32add;..." replaces the default shapes.
 */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_kernels.h"

#define CU(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) {         \
    fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); }     \
    } while (0)
#define LT(x) do { cublasStatus_t s_ = (x); if (s_ != CUBLAS_STATUS_SUCCESS) { \
    fprintf(stderr, "%s: status %d\n", #x, (int)s_); exit(1); } } while (0)

#define WS_BYTES (32u << 20)
#define MAX_CANDS 20000

typedef struct shape {
    int m, n, k, add;       /* add: y f32 += x W^T, else y bf16 = x W^T */
    const char *name;
} shape;

typedef struct bench {
    cublasLtHandle_t        lt;
    cublasLtMatmulDesc_t    desc;
    cublasLtMatrixLayout_t  a, b, c;
    void                   *W, *x, *y, *ws;
    float                  *flush, *sink;
    int64_t                 flush_n;
    int                     add;
    cudaStream_t            st;
    cudaEvent_t             e0, e1;
} bench;

typedef struct cand {
    cublasLtMatmulAlgo_t algo;
    float                us;
} cand;

static cand cands[MAX_CANDS];
static cublasLtMatmulAlgo_t heur_algos[64];    /* the last heuristic's */
static int n_heur;

static int cap_list(const cublasLtMatmulAlgo_t *a,
                    cublasLtMatmulAlgoCapAttributes_t at, uint32_t **v);
static void set_cfg(cublasLtMatmulAlgo_t *a,
                    cublasLtMatmulAlgoConfigAttributes_t at, uint32_t v);

/* One run of algo (W evicted from L2 first); µs, or INFINITY. */
static float run_once(bench *B, const cublasLtMatmulAlgo_t *algo)
{
    float alpha = 1.0f, beta = B->add ? 1.0f : 0.0f, ms = INFINITY;
    pie__cuda_l2_flush(B->flush, B->flush_n, B->sink, B->st);
    cudaEventRecord(B->e0, B->st);
    cublasStatus_t s = cublasLtMatmul(B->lt, B->desc, &alpha, B->W, B->a,
                                      B->x, B->b, &beta, B->y, B->c, B->y,
                                      B->c, algo, B->ws, WS_BYTES, B->st);
    cudaEventRecord(B->e1, B->st);
    if (s != CUBLAS_STATUS_SUCCESS ||
        cudaEventSynchronize(B->e1) != cudaSuccess ||
        cudaEventElapsedTime(&ms, B->e0, B->e1) != cudaSuccess) {
        cudaGetLastError();
        return INFINITY;
    }
    return ms * 1e3f;
}

static float best_of(bench *B, const cublasLtMatmulAlgo_t *algo, int reps)
{
    float best = INFINITY;
    if (run_once(B, algo) == INFINITY) return INFINITY;    /* warm-up */
    for (int i = 0; i < reps; i++) {
        float us = run_once(B, algo);
        if (us < best) best = us;
    }
    return best;
}

static int cfg_get(const cublasLtMatmulAlgo_t *a,
                   cublasLtMatmulAlgoConfigAttributes_t at)
{
    int v = 0;
    size_t w = 0;
    uint32_t u = 0;
    uint16_t h = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(a, at, &u, sizeof u, &w) ==
        CUBLAS_STATUS_SUCCESS)
        v = (int)u;
    else if (cublasLtMatmulAlgoConfigGetAttribute(a, at, &h, sizeof h, &w) ==
             CUBLAS_STATUS_SUCCESS)
        v = h;
    return v;
}

static void describe(const char *what, const cublasLtMatmulAlgo_t *a, float us)
{
    printf("  %-6s %8.1f us  id %d tile %d stages %d splitk %d swizzle %d "
           "custom %d cluster %d\n", what, us,
           cfg_get(a, CUBLASLT_ALGO_CONFIG_ID),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_TILE_ID),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_STAGES_ID),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
           cfg_get(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
}

/* The heuristic's first `want` candidates (kept in heur_algos), each best
 * of 3; returns the best (µs) and its algo in *out. */
static float heuristic(bench *B, int want, cublasLtMatmulAlgo_t *out,
                       int *n_found)
{
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = WS_BYTES;
    cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res[64];
    if (want > 64) want = 64;
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(B->lt, B->desc, B->a, B->b, B->c, B->c,
                                       pref, want, res, &found) !=
        CUBLAS_STATUS_SUCCESS)
        found = 0;
    cublasLtMatmulPreferenceDestroy(pref);
    float best = INFINITY;
    for (int i = 0; i < found; i++) {
        float us = best_of(B, &res[i].algo, 3);
        if (us < best) { best = us; *out = res[i].algo; }
        heur_algos[i] = res[i].algo;
    }
    n_heur = found;
    *n_found = found;
    return best;
}

/* Accepted by cublasLtMatmulAlgoCheck (and its workspace fits). */
static int accepted(bench *B, cublasLtMatmulAlgo_t *a)
{
    cublasLtMatmulHeuristicResult_t chk;
    return cublasLtMatmulAlgoCheck(B->lt, B->desc, B->a, B->b, B->c, B->c, a,
                                   &chk) == CUBLAS_STATUS_SUCCESS &&
           chk.workspaceSize <= WS_BYTES;
}

/* Candidate a with custom option o, CTA swizzle w and cluster shape
 * index cl (0: auto, else enum value cl + 1), timed once into cands[n]
 * where cuBLASLt accepts it; returns the new count. */
static int add_cand(bench *B, cublasLtMatmulAlgo_t a, int o, int w, int cl,
                    int n)
{
    uint16_t cs = (uint16_t)(cl ? cl + 1 : 0);
    set_cfg(&a, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, (uint32_t)o);
    set_cfg(&a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, (uint32_t)w);
    cublasLtMatmulAlgoConfigSetAttribute(
        &a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cs, sizeof cs);
    if (n >= MAX_CANDS || !accepted(B, &a)) return n;
    cands[n].algo = a;
    cands[n].us = run_once(B, &a);
    return n + 1;
}

/* The heuristic's candidates with one field changed at a time: every tile
 * of their algorithm, custom options 0..7 x cluster shapes 0, 2..10 x CTA
 * swizzle; once each, appended to cands from n. */
static int mutate(bench *B, int n)
{
    for (int h = 0; h < n_heur; h++) {
        const cublasLtMatmulAlgo_t *base = &heur_algos[h];
        uint32_t *tiles = NULL;
        int nt = cap_list(base, CUBLASLT_ALGO_CAP_TILE_IDS, &tiles);
        for (int t = 0; t < nt && n < MAX_CANDS; t++) {
            cublasLtMatmulAlgo_t a = *base;
            set_cfg(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, tiles[t]);
            if (!accepted(B, &a)) continue;
            cands[n].algo = a;
            cands[n++].us = run_once(B, &a);
        }
        free(tiles);
        for (int o = 0; o < 8; o++)
            for (int cl = 0; cl < 10; cl++)
                for (int w = 0; w < 2; w++) n = add_cand(B, *base, o, w, cl, n);
    }
    return n;
}

static int get_ids(bench *B, int *ids, int cap)
{
    int n = 0;
    if (cublasLtMatmulAlgoGetIds(B->lt, CUBLAS_COMPUTE_32F, CUDA_R_32F,
                                 CUDA_R_16BF, CUDA_R_16BF,
                                 B->add ? CUDA_R_32F : CUDA_R_16BF,
                                 B->add ? CUDA_R_32F : CUDA_R_16BF, cap, ids,
                                 &n) != CUBLAS_STATUS_SUCCESS)
        return 0;
    return n;
}

/* Values of a capability list (tiles, stages), malloc'd into *v; {0}
 * where it has none. Returns the count. */
static int cap_list(const cublasLtMatmulAlgo_t *a,
                    cublasLtMatmulAlgoCapAttributes_t at, uint32_t **v)
{
    size_t w = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(a, at, NULL, 0, &w) !=
            CUBLAS_STATUS_SUCCESS || w < sizeof **v ||
        !(*v = malloc(w)) ||
        cublasLtMatmulAlgoCapGetAttribute(a, at, *v, w, &w) !=
            CUBLAS_STATUS_SUCCESS) {
        *v = realloc(*v, sizeof **v);
        (*v)[0] = 0;
        return 1;
    }
    return (int)(w / sizeof **v);
}

static int cap_int(const cublasLtMatmulAlgo_t *a,
                   cublasLtMatmulAlgoCapAttributes_t at)
{
    int32_t v = 0;
    size_t w = 0;
    cublasLtMatmulAlgoCapGetAttribute(a, at, &v, sizeof v, &w);
    return v;
}

static void set_cfg(cublasLtMatmulAlgo_t *a,
                    cublasLtMatmulAlgoConfigAttributes_t at, uint32_t v)
{
    cublasLtMatmulAlgoConfigSetAttribute(a, at, &v, sizeof v);
}

/* Every accepted configuration of algo id, once each, into cands. */
static int enumerate(bench *B, int id, int n)
{
    cublasLtMatmulAlgo_t base;
    if (cublasLtMatmulAlgoInit(B->lt, CUBLAS_COMPUTE_32F, CUDA_R_32F,
                               CUDA_R_16BF, CUDA_R_16BF,
                               B->add ? CUDA_R_32F : CUDA_R_16BF,
                               B->add ? CUDA_R_32F : CUDA_R_16BF, id, &base) !=
        CUBLAS_STATUS_SUCCESS)
        return n;
    uint32_t *tiles = NULL, *stages = NULL;
    int nt = cap_list(&base, CUBLASLT_ALGO_CAP_TILE_IDS, &tiles);
    int ns = cap_list(&base, CUBLASLT_ALGO_CAP_STAGES_IDS, &stages);
    int swz = cap_int(&base, CUBLASLT_ALGO_CAP_CTA_SWIZZLING_SUPPORT);
    int cust = cap_int(&base, CUBLASLT_ALGO_CAP_CUSTOM_OPTION_MAX);
    if (cust > 3) cust = 3;
    /* (Hopper's kernels list no stages: the AUTO depths of k 16..128, and
     * their cluster shapes up to 4 x 4) */
    static const uint32_t auto_st[] = { 0, 33, 34, 35, 36 };
    int nc = 1;
    if (ns == 1 && stages[0] == 0) {
        stages = realloc(stages, sizeof auto_st);
        memcpy(stages, auto_st, sizeof auto_st);
        ns = 5;
        nc = 11;        /* cluster shapes 0 (auto), 2..10 */
    }
    if (getenv("PIE_LT_VERBOSE"))
        printf("    id %d: %d tiles, %d stages, swizzle %d, custom 0..%d\n", id,
               nt, ns, swz, cust);
    for (int t = 0; t < nt; t++)
        for (int s = 0; s < ns; s++)
            for (int w = 0; w <= (swz ? 1 : 0); w++)
                for (int o = 0; o <= cust; o++)
                    for (int cl = 0; cl < nc; cl++) {
                        cublasLtMatmulAlgo_t a = base;
                        set_cfg(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, tiles[t]);
                        set_cfg(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, stages[s]);
                        n = add_cand(B, a, o, w, cl, n);
                    }
    free(tiles);
    free(stages);
    return n;
}

static int cmp_us(const void *x, const void *y)
{
    float a = ((const cand *)x)->us, b = ((const cand *)y)->us;
    return a < b ? -1 : a > b;
}

static void setup(bench *B, const shape *s)
{
    cudaDataType_t yt = s->add ? CUDA_R_32F : CUDA_R_16BF;
    cublasOperation_t ta = CUBLAS_OP_T;
    LT(cublasLtMatmulDescCreate(&B->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT(cublasLtMatmulDescSetAttribute(B->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                      &ta, sizeof ta));
    LT(cublasLtMatrixLayoutCreate(&B->a, CUDA_R_16BF, s->k, s->n, s->k));
    LT(cublasLtMatrixLayoutCreate(&B->b, CUDA_R_16BF, s->k, s->m, s->k));
    LT(cublasLtMatrixLayoutCreate(&B->c, yt, s->n, s->m, s->n));
    CU(cudaMalloc(&B->W, (size_t)s->n * s->k * 2));
    CU(cudaMalloc(&B->x, (size_t)s->m * s->k * 2));
    CU(cudaMalloc(&B->y, (size_t)s->m * s->n * 4));
    pie__cuda_fill_bf16(B->W, (int64_t)s->n * s->k, 3, 0.02f, 0, 0);
    pie__cuda_fill_bf16(B->x, (int64_t)s->m * s->k, 5, 1.0f, 0, 0);
    CU(cudaMemset(B->y, 0, (size_t)s->m * s->n * 4));
    B->add = s->add;
}

static void teardown(bench *B)
{
    cublasLtMatrixLayoutDestroy(B->a);
    cublasLtMatrixLayoutDestroy(B->b);
    cublasLtMatrixLayoutDestroy(B->c);
    cublasLtMatmulDescDestroy(B->desc);
    cudaFree(B->W);
    cudaFree(B->x);
    cudaFree(B->y);
}

static void search(bench *B, const shape *s)
{
    setup(B, s);
    printf("%s: m %d n %d k %d %s\n", s->name, s->m, s->n, s->k,
           s->add ? "f32 += (residual)" : "bf16");
    cublasLtMatmulAlgo_t h, best;
    int nf = 0, ids[256];
    float hu = heuristic(B, 16, &h, &nf);
    if (hu < INFINITY) describe("heur", &h, hu);
    cublasLtMatmulAlgo_t h64;
    int nf64 = 0;
    float hu64 = heuristic(B, 64, &h64, &nf64);
    if (hu64 < INFINITY) describe("heur64", &h64, hu64);
    printf("  (%d and %d heuristic candidates)\n", nf, nf64);
    int nid = get_ids(B, ids, 256);
    int n = 0;
    for (int i = 0; i < nid; i++) n = enumerate(B, ids[i], n);
    int n0 = n;
    n = mutate(B, n);
    printf("  (%d configurations from the heuristic's, one field changed)\n",
           n - n0);
    qsort(cands, n, sizeof *cands, cmp_us);
    float au = INFINITY;
    for (int i = 0; i < n && i < 8; i++) {
        float us = best_of(B, &cands[i].algo, 5);
        if (us < au) { au = us; best = cands[i].algo; }
    }
    if (au < INFINITY) describe("all", &best, au);
    printf("  (%d configurations accepted); all vs heur %.3f\n", n,
           hu < INFINITY ? au / hu : 0.0);
    teardown(B);
}

static int parse_shapes(const char *e, shape *s, int cap)
{
    int n = 0;
    while (e && *e && n < cap) {
        int m, nn, k, add;
        if (sscanf(e, "%d,%d,%d,%d", &m, &nn, &k, &add) != 4) break;
        s[n++] = (shape){ m, nn, k, add, "custom" };
        e = strchr(e, ';');
        if (e) e++;
    }
    return n;
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    int dev = 0;
    if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
        printf("no CUDA GPU\n");
        return 0;
    }
    shape def[] = {
        { 256, 28672, 4096, 0, "8B gate/up, 256 rows" },
        { 256, 4096, 14336, 1, "8B down, 256 rows" },
        { 256, 6144, 4096, 0, "8B qkv, 256 rows" },
        { 256, 4096, 4096, 1, "8B wo, 256 rows" },
        { 64, 16384, 2048, 0, "1B gate/up, 64 rows" },
        { 64, 2048, 8192, 1, "1B down, 64 rows" },
        { 64, 3072, 2048, 0, "1B qkv, 64 rows" },
        { 64, 2048, 2048, 1, "1B wo, 64 rows" },
    };
    shape cus[16];
    int ns = parse_shapes(getenv("PIE_LT_SHAPES"), cus, 16);
    shape *sh = ns ? cus : def;
    if (!ns) ns = (int)(sizeof def / sizeof def[0]);
    bench B = { 0 };
    LT(cublasLtCreate(&B.lt));
    CU(cudaStreamCreate(&B.st));
    CU(cudaEventCreate(&B.e0));
    CU(cudaEventCreate(&B.e1));
    CU(cudaMalloc(&B.ws, WS_BYTES));
    int l2 = 0;
    CU(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    B.flush_n = (int64_t)l2 * 2 / 4;
    CU(cudaMalloc((void **)&B.flush, (size_t)B.flush_n * 4));
    CU(cudaMalloc((void **)&B.sink, 4096));
    CU(cudaMemset(B.flush, 0, (size_t)B.flush_n * 4));
    for (int i = 0; i < ns; i++) search(&B, &sh[i]);
    cublasLtDestroy(B.lt);
    return 0;
}
