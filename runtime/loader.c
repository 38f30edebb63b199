/*
 * loader.c — from uploaded wasm bytes to a dlopened, refcounted module.
 *
 *   1. check     parse the type, import, function, table, export and code
 *                sections: every import must be a function in the API table
 *                (runtime/api.def) with its exact wasm type and implemented
 *                by this server; the module must export memory "memory"
 *                and function "_start" of type () -> (); the counts that
 *                make translation and compilation costly are bounded
 *                (LIMIT_*: types, functions, tables, locals, body size).
 *   2. key       sha256 over (wasm bytes, wasm2c version, compiler path and
 *                version, flags, API version and table digest).
 *   3. compile   on a cache miss, in a private temp dir under the cache:
 *                wasm2c, a generated glue file giving uniform entry points
 *                (pie_glue_*), gcc -O1 -shared with the host prototypes
 *                force-included (with -DPIE_RT_INFERLET they rename every
 *                import to its stack-checking entry wrapper, defined in
 *                the server); both tools run in child processes under
 *                RLIMIT_CPU, RLIMIT_AS and RLIMIT_FSIZE, killed if the
 *                server dies (PR_SET_PDEATHSIG). The .so gets a trailer
 *                (below), is fsynced, published with rename(), and the
 *                directory fsynced; then the cache is trimmed (5).
 *   4. load      open the entry with O_NOFOLLOW, check it is a regular file
 *                of ours, mark it used (its mtime), check that its trailer
 *                names this key and its bytes hash to the trailer's
 *                sha256; then dlopen it by path if the path still names
 *                the file checked. A damaged, foreign or mismatched entry
 *                is dropped (removed as below) and compiled afresh.
 *                dlopen(RTLD_NOW|RTLD_LOCAL), init_module under a mutex,
 *                record the module's executable range for the watchdog.
 *   5. trim      when a runtime starts and after each insert
 *                (pie__rt_cache_sweep): one pass over the directory
 *                removes stale temp dirs and DEAD entries, then LIVE
 *                entries, least recently used first, until the bound holds.
 *                One trim at a time (an flock on the directory): a trim
 *                that finds another running leaves the work to it, so an
 *                insert made meanwhile may exceed the bound until the next.
 *
 * The cache directory holds entries, the temp dirs of compiles
 * (tmp.XXXXXX), entries being removed (tmp.rm.*, for a moment each; both
 * stale after CACHE_TMP_STALE_S) and whatever else someone put there,
 * which is never touched. An entry is a regular file of ours
 * named exactly <key>.so, key 64 lowercase hex digits: the ELF shared
 * object, then a 120-byte trailer (ELF loaders ignore bytes past the
 * segments): magic "PIESOTRL", u32 version, u32 zero, u64 ELF length, the
 * key (64 hex chars), sha256 of the ELF bytes (32). The trailer ties the
 * file to its key, so a renamed or linked entry of another module is
 * refused. A later format must keep magic and version at the start of the
 * last 120 bytes: that is how this version tells a newer pie's entry from
 * a dead one.
 *
 * What the trim makes of a name of that pattern (entry_state, from the
 * file alone: the trim reads trailers, only a load hashes):
 *   DEAD   no pie from this one on can load it: no trailer (written before
 *          trailers existed, or torn), an older trailer version, a length
 *          or key that does not match the file. Removed.
 *   LIVE   a trailer of this version naming its own key, or of a newer
 *          version (a newer pie sharing the directory). Counted against
 *          the bound. Entries of an older key scheme (another compiler,
 *          API or flags) look LIVE; no load refreshes them, so the bound
 *          ages them out.
 *   SKIP   not ours to delete: not a regular file (a symlink, a fifo, a
 *          directory), another user's, or gone.
 * An entry's mtime is its last use: the compile that wrote it or the last
 * load that opened it. The bound is $PIE_CACHE_MAX_ENTRIES entries
 * (default 1000) and $PIE_CACHE_MAX_MB megabytes (default 512) of LIVE
 * entries, 0 for none. No entry used within CACHE_GRACE_S is removed,
 * DEAD or LIVE: another process may be between checking and dlopening
 * it, so the bound may be exceeded by what was used that recently.
 *
 * Removing an entry (entry_remove; a trim's, or a load's bad one): a
 * compile may rename a fresh entry over the name at any moment, so the
 * entry is first renamed to a name of this removal alone (tmp.rm.*), the
 * file there checked to be the one examined (and, for a trim, not marked
 * used since), and only then unlinked (a process that has the object
 * mapped keeps its pages). Any other file it moved is put back (no
 * replace); if a newer entry took the name meanwhile, the moved file goes,
 * as that entry's rename would have replaced it. So no file but the one
 * examined is ever removed. A load that looks while an entry is moved
 * aside, or marks it after the check, finds it gone and compiles it again
 * (pie_rt_module_load's retry).
 *
 * Loaded modules are shared by key (rt->modules list of pie_rt_named with
 * name == NULL); a module is dlclosed when its last reference goes.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <wasm-rt.h>

#include "runtime/rt_internal.h"

/* Part of the cache key: keep in step with compile()'s argument list.
 * -fno-math-errno lets f32/f64.sqrt inline (no libm call, no errno path). */
#define COMPILE_FLAGS "-O1 -pipe -fPIC -shared -fvisibility=hidden " \
    "-fno-semantic-interposition -fstack-clash-protection -fno-strict-aliasing " \
    "-fno-math-errno -DPIE_RT_INFERLET"

/* Bounds on what a module may declare (README, "Limits"): each drives
 * wasm2c's or the C compiler's time and memory. Real inferlets are far
 * below them. */
#define LIMIT_TYPES        10000     /* function types                     */
#define LIMIT_FUNCS        100000    /* functions (imported + defined)     */
#define LIMIT_TABLES       16        /* tables (each charged to memory)    */
#define LIMIT_LOCALS       50000     /* locals in one function             */
#define LIMIT_LOCALS_TOTAL 2000000   /* locals in all functions            */
#define LIMIT_BODY         (8u << 20) /* bytes of one function body        */
#define LIMIT_FSIZE        (2ull << 30) /* bytes a compile step may write  */

#define TRAILER_MAGIC   "PIESOTRL"   /* cache entry trailer (header comment) */
#define TRAILER_VERSION 1

