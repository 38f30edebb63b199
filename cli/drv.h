/*
 * drv.h — a minimal direct driver over one backend, for the CLI's
 * `pie generate` and `pie bench forward`: sequences that own KV pages from a
 * bump/free-list allocator and advance together in one batched forward.
 *
 * A pie_drv_seq holds its ordered page list and kv_len (slots filled). Each
 * step appends n new tokens to some sequences (positions kv_len, kv_len+1,
 * ...) and samples one output row per sequence at its last new token.
 * The control layer (control/) replaces this for inferlets; the CLI keeps
 * it so that `bench forward` measures the backend alone.
 */
#ifndef PIE_CLI_DRV_H
#define PIE_CLI_DRV_H

#include "backend/backend.h"

typedef struct pie_drv_seq {
    int32_t *pages;     /* (n_pages) physical page ids, in order           */
    int32_t  n_pages;
    int32_t  cap;
    int32_t  kv_len;    /* slots filled                                    */
} pie_drv_seq;

typedef struct pie_drv {
    pie_backend *b;
    int32_t     *free_pages;  /* stack of free page ids                    */
    int32_t      n_free;
} pie_drv;

int  pie_drv_init(pie_drv *d, pie_backend *b);
void pie_drv_free(pie_drv *d);
void pie_drv_seq_release(pie_drv *d, pie_drv_seq *s);

/*
 * One batched forward: sequence i appends n_new[i] tokens taken
 * consecutively from tokens[], and samples one row (sampler[i]) at its last
 * new token into out_tokens[i]. Returns 0 or a negative PIE_E code.
 */
int  pie_drv_step(pie_drv *d, pie_drv_seq **seqs, int32_t n_seqs,
                  const int32_t *tokens, const int32_t *n_new,
                  const pie_sampler *samplers, int32_t *out_tokens);

/* Tokens one forward may take with --chunk `chunk`: chunk (0: no cap of
 * its own), at most the backend's max_tokens (8192 on the GPU) and
 * `none` where neither caps it. */
int32_t pie_drv_cap(const pie_drv *d, int32_t chunk, int32_t none);

/* Feeds seq the tokens at *in in forwards of cap tokens while more than
 * cap remain (their samples dropped), advancing *in and *n past them and
 * counting the forwards in *fwd: the at most cap tokens left go in the
 * caller's next step, which samples. Returns 0 or a negative PIE_E code. */
int  pie_drv_feed_head(pie_drv *d, pie_drv_seq *seq, const int32_t **in,
                       int32_t *n, int32_t cap, const pie_sampler *s,
                       long *fwd);

#endif
