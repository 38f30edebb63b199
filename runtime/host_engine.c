/*
 * host_engine.c — the engine host functions (groups `model`, `kv` and
 * `forward` of runtime/api.def) on top of the control layer (control.h),
 * and the served-model registry of host_engine.h.
 *
 * Per instance (the runtime's engine ctx, made in on_instance_start):
 *
 *   einst.models[]    open model handles (handle = index + 1) -> served
 *                     model index
 *   einst.clients[m]  the instance's control-layer client for served model
 *                     m, opened on first use; closed when the instance ends
 *                     (pending forwards cancelled, every page returned)
 *   einst.b[]         forward builders (handle = index + 1): host copies of
 *                     what forward_* calls set, consumed by forward_submit
 *   einst.b_bytes     bytes the builders hold (each builder's b->bytes),
 *                     at most builder_budget(): a guest may pass one small
 *                     buffer again and again, so the copies are what must
 *                     be bounded (forward_* fails with PIE_ELIMIT beyond)
 *   einst.acct        bytes the instance's submitted forwards keep in the
 *                     control layer, inputs and results, and its queued
 *                     page copies (out_acct), at most output_budget()
 *
 * KV page handles are the control layer's client handles as int32. A
 * forward future is a runtime future of kind PIE_RT_FUT_ENGINE whose data
 * is an efut: the control-layer future plus the runtime future it
 * completes. The control layer's completion callback (scheduler thread)
 * completes the runtime future, which wakes the parked fiber; the runtime's
 * cancel hook cancels the control-layer future; its destroy hook drops the
 * runtime future's reference to the efut.
 *
 * Forward results and inputs. The control layer copies a forward's
 * inputs (tokens, positions, pages, masks, output rows, LOGPROBS ids,
 * logit masks, chains) and allocates its results (a token per output row,
 * probe values and ids) at submit; it frees the inputs when the forward
 * completes and keeps the results until the future's last reference goes
 * (pie_ctl_forward_bytes counts both), so a guest that submits and never
 * frees its futures would make the host hold memory without bound.
 * forward_submit charges those bytes, inputs included (an upper bound
 * once the forward completed), to the instance's out_acct (PIE_ELIMIT,
 * submitting nothing, past output_budget()) and the efut gives them back
 * when its last reference goes: the runtime future's (future_free, or the
 * instance's end; for a forward freed while it runs, once it stops) and
 * one for each builder that chains a token from it (forward_token_from),
 * as the builder keeps the results alive. Nothing of it stays after that
 * but the op itself while a pending forward's dependents list it (a
 * forward cancelled behind it): a chain from a completed forward takes
 * its token at submit. A queued page copy (kv_copy) is an op too, which
 * the control layer keeps until it runs: copies chained on one
 * destination run one per batch, so a guest could queue them faster than
 * they run. kv_copy charges pie_ctl_copy_bytes to the same out_acct
 * (PIE_ELIMIT, queuing nothing, past output_budget()) and the copy's
 * completion callback (copy_done: it ran, failed or was cancelled, also
 * as the instance ends) gives it back. out_acct is reference counted by
 * the instance, each charged efut and each queued copy, as an efut or a
 * copy may go on the scheduler thread after the instance ended; only the
 * instance's fiber adds to it, so its check and charge need no lock.
 *
 * No host call blocks its worker thread on the KV pool: kv_alloc polls the
 * control layer with timeout 0 and parks the fiber between polls, and so
 * do copy, export and forward submit for a client whose pages the
 * `suspend` policy swapped out (resume_client).
 *
 * Guest pointers are checked (pie_rt_guest_ptr / copy_in / copy_out trap on
 * a bad range) before anything is allocated or locked.
 */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"
#include "runtime/host_engine.h"
#include "runtime/rt_internal.h"
#include "pie_api_host.h"

typedef struct Z_pie_instance_t I;

#define MAX_MODEL_HANDLES 64
#define MAX_BUILDERS      4096
#define MAX_TOKENS        (1 << 20)
#define MAX_ROWS          (1 << 16)
#define MAX_PAGES_CALL    (1 << 16)
#define BUILDER_BUDGET    (256ull << 20)   /* builder bytes per instance    */
#define OUTPUT_BUDGET     (256ull << 20)   /* default bytes submitted
                                              forwards keep per instance
                                              (max_output_bytes)          */

typedef struct served {
    char       name[128];
    pie_model *m;
    pie_ctl   *ctl;
} served;

struct pie_engine {
    served          models[PIE_ENGINE_MAX_MODELS];
    int32_t         n_models;
    pie_engine_opts o;
};

typedef struct row_mask {
    uint32_t *runs;
    uint32_t  n;
} row_mask;

typedef struct efut efut;

typedef struct builder {
    int32_t        model;             /* served model index                */
    int32_t        n_tok, cap_tok;
    int32_t       *tokens, *positions;
    pie_ctl_chain *chains;            /* .from: srcs[k]'s future           */
    efut         **srcs;              /* (cap_chains) each holds a ref     */
    int32_t        n_chains, cap_chains;
    uint32_t      *pages;
    int32_t        n_pages, last_len;
    uint32_t      *mask_indptr, *mask_runs;
    int32_t        mask_tokens;       /* n_tok when the mask was set       */
    uint64_t       mask_bytes;        /* of mask_indptr and mask_runs      */
    int32_t        n_rows, cap_rows;
    int32_t       *out_idx;
    pie_sampler   *samplers;
    int32_t      **ids;               /* (n_rows) LOGPROBS ids or NULL     */
    row_mask      *lmask;             /* (n_rows)                          */
    uint64_t       bytes;             /* charged to einst.b_bytes          */
} builder;

/* Bytes charged to one instance: its einst, each efut charged and each
 * queued copy hold a reference (either may outlive the instance). */
typedef struct out_acct {
    _Atomic uint64_t bytes;           /* what its live efuts and queued
                                         copies keep                       */
    atomic_int       refs;
} out_acct;

typedef struct einst {
    pie_engine     *e;
    out_acct       *acct;             /* shared with its efuts             */
    int32_t         models[MAX_MODEL_HANDLES];   /* -1: free               */
    pie_ctl_client *clients[PIE_ENGINE_MAX_MODELS];
    builder       **b;
    int32_t         n_b;
    uint64_t        b_bytes;          /* sum of the builders' bytes         */
    uint32_t       *alloc_buf;        /* kv_alloc's page handles: owned     */
    uint32_t        alloc_cap;        /* here, as kv_alloc may never return */
} einst;

