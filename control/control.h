/*
 * control.h — the control layer: one scheduler and one KV page pool per
 * backend (device), shared by every client above it.
 *
 * Everything above the backend (the inferlet runtime's host calls, the
 * native generation loop, the CLI) talks to the device only through this
 * interface. The pieces:
 *
 *   pie_ctl         one per backend. Owns a scheduler thread and the page
 *                   pool. All functions below are thread-safe.
 *   pie_ctl_client  one per inferlet instance (or native generation). Opened
 *                   with quotas and a priority; closing it cancels all its
 *                   pending work and returns every page it holds.
 *   page handles    client-local uint32_t names for physical KV pages. A
 *                   client never sees a physical page index. Imported pages
 *                   (from a named export) are read-only.
 *   forwards        one client request for the batched forward: tokens,
 *                   positions, pages (+ last-page fill), optional mask,
 *                   output rows. Submitting returns a future. An input token
 *                   may be CHAINED: taken from output row j of an earlier
 *                   forward future that may not have finished. The scheduler
 *                   resolves chains itself, so a decode loop can queue k
 *                   steps ahead and never wait for its client between steps.
 *
 * Scheduling: work-conserving. Whenever the device is free and anything is
 * ready, the scheduler fires ONE backend batch holding everything ready
 * within the limits (tokens, requests, pages); priority classes in order
 * (0 first), FIFO within a class; long prefills are split into chunks. A
 * forward is ready when every forward it chains from has completed and every
 * earlier forward writing a page it touches has completed (so per-page
 * order is submission order).
 *
 * KV pool policy (pool.c, suspend.c, persist.c): pages are reference
 * counted; every full page gets a chained content hash (tokens, positions,
 * mask, model id, and the hash of the pages before it), identical pages are
 * merged, and a forward whose leading full pages are already cached skips
 * computing them (prefix caching, on unless no_dedup; never changes an
 * output). Freed pages with a hash stay cached until the pool needs them
 * (LRU). Allocation beyond a quota (a client's pages, the pages of its
 * live exports and the imported pages no live export lists) fails at
 * once; a short pool makes the allocation wait up
 * to its timeout (admission), after swapping idle clients to host memory
 * (within a swap budget) when the `suspend` policy is on. An allocation
 * that waiting cannot satisfy fails at once with PIE_ENOMEM, and so does
 * the newest waiter of a wait cycle (every client holding the pages waits
 * for more), so that older requests finish instead of all hanging. Named
 * exports can be saved to a file and loaded after a restart; names that
 * shared pages when saved (aliases) share them again once loaded.
 *
 * Exports outlive their exporter: max_pages counts a client's live exports
 * only while it is open, so a chain of clients that each export and close
 * could otherwise pin the whole pool. All exports together, whether their
 * exporter is open or gone, pin at most max_export_pages distinct pages
 * (default: half the pool). The cap counts every export, not only those
 * whose exporter closed, because closing cannot fail: an export is checked
 * when it is made, and any live export may lose its owner at any time.
 *
 * Futures: each forward future completes exactly once, with 0 (results
 * readable), PIE_ECANCELED (cancelled, or a forward it chains from failed or
 * was cancelled), or another error. A batch the backend fails is run again
 * request by request, so a forward fails only where it fails alone. Once
 * the backend reports PIE_EDEVLOST (its device is lost), every forward and
 * copy, running, queued or submitted later, completes with PIE_EDEVLOST
 * and nothing more reaches the backend; the process lives on (clients
 * close as usual), but only a restart brings the device back. The
 * completion callback given at submission runs once, on the scheduler
 * thread or on the thread that cancelled it; it must not block and must
 * not call back into pie_ctl except pie_ctl_future_poll/result. A future
 * is owned by the submitter until pie_ctl_future_release(); releasing a
 * pending future does not cancel it.
 */
#ifndef PIE_CONTROL_H
#define PIE_CONTROL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"

typedef struct pie_ctl        pie_ctl;
typedef struct pie_ctl_client pie_ctl_client;
typedef struct pie_ctl_future pie_ctl_future;
/* Completion callback of a forward (pie_ctl_forward_submit) or a page
 * copy (pie_ctl_page_copy_cb). */
typedef void (*pie_ctl_done_fn)(void *user, pie_ctl_future *f, int status);

