/*
 * test_model_tensor.c — dtype conversions against bit patterns worked out
 * from the IEEE 754 binary16 / bfloat16 definitions, and pie_tensor_get /
 * pie_tensor_to_f32 on unaligned views.
 */
#include <math.h>
#include <string.h>

#include "model/model.h"
#include "tests/test_util.h"

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_f16(void)
{
    struct { uint16_t h; float f; } cases[] = {
        { 0x0000, 0.0f }, { 0x3c00, 1.0f }, { 0xc000, -2.0f },
        { 0x3555, 0.333251953125f }, { 0x7bff, 65504.0f },
        { 0x0400, 6.103515625e-05f },            /* smallest normal   */
        { 0x0001, 5.9604644775390625e-08f },     /* smallest subnormal*/
        { 0x03ff, 6.097555160522461e-05f },      /* largest subnormal */
        { 0x8001, -5.9604644775390625e-08f },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float got = pie_f16_to_f32(cases[i].h);
        CHECK(got == cases[i].f, "f16 0x%04x: expected %.10g, got %.10g",
              cases[i].h, cases[i].f, got);
    }
    CHECK(bits(pie_f16_to_f32(0x8000)) == 0x80000000u, "-0");
    CHECK(isinf(pie_f16_to_f32(0x7c00)) && pie_f16_to_f32(0x7c00) > 0, "inf");
    CHECK(isinf(pie_f16_to_f32(0xfc00)) && pie_f16_to_f32(0xfc00) < 0, "-inf");
    CHECK(isnan(pie_f16_to_f32(0x7e00)) && isnan(pie_f16_to_f32(0x7c01)),
          "nan");
    /* exhaustive: every finite half equals man * 2^(exp-25) computed in
     * double */
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 0x1f) continue;
        double v = e ? ldexp(1024 + m, (int)e - 25) : ldexp(m, -24);
        if (h & 0x8000) v = -v;
        CHECK(pie_f16_to_f32((uint16_t)h) == (float)v,
              "f16 0x%04x: expected %.10g got %.10g", h, v,
              pie_f16_to_f32((uint16_t)h));
    }
}

static void test_bf16(void)
{
    CHECK(pie_f32_to_bf16(1.0f) == 0x3f80, "1.0");
    CHECK(pie_f32_to_bf16(-2.0f) == 0xc000, "-2.0");
    /* ties: 1 + 2^-8 is halfway between 0x3f80 and 0x3f81 -> even 0x3f80 */
    CHECK(pie_f32_to_bf16(from_bits(0x3f808000u)) == 0x3f80, "tie to even");
    CHECK(pie_f32_to_bf16(from_bits(0x3f818000u)) == 0x3f82, "tie to even up");
    CHECK(pie_f32_to_bf16(from_bits(0x3f808001u)) == 0x3f81, "above half");
    CHECK(pie_f32_to_bf16(from_bits(0x3f807fffu)) == 0x3f80, "below half");
    CHECK(pie_f32_to_bf16(from_bits(0x7f7fffffu)) == 0x7f80,
          "FLT_MAX rounds to inf");
    CHECK(pie_f32_to_bf16(INFINITY) == 0x7f80, "inf");
    CHECK(pie_f32_to_bf16(-INFINITY) == 0xff80, "-inf");
    /* NaN stays NaN, even with payload only in the low 16 bits */
    uint16_t n1 = pie_f32_to_bf16(from_bits(0x7f800001u));
    uint16_t n2 = pie_f32_to_bf16(from_bits(0xffc00000u));
    CHECK(isnan(pie_bf16_to_f32(n1)) && isnan(pie_bf16_to_f32(n2)),
          "NaN -> 0x%04x 0x%04x", n1, n2);
    CHECK(n2 & 0x8000, "NaN sign kept");
    /* round trip of every bf16 value that is not NaN */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue;
        CHECK(pie_f32_to_bf16(pie_bf16_to_f32((uint16_t)h)) == h,
              "bf16 round trip 0x%04x", h);
    }
}

static void test_views(void)
{
    /* F32 values at an odd address, as a mapped file may place them */
    uint8_t buf[1 + 6 * 4];
    float vals[6] = { 1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, -7.0f };
    memcpy(buf + 1, vals, sizeof vals);
    pie_tensor t = { PIE_DT_F32, 2, { 2, 3, 1, 1 }, buf + 1 };
    CHECK(pie_tensor_numel(&t) == 6, "numel %lld",
          (long long)pie_tensor_numel(&t));
    float out[6];
    pie_tensor_to_f32(&t, 1, 4, out);
    for (int i = 0; i < 4; i++)
        CHECK(out[i] == vals[i + 1], "f32 view[%d]", i + 1);
    CHECK(pie_tensor_get(&t, 5) == -7.0f, "get f32");
    uint16_t hb[3] = { 0x3f80, 0xc040, 0x0000 };   /* 1, -3, 0 */
    uint8_t hbuf[7];
    memcpy(hbuf + 1, hb, 6);
    pie_tensor b = { PIE_DT_BF16, 1, { 3, 1, 1, 1 }, hbuf + 1 };
    CHECK(pie_tensor_get(&b, 1) == -3.0f, "get bf16");
    uint16_t fh[2] = { 0x3c00, 0xc500 };           /* 1, -5 */
    pie_tensor h = { PIE_DT_F16, 1, { 2, 1, 1, 1 }, fh };
    pie_tensor_to_f32(&h, 0, 2, out);
    CHECK(out[0] == 1.0f && out[1] == -5.0f, "f16 view %g %g", out[0],
          out[1]);
    pie_tensor s = { PIE_DT_F32, 0, { 1, 1, 1, 1 }, vals };
    CHECK(pie_tensor_numel(&s) == 1, "scalar numel");
}

int main(void)
{
    test_f16();
    test_bf16();
    test_views();
    TEST_DONE();
}
