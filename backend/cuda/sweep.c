/*
 * sweep.c — gemv.cu's warps compared inside one process, as whole decode
 * steps (PIE_CUDA_GEMV_SWEEP; a measurement tool, off by default).
 *
 * Why: the tuner (matmul.c) times each matmul alone, and the batch-1 step
 * disagreed with it once (NOTES.md, round 22); A/Bs across processes are
 * noisy (1.13-1.21 ms for one binary at 1B batch 1). Here the
 * configurations take turns in one process: decode steps of at most 16
 * rows run in segments of S steps (PIE_CUDA_GEMV_SWEEP_STEPS, default 16),
 * configuration i in segments i, i + n, i + 2n, ... so the context's
 * growth falls on all alike; neither a segment's first step nor one that
 * changed a plan's warps (and so captures a new graph) is counted. At
 * destroy each configuration's mean wall time a step goes to stderr.
 *
 * PIE_CUDA_GEMV_SWEEP="A|B|..": each configuration a list "NxK:r,..." of
 * weights (n x k) and their warps (1, 2, 4 or 8); an empty one is the
 * tuner's choice. Only plans where gemv.cu runs change.
 *
 * State (cuda_sweep, owned by the backend): the configurations as text,
 * the current one and whether this step counts, the step count, and per
 * configuration the sum of counted step times and their number. The
 * tuner's warps stay in each plan (mm_plan.gemv_r_tuned).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cuda/cuda_internal.h"

#define SWEEP_MAX 8

struct cuda_sweep {
    char    cfg[SWEEP_MAX][256];
    int     n_cfg, seg, cur, skip;
    int64_t step;
    double  sum[SWEEP_MAX], t0;
    int64_t count[SWEEP_MAX];
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The warps configuration cfg gives the weight n x k; 0: the tuner's. */
static int cfg_warps(const char *cfg, int n, int k)
{
    int fn, fk, fr, used;
    while (sscanf(cfg, "%dx%d:%d%n", &fn, &fk, &fr, &used) == 3) {
        if (fn == n && fk == k && (fr == 1 || fr == 2 || fr == 4 || fr == 8))
            return fr;
        cfg += used;
        cfg += *cfg == ',';
    }
    return 0;
}

/* Parses PIE_CUDA_GEMV_SWEEP into c->sweep; nothing where it is unset. */
void cuda_sweep_init(cuda_backend *c)
{
    const char *e = getenv("PIE_CUDA_GEMV_SWEEP");
    if (!e || !(c->sweep = calloc(1, sizeof *c->sweep))) return;
    cuda_sweep *s = c->sweep;
    for (const char *p = e; s->n_cfg < SWEEP_MAX; s->n_cfg++) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len >= sizeof s->cfg[0]) len = sizeof s->cfg[0] - 1;
        memcpy(s->cfg[s->n_cfg], p, len);
        if (!bar) { s->n_cfg++; break; }
        p = bar + 1;
    }
    const char *st = getenv("PIE_CUDA_GEMV_SWEEP_STEPS");
    s->seg = st && atoi(st) > 0 ? atoi(st) : 16;
}

/* Gives every gemv.cu plan of at most 16 rows configuration i's warps (the
 * tuner's where it names none: plans made since the last call too), and
 * where any changed drops the captured graphs; 1 then. */
static int sweep_apply(cuda_backend *c, int i)
{
    cuda_sweep *s = c->sweep;
    int changed = 0;
    for (int j = 0; j < MM_CACHE; j++) {
        mm_plan *p = &c->plans[j];
        if (!p->used || p->m > PIE_CUDA_GEMV_MAX_M || p->gemv_r_tuned <= 0)
            continue;
        int r = cfg_warps(s->cfg[i], p->n, p->k);
        r = r ? r : p->gemv_r_tuned;
        changed |= p->gemv_r != r;
        p->gemv_r = r;
    }
    for (int j = 0; changed && j < GRAPH_CACHE; j++)
        if (c->graphs[j].exec) {
            cudaGraphExecDestroy(c->graphs[j].exec);
            c->graphs[j].exec = NULL;
        }
    return changed;
}

/* Before a forward of n tokens: in decode steps of at most 16 rows, the
 * configuration of this step's segment, and its timer. A step that had to
 * change a plan (and so captures a new graph) is not counted. */
void cuda_sweep_before(cuda_backend *c, int decode, int n)
{
    cuda_sweep *s = c->sweep;
    if (!s || !decode || n > PIE_CUDA_GEMV_MAX_M) return;
    s->cur = (int)(s->step / s->seg % s->n_cfg);
    s->skip = sweep_apply(c, s->cur);
    s->t0 = now_s();
}

/* After that forward: its time counts for the configuration, unless it
 * was the first of its segment (the first of all makes the plans of its
 * batch size, timing them). */
void cuda_sweep_after(cuda_backend *c, int decode, int n)
{
    cuda_sweep *s = c->sweep;
    if (!s || !decode || n > PIE_CUDA_GEMV_MAX_M) return;
    if (!s->skip && s->step % s->seg) {
        s->sum[s->cur] += now_s() - s->t0;
        s->count[s->cur]++;
    }
    s->step++;
}

/* Prints each configuration's mean step time, then frees the state. */
void cuda_sweep_done(cuda_backend *c)
{
    cuda_sweep *s = c->sweep;
    if (!s) return;
    for (int i = 0; i < s->n_cfg; i++)
        fprintf(stderr, "pie: sweep config %d (%s): %.4f ms a step over %lld "
                "steps\n", i, s->cfg[i][0] ? s->cfg[i] : "tuner's",
                s->count[i] ? 1e3 * s->sum[i] / (double)s->count[i] : 0.0,
                (long long)s->count[i]);
    free(s);
    c->sweep = NULL;
}
