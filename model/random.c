/*
 * random.c — "random:SHAPE" models: published shapes, seeded random weights.
 *
 * Performance work needs the exact shapes of real models but not their
 * values. A random model is one anonymous mapping holding every tensor
 * back to back (64-byte aligned), in the shape's dtype. Linear and
 * embedding weights are N(0, 0.02), norm weights are 1.
 *
 * Filling 16 GB must be quick, so the work is cut into jobs of CHUNK
 * elements; job j of tensor t draws from its own xoshiro256** stream seeded
 * by (SEED, t, j), which makes the bytes independent of how many threads ran
 * (the calling thread plus up to nproc - 1 helpers claim jobs from an atomic
 * counter; PIE_RANDOM_THREADS overrides nproc). A normal deviate is the
 * Irwin-Hall sum of four 16-bit uniforms taken from one 64-bit draw — a
 * close, cheap approximation of a Gaussian (bounded at ±3.46 σ), which is
 * all the speed tests need.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "model/model_internal.h"

#define SEED    0x5049452d524e44ull   /* "PIE-RND" */
#define CHUNK   (1 << 20)             /* elements per job */
#define STDDEV  0.02

typedef struct shape_def {
    const char *name;
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab;
    int32_t max_pos;
    float   theta, eps;
    float   rope_factor;      /* llama3 scaling; 0 = none */
    bool    tied;
    pie_dtype dtype;
    int32_t bos, eos[3], n_eos;
} shape_def;

static const shape_def SHAPES[] = {
    { "stories15M", 288, 768, 6, 6, 6, 48, 32000, 256, 10000.f, 1e-5f, 0,
      false, PIE_DT_F32, 1, { 2 }, 1 },
    { "llama-3.2-1b", 2048, 8192, 16, 32, 8, 64, 128256, 131072, 500000.f,
      1e-5f, 32, true, PIE_DT_BF16, 128000, { 128001, 128008, 128009 }, 3 },
    { "llama-3.1-8b", 4096, 14336, 32, 32, 8, 128, 128256, 131072, 500000.f,
      1e-5f, 8, false, PIE_DT_BF16, 128000, { 128001, 128008, 128009 }, 3 },
    /* small shape for tests */
    { "tiny", 64, 128, 2, 4, 2, 16, 256, 512, 10000.f, 1e-5f, 0, false,
      PIE_DT_F32, 1, { 2 }, 1 },
};
#define N_SHAPES (sizeof SHAPES / sizeof SHAPES[0])

typedef struct fill_tensor {
    pie_tensor *t;
    bool        ones;          /* norm weight: all 1                     */
    int64_t     numel;
    int64_t     first_job;     /* index of its first job                 */
} fill_tensor;

typedef struct random_state {
    uint8_t     *buf;          /* anonymous mapping holding all tensors  */
    size_t       size;
    fill_tensor *ft;           /* every tensor to fill                   */
    int32_t      n_ft;
    int64_t      n_jobs;
    atomic_llong next_job;     /* next job to claim                      */
    atomic_llong done_elems;   /* progress                               */
    int64_t      total_elems;
} random_state;

static void config_set(const shape_def *s, pie_model_config *c)
{
    memset(c, 0, sizeof *c);
    snprintf(c->arch, sizeof c->arch, "llama");
    c->vocab_size = s->vocab;
    c->dim = s->dim;
    c->hidden_dim = s->hidden_dim;
    c->n_layers = s->n_layers;
    c->n_heads = s->n_heads;
    c->n_kv_heads = s->n_kv_heads;
    c->head_dim = s->head_dim;
    c->max_pos = s->max_pos;
    c->rope_theta = s->theta;
    c->norm_eps = s->eps;
    c->rope_llama3 = s->rope_factor > 0;
    if (c->rope_llama3) {
        c->rope_factor = s->rope_factor;
        c->rope_low_freq_factor = 1;
        c->rope_high_freq_factor = 4;
        c->rope_orig_max_pos = 8192;
    }
    c->tie_embeddings = s->tied;
    c->bos_id = s->bos;
    c->n_eos = s->n_eos;
    memcpy(c->eos_ids, s->eos, sizeof s->eos);
    c->dtype = s->dtype;
}

/* Adds tensor t of shape (a[, b]) to the fill list, reserving its bytes. */
static void tensor_add(random_state *rs, pie_tensor *t, pie_dtype dt,
                       int64_t a, int64_t b, bool ones)
{
    t->dtype = dt;
    t->ndim = b ? 2 : 1;
    t->shape[0] = a;
    t->shape[1] = b ? b : 1;
    t->shape[2] = t->shape[3] = 1;
    t->data = (const void *)(uintptr_t)rs->size;   /* offset until mapped */
    fill_tensor *f = &rs->ft[rs->n_ft++];
    f->t = t;
    f->ones = ones;
    f->numel = a * (b ? b : 1);
    f->first_job = rs->n_jobs;
    rs->n_jobs += (f->numel + CHUNK - 1) / CHUNK;
    rs->total_elems += f->numel;
    rs->size += ((size_t)f->numel * (dt == PIE_DT_F32 ? 4 : 2) + 63) & ~63ul;
}

