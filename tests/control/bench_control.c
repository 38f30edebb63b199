/*
 * bench_control.c — numbers for the control layer (not a test).
 *
 *   bench_control [MODEL] [MAX_TOKENS]
 *   bench_control gap [MAX_TOKENS]      (part 3 alone)
 *
 * 1. Native generation through the control layer on MODEL (default
 *    random:stories15M, CPU backend) at concurrency 1, 8, 64: ms per output
 *    token (mean over generations), tokens/s, mean batch, control overhead
 *    per fire; and at concurrency 1 the same decode loop driving the backend
 *    directly, so the control layer's cost shows as the ratio.
 * 2. Scheduling cost alone: 256 concurrent generations on the fake backend
 *    (no compute): microseconds of control time per request.
 * 3. The host's time between two fires, as a GPU would see it: chained
 *    generations at concurrency 1 and 64 on the fake backend whose forward
 *    sleeps 1 ms (the device thread waits, as on a GPU); the gap is the
 *    time a token takes beyond its fire's backend time.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "control/control.h"
#include "model/model.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct job {
    pie_ctl *ctl;
    int32_t  prompt[8], n;
    double   secs;
    int      rc;
} job;

static int32_t g_max_tokens = 64;

static void *run(void *arg)
{
    job *j = arg;
    int32_t out[4096];
    pie_ctl_gen_opts o = { .prompt = j->prompt, .n_prompt = 8,
                           .max_tokens = g_max_tokens, .lookahead = 4,
                           .timeout_ms = -1 };
    double t = now_s();
    j->rc = pie_ctl_generate(j->ctl, &o, out, 4096, &j->n);
    j->secs = now_s() - t;
    return NULL;
}

/* Prints and returns the ms per token (mean over generations). */
static double bench_conc(pie_ctl *ctl, int conc, const char *what)
{
    job *jobs = calloc(conc, sizeof *jobs);
    pthread_t *th = calloc(conc, sizeof *th);
    pie_ctl_stats s0, s1;
    pie_ctl_get_stats(ctl, &s0);
    double t = now_s();
    for (int k = 0; k < conc; k++) {
        jobs[k].ctl = ctl;
        for (int i = 0; i < 8; i++) jobs[k].prompt[i] = 1 + (k * 31 + i * 7) % 200;
        pthread_create(&th[k], NULL, run, &jobs[k]);
    }
    double ms_tok = 0;
    int64_t toks = 0;
    for (int k = 0; k < conc; k++) {
        pthread_join(th[k], NULL);
        CHECK(jobs[k].rc == 0, "generation failed: %s", pie_err_msg());
        ms_tok += jobs[k].secs * 1e3 / jobs[k].n;
        toks += jobs[k].n;
    }
    double wall = now_s() - t;
    pie_ctl_get_stats(ctl, &s1);
    double fires = (double)(s1.fires - s0.fires);
    printf("%-8s conc %4d: %8.3f ms/token  %9.1f tokens/s  mean batch %6.1f  "
           "control %6.1f us/fire  backend %8.1f us/fire\n", what, conc,
           ms_tok / conc, toks / wall,
           (double)(s1.fired_reqs - s0.fired_reqs) / fires,
           (s1.overhead_ns_total - s0.overhead_ns_total) / fires / 1e3,
           (s1.backend_ns_total - s0.backend_ns_total) / fires / 1e3);
    free(jobs);
    free(th);
    return ms_tok / conc;
}

/* Part 3: generations at concurrency conc on fb with 1 ms forwards, each
 * token's time beyond its fire's backend time (a fresh control layer, so
 * the counters are this run's alone). */
static void bench_gap(pie_backend *fb, int conc)
{
    pie_ctl *ctl = NULL;
    fake_backend_set_delay(fb, 1000);
    CHECK_OK(pie_ctl_create(fb, NULL, &ctl));
    double ms = bench_conc(ctl, conc, "fake 1ms");
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    double be = st.backend_ns_total / (double)st.fires / 1e3;
    printf("fake 1ms conc %4d: %.1f us a token beyond its fire's %.1f us of "
           "backend time\n", conc, ms * 1e3 - be, be);
    pie_ctl_free(ctl);
    fake_backend_set_delay(fb, 0);
}

/* The same greedy loop without the control layer: one request per call. */
static void bench_direct(pie_backend *b)
{
    int32_t ps = b->page_size, pages[512], tok = 0;
    for (int i = 0; i < 512 && i < b->n_pages; i++) pages[i] = i;
    int32_t prompt[8], pos[8];
    for (int i = 0; i < 8; i++) prompt[i] = 1 + i * 7, pos[i] = i;
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    double t = now_s();
    int32_t kv = 0;
    for (int32_t step = 0; step < g_max_tokens; step++) {
        int32_t n = step ? 1 : 8, p0 = step ? 8 + step - 1 : 0;
        for (int i = 0; i < n; i++) pos[i] = p0 + i;
        kv = p0 + n;
        int32_t np = (kv + ps - 1) / ps, last = kv - (np - 1) * ps;
        int32_t qo[2] = { 0, n }, kvi[2] = { 0, np }, oi = n - 1;
        pie_forward_batch fb = { .n_tokens = n, .n_reqs = 1,
            .token_ids = step ? &tok : prompt, .positions = pos,
            .qo_indptr = qo, .kv_page_indices = pages, .kv_page_indptr = kvi,
            .kv_last_page_len = &last, .n_outputs = 1, .output_token_idx = &oi,
            .samplers = &s };
        pie_forward_out out;
        CHECK_OK(pie_forward_out_alloc(&fb, b->cfg->vocab_size, &out));
        CHECK_OK(pie_backend_forward(b, &fb, &out));
        tok = out.tokens[0];
        pie_forward_out_free(&out);
    }
    double secs = now_s() - t;
    printf("direct   conc    1: %8.3f ms/token (backend only, no control "
           "layer)\n", secs * 1e3 / g_max_tokens);
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "random:stories15M";
    if (argc > 2) g_max_tokens = atoi(argv[2]);
    pie_backend *fb = NULL;
    if (strcmp(path, "gap") == 0) {
        CHECK_OK(fake_backend_create(32000, 16, 16384, 0, &fb));
        bench_gap(fb, 1);
        bench_gap(fb, 64);
        pie_backend_free(fb);
        return 0;
    }
    pie_model *m = NULL;
    CHECK_OK(pie_model_load(path, NULL, NULL, &m));
    pie_backend_opts bo = { .page_size = 16, .n_pages = 4096 };
    pie_backend *b = NULL;
    CHECK_OK(pie_backend_cpu_create(m, &bo, &b));
    printf("model %s, %d tokens per generation, CPU backend\n", path,
           g_max_tokens);
    bench_direct(b);
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    bench_conc(ctl, 1, "native");
    bench_conc(ctl, 8, "native");
    bench_conc(ctl, 64, "native");
    pie_ctl_free(ctl);
    pie_backend_free(b);
    pie_model_free(m);

    CHECK_OK(fake_backend_create(32000, 16, 16384, 0, &fb));
    CHECK_OK(pie_ctl_create(fb, NULL, &ctl));
    bench_conc(ctl, 256, "fake");
    bench_gap(fb, 1);
    bench_gap(fb, 64);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    printf("fake backend: %.2f us of control time per request (%llu requests "
           "in %llu fires)\n", st.overhead_ns_total / st.fired_reqs / 1e3,
           (unsigned long long)st.fired_reqs, (unsigned long long)st.fires);
    pie_ctl_free(ctl);
    pie_backend_free(fb);
    return 0;
}
