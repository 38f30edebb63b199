/*
 * test_rt_cache.c — the WebAssembly inferlet runtime's compile cache, end
 * to end (as test_runtime.c): damaged and hostile entries, the cache
 * dir's permissions, cleanup of dead entries and the size/count bound, and
 * several processes trimming, loading and compiling into one cache at once.
 *
 *   test_rt_cache cache       truncated, symlinked and foreign cache entries
 *                             are dropped and recompiled; a cache dir others
 *                             can write, or replace through its parent, is
 *                             refused; stale temp dirs swept
 *   test_rt_cache cache_dead  entries no pie can load again (no trailer, an
 *                             older trailer, another key) are removed at
 *                             start and at insert; newer, fresh and
 *                             non-entries (name, type, owner) are kept
 *   test_rt_cache cache_bound PIE_CACHE_MAX_ENTRIES / PIE_CACHE_MAX_MB evict
 *                             the least recently used entries (a hit is a
 *                             use) at insert and start, never one used in
 *                             the last minute; an evicted loaded module runs
 *   test_rt_cache cache_trims several processes trimming one cache at once
 *                             remove what one would, no more
 *   test_rt_cache cache_drop  a load dropping a bad entry never removes a good
 *                             one another process published in its place
 *   test_rt_cache cache_race  nor does a trim, whenever between its steps
 *                             the fresh entry is published (ptrace)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/rt_internal.h"      /* white-box: the cache sweep */
#include "tests/runtime/rt_test_util.h"

/* ---- the compile cache -------------------------------------------------- */

static char cache_t[512];

static pie_rt *cache_rt(void)
{
    pie_rt_opts o = {.cache_dir = cache_t};
    pie_rt *rt = NULL;
    CHECK_OK(pie_rt_create(&o, &rt));
    return rt;
}

/* Loads name (cached says whether it was a hit) and runs it with a; returns
 * the exit status. */
static int32_t cache_run(pie_rt *rt, const char *name, const char **a,
                         int *cached)
{
    pie_rt_module *m = load_wasm(rt, name, cached);
    char reason[256];
    int32_t st = wait_inst(launch_v(rt, m, NULL, a), reason);
    pie_rt_module_unref(m);
    return st;
}

/* The one *.so in cache_t not named `other`, into out. */
static void find_so(const char *other, char *out, size_t cap)
{
    DIR *d = opendir(cache_t);
    CHECK(d != NULL, "opendir %s", cache_t);
    struct dirent *e;
    out[0] = 0;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n > 3 && !strcmp(e->d_name + n - 3, ".so") &&
            (!other || !strstr(other, e->d_name))) {
            CHECK(!out[0], "more than one new cache entry");
            snprintf(out, cap, "%s/%s", cache_t, e->d_name);
        }
    }
    closedir(d);
    CHECK(out[0], "no cache entry in %s", cache_t);
}

/* Replaces path by a copy of its first n bytes, as a later process finds a
 * crashed writer's entry. (A new file: this process still maps the old one,
 * and cutting a mapped file short would make its own pages fault, SIGBUS.) */
static void truncated_copy(const char *path, off_t n)
{
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.cut", path);
    FILE *in = fopen(path, "rb"), *out = fopen(tmp, "wb");
    CHECK(in && out, "open %s / %s", path, tmp);
    char buf[8192];
    for (off_t left = n; left > 0;) {
        size_t k = fread(buf, 1, left < (off_t)sizeof buf ? (size_t)left
                                                            : sizeof buf, in);
        CHECK(k > 0, "read %s", path);
        CHECK(fwrite(buf, 1, k, out) == k, "write %s", tmp);
        left -= (off_t)k;
    }
    fclose(in);
    CHECK(fclose(out) == 0, "close %s", tmp);
    CHECK(rename(tmp, path) == 0, "rename %s", tmp);
}

