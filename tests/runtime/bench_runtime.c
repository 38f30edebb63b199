/*
 * bench_runtime.c — runtime numbers (a benchmark, not a test):
 *   compile time of msg.wasm (27 KB, printf + messaging) cold and cached,
 *   launch+instantiate+exit of an empty module (sequential and batched),
 *   host-call cost (10M calls of pie.instance_id from a loop),
 *   RSS per idle (idle.wat, no libc) and per blocked (msg.wasm block,
 *   libc initialised) instance.
 */
#define _GNU_SOURCE
#include <time.h>
#include <unistd.h>

#include "tests/runtime/rt_test_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bench_compile(void)
{
    char dir[] = "/tmp/pie-bench-cache.XXXXXX";
    CHECK(mkdtemp(dir), "mkdtemp");
    pie_rt_opts o = {.cache_dir = dir};
    pie_rt *rt = NULL;
    CHECK_OK(pie_rt_create(&o, &rt));
    char path[1024];
    size_t len;
    snprintf(path, sizeof path, "%s/msg.wasm", TEST_WASM_DIR);
    unsigned char *b = read_file(path, &len);
    pie_rt_module *m;
    int cached;
    double t0 = now_s();
    CHECK_OK(pie_rt_module_load(rt, b, len, &m, &cached));
    double t1 = now_s();
    CHECK(!cached, "cold load was cached");
    pie_rt_module *m2;
    CHECK_OK(pie_rt_module_load(rt, b, len, &m2, &cached));
    double t2 = now_s();
    CHECK(cached, "second load not cached");
    printf("compile msg.wasm (%zu bytes): cold %.3f s, cached %.3f ms\n", len,
           t1 - t0, (t2 - t1) * 1e3);
    pie_rt_module_unref(m);
    pie_rt_module_unref(m2);
    pie_rt_free(rt);
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    free(b);
}

static void bench_launch(pie_rt *rt)
{
    pie_rt_module *m = load_wasm(rt, "empty.wasm", NULL);
    const char *argv[] = {"empty"};
    enum { N = 20000, B = 200 };
    double t0 = now_s();
    for (int k = 0; k < 2000; k++) {
        pie_rt_instance *i;
        CHECK_OK(pie_rt_launch(rt, m, 1, argv, NULL, &i));
        pie_rt_wait(i, NULL, 0);
        pie_rt_instance_unref(i);
    }
    double t1 = now_s(), c1 = cpu_s();
    for (int k = 0; k < N; k += B) {
        pie_rt_instance *is[B];
        for (int j = 0; j < B; j++)
            CHECK_OK(pie_rt_launch(rt, m, 1, argv, NULL, &is[j]));
        for (int j = 0; j < B; j++) {
            pie_rt_wait(is[j], NULL, 0);
            pie_rt_instance_unref(is[j]);
        }
    }
    double t2 = now_s(), c2 = cpu_s();
    printf("launch+instantiate+run+exit (empty module): %.1f us sequential "
           "round trip, %.1f us wall and %.1f us CPU (all threads) each in "
           "batches of %d\n", (t1 - t0) / 2000 * 1e6, (t2 - t1) / N * 1e6,
           (c2 - c1) / N * 1e6, B);
    pie_rt_module_unref(m);
}

static void bench_calls(pie_rt *rt)
{
    pie_rt_module *m = load_wasm(rt, "calls.wasm", NULL);
    const char *argv[] = {"calls"};
    pie_rt_instance *i;
    double t0 = now_s();
    CHECK_OK(pie_rt_launch(rt, m, 1, argv, NULL, &i));
    CHECK(pie_rt_wait(i, NULL, 0) == 0, "calls");
    double t1 = now_s();
    pie_rt_instance_unref(i);
    printf("host call (pie.instance_id, loop of 1e7): %.2f ns per call\n",
           (t1 - t0) / 1e7 * 1e9);
    pie_rt_module_unref(m);
}

static void bench_memory(pie_rt *rt, const char *file, const char *what,
                         const char *mode)
{
    enum { N = 2000 };
    pie_rt_module *m = load_wasm(rt, file, NULL);
    const char *argv[] = {"x", mode, NULL};
    static pie_rt_instance *is[N];
    long r0 = rss_kib();
    for (int k = 0; k < N; k++)
        CHECK_OK(pie_rt_launch(rt, m, 2, argv, NULL, &is[k]));
    usleep(500000);
    long r1 = rss_kib();
    printf("%s: %.1f KiB RSS per instance (%d parked)\n", what,
           (double)(r1 - r0) / N, N);
    for (int k = 0; k < N; k++) {
        pie_rt_send(is[k], "x", 1);
        pie_rt_wait(is[k], NULL, 0);
        pie_rt_instance_unref(is[k]);
    }
    pie_rt_module_unref(m);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    bench_compile();
    pie_rt_opts o = {0};
    pie_rt *rt = make_rt(&o);
    bench_launch(rt);
    bench_calls(rt);
    bench_memory(rt, "idle.wasm", "idle instance (no libc, parked in receive)",
                 "");
    bench_memory(rt, "msg.wasm", "blocked instance (libc, parked in receive)",
                 "block");
    pie_rt_free(rt);
    return 0;
}
