/*
 * trace.c — a kernel timeline of decode steps that does not serialize them
 * (PIE_CUDA_TRACE=1, or =FILE for every record). PIE_CUDA_PROFILE puts an
 * event after each operation, which stops kernels from overlapping under
 * PDL and graphs; this asks CUPTI's activity API for each kernel's GPU
 * start and end instead, graph nodes included, so what one kernel does to
 * its neighbours shows (NOTES.md, round 9).
 *
 *   recs     every kernel, memset and memcpy that started after the third
 *            decode step began (pie_cuda_trace_decode; the first two run
 *            eagerly and capture the graph): name ("[memset N bytes]" for
 *            the others), start, end (ns, GPU clock)
 *   by name  at the end, grouped by name in order of first appearance:
 *            count, mean duration, median gap from the previous record's
 *            end to its start (negative: they overlapped)
 *
 * Built only where CMake finds CUPTI (PIE_CUDA_CUPTI); otherwise the calls
 * below do nothing and PIE_CUDA_TRACE prints that it is not built in.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/trace.h"

#ifdef PIE_CUDA_CUPTI
#include <cupti.h>

#define TRACE_BUF (8u << 20)
#define NAME_MAX_LEN 72

typedef struct trace_rec {
    char     name[NAME_MAX_LEN];
    uint64_t start, end;
} trace_rec;

static struct {
    int        on;
    uint64_t   t0;            /* records before this are dropped           */
    int        n_decode;      /* decode steps begun                        */
    trace_rec *recs;
    size_t     n, cap;
} T;

static void CUPTIAPI buf_request(uint8_t **buf, size_t *size, size_t *max)
{
    *buf = aligned_alloc(8, TRACE_BUF);
    *size = *buf ? TRACE_BUF : 0;
    *max = 0;
}

/* A record named name over [start, end), if after the first decode step. */
static void keep(const char *name, uint64_t start, uint64_t end)
{
    if (!T.t0 || start < T.t0) return;
    if (T.n == T.cap) {
        size_t cap = T.cap ? 2 * T.cap : 4096;
        trace_rec *r = realloc(T.recs, cap * sizeof *r);
        if (!r) return;
        T.recs = r;
        T.cap = cap;
    }
    trace_rec *r = &T.recs[T.n++];
    snprintf(r->name, sizeof r->name, "%s", name ? name : "?");
    r->start = start;
    r->end = end;
}

static void CUPTIAPI buf_complete(CUcontext ctx, uint32_t stream, uint8_t *buf,
                                  size_t size, size_t valid)
{
    (void)ctx; (void)stream; (void)size;
    CUpti_Activity *rec = NULL;
    char name[NAME_MAX_LEN];
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            const CUpti_ActivityKernel10 *k = (const void *)rec;
            keep(k->name, k->start, k->end);
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            const CUpti_ActivityMemset4 *m = (const void *)rec;
            snprintf(name, sizeof name, "[memset %llu bytes]",
                     (unsigned long long)m->bytes);
            keep(name, m->start, m->end);
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m = (const void *)rec;
            snprintf(name, sizeof name, "[memcpy %llu bytes]",
                     (unsigned long long)m->bytes);
            keep(name, m->start, m->end);
        }
    }
    free(buf);
}

void pie_cuda_trace_start(void)
{
    if (T.on || !getenv("PIE_CUDA_TRACE")) return;
    if (cuptiActivityRegisterCallbacks(buf_request, buf_complete) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS) {
        fprintf(stderr, "pie trace: CUPTI activity tracing unavailable\n");
        return;
    }
    T.on = 1;
}

void pie_cuda_trace_decode(void)
{
    if (T.on && ++T.n_decode == 3) cuptiGetTimestamp(&T.t0);
}

static int by_start(const void *a, const void *b)
{
    const trace_rec *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Record i's gap: from the previous record's end to its start (ns). */
static double gap_of(size_t i)
{
    return i ? (double)T.recs[i].start - (double)T.recs[i - 1].end : 0.0;
}

/* Records of record i's name (the first of them): count, mean duration,
 * median gap before. */
static void print_name(size_t i, double *gaps)
{
    double dur = 0;
    size_t cnt = 0;
    for (size_t j = i; j < T.n; j++) {
        if (strcmp(T.recs[j].name, T.recs[i].name)) continue;
        dur += (double)(T.recs[j].end - T.recs[j].start);
        gaps[cnt++] = gap_of(j);
    }
    qsort(gaps, cnt, sizeof *gaps, by_value);
    fprintf(stderr, "pie trace: %6zu x %8.2f us, median gap before %7.2f us  %s\n",
            cnt, dur / (double)cnt / 1e3, gaps[cnt / 2] / 1e3, T.recs[i].name);
}

/* Records grouped by name, in order of first appearance. */
static void print_summary(void)
{
    size_t n_names = 0;
    double *gaps = malloc(sizeof *gaps * (T.n ? T.n : 1));
    if (!gaps) return;
    for (size_t i = 0; i < T.n; i++) {
        int seen = 0;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !strcmp(T.recs[j].name, T.recs[i].name);
        if (seen) continue;
        print_name(i, gaps);
        n_names++;
    }
    free(gaps);
    if (T.n > 1)
        fprintf(stderr, "pie trace: %zu kernels of %zu names over %.3f ms\n",
                T.n, n_names, (double)(T.recs[T.n - 1].end - T.recs[0].start) / 1e6);
}

static void write_records(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "pie trace: cannot write %s\n", path);
        return;
    }
    fprintf(f, "start_us\tdur_us\tgap_us\tname\n");
    for (size_t i = 0; i < T.n; i++)
        fprintf(f, "%.3f\t%.3f\t%.3f\t%s\n",
                (double)(T.recs[i].start - T.recs[0].start) / 1e3,
                (double)(T.recs[i].end - T.recs[i].start) / 1e3,
                gap_of(i) / 1e3, T.recs[i].name);
    fclose(f);
}

void pie_cuda_trace_stop(void)
{
    if (!T.on) return;
    cuptiActivityFlushAll(1);
    cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityDisable(CUPTI_ACTIVITY_KIND_MEMSET);
    cuptiActivityDisable(CUPTI_ACTIVITY_KIND_MEMCPY);
    T.on = 0;
    qsort(T.recs, T.n, sizeof *T.recs, by_start);
    print_summary();
    const char *path = getenv("PIE_CUDA_TRACE");
    if (path && strcmp(path, "1")) write_records(path);
    free(T.recs);
    memset(&T, 0, sizeof T);
}

#else   /* no CUPTI at build time */

void pie_cuda_trace_start(void)
{
    if (getenv("PIE_CUDA_TRACE"))
        fprintf(stderr, "pie trace: not built in (CUPTI not found)\n");
}

void pie_cuda_trace_decode(void) {}
void pie_cuda_trace_stop(void) {}

#endif
