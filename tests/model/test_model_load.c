/*
 * test_model_load.c — loads the four ../shared checkpoints and checks the
 * config numbers (from models/README.md and each config.json) and tensor
 * shapes and values against an independent stdio reader of the files; then
 * writes a 2-shard copy of stories260K with an index json and checks that
 * every view holds the same bytes as the single-file load.
 */
#include <math.h>

#include "common/pie_err.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "tests/model/model_test_util.h"

static int n_progress;
static uint64_t last_done, last_total;
static void on_progress(void *user, const char *what, uint64_t done,
                        uint64_t total)
{
    (void)user;
    (void)what;
    CHECK(done <= total, "progress %llu > total %llu",
          (unsigned long long)done, (unsigned long long)total);
    n_progress++;
    last_done = done;
    last_total = total;
}

/* Compares view t with the independent reader at a few indices. */
static void check_tensor(const char *dir, const char *name,
                         const pie_tensor *t)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int ndim;
    int64_t shape[4];
    ref_elem(path, name, 0, &ndim, shape);
    CHECK(t->data != NULL, "%s: view is NULL", name);
    CHECK(t->ndim == ndim, "%s: ndim %d, file says %d", name, t->ndim, ndim);
    for (int i = 0; i < ndim; i++)
        CHECK(t->shape[i] == shape[i], "%s: shape[%d] %lld, file says %lld",
              name, i, (long long)t->shape[i], (long long)shape[i]);
    int64_t n = pie_tensor_numel(t);
    int64_t idx[] = { 0, 1, n / 3, n / 2 + 7, n - 1 };
    float buf[4];
    for (size_t k = 0; k < sizeof idx / sizeof idx[0]; k++) {
        int64_t i = idx[k] < n ? idx[k] : n - 1;
        double want = ref_elem(path, name, i, &ndim, shape);
        float got = pie_tensor_get(t, i);
        CHECK(got == (float)want, "%s[%lld]: got %.9g, file has %.9g", name,
              (long long)i, got, want);
        if (i + 4 <= n) {
            pie_tensor_to_f32(t, i, 4, buf);
            CHECK(buf[0] == got, "%s: to_f32[%lld] %.9g != get %.9g", name,
                  (long long)i, buf[0], got);
        }
    }
}

static pie_model *load(const char *dir)
{
    pie_model *m = NULL;
    n_progress = 0;
    CHECK_OK(pie_model_load(dir, on_progress, NULL, &m));
    CHECK(n_progress > 0 && last_done == last_total && last_total > 0,
          "%s: progress reported %d times, last %llu/%llu", dir, n_progress,
          (unsigned long long)last_done, (unsigned long long)last_total);
    return m;
}

static void check_layers(const char *dir, const pie_model *m)
{
    char n[128];
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const pie_layer_weights *w = &m->w.layers[l];
#define T(s, f) (snprintf(n, sizeof n, "model.layers.%d.%s", l, s), \
                 check_tensor(dir, n, &w->f))
        T("input_layernorm.weight", attn_norm);
        T("self_attn.q_proj.weight", wq);
        T("self_attn.k_proj.weight", wk);
        T("self_attn.v_proj.weight", wv);
        T("self_attn.o_proj.weight", wo);
        T("post_attention_layernorm.weight", ffn_norm);
        T("mlp.gate_proj.weight", w_gate);
        T("mlp.up_proj.weight", w_up);
        T("mlp.down_proj.weight", w_down);
        if (m->cfg.qkv_bias) {
            T("self_attn.q_proj.bias", bq);
            T("self_attn.k_proj.bias", bk);
            T("self_attn.v_proj.bias", bv);
        } else {
            CHECK(!w->bq.data && !w->bk.data && !w->bv.data,
                  "%s: unexpected bias views", dir);
        }
        if (m->cfg.qk_norm) {
            T("self_attn.q_norm.weight", q_norm);
            T("self_attn.k_norm.weight", k_norm);
        } else {
            CHECK(!w->q_norm.data, "%s: unexpected q_norm view", dir);
        }
#undef T
    }
    check_tensor(dir, "model.embed_tokens.weight", &m->w.tok_embed);
    check_tensor(dir, "model.norm.weight", &m->w.final_norm);
    if (m->cfg.tie_embeddings)
        CHECK(m->w.lm_head.data == m->w.tok_embed.data, "%s: tied lm_head "
              "must be the embedding view", dir);
    else
        check_tensor(dir, "lm_head.weight", &m->w.lm_head);
}

