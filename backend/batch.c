/*
 * batch.c — helpers every backend shares: batch validation, output
 * allocation, and the reference sampler.
 *
 * pie_batch_validate() is the single gate in front of a forward: it checks
 * every index a backend will follow (token ids, pages, fills, indptr arrays,
 * masks, output rows, sampler parameters) and that no KV slot is written
 * twice by one batch, so a backend that calls it first never writes to its
 * pool for a batch it later rejects. Its rules for one output row (sampler
 * and logit mask) are pie_batch_validate_row(), which the control layer
 * applies to each request at submit: a batch merges many clients' requests,
 * and one bad row must fail its own request, not the batch.
 *
 * pie_forward_out_alloc() sizes out->values/ids per sampler kind and fills
 * out->value_indptr; backends write probe row o at values[value_indptr[o]].
 *
 * pie_sample_row() implements the sampling specification of backend.h on one
 * row of float logits. The kept set of the random sampler and the TOPK probe
 * are both "a descending prefix in (p desc, id asc) order", so one max-heap
 * over the vocabulary serves both: heapify is O(V), and each token taken
 * costs O(log V); a sampler with top_k = 50 over 150k ids touches about
 * 150k + 50*17 elements and never sorts the whole vocabulary.
 */
#define _GNU_SOURCE   /* qsort_r */
#include "backend/backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/pie_err.h"

/* ---------------------------------------------------------------- validate */

static int check_indptr(const int32_t *p, int32_t n, int64_t total,
                        const char *what)
{
    if (!p) return pie_err_set(PIE_EINVAL, "batch: %s is NULL", what);
    if (p[0] != 0)
        return pie_err_set(PIE_EINVAL, "batch: %s[0] = %d, expected 0", what,
                           p[0]);
    for (int32_t i = 0; i < n; i++)
        if (p[i + 1] < p[i])
            return pie_err_set(PIE_EINVAL,
                               "batch: %s not monotone at %d (%d > %d)", what,
                               i, p[i], p[i + 1]);
    if (total >= 0 && p[n] != total)
        return pie_err_set(PIE_EINVAL, "batch: %s[%d] = %d, expected %lld",
                           what, n, p[n], (long long)total);
    return 0;
}

static int check_uindptr(const uint32_t *p, int32_t n, const char *what)
{
    if (p[0] != 0)
        return pie_err_set(PIE_EINVAL, "batch: %s[0] = %u, expected 0", what,
                           p[0]);
    for (int32_t i = 0; i < n; i++)
        if (p[i + 1] < p[i])
            return pie_err_set(PIE_EINVAL,
                               "batch: %s not monotone at %d (%u > %u)", what,
                               i, p[i], p[i + 1]);
    return 0;
}

/* Sum of runs[0..n) (uint64, cannot overflow for n < 2^32). */
static uint64_t runs_sum(const uint32_t *runs, uint32_t n)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < n; i++) s += runs[i];
    return s;
}

/* Number of allowed entries (odd-indexed runs) clipped to limit. */
static uint64_t runs_allowed(const uint32_t *runs, uint32_t n)
{
    uint64_t s = 0;
    for (uint32_t i = 1; i < n; i += 2) s += runs[i];
    return s;
}

