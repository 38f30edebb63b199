/*
 * test_tokenizer_bad.c — hostile tokenizer files that the review found to
 * crash, hang or blow up the loader. Each input is built here (in memory or
 * in a mkdtemp directory), so the test needs no ../shared and runs in well
 * under a second.
 *
 *   many added:   33,000 added tokens (indices past 32,767) encode and
 *                 decode to the right ids;
 *   Replace:      a Replace decoder whose content is repeated for every
 *                 match is refused before it allocates gigabytes, and a
 *                 small expanding one decodes exactly;
 *   post ids:     post-processor ids must name tokens of the vocab;
 *   not a file:   a directory or FIFO named tokenizer.json or
 *                 tokenizer_config.json fails at once with "not a regular
 *                 file" (a FIFO used to block the loader forever).
 *
 * A watchdog alarm turns a hang into a failure that names the step.
 */
#include "model/tokenizer.h"
#include "common/pie_err.h"
#include "tests/test_util.h"

#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void expect_ids(const pie_tokenizer *t, const char *text,
                       const int32_t *want, size_t nw)
{
    int32_t *ids;
    size_t n;
    CHECK_OK(pie_tokenizer_encode(t, text, strlen(text), false, &ids, &n));
    size_t i = 0;
    while (i < n && i < nw && ids[i] == want[i]) i++;
    CHECK(i == n && n == nw, "encode \"%s\": first difference at %zu: expected "
          "%d, got %d (lengths %zu vs %zu)", text, i, i < nw ? want[i] : -1,
          i < n ? ids[i] : -1, nw, n);
    char *dec;
    size_t dl;
    CHECK_OK(pie_tokenizer_decode(t, ids, n, false, &dec, &dl));
    CHECK(dl == strlen(text) && !memcmp(dec, text, dl),
          "decode gave \"%s\", expected \"%s\"", dec, text);
    free(dec);
    free(ids);
}

static void expect_load_error(const char *json, int code, const char *needle)
{
    pie_tokenizer *t = NULL;
    pie_err_clear();
    int rc = pie_tokenizer_load_json(json, strlen(json), NULL, 0, &t);
    CHECK(rc == code, "load of %.60s... returned %s (%s), expected %s", json,
          pie_err_name(rc), pie_err_msg(), pie_err_name(code));
    CHECK(t == NULL, "a failed load must not return a tokenizer");
    CHECK(strstr(pie_err_msg(), needle), "message \"%s\" lacks \"%s\"",
          pie_err_msg(), needle);
    printf("  ok %-16s %s\n", pie_err_name(rc), pie_err_msg());
}

/* More than INT16_MAX added tokens: indices used to be int16_t, so token
 * 32768 wrapped to -32768 (out-of-bounds read, then encode spun forever). */
static void test_many_added(void)
{
    enum { N = 33000 };
    char *j = malloc((size_t)N * 64 + 256), *p = j;
    p += sprintf(p, "{\"added_tokens\":[");
    for (int i = 0; i < N; i++)
        p += sprintf(p, "%s{\"id\":%d,\"content\":\"<t%d>\",\"special\":true}",
                     i ? "," : "", i + 2, i);
    sprintf(p, "],\"decoder\":{\"type\":\"Fuse\"},\"model\":{\"type\":"
               "\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[]}}");
    test_watchdog("33,000 added tokens: load", 20);
    pie_tokenizer *t;
    CHECK_OK(pie_tokenizer_load_json(j, strlen(j), NULL, 0, &t));
    free(j);
    CHECK(pie_tokenizer_vocab_size(t) == N + 2, "vocab size %d, expected %d",
          pie_tokenizer_vocab_size(t), N + 2);
    test_watchdog("33,000 added tokens: encode", 20);
    const int32_t w1[] = { 0, 1, 7 };
    expect_ids(t, "ab<t5>", w1, 3);
    /* <t32766>..<t32768> straddle the old int16 limit (ids 32768..32770) */
    const int32_t w2[] = { 0, 32768, 32769, 32770, 1, N + 1, 2 + 1000, 0 };
    expect_ids(t, "a<t32766><t32767><t32768>b<t32999><t1000>a", w2, 8);
    /* a high and a low index next to each other */
    const int32_t w3[] = { 2 + 12345, 2 + 1, 0 };
    expect_ids(t, "<t12345><t1>a", w3, 3);
    test_watchdog_off();
    pie_tokenizer_free(t);
    printf("many added: %d added tokens, ids past 32767 encode and decode\n", N);
}

/* A Replace decoder repeats its content for every match in every token:
 * a 60 KB file used to allocate ~900 MB (and past 4 GB the 32-bit offsets
 * wrapped). The needed size is now computed exactly and capped. */
