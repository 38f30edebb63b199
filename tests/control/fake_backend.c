/* fake_backend.c — see fake_backend.h. */
#include "tests/control/fake_backend.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/pie_err.h"

typedef struct fake {
    pie_backend      b;
    pie_model_config cfg;
    uint64_t        *kv;        /* (n_pages * page_size)                   */
    atomic_int       delay_us;
    atomic_int       started;       /* forward calls begun                */
    atomic_int       fail_copies;   /* the next this many copies fail     */
    atomic_int       fail_forwards; /* the next this many forwards fail   */
    atomic_int       limit;         /* forwards over this many tokens fail
                                       (0: none)                          */
    atomic_int       poison;        /* forwards holding this id fail (-1)  */
    atomic_bool      lost;          /* every call fails: fake_backend_lose */
    pthread_mutex_t  gate_mu;       /* fake_backend_hold: forwards that   */
    pthread_cond_t   gate_cv;       /* start wait while held is set       */
    bool             held;
    fake_stats       st;
} fake;

uint64_t fake_mix(int32_t token, int32_t pos)
{
    uint64_t x = (uint64_t)(uint32_t)token * 0x9e3779b97f4a7c15ull ^
                 ((uint64_t)(uint32_t)pos << 32 | 0x5bd1e995u);
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 29;
    return x;
}

static uint64_t fold(uint64_t h, uint64_t v)
{
    h = (h ^ v) * 0x100000001b3ull;
    return h ^ (h >> 27);
}

static uint64_t finish(uint64_t h, int32_t token, int32_t pos)
{
    return fold(fold(h, (uint64_t)(uint32_t)token), (uint64_t)pos) >> 8;
}

int32_t fake_expected_next(const int32_t *history, int32_t n, int32_t vocab)
{
    uint64_t h = 1469598103934665603ull;
    for (int32_t i = 0; i < n; i++) h = fold(h, fake_mix(history[i], i));
    return (int32_t)(finish(h, history[n - 1], n - 1) % (uint64_t)vocab);
}

void fake_expected_gen(const int32_t *prompt, int32_t np, int32_t n,
                       int32_t vocab, int32_t *out)
{
    int32_t *h = malloc((size_t)(np + n) * sizeof *h);
    if (!h) abort();
    memcpy(h, prompt, (size_t)np * sizeof *h);
    for (int32_t i = 0; i < n; i++) {
        h[np + i] = fake_expected_next(h, np + i, vocab);
        out[i] = h[np + i];
    }
    free(h);
}

static bool allowed(const uint32_t *runs, uint32_t n, int32_t id)
{
    uint64_t at = 0;
    for (uint32_t k = 0; k < n; k++) {
        if (id < (int64_t)(at + runs[k])) return k % 2 == 1;
        at += runs[k];
    }
    return false;
}

static void write_row(fake *f, const pie_forward_batch *bt, pie_forward_out *out,
                      int32_t o, uint64_t state)
{
    const pie_sampler *s = &bt->samplers[o];
    int32_t V = f->cfg.vocab_size;
    const uint32_t *runs = NULL;
    uint32_t nr = 0;
    if (bt->logit_mask_indptr) {
        runs = bt->logit_mask_runs + bt->logit_mask_indptr[o];
        nr = bt->logit_mask_indptr[o + 1] - bt->logit_mask_indptr[o];
    }
    /* (no probe rows, no value arrays: NULL, never NULL + 0) */
    float *vals = out->values ? out->values + out->value_indptr[o] : NULL;
    int32_t *ids = out->ids ? out->ids + out->value_indptr[o] : NULL;
    int32_t tok = -1;
    switch (s->kind) {
    case PIE_SAMPLER_RANDOM:
        state = fold(state, s->seed) >> 8;
        /* fall through */
    case PIE_SAMPLER_GREEDY:
        tok = (int32_t)(state % (uint64_t)V);
        for (int32_t k = 0; runs && k < V && !allowed(runs, nr, tok); k++)
            tok = (tok + 1) % V;
        break;
    case PIE_PROBE_TOPK:
        for (int32_t j = 0; j < s->top_k; j++) {
            ids[j] = (int32_t)((state + j) % (uint64_t)V);
            vals[j] = 1.0f / (j + 2);
        }
        break;
    case PIE_PROBE_LOGITS:
        for (int32_t j = 0; j < V; j++)
            vals[j] = (float)((state >> (j % 32)) & 0xff);
        break;
    case PIE_PROBE_LOGPROBS:
        for (int32_t j = 0; j < s->n_ids; j++)
            vals[j] = -(float)((state ^ (uint64_t)s->ids[j]) % 97);
        break;
    case PIE_PROBE_ENTROPY:
        vals[0] = (float)(state % 1000) / 100.0f;
        break;
    }
    out->tokens[o] = tok;
}

