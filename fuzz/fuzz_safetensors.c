/*
 * fuzz_safetensors.c — libFuzzer harness for the safetensors parser.
 *
 * Parses the input as a whole safetensors file; on success reads every
 * tensor's first and last element, so a view outside the buffer shows up
 * under ASan.
 */
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pie_safetensors *st = NULL;
    if (pie_safetensors_parse(data, size, "fuzz.safetensors", &st) != 0)
        return 0;
    volatile float sink = 0;
    for (int32_t i = 0; i < st->n_tensors; i++) {
        const pie_st_tensor *s = &st->tensors[i];
        pie_tensor t = { s->dtype, s->ndim, { s->shape[0], s->shape[1],
                         s->shape[2], s->shape[3] }, s->data };
        int64_t n = pie_tensor_numel(&t);
        if (n > 0) sink += pie_tensor_get(&t, 0) + pie_tensor_get(&t, n - 1);
        if (pie_safetensors_find(st, s->name) != s) __builtin_trap();
    }
    (void)sink;
    pie_safetensors_free(st);
    return 0;
}
