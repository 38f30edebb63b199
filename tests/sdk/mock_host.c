/*
 * mock_host.c — a deterministic stand-in for pie's host functions, so the
 * SDK's bookkeeping (pages, fills, chains, cancels, forks, exports) can be
 * tested natively and fast, without a model or the wasm runtime.
 *
 * The "model": vocabulary = byte values 0..127, token 0 is EOS, 1 is BOS;
 * text encodes byte for byte. KV pages hold (token, position) per slot. The
 * logits of a token are a hash of every (token, position) it attends to, in
 * slot order, so a wrong page list, fill or position changes the output.
 * Forwards are LAZY: a future runs when it is waited on, read, or needed by
 * a later chained forward, so a cancelled queued step never writes KV —
 * the case the SDK's rollback must get right.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mock_host.h"

mock_state mock;

static mock_fwd *fwd_of(int32_t h)
{
    if (h <= 0 || h > MOCK_MAX_FWD || !mock.fwd[h - 1].used) {
        fprintf(stderr, "mock: bad forward/future handle %d\n", h);
        exit(1);
    }
    return &mock.fwd[h - 1];
}

static mock_page *page_of(int32_t h)
{
    if (h <= 0 || h > MOCK_MAX_PAGES || !mock.page[h - 1].used) return NULL;
    return &mock.page[h - 1];
}

uint32_t mock_hash(const int32_t *tok, const int32_t *pos, int n)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) {
        h = (h ^ (uint32_t)tok[i]) * 16777619u;
        h = (h ^ (uint32_t)pos[i]) * 16777619u;
    }
    return h;
}

int32_t mock_next(uint32_t h, int kind, uint64_t seed)
{
    if (kind == PIE_SAMPLER_RANDOM) h ^= (uint32_t)(seed * 2654435761u);
    if (mock.eos_every && h % (uint32_t)mock.eos_every == 0) return 0;
    return 'a' + (int32_t)(h % 26);
}

int32_t pie_model_open(const char *name, uint32_t len)
{
    mock.models_open++;
    return 7;
}
int32_t pie_model_close(int32_t m)
{
    mock.models_open--;
    return 0;
}
int32_t pie_model_name(int32_t m, char *buf, uint32_t cap)
{
    memcpy(buf, "mock", cap < 4 ? cap : 4);
    return 4;
}
int32_t pie_model_vocab_size(int32_t m) { return mock.bad_model ? 0 : 128; }
int32_t pie_model_page_size(int32_t m) { return MOCK_PS; }
int32_t pie_model_bos_id(int32_t m) { return 1; }
int32_t pie_model_eos_ids(int32_t m, int32_t *ids, uint32_t cap)
{
    if (cap) ids[0] = 0;
    return 1;
}
int32_t pie_model_token_id(int32_t m, const char *t, uint32_t len)
{
    return PIE_ENOTFOUND;
}
int32_t pie_model_is_special(int32_t m, int32_t id) { return id < 2; }
int32_t pie_tokenize(int32_t m, const char *text, uint32_t len,
                     int32_t add_special, int32_t *ids, uint32_t cap)
{
    uint32_t n = 0;
    if (add_special && n < cap) ids[n] = 1;
    if (add_special) n++;
    for (uint32_t i = 0; i < len; i++, n++)
        if (n < cap) ids[n] = (unsigned char)text[i] & 127;
    return (int32_t)n;
}
int32_t pie_detokenize(int32_t m, const int32_t *ids, uint32_t n,
                       int32_t skip_special, char *buf, uint32_t cap)
{
    if (++mock.detok_calls == mock.fail_detok_at) return PIE_EINVAL;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (skip_special && ids[i] < 2) continue;
        if (k < cap) buf[k] = (char)ids[i];
        k++;
    }
    return (int32_t)k;
}

int32_t pie_kv_alloc(int32_t m, uint32_t n, int32_t *pages)
{
    uint32_t got = 0;
    if (++mock.alloc_calls == mock.fail_alloc_at)
        return mock.fail_alloc_rc ? mock.fail_alloc_rc : PIE_EBUSY;
    for (int i = 0; i < MOCK_MAX_PAGES && got < n; i++)
        if (!mock.page[i].used) {
            memset(&mock.page[i], 0, sizeof mock.page[i]);
            mock.page[i].used = 1;
            mock.page[i].refs = 1;
            pages[got++] = i + 1;
        }
    if (got < n) {
        for (uint32_t i = 0; i < got; i++) mock.page[pages[i] - 1].used = 0;
        return PIE_EBUSY;
    }
    mock.pages_live += (int)n;
    mock.allocs += (int)n;
    return 0;
}

static void page_drop(mock_page *p)
{
    if (--p->refs == 0) {
        p->used = 0;
        mock.pages_live--;
    }
}

int32_t pie_kv_free(int32_t m, const int32_t *pages, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        mock_page *p = page_of(pages[i]);
        if (!p) {
            fprintf(stderr, "mock: kv_free of bad page %d\n", pages[i]);
            exit(1);
        }
        page_drop(p);
    }
    return 0;
}

/* Runs every pending forward (copies are ordered after them). */
static void run_all(void)
{
    for (int i = 0; i < MOCK_MAX_FWD; i++)
        if (mock.fwd[i].used && mock.fwd[i].submitted && !mock.fwd[i].done)
            mock_run(i + 1);
}