/* The trim (header comment). */
#define CACHE_MAX_ENTRIES_DEFAULT 1000  /* $PIE_CACHE_MAX_ENTRIES           */
#define CACHE_MAX_MB_DEFAULT      512   /* $PIE_CACHE_MAX_MB                */
#define CACHE_GRACE_S             60    /* used this recently: never removed */
#define CACHE_TMP_STALE_S         3600  /* a compile's temp dir, then dead  */

/* ---- 1. the import/export check ----------------------------------------- */

typedef struct { const uint8_t *p, *end; } rd;

static int rd_leb(rd *r, uint32_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 35; shift += 7) {
        if (r->p >= r->end)
            return -1;
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            if (v > UINT32_MAX)
                return -1;
            *out = (uint32_t)v;
            return 0;
        }
    }
    return -1;
}

static int rd_name(rd *r, const char **s, uint32_t *len)
{
    if (rd_leb(r, len) || (size_t)(r->end - r->p) < *len)
        return -1;
    *s = (const char *)r->p;
    r->p += *len;
    return 0;
}

static const char *valtype(uint8_t t)
{
    switch (t) {
    case 0x7f: return "i32";
    case 0x7e: return "i64";
    case 0x7d: return "f32";
    case 0x7c: return "f64";
    case 0x7b: return "v128";
    case 0x70: return "funcref";
    case 0x6f: return "externref";
    }
    return NULL;
}

typedef struct { char params[160]; char result[64]; } sigstr;

static int parse_types(rd r, sigstr **out, uint32_t *n_out)
{
    uint32_t n;
    if (rd_leb(&r, &n))
        return -1;
    if (n > LIMIT_TYPES)
        return -3;
    sigstr *t = calloc(n ? n : 1, sizeof *t);
    if (!t)
        return -2;
    for (uint32_t k = 0; k < n; k++) {
        if (r.p >= r.end || *r.p++ != 0x60)
            goto bad;
        for (int pr = 0; pr < 2; pr++) {
            uint32_t m;
            if (rd_leb(&r, &m) || (size_t)(r.end - r.p) < m)
                goto bad;
            char *dst = pr ? t[k].result : t[k].params;
            size_t cap = pr ? sizeof t[k].result : sizeof t[k].params;
            size_t used = 0;
            for (uint32_t j = 0; j < m; j++) {
                const char *v = valtype(*r.p++);
                if (!v)
                    goto bad;
                int w = snprintf(dst + used, cap - used, "%s%s", j ? "," : "", v);
                if (w < 0 || (size_t)w >= cap - used) {
                    used = cap - 1;
                    continue;
                }
                used += w;
            }
        }
    }
    *out = t;
    *n_out = n;
    return 0;
bad:
    free(t);
    return -1;
}

static const pie_rt_api_import *api_find(const char *mod, uint32_t ml,
                                         const char *name, uint32_t nl)
{
    for (int k = 0; k < pie_rt_api_n_imports; k++) {
        const pie_rt_api_import *a = &pie_rt_api_imports[k];
        if (strlen(a->module) == ml && !memcmp(a->module, mod, ml) &&
            strlen(a->name) == nl && !memcmp(a->name, name, nl))
            return a;
    }
    return NULL;
}

static const char *kind_name(uint8_t k)
{
    static const char *n[] = {"function", "table", "memory", "global", "tag"};
    return k < 5 ? n[k] : "unknown";
}

static int check_imports(rd r, const sigstr *types, uint32_t n_types,
                         uint32_t *n_funcs)
{
    uint32_t n;
    if (rd_leb(&r, &n))
        return pie_err_set(PIE_EFORMAT, "wasm: truncated import section");
    for (uint32_t k = 0; k < n; k++) {
        const char *mod, *name;
        uint32_t ml, nl, ti;
        if (rd_name(&r, &mod, &ml) || rd_name(&r, &name, &nl) || r.p >= r.end)
            return pie_err_set(PIE_EFORMAT, "wasm: truncated import section");
        uint8_t kind = *r.p++;
        if (kind != 0)
            return pie_err_set(PIE_EUNSUPPORTED,
                               "import '%.*s.%.*s': importing a %s is not "
                               "allowed (only API functions)",
                               (int)ml, mod, (int)nl, name, kind_name(kind));
        if (rd_leb(&r, &ti) || ti >= n_types)
            return pie_err_set(PIE_EFORMAT, "wasm: bad type index in import "
                               "'%.*s.%.*s'", (int)ml, mod, (int)nl, name);
        const pie_rt_api_import *a = api_find(mod, ml, name, nl);
        if (!a)
            return pie_err_set(PIE_EUNSUPPORTED,
                               "import '%.*s.%.*s' is not in the pie inferlet "
                               "API v%d (see docs/api.md)", (int)ml, mod,
                               (int)nl, name, pie_rt_api_version);
        if (strcmp(a->params, types[ti].params) ||
            strcmp(a->result, types[ti].result))
            return pie_err_set(PIE_EUNSUPPORTED,
                               "import '%s.%s' has type (%s) -> (%s), "
                               "expected (%s) -> (%s)", a->module, a->name,
                               types[ti].params, types[ti].result, a->params,
                               a->result);
        if (!a->fn)
            return pie_err_set(PIE_EUNSUPPORTED,
                               "import '%s.%s' is not available in this server "
                               "(built without the engine)", a->module,
                               a->name);
    }
    *n_funcs = n;
    return 0;
}

/* Checks the exports; *start_idx gets _start's function index. */
static int check_exports(rd r, uint32_t *start_idx)
{
    uint32_t n;
    bool mem = false, start = false;
    if (rd_leb(&r, &n))
        return pie_err_set(PIE_EFORMAT, "wasm: truncated export section");
    for (uint32_t k = 0; k < n; k++) {
        const char *name;
        uint32_t nl, idx;
        if (rd_name(&r, &name, &nl) || r.p >= r.end)
            return pie_err_set(PIE_EFORMAT, "wasm: truncated export section");
        uint8_t kind = *r.p++;
        if (rd_leb(&r, &idx))
            return pie_err_set(PIE_EFORMAT, "wasm: truncated export section");
        if (kind == 2 && nl == 6 && !memcmp(name, "memory", 6))
            mem = true;
        if (kind == 0 && nl == 6 && !memcmp(name, "_start", 6)) {
            start = true;
            *start_idx = idx;
        }
    }
    if (!mem)
        return pie_err_set(PIE_EUNSUPPORTED, "module exports no memory "
                           "\"memory\" (build with wasi-libc / pie build)");
    if (!start)
        return pie_err_set(PIE_EUNSUPPORTED, "module exports no \"_start\" "
                           "function (build a wasm32-wasi command module)");
    return 0;
}

