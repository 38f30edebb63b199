/*
 * ctl.c — the control layer's public entry points: engine lifetime,
 * clients, forward submission (validation and dependency wiring), page
 * copies, futures and counters. The scheduler is in sched.c, the page pool
 * in pool.c; see ctl_int.h for the op life cycle.
 *
 * Dependencies are wired at submission: a forward waits for every forward
 * it chains from (a CHAIN dependency: their failure cancels it) and for the
 * newest not-yet-done writer of every page it touches (an ORDER dependency:
 * per-page submission order; the writer's failure cancels it too, as it
 * would read slots the writer left unwritten). Each page remembers that
 * writer in last_writer, and leaves the dedup table then
 * (pie__pool_write_wired; a copy's destination in
 * pie__pool_copy_record): a reader wired later
 * reads the new KV. A dependency holds a reference on the dependent op,
 * so the parent's dependent array never points at freed memory.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/pie_err.h"
#include "control/ctl_int.h"

/* ---- engine --------------------------------------------------------------- */

int pie_ctl_create(pie_backend *b, const pie_ctl_opts *opts, pie_ctl **out)
{
    if (!b || !out) return pie_err_set(PIE_EINVAL, "control: NULL backend");
    pie_ctl *ctl = calloc(1, sizeof *ctl);
    if (!ctl) return pie_err_set(PIE_ENOMEM, "control: out of memory");
    ctl->b = b;
    if (opts) ctl->o = *opts;
    if (ctl->o.max_batch_tokens <= 0) ctl->o.max_batch_tokens = 4096;
    if (b->max_tokens > 0 && ctl->o.max_batch_tokens > b->max_tokens)
        ctl->o.max_batch_tokens = b->max_tokens;  /* a fire it can take */
    if (ctl->o.max_batch_reqs <= 0) ctl->o.max_batch_reqs = 256;
    if (ctl->o.max_batch_pages <= 0) ctl->o.max_batch_pages = INT32_MAX;
    if (ctl->o.prefill_chunk < 0) ctl->o.prefill_chunk = 0;     /* never */
    else if (ctl->o.prefill_chunk == 0) ctl->o.prefill_chunk = 512;
    ctl->ps = b->page_size;
    ctl->n_pages = b->n_pages;
    ctl->vocab = b->cfg->vocab_size;
    if (ctl->o.max_swap_bytes == 0)
        ctl->o.max_swap_bytes = (uint64_t)ctl->n_pages * b->page_bytes;
    /* half the pool: exports (a shared prompt cache) can never crowd out
     * the requests that read them */
    if (ctl->o.max_export_pages == 0)
        ctl->o.max_export_pages = ctl->n_pages / 2 + ctl->n_pages % 2;
    if (ctl->ps <= 0 || ctl->n_pages <= 0 || ctl->vocab <= 0) {
        free(ctl);
        return pie_err_set(PIE_EINVAL, "control: backend has page_size %d, "
                           "%d pages, vocab %d", b->page_size, b->n_pages,
                           b->cfg->vocab_size);
    }
    if (ctl->o.max_export_pages < 0) {
        int32_t v = ctl->o.max_export_pages;
        free(ctl);
        return pie_err_set(PIE_EINVAL, "control: max_export_pages %d; use 0 "
                           "for the default (half the pool) or a page count",
                           v);
    }
    pthread_mutex_init(&ctl->mu, NULL);
    pthread_cond_init(&ctl->sched_cv, NULL);
    pthread_cond_init(&ctl->dev_cv, NULL);
    pthread_cond_init(&ctl->pool_cv, NULL);
    pthread_cond_init(&ctl->idle_cv, NULL);
    int rc = pie__pool_init(ctl);
    if (rc == 0) rc = pie__sched_start(ctl);
    if (rc < 0) {
        pie__pool_free(ctl);
        free(ctl);
        return rc;
    }
    *out = ctl;
    return 0;
}

/* Cancels every not-done op of c (mu held). RUNNING ops finish on the
 * device and complete as cancelled. */
static void cancel_client_ops(pie_ctl *ctl, pie_ctl_client *c)
{
    bool unstaged = false;
    ctl_op *op = c->ops;
    while (op) {
        if (op->state == OP_STAGED && !unstaged) {
            pie__unstage_all(ctl);
            unstaged = true;
        }
        if (op->state == OP_RUNNING) {
            op->cancel_req = true;
            op = op->cnext;
        } else {
            pie__op_complete(ctl, op, PIE_ECANCELED);
            op = c->ops;   /* cascades may have removed others */
            while (op && op->state == OP_RUNNING && op->cancel_req)
                op = op->cnext;
        }
    }
}

/* Detaches c's remaining (running) ops, drops its pages, frees it. */
static void client_destroy(pie_ctl *ctl, pie_ctl_client *c)
{
    for (ctl_op *op = c->ops, *n; op; op = n) {
        n = op->cnext;
        op->cnext = op->cprev = NULL;
        op->c = NULL;
    }
    c->ops = NULL;
    pie__client_drop_pages(c);
    if (c->prev) c->prev->next = c->next;
    else ctl->clients = c->next;
    if (c->next) c->next->prev = c->prev;
    ctl->n_clients--;
    pthread_cond_broadcast(&ctl->pool_cv);   /* waiters recheck cycles */
    free(c->h);
    free(c);
}

void pie_ctl_free(pie_ctl *ctl)
{
    if (!ctl) return;
    pthread_mutex_lock(&ctl->mu);
    for (pie_ctl_client *c = ctl->clients; c; c = c->next)
        cancel_client_ops(ctl, c);
    pie__unlock(ctl);
    pie__sched_stop(ctl);
    pthread_mutex_lock(&ctl->mu);
    while (ctl->clients) client_destroy(ctl, ctl->clients);
    pthread_mutex_unlock(&ctl->mu);
    pie__pool_free(ctl);
    pthread_mutex_destroy(&ctl->mu);
    pthread_cond_destroy(&ctl->sched_cv);
    pthread_cond_destroy(&ctl->dev_cv);
    pthread_cond_destroy(&ctl->pool_cv);
    pthread_cond_destroy(&ctl->idle_cv);
    free(ctl);
}

