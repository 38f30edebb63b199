/*
 * model_test_util.h — helpers for the model tests: temp dirs, file copies,
 * building safetensors bytes, and an independent stdio reader of tensor
 * elements used to check pie's views.
 */
#ifndef PIE_MODEL_TEST_UTIL_H
#define PIE_MODEL_TEST_UTIL_H

#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "tests/test_util.h"

static inline char *tmpdir_new(void)
{
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, sizeof buf[0], "/tmp/pie-model-test-XXXXXX");
    CHECK(mkdtemp(p) != NULL, "mkdtemp failed");
    return p;
}

static inline void tmpdir_rm(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "cannot remove %s", dir);
}

static inline void file_write(const char *dir, const char *name,
                              const void *p, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "cannot create %s", path);
    CHECK(fwrite(p, 1, n, f) == n, "short write to %s", path);
    fclose(f);
}

static inline char *file_slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)sz + 1);
    CHECK(p && fread(p, 1, (size_t)sz, f) == (size_t)sz, "read %s", path);
    p[sz] = 0;
    fclose(f);
    *n = (size_t)sz;
    return p;
}

/* Builds [u64 len][header][data] in a malloc'ed buffer. */
static inline uint8_t *st_build(const char *header, const void *data,
                                size_t data_len, size_t *n)
{
    size_t hl = strlen(header);
    *n = 8 + hl + data_len;
    uint8_t *p = calloc(1, *n + 1);
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(p + 8, header, hl);
    if (data_len) memcpy(p + 8 + hl, data, data_len);
    return p;
}

/*
 * Independent reference: element i of tensor name in the safetensors file
 * at path, read with stdio and converted by hand. Also returns the header's
 * shape (ndim, shape).
 */
static inline double ref_elem(const char *path, const char *name, int64_t i,
                              int *ndim, int64_t shape[4])
{
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "open %s", path);
    uint8_t lb[8];
    CHECK(fread(lb, 1, 8, f) == 8, "read %s", path);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | lb[k];
    char *h = malloc(hl + 1);
    CHECK(fread(h, 1, hl, f) == hl, "read header %s", path);
    json_t *root = json_loadb(h, hl, 0, NULL);
    CHECK(root != NULL, "reference parse of %s", path);
    json_t *t = json_object_get(root, name);
    CHECK(t != NULL, "reference: %s not in %s", name, path);
    const char *dt = json_string_value(json_object_get(t, "dtype"));
    json_t *sh = json_object_get(t, "shape");
    *ndim = (int)json_array_size(sh);
    for (int k = 0; k < *ndim; k++)
        shape[k] = json_integer_value(json_array_get(sh, k));
    long begin = (long)json_integer_value(
        json_array_get(json_object_get(t, "data_offsets"), 0));
    int sz = !strcmp(dt, "F32") ? 4 : 2;
    fseek(f, (long)(8 + hl) + begin + (long)i * sz, SEEK_SET);
    uint8_t b[4];
    CHECK(fread(b, 1, sz, f) == (size_t)sz, "read elem %s", name);
    double v;
    if (sz == 4) {
        uint32_t u = b[0] | b[1] << 8 | b[2] << 16 | (uint32_t)b[3] << 24;
        float x;
        memcpy(&x, &u, 4);
        v = x;
    } else {
        uint32_t u = (uint32_t)(b[0] | b[1] << 8) << 16;
        float x;
        memcpy(&x, &u, 4);
        CHECK(!strcmp(dt, "BF16"), "reference reader handles BF16/F32 only");
        v = x;
    }
    json_decref(root);
    free(h);
    fclose(f);
    return v;
}

#endif
