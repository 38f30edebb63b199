/*
 * tok_load.c — turns tokenizer.json (+ tokenizer_config.json) into the
 * tables of tok_internal.h.
 *
 * Order: ids and strings (vocab + added_tokens) into one arena → vocab map →
 * merges (each "a b" or ["a", "b"] must name two vocabulary tokens whose
 * concatenation is also one) → normalizer, pre-tokenizer, decoder and
 * post-processor, each reduced to a small list of steps or flags → special
 * ids from tokenizer_config.json → per-id decoded bytes. Anything the
 * tokenizer cannot honour exactly is refused with PIE_EUNSUPPORTED and the
 * name of the component, rather than silently tokenizing differently.
 */
#define _GNU_SOURCE                      /* memmem */
#include "model/tok_internal.h"
#include "model/tok_json.h"
#include "common/pie_err.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define MAX_IDS (1 << 24)

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+"
    "|\\s+(?!\\S)|\\s+";

static int bad(const char *what)
{
    return pie_err_set(PIE_EFORMAT, "tokenizer.json: %s", what);
}

static const char *jstr(json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

static int jbool(json_t *o, const char *key, int dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* ---- ids, strings, vocab ----------------------------------------------- */

static int check_id(json_t *v, const char *what, int32_t *id)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) >= MAX_IDS) {
        /* a literal nonzero return: callers read *id only when it is 0 */
        pie_err_set(PIE_EFORMAT, "tokenizer.json: %s has a bad id (must be "
                    "an integer in 0..%d)", what, MAX_IDS - 1);
        return PIE_EFORMAT;
    }
    *id = (int32_t)json_integer_value(v);
    return 0;
}

static char *arena_put(pie_tokenizer *t, const char *s, size_t n)
{
    char *d = t->arena + t->arena_len;
    memcpy(d, s, n);
    d[n] = 0;
    t->arena_len += n + 1;
    return d;
}

static int alloc_ids(pie_tokenizer *t, const tok_fast *f, json_t *added)
{
    json_t *v;
    size_t bytes = 0, i;
    int32_t max = -1, id;
    for (i = 0; i < f->n_vocab; i++) {
        if (f->vocab[i].id < 0 || f->vocab[i].id >= MAX_IDS)
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: vocab entry %zu "
                               "has a bad id %d", i, f->vocab[i].id);
        if (f->vocab[i].id > max) max = f->vocab[i].id;
        bytes += f->vocab[i].len + 1;
    }
    json_array_foreach(added, i, v) {
        const char *c = jstr(v, "content");
        if (!json_is_object(v) || !c || !*c)
            return bad("an added_tokens entry lacks a non-empty \"content\"");
        if (check_id(json_object_get(v, "id"), "an added_tokens entry", &id))
            return PIE_EFORMAT;
        if (id > max) max = id;
        bytes += strlen(c) + 1;
    }
    if (max < 0) return bad("the vocabulary is empty");
    t->n_ids = max + 1;
    size_t n = (size_t)t->n_ids;
    t->str = calloc(n, sizeof *t->str);
    t->len = calloc(n, sizeof *t->len);
    t->flags = calloc(n, 1);
    t->dec_off = calloc(n, sizeof *t->dec_off);
    t->dec_len = calloc(n, sizeof *t->dec_len);
    t->arena = malloc(bytes + 1);
    t->arena_cap = bytes + 1;
    if (!t->str || !t->len || !t->flags || !t->dec_off || !t->dec_len ||
        !t->arena)
        return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    return 0;
}

static int load_vocab(pie_tokenizer *t, const tok_fast *f)
{
    for (size_t i = 0; i < f->n_vocab; i++) {
        int32_t id = f->vocab[i].id;
        if (t->flags[id] & TOK_PRESENT)
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: vocab id %d is "
                               "used twice", id);
        t->str[id] = arena_put(t, f->vocab[i].s, f->vocab[i].len);
        t->len[id] = f->vocab[i].len;
        t->flags[id] = TOK_PRESENT;
    }
    return 0;
}

