/*
 * cmd_bench.c — `pie bench forward`: prefill and decode throughput of a
 * backend, driven directly (no control layer, no inferlet).
 *
 * B sequences each get a prompt of L seeded random tokens, prefilled in
 * batched forwards of at most --chunk tokens and the backend's most (8192
 * on the GPU), whole prompts together where they fit and a longer prompt
 * in pieces (after one untimed forward of the first one's shape: plan
 * creation and matmul algorithm timing happen once per shape and are not
 * prefill work); then N decode steps advance all B sequences by one greedy
 * token each (a step in forwards of at most the backend's most sequences).
 * Prints prefill tokens/s, decode step time and decode tokens/s.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/drv.h"
#include "cli/opts.h"
#include "common/pie_err.h"

#define BENCH_MAX_BATCH (1 << 20)   /* --batch                             */

typedef struct bench_args {
    const char *model, *backend;
    int batch, prompt_len, gen, page_size, threads, chunk, warmup;
    bool json;
    pie_cli_gpu gpu;
} bench_args;

typedef struct bench_result {
    double prefill_s, decode_s;
    long   prefill_tokens, decode_tokens;
    long   prefill_forwards;    /* the timed prefill's forwards */
} bench_result;

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Whole prompts of L tokens a prefill forward takes: 1 .. the batch. */
static int prefill_per(const bench_args *a, int32_t cap)
{
    int per = cap / a->prompt_len;
    return per < 1 ? 1 : per < a->batch ? per : a->batch;
}

/* Prefills every sequence with L random tokens, in forwards of at most
 * pie_drv_cap tokens (a prompt longer than that in pieces: all but the
 * last fed by pie_drv_feed_head); counts the forwards in *fwd. */
static int prefill(const bench_args *a, pie_drv *d, pie_drv_seq **seqs,
                   int32_t vocab, int32_t *last, long *fwd)
{
    uint64_t rng = 42;
    int32_t cap = pie_drv_cap(d, a->chunk, PIE_CLI_MAX_TOKENS);
    int per = prefill_per(a, cap);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)a->prompt_len * (size_t)per);
    int32_t *nn = malloc(sizeof(int32_t) * (size_t)per);
    pie_sampler *s = calloc((size_t)per, sizeof *s);
    int rc = tok && nn && s ? 0 : pie_err_set(PIE_ENOMEM, "out of memory");
    for (int i = 0; !rc && i < a->batch; i += per) {
        int k = a->batch - i < per ? a->batch - i : per;
        for (long j = 0; j < (long)k * a->prompt_len; j++)
            tok[j] = (int32_t)(rng_next(&rng) % (uint64_t)vocab);
        const int32_t *in = tok;
        int32_t left = a->prompt_len;
        if (left > cap)                 /* k == 1: all but its last piece */
            rc = pie_drv_feed_head(d, seqs[i], &in, &left, cap, s, fwd);
        if (rc) break;
        for (int j = 0; j < k; j++) nn[j] = left;
        rc = pie_drv_step(d, seqs + i, k, in, nn, s, last + i);
        ++*fwd;
    }
    free(tok); free(nn); free(s);
    return rc;
}

/* steps decode steps of every sequence, a step in forwards of at most the
 * backend's most sequences (one where it allows the whole batch). */
static int decode(const bench_args *a, pie_drv *d, pie_drv_seq **seqs,
                  int32_t *last, int steps)
{
    int most = d->b->max_tokens, g = most > 0 && most < a->batch ? most : a->batch;
    int32_t *nn = malloc(sizeof(int32_t) * (size_t)a->batch);
    int32_t *in = malloc(sizeof(int32_t) * (size_t)a->batch);
    pie_sampler *s = calloc((size_t)a->batch, sizeof *s);
    int rc = nn && in && s ? 0 : pie_err_set(PIE_ENOMEM, "out of memory");
    for (int i = 0; i < a->batch && !rc; i++) nn[i] = 1;
    for (int t = 0; t < steps && !rc; t++) {
        memcpy(in, last, sizeof(int32_t) * (size_t)a->batch);
        for (int i = 0; i < a->batch && !rc; i += g) {
            int k = a->batch - i < g ? a->batch - i : g;
            rc = pie_drv_step(d, seqs + i, k, in + i, nn, s, last + i);
        }
    }
    free(nn); free(in); free(s);
    return rc;
}

/* One untimed prefill forward of the first one's shape (whole prompts on
 * the first sequences, or a longer prompt's first piece), released
 * (emptied) afterwards: one-time costs (matmul plans, algorithm timing)
 * stay out of the prefill figure, as the decode warm-up steps do for
 * decode. */
