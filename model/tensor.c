/*
 * tensor.c — reading pie_tensor views of any dtype as float32.
 *
 * Views may sit at any byte offset in a mapped file (safetensors does not
 * promise alignment), so elements are read with memcpy, never through a
 * cast pointer.
 */
#include <math.h>
#include <string.h>

#include "model/model.h"

int64_t pie_tensor_numel(const pie_tensor *t)
{
    int64_t n = 1;
    for (int32_t i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

float pie_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {                        /* inf / NaN                */
        bits = sign | 0x7f800000u | man << 13;
    } else if (exp != 0) {                    /* normal                   */
        bits = sign | (exp + 112) << 23 | man << 13;
    } else if (man == 0) {                    /* signed zero              */
        bits = sign;
    } else {                                  /* subnormal: man * 2^-24   */
        float f = ldexpf((float)man, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t pie_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)      /* NaN: keep sign, quiet it */
        return (uint16_t)(u >> 16 | 0x0040);
    u += 0x7fff + ((u >> 16) & 1);            /* round to nearest even    */
    return (uint16_t)(u >> 16);
}

static inline float elem(const pie_tensor *t, int64_t i)
{
    const uint8_t *p = t->data;
    if (t->dtype == PIE_DT_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return t->dtype == PIE_DT_BF16 ? pie_bf16_to_f32(h) : pie_f16_to_f32(h);
}

float pie_tensor_get(const pie_tensor *t, int64_t i)
{
    return elem(t, i);
}

void pie_tensor_to_f32(const pie_tensor *t, int64_t off, int64_t n,
                       float *dst)
{
    if (t->dtype == PIE_DT_F32) {
        memcpy(dst, (const uint8_t *)t->data + 4 * off, (size_t)n * 4);
        return;
    }
    for (int64_t i = 0; i < n; i++) dst[i] = elem(t, off + i);
}