/* The function section: *n defined functions, their type indexes in *ti
 * (malloc'ed; the caller frees). */
static int parse_funcs(rd r, uint32_t n_imported, uint32_t **ti, uint32_t *n)
{
    if (rd_leb(&r, n))
        return pie_err_set(PIE_EFORMAT, "wasm: truncated function section");
    if (*n > LIMIT_FUNCS || n_imported + (uint64_t)*n > LIMIT_FUNCS)
        return pie_err_set(PIE_ELIMIT, "module declares %u functions, the "
                           "limit is %u", n_imported + *n, LIMIT_FUNCS);
    *ti = malloc(((size_t)*n + 1) * sizeof **ti);
    if (!*ti)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    for (uint32_t k = 0; k < *n; k++)
        if (rd_leb(&r, &(*ti)[k]))
            return pie_err_set(PIE_EFORMAT, "wasm: truncated function "
                               "section");
    return 0;
}

/* The code section: each body's size and local count within bounds. */
static int check_code(rd r)
{
    uint32_t n;
    uint64_t total = 0;
    if (rd_leb(&r, &n))
        return pie_err_set(PIE_EFORMAT, "wasm: truncated code section");
    for (uint32_t k = 0; k < n; k++) {
        uint32_t size, groups;
        if (rd_leb(&r, &size) || (size_t)(r.end - r.p) < size)
            return pie_err_set(PIE_EFORMAT, "wasm: truncated code section");
        if (size > LIMIT_BODY)
            return pie_err_set(PIE_ELIMIT, "function %u's body is %u bytes, "
                               "the limit is %u", k, size, LIMIT_BODY);
        rd b = {r.p, r.p + size};
        r.p += size;
        if (rd_leb(&b, &groups))
            return pie_err_set(PIE_EFORMAT, "wasm: truncated function body");
        uint64_t locals = 0;
        for (uint32_t g = 0; g < groups; g++) {
            uint32_t c;
            if (rd_leb(&b, &c) || b.p >= b.end)
                return pie_err_set(PIE_EFORMAT, "wasm: truncated locals");
            b.p++;                                   /* value type */
            locals += c;
            if (locals > LIMIT_LOCALS)
                return pie_err_set(PIE_ELIMIT, "function %u declares more "
                                   "than %u locals (the limit)", k,
                                   LIMIT_LOCALS);
        }
        total += locals;
        if (total > LIMIT_LOCALS_TOTAL)
            return pie_err_set(PIE_ELIMIT, "module declares more than %u "
                               "locals in all (the limit)",
                               LIMIT_LOCALS_TOTAL);
    }
    return 0;
}

/* The sections pie__rt_check_imports reads, as found (p NULL: absent). */
typedef struct {
    rd   typ, imp, fun, tab, exp, code;
    bool have_exp;
} wasm_sections;

/* Finds the sections of the module in r (past magic and version) into *s,
 * the last of each id winning; 0, or PIE_EFORMAT where one is truncated. */
static int find_sections(rd r, wasm_sections *s)
{
    *s = (wasm_sections){0};
    while (r.p < r.end) {
        uint8_t id = *r.p++;
        uint32_t sz;
        if (rd_leb(&r, &sz) || (size_t)(r.end - r.p) < sz)
            return pie_err_set(PIE_EFORMAT, "wasm: truncated section %u", id);
        rd sec = {r.p, r.p + sz};
        if (id == 1) s->typ = sec;
        if (id == 2) s->imp = sec;
        if (id == 3) s->fun = sec;
        if (id == 4) s->tab = sec;
        if (id == 7) { s->exp = sec; s->have_exp = true; }
        if (id == 10) s->code = sec;
        r.p += sz;
    }
    return 0;
}

/* The type section: *n_types signatures in *types (malloc'ed; the caller
 * frees); 0, or PIE_ENOMEM, PIE_ELIMIT or PIE_EFORMAT. */
static int load_types(rd typ, sigstr **types, uint32_t *n_types)
{
    int rc = parse_types(typ, types, n_types);
    if (rc == -2)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    if (rc == -3)
        return pie_err_set(PIE_ELIMIT, "module declares more than %u "
                           "function types (the limit)", LIMIT_TYPES);
    if (rc)
        return pie_err_set(PIE_EFORMAT, "wasm: malformed type section");
    return 0;
}

/* The table section: its table count within the limit; 0, or PIE_EFORMAT
 * or PIE_ELIMIT. */
static int check_tables(rd tab)
{
    uint32_t n;
    if (rd_leb(&tab, &n))
        return pie_err_set(PIE_EFORMAT, "wasm: truncated table section");
    if (n > LIMIT_TABLES)
        return pie_err_set(PIE_ELIMIT, "module declares %u tables, the "
                           "limit is %u", n, LIMIT_TABLES);
    return 0;
}

int pie__rt_check_imports(const uint8_t *wasm, size_t len)
{
    static const uint8_t magic[8] = {0, 'a', 's', 'm', 1, 0, 0, 0};
    if (len < 8 || memcmp(wasm, magic, 8))
        return pie_err_set(PIE_EFORMAT, "not a WebAssembly module (bad magic "
                           "or version)");
    wasm_sections s;
    int rc = find_sections((rd){wasm + 8, wasm + len}, &s);
    if (rc)
        return rc;
    sigstr *types = NULL;
    uint32_t n_types = 0, n_imp = 0, n_fun = 0, *fun_types = NULL;
    if (s.typ.p && (rc = load_types(s.typ, &types, &n_types)))
        return rc;
    rc = s.imp.p ? check_imports(s.imp, types, n_types, &n_imp) : 0;
    if (!rc && s.fun.p)
        rc = parse_funcs(s.fun, n_imp, &fun_types, &n_fun);
    if (!rc && s.tab.p)
        rc = check_tables(s.tab);
    if (!rc && s.code.p)
        rc = check_code(s.code);
    uint32_t start = UINT32_MAX;
    if (!rc && !s.have_exp)
        rc = pie_err_set(PIE_EUNSUPPORTED, "module has no exports (needs "
                         "memory \"memory\" and function \"_start\")");
    if (!rc)
        rc = check_exports(s.exp, &start);
    /* _start must be () -> (): it is called with no arguments. An index
     * wasm2c would reject anyway (bad or imported) is left to it. */
    if (!rc && start >= n_imp && start - n_imp < n_fun) {
        uint32_t t = fun_types[start - n_imp];
        if (t < n_types && (types[t].params[0] || types[t].result[0]))
            rc = pie_err_set(PIE_EUNSUPPORTED, "export \"_start\" has type "
                             "(%s) -> (%s), expected () -> ()",
                             types[t].params, types[t].result);
    }
    free(types);
    free(fun_types);
    return rc;
}

