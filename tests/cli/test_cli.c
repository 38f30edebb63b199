/*
 * test_cli.c — the `pie` command end to end: generate and tokenize on the
 * real stories260K checkpoint against reference.json (produced by Hugging
 * Face transformers), and the command's answers to bad input (exit codes,
 * messages naming the problem).
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "tests/test_util.h"

/* Runs a shell command; returns its stdout (malloc'ed) and exit status. */
static char *run(const char *cmd, int *status)
{
    FILE *p = popen(cmd, "r");
    CHECK(p, "popen %s", cmd);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t k;
    while ((k = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += k;
        if (cap - n < 1024) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return buf;
}

static json_t *reference(void)
{
    json_error_t e;
    json_t *r = json_load_file(test_shared_path("models/stories260K/reference.json"),
                               0, &e);
    CHECK(r, "reference.json: %s", e.text);
    return r;
}

/* Checks that JSON array got equals the first n ids of want. */
static void check_ids(json_t *got, json_t *want, size_t n, const char *what)
{
    CHECK(json_is_array(got), "%s: no ids array", what);
    CHECK(json_array_size(got) == n, "%s: expected %zu ids, got %zu", what, n,
          json_array_size(got));
    for (size_t i = 0; i < n; i++) {
        long g = (long)json_integer_value(json_array_get(got, i));
        long w = (long)json_integer_value(json_array_get(want, i));
        CHECK(g == w, "%s: expected %ld, got %ld at step %zu", what, w, g, i);
    }
    printf("%s: %zu ids match the reference\n", what, n);
}

/* Runs cmd, which must exit 0 and print one JSON object; returns it. */
static json_t *run_json(const char *cmd)
{
    int st;
    char *out = run(cmd, &st);
    CHECK(st == 0, "'%s' exited %d", cmd, st);
    json_error_t e;
    json_t *j = json_loads(out, 0, &e);
    CHECK(j, "'%s' printed no JSON: %s", cmd, out);
    free(out);
    return j;
}

/* `cmd` prints {"ids":[...]} equal to the first n greedy ids of prompt p. */
static void check_greedy(json_t *ref, int p, const char *cmd, size_t n,
                         const char *what)
{
    json_t *pr = json_array_get(json_object_get(ref, "prompts"), (size_t)p);
    json_t *j = run_json(cmd);
    check_ids(json_object_get(j, "ids"), json_object_get(pr, "greedy_ids"), n,
              what);
    json_decref(j);
}

/* pie generate, and the inferlet path (text-completion with --prompt-ids
 * --no-text, the mode `pie bench generate` uses), reproduce the reference. */
static void test_generate_ids(json_t *ref, const char *model)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s generate --model %s --prompt-ids 1 "
             "--max-tokens 100 --temperature 0 --ignore-eos --json --backend cpu",
             PIE_BIN, model);
    check_greedy(ref, 0, cmd, 100, "generate --prompt-ids 1");
    snprintf(cmd, sizeof cmd, "%s run text-completion --model %s --backend cpu "
             "-- --prompt-ids 1 --max-tokens 100 --temperature 0 --ignore-eos "
             "--no-text --json", PIE_BIN, model);
    check_greedy(ref, 0, cmd, 100, "run text-completion --prompt-ids 1");
}

/* Named KV exports outlive the pie process with --kv-dir: one process
 * prefills and exports, a second imports from disk and continues, and its
 * tokens equal the reference continuation. A corrupt file is skipped with a
 * message. */
