/*
 * tokenizer.c — encode, decode and streaming decode for tokenizer.json BPE
 * tokenizers (tables built by tok_load.c, BPE in tok_bpe.c).
 *
 * encode(text):
 *   1. text must be valid UTF-8 (PIE_EINVAL names the first bad byte);
 *   2. added tokens are found left to right, longest first at each position
 *      (lstrip/rstrip absorb neighbouring whitespace, single_word requires
 *      word boundaries); the text between them is a "segment";
 *   3. each segment is normalized (NFC…, Prepend, Replace, Lowercase), then
 *      pre-tokenized into pieces: a piece list (offset, length into one
 *      growable buffer) is rewritten by each step (regex Split, ByteLevel);
 *   4. each piece goes through BPE.
 *   All scratch lives in an enc_state on the caller's stack, so one
 *   tokenizer may encode on many threads at once.
 *
 * decode / pie_detok: every id maps to precomputed bytes; a small streaming
 * UTF-8 repairer turns the byte stream into text, holding back an
 * incomplete sequence and replacing each maximal invalid subpart with
 * U+FFFD (the policy of Rust's from_utf8_lossy, used by Hugging Face).
 * Full decode is the same stream flushed at the end, so concatenated
 * pie_detok output always equals pie_tokenizer_decode.
 */
#define _GNU_SOURCE                      /* memmem */
#include "model/tok_internal.h"
#include "model/model_internal.h"
#include "common/pie_err.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves,
 * the rest to U+0100.. in byte order. */
const uint16_t pie__tok_byte_to_cp[256] = {
    0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10a, 0x10b,
    0x10c, 0x10d, 0x10e, 0x10f, 0x110, 0x111, 0x112, 0x113, 0x114, 0x115, 0x116, 0x117,
    0x118, 0x119, 0x11a, 0x11b, 0x11c, 0x11d, 0x11e, 0x11f, 0x120, 0x021, 0x022, 0x023,
    0x024, 0x025, 0x026, 0x027, 0x028, 0x029, 0x02a, 0x02b, 0x02c, 0x02d, 0x02e, 0x02f,
    0x030, 0x031, 0x032, 0x033, 0x034, 0x035, 0x036, 0x037, 0x038, 0x039, 0x03a, 0x03b,
    0x03c, 0x03d, 0x03e, 0x03f, 0x040, 0x041, 0x042, 0x043, 0x044, 0x045, 0x046, 0x047,
    0x048, 0x049, 0x04a, 0x04b, 0x04c, 0x04d, 0x04e, 0x04f, 0x050, 0x051, 0x052, 0x053,
    0x054, 0x055, 0x056, 0x057, 0x058, 0x059, 0x05a, 0x05b, 0x05c, 0x05d, 0x05e, 0x05f,
    0x060, 0x061, 0x062, 0x063, 0x064, 0x065, 0x066, 0x067, 0x068, 0x069, 0x06a, 0x06b,
    0x06c, 0x06d, 0x06e, 0x06f, 0x070, 0x071, 0x072, 0x073, 0x074, 0x075, 0x076, 0x077,
    0x078, 0x079, 0x07a, 0x07b, 0x07c, 0x07d, 0x07e, 0x121, 0x122, 0x123, 0x124, 0x125,
    0x126, 0x127, 0x128, 0x129, 0x12a, 0x12b, 0x12c, 0x12d, 0x12e, 0x12f, 0x130, 0x131,
    0x132, 0x133, 0x134, 0x135, 0x136, 0x137, 0x138, 0x139, 0x13a, 0x13b, 0x13c, 0x13d,
    0x13e, 0x13f, 0x140, 0x141, 0x142, 0x0a1, 0x0a2, 0x0a3, 0x0a4, 0x0a5, 0x0a6, 0x0a7,
    0x0a8, 0x0a9, 0x0aa, 0x0ab, 0x0ac, 0x143, 0x0ae, 0x0af, 0x0b0, 0x0b1, 0x0b2, 0x0b3,
    0x0b4, 0x0b5, 0x0b6, 0x0b7, 0x0b8, 0x0b9, 0x0ba, 0x0bb, 0x0bc, 0x0bd, 0x0be, 0x0bf,
    0x0c0, 0x0c1, 0x0c2, 0x0c3, 0x0c4, 0x0c5, 0x0c6, 0x0c7, 0x0c8, 0x0c9, 0x0ca, 0x0cb,
    0x0cc, 0x0cd, 0x0ce, 0x0cf, 0x0d0, 0x0d1, 0x0d2, 0x0d3, 0x0d4, 0x0d5, 0x0d6, 0x0d7,
    0x0d8, 0x0d9, 0x0da, 0x0db, 0x0dc, 0x0dd, 0x0de, 0x0df, 0x0e0, 0x0e1, 0x0e2, 0x0e3,
    0x0e4, 0x0e5, 0x0e6, 0x0e7, 0x0e8, 0x0e9, 0x0ea, 0x0eb, 0x0ec, 0x0ed, 0x0ee, 0x0ef,
    0x0f0, 0x0f1, 0x0f2, 0x0f3, 0x0f4, 0x0f5, 0x0f6, 0x0f7, 0x0f8, 0x0f9, 0x0fa, 0x0fb,
    0x0fc, 0x0fd, 0x0fe, 0x0ff,
};

