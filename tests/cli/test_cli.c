/*
 * test_cli.c — the `pie` command end to end: generate and tokenize on the
 * real stories260K checkpoint against reference.json (produced by Hugging
 * Face transformers), and the command's answers to bad input (exit codes,
 * messages naming the problem): option values out of range, a FIFO or an
 * over-long path as the inferlet, a trailing slash, and pie run's exit
 * status for every kind of instance end (probe/).
 */
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
    /* the 5-token prompt in forwards of 2, 2 and 1 tokens, and whole */
    const int chunk[2] = { 2, 0 }, fwds[2] = { 3, 1 };
    for (int i = 0; i < 2; i++) {
        snprintf(cmd, sizeof cmd, "%s generate --model %s --prompt-ids "
                 "1,403,407,261,378 --chunk %d --max-tokens 100 "
                 "--temperature 0 --ignore-eos --json --backend cpu",
                 PIE_BIN, model, chunk[i]);
        check_greedy(ref, 1, cmd, 100, "generate --chunk, a 5-token prompt");
        json_t *j = run_json(cmd);
        json_t *f = json_object_get(j, "prompt_forwards");
        CHECK(json_integer_value(f) == fwds[i], "--chunk %d: the prompt took "
              "%lld forwards, expected %d", chunk[i],
              (long long)json_integer_value(f), fwds[i]);
        json_decref(j);
    }
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

/* `pie bench generate --both`: the inferlet and the native loop in turn in
 * one process, reps runs of each; every generation must finish (exit 0),
 * and the JSON's ratio is its two medians' ratio. */
static void test_bench_both(const char *model)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "timeout 120 %s bench generate --model %s "
             "--backend cpu -c 3 -n 12 --both --reps 3 --json", PIE_BIN, model);
    json_t *j = run_json(cmd);
    const char *mode = json_string_value(json_object_get(j, "mode"));
    double mi = json_number_value(json_object_get(j, "inferlet_ms_per_token"));
    double mn = json_number_value(json_object_get(j, "native_ms_per_token"));
    double ratio = json_number_value(json_object_get(j, "ratio"));
    double ti = json_number_value(json_object_get(j, "inferlet_tokens_per_s"));
    double tn = json_number_value(json_object_get(j, "native_tokens_per_s"));
    int reps = (int)json_integer_value(json_object_get(j, "reps"));
    CHECK(mode && strcmp(mode, "both") == 0 && reps == 3, "'%s': mode %s, "
          "reps %d", cmd, mode ? mode : "(none)", reps);
    CHECK(mi > 0 && mn > 0 && ti > 0 && tn > 0, "'%s': ms/token %g / %g, "
          "tokens/s %g / %g: every run must have timed its generations", cmd,
          mi, mn, ti, tn);
    CHECK(fabs(ratio - mi / mn) <= 1e-3 * ratio + 1e-4, "'%s': ratio %g, "
          "medians %g / %g", cmd, ratio, mi, mn);
    printf("bench generate --both: inferlet %.3f, native %.3f ms/token, "
           "ratio %.3f\n", mi, mn, ratio);
    json_decref(j);
}

/* `pie bench forward` prefills in forwards of at most --chunk tokens:
 * whole 100-token prompts together where they fit (250: 2 + 1 of 3; 100
 * and 101: one each), a longer prompt in pieces (40: 40 + 40 + 20 each;
 * 99: 99 + 1), and --chunk 0 takes the backend's most (the CPU has no
 * limit of its own: all 3 in one). Decode runs
 * after each. Before, --chunk 0 was refused and a prompt over --chunk went
 * in one forward past it (past the GPU's 8192 it failed). */
