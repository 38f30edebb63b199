/*
 * cmd_bench_gen.c — `pie bench generate`: C concurrent generations of N
 * tokens each, either through the bundled text-completion inferlet (one
 * WebAssembly instance per generation) or, with --native, through the same
 * loop built into the engine (pie_ctl_generate). Both paths do the same
 * work: a unique seeded random prompt of L ids, greedy sampling, no EOS
 * stop, no detokenizing, the SDK's default lookahead of chained decode
 * steps; the ratio of their times is the cost of programmability.
 *
 * Timing per generation: from just before it is launched (the instance's
 * pie_rt_launch, or the pie_ctl_generate call) to its end (the instance's
 * exit, or the call's return); ms_per_token = mean over generations of
 * that time / N. tokens_per_s = C*N / (last end - first start). A thread
 * samples the control layer's counters every 2 ms for the peak page use.
 *
 * --both runs the two paths in turn in one process, --reps times each
 * (inferlet first in odd runs, native first in even ones, each run with
 * prompts of its own so that no run reuses another's cached prefix), and
 * prints the median of each and their ratio. One process shares one model
 * and one backend, so both paths run on the same tuned kernels (the CUDA
 * backend times its matmul choices when it starts, and near ties go either
 * way from one process to the next).
 *
 * A pool too small for all C at once (--pages) is served as the control
 * layer's admission decides (control/pool.c): generations wait for pages
 * that others free, and when all of them hold pages and wait for more the
 * newest fails with "KV pool exhausted" so the older ones finish. Each
 * failure is printed (with the inferlet's own message), timings cover the
 * generations that finished, and the exit status is 1.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "common/pie_err.h"
#include "control/control.h"
#include "runtime/host_engine.h"
#include "runtime/runtime.h"

#define BG_LOOKAHEAD 4          /* the SDK's default (sdk/c/pie.h)         */
#define BG_MAX_REPS  100        /* --reps                                  */

typedef struct bg_args {
    const char *model, *backend;
    int  concurrency, max_tokens, prompt_len, pages, threads, workers;
    int  page_size, reps;
    bool native, json, shared_prompt, both;
    pie_cli_gpu gpu;
} bg_args;

typedef struct bg_gen {          /* one generation                         */
    int      id;                 /* index, for messages                    */
    int32_t *prompt;             /* (prompt_len) ids                       */
    double   t0, t1;             /* start, end (pie_cli_now)               */
    int32_t  status;
    int32_t  n_out;
    char     err[512];           /* inferlet stderr not yet printed        */
    size_t   n_err;
} bg_gen;

typedef struct bg_run {
    const bg_args *a;
    pie_ctl       *ctl;
    int32_t        vocab;        /* for the prompts                        */
    bg_gen        *g;            /* (concurrency)                          */
    volatile int   done;         /* sampler stop flag                      */
    int32_t        peak_pages;
    double         sum_pages;    /* pages_used summed over samples         */
    long           n_samples;
} bg_run;

/* Run `run`'s prompts (its own: different runs share no prefix). */
static void make_prompts(bg_run *r, int32_t vocab, int run)
{
    uint64_t s = 0x5eed + 1000003ull * (uint64_t)run;
    for (int i = 0; i < r->a->concurrency; i++)
        for (int j = 0; j < r->a->prompt_len; j++) {
            if (r->a->shared_prompt && i > 0) {
                r->g[i].prompt[j] = r->g[0].prompt[j];
                continue;
            }
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            r->g[i].prompt[j] = (int32_t)((s >> 33) % (uint64_t)vocab);
        }
}