static int check_requests(const pie_forward_batch *b, int32_t page_size,
                          int32_t n_pages)
{
    int rc = check_indptr(b->qo_indptr, b->n_reqs, b->n_tokens, "qo_indptr");
    if (rc) return rc;
    rc = check_indptr(b->kv_page_indptr, b->n_reqs, -1, "kv_page_indptr");
    if (rc) return rc;
    if (!b->kv_last_page_len || (b->kv_page_indptr[b->n_reqs] > 0 &&
                                 !b->kv_page_indices))
        return pie_err_set(PIE_EINVAL, "batch: KV page arrays are NULL");
    for (int32_t r = 0; r < b->n_reqs; r++) {
        int32_t np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        int32_t last = b->kv_last_page_len[r];
        if (np < 1)
            return pie_err_set(PIE_EINVAL, "batch: request %d has no KV pages",
                               r);
        if (last < 1 || last > page_size)
            return pie_err_set(PIE_EINVAL,
                               "batch: request %d last page fill %d outside "
                               "1..%d", r, last, page_size);
        int64_t kv_len = (int64_t)(np - 1) * page_size + last;
        int32_t n_new = b->qo_indptr[r + 1] - b->qo_indptr[r];
        if (kv_len > INT32_MAX)
            return pie_err_set(PIE_ERANGE, "batch: request %d spans %lld KV "
                               "slots", r, (long long)kv_len);
        if (kv_len < n_new)
            return pie_err_set(PIE_EINVAL,
                               "batch: request %d has %d new tokens but only "
                               "%lld KV slots", r, n_new, (long long)kv_len);
        for (int32_t j = b->kv_page_indptr[r]; j < b->kv_page_indptr[r + 1];
             j++)
            if (b->kv_page_indices[j] < 0 || b->kv_page_indices[j] >= n_pages)
                return pie_err_set(PIE_ERANGE,
                                   "batch: request %d page id %d outside "
                                   "0..%d", r, b->kv_page_indices[j],
                                   n_pages - 1);
    }
    return 0;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Rejects a batch in which two new tokens would write the same KV slot. */
static int check_slot_conflicts(const pie_forward_batch *b, int32_t page_size)
{
    if (b->n_tokens < 2) return 0;
    int64_t *slots = malloc(sizeof *slots * (size_t)b->n_tokens);
    if (!slots) return pie_err_set(PIE_ENOMEM, "batch: out of memory");
    for (int32_t r = 0; r < b->n_reqs; r++) {
        int32_t q0 = b->qo_indptr[r], n_new = b->qo_indptr[r + 1] - q0;
        int32_t np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        int64_t kv_len = (int64_t)(np - 1) * page_size + b->kv_last_page_len[r];
        for (int32_t i = 0; i < n_new; i++) {
            int64_t s = kv_len - n_new + i;
            int32_t page = b->kv_page_indices[b->kv_page_indptr[r] +
                                              s / page_size];
            slots[q0 + i] = (int64_t)page * page_size + s % page_size;
        }
    }
    qsort(slots, (size_t)b->n_tokens, sizeof *slots, cmp_i64);
    int rc = 0;
    for (int32_t i = 1; i < b->n_tokens && !rc; i++)
        if (slots[i] == slots[i - 1])
            rc = pie_err_set(PIE_EINVAL,
                             "batch: KV slot %lld of page %lld is written by "
                             "two new tokens",
                             (long long)(slots[i] % page_size),
                             (long long)(slots[i] / page_size));
    free(slots);
    return rc;
}

static int check_tokens(const pie_forward_batch *b, int32_t vocab,
                        int32_t page_size)
{
    if (b->n_tokens > 0 && (!b->token_ids || !b->positions))
        return pie_err_set(PIE_EINVAL, "batch: token_ids/positions are NULL");
    for (int32_t t = 0; t < b->n_tokens; t++) {
        if (b->token_ids[t] < 0 || b->token_ids[t] >= vocab)
            return pie_err_set(PIE_ERANGE,
                               "batch: token %d has id %d outside 0..%d", t,
                               b->token_ids[t], vocab - 1);
        if (b->positions[t] < 0)
            return pie_err_set(PIE_ERANGE, "batch: token %d has position %d",
                               t, b->positions[t]);
    }
    if (!b->mask_indptr) return 0;
    int rc = check_uindptr(b->mask_indptr, b->n_tokens, "mask_indptr");
    if (rc) return rc;
    if (b->mask_indptr[b->n_tokens] > 0 && !b->mask_runs)
        return pie_err_set(PIE_EINVAL, "batch: mask_runs is NULL");
    for (int32_t r = 0; r < b->n_reqs; r++) {
        int32_t np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        int64_t kv_len = (int64_t)(np - 1) * page_size + b->kv_last_page_len[r];
        for (int32_t t = b->qo_indptr[r]; t < b->qo_indptr[r + 1]; t++) {
            uint64_t sum = runs_sum(b->mask_runs + b->mask_indptr[t],
                                    b->mask_indptr[t + 1] - b->mask_indptr[t]);
            if (sum > (uint64_t)kv_len)
                return pie_err_set(PIE_EINVAL,
                                   "batch: mask of token %d covers %llu "
                                   "slots but request %d has %lld", t,
                                   (unsigned long long)sum, r,
                                   (long long)kv_len);
        }
    }
    return 0;
}

static int check_sampler(const pie_sampler *s, int32_t o, int32_t vocab)
{
    switch (s->kind) {
    case PIE_SAMPLER_GREEDY:
    case PIE_PROBE_LOGITS:
    case PIE_PROBE_ENTROPY:
        return 0;
    case PIE_SAMPLER_RANDOM:
        if (!isfinite(s->temperature) || isnan(s->top_p) || isnan(s->min_p))
            return pie_err_set(PIE_EINVAL, "output %d: random sampler has a "
                               "non-finite parameter (temperature %g, top_p "
                               "%g, min_p %g)", o, (double)s->temperature,
                               (double)s->top_p, (double)s->min_p);
        if (!(s->top_p >= 0.0f))
            return pie_err_set(PIE_EINVAL, "output %d: random sampler top_p "
                               "%g is negative (use a mass in (0, 1]; 1 "
                               "keeps all)", o, (double)s->top_p);
        if (!(s->min_p >= 0.0f && s->min_p <= 1.0f))
            return pie_err_set(PIE_EINVAL, "output %d: random sampler min_p "
                               "%g outside [0, 1] (0 keeps all)", o,
                               (double)s->min_p);
        return 0;
    case PIE_PROBE_TOPK:
        if (s->top_k < 1 || s->top_k > vocab)
            return pie_err_set(PIE_ERANGE, "output %d: TOPK probe k = %d "
                               "outside 1..%d", o, s->top_k, vocab);
        if (!isfinite(s->temperature))
            return pie_err_set(PIE_EINVAL, "output %d: TOPK probe "
                               "temperature %g is not finite", o,
                               (double)s->temperature);
        return 0;
    case PIE_PROBE_LOGPROBS:
        if (s->n_ids < 0 || (s->n_ids > 0 && !s->ids))
            return pie_err_set(PIE_EINVAL, "output %d: LOGPROBS probe has %d "
                               "ids and ids = %p", o, s->n_ids,
                               (const void *)s->ids);
        for (int32_t i = 0; i < s->n_ids; i++)
            if (s->ids[i] < 0 || s->ids[i] >= vocab)
                return pie_err_set(PIE_ERANGE, "output %d: LOGPROBS id %d "
                                   "outside 0..%d", o, s->ids[i], vocab - 1);
        return 0;
    default:
        return pie_err_set(PIE_EINVAL, "output %d: unknown sampler kind %d",
                           o, s->kind);
    }
}

int pie_batch_validate_row(const pie_sampler *s, const uint32_t *lm_runs,
                           int64_t n_lm_runs, int32_t o, int32_t vocab)
{
    int rc = check_sampler(s, o, vocab);
    if (rc || n_lm_runs < 0) return rc;
    if (n_lm_runs > UINT32_MAX || (n_lm_runs > 0 && !lm_runs))
        return pie_err_set(PIE_EINVAL, "output %d: logit mask of %lld runs "
                           "at %p", o, (long long)n_lm_runs,
                           (const void *)lm_runs);
    uint64_t sum = runs_sum(lm_runs, (uint32_t)n_lm_runs);
    if (sum > (uint64_t)vocab)
        return pie_err_set(PIE_EINVAL, "output %d: logit mask covers %llu "
                           "ids, vocab is %d", o, (unsigned long long)sum,
                           vocab);
    if (runs_allowed(lm_runs, (uint32_t)n_lm_runs) == 0)
        return pie_err_set(PIE_EINVAL, "output %d: logit mask allows no "
                           "token", o);
    return 0;
}

static int check_outputs(const pie_forward_batch *b, int32_t vocab)
{
    if (b->n_outputs < 0)
        return pie_err_set(PIE_EINVAL, "batch: n_outputs = %d", b->n_outputs);
    if (b->n_outputs > 0 && (!b->output_token_idx || !b->samplers))
        return pie_err_set(PIE_EINVAL,
                           "batch: output_token_idx/samplers are NULL");
    for (int32_t o = 0; o < b->n_outputs; o++)
        if (b->output_token_idx[o] < 0 || b->output_token_idx[o] >= b->n_tokens)
            return pie_err_set(PIE_ERANGE,
                               "batch: output %d takes token %d outside "
                               "0..%d", o, b->output_token_idx[o],
                               b->n_tokens - 1);
    const uint32_t *li = b->logit_mask_indptr;
    if (li) {
        int rc = check_uindptr(li, b->n_outputs, "logit_mask_indptr");
        if (rc) return rc;
        if (li[b->n_outputs] > 0 && !b->logit_mask_runs)
            return pie_err_set(PIE_EINVAL, "batch: logit_mask_runs is NULL");
    }
    for (int32_t o = 0; o < b->n_outputs; o++) {
        int rc = pie_batch_validate_row(&b->samplers[o],
                                        li ? b->logit_mask_runs + li[o] : NULL,
                                        li ? (int64_t)(li[o + 1] - li[o]) : -1,
                                        o, vocab);
        if (rc) return rc;
    }
    return 0;
}

int pie_batch_validate(const pie_forward_batch *b, int32_t vocab,
                       int32_t page_size, int32_t n_pages)
{
    if (!b) return pie_err_set(PIE_EINVAL, "batch: NULL");
    if (b->n_tokens < 0 || b->n_reqs < 0)
        return pie_err_set(PIE_EINVAL, "batch: n_tokens = %d, n_reqs = %d",
                           b->n_tokens, b->n_reqs);
    if (b->n_tokens == 0 && b->n_reqs == 0 && b->n_outputs == 0)
        return 0;   /* the empty batch: nothing to check, nothing to do */
    if (b->n_tokens > 0 && b->n_reqs == 0)
        return pie_err_set(PIE_EINVAL, "batch: %d tokens but no request",
                           b->n_tokens);
    int rc = check_requests(b, page_size, n_pages);
    if (!rc) rc = check_tokens(b, vocab, page_size);
    if (!rc) rc = check_outputs(b, vocab);
    if (!rc) rc = check_slot_conflicts(b, page_size);
    return rc;
}

/* ------------------------------------------------------------ output alloc */

int32_t pie_sampler_values(const pie_sampler *s, int32_t vocab)
{
    switch (s->kind) {
    case PIE_PROBE_TOPK:     return s->top_k > 0 ? s->top_k : 0;
    case PIE_PROBE_LOGITS:   return vocab;
    case PIE_PROBE_LOGPROBS: return s->n_ids > 0 ? s->n_ids : 0;
    case PIE_PROBE_ENTROPY:  return 1;
    default:                 return 0;
    }
}

int pie_forward_out_alloc(const pie_forward_batch *b, int32_t vocab,
                          pie_forward_out *out)
{
    memset(out, 0, sizeof *out);
    int32_t n = b->n_outputs > 0 ? b->n_outputs : 0;
    if (n > 0 && !b->samplers)
        return pie_err_set(PIE_EINVAL, "batch: %d outputs but no samplers", n);
    out->tokens = calloc((size_t)n + 1, sizeof *out->tokens);
    out->value_indptr = calloc((size_t)n + 1, sizeof *out->value_indptr);
    if (!out->tokens || !out->value_indptr) goto err;
    uint64_t total = 0;
    for (int32_t o = 0; o < n; o++) {
        total += (uint64_t)pie_sampler_values(&b->samplers[o], vocab);
        if (total > UINT32_MAX) {
            pie_forward_out_free(out);
            return pie_err_set(PIE_ERANGE, "batch: %llu probe values exceed "
                               "the output limit",
                               (unsigned long long)total);
        }
        out->value_indptr[o + 1] = (uint32_t)total;
    }
    out->values = calloc((size_t)total + 1, sizeof *out->values);
    out->ids = calloc((size_t)total + 1, sizeof *out->ids);
    if (!out->values || !out->ids) goto err;
    return 0;
err:
    pie_forward_out_free(out);
    return pie_err_set(PIE_ENOMEM, "batch: out of memory for outputs");
}

int pie_forward_out_check(const pie_forward_batch *b, int32_t vocab,
                          const pie_forward_out *out)
{
    int32_t n = b->n_outputs;
    if (n <= 0) return 0;
    if (!out || !out->tokens || !out->value_indptr)
        return pie_err_set(PIE_EINVAL, "batch: output arrays are NULL "
                           "(allocate them with pie_forward_out_alloc)");
    uint64_t total = 0;
    for (int32_t o = 0; o < n; o++) {
        uint64_t want = (uint64_t)pie_sampler_values(&b->samplers[o], vocab);
        if (out->value_indptr[o] != total ||
            (uint64_t)out->value_indptr[o + 1] - out->value_indptr[o] != want)
            return pie_err_set(PIE_EINVAL, "batch: output %d's probe values "
                               "at %u..%u, its sampler writes %llu at %llu "
                               "(size them with pie_forward_out_alloc)", o,
                               out->value_indptr[o], out->value_indptr[o + 1],
                               (unsigned long long)want,
                               (unsigned long long)total);
        total += want;
    }
    if (total > 0 && (!out->values || !out->ids))
        return pie_err_set(PIE_EINVAL, "batch: probe value arrays are NULL");
    return 0;
}

void pie_forward_out_free(pie_forward_out *out)
{
    if (!out) return;
    free(out->tokens);
    free(out->value_indptr);
    free(out->values);
    free(out->ids);
    memset(out, 0, sizeof *out);
}

/* ---------------------------------------------------------------- sampling */

float pie_sample_uniform(uint64_t seed)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

/* Sets logits outside the allowed runs to -inf (runs start not-allowed). */
static void apply_mask(float *logits, int32_t vocab, const uint32_t *runs,
                       uint32_t n)
{
    int64_t pos = 0;
    for (uint32_t i = 0; i < n && pos < vocab; i++) {
        int64_t end = pos + runs[i];
        if (end > vocab) end = vocab;
        if (!(i & 1))
            for (int64_t j = pos; j < end; j++) logits[j] = -INFINITY;
        pos = end;
    }
    for (int64_t j = pos; j < vocab; j++) logits[j] = -INFINITY;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* p[i] = softmax(logits / temp) in place; returns log of the normalizer
 * in units of the scaled logits (logsumexp of logits / temp). */
static double softmax_inplace(float *x, int32_t n, float temp)
{
    float mx = x[argmax(x, n)];
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        x[i] = expf((x[i] - mx) / temp);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int32_t i = 0; i < n; i++) x[i] *= inv;
    return (double)mx / temp + log(sum);
}

/* Selection over ids ordered by (p desc, id asc), a strict total order.
 *
 * sel_partition() splits a[lo, hi) around a pivot and returns its index:
 * ids ranked before the pivot end up left of it, the rest right of it.
 * Repeating it on one side (quickselect) finds the k-th id, or the id at
 * which the running mass crosses a threshold, in expected O(n) without
 * sorting; when it stops at index i, a[0, i) holds exactly the ids ranked
 * before a[i]. The pivot is taken at a pseudo-random index so that no
 * logits pattern makes it quadratic. */
static inline int before(const float *p, int32_t a, int32_t b)
{
    return p[a] > p[b] || (p[a] == p[b] && a < b);
}

static int64_t sel_partition(int32_t *a, int64_t lo, int64_t hi,
                             const float *p, uint64_t *rng)
{
    *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
    int64_t k = lo + (int64_t)((*rng >> 33) % (uint64_t)(hi - lo));
    int32_t t = a[k]; a[k] = a[hi - 1]; a[hi - 1] = t;
    int32_t piv = a[hi - 1];
    int64_t i = lo;
    for (int64_t j = lo; j < hi - 1; j++)
        if (before(p, a[j], piv)) { t = a[i]; a[i] = a[j]; a[j] = t; i++; }
    a[hi - 1] = a[i];
    a[i] = piv;
    return i;
}

/* Moves the k highest-ranked ids of a[0, n) to a[0, k) (unordered). */
static void sel_top_k(int32_t *a, int64_t n, int64_t k, const float *p)
{
    uint64_t rng = (uint64_t)n;
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        int64_t m = sel_partition(a, lo, hi, p, &rng);
        if (m == k || m == k - 1) return;
        if (m > k) hi = m; else lo = m + 1;
    }
}

