/*
 * test_model_corrupt.c — bad checkpoints and configs: each must fail with
 * the right error code and a message that names the file and the problem,
 * and never crash (run it under -DPIE_SANITIZE=ON too).
 */
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tests/model/model_test_util.h"

/* Expects rc == code and every needle in pie_err_msg(). */
#define EXPECT_ERR(expr, code, ...)                                          \
    do {                                                                     \
        int rc_ = (expr);                                                    \
        const char *nd_[] = { __VA_ARGS__, NULL };                           \
        CHECK(rc_ == (code), "%s: expected %s, got %s (%s)", #expr,          \
              pie_err_name(code), pie_err_name(rc_), pie_err_msg());         \
        for (int i_ = 0; nd_[i_]; i_++)                                      \
            CHECK(strstr(pie_err_msg(), nd_[i_]) != NULL,                    \
                  "message '%s' lacks '%s'", pie_err_msg(), nd_[i_]);        \
        printf("  ok %-14s %s\n", pie_err_name(rc_), pie_err_msg());         \
    } while (0)

static const float DATA[12];  /* zeros: 48 bytes of data section */

static int parse_hdr(const char *hdr, size_t data_len)
{
    size_t n;
    uint8_t *b = st_build(hdr, DATA, data_len, &n);
    pie_safetensors *st = NULL;
    int rc = pie_safetensors_parse(b, n, "mem.safetensors", &st);
    if (rc == 0) CHECK(st != NULL, "parse gave no object");
    else CHECK(st == NULL, "failed parse must not return an object");
    pie_safetensors_free(st);
    free(b);
    return rc;
}

static void test_safetensors_headers(void)
{
    printf("safetensors headers:\n");
    /* a valid file first, so the failures below are about their change */
    CHECK_OK(parse_hdr("{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                       "\"data_offsets\":[0,24]},"
                       "\"b\":{\"dtype\":\"BF16\",\"shape\":[12],"
                       "\"data_offsets\":[24,48]},"
                       "\"e\":{\"dtype\":\"F16\",\"shape\":[0],"
                       "\"data_offsets\":[24,24]}}", 48));
    EXPECT_ERR(parse_hdr("{nope", 48), PIE_EFORMAT, "mem.safetensors",
               "not valid JSON");
    EXPECT_ERR(parse_hdr("[1,2]", 48), PIE_EFORMAT, "mem.safetensors",
               "not a JSON object");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
                         "\"data_offsets\":[40,56]}}", 48),
               PIE_ERANGE, "mem.safetensors", "'a'", "outside");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],"
                         "\"data_offsets\":[0,16]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[4],"
                         "\"data_offsets\":[8,24]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "overlap", "'a'", "'b'");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],"
                         "\"data_offsets\":[0,16]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "'a'", "needs 12");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],"
                         "\"data_offsets\":[16,4]}}", 48),
               PIE_ERANGE, "mem.safetensors", "'a'");
    EXPECT_ERR(parse_hdr("{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],"
                         "\"data_offsets\":[0,16]}}", 48),
               PIE_EUNSUPPORTED, "mem.safetensors", "'ids'", "I64",
               "unsupported dtype");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],"
                         "\"data_offsets\":[0,4]}}", 48),
               PIE_EUNSUPPORTED, "mem.safetensors", "'a'", "dimensions");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],"
                         "\"data_offsets\":[0,4]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "'a'", "shape[0]");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,"
                         "1099511627776],\"data_offsets\":[0,4]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "'a'");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                         "\"data_offsets\":[0]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "data_offsets");
    EXPECT_ERR(parse_hdr("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                         "\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\","
                         "\"shape\":[1],\"data_offsets\":[4,8]}}", 48),
               PIE_EFORMAT, "mem.safetensors", "JSON");
    EXPECT_ERR(parse_hdr("{\"a\":7}", 48), PIE_EFORMAT, "'a'");
    EXPECT_ERR(parse_hdr("{\"__metadata__\":[1]}", 48), PIE_EFORMAT,
               "__metadata__");

    /* framing: short file, header length beyond the file */
    pie_safetensors *st = NULL;
    uint8_t small[5] = { 1, 2, 3, 4, 5 };
    EXPECT_ERR(pie_safetensors_parse(small, 5, "short.safetensors", &st),
               PIE_EFORMAT, "short.safetensors", "too short");
    size_t n;
    uint8_t *b = st_build("{}", NULL, 0, &n);
    b[5] = 0x01;   /* length 2^40 + 2 */
    EXPECT_ERR(pie_safetensors_parse(b, n, "big.safetensors", &st),
               PIE_EFORMAT, "big.safetensors", "header length");
    b[5] = 0;
    b[0] = 3;      /* one byte more than the file holds */
    EXPECT_ERR(pie_safetensors_parse(b, n, "big.safetensors", &st),
               PIE_EFORMAT, "big.safetensors", "header length");
    free(b);
}