static void *sample_pages(void *p)
{
    bg_run *r = p;
    struct timespec ts = { 0, 2000000 };
    while (!r->done) {
        pie_ctl_stats st;
        pie_ctl_get_stats(r->ctl, &st);
        if (st.pages_used > r->peak_pages) r->peak_pages = st.pages_used;
        r->sum_pages += st.pages_used;
        r->n_samples++;
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* ---- native: one thread per generation --------------------------------- */

typedef struct bg_native_arg { bg_run *r; int i; } bg_native_arg;

static void *native_one(void *p)
{
    bg_native_arg *na = p;
    bg_run *r = na->r;
    bg_gen *g = &r->g[na->i];
    int32_t *out = malloc(sizeof(int32_t) * (size_t)r->a->max_tokens);
    if (!out) pie_err_set(PIE_ENOMEM, "out of memory for %d output ids",
                          r->a->max_tokens);
    pie_ctl_gen_opts o = {
        .prompt = g->prompt, .n_prompt = r->a->prompt_len,
        .sampler = { .kind = PIE_SAMPLER_GREEDY },
        .max_tokens = r->a->max_tokens, .lookahead = BG_LOOKAHEAD,
        .timeout_ms = -1,
    };
    g->t0 = pie_cli_now();
    g->status = out ? pie_ctl_generate(r->ctl, &o, out, r->a->max_tokens,
                                       &g->n_out) : PIE_ENOMEM;
    g->t1 = pie_cli_now();
    if (g->status) fprintf(stderr, "pie bench generate: generation %d: %s\n",
                           na->i, pie_err_msg());
    free(out);
    return NULL;
}

static int run_native(bg_run *r)
{
    int n = r->a->concurrency, rc = 0;
    pthread_t *th = calloc((size_t)n, sizeof *th);
    bg_native_arg *na = calloc((size_t)n, sizeof *na);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 256 << 10);
    int started = 0;
    for (int i = 0; th && na && i < n; i++, started++) {
        na[i] = (bg_native_arg){ r, i };
        if (pthread_create(&th[i], &at, native_one, &na[i])) {
            rc = pie_err_set(PIE_ENOMEM, "cannot start thread %d", i);
            break;
        }
    }
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    pthread_attr_destroy(&at);
    free(th);
    free(na);
    return th && na ? rc : pie_err_set(PIE_ENOMEM, "out of memory");
}

/* ---- inferlet: one text-completion instance per generation ------------- */

static void on_exit_cb(void *user, pie_rt_instance *i, int32_t status,
                       const char *reason, const void *ret, size_t len)
{
    bg_gen *g = user;
    g->t1 = pie_cli_now();
    g->status = status;          /* n_out was counted from the message */
}

/* Prints g's buffered inferlet stderr as one line. */
static void flush_err(bg_gen *g)
{
    if (g->n_err > 0)
        fprintf(stderr, "pie bench generate: instance %d: %.*s\n", g->id,
                (int)g->n_err, g->err);
    g->n_err = 0;
}

/* The instance's stderr (its reason for failing), line by line. */
static void on_output_cb(void *user, pie_rt_instance *i, int fd,
                         const char *buf, size_t len)
{
    bg_gen *g = user;
    for (size_t k = 0; fd == 2 && k < len; k++) {
        if (buf[k] == '\n' || g->n_err == sizeof g->err) flush_err(g);
        if (buf[k] != '\n') g->err[g->n_err++] = buf[k];
    }
}

static void on_msg_cb(void *user, pie_rt_instance *i, const void *buf,
                      size_t len)
{
    bg_gen *g = user;            /* {"ids":[a,b,...],...}: count the ids */
    const char *p = memchr(buf, '[', len), *e = memchr(buf, ']', len);
    int n = 0;
    if (p && e && e > p + 1) {
        n = 1;
        for (const char *q = p; q < e; q++) n += *q == ',';
    }
    g->n_out = n;
}

static int launch_one(bg_run *r, pie_rt *rt, pie_rt_module *mod, int i,
                      pie_rt_instance **inst)
{
    const bg_args *a = r->a;
    char *ids = malloc((size_t)a->prompt_len * 12 + 1), mt[32];
    if (!ids) return pie_err_set(PIE_ENOMEM, "out of memory");
    size_t k = 0;
    for (int j = 0; j < a->prompt_len; j++)
        k += (size_t)sprintf(ids + k, "%s%d", j ? "," : "", r->g[i].prompt[j]);
    snprintf(mt, sizeof mt, "%d", a->max_tokens);
    const char *argv[] = { "text-completion", "--prompt-ids", ids,
                           "--max-tokens", mt, "--temperature", "0",
                           "--ignore-eos", "--no-text", "--json",
                           "--lookahead", "4" };
    pie_rt_launch_cbs cbs = { .user = &r->g[i], .on_output = on_output_cb,
                              .on_message = on_msg_cb, .on_exit = on_exit_cb };
    r->g[i].t0 = pie_cli_now();
    int rc = pie_rt_launch(rt, mod, (int)(sizeof argv / sizeof *argv), argv,
                           &cbs, inst);
    free(ids);
    return rc;
}

static int run_inferlet(bg_run *r, pie_rt *rt, pie_rt_module *mod)
{
    int n = r->a->concurrency, rc = 0, launched = 0;
    pie_rt_instance **inst = calloc((size_t)n, sizeof *inst);
    if (!inst) return pie_err_set(PIE_ENOMEM, "out of memory");
    for (; launched < n && !rc; launched++)
        if ((rc = launch_one(r, rt, mod, launched, &inst[launched])) != 0)
            break;
    for (int i = 0; i < launched; i++) {     /* failures: see report() */
        char reason[256] = "";
        int st = pie_rt_wait(inst[i], reason, sizeof reason);
        flush_err(&r->g[i]);
        if (st != 0)
            fprintf(stderr, "pie bench generate: instance %d failed (status "
                    "%d)%s%s\n", i, st, *reason ? ": " : "", reason);
        r->g[i].status = st;
        pie_rt_instance_unref(inst[i]);
    }
    free(inst);
    return rc;
}

/* ---- setup and report --------------------------------------------------- */

/* What a run measured over the generations that finished (ok). */
typedef struct bg_time {
    double mspt, tps;            /* ms per token (mean), tokens/s          */
    int    ok;
} bg_time;

static bg_time measure(const bg_run *r)
{
    const bg_args *a = r->a;
    double sum = 0, t0 = 1e300, t1 = 0;
    long toks = 0;
    int ok = 0;
    for (int i = 0; i < a->concurrency; i++) {
        const bg_gen *g = &r->g[i];
        if (g->status || g->n_out != a->max_tokens) continue;
        ok++;
        sum += (g->t1 - g->t0) * 1e3 / a->max_tokens;
        toks += g->n_out;
        if (g->t0 < t0) t0 = g->t0;
        if (g->t1 > t1) t1 = g->t1;
    }
    return (bg_time){ ok ? sum / ok : 0, ok ? toks / (t1 - t0) : 0, ok };
}

/* Prints the results; returns the number of generations that failed. */
static int report(const bg_run *r, const pie_ctl_stats *st, double wall)
{
    const bg_args *a = r->a;
    bg_time t = measure(r);
    int ok = t.ok;
    double mspt = t.mspt, tps = t.tps;
    double fires = st->fires ? (double)st->fires : 1;
    const char *mode = a->native ? "native" : "inferlet";
    double mean_pages = r->n_samples ? r->sum_pages / r->n_samples : 0;
    if (a->json) {
        printf("{\"mode\":\"%s\",\"model\":\"%s\",\"concurrency\":%d,"
               "\"max_tokens\":%d,\"prompt_len\":%d,\"ok\":%d,\"failed\":%d,"
               "\"ms_per_token\":%.4f,\"tokens_per_s\":%.1f,\"wall_s\":%.3f,"
               "\"fires\":%llu,\"mean_batch_reqs\":%.2f,"
               "\"control_us_per_fire\":%.2f,\"backend_ms_per_fire\":%.4f,"
               "\"peak_pages\":%d,\"mean_pages\":%.1f,\"dedup_hits\":%llu,"
               "\"prefix_tokens_skipped\":%llu}\n", mode, a->model, a->concurrency,
               a->max_tokens, a->prompt_len, ok, a->concurrency - ok, mspt,
               tps, wall,
               (unsigned long long)st->fires, st->fired_reqs / fires,
               st->overhead_ns_total / fires / 1e3,
               st->backend_ns_total / fires / 1e6, r->peak_pages, mean_pages,
               (unsigned long long)st->dedup_hits,
               (unsigned long long)st->prefix_tokens_skipped);
        return a->concurrency - ok;
    }
    printf("%s: %d/%d generations of %d tokens (prompt %d) on %s\n", mode, ok,
           a->concurrency, a->max_tokens, a->prompt_len, a->model);
    printf("  %.3f ms/token (mean per generation), %.1f tokens/s, wall %.2f s\n",
           mspt, tps, wall);
    printf("  %llu fires, %.1f requests/fire, control %.1f us/fire, backend "
           "%.3f ms/fire\n", (unsigned long long)st->fires,
           st->fired_reqs / fires, st->overhead_ns_total / fires / 1e3,
           st->backend_ns_total / fires / 1e6);
    printf("  KV pages: peak %d, mean %.1f; dedup hits %llu, prompt tokens "
           "served from cache %llu\n", r->peak_pages, mean_pages,
           (unsigned long long)st->dedup_hits,
           (unsigned long long)st->prefix_tokens_skipped);
    return a->concurrency - ok;
}

/* One run of one path with run `run`'s prompts, timed from the first
 * launch to the last end (*wall); 0, or -1 with the error printed. */
static int run_once(bg_run *r, bool native, int run, pie_rt *rt,
                    pie_rt_module *mod, double *wall)
{
    for (int i = 0; i < r->a->concurrency; i++) {
        bg_gen *g = &r->g[i];
        g->t0 = g->t1 = 0;
        g->status = g->n_out = 0;
        g->n_err = 0;
    }
    make_prompts(r, r->vocab, run);
    r->done = 0;
    r->peak_pages = 0;
    r->sum_pages = 0;
    r->n_samples = 0;
    pthread_t sampler;
    /* without the sampler thread the page statistics stay empty */
    bool sampling = pthread_create(&sampler, NULL, sample_pages, r) == 0;
    double t0 = pie_cli_now();
    int rc = native ? run_native(r) : run_inferlet(r, rt, mod);
    *wall = pie_cli_now() - t0;
    r->done = 1;
    if (sampling) pthread_join(sampler, NULL);
    if (rc) fprintf(stderr, "pie bench generate: %s\n", pie_err_msg());
    return rc ? -1 : 0;
}

static double median(double *v, int n)
{
    for (int i = 1; i < n; i++)             /* insertion sort: n <= 100 */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j]; v[j] = v[j - 1]; v[j - 1] = t;
        }
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* --both: the inferlet and the native loop in turn, reps runs each (the
 * inferlet first in odd runs), then the medians and their ratio. */
