/*
 * tok_bpe.c — the tokenizer's hash maps and the BPE merge loop.
 *
 * vocab: open addressing over (id + 1, 32 hash bits) slots, 0 = empty; the
 * key is the token string t->str[id], compared only when the hash bits
 * agree. Capacity is a power of two at least twice the number of ids.
 *
 * merges: open addressing over 16-byte slots (packed pair a<<32|b, rank,
 * merged id), so a probe costs one cache line.
 *
 * BPE on one piece (as in Hugging Face `tokenizers` BPE::merge_word): the
 * piece becomes a doubly linked list of symbols (one per byte for ByteLevel
 * tokenizers, one per character otherwise, with byte fallback or <unk> for
 * characters missing from the vocabulary). A binary min-heap holds candidate
 * merges ordered by (rank, left position); a popped candidate is applied only
 * if both symbols still exist with the ids it was made from, so stale entries
 * cost nothing. Each merge pushes the two new neighbouring pairs. This is
 * O(n log n) per piece, which matters for SentencePiece models that have no
 * pre-tokenizer and feed whole paragraphs as one piece.
 */
#include "model/tok_internal.h"
#include "common/pie_err.h"

#include <stdlib.h>
#include <string.h>

uint64_t pie__tok_hash(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;          /* FNV-1a, then a mix */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
}

static uint32_t pow2_at_least(size_t n)
{
    uint32_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

int32_t pie__tok_vocab_find(const pie_tokenizer *t, const char *s, size_t n)
{
    uint64_t h = pie__tok_hash(s, n);
    uint32_t mask = t->vocab_cap - 1, tag = (uint32_t)(h >> 32);
    for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
        tok_vslot v = t->vocab_slots[i];
        if (!v.id1) return -1;
        if (v.hash != tag) continue;
        int32_t id = (int32_t)v.id1 - 1;
        if (t->len[id] == n && memcmp(t->str[id], s, n) == 0) return id;
    }
}

/* Inserts every present id; a string seen twice keeps its first (vocab) id. */
int pie__tok_vocab_build(pie_tokenizer *t)
{
    t->vocab_cap = pow2_at_least((size_t)t->n_ids * 2 + 1);
    t->vocab_slots = calloc(t->vocab_cap, sizeof *t->vocab_slots);
    if (!t->vocab_slots)
        return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory (vocab map)");
    uint32_t mask = t->vocab_cap - 1;
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!(t->flags[id] & TOK_PRESENT)) continue;
        uint64_t h = pie__tok_hash(t->str[id], t->len[id]);
        uint32_t tag = (uint32_t)(h >> 32);
        for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
            tok_vslot v = t->vocab_slots[i];
            if (!v.id1) {
                t->vocab_slots[i] = (tok_vslot){ (uint32_t)id + 1, tag };
                break;
            }
            int32_t o = (int32_t)v.id1 - 1;
            if (v.hash == tag && t->len[o] == t->len[id] &&
                memcmp(t->str[o], t->str[id], t->len[id]) == 0)
                break;
        }
    }
    return 0;
}

int pie__tok_pairs_init(tok_pairmap *m, size_t n)
{
    m->cap = pow2_at_least(n + n / 2 + 1);       /* load factor ≤ 2/3 */
    m->slots = malloc((size_t)m->cap * sizeof *m->slots);
    if (!m->slots)
        return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory (merges)");
    for (uint32_t i = 0; i < m->cap; i++) m->slots[i].key = UINT64_MAX;
    return 0;
}

static inline uint32_t pair_slot(uint64_t k, uint32_t mask)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k & mask;
}

/* Adds a merge; a pair listed twice keeps its first (lowest) rank. */
int pie__tok_pairs_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank,
                       int32_t merged)
{
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t mask = m->cap - 1;
    for (uint32_t i = pair_slot(k, mask);; i = (i + 1) & mask) {
        tok_pair *p = &m->slots[i];
        if (p->key == k) return 0;
        if (p->key == UINT64_MAX) {
            *p = (tok_pair){ k, rank, merged };
            return 0;
        }
    }
}

