/*
 * pool.c — the KV page pool: physical pages, per-client handle tables,
 * named exports, admission control and prefix dedup.
 *
 * The backend owns n_pages physical KV pages of page_size token slots. This
 * file owns their bookkeeping (ctl->pages[], one ctl_page each) and is to the
 * control layer what pcache1.c is to sqlite: it decides which page is free,
 * who references which page, and when two pages can be one.
 *
 * Page states and invariants:
 *
 *   FREE    refs == 0; on the free list (free_head, next_free); not hashed,
 *           fill 0, no owner, no last_writer.
 *   USED    refs > 0. refs counts: client handles pointing at it, exports
 *           listing it, and not-DONE ops whose page list holds it. A page
 *           returns to FREE exactly when refs drops to 0 (pie__page_unref),
 *           whatever dropped it: a free, a client close, an unexport, an op
 *           completing or being cancelled.
 *   SHARED  USED with shared > 0: listed by an export or reached through a
 *           dedup merge. Forwards may read it but never write into it (the
 *           bytes belong to several readers); copy it to fork it.
 *   CACHED  refs == 0 but hashed and in the dedup table: its content stays
 *           findable for prefix reuse. On the LRU list (lru_head oldest).
 *           A hit revives it to USED; an allocation that finds the free
 *           list empty evicts the oldest one to FREE. Cached pages count as
 *           allocatable for admission and quotas.
 *
 * Handles. Each client has a table of ctl_handle slots; the handle a client
 * sees is index + 1 (0 is never valid). A slot holds one physical page, a
 * read-only flag (imported pages) and a merged flag (set when dedup pointed
 * it at another client's identical page). Free slots form a list through
 * next_free. A freshly allocated page records its owner (client, slot) so a
 * dedup merge can repoint the one handle that names it. A client holds at
 * most max_handles live handles (check_handles: allocation and import fail
 * with PIE_ELIMIT past it), as no page count bounds them: each import of
 * an export makes new handles, also of pages the client imported before.
 *
 * Slot content. For dedup, the pool records per slot what a forward wrote
 * there: token, position, a hash of the token's attention mask (0 = causal)
 * and the chain hash of the pages before it in the writer's page list
 * ("prefix"). Writing slot s forgets slots above s (their KV was computed
 * against the old content). Records are made when a chunk is staged, so
 * until it completes they describe KV not yet computed: a chunk that does
 * not run (its batch fails, or it is unstaged to be cancelled) has its
 * slots forgotten (pie__pool_forget; the KV there may be half written, so
 * neither the new nor the old record is true), and no page is hashed
 * while a forward that writes it is pending (last_writer set).
 *
 * A hashed page loses its hash and leaves the table as soon as a write
 * into it is wired (pie__pool_write_wired; a copy's destination in
 * pie__pool_copy_record, at submission too), not when the write is staged:
 * every forward or copy wired after that which reads the page is ordered
 * behind the write (ctl.c), so a prefix match or a merge into it would
 * read the new KV, not the content the hash describes, and the hash would
 * head chains of pages computed against the old content. Its records stay
 * as they are until the write is staged: a write that succeeds hashes the
 * page again at its completion (pie__pool_dedup), and after one that never
 * ran, they still describe the page and the next dedup walk rehashes it.
 *
 * Dedup. When a forward completes and leaves a page full with every slot
 * known and one common prefix, the page gets the chained hash
 *   hash = XXH64(prefix, tokens, positions, mask hashes; seed = model_id)
 * If the table already holds a page with that hash, the new page's single
 * owner handle is repointed at the old page (refs +1, shared +1) and the new
 * page is unreferenced (freed once pending ops drop it). Otherwise the page
 * enters the table. Equal hashes mean equal inputs all the way back to
 * position 0 (the chain covers every earlier page), so the KV bytes are the
 * same and no output can change. The chain of a page list is computed from
 * the pages' stored hashes; a page whose stored prefix does not match the
 * chain so far breaks it (no hash from there on).
 *
 * Admission. pie_ctl_page_alloc fails at once with PIE_ELIMIT beyond the
 * client's quota: max_pages counts its allocated handles plus, each page
 * once, the pages its live exports list and those its imported handles
 * name that no live export lists (quota_used), so that alloc, export,
 * free in a loop cannot pin more than max_pages; an export whose exporter
 * closed counts against no client (any client may unexport it). The
 * pages of a live export cost its importers' allocations nothing (its
 * exporter's quota and the server's cap count them); once no export
 * lists them, the importer alone may keep them, and they count against
 * its quota from then on. An import itself is refused with PIE_ELIMIT,
 * importing nothing, where c could not keep the pages should the export
 * go (check_import_quota: every page it reaches counts, imports of live
 * exports too), so imports of exports that others make and drop cannot
 * pile up in c. An unexport, by anyone, may still take a client past
 * max_pages (it imported within its quota, then allocated beside the
 * live import, at most max_pages more): it keeps what it holds, but
 * allocates nothing, and imports and exports no page it does not count
 * yet, until it is back under. An
 * export is checked against the same
 * count (check_export_quota): pages the client holds add nothing, but
 * pages it imported from a live export and re-exports do.
 * What no quota bounds, the server does: every export, its exporter open or
 * gone, counts against opts.max_export_pages (distinct pages, as
 * pinned_pages counts them), checked when an export is made or loaded
 * (pie__export_cap_check), since an exporter's close cannot fail. A
 * suspended client is resumed first, within the same timeout (suspend.c),
 * once its swapped pages and the n new ones fit together, and its resume
 * takes the n pages with those for its swap. When the pool is short, a
 * request that waiting cannot satisfy is refused (below) before anything
 * else; otherwise it applies the policy (suspend idle clients within the
 * swap budget when their pages cover what it lacks, or ask the newest to
 * end unless the clients already asked cover it), then waits on pool_cv
 * -- which is broadcast when a page becomes allocatable, a client closes,
 * an export pins pages or a wait cycle is broken, and under `suspend`
 * also whenever a client may have become a victim (its last op completed,
 * its resume protection ended, a page of it stopped being shared:
 * pie__victims_changed) -- up to its timeout, and fails with PIE_EBUSY
 * when that passes. Under `suspend` it applies the policy again whenever
 * it wakes (pages it lacked may have come free, or a victim appeared, so
 * that a swap now covers the rest): the wait-cycle check below counts the
 * swaps a waiter could make as pages coming free, and that holds only if
 * every change that makes one possible wakes it. FCFS asks once per
 * allocation. An allocation swapped out while it waits stops applying the
 * policy for its new pages alone: it needs its swap back with them, and
 * its resume takes over (alloc_take). A client that waits records the
 * pages it needs in c->want; so does one refused with PIE_EBUSY, because
 * an inferlet's host call polls with timeout 0 (a "poller"): the mark
 * stays until the client allocates, frees pages, submits work or closes.
 * stats.alloc_waits counts each allocation (or resume) that slept once,
 * however many waits it went through.
 *
 * Waiting that cannot help is refused at once with PIE_ENOMEM, "KV pool
 * exhausted", so that no allocation hangs (not even with timeout < 0):
 *   hopeless    n exceeds the pool less the pages the requester itself
 *               holds and the exported ones: nobody can free those while
 *               it waits.
 *   wait cycle  every waiting client asks for more pages than could come
 *               free without a waiter giving up: the pool less the pages
 *               that waiting clients hold or exports list (pinned_pages),
 *               plus, under `suspend`, those of waiting clients that the
 *               policy could swap out for it (swap_gain: a swapped-out
 *               waiter gives nothing up).
 *               Example: C generations each hold a share of an
 *               over-committed pool and each needs one more page; each
 *               waits for pages only the others hold.
 * To break a cycle, the newest waiter of the lowest priority class among
 * those holding pages is doomed: its allocation (a blocked one wakes; a
 * poller's next one) fails, its owner ends that request, and its pages let
 * the older requests finish. This is what a serving system does when it
 * preempts its youngest request, and it keeps first-come order: the
 * alternatives are worse (waiting forever hangs every request; a timeout
 * fails all of them together, late). One victim at a time: a doomed client
 * (like one FCFS asked to end) no longer counts as waiting, so the others
 * see its pages as coming free and wait for them; if they turn out too
 * few, the next check dooms the next newest. Pages held by clients that
 * are not waiting (a running generation, an idle inferlet) may still come
 * free, so waiters wait for those, up to their timeout. A check costs the
 * handles of the waiting clients plus the exported pages (under `suspend`,
 * plus a pass over the possible victims for each waiter that the room
 * alone cannot serve); it runs when an allocation starts waiting and
 * whenever it wakes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "common/pie_err.h"
#include "control/ctl_int.h"

#define HASH_NONE 0   /* chain broken: this page list has no usable hash */