/* ---- UTF-8 ------------------------------------------------------------- */

/* Continuation bytes a lead byte needs, or -1 if it cannot start a char. */
static int utf8_need(uint8_t c)
{
    if (c < 0x80) return 0;
    if (c >= 0xc2 && c <= 0xdf) return 1;
    if (c >= 0xe0 && c <= 0xef) return 2;
    if (c >= 0xf0 && c <= 0xf4) return 3;
    return -1;
}

/* Whether c may be continuation byte number idx (1-based) after lead. */
static int utf8_cont_ok(uint8_t lead, int idx, uint8_t c)
{
    if ((c & 0xc0) != 0x80) return 0;
    if (idx == 1) {
        if (lead == 0xe0) return c >= 0xa0;
        if (lead == 0xed) return c <= 0x9f;
        if (lead == 0xf0) return c >= 0x90;
        if (lead == 0xf4) return c <= 0x8f;
    }
    return 1;
}

/* 1 if s[0..n) is valid UTF-8; otherwise 0 and *bad_at = first bad byte. */
int pie__tok_utf8_valid(const uint8_t *s, size_t n, size_t *bad_at)
{
    for (size_t i = 0; i < n;) {
        if (s[i] < 0x80) { i++; continue; }
        int need = utf8_need(s[i]);
        int ok = need > 0 && (size_t)need < n - i;
        for (int k = 1; ok && k <= need; k++) ok = utf8_cont_ok(s[i], k, s[i + k]);
        if (!ok) { *bad_at = i; return 0; }
        i += (size_t)need + 1;
    }
    return 1;
}

/* ---- output sinks ------------------------------------------------------ */

typedef struct {
    char  *p;
    size_t n, cap;
    int    fixed;                        /* caller's buffer: never grows      */
} sink;

static int sink_put(sink *s, const void *b, size_t n)
{
    if (s->n + n + 1 > s->cap) {
        if (s->fixed)
            return pie_err_set(PIE_ERANGE, "detokenizer: output buffer of %zu "
                               "bytes is too small", s->cap);
        const char *src = b;
        size_t alias = s->p && src >= s->p && src < s->p + s->n
                     ? (size_t)(src - s->p) : SIZE_MAX;   /* b points into s */
        size_t cap = s->cap ? s->cap : 64;
        while (cap < s->n + n + 1) cap *= 2;
        char *p = realloc(s->p, cap);
        if (!p) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        s->p = p;
        s->cap = cap;
        if (alias != SIZE_MAX) b = p + alias;
    }
    memcpy(s->p + s->n, b, n);
    s->n += n;
    s->p[s->n] = 0;
    return 0;
}

