/*
 * loader.c — from uploaded wasm bytes to a dlopened, refcounted module.
 *
 *   1. check     parse the type, import and export sections: every import
 *                must be a function in the API table (runtime/api.def) with
 *                its exact wasm type and implemented by this server; the
 *                module must export memory "memory" and function "_start".
 *   2. key       sha256 over (wasm bytes, wasm2c version, compiler path and
 *                version, flags, API version and table digest).
 *   3. compile   on a cache miss, in a private temp dir under the cache:
 *                wasm2c, a generated glue file giving uniform entry points
 *                (pie_glue_*), gcc -O1 -shared with the host prototypes
 *                force-included (with -DPIE_RT_INFERLET they rename every
 *                import to its stack-checking entry wrapper, defined in
 *                the server); both tools run in child processes under
 *                RLIMIT_CPU and RLIMIT_AS; publish with rename().
 *   4. load      dlopen(RTLD_NOW|RTLD_LOCAL), init_module under a mutex,
 *                record the module's executable range for the watchdog.
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
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <wasm-rt.h>

#include "runtime/rt_internal.h"

#define COMPILE_FLAGS "-O1 -pipe -fPIC -shared -fvisibility=hidden " \
    "-fno-semantic-interposition -fstack-clash-protection -fno-strict-aliasing " \
    "-DPIE_RT_INFERLET"

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
    if (rd_leb(&r, &n) || n > 100000)
        return -1;
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

static int check_imports(rd r, const sigstr *types, uint32_t n_types)
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
    return 0;
}

static int check_exports(rd r)
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
        if (kind == 0 && nl == 6 && !memcmp(name, "_start", 6))
            start = true;
    }
    if (!mem)
        return pie_err_set(PIE_EUNSUPPORTED, "module exports no memory "
                           "\"memory\" (build with wasi-libc / pie build)");
    if (!start)
        return pie_err_set(PIE_EUNSUPPORTED, "module exports no \"_start\" "
                           "function (build a wasm32-wasi command module)");
    return 0;
}

int pie__rt_check_imports(const uint8_t *wasm, size_t len)
{
    static const uint8_t magic[8] = {0, 'a', 's', 'm', 1, 0, 0, 0};
    if (len < 8 || memcmp(wasm, magic, 8))
        return pie_err_set(PIE_EFORMAT, "not a WebAssembly module (bad magic "
                           "or version)");
    rd r = {wasm + 8, wasm + len}, imp = {0}, exp = {0}, typ = {0};
    bool have_exp = false;
    while (r.p < r.end) {
        uint8_t id = *r.p++;
        uint32_t sz;
        if (rd_leb(&r, &sz) || (size_t)(r.end - r.p) < sz)
            return pie_err_set(PIE_EFORMAT, "wasm: truncated section %u", id);
        rd s = {r.p, r.p + sz};
        if (id == 1) typ = s;
        if (id == 2) imp = s;
        if (id == 7) { exp = s; have_exp = true; }
        r.p += sz;
    }
    sigstr *types = NULL;
    uint32_t n_types = 0;
    if (typ.p) {
        int rc = parse_types(typ, &types, &n_types);
        if (rc == -2)
            return pie_err_set(PIE_ENOMEM, "out of memory");
        if (rc)
            return pie_err_set(PIE_EFORMAT, "wasm: malformed type section");
    }
    int rc = imp.p ? check_imports(imp, types, n_types) : 0;
    free(types);
    if (rc)
        return rc;
    if (!have_exp)
        return pie_err_set(PIE_EUNSUPPORTED, "module has no exports (needs "
                           "memory \"memory\" and function \"_start\")");
    return check_exports(exp);
}

/* ---- 2. subprocesses ---------------------------------------------------- */

/* Runs argv with rlimits, stdout+stderr to logpath; returns 0 if it exited
 * 0, else PIE_EFORMAT with the log's tail in the message. */
static int run_tool(char *const argv[], const char *logpath, double cpu_s,
                    uint64_t mem, const char *what)
{
    pid_t pid = fork();
    if (pid < 0)
        return pie_err_set(PIE_EIO, "fork: %s", strerror(errno));
    if (pid == 0) {
        int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        struct rlimit cl = {(rlim_t)cpu_s + 1, (rlim_t)cpu_s + 2};
        struct rlimit ml = {mem, mem};
        setrlimit(RLIMIT_CPU, &cl);
        setrlimit(RLIMIT_AS, &ml);
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
    int n = snprintf(extra, sizeof extra, "|%s|%s|%s|%s|api%d|%s|guard",
                     wasm2c_ver, PIE_RT_CC, cc_ver, COMPILE_FLAGS,
                     pie_rt_api_version, pie_rt_api_digest);
    crypto_hash_sha256_init(&st);
    crypto_hash_sha256_update(&st, wasm, len);
    crypto_hash_sha256_update(&st, (const unsigned char *)extra, n);
    crypto_hash_sha256_final(&st, h);
    sodium_bin2hex(hex, 65, h, 32);
}

/* ---- 3. compile --------------------------------------------------------- */

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
                   const char *dst)
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
                     "-DPIE_RT_INFERLET", "-w", "-include", PIE_RT_HOST_HEADER, "-o", so, mc, gc,
                     NULL};
        rc = run_tool(a, log, rt->o.compile_cpu_s, rt->o.compile_mem,
                      "compiling the inferlet");
    }
    if (!rc && rename(so, dst) != 0)
        rc = pie_err_set(PIE_EIO, "publish %s: %s", dst, strerror(errno));
    rm_tree(dir);
    return rc;
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
    struct stat st;
    bool hit = stat(path, &st) == 0;
    if (cached)
        *cached = hit;
    if (!hit && (rc = compile(rt, wasm, len, path)))
        return rc;
    rc = load_so(rt, path, key, out);
    if (rc && hit) {
        /* A damaged cache entry: drop it and compile afresh. */
        unlink(path);
        if (cached)
            *cached = 0;
        if ((rc = compile(rt, wasm, len, path)))
            return rc;
        rc = load_so(rt, path, key, out);
    }
    return rc;
}

void pie_rt_module_ref(pie_rt_module *m) { atomic_fetch_add(&m->refs, 1); }

void pie_rt_module_unref(pie_rt_module *m)
{
    if (!m || atomic_fetch_sub(&m->refs, 1) != 1)
        return;
    dlclose(m->dl);
    free(m);
}
