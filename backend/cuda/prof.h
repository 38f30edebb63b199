/*
 * prof.h — per-operation GPU time of the forward, without nsys
 * (PIE_CUDA_PROFILE=1). The backend marks the stream after each operation
 * of a step (cudaEvent records, so CUDA graphs are off and kernels do not
 * overlap across marks); after the step's synchronize, the time between
 * consecutive marks is added to the operation that ended at the second.
 * Totals print at destroy, per step, split into decode and prefill steps.
 * PIE_CUDA_PROFILE=2 leaves out the first step of each kind, where plans
 * are made, matmuls timed and kernel modules loaded (a later step with a
 * new bucket of m still times its matmuls inside the profile).
 *
 *   on             0 off, 1 every step, 2 all but each kind's first
 *   ev[i], op[i]   the i-th mark of the current step and its operation
 *   ms[kind][op]   accumulated milliseconds (kind 0 prefill, 1 decode)
 *   steps[kind]    steps accumulated
 *   left[kind]     1 once the kind's first step was left out (=2)
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
    long         steps[2], left[2];
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

/*
 * Where a decode step's wall time goes (PIE_CUDA_STEPS=1): host time from
 * the forward's entry to the metadata upload (planning), from there to the
 * last launch (enqueue), the GPU's span from the upload to the last
 * operation (two events; it includes the graph's launch latency), the
 * forward's wall time, and the caller's time between forwards. Means over
 * the decode steps after the first two print at destroy.
 *
 *   t[0..3]   host times (s): entry, upload, enqueued, returned
 *   sum[]     accumulated: plan, enqueue, gpu span, wall, between (ms)
 */
typedef struct pie_cuda_steps {
    int          on, decode, seen;
    cudaEvent_t  e0, e1;
    double       t[4], last_end;
    double       sum[5];
    long         n;
} pie_cuda_steps;

/* Seconds on the monotonic clock (host wall time of steps and sweeps). */
double pie_cuda_now_s(void);
void pie_cuda_steps_init(pie_cuda_steps *s);
/* At the forward's entry; decode: whether it is a decode step. */
void pie_cuda_steps_enter(pie_cuda_steps *s, int decode);
/* Just before the metadata upload, and after the last launch. */
void pie_cuda_steps_upload(pie_cuda_steps *s, cudaStream_t st);
void pie_cuda_steps_enqueued(pie_cuda_steps *s, cudaStream_t st);
/* After the step's synchronize. */
void pie_cuda_steps_end(pie_cuda_steps *s);
void pie_cuda_steps_done(pie_cuda_steps *s);

#endif