static void test_bench_chunk(const char *model)
{
    const int chunk[6] = { 40, 99, 100, 101, 250, 0 };
    const int fwds[6] = { 9, 6, 3, 3, 2, 1 };
    char cmd[2048];
    for (int i = 0; i < 6; i++) {
        snprintf(cmd, sizeof cmd, "%s bench forward --model %s --backend cpu "
                 "--batch 3 --prompt-len 100 --gen 2 --chunk %d --json "
                 "2>/dev/null", PIE_BIN, model, chunk[i]);
        json_t *j = run_json(cmd);
        long long f = json_integer_value(json_object_get(j, "prefill_forwards"));
        double dec = json_number_value(json_object_get(j, "decode_tokens_per_s"));
        CHECK(f == fwds[i], "'%s': %lld prefill forwards, expected %d", cmd, f,
              fwds[i]);
        CHECK(dec > 0, "'%s': no decode after the prefill", cmd);
        json_decref(j);
    }
    printf("bench forward --chunk 40 / 99 / 100 / 101 / 250 / 0: 9 / 6 / 3 / "
           "3 / 2 / 1 prefill forwards\n");
}

/* A forward limit like the GPU's 8192 tokens, on the CPU
 * (PIE_CPU_MAX_TOKENS): pie generate feeds a 5-token prompt in forwards of
 * 2, 2 and 1 and still gives the reference ids; pie bench forward splits
 * each 3-token prompt (2 + 1) and each 5-sequence decode step (2 + 2 + 1);
 * the scheduler keeps its fires within 4 tokens for 2 generations of
 * 9-token prompts, natively and through the inferlet. A bad value stops
 * the backend with its own message, not the pool's. */
static void test_cpu_max_tokens(json_t *ref, const char *model)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "PIE_CPU_MAX_TOKENS=2 %s generate --model %s "
             "--prompt-ids 1,403,407,261,378 --max-tokens 100 --temperature 0 "
             "--ignore-eos --json --backend cpu", PIE_BIN, model);
    check_greedy(ref, 1, cmd, 100, "generate with PIE_CPU_MAX_TOKENS=2");
    json_t *j = run_json(cmd);
    long long f = json_integer_value(json_object_get(j, "prompt_forwards"));
    CHECK(f == 3, "'%s': the prompt took %lld forwards, expected 3", cmd, f);
    json_decref(j);
    snprintf(cmd, sizeof cmd, "PIE_CPU_MAX_TOKENS=2 %s bench forward --model %s "
             "--backend cpu --batch 5 --prompt-len 3 --gen 2 --json 2>/dev/null",
             PIE_BIN, model);
    j = run_json(cmd);
    f = json_integer_value(json_object_get(j, "prefill_forwards"));
    CHECK(f == 10, "'%s': %lld prefill forwards, expected 10", cmd, f);
    CHECK(json_number_value(json_object_get(j, "decode_tokens_per_s")) > 0,
          "'%s': no decode", cmd);
    json_decref(j);
    for (int native = 0; native < 2; native++) {
        snprintf(cmd, sizeof cmd, "PIE_CPU_MAX_TOKENS=4 timeout 60 %s bench "
                 "generate --model %s --backend cpu -c 2 -n 4 -L 9 --json%s "
                 "2>/dev/null", PIE_BIN, model, native ? " --native" : "");
        j = run_json(cmd);
        CHECK(json_integer_value(json_object_get(j, "ok")) == 2, "'%s': not "
              "every generation finished", cmd);
        json_decref(j);
    }
    int st;
    snprintf(cmd, sizeof cmd, "PIE_CPU_MAX_TOKENS=0x %s generate --model %s "
             "--prompt-ids 1 --backend cpu 2>&1", PIE_BIN, model);
    char *out = run(cmd, &st);
    CHECK(st == 1 && strstr(out, "PIE_CPU_MAX_TOKENS must be 1..16777216") &&
              !strstr(out, "KV pool"),
          "'%s': exit %d: %s", cmd, st, out);
    free(out);
    printf("PIE_CPU_MAX_TOKENS: generate 3 prompt forwards, bench forward 10 "
           "prefill forwards, bench generate within 4 tokens a fire\n");
}

/* Runs `pie ARGS` (stderr with stdout) under `timeout 60`: it must exit
 * with status, print msg and, if bad is given, not print bad. A crash or a
 * hang is a failure (timeout's 124, or 128 + the signal). */