static int load_added(pie_tokenizer *t, json_t *added)
{
    size_t i, n = json_array_size(added);
    json_t *v;
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    json_array_foreach(added, i, v) {
        int32_t id = (int32_t)json_integer_value(json_object_get(v, "id"));
        const char *c = jstr(v, "content");
        size_t cl = strlen(c);
        tok_added *a = &t->added[t->n_added++];
        a->id = id;
        a->len = cl;
        a->lstrip = (uint8_t)jbool(v, "lstrip", 0);
        a->rstrip = (uint8_t)jbool(v, "rstrip", 0);
        a->single_word = (uint8_t)jbool(v, "single_word", 0);
        a->special = (uint8_t)jbool(v, "special", 0);
        if (t->flags[id] & TOK_PRESENT) {        /* also in the vocab */
            a->s = arena_put(t, c, cl);
        } else {
            t->str[id] = a->s = arena_put(t, c, cl);
            t->len[id] = (uint32_t)cl;
        }
        t->flags[id] |= TOK_PRESENT | TOK_ADDED | (a->special ? TOK_SPECIAL : 0);
    }
    return 0;
}

/* Sort key of one added token: first byte, then longest first, then file
 * order (so equal-length tokens keep the order the file lists them in). */
typedef struct { uint8_t byte; size_t len; int32_t idx; } added_key;

static int added_key_cmp(const void *pa, const void *pb)
{
    const added_key *a = pa, *b = pb;
    if (a->byte != b->byte) return a->byte < b->byte ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

/* Index added tokens by first byte, longest first (leftmost-longest match).
 * Indices are int32_t and the sort is qsort: files with tens of thousands
 * of added tokens exist, and a narrower index would wrap to negative. */
static int index_added(pie_tokenizer *t)
{
    if (!t->n_added) return 0;
    added_key *k = malloc((size_t)t->n_added * sizeof *k);
    if (!k) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    for (int32_t i = 0; i < t->n_added; i++)
        k[i] = (added_key){ (uint8_t)t->added[i].s[0], t->added[i].len, i };
    qsort(k, (size_t)t->n_added, sizeof *k, added_key_cmp);
    for (int32_t i = 0, j; i < t->n_added; i = j) {
        uint8_t b = k[i].byte;
        for (j = i; j < t->n_added && k[j].byte == b; j++) {}
        int32_t *l = malloc((size_t)(j - i) * sizeof *l);
        if (!l) {
            free(k);
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        }
        for (int32_t m = i; m < j; m++) l[m - i] = k[m].idx;
        t->added_by_byte[b] = l;
        t->n_added_by_byte[b] = j - i;
    }
    free(k);
    return 0;
}

/* ---- merges ------------------------------------------------------------ */

static int merge_pair(pie_tokenizer *t, const tok_ment *m, size_t rank,
                      char *buf, size_t cap)
{
    const char *a = m->a, *b = m->b;
    size_t an = m->an, bn = m->bn;
    if (!b) {                                    /* "a b" */
        const char *sp = memchr(a, ' ', an);
        if (!sp || memchr(sp + 1, ' ', an - (size_t)(sp + 1 - a)))
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: merge %zu \"%.*s\" "
                               "is not two tokens separated by one space",
                               rank, (int)an, a);
        b = sp + 1;
        bn = an - (size_t)(b - a);
        an = (size_t)(sp - a);
    }
    int32_t ia = pie__tok_vocab_find(t, a, an), ib = pie__tok_vocab_find(t, b, bn);
    if (ia < 0 || ib < 0)
        return pie_err_set(PIE_EFORMAT, "tokenizer.json: merge %zu names token "
                           "\"%.*s\" that is not in the vocab", rank,
                           (int)(ia < 0 ? an : bn), ia < 0 ? a : b);
    if (an + bn > cap)
        return pie_err_set(PIE_EFORMAT, "tokenizer.json: merge %zu is too long",
                           rank);
    memcpy(buf, a, an);
    memcpy(buf + an, b, bn);
    int32_t im = pie__tok_vocab_find(t, buf, an + bn);
    if (im < 0)
        return pie_err_set(PIE_EFORMAT, "tokenizer.json: merge %zu result "
                           "\"%.*s\" is not in the vocab", rank,
                           (int)(an + bn), buf);
    return pie__tok_pairs_put(&t->merges, ia, ib, (uint32_t)rank, im);
}

