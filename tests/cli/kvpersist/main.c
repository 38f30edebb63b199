/*
 * kvpersist — test inferlet for `pie run --kv-dir`.
 *
 *   kvpersist save --ids 1,2,3     fills the ids and exports the KV of all
 *                                  but the last (export flushes, keeping one
 *                                  token pending) as "story"; pie saves it
 *   kvpersist load --ids 1,2,3 --n N
 *                                  imports "story" (the KV of all ids but the
 *                                  last, computed by an earlier pie process),
 *                                  generates N greedy tokens and sends
 *                                  {"ids":[...]}; fails if "story" is absent
 *   --name NAME                    the export's name instead of "story"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

static int32_t parse_ids(const char *s, int32_t *ids, int32_t cap)
{
    int32_t n = 0;
    while (s && *s && n < cap) {
        char *end;
        ids[n++] = (int32_t)strtol(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        if (end == s && *s) return -1;
    }
    return n;
}

int main(int argc, char **argv)
{
    const char *ids_s = NULL, *name = "story";
    int32_t n_gen = 16, ids[1024];
    const pie_arg args[] = {
        { "ids", PIE_ARG_STR, &ids_s, "token ids" },
        { "n", PIE_ARG_INT, &n_gen, "tokens to generate (load)" },
        { "name", PIE_ARG_STR, &name, "the export's name" },
        { 0 },
    };
    if (argc < 2) return 2;
    int rc = pie_args_parse(argc - 1, argv + 1, args, "save | load");
    int32_t n = parse_ids(ids_s, ids, 1024);
    if (rc || n < 2) return 2;
    pie_lm lm;
    pie_ctx ctx;
    if (pie_lm_open(&lm, NULL)) return 1;
    if (!strcmp(argv[1], "save") || !strcmp(argv[1], "both")) {
        pie_ctx_init(&ctx, &lm);
        if (pie_ctx_fill_ids(&ctx, ids, n) || pie_ctx_export(&ctx, name))
            goto fail;
        if (strcmp(argv[1], "both")) return 0;
    }
    if (pie_ctx_import(&ctx, &lm, name, ids, n, n - 1)) goto fail;
    pie_gen_opts o = { .s = { .temperature = 0 }, .max_tokens = n_gen,
                       .ignore_eos = true, .no_text = true };
    pie_gen g;
    if (pie_generate(&ctx, &o, &g)) goto fail;
    char buf[8192];
    size_t k = (size_t)snprintf(buf, sizeof buf, "{\"ids\":[");
    for (int32_t i = 0; i < g.n_ids && k < sizeof buf - 16; i++)
        k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%d", i ? "," : "",
                              g.ids[i]);
    k += (size_t)snprintf(buf + k, sizeof buf - k, "]}\n");
    pie_send(buf, (uint32_t)k);
    return 0;
fail:
    fprintf(stderr, "kvpersist: %s\n", pie_sdk_error());
    return 1;
}
