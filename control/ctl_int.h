/*
 * ctl_int.h — private structures of the control layer (the control folder only).
 *
 * One mutex, ctl->mu, guards everything in pie_ctl, every client and every
 * op except an op's reference count (atomic) and its state/status (written
 * under mu, read lock-free by poll/result after the state turns DONE). A
 * client's `resumed` flag is written under mu only, and atomic so that a
 * call failing before it takes mu can see without the lock that there is
 * nothing to clear (CLIENT_CALL_FAIL).
 *
 * An op is one submitted forward or page copy. Its life:
 *
 *   WAITING  submitted; some dependency (chained parent, earlier writer of a
 *            page it touches) has not completed; on no list, counted in its
 *            parents' dependent arrays. A parent that fails or is
 *            cancelled cancels it (cancel_dependents in sched.c), except a
 *            copy that reads none of the parent's slots (copy_unaffected)
 *   READY    all dependencies done; on ctl->ready[priority], ordered by seq
 *   STAGED   copied into the staging batch (ctl->staging)
 *   RUNNING  in the batch the device thread runs; a chunked prefill goes
 *            back to READY after each chunk until all its tokens ran
 *   DONE     status set; callbacks queued; references to pages dropped;
 *            input copies freed, and results too unless it succeeded
 *            (op_shed in sched.c)
 *
 * References to an op: the submitter (until pie_ctl_future_release), the
 * control layer until DONE, each chained child until it took its token
 * (becomes ready, or is DONE; none where the parent was done at submit),
 * each parent whose dependent array lists it (until that parent is DONE,
 * or sweeps its DONE dependents out as the array fills: add_dep in ctl.c),
 * each later writer of one of its pages that was wired while it was the
 * page's last_writer (ctl_write.prev, until that writer is finished), and
 * the notify list until its callback ran and its waiters were woken.
 * Freed when the count hits zero.
 */
#ifndef PIE_CTL_INT_H
#define PIE_CTL_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "control/control.h"

#define CTL_N_PRIO 8

/* Most probe values (out->values entries, with as many ids) and most mask
 * runs (attention or logit) that one forward may ask for and one batch may
 * hold: 2^28 floats and ids are 2 GiB, and every count and offset of them
 * (int32 counts and capacities, uint32 indptr) stays far from overflow. A
 * forward over a limit is refused at submit; a batch stops taking forwards
 * before one would pass it, so a lone forward always fits. */
#define CTL_MAX_VALUES (1 << 28)
#define CTL_MAX_RUNS   (1 << 28)

enum { OP_WAITING, OP_READY, OP_STAGED, OP_RUNNING, OP_DONE };
enum { OP_FORWARD, OP_COPY };

typedef struct ctl_op ctl_op;

typedef struct ctl_dep {        /* an op waiting on this one               */
    ctl_op *op;
    bool    chain;              /* true: takes a token from our output      */
} ctl_dep;

typedef struct ctl_chain {
    int32_t token_idx;
    ctl_op *from;               /* holds a reference; NULL once the token
                                   is taken (at submit where from was done
                                   already, else when op becomes ready)     */
    int32_t row;
} ctl_chain;

typedef struct ctl_write {      /* a page this op writes: for rollback      */
    int32_t page;
    int32_t old_fill;
    int32_t new_fill;
    ctl_op *prev;               /* the page's last_writer when this op was
                                   wired (a reference, dropped by op_shed):
                                   last_writer again if this op ends first */
} ctl_write;

