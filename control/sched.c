/*
 * sched.c — the scheduler thread, the device thread and the batches they
 * pass between them.
 *
 * Two host batches (ctl->bat[0..1]) alternate. The scheduler thread fills
 * `staging` from the ready lists while the device thread runs `running`;
 * when the device finishes the batch (`finished`), the
 * device thread itself completes its ops (which makes chained children
 * ready), tops up staging with everything now ready and launches it at
 * once (turn_over); the scheduler thread then runs the completion
 * callbacks (dev_notify), which wake inferlets and threads, and wakes the
 * threads blocked in pie_ctl_future_wait on those ops (op_finish queues
 * both on the notify list; woken by the device thread instead, 60 waiters
 * of a fire of 64 had cost about 330 us of turn_over on a 2-core host and
 * 52-72 us after; bench_control gap, the native loop's host time a token
 * beyond its 1 ms fire, went from 360-430 to 87-118 us). A thread that
 * needs the device idle (pie__wait_idle: swaps, export files) counts
 * itself in idle_waiters, and nothing is launched until it has had the
 * device: otherwise a chained step, ready whenever a batch ends, would
 * keep the device busy for as long as work arrives. Before, the device thread
 * handed the finished batch to the scheduler thread and waited to be woken
 * back, and the callbacks ran before the launch: two thread wake-ups and
 * every callback sat between two fires. The device is therefore never idle
 * while anything is ready (work-conserving, no timers), and host-side
 * assembly of one batch overlaps device time of the other.
 *
 * Selection: priority classes 0..7 in order, each in submission order
 * (ctl->ready[p] is sorted by seq); within limits of tokens, requests and
 * pages per fire. A forward with more tokens than prefill_chunk runs in
 * chunks of at most that many tokens, one chunk per fire, so decodes queued
 * beside it still go out every fire. Ops pre-staged while the device ran
 * are not reordered by later arrivals (bounded inversion of one batch).
 *
 * Completion: a fire's ops complete with the status of its one forward,
 * except when that forward fails. Then, where the fire held more than one
 * request, the device thread runs each request again alone (rerun_each:
 * its slices of the batch's arrays, rebased), and each completes with its
 * own status: a request the backend refuses or a device fault hit fails
 * alone, the others succeed with the results of running alone (the
 * re-runs rewrite whatever KV the failed batch half wrote; on the GPU a
 * batch of one may take other matmul kernels than the batch, so its bits
 * may differ). Where the first RERUN_GIVE_UP re-runs all fail, the rest
 * keep the batch's error unrun (a failure of the device, not of one
 * request: a fire of 256 would make 257 failing calls). Copies are not
 * run again. A backend call that returns PIE_EDEVLOST (the
 * device's context is lost for good) ends all of that: the control layer
 * is lost (ctl->lost), every op of the fire, every op queued and every op
 * submitted later completes with PIE_EDEVLOST, and nothing more is
 * launched; the threads live on, so that clients end as usual.
 *
 * Everything here runs with ctl->mu held except the backend calls in the
 * device thread and the completion callbacks (pie__unlock).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/pie_err.h"
#include "control/ctl_int.h"

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* ---- op lifetime -------------------------------------------------------- */

void pie__op_unref(ctl_op *op)
{
    if (atomic_fetch_sub(&op->refs, 1) != 1) return;
    pthread_cond_destroy(&op->cv);
    free(op->deps);
    free(op->tokens);
    free(op->positions);
    free(op->pages);
    free(op->mask_indptr);
    free(op->mask_runs);
    free(op->output_idx);
    free(op->samplers);
    free(op->idbuf);
    free(op->lm_indptr);
    free(op->lm_runs);
    free(op->chains);
    free(op->writes);
    free(op->out.tokens);
    free(op->out.value_indptr);
    free(op->out.values);
    free(op->out.ids);
    free(op);
}

void pie__unlock(pie_ctl *ctl)
{
    ctl_op *list = ctl->notify, *rev = NULL;
    ctl->notify = NULL;
    pthread_mutex_unlock(&ctl->mu);
    while (list) {            /* completion order */
        ctl_op *n = list->nnext;
        list->nnext = rev;
        rev = list;
        list = n;
    }
    while (rev) {
        ctl_op *n = rev->nnext;
        if (rev->done) rev->done(rev->user, (pie_ctl_future *)rev, rev->status);
        pthread_cond_broadcast(&rev->cv);   /* (no waiters: no system call) */
        pie__op_unref(rev);
        rev = n;
    }
}

/* ---- ready lists ---------------------------------------------------------- */

void pie__ready_insert(pie_ctl *ctl, ctl_op *op)
{
    int p = op->prio;
    ctl_op *after = ctl->ready_tail[p];
    while (after && after->seq > op->seq) after = after->prev;
    op->prev = after;
    op->next = after ? after->next : ctl->ready[p];
    if (op->next) op->next->prev = op;
    else ctl->ready_tail[p] = op;
    if (after) after->next = op;
    else ctl->ready[p] = op;
    op->state = OP_READY;
    ctl->n_ready++;
    pthread_cond_signal(&ctl->sched_cv);
}

static void ready_remove(pie_ctl *ctl, ctl_op *op)
{
    int p = op->prio;
    if (op->prev) op->prev->next = op->next;
    else ctl->ready[p] = op->next;
    if (op->next) op->next->prev = op->prev;
    else ctl->ready_tail[p] = op->prev;
    op->next = op->prev = NULL;
    ctl->n_ready--;
}

/* All dependencies done: takes chained tokens from the parents, queues. */
void pie__make_ready(pie_ctl *ctl, ctl_op *op)
{
    for (int32_t i = 0; i < op->n_chains; i++) {
        ctl_chain *ch = &op->chains[i];
        if (!ch->from) continue;
        int32_t tok = ch->from->out.tokens[ch->row];
        pie__op_unref(ch->from);
        ch->from = NULL;
        if (tok < 0 || tok >= ctl->vocab) {
            pie__op_complete(ctl, op, PIE_EINVAL);
            return;
        }
        op->tokens[ch->token_idx] = tok;
    }
    pie__ready_insert(ctl, op);
}