struct efut {
    pthread_mutex_t  mu;
    pie_ctl_future  *cf;
    pie_rt_future   *rf;              /* unused once the runtime's ref went */
    bool             cancelled;
    atomic_int       refs;            /* the runtime future + each builder
                                         chaining from it                  */
    out_acct        *acct;            /* charged out_bytes (NULL: none)    */
    uint64_t         out_bytes;       /* pie_ctl_forward_bytes: its inputs
                                         and results in the control layer */
};

#define RET(x) return (uint32_t)(int32_t)(x)

/* ---- registry ----------------------------------------------------------- */

int pie_engine_create(const pie_engine_opts *o, pie_engine **out)
{
    pie_engine *e = calloc(1, sizeof *e);
    if (!e) return pie_err_set(PIE_ENOMEM, "engine: out of memory");
    if (o) e->o = *o;
    if (e->o.alloc_timeout_ms == 0) e->o.alloc_timeout_ms = 5000;
    if (e->o.max_output_bytes == 0) e->o.max_output_bytes = OUTPUT_BUDGET;
    *out = e;
    return 0;
}

int pie_engine_add_model(pie_engine *e, const char *name, pie_model *m,
                         pie_ctl *ctl)
{
    if (!name || !m || !ctl || strlen(name) >= sizeof e->models[0].name)
        return pie_err_set(PIE_EINVAL, "engine: bad model registration");
    if (e->n_models == PIE_ENGINE_MAX_MODELS)
        return pie_err_set(PIE_ELIMIT, "engine: at most %d models",
                           PIE_ENGINE_MAX_MODELS);
    served *s = &e->models[e->n_models++];
    snprintf(s->name, sizeof s->name, "%s", name);
    s->m = m;
    s->ctl = ctl;
    return 0;
}

void pie_engine_free(pie_engine *e) { free(e); }

/* ---- instance state ------------------------------------------------------- */

static void acct_unref(out_acct *a)
{
    if (a && atomic_fetch_sub(&a->refs, 1) == 1) free(a);
}

/* Drops a reference to ef; the last one releases the control-layer
 * future and gives its result bytes back (any thread). */
static void efut_unref(efut *ef)
{
    if (atomic_fetch_sub(&ef->refs, 1) != 1) return;
    if (ef->cf) pie_ctl_future_release(ef->cf);
    if (ef->acct) {
        atomic_fetch_sub(&ef->acct->bytes, ef->out_bytes);
        acct_unref(ef->acct);
    }
    pthread_mutex_destroy(&ef->mu);
    free(ef);
}

static void builder_free(builder *b)
{
    if (!b) return;
    for (int32_t k = 0; k < b->n_chains; k++) efut_unref(b->srcs[k]);
    for (int32_t r = 0; r < b->n_rows; r++) {
        free(b->ids[r]);
        free(b->lmask[r].runs);
    }
    free(b->tokens); free(b->positions); free(b->chains); free(b->srcs);
    free(b->pages);
    free(b->mask_indptr); free(b->mask_runs); free(b->out_idx);
    free(b->samplers); free(b->ids); free(b->lmask);
    free(b);
}

/* Frees a builder and gives its bytes back to the instance's budget. */
static void builder_drop(einst *x, builder *b)
{
    if (!b) return;
    x->b_bytes -= b->bytes;
    builder_free(b);
}

static int on_start(void *user, pie_rt_instance *i)
{
    einst *x = calloc(1, sizeof *x);
    out_acct *a = calloc(1, sizeof *a);
    if (!x || !a) {
        free(x), free(a);
        return pie_err_set(PIE_ENOMEM, "engine: out of memory");
    }
    atomic_init(&a->bytes, 0);
    atomic_init(&a->refs, 1);
    x->acct = a;
    x->e = user;
    for (int k = 0; k < MAX_MODEL_HANDLES; k++) x->models[k] = -1;
    pie_rt_set_engine_ctx(i, x);
    return 0;
}

static void on_end(void *user, pie_rt_instance *i)
{
    einst *x = pie_rt_engine_ctx(i);
    if (!x) return;
    for (int32_t k = 0; k < x->n_b; k++) builder_free(x->b[k]);
    free(x->b);
    free(x->alloc_buf);
    for (int k = 0; k < PIE_ENGINE_MAX_MODELS; k++)
        pie_ctl_client_close(x->clients[k]);
    acct_unref(x->acct);
    pie_rt_set_engine_ctx(i, NULL);
    free(x);
}

pie_rt_hooks pie_engine_hooks(pie_engine *e)
{
    return (pie_rt_hooks){ .user = e, .on_instance_start = on_start,
                           .on_instance_end = on_end };
}

static einst *X(I *i)
{
    einst *x = pie_rt_engine_ctx(i);
    if (!x) pie_rt_trap(i, "engine host call without an engine");
    return x;
}

/* Served model of a handle, or NULL. */
static served *model_of(I *i, uint32_t h)
{
    einst *x = X(i);
    if (h == 0 || h > MAX_MODEL_HANDLES || x->models[h - 1] < 0) return NULL;
    return &x->e->models[x->models[h - 1]];
}

/* FCFS policy: the control layer asks this instance to end. */
static void engine_evict(void *user, pie_ctl_client *c)
{
    (void)c;
    pie_rt_kill(user, "KV page pool full: evicted by the fcfs policy");
}

/* The instance's client for served model k (opened on first use). */
static int client_at(I *i, int32_t k, pie_ctl_client **out)
{
    einst *x = X(i);
    served *s = &x->e->models[k];
    if (!x->clients[k]) {
        pie_ctl_client_opts o = x->e->o.client;
        char name[48];
        snprintf(name, sizeof name, "instance %u", pie_rt_instance_id(i));
        o.name = name;
        o.on_evict = engine_evict;
        o.evict_user = i;
        int rc = pie_ctl_client_open(s->ctl, &o, &x->clients[k]);
        if (rc < 0) return rc;
    }
    *out = x->clients[k];
    return 0;
}

/* The instance's client for model handle h. */
static int client_of(I *i, uint32_t h, pie_ctl_client **out)
{
    served *s = model_of(i, h);
    if (!s) return PIE_EINVAL;
    return client_at(i, (int32_t)(s - X(i)->e->models), out);
}

/* Copies a guest string of len bytes into a NUL-terminated heap string
 * (NULL on an embedded NUL or no memory: *rc says which). */
static char *guest_str(I *i, uint32_t p, uint32_t len, int *rc)
{
    const char *g = pie_rt_guest_ptr(i, p, len);
    if (len > 4096 || memchr(g, 0, len)) {
        *rc = PIE_EINVAL;
        return NULL;
    }
    char *s = malloc((size_t)len + 1);
    if (!s) { *rc = PIE_ENOMEM; return NULL; }
    memcpy(s, g, len);
    s[len] = 0;
    return s;
}

