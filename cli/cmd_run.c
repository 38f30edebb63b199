/*
 * cmd_run.c — `pie run [OPTIONS] INFERLET [-- ARGS...]`: the whole engine
 * in one process (model, backend, control layer, inferlet runtime), one
 * inferlet (or -n N copies of it) launched with ARGS, and pie's exit status
 * taken from theirs.
 *
 * INFERLET is a .wasm path or the name of a bundled inferlet, looked up as
 * <dir of the pie executable>/inferlets/NAME.wasm (the build puts them
 * there) or under $PIE_INFERLET_DIR.
 *
 * Output: what an instance send()s to its client and writes to fd 1 goes to
 * standard output; its fd 2 and pie's diagnostics (a trap and its reason)
 * go to standard error. With one instance both stream as they come. With
 * -n N each instance's output is collected and printed whole, one block per
 * instance in launch order (a block is ended with a newline if it lacks
 * one), as soon as it and all instances before it have ended; stderr lines
 * are printed then too, prefixed with "[i] ".
 *
 * Exit status: with one instance its exit status when that is 0..255;
 * any other status (negative, or past 255, which a shell would cut to its
 * low byte: 256 would read as success) and a trap give 1, with a message
 * on stderr ("exited with status -1" or "trapped: <reason>": a trap is
 * told from an inferlet that returned PIE_ETRAP by on_exit's reason). With
 * -n N, 0 only if every instance exited with 0.
 */
#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "common/pie_err.h"
#include "common/pie_file.h"
#include "control/control.h"
#include "runtime/runtime.h"
#include "runtime/host_engine.h"

typedef struct run_buf {
    char   *p;
    size_t  len, cap;
    bool    oom;
} run_buf;

typedef struct run_inst {
    int32_t          idx;
    bool             stream;   /* write through instead of collecting    */
    bool             trapped;  /* on_exit saw a trap reason               */
    run_buf          out, err;
    pie_rt_instance *inst;
} run_inst;

static pthread_mutex_t stream_mu = PTHREAD_MUTEX_INITIALIZER;
static char stream_last = '\n';    /* last byte streamed to stdout       */

static void buf_add(run_buf *b, const void *p, size_t n)
{
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 256;
        while (nc < b->len + n) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void emit(run_inst *r, int fd, const void *p, size_t n)
{
    if (r->stream) {
        pthread_mutex_lock(&stream_mu);
        FILE *f = fd == 2 ? stderr : stdout;
        fwrite(p, 1, n, f);
        fflush(f);
        if (fd != 2 && n) stream_last = ((const char *)p)[n - 1];
        pthread_mutex_unlock(&stream_mu);
    } else {
        buf_add(fd == 2 ? &r->err : &r->out, p, n);
    }
}

static void on_output(void *user, pie_rt_instance *i, int fd, const char *buf,
                      size_t len)
{
    emit(user, fd == 2 ? 2 : 1, buf, len);
}

static void on_message(void *user, pie_rt_instance *i, const void *buf,
                       size_t len)
{
    emit(user, 1, buf, len);
}

/* The one place that tells a trap (reason set) from an inferlet whose exit
 * status happens to equal PIE_ETRAP; pie_rt_wait, which returns after this
 * ran, makes the flag visible to the waiting thread. */
static void on_exit_cb(void *user, pie_rt_instance *i, int32_t status,
                       const char *trap_reason, const void *ret, size_t len)
{
    ((run_inst *)user)->trapped = trap_reason != NULL;
}

#define RUN_MAX_WASM (256u << 20)    /* refuse larger modules               */

/* Resolves INFERLET to a file: a path as given, else a bundled name. A
 * path that does not fit cap is an error: cut short, it could name
 * another file. */
int pie_cli_resolve_inferlet(const char *name, char *path, size_t cap)
{
    size_t n = strlen(name);
    if (strchr(name, '/') || (n > 5 && !strcmp(name + n - 5, ".wasm"))) {
        if ((size_t)snprintf(path, cap, "%s", name) < cap) return 0;
        fprintf(stderr, "pie run: inferlet path too long (%zu bytes, at most "
                "%zu): %.40s...\n", n, cap - 1, name);
        return -1;
    }
    const char *dir = getenv("PIE_INFERLET_DIR");
    if (dir && *dir) {
        if ((size_t)snprintf(path, cap, "%s/%s.wasm", dir, name) >= cap) {
            fprintf(stderr, "pie run: PIE_INFERLET_DIR/%s.wasm is too long a "
                    "path (at most %zu bytes)\n", name, cap - 1);
            return -1;
        }
        if (access(path, R_OK) == 0) return 0;
    }
    if (n > 128) {
        fprintf(stderr, "pie run: inferlet name too long: %.40s...\n", name);
        return -1;
    }
    char exe[PATH_MAX - 160];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k > 0) {
        exe[k] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        if ((size_t)snprintf(path, cap, "%s/inferlets/%s.wasm", exe, name) <
                cap && access(path, R_OK) == 0)
            return 0;
    }
    fprintf(stderr, "pie run: no bundled inferlet '%s' (looked in %s%s"
            "<pie's directory>/inferlets); give a .wasm path\n", name,
            dir ? dir : "", dir ? " and " : "");
    return -1;
}

