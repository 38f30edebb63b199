/*
 * test_rt_limits.c — the WebAssembly inferlet runtime, end to end (as
 * test_runtime.c), at scale and at its limits: many instances at once and
 * many in turn, stacks nearly full, tables, CPU limits and kills.
 *
 *   test_rt_limits concurrent  2,000 instances parked at once
 *   test_rt_limits cycles      20,000 launch/exit cycles: fds, maps, RSS flat
 *   test_rt_limits deep        host calls made with the fiber stack nearly
 *                              full trap cleanly; the runtime goes on
 *   test_rt_limits limits      a module's initial tables are capped; table
 *                              bytes count against the memory limit; a
 *                              start section's host call sees linear memory
 *   test_rt_limits libc_deep   libm/libc calls from guest code with the fiber
 *                              stack nearly full trap cleanly, never crash
 *   test_rt_limits cpu_libc    the CPU limit and pie_rt_kill end an instance
 *                              that spends its time in libc's memmove
 *   test_rt_limits grow_kill   a CPU limit landing inside memory.grow leaves
 *                              the pool's recorded size equal to what is
 *                              read-write
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "tests/runtime/rt_test_util.h"

/* ---- scale -------------------------------------------------------------- */

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int n = 0, ch;
    while (f && (ch = fgetc(f)) != EOF)
        n += ch == '\n';
    if (f)
        fclose(f);
    return n;
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    while (d && readdir(d))
        n++;
    if (d)
        closedir(d);
    return n;
}

static void test_concurrent(void)
{
    enum { N = 2000 };
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "msg.wasm", NULL);
    static pie_rt_instance *is[N];
    static capture *cs[N];
    const char *argv[] = {"msg", "block", NULL};
    long rss0 = rss_kib();
    for (int k = 0; k < N; k++)
        is[k] = launch_msg(rt, m, &cs[k], argv);
    /* Wait until every instance has parked (a probe future in each). */
    usleep(300000);
    CHECK(pie_rt_live_instances(rt) == N, "live %d", pie_rt_live_instances(rt));
    long rss1 = rss_kib();
    printf("%d blocked instances: RSS +%ld KiB (%.1f KiB each)\n", N,
           rss1 - rss0, (double)(rss1 - rss0) / N);
    for (int k = 0; k < N; k++) {
        char msg[32];
        int l = snprintf(msg, sizeof msg, "m%d", k);
        CHECK_OK(pie_rt_send(is[k], msg, l));
    }
    for (int k = 0; k < N; k++) {
        char want[64];
        snprintf(want, sizeof want, "m%d:%u", k, pie_rt_instance_id(is[k]));
        finish_msg(is[k], cs[k], 0, want);
    }
    CHECK(pie_rt_live_instances(rt) == 0, "live after");
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

static void test_cycles(void)
{
    int total = getenv("PIE_TEST_CYCLES") ? atoi(getenv("PIE_TEST_CYCLES"))
                                          : 20000;
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "hello.wasm", NULL);
    const char *argv[] = {"hello", "x", "1", NULL};
    enum { BATCH = 100 };
    /* Warm-up: BATCH instances alive at once (parked), so the runtime's
     * bounded stack and memory pools reach the size the cycles below need
     * whatever the thread timing; growth after that would be a leak. */
    {
        pie_rt_module *mm = load_wasm(rt, "msg.wasm", NULL);
        const char *bv[] = {"msg", "block", NULL};
        pie_rt_instance *is[BATCH];
        for (int k = 0; k < BATCH; k++)
            CHECK_OK(pie_rt_launch(rt, mm, 2, bv, NULL, &is[k]));
        for (int k = 0; k < BATCH; k++)
            CHECK_OK(pie_rt_send(is[k], "x", 1));
        for (int k = 0; k < BATCH; k++) {
            CHECK(pie_rt_wait(is[k], NULL, 0) == 0, "warm-up %d", k);
            pie_rt_instance_unref(is[k]);
        }
        pie_rt_module_unref(mm);
    }
    long rss0 = 0;
    int maps0 = 0, fds0 = 0;
    for (int done = 0; done < total; done += BATCH) {
        pie_rt_instance *is[BATCH];
        for (int k = 0; k < BATCH; k++)
            CHECK_OK(pie_rt_launch(rt, m, 3, argv, NULL, &is[k]));
        for (int k = 0; k < BATCH; k++) {
            int32_t st = pie_rt_wait(is[k], NULL, 0);
            CHECK(st == 1, "cycle %d: status %d", done + k, st);
            pie_rt_instance_unref(is[k]);
        }
        if (done == 1000) {
            rss0 = rss_kib();
            maps0 = count_lines("/proc/self/maps");
            fds0 = count_fds();
        }
    }
    long rss1 = rss_kib();
    int maps1 = count_lines("/proc/self/maps"), fds1 = count_fds();
    printf("%d cycles: RSS %ld -> %ld KiB, maps %d -> %d, fds %d -> %d\n",
           total, rss0, rss1, maps0, maps1, fds0, fds1);
    CHECK(fds1 == fds0, "fd leak: %d -> %d", fds0, fds1);
    CHECK(maps1 <= maps0 + 8, "mapping leak: %d -> %d", maps0, maps1);
