/*
 * ctx.c — contexts: token history + KV pages (see pie.h for the layout).
 *
 * Page sharing. Page handles belong to the instance, not to a context, so
 * the SDK keeps one table per instance: handle -> (references, read-only).
 * Open addressing with linear probing; a slot with refs == 0 is a tombstone
 * only until the next insert reuses it (lookups skip it by handle match,
 * and the table is rebuilt when it grows). A page is writable iff exactly
 * one context holds it and it is not read-only (imported or exported).
 * Writing into a partial page that is not writable first copies its filled
 * slots to a fresh page (copy on write), so forking costs one page copy at
 * most, and only when a branch actually appends.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

typedef struct page_ent {
    int32_t h;                       /* handle (> 0), 0 = never used        */
    int32_t refs;                    /* contexts holding it (0 = free slot) */
    bool    ro;                      /* imported or exported                */
} page_ent;

static page_ent *ptab;
static uint32_t  ptab_cap, ptab_used;

static page_ent *page_find(int32_t h)
{
    if (!ptab_cap) return NULL;
    for (uint32_t i = (uint32_t)h * 2654435761u & (ptab_cap - 1), k = 0;
         k < ptab_cap; k++, i = (i + 1) & (ptab_cap - 1)) {
        if (ptab[i].h == h) return &ptab[i];
        if (ptab[i].h == 0) return NULL;
    }
    return NULL;
}

static int page_grow(void)
{
    uint32_t nc = ptab_cap ? ptab_cap * 2 : 256;
    page_ent *old = ptab, *nt = calloc(nc, sizeof *nt);
    if (!nt) return pie_sdk_fail(PIE_ENOMEM, "out of memory (page table)");
    uint32_t oc = ptab_cap;
    ptab = nt;
    ptab_cap = nc;
    ptab_used = 0;
    for (uint32_t i = 0; i < oc; i++) {
        if (old[i].refs <= 0) continue;
        uint32_t j = (uint32_t)old[i].h * 2654435761u & (nc - 1);
        while (nt[j].h) j = (j + 1) & (nc - 1);
        nt[j] = old[i];
        ptab_used++;
    }
    free(old);
    return 0;
}

/* Registers a fresh handle with one reference. */
static int page_add(int32_t h, bool ro)
{
    page_ent *e = page_find(h);
    if (e) {                         /* a handle number reused by the host */
        e->refs = 1;
        e->ro = ro;
        return 0;
    }
    if ((ptab_used + 1) * 2 > ptab_cap && page_grow()) return PIE_ENOMEM;
    uint32_t i = (uint32_t)h * 2654435761u & (ptab_cap - 1);
    while (ptab[i].h) i = (i + 1) & (ptab_cap - 1);
    ptab[i] = (page_ent){ h, 1, ro };
    ptab_used++;
    return 0;
}

static void page_ref(int32_t h)
{
    page_ent *e = page_find(h);
    if (e) e->refs++;
}

static void page_unref(const pie_lm *m, int32_t h)
{
    page_ent *e = page_find(h);
    if (e && --e->refs > 0) return;
    if (e) e->refs = 0;
    pie_kv_free(m->h, &h, 1);
}

static bool page_writable(int32_t h)
{
    page_ent *e = page_find(h);
    return e && e->refs == 1 && !e->ro;
}

/* Grows array *p of *cap elements of elem bytes to hold need (doubling).
 * 0, or PIE_ENOMEM where need passes INT32_MAX elements or their bytes
 * pass size_t (32 bits on wasm32), or realloc fails. */
static int grow(void **p, int32_t *cap, int64_t need, size_t elem)
{
    if (need <= *cap) return 0;
    int64_t lim = (int64_t)(SIZE_MAX / elem < INT32_MAX ? SIZE_MAX / elem
                                                        : INT32_MAX);
    if (need > lim)
        return pie_sdk_fail(PIE_ENOMEM, "context too large (%lld entries of "
                            "%zu bytes)", (long long)need, elem);
    int64_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    if (nc > lim) nc = lim;
    void *np = realloc(*p, (size_t)nc * elem);
    if (!np) return pie_sdk_fail(PIE_ENOMEM, "out of memory (context)");
    *p = np;
    *cap = (int32_t)nc;
    return 0;
}

void pie_ctx_init(pie_ctx *c, pie_lm *m)
{
    memset(c, 0, sizeof *c);
    c->lm = m;
}

void pie_ctx_release(pie_ctx *c)
{
    for (int32_t i = 0; i < c->n_pages; i++) page_unref(c->lm, c->pages[i]);
    free(c->tokens);
    free(c->pages);
    pie_lm *m = c->lm;
    memset(c, 0, sizeof *c);
    c->lm = m;
}

int pie_ctx_fill_ids(pie_ctx *c, const int32_t *ids, int32_t n)
{
    if (n < 0) return pie_sdk_fail(PIE_EINVAL, "negative token count");
    for (int32_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->lm->vocab)
            return pie_sdk_fail(PIE_ERANGE, "token id %d out of range", ids[i]);
    if (grow((void **)&c->tokens, &c->cap_tokens, (int64_t)c->n_tokens + n,
             sizeof(int32_t)))
        return PIE_ENOMEM;
    memcpy(c->tokens + c->n_tokens, ids, sizeof(int32_t) * (size_t)n);
    c->n_tokens += n;
    return 0;
}

