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
 *   idle          waits for a message that never comes
 *   names N P     N distinct queue names (prefix P) left empty (a pull cancelled or
 *                 freed, or a message pushed and pulled back) and every
 *                 fourth a topic subscribed to and left; returns 0, or 50+
 *                 where a name could not be made
 *   subs N        N subscriptions to "st": returns how many were made
 *                 before one failed PIE_ELIMIT (-1: another error, -2:
 *                 none failed), -3 if one freed makes no room
 *   fill          pushes 1 MiB messages to "b0".."b9" (32 a queue) until
 *                 one fails PIE_ELIMIT; sends "COUNT 0", waits for a
 *                 message, then pushes once more to "b0": returns COUNT,
 *                 or 40+ (41: no PIE_ELIMIT in 320, 42: the last push
 *                 failed)
 *   drain         pushes 1 MiB to "own" and pulls it back, then pulls one
 *                 message of "b0" (already there): returns 0, or 45+
 *   pub S         S subscriptions to "bt", then publishes 1 MiB until a
 *                 publish fails PIE_ELIMIT: returns how many reached all S
 *                 (-1: none failed in 100, -2: a publish reached fewer)
 *   pulls         65536 pulls waiting on "pq0".."pq65535": a pull on a new
 *                 name must fail PIE_ELIMIT, one that finds a message must
 *                 not; sends "65536 0" (or "-CODE 0"), waits for a
 *                 message, then ends a pull each way (a message delivered
 *                 to it, cancelled, freed), each making room for one new
 *                 pull and no more; returns 0 with its pulls still
 *                 waiting, or 60+ */
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

static int names(int n, const char *p)
{
    char nm[32];
    for (int k = 0; k < n; k++) {
        int l = snprintf(nm, sizeof nm, "%sq%d", p, k);
        if (k & 1) {
            if (pie_queue_push(nm, l, "x", 1) != 0)
                return 50;
            int32_t f = pie_queue_pull(nm, l);
            if (f <= 0 || pie_future_status(f) != 0)
                return 51;
            pie_future_free(f);
        } else {
            int32_t f = pie_queue_pull(nm, l);
            if (f <= 0 || pie_future_status(f) != PIE_EAGAIN)
                return 52;
            if (k & 2)
                pie_future_cancel(f);
            pie_future_free(f);
        }
        if (k % 4 == 0) {
            l = snprintf(nm, sizeof nm, "%st%d", p, k);
            int32_t s = pie_subscribe(nm, l);
            if (s <= 0)
                return 53;
            pie_unsubscribe(s);
        }
    }
    return 0;
}

static int subs(int n)
{
    int32_t first = 0;
    for (int k = 0; k < n; k++) {
        int32_t s = pie_subscribe("st", 2);
        if (s == PIE_ELIMIT) {
            pie_unsubscribe(first);
            s = pie_subscribe("st", 2);
            return s > 0 ? k : -3;
        }
        if (s <= 0)
            return -1;
        first = first ? first : s;
    }
    return -2;
}

static char big[1 << 20];

static int fill(void)
{
    char nm[8];
    int k = 0, rc = 0;
    for (; k < 320; k++) {
        int l = snprintf(nm, sizeof nm, "b%d", k / 32);
        if ((rc = pie_queue_push(nm, l, big, sizeof big)) != 0)
            break;
    }
    char out[32];
    if (rc != PIE_ELIMIT) {
        pie_send("-1 0", 4);
        return 41;
    }
    pie_send(out, snprintf(out, sizeof out, "%d 0", k));
    pie_future_wait(pie_receive());
    return pie_queue_push("b0", 2, big, sizeof big) == 0 ? k : 42;
}

static int drain(void)
{
    if (pie_queue_push("own", 3, big, sizeof big) != 0)
        return 45;
    int32_t f = pie_queue_pull("own", 3);
    if (pie_future_status(f) != 0)
        return 46;
    int32_t g = pie_queue_pull("b0", 2);
    if (pie_future_status(g) != 0 ||
        pie_future_payload(g, NULL, 0) != (int32_t)sizeof big)
        return 47;
    return 0;
}

static int pub(int s)
{
    for (int k = 0; k < s; k++)
        if (pie_subscribe("bt", 2) <= 0)
            return -3;
    for (int k = 0; k < 100; k++) {
        int32_t n = pie_publish("bt", 2, big, sizeof big);
        if (n == PIE_ELIMIT)
            return k;
        if (n != s)
            return -2;
    }
    return -1;
}

/* After one of its pulls ended: one pull on a new name must wait, the
 * next must fail PIE_ELIMIT. */
static int room_for_one(const char *tag)
{
    char nm[16];
    int l = snprintf(nm, sizeof nm, "%s1", tag);
    int32_t f = pie_queue_pull(nm, l);
    if (f <= 0 || pie_future_status(f) != PIE_EAGAIN)
        return 0;
    l = snprintf(nm, sizeof nm, "%s2", tag);
    int32_t g = pie_queue_pull(nm, l);
    int ok = g > 0 && pie_future_status(g) == PIE_ELIMIT;
    pie_future_free(g);
    return ok;
}

static int pulls_fail(int code)
{
    char out[16];
    pie_send(out, snprintf(out, sizeof out, "%d 0", -code));
    return code;
}

static int pulls(void)
{
    enum { N = 65536 };
    static int32_t hs[N];
    char nm[16];
    for (int k = 0; k < N; k++) {
        int l = snprintf(nm, sizeof nm, "pq%d", k);
        hs[k] = pie_queue_pull(nm, l);
        if (hs[k] <= 0 || pie_future_status(hs[k]) != PIE_EAGAIN)
            return pulls_fail(60);
    }
    int32_t over = pie_queue_pull("pover", 5);
    if (over <= 0 || pie_future_status(over) != PIE_ELIMIT)
        return pulls_fail(61);
    pie_future_free(over);
    if (pie_queue_push("pfull", 5, "x", 1) != 0)
        return pulls_fail(62);
    int32_t got = pie_queue_pull("pfull", 5);
    if (got <= 0 || pie_future_status(got) != 0)
        return pulls_fail(62);
    pie_future_free(got);
    char out[16];
    pie_send(out, snprintf(out, sizeof out, "%d 0", N));
    pie_future_wait(pie_receive());
    if (pie_queue_push("pq0", 3, "y", 1) != 0 ||
        pie_future_status(hs[0]) != 0)
        return 63;
    if (!room_for_one("pa"))
        return 64;
    pie_future_cancel(hs[1]);
    if (!room_for_one("pb"))
        return 65;
    pie_future_free(hs[2]);
    if (!room_for_one("pc"))
        return 66;
    return 0;
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
    if (!strcmp(m, "names") && argc > 2)
        return names(atoi(argv[2]), argc > 3 ? argv[3] : "");
    if (!strcmp(m, "subs") && argc > 2)
        return subs(atoi(argv[2]));
    if (!strcmp(m, "fill"))
        return fill();
    if (!strcmp(m, "drain"))
        return drain();
    if (!strcmp(m, "pub") && argc > 2)
        return pub(atoi(argv[2]));
    if (!strcmp(m, "pulls"))
        return pulls();
    if (!strcmp(m, "idle"))
        return pie_future_wait(pie_receive());
    return 2;
}