/* The module name used for launch(), and the served model's name: the
 * last component of path (trailing slashes ignored: "models/m/" is "m")
 * without ".wasm"; "default" if that leaves nothing ("/"). */
static void module_name(const char *path, char *out, size_t cap)
{
    size_t e = strlen(path);
    while (e > 0 && path[e - 1] == '/') e--;
    size_t s = e;
    while (s > 0 && path[s - 1] != '/') s--;
    size_t n = e - s;
    if (n > 5 && !strncmp(path + s + n - 5, ".wasm", 5)) n -= 5;
    if (n == 0) snprintf(out, cap, "default");
    else snprintf(out, cap, "%.*s", (int)n, path + s);
}

typedef struct run_args {
    const char *model, *backend, *cache_dir, *kv_dir, *policy;
    int         n, page_size, pages, threads, workers, max_pages, priority;
    int         max_export_pages;
    uint64_t    token_limit, max_output_bytes;
    float       cpu_limit, memory_limit_mb;
    pie_cli_gpu gpu;
} run_args;

/* Prints instance r's collected block and diagnostics; returns its exit
 * code: status if 0..255, else 1 (see the file's header). */
static int finish_instance(run_inst *r, int32_t status, const char *reason,
                           int n_total)
{
    if (!r->stream) {
        if (r->out.len) fwrite(r->out.p, 1, r->out.len, stdout);
        if (r->out.len && r->out.p[r->out.len - 1] != '\n') fputc('\n', stdout);
        fflush(stdout);
        for (size_t s = 0; s < r->err.len;) {
            size_t e = s;
            while (e < r->err.len && r->err.p[e] != '\n') e++;
            fprintf(stderr, "[%d] %.*s\n", r->idx, (int)(e - s), r->err.p + s);
            s = e + 1;
        }
        if (r->out.oom || r->err.oom)
            fprintf(stderr, "pie run: instance %d: output lost (out of "
                    "memory)\n", r->idx);
    }
    if (r->trapped) {
        if (n_total > 1)
            fprintf(stderr, "pie run: instance %d trapped: %s\n", r->idx,
                    reason[0] ? reason : "no reason given");
        else
            fprintf(stderr, "pie run: inferlet trapped: %s\n",
                    reason[0] ? reason : "no reason given");
        return 1;
    }
    bool byte = status >= 0 && status <= 255;
    if (status != 0 && n_total > 1)
        fprintf(stderr, "pie run: instance %d exited with status %d\n", r->idx,
                status);
    else if (!byte)
        fprintf(stderr, "pie run: inferlet exited with status %d (not 0..255: "
                "pie exits with 1)\n", status);
    return byte ? status : 1;
}

