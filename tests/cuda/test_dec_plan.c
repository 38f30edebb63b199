/*
 * test_dec_plan.c — the decode attention planner (backend/cuda/dec_plan.c)
 * on the host, no GPU needed: random sets of grouped items (empty ones,
 * long ones, starts on and off the 64-slot grid) cut for grids of 1..400
 * blocks. Checked against a direct count, for every plan:
 *   - capacities: pieces <= items + blocks, merges <= blocks;
 *   - bstart runs from 0 to the piece count without going down;
 *   - the pieces of each item cover its slots exactly once, in order, and
 *     every cut lies on the item's 64-slot grid;
 *   - each working block streams floor or ceil of (KV blocks / working
 *     blocks), at least min_kv unless there are fewer KV blocks in all;
 *   - a whole item writes its output (part -1); a cut item's pieces write
 *     consecutive partial rows (nt * G each) and one merge item names them.
 * The whole-item plan (pie_cuda_dec_plan_whole) on the same items:
 *   - every item exactly once, unchanged but for part -1 and pad 1;
 *   - the returned most is the largest block's KV, and it lies within the
 *     greedy bound: max(longest, T / blocks) <= most <= T / blocks +
 *     longest;
 *   - pie_cuda_dec_try_whole on shapes with known answers, and forced.
 * The cluster plan (pie_cuda_dec_plan_cluster) for clusters of 2..16:
 *   - each item's C pieces cover its slots exactly once, in rank order,
 *     cut on its grid, unchanged but for s0, s1, part -1 and pad 1;
 *   - every rank streams floor or ceil of the item's KV blocks / C;
 *   - pie_cuda_dec_cluster_size and pie_cuda_dec_cluster_mid on shapes
 *     with known answers, and forced;
 *   - pie_cuda_dec_cluster_pad_fit: a padding whose clusters do not run
 *     gives way to a looser one, or none.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_kernels.h"
#include "tests/test_util.h"

#define MAX_ITEMS 64
#define MAX_BLOCKS 400
#define BLK PIE_CUDA_DEC_BLOCK

static int64_t kv_blocks(const pie_cuda_attn_item *it)
{
    int64_t n = ((int64_t)it->s1 - it->s0 + BLK - 1) / BLK;
    return n > 0 ? n : 1;
}

/* Random items: nt tokens x G heads, lengths 0..3000, s0 on the grid or
 * not. */
static int make_items(pie_cuda_attn_item *it, int G)
{
    int n = rand() % MAX_ITEMS;
    for (int i = 0; i < n; i++) {
        int nt = 1 + rand() % (PIE_CUDA_FLASH_DEC_ROWS / G);
        int s0 = rand() % 3 == 0 ? (rand() % 4) * BLK : 0;
        int len = rand() % 5 == 0 ? 0 : rand() % 3000;
        it[i] = (pie_cuda_attn_item){ rand() % 8, i * 4, nt, rand() % 8,
                                      s0, s0 + len, -1, 1 };
    }
    return n;
}

/* Each item's pieces cover [s0, s1) once, cut on its grid; merges and
 * partial rows agree. */
