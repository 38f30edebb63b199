/*
 * generate.c — the native generation loop: the same loop an inferlet's SDK
 * runs, built into the engine with no WebAssembly in between.
 *
 * One client per generation. Step 0 is the prompt's prefill with one output
 * row at its last token; step i >= 1 feeds the token sampled by step i-1
 * (a chained input) at position n_prompt + i - 1. Up to lookahead + 1 steps
 * are in flight in a ring of futures, so the scheduler feeds each sampled
 * token straight into the next step; this thread only reads finished steps
 * in order, reports them, and on a stop id cancels the steps queued beyond
 * it (their page fills roll back). Pages are allocated as the context grows,
 * waiting up to timeout_ms for the pool (admission control); so does a
 * step of a generation the `suspend` policy swapped out. An allocation
 * the pool refuses (PIE_ENOMEM: it can never hold this generation, or this
 * one was the newest of a wait cycle; see pool.c) ends the generation with
 * that error, and closing its client returns its pages to the others.
 */
#include <stdlib.h>
#include <string.h>

#include "common/pie_err.h"
#include "control/control.h"

#define GEN_MAX_AHEAD 64

typedef struct gen {
    pie_ctl        *ctl;
    pie_ctl_client *c;
    const pie_ctl_gen_opts *o;
    int32_t         ps;
    uint32_t       *pages;       /* handles, in order                       */
    int32_t         n_pages;
    pie_ctl_future *ring[GEN_MAX_AHEAD + 1];
    int32_t         ring_n;      /* ring size = lookahead + 1               */
} gen;

/* Ensures pages for kv_len slots. */
static int gen_pages(gen *g, int32_t kv_len)
{
    int32_t need = (kv_len + g->ps - 1) / g->ps;
    if (need <= g->n_pages) return 0;
    int rc = pie_ctl_page_alloc(g->c, need - g->n_pages, g->o->timeout_ms,
                                g->pages + g->n_pages);
    if (rc < 0)
        return pie_err_wrap(rc, "generate: KV pages for %d tokens", kv_len);
    g->n_pages = need;
    return 0;
}

/* Submits step i (see the file header) into ring slot i % ring_n; its
 * input is prev (the token of step i-1) when known, else chained. */
static int gen_submit(gen *g, int32_t i, int32_t prev)
{
    const pie_ctl_gen_opts *o = g->o;
    int32_t n = i == 0 ? o->n_prompt : 1;
    int32_t first = i == 0 ? 0 : o->n_prompt + i - 1;
    int32_t kv_len = first + n;
    int rc = gen_pages(g, kv_len);
    if (rc < 0) return rc;
    int32_t *pos = malloc(n * sizeof *pos), zero = 0;
    if (!pos) return pie_err_set(PIE_ENOMEM, "generate: out of memory");
    for (int32_t t = 0; t < n; t++) pos[t] = first + t;
    pie_sampler s = o->sampler;
    s.seed = o->sampler.seed + (uint64_t)i;
    int32_t out_idx = n - 1, np = (kv_len + g->ps - 1) / g->ps;
    bool chained = i > 0 && prev < 0;
    pie_ctl_chain ch = { 0, chained ? g->ring[(i - 1) % g->ring_n] : NULL, 0 };
    if (i > 0 && !chained) zero = prev;
    pie_ctl_forward f = {
        .n_tokens = n, .tokens = i == 0 ? o->prompt : &zero, .positions = pos,
        .n_pages = np, .pages = g->pages,
        .last_page_len = kv_len - (np - 1) * g->ps,
        .n_outputs = 1, .output_idx = &out_idx, .samplers = &s,
        .n_chains = chained, .chains = &ch,
    };
    rc = pie_ctl_forward_submit(g->c, &f, NULL, NULL,
                                &g->ring[i % g->ring_n]);
    /* swapped out while idle (suspend policy): wait for room as for pages */
    while (rc == PIE_EAGAIN &&
           (rc = pie_ctl_client_resume(g->c, o->timeout_ms)) == 0)
        rc = pie_ctl_forward_submit(g->c, &f, NULL, NULL,
                                    &g->ring[i % g->ring_n]);
    free(pos);
    return rc;
}