/* ---- 2. subprocesses ---------------------------------------------------- */

/* Runs argv with rlimits, stdout+stderr to logpath; returns 0 if it exited
 * 0, else PIE_EFORMAT with the log's tail in the message. */
static int run_tool(char *const argv[], const char *logpath, double cpu_s,
                    uint64_t mem, const char *what)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return pie_err_set(PIE_EIO, "fork: %s", strerror(errno));
    if (pid == 0) {
        /* Dies with the server (the forking thread waits for it). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(126);
        int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        struct rlimit cl = {(rlim_t)cpu_s + 1, (rlim_t)cpu_s + 2};
        struct rlimit ml = {mem, mem};
        struct rlimit fl = {LIMIT_FSIZE, LIMIT_FSIZE};
        setrlimit(RLIMIT_CPU, &cl);
        setrlimit(RLIMIT_AS, &ml);
        setrlimit(RLIMIT_FSIZE, &fl);
        execvp(argv[0], argv);
        _exit(127);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return pie_err_set(PIE_EIO, "waitpid: %s", strerror(errno));
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return 0;
    char log[600] = "";
    FILE *f = fopen(logpath, "r");
    if (f) {
        fseek(f, 0, SEEK_END);
        long sz = ftell(f);
        fseek(f, sz > 500 ? sz - 500 : 0, SEEK_SET);
        size_t n = fread(log, 1, sizeof log - 1, f);
        log[n] = 0;
        fclose(f);
    }
    if (WIFSIGNALED(st))
        return pie_err_set(PIE_EFORMAT, "%s killed by signal %d (CPU or memory "
                           "limit?): %s", what, WTERMSIG(st), log);
    return pie_err_set(PIE_EFORMAT, "%s failed (exit %d): %s", what,
                       WIFEXITED(st) ? WEXITSTATUS(st) : -1, log);
}

static char *tool_version(const char *cmd)
{
    FILE *p = popen(cmd, "r");
    char buf[256] = "";
    if (p) {
        size_t n = fread(buf, 1, sizeof buf - 1, p);
        buf[n] = 0;
        pclose(p);
    }
    return strdup(buf);
}

static pthread_once_t ver_once = PTHREAD_ONCE_INIT;
static char *wasm2c_ver, *cc_ver;
static void versions(void)
{
    wasm2c_ver = tool_version("wasm2c --version 2>&1");
    cc_ver = tool_version(PIE_RT_CC " -dumpfullversion -dumpversion 2>&1");
}

static void cache_key(const uint8_t *wasm, size_t len, char hex[65])
{
    pthread_once(&ver_once, versions);
    crypto_hash_sha256_state st;
    unsigned char h[32];
    char extra[1024];
    int n = snprintf(extra, sizeof extra, "|%s|%s|%s|%s|api%d|%s|guard|trailer%d",
                     wasm2c_ver, PIE_RT_CC, cc_ver, COMPILE_FLAGS,
                     pie_rt_api_version, pie_rt_api_digest, TRAILER_VERSION);
    crypto_hash_sha256_init(&st);
    crypto_hash_sha256_update(&st, wasm, len);
    crypto_hash_sha256_update(&st, (const unsigned char *)extra, n);
    crypto_hash_sha256_final(&st, h);
    sodium_bin2hex(hex, 65, h, 32);
}

/* ---- 3. compile --------------------------------------------------------- */

/* The cache entry's trailer (header comment). */
typedef struct {
    char     magic[8];
    uint32_t version;
    uint32_t zero;
    uint64_t elf_len;
    char     key[64];
    uint8_t  sha256[32];
} so_trailer;
_Static_assert(sizeof(so_trailer) == 120, "trailer layout");

/* sha256 of fd's first len bytes into h; 0 or -1 (read error). */
static int hash_fd(int fd, uint64_t len, uint8_t h[32])
{
    crypto_hash_sha256_state st;
    crypto_hash_sha256_init(&st);
    unsigned char buf[1 << 16];
    uint64_t off = 0;
    while (off < len) {
        size_t want = len - off < sizeof buf ? (size_t)(len - off) : sizeof buf;
        ssize_t n = pread(fd, buf, want, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        crypto_hash_sha256_update(&st, buf, (size_t)n);
        off += (uint64_t)n;
    }
    crypto_hash_sha256_final(&st, h);
    return 0;
}

/* Appends the trailer for key to the compiled object at path and fsyncs
 * it, so that a crash cannot publish a short file. */
static int seal_so(const char *path, const char *key)
{
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return pie_err_set(PIE_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    so_trailer t;
    memset(&t, 0, sizeof t);
    memcpy(t.magic, TRAILER_MAGIC, 8);
    t.version = TRAILER_VERSION;
    memcpy(t.key, key, 64);
    int rc = 0;
    if (fstat(fd, &st) != 0 || hash_fd(fd, (uint64_t)st.st_size, t.sha256))
        rc = pie_err_set(PIE_EIO, "%s: read failed", path);
    t.elf_len = (uint64_t)st.st_size;
    if (!rc && (pwrite(fd, &t, sizeof t, st.st_size) != (ssize_t)sizeof t ||
                fsync(fd) != 0))
        rc = pie_err_set(PIE_EIO, "%s: write failed: %s", path,
                         strerror(errno));
    close(fd);
    return rc;
}

static int write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return pie_err_set(PIE_EIO, "%s: %s", path, strerror(errno));
    size_t w = fwrite(buf, 1, len, f);
    if (fclose(f) != 0 || w != len)
        return pie_err_set(PIE_EIO, "%s: write failed", path);
    return 0;
}

/* Writes glue.c from wasm2c's m.h: uniform, visible entry points. The
 * instantiate prototype lists one pointer per imported module in varying
 * order; every one of them is the instance context. */
static int write_glue(const char *dir)
{
    char path[4200], line[1024], args[1024] = "";
    snprintf(path, sizeof path, "%s/m.h", dir);
    FILE *h = fopen(path, "r");
    if (!h)
        return pie_err_set(PIE_EIO, "wasm2c produced no header");
    bool found = false;
    while (fgets(line, sizeof line, h)) {
        const char *pfx = "void Z_m_instantiate(Z_m_instance_t*";
        if (strncmp(line, pfx, strlen(pfx)))
            continue;
        found = true;
        char *p = line + strlen(pfx);
        while (*p == ',') {
            p++;
            while (*p == ' ') p++;
            char *e = strpbrk(p, ",)");
            if (!e)
                break;
            size_t used = strlen(args);
            snprintf(args + used, sizeof args - used, ", (%.*s)ctx",
                     (int)(e - p), p);
            p = e;
        }
    }
    fclose(h);
    if (!found)
        return pie_err_set(PIE_EFORMAT, "wasm2c header has no instantiate");
    char glue[4096];
    int n = snprintf(glue, sizeof glue,
        "#include \"m.h\"\n#include <stddef.h>\n"
        "#define V __attribute__((visibility(\"default\")))\n"
        "V size_t pie_glue_size(void) { return sizeof(Z_m_instance_t); }\n"
        "V void pie_glue_init(void) { Z_m_init_module(); }\n"
        "V void pie_glue_instantiate(void *i, void *ctx) {\n"
        "  (void)ctx; Z_m_instantiate((Z_m_instance_t *)i%s); }\n"
        "V void pie_glue_free(void *i) { Z_m_free((Z_m_instance_t *)i); }\n"
        "V void *pie_glue_memory(void *i) { return Z_mZ_memory((Z_m_instance_t *)i); }\n"
        "V void pie_glue_start(void *i) { Z_mZ__start((Z_m_instance_t *)i); }\n",
        args);
    snprintf(path, sizeof path, "%s/glue.c", dir);
    return write_file(path, glue, n);
}

static void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char p[4400];
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
}

static int compile(pie_rt *rt, const uint8_t *wasm, size_t len,
                   const char *key, const char *dst)
{
    char dir[4096], in[4200], mc[4200], gc[4200], so[4200], log[4200];
    snprintf(dir, sizeof dir, "%s/tmp.XXXXXX", rt->cache_dir);
    if (!mkdtemp(dir))
        return pie_err_set(PIE_EIO, "mkdtemp in %s: %s", rt->cache_dir,
                           strerror(errno));
    snprintf(in, sizeof in, "%s/in.wasm", dir);
    snprintf(mc, sizeof mc, "%s/m.c", dir);
    snprintf(gc, sizeof gc, "%s/glue.c", dir);
    snprintf(so, sizeof so, "%s/m.so", dir);
    snprintf(log, sizeof log, "%s/log.txt", dir);
    int rc = write_file(in, wasm, len);
    if (!rc) {
        char *a[] = {"wasm2c", "--no-debug-names", "-n", "m", "-o", mc, in, NULL};
        rc = run_tool(a, log, rt->o.compile_cpu_s, rt->o.compile_mem,
                      "wasm2c (rejects invalid modules and SIMD)");
    }
    if (!rc)
        rc = write_glue(dir);
    if (!rc) {
        char *a[] = {PIE_RT_CC, "-O1", "-pipe", "-fPIC", "-shared",
                     "-fvisibility=hidden", "-fno-semantic-interposition",
                     "-fstack-clash-protection", "-fno-strict-aliasing",
                     "-fno-math-errno", "-DPIE_RT_INFERLET", "-w", "-include", PIE_RT_HOST_HEADER, "-o", so, mc, gc,
                     NULL};
        rc = run_tool(a, log, rt->o.compile_cpu_s, rt->o.compile_mem,
                      "compiling the inferlet");
    }
    if (!rc)
        rc = seal_so(so, key);
    if (!rc && rename(so, dst) != 0)
        rc = pie_err_set(PIE_EIO, "publish %s: %s", dst, strerror(errno));
    if (!rc) {                   /* make the rename itself durable */
        int dfd = open(rt->cache_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    rm_tree(dir);
    return rc;
}

/* ---- removing an entry (a load's bad one, a trim's) --------------------- */

/* One entry as a load or a trim examined it. */
typedef struct {
    char            name[68];           /* <key>.so                        */
    uint64_t        size;               /* bytes, trailer included         */
    struct timespec used;               /* mtime: last compile or load     */
    dev_t           dev;                /* with ino, the file examined:    */
    ino_t           ino;                /* one renamed over it stays       */
} cache_ent;

/* What entry_remove did. A trim counts REMOVED and GONE alike: either
 * way the file it examined is out of the cache. */
typedef enum {
    RM_KEPT,        /* the name holds another file, or one used since     */
    RM_REMOVED,     /* the file examined: unlinked by this call           */
    RM_GONE         /* nothing under the name: removed by someone else    */
} rm_result;

/* e describes the file of stat st, entry name (67 chars and a NUL). */
static void ent_set(cache_ent *e, const char *name, const struct stat *st)
{
    memcpy(e->name, name, sizeof e->name);
    e->size = (uint64_t)st->st_size;
    e->used = st->st_mtim;
    e->dev = st->st_dev;
    e->ino = st->st_ino;
}

/* Whether st is the file examined as e and, if unused, not marked used
 * (its mtime) since. */
static bool ent_is(const cache_ent *e, const struct stat *st, bool unused)
{
    return st->st_dev == e->dev && st->st_ino == e->ino &&
           (!unused || (st->st_mtim.tv_sec == e->used.tv_sec &&
                        st->st_mtim.tv_nsec == e->used.tv_nsec));
}

/* A name in the cache dir for this removal alone: tmp.rm.<pid>.<random>.
 * Scans take it for a temp name, never an entry; sweep_tmp removes one
 * that a process dying mid-removal left. */
static void private_name(char *out, size_t cap)
{
    snprintf(out, cap, "tmp.rm.%ld.%08x", (long)getpid(),
             (unsigned)randombytes_random());
}

/* Renames from to to within dfd, failing with EEXIST rather than replace
 * a file at to. Where the file system lacks RENAME_NOREPLACE (NFS), a
 * link and an unlink do the same: from must then be a name of ours alone,
 * or the unlink could take a file renamed over it in between. */
static int rename_noreplace(int dfd, const char *from, const char *to)
{
    if (renameat2(dfd, from, dfd, to, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL || linkat(dfd, from, dfd, to, 0) != 0)
        return -1;
    unlinkat(dfd, from, 0);
    return 0;
}

/* Puts the file moved to priv back under name. If a newer file took the
 * name meanwhile, the moved one goes: the rename that published the newer
 * one would have replaced it, had it stayed. */
static void put_back(int dfd, const char *priv, const char *name)
{
    if (rename_noreplace(dfd, priv, name) != 0 && errno == EEXIST)
        unlinkat(dfd, priv, 0);
}

/* Removes the file examined as e from directory dfd if its name still
 * holds it and, if unused, nobody marked it used since, and never another
 * file. Checking by name then unlinking by name would take a fresh entry
 * a compile renamed over it in between; so the entry is first renamed to
 * a private name no other process touches, checked there, and unlinked
 * or put back (header comment). */
static rm_result entry_remove(int dfd, const cache_ent *e, bool unused)
{
    char priv[48];
    private_name(priv, sizeof priv);
    if (renameat2(dfd, e->name, dfd, priv, RENAME_NOREPLACE) != 0 &&
        (errno != EINVAL || renameat(dfd, e->name, dfd, priv) != 0))
        return errno == ENOENT ? RM_GONE : RM_KEPT;
    struct stat st;
    if (fstatat(dfd, priv, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        ent_is(e, &st, unused) && unlinkat(dfd, priv, 0) == 0)
        return RM_REMOVED;
    put_back(dfd, priv, e->name);
    return RM_KEPT;
}

/* Drops the bad entry for key from cache dir: the regular file a load
 * examined as st, however used since; nothing if st is not a regular
 * file (a compile's rename replaces whatever else is there). */
static void entry_drop(const char *dir, const char *key, const struct stat *st)
{
    if (!S_ISREG(st->st_mode))
        return;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return;
    char name[68];
    cache_ent e;
    snprintf(name, sizeof name, "%.64s.so", key);
    ent_set(&e, name, st);
    entry_remove(dfd, &e, false);
    close(dfd);
}

/* ---- 4. load ------------------------------------------------------------ */

typedef struct { uintptr_t base, lo, hi; } text_range;

static int phdr_cb(struct dl_phdr_info *info, size_t sz, void *arg)
{
    (void)sz;
    text_range *t = arg;
    if (info->dlpi_addr != t->base)
        return 0;
    for (int k = 0; k < info->dlpi_phnum; k++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[k];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
            t->lo = info->dlpi_addr + ph->p_vaddr;
            t->hi = t->lo + ph->p_memsz;
            return 1;
        }
    }
    return 0;
}

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;

static int load_so(pie_rt *rt, const char *path, const char *key,
                   pie_rt_module **out)
{
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl)
        return pie_err_set(PIE_EFORMAT, "dlopen %s: %s", path, dlerror());
    pie_rt_module *m = calloc(1, sizeof *m);
    if (!m) {
        dlclose(dl);
        return pie_err_set(PIE_ENOMEM, "out of memory");
    }
    size_t (*size)(void) = (size_t (*)(void))dlsym(dl, "pie_glue_size");
    void (*init)(void) = (void (*)(void))dlsym(dl, "pie_glue_init");
    m->instantiate = (void (*)(void *, void *))dlsym(dl, "pie_glue_instantiate");
    m->free_inst = (void (*)(void *))dlsym(dl, "pie_glue_free");
    m->memory = (void *(*)(void *))dlsym(dl, "pie_glue_memory");
    m->start = (void (*)(void *))dlsym(dl, "pie_glue_start");
    struct link_map *lm = NULL;
    if (!size || !init || !m->instantiate || !m->free_inst || !m->memory ||
        !m->start || dlinfo(dl, RTLD_DI_LINKMAP, &lm) != 0) {
        dlclose(dl);
        free(m);
        return pie_err_set(PIE_EFORMAT, "%s: not a pie inferlet object", path);
    }
    text_range t = {lm->l_addr, 0, 0};
    dl_iterate_phdr(phdr_cb, &t);
    m->text_lo = t.lo;
    m->text_hi = t.hi;
    m->dl = dl;
    m->rt = rt;
    m->inst_size = size();
    atomic_init(&m->refs, 1);
    snprintf(m->key, sizeof m->key, "%s", key);
    pthread_mutex_lock(&init_lock);
    if (!wasm_rt_is_initialized())
        wasm_rt_init();
    init();
    pthread_mutex_unlock(&init_lock);
    *out = m;
    return 0;
}

/* Sets the mtime of the entry open on fd to now: its last use, for the
 * LRU order, and a sign to a concurrent trim that it is being loaded (so
 * before the slow hash). The mtime, not the atime: reads never move it
 * and no mount option (noatime, relatime) keeps it still. Best effort. */
static void mark_used(int fd)
{
    const struct timespec t[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
    futimens(fd, t);
}

/* Checks the trailer of the entry open on fd (stat st) against key and
 * the bytes against the trailer's sha256: 0 or PIE_EFORMAT. */
static int check_trailer(int fd, const struct stat *st, const char *key)
{
    so_trailer t;
    uint8_t h[32];
    if ((uint64_t)st->st_size < sizeof t ||
        pread(fd, &t, sizeof t, st->st_size - (off_t)sizeof t) !=
            (ssize_t)sizeof t ||
        memcmp(t.magic, TRAILER_MAGIC, 8) || t.version != TRAILER_VERSION)
        return pie_err_set(PIE_EFORMAT, "no valid trailer (truncated or not "
                           "written by this version)");
    if (t.elf_len != (uint64_t)st->st_size - sizeof t)
        return pie_err_set(PIE_EFORMAT, "length %llu, trailer says %llu",
                           (unsigned long long)(st->st_size - sizeof t),
                           (unsigned long long)t.elf_len);
    if (memcmp(t.key, key, 64))
        return pie_err_set(PIE_EFORMAT, "compiled for another module (key "
                           "%.16s...)", t.key);
    if (hash_fd(fd, t.elf_len, h) || memcmp(h, t.sha256, 32))
        return pie_err_set(PIE_EFORMAT, "contents do not match their sha256");
    return 0;
}

/* Opens cache entry path for key and checks it: a regular file (not a
 * link) owned by us, its trailer naming key, its bytes matching the
 * trailer's sha256; marks it used. Returns 0 with *fd open on it,
 * PIE_ENOTFOUND if there is none, or PIE_EFORMAT saying what is wrong.
 * *seen: the stat of the file opened (what to drop, if bad); zeroed,
 * which is no regular file, if none was. */
static int open_entry(const char *path, const char *key, int *fd_out,
                      struct stat *seen)
{
    *fd_out = -1;
    memset(seen, 0, sizeof *seen);
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return errno == ENOENT ? PIE_ENOTFOUND
             : pie_err_set(PIE_EFORMAT, "cannot open it (%s; a symlink?)",
                           strerror(errno));
    struct stat st;
    int rc;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return pie_err_set(PIE_EFORMAT, "not a regular file");
    }
    *seen = st;
    if (st.st_uid != geteuid())
        rc = pie_err_set(PIE_EFORMAT, "owned by uid %u, not by us",
                         (unsigned)st.st_uid);
    else {
        mark_used(fd);
        rc = check_trailer(fd, &st, key);
    }
    if (rc) {
        close(fd);
        return rc;
    }
    *fd_out = fd;
    return 0;
}

/* Whether path still names the file open on fd (checked before dlopen by
 * path: the cache dir is ours alone, and a trim leaves an entry marked
 * used in the last CACHE_GRACE_S alone). *a: the file's stat. */
static bool same_file(int fd, const char *path, struct stat *a)
{
    struct stat b;
    return fstat(fd, a) == 0 && lstat(path, &b) == 0 && S_ISREG(b.st_mode) &&
           a->st_dev == b.st_dev && a->st_ino == b.st_ino;
}

/* A checked entry for key at path: an existing good one, else compiled.
 * A bad existing entry is dropped, but not a good one another process
 * published under its name meanwhile (entry_drop). *hit says which.
 * PIE_ENOTFOUND: the fresh entry was gone before it could be opened
 * (worth another try). */
static int entry_get(pie_rt *rt, const uint8_t *wasm, size_t len,
                     const char *key, const char *path, int *fd, bool *hit)
{
    struct stat seen;
    int rc = open_entry(path, key, fd, &seen);
    *hit = rc == 0;
    if (rc == 0)
        return 0;
    if (rc != PIE_ENOTFOUND) {
        fprintf(stderr, "pie runtime: dropping cache entry %s: %s\n", path,
                pie_err_msg());
        entry_drop(rt->cache_dir, key, &seen);
    }
    if ((rc = compile(rt, wasm, len, key, path)))
        return rc;
    pie__rt_cache_sweep(rt->cache_dir);   /* the bound holds at each insert */
    rc = open_entry(path, key, fd, &seen);
    if (rc == PIE_ENOTFOUND)
        rc = pie_err_set(PIE_ENOTFOUND, "%s vanished after compiling "
                         "(another process's cache trim?)", path);
    else if (rc)
        rc = pie_err_set(PIE_EIO, "%s: freshly compiled entry is bad: %s",
                         path, pie_err_msg());
    return rc;
}

int pie_rt_module_load(pie_rt *rt, const void *wasm, size_t len,
                       pie_rt_module **out, int *cached)
{
    *out = NULL;
    if (!wasm || len == 0)
        return pie_err_set(PIE_EINVAL, "empty module");
    if (len > (64u << 20))
        return pie_err_set(PIE_ELIMIT, "module of %zu bytes exceeds 64 MiB",
                           len);
    int rc = pie__rt_check_imports(wasm, len);
    if (rc)
        return rc;
    char key[65], path[4200];
    cache_key(wasm, len, key);
    snprintf(path, sizeof path, "%s/%s.so", rt->cache_dir, key);
    /* Another process may compile the same module and rename its entry
     * over ours between the check and dlopen (an equally good entry), or
     * its trim may remove the entry: check the one now there, or compile
     * again (a few times), rather than fail. */
    for (int attempt = 0; attempt < 3; attempt++) {
        int fd;
        bool hit;
        rc = entry_get(rt, wasm, len, key, path, &fd, &hit);
        if (rc == PIE_ENOTFOUND)
            continue;
        if (rc)
            return rc;
        if (cached)
            *cached = hit;
        struct stat st;
        bool same = same_file(fd, path, &st);
        rc = same ? load_so(rt, path, key, out)
                  : pie_err_set(PIE_EFORMAT, "%s changed while loading it",
                                path);
        close(fd);
        if (rc == 0)
            return 0;
        if (!same)
            continue;
        if (!hit)
            return rc;          /* freshly compiled and unloadable */
        entry_drop(rt->cache_dir, key, &st);  /* unloadable: compile afresh */
    }
    return rc == PIE_ENOTFOUND ? PIE_EIO : rc;  /* the message says what */
}

/* ---- 5. trim ------------------------------------------------------------ */

typedef enum { ENTRY_SKIP, ENTRY_DEAD, ENTRY_LIVE } entry_state;

/* The LIVE entries one trim found. */
typedef struct {
    cache_ent *v;                       /* malloc'ed; the trim frees it    */
    size_t     n, cap;
    uint64_t   bytes;                   /* sum of v[].size                 */
} cache_list;

/* Whether name is exactly <64 lowercase hex digits>.so, the only entry
 * name this code makes: anything else in the directory is not ours. */
static bool is_entry_name(const char *name)
{
    for (int k = 0; k < 64; k++)
        if (!((name[k] >= '0' && name[k] <= '9') ||
              (name[k] >= 'a' && name[k] <= 'f')))
            return false;           /* also stops at a shorter name's NUL */
    return !strcmp(name + 64, ".so");
}

/* Whether the regular file open on fd (stat st), entry name, is DEAD
 * (header comment). A newer trailer is not: a newer pie sharing the
 * directory loads it. */
static bool entry_dead(int fd, const struct stat *st, const char *name)
{
    so_trailer t;
    if ((uint64_t)st->st_size < sizeof t ||
        pread(fd, &t, sizeof t, st->st_size - (off_t)sizeof t) !=
            (ssize_t)sizeof t ||
        memcmp(t.magic, TRAILER_MAGIC, 8))
        return true;
    if (t.version > TRAILER_VERSION)
        return false;
    return t.version < TRAILER_VERSION ||
           t.elf_len != (uint64_t)st->st_size - sizeof t ||
           memcmp(t.key, name, 64);
}

/* The state of entry name in the directory open as dfd, never following
 * a link; *e describes the file examined unless SKIP. Only a regular file
 * is opened at all (opening a device or fifo can block or act). */
static entry_state entry_state_of(int dfd, const char *name, cache_ent *e)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(st.st_mode) || st.st_uid != geteuid())
        return ENTRY_SKIP;
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return ENTRY_SKIP;
    entry_state s = ENTRY_SKIP;         /* fstat again: the file opened */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()) {
        s = entry_dead(fd, &st, name) ? ENTRY_DEAD : ENTRY_LIVE;
        ent_set(e, name, &st);
    }
    close(fd);
    return s;
}