static int run_both(bg_run *r, pie_rt *rt, pie_rt_module *mod)
{
    const bg_args *a = r->a;
    double ms[2][BG_MAX_REPS], tps[2][BG_MAX_REPS], wall;
    for (int k = 0; k < a->reps; k++)
        for (int j = 0; j < 2; j++) {
            int native = j ^ (k & 1);           /* 0: the inferlet */
            if (run_once(r, native, 2 * k + j + 1, rt, mod, &wall)) return -1;
            bg_time t = measure(r);
            if (t.ok != a->concurrency) {
                fprintf(stderr, "pie bench generate: %d of %d %s generations "
                        "failed (see above)\n", a->concurrency - t.ok,
                        a->concurrency, native ? "native" : "inferlet");
                return -1;
            }
            ms[native][k] = t.mspt;
            tps[native][k] = t.tps;
        }
    double mi = median(ms[0], a->reps), mn = median(ms[1], a->reps);
    double ti = median(tps[0], a->reps), tn = median(tps[1], a->reps);
    if (a->json)
        printf("{\"mode\":\"both\",\"model\":\"%s\",\"concurrency\":%d,"
               "\"max_tokens\":%d,\"prompt_len\":%d,\"reps\":%d,"
               "\"inferlet_ms_per_token\":%.4f,\"native_ms_per_token\":%.4f,"
               "\"ratio\":%.4f,\"inferlet_tokens_per_s\":%.1f,"
               "\"native_tokens_per_s\":%.1f}\n", a->model, a->concurrency,
               a->max_tokens, a->prompt_len, a->reps, mi, mn, mi / mn, ti, tn);
    else
        printf("inferlet/native: %d generations of %d tokens (prompt %d) on "
               "%s, %d runs of each in one process\n  inferlet %.3f ms/token, "
               "native %.3f (medians): ratio %.3f; %.1f / %.1f tokens/s\n",
               a->concurrency, a->max_tokens, a->prompt_len, a->model, a->reps,
               mi, mn, mi / mn, ti, tn);
    return 0;
}

