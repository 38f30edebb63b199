/*
 * test_batch.c — the shared sampler and probes (pie_sample_row), the
 * uniform generator, and output allocation, checked against direct
 * computations done here with full sorts in double precision.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "tests/test_util.h"

#define V 1000

static float base_logits[V];

static uint64_t rng_state = 12345;
static double rng(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

/* ids sorted by (logit desc, id asc). */
static const float *sort_key;
static int cmp_desc(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_key[x] != sort_key[y]) return sort_key[x] > sort_key[y] ? -1 : 1;
    return (x > y) - (x < y);
}

static void sorted_ids(const float *x, int32_t *ids)
{
    for (int i = 0; i < V; i++) ids[i] = i;
    sort_key = x;
    qsort(ids, V, sizeof *ids, cmp_desc);
}

static void probs(const float *x, float temp, double *p)
{
    double mx = -INFINITY, s = 0;
    for (int i = 0; i < V; i++) if (x[i] > mx) mx = x[i];
    for (int i = 0; i < V; i++) s += p[i] = exp((x[i] - mx) / temp);
    for (int i = 0; i < V; i++) p[i] /= s;
}

static int32_t sample(const pie_sampler *s, const uint32_t *runs, uint32_t n)
{
    float row[V];
    memcpy(row, base_logits, sizeof row);
    int32_t tok = -2;
    CHECK_OK(pie_sample_row(row, V, s, runs, n, &tok, NULL, NULL));
    CHECK(tok >= 0 && tok < V, "token %d out of range", tok);
    return tok;
}

static void test_uniform(void)
{
    double sum = 0;
    for (uint64_t s = 0; s < 10000; s++) {
        float u = pie_sample_uniform(s);
        CHECK(u >= 0.0f && u < 1.0f, "u = %g for seed %llu", u,
              (unsigned long long)s);
        sum += u;
    }
    CHECK(fabs(sum / 10000 - 0.5) < 0.02, "mean of uniforms %g", sum / 1e4);
    CHECK(pie_sample_uniform(7) == pie_sample_uniform(7), "not deterministic");
}

static void test_greedy(void)
{
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    int32_t ids[V];
    sorted_ids(base_logits, ids);
    CHECK(sample(&s, NULL, 0) == ids[0], "greedy %d, expected %d",
          sample(&s, NULL, 0), ids[0]);
    /* ties: lowest id */
    float row[8] = { 1, 3, 2, 3, 3, 0, 0, 0 };
    int32_t tok;
    CHECK_OK(pie_sample_row(row, 8, &s, NULL, 0, &tok, NULL, NULL));
    CHECK(tok == 1, "tie broke to %d, expected 1", tok);
    /* temperature 0 in a random sampler is greedy */
    pie_sampler r = { .kind = PIE_SAMPLER_RANDOM, .temperature = 0, .seed = 9 };
    CHECK(sample(&r, NULL, 0) == ids[0], "temperature 0 not greedy");
}

static void test_top_k(void)
{
    int32_t ids[V];
    sorted_ids(base_logits, ids);
    int seen[V] = { 0 }, distinct = 0;
    for (uint64_t seed = 0; seed < 300; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = 1.5f,
                          .top_k = 5, .top_p = 1.0f, .seed = seed };
        int32_t t = sample(&s, NULL, 0);
        int ok = 0;
        for (int j = 0; j < 5; j++) ok |= ids[j] == t;
        CHECK(ok, "top_k=5 emitted %d outside the top 5 (seed %llu)", t,
              (unsigned long long)seed);
        CHECK(sample(&s, NULL, 0) == t, "same seed gave another token");
        if (!seen[t]++) distinct++;
    }
    CHECK(distinct >= 3, "only %d distinct tokens from 300 seeds", distinct);
}

