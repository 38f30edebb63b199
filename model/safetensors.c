/*
 * safetensors.c — validating safetensors parser and sharded checkpoints.
 *
 * Parsing happens once, up front: the JSON header is read with jansson into
 * an array of pie_st_tensor sorted by name (for bsearch), and a second array
 * of indices sorted by begin offset is used to prove that no two byte ranges
 * overlap. After that a view is a plain pointer into the file: nothing is
 * copied, and the page cache holds the weights (llama2.c style).
 *
 * A pie_checkpoint owns its shards. With an index json, weight_map is a
 * jansson object name -> integer shard index built while opening; every
 * name it lists is checked to exist in its shard, so a lookup never has to
 * report a dangling entry later.
 */
#include "model/model_internal.h"
#include "model/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/pie_err.h"

size_t pie_dtype_size(pie_dtype dt)
{
    return dt == PIE_DT_F32 ? 4 : 2;
}

const char *pie_dtype_name(pie_dtype dt)
{
    switch (dt) {
    case PIE_DT_F32: return "F32";
    case PIE_DT_F16: return "F16";
    case PIE_DT_BF16: return "BF16";
    }
    return "?";
}

static int dtype_parse(const char *s, pie_dtype *dt)
{
    if (!strcmp(s, "F32")) *dt = PIE_DT_F32;
    else if (!strcmp(s, "F16")) *dt = PIE_DT_F16;
    else if (!strcmp(s, "BF16")) *dt = PIE_DT_BF16;
    else return -1;
    return 0;
}

void pie_safetensors_free(pie_safetensors *st)
{
    if (!st) return;
    for (int32_t i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
    free(st->tensors);
    if (st->mapped && st->base) munmap((void *)st->base, st->size);
    free(st->path);
    free(st);
}

/* A JSON integer in [0, INT64_MAX] into *v; -1 if not. */
static int json_u64(const json_t *j, uint64_t *v)
{
    if (!json_is_integer(j) || json_integer_value(j) < 0) return -1;
    *v = (uint64_t)json_integer_value(j);
    return 0;
}

/* Fills t from one header entry; errors name the tensor and the file. */
static int tensor_parse(const pie_safetensors *st, const char *name,
                        const json_t *v, pie_st_tensor *t)
{
    const char *f = st->path;
    if (!json_is_object(v))
        return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': header entry is "
                           "not an object", f, name);
    const json_t *jd = json_object_get(v, "dtype");
    const json_t *js = json_object_get(v, "shape");
    const json_t *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo))
        return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': needs string "
                           "dtype, array shape and array data_offsets", f,
                           name);
    if (dtype_parse(json_string_value(jd), &t->dtype))
        return pie_err_set(PIE_EUNSUPPORTED, "%s: tensor '%s': unsupported "
                           "dtype '%s' (pie reads F32, F16, BF16)", f, name,
                           json_string_value(jd));
    size_t ndim = json_array_size(js);
    if (ndim > 4)
        return pie_err_set(PIE_EUNSUPPORTED, "%s: tensor '%s': %zu "
                           "dimensions (at most 4 supported)", f, name, ndim);
    t->ndim = (int32_t)ndim;
    uint64_t numel = 1;
    for (size_t i = 0; i < ndim; i++) {
        uint64_t d;
        if (json_u64(json_array_get(js, i), &d) || d > (1ull << 40))
            return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': shape[%zu] is "
                               "not a sane non-negative integer", f, name, i);
        t->shape[i] = (int64_t)d;
        if (__builtin_mul_overflow(numel, d, &numel) || numel > (1ull << 50))
            return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': element count "
                               "overflows", f, name);
    }
    for (size_t i = ndim; i < 4; i++) t->shape[i] = 1;
    if (json_array_size(jo) != 2 || json_u64(json_array_get(jo, 0), &t->begin)
        || json_u64(json_array_get(jo, 1), &t->end))
        return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': data_offsets must "
                           "be two non-negative integers", f, name);
    if (t->begin > t->end || t->end > st->data_size)
        return pie_err_set(PIE_ERANGE, "%s: tensor '%s': data_offsets [%llu, "
                           "%llu] outside the data section (%llu bytes)", f,
                           name, (unsigned long long)t->begin,
                           (unsigned long long)t->end,
                           (unsigned long long)st->data_size);
    uint64_t want = numel * pie_dtype_size(t->dtype);
    if (t->end - t->begin != want)
        return pie_err_set(PIE_EFORMAT, "%s: tensor '%s': data_offsets span "
                           "%llu bytes but %s shape needs %llu", f, name,
                           (unsigned long long)(t->end - t->begin),
                           pie_dtype_name(t->dtype), (unsigned long long)want);
    t->data = st->data + t->begin;
    t->name = strdup(name);
    return t->name ? 0 : pie_err_set(PIE_ENOMEM, "out of memory");
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const pie_st_tensor *)a)->name,
                  ((const pie_st_tensor *)b)->name);
}

/* qsort has no context argument in C11; the parser may run on several
 * threads at once, so the comparison's context is thread-local. */
