/* drv.c — direct single-backend driver for the CLI (see drv.h). */
#include "cli/drv.h"

#include <stdlib.h>
#include <string.h>

#include "common/pie_err.h"

int pie_drv_init(pie_drv *d, pie_backend *b)
{
    memset(d, 0, sizeof *d);
    d->b = b;
    d->free_pages = malloc(sizeof(int32_t) * (size_t)b->n_pages);
    if (!d->free_pages) return pie_err_set(PIE_ENOMEM, "out of memory");
    for (int32_t i = 0; i < b->n_pages; i++)
        d->free_pages[i] = b->n_pages - 1 - i;
    d->n_free = b->n_pages;
    return 0;
}

void pie_drv_free(pie_drv *d) { free(d->free_pages); }

int32_t pie_drv_cap(const pie_drv *d, int32_t chunk, int32_t none)
{
    int32_t most = d->b->max_tokens > 0 ? d->b->max_tokens : none;
    return chunk > 0 && chunk < most ? chunk : most;
}

int pie_drv_feed_head(pie_drv *d, pie_drv_seq *seq, const int32_t **in,
                      int32_t *n, int32_t cap, const pie_sampler *s,
                      long *fwd)
{
    int32_t tok;
    while (*n > cap) {
        int rc = pie_drv_step(d, &seq, 1, *in, &cap, s, &tok);
        if (rc) return rc;
        *in += cap;
        *n -= cap;
        ++*fwd;
    }
    return 0;
}

void pie_drv_seq_release(pie_drv *d, pie_drv_seq *s)
{
    for (int32_t i = 0; i < s->n_pages; i++)
        d->free_pages[d->n_free++] = s->pages[i];
    free(s->pages);
    memset(s, 0, sizeof *s);
}

/* Makes room for n more slots in s, taking pages from the free stack. */
static int seq_reserve(pie_drv *d, pie_drv_seq *s, int32_t n)
{
    int32_t ps = d->b->page_size;
    int32_t need = (s->kv_len + n + ps - 1) / ps;
    if (need > s->cap) {
        int32_t cap = need * 2;
        int32_t *p = realloc(s->pages, sizeof(int32_t) * (size_t)cap);
        if (!p) return pie_err_set(PIE_ENOMEM, "out of memory");
        s->pages = p;
        s->cap = cap;
    }
    while (s->n_pages < need) {
        if (d->n_free == 0)
            return pie_err_set(PIE_EBUSY, "KV cache full: all %d pages of "
                               "%d tokens in use", d->b->n_pages,
                               ps);
        s->pages[s->n_pages++] = d->free_pages[--d->n_free];
    }
    return 0;
}

int pie_drv_step(pie_drv *d, pie_drv_seq **seqs, int32_t n_seqs,
                 const int32_t *tokens, const int32_t *n_new,
                 const pie_sampler *samplers, int32_t *out_tokens)
{
    int32_t n_tok = 0, n_pg = 0, rc = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        if ((rc = seq_reserve(d, seqs[i], n_new[i])) != 0) return rc;
        n_tok += n_new[i];
        n_pg += seqs[i]->n_pages;
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n_tok);
    int32_t *qo = malloc(sizeof(int32_t) * (size_t)(n_seqs + 1));
    int32_t *kvp = malloc(sizeof(int32_t) * (size_t)(n_pg ? n_pg : 1));
    int32_t *kvi = malloc(sizeof(int32_t) * (size_t)(n_seqs + 1));
    int32_t *last = malloc(sizeof(int32_t) * (size_t)n_seqs);
    int32_t *oidx = malloc(sizeof(int32_t) * (size_t)n_seqs);
    pie_forward_out out = {0};
    if (!pos || !qo || !kvp || !kvi || !last || !oidx) {
        rc = pie_err_set(PIE_ENOMEM, "out of memory");
        goto done;
    }
    int32_t t = 0, p = 0, ps = d->b->page_size;
    qo[0] = kvi[0] = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        pie_drv_seq *s = seqs[i];
        for (int32_t j = 0; j < n_new[i]; j++) pos[t++] = s->kv_len + j;
        int32_t kv = s->kv_len + n_new[i];
        memcpy(kvp + p, s->pages, sizeof(int32_t) * (size_t)s->n_pages);
        p += s->n_pages;
        qo[i + 1] = t;
        kvi[i + 1] = p;
        last[i] = kv - (s->n_pages - 1) * ps;
        oidx[i] = t - 1;
    }
    pie_forward_batch fb = {
        .n_tokens = n_tok, .n_reqs = n_seqs, .token_ids = tokens,
        .positions = pos, .qo_indptr = qo, .kv_page_indices = kvp,
        .kv_page_indptr = kvi, .kv_last_page_len = last,
        .n_outputs = n_seqs, .output_token_idx = oidx, .samplers = samplers,
    };
    if ((rc = pie_forward_out_alloc(&fb, d->b->cfg->vocab_size, &out)) != 0)
        goto done;
    if ((rc = pie_backend_forward(d->b, &fb, &out)) != 0) goto done;
    for (int32_t i = 0; i < n_seqs; i++) {
        seqs[i]->kv_len += n_new[i];
        out_tokens[i] = out.tokens[i];
    }
done:
    pie_forward_out_free(&out);
    free(pos); free(qo); free(kvp); free(kvi); free(last); free(oidx);
    return rc;
}