static int warm_prefill(const bench_args *a, pie_drv *d, pie_drv_seq **seqs,
                        int32_t vocab, int32_t *last)
{
    bench_args w = *a;
    int32_t cap = pie_drv_cap(d, a->chunk, PIE_CLI_MAX_TOKENS);
    long fwd = 0;
    w.batch = prefill_per(a, cap);
    if (w.prompt_len > cap) w.prompt_len = cap;     /* the first piece */
    int rc = prefill(&w, d, seqs, vocab, last, &fwd);
    for (int i = 0; i < w.batch; i++) pie_drv_seq_release(d, seqs[i]);
    return rc;
}

static int run_bench(const bench_args *a, pie_backend *b, bench_result *r)
{
    pie_drv d;
    pie_drv_seq *seq = calloc((size_t)a->batch, sizeof *seq);
    pie_drv_seq **sp = malloc(sizeof *sp * (size_t)a->batch);
    int32_t *last = malloc(sizeof(int32_t) * (size_t)a->batch);
    if (!seq || !sp || !last || pie_drv_init(&d, b)) {
        fprintf(stderr, "pie bench forward: %s\n", !seq || !sp || !last
                ? "out of memory" : pie_err_msg());
        free(seq); free(sp); free(last);
        return -1;
    }
    for (int i = 0; i < a->batch; i++) sp[i] = &seq[i];
    int rc = a->warmup ? warm_prefill(a, &d, sp, b->cfg->vocab_size, last) : 0;
    double t0 = pie_cli_now();
    r->prefill_forwards = 0;
    if (!rc) rc = prefill(a, &d, sp, b->cfg->vocab_size, last,
                          &r->prefill_forwards);
    double t1 = pie_cli_now();
    if (!rc && a->warmup) rc = decode(a, &d, sp, last, a->warmup);
    double t2 = pie_cli_now();
    if (!rc) rc = decode(a, &d, sp, last, a->gen);
    double t3 = pie_cli_now();
    r->prefill_s = t1 - t0;
    r->decode_s = t3 - t2;
    r->prefill_tokens = (long)a->batch * a->prompt_len;
    r->decode_tokens = (long)a->batch * a->gen;
    for (int i = 0; i < a->batch; i++) pie_drv_seq_release(&d, &seq[i]);
    pie_drv_free(&d);
    free(seq); free(sp); free(last);
    if (rc) fprintf(stderr, "pie bench forward: %s\n", pie_err_msg());
    return rc ? -1 : 0;
}

static void report(const bench_args *a, const pie_backend *b,
                   const bench_result *r)
{
    double pf = r->prefill_tokens / r->prefill_s;
    double step_ms = a->gen ? r->decode_s * 1e3 / a->gen : 0;
    double dec = a->gen ? r->decode_tokens / r->decode_s : 0;
    if (a->json) {
        printf("{\"model\":\"%s\",\"backend\":\"%s\",\"batch\":%d,"
               "\"prompt_len\":%d,\"gen\":%d,\"page_size\":%d,"
               "\"prefill_tokens_per_s\":%.1f,\"prefill_forwards\":%ld,"
               "\"decode_step_ms\":%.3f,\"decode_tokens_per_s\":%.1f}\n",
               a->model, b->name, a->batch, a->prompt_len, a->gen,
               b->page_size, pf, r->prefill_forwards, step_ms, dec);
        return;
    }
    printf("model %s  backend %s  batch %d  prompt %d  gen %d  page %d\n",
           a->model, b->name, a->batch, a->prompt_len, a->gen, b->page_size);
    printf("prefill: %ld tokens in %.3f s = %.1f tokens/s (%ld forwards)\n",
           r->prefill_tokens, r->prefill_s, pf, r->prefill_forwards);
    printf("decode:  %.3f ms/step, %.1f tokens/s (batch %d, context %d..%d)\n",
           step_ms, dec, a->batch, a->prompt_len + a->warmup,
           a->prompt_len + a->warmup + a->gen);
}