/* ---- init ------------------------------------------------------------- */

int pie__pool_init(pie_ctl *ctl)
{
    int32_t n = ctl->n_pages, ps = ctl->ps;
    size_t slots = (size_t)n * ps;
    ctl->pages = calloc(n, sizeof *ctl->pages);
    ctl->slot_tok = calloc(slots, sizeof *ctl->slot_tok);
    ctl->slot_pos = calloc(slots, sizeof *ctl->slot_pos);
    ctl->slot_mask = calloc(slots, sizeof *ctl->slot_mask);
    ctl->slot_prefix = calloc(slots, sizeof *ctl->slot_prefix);
    ctl->slot_known = calloc(slots, 1);
    ctl->n_hbuckets = 1;
    while (ctl->n_hbuckets < n) ctl->n_hbuckets <<= 1;
    ctl->hbuckets = malloc(ctl->n_hbuckets * sizeof *ctl->hbuckets);
    if (!ctl->pages || !ctl->slot_tok || !ctl->slot_pos || !ctl->slot_mask ||
        !ctl->slot_prefix || !ctl->slot_known || !ctl->hbuckets)
        return pie_err_set(PIE_ENOMEM, "control: out of memory for %d pages",
                           n);
    for (int32_t i = 0; i < ctl->n_hbuckets; i++) ctl->hbuckets[i] = -1;
    for (int32_t i = 0; i < n; i++) {
        ctl->pages[i].next_free = i + 1 < n ? i + 1 : -1;
        ctl->pages[i].hnext = -1;
        ctl->pages[i].owner_h = -1;
    }
    ctl->free_head = n > 0 ? 0 : -1;
    ctl->n_free = n;
    ctl->lru_head = ctl->lru_tail = -1;
    for (int32_t i = 0; i < n; i++)
        ctl->pages[i].lru_prev = ctl->pages[i].lru_next = -1;
    return 0;
}

void pie__pool_free(pie_ctl *ctl)
{
    while (ctl->exports) {
        ctl_export *e = ctl->exports;
        ctl->exports = e->next;
        free(e->name);
        free(e->pages);
        free(e);
    }
    free(ctl->pages);
    free(ctl->slot_tok);
    free(ctl->slot_pos);
    free(ctl->slot_mask);
    free(ctl->slot_prefix);
    free(ctl->slot_known);
    free(ctl->hbuckets);
}

/* ---- dedup table -------------------------------------------------------- */

static void table_remove(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    if (!p->intable) return;
    int32_t *link = &ctl->hbuckets[p->hash & (ctl->n_hbuckets - 1)];
    while (*link != page) link = &ctl->pages[*link].hnext;
    *link = p->hnext;
    p->hnext = -1;
    p->intable = false;
}

static void table_insert(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    PIE_ASSERT(p->last_writer == NULL);   /* see pie__pool_write_wired */
    int32_t *b = &ctl->hbuckets[p->hash & (ctl->n_hbuckets - 1)];
    p->hnext = *b;
    *b = page;
    p->intable = true;
}

static int32_t table_find(pie_ctl *ctl, uint64_t hash)
{
    int32_t i = ctl->hbuckets[hash & (ctl->n_hbuckets - 1)];
    while (i >= 0 && ctl->pages[i].hash != hash) i = ctl->pages[i].hnext;
    return i;
}

void pie__table_insert_if_new(pie_ctl *ctl, int32_t page)
{
    if (!ctl->o.no_dedup && ctl->pages[page].hashed &&
        !ctl->pages[page].intable && table_find(ctl, ctl->pages[page].hash) < 0)
        table_insert(ctl, page);
}

/* ---- references ------------------------------------------------------- */

static void lru_remove(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    if (p->lru_prev >= 0) ctl->pages[p->lru_prev].lru_next = p->lru_next;
    else ctl->lru_head = p->lru_next;
    if (p->lru_next >= 0) ctl->pages[p->lru_next].lru_prev = p->lru_prev;
    else ctl->lru_tail = p->lru_prev;
    p->lru_prev = p->lru_next = -1;
    ctl->n_cached--;
}

static void lru_append(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    p->lru_prev = ctl->lru_tail;
    p->lru_next = -1;
    if (ctl->lru_tail >= 0) ctl->pages[ctl->lru_tail].lru_next = page;
    else ctl->lru_head = page;
    ctl->lru_tail = page;
    ctl->n_cached++;
}

/* FREE state: content forgotten, on the free list. */
static void page_release(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    table_remove(ctl, page);
    p->hashed = false;
    p->fill = 0;
    p->shared = 0;
    p->owner = NULL;
    p->owner_h = -1;
    memset(ctl->slot_known + (size_t)page * ctl->ps, 0, ctl->ps);
    p->next_free = ctl->free_head;
    ctl->free_head = page;
    ctl->n_free++;
}

void pie__page_ref(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    if (PAGE_IS_CACHED(p)) lru_remove(ctl, page);   /* revived by a hit */
    p->refs++;
}

void pie__page_unref(pie_ctl *ctl, int32_t page)
{
    ctl_page *p = &ctl->pages[page];
    PIE_ASSERT(p->refs > 0);
    if (--p->refs > 0) {
        /* its idle owner's alone now (an op of another client that read
         * it completed): swappable. (An owner with ops is no victim; its
         * last op's completion wakes the waiters, sched.c) */
        if (p->refs == 1 && p->owner && !p->owner->ops &&
            !PAGE_IS_SHARED(p) && !p->last_writer)
            pie__victims_changed(ctl);
        return;
    }
    PIE_ASSERT(p->last_writer == NULL);
    if (p->intable && !ctl->stop) {      /* keep it findable: CACHED */
        p->shared = 0;
        p->owner = NULL;
        p->owner_h = -1;
        lru_append(ctl, page);
    } else {
        page_release(ctl, page);
    }
    pthread_cond_broadcast(&ctl->pool_cv);
}

int32_t pie__page_take(pie_ctl *ctl)
{
    if (ctl->free_head < 0) {            /* evict the oldest cached page */
        int32_t old = ctl->lru_head;
        PIE_ASSERT(old >= 0);
        lru_remove(ctl, old);
        page_release(ctl, old);
    }
    int32_t i = ctl->free_head;
    ctl_page *p = &ctl->pages[i];
    ctl->free_head = p->next_free;
    ctl->n_free--;
    p->next_free = -1;
    p->refs = 1;
    return i;
}

