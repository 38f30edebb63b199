/*
 * beam-search — keeps the --beams most likely continuations (sum of token
 * log-probabilities). Each step forwards every live beam at once (one
 * top-k probe row each, batched by the scheduler), ranks the beams x k
 * candidates, and forks the winners from their parents: a fork shares the
 * parent's full pages and copies only the partial last one, when the child
 * appends. Beams that emit EOS are finished; the search ends when --beams
 * beams have finished or after --max-tokens steps.
 *
 *   pie run beam-search -- --prompt "Once upon a time" --beams 4
 *
 * Sends the best sequence's text (--json: {"ids":[...],"text":"...",
 * "logprob":x}). With --beams 1 it is greedy decoding.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

#define MAX_BEAMS 16

typedef struct beam {
    pie_ctx ctx;
    double  score;                   /* sum of log p of the generated ids   */
    int32_t n_gen;                   /* generated ids (ctx tail)            */
} beam;

typedef struct cand {
    double  score;
    int32_t parent, tok;
} cand;

static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    if (x->parent != y->parent) return x->parent - y->parent;
    return x->tok - y->tok;
}

/* One step: expands live[0..n) into the best nb candidates. */
static int expand(pie_lm *lm, beam *live, int32_t n, int32_t nb, cand *out,
                  int32_t *n_out)
{
    int32_t futs[MAX_BEAMS];
    cand c[MAX_BEAMS * MAX_BEAMS];
    int32_t nc = 0, rc = 0;
    pie_out o = { .kind = PIE_PROBE_TOPK, .top_k = nb, .temperature = 1.0f };
    for (int32_t i = 0; i < n; i++) {
        futs[i] = pie_ctx_submit(&live[i].ctx, &o);
        if (futs[i] < 0) return futs[i];
    }
    for (int32_t i = 0; i < n; i++) {
        float p[MAX_BEAMS];
        int32_t ids[MAX_BEAMS];
        int32_t st = pie_future_wait(futs[i]);
        int32_t k = st < 0 ? st : pie_forward_read_values(futs[i], 0, p, ids, nb);
        pie_future_free(futs[i]);
        if (k < 0) {
            rc = pie_sdk_fail(k, "top-k forward failed (%d)", k);
            continue;
        }
        for (int32_t j = 0; j < k && j < nb; j++)
            if (p[j] > 0 && ids[j] >= 0)
                c[nc++] = (cand){ live[i].score + log(p[j]), i, ids[j] };
    }
    if (rc) return rc;
    qsort(c, (size_t)nc, sizeof *c, cand_cmp);
    *n_out = nc < nb ? nc : nb;
    memcpy(out, c, sizeof(cand) * (size_t)*n_out);
    (void)lm;
    return 0;
}

static void send_result(const beam *b, bool json)
{
    const pie_ctx *c = &b->ctx;
    const int32_t *ids = c->tokens + c->n_tokens - b->n_gen;
    int32_t n = b->n_gen;
    if (n > 0 && pie_lm_is_eos(c->lm, ids[n - 1])) n--;
    char *text = NULL;
    int len = pie_lm_decode(c->lm, ids, n, true, &text);
    if (len < 0) len = 0;
    if (!json) {
        pie_send(text ? text : "", (uint32_t)len);
    } else {
        char *buf = NULL, num[48];
        size_t bl = 0, cap = 0;
        pie_buf_append(&buf, &bl, &cap, "{", 1);
        pie_json_ids_text(&buf, &bl, &cap, ids, b->n_gen, text, (size_t)len);
        int k = snprintf(num, sizeof num, ",\"logprob\":%.6f}\n", b->score);
        pie_buf_append(&buf, &bl, &cap, num, (size_t)k);
        pie_send(buf, (uint32_t)bl);
        free(buf);
    }
    free(text);
}

/* The command-line options; parse_args sets their defaults. */
typedef struct opts {
    const char *prompt;
    int32_t     nb, max_tokens;      /* beam width, steps                   */
    bool        json;
} opts;