static int load_merges(pie_tokenizer *t, const tok_fast *f)
{
    if (!f->n_merges) return 0;
    int rc = pie__tok_pairs_init(&t->merges, f->n_merges);
    if (rc) return rc;
    size_t cap = 4096;
    char *buf = malloc(cap);
    if (!buf) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    for (size_t i = 0; i < f->n_merges && !rc; i++)
        rc = merge_pair(t, &f->merges[i], i, buf, cap);
    free(buf);
    return rc;
}

/* Fills f's vocab/merges arrays from a jansson tree (the slow path). */
static int flat_from_json(json_t *vocab, json_t *merges, tok_fast *f)
{
    const char *k;
    json_t *v;
    size_t i = 0;
    f->vocab = malloc((json_object_size(vocab) + 1) * sizeof *f->vocab);
    if (!f->vocab) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    json_object_foreach(vocab, k, v) {
        tok_vent *e = &f->vocab[f->n_vocab++];
        if (check_id(v, "a vocab entry", &e->id)) return PIE_EFORMAT;
        e->s = k;
        e->len = (uint32_t)strlen(k);
    }
    if (!merges || json_is_null(merges)) return 0;
    if (!json_is_array(merges)) return bad("model.merges is not an array");
    f->merges = malloc((json_array_size(merges) + 1) * sizeof *f->merges);
    if (!f->merges) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    json_array_foreach(merges, i, v) {
        tok_ment *m = &f->merges[f->n_merges++];
        json_t *x = json_array_get(v, 0), *y = json_array_get(v, 1);
        if (json_is_string(v)) {
            *m = (tok_ment){ json_string_value(v), NULL,
                             (uint32_t)json_string_length(v), 0 };
        } else if (json_array_size(v) == 2 && json_is_string(x) && json_is_string(y)) {
            *m = (tok_ment){ json_string_value(x), json_string_value(y),
                             (uint32_t)json_string_length(x),
                             (uint32_t)json_string_length(y) };
        } else {
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: merge %zu is "
                               "neither \"a b\" nor [\"a\", \"b\"]", i);
        }
    }
    return 0;
}

/* ---- BPE model options ------------------------------------------------- */

static int load_model(pie_tokenizer *t, json_t *model)
{
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE") != 0)
        return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: model type \"%s\""
                           " is not supported (only BPE)", type);
    const char *pfx = jstr(model, "continuing_subword_prefix");
    const char *sfx = jstr(model, "end_of_word_suffix");
    if ((pfx && *pfx) || (sfx && *sfx))
        return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: BPE "
                           "continuing_subword_prefix/end_of_word_suffix are "
                           "not supported");
    t->fuse_unk = jbool(model, "fuse_unk", 0);
    t->byte_fallback = jbool(model, "byte_fallback", 0);
    t->ignore_merges = jbool(model, "ignore_merges", 0);
    t->unk_id = -1;
    const char *unk = jstr(model, "unk_token");
    if (unk) {
        t->unk_id = pie__tok_vocab_find(t, unk, strlen(unk));
        if (t->unk_id < 0)
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: unk_token \"%s\" "
                               "is not in the vocab", unk);
    }
    for (int b = 0; b < 256; b++) {
        char s[8];
        snprintf(s, sizeof s, "<0x%02X>", b);
        t->byte_fallback_id[b] = pie__tok_vocab_find(t, s, 6);
    }
    return 0;
}

/* ---- normalizer -------------------------------------------------------- */

static int add_norm(pie_tokenizer *t, tok_norm n)
{
    tok_norm *v = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *v);
    if (!v) {
        free(n.a);
        free(n.b);
        return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    }
    t->norm = v;
    t->norm[t->n_norm++] = n;
    return 0;
}