/* ---- engine ------------------------------------------------------------ */

/* What an allocation does when the pool is short (after its quota check,
 * and unless it is refused as hopeless, see pie_ctl_page_alloc):
 *   WAIT     wait up to its timeout for pages to be freed (admission)
 *   SUSPEND  first swap idle clients (no pending work) of the same or lower
 *            priority to host memory, as long as the swapped pages of all
 *            clients fit max_swap_bytes, and only when their pages cover
 *            what the allocation lacks (else it waits, and looks again as
 *            pages come free); they resume when they next need their
 *            pages (see pie_ctl_client_resume), for an allocation only
 *            once its new pages fit beside them, taken with them (so that
 *            two clients never swap each other out in turn with no
 *            allocation served)
 *   FCFS     first ask the newest client of the same or lower priority
 *            whose end would return pages to terminate (its on_evict
 *            callback), as the Pie paper does; its pages return when its
 *            owner closes it. No client is asked while the free pages and
 *            those that the clients already asked (not yet closed) will
 *            return cover the allocation; pages an export lists or dedup
 *            shares do not return and count for neither */
enum { PIE_CTL_POLICY_WAIT = 0, PIE_CTL_POLICY_SUSPEND, PIE_CTL_POLICY_FCFS };

typedef struct pie_ctl_opts {
    int32_t max_batch_tokens;  /* tokens per fire (default 4096; at most the
                                  backend's max_tokens where it has one)    */
    int32_t max_batch_reqs;    /* requests per fire (default 256)           */
    int32_t max_batch_pages;   /* KV pages referenced per fire (default all)*/
    int32_t prefill_chunk;     /* max tokens of one request per fire
                                  (default 512; < 0 = never split)          */
    bool    no_dedup;          /* disable prefix dedup of full pages        */
    int32_t policy;            /* memory pressure (PIE_CTL_POLICY_*)        */
    uint64_t model_id;         /* mixed into page hashes (default: 0)       */
    uint64_t max_swap_bytes;   /* SUSPEND: host memory for swapped pages,
                                  all clients together (default: the pool's
                                  size, n_pages * page_bytes); a client
                                  being brought back counts its own swap as
                                  room, so this may be passed by at most
                                  one client's swap (see suspend.c)         */
    int32_t max_export_pages;  /* distinct pages all named exports together
                                  may pin, their exporters open or closed
                                  (0 = default: half the pool, rounded up;
                                  n_pages or more: no cap; < 0 invalid)     */
} pie_ctl_opts;

/* Creates the control layer over backend b (not owned: the caller frees b
 * after pie_ctl_free). opts may be NULL for defaults. Starts the scheduler
 * thread. */
int  pie_ctl_create(pie_backend *b, const pie_ctl_opts *opts, pie_ctl **out);
/* Cancels everything pending, joins the scheduler, frees all clients'
 * state. Clients must not be used afterwards. */
void pie_ctl_free(pie_ctl *ctl);
pie_backend *pie_ctl_backend(pie_ctl *ctl);
int32_t pie_ctl_page_size(pie_ctl *ctl);
int32_t pie_ctl_n_pages(pie_ctl *ctl);      /* pool size                    */

/* ---- clients ----------------------------------------------------------- */

/* Default per-client cap on live page handles (see max_handles). */
#define PIE_CTL_MAX_HANDLES 65536

typedef struct pie_ctl_client_opts {
    int32_t max_pages;         /* pages held at once: its allocated ones,
                                  plus, each page once, those its live
                                  exports list and its imported ones that
                                  no live export lists (imports of a live
                                  export count nothing, except to the
                                  next import; see pie_ctl_import)
                                  (0 = no limit)                            */
    int64_t max_tokens;        /* tokens forwarded in total (0 = no limit)  */
    int32_t priority;          /* class; 0 is served first (0..7)           */
    int32_t max_handles;       /* page handles held at once, allocated and
                                  imported (each import of an export makes
                                  new ones, even of pages the client holds
                                  already): past it page_alloc and import
                                  fail with PIE_ELIMIT (0 = default:
                                  PIE_CTL_MAX_HANDLES or 4 x the pool's
                                  pages, the larger; < 0 invalid)           */
    const char *name;          /* for messages and counters (may be NULL)   */
    /* FCFS policy: asks the owner to end this client (e.g. kill the
     * inferlet); runs without the control lock on the allocating thread and
     * must not call pie_ctl functions. pie_ctl_client_close waits for a
     * running on_evict. NULL: never chosen. */
    void (*on_evict)(void *user, pie_ctl_client *c);
    void *evict_user;
} pie_ctl_client_opts;

