/*
 * config.c — config.json / generation_config.json into pie_model_config.
 *
 * The architecture comes from "model_type" (or, when absent, the first of
 * "architectures"): llama, mistral, qwen2, qwen3. Each family's defaults
 * follow transformers' config classes: num_key_value_heads = heads,
 * head_dim = hidden / heads, rope_theta 10000, max_position_embeddings 2048,
 * rms_norm_eps 1e-6, untied embeddings; qwen2 always has q/k/v bias and
 * qwen3 always has q/k RMSNorm. Features pie does not implement (other RoPE
 * scalings, o_proj/MLP biases, other activations, sliding windows, incl.
 * mistral's sliding_window when it is below the context length) are
 * refused with PIE_EUNSUPPORTED rather than silently computed wrong.
 *
 * Every number is range-checked so later layers can multiply dimensions
 * without overflow: dims <= 2^20, vocab <= 2^24, layers <= PIE_MAX_LAYERS.
 */
#include <jansson.h>
#include <math.h>
#include <string.h>

#include "common/pie_err.h"
#include "model/model_internal.h"

#define MAX_DIM   (1 << 20)
#define MAX_VOCAB (1 << 24)

static const struct {
    const char *hf;     /* architectures[] entry */
    const char *arch;   /* model_type            */
} ARCHS[] = {
    { "LlamaForCausalLM", "llama" },
    { "MistralForCausalLM", "mistral" },
    { "Qwen2ForCausalLM", "qwen2" },
    { "Qwen3ForCausalLM", "qwen3" },
};
#define N_ARCHS (sizeof ARCHS / sizeof ARCHS[0])

static int arch_parse(const json_t *root, const char *what,
                      pie_model_config *cfg)
{
    const json_t *mt = json_object_get(root, "model_type");
    const json_t *as = json_object_get(root, "architectures");
    const char *name = NULL;
    if (json_is_string(mt)) {
        name = json_string_value(mt);
        for (size_t i = 0; i < N_ARCHS; i++)
            if (!strcmp(name, ARCHS[i].arch)) {
                snprintf(cfg->arch, sizeof cfg->arch, "%s", ARCHS[i].arch);
                return 0;
            }
    } else if (json_is_array(as) && json_is_string(json_array_get(as, 0))) {
        name = json_string_value(json_array_get(as, 0));
        for (size_t i = 0; i < N_ARCHS; i++)
            if (!strcmp(name, ARCHS[i].hf)) {
                snprintf(cfg->arch, sizeof cfg->arch, "%s", ARCHS[i].arch);
                return 0;
            }
    } else {
        return pie_err_set(PIE_ENOTFOUND, "%s: no \"model_type\" or "
                           "\"architectures\" field", what);
    }
    return pie_err_set(PIE_EUNSUPPORTED, "%s: unsupported architecture '%.64s'"
                       " (pie runs llama, mistral, qwen2, qwen3)", what, name);
}

/*
 * Reads integer field key into *v. Absent or null: *v = def, or an error
 * when def < 0 (required). Must lie in [lo, hi].
 */
static int get_int(const json_t *root, const char *key, int64_t def,
                   int64_t lo, int64_t hi, const char *what, int32_t *v)
{
    const json_t *j = json_object_get(root, key);
    int64_t x;
    if (!j || json_is_null(j)) {
        if (def < 0)
            return pie_err_set(PIE_ENOTFOUND, "%s: missing required field "
                               "\"%s\"", what, key);
        x = def;
    } else if (json_is_integer(j)) {
        x = json_integer_value(j);
    } else {
        return pie_err_set(PIE_EFORMAT, "%s: \"%s\" must be an integer",
                           what, key);
    }
    if (x < lo || x > hi)
        return pie_err_set(PIE_ERANGE, "%s: \"%s\" = %lld is out of range "
                           "[%lld, %lld]", what, key, (long long)x,
                           (long long)lo, (long long)hi);
    *v = (int32_t)x;
    return 0;
}

/* A finite number field in (lo, hi); def when absent or null (required
 * when def is NaN). */
static int get_num(const json_t *root, const char *key, double def,
                   double lo, double hi, const char *what, float *v)
{
    const json_t *j = json_object_get(root, key);
    double x = def;
    if ((!j || json_is_null(j)) && isnan(def))
        return pie_err_set(PIE_ENOTFOUND, "%s: missing required field "
                           "\"%s\"", what, key);
    if (j && !json_is_null(j)) {
        if (!json_is_number(j))
            return pie_err_set(PIE_EFORMAT, "%s: \"%s\" must be a number",
                               what, key);
        x = json_number_value(j);
    }
    /* checked after rounding to float: 1e-76 is positive, its float not */
    float f = (float)x;
    if (!isfinite(f) || !(f > lo) || !(f < hi))
        return pie_err_set(PIE_ERANGE, "%s: \"%s\" = %g is out of range "
                           "(%g, %g) in single precision", what, key, x, lo,
                           hi);
    *v = f;
    return 0;
}