static int load_normalizer(pie_tokenizer *t, json_t *n)
{
    if (!n || json_is_null(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type) return bad("normalizer has no \"type\"");
    static const struct { const char *name; int kind; } simple[] = {
        { "NFC", NORM_NFC }, { "NFD", NORM_NFD }, { "NFKC", NORM_NFKC },
        { "NFKD", NORM_NFKD }, { "Lowercase", NORM_LOWERCASE },
    };
    for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++)
        if (!strcmp(type, simple[i].name))
            return add_norm(t, (tok_norm){ .kind = simple[i].kind });
    if (!strcmp(type, "Sequence")) {
        json_t *l = json_object_get(n, "normalizers"), *v;
        size_t i;
        if (!json_is_array(l)) return bad("normalizer Sequence lacks a list");
        json_array_foreach(l, i, v) {
            int rc = load_normalizer(t, v);
            if (rc) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Prepend")) {
        const char *p = jstr(n, "prepend");
        if (!p) return bad("Prepend normalizer lacks \"prepend\"");
        tok_norm x = { .kind = NORM_PREPEND, .a = strdup(p), .a_len = strlen(p) };
        return x.a ? add_norm(t, x) : pie_err_set(PIE_ENOMEM, "out of memory");
    }
    if (!strcmp(type, "Replace")) {
        const char *p = jstr(json_object_get(n, "pattern"), "String");
        const char *c = jstr(n, "content");
        if (!p || !c || !*p)
            return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: Replace "
                               "normalizer needs a non-empty String pattern "
                               "(Regex patterns are not supported)");
        tok_norm x = { .kind = NORM_REPLACE, .a = strdup(p), .a_len = strlen(p),
                       .b = strdup(c), .b_len = strlen(c) };
        if (!x.a || !x.b) {
            free(x.a);
            free(x.b);
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        }
        return add_norm(t, x);
    }
    return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: normalizer \"%s\" is "
                       "not supported", type);
}

/* ---- pre-tokenizer ----------------------------------------------------- */

static int compile_re(const char *pat, size_t n, uint32_t extra, pcre2_code **out)
{
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, n,
                                   PCRE2_UTF | PCRE2_UCP | extra, &err, &off,
                                   NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return pie_err_set(PIE_EFORMAT, "tokenizer.json: pre-tokenizer regex "
                           "does not compile at offset %zu: %s", (size_t)off,
                           (char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);     /* interpreter if no JIT */
    *out = re;
    return 0;
}

static int add_pre(pie_tokenizer *t, tok_pre p)
{
    tok_pre *v = realloc(t->pre, (size_t)(t->n_pre + 1) * sizeof *v);
    if (!v) {
        pcre2_code_free(p.re);
        return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    }
    t->pre = v;
    t->pre[t->n_pre++] = p;
    return 0;
}

static int load_split(pie_tokenizer *t, json_t *p)
{
    json_t *pat = json_object_get(p, "pattern");
    const char *re = jstr(pat, "Regex"), *lit = jstr(pat, "String");
    const char *beh = jstr(p, "behavior");
    static const char *names[] = { "Isolated", "Removed", "MergedWithPrevious",
                                   "MergedWithNext" };
    tok_pre x = { .kind = PRE_SPLIT, .behavior = -1 };
    for (int i = 0; beh && i < 4; i++)
        if (!strcmp(beh, names[i])) x.behavior = i;
    if ((!re && !lit) || x.behavior < 0 || jbool(p, "invert", 0))
        return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: Split "
                           "pre-tokenizer needs a Regex or String pattern and "
                           "behavior Isolated/Removed/MergedWith*, not inverted");
    int rc = re ? compile_re(re, strlen(re), 0, &x.re)
                : compile_re(lit, strlen(lit), PCRE2_LITERAL, &x.re);
    return rc ? rc : add_pre(t, x);
}

static int load_pretok(pie_tokenizer *t, json_t *p)
{
    if (!p || json_is_null(p)) return 0;
    const char *type = jstr(p, "type");
    if (!type) return bad("pre_tokenizer has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        json_t *l = json_object_get(p, "pretokenizers"), *v;
        size_t i;
        if (!json_is_array(l)) return bad("pre_tokenizer Sequence lacks a list");
        json_array_foreach(l, i, v) {
            int rc = load_pretok(t, v);
            if (rc) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "Split")) return load_split(t, p);
    if (!strcmp(type, "ByteLevel")) {
        tok_pre x = { .kind = PRE_BYTELEVEL,
                      .add_prefix_space = jbool(p, "add_prefix_space", 1) };
        if (jbool(p, "use_regex", 1)) {
            int rc = compile_re(GPT2_RE, sizeof GPT2_RE - 1, 0, &x.re);
            if (rc) return rc;
        }
        t->byte_level = 1;
        return add_pre(t, x);
    }
    return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: pre-tokenizer \"%s\""
                       " is not supported", type);
}