int  pie_ctl_client_open(pie_ctl *ctl, const pie_ctl_client_opts *opts,
                         pie_ctl_client **out);
/* Cancels the client's pending forwards (their futures complete with
 * PIE_ECANCELED), drops its page handles (swapped ones straight from host
 * memory) and its exports' ownership: the exports live on, counted against
 * no client's quota (only against the server's max_export_pages, as they
 * were already), until some client unexports them. Frees it. Futures the
 * caller still holds must still be released. */
void pie_ctl_client_close(pie_ctl_client *c);
/* SUSPEND policy: a suspended client's pages come back when it next needs
 * them on the device. pie_ctl_page_alloc waits for that up to its timeout;
 * forward submit, copy and export do not wait and fail with PIE_EAGAIN
 * while the pool has no room for them. This brings them back, waiting up
 * to timeout_ms (0 = do not wait, <0 = forever): 0 when c holds all its
 * pages (also when it was not suspended), PIE_EBUSY when the pool is still
 * short (retry), PIE_ENOMEM when waiting cannot help (see
 * pie_ctl_page_alloc). A client whose pages it brought back is not
 * swapped out again before its next call (any call that takes the client,
 * even one that fails); call it after a PIE_EAGAIN, not before every
 * call. */
int  pie_ctl_client_resume(pie_ctl_client *c, int32_t timeout_ms);

/* ---- KV pages ---------------------------------------------------------- */

/* Allocates n pages, writing their handles to out[n]. When the pool is
 * short, waits up to timeout_ms (0 = do not wait, <0 = forever) for pages
 * to be freed (a suspended client: for room for its swapped-out pages and
 * the n new ones together, and takes both at once, so that it is brought
 * back only when the allocation can follow; see suspend.c); then fails
 * with PIE_EBUSY (a retry may succeed). Fails at once with PIE_ELIMIT
 * beyond the client's quota (max_pages: the pages it allocated plus those
 * its live exports list and its imported ones no live export lists, each
 * once), and with PIE_ENOMEM ("KV pool exhausted")
 * when waiting cannot help: n (plus, for a suspended client, its
 * swapped-out pages) exceeds the pool less the pages this client holds and
 * the exported ones, or this client is the newest waiter of the lowest
 * priority class in a wait cycle (every client that holds pages waits for
 * more; see pool.c). Such a caller should free its pages (end the request)
 * rather than retry. All or nothing. A hopeless request suspends and
 * evicts nobody. */
int  pie_ctl_page_alloc(pie_ctl_client *c, int32_t n, int32_t timeout_ms,
                        uint32_t *out);
/* Drops n handles. The physical page returns to the pool once no handle,
 * export or pending forward references it; a swapped-out page is dropped
 * from host memory (never waits). Unknown handle: PIE_EINVAL, and nothing
 * is freed. */
int  pie_ctl_page_free(pie_ctl_client *c, int32_t n, const uint32_t *h);
/* Copies KV of n token slots from (src, src_off) to (dst, dst_off), e.g. to
 * fork a partially filled page. Ordered after earlier forwards touching
 * either page; forwards submitted later see the copy. dst must be writable.
 * dst's fill rises only by slots copied from written source slots (below
 * src's fill) that continue dst's written slots without a gap; slots copied
 * from unwritten ones lower dst's fill to dst_off plus the written ones
 * copied before them. PIE_EAGAIN: c is suspended (see pie_ctl_client_resume). */
int  pie_ctl_page_copy(pie_ctl_client *c, uint32_t src, int32_t src_off,
                       uint32_t dst, int32_t dst_off, int32_t n);
