/*
 * safetensors.h — memory-mapped safetensors files and sharded checkpoints.
 *
 * A safetensors file is
 *
 *   [8 bytes: N, little-endian u64][N bytes: JSON header][data section]
 *
 * The header maps tensor names to {"dtype", "shape", "data_offsets":[b,e]}
 * (offsets relative to the data section) plus an optional "__metadata__"
 * object of strings. pie_safetensors validates everything before handing out
 * a view: header length within the file, dtype supported (F32/F16/BF16),
 * shape non-negative with ndim <= 4, e - b == numel * dtype size, every
 * range inside the data section, and no two ranges overlapping.
 *
 * A checkpoint (pie_checkpoint) is a directory holding either one
 * model.safetensors or a model.safetensors.index.json whose "weight_map"
 * names the shard file of each tensor. Tensor views point into the shards'
 * mappings and stay valid until the checkpoint is freed.
 */
#ifndef PIE_SAFETENSORS_H
#define PIE_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

/* Header sizes above this are rejected (the format's own limit is 100 MB). */
#define PIE_ST_MAX_HEADER (100u << 20)

typedef struct pie_st_tensor {
    char        *name;
    pie_dtype    dtype;
    int32_t      ndim;
    int64_t      shape[4];
    uint64_t     begin, end;   /* byte range within the data section      */
    const void  *data;         /* data section + begin                     */
} pie_st_tensor;

typedef struct pie_safetensors {
    char           *path;      /* file name used in error messages         */
    const uint8_t  *base;      /* whole file: mapping or caller's buffer   */
    size_t          size;
    bool            mapped;    /* base is ours to munmap                   */
    const uint8_t  *data;      /* base + 8 + header length                 */
    uint64_t        data_size;
    pie_st_tensor  *tensors;   /* sorted by name                           */
    int32_t         n_tensors;
} pie_safetensors;

/* Maps and validates a file. *out is freed with pie_safetensors_free(). */
int  pie_safetensors_open(const char *path, pie_safetensors **out);
/*
 * Validates a buffer that holds a whole safetensors file; views point into
 * buf, which must outlive *out. `what` names the buffer in messages.
 */
int  pie_safetensors_parse(const void *buf, size_t len, const char *what,
                           pie_safetensors **out);
void pie_safetensors_free(pie_safetensors *st);
/* The tensor called name, or NULL. */
const pie_st_tensor *pie_safetensors_find(const pie_safetensors *st,
                                          const char *name);
/* Size in bytes of one element of dt. */
size_t pie_dtype_size(pie_dtype dt);
const char *pie_dtype_name(pie_dtype dt);

typedef struct pie_checkpoint {
    char             *dir;
    pie_safetensors **files;     /* n_files shards                          */
    int32_t           n_files;
    void             *weight_map; /* json_t*: name -> shard index; NULL if
                                     there is a single file                 */
    uint64_t          total_bytes; /* sum of the shards' data sections      */
} pie_checkpoint;

/* Opens dir/model.safetensors.index.json (preferred) or
 * dir/model.safetensors. */
int  pie_checkpoint_open(const char *dir, pie_checkpoint **out);
void pie_checkpoint_free(pie_checkpoint *ck);
/* Finds a tensor; *file (may be NULL) receives the shard's path. NULL if
 * absent. */
const pie_st_tensor *pie_checkpoint_find(const pie_checkpoint *ck,
                                         const char *name, const char **file);

#endif
