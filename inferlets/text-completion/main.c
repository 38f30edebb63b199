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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

int main(int argc, char **argv)
{
    const char *prompt = NULL, *system = NULL, *chat = "auto", *stop = NULL,
               *model = NULL;
    int32_t max_tokens = 64, top_k = 0, lookahead = 0;
    float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f;
    uint64_t seed = 0;
    bool json = false, ignore_eos = false;
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &prompt, "prompt text (required)" },
        { "max-tokens", PIE_ARG_INT, &max_tokens, "tokens to generate (64)" },
        { "temperature", PIE_ARG_FLOAT, &temperature, "0 = greedy (1.0)" },
        { "top-p", PIE_ARG_FLOAT, &top_p, "nucleus mass (1.0)" },
        { "top-k", PIE_ARG_INT, &top_k, "keep the k most likely (0 = all)" },
        { "min-p", PIE_ARG_FLOAT, &min_p, "min-p filter (0)" },
        { "seed", PIE_ARG_U64, &seed, "sampling seed (0)" },
        { "system", PIE_ARG_STR, &system, "system prompt (chat models)" },
        { "chat", PIE_ARG_STR, &chat, "auto, none, llama3, chatml, llama2" },
        { "stop", PIE_ARG_STR, &stop, "stop string" },
        { "ignore-eos", PIE_ARG_FLAG, &ignore_eos, "do not stop at EOS" },
        { "lookahead", PIE_ARG_INT, &lookahead, "decode steps queued (4)" },
        { "model", PIE_ARG_STR, &model, "served model name (default)" },
        { "json", PIE_ARG_FLAG, &json, "send {\"ids\":[...],\"text\":...}" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "Continues --prompt.");
    if (rc) return rc < 0 ? 2 : 0;
    if (!prompt) {
        fprintf(stderr, "text-completion: --prompt is required\n");
        return 2;
    }
    pie_lm lm;
    pie_ctx ctx;
    pie_gen g;
    if ((rc = pie_lm_open(&lm, model))) goto fail;
    int fmt = strcmp(chat, "auto") ? pie_chat_parse(chat) : pie_chat_detect(&lm);
    if (fmt < 0) {
        fprintf(stderr, "text-completion: unknown --chat '%s'\n", chat);
        return 2;
    }
    pie_chat_add_stops((pie_chat_fmt)fmt, &lm);
    pie_ctx_init(&ctx, &lm);
    if ((rc = pie_chat_fill(&ctx, (pie_chat_fmt)fmt, system, prompt))) goto fail;
    pie_gen_opts o = {
        .s = { .temperature = temperature, .top_k = top_k, .top_p = top_p,
               .min_p = min_p, .seed = seed },
        .max_tokens = max_tokens, .ignore_eos = ignore_eos,
        .lookahead = lookahead, .stop = &stop, .n_stop = stop ? 1 : 0,
        .on_text = json ? NULL : pie_text_send,
    };
    if (max_tokens <= 0) return 0;
    if ((rc = pie_generate(&ctx, &o, &g))) goto fail;
    if (json) {
        char *b = NULL;
        size_t len = 0, cap = 0;
        char num[32];
        pie_buf_append(&b, &len, &cap, "{\"ids\":[", 8);
        for (int32_t i = 0; i < g.n_ids; i++) {
            int k = snprintf(num, sizeof num, "%s%d", i ? "," : "", g.ids[i]);
            pie_buf_append(&b, &len, &cap, num, (size_t)k);
        }
        pie_buf_append(&b, &len, &cap, "],\"text\":", 9);
        pie_json_str(&b, &len, &cap, g.text ? g.text : "", g.text_len);
        static const char *reasons[] = { "none", "eos", "stop", "max",
                                         "error" };
        int k = snprintf(num, sizeof num, ",\"stop\":\"%s\"}\n",
                         reasons[g.stop]);
        pie_buf_append(&b, &len, &cap, num, (size_t)k);
        pie_send(b, (uint32_t)len);
        free(b);
    }
    pie_gen_free(&g);
    pie_ctx_release(&ctx);
    pie_lm_close(&lm);
    return 0;
fail:
    fprintf(stderr, "text-completion: %s\n", pie_sdk_error());
    return 1;
}
