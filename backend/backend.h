/*
 * backend.h — the one interface every compute backend implements.
 *
 * A backend owns the model's weights in its own format and a pool of KV
 * pages. One call, pie_backend_forward(), runs a batched forward over any
 * number of requests described in CSR form (the FlashInfer layout):
 *
 *   request r owns new tokens  token_ids[qo_indptr[r] .. qo_indptr[r+1])
 *             with positions   positions[same range]   (explicit RoPE
 *                                                        positions; may skip
 *                                                        or repeat)
 *             and KV pages     kv_page_indices[kv_page_indptr[r] ..
 *                                              kv_page_indptr[r+1])  in order
 *             last page fill   kv_last_page_len[r]  (1..page_size)
 *
 *   kv_len(r) = (n_pages(r) - 1) * page_size + kv_last_page_len[r] counts
 *   the request's KV slots INCLUDING its new tokens: the n_new = qo_len(r)
 *   new tokens are written into slots [kv_len - n_new, kv_len), in order,
 *   before attention runs. Slot s lives in page kv_page_indices[..+s/ps] at
 *   offset s % ps.
 *
 * Attention: new token i of request r sits in slot s_i = kv_len - n_new + i.
 * Without a mask it attends to slots [0, s_i] (causal). With a mask
 * (mask_indptr != NULL), token t's mask is the run-length list
 * mask_runs[mask_indptr[t] .. mask_indptr[t+1]): run lengths that alternate
 * 0,1,0,1,... starting with a run of NOT-attended slots (which may be 0
 * long); slots past the runs' sum are not attended; a sum > kv_len is an
 * error. A token that attends to nothing gets a zero attention output.
 *
 * Outputs: n_outputs rows, row o taken at token output_token_idx[o] (global
 * token index), processed by samplers[o]. A logit mask (optional,
 * logit_mask_indptr != NULL) uses the same run-length form over the vocab,
 * 1 = allowed; it is applied before any sampler or probe. A row whose mask
 * allows no id (or covers more than vocab_size ids) is an error.
 *
 * Sampling is specified exactly so backends agree (up to float rounding):
 *   greedy:  argmax, lowest id on ties.
 *   random:  p = softmax(logits / temperature); keep the top_k largest
 *            (top_k <= 0: all), then the smallest descending prefix whose
 *            mass >= top_p (mass under p, not renormalized after top_k;
 *            top_p >= 1: all), then those with
 *            p >= min_p * p_max (min_p in [0, 1]; the most probable id is
 *            always kept); u = pie_sample_uniform(seed) in [0,1);
 *            walking the kept tokens in descending p order (ties: lower id
 *            first), return the first whose cumulative mass > u * kept mass.
 *   temperature <= 0 in a random sampler means greedy.
 * Probes (values written to out->values at out->value_indptr[o]):
 *   TOPK      k probabilities (softmax at temperature, 1 if <= 0) descending,
 *             their ids in out->ids at the same offsets
 *   LOGITS    vocab_size raw logits (after the logit mask: -inf outside)
 *   LOGPROBS  log-softmax of the n_ids given ids
 *   ENTROPY   one value, -sum p log p (natural log)
 *
 * Errors: every index is validated (token ids < vocab, page ids < n_pages,
 * indptr monotone, output indices in range, fills in 1..page_size,
 * positions >= 0, no KV slot written by two new tokens, TOPK k in
 * 1..vocab; a random sampler's temperature finite, top_p not NaN nor
 * negative, min_p in [0, 1]); a bad batch returns PIE_EINVAL / PIE_ERANGE
 * with a message and changes nothing.
 */
#ifndef PIE_BACKEND_H
#define PIE_BACKEND_H

#include <stdint.h>

#include "model/model.h"

typedef enum pie_sampler_kind {
    PIE_SAMPLER_GREEDY = 0,
    PIE_SAMPLER_RANDOM,        /* temperature, top_k, top_p, min_p, seed  */
    PIE_PROBE_TOPK,            /* top_k, temperature                      */
    PIE_PROBE_LOGITS,
    PIE_PROBE_LOGPROBS,        /* ids, n_ids                              */
    PIE_PROBE_ENTROPY,
} pie_sampler_kind;

typedef struct pie_sampler {
    int32_t        kind;         /* pie_sampler_kind                        */
    float          temperature;
    int32_t        top_k;
    float          top_p;
    float          min_p;
    uint64_t       seed;
    const int32_t *ids;          /* LOGPROBS: the ids to score              */
    int32_t        n_ids;
} pie_sampler;

typedef struct pie_forward_batch {
    int32_t         n_tokens;
    int32_t         n_reqs;
    const int32_t  *token_ids;         /* (n_tokens)                        */
    const int32_t  *positions;         /* (n_tokens)                        */
    const int32_t  *qo_indptr;         /* (n_reqs+1)                        */
    const int32_t  *kv_page_indices;   /* (kv_page_indptr[n_reqs])          */
    const int32_t  *kv_page_indptr;    /* (n_reqs+1)                        */
    const int32_t  *kv_last_page_len;  /* (n_reqs)                          */
    const uint32_t *mask_indptr;       /* (n_tokens+1) or NULL = causal     */
    const uint32_t *mask_runs;         /* run lengths, see above            */
    int32_t         n_outputs;
    const int32_t  *output_token_idx;  /* (n_outputs) global token index    */
    const pie_sampler *samplers;       /* (n_outputs)                       */
    const uint32_t *logit_mask_indptr; /* (n_outputs+1) or NULL             */
    const uint32_t *logit_mask_runs;
} pie_forward_batch;

