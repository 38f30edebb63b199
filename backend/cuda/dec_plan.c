/*
 * dec_plan.c — the balanced work plan of decode attention (host side of
 * pie__cuda_attention_dec, attention.cu).
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
 */
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
