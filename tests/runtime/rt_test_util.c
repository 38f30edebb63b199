/*
 * rt_test_util.c — the helpers that test_runtime.c, test_rt_limits.c and
 * test_rt_cache.c share (moved from test_runtime.c); rt_test_util.h states
 * what each one does. They CHECK as the tests do, into this file's own
 * count (test_util.h's counter is static), which each executable's main
 * adds to its total through rt_test_checks().
 */
#include <unistd.h>

#include "tests/runtime/rt_test_util.h"

int32_t wait_inst(pie_rt_instance *i, char *reason)
{
    int32_t st = pie_rt_wait(i, reason, 256);
    pie_rt_instance_unref(i);
    return st;
}

pie_rt_instance *launch_msg(pie_rt *rt, pie_rt_module *m, capture **c,
                            const char **argv)
{
    pie_rt_launch_cbs cbs;
    *c = cap_new(&cbs);
    return launch_v(rt, m, &cbs, argv);
}

void finish_msg(pie_rt_instance *i, capture *c, int32_t status,
                const char *want)
{
    char reason[256];
    int32_t st = wait_inst(i, reason);
    CHECK(st == status, "expected status %d, got %d (%s)", status, st, reason);
    if (want)
        CHECK(!strcmp(c->msg, want), "message '%s', want '%s'", c->msg, want);
    cap_free(c);
}

void hang_alarm(int sig)
{
    static const char msg[] = "FAIL: the runtime hung (a trap left a lock "
                              "held?)\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(1);
}

int rt_test_checks(void)
{
    return test_n_checks;
}