static inline int pairs_get(const tok_pairmap *m, int32_t a, int32_t b,
                            uint32_t *rank, int32_t *merged)
{
    if (!m->cap) return 0;
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t mask = m->cap - 1;
    for (uint32_t i = pair_slot(k, mask);; i = (i + 1) & mask) {
        const tok_pair *p = &m->slots[i];
        if (p->key == k) { *rank = p->rank; *merged = p->merged; return 1; }
        if (p->key == UINT64_MAX) return 0;
    }
}

void pie__tok_pairs_free(tok_pairmap *m)
{
    free(m->slots);
    memset(m, 0, sizeof *m);
}

int pie__tok_ids_push(tok_ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = realloc(ids->v, cap * sizeof *v);
        if (!v) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

/* ---- the merge loop ---------------------------------------------------- */

typedef struct {
    uint32_t rank;
    int32_t  pos;                        /* left symbol index                 */
    int32_t  a, b;                       /* ids the candidate was made from   */
    int32_t  merged;
} cand;

typedef struct {
    int32_t *id, *prev, *next;           /* (n) symbol list; id -1 = removed  */
    cand    *heap;  size_t n_heap, cap_heap;
} word;

static inline int cand_less(const cand *x, const cand *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(word *w, cand c)
{
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = c;
}

static cand heap_pop(word *w)
{
    cand top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cand *best = &last;
        if (l < n && cand_less(&w->heap[l], best)) { m = l; best = &w->heap[l]; }
        if (r < n && cand_less(&w->heap[r], best)) { m = r; }
        if (m == i) break;
        w->heap[i] = w->heap[m];
        i = m;
    }
    if (n) w->heap[i] = last;
    return top;
}

/* Pushes the merge candidate (pos, next(pos)) if the pair is a merge. */
static void try_pair(const pie_tokenizer *t, word *w, int32_t pos)
{
    if (pos < 0) return;
    int32_t nx = w->next[pos];
    if (nx < 0) return;
    uint32_t rank;
    int32_t merged;
    if (!pairs_get(&t->merges, w->id[pos], w->id[nx], &rank, &merged)) return;
    heap_push(w, (cand){ rank, pos, w->id[pos], w->id[nx], merged });
}

/* Merges the n symbols in w (ids already set) and appends the result. */
static int merge_symbols(const pie_tokenizer *t, word *w, int32_t n,
                         tok_ids *out)
{
    for (int32_t i = 0; i < n; i++) {
        w->prev[i] = i - 1;
        w->next[i] = i + 1 < n ? i + 1 : -1;
    }
    for (int32_t i = 0; i + 1 < n; i++) try_pair(t, w, i);
    while (w->n_heap) {
        cand c = heap_pop(w);
        int32_t nx = w->next[c.pos];
        if (w->id[c.pos] != c.a || nx < 0 || w->id[nx] != c.b) continue;
        w->id[c.pos] = c.merged;                 /* absorb nx into pos */
        w->id[nx] = -1;
        w->next[c.pos] = w->next[nx];
        if (w->next[nx] >= 0) w->prev[w->next[nx]] = c.pos;
        try_pair(t, w, w->prev[c.pos]);
        try_pair(t, w, c.pos);
    }
    for (int32_t i = 0; i >= 0 && i < n; i = w->next[i]) {
        int rc = pie__tok_ids_push(out, w->id[i]);
        if (rc) return rc;
    }
    return 0;
}

static int utf8_len(uint8_t c)
{
    return c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
}

/* Fills w->id with the initial symbols of a non-ByteLevel piece. */
static int32_t char_symbols(const pie_tokenizer *t, const char *p, size_t n,
                            int32_t *id)
{
    int32_t k = 0;
    int last_unk = 0;
    for (size_t i = 0; i < n;) {
        size_t cl = (size_t)utf8_len((uint8_t)p[i]);
        if (cl > n - i) cl = n - i;
        int32_t v = pie__tok_vocab_find(t, p + i, cl);
        if (v >= 0) {
            id[k++] = v;
            last_unk = 0;
        } else {
            int ok = t->byte_fallback;
            for (size_t j = 0; ok && j < cl; j++)
                ok = t->byte_fallback_id[(uint8_t)p[i + j]] >= 0;
            if (ok) {
                for (size_t j = 0; j < cl; j++)
                    id[k++] = t->byte_fallback_id[(uint8_t)p[i + j]];
                last_unk = 0;
            } else if (t->unk_id >= 0 && !(t->fuse_unk && last_unk)) {
                id[k++] = t->unk_id;
                last_unk = 1;
            }                            /* no unk token: dropped, as HF does */
        }
        i += cl;
    }
    return k;
}

/* Writes the vocab spelling of ByteLevel piece p (≤ 2 UTF-8 bytes per byte)
 * to map; returns its length. */
static size_t byte_level_key(const char *p, size_t n, char *map)
{
    size_t kn = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t cp = pie__tok_byte_to_cp[(uint8_t)p[i]];
        if (cp < 0x80) map[kn++] = (char)cp;
        else {
            map[kn++] = (char)(0xc0 | cp >> 6);
            map[kn++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    return kn;
}

/* Sets *v to the vocab id of the whole piece, -1 if it has none (for
 * ignore_merges); returns 0, or PIE_ENOMEM with the error set. */
static int whole_piece_id(const pie_tokenizer *t, const char *p, size_t n,
                          int32_t *v)
{
    char small_map[256], *map = small_map;
    const char *key = p;
    size_t kn = n;
    if (t->byte_level) {
        if (2 * n > sizeof small_map && !(map = malloc(2 * n)))
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        kn = byte_level_key(p, n, map);
        key = map;
    }
    *v = pie__tok_vocab_find(t, key, kn);
    if (map != small_map) free(map);
    return 0;
}

/* Fills id with the initial symbols of a ByteLevel piece; returns their count. */
static int32_t byte_symbols(const pie_tokenizer *t, const char *p, size_t n,
                            int32_t *id)
{
    int32_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t v = t->byte_id[(uint8_t)p[i]];
        if (v >= 0) id[k++] = v;
        else if (t->unk_id >= 0) id[k++] = t->unk_id;
    }
    return k;
}

int pie__tok_bpe_piece(const pie_tokenizer *t, const char *p, size_t n,
                       tok_ids *out)
{
    if (n == 0) return 0;
    if (t->ignore_merges) {                      /* whole piece in vocab? */
        int32_t v = -1;
        int rc = whole_piece_id(t, p, n, &v);
        if (rc) return rc;
        if (v >= 0) return pie__tok_ids_push(out, v);
    }
    /* up to 4 symbols per byte (byte fallback), 3 arrays */
    enum { SMALL = 64 };
    int32_t small[3 * 4 * SMALL];
    cand small_heap[3 * 4 * SMALL];
    word w = { 0 };
    int32_t *mem = small;
    cand *heap = small_heap;
    size_t max_sym = t->byte_level ? n : n * 4;
    if (max_sym > 4 * SMALL) {
        mem = malloc(3 * max_sym * sizeof *mem);
        heap = malloc(3 * max_sym * sizeof *heap);
        if (!mem || !heap) {
            free(mem == small ? NULL : mem);
            free(heap == small_heap ? NULL : heap);
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory (bpe)");
        }
    }
    w.id = mem;
    w.prev = mem + max_sym;
    w.next = mem + 2 * max_sym;
    w.heap = heap;
    int32_t k = t->byte_level ? byte_symbols(t, p, n, w.id)
                              : char_symbols(t, p, n, w.id);
    /* n-1 initial candidates + ≤ 2 per merge (≤ n-1 merges): heap < 3n */
    int rc = merge_symbols(t, &w, k, out);
    if (mem != small) free(mem);
    if (heap != small_heap) free(heap);
    return rc;
}