static void test_replace_blowup(void)
{
    enum { L = 30000 };
    char *j = malloc(2 * L + 512), *p = j;
    p += sprintf(p, "{\"decoder\":{\"type\":\"Replace\",\"pattern\":"
                    "{\"String\":\"a\"},\"content\":\"");
    memset(p, 'x', L);
    p += L;
    p += sprintf(p, "\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"");
    memset(p, 'a', L);
    p += L;
    sprintf(p, "\":0,\"b\":1}}}");
    test_watchdog("Replace decoder blow-up: load", 20);
    expect_load_error(j, PIE_EFORMAT, "decoded vocabulary");
    free(j);
    test_watchdog_off();

    /* an expanding Replace that fits decodes exactly */
    const char *ok = "{\"decoder\":{\"type\":\"Replace\",\"pattern\":"
        "{\"String\":\"a\"},\"content\":\"xyz\"},\"model\":{\"type\":\"BPE\","
        "\"vocab\":{\"a\":0,\"aa\":1,\"b\":2,\"bab\":3},\"merges\":[]}}";
    pie_tokenizer *t;
    CHECK_OK(pie_tokenizer_load_json(ok, strlen(ok), NULL, 0, &t));
    const int32_t ids[] = { 1, 0, 2, 3, 1 };
    const char *want = "xyzxyzxyzbbxyzbxyzxyz";
    char *dec;
    size_t dl;
    CHECK_OK(pie_tokenizer_decode(t, ids, 5, false, &dec, &dl));
    CHECK(dl == strlen(want) && !memcmp(dec, want, dl),
          "Replace decode gave \"%s\", expected \"%s\"", dec, want);
    free(dec);
    pie_tokenizer_free(t);
    printf("Replace: blow-up refused, an expanding decoder decodes exactly\n");
}

#define V2 "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1}}"

/* Post-processor ids must name tokens, or encode returns ids that decode
 * refuses (16000000 passed the old < 2^24 check). */
static void test_post_ids(void)
{
    printf("post-processor ids:\n");
    expect_load_error("{\"post_processor\":{\"type\":\"RobertaProcessing\","
                      "\"cls\":[\"<s>\",16000000],\"sep\":[\"</s>\",1]}," V2 "}",
                      PIE_EFORMAT, "16000000");
    expect_load_error("{\"post_processor\":{\"type\":\"BertProcessing\","
                      "\"cls\":[\"a\",0],\"sep\":[\"</s>\",2]}," V2 "}",
                      PIE_EFORMAT, "post_processor sep id 2");
    /* id 2 is a hole between the vocab's 0 and 3 */
    expect_load_error("{\"post_processor\":{\"type\":\"TemplateProcessing\","
                      "\"single\":[{\"SpecialToken\":{\"id\":\"<s>\"}},"
                      "{\"Sequence\":{\"id\":\"A\"}}],\"special_tokens\":"
                      "{\"<s>\":{\"ids\":[2]}}},\"model\":{\"type\":\"BPE\","
                      "\"vocab\":{\"a\":0,\"c\":3}}}",
                      PIE_EFORMAT, "TemplateProcessing id 2");
    /* the same processor with real ids works end to end */
    const char *ok = "{\"post_processor\":{\"type\":\"RobertaProcessing\","
                     "\"cls\":[\"b\",1],\"sep\":[\"a\",0]}," V2 "}";
    pie_tokenizer *t;
    CHECK_OK(pie_tokenizer_load_json(ok, strlen(ok), NULL, 0, &t));
    int32_t *ids;
    size_t n;
    CHECK_OK(pie_tokenizer_encode(t, "ab", 2, true, &ids, &n));
    CHECK(n == 4 && ids[0] == 1 && ids[1] == 0 && ids[2] == 1 && ids[3] == 0,
          "RobertaProcessing: got %zu ids", n);
    char *dec;
    CHECK_OK(pie_tokenizer_decode(t, ids, n, false, &dec, NULL));
    free(dec);
    free(ids);
    pie_tokenizer_free(t);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(text, 1, strlen(text), f) == strlen(text),
          "cannot write %s", path);
    fclose(f);
}

static void rm_rf(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cannot remove %s", dir);
}

/* name inside a fresh dir (with a valid tokenizer.json unless name is it)
 * is a directory or a FIFO: the load must fail at once, naming the file. */
static void expect_not_file(const char *name, int fifo)
{
    char dir[] = "/tmp/pie-tok-test-XXXXXX", path[512];
    CHECK(mkdtemp(dir), "mkdtemp failed");
    const char *ok = "{" V2 "}";
    if (strcmp(name, "tokenizer.json")) write_file(dir, "tokenizer.json", ok);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    CHECK((fifo ? mkfifo(path, 0600) : mkdir(path, 0700)) == 0,
          "cannot make %s", path);
    char what[128];
    snprintf(what, sizeof what, "%s %s: load", fifo ? "FIFO" : "directory", name);
    test_watchdog(what, 10);
    pie_tokenizer *t = NULL;
    pie_err_clear();
    int rc = pie_tokenizer_load(dir, &t);
    test_watchdog_off();
    CHECK(rc == PIE_EIO && t == NULL, "%s: expected PIE_EIO, got %s (%s)", what,
          pie_err_name(rc), pie_err_msg());
    CHECK(strstr(pie_err_msg(), name) &&
          strstr(pie_err_msg(), "not a regular file"),
          "%s: message \"%s\" should name the file and say it is not a "
          "regular file", what, pie_err_msg());
    printf("  ok %-16s %s\n", pie_err_name(rc), pie_err_msg());
    rm_rf(dir);
}

static void test_not_files(void)
{
    printf("not regular files:\n");
    expect_not_file("tokenizer.json", 0);
    expect_not_file("tokenizer_config.json", 0);
    expect_not_file("tokenizer.json", 1);
    expect_not_file("tokenizer_config.json", 1);
}

int main(void)
{
    test_many_added();
    test_replace_blowup();
    test_post_ids();
    test_not_files();
    TEST_DONE();
}
