/*
 * test_cuda_faults.c — the CUDA backend after something went wrong on the
 * device (tiny-llama3 from ../shared/models; exits 77 without a GPU):
 *
 *   meta     a forward whose metadata buffers cannot grow (a real failed
 *            allocation, forced by PIE_CUDA_TEST_META_FAIL) fails alone
 *            with PIE_ENOMEM; the next, smaller forward gives the logits it
 *            gave before the failure, and the large one runs once the hook
 *            is off (its explicit causal mask against the plain prompt)
 *   cluster  a decode step whose cluster launch is refused (the shared-GPU
 *            case, forced by PIE_CUDA_TEST_REFUSE_CLUSTER with the cluster
 *            plan forced on) runs again without clusters: every step
 *            succeeds, graphs are still captured, and the logits equal a
 *            second run on the plan without clusters
 *   outputs  value offsets that do not fit the samplers are refused
 *   pool     the KV pool sized from memory follows mem_fraction (twice
 *            the fraction, twice the pages, and within it), and a device
 *            ordinal out of range is refused with PIE_EINVAL
 *   lost     (argument "lost", alone in its process) a kernel's illegal
 *            address loses the context: every later call answers
 *            PIE_EDEVLOST at once, and destroy still returns
 *
 * With no argument it runs meta, cluster, outputs and pool; with one of
 * those names, that check alone.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_kernels.h"
#include "common/pie_err.h"
#include "model/model.h"
#include "tests/test_util.h"

#define PS    16    /* page size                                   */
#define SEQP  64    /* pages per sequence (1024 tokens)            */
#define NSEQ  4     /* sequences; pool of NSEQ x SEQP pages        */

/* A sequence on pages id*SEQP .. : its length so far. */
typedef struct tseq {
    int id, len;
} tseq;

/* One forward of nr requests, each appending n[i] tokens tok[i] to seq
 * s[i] (with an explicit causal mask where masked), one LOGITS probe at
 * each request's last token, copied to logits (nr x V). Returns rc; the
 * lengths move only on success. */
static int step(pie_backend *b, tseq *s, int nr, int32_t *const *tok,
                const int *n, int masked, float *logits)
{
    int V = b->cfg->vocab_size, nt = 0, np = 0, rc;
    for (int i = 0; i < nr; i++) nt += n[i];
    int32_t *tk = malloc(4 * (size_t)nt), *pos = malloc(4 * (size_t)nt);
    int32_t *pg = malloc(4 * (size_t)nr * SEQP), qo[NSEQ + 1], kvi[NSEQ + 1];
    int32_t last[NSEQ], oi[NSEQ];
    uint32_t *mi = malloc(4 * ((size_t)nt + 1)), *mr = malloc(8 * (size_t)nt);
    pie_sampler smp[NSEQ];
    qo[0] = kvi[0] = 0;
    mi[0] = 0;
    int t = 0;
    for (int i = 0; i < nr; i++) {
        int len = s[i].len + n[i], pages = (len + PS - 1) / PS;
        CHECK(pages <= SEQP, "sequence of %d tokens is too long", len);
        for (int k = 0; k < n[i]; k++, t++) {
            tk[t] = tok[i][k];
            pos[t] = s[i].len + k;
            mr[2 * t] = 0;              /* nothing refused, then pos + 1 */
            mr[2 * t + 1] = (uint32_t)pos[t] + 1;
            mi[t + 1] = 2 * (uint32_t)(t + 1);
        }
        qo[i + 1] = t;
        oi[i] = t - 1;
        for (int k = 0; k < pages; k++) pg[np++] = s[i].id * SEQP + k;
        kvi[i + 1] = np;
        last[i] = len - (pages - 1) * PS;
        smp[i] = (pie_sampler){ .kind = PIE_PROBE_LOGITS };
    }
    pie_forward_batch fb = {
        .n_tokens = nt, .n_reqs = nr, .token_ids = tk, .positions = pos,
        .qo_indptr = qo, .kv_page_indices = pg, .kv_page_indptr = kvi,
        .kv_last_page_len = last, .mask_indptr = masked ? mi : NULL,
        .mask_runs = masked ? mr : NULL, .n_outputs = nr,
        .output_token_idx = oi, .samplers = smp };
    pie_forward_out out;
    rc = pie_forward_out_alloc(&fb, V, &out);
    if (!rc) rc = pie_backend_forward(b, &fb, &out);
    if (!rc) {
        for (int i = 0; i < nr; i++) s[i].len += n[i];
        if (logits) memcpy(logits, out.values, sizeof(float) * (size_t)nr * V);
    }
    pie_forward_out_free(&out);
    free(tk); free(pos); free(pg); free(mi); free(mr);
    return rc;
}

