/*
 * suspend.c — the `suspend` policy under memory pressure: instead of making
 * an allocation wait (or killing someone), swap an idle client's pages to
 * host memory and give them back when it next needs them on the device;
 * and the `fcfs` policy's choice of a client to end.
 *
 * Victims: clients other than the requester that have no forward or copy
 * pending (an inferlet waiting on a tool call, a message or a timer), whose
 * priority class is the requester's or lower (numerically >=), newest
 * first within the lowest class; never one already suspended, one being
 * resumed (`resuming`, also once its own page_free emptied its swap) or
 * one whose swap pie_ctl_client_resume brought back and that has made no
 * call since (`resumed`, cleared at every entry point, a failing one
 * included, under mu before the call's work: CLIENT_CALL in ctl_int.h).
 * Only pages the victim holds alone (one reference, not exported, not
 * deduplicated, writable) are swapped; shared pages stay where they are.
 * Victims are swapped only when their pages, added up in that order
 * within the budget (pie__victim_pages), cover what the allocation lacks:
 * a swap that cannot serve it would cost the victim its pages for
 * nothing. Short of that the allocation waits, and looks again whenever
 * pages come free or a client may have become a victim: its last op
 * completed (sched.c), its next call ended the protection of
 * pie_ctl_client_resume (pie__client_call), a page of it is no longer
 * shared (an import or merge of it dropped, an export of it removed, the
 * op of another client that still read it completed: pie__page_unref);
 * each wakes the waiting allocations (pie__victims_changed, pool.c). The
 * wait-cycle check counts the pages an allocation could so swap out of
 * waiting clients as coming free, which holds only because every such
 * change wakes it. What the allocation lacks, and whether the victims
 * cover it, is decided again after waiting for the device (the swap's
 * download needs it idle, and mu drops meanwhile): pages may have come
 * free, victims ended or submitted work, the requester itself been swapped
 * out; pie__suspend_for returns to the admission then, which looks again
 * from the top with mu held, so the device stays idle for the swaps it
 * then makes.
 *
 * Swap budget: the swaps of all clients together (ctl->swap_bytes) stay
 * within opts.max_swap_bytes (default: the pool's size). A victim whose
 * pages would not fit is skipped; once the budget is spent the policy is
 * plain waiting until a suspended client resumes, frees its swapped pages
 * or closes. One exception: a requester being resumed counts its own swap
 * as room (swap_room), since the pages it waits for bring that swap back
 * and its host copy goes once they are uploaded. Otherwise its swap, still
 * on host while it waits, could keep out the very victim that makes room
 * for it, and its allocation would wait forever. So the budget may be
 * passed by at most one client's swap, that of a client being brought
 * back: until its upload, or, should its resume time out after all (the
 * victims' pages taken meanwhile), until it comes back, frees those pages
 * or closes.
 *
 * Swapping: the device is idle (pie__wait_idle), the pages' KV bytes go to
 * c->swap_buf (entry j at j * page_bytes, its fill in swap_fill[j]), each
 * handle becomes HANDLE_SWAPPED with its entry in hd->swap, and the
 * physical pages are released. The client is `suspended` while it has
 * entries. What needs no device page is answered from the swap:
 * pie_ctl_page_fill reads swap_fill; pie_ctl_page_free and client close
 * drop entries (pie__swap_drop moves the last entry into the hole, so the
 * entries stay dense). The other entry points that use the client's handles
 * call pie__client_resume (page_alloc of n, with its caller's timeout and
 * n) or RESUME_NOW(c) (forward submit, copy, export: they have no timeout
 * and never wait; PIE_EAGAIN while the pool has no room) first. A resume
 * waits for free pages (possibly suspending someone else), uploads the
 * bytes and repoints the handles: the client sees the same handles and the
 * same KV bytes, so its outputs are unchanged. pie_ctl_client_resume is the
 * explicit wait (the runtime polls it with timeout 0 and parks the fiber
 * in between, so no worker thread blocks).
 *
 * Working set: an allocation of n pages on a suspended client brings its
 * swap back only once the swap and the n new pages fit together (the
 * resume waits for, and may suspend others for, n_swap + n), and takes
 * the n pages in the same locked section as those for its swap: the upload
 * drops mu while it waits for the device, and pages left free then could
 * go to another client, leaving the allocation to wait again with its
 * client back on the device, a victim once more before any progress. A
 * swapped-out process is let back in only when what it needs now fits,
 * which is how a paging system keeps from thrashing: otherwise two polling
 * clients on a pool too small for both took turns, each resume swapping
 * the other out and the allocation behind it failing for want of its new
 * pages, a swap per poll and no allocation ever served (test
 * suspend_ping_pong). So a client is swapped out only when that covers
 * what an allocation lacks, and when it comes back, the call that brought it
 * (an allocation, which has its pages by then, a forward, copy or export)
 * goes on under the same hold of mu, or pie_ctl_client_resume protects it
 * until its next call: it is never swapped out again between coming back
 * and the call it came back for.
 *
 * Resuming: the client stays `suspended` and is also `resuming` from the
 * start of the wait to the end of the upload, so no allocation can pick it
 * as a victim meanwhile, and a second thread of the client waits for the
 * first. The resume drops mu while it waits for pages and for the device;
 * the client's own pie_ctl_page_free may drop entries meanwhile (never add
 * any: it is no victim), so the resume waits for room for what is left of
 * its swap, re-read after every wake (pie__swap_drop wakes it), returns as
 * soon as nothing is left (need_of in pool.c is 0 then: an allocation
 * behind it takes no pages there and waits as any other), and re-reads
 * n_swap again after waiting for the device (giving back the pages of
 * entries dropped meanwhile).
 *
 * FCFS asks the newest client of the requester's class or lower whose
 * end would return pages (pages it alone references: not exported, not
 * shared through dedup) to end, unless the pages that the clients already
 * asked will so return, plus the allocatable ones, cover the request.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/pie_err.h"
#include "control/ctl_int.h"

/* Pages of c that a swap would release. */
static int32_t swappable(const pie_ctl *ctl, const pie_ctl_client *c)
{
    int32_t n = 0;
    for (int32_t i = 0; i < c->n_h; i++) {
        const ctl_handle *hd = &c->h[i];
        if (hd->page < 0 || hd->ro || hd->merged) continue;
        const ctl_page *p = &ctl->pages[hd->page];
        if (p->refs == 1 && !PAGE_IS_SHARED(p) && !p->last_writer) n++;
    }
    return n;
}