/* Whether e was used within CACHE_GRACE_S of now: a load may be between
 * marking and dlopening it (header comment). Either side of now: after
 * the clock steps back, a mark just made lies in the future. */
static bool entry_recent(const cache_ent *e, time_t now)
{
    return e->used.tv_sec > now - CACHE_GRACE_S &&
           e->used.tv_sec < now + CACHE_GRACE_S;
}

/* Removes temp name (in dir) if left more than CACHE_TMP_STALE_S ago by
 * a server that died: a compile's temp dir (by its mtime) or an entry
 * moved aside to be removed (tmp.rm.*, by its ctime: when it was moved;
 * its removal takes microseconds). */
static void sweep_tmp(const char *dir, const char *name, time_t now)
{
    char p[4400];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (lstat(p, &st) != 0 || st.st_uid != geteuid())
        return;
    if (S_ISDIR(st.st_mode) && now - st.st_mtime > CACHE_TMP_STALE_S)
        rm_tree(p);
    else if (S_ISREG(st.st_mode) && !strncmp(name, "tmp.rm.", 7) &&
             now - st.st_ctime > CACHE_TMP_STALE_S)
        unlink(p);
}

static void list_add(cache_list *l, const cache_ent *e)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        cache_ent *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return;             /* out of memory: e escapes this trim only */
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *e;
    l->bytes += e->size;
}