static void test_top_p_min_p(void)
{
    double p[V];
    int32_t ids[V];
    float temp = 0.7f;
    probs(base_logits, temp, p);
    sorted_ids(base_logits, ids);
    /* top_p = 0.5: the smallest prefix with mass >= 0.5 */
    int n_keep = 0;
    double mass = 0;
    while (mass < 0.5) mass += p[ids[n_keep++]];
    int distinct = 0, seen[V] = { 0 };
    for (uint64_t seed = 0; seed < 300; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = temp,
                          .top_p = 0.5f, .seed = seed };
        int32_t t = sample(&s, NULL, 0);
        int rank = 0;
        while (ids[rank] != t) rank++;
        CHECK(rank < n_keep, "top_p emitted rank %d, kept set has %d", rank,
              n_keep);
        if (!seen[t]++) distinct++;
    }
    CHECK(distinct >= 2, "top_p: only %d distinct tokens", distinct);
    /* min_p = 0.2: p >= 0.2 * p_max */
    double pmax = p[ids[0]];
    memset(seen, 0, sizeof seen);
    distinct = 0;
    for (uint64_t seed = 0; seed < 300; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = temp,
                          .top_p = 1.0f, .min_p = 0.2f, .seed = seed };
        int32_t t = sample(&s, NULL, 0);
        CHECK(p[t] >= 0.2 * pmax * (1 - 1e-5), "min_p emitted p=%g < %g", p[t],
              0.2 * pmax);
        if (!seen[t]++) distinct++;
    }
    CHECK(distinct >= 2, "min_p: only %d distinct tokens", distinct);
}

/* The sampler against the spec computed here in double with a full sort:
 * kept = top_k prefix, then the top_p prefix, then p >= min_p * p_max;
 * walk until the running mass exceeds u * kept mass. */
static void exact_walk(float temp, int32_t top_k, float top_p, float min_p)
{
    double p[V];
    int32_t ids[V];
    probs(base_logits, temp, p);
    sorted_ids(base_logits, ids);
    int n = (top_k > 0 && top_k < V) ? top_k : V;
    if (top_p < 1) {
        double m = 0;
        int k = 0;
        while (k < n && (k == 0 || m < top_p)) m += p[ids[k++]];
        n = k;
    }
    int k = 0;
    while (k < n && p[ids[k]] >= min_p * p[ids[0]]) k++;
    n = k;
    double mass = 0;
    for (int i = 0; i < n; i++) mass += p[ids[i]];
    int agree = 0;
    for (uint64_t seed = 100; seed < 300; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = temp,
                          .top_k = top_k, .top_p = top_p, .min_p = min_p,
                          .seed = seed };
        double u = pie_sample_uniform(seed) * mass, cum = 0;
        int32_t want = ids[n - 1];
        for (int i = 0; i < n; i++) {
            cum += p[ids[i]];
            if (cum > u) { want = ids[i]; break; }
        }
        agree += sample(&s, NULL, 0) == want;
    }
    /* float vs double rounding may move a boundary case; nearly all agree */
    CHECK(agree >= 196, "sampler (T %g, k %d, p %g, min_p %g) agreed with "
          "the spec on %d of 200 seeds", temp, top_k, top_p, min_p, agree);
}

static void test_exact_walk(void)
{
    exact_walk(1.0f, 0, 1.0f, 0.0f);
    exact_walk(0.5f, 40, 1.0f, 0.0f);
    exact_walk(1.0f, 0, 0.8f, 0.0f);
    exact_walk(2.0f, 0, 1.0f, 0.05f);
    exact_walk(1.0f, 100, 0.6f, 0.01f);
}

/* top_p counts mass under the full softmax, not renormalized after top_k:
 * with p = .2 .15 .1 ... the top 3 hold .45 < .5, so all 3 stay kept (a
 * renormalizing sampler would drop the third). */
static void test_top_k_then_top_p(void)
{
    const double p[10] = { .2, .15, .1, .09, .085, .08, .075, .075, .075, .07 };
    int hits[10] = { 0 };
    for (uint64_t seed = 0; seed < 400; seed++) {
        float row[10];
        for (int i = 0; i < 10; i++) row[i] = (float)log(p[i]);
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = 1.0f,
                          .top_k = 3, .top_p = 0.5f, .seed = seed };
        int32_t t;
        CHECK_OK(pie_sample_row(row, 10, &s, NULL, 0, &t, NULL, NULL));
        CHECK(t >= 0 && t < 3, "top_k=3 emitted id %d", t);
        hits[t]++;
    }
    CHECK(hits[2] > 40, "third token drawn %d/400 times, expected ~89",
          hits[2]);
    CHECK(hits[0] > hits[1] && hits[1] > hits[2], "frequencies %d %d %d not "
          "ordered like p", hits[0], hits[1], hits[2]);
}

