/*
 * prof.h — per-operation GPU time of the forward, without nsys
 * (PIE_CUDA_PROFILE=1). The backend marks the stream after each operation
 * of a step (cudaEvent records, so CUDA graphs are off and kernels do not
 * overlap across marks); after the step's synchronize, the time between
 * consecutive marks is added to the operation that ended at the second.
 * Totals print at destroy, per step, split into decode and prefill steps.
 *
 *   ev[i], op[i]   the i-th mark of the current step and its operation
 *   ms[kind][op]   accumulated milliseconds (kind 0 prefill, 1 decode)
 *   steps[kind]    steps accumulated
 */
#ifndef PIE_CUDA_PROF_H
#define PIE_CUDA_PROF_H

#include <cuda_runtime_api.h>

enum {
    PROF_START, PROF_EMBED, PROF_NORM, PROF_QKV, PROF_QKV_POST, PROF_ATTN,
    PROF_MERGE, PROF_WO, PROF_GATE_UP, PROF_DOWN, PROF_OUTPUT, PROF_N
};

#define PROF_MAX_MARKS 1024

typedef struct pie_cuda_prof {
    int          on;
    cudaEvent_t  ev[PROF_MAX_MARKS];
    int          op[PROF_MAX_MARKS];
    int          n, n_created, kind;
    double       ms[2][PROF_N];
    long         steps[2];
} pie_cuda_prof;

/* Reads PIE_CUDA_PROFILE; returns whether profiling is on. */
int pie_cuda_prof_init(pie_cuda_prof *p);
/* Starts a step (decode = 1 for decode steps). */
void pie_cuda_prof_begin(pie_cuda_prof *p, int decode, cudaStream_t s);
/* Marks the end of operation op on stream s. */
void pie_cuda_prof_mark(pie_cuda_prof *p, int op, cudaStream_t s);
/* After the step's stream synchronize: adds its times. */
void pie_cuda_prof_end(pie_cuda_prof *p);
/* Prints the totals to stderr and frees the events. */
void pie_cuda_prof_done(pie_cuda_prof *p);

#endif