/* One pass over directory d (path dir): stale temp dirs and DEAD entries
 * go, LIVE entries are listed in l. */
static void scan(DIR *d, const char *dir, cache_list *l)
{
    time_t now = time(NULL);
    struct dirent *de;
    while ((de = readdir(d))) {
        cache_ent e;
        if (!strncmp(de->d_name, "tmp.", 4)) {
            sweep_tmp(dir, de->d_name, now);
            continue;
        }
        if (!is_entry_name(de->d_name))
            continue;
        entry_state s = entry_state_of(dirfd(d), de->d_name, &e);
        if (s == ENTRY_DEAD && !entry_recent(&e, now))
            entry_remove(dirfd(d), &e, true);
        else if (s == ENTRY_LIVE)
            list_add(l, &e);
    }
}

static int by_use(const void *a, const void *b)
{
    const struct timespec *x = &((const cache_ent *)a)->used;
    const struct timespec *y = &((const cache_ent *)b)->used;
    if (x->tv_sec != y->tv_sec)
        return x->tv_sec < y->tv_sec ? -1 : 1;
    return (x->tv_nsec > y->tv_nsec) - (x->tv_nsec < y->tv_nsec);
}

static bool over_bound(size_t n, uint64_t bytes, uint64_t max_n,
                       uint64_t max_bytes)
{
    return (max_n && n > max_n) || (max_bytes && bytes > max_bytes);
}