static void test_cache(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(120);
    const char *e = getenv("PIE_TEST_CACHE_DIR");
    snprintf(cache_t, sizeof cache_t, "%s_cachetest",
             e && *e ? e : TEST_CACHE_DIR);
    char cmd[2600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", cache_t);
    CHECK(system(cmd) == 0, "%s", cmd);
    const char *ha[] = {"hello", "x", "1", NULL};   /* exits 1 */
    const char *ea[] = {"empty", NULL};             /* exits 0 */
    char hello_so[1024], empty_so[1024];
    int cached;
    pie_rt *rt = cache_rt();
    CHECK(cache_run(rt, "hello.wasm", ha, &cached) == 1 && !cached, "hello");
    find_so(NULL, hello_so, sizeof hello_so);
    CHECK(cache_run(rt, "empty.wasm", ea, &cached) == 0 && !cached, "empty");
    find_so(hello_so, empty_so, sizeof empty_so);
    CHECK(cache_run(rt, "hello.wasm", ha, &cached) == 1 && cached, "hit");

    /* A truncated entry (a crash before the data reached the disk): once
     * SIGBUS inside dlopen at every load. */
    struct stat st;
    CHECK(stat(hello_so, &st) == 0, "stat %s", hello_so);
    truncated_copy(hello_so, st.st_size / 2);
    CHECK(cache_run(rt, "hello.wasm", ha, &cached) == 1 && !cached,
          "truncated entry: not recompiled (cached %d)", cached);
    printf("truncated entry: dropped, recompiled, runs\n");

    /* A symlink from hello's key to empty's entry: once ran empty. */
    CHECK(unlink(hello_so) == 0 && symlink(empty_so, hello_so) == 0,
          "symlink");
    int32_t s = cache_run(rt, "hello.wasm", ha, &cached);
    CHECK(s == 1 && !cached, "symlinked entry: status %d (hello exits 1), "
          "cached %d", s, cached);
    struct stat lst;
    CHECK(lstat(hello_so, &lst) == 0 && S_ISREG(lst.st_mode),
          "the symlink is still there");
    printf("symlinked entry: dropped, hello recompiled and run\n");

    /* A copy of empty's entry under hello's key: the trailer names empty's
     * key, so it is refused. */
    /* (a new file, as in truncated_copy: never rewrite a mapped one) */
    snprintf(cmd, sizeof cmd, "cp --remove-destination '%s' '%s'", empty_so,
             hello_so);
    CHECK(system(cmd) == 0, "%s", cmd);
    s = cache_run(rt, "hello.wasm", ha, &cached);
    CHECK(s == 1 && !cached, "copied entry: status %d, cached %d", s, cached);
    CHECK(cache_run(rt, "empty.wasm", ea, &cached) == 0 && cached,
          "empty's entry still good");
    printf("foreign entry under hello's key: dropped, recompiled\n");
    pie_rt_free(rt);

    /* Stale temp dirs (a server killed mid-compile) are swept at start;
     * a fresh one (a compile in progress) is kept. */
    char old_tmp[600], new_tmp[600];
    snprintf(old_tmp, sizeof old_tmp, "%s/tmp.old123", cache_t);
    snprintf(new_tmp, sizeof new_tmp, "%s/tmp.new123", cache_t);
    CHECK(mkdir(old_tmp, 0700) == 0 && mkdir(new_tmp, 0700) == 0, "mkdir");
    struct timeval tv[2] = {{time(NULL) - 7200, 0}, {time(NULL) - 7200, 0}};
    CHECK(utimes(old_tmp, tv) == 0, "utimes");
    rt = cache_rt();
    CHECK(stat(old_tmp, &st) != 0, "stale %s not swept", old_tmp);
    CHECK(stat(new_tmp, &st) == 0, "fresh %s swept", new_tmp);
    pie_rt_free(rt);
    printf("stale temp dir swept, fresh one kept\n");

    /* A cache dir that others can write is refused with a clear error. */
    CHECK(chmod(cache_t, 0777) == 0, "chmod");
    pie_rt_opts o = {.cache_dir = cache_t};
    rt = NULL;
    int rc = pie_rt_create(&o, &rt);
    CHECK(rc == PIE_EPERM && !rt && strstr(pie_err_msg(), "writable by group "
                                           "or others (mode 777)"),
          "world-writable cache dir: rc %d (%s)", rc, pie_err_msg());
    printf("refused: %s\n", pie_err_msg());
    CHECK(chmod(cache_t, 0700) == 0, "chmod back");
    rt = cache_rt();
    pie_rt_free(rt);

    /* So is one whose parent others could write (not sticky) or, where the
     * test runs as root, whose parent another user owns: either could
     * rename the cache dir and put their own in its place. */
    char parent[600], child[640];
    snprintf(parent, sizeof parent, "%s/parent", cache_t);
    snprintf(child, sizeof child, "%s/cache", parent);
    CHECK(mkdir(parent, 0700) == 0 && mkdir(child, 0700) == 0, "mkdir");
    CHECK(chmod(parent, 0777) == 0, "chmod");
    pie_rt_opts op = {.cache_dir = child};
    rt = NULL;
    rc = pie_rt_create(&op, &rt);
    CHECK(rc == PIE_EPERM && !rt && strstr(pie_err_msg(), "not sticky"),
          "cache dir in a world-writable parent: rc %d (%s)", rc, pie_err_msg());
    printf("refused: %s\n", pie_err_msg());
    CHECK(chmod(parent, 01777) == 0, "chmod");     /* sticky, as /tmp */
    rt = NULL;
    CHECK_OK(pie_rt_create(&op, &rt));
    pie_rt_free(rt);
    CHECK(chmod(parent, 0700) == 0, "chmod");
    if (geteuid() == 0) {
        CHECK(chown(parent, 65534, 65534) == 0, "chown");
        rt = NULL;
        rc = pie_rt_create(&op, &rt);
        CHECK(rc == PIE_EPERM && !rt && strstr(pie_err_msg(), "owned by uid "
                                               "65534"),
              "cache dir in another user's dir: rc %d (%s)", rc, pie_err_msg());
        printf("refused: %s\n", pie_err_msg());
        CHECK(chown(parent, 0, 0) == 0, "chown back");
    }
    alarm(0);
}

/* ---- cache cleanup: dead entries and the size/count bound --------------- */

/* Points cache_t at a new, empty directory <test cache>_<what>. */
static void cache_fresh(const char *what)
{
    const char *e = getenv("PIE_TEST_CACHE_DIR");
    snprintf(cache_t, sizeof cache_t, "%s_%s", e && *e ? e : TEST_CACHE_DIR,
             what);
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -m 700 '%s'", cache_t,
             cache_t);
    CHECK(system(cmd) == 0, "%s", cmd);
}