static uint32_t give(I *i, uint32_t buf, uint32_t cap, const void *src,
                     size_t len)
{
    pie_rt_copy_out(i, buf, src, len < cap ? len : cap);
    return (uint32_t)(len > INT32_MAX ? INT32_MAX : len);
}

/* ---- model group ---------------------------------------------------------- */

uint32_t Z_pieZ_model_open(I *i, uint32_t name, uint32_t len)
{
    einst *x = X(i);
    const char *g = pie_rt_guest_ptr(i, name, len);
    int32_t m = -1;
    if (len == 0 && x->e->n_models > 0) m = 0;
    for (int32_t k = 0; k < x->e->n_models && m < 0; k++)
        if (strlen(x->e->models[k].name) == len &&
            memcmp(x->e->models[k].name, g, len) == 0)
            m = k;
    if (m < 0) RET(PIE_ENOTFOUND);
    for (int h = 0; h < MAX_MODEL_HANDLES; h++)
        if (x->models[h] < 0) {
            x->models[h] = m;
            RET(h + 1);
        }
    RET(PIE_ELIMIT);
}

uint32_t Z_pieZ_model_close(I *i, uint32_t h)
{
    if (!model_of(i, h)) RET(PIE_EINVAL);
    X(i)->models[h - 1] = -1;
    return 0;
}

uint32_t Z_pieZ_model_name(I *i, uint32_t h, uint32_t buf, uint32_t cap)
{
    pie_rt_guest_ptr(i, buf, cap);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    return give(i, buf, cap, s->name, strlen(s->name));
}

uint32_t Z_pieZ_model_vocab_size(I *i, uint32_t h)
{
    served *s = model_of(i, h);
    RET(s ? s->m->cfg.vocab_size : PIE_EINVAL);
}

uint32_t Z_pieZ_model_page_size(I *i, uint32_t h)
{
    served *s = model_of(i, h);
    RET(s ? pie_ctl_page_size(s->ctl) : PIE_EINVAL);
}

uint32_t Z_pieZ_model_bos_id(I *i, uint32_t h)
{
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    int32_t bos = s->m->cfg.bos_id;
    if (bos < 0 && s->m->tok) bos = pie_tokenizer_bos_id(s->m->tok);
    RET(bos);
}

uint32_t Z_pieZ_model_eos_ids(I *i, uint32_t h, uint32_t ids, uint32_t cap)
{
    pie_rt_guest_ptr(i, ids, (uint64_t)cap * 4);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    int32_t n = s->m->cfg.n_eos;
    pie_rt_copy_out(i, ids, s->m->cfg.eos_ids,
                    (uint64_t)((uint32_t)n < cap ? (uint32_t)n : cap) * 4);
    RET(n);
}

uint32_t Z_pieZ_model_token_id(I *i, uint32_t h, uint32_t tok, uint32_t len)
{
    int rc = 0;
    char *t = guest_str(i, tok, len, &rc);
    served *s = model_of(i, h);
    if (!t || !s || !s->m->tok) {
        free(t);
        RET(!s ? PIE_EINVAL : !t ? rc : PIE_EUNSUPPORTED);
    }
    int32_t id = pie_tokenizer_token_id(s->m->tok, t);
    free(t);
    RET(id >= 0 ? id : PIE_ENOTFOUND);
}

uint32_t Z_pieZ_model_is_special(I *i, uint32_t h, uint32_t id)
{
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    if ((int32_t)id < 0 || (int32_t)id >= s->m->cfg.vocab_size) RET(PIE_ERANGE);
    if (!s->m->tok) return 0;
    return pie_tokenizer_is_special(s->m->tok, (int32_t)id) ? 1 : 0;
}

uint32_t Z_pieZ_tokenize(I *i, uint32_t h, uint32_t text, uint32_t len,
                         uint32_t add_special, uint32_t ids, uint32_t cap)
{
    const char *g = pie_rt_guest_ptr(i, text, len);
    pie_rt_guest_ptr(i, ids, (uint64_t)cap * 4);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    if (!s->m->tok) RET(PIE_EUNSUPPORTED);
    /* the guest memory is not ours to hold; size_t: len may be 0xFFFFFFFF */
    char *copy = malloc((size_t)len + 1);
    if (!copy) RET(PIE_ENOMEM);
    memcpy(copy, g, len);
    int32_t *out = NULL;
    size_t n = 0;
    int rc = pie_tokenizer_encode(s->m->tok, copy, len, add_special != 0, &out,
                                  &n);
    free(copy);
    if (rc < 0) RET(rc);
    pie_rt_copy_out(i, ids, out, (uint64_t)(n < cap ? n : cap) * 4);
    free(out);
    RET(n > INT32_MAX ? INT32_MAX : (int32_t)n);
}

uint32_t Z_pieZ_detokenize(I *i, uint32_t h, uint32_t ids, uint32_t n,
                           uint32_t skip_special, uint32_t buf, uint32_t cap)
{
    if (n > MAX_TOKENS) RET(PIE_ERANGE);
    pie_rt_guest_ptr(i, ids, (uint64_t)n * 4);
    pie_rt_guest_ptr(i, buf, cap);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    if (!s->m->tok) RET(PIE_EUNSUPPORTED);
    int32_t *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) RET(PIE_ENOMEM);
    pie_rt_copy_in(i, v, ids, (uint64_t)n * 4);
    char *text = NULL;
    size_t tl = 0;
    int rc = pie_tokenizer_decode(s->m->tok, v, n, skip_special != 0, &text,
                                  &tl);
    free(v);
    if (rc < 0) RET(rc);
    uint32_t r = give(i, buf, cap, text, tl);
    free(text);
    return r;
}

/* ---- kv group --------------------------------------------------------------- */

/* Parks this fiber for about ms milliseconds (a runtime sleep future). */
/* Parks the fiber for about ms (a kill or CPU limit lands there); false
 * where it cannot (no handle left for the sleep), so that a polling loop
 * stops instead of spinning without parking. */
static bool park_ms(I *i, int ms)
{
    int32_t h = (int32_t)Z_pieZ_sleep(i, (uint64_t)ms * 1000000ull);
    if (h < 0) return false;
    pie_rt_future_wait(i, h);
    pie__rt_future_free(i, h);
    return true;
}

/* The end of an alloc_timeout_ms wait starting now (CLOCK_MONOTONIC ns);
 * now or earlier where the timeout is not positive: no wait. */
static uint64_t wait_end(I *i)
{
    int32_t ms = X(i)->e->o.alloc_timeout_ms;
    return pie__rt_now_ns() + (ms > 0 ? (uint64_t)ms * 1000000ull : 0);
}

