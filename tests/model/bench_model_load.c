/*
 * bench_model_load.c — loads each model given on the command line and
 * prints wall time and peak RSS (a benchmark, not a test).
 *
 *   bench_model_load ../shared/models/stories260K random:llama-3.2-1b ...
 *
 * Each model is loaded in a child process so every peak RSS is its own.
 */
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "model/model.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int n_calls;
static void on_progress(void *user, const char *what, uint64_t done,
                        uint64_t total)
{
    n_calls++;
}

static int bench_one(const char *path)
{
    double t0 = now();
    pie_model *m = NULL;
    int rc = pie_model_load(path, on_progress, NULL, &m);
    double t1 = now();
    if (rc) {
        fprintf(stderr, "%s: %s\n", path, pie_err_msg());
        return 1;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    int64_t bytes = 0;
    const pie_model_config *c = &m->cfg;
    const pie_tensor *ts[] = { &m->w.tok_embed, &m->w.final_norm,
                               c->tie_embeddings ? NULL : &m->w.lm_head };
    for (int i = 0; i < 3; i++)
        if (ts[i]) bytes += pie_tensor_numel(ts[i]) * (ts[i]->dtype ? 2 : 4);
    for (int l = 0; l < c->n_layers; l++) {
        const pie_tensor *lt = &m->w.layers[l].attn_norm;
        for (int k = 0; k < (int)(sizeof(pie_layer_weights) /
                                  sizeof(pie_tensor)); k++)
            if (lt[k].data)
                bytes += pie_tensor_numel(&lt[k]) * (lt[k].dtype ? 2 : 4);
    }
    printf("%-40s load %7.3f s  weights %8.1f MB  peak RSS %8.1f MiB  "
           "progress calls %d  tokenizer %s\n", path, t1 - t0, bytes / 1e6,
           ru.ru_maxrss / 1024.0, n_calls, m->tok ? "yes" : "no");
    pie_model_free(m);
    return 0;
}

int main(int argc, char **argv)
{
    int bad = 0;
    for (int i = 1; i < argc; i++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            int rc = bench_one(argv[i]);
            fflush(stdout);
            _exit(rc);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        bad |= !WIFEXITED(st) || WEXITSTATUS(st);
    }
    return bad;
}
