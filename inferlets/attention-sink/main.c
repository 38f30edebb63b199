/*
 * attention-sink — generation with a bounded KV cache (StreamingLLM): the
 * first --sink-pages pages of the sequence stay, plus a sliding window of
 * the last --window-pages full pages and the page being written. Pages
 * that leave the window are freed (kv_free) at once, so the pages held
 * never exceed sink + window + 1 (checked after every step) however long the generation runs. Tokens
 * keep their absolute positions.
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

int main(int argc, char **argv)
{
    const char *prompt = NULL;
    int32_t max_tokens = 256, sink = 1, window = 4;
    float temperature = 0.0f;
    uint64_t seed = 0;
    bool json = false;
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &prompt, "prompt text (required)" },
        { "max-tokens", PIE_ARG_INT, &max_tokens, "tokens to generate (256)" },
        { "sink-pages", PIE_ARG_INT, &sink, "pages kept at the start (1)" },
        { "window-pages", PIE_ARG_INT, &window, "full pages in the window (4)" },
        { "temperature", PIE_ARG_FLOAT, &temperature, "0 = greedy (0)" },
        { "seed", PIE_ARG_U64, &seed, "sampling seed (0)" },
        { "json", PIE_ARG_FLAG, &json, "send one JSON message" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "Sink + sliding-window KV.");
    if (rc) return rc < 0 ? 2 : 0;
    /* sink + window + 1 (the bound) must fit an int32 */
    if (!prompt || sink < 0 || window < 1 || max_tokens < 1 ||
        (int64_t)sink + window + 1 > INT32_MAX) {
        fprintf(stderr, "attention-sink: need --prompt, --sink-pages >= 0, "
                        "--window-pages >= 1 (together below 2^31 - 1), "
                        "--max-tokens >= 1\n");
        return 2;
    }
    pie_lm lm;
    pie_ctx c;
    pie_gen g;
    if ((rc = pie_lm_open(&lm, NULL))) goto fail;
    pie_ctx_init(&c, &lm);
    if ((rc = pie_chat_fill(&c, pie_chat_detect(&lm), NULL, prompt))) goto fail;
    pie_gen_opts o = { .s = { .temperature = temperature, .seed = seed },
                       .max_tokens = max_tokens, .lookahead = 1,
                       .ignore_eos = true,
                       .on_text = json ? NULL : pie_text_send };
    int32_t bound = sink + window + 1, max_held = 0;
    if ((rc = pie_gen_start(&g, &c, &o))) goto fail;
    while ((rc = pie_gen_step(&g)) > 0) {
        if (c.n_pages > max_held) max_held = c.n_pages;
        while (c.kv_len / lm.page_size > sink + window)
            if ((rc = pie_ctx_drop_page(&c, sink))) goto fail;
    }
    if (rc < 0) goto fail;
    if (c.n_pages > max_held) max_held = c.n_pages;
    if (json) {
        char *b = NULL, num[48];
        size_t len = 0, cap = 0;
        pie_buf_append(&b, &len, &cap, "{\"ids\":[", 8);
        for (int32_t i = 0; i < g.n_ids; i++) {
            int k = snprintf(num, sizeof num, "%s%d", i ? "," : "", g.ids[i]);
            pie_buf_append(&b, &len, &cap, num, (size_t)k);
        }
        pie_buf_append(&b, &len, &cap, "],\"text\":", 9);
        pie_json_str(&b, &len, &cap, g.text ? g.text : "", g.text_len);
        int k = snprintf(num, sizeof num, ",\"max_pages\":%d,\"bound\":%d}\n",
                         max_held, bound);
        pie_buf_append(&b, &len, &cap, num, (size_t)k);
        pie_send(b, (uint32_t)len);
        free(b);
    } else {
        fprintf(stderr, "attention-sink: max pages held: %d (bound %d)\n",
                max_held, bound);
    }
    pie_gen_free(&g);
    pie_ctx_release(&c);
    pie_lm_close(&lm);
    return 0;
fail:
    fprintf(stderr, "attention-sink: %s\n", pie_sdk_error());
    return 1;
}
