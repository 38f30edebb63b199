/*
 * trace.h — a kernel timeline of decode steps from CUPTI's activity records
 * (PIE_CUDA_TRACE=1: a summary by kernel on stderr when the backend closes;
 * =FILE: also every kernel, one line each). Unlike PIE_CUDA_PROFILE it
 * keeps graphs and PDL on, so kernels overlap as in a real step. One
 * backend at a time; without CUPTI at build time the calls do nothing.
 */
#ifndef PIE_CUDA_TRACE_H
#define PIE_CUDA_TRACE_H

#ifdef __cplusplus
extern "C" {
#endif

void pie_cuda_trace_start(void);   /* at backend creation, if asked     */
void pie_cuda_trace_decode(void);  /* before each decode step: records  */
                                   /* start at the first                */
void pie_cuda_trace_stop(void);    /* at destroy: flush and print       */

#ifdef __cplusplus
}
#endif

#endif
