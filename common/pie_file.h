/*
 * pie_file.h — reading a whole file safely, for the loaders of untrusted
 * files (checkpoints, tokenizers, saved KV exports): never blocks on a FIFO,
 * refuses anything but a regular file, and checks the size before
 * allocating for it.
 */
#ifndef PIE_FILE_H
#define PIE_FILE_H

#include <stddef.h>
#include <sys/stat.h>

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

#endif