/* Removes the least recently used entries of l until at most max_n (0:
 * any number) of at most max_bytes in all (0: any size) remain, passing
 * over those used recently and those a load marked since the scan. An
 * entry already gone counts as removed: a trim running beside this one
 * (no lock to be had) removed it and counts it too, so both stop where
 * one would have. */
static void evict_lru(int dfd, cache_list *l, uint64_t max_n,
                      uint64_t max_bytes)
{
    size_t n = l->n;
    uint64_t bytes = l->bytes;
    if (!over_bound(n, bytes, max_n, max_bytes))
        return;
    qsort(l->v, l->n, sizeof *l->v, by_use);
    time_t now = time(NULL);
    for (size_t k = 0; k < l->n && over_bound(n, bytes, max_n, max_bytes);
         k++) {
        if (entry_recent(&l->v[k], now) ||
            entry_remove(dfd, &l->v[k], true) == RM_KEPT)
            continue;
        n--;
        bytes -= l->v[k].size;
    }
}

/* A bound from environment variable name: a whole number (0: no bound);
 * def when unset, and with a warning when not a whole number. Read at
 * each trim: a getenv is nothing next to the compile before it. */
static uint64_t env_bound(const char *name, uint64_t def)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return def;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (*v < '0' || *v > '9' || errno || *end) {   /* strtoull takes "-1" */
        fprintf(stderr, "pie runtime: %s=\"%s\" is not a whole number >= 0 "
                "(0: no bound); using %llu\n", name, v,
                (unsigned long long)def);
        return def;
    }
    return x;
}

