/*
 * suspend.c — the `suspend` policy under memory pressure: instead of making
 * an allocation wait (or killing someone), swap an idle client's pages to
 * host memory and give them back when it next touches its KV.
 *
 * Victims: clients other than the requester that have no forward or copy
 * pending (an inferlet waiting on a tool call, a message or a timer), whose
 * priority class is the requester's or lower (numerically >=), newest
 * first within the lowest class. Only pages the victim holds alone (one
 * reference, not exported, not deduplicated, writable) are swapped; shared
 * pages stay where they are.
 *
 * Swapping: the device is idle (pie__wait_idle), the pages' KV bytes go to
 * c->swap_buf with their fills, each handle becomes HANDLE_SWAPPED with its
 * index in the swap, and the physical pages are released. The client is
 * `suspended`. Every entry point that reads the client's handles calls
 * RESUME(c) first: it waits for free pages (possibly suspending someone
 * else), uploads the bytes, and repoints the handles: the client sees the
 * same handles and the same KV bytes, so its outputs are unchanged.
 */
#include <stdlib.h>
#include <string.h>

#include "common/pie_err.h"
#include "control/ctl_int.h"

#define RESUME_TIMEOUT_MS 30000

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
    for (pie_ctl_client *c = ctl->clients; c; c = c->next) {  /* newest 1st */
        if (c == req || c->suspended || c->ops || c->prio < floor) continue;
        if (swappable(ctl, c) == 0) continue;
        if (!best || c->prio > best->prio) best = c;
    }
    return best;
}

/* Swaps c's exclusive pages to host memory; returns pages released. The
 * device is idle and mu held throughout (pie__suspend_for). */
static int32_t suspend_client(pie_ctl *ctl, pie_ctl_client *c)
{
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

bool pie__evict_one(pie_ctl *ctl, pie_ctl_client *req)
{
    int32_t floor = req ? req->prio : 0;
    pie_ctl_client *v = ctl->clients;            /* newest first */
    while (v && (v == req || v->evicted || !v->on_evict || v->prio < floor ||
                 v->pages_held == 0))
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

void pie__client_drop_swap(pie_ctl_client *c)
{
    free(c->swap_buf);
    free(c->swap_fill);
    c->swap_buf = NULL;
    c->swap_fill = NULL;
    c->n_swap = 0;
    c->suspended = false;
}

int pie__client_resume(pie_ctl_client *c)
{
    pie_ctl *ctl = c->ctl;
    int32_t n = c->n_swap;
    c->suspended = false;                 /* not a victim while we wait */
    int rc = pie__wait_for_pages(ctl, n, RESUME_TIMEOUT_MS, c);
    int32_t *pages = rc == 0 ? malloc((n ? n : 1) * sizeof *pages) : NULL;
    if (rc == 0 && !pages) rc = pie_err_set(PIE_ENOMEM, "control: oom");
    if (rc < 0) {
        c->suspended = true;
        return pie_err_wrap(rc, "control: resuming client '%s'", c->name);
    }
    for (int32_t j = 0; j < n; j++) pages[j] = pie__page_take(ctl);
    pie__wait_idle(ctl);
    rc = ctl->b->ops->upload(ctl->b, pages, n, c->swap_buf);
    if (rc < 0) {
        for (int32_t j = 0; j < n; j++) pie__page_unref(ctl, pages[j]);
        free(pages);
        c->suspended = true;
        return pie_err_wrap(rc, "control: resuming client '%s'", c->name);
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
    return 0;
}