static void layout(random_state *rs, pie_model *m)
{
    const pie_model_config *c = &m->cfg;
    pie_dtype dt = c->dtype;
    int64_t d = c->dim, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim, h = c->hidden_dim;
    tensor_add(rs, &m->w.tok_embed, dt, c->vocab_size, d, false);
    tensor_add(rs, &m->w.final_norm, dt, d, 0, true);
    if (!c->tie_embeddings)
        tensor_add(rs, &m->w.lm_head, dt, c->vocab_size, d, false);
    for (int l = 0; l < c->n_layers; l++) {
        pie_layer_weights *w = &m->w.layers[l];
        tensor_add(rs, &w->attn_norm, dt, d, 0, true);
        tensor_add(rs, &w->wq, dt, q, d, false);
        tensor_add(rs, &w->wk, dt, kv, d, false);
        tensor_add(rs, &w->wv, dt, kv, d, false);
        tensor_add(rs, &w->wo, dt, d, q, false);
        tensor_add(rs, &w->ffn_norm, dt, d, 0, true);
        tensor_add(rs, &w->w_gate, dt, h, d, false);
        tensor_add(rs, &w->w_up, dt, h, d, false);
        tensor_add(rs, &w->w_down, dt, d, h, false);
    }
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return x << k | x >> (64 - k);
}

static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t xoshiro_next(uint64_t s[4])
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* Irwin-Hall(4) of 16-bit uniforms, scaled to N(0, STDDEV) moments. */
static inline float normal_next(uint64_t s[4])
{
    uint64_t r = xoshiro_next(s);
    int32_t sum = (int32_t)(r & 0xffff) + (int32_t)(r >> 16 & 0xffff) +
                  (int32_t)(r >> 32 & 0xffff) + (int32_t)(r >> 48);
    /* mean 4 * 32767.5, sd sqrt(4 * (65536^2 - 1) / 12) = 37837.23 */
    return (float)((sum - 131070) * (STDDEV / 37837.23));
}

static void job_run(random_state *rs, int64_t job)
{
    int32_t k = 0;
    while (k + 1 < rs->n_ft && rs->ft[k + 1].first_job <= job) k++;
    fill_tensor *f = &rs->ft[k];
    int64_t j = job - f->first_job, lo = j * CHUNK;
    int64_t n = f->numel - lo < CHUNK ? f->numel - lo : CHUNK;
    uint64_t sm = SEED ^ ((uint64_t)k << 32) ^ (uint64_t)j, s[4];
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&sm);
    pie_tensor *t = f->t;
    if (t->dtype == PIE_DT_F32) {
        float *p = (float *)t->data + lo;
        for (int64_t i = 0; i < n; i++) p[i] = f->ones ? 1.f : normal_next(s);
    } else {
        uint16_t *p = (uint16_t *)t->data + lo;
        for (int64_t i = 0; i < n; i++)
            p[i] = pie_f32_to_bf16(f->ones ? 1.f : normal_next(s));
    }
    atomic_fetch_add(&rs->done_elems, n);
}

static void *worker(void *arg)
{
    random_state *rs = arg;
    int64_t job;
    while ((job = atomic_fetch_add(&rs->next_job, 1)) < rs->n_jobs)
        job_run(rs, job);
    return NULL;
}

/* Fills every tensor on the calling thread plus helper threads. */
static void fill(random_state *rs, pie_progress_fn progress, void *user)
{
    long np = sysconf(_SC_NPROCESSORS_ONLN);
    const char *env = getenv("PIE_RANDOM_THREADS");   /* for tests */
    if (env && atoi(env) > 0) np = atoi(env);
    int nt = np > 64 ? 63 : np > 1 ? (int)np - 1 : 0, started = 0;
    pthread_t th[63];
    for (int i = 0; i < nt; i++)
        if (pthread_create(&th[started], NULL, worker, rs) == 0) started++;
    int64_t job;
    while ((job = atomic_fetch_add(&rs->next_job, 1)) < rs->n_jobs) {
        job_run(rs, job);
        if (progress)
            progress(user, "random weights",
                     (uint64_t)atomic_load(&rs->done_elems),
                     (uint64_t)rs->total_elems);
    }
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    if (progress)
        progress(user, "random weights", (uint64_t)rs->total_elems,
                 (uint64_t)rs->total_elems);
}

int pie__model_random(const char *shape, pie_progress_fn progress,
                      void *user, pie_model *m)
{
    const shape_def *s = NULL;
    for (size_t i = 0; i < N_SHAPES; i++)
        if (!strcmp(shape, SHAPES[i].name)) s = &SHAPES[i];
    if (!s)
        return pie_err_set(PIE_ENOTFOUND, "random:%s: unknown shape (known: "
                           "stories15M, llama-3.2-1b, llama-3.1-8b, tiny)",
                           shape);
    random_state *rs = calloc(1, sizeof *rs);
    if (!rs) return pie_err_set(PIE_ENOMEM, "out of memory");
    m->priv = rs;
    config_set(s, &m->cfg);
    rs->ft = calloc(3 + 9 * (size_t)s->n_layers, sizeof *rs->ft);
    if (!rs->ft) return pie_err_set(PIE_ENOMEM, "out of memory");
    layout(rs, m);
    void *p = mmap(NULL, rs->size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return pie_err_set(PIE_ENOMEM, "random:%s: cannot map %zu bytes for "
                           "the weights", shape, rs->size);
    rs->buf = p;
    /* huge pages: 512x fewer first-touch faults while filling (a hint) */
    madvise(p, rs->size, MADV_HUGEPAGE);
    for (int32_t i = 0; i < rs->n_ft; i++)
        rs->ft[i].t->data = rs->buf + (uintptr_t)rs->ft[i].t->data;
    if (s->tied) m->w.lm_head = m->w.tok_embed;
    fill(rs, progress, user);
    return 0;
}

void pie__model_random_free(pie_model *m)
{
    random_state *rs = m->priv;
    if (!rs) return;
    if (rs->buf) munmap(rs->buf, rs->size);
    free(rs->ft);
    free(rs);
    m->priv = NULL;
}