/* cache_t/name (or name itself when absolute) into out. */
static const char *cpath(const char *name, char *out, size_t cap)
{
    if (name[0] == '/')
        snprintf(out, cap, "%s", name);
    else
        snprintf(out, cap, "%s/%s", cache_t, name);
    return out;
}

static bool cexists(const char *name)
{
    char p[1100];
    struct stat st;
    return lstat(cpath(name, p, sizeof p), &st) == 0;
}

/* Sets name's access and modification time to age seconds ago. */
static void cage(const char *name, int age)
{
    char p[1100];
    struct timeval tv[2] = {{time(NULL) - age, 0}, {time(NULL) - age, 0}};
    CHECK(utimes(cpath(name, p, sizeof p), tv) == 0, "utimes %s", p);
}

/* "<c x 64>.so": a name of the cache entry pattern. */
static const char *ename(char c)
{
    static char buf[8][72];
    static int k;
    char *b = buf[k++ % 8];
    memset(b, c, 64);
    strcpy(b + 64, ".so");
    return b;
}

#define NO_TRAILER (-1)

/* Writes a stand-in cache entry: n bytes of "ELF", then (unless version is
 * NO_TRAILER) the 120-byte trailer of runtime/loader.c's header comment
 * with that version and key (64 chars); aged age seconds. */
static void put_entry(const char *name, size_t n, int version,
                      const char *key, int age)
{
    char p[1100];
    FILE *f = fopen(cpath(name, p, sizeof p), "wb");
    CHECK(f != NULL, "create %s", p);
    char *body = calloc(1, n);
    CHECK(body && fwrite(body, 1, n, f) == n, "write %s", p);
    free(body);
    if (version != NO_TRAILER) {
        struct {
            char magic[8]; uint32_t version, zero; uint64_t elf_len;
            char key[64]; uint8_t sha256[32];
        } t = {{'P', 'I', 'E', 'S', 'O', 'T', 'R', 'L'}, (uint32_t)version,
               0, n, {0}, {0}};
        _Static_assert(sizeof t == 120, "trailer layout");
        memcpy(t.key, key, 64);
        CHECK(fwrite(&t, sizeof t, 1, f) == 1, "write %s", p);
    }
    CHECK(fclose(f) == 0, "close %s", p);
    cage(name, age);
}

/* Number of names of the entry pattern in cache_t. */
static int count_entries(void)
{
    DIR *d = opendir(cache_t);
    CHECK(d != NULL, "opendir %s", cache_t);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strlen(e->d_name) == 67 && !strcmp(e->d_name + 64, ".so");
    closedir(d);
    return n;
}

/* Entries no pie from this one on can load are removed when a runtime
 * starts and at each insert: one without a trailer (before trailers), an
 * older trailer version, a trailer naming another key. Kept: a newer
 * pie's entry, a good one, a dead one used in the last minute (a process
 * may be loading it), and everything that is not an entry of ours. */
