/*
 * gen.c — generation: chained decode forwards, stop conditions and
 * streamed detokenization.
 *
 * Pipeline. Let P0 be the history length when generation starts (its last
 * token is pending). Step 0 forwards the pending tokens and samples g0;
 * step s >= 1 feeds g(s-1) at position P0+s-1 and samples g(s). Up to
 * `lookahead` steps are queued: step s takes its input from output row 0
 * of step s-1's future (forward_token_from) while that one may still be
 * running, so the scheduler never waits for this inferlet between steps.
 * Futures complete in order (each chains from the previous). Tokens are
 * processed oldest first; at a stop the queued rest is cancelled, and the
 * context is rolled back to the KV that completed forwards really wrote:
 * D completed steps hold KV for history[0 .. P0+D-1); the last sampled
 * token stays pending, exactly as after a fill (also where steps queued
 * past the stop completed before the cancel: their KV past it is dropped).
 *
 * Errors. Every failure after pie_gen_start (a forward, the context, the
 * detokenizer, memory) ends the generation at once through gen_fail():
 * err and stop = PIE_STOP_ERROR are set, the queued forwards are cancelled
 * and released, and the context is rolled back as at a stop, so that its
 * history holds exactly the ids in g->ids (a token that could not be added
 * is in neither) and its last token is pending.
 *
 * Text. Each new token is decoded together with a few tokens before it
 * (the decoding window plus up to 4 tokens of left context) and only the
 * bytes past what was already emitted go out; a window that ends inside a
 * UTF-8 sequence (decoded as U+FFFD) waits for the next token. Text that
 * could be the start of a stop string is held back until it is decided.
 */
#define _GNU_SOURCE 1 /* memmem */
#include <float.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

#define DT_LEFT 4
#define DT_WINDOW 8

void pie_text_send(void *user, const char *text, size_t len)
{
    (void)user;
    pie_send(text, (uint32_t)len);
}