/* ---- handles ---------------------------------------------------------- */

ctl_handle *pie__handle_get(pie_ctl_client *c, uint32_t h)
{
    if (h == 0 || h > (uint32_t)c->n_h || c->h[h - 1].page == HANDLE_FREE) {
        pie_err_set(PIE_EINVAL, "control: invalid KV page handle %u", h);
        return NULL;
    }
    if (c->h[h - 1].page == HANDLE_SWAPPED) {
        pie_err_set(PIE_EBUSY, "control: KV page handle %u is swapped out "
                    "(client '%s' is being resumed)", h, c->name);
        return NULL;
    }
    return &c->h[h - 1];
}

/* Takes a free handle slot; returns its index or -1 (ENOMEM). */
static int32_t handle_new(pie_ctl_client *c, int32_t page, bool ro)
{
    if (c->free_h < 0) {
        if (c->n_h == c->cap_h) {
            int32_t cap = c->cap_h ? c->cap_h * 2 : 16;
            ctl_handle *nh = realloc(c->h, cap * sizeof *nh);
            if (!nh) return -1;
            c->h = nh;
            c->cap_h = cap;
        }
        c->h[c->n_h].next_free = -1;
        c->free_h = c->n_h++;
    }
    int32_t i = c->free_h;
    c->free_h = c->h[i].next_free;
    c->h[i] = (ctl_handle){ .page = page, .ro = ro, .next_free = -1 };
    return i;
}

/* Slot of handle h of c, swapped out or not; NULL with PIE_EINVAL when
 * invalid. For what needs no device page (page_free, page_fill). */
static ctl_handle *handle_any(pie_ctl_client *c, uint32_t h)
{
    if (h == 0 || h > (uint32_t)c->n_h || c->h[h - 1].page == HANDLE_FREE) {
        pie_err_set(PIE_EINVAL, "control: invalid KV page handle %u", h);
        return NULL;
    }
    return &c->h[h - 1];
}

/* Drops handle slot i: the page reference (or swap entry) and quota it
 * carries. */
static void handle_drop(pie_ctl_client *c, int32_t i)
{
    pie_ctl *ctl = c->ctl;
    ctl_handle *hd = &c->h[i];
    if (hd->ro) c->imports--;
    else c->pages_held--;
    if (hd->page == HANDLE_SWAPPED) {
        int32_t j = hd->swap;
        hd->page = HANDLE_FREE;
        hd->next_free = c->free_h;
        c->free_h = i;
        if (c->suspended) pie__swap_drop(c, j);   /* (close: swap gone) */
        return;
    }
    ctl_page *p = &ctl->pages[hd->page];
    if (hd->merged || hd->ro) {                /* (an import counts) */
        p->shared--;
        pie__victims_changed(ctl);   /* its owner may swap it out now */
    }
    if (p->owner == c && p->owner_h == i) {
        p->owner = NULL;
        p->owner_h = -1;
    }
    int32_t page = hd->page;
    hd->page = -1;
    hd->next_free = c->free_h;
    c->free_h = i;
    pie__page_unref(ctl, page);
}

void pie__client_drop_pages(pie_ctl_client *c)
{
    pie_ctl *ctl = c->ctl;
    pie__client_drop_swap(c);       /* whole: its handles then just go */
    for (int32_t i = 0; i < c->n_h; i++)
        if (c->h[i].page != HANDLE_FREE) handle_drop(c, i);
    for (ctl_export *e = ctl->exports; e; e = e->next)
        if (e->owner == c) e->owner = NULL;
    c->export_pages = 0;
}

/* ---- admission ---------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int32_t pie__ms_left(int32_t timeout_ms, double t0)
{
    if (timeout_ms <= 0) return timeout_ms;
    double left = timeout_ms - (now_s() - t0) * 1000.0;
    return left > 0 ? (int32_t)left : 0;
}

/* A fresh stamp for mark_page. */
static uint32_t mark_begin(pie_ctl *ctl)
{
    if (++ctl->mark_gen == 0) {            /* wrapped: forget old stamps */
        for (int32_t i = 0; i < ctl->n_pages; i++) ctl->pages[i].mark = 0;
        ctl->mark_gen = 1;
    }
    return ctl->mark_gen;
}

/* Stamps page with gen; 1 the first time in this gen, else 0. */
static int32_t mark_page(pie_ctl *ctl, int32_t page, uint32_t gen)
{
    if (ctl->pages[page].mark == gen) return 0;
    ctl->pages[page].mark = gen;
    return 1;
}

/* Distinct pages that a waiting allocation cannot count on: those an export
 * lists and those a handle of `only` names (only == NULL: of every waiting
 * client). Every other page is free, cached, or held by clients that are
 * not waiting and by pending forwards, and may still come free. Costs the
 * handles scanned plus the exported pages. */
static int32_t pinned_pages(pie_ctl *ctl, const pie_ctl_client *only)
{
    uint32_t gen = mark_begin(ctl);
    int32_t n = 0;
    for (const ctl_export *e = ctl->exports; e; e = e->next)
        for (int32_t k = 0; k < e->n; k++)
            n += mark_page(ctl, e->pages[k], gen);
    for (const pie_ctl_client *c = ctl->clients; c; c = c->next) {
        if (only ? c != only : !CLIENT_IS_WAITING(c)) continue;
        for (int32_t i = 0; i < c->n_h; i++)
            if (c->h[i].page >= 0) n += mark_page(ctl, c->h[i].page, gen);
    }
    return n;
}

/* Distinct pages the exports list, plus those of pages[n] that none lists
 * yet (pages NULL: n fresh pages). Costs the exported pages plus n. */
static int32_t exported_pages(pie_ctl *ctl, const int32_t *pages, int32_t n)
{
    uint32_t gen = mark_begin(ctl);
    int32_t total = 0;
    for (const ctl_export *e = ctl->exports; e; e = e->next)
        for (int32_t k = 0; k < e->n; k++)
            total += mark_page(ctl, e->pages[k], gen);
    if (!pages) return total + n;
    for (int32_t k = 0; k < n; k++) total += mark_page(ctl, pages[k], gen);
    return total;
}

int pie__export_cap_check(pie_ctl *ctl, const char *name,
                          const int32_t *pages, int32_t n)
{
    int32_t cap = ctl->o.max_export_pages;
    /* pages[] may name exported pages again, and one page through several
     * handles: they count once. A load's n fresh pages are all new; they
     * are compared apart, as their sum with the rest could wrap. */
    int32_t pinned = exported_pages(ctl, pages, pages ? n : 0);
    int32_t fresh = pages ? 0 : n;
    if (pinned <= cap && fresh <= cap - pinned) return 0;
    return pie_err_set(PIE_ELIMIT, "control: export '%s' of %d pages "
                       "refused: exports would pin more than the server's "
                       "cap of %d KV pages (max_export_pages, pie run "
                       "--max-export-pages); %d are exported now, and "
                       "exports outlive their clients: unexport some first",
                       name, n, cap, exported_pages(ctl, NULL, 0));
}

/* PIE_ENOMEM when no wait can satisfy an allocation of n by c: n exceeds
 * the pool, or the pages left once c's own and the exported ones are set
 * aside. 0 otherwise. */