/* Takes back the fills op raised. Slot records are not fills: those of a
 * chunk that did not run are forgotten where it stops (entry_complete,
 * pie__unstage_all); those of the chunks that ran describe computed KV. */
static void rollback(pie_ctl *ctl, ctl_op *op)
{
    for (int32_t w = op->n_writes - 1; w >= 0; w--) {
        ctl_page *p = &ctl->pages[op->writes[w].page];
        if (p->fill == op->writes[w].new_fill) p->fill = op->writes[w].old_fill;
    }
}

static void client_unlink(ctl_op *op)
{
    pie_ctl_client *c = op->c;
    if (!c) return;
    if (op->cprev) op->cprev->cnext = op->cnext;
    else c->ops = op->cnext;
    if (op->cnext) op->cnext->cprev = op->cprev;
    op->cnext = op->cprev = NULL;
    if (!c->ops) pie__victims_changed(op->ctl);   /* idle: a victim now */
}

/* Empties op's dependents array and frees it: a DONE op gains none (no
 * page names it as last_writer, and a chain from it adds no dependency),
 * so what its dependents once took stays allocated no longer than they
 * wait (a future held long after completion keeps no array of them). */
static void free_deps(ctl_op *op)
{
    free(op->deps);
    op->deps = NULL;
    op->n_deps = op->cap_deps = 0;
}

/* op succeeded: each dependent waits for one op less. */
static void release_dependents(pie_ctl *ctl, ctl_op *op)
{
    for (int32_t i = 0; i < op->n_deps; i++) {
        ctl_op *d = op->deps[i].op;
        if (d->state != OP_DONE && --d->n_pending == 0) pie__make_ready(ctl, d);
        pie__op_unref(d);
    }
    free_deps(op);
}

static void drop_deps(ctl_op *op)
{
    for (int32_t i = 0; i < op->n_deps; i++) pie__op_unref(op->deps[i].op);
    free_deps(op);
}

/* The first half of completing op: off the ready list and its client's
 * ops, status set, DONE. */
static void op_mark_done(pie_ctl *ctl, ctl_op *op, int status)
{
    PIE_ASSERT(op->state != OP_DONE && op->state != OP_STAGED &&
               op->state != OP_RUNNING);
    if (op->state == OP_READY) ready_remove(ctl, op);
    if (status != 0 && op->c && !op->ran) op->c->tokens_used -= op->n_tokens;
    client_unlink(op);
    op->status = status;
    atomic_store(&op->state, OP_DONE);
    ctl->st.queue_depth--;
    if (status == PIE_ECANCELED) ctl->st.cancelled++;
    else if (status != 0) ctl->st.failed++;
}

/*
 * Frees what finished op no longer needs (its pages, fills and chains
 * settled): its input copies, and, unless it succeeded, its samplers and
 * results too (pie_ctl_future_result answers its error without them).
 * What a successful op keeps is what later readers take: its results
 * (pie_ctl_future_result, a chained child's token) and its samplers (a
 * chain submitted from it checks its row's kind). A finished op may stay
 * allocated long after: its future is held, or, cancelled while a parent
 * is pending, it stays in that parent's dependents (until the parent
 * completes or add_dep sweeps it out), although the runtime gave back
 * what it charged for it as its future went.
 */
static void op_shed(ctl_op *op, int status)
{
    free(op->tokens), op->tokens = NULL;
    free(op->positions), op->positions = NULL;
    free(op->pages), op->pages = NULL;
    free(op->mask_indptr), op->mask_indptr = NULL;
    free(op->mask_runs), op->mask_runs = NULL;
    free(op->output_idx), op->output_idx = NULL;
    free(op->lm_indptr), op->lm_indptr = NULL;
    free(op->lm_runs), op->lm_runs = NULL;
    free(op->chains), op->chains = NULL;
    for (int32_t w = 0; w < op->n_writes; w++)
        if (op->writes[w].prev) pie__op_unref(op->writes[w].prev);
    free(op->writes), op->writes = NULL;
    op->n_chains = op->n_writes = 0;
    for (int32_t o = 0; op->samplers && o < op->n_outputs; o++)
        if (op->samplers[o].kind == PIE_PROBE_LOGPROBS)
            op->samplers[o].ids = NULL;          /* pointed into idbuf */
    free(op->idbuf), op->idbuf = NULL;
    if (status == 0) return;
    free(op->samplers), op->samplers = NULL;
    free(op->out.tokens), op->out.tokens = NULL;
    free(op->out.value_indptr), op->out.value_indptr = NULL;
    free(op->out.values), op->out.values = NULL;
    free(op->out.ids), op->out.ids = NULL;
}

/* The newest writer of page that is not DONE, from w on back through
 * each writer's predecessor (ctl_write.prev); NULL when none. A DONE
 * writer passed here is marked but not yet finished (a cancellation walk
 * finishes dependents first), or finished and then all before it are
 * done (it had waited on them), its writes gone. */
static ctl_op *pending_writer(ctl_op *w, int32_t page)
{
    while (w && atomic_load(&w->state) == OP_DONE) {
        ctl_op *prev = NULL;
        for (int32_t k = 0; k < w->n_writes; k++)
            if (w->writes[k].page == page) prev = w->writes[k].prev;
        w = prev;
    }
    return w;
}

/* The second half, once its dependents are settled: fills rolled back
 * unless it succeeded, each page it was the last writer of handed back
 * to the writer before it that is still pending (a cancelled op can end
 * before the writer it waited on: ops wired later must still wait on
 * that one), pages dropped, what it no longer needs freed (op_shed),
 * callback queued, the control layer's reference dropped. */