/* Runs the chosen path (or both) with the model, backend and control
 * layer set up. */
static int bench_with(bg_run *r, pie_model *m, const bg_args *a)
{
    pie_engine *eng = NULL;
    pie_rt *rt = NULL;
    pie_rt_module *mod = NULL;
    char path[4096];
    int rc = -1;
    if (a->both || !a->native) {
        pie_engine_opts eo = {0};
        pie_rt_opts ro = { .n_workers = a->workers, .cpu_limit_s = -1 };
        if (pie_cli_resolve_inferlet("text-completion", path, sizeof path))
            return -1;
        if (pie_engine_create(&eo, &eng) || pie_engine_add_model(eng, "default",
                                                                 m, r->ctl)) {
            fprintf(stderr, "pie bench generate: %s\n", pie_err_msg());
            goto out;
        }
        ro.hooks = pie_engine_hooks(eng);
        if (pie_rt_create(&ro, &rt)) {
            fprintf(stderr, "pie bench generate: %s\n", pie_err_msg());
            goto out;
        }
        if (pie_cli_load_inferlet(rt, path, &mod)) goto out;
    }
    if (a->both) {
        rc = run_both(r, rt, mod);
        goto out;
    }
    double wall;
    if ((rc = run_once(r, a->native, 0, rt, mod, &wall)) != 0) goto out;
    pie_ctl_stats st;
    pie_ctl_get_stats(r->ctl, &st);
    int failed = report(r, &st, wall);
    if (failed) {
        fprintf(stderr, "pie bench generate: %d of %d generations failed (see "
                "above); the timings cover the rest\n", failed,
                a->concurrency);
        rc = -1;
    }
out:
    if (mod) pie_rt_module_unref(mod);
    pie_rt_free(rt);
    pie_engine_free(eng);
    return rc ? -1 : 0;
}

