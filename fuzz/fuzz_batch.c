/*
 * fuzz_batch.c — libFuzzer harness for the batched forward: the bytes
 * become one pie_forward_batch (batch_decode.h: up to 4 requests over a
 * pool of 16 pages of 4 slots, masks, up to 6 output rows with any sampler
 * or probe, logit masks; every field free to be wrong), run through
 * pie_forward_out_alloc and the CPU backend's forward on the random:tiny
 * model (vocab 256). A refusal must be one of the documented codes; an
 * accepted forward must give outputs within their contracts (a sampled
 * token in the vocabulary and allowed by its logit mask, log-probs <= 0,
 * an entropy in [0, log vocab]). A violation traps, so the fuzzer reports
 * it. The backend lives across inputs, as a server's does: nothing an input
 * leaves in the KV pages may break a later one.
 */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "fuzz/batch_decode.h"
#include "model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Whether token v is allowed by runs[0..n) (disallowed run first). */
static int allowed(const uint32_t *runs, uint32_t n, int32_t v)
{
    int64_t at = 0;
    for (uint32_t i = 0; i < n; i++) {
        at += runs[i];
        if (v < at) return (int)(i & 1);
    }
    return 0;
}

/* An accepted forward's outputs within their contracts. */
static void check_outputs(const pie_forward_batch *b, const pie_forward_out *o,
                          int32_t V)
{
    for (int r = 0; r < b->n_outputs; r++) {
        const pie_sampler *s = &b->samplers[r];
        int32_t t = o->tokens[r];
        const float *v = o->values + o->value_indptr[r];
        uint32_t nv = o->value_indptr[r + 1] - o->value_indptr[r];
        if (s->kind == PIE_SAMPLER_GREEDY || s->kind == PIE_SAMPLER_RANDOM) {
            if (t < 0 || t >= V) __builtin_trap();
            if (b->logit_mask_indptr &&
                !allowed(b->logit_mask_runs + b->logit_mask_indptr[r],
                         b->logit_mask_indptr[r + 1] - b->logit_mask_indptr[r], t))
                __builtin_trap();
        }
        if (s->kind == PIE_PROBE_LOGPROBS)
            for (uint32_t k = 0; k < nv; k++)
                if (v[k] > 1e-4f || isnan(v[k])) __builtin_trap();
        if (s->kind == PIE_PROBE_ENTROPY &&
            (nv != 1 || !(v[0] >= -1e-3f && v[0] <= logf((float)V) + 1e-3f)))
            __builtin_trap();
        if (s->kind == PIE_PROBE_TOPK)
            for (uint32_t k = 0; k < nv; k++)
                if (o->ids[o->value_indptr[r] + k] < 0 ||
                    o->ids[o->value_indptr[r] + k] >= V)
                    __builtin_trap();
    }
}

static pie_backend *backend(void)
{
    static pie_backend *b;
    static pie_model *m;
    if (b) return b;
    pie_backend_opts o = { .page_size = PS, .n_pages = NPAGES, .n_threads = 1 };
    if (pie_model_load("random:tiny", NULL, NULL, &m) ||
        pie_backend_cpu_create(m, &o, &b))
        abort();
    return b;
}

/* FUZZ_BATCH_STATS=1: how many inputs each outcome took, at exit (an
 * input the fuzzer keeps only refused tells little). */
static long n_run, n_ok, n_refused;

static void print_stats(void)
{
    fprintf(stderr, "fuzz_batch: %ld inputs, %ld forwards ran, %ld refused\n",
            n_run, n_ok, n_refused);
}

static int known(int rc)
{
    return rc == PIE_EINVAL || rc == PIE_ERANGE || rc == PIE_ENOMEM ||
           rc == PIE_ELIMIT;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int stats;
    if (!stats++ && getenv("FUZZ_BATCH_STATS")) atexit(print_stats);
    pie_backend *be = backend();
    n_run++;
    int32_t V = be->cfg->vocab_size;
    fb *f = calloc(1, sizeof *f);
    if (!f) return 0;
    pie_forward_batch b;
    batch_decode(data, size, f, &b);
    pie_forward_out out;
    int rc = pie_forward_out_alloc(&b, V, &out);
    if (rc == 0) {
        rc = pie_backend_forward(be, &b, &out);
        if (rc == 0) check_outputs(&b, &out, V), n_ok++;
        else if (!known(rc)) __builtin_trap();
        else n_refused++;
        pie_forward_out_free(&out);
    }
    free(f);
    return 0;
}