#ifndef __SANITIZE_ADDRESS__
    /* (Under ASan freed memory sits in its quarantine: RSS says nothing.) */
    CHECK(rss1 - rss0 < 16 * 1024, "RSS grew by %ld KiB", rss1 - rss0);
#endif
    CHECK(pie_rt_live_instances(rt) == 0, "live instances left");
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

/* ---- stack and table limits --------------------------------------------- */

/* Runs module `name` (deep.wasm, libc_deep.wasm) recursing to depth d,
 * then doing op at the bottom (NULL: nothing). */
static int32_t run_depth(pie_rt *rt, pie_rt_module *m, const char *name,
                         uint32_t d, const char *op, char reason[256])
{
    char ds[16];
    snprintf(ds, sizeof ds, "%u", d);
    const char *a[] = {name, ds, op, NULL};
    return wait_inst(launch_v(rt, m, NULL, a), reason);
}

static int32_t run_deep(pie_rt *rt, pie_rt_module *m, uint32_t d,
                        bool publish, char reason[256])
{
    return run_depth(rt, m, "deep", d, publish ? "publish" : NULL, reason);
}

/* The deepest recursion of `name` with op at the bottom that finishes;
 * every deeper one must end in a clean stack trap. */
static uint32_t deepest_fit(pie_rt *rt, pie_rt_module *m, const char *name,
                            const char *op)
{
    char reason[256];
    uint32_t lo = 1, hi = 1u << 20;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        int32_t st = run_depth(rt, m, name, mid, op, reason);
        CHECK(st == 0 || strstr(reason, "native stack exhausted"),
              "depth %u: status %d (%s)", mid, st, reason);
        if (st == 0)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* The deep-recursion tests' runtime: 256 KiB fiber stacks (o), under a
 * 60 s alarm should a trap hang the server; and its module. */
static pie_rt_module *deep_open(const char *wasm, pie_rt_opts *o, pie_rt **rt)
{
    signal(SIGALRM, hang_alarm);
    alarm(60);
    *o = (pie_rt_opts){.fiber_stack = 256u << 10};
    *rt = make_rt(o);
    return load_wasm(*rt, wasm, NULL);
}

static void deep_close(pie_rt *rt, pie_rt_module *m)
{
    pie_rt_module_unref(m);
    pie_rt_free(rt);
    alarm(0);
}

/* A host call (publish: malloc under rt->lock) made with the guest's frames
 * just above the stack guard once faulted in host code; the trap unwound
 * with the lock held and the server hung. Every such call must end its
 * instance with a clear trap, and the runtime must go on. */
static void test_deep(void)
{
    pie_rt_opts o;
    pie_rt *rt;
    pie_rt_module *m = deep_open("deep.wasm", &o, &rt);
    char reason[256];
    /* The deepest recursion that fits, without a host call at the bottom. */
    uint32_t lo = deepest_fit(rt, m, "deep", NULL);
    double frame = (double)(o.fiber_stack - (64u << 10)) / lo;
    /* Publish from there upwards: each depth while under 8 KiB is left
     * (where host code would fault), then steps of about 1 KiB until the
     * call has room (the host reserve is 64 KiB). */
    uint32_t d = lo, ok_depth = 0, host_traps = 0, runs = 0;
    while (d > 1) {
        int32_t st = run_deep(rt, m, d, true, reason);
        runs++;
        if (st == 0) {
            ok_depth = d;
            break;
        }
        CHECK(st == PIE_ETRAP && strstr(reason, "native stack exhausted"),
              "publish at depth %u: status %d (%s)", d, st, reason);
        host_traps += strstr(reason, "host call") != NULL;
        uint32_t step = (lo - d) * frame < 8192 ? 1 : 1 + (uint32_t)(1024 / frame);
        d = d > step ? d - step : 1;
    }
    double left = (lo - ok_depth) * frame;
    printf("max depth %u (~%.0f B a frame); %u publishing runs: %u trapped "
           "at the host entry; publish fits %u frames up (~%.0f KiB)\n", lo,
           frame, runs, host_traps, lo - ok_depth, left / 1024);
    CHECK(host_traps > 0, "no host call trapped for lack of stack");
    CHECK(ok_depth > 0 && left < (160u << 10),
          "publish never fit (last depth %u, ~%.0f KiB left)", ok_depth, left);
    /* The runtime still serves the same calls. */
    CHECK(run_deep(rt, m, 100, true, reason) == 0, "publish after traps: %s",
          reason);
    deep_close(rt, m);
}

static void test_limits(void)
{
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    pie_rt_module *m = load_wasm(rt, "bigtable.wasm", NULL);
    const char *a[] = {"bigtable", NULL};
    char reason[256];
    int32_t st = wait_inst(launch_v(rt, m, NULL, a), reason);
    getrusage(RUSAGE_SELF, &ru1);
    long grew = ru1.ru_maxrss - ru0.ru_maxrss;
    printf("bigtable: status %d (%s); peak RSS +%ld KiB\n", st, reason, grew);
    CHECK(st == PIE_ETRAP, "bigtable: expected a trap, got status %d", st);
    CHECK(strstr(reason, "table limit: the module's initial funcref table "
                         "has 50000000 elements, the cap is 1048576"),
          "bigtable: reason '%s'", reason);
#ifndef __SANITIZE_ADDRESS__
    CHECK(grew < (256 << 10), "bigtable: peak RSS grew by %ld KiB", grew);
#endif
    pie_rt_module_unref(m);
    /* The runtime keeps working. */
    m = load_wasm(rt, "hello.wasm", NULL);
    const char *h[] = {"hello", "x", "1", NULL};
    CHECK(wait_inst(launch_v(rt, m, NULL, h), reason) == 1, "hello after: %s",
          reason);
    pie_rt_module_unref(m);
    /* A start section's host call with a valid pointer: linear memory is
     * known before instantiate (it used to trap "outside linear memory of
     * 0 bytes"). random_get returns 0, the module exits 0 + 7. */
    m = load_wasm(rt, "start_host.wasm", NULL);
    const char *sh[] = {"start_host", NULL};
    st = wait_inst(launch_v(rt, m, NULL, sh), reason);
    CHECK(st == 7, "start_host: expected status 7, got %d (%s)", st, reason);
    pie_rt_module_unref(m);
    pie_rt_free(rt);

    /* Tables count against the memory limit: two 9.6 MB tables do not fit
     * 16 MiB (each alone passes the per-table cap); table.grow past it
     * returns -1. Once 40 1M-element tables took 945 MB per instance. */
    pie_rt_opts o2 = {.memory_limit = 16u << 20};
    rt = make_rt(&o2);
    m = load_wasm(rt, "tables_mem.wasm", NULL);
    const char *tm[] = {"tables_mem", NULL};
    st = wait_inst(launch_v(rt, m, NULL, tm), reason);
    printf("tables_mem: status %d (%s)\n", st, reason);
    CHECK(st == PIE_ETRAP && strstr(reason, "table limit: the module's tables "
                                            "need more than the instance's "
                                            "memory limit of 16777216"),
          "tables_mem: status %d (%s)", st, reason);
    pie_rt_module_unref(m);
    m = load_wasm(rt, "table_grow.wasm", NULL);
    const char *g2[] = {"table_grow", "2", NULL};
    const char *g3[] = {"table_grow", "3", NULL};
    st = wait_inst(launch_v(rt, m, NULL, g2), reason);
    CHECK(st == 0, "table_grow 2: %d grows failed (%s)", st, reason);
    st = wait_inst(launch_v(rt, m, NULL, g3), reason);
    CHECK(st == 1, "table_grow 3: expected 1 failed grow, got %d (%s)", st,
          reason);
    printf("table_grow: 2 grows of 7.2 MB fit 16 MiB, the third fails\n");
    pie_rt_module_unref(m);
    pie_rt_free(rt);
}

/* ---- libc/libm called from guest code ----------------------------------- */

static int32_t run_libc(pie_rt *rt, pie_rt_module *m, uint32_t d,
                        const char *op, char reason[256])
{
    return run_depth(rt, m, "libc_deep", d, op, reason);
}

/* Generated code calls libm and libc (sqrt's errno path, memmove,
 * nearbyint, floor). A guard fault inside one of them, with the guest's
 * frames right above the guard, once crashed the server ("host code
 * overflowed an inferlet's fiber stack"): it must trap like a guest
 * overflow, at every depth. */
static void test_libc_deep(void)
{
    pie_rt_opts o;
    pie_rt *rt;
    pie_rt_module *m = deep_open("libc_deep.wasm", &o, &rt);
    char reason[256];
    uint32_t lo = deepest_fit(rt, m, "libc_deep", "floor");
    static const char *ops[] = {"sqrt", "copy", "nearest", "floor"};
    int runs = 0, traps = 0;
    for (int k = 0; k < 4; k++) {
        for (uint32_t d = lo + 8; d + 160 > lo && d > 0; d--) {
            int32_t st = run_libc(rt, m, d, ops[k], reason);
            runs++;
            CHECK(st == 0 || (st == PIE_ETRAP &&
                              strstr(reason, "native stack exhausted")),
                  "%s at depth %u: status %d (%s)", ops[k], d, st, reason);
            traps += st != 0;
        }
    }
    printf("max depth %u; %d runs at the guard with sqrt/copy/nearest/floor "
           "at the bottom: %d trapped, the rest finished\n", lo, runs, traps);
    CHECK(traps > 0, "no run trapped: the scan missed the guard");
    CHECK(run_libc(rt, m, 100, "copy", reason) == 0, "after: %s", reason);
    deep_close(rt, m);
}

/* An instance looping on a 128 MiB memory.copy spends its time in libc's
 * memmove, outside generated code: the CPU limit and pie_rt_kill must
 * still end it (they once waited for it to return to generated code, and
 * it never did for long enough). */
static void test_cpu_libc(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(60);
    pie_rt_opts o = {.cpu_limit_s = 1};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "copyloop.wasm", NULL);
    const char *a[] = {"copyloop", NULL};
    char reason[256];
    int32_t st = wait_inst(launch_v(rt, m, NULL, a), reason);
    printf("copyloop, --cpu-limit 1: status %d (%s)\n", st, reason);
    CHECK(st == PIE_ETRAP && strstr(reason, "CPU time limit exceeded"),
          "copyloop: status %d (%s)", st, reason);
    pie_rt_module_unref(m);
    pie_rt_free(rt);

    pie_rt_opts o2 = {.cpu_limit_s = -1};           /* no CPU limit */
    rt = make_rt(&o2);
    m = load_wasm(rt, "copyloop.wasm", NULL);
    pie_rt_instance *i = launch_v(rt, m, NULL, a);
    usleep(300 * 1000);
    CHECK_OK(pie_rt_kill(i, "test kill"));
    st = wait_inst(i, reason);
    printf("copyloop, killed: status %d (%s)\n", st, reason);
    CHECK(st == PIE_ETRAP && strstr(reason, "killed: test kill"),
          "copyloop kill: status %d (%s)", st, reason);
    pie_rt_module_unref(m);
    pie_rt_free(rt);                /* waits for every instance to end */
    alarm(0);
}