static void op_finish(pie_ctl *ctl, ctl_op *op, int status)
{
    if (status != 0) rollback(ctl, op);
    for (int32_t w = 0; w < op->n_writes; w++) {
        ctl_page *p = &ctl->pages[op->writes[w].page];
        if (p->last_writer == op)
            p->last_writer = pending_writer(op->writes[w].prev,
                                            op->writes[w].page);
    }
    if (status == 0 && op->kind == OP_FORWARD) pie__pool_dedup(ctl, op);
    for (int32_t i = 0; i < op->n_pages; i++) pie__page_unref(ctl, op->pages[i]);
    op->n_pages = 0;
    if (op->kind == OP_COPY) {
        pie__page_unref(ctl, op->cp_src);
        pie__page_unref(ctl, op->cp_dst);
    }
    for (int32_t i = 0; i < op->n_chains; i++)
        if (op->chains[i].from) {
            pie__op_unref(op->chains[i].from);
            op->chains[i].from = NULL;
        }
    op_shed(op, status);
    /* callback and waiters alike go through the notify list: pie__unlock
     * runs the one and wakes the others, so that a fire's completions wake
     * no thread on the device's critical path (sched.c's header) */
    if (op->done || op->n_waiters > 0) {
        atomic_fetch_add(&op->refs, 1);
        op->nnext = ctl->notify;
        ctl->notify = op;
    }
    pie__op_unref(op);
}

/*
 * True when copy d, which waits on o (cancelled or failed), touches none
 * of the slots o was to write, so that it may run once o is done: o's own
 * dependencies all succeeded (o->n_pending == 0: every earlier writer of
 * o's pages is done), d writes no page o writes (so that no op wired
 * after d reaches o's slots through d as a page's last_writer, and o's
 * fill rollback is not undone by d's fill), and d's source range on each
 * page o writes ends at or before o's first slot there. A forward never
 * qualifies: the page through which it waits on o is one it writes (its
 * last) or reads whole.
 */
static bool copy_unaffected(pie_ctl *ctl, const ctl_op *o, const ctl_op *d)
{
    if (d->kind != OP_COPY || o->n_pending != 0) return false;
    int32_t first = o->kind == OP_COPY ? o->cp_dst_off
                                       : o->kv_len - o->n_tokens;
    for (int32_t w = 0; w < o->n_writes; w++) {
        int32_t page = o->writes[w].page;
        int32_t lo = o->kind == OP_COPY ? first
                     : w == 0 ? first % ctl->ps : 0;
        if (d->cp_dst == page) return false;
        if (d->cp_src == page && d->cp_src_off + d->cp_n > lo) return false;
    }
    return true;
}

/*
 * root failed or was cancelled: every op that depends on it, transitively,
 * is cancelled. A chained one has no token to take; an ordered one reads
 * or overwrites a page root was to write (every ORDER dependency is on a
 * page's last_writer), and the slots root left unwritten may hold a
 * previous owner's KV (check_filled counted them as written when it was
 * submitted). Except a copy that touches none of the slots a cancelled op
 * was to write, where nothing it waits on through it failed
 * (copy_unaffected): it waits on that op no longer and runs (e.g. a fork
 * of a page's first slots, queued behind a later writer of the page that
 * was cancelled). Once the device is lost (ctl->lost), every dependent
 * completes with PIE_EDEVLOST instead, copies too: nothing runs any more.
 * Each is finished after all of its own dependents, so
 * fills roll back newest first. Without recursion: thousands of forwards
 * queued on one page form a chain as deep, which would overflow a fiber's
 * stack; the walk keeps its path in the ops themselves (cancel_up,
 * cancel_i).
 */
static void cancel_dependents(pie_ctl *ctl, ctl_op *root)
{
    int why = ctl->lost ? PIE_EDEVLOST : PIE_ECANCELED;
    root->cancel_i = 0;
    root->cancel_up = NULL;
    for (ctl_op *o = root; o;) {
        if (o->cancel_i < o->n_deps) {
            ctl_op *d = o->deps[o->cancel_i++].op;
            if (d->state != OP_DONE && !ctl->lost &&
                copy_unaffected(ctl, o, d)) {
                if (--d->n_pending == 0) pie__make_ready(ctl, d);
                continue;                   /* (o's deps drop the ref) */
            }
            if (d->state != OP_DONE) {      /* (reached twice: done once) */
                op_mark_done(ctl, d, why);
                d->cancel_i = 0;
                d->cancel_up = o;
                o = d;
            }
            continue;
        }
        ctl_op *up = o->cancel_up;      /* o stays alive: up's deps hold it */
        drop_deps(o);
        if (o != root) op_finish(ctl, o, why);
        o = up;
    }
}

/*
 * Completes op with status: drops its pages, rolls back its fills unless it
 * succeeded, releases or cancels its dependents, queues its callback and
 * drops the control layer's reference. op must not be STAGED or RUNNING.
 */
void pie__op_complete(pie_ctl *ctl, ctl_op *op, int status)
{
    op_mark_done(ctl, op, status);
    if (status == 0) release_dependents(ctl, op);
    else cancel_dependents(ctl, op);
    op_finish(ctl, op, status);
}

/* ---- batch assembly ------------------------------------------------------- */

/* Grows ptr (int32 capacity cap) to hold need (int64) elements, doubling;
 * a capacity past INT32_MAX is PIE_ENOMEM, never a wrapped one. */
#define GROW(ptr, cap, need, extra)                                          \
    do {                                                                     \
        int64_t need_ = (need);                                              \
        if (need_ > (cap)) {                                                 \
            int64_t nc_ = (cap) ? (cap) : 64;                                \
            while (nc_ < need_) nc_ *= 2;                                    \
            if (nc_ > INT32_MAX) return PIE_ENOMEM;                          \
            void *np_ = realloc((ptr), (size_t)nc_ * sizeof *(ptr));         \
            if (!np_) return PIE_ENOMEM;                                     \
            (ptr) = np_;                                                     \
            extra;                                                           \
            (cap) = (int32_t)nc_;                                            \
        }                                                                    \
    } while (0)

/* Grows the array at *(void **)p to n elements of sz bytes; leaves it as
 * it was if that fails, so that a batch's arrays stay valid at their old
 * capacity (the caps are raised only once a whole group has grown). */
static int resize(void *p, size_t n, size_t sz)
{
    void **pp = p, *q = realloc(*pp, n * sz);
    if (!q) return PIE_ENOMEM;
    *pp = q;
    return 0;
}

/* Makes room in B for one more request with ntok tokens, np pages, nmask
 * mask runs, nout outputs, nlm logit-mask runs, nval probe values. */