static void test_logit_mask(void)
{
    /* allowed: [100,110) and [500,505) */
    uint32_t runs[] = { 100, 10, 390, 5 };
    for (uint64_t seed = 0; seed < 200; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = 5.0f,
                          .top_p = 1.0f, .seed = seed };
        int32_t t = sample(&s, runs, 4);
        CHECK((t >= 100 && t < 110) || (t >= 500 && t < 505),
              "masked sampler emitted %d", t);
    }
    pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
    int32_t t = sample(&g, runs, 4);
    int32_t best = 100;
    for (int i = 100; i < 110; i++) if (base_logits[i] > base_logits[best]) best = i;
    for (int i = 500; i < 505; i++) if (base_logits[i] > base_logits[best]) best = i;
    CHECK(t == best, "masked greedy %d, expected %d", t, best);
    /* LOGITS probe sees -inf outside the mask */
    float row[V], vals[V];
    memcpy(row, base_logits, sizeof row);
    pie_sampler pl = { .kind = PIE_PROBE_LOGITS };
    CHECK_OK(pie_sample_row(row, V, &pl, runs, 4, &t, vals, NULL));
    CHECK(t == -1, "probe returned token %d", t);
    CHECK(vals[99] == -INFINITY && vals[100] == base_logits[100] &&
          vals[505] == -INFINITY && vals[504] == base_logits[504],
          "LOGITS probe mask wrong");
}

static void test_probes(void)
{
    float row[V], vals[V];
    int32_t pids[V], ids[V], tok;
    double p[V];
    sorted_ids(base_logits, ids);
    probs(base_logits, 2.0f, p);
    memcpy(row, base_logits, sizeof row);
    pie_sampler tk = { .kind = PIE_PROBE_TOPK, .top_k = 10, .temperature = 2.0f };
    CHECK_OK(pie_sample_row(row, V, &tk, NULL, 0, &tok, vals, pids));
    for (int j = 0; j < 10; j++) {
        CHECK(pids[j] == ids[j], "TOPK id %d at %d, expected %d", pids[j], j,
              ids[j]);
        CHECK(fabs(vals[j] - p[ids[j]]) < 1e-6, "TOPK p %g, expected %g",
              vals[j], p[ids[j]]);
    }
    probs(base_logits, 1.0f, p);
    int32_t q[3] = { 0, ids[0], 777 };
    memcpy(row, base_logits, sizeof row);
    pie_sampler lp = { .kind = PIE_PROBE_LOGPROBS, .ids = q, .n_ids = 3 };
    CHECK_OK(pie_sample_row(row, V, &lp, NULL, 0, &tok, vals, NULL));
    for (int j = 0; j < 3; j++)
        CHECK(fabs(vals[j] - log(p[q[j]])) < 1e-4, "logprob %g, expected %g",
              vals[j], log(p[q[j]]));
    double h = 0;
    for (int i = 0; i < V; i++) if (p[i] > 0) h -= p[i] * log(p[i]);
    memcpy(row, base_logits, sizeof row);
    pie_sampler en = { .kind = PIE_PROBE_ENTROPY };
    CHECK_OK(pie_sample_row(row, V, &en, NULL, 0, &tok, vals, NULL));
    CHECK(fabs(vals[0] - h) < 1e-4, "entropy %g, expected %g", vals[0], h);
}

/* min_p keeps the most probable id whatever it filters: with min_p > 1
 * (refused by validation, but the reference sampler must not fall back to
 * id 0) only the best id is left; with min_p = 1 exactly the tied best. */
static void test_min_p_keeps_best(void)
{
    float row[8];
    const float l[8] = { 0.5f, 1, 4, 2, 4, 3, -1, 0 };   /* best: 2 and 4 */
    for (uint64_t seed = 0; seed < 50; seed++) {
        pie_sampler s = { .kind = PIE_SAMPLER_RANDOM, .temperature = 1.0f,
                          .top_p = 1.0f, .min_p = 1.5f, .seed = seed };
        int32_t tok = -2;
        memcpy(row, l, sizeof row);
        CHECK_OK(pie_sample_row(row, 8, &s, NULL, 0, &tok, NULL, NULL));
        CHECK(tok == 2, "min_p 1.5: expected the best id 2, got %d (seed "
              "%llu)", tok, (unsigned long long)seed);
        s.min_p = 1.0f;
        memcpy(row, l, sizeof row);
        CHECK_OK(pie_sample_row(row, 8, &s, NULL, 0, &tok, NULL, NULL));
        CHECK(tok == 2 || tok == 4, "min_p 1: expected a tied best id (2 or "
              "4), got %d (seed %llu)", tok, (unsigned long long)seed);
        /* with top_k and top_p in front too */
        s = (pie_sampler){ .kind = PIE_SAMPLER_RANDOM, .temperature = 0.7f,
                           .top_k = 3, .top_p = 0.9f, .min_p = 1e30f,
                           .seed = seed };
        memcpy(row, l, sizeof row);
        CHECK_OK(pie_sample_row(row, 8, &s, NULL, 0, &tok, NULL, NULL));
        CHECK(tok == 2, "min_p 1e30 after top_k/top_p: expected 2, got %d",
              tok);
    }
    printf("min_p: the most probable id is always kept\n");
}

