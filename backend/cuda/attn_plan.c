/*
 * attn_plan.c — the CUDA backend's attention work, planned on the host
 * each forward (cuda_plan_attention), into the item lists of cuda_backend
 * (cuda_internal.h) that the attention kernels read:
 *   fitems   prompts of FLASH_MIN tokens or more: tiles of
 *            PIE_CUDA_FLASH_ROWS tokens x one query head for the
 *            tensor-core prefill kernel (flash_prefill.cu), sorted longest
 *            first by the caller (cuda_cmp_longest)
 *   gitems   decode steps and short chunks: tiles of tokens x the G query
 *            heads of one kv head, whole; plan_dec lays them out for the
 *            tensor-core decode kernel (flash_decode.cu), which reads
 *            pieces and bstart: a cluster plan, a whole-item plan or
 *            pieces cut at KV-block boundaries (dec_plan.c), with dmerges
 *            for the cut items
 *   items    the CUDA-core kernel's tiles (head dims the tensor-core
 *            kernels lack, or PIE_CUDA_NO_FLASH(_DECODE)), split over
 *            slots for occupancy, merged by merges
 * The lists grow on the host as batches need (grow). plan_dec stores
 * pieces and dmerges at fixed sizes and max_slots is rounded to 64 slots,
 * so a steady decode step's kernel arguments, and its CUDA graph, stay the
 * same as contexts grow.
 */
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

int64_t cuda_kv_len(const pie_forward_batch *b, int r, int ps)
{
    int np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
    return (int64_t)(np - 1) * ps + b->kv_last_page_len[r];
}

/* Grows a host array to hold n elements of size sz. */
static int grow(void **p, int64_t *cap, int64_t n, size_t sz)
{
    if (n <= *cap) return 0;
    int64_t nc = *cap ? *cap : 256;
    while (nc < n) nc *= 2;
    void *q = realloc(*p, (size_t)nc * sz);
    if (!q) return pie_err_set(PIE_ENOMEM, "cuda: out of host memory");
    *p = q;
    *cap = nc;
    return 0;
}

/* Prompts of at least FLASH_MIN new tokens go to the tensor-core kernel. */
#define FLASH_MIN 16

int cuda_use_flash(const cuda_backend *c, int n_new)
{
    return n_new >= FLASH_MIN && pie__cuda_flash_supported(c->cfg.head_dim) &&
           !getenv("PIE_CUDA_NO_FLASH");
}

/* Decode and short chunks: grouped tensor-core items (tokens x the G heads
 * of a kv head) unless PIE_CUDA_NO_FLASH(_DECODE) is set, else the CUDA-core
 * kernel. Tokens per tile of either. */
static int use_flash_dec(const cuda_backend *c)
{
    return pie__cuda_flash_supported(c->cfg.head_dim) &&
           !getenv("PIE_CUDA_NO_FLASH") && !getenv("PIE_CUDA_NO_FLASH_DECODE");
}

int cuda_tile_tokens(const cuda_backend *c)
{
    int G = c->cfg.n_heads / c->cfg.n_kv_heads;
    /* G <= PIE_CUDA_ATTN_RMAX (check_shape): at least one token */
    return (use_flash_dec(c) ? PIE_CUDA_FLASH_DEC_ROWS : PIE_CUDA_ATTN_RMAX) / G;
}

/* Longest prefill tiles first (then token, head): with causal prompts the
 * last tiles of a prompt read the most slots, and launched last they ran
 * alone at the end of the grid. */
int cuda_cmp_longest(const void *a, const void *b)
{
    const pie_cuda_attn_item *x = a, *y = b;
    int lx = x->s1 - x->s0, ly = y->s1 - y->s0;
    if (lx != ly) return ly - lx;
    if (x->t0 != y->t0) return x->t0 - y->t0;
    return x->kvh - y->kvh;
}

/* Tiles of PIE_CUDA_FLASH_ROWS tokens x one query head of request r into
 * c->fitems; a tile reads the slots its last token (or widest mask) sees. */
static int plan_flash(cuda_backend *c, const pie_forward_batch *b, int r,
                      const uint32_t *range_of)
{
    int q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
    int64_t kv_len = cuda_kv_len(b, r, c->base.page_size);
    int nh = c->cfg.n_heads, T = PIE_CUDA_FLASH_ROWS;
    int64_t tiles = (n_new + T - 1) / T;
    int rc = grow((void **)&c->fitems, &c->cap_fitems,
                  c->n_fitems + tiles * nh, sizeof *c->fitems);
    if (rc) return rc;
    for (int i = 0; i < n_new; i += T) {
        int nt = n_new - i < T ? n_new - i : T, t0 = q0 + i;
        int64_t range = kv_len - n_new + i + nt;
        if (b->mask_indptr) {
            range = 0;
            for (int t = t0; t < t0 + nt; t++)
                if (range_of[t] > range) range = range_of[t];
        }
        for (int h = 0; h < nh; h++) {
            pie_cuda_attn_item it = { r, t0, nt, h, 0, (int)range, -1, 0 };
            c->fitems[c->n_fitems++] = it;
        }
    }
    return 0;
}