static int batch_reserve(ctl_batch *B, int64_t ntok, int64_t np, int64_t nmask,
                         int64_t nout, int64_t nlm, int64_t nval)
{
    int32_t ct = B->cap_tokens, cr = B->cap_reqs, co = B->cap_outputs;
    GROW(B->tokens, ct, B->n_tokens + ntok,
         if (resize(&B->positions, nc_, sizeof(int32_t)) ||
             resize(&B->mask_indptr, nc_ + 1, sizeof(uint32_t)))
             return PIE_ENOMEM);
    B->cap_tokens = ct;
    GROW(B->ents, cr, B->n_reqs + 1,
         if (resize(&B->qo_indptr, nc_ + 1, sizeof(int32_t)) ||
             resize(&B->kv_indptr, nc_ + 1, sizeof(int32_t)) ||
             resize(&B->last_len, nc_, sizeof(int32_t)))
             return PIE_ENOMEM);
    B->cap_reqs = cr;
    GROW(B->out_idx, co, B->n_outputs + nout + 1,
         if (resize(&B->row_src, nc_, sizeof(int32_t)) ||
             resize(&B->samplers, nc_, sizeof(pie_sampler)) ||
             resize(&B->lm_indptr, nc_ + 1, sizeof(uint32_t)) ||
             resize(&B->out.tokens, nc_, sizeof(int32_t)) ||
             resize(&B->out.value_indptr, nc_ + 1, sizeof(uint32_t)))
             return PIE_ENOMEM);
    B->cap_outputs = co;
    GROW(B->kv_indices, B->cap_kv, B->n_kv + np, (void)0);
    GROW(B->mask_runs, B->cap_mask, B->n_mask_runs + nmask, (void)0);
    GROW(B->lm_runs, B->cap_lm, B->n_lm_runs + nlm, (void)0);
    int32_t cv = B->cap_values;
    GROW(B->out.values, cv, B->n_values + nval,
         if (resize(&B->out.ids, nc_, sizeof(int32_t))) return PIE_ENOMEM);
    B->cap_values = cv;
    return 0;
}

static void batch_reset(ctl_batch *B)
{
    B->n_tokens = B->n_reqs = B->n_kv = B->n_outputs = 0;
    B->n_mask_runs = B->n_lm_runs = B->n_values = 0;
    B->any_mask = B->any_lm = false;
    B->n_copies = 0;
    B->rc = 0;
    B->lost = false;
    B->err[0] = 0;
    if (B->qo_indptr) B->qo_indptr[0] = 0;
    if (B->kv_indptr) B->kv_indptr[0] = 0;
    if (B->mask_indptr) B->mask_indptr[0] = 0;
    if (B->lm_indptr) B->lm_indptr[0] = 0;
    if (B->out.value_indptr) B->out.value_indptr[0] = 0;
}

void pie__batch_free(ctl_batch *B)
{
    free(B->tokens); free(B->positions); free(B->qo_indptr);
    free(B->kv_indices); free(B->kv_indptr); free(B->last_len);
    free(B->mask_indptr); free(B->mask_runs); free(B->out_idx);
    free(B->row_src); free(B->samplers); free(B->lm_indptr);
    free(B->lm_runs); free(B->ents); free(B->copies);
    free(B->out.tokens); free(B->out.value_indptr);
    free(B->out.values); free(B->out.ids);
    memset(B, 0, sizeof *B);
}

/* What tokens [t0, t0+n) of op add to a batch: mask runs, outputs, their
 * logit-mask runs and probe values. */
typedef struct slice_size {
    int64_t nmask, nout, nlm, nval;
} slice_size;

static slice_size count_slice(pie_ctl *ctl, const ctl_op *op, int32_t t0,
                              int32_t n)
{
    slice_size z = { 0 };
    z.nmask = op->mask_indptr ? (int64_t)(op->mask_indptr[t0 + n] -
                                          op->mask_indptr[t0]) : 2 * (int64_t)n;
    for (int32_t o = 0; o < op->n_outputs; o++) {
        int32_t t = op->output_idx[o];
        if (t < t0 || t >= t0 + n) continue;
        z.nout++;
        z.nval += pie_sampler_values(&op->samplers[o], ctl->vocab);
        z.nlm += op->lm_indptr ? (int64_t)(op->lm_indptr[o + 1] -
                                           op->lm_indptr[o]) : 2;
    }
    return z;
}

/* True when a slice of size z keeps B within the limits on probe values
 * and runs (CTL_MAX_VALUES, CTL_MAX_RUNS), so that no count of B wraps.
 * check_forward keeps one forward within them: an empty B takes any. */
static bool slice_fits(const ctl_batch *B, const slice_size *z)
{
    return (int64_t)B->n_values + z->nval <= CTL_MAX_VALUES &&
           (int64_t)B->n_mask_runs + z->nmask <= CTL_MAX_RUNS &&
           (int64_t)B->n_lm_runs + z->nlm <= CTL_MAX_RUNS &&
           (int64_t)B->n_outputs + z->nout <= CTL_MAX_RUNS;
}

/* Appends entry i's run-length list (runs[indptr[i] .. indptr[i + 1]]) to
 * dst at *n and sets *any; without a list (indptr NULL), the one run [0,
 * all) that allows everything. A mask's row and a logit mask's row alike. */
static void append_runs(uint32_t *dst, int32_t *n, const uint32_t *indptr,
                        const uint32_t *runs, int32_t i, uint32_t all,
                        bool *any)
{
    if (indptr) {
        uint32_t a = indptr[i], b = indptr[i + 1];
        memcpy(dst + *n, runs + a, (b - a) * sizeof(uint32_t));
        *n += (int32_t)(b - a);
        *any = true;
    } else {
        dst[(*n)++] = 0;
        dst[(*n)++] = all;
    }
}

/* Appends tokens [t0, t0+n) of op to B's tokens, positions and mask runs
 * (first = op's KV position of token 0); cannot fail (batch_reserve). */
static void append_tokens(ctl_batch *B, const ctl_op *op, int32_t t0,
                          int32_t n, int32_t first)
{
    for (int32_t t = t0; t < t0 + n; t++) {
        int32_t i = B->n_tokens++;
        B->tokens[i] = op->tokens[t];
        B->positions[i] = op->positions[t];
        append_runs(B->mask_runs, &B->n_mask_runs, op->mask_indptr,
                    op->mask_runs, t, (uint32_t)(first + t + 1), &B->any_mask);
        B->mask_indptr[i + 1] = (uint32_t)B->n_mask_runs;
    }
}