/* c may be swapped out for req (see the header): idle, of req's class or
 * lower, neither req nor out, coming back or protected already. */
static bool victim_ok(const pie_ctl_client *c, const pie_ctl_client *req)
{
    int32_t floor = req ? req->prio : 0;
    /* resuming: also once its own page_free emptied its swap (no longer
     * suspended) until its resume ends */
    return c != req && !c->suspended && !c->resuming && !c->resumed &&
           !c->ops && c->prio >= floor;
}

/* Host bytes the swap budget leaves for the victims of req. A requester
 * being resumed counts its own swap as room: the pages it waits for bring
 * that swap back to the device, and its host copy goes once they are
 * uploaded (see the header: Swap budget). */
static uint64_t swap_room(const pie_ctl *ctl, const pie_ctl_client *req)
{
    uint64_t cap = ctl->o.max_swap_bytes;
    uint64_t own = req && req->resuming ?
                   (uint64_t)req->n_swap * ctl->b->page_bytes : 0;
    cap = cap + own < cap ? UINT64_MAX : cap + own;
    return cap > ctl->swap_bytes ? cap - ctl->swap_bytes : 0;
}

/* The victim pie__suspend_for takes next: of the lowest class, newest
 * first within it, among those whose pages fit the budget left. */
static pie_ctl_client *pick_victim(pie_ctl *ctl, pie_ctl_client *req)
{
    pie_ctl_client *best = NULL;
    uint64_t pb = ctl->b->page_bytes, room = swap_room(ctl, req);
    for (pie_ctl_client *c = ctl->clients; c; c = c->next) {  /* newest 1st */
        if (!victim_ok(c, req) || (best && c->prio <= best->prio)) continue;
        int32_t n = swappable(ctl, c);
        if (n > 0 && (uint64_t)n * pb <= room) best = c;
    }
    return best;
}

int32_t pie__victim_pages(pie_ctl *ctl, pie_ctl_client *req, int32_t need,
                          bool waiting)
{
    /* pick_victim's order, class by class: a victim that does not fit the
     * budget left when its turn comes never fits later (the room only
     * shrinks), so one pass per class takes what its picks would take */
    uint64_t pb = ctl->b->page_bytes, room = swap_room(ctl, req);
    int32_t floor = req ? req->prio : 0, got = 0;
    for (int32_t p = CTL_N_PRIO - 1; p >= floor && got < need; p--)
        for (pie_ctl_client *c = ctl->clients; c && got < need; c = c->next) {
            if (c->prio != p || !victim_ok(c, req)) continue;
            int32_t n = swappable(ctl, c);
            if (n == 0 || (uint64_t)n * pb > room) continue;
            room -= (uint64_t)n * pb;
            if (!waiting || CLIENT_IS_WAITING(c)) got += n;
        }
    return got;
}

