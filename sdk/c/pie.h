/*
 * pie.h — the C SDK for inferlets: a thin library over the raw API
 * (pie_api.h) that every bundled inferlet is written with.
 *
 * Pieces:
 *   pie_lm    an opened model and its facts (vocab, page size, BOS, EOS ids)
 *             plus text <-> ids helpers.
 *   pie_ctx   a context: the token history of one sequence and the KV pages
 *             that hold it. tokens[0..n_kv) have their KV written (or queued:
 *             forwards are ordered per page, so queued is as good as written);
 *             tokens[n_kv..n_tokens) are pending and go into the next
 *             forward. Token i sits at position i. kv_len counts the slots in
 *             pages (equal to n_kv unless pages were dropped, as attention-sink
 *             does). Pages may be shared between contexts (fork, import): a
 *             per-instance reference count decides when a handle is freed,
 *             and a shared or read-only partial last page is copied
 *             (kv_copy) before the context writes into it.
 *   pie_gen   one generation: sampler, stop conditions, streamed text. By
 *             default it queues `lookahead` decode forwards ahead, each taking
 *             its input from the previous one's sampled row (chained
 *             forwards), and cancels the queued rest at a stop. Several
 *             pie_gen run concurrently with pie_gen_run().
 *   chat      prompt templates: Llama 3, ChatML, Llama 2, none.
 *   args      a tiny --name VALUE parser for main(argc, argv).
 *
 * Functions return 0 (or a count) on success and a negative PIE_E* code on
 * failure; pie_sdk_error() holds a message for the last failure.
 */
#ifndef PIE_SDK_H
#define PIE_SDK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pie_api.h"

#define PIE_SDK_MAX_EOS 16

