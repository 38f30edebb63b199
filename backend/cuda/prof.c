/*
 * prof.c — per-operation GPU time of the forward (see prof.h).
 */
#include "backend/cuda/prof.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static const char *const NAMES[PROF_N] = {
    "start", "embed", "rmsnorm", "qkv matmul", "qkv post (rope, kv)",
    "attention", "attention merge", "wo matmul", "gate/up matmul",
    "down matmul", "lm head + sampling"
};

int pie_cuda_prof_init(pie_cuda_prof *p)
{
    const char *e = getenv("PIE_CUDA_PROFILE");
    p->on = !e || !*e || *e == '0' ? 0 : atoi(e) == 2 ? 2 : 1;
    return p->on != 0;
}


void pie_cuda_prof_begin(pie_cuda_prof *p, int decode, cudaStream_t s)
{
    if (!p->on) return;
    p->n = 0;
    p->kind = decode != 0;
    pie_cuda_prof_mark(p, PROF_START, s);
}

void pie_cuda_prof_mark(pie_cuda_prof *p, int op, cudaStream_t s)
{
    if (!p->on || p->n >= PROF_MAX_MARKS) return;
    if (p->n == p->n_created) {
        if (cudaEventCreate(&p->ev[p->n]) != cudaSuccess) return;
        p->n_created++;
    }
    p->op[p->n] = op;
    cudaEventRecord(p->ev[p->n++], s);
}

void pie_cuda_prof_end(pie_cuda_prof *p)
{
    if (!p->on || p->n < 2) return;
    if (p->on == 2 && !p->left[p->kind]) {
        p->left[p->kind] = 1;
        return;
    }
    for (int i = 1; i < p->n; i++) {
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, p->ev[i - 1], p->ev[i]) == cudaSuccess)
            p->ms[p->kind][p->op[i]] += ms;
    }
    p->steps[p->kind]++;
}

void pie_cuda_prof_done(pie_cuda_prof *p)
{
    for (int k = 0; k < 2; k++) {
        if (!p->steps[k]) continue;
        double tot = 0;
        for (int o = 1; o < PROF_N; o++) tot += p->ms[k][o];
        fprintf(stderr, "pie profile: %s, %ld steps%s, %.3f ms per step "
                "(kernels serialized by the marks)\n",
                k ? "decode" : "prefill", p->steps[k],
                p->left[k] ? " after the first" : "", tot / p->steps[k]);
        for (int o = 1; o < PROF_N; o++)
            if (p->ms[k][o] > 0)
                fprintf(stderr, "pie profile:   %-22s %9.3f ms  %5.1f%%\n",
                        NAMES[o], p->ms[k][o] / p->steps[k],
                        100.0 * p->ms[k][o] / tot);
    }
    for (int i = 0; i < p->n_created; i++) cudaEventDestroy(p->ev[i]);
    p->n_created = 0;
}

/* ------------------------------------------------ decode step wall time */

double pie_cuda_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void pie_cuda_steps_init(pie_cuda_steps *s)
{
    const char *e = getenv("PIE_CUDA_STEPS");
    s->on = e && *e && *e != '0';
    if (s->on && cudaEventCreate(&s->e0) != cudaSuccess) s->on = 0;
    if (s->on && cudaEventCreate(&s->e1) != cudaSuccess) {
        cudaEventDestroy(s->e0);
        s->on = 0;
    }
}

void pie_cuda_steps_enter(pie_cuda_steps *s, int decode)
{
    if (!s->on) return;
    s->decode = decode;
    s->t[0] = pie_cuda_now_s();
}

void pie_cuda_steps_upload(pie_cuda_steps *s, cudaStream_t st)
{
    if (!s->on) return;
    s->t[1] = pie_cuda_now_s();
    cudaEventRecord(s->e0, st);
}

void pie_cuda_steps_enqueued(pie_cuda_steps *s, cudaStream_t st)
{
    if (!s->on) return;
    cudaEventRecord(s->e1, st);
    s->t[2] = pie_cuda_now_s();
}

void pie_cuda_steps_end(pie_cuda_steps *s)
{
    if (!s->on) return;
    s->t[3] = pie_cuda_now_s();
    double between = s->last_end > 0 ? s->t[0] - s->last_end : 0;
    s->last_end = s->t[3];
    if (!s->decode || ++s->seen <= 2) return;
    float gpu = 0.0f;
    cudaEventElapsedTime(&gpu, s->e0, s->e1);
    s->sum[0] += (s->t[1] - s->t[0]) * 1e3;
    s->sum[1] += (s->t[2] - s->t[1]) * 1e3;
    s->sum[2] += gpu;
    s->sum[3] += (s->t[3] - s->t[0]) * 1e3;
    s->sum[4] += between * 1e3;
    s->n++;
}

void pie_cuda_steps_done(pie_cuda_steps *s)
{
    if (!s->on) return;
    if (s->n)
        fprintf(stderr, "pie steps: %ld decode steps, mean ms: plan %.4f, "
                "enqueue %.4f, gpu span %.4f, forward %.4f, between "
                "forwards %.4f\n", s->n, s->sum[0] / s->n, s->sum[1] / s->n,
                s->sum[2] / s->n, s->sum[3] / s->n, s->sum[4] / s->n);
    cudaEventDestroy(s->e0);
    cudaEventDestroy(s->e1);
    s->on = 0;
}