static void test_cache_dead(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(120);
    cache_fresh("cachedead");
    const int old = 7200;
    put_entry(ename('1'), 4096, NO_TRAILER, NULL, old);     /* removed */
    put_entry(ename('2'), 4096, 0, ename('2'), old);        /* removed */
    put_entry(ename('3'), 4096, 1, ename('4'), old);        /* removed */
    put_entry(ename('5'), 4096, 2, ename('4'), old);        /* newer: kept */
    put_entry(ename('6'), 4096, 1, ename('6'), old);        /* good: kept */
    put_entry(ename('7'), 4096, NO_TRAILER, NULL, 0);       /* fresh: kept */
    /* Not entries (name, type or owner), each dead inside and old. */
    char outside[600], upper[80], short_[80], bak[80];
    snprintf(outside, sizeof outside, "%s_outside.so", cache_t);
    snprintf(upper, sizeof upper, "%s", ename('A'));
    snprintf(short_, sizeof short_, "%s", ename('8') + 1);
    snprintf(bak, sizeof bak, "%s.bak", ename('9'));
    const char *others[] = {"notes.txt", upper, short_, bak};
    for (int k = 0; k < 4; k++)
        put_entry(others[k], 4096, NO_TRAILER, NULL, old);
    put_entry(outside, 4096, NO_TRAILER, NULL, old);
    char p[1100];
    CHECK(symlink(outside, cpath(ename('b'), p, sizeof p)) == 0, "symlink");
    CHECK(mkdir(cpath(ename('c'), p, sizeof p), 0700) == 0, "mkdir");
    CHECK(mkfifo(cpath(ename('d'), p, sizeof p), 0600) == 0, "mkfifo");
    cage(ename('c'), old);
    cage(ename('d'), old);
    if (geteuid() == 0) {
        put_entry(ename('e'), 4096, NO_TRAILER, NULL, old);
        CHECK(chown(cpath(ename('e'), p, sizeof p), 65534, 65534) == 0, "chown");
    }
    pie_rt *rt = cache_rt();
    CHECK(!cexists(ename('1')), "entry without a trailer not removed");
    CHECK(!cexists(ename('2')), "entry of trailer version 0 not removed");
    CHECK(!cexists(ename('3')), "entry whose trailer names another key not "
          "removed");
    CHECK(cexists(ename('5')), "a newer pie's entry (trailer version 2, "
          "whose other fields this pie cannot judge) was removed");
    CHECK(cexists(ename('6')), "a good entry was removed");
    CHECK(cexists(ename('7')), "a dead entry written a moment ago was removed");
    for (int k = 0; k < 4; k++)
        CHECK(cexists(others[k]), "%s (not an entry name) was removed",
              others[k]);
    CHECK(cexists(outside), "a symlink's target outside the cache was removed");
    const char *kinds[] = {"symlink", "directory", "fifo"};
    for (int k = 0; k < 3; k++)
        CHECK(cexists(ename((char)('b' + k))), "a %s with an entry name was "
              "removed", kinds[k]);
    if (geteuid() == 0)
        CHECK(cexists(ename('e')), "another user's file was removed");
    printf("start: dead entries (no trailer, version 0, another key) removed; "
           "newer, good, fresh and non-entries kept\n");

    /* At insert: compiling a module removes a dead entry found then. */
    put_entry(ename('1'), 4096, NO_TRAILER, NULL, old);
    const char *ea[] = {"empty", NULL};
    int cached;
    CHECK(cache_run(rt, "empty.wasm", ea, &cached) == 0 && !cached, "empty");
    CHECK(!cexists(ename('1')), "a dead entry survived an insert");
    printf("insert: dead entry removed\n");
    pie_rt_free(rt);
    unlink(outside);
    alarm(0);
}

/* The entry for name in cache_t, found by loading it into a runtime of a
 * private cache whose only entry it then is. */
static void entry_of(const char *name, char *out, size_t cap)
{
    char saved[512];
    snprintf(saved, sizeof saved, "%s", cache_t);
    cache_fresh("cachekey");
    pie_rt *rt = cache_rt();
    pie_rt_module_unref(load_wasm(rt, name, NULL));
    pie_rt_free(rt);
    char path[1100];
    find_so(NULL, path, sizeof path);
    snprintf(out, cap, "%s", strrchr(path, '/') + 1);
    snprintf(cache_t, sizeof cache_t, "%s", saved);
}

/* The count bound at insert: least recently used first (a cache hit is a
 * use), never an entry used in the last minute; an evicted entry's loaded
 * module still runs. */
