/*
 * dec_plan.c — the balanced work plan of decode attention (host side of
 * pie__cuda_attention_dec, flash_decode.cu).
 *
 * The grouped items of a decode step (one per tile of tokens x kv head,
 * over slots [s0, s1)) are laid end to end as a sequence of KV blocks of
 * PIE_CUDA_DEC_BLOCK slots, T in all (an empty item counts one block, so
 * that it still writes its zero output). Block b of the persistent grid
 * takes blocks [b T / nb, (b + 1) T / nb) of that sequence: every block
 * streams the same amount of KV, give or take one block, whatever the mix
 * of context lengths. An item that straddles a boundary is cut there; its
 * pieces write partial rows, and one merge item combines them. Each block
 * gets at least min_kv KV blocks: at batch 1 a grid of one-block pieces
 * spent more on merging than it gained (NOTES.md, round 5).
 *
 *   items   whole items, in any order (pad = 1; s0, s1, nt, req, kvh used)
 *   pieces  the same items cut at block boundaries, in block order
 *   bstart  block b runs pieces[bstart[b] .. bstart[b + 1])
 *   merges  one per cut item: its nsplit pieces' rows start at part
 *
 * The whole-item plan (pie_cuda_dec_plan_whole) is the other choice: one,
 * two or four blocks per SM, each taking whole items (longest first, onto
 * the least loaded block), so that nothing is cut and no merge kernel
 * runs. Where items balance well that way (about one per SM at B=16 x 8 kv
 * heads on one block an SM, round 8; one or more a block from B=32 on two,
 * round 9; below head dim 128 on four, round 12; on four also one short
 * item a block with blocks left idle, round 26), it saves the merge
 * kernel and the piece boundaries (NOTES.md). At small batch the cluster
 * plan (the end of this file) splits each item over a thread-block
 * cluster instead, whose blocks merge in distributed shared memory.
 */
#include <stdlib.h>

#include "backend/cuda/cuda_kernels.h"

static int64_t blocks_of(const pie_cuda_attn_item *it)
{
    int64_t n = ((int64_t)it->s1 - it->s0 + PIE_CUDA_DEC_BLOCK - 1) /
                PIE_CUDA_DEC_BLOCK;
    return n > 0 ? n : 1;
}

/* Cuts item it, whose KV blocks are [a, a + n) of the sequence, at the
 * grid's boundaries (block *b ends at *end); appends its pieces and any
 * merge item. Returns the next free partial row. */
static int64_t cut_item(const pie_cuda_attn_item *it, int64_t a, int64_t n,
                        int G, int64_t T, int nb, int *b, int64_t *end,
                        int64_t part, pie_cuda_attn_item *pieces,
                        int *n_pieces, int32_t *bstart,
                        pie_cuda_merge_item *merges, int *n_merges)
{
    int first = *n_pieces, R = it->nt * G;
    for (int64_t t = a; t < a + n;) {
        while (t >= *end) {                 /* the next grid block begins */
            ++*b;
            bstart[*b] = *n_pieces;
            *end = (int64_t)(*b + 1) * T / nb;
        }
        int64_t e = a + n < *end ? a + n : *end;
        pie_cuda_attn_item p = *it;
        p.s0 = (int32_t)(it->s0 + (t - a) * PIE_CUDA_DEC_BLOCK);
        p.s1 = e == a + n ? it->s1
                          : (int32_t)(it->s0 + (e - a) * PIE_CUDA_DEC_BLOCK);
        p.part = -1;
        p.pad = 1;
        pieces[(*n_pieces)++] = p;
        t = e;
    }
    int ns = *n_pieces - first;
    if (ns == 1) return part;
    for (int s = 0; s < ns; s++) pieces[first + s].part = (int32_t)(part + s * R);
    merges[(*n_merges)++] = (pie_cuda_merge_item){ it->t0, it->nt, it->kvh, ns,
                                                   (int32_t)part, { 0, 0, 0 } };
    return part + (int64_t)ns * R;
}