/* A forward failed on demand: writes the KV of the first half of each
 * request's new tokens, then fails (see fake_backend_fail_forwards). */
static int fail_forward(fake *f, const pie_forward_batch *bt)
{
    int32_t ps = f->b.page_size;
    for (int32_t r = 0; r < bt->n_reqs; r++) {
        const int32_t *pg = bt->kv_page_indices + bt->kv_page_indptr[r];
        int32_t np = bt->kv_page_indptr[r + 1] - bt->kv_page_indptr[r];
        int32_t kv_len = (np - 1) * ps + bt->kv_last_page_len[r];
        int32_t t0 = bt->qo_indptr[r], n = bt->qo_indptr[r + 1] - t0;
        for (int32_t i = 0; i < n / 2; i++) {
            int32_t s = kv_len - n + i;
            f->kv[(size_t)pg[s / ps] * ps + s % ps] =
                fake_mix(bt->token_ids[t0 + i], bt->positions[t0 + i]);
        }
    }
    f->st.failed++;
    return pie_err_set(PIE_EIO, "fake: forward failed (on demand)");
}

/* Counts a call begun after the loss; PIE_EDEVLOST while lost. */
static int lost_call(fake *f, const char *what)
{
    if (!atomic_load(&f->lost)) return 0;
    f->st.after_lost++;
    return pie_err_set(PIE_EDEVLOST, "fake: %s: device lost (on demand)",
                       what);
}

/* PIE_ELIMIT over the token limit, PIE_EINVAL holding the poisoned id. */
static int refuse(fake *f, const pie_forward_batch *bt)
{
    int32_t lim = atomic_load(&f->limit), bad = atomic_load(&f->poison);
    if (lim > 0 && bt->n_tokens > lim) {
        f->st.refused++;
        return pie_err_set(PIE_ELIMIT, "fake: a forward of %d tokens, more "
                           "than the %d it takes", bt->n_tokens, lim);
    }
    for (int32_t t = 0; bad >= 0 && t < bt->n_tokens; t++)
        if (bt->token_ids[t] == bad) {
            f->st.refused++;
            return pie_err_set(PIE_EINVAL, "fake: poisoned token %d at %d",
                               bad, t);
        }
    return 0;
}

/* Waits while fake_backend_hold holds forwards. */
static void gate_wait(fake *f)
{
    pthread_mutex_lock(&f->gate_mu);
    while (f->held) pthread_cond_wait(&f->gate_cv, &f->gate_mu);
    pthread_mutex_unlock(&f->gate_mu);
}