/* pie_ctl_page_copy, and done (may be NULL) runs once with user and the
 * copy's status when the queued copy completes (done, failed, or
 * cancelled: by a failed or cancelled forward or copy it waits on, or as
 * c closes), without the control lock, on the scheduler or device thread
 * or on the thread whose call completed it (pie_ctl_client_close). Its
 * future argument is the copy's op, valid only during the call (nothing
 * to poll, keep or release). A copy refused with an error never calls
 * back. The op and what it adds to the ops it waits on
 * (pie_ctl_copy_bytes) are freed by the time done returns, except for a
 * copy cancelled while an op it waits on is pending: its op stays in
 * that op's dependents until it completes or adds a dependent (as a
 * cancelled forward's does). For a caller that bounds what others'
 * copies keep queued (the inferlet runtime). */
int  pie_ctl_page_copy_cb(pie_ctl_client *c, uint32_t src, int32_t src_off,
                          uint32_t dst, int32_t dst_off, int32_t n,
                          pie_ctl_done_fn done, void *user);
/* Host bytes one queued copy keeps until it completes: its op and write
 * record, and the entries it adds to the dependents of the ops it waits
 * on (their arrays doubling). */
uint64_t pie_ctl_copy_bytes(void);
/* Number of leading slots of a page written by forwards and copies
 * submitted so far (not cancelled): 0 for a freshly allocated page; kept
 * by imports, swaps and persistence. Read from host memory for a
 * swapped-out page. */
int  pie_ctl_page_fill(pie_ctl_client *c, uint32_t h, int32_t *fill);

/* Exports n pages under a name (unique per pie_ctl; PIE_EBUSY if taken).
 * The export holds its own references until unexported; while c is open
 * they count against its max_pages. PIE_ELIMIT when that takes c past its
 * max_pages (pages it holds count already; imported ones it re-exports
 * add), or when the pages all exports would then pin (each distinct page
 * once: pages already exported under another name add nothing) pass
 * opts.max_export_pages; nothing is exported then. PIE_EAGAIN: c is
 * suspended (see pie_ctl_client_resume). */
int  pie_ctl_export(pie_ctl_client *c, const char *name, int32_t n,
                    const uint32_t *h);
/* Imports an export: writes up to cap new read-only handles to out and the
 * export's page count to *n (PIE_ERANGE if cap is too small). While an
 * export lists them, the pages count against its exporter's max_pages and
 * the server's max_export_pages, not against c's allocations; once none
 * does (unexported, by anyone), c alone may keep them, and they count
 * against c's max_pages until it frees them, so that its next allocation
 * or export may fail with PIE_ELIMIT. The import itself fails with
 * PIE_ELIMIT, importing nothing, where c could not keep them: where the
 * pages c reaches (allocated, its live exports', every page it imported,
 * each once) and those of the export it does not reach yet would pass
 * its max_pages. */
int  pie_ctl_import(pie_ctl_client *c, const char *name, int32_t cap,
                    uint32_t *out, int32_t *n);
/* Removes a name (any client may; pages imported elsewhere live on). */
int  pie_ctl_unexport(pie_ctl_client *c, const char *name);
/* Writes the export names, NUL-separated, into buf (cap bytes) and their
 * count to *n; returns PIE_ERANGE when buf is too small (*len = needed). */
int  pie_ctl_export_list(pie_ctl *ctl, char *buf, int32_t cap, int32_t *len,
                         int32_t *n);

/* Persistence: writes export `name` (pages, fills, dedup metadata) to a
 * file at path (magic "PIEKVEXP", version, model id and page geometry, an
 * XXH64 checksum). Waits for the device to be idle for the copy; PIE_EBUSY
 * if a forward writing one of its pages is still pending. */
int  pie_ctl_export_save(pie_ctl *ctl, const char *name, const char *path);
/* Loads such a file into fresh pages as an export named `name` (NULL: the
 * name it was saved under), except that a page whose saved record (fill,
 * slot tokens, positions, masks, hash) and KV bytes are those of a page a
 * live export lists shares that page, and one the file lists twice takes
 * one page: aliases (names that shared pages when saved, or one file
 * loaded under two names) share them again, and the cap counts them once
 * as it did. PIE_EFORMAT for a corrupt, truncated or foreign file (other
 * model id or page geometry), PIE_EBUSY when the name is taken or the pool
 * lacks free pages for the pages it does not share, PIE_ELIMIT when those
 * would take the exports past opts.max_export_pages. Full pages become
 * findable by prefix caching again. */
int  pie_ctl_export_load(pie_ctl *ctl, const char *path, const char *name);

/* ---- forwards ---------------------------------------------------------- */