static void cache_bound_count(void)
{
    const char *mods[] = {"hello.wasm", "empty.wasm", "idle.wasm",
                          "calls.wasm"};
    char so[4][100];
    for (int k = 0; k < 4; k++)
        entry_of(mods[k], so[k], sizeof so[k]);
    cache_fresh("cachebound");
    setenv("PIE_CACHE_MAX_ENTRIES", "2", 1);
    pie_rt *rt = cache_rt();
    int cached;
    pie_rt_module *hello = load_wasm(rt, mods[0], &cached);
    pie_rt_module_unref(load_wasm(rt, mods[1], &cached));
    pie_rt_module_unref(load_wasm(rt, mods[2], &cached));
    CHECK(count_entries() == 3, "expected 3 entries (all used in the last "
          "minute, so none evicted), found %d", count_entries());
    cage(so[0], 3 * 3600);
    cage(so[1], 2 * 3600);
    cage(so[2], 3600);
    pie_rt_module *h2 = load_wasm(rt, mods[0], &cached);
    CHECK(cached == 1, "hello not a hit");
    pie_rt_module_unref(h2);
    char p[1100];
    struct stat st;
    CHECK(stat(cpath(so[0], p, sizeof p), &st) == 0 &&
          st.st_mtime > time(NULL) - 60, "a cache hit did not mark hello's "
          "entry used (mtime %lld s ago)",
          (long long)(time(NULL) - st.st_mtime));
    pie_rt_module_unref(load_wasm(rt, mods[3], &cached));    /* insert */
    CHECK(!cexists(so[1]) && !cexists(so[2]), "least recently used entries "
          "not evicted at insert: empty %d, idle %d", cexists(so[1]),
          cexists(so[2]));
    CHECK(cexists(so[0]) && cexists(so[3]), "recently used entries evicted: "
          "hello %d, calls %d", cexists(so[0]), cexists(so[3]));
    CHECK(count_entries() == 2, "expected 2 entries, found %d",
          count_entries());
    printf("count bound 2: the two least recently used of 4 evicted at "
           "insert; hello (a hit) kept\n");

    /* An evicted entry this process has loaded keeps working. */
    cage(so[0], 3600);
    setenv("PIE_CACHE_MAX_ENTRIES", "1", 1);
    pie_rt_module_unref(load_wasm(rt, mods[1], &cached));    /* insert */
    CHECK(!cexists(so[0]), "hello's entry not evicted");
    const char *ha[] = {"hello", "x", "1", NULL};
    char reason[256];
    int32_t s = wait_inst(launch_v(rt, hello, NULL, ha), reason);
    CHECK(s == 1, "hello, loaded before its entry was evicted: status %d "
          "(%s), expected 1", s, reason);
    pie_rt_module_unref(hello);
    CHECK(cache_run(rt, mods[0], ha, &cached) == 1 && !cached,
          "hello after eviction: cached %d", cached);
    pie_rt_free(rt);
    unsetenv("PIE_CACHE_MAX_ENTRIES");
    printf("a loaded module whose entry was evicted still runs; reloaded, it "
           "is compiled again\n");
}

/* The size bound, at start: 4 entries of 400,000 bytes, 1 MiB allowed: the
 * two oldest go. Bad values of either bound fall back to the defaults. */
static void cache_bound_size(void)
{
    cache_fresh("cachesize");
    setenv("PIE_CACHE_MAX_ENTRIES", "0", 1);                 /* no bound */
    setenv("PIE_CACHE_MAX_MB", "1", 1);
    for (int k = 0; k < 4; k++)
        put_entry(ename((char)('a' + k)), 400000, 1, ename((char)('a' + k)),
                  (4 - k) * 3600);
    pie_rt_free(cache_rt());                        /* trims at start */
    CHECK(!cexists(ename('a')) && !cexists(ename('b')) && cexists(ename('c'))
          && cexists(ename('d')), "size bound 1 MiB: expected the 2 oldest "
          "of 4 x 400 kB evicted, kept: %d %d %d %d", cexists(ename('a')),
          cexists(ename('b')), cexists(ename('c')), cexists(ename('d')));
    printf("size bound 1 MiB: 2 oldest of 4 x 400 kB evicted at start\n");

    /* Bad values fall back to the defaults (hundreds of entries and MB). */
    setenv("PIE_CACHE_MAX_ENTRIES", "2x", 1);
    setenv("PIE_CACHE_MAX_MB", "-1", 1);
    put_entry(ename('a'), 4096, 1, ename('a'), 7200);
    put_entry(ename('b'), 4096, 1, ename('b'), 7200);
    pie_rt_free(cache_rt());                        /* trims at start */
    CHECK(count_entries() == 4, "bad bounds: expected the defaults (4 entries "
          "kept), found %d", count_entries());
    unsetenv("PIE_CACHE_MAX_ENTRIES");
    unsetenv("PIE_CACHE_MAX_MB");
    printf("bad PIE_CACHE_MAX_* values: defaults used\n");
}

/* The bound on the cache: PIE_CACHE_MAX_ENTRIES and PIE_CACHE_MAX_MB,
 * enforced at insert and at start. */
static void test_cache_bound(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(240);
    cache_bound_count();
    cache_bound_size();
    alarm(0);
}

