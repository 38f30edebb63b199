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

/* Appends the ids of one argument (list arg) to ids[*n..]; prints why and
 * returns exit code 2 on a bad list or more than DETOK_MAX_IDS ids. */
static int append_id_arg(const char *arg, int32_t *ids, size_t *n)
{
    int32_t *part;
    size_t k;
    if (pie_cli_parse_ids(arg, &part, &k)) {
        fprintf(stderr, "pie detokenize: bad id list '%s'\n", arg);
        return 2;
    }
    if (*n + k > DETOK_MAX_IDS) {
        fprintf(stderr, "pie detokenize: more than %d ids\n",
                DETOK_MAX_IDS);
        free(part);
        return 2;
    }
    memcpy(ids + *n, part, k * sizeof *part);
    *n += k;
    free(part);
    return 0;
}

/* Parses the id lists pos[0..npos) into *ids (malloc'ed, the caller frees)
 * and *n; prints why and returns exit code 1 (no memory) or 2 on failure. */
static int gather_ids(char **pos, int npos, int32_t **ids_out, size_t *n_out)
{
    int32_t *ids = malloc(sizeof(int32_t) * DETOK_MAX_IDS);
    size_t n = 0;
    if (!ids) {
        fprintf(stderr, "pie detokenize: out of memory\n");
        return 1;
    }
    for (int i = 0; i < npos; i++) {
        int rc = append_id_arg(pos[i], ids, &n);
        if (rc) {
            free(ids);
            return rc;
        }
    }
    *ids_out = ids;
    *n_out = n;
    return 0;
}

/* Decodes ids and prints the text and a newline; prints the error and
 * returns its code on failure. */
static int print_decoded(const pie_tokenizer *tok, const int32_t *ids,
                         size_t n)
{
    char *text = NULL;
    size_t len = 0;
    int rc = pie_tokenizer_decode(tok, ids, n, false, &text, &len);
    if (rc) fprintf(stderr, "pie detokenize: %s\n", pie_err_msg());
    else printf("%s\n", text);
    free(text);
    return rc;
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
    int32_t *ids;
    size_t n;
    rc = gather_ids(pos, npos, &ids, &n);
    if (rc) return rc;
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
    rc = print_decoded(m->tok, ids, n);
    free(ids);
    pie_model_free(m);
    return rc ? 1 : 0;
}