static int check_hopeless(pie_ctl *ctl, pie_ctl_client *c, int32_t n)
{
    if (n > ctl->n_pages)
        return pie_err_set(PIE_ENOMEM, "control: KV pool exhausted: %d pages "
                           "requested but the pool has only %d; use a larger "
                           "pool", n, ctl->n_pages);
    int32_t pinned = pinned_pages(ctl, c);
    if (n <= ctl->n_pages - pinned) return 0;
    return pie_err_set(PIE_ENOMEM, "control: KV pool exhausted: client '%s' "
                       "asks for %d more pages, but it holds or exports pin "
                       "%d of the pool's %d, so waiting cannot help; free "
                       "pages or use a larger pool", c->name, n, pinned,
                       ctl->n_pages);
}

/* True when c holds a page, which failing it may release. */
static bool holds_pages(const pie_ctl_client *c)
{
    for (int32_t i = 0; i < c->n_h; i++)
        if (c->h[i].page >= 0) return true;
    return false;
}

/* SUSPEND: of the pages that waiting clients hold (pinned for the
 * wait-cycle check), those the policy could swap out for c, up to need:
 * they come free without anyone giving up. */
static int32_t swap_gain(pie_ctl *ctl, pie_ctl_client *c, int32_t need)
{
    if (ctl->o.policy != PIE_CTL_POLICY_SUSPEND) return 0;
    return pie__victim_pages(ctl, c, need, true);
}

/* Wait-cycle detection (see the file header). When every waiting client
 * asks for more pages than could come free without a waiter giving up,
 * dooms the newest waiter of the lowest priority class among those holding
 * pages and wakes it. Returns the victim, or NULL when there is no cycle. */
static pie_ctl_client *break_cycle(pie_ctl *ctl)
{
    int32_t room = ctl->n_pages - pinned_pages(ctl, NULL), waiting = 0;
    pie_ctl_client *v = NULL;
    for (pie_ctl_client *c = ctl->clients; c; c = c->next) { /* newest 1st */
        if (!CLIENT_IS_WAITING(c)) continue;
        if (c->want <= room || c->want - room <= swap_gain(ctl, c,
                                                           c->want - room))
            return NULL;
        waiting++;
        if (holds_pages(c) && (!v || c->prio > v->prio)) v = c;
    }
    if (!v) return NULL;        /* none holds pages: each is hopeless */
    v->doomed = true;
    v->doom_waiting = waiting;
    v->doom_room = room;
    ctl->st.alloc_cycles_broken++;
    pthread_cond_broadcast(&ctl->pool_cv);
    return v;
}

/* The PIE_ENOMEM a doomed client's allocation of n fails with. */
static int doom_fail(pie_ctl *ctl, pie_ctl_client *c, int32_t n)
{
    c->doomed = false;
    return pie_err_set(PIE_ENOMEM, "control: KV pool exhausted: %d waiting "
                       "clients%s pin %d of the pool's %d pages and each "
                       "needs more than the %d left; failed '%s' (asked for "
                       "%d more), the newest waiter of the lowest priority, "
                       "so the others can finish; use a larger pool or fewer "
                       "concurrent requests",
                       c->doom_waiting, ctl->exports ? " and exports" : "",
                       ctl->n_pages - c->doom_room, ctl->n_pages,
                       c->doom_room, c->name, n);
}

/* Ends c's wait with rc (mu held). */
static int wait_end(pie_ctl_client *c, int rc)
{
    if (rc != PIE_EBUSY && c->blocked == 0) c->want = 0;  /* EBUSY: polls */
    if (rc == 0) c->doomed = false;
    return rc;
}

bool pie__pool_cv_wait(pie_ctl *ctl, int32_t timeout_ms, double deadline)
{
    if (timeout_ms < 0) {
        pthread_cond_wait(&ctl->pool_cv, &ctl->mu);
        return false;
    }
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    return pthread_cond_timedwait(&ctl->pool_cv, &ctl->mu, &ts) == ETIMEDOUT;
}

/* pie__pool_cv_wait for an allocation of c, counted as blocked meanwhile. */
static bool pool_sleep(pie_ctl *ctl, pie_ctl_client *c, int32_t timeout_ms,
                       double deadline)
{
    c->blocked++;
    bool late = pie__pool_cv_wait(ctl, timeout_ms, deadline);
    c->blocked--;
    return late;
}

static int busy(pie_ctl *ctl, int32_t n, int32_t timeout_ms)
{
    if (timeout_ms == 0)
        return pie_err_set(PIE_EBUSY, "control: KV pool full (%d free, %d "
                           "requested)", AVAILABLE(ctl), n);
    return pie_err_set(PIE_EBUSY, "control: KV pool full: waited %d ms for "
                       "%d pages (%d free); free pages or retry later",
                       timeout_ms, n, AVAILABLE(ctl));
}

/* What an admission of n for c waits for: with swap (a resume), n more
 * than c's swap entries, which its own page_free may shrink whenever mu
 * is dropped; nothing once they are all gone (the resume is over, and the
 * allocation waits for its n on its own, as any other). */
static int32_t need_of(const pie_ctl_client *c, int32_t n, bool swap)
{
    if (!swap) return n;
    return c->n_swap > 0 ? c->n_swap + n : 0;
}

/* The policy's part when the pool is short of n for c: true when it did
 * something that may change what is free (mu may have been dropped: look
 * again). SUSPEND looks every time, as pages come and go while c waits
 * (it swaps only victims that cover what c lacks); FCFS asks once per
 * admission (pages of a client asked come back only when its owner closes
 * it, and pie__evict_one counts them for the next one). */
static bool apply_policy(pie_ctl *ctl, pie_ctl_client *c, int32_t n,
                         bool first)
{
    if (ctl->o.policy == PIE_CTL_POLICY_SUSPEND)
        return pie__suspend_for(ctl, n, c);
    if (ctl->o.policy == PIE_CTL_POLICY_FCFS && first)
        return pie__evict_one(ctl, n, c);
    return false;
}

/* Admission proper (contract in ctl_int.h), a loop: a refusal of what
 * waiting cannot satisfy (nor could any suspension or eviction: those
 * never free the requester's own or exported pages), the policy, the
 * wait-cycle check, then a sleep until pages come free. */
int pie__wait_for_pages(pie_ctl *ctl, int32_t extra, bool swap,
                        int32_t timeout_ms, pie_ctl_client *c, bool *waited)
{
    double deadline = now_s() + timeout_ms / 1000.0;
    bool expired = timeout_ms == 0, own = false;
    if (!waited) waited = &own;
    for (bool first = true;; first = false) {
        /* swapped out while mu was dropped: it needs its swap back with
         * the new pages now, and applying the policy for these alone
         * would swap out others for nothing; the caller's resume takes
         * over (alloc_take) */
        if (!swap && c->suspended) return 0;
        int32_t n = need_of(c, extra, swap);
        if (AVAILABLE(ctl) >= n) return wait_end(c, 0);
        if (ctl->lost)      /* no swap frees any; nothing would run on them */
            return wait_end(c, pie__lost_err(ctl));
        if (ctl->stop)
            return wait_end(c, pie_err_set(PIE_ECANCELED, "control: shutting "
                                           "down"));
        int rc = c->doomed ? doom_fail(ctl, c, n) : check_hopeless(ctl, c, n);
        if (rc < 0) return wait_end(c, rc);
        if (apply_policy(ctl, c, n, first)) continue;
        c->want = n;
        if (break_cycle(ctl) == c) return wait_end(c, doom_fail(ctl, c, n));
        if (expired) return wait_end(c, busy(ctl, n, timeout_ms));
        if (!*waited) ctl->st.alloc_waits++, *waited = true;
        expired = pool_sleep(ctl, c, timeout_ms, deadline);
    }
}