int pie_ctx_fill(pie_ctx *c, const char *text, bool add_special)
{
    int32_t *ids;
    int n = pie_lm_encode(c->lm, text, strlen(text), add_special, &ids);
    if (n < 0) return n;
    int rc = pie_ctx_fill_ids(c, ids, n);
    free(ids);
    return rc;
}

/* Copies the partial last page to a private page before a write. */
static int cow_last(pie_ctx *c)
{
    int32_t ps = c->lm->page_size, old = c->pages[c->n_pages - 1], nw;
    int32_t fill = c->kv_len - (c->n_pages - 1) * ps;
    int rc = pie_kv_alloc(c->lm->h, 1, &nw);
    if (rc < 0) return pie_sdk_fail(rc, "kv_alloc failed (%d)", rc);
    if ((rc = page_add(nw, false))) {
        pie_kv_free(c->lm->h, &nw, 1);
        return rc;
    }
    rc = pie_kv_copy(c->lm->h, old, 0, nw, 0, (uint32_t)fill);
    if (rc < 0) {
        page_unref(c->lm, nw);
        return pie_sdk_fail(rc, "kv_copy failed (%d)", rc);
    }
    page_unref(c->lm, old);
    c->pages[c->n_pages - 1] = nw;
    return 0;
}

int pie__ctx_reserve(pie_ctx *c, int32_t n)
{
    int32_t ps = c->lm->page_size;
    if (n <= 0) return 0;
    if (c->kv_len % ps && !page_writable(c->pages[c->n_pages - 1])) {
        int rc = cow_last(c);
        if (rc) return rc;
    }
    int64_t need64 = ((int64_t)c->kv_len + n + ps - 1) / ps - c->n_pages;
    if (need64 <= 0) return 0;
    if (grow((void **)&c->pages, &c->cap_pages, c->n_pages + need64,
             sizeof(int32_t)))
        return PIE_ENOMEM;
    int32_t need = (int32_t)need64;   /* fits: grow checked n_pages + it */
    int rc = pie_kv_alloc(c->lm->h, (uint32_t)need, c->pages + c->n_pages);
    if (rc < 0)
        return pie_sdk_fail(rc, "kv_alloc of %d pages failed (%d%s)", need, rc,
                            rc == PIE_EBUSY ? ": KV page pool exhausted"
                            : rc == PIE_ELIMIT ? ": page quota reached"
                            : rc == PIE_ENOMEM ? ": KV pool exhausted, and "
                              "waiting cannot help: the pool is too small "
                              "for this request, or the host ended it so "
                              "that older requests holding the pool can "
                              "finish" : "");
    for (int32_t i = 0; i < need; i++) {
        if ((rc = page_add(c->pages[c->n_pages], false))) {
            pie_kv_free(c->lm->h, c->pages + c->n_pages, (uint32_t)(need - i));
            return rc;
        }
        c->n_pages++;
    }
    return 0;
}

int pie__ctx_set_pages(pie_ctx *c, int32_t fwd)
{
    int32_t ps = c->lm->page_size;
    int32_t last = c->kv_len - (c->n_pages - 1) * ps;
    return pie_forward_pages(fwd, c->pages, (uint32_t)c->n_pages,
                             (uint32_t)last);
}

/* Builds and submits a forward of tokens [from, to) of the history, with
 * output row o at the last token (o may be NULL). Returns the future. */
static int32_t submit_range(pie_ctx *c, int32_t from, int32_t to,
                            const pie_out *o)
{
    int32_t n = to - from, rc;
    if ((rc = pie__ctx_reserve(c, n))) return rc;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n);
    if (!pos) return pie_sdk_fail(PIE_ENOMEM, "out of memory");
    for (int32_t i = 0; i < n; i++) pos[i] = from + i;
    int32_t f = pie_forward_new(c->lm->h);
    if (f < 0) {
        free(pos);
        return pie_sdk_fail(f, "forward_new failed (%d)", f);
    }
    c->kv_len += n;
    rc = pie_forward_tokens(f, c->tokens + from, pos, (uint32_t)n);
    free(pos);
    if (rc >= 0) rc = pie__ctx_set_pages(c, f);
    if (rc >= 0 && o)
        rc = pie_forward_output(f, (uint32_t)(n - 1), o->kind, o->temperature,
                                o->top_k, o->top_p, o->min_p, o->seed);
    if (rc >= 0) rc = pie_forward_submit(f);
    if (rc < 0) {
        c->kv_len -= n;
        return pie_sdk_fail(rc, "forward failed (%d)", rc);
    }
    c->n_kv = to;
    return rc;
}

