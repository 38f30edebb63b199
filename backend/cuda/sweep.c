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
 * growth falls on all alike. A step counts only where it ran in full
 * under its configuration: not a segment's first (the graphs are dropped
 * at each switch), not one that captured a graph or made a plan, not a
 * failed one. At destroy each configuration's mean wall time a step goes
 * to stderr.
 *
 * PIE_CUDA_GEMV_SWEEP="A|B|..": each configuration a list "NxK:r,..." of
 * weights (n x k) and their warps (1, 2, 4 or 8); an empty one is the
 * tuner's choice. Only plans where gemv.cu runs change.
 *
 * State (cuda_sweep, owned by the backend): the configurations as text,
 * the current one, whether this step counts, the graph captures and the
 * plan cache's next slot before it (to tell a step that captured or made
 * a plan), the step count, and per configuration the sum of counted step
 * times and their number. The tuner's warps stay in each plan
 * (mm_plan.gemv_r_tuned).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

#define SWEEP_MAX 8

struct cuda_sweep {
    char    cfg[SWEEP_MAX][256];
    int     n_cfg, seg, cur, skip, plan_next;
    int64_t step, captured;
    double  sum[SWEEP_MAX], t0;
    int64_t count[SWEEP_MAX];
};

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
    s->cur = -1;
}

/* Gives every gemv.cu plan of at most 16 rows configuration i's warps (the
 * tuner's where it names none: plans made since the last call too); 1
 * where any plan changed. */
static int sweep_apply(cuda_backend *c, int i)
{
    cuda_sweep *s = c->sweep;
    int changed = 0;
    for (int j = 0; j < MM_CACHE; j++) {
        mm_plan *p = &c->plans[j];
        if (!p->used || p->m > PIE_CUDA_GEMV_MAX_M || p->gemv_r_tuned <= 0)
            continue;
        int r = cuda_gemv_warps_listed(s->cfg[i], p->n, p->k);
        r = r ? r : p->gemv_r_tuned;
        changed |= p->gemv_r != r;
        p->gemv_r = r;
    }
    return changed;
}

/* Drops every captured graph (they hold the warps they were captured
 * with; graph keys do not). */
static void drop_graphs(cuda_backend *c)
{
    for (int j = 0; j < GRAPH_CACHE; j++)
        if (c->graphs[j].exec) {
            cudaGraphExecDestroy(c->graphs[j].exec);
            c->graphs[j].exec = NULL;
        }
}

/* Before a forward of n tokens: in decode steps of at most 16 rows, the
 * configuration of this step's segment (a new one drops the graphs, also
 * where no plan changes: a plan remade since may hold other warps than
 * a graph), and its timer. */
void cuda_sweep_before(cuda_backend *c, int decode, int n)
{
    cuda_sweep *s = c->sweep;
    if (!s || !decode || n > PIE_CUDA_GEMV_MAX_M) return;
    int i = (int)(s->step / s->seg % s->n_cfg);
    int changed = sweep_apply(c, i);
    s->skip = changed || i != s->cur;
    if (s->skip) drop_graphs(c);
    s->cur = i;
    s->captured = c->n_captured;
    s->plan_next = c->plan_next;
    s->t0 = pie_cuda_now_s();
}

/* After that forward (rc its result): its time counts for the
 * configuration unless it failed, captured a graph, made a plan (the
 * configuration then takes that plan from the next step), or began a
 * segment. */
void cuda_sweep_after(cuda_backend *c, int decode, int n, int rc)
{
    cuda_sweep *s = c->sweep;
    if (!s || !decode || n > PIE_CUDA_GEMV_MAX_M) return;
    double t = pie_cuda_now_s() - s->t0;
    int made = c->plan_next != s->plan_next;   /* (one per plan made) */
    if (sweep_apply(c, s->cur)) {
        drop_graphs(c);
        made = 1;
    }
    if (!rc && !s->skip && !made && c->n_captured == s->captured) {
        s->sum[s->cur] += t;
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