static int fake_forward(pie_backend *b, const pie_forward_batch *bt,
                        pie_forward_out *out)
{
    fake *f = (fake *)b;
    int rc = lost_call(f, "forward");
    if (rc < 0) return rc;
    rc = pie_batch_validate(bt, f->cfg.vocab_size, b->page_size, b->n_pages);
    if (rc == 0) rc = refuse(f, bt);
    if (rc < 0) return rc;
    bool fail = atomic_load(&f->fail_forwards) > 0;   /* read at the start */
    if (fail) atomic_fetch_sub(&f->fail_forwards, 1);
    atomic_fetch_add(&f->started, 1);
    int32_t delay = atomic_load(&f->delay_us);
    if (delay) usleep(delay);
    gate_wait(f);
    if (atomic_load(&f->lost))          /* lost while it ran */
        return pie_err_set(PIE_EDEVLOST, "fake: forward: device lost while "
                           "it ran (on demand)");
    if (fail) return fail_forward(f, bt);
    int32_t ps = b->page_size;
    uint64_t *state = calloc(bt->n_tokens + 1, sizeof *state);
    if (!state) return pie_err_set(PIE_ENOMEM, "fake: oom");
    for (int32_t r = 0; r < bt->n_reqs; r++) {
        const int32_t *pg = bt->kv_page_indices + bt->kv_page_indptr[r];
        int32_t np = bt->kv_page_indptr[r + 1] - bt->kv_page_indptr[r];
        int32_t kv_len = (np - 1) * ps + bt->kv_last_page_len[r];
        int32_t t0 = bt->qo_indptr[r], n = bt->qo_indptr[r + 1] - t0;
        for (int32_t i = 0; i < n; i++) {
            int32_t s = kv_len - n + i;
            f->kv[(size_t)pg[s / ps] * ps + s % ps] =
                fake_mix(bt->token_ids[t0 + i], bt->positions[t0 + i]);
        }
        for (int32_t i = 0; i < n; i++) {
            int32_t t = t0 + i, s_i = kv_len - n + i;
            uint64_t h = 1469598103934665603ull;
            if (bt->mask_indptr) {
                const uint32_t *runs = bt->mask_runs + bt->mask_indptr[t];
                uint32_t nr = bt->mask_indptr[t + 1] - bt->mask_indptr[t];
                for (int32_t s = 0; s < kv_len; s++)
                    if (allowed(runs, nr, s))
                        h = fold(h, f->kv[(size_t)pg[s / ps] * ps + s % ps]);
            } else {
                for (int32_t s = 0; s <= s_i; s++)
                    h = fold(h, f->kv[(size_t)pg[s / ps] * ps + s % ps]);
            }
            state[t] = finish(h, bt->token_ids[t], bt->positions[t]);
        }
    }
    for (int32_t o = 0; o < bt->n_outputs; o++)
        write_row(f, bt, out, o, state[bt->output_token_idx[o]]);
    free(state);
    f->st.calls++;
    if (f->st.calls <= 4096) f->st.log[f->st.calls - 1] = bt->n_reqs;
    if (bt->n_reqs > f->st.max_reqs) f->st.max_reqs = bt->n_reqs;
    f->st.total_reqs += bt->n_reqs;
    f->st.total_tokens += bt->n_tokens;
    if (bt->n_tokens > f->st.max_tokens) f->st.max_tokens = bt->n_tokens;
    return 0;
}

static int fake_copy(pie_backend *b, int32_t src, int32_t src_off, int32_t dst,
                     int32_t dst_off, int32_t n)
{
    fake *f = (fake *)b;
    int32_t ps = b->page_size;
    if (src < 0 || dst < 0 || src >= b->n_pages || dst >= b->n_pages || n < 0 ||
        src_off < 0 || dst_off < 0 || src_off > ps - n ||
        dst_off > ps - n)
        return pie_err_set(PIE_ERANGE, "fake: bad copy");
    int rc = lost_call(f, "copy");
    if (rc < 0) return rc;
    if (atomic_load(&f->fail_copies) > 0) {
        atomic_fetch_sub(&f->fail_copies, 1);
        return pie_err_set(PIE_EIO, "fake: copy failed (on demand)");
    }
    memmove(f->kv + (size_t)dst * ps + dst_off, f->kv + (size_t)src * ps + src_off,
            n * sizeof(uint64_t));
    f->st.copies++;
    return 0;
}