static void check_cover(const pie_cuda_attn_item *it, int n, int G,
                        const pie_cuda_attn_item *pc, int npc,
                        const pie_cuda_merge_item *mg, int nm, int64_t part0,
                        int64_t parts)
{
    int p = 0, m = 0;
    int64_t next_part = part0;
    for (int i = 0; i < n; i++) {
        int first = p, at = it[i].s0, R = it[i].nt * G;
        do {
            CHECK(p < npc, "item %d: pieces end early", i);
            CHECK(pc[p].t0 == it[i].t0 && pc[p].kvh == it[i].kvh &&
                  pc[p].req == it[i].req && pc[p].nt == it[i].nt,
                  "piece %d is not item %d's", p, i);
            CHECK(pc[p].s0 == at, "item %d: piece %d starts at %d, not %d",
                  i, p, pc[p].s0, at);
            CHECK((pc[p].s0 - it[i].s0) % BLK == 0, "cut off the grid");
            at = pc[p].s1;
            p++;
        } while (at < it[i].s1);
        CHECK(at == it[i].s1, "item %d: pieces end at %d, not %d", i, at,
              it[i].s1);
        int ns = p - first;
        if (ns == 1) {
            CHECK(pc[first].part == -1, "whole item %d writes partials", i);
            continue;
        }
        CHECK(m < nm, "item %d is cut %d ways without a merge", i, ns);
        CHECK(mg[m].t0 == it[i].t0 && mg[m].nt == it[i].nt &&
              mg[m].kvh == it[i].kvh && mg[m].nsplit == ns &&
              mg[m].part == next_part, "merge %d of item %d", m, i);
        for (int s = 0; s < ns; s++)
            CHECK(pc[first + s].part == next_part + s * R,
                  "item %d piece %d: part %d", i, s, pc[first + s].part);
        next_part += (int64_t)ns * R;
        m++;
    }
    CHECK(p == npc && m == nm, "%d of %d pieces, %d of %d merges used", p,
          npc, m, nm);
    CHECK(parts == next_part, "returned %lld partial rows, used %lld",
          (long long)parts, (long long)next_part);
}

/* Block shares: equal to within one KV block, at least min_kv. */
static void check_blocks(const pie_cuda_attn_item *pc, const int32_t *bst,
                         int nb, int npc, int64_t T, int min_kv)
{
    CHECK(bst[0] == 0 && bst[nb] == npc, "bstart %d .. %d of %d pieces",
          bst[0], bst[nb], npc);
    int64_t lo = INT64_MAX, hi = 0;
    int working = 0;
    for (int b = 0; b < nb; b++) {
        CHECK(bst[b] <= bst[b + 1], "bstart goes down at %d", b);
        int64_t kv = 0;
        for (int p = bst[b]; p < bst[b + 1]; p++) kv += kv_blocks(&pc[p]);
        if (!kv) continue;
        working++;
        if (kv < lo) lo = kv;
        if (kv > hi) hi = kv;
    }
    if (!T) return;
    CHECK(hi - lo <= 1, "shares %lld .. %lld", (long long)lo, (long long)hi);
    CHECK(lo >= min_kv || working == 1, "a share of %lld < %d", (long long)lo,
          min_kv);
    CHECK(lo * working <= T && hi * working >= T, "shares do not add up");
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* The whole-item plan of it[0..n) on nb blocks. */
static void check_whole(const pie_cuda_attn_item *it, int n, int nb,
                        pie_cuda_attn_item *pc, int32_t *bst)
{
    static int seen[MAX_ITEMS];
    static int64_t got[MAX_BLOCKS];
    int64_t most = pie_cuda_dec_plan_whole(it, n, nb, pc, bst), T = 0;
    int64_t longest = 0, hi = 0;
    CHECK(most >= 0, "whole plan failed");
    CHECK(bst[0] == 0 && bst[nb] == n, "whole bstart %d .. %d of %d", bst[0],
          bst[nb], n);
    memset(seen, 0, sizeof seen);
    for (int b = 0; b < nb; b++) {
        CHECK(bst[b] <= bst[b + 1], "whole bstart goes down at %d", b);
        int64_t kv = 0;
        for (int p = bst[b]; p < bst[b + 1] && p < n; p++) {
            int i = pc[p].t0 / 4;               /* make_items: t0 = 4 i */
            CHECK(i >= 0 && i < n && !seen[i], "piece %d: item %d twice", p, i);
            if (i < 0 || i >= n) continue;
            seen[i] = 1;
            CHECK(pc[p].s0 == it[i].s0 && pc[p].s1 == it[i].s1 &&
                  pc[p].req == it[i].req && pc[p].kvh == it[i].kvh &&
                  pc[p].nt == it[i].nt && pc[p].part == -1 && pc[p].pad == 1,
                  "piece %d is not item %d whole", p, i);
            kv += kv_blocks(&pc[p]);
        }
        if (kv > hi) hi = kv;
        got[b] = kv;
    }
    for (int i = 0; i < n; i++) {
        T += kv_blocks(&it[i]);
        if (kv_blocks(&it[i]) > longest) longest = kv_blocks(&it[i]);
    }
    CHECK(most == hi, "whole plan says %lld, its largest block has %lld",
          (long long)most, (long long)hi);
    /* longest first onto the least loaded (lowest index on ties), by a
     * direct scan: the same largest load, and the same loads (blocks of
     * equal load are interchangeable, so any tie rule gives these) */
    static int64_t load[MAX_BLOCKS];
    static int done[MAX_ITEMS];
    int64_t ref = 0;
    memset(load, 0, sizeof load);
    memset(done, 0, sizeof done);
    for (int k = 0; k < n; k++) {
        int best = -1;
        for (int i = 0; i < n; i++)     /* longest left, lowest index */
            if (!done[i] && (best < 0 || kv_blocks(&it[i]) > kv_blocks(&it[best])))
                best = i;
        done[best] = 1;
        int b = 0;
        for (int j = 1; j < nb; j++)
            if (load[j] < load[b]) b = j;
        load[b] += kv_blocks(&it[best]);
        if (load[b] > ref) ref = load[b];
    }
    CHECK(most == ref, "whole plan: most %lld, longest-first reference %lld",
          (long long)most, (long long)ref);
    qsort(got, (size_t)nb, sizeof *got, cmp_i64);
    qsort(load, (size_t)nb, sizeof *load, cmp_i64);
    CHECK(!memcmp(got, load, sizeof *got * (size_t)nb),
          "whole plan: its blocks' loads are not the longest-first ones");
    CHECK(most >= longest && most * nb >= T && most <= T / nb + longest,
          "whole plan: most %lld, T %lld on %d, longest %lld", (long long)most,
          (long long)T, nb, (long long)longest);
}

/* Items of len slots, n of them: requests of 8 (one a kv head). */
static void fill_items(pie_cuda_attn_item *it, int n, int len)
{
    for (int i = 0; i < n; i++)
        it[i] = (pie_cuda_attn_item){ i / 8, i / 8, 1, i % 8, 0, len, -1, 1 };
}

/* Four an SM with blocks left idle (one item a block) only where no item
 * is long: one long request among short ones would hold up the grid, and
 * the cut plan spreads it. hd 64, B=32: 8 items of the first request at
 * `first` slots, 248 of 512. */
static void check_one_each(void)
{
    static pie_cuda_attn_item it[256], pc[256];
    static int32_t bst[4 * 132 + 1];
    struct { int first, pays; } c[] = {
        { 512, 4 }, { 1024, 4 }, { 1088, 0 }, { 16384, 0 },
    };
    for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
        fill_items(it, 256, 512);
        for (int i = 0; i < 8; i++) it[i].s1 = c[k].first;
        int got = pie_cuda_dec_try_whole(it, 256, 132, 4, 64, 0,
                                         PIE_CUDA_DEC_WHOLE_MAX, pc, bst);
        CHECK(got == c[k].pays, "B=32, first request %d slots: pays %d",
              c[k].first, got);
    }
}