/* Swaps c's exclusive pages to host memory; returns pages released. The
 * device is idle and mu held throughout (pie__suspend_for). */
static int32_t suspend_client(pie_ctl *ctl, pie_ctl_client *c)
{
    PIE_ASSERT(!c->suspended && c->n_swap == 0);
    int32_t n = swappable(ctl, c);
    uint64_t pb = ctl->b->page_bytes;
    int32_t *pages = malloc(n * sizeof *pages), *idx = malloc(n * sizeof *idx);
    unsigned char *buf = malloc((size_t)n * pb);
    int32_t *fill = malloc(n * sizeof *fill);
    if (!pages || !idx || !buf || !fill) goto fail;
    int32_t k = 0;
    for (int32_t i = 0; i < c->n_h; i++) {
        ctl_handle *hd = &c->h[i];
        if (hd->page < 0 || hd->ro || hd->merged) continue;
        ctl_page *p = &ctl->pages[hd->page];
        if (p->refs != 1 || PAGE_IS_SHARED(p) || p->last_writer) continue;
        pages[k] = hd->page;
        idx[k] = i;
        fill[k] = p->fill;
        k++;
    }
    if (pie__backend_rc(ctl, ctl->b->ops->download(ctl->b, pages, n, buf)) < 0)
        goto fail;
    for (int32_t j = 0; j < n; j++) {
        ctl_handle *hd = &c->h[idx[j]];
        ctl_page *p = &ctl->pages[pages[j]];
        p->owner = NULL;
        p->owner_h = -1;
        hd->page = HANDLE_SWAPPED;
        hd->swap = j;
        pie__page_unref(ctl, pages[j]);
    }
    c->swap_buf = buf;
    c->swap_fill = fill;
    c->n_swap = n;
    c->suspended = true;
    ctl->swap_bytes += (uint64_t)n * pb;
    ctl->st.suspensions++;
    free(pages);
    free(idx);
    return n;
fail:
    free(pages), free(idx), free(buf), free(fill);
    return 0;
}

bool pie__suspend_for(pie_ctl *ctl, int32_t need, pie_ctl_client *requester)
{
    bool acted = false;
    for (;;) {
        /* a swap that cannot serve the allocation costs its victim the
         * device for nothing: wait instead (the admission looks again as
         * pages come free) */
        int32_t lack = need - AVAILABLE(ctl);
        if (lack <= 0 || pie__victim_pages(ctl, requester, lack, false) < lack)
            return acted;
        if (ctl->running) {
            /* the download needs the device idle. Waiting drops mu: pages
             * may come free (enough, even), victims end or submit work,
             * the requester itself be swapped out (its need is then
             * another). So the admission looks again from the top; it
             * holds mu from here, and the device stays idle for the swaps
             * its next call here makes if they still serve */
            pie__wait_idle(ctl);
            return true;
        }
        pie_ctl_client *v = ctl->lost ? NULL   /* no download: device lost */
                                      : pick_victim(ctl, requester);
        if (!v || suspend_client(ctl, v) == 0) return acted;
        acted = true;
    }
}

/* Pages that closing c would return to the pool: those only c references
 * (its handle and its own pending ops). Not imported or merged ones, nor
 * pages an export lists or another client merged into (SHARED): those stay
 * when c closes. */
static int32_t returnable(const pie_ctl *ctl, const pie_ctl_client *c)
{
    int32_t n = 0;
    for (int32_t i = 0; i < c->n_h; i++) {
        const ctl_handle *hd = &c->h[i];
        if (hd->page >= 0 && !hd->ro && !hd->merged &&
            !PAGE_IS_SHARED(&ctl->pages[hd->page]))
            n++;
    }
    return n;
}

/* Pages that clients asked to end will return when their owners close
 * them. An owner that never closes its client holds further evictions off
 * for requests these pages cover (the on_evict contract is to end it). */
static int32_t evicted_pages(const pie_ctl *ctl)
{
    int32_t n = 0;
    for (const pie_ctl_client *c = ctl->clients; c; c = c->next)
        if (c->evicted) n += returnable(ctl, c);
    return n;
}