/* madvise as the runtime calls it, observed: release() discards the
 * prefix of a memory reservation it believes read-write, so the last such
 * call says how many bytes the pool recorded (test_grow_kill). Otherwise
 * the system call itself. */
static void *dontneed_p;
static size_t dontneed_n;
int madvise(void *p, size_t n, int advice)
{
    if (advice == MADV_DONTNEED) {
        dontneed_p = p;
        dontneed_n = n;
    }
    return (int)syscall(SYS_madvise, p, n, advice);
}

/* Bytes of the read-write mapping that starts at p (/proc/self/maps). */
static size_t rw_mapping_at(const void *p)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char l[512];
    size_t n = 0;
    while (f && fgets(l, sizeof l, f)) {
        unsigned long a, b;
        char perm[8];
        if (sscanf(l, "%lx-%lx %7s", &a, &b, perm) == 3 &&
            a == (unsigned long)(uintptr_t)p && perm[0] == 'r' && perm[1] == 'w')
            n = b - a;
    }
    if (f) fclose(f);
    return n;
}

/* A CPU limit that ends an instance inside memory.grow once unwound it
 * between the mprotect and the new size: the pool then recorded one page
 * fewer than was read-write, and a later instance reusing the reservation
 * could reach that page without a trap and see the old bytes. Every kill
 * must leave the recorded size equal to what is read-write. */