const char *pie_sdk_error(void);
/* Records a printf-style message and returns code (for `return fail(...)`). */
int pie_sdk_fail(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- models --------------------------------------------------------------- */

typedef struct pie_lm {
    int32_t h;                       /* model handle                        */
    int32_t vocab, page_size, bos;   /* bos: -1 when the model has none     */
    int32_t n_eos;
    int32_t eos[PIE_SDK_MAX_EOS];    /* EOS ids (+ chat end-of-turn ids)    */
    char    name[128];
} pie_lm;

/* Opens a served model by name (NULL or "": the default one). */
int  pie_lm_open(pie_lm *m, const char *name);
void pie_lm_close(pie_lm *m);
bool pie_lm_is_eos(const pie_lm *m, int32_t id);
/* Adds id to the EOS set (e.g. a chat end-of-turn token). */
void pie_lm_add_eos(pie_lm *m, int32_t id);
/* Encodes text; *ids is malloc'ed (caller frees). Returns the count. */
int  pie_lm_encode(const pie_lm *m, const char *text, size_t len,
                   bool add_special, int32_t **ids);
/* Decodes ids into a malloc'ed NUL-terminated string (caller frees);
 * returns its length. */
int  pie_lm_decode(const pie_lm *m, const int32_t *ids, int32_t n,
                   bool skip_special, char **text);

/* ---- contexts ------------------------------------------------------------- */

typedef struct pie_ctx {
    pie_lm  *lm;
    int32_t *tokens;                 /* (cap_tokens) history                */
    int32_t  n_tokens, cap_tokens;
    int32_t  n_kv;                   /* history tokens whose KV is queued   */
    int32_t *pages;                  /* (cap_pages) handles, in order       */
    int32_t  n_pages, cap_pages;
    int32_t  kv_len;                 /* slots used in pages                 */
} pie_ctx;

void pie_ctx_init(pie_ctx *c, pie_lm *m);
/* Drops the context's pages (freed when no other context shares them). */
void pie_ctx_release(pie_ctx *c);
/* Appends ids / the encoding of text to the pending tokens. add_special
 * adds BOS (use it for the first fill of a plain prompt). */
int  pie_ctx_fill_ids(pie_ctx *c, const int32_t *ids, int32_t n);
int  pie_ctx_fill(pie_ctx *c, const char *text, bool add_special);
/* Forwards all pending tokens except the last (which stays pending so a
 * later generate has logits to start from) and waits for it. */
int  pie_ctx_flush(pie_ctx *c);
/* A new context with the same history; full pages are shared, the partial
 * last page is copied when either side next writes into it. Flushes c. */
int  pie_ctx_fork(pie_ctx *c, pie_ctx *child);
/* Exports c's pages under name (flushes first; the pages become read-only,
 * so c copies its partial page before writing again). */
int  pie_ctx_export(pie_ctx *c, const char *name);
/* A context made from an export (read-only pages) and the history they
 * hold plus any pending tail: tokens[0..n) where the export holds the KV of
 * the first n_kv of them. */
int  pie_ctx_import(pie_ctx *c, pie_lm *m, const char *name,
                    const int32_t *tokens, int32_t n, int32_t n_kv);
/* Drops the page at index i of the page list (attention-sink). The tokens
 * it held stay in the history but leave the attention window. */
int  pie_ctx_drop_page(pie_ctx *c, int32_t i);
/* Makes room for one more slot: allocates a page or copies a shared
 * partial page. Used by forward builders; returns 0 or an error. */
int  pie__ctx_reserve(pie_ctx *c, int32_t n);
/* Frees pages past kv_len (after a rollback). */
void pie__ctx_trim(pie_ctx *c);
/* Sets the builder's pages from c. */
int  pie__ctx_set_pages(pie_ctx *c, int32_t fwd);

/* One output row of a forward: the sampler or probe (backend.h kinds). */
typedef struct pie_out {
    int32_t  kind;                   /* PIE_SAMPLER_* / PIE_PROBE_*         */
    float    temperature, top_p, min_p;
    int32_t  top_k;
    uint64_t seed;
} pie_out;

/* Forwards every pending token with one output row at the last; returns the
 * future (caller waits, reads and frees it). Pending tokens become n_kv. */
int32_t pie_ctx_submit(pie_ctx *c, const pie_out *o);
/* Top-k next-token distribution after the history: forwards the pending
 * tokens and waits. Writes up to k (prob, id) pairs; returns the count. */
int  pie_ctx_next_topk(pie_ctx *c, int32_t k, float *probs, int32_t *ids);

/* ---- generation ----------------------------------------------------------- */

/* Ranges are checked by pie_gen_start (PIE_EINVAL outside them). */
typedef struct pie_sampling {
    float    temperature;            /* finite, >= 0; 0: greedy             */
    int32_t  top_k;                  /* >= 0; 0: all                        */
    float    top_p;                  /* (0, 1]; 1: all (0 is taken as 1)    */
    float    min_p;                  /* [0, 1]: keep p >= min_p * p_max     */
    uint64_t seed;                   /* step i samples with seed + i        */
} pie_sampling;

typedef void (*pie_text_fn)(void *user, const char *text, size_t len);

typedef struct pie_gen_opts {
    pie_sampling s;
    int32_t      max_tokens;         /* 0: until a stop (capped at 1<<20)   */
    const char *const *stop;         /* stop strings (not emitted)          */
    int32_t      n_stop;
    bool         ignore_eos;
    int32_t      lookahead;          /* decode steps queued (0: 4; 1: none) */
    pie_text_fn  on_text;            /* streamed text; NULL: no streaming   */
    void        *user;
    bool         no_text;            /* ids only: no detokenizing, no stop
                                        strings (models without tokenizer) */
} pie_gen_opts;

enum { PIE_GEN_LOOKAHEAD_MAX = 16 };

typedef enum {
    PIE_STOP_NONE = 0, PIE_STOP_EOS, PIE_STOP_STRING, PIE_STOP_MAX,
    PIE_STOP_ERROR,
} pie_stop_reason;

typedef struct pie_gen {
    pie_ctx     *ctx;
    pie_gen_opts o;
    int32_t     *ids;                /* generated ids (EOS included)        */
    int32_t      n_ids, cap_ids;
    char        *text;               /* generated text, stop string cut     */
    size_t       text_len, text_cap, emitted;
    int32_t      q[PIE_GEN_LOOKAHEAD_MAX]; /* queued futures, oldest first  */
    int32_t      nq;
    int32_t      n_submitted;        /* decode forwards submitted           */
    int32_t      kv0, slot0;         /* ctx n_kv / kv_len before the queue  */
    int32_t      n_done;             /* forwards completed successfully     */
    int32_t      dt_win;             /* history index where decoding window
                                        starts; dt_out bytes of it emitted  */
    size_t       dt_out;
    pie_stop_reason stop;
    int          err;
} pie_gen;

/* Prepares g to continue ctx (which must have >= 1 pending token).
 * PIE_EINVAL for sampling parameters out of range (see pie_sampling). */
int  pie_gen_start(pie_gen *g, pie_ctx *ctx, const pie_gen_opts *o);
/* Waits for the next token and processes it; 1 while running, 0 when
 * stopped, < 0 on error. Any error ends the generation at once: stop =
 * PIE_STOP_ERROR, err = the code, queued forwards cancelled and freed, ctx
 * rolled back to the ids in g->ids with its last token pending (as at a
 * stop); pie_gen_start failing leaves g stopped the same way. */
int  pie_gen_step(pie_gen *g);
/* Drives n generations concurrently until all stop; 0 or the first error
 * (a generation that fails stops; the others go on). */
int  pie_gen_run(pie_gen *gs, int32_t n);
void pie_gen_free(pie_gen *g);
/* One generation start to stop (pie_gen_start + pie_gen_run). */
int  pie_generate(pie_ctx *ctx, const pie_gen_opts *o, pie_gen *g);
/* send()s {"ids":[...],"text":"..."<more>} and a newline: g's ids and text,
 * then more (further members, each after a comma; NULL: none). */
int  pie_send_gen_json(const pie_gen *g, const char *more);
/* on_text callback that send()s each piece to the client. */
void pie_text_send(void *user, const char *text, size_t len);
/* on_text callback that writes each piece to stdout (fwrite). */
void pie_text_stdout(void *user, const char *text, size_t len);

/* ---- chat templates ------------------------------------------------------- */

typedef enum {
    PIE_CHAT_NONE = 0,               /* plain text, BOS added               */
    PIE_CHAT_LLAMA3,
    PIE_CHAT_CHATML,
    PIE_CHAT_LLAMA2,
} pie_chat_fmt;

/* The model's format, from its special tokens (NONE without any). */
pie_chat_fmt pie_chat_detect(const pie_lm *m);
/* Parses "none", "llama3", "chatml", "llama2"; -1 if unknown. */
int  pie_chat_parse(const char *name);
/* A malloc'ed prompt: system (may be NULL) and user turn, ending with the
 * assistant header. NONE returns the user text alone. */
char *pie_chat_prompt(pie_chat_fmt f, const char *system, const char *user);
/* Adds the format's end-of-turn tokens to m's EOS set. */
void pie_chat_add_stops(pie_chat_fmt f, pie_lm *m);
/* Fills c with the chat prompt (BOS as the format needs). */
int  pie_chat_fill(pie_ctx *c, pie_chat_fmt f, const char *system,
                   const char *user);

/* ---- arguments ------------------------------------------------------------ */

typedef enum { PIE_ARG_STR, PIE_ARG_INT, PIE_ARG_FLOAT, PIE_ARG_U64,
               PIE_ARG_FLAG } pie_arg_type;

typedef struct pie_arg {
    const char  *name;               /* "max-tokens" for --max-tokens       */
    pie_arg_type type;
    void        *ptr;                /* const char **, int32_t *, float *,
                                        uint64_t *, bool *                  */
    const char  *help;
} pie_arg;

/* Parses argv[1..argc) against args ({0}-terminated). --help prints usage
 * to stdout and returns 1; an error prints to stderr and returns -1. */
int  pie_args_parse(int argc, char **argv, const pie_arg *args,
                    const char *about);

/* ---- small helpers -------------------------------------------------------- */

/* Waits for fut, frees it and returns its status. */
int32_t pie_wait_free(int32_t fut);
/* send() a NUL-terminated string. */
int  pie_send_str(const char *s);
/* Appends s as a JSON string literal to a growing buffer. */
int  pie_json_str(char **buf, size_t *len, size_t *cap, const char *s,
                  size_t n);
int  pie_buf_append(char **buf, size_t *len, size_t *cap, const char *s,
                    size_t n);
/* Appends "ids":[n ids],"text":"text" (text_len bytes; NULL: empty), the
 * members a generation's JSON reply starts with. */
int  pie_json_ids_text(char **buf, size_t *len, size_t *cap,
                       const int32_t *ids, int32_t n, const char *text,
                       size_t text_len);

#endif