static const char REPL[3] = { (char)0xef, (char)0xbf, (char)0xbd }; /* U+FFFD */

/* Feeds bytes through the streaming UTF-8 repairer of d into s. */
static int utf8_feed(pie_detok *d, const uint8_t *b, size_t n, sink *s)
{
    int rc = 0;
    for (size_t i = 0; i < n && !rc;) {
        uint8_t c = b[i];
        if (d->n_pending == 0) {
            int need = utf8_need(c);
            if (need == 0) {
                size_t j = i;                     /* copy an ASCII run */
                while (j < n && b[j] < 0x80) j++;
                rc = sink_put(s, b + i, j - i);
                i = j;
                continue;
            }
            if (need > 0) d->pending[d->n_pending++] = c;
            else rc = sink_put(s, REPL, 3);
            i++;
        } else if (utf8_cont_ok(d->pending[0], d->n_pending, c)) {
            d->pending[d->n_pending++] = c;
            if (d->n_pending == utf8_need(d->pending[0]) + 1) {
                rc = sink_put(s, d->pending, (size_t)d->n_pending);
                d->n_pending = 0;
            }
            i++;
        } else {                                 /* c is re-read afresh */
            d->n_pending = 0;
            rc = sink_put(s, REPL, 3);
        }
    }
    return rc;
}

/* ---- decoding ---------------------------------------------------------- */

static int check_id(const pie_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_ids || !(t->flags[id] & TOK_PRESENT))
        return pie_err_set(PIE_EINVAL, "tokenizer: token id %d is not in the "
                           "vocabulary (size %d)", id, t->n_ids);
    return 0;
}

/* Decodes one id into s (joins, Strip at the very start, UTF-8 repair). */
static int detok_one(pie_detok *d, int32_t id, sink *s)
{
    const pie_tokenizer *t = d->t;
    int rc = check_id(t, id);
    if (rc) return rc;
    if (d->skip_special && (t->flags[id] & TOK_SPECIAL)) return 0;
    const uint8_t *b = (const uint8_t *)t->dec_arena + t->dec_off[id];
    size_t n = t->dec_len[id];
    if (d->first) {
        d->first = false;
        if (t->dec_strip && n && b[0] == ' ') { b++; n--; }
    } else if (t->dec_join_space) {
        if ((rc = utf8_feed(d, (const uint8_t *)" ", 1, s))) return rc;
    }
    return utf8_feed(d, b, n, s);
}

void pie_detok_init(pie_detok *d, const pie_tokenizer *t, bool skip_special)
{
    memset(d, 0, sizeof *d);
    d->t = t;
    d->skip_special = skip_special;
    d->first = true;
}

/* On any error (ERANGE included) the detokenizer is left as it was, so the
 * caller may retry the same id with a larger buffer. */
int pie_detok_push(pie_detok *d, int32_t id, char *out, size_t cap)
{
    if (!out || cap == 0)
        return pie_err_set(PIE_EINVAL, "detokenizer: no output buffer");
    pie_detok saved = *d;
    sink s = { out, 0, cap, 1 };
    out[0] = 0;
    int rc = detok_one(d, id, &s);
    if (rc) {
        *d = saved;
        out[0] = 0;
        return rc;
    }
    return (int)s.n;
}

int pie_detok_flush(pie_detok *d, char *out, size_t cap)
{
    if (!out || cap < 4)
        return pie_err_set(PIE_ERANGE, "detokenizer: flush needs 4 bytes");
    out[0] = 0;
    if (!d->n_pending) return 0;
    d->n_pending = 0;
    memcpy(out, REPL, 3);
    out[3] = 0;
    return 3;
}