/* Input token `token_idx` of a forward takes the token sampled at output row
 * `row` of forward `from` (which must belong to the same client): at
 * submit where `from` has completed already (so that releasing it frees
 * its results at once), else when it completes. */
typedef struct pie_ctl_chain {
    int32_t         token_idx;
    pie_ctl_future *from;
    int32_t         row;
} pie_ctl_chain;

typedef struct pie_ctl_forward {
    int32_t            n_tokens;
    const int32_t     *tokens;          /* (n_tokens); chained slots ignored */
    const int32_t     *positions;       /* (n_tokens)                        */
    int32_t            n_pages;
    const uint32_t    *pages;           /* (n_pages) handles, in order       */
    int32_t            last_page_len;   /* fill of the last page, new tokens
                                           included (1..page_size)           */
    const uint32_t    *mask_indptr;     /* (n_tokens+1) or NULL = causal     */
    const uint32_t    *mask_runs;       /* run lengths (see backend.h)       */
    int32_t            n_outputs;
    const int32_t     *output_idx;      /* (n_outputs) LOCAL token index     */
    const pie_sampler *samplers;        /* (n_outputs)                       */
    const uint32_t    *logit_mask_indptr; /* (n_outputs+1) or NULL           */
    const uint32_t    *logit_mask_runs;
    int32_t            n_chains;
    const pie_ctl_chain *chains;        /* (n_chains)                        */
} pie_ctl_forward;

/* Validates f (handles, ranges, quotas), copies every array it points to
 * (the caller may free them on return) and queues it. The new tokens' KV
 * goes into slots [kv_len - n_tokens, kv_len) of the pages (see backend.h);
 * the pages written must be writable (not imported). Pages are not cleared
 * when reused, so a forward may read only slots already written (fill, see
 * pie_ctl_page_fill): with first = kv_len - n_tokens, every page before
 * slot first's page must be full and that page filled up to first; else
 * PIE_ERANGE (this also keeps writes free of gaps). done (may be NULL) runs
 * once when the future completes. PIE_EAGAIN: c is suspended and the pool
 * has no room for its pages now (see pie_ctl_client_resume). */
int  pie_ctl_forward_submit(pie_ctl_client *c, const pie_ctl_forward *f,
                            pie_ctl_done_fn done, void *user,
                            pie_ctl_future **out);
/* Host bytes of the results (pie_forward_out: sampled tokens, value
 * offsets, probe values and ids) that pie_ctl_forward_submit allocates
 * for a forward with these n_outputs rows; its future holds them until
 * its last reference is released. A caller that lets others submit
 * (the inferlet runtime) bounds what their futures hold with it. Rows
 * that submit would refuse count what they ask for (a TOPK row at most
 * vocab values, a negative count none). */
uint64_t pie_ctl_output_bytes(pie_ctl *ctl, int32_t n_outputs,
                              const pie_sampler *samplers);
/* Host bytes that pie_ctl_forward_submit allocates for forward f, at
 * most what it keeps until the future's last reference is released: the
 * op, the copies op_build makes of f's inputs (tokens, positions, pages,
 * mask, output rows, samplers, LOGPROBS ids, logit mask, chains, page
 * writes), the entries it adds to the forwards it waits on, and its
 * results (pie_ctl_output_bytes). The input copies are freed when it
 * completes, and its results too unless it succeeded; the op and its
 * results (and samplers) stay until the last reference goes, and a
 * cancelled op's entry in a pending parent's dependents until that parent
 * completes or adds a dependent. For a caller that bounds what others'
 * forwards keep; f need not have been checked (f's mask and logit-mask
 * indptr, when set, must hold n_tokens + 1 and n_outputs + 1 entries). */
uint64_t pie_ctl_forward_bytes(pie_ctl *ctl, const pie_ctl_forward *f);
/* 0 when completed successfully, PIE_EAGAIN while pending, else the error. */
int  pie_ctl_future_poll(pie_ctl_future *f);
/* Blocks up to timeout_ms (<0 forever) for completion; returns as poll. For
 * native callers: never call from a runtime fiber or the scheduler thread.
 * Waiters are woken where callbacks run (the scheduler thread, after the
 * next fire's launch, for a forward a fire completes), after the callbacks
 * queued before them (so a callback that blocks delays this too). */