/* Copies the stories260K files that pie reads into a fresh temp dir. */
static char *copy_stories(void)
{
    const char *src = test_shared_path("models/stories260K");
    char *dir = tmpdir_new();
    const char *files[] = { "config.json", "model.safetensors" };
    for (int k = 0; k < 2; k++) {
        char path[1024];
        size_t n;
        snprintf(path, sizeof path, "%s/%s", src, files[k]);
        char *t = file_slurp(path, &n);
        file_write(dir, files[k], t, n);
        free(t);
    }
    return dir;
}

static int load_dir(const char *dir)
{
    pie_model *m = NULL;
    int rc = pie_model_load(dir, NULL, NULL, &m);
    if (rc == 0) CHECK(m != NULL, "load gave no model");
    else CHECK(m == NULL, "failed load must not return a model");
    pie_model_free(m);
    return rc;
}

/* Rewrites dir/config.json with key set to the JSON value text (NULL:
 * removed). */
static void config_edit(const char *dir, const char *key, const char *val)
{
    const char *src = test_shared_path("models/stories260K/config.json");
    size_t n;
    char *t = file_slurp(src, &n);
    json_t *root = json_loadb(t, n, 0, NULL);
    free(t);
    if (val) json_object_set_new(root, key, json_loads(val, JSON_DECODE_ANY,
                                                       NULL));
    else json_object_del(root, key);
    char *s = json_dumps(root, 0);
    file_write(dir, "config.json", s, strlen(s));
    free(s);
    json_decref(root);
}

/* Truncates / rewrites the checkpoint file inside dir. */
static void checkpoint_edit(const char *dir, size_t keep, const char *hdr)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    size_t n;
    char *t = file_slurp(path, &n);
    if (hdr) {
        /* replace the header, keeping the data section */
        uint64_t hl = 0;
        for (int k = 7; k >= 0; k--) hl = hl << 8 | (uint8_t)t[k];
        size_t sn;
        uint8_t *st = st_build(hdr, t + 8 + hl, n - 8 - hl, &sn);
        file_write(dir, "model.safetensors", st, sn);
        free(st);
    } else {
        file_write(dir, "model.safetensors", t, keep < n ? keep : n);
    }
    free(t);
}

/* The stories260K header with tensor name removed or reshaped. */
static char *header_without(const char *dir, const char *name,
                            const char *new_shape)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    size_t n;
    char *t = file_slurp(path, &n);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | (uint8_t)t[k];
    json_t *root = json_loadb(t + 8, hl, 0, NULL);
    free(t);
    if (new_shape)
        json_object_set_new(json_object_get(root, name), "shape",
                            json_loads(new_shape, 0, NULL));
    else
        json_object_del(root, name);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

