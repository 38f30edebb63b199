/*
 * test_cuda_fuzz.c — the CUDA backend against the CPU backend on the
 * batch fuzzer's corpus (fuzz/corpus/batch, decoded by
 * fuzz/batch_decode.h: odd masks, logit masks, sampler fields out of
 * range, pages shared or out of the pool), both on random:tiny with the
 * same pool of zeroed pages, fed the inputs in the same order:
 *   - each backend refuses exactly what the other refuses (same code);
 *   - where both run: LOGITS rows within bf16 rounding of the CPU's (rel
 *     L2), ENTROPY and LOGPROBS values close, TOPK's first value close;
 *     a greedy token of the GPU is one the CPU's own logits (the row run
 *     again as a LOGITS probe) put within 0.05 of their maximum; a random
 *     sample is allowed by its logit mask.
 * Usage: test_cuda_fuzz DIR [N SEED] (exits 77 without a GPU). With N:
 * then N inputs more, each a corpus input with 1-4 random bytes changed
 * (seeded: a failure names its seed and iteration).
 */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "fuzz/batch_decode.h"
#include "model/model.h"
#include "tests/test_util.h"

static pie_backend *cpu, *gpu;
static int n_inputs, n_ran, n_refused, n_greedy;

static void zero_pool(pie_backend *b)
{
    int32_t pages[NPAGES];
    for (int i = 0; i < NPAGES; i++) pages[i] = i;
    void *z = calloc(NPAGES, b->page_bytes);
    CHECK(z, "out of memory");
    CHECK_OK(b->ops->upload(b, pages, NPAGES, z));
    free(z);
}

static double rel_l2(const float *a, const float *b, uint32_t n)
{
    double num = 0, den = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (isinf(a[i]) || isinf(b[i])) {      /* masked: both -inf */
            if (a[i] != b[i]) return INFINITY;
            continue;
        }
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* The CPU's logits of every output row of b (the batch run again with
 * LOGITS probes and the same logit masks): rows x V floats, or NULL. */
static float *cpu_logits(const pie_forward_batch *b)
{
    int V = cpu->cfg->vocab_size;
    pie_sampler *s = calloc((size_t)b->n_outputs, sizeof *s);
    for (int o = 0; o < b->n_outputs; o++) s[o].kind = PIE_PROBE_LOGITS;
    pie_forward_batch l = *b;
    l.samplers = s;
    pie_forward_out out;
    float *lg = NULL;
    if (!pie_forward_out_alloc(&l, V, &out)) {
        if (!pie_backend_forward(cpu, &l, &out)) {
            lg = malloc(sizeof *lg * (size_t)b->n_outputs * V);
            memcpy(lg, out.values, sizeof *lg * (size_t)b->n_outputs * V);
        }
        pie_forward_out_free(&out);
    }
    free(s);
    return lg;
}

static float row_max(const float *x, int n)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++) if (x[i] > m) m = x[i];
    return m;
}

/* Row o of both backends' outputs agree (see the file header). */
static void compare_row(const pie_forward_batch *b, int o,
                        const pie_forward_out *c, const pie_forward_out *g,
                        const float *lg, const char *name)
{
    int V = cpu->cfg->vocab_size;
    const pie_sampler *s = &b->samplers[o];
    uint32_t a = c->value_indptr[o], n = c->value_indptr[o + 1] - a;
    const float *cv = c->values + a, *gv = g->values + a;
    if (s->kind == PIE_PROBE_LOGITS) {
        double r = rel_l2(gv, cv, n);
        CHECK(r < 3e-2, "%s: row %d LOGITS rel L2 %.3g", name, o, r);
    } else if (s->kind == PIE_PROBE_ENTROPY) {
        CHECK(fabsf(gv[0] - cv[0]) < 0.05f, "%s: row %d entropy %g vs %g",
              name, o, gv[0], cv[0]);
    } else if (s->kind == PIE_PROBE_LOGPROBS) {
        for (uint32_t k = 0; k < n; k++)
            CHECK(fabsf(gv[k] - cv[k]) < 0.1f || gv[k] == cv[k], "%s: row %d "
                  "logprob %u: %g vs %g", name, o, k, gv[k], cv[k]);
    } else if (s->kind == PIE_PROBE_TOPK && n > 0) {
        CHECK(fabsf(gv[0] - cv[0]) < 0.05f || gv[0] == cv[0], "%s: row %d "
              "top value %g vs %g", name, o, gv[0], cv[0]);
    } else if (s->kind == PIE_SAMPLER_GREEDY ||
               (s->kind == PIE_SAMPLER_RANDOM && !(s->temperature > 0))) {
        int32_t t = g->tokens[o];
        CHECK(t >= 0 && t < V, "%s: row %d token %d", name, o, t);
        if (lg && t != c->tokens[o]) {
            const float *row = lg + (size_t)o * V;
            CHECK(row[t] >= row_max(row, V) - 0.05f, "%s: row %d: GPU's "
                  "greedy %d has CPU logit %g, the CPU's max %g (its %d)",
                  name, o, t, row[t], row_max(row, V), c->tokens[o]);
        }
        n_greedy++;
    } else if (s->kind == PIE_SAMPLER_RANDOM) {
        int32_t t = g->tokens[o];
        CHECK(t >= 0 && t < V && (!lg || lg[(size_t)o * V + t] > -INFINITY),
              "%s: row %d: sampled %d, not allowed", name, o, t);
    }
}