int64_t pie_cuda_dec_plan(const pie_cuda_attn_item *items, int n_items, int G,
                          int n_blocks, int min_kv, int64_t part0,
                          pie_cuda_attn_item *pieces, int *n_pieces,
                          int32_t *bstart, pie_cuda_merge_item *merges,
                          int *n_merges)
{
    int64_t T = 0, part = part0, a = 0, end;
    for (int i = 0; i < n_items; i++) T += blocks_of(&items[i]);
    *n_pieces = *n_merges = 0;
    int nb = n_blocks, b = 0;
    if (min_kv < 1) min_kv = 1;
    if (T / min_kv < nb)                /* the rest of the grid idles */
        nb = (int)(T / min_kv > 0 ? T / min_kv : T > 0);
    bstart[0] = 0;
    end = nb > 0 ? T / nb : 0;
    for (int i = 0; i < n_items; i++) {
        int64_t n = blocks_of(&items[i]);
        part = cut_item(&items[i], a, n, G, T, nb, &b, &end, part, pieces,
                        n_pieces, bstart, merges, n_merges);
        a += n;
    }
    for (int k = nb > 0 ? b + 1 : 0; k <= n_blocks; k++) bstart[k] = *n_pieces;
    return part;
}

/* The items by KV blocks (n[i], 1..L), longest first (ties in index
 * order), into order: a counting sort. Linear: this runs on the host every
 * decode step, and the qsort it replaces took 250 us at 2048 items, which
 * the steps paid in full (NOTES.md, round 12). Returns -1 without memory. */
static int longest_first(const int32_t *n, int n_items, int64_t L,
                         int32_t *order)
{
    int32_t *at = calloc((size_t)L + 1, sizeof *at);
    if (!at) return -1;
    for (int i = 0; i < n_items; i++) at[L - n[i] + 1]++;
    for (int64_t v = 1; v <= L; v++) at[v] += at[v - 1];
    for (int i = 0; i < n_items; i++) order[at[L - n[i]]++] = i;
    free(at);
    return 0;
}

/* The blocks of the grid by KV so far, for "the least loaded block" in
 * constant time: bucket v % W holds, first in first out, the blocks whose
 * load is v. Every item (at most L = W - 1 KV blocks) goes onto a block of
 * the least load, so all loads lie within [least, least + L] and no two
 * distinct loads share a bucket. at = least % W. */
typedef struct {
    int32_t *head, *tail, *next;    /* W buckets; next: per block */
    int64_t W, at;
} load_queue;

/* Appends block b to bucket v. */
static void lq_push(load_queue *q, int b, int64_t v)
{
    q->next[b] = -1;
    if (q->tail[v] < 0) q->head[v] = b;
    else q->next[q->tail[v]] = b;
    q->tail[v] = b;
}

/* Takes the least loaded block out (the first to reach that load). */
static int lq_pop_least(load_queue *q)
{
    while (q->head[q->at] < 0)
        if (++q->at == q->W) q->at = 0;
    int b = q->head[q->at];
    q->head[q->at] = q->next[b];
    if (q->head[q->at] < 0) q->tail[q->at] = -1;
    return b;
}

/* Puts back the block just taken, its load grown by s <= W - 1. */
static void lq_put_back(load_queue *q, int b, int64_t s)
{
    int64_t v = q->at + s;
    lq_push(q, b, v >= q->W ? v - q->W : v);
}

/* bin[i] = the block of item i: longest first, each onto the block with
 * the least KV so far (ties: the one that reached that load first, at the
 * start the lowest index). Returns the most KV blocks any block streams,
 * or -1 without memory. */
static int64_t whole_bins(const pie_cuda_attn_item *items, int n_items,
                          int nb, int32_t *bin)
{
    int64_t L = 1, most = 0;
    for (int i = 0; i < n_items; i++) {     /* bin: the KV blocks, first */
        bin[i] = (int32_t)blocks_of(&items[i]);
        if (bin[i] > L) L = bin[i];
    }
    load_queue q = { malloc(4 * (size_t)(L + 1)), malloc(4 * (size_t)(L + 1)),
                     malloc(4 * (size_t)nb), L + 1, 0 };
    int32_t *order = malloc(4 * (size_t)(n_items > 0 ? n_items : 1));
    int64_t *load = calloc((size_t)nb, sizeof *load);
    if (!q.head || !q.tail || !q.next || !order || !load ||
        longest_first(bin, n_items, L, order)) {
        most = -1;
        goto out;
    }
    for (int64_t v = 0; v <= L; v++) q.head[v] = q.tail[v] = -1;
    for (int b = 0; b < nb; b++) lq_push(&q, b, 0);
    for (int k = 0; k < n_items; k++) {
        int i = order[k], b = lq_pop_least(&q), n = bin[i];
        load[b] += n;
        if (load[b] > most) most = load[b];
        bin[i] = b;
        lq_put_back(&q, b, n);
    }
out:
    free(q.head);
    free(q.tail);
    free(q.next);
    free(order);
    free(load);
    return most;
}