pie_backend *pie_ctl_backend(pie_ctl *ctl) { return ctl->b; }
int32_t pie_ctl_page_size(pie_ctl *ctl) { return ctl->ps; }
int32_t pie_ctl_n_pages(pie_ctl *ctl) { return ctl->n_pages; }

/* ---- clients -------------------------------------------------------------- */

int pie_ctl_client_open(pie_ctl *ctl, const pie_ctl_client_opts *opts,
                        pie_ctl_client **out)
{
    pie_ctl_client_opts o = opts ? *opts : (pie_ctl_client_opts){ 0 };
    if (o.priority < 0 || o.priority >= CTL_N_PRIO || o.max_pages < 0 ||
        o.max_tokens < 0 || o.max_handles < 0)
        return pie_err_set(PIE_EINVAL, "control: client priority %d (0..%d), "
                           "max_pages %d, max_tokens %lld, max_handles %d",
                           o.priority, CTL_N_PRIO - 1, o.max_pages,
                           (long long)o.max_tokens, o.max_handles);
    if (o.max_handles == 0)          /* the larger of the fixed cap and 4x */
        o.max_handles = ctl->n_pages > PIE_CTL_MAX_HANDLES / 4
                            ? (ctl->n_pages > INT32_MAX / 4 ? INT32_MAX
                                                            : ctl->n_pages * 4)
                            : PIE_CTL_MAX_HANDLES;
    pie_ctl_client *c = calloc(1, sizeof *c);
    if (!c) return pie_err_set(PIE_ENOMEM, "control: out of memory");
    c->ctl = ctl;
    snprintf(c->name, sizeof c->name, "%s", o.name ? o.name : "client");
    c->max_pages = o.max_pages;
    c->max_tokens = o.max_tokens;
    c->max_handles = o.max_handles;
    c->prio = o.priority;
    c->free_h = -1;
    c->on_evict = o.on_evict;
    c->evict_user = o.evict_user;
    pthread_mutex_lock(&ctl->mu);
    c->next = ctl->clients;
    if (c->next) c->next->prev = c;
    ctl->clients = c;
    ctl->n_clients++;
    pthread_mutex_unlock(&ctl->mu);
    *out = c;
    return 0;
}

void pie_ctl_client_close(pie_ctl_client *c)
{
    if (!c) return;
    pie_ctl *ctl = c->ctl;
    pthread_mutex_lock(&ctl->mu);
    while (c->evicting > 0) pthread_cond_wait(&ctl->pool_cv, &ctl->mu);
    cancel_client_ops(ctl, c);
    client_destroy(ctl, c);
    pie__unlock(ctl);
}

/* ---- validation ----------------------------------------------------------- */

/* Checks a run-length list: indptr (n+1 entries) starts at 0, is monotone
 * with at most 2^24 runs per entry and at most CTL_MAX_RUNS in all, and
 * each entry's runs cover at most limit slots. The whole indptr is checked
 * before any run is read, so runs is only read inside [0, indptr[n]). */
static int check_runs(const uint32_t *indptr, const uint32_t *runs, int32_t n,
                      uint64_t limit, const char *what)
{
    if (indptr[0] != 0)
        return pie_err_set(PIE_EINVAL, "control: %s indptr must start at 0",
                           what);
    for (int32_t i = 0; i < n; i++)
        if (indptr[i + 1] < indptr[i] || indptr[i + 1] - indptr[i] > (1u << 24))
            return pie_err_set(PIE_EINVAL, "control: %s indptr not monotone "
                               "at %d", what, i);
    if (indptr[n] > CTL_MAX_RUNS)
        return pie_err_set(PIE_ELIMIT, "control: %s indptr totals %u runs, "
                           "more than the limit of %d", what, indptr[n],
                           CTL_MAX_RUNS);
    if (indptr[n] > 0 && !runs)
        return pie_err_set(PIE_EINVAL, "control: runs missing for %s "
                           "indptr", what);
    for (int32_t i = 0; i < n; i++) {
        uint64_t sum = 0;
        for (uint32_t k = indptr[i]; k < indptr[i + 1]; k++) sum += runs[k];
        if (sum > limit)
            return pie_err_set(PIE_ERANGE, "control: %s %d covers %llu slots, "
                               "more than %llu", what, i,
                               (unsigned long long)sum,
                               (unsigned long long)limit);
    }
    return 0;
}

/* Checks output row o of f: the backend's per-row rules (sampler and logit
 * mask, pie_batch_validate_row), as the backend would only find them once
 * the row shares a batch with other clients' rows; plus LOGPROBS of at most
 * vocab ids. */
static int check_row(const pie_ctl_forward *f, int32_t vocab, int32_t o)
{
    const pie_sampler *s = &f->samplers[o];
    if (s->kind == PIE_PROBE_LOGPROBS && s->n_ids > vocab)
        return pie_err_set(PIE_EINVAL, "control: output %d: logprobs of %d "
                           "ids, more than vocab %d", o, s->n_ids, vocab);
    const uint32_t *li = f->logit_mask_indptr;
    int rc = pie_batch_validate_row(s, li ? f->logit_mask_runs + li[o] : NULL,
                                    li ? (int64_t)(li[o + 1] - li[o]) : -1, o,
                                    vocab);
    return rc < 0 ? pie_err_wrap(rc, "control") : 0;
}

/* Checks f's tokens, pages and positions, sets *kv_len; 0 or a PIE_E error. */
static int check_shape(const pie_ctl *ctl, const pie_ctl_forward *f,
                       int64_t *kv_len)
{
    int32_t ps = ctl->ps;
    if (f->n_tokens < 1 || f->n_tokens > (1 << 20) || !f->tokens ||
        !f->positions)
        return pie_err_set(PIE_EINVAL, "control: forward needs 1..2^20 tokens "
                           "with positions (got %d)", f->n_tokens);
    if (f->n_pages < 1 || f->n_pages > ctl->n_pages || !f->pages)
        return pie_err_set(PIE_EINVAL, "control: forward needs 1..%d pages "
                           "(got %d)", ctl->n_pages, f->n_pages);
    if (f->last_page_len < 1 || f->last_page_len > ps)
        return pie_err_set(PIE_ERANGE, "control: last page fill %d outside "
                           "1..%d", f->last_page_len, ps);
    *kv_len = (int64_t)(f->n_pages - 1) * ps + f->last_page_len;
    if (*kv_len < f->n_tokens)
        return pie_err_set(PIE_ERANGE, "control: %d new tokens do not fit in "
                           "%lld KV slots", f->n_tokens, (long long)*kv_len);
    for (int32_t i = 0; i < f->n_tokens; i++)
        if (f->positions[i] < 0)
            return pie_err_set(PIE_ERANGE, "control: negative position %d at "
                               "token %d", f->positions[i], i);
    return 0;
}

