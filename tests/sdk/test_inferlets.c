/*
 * test_inferlets.c — end-to-end tests of `pie run`, `pie build` and the
 * bundled inferlets on ../shared/models/stories260K, checked against the
 * model's reference.json (greedy ids from Hugging Face transformers) and
 * its tokenizer:
 *
 *   text      text-completion greedy prints exactly the reference
 *             continuation (40 tokens), as text (also --json=false) and as
 *             ids (--json); sampling parameters out of range and a seed
 *             of " -1" are refused with a message
 *   many      -n 1000 concurrent text-completion instances, every block
 *             the reference continuation
 *   parallel  parallel-generation: greedy branches forked from one exported
 *             prefill equal the reference
 *   beam      beam-search --beams 1 is greedy; --beams 4 gives a full,
 *             at-least-as-likely sequence
 *   sink      attention-sink holds at most sink + window + 1 pages and
 *             matches greedy until the first page leaves the window
 *   conform   the API conformance inferlet (every function, error cases,
 *             child traps) passes; trap modes end the instance with a
 *             reason on stderr; -n mixes of good and trapping instances
 *   chat      text-completion --system on Llama 3 / ChatML models equals
 *             pie generate on the Hugging Face-templated prompt
 *   build     pie build compiles a C file and a directory, runs it, passes
 *             compiler errors through; --cpu-limit and --memory-limit
 *             reach the runtime; pie run rejects bad inputs clearly
 *
 * Usage: test_inferlets CASE (registered once per case with ctest).
 */
#define _GNU_SOURCE 1 /* memmem */
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "model/tokenizer.h"
#include "tests/test_util.h"

#ifndef PIE_BIN
#error PIE_BIN must name the pie executable
#endif

typedef struct run_out {
    char  *out, *err;
    size_t out_len, err_len;
    int    status;               /* exit code, or 128 + signal */
} run_out;