int64_t pie_cuda_dec_plan_whole(const pie_cuda_attn_item *items, int n_items,
                                int n_blocks, pie_cuda_attn_item *pieces,
                                int32_t *bstart)
{
    int32_t *bin = malloc(4 * (size_t)(n_items > 0 ? n_items : 1));
    if (!bin || n_blocks < 1) {
        free(bin);
        return -1;
    }
    int64_t most = whole_bins(items, n_items, n_blocks, bin);
    if (most < 0) {
        free(bin);
        return -1;
    }
    /* counting sort by block, items in their given order within one */
    for (int b = 0; b <= n_blocks; b++) bstart[b] = 0;
    for (int i = 0; i < n_items; i++) bstart[bin[i] + 1]++;
    for (int b = 0; b < n_blocks; b++) bstart[b + 1] += bstart[b];
    for (int i = 0; i < n_items; i++) {
        pie_cuda_attn_item p = items[i];
        p.part = -1;
        p.pad = 1;
        pieces[bstart[bin[i]]++] = p;
    }
    for (int b = n_blocks; b > 0; b--) bstart[b] = bstart[b - 1];
    bstart[0] = 0;
    free(bin);
    return most;
}

/* The shape part of the rule for one block an SM (NOTES.md, rounds 8, 11,
 * 12 and 26), checked before a plan is made: one item a block, of
 * PIE_CUDA_DEC_WHOLE_MIN KV blocks or more on average and at most max1, at
 * head dim 128 (32 KB a KV block). Until round 26 it asked for 24 (1536
 * slots); B=16 (128 items) is faster on it from ctx 256 (alone, us: ctx
 * 512 18.9 -> 15.8, ctx 1024 31.2 -> 27.9, against the clusters; 8B steps
 * ctx 256 6.130 -> 6.042 ms, ctx 512 6.394 -> 6.287). At head dim 64 it
 * lost everywhere (one block of 4 warps an SM does not keep up). max1:
 * H100s differ. On most, long items gain most (B=16 ctx 8192: 2.64 ->
 * 2.79 TB/s); on some, one block of 4 warps an SM streams slower and the
 * plan loses there (ctx 8192: 2.63 -> 2.31; ctx 4096 2.43 -> 2.27; ctx
 * 2048 even), so the backend times it when it starts (dec_calib.c). */
static int whole_shape_ok(int64_t T, int n_items, int n_sm, int hd,
                          int64_t max1)
{
    return n_items > 0 && n_items <= n_sm && hd >= 128 &&
           T >= (int64_t)PIE_CUDA_DEC_WHOLE_MIN * n_items &&
           T <= max1 * n_items;
}

/* The shape part of the rule for two blocks an SM: at head dim 128 or
 * more, items of PIE_CUDA_DEC_WHOLE_MIN KV blocks or more on average
 * (whole_on then asks for balance); below, items of
 * PIE_CUDA_DEC_WHOLE_MIN64 or more and few enough KV blocks in all (at
 * head dim 64 two blocks of 4 warps an SM keep too few bytes in flight
 * for long runs: it won up to
 * about 32 KV blocks a block and lost beyond; NOTES.md, round 9). Items of
 * ctx 512 at head dim 128 were faster alone on this plan from B=32 (B=256:
 * 200 against 208 us) but not in decode steps until its launches asked
 * for the largest shared-memory configuration (flash_decode.cu's
 * dec_carveout; round 25: B=32 and 64 gained, B=256 tied). Items of ctx
 * 256 (round 26, 8B steps against the cut plan, two alternating pairs):
 * B=32 6.919 / 6.929 -> 6.758 / 6.760 ms, B=64 7.565 / 7.422 -> 7.307 /
 * 7.282, B=256 a tie; attention alone at ctx 384 and 256 faster from B=32.
 * Items of 128 slots were faster alone (B=64 22.3 -> 16.8 us) but B=256
 * steps tied or lost (10.53 / 10.43 -> 10.53 / 10.52), and of 64 slots
 * slower alone at B=256: they keep the other plans. */