static int get_bool(const json_t *root, const char *key, bool def,
                    const char *what, bool *v)
{
    const json_t *j = json_object_get(root, key);
    if (!j || json_is_null(j)) {
        *v = def;
        return 0;
    }
    if (!json_is_boolean(j))
        return pie_err_set(PIE_EFORMAT, "%s: \"%s\" must be true or false",
                           what, key);
    *v = json_is_true(j);
    return 0;
}

static int rope_scaling_parse(const json_t *root, const char *what,
                              pie_model_config *cfg)
{
    const json_t *rs = json_object_get(root, "rope_scaling");
    cfg->rope_llama3 = false;
    if (!rs || json_is_null(rs)) return 0;
    if (!json_is_object(rs))
        return pie_err_set(PIE_EFORMAT, "%s: \"rope_scaling\" must be an "
                           "object or null", what);
    const json_t *ty = json_object_get(rs, "rope_type");
    if (!ty) ty = json_object_get(rs, "type");
    if (!json_is_string(ty))
        return pie_err_set(PIE_EFORMAT, "%s: rope_scaling needs a "
                           "\"rope_type\" string", what);
    const char *t = json_string_value(ty);
    if (!strcmp(t, "default")) return 0;
    if (strcmp(t, "llama3"))
        return pie_err_set(PIE_EUNSUPPORTED, "%s: unsupported rope_scaling "
                           "type '%.32s' (pie supports llama3)", what, t);
    cfg->rope_llama3 = true;
    int rc;
    if ((rc = get_num(rs, "factor", NAN, 0, 1e6, what, &cfg->rope_factor)) ||
        (rc = get_num(rs, "low_freq_factor", NAN, 0, 1e6, what,
                      &cfg->rope_low_freq_factor)) ||
        (rc = get_num(rs, "high_freq_factor", NAN, 0, 1e6, what,
                      &cfg->rope_high_freq_factor)) ||
        (rc = get_int(rs, "original_max_position_embeddings", -1, 1,
                      1 << 30, what, &cfg->rope_orig_max_pos)))
        return pie_err_wrap(rc, "rope_scaling");
    if (!(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor))
        return pie_err_set(PIE_ERANGE, "%s: rope_scaling high_freq_factor "
                           "(%g) must exceed low_freq_factor (%g)", what,
                           cfg->rope_high_freq_factor,
                           cfg->rope_low_freq_factor);
    return 0;
}

/* Token id field (int, list of ints or null) into ids[*n] (appending,
 * without duplicates). */
static int ids_parse(const json_t *j, const char *key, const char *what,
                     int32_t vocab, int32_t *ids, int32_t *n, int32_t cap)
{
    if (!j || json_is_null(j)) return 0;
    size_t cnt = json_is_array(j) ? json_array_size(j) : 1;
    for (size_t i = 0; i < cnt; i++) {
        const json_t *e = json_is_array(j) ? json_array_get(j, i) : j;
        if (!json_is_integer(e) || json_integer_value(e) < 0 ||
            json_integer_value(e) >= vocab)
            return pie_err_set(PIE_ERANGE, "%s: \"%s\" must be token ids in "
                               "[0, %d)", what, key, vocab);
        int32_t id = (int32_t)json_integer_value(e);
        bool dup = false;
        for (int32_t k = 0; k < *n; k++) dup |= ids[k] == id;
        if (dup) continue;
        if (*n >= cap)
            return pie_err_set(PIE_ERANGE, "%s: more than %d ids in \"%s\"",
                               what, cap, key);
        ids[(*n)++] = id;
    }
    return 0;
}

static int bos_eos_parse(const json_t *root, const char *what,
                         pie_model_config *cfg)
{
    int32_t n = 0, bos = -1;
    int rc = ids_parse(json_object_get(root, "bos_token_id"), "bos_token_id",
                       what, cfg->vocab_size, &bos, &n, 1);
    if (rc) return rc;
    if (n) cfg->bos_id = bos;
    return ids_parse(json_object_get(root, "eos_token_id"), "eos_token_id",
                     what, cfg->vocab_size, cfg->eos_ids, &cfg->n_eos,
                     PIE_MAX_EOS);
}

/* Refuses options that would change the math in ways pie does not do. */
static int features_check(const json_t *root, const char *what,
                          pie_model_config *cfg)
{
    const json_t *act = json_object_get(root, "hidden_act");
    if (act && !json_is_null(act) &&
        (!json_is_string(act) || strcmp(json_string_value(act), "silu")))
        return pie_err_set(PIE_EUNSUPPORTED, "%s: hidden_act must be "
                           "\"silu\"", what);
    bool attn_bias = false, mlp_bias = false, sliding = false;
    int rc;
    if ((rc = get_bool(root, "attention_bias", false, what, &attn_bias)) ||
        (rc = get_bool(root, "mlp_bias", false, what, &mlp_bias)) ||
        (rc = get_bool(root, "use_sliding_window", false, what, &sliding)))
        return rc;
    if (attn_bias || mlp_bias)
        return pie_err_set(PIE_EUNSUPPORTED, "%s: attention_bias/mlp_bias "
                           "(o_proj or MLP biases) are not supported", what);
    if (sliding)
        return pie_err_set(PIE_EUNSUPPORTED, "%s: use_sliding_window is not "
                           "supported", what);
    /* mistral applies sliding_window whenever it is set (no switch) */
    const json_t *sw = json_object_get(root, "sliding_window");
    if (!strcmp(cfg->arch, "mistral") && json_is_integer(sw) &&
        json_integer_value(sw) < cfg->max_pos)
        return pie_err_set(PIE_EUNSUPPORTED, "%s: mistral sliding_window %lld "
                           "(< max_position_embeddings %d) is not supported",
                           what, (long long)json_integer_value(sw),
                           cfg->max_pos);
    cfg->qkv_bias = !strcmp(cfg->arch, "qwen2");
    cfg->qk_norm = !strcmp(cfg->arch, "qwen3");
    return 0;
}

