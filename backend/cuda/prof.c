/*
 * prof.c — per-operation GPU time of the forward (see prof.h).
 */
#include "backend/cuda/prof.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const NAMES[PROF_N] = {
    "start", "embed", "rmsnorm", "qkv matmul", "qkv post (rope, kv)",
    "attention", "attention merge", "wo matmul", "gate/up matmul",
    "down matmul", "lm head + sampling"
};

int pie_cuda_prof_init(pie_cuda_prof *p)
{
    const char *e = getenv("PIE_CUDA_PROFILE");
    p->on = e && *e && *e != '0';
    return p->on;
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
        fprintf(stderr, "pie profile: %s, %ld steps, %.3f ms per step "
                "(kernels serialized by the marks)\n",
                k ? "decode" : "prefill", p->steps[k], tot / p->steps[k]);
        for (int o = 1; o < PROF_N; o++)
            if (p->ms[k][o] > 0)
                fprintf(stderr, "pie profile:   %-22s %9.3f ms  %5.1f%%\n",
                        NAMES[o], p->ms[k][o] / p->steps[k],
                        100.0 * p->ms[k][o] / tot);
    }
    for (int i = 0; i < p->n_created; i++) cudaEventDestroy(p->ev[i]);
    p->n_created = 0;
}
