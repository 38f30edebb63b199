/*
 * dec_calib.c — times, once when the backend starts, whether this GPU's
 * decode kernel streams long items faster on one block an SM (the
 * whole-item plan, pie_cuda_dec_plan_whole) than on the cut plan's grid.
 *
 * H100s of one kind differ there (NOTES.md, rounds 11 and 12): on most,
 * one block of 4 warps an SM took hd 128 B=16 ctx 8192 in 192 us against
 * the cut plan's 204; on some it took 232. No fixed rule suits both, so
 * the one-per-SM plan's bound on item length (PIE_CUDA_DEC_WHOLE_MAX KV
 * blocks on average) is lifted only where this measurement says so.
 *
 * The workload: B = n_sm / n_kv requests (B x n_kv items: at most one an
 * SM) of CALIB_SLOTS slots each, on pages 0.. of the pool in order, layer
 * 0 (zeroed first), Q zero; both plans timed twice, interleaved, the best
 * of each kept.
 * Nothing it writes outlives it: the pool's pages hold no request yet
 * (the backend runs it at creation), and its own buffers are freed.
 *
 *   calib  the host arrays, laid out as the one device copy: page table
 *          and token metadata, then each plan's pieces and bstart, the
 *          cut plan's merges (off[] holds each array's byte offset)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_kernels.h"

#define CALIB_SLOTS 8192        /* 128 KV blocks an item */
#define CALIB_REPS 4

enum { A_PAGES, A_SLOT, A_REQ, A_IND, A_LEN, A_P1, A_B1, A_PC, A_BC, A_MG, A_N };

typedef struct {
    void *host[A_N];
    size_t size[A_N], off[A_N + 1];
    int n_cut_blocks, n_merges;
    int64_t parts;                      /* partial rows of the cut plan */
} calib;

/* Mean us per call of a plan (and its merges), CALIB_REPS calls after
 * two warm-up calls; -1 on an error. */
static double time_plan(const pie_cuda_attn_item *pieces, const int32_t *bstart,
                        int n_blocks, int per_sm,
                        const pie_cuda_merge_item *merges, int n_merges,
                        const pie_cuda_tokmeta *tm, const pie_cuda_kv *kv,
                        int nh, float *q, float *po, float *pml, uint16_t *out,
                        cudaStream_t s)
{
    cudaEvent_t e[2];
    if (cudaEventCreate(&e[0]) != cudaSuccess) return -1;
    if (cudaEventCreate(&e[1]) != cudaSuccess) {
        cudaEventDestroy(e[0]);
        return -1;
    }
    for (int r = 0; r < 2 + CALIB_REPS; r++) {
        if (r == 2) cudaEventRecord(e[0], s);
        pie__cuda_attention_dec(out, po, pml, q, pieces, bstart, n_blocks, tm,
                                kv, 0, nh, per_sm, s);
        if (n_merges)
            pie__cuda_attn_merge(out, po, pml, merges, n_merges, nh, kv->n_kv,
                                 kv->head_dim, s);
    }
    cudaEventRecord(e[1], s);
    float ms = -1;
    if (cudaEventSynchronize(e[1]) != cudaSuccess ||
        cudaEventElapsedTime(&ms, e[0], e[1]) != cudaSuccess)
        ms = -1;
    cudaEventDestroy(e[0]);
    cudaEventDestroy(e[1]);
    return ms < 0 ? -1 : ms * 1e3 / CALIB_REPS;
}

static void calib_free(calib *c)
{
    for (int i = 0; i < A_N; i++) free(c->host[i]);
}

/* The host arrays of both plans; 0, or -1 (out of memory, or no plan). */
static int calib_plan(calib *c, int B, int nkv, int G, int n_sm,
                      int cut_blocks)
{
    int per = CALIB_SLOTS / 16, np = B * per, ni = B * nkv;
    size_t sz[A_N] = { 4 * (size_t)np, 4 * (size_t)B, 4 * (size_t)B,
                       4 * (size_t)(B + 1), 4 * (size_t)B,
                       sizeof(pie_cuda_attn_item) * (size_t)ni,
                       4 * (size_t)(n_sm + 1),
                       sizeof(pie_cuda_attn_item) * (size_t)(ni + cut_blocks),
                       4 * (size_t)(cut_blocks + 1),
                       sizeof(pie_cuda_merge_item) * (size_t)(cut_blocks + 1) };
    memset(c, 0, sizeof *c);
    for (int i = 0; i < A_N; i++) {
        c->size[i] = sz[i];
        c->off[i + 1] = c->off[i] + ((sz[i] + 15) & ~(size_t)15);
        if (!(c->host[i] = calloc(1, sz[i]))) return -1;
    }
    int32_t *pages = c->host[A_PAGES], *slot = c->host[A_SLOT],
            *req = c->host[A_REQ], *ind = c->host[A_IND], *len = c->host[A_LEN];
    for (int i = 0; i < np; i++) pages[i] = i;
    for (int r = 0; r <= B; r++) ind[r] = r * per;
    for (int r = 0; r < B; r++) {
        slot[r] = CALIB_SLOTS - 1;
        req[r] = r;
        len[r] = CALIB_SLOTS;
    }
    pie_cuda_attn_item *items = malloc(sizeof *items * (size_t)ni);
    if (!items) return -1;
    for (int i = 0; i < ni; i++)
        items[i] = (pie_cuda_attn_item){ i / nkv, i / nkv, 1, i % nkv, 0,
                                         CALIB_SLOTS, -1, 1 };
    int rc = pie_cuda_dec_plan_whole(items, ni, n_sm, c->host[A_P1],
                                     c->host[A_B1]) < 0 ? -1 : 0;
    int npc = 0;
    c->parts = pie_cuda_dec_plan(items, ni, G, cut_blocks, 2, 0, c->host[A_PC],
                                 &npc, c->host[A_BC], c->host[A_MG],
                                 &c->n_merges);
    c->n_cut_blocks = cut_blocks;
    free(items);
    return rc;
}