static char tmpdir[256];

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    CHECK(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    CHECK(p && fread(p, 1, (size_t)n, f) == (size_t)n, "cannot read %s", path);
    p[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return p;
}

/* Runs argv (NULL-terminated) with stdout/stderr captured. */
static run_out run(const char *const *argv)
{
    char po[300], pe[300];
    snprintf(po, sizeof po, "%s/out", tmpdir);
    snprintf(pe, sizeof pe, "%s/err", tmpdir);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork failed");
    if (pid == 0) {
        int fo = open(po, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int fe = open(pe, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fo, 1);
        dup2(fe, 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    run_out r;
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = slurp(po, &r.out_len);
    r.err = slurp(pe, &r.err_len);
    return r;
}

static void run_free(run_out *r)
{
    free(r->out);
    free(r->err);
}

static const char *model_dir(void)
{
    return test_shared_path("models/stories260K");
}

/* Reference ids: prompt 1 ("Once upon a time") of reference.json. */
static int ref_ids(const char *key, int32_t *out, int cap)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/reference.json", model_dir());
    json_error_t e;
    json_t *root = json_load_file(path, 0, &e);
    CHECK(root, "cannot parse %s: %s", path, e.text);
    json_t *p = json_array_get(json_object_get(root, "prompts"), 1);
    json_t *a = json_object_get(p, key);
    CHECK(json_is_array(a), "reference.json: no prompts[1].%s", key);
    int n = 0;
    for (size_t i = 0; i < json_array_size(a) && n < cap; i++)
        out[n++] = (int32_t)json_integer_value(json_array_get(a, i));
    json_decref(root);
    return n;
}

/* Greedy reference continuation: first n ids (cut after EOS id 2, which
 * text-completion stops at) and its text decoded in context. */
static int ref_continuation(int n, int32_t *ids, char **text)
{
    int32_t prompt[64], all[200], greedy[128];
    int np = ref_ids("input_ids", prompt, 64);
    int ng = ref_ids("greedy_ids", greedy, 128);
    CHECK(ng >= n, "reference has %d greedy ids, need %d", ng, n);
    memcpy(ids, greedy, sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++)
        if (ids[i] == 2) { n = i; break; }
    pie_tokenizer *t;
    CHECK_OK(pie_tokenizer_load(model_dir(), &t));
    memcpy(all, prompt, sizeof(int32_t) * (size_t)np);
    memcpy(all + np, ids, sizeof(int32_t) * (size_t)n);
    char *a, *b;
    size_t la, lb;
    CHECK_OK(pie_tokenizer_decode(t, all, (size_t)np, true, &a, &la));
    CHECK_OK(pie_tokenizer_decode(t, all, (size_t)(np + n), true, &b, &lb));
    CHECK(lb >= la && !memcmp(a, b, la), "decode is not prefix-stable");
    *text = strdup(b + la);
    free(a);
    free(b);
    pie_tokenizer_free(t);
    return n;
}

/* Parses "ids":[...] from a JSON text. */
static int json_ids(const char *s, const char *key, int32_t *out, int cap)
{
    json_error_t e;
    json_t *root = json_loads(s, 0, &e);
    CHECK(root, "bad JSON from the inferlet (%s): %.200s", e.text, s);
    json_t *a = json_object_get(root, key);
    CHECK(json_is_array(a), "no \"%s\" in %.200s", key, s);
    int n = 0;
    for (size_t i = 0; i < json_array_size(a) && n < cap; i++)
        out[n++] = (int32_t)json_integer_value(json_array_get(a, i));
    json_decref(root);
    return n;
}

static void check_ids(const char *what, const int32_t *got, int ng,
                      const int32_t *want, int nw)
{
    CHECK(ng == nw, "%s: expected %d ids, got %d", what, nw, ng);
    for (int i = 0; i < nw; i++)
        CHECK(got[i] == want[i], "%s: expected %d, got %d at step %d", what,
              want[i], got[i], i);
}

/* Compiled inferlets are cached across test cases (the runtime publishes
 * cache entries atomically, so concurrent tests may share it). */
#define CACHE_DIR PIE_TEST_TMP "/cache"
#define PIE_RUN(...)                                                         \
    run((const char *const[]){ PIE_BIN, "run", "--backend", "cpu",           \
                               "--cache-dir", CACHE_DIR, "--model",          \
                               model_dir(), __VA_ARGS__, NULL })

static void test_text(void)
{
    int32_t want[64], got[64];
    char *text;
    int nw = ref_continuation(40, want, &text);
    run_out r = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                        "--max-tokens", "40", "--temperature", "0");
    CHECK(r.status == 0, "pie run exited %d: %s", r.status, r.err);
    CHECK(r.out_len == strlen(text) && !memcmp(r.out, text, r.out_len),
          "expected\n[%s]\ngot\n[%s]", text, r.out);
    printf("text-completion: %zu bytes equal the reference continuation\n",
           r.out_len);
    run_free(&r);
    r = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                "--max-tokens", "40", "--temperature", "0", "--json",
                "--lookahead", "1");
    CHECK(r.status == 0, "pie run --json exited %d: %s", r.status, r.err);
    check_ids("text-completion --json", got, json_ids(r.out, "ids", got, 64),
              want, nw);
    run_free(&r);
    /* --json=false is plain text, not JSON */
    r = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                "--max-tokens", "40", "--temperature", "0", "--json=false");
    CHECK(r.status == 0 && r.out_len == strlen(text) &&
          !memcmp(r.out, text, r.out_len),
          "--json=false: exit %d, expected the plain text, got [%s] %s",
          r.status, r.out, r.err);
    run_free(&r);
    /* sampling parameters out of range fail with a message naming them;
     * so does a seed that only parses after skipping a space */
    const char *bad[][3] = { { "--min-p", "2", "min_p" },
                             { "--top-p", "1.5", "top_p" },
                             { "--top-k", "-3", "top_k" },
                             { "--seed", " -1", "--seed" } };
    for (int i = 0; i < 4; i++) {
        r = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                    "--max-tokens", "4", "--temperature", "1",
                    bad[i][0], bad[i][1]);
        CHECK(r.status != 0 && strstr(r.err, bad[i][2]),
              "%s '%s': exit %d, stderr [%s]", bad[i][0], bad[i][1],
              r.status, r.err);
        printf("text-completion %s '%s' refused: %s", bad[i][0], bad[i][1],
               r.err);
        run_free(&r);
    }
    /* seeded sampling is reproducible and differs from greedy */
    run_out s1 = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                         "--max-tokens", "30", "--temperature", "1.0",
                         "--seed", "7");
    run_out s2 = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                         "--max-tokens", "30", "--temperature", "1.0",
                         "--seed", "7");
    CHECK(s1.status == 0 && s2.status == 0, "sampled runs failed: %s", s1.err);
    CHECK(s1.out_len == s2.out_len && !memcmp(s1.out, s2.out, s1.out_len),
          "same seed, different text:\n%s\n%s", s1.out, s2.out);
    run_free(&s1);
    run_free(&s2);
    /* stop string: the text ends right before it */
    const char *cut = strstr(text, "Lily");
    r = PIE_RUN("text-completion", "--", "--prompt", "Once upon a time",
                "--max-tokens", "40", "--temperature", "0", "--stop", "Lily");
    CHECK(r.status == 0 && cut && r.out_len == (size_t)(cut - text) &&
          !memcmp(r.out, text, r.out_len), "stop string: got [%s]", r.out);
    run_free(&r);
    free(text);
}

