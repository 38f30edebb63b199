/*
 * ops.c — float32 kernels of the CPU backend.
 *
 * Every dense matmul goes through pie__cpu_matmul (OpenBLAS sgemm, weights
 * stored (out, in) as Hugging Face keeps them, so C = X·Wᵀ); the backend
 * splits W's rows across its worker pool and runs OpenBLAS single-threaded. The rest is
 * straight-line math matching the Hugging Face `transformers` modules it
 * replaces: LlamaRMSNorm (mean of squares in float32, then weight * x),
 * rotate_half RoPE with cos/sin of float32 angles, and
 * _compute_llama3_parameters for llama3 frequency scaling.
 */
#include <cblas.h>
#include <math.h>

#include "backend/cpu/cpu_internal.h"
#include "model/model.h"

void pie__cpu_matmul(float *out, int32_t ldo, const float *x, const float *w,
                     int32_t n, int32_t in, int32_t outd, float beta)
{
    /* x (n, in), w (outd, in) -> out (n, outd) with row stride ldo */
    if (n == 0 || outd == 0) return;
    if (n == 1) {   /* decode: sgemv streams w once, sgemm would pack it */
        cblas_sgemv(CblasRowMajor, CblasNoTrans, outd, in, 1.0f, w, in, x, 1,
                    beta, out, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, outd, in, 1.0f, x,
                in, w, in, beta, out, ldo);
}

void pie__cpu_rmsnorm(float *out, const float *x, const float *w, int32_t n,
                      int32_t d, float eps)
{
    /* x (n, d), w (d) -> out (n, d) */
    for (int32_t i = 0; i < n; i++) {
        const float *xi = x + (int64_t)i * d;
        float *oi = out + (int64_t)i * d;
        float ss = 0.0f;
        for (int32_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        float scale = 1.0f / sqrtf(ss / d + eps);
        for (int32_t j = 0; j < d; j++) oi[j] = w[j] * (xi[j] * scale);
    }
}

void pie__cpu_add_bias(float *x, const float *b, int32_t n, int32_t d)
{
    /* x (n, d), b (d) */
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < d; j++) x[(int64_t)i * d + j] += b[j];
}

void pie__cpu_rope(float *x, const int32_t *positions, int32_t n,
                   int32_t n_heads, int32_t head_dim, const float *inv_freq)
{
    /* x (n, n_heads, head_dim), positions (n), inv_freq (head_dim/2) */
    int32_t half = head_dim / 2;
    for (int32_t i = 0; i < n; i++) {
        float pos = (float)positions[i];
        for (int32_t j = 0; j < half; j++) {
            float angle = pos * inv_freq[j];
            float c = cosf(angle), s = sinf(angle);
            for (int32_t h = 0; h < n_heads; h++) {
                float *v = x + ((int64_t)i * n_heads + h) * head_dim;
                float a = v[j], b = v[j + half];
                v[j] = a * c - b * s;
                v[j + half] = b * c + a * s;
            }
        }
    }
}

void pie__cpu_silu_mul(float *g, const float *u, int64_t n)
{
    /* g (n), u (n) */
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void pie__cpu_rope_freqs(float *inv_freq, const struct pie_model_config *cfg)
{
    /* inv_freq (head_dim/2) */
    int32_t hd = cfg->head_dim;
    for (int32_t i = 0; i < hd / 2; i++) {
        float base = (float)pow(cfg->rope_theta, (double)(2 * i) / hd);
        inv_freq[i] = 1.0f / base;
    }
    if (!cfg->rope_llama3) return;
    float factor = cfg->rope_factor, lo = cfg->rope_low_freq_factor,
          hi = cfg->rope_high_freq_factor, old = (float)cfg->rope_orig_max_pos;
    float low_wavelen = old / lo, high_wavelen = old / hi;
    for (int32_t i = 0; i < hd / 2; i++) {
        float f = inv_freq[i];
        float wavelen = 2.0f * (float)M_PI / f;
        float scaled = wavelen > low_wavelen ? f / factor : f;
        if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
            float smooth = (old / wavelen - lo) / (hi - lo);
            scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
        }
        inv_freq[i] = scaled;
    }
}