/* ---- decoder ----------------------------------------------------------- */

static int load_decoder(pie_tokenizer *t, json_t *d)
{
    if (!d || json_is_null(d)) {
        t->dec_join_space = 1;
        return 0;
    }
    const char *type = jstr(d, "type");
    if (!type) return bad("decoder has no \"type\"");
    if (!strcmp(type, "ByteLevel")) {
        t->dec_kind = DEC_BYTELEVEL;
        return 0;
    }
    if (t->dec_kind == DEC_NONE) t->dec_kind = DEC_CHAIN;
    if (!strcmp(type, "Sequence")) {
        json_t *l = json_object_get(d, "decoders"), *v;
        size_t i;
        if (!json_is_array(l)) return bad("decoder Sequence lacks a list");
        json_array_foreach(l, i, v) {
            int rc = load_decoder(t, v);
            if (rc) return rc;
        }
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) { t->dec_byte_fallback = 1; return 0; }
    if (!strcmp(type, "Fuse")) return 0;       /* we always concatenate */
    if (!strcmp(type, "Strip")) {
        const char *c = jstr(d, "content");
        json_t *stop = json_object_get(d, "stop");
        if (!c || strcmp(c, " ") || (stop && json_integer_value(stop) != 0))
            return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: Strip decoder"
                               " supports only content \" \" and stop 0");
        t->dec_strip = (int)json_integer_value(json_object_get(d, "start"));
        if (t->dec_strip < 0 || t->dec_strip > 1)
            return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: Strip decoder"
                               " supports only start 0 or 1");
        return 0;
    }
    if (!strcmp(type, "Replace")) {
        const char *p = jstr(json_object_get(d, "pattern"), "String");
        const char *c = jstr(d, "content");
        if (!p || !*p || !c || t->dec_from)
            return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: Replace "
                               "decoder needs one non-empty String pattern");
        t->dec_from = strdup(p);
        t->dec_to = strdup(c);
        if (!t->dec_from || !t->dec_to)
            return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        t->dec_from_len = strlen(p);
        t->dec_to_len = strlen(c);
        return 0;
    }
    return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: decoder \"%s\" is not"
                       " supported", type);
}

/* ---- post-processor ---------------------------------------------------- */

static int push_ids(int32_t **v, int *n, const int32_t *ids, int k)
{
    int32_t *p = realloc(*v, (size_t)(*n + k + 1) * sizeof *p);
    if (!p) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    memcpy(p + *n, ids, (size_t)k * sizeof *p);
    *v = p;
    *n += k;
    return 0;
}

/* A post-processor id must name a token, or encode would return ids that
 * decode refuses. */
static int post_id_check(const pie_tokenizer *t, const char *what, int32_t id)
{
    if (id < t->n_ids && (t->flags[id] & TOK_PRESENT)) return 0;
    pie_err_set(PIE_EFORMAT, "tokenizer.json: %s id %d is not a token of the "
                "vocab (%d ids)", what, id, t->n_ids);
    return PIE_EFORMAT;
}

static int template_special(pie_tokenizer *t, json_t *specials, const char *name,
                            int after)
{
    json_t *ids = json_object_get(json_object_get(specials, name), "ids"), *v;
    size_t i;
    if (!json_is_array(ids))
        return pie_err_set(PIE_EFORMAT, "tokenizer.json: TemplateProcessing "
                           "special token \"%s\" has no ids", name);
    json_array_foreach(ids, i, v) {
        int32_t id;
        if (check_id(v, "a TemplateProcessing special token", &id) ||
            post_id_check(t, "TemplateProcessing", id))
            return PIE_EFORMAT;
        int rc = after ? push_ids(&t->suffix, &t->n_suffix, &id, 1)
                       : push_ids(&t->prefix, &t->n_prefix, &id, 1);
        if (rc) return rc;
    }
    return 0;
}

