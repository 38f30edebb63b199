/*
 * model.c — pie_model_load: a Hugging Face directory into pie_model.
 *
 * Loading is four steps:
 *   1. config.json (+ generation_config.json) -> m->cfg
 *   2. the checkpoint (single file or shards) is mapped and validated
 *   3. one function, weights_map(), points every pie_tensor of m->w at its
 *      bytes by Hugging Face name, checking each shape against cfg
 *   4. the mapped pages are touched once (with progress reports) so the
 *      first forward pass does not stall on disk, then tokenizer.json is
 *      loaded when present.
 *
 * m->priv holds the pie_checkpoint (mappings) for file models, or the
 * random model's buffer; pie_model_free releases whichever it is.
 */
#include <string.h>
#include <sys/mman.h>

#include "common/pie_err.h"
#include "model/model_internal.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"

#define CONFIG_MAX (16u << 20)

typedef struct model_files {
    pie_checkpoint *ck;
} model_files;

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape)
{
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < ndim && n < cap; i++)
        n += snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "",
                      (long long)shape[i]);
}

/*
 * Points *t at tensor name with the expected shape (ndim dims from want).
 * Absent or differently shaped: an error naming the tensor and the file.
 */
static int tensor_bind(const pie_checkpoint *ck, const char *name, int ndim,
                       const int64_t *want, pie_tensor *t)
{
    const char *file = ck->dir;
    const pie_st_tensor *st = pie_checkpoint_find(ck, name, &file);
    memset(t, 0, sizeof *t);
    if (!st) {
        char e[96];
        shape_str(e, sizeof e, ndim, want);
        return pie_err_set(PIE_ENOTFOUND, "%s: missing tensor '%s' (expected "
                           "shape [%s]) in %s", ck->dir, name, e,
                           ck->weight_map ? "model.safetensors.index.json"
                                          : ck->files[0]->path);
    }
    bool ok = st->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = st->shape[i] == want[i];
    if (!ok) {
        char e[96], f[96];
        shape_str(e, sizeof e, ndim, want);
        shape_str(f, sizeof f, st->ndim, st->shape);
        return pie_err_set(PIE_EFORMAT, "%s: tensor '%s' has shape [%s], "
                           "expected [%s]", file, name, f, e);
    }
    t->dtype = st->dtype;
    t->ndim = st->ndim;
    memcpy(t->shape, st->shape, sizeof t->shape);
    t->data = st->data;
    return 0;
}

#define BIND1(name, a, t)                                               \
    tensor_bind(ck, name, 1, (int64_t[]){ a }, t)
#define BIND2(name, a, b, t)                                            \
    tensor_bind(ck, name, 2, (int64_t[]){ a, b }, t)

static int layer_map(const pie_checkpoint *ck, const pie_model_config *c,
                     int l, pie_layer_weights *w)
{
    char n[160];
    int64_t d = c->dim, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim, h = c->hidden_dim;
    int rc = 0;
#define NAME(s) (snprintf(n, sizeof n, "model.layers.%d.%s", l, s), n)
    if ((rc = BIND1(NAME("input_layernorm.weight"), d, &w->attn_norm)) ||
        (rc = BIND2(NAME("self_attn.q_proj.weight"), q, d, &w->wq)) ||
        (rc = BIND2(NAME("self_attn.k_proj.weight"), kv, d, &w->wk)) ||
        (rc = BIND2(NAME("self_attn.v_proj.weight"), kv, d, &w->wv)) ||
        (rc = BIND2(NAME("self_attn.o_proj.weight"), d, q, &w->wo)) ||
        (rc = BIND1(NAME("post_attention_layernorm.weight"), d,
                    &w->ffn_norm)) ||
        (rc = BIND2(NAME("mlp.gate_proj.weight"), h, d, &w->w_gate)) ||
        (rc = BIND2(NAME("mlp.up_proj.weight"), h, d, &w->w_up)) ||
        (rc = BIND2(NAME("mlp.down_proj.weight"), d, h, &w->w_down)))
        return rc;
    if (c->qkv_bias &&
        ((rc = BIND1(NAME("self_attn.q_proj.bias"), q, &w->bq)) ||
         (rc = BIND1(NAME("self_attn.k_proj.bias"), kv, &w->bk)) ||
         (rc = BIND1(NAME("self_attn.v_proj.bias"), kv, &w->bv))))
        return rc;
    if (c->qk_norm &&
        ((rc = BIND1(NAME("self_attn.q_norm.weight"), c->head_dim,
                     &w->q_norm)) ||
         (rc = BIND1(NAME("self_attn.k_norm.weight"), c->head_dim,
                     &w->k_norm))))
        return rc;
#undef NAME
    return 0;
}