struct ctl_op {
    atomic_int      refs;
    _Atomic int     state;           /* OP_*                                */
    int             status;          /* valid when DONE                     */
    int             kind;            /* OP_FORWARD | OP_COPY                */
    pie_ctl        *ctl;
    pie_ctl_client *c;               /* NULL once the client closed         */
    int32_t         prio;
    uint64_t        seq;             /* submission order                    */
    bool            cancel_req;      /* cancel while RUNNING                */
    bool            ran;             /* some chunk reached the device       */
    int32_t         n_pending;       /* dependencies not yet DONE           */
    ctl_dep        *deps;            /* ops that depend on us               */
    int32_t         n_deps, cap_deps;
    ctl_op         *cancel_up;       /* cancel_dependents' walk: the op we  */
    int32_t         cancel_i;        /* were reached from, next dep to see  */
    ctl_op         *next, *prev;     /* ready list                          */
    ctl_op         *cnext, *cprev;   /* client's op list                    */
    ctl_op         *nnext;           /* notify list                         */
    pie_ctl_done_fn done;
    void           *user;
    pthread_cond_t  cv;              /* broadcast by pie__unlock after DONE
                                        (on the notify list if n_waiters)  */
    int32_t         n_waiters;       /* threads in pie_ctl_future_wait      */
    /* forward (copied from pie_ctl_forward; pages are physical) */
    int32_t         n_tokens;
    int32_t        *tokens;          /* (n_tokens)                          */
    int32_t        *positions;       /* (n_tokens)                          */
    int32_t         n_pages;
    int32_t        *pages;           /* (n_pages) physical, each ref'ed     */
    int32_t         last_page_len;
    int32_t         kv_len;
    uint32_t       *mask_indptr;     /* (n_tokens+1) or NULL                */
    uint32_t       *mask_runs;
    int32_t         n_outputs;
    int32_t        *output_idx;      /* (n_outputs) local token index       */
    pie_sampler    *samplers;        /* (n_outputs), ids point into idbuf   */
    int32_t        *idbuf;
    uint32_t       *lm_indptr;       /* (n_outputs+1) or NULL               */
    uint32_t       *lm_runs;
    int32_t         n_chains;
    ctl_chain      *chains;
    int32_t         n_writes;
    ctl_write      *writes;
    int32_t         done_tokens;     /* tokens already run (chunking)       */
    pie_forward_out out;             /* results, rows in op order           */
    /* copy */
    int32_t         cp_src, cp_src_off, cp_dst, cp_dst_off, cp_n;
};

typedef struct ctl_entry {       /* one op's slice in a batch              */
    ctl_op  *op;
    int32_t  tok0, ntok;         /* local token range run in this batch     */
    int32_t  row0, nrow;         /* batch output rows                       */
    int      rc;                 /* once the batch failed: its status run
                                    alone (rerun_each in sched.c)           */
} ctl_entry;

typedef struct ctl_batch {
    int32_t      n_tokens, n_reqs, n_kv, n_outputs, n_mask_runs, n_lm_runs;
    int32_t      n_values;
    bool         any_mask, any_lm;
    int32_t     *tokens, *positions, *qo_indptr;
    int32_t     *kv_indices, *kv_indptr, *last_len;
    uint32_t    *mask_indptr, *mask_runs;
    int32_t     *out_idx;
    int32_t     *row_src;          /* (n_outputs) the op's output index     */
    pie_sampler *samplers;
    uint32_t    *lm_indptr, *lm_runs;
    int32_t      cap_tokens, cap_reqs, cap_kv, cap_outputs, cap_mask,
                 cap_lm, cap_values;
    ctl_entry   *ents;
    ctl_op     **copies;
    int32_t      n_copies, cap_copies;
    pie_forward_out out;
    int          rc;             /* the batched forward's status           */
    bool         lost;           /* a backend call of it said PIE_EDEVLOST */
    char         err[256];       /* the backend's message when rc < 0     */
    double       backend_ns;
} ctl_batch;

/* Physical page metadata. refs counts handles, exports and pending ops. */
typedef struct ctl_page {
    int32_t          refs;
    int32_t          fill;        /* slots written by submitted forwards     */
    int32_t          shared;      /* exports + imports + dedup merges: read-only */
    ctl_op          *last_writer; /* newest not-DONE op writing it          */
    int32_t          next_free;   /* free list link (-1 end)                */
    int32_t          lru_prev, lru_next; /* cached list links (-1 end)      */
    int32_t          hnext;       /* dedup hash chain (-1 end)              */
    bool             hashed;      /* hash/prefix valid (content known)      */
    bool             intable;     /* in the dedup table                     */
    uint64_t         hash;        /* chained content hash when hashed       */
    uint64_t         prefix;      /* the chain hash this page extends       */
    uint32_t         version;     /* bumped on every write into it          */
    pie_ctl_client  *owner;       /* the one writable handle's client ...   */
    int32_t          owner_h;     /* ... and handle index (-1 if none)      */
    uint32_t         mark;        /* scratch stamp of pinned_pages (pool.c) */
} ctl_page;