static int dims_parse(const json_t *root, const char *what,
                      pie_model_config *cfg)
{
    int rc;
    if ((rc = get_int(root, "hidden_size", -1, 1, MAX_DIM, what, &cfg->dim)) ||
        (rc = get_int(root, "intermediate_size", -1, 1, MAX_DIM, what,
                      &cfg->hidden_dim)) ||
        (rc = get_int(root, "num_hidden_layers", -1, 1, PIE_MAX_LAYERS, what,
                      &cfg->n_layers)) ||
        (rc = get_int(root, "num_attention_heads", -1, 1, 4096, what,
                      &cfg->n_heads)) ||
        (rc = get_int(root, "num_key_value_heads", cfg->n_heads, 1, 4096,
                      what, &cfg->n_kv_heads)) ||
        (rc = get_int(root, "vocab_size", -1, 1, MAX_VOCAB, what,
                      &cfg->vocab_size)) ||
        (rc = get_int(root, "max_position_embeddings", 2048, 1, 1 << 30, what,
                      &cfg->max_pos)))
        return rc;
    if (!json_object_get(root, "head_dim") && cfg->dim % cfg->n_heads)
        return pie_err_set(PIE_ERANGE, "%s: hidden_size %d is not divisible "
                           "by num_attention_heads %d", what, cfg->dim,
                           cfg->n_heads);
    if ((rc = get_int(root, "head_dim", cfg->dim / cfg->n_heads, 2, 4096,
                      what, &cfg->head_dim)))
        return rc;
    if (cfg->head_dim % 2)
        return pie_err_set(PIE_ERANGE, "%s: head_dim %d must be even for "
                           "RoPE", what, cfg->head_dim);
    if (cfg->n_heads % cfg->n_kv_heads)
        return pie_err_set(PIE_ERANGE, "%s: num_attention_heads %d is not a "
                           "multiple of num_key_value_heads %d", what,
                           cfg->n_heads, cfg->n_kv_heads);
    if ((int64_t)cfg->n_heads * cfg->head_dim > MAX_DIM)
        return pie_err_set(PIE_ERANGE, "%s: num_attention_heads * head_dim "
                           "too large", what);
    return 0;
}

static pie_dtype dtype_parse(const json_t *root)
{
    const json_t *j = json_object_get(root, "torch_dtype");
    if (!json_is_string(j)) j = json_object_get(root, "dtype");
    const char *s = json_is_string(j) ? json_string_value(j) : "";
    if (!strcmp(s, "float32")) return PIE_DT_F32;
    if (!strcmp(s, "float16")) return PIE_DT_F16;
    return PIE_DT_BF16;
}

int pie_model_config_parse(const char *json, size_t len, const char *what,
                           pie_model_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->bos_id = -1;
    json_error_t jerr;
    json_t *root = json_loadb(json, len, 0, &jerr);
    if (!root)
        return pie_err_set(PIE_EFORMAT, "%s: not valid JSON: %s (line %d)",
                           what, jerr.text, jerr.line);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = pie_err_set(PIE_EFORMAT, "%s: not a JSON object", what);
        goto out;
    }
    if ((rc = arch_parse(root, what, cfg)) ||
        (rc = dims_parse(root, what, cfg)) ||
        (rc = get_num(root, "rms_norm_eps", 1e-6, 0, 1, what,
                      &cfg->norm_eps)) ||
        (rc = get_num(root, "rope_theta", 10000, 0, 1e12, what,
                      &cfg->rope_theta)) ||
        (rc = rope_scaling_parse(root, what, cfg)) ||
        (rc = get_bool(root, "tie_word_embeddings", false, what,
                       &cfg->tie_embeddings)) ||
        (rc = features_check(root, what, cfg)) ||
        (rc = bos_eos_parse(root, what, cfg)))
        goto out;
    cfg->dtype = dtype_parse(root);
out:
    json_decref(root);
    return rc;
}

int pie__generation_config_merge(const char *json, size_t len,
                                 const char *what, pie_model_config *cfg)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, 0, &jerr);
    if (!root)
        return pie_err_set(PIE_EFORMAT, "%s: not valid JSON: %s (line %d)",
                           what, jerr.text, jerr.line);
    int rc = json_is_object(root)
                 ? bos_eos_parse(root, what, cfg)
                 : pie_err_set(PIE_EFORMAT, "%s: not a JSON object", what);
    json_decref(root);
    return rc;
}
