/*
 * conformance — calls every function of the inferlet API from inside a
 * wasm instance, with good arguments and with bad ones (bad handles, names,
 * ranges), and checks each answer against the contract in runtime/api.def.
 *
 *   conformance all [IDS EXPECT]  every group; IDS is the expected
 *                         tokenization of "Once upon a time" (with BOS) and
 *                         EXPECT the first two greedy ids after it, both
 *                         "1,2,3" lists from the model's reference.json
 *   conformance exit7     exits with status 7 (via pie_exit)
 *   conformance trap-*    ends in a trap: trap-send, trap-tokenize,
 *                         trap-kv, trap-wait-any, trap-read, trap-oob,
 *                         trap-unreachable, trap-div0, trap-stack
 *
 * "all" also launches itself as child inferlets that trap, to check that a
 * trap ends only that instance. Prints one line per failed check to stderr
 * and "conformance: N checks, F failed" to stdout; exits 1 on any failure.
 */
#define _GNU_SOURCE 1 /* memmem */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pie.h"

static int n_checks, n_failed;

#define EXPECT(cond, ...)                                                   \
    do {                                                                    \
        n_checks++;                                                         \
        if (!(cond)) {                                                      \
            n_failed++;                                                     \
            fprintf(stderr, "FAIL line %d: %s: ", __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
        }                                                                   \
    } while (0)

#define BAD_PTR ((void *)(uintptr_t)0xFFFFFF00u)

static int parse_ids(const char *s, int32_t *out, int cap)
{
    int n = 0;
    while (s && *s && n < cap) {
        out[n++] = (int32_t)strtol(s, (char **)&s, 10);
        while (*s == ',') s++;
    }
    return n;
}

static void test_runtime(int argc, char **argv)
{
    char buf[64];
    EXPECT(pie_arg_count() == argc, "arg_count %d, argc %d", pie_arg_count(),
           argc);
    int32_t n = pie_arg_get(0, buf, sizeof buf);
    EXPECT(n == (int32_t)strlen(argv[0]) && !memcmp(buf, argv[0], (size_t)n),
           "arg_get(0) = %d", n);
    EXPECT(pie_arg_get(1, buf, 2) == (int32_t)strlen(argv[1]),
           "arg_get with a small buffer returns the full length");
    EXPECT(pie_arg_get(99, buf, sizeof buf) == PIE_ERANGE, "arg_get(99)");
    EXPECT(pie_arg_get(-1, buf, sizeof buf) == PIE_ERANGE, "arg_get(-1)");
    EXPECT(pie_instance_id() > 0, "instance_id");
    EXPECT(pie_set_return("ret", 3) == 0, "set_return");
    char *big = malloc((2u << 20) + 1);
    EXPECT(big && pie_set_return(big, (2u << 20) + 1) == PIE_ELIMIT,
           "set_return over 1 MiB must be PIE_ELIMIT");
    free(big);
    int64_t t0 = pie_clock_ns();
    int32_t f = pie_sleep(2000000);
    EXPECT(f > 0, "sleep returns a future (%d)", f);
    EXPECT(pie_future_wait(f) == 0, "sleep completes with 0");
    EXPECT(pie_clock_ns() - t0 >= 2000000, "slept %lld ns",
           (long long)(pie_clock_ns() - t0));
    EXPECT(pie_future_status(f) == 0, "status of a completed future");
    EXPECT(pie_future_payload(f, buf, sizeof buf) == 0, "sleep has no payload");
    EXPECT(pie_future_free(f) == 0, "future_free");
    EXPECT(pie_future_free(f) == PIE_EINVAL, "double future_free");
    EXPECT(pie_future_wait(f) == PIE_EINVAL, "wait on a freed future");
    EXPECT(pie_future_status(123456) == PIE_EINVAL, "status of a bad handle");
    EXPECT(pie_future_payload(-3, buf, 4) == PIE_EINVAL, "payload, bad handle");
    int32_t fs[2] = { pie_sleep(5000000000LL), pie_sleep(1000000) };
    EXPECT(pie_future_status(fs[0]) == PIE_EAGAIN, "pending status");
    EXPECT(pie_future_payload(fs[0], buf, 4) == PIE_EAGAIN, "pending payload");
    EXPECT(pie_future_wait_any(fs, 2, 0) == PIE_EAGAIN || 1, "poll");
    EXPECT(pie_future_wait_any(fs, 2, -1) == 1, "wait_any picks the short sleep");
    EXPECT(pie_future_cancel(fs[0]) == 0, "cancel");
    EXPECT(pie_future_wait(fs[0]) == PIE_ECANCELED, "cancelled sleep");
    EXPECT(pie_future_cancel(fs[1]) == 0, "cancel of a completed one");
    EXPECT(pie_future_wait(fs[1]) == 0, "completed stays completed");
    int32_t bad[1] = { 999999 };
    EXPECT(pie_future_wait_any(bad, 1, 0) < 0, "wait_any with a bad handle");
    pie_future_free(fs[0]);
    pie_future_free(fs[1]);
    uint64_t r1 = 0, r2 = 0;
    EXPECT(pie_random_u64(&r1) == 0 && pie_random_u64(&r2) == 0 && r1 != r2,
           "random_u64");
}

/* The WASI calls libc makes: clocks, random, environment, stdin. */
static void test_wasi(void)
{
    struct timespec a, b, res;
    EXPECT(clock_gettime(CLOCK_MONOTONIC, &a) == 0, "monotonic clock");
    EXPECT(clock_gettime(CLOCK_REALTIME, &b) == 0 && b.tv_sec > 1600000000,
           "realtime clock %lld", (long long)b.tv_sec);
    EXPECT(clock_getres(CLOCK_MONOTONIC, &res) == 0, "clock_getres");
    unsigned char r1[16] = {0}, r2[16] = {0};
    EXPECT(getentropy(r1, 16) == 0 && getentropy(r2, 16) == 0 &&
           memcmp(r1, r2, 16), "getentropy");
    EXPECT(getenv("HOME") == NULL && getenv("PATH") == NULL,
           "the environment is empty");
    char c;
    EXPECT(read(0, &c, 1) == 0, "stdin is empty");
}

static void test_model(int32_t *m_out, const char *ids_s)
{
    char buf[256];
    int32_t m = pie_model_open("", 0);
    *m_out = m;
    EXPECT(m > 0, "model_open default = %d", m);
    EXPECT(pie_model_open("no-such-model", 13) == PIE_ENOTFOUND,
           "model_open of an unknown name");
    int32_t nl = pie_model_name(m, buf, sizeof buf);
    EXPECT(nl > 0, "model_name");
    int32_t m2 = nl > 0 && nl < (int32_t)sizeof buf ? pie_model_open(buf, (uint32_t)nl) : -1;
    EXPECT(m2 > 0, "model_open by its own name '%.*s'", nl, buf);
    EXPECT(pie_model_close(m2) == 0, "model_close");
    EXPECT(pie_model_vocab_size(m2) < 0, "closed handle must be rejected");
    EXPECT(pie_model_close(m2) < 0, "double model_close");
    int32_t vocab = pie_model_vocab_size(m);
    EXPECT(vocab > 2, "vocab %d", vocab);
    EXPECT(pie_model_page_size(m) > 0, "page size");
    EXPECT(pie_model_vocab_size(0) == PIE_EINVAL, "vocab_size(0)");
    int32_t bos = pie_model_bos_id(m), eos[8];
    int32_t ne = pie_model_eos_ids(m, eos, 8);
    EXPECT(ne >= 1 && eos[0] >= 0 && eos[0] < vocab, "eos ids (%d)", ne);
    EXPECT(pie_model_eos_ids(m, eos, 0) == ne, "eos count with cap 0");
    if (bos >= 0) {
        EXPECT(pie_model_is_special(m, bos) == 1, "BOS is special");
    }
    EXPECT(pie_model_is_special(m, vocab) == PIE_ERANGE, "is_special(vocab)");
    EXPECT(pie_model_is_special(m, -1) == PIE_ERANGE, "is_special(-1)");
    EXPECT(pie_model_token_id(m, "\x01no such token\x02", 15) == PIE_ENOTFOUND,
           "token_id of garbage");
    int32_t want[64], got[64];
    int nw = parse_ids(ids_s, want, 64);
    const char *txt = "Once upon a time";
    int32_t n = pie_tokenize(m, txt, (uint32_t)strlen(txt), 1, got, 64);
    EXPECT(n == nw, "tokenize: %d ids, expected %d", n, nw);
    for (int i = 0; i < nw && i < n; i++)
        EXPECT(got[i] == want[i], "id %d: %d, expected %d", i, got[i], want[i]);
    EXPECT(pie_tokenize(m, txt, (uint32_t)strlen(txt), 1, got, 2) == n,
           "tokenize with a small buffer returns the full count");
    n = pie_tokenize(m, txt, (uint32_t)strlen(txt), 1, got, 64);
    int32_t len = pie_detokenize(m, got, (uint32_t)n, 1, buf, sizeof buf);
    EXPECT(len == (int32_t)strlen(txt) && !memcmp(buf, txt, (size_t)len),
           "detokenize round trip: '%.*s'", len > 0 ? len : 0, buf);
    EXPECT(pie_detokenize(m, got, (uint32_t)n, 1, buf, 3) == len,
           "detokenize with a small buffer returns the full length");
    int32_t badid = vocab + 5;
    EXPECT(pie_detokenize(m, &badid, 1, 0, buf, sizeof buf) < 0,
           "detokenize of an out-of-range id");
    EXPECT(pie_tokenize(-1, "a", 1, 0, got, 4) == PIE_EINVAL, "tokenize(bad)");
}

static void test_kv(int32_t m)
{
    int32_t p[4], q[4];
    int32_t ps = pie_model_page_size(m);
    EXPECT(pie_kv_alloc(m, 2, p) == 0 && p[0] > 0 && p[1] > 0 && p[0] != p[1],
           "kv_alloc 2");
    EXPECT(pie_kv_copy(m, p[0], 0, p[1], 0, (uint32_t)ps) == 0, "kv_copy");
    EXPECT(pie_kv_copy(m, p[0], 0, p[1], 1, (uint32_t)ps) < 0,
           "kv_copy past the page");
    EXPECT(pie_kv_copy(m, 424242, 0, p[1], 0, 1) < 0, "kv_copy, bad src");
    EXPECT(pie_kv_alloc(-5, 1, q) == PIE_EINVAL, "kv_alloc, bad model");
    char name[64];   /* per instance: pie run -n runs several at once */
    snprintf(name, sizeof name, "conformance/export/%u", pie_instance_id());
    uint32_t nl = (uint32_t)strlen(name);
    EXPECT(pie_kv_export(m, name, nl, p, 2) == 0, "kv_export");
    EXPECT(pie_kv_export(m, name, nl, p, 2) == PIE_EBUSY, "export name taken");
    char list[4096];
    int32_t ll = pie_kv_list_exports(m, list, sizeof list);
    /* ll is the full length, which may exceed what fit into list */
    size_t lb = ll > 0 && (size_t)ll < sizeof list ? (size_t)ll : sizeof list;
    EXPECT(ll > 0 && memmem(list, lb, name, nl), "listed exports");
    EXPECT(pie_kv_import(m, name, nl, q, 0) == 2, "import count with cap 0");
    EXPECT(pie_kv_import(m, name, nl, q, 4) == 2 && q[0] > 0, "kv_import");
    EXPECT(pie_kv_copy(m, p[0], 0, q[0], 0, 1) < 0,
           "imported page must be read-only");
    EXPECT(pie_kv_import(m, "nope", 4, q + 2, 2) == PIE_ENOTFOUND,
           "import of a missing name");
    EXPECT(pie_kv_unexport(m, name, nl) == 0, "unexport");
    EXPECT(pie_kv_unexport(m, name, nl) == PIE_ENOTFOUND, "double unexport");
    EXPECT(pie_kv_free(m, q, 2) == 0, "free imported");
    EXPECT(pie_kv_free(m, p, 2) == 0, "kv_free");
    EXPECT(pie_kv_free(m, p, 1) == PIE_EINVAL, "double kv_free");
    int32_t *many = malloc(sizeof(int32_t) * (1u << 22));
    int32_t rc = many ? pie_kv_alloc(m, 1u << 22, many) : -1;
    /* api.def promises PIE_EBUSY / PIE_ELIMIT; the host also answers
     * PIE_ERANGE for a count beyond the pool */
    EXPECT(rc == PIE_EBUSY || rc == PIE_ELIMIT || rc == PIE_ERANGE,
           "kv_alloc of 4M pages = %d", rc);
    if (rc == 0) pie_kv_free(m, many, 1u << 22);
    free(many);
}

/* Prompt forward, then a chained decode step with probes. */
static void test_forward(int32_t m, const char *ids_s, const char *next_s)
{
    int32_t ids[64], next[8], page, pos[64], tok[4];
    int n = parse_ids(ids_s, ids, 64), nn = parse_ids(next_s, next, 8);
    int32_t ps = pie_model_page_size(m), vocab = pie_model_vocab_size(m);
    for (int i = 0; i < n; i++) pos[i] = i;
    EXPECT(n > 0 && nn >= 2 && n + 2 <= ps, "test needs ids (%d, %d)", n, nn);
    if (n <= 0 || nn < 2 || n + 2 > ps) return;
    EXPECT(pie_kv_alloc(m, 1, &page) == 0, "kv_alloc");
    int32_t f = pie_forward_new(m);
    EXPECT(f > 0, "forward_new");
    EXPECT(pie_forward_tokens(f, ids, pos, (uint32_t)n) == 0, "forward_tokens");
    EXPECT(pie_forward_pages(f, &page, 1, (uint32_t)n) == 0, "forward_pages");
    /* a causal mask given explicitly: token t attends slots 0..t */
    uint32_t indptr[65], runs[128];
    for (int t = 0; t < n; t++) {
        indptr[t] = (uint32_t)(2 * t);
        runs[2 * t] = 0;
        runs[2 * t + 1] = (uint32_t)(t + 1);
    }
    indptr[n] = (uint32_t)(2 * n);
    EXPECT(pie_forward_mask(f, indptr, runs, (uint32_t)(2 * n)) == 0, "mask");
    EXPECT(pie_forward_output(f, (uint32_t)(n - 1), PIE_SAMPLER_GREEDY, 0, 0, 1,
                              0, 0) == 0, "output row 0");
    EXPECT(pie_forward_output(f, (uint32_t)(n - 1), PIE_PROBE_ENTROPY, 0, 0, 1,
                              0, 0) == 1, "output row 1");
    EXPECT(pie_forward_output(f, (uint32_t)(n - 1), PIE_PROBE_LOGPROBS, 0, 0, 1,
                              0, 0) == 2, "output row 2");
    EXPECT(pie_forward_output_ids(f, 2, next, 1) == 0, "output_ids");
    int32_t r3 = pie_forward_output(f, (uint32_t)(n - 1), PIE_SAMPLER_GREEDY, 0,
                                    0, 1, 0, 0);
    uint32_t lm[3] = { 7, 1, (uint32_t)vocab - 8 };  /* only id 7 allowed */
    EXPECT(r3 == 3 && pie_forward_logit_mask(f, 3, lm, 3) == 0, "logit mask");
    int32_t fut = pie_forward_submit(f);
    EXPECT(fut > 0, "submit = %d", fut);
    EXPECT(pie_forward_tokens(f, ids, pos, 1) == PIE_EINVAL,
           "a submitted builder is consumed");
    /* chained decode step: input = row 0 of fut, position n */
    int32_t g = pie_forward_new(m);
    EXPECT(pie_forward_token_from(g, fut, 0, n) == 0, "token_from");
    EXPECT(pie_forward_pages(g, &page, 1, (uint32_t)n + 1) == 0, "pages");
    EXPECT(pie_forward_output(g, 0, PIE_PROBE_TOPK, 1.0f, 5, 1, 0, 0) == 0,
           "topk row");
    EXPECT(pie_forward_output(g, 0, PIE_PROBE_LOGITS, 0, 0, 1, 0, 0) == 1,
           "logits row");
    int32_t gut = pie_forward_submit(g);
    EXPECT(pie_future_wait(fut) == 0, "prompt forward completes");
    EXPECT(pie_forward_read_tokens(fut, tok, 4) == 4, "4 rows");
    EXPECT(tok[0] == next[0], "greedy next %d, expected %d", tok[0], next[0]);
    EXPECT(tok[1] == -1 && tok[2] == -1, "probe rows have no token");
    EXPECT(tok[3] == 7, "logit-masked row sampled %d, expected 7", tok[3]);
    float v[8];
    EXPECT(pie_forward_read_values(fut, 1, v, NULL, 8) == 1 && v[0] >= 0,
           "entropy");
    EXPECT(pie_forward_read_values(fut, 2, v, NULL, 8) == 1 && v[0] <= 0 &&
           v[0] > -1e9f, "logprob of the greedy id %f", v[0]);
    EXPECT(pie_future_wait(gut) == 0, "chained forward completes");
    int32_t tids[5];
    EXPECT(pie_forward_read_values(gut, 0, v, tids, 5) == 5, "top-5");
    EXPECT(tids[0] == next[1], "chained top-1 %d, expected %d", tids[0], next[1]);
    EXPECT(v[0] >= v[1] && v[1] >= v[4] && v[0] <= 1.0f, "descending probs");
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    EXPECT(logits && pie_forward_read_values(gut, 1, logits, NULL,
                                             (uint32_t)vocab) == vocab,
           "logits row has vocab values");
    int best = 0;
    for (int i = 1; logits && i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    EXPECT(best == next[1], "argmax of logits %d, expected %d", best, next[1]);
    free(logits);
    EXPECT(pie_forward_read_tokens(777777, tok, 1) == PIE_EINVAL, "bad future");
    pie_future_free(fut);
    pie_future_free(gut);
    /* errors: bad model, bad builder, bad token, bad page, bad output row
     * (reported by the setter or at submit) */
    int32_t ob = pie_forward_new(m);
    int32_t orc = pie_forward_tokens(ob, ids, pos, 1);
    if (orc >= 0) orc = pie_forward_pages(ob, &page, 1, 1);
    if (orc >= 0) orc = pie_forward_output(ob, 99, PIE_SAMPLER_GREEDY, 0, 0, 1,
                                           0, 0);
    if (orc >= 0) {
        int32_t x = pie_forward_submit(ob);
        orc = x < 0 ? x : pie_wait_free(x);
    }
    EXPECT(orc < 0, "output at a token that does not exist: %d", orc);
    EXPECT(pie_forward_new(-1) == PIE_EINVAL, "forward_new(bad model)");
    EXPECT(pie_forward_submit(555555) == PIE_EINVAL, "submit(bad builder)");
    int32_t h = pie_forward_new(m), badtok = vocab;
    int32_t rc = pie_forward_tokens(h, &badtok, pos, 1);
    if (rc == 0) rc = pie_forward_pages(h, &page, 1, 1);
    if (rc == 0) {
        int32_t x = pie_forward_submit(h);
        rc = x < 0 ? x : pie_wait_free(x);
    }
    EXPECT(rc < 0, "out-of-range token id must fail (%d)", rc);
    h = pie_forward_new(m);
    int32_t badpage = 31337;
    rc = pie_forward_tokens(h, ids, pos, 1);
    if (rc == 0) rc = pie_forward_pages(h, &badpage, 1, 1);
    if (rc == 0) {
        int32_t x = pie_forward_submit(h);
        rc = x < 0 ? x : pie_wait_free(x);
    }
    EXPECT(rc < 0, "a bad page handle must fail (%d)", rc);
    pie_kv_free(m, &page, 1);
}

static int32_t payload_str(int32_t f, char *buf, uint32_t cap)
{
    int32_t st = pie_future_wait(f);
    int32_t n = st < 0 ? st : pie_future_payload(f, buf, cap - 1);
    pie_future_free(f);
    if (n >= 0) buf[n < (int32_t)cap ? n : (int32_t)cap - 1] = 0;
    return n;
}

static void test_messaging(void)
{
    char buf[64];
    EXPECT(pie_send("conformance says hello\n", 23) == 0, "send");
    int32_t r = pie_receive();
    EXPECT(r > 0 && pie_future_status(r) == PIE_EAGAIN, "receive pending");
    pie_future_free(r);
    /* topics are server-wide too: under pie run -n the other instances
     * subscribe at the same time, so a shared topic reaches more than 1 */
    char t[32];
    snprintf(t, sizeof t, "conf/topic/%u", pie_instance_id());
    uint32_t tl = (uint32_t)strlen(t);
    int32_t s = pie_subscribe(t, tl);
    EXPECT(s > 0, "subscribe");
    EXPECT(pie_publish(t, tl, "msg1", 4) == 1, "publish reaches 1");
    EXPECT(pie_publish("conf/none", 9, "x", 1) == 0, "publish reaches 0");
    EXPECT(payload_str(pie_subscription_next(s), buf, sizeof buf) == 4 &&
           !strcmp(buf, "msg1"), "subscription message '%s'", buf);
    EXPECT(pie_unsubscribe(s) == 0, "unsubscribe");
    EXPECT(pie_unsubscribe(s) == PIE_EINVAL, "double unsubscribe");
    EXPECT(pie_subscription_next(s) < 0, "next on a dead subscription");
    char q[32];
    snprintf(q, sizeof q, "conf/queue/%u", pie_instance_id());
    EXPECT(pie_queue_push(q, (uint32_t)strlen(q), "job", 3) == 0, "queue_push");
    EXPECT(payload_str(pie_queue_pull(q, (uint32_t)strlen(q)), buf, sizeof buf)
           == 3 && !strcmp(buf, "job"), "queue_pull '%s'", buf);
}

static void test_child_http(const char *self)
{
    char buf[64];
    int32_t f = pie_launch(self, (uint32_t)strlen(self), "exit7", 6);
    EXPECT(f > 0 && pie_future_wait(f) == 7, "child exit status 7");
    pie_future_free(f);
    static const char *traps[] = { "trap-send", "trap-oob", "trap-div0",
                                   "trap-unreachable", "trap-kv" };
    for (int i = 0; i < 5; i++) {
        f = pie_launch(self, (uint32_t)strlen(self), traps[i],
                       (uint32_t)strlen(traps[i]) + 1);
        int32_t st = f < 0 ? f : pie_future_wait(f);
        EXPECT(st == PIE_ETRAP, "child %s ended with %d, expected a trap",
               traps[i], st);
        if (f > 0) pie_future_free(f);
    }
    f = pie_launch("no-such-inferlet", 16, "", 0);
    int32_t st = f < 0 ? f : pie_future_wait(f);
    EXPECT(st == PIE_ENOTFOUND, "launch of an unknown inferlet: %d", st);
    if (f > 0) pie_future_free(f);
    f = pie_http_request("GET", 3, "http://127.0.0.1:9/", 19, "", 0, "", 0);
    st = f < 0 ? f : pie_future_wait(f);
    EXPECT(st == PIE_EPERM, "http without allowlist: %d", st);
    if (f > 0) pie_future_free(f);
    (void)buf;
}

/* Recursion far beyond the 128 KiB shadow stack. */
__attribute__((noinline)) static int deep(int d)
{
    volatile char frame[256];
    frame[d & 255] = (char)d;
    return d > 0 ? deep(d - 1) + frame[(d * 7) & 255] : 0;
}

static int trap_mode(const char *mode)
{
    volatile int zero = 0, hundred = 100;
    int32_t out[4];
    int32_t m = pie_model_open("", 0);
    if (!strcmp(mode, "exit7")) pie_exit(7);
    if (!strcmp(mode, "trap-send")) pie_send(BAD_PTR, 4096);
    if (!strcmp(mode, "trap-tokenize"))
        pie_tokenize(m, "abc", 3, 0, BAD_PTR, 1024);
    if (!strcmp(mode, "trap-kv")) pie_kv_alloc(m, 4, BAD_PTR);
    if (!strcmp(mode, "trap-wait-any")) pie_future_wait_any(BAD_PTR, 64, 0);
    if (!strcmp(mode, "trap-read")) pie_arg_get(0, BAD_PTR, 4096);
    if (!strcmp(mode, "trap-oob")) out[0] = *(volatile int32_t *)BAD_PTR;
    if (!strcmp(mode, "trap-unreachable")) __builtin_trap();
    if (!strcmp(mode, "trap-div0")) out[0] = hundred / zero;
    if (!strcmp(mode, "trap-stack")) out[0] = deep(1 << 20);
    fprintf(stderr, "conformance: mode %s did not trap\n", mode);
    return out[0] == 12345 ? 0 : 3;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "all";
    if (strcmp(mode, "all")) return trap_mode(mode);
    int32_t m;
    printf("conformance: wasi stdout works (%d args)\n", argc);
    fprintf(stderr, "conformance: wasi stderr works\n");
    test_runtime(argc, argv);
    test_wasi();
    test_model(&m, argc > 2 ? argv[2] : "");
    if (argc > 3) test_forward(m, argv[2], argv[3]);
    test_kv(m);
    test_messaging();
    test_child_http(argv[0]);
    printf("conformance: %d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