static void expect(const char *args, int status, const char *msg,
                   const char *bad)
{
    size_t n = strlen(args) + strlen(PIE_BIN) + 64;
    char *cmd = malloc(n);
    int st;
    CHECK(cmd, "out of memory");
    snprintf(cmd, n, "timeout 60 %s %s 2>&1", PIE_BIN, args);
    char *out = run(cmd, &st);
    free(cmd);
    CHECK(st != 124, "'pie %.300s' hung (killed after 60 s)", args);
    CHECK(st == status, "'pie %.300s': expected exit %d, got %d (%s)", args,
          status, st, out);
    CHECK(strstr(out, msg), "'pie %.300s': message lacks '%s': %s", args, msg,
          out);
    CHECK(!bad || !strstr(out, bad), "'pie %.300s': message has '%s': %s",
          args, bad, out);
    const char *line = out;          /* the first line that is not progress */
    while (!strncmp(line, "loading ", 8) && strchr(line, '\n'))
        line = strchr(line, '\n') + 1;
    size_t al = strlen(args);      /* long ones: their start and end */
    printf("'pie %.*s%s%s' -> exit %d: %.*s\n", al > 150 ? 60 : (int)al, args,
           al > 150 ? "..." : "", al > 150 ? args + al - 80 : "", st,
           (int)strcspn(line, "\n"), line);
    free(out);
}

/* Each bad invocation must fail with the given status and a message: the
 * usage errors (2) name the option, before any model is loaded. */
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
        /* sizes: a crash (SIGFPE), an int overflow, an unreported malloc
         * failure before */
        { "bench forward --model %s --backend cpu --page-size 0", 2,
          "--page-size" },
        { "bench forward --model %s --backend cpu --prompt-len 2147483647", 2,
          "--prompt-len" },
        { "bench forward --model %s --backend cpu --batch 2147483647", 2,
          "--batch" },
        { "bench forward --model %s --backend cpu --batch 1000000 "
          "--prompt-len 16000000", 2, "KV pages" },
        /* a pool the backend refuses: the hint names the bench's knobs */
        { "bench forward --model %s --backend cpu --batch 1000 "
          "--prompt-len 2000000", 1, "lower --batch, --prompt-len or --gen" },
        { "bench generate --model %s --backend cpu --max-tokens 2147483647",
          2, "--max-tokens" },
        { "bench generate --model %s --backend cpu -c 100000 -n 1000000", 2,
          "KV pages" },
        { "bench generate --model %s --backend cpu --workers 100000", 2,
          "--workers" },
        { "bench generate --model %s --backend cpu --both --native", 2,
          "--both" },
        { "bench generate --model %s --backend cpu --both --reps 0", 2,
          "--reps" },
        { "bench generate --model %s --backend cpu --both --reps 101", 2,
          "--reps" },
        { "generate --model %s --prompt-ids 1 -n 2147483647", 2,
          "--max-tokens" },
        { "generate --model %s --prompt-ids 1 --page-size 0", 2,
          "--page-size" },
        { "generate --model %s --prompt-ids 1 --threads 100000", 2,
          "--threads" },
        /* GPU options: checked before any backend starts, so on any
         * machine */
        { "generate --model %s --prompt-ids 1 --chunk -1", 2,
          "--chunk must be 0.." },
        /* a bad id late in a chunked prompt: named by its place in the
         * whole prompt, before any forward */
        { "generate --model %s --prompt-ids 1,403,407,261,378,99999 "
          "--chunk 2", 1, "prompt token 5 has id 99999" },
        { "generate --model %s --prompt-ids 1 --gpu -1", 2,
          "--gpu must be 0..1023" },
        { "bench forward --model %s --backend cpu --gpu 1024", 2,
          "--gpu must be 0..1023" },
        { "bench generate --model %s --backend cpu --gpu -1", 2,
          "--gpu must be 0..1023" },
        /* unsigned options: "-1" is not 2^64-1 */
        { "generate --model %s --prompt-ids 1 --seed -1", 2, "--seed" },
        { "generate --model %s --prompt-ids 1 --seed ' -1'", 2, "--seed" },
        /* sampling parameters */
        { "generate --model %s --prompt-ids 1 --temperature nan", 2,
          "--temperature" },
        { "generate --model %s --prompt-ids 1 --temperature -1", 2,
          "--temperature" },
        { "generate --model %s --prompt-ids 1 --top-p 0", 2, "--top-p" },
        { "generate --model %s --prompt-ids 1 --top-p 1.5", 2, "--top-p" },
        { "generate --model %s --prompt-ids 1 --top-p nan", 2, "--top-p" },
        { "generate --model %s --prompt-ids 1 --top-k -1", 2, "--top-k" },
        { "generate --model %s --prompt-ids 1 --min-p 1.5", 2, "--min-p" },
        { "generate --model %s --prompt-ids 1 --min-p -0.5", 2, "--min-p" },
        { "detokenize --model %s", 2, "token ids" },
        /* no tokenizer: a clear error (and, under ASan, no leaked model) */
        { "tokenize --model random:stories15M x", 1, "no tokenizer" },
        { "detokenize --model random:stories15M 1", 1, "no tokenizer" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, cases[i].args, model);
        expect(args, cases[i].status, cases[i].msg, NULL);
    }
    /* the ranges' good ends still run */
    char args[512];
    snprintf(args, sizeof args, "generate --model %s --prompt-ids 1 "
             "--backend cpu -n 4 --temperature 0.8 --top-p 1 --top-k 0 "
             "--min-p 0 --seed 18446744073709551615 --threads 1", model);
    expect(args, 0, "", "pie generate");
}

