/*
 * cmd_generate.c — `pie generate`: prompt in, continuation out, streamed as
 * it is generated. No inferlet: the loop runs in the CLI over the backend
 * (cli/drv.c). Temperature 0 is greedy; seeded sampling is reproducible.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/drv.h"
#include "cli/opts.h"
#include "common/pie_err.h"
#include "model/tokenizer.h"

typedef struct gen_args {
    const char *model, *prompt, *prompt_ids, *backend;
    int         max_tokens, top_k, page_size, threads, chunk;
    float       temperature, top_p, min_p;
    uint64_t    seed;
    bool        ignore_eos, json;
    pie_cli_gpu gpu;
} gen_args;

static bool is_eos(const pie_model *m, int32_t id)
{
    for (int i = 0; i < m->cfg.n_eos; i++)
        if (m->cfg.eos_ids[i] == id) return true;
    return m->tok && pie_tokenizer_eos_id(m->tok) == id;
}

/* Encodes the prompt text the way Hugging Face does by default (BOS). */
static int encode_prompt(const gen_args *a, const pie_model *m, int32_t **ids,
                         size_t *n)
{
    if (!m->tok) {
        fprintf(stderr, "pie generate: model has no tokenizer; use "
                        "--prompt-ids\n");
        return -1;
    }
    if (pie_tokenizer_encode(m->tok, a->prompt, strlen(a->prompt), true, ids,
                             n) == 0 && *n > 0)
        return 0;
    fprintf(stderr, "pie generate: cannot encode prompt: %s\n", pie_err_msg());
    return -1;
}