#define PAGE_IS_FREE(p)     ((p)->refs == 0 && !(p)->intable)
#define PAGE_IS_CACHED(p)   ((p)->refs == 0 && (p)->intable)
#define PAGE_IS_SHARED(p)   ((p)->shared > 0)

#define HANDLE_FREE    (-1)
#define HANDLE_SWAPPED (-2)       /* client suspended: content in swap_buf  */

typedef struct ctl_handle {
    int32_t page;                 /* physical page, or HANDLE_FREE/SWAPPED   */
    int32_t swap;                 /* SWAPPED: index in the client's swap     */
    bool    ro;                   /* imported: read-only                     */
    bool    merged;               /* points to a dedup-shared page           */
    int32_t next_free;            /* free slot list (-1 end)                 */
} ctl_handle;

typedef struct ctl_export {
    char              *name;
    int32_t            n;
    int32_t           *pages;     /* each ref'ed                             */
    pie_ctl_client    *owner;     /* exporter while it is open (its quota
                                     counts these pages), else NULL         */
    struct ctl_export *next;
} ctl_export;

struct pie_ctl_client {
    pie_ctl        *ctl;
    char            name[64];
    int32_t         max_pages;
    int64_t         max_tokens;
    int32_t         prio;
    ctl_handle     *h;            /* handle table; handle = index + 1        */
    int32_t         n_h, cap_h;
    int32_t         max_handles;  /* live handles (pages_held + imports) cap */
    int32_t         free_h;       /* first free slot (-1 none)               */
    int32_t         pages_held;   /* allocated (not imported) handles        */
    int32_t         imports;      /* imported (read-only) handles            */
    int32_t         export_pages; /* pages its live exports list (quota)     */
    int64_t         tokens_used;
    ctl_op         *ops;          /* not-DONE ops (cnext/cprev)              */
    bool            suspended;    /* pages swapped to host (suspend.c)       */
    bool            resuming;     /* a thread of it brings them back: still
                                     suspended, never a victim              */
    atomic_bool     resumed;      /* pie_ctl_client_resume brought its
                                     swap back and it made no call since:
                                     not a victim (CLIENT_CALL clears it,
                                     under mu)                              */
    bool            evicted;      /* FCFS: asked to end                      */
    int32_t         evicting;     /* on_evict calls running                  */
    int32_t         want;         /* pages an allocation waits for, or was
                                     refused with PIE_EBUSY for and may poll
                                     for again (0: not waiting; pool.c)      */
    int32_t         blocked;      /* threads of it sleeping in admission     */
    bool            doomed;       /* picked to break a wait cycle: its
                                     allocation fails with PIE_ENOMEM        */
    int32_t         doom_waiting; /* the cycle it breaks: waiting clients,  */
    int32_t         doom_room;    /* and pages that could still come free   */
    void          (*on_evict)(void *user, pie_ctl_client *c);
    void           *evict_user;
    unsigned char  *swap_buf;     /* n_swap * page_bytes                     */
    int32_t        *swap_fill;    /* (n_swap)                                */
    int32_t         n_swap;       /* swap entries (HANDLE_SWAPPED handles)   */
    pie_ctl_client *next, *prev;
};