/* pie_cuda_dec_try_whole on the bench's shapes (132 SMs, 8 kv heads;
 * resident blocks as built: 3 an SM at head dim 128, 4 below) by its rule,
 * with the one-per-SM bound fixed or lifted (as calibrated), and forced
 * onto 1 to 4 blocks per SM. */
static void check_pays(void)
{
    static pie_cuda_attn_item it[4096], pc[4096];
    static int32_t bst[4 * 132 + 1];
    struct { int n, len, hd, pays, lifted; } c[] = {
        { 128, 2048, 128, 1 },  /* B=16, ctx 2048: 32 KV blocks, 128 of 132 */
        { 128, 1536, 128, 1 },
        { 128, 1024, 128, 1 },  /* B=16 ctx 1024 (round 26) */
        { 128, 256, 128, 1 },   /* B=16 ctx 256: 4 KV blocks an item */
        { 128, 192, 128, 0 },   /* 3 KV blocks: shorter than measured */
        { 64, 512, 128, 0 },    /* B=8: 64 items, unbalanced on 132 */
        { 128, 4096, 128, 1 },
        { 128, 8192, 128, 0 },  /* long ones (lost on some H100s) */
        { 128, 8192, 128, 1, 1 },       /* ... where calibrated to win */
        { 128, 16384, 128, 1, 1 },
        { 128, 2048, 64, 0 },   /* head dim 64: 128 items on 528 blocks */
        { 512, 2048, 128, 2 },  /* B=64: about two items a block, two an SM */
        { 256, 2048, 128, 2 },  /* B=32: one item a block, 8 blocks idle */
        { 256, 8192, 128, 2 },
        { 384, 2048, 128, 0 },  /* B=48: 1.45 items a block, unbalanced */
        { 2048, 512, 128, 2 },  /* B=256 ctx 512: short items, 7.8 a block */
        { 512, 512, 128, 2 },   /* B=64 ctx 512 */
        { 2048, 256, 128, 2 },  /* B=256 ctx 256: 4 KV blocks an item */
        { 512, 256, 128, 2 },   /* B=64 ctx 256 */
        { 256, 260, 128, 2 },   /* B=32 ctx 260: one item a block */
        { 2048, 128, 128, 0 },  /* ctx 128: lost in 8B B=256 steps */
        { 512, 192, 128, 0 },   /* 3 KV blocks an item */
        { 128, 512, 128, 1 },   /* B=16 ctx 512: one an SM */
        { 256, 2048, 64, 2 },   /* head dim 64: 31 KV blocks a grid block */
        { 512, 2048, 64, 4 },   /* one item a block on four an SM */
        { 512, 512, 64, 4 },
        { 2048, 520, 64, 4 },   /* B=256: 3.9 items a block */
        { 2048, 2048, 64, 0 },  /* B=256 ctx 2048: 124 KV blocks a block */
        { 384, 512, 64, 4 },    /* B=48: 384 items, one a block on 528 */
        { 256, 256, 64, 4 },    /* B=32 ctx 256: 256 items on 528 blocks */
        { 256, 512, 64, 4 },    /* ... ctx 512 */
        { 256, 1024, 64, 4 },   /* ... ctx 1024: 16 KV blocks an item */
        { 256, 1088, 64, 0 },   /* ... 17 KV blocks: not measured */
        { 128, 256, 64, 0 },    /* B=16: fewer items than SMs (clusters) */
        { 384, 2048, 64, 0 },   /* B=48 ctx 2048: long for one a block */
        { 100, 2048, 128, 0 },  /* 100 of 132 SMs busy; unbalanced on 264 */
        { 8, 8192, 128, 0 },    /* batch 1 */
        { 8, 512, 64, 0 },
    };
    for (size_t k = 0; k < sizeof c / sizeof c[0]; k++) {
        int per_sm = c[k].hd >= 128 ? 3 : 4;
        fill_items(it, c[k].n, c[k].len);
        int64_t max1 = c[k].lifted ? INT32_MAX : PIE_CUDA_DEC_WHOLE_MAX;
        int got = pie_cuda_dec_try_whole(it, c[k].n, 132, per_sm, c[k].hd, 0,
                                         max1, pc, bst);
        CHECK(got == c[k].pays, "%d items of %d slots, hd %d: pays %d",
              c[k].n, c[k].len, c[k].hd, got);
        CHECK(!got || (bst[0] == 0 && bst[got * 132] == c[k].n),
              "%d items: plan made, bstart %d .. %d", c[k].n, bst[0],
              bst[got * 132]);
        if (c[k].pays >= 2)     /* not where that many do not fit an SM */
            CHECK(pie_cuda_dec_try_whole(it, c[k].n, 132, c[k].pays - 1,
                                         c[k].hd, 0, max1, pc, bst) != c[k].pays,
                  "%d items: %d per SM taken with fewer resident", c[k].n,
                  c[k].pays);
        for (int f = 1; f <= 4; f++) {
            got = pie_cuda_dec_try_whole(it, c[k].n, 132, per_sm, c[k].hd, f,
                                         max1, pc, bst);
            CHECK(got == f && bst[0] == 0 && bst[f * 132] == c[k].n,
                  "%d items forced onto %d an SM: %d, bstart %d .. %d",
                  c[k].n, f, got, bst[0], bst[f * 132]);
        }
    }
}