/* Parses the options into *a; false with *status (0 for --help, 2) to exit. */
static bool parse_bench_args(int argc, char **argv, bench_args *a, int *status)
{
    *a = (bench_args){ .batch = 1, .prompt_len = 128, .gen = 32,
                       .page_size = 16, .chunk = 4096, .warmup = 2,
                       .backend = "auto", .gpu = PIE_CLI_GPU_DEFAULT };
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &a->model, "model directory or random:SHAPE "
          "(stories15M, llama-3.2-1b, llama-3.1-8b)" },
        { "batch", 'B', OPT_INT, &a->batch, "concurrent sequences, 1..2^20 "
          "(1)" },
        { "prompt-len", 'L', OPT_INT, &a->prompt_len, "prompt tokens per "
          "sequence, 1..2^24 (128)" },
        { "gen", 'N', OPT_INT, &a->gen, "decode steps timed, 0..2^24 (32)" },
        { "warmup", 0, OPT_INT, &a->warmup, "decode steps before timing (2); "
          "0 also skips the untimed warm-up prefill forward" },
        { "chunk", 0, OPT_INT, &a->chunk, "max prefill tokens per forward, "
          "0..2^24, at most the backend's (4096; 0 = the backend's most, 8192 "
          "on the GPU; no limit on the CPU)" },
        { "backend", 'b', OPT_STR, &a->backend, "cpu, cuda or auto (auto)" },
        { "page-size", 0, OPT_INT, &a->page_size, "KV page size in tokens, "
          "1..65536 (16)" },
        { "threads", 0, OPT_INT, &a->threads, "CPU threads (0 = all cores; "
          "at most 1024)" },
        PIE_CLI_OPT_GPU(a->gpu),
        { "json", 0, OPT_FLAG, &a->json, "print one JSON object" },
        { 0 },
    };
    const pie_cmd_usage u = { "bench forward",
        "--model DIR|random:SHAPE [--batch B] [--prompt-len L] [--gen N] [--json]",
        "Measures prefill and decode throughput of the backend alone.", opts };
    char *pos[1];
    int npos, dd, rc = pie_opts_parse(&u, argc, argv, pos, 0, &npos, &dd);
    *status = rc < 0 ? 2 : 0;
    return rc == 0;
}

/* Range checks of the options; prints and returns -1 on the first bad one. */
static int check_bench_args(const bench_args *a)
{
    const char *cmd = "bench forward";
    if (pie_cli_check_int(cmd, "batch", a->batch, 1, BENCH_MAX_BATCH) ||
        pie_cli_check_int(cmd, "prompt-len", a->prompt_len, 1,
                          PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_int(cmd, "gen", a->gen, 0, PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_int(cmd, "warmup", a->warmup, 0, PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_int(cmd, "chunk", a->chunk, 0, PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_backend_opts(cmd, a->page_size, a->threads,
                                   &a->gpu))
        return -1;
    return 0;
}

/* The KV pages the run needs into *pages, and one sequence's tokens into
 * *tokens; prints and returns -1 when the pages pass INT32_MAX. */
static int bench_kv_pages(const bench_args *a, int64_t *tokens,
                          int64_t *pages)
{
    /* each sequence's tokens, one page spare; in 64 bits, then bounded */
    *tokens = (int64_t)a->prompt_len + a->gen + a->warmup;
    *pages = (int64_t)a->batch *
             ((*tokens + a->page_size) / a->page_size + 1);
    if (*pages > INT32_MAX) {
        fprintf(stderr, "pie bench forward: %d sequences of %lld tokens need "
                "%lld KV pages of %d tokens, more than %d; lower --batch, "
                "--prompt-len or --gen, or raise --page-size\n", a->batch,
                (long long)*tokens, (long long)*pages, a->page_size, INT32_MAX);
        return -1;
    }
    return 0;
}

static int bench_forward(int argc, char **argv)
{
    bench_args a;
    int status;
    int64_t tokens, pages;
    if (!parse_bench_args(argc, argv, &a, &status)) return status;
    if (check_bench_args(&a) || bench_kv_pages(&a, &tokens, &pages)) return 2;
    pie_model *m;
    pie_backend *b = NULL;
    if (pie_cli_load_model(a.model, &m)) return 1;
    bench_result r;
    status = 1;
    int brc = pie_cli_backend(a.backend, m, a.page_size, (int)pages,
                              a.threads, &a.gpu, &b);
    if (brc == PIE_ENOMEM)
        fprintf(stderr, "pie bench forward: its KV pool holds %d sequences "
                "of %lld tokens (%lld pages); lower --batch, --prompt-len or "
                "--gen\n", a.batch, (long long)tokens, (long long)pages);
    else if (!brc && run_bench(&a, b, &r) == 0) {
        report(&a, b, &r);
        status = 0;
    }
    pie_backend_free(b);
    pie_model_free(m);
    return status;
}

int pie_cmd_bench(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "forward"))
        return bench_forward(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "generate"))
        return pie_cmd_bench_generate(argc - 1, argv + 1);
    fprintf(stderr, "usage: pie bench forward|generate [OPTIONS]   (see "
                    "pie bench forward --help)\n");
    return (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")))
               ? 0 : 2;
}