/* Appends output o of op to B as output row `row` at batch token tok: its
 * sampler, logit-mask runs and probe values; cannot fail (batch_reserve). */
static void append_output(const pie_ctl *ctl, ctl_batch *B, const ctl_op *op,
                          int32_t o, int32_t row, int32_t tok)
{
    B->out_idx[row] = tok;
    B->row_src[row] = o;
    B->samplers[row] = op->samplers[o];
    append_runs(B->lm_runs, &B->n_lm_runs, op->lm_indptr, op->lm_runs, o,
                (uint32_t)ctl->vocab, &B->any_lm);
    B->lm_indptr[row + 1] = (uint32_t)B->n_lm_runs;
    B->n_values += pie_sampler_values(&op->samplers[o], ctl->vocab);
    B->out.value_indptr[row + 1] = (uint32_t)B->n_values;
}

/* Appends tokens [t0, t0+n) of op to B as one request; z is their
 * count_slice (sized once, in stage_ready). */
static int batch_append(pie_ctl *ctl, ctl_batch *B, ctl_op *op, int32_t t0,
                        int32_t n, const slice_size *z)
{
    int32_t ps = ctl->ps, first = op->kv_len - op->n_tokens;
    int32_t kvl = first + t0 + n, np = (kvl + ps - 1) / ps;
    if (batch_reserve(B, n, np, z->nmask, z->nout, z->nlm, z->nval) < 0)
        return pie_err_set(PIE_ENOMEM, "control: out of memory for a batch");
    int32_t r = B->n_reqs, tb = B->n_tokens;
    if (r == 0) {
        B->qo_indptr[0] = B->kv_indptr[0] = 0;
        B->mask_indptr[0] = B->lm_indptr[0] = B->out.value_indptr[0] = 0;
    }
    append_tokens(B, op, t0, n, first);
    B->qo_indptr[r + 1] = B->n_tokens;
    memcpy(B->kv_indices + B->n_kv, op->pages, np * sizeof(int32_t));
    B->n_kv += np;
    B->kv_indptr[r + 1] = B->n_kv;
    B->last_len[r] = kvl - (np - 1) * ps;
    ctl_entry *e = &B->ents[r];
    *e = (ctl_entry){ .op = op, .tok0 = t0, .ntok = n, .row0 = B->n_outputs,
                      .nrow = (int32_t)z->nout };
    for (int32_t o = 0; o < op->n_outputs; o++) {
        int32_t t = op->output_idx[o];
        if (t < t0 || t >= t0 + n) continue;
        int32_t row = B->n_outputs++;
        append_output(ctl, B, op, o, row, tb + (t - t0));
    }
    B->n_reqs++;
    pie__pool_record(ctl, op, t0, n);
    return 0;
}

static int batch_add_copy(ctl_batch *B, ctl_op *op)
{
    if (B->n_copies == B->cap_copies) {
        int32_t cap = B->cap_copies ? B->cap_copies * 2 : 16;
        ctl_op **nc = realloc(B->copies, cap * sizeof *nc);
        if (!nc) return PIE_ENOMEM;
        B->copies = nc;
        B->cap_copies = cap;
    }
    B->copies[B->n_copies++] = op;
    return 0;
}

/* Tokens of op to run next given the token budget; 0 = does not fit. */
static int32_t chunk_len(pie_ctl *ctl, const ctl_op *op, int32_t budget)
{
    int32_t rem = op->n_tokens - op->done_tokens;
    if (op->mask_indptr) return rem <= budget ? rem : 0;   /* never split */
    int32_t n = rem;
    if (ctl->o.prefill_chunk > 0 && n > ctl->o.prefill_chunk)
        n = ctl->o.prefill_chunk;
    return n < budget ? n : budget;
}

/*
 * batch_append found no memory for op in B. With other requests in B, op
 * goes back to the ready list: B launches, and its completion runs the
 * scheduler again, which retries op (in an emptier batch). Alone in B,
 * nothing would run the scheduler for it again, and a retry would ask for
 * the same memory: op fails with PIE_ENOMEM now. Returns true when it
 * failed op (its completion may have readied others anywhere in the lists).
 */
static bool append_failed(pie_ctl *ctl, ctl_batch *B, ctl_op *op)
{
    if (B->n_reqs > 0) {
        pie__ready_insert(ctl, op);
        return false;
    }
    fprintf(stderr, "pie: control: a forward of %d tokens and %d outputs "
            "fails with ENOMEM: %s, even alone\n",
            op->n_tokens - op->done_tokens, op->n_outputs, pie_err_msg());
    op->state = OP_WAITING;     /* neither ready nor staged */
    pie__op_complete(ctl, op, PIE_ENOMEM);
    return true;
}

/* Moves ready ops into B within the limits. */
static void stage_ready(pie_ctl *ctl, ctl_batch *B)
{
    int32_t ps = ctl->ps;
again:
    for (int p = 0; p < CTL_N_PRIO; p++) {
        ctl_op *op = ctl->ready[p];
        while (op) {
            ctl_op *next = op->next;
            if (op->kind == OP_COPY) {
                if (batch_add_copy(B, op) < 0) return;
                ready_remove(ctl, op);
                op->state = OP_STAGED;
                op = next;
                continue;
            }
            if (B->n_reqs >= ctl->o.max_batch_reqs) return;
            int32_t budget = ctl->o.max_batch_tokens - B->n_tokens;
            int32_t n = chunk_len(ctl, op, budget);
            if (n == 0 && B->n_reqs == 0)   /* too big for any batch: alone */
                n = op->n_tokens - op->done_tokens;
            int32_t kvl = op->kv_len - op->n_tokens + op->done_tokens + n;
            int32_t np = (kvl + ps - 1) / ps;
            bool fits = n > 0;
            slice_size z = { 0 };
            if (fits) z = count_slice(ctl, op, op->done_tokens, n);
            if (fits && B->n_reqs > 0)      /* an empty batch takes any */
                fits = B->n_kv + np <= ctl->o.max_batch_pages &&
                       slice_fits(B, &z);
            if (fits) {
                int32_t t0 = op->done_tokens;
                ready_remove(ctl, op);
                op->state = OP_STAGED;
                if (batch_append(ctl, B, op, t0, n, &z) < 0) {
                    if (append_failed(ctl, B, op)) goto again;
                    return;
                }
            } else if (budget <= 0) {
                return;
            }
            op = next;
        }
    }
}