/* The cluster plan of n items in clusters of C: coverage and balance. */
static void check_cluster(const pie_cuda_attn_item *it, int n, int C)
{
    static pie_cuda_attn_item pc[MAX_ITEMS * 16];
    pie_cuda_dec_plan_cluster(it, n, C, pc);
    for (int i = 0; i < n; i++) {
        int64_t nb = ((int64_t)it[i].s1 - it[i].s0 + BLK - 1) / BLK;
        int cur = it[i].s0;
        for (int c = 0; c < C; c++) {
            const pie_cuda_attn_item *p = &pc[i * C + c];
            CHECK(p->req == it[i].req && p->t0 == it[i].t0 && p->nt == it[i].nt &&
                      p->kvh == it[i].kvh && p->part == -1 && p->pad == 1 &&
                      p->s0 <= p->s1,
                  "cluster piece %d of item %d changed", c, i);
            int64_t k = ((int64_t)p->s1 - p->s0 + BLK - 1) / BLK;
            CHECK(k >= (nb > 0 ? nb / C : 0) && k <= (nb + C - 1) / C,
                  "cluster rank %d of %d streams %lld of %lld KV blocks", c, C,
                  (long long)k, (long long)nb);
            if (p->s0 == p->s1) continue;       /* an empty rank */
            CHECK(p->s0 == cur && (p->s0 - it[i].s0) % BLK == 0,
                  "cluster piece %d of item %d starts at %d, not %d", c, i,
                  p->s0, cur);
            cur = p->s1;
        }
        CHECK(cur == it[i].s1, "cluster pieces of item %d end at %d, not %d",
              i, cur, it[i].s1);
    }
}