static void test_kv_persist(json_t *ref, const char *model)
{
    char ids[2048], cmd[8192], dir[1024];
    int st;
    struct stat sb;
    if (stat(PIE_KVPERSIST_WASM, &sb) != 0)
        TEST_SKIP("no %s (wasm toolchain missing)", PIE_KVPERSIST_WASM);
    json_t *p0 = json_array_get(json_object_get(ref, "prompts"), 0);
    json_t *greedy = json_object_get(p0, "greedy_ids");
    size_t k = (size_t)snprintf(ids, sizeof ids, "1");
    for (size_t i = 0; i < 40; i++)
        k += (size_t)snprintf(ids + k, sizeof ids - k, ",%lld",
                              json_integer_value(json_array_get(greedy, i)));
    snprintf(dir, sizeof dir, "%s/kv", PIE_TEST_TMP);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, PIE_TEST_TMP);
    CHECK(system(cmd) == 0, "cannot prepare %s", dir);
    snprintf(cmd, sizeof cmd, "%s run %s --model %s --backend cpu --kv-dir %s "
             "-- save --ids %s", PIE_BIN, PIE_KVPERSIST_WASM, model, dir, ids);
    free(run(cmd, &st));
    CHECK(st == 0, "kvpersist save exited %d", st);

    snprintf(cmd, sizeof cmd, "%s run %s --model %s --backend cpu --kv-dir %s "
             "-- load --ids %s --n 20", PIE_BIN, PIE_KVPERSIST_WASM, model, dir,
             ids);
    json_t *j = run_json(cmd), *want = json_array();
    for (size_t i = 40; i < 60; i++)
        json_array_append(want, json_array_get(greedy, i));
    check_ids(json_object_get(j, "ids"), want, 20,
              "continuation from KV saved by another pie process");
    json_decref(want);
    json_decref(j);
    char *out;

    /* without the saved state the import must fail */
    snprintf(cmd, sizeof cmd, "%s run %s --model %s --backend cpu -- load "
             "--ids %s 2>&1", PIE_BIN, PIE_KVPERSIST_WASM, model, ids);
    free(run(cmd, &st));
    CHECK(st != 0, "import without --kv-dir succeeded");

    /* a corrupt file: reported, skipped, pie still runs the inferlet */
    snprintf(cmd, sizeof cmd, "for f in %s/*.pkv; do printf 'garbage' | dd "
             "of=$f bs=1 seek=40 conv=notrunc 2>/dev/null; done", dir);
    CHECK(system(cmd) == 0, "cannot corrupt the saved file");
    snprintf(cmd, sizeof cmd, "%s run %s --model %s --backend cpu --kv-dir %s "
             "-- load --ids %s 2>&1", PIE_BIN, PIE_KVPERSIST_WASM, model, dir,
             ids);
    out = run(cmd, &st);
    CHECK(st == 1 && strstr(out, "skipping saved KV"),
          "corrupt KV file: expected a skip message and exit 1, got %d: %s",
          st, out);
    printf("corrupt KV file -> %.*s\n", (int)strcspn(strstr(out, "skipping"),
                                                      "\n"),
           strstr(out, "skipping"));
    free(out);

    /* a 120-byte name round-trips (its hex file name is 244 bytes, 254
     * while written); a 121-byte one cannot be saved: an error, and no file
     * cut short (two long names would otherwise share one) */
    char nm[256];
    memset(nm, 'n', 200);
    nm[120] = 0;
    snprintf(cmd, sizeof cmd, "rm -rf %s && %s run %s --model %s --backend cpu "
             "--kv-dir %s -- both --ids %s --n 20 --name %s", dir, PIE_BIN,
             PIE_KVPERSIST_WASM, model, dir, ids, nm);
    j = run_json(cmd);
    want = json_array();
    for (size_t i = 40; i < 60; i++)
        json_array_append(want, json_array_get(greedy, i));
    check_ids(json_object_get(j, "ids"), want, 20,
              "continuation in the process that saved under a 120-byte name");
    json_decref(j);
    snprintf(cmd, sizeof cmd, "%s run %s --model %s --backend cpu --kv-dir %s "
             "-- load --ids %s --n 20 --name %s", PIE_BIN, PIE_KVPERSIST_WASM,
             model, dir, ids, nm);
    j = run_json(cmd);
    check_ids(json_object_get(j, "ids"), want, 20,
              "continuation from KV saved under a 120-byte name");
    json_decref(j);
    json_decref(want);
    memset(nm, 'n', 200);
    nm[121] = 0;
    snprintf(cmd, sizeof cmd, "rm -rf %s && %s run %s --model %s --backend cpu "
             "--kv-dir %s -- save --ids %s --name %s 2>&1; ls %s | wc -l", dir,
             PIE_BIN, PIE_KVPERSIST_WASM, model, dir, ids, nm, dir);
    out = run(cmd, &st);
    CHECK(strstr(out, "does not fit") && out[strlen(out) - 2] == '0',
          "a 121-byte export name: expected a save error and no file, got: %s",
          out);
    free(out);
}