static bool is_stop(const pie_ctl_gen_opts *o, int32_t tok)
{
    for (int32_t k = 0; k < o->n_stop; k++)
        if (o->stop_ids[k] == tok) return true;
    return false;
}

/* Step `next` could not be submitted (rc). Where a step queued before it
 * failed already, that is the cause (the new step chains from a failed
 * forward, or reads the slots its failure rolled back): returns that
 * step's error, with its message; else rc. */
static int gen_cause(gen *g, int32_t done, int32_t next, int rc)
{
    for (int32_t k = done; k < next; k++) {
        pie_ctl_future *f = g->ring[k % g->ring_n];
        int s = pie_ctl_future_poll(f);
        if (s < 0 && s != PIE_EAGAIN)
            return pie_ctl_future_result(f, NULL, NULL);
    }
    return rc;
}

/* Runs the loop; returns 0 or an error; *n_out tokens were written. */
static int gen_run(gen *g, int32_t *out, int32_t *n_out)
{
    const pie_ctl_gen_opts *o = g->o;
    int32_t next = 0, done = 0, rc = 0;
    bool stop = false;
    while (done < o->max_tokens && !stop) {
        while (next < o->max_tokens && next - done < g->ring_n) {
            int32_t prev = next > 0 && next - 1 < done ? out[next - 1] : -1;
            if ((rc = gen_submit(g, next, prev)) < 0)
                return gen_cause(g, done, next, rc);
            next++;
        }
        pie_ctl_future *f = g->ring[done % g->ring_n];
        rc = pie_ctl_future_wait(f, -1);
        const pie_forward_out *res;
        if (rc == 0) rc = pie_ctl_future_result(f, &res, NULL);
        if (rc < 0) return rc;
        int32_t tok = res->tokens[0];
        pie_ctl_future_release(f);
        g->ring[done % g->ring_n] = NULL;
        out[done++] = tok;
        *n_out = done;
        if (is_stop(o, tok)) stop = true;
        if (o->on_token && o->on_token(o->user, tok) != 0) stop = true;
    }
    return 0;
}

int pie_ctl_generate(pie_ctl *ctl, const pie_ctl_gen_opts *o, int32_t *out,
                     int32_t cap, int32_t *n_out)
{
    if (!o || !out || !n_out || o->n_prompt < 1 || !o->prompt ||
        o->max_tokens < 0 || cap < o->max_tokens ||
        (o->n_stop > 0 && !o->stop_ids))
        return pie_err_set(PIE_EINVAL, "generate: bad arguments (prompt of %d "
                           "tokens, max_tokens %d, cap %d)",
                           o ? o->n_prompt : 0, o ? o->max_tokens : 0, cap);
    *n_out = 0;
    if (o->max_tokens == 0) return 0;
    gen g = { .ctl = ctl, .o = o, .ps = pie_ctl_page_size(ctl) };
    int32_t ahead = o->lookahead > 0 ? o->lookahead : 4;
    g.ring_n = (ahead < GEN_MAX_AHEAD ? ahead : GEN_MAX_AHEAD) + 1;
    int64_t max_kv = (int64_t)o->n_prompt + o->max_tokens;
    g.pages = malloc(((max_kv + g.ps - 1) / g.ps + 1) * sizeof *g.pages);
    if (!g.pages) return pie_err_set(PIE_ENOMEM, "generate: out of memory");
    pie_ctl_client_opts co = { .priority = o->priority, .name = "generate" };
    int rc = pie_ctl_client_open(ctl, &co, &g.c);
    if (rc == 0) {
        rc = gen_run(&g, out, n_out);
        /* cancel what was queued past the end; wait so that the pages of
         * a step still on the device are back when we return */
        for (int32_t k = 0; k < g.ring_n; k++)
            if (g.ring[k]) pie_ctl_future_cancel(g.ring[k]);
        for (int32_t k = 0; k < g.ring_n; k++)
            if (g.ring[k]) {
                pie_ctl_future_wait(g.ring[k], -1);
                pie_ctl_future_release(g.ring[k]);
            }
        pie_ctl_client_close(g.c);
    }
    free(g.pages);
    return rc;
}