/* KV blocks (64 slots) a decode attention block streams at least: 1 made
 * batch-1 steps slower (more partials to merge), 2 and 4 tie elsewhere */
#define DEC_MIN_KV 2

/* The whole-item plan (1, 2 or 4 blocks per SM, nothing cut) where it
 * pays (dec_plan.c); PIE_CUDA_DEC_WHOLE=0 never takes it, =k always, on k
 * blocks per SM if that many are resident (tests, experiments). Returns
 * the blocks per SM of the plan made, or 0. */
static int plan_dec_whole(cuda_backend *c)
{
    int force = pie_cuda_dec_whole_switch();
    if (force < 0 || force > c->dec_whole_max) return 0;   /* (fits bstart) */
    int k = pie_cuda_dec_try_whole(c->gitems, (int)c->n_gitems, c->n_sm,
                                   c->dec_whole_max, c->cfg.head_dim, force,
                                   c->dec_max1,
                                   c->pieces, c->bstart);
    if (k <= 0) return 0;   /* (out of memory: the cut plan, which needs none) */
    c->n_pieces = (int)c->n_gitems;
    c->n_dmerges = 0;
    return k;
}

/* The cluster plan (dec_plan.c) where the device runs clusters of the
 * size it needs (dec_cluster_max): at small batch before the other plans
 * (mid = 0; at most one block an SM where the grid is at most half the
 * SMs), or (mid = 1) at batches of about 5-16 where no whole-item plan was
 * taken (clusters of 2 at most two blocks an SM): dec_cluster_pad, which
 * PIE_CUDA_DEC_CLUSTER_PAD=k overrides.
 * PIE_CUDA_DEC_CLUSTER=0 never takes it, =C wherever it fits; a forced
 * whole-item plan (PIE_CUDA_DEC_WHOLE=k) comes first. Returns the cluster
 * size, or 0 (and dec_cluster_pad 0). */
static int plan_dec_cluster(cuda_backend *c, int mid)
{
    c->dec_cluster_pad = 0;
    if (pie_cuda_dec_whole_switch() > 0) return 0;
    int force = pie_cuda_dec_cluster_switch(), n = (int)c->n_gitems;
    int C = mid ? pie_cuda_dec_cluster_mid(c->gitems, n, c->n_sm,
                                           c->dec_blocks, c->cfg.head_dim,
                                           c->dec_cluster_max, force,
                                           &c->dec_cluster_pad)
                : pie_cuda_dec_cluster_size(c->gitems, n, c->n_sm,
                                            c->dec_blocks, c->dec_cluster_max,
                                            force, &c->dec_cluster_pad);
    if (C <= 0) return 0;
    int pad = pie_cuda_dec_cluster_pad_switch();
    if (pad >= 0) c->dec_cluster_pad = pad;
    c->dec_cluster_pad = pie_cuda_dec_cluster_pad_fit(C, c->dec_cluster_pad,
                                                      c->dec_cluster_max_pad);
    pie_cuda_dec_plan_cluster(c->gitems, n, C, c->pieces);
    c->n_pieces = n * C;
    c->n_dmerges = 0;
    return C;
}

/* Plans decode attention (dec_plan.c): the cluster plan at small batch,
 * else the whole-item plan where it pays, else the cluster plan at mid
 * batch, else the grouped items cut for the persistent grid. The piece
 * and merge lists are stored at their capacities, so a decode step's kernel
 * arguments, and its CUDA graph, do not change as contexts grow. Returns
 * the partial rows used, or a negative code. */
static int64_t plan_dec(cuda_backend *c, int64_t parts)
{
    int rc = grow((void **)&c->pieces, &c->cap_pieces,
                  c->n_gitems + c->dec_blocks, sizeof *c->pieces);
    if (rc) return rc;
    c->dec_whole = 0;
    if ((c->dec_cluster = plan_dec_cluster(c, 0))) return parts;
    if ((c->dec_whole = plan_dec_whole(c))) return parts;
    if ((c->dec_cluster = plan_dec_cluster(c, 1))) return parts;
    parts = pie_cuda_dec_plan(c->gitems, (int)c->n_gitems,
                              c->cfg.n_heads / c->cfg.n_kv_heads, c->dec_blocks,
                              DEC_MIN_KV, parts, c->pieces, &c->n_pieces,
                              c->bstart, c->dmerges, &c->n_dmerges);
    /* a fixed-size merge list for the merge kernel (empty items skip) */
    memset(c->dmerges + c->n_dmerges, 0,
           sizeof *c->dmerges * (size_t)(c->dec_blocks - c->n_dmerges));
    return parts;
}