/* The probe inferlet (probe/), or a skip without the wasm toolchain. */
static const char *probe_wasm(void)
{
    struct stat sb;
    if (stat(PIE_PROBE_WASM, &sb) != 0)
        TEST_SKIP("no %s (wasm toolchain missing)", PIE_PROBE_WASM);
    return PIE_PROBE_WASM;
}

/* pie run's limits: NaN, negative, zero or huge values were converted to
 * integers unchecked (undefined: --memory-limit -1 gave 1.5 GiB,
 * --cpu-limit nan no limit, 1e30 a kill at once); unsigned options took
 * "-1" as 2^64-1; thread counts of 100000 started threads until failing.
 * Each is refused (exit 2, naming the option); good values still run. */
static void test_run_limits(const char *model)
{
    static const struct { const char *opt, *msg; } bad[] = {
        { "--memory-limit -1", "--memory-limit" },
        { "--memory-limit nan", "--memory-limit" },
        { "--memory-limit 0", "--memory-limit" },
        { "--memory-limit 1e9", "--memory-limit" },
        { "--cpu-limit nan", "--cpu-limit" },
        { "--cpu-limit inf", "--cpu-limit" },
        { "--cpu-limit 1e30", "--cpu-limit" },
        { "--cpu-limit 0", "--cpu-limit" },
        { "--token-limit -1", "--token-limit" },
        { "--token-limit 18446744073709551615", "--token-limit" },
        { "--max-pages -1", "--max-pages" },
        { "--max-output-bytes -1", "--max-output-bytes" },
        { "--max-output-bytes ' -1'", "--max-output-bytes" },
        { "--max-output-bytes 64k", "--max-output-bytes" },
        { "--max-output-bytes x", "--max-output-bytes" },
        { "--max-output-bytes 18446744073709551616", "--max-output-bytes" },
        { "--max-output-bytes 4294967297", "--max-output-bytes" },
        { "--pages -1", "--pages" },
        { "--page-size 0", "--page-size" },
        { "--page-size -16", "--page-size" },
        { "--threads 100000", "--threads" },
        { "--threads -1", "--threads" },
        { "--workers 100000", "--workers" },
        { "--workers 0", "--workers" },
        { "--gpu -2", "--gpu must be 0..1023" },
        { "--gpu-memory -0.5", "--gpu-memory must be in (0, 1]" },
        { "--gpu-memory 2", "--gpu-memory must be in (0, 1]" },
    };
    const char *wasm = probe_wasm();
    char args[2048];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(args, sizeof args, "run --backend cpu --model %s %s %s -- "
                 "exit 0", model, bad[i].opt, wasm);
        expect(args, 2, bad[i].msg, NULL);
    }
    snprintf(args, sizeof args, "run --backend cpu --model %s --memory-limit "
             "64 --cpu-limit -1 --token-limit 100 --max-pages 0 --workers 1 "
             "--max-output-bytes 0 --gpu 3 --gpu-memory 0.25 "
             "--threads 1 --page-size 8 %s -- exit 0", model, wasm);
    expect(args, 0, "", "pie run");
    snprintf(args, sizeof args, "run --backend cpu --model %s --memory-limit "
             "4096 --cpu-limit 1e9 --max-output-bytes 4294967296 %s -- exit 0",
             model, wasm);
    expect(args, 0, "", "pie run");
}