/* Checks f's chains and the ids of unchained tokens; 0 or a PIE_E error. */
static int check_token_ids(const pie_ctl *ctl, const pie_ctl_forward *f)
{
    if (f->n_chains < 0 || (f->n_chains > 0 && !f->chains))
        return pie_err_set(PIE_EINVAL, "control: bad chain list");
    for (int32_t i = 0; i < f->n_chains; i++)
        if (f->chains[i].token_idx < 0 || f->chains[i].token_idx >= f->n_tokens)
            return pie_err_set(PIE_ERANGE, "control: chain %d feeds token %d "
                               "of %d", i, f->chains[i].token_idx, f->n_tokens);
    /* chained[i]: token i is fed by a chain (its id is ignored); one pass
     * over tokens and one over chains, not tokens x chains */
    uint8_t *chained = f->n_chains > 0 ? calloc(f->n_tokens, 1) : NULL;
    if (f->n_chains > 0 && !chained)
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    for (int32_t i = 0; i < f->n_chains; i++)
        chained[f->chains[i].token_idx] = 1;
    for (int32_t i = 0; i < f->n_tokens; i++)
        if (!(chained && chained[i]) &&
            (f->tokens[i] < 0 || f->tokens[i] >= ctl->vocab)) {
            free(chained);
            return pie_err_set(PIE_ERANGE, "control: token id %d at %d "
                               "outside vocab %d", f->tokens[i], i, ctl->vocab);
        }
    free(chained);
    return 0;
}

/* Checks f's attention mask runs and the backend's cap; 0 or a PIE_E error. */
static int check_attn_mask(const pie_ctl *ctl, const pie_ctl_forward *f,
                           int64_t kv_len)
{
    int rc = check_runs(f->mask_indptr, f->mask_runs, f->n_tokens,
                        (uint64_t)kv_len, "attention mask of token");
    if (rc < 0) return rc;
    int32_t lim = ctl->b->max_tokens;
    if (lim > 0 && f->n_tokens > lim)    /* never split (sched.c) */
        return pie_err_set(PIE_ELIMIT, "control: a forward with an "
                           "attention mask runs whole, and its %d tokens "
                           "pass the %d a forward of backend '%s' takes; "
                           "submit it in parts of at most %d tokens",
                           f->n_tokens, lim, ctl->b->name, lim);
    return 0;
}

/* Checks f's output rows, probe values and logit mask; 0 or a PIE_E error. */
static int check_outputs(const pie_ctl *ctl, const pie_ctl_forward *f)
{
    if (f->n_outputs < 0 || f->n_outputs > f->n_tokens * 64 ||
        (f->n_outputs > 0 && (!f->output_idx || !f->samplers)))
        return pie_err_set(PIE_EINVAL, "control: bad output rows (%d)",
                           f->n_outputs);
    int64_t n_vals = 0;
    for (int32_t o = 0; o < f->n_outputs; o++) {
        if (f->output_idx[o] < 0 || f->output_idx[o] >= f->n_tokens)
            return pie_err_set(PIE_ERANGE, "control: output %d at token %d "
                               "of %d", o, f->output_idx[o], f->n_tokens);
        n_vals += pie_sampler_values(&f->samplers[o], ctl->vocab);
    }
    if (n_vals > CTL_MAX_VALUES)
        return pie_err_set(PIE_ELIMIT, "control: forward asks for %lld probe "
                           "values, more than the limit of %d; use fewer "
                           "probe rows or smaller ones (TOPK k, LOGPROBS "
                           "ids, LOGITS is vocab %d each)", (long long)n_vals,
                           CTL_MAX_VALUES, ctl->vocab);
    if (f->logit_mask_indptr) {
        int rc = check_runs(f->logit_mask_indptr, f->logit_mask_runs,
                            f->n_outputs, (uint64_t)ctl->vocab,
                            "logit mask of output");
        if (rc < 0) return rc;
    }
    for (int32_t o = 0; o < f->n_outputs; o++) {
        int rc = check_row(f, ctl->vocab, o);
        if (rc < 0) return rc;
    }
    return 0;
}

/* Checks everything that does not need the lock. */
static int check_forward(pie_ctl *ctl, const pie_ctl_forward *f)
{
    int64_t kv_len = 0;
    int rc = check_shape(ctl, f, &kv_len);
    if (rc < 0) return rc;
    if ((rc = check_token_ids(ctl, f)) < 0) return rc;
    if (f->mask_indptr && (rc = check_attn_mask(ctl, f, kv_len)) < 0)
        return rc;
    return check_outputs(ctl, f);
}

/* ---- op construction ------------------------------------------------------ */

static void *dup_arr(const void *src, size_t n, size_t size, bool *fail)
{
    if (!src || n == 0) return NULL;
    void *p = malloc(n * size);
    if (!p) { *fail = true; return NULL; }
    memcpy(p, src, n * size);
    return p;
}

/* Copies f's tokens, positions and attention mask into op and gives it its
 * page array; on out of memory sets *fail (op keeps what it got). */
