/*
 * batch_decode.h — bytes to one pie_forward_batch, for fuzz_batch.c and
 * the CUDA backend's replay of its corpus (tests/cuda/test_cuda_fuzz.c):
 * up to 4 requests of up to 8 new tokens over a pool of NPAGES pages of PS
 * slots, per-token masks, up to 6 output rows with any sampler or probe
 * (fields free to be wrong), logit masks. fb holds the arrays;
 * batch_decode fills it and the batch that points into it.
 */
#ifndef PIE_FUZZ_BATCH_DECODE_H
#define PIE_FUZZ_BATCH_DECODE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend/backend.h"

#define PS      4
#define NPAGES  16
#define MAXR    4
#define MAXT    8
#define MAXO    6

typedef struct rd {
    const uint8_t *p;
    size_t         n;
} rd;

static inline uint32_t r8(rd *r)
{
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}

static inline uint32_t r16(rd *r)
{
    return r8(r) | r8(r) << 8;
}

static inline float rf(rd *r)
{
    static const float v[] = { 0.0f, 0.7f, 1.0f, -1.0f, 0.05f, 2.0f,
                               INFINITY, NAN };
    return v[r8(r) % 8];
}

/* The arrays of one batch, sized for the bounds above. */
typedef struct fb {
    int32_t  tok[MAXR * MAXT], pos[MAXR * MAXT], qo[MAXR + 1];
    int32_t  pages[MAXR * 5], kvp[MAXR + 1], last[MAXR], oidx[MAXO];
    uint32_t mind[MAXR * MAXT + 1], mruns[MAXR * MAXT * 3];
    uint32_t lmind[MAXO + 1], lmruns[MAXO * 3];
    int32_t  ids[MAXO * 3];
    pie_sampler smp[MAXO];
} fb;

/* Requests: tokens, positions (consistent with the pages where a flag
 * says so, else free), pages (ids may be out of range), last fill. */
static inline int read_reqs(rd *r, fb *f, int nr, int32_t *nt)
{
    int t = 0, np = 0;
    f->qo[0] = f->kvp[0] = 0;
    for (int i = 0; i < nr; i++) {
        int n = (int)(r8(r) % (MAXT + 1)), pn = (int)(r8(r) % 5);
        f->last[i] = (int32_t)(r8(r) % (PS + 2));
        for (int k = 0; k < pn; k++) f->pages[np++] = (int32_t)(r8(r) % 18) - 1;
        int consistent = r8(r) & 1;
        int64_t kv = (int64_t)(pn - 1) * PS + f->last[i];
        for (int k = 0; k < n; k++, t++) {
            f->tok[t] = (int32_t)(r16(r) % 300);
            f->pos[t] = consistent ? (int32_t)(kv - n + k)
                                   : (int32_t)(r8(r) % 24) - 2;
        }
        f->qo[i + 1] = t;
        f->kvp[i + 1] = np;
    }
    *nt = t;
    return t;
}

/* Per-token attention masks (1..3 runs each) where r says so. */
static inline int read_masks(rd *r, fb *f, int nt)
{
    if (!(r8(r) & 1)) return 0;
    uint32_t m = 0;
    f->mind[0] = 0;
    for (int t = 0; t < nt; t++) {
        int n = 1 + (int)(r8(r) % 3);
        for (int k = 0; k < n; k++) f->mruns[m++] = r8(r) % 20;
        f->mind[t + 1] = m;
    }
    return 1;
}

/* Output rows: token index, sampler fields (any values), LOGPROBS ids,
 * and logit masks where r says so. */
static inline int read_outputs(rd *r, fb *f, int nt, int *lm)
{
    int no = (int)(r8(r) % (MAXO + 1)), ni = 0;
    *lm = r8(r) & 1;
    uint32_t m = 0;
    f->lmind[0] = 0;
    for (int o = 0; o < no; o++) {
        f->oidx[o] = (int32_t)(r8(r) % (uint32_t)(nt + 2)) - 1;
        pie_sampler *s = &f->smp[o];
        memset(s, 0, sizeof *s);
        s->kind = (int32_t)(r8(r) % 7);
        s->temperature = rf(r);
        s->top_k = (int32_t)(r16(r) % 300) - 2;
        s->top_p = rf(r);
        s->min_p = rf(r);
        s->seed = r16(r);
        s->n_ids = (int32_t)(r8(r) % 4);
        s->ids = f->ids + ni;
        for (int k = 0; k < s->n_ids; k++) f->ids[ni++] = (int32_t)(r16(r) % 300) - 2;
        int n = *lm ? 1 + (int)(r8(r) % 3) : 0;
        for (int k = 0; k < n; k++) f->lmruns[m++] = r16(r) % 300;
        f->lmind[o + 1] = m;
    }
    return no;
}

/* Decodes data into f and b (b points into f). */
static inline void batch_decode(const uint8_t *data, size_t size, fb *f,
                                pie_forward_batch *b)
{
    rd r = { data, size };
    int32_t nt = 0;
    int nr = 1 + (int)(r8(&r) % MAXR), lm = 0;
    read_reqs(&r, f, nr, &nt);
    int masked = read_masks(&r, f, nt);
    int no = read_outputs(&r, f, nt, &lm);
    *b = (pie_forward_batch){
        .n_tokens = nt, .n_reqs = nr, .token_ids = f->tok, .positions = f->pos,
        .qo_indptr = f->qo, .kv_page_indices = f->pages,
        .kv_page_indptr = f->kvp, .kv_last_page_len = f->last,
        .mask_indptr = masked ? f->mind : NULL,
        .mask_runs = masked ? f->mruns : NULL, .n_outputs = no,
        .output_token_idx = f->oidx, .samplers = f->smp,
        .logit_mask_indptr = lm ? f->lmind : NULL,
        .logit_mask_runs = lm ? f->lmruns : NULL };
}

#endif