/* Brings the pages of a client that the `suspend` policy swapped out back
 * to the pool, parking between polls like kv_alloc (the control layer
 * never blocks a worker: copy, export and forward submit answer PIE_EAGAIN
 * while there is no room). 0 when they are back; the client is then not
 * swapped out again before its next call. Nothing may be allocated while
 * this parks: the instance may be killed meanwhile. */
static int resume_client(I *i, pie_ctl_client *c)
{
    uint64_t end = wait_end(i);
    int rc;
    while ((rc = pie_ctl_client_resume(c, 0)) == PIE_EBUSY &&
           pie__rt_now_ns() < end && park_ms(i, 2)) {
    }
    /* (PIE_EAGAIN, not EBUSY: kv_export's EBUSY means the name exists) */
    if (rc == PIE_EBUSY)
        rc = pie_err_set(PIE_EAGAIN, "the instance's KV pages are swapped "
                         "out and the pool had no room for them within %d ms",
                         X(i)->e->o.alloc_timeout_ms);
    return rc;
}

uint32_t Z_pieZ_kv_alloc(I *i, uint32_t h, uint32_t n, uint32_t pages)
{
    if (n > MAX_PAGES_CALL) RET(PIE_ERANGE);
    pie_rt_guest_ptr(i, pages, (uint64_t)n * 4);
    pie_ctl_client *c;
    int rc = client_of(i, h, &c);
    if (rc < 0) RET(rc);
    if (n == 0) return 0;
    /* The handles go to a buffer the instance owns: the instance may be
     * killed while it waits below, and then this call never returns. */
    einst *x = X(i);
    if (n > x->alloc_cap) {
        uint32_t *b = realloc(x->alloc_buf, n * sizeof *b);
        if (!b) RET(PIE_ENOMEM);
        x->alloc_buf = b;
        x->alloc_cap = n;
    }
    /* admission: wait for the pool without blocking the worker thread */
    uint64_t end = wait_end(i);
    served *s = model_of(i, h);
    while ((rc = pie_ctl_page_alloc(c, (int32_t)n, 0, x->alloc_buf)) ==
               PIE_EBUSY &&
           (int32_t)n <= pie_ctl_n_pages(s->ctl) && pie__rt_now_ns() < end &&
           park_ms(i, 2)) {
    }
    if (rc == 0) pie_rt_copy_out(i, pages, x->alloc_buf, (uint64_t)n * 4);
    RET(rc);
}

/* Reads n page handles from guest memory (malloc'ed). */
static uint32_t *read_handles(I *i, uint32_t p, uint32_t n, int *rc)
{
    if (n > MAX_PAGES_CALL) { *rc = PIE_ERANGE; return NULL; }
    pie_rt_guest_ptr(i, p, (uint64_t)n * 4);
    uint32_t *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) { *rc = PIE_ENOMEM; return NULL; }
    pie_rt_copy_in(i, v, p, (uint64_t)n * 4);
    return v;
}

uint32_t Z_pieZ_kv_free(I *i, uint32_t h, uint32_t pages, uint32_t n)
{
    int rc = 0;
    uint32_t *v = read_handles(i, pages, n, &rc);
    pie_ctl_client *c;
    if (v && (rc = client_of(i, h, &c)) == 0)
        rc = pie_ctl_page_free(c, (int32_t)n, v);
    free(v);
    RET(rc);
}

static uint64_t output_budget(I *i);

/* A queued copy completed (any thread): its bytes go back to the
 * instance that queued it (user, its out_acct). */
static void copy_done(void *user, pie_ctl_future *f, int status)
{
    out_acct *a = user;
    (void)f, (void)status;
    atomic_fetch_sub(&a->bytes, pie_ctl_copy_bytes());
    acct_unref(a);
}

/* One try at queuing a copy for c, charged to the instance's out_acct
 * until it completes (copy_done); PIE_ELIMIT, queuing nothing, where
 * that would pass output_budget(). */
static int copy_once(I *i, pie_ctl_client *c, uint32_t src, int32_t src_off,
                     uint32_t dst, int32_t dst_off, int32_t n)
{
    out_acct *a = X(i)->acct;
    uint64_t need = pie_ctl_copy_bytes(), max = output_budget(i);
    uint64_t held = atomic_load(&a->bytes);
    if (need > max || held > max - need)
        return pie_err_set(PIE_ELIMIT, "kv_copy: a queued copy (%llu bytes "
                           "until it runs) would take what the instance's "
                           "forwards and copies keep past %llu bytes (limit "
                           "%llu per instance): wait for the forwards it "
                           "copies behind, or free futures, first",
                           (unsigned long long)need,
                           (unsigned long long)(held + need),
                           (unsigned long long)max);
    atomic_fetch_add(&a->refs, 1);
    atomic_fetch_add(&a->bytes, need);
    int rc = pie_ctl_page_copy_cb(c, src, src_off, dst, dst_off, n,
                                  copy_done, a);
    if (rc < 0) copy_done(a, NULL, rc);  /* refused: no callback comes */
    return rc;
}

uint32_t Z_pieZ_kv_copy(I *i, uint32_t h, uint32_t src, uint32_t src_off,
                        uint32_t dst, uint32_t dst_off, uint32_t n)
{
    pie_ctl_client *c;
    int rc = client_of(i, h, &c);
    if (rc < 0) RET(rc);
    if (src_off > INT32_MAX || dst_off > INT32_MAX || n > INT32_MAX)
        RET(PIE_ERANGE);
    rc = copy_once(i, c, src, (int32_t)src_off, dst, (int32_t)dst_off,
                   (int32_t)n);
    if (rc == PIE_EAGAIN && (rc = resume_client(i, c)) == 0)  /* swapped */
        rc = copy_once(i, c, src, (int32_t)src_off, dst, (int32_t)dst_off,
                       (int32_t)n);
    RET(rc);
}

static int export_once(I *i, uint32_t h, uint32_t name, uint32_t len,
                       uint32_t pages, uint32_t n, pie_ctl_client **c)
{
    int rc = 0;
    /* the page list's range first: a trap after guest_str leaks its copy */
    if (n <= MAX_PAGES_CALL) pie_rt_guest_ptr(i, pages, (uint64_t)n * 4);
    char *nm = guest_str(i, name, len, &rc);
    uint32_t *v = nm ? read_handles(i, pages, n, &rc) : NULL;
    if (v && (rc = client_of(i, h, c)) == 0)
        rc = pie_ctl_export(*c, nm, (int32_t)n, v);
    free(nm);
    free(v);
    return rc;
}

uint32_t Z_pieZ_kv_export(I *i, uint32_t h, uint32_t name, uint32_t len,
                          uint32_t pages, uint32_t n)
{
    pie_ctl_client *c = NULL;
    int rc = export_once(i, h, name, len, pages, n, &c);
    if (rc == PIE_EAGAIN && (rc = resume_client(i, c)) == 0)  /* swapped */
        rc = export_once(i, h, name, len, pages, n, &c);
    RET(rc);
}