static void test_checkpoint_files(void)
{
    printf("checkpoint directories:\n");
    char *dir = copy_stories();
    CHECK_OK(load_dir(dir));

    EXPECT_ERR(load_dir("/nonexistent/pie-model"), PIE_ENOTFOUND,
               "/nonexistent/pie-model/config.json");
    char *h = header_without(dir, "model.norm.weight", NULL);
    checkpoint_edit(dir, 0, h);
    free(h);
    EXPECT_ERR(load_dir(dir), PIE_ENOTFOUND, "model.norm.weight", dir,
               "missing tensor", "expected shape [64]", "model.safetensors");

    tmpdir_rm(dir);
    dir = copy_stories();
    h = header_without(dir, "model.layers.3.mlp.up_proj.weight", "[64,172]");
    checkpoint_edit(dir, 0, h);
    free(h);
    EXPECT_ERR(load_dir(dir), PIE_EFORMAT,
               "model.layers.3.mlp.up_proj.weight", "[64, 172]",
               "expected [172, 64]", "model.safetensors");

    tmpdir_rm(dir);
    dir = copy_stories();
    config_edit(dir, "intermediate_size", "171");
    EXPECT_ERR(load_dir(dir), PIE_EFORMAT, "model.layers.0", "[171, 64]");

    tmpdir_rm(dir);
    dir = copy_stories();
    checkpoint_edit(dir, 100000, NULL);
    EXPECT_ERR(load_dir(dir), PIE_ERANGE, "model.safetensors", "outside");
    checkpoint_edit(dir, 20, NULL);
    EXPECT_ERR(load_dir(dir), PIE_EFORMAT, "model.safetensors",
               "header length");
    checkpoint_edit(dir, 0, NULL);
    EXPECT_ERR(load_dir(dir), PIE_EFORMAT, "model.safetensors", "too short");

    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(unlink(path) == 0, "unlink");
    EXPECT_ERR(load_dir(dir), PIE_ENOTFOUND, "no model.safetensors");
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK(unlink(path) == 0, "unlink");
    EXPECT_ERR(load_dir(dir), PIE_ENOTFOUND, "config.json");
    tmpdir_rm(dir);
}

static void test_index_files(void)
{
    printf("sharded index:\n");
    char *dir = copy_stories();
    const char *bad[][2] = {
        { "{\"weight_map\":{\"model.norm.weight\":\"../model.safetensors\"}}",
          "not a file name" },
        { "{\"weight_map\":{\"model.norm.weight\":\"nothere.safetensors\"}}",
          "nothere.safetensors" },
        { "{\"weight_map\":{\"no.such.tensor\":\"model.safetensors\"}}",
          "no.such.tensor" },
        { "{\"weight_map\":{\"model.norm.weight\":7}}", "model.norm.weight" },
        { "{\"weight_map\":{}}", "weight_map" },
        { "{\"weight_map\":", "not valid JSON" },
    };
    int codes[] = { PIE_EFORMAT, PIE_ENOTFOUND, PIE_ENOTFOUND, PIE_EFORMAT,
                    PIE_EFORMAT, PIE_EFORMAT };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        file_write(dir, "model.safetensors.index.json", bad[i][0],
                   strlen(bad[i][0]));
        EXPECT_ERR(load_dir(dir), codes[i], bad[i][1]);
    }
    /* an index that lists only some tensors: the rest are missing */
    const char *partial =
        "{\"weight_map\":{\"model.norm.weight\":\"model.safetensors\"}}";
    file_write(dir, "model.safetensors.index.json", partial, strlen(partial));
    EXPECT_ERR(load_dir(dir), PIE_ENOTFOUND, "model.embed_tokens.weight");
    tmpdir_rm(dir);
}

static int cfg_parse(const char *json)
{
    pie_model_config c;
    return pie_model_config_parse(json, strlen(json), "cfg.json", &c);
}