/* The KV pool's size: --pages, or enough for every generation at once
 * (0 when that passes INT32_MAX pages); *need = the pages one generation
 * needs. In 64 bits: the options' ranges keep these from overflowing. */
static int64_t pool_pages(const bg_args *a, int64_t *need)
{
    int64_t tokens = (int64_t)a->prompt_len + a->max_tokens + BG_LOOKAHEAD;
    *need = (tokens + a->page_size - 1) / a->page_size;
    if (a->pages) return a->pages;
    int64_t all = (int64_t)a->concurrency * (tokens / a->page_size + 2) + 64;
    return all > INT32_MAX ? 0 : all;
}

static int bench_generate(const bg_args *a)
{
    pie_model *m = NULL;
    pie_backend *b = NULL;
    bg_run r = { .a = a };
    int status = 1;
    int64_t need, pages = pool_pages(a, &need);
    if (!pages) {
        fprintf(stderr, "pie bench generate: %d generations of %d + %d tokens "
                "need more than %d KV pages of %d tokens; lower -c or -n, "
                "raise --page-size or give --pages\n", a->concurrency,
                a->prompt_len, a->max_tokens, INT32_MAX, a->page_size);
        return 2;
    }
    if (pages < need) {          /* every generation would fail */
        fprintf(stderr, "pie bench generate: --pages %lld cannot hold one "
                "generation (%lld pages of %d tokens needed)\n",
                (long long)pages, (long long)need, a->page_size);
        return 2;
    }
    r.g = calloc((size_t)a->concurrency, sizeof *r.g);
    for (int i = 0; r.g && i < a->concurrency; i++)
        if (!(r.g[i].prompt = malloc(sizeof(int32_t) *
                                     (size_t)a->prompt_len))) {
            fprintf(stderr, "pie bench generate: out of memory\n");
            goto out;
        }
    if (!r.g) fprintf(stderr, "pie bench generate: out of memory\n");
    if (!r.g || pie_cli_load_model(a->model, &m)) goto out;
    if (pie_cli_backend(a->backend, m, a->page_size, (int)pages, a->threads,
                        &a->gpu, &b))
        goto out;
    pie_ctl_opts co = { .no_dedup = false };
    if (pie_ctl_create(b, &co, &r.ctl)) {
        fprintf(stderr, "pie bench generate: %s\n", pie_err_msg());
        goto out;
    }
    r.vocab = m->cfg.vocab_size;
    for (int i = 0; i < a->concurrency; i++) r.g[i].id = i;
    status = bench_with(&r, m, a) ? 1 : 0;
out:
    pie_ctl_free(r.ctl);
    pie_backend_free(b);
    pie_model_free(m);
    for (int i = 0; r.g && i < a->concurrency; i++) free(r.g[i].prompt);
    free(r.g);
    return status;
}