uint32_t Z_pieZ_kv_import(I *i, uint32_t h, uint32_t name, uint32_t len,
                          uint32_t pages, uint32_t cap)
{
    int rc = 0;
    if (cap > MAX_PAGES_CALL) cap = MAX_PAGES_CALL;
    pie_rt_guest_ptr(i, pages, (uint64_t)cap * 4);   /* before the copy */
    char *nm = guest_str(i, name, len, &rc);
    if (!nm) RET(rc);
    pie_ctl_client *c;
    uint32_t *tmp = malloc((cap ? cap : 1) * sizeof *tmp);
    int32_t n = 0;
    if (!tmp) rc = PIE_ENOMEM;
    else if ((rc = client_of(i, h, &c)) == 0)
        rc = pie_ctl_import(c, nm, (int32_t)cap, cap ? tmp : NULL, &n);
    if (rc == 0) pie_rt_copy_out(i, pages, tmp, (uint64_t)n * 4);
    free(nm);
    free(tmp);
    RET(rc == 0 || rc == PIE_ERANGE ? n : rc);
}

uint32_t Z_pieZ_kv_unexport(I *i, uint32_t h, uint32_t name, uint32_t len)
{
    int rc = 0;
    char *nm = guest_str(i, name, len, &rc);
    pie_ctl_client *c;
    if (nm && (rc = client_of(i, h, &c)) == 0) rc = pie_ctl_unexport(c, nm);
    free(nm);
    RET(rc);
}

uint32_t Z_pieZ_kv_list_exports(I *i, uint32_t h, uint32_t buf, uint32_t cap)
{
    pie_rt_guest_ptr(i, buf, cap);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    /* sized, then copied; other instances may export in between (the list
     * grew: PIE_ERANGE, with len set to the new size), so the copy is
     * retried at that size */
    int32_t len = 0, n = 0, rc = PIE_ERANGE;
    char *tmp = NULL;
    pie_ctl_export_list(s->ctl, NULL, 0, &len, &n);
    for (int tries = 0; rc == PIE_ERANGE && tries < 16; tries++) {
        free(tmp);
        if (!(tmp = malloc((size_t)len + 1))) RET(PIE_ENOMEM);
        rc = pie_ctl_export_list(s->ctl, tmp, len, &len, &n);
    }
    uint32_t r = rc == 0 ? give(i, buf, cap, tmp, (size_t)len) : (uint32_t)rc;
    free(tmp);
    return r;
}

/* ---- forward builders --------------------------------------------------- */

/* The most bytes an instance's builders may hold: BUILDER_BUDGET, or the
 * instance's memory limit if that is lower. */
static uint64_t builder_budget(I *i)
{
    uint64_t lim = i->rt->o.memory_limit;
    return lim && lim < BUILDER_BUDGET ? lim : BUILDER_BUDGET;
}

/* Charges a change of `add` bytes less `sub` bytes to b (a copy replacing
 * an older one, a grown array); PIE_ELIMIT, charging nothing, if the
 * instance's builders would then hold more than builder_budget(). */
static int charge(I *i, builder *b, uint64_t add, uint64_t sub)
{
    einst *x = X(i);
    uint64_t now = x->b_bytes - sub + add;
    if (add > sub && now > builder_budget(i))
        return pie_err_set(PIE_ELIMIT, "forward builders would hold %llu "
                           "bytes (limit %llu per instance): submit them "
                           "first", (unsigned long long)now,
                           (unsigned long long)builder_budget(i));
    x->b_bytes = now;
    b->bytes = b->bytes - sub + add;
    return 0;
}

static builder *builder_of(I *i, uint32_t h)
{
    einst *x = X(i);
    if (h == 0 || h > (uint32_t)x->n_b || !x->b[h - 1]) return NULL;
    return x->b[h - 1];
}

uint32_t Z_pieZ_forward_new(I *i, uint32_t h)
{
    einst *x = X(i);
    served *s = model_of(i, h);
    if (!s) RET(PIE_EINVAL);
    int32_t slot = -1;
    for (int32_t k = 0; k < x->n_b && slot < 0; k++)
        if (!x->b[k]) slot = k;
    if (slot < 0) {
        if (x->n_b == MAX_BUILDERS) RET(PIE_ELIMIT);
        builder **nb = realloc(x->b, (x->n_b + 1) * sizeof *nb);
        if (!nb) RET(PIE_ENOMEM);
        x->b = nb;
        slot = x->n_b++;
    }
    builder *b = calloc(1, sizeof *b);
    if (!b) { x->b[slot] = NULL; RET(PIE_ENOMEM); }
    int rc = charge(i, b, sizeof *b, 0);
    if (rc < 0) { free(b); x->b[slot] = NULL; RET(rc); }
    b->model = (int32_t)(s - x->e->models);
    x->b[slot] = b;
    RET(slot + 1);
}

/* Grows two arrays that b keeps side by side (*x of ex-byte and *y of
 * ey-byte elements) from old_cap to cap elements each, the bytes charged
 * to the builder budget; on failure both keep their old size (a realloc
 * that succeeded only moved the array) and the charge is given back. */
static int grow_pair(I *i, builder *b, void **x, size_t ex, void **y,
                     size_t ey, int32_t old_cap, int32_t cap)
{
    uint64_t old = (uint64_t)old_cap * (ex + ey), add = (uint64_t)cap * (ex + ey);
    int rc = charge(i, b, add, old);
    if (rc < 0) return rc;
    void *nx = realloc(*x, (size_t)cap * ex);
    if (nx) *x = nx;
    void *ny = realloc(*y, (size_t)cap * ey);
    if (ny) *y = ny;
    if (!nx || !ny) {
        charge(i, b, old, add);
        return PIE_ENOMEM;
    }
    return 0;
}

static int grow_tokens(I *i, builder *b, uint32_t n)
{
    if ((uint64_t)b->n_tok + n > MAX_TOKENS) return PIE_ELIMIT;
    int32_t need = b->n_tok + (int32_t)n;
    if (need <= b->cap_tok) return 0;
    int32_t cap = b->cap_tok ? b->cap_tok : 16;
    while (cap < need) cap *= 2;
    void *t = b->tokens, *p = b->positions;
    int rc = grow_pair(i, b, &t, sizeof *b->tokens, &p, sizeof *b->positions,
                       b->cap_tok, cap);
    b->tokens = t;
    b->positions = p;
    if (rc == 0) b->cap_tok = cap;
    return rc;
}