int pie_tokenizer_decode(const pie_tokenizer *t, const int32_t *ids, size_t n,
                         bool skip_special, char **text, size_t *len)
{
    pie_detok d;
    pie_detok_init(&d, t, skip_special);
    sink s = { 0 };
    int rc = sink_put(&s, "", 0);
    for (size_t i = 0; i < n && !rc; i++) rc = detok_one(&d, ids[i], &s);
    if (!rc && d.n_pending) rc = sink_put(&s, REPL, 3);
    if (rc) {
        free(s.p);
        return rc;
    }
    *text = s.p;
    if (len) *len = s.n;
    return 0;
}

/* ---- normalization ----------------------------------------------------- */

/* Replaces all occurrences of a with b in (*p, *n); *own tells if *p is ours. */
static int norm_replace(const tok_norm *r, char **p, size_t *n, int *own)
{
    const char *s = *p;
    if (!memmem(s, *n, r->a, r->a_len)) return 0;
    sink o = { 0 };
    int rc = sink_put(&o, "", 0);
    for (size_t i = 0; i < *n && !rc;) {
        const char *hit = memmem(s + i, *n - i, r->a, r->a_len);
        size_t upto = hit ? (size_t)(hit - s) : *n;
        rc = sink_put(&o, s + i, upto - i);
        if (!rc && hit) rc = sink_put(&o, r->b, r->b_len);
        i = hit ? upto + r->a_len : *n;
    }
    if (rc) { free(o.p); return rc; }
    if (*own) free(*p);
    *p = o.p; *n = o.n; *own = 1;
    return 0;
}

static int norm_unicode(int kind, char **p, size_t *n, int *own)
{
    size_t i = 0;
    while (i < *n && (uint8_t)(*p)[i] < 0x80) i++;
    if (i == *n && kind != NORM_LOWERCASE) return 0;   /* ASCII: identity */
    utf8proc_option_t opt = UTF8PROC_STABLE;
    if (kind == NORM_NFC) opt |= UTF8PROC_COMPOSE;
    if (kind == NORM_NFD) opt |= UTF8PROC_DECOMPOSE;
    if (kind == NORM_NFKC) opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    if (kind == NORM_NFKD) opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t r;
    if (kind == NORM_LOWERCASE) {
        sink o = { 0 };
        int rc = sink_put(&o, "", 0);
        for (size_t k = 0; k < *n && !rc;) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t l = utf8proc_iterate((const uint8_t *)*p + k,
                                                  (utf8proc_ssize_t)(*n - k), &cp);
            if (l <= 0) { rc = pie_err_set(PIE_EINVAL, "tokenizer: bad UTF-8"); break; }
            uint8_t buf[4];
            utf8proc_ssize_t m = utf8proc_encode_char(utf8proc_tolower(cp), buf);
            rc = sink_put(&o, buf, (size_t)m);
            k += (size_t)l;
        }
        if (rc) { free(o.p); return rc; }
        out = (utf8proc_uint8_t *)o.p;
        r = (utf8proc_ssize_t)o.n;
    } else {
        r = utf8proc_map((const utf8proc_uint8_t *)*p, (utf8proc_ssize_t)*n,
                         &out, opt);
        if (r < 0)
            return pie_err_set(PIE_EINVAL, "tokenizer: normalization failed: %s",
                               utf8proc_errmsg(r));
    }
    if (*own) free(*p);
    *p = (char *)out; *n = (size_t)r; *own = 1;
    return 0;
}

static int normalize(const pie_tokenizer *t, char **p, size_t *n, int *own)
{
    int rc = 0;
    for (int i = 0; i < t->n_norm && !rc; i++) {
        const tok_norm *x = &t->norm[i];
        if (x->kind == NORM_REPLACE) {
            rc = norm_replace(x, p, n, own);
        } else if (x->kind == NORM_PREPEND) {
            if (*n == 0) continue;
            char *q = malloc(*n + x->a_len + 1);
            if (!q) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
            memcpy(q, x->a, x->a_len);
            memcpy(q + x->a_len, *p, *n);
            q[*n + x->a_len] = 0;
            if (*own) free(*p);
            *p = q; *n += x->a_len; *own = 1;
        } else {
            rc = norm_unicode(x->kind, p, n, own);
        }
    }
    return rc;
}