bool pie__evict_one(pie_ctl *ctl, int32_t n, pie_ctl_client *req)
{
    /* a polling allocation comes back here before the victims it asked
     * have closed: ask nobody while their pages cover it */
    if (AVAILABLE(ctl) + evicted_pages(ctl) >= n) return false;
    int32_t floor = req ? req->prio : 0;
    pie_ctl_client *v = ctl->clients;            /* newest first */
    while (v && (v == req || v->evicted || !v->on_evict || v->prio < floor ||
                 returnable(ctl, v) == 0))
        v = v->next;
    if (!v) return false;
    v->evicted = true;
    v->evicting++;
    ctl->st.evictions++;
    pthread_mutex_unlock(&ctl->mu);
    v->on_evict(v->evict_user, v);
    pthread_mutex_lock(&ctl->mu);
    v->evicting--;
    pthread_cond_broadcast(&ctl->pool_cv);
    return true;
}

void pie__swap_drop(pie_ctl_client *c, int32_t j)
{
    pie_ctl *ctl = c->ctl;
    uint64_t pb = ctl->b->page_bytes;
    int32_t last = c->n_swap - 1;
    PIE_ASSERT(c->suspended && j >= 0 && j <= last);
    if (j != last) {
        memcpy(c->swap_buf + (size_t)j * pb, c->swap_buf + (size_t)last * pb,
               pb);
        c->swap_fill[j] = c->swap_fill[last];
        for (int32_t i = 0; i < c->n_h; i++)
            if (c->h[i].page == HANDLE_SWAPPED && c->h[i].swap == last) {
                c->h[i].swap = j;
                break;
            }
    }
    c->n_swap = last;
    ctl->swap_bytes -= pb;
    pthread_cond_broadcast(&ctl->pool_cv);   /* a resume needs less now */
    if (last == 0) {
        pie__client_drop_swap(c);
        return;
    }
    unsigned char *buf = realloc(c->swap_buf, (size_t)last * pb);
    if (buf) c->swap_buf = buf;            /* (a failed shrink keeps it) */
}