/* Launches the instances, waits for them in order, prints. */
static int run_all(const run_args *a, pie_rt *rt, pie_rt_module *mod,
                   const char *name, int nargs, char **args)
{
    const char **argv = calloc((size_t)nargs + 2, sizeof *argv);
    run_inst *r = calloc((size_t)a->n, sizeof *r);
    int worst = 0;
    if (!argv || !r) {
        fprintf(stderr, "pie run: out of memory\n");
        free(argv);
        free(r);
        return 1;
    }
    argv[0] = name;
    for (int i = 0; i < nargs; i++) argv[i + 1] = args[i];
    int launched = 0;
    for (int i = 0; i < a->n; i++, launched++) {
        r[i].idx = i;
        r[i].stream = a->n == 1;
        pie_rt_launch_cbs cbs = { .user = &r[i], .on_output = on_output,
                                  .on_message = on_message,
                                  .on_exit = on_exit_cb };
        if (pie_rt_launch(rt, mod, nargs + 1, argv, &cbs, &r[i].inst) != 0) {
            fprintf(stderr, "pie run: cannot launch instance %d: %s\n", i,
                    pie_err_msg());
            worst = 1;
            break;
        }
    }
    for (int i = 0; i < launched; i++) {
        char reason[512] = "";
        int32_t st = pie_rt_wait(r[i].inst, reason, sizeof reason);
        if (r[i].stream && stream_last != '\n' && isatty(STDOUT_FILENO))
            fputc('\n', stdout);           /* keep the shell prompt apart */
        int code = finish_instance(&r[i], st, reason, a->n);
        if (a->n == 1) worst = code;
        else if (code) worst = 1;
        pie_rt_instance_unref(r[i].inst);
        free(r[i].out.p);
        free(r[i].err.p);
    }
    free(r);
    free(argv);
    return worst;
}

int pie_cli_load_inferlet(pie_rt *rt, const char *path, pie_rt_module **mod)
{
    size_t len = 0;
    char *wasm = NULL;
    /* a regular file only: a FIFO would block, /dev/zero never end */
    if (pie__file_read(path, RUN_MAX_WASM, &wasm, &len) != 0) {
        fprintf(stderr, "pie run: cannot read the inferlet: %s\n",
                pie_err_msg());
        return -1;
    }
    int cached = 0;
    double t0 = pie_cli_now();
    bool tty = isatty(STDERR_FILENO);
    if (tty) fprintf(stderr, "compiling %s...", path);
    int rc = pie_rt_module_load(rt, wasm, len, mod, &cached);
    free(wasm);
    if (tty) fprintf(stderr, "\r\033[K");
    if (rc != 0) {
        fprintf(stderr, "pie run: cannot load %s: %s\n", path, pie_err_msg());
        return -1;
    }
    if (tty && !cached)
        fprintf(stderr, "compiled %s in %.1f s\n", path, pie_cli_now() - t0);
    return 0;
}

/* Identifies the model's weights for persisted KV: FNV-1a over the shape
 * numbers and the first 64 KiB of the embedding. */
static uint64_t model_id(const pie_model *m)
{
    uint64_t h = 0xcbf29ce484222325ull;
    const pie_model_config *c = &m->cfg;
    int64_t v[] = { c->vocab_size, c->dim, c->hidden_dim, c->n_layers,
                    c->n_heads, c->n_kv_heads, c->head_dim, c->dtype };
    const unsigned char *p = (const unsigned char *)v;
    for (size_t i = 0; i < sizeof v; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    const pie_tensor *e = &m->w.tok_embed;
    int64_t n = pie_tensor_numel(e) * (e->dtype == PIE_DT_F32 ? 4 : 2);
    p = e->data;
    for (int64_t i = 0; p && i < n && i < 65536; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int parse_policy(const char *s, int32_t *policy)
{
    if (!s || !strcmp(s, "wait")) *policy = PIE_CTL_POLICY_WAIT;
    else if (!strcmp(s, "suspend")) *policy = PIE_CTL_POLICY_SUSPEND;
    else if (!strcmp(s, "fcfs")) *policy = PIE_CTL_POLICY_FCFS;
    else {
        fprintf(stderr, "pie run: unknown --policy '%s' (wait, suspend, "
                "fcfs)\n", s);
        return -1;
    }
    return 0;
}

/* Loads every DIR/NAME.pkv as a named export; a bad file is reported and
 * skipped (the others still load). -1 only when DIR cannot be read. */
static int kv_load_all(pie_ctl *ctl, const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT) return 0;          /* nothing saved yet */
        fprintf(stderr, "pie run: --kv-dir %s: %s\n", dir, strerror(errno));
        return -1;
    }
    struct dirent *e;
    char path[PATH_MAX];
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".pkv")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (pie_ctl_export_load(ctl, path, NULL) != 0)
            fprintf(stderr, "pie run: skipping saved KV %s: %s\n", path,
                    pie_err_msg());
    }
    closedir(d);
    return 0;
}

