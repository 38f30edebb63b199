/* common.c — helpers shared by the CLI subcommands (see cli.h). */
#include "cli/cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/pie_err.h"

double pie_cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Terminal: one rewritten line; otherwise a plain line per 25%. */
static void progress(void *user, const char *what, uint64_t done,
                     uint64_t total)
{
    int *last = user;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (isatty(STDERR_FILENO)) {
        fprintf(stderr, "\rloading %s %3d%%", what, pct);
        if (done >= total) fprintf(stderr, "\n");
    } else if (pct / 25 != *last / 25 || done >= total) {
        if (pct != *last) fprintf(stderr, "loading %s %d%%\n", what, pct);
    }
    *last = pct;
}

int pie_cli_load_model(const char *path, pie_model **out)
{
    int last = -1;
    if (!path || !*path) {
        fprintf(stderr, "pie: no model given (use --model DIR or "
                        "PIE_MODEL=DIR)\n");
        return -1;
    }
    int rc = pie_model_load(path, progress, &last, out);
    if (rc != 0) {
        fprintf(stderr, "pie: cannot load model %s: %s\n", path, pie_err_msg());
        return -1;
    }
    return 0;
}

int pie_cli_backend(const char *which, const pie_model *m, int page_size,
                    int n_pages, int threads, const pie_cli_gpu *g,
                    pie_backend **out)
{
    const pie_cli_gpu dflt = PIE_CLI_GPU_DEFAULT;
    if (!g) g = &dflt;
    pie_backend_opts o = { .page_size = page_size, .n_pages = n_pages,
                           .n_threads = threads,
                           .mem_fraction = g->mem_fraction,
                           .device = g->device };
    int rc;
    if (!which || !strcmp(which, "auto"))
        which = pie_backend_cuda_available() ? "cuda" : "cpu";
    if (!strcmp(which, "cpu"))
        rc = pie_backend_cpu_create(m, &o, out);
    else if (!strcmp(which, "cuda"))
        rc = pie_backend_cuda_create(m, &o, out);
    else {
        fprintf(stderr, "pie: unknown backend '%s' (cpu, cuda, auto)\n", which);
        return PIE_EINVAL;
    }
    if (rc != 0) {
        fprintf(stderr, "pie: cannot start %s backend: %s\n", which,
                pie_err_msg());
        return rc < 0 ? rc : PIE_EINVAL;
    }
    double mib = (double)(*out)->n_pages * (double)(*out)->page_bytes /
                 1048576.0;
    if (!strcmp(which, "cuda"))
        fprintf(stderr, "pie: cuda backend on GPU %d: KV pool of %d pages "
                "of %d tokens (%.2f %s)\n", g->device, (*out)->n_pages,
                (*out)->page_size, mib >= 1024 ? mib / 1024 : mib,
                mib >= 1024 ? "GiB" : "MiB");
    return 0;
}

int pie_cli_parse_ids(const char *s, int32_t **ids, size_t *n)
{
    size_t cap = 16, k = 0;
    int32_t *v = malloc(cap * sizeof *v);
    while (v && *s) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (end == s || errno || x < 0 || x > 0x7fffffff) {
            free(v);
            return -1;
        }
        if (k == cap) {
            int32_t *nv = realloc(v, (cap *= 2) * sizeof *v);
            if (!nv) { free(v); return -1; }
            v = nv;
        }
        v[k++] = (int32_t)x;
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    if (!v || k == 0) { free(v); return -1; }
    *ids = v;
    *n = k;
    return 0;
}

int pie_cli_check_int(const char *cmd, const char *name, int64_t v,
                      int64_t lo, int64_t hi)
{
    if (v >= lo && v <= hi) return 0;
    fprintf(stderr, "pie %s: --%s must be %lld..%lld (got %lld)\n", cmd, name,
            (long long)lo, (long long)hi, (long long)v);
    return -1;
}

static int check_gpu(const char *cmd, const pie_cli_gpu *g)
{
    if (pie_cli_check_int(cmd, "gpu", g->device, 0, PIE_CLI_MAX_GPU))
        return -1;
    if (g->mem_fraction > 0 && g->mem_fraction <= 1) return 0;
    fprintf(stderr, "pie %s: --gpu-memory must be in (0, 1] (got %g)\n", cmd,
            (double)g->mem_fraction);
    return -1;
}

int pie_cli_check_backend_opts(const char *cmd, int page_size, int threads,
                               const pie_cli_gpu *g)
{
    if (pie_cli_check_int(cmd, "page-size", page_size, 1,
                          PIE_CLI_MAX_PAGE_SIZE) ||
        pie_cli_check_int(cmd, "threads", threads, 0, PIE_CLI_MAX_THREADS))
        return -1;
    return check_gpu(cmd, g);
}
