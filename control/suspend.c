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
 * call since (`resumed`, cleared by CLIENT_CALL at every entry point, a
 * failing one included). Only pages the victim holds alone (one
 * reference, not exported, not deduplicated, writable) are swapped; shared
 * pages stay where they are.
 *
 * Swap budget: the swaps of all clients together (ctl->swap_bytes) stay
 * within opts.max_swap_bytes (default: the pool's size). A victim whose
 * pages would not fit is skipped; once the budget is spent the policy is
 * plain waiting until a suspended client resumes, frees its swapped pages
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
 * call RESUME(c, n, timeout) (page_alloc of n, with its caller's timeout)
 * or RESUME_NOW(c) (forward submit, copy, export: they have no timeout and
 * never wait; PIE_EAGAIN while the pool has no room) first. A resume waits
 * for free pages (possibly suspending someone else), uploads the bytes and
 * repoints the handles: the client sees the same handles and the same KV
 * bytes, so its outputs are unchanged. pie_ctl_client_resume is the
 * explicit wait (the runtime polls it with timeout 0 and parks the fiber in
 * between, so no worker thread blocks).
 *
 * Working set: an allocation of n pages on a suspended client brings its
 * swap back only once the swap and the n new pages fit together (the
 * resume waits for, and may suspend others for, n_swap + n). A swapped-out
 * process is let back in only when what it needs now fits, which is how
 * a paging system keeps from thrashing: otherwise two polling clients on
 * a pool too small for both took turns, each resume swapping the other
 * out and the allocation behind it failing for want of its new pages, a
 * swap per poll and no allocation ever served (test suspend_ping_pong).
 * Now a client leaves the device without its own progress at most once
 * (a victim of a request that still has to wait), and comes back only
 * with the room to go on.
 *
 * Resuming: the client stays `suspended` and is also `resuming` from the
 * start of the wait to the end of the upload, so no allocation can pick it
 * as a victim meanwhile, and a second thread of the client waits for the
 * first. The resume drops mu while it waits for pages and for the device;
 * the client's own pie_ctl_page_free may drop entries meanwhile (never add
 * any: it is no victim), so the resume waits for room for what is left of
 * its swap, re-read after every wake (pie__swap_drop wakes it), returns as
 * soon as nothing is left, and re-reads n_swap again after waiting for the
 * device.
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

static pie_ctl_client *pick_victim(pie_ctl *ctl, pie_ctl_client *req)
{
    pie_ctl_client *best = NULL;
    int32_t floor = req ? req->prio : 0;
    uint64_t pb = ctl->b->page_bytes;
    uint64_t room = ctl->o.max_swap_bytes - ctl->swap_bytes;
    for (pie_ctl_client *c = ctl->clients; c; c = c->next) {  /* newest 1st */
        /* resuming: also once its own page_free emptied its swap (no
         * longer suspended) until its resume ends */
        if (c == req || c->suspended || c->resuming || c->resumed ||
            c->ops || c->prio < floor)
            continue;
        int32_t n = swappable(ctl, c);
        if (n == 0 || (uint64_t)n * pb > room) continue;
        if (!best || c->prio > best->prio) best = c;
    }
    return best;
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
    if (ctl->b->ops->download(ctl->b, pages, n, buf) < 0) goto fail;
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

int32_t pie__suspend_for(pie_ctl *ctl, int32_t n, pie_ctl_client *requester)
{
    int32_t got = 0;
    while (got < n) {
        if (!pick_victim(ctl, requester)) break;
        /* the download needs the device idle; waiting drops mu, and the
         * victim may end or submit meanwhile: pick it after the wait, and
         * keep mu from there to the end of its swap */
        pie__wait_idle(ctl);
        pie_ctl_client *v = pick_victim(ctl, requester);
        if (!v) break;
        int32_t k = suspend_client(ctl, v);
        if (k == 0) break;
        got += k;
    }
    return got;
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

/* What is left at now of a timeout of timeout_ms that began at t0 (<0 and 0
 * stay as they are). */
static int32_t ms_left(int32_t timeout_ms, double t0)
{
    if (timeout_ms <= 0) return timeout_ms;
    double left = timeout_ms - (now_s() - t0) * 1000.0;
    return left > 0 ? (int32_t)left : 0;
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

/* Takes pages for all of c's swap entries once the pool has room for them
 * and `extra` more pages (not taken here) and the device is idle; returns
 * how many (c->n_swap; *out holds them unless 0; mu stays held from here
 * to the upload), or pie__wait_for_pages' errors. Re-reads n_swap
 * whenever mu was dropped. */
static int32_t take_swap_pages(pie_ctl_client *c, int32_t extra,
                               int32_t timeout_ms, double t0, int32_t **out)
{
    pie_ctl *ctl = c->ctl;
    for (;;) {
        int rc = pie__wait_for_pages(ctl, extra, true,
                                     ms_left(timeout_ms, t0), c);
        if (rc < 0) return rc;
        int32_t n = c->n_swap;                   /* room for these now */
        if (n == 0) return 0;          /* it freed every swapped handle */
        int32_t *pages = malloc(n * sizeof *pages);
        if (!pages) return pie_err_set(PIE_ENOMEM, "control: out of memory");
        for (int32_t j = 0; j < n; j++) pages[j] = pie__page_take(ctl);
        pie__wait_idle(ctl);
        /* mu was dropped: give back the pages of entries dropped since */
        while (n > c->n_swap) pie__page_unref(ctl, pages[--n]);
        if (n == c->n_swap) {
            *out = pages;
            return n;
        }
        /* more entries than pages (never while resuming: no victim) */
        while (n > 0) pie__page_unref(ctl, pages[--n]);
        free(pages);
    }
}

/* pie__client_resume; *back (may be NULL) tells whether pages came back. */
static int resume(pie_ctl_client *c, int32_t extra, int32_t timeout_ms,
                  bool *back)
{
    pie_ctl *ctl = c->ctl;
    double t0 = now_s();
    if (back) *back = false;
    int rc = wait_other_resume(c, timeout_ms, t0);
    if (rc < 0 || !c->suspended) return rc;
    c->resuming = true;                   /* not a victim from here on */
    int32_t *pages = NULL;
    int32_t n = take_swap_pages(c, extra, timeout_ms, t0, &pages);
    if (n < 0) return resume_end(c, n);
    rc = n > 0 ? ctl->b->ops->upload(ctl->b, pages, n, c->swap_buf) : 0;
    if (rc < 0) {
        for (int32_t j = 0; j < n; j++) pie__page_unref(ctl, pages[j]);
        free(pages);
        return resume_end(c, rc);
    }
    for (int32_t i = 0; i < c->n_h; i++) {
        ctl_handle *hd = &c->h[i];
        if (hd->page != HANDLE_SWAPPED) continue;
        int32_t page = pages[hd->swap];
        ctl->pages[page].fill = c->swap_fill[hd->swap];
        ctl->pages[page].owner = c;
        ctl->pages[page].owner_h = i;
        hd->page = page;
    }
    free(pages);
    pie__client_drop_swap(c);
    if (back) *back = n > 0;
    return resume_end(c, 0);
}

int pie__client_resume(pie_ctl_client *c, int32_t extra, int32_t timeout_ms)
{
    return resume(c, extra, timeout_ms, NULL);
}

int pie__client_resume_now(pie_ctl_client *c)
{
    int rc = pie__client_resume(c, 0, 0);
    if (rc != PIE_EBUSY) return rc;
    return pie_err_set(PIE_EAGAIN, "control: client '%s' is swapped out and "
                       "the KV pool has no room for its %d pages yet; retry "
                       "(pie_ctl_client_resume waits)", c->name, c->n_swap);
}

int pie_ctl_client_resume(pie_ctl_client *c, int32_t timeout_ms)
{
    CLIENT_CALL(c);
    pthread_mutex_lock(&c->ctl->mu);
    bool back;
    int rc = resume(c, 0, timeout_ms, &back);
    if (back) atomic_store(&c->resumed, true);   /* for its next call */
    pthread_mutex_unlock(&c->ctl->mu);
    return rc;
}
