/*
 * bench_tokenizer.c — tokenizer load time and encode/decode throughput.
 *
 *   bench_tokenizer TOKENIZER_DIR [TEXT_FILE] [MB]
 *
 * Loads TOKENIZER_DIR/tokenizer.json (best of 3 loads, wall and CPU time), then encodes about
 * MB megabytes (default 1) of text: TEXT_FILE if given, else a built-in mix
 * of English prose, C code, numbers and non-Latin scripts repeated with
 * varying numbers so the pieces are not all identical. Prints load time,
 * encode tokens/s and MB/s (best of 3), decode MB/s, and checks that
 * decode(encode(text)) returns the text (NFC-normalizing tokenizers may
 * legitimately differ; the mismatch is then reported, not fatal).
 */
#define _GNU_SOURCE
#include "model/tokenizer.h"
#include "common/pie_err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clock_s(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

static const char *SAMPLES[] = {
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park with her dog Max. One day, she saw a big red ball "
    "stuck in a tree and asked her mom for help.\n",
    "The quick brown fox jumps over the lazy dog; meanwhile, 12,345 people "
    "watched the 3.14159-hour broadcast on 2024-11-23 at 09:41 UTC.\n",
    "static int parse(const char *s, size_t n, int32_t *out)\n{\n    for "
    "(size_t i = 0; i < n; i++) {\n        if (s[i] == '\\n') return -1;\n"
    "        out[i] = (int32_t)s[i] * 31 + 7;\n    }\n    return 0;\n}\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n",
    "你好，世界！这是一个测试。こんにちは世界、カタカナとひらがな。"
    "Привет, мир! Съешь же ещё этих мягких французских булок. مرحبا بالعالم\n",
    "emoji 🤖🚀 and flags 🇫🇷🇯🇵, accents: café naïve résumé Œuvre ß.\n",
    "I'm sure we'll see they've done it, didn't they? WE'LL SEE.   \n\n",
};

static char *make_text(size_t want, size_t *len)
{
    char *buf = malloc(want + 4096);
    size_t n = 0;
    for (unsigned k = 0; n < want; k++) {
        const char *s = SAMPLES[k % (sizeof SAMPLES / sizeof SAMPLES[0])];
        n += (size_t)sprintf(buf + n, "%s[%u] ", s, k * 7919u % 100000u);
    }
    *len = n;
    return buf;
}

static char *read_text(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s TOKENIZER_DIR [TEXT_FILE] [MB]\n", argv[0]);
        return 2;
    }
    double mb = argc > 3 ? atof(argv[3]) : 1.0;
    pie_tokenizer *t = NULL;
    double best_load = 1e9, best_load_cpu = 1e9;
    for (int r = 0; r < 3; r++) {
        if (t) pie_tokenizer_free(t);
        double t0 = now(), c0 = cpu();
        if (pie_tokenizer_load(argv[1], &t)) {
            fprintf(stderr, "load failed: %s\n", pie_err_msg());
            return 1;
        }
        double dt = now() - t0, dc = cpu() - c0;
        if (dt < best_load) best_load = dt;
        if (dc < best_load_cpu) best_load_cpu = dc;
    }
    size_t len;
    char *text = argc > 2 && strcmp(argv[2], "-") ? read_text(argv[2], &len)
                                                  : make_text((size_t)(mb * 1e6), &len);
    int32_t *ids = NULL;
    size_t n = 0;
    double best_enc = 1e9, best_enc_cpu = 1e9;
    for (int r = 0; r < 3; r++) {
        free(ids);
        double t0 = now(), c0 = cpu();
        if (pie_tokenizer_encode(t, text, len, false, &ids, &n)) {
            fprintf(stderr, "encode failed: %s\n", pie_err_msg());
            return 1;
        }
        double dt = now() - t0, dc = cpu() - c0;
        if (dt < best_enc) best_enc = dt;
        if (dc < best_enc_cpu) best_enc_cpu = dc;
    }
    char *dec;
    size_t dl;
    double t0 = now();
    if (pie_tokenizer_decode(t, ids, n, false, &dec, &dl)) {
        fprintf(stderr, "decode failed: %s\n", pie_err_msg());
        return 1;
    }
    double dec_s = now() - t0;
    printf("tokenizer %s: vocab %d, load %.1f ms wall, %.1f ms CPU (best of 3)\n",
           argv[1], pie_tokenizer_vocab_size(t), best_load * 1e3,
           best_load_cpu * 1e3);
    printf("  encode: %.2f MB -> %zu tokens in %.1f ms: %.0f tokens/s, "
           "%.2f MB/s (%.2f bytes/token); by CPU time %.0f tokens/s\n",
           (double)len / 1e6, n, best_enc * 1e3, (double)n / best_enc,
           (double)len / 1e6 / best_enc, (double)len / (double)n,
           (double)n / best_enc_cpu);
    printf("  decode: %.1f ms: %.0f tokens/s, %.1f MB/s; round trip %s\n",
           dec_s * 1e3, (double)n / dec_s, (double)dl / 1e6 / dec_s,
           dl == len && !memcmp(dec, text, len) ? "exact" : "DIFFERS");
    free(dec);
    free(ids);
    free(text);
    pie_tokenizer_free(t);
    return 0;
}