int32_t pie_kv_copy(int32_t m, int32_t src, uint32_t so, int32_t dst,
                    uint32_t d_o, uint32_t n)
{
    run_all();
    mock_page *s = page_of(src), *d = page_of(dst);
    if (!s || !d || d->ro || so + n > MOCK_PS || d_o + n > MOCK_PS)
        return PIE_EINVAL;
    memcpy(d->tok + d_o, s->tok + so, n * sizeof(int32_t));
    memcpy(d->pos + d_o, s->pos + so, n * sizeof(int32_t));
    mock.copies++;
    return 0;
}

int32_t pie_kv_export(int32_t m, const char *name, uint32_t len,
                      const int32_t *pages, uint32_t n)
{
    run_all();
    mock_export *e = &mock.exp[mock.n_exp++];
    snprintf(e->name, sizeof e->name, "%.*s", (int)len, name);
    e->n = (int)n;
    for (uint32_t i = 0; i < n; i++) {
        mock_page *p = page_of(pages[i]);
        if (!p) return PIE_EINVAL;
        p->ro = 1;
        p->refs++;
        e->pages[i] = pages[i];
    }
    return 0;
}

static mock_export *exp_find(const char *name, uint32_t len)
{
    for (int i = 0; i < mock.n_exp; i++)
        if (mock.exp[i].n >= 0 && strlen(mock.exp[i].name) == len &&
            !memcmp(mock.exp[i].name, name, len))
            return &mock.exp[i];
    return NULL;
}

/* Imported handles are the same physical page with one more reference
 * (the mock's handles are physical). */
int32_t pie_kv_import(int32_t m, const char *name, uint32_t len,
                      int32_t *pages, uint32_t cap)
{
    mock_export *e = exp_find(name, len);
    if (!e) return PIE_ENOTFOUND;
    if (cap < (uint32_t)e->n) return e->n;
    for (int i = 0; i < e->n; i++) {
        pages[i] = e->pages[i];
        mock.page[e->pages[i] - 1].refs++;
    }
    return e->n;
}

int32_t pie_kv_unexport(int32_t m, const char *name, uint32_t len)
{
    mock_export *e = exp_find(name, len);
    if (!e) return PIE_ENOTFOUND;
    for (int i = 0; i < e->n; i++) page_drop(&mock.page[e->pages[i] - 1]);
    e->n = -1;
    return 0;
}

int32_t pie_forward_new(int32_t m)
{
    for (int i = 0; i < MOCK_MAX_FWD; i++)
        if (!mock.fwd[i].used) {
            memset(&mock.fwd[i], 0, sizeof mock.fwd[i]);
            mock.fwd[i].used = 1;
            return i + 1;
        }
    return PIE_ELIMIT;
}

int32_t pie_forward_tokens(int32_t f, const int32_t *ids, const int32_t *pos,
                           uint32_t n)
{
    mock_fwd *w = fwd_of(f);
    for (uint32_t i = 0; i < n; i++) {
        w->tok[w->n] = ids[i];
        w->pos[w->n] = pos[i];
        w->from[w->n++] = 0;
    }
    return 0;
}

int32_t pie_forward_token_from(int32_t f, int32_t src, uint32_t row,
                               int32_t pos)
{
    mock_fwd *w = fwd_of(f);
    fwd_of(src);
    w->tok[w->n] = -1;
    w->pos[w->n] = pos;
    w->from[w->n++] = src;
    mock.chained++;
    return 0;
}

int32_t pie_forward_pages(int32_t f, const int32_t *pages, uint32_t n,
                          uint32_t last)
{
    mock_fwd *w = fwd_of(f);
    memcpy(w->pages, pages, n * sizeof(int32_t));
    w->n_pages = (int)n;
    w->last = (int)last;
    return 0;
}

int32_t pie_forward_output(int32_t f, uint32_t idx, int32_t kind, float t,
                           int32_t top_k, float top_p, float min_p,
                           uint64_t seed)
{
    mock_fwd *w = fwd_of(f);
    w->has_out = 1;
    w->out_idx = (int)idx;
    w->kind = t > 0 || kind != PIE_SAMPLER_RANDOM ? kind : PIE_SAMPLER_GREEDY;
    w->top_k = top_k;
    w->seed = seed;
    return 0;
}

int32_t pie_forward_submit(int32_t f)
{
    mock_fwd *w = fwd_of(f);
    w->submitted = 1;
    mock.submits++;
    if (mock.eager) mock_run(f);
    return f;
}

