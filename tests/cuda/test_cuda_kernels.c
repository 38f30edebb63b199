/*
 * test_cuda_kernels.c — every CUDA kernel of backend/cuda against a plain C
 * twin written here from the math (llm.c's dev/cuda habit): odd sizes,
 * ragged batches, shuffled pages, causal and run-length masks, split and
 * unsplit attention, the small-m matmul, every sampler and probe against
 * pie_sample_row().
 * Skips (77) when no GPU is present.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "common/pie_err.h"
#include "tests/test_util.h"

#define CU(x)                                                                \
    do {                                                                     \
        cudaError_t e_ = (x);                                                \
        CHECK(e_ == cudaSuccess, "%s: %s", #x, cudaGetErrorString(e_));      \
    } while (0)

static uint64_t rng = 12345;
static float frand(void)   /* uniform [-1, 1) */
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) * (1.0 / 8388608.0)) - 1.0f;
}
static int irand(int n) { return (int)((frand() + 1.0f) * 0.5f * n) % n; }

static float bf(uint16_t h) { return pie_bf16_to_f32(h); }

static void *dput(const void *h, size_t bytes)
{
    void *d = NULL;
    CU(cudaMalloc(&d, bytes ? bytes : 16));
    if (bytes && h) CU(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}
static void dget(void *h, const void *d, size_t bytes)
{
    CU(cudaDeviceSynchronize());
    CU(cudaGetLastError());
    CU(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

/* ------------------------------------------------------------ rmsnorm */
/* rmsnorm of plain and of gathered rows; x is left as it is */
static void test_rmsnorm_dim(int dim)
{
    int n = 5, rows[3] = { 4, 0, 2 };
    size_t xb = sizeof(float) * n * dim;
    float *x = malloc(xb), *w = malloc(sizeof(float) * dim), *xg = malloc(xb);
    for (int i = 0; i < n * dim; i++) x[i] = frand() * 3;
    for (int i = 0; i < dim; i++) w[i] = 1 + frand() * 0.5f;
    float *dx = dput(x, xb), *dw = dput(w, sizeof(float) * dim);
    int32_t *dr = dput(rows, sizeof rows);
    uint16_t *dout = dput(NULL, 2 * n * dim), *out = malloc(2 * n * dim);
    for (int pass = 0; pass < 2; pass++) {
        int m = pass ? 3 : n;
        pie__cuda_rmsnorm(dout, dx, dw, pass ? dr : NULL, m, dim, 1e-5f, 0);
        dget(out, dout, 2 * (size_t)m * dim);
        dget(xg, dx, xb);
        CHECK(memcmp(xg, x, xb) == 0, "rmsnorm dim %d pass %d wrote x", dim,
              pass);
        for (int i = 0; i < m; i++) {
            const float *xr = x + (pass ? rows[i] : i) * dim;
            double ss = 0;
            for (int k = 0; k < dim; k++) ss += xr[k] * xr[k];
            float r = 1.0f / sqrtf((float)(ss / dim) + 1e-5f);
            for (int k = 0; k < dim; k++) {
                float ref = xr[k] * r * w[k], got = bf(out[i * dim + k]);
                CHECK(fabsf(got - ref) <= 1e-2f * fabsf(ref) + 1e-4f,
                      "rmsnorm dim %d row %d col %d: gpu %g cpu %g",
                      dim, i, k, got, ref);
            }
        }
    }
    printf("rmsnorm: %d rows x %d ok (plain and gathered rows)\n", n, dim);
    cudaFree(dx); cudaFree(dw); cudaFree(dr); cudaFree(dout);
    free(x); free(w); free(xg); free(out);
}

/* odd dims take the scalar kernel, multiples of 4 the register-held one
 * (one or several float4 per thread) */
static void test_rmsnorm(void)
{
    int dims[] = { 333, 64, 2048, 4100, 8192, 16384, 20000 };
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++)
        test_rmsnorm_dim(dims[i]);
}

/* ------------------------------------------------------------ silu*mul */
static void test_silu_hid(int hid)
{
    int n = 7;
    float *gu = malloc(sizeof(float) * n * 2 * hid);
    uint16_t *gub = malloc(2 * (size_t)n * 2 * hid);
    for (int i = 0; i < n * 2 * hid; i++) {
        gub[i] = pie_f32_to_bf16(frand() * 6);
        gu[i] = bf(gub[i]);
    }
    uint16_t *dgu = dput(gub, 2 * (size_t)n * 2 * hid);
    uint16_t *dout = dput(NULL, 2 * n * hid), *out = malloc(2 * n * hid);
    pie__cuda_silu_mul(dout, dgu, n, hid, 0);
    dget(out, dout, 2 * (size_t)n * hid);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < hid; i++) {
            float g = gu[t * 2 * hid + i], u = gu[t * 2 * hid + hid + i];
            float ref = g / (1 + expf(-g)) * u, got = bf(out[t * hid + i]);
            CHECK(fabsf(got - ref) <= 1e-2f * fabsf(ref) + 1e-5f,
                  "silu token %d i %d: gpu %g cpu %g", t, i, got, ref);
        }
    printf("silu_mul: %d x %d ok\n", n, hid);
    cudaFree(dgu); cudaFree(dout); free(gu); free(gub); free(out);
}

/* hidden a multiple of 8: groups of 8 a thread, a row per grid row;
 * other sizes (odd, or even but not a multiple of 8): an element a thread */
static void test_silu(void)
{
    test_silu_hid(203);
    test_silu_hid(258);
    test_silu_hid(256);
}

/* --------------------------------------------------------------- gemv */
/* y = x . W^T for one (n, k, y_f32) over every m <= 16 and warps per block
 * r against a double-precision twin; for each r, row 0's result must not
 * depend on m (batched and single decode agree bit for bit). */
static void test_gemv_shape(int n, int k, int y_f32)
{
    const int M = PIE_CUDA_GEMV_MAX_M;
    uint16_t *W = malloc(2 * (size_t)n * k), *x = malloc(2 * (size_t)M * k);
    for (size_t i = 0; i < (size_t)n * k; i++) W[i] = pie_f32_to_bf16(frand());
    for (int i = 0; i < M * k; i++) x[i] = pie_f32_to_bf16(frand());
    double *ref = malloc(sizeof(double) * M * n), *abs_ = malloc(sizeof(double) * M * n);
    for (int j = 0; j < M; j++)
        for (int o = 0; o < n; o++) {
            double acc = 0, a = 0;
            for (int i = 0; i < k; i++) {
                double p = (double)bf(W[(size_t)o * k + i]) * bf(x[j * k + i]);
                acc += p; a += fabs(p);
            }
            ref[j * n + o] = acc; abs_[j * n + o] = a;
        }
    uint16_t *dW = dput(W, 2 * (size_t)n * k), *dx = dput(x, 2 * (size_t)M * k);
    size_t yb = (size_t)M * n * 4;
    void *dy = dput(NULL, yb);
    float *y = malloc(yb), row0[4];
    for (int r = 1, ri = 0; r <= 8; r *= 2, ri++)
        for (int m = 1; m <= M; m++) {
            CU(cudaMemset(dy, 0xff, yb));
            CHECK(pie__cuda_gemv(dy, y_f32, dW, n, k, dx, m, r, r == 2, 0) == 0,
                  "gemv m %d r %d refused", m, r);
            dget(y, dy, yb);
            for (int j = 0; j < m; j++)
                for (int o = 0; o < n; o++) {
                    float got = y_f32 ? y[j * n + o]
                                      : bf(((uint16_t *)y)[j * n + o]);
                    double tol = (y_f32 ? 1e-4 : 8e-3) * abs_[j * n + o] + 1e-6;
                    CHECK(fabs(got - ref[j * n + o]) <= tol,
                          "gemv n %d k %d m %d r %d y[%d][%d]: gpu %g cpu %g",
                          n, k, m, r, j, o, got, ref[j * n + o]);
                }
            float g0 = y_f32 ? y[0] : bf(((uint16_t *)y)[0]);
            CHECK(m == 1 || memcmp(&g0, &row0[ri], 4) == 0,
                  "gemv row 0 differs at m %d r %d", m, r);
            row0[ri] = g0;
            /* nothing past the m rows is written */
            const unsigned char *yb8 = (const unsigned char *)y;
            size_t row_bytes = (size_t)n * (y_f32 ? 4 : 2), bad = 0;
            for (size_t i = (size_t)m * row_bytes; i < (size_t)M * row_bytes; i++)
                bad += yb8[i] != 0xff;
            CHECK(bad == 0, "gemv m %d wrote %zu bytes past row m", m, bad);
        }
    if (y_f32) {    /* accumulating: y += x W^T onto y = 0.5 */
        for (size_t i = 0; i < (size_t)M * n; i++) y[i] = 0.5f;
        CU(cudaMemcpy(dy, y, yb, cudaMemcpyHostToDevice));
        CHECK(pie__cuda_gemv(dy, 2, dW, n, k, dx, M, 2, 0, 0) == 0, "gemv acc refused");
        dget(y, dy, yb);
        for (int j = 0; j < M; j++)
            for (int o = 0; o < n; o++)
                CHECK(fabs(y[j * n + o] - 0.5 - ref[j * n + o]) <=
                          1e-4 * abs_[j * n + o] + 1e-6,
                      "gemv acc y[%d][%d]: gpu %g cpu %g", j, o, y[j * n + o],
                      0.5 + ref[j * n + o]);
    }
    printf("gemv: n %d k %d %s, m 1..%d, r 1/2/4/8 ok\n", n, k,
           y_f32 ? "f32 (and accumulated)" : "bf16", M);
    cudaFree(dW); cudaFree(dx); cudaFree(dy);
    free(W); free(x); free(ref); free(abs_); free(y);
}

/* The fused gate/up matmul with SwiGLU against the unfused pair
 * (pie__cuda_gemv into gu, then pie__cuda_silu_mul), which the tests
 * above check against C twins: bit-identical for every m and r. */
static void test_gemv_glu(int hid, int k)
{
    const int M = PIE_CUDA_GEMV_MAX_M;
    uint16_t *W = malloc(2 * (size_t)2 * hid * k), *x = malloc(2 * (size_t)M * k);
    for (size_t i = 0; i < (size_t)2 * hid * k; i++)
        W[i] = pie_f32_to_bf16(frand() * 0.2f);
    for (int i = 0; i < M * k; i++) x[i] = pie_f32_to_bf16(frand());
    uint16_t *dW = dput(W, 2 * (size_t)2 * hid * k), *dx = dput(x, 2 * (size_t)M * k);
    size_t hb = 2 * (size_t)M * hid;
    uint16_t *dgu = dput(NULL, 2 * hb), *dh = dput(NULL, hb), *dh2 = dput(NULL, hb);
    uint16_t *h = malloc(hb), *h2 = malloc(hb);
    for (int r = 1; r <= 8; r *= 2)
        for (int m = 1; m <= M; m++) {
            CU(cudaMemset(dh, 0xff, hb));
            CHECK(pie__cuda_gemv(dgu, 0, dW, 2 * hid, k, dx, m, r, 0, 0) == 0,
                  "gemv refused");
            pie__cuda_silu_mul(dh2, dgu, m, hid, 0);
            CHECK(pie__cuda_gemv_glu(dh, dW, hid, k, dx, m, r, 1, 0) == 0,
                  "gemv_glu m %d r %d refused", m, r);
            dget(h, dh, hb);
            dget(h2, dh2, hb);
            CHECK(memcmp(h, h2, 2 * (size_t)m * hid) == 0,
                  "gemv_glu hid %d k %d m %d r %d differs from gemv + silu_mul",
                  hid, k, m, r);
            size_t bad = 0;
            for (size_t i = (size_t)m * hid; i < (size_t)M * hid; i++) bad += h[i] != 0xffff;
            CHECK(bad == 0, "gemv_glu m %d wrote %zu values past row m", m, bad);
        }
    printf("gemv_glu: hid %d k %d, m 1..%d, r 1/2/4/8 equal to gemv + silu_mul\n",
           hid, k, M);
    cudaFree(dW); cudaFree(dx); cudaFree(dgu); cudaFree(dh); cudaFree(dh2);
    free(W); free(x); free(h); free(h2);
}

/* --------------------------------------------------------------- wgmm */
/* The Hopper matmul (wgmm.cu) in each mode against a double-precision
 * twin, for m across its three tile widths and grids from one block or
 * cluster (every tile whole on it) to the SM count (tiles in pieces, on
 * shapes with fewer and more iterations than blocks); for each grid, row
 * 0's bits must not depend on m, rows past m are untouched, and the tile
 * counters must be back at zero after every call. With PIE_CUDA_WGMM_CL=2
 * (a second ctest entry) the tiles pair up on clusters of 2. */
typedef struct wg_ref { double *y, *abs; } wg_ref;

static wg_ref wg_reference(const uint16_t *W, const uint16_t *x, int n, int k,
                           int M)
{
    wg_ref r = { malloc(sizeof(double) * M * n), malloc(sizeof(double) * M * n) };
    for (int j = 0; j < M; j++)
        for (int o = 0; o < n; o++) {
            double acc = 0, a = 0;
            for (int i = 0; i < k; i++) {
                double p = (double)bf(W[(size_t)o * k + i]) * bf(x[(size_t)j * k + i]);
                acc += p; a += fabs(p);
            }
            r.y[(size_t)j * n + o] = acc; r.abs[(size_t)j * n + o] = a;
        }
    return r;
}

static void wg_check_zero(const int *dcnt)
{
    static int cnt[PIE_CUDA_WGMM_MAX_TILES];
    dget(cnt, dcnt, sizeof cnt);
    int bad = 0;
    for (int i = 0; i < PIE_CUDA_WGMM_MAX_TILES; i++) bad += cnt[i] != 0;
    CHECK(bad == 0, "wgmm left %d tile counters non-zero", bad);
}

/* y's rows before a call: 0xff bytes, or (ACC) uneven f32 values to add
 * onto, also kept in bg. */
static void wg_background(int mode, void *y, void *dy, void *bg, size_t yb)
{
    if (mode == PIE_CUDA_WGMM_ACC)
        for (size_t i = 0; i < yb / 4; i++) ((float *)y)[i] = 0.5f + (i % 7) * 0.25f;
    else
        memset(y, 0xff, yb);
    memcpy(bg, y, yb);
    CU(cudaMemcpy(dy, y, yb, cudaMemcpyHostToDevice));
}

/* Rows < m against the twin (plus the background for ACC); rows >= m
 * untouched, bit for bit. */
static void wg_check_rows(int mode, const wg_ref *r, const void *y,
                          const void *bg, int n, int k, int m, int M, int grid)
{
    int f32 = mode != PIE_CUDA_WGMM_BF16;
    for (int j = 0; j < m; j++)
        for (int o = 0; o < n; o++) {
            size_t e = (size_t)j * n + o;
            float got = f32 ? ((const float *)y)[e] : bf(((const uint16_t *)y)[e]);
            double want = r->y[e] + (mode == PIE_CUDA_WGMM_ACC ? ((const float *)bg)[e] : 0);
            double tol = (f32 ? 1e-4 : 8e-3) * r->abs[e] + 1e-5;
            CHECK(fabs(got - want) <= tol, "wgmm mode %d n %d k %d m %d grid %d "
                  "y[%d][%d]: gpu %g cpu %g", mode, n, k, m, grid, j, o, got, want);
        }
    size_t rowb = (size_t)n * (f32 ? 4 : 2);
    CHECK(memcmp((const char *)y + m * rowb, (const char *)bg + m * rowb,
                 (size_t)(M - m) * rowb) == 0,
          "wgmm mode %d m %d grid %d changed rows past m", mode, m, grid);
}

/* One (n, k, mode) over m = 17..256 and grids of 1 block (every tile
 * whole), 7 (pieces straddling tiles) and 132 (the SM count); for each
 * grid, row 0's bits must not depend on m. */
static void test_wgmm_shape(int n, int k, int mode, pie_cuda_wgmm_ws *ws)
{
    const int M = PIE_CUDA_WGMM_MAX_M, ms[] = { 17, 64, 65, 128, 129, 200, 256 };
    const int grids[] = { 1, 7, 132 };
    uint16_t *W = malloc(2 * (size_t)n * k), *x = malloc(2 * (size_t)M * k);
    for (size_t i = 0; i < (size_t)n * k; i++) W[i] = pie_f32_to_bf16(frand());
    for (size_t i = 0; i < (size_t)M * k; i++) x[i] = pie_f32_to_bf16(frand());
    wg_ref r = wg_reference(W, x, n, k, M);
    uint16_t *dW = dput(W, 2 * (size_t)n * k), *dx = dput(x, 2 * (size_t)M * k);
    size_t rowb = (size_t)n * (mode != PIE_CUDA_WGMM_BF16 ? 4 : 2), yb = M * rowb;
    void *dy = dput(NULL, yb), *y = malloc(yb), *bg = malloc(yb), *row0 = malloc(rowb);
    for (int gi = 0; gi < 3; gi++)
        for (int mi = 0; mi < 7; mi++) {
            int m = ms[mi];
            wg_background(mode, y, dy, bg, yb);
            CHECK(pie__cuda_wgmm(dy, mode, dW, n, k, dx, m, ws, grids[gi],
                                 mi & 1, 0) == 0,
                  "wgmm mode %d m %d grid %d refused", mode, m, grids[gi]);
            dget(y, dy, yb);
            wg_check_rows(mode, &r, y, bg, n, k, m, M, grids[gi]);
            CHECK(mi == 0 || memcmp(y, row0, rowb) == 0,
                  "wgmm mode %d grid %d: row 0 differs at m %d", mode, grids[gi], m);
            memcpy(row0, y, rowb);
            wg_check_zero(ws->cnt);
        }
    printf("wgmm: n %d k %d mode %d, m 17..256, grids 1..%d ok\n", n, k, mode,
           ws->max_grid);
    cudaFree(dW); cudaFree(dx); cudaFree(dy);
    free(W); free(x); free(y); free(bg); free(row0); free(r.y); free(r.abs);
}

/* GLU against the double twin (silu(g) u of the exact gate and up), and,
 * on one block or cluster (every tile whole, so both sum k in one order),
 * bit for bit against the plain bf16 matmul into gu + silu_mul. Split
 * tiles (other grids) may sum k in pieces that differ between the two
 * layouts, so there only the twin's tolerance holds. */
static void test_wgmm_glu(int hid, int k, pie_cuda_wgmm_ws *ws)
{
    const int M = PIE_CUDA_WGMM_MAX_M, ms[] = { 17, 100, 256 }, grids[] = { 1, 3, 132 };
    uint16_t *W = malloc(2 * (size_t)2 * hid * k), *x = malloc(2 * (size_t)M * k);
    for (size_t i = 0; i < (size_t)2 * hid * k; i++) W[i] = pie_f32_to_bf16(frand() * 0.2f);
    for (size_t i = 0; i < (size_t)M * k; i++) x[i] = pie_f32_to_bf16(frand());
    wg_ref r = wg_reference(W, x, 2 * hid, k, M);
    uint16_t *dW = dput(W, 2 * (size_t)2 * hid * k), *dx = dput(x, 2 * (size_t)M * k);
    size_t hb = 2 * (size_t)M * hid;
    uint16_t *dgu = dput(NULL, 2 * hb), *dh = dput(NULL, hb), *dh2 = dput(NULL, hb);
    uint16_t *h = malloc(hb), *h2 = malloc(hb);
    for (int gi = 0; gi < 3; gi++)
        for (int mi = 0; mi < 3; mi++) {
            int m = ms[mi];
            CU(cudaMemset(dh, 0xff, hb));
            CHECK(pie__cuda_wgmm(dgu, PIE_CUDA_WGMM_BF16, dW, 2 * hid, k, dx, m, ws,
                                 grids[gi], 0, 0) == 0, "wgmm refused");
            pie__cuda_silu_mul(dh2, dgu, m, hid, 0);
            CHECK(pie__cuda_wgmm(dh, PIE_CUDA_WGMM_GLU, dW, hid, k, dx, m, ws, grids[gi],
                                 1, 0) == 0, "wgmm glu m %d refused", m);
            dget(h, dh, hb);
            dget(h2, dh2, hb);
            CHECK(grids[gi] > 1 || memcmp(h, h2, 2 * (size_t)m * hid) == 0,
                  "wgmm glu hid %d k %d m %d on one block differs from the "
                  "matmul + silu_mul", hid, k, m);
            for (int j = 0; j < m; j++)
                for (int i = 0; i < hid; i++) {
                    size_t g = (size_t)j * 2 * hid + i, u = g + hid;
                    double want = r.y[g] / (1 + exp(-r.y[g])) * r.y[u];
                    double tol = 1e-2 * fabs(want) + 1e-3 * (r.abs[g] + r.abs[u]);
                    float got = bf(h[(size_t)j * hid + i]);
                    CHECK(fabs(got - want) <= tol, "wgmm glu hid %d k %d m %d "
                          "grid %d h[%d][%d]: gpu %g cpu %g", hid, k, m,
                          grids[gi], j, i, got, want);
                }
            size_t bad = 0;
            for (size_t i = (size_t)m * hid; i < (size_t)M * hid; i++) bad += h[i] != 0xffff;
            CHECK(bad == 0, "wgmm glu m %d wrote %zu values past row m", m, bad);
            wg_check_zero(ws->cnt);
        }
    printf("wgmm glu: hid %d k %d ok (on one block: equal to the matmul + "
           "silu_mul)\n", hid, k);
    cudaFree(dW); cudaFree(dx); cudaFree(dgu); cudaFree(dh); cudaFree(dh2);
    free(W); free(x); free(h); free(h2); free(r.y); free(r.abs);
}

static void test_wgmm(void)
{
    uint16_t probe[8] __attribute__((aligned(16))) = { 0 };
    if (!pie__cuda_wgmm_supported(PIE_CUDA_WGMM_BF16, 64, 128, 64, probe, probe)) {
        printf("wgmm: not supported here (no tensor maps), skipped\n");
        return;
    }
    pie_cuda_wgmm_ws ws = { NULL, NULL, 132 };
    ws.part = dput(NULL, sizeof(float) * pie__cuda_wgmm_part_floats(ws.max_grid));
    ws.cnt = dput(NULL, sizeof(int) * PIE_CUDA_WGMM_MAX_TILES);
    CU(cudaMemset(ws.cnt, 0, sizeof(int) * PIE_CUDA_WGMM_MAX_TILES));
    /* with PIE_CUDA_WGMM_CL=2, an even number of tiles runs on clusters of
     * 2 sharing x, an odd one on single blocks (the default: always) */
    test_wgmm_shape(256, 512, PIE_CUDA_WGMM_BF16, &ws);
    test_wgmm_shape(1024, 2048, PIE_CUDA_WGMM_BF16, &ws);  /* more iterations than blocks */
    test_wgmm_shape(384, 192, PIE_CUDA_WGMM_F32, &ws);
    test_wgmm_shape(512, 1024, PIE_CUDA_WGMM_ACC, &ws);
    test_wgmm_shape(128, 256, PIE_CUDA_WGMM_ACC, &ws);
    test_wgmm_glu(192, 512, &ws);
    test_wgmm_glu(256, 320, &ws);
    cudaFree(ws.part); cudaFree(ws.cnt);
}

static void test_gemv(void)
{
    test_gemv_shape(1, 8, 1);
    test_gemv_shape(37, 264, 0);      /* k % 64 != 0: a partial step; n odd */
    test_gemv_shape(203, 2048, 1);
    test_gemv_shape(130, 4104, 0);    /* steps past the unrolled batches */
    test_gemv_shape(16, 14336, 1);
    test_gemv_glu(37, 264);           /* features not a multiple of 8 */
    test_gemv_glu(512, 2048);
    uint16_t *d = dput(NULL, 64);
    CHECK(!pie__cuda_gemv_supported(1, 12, d, d), "k not a multiple of 8 accepted");
    CHECK(!pie__cuda_gemv_supported(PIE_CUDA_GEMV_MAX_M + 1, 16, d, d),
          "m > PIE_CUDA_GEMV_MAX_M accepted");
    CHECK(!pie__cuda_gemv_supported(1, 16, d + 1, d), "unaligned W accepted");
    CHECK(pie__cuda_gemv(d, 1, d, 2, 16, d, 1, 3, 0, 0) == -1, "r = 3 accepted");
    cudaFree(d);
}

/* ------------------------------------------------- batch of requests */

#define KB_TOK 2304                 /* tokens a test batch holds at most */
#define KB_REQ 16                   /* requests                           */
typedef struct kbatch {
    int n_reqs, n_tok, ps, n_pages;
    int n_new[KB_REQ], kv_len[KB_REQ];
    int32_t kv_indptr[KB_REQ + 1], pages[256], tok_slot[KB_TOK], tok_req[KB_TOK];
    int32_t pos[KB_TOK], mask_off[KB_TOK];
    uint32_t bits[128 * 16];
    int masked;
} kbatch;

/* Requests with given new-token counts and total lengths, pages shuffled
 * across the pool. */
static void make_batch(kbatch *b, int n_reqs, const int *n_new,
                       const int *kv_len, int ps, int n_pages, int masked)
{
    memset(b, 0, sizeof *b);
    b->n_reqs = n_reqs; b->ps = ps; b->n_pages = n_pages; b->masked = masked;
    int perm[256];
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    for (int i = n_pages - 1; i > 0; i--) {
        int j = irand(i + 1), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
    int np = 0, t = 0, w = 0;
    for (int r = 0; r < n_reqs; r++) {
        b->n_new[r] = n_new[r]; b->kv_len[r] = kv_len[r];
        b->kv_indptr[r] = np;
        for (int p = 0; p < (kv_len[r] + ps - 1) / ps; p++, np++) b->pages[np] = perm[np];
        for (int i = 0; i < n_new[r]; i++, t++) {
            b->tok_slot[t] = kv_len[r] - n_new[r] + i;
            b->tok_req[t] = r;
            b->pos[t] = b->tok_slot[t] * 3 + 7;      /* explicit, not = slot */
            if (masked) {
                b->mask_off[t] = w;
                /* random bitmap over [0, kv_len), always some holes */
                for (int j = 0; j < kv_len[r]; j++)
                    if (irand(3) != 0)
                        b->bits[w + j / 32] |= 1u << (j % 32);
                if (i == 0 && r == 0)   /* one token attends to nothing */
                    for (int j = 0; j < (kv_len[r] + 31) / 32; j++) b->bits[w + j] = 0;
                w += (kv_len[r] + 31) / 32;
            } else {
                b->mask_off[t] = -1;
            }
        }
    }
    b->kv_indptr[n_reqs] = np;
    b->n_tok = t;
}

static int allowed(const kbatch *b, int t, int j)
{
    if (!b->masked) return j <= b->tok_slot[t];
    return (b->bits[b->mask_off[t] + j / 32] >> (j % 32)) & 1;
}

static int64_t kv_index(const pie_cuda_kv *kv, int page, int layer, int v,
                        int h, int s, int d)
{
    return ((((int64_t)page * kv->n_layers + layer) * 2 + v) * kv->n_kv + h) *
               kv->page_size * kv->head_dim + (int64_t)s * kv->head_dim + d;
}

static pie_cuda_tokmeta dev_meta(const kbatch *b, void **frees)
{
    pie_cuda_tokmeta tm;
    int32_t kvl[KB_REQ];
    for (int r = 0; r < b->n_reqs; r++) kvl[r] = b->kv_len[r];
    frees[0] = dput(b->tok_slot, 4 * b->n_tok);
    frees[1] = dput(b->tok_req, 4 * b->n_tok);
    frees[2] = dput(b->pos, 4 * b->n_tok);
    frees[3] = dput(b->kv_indptr, 4 * (b->n_reqs + 1));
    frees[4] = dput(kvl, 4 * b->n_reqs);
    frees[5] = dput(b->pages, 4 * b->kv_indptr[b->n_reqs]);
    frees[6] = dput(b->mask_off, 4 * b->n_tok);
    frees[7] = dput(b->bits, sizeof b->bits);
    tm.tok_slot = frees[0]; tm.tok_req = frees[1]; tm.positions = frees[2];
    tm.kv_indptr = frees[3]; tm.kv_len = frees[4]; tm.pages = frees[5];
    tm.mask_off = b->masked ? frees[6] : NULL;
    tm.mask_bits = b->masked ? frees[7] : NULL;
    return tm;
}

/* ----------------------------------------------------------- qkv post */
/* big: a prefill-sized batch (2103 tokens), whose blocks each take
 * several groups of heads */
static void test_qkv_post(int nh, int nkv, int hd, int bias, int qknorm, int big)
{
    kbatch b;
    int n_new[3] = { 1, 9, 3 }, kv_len[3] = { 21, 9, 40 };
    int bn_new[3] = { 1200, 900, 3 }, bkv_len[3] = { 1300, 900, 40 };
    if (big) make_batch(&b, 3, bn_new, bkv_len, 16, 160, 0);
    else make_batch(&b, 3, n_new, kv_len, 7, 40, 0);
    int n = b.n_tok, L = 3, layer = 1, qkvd = (nh + 2 * nkv) * hd;
    pie_cuda_kv kv = { NULL, L, nkv, b.ps, hd };
    int64_t pool_n = pie_cuda_kv_page_elems(&kv) * b.n_pages;
    float *qkv = malloc(sizeof(float) * n * qkvd), *bs = malloc(sizeof(float) * qkvd);
    float qn[256], kn[256], invf[128];
    uint16_t *qkvb = malloc(2 * (size_t)n * qkvd);
    for (int i = 0; i < n * qkvd; i++) {
        qkvb[i] = pie_f32_to_bf16(frand() * 2);
        qkv[i] = bf(qkvb[i]);
    }
    for (int i = 0; i < qkvd; i++) bs[i] = frand() * 0.3f;
    for (int i = 0; i < hd; i++) { qn[i] = 1 + frand() * .3f; kn[i] = 1 + frand() * .3f; }
    for (int i = 0; i < hd / 2; i++) invf[i] = powf(10000.f, -2.f * i / hd);
    uint16_t *pool = calloc((size_t)pool_n, 2);
    kv.pool = dput(pool, 2 * pool_n);
    void *fr[8];
    pie_cuda_tokmeta tm = dev_meta(&b, fr);
    uint16_t *dqkv = dput(qkvb, 2 * (size_t)n * qkvd);
    float *dq = dput(NULL, 4 * n * nh * hd);
    float *db = dput(bs, 4 * qkvd), *dqn = dput(qn, 4 * hd), *dkn = dput(kn, 4 * hd);
    float *dinv = dput(invf, 4 * hd / 2);
    pie__cuda_qkv_post(dq, dqkv, bias ? db : NULL, qknorm ? dqn : NULL,
                       qknorm ? dkn : NULL, 1e-6f, dinv, &tm, &kv, layer, n, nh, 0);
    float *q = malloc(4 * n * nh * hd);
    dget(q, dq, 4 * (size_t)n * nh * hd);
    dget(pool, kv.pool, 2 * (size_t)pool_n);
    for (int t = 0; t < n; t++) {
        int r = b.tok_req[t], s = b.tok_slot[t];
        int page = b.pages[b.kv_indptr[r] + s / b.ps], off = s % b.ps;
        for (int h = 0; h < nh + 2 * nkv; h++) {
            float v[256];
            for (int i = 0; i < hd; i++)
                v[i] = qkv[t * qkvd + h * hd + i] + (bias ? bs[h * hd + i] : 0);
            int isq = h < nh, isk = !isq && h < nh + nkv;
            if (qknorm && (isq || isk)) {
                double ss = 0;
                for (int i = 0; i < hd; i++) ss += v[i] * v[i];
                float rr = 1 / sqrtf((float)(ss / hd) + 1e-6f);
                for (int i = 0; i < hd; i++) v[i] *= rr * (isq ? qn[i] : kn[i]);
            }
            if (isq || isk)
                for (int i = 0; i < hd / 2; i++) {
                    /* the angle in f32, as the CPU twin (pie__cpu_rope)
                     * defines it: at positions in the thousands its
                     * rounding moves the result more than the tolerance */
                    double a = (float)b.pos[t] * invf[i];
                    float c = (float)cos(a), sn = (float)sin(a);
                    float x0 = v[i], x1 = v[i + hd / 2];
                    v[i] = x0 * c - x1 * sn;
                    v[i + hd / 2] = x1 * c + x0 * sn;
                }
            for (int i = 0; i < hd; i++) {
                float got;
                if (isq) got = q[(t * nh + h) * hd + i];
                else got = bf(pool[kv_index(&kv, page, layer, isk ? 0 : 1,
                                            isk ? h - nh : h - nh - nkv, off, i)]);
                float tol = isq ? 2e-4f + 2e-4f * fabsf(v[i]) : 1e-2f * fabsf(v[i]) + 1e-3f;
                CHECK(fabsf(got - v[i]) <= tol,
                      "qkv_post token %d head %d i %d: gpu %g cpu %g", t, h, i,
                      got, v[i]);
            }
        }
    }
    /* nothing else in the pool was written */
    int64_t nz = 0;
    for (int64_t i = 0; i < pool_n; i++) nz += pool[i] != 0;
    CHECK(nz <= (int64_t)n * 2 * nkv * hd, "qkv_post wrote %lld pool values, "
          "expected at most %lld", (long long)nz, (long long)n * 2 * nkv * hd);
    printf("qkv_post: nh %d nkv %d hd %d bias %d qk_norm %d: %d tokens ok\n",
           nh, nkv, hd, bias, qknorm, n);
    for (int i = 0; i < 8; i++) cudaFree(fr[i]);
    cudaFree(dqkv); cudaFree(dq); cudaFree(db); cudaFree(dqn); cudaFree(dkn);
    cudaFree(dinv); cudaFree(kv.pool);
    free(qkv); free(qkvb); free(bs); free(pool); free(q);
}

/* ---------------------------------------------------------- attention */
/* split < 0: the tensor-core prefill kernel (tiles of 128 tokens x one
 * query head; wgmma at head dims 64 and 128 unless PIE_CUDA_NO_WGMMA) on a
 * batch with a 100-token prompt after 200 cached slots, pages of 16 slots
 * (of -split slots for split < -1). Its rows span five KV blocks, which is
 * what caught the ptxas register clash of NOTES.md, round 24.
 * grouped 1: the tensor-core kernel on the CUDA-core kernel's plan (tiles
 * of 64/G tokens x G heads, `split` splits merged); grouped 2: the decode
 * kernel (tiles of 16/G tokens) on a persistent grid of `split` blocks,
 * the items cut by pie_cuda_dec_plan; grouped 3 / 4 / 6: the same
 * kernel, launched for one / two / four blocks per SM, on the whole-item
 * plan of `split` blocks (no merge); grouped 7: the cluster plan, each
 * item over a cluster of `split` blocks combining in distributed shared
 * memory (no merge kernel). */
static void test_attention_mode(int nh, int nkv, int hd, int masked,
                                int split, int grouped)
{
    kbatch b;
    int n_new[4] = { 1, 13, 1, 5 }, kv_len[4] = { 1, 13, 1500, 77 };
    if (split < 0) {
        int fn[4] = { 100, 3, 20, 5 }, fk[4] = { 300, 3, 20, 77 };
        memcpy(n_new, fn, sizeof fn);
        memcpy(kv_len, fk, sizeof fk);
    }
    /* pages of 16 slots; some decode grids take 8, 12 (not a power of
     * two) or 32 (the loader's other paths) */
    int ps = grouped < 2 ? (split < -1 ? -split : 16) : split == 61 ? 8 :
             split == 37 ? 12 : split == 1000 ? 32 : 16;
    if (grouped == 7 && split > pie__cuda_attention_dec_cluster_max(hd, 0)) {
        printf("attention (decode cluster): clusters of %d at hd %d do not "
               "run on this GPU: skipped\n", split, hd);
        return;
    }
    make_batch(&b, 4, n_new, kv_len, ps, 256, masked);
    int n = b.n_tok, L = 2, layer = 1, G = nh / nkv;
    pie_cuda_kv kv = { NULL, L, nkv, b.ps, hd };
    int64_t pool_n = pie_cuda_kv_page_elems(&kv) * b.n_pages;
    uint16_t *pool = malloc(2 * (size_t)pool_n);
    for (int64_t i = 0; i < pool_n; i++) pool[i] = pie_f32_to_bf16(frand());
    float *q = malloc(4 * (size_t)n * nh * hd);
    for (int i = 0; i < n * nh * hd; i++) q[i] = frand() * 2;
    kv.pool = dput(pool, 2 * pool_n);
    void *fr[8];
    pie_cuda_tokmeta tm = dev_meta(&b, fr);
    /* plan: tiles of T tokens, `split` splits (at least what the chunk
     * limit needs) */
    pie_cuda_attn_item items[4096];
    pie_cuda_merge_item merges[1024];
    int ni = 0, nm = 0, parts = 0, T = PIE_CUDA_ATTN_RMAX / G;
    if (grouped == 1) T = PIE_CUDA_FLASH_ROWS / G;
    if (grouped >= 2) T = PIE_CUDA_FLASH_DEC_ROWS / G > 0 ? PIE_CUDA_FLASH_DEC_ROWS / G : 1;
    for (int r = 0; r < b.n_reqs && split < 0; r++) {
        int q0 = 0, F = PIE_CUDA_FLASH_ROWS;
        for (int k = 0; k < r; k++) q0 += b.n_new[k];
        for (int i = 0; i < b.n_new[r]; i += F) {
            int nt = b.n_new[r] - i < F ? b.n_new[r] - i : F;
            int range = masked ? b.kv_len[r] : b.kv_len[r] - b.n_new[r] + i + nt;
            for (int h = 0; h < nh; h++)
                items[ni++] = (pie_cuda_attn_item){ r, q0 + i, nt, h, 0, range, -1, 0 };
        }
    }
    for (int r = 0; r < b.n_reqs && split >= 0; r++) {
        int q0 = 0;
        for (int k = 0; k < r; k++) q0 += b.n_new[k];
        for (int i = 0; i < b.n_new[r]; i += T) {
            int nt = b.n_new[r] - i < T ? b.n_new[r] - i : T;
            int range = b.kv_len[r];
            int ns = (range + PIE_CUDA_ATTN_CHUNK - 1) / PIE_CUDA_ATTN_CHUNK;
            if (ns < split) ns = split;
            if (ns > range) ns = range > 0 ? range : 1;
            if (grouped >= 2) ns = 1;           /* the plan cuts them */
            for (int h = 0; h < nkv; h++) {
                if (ns > 1)
                    merges[nm++] = (pie_cuda_merge_item){ q0 + i, nt, h, ns, parts, {0} };
                for (int s = 0; s < ns; s++)
                    items[ni++] = (pie_cuda_attn_item){
                        r, q0 + i, nt, h, range * s / ns, range * (s + 1) / ns,
                        ns > 1 ? parts + s * nt * G : -1, grouped > 0 };
                if (ns > 1) parts += ns * nt * G;
            }
        }
    }
    int nb = split > 0 ? split : 1, npc = 0;
    pie_cuda_attn_item *pc = malloc(sizeof *pc * ((size_t)ni * nb + nb));
    int32_t *bst = malloc(4 * ((size_t)nb + 1));
    if (grouped == 2) {
        parts = (int)pie_cuda_dec_plan(items, ni, G, nb, split % 2 + 1, 0, pc,
                                       &npc, bst, merges, &nm);
        CHECK(nm <= nb && npc <= ni + nb && bst[0] == 0 && bst[nb] == npc,
              "dec plan: %d merges %d pieces", nm, npc);
    }
    if (grouped >= 3) {                 /* whole items, no merge */
        int64_t most = pie_cuda_dec_plan_whole(items, ni, nb, pc, bst);
        npc = ni;
        nm = 0;
        CHECK(most > 0 && bst[0] == 0 && bst[nb] == ni,
              "whole dec plan: most %lld, %d pieces", (long long)most, bst[nb]);
    }
    if (grouped == 7) {                 /* each item over a cluster */
        pie_cuda_dec_plan_cluster(items, ni, nb, pc);
        npc = ni * nb;
        nm = 0;
    }
    float *dq = dput(q, 4 * (size_t)n * nh * hd);
    uint16_t *dout = dput(NULL, 2 * (size_t)n * nh * hd);
    float *po = dput(NULL, 4 * (size_t)(parts + 1) * hd);
    float *pml = dput(NULL, 8 * (size_t)(parts + 1));
    pie_cuda_attn_item *di = dput(items, sizeof items[0] * ni);
    pie_cuda_merge_item *dm = dput(merges, sizeof merges[0] * (nm + 1));
    CU(cudaMemset(dout, 0xff, 2 * (size_t)n * nh * hd));   /* poison */
    if (grouped == 7) {
        pie_cuda_attn_item *dpc = dput(pc, sizeof *pc * (size_t)npc);
        /* clusters of up to 4 at most two blocks an SM (padded shared
         * memory, as the mid-batch plan launches clusters of 2) */
        CHECK(pie__cuda_attention_dec_cluster(dout, dq, dpc, npc, nb,
                                              nb <= 4 ? 2 : 0, &tm, &kv,
                                              layer, nh, 0) == 0,
              "cluster decode of %d pieces in clusters of %d refused", npc, nb);
        CU(cudaDeviceSynchronize());
        cudaFree(dpc);
    } else if (grouped >= 2) {
        pie_cuda_attn_item *dpc = dput(pc, sizeof *pc * (size_t)(npc + 1));
        int32_t *dbs = dput(bst, 4 * ((size_t)nb + 1));
        pie__cuda_attention_dec(dout, po, pml, dq, dpc, dbs, nb, &tm, &kv,
                                layer, nh, grouped >= 3 ? grouped - 2 : 0, 0);
        pie__cuda_attn_merge(dout, po, pml, dm, nm, nh, nkv, hd, 0);
        CU(cudaDeviceSynchronize());
        cudaFree(dpc); cudaFree(dbs);
    } else if (split < 0 || grouped) {
        pie__cuda_attention_flash(dout, po, pml, dq, di, ni, &tm, &kv, layer,
                                  nh, 0);
        pie__cuda_attn_merge(dout, po, pml, dm, nm, nh, nkv, hd, 0);
    } else {
        pie__cuda_attention(dout, po, pml, dq, di, ni, &tm, &kv, layer, nh,
                            PIE_CUDA_ATTN_CHUNK, 0);
        pie__cuda_attn_merge(dout, po, pml, dm, nm, nh, nkv, hd, 0);
    }
    CU(cudaDeviceSynchronize());
    uint16_t *out = malloc(2 * (size_t)n * nh * hd);
    dget(out, dout, 2 * (size_t)n * nh * hd);
    double *sc = malloc(sizeof(double) * 2048);
    double err = 0, ref2 = 0;
    for (int t = 0; t < n; t++) {
        int r = b.tok_req[t];
        for (int h = 0; h < nh; h++) {
            int kh = h / G;
            double mx = -INFINITY;
            for (int j = 0; j < b.kv_len[r]; j++) {
                int page = b.pages[b.kv_indptr[r] + j / b.ps];
                double d = 0;
                for (int i = 0; i < hd; i++)
                    d += q[(t * nh + h) * hd + i] *
                         bf(pool[kv_index(&kv, page, layer, 0, kh, j % b.ps, i)]);
                sc[j] = allowed(&b, t, j) ? d / sqrt(hd) : -INFINITY;
                if (sc[j] > mx) mx = sc[j];
            }
            double l = 0;
            for (int j = 0; j < b.kv_len[r]; j++) {
                sc[j] = sc[j] == -INFINITY ? 0 : exp(sc[j] - mx);
                l += sc[j];
            }
            for (int i = 0; i < hd; i++) {
                double o = 0;
                for (int j = 0; j < b.kv_len[r]; j++) {
                    int page = b.pages[b.kv_indptr[r] + j / b.ps];
                    o += sc[j] * bf(pool[kv_index(&kv, page, layer, 1, kh, j % b.ps, i)]);
                }
                float ref = l > 0 ? (float)(o / l) : 0.0f;
                float got = bf(out[(t * nh + h) * hd + i]);
                CHECK(fabsf(got - ref) <= 1e-2f * fabsf(ref) + 4e-3f,
                      "attention token %d head %d i %d: gpu %g cpu %g "
                      "(masked %d split %d)", t, h, i, got, ref, masked, split);
                err += (got - ref) * (got - ref);
                ref2 += ref * ref;
            }
        }
    }
    printf("attention%s: nh %d nkv %d hd %d masked %d split %d page %d: %d "
           "tokens, %d items, %d merges, rel err %.2e ok\n",
           grouped == 7 ? " (decode cluster)" : grouped == 2 ? " (decode mma)" :
           grouped ? " (grouped mma)" : "",
           nh, nkv, hd, masked, split, ps, n, ni, nm, sqrt(err / (ref2 + 1e-30)));
    for (int i = 0; i < 8; i++) cudaFree(fr[i]);
    cudaFree(dq); cudaFree(dout); cudaFree(po); cudaFree(pml); cudaFree(di);
    cudaFree(dm); cudaFree(kv.pool);
    free(pool); free(q); free(out); free(sc); free(pc); free(bst);
}

static void test_attention(int nh, int nkv, int hd, int masked, int split)
{
    test_attention_mode(nh, nkv, hd, masked, split, 0);
}

/* ---------------------------------------------------------- copy slots */
static void test_copy_slots(void)
{
    pie_cuda_kv kv = { NULL, 3, 2, 5, 16 };
    int64_t pe = pie_cuda_kv_page_elems(&kv), n = pe * 4;
    uint16_t *pool = malloc(2 * n), *got = malloc(2 * n);
    for (int64_t i = 0; i < n; i++) pool[i] = pie_f32_to_bf16(frand());
    kv.pool = dput(pool, 2 * n);
    pie__cuda_copy_slots(&kv, 1, 1, 3, 2, 3, 0);
    dget(got, kv.pool, 2 * n);
    for (int l = 0; l < 3; l++)
        for (int v = 0; v < 2; v++)
            for (int h = 0; h < 2; h++)
                for (int s = 0; s < 3; s++)
                    for (int d = 0; d < 16; d++)
                        pool[kv_index(&kv, 3, l, v, h, 2 + s, d)] =
                            pool[kv_index(&kv, 1, l, v, h, 1 + s, d)];
    CHECK(memcmp(pool, got, 2 * n) == 0, "copy_slots differs from the twin");
    printf("copy_slots: ok\n");
    cudaFree(kv.pool); free(pool); free(got);
}

/* ------------------------------------------------------------ samplers */
static void test_samplers(int V)
{
    enum { R = 24 };
    pie_sampler s[R];
    memset(s, 0, sizeof s);
    int32_t lp_ids[R * 4];
    int n_ids = 0;
    for (int r = 0; r < R; r++) {
        s[r].seed = 1000 + r * 77;
        switch (r % 8) {
        case 0: s[r].kind = PIE_SAMPLER_GREEDY; break;
        case 1: s[r].kind = PIE_SAMPLER_RANDOM; s[r].temperature = 1.0f; break;
        case 2: s[r].kind = PIE_SAMPLER_RANDOM; s[r].temperature = 0.7f;
                s[r].top_k = 1 + r; s[r].top_p = 0.9f; break;
        case 3: s[r].kind = PIE_SAMPLER_RANDOM; s[r].temperature = 1.3f;
                s[r].top_p = 0.5f; s[r].min_p = 0.05f; break;
        case 4: s[r].kind = PIE_PROBE_TOPK; s[r].top_k = 5 + r; s[r].temperature = r > 10 ? 0.8f : 0; break;
        case 5: s[r].kind = PIE_PROBE_LOGPROBS; s[r].ids = lp_ids + n_ids;
                s[r].n_ids = 3;
                for (int i = 0; i < 3; i++) lp_ids[n_ids++] = irand(V);
                break;
        case 6: s[r].kind = PIE_PROBE_ENTROPY; break;
        case 7: s[r].kind = PIE_PROBE_LOGITS; break;
        }
        if (s[r].kind == PIE_SAMPLER_RANDOM) s[r].top_p = s[r].top_p ? s[r].top_p : 1.0f;
    }
    float *logits = malloc(sizeof(float) * R * V);
    for (int i = 0; i < R * V; i++) logits[i] = frand() * 4;
    logits[3 * V + 5] = logits[3 * V + 9] = 10.0f;   /* greedy tie -> lower */
    /* logit masks on every third row: runs 0, a, b, c ... */
    int words = (V + 31) / 32;
    uint32_t *bits = calloc((size_t)R * words, 4);
    uint32_t runs[R][6], nruns[R];
    pie_cuda_srow sr[R];
    int val = 0, n_sort = 0, ids_off = 0;
    uint32_t vindptr[R + 1];
    for (int r = 0; r < R; r++) {
        nruns[r] = 0;
        if (r % 3 == 1) {
            uint32_t a = (uint32_t)(V / 5), bb = (uint32_t)(V / 3), c = (uint32_t)(V / 7);
            uint32_t rr[5] = { a, bb, c, 7, 11 };
            memcpy(runs[r], rr, sizeof rr);
            nruns[r] = 5;
            uint64_t pos = 0;
            for (int k = 0; k < 5; k++) {
                if (k & 1)
                    for (uint64_t j = pos; j < pos + rr[k] && j < (uint64_t)V; j++)
                        bits[r * words + j / 32] |= 1u << (j % 32);
                pos += rr[k];
            }
        } else {
            for (int j = 0; j < words; j++) bits[r * words + j] = 0xffffffffu;
        }
        int sorted = s[r].kind == PIE_PROBE_TOPK ||
                     (s[r].kind == PIE_SAMPLER_RANDOM && s[r].temperature > 0);
        sr[r] = (pie_cuda_srow){ s[r].kind, s[r].temperature, s[r].top_k,
                                 s[r].top_p, s[r].min_p,
                                 pie_sample_uniform(s[r].seed), val,
                                 s[r].kind == PIE_PROBE_TOPK ? s[r].top_k : s[r].n_ids,
                                 ids_off, r * words, sorted ? n_sort++ : -1, 0 };
        if (s[r].kind == PIE_PROBE_LOGPROBS) ids_off += s[r].n_ids;
        vindptr[r] = val;
        val += s[r].kind == PIE_PROBE_TOPK ? s[r].top_k
             : s[r].kind == PIE_PROBE_LOGPROBS ? s[r].n_ids
             : s[r].kind == PIE_PROBE_ENTROPY ? 1
             : s[r].kind == PIE_PROBE_LOGITS ? V : 0;
    }
    vindptr[R] = val;
    pie_cuda_sample_args a = { 0 };
    a.logits = dput(logits, sizeof(float) * R * V);
    a.rows = R; a.vocab = V;
    a.srow = dput(sr, sizeof sr);
    a.mask_bits = dput(bits, 4 * (size_t)R * words);
    a.lp_ids = dput(lp_ids, sizeof lp_ids);
    a.n_sort = n_sort;
    a.sort_kin = dput(NULL, 4 * (size_t)n_sort * V);
    a.sort_kout = dput(NULL, 4 * (size_t)n_sort * V);
    a.sort_vin = dput(NULL, 4 * (size_t)n_sort * V);
    a.sort_vout = dput(NULL, 4 * (size_t)n_sort * V);
    a.seg_off = dput(NULL, 4 * (n_sort + 1));
    a.sort_tmp_bytes = pie__cuda_sort_tmp_bytes(n_sort, V);
    a.sort_tmp = dput(NULL, a.sort_tmp_bytes);
    a.tokens = dput(NULL, 4 * R);
    a.values = dput(NULL, 4 * (size_t)val);
    a.ids = dput(NULL, 4 * (size_t)val);
    CU(cudaMemset(a.ids, 0, 4 * (size_t)val));
    CHECK(pie__cuda_sample(&a, 0) == 0, "pie__cuda_sample failed");
    int32_t tok[R], *gids = malloc(4 * (size_t)val);
    float *gv = malloc(4 * (size_t)val);
    dget(tok, a.tokens, sizeof tok);
    dget(gv, a.values, 4 * (size_t)val);
    dget(gids, a.ids, 4 * (size_t)val);
    float *row = malloc(sizeof(float) * V), *rv = malloc(4 * (size_t)V);
    int32_t *rid = malloc(4 * (size_t)V);
    for (int r = 0; r < R; r++) {
        memcpy(row, logits + (size_t)r * V, sizeof(float) * V);
        int32_t rt;
        CHECK_OK(pie_sample_row(row, V, &s[r], nruns[r] ? runs[r] : NULL,
                                nruns[r], &rt, rv, rid));
        CHECK(tok[r] == rt, "sampler row %d (kind %d): gpu token %d, cpu %d",
              r, s[r].kind, tok[r], rt);
        int nv = (int)(vindptr[r + 1] - vindptr[r]);
        for (int i = 0; i < nv; i++) {
            float g = gv[vindptr[r] + i], c = rv[i];
            int both_inf = isinf(g) && isinf(c) && (g > 0) == (c > 0);
            CHECK(both_inf || fabsf(g - c) <= 1e-5f + 1e-4f * fabsf(c),
                  "sampler row %d (kind %d) value %d: gpu %g cpu %g", r,
                  s[r].kind, i, g, c);
            if (s[r].kind == PIE_PROBE_TOPK)
                CHECK(gids[vindptr[r] + i] == rid[i], "TOPK row %d rank %d: gpu "
                      "id %d cpu %d", r, i, gids[vindptr[r] + i], rid[i]);
        }
    }
    printf("samplers: %d rows over vocab %d (greedy, random with top-k/p/min-p, "
           "TOPK, LOGPROBS, ENTROPY, LOGITS, masks) match pie_sample_row\n", R, V);
    free(logits); free(bits); free(gids); free(gv); free(row); free(rv); free(rid);
}

/* The qkv matmul with qkv_post fused (pie__cuda_gemv_qkv) against the
 * unfused pair (pie__cuda_gemv into a bf16 qkv, then pie__cuda_qkv_post,
 * which the tests above check against C twins): q and the whole pool bit
 * for bit, for every m (one token a request, pages shuffled) and r. */
static void test_gemv_qkv(int nh, int nkv, int hd, int k, int bias)
{
    const int M = PIE_CUDA_GEMV_MAX_M, L = 2, layer = 1;
    int n = (nh + 2 * nkv) * hd, n_new[M], kv_len[M];
    uint16_t *W = malloc(2 * (size_t)n * k), *x = malloc(2 * (size_t)M * k);
    float *bs = malloc(4 * (size_t)n), invf[128];
    for (size_t i = 0; i < (size_t)n * k; i++) W[i] = pie_f32_to_bf16(frand() * 0.2f);
    for (int i = 0; i < M * k; i++) x[i] = pie_f32_to_bf16(frand());
    for (int i = 0; i < n; i++) bs[i] = frand() * 0.3f;
    for (int i = 0; i < hd / 2; i++) invf[i] = powf(500000.f, -2.f * i / hd);
    uint16_t *dW = dput(W, 2 * (size_t)n * k), *dx = dput(x, 2 * (size_t)M * k);
    uint16_t *dqkv = dput(NULL, 2 * (size_t)M * n);
    float *db = dput(bs, 4 * (size_t)n), *dinv = dput(invf, 4 * hd / 2);
    size_t qb = 4 * (size_t)M * nh * hd;
    float *dq = dput(NULL, qb), *dq2 = dput(NULL, qb);
    float *q = malloc(qb), *q2 = malloc(qb);
    for (int m = 1; m <= M; m++) {
        kbatch b;
        for (int i = 0; i < m; i++) { n_new[i] = 1; kv_len[i] = 1 + irand(60); }
        make_batch(&b, m, n_new, kv_len, 8, 160, 0);
        pie_cuda_kv kv = { NULL, L, nkv, b.ps, hd };
        size_t pool_b = 2 * (size_t)pie_cuda_kv_page_elems(&kv) * b.n_pages;
        uint16_t *pool = malloc(pool_b), *pool2 = malloc(pool_b);
        uint16_t *dpool = dput(NULL, pool_b), *dpool2 = dput(NULL, pool_b);
        CU(cudaMemset(dpool, 0x5a, pool_b));
        CU(cudaMemset(dpool2, 0x5a, pool_b));
        void *fr[8];
        pie_cuda_tokmeta tm = dev_meta(&b, fr);
        for (int r = 1; r <= 8; r *= 2) {
            CU(cudaMemset(dq, 0x7f, qb));
            CU(cudaMemset(dq2, 0x7f, qb));
            kv.pool = dpool2;
            CHECK(pie__cuda_gemv(dqkv, 0, dW, n, k, dx, m, r, 0, 0) == 0,
                  "gemv refused");
            pie__cuda_qkv_post(dq2, dqkv, bias ? db : NULL, NULL, NULL, 1e-6f,
                               dinv, &tm, &kv, layer, m, nh, 0);
            kv.pool = dpool;
            pie_cuda_qkv_epi e = { dq, bias ? db : NULL, dinv, tm, kv, layer, nh };
            CHECK(pie__cuda_gemv_qkv(&e, dW, k, dx, m, r, 1, 0) == 0,
                  "gemv_qkv m %d r %d refused", m, r);
            dget(q, dq, qb);
            dget(q2, dq2, qb);
            dget(pool, dpool, pool_b);
            dget(pool2, dpool2, pool_b);
            CHECK(memcmp(q, q2, qb) == 0 && memcmp(pool, pool2, pool_b) == 0,
                  "gemv_qkv nh %d nkv %d hd %d bias %d m %d r %d differs "
                  "from gemv + qkv_post", nh, nkv, hd, bias, m, r);
        }
        for (int i = 0; i < 8; i++) cudaFree(fr[i]);
        cudaFree(dpool); cudaFree(dpool2);
        free(pool); free(pool2);
    }
    pie_cuda_qkv_epi e = { dq, NULL, dinv, {0}, { NULL, L, nkv, 8, 24 }, 0, nh };
    CHECK(pie__cuda_gemv_qkv(&e, dW, k, dx, 1, 1, 0, 0) == -1,
          "gemv_qkv took head dim 24 (not a multiple of 16)");
    printf("gemv_qkv: nh %d nkv %d hd %d k %d bias %d, m 1..%d, r 1/2/4/8 "
           "equal to gemv + qkv_post\n", nh, nkv, hd, k, bias, M);
    cudaFree(dW); cudaFree(dx); cudaFree(dqkv); cudaFree(db); cudaFree(dinv);
    cudaFree(dq); cudaFree(dq2);
    free(W); free(x); free(bs); free(q); free(q2);
}

int main(void)
{
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0)
        TEST_SKIP("no CUDA GPU");
    if (getenv("PIE_KTEST_WGMM")) {     /* the Hopper matmul alone */
        test_wgmm();
        return 0;
    }
    test_rmsnorm();
    test_silu();
    test_gemv();
    test_wgmm();
    test_copy_slots();
    test_qkv_post(4, 2, 16, 1, 0, 0);
    test_qkv_post(8, 2, 64, 0, 1, 0);
    test_qkv_post(5, 1, 64, 1, 1, 0);     /* 7 heads, two a warp: one idles */
    test_qkv_post(32, 8, 128, 0, 0, 0);
    test_qkv_post(4, 2, 18, 1, 1, 0);     /* hd / 2 odd: the scalar RoPE loop */
    test_qkv_post(32, 8, 128, 1, 0, 1);
    test_gemv_qkv(4, 2, 64, 264, 1);
    test_gemv_qkv(32, 8, 128, 512, 0);
    test_gemv_qkv(6, 3, 16, 72, 1);
    for (int m = 0; m < 2; m++) {
        test_attention(4, 2, 16, m, 1);
        test_attention(8, 4, 8, m, 3);
        test_attention(32, 8, 64, m, 1);
        test_attention(32, 8, 128, m, 4);
        test_attention(6, 6, 32, m, 2);
        test_attention(4, 2, 16, m, -1);      /* tensor-core prefill */
        test_attention(32, 8, 64, m, -1);
        test_attention(32, 8, 64, m, -12);
        test_attention(32, 8, 64, m, -8);
        test_attention(32, 8, 128, m, -1);
        test_attention(32, 8, 128, m, -12);   /* pages of 12 and 8 slots */
        test_attention(32, 8, 128, m, -8);
        test_attention(6, 6, 32, m, -1);
        test_attention_mode(4, 2, 16, m, 1, 1);   /* grouped tensor-core */
        test_attention_mode(32, 8, 64, m, 1, 1);
        test_attention_mode(32, 8, 64, m, 3, 1);
        test_attention_mode(32, 8, 128, m, 4, 1);
        test_attention_mode(6, 6, 32, m, 2, 1);
        /* decode tensor-core, grids of 1 .. 1000 blocks (more than the
         * KV blocks: idle ones) */
        test_attention_mode(4, 2, 16, m, 1, 2);
        test_attention_mode(32, 8, 64, m, 1, 2);
        test_attention_mode(32, 8, 64, m, 3, 2);
        test_attention_mode(32, 8, 64, m, 61, 2);
        test_attention_mode(32, 8, 128, m, 4, 2);
        test_attention_mode(32, 8, 128, m, 1000, 2);
        test_attention_mode(32, 4, 128, m, 2, 2);  /* G = 8 */
        test_attention_mode(32, 4, 128, m, 37, 2);
        test_attention_mode(6, 6, 32, m, 2, 2);
        /* the whole-item plan: fewer blocks than items, and more */
        test_attention_mode(32, 8, 128, m, 3, 3);
        test_attention_mode(32, 8, 128, m, 37, 3);
        test_attention_mode(32, 8, 64, m, 5, 3);
        test_attention_mode(32, 4, 128, m, 61, 3);
        test_attention_mode(32, 8, 128, m, 37, 4);   /* two blocks an SM */
        test_attention_mode(32, 8, 64, m, 5, 4);
        test_attention_mode(32, 8, 64, m, 37, 6);    /* four an SM */
        test_attention_mode(6, 6, 32, m, 7, 6);
        /* the cluster plan: 2 .. 16 blocks a cluster (empty ranks on the
         * short items; 3, 5 and 6 split the head dims unevenly) */
        test_attention_mode(32, 8, 128, m, 8, 7);
        test_attention_mode(32, 8, 128, m, 16, 7);
        test_attention_mode(32, 4, 128, m, 2, 7);    /* G = 8 */
        test_attention_mode(32, 8, 128, m, 3, 7);
        test_attention_mode(32, 8, 64, m, 4, 7);
        test_attention_mode(32, 8, 64, m, 6, 7);
        test_attention_mode(4, 2, 16, m, 16, 7);
        test_attention_mode(6, 6, 32, m, 8, 7);
        test_attention_mode(6, 6, 32, m, 5, 7);
    }
    test_samplers(1000);
    test_samplers(128256);
    TEST_DONE();
}