static void op_copy_tokens(pie_ctl *ctl, const pie_ctl_forward *f,
                           ctl_op *op, bool *fail)
{
    int32_t n = f->n_tokens;
    op->n_tokens = n;
    op->tokens = dup_arr(f->tokens, n, sizeof(int32_t), fail);
    op->positions = dup_arr(f->positions, n, sizeof(int32_t), fail);
    op->pages = calloc(f->n_pages, sizeof(int32_t));
    op->last_page_len = f->last_page_len;
    op->kv_len = (f->n_pages - 1) * ctl->ps + f->last_page_len;
    if (f->mask_indptr) {
        op->mask_indptr = dup_arr(f->mask_indptr, n + 1, sizeof(uint32_t), fail);
        op->mask_runs = dup_arr(f->mask_runs, f->mask_indptr[n], sizeof(uint32_t),
                                fail);
    }
}

/* Moves the LOGPROBS ids of op's samplers into one buffer op owns
 * (op->idbuf, n_ids long) and points the samplers into it; false on out
 * of memory. */
static bool op_gather_ids(ctl_op *op, int32_t n_ids)
{
    op->idbuf = malloc(n_ids * sizeof(int32_t));
    if (!op->idbuf) return false;
    for (int32_t o = 0, at = 0; o < op->n_outputs; o++) {
        pie_sampler *s = &op->samplers[o];
        if (s->kind != PIE_PROBE_LOGPROBS || s->n_ids == 0) continue;
        memcpy(op->idbuf + at, s->ids, s->n_ids * sizeof(int32_t));
        s->ids = op->idbuf + at;
        at += s->n_ids;
    }
    return true;
}

/* Copies f's output rows, samplers (their ids included) and logit mask
 * into op; returns the probe values they ask for, and on out of memory
 * sets *fail (op keeps what it got). */
static int32_t op_copy_outputs(pie_ctl *ctl, const pie_ctl_forward *f,
                               ctl_op *op, bool *fail)
{
    int32_t no = f->n_outputs;
    op->n_outputs = no;
    op->output_idx = dup_arr(f->output_idx, no, sizeof(int32_t), fail);
    op->samplers = dup_arr(f->samplers, no, sizeof(pie_sampler), fail);
    int32_t n_ids = 0, n_vals = 0;   /* <= CTL_MAX_VALUES (check_forward) */
    for (int32_t o = 0; o < no; o++) {
        if (f->samplers[o].kind == PIE_PROBE_LOGPROBS) n_ids += f->samplers[o].n_ids;
        n_vals += pie_sampler_values(&f->samplers[o], ctl->vocab);
    }
    if (n_ids > 0 && !*fail) *fail = !op_gather_ids(op, n_ids);
    if (f->logit_mask_indptr) {
        op->lm_indptr = dup_arr(f->logit_mask_indptr, no + 1, sizeof(uint32_t),
                                fail);
        op->lm_runs = dup_arr(f->logit_mask_runs, f->logit_mask_indptr[no],
                              sizeof(uint32_t), fail);
    }
    return n_vals;
}

/* Allocates op's result arrays for n_vals probe values, and its chain and
 * write arrays; a NULL array is left for the caller to check. */
static void op_alloc_results(ctl_op *op, const pie_ctl_forward *f,
                             int32_t n_vals)
{
    int32_t no = f->n_outputs;
    op->out.tokens = calloc(no > 0 ? no : 1, sizeof(int32_t));
    op->out.value_indptr = calloc(no + 1, sizeof(uint32_t));
    op->out.values = calloc(n_vals > 0 ? n_vals : 1, sizeof(float));
    op->out.ids = calloc(n_vals > 0 ? n_vals : 1, sizeof(int32_t));
    op->chains = calloc(f->n_chains > 0 ? f->n_chains : 1, sizeof(ctl_chain));
    op->writes = calloc(f->n_pages, sizeof(ctl_write));
}

/* Copies f's arrays into a new op (no lock needed); NULL on out of memory,
 * with all of it freed. */
static ctl_op *op_build(pie_ctl *ctl, const pie_ctl_forward *f)
{
    ctl_op *op = calloc(1, sizeof *op);
    if (!op) return NULL;
    pthread_cond_init(&op->cv, NULL);
    bool fail = false;
    op->kind = OP_FORWARD;
    op->ctl = ctl;
    op_copy_tokens(ctl, f, op, &fail);
    int32_t n_vals = op_copy_outputs(ctl, f, op, &fail);
    op_alloc_results(op, f, n_vals);
    if (fail || !op->pages || !op->out.tokens || !op->out.value_indptr ||
        !op->out.values || !op->out.ids || !op->chains || !op->writes) {
        atomic_store(&op->refs, 1);
        pie__op_unref(op);
        return NULL;
    }
    for (int32_t o = 0; o < op->n_outputs; o++) {
        op->out.tokens[o] = -1;
        op->out.value_indptr[o + 1] = op->out.value_indptr[o] +
            pie_sampler_values(&op->samplers[o], ctl->vocab);
    }
    return op;
}

/* Drops parent's dependents that are DONE already (cancelled, or failed
 * through another parent) and waits on it no longer (mu held). */
static void sweep_deps(ctl_op *parent)
{
    int32_t k = 0;
    for (int32_t i = 0; i < parent->n_deps; i++) {
        if (atomic_load(&parent->deps[i].op->state) == OP_DONE)
            pie__op_unref(parent->deps[i].op);
        else
            parent->deps[k++] = parent->deps[i];
    }
    parent->n_deps = k;
}

/* Registers op as waiting on parent (mu held). Where parent's array is
 * full, its DONE dependents leave it first (sweep_deps), so that forwards
 * submitted and cancelled in a loop behind one pending parent do not pile
 * up in it until it completes: the array stays within twice its waiting
 * dependents. */
static int add_dep(ctl_op *parent, ctl_op *op, bool chain)
{
    if (parent->n_deps == parent->cap_deps) {
        sweep_deps(parent);
        /* grown unless the sweep freed half: a sweep per cap / 2 adds */
        if (parent->cap_deps == 0 || parent->n_deps > parent->cap_deps / 2) {
            int32_t cap = parent->cap_deps ? parent->cap_deps * 2 : 4;
            ctl_dep *nd = realloc(parent->deps, cap * sizeof *nd);
            if (!nd) return pie_err_set(PIE_ENOMEM, "control: out of memory");
            parent->deps = nd;
            parent->cap_deps = cap;
        }
    }
    parent->deps[parent->n_deps++] = (ctl_dep){ .op = op, .chain = chain };
    atomic_fetch_add(&op->refs, 1);
    op->n_pending++;
    return 0;
}

