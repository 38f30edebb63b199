/*
 * fuzz_config.c — libFuzzer harness for config.json parsing.
 *
 * On success the invariants the rest of pie relies on must hold; a
 * violation traps so the fuzzer reports it.
 */
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pie_model_config c;
    if (pie_model_config_parse((const char *)data, size, "fuzz.json", &c))
        return 0;
    if (c.dim <= 0 || c.hidden_dim <= 0 || c.n_heads <= 0 ||
        c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads || c.head_dim <= 0 ||
        c.head_dim % 2 || c.n_layers <= 0 || c.n_layers > PIE_MAX_LAYERS ||
        c.vocab_size <= 0 || c.n_eos < 0 || c.n_eos > PIE_MAX_EOS ||
        c.bos_id >= c.vocab_size || !(c.norm_eps > 0) || !(c.rope_theta > 0))
        __builtin_trap();
    for (int i = 0; i < c.n_eos; i++)
        if (c.eos_ids[i] < 0 || c.eos_ids[i] >= c.vocab_size)
            __builtin_trap();
    return 0;
}