/* Launch quotas: --token-limit ends generation with an error once the
 * instance has forwarded that many tokens (what it printed before is a
 * prefix of the reference); --priority outside 0..7 is refused. */
static void test_quota(json_t *ref, const char *model)
{
    char cmd[2048];
    int st;
    json_t *p1 = json_array_get(json_object_get(ref, "prompts"), 1);
    const char *want = json_string_value(json_object_get(p1, "greedy_text")) +
                       strlen("Once upon a time");
    snprintf(cmd, sizeof cmd, "%s run text-completion --model %s --backend cpu "
             "--token-limit 20 -- --prompt 'Once upon a time' --max-tokens 40 "
             "--temperature 0 2>/dev/null", PIE_BIN, model);
    char *out = run(cmd, &st);
    CHECK(st == 1, "--token-limit 20: expected exit 1, got %d", st);
    CHECK(strlen(out) > 0 && strncmp(out, want, strlen(out)) == 0 &&
          strlen(out) < strlen(want) / 2,
          "--token-limit 20: output is not a short prefix of the reference: %s",
          out);
    printf("--token-limit 20 stops after %zu bytes of the reference text\n",
           strlen(out));
    free(out);
    snprintf(cmd, sizeof cmd, "%s run text-completion --model %s --priority 8 "
             "-- --prompt x 2>&1", PIE_BIN, model);
    out = run(cmd, &st);
    CHECK(st == 2 && strstr(out, "--priority"), "--priority 8: exit %d: %s",
          st, out);
    free(out);
}

static void test_generate_text(json_t *ref, const char *model)
{
    char cmd[2048];
    int st;
    json_t *p1 = json_array_get(json_object_get(ref, "prompts"), 1);
    snprintf(cmd, sizeof cmd, "%s generate --model %s --prompt 'Once upon a time' "
             "--max-tokens 100 --temperature 0 --ignore-eos --backend cpu",
             PIE_BIN, model);
    char *out = run(cmd, &st);
    CHECK(st == 0, "pie generate exited %d", st);
    const char *full = json_string_value(json_object_get(p1, "greedy_text"));
    const char *prompt = "Once upon a time";
    CHECK(!strncmp(full, prompt, strlen(prompt)), "reference text starts oddly");
    const char *want = full + strlen(prompt);
    size_t n = strlen(want);
    CHECK(strncmp(out, want, n) == 0 && out[n] == '\n',
          "continuation differs:\nexpected: %s\ngot:      %s", want, out);
    printf("generate --prompt: streamed text equals the reference (%zu bytes)\n", n);
    free(out);

    snprintf(cmd, sizeof cmd, "%s tokenize --model %s --json 'Once upon a time'",
             PIE_BIN, model);
    out = run(cmd, &st);
    CHECK(st == 0, "pie tokenize exited %d", st);
    json_error_t e;
    json_t *j = json_loads(out, 0, &e), *in = json_object_get(p1, "input_ids");
    CHECK(j, "tokenize --json output is not JSON: %s", out);
    /* reference input_ids = BOS + the text's ids; tokenize adds no BOS */
    json_t *want_ids = json_array();
    for (size_t i = 1; i < json_array_size(in); i++)
        json_array_append(want_ids, json_array_get(in, i));
    check_ids(json_object_get(j, "ids"), want_ids, json_array_size(want_ids),
              "tokenize");
    json_decref(want_ids);
    json_decref(j);
    free(out);
}