/* DIR/<hex of name>.pkv into path (PATH_MAX); -1 where it, or the
 * temporary file pie_ctl_export_save writes first (".tmpXXXXXX" after it),
 * would not fit a file name or a path: never cut short, or two names could
 * share a file. */
#define KV_TMP_SUFFIX 10
static int kv_file_name(char *path, const char *dir, const char *nm)
{
    size_t nl = strlen(nm), dl = strlen(dir), fl = 2 * nl + 4 + KV_TMP_SUFFIX;
    if (fl > NAME_MAX || dl + 1 + fl >= PATH_MAX) return -1;
    size_t k = (size_t)snprintf(path, PATH_MAX, "%s/", dir);
    for (const char *c = nm; *c; c++)
        k += (size_t)snprintf(path + k, PATH_MAX - k, "%02x", (unsigned char)*c);
    snprintf(path + k, PATH_MAX - k, ".pkv");
    return 0;
}

/* Saves every named export to DIR/<hex name>.pkv (pie_ctl_export_save
 * writes a temporary file and renames it). Returns -1 if any could not be
 * saved. */
static int kv_save_all(pie_ctl *ctl, const char *dir)
{
    int32_t len = 0, n = 0, bad = 0;
    char *names = NULL;
    if (pie_ctl_export_list(ctl, NULL, 0, &len, &n) != PIE_ERANGE && n == 0)
        return 0;
    if (!(names = malloc((size_t)len + 1)) ||
        pie_ctl_export_list(ctl, names, len, &len, &n) != 0) {
        free(names);
        fprintf(stderr, "pie run: cannot list KV exports: %s\n", pie_err_msg());
        return -1;
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "pie run: --kv-dir %s: %s\n", dir, strerror(errno));
        free(names);
        return -1;
    }
    for (const char *nm = names; n-- > 0; nm += strlen(nm) + 1) {
        char path[PATH_MAX];
        if (kv_file_name(path, dir, nm) != 0) {
            fprintf(stderr, "pie run: cannot save KV export '%s': its file "
                    "name (hex, %zu bytes, %d more while written) does not "
                    "fit under %s\n", nm, 2 * strlen(nm) + 4, KV_TMP_SUFFIX,
                    dir);
            bad = 1;
        } else if (pie_ctl_export_save(ctl, nm, path) != 0) {
            fprintf(stderr, "pie run: cannot save KV export '%s': %s\n", nm,
                    pie_err_msg());
            bad = 1;
        }
    }
    free(names);
    return bad ? -1 : 0;
}

static int run_engine(const run_args *a, const char *path, int nargs,
                      char **args)
{
    pie_model *m = NULL;
    pie_backend *b = NULL;
    pie_ctl *ctl = NULL;
    pie_engine *eng = NULL;
    pie_rt *rt = NULL;
    pie_rt_module *mod = NULL;
    char name[256];
    int status = 1;
    module_name(path, name, sizeof name);
    if (pie_cli_load_model(a->model, &m)) return 1;
    if (pie_cli_backend(a->backend, m, a->page_size, a->pages, a->threads,
                        &a->gpu, &b))
        goto out;
    pie_ctl_opts co = { .model_id = model_id(m),
                        .max_export_pages = a->max_export_pages };
    if (parse_policy(a->policy, &co.policy)) goto out;
    if (pie_ctl_create(b, &co, &ctl) != 0) {
        fprintf(stderr, "pie run: cannot start the scheduler: %s\n",
                pie_err_msg());
        goto out;
    }
    /* in range: pie_cmd_run checked both limits */
    pie_rt_opts ro = { .n_workers = a->workers, .cache_dir = a->cache_dir,
                       .cpu_limit_s = a->cpu_limit,
                       .memory_limit = (uint64_t)((double)a->memory_limit_mb *
                                                  1048576.0) };
    char mname[256];
    module_name(a->model, mname, sizeof mname);
    pie_engine_opts eo = { .client = { .max_pages = a->max_pages,
                                       .max_tokens = (int64_t)a->token_limit,
                                       .priority = a->priority },
                           .max_output_bytes = a->max_output_bytes };
    if (pie_engine_create(&eo, &eng) != 0 ||
        pie_engine_add_model(eng, mname, m, ctl) != 0) {
        fprintf(stderr, "pie run: cannot serve the model to inferlets: %s\n",
                pie_err_msg());
        goto out;
    }
    ro.hooks = pie_engine_hooks(eng);
    if (pie_rt_create(&ro, &rt) != 0) {
        fprintf(stderr, "pie run: cannot start the runtime: %s\n",
                pie_err_msg());
        goto out;
    }
    if (pie_cli_load_inferlet(rt, path, &mod)) goto out;
    pie_rt_module_register(rt, name, mod);
    if (a->kv_dir && kv_load_all(ctl, a->kv_dir)) goto out;
    status = run_all(a, rt, mod, name, nargs, args);
    if (a->kv_dir && kv_save_all(ctl, a->kv_dir) && status == 0) status = 1;
out:
    if (mod) pie_rt_module_unref(mod);
    pie_rt_free(rt);
    pie_engine_free(eng);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    pie_model_free(m);
    return status;
}

