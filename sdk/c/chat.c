/*
 * chat.c — chat prompt templates. Each format is a few literal strings
 * around the system and user turns, matching the Hugging Face templates of
 * Llama 3 ("<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>"),
 * ChatML (Qwen: "<|im_start|>role\n...<|im_end|>\n") and Llama 2
 * ("[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST]"). NONE (stories260K and
 * other base models) is the user text alone with BOS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

static int32_t tok_id(const pie_lm *m, const char *s)
{
    return pie_model_token_id(m->h, s, (uint32_t)strlen(s));
}

pie_chat_fmt pie_chat_detect(const pie_lm *m)
{
    if (tok_id(m, "<|start_header_id|>") >= 0 && tok_id(m, "<|eot_id|>") >= 0)
        return PIE_CHAT_LLAMA3;
    if (tok_id(m, "<|im_start|>") >= 0 && tok_id(m, "<|im_end|>") >= 0)
        return PIE_CHAT_CHATML;
    return PIE_CHAT_NONE;
}

int pie_chat_parse(const char *name)
{
    static const char *names[] = { "none", "llama3", "chatml", "llama2" };
    for (int i = 0; i < 4; i++)
        if (!strcmp(name, names[i])) return i;
    return -1;
}

char *pie_chat_prompt(pie_chat_fmt f, const char *system, const char *user)
{
    size_t n = strlen(user) + (system ? strlen(system) : 0) + 256;
    char *p = malloc(n);
    if (!p) return NULL;
    bool sys = system && *system;
    switch (f) {
    case PIE_CHAT_LLAMA3:
        snprintf(p, n, "<|begin_of_text|>%s%s%s<|start_header_id|>user"
                 "<|end_header_id|>\n\n%s<|eot_id|><|start_header_id|>"
                 "assistant<|end_header_id|>\n\n",
                 sys ? "<|start_header_id|>system<|end_header_id|>\n\n" : "",
                 sys ? system : "", sys ? "<|eot_id|>" : "", user);
        break;
    case PIE_CHAT_CHATML:
        snprintf(p, n, "%s%s%s<|im_start|>user\n%s<|im_end|>\n"
                 "<|im_start|>assistant\n", sys ? "<|im_start|>system\n" : "",
                 sys ? system : "", sys ? "<|im_end|>\n" : "", user);
        break;
    case PIE_CHAT_LLAMA2:
        snprintf(p, n, "[INST] %s%s%s%s [/INST]", sys ? "<<SYS>>\n" : "",
                 sys ? system : "", sys ? "\n<</SYS>>\n\n" : "", user);
        break;
    default:
        snprintf(p, n, "%s", user);
    }
    return p;
}

void pie_chat_add_stops(pie_chat_fmt f, pie_lm *m)
{
    if (f == PIE_CHAT_LLAMA3) pie_lm_add_eos(m, tok_id(m, "<|eot_id|>"));
    if (f == PIE_CHAT_CHATML) pie_lm_add_eos(m, tok_id(m, "<|im_end|>"));
}

int pie_chat_fill(pie_ctx *c, pie_chat_fmt f, const char *system,
                  const char *user)
{
    char *p = pie_chat_prompt(f, system, user);
    if (!p) return pie_sdk_fail(PIE_ENOMEM, "out of memory");
    /* Llama 3 carries its BOS in the text; Llama 2 and plain prompts get
     * the tokenizer's BOS; ChatML has none. */
    bool bos = f == PIE_CHAT_NONE || f == PIE_CHAT_LLAMA2;
    int rc = pie_ctx_fill(c, p, bos);
    free(p);
    return rc;
}
