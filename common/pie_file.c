/*
 * pie_file.c — see pie_file.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "common/pie_file.h"

int pie__open_regular(const char *path, struct stat *sb)
{
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer forever; the flag is cleared once we know it is a file. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return pie_err_set(errno == ENOENT ? PIE_ENOTFOUND : PIE_EIO,
                           "%s: cannot open: %s", path, strerror(errno));
    int fl;
    if (fstat(fd, sb) != 0 || !S_ISREG(sb->st_mode)) {
        close(fd);
        return pie_err_set(PIE_EIO, "%s: not a regular file", path);
    }
    if ((fl = fcntl(fd, F_GETFL)) < 0 ||
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        return pie_err_set(PIE_EIO, "%s: fcntl: %s", path, strerror(e));
    }
    return fd;
}

int pie__file_read(const char *path, size_t max, char **buf, size_t *len)
{
    *buf = NULL;
    *len = 0;
    struct stat sb;
    int fd = pie__open_regular(path, &sb);
    if (fd < 0) return fd;
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return pie_err_set(PIE_ENOMEM, "%s: out of memory", path);
    }
    if ((uint64_t)sb.st_size > max) {
        fclose(f);
        return pie_err_set(PIE_ERANGE, "%s: %lld bytes, larger than the %zu "
                           "allowed", path, (long long)sb.st_size, max);
    }
    size_t n = (size_t)sb.st_size;
    char *p = malloc(n + 1);
    if (!p) {
        fclose(f);
        return pie_err_set(PIE_ENOMEM, "%s: out of memory", path);
    }
    size_t got = fread(p, 1, n, f);
    fclose(f);
    if (got != n) {
        free(p);
        return pie_err_set(PIE_EIO, "%s: short read (%zu of %zu bytes)",
                           path, got, n);
    }
    p[n] = 0;
    *buf = p;
    *len = n;
    return 0;
}