/* Writes s as a JSON string literal. */
static void json_str(FILE *f, const char *s, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

/* Generates up to max_gen tokens into gen after the prompt; *fwd counts
 * the forwards the prompt took. Returns how many, or -1. */
static int run_loop(const gen_args *a, pie_model *m, pie_drv *d,
                    int32_t *prompt, size_t n_prompt, int max_gen,
                    int32_t *gen, long *fwd)
{
    pie_sampler s = { .kind = a->temperature > 0 ? PIE_SAMPLER_RANDOM
                                                 : PIE_SAMPLER_GREEDY,
                      .temperature = a->temperature, .top_k = a->top_k,
                      .top_p = a->top_p, .min_p = a->min_p };
    pie_drv_seq seq = {0}, *sp = &seq;
    pie_detok dt;
    char piece[1024];
    int n_gen = 0, rc = 0;
    int32_t n_in = (int32_t)n_prompt, tok;
    const int32_t *in = prompt;
    if (m->tok) {
        pie_detok_init(&dt, m->tok, true);
        dt.first = false;   /* a continuation keeps its leading space */
    }
    *fwd = max_gen > 0;
    /* all but the last forward's worth of the prompt, in forwards of at
     * most --chunk tokens and the backend's most */
    int32_t cap = pie_drv_cap(d, a->chunk, PIE_CLI_MAX_TOKENS);
    rc = max_gen > 0 ? pie_drv_feed_head(d, &seq, &in, &n_in, cap, &s, fwd) : 0;
    while (rc == 0 && n_gen < max_gen) {
        s.seed = a->seed * 0x9E3779B97F4A7C15ull + (uint64_t)n_gen;
        if ((rc = pie_drv_step(d, &sp, 1, in, &n_in, &s, &tok)) != 0) break;
        if (!a->ignore_eos && is_eos(m, tok)) break;
        gen[n_gen++] = tok;
        if (!a->json && m->tok && pie_detok_push(&dt, tok, piece, sizeof piece) > 0) {
            fputs(piece, stdout);
            fflush(stdout);
        } else if (!a->json && !m->tok) {
            printf("%s%d", n_gen > 1 ? " " : "", tok);
            fflush(stdout);
        }
        in = &gen[n_gen - 1];
        n_in = 1;
    }
    if (!a->json && m->tok && pie_detok_flush(&dt, piece, sizeof piece) > 0)
        fputs(piece, stdout);
    pie_drv_seq_release(d, &seq);
    if (rc) {
        fprintf(stderr, "\npie generate: %s\n", pie_err_msg());
        return -1;
    }
    return n_gen;
}

static void print_json(const pie_model *m, const int32_t *gen, int n,
                       long prompt_fwd)
{
    printf("{\"ids\":[");
    for (int i = 0; i < n; i++) printf("%s%d", i ? "," : "", gen[i]);
    printf("],\"text\":");
    /* A model may have more embedding rows than token ids (Qwen); such ids
     * have no text and are left out of it. */
    int32_t *known = malloc(sizeof(int32_t) * (size_t)(n + 1));
    size_t nk = 0;
    for (int i = 0; known && i < n; i++)
        if (m->tok && pie_tokenizer_id_to_token(m->tok, gen[i])) known[nk++] = gen[i];
    char *text = NULL;
    size_t len = 0;
    if (known && m->tok && pie_tokenizer_decode(m->tok, known, nk, true, &text,
                                                &len) == 0)
        json_str(stdout, text, len);
    else
        printf("null");
    printf(",\"prompt_forwards\":%ld}\n", prompt_fwd);
    free(known);
    free(text);
}

/* Range checks of the sampling and size options; prints the first bad one
 * and returns -1. (NaN fails every comparison, so each test is written to
 * pass only for good values.) */
static int check_gen_args(const gen_args *a)
{
    const char *bad = NULL;
    double v = 0;
    if (!(a->temperature >= 0))
        bad = "--temperature must be >= 0 (0 = greedy)", v = a->temperature;
    else if (!(a->top_p > 0 && a->top_p <= 1))
        bad = "--top-p must be in (0, 1] (1 = all)", v = a->top_p;
    else if (!(a->min_p >= 0 && a->min_p <= 1))
        bad = "--min-p must be in [0, 1] (0 = off)", v = a->min_p;
    if (bad) {
        fprintf(stderr, "pie generate: %s (got %g)\n", bad, v);
        return -1;
    }
    if (pie_cli_check_int("generate", "top-k", a->top_k, 0, INT32_MAX) ||
        pie_cli_check_int("generate", "max-tokens", a->max_tokens, 0,
                          PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_int("generate", "chunk", a->chunk, 0,
                          PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_backend_opts("generate", a->page_size, a->threads,
                                   &a->gpu))
        return -1;
    return 0;
}

/* Every prompt id must name a row of the embedding: checked before any
 * forward, by its place in the whole prompt. */
static int check_prompt(const pie_model *m, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size) {
            fprintf(stderr, "pie generate: prompt token %zu has id %d, "
                    "outside the vocabulary (0..%d)\n", i, ids[i],
                    m->cfg.vocab_size - 1);
            return -1;
        }
    return 0;
}

/* The tokens to generate at most: --max-tokens, stopping where prompt and
 * continuation fill the model's context (max_position_embeddings; always
 * room for one). The KV pool is sized for exactly that. */
static int gen_room(const gen_args *a, const pie_model *m, size_t n)
{
    int64_t room = a->max_tokens;
    if (m->cfg.max_pos > 0 && (int64_t)m->cfg.max_pos - (int64_t)n < room)
        room = (int64_t)m->cfg.max_pos - (int64_t)n;
    return room < 1 ? (a->max_tokens > 0) : (int)room;
}

/* Parses the options into *a; false with *status (0 for --help, 2) to exit. */
static bool parse_gen_args(int argc, char **argv, gen_args *a, int *status)
{
    *a = (gen_args){ .max_tokens = 64, .temperature = 1.0f, .top_p = 1.0f,
                     .page_size = 16, .backend = "auto",
                     .gpu = PIE_CLI_GPU_DEFAULT };
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &a->model, "model directory or random:SHAPE" },
        { "prompt", 'p', OPT_STR, &a->prompt, "prompt text (BOS added as Hugging Face does)" },
        { "prompt-ids", 0, OPT_STR, &a->prompt_ids, "prompt as token ids 1,2,3 (used as given)" },
        { "max-tokens", 'n', OPT_INT, &a->max_tokens, "tokens to generate, "
          "0..2^24 (64)" },
        { "temperature", 't', OPT_FLOAT, &a->temperature, "0 = greedy (1.0)" },
        { "top-k", 0, OPT_INT, &a->top_k, "keep the k most likely tokens (0 = all)" },
        { "top-p", 0, OPT_FLOAT, &a->top_p, "nucleus mass, (0, 1] (1.0 = all)" },
        { "min-p", 0, OPT_FLOAT, &a->min_p, "drop tokens below min-p x max "
          "prob, [0, 1] (0)" },
        { "seed", 's', OPT_U64, &a->seed, "sampling seed (0)" },
        { "ignore-eos", 0, OPT_FLAG, &a->ignore_eos, "do not stop at EOS" },
        { "json", 0, OPT_FLAG, &a->json, "print {\"ids\":[...],\"text\":"
          "\"...\",\"prompt_forwards\":N}" },
        { "backend", 'b', OPT_STR, &a->backend, "cpu, cuda or auto (auto)" },
        { "page-size", 0, OPT_INT, &a->page_size, "KV page size in tokens, "
          "1..65536 (16)" },
        { "threads", 0, OPT_INT, &a->threads, "CPU threads (0 = all cores; "
          "at most 1024)" },
        { "chunk", 0, OPT_INT, &a->chunk, "prompt tokens per forward, "
          "0..2^24 (0 = the backend's most, 8192 on the GPU; no limit on "
          "the CPU)" },
        PIE_CLI_OPT_GPU(a->gpu),
        { 0 },
    };
    const pie_cmd_usage u = { "generate",
        "--model DIR (--prompt TEXT | --prompt-ids 1,2,3) [OPTIONS]",
        "Generates a continuation of the prompt and prints it as it is "
        "generated (only the continuation).", opts };
    char *pos[1];
    int npos, dd, rc = pie_opts_parse(&u, argc, argv, pos, 0, &npos, &dd);
    *status = rc < 0 ? 2 : 0;
    return rc == 0;
}

