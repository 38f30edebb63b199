/*
 * tok_json.c — a fast path for the two big parts of tokenizer.json.
 *
 * A Llama 3 / Qwen tokenizer.json is ~10 MB, almost all of it model.vocab
 * (~150k "token": id pairs) and model.merges (~150k–280k pairs). Building a
 * jansson tree of those costs hundreds of milliseconds in small allocations,
 * at every model load. This scanner finds the two values, reads them
 * straight into flat arrays (strings unescaped into one scratch buffer), and
 * hands jansson a copy of the document in which they are replaced by {} and
 * [] — so everything else is still parsed and validated by jansson.
 *
 * The fast path is only an optimization: whenever the document is not in
 * the expected shape (a syntax error, a non-integer id, an unusual merge
 * entry, duplicate keys...), pie__tok_fast_scan returns -1 and the loader
 * parses the whole document with jansson, which reports errors precisely.
 */
#include "model/tok_json.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *p, *end;
    char       *out;                     /* scratch write position            */
} scan;

static void ws(scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' ||
                             *s->p == '\t'))
        s->p++;
}

static int lit(scan *s, char c)
{
    ws(s);
    if (s->p < s->end && *s->p == c) { s->p++; return 1; }
    return 0;
}

static int hex4(const char *p, uint32_t *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        *v = *v << 4 | (uint32_t)d;
    }
    return 1;
}

static char *put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) { *o++ = (char)cp; }
    else if (cp < 0x800) { *o++ = (char)(0xc0 | cp >> 6); *o++ = (char)(0x80 | (cp & 0x3f)); }
    else if (cp < 0x10000) {
        *o++ = (char)(0xe0 | cp >> 12); *o++ = (char)(0x80 | (cp >> 6 & 0x3f));
        *o++ = (char)(0x80 | (cp & 0x3f));
    } else {
        *o++ = (char)(0xf0 | cp >> 18); *o++ = (char)(0x80 | (cp >> 12 & 0x3f));
        *o++ = (char)(0x80 | (cp >> 6 & 0x3f)); *o++ = (char)(0x80 | (cp & 0x3f));
    }
    return o;
}

/* Reads a JSON string into scratch; str and len give the unescaped text.
 * Escapes never expand (\uXXXX ≤ 6 bytes → ≤ 4 bytes), so scratch sized
 * like the input always suffices. Rejects NUL and raw control bytes. */
static int string(scan *s, const char **str, uint32_t *len)
{
    if (!lit(s, '"')) return 0;
    char *start = s->out, *o = s->out;
    for (;;) {
        if (s->p >= s->end) return 0;
        char c = *s->p++;
        if (c == '"') break;
        if ((uint8_t)c < 0x20) return 0;
        if (c != '\\') { *o++ = c; continue; }
        if (s->p >= s->end) return 0;
        c = *s->p++;
        switch (c) {
        case '"': case '\\': case '/': *o++ = c; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (s->end - s->p < 4 || !hex4(s->p, &cp)) return 0;
            s->p += 4;
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u' ||
                    !hex4(s->p + 2, &lo) || lo < 0xdc00 || lo > 0xdfff)
                    return 0;
                s->p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if ((cp >= 0xdc00 && cp < 0xe000) || cp == 0) {
                return 0;
            }
            o = put_utf8(o, cp);
            break;
        }
        default: return 0;
        }
    }
    *str = start;
    *len = (uint32_t)(o - start);
    s->out = o;
    return 1;
}

static int integer(scan *s, int32_t *v)
{
    ws(s);
    int64_t x = 0;
    const char *b = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9' && s->p - b < 9)
        x = x * 10 + (*s->p++ - '0');
    if (s->p == b || (s->p < s->end && ((*s->p >= '0' && *s->p <= '9') ||
                                        *s->p == '.' || *s->p == 'e' || *s->p == 'E')))
        return 0;                        /* empty, too long, or not an int */
    *v = (int32_t)x;
    return 1;
}

/* Skips any JSON value (brackets balanced, strings honoured). */
static int skip_value(scan *s)
{
    ws(s);
    int depth = 0;
    do {
        if (s->p >= s->end) return 0;
        char c = *s->p++;
        if (c == '"') {
            while (s->p < s->end && *s->p != '"') s->p += *s->p == '\\' ? 2 : 1;
            if (s->p >= s->end) return 0;
            s->p++;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (--depth < 0) return 0;
        } else if (depth == 0) {         /* number / literal */
            while (s->p < s->end && !strchr(",}] \t\r\n", *s->p)) s->p++;
        }
    } while (depth > 0);
    return 1;
}

static int grow(void **v, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap) return 1;
    size_t c = *cap ? *cap * 2 : 1024;
    void *p = realloc(*v, c * elem);
    if (!p) return 0;
    *v = p;
    *cap = c;
    return 1;
}