/* pie_batch_validate_row: the random sampler's parameters in range. */
static void test_validate_row(void)
{
    struct { const char *what; pie_sampler s; int ok; } c[] = {
        { "defaults", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                        .top_p = 1 }, 1 },
        { "min_p 0", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                       .top_p = 0.5f, .min_p = 0 }, 1 },
        { "min_p 1", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                       .top_p = 1, .min_p = 1 }, 1 },
        { "top_p 0", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1 }, 1 },
        { "top_p 2 (all)", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                             .top_p = 2 }, 1 },
        { "top_k -1 (all)", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                              .top_k = -1, .top_p = 1 }, 1 },
        { "temperature -1 (greedy)", { .kind = PIE_SAMPLER_RANDOM,
                                       .temperature = -1, .top_p = 1 }, 1 },
        { "min_p 1.5", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                         .top_p = 1, .min_p = 1.5f }, 0 },
        { "min_p inf", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                         .top_p = 1, .min_p = INFINITY }, 0 },
        { "min_p -0.1", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                          .top_p = 1, .min_p = -0.1f }, 0 },
        { "min_p NaN", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                         .top_p = 1, .min_p = NAN }, 0 },
        { "top_p -0.5", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                          .top_p = -0.5f }, 0 },
        { "top_p -inf", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                          .top_p = -INFINITY }, 0 },
        { "top_p NaN", { .kind = PIE_SAMPLER_RANDOM, .temperature = 1,
                         .top_p = NAN }, 0 },
        { "temperature NaN", { .kind = PIE_SAMPLER_RANDOM, .temperature = NAN,
                               .top_p = 1 }, 0 },
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        int rc = pie_batch_validate_row(&c[i].s, NULL, -1, 3, V);
        if (c[i].ok) {
            CHECK(rc == 0, "%s: refused (%d: %s)", c[i].what, rc,
                  pie_err_msg());
        } else {
            CHECK(rc == PIE_EINVAL, "%s: expected PIE_EINVAL, got %d",
                  c[i].what, rc);
            CHECK(strstr(pie_err_msg(), "output 3") != NULL,
                  "%s: message does not name the row: %s", c[i].what,
                  pie_err_msg());
            printf("  refused %-24s %s\n", c[i].what, pie_err_msg());
        }
    }
}

static void test_out_alloc(void)
{
    int32_t ids[2] = { 1, 2 };
    pie_sampler s[4] = { { .kind = PIE_SAMPLER_GREEDY },
                         { .kind = PIE_PROBE_TOPK, .top_k = 7 },
                         { .kind = PIE_PROBE_LOGPROBS, .ids = ids, .n_ids = 2 },
                         { .kind = PIE_PROBE_LOGITS } };
    pie_forward_batch b = { .n_outputs = 4, .samplers = s };
    pie_forward_out out;
    CHECK_OK(pie_forward_out_alloc(&b, 50, &out));
    uint32_t want[5] = { 0, 0, 7, 9, 59 };
    for (int i = 0; i < 5; i++)
        CHECK(out.value_indptr[i] == want[i], "value_indptr[%d] = %u, want %u",
              i, out.value_indptr[i], want[i]);
    pie_forward_out_free(&out);
}

int main(void)
{
    for (int i = 0; i < V; i++) base_logits[i] = (float)(rng() * 8.0 - 4.0);
    base_logits[17] = base_logits[18] = 6.0f;   /* a tie at the top */
    test_uniform();
    test_greedy();
    test_top_k();
    test_top_p_min_p();
    test_exact_walk();
    test_top_k_then_top_p();
    test_logit_mask();
    test_probes();
    test_min_p_keeps_best();
    test_validate_row();
    test_out_alloc();
    TEST_DONE();
}
