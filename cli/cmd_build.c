/*
 * cmd_build.c — `pie build FILE.c|DIR -o OUT.wasm`: compiles a C inferlet
 * with the C SDK into a wasm32-wasi command module that pie can run.
 *
 * The flags are the ones the runtime needs (../shared/design/
 * inferlet-runtime.md, and sdk/c/inferlet.cmake, which builds the bundled
 * inferlets with the same list): wasi-libc headers only (-nostdlibinc, so a
 * header wasi-libc lacks is an error instead of a silent glibc one), the
 * shadow stack first in memory (an overflow traps instead of overwriting
 * data), stripped, and no SIMD (wasm2c 1.0.32 cannot translate it). clang
 * runs as a child with our stdout/stderr, so its diagnostics reach the user
 * as they are; its exit status becomes ours.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/opts.h"

#define WASI_INC "/usr/include/wasm32-wasi"
#define WASI_LIB "/usr/lib/wasm32-wasi"

typedef struct strv {
    char  **v;
    size_t  n, cap;
} strv;

static int sv_push(strv *s, const char *x)
{
    if (s->n + 2 > s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        char **nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return -1;
        s->v = nv;
        s->cap = nc;
    }
    if (!(s->v[s->n] = strdup(x))) return -1;
    s->v[++s->n] = NULL;
    return 0;
}

static void sv_free(strv *s)
{
    for (size_t i = 0; i < s->n; i++) free(s->v[i]);
    free(s->v);
}

static int sv_pushf(strv *s, const char *a, const char *b)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s%s", a, b);
    return sv_push(s, buf);
}

static bool exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* The first of names found on PATH (or an absolute path), else NULL. */
static const char *find_prog(const char *const *names, char *buf, size_t cap)
{
    for (; *names; names++) {
        if (strchr(*names, '/')) {
            if (access(*names, X_OK) == 0) return *names;
            continue;
        }
        const char *path = getenv("PATH");
        if (!path) path = "/usr/bin:/bin";
        for (const char *p = path; *p;) {
            size_t n = strcspn(p, ":");
            snprintf(buf, cap, "%.*s/%s", (int)n, p, *names);
            if (n && access(buf, X_OK) == 0) return buf;
            p += n + (p[n] == ':');
        }
    }
    return NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Adds FILE.c, or every *.c in DIR (sorted) plus -I DIR. */
static int add_inputs(strv *cmd, const char *in)
{
    struct stat st;
    if (stat(in, &st) != 0) {
        fprintf(stderr, "pie build: cannot open %s: %s\n", in, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) return sv_push(cmd, in);
    DIR *d = opendir(in);
    strv files = {0};
    struct dirent *e;
    if (!d) {
        fprintf(stderr, "pie build: cannot read %s: %s\n", in, strerror(errno));
        return -1;
    }
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        char path[4096];
        if (n < 3 || strcmp(e->d_name + n - 2, ".c")) continue;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", in, e->d_name) >=
            sizeof path) {
            fprintf(stderr, "pie build: path too long: %s/%s\n", in,
                    e->d_name);
            closedir(d);
            sv_free(&files);
            return -1;
        }
        if (sv_push(&files, path)) break;
    }
    closedir(d);
    if (files.n == 0) {
        fprintf(stderr, "pie build: no .c files in %s\n", in);
        sv_free(&files);
        return -1;
    }
    qsort(files.v, files.n, sizeof *files.v, cmp_str);
    int rc = sv_pushf(cmd, "-I", in);
    for (size_t i = 0; i < files.n && !rc; i++) rc = sv_push(cmd, files.v[i]);
    sv_free(&files);
    return rc;
}