/* Runs `pie run ... probe outputs` with opts (env is put in front);
 * returns the forwards the instance held and the code that stopped it. */
static void probe_outputs(const char *model, const char *env,
                          const char *opts, int *held, int *rc)
{
    char cmd[4096];
    int st;
    snprintf(cmd, sizeof cmd, "%s timeout 120 %s run --backend cpu --model %s "
             "%s %s -- outputs 2>&1", env, PIE_BIN, model, opts, probe_wasm());
    char *out = run(cmd, &st);
    const char *at = strstr(out, "held ");
    CHECK(st == 0 && at && sscanf(at, "held %d rc %d", held, rc) == 2,
          "'%s': exit %d, printed %s", cmd, st, out);
    free(out);
}

/* --max-output-bytes reaches the engine: an instance that submits
 * one-LOGITS-row forwards and frees none is stopped with PIE_ELIMIT (-11)
 * within the budget, twice the budget holds at least twice as many, and
 * PIE_MAX_OUTPUT_BYTES sets it too. Before, pie run had no such option
 * (exit 2: unknown option) and only embedders could set the budget. */
static void test_run_output_budget(const char *model)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", model);
    json_error_t e;
    json_t *cfg = json_load_file(path, 0, &e);
    CHECK(cfg, "%s: %s", path, e.text);
    int vocab = (int)json_integer_value(json_object_get(cfg, "vocab_size"));
    json_decref(cfg);
    CHECK(vocab > 0, "%s: no vocab_size", path);
    /* the results alone: a token and an offset, a value and an id per
     * logit (what a forward keeps is at least that) */
    int per = 12 + 8 * vocab, n1, rc1, n2, rc2, n3, rc3;
    probe_outputs(model, "", "--max-output-bytes 65536", &n1, &rc1);
    CHECK(rc1 == -11 && n1 >= 1 && n1 <= 65536 / per, "--max-output-bytes "
          "65536: held %d forwards of at least %d bytes each, then %d; "
          "expected 1..%d, then PIE_ELIMIT (-11)", n1, per, rc1, 65536 / per);
    probe_outputs(model, "", "--max-output-bytes 131072", &n2, &rc2);
    CHECK(rc2 == -11 && n2 >= 2 * n1 && n2 <= 131072 / per,
          "--max-output-bytes 131072: held %d, then %d; expected %d..%d "
          "(twice 65536's %d at least), then PIE_ELIMIT (-11)", n2, rc2,
          2 * n1, 131072 / per, n1);
    probe_outputs(model, "PIE_MAX_OUTPUT_BYTES=65536", "", &n3, &rc3);
    CHECK(rc3 == -11 && n3 == n1, "PIE_MAX_OUTPUT_BYTES=65536: held %d, "
          "then %d; expected %d as with the option, then PIE_ELIMIT (-11)",
          n3, rc3, n1);
    printf("--max-output-bytes 65536 holds %d one-LOGITS-row forwards, "
           "131072 holds %d, then PIE_ELIMIT\n", n1, n2);
}

