/*
 * attention-sink — generation with a bounded KV cache (StreamingLLM): the
 * first --sink-pages pages of the sequence stay, plus a sliding window of
 * the last --window-pages full pages and the page being written. Pages
 * that leave the window are freed (kv_free) at once, so the pages held
 * never exceed sink + window + 1 (checked after every step) however long
 * the generation runs. Tokens keep their absolute positions.
 *
 *   pie run attention-sink -- --prompt "Once upon a time" --max-tokens 500
 *
 * Sends the generated text; at the end writes "max pages held: M (bound B)"
 * to stderr (--json: {"ids":[...],"text":"...","max_pages":M,"bound":B}).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

/* The command-line options; parse_args sets their defaults. */
typedef struct opts {
    const char *prompt;
    int32_t     max_tokens, sink, window;
    float       temperature;
    uint64_t    seed;
    bool        json;
} opts;

/* Parses argv into a: 0 to go on, 1 after --help, -1 for bad arguments. */
static int parse_args(int argc, char **argv, opts *a)
{
    *a = (opts){ .max_tokens = 256, .sink = 1, .window = 4 };
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &a->prompt, "prompt text (required)" },
        { "max-tokens", PIE_ARG_INT, &a->max_tokens,
          "tokens to generate (256)" },
        { "sink-pages", PIE_ARG_INT, &a->sink, "pages kept at the start (1)" },
        { "window-pages", PIE_ARG_INT, &a->window,
          "full pages in the window (4)" },
        { "temperature", PIE_ARG_FLOAT, &a->temperature, "0 = greedy (0)" },
        { "seed", PIE_ARG_U64, &a->seed, "sampling seed (0)" },
        { "json", PIE_ARG_FLAG, &a->json, "send one JSON message" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "Sink + sliding-window KV.");
    if (rc) return rc;
    /* sink + window + 1 (the bound) must fit an int32 */
    if (!a->prompt || a->sink < 0 || a->window < 1 || a->max_tokens < 1 ||
        (int64_t)a->sink + a->window + 1 > INT32_MAX) {
        fprintf(stderr, "attention-sink: need --prompt, --sink-pages >= 0, "
                        "--window-pages >= 1 (together below 2^31 - 1), "
                        "--max-tokens >= 1\n");
        return -1;
    }
    return 0;
}

/* Steps g to its end, freeing pages past the window; notes the most held. */
static int run_windowed(pie_gen *g, pie_ctx *c, const opts *a,
                        int32_t *max_held)
{
    int rc;
    while ((rc = pie_gen_step(g)) > 0) {
        if (c->n_pages > *max_held) *max_held = c->n_pages;
        while (c->kv_len / c->lm->page_size > a->sink + a->window)
            if ((rc = pie_ctx_drop_page(c, a->sink))) return rc;
    }
    if (rc < 0) return rc;
    if (c->n_pages > *max_held) *max_held = c->n_pages;
    return 0;
}

/* Sends {"ids":[...],"text":"...","max_pages":M,"bound":B} as one message. */
static void send_json(const pie_gen *g, int32_t max_held, int32_t bound)
{
    char more[48];
    snprintf(more, sizeof more, ",\"max_pages\":%d,\"bound\":%d", max_held,
             bound);
    pie_send_gen_json(g, more);
}

int main(int argc, char **argv)
{
    opts a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 2 : 0;
    pie_lm lm;
    pie_ctx c;
    pie_gen g;
    if ((rc = pie_lm_open(&lm, NULL))) goto fail;
    pie_ctx_init(&c, &lm);
    if ((rc = pie_chat_fill(&c, pie_chat_detect(&lm), NULL, a.prompt)))
        goto fail;
    pie_gen_opts o = { .s = { .temperature = a.temperature, .seed = a.seed },
                       .max_tokens = a.max_tokens, .lookahead = 1,
                       .ignore_eos = true,
                       .on_text = a.json ? NULL : pie_text_send };
    int32_t bound = a.sink + a.window + 1, max_held = 0;
    if ((rc = pie_gen_start(&g, &c, &o))) goto fail;
    if ((rc = run_windowed(&g, &c, &a, &max_held))) goto fail;
    if (a.json)
        send_json(&g, max_held, bound);
    else
        fprintf(stderr, "attention-sink: max pages held: %d (bound %d)\n",
                max_held, bound);
    pie_gen_free(&g);
    pie_ctx_release(&c);
    pie_lm_close(&lm);
    return 0;
fail:
    fprintf(stderr, "attention-sink: %s\n", pie_sdk_error());
    return 1;
}