static void check_common_tiny(const pie_model_config *c)
{
    CHECK(c->dim == 64 && c->hidden_dim == 128 && c->n_layers == 2,
          "tiny dims %d %d %d", c->dim, c->hidden_dim, c->n_layers);
    CHECK(c->n_heads == 4 && c->n_kv_heads == 2 && c->head_dim == 16,
          "tiny heads %d %d %d", c->n_heads, c->n_kv_heads, c->head_dim);
    CHECK(c->dtype == PIE_DT_BF16, "tiny dtype %d", c->dtype);
}

static void test_stories260k(void)
{
    const char *dir = test_shared_path("models/stories260K");
    pie_model *m = load(dir);
    const pie_model_config *c = &m->cfg;
    CHECK(!strcmp(c->arch, "llama"), "arch %s", c->arch);
    CHECK(c->dim == 64 && c->hidden_dim == 172 && c->n_layers == 5,
          "dims %d %d %d", c->dim, c->hidden_dim, c->n_layers);
    CHECK(c->n_heads == 8 && c->n_kv_heads == 4 && c->head_dim == 8,
          "heads %d/%d hd %d", c->n_heads, c->n_kv_heads, c->head_dim);
    CHECK(c->vocab_size == 512 && c->max_pos == 512, "vocab %d max_pos %d",
          c->vocab_size, c->max_pos);
    CHECK(c->tie_embeddings && !c->qkv_bias && !c->qk_norm && !c->rope_llama3,
          "flags");
    CHECK(fabsf(c->norm_eps - 1e-5f) < 1e-9f && c->rope_theta == 10000.f,
          "eps %g theta %g", c->norm_eps, c->rope_theta);
    CHECK(c->bos_id == 1 && c->n_eos == 1 && c->eos_ids[0] == 2,
          "bos %d eos n=%d %d", c->bos_id, c->n_eos, c->eos_ids[0]);
    CHECK(c->dtype == PIE_DT_F32, "dtype %d", c->dtype);
    check_layers(dir, m);
    if (m->tok)
        CHECK(pie_tokenizer_vocab_size(m->tok) == 512, "tokenizer vocab %d",
              pie_tokenizer_vocab_size(m->tok));
    printf("stories260K: config, %d layers of views match the file\n",
           c->n_layers);
    pie_model_free(m);
}

static void test_tiny_llama3(void)
{
    const char *dir = test_shared_path("models/tiny-llama3");
    pie_model *m = load(dir);
    const pie_model_config *c = &m->cfg;
    check_common_tiny(c);
    CHECK(!strcmp(c->arch, "llama") && c->vocab_size == 128256, "%s %d",
          c->arch, c->vocab_size);
    CHECK(c->rope_llama3 && c->rope_factor == 32.f &&
          c->rope_low_freq_factor == 1.f && c->rope_high_freq_factor == 4.f &&
          c->rope_orig_max_pos == 8192 && c->rope_theta == 500000.f,
          "llama3 rope %d %g %g %g %d %g", c->rope_llama3, c->rope_factor,
          c->rope_low_freq_factor, c->rope_high_freq_factor,
          c->rope_orig_max_pos, c->rope_theta);
    CHECK(c->tie_embeddings && c->max_pos == 131072, "tied/max_pos");
    CHECK(c->bos_id == 128000 && c->n_eos == 3 && c->eos_ids[0] == 128001 &&
          c->eos_ids[1] == 128008 && c->eos_ids[2] == 128009, "bos/eos");
    check_layers(dir, m);
    printf("tiny-llama3: config and views match\n");
    pie_model_free(m);
}

static void test_tiny_qwen2(void)
{
    const char *dir = test_shared_path("models/tiny-qwen2");
    pie_model *m = load(dir);
    const pie_model_config *c = &m->cfg;
    check_common_tiny(c);
    CHECK(!strcmp(c->arch, "qwen2") && c->vocab_size == 151936, "%s %d",
          c->arch, c->vocab_size);
    CHECK(c->qkv_bias && !c->qk_norm && c->tie_embeddings && !c->rope_llama3,
          "qwen2 flags");
    CHECK(fabsf(c->norm_eps - 1e-6f) < 1e-12f && c->rope_theta == 1e6f,
          "eps %g theta %g", c->norm_eps, c->rope_theta);
    CHECK(c->n_eos == 1 && c->eos_ids[0] == 151645 && c->bos_id == 151643,
          "eos");
    check_layers(dir, m);
    printf("tiny-qwen2: config, q/k/v bias views match\n");
    pie_model_free(m);
}