/* Opens the backend, its KV pool sized for n + max_gen tokens; -1 if not. */
static int open_backend(const gen_args *a, const pie_model *m, size_t n,
                        int max_gen, pie_backend **b)
{
    int64_t pages = ((int64_t)n + max_gen) / a->page_size + 2;
    if (pages > INT32_MAX) {
        fprintf(stderr, "pie generate: %zu prompt tokens and %d more need "
                "%lld KV pages of %d tokens, more than %d\n", n, max_gen,
                (long long)pages, a->page_size, INT32_MAX);
        return -1;
    }
    int brc = pie_cli_backend(a->backend, m, a->page_size, (int)pages,
                              a->threads, &a->gpu, b);
    if (brc) {
        if (brc == PIE_ENOMEM)
            fprintf(stderr, "pie generate: its KV pool holds the prompt and "
                    "%d tokens more (--max-tokens, at most the model's "
                    "context)\n", max_gen);
        return -1;
    }
    return 0;
}

/* Generates a continuation of ids, printing it; 0, or 1 after printing why. */
static int generate(const gen_args *a, pie_model *m, int32_t *ids, size_t n)
{
    pie_backend *b = NULL;
    pie_drv d = {0};
    int32_t *gen = NULL;
    int status = 1;
    int max_gen = gen_room(a, m, n);
    if (open_backend(a, m, n, max_gen, &b)) goto out;
    if (pie_drv_init(&d, b)) goto out;
    /* max_tokens <= PIE_CLI_MAX_TOKENS: the size cannot overflow */
    gen = malloc(sizeof(int32_t) * ((size_t)a->max_tokens + 1));
    if (!gen) {
        fprintf(stderr, "pie generate: out of memory for %d token ids\n",
                a->max_tokens);
        goto out;
    }
    long fwd = 0;
    int n_gen = run_loop(a, m, &d, ids, n, max_gen, gen, &fwd);
    if (n_gen < 0) goto out;
    if (a->json) print_json(m, gen, n_gen, fwd);
    else printf("\n");
    if (n_gen == max_gen && max_gen < a->max_tokens)
        fprintf(stderr, "pie generate: stopped after %d tokens: the model's "
                "context of %d tokens is full\n", n_gen, m->cfg.max_pos);
    status = 0;
out:
    pie_drv_free(&d);
    free(gen);
    pie_backend_free(b);
    return status;
}

int pie_cmd_generate(int argc, char **argv)
{
    gen_args a;
    int status;
    if (!parse_gen_args(argc, argv, &a, &status)) return status;
    if (!a.prompt == !a.prompt_ids) {
        fprintf(stderr, "pie generate: give exactly one of --prompt and "
                        "--prompt-ids\n");
        return 2;
    }
    if (check_gen_args(&a)) return 2;
    pie_model *m;
    int32_t *ids = NULL;
    size_t n = 0;
    if (a.prompt_ids && pie_cli_parse_ids(a.prompt_ids, &ids, &n)) {
        fprintf(stderr, "pie generate: bad --prompt-ids '%s' (expected "
                        "comma-separated ids)\n", a.prompt_ids);
        return 2;
    }
    if (pie_cli_load_model(a.model, &m)) {
        free(ids);
        return 1;
    }
    status = 1;
    if (!ids && encode_prompt(&a, m, &ids, &n)) goto out;
    if (check_prompt(m, ids, n)) goto out;
    status = generate(&a, m, ids, n);
out:
    free(ids);
    pie_model_free(m);
    return status;
}