/* Puts every op staged in ctl->staging back on the ready lists. */
void pie__unstage_all(pie_ctl *ctl)
{
    ctl_batch *B = ctl->staging;
    for (int32_t i = 0; i < B->n_reqs; i++) {
        ctl_entry *e = &B->ents[i];
        pie__pool_forget(ctl, e->op, e->tok0, e->ntok);   /* never ran */
        pie__ready_insert(ctl, e->op);
    }
    for (int32_t i = 0; i < B->n_copies; i++) pie__ready_insert(ctl, B->copies[i]);
    batch_reset(B);
}

/* Re-runs of a failed batch's requests alone that may all fail before the
 * rest are given the batch's error unrun (rerun_each). */
#define RERUN_GIVE_UP 4

/* ---- running and completing ----------------------------------------------- */

/* Device thread, without the lock: B's copies, each while the device is
 * not lost (a copy that finds it lost marks B lost). */
static void run_copies(pie_ctl *ctl, ctl_batch *B)
{
    pie_backend *b = ctl->b;
    for (int32_t i = 0; i < B->n_copies; i++) {
        ctl_op *op = B->copies[i];
        if (B->lost) {
            op->status = PIE_EDEVLOST;
            continue;
        }
        op->status = b->ops->copy_slots(b, op->cp_src, op->cp_src_off,
                                        op->cp_dst, op->cp_dst_off, op->cp_n);
        if (op->status == PIE_EDEVLOST) {
            B->lost = true;
            snprintf(B->err, sizeof B->err, "%s", pie_err_msg());
        }
    }
}

/* dst[i] = src[i] - src[0] for i in [0, n]: an indptr slice rebased. */
static void rebase(uint32_t *dst, const uint32_t *src, int32_t n)
{
    for (int32_t i = 0; i <= n; i++) dst[i] = src[i] - src[0];
}

/*
 * Device thread, without the lock: runs request r of B alone, a batch of
 * one made of its slices of B's arrays with their indices rebased (its
 * tokens, pages, masks and output rows; the same mask arrays the batched
 * run passed), its results written into B's rows as the batched run
 * writes them: tokens at rows row0.., probe values and ids at the rows'
 * offsets. Returns the backend's status (PIE_ENOMEM with a message where
 * the rebased indices find no memory).
 */
static int run_alone(pie_ctl *ctl, ctl_batch *B, int32_t r)
{
    const ctl_entry *e = &B->ents[r];
    int32_t t0 = B->qo_indptr[r], n = B->qo_indptr[r + 1] - t0;
    int32_t k0 = B->kv_indptr[r], np = B->kv_indptr[r + 1] - k0;
    int32_t o0 = e->row0, no = e->nrow, qo[2] = { 0, n }, kv[2] = { 0, np };
    uint32_t *mi = malloc((n + 1 + 2 * (size_t)(no + 1)) * sizeof *mi);
    int32_t *oi = malloc((no + 1) * sizeof *oi);
    if (!mi || !oi) {
        free(mi), free(oi);
        return pie_err_set(PIE_ENOMEM, "control: out of memory to run a "
                           "request of a failed batch alone");
    }
    uint32_t *li = mi + n + 1, *vi = li + no + 1, v0 = B->out.value_indptr[o0];
    rebase(mi, B->mask_indptr + t0, n);
    rebase(li, B->lm_indptr + o0, no);
    rebase(vi, B->out.value_indptr + o0, no);
    for (int32_t k = 0; k < no; k++) oi[k] = B->out_idx[o0 + k] - t0;
    pie_forward_batch fb = {
        .n_tokens = n, .n_reqs = 1, .token_ids = B->tokens + t0,
        .positions = B->positions + t0, .qo_indptr = qo,
        .kv_page_indices = B->kv_indices + k0, .kv_page_indptr = kv,
        .kv_last_page_len = B->last_len + r,
        .mask_indptr = B->any_mask ? mi : NULL,
        .mask_runs = B->any_mask ? B->mask_runs + B->mask_indptr[t0] : NULL,
        .n_outputs = no, .output_token_idx = oi, .samplers = B->samplers + o0,
        .logit_mask_indptr = B->any_lm ? li : NULL,
        .logit_mask_runs = B->any_lm ? B->lm_runs + B->lm_indptr[o0] : NULL,
    };
    pie_forward_out out = { .tokens = B->out.tokens + o0, .value_indptr = vi,
                            .values = B->out.values ? B->out.values + v0 : NULL,
                            .ids = B->out.ids ? B->out.ids + v0 : NULL };
    int rc = pie_backend_forward(ctl->b, &fb, &out);
    free(mi), free(oi);
    return rc;
}

/* Device thread, without the lock: B's forward failed (B->rc). Each
 * request gets that status; unless the device is lost or B held one
 * request, each then runs alone (run_alone) and gets its own, until one
 * finds the device lost (B->lost: the rest are not run). Logs the failed
 * batch and each request that fails alone. */
static void rerun_each(pie_ctl *ctl, ctl_batch *B)
{
    snprintf(B->err, sizeof B->err, "%s", pie_err_msg());
    for (int32_t r = 0; r < B->n_reqs; r++) B->ents[r].rc = B->rc;
    if (B->rc == PIE_EDEVLOST) {
        B->lost = true;
        return;
    }
    fprintf(stderr, "pie: control: batch of %d requests (%d tokens) failed: "
            "%s%s\n", B->n_reqs, B->n_tokens, B->err,
            B->n_reqs > 1 ? "; running each request alone" : "");
    int32_t failed = 0, ran = 0;
    for (int32_t r = 0; B->n_reqs > 1 && r < B->n_reqs && !B->lost; r++) {
        if (failed == ran && failed == RERUN_GIVE_UP) {
            fprintf(stderr, "pie: control: the first %d failed alone too; "
                    "the other %d keep the batch's error\n", failed,
                    B->n_reqs - r);
            break;
        }
        int rc = B->ents[r].rc = run_alone(ctl, B, r);
        ran++;
        if (rc == PIE_EDEVLOST) {
            B->lost = true;
            snprintf(B->err, sizeof B->err, "%s", pie_err_msg());
        } else if (rc < 0 && ++failed <= RERUN_GIVE_UP) {
            fprintf(stderr, "pie: control: request %d of that batch (%d "
                    "tokens) fails alone too: %s\n", r, B->ents[r].ntok,
                    pie_err_msg());
        }
    }
}

