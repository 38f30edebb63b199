/*
 * test_model_random.c — "random:SHAPE" models: published shapes, N(0, 0.02)
 * statistics, norms exactly 1, determinism across loads, tying.
 */
#include <math.h>
#include <string.h>

#include "common/pie_err.h"
#include "model/model.h"
#include "tests/test_util.h"

static void stats(const pie_tensor *t, double *mean, double *sd,
                  double *maxabs)
{
    int64_t n = pie_tensor_numel(t);
    double s = 0, s2 = 0, mx = 0;
    for (int64_t i = 0; i < n; i++) {
        double v = pie_tensor_get(t, i);
        s += v;
        s2 += v * v;
        mx = fabs(v) > mx ? fabs(v) : mx;
    }
    *mean = s / n;
    *sd = sqrt(s2 / n - *mean * *mean);
    *maxabs = mx;
}

static void check_random_tensor(const char *what, const pie_tensor *t)
{
    double mean, sd, mx;
    stats(t, &mean, &sd, &mx);
    CHECK(fabs(mean) < 0.002 && fabs(sd - 0.02) < 0.001 && mx < 0.1 &&
          mx > 0.04, "%s: mean %g sd %g max %g, want N(0, 0.02)", what, mean,
          sd, mx);
}

static void check_ones(const char *what, const pie_tensor *t)
{
    for (int64_t i = 0; i < pie_tensor_numel(t); i++)
        CHECK(pie_tensor_get(t, i) == 1.0f, "%s[%lld] = %g, want 1", what,
              (long long)i, pie_tensor_get(t, i));
}

static void test_tiny(void)
{
    pie_model *a = NULL, *b = NULL;
    CHECK_OK(pie_model_load("random:tiny", NULL, NULL, &a));
    CHECK_OK(pie_model_load("random:tiny", NULL, NULL, &b));
    const pie_model_config *c = &a->cfg;
    CHECK(a->tok == NULL, "random model has no tokenizer");
    CHECK(c->dim == 64 && c->n_layers == 2 && c->vocab_size == 256 &&
          c->dtype == PIE_DT_F32, "tiny shape");
    CHECK(a->w.lm_head.data != a->w.tok_embed.data, "tiny is untied");
    CHECK(!memcmp(a->w.tok_embed.data, b->w.tok_embed.data,
                  (size_t)pie_tensor_numel(&a->w.tok_embed) * 4),
          "same seed must give the same embedding");
    CHECK(memcmp(a->w.layers[0].wq.data, a->w.layers[1].wq.data,
                 (size_t)pie_tensor_numel(&a->w.layers[0].wq) * 4),
          "layers must differ");
    check_random_tensor("tiny embed", &a->w.tok_embed);
    check_ones("tiny final_norm", &a->w.final_norm);
    check_ones("tiny attn_norm", &a->w.layers[1].attn_norm);
    pie_model_free(a);
    pie_model_free(b);
}

static void test_stories15m(void)
{
    pie_model *m = NULL;
    CHECK_OK(pie_model_load("random:stories15M", NULL, NULL, &m));
    const pie_model_config *c = &m->cfg;
    CHECK(c->dim == 288 && c->hidden_dim == 768 && c->n_layers == 6 &&
          c->n_heads == 6 && c->n_kv_heads == 6 && c->head_dim == 48 &&
          c->vocab_size == 32000 && c->dtype == PIE_DT_F32 &&
          c->rope_theta == 10000.f && !c->tie_embeddings && !c->rope_llama3,
          "stories15M config");
    const pie_layer_weights *w = &m->w.layers[5];
    CHECK(w->wq.shape[0] == 288 && w->wq.shape[1] == 288 &&
          w->w_down.shape[0] == 288 && w->w_down.shape[1] == 768 &&
          m->w.lm_head.shape[0] == 32000, "stories15M shapes");
    check_random_tensor("stories15M embed", &m->w.tok_embed);
    check_random_tensor("stories15M w_down", &w->w_down);
    check_random_tensor("stories15M lm_head", &m->w.lm_head);
    check_ones("stories15M ffn_norm", &w->ffn_norm);
    printf("random:stories15M: shapes and N(0, 0.02) stats ok\n");
    pie_model_free(m);
}

/* The bytes must not depend on how many threads filled them. */
static void test_thread_independence(void)
{
    pie_model *a = NULL, *b = NULL;
    setenv("PIE_RANDOM_THREADS", "1", 1);
    CHECK_OK(pie_model_load("random:stories15M", NULL, NULL, &a));
    setenv("PIE_RANDOM_THREADS", "5", 1);
    CHECK_OK(pie_model_load("random:stories15M", NULL, NULL, &b));
    unsetenv("PIE_RANDOM_THREADS");
    const pie_tensor *ta[] = { &a->w.tok_embed, &a->w.lm_head,
                               &a->w.layers[3].w_up, &a->w.layers[5].wo };
    const pie_tensor *tb[] = { &b->w.tok_embed, &b->w.lm_head,
                               &b->w.layers[3].w_up, &b->w.layers[5].wo };
    for (int i = 0; i < 4; i++)
        CHECK(!memcmp(ta[i]->data, tb[i]->data,
                      (size_t)pie_tensor_numel(ta[i]) * 4),
              "tensor %d differs between 1 and 5 fill threads", i);
    printf("random:stories15M: identical with 1 and 5 fill threads\n");
    pie_model_free(a);
    pie_model_free(b);
}

int main(void)
{
    test_tiny();
    test_stories15m();
    test_thread_independence();
    TEST_DONE();
}
