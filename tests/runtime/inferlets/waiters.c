/* waiters MODE: futures that wait in a host list, abandoned in a loop.
 *   loop KIND N   N times: a pending KIND future (pull: queue_pull on "wq",
 *                 recv: receive, sub: subscription_next on topic "wt"),
 *                 cancelled on odd k, freed; sends "T1 T2" (ns spent in
 *                 each half), checks a message still reaches a new waiter,
 *                 then returns the length of the launcher's next message
 *   cap           65537 pulls on "capq" without freeing: the last must fail
 *                 with PIE_ELIMIT, and a freed one must make room
 *   sleeps N M    frees M sleeps into an empty heap, then N sleeps are
 *                 created and M of them freed newest first; sends "TA TB"
 *                 (ns of each batch of M frees) and frees the rest
 *   spawn N       launches N "idle" children (registered as "waiters"),
 *                 returns how many started before one failed PIE_ELIMIT
 *   fork          launches "fork" of itself and returns its status
 *   idle          waits for a message that never comes */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie_api.h"

#define FAR 1000000000000000ll       /* a sleep that never fires (ns) */

static int32_t pending(const char *kind, int32_t sub)
{
    if (!strcmp(kind, "pull"))
        return pie_queue_pull("wq", 2);
    if (!strcmp(kind, "recv"))
        return pie_receive();
    return pie_subscription_next(sub);
}

/* A message sent now must reach the next waiter (none of the abandoned). */
static int still_delivers(const char *kind, int32_t sub)
{
    char buf[8];
    if (!strcmp(kind, "recv"))
        return 1;                    /* the launcher's "go" checks this */
    int32_t f = pending(kind, sub);
    int sent = !strcmp(kind, "pull") ? pie_queue_push("wq", 2, "x", 1) == 0
                                     : pie_publish("wt", 2, "x", 1) == 1;
    int ok = sent && pie_future_wait(f) == 0 &&
             pie_future_payload(f, buf, sizeof buf) == 1 && buf[0] == 'x';
    pie_future_free(f);
    return ok;
}

static int loop(const char *kind, int n)
{
    int32_t sub = !strcmp(kind, "sub") ? pie_subscribe("wt", 2) : 0;
    if (sub < 0)
        return 10;
    int64_t t0 = pie_clock_ns(), t1 = t0;
    for (int k = 0; k < n; k++) {
        if (k == n / 2)
            t1 = pie_clock_ns();
        int32_t f = pending(kind, sub);
        if (f <= 0 || pie_future_status(f) != PIE_EAGAIN)
            return 11;
        if (k & 1)
            pie_future_cancel(f);
        if (pie_future_free(f) != 0)
            return 12;
    }
    int64_t t2 = pie_clock_ns();
    char out[64];
    int l = snprintf(out, sizeof out, "%lld %lld", (long long)(t1 - t0),
                     (long long)(t2 - t1));
    pie_send(out, l);
    if (!still_delivers(kind, sub))
        return 13;
    char buf[8];
    int32_t go = pie_receive();
    if (pie_future_wait(go) != 0)
        return 14;
    return pie_future_payload(go, buf, sizeof buf);
}

static int cap(void)
{
    int32_t first = 0;
    for (int k = 0; k < 65536; k++) {
        int32_t f = pie_queue_pull("capq", 4);
        if (f <= 0 || pie_future_status(f) != PIE_EAGAIN)
            return 20;
        first = first ? first : f;
    }
    int32_t over = pie_queue_pull("capq", 4);
    if (over <= 0 || pie_future_status(over) != PIE_ELIMIT)
        return 21;
    pie_future_free(over);
    pie_future_free(first);
    int32_t again = pie_queue_pull("capq", 4);
    return again > 0 && pie_future_status(again) == PIE_EAGAIN ? 0 : 22;
}

static int sleeps(int n, int m)
{
    int32_t *hs = malloc(sizeof *hs * n);
    if (!hs || m > n)
        return 30;
    int64_t t0 = pie_clock_ns();
    for (int k = 0; k < m; k++)
        pie_future_free(pie_sleep(FAR));
    int64_t ta = pie_clock_ns() - t0;
    for (int k = 0; k < n; k++)
        if ((hs[k] = pie_sleep(FAR)) <= 0)
            return 31;
    t0 = pie_clock_ns();
    for (int k = n - 1; k >= n - m; k--)
        pie_future_free(hs[k]);
    int64_t tb = pie_clock_ns() - t0;
    for (int k = n - m - 1; k >= 0; k--)
        pie_future_free(hs[k]);
    char out[64];
    int l = snprintf(out, sizeof out, "%lld %lld", (long long)ta,
                     (long long)tb);
    return pie_send(out, l);
}

static int spawn(int n)
{
    static const char args[] = "idle\0";
    int32_t *fs = malloc(sizeof *fs * n);
    int started = 0;
    if (!fs)
        return -100;
    for (int k = 0; k < n; k++) {
        fs[k] = pie_launch("waiters", 7, args, sizeof args - 1);
        if (fs[k] <= 0)
            return -101;
        int st = pie_future_status(fs[k]);
        if (st == PIE_EAGAIN && started == k)
            started++;
        else if (st != PIE_ELIMIT)
            return -102;
    }
    for (int k = 0; k < n; k++) {
        pie_future_cancel(fs[k]);
        pie_future_free(fs[k]);
    }
    return started;
}

static int fork_self(void)
{
    static const char args[] = "fork\0";
    int32_t f = pie_launch("waiters", 7, args, sizeof args - 1);
    return f <= 0 ? -103 : pie_future_wait(f);
}

int main(int argc, char **argv)
{
    const char *m = argc > 1 ? argv[1] : "";
    if (!strcmp(m, "loop") && argc > 3)
        return loop(argv[2], atoi(argv[3]));
    if (!strcmp(m, "cap"))
        return cap();
    if (!strcmp(m, "sleeps") && argc > 3)
        return sleeps(atoi(argv[2]), atoi(argv[3]));
    if (!strcmp(m, "spawn") && argc > 2)
        return spawn(atoi(argv[2]));
    if (!strcmp(m, "fork"))
        return fork_self();
    if (!strcmp(m, "idle"))
        return pie_future_wait(pie_receive());
    return 2;
}