static void test_many(void)
{
    int32_t want[64];
    char *text;
    ref_continuation(40, want, &text);
    /* 1000 x 3 pages do not fit the CPU backend's default pool (8192
     * tokens); size it as a user would */
    run_out r = PIE_RUN("-n", "1000", "--pages", "4096", "text-completion", "--", "--prompt",
                        "Once upon a time", "--max-tokens", "40",
                        "--temperature", "0");
    CHECK(r.status == 0, "pie run -n 1000 exited %d: %.2000s", r.status, r.err);
    size_t tl = strlen(text);
    const char *p = r.out;
    for (int i = 0; i < 1000; i++) {
        CHECK((size_t)(r.out + r.out_len - p) >= tl + 1 &&
              !memcmp(p, text, tl) && p[tl] == '\n',
              "instance %d: expected [%s], got [%.200s]", i, text, p);
        p += tl + 1;
    }
    CHECK(p == r.out + r.out_len, "%zu extra bytes", (size_t)(r.out + r.out_len - p));
    printf("1000 instances: all equal the reference continuation\n");
    run_free(&r);
    free(text);
}

static void test_parallel(void)
{
    int32_t want[64], ids[64];
    char *text;
    int nw = ref_continuation(24, want, &text);
    run_out r = PIE_RUN("parallel-generation", "--", "--prompt",
                        "Once upon a time", "--n", "4", "--max-tokens", "24",
                        "--temperature", "0", "--json");
    CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
    json_error_t e;
    json_t *root = json_loads(r.out, 0, &e);
    CHECK(root, "bad JSON: %s", r.out);
    json_t *br = json_object_get(root, "branches");
    CHECK(json_array_size(br) == 4, "expected 4 branches");
    for (size_t b = 0; b < 4; b++) {
        json_t *a = json_object_get(json_array_get(br, b), "ids");
        int n = 0;
        for (size_t i = 0; i < json_array_size(a) && n < 64; i++)
            ids[n++] = (int32_t)json_integer_value(json_array_get(a, i));
        check_ids("greedy branch", ids, n, want, nw);
        const char *t = json_string_value(json_object_get(json_array_get(br, b),
                                                          "text"));
        CHECK(t && !strcmp(t, text), "branch %zu text [%s]", b, t);
    }
    json_decref(root);
    run_free(&r);
    /* sampled branches: 4 seeds, not all equal */
    r = PIE_RUN("parallel-generation", "--", "--prompt", "Once upon a time",
                "--n", "4", "--max-tokens", "24", "--temperature", "1.0");
    CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
    CHECK(strstr(r.out, "[0] ") && strstr(r.out, "[3] "), "branches: %s", r.out);
    run_free(&r);
    free(text);
}

