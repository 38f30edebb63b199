/*
 * cmd_tokenize.c — `pie tokenize` and `pie detokenize`: the model's
 * tokenizer from the command line. tokenize never adds BOS/EOS; special-token
 * strings inside the text are matched.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "common/pie_err.h"
#include "model/tokenizer.h"

#define DETOK_MAX_IDS (4096 * 8)    /* ids one detokenize call decodes     */

static int need_tokenizer(const pie_model *m)
{
    if (m->tok) return 0;
    fprintf(stderr, "pie: model %s has no tokenizer.json\n", m->dir);
    return -1;
}

int pie_cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL;
    bool json = false;
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &model, "model directory (Hugging Face layout)" },
        { "json", 0, OPT_FLAG, &json, "print {\"ids\":[...]}" },
        { 0 },
    };
    const pie_cmd_usage u = { "tokenize", "--model DIR [--json] TEXT",
        "Prints the token ids of TEXT alone (no BOS/EOS added).", opts };
    char *pos[2];
    int npos, dd, rc = pie_opts_parse(&u, argc, argv, pos, 2, &npos, &dd);
    if (rc) return rc < 0 ? 2 : 0;
    if (npos != 1) {
        fprintf(stderr, "pie tokenize: expected one TEXT argument\n");
        return 2;
    }
    pie_model *m;
    if (pie_cli_load_model(model, &m)) return 1;
    if (need_tokenizer(m)) {
        pie_model_free(m);
        return 1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    if (pie_tokenizer_encode(m->tok, pos[0], strlen(pos[0]), false, &ids, &n)) {
        fprintf(stderr, "pie tokenize: %s\n", pie_err_msg());
        pie_model_free(m);
        return 1;
    }
    printf(json ? "{\"ids\":[" : "");
    for (size_t i = 0; i < n; i++)
        printf("%s%d", i ? (json ? "," : " ") : "", ids[i]);
    printf(json ? "]}\n" : "\n");
    free(ids);
    pie_model_free(m);
    return 0;
}

int pie_cmd_detokenize(int argc, char **argv)
{
    const char *model = NULL;
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &model, "model directory (Hugging Face layout)" },
        { 0 },
    };
    const pie_cmd_usage u = { "detokenize", "--model DIR ID...",
        "Prints the text of the token ids (given as separate arguments or "
        "comma-separated).", opts };
    char *pos[4096];
    int npos, dd, rc = pie_opts_parse(&u, argc, argv, pos, 4096, &npos, &dd);
    if (rc) return rc < 0 ? 2 : 0;
    if (npos == 0) {
        fprintf(stderr, "pie detokenize: give the token ids to decode (see "
                "--help)\n");
        return 2;
    }
    int32_t *ids = malloc(sizeof(int32_t) * DETOK_MAX_IDS);
    size_t n = 0;
    if (!ids) {
        fprintf(stderr, "pie detokenize: out of memory\n");
        return 1;
    }
    for (int i = 0; i < npos; i++) {
        int32_t *part;
        size_t k;
        if (pie_cli_parse_ids(pos[i], &part, &k)) {
            fprintf(stderr, "pie detokenize: bad id list '%s'\n", pos[i]);
            free(ids);
            return 2;
        }
        if (n + k > DETOK_MAX_IDS) {
            fprintf(stderr, "pie detokenize: more than %d ids\n",
                    DETOK_MAX_IDS);
            free(part);
            free(ids);
            return 2;
        }
        memcpy(ids + n, part, k * sizeof *part);
        n += k;
        free(part);
    }
    pie_model *m;
    if (pie_cli_load_model(model, &m)) {
        free(ids);
        return 1;
    }
    if (need_tokenizer(m)) {
        free(ids);
        pie_model_free(m);
        return 1;
    }
    char *text = NULL;
    size_t len = 0;
    rc = pie_tokenizer_decode(m->tok, ids, n, false, &text, &len);
    if (rc) fprintf(stderr, "pie detokenize: %s\n", pie_err_msg());
    else printf("%s\n", text);
    free(text);
    free(ids);
    pie_model_free(m);
    return rc ? 1 : 0;
}