void pie__client_drop_swap(pie_ctl_client *c)
{
    c->ctl->swap_bytes -= (uint64_t)c->n_swap * c->ctl->b->page_bytes;
    free(c->swap_buf);
    free(c->swap_fill);
    c->swap_buf = NULL;
    c->swap_fill = NULL;
    c->n_swap = 0;
    c->suspended = false;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Waits until no other thread of c is resuming it, up to timeout_ms since
 * t0: 0 or PIE_EBUSY. */
static int wait_other_resume(pie_ctl_client *c, int32_t timeout_ms, double t0)
{
    pie_ctl *ctl = c->ctl;
    double deadline = t0 + timeout_ms / 1000.0;
    while (c->resuming) {
        if (timeout_ms == 0 || (timeout_ms > 0 && now_s() >= deadline))
            return pie_err_set(PIE_EBUSY, "control: client '%s' is being "
                               "resumed by another thread", c->name);
        pie__pool_cv_wait(ctl, timeout_ms, deadline);
    }
    return 0;
}

/* Ends a resume of c with rc (mu held). */
static int resume_end(pie_ctl_client *c, int rc)
{
    c->resuming = false;
    pthread_cond_broadcast(&c->ctl->pool_cv);   /* wait_other_resume */
    return rc < 0 ? pie_err_wrap(rc, "control: resuming client '%s'", c->name)
                  : 0;
}

/* Takes pages for all of c's swap entries and `extra` more (those of the
 * allocation it resumes for) in one locked section, once the pool has room
 * for all of them, then waits for the device to be idle: *out gets the
 * extra pages first, then one per entry, or stays NULL when nothing was
 * taken (the swap emptied before: the allocation then waits on its own).
 * Returns how many entries (c->n_swap; mu stays held from here to the
 * upload), or pie__wait_for_pages' errors. Re-reads n_swap whenever mu was
 * dropped. */
static int32_t take_swap_pages(pie_ctl_client *c, int32_t extra,
                               int32_t timeout_ms, double t0, int32_t **out,
                               bool *waited)
{
    pie_ctl *ctl = c->ctl;
    for (;;) {
        int rc = pie__wait_for_pages(ctl, extra, true,
                                     pie__ms_left(timeout_ms, t0), c, waited);
        if (rc < 0) return rc;
        int32_t n = c->n_swap;                   /* room for these now */
        if (n == 0) return 0;          /* it freed every swapped handle */
        int32_t *pages = malloc((size_t)(extra + n) * sizeof *pages);
        if (!pages) return pie_err_set(PIE_ENOMEM, "control: out of memory");
        /* the allocation's pages too, before mu drops: left free, another
         * client could take them while this one waits for the device, and
         * the allocation would wait again with its client back on the
         * device, a victim again before it made any progress */
        for (int32_t j = 0; j < extra + n; j++) pages[j] = pie__page_take(ctl);
        pie__wait_idle(ctl);
        /* mu was dropped: give back the pages of entries dropped since */
        while (n > c->n_swap) pie__page_unref(ctl, pages[extra + --n]);
        if (n == c->n_swap) {
            *out = pages;
            return n;
        }
        /* more entries than pages (never while resuming: no victim) */
        for (int32_t j = 0; j < extra + n; j++) pie__page_unref(ctl, pages[j]);
        free(pages);
    }
}

/* Points c's swapped handles at pages[] (one per swap entry, uploaded) and
 * drops its swap: c is no longer suspended. */
static void swap_in(pie_ctl_client *c, const int32_t *pages)
{
    pie_ctl *ctl = c->ctl;
    for (int32_t i = 0; i < c->n_h; i++) {
        ctl_handle *hd = &c->h[i];
        if (hd->page != HANDLE_SWAPPED) continue;
        int32_t page = pages[hd->swap];
        ctl->pages[page].fill = c->swap_fill[hd->swap];
        ctl->pages[page].owner = c;
        ctl->pages[page].owner_h = i;
        hd->page = page;
    }
    pie__client_drop_swap(c);
}

/* pie__client_resume; *back (may be NULL) tells whether pages came back. */
static int resume(pie_ctl_client *c, int32_t extra, int32_t *extra_pages,
                  int32_t timeout_ms, bool *waited, bool *back)
{
    pie_ctl *ctl = c->ctl;
    double t0 = now_s();
    if (back) *back = false;
    if (ctl->lost && c->suspended) return pie__lost_err(ctl);
    int rc = wait_other_resume(c, timeout_ms, t0);
    if (rc < 0 || !c->suspended) return rc;
    c->resuming = true;                   /* not a victim from here on */
    int32_t *pages = NULL;
    int32_t n = take_swap_pages(c, extra, timeout_ms, t0, &pages, waited);
    if (n < 0) return resume_end(c, n);
    if (!pages) return resume_end(c, 0);    /* its swap emptied: none taken */
    rc = ctl->lost ? pie__lost_err(ctl)
         : n > 0 ? pie__backend_rc(ctl, ctl->b->ops->upload(ctl->b, pages + extra,
                                                         n, c->swap_buf))
         : 0;
    if (rc < 0) {
        for (int32_t j = 0; j < extra + n; j++) pie__page_unref(ctl, pages[j]);
        free(pages);
        return resume_end(c, rc);
    }
    swap_in(c, pages + extra);
    if (extra > 0) memcpy(extra_pages, pages, extra * sizeof *pages);
    free(pages);
    if (back) *back = n > 0;
    resume_end(c, 0);
    return extra;
}

int pie__client_resume(pie_ctl_client *c, int32_t extra, int32_t *pages,
                       int32_t timeout_ms, bool *waited)
{
    return resume(c, extra, pages, timeout_ms, waited, NULL);
}

int pie__client_resume_now(pie_ctl_client *c)
{
    int rc = pie__client_resume(c, 0, NULL, 0, NULL);
    if (rc != PIE_EBUSY) return rc;
    return pie_err_set(PIE_EAGAIN, "control: client '%s' is swapped out and "
                       "the KV pool has no room for its %d pages yet; retry "
                       "(pie_ctl_client_resume waits)", c->name, c->n_swap);
}

int pie_ctl_client_resume(pie_ctl_client *c, int32_t timeout_ms)
{
    pthread_mutex_lock(&c->ctl->mu);
    CLIENT_CALL(c);
    bool back, waited = false;
    int rc = resume(c, 0, NULL, timeout_ms, &waited, &back);
    if (back) atomic_store(&c->resumed, true);   /* for its next call */
    pthread_mutex_unlock(&c->ctl->mu);
    return rc;
}

void pie__client_call(pie_ctl_client *c)
{
    /* a victim again: allocations that wait beside it look again, once
     * the call drops mu (under mu: none checks it as protected and then
     * sleeps past this) */
    if (atomic_exchange(&c->resumed, false)) pie__victims_changed(c->ctl);
}

int pie__client_call_fail(pie_ctl_client *c, int rc)
{
    if (!atomic_load(&c->resumed)) return rc;   /* (set only under mu) */
    pthread_mutex_lock(&c->ctl->mu);
    pie__client_call(c);
    pthread_mutex_unlock(&c->ctl->mu);
    return rc;
}