/* A prompt of n tokens (seeded) into a fresh sequence id: its last logits. */
static int prompt(pie_backend *b, int id, int n, int seed, int masked,
                  float *logits)
{
    int32_t *tok = malloc(4 * (size_t)n);
    for (int k = 0; k < n; k++)
        tok[k] = (int32_t)((seed * 7919u + k * 104729u) % (uint32_t)b->cfg->vocab_size);
    tseq s = { id, 0 };
    int rc = step(b, &s, 1, &tok, &n, masked, logits);
    free(tok);
    return rc;
}

static double maxdiff(const float *a, const float *b, size_t n)
{
    double d = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs((double)a[i] - b[i]) > d) d = fabs((double)a[i] - b[i]);
    return d;
}

static double rel_l2(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static pie_backend *make(const pie_model *m)
{
    pie_backend *b;
    pie_backend_opts o = { .page_size = PS, .n_pages = NSEQ * SEQP };
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    return b;
}

/* ------------------------------------------------------------------ meta */

static void check_meta(const pie_model *m)
{
    pie_backend *b = make(m);
    size_t V = (size_t)b->cfg->vocab_size;
    float *a = malloc(4 * V), *a2 = malloc(4 * V), *big = malloc(4 * V),
          *plain = malloc(4 * V);
    CHECK_OK(prompt(b, 0, 5, 1, 0, a));
    /* 1000 tokens with a mask: 125 KB of mask bits, past the buffers the
     * first forward made */
    setenv("PIE_CUDA_TEST_META_FAIL", "1", 1);
    int rc = prompt(b, 1, 1000, 2, 1, big);
    unsetenv("PIE_CUDA_TEST_META_FAIL");
    CHECK(rc == PIE_ENOMEM, "forward past the metadata buffers, growth "
          "failing: rc %d (%s)", rc, pie_err_msg());
    printf("meta: growth failure: %s\n", pie_err_msg());
    CHECK_OK(prompt(b, 2, 5, 1, 0, a2));
    CHECK(maxdiff(a, a2, V) == 0, "after the failure a small forward's "
          "logits differ by %.3g", maxdiff(a, a2, V));
    CHECK_OK(prompt(b, 1, 1000, 2, 1, big));
    CHECK_OK(prompt(b, 3, 1000, 2, 0, plain));
    double rel = rel_l2(big, plain, V);
    CHECK(rel < 2e-2, "explicit causal mask vs plain prompt: rel L2 %.3g", rel);
    printf("meta: the next forward runs as before; the large one runs once "
           "memory is there (masked vs plain rel L2 %.2e)\n", rel);
    free(a); free(a2); free(big); free(plain);
    pie_backend_free(b);
}

/* --------------------------------------------------------------- cluster */

/* Three sequences prefilled, then steps decode steps; logits of every
 * step (steps x 3 x V). */
static int decode(pie_backend *b, int steps, float *lg)
{
    size_t V = (size_t)b->cfg->vocab_size;
    tseq s[3];
    int32_t cur[3], *tp[3];
    int one[3] = { 1, 1, 1 }, rc;
    for (int i = 0; i < 3; i++) {
        s[i] = (tseq){ i, 0 };
        int32_t p[40];
        for (int k = 0; k < 40; k++) p[k] = (int32_t)((11 * i + 5 * k + 3) % V);
        int32_t *pp = p;
        int n = 40;
        if ((rc = step(b, &s[i], 1, &pp, &n, 0, lg))) return rc;
        cur[i] = 0;
        for (size_t v = 1; v < V; v++) if (lg[v] > lg[cur[i]]) cur[i] = (int32_t)v;
        tp[i] = &cur[i];
    }
    for (int t = 0; t < steps; t++) {
        float *l = lg + (size_t)t * 3 * V;
        if ((rc = step(b, s, 3, tp, one, 0, l))) return rc;
        for (int i = 0; i < 3; i++) {
            const float *r = l + i * V;
            cur[i] = 0;
            for (size_t v = 1; v < V; v++) if (r[v] > r[cur[i]]) cur[i] = (int32_t)v;
        }
    }
    return 0;
}

static void check_cluster(const pie_model *m)
{
    int steps = 12;
    setenv("PIE_CUDA_DEC_CLUSTER", "2", 1);
    pie_backend *b = make(m);
    size_t n = (size_t)steps * 3 * b->cfg->vocab_size;
    float *r = malloc(4 * n), *e = malloc(4 * n);
    int64_t cap0, rep0, cap, rep;
    pie_backend_cuda_graphs(b, &cap0, &rep0);
    setenv("PIE_CUDA_TEST_REFUSE_CLUSTER", "1", 1);
    int rc = decode(b, steps, r);
    unsetenv("PIE_CUDA_TEST_REFUSE_CLUSTER");
    CHECK(rc == 0, "decode with cluster launches refused: rc %d (%s)", rc,
          pie_err_msg());
    CHECK(pie_backend_cuda_replans(b) == 1, "%lld steps re-planned after "
          "the refusal, expected 1 (no cluster plan on this GPU?)",
          (long long)pie_backend_cuda_replans(b));
    CHECK_OK(decode(b, steps, e));
    pie_backend_cuda_graphs(b, &cap, &rep);
    unsetenv("PIE_CUDA_DEC_CLUSTER");
    CHECK(cap > cap0 && rep > rep0, "graphs after a refused cluster launch: "
          "%lld captured, %lld replayed", (long long)(cap - cap0),
          (long long)(rep - rep0));
    CHECK(maxdiff(r, e, n) == 0, "the re-planned steps' logits differ by %.3g "
          "from a run without clusters", maxdiff(r, e, n));
    printf("cluster: a refused cluster launch re-plans the step; %d steps "
           "ran, %lld graphs captured, logits equal to the plan without "
           "clusters\n", steps, (long long)(cap - cap0));
    free(r); free(e);
    pie_backend_free(b);
}

/* --------------------------------------------------------------- outputs */

static void check_outputs(const pie_model *m)
{
    pie_backend *b = make(m);
    int V = b->cfg->vocab_size;
    int32_t tok[3] = { 5, 6, 7 }, pos[3] = { 0, 1, 2 }, qo[2] = { 0, 3 };
    int32_t pg[1] = { 0 }, kvi[2] = { 0, 1 }, last = 3, oi[2] = { 2, 2 };
    pie_sampler smp[2] = { { .kind = PIE_PROBE_LOGITS },
                           { .kind = PIE_PROBE_ENTROPY } };
    pie_forward_batch fb = {
        .n_tokens = 3, .n_reqs = 1, .token_ids = tok, .positions = pos,
        .qo_indptr = qo, .kv_page_indices = pg, .kv_page_indptr = kvi,
        .kv_last_page_len = &last, .n_outputs = 2, .output_token_idx = oi,
        .samplers = smp };
    pie_forward_out out;
    CHECK_OK(pie_forward_out_alloc(&fb, V, &out));
    out.value_indptr[1] = 1;    /* row 0's V logits into one slot */
    int rc = pie_backend_forward(b, &fb, &out);
    CHECK(rc == PIE_EINVAL, "value offsets short of the samplers': rc %d", rc);
    printf("outputs: %s\n", pie_err_msg());
    out.value_indptr[1] = (uint32_t)V;
    CHECK_OK(pie_backend_forward(b, &fb, &out));
    CHECK(out.values[V] > 0 && out.values[V] < logf((float)V) + 1e-3f,
          "entropy %g after the refused forward", out.values[V]);
    pie_forward_out_free(&out);
    pie_backend_free(b);
}

/* ------------------------------------------------------------------ lost */

static void check_lost(const pie_model *m)
{
    pie_backend *b = make(m);
    size_t V = (size_t)b->cfg->vocab_size;
    float *a = malloc(4 * V);
    CHECK_OK(prompt(b, 0, 5, 1, 0, a));
    /* a kernel reading token ids from an address no allocation holds */
    pie__cuda_embed((float *)(uintptr_t)256, (const uint16_t *)(uintptr_t)256,
                    (const int32_t *)(uintptr_t)256, 64, 64, 0);
    cudaError_t e = cudaDeviceSynchronize();
    CHECK(e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure,
          "the bad kernel did not fault: %s", cudaGetErrorString(e));
    int rc = prompt(b, 1, 5, 1, 0, a);
    CHECK(rc == PIE_EDEVLOST && strstr(pie_err_msg(), "device lost"),
          "forward after the fault: rc %d (%s)", rc, pie_err_msg());
    printf("lost: %s\n", pie_err_msg());
    rc = prompt(b, 2, 5, 1, 0, a);
    CHECK(rc == PIE_EDEVLOST, "second forward after the fault: rc %d", rc);
    rc = b->ops->copy_slots(b, 0, 0, 1, 0, 4);
    CHECK(rc == PIE_EDEVLOST, "copy_slots after the fault: rc %d", rc);
    void *host = malloc(b->page_bytes);
    int32_t p0 = 0;
    rc = b->ops->download(b, &p0, 1, host);
    CHECK(rc == PIE_EDEVLOST, "download after the fault: rc %d", rc);
    free(host);
    free(a);
    pie_backend_free(b);
    printf("lost: every later call answers PIE_EDEVLOST; destroy returns\n");
}

/* ------------------------------------------------------------------ pool */

/* The pages a backend sized by fraction f takes, and the free device
 * memory before it was created (its weights, workspace and reserve come
 * out of that too, so the bound below has their share as slack). */
static int32_t pool_pages(const pie_model *m, double f, size_t *free_before,
                          uint64_t *page_bytes)
{
    pie_backend *b;
    pie_backend_opts o = { .page_size = PS, .mem_fraction = f };
    size_t fr = 0, tot = 0;
    CHECK(cudaMemGetInfo(&fr, &tot) == cudaSuccess, "cudaMemGetInfo");
    *free_before = fr;
    CHECK_OK(pie_backend_cuda_create(m, &o, &b));
    int32_t n = b->n_pages;
    *page_bytes = b->page_bytes;
    pie_backend_free(b);
    return n;
}

static void check_pool(const pie_model *m)
{
    size_t fr1, fr2;
    uint64_t pb;
    int32_t n1 = pool_pages(m, 0.2, &fr1, &pb);
    int32_t n2 = pool_pages(m, 0.4, &fr2, &pb);
    double r = (double)n2 / n1;
    CHECK(r > 1.9 && r < 2.1, "pool: %d pages at 0.2, %d at 0.4 (ratio %.3f)",
          n1, n2, r);
    /* the pool stays within its share of the memory free before create */
    CHECK((double)n2 * (double)pb <= 0.4 * (double)fr2, "pool: %d pages of "
          "%llu bytes past 0.4 of %zu free bytes", n2,
          (unsigned long long)pb, fr2);
    int ndev = 0;
    CHECK(cudaGetDeviceCount(&ndev) == cudaSuccess, "cudaGetDeviceCount");
    const int bad[] = { -1, ndev };
    for (int i = 0; i < 2; i++) {
        pie_backend *b = NULL;
        pie_backend_opts o = { .page_size = PS, .n_pages = 8,
                               .device = bad[i] };
        int rc = pie_backend_cuda_create(m, &o, &b);
        CHECK(rc == PIE_EINVAL && !b && strstr(pie_err_msg(), "device"),
              "device %d: rc %d (%s)", bad[i], rc, rc ? pie_err_msg() : "");
    }
    printf("pool: %d pages at 0.2 of free memory, %d at 0.4; devices -1 "
           "and %d refused\n", n1, n2, ndev);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!pie_backend_cuda_available()) TEST_SKIP("no CUDA GPU");
    const char *dir = test_shared_path("models/tiny-llama3");
    pie_model *m;
    CHECK_OK(pie_model_load(dir, NULL, NULL, &m));
    const char *only = argc > 1 ? argv[1] : NULL;
    if (only && !strcmp(only, "lost")) {
        check_lost(m);
    } else {
        if (!only || !strcmp(only, "meta")) check_meta(m);
        if (!only || !strcmp(only, "cluster")) check_cluster(m);
        if (!only || !strcmp(only, "outputs")) check_outputs(m);
        if (!only || !strcmp(only, "pool")) check_pool(m);
    }
    pie_model_free(m);
    TEST_DONE();
}
