/*
 * test_control_model.c — native generation through the control layer on the
 * CPU backend with ../shared/models/stories260K, against the greedy ids that
 * Hugging Face transformers produced (reference.json): alone, and as many
 * concurrent clients batched together (with prefix dedup on, chunked
 * prefill, and various lookaheads), every one must reproduce the reference.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "control/control.h"
#include "model/model.h"
#include "tests/test_util.h"

typedef struct ref_prompt {
    int32_t ids[64], n;
    int32_t greedy[128], n_greedy;
} ref_prompt;

static int load_refs(ref_prompt *r, int max)
{
    json_error_t e;
    json_t *j = json_load_file(test_shared_path("models/stories260K/"
                                                "reference.json"), 0, &e);
    CHECK(j != NULL, "reference.json: %s", e.text);
    json_t *ps = json_object_get(j, "prompts");
    int n = 0;
    for (size_t k = 0; k < json_array_size(ps) && n < max; k++, n++) {
        json_t *p = json_array_get(ps, k);
        json_t *in = json_object_get(p, "input_ids");
        json_t *g = json_object_get(p, "greedy_ids");
        r[n].n = (int32_t)json_array_size(in);
        r[n].n_greedy = (int32_t)json_array_size(g);
        CHECK(r[n].n <= 64 && r[n].n_greedy <= 128, "reference too long");
        for (int32_t i = 0; i < r[n].n; i++)
            r[n].ids[i] = (int32_t)json_integer_value(json_array_get(in, i));
        for (int32_t i = 0; i < r[n].n_greedy; i++)
            r[n].greedy[i] = (int32_t)json_integer_value(json_array_get(g, i));
    }
    json_decref(j);
    return n;
}

typedef struct job {
    pie_ctl          *ctl;
    const ref_prompt *r;
    int32_t           lookahead;
    int32_t           got[128], n;
    int               rc;
} job;

static void *run_job(void *arg)
{
    job *j = arg;
    pie_ctl_gen_opts o = { .prompt = j->r->ids, .n_prompt = j->r->n,
                           .sampler = { .kind = PIE_SAMPLER_GREEDY },
                           .max_tokens = j->r->n_greedy,
                           .lookahead = j->lookahead, .timeout_ms = 10000 };
    j->rc = pie_ctl_generate(j->ctl, &o, j->got, 128, &j->n);
    return NULL;
}

static void check_job(const job *j, const char *what, int k)
{
    CHECK(j->rc == 0, "%s %d: generate returned %d", what, k, j->rc);
    CHECK(j->n == j->r->n_greedy, "%s %d: %d tokens", what, k, j->n);
    for (int32_t i = 0; i < j->n; i++)
        CHECK(j->got[i] == j->r->greedy[i], "%s %d: expected %d, got %d at "
              "step %d", what, k, j->r->greedy[i], j->got[i], i);
}

int main(void)
{
    ref_prompt refs[4];
    int nr = load_refs(refs, 4);
    CHECK(nr == 2, "%d prompts in reference.json", nr);
    pie_model *m = NULL;
    CHECK_OK(pie_model_load(test_shared_path("models/stories260K"), NULL, NULL,
                            &m));
    /* small pages so the 5-token prompt fills one: prefix caching works */
    pie_backend_opts bo = { .page_size = 4, .n_pages = 2048, .n_threads = 2 };
    pie_backend *b = NULL;
    CHECK_OK(pie_backend_cpu_create(m, &bo, &b));
    pie_ctl_opts co = { .prefill_chunk = 3 };
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(b, &co, &ctl));

    /* alone */
    for (int p = 0; p < nr; p++) {
        job j = { .ctl = ctl, .r = &refs[p], .lookahead = 4 };
        run_job(&j);
        check_job(&j, "alone, prompt", p);
    }
    printf("alone: both prompts reproduce 100 reference greedy ids\n");

    /* many concurrent clients */
    enum { NJ = 24 };
    static job jobs[NJ];
    pthread_t th[NJ];
    for (int k = 0; k < NJ; k++) {
        jobs[k] = (job){ .ctl = ctl, .r = &refs[k % nr],
                         .lookahead = 1 + k % 8 };
        pthread_create(&th[k], NULL, run_job, &jobs[k]);
    }
    for (int k = 0; k < NJ; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < NJ; k++) check_job(&jobs[k], "concurrent job", k);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.max_batch_reqs > 1, "largest fire had %d requests",
          st.max_batch_reqs);
    CHECK(st.pages_free == st.pages_total, "%d of %d pages free",
          st.pages_free, st.pages_total);
    CHECK(st.queue_depth == 0, "queue depth %d", st.queue_depth);
    printf("concurrent: %d clients all reproduce the reference; %llu fires, "
           "mean batch %.1f, largest %d, dedup hits %llu, control overhead "
           "%.1f us/fire vs backend %.1f us/fire\n", NJ,
           (unsigned long long)st.fires,
           (double)st.fired_reqs / (double)st.fires, st.max_batch_reqs,
           (unsigned long long)st.dedup_hits,
           st.overhead_ns_total / st.fires / 1e3,
           st.backend_ns_total / st.fires / 1e3);

    /* again alone: the prompt's full page is cached, outputs unchanged */
    uint64_t skipped0 = st.prefix_tokens_skipped;
    job j = { .ctl = ctl, .r = &refs[1], .lookahead = 2 };
    run_job(&j);
    check_job(&j, "cached prefix, prompt", 1);
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.prefix_tokens_skipped >= skipped0 + 4, "prefix tokens skipped "
          "%llu, before %llu", (unsigned long long)st.prefix_tokens_skipped,
          (unsigned long long)skipped0);
    printf("prefix cache: %llu prompt tokens not recomputed in all; outputs "
           "match the reference\n",
           (unsigned long long)st.prefix_tokens_skipped);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    pie_model_free(m);
    TEST_DONE();
}