static void test_beam(void)
{
    int32_t want[64], ids[64];
    char *text;
    int nw = ref_continuation(20, want, &text);
    run_out r = PIE_RUN("beam-search", "--", "--prompt", "Once upon a time",
                        "--beams", "1", "--max-tokens", "20", "--json");
    CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
    check_ids("beam 1", ids, json_ids(r.out, "ids", ids, 64), want, nw);
    json_t *j1 = json_loads(r.out, 0, NULL);
    double lp1 = json_real_value(json_object_get(j1, "logprob"));
    json_decref(j1);
    run_free(&r);
    r = PIE_RUN("beam-search", "--", "--prompt", "Once upon a time", "--beams",
                "4", "--max-tokens", "20", "--json");
    CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
    int n = json_ids(r.out, "ids", ids, 64);
    json_t *j4 = json_loads(r.out, 0, NULL);
    double lp4 = json_real_value(json_object_get(j4, "logprob"));
    json_decref(j4);
    CHECK(n == 20 || (n > 0 && ids[n - 1] == 2), "beam 4: %d ids", n);
    CHECK(lp4 <= 0 && lp1 <= 0, "log-probabilities %f %f", lp1, lp4);
    printf("beam 1 logprob %.4f, beam 4 logprob %.4f\n", lp1, lp4);
    run_free(&r);
    /* where greedy is not the best path, 4 beams find a likelier one */
    double lp[2];
    for (int k = 0; k < 2; k++) {
        r = PIE_RUN("beam-search", "--", "--prompt", "The dog", "--beams",
                    k ? "4" : "1", "--max-tokens", "30", "--json");
        CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
        json_t *j = json_loads(r.out, 0, NULL);
        lp[k] = json_real_value(json_object_get(j, "logprob"));
        json_decref(j);
        run_free(&r);
    }
    CHECK(lp[1] > lp[0] + 1.0, "'The dog': beam 4 %.4f vs greedy %.4f", lp[1],
          lp[0]);
    free(text);
}

static void test_sink(void)
{
    int32_t want[128], ids[256];
    char *text;
    int nw = ref_continuation(100, want, &text);
    run_out r = PIE_RUN("attention-sink", "--", "--prompt", "Once upon a time",
                        "--max-tokens", "200", "--sink-pages", "1",
                        "--window-pages", "2", "--json");
    CHECK(r.status == 0, "exited %d: %s", r.status, r.err);
    int n = json_ids(r.out, "ids", ids, 256);
    CHECK(n == 200, "expected 200 ids, got %d", n);
    json_t *j = json_loads(r.out, 0, NULL);
    int maxp = (int)json_integer_value(json_object_get(j, "max_pages"));
    int bound = (int)json_integer_value(json_object_get(j, "bound"));
    json_decref(j);
    CHECK(bound == 4 && maxp >= 1 && maxp <= bound,
          "pages held %d, bound %d", maxp, bound);
    /* no page leaves before slot 48 (3 full pages of 16): the first
     * 48 - 5 - 1 generated tokens see the whole history */
    int same = 42 < nw ? 42 : nw;
    check_ids("attention-sink prefix", ids, same, want, same);
    printf("attention-sink: max %d pages held (bound %d) over 205 tokens\n",
           maxp, bound);
    run_free(&r);
    /* the host agrees: under a 4-page quota per instance, attention-sink
     * generates 200 tokens (13 pages without freeing) and text-completion
     * cannot */
    r = PIE_RUN("--max-pages", "4", "attention-sink", "--", "--prompt",
                "Once upon a time", "--max-tokens", "200", "--sink-pages", "1",
                "--window-pages", "2", "--json");
    CHECK(r.status == 0, "attention-sink under a 4-page quota: %d %s",
          r.status, r.err);
    CHECK(json_ids(r.out, "ids", ids, 256) == 200, "200 ids under the quota");
    run_free(&r);
    r = PIE_RUN("--max-pages", "4", "text-completion", "--", "--prompt",
                "Once upon a time", "--max-tokens", "200", "--temperature", "0",
                "--ignore-eos");
    CHECK(r.status != 0 && strstr(r.err, "quota"),
          "text-completion must hit the 4-page quota: %d %s", r.status, r.err);
    run_free(&r);
    free(text);
}

/* Chat models: text-completion with --system wraps the prompt in the
 * model's template (written out here from the Hugging Face templates) and
 * generates what `pie generate` (the native loop) generates from the ids
 * of that templated text. */
