/*
 * tok_json.h — flat views of tokenizer.json's model.vocab and model.merges,
 * filled either by the fast scanner (tok_json.c) or from a jansson tree.
 */
#ifndef PIE_TOK_JSON_H
#define PIE_TOK_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef struct { const char *s; uint32_t len; int32_t id; } tok_vent;
/* A merge: ["a", "b"], or the string "a b" (then b == NULL, a/an whole). */
typedef struct { const char *a, *b; uint32_t an, bn; } tok_ment;

typedef struct {
    tok_vent *vocab;   size_t n_vocab;
    tok_ment *merges;  size_t n_merges;
    int       has_merges;
    char     *scratch;                   /* unescaped strings                 */
    char     *rest;    size_t rest_len;  /* document, vocab/merges emptied    */
} tok_fast;

/* 0 on success; -1 means "use the jansson path" (no error is recorded). */
int  pie__tok_fast_scan(const char *json, size_t len, tok_fast *f);
void pie__tok_fast_free(tok_fast *f);

#endif