struct pie_ctl {
    pie_backend     *b;
    pie_ctl_opts     o;
    int32_t          ps, n_pages, vocab;
    pthread_mutex_t  mu;
    pthread_cond_t   sched_cv;    /* scheduler: new work or batch finished  */
    pthread_cond_t   dev_cv;      /* device thread: a batch to run          */
    pthread_cond_t   pool_cv;     /* pages freed                            */
    pthread_cond_t   idle_cv;     /* the device finished a batch            */
    pthread_t        sched_th, dev_th;
    bool             stop;
    bool             lost;        /* the backend said PIE_EDEVLOST: every op
                                     fails with it, nothing is launched    */
    char             lost_msg[384]; /* "device lost: <backend's message>;
                                     restart ..." (set once, before lost)  */
    /* pool */
    ctl_page        *pages;
    int32_t          free_head, n_free;
    int32_t          lru_head, lru_tail, n_cached; /* CACHED pages, LRU first */
    int32_t         *slot_tok;    /* (n_pages*ps) token written per slot    */
    int32_t         *slot_pos;
    uint64_t        *slot_mask;   /* hash of the slot's mask (0 = causal)   */
    uint64_t        *slot_prefix; /* identity (ids, versions) of the pages
                                     before it when it was written          */
    uint8_t         *slot_known;  /* slot content recorded and current      */
    int32_t         *hbuckets;
    int32_t          n_hbuckets;
    ctl_export      *exports;
    int32_t          n_exports;
    uint64_t         swap_bytes;  /* host bytes of every client's swap,
                                     at most o.max_swap_bytes (suspend.c)   */
    uint32_t         mark_gen;    /* last stamp of pinned_pages/quota_used  */
    /* clients and ops */
    pie_ctl_client  *clients;
    int32_t          n_clients;
    ctl_op          *ready[CTL_N_PRIO], *ready_tail[CTL_N_PRIO];
    int32_t          n_ready;
    uint64_t         seq;
    ctl_op          *notify;      /* completed ops awaiting callbacks or
                                     their waiters' wake-up                */
    ctl_op          *dev_notify;  /* the same, queued by the device thread:
                                     the scheduler thread runs them         */
    int32_t          idle_waiters;/* threads in pie__wait_idle: nothing is
                                     launched until they had the device    */
    /* batches: staging is filled while running is on the device */
    ctl_batch        bat[2];
    ctl_batch       *staging, *running, *finished;
    ctl_batch       *launch;      /* handed to the device thread, not taken */
    double           ovh_ns;      /* control time since the last launch     */
    pie_ctl_stats    st;
    uint64_t         load_compares; /* pages export loads compared byte by
                                     byte with another (a test hook)       */
};

/* pool.c (all with ctl->mu held) */
int  pie__pool_init(pie_ctl *ctl);
void pie__pool_free(pie_ctl *ctl);
void pie__page_ref(pie_ctl *ctl, int32_t page);
void pie__page_unref(pie_ctl *ctl, int32_t page);
/* Resolves handle h of c to its slot; NULL with PIE_EINVAL when invalid. */
ctl_handle *pie__handle_get(pie_ctl_client *c, uint32_t h);
void pie__client_drop_pages(pie_ctl_client *c);
/* Records the content of slots written by a staged chunk. */
void pie__pool_record(pie_ctl *ctl, ctl_op *op, int32_t tok0, int32_t ntok);
/* A staged chunk did not run (its batch failed, or it was unstaged): forgets
 * what pie__pool_record recorded for its slots. */
void pie__pool_forget(pie_ctl *ctl, const ctl_op *op, int32_t tok0,
                      int32_t ntok);
/* A forward that writes page was wired (its last_writer now): the page
 * leaves the dedup table and loses its hash (see pool.c's header). */
void pie__pool_write_wired(pie_ctl *ctl, int32_t page);
/* The chain hash of page's slot records extending prefix (seed model_id;
 * tokens, positions, mask hashes; never 0), as dedup gives a full page and
 * a loaded export's pages are checked against. 0 or PIE_ENOMEM. */
int pie__pool_hash_of(const pie_ctl *ctl, int32_t page, uint64_t prefix,
                      uint64_t *out);
/* The same hash of slot records given as bytes (page_size tokens,
 * positions and mask hashes, unaligned, as a saved page record holds
 * them); needs no lock. */
int pie__pool_hash_bytes(const pie_ctl *ctl, uint64_t prefix,
                         const void *tok, const void *pos, const void *mask,
                         uint64_t *out);
/* After a forward completed: hashes pages it filled, merges duplicates. */
void pie__pool_dedup(pie_ctl *ctl, ctl_op *op);
void pie__pool_copy_record(pie_ctl *ctl, int32_t src, int32_t src_off,
                           int32_t dst, int32_t dst_off, int32_t n);
void pie__pool_stats(pie_ctl *ctl, pie_ctl_stats *s);
void pie__wait_idle(pie_ctl *ctl);
/* PIE_ELIMIT (with a message naming export `name`) when exporting pages[n]
 * (NULL: n fresh pages, as a load takes) would take the distinct pages all
 * exports pin past opts.max_export_pages; else 0. */