static void test_chat(void)
{
    static const struct { const char *model, *text; } cases[] = {
        { "models/tiny-llama3",
          "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
          "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
          "Hello there<|eot_id|><|start_header_id|>assistant"
          "<|end_header_id|>\n\n" },
        { "models/tiny-qwen2",
          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
          "Hello there<|im_end|>\n<|im_start|>assistant\n" },
    };
    for (size_t k = 0; k < 2; k++) {
        const char *dir = test_shared_path(cases[k].model);
        pie_tokenizer *t;
        int32_t *ids, got[32], want[32];
        size_t n;
        CHECK_OK(pie_tokenizer_load(dir, &t));
        CHECK_OK(pie_tokenizer_encode(t, cases[k].text, strlen(cases[k].text),
                                      false, &ids, &n));
        char list[4096], *p = list;
        for (size_t i = 0; i < n; i++)
            p += sprintf(p, "%s%d", i ? "," : "", ids[i]);
        free(ids);
        pie_tokenizer_free(t);
        run_out g = run((const char *const[]){ PIE_BIN, "generate", "--backend",
            "cpu", "--model", dir, "--prompt-ids", list, "--temperature", "0",
            "--max-tokens", "12", "--ignore-eos", "--json", NULL });
        CHECK(g.status == 0, "pie generate: %s", g.err);
        int nw = json_ids(g.out, "ids", want, 32);
        run_out r = run((const char *const[]){ PIE_BIN, "run", "--backend",
            "cpu", "--cache-dir", CACHE_DIR, "--model", dir, "text-completion",
            "--", "--prompt", "Hello there", "--system", "Be brief.",
            "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
            "--json", NULL });
        CHECK(r.status == 0, "text-completion on %s: %s", dir, r.err);
        check_ids(cases[k].model, got, json_ids(r.out, "ids", got, 32), want,
                  nw);
        printf("%s: chat template + generation agree with pie generate\n",
               cases[k].model);
        run_free(&g);
        run_free(&r);
    }
}

static void test_conform(const char *wasm)
{
    char ids[256], next[64], *p = ids;
    int32_t v[64];
    int n = ref_ids("input_ids", v, 64);
    for (int i = 0; i < n; i++) p += sprintf(p, "%s%d", i ? "," : "", v[i]);
    ref_ids("greedy_ids", v, 64);
    snprintf(next, sizeof next, "%d,%d", v[0], v[1]);
    run_out r = PIE_RUN(wasm, "--", "all", ids, next);
    printf("%s", r.out);
    CHECK(r.status == 0, "conformance exited %d:\n%s", r.status, r.err);
    CHECK(strstr(r.out, "conformance says hello"), "send() not on stdout");
    CHECK(strstr(r.out, "wasi stdout works"), "printf not on stdout");
    CHECK(strstr(r.err, "wasi stderr works"), "stderr not on stderr");
    CHECK(strstr(r.out, " 0 failed"), "checks failed");
    run_free(&r);
    static const char *traps[] = { "trap-send", "trap-tokenize", "trap-kv",
                                   "trap-wait-any", "trap-read", "trap-oob",
                                   "trap-unreachable", "trap-div0",
                                   "trap-stack" };
    for (size_t i = 0; i < sizeof traps / sizeof *traps; i++) {
        r = PIE_RUN(wasm, "--", traps[i]);
        CHECK(r.status == 1 && strstr(r.err, "trapped"),
              "%s: status %d, stderr [%s]", traps[i], r.status, r.err);
        CHECK(!strstr(r.err, "did not trap"), "%s did not trap", traps[i]);
        run_free(&r);
    }
    r = PIE_RUN(wasm, "--", "exit7");
    CHECK(r.status == 7, "exit7 gave status %d", r.status);
    run_free(&r);
    /* 8 instances: one traps in the middle of others that succeed */
    r = PIE_RUN("-n", "8", wasm, "--", "all", ids, next);
    CHECK(r.status == 0, "8 conformance instances: %d\n%s", r.status, r.err);
    run_free(&r);
}