uint32_t Z_pieZ_forward_tokens(I *i, uint32_t fwd, uint32_t ids, uint32_t pos,
                               uint32_t n)
{
    if (n > MAX_TOKENS) RET(PIE_ELIMIT);
    pie_rt_guest_ptr(i, ids, (uint64_t)n * 4);
    pie_rt_guest_ptr(i, pos, (uint64_t)n * 4);
    builder *b = builder_of(i, fwd);
    if (!b) RET(PIE_EINVAL);
    if (n == 0) return 0;          /* (b->tokens may be NULL: no NULL + 0) */
    int rc = grow_tokens(i, b, n);
    if (rc < 0) RET(rc);
    pie_rt_copy_in(i, b->tokens + b->n_tok, ids, (uint64_t)n * 4);
    pie_rt_copy_in(i, b->positions + b->n_tok, pos, (uint64_t)n * 4);
    b->n_tok += (int32_t)n;
    return 0;
}

/* Doubles b's chain arrays (chains and srcs), charged to the budget. */
static int grow_chains(I *i, builder *b)
{
    int32_t cap = b->cap_chains ? b->cap_chains * 2 : 4;
    void *c = b->chains, *e = b->srcs;
    int rc = grow_pair(i, b, &c, sizeof *b->chains, &e, sizeof *b->srcs,
                       b->cap_chains, cap);
    b->chains = c;
    b->srcs = e;
    if (rc == 0) b->cap_chains = cap;
    return rc;
}

uint32_t Z_pieZ_forward_token_from(I *i, uint32_t fwd, uint32_t src_fut,
                                   uint32_t row, uint32_t position)
{
    builder *b = builder_of(i, fwd);
    if (!b) RET(PIE_EINVAL);
    efut *ef = pie_rt_future_data(i, (int32_t)src_fut, PIE_RT_FUT_ENGINE);
    if (!ef || !ef->cf || row > INT32_MAX) RET(PIE_EINVAL);
    int rc = grow_tokens(i, b, 1);
    if (rc < 0) RET(rc);
    if (b->n_chains == b->cap_chains && (rc = grow_chains(i, b)) < 0)
        RET(rc);
    atomic_fetch_add(&ef->refs, 1);          /* the builder keeps it alive */
    b->srcs[b->n_chains] = ef;
    b->chains[b->n_chains++] = (pie_ctl_chain){ b->n_tok, ef->cf,
                                                (int32_t)row };
    b->tokens[b->n_tok] = 0;
    b->positions[b->n_tok] = (int32_t)position;
    b->n_tok++;
    return 0;
}

uint32_t Z_pieZ_forward_pages(I *i, uint32_t fwd, uint32_t pages, uint32_t n,
                              uint32_t last_len)
{
    int rc = 0;
    uint32_t *v = read_handles(i, pages, n, &rc);
    if (!v) RET(rc);
    builder *b = builder_of(i, fwd);
    if (!b || last_len > INT32_MAX) {
        free(v);
        RET(PIE_EINVAL);
    }
    if ((rc = charge(i, b, (uint64_t)n * 4, (uint64_t)b->n_pages * 4)) < 0) {
        free(v);
        RET(rc);
    }
    free(b->pages);
    b->pages = v;
    b->n_pages = (int32_t)n;
    b->last_len = (int32_t)last_len;
    return 0;
}

uint32_t Z_pieZ_forward_mask(I *i, uint32_t fwd, uint32_t indptr, uint32_t runs,
                             uint32_t n_runs)
{
    builder *b = builder_of(i, fwd);
    if (!b) RET(PIE_EINVAL);
    if (n_runs > (1u << 26)) RET(PIE_ELIMIT);
    uint64_t ni = (uint64_t)b->n_tok + 1;
    pie_rt_guest_ptr(i, indptr, ni * 4);
    pie_rt_guest_ptr(i, runs, (uint64_t)n_runs * 4);
    uint64_t bytes = ni * 4 + (uint64_t)n_runs * 4, old = b->mask_bytes;
    int rc = charge(i, b, bytes, old);
    if (rc < 0) RET(rc);
    uint32_t *ip = malloc(ni * 4), *r = malloc((n_runs ? n_runs : 1) * 4);
    if (!ip || !r) rc = PIE_ENOMEM;
    if (!rc) {
        pie_rt_copy_in(i, ip, indptr, ni * 4);
        pie_rt_copy_in(i, r, runs, (uint64_t)n_runs * 4);
        if (ip[b->n_tok] > n_runs) rc = PIE_ERANGE;
        /* non-decreasing, so no entry points past the runs: the control
         * layer sums a token's runs before it checks the next entry */
        for (int32_t t = 0; t < b->n_tok && !rc; t++)
            if (ip[t + 1] < ip[t]) rc = PIE_EINVAL;
    }
    if (rc < 0) {
        free(ip), free(r);
        charge(i, b, old, bytes);
        RET(rc);
    }
    free(b->mask_indptr);
    free(b->mask_runs);
    b->mask_indptr = ip;
    b->mask_runs = r;
    b->mask_tokens = b->n_tok;
    b->mask_bytes = bytes;
    return 0;
}

uint32_t Z_pieZ_forward_output(I *i, uint32_t fwd, uint32_t token_idx,
                               uint32_t kind, float temperature, uint32_t top_k,
                               float top_p, float min_p, uint64_t seed)
{
    builder *b = builder_of(i, fwd);
    if (!b) RET(PIE_EINVAL);
    if (b->n_rows >= MAX_ROWS) RET(PIE_ELIMIT);
    if (token_idx > INT32_MAX) RET(PIE_ERANGE);
    if (b->n_rows == b->cap_rows) {
        int32_t cap = b->cap_rows ? b->cap_rows * 2 : 4;
        const uint64_t per_row = sizeof *b->out_idx + sizeof *b->samplers +
                                 sizeof *b->ids + sizeof *b->lmask;
        int rc = charge(i, b, cap * per_row, b->cap_rows * per_row);
        if (rc < 0) RET(rc);
        int32_t *oi = realloc(b->out_idx, cap * sizeof *oi);
        if (oi) b->out_idx = oi;
        pie_sampler *sa = realloc(b->samplers, cap * sizeof *sa);
        if (sa) b->samplers = sa;
        int32_t **id = realloc(b->ids, cap * sizeof *id);
        if (id) b->ids = id;
        row_mask *lm = realloc(b->lmask, cap * sizeof *lm);
        if (lm) b->lmask = lm;
        if (!oi || !sa || !id || !lm) {
            charge(i, b, b->cap_rows * per_row, cap * per_row);
            RET(PIE_ENOMEM);
        }
        b->cap_rows = cap;
    }
    int32_t r = b->n_rows++;
    b->out_idx[r] = (int32_t)token_idx;
    b->samplers[r] = (pie_sampler){ .kind = (int32_t)kind,
                                    .temperature = temperature,
                                    .top_k = (int32_t)top_k, .top_p = top_p,
                                    .min_p = min_p, .seed = seed };
    b->ids[r] = NULL;
    b->lmask[r] = (row_mask){ 0 };
    RET(r);
}

