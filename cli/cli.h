/*
 * cli.h — shared pieces of the `pie` command: each subcommand's entry point
 * and the helpers they share (loading a model with progress, creating the
 * backend the user asked for).
 */
#ifndef PIE_CLI_H
#define PIE_CLI_H

#include "backend/backend.h"
#include "model/model.h"

#include <stddef.h>
#include <stdint.h>

/* Bounds of the options several subcommands share. */
#define PIE_CLI_MAX_THREADS   1024       /* --threads, --workers           */
#define PIE_CLI_MAX_PAGE_SIZE 65536      /* --page-size, tokens            */
#define PIE_CLI_MAX_TOKENS    (1 << 24)  /* tokens of one sequence:
                                            --max-tokens, --prompt-len ... */

int pie_cmd_tokenize(int argc, char **argv);
int pie_cmd_detokenize(int argc, char **argv);
int pie_cmd_generate(int argc, char **argv);
int pie_cmd_bench(int argc, char **argv);
int pie_cmd_run(int argc, char **argv);
int pie_cmd_build(int argc, char **argv);

/* Loads a model, showing progress on a terminal; prints errors. 0 or -1. */
int  pie_cli_load_model(const char *path, pie_model **out);
/* The GPU options of the commands that create a backend. */
typedef struct pie_cli_gpu {
    int   device;        /* --gpu: CUDA device ordinal                      */
    float mem_fraction;  /* --gpu-memory: the KV pool's share of the GPU
                            memory left after weights and workspace, where
                            no page count sizes it                          */
} pie_cli_gpu;
#define PIE_CLI_GPU_DEFAULT { 0, 0.9f }
#define PIE_CLI_MAX_GPU 1023            /* --gpu                           */
/* Their rows of an option table (opts.h). */
#define PIE_CLI_OPT_GPU(g)                                                  \
    { "gpu", 0, OPT_INT, &(g).device, "CUDA device ordinal for the cuda "   \
      "backend, 0..1023 (0)" }
#define PIE_CLI_OPT_GPU_MEMORY(g)                                           \
    { "gpu-memory", 0, OPT_FLOAT, &(g).mem_fraction, "share of the GPU "    \
      "memory left after the weights and workspace for the cuda "          \
      "backend's KV pool (where --pages leaves the pool to it), (0, 1] "   \
      "(0.9)" }
/* Creates backend "cpu", "cuda" or "auto" (g: NULL for the defaults);
 * prints errors, and for cuda the GPU and the pool it took. 0, or the
 * backend's error code (PIE_ENOMEM: no room for the pool asked for;
 * PIE_EINVAL also for an unknown backend name). */
int  pie_cli_backend(const char *which, const pie_model *m, int page_size,
                     int n_pages, int threads, const pie_cli_gpu *g,
                     pie_backend **out);
/* Parses "1,2,3" into a malloc'ed id list; -1 on a bad list. */
int  pie_cli_parse_ids(const char *s, int32_t **ids, size_t *n);
double pie_cli_now(void);
/* Checks lo <= v <= hi for option --name of subcommand cmd ("run"); if
 * not, prints "pie CMD: --NAME must be LO..HI (got V)" and returns -1. */
int  pie_cli_check_int(const char *cmd, const char *name, int64_t v,
                       int64_t lo, int64_t hi);
/* Checks --page-size (1..PIE_CLI_MAX_PAGE_SIZE), --threads (0 = all
 * cores .. PIE_CLI_MAX_THREADS), --gpu (0..PIE_CLI_MAX_GPU) and
 * --gpu-memory ((0, 1]); prints and returns -1 if not. */
int  pie_cli_check_backend_opts(const char *cmd, int page_size, int threads,
                                const pie_cli_gpu *g);

struct pie_rt;
struct pie_rt_module;
/* Resolves INFERLET (a .wasm path or a bundled name) to a file path;
 * prints an error and returns -1 when there is none. (cmd_run.c) */
int  pie_cli_resolve_inferlet(const char *name, char *path, size_t cap);
/* Reads, checks and compiles (or takes from the cache) an inferlet;
 * prints errors. 0 or -1. (cmd_run.c) */
int  pie_cli_load_inferlet(struct pie_rt *rt, const char *path,
                           struct pie_rt_module **mod);
/* `pie bench generate` (cmd_bench_gen.c) */
int  pie_cmd_bench_generate(int argc, char **argv);

#endif
