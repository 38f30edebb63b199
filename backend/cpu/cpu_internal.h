/*
 * cpu_internal.h — pieces of the CPU backend shared between its files:
 * the float32 kernels (ops.c) and the worker pool (pool.c). Nothing outside
 * backend/cpu/ includes this header.
 *
 * Kernels follow llama2.c: (out, in..., dims), row-major float32, a shape
 * comment on the first line of each body. "n" is always the number of rows
 * (tokens) processed at once.
 */
#ifndef PIE_CPU_INTERNAL_H
#define PIE_CPU_INTERNAL_H

#include <stdint.h>

/* ------------------------------------------------------------- kernels */

/* out = x·wᵀ (+ beta·out): x (n, in), w (outd, in), out (n, outd) with
 * row stride ldo (a column slice of a wider output). */
void pie__cpu_matmul(float *out, int32_t ldo, const float *x, const float *w,
                     int32_t n, int32_t in, int32_t outd, float beta);
/* out[i] = x[i] / rms(x[i]) * w, rows of length d. out may equal x. */
void pie__cpu_rmsnorm(float *out, const float *x, const float *w, int32_t n,
                      int32_t d, float eps);
/* x[i, :] += b for n rows of length d. */
void pie__cpu_add_bias(float *x, const float *b, int32_t n, int32_t d);
/* Rotates n rows of n_heads heads of head_dim (half-split layout) by
 * positions[i] * inv_freq. */
void pie__cpu_rope(float *x, const int32_t *positions, int32_t n,
                   int32_t n_heads, int32_t head_dim, const float *inv_freq);
/* g = silu(g) * u, n elements. */
void pie__cpu_silu_mul(float *g, const float *u, int64_t n);
/* inv_freq (head_dim/2) for RoPE, with llama3 scaling when cfg says so. */
struct pie_model_config;
void pie__cpu_rope_freqs(float *inv_freq, const struct pie_model_config *cfg);

/* ------------------------------------------------------------- pool */

typedef struct pie__cpu_pool pie__cpu_pool;
/* fn(ctx, task, worker) for task in [0, n_tasks); worker in [0, n_threads). */
typedef void (*pie__cpu_task_fn)(void *ctx, int64_t task, int32_t worker);

/* Starts n_threads - 1 workers (the caller is worker 0). */
int  pie__cpu_pool_create(int32_t n_threads, pie__cpu_pool **out);
/* Runs every task and returns when all are done. Not reentrant. */
void pie__cpu_pool_run(pie__cpu_pool *p, int64_t n_tasks, pie__cpu_task_fn fn,
                       void *ctx);
void pie__cpu_pool_free(pie__cpu_pool *p);

#endif