uint32_t Z_pieZ_forward_output_ids(I *i, uint32_t fwd, uint32_t row,
                                   uint32_t ids, uint32_t n)
{
    if (n > MAX_ROWS * 4u) RET(PIE_ELIMIT);
    pie_rt_guest_ptr(i, ids, (uint64_t)n * 4);
    builder *b = builder_of(i, fwd);
    if (!b || row >= (uint32_t)b->n_rows) RET(PIE_EINVAL);
    uint64_t old = b->ids[row] ? (uint64_t)b->samplers[row].n_ids * 4 : 0;
    int rc = charge(i, b, (uint64_t)n * 4, old);
    if (rc < 0) RET(rc);
    int32_t *v = malloc((n ? n : 1) * sizeof *v);
    if (!v) {
        charge(i, b, old, (uint64_t)n * 4);
        RET(PIE_ENOMEM);
    }
    pie_rt_copy_in(i, v, ids, (uint64_t)n * 4);
    free(b->ids[row]);
    b->ids[row] = v;
    b->samplers[row].ids = v;
    b->samplers[row].n_ids = (int32_t)n;
    return 0;
}

uint32_t Z_pieZ_forward_logit_mask(I *i, uint32_t fwd, uint32_t row,
                                   uint32_t runs, uint32_t n_runs)
{
    if (n_runs > (1u << 24)) RET(PIE_ELIMIT);
    pie_rt_guest_ptr(i, runs, (uint64_t)n_runs * 4);
    builder *b = builder_of(i, fwd);
    if (!b || row >= (uint32_t)b->n_rows) RET(PIE_EINVAL);
    uint64_t old = b->lmask[row].runs ? (uint64_t)b->lmask[row].n * 4 : 0;
    int rc = charge(i, b, (uint64_t)n_runs * 4, old);
    if (rc < 0) RET(rc);
    uint32_t *v = malloc((n_runs ? n_runs : 1) * 4);
    if (!v) {
        charge(i, b, old, (uint64_t)n_runs * 4);
        RET(PIE_ENOMEM);
    }
    pie_rt_copy_in(i, v, runs, (uint64_t)n_runs * 4);
    free(b->lmask[row].runs);
    b->lmask[row] = (row_mask){ v, n_runs };
    return 0;
}

/* ---- submit and futures --------------------------------------------------- */

/* Counts engine forwards in flight (rt->n_engine): their completion
 * callback (efut_done) runs on the control layer's threads and locks rt,
 * so pie_rt_free waits until none is left, as for HTTP threads. */
static void engine_inflight(pie_rt *rt, int d)
{
    pthread_mutex_lock(&rt->lock);
    rt->n_engine += d;
    if (rt->n_engine == 0)
        pthread_cond_broadcast(&rt->live_cv);
    pthread_mutex_unlock(&rt->lock);
}

static void efut_done(void *user, pie_ctl_future *f, int status)
{
    efut *ef = user;
    pie_rt *rt = ef->rf->rt;            /* before the complete frees ef */
    (void)f;
    pie_rt_future_complete(ef->rf, status, NULL, 0);   /* may free ef */
    engine_inflight(rt, -1);
}

static void efut_cancel(void *data)
{
    efut *ef = data;
    pthread_mutex_lock(&ef->mu);
    ef->cancelled = true;
    pie_ctl_future *cf = ef->cf;
    pthread_mutex_unlock(&ef->mu);
    if (cf) pie_ctl_future_cancel(cf);
}

static void efut_destroy(void *data)
{
    efut_unref(data);                         /* the runtime future's ref */
}

/* Assembles b into the control-layer forward *f; its logit mask (NULL
 * where no row has one) goes to *li and *lr, which the caller frees. */
static int forward_of(const builder *b, int32_t vocab, pie_ctl_forward *f,
                      uint32_t **li_out, uint32_t **lr_out)
{
    *li_out = *lr_out = NULL;
    if (b->mask_indptr && b->mask_tokens != b->n_tok)
        return pie_err_set(PIE_EINVAL, "forward: mask set for %d tokens, "
                           "forward has %d", b->mask_tokens, b->n_tok);
    uint32_t *li = NULL, *lr = NULL;
    bool any = false;
    uint64_t total = 0;
    for (int32_t r = 0; r < b->n_rows; r++) {
        any |= b->lmask[r].runs != NULL;
        total += b->lmask[r].runs ? b->lmask[r].n : 2;
    }
    if (any) {
        li = malloc((b->n_rows + 1) * sizeof *li);
        lr = malloc((total ? total : 1) * sizeof *lr);
        if (!li || !lr) {
            free(li), free(lr);
            return PIE_ENOMEM;
        }
        li[0] = 0;
        uint32_t at = 0;
        for (int32_t r = 0; r < b->n_rows; r++) {
            if (b->lmask[r].runs) {
                memcpy(lr + at, b->lmask[r].runs, b->lmask[r].n * 4);
                at += b->lmask[r].n;
            } else {                       /* no mask: everything allowed */
                lr[at++] = 0;
                lr[at++] = (uint32_t)vocab;
            }
            li[r + 1] = at;
        }
    }
    *f = (pie_ctl_forward){
        .n_tokens = b->n_tok, .tokens = b->tokens, .positions = b->positions,
        .n_pages = b->n_pages, .pages = b->pages,
        .last_page_len = b->last_len, .mask_indptr = b->mask_indptr,
        .mask_runs = b->mask_runs, .n_outputs = b->n_rows,
        .output_idx = b->out_idx, .samplers = b->samplers,
        .logit_mask_indptr = li, .logit_mask_runs = lr,
        .n_chains = b->n_chains, .chains = b->chains,
    };
    *li_out = li;
    *lr_out = lr;
    return 0;
}

/* Submits forward f for client c, completing ef's runtime future. */
static int submit(pie_ctl_client *c, const pie_ctl_forward *f, efut *ef,
                  pie_ctl_future **out)
{
    /* efut_done takes the count back, or (a failed submit never calls
     * back) the failure below */
    pie_rt *rt = ef->rf->rt;
    engine_inflight(rt, 1);
    int rc = pie_ctl_forward_submit(c, f, efut_done, ef, out);
    if (rc < 0)
        engine_inflight(rt, -1);
    return rc;
}

/* The most bytes an instance's submitted forwards may keep (inputs and
 * results): the engine's max_output_bytes, or the instance's memory limit
 * if that is lower. */