/* ---- cache cleanup by several processes at once ------------------------ */

/* Forks k processes that trim cache_t together (k servers starting on one
 * cache): each blocks on a pipe until all are forked. Waits for all. */
static void trims_at_once(int k)
{
    int go[2];
    CHECK(pipe(go) == 0, "pipe");
    for (int i = 0; i < k; i++) {
        pid_t pid = fork();
        CHECK(pid >= 0, "fork");
        if (pid == 0) {
            char c;
            close(go[1]);
            if (read(go[0], &c, 1) < 0)
                _exit(1);
            pie__rt_cache_sweep(cache_t);
            _exit(0);
        }
    }
    close(go[0]);
    close(go[1]);                           /* EOF: all start together */
    int st;
    for (int i = 0; i < k; i++) {
        CHECK(wait(&st) > 0, "wait");
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "a trim ended with "
              "status 0x%x", st);
    }
}

/* "<k as 64 hex digits>.so": the k-th of many entry names. */
static const char *nth_name(int k)
{
    static char buf[4][72];
    static int i;
    char *b = buf[i++ % 4];
    snprintf(b, 72, "%064x.so", k);
    return b;
}

/* k trims at once over 2,000 entries older than the grace, bound 1,000:
 * together they remove what one would, the 1,000 least recently used.
 * Once each went on past the entries another had removed first, and 2
 * trims at once left none. */
static void test_cache_trims(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(240);
    setenv("PIE_CACHE_MAX_ENTRIES", "1000", 1);
    setenv("PIE_CACHE_MAX_MB", "0", 1);
    const int ks[] = {1, 2, 4, 8};
    for (int r = 0; r < 4; r++) {
        cache_fresh("cachetrims");
        for (int k = 0; k < 2000; k++)          /* k-th least recently used */
            put_entry(nth_name(k), 1000, 1, nth_name(k), 7200 + 2000 - k);
        trims_at_once(ks[r]);
        int n = count_entries();
        CHECK(n == 1000, "%d trims at once, 2000 entries, bound 1000: "
              "expected 1000 left, got %d", ks[r], n);
        CHECK(!cexists(nth_name(999)) && cexists(nth_name(1000)), "%d trims at "
              "once: not the least recently used removed (entry 999 %d, 1000 "
              "%d)", ks[r], cexists(nth_name(999)), cexists(nth_name(1000)));
        printf("%d trims at once: 2000 entries -> 1000, the oldest gone\n",
               ks[r]);
    }
    unsetenv("PIE_CACHE_MAX_ENTRIES");
    unsetenv("PIE_CACHE_MAX_MB");
    alarm(0);
}

/* A pipe whose buffer is full: a blocking write to p[1] waits until p[0]
 * is read. */
static void full_pipe(int p[2])
{
    CHECK(pipe(p) == 0, "pipe");
    int fl = fcntl(p[1], F_GETFL);
    CHECK(fcntl(p[1], F_SETFL, fl | O_NONBLOCK) == 0, "fcntl");
    char buf[4096] = {0};
    while (write(p[1], buf, sizeof buf) > 0) {}
    CHECK(errno == EAGAIN, "filling a pipe: %s", strerror(errno));
    while (write(p[1], buf, 1) > 0) {}
    CHECK(fcntl(p[1], F_SETFL, fl) == 0, "fcntl");
}

/* In a child whose stderr is err: loads hello from cache_t with its
 * compiler limited to 1 MiB of address space, so that a compile fails at
 * once. Exits 0 if the load failed, as it must. */
static void drop_child(int err)
{
    dup2(err, 2);
    size_t len;
    char path[1024];
    snprintf(path, sizeof path, "%s/hello.wasm", TEST_WASM_DIR);
    unsigned char *b = read_file(path, &len);
    pie_rt_opts o = {.cache_dir = cache_t, .compile_mem = 1 << 20};
    pie_rt *rt = NULL;
    pie_rt_module *m = NULL;
    if (pie_rt_create(&o, &rt) != 0)
        _exit(2);
    _exit(pie_rt_module_load(rt, b, len, &m, NULL) == 0);
}

/* Waits for an event on name from inotify instance fd: a change of its
 * times (setting only the mtime, as a load marks its entry used, is
 * IN_MODIFY; both, IN_ATTRIB). */
static void wait_touch(int fd, const char *name)
{
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        CHECK(n > 0, "inotify read: %s", strerror(errno));
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if ((ev->mask & (IN_ATTRIB | IN_MODIFY)) && ev->len &&
                !strcmp(ev->name, name))
                return;
            p += sizeof *ev + ev->len;
        }
    }
}