/* pie run's exit status: 0..255 as the inferlet returned it; any other
 * status (256 read as 0 before) and a trap give 1, with a message that
 * tells them apart (-1 and PIE_ETRAP's -10 were reported as traps). */
static void test_run_status(const char *model)
{
    static const struct {
        const char *how;
        int status;
        const char *msg, *bad;
    } cases[] = {
        { "exit 7", 7, "", "pie run" },
        { "exit 255", 255, "", "pie run" },
        { "exit 256", 1, "status 256", "trapped" },
        { "exit -1", 1, "status -1", "trapped" },
        { "exit -10", 1, "status -10", "trapped" },
        { "trap", 1, "trapped", "status" },
    };
    const char *wasm = probe_wasm();
    char args[2048];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(args, sizeof args, "run --backend cpu --model %s %s -- %s",
                 model, wasm, cases[i].how);
        expect(args, cases[i].status, cases[i].msg, cases[i].bad);
    }
    snprintf(args, sizeof args, "run --backend cpu -n 2 --model %s %s -- "
             "exit 256", model, wasm);
    expect(args, 1, "instance 1 exited with status 256", "trapped");
}

/* Paths: a FIFO as the inferlet is refused, not waited on forever (the
 * watchdog and `timeout` catch a hang); a path longer than PATH_MAX is an
 * error, not cut to a shorter one that names another file; a trailing
 * slash in --model serves the model under its directory's name, and in
 * `pie build DIR/` names the output DIR.wasm (both "" before). */
static void test_run_paths(const char *model)
{
    const char *wasm = probe_wasm();
    char cmd[8192], fifo[1024], args[8192];
    int st;
    snprintf(fifo, sizeof fifo, "%s/fifo.wasm", PIE_TEST_TMP);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && rm -f %s && mkfifo %s",
             PIE_TEST_TMP, fifo, fifo);
    CHECK(system(cmd) == 0, "cannot make the FIFO %s", fifo);
    test_watchdog("pie run on a FIFO", 120);
    snprintf(args, sizeof args, "run --backend cpu --model %s %s", model, fifo);
    expect(args, 1, "not a regular file", NULL);
    test_watchdog_off();
    unlink(fifo);

    /* PATH_MAX - 1 bytes name probe.wasm ("/" repeated in front); the
     * inferlet path given is that plus "x.wasm" */
    size_t wl = strlen(wasm), pad = PATH_MAX - 1 - wl;
    CHECK(wasm[0] == '/' && wl < PATH_MAX - 1, "odd probe path %s", wasm);
    char *lp = malloc(PATH_MAX + 16);
    CHECK(lp, "out of memory");
    memset(lp, '/', pad);
    snprintf(lp + pad, PATH_MAX + 16 - pad, "%sx.wasm", wasm);
    snprintf(args, sizeof args, "run --backend cpu --model %s %s -- exit 5",
             model, lp);
    expect(args, 2, "too long", NULL);
    free(lp);

    snprintf(args, sizeof args, "run text-completion --backend cpu --model "
             "%s/ -- --model stories260K --prompt-ids 1 --max-tokens 4 "
             "--temperature 0 --no-text --json", model);
    expect(args, 0, "\"ids\":[", NULL);

    char dir[1024];
    snprintf(dir, sizeof dir, "%s/build", PIE_TEST_TMP);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s/ex && printf "
             "'int main(void) { return 4; }\\n' > %s/ex/main.c", dir, dir,
             dir);
    CHECK(system(cmd) == 0, "cannot prepare %s", dir);
    snprintf(cmd, sizeof cmd, "cd %s && %s build ex/ 2>&1", dir, PIE_BIN);
    char *out = run(cmd, &st);
    CHECK(st == 0, "pie build ex/: exit %d: %s", st, out);
    free(out);
    struct stat sb;
    snprintf(cmd, sizeof cmd, "%s/ex/.wasm", dir);
    CHECK(stat(cmd, &sb) != 0, "pie build ex/ wrote %s", cmd);
    snprintf(cmd, sizeof cmd, "%s/ex.wasm", dir);
    CHECK(stat(cmd, &sb) == 0, "pie build ex/ did not write %s", cmd);
    printf("pie build ex/ wrote ex.wasm\n");
}