/* Resolves f's page handles into op (mu held). */
static int resolve_pages(pie_ctl_client *c, const pie_ctl_forward *f,
                         ctl_op *op)
{
    for (int32_t k = 0; k < f->n_pages; k++) {
        ctl_handle *hd = pie__handle_get(c, f->pages[k]);
        if (!hd) return PIE_EINVAL;
        op->pages[k] = hd->page;
    }
    return 0;
}

/* Checks that f reads no slot that nothing wrote (mu held, pages resolved,
 * before prefix caching trims op). Pages are not cleared when reused, so a
 * slot no forward or copy of theirs wrote may still hold a previous owner's
 * KV. With first = kv_len - n_tokens, the first slot f writes: every page
 * before first's page must be full (fill == page size) and first's page
 * must be filled up to first, so the new KV also leaves no gap. */
static int check_filled(pie_ctl *ctl, const pie_ctl_forward *f,
                        const ctl_op *op)
{
    int32_t ps = ctl->ps, first = op->kv_len - op->n_tokens;
    for (int32_t k = 0; k <= first / ps; k++) {
        int32_t need = k < first / ps ? ps : first % ps;
        int32_t fill = ctl->pages[op->pages[k]].fill;
        if (fill < need)
            return pie_err_set(PIE_ERANGE, "control: forward reads slots "
                               "%d..%d of page %d (handle %u), which nothing "
                               "wrote (fill %d); KV must be written in order "
                               "from slot 0: kv_len - n_tokens may not pass "
                               "the written slots", fill, need - 1, k,
                               f->pages[k], fill);
    }
    return 0;
}

/* Refuses a page listed twice where a listing is one op writes (from its
 * first new token on, before prefix caching trims any): its slots would be
 * written twice, or read and overwritten, in one forward; and prefix
 * caching, which may give one listing's handle a cached twin, would leave
 * the other on a page the handle no longer holds (mu held, pages
 * resolved). */
static int check_distinct(const pie_ctl_forward *f, const ctl_op *op,
                          int32_t ps)
{
    for (int32_t k = (op->kv_len - op->n_tokens) / ps; k < f->n_pages; k++)
        for (int32_t j = 0; j < k; j++)
            if (op->pages[j] == op->pages[k])
                return pie_err_set(PIE_EINVAL, "control: page handle %u is "
                                   "listed twice in one forward (at %d and "
                                   "%d) and written", f->pages[k], j, k);
    return 0;
}

/* Checks that the pages op writes from its first new token of index t0
 * on are writable (mu held). */
static int check_writable(pie_ctl_client *c, const pie_ctl_forward *f,
                          const ctl_op *op, int32_t t0)
{
    pie_ctl *ctl = c->ctl;
    int32_t ps = ctl->ps, first = (op->kv_len - op->n_tokens + t0) / ps;
    for (int32_t k = first; k < f->n_pages; k++) {
        const ctl_handle *hd = &c->h[f->pages[k] - 1];
        if (hd->ro || PAGE_IS_SHARED(&ctl->pages[hd->page]))
            return pie_err_set(PIE_EPERM, "control: page handle %u is "
                               "read-only (imported, exported or shared by "
                               "dedup); copy it to a new page to write",
                               f->pages[k]);
    }
    return 0;
}

/* Drops the first skip new tokens of op (their KV is cached). */
static void op_trim(ctl_op *op, int32_t skip)
{
    int32_t n = op->n_tokens - skip;
    memmove(op->tokens, op->tokens + skip, n * sizeof(int32_t));
    memmove(op->positions, op->positions + skip, n * sizeof(int32_t));
    if (op->mask_indptr) {
        uint32_t base = op->mask_indptr[skip];
        for (int32_t i = 0; i <= n; i++)
            op->mask_indptr[i] = op->mask_indptr[i + skip] - base;
        memmove(op->mask_runs, op->mask_runs + base,
                op->mask_indptr[n] * sizeof(uint32_t));
    }
    for (int32_t o = 0; o < op->n_outputs; o++) op->output_idx[o] -= skip;
    for (int32_t i = 0; i < op->n_chains; i++) op->chains[i].token_idx -= skip;
    op->n_tokens = n;
}

/* Prefix caching: resolves the pages, skips the cached leading pages, and
 * checks that what is left to write is writable (mu held). */
static int resolve_prefix(pie_ctl_client *c, const pie_ctl_forward *f,
                          ctl_op *op)
{
    pie_ctl *ctl = c->ctl;
    int32_t twins[64];
    int32_t n = pie__pool_prefix_plan(ctl, c, f->pages, op, twins, 64);
    int rc = check_writable(c, f, op, n * ctl->ps);
    if (rc < 0 || n == 0) return rc;
    pie__pool_prefix_apply(ctl, c, f->pages, op, twins, n);
    op_trim(op, n * ctl->ps);
    return 0;
}

/* Checks and wires chains (mu held). */
static int resolve_chains(pie_ctl_client *c, const pie_ctl_forward *f,
                          ctl_op *op)
{
    for (int32_t i = 0; i < f->n_chains; i++) {
        const pie_ctl_chain *ch = &f->chains[i];
        ctl_op *p = (ctl_op *)ch->from;
        if (!p || p->kind != OP_FORWARD || (p->c != c && p->state != OP_DONE))
            return pie_err_set(PIE_EINVAL, "control: chain %d: not a forward "
                               "of this client", i);
        if (p->state == OP_DONE && p->status != 0)  /* (its samplers gone) */
            return pie_err_set(PIE_ECANCELED, "control: chain %d: the forward "
                               "it reads failed or was cancelled", i);
        if (ch->row < 0 || ch->row >= p->n_outputs ||
            (p->samplers[ch->row].kind != PIE_SAMPLER_GREEDY &&
             p->samplers[ch->row].kind != PIE_SAMPLER_RANDOM))
            return pie_err_set(PIE_EINVAL, "control: chain %d: row %d is not "
                               "a sampled output", i, ch->row);
        if (p->state == OP_DONE) {
            /* its token now, and no reference: the submitter may release
             * p while op still waits on others, and p's results go then */
            int32_t tok = p->out.tokens[ch->row];
            if (tok < 0 || tok >= c->ctl->vocab)
                return pie_err_set(PIE_EINVAL, "control: chain %d: token "
                                   "%d of row %d is outside vocab %d", i,
                                   tok, ch->row, c->ctl->vocab);
            op->tokens[ch->token_idx] = tok;
            op->chains[op->n_chains++] = (ctl_chain){ ch->token_idx, NULL,
                                                      ch->row };
            continue;
        }
        op->chains[op->n_chains++] = (ctl_chain){ ch->token_idx, p, ch->row };
        atomic_fetch_add(&p->refs, 1);
        if (add_dep(p, op, true) < 0) return PIE_ENOMEM;
    }
    return 0;
}

