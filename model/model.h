/*
 * model.h — a Hugging Face model directory loaded into memory.
 *
 * A pie_model owns three things:
 *   cfg      the architecture numbers from config.json (+ generation_config.json)
 *   w        views of every weight tensor, in the checkpoint's own dtype;
 *            the bytes are memory-mapped from *.safetensors (or, for
 *            "random:SHAPE" models, malloc'ed and filled from a seed)
 *   tok      the tokenizer (NULL for random:SHAPE models)
 *
 * Tensor layout follows Hugging Face / PyTorch: a Linear weight is
 * (out_features, in_features), row-major. Backends convert the views into
 * their own format (CPU: float32; CUDA: bf16 on the device) and never write
 * through them.
 *
 * Architecture differences, all in cfg:
 *   llama/mistral  plain;  rope_scaling "llama3" -> cfg.rope_llama3
 *   qwen2          q/k/v bias           -> cfg.qkv_bias
 *   qwen3          per-head q/k RMSNorm -> cfg.qk_norm, explicit head_dim
 *   tied LM head   w.lm_head == w.tok_embed (same view)
 */
#ifndef PIE_MODEL_H
#define PIE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PIE_MAX_LAYERS 256
#define PIE_MAX_EOS    8

typedef enum { PIE_DT_F32 = 0, PIE_DT_F16 = 1, PIE_DT_BF16 = 2 } pie_dtype;

typedef struct pie_tensor {
    pie_dtype   dtype;
    int32_t     ndim;
    int64_t     shape[4];
    const void *data;      /* NULL when the tensor is absent (optional ones) */
} pie_tensor;

typedef struct pie_model_config {
    char    arch[32];          /* "llama" | "mistral" | "qwen2" | "qwen3"     */
    int32_t vocab_size;        /* rows of embedding / lm_head                */
    int32_t dim;               /* hidden_size                                */
    int32_t hidden_dim;        /* intermediate_size                          */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;          /* explicit or dim / n_heads                  */
    int32_t max_pos;           /* max_position_embeddings                    */
    float   rope_theta;
    float   norm_eps;          /* rms_norm_eps                               */
    bool    rope_llama3;       /* rope_scaling.rope_type == "llama3"         */
    float   rope_factor;       /* llama3 scaling parameters                  */
    float   rope_low_freq_factor;
    float   rope_high_freq_factor;
    int32_t rope_orig_max_pos;
    bool    tie_embeddings;
    bool    qkv_bias;          /* qwen2                                      */
    bool    qk_norm;           /* qwen3                                      */
    int32_t bos_id;            /* -1 if none                                 */
    int32_t eos_ids[PIE_MAX_EOS];
    int32_t n_eos;
    pie_dtype dtype;           /* dtype of the checkpoint's weights          */
} pie_model_config;

typedef struct pie_layer_weights {
    pie_tensor attn_norm;      /* (dim)                                      */
    pie_tensor wq;             /* (n_heads*head_dim, dim)                    */
    pie_tensor wk;             /* (n_kv_heads*head_dim, dim)                 */
    pie_tensor wv;             /* (n_kv_heads*head_dim, dim)                 */
    pie_tensor wo;             /* (dim, n_heads*head_dim)                    */
    pie_tensor bq, bk, bv;     /* (n_heads*head_dim), (kv..), (kv..) qwen2   */
    pie_tensor q_norm, k_norm; /* (head_dim) qwen3                           */
    pie_tensor ffn_norm;       /* (dim)                                      */
    pie_tensor w_gate;         /* (hidden_dim, dim)                          */
    pie_tensor w_up;           /* (hidden_dim, dim)                          */
    pie_tensor w_down;         /* (dim, hidden_dim)                          */
} pie_layer_weights;

typedef struct pie_model_weights {
    pie_tensor        tok_embed;  /* (vocab_size, dim)                       */
    pie_tensor        final_norm; /* (dim)                                   */
    pie_tensor        lm_head;    /* (vocab_size, dim); == tok_embed if tied */
    pie_layer_weights layers[PIE_MAX_LAYERS];
} pie_model_weights;

struct pie_tokenizer;

typedef struct pie_model {
    char                  *dir;   /* directory, or "random:SHAPE"            */
    pie_model_config       cfg;
    pie_model_weights      w;
    struct pie_tokenizer  *tok;   /* NULL for random models                  */
    void                  *priv;  /* loader-owned: mappings, buffers         */
} pie_model;

/* Progress callback for long loads: done/total in bytes; may be NULL. */
typedef void (*pie_progress_fn)(void *user, const char *what, uint64_t done,
                                uint64_t total);

/*
 * Loads a Hugging Face model directory, or builds a seeded random model when
 * path is "random:SHAPE" (stories15M, llama-3.2-1b, llama-3.1-8b; weights
 * N(0, 0.02), norms 1, dtype F32 for stories15M else BF16).
 * On error returns a negative code; pie_err_msg() names the file and problem.
 * The caller frees the model with pie_model_free().
 */
int  pie_model_load(const char *path, pie_progress_fn progress, void *user,
                    pie_model **out);
void pie_model_free(pie_model *m);

/* Parses config.json text into cfg (exposed for tests and the fuzzer). */
int  pie_model_config_parse(const char *json, size_t len, const char *what,
                            pie_model_config *cfg);

/* Element i of a tensor converted to float32 (any dtype). */
float pie_tensor_get(const pie_tensor *t, int64_t i);
/* Converts n elements starting at element off into dst (float32). */
void  pie_tensor_to_f32(const pie_tensor *t, int64_t off, int64_t n, float *dst);
int64_t pie_tensor_numel(const pie_tensor *t);

static inline float pie_bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
float    pie_f16_to_f32(uint16_t h);
uint16_t pie_f32_to_bf16(float f);   /* round to nearest even */

#endif