static void test_configs(void)
{
    printf("config.json:\n");
#define BASE "\"hidden_size\":64,\"intermediate_size\":128," \
             "\"num_hidden_layers\":2,\"num_attention_heads\":4," \
             "\"vocab_size\":100"
    pie_model_config c;
    const char *ok = "{\"model_type\":\"mistral\"," BASE "}";
    CHECK_OK(pie_model_config_parse(ok, strlen(ok), "cfg.json", &c));
    CHECK(!strcmp(c.arch, "mistral") && c.n_kv_heads == 4 &&
          c.head_dim == 16 && c.rope_theta == 10000.f && c.bos_id == -1 &&
          c.n_eos == 0 && !c.tie_embeddings && c.max_pos == 2048,
          "defaults: %s kv %d hd %d theta %g", c.arch, c.n_kv_heads,
          c.head_dim, c.rope_theta);
    ok = "{\"architectures\":[\"Qwen3ForCausalLM\"]," BASE
         ",\"head_dim\":32,\"eos_token_id\":[5,6,5],\"rope_scaling\":null}";
    CHECK_OK(pie_model_config_parse(ok, strlen(ok), "cfg.json", &c));
    CHECK(!strcmp(c.arch, "qwen3") && c.qk_norm && c.head_dim == 32 &&
          c.n_eos == 2 && c.eos_ids[1] == 6, "qwen3 via architectures");

    EXPECT_ERR(cfg_parse("{\"model_type\":\"gpt2\"," BASE "}"),
               PIE_EUNSUPPORTED, "cfg.json", "gpt2", "unsupported");
    EXPECT_ERR(cfg_parse("{\"architectures\":[\"BertModel\"]," BASE "}"),
               PIE_EUNSUPPORTED, "BertModel");
    EXPECT_ERR(cfg_parse("{" BASE "}"), PIE_ENOTFOUND, "model_type");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":64}"),
               PIE_ENOTFOUND, "cfg.json", "intermediate_size");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"num_key_value_heads\":3}"),
               PIE_ERANGE, "num_key_value_heads");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":64,"
                         "\"intermediate_size\":128,\"num_hidden_layers\":2,"
                         "\"num_attention_heads\":0,\"vocab_size\":100}"),
               PIE_ERANGE, "num_attention_heads");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":-64,"
                         "\"intermediate_size\":128,\"num_hidden_layers\":2,"
                         "\"num_attention_heads\":4,\"vocab_size\":100}"),
               PIE_ERANGE, "hidden_size");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":64,"
                         "\"intermediate_size\":128,\"num_hidden_layers\":"
                         "1000,\"num_attention_heads\":4,"
                         "\"vocab_size\":100}"),
               PIE_ERANGE, "num_hidden_layers");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":\"64\","
                         "\"intermediate_size\":128,\"num_hidden_layers\":2,"
                         "\"num_attention_heads\":4,\"vocab_size\":100}"),
               PIE_EFORMAT, "hidden_size");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\",\"hidden_size\":66,"
                         "\"intermediate_size\":128,\"num_hidden_layers\":2,"
                         "\"num_attention_heads\":4,\"vocab_size\":100}"),
               PIE_ERANGE, "divisible");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"rms_norm_eps\":-1}"), PIE_ERANGE, "rms_norm_eps");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"rope_theta\":0}"), PIE_ERANGE, "rope_theta");
    /* positive in double, zero in float (found by fuzz_config) */
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"rms_norm_eps\":1e-76}"), PIE_ERANGE,
               "rms_norm_eps");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"rope_scaling\":{\"type\":\"yarn\","
                         "\"factor\":4}}"),
               PIE_EUNSUPPORTED, "yarn");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"rope_scaling\":{\"rope_type\":\"llama3\","
                         "\"factor\":8}}"),
               PIE_ENOTFOUND, "low_freq_factor");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"eos_token_id\":[1,100]}"),
               PIE_ERANGE, "eos_token_id");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"hidden_act\":\"gelu\"}"),
               PIE_EUNSUPPORTED, "hidden_act");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"attention_bias\":true}"),
               PIE_EUNSUPPORTED, "attention_bias");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"mistral\"," BASE
                         ",\"sliding_window\":1024}"),
               PIE_EUNSUPPORTED, "sliding_window");
    CHECK_OK(cfg_parse("{\"model_type\":\"mistral\"," BASE
                       ",\"sliding_window\":null}"));
    EXPECT_ERR(cfg_parse("{\"model_type\":\"qwen2\"," BASE
                         ",\"use_sliding_window\":true}"),
               PIE_EUNSUPPORTED, "use_sliding_window");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"tie_word_embeddings\":1}"),
               PIE_EFORMAT, "tie_word_embeddings");
    EXPECT_ERR(cfg_parse("{\"model_type\":\"llama\"," BASE
                         ",\"head_dim\":15}"), PIE_ERANGE, "even");
    EXPECT_ERR(cfg_parse("[]"), PIE_EFORMAT, "not a JSON object");
    EXPECT_ERR(cfg_parse("{\"model_type\":"), PIE_EFORMAT, "not valid JSON");
    EXPECT_ERR(cfg_parse(""), PIE_EFORMAT, "cfg.json");