/* Lays out every weight view of m from the checkpoint. */
static int weights_map(const pie_checkpoint *ck, pie_model *m)
{
    pie_model_config *c = &m->cfg;
    pie_model_weights *w = &m->w;
    int rc;
    if ((rc = BIND2("model.embed_tokens.weight", c->vocab_size, c->dim,
                    &w->tok_embed)) ||
        (rc = BIND1("model.norm.weight", c->dim, &w->final_norm)))
        return rc;
    if (c->tie_embeddings)
        w->lm_head = w->tok_embed;
    else if ((rc = BIND2("lm_head.weight", c->vocab_size, c->dim,
                         &w->lm_head)))
        return rc;
    for (int l = 0; l < c->n_layers; l++)
        if ((rc = layer_map(ck, c, l, &w->layers[l]))) return rc;
    c->dtype = w->tok_embed.dtype;
    return 0;
}

/* Reads every page of the mappings once, reporting progress. */
static void weights_touch(const pie_checkpoint *ck, pie_progress_fn progress,
                          void *user)
{
    uint64_t done = 0, total = ck->total_bytes, step = 64u << 20;
    volatile uint8_t sink = 0;
    for (int32_t f = 0; f < ck->n_files; f++) {
        const pie_safetensors *st = ck->files[f];
        if (st->mapped) madvise((void *)st->base, st->size, MADV_WILLNEED);
        for (uint64_t off = 0; off < st->data_size; off += 4096) {
            sink ^= st->data[off];
            if (progress && ((done + off) % step) < 4096)
                progress(user, "weights", done + off, total);
        }
        done += st->data_size;
    }
    (void)sink;
    if (progress) progress(user, "weights", total, total);
}

static int config_load(const char *dir, pie_model_config *cfg)
{
    char *path = pie__path_join(dir, "config.json"), *text = NULL;
    size_t len;
    if (!path) return pie_err_set(PIE_ENOMEM, "out of memory");
    int rc = pie__file_read(path, CONFIG_MAX, &text, &len);
    if (!rc) rc = pie_model_config_parse(text, len, path, cfg);
    free(text);
    free(path);
    if (rc) return rc;
    if (!(path = pie__path_join(dir, "generation_config.json")))
        return pie_err_set(PIE_ENOMEM, "out of memory");
    rc = pie__file_read(path, CONFIG_MAX, &text, &len);
    if (rc == PIE_ENOTFOUND)
        rc = 0;
    else if (!rc)
        rc = pie__generation_config_merge(text, len, path, cfg);
    free(text);
    free(path);
    return rc;
}

static int tokenizer_load(const char *dir, pie_model *m)
{
    char *path = pie__path_join(dir, "tokenizer.json");
    if (!path) return pie_err_set(PIE_ENOMEM, "out of memory");
    int rc = 0;
    if (pie__file_exists(path)) rc = pie_tokenizer_load(dir, &m->tok);
    free(path);
    return rc;
}

static int model_load_dir(const char *dir, pie_progress_fn progress,
                          void *user, pie_model *m)
{
    int rc;
    model_files *mf = calloc(1, sizeof *mf);
    if (!mf) return pie_err_set(PIE_ENOMEM, "out of memory");
    m->priv = mf;
    if ((rc = config_load(dir, &m->cfg)) ||
        (rc = pie_checkpoint_open(dir, &mf->ck)) ||
        (rc = weights_map(mf->ck, m)))
        return rc;
    weights_touch(mf->ck, progress, user);
    return tokenizer_load(dir, m);
}

int pie_model_load(const char *path, pie_progress_fn progress, void *user,
                   pie_model **out)
{
    *out = NULL;
    if (!path) return pie_err_set(PIE_EINVAL, "model path is NULL");
    pie_model *m = calloc(1, sizeof *m);
    if (!m || !(m->dir = strdup(path))) {
        free(m);
        return pie_err_set(PIE_ENOMEM, "out of memory");
    }
    int rc;
    if (!strncmp(path, "random:", 7))
        rc = pie__model_random(path + 7, progress, user, m);
    else
        rc = model_load_dir(path, progress, user, m);
    if (rc) {
        pie_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void pie_model_free(pie_model *m)
{
    if (!m) return;
    if (m->tok) pie_tokenizer_free(m->tok);
    if (!strncmp(m->dir, "random:", 7)) {
        pie__model_random_free(m);
    } else if (m->priv) {
        model_files *mf = m->priv;
        pie_checkpoint_free(mf->ck);
        free(mf);
    }
    free(m->dir);
    free(m);
}