/* Orders op after the pending writers of its pages and records its own
 * writes (mu held). Cannot fail after the first mutation except ENOMEM,
 * which the caller unwinds with pie__op_complete: every page is referenced
 * before the first dependency that can fail, as that unwind drops all. */
static int wire_pages(pie_ctl *ctl, ctl_op *op)
{
    int32_t ps = ctl->ps, first = op->kv_len - op->n_tokens;
    for (int32_t k = 0; k < op->n_pages; k++) pie__page_ref(ctl, op->pages[k]);
    for (int32_t k = 0; k < op->n_pages; k++) {
        ctl_page *p = &ctl->pages[op->pages[k]];
        if (p->last_writer && p->last_writer != op &&
            add_dep(p->last_writer, op, false) < 0)
            return PIE_ENOMEM;
    }
    for (int32_t k = first / ps; k < op->n_pages; k++) {
        ctl_page *p = &ctl->pages[op->pages[k]];
        int32_t hi = k == op->n_pages - 1 ? op->last_page_len : ps;
        ctl_op *prev = p->last_writer;  /* op waits on it (above) */
        if (prev) atomic_fetch_add(&prev->refs, 1);
        op->writes[op->n_writes++] = (ctl_write){
            .page = op->pages[k], .old_fill = p->fill,
            .new_fill = p->fill > hi ? p->fill : hi, .prev = prev };
        p->fill = op->writes[op->n_writes - 1].new_fill;
        p->last_writer = op;
        /* readers wired from now on read op's KV, not what the hash says */
        pie__pool_write_wired(ctl, op->pages[k]);
    }
    return 0;
}

/* Links a fully built op into its client and the ctl (mu held). */
static void op_enqueue(pie_ctl_client *c, ctl_op *op)
{
    pie_ctl *ctl = c->ctl;
    op->c = c;
    op->prio = c->prio;
    op->seq = ++ctl->seq;
    op->cnext = c->ops;
    if (c->ops) c->ops->cprev = op;
    c->ops = op;
    ctl->st.queue_depth++;
    if (op->n_pending == 0) pie__make_ready(ctl, op);
}

/* Checks c's token quota, resumes c, and resolves f's pages, chains and
 * cached prefix into op (mu held); 0 or a PIE_E error, with nothing wired
 * but chain references and deps on parents (submit_unwind drops those). */
static int submit_resolve(pie_ctl_client *c, const pie_ctl_forward *f,
                          ctl_op *op)
{
    pie_ctl *ctl = c->ctl;
    int rc;
    if (c->max_tokens > 0 && c->tokens_used + f->n_tokens > c->max_tokens)
        return pie_err_set(PIE_ELIMIT, "control: client '%s' token quota "
                           "exceeded: used %lld, asks %d, limit %lld", c->name,
                           (long long)c->tokens_used, f->n_tokens,
                           (long long)c->max_tokens);
    if ((rc = RESUME_NOW(c)) < 0) return rc;
    pie__client_not_waiting(c);
    if ((rc = resolve_pages(c, f, op)) < 0) return rc;
    if ((rc = check_filled(ctl, f, op)) < 0) return rc;
    if ((rc = check_distinct(f, op, ctl->ps)) < 0) return rc;
    if ((rc = resolve_chains(c, f, op)) < 0) return rc;
    return resolve_prefix(c, f, op);
}

/* Drops what submit_resolve wired of a refused op: its chain references
 * and its entries in its parents' deps (mu held). */
static void submit_unwind(ctl_op *op)
{
    for (int32_t i = 0; i < op->n_chains; i++) {
        ctl_op *p = op->chains[i].from;
        if (!p) continue;                /* taken from a done forward */
        for (int32_t d = p->n_deps - 1; d >= 0; d--)
            if (p->deps[d].op == op) {
                p->deps[d] = p->deps[--p->n_deps];
                atomic_fetch_sub(&op->refs, 1);
                break;
            }
        pie__op_unref(p);
    }
}

int pie_ctl_forward_submit(pie_ctl_client *c, const pie_ctl_forward *f,
                           pie_ctl_done_fn done, void *user,
                           pie_ctl_future **out)
{
    pie_ctl *ctl = c->ctl;
    if (!f || !out)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_EINVAL, "control: NULL "
                                               "argument"));
    int rc = check_forward(ctl, f);
    if (rc < 0) return CLIENT_CALL_FAIL(c, rc);
    ctl_op *op = op_build(ctl, f);
    if (!op)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_ENOMEM, "control: out of "
                                               "memory"));
    op->done = done;
    op->user = user;
    atomic_store(&op->refs, 2);          /* submitter + control layer */
    op->state = OP_WAITING;
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    if ((rc = submit_resolve(c, f, op)) < 0) goto fail;
    op->n_pages = f->n_pages;
    c->tokens_used += op->n_tokens;
    rc = wire_pages(ctl, op);
    op_enqueue(c, op);
    if (rc < 0) {                        /* wired halfway: cancel it */
        op->done = NULL;   /* a failed submit never calls back: the caller
                            * completes its own future on the error */
        pie__op_complete(ctl, op, PIE_ENOMEM);
        pie__unlock(ctl);
        pie__op_unref(op);
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    }
    *out = (pie_ctl_future *)op;
    pie__unlock(ctl);
    return 0;