/* Device thread, without the lock: copies first, then one forward; where
 * it fails, each request alone (rerun_each). */
static void batch_run(pie_ctl *ctl, ctl_batch *B)
{
    pie_backend *b = ctl->b;
    double t = now_ns();
    run_copies(ctl, B);
    if (B->n_reqs > 0 && !B->lost) {
        pie_forward_batch fb = {
            .n_tokens = B->n_tokens, .n_reqs = B->n_reqs,
            .token_ids = B->tokens, .positions = B->positions,
            .qo_indptr = B->qo_indptr, .kv_page_indices = B->kv_indices,
            .kv_page_indptr = B->kv_indptr, .kv_last_page_len = B->last_len,
            .mask_indptr = B->any_mask ? B->mask_indptr : NULL,
            .mask_runs = B->any_mask ? B->mask_runs : NULL,
            .n_outputs = B->n_outputs, .output_token_idx = B->out_idx,
            .samplers = B->samplers,
            .logit_mask_indptr = B->any_lm ? B->lm_indptr : NULL,
            .logit_mask_runs = B->any_lm ? B->lm_runs : NULL,
        };
        B->rc = pie_backend_forward(b, &fb, &B->out);
        if (B->rc < 0) rerun_each(ctl, B);
    }
    B->backend_ns = now_ns() - t;
}

/* e's status: the batch's, its own run alone where the batch failed, and
 * PIE_EDEVLOST for every op of a batch that found the device lost. */
static int entry_status(const ctl_batch *B, const ctl_entry *e)
{
    if (B->lost) return PIE_EDEVLOST;
    return B->rc < 0 ? e->rc : 0;
}

static void entry_complete(pie_ctl *ctl, ctl_batch *B, ctl_entry *e)
{
    ctl_op *op = e->op;
    int rc = entry_status(B, e);
    if (rc == 0) {
        for (int32_t r = e->row0; r < e->row0 + e->nrow; r++) {
            int32_t o = B->row_src[r];
            op->out.tokens[o] = B->out.tokens[r];
            uint32_t a = B->out.value_indptr[r], n = B->out.value_indptr[r + 1] - a;
            uint32_t d = op->out.value_indptr[o];
            if (n == 0) continue;
            memcpy(op->out.values + d, B->out.values + a, n * sizeof(float));
            memcpy(op->out.ids + d, B->out.ids + a, n * sizeof(int32_t));
        }
        op->done_tokens += e->ntok;
    }
    op->state = OP_WAITING;     /* neither staged nor running any more */
    if (rc < 0) {
        pie__pool_forget(ctl, op, e->tok0, e->ntok);   /* KV not computed */
        pie__op_complete(ctl, op, rc);
    } else if (op->cancel_req) {
        pie__op_complete(ctl, op, PIE_ECANCELED);
    } else if (op->done_tokens == op->n_tokens) {
        pie__op_complete(ctl, op, 0);
    } else {
        pie__ready_insert(ctl, op);
    }
}

/* A backend call answered PIE_EDEVLOST (msg): the control layer is lost
 * from now on. With mu held. Wakes the scheduler (what is queued fails:
 * fail_queued) and allocations waiting for pages (pie__wait_for_pages
 * fails them: no swap can free any). */
void pie__device_lost(pie_ctl *ctl, const char *msg)
{
    if (ctl->lost) return;
    snprintf(ctl->lost_msg, sizeof ctl->lost_msg, "device lost: %s; every "
             "forward fails from now on: restart the server", msg);
    ctl->lost = true;
    ctl->st.device_lost = true;
    fprintf(stderr, "pie: control: %s\n", ctl->lost_msg);
    pthread_cond_broadcast(&ctl->pool_cv);
    pthread_cond_signal(&ctl->sched_cv);
}

int pie__backend_rc(pie_ctl *ctl, int rc)
{
    if (rc == PIE_EDEVLOST) pie__device_lost(ctl, pie_err_msg());
    return rc;
}

int pie__lost_err(pie_ctl *ctl)
{
    return pie_err_set(PIE_EDEVLOST, "control: %s", ctl->lost_msg);
}

/* The device is lost: what was staged or is ready completes with
 * PIE_EDEVLOST (so do their dependents: cancel_dependents). */
static void fail_queued(pie_ctl *ctl)
{
    ctl_batch *S = ctl->staging;
    if (S->n_reqs > 0 || S->n_copies > 0) pie__unstage_all(ctl);
    for (int p = 0; p < CTL_N_PRIO; p++)
        while (ctl->ready[p])
            pie__op_complete(ctl, ctl->ready[p], PIE_EDEVLOST);
}

static void batch_complete(pie_ctl *ctl, ctl_batch *B)
{
    double t = now_ns();
    if (B->lost) pie__device_lost(ctl, B->err);
    for (int32_t i = 0; i < B->n_copies; i++) {
        ctl_op *op = B->copies[i];
        op->state = OP_WAITING;
        pie__op_complete(ctl, op, B->lost ? PIE_EDEVLOST
                                  : op->cancel_req ? PIE_ECANCELED
                                  : op->status);
    }
    for (int32_t i = 0; i < B->n_reqs; i++) entry_complete(ctl, B, &B->ents[i]);
    ctl->st.backend_ns_total += B->backend_ns;
    batch_reset(B);
    ctl->ovh_ns += now_ns() - t;
}

