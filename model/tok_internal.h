/*
 * tok_internal.h — the tokenizer's data structures, shared by tokenizer.c
 * (encode/decode pipeline), tok_load.c (tokenizer.json parsing) and
 * tok_bpe.c (hash maps and the BPE merge loop).
 *
 * Token ids form one dense space 0..n_ids-1 covering the model vocabulary
 * and the added tokens. For each id:
 *   str/len       the raw token string (vocabulary spelling, e.g. "Ġthe" or
 *                 "<0x0A>"), NULL for holes in the id space;
 *   flags         TOK_PRESENT, TOK_ADDED (listed in added_tokens),
 *                 TOK_SPECIAL (added token with special: true);
 *   dec_off/len   the bytes the decoder produces for the token, in dec_arena
 *                 (ByteLevel: the GPT-2 alphabet mapped back to bytes;
 *                 SentencePiece: "▁"→" ", "<0xAB>"→ one byte).
 * Strings live in one arena owned by the tokenizer; nothing points outside it.
 *
 * vocab maps token string → id (open addressing; a slot holds id + 1, 0 =
 * empty, and 32 hash bits so most misses never touch the string).
 * merges maps a pair of ids (a, b) packed as a<<32|b → (rank, merged id).
 *
 * Encoding pipeline (same order as Hugging Face `tokenizers`):
 *   split on added tokens → normalizer (per segment) → pre-tokenizer pieces
 *   → BPE per piece → post-processor ids (only with add_special).
 */
#ifndef PIE_TOK_INTERNAL_H
#define PIE_TOK_INTERNAL_H

#include "model/tokenizer.h"

#include <stdint.h>
#include <stddef.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

enum { TOK_PRESENT = 1, TOK_ADDED = 2, TOK_SPECIAL = 4 };

/* Normalizer steps (a Sequence flattens into a list of these). */
enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_PREPEND, NORM_REPLACE,
       NORM_LOWERCASE };
typedef struct {
    int   kind;
    char *a; size_t a_len;               /* Prepend text / Replace pattern   */
    char *b; size_t b_len;               /* Replace content                  */
} tok_norm;

/* Pre-tokenizer steps. */
enum { PRE_SPLIT, PRE_BYTELEVEL };
enum { SPLIT_ISOLATED, SPLIT_REMOVED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT };
typedef struct {
    int          kind;
    pcre2_code  *re;                     /* Split regex, or ByteLevel's GPT-2 */
    int          behavior;               /* SPLIT_*                           */
    int          add_prefix_space;       /* ByteLevel                         */
} tok_pre;

/* Decoder: a chain reduced to flags. */
enum { DEC_NONE, DEC_BYTELEVEL, DEC_CHAIN };

typedef struct {
    int32_t id;
    char   *s; size_t len;
    uint8_t lstrip, rstrip, single_word, special;
} tok_added;

typedef struct {
    uint64_t key;                        /* a<<32|b, UINT64_MAX = empty       */
    uint32_t rank;
    int32_t  merged;
} tok_pair;

typedef struct {
    tok_pair *slots;                     /* one cache line access per probe   */
    uint32_t  cap;                       /* power of two                      */
} tok_pairmap;

typedef struct {
    uint32_t id1;                        /* id + 1, 0 = empty                 */
    uint32_t hash;                       /* high bits of the string's hash    */
} tok_vslot;

struct pie_tokenizer {
    int32_t    n_ids;                    /* size of the id space              */
    char     **str;                      /* (n_ids) raw token strings         */
    uint32_t  *len;                      /* (n_ids)                           */
    uint8_t   *flags;                    /* (n_ids) TOK_*                     */
    uint32_t  *dec_off, *dec_len;        /* (n_ids) decoded bytes in dec_arena*/
    char      *dec_arena;
    char      *arena;  size_t arena_len, arena_cap;

    tok_vslot *vocab_slots;  uint32_t vocab_cap;   /* string → id            */
    tok_pairmap merges;

    /* BPE model options */
    int32_t    unk_id;                   /* -1 if none                        */
    int        fuse_unk, byte_fallback, ignore_merges;
    int32_t    byte_fallback_id[256];    /* "<0xAB>" ids, -1 if missing       */
    int        byte_level;               /* pre-tokenizer includes ByteLevel  */
    int32_t    byte_id[256];             /* id of the 1-char token for byte b */

    tok_norm  *norm;   int n_norm;
    tok_pre   *pre;    int n_pre;

    tok_added *added;  int n_added;
    int32_t   *added_by_byte[256];       /* added indices by first byte,      */
    int        n_added_by_byte[256];     /*   longest first, then file order  */

    int        dec_kind;                 /* DEC_*                             */
    int        dec_strip;                /* leading ' ' to strip (Strip dec.) */
    int        dec_join_space;           /* no decoder: tokens joined by ' '  */
    int        dec_byte_fallback;        /* "<0xAB>" tokens decode to a byte  */
    char      *dec_from, *dec_to;        /* Replace decoder (e.g. "▁" → " ")  */
    size_t     dec_from_len, dec_to_len;

    int32_t   *prefix, *suffix;          /* post-processor ids (add_special)  */
    int        n_prefix, n_suffix;
    int32_t    bos_id, eos_id;
};

/* tok_bpe.c */
uint64_t pie__tok_hash(const char *s, size_t n);
int      pie__tok_vocab_build(pie_tokenizer *t);
int32_t  pie__tok_vocab_find(const pie_tokenizer *t, const char *s, size_t n);
int      pie__tok_pairs_init(tok_pairmap *m, size_t n);
int      pie__tok_pairs_put(tok_pairmap *m, int32_t a, int32_t b,
                            uint32_t rank, int32_t merged);
void     pie__tok_pairs_free(tok_pairmap *m);
/* Runs BPE on one pre-tokenized piece; appends ids to *ids (cap grows). */
typedef struct { int32_t *v; size_t n, cap; } tok_ids;
int      pie__tok_ids_push(tok_ids *ids, int32_t id);
int      pie__tok_bpe_piece(const pie_tokenizer *t, const char *p, size_t n,
                            tok_ids *out);

/* tok_load.c */
int      pie__tok_parse(pie_tokenizer *t, const char *json, size_t len,
                        const char *cfg, size_t cfg_len);

/* tokenizer.c */
int      pie__tok_utf8_valid(const uint8_t *s, size_t n, size_t *bad_at);
extern const uint16_t pie__tok_byte_to_cp[256];   /* GPT-2 bytes→unicode */

#endif