/* Runs both plans on the device: *t1, *tc (us), or -1. */
static int calib_run(const calib *c, const pie_cuda_kv *kv, int B, int nh,
                     int n_sm, cudaStream_t s, double *t1, double *tc)
{
    size_t qn = (size_t)B * nh * kv->head_dim;
    size_t parts = (size_t)c->parts + 1;
    char *d = NULL;
    size_t meta = c->off[A_N];
    size_t total = meta + 4 * qn + 2 * qn + 4 * parts * kv->head_dim + 8 * parts;
    if (cudaMalloc((void **)&d, total) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    /* layer 0 of the pages used, zeroed (K and V of every kv head) */
    size_t page = 2 * (size_t)pie_cuda_kv_page_elems(kv);
    size_t layer0 = 2 * (size_t)pie_cuda_kv_voff(kv) * 2;
    int rc = cudaMemset2DAsync(kv->pool, page, 0, layer0,
                               (size_t)B * (CALIB_SLOTS / 16), s) != cudaSuccess;
    for (int i = 0; i < A_N && !rc; i++)
        rc = cudaMemcpyAsync(d + c->off[i], c->host[i], c->size[i],
                             cudaMemcpyHostToDevice, s) != cudaSuccess;
    float *q = (float *)(d + meta), *po = q + qn;
    uint16_t *out = (uint16_t *)(po + parts * kv->head_dim);
    float *pml = (float *)(out + qn + (qn & 1));
    rc = rc || cudaMemsetAsync(q, 0, 4 * qn, s) != cudaSuccess;
    pie_cuda_tokmeta tm = { (int32_t *)(d + c->off[A_SLOT]),
                            (int32_t *)(d + c->off[A_REQ]),
                            (int32_t *)(d + c->off[A_SLOT]),   /* positions */
                            (int32_t *)(d + c->off[A_IND]),
                            (int32_t *)(d + c->off[A_LEN]),
                            (int32_t *)(d + c->off[A_PAGES]), NULL, NULL };
    const pie_cuda_attn_item *p1 = (void *)(d + c->off[A_P1]),
                             *pc = (void *)(d + c->off[A_PC]);
    const int32_t *b1 = (void *)(d + c->off[A_B1]), *bc = (void *)(d + c->off[A_BC]);
    const pie_cuda_merge_item *mg = (void *)(d + c->off[A_MG]);
    *t1 = *tc = 1e30;
    for (int r = 0; r < 2 && !rc; r++) {        /* interleaved, best of 2 */
        double a = time_plan(p1, b1, n_sm, 1, NULL, 0, &tm, kv, nh, q, po,
                             pml, out, s);
        double b = time_plan(pc, bc, c->n_cut_blocks, 0, mg, c->n_merges, &tm,
                             kv, nh, q, po, pml, out, s);
        if (a < 0 || b < 0) rc = -1;
        if (a < *t1) *t1 = a;
        if (b < *tc) *tc = b;
    }
    cudaStreamSynchronize(s);
    cudaFree(d);
    if (rc) cudaGetLastError();
    return rc ? -1 : 0;
}

int64_t pie_cuda_dec_calibrate(const pie_cuda_kv *kv, int64_t n_pages, int nh,
                               int n_sm, int cut_blocks, cudaStream_t s,
                               double *t_whole, double *t_cut)
{
    int nkv = kv->n_kv, B = nkv > 0 ? n_sm / nkv : 0;
    *t_whole = *t_cut = -1;
    if (kv->head_dim < 128 || !pie__cuda_flash_supported(kv->head_dim) ||
        B < 1 || kv->page_size != 16 || cut_blocks < 1 ||
        (int64_t)B * (CALIB_SLOTS / 16) > n_pages || nh % nkv)
        return PIE_CUDA_DEC_WHOLE_MAX;
    calib c;
    int rc = calib_plan(&c, B, nkv, nh / nkv, n_sm, cut_blocks);
    if (!rc) rc = calib_run(&c, kv, B, nh, n_sm, s, t_whole, t_cut);
    calib_free(&c);
    if (rc) return PIE_CUDA_DEC_WHOLE_MAX;
    /* lifted where one an SM is at least 3% faster at 128 KV blocks */
    return *t_whole <= 0.97 * *t_cut ? INT32_MAX : PIE_CUDA_DEC_WHOLE_MAX;
}