static int load_template(pie_tokenizer *t, json_t *p)
{
    json_t *single = json_object_get(p, "single"), *v;
    json_t *specials = json_object_get(p, "special_tokens");
    size_t i;
    int after = 0;
    if (!json_is_array(single))
        return bad("TemplateProcessing lacks a \"single\" template");
    json_array_foreach(single, i, v) {
        json_t *sp = json_object_get(v, "SpecialToken");
        if (json_object_get(v, "Sequence")) {
            after = 1;
        } else if (sp && jstr(sp, "id")) {
            int rc = template_special(t, specials, jstr(sp, "id"), after);
            if (rc) return rc;
        } else {
            return bad("TemplateProcessing item is neither SpecialToken nor "
                       "Sequence");
        }
    }
    return 0;
}

/* Bert/Roberta processing: [cls] A [sep], each given as ["token", id]. */
static int load_cls_sep(pie_tokenizer *t, json_t *p)
{
    json_t *cls = json_array_get(json_object_get(p, "cls"), 1);
    json_t *sep = json_array_get(json_object_get(p, "sep"), 1);
    int32_t a, b;
    if (check_id(cls, "post_processor cls", &a) ||
        check_id(sep, "post_processor sep", &b) ||
        post_id_check(t, "post_processor cls", a) ||
        post_id_check(t, "post_processor sep", b))
        return PIE_EFORMAT;
    int rc = push_ids(&t->prefix, &t->n_prefix, &a, 1);
    return rc ? rc : push_ids(&t->suffix, &t->n_suffix, &b, 1);
}

static int load_postproc(pie_tokenizer *t, json_t *p, int *has_template)
{
    if (!p || json_is_null(p)) return 0;
    const char *type = jstr(p, "type");
    if (!type) return bad("post_processor has no \"type\"");
    if (!strcmp(type, "ByteLevel")) return 0;   /* offsets only */
    if (!strcmp(type, "TemplateProcessing")) {
        *has_template = 1;
        return load_template(t, p);
    }
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        *has_template = 1;
        return load_cls_sep(t, p);
    }
    if (!strcmp(type, "Sequence")) {
        json_t *l = json_object_get(p, "processors"), *v;
        size_t i;
        if (!json_is_array(l)) return bad("post_processor Sequence lacks a list");
        json_array_foreach(l, i, v) {
            int rc = load_postproc(t, v, has_template);
            if (rc) return rc;
        }
        return 0;
    }
    return pie_err_set(PIE_EUNSUPPORTED, "tokenizer.json: post_processor \"%s\""
                       " is not supported", type);
}

/* ---- tokenizer_config.json --------------------------------------------- */

static int32_t config_token(pie_tokenizer *t, json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    const char *s = json_is_object(v) ? jstr(v, "content") : json_string_value(v);
    return s ? pie__tok_vocab_find(t, s, strlen(s)) : -1;
}

/*
 * Hugging Face's default add_special_tokens=True: the post-processor's
 * template, plus tokenizer_config.json's add_bos_token / add_eos_token.
 * When add_bos_token is absent, Llama-family configs (LlamaTokenizer[Fast],
 * PreTrainedTokenizerFast as shipped with Llama 3) with a bos_token and no
 * template get BOS, as Meta's Llama 3 tokenizer does; Qwen (no bos) gets none.
 */