/* Index in a[0, n) (after partitioning) of the first id, in rank order,
 * whose inclusive running mass exceeds target (>= when inclusive_eq);
 * n - 1 holds the lowest-ranked id if rounding runs past the end. */
static int64_t sel_mass(int32_t *a, int64_t n, double target, int eq,
                        const float *p)
{
    uint64_t rng = (uint64_t)n * 31 + 7;
    int64_t lo = 0, hi = n;
    double acc = 0.0;
    while (hi - lo > 0) {
        int64_t m = sel_partition(a, lo, hi, p, &rng);
        double g = 0.0;
        for (int64_t j = lo; j < m; j++) g += p[a[j]];
        double with = acc + g + p[a[m]];
        if (m > lo && (eq ? acc + g >= target : acc + g > target)) {
            hi = m;
        } else if (eq ? with >= target : with > target) {
            return m;
        } else {
            acc = with;
            lo = m + 1;
        }
    }
    /* ran past the end: the lowest-ranked id, now somewhere in a[0, n) */
    int64_t last = 0;
    for (int64_t j = 1; j < n; j++) if (before(p, a[last], a[j])) last = j;
    return last;
}

/* The random sampler of backend.h over probabilities p. */
static int sample_random(float *p, int32_t vocab, const pie_sampler *s,
                         int32_t *token)
{
    int32_t *a = malloc(sizeof *a * (size_t)vocab);
    if (!a) return pie_err_set(PIE_ENOMEM, "sampler: out of memory");
    int64_t n = 0;
    for (int32_t i = 0; i < vocab; i++)
        if (p[i] > 0.0f) a[n++] = i;
    if (n == 0)
        for (int32_t i = 0; i < vocab; i++) a[n++] = i;
    if (s->top_k > 0 && s->top_k < n) {
        sel_top_k(a, n, s->top_k, p);
        n = s->top_k;
    }
    if (s->top_p < 1.0f)
        n = sel_mass(a, n, s->top_p, 1, p) + 1;
    if (s->min_p > 0.0f) {
        /* the most probable id always stays (min_p > 1, which validation
         * refuses, would otherwise filter out everything) */
        int32_t best = a[0];
        for (int64_t j = 1; j < n; j++) if (before(p, a[j], best)) best = a[j];
        float floor_p = s->min_p * p[best];
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (a[j] == best || p[a[j]] >= floor_p) a[m++] = a[j];
        n = m;
    }
    double mass = 0.0;
    for (int64_t j = 0; j < n; j++) mass += p[a[j]];
    double target = (double)pie_sample_uniform(s->seed) * mass;
    *token = a[sel_mass(a, n, target, 0, p)];
    free(a);
    return 0;
}