/* A load that finds its entry bad drops it, but never a good entry that
 * another process's compile published under that name after the check.
 * Made deterministic: the loading child's stderr is a full pipe, so it
 * stops in its "dropping cache entry" message, between its check and the
 * drop; the test publishes a good entry then (a rename, as a compile
 * does) and lets the child go on. The child's own compile then fails, so
 * the name holds what the drop left. Once the drop unlinked the name and
 * took the good entry with it. */
static void test_cache_drop(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(120);
    cache_fresh("cachedrop");
    pie_rt *rt = cache_rt();
    pie_rt_module_unref(load_wasm(rt, "hello.wasm", NULL));
    pie_rt_free(rt);
    char good[1100], so[80], p[1100];
    find_so(NULL, good, sizeof good);
    snprintf(so, sizeof so, "%s", strrchr(good, '/') + 1);
    CHECK(rename(good, cpath("good.bin", p, sizeof p)) == 0, "rename");
    struct stat gst, st;
    CHECK(stat(p, &gst) == 0, "stat %s", p);
    put_entry(so, 4096, 1, so, 0);      /* its key, bytes not its sha256 */

    int in = inotify_init1(IN_CLOEXEC);
    CHECK(in >= 0 &&
          inotify_add_watch(in, cache_t, IN_ATTRIB | IN_MODIFY) >= 0,
          "inotify on %s", cache_t);
    int err[2];
    full_pipe(err);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        close(err[0]);
        drop_child(err[1]);
    }
    close(err[1]);
    wait_touch(in, so);             /* the child opened and marked it */
    char good_path[1100];
    CHECK(rename(cpath("good.bin", good_path, sizeof good_path),
                 cpath(so, p, sizeof p)) == 0, "publishing the good entry");
    static char msg[1 << 18];       /* the filler (NULs), then its stderr */
    size_t n = 0;
    for (ssize_t k; (k = read(err[0], msg + n, sizeof msg - 1 - n)) > 0;)
        n += (size_t)k;             /* drain: the child goes on; to EOF */
    msg[n] = 0;
    const char *tail = n > 300 ? msg + n - 300 : msg;
    close(err[0]);
    close(in);
    int wst;
    CHECK(waitpid(pid, &wst, 0) == pid && WIFEXITED(wst) &&
          WEXITSTATUS(wst) == 0, "child: status 0x%x (0: its compile failed, "
          "as meant)", wst);
    CHECK(memmem(msg, n, "dropping cache entry", 20), "the child did not drop "
          "its bad entry; its stderr ends: %s", tail);
    CHECK(lstat(p, &st) == 0 && st.st_ino == gst.st_ino, "the good entry "
          "published while a load dropped the bad one is gone (%s)",
          errno == ENOENT ? "no entry" : "another file");
    rt = cache_rt();
    int cached;
    pie_rt_module_unref(load_wasm(rt, "hello.wasm", &cached));
    CHECK(cached == 1, "the good entry kept is not a cache hit");
    pie_rt_free(rt);
    printf("a good entry published during a load's drop of the bad one is "
           "kept, and loads\n");
    alarm(0);
}

/* ---- a trim against compiles publishing between its steps ------------- */

#define RACE_N   70                 /* DEAD entries the traced trim removes */
#define RACE_GAPS 7                 /* publish 1..RACE_GAPS calls after   */

/* The index k of the entry (named nth_name(k)) that fd of traced process
 * pid is open on, or -1. */