/* ---- pre-tokenization -------------------------------------------------- */

typedef struct { size_t off, len; } piece;
typedef struct { piece *v; size_t n, cap; } pieces;

typedef struct {
    sink               buf;              /* segment text + prefixed copies    */
    pieces             a, b;             /* current / next piece lists        */
    pcre2_match_data  *md;
    pcre2_match_context *mctx;           /* big JIT stack, made on demand     */
    pcre2_jit_stack   *jstack;
    tok_ids            ids;
} enc_state;

static int pieces_push(pieces *l, size_t off, size_t len)
{
    if (len == 0) return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        piece *v = realloc(l->v, cap * sizeof *v);
        if (!v) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (piece){ off, len };
    return 0;
}

static int run_match(enc_state *e, const pcre2_code *re, const char *s,
                     size_t n, size_t at)
{
    int r = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, e->md,
                        e->mctx);
    if (r == PCRE2_ERROR_JIT_STACKLIMIT && !e->mctx) {
        e->jstack = pcre2_jit_stack_create(64 << 10, 64 << 20, NULL);
        e->mctx = pcre2_match_context_create(NULL);
        if (!e->jstack || !e->mctx)
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory (regex)");
        pcre2_jit_stack_assign(e->mctx, NULL, e->jstack);
        r = pcre2_match(re, (PCRE2_SPTR)s, n, at, PCRE2_NO_UTF_CHECK, e->md,
                        e->mctx);
    }
    if (r == PCRE2_ERROR_NOMATCH) return 0;
    if (r < 0) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(r, msg, sizeof msg);
        return pie_err_set(PIE_EINVAL, "tokenizer: pre-tokenizer regex failed "
                           "on a %zu-byte piece: %s", n, (char *)msg);
    }
    return 1;
}

/* Splits one piece by the regex re into e->b following behavior. */
static int split_piece(enc_state *e, const pcre2_code *re, int behavior,
                       piece p)
{
    size_t at = 0, gap = 0, carry = 0;   /* carry: MergedWithNext prefix start */
    int have_carry = 0, rc;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
    while (at <= p.len) {
        const char *s = e->buf.p + p.off;   /* buf may move: reload */
        if ((rc = run_match(e, re, s, p.len, at)) <= 0) {
            if (rc < 0) return rc;
            break;
        }
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {                      /* empty match: step one char */
            at = ms + 1;
            while (at < p.len && ((uint8_t)s[at] & 0xc0) == 0x80) at++;
            continue;
        }
        size_t gs = have_carry ? carry : gap;
        have_carry = 0;
        switch (behavior) {
        case SPLIT_ISOLATED:
            rc = pieces_push(&e->b, p.off + gs, ms - gs);
            if (!rc) rc = pieces_push(&e->b, p.off + ms, me - ms);
            break;
        case SPLIT_REMOVED:
            rc = pieces_push(&e->b, p.off + gs, ms - gs);
            break;
        case SPLIT_MERGED_PREV:
            rc = pieces_push(&e->b, p.off + gs, me - gs);
            break;
        default:                             /* SPLIT_MERGED_NEXT */
            rc = pieces_push(&e->b, p.off + gs, ms - gs);
            carry = ms;
            have_carry = 1;
        }
        if (rc) return rc;
        gap = at = me;
    }
    size_t gs = have_carry ? carry : gap;
    return pieces_push(&e->b, p.off + gs, p.len - gs);
}

/* ByteLevel step: optional prefix space per piece, then the GPT-2 regex. */
static int bytelevel_piece(enc_state *e, const tok_pre *x, piece p)
{
    if (x->add_prefix_space && e->buf.p[p.off] != ' ') {
        size_t off = e->buf.n;
        int rc = sink_put(&e->buf, " ", 1);
        if (!rc) rc = sink_put(&e->buf, e->buf.p + p.off, p.len);   /* grows */
        if (rc) return rc;
        p = (piece){ off, p.len + 1 };
    }
    if (x->re) return split_piece(e, x->re, SPLIT_ISOLATED, p);
    return pieces_push(&e->b, p.off, p.len);
}