/* Cluster sizes the rule must pick (132 SMs, a grid of 396). */
static void check_cluster_size(void)
{
    static pie_cuda_attn_item it[256];
    int pad;
    fill_items(it, 8, 520);                 /* B=1, 9 KV blocks: 8 ranks */
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, 0, &pad) == 8 &&
          pad == 1, "B=1 ctx 520: clusters of 8, one an SM (64 blocks)");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 4, 0, &pad) == 0,
          "B=1 ctx 520 where clusters of 4 are the most: none");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, 16, &pad) == 16 &&
          pad == 0, "forced 16, unpadded");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, 3, &pad) == 3,
          "forced 3 (the head dims split unevenly)");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, -1, &pad) == 0,
          "switched off");
    fill_items(it, 8, 512);                 /* 8 KV blocks: 4 ranks */
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, 0, &pad) == 4,
          "B=1 ctx 512: clusters of 4");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 64, 16, 0, &pad) == 4 &&
          pad == 1, "B=1 ctx 512 (32 blocks): one an SM");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 66, 396, 16, 0, &pad) == 4 &&
          pad == 1, "32 blocks on 66 SMs: one an SM");
    CHECK(pie_cuda_dec_cluster_size(it, 8, 63, 396, 16, 0, &pad) == 4 &&
          pad == 0, "32 blocks on 63 SMs: over half, unpadded");
    fill_items(it, 16, 1000);               /* B=2, 16 KV blocks: 128 blocks */
    CHECK(pie_cuda_dec_cluster_size(it, 16, 132, 396, 16, 0, &pad) == 8 &&
          pad == 0, "B=2 ctx 1000: clusters of 8, unpadded (128 blocks)");
    CHECK(pie_cuda_dec_cluster_size(it, 16, 132, 64, 16, 0, &pad) == 0,
          "B=2 ctx 1000 on a grid of 64 (PIE_CUDA_DEC_BLOCKS): no room");
    fill_items(it, 32, 520);                /* B=4: 256 blocks, over an SM each */
    CHECK(pie_cuda_dec_cluster_size(it, 32, 132, 396, 16, 0, &pad) == 0,
          "B=4 ctx 520: more blocks than SMs");
    CHECK(pie_cuda_dec_cluster_size(it, 32, 132, 396, 16, 8, &pad) == 8,
          "B=4 ctx 520 forced to 8: fits the grid");
    fill_items(it, 8, 2048);                /* 32 KV blocks: would need 16 */
    CHECK(pie_cuda_dec_cluster_size(it, 8, 132, 396, 16, 0, &pad) == 0,
          "B=1 ctx 2048: clusters of 16 are not taken");
}