fail:
    /* nothing was wired except chain references and deps on parents */
    submit_unwind(op);
    pthread_mutex_unlock(&ctl->mu);
    atomic_store(&op->refs, 1);
    pie__op_unref(op);
    return rc;
}

/* ---- page copy ------------------------------------------------------------ */

int pie_ctl_page_copy(pie_ctl_client *c, uint32_t src, int32_t src_off,
                      uint32_t dst, int32_t dst_off, int32_t n)
{
    return pie_ctl_page_copy_cb(c, src, src_off, dst, dst_off, n, NULL, NULL);
}

uint64_t pie_ctl_copy_bytes(void)
{
    /* the op, its one write, and an entry in each of the two ops it may
     * wait on (source's and destination's writer), their arrays doubling */
    return sizeof(ctl_op) + sizeof(ctl_write) + 2 * 2 * sizeof(ctl_dep);
}

/* Allocates a copy op with its one write (dst's fill), referenced by the
 * control layer only; NULL on out of memory, with nothing left allocated. */
static ctl_op *copy_op_new(pie_ctl *ctl)
{
    ctl_op *op = calloc(1, sizeof *op);
    ctl_write *wr = malloc(sizeof *wr);   /* its one write: dst's fill */
    if (!op || !wr) {
        free(op), free(wr);
        return NULL;
    }
    op->writes = wr;
    pthread_cond_init(&op->cv, NULL);
    op->kind = OP_COPY;
    op->ctl = ctl;
    atomic_store(&op->refs, 1);          /* control layer only */
    op->state = OP_WAITING;
    return op;
}

/* Resumes c and looks up a copy's source and destination handles into *hs
 * and *hd (mu held); 0, or a PIE_E error where c cannot resume, a handle
 * is unknown, the destination is read-only or both are one page. */
static int copy_resolve(pie_ctl_client *c, uint32_t src, uint32_t dst,
                        ctl_handle **hs, ctl_handle **hd)
{
    pie_ctl *ctl = c->ctl;
    int rc = RESUME_NOW(c);
    if (rc < 0) return rc;
    *hs = pie__handle_get(c, src);
    *hd = pie__handle_get(c, dst);
    if (!*hs || !*hd) return PIE_EINVAL;
    if ((*hd)->ro || PAGE_IS_SHARED(&ctl->pages[(*hd)->page]))
        return pie_err_set(PIE_EPERM, "control: copy destination %u is "
                           "read-only", dst);
    if ((*hs)->page == (*hd)->page)
        return pie_err_set(PIE_EINVAL, "control: copy within one page");
    return 0;
}

/* The destination's fill after n slots from src_off of a page filled to
 * src_fill are copied to dst_off of one filled to old. dst's fill covers
 * written slots only: v of the n come from written source slots; the rest
 * carry whatever src held, and a copy past dst's fill leaves a gap below
 * it, so neither raises the fill. */
static int32_t copy_fill(int32_t src_fill, int32_t src_off, int32_t old,
                         int32_t dst_off, int32_t n)
{
    int32_t v = src_fill - src_off, nf;
    v = v < 0 ? 0 : v > n ? n : v;
    if (dst_off > old) nf = old;
    else if (v < n) nf = dst_off + v;
    else nf = old > dst_off + n ? old : dst_off + n;
    return nf;
}

/* Orders copy op (its cp_* fields set) after the pending writers of its
 * pages, makes it its destination's writer and records its write (mu
 * held); 0, or PIE_ENOMEM where a dependency could not be added: op is
 * wired all the same, for the caller to complete. */
static int copy_wire(pie_ctl *ctl, ctl_op *op)
{
    int rc = 0;
    ctl_page *ps_ = &ctl->pages[op->cp_src], *pd = &ctl->pages[op->cp_dst];
    pie__page_ref(ctl, op->cp_src);
    pie__page_ref(ctl, op->cp_dst);
    if ((ps_->last_writer && add_dep(ps_->last_writer, op, false) < 0) ||
        (pd->last_writer && add_dep(pd->last_writer, op, false) < 0))
        rc = PIE_ENOMEM;
    ctl_op *prev = pd->last_writer;      /* restored if op ends first */
    if (prev) atomic_fetch_add(&prev->refs, 1);
    pd->last_writer = op;
    int32_t old = pd->fill;
    int32_t nf = copy_fill(ps_->fill, op->cp_src_off, old, op->cp_dst_off,
                           op->cp_n);
    op->writes[op->n_writes++] = (ctl_write){
        .page = op->cp_dst, .old_fill = old, .new_fill = nf, .prev = prev };
    pd->fill = op->writes[0].new_fill;
    pie__pool_copy_record(ctl, op->cp_src, op->cp_src_off, op->cp_dst,
                          op->cp_dst_off, op->cp_n);
    return rc;
}

int pie_ctl_page_copy_cb(pie_ctl_client *c, uint32_t src, int32_t src_off,
                         uint32_t dst, int32_t dst_off, int32_t n,
                         pie_ctl_done_fn done, void *user)
{
    pie_ctl *ctl = c->ctl;
    int32_t ps = ctl->ps;
    /* off > ps - n, not off + n > ps: the sum wraps for offsets near
     * INT32_MAX (which the runtime passes through unchecked) */
    if (n < 1 || src_off < 0 || dst_off < 0 || src_off > ps - n ||
        dst_off > ps - n)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_ERANGE, "control: copy of "
                                               "%d slots from %d to %d does "
                                               "not fit pages of %d", n,
                                               src_off, dst_off, ps));
    ctl_op *op = copy_op_new(ctl);
    if (!op)
        return CLIENT_CALL_FAIL(c, pie_err_set(PIE_ENOMEM, "control: out of "
                                               "memory"));
    pthread_mutex_lock(&ctl->mu);
    CLIENT_CALL(c);
    ctl_handle *hs = NULL, *hd = NULL;
    int rc = copy_resolve(c, src, dst, &hs, &hd);
    if (rc < 0) {
        pthread_mutex_unlock(&ctl->mu);
        pthread_cond_destroy(&op->cv);
        free(op->writes);
        free(op);
        return rc;
    }
    pie__client_not_waiting(c);
    op->cp_src = hs->page, op->cp_src_off = src_off;
    op->cp_dst = hd->page, op->cp_dst_off = dst_off, op->cp_n = n;
    rc = copy_wire(ctl, op);
    op->done = rc < 0 ? NULL : done;    /* a refused copy never calls back */
    op->user = user;
    op_enqueue(c, op);
    if (rc < 0) pie__op_complete(ctl, op, PIE_ENOMEM);
    pie__unlock(ctl);
    return rc < 0 ? pie_err_set(rc, "control: out of memory") : 0;
}

