/* mock_host.h — state of the deterministic host stand-in (mock_host.c). */
#ifndef PIE_TEST_MOCK_HOST_H
#define PIE_TEST_MOCK_HOST_H

#include <stdint.h>

#include "pie.h"

#define MOCK_PS        4
#define MOCK_MAX_PAGES 4096
#define MOCK_MAX_FWD   1024
#define MOCK_MAX_SLOTS 4096
#define MOCK_MAX_TOK   512

typedef struct mock_page {
    int     used, refs, ro;
    int32_t tok[MOCK_PS], pos[MOCK_PS];
} mock_page;

typedef struct mock_fwd {
    int      used, submitted, done, has_out, out_idx, kind, n, n_pages, last;
    int32_t  status, out_tok, top_k;
    uint32_t hash;
    uint64_t seed;
    int32_t  tok[MOCK_MAX_TOK], pos[MOCK_MAX_TOK], from[MOCK_MAX_TOK];
    int32_t  pages[MOCK_MAX_TOK];
} mock_fwd;

typedef struct mock_export {
    char name[64];
    int  n;
    int32_t pages[256];
} mock_export;

typedef struct mock_state {
    mock_page   page[MOCK_MAX_PAGES];
    mock_fwd    fwd[MOCK_MAX_FWD];
    mock_export exp[64];
    int         n_exp, pages_live, allocs, copies, submits, chained, cancels;
    int         fail_alloc_at;      /* the n-th kv_alloc call fails (0: never) */
    int         fail_alloc_rc;      /* ... with this code (0: PIE_EBUSY)       */
    int         alloc_calls;
    int         eos_every;          /* logits hash % eos_every == 0 -> EOS */
    int         bad_tok_at;         /* the n-th read_tokens call returns an
                                       id outside the vocab (0: never)      */
    int         read_calls;
    int         fail_detok_at;      /* the n-th detokenize call fails      */
    int         detok_calls;
    int         eager;              /* run each forward at submit (a fast
                                       host: queued steps complete before
                                       a cancel reaches them)               */
    int         bad_model;          /* model_open gives vocab 0            */
    int         models_open;        /* opened minus closed handles         */
    long        tokens_forwarded, wait_any_calls;
    char        sent[65536];
    uint32_t    sent_len;
} mock_state;

extern mock_state mock;

uint32_t mock_hash(const int32_t *tok, const int32_t *pos, int n);
int32_t  mock_next(uint32_t h, int kind, uint64_t seed);
void     mock_run(int32_t h);

#endif
