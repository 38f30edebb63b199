/*
 * fuzz_tokenizer.c — libFuzzer harness for tokenizer.json loading, then
 * encode and decode of a fixed text.
 *
 * On a successful load the invariants the server relies on must hold; a
 * violation traps so the fuzzer reports it:
 *   - encode of valid UTF-8 succeeds and every id is in 0..vocab_size-1;
 *   - decode accepts every id encode returned (post-processor ids included);
 *   - streaming decode of those ids concatenates to the full decode.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Words, spaces, digits, punctuation, multi-byte UTF-8 and the usual
 * special-token spellings, so added tokens and byte paths get exercised. */
static const char TEXT[] = "Hello, world!  <s>ab</s> 12345 caf\xc3\xa9 "
                           "\xe4\xbd\xa0\xe5\xa5\xbd <|im_start|>\n\t<unk>a";

/* Streams ids through pie_detok; traps unless the result equals full. */
static void check_stream(const pie_tokenizer *t, const int32_t *ids, size_t n,
                         const char *full, size_t full_len)
{
    pie_detok d;
    char out[1024];
    size_t k = 0;
    pie_detok_init(&d, t, false);
    for (size_t i = 0; i <= n; i++) {
        int r = i < n ? pie_detok_push(&d, ids[i], out, sizeof out)
                      : pie_detok_flush(&d, out, sizeof out);
        if (r < 0) return;               /* a token longer than out: allowed */
        if ((size_t)r > full_len - k || memcmp(full + k, out, (size_t)r))
            __builtin_trap();
        k += (size_t)r;
    }
    if (k != full_len) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pie_tokenizer *t;
    if (pie_tokenizer_load_json((const char *)data, size, NULL, 0, &t))
        return 0;
    int32_t n_vocab = pie_tokenizer_vocab_size(t);
    for (int special = 0; special < 2; special++) {
        int32_t *ids;
        size_t n;
        char *s;
        size_t len;
        if (pie_tokenizer_encode(t, TEXT, sizeof TEXT - 1, special, &ids, &n))
            __builtin_trap();
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= n_vocab) __builtin_trap();
        if (pie_tokenizer_decode(t, ids, n, false, &s, &len)) __builtin_trap();
        check_stream(t, ids, n, s, len);
        free(s);
        free(ids);
    }
    pie_tokenizer_free(t);
    return 0;
}