/* Counts the occurrences of needle in hay. */
static int count_str(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* `pie bench generate` on a KV pool that holds one generation but not the
 * 4 it runs at once (8 pages; each needs 6): it must finish -- before the
 * admission fix every generation waited for pages the others held, forever
 * (native) or until a host timeout. Generations that cannot be served fail
 * with "KV pool exhausted"; at least the oldest finishes; exit 1 on any
 * failure. `timeout` turns a hang into a failure. */
static void test_bench_overcommitted(const char *model)
{
    const char *modes[] = { "--native", "" };
    char cmd[2048], errf[1024], *err;
    snprintf(errf, sizeof errf, "%s/bench_err.txt", PIE_TEST_TMP);
    snprintf(cmd, sizeof cmd, "mkdir -p %s", PIE_TEST_TMP);
    CHECK(system(cmd) == 0, "cannot create %s", PIE_TEST_TMP);
    for (int m = 0; m < 2; m++) {
        int st;
        snprintf(cmd, sizeof cmd, "timeout 120 %s bench generate --model %s "
                 "--backend cpu --pages 8 -c 4 -n 64 --json %s 2>%s", PIE_BIN,
                 model, modes[m], errf);
        char *out = run(cmd, &st);
        CHECK(st != 124, "'%s' hung (killed after 120 s)", cmd);
        json_error_t e;
        json_t *j = json_loads(out, 0, &e);
        CHECK(j, "'%s' (exit %d) printed no JSON: %s", cmd, st, out);
        int ok = (int)json_integer_value(json_object_get(j, "ok"));
        int failed = (int)json_integer_value(json_object_get(j, "failed"));
        FILE *f = fopen(errf, "r");
        CHECK(f, "no %s", errf);
        err = calloc(1, 1 << 16);
        fread(err, 1, (1 << 16) - 1, f);
        fclose(f);
        CHECK(ok >= 1 && ok + failed == 4, "'%s': ok %d, failed %d", cmd, ok,
              failed);
        CHECK(st == (failed ? 1 : 0), "'%s': %d failed but exit %d", cmd,
              failed, st);
        CHECK(count_str(err, "KV pool exhausted") >= failed, "'%s': %d "
              "failed without a clear reason: %s", cmd, failed, err);
        printf("bench generate %s on an over-committed pool: %d/4 finished, "
               "%d failed: %.*s\n", *modes[m] ? modes[m] : "(inferlet)", ok,
               failed, (int)strcspn(err + strcspn(err, "\n") + 1, "\n"),
               err + strcspn(err, "\n") + 1);
        free(err);
        free(out);
        json_decref(j);
    }
}

/* Each bad invocation must fail with the given status and a message. */
static void test_bad_input(const char *model)
{
    struct { const char *args; int status; const char *msg; } cases[] = {
        { "generate --model /nonexistent/dir --prompt x", 1, "/nonexistent/dir" },
        { "generate --model %s --prompt-ids 1,x", 2, "prompt-ids" },
        { "generate --model %s", 2, "--prompt" },
        { "generate --model %s --prompt x --bogus", 2, "--bogus" },
        { "generate --model %s --prompt x --max-tokens abc", 2, "max-tokens" },
        { "generate --model %s --prompt-ids 99999 --temperature 0", 1, "" },
        { "frobnicate", 2, "frobnicate" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[512], cmd[2048];
        int st;
        snprintf(args, sizeof args, cases[i].args, model);
        snprintf(cmd, sizeof cmd, "%s %s 2>&1", PIE_BIN, args);
        char *out = run(cmd, &st);
        CHECK(st == cases[i].status, "'pie %s': expected exit %d, got %d (%s)",
              args, cases[i].status, st, out);
        CHECK(strstr(out, cases[i].msg), "'pie %s': message lacks '%s': %s",
              args, cases[i].msg, out);
        printf("bad input 'pie %s' -> exit %d: %.*s\n", args, st,
               (int)strcspn(out, "\n"), out);
        free(out);
    }
}

int main(void)
{
    json_t *ref = reference();
    const char *model = test_shared_path("models/stories260K");
    test_generate_ids(ref, model);
    test_generate_text(ref, model);
    test_kv_persist(ref, model);
    test_quota(ref, model);
    test_bench_overcommitted(model);
    test_bad_input(model);
    json_decref(ref);
    TEST_DONE();
}