static void test_tiny_qwen3(void)
{
    const char *dir = test_shared_path("models/tiny-qwen3");
    pie_model *m = load(dir);
    const pie_model_config *c = &m->cfg;
    check_common_tiny(c);
    CHECK(!strcmp(c->arch, "qwen3") && c->vocab_size == 151936, "%s %d",
          c->arch, c->vocab_size);
    CHECK(c->qk_norm && !c->qkv_bias && !c->tie_embeddings, "qwen3 flags");
    CHECK(m->w.lm_head.data != m->w.tok_embed.data, "untied lm_head");
    check_layers(dir, m);
    printf("tiny-qwen3: config, q/k norm and untied lm_head views match\n");
    pie_model_free(m);
}

/* Writes stories260K as two shards + index into a temp dir. */
static char *write_sharded(const char *src)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    size_t n;
    char *file = file_slurp(path, &n);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | (uint8_t)file[k];
    json_t *hdr = json_loadb(file + 8, hl, 0, NULL);
    const char *data = file + 8 + hl;
    json_t *h[2] = { json_object(), json_object() };
    json_t *wm = json_object();
    size_t used[2] = { 0, 0 };
    char *blob[2] = { malloc(n), malloc(n) };
    const char *key;
    json_t *v;
    int i = 0;
    json_object_foreach(hdr, key, v) {
        if (!strcmp(key, "__metadata__")) continue;
        int s = i++ % 2;   /* alternate tensors between the shards */
        json_t *off = json_object_get(v, "data_offsets");
        size_t b = json_integer_value(json_array_get(off, 0));
        size_t e = json_integer_value(json_array_get(off, 1));
        memcpy(blob[s] + used[s], data + b, e - b);
        json_t *nv = json_deep_copy(v);
        json_object_set_new(nv, "data_offsets",
                            json_pack("[I,I]", (json_int_t)used[s],
                                      (json_int_t)(used[s] + e - b)));
        json_object_set_new(h[s], key, nv);
        used[s] += e - b;
        json_object_set_new(wm, key, json_string(s ? "model-00002-of-00002"
                                                     ".safetensors"
                                                   : "model-00001-of-00002"
                                                     ".safetensors"));
    }
    char *dir = tmpdir_new();
    for (int s = 0; s < 2; s++) {
        char *hs = json_dumps(h[s], JSON_COMPACT);
        size_t sn;
        uint8_t *st = st_build(hs, blob[s], used[s], &sn);
        file_write(dir, s ? "model-00002-of-00002.safetensors"
                          : "model-00001-of-00002.safetensors", st, sn);
        free(st);
        free(hs);
        json_decref(h[s]);
        free(blob[s]);
    }
    json_t *idx = json_pack("{s:{s:I},s:o}", "metadata", "total_size",
                            (json_int_t)(n - 8 - hl), "weight_map", wm);
    char *is = json_dumps(idx, JSON_INDENT(1));
    file_write(dir, "model.safetensors.index.json", is, strlen(is));
    free(is);
    json_decref(idx);
    json_decref(hdr);
    free(file);
    const char *copy[] = { "config.json", "generation_config.json" };
    for (int k = 0; k < 2; k++) {
        snprintf(path, sizeof path, "%s/%s", src, copy[k]);
        char *t = file_slurp(path, &n);
        file_write(dir, copy[k], t, n);
        free(t);
    }
    return dir;
}

static void same_view(const char *what, const pie_tensor *a,
                      const pie_tensor *b)
{
    CHECK(a->ndim == b->ndim && a->dtype == b->dtype, "%s: ndim/dtype", what);
    CHECK(!memcmp(a->shape, b->shape, sizeof a->shape), "%s: shape", what);
    CHECK(a->data != b->data, "%s: sharded view should be its own mapping",
          what);
    CHECK(!memcmp(a->data, b->data, (size_t)pie_tensor_numel(a) * 4),
          "%s: bytes differ between sharded and single-file load", what);
}