static int whole2_shape_ok(int64_t T, int n_items, int n_sm, int hd)
{
    if (n_items <= 0) return 0;
    if (hd >= 128) return T >= (int64_t)PIE_CUDA_DEC_WHOLE_MIN * n_items;
    return T >= (int64_t)PIE_CUDA_DEC_WHOLE_MIN64 * n_items &&
           T <= (int64_t)32 * 2 * n_sm;
}

/* Makes the plan onto nb blocks: 1 if its largest block is within 6% of
 * an even share, or forced, or no block holds two items and none more
 * than one_each KV blocks (0: not asked); 0 if not, -1 without memory.
 * (With fewer items than blocks each block gets at most one: longest
 * first onto the least loaded, and an idle block is the least loaded.) */
static int whole_on(const pie_cuda_attn_item *items, int n_items, int64_t T,
                    int nb, int force, int64_t one_each,
                    pie_cuda_attn_item *pieces, int32_t *bstart)
{
    int64_t most = pie_cuda_dec_plan_whole(items, n_items, nb, pieces, bstart);
    if (most < 0) return -1;
    return force || most * nb * 100 <= T * 106 ||
           (n_items <= nb && most <= one_each);
}

/* The longest item (KV blocks) that k blocks an SM take one a block with
 * blocks left idle, where the balance test counts those against them; 0:
 * never. Four an SM (round 26, hd 64), with more items than SMs, of at
 * most 16 KV blocks each (one long item would hold up the whole grid),
 * beats the cut plan. B=32 alone (us): ctx 256 13.5 -> 8.9, ctx 512 19.8
 * -> 15.1, ctx 1024 32.9 -> 27.6; 1B steps (ms, two alternating pairs;
 * the bench's "ctx 512" items are 514-562 slots, 9 KV blocks): B=32 ctx
 * 512 1.733 / 1.717 -> 1.646 / 1.663, B=48 1.861 / 1.828 -> 1.811 /
 * 1.827, B=24 1.662 / 1.671 -> 1.664 / 1.643; ctx 256 1.600 -> 1.547.
 * With fewer items than SMs (B=16) the cluster plan is faster from ctx
 * 512 (10.9 against 11.7 us). */
static int64_t one_each_max(int k, int n_items, int n_sm)
{
    return k == 4 && n_items > n_sm ? 16 : 0;
}

/* The shape rule for k blocks an SM. Four (below head dim 128, where the
 * kernel is built for four resident blocks) takes up to 40 KV blocks a
 * grid block on average, whatever the item lengths (NOTES.md, round 12;
 * hd 64, decode steps of the 1B shape against the cut plan): about one
 * item a block at B=64 (ctx 512: 1.912 / 1.893 against 2.001 / 1.951 ms;
 * ctx 2048: 3.004 / 3.007 against 3.089 / 3.093) and four at B=256 ctx 512
 * (3.506 / 3.487 against 3.554 / 3.539). At 124 a block (B=256 ctx 2048)
 * attention alone was faster too, but the steps were slower (8.045 / 8.182
 * against 7.984 / 7.946). */
static int shape_ok(int k, int64_t T, int n_items, int n_sm, int hd,
                    int64_t max1)
{
    switch (k) {
    case 1: return whole_shape_ok(T, n_items, n_sm, hd, max1);
    case 2: return whole2_shape_ok(T, n_items, n_sm, hd);
    case 4: return n_items > 0 && hd < 128 && T <= (int64_t)40 * 4 * n_sm;
    default: return 0;
    }
}

int pie_cuda_dec_whole_switch(void)
{
    const char *e = getenv("PIE_CUDA_DEC_WHOLE");
    if (!e) return 0;
    int k = atoi(e);
    return *e == '0' ? -1 : k >= 1 && k <= 8 ? k : 0;
}

int pie_cuda_dec_try_whole(const pie_cuda_attn_item *items, int n_items,
                           int n_sm, int per_sm, int hd, int force,
                           int64_t max1, pie_cuda_attn_item *pieces,
                           int32_t *bstart)
{
    int64_t T = 0;
    int rc;
    for (int i = 0; i < n_items; i++) T += blocks_of(&items[i]);
    if (force >= 1) {
        rc = whole_on(items, n_items, T, force * n_sm, 1, 0, pieces, bstart);
        return rc > 0 ? force : rc;
    }
    static const int order[] = { 1, 4, 2 };   /* blocks an SM, tried in turn */
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        int k = order[i];
        if (k > per_sm || !shape_ok(k, T, n_items, n_sm, hd, max1)) continue;
        rc = whole_on(items, n_items, T, k * n_sm, 0,
                      one_each_max(k, n_items, n_sm), pieces, bstart);
        if (rc) return rc > 0 ? k : rc;
    }
    return 0;
}