/* --cpu-limit and --memory-limit: finite, and in ranges that convert to
 * the runtime's nanoseconds and bytes exactly (0 MB would mean the
 * runtime's default, and less than one 64 KiB wasm page nothing). */
#define RUN_MAX_CPU_S   1e9         /* ~31 years; < 0 is "no limit"      */
#define RUN_MIN_MEM_MB  0.0625      /* one wasm page                     */
#define RUN_MAX_MEM_MB  4096.0      /* all a wasm32 instance can address */
/* --max-output-bytes: what an instance's forwards keep is at most its
 * memory limit anyway, so more than the largest one means nothing */
#define RUN_MAX_OUTPUT_BYTES (4096ull << 20)

/* Range checks of pie run's options; prints and returns -1 on the first
 * bad one. */
static int check_run_args(const run_args *a)
{
    double cpu = a->cpu_limit, mem = a->memory_limit_mb;
    if (!isfinite(cpu) || cpu == 0 || cpu > RUN_MAX_CPU_S) {
        fprintf(stderr, "pie run: --cpu-limit must be a number of seconds "
                "from 0 (exclusive) to %.0f, or negative for no limit (got "
                "%g)\n", RUN_MAX_CPU_S, cpu);
        return -1;
    }
    if (!(mem >= RUN_MIN_MEM_MB && mem <= RUN_MAX_MEM_MB)) {
        fprintf(stderr, "pie run: --memory-limit must be a number of MB from "
                "%g (one 64 KiB wasm page) to %g (got %g)\n", RUN_MIN_MEM_MB,
                RUN_MAX_MEM_MB, mem);
        return -1;
    }
    if (a->token_limit > (uint64_t)INT64_MAX) {
        fprintf(stderr, "pie run: --token-limit must be 0 (no limit) .. %lld "
                "(got %llu)\n", (long long)INT64_MAX,
                (unsigned long long)a->token_limit);
        return -1;
    }
    if (a->max_output_bytes > RUN_MAX_OUTPUT_BYTES) {
        fprintf(stderr, "pie run: --max-output-bytes must be 0 (the default, "
                "256 MiB) .. %llu bytes (4096 MiB, the largest memory limit) "
                "(got %llu)\n", RUN_MAX_OUTPUT_BYTES,
                (unsigned long long)a->max_output_bytes);
        return -1;
    }
    if (pie_cli_check_int("run", "priority", a->priority, 0, 7) ||
        pie_cli_check_int("run", "n", a->n, 1, 100000) ||
        pie_cli_check_int("run", "max-pages", a->max_pages, 0, INT32_MAX) ||
        pie_cli_check_int("run", "max-export-pages", a->max_export_pages, 0,
                          INT32_MAX) ||
        pie_cli_check_int("run", "pages", a->pages, 0, INT32_MAX) ||
        pie_cli_check_int("run", "workers", a->workers, 1,
                          PIE_CLI_MAX_THREADS) ||
        pie_cli_check_backend_opts("run", a->page_size, a->threads,
                                   &a->gpu))
        return -1;
    return 0;
}

/* Parses the options before "--" (argv[1..split)) into *a and the one
 * INFERLET into *inferlet; false with *status (0 for --help, 2) to exit. */