static int vocab(scan *s, tok_fast *f)
{
    size_t cap = 0;
    if (!lit(s, '{')) return 0;
    if (lit(s, '}')) return 1;
    do {
        if (!grow((void **)&f->vocab, &cap, f->n_vocab, sizeof *f->vocab)) return 0;
        tok_vent *e = &f->vocab[f->n_vocab++];
        if (!string(s, &e->s, &e->len) || !lit(s, ':') || !integer(s, &e->id))
            return 0;
    } while (lit(s, ','));
    return lit(s, '}');
}

static int merges(scan *s, tok_fast *f)
{
    size_t cap = 0;
    if (!lit(s, '[')) return 0;
    if (lit(s, ']')) return 1;
    do {
        if (!grow((void **)&f->merges, &cap, f->n_merges, sizeof *f->merges)) return 0;
        tok_ment *m = &f->merges[f->n_merges++];
        m->b = NULL;
        m->bn = 0;
        if (lit(s, '[')) {
            if (!string(s, &m->a, &m->an) || !lit(s, ',') ||
                !string(s, &m->b, &m->bn) || !lit(s, ']'))
                return 0;
        } else if (!string(s, &m->a, &m->an)) {
            return 0;
        }
    } while (lit(s, ','));
    return lit(s, ']');
}

/* Walks the "model" object, reading vocab and merges, recording spans. */
static int model(scan *s, tok_fast *f, const char *span[4])
{
    if (!lit(s, '{')) return 0;
    if (lit(s, '}')) return 1;
    do {
        const char *k;
        uint32_t kl;
        char *mark = s->out;
        if (!string(s, &k, &kl) || !lit(s, ':')) return 0;
        s->out = mark;                   /* keys need no scratch */
        ws(s);
        const char *b = s->p;
        if (kl == 5 && !memcmp(k, "vocab", 5)) {
            if (span[0] || !vocab(s, f)) return 0;
            span[0] = b; span[1] = s->p;
        } else if (kl == 6 && !memcmp(k, "merges", 6)) {
            if (span[2] || !merges(s, f)) return 0;
            span[2] = b; span[3] = s->p;
            f->has_merges = 1;
        } else if (!skip_value(s)) {
            return 0;
        }
    } while (lit(s, ','));
    return lit(s, '}');
}

static int top(scan *s, tok_fast *f, const char *span[4])
{
    int seen = 0;
    if (!lit(s, '{')) return 0;
    if (lit(s, '}')) return 0;
    do {
        const char *k;
        uint32_t kl;
        char *mark = s->out;
        if (!string(s, &k, &kl) || !lit(s, ':')) return 0;
        s->out = mark;
        if (kl == 5 && !memcmp(k, "model", 5)) {
            if (seen++ || !model(s, f, span)) return 0;
        } else if (!skip_value(s)) {
            return 0;
        }
    } while (lit(s, ','));
    return lit(s, '}') && seen && span[0];
}

/* Copies the document with the vocab value → {} and merges value → []. */
static int splice(const char *json, size_t len, const char *span[4], tok_fast *f)
{
    f->rest = malloc(len + 8);
    if (!f->rest) return 0;
    const char *a0 = span[0], *a1 = span[1], *b0 = span[2], *b1 = span[3];
    const char *ra = "{}", *rb = "[]";
    if (b0 && b0 < a0) {                 /* merges come first */
        const char *t0 = a0, *t1 = a1;
        a0 = b0; a1 = b1; b0 = t0; b1 = t1;
        ra = "[]"; rb = "{}";
    }
    char *o = f->rest;
    memcpy(o, json, (size_t)(a0 - json)); o += a0 - json;
    memcpy(o, ra, 2); o += 2;
    const char *tail = a1;
    if (b0) {
        memcpy(o, a1, (size_t)(b0 - a1)); o += b0 - a1;
        memcpy(o, rb, 2); o += 2;
        tail = b1;
    }
    memcpy(o, tail, (size_t)(json + len - tail)); o += json + len - tail;
    f->rest_len = (size_t)(o - f->rest);
    return 1;
}

int pie__tok_fast_scan(const char *json, size_t len, tok_fast *f)
{
    memset(f, 0, sizeof *f);
    f->scratch = malloc(len + 1);
    if (!f->scratch) return -1;
    scan s = { json, json + len, f->scratch };
    const char *span[4] = { 0 };
    if (!top(&s, f, span) || (ws(&s), s.p != s.end) || !splice(json, len, span, f)) {
        pie__tok_fast_free(f);
        return -1;
    }
    return 0;
}

void pie__tok_fast_free(tok_fast *f)
{
    free(f->vocab);
    free(f->merges);
    free(f->scratch);
    free(f->rest);
    memset(f, 0, sizeof *f);
}