static int pretokenize(const pie_tokenizer *t, enc_state *e)
{
    for (int i = 0; i < t->n_pre; i++) {
        const tok_pre *x = &t->pre[i];
        e->b.n = 0;
        for (size_t k = 0; k < e->a.n; k++) {
            int rc = x->kind == PRE_SPLIT
                   ? split_piece(e, x->re, x->behavior, e->a.v[k])
                   : bytelevel_piece(e, x, e->a.v[k]);
            if (rc) return rc;
        }
        pieces tmp = e->a;
        e->a = e->b;
        e->b = tmp;
    }
    return 0;
}

/* Normalizes, pre-tokenizes and BPE-encodes one segment between added tokens. */
static int encode_segment(const pie_tokenizer *t, enc_state *e, const char *s,
                          size_t n)
{
    if (n == 0) return 0;
    char *p = (char *)s;
    int own = 0, rc = normalize(t, &p, &n, &own);
    e->buf.n = 0;
    e->a.n = 0;
    if (!rc) rc = sink_put(&e->buf, p, n);
    if (own) free(p);
    if (!rc) rc = pieces_push(&e->a, 0, n);
    if (!rc) rc = pretokenize(t, e);
    for (size_t k = 0; k < e->a.n && !rc; k++)
        rc = pie__tok_bpe_piece(t, e->buf.p + e->a.v[k].off, e->a.v[k].len,
                                &e->ids);
    return rc;
}

/* ---- added tokens ------------------------------------------------------ */

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
           c == '\f';
}

static int is_word(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z') || c == '_' || (uint8_t)c >= 0x80;
}

/* The added token matching at s[i], or NULL; start and end include strips. */
static const tok_added *match_added(const pie_tokenizer *t, const char *s,
                                    size_t n, size_t i, size_t seg,
                                    size_t *start, size_t *end)
{
    uint8_t c = (uint8_t)s[i];
    for (int k = 0; k < t->n_added_by_byte[c]; k++) {
        const tok_added *a = &t->added[t->added_by_byte[c][k]];
        if (a->len > n - i || memcmp(s + i, a->s, a->len)) continue;
        if (a->single_word && ((i > 0 && is_word(s[i - 1])) ||
                               (i + a->len < n && is_word(s[i + a->len]))))
            continue;
        *start = i;
        *end = i + a->len;
        if (a->lstrip) while (*start > seg && is_ws(s[*start - 1])) (*start)--;
        if (a->rstrip) while (*end < n && is_ws(s[*end])) (*end)++;
        return a;
    }
    return NULL;
}

static int encode_text(const pie_tokenizer *t, enc_state *e, const char *s,
                       size_t n)
{
    size_t seg = 0;
    for (size_t i = 0; i < n; i++) {
        if (!t->n_added_by_byte[(uint8_t)s[i]]) continue;
        size_t start, end;
        const tok_added *a = match_added(t, s, n, i, seg, &start, &end);
        if (!a) continue;
        int rc = encode_segment(t, e, s + seg, start - seg);
        if (!rc) rc = pie__tok_ids_push(&e->ids, a->id);
        if (rc) return rc;
        seg = end;
        i = end - 1;
    }
    return encode_segment(t, e, s + seg, n - seg);
}