static int cmp_rank(const void *x, const void *y, void *p)
{
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return before(p, a, b) ? -1 : before(p, b, a) ? 1 : 0;
}

static int probe_topk(float *logits, int32_t vocab, const pie_sampler *s,
                      float *values, int32_t *ids)
{
    softmax_inplace(logits, vocab, s->temperature > 0 ? s->temperature : 1.0f);
    int32_t *a = malloc(sizeof *a * (size_t)vocab);
    if (!a) return pie_err_set(PIE_ENOMEM, "sampler: out of memory");
    for (int32_t i = 0; i < vocab; i++) a[i] = i;
    sel_top_k(a, vocab, s->top_k, logits);
    qsort_r(a, (size_t)s->top_k, sizeof *a, cmp_rank, logits);
    for (int32_t j = 0; j < s->top_k; j++) {
        ids[j] = a[j];
        values[j] = logits[a[j]];
    }
    free(a);
    return 0;
}

static void probe_logprobs(float *logits, int32_t vocab, const pie_sampler *s,
                           float *values)
{
    float mx = logits[argmax(logits, vocab)];
    double sum = 0.0;
    for (int32_t i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    for (int32_t i = 0; i < s->n_ids; i++)
        values[i] = (float)((double)logits[s->ids[i]] - lse);
}

static float probe_entropy(float *logits, int32_t vocab)
{
    float mx = logits[argmax(logits, vocab)];
    double sum = 0.0, sx = 0.0;
    for (int32_t i = 0; i < vocab; i++) {
        if (logits[i] == -INFINITY) continue;
        double d = (double)logits[i] - mx, e = exp(d);
        sum += e;
        sx += e * d;
    }
    /* H = log Z - E[d] with d = logit - max, Z = sum exp(d). */
    return (float)(log(sum) - sx / sum);
}

int pie_sample_row(float *logits, int32_t vocab, const pie_sampler *s,
                   const uint32_t *mask_runs, uint32_t n_mask_runs,
                   int32_t *token, float *values, int32_t *ids)
{
    if (vocab < 1) return pie_err_set(PIE_EINVAL, "sampler: vocab %d", vocab);
    if (mask_runs || n_mask_runs) apply_mask(logits, vocab, mask_runs,
                                             n_mask_runs);
    *token = -1;
    switch (s->kind) {
    case PIE_SAMPLER_GREEDY:
        *token = argmax(logits, vocab);
        return 0;
    case PIE_SAMPLER_RANDOM:
        if (!(s->temperature > 0.0f)) {
            *token = argmax(logits, vocab);
            return 0;
        }
        softmax_inplace(logits, vocab, s->temperature);
        return sample_random(logits, vocab, s, token);
    case PIE_PROBE_TOPK:
        if (s->top_k < 1 || s->top_k > vocab)
            return pie_err_set(PIE_ERANGE, "sampler: TOPK k = %d", s->top_k);
        return probe_topk(logits, vocab, s, values, ids);
    case PIE_PROBE_LOGITS:
        memcpy(values, logits, sizeof *values * (size_t)vocab);
        return 0;
    case PIE_PROBE_LOGPROBS:
        probe_logprobs(logits, vocab, s, values);
        return 0;
    case PIE_PROBE_ENTROPY:
        values[0] = probe_entropy(logits, vocab);
        return 0;
    default:
        return pie_err_set(PIE_EINVAL, "sampler: unknown kind %d", s->kind);
    }
}