static int traced_entry(pid_t pid, uint64_t fd)
{
    char link[64], path[1100];
    snprintf(link, sizeof link, "/proc/%d/fd/%llu", (int)pid,
             (unsigned long long)fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return -1;
    path[n] = 0;
    const char *b = strrchr(path, '/');
    unsigned k;
    return b && strlen(b + 1) == 67 && sscanf(b + 1, "%x", &k) == 1 &&
           k < RACE_N ? (int)k : -1;
}

/* Publishes the fresh entry k over nth_name(k): a rename, as a compile's. */
static void race_publish(int k)
{
    char from[1100], to[1100], f[32];
    snprintf(f, sizeof f, "fresh.%d", k);
    CHECK(rename(cpath(f, from, sizeof from), cpath(nth_name(k), to,
                                                    sizeof to)) == 0,
          "publishing %s", from);
}

/* One stop of traced process pid at a system call's entry: publishes the
 * pending entry when its countdown ends; after the trim closed entry k
 * (done examining it), makes k pending for k % RACE_GAPS + 1 calls. */
static void race_step(pid_t pid, int *pending, int *countdown)
{
    struct __ptrace_syscall_info si;
    CHECK(ptrace(PTRACE_GET_SYSCALL_INFO, pid, sizeof si, &si) > 0,
          "PTRACE_GET_SYSCALL_INFO: %s", strerror(errno));
    if (si.op != PTRACE_SYSCALL_INFO_ENTRY)
        return;
    if (*pending >= 0 && --*countdown == 0) {
        race_publish(*pending);
        *pending = -1;
    }
    int k;
    if (si.entry.nr == SYS_close &&
        (k = traced_entry(pid, si.entry.args[0])) >= 0) {
        *pending = k;
        *countdown = k % RACE_GAPS + 1;
    }
}

/* Trims cache_t in a child stopped at each system call (ptrace); entry k
 * is published afresh k % RACE_GAPS + 1 calls after the trim examined
 * it: in turn between each of the steps that remove it (some 5 calls).
 * Skips the test where tracing is refused. */
static void trim_traced(void)
{
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
            _exit(77);
        raise(SIGSTOP);
        pie__rt_cache_sweep(cache_t);
        _exit(0);
    }
    int st, sig = 0, pending = -1, countdown = 0;
    CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
    if (WIFEXITED(st) && WEXITSTATUS(st) == 77)
        TEST_SKIP("ptrace refused here");
    CHECK(WIFSTOPPED(st) && ptrace(PTRACE_SETOPTIONS, pid, 0,
                                   PTRACE_O_TRACESYSGOOD |
                                   PTRACE_O_EXITKILL) == 0, "tracing the trim");
    for (;;) {
        CHECK(ptrace(PTRACE_SYSCALL, pid, 0, sig) == 0, "PTRACE_SYSCALL");
        CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
        if (WIFEXITED(st) || WIFSIGNALED(st))
            break;
        sig = WSTOPSIG(st) == (SIGTRAP | 0x80) ? 0 : WSTOPSIG(st);
        if (!sig)
            race_step(pid, &pending, &countdown);
    }
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the trim: status 0x%x", st);
    if (pending >= 0)
        race_publish(pending);      /* the trim ended first: after it, then */
}

/* A trim never removes a fresh entry a compile published over the one it
 * examined, whenever between its steps the publishing rename comes. Once
 * the trim checked the name, then unlinked the name: a rename in between
 * lost the fresh entry. Made deterministic by tracing the trim. */
static void test_cache_race(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(120);
    cache_fresh("cacherace");
    ino_t fresh[RACE_N];
    for (int k = 0; k < RACE_N; k++) {
        char f[32], p[1100];
        struct stat st;
        snprintf(f, sizeof f, "fresh.%d", k);
        put_entry(nth_name(k), 4096, NO_TRAILER, NULL, 7200);     /* DEAD */
        put_entry(f, 4096, 1, nth_name(k), 0);         /* good, just made */
        CHECK(stat(cpath(f, p, sizeof p), &st) == 0, "stat %s", p);
        fresh[k] = st.st_ino;
    }
    trim_traced();
    int lost[RACE_GAPS] = {0}, n_lost = 0;
    for (int k = 0; k < RACE_N; k++) {
        char f[32], p[1100];
        struct stat st;
        snprintf(f, sizeof f, "fresh.%d", k);
        CHECK(!cexists(f), "%s never published: the trim did not examine "
              "entry %d", f, k);
        if (lstat(cpath(nth_name(k), p, sizeof p), &st) != 0 ||
            st.st_ino != fresh[k]) {
            lost[k % RACE_GAPS]++;
            n_lost++;
        }
    }
    CHECK(n_lost == 0, "%d of %d fresh entries lost; by system calls after "
          "the trim examined the old one (1..7): %d %d %d %d %d %d %d",
          n_lost, RACE_N, lost[0], lost[1], lost[2], lost[3], lost[4],
          lost[5], lost[6]);
    DIR *d = opendir(cache_t);
    struct dirent *e;
    while (d && (e = readdir(d)))
        CHECK(strncmp(e->d_name, "tmp.", 4), "%s left behind", e->d_name);
    closedir(d);
    printf("%d fresh entries published between the trim's steps: all kept\n",
           RACE_N);
    alarm(0);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "cache")) test_cache();
    else if (!strcmp(t, "cache_dead")) test_cache_dead();
    else if (!strcmp(t, "cache_bound")) test_cache_bound();
    else if (!strcmp(t, "cache_trims")) test_cache_trims();
    else if (!strcmp(t, "cache_drop")) test_cache_drop();
    else if (!strcmp(t, "cache_race")) test_cache_race();
    else {
        fprintf(stderr, "usage: test_rt_cache cache|cache_dead|cache_bound|"
                        "cache_trims|cache_drop|cache_race\n");
        return 2;
    }
    test_n_checks += rt_test_checks();
    TEST_DONE();
}