/* text-completion --prompt-ids takes the whole list: 4,096 ids and a
 * 4,097th out of the vocabulary are refused for that id (the inferlet cut
 * the list at 4,096 before, silently, and ran). The id is checked before
 * any forward, so this costs no prefill. */
static void test_long_prompt_ids(const char *model)
{
    size_t cap = 4096 * 2 + 2048;
    char *args = malloc(cap);
    CHECK(args, "out of memory");
    size_t k = (size_t)snprintf(args, cap, "run text-completion --model %s "
                                "--backend cpu -- --max-tokens 1 "
                                "--prompt-ids ", model);
    for (int i = 0; i < 4096; i++)
        k += (size_t)snprintf(args + k, cap - k, "1,");
    snprintf(args + k, cap - k, "99999");
    expect(args, 1, "99999", NULL);
    free(args);
}

/* pie generate sizes its pool for the prompt and the continuation: 8,200
 * prompt tokens (past the CPU backend's default pool of 8,192 tokens)
 * and one more. Before, it took the default pool and failed with "KV
 * cache full". */
/* pie generate stops where prompt and continuation fill the model's
 * context (stories260K: 512 positions), saying so; before, it went on
 * past max_position_embeddings. */
static void test_generate_context(json_t *ref, const char *model)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s generate --model %s --prompt-ids 1 -n 600 "
             "--temperature 0 --ignore-eos --json --backend cpu 2>/dev/null",
             PIE_BIN, model);
    json_t *j = run_json(cmd), *ids = json_object_get(j, "ids");
    size_t n = json_array_size(ids);
    CHECK(n == 511, "-n 600 from 1 prompt token: %zu ids, expected 511", n);
    /* the first 100 are the reference's */
    json_t *head = json_array();
    for (size_t i = 0; i < 100; i++)
        json_array_append(head, json_array_get(ids, i));
    json_t *pr = json_array_get(json_object_get(ref, "prompts"), 0);
    check_ids(head, json_object_get(pr, "greedy_ids"), 100,
              "generate up to the context");
    json_decref(head);
    json_decref(j);
    snprintf(cmd, sizeof cmd, "generate --model %s --prompt-ids 1 -n 600 "
             "--temperature 0 --ignore-eos --backend cpu", model);
    expect(cmd, 0, "stopped after 511 tokens: the model's context of 512 "
           "tokens is full", NULL);
    printf("generate: stops at the model's context of 512 tokens\n");
}

static void test_generate_pool(const char *model)
{
    const int n = 8200;
    size_t cap = (size_t)n * 4 + strlen(model) + 512;
    char *args = malloc(cap);
    CHECK(args, "out of memory");
    size_t k = (size_t)snprintf(args, cap, "generate --model %s --backend "
                                "cpu --temperature 0 --ignore-eos -n 1 --json "
                                "--prompt-ids 1", model);
    for (int i = 1; i < n; i++)
        k += (size_t)snprintf(args + k, cap - k, ",%d", 300 + i % 100);
    expect(args, 0, "\"ids\":[", "KV cache full");
    free(args);
    printf("generate: a prompt of %d tokens on the CPU\n", n);
}

int main(void)
{
    json_t *ref = reference();
    const char *model = test_shared_path("models/stories260K");
    test_generate_ids(ref, model);
    test_cpu_max_tokens(ref, model);
    test_generate_text(ref, model);
    test_kv_persist(ref, model);
    test_quota(ref, model);
    test_bench_overcommitted(model);
    test_bench_both(model);
    test_bench_chunk(model);
    test_bad_input(model);
    test_run_limits(model);
    test_run_output_budget(model);
    test_run_status(model);
    test_run_paths(model);
    test_long_prompt_ids(model);
    test_generate_pool(model);
    test_generate_context(ref, model);
    json_decref(ref);
    TEST_DONE();
}