static void test_grow_kill(void)
{
    signal(SIGALRM, hang_alarm);
    alarm(120);
    pie_rt_opts o = {.cpu_limit_s = 0.04, .n_workers = 1,
                     .memory_limit = 512u << 20};
    pie_rt *rt = make_rt(&o);
    pie_rt_module *m = load_wasm(rt, "grow_kill.wasm", NULL);
    char reason[256];
    int stale = 0, tries = 40;
    for (int t = 0; t < tries; t++) {
        char d[2] = {(char)('0' + t % 10), 0};
        const char *a[] = {"grow_kill", d, NULL};
        dontneed_p = NULL;
        int32_t st = wait_inst(launch_v(rt, m, NULL, a), reason);
        CHECK(st == PIE_ETRAP, "grow_kill %d: status %d (%s)", t, st, reason);
        size_t rw = dontneed_p ? rw_mapping_at(dontneed_p) : 0;
        if (rw > dontneed_n) {
            printf("try %d: the pool records %zu bytes, %zu are read-write\n",
                   t, dontneed_n, rw);
            stale++;
        }
    }
    printf("grow_kill: %d of %d kills left a page read-write beyond the "
           "recorded size\n", stale, tries);
    CHECK(stale == 0, "%d kills inside memory.grow left a stale page", stale);
    pie_rt_module_unref(m);
    pie_rt_free(rt);
    alarm(0);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "concurrent")) test_concurrent();
    else if (!strcmp(t, "cycles")) test_cycles();
    else if (!strcmp(t, "deep")) test_deep();
    else if (!strcmp(t, "limits")) test_limits();
    else if (!strcmp(t, "libc_deep")) test_libc_deep();
    else if (!strcmp(t, "cpu_libc")) test_cpu_libc();
    else if (!strcmp(t, "grow_kill")) test_grow_kill();
    else {
        fprintf(stderr, "usage: test_rt_limits concurrent|cycles|deep|"
                        "limits|libc_deep|cpu_libc|grow_kill\n");
        return 2;
    }
    test_n_checks += rt_test_checks();
    TEST_DONE();
}