void pie__client_not_waiting(pie_ctl_client *c)
{
    if (c->blocked > 0) return;
    c->want = 0;
    c->doomed = false;
}

void pie__victims_changed(pie_ctl *ctl)
{
    if (ctl->o.policy == PIE_CTL_POLICY_SUSPEND)
        pthread_cond_broadcast(&ctl->pool_cv);
}

/* Pages c reaches: its allocated handles, its live exports' pages and,
 * with all_imports, every page it imported, else only the imported ones
 * that no live export lists (quota_mark's count), each page once. Stamps
 * the pages counted (those of the allocated handles too) with *gen, a
 * fresh stamp. Costs c's handles plus its exports' pages, and every
 * exported page when c imported any (without all_imports). */
static int32_t reach_mark(pie_ctl *ctl, pie_ctl_client *c, bool all_imports,
                          uint32_t *gen)
{
    uint32_t listed = 0;
    if (c->imports > 0 && !all_imports) {   /* what the live exports list */
        listed = mark_begin(ctl);
        if (listed == UINT32_MAX) listed = mark_begin(ctl);  /* (no wrap
                                                  before *gen: it resets) */
        for (const ctl_export *e = ctl->exports; e; e = e->next)
            for (int32_t k = 0; k < e->n; k++)
                ctl->pages[e->pages[k]].mark = listed;
    }
    uint32_t g = *gen = mark_begin(ctl);
    for (int32_t i = 0; i < c->n_h; i++)
        if (!c->h[i].ro && c->h[i].page >= 0)
            mark_page(ctl, c->h[i].page, g);
    int32_t n = c->pages_held;
    for (const ctl_export *e = ctl->exports; e; e = e->next)
        if (e->owner == c)
            for (int32_t k = 0; k < e->n; k++)
                n += mark_page(ctl, e->pages[k], g);
    for (int32_t i = 0; c->imports > 0 && i < c->n_h; i++) {
        int32_t page = c->h[i].page;
        if (c->h[i].ro && page >= 0 &&
            (all_imports || ctl->pages[page].mark != listed))
            n += mark_page(ctl, page, g);
    }
    return n;
}

/* Pages c's quota counts: its allocated handles, plus the pages that its
 * live exports list or its imported handles name while no live export
 * lists them (c alone may keep those), each page that none of the
 * allocated handles names once. Stamps the pages counted (those of the
 * allocated handles too) with *gen, a fresh stamp. Costs c's handles
 * plus its exports' pages, and every exported page when c imported any. */
static int32_t quota_mark(pie_ctl *ctl, pie_ctl_client *c, uint32_t *gen)
{
    return reach_mark(ctl, c, false, gen);
}

/* quota_mark's count; cheap when c exports and imports nothing. */
static int32_t quota_used(pie_ctl *ctl, pie_ctl_client *c)
{
    if (c->export_pages == 0 && c->imports == 0) return c->pages_held;
    uint32_t gen;
    return quota_mark(ctl, c, &gen);
}

/* PIE_ELIMIT when n more handles would take c's live ones (allocated
 * and imported) past max_handles, else 0. The page quota does not bound
 * them: each import of an export makes new handles, also of pages c
 * holds already, and dedup merges free the pages of allocated handles;
 * without this, a loop of imports of one export grew c's handle table
 * without bound. */
static int check_handles(pie_ctl_client *c, int32_t n, const char *what)
{
    int32_t live = c->pages_held + c->imports;
    if (n <= c->max_handles - live) return 0;   /* (not live + n: wraps) */
    return pie_err_set(PIE_ELIMIT, "control: client '%s' holds %d page "
                       "handles, %s adds %d, limit %d handles per client; "
                       "free handles first (each import makes new handles, "
                       "also for pages already imported)", c->name, live,
                       what, n, c->max_handles);
}

/* PIE_ELIMIT when n more pages would pass c's quota, else 0. */
static int check_quota(pie_ctl *ctl, pie_ctl_client *c, int32_t n)
{
    if (c->max_pages == 0) return 0;
    int32_t used = quota_used(ctl, c);
    if (n <= c->max_pages - used) return 0;   /* (not used + n: may wrap) */
    return pie_err_set(PIE_ELIMIT, "control: client '%s' page quota "
                       "exceeded: holds %d (its live exports' pages and "
                       "its imports of gone exports included), asks %d, "
                       "limit %d", c->name, used, n, c->max_pages);
}

/* Whether c, taking pages[n] as well, would count more than max_pages:
 * the pages it counts (reach_mark; with all_imports every page it
 * imported, else quota_mark's count) into *used, those of pages[n] it
 * does not count yet into *add. False where c has no page quota. */
static bool past_quota(pie_ctl *ctl, pie_ctl_client *c, bool all_imports,
                       const int32_t *pages, int32_t n, int32_t *used,
                       int32_t *add)
{
    if (c->max_pages == 0) return false;
    uint32_t gen;
    *used = reach_mark(ctl, c, all_imports, &gen);
    *add = 0;
    for (int32_t k = 0; k < n; k++) *add += mark_page(ctl, pages[k], gen);
    return *add > 0 && *add > c->max_pages - *used;
}

/* PIE_ELIMIT when exporting pages[n] would take c past its quota: it adds
 * the pages that its quota does not count yet (those it imported from a
 * live export, re-exported). 0 otherwise. */
static int check_export_quota(pie_ctl *ctl, pie_ctl_client *c,
                              const char *name, const int32_t *pages,
                              int32_t n)
{
    int32_t used, add;
    if (!past_quota(ctl, c, false, pages, n, &used, &add)) return 0;
    return pie_err_set(PIE_ELIMIT, "control: client '%s' page quota "
                       "exceeded: export '%s' adds %d pages it does not hold "
                       "(imported ones) to the %d it counts (its live "
                       "exports' pages and its imports of gone exports "
                       "included), limit %d", c->name, name, add, used,
                       c->max_pages);
}

/* PIE_ELIMIT when importing pages[n] (export `name`) would leave c, were
 * no export to list them any more, holding more than its quota: every
 * page it reaches counts (reach_mark with all_imports: imports of a live
 * export too, as any client may unexport it and c alone then keeps
 * them), and the pages it does not reach yet add. 0 otherwise. Without
 * it, imports of exports that other clients made and then dropped piled
 * up in c past max_pages without bound. */
static int check_import_quota(pie_ctl *ctl, pie_ctl_client *c,
                              const char *name, const int32_t *pages,
                              int32_t n)
{
    int32_t used, add;
    if (!past_quota(ctl, c, true, pages, n, &used, &add)) return 0;
    return pie_err_set(PIE_ELIMIT, "control: client '%s' page quota "
                       "exceeded: import of '%s' adds %d pages to the %d it "
                       "holds (its live exports' pages and every page it "
                       "imported included: it keeps them if the export "
                       "goes), limit %d; free pages first", c->name, name,
                       add, used, c->max_pages);
}

/* Takes n pages for c into pages[n] (refs 1, no handles yet), waiting up
 * to timeout_ms. A suspended c comes back first, and its resume takes the
 * n pages together with those for its swap (suspend.c: a client comes back
 * only with the room to go on, and nobody takes that room meanwhile). A
 * client swapped out while it waited goes round again, so the allocation
 * returns with its swap back too (unless its own frees emptied it). */
