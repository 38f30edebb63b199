/*
 * text-completion — continues a prompt and sends only the generated text
 * to the client, piece by piece as it is decoded.
 *
 *   pie run text-completion -- --prompt "Once upon a time" --max-tokens 40
 *
 * Chat models (Llama 3, ChatML) get their chat template around the prompt
 * (and --system); base models such as stories260K take the prompt as is,
 * with BOS. --json sends one {"ids":[...],"text":"..."} message instead.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

/* The command-line options; parse_args sets their defaults. */
typedef struct opts {
    const char *prompt, *prompt_ids, *system, *chat, *stop, *model;
    int32_t     max_tokens, top_k, lookahead;
    float       temperature, top_p, min_p;
    uint64_t    seed;
    bool        json, ignore_eos, no_text;
} opts;

/* Parses argv into a: 0 to go on, 1 after --help, -1 for bad arguments. */
static int parse_args(int argc, char **argv, opts *a)
{
    *a = (opts){ .chat = "auto", .max_tokens = 64, .temperature = 1.0f,
                 .top_p = 1.0f };
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &a->prompt, "prompt text" },
        { "prompt-ids", PIE_ARG_STR, &a->prompt_ids, "prompt as token ids "
          "1,2,3 (used as given, no template)" },
        { "no-text", PIE_ARG_FLAG, &a->no_text, "ids only: no decoding (with "
          "--json; for models without a tokenizer)" },
        { "max-tokens", PIE_ARG_INT, &a->max_tokens,
          "tokens to generate (64)" },
        { "temperature", PIE_ARG_FLOAT, &a->temperature, "0 = greedy (1.0)" },
        { "top-p", PIE_ARG_FLOAT, &a->top_p, "nucleus mass (1.0)" },
        { "top-k", PIE_ARG_INT, &a->top_k, "keep the k most likely (0 = all)" },
        { "min-p", PIE_ARG_FLOAT, &a->min_p, "min-p filter (0)" },
        { "seed", PIE_ARG_U64, &a->seed, "sampling seed (0)" },
        { "system", PIE_ARG_STR, &a->system, "system prompt (chat models)" },
        { "chat", PIE_ARG_STR, &a->chat, "auto, none, llama3, chatml, llama2" },
        { "stop", PIE_ARG_STR, &a->stop, "stop string" },
        { "ignore-eos", PIE_ARG_FLAG, &a->ignore_eos, "do not stop at EOS" },
        { "lookahead", PIE_ARG_INT, &a->lookahead, "decode steps queued (4)" },
        { "model", PIE_ARG_STR, &a->model, "served model name (default)" },
        { "json", PIE_ARG_FLAG, &a->json, "send {\"ids\":[...],\"text\":...}" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "Continues --prompt.");
    if (rc) return rc;
    if (!a->prompt == !a->prompt_ids) {
        fprintf(stderr, "text-completion: give one of --prompt and "
                        "--prompt-ids\n");
        return -1;
    }
    return 0;
}

/* The chat format --chat names (or the model's, for "auto"); -1 if unknown. */
static int chat_format(const opts *a, pie_lm *lm)
{
    int fmt = strcmp(a->chat, "auto") ? pie_chat_parse(a->chat)
                                      : pie_chat_detect(lm);
    if (fmt < 0)
        fprintf(stderr, "text-completion: unknown --chat '%s'\n", a->chat);
    return fmt;
}

/* Fills a comma-separated id list ("1,2,3") into the context; the list
 * may be as long as the argument (the buffer grows). */
static int fill_ids(pie_ctx *ctx, const char *list)
{
    int32_t *ids = NULL, n = 0, cap = 0;
    int rc = PIE_EINVAL;
    for (const char *p = list; *p;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 0x7fffffff ||
            (*end && *end != ',')) {
            fprintf(stderr, "text-completion: bad --prompt-ids '%.64s%s'\n",
                    list, strlen(list) > 64 ? "..." : "");
            goto out;
        }
        if (n == cap) {
            int32_t nc = !cap ? 4096 : cap <= INT32_MAX / 2 ? 2 * cap : 0;
            int32_t *ni = nc ? realloc(ids, (size_t)nc * sizeof *ids) : NULL;
            if (!ni) {
                fprintf(stderr, "text-completion: --prompt-ids: out of "
                        "memory after %d ids\n", n);
                rc = PIE_ENOMEM;
                goto out;
            }
            ids = ni;
            cap = nc;
        }
        ids[n++] = (int32_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    rc = n ? pie_ctx_fill_ids(ctx, ids, n) : PIE_EINVAL;
out:
    free(ids);
    return rc;
}

/* Fills the prompt: --prompt-ids as given, or --prompt in its template. */
static int fill_prompt(pie_ctx *ctx, const opts *a, pie_chat_fmt fmt)
{
    if (a->prompt_ids) return fill_ids(ctx, a->prompt_ids);
    return pie_chat_fill(ctx, fmt, a->system, a->prompt);
}

/* The generation options; .stop points into a, which must outlive the run. */
static pie_gen_opts gen_opts(const opts *a)
{
    return (pie_gen_opts){
        .s = { .temperature = a->temperature, .top_k = a->top_k,
               .top_p = a->top_p, .min_p = a->min_p, .seed = a->seed },
        .max_tokens = a->max_tokens, .ignore_eos = a->ignore_eos,
        .lookahead = a->lookahead, .stop = &a->stop, .n_stop = a->stop ? 1 : 0,
        .on_text = a->json || a->no_text ? NULL : pie_text_send,
        .no_text = a->no_text,
    };
}

/* Sends {"ids":[...],"text":"...","stop":"..."} as one message. */
static void send_json(const pie_gen *g)
{
    static const char *reasons[] = { "none", "eos", "stop", "max", "error" };
    char more[32];
    snprintf(more, sizeof more, ",\"stop\":\"%s\"", reasons[g->stop]);
    pie_send_gen_json(g, more);
}

int main(int argc, char **argv)
{
    opts a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 2 : 0;
    pie_lm lm;
    pie_ctx ctx;
    pie_gen g;
    if ((rc = pie_lm_open(&lm, a.model))) goto fail;
    int fmt = chat_format(&a, &lm);
    if (fmt < 0) return 2;
    pie_chat_add_stops((pie_chat_fmt)fmt, &lm);
    pie_ctx_init(&ctx, &lm);
    if ((rc = fill_prompt(&ctx, &a, (pie_chat_fmt)fmt))) goto fail;
    if (a.max_tokens <= 0) return 0;
    pie_gen_opts o = gen_opts(&a);
    if ((rc = pie_generate(&ctx, &o, &g))) goto fail;
    if (a.json) send_json(&g);
    pie_gen_free(&g);
    pie_ctx_release(&ctx);
    pie_lm_close(&lm);
    return 0;
fail:
    fprintf(stderr, "text-completion: %s\n", pie_sdk_error());
    return 1;
}