/* Parses argv into a: 0 to go on, 1 after --help, -1 for bad arguments. */
static int parse_args(int argc, char **argv, opts *a)
{
    *a = (opts){ .nb = 4, .max_tokens = 32 };
    const pie_arg args[] = {
        { "prompt", PIE_ARG_STR, &a->prompt, "prompt text (required)" },
        { "beams", PIE_ARG_INT, &a->nb, "beam width (4, at most 16)" },
        { "max-tokens", PIE_ARG_INT, &a->max_tokens, "steps (32)" },
        { "json", PIE_ARG_FLAG, &a->json,
          "send {\"ids\",\"text\",\"logprob\"}" },
        { 0 },
    };
    int rc = pie_args_parse(argc, argv, args, "Beam search decoding.");
    if (rc) return rc;
    if (!a->prompt || a->nb < 1 || a->nb > MAX_BEAMS || a->max_tokens < 1) {
        fprintf(stderr, "beam-search: need --prompt, 1 <= --beams <= %d, "
                        "--max-tokens >= 1\n", MAX_BEAMS);
        return -1;
    }
    return 0;
}

/* The beams of a search: those still growing and those that ended. */
typedef struct search {
    beam    live[MAX_BEAMS];
    beam    done[MAX_BEAMS];         /* ended with EOS                      */
    int32_t n_live, n_done;
} search;

/* One step: forks the best children (EOS ones into done), frees the parents. */
static int search_step(pie_lm *lm, search *s, int32_t nb)
{
    beam next[MAX_BEAMS];
    cand best[MAX_BEAMS];
    int32_t n_best, nn = 0;
    int rc = expand(lm, s->live, s->n_live, nb, best, &n_best);
    if (rc) return rc;
    for (int32_t i = 0; i < n_best; i++) {
        beam *p = &s->live[best[i].parent];
        beam *d = pie_lm_is_eos(lm, best[i].tok) && s->n_done < nb
                      ? &s->done[s->n_done++] : &next[nn++];
        if ((rc = pie_ctx_fork(&p->ctx, &d->ctx)) ||
            (rc = pie_ctx_fill_ids(&d->ctx, &best[i].tok, 1)))
            return rc;
        d->score = best[i].score;
        d->n_gen = p->n_gen + 1;
    }
    for (int32_t i = 0; i < s->n_live; i++) pie_ctx_release(&s->live[i].ctx);
    memcpy(s->live, next, sizeof(beam) * (size_t)nn);
    s->n_live = nn;
    return 0;
}

/* The highest-scoring beam, finished ones first on ties; NULL if none. */
static const beam *search_best(const search *s)
{
    const beam *win = NULL;
    for (int32_t i = 0; i < s->n_done; i++)
        if (!win || s->done[i].score > win->score) win = &s->done[i];
    for (int32_t i = 0; i < s->n_live; i++)
        if (!win || s->live[i].score > win->score) win = &s->live[i];
    return win;
}

/* Releases the contexts of all beams, live and finished. */
static void search_release(search *s)
{
    for (int32_t i = 0; i < s->n_live; i++) pie_ctx_release(&s->live[i].ctx);
    for (int32_t i = 0; i < s->n_done; i++) pie_ctx_release(&s->done[i].ctx);
}

int main(int argc, char **argv)
{
    opts a;
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 2 : 0;
    pie_lm lm;
    search s = { .n_live = 1 };
    if ((rc = pie_lm_open(&lm, NULL))) goto fail;
    pie_chat_fmt fmt = pie_chat_detect(&lm);
    pie_chat_add_stops(fmt, &lm);
    pie_ctx_init(&s.live[0].ctx, &lm);
    if ((rc = pie_chat_fill(&s.live[0].ctx, fmt, NULL, a.prompt))) goto fail;
    for (int32_t step = 0; step < a.max_tokens && s.n_live > 0 &&
                           s.n_done < a.nb; step++)
        if ((rc = search_step(&lm, &s, a.nb))) goto fail;
    const beam *win = search_best(&s);
    if (win) send_result(win, a.json);
    search_release(&s);
    pie_lm_close(&lm);
    return 0;
fail:
    fprintf(stderr, "beam-search: %s\n", pie_sdk_error());
    return 1;
}