static void test_build(void)
{
    char src[300], dir[300], wasm[300], bad[300];
    snprintf(src, sizeof src, "%s/hello.c", tmpdir);
    snprintf(dir, sizeof dir, "%s/hellodir", tmpdir);
    snprintf(wasm, sizeof wasm, "%s/hello.wasm", tmpdir);
    snprintf(bad, sizeof bad, "%s/bad.c", tmpdir);
    FILE *f = fopen(src, "w");
    fputs("#include <stdio.h>\n#include \"pie.h\"\n"
          "int main(int argc, char **argv) {\n"
          "  pie_lm m; pie_ctx c; pie_gen g;\n"
          "  if (pie_lm_open(&m, NULL)) return 3;\n"
          "  pie_ctx_init(&c, &m); pie_ctx_fill(&c, argv[1], true);\n"
          "  pie_gen_opts o = { .max_tokens = 8 };\n"
          "  if (pie_generate(&c, &o, &g)) return 4;\n"
          "  printf(\"%s|%d\", g.text, g.n_ids); return 0; }\n", f);
    fclose(f);
    f = fopen(bad, "w");
    fputs("int main(void) { return undeclared_x; }\n", f);
    fclose(f);
    run_out r = run((const char *const[]){ PIE_BIN, "build", src, "-o", wasm,
                                           NULL });
    CHECK(r.status == 0, "pie build failed: %s", r.err);
    size_t n;
    char *w = slurp(wasm, &n);
    CHECK(n > 8 && !memcmp(w, "\0asm", 4), "not a wasm module");
    CHECK(!memmem(w, n, ".debug_info", 11) && !memmem(w, n, "\x04name", 5),
          "pie build must strip debug info and names");
    free(w);
    run_free(&r);
    int32_t want[16];
    char *text;
    ref_continuation(8, want, &text);
    r = PIE_RUN(wasm, "--", "Once upon a time");
    char expect[512];
    snprintf(expect, sizeof expect, "%s|8", text);
    CHECK(r.status == 0 && !strcmp(r.out, expect), "built inferlet: [%s] %s",
          r.out, r.err);
    run_free(&r);
    free(text);
    /* a directory */
    mkdir(dir, 0700);
    char dsrc[400];
    snprintf(dsrc, sizeof dsrc, "%s/main.c", dir);
    f = fopen(dsrc, "w");
    fputs("int helper(void);\nint main(void) { return helper(); }\n", f);
    fclose(f);
    snprintf(dsrc, sizeof dsrc, "%s/helper.c", dir);
    f = fopen(dsrc, "w");
    fputs("int helper(void) { return 5; }\n", f);
    fclose(f);
    r = run((const char *const[]){ PIE_BIN, "build", dir, "-o", wasm, NULL });
    CHECK(r.status == 0, "pie build DIR failed: %s", r.err);
    run_free(&r);
    r = PIE_RUN(wasm);
    CHECK(r.status == 5, "DIR inferlet exit status %d", r.status);
    run_free(&r);
    /* compiler errors come through as they are */
    r = run((const char *const[]){ PIE_BIN, "build", bad, "-o", wasm, NULL });
    CHECK(r.status != 0 && strstr(r.err, "bad.c:1:") &&
          strstr(r.err, "undeclared_x"), "compiler error not passed: %s", r.err);
    run_free(&r);
    r = run((const char *const[]){ PIE_BIN, "build", src, "--cc",
                                   "/nonexistent/clang", NULL });
    CHECK(r.status == 1 && strstr(r.err, "not found"), "missing clang: %s",
          r.err);
    run_free(&r);
    /* arguments after "--" belong to the inferlet (even --help) / clang */
    r = PIE_RUN("text-completion", "--", "--help");
    CHECK(r.status == 0 && strstr(r.out, "--prompt") &&
          !strstr(r.out, "usage: pie run"), "inferlet --help: %s", r.out);
    run_free(&r);
    f = fopen(bad, "w");
    fputs("#ifndef NEEDED\n#error NEEDED not passed\n#endif\n"
          "int main(void) { return NEEDED; }\n", f);
    fclose(f);
    r = run((const char *const[]){ PIE_BIN, "build", bad, "-o", wasm, "--",
                                   "-DNEEDED=6", NULL });
    CHECK(r.status == 0, "CFLAGS after -- not passed: %s", r.err);
    run_free(&r);
    r = PIE_RUN(wasm);
    CHECK(r.status == 6, "built with -DNEEDED=6: status %d", r.status);
    run_free(&r);
    /* -n: one whole block per instance, in launch order, although later
     * instances finish first (each sleeps less than the one before) */
    char ord[300];
    snprintf(ord, sizeof ord, "%s/order.c", tmpdir);
    f = fopen(ord, "w");
    fputs("#include <stdio.h>\n#include \"pie.h\"\n"
          "int main(void) {\n"
          "  static unsigned last; unsigned id = pie_instance_id();\n"
          "  pie_wait_free(pie_sleep((int64_t)(10u - id % 10u) * 20000000));\n"
          "  printf(\"%u\\n\", id); fflush(stdout);\n"
          "  pie_send_str(\"part two\\n\"); (void)last; return 0; }\n", f);
    fclose(f);
    r = run((const char *const[]){ PIE_BIN, "build", ord, "-o", wasm, NULL });
    CHECK(r.status == 0, "pie build order.c: %s", r.err);
    run_free(&r);
    r = PIE_RUN("-n", "6", wasm);
    CHECK(r.status == 0, "-n 6: %d %s", r.status, r.err);
    {
        unsigned prev = 0, id;
        const char *q = r.out;
        for (int i = 0; i < 6; i++) {
            int used = 0;
            CHECK(sscanf(q, "%u\npart two\n%n", &id, &used) == 1 && used > 0,
                  "block %d malformed: [%s]", i, q);
            CHECK(i == 0 || id > prev, "block %d: id %u after %u", i, id, prev);
            prev = id;
            q += used;
        }
        CHECK(*q == 0, "trailing output [%s]", q);
    }
    run_free(&r);
    /* pie run --cpu-limit and --memory-limit reach the runtime */
    char lim[300];
    snprintf(lim, sizeof lim, "%s/limits.c", tmpdir);
    f = fopen(lim, "w");
    fputs("#include <stdlib.h>\n#include <string.h>\n#include <stdio.h>\n"
          "int main(int argc, char **argv) {\n"
          "  if (!strcmp(argv[1], \"spin\")) { volatile unsigned x = 0;\n"
          "    for (;;) x++; }\n"
          "  size_t got = 0; void **p, **list = NULL;\n"
          "  while ((p = malloc(1 << 20))) {\n"
          "    memset(p, 1, 1 << 20); *p = list; list = p; got++; }\n"
          "  printf(\"%zu %p\", got, (void *)list); return 0; }\n", f);
    fclose(f);
    r = run((const char *const[]){ PIE_BIN, "build", lim, "-o", wasm, NULL });
    CHECK(r.status == 0, "pie build limits.c: %s", r.err);
    run_free(&r);
    r = PIE_RUN("--cpu-limit", "0.5", wasm, "--", "spin");
    CHECK(r.status == 1 && strstr(r.err, "trapped") && strstr(r.err, "CPU"),
          "--cpu-limit: status %d, %s", r.status, r.err);
    run_free(&r);
    r = PIE_RUN("--memory-limit", "16", wasm, "--", "alloc");
    CHECK(r.status == 0 && atoi(r.out) >= 8 && atoi(r.out) < 16,
          "--memory-limit 16: status %d, %s MiB allocated, %s", r.status,
          r.out, r.err);
    run_free(&r);
    /* pie run: unknown inferlet, garbage module, missing model */
    r = PIE_RUN("no-such-inferlet");
    CHECK(r.status == 2 && strstr(r.err, "no bundled inferlet"), "%s", r.err);
    run_free(&r);
    f = fopen(bad, "w");
    fputs("\0asm garbage", f);
    fclose(f);
    r = PIE_RUN(bad);
    CHECK(r.status == 1 && strstr(r.err, "cannot load"), "garbage: %s", r.err);
    run_free(&r);
    r = PIE_RUN("/dev/zero");
    CHECK(r.status == 1 && strstr(r.err, "cannot read"), "/dev/zero: %s",
          r.err);
    run_free(&r);
    r = PIE_RUN("/nonexistent/x.wasm");
    CHECK(r.status == 1 && strstr(r.err, "No such file"), "missing: %s", r.err);
    run_free(&r);
    r = run((const char *const[]){ PIE_BIN, "run", "--model",
                                   "/nonexistent/model", "text-completion",
                                   NULL });
    CHECK(r.status == 1 && strstr(r.err, "cannot load model"), "%s", r.err);
    run_free(&r);
}

int main(int argc, char **argv)
{
    CHECK(argc >= 2, "usage: test_inferlets CASE [WASM]");
    model_dir();                                  /* skips without ../shared */
    snprintf(tmpdir, sizeof tmpdir, "%s", PIE_TEST_TMP "/XXXXXX");
    mkdir(PIE_TEST_TMP, 0700);
    mkdir(CACHE_DIR, 0700);
    CHECK(mkdtemp(tmpdir), "mkdtemp %s failed", tmpdir);
    const char *c = argv[1];
    if (!strcmp(c, "text")) test_text();
    else if (!strcmp(c, "many")) test_many();
    else if (!strcmp(c, "parallel")) test_parallel();
    else if (!strcmp(c, "beam")) test_beam();
    else if (!strcmp(c, "sink")) test_sink();
    else if (!strcmp(c, "conform")) test_conform(argv[2]);
    else if (!strcmp(c, "build")) test_build();
    else if (!strcmp(c, "chat")) test_chat();
    else CHECK(0, "unknown case %s", c);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {}
    TEST_DONE();
}