int pie_ctx_flush(pie_ctx *c)
{
    if (c->n_tokens - c->n_kv < 2) return 0;
    int32_t f = submit_range(c, c->n_kv, c->n_tokens - 1, NULL);
    if (f < 0) return f;
    int32_t st = pie_wait_free(f);
    return st < 0 ? pie_sdk_fail(st, "prefill forward failed (%d)", st) : 0;
}

int32_t pie_ctx_submit(pie_ctx *c, const pie_out *o)
{
    if (c->n_tokens <= c->n_kv)
        return pie_sdk_fail(PIE_EINVAL, "no pending token to forward");
    return submit_range(c, c->n_kv, c->n_tokens, o);
}

int pie_ctx_next_topk(pie_ctx *c, int32_t k, float *probs, int32_t *ids)
{
    pie_out o = { .kind = PIE_PROBE_TOPK, .top_k = k, .temperature = 1.0f };
    int32_t f = pie_ctx_submit(c, &o);
    if (f < 0) return f;
    int32_t st = pie_future_wait(f);
    if (st >= 0) st = pie_forward_read_values(f, 0, probs, ids, (uint32_t)k);
    pie_future_free(f);
    if (st < 0) return pie_sdk_fail(st, "top-k forward failed (%d)", st);
    return st > k ? k : st;
}

int pie_ctx_fork(pie_ctx *c, pie_ctx *child)
{
    int rc = pie_ctx_flush(c);
    if (rc) return rc;
    pie_ctx_init(child, c->lm);
    if (grow((void **)&child->tokens, &child->cap_tokens, c->n_tokens,
             sizeof(int32_t)) ||
        grow((void **)&child->pages, &child->cap_pages, c->n_pages,
             sizeof(int32_t))) {
        pie_ctx_release(child);
        return PIE_ENOMEM;
    }
    memcpy(child->tokens, c->tokens, sizeof(int32_t) * (size_t)c->n_tokens);
    memcpy(child->pages, c->pages, sizeof(int32_t) * (size_t)c->n_pages);
    for (int32_t i = 0; i < c->n_pages; i++) page_ref(c->pages[i]);
    child->n_tokens = c->n_tokens;
    child->n_kv = c->n_kv;
    child->n_pages = c->n_pages;
    child->kv_len = c->kv_len;
    return 0;
}

int pie_ctx_export(pie_ctx *c, const char *name)
{
    int rc = pie_ctx_flush(c);
    if (rc) return rc;
    rc = pie_kv_export(c->lm->h, name, (uint32_t)strlen(name), c->pages,
                       (uint32_t)c->n_pages);
    if (rc < 0) return pie_sdk_fail(rc, "kv_export '%s' failed (%d)", name, rc);
    for (int32_t i = 0; i < c->n_pages; i++) {
        page_ent *e = page_find(c->pages[i]);
        if (e) e->ro = true;
    }
    return 0;
}

int pie_ctx_import(pie_ctx *c, pie_lm *m, const char *name,
                   const int32_t *tokens, int32_t n, int32_t n_kv)
{
    pie_ctx_init(c, m);
    uint32_t len = (uint32_t)strlen(name);
    int32_t np = pie_kv_import(m->h, name, len, NULL, 0);
    if (np < 0) return pie_sdk_fail(np, "kv_import '%s' failed (%d)", name, np);
    int64_t need = ((int64_t)n_kv + m->page_size - 1) / m->page_size;
    if (n_kv < 0 || n_kv > n || np != need)
        return pie_sdk_fail(PIE_EINVAL, "export '%s' has %d pages; %d tokens "
                            "need %lld", name, np, n_kv, (long long)need);
    if (grow((void **)&c->pages, &c->cap_pages, np, sizeof(int32_t)))
        return PIE_ENOMEM;
    int32_t got = pie_kv_import(m->h, name, len, c->pages, (uint32_t)np);
    if (got != np)
        return pie_sdk_fail(got < 0 ? got : PIE_EINVAL,
                            "kv_import '%s' changed under us (%d)", name, got);
    for (int32_t i = 0; i < np; i++) {
        if (page_add(c->pages[i], true)) {
            pie_kv_free(m->h, c->pages + i, (uint32_t)(np - i));
            c->n_pages = i;
            return PIE_ENOMEM;
        }
        c->n_pages = i + 1;
    }
    c->kv_len = c->n_kv = n_kv;
    return pie_ctx_fill_ids(c, tokens, n);
}

int pie_ctx_drop_page(pie_ctx *c, int32_t i)
{
    int32_t ps = c->lm->page_size;
    if (i < 0 || i >= c->n_pages - 1)
        return pie_sdk_fail(PIE_ERANGE, "cannot drop page %d of %d", i,
                            c->n_pages);
    page_unref(c->lm, c->pages[i]);
    memmove(c->pages + i, c->pages + i + 1,
            sizeof(int32_t) * (size_t)(c->n_pages - i - 1));
    c->n_pages--;
    c->kv_len -= ps;
    return 0;
}

void pie__ctx_trim(pie_ctx *c)
{
    int32_t ps = c->lm->page_size, keep = (c->kv_len + ps - 1) / ps;
    while (c->n_pages > keep) page_unref(c->lm, c->pages[--c->n_pages]);
}