/* PIE_CUDA_DEC_CLUSTER_PAD's parsing. */
/* The padding a cluster plan keeps where its padded clusters do not all
 * run (max_pad[k]: the largest cluster that runs padded to k an SM). */
static void check_pad_fit(void)
{
    int full[4] = { 0, 16, 16, 16 }, small[4] = { 0, 4, 8, 16 };
    int none[4] = { 0, 0, 0, 0 };
    CHECK(pie_cuda_dec_cluster_pad_fit(8, 1, full) == 1 &&
          pie_cuda_dec_cluster_pad_fit(2, 2, full) == 2,
          "padding kept where its clusters run");
    CHECK(pie_cuda_dec_cluster_pad_fit(8, 0, none) == 0 &&
          pie_cuda_dec_cluster_pad_fit(8, -1, full) == 0,
          "unpadded stays unpadded");
    CHECK(pie_cuda_dec_cluster_pad_fit(8, 1, small) == 2,
          "clusters of 8 at one an SM do not run: two an SM");
    CHECK(pie_cuda_dec_cluster_pad_fit(16, 1, small) == 3,
          "clusters of 16: three an SM");
    CHECK(pie_cuda_dec_cluster_pad_fit(8, 1, none) == 0 &&
          pie_cuda_dec_cluster_pad_fit(4, 3, (int[4]){ 0, 16, 16, 2 }) == 0,
          "no padding runs: unpadded");
    CHECK(pie_cuda_dec_cluster_pad_fit(4, 1, small) == 1,
          "clusters of 4 at one an SM run");
}

