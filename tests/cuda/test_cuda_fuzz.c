/*
 * test_cuda_fuzz.c — the CUDA backend against the CPU backend on the
 * batch fuzzer's corpus (fuzz/corpus/batch, decoded by
 * fuzz/batch_decode.h: odd masks, logit masks, sampler fields out of
 * range, pages shared or out of the pool), both on random:tiny with the
 * same pool of zeroed pages, fed the inputs in the same order:
 *   - each backend refuses exactly what the other refuses (same code);
 *   - where both run: LOGITS rows within bf16 rounding of the CPU's (rel
 *     L2 < 3e-2, at least at the logits' scale), ENTROPY within 0.02,
 *     LOGPROBS within 0.03, TOPK's first value within 0.02; a greedy token
 *     of the GPU is one the CPU's own logits (the row run again as a
 *     LOGITS probe) put within 0.02 of their maximum (logits of rms 0.15);
 *     a random sample is allowed by its logit mask.
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

/* Relative L2 distance of a from b over the finite entries (masked ones
 * must be -inf in both), b's norm floored at LOGIT_RMS a finite entry: a
 * row that a logit mask leaves a few small logits compares at the scale
 * of the model's logits (random:tiny: rms 0.15), not at theirs (one
 * logit of 0.005 off by bf16's 0.0008 is no disagreement). */
#define LOGIT_RMS 0.1
static double rel_l2(const float *a, const float *b, uint32_t n)
{
    double num = 0, den = 0;
    uint32_t fin = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (isinf(a[i]) || isinf(b[i])) {      /* masked: both -inf */
            if (a[i] != b[i]) return INFINITY;
            continue;
        }
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
        fin++;
    }
    double floor = fin * LOGIT_RMS * LOGIT_RMS;
    return sqrt(num / (den > floor ? den : floor > 0 ? floor : 1));
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

/* The input that last wrote each KV slot (its bytes), so that a failure
 * can name the batch whose KV the two backends may hold differently. */
typedef struct writer {
    uint8_t b[512];
    size_t  n;
    int     set;
} writer;
static writer last_writer[NPAGES][PS];

static void note_writes(const pie_forward_batch *b, const uint8_t *d,
                        size_t n)
{
    for (int r = 0; r < b->n_reqs; r++) {
        int np = b->kv_page_indptr[r + 1] - b->kv_page_indptr[r];
        int kv = (np - 1) * PS + b->kv_last_page_len[r];
        int nt = b->qo_indptr[r + 1] - b->qo_indptr[r];
        for (int s = kv - nt; s < kv; s++) {
            writer *w = &last_writer[b->kv_page_indices[b->kv_page_indptr[r] +
                                                        s / PS]][s % PS];
            memcpy(w->b, d, n < sizeof w->b ? n : sizeof w->b);
            w->n = n < sizeof w->b ? n : sizeof w->b;
            w->set = 1;
        }
    }
}

static void describe(const pie_forward_batch *b);

/* The batches that last wrote the slots request 0 of b reads. */
static void describe_writers(const pie_forward_batch *b)
{
    int np = b->kv_page_indptr[1], kv = (np - 1) * PS + b->kv_last_page_len[0];
    int first = kv - (b->qo_indptr[1] - b->qo_indptr[0]);
    for (int s = 0; s < first; s++) {
        writer *w = &last_writer[b->kv_page_indices[s / PS]][s % PS];
        if (!w->set) continue;
        fb *f = calloc(1, sizeof *f);
        pie_forward_batch wb;
        batch_decode(w->b, w->n, f, &wb);
        fprintf(stderr, "slot %d was last written by:\n", s);
        describe(&wb);
        free(f);
    }
}

/* The batch, for a failure's message. */
static void describe(const pie_forward_batch *b)
{
    fprintf(stderr, "batch: %d tokens, %d requests, %d outputs%s%s\n",
            b->n_tokens, b->n_reqs, b->n_outputs,
            b->mask_indptr ? ", masks" : "",
            b->logit_mask_indptr ? ", logit masks" : "");
    for (int r = 0; r < b->n_reqs; r++) {
        fprintf(stderr, "  request %d: tokens", r);
        for (int t = b->qo_indptr[r]; t < b->qo_indptr[r + 1]; t++)
            fprintf(stderr, " %d@%d", b->token_ids[t], b->positions[t]);
        fprintf(stderr, "; pages");
        for (int k = b->kv_page_indptr[r]; k < b->kv_page_indptr[r + 1]; k++)
            fprintf(stderr, " %d", b->kv_page_indices[k]);
        fprintf(stderr, " last %d\n", b->kv_last_page_len[r]);
    }
    for (int t = 0; b->mask_indptr && t < b->n_tokens; t++) {
        fprintf(stderr, "  mask of token %d:", t);
        for (uint32_t k = b->mask_indptr[t]; k < b->mask_indptr[t + 1]; k++)
            fprintf(stderr, " %u", b->mask_runs[k]);
        fprintf(stderr, "\n");
    }
    for (int o = 0; o < b->n_outputs; o++)
        fprintf(stderr, "  output %d: token %d kind %d\n", o,
                b->output_token_idx[o], b->samplers[o].kind);
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
        if (!(r < 3e-2)) {
            describe(b);
            describe_writers(b);
            for (uint32_t k = 0, shown = 0; k < n && shown < 12; k++)
                if (!isinf(cv[k]) || !isinf(gv[k]))
                    fprintf(stderr, "  logit %u: CPU %g GPU %g\n", k, cv[k],
                            gv[k]), shown++;
        }
        CHECK(r < 3e-2, "%s: row %d LOGITS rel L2 %.3g", name, o, r);
    } else if (s->kind == PIE_PROBE_ENTROPY) {
        CHECK(fabsf(gv[0] - cv[0]) < 0.02f, "%s: row %d entropy %g vs %g",
              name, o, gv[0], cv[0]);
    } else if (s->kind == PIE_PROBE_LOGPROBS) {
        for (uint32_t k = 0; k < n; k++)
            CHECK(fabsf(gv[k] - cv[k]) < 0.03f || gv[k] == cv[k], "%s: row %d "
                  "logprob %u: %g vs %g", name, o, k, gv[k], cv[k]);
    } else if (s->kind == PIE_PROBE_TOPK && n > 0) {
        CHECK(fabsf(gv[0] - cv[0]) < 0.02f || gv[0] == cv[0], "%s: row %d "
              "top value %g vs %g", name, o, gv[0], cv[0]);
    } else if (s->kind == PIE_SAMPLER_GREEDY ||
               (s->kind == PIE_SAMPLER_RANDOM && !(s->temperature > 0))) {
        int32_t t = g->tokens[o];
        CHECK(t >= 0 && t < V, "%s: row %d token %d", name, o, t);
        if (lg && t != c->tokens[o]) {
            const float *row = lg + (size_t)o * V;
            CHECK(row[t] >= row_max(row, V) - 0.02f, "%s: row %d: GPU's "
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
        note_writes(&b, data, size);
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