static int alloc_take(pie_ctl *ctl, pie_ctl_client *c, int32_t n,
                      int32_t timeout_ms, int32_t *pages)
{
    double t0 = now_s();
    bool waited = false;                 /* stats: one wait per allocation */
    for (;;) {
        int rc;
        if (c->suspended) {
            rc = pie__client_resume(c, n, pages,
                                    pie__ms_left(timeout_ms, t0), &waited);
            if (rc != 0) return rc < 0 ? rc : 0;         /* n: taken */
        }
        rc = pie__wait_for_pages(ctl, n, false, pie__ms_left(timeout_ms, t0),
                                 c, &waited);
        if (rc < 0) return rc;
        if (!c->suspended) break;
    }
    for (int32_t k = 0; k < n; k++) pages[k] = pie__page_take(ctl);
    return 0;
}

/* Gives c a writable handle for each taken page io[k], written over it.
 * All or nothing: on failure every page goes back. */
static int alloc_handles(pie_ctl *ctl, pie_ctl_client *c, int32_t n,
                         uint32_t *io)
{
    for (int32_t k = 0; k < n; k++) {
        int32_t page = (int32_t)io[k], i = handle_new(c, page, false);
        if (i < 0) {
            for (int32_t j = k; j < n; j++)
                pie__page_unref(ctl, (int32_t)io[j]);
            for (int32_t j = 0; j < k; j++) handle_drop(c, (int32_t)io[j] - 1);
            return pie_err_set(PIE_ENOMEM, "control: out of memory");
        }
        ctl->pages[page].owner = c;
        ctl->pages[page].owner_h = i;
        c->pages_held++;
        io[k] = (uint32_t)i + 1;
    }
    return 0;
}

int pie_ctl_page_alloc(pie_ctl_client *c, int32_t n, int32_t timeout_ms,
                       uint32_t *out)
{
    pie_ctl *ctl = c->ctl;
    if (n < 0 || (n > 0 && !out))
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: bad "
                                               "page count %d", n));
    if (n == 0) return CLIENT_CALL_FAIL(c, 0);
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    int rc = check_quota(ctl, c, n);
    if (rc < 0 || (rc = check_handles(c, n, "allocation")) < 0) goto out;
    /* suspended: its swap comes back with the new pages, so refuse here
     * what both together can never get, before its resume swaps anyone
     * out (n_swap <= n_pages: the sum does not wrap once n <= n_pages) */
    if (c->suspended && (rc = check_hopeless(ctl, c, n > ctl->n_pages ? n :
                                             n + c->n_swap)) < 0)
        goto out;
    /* out holds the physical pages until they have handles */
    if ((rc = alloc_take(ctl, c, n, timeout_ms, (int32_t *)out)) < 0)
        goto out;
    if ((rc = check_quota(ctl, c, n)) < 0 ||           /* mu was dropped */
        (rc = check_handles(c, n, "allocation")) < 0) {
        for (int32_t k = 0; k < n; k++) pie__page_unref(ctl, (int32_t)out[k]);
        goto out;
    }
    rc = alloc_handles(ctl, c, n, out);
out:
    pthread_mutex_unlock(&ctl->mu);
    return rc;
}

int pie_ctl_page_free(pie_ctl_client *c, int32_t n, const uint32_t *h)
{
    pie_ctl *ctl = c->ctl;
    if (n < 0 || (n > 0 && !h))
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: bad "
                                               "page count %d", n));
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    int rc = 0;             /* no resume: a swapped handle drops its entry */
    /* seen[i]: handle i + 1 named earlier in h (O(n), not pairwise) */
    uint8_t *seen = n > 1 ? calloc(c->n_h, 1) : NULL;
    if (n > 1 && !seen)
        rc = pie_err_set(PIE_ENOMEM, "control: out of memory");
    for (int32_t k = 0; k < n && rc == 0; k++) {
        if (!handle_any(c, h[k])) rc = PIE_EINVAL;
        else if (seen && seen[h[k] - 1])
            rc = pie_err_set(PIE_EINVAL, "control: handle %u freed twice "
                             "in one call", h[k]);
        else if (seen)
            seen[h[k] - 1] = 1;
    }
    free(seen);
    if (rc == 0) {
        for (int32_t k = 0; k < n; k++) handle_drop(c, (int32_t)h[k] - 1);
        pie__client_not_waiting(c);
    }
    pthread_mutex_unlock(&ctl->mu);
    return rc;
}

int pie_ctl_page_fill(pie_ctl_client *c, uint32_t h, int32_t *fill)
{
    pthread_mutex_lock(&c->ctl->mu);
    CLIENT_CALL(c);
    ctl_handle *hd = handle_any(c, h);     /* no resume: swap_fill has it */
    if (hd)
        *fill = hd->page == HANDLE_SWAPPED ? c->swap_fill[hd->swap]
                                           : c->ctl->pages[hd->page].fill;
    pthread_mutex_unlock(&c->ctl->mu);
    return hd ? 0 : PIE_EINVAL;
}

/* ---- exports ---------------------------------------------------------- */

static ctl_export *export_find(pie_ctl *ctl, const char *name,
                               ctl_export ***link)
{
    ctl_export **l = &ctl->exports;
    while (*l && strcmp((*l)->name, name) != 0) l = &(*l)->next;
    if (link) *link = l;
    return *l;
}

int pie_ctl_export(pie_ctl_client *c, const char *name, int32_t n,
                   const uint32_t *h)
{
    pie_ctl *ctl = c->ctl;
    if (!name || !*name || strlen(name) > 255)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: export "
                                               "name must be 1..255 bytes"));
    if (n <= 0 || !h)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: export "
                                               "of %d pages", n));
    ctl_export *e = calloc(1, sizeof *e);
    int32_t *pages = malloc(n * sizeof *pages);
    char *nm = strdup(name);
    if (!e || !pages || !nm) {
        free(e), free(pages), free(nm);
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_ENOMEM, "control: out of "
                                               "memory"));
    }
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    int rc = 0;
    if ((rc = RESUME_NOW(c)) < 0) goto out;
    if (export_find(ctl, name, NULL)) {
        rc = pie_err_set(PIE_EBUSY, "control: export name '%s' already in "
                         "use", name);
        goto out;
    }
    for (int32_t k = 0; k < n; k++) {
        ctl_handle *hd = pie__handle_get(c, h[k]);
        if (!hd) { rc = PIE_EINVAL; goto out; }
        pages[k] = hd->page;
    }
    if ((rc = check_export_quota(ctl, c, name, pages, n)) < 0 ||
        (rc = pie__export_cap_check(ctl, name, pages, n)) < 0)
        goto out;
    for (int32_t k = 0; k < n; k++) {
        pie__page_ref(ctl, pages[k]);
        ctl->pages[pages[k]].shared++;
    }
    *e = (ctl_export){ .name = nm, .n = n, .pages = pages, .owner = c,
                       .next = ctl->exports };
    ctl->exports = e;
    ctl->n_exports++;
    c->export_pages += n;
    e = NULL, pages = NULL, nm = NULL;
    pthread_cond_broadcast(&ctl->pool_cv);   /* pinned: recheck cycles */
out:
    pthread_mutex_unlock(&ctl->mu);
    free(e), free(pages), free(nm);
    return rc;
}

