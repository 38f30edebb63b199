/*
 * checkpoint.c — a checkpoint directory: one safetensors file or shards.
 *
 * Layout of a sharded checkpoint (Hugging Face):
 *
 *   model.safetensors.index.json  {"metadata": {...},
 *                                  "weight_map": {"tensor name": "shard file"}}
 *   model-00001-of-0000N.safetensors ...
 *
 * pie_checkpoint_open maps every shard the weight_map names (each once) and
 * builds its own name -> shard-index map, after checking that each listed
 * tensor really is in its shard. Shard names must be plain file names inside
 * the directory (no '/'), so a hostile index cannot point outside it.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "model/model_internal.h"
#include "model/safetensors.h"

#define INDEX_MAX (64u << 20)  /* largest index json we read */

char *pie__path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int pie__file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

void pie_checkpoint_free(pie_checkpoint *ck)
{
    if (!ck) return;
    for (int32_t i = 0; i < ck->n_files; i++)
        pie_safetensors_free(ck->files[i]);
    free(ck->files);
    json_decref(ck->weight_map);
    free(ck->dir);
    free(ck);
}

/* Index of the shard called file, opening it when first seen. */
static int shard_get(pie_checkpoint *ck, json_t *shards, const char *file,
                     int32_t *idx)
{
    json_t *j = json_object_get(shards, file);
    if (j) {
        *idx = (int32_t)json_integer_value(j);
        return 0;
    }
    if (!*file || strchr(file, '/') || !strcmp(file, ".") ||
        !strcmp(file, ".."))
        return pie_err_set(PIE_EFORMAT, "%s/model.safetensors.index.json: "
                           "shard name '%s' is not a file name in the "
                           "directory", ck->dir, file);
    pie_safetensors **nf = realloc(ck->files,
                                   sizeof *nf * (ck->n_files + 1));
    if (!nf) return pie_err_set(PIE_ENOMEM, "out of memory");
    ck->files = nf;
    char *path = pie__path_join(ck->dir, file);
    if (!path) return pie_err_set(PIE_ENOMEM, "out of memory");
    int rc = pie_safetensors_open(path, &ck->files[ck->n_files]);
    free(path);
    if (rc) return rc;
    ck->total_bytes += ck->files[ck->n_files]->data_size;
    *idx = ck->n_files++;
    return json_object_set_new(shards, file, json_integer(*idx))
               ? pie_err_set(PIE_ENOMEM, "out of memory") : 0;
}

/* Opens every shard named by the index json text. */
static int index_load(pie_checkpoint *ck, const char *ipath,
                      const char *text, size_t len)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return pie_err_set(PIE_EFORMAT, "%s: not valid JSON: %s (line %d)",
                           ipath, jerr.text, jerr.line);
    int rc = 0;
    json_t *shards = json_object();
    json_t *wm = json_object_get(root, "weight_map");
    ck->weight_map = json_object();
    if (!shards || !ck->weight_map) {
        rc = pie_err_set(PIE_ENOMEM, "out of memory");
        goto out;
    }
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        rc = pie_err_set(PIE_EFORMAT, "%s: needs a non-empty \"weight_map\" "
                         "object", ipath);
        goto out;
    }
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        int32_t idx = 0;
        if (!json_is_string(v)) {
            rc = pie_err_set(PIE_EFORMAT, "%s: weight_map['%s'] is not a "
                             "file name string", ipath, name);
            goto out;
        }
        if ((rc = shard_get(ck, shards, json_string_value(v), &idx)))
            goto out;
        if (!pie_safetensors_find(ck->files[idx], name)) {
            rc = pie_err_set(PIE_ENOTFOUND, "%s: weight_map puts tensor '%s' "
                             "in %s, which does not hold it", ipath, name,
                             ck->files[idx]->path);
            goto out;
        }
        if (json_object_set_new(ck->weight_map, name, json_integer(idx))) {
            rc = pie_err_set(PIE_ENOMEM, "out of memory");
            goto out;
        }
    }
out:
    json_decref(shards);
    json_decref(root);
    return rc;
}

int pie_checkpoint_open(const char *dir, pie_checkpoint **out)
{
    *out = NULL;
    int rc = PIE_ENOMEM;
    char *ipath = NULL, *text = NULL;
    size_t len;
    pie_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->dir = strdup(dir)) ||
        !(ipath = pie__path_join(dir, "model.safetensors.index.json"))) {
        pie_err_set(PIE_ENOMEM, "out of memory");
        goto err;
    }
    rc = pie__file_read(ipath, INDEX_MAX, &text, &len);
    if (rc == 0) {
        rc = index_load(ck, ipath, text, len);
    } else if (rc == PIE_ENOTFOUND) {
        free(ipath);
        if (!(ipath = pie__path_join(dir, "model.safetensors"))) {
            rc = pie_err_set(PIE_ENOMEM, "out of memory");
            goto err;
        }
        if (!(ck->files = calloc(1, sizeof *ck->files))) {
            rc = pie_err_set(PIE_ENOMEM, "out of memory");
            goto err;
        }
        rc = pie_safetensors_open(ipath, &ck->files[0]);
        if (rc == PIE_ENOTFOUND)
            pie_err_set(rc, "%s: no model.safetensors or "
                        "model.safetensors.index.json", dir);
        if (rc == 0) {
            ck->n_files = 1;
            ck->total_bytes = ck->files[0]->data_size;
        }
    }
    if (rc) goto err;
    free(text);
    free(ipath);
    *out = ck;
    return 0;
err:
    free(text);
    free(ipath);
    pie_checkpoint_free(ck);
    return rc;
}

const pie_st_tensor *pie_checkpoint_find(const pie_checkpoint *ck,
                                         const char *name, const char **file)
{
    int32_t idx = 0;
    if (ck->weight_map) {
        json_t *j = json_object_get(ck->weight_map, name);
        if (!j) return NULL;
        idx = (int32_t)json_integer_value(j);
    }
    const pie_st_tensor *t = pie_safetensors_find(ck->files[idx], name);
    if (t && file) *file = ck->files[idx]->path;
    return t;
}