static uint64_t output_budget(I *i)
{
    uint64_t lim = i->rt->o.memory_limit, max = X(i)->e->o.max_output_bytes;
    return lim && lim < max ? lim : max;
}

/* 0 when what forward f of model index model keeps in the control layer
 * (its input copies and results, pie_ctl_forward_bytes) fits beside what
 * the instance's futures hold (its size in *need), else PIE_ELIMIT with a
 * message. */
static int output_check(I *i, int32_t model, const pie_ctl_forward *f,
                        uint64_t *need)
{
    einst *x = X(i);
    *need = pie_ctl_forward_bytes(x->e->models[model].ctl, f);
    uint64_t held = atomic_load(&x->acct->bytes), max = output_budget(i);
    if (*need <= max && held <= max - *need) return 0;
    return pie_err_set(PIE_ELIMIT, "forward_submit: this forward's inputs "
                       "and results (%llu bytes) would take what the "
                       "instance's forwards keep until their futures are "
                       "freed past %llu bytes (limit %llu per instance): "
                       "read and future_free earlier forwards first",
                       (unsigned long long)*need,
                       (unsigned long long)(held + *need),
                       (unsigned long long)max);
}

/* submit_once's part once f is assembled from b. */
static int submit_charged(I *i, builder *b, pie_ctl_client *c,
                          const pie_ctl_forward *f, int32_t *h)
{
    einst *x = X(i);
    uint64_t need;
    int rc = output_check(i, b->model, f, &need);
    if (rc < 0) return rc;
    efut *ef = calloc(1, sizeof *ef);
    if (!ef) return PIE_ENOMEM;
    pthread_mutex_init(&ef->mu, NULL);
    atomic_init(&ef->refs, 1);
    pie_rt_future *rf;
    *h = pie_rt_future_new(i, PIE_RT_FUT_ENGINE, ef, efut_cancel,
                           efut_destroy, &rf);
    if (*h < 0) {
        pthread_mutex_destroy(&ef->mu);
        free(ef);
        return *h;
    }
    ef->rf = rf;
    ef->acct = x->acct;                  /* charged now: a failure below */
    ef->out_bytes = need;                /* gives it back in efut_unref  */
    atomic_fetch_add(&x->acct->refs, 1);
    atomic_fetch_add(&x->acct->bytes, need);
    pie_ctl_future *cf = NULL;
    rc = submit(c, f, ef, &cf);
    if (rc < 0) {
        pie_rt_future_complete(rf, rc, NULL, 0);
        pie__rt_future_free(i, *h);
        return rc;
    }
    pthread_mutex_lock(&ef->mu);
    ef->cf = cf;
    bool cancelled = ef->cancelled;
    pthread_mutex_unlock(&ef->mu);
    if (cancelled) pie_ctl_future_cancel(cf);
    return 0;
}

/* One try at submitting builder b for client c as a new future, whose
 * handle goes to *h. Leaves b to the caller (it is the instance's until
 * consumed) and, on failure, nothing allocated: PIE_EAGAIN (c is swapped
 * out) is retried after resume_client, which parks. What the forward
 * keeps in the control layer (inputs and results) is charged to the
 * instance (output_check) until its efut goes. */
static int submit_once(I *i, builder *b, pie_ctl_client *c, int32_t *h)
{
    einst *x = X(i);
    uint32_t *li, *lr;
    pie_ctl_forward f;
    int rc = forward_of(b, x->e->models[b->model].m->cfg.vocab_size, &f,
                        &li, &lr);
    if (rc < 0) return rc;
    rc = submit_charged(i, b, c, &f, h);
    free(li);
    free(lr);
    return rc;
}

uint32_t Z_pieZ_forward_submit(I *i, uint32_t fwd)
{
    einst *x = X(i);
    builder *b = builder_of(i, fwd);
    if (!b) RET(PIE_EINVAL);
    pie_ctl_client *c = NULL;
    int32_t h = 0;
    int rc = client_at(i, b->model, &c);
    if (rc == 0) rc = submit_once(i, b, c, &h);
    /* pages swapped out: back, then once more (while this parks, the
     * instance still owns the builder) */
    if (rc == PIE_EAGAIN && (rc = resume_client(i, c)) == 0)
        rc = submit_once(i, b, c, &h);
    x->b[fwd - 1] = NULL;                        /* consumed */
    builder_drop(x, b);
    RET(rc < 0 ? rc : h);
}

static efut *efut_of(I *i, uint32_t fut)
{
    efut *ef = pie_rt_future_data(i, (int32_t)fut, PIE_RT_FUT_ENGINE);
    return ef && ef->cf ? ef : NULL;
}

/* The outputs of forward future fut: 0 with *o and *n set, PIE_EAGAIN
 * while it is pending, else its error. The future's own status comes
 * first: a forward cancelled while it runs is done (PIE_ECANCELED) for
 * the guest at once, though the control layer finishes its step. */
static int efut_result(I *i, uint32_t fut, const pie_forward_out **o,
                       int32_t *n)
{
    efut *ef = efut_of(i, fut);
    if (!ef) return PIE_EINVAL;
    int32_t st = pie_rt_future_status(i, (int32_t)fut);
    if (st < 0 && st != PIE_EAGAIN) return st;
    return pie_ctl_future_result(ef->cf, o, n);
}

uint32_t Z_pieZ_forward_read_tokens(I *i, uint32_t fut, uint32_t tokens,
                                    uint32_t cap)
{
    pie_rt_guest_ptr(i, tokens, (uint64_t)cap * 4);
    const pie_forward_out *o;
    int32_t n;
    int rc = efut_result(i, fut, &o, &n);
    if (rc < 0) RET(rc);
    pie_rt_copy_out(i, tokens, o->tokens,
                    (uint64_t)((uint32_t)n < cap ? (uint32_t)n : cap) * 4);
    RET(n);
}

uint32_t Z_pieZ_forward_read_values(I *i, uint32_t fut, uint32_t row,
                                    uint32_t values, uint32_t ids, uint32_t cap)
{
    pie_rt_guest_ptr(i, values, (uint64_t)cap * 4);
    if (ids) pie_rt_guest_ptr(i, ids, (uint64_t)cap * 4);
    const pie_forward_out *o;
    int32_t n;
    int rc = efut_result(i, fut, &o, &n);
    if (rc < 0) RET(rc);
    if (row >= (uint32_t)n) RET(PIE_ERANGE);
    uint32_t a = o->value_indptr[row], len = o->value_indptr[row + 1] - a;
    uint32_t k = len < cap ? len : cap;
    pie_rt_copy_out(i, values, o->values + a, (uint64_t)k * 4);
    if (ids) pie_rt_copy_out(i, ids, o->ids + a, (uint64_t)k * 4);
    RET(len);
}