int pie_ctl_import(pie_ctl_client *c, const char *name, int32_t cap,
                   uint32_t *out, int32_t *n)
{
    pie_ctl *ctl = c->ctl;
    if (!name)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: NULL "
                                               "export name"));
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    int rc = 0;
    ctl_export *e = export_find(ctl, name, NULL);
    if (!e) {
        rc = pie_err_set(PIE_ENOTFOUND, "control: no export named '%s'",
                         name);
        goto out;
    }
    if (n) *n = e->n;
    if (cap < e->n || !out) {
        rc = pie_err_set(PIE_ERANGE, "control: export '%s' has %d pages, "
                         "room for %d", name, e->n, cap);
        goto out;
    }
    if ((rc = check_handles(c, e->n, "import")) < 0 ||
        (rc = check_import_quota(ctl, c, name, e->pages, e->n)) < 0)
        goto out;                                 /* nothing imported */
    for (int32_t k = 0; k < e->n; k++) {
        int32_t i = handle_new(c, e->pages[k], true);
        if (i < 0) {
            for (int32_t j = 0; j < k; j++) handle_drop(c, (int32_t)out[j] - 1);
            rc = pie_err_set(PIE_ENOMEM, "control: out of memory");
            goto out;
        }
        c->imports++;
        pie__page_ref(ctl, e->pages[k]);
        /* read-only while imported, even after the export is gone: its
         * writer must not change KV the importer still reads */
        ctl->pages[e->pages[k]].shared++;
        out[k] = (uint32_t)i + 1;
    }
out:
    pthread_mutex_unlock(&ctl->mu);
    return rc;
}

int pie_ctl_unexport(pie_ctl_client *c, const char *name)
{
    pie_ctl *ctl = c->ctl;
    if (!name)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: NULL "
                                               "export name"));
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    ctl_export **link;
    ctl_export *e = export_find(ctl, name, &link);
    if (e) {
        *link = e->next;
        ctl->n_exports--;
        if (e->owner) e->owner->export_pages -= e->n;
        for (int32_t k = 0; k < e->n; k++) {
            ctl->pages[e->pages[k]].shared--;
            pie__page_unref(ctl, e->pages[k]);
        }
        pie__victims_changed(ctl);   /* pages no longer shared: swappable */
    }
    pthread_mutex_unlock(&ctl->mu);
    if (!e)
        return pie_err_set(PIE_ENOTFOUND, "control: no export named '%s'",
                           name);
    free(e->name);
    free(e->pages);
    free(e);
    return 0;
}

int pie_ctl_export_list(pie_ctl *ctl, char *buf, int32_t cap, int32_t *len,
                        int32_t *n)
{
    pthread_mutex_lock(&ctl->mu);
    int32_t need = 0, count = 0;
    for (ctl_export *e = ctl->exports; e; e = e->next) {
        int32_t l = (int32_t)strlen(e->name) + 1;
        if (buf && need + l <= cap) memcpy(buf + need, e->name, l);
        need += l;
        count++;
    }
    pthread_mutex_unlock(&ctl->mu);
    if (len) *len = need;
    if (n) *n = count;
    if (need > cap || (need > 0 && !buf))
        return pie_err_set(PIE_ERANGE, "control: export list needs %d bytes, "
                           "buffer has %d", need, cap);
    return 0;
}

/* ---- slot content and dedup ------------------------------------------- */

/* Identity of the context before page k of op: which physical pages, at
 * which versions. Slots record it when written; a page is hashable only if
 * that context is still the same. */
static uint64_t context_ident(pie_ctl *ctl, const ctl_op *op, int32_t k)
{
    uint64_t h = 0x243f6a8885a308d3ull;
    for (int32_t j = 0; j < k; j++) {
        uint64_t v[2] = { (uint64_t)op->pages[j],
                          ctl->pages[op->pages[j]].version };
        h = XXH64(v, sizeof v, h);
    }
    return h;
}

static uint64_t mask_hash(const ctl_op *op, int32_t t)
{
    if (!op->mask_indptr) return 0;
    uint32_t a = op->mask_indptr[t], b = op->mask_indptr[t + 1];
    uint64_t h = XXH64(op->mask_runs + a, (b - a) * sizeof(uint32_t), 1);
    return h ? h : 1;
}

/* A write into page: its hash and its upper slots are no longer valid. */
static void page_touch(pie_ctl *ctl, int32_t page, int32_t hi)
{
    ctl_page *p = &ctl->pages[page];
    int32_t ps = ctl->ps;
    table_remove(ctl, page);
    p->hashed = false;
    p->version++;
    memset(ctl->slot_known + (size_t)page * ps + hi, 0, ps - hi);
}

void pie__pool_record(pie_ctl *ctl, ctl_op *op, int32_t tok0, int32_t ntok)
{
    if (ctl->o.no_dedup) return;
    int32_t ps = ctl->ps, first = op->kv_len - op->n_tokens;
    int32_t last = first + tok0 + ntok - 1, cur_k = -1;
    uint64_t ident = 0;
    for (int32_t t = tok0; t < tok0 + ntok; t++) {
        int32_t s = first + t, k = s / ps, off = s % ps;
        int32_t page = op->pages[k];
        if (k != cur_k) {
            cur_k = k;
            ident = context_ident(ctl, op, k);
            page_touch(ctl, page, last / ps == k ? last % ps + 1 : ps);
        }
        size_t i = (size_t)page * ps + off;
        ctl->slot_tok[i] = op->tokens[t];
        ctl->slot_pos[i] = op->positions[t];
        ctl->slot_mask[i] = mask_hash(op, t);
        ctl->slot_prefix[i] = ident;
        ctl->slot_known[i] = 1;
    }
}

void pie__pool_forget(pie_ctl *ctl, const ctl_op *op, int32_t tok0,
                      int32_t ntok)
{
    if (ctl->o.no_dedup) return;
    int32_t ps = ctl->ps, s0 = op->kv_len - op->n_tokens + tok0;
    int32_t k0 = s0 / ps, k1 = (s0 + ntok - 1) / ps;
    /* slots s0.. of its first page, all of the others (pie__pool_record
     * already forgot those above the chunk) */
    for (int32_t k = k0; k <= k1; k++)
        page_touch(ctl, op->pages[k], k == k0 ? s0 % ps : 0);
}

void pie__pool_write_wired(pie_ctl *ctl, int32_t page)
{
    table_remove(ctl, page);
    ctl->pages[page].hashed = false;
}

void pie__pool_copy_record(pie_ctl *ctl, int32_t src, int32_t src_off,
                           int32_t dst, int32_t dst_off, int32_t n)
{
    int32_t ps = ctl->ps;
    /* copied KV was computed against src's context, not dst's: its slots
     * stay unknown, so dst never dedups */
    page_touch(ctl, dst, dst_off);
    (void)src, (void)src_off, (void)n, (void)ps;
}

/* Hashes page (full, every slot written in context ident) extending chain
 * hash prefix; returns 1 when hashed. */
static int page_hash(pie_ctl *ctl, int32_t page, uint64_t prefix,
                     uint64_t ident)
{
    int32_t ps = ctl->ps;
    ctl_page *p = &ctl->pages[page];
    size_t base = (size_t)page * ps;
    if (p->fill != ps) return 0;
    for (int32_t i = 0; i < ps; i++)
        if (!ctl->slot_known[base + i] || ctl->slot_prefix[base + i] != ident)
            return 0;
    uint64_t h;
    if (pie__pool_hash_of(ctl, page, prefix, &h) < 0) return 0;
    p->hash = h;
    p->prefix = prefix;
    p->hashed = true;
    return 1;
}