#undef BASE
}

static void test_generation_config(void)
{
    printf("generation_config.json:\n");
    char *dir = copy_stories();
    const char *g = "{\"eos_token_id\":[2,7]}";
    file_write(dir, "generation_config.json", g, strlen(g));
    pie_model *m = NULL;
    CHECK_OK(pie_model_load(dir, NULL, NULL, &m));
    CHECK(m->cfg.n_eos == 2 && m->cfg.eos_ids[0] == 2 &&
          m->cfg.eos_ids[1] == 7, "eos merged: n=%d", m->cfg.n_eos);
    pie_model_free(m);
    g = "{\"eos_token_id\":\"x\"}";
    file_write(dir, "generation_config.json", g, strlen(g));
    EXPECT_ERR(load_dir(dir), PIE_ERANGE, "generation_config.json");
    g = "{";
    file_write(dir, "generation_config.json", g, strlen(g));
    EXPECT_ERR(load_dir(dir), PIE_EFORMAT, "generation_config.json");
    tmpdir_rm(dir);
}

/* A broken tokenizer.json fails the load (no half-built model). */
static void test_bad_tokenizer(void)
{
    printf("tokenizer.json:\n");
    char *dir = copy_stories();
    const char *t = "{\"model\": ";
    file_write(dir, "tokenizer.json", t, strlen(t));
    int rc = load_dir(dir);
    CHECK(rc < 0, "a corrupt tokenizer.json must fail the load");
    CHECK(strstr(pie_err_msg(), "tokenizer") != NULL,
          "message '%s' should name the tokenizer", pie_err_msg());
    printf("  ok %-14s %s\n", pie_err_name(rc), pie_err_msg());
    tmpdir_rm(dir);
}

/*
 * Every file the loader reads, replaced by a named pipe: opening a FIFO for
 * reading blocks until a writer appears, so this used to hang the load
 * forever. It must fail at once, naming the file. A watchdog alarm turns a
 * hang into a failure.
 */
static void test_fifos(void)
{
    printf("FIFOs in the model directory:\n");
    const char *names[] = { "config.json", "generation_config.json",
                            "model.safetensors.index.json",
                            "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json" };
    const char *src = test_shared_path("models/stories260K");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *dir = copy_stories(), path[1024];
        const char *extra[] = { "generation_config.json", "tokenizer.json",
                                "tokenizer_config.json" };
        for (int k = 0; k < 3; k++) {
            size_t n;
            snprintf(path, sizeof path, "%s/%s", src, extra[k]);
            char *t = file_slurp(path, &n);
            file_write(dir, extra[k], t, n);
            free(t);
        }
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
        CHECK(mkfifo(path, 0600) == 0, "mkfifo %s", path);
        test_watchdog(names[i], 10);
        EXPECT_ERR(load_dir(dir), PIE_EIO, names[i], "not a regular file");
        test_watchdog_off();
        tmpdir_rm(dir);
    }
}

int main(void)
{
    test_safetensors_headers();
    test_configs();
    test_checkpoint_files();
    test_index_files();
    test_generation_config();
    test_bad_tokenizer();
    test_fifos();
    EXPECT_ERR(load_dir("random:nosuch"), PIE_ENOTFOUND, "nosuch");
    TEST_DONE();
}