/* ---------------------------------------------------- the cluster plan
 * At small batch the cut plan spreads a few items over the whole grid and
 * a merge kernel combines the pieces, a launch and a round trip through
 * global memory on the critical path of every layer (about 5 us a layer of
 * a 1B batch-1 step, NOTES.md round 13). The cluster plan instead splits
 * each item over the C blocks of one thread-block cluster (rank c takes
 * KV blocks [n c / C, n (c + 1) / C) of its n), and the cluster combines
 * the C states in distributed shared memory (flash_decode.cu). */
void pie_cuda_dec_plan_cluster(const pie_cuda_attn_item *items, int n_items,
                               int C, pie_cuda_attn_item *pieces)
{
    for (int i = 0; i < n_items; i++) {
        int64_t n = blocks_of(&items[i]);
        for (int c = 0; c < C; c++) {
            pie_cuda_attn_item p = items[i];
            int64_t a = n * c / C, e = n * (c + 1) / C;
            p.s0 = (int32_t)(items[i].s0 + a * PIE_CUDA_DEC_BLOCK);
            p.s1 = e == n ? items[i].s1     /* a == e: an empty rank */
                          : (int32_t)(items[i].s0 + e * PIE_CUDA_DEC_BLOCK);
            p.part = -1;
            p.pad = 1;
            pieces[(size_t)i * C + c] = p;
        }
    }
}

int pie_cuda_dec_cluster_switch(void)
{
    const char *e = getenv("PIE_CUDA_DEC_CLUSTER");
    if (!e) return 0;
    int C = atoi(e);
    return *e == '0' ? -1 : C >= 2 && C <= 16 ? C : 0;
}

/* The longest item's KV blocks. */
static int64_t most_blocks(const pie_cuda_attn_item *items, int n_items)
{
    int64_t most = 0;
    for (int i = 0; i < n_items; i++)
        if (blocks_of(&items[i]) > most) most = blocks_of(&items[i]);
    return most;
}

int pie_cuda_dec_cluster_pad_switch(void)
{
    const char *e = getenv("PIE_CUDA_DEC_CLUSTER_PAD");
    if (!e || !*e) return -1;
    int k = atoi(e);
    return k >= 0 && k <= 3 ? k : -1;
}

int pie_cuda_dec_cluster_pad_fit(int C, int pad, const int *max_pad)
{
    for (int k = pad < 0 ? 0 : pad; k > 0 && k <= 3; k++)
        if (C <= max_pad[k]) return k;
    return 0;
}

int pie_cuda_dec_cluster_size(const pie_cuda_attn_item *items, int n_items,
                              int n_sm, int grid, int max_c, int force,
                              int *per_sm)
{
    *per_sm = 0;
    if (force < 0 || n_items <= 0) return 0;
    if (force > 0)
        return force <= max_c && (int64_t)n_items * force <= grid ? force : 0;
    int64_t most = most_blocks(items, n_items);
    for (int C = 2; C <= max_c && C <= PIE_CUDA_DEC_CLUSTER_MAX; C *= 2)
        if ((most + C - 1) / C <= PIE_CUDA_DEC_CLUSTER_PER) {
            int64_t nb = (int64_t)n_items * C;
            if (nb > n_sm || nb > grid) return 0;
            *per_sm = 2 * nb <= n_sm;
            return C;
        }
    return 0;
}

int pie_cuda_dec_cluster_mid(const pie_cuda_attn_item *items, int n_items,
                             int n_sm, int grid, int hd, int max_c, int force,
                             int *per_sm)
{
    *per_sm = 0;
    if (force || n_items <= 0) return 0;
    int64_t most = most_blocks(items, n_items);
    for (int C = PIE_CUDA_DEC_CLUSTER_MID; C >= 2; C /= 2) {
        int64_t nb = (int64_t)n_items * C;
        if (C <= max_c && nb <= 2 * (int64_t)n_sm && nb <= grid &&
            nb >= n_sm && (most + C - 1) / C <= PIE_CUDA_DEC_CLUSTER_LONG &&
            (C == 2 || hd < 128)) {
            *per_sm = C == 2 ? 2 : 0;
            return C;
        }
    }
    return 0;
}
