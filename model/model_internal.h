/*
 * model_internal.h — helpers shared by the files of pie_model (not public).
 */
#ifndef PIE_MODEL_INTERNAL_H
#define PIE_MODEL_INTERNAL_H

#include <stddef.h>
#include <sys/stat.h>

#include "common/pie_file.h"
#include "model/model.h"

/* Whether path exists (any file type). */
int pie__file_exists(const char *path);
/* malloc'ed "dir/name", or NULL. */
char *pie__path_join(const char *dir, const char *name);

/* Merges generation_config.json text into cfg (bos/eos ids). */
int pie__generation_config_merge(const char *json, size_t len,
                                 const char *what, pie_model_config *cfg);

/* Builds the "random:SHAPE" model named by shape (after "random:"). */
int pie__model_random(const char *shape, pie_progress_fn progress,
                      void *user, pie_model *m);
void pie__model_random_free(pie_model *m);

#endif