/* Trims the cache in dir (header comment, "trim"): stale temp dirs and
 * DEAD entries go, then LIVE ones, least recently used first, until the
 * bound holds. Best effort: what cannot be examined or removed stays.
 * Together, trims at the same time remove what one would: one runs at a
 * time (an flock on the directory, released with it) and a trim that
 * finds another running leaves the work to it; where flock cannot be had
 * (NFS), each counts the entries another removed first (evict_lru). */
void pie__rt_cache_sweep(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    if (flock(dirfd(d), LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
        closedir(d);
        return;
    }
    cache_list l = {0};
    scan(d, dir, &l);
    uint64_t max_n = env_bound("PIE_CACHE_MAX_ENTRIES",
                               CACHE_MAX_ENTRIES_DEFAULT);
    uint64_t mb = env_bound("PIE_CACHE_MAX_MB", CACHE_MAX_MB_DEFAULT);
    evict_lru(dirfd(d), &l, max_n, mb > (UINT64_MAX >> 20) ? 0 : mb << 20);
    free(l.v);
    closedir(d);
}

void pie_rt_module_ref(pie_rt_module *m) { atomic_fetch_add(&m->refs, 1); }

void pie_rt_module_unref(pie_rt_module *m)
{
    if (!m || atomic_fetch_sub(&m->refs, 1) != 1)
        return;
    dlclose(m->dl);
    free(m);
}