int pie_tokenizer_encode(const pie_tokenizer *t, const char *text, size_t len,
                         bool add_special, int32_t **ids, size_t *n_ids)
{
    size_t bad;
    if (!t || (!text && len))
        return pie_err_set(PIE_EINVAL, "tokenizer: encode of a NULL argument");
    if (!pie__tok_utf8_valid((const uint8_t *)text, len, &bad))
        return pie_err_set(PIE_EINVAL, "tokenizer: text is not valid UTF-8 "
                           "(byte 0x%02x at offset %zu)", (uint8_t)text[bad], bad);
    enc_state e = { 0 };
    int rc = 0;
    e.md = pcre2_match_data_create(4, NULL);
    if (!e.md) rc = pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    for (int i = 0; add_special && !rc && i < t->n_prefix; i++)
        rc = pie__tok_ids_push(&e.ids, t->prefix[i]);
    if (!rc) rc = encode_text(t, &e, text, len);
    for (int i = 0; add_special && !rc && i < t->n_suffix; i++)
        rc = pie__tok_ids_push(&e.ids, t->suffix[i]);
    if (!rc && !e.ids.v) {                       /* empty: still malloc'ed */
        rc = pie__tok_ids_push(&e.ids, 0);
        e.ids.n = 0;
    }
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_jit_stack_free(e.jstack);
    free(e.buf.p);
    free(e.a.v);
    free(e.b.v);
    if (rc) {
        free(e.ids.v);
        return rc;
    }
    *ids = e.ids.v;
    *n_ids = e.ids.n;
    return 0;
}

/* ---- loading and accessors --------------------------------------------- */

int pie_tokenizer_load_json(const char *json, size_t len, const char *cfg,
                            size_t cfg_len, pie_tokenizer **out)
{
    pie_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    t->unk_id = t->bos_id = t->eos_id = -1;
    int rc = pie__tok_parse(t, json, len, cfg, cfg_len);
    if (rc) {
        pie_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

/* Largest tokenizer.json / tokenizer_config.json read (real ones are a few
 * MB; Llama 3's is 9 MB). */
#define TOKENIZER_FILE_MAX ((size_t)256 << 20)

int pie_tokenizer_load(const char *dir, pie_tokenizer **out)
{
    char path[4096];
    char *json = NULL, *cfg = NULL;
    size_t len = 0, cfg_len = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = pie__file_read(path, TOKENIZER_FILE_MAX, &json, &len);
    if (rc) return rc;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    rc = pie__file_read(path, TOKENIZER_FILE_MAX, &cfg, &cfg_len);
    if (rc == PIE_ENOTFOUND) rc = 0;
    if (!rc) {
        rc = pie_tokenizer_load_json(json, len, cfg, cfg_len, out);
        if (rc) pie_err_wrap(rc, "%s", dir);
    }
    free(json);
    free(cfg);
    return rc;
}

void pie_tokenizer_free(pie_tokenizer *t)
{
    if (!t) return;
    free(t->str); free(t->len); free(t->flags);
    free(t->dec_off); free(t->dec_len); free(t->dec_arena); free(t->arena);
    free(t->vocab_slots);
    pie__tok_pairs_free(&t->merges);
    for (int i = 0; i < t->n_norm; i++) { free(t->norm[i].a); free(t->norm[i].b); }
    free(t->norm);
    for (int i = 0; i < t->n_pre; i++) pcre2_code_free(t->pre[i].re);
    free(t->pre);
    free(t->added);
    for (int b = 0; b < 256; b++) free(t->added_by_byte[b]);
    free(t->dec_from); free(t->dec_to);
    free(t->prefix); free(t->suffix);
    free(t);
}

int32_t pie_tokenizer_vocab_size(const pie_tokenizer *t) { return t->n_ids; }

int32_t pie_tokenizer_token_id(const pie_tokenizer *t, const char *tok)
{
    return tok ? pie__tok_vocab_find(t, tok, strlen(tok)) : -1;
}

const char *pie_tokenizer_id_to_token(const pie_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_ids ? t->str[id] : NULL;
}

bool pie_tokenizer_is_special(const pie_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && (t->flags[id] & TOK_SPECIAL);
}

int32_t pie_tokenizer_bos_id(const pie_tokenizer *t) { return t->bos_id; }
int32_t pie_tokenizer_eos_id(const pie_tokenizer *t) { return t->eos_id; }