static void test_sharded(void)
{
    const char *src = test_shared_path("models/stories260K");
    char *dir = write_sharded(src);
    pie_model *a = load(src), *b = load(dir);
    CHECK(!memcmp(&a->cfg, &b->cfg, sizeof a->cfg), "configs differ");
    CHECK(b->tok == NULL, "no tokenizer.json in the shard dir");
    same_view("tok_embed", &a->w.tok_embed, &b->w.tok_embed);
    same_view("final_norm", &a->w.final_norm, &b->w.final_norm);
    for (int l = 0; l < a->cfg.n_layers; l++) {
        const pie_layer_weights *x = &a->w.layers[l], *y = &b->w.layers[l];
        same_view("wq", &x->wq, &y->wq);
        same_view("wk", &x->wk, &y->wk);
        same_view("wv", &x->wv, &y->wv);
        same_view("wo", &x->wo, &y->wo);
        same_view("attn_norm", &x->attn_norm, &y->attn_norm);
        same_view("ffn_norm", &x->ffn_norm, &y->ffn_norm);
        same_view("w_gate", &x->w_gate, &y->w_gate);
        same_view("w_up", &x->w_up, &y->w_up);
        same_view("w_down", &x->w_down, &y->w_down);
    }
    printf("sharded stories260K (2 shards + index): all views identical\n");
    pie_model_free(a);
    pie_model_free(b);
    tmpdir_rm(dir);
}

/*
 * Writes stories260K with every tensor converted to F16 by the compiler's
 * _Float16 (the independent reference) and checks the loaded views.
 */
static void test_f16_checkpoint(void)
{
    const char *src = test_shared_path("models/stories260K");
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    size_t n;
    char *file = file_slurp(path, &n);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | (uint8_t)file[k];
    json_t *hdr = json_loadb(file + 8, hl, 0, NULL);
    const uint8_t *data = (const uint8_t *)file + 8 + hl;
    size_t nd = (n - 8 - hl) / 4;   /* F32 elements */
    uint16_t *half = malloc(nd * 2);
    for (size_t i = 0; i < nd; i++) {
        float f;
        memcpy(&f, data + 4 * i, 4);
        _Float16 h = (_Float16)f;
        memcpy(&half[i], &h, 2);
    }
    const char *key;
    json_t *v;
    json_object_foreach(hdr, key, v) {
        if (!strcmp(key, "__metadata__")) continue;
        json_t *off = json_object_get(v, "data_offsets");
        json_int_t b = json_integer_value(json_array_get(off, 0));
        json_int_t e = json_integer_value(json_array_get(off, 1));
        json_object_set_new(v, "dtype", json_string("F16"));
        json_object_set_new(v, "data_offsets", json_pack("[I,I]", b / 2,
                                                         e / 2));
    }
    char *hs = json_dumps(hdr, JSON_COMPACT);
    size_t sn;
    uint8_t *st = st_build(hs, half, nd * 2, &sn);
    char *dir = tmpdir_new();
    file_write(dir, "model.safetensors", st, sn);
    snprintf(path, sizeof path, "%s/config.json", src);
    char *cfg = file_slurp(path, &n);
    file_write(dir, "config.json", cfg, n);
    pie_model *m = load(dir);
    CHECK(m->cfg.dtype == PIE_DT_F16, "dtype %d", m->cfg.dtype);
    const pie_tensor *t = &m->w.layers[2].w_down;
    CHECK(t->dtype == PIE_DT_F16, "w_down dtype");
    /* w_down's offset in the F32 original: twice the halved one in hdr */
    json_t *wd = json_object_get(hdr, "model.layers.2.mlp.down_proj.weight");
    size_t base = 2 * json_integer_value(json_array_get(
                      json_object_get(wd, "data_offsets"), 0));
    for (int64_t i = 0; i < pie_tensor_numel(t); i += 97) {
        float f;
        memcpy(&f, data + base + 4 * i, 4);   /* the F32 original */
        float want = (float)(_Float16)f;
        CHECK(pie_tensor_get(t, i) == want, "f16 w_down[%lld]: %g vs %g",
              (long long)i, pie_tensor_get(t, i), want);
    }
    printf("F16 copy of stories260K: views convert like _Float16\n");
    pie_model_free(m);
    tmpdir_rm(dir);
    free(st);
    free(hs);
    free(cfg);
    free(half);
    json_decref(hdr);
    free(file);
}

int main(void)
{
    test_stories260k();
    test_tiny_llama3();
    test_tiny_qwen2();
    test_tiny_qwen3();
    test_sharded();
    test_f16_checkpoint();
    TEST_DONE();
}
