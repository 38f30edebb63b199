/*
 * model_internal.h — helpers shared by the files of pie_model (not public).
 */
#ifndef PIE_MODEL_INTERNAL_H
#define PIE_MODEL_INTERNAL_H

#include <stddef.h>
#include <sys/stat.h>

#include "model/model.h"

/*
 * Reads a whole file of at most max bytes into a malloc'ed, NUL-terminated
 * buffer. Returns PIE_ENOTFOUND when it does not exist, PIE_EIO / PIE_ERANGE
 * otherwise; messages name the path.
 */
int pie__file_read(const char *path, size_t max, char **buf, size_t *len);
/*
 * Opens path read-only for a file descriptor, refusing anything but a
 * regular file (a FIFO, device or directory) without blocking on it.
 * Returns the fd (the caller closes it; sb filled) or a negative PIE_E…
 * code: PIE_ENOTFOUND when path does not exist, PIE_EIO otherwise.
 */
int pie__open_regular(const char *path, struct stat *sb);
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