int pie__export_cap_check(pie_ctl *ctl, const char *name,
                          const int32_t *pages, int32_t n);
/* For persist.c: takes a FREE (or evicted CACHED) page with refs 1. */
int32_t pie__page_take(pie_ctl *ctl);
void pie__table_insert_if_new(pie_ctl *ctl, int32_t page);
int32_t pie__pool_prefix_plan(pie_ctl *ctl, pie_ctl_client *c,
                              const uint32_t *handles, const ctl_op *op,
                              int32_t *twins, int32_t cap);
void pie__pool_prefix_apply(pie_ctl *ctl, pie_ctl_client *c,
                            const uint32_t *handles, ctl_op *op,
                            const int32_t *twins, int32_t n);

/* suspend.c (mu held) */
/* Makes room for an allocation that needs `need` pages in all by
 * suspending idle clients of the same or lower priority than requester
 * (swap to host, within the swap budget), only while the victims' pages
 * together cover what the pool lacks of need (see suspend.c). True when
 * it swapped someone out or dropped mu to wait for the device (what the
 * pool holds, and the requester itself, may have changed: the caller
 * looks again); false when it did neither. */
bool pie__suspend_for(pie_ctl *ctl, int32_t need, pie_ctl_client *requester);
/* Pages that suspending victims for requester could free, as
 * pie__suspend_for would pick them (each within what is left of the swap
 * budget), counting up to need; with waiting, only those of clients that
 * wait for pages (CLIENT_IS_WAITING; the wait-cycle check). Changes
 * nothing. */
int32_t pie__victim_pages(pie_ctl *ctl, pie_ctl_client *requester,
                          int32_t need, bool waiting);
/* FCFS: unless the available pages plus those that clients already asked
 * to end will return at close cover n, asks the newest eligible client
 * whose end returns pages to end (unlocks around the call). True when one
 * was asked. */
bool pie__evict_one(pie_ctl *ctl, int32_t n, pie_ctl_client *requester);
/* Brings a suspended client's pages back, waiting up to timeout_ms (0: not
 * at all, <0: forever) for room for what is left of its swap (its own
 * page_free may drop entries meanwhile) together with `extra` more pages
 * (those of the allocation it resumes for, see suspend.c), and takes those
 * too, writing them to pages[extra] (refs 1, no handle yet). Returns extra
 * once it holds all its pages and took them; 0 when it took none, which is
 * when c's swap emptied before any page was taken (c is no longer
 * suspended: the caller allocates as usual), or extra is 0; or
 * pie__wait_for_pages' errors (PIE_EBUSY: no room yet, retry). Drops mu
 * while it waits. *waited as for pie__wait_for_pages. */
int  pie__client_resume(pie_ctl_client *c, int32_t extra, int32_t *pages,
                        int32_t timeout_ms, bool *waited);
/* The same for calls without a timeout and without new pages: no wait;
 * PIE_EAGAIN when the pool has no room for the pages now. */
int  pie__client_resume_now(pie_ctl_client *c);
/* Every entry point that needs c's pages on the device, other than
 * page_alloc (which passes its pages to pie__client_resume), calls this
 * once it holds mu. */
#define RESUME_NOW(c) ((c)->suspended ? pie__client_resume_now(c) : 0)
/* Every pie_ctl_* function that takes a client ends the protection that
 * pie_ctl_client_resume gave it (see suspend.c: Working set), whatever the
 * call does or however it fails: CLIENT_CALL(c) right after it takes mu,
 * before its work, and CLIENT_CALL_FAIL(c, rc) on each path that returns
 * rc without taking mu (a bad argument, out of memory). Where c was
 * protected, waiting allocations look again (pie__victims_changed); they
 * wake only once the call drops mu, so none swaps c out between the end
 * of its protection and the work the call does under that hold. (Ending
 * it before the call took mu left such a gap: test
 * resume_protect_window.) */