static void run_input(const uint8_t *data, size_t size, const char *name)
{
    int V = cpu->cfg->vocab_size;
    fb *f = calloc(1, sizeof *f);
    pie_forward_batch b;
    batch_decode(data, size, f, &b);
    pie_forward_out c, g;
    n_inputs++;
    if (pie_forward_out_alloc(&b, V, &c)) { free(f); return; }
    CHECK_OK(pie_forward_out_alloc(&b, V, &g));
    int rc = pie_backend_forward(cpu, &b, &c);
    char cmsg[512];
    snprintf(cmsg, sizeof cmsg, "%s", pie_err_msg());
    int rg = pie_backend_forward(gpu, &b, &g);
    CHECK(rc == rg, "%s: CPU answered %d (%s), GPU %d (%s)", name, rc, cmsg,
          rg, pie_err_msg());
    if (rc == 0) {
        float *lg = cpu_logits(&b);
        for (int o = 0; o < b.n_outputs; o++) compare_row(&b, o, &c, &g, lg, name);
        free(lg);
        n_ran++;
    } else {
        n_refused++;
    }
    pie_forward_out_free(&c);
    pie_forward_out_free(&g);
    free(f);
}

typedef struct input {
    uint8_t b[512];
    size_t  n;
} input;

static void read_input(const char *dir, const char *file, input *in)
{
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *fp = fopen(path, "rb");
    CHECK(fp, "cannot open %s", path);
    in->n = fread(in->b, 1, sizeof in->b, fp);
    fclose(fp);
}

/* n inputs, each corpus input k (random) with 1-4 random bytes changed. */
static void run_mutants(const input *c, int nc, long n, uint64_t seed)
{
    uint64_t r = seed * 0x9E3779B97F4A7C15ull + 1;
    for (long i = 0; i < n; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        input in = c[(r >> 33) % (uint64_t)nc];
        if (in.n == 0) continue;
        int k = 1 + (int)((r >> 20) % 4);
        for (int j = 0; j < k; j++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            in.b[(r >> 33) % in.n] = (uint8_t)(r >> 25);
        }
        char name[64];
        snprintf(name, sizeof name, "mutant %ld of seed %llu", i,
                 (unsigned long long)seed);
        run_input(in.b, in.n, name);
    }
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!pie_backend_cuda_available()) TEST_SKIP("no CUDA GPU");
    CHECK(argc == 2 || argc == 4, "usage: test_cuda_fuzz CORPUS_DIR [N SEED]");
    pie_model *m;
    CHECK_OK(pie_model_load("random:tiny", NULL, NULL, &m));
    pie_backend_opts o = { .page_size = PS, .n_pages = NPAGES, .n_threads = 1 };
    CHECK_OK(pie_backend_cpu_create(m, &o, &cpu));
    CHECK_OK(pie_backend_cuda_create(m, &o, &gpu));
    zero_pool(cpu);
    zero_pool(gpu);
    DIR *d = opendir(argv[1]);
    CHECK(d, "cannot open %s", argv[1]);
    char *names[4096];
    int nn = 0;
    for (struct dirent *e; (e = readdir(d)) && nn < 4096;)
        if (e->d_name[0] != '.') names[nn++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)nn, sizeof *names, cmp_names);   /* a fixed order */
    input *in = calloc((size_t)nn + 1, sizeof *in);
    for (int i = 0; i < nn; i++) {
        read_input(argv[1], names[i], &in[i]);
        run_input(in[i].b, in[i].n, names[i]);
        free(names[i]);
    }
    if (argc == 4 && nn > 0)
        run_mutants(in, nn, atol(argv[2]), strtoull(argv[3], NULL, 10));
    free(in);
    CHECK(n_ran > 0 && n_refused > 0, "%d inputs ran and %d were refused: "
          "the corpus should hold both", n_ran, n_refused);
    printf("%d inputs: %d ran on both backends and agree (%d greedy rows), "
           "%d refused by both with the same code\n", n_inputs, n_ran,
           n_greedy, n_refused);
    pie_backend_free(gpu);
    pie_backend_free(cpu);
    pie_model_free(m);
    TEST_DONE();
}