static void launch(pie_ctl *ctl)
{
    ctl_batch *B = ctl->staging;
    for (int32_t i = 0; i < B->n_reqs; i++) {
        B->ents[i].op->state = OP_RUNNING;
        B->ents[i].op->ran = true;
    }
    for (int32_t i = 0; i < B->n_copies; i++) B->copies[i]->state = OP_RUNNING;
    ctl->st.fires++;
    ctl->st.fired_reqs += B->n_reqs;
    ctl->st.fired_tokens += B->n_tokens;
    ctl->st.last_batch_reqs = B->n_reqs;
    ctl->st.last_batch_tokens = B->n_tokens;
    if (B->n_reqs > ctl->st.max_batch_reqs) ctl->st.max_batch_reqs = B->n_reqs;
    ctl->st.overhead_ns_last = ctl->ovh_ns;
    ctl->st.overhead_ns_total += ctl->ovh_ns;
    ctl->ovh_ns = 0;
    ctl->running = ctl->launch = B;
    ctl->staging = B == &ctl->bat[0] ? &ctl->bat[1] : &ctl->bat[0];
    pthread_cond_signal(&ctl->dev_cv);
}

/* After a fire: the finished batch's ops completed (their callbacks
 * queued on ctl->notify), everything now ready staged, and the staging
 * batch launched if the device is idle; once the device is lost, what is
 * staged or ready fails instead (fail_queued). Returns whether it
 * launched. */
static bool turn_over(pie_ctl *ctl)
{
    if (ctl->finished) {
        batch_complete(ctl, ctl->finished);
        ctl->finished = NULL;
    }
    if (ctl->lost) {
        fail_queued(ctl);
    } else if (!ctl->stop && ctl->n_ready > 0) {
        double t = now_ns();
        stage_ready(ctl, ctl->staging);
        ctl->ovh_ns += now_ns() - t;
    }
    ctl_batch *S = ctl->staging;
    if (ctl->lost || ctl->running || ctl->idle_waiters > 0 ||
        (S->n_reqs == 0 && S->n_copies == 0))
        return false;
    launch(ctl);
    return true;
}

/* Moves the callbacks and wake-ups the device thread queued to
 * dev_notify, which only the scheduler thread runs (ctl->notify is emptied by
 * whichever thread calls pie__unlock next; callbacks run on the scheduler
 * thread or on the thread that cancelled the op). Keeps completion order:
 * both lists are newest first. */
static void notify_to_sched(pie_ctl *ctl)
{
    ctl_op *t = ctl->notify;
    if (!t) return;
    while (t->nnext) t = t->nnext;
    t->nnext = ctl->dev_notify;
    ctl->dev_notify = ctl->notify;
    ctl->notify = NULL;
}

/* Pre-stages what arrives while the device runs, launches it when the
 * device is idle, and runs the completion callbacks (after any launch:
 * they wake inferlets and threads). */
static void *sched_main(void *arg)
{
    pie_ctl *ctl = arg;
    pthread_mutex_lock(&ctl->mu);
    for (;;) {
        if (turn_over(ctl)) continue;    /* pre-stage what did not fit */
        notify_to_sched(ctl);
        if (ctl->dev_notify) {       /* completions, and ops staging failed */
            ctl->notify = ctl->dev_notify;
            ctl->dev_notify = NULL;
            pie__unlock(ctl);
            pthread_mutex_lock(&ctl->mu);
            continue;
        }
        if (ctl->stop && !ctl->running && ctl->idle_waiters == 0) break;
        pthread_cond_wait(&ctl->sched_cv, &ctl->mu);
    }
    pthread_mutex_unlock(&ctl->mu);
    return NULL;
}

/* Runs launched batches. A finished one is turned over here, so that the
 * next (a chained decode step is ready the moment its parent completes)
 * starts without waking the scheduler thread and being woken back by it;
 * the scheduler thread then runs the callbacks. */
static void *dev_main(void *arg)
{
    pie_ctl *ctl = arg;
    pthread_mutex_lock(&ctl->mu);
    for (;;) {
        while (!ctl->launch && !ctl->stop)
            pthread_cond_wait(&ctl->dev_cv, &ctl->mu);
        if (!ctl->launch) break;
        ctl_batch *B = ctl->launch;
        ctl->launch = NULL;
        pthread_mutex_unlock(&ctl->mu);
        batch_run(ctl, B);
        pthread_mutex_lock(&ctl->mu);
        ctl->running = NULL;
        ctl->finished = B;
        turn_over(ctl);
        notify_to_sched(ctl);
        pthread_cond_signal(&ctl->sched_cv);
        pthread_cond_broadcast(&ctl->idle_cv);
    }
    pthread_mutex_unlock(&ctl->mu);
    return NULL;
}

int pie__sched_start(pie_ctl *ctl)
{
    ctl->staging = &ctl->bat[0];
    if (pthread_create(&ctl->dev_th, NULL, dev_main, ctl) != 0)
        return pie_err_set(PIE_ENOMEM, "control: cannot start device thread");
    if (pthread_create(&ctl->sched_th, NULL, sched_main, ctl) != 0) {
        pthread_mutex_lock(&ctl->mu);
        ctl->stop = true;
        pthread_cond_broadcast(&ctl->dev_cv);
        pthread_mutex_unlock(&ctl->mu);
        pthread_join(ctl->dev_th, NULL);
        return pie_err_set(PIE_ENOMEM, "control: cannot start scheduler");
    }
    return 0;
}

/* Stops both threads; a batch on the device completes first. */
void pie__sched_stop(pie_ctl *ctl)
{
    pthread_mutex_lock(&ctl->mu);
    ctl->stop = true;
    pthread_cond_broadcast(&ctl->sched_cv);
    pthread_cond_broadcast(&ctl->dev_cv);
    pthread_cond_broadcast(&ctl->pool_cv);
    pthread_mutex_unlock(&ctl->mu);
    pthread_join(ctl->sched_th, NULL);
    pthread_mutex_lock(&ctl->mu);
    pthread_cond_broadcast(&ctl->dev_cv);
    pthread_mutex_unlock(&ctl->mu);
    pthread_join(ctl->dev_th, NULL);
    pie__batch_free(&ctl->bat[0]);
    pie__batch_free(&ctl->bat[1]);
}