static _Thread_local const pie_st_tensor *sort_base;
static int cmp_begin(const void *a, const void *b)
{
    const pie_st_tensor *x = &sort_base[*(const int32_t *)a];
    const pie_st_tensor *y = &sort_base[*(const int32_t *)b];
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Proves that no two non-empty byte ranges overlap. */
static int check_overlaps(const pie_safetensors *st)
{
    int32_t n = st->n_tensors;
    if (n < 2) return 0;
    int32_t *idx = malloc(sizeof *idx * n);
    if (!idx) return pie_err_set(PIE_ENOMEM, "out of memory");
    for (int32_t i = 0; i < n; i++) idx[i] = i;
    sort_base = st->tensors;
    qsort(idx, n, sizeof *idx, cmp_begin);
    int rc = 0;
    const pie_st_tensor *prev = NULL;
    for (int32_t i = 0; i < n && !rc; i++) {
        const pie_st_tensor *t = &st->tensors[idx[i]];
        if (t->begin == t->end) continue;
        if (prev && t->begin < prev->end)
            rc = pie_err_set(PIE_EFORMAT, "%s: tensors '%s' [%llu, %llu] and "
                             "'%s' [%llu, %llu] overlap", st->path, prev->name,
                             (unsigned long long)prev->begin,
                             (unsigned long long)prev->end, t->name,
                             (unsigned long long)t->begin,
                             (unsigned long long)t->end);
        prev = t;
    }
    free(idx);
    return rc;
}

/* Parses the JSON header of st (base/size/data already set). */
static int header_parse(pie_safetensors *st, const char *hdr, size_t n)
{
    json_error_t jerr;
    json_t *root = json_loadb(hdr, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return pie_err_set(PIE_EFORMAT, "%s: header is not valid JSON: %s "
                           "(header byte %d)", st->path, jerr.text,
                           jerr.position);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = pie_err_set(PIE_EFORMAT, "%s: header is not a JSON object",
                         st->path);
        goto out;
    }
    st->tensors = calloc(json_object_size(root) + 1, sizeof *st->tensors);
    if (!st->tensors) {
        rc = pie_err_set(PIE_ENOMEM, "out of memory");
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(v) && !json_is_null(v)) {
                rc = pie_err_set(PIE_EFORMAT, "%s: __metadata__ is not an "
                                 "object", st->path);
                goto out;
            }
            continue;
        }
        rc = tensor_parse(st, key, v, &st->tensors[st->n_tensors]);
        if (rc) goto out;
        st->n_tensors++;
    }
    qsort(st->tensors, st->n_tensors, sizeof *st->tensors, cmp_name);
    rc = check_overlaps(st);
out:
    json_decref(root);
    return rc;
}

/* Validates the framing of base/size and parses the header. */
static int st_init(pie_safetensors *st)
{
    if (st->size < 8)
        return pie_err_set(PIE_EFORMAT, "%s: file is %zu bytes, too short "
                           "for a safetensors header (truncated?)", st->path,
                           st->size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | st->base[i];
    if (n > PIE_ST_MAX_HEADER || n > st->size - 8)
        return pie_err_set(PIE_EFORMAT, "%s: header length %llu does not fit "
                           "in the %zu-byte file (truncated or not "
                           "safetensors)", st->path, (unsigned long long)n,
                           st->size);
    st->data = st->base + 8 + n;
    st->data_size = st->size - 8 - n;
    return header_parse(st, (const char *)st->base + 8, (size_t)n);
}

static pie_safetensors *st_new(const char *what)
{
    pie_safetensors *st = calloc(1, sizeof *st);
    if (st && !(st->path = strdup(what))) {
        free(st);
        st = NULL;
    }
    if (!st) pie_err_set(PIE_ENOMEM, "out of memory");
    return st;
}

int pie_safetensors_parse(const void *buf, size_t len, const char *what,
                          pie_safetensors **out)
{
    *out = NULL;
    pie_safetensors *st = st_new(what);
    if (!st) return PIE_ENOMEM;
    st->base = buf;
    st->size = len;
    int rc = st_init(st);
    if (rc) {
        pie_safetensors_free(st);
        return rc;
    }
    *out = st;
    return 0;
}

int pie_safetensors_open(const char *path, pie_safetensors **out)
{
    *out = NULL;
    pie_safetensors *st = st_new(path);
    if (!st) return PIE_ENOMEM;
    int rc = 0;
    struct stat sb;
    int fd = pie__open_regular(path, &sb);   /* never blocks on a FIFO */
    if (fd < 0) {
        rc = fd;
        goto err;
    }
    st->size = (size_t)sb.st_size;
    if (st->size > 0) {
        void *p = mmap(NULL, st->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            rc = pie_err_set(PIE_EIO, "%s: mmap failed: %s", path,
                             strerror(errno));
            goto err;
        }
        st->base = p;
        st->mapped = true;
    }
    close(fd);
    fd = -1;
    if ((rc = st_init(st))) goto err;
    *out = st;
    return 0;
err:
    if (fd >= 0) close(fd);
    pie_safetensors_free(st);
    return rc;
}

const pie_st_tensor *pie_safetensors_find(const pie_safetensors *st,
                                          const char *name)
{
    pie_st_tensor key = { .name = (char *)name };
    return bsearch(&key, st->tensors, st->n_tensors, sizeof key, cmp_name);
}