int pie__pool_hash_bytes(const pie_ctl *ctl, uint64_t prefix,
                         const void *tok, const void *pos, const void *mask,
                         uint64_t *out)
{
    int32_t ps = ctl->ps;
    XXH64_state_t *st = XXH64_createState();
    if (!st) return PIE_ENOMEM;
    XXH64_reset(st, ctl->o.model_id);
    XXH64_update(st, &prefix, sizeof prefix);
    XXH64_update(st, tok, ps * sizeof(int32_t));
    XXH64_update(st, pos, ps * sizeof(int32_t));
    XXH64_update(st, mask, ps * sizeof(uint64_t));
    uint64_t h = XXH64_digest(st);
    XXH64_freeState(st);
    *out = h ? h : 1;
    return 0;
}

int pie__pool_hash_of(const pie_ctl *ctl, int32_t page, uint64_t prefix,
                      uint64_t *out)
{
    size_t base = (size_t)page * ctl->ps;
    return pie__pool_hash_bytes(ctl, prefix, ctl->slot_tok + base,
                                ctl->slot_pos + base, ctl->slot_mask + base,
                                out);
}

/* Points the single owner handle of page at twin instead. */
static void merge(pie_ctl *ctl, int32_t page, int32_t twin)
{
    ctl_page *p = &ctl->pages[page];
    pie_ctl_client *c = p->owner;
    ctl_handle *hd = &c->h[p->owner_h];
    hd->page = twin;
    hd->merged = true;
    pie__page_ref(ctl, twin);
    ctl->pages[twin].shared++;
    p->owner = NULL;
    p->owner_h = -1;
    ctl->st.dedup_hits++;
    pie__page_unref(ctl, page);
}

/* Walks op's page list in order extending the chain hash; pages that are
 * full and consistent get hashed; a hashed page that has an identical twin
 * in the table and a single owner handle is merged into the twin. Stops at
 * a page that another pending forward writes: once staged, its records
 * describe KV not computed yet (see the file header). */
void pie__pool_dedup(pie_ctl *ctl, ctl_op *op)
{
    if (ctl->o.no_dedup) return;
    uint64_t h = ctl->o.model_id ^ 0x9e3779b97f4a7c15ull;
    uint64_t ident = 0x243f6a8885a308d3ull;
    for (int32_t k = 0; k < op->n_pages; k++) {
        int32_t page = op->pages[k];
        ctl_page *p = &ctl->pages[page];
        if (p->hashed) {
            if (p->prefix != h) return;
        } else if (p->last_writer || !page_hash(ctl, page, h, ident)) {
            return;
        }
        h = p->hash;
        uint64_t v[2] = { (uint64_t)page, p->version };
        ident = XXH64(v, sizeof v, ident);
        if (p->intable) continue;
        int32_t twin = table_find(ctl, p->hash);
        if (twin < 0)
            table_insert(ctl, page);
        else if (twin != page && p->owner && p->shared == 0 &&
                 p->last_writer == NULL)
            merge(ctl, page, twin);
    }
}

/*
 * Prefix caching at submission: the leading pages that op would write in
 * full, whose content hash (chained from the hashed pages before them)
 * matches a page already in the table, need no compute. Plans how many
 * such pages there are (writing their twins to twins[], cap entries) —
 * stopping before any chained token or output row, and keeping at least one
 * token to run. Changes nothing.
 */
int32_t pie__pool_prefix_plan(pie_ctl *ctl, pie_ctl_client *c,
                              const uint32_t *handles, const ctl_op *op,
                              int32_t *twins, int32_t cap)
{
    int32_t ps = ctl->ps, first = op->kv_len - op->n_tokens;
    if (ctl->o.no_dedup || first % ps != 0) return 0;
    int32_t k0 = first / ps, limit = op->n_tokens - 1;
    for (int32_t o = 0; o < op->n_outputs; o++)
        if (op->output_idx[o] < limit) limit = op->output_idx[o];
    for (int32_t i = 0; i < op->n_chains; i++)
        if (op->chains[i].token_idx < limit) limit = op->chains[i].token_idx;
    uint64_t h = ctl->o.model_id ^ 0x9e3779b97f4a7c15ull;
    for (int32_t j = 0; j < k0; j++) {
        const ctl_page *p = &ctl->pages[op->pages[j]];
        if (!p->hashed || p->prefix != h) return 0;
        h = p->hash;
    }
    int32_t n = 0;
    uint64_t mh[256];
    if (ps > 256) return 0;
    for (int32_t k = k0; n < cap; k++) {
        int32_t t0 = k * ps - first;
        if (t0 + ps > limit) break;
        for (int32_t t = 0; t < ps; t++) mh[t] = mask_hash(op, t0 + t);
        XXH64_state_t *st = XXH64_createState();
        if (!st) break;
        XXH64_reset(st, ctl->o.model_id);
        XXH64_update(st, &h, sizeof h);
        XXH64_update(st, op->tokens + t0, ps * sizeof(int32_t));
        XXH64_update(st, op->positions + t0, ps * sizeof(int32_t));
        XXH64_update(st, mh, ps * sizeof(uint64_t));
        uint64_t hh = XXH64_digest(st);
        XXH64_freeState(st);
        hh = hh ? hh : 1;
        int32_t twin = table_find(ctl, hh);
        if (twin < 0 || ctl->pages[twin].prefix != h) break;
        const ctl_handle *hd = &c->h[handles[k] - 1];
        const ctl_page *p = &ctl->pages[hd->page];
        if (hd->page != twin &&
            (hd->ro || p->owner != c || p->owner_h != (int32_t)handles[k] - 1 ||
             PAGE_IS_SHARED(p) || p->last_writer != NULL))
            break;
        twins[n++] = twin;
        h = hh;
    }
    return n;
}

/* Applies a plan: the handles of pages k0 .. k0+n-1 now name the twins. */
void pie__pool_prefix_apply(pie_ctl *ctl, pie_ctl_client *c,
                            const uint32_t *handles, ctl_op *op,
                            const int32_t *twins, int32_t n)
{
    int32_t k0 = (op->kv_len - op->n_tokens) / ctl->ps;
    for (int32_t j = 0; j < n; j++) {
        int32_t k = k0 + j, twin = twins[j];
        ctl_handle *hd = &c->h[handles[k] - 1];
        if (hd->page != twin) {
            int32_t old = hd->page;
            ctl_page *p = &ctl->pages[old];
            p->owner = NULL;
            p->owner_h = -1;
            hd->page = twin;
            hd->merged = true;
            pie__page_ref(ctl, twin);
            ctl->pages[twin].shared++;
            pie__page_unref(ctl, old);
        }
        op->pages[k] = twin;
        ctl->st.dedup_hits++;
        ctl->st.prefix_tokens_skipped += ctl->ps;
    }
}

void pie__pool_stats(pie_ctl *ctl, pie_ctl_stats *s)
{
    s->pages_total = ctl->n_pages;
    s->pages_free = AVAILABLE(ctl);
    s->pages_cached = ctl->n_cached;
    s->pages_used = ctl->n_pages - AVAILABLE(ctl);
    int32_t shared = 0;
    for (int32_t i = 0; i < ctl->n_pages; i++)
        if (ctl->pages[i].refs > 1 && ctl->pages[i].shared > 0) shared++;
    s->pages_shared = shared;
    s->exports = ctl->n_exports;
    s->pages_exported = exported_pages(ctl, NULL, 0);
}