static void check_pad_switch(void)
{
    static const struct { const char *v; int want; } cases[] = {
        { NULL, -1 }, { "", -1 }, { "0", 0 }, { "1", 1 }, { "3", 3 },
        { "4", -1 }, { "-1", -1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (cases[i].v) setenv("PIE_CUDA_DEC_CLUSTER_PAD", cases[i].v, 1);
        else unsetenv("PIE_CUDA_DEC_CLUSTER_PAD");
        CHECK(pie_cuda_dec_cluster_pad_switch() == cases[i].want,
              "PIE_CUDA_DEC_CLUSTER_PAD=%s", cases[i].v ? cases[i].v : "(unset)");
    }
    unsetenv("PIE_CUDA_DEC_CLUSTER_PAD");
}

/* The mid-batch rule's picks (132 SMs, a grid of 396, head dim 64 unless
 * said). */
static void check_cluster_mid(void)
{
    static pie_cuda_attn_item it[256];
    int pad = -1;
    fill_items(it, 128, 2060);          /* B=16: 33 KV blocks an item */
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 396, 64, 8, 0, &pad) == 2 &&
          pad == 2, "B=16 ctx 2060: clusters of 2 (256 blocks, 17 a piece), "
          "two an SM");
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 396, 64, 8, 4, &pad) == 0 &&
          pie_cuda_dec_cluster_mid(it, 128, 132, 396, 64, 8, -1, &pad) == 0,
          "B=16: never where PIE_CUDA_DEC_CLUSTER is set");
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 200, 64, 8, 0, &pad) == 0,
          "B=16 on a grid of 200: no room");
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 396, 128, 8, 0, &pad) == 2 &&
          pad == 2, "B=16 at head dim 128: clusters of 2, two an SM");
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 396, 64, 1, 0, &pad) == 0,
          "B=16 where clusters do not run");
    fill_items(it, 128, 2200);          /* 35 KV blocks: 18 a piece */
    CHECK(pie_cuda_dec_cluster_mid(it, 128, 132, 396, 64, 8, 0, &pad) == 0,
          "B=16 ctx 2200: pieces too long");
    fill_items(it, 64, 2060);           /* B=8 */
    CHECK(pie_cuda_dec_cluster_mid(it, 64, 132, 396, 64, 8, 0, &pad) == 4 &&
          pad == 0, "B=8 ctx 2060: clusters of 4, unpadded");
    CHECK(pie_cuda_dec_cluster_mid(it, 64, 132, 396, 128, 8, 0, &pad) == 0,
          "B=8 at head dim 128: none (4 only below it, 2 too few)");
    CHECK(pie_cuda_dec_cluster_mid(it, 64, 132, 396, 64, 2, 0, &pad) == 0,
          "B=8 where clusters of 2 are the most: 128 blocks, too few");
    fill_items(it, 72, 2060);           /* B=9 */
    CHECK(pie_cuda_dec_cluster_mid(it, 72, 132, 396, 64, 2, 0, &pad) == 2,
          "B=9 where clusters of 2 are the most: 2");
    fill_items(it, 64, 8200);           /* 129 KV blocks */
    CHECK(pie_cuda_dec_cluster_mid(it, 64, 132, 396, 64, 8, 0, &pad) == 0,
          "B=8 ctx 8200: pieces too long");
    fill_items(it, 88, 520);            /* B=11: 4 would give 352 blocks */
    CHECK(pie_cuda_dec_cluster_mid(it, 88, 132, 396, 64, 8, 0, &pad) == 2,
          "B=11: clusters of 2, not 4 (over two blocks an SM)");
    fill_items(it, 70, 520);            /* 4: 280 blocks; 3 would fit */
    CHECK(pie_cuda_dec_cluster_mid(it, 70, 132, 396, 64, 8, 0, &pad) == 2,
          "70 items: clusters of 2 (sizes halve: no 3)");
    fill_items(it, 40, 520);            /* B=5: 160 blocks */
    CHECK(pie_cuda_dec_cluster_mid(it, 40, 132, 396, 64, 8, 0, &pad) == 4,
          "B=5 ctx 520: clusters of 4");
    fill_items(it, 32, 520);            /* B=4: 128 blocks, under the SMs */
    CHECK(pie_cuda_dec_cluster_mid(it, 32, 132, 396, 64, 8, 0, &pad) == 0,
          "B=4 ctx 520: too few blocks");
    fill_items(it, 256, 520);           /* B=32: 512 blocks */
    CHECK(pie_cuda_dec_cluster_mid(it, 256, 132, 396, 64, 8, 0, &pad) == 0,
          "B=32: too many blocks");
}

int main(void)
{
    static pie_cuda_attn_item it[MAX_ITEMS], pc[MAX_ITEMS + MAX_BLOCKS];
    static pie_cuda_merge_item mg[MAX_BLOCKS];
    static int32_t bst[MAX_BLOCKS + 1];
    srand(12345);
    int plans = 0;
    for (int trial = 0; trial < 20000; trial++) {
        int G = 1 << (rand() % 4);                  /* 1, 2, 4, 8 */
        int n = make_items(it, G), nb = 1 + rand() % MAX_BLOCKS;
        int min_kv = rand() % 4, npc = -1, nm = -1;
        int64_t part0 = rand() % 100, T = 0;
        for (int i = 0; i < n; i++) T += kv_blocks(&it[i]);
        memset(bst, 0xff, sizeof bst);
        int64_t parts = pie_cuda_dec_plan(it, n, G, nb, min_kv, part0, pc,
                                          &npc, bst, mg, &nm);
        CHECK(npc >= 0 && npc <= n + nb && nm >= 0 && nm <= nb,
              "%d pieces, %d merges for %d items on %d blocks", npc, nm, n, nb);
        check_cover(it, n, G, pc, npc, mg, nm, part0, parts);
        check_blocks(pc, bst, nb, npc, T, min_kv < 1 ? 1 : min_kv);
        check_whole(it, n, nb, pc, bst);
        check_cluster(it, n, 2 + rand() % 15);
        plans++;
    }
    check_pays();
    check_one_each();
    check_cluster_size();
    check_cluster_mid();
    check_pad_switch();
    check_pad_fit();
    printf("dec_plan: %d random plans ok (%d checks)\n", plans, test_n_checks);
    return 0;
}
