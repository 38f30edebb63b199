/*
 * parallel-generation — fills a prompt once, exports its KV pages under a
 * name, and generates N branches that each import those pages (sharing them
 * read-only; each copies only the partial last page) and decode
 * concurrently, their forwards batched together by the scheduler.
 *
 *   pie run parallel-generation -- --prompt "Once upon a time" --n 4
 *
 * Branch i samples with seed + i. Output: one message per branch,
 * "[i] text\n", in branch order; --json sends {"branches":[{"ids":[...],
 * "text":"..."},...]} instead.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

/* The command-line options; parse_args sets their defaults. */
typedef struct opts {
    const char *prompt;
    int32_t     n, max_tokens;
    float       temperature, top_p;
    uint64_t    seed;
    bool        json;
} opts;

/* Parses argv into a: 0 to go on, 1 after --help, -1 for bad arguments. */
static int parse_args(int argc, char **argv, opts *a)
{
    *a = (opts){ .n = 4, .max_tokens = 32, .temperature = 1.0f,
                 .top_p = 1.0f };
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &a->prompt, "prompt text (required)" },
        { "n", PIE_ARG_INT, &a->n, "branches (4)" },
        { "max-tokens", PIE_ARG_INT, &a->max_tokens, "tokens per branch (32)" },
        { "temperature", PIE_ARG_FLOAT, &a->temperature, "0 = greedy (1.0)" },
        { "top-p", PIE_ARG_FLOAT, &a->top_p, "nucleus mass (1.0)" },
        { "seed", PIE_ARG_U64, &a->seed, "branch i uses seed + i (0)" },
        { "json", PIE_ARG_FLAG, &a->json,
          "one JSON message with all branches" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "N branches from one prefill.");
    if (rc) return rc;
    if (!a->prompt || a->n < 1 || a->n > 256 || a->max_tokens < 1) {
        fprintf(stderr, "parallel-generation: need --prompt, 1 <= --n <= 256, "
                        "--max-tokens >= 1\n");
        return -1;
    }
    return 0;
}

/* Fills the prompt into root; exports its pages under a per-instance name. */
static int export_prompt(pie_lm *lm, pie_ctx *root, const char *prompt,
                         char *name, size_t size)
{
    pie_ctx_init(root, lm);
    snprintf(name, size, "parallel-generation/%u", pie_instance_id());
    int rc = pie_chat_fill(root, pie_chat_detect(lm), NULL, prompt);
    return rc ? rc : pie_ctx_export(root, name);
}

/* Imports the export into each branch and starts its generation. */
static int start_branches(const opts *a, pie_lm *lm, const pie_ctx *root,
                          const char *name, pie_ctx *br, pie_gen *g)
{
    for (int32_t i = 0; i < a->n; i++) {
        pie_gen_opts o = {
            .s = { .temperature = a->temperature, .top_p = a->top_p,
                   .seed = a->seed + (uint64_t)i },
            .max_tokens = a->max_tokens,
        };
        int rc = pie_ctx_import(&br[i], lm, name, root->tokens,
                                root->n_tokens, root->n_kv);
        if (!rc) rc = pie_gen_start(&g[i], &br[i], &o);
        if (rc) return rc;
    }
    return 0;
}

/* Sends {"branches":[{"ids":[...],"text":"..."},...]} as one message. */
static int send_json(const pie_gen *g, int32_t n)
{
    char *b = NULL;
    size_t len = 0, cap = 0;
    pie_buf_append(&b, &len, &cap, "{\"branches\":[", 13);
    for (int32_t i = 0; i < n; i++) {
        pie_buf_append(&b, &len, &cap, i ? ",{" : "{", i ? 2 : 1);
        pie_json_ids_text(&b, &len, &cap, g[i].ids, g[i].n_ids, g[i].text,
                          g[i].text_len);
        pie_buf_append(&b, &len, &cap, "}", 1);
    }
    int rc = pie_buf_append(&b, &len, &cap, "]}\n", 3);
    if (!rc) pie_send(b, (uint32_t)len);
    free(b);
    return rc;
}

/* Sends "[i] text\n" for each branch, in branch order. */
static void send_text(const pie_gen *g, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        char hdr[32];
        snprintf(hdr, sizeof hdr, "[%d] ", i);
        pie_send_str(hdr);
        pie_send(g[i].text ? g[i].text : "", (uint32_t)g[i].text_len);
        pie_send_str("\n");
    }
}

int main(int argc, char **argv)
{
    opts a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 2 : 0;
    pie_lm lm;
    pie_ctx root, *br = calloc((size_t)a.n, sizeof *br);
    pie_gen *g = calloc((size_t)a.n, sizeof *g);
    char name[64];
    if (!br || !g) return 1;
    if ((rc = pie_lm_open(&lm, NULL))) goto fail;
    if ((rc = export_prompt(&lm, &root, a.prompt, name, sizeof name)))
        goto fail;
    pie_chat_add_stops(pie_chat_detect(&lm), &lm);
    if ((rc = start_branches(&a, &lm, &root, name, br, g))) goto fail;
    pie_kv_unexport(lm.h, name, (uint32_t)strlen(name));
    pie_ctx_release(&root);            /* the branches keep the pages alive */
    if ((rc = pie_gen_run(g, a.n))) goto fail;
    if (a.json) rc = send_json(g, a.n);
    else send_text(g, a.n);
    for (int32_t i = 0; i < a.n; i++) {
        pie_gen_free(&g[i]);
        pie_ctx_release(&br[i]);
    }
    free(g);
    free(br);
    pie_lm_close(&lm);
    return rc ? 1 : 0;
fail:
    fprintf(stderr, "parallel-generation: %s\n", pie_sdk_error());
    return 1;
}