/* The decode kernel's items for one tile (tokens t0 .. t0 + nt of request
 * r): one per kv head, whole; plan_dec cuts them later. */
static int plan_grouped(cuda_backend *c, int r, int t0, int nt, int64_t range)
{
    int nkv = c->cfg.n_kv_heads;
    int rc = grow((void **)&c->gitems, &c->cap_gitems, c->n_gitems + nkv,
                  sizeof *c->gitems);
    if (rc) return rc;
    for (int h = 0; h < nkv; h++)
        c->gitems[c->n_gitems++] =
            (pie_cuda_attn_item){ r, t0, nt, h, 0, (int)range, -1, 1 };
    return 0;
}

/* The CUDA-core kernel's items for one tile: per kv head, ns splits of
 * [0, range) (want per tile for occupancy, at least what its score buffer
 * needs), merged when ns > 1; *parts advances by the partial rows. */
static int plan_split(cuda_backend *c, int r, int t0, int nt, int64_t range,
                      int want, int64_t *parts)
{
    int nkv = c->cfg.n_kv_heads, G = c->cfg.n_heads / nkv;
    int64_t need = (range + PIE_CUDA_ATTN_CHUNK - 1) / PIE_CUDA_ATTN_CHUNK;
    int64_t opt = (range + 127) / 128;
    int64_t ns = want < opt ? want : opt;
    if (ns < need) ns = need;
    if (ns < 1) ns = 1;
    int rc = grow((void **)&c->items, &c->cap_items, c->n_items + ns * nkv,
                  sizeof *c->items);
    if (!rc)
        rc = grow((void **)&c->merges, &c->cap_merges, c->n_merges + nkv,
                  sizeof *c->merges);
    if (rc) return rc;
    for (int h = 0; h < nkv; h++) {
        if (ns > 1)
            c->merges[c->n_merges++] = (pie_cuda_merge_item){
                t0, nt, h, (int)ns, (int)*parts, {0, 0, 0} };
        for (int64_t s = 0; s < ns; s++) {
            int sl = (int)(range * (s + 1) / ns - range * s / ns);
            if (sl > c->max_slots) c->max_slots = sl;
            c->items[c->n_items++] = (pie_cuda_attn_item){
                r, t0, nt, h, (int)(range * s / ns), (int)(range * (s + 1) / ns),
                ns > 1 ? (int)(*parts + s * nt * G) : -1, 0 };
        }
        if (ns > 1) *parts += ns * nt * G;
    }
    return 0;
}

/* Work items of the attention kernels: prefill tiles (plan_flash), decode
 * tiles for the tensor-core decode kernel (plan_grouped, then plan_dec) or
 * the CUDA-core kernel (plan_split). want = splits wished per tile of the
 * latter; range_of[t] = slots token t may see under its mask. Returns the
 * number of partial rows or a negative code. */
int64_t cuda_plan_attention(cuda_backend *c, const pie_forward_batch *b,
                              int want, const uint32_t *range_of)
{
    int T = cuda_tile_tokens(c), ps = c->base.page_size, fd = use_flash_dec(c);
    int64_t parts = 0;
    c->n_items = c->n_merges = c->n_fitems = c->n_gitems = 0;
    c->max_slots = 0;
    for (int r = 0; r < b->n_reqs; r++) {
        int q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
        int64_t kv_len = cuda_kv_len(b, r, ps);
        if (cuda_use_flash(c, n_new)) {
            int rc = plan_flash(c, b, r, range_of);
            if (rc) return rc;
            continue;
        }
        for (int i = 0; i < n_new; i += T) {
            int nt = n_new - i < T ? n_new - i : T, t0 = q0 + i;
            int64_t range = 0;
            if (!b->mask_indptr) {
                range = kv_len - n_new + i + nt;
            } else {
                for (int t = t0; t < t0 + nt; t++)
                    if (range_of[t] > range) range = range_of[t];
            }
            int rc = fd ? plan_grouped(c, r, t0, nt, range)
                        : plan_split(c, r, t0, nt, range, want, &parts);
            if (rc) return rc;
        }
    }
    /* Sizes the CUDA-core kernel's score buffer; rounded so that decode
     * steps keep the same launch (and graph) for 64 slots of growth. */
    c->max_slots = (c->max_slots + 63) & ~63;
    return c->n_gitems ? plan_dec(c, parts) : parts;
}