/* Executes forward h (and what it chains from) if not yet done. */
void mock_run(int32_t h)
{
    mock_fwd *w = fwd_of(h);
    if (w->done) return;
    w->done = 1;
    for (int i = 0; i < w->n; i++)
        if (w->from[i]) {
            mock_fwd *s = &mock.fwd[w->from[i] - 1];
            if (s->used) mock_run(w->from[i]);
            if (!s->used || s->status < 0) {
                w->status = PIE_ECANCELED;
                return;
            }
            w->tok[i] = s->out_tok;
        }
    int kv_len = (w->n_pages - 1) * MOCK_PS + w->last;
    if (w->n_pages < 1 || w->last < 1 || w->last > MOCK_PS || kv_len < w->n) {
        fprintf(stderr, "mock: bad pages (n %d, last %d, tokens %d)\n",
                w->n_pages, w->last, w->n);
        exit(1);
    }
    for (int i = 0; i < w->n; i++) {
        int s = kv_len - w->n + i;
        mock_page *p = page_of(w->pages[s / MOCK_PS]);
        if (!p || p->ro) {
            fprintf(stderr, "mock: write into %s page %d\n",
                    p ? "read-only" : "bad", w->pages[s / MOCK_PS]);
            exit(1);
        }
        p->tok[s % MOCK_PS] = w->tok[i];
        p->pos[s % MOCK_PS] = w->pos[i];
    }
    mock.tokens_forwarded += w->n;
    if (!w->has_out) return;
    int upto = kv_len - w->n + w->out_idx + 1;
    int32_t tok[MOCK_MAX_SLOTS], pos[MOCK_MAX_SLOTS];
    for (int s = 0; s < upto; s++) {
        mock_page *p = page_of(w->pages[s / MOCK_PS]);
        tok[s] = p->tok[s % MOCK_PS];
        pos[s] = p->pos[s % MOCK_PS];
    }
    w->hash = mock_hash(tok, pos, upto);
    w->out_tok = w->kind == PIE_PROBE_TOPK ? -1
                                           : mock_next(w->hash, w->kind, w->seed);
}

int32_t pie_future_wait(int32_t f)
{
    mock_run(f);
    return fwd_of(f)->status;
}

int32_t pie_future_wait_any(const int32_t *futs, uint32_t n, int64_t t)
{
    if (!n) return PIE_EINVAL;
    uint32_t k = (uint32_t)(mock.wait_any_calls++ % n);   /* vary the order */
    mock_run(futs[k]);
    return (int32_t)k;
}

int32_t pie_future_status(int32_t f)
{
    mock_fwd *w = fwd_of(f);
    return w->done ? w->status : PIE_EAGAIN;
}

int32_t pie_future_cancel(int32_t f)
{
    mock_fwd *w = fwd_of(f);
    if (!w->done) {
        w->done = 1;
        w->status = PIE_ECANCELED;
        mock.cancels++;
    }
    return 0;
}

int32_t pie_future_free(int32_t f)
{
    mock_fwd *w = fwd_of(f);
    if (!w->done) pie_future_cancel(f);
    for (int i = 0; i < MOCK_MAX_FWD; i++) {   /* resolve chains from f */
        mock_fwd *d = &mock.fwd[i];
        if (!d->used || d->done) continue;
        for (int t = 0; t < d->n; t++)
            if (d->from[t] == f) {
                d->from[t] = 0;
                d->tok[t] = w->status < 0 ? -1 : w->out_tok;
                if (w->status < 0) {
                    d->done = 1;
                    d->status = PIE_ECANCELED;
                }
            }
    }
    w->used = 0;
    return 0;
}

int32_t pie_forward_read_tokens(int32_t f, int32_t *tokens, uint32_t cap)
{
    mock_run(f);
    mock_fwd *w = fwd_of(f);
    if (w->status < 0) return w->status;
    if (cap) tokens[0] = ++mock.read_calls == mock.bad_tok_at ? 200
                                                             : w->out_tok;
    return 1;
}

int32_t pie_forward_read_values(int32_t f, uint32_t row, float *values,
                                int32_t *ids, uint32_t cap)
{
    mock_run(f);
    mock_fwd *w = fwd_of(f);
    int k = w->top_k < 26 ? w->top_k : 26;
    for (int j = 0; j < k && j < (int)cap; j++) {
        values[j] = (float)(k - j) / (float)(k * (k + 1) / 2);
        if (ids) ids[j] = 'a' + (int32_t)((w->hash + (uint32_t)j) % 26);
    }
    return k;
}

int32_t pie_send(const void *buf, uint32_t len)
{
    if (mock.sent_len + len < sizeof mock.sent) {
        memcpy(mock.sent + mock.sent_len, buf, len);
        mock.sent_len += len;
    }
    return 0;
}

uint32_t pie_instance_id(void) { return 42; }