/* Adds the SDK's include dir and sources (not its pie_api.h alone). */
static int add_sdk(strv *cmd, const char *sdk)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/pie.h", sdk);
    if (!exists(p)) {
        fprintf(stderr, "pie build: the C SDK is not at %s (set --sdk DIR or "
                        "PIE_SDK)\n", sdk);
        return -1;
    }
    static const char *const src[] = { "lm.c", "ctx.c", "gen.c", "chat.c",
                                       "args.c" };
    int rc = sv_pushf(cmd, "-I", sdk);
    for (size_t i = 0; i < sizeof src / sizeof *src && !rc; i++) {
        snprintf(p, sizeof p, "%s/%s", sdk, src[i]);
        rc = sv_push(cmd, p);
    }
    return rc;
}

static int run_child(char **argv)
{
    pid_t pid = fork();
    if (pid < 0) {
        perror("pie build: fork");
        return -1;
    }
    if (pid == 0) {
        execv(argv[0], argv);
        fprintf(stderr, "pie build: cannot run %s: %s\n", argv[0],
                strerror(errno));
        _exit(127);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return -1;
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    fprintf(stderr, "pie build: compiler killed by signal %d\n", WTERMSIG(st));
    return 1;
}

/* The default output, NAME.wasm in the current directory: NAME is the
 * last component of in (trailing slashes ignored: "ex/" gives ex.wasm)
 * less ".c"; for ".", ".." or "/" the directory's real name. Prints and
 * returns -1 when there is none. */
static int default_output(const char *in, char *out, size_t cap)
{
    char real[PATH_MAX];
    size_t e = strlen(in);
    while (e > 0 && in[e - 1] == '/') e--;
    size_t s = e;
    while (s > 0 && in[s - 1] != '/') s--;
    const char *base = in + s;
    size_t n = e - s;
    if (n == 0 || (n == 1 && base[0] == '.') ||
        (n == 2 && !strncmp(base, "..", 2))) {
        const char *b = realpath(in, real) ? strrchr(real, '/') : NULL;
        if (!b || !b[1]) {
            fprintf(stderr, "pie build: no name for the output of %s; give "
                    "-o OUT.wasm\n", in);
            return -1;
        }
        base = b + 1;
        n = strlen(base);
    } else if (n > 2 && !strncmp(base + n - 2, ".c", 2)) {
        n -= 2;
    }
    if ((size_t)snprintf(out, cap, "%.*s.wasm", (int)n, base) >= cap) {
        fprintf(stderr, "pie build: output name too long; give -o OUT.wasm\n");
        return -1;
    }
    return 0;
}

/* pie build's options (--output, --sdk, --cc, --opt, --verbose). */
typedef struct build_args {
    const char *out, *sdk, *cc, *opt;
    bool        verbose;
} build_args;

/* Parses the options before "--" (argv[1..split)) into *a and the one
 * FILE.c|DIR into *in; false with *status (0 for --help, 2) to exit. */
static bool parse_build_args(int split, char **argv, build_args *a,
                             char **in, int *status)
{
    *a = (build_args){ .sdk = PIE_SOURCE_DIR "/sdk/c", .opt = "-O2" };
    const pie_opt opts[] = {
        { "output", 'o', OPT_STR, &a->out, "output .wasm (default: "
          "NAME.wasm)" },
        { "sdk", 0, OPT_STR, &a->sdk, "C SDK directory (" PIE_SOURCE_DIR "/sdk/c)" },
        { "cc", 0, OPT_STR, &a->cc, "clang to use (clang, clang-14 on PATH)" },
        { "opt", 'O', OPT_STR, &a->opt, "optimization flag (-O2)" },
        { "verbose", 'v', OPT_FLAG, &a->verbose, "print the compiler command" },
        { 0 },
    };
    const pie_cmd_usage u = { "build",
        "FILE.c|DIR [-o OUT.wasm] [OPTIONS] [-- CFLAGS...]",
        "Compiles a C inferlet (one file, or every .c file of DIR) with the "
        "pie C SDK into a wasm32-wasi module for `pie run`. Compiler errors "
        "are shown as the compiler prints them.", opts };
    char *pos[8];
    int npos, dd, rc = pie_opts_parse(&u, split, argv, pos, 8, &npos, &dd);
    *status = rc < 0 ? 2 : 0;
    if (rc) return false;
    if (npos != 1) {
        fprintf(stderr, "pie build: give one FILE.c or DIR (see --help)\n");
        *status = 2;
        return false;
    }
    *in = pos[0];
    return true;
}

/* The clang to run (--cc, else clang or clang-14 on PATH; buf holds a
 * path found on PATH), after checking that wasi-libc is installed too;
 * NULL after printing what is missing. */
static const char *find_toolchain(const char *cc, char *buf, size_t cap)
{
    const char *names[] = { cc ? cc : "clang", "clang-14", NULL };
    if (cc) names[1] = NULL;
    const char *clang = find_prog(names, buf, cap);
    if (!clang) {
        fprintf(stderr, "pie build: %s not found; install clang, lld, "
                "wasi-libc and libclang-rt-14-dev-wasm32\n", cc ? cc : "clang");
        return NULL;
    }
    if (!exists(WASI_INC "/stdio.h") || !exists(WASI_LIB "/libc.a")) {
        fprintf(stderr, "pie build: wasi-libc not found (%s, %s); install "
                "the wasi-libc package\n", WASI_INC, WASI_LIB);
        return NULL;
    }
    return clang;
}

/* Fills cmd with the compiler command: clang, --opt, the flags the runtime
 * needs, the nflags CFLAGS given after "--", the inputs in, the SDK and
 * -o OUT. Nonzero on failure (add_inputs and add_sdk print why; out of
 * memory is silent); cmd is the caller's to free either way. */
static int build_command(strv *cmd, const build_args *a, const char *clang,
                         const char *in, int nflags, char **cflags)
{
    static const char *const flags[] = {
        "--target=wasm32-wasi", "-nostdlibinc", "-isystem", WASI_INC,
        "-Wl,--stack-first", "-Wl,-z,stack-size=131072", "-Wl,--strip-all",
        "-mno-simd128",
    };
    int rc = sv_push(cmd, clang) || sv_push(cmd, a->opt);
    for (size_t i = 0; i < sizeof flags / sizeof *flags && !rc; i++)
        rc = sv_push(cmd, flags[i]);
    for (int i = 0; i < nflags && !rc; i++) rc = sv_push(cmd, cflags[i]);
    if (!rc) rc = add_inputs(cmd, in);
    if (!rc) rc = add_sdk(cmd, a->sdk);
    if (!rc) rc = sv_push(cmd, "-o") || sv_push(cmd, a->out);
    return rc;
}

/* Prints cmd on stderr as one line, its words separated by spaces. */
static void print_command(const strv *cmd)
{
    for (size_t i = 0; i < cmd->n; i++)
        fprintf(stderr, "%s%s", i ? " " : "", cmd->v[i]);
    fprintf(stderr, "\n");
}

int pie_cmd_build(int argc, char **argv)
{
    build_args a;
    /* Split at "--" first: what follows goes to clang as is. */
    int split = 1;
    while (split < argc && strcmp(argv[split], "--")) split++;
    int nflags = split < argc ? argc - split - 1 : 0, status;
    char *in;
    if (!parse_build_args(split, argv, &a, &in, &status)) return status;
    char ccbuf[4096], outbuf[4096];
    const char *clang = find_toolchain(a.cc, ccbuf, sizeof ccbuf);
    if (!clang) return 1;
    if (!a.out) {
        if (default_output(in, outbuf, sizeof outbuf)) return 2;
        a.out = outbuf;
    }
    strv cmd = {0};
    if (build_command(&cmd, &a, clang, in, nflags, argv + split + 1)) {
        sv_free(&cmd);
        return 1;
    }
    if (a.verbose) print_command(&cmd);
    int rc = run_child(cmd.v);
    sv_free(&cmd);
    if (rc != 0) {
        fprintf(stderr, "pie build: compilation failed\n");
        return rc > 0 ? rc : 1;
    }
    return 0;
}