static int load_config(pie_tokenizer *t, json_t *cfg, int has_template)
{
    t->bos_id = config_token(t, cfg, "bos_token");
    t->eos_id = config_token(t, cfg, "eos_token");
    json_t *add_bos = json_object_get(cfg, "add_bos_token");
    const char *cls = jstr(cfg, "tokenizer_class");
    int want_bos = json_is_boolean(add_bos) ? json_is_true(add_bos)
                 : !has_template && cls && (!strcmp(cls, "LlamaTokenizerFast") ||
                                            !strcmp(cls, "LlamaTokenizer") ||
                                            !strcmp(cls, "PreTrainedTokenizerFast"));
    if (want_bos && t->bos_id >= 0 &&
        !(t->n_prefix > 0 && t->prefix[0] == t->bos_id)) {
        int32_t *p = malloc((size_t)(t->n_prefix + 1) * sizeof *p);
        if (!p) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
        p[0] = t->bos_id;
        if (t->n_prefix) memcpy(p + 1, t->prefix, (size_t)t->n_prefix * sizeof *p);
        free(t->prefix);
        t->prefix = p;
        t->n_prefix++;
    }
    if (jbool(cfg, "add_eos_token", 0) && t->eos_id >= 0 &&
        !(t->n_suffix > 0 && t->suffix[t->n_suffix - 1] == t->eos_id))
        return push_ids(&t->suffix, &t->n_suffix, &t->eos_id, 1);
    return 0;
}

/* ---- decoded bytes per id ---------------------------------------------- */

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Bytes the decoder yields for one token string; returns the length. */
static size_t decode_token(const pie_tokenizer *t, const int16_t *cp_to_byte,
                           const char *s, size_t n, char *out)
{
    if (t->dec_kind == DEC_BYTELEVEL) {
        size_t k = 0;
        for (size_t i = 0; i < n;) {
            uint32_t cp = (uint8_t)s[i];
            size_t cl = 1;
            if (cp >= 0xc0 && cp < 0xe0 && i + 1 < n) {
                cp = (cp & 0x1f) << 6 | ((uint8_t)s[i + 1] & 0x3f);
                cl = 2;
            } else if (cp >= 0x80) {
                cp = UINT32_MAX;
            }
            if (cp > 0x143 || cp_to_byte[cp] < 0) {   /* not the alphabet */
                memcpy(out, s, n);
                return n;
            }
            out[k++] = (char)cp_to_byte[cp];
            i += cl;
        }
        return k;
    }
    if (t->dec_byte_fallback && n == 6 && !memcmp(s, "<0x", 3) && s[5] == '>' &&
        hexval(s[3]) >= 0 && hexval(s[4]) >= 0) {
        out[0] = (char)(hexval(s[3]) << 4 | hexval(s[4]));
        return 1;
    }
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (t->dec_from && n - i >= t->dec_from_len &&
            !memcmp(s + i, t->dec_from, t->dec_from_len)) {
            memcpy(out + k, t->dec_to, t->dec_to_len);
            k += t->dec_to_len;
            i += t->dec_from_len;
        } else {
            out[k++] = s[i++];
        }
    }
    return k;
}

/* Upper bound of decode_token's output for s: exact for the Replace
 * decoder, which is the only step that can make a token longer. */
static size_t decoded_bound(const pie_tokenizer *t, const char *s, size_t n)
{
    if (!t->dec_from || t->dec_to_len <= t->dec_from_len) return n;
    size_t hits = 0;
    for (const char *p = s, *end = s + n;
         (p = memmem(p, (size_t)(end - p), t->dec_from, t->dec_from_len));
         p += t->dec_from_len)
        hits++;
    return n + hits * (t->dec_to_len - t->dec_from_len);
}

/*
 * Sizes dec_arena exactly enough for every present token. A Replace decoder
 * with a long content multiplies, so a small file could ask for gigabytes
 * (and dec_off is 32 bits): the expansion is capped at DEC_GROW_MAX bytes
 * beyond the raw strings, and the total at UINT32_MAX.
 */
#define DEC_GROW_MAX ((size_t)256 << 20)

static int decoded_size(const pie_tokenizer *t, size_t *out)
{
    size_t total = 0, limit = t->arena_len + DEC_GROW_MAX;
    if (limit > UINT32_MAX) limit = UINT32_MAX;
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!(t->flags[id] & TOK_PRESENT)) continue;
        size_t n = decoded_bound(t, t->str[id], t->len[id]);
        if (n > limit - total)
            return pie_err_set(PIE_EFORMAT, "tokenizer.json: the decoded "
                               "vocabulary would take more than %zu MiB (at "
                               "token %d); a Replace decoder with a long "
                               "\"content\" repeats it for every match",
                               limit >> 20, id);
        total += n;
    }
    *out = total;
    return 0;
}