void pie_text_stdout(void *user, const char *text, size_t len)
{
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

/* Range checks of pie_sampling (see pie.h); 0 or PIE_EINVAL with a
 * message naming the parameter. Written so that NaN fails every check. */
static int check_sampling(const pie_sampling *s)
{
    if (!(s->temperature >= 0.0f && s->temperature <= FLT_MAX))
        return pie_sdk_fail(PIE_EINVAL, "sampling: temperature %g must be a "
                            "finite number >= 0 (0 = greedy)",
                            (double)s->temperature);
    if (s->top_k < 0)
        return pie_sdk_fail(PIE_EINVAL, "sampling: top_k %d is negative "
                            "(0 keeps all)", s->top_k);
    if (!(s->top_p >= 0.0f && s->top_p <= 1.0f))
        return pie_sdk_fail(PIE_EINVAL, "sampling: top_p %g outside (0, 1] "
                            "(1 or 0 keeps all)", (double)s->top_p);
    if (!(s->min_p >= 0.0f && s->min_p <= 1.0f))
        return pie_sdk_fail(PIE_EINVAL, "sampling: min_p %g outside [0, 1] "
                            "(0 keeps all)", (double)s->min_p);
    return 0;
}

int pie_gen_start(pie_gen *g, pie_ctx *ctx, const pie_gen_opts *o)
{
    memset(g, 0, sizeof *g);
    g->ctx = ctx;
    g->o = *o;
    if (g->o.lookahead <= 0) g->o.lookahead = 4;
    if (g->o.lookahead > PIE_GEN_LOOKAHEAD_MAX)
        g->o.lookahead = PIE_GEN_LOOKAHEAD_MAX;
    if (g->o.max_tokens <= 0) g->o.max_tokens = 1 << 20;
    int rc = check_sampling(&g->o.s);
    if (!rc && ctx->n_tokens <= ctx->n_kv)
        rc = pie_sdk_fail(PIE_EINVAL, "generate needs a pending token "
                          "(fill the context first)");
    if (rc) {                        /* nothing queued: pie_gen_run skips g */
        g->err = rc;
        g->stop = PIE_STOP_ERROR;
        return rc;
    }
    if (g->o.s.top_p == 0) g->o.s.top_p = 1.0f;
    g->dt_win = ctx->n_tokens;
    g->kv0 = ctx->n_kv;
    g->slot0 = ctx->n_tokens;        /* P0 */
    return 0;
}

static pie_out step_out(const pie_gen *g, int32_t step)
{
    const pie_sampling *s = &g->o.s;
    pie_out o = { .kind = s->temperature > 0 ? PIE_SAMPLER_RANDOM
                                             : PIE_SAMPLER_GREEDY,
                  .temperature = s->temperature, .top_k = s->top_k,
                  .top_p = s->top_p, .min_p = s->min_p,
                  .seed = s->seed + (uint64_t)step };
    return o;
}

/* Submits decode step s >= 1: input g(s-1), explicit when known. */
static int32_t submit_decode(pie_gen *g, int32_t s)
{
    pie_ctx *c = g->ctx;
    int32_t pos = g->slot0 + s - 1, rc, f;
    pie_out o = step_out(g, s);
    if ((rc = pie__ctx_reserve(c, 1))) return rc;
    if ((f = pie_forward_new(c->lm->h)) < 0)
        return pie_sdk_fail(f, "forward_new failed (%d)", f);
    c->kv_len++;
    if (g->n_ids >= s)
        rc = pie_forward_tokens(f, &g->ids[s - 1], &pos, 1);
    else
        rc = pie_forward_token_from(f, g->q[g->nq - 1], 0, pos);
    if (rc >= 0) rc = pie__ctx_set_pages(c, f);
    if (rc >= 0)
        rc = pie_forward_output(f, 0, o.kind, o.temperature, o.top_k, o.top_p,
                                o.min_p, o.seed);
    if (rc >= 0) rc = pie_forward_submit(f);
    if (rc < 0) {
        c->kv_len--;
        return pie_sdk_fail(rc, "decode forward failed (%d)", rc);
    }
    return rc;
}

static int submit_more(pie_gen *g)
{
    while (!g->stop && g->nq < g->o.lookahead &&
           g->n_submitted < g->o.max_tokens) {
        int32_t f;
        if (g->n_submitted == 0) {
            pie_out o = step_out(g, 0);
            f = pie_ctx_submit(g->ctx, &o);
        } else {
            f = submit_decode(g, g->n_submitted);
        }
        if (f < 0) return f;
        g->q[g->nq++] = f;
        g->n_submitted++;
    }
    return 0;
}

/* Emits text[emitted, upto). */
static void emit(pie_gen *g, size_t upto)
{
    if (upto > g->emitted && g->o.on_text)
        g->o.on_text(g->o.user, g->text + g->emitted, upto - g->emitted);
    if (upto > g->emitted) g->emitted = upto;
}

/* Appends decoded text, cutting at a stop string and holding back a
 * possible stop-string prefix. */
static int push_text(pie_gen *g, const char *s, size_t n, bool final)
{
    int rc = pie_buf_append(&g->text, &g->text_len, &g->text_cap, s, n);
    if (rc) return rc;
    size_t hold = 0;
    for (int32_t i = 0; i < g->o.n_stop; i++) {
        const char *st = g->o.stop[i];
        size_t sl = strlen(st);
        if (!sl) continue;
        char *hit = memmem(g->text + g->emitted, g->text_len - g->emitted, st,
                           sl);
        if (hit) {
            g->text_len = (size_t)(hit - g->text);
            g->text[g->text_len] = 0;
            g->stop = PIE_STOP_STRING;
            hold = 0;
            break;
        }
        for (size_t k = sl - 1; k > hold; k--)
            if (k <= g->text_len - g->emitted &&
                !memcmp(g->text + g->text_len - k, st, k)) {
                hold = k;
                break;
            }
    }
    emit(g, final || g->stop ? g->text_len : g->text_len - hold);
    return 0;
}

/* Decodes the window after a new token and pushes the new bytes. */
static int decode_new(pie_gen *g, bool final)
{
    if (g->o.no_text) return 0;
    pie_ctx *c = g->ctx;
    int32_t l0 = g->dt_win - DT_LEFT < 0 ? 0 : g->dt_win - DT_LEFT;
    int32_t end = c->n_tokens;
    if (end > 0 && !final && pie_lm_is_eos(c->lm, c->tokens[end - 1]) &&
        !g->o.ignore_eos)
        end--;
    char *base = NULL, *full = NULL;
    int nb = pie_lm_decode(c->lm, c->tokens + l0, g->dt_win - l0, true, &base);
    int nf = nb < 0 ? nb : pie_lm_decode(c->lm, c->tokens + l0, end - l0, true,
                                         &full);
    int rc = nf < 0 ? nf : 0;
    if (rc == 0 && (final || nf < 3 || memcmp(full + nf - 3, "\xEF\xBF\xBD", 3))) {
        size_t from = (size_t)nb + g->dt_out;
        if ((size_t)nf > from) {
            rc = push_text(g, full + from, (size_t)nf - from, final);
            g->dt_out = (size_t)nf - (size_t)nb;
        } else if (final) {
            rc = push_text(g, "", 0, true);
        }
        if (end - g->dt_win >= DT_WINDOW) {
            g->dt_win = end;
            g->dt_out = 0;
        }
    }
    free(base);
    free(full);
    return rc;
}

/* Cancels the queued forwards and rolls the context back (see top). */
static void finish(pie_gen *g)
{
    pie_ctx *c = g->ctx;
    for (int32_t i = 0; i < g->nq; i++) pie_future_cancel(g->q[i]);
    for (int32_t i = 0; i < g->nq; i++)
        if (pie_wait_free(g->q[i]) >= 0) g->n_done++;
    g->nq = 0;
    int32_t p0 = g->slot0, kv_new = g->kv0;
    if (g->n_done > 0) {
        kv_new = p0 + g->n_done - 1;
        /* the last token stays pending even where queued steps past the
         * stop completed and wrote its KV: the next forward rewrites it */
        if (kv_new > c->n_tokens - 1) kv_new = c->n_tokens - 1;
    }
    /* slots submitted: (P0 - kv0) for step 0, one per later step */
    int32_t submitted = g->n_submitted ? p0 - g->kv0 + g->n_submitted - 1 : 0;
    c->kv_len -= submitted - (kv_new - g->kv0);
    c->n_kv = kv_new;
    pie__ctx_trim(c);
    if (!g->err && g->stop != PIE_STOP_STRING) decode_new(g, true);
}

/* Ends g with error rc (its message already recorded): see Errors at the
 * top. Returns rc. */
static int gen_fail(pie_gen *g, int rc)
{
    g->err = rc;
    g->stop = PIE_STOP_ERROR;
    finish(g);
    return rc;
}

/* Room for one more id in g->ids; 0 or PIE_ENOMEM. */
static int ids_reserve(pie_gen *g)
{
    if (g->n_ids < g->cap_ids) return 0;
    if (g->cap_ids > INT32_MAX / 2 ||
        (size_t)g->cap_ids * 2 > SIZE_MAX / sizeof(int32_t))
        return pie_sdk_fail(PIE_ENOMEM, "too many generated ids (%d)",
                            g->n_ids);
    int32_t nc = g->cap_ids ? g->cap_ids * 2 : 64;
    int32_t *ni = realloc(g->ids, sizeof(int32_t) * (size_t)nc);
    if (!ni) return pie_sdk_fail(PIE_ENOMEM, "out of memory (generated ids)");
    g->ids = ni;
    g->cap_ids = nc;
    return 0;
}

/* Waits for the oldest queued step and adds its token. 1 while running,
 * 0 when stopped, < 0 on error (g has stopped: gen_fail). */
static int process_one(pie_gen *g)
{
    int32_t f = g->q[0], tok = -1;
    int32_t st = pie_future_wait(f);
    if (st >= 0) st = pie_forward_read_tokens(f, &tok, 1);
    pie_future_free(f);
    memmove(g->q, g->q + 1, sizeof(int32_t) * (size_t)(--g->nq));
    if (st < 0 || tok < 0) {
        int rc = st < 0 ? st : PIE_EINVAL;
        pie_sdk_fail(rc, "forward failed (%d)", rc);
        return gen_fail(g, rc);
    }
    g->n_done++;                     /* its KV is written */
    /* the token joins ids and the history together, or neither (finish
     * keeps the last token of the history pending either way) */
    int rc = ids_reserve(g);
    if (!rc) rc = pie_ctx_fill_ids(g->ctx, &tok, 1);
    if (rc) return gen_fail(g, rc);
    g->ids[g->n_ids++] = tok;
    if (!g->o.ignore_eos && pie_lm_is_eos(g->ctx->lm, tok))
        g->stop = PIE_STOP_EOS;
    else if ((rc = decode_new(g, false)))
        return gen_fail(g, rc);
    if (!g->stop && g->n_ids >= g->o.max_tokens) g->stop = PIE_STOP_MAX;
    if (g->stop) finish(g);
    return g->stop ? 0 : 1;
}

/* Queues what can be queued. A failure to queue more while steps are
 * still queued is not fatal (e.g. the pool is short for a moment: the
 * queued steps free nothing, but processing them lets us retry); with
 * nothing queued it ends the generation, and so does PIE_ENOMEM at once
 * (the host says waiting cannot help: the pool cannot serve this request,
 * or it was picked to end so that older requests can finish). Returns 1
 * when g has a step to wait for, 0 when it stopped, < 0 on error. */
static int refill(pie_gen *g)
{
    if (g->stop) return g->err ? g->err : 0;
    int rc = submit_more(g);
    if (g->nq > 0 && rc != PIE_ENOMEM) return 1;
    if (rc) return gen_fail(g, rc);
    g->stop = PIE_STOP_MAX;        /* max_tokens reached earlier */
    finish(g);
    return 0;
}

int pie_gen_step(pie_gen *g)
{
    int rc = refill(g);
    return rc <= 0 ? rc : process_one(g);
}

int pie_gen_run(pie_gen *gs, int32_t n)
{
    int32_t *futs = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    int32_t *who = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    int first_err = 0;
    if (!futs || !who) {
        free(futs);
        free(who);
        for (int32_t i = 0; i < n; i++)
            if (!gs[i].stop) gen_fail(&gs[i], PIE_ENOMEM);
        return pie_sdk_fail(PIE_ENOMEM, "out of memory");
    }
    for (;;) {
        int32_t m = 0;
        for (int32_t i = 0; i < n; i++) {
            if (gs[i].stop) {        /* e.g. its pie_gen_start failed */
                if (gs[i].err && !first_err) first_err = gs[i].err;
                continue;
            }
            int rc = refill(&gs[i]);
            if (rc < 0 && !first_err) first_err = rc;
            if (rc <= 0) continue;
            futs[m] = gs[i].q[0];
            who[m++] = i;
        }
        if (m == 0) break;
        int32_t k = pie_future_wait_any(futs, (uint32_t)m, -1);
        if (k < 0 || k >= m) k = 0;  /* fall back to waiting in order */
        int rc = process_one(&gs[who[k]]);
        if (rc < 0 && !first_err) first_err = rc;
    }
    free(futs);
    free(who);
    return first_err;
}

void pie_gen_free(pie_gen *g)
{
    free(g->ids);
    free(g->text);
    g->ids = NULL;
    g->text = NULL;
}

int pie_generate(pie_ctx *ctx, const pie_gen_opts *o, pie_gen *g)
{
    int rc = pie_gen_start(g, ctx, o);
    return rc ? rc : pie_gen_run(g, 1);
}

int pie_send_gen_json(const pie_gen *g, const char *more)
{
    char *b = NULL;
    size_t len = 0, cap = 0;
    int rc = pie_buf_append(&b, &len, &cap, "{", 1);
    if (!rc) rc = pie_json_ids_text(&b, &len, &cap, g->ids, g->n_ids, g->text,
                                    g->text_len);
    if (!rc && more) rc = pie_buf_append(&b, &len, &cap, more, strlen(more));
    if (!rc) rc = pie_buf_append(&b, &len, &cap, "}\n", 2);
    if (!rc) pie_send(b, (uint32_t)len);
    free(b);
    return rc;
}
