/*
 * test_util.h — minimal assertions for pie's ctest binaries.
 *
 * CHECK(cond, fmt, ...) prints the first failure with file/line and a message
 * ("expected 403, got 17 at step 5") and exits 1. TEST_SKIP() exits 77, which
 * every test registers as SKIP_RETURN_CODE. test_shared_path() builds a path
 * under ../shared and skips the test when ../shared is absent.
 * test_watchdog(what, secs) fails the test if the step that follows (named
 * what) has not ended (test_watchdog_off()) within secs seconds: for steps
 * that would hang, not return, if the code under test were wrong.
 */
#ifndef PIE_TEST_UTIL_H
#define PIE_TEST_UTIL_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static int test_n_checks;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        test_n_checks++;                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

#define CHECK_OK(expr)                                                       \
    do {                                                                     \
        int rc_ = (expr);                                                    \
        CHECK(rc_ == 0, "%s returned %d: %s", #expr, rc_, pie_err_msg());    \
    } while (0)

#define TEST_SKIP(...)                                                       \
    do {                                                                     \
        fprintf(stderr, "SKIP: ");                                           \
        fprintf(stderr, __VA_ARGS__);                                        \
        fprintf(stderr, "\n");                                               \
        exit(77);                                                            \
    } while (0)

#define TEST_DONE()                                                          \
    do {                                                                     \
        printf("ok: %d checks passed\n", test_n_checks);                     \
        return 0;                                                            \
    } while (0)

/* Path of rel under ../shared; skips the test if ../shared is missing. */
static inline const char *test_shared_path(const char *rel)
{
    static char buf[8][1024];
    static int k;
    struct stat st;
    if (stat(PIE_SHARED_DIR, &st) != 0)
        TEST_SKIP("%s not found: tests need ../shared beside the checkout",
                  PIE_SHARED_DIR);
    char *p = buf[k++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", PIE_SHARED_DIR, rel);
    return p;
}

static void test_on_alarm(int sig)
{
    (void)sig;
    static const char m[] = "FAIL: watchdog: the step printed last hung\n";
    (void)!write(2, m, sizeof m - 1);
    _exit(1);
}

static inline void test_watchdog(const char *what, unsigned secs)
{
    printf("step: %s\n", what);
    fflush(stdout);
    signal(SIGALRM, test_on_alarm);
    alarm(secs);
}

static inline void test_watchdog_off(void)
{
    alarm(0);
}

#endif