typedef struct pie_forward_out {
    int32_t  *tokens;        /* (n_outputs) sampled id; -1 for probe rows   */
    uint32_t *value_indptr;  /* (n_outputs+1) offsets into values/ids       */
    float    *values;        /* probe values                                */
    int32_t  *ids;           /* probe ids (TOPK), same offsets as values    */
} pie_forward_out;

typedef struct pie_backend_opts {
    int32_t page_size;       /* tokens per KV page (default 16)             */
    int32_t n_pages;         /* pool size; 0 = from mem_fraction            */
    int32_t n_threads;       /* CPU threads; 0 = all cores                  */
    double  mem_fraction;    /* GPU: fraction of free memory for KV         */
    int32_t device;          /* GPU ordinal                                 */
} pie_backend_opts;

typedef struct pie_backend pie_backend;

typedef struct pie_backend_ops {
    int  (*forward)(pie_backend *b, const pie_forward_batch *batch,
                    pie_forward_out *out);
    /* Copies n token slots (every layer, K and V) from page src at offset
     * src_off to page dst at dst_off. */
    int  (*copy_slots)(pie_backend *b, int32_t src, int32_t src_off,
                       int32_t dst, int32_t dst_off, int32_t n);
    /* Moves whole pages between the pool and host memory (page_bytes each). */
    int  (*download)(pie_backend *b, const int32_t *pages, int32_t n, void *host);
    int  (*upload)(pie_backend *b, const int32_t *pages, int32_t n,
                   const void *host);
    void (*destroy)(pie_backend *b);
} pie_backend_ops;

struct pie_backend {
    const pie_backend_ops  *ops;
    const pie_model_config *cfg;
    const char             *name;        /* "cpu" | "cuda"                   */
    int32_t                 page_size;
    int32_t                 n_pages;
    uint64_t                page_bytes;  /* host bytes of one page            */
    int32_t                 max_tokens;  /* tokens one forward takes at most  */
                                         /* (0: no limit of the backend's)   */
};

int  pie_backend_cpu_create(const pie_model *m, const pie_backend_opts *o,
                            pie_backend **out);
/* Returns PIE_EUNSUPPORTED when built without CUDA or no GPU is present. */
int  pie_backend_cuda_create(const pie_model *m, const pie_backend_opts *o,
                             pie_backend **out);
int  pie_backend_cuda_available(void);
/* CUDA graph counters of a CUDA backend (steps whose layers were captured /
 * replayed from a graph); both 0 for other backends or without CUDA. */
void pie_backend_cuda_graphs(const pie_backend *b, int64_t *captured,
                             int64_t *replayed);
/* Matmuls a CUDA backend ran with gemv.cu (launched or captured into a
 * graph) instead of cuBLASLt; 0 for other backends or without CUDA. */
int64_t pie_backend_cuda_gemv_calls(const pie_backend *b);
/* The same for wgmm.cu (decode matmuls of 17..256 rows). */
int64_t pie_backend_cuda_wgmm_calls(const pie_backend *b);
/* Decode steps a CUDA backend ran as one kernel (batch 1: mega.cu); 0 for
 * other backends or without CUDA. */
int64_t pie_backend_cuda_mega_steps(const pie_backend *b);
/* Steps a CUDA backend ran again, re-planned without clusters, after a
 * refused cluster launch; 0 for other backends or without CUDA. */
int64_t pie_backend_cuda_replans(const pie_backend *b);

static inline int pie_backend_forward(pie_backend *b,
                                      const pie_forward_batch *batch,
                                      pie_forward_out *out)
{
    return b->ops->forward(b, batch, out);
}
static inline void pie_backend_free(pie_backend *b)
{
    if (b) b->ops->destroy(b);
}

/* Shared helpers (backend/batch.c) */
/* Checks every index of a batch; returns 0 or PIE_EINVAL with a message. */
int  pie_batch_validate(const pie_forward_batch *b, int32_t vocab,
                        int32_t page_size, int32_t n_pages);
/* Checks output row o's sampler and logit mask (lm_runs[0..n_lm_runs);
 * n_lm_runs < 0: no mask) by the rules pie_batch_validate applies to every
 * row; 0 or PIE_EINVAL / PIE_ERANGE with a message naming row o. */
int  pie_batch_validate_row(const pie_sampler *s, const uint32_t *lm_runs,
                            int64_t n_lm_runs, int32_t o, int32_t vocab);
/* Probe values a sampler writes: top_k for TOPK, vocab for LOGITS, n_ids
 * for LOGPROBS, 1 for ENTROPY, none for the samplers. */
int32_t pie_sampler_values(const pie_sampler *s, int32_t vocab);
/* Allocates out's arrays sized for batch (values per sampler kind). */
int  pie_forward_out_alloc(const pie_forward_batch *b, int32_t vocab,
                           pie_forward_out *out);
/* Checks that out's arrays are there and its value_indptr gives every row
 * the values its sampler writes, in row order from 0 (as
 * pie_forward_out_alloc sizes them); 0 or PIE_EINVAL with a message. */
int  pie_forward_out_check(const pie_forward_batch *b, int32_t vocab,
                           const pie_forward_out *out);
void pie_forward_out_free(pie_forward_out *out);
/* Deterministic uniform in [0,1) from a seed (splitmix64, 24 bits). */
float pie_sample_uniform(uint64_t seed);
/* Reference sampler/probe over one row of float logits (in place: the row
 * is modified). Used by the CPU backend and as the GPU's test reference.
 * Writes token (or -1) and values/ids for probes. */
int  pie_sample_row(float *logits, int32_t vocab, const pie_sampler *s,
                    const uint32_t *mask_runs, uint32_t n_mask_runs,
                    int32_t *token, float *values, int32_t *ids);

#endif