int  pie_ctl_future_wait(pie_ctl_future *f, int32_t timeout_ms);
/* Cancels a pending forward and every pending forward chained from it;
 * their page fills are rolled back. No effect on a completed one. */
void pie_ctl_future_cancel(pie_ctl_future *f);
/* Results of a completed forward (valid until release): n_outputs rows;
 * tokens[o] is the sampled id (-1 for probes), probe values/ids at
 * value_indptr[o]..value_indptr[o+1]. PIE_EAGAIN if pending, else its error. */
int  pie_ctl_future_result(pie_ctl_future *f, const pie_forward_out **out,
                           int32_t *n_outputs);
/* Takes another reference (released with pie_ctl_future_release). */
void pie_ctl_future_retain(pie_ctl_future *f);
/* Drops the caller's reference. */
void pie_ctl_future_release(pie_ctl_future *f);

/* ---- native generation ------------------------------------------------- */

/* Called for each generated token in order; a nonzero return stops. */
typedef int (*pie_ctl_token_fn)(void *user, int32_t token);

typedef struct pie_ctl_gen_opts {
    const int32_t *prompt;     /* (n_prompt), n_prompt >= 1                 */
    int32_t        n_prompt;
    pie_sampler    sampler;    /* RANDOM: step i uses seed + i              */
    int32_t        max_tokens;
    const int32_t *stop_ids;   /* generation ends after emitting one        */
    int32_t        n_stop;
    int32_t        lookahead;  /* decode steps queued ahead (default 4)     */
    int32_t        priority;
    int32_t        timeout_ms; /* page admission wait (<0 forever)          */
    pie_ctl_token_fn on_token; /* may be NULL                               */
    void          *user;
} pie_ctl_gen_opts;

/* Generates up to max_tokens tokens after the prompt in its own client,
 * writing them to out (cap >= max_tokens) and their count to *n_out.
 * Blocks; thread-safe (many generations may run at once and are batched). */
int  pie_ctl_generate(pie_ctl *ctl, const pie_ctl_gen_opts *o, int32_t *out,
                      int32_t cap, int32_t *n_out);

/* ---- counters ---------------------------------------------------------- */

typedef struct pie_ctl_stats {
    uint64_t fires;            /* backend batches run                       */
    uint64_t fired_reqs;       /* sum of requests over fires                */
    uint64_t fired_tokens;     /* sum of tokens over fires                  */
    int32_t  last_batch_reqs;  /* size of the most recent fire              */
    int32_t  last_batch_tokens;
    int32_t  max_batch_reqs;   /* largest fire so far                       */
    int32_t  queue_depth;      /* forwards submitted and not completed      */
    int32_t  clients;          /* open clients                              */
    int32_t  pages_total;
    int32_t  pages_free;       /* allocatable: free + cached                */
    int32_t  pages_cached;     /* unreferenced but kept for prefix reuse    */
    int32_t  pages_used;       /* referenced by anything                    */
    int32_t  pages_shared;     /* referenced more than once                 */
    int32_t  exports;
    int32_t  pages_exported;   /* distinct pages the exports pin (at most
                                  opts.max_export_pages)                    */
    uint64_t dedup_hits;       /* full pages merged with an identical one   */
    uint64_t prefix_tokens_skipped; /* prompt tokens not recomputed because
                                  their full pages were already cached      */
    uint64_t suspensions;      /* clients suspended under pressure          */
    uint64_t evictions;        /* clients asked to end (FCFS policy)        */
    uint64_t alloc_waits;      /* page allocations (and resumes) that had
                                  to wait, each counted once                */
    uint64_t alloc_cycles_broken; /* waiting allocations failed with
                                  PIE_ENOMEM to break a wait cycle          */
    uint64_t cancelled;        /* forwards completed as cancelled           */
    uint64_t failed;           /* forwards completed with another error     */
    bool     device_lost;      /* the backend reported PIE_EDEVLOST: every
                                  forward and copy, queued or later, fails
                                  with it; restart the server              */
    double   overhead_ns_last; /* control time (assemble + complete) of the
                                  last fire, excluding the backend call     */
    double   overhead_ns_total;
    double   backend_ns_total; /* time inside the backend                   */
} pie_ctl_stats;

void pie_ctl_get_stats(pie_ctl *ctl, pie_ctl_stats *s);

#endif