static bool parse_run_args(int split, char **argv, run_args *a,
                           char **inferlet, int *status)
{
    *a = (run_args){ .backend = "auto", .n = 1, .page_size = 16,
                     .workers = 2, .cpu_limit = 60.0f,
                     .memory_limit_mb = 1024.0f, .gpu = PIE_CLI_GPU_DEFAULT };
    const pie_opt opts[] = {
        { "model", 'm', OPT_STR, &a->model, "model directory (or PIE_MODEL)" },
        { "n", 'n', OPT_INT, &a->n, "instances to launch concurrently (1)" },
        { "cpu-limit", 0, OPT_FLOAT, &a->cpu_limit, "CPU seconds per instance "
          "(60; < 0 = none; at most 1e9)" },
        { "memory-limit", 0, OPT_FLOAT, &a->memory_limit_mb, "linear memory "
          "per instance, MB, 0.0625..4096 (1024)" },
        { "backend", 'b', OPT_STR, &a->backend, "cpu, cuda or auto (auto)" },
        { "page-size", 0, OPT_INT, &a->page_size, "KV page size in tokens, "
          "1..65536 (16)" },
        { "pages", 0, OPT_INT, &a->pages, "KV pages in the pool (0 = the backend's "
          "default; raise it for many instances)" },
        { "token-limit", 0, OPT_U64, &a->token_limit, "tokens one instance may "
          "forward in total (0 = no limit)" },
        { "max-output-bytes", 0, OPT_U64, &a->max_output_bytes, "host bytes "
          "one instance's submitted forwards may keep until their futures "
          "are freed (results and input copies) and its queued KV copies "
          "until they run, 0..4294967296 (0 = 256 MiB; at most "
          "--memory-limit)" },
        { "priority", 0, OPT_INT, &a->priority, "scheduling class of the "
          "instances, 0 (first) .. 7 (0)" },
        { "max-pages", 0, OPT_INT, &a->max_pages, "KV pages one instance may "
          "hold (0 = no limit)" },
        { "threads", 0, OPT_INT, &a->threads, "CPU backend threads (0 = all; "
          "at most 1024)" },
        PIE_CLI_OPT_GPU(a->gpu),
        PIE_CLI_OPT_GPU_MEMORY(a->gpu),
        { "workers", 0, OPT_INT, &a->workers, "inferlet worker threads, "
          "1..1024 (2)" },
        { "cache-dir", 0, OPT_STR, &a->cache_dir, "compiled-inferlet cache "
          "(~/.cache/pie)" },
        { "kv-dir", 0, OPT_STR, &a->kv_dir, "persist named KV exports here: "
          "loaded at start, saved at exit" },
        { "max-export-pages", 0, OPT_INT, &a->max_export_pages, "KV pages "
          "all named exports together may pin, also those whose instance "
          "ended (0 = half the pool)" },
        { "policy", 0, OPT_STR, &a->policy, "KV pool under pressure: wait, "
          "suspend (swap idle instances to host) or fcfs (end the newest) "
          "(wait)" },
        { 0 },
    };
    const pie_cmd_usage u = { "run",
        "[OPTIONS] INFERLET [--model DIR] [-- ARGS...]",
        "Runs an inferlet (a .wasm file or a bundled name such as "
        "text-completion) on a model in this process and exits with its "
        "status (1 after a trap or for a status outside 0..255). The "
        "inferlet's messages and stdout go to standard output, its stderr "
        "and pie's diagnostics to standard error.", opts };
    char *pos[8];
    int npos, dd, rc = pie_opts_parse(&u, split, argv, pos, 8, &npos, &dd);
    *status = rc < 0 ? 2 : 0;
    if (rc) return false;
    if (npos != 1) {
        fprintf(stderr, "pie run: give one INFERLET (arguments for it go "
                "after '--'; see --help)\n");
        *status = 2;
        return false;
    }
    *inferlet = pos[0];
    return true;
}

int pie_cmd_run(int argc, char **argv)
{
    run_args a;
    char *inferlet;
    /* Split at "--" first: what follows belongs to the inferlet, even
     * --help (pie_opts_parse would take it). */
    int split = 1;
    while (split < argc && strcmp(argv[split], "--")) split++;
    int nargs = split < argc ? argc - split - 1 : 0, status;
    if (!parse_run_args(split, argv, &a, &inferlet, &status)) return status;
    if (check_run_args(&a)) return 2;
    char path[PATH_MAX];
    if (pie_cli_resolve_inferlet(inferlet, path, sizeof path)) return 2;
    return run_engine(&a, path, nargs, argv + split + 1);
}