static int build_decoded(pie_tokenizer *t)
{
    int16_t cp_to_byte[0x144];
    memset(cp_to_byte, 0xff, sizeof cp_to_byte);
    for (int b = 0; b < 256; b++) cp_to_byte[pie__tok_byte_to_cp[b]] = (int16_t)b;
    size_t cap = 0, k = 0;
    int rc = decoded_size(t, &cap);
    if (rc) return rc;
    t->dec_arena = malloc(cap + 16);
    if (!t->dec_arena) return pie_err_set(PIE_ENOMEM, "tokenizer: out of memory");
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!(t->flags[id] & TOK_PRESENT)) continue;
        t->dec_off[id] = (uint32_t)k;
        t->dec_len[id] = (uint32_t)decode_token(t, cp_to_byte, t->str[id],
                                                t->len[id], t->dec_arena + k);
        k += t->dec_len[id];
    }
    return 0;
}

static void byte_ids(pie_tokenizer *t)
{
    for (int b = 0; b < 256; b++) {
        uint16_t cp = pie__tok_byte_to_cp[b];
        char s[2];
        size_t n = 1;
        if (cp < 0x80) s[0] = (char)cp;
        else { s[0] = (char)(0xc0 | cp >> 6); s[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
        t->byte_id[b] = pie__tok_vocab_find(t, s, n);
    }
}

/* ---- entry ------------------------------------------------------------- */

static int parse_root(pie_tokenizer *t, json_t *root, json_t *cfg, tok_fast *f,
                      int fast)
{
    if (!json_is_object(root)) return bad("top level is not a JSON object");
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return bad("missing \"model\" object");
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE"))
        return load_model(t, model);          /* reports the unsupported type */
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return bad("model.vocab is missing or not an object");
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added) && !json_is_null(added))
        return bad("added_tokens is not an array");
    int has_template = 0, rc;
    if ((!fast && (rc = flat_from_json(vocab, json_object_get(model, "merges"), f))) ||
        (rc = alloc_ids(t, f, added)) || (rc = load_vocab(t, f)) ||
        (rc = load_added(t, added)) || (rc = pie__tok_vocab_build(t)) ||
        (rc = load_model(t, model)) || (rc = load_merges(t, f)) ||
        (rc = load_normalizer(t, json_object_get(root, "normalizer"))) ||
        (rc = load_pretok(t, json_object_get(root, "pre_tokenizer"))) ||
        (rc = load_decoder(t, json_object_get(root, "decoder"))) ||
        (rc = load_postproc(t, json_object_get(root, "post_processor"),
                            &has_template)) ||
        (rc = load_config(t, cfg, has_template)) || (rc = build_decoded(t)) ||
        (rc = index_added(t)))
        return rc;
    byte_ids(t);
    return 0;
}

int pie__tok_parse(pie_tokenizer *t, const char *json, size_t len,
                   const char *cfg_text, size_t cfg_len)
{
    json_error_t e;
    json_t *cfg = NULL;
    if (cfg_text) {
        cfg = json_loadb(cfg_text, cfg_len, JSON_DECODE_INT_AS_REAL, &e);
        if (!json_is_object(cfg)) {
            json_decref(cfg);
            return pie_err_set(PIE_EFORMAT, "tokenizer_config.json: %s at line "
                               "%d column %d", cfg ? "not a JSON object" :
                               e.text, e.line, e.column);
        }
    }
    tok_fast f;
    int fast = pie__tok_fast_scan(json, len, &f) == 0;
    json_t *root = fast ? json_loadb(f.rest, f.rest_len, 0, &e)
                        : json_loadb(json, len, 0, &e);
    int rc;
    if (!root)
        rc = pie_err_set(PIE_EFORMAT, "tokenizer.json: invalid JSON at line "
                         "%d column %d: %s", e.line, e.column, e.text);
    else
        rc = parse_root(t, root, cfg, &f, fast);
    json_decref(root);
    json_decref(cfg);
    if (fast) {
        pie__tok_fast_free(&f);
    } else {
        free(f.vocab);
        free(f.merges);
    }
    return rc;
}