int pie_cmd_bench_generate(int argc, char **argv)
{
    bg_args a = { .concurrency = 1, .max_tokens = 64, .prompt_len = 16,
                  .page_size = 16, .workers = 2, .reps = 3, .backend = "auto",
                  .gpu = PIE_CLI_GPU_DEFAULT };
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &a.model, "model directory or random:SHAPE" },
        { "concurrency", 'c', OPT_INT, &a.concurrency, "concurrent generations (1)" },
        { "max-tokens", 'n', OPT_INT, &a.max_tokens, "tokens per generation, "
          "EOS ignored, 1..2^24 (64)" },
        { "prompt-len", 'L', OPT_INT, &a.prompt_len, "random prompt ids per generation (16)" },
        { "native", 0, OPT_FLAG, &a.native, "the built-in loop instead of the inferlet" },
        { "both", 0, OPT_FLAG, &a.both, "the inferlet and the built-in loop in "
          "turn in one process, --reps runs of each: medians and their ratio" },
        { "reps", 0, OPT_INT, &a.reps, "runs of each path with --both, 1..100 (3)" },
        { "json", 0, OPT_FLAG, &a.json, "print one JSON object" },
        { "shared-prompt", 0, OPT_FLAG, &a.shared_prompt, "every generation "
          "gets the same prompt (its full pages are shared by prefix caching)" },
        { "backend", 'b', OPT_STR, &a.backend, "cpu, cuda or auto (auto)" },
        { "page-size", 0, OPT_INT, &a.page_size, "KV page size in tokens, "
          "1..65536 (16)" },
        { "pages", 0, OPT_INT, &a.pages, "KV pages in the pool (0 = enough)" },
        { "threads", 0, OPT_INT, &a.threads, "CPU backend threads (0 = all; "
          "at most 1024)" },
        PIE_CLI_OPT_GPU(a.gpu),
        { "workers", 0, OPT_INT, &a.workers, "inferlet worker threads, "
          "1..1024 (2)" },
        { 0 },
    };
    const pie_cmd_usage u = { "bench generate",
        "--model DIR|random:SHAPE --concurrency C --max-tokens N "
        "[--native | --both [--reps R]] [--json]",
        "Runs C concurrent greedy generations of N tokens from unique random "
        "prompts, through the text-completion inferlet or (--native) the "
        "engine's built-in loop, and prints the time per output token (mean "
        "over generations of launch-to-end time / N) and throughput.", opts };
    char *pos[1];
    int npos, dd, rc = pie_opts_parse(&u, argc, argv, pos, 0, &npos, &dd);
    if (rc) return rc < 0 ? 2 : 0;
    const char *cmd = "bench generate";
    if (pie_cli_check_int(cmd, "concurrency", a.concurrency, 1, 100000) ||
        pie_cli_check_int(cmd, "max-tokens", a.max_tokens, 1,
                          PIE_CLI_MAX_TOKENS) ||
        pie_cli_check_int(cmd, "prompt-len", a.prompt_len, 1, 4096) ||
        pie_cli_check_int(cmd, "pages", a.pages, 0, INT32_MAX) ||
        pie_cli_check_int(cmd, "workers", a.workers, 1, PIE_CLI_MAX_THREADS) ||
        pie_cli_check_int(cmd, "reps", a.reps, 1, BG_MAX_REPS) ||
        pie_cli_check_backend_opts(cmd, a.page_size, a.threads,
                                   &a.gpu))
        return 2;
    if (a.both && a.native) {
        fprintf(stderr, "pie bench generate: --both runs the native loop "
                "too; give one of --both and --native\n");
        return 2;
    }
    return bench_generate(&a);
}