static int fake_download(pie_backend *b, const int32_t *pages, int32_t n,
                         void *host)
{
    fake *f = (fake *)b;
    int rc = lost_call(f, "download");
    if (rc < 0) return rc;
    f->st.downloads += n;
    for (int32_t i = 0; i < n; i++)
        memcpy((char *)host + i * b->page_bytes,
               f->kv + (size_t)pages[i] * b->page_size, b->page_bytes);
    return 0;
}

static int fake_upload(pie_backend *b, const int32_t *pages, int32_t n,
                       const void *host)
{
    fake *f = (fake *)b;
    int rc = lost_call(f, "upload");
    if (rc < 0) return rc;
    for (int32_t i = 0; i < n; i++)
        memcpy(f->kv + (size_t)pages[i] * b->page_size,
               (const char *)host + i * b->page_bytes, b->page_bytes);
    return 0;
}

static void fake_destroy(pie_backend *b)
{
    fake *f = (fake *)b;
    pthread_mutex_destroy(&f->gate_mu);
    pthread_cond_destroy(&f->gate_cv);
    free(f->kv);
    free(f);
}

static const pie_backend_ops fake_ops = {
    fake_forward, fake_copy, fake_download, fake_upload, fake_destroy,
};

int fake_backend_create(int32_t vocab, int32_t page_size, int32_t n_pages,
                        int32_t delay_us, pie_backend **out)
{
    fake *f = calloc(1, sizeof *f);
    if (!f) return PIE_ENOMEM;
    f->kv = calloc((size_t)n_pages * page_size, sizeof *f->kv);
    if (!f->kv) { free(f); return PIE_ENOMEM; }
    snprintf(f->cfg.arch, sizeof f->cfg.arch, "fake");
    f->cfg.vocab_size = vocab;
    f->delay_us = delay_us;
    f->poison = -1;
    pthread_mutex_init(&f->gate_mu, NULL);
    pthread_cond_init(&f->gate_cv, NULL);
    f->b = (pie_backend){ .ops = &fake_ops, .cfg = &f->cfg, .name = "fake",
                          .page_size = page_size, .n_pages = n_pages,
                          .page_bytes = (uint64_t)page_size * sizeof(uint64_t) };
    *out = &f->b;
    return 0;
}

fake_stats *fake_backend_stats(pie_backend *b) { return &((fake *)b)->st; }
void fake_backend_set_delay(pie_backend *b, int32_t d)
{
    atomic_store(&((fake *)b)->delay_us, d);
}

void fake_backend_hold(pie_backend *b, bool on)
{
    fake *f = (fake *)b;
    pthread_mutex_lock(&f->gate_mu);
    f->held = on;
    pthread_cond_broadcast(&f->gate_cv);
    pthread_mutex_unlock(&f->gate_mu);
}

int32_t fake_backend_started(pie_backend *b)
{
    return atomic_load(&((fake *)b)->started);
}
void fake_backend_fail_copies(pie_backend *b, int32_t n)
{
    atomic_store(&((fake *)b)->fail_copies, n);
}
void fake_backend_fail_forwards(pie_backend *b, int32_t n)
{
    atomic_store(&((fake *)b)->fail_forwards, n);
}

void fake_backend_set_max_tokens(pie_backend *b, int32_t n)
{
    b->max_tokens = n;
    atomic_store(&((fake *)b)->limit, n);
}

void fake_backend_fail_tokens_over(pie_backend *b, int32_t n)
{
    atomic_store(&((fake *)b)->limit, n);
}

void fake_backend_poison(pie_backend *b, int32_t tok)
{
    atomic_store(&((fake *)b)->poison, tok);
}

void fake_backend_lose(pie_backend *b)
{
    atomic_store(&((fake *)b)->lost, true);
}