#define CLIENT_CALL(c) pie__client_call(c)                 /* mu held */
#define CLIENT_CALL_FAIL(c, rc) pie__client_call_fail(c, rc) /* no mu */
void pie__client_call(pie_ctl_client *c);
/* Takes mu (only where c is protected) to end the protection; returns rc. */
int  pie__client_call_fail(pie_ctl_client *c, int rc);
/* Drops swap entry j of suspended c (its handle was dropped): the last
 * entry moves into its place. */
void pie__swap_drop(pie_ctl_client *c, int32_t j);
/* Frees c's swap; c is no longer suspended. */
void pie__client_drop_swap(pie_ctl_client *c);

/* pool.c, admission (mu held) */
#define AVAILABLE(ctl) ((ctl)->n_free + (ctl)->n_cached)   /* allocatable */
/* c counts as waiting in wait-cycle detection (see pool.c's header) */
#define CLIENT_IS_WAITING(c) ((c)->want > 0 && !(c)->doomed && !(c)->evicted)
/* Waits until n pages are allocatable for requester (see pool.c's header:
 * policy, refusals, wait cycles); 0, PIE_EBUSY (timed out), PIE_ENOMEM
 * (waiting cannot help) or PIE_ECANCELED (shutting down). With swap (a
 * resume): n more than requester has swap entries, re-read whenever mu
 * was dropped (entries it frees meanwhile shrink the wait), and nothing
 * once it has none left (0 at once: the resume is over). Without swap,
 * 0 at once also when requester was swapped out meanwhile (its need is
 * now its swap and n: the caller resumes it). waited (may be NULL) is the
 * caller's flag for stats.alloc_waits, which counts a call (an
 * allocation, a resume) once however many waits it goes through: counted
 * and set at its first sleep unless already set. */
int  pie__wait_for_pages(pie_ctl *ctl, int32_t n, bool swap,
                         int32_t timeout_ms, pie_ctl_client *requester,
                         bool *waited);
/* What is left at now of a timeout of timeout_ms that began at t0 (s, on
 * CLOCK_REALTIME); <0 and 0 stay as they are. */
int32_t pie__ms_left(int32_t timeout_ms, double t0);
/* Sleeps on pool_cv (mu held) until signalled or past deadline (s, as
 * now_s; timeout_ms < 0: no deadline); true when the deadline passed. */
bool pie__pool_cv_wait(pie_ctl *ctl, int32_t timeout_ms, double deadline);
/* c moved on (freed pages, submitted work): it no longer polls for pages,
 * unless one of its threads is blocked in admission. */
void pie__client_not_waiting(pie_ctl_client *c);
/* SUSPEND: a client may have become a victim, or more of its pages
 * swappable (its last op completed, its resume protection ended, a page
 * of it is no longer shared, or no longer read by another client's op:
 * pie__page_unref): wakes the waiting allocations to apply the policy
 * again. Nothing under the other policies. */
void pie__victims_changed(pie_ctl *ctl);

/* sched.c (with ctl->mu held unless noted) */
void pie__op_unref(ctl_op *op);                 /* any thread, no lock    */
void pie__op_complete(pie_ctl *ctl, ctl_op *op, int status);
void pie__ready_insert(pie_ctl *ctl, ctl_op *op);
void pie__make_ready(pie_ctl *ctl, ctl_op *op);
void pie__unstage_all(pie_ctl *ctl);
void pie__batch_free(ctl_batch *B);
int  pie__sched_start(pie_ctl *ctl);             /* without the lock       */
void pie__sched_stop(pie_ctl *ctl);              /* without the lock       */
/* Runs queued callbacks and unlocks ctl->mu. */
void pie__unlock(pie_ctl *ctl);
/* PIE_EDEVLOST with ctl->lost_msg as this thread's message (ctl->lost). */
int  pie__lost_err(pie_ctl *ctl);
/* The device is lost (a backend call said PIE_EDEVLOST with msg): marks
 * the control layer lost once, wakes the scheduler and page waiters. With
 * mu held. */
void pie__device_lost(pie_ctl *ctl, const char *msg);
/* rc of a backend call made with mu held (transfers): PIE_EDEVLOST marks
 * the control layer lost (pie__device_lost). Returns rc. */
int  pie__backend_rc(pie_ctl *ctl, int rc);

#endif