/* ---- futures -------------------------------------------------------------- */

uint64_t pie_ctl_output_bytes(pie_ctl *ctl, int32_t n_outputs,
                              const pie_sampler *samplers)
{
    /* as op_build allocates: tokens and value_indptr, values and ids */
    uint64_t no = n_outputs > 0 ? (uint64_t)n_outputs : 0, vals = 0;
    for (uint64_t o = 0; o < no && samplers; o++) {
        int32_t v = pie_sampler_values(&samplers[o], ctl->vocab);
        if (samplers[o].kind == PIE_PROBE_TOPK && v > ctl->vocab)
            v = ctl->vocab;                  /* refused at submit anyway */
        vals += v > 0 ? (uint64_t)v : 0;
    }
    return no * sizeof(int32_t) + (no + 1) * sizeof(uint32_t) +
           vals * (sizeof(float) + sizeof(int32_t));
}

uint64_t pie_ctl_forward_bytes(pie_ctl *ctl, const pie_ctl_forward *f)
{
    /* as op_build allocates (the minimum of one element it gives an empty
     * array included), plus the entries this op adds to its parents' deps
     * (one per chain and page at most, their arrays doubling) */
#define NN(x) ((x) > 0 ? (uint64_t)(x) : 0)
    uint64_t n = NN(f->n_tokens), np = NN(f->n_pages), no = NN(f->n_outputs);
    uint64_t nc = NN(f->n_chains), ids = 0;
    uint64_t b = sizeof(ctl_op) + 2 * n * sizeof(int32_t) +
                 np * (sizeof(int32_t) + sizeof(ctl_write)) +
                 (nc ? nc : 1) * sizeof(ctl_chain) +
                 2 * (nc + np) * sizeof(ctl_dep) +
                 no * (sizeof(int32_t) + sizeof(pie_sampler)) +
                 3 * sizeof(uint32_t);   /* empty out.tokens/values/ids */
    if (f->mask_indptr)
        b += (n + 1 + f->mask_indptr[n]) * sizeof(uint32_t);
    if (f->logit_mask_indptr)
        b += (no + 1 + f->logit_mask_indptr[no]) * sizeof(uint32_t);
    for (uint64_t o = 0; o < no && f->samplers; o++)
        if (f->samplers[o].kind == PIE_PROBE_LOGPROBS)
            ids += NN(f->samplers[o].n_ids);
#undef NN
    return b + ids * sizeof(int32_t) +
           pie_ctl_output_bytes(ctl, f->n_outputs, f->samplers);
}

int pie_ctl_future_poll(pie_ctl_future *f)
{
    ctl_op *op = (ctl_op *)f;
    if (atomic_load(&op->state) != OP_DONE) return PIE_EAGAIN;
    return op->status;
}

int pie_ctl_future_wait(pie_ctl_future *f, int32_t timeout_ms)
{
    ctl_op *op = (ctl_op *)f;
    pie_ctl *ctl = op->ctl;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&ctl->mu);
    op->n_waiters++;
    while (atomic_load(&op->state) != OP_DONE) {
        if (timeout_ms < 0) pthread_cond_wait(&op->cv, &ctl->mu);
        else if (pthread_cond_timedwait(&op->cv, &ctl->mu, &ts) != 0)
            break;
    }
    op->n_waiters--;
    int rc = atomic_load(&op->state) == OP_DONE ? op->status : PIE_EAGAIN;
    if (rc == PIE_EDEVLOST) pie__lost_err(ctl);
    pthread_mutex_unlock(&ctl->mu);
    if (rc == PIE_EAGAIN)
        pie_err_set(PIE_EAGAIN, "control: forward not done after %d ms",
                    timeout_ms);
    return rc;
}

void pie_ctl_future_cancel(pie_ctl_future *f)
{
    ctl_op *op = (ctl_op *)f;
    pie_ctl *ctl = op->ctl;
    pthread_mutex_lock(&ctl->mu);
    if (op->state == OP_STAGED) pie__unstage_all(ctl);
    if (op->state == OP_RUNNING) op->cancel_req = true;
    else if (op->state != OP_DONE) pie__op_complete(ctl, op, PIE_ECANCELED);
    pie__unlock(ctl);
}

int pie_ctl_future_result(pie_ctl_future *f, const pie_forward_out **out,
                          int32_t *n_outputs)
{
    ctl_op *op = (ctl_op *)f;
    if (atomic_load(&op->state) != OP_DONE)
        return pie_err_set(PIE_EAGAIN, "control: forward still pending");
    if (op->status == PIE_EDEVLOST)     /* lost_msg was set before DONE */
        return pie__lost_err(op->ctl);
    if (op->status != 0)
        return pie_err_set(op->status, "control: forward %s",
                           op->status == PIE_ECANCELED ? "was cancelled"
                                                       : "failed");
    if (out) *out = &op->out;
    if (n_outputs) *n_outputs = op->n_outputs;
    return 0;
}

void pie_ctl_future_retain(pie_ctl_future *f)
{
    atomic_fetch_add(&((ctl_op *)f)->refs, 1);
}

void pie_ctl_future_release(pie_ctl_future *f)
{
    if (f) pie__op_unref((ctl_op *)f);
}

/* ---- counters ------------------------------------------------------------- */

void pie_ctl_get_stats(pie_ctl *ctl, pie_ctl_stats *s)
{
    pthread_mutex_lock(&ctl->mu);
    *s = ctl->st;
    s->clients = ctl->n_clients;
    pie__pool_stats(ctl, s);
    pthread_mutex_unlock(&ctl->mu);
}
