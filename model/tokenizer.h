/*
 * tokenizer.h — Hugging Face tokenizer.json tokenizers.
 *
 * Supports the two BPE families pie's models use:
 *   byte-level BPE   (GPT-2 / Llama 3 / Qwen): pre-tokenizer split regex run
 *                    through PCRE2 (UTF + UCP), bytes mapped to the GPT-2
 *                    unicode alphabet, optional NFC normalizer.
 *   SentencePiece-   (Llama 2 / stories260K): Prepend("▁") + Replace(" ","▁")
 *   style BPE        normalizers, byte fallback (<0xAB> tokens).
 * Added/special tokens are matched inside the text before the model runs, as
 * the `tokenizers` library does.
 */
#ifndef PIE_TOKENIZER_H
#define PIE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pie_tokenizer pie_tokenizer;

/* Loads dir/tokenizer.json (+ dir/tokenizer_config.json when present). */
int  pie_tokenizer_load(const char *dir, pie_tokenizer **out);
/* Loads from tokenizer.json text (tokenizer_config may be NULL). */
int  pie_tokenizer_load_json(const char *tokenizer_json, size_t len,
                             const char *tokenizer_config_json, size_t cfg_len,
                             pie_tokenizer **out);
void pie_tokenizer_free(pie_tokenizer *t);

/*
 * Encodes text (len bytes of UTF-8). With add_special, the post-processor's
 * tokens are added the way Hugging Face does by default (BOS for Llama).
 * *ids is malloc'ed; the caller frees it.
 */
int  pie_tokenizer_encode(const pie_tokenizer *t, const char *text, size_t len,
                          bool add_special, int32_t **ids, size_t *n_ids);
/* Decodes ids to a malloc'ed NUL-terminated string (special tokens kept
 * unless skip_special). Invalid ids are an error. */
int  pie_tokenizer_decode(const pie_tokenizer *t, const int32_t *ids, size_t n,
                          bool skip_special, char **text, size_t *len);

int32_t pie_tokenizer_vocab_size(const pie_tokenizer *t);
/* Id of a token string (vocab or added token), or -1. */
int32_t pie_tokenizer_token_id(const pie_tokenizer *t, const char *tok);
/* The raw vocabulary string of an id (NULL if out of range). */
const char *pie_tokenizer_id_to_token(const pie_tokenizer *t, int32_t id);
bool    pie_tokenizer_is_special(const pie_tokenizer *t, int32_t id);
int32_t pie_tokenizer_bos_id(const pie_tokenizer *t);   /* -1 if none */
int32_t pie_tokenizer_eos_id(const pie_tokenizer *t);   /* -1 if none */

/*
 * Incremental decoding for streaming: push ids one at a time; each push
 * appends to out only complete UTF-8 text (bytes of a partial sequence are
 * held back until it completes). Returns the number of bytes written (< cap
 * guaranteed: out is NUL-terminated) or a negative error.
 */
typedef struct pie_detok {
    const pie_tokenizer *t;
    bool     skip_special;
    bool     first;            /* SentencePiece: strip the leading "▁" space */
    uint8_t  pending[8];       /* bytes of an incomplete UTF-8 sequence      */
    int      n_pending;
} pie_detok;

void pie_detok_init(pie_detok *d, const pie_tokenizer *t, bool skip_special);
int  pie_detok_push(pie_detok *d, int32_t id, char *out, size_t cap);
/* Flushes held bytes (invalid tail becomes U+FFFD). */
int  pie_detok_flush(pie_detok *d, char *out, size_t cap);

#endif
