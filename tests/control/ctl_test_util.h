/*
 * ctl_test_util.h — what the control layer's fake-backend tests
 * (test_control.c, test_control_persist.c, test_control_pressure.c,
 * test_control_inflight.c) share: an engine on a fake backend of VOCAB
 * token ids and PS-slot pages, its clients opened and closed several at a
 * time, checks of what it holds at the end, the reference continuation
 * that fake_expected_gen() computes without pages or batches (and a
 * generation checked against it), one forward submitted by hand or run to
 * its token, waits on the fake device, and the loop that runs a test
 * executable's tests by name. Each helper fails the test (CHECK) instead
 * of returning an error; definitions in ctl_test_util.c.
 */
#ifndef PIE_TEST_CTL_TEST_UTIL_H
#define PIE_TEST_CTL_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "control/control.h"

/* The fake model every test builds: its vocabulary and its page size
 * (KV slots per page). */
#define VOCAB 1000
#define PS    4

/* A device hold long enough that what a test does while a forward sleeps
 * in the fake backend (after wait_started) lands inside it even on a
 * loaded machine. */
#define HOLD_US 500000

/* One test of an executable: the name that selects it on the command
 * line, and its function. */
typedef struct ctl_test {
    const char *name;
    void      (*fn)(void);
} ctl_test;

/* Runs the n tests named in argv[1..] in the order given (failing at a
 * name not in tests), or all of them in table order when argv names none;
 * then adds the CHECKs that passed inside these helpers to *checks, the
 * caller's test_n_checks (test_util.h counts per source file), for its
 * TEST_DONE(). */
void ctl_test_run(int argc, char **argv, const ctl_test *tests, size_t n,
                  int *checks);

/* Milliseconds on the monotonic clock. */
double now_ms(void);

/* A control layer over a new fake backend of n_pages pages whose forwards
 * each take delay_us; options o (NULL: defaults). The backend goes to *bk;
 * done_ctl() frees both. */
pie_ctl *make_ctl(int32_t n_pages, int32_t delay_us, const pie_ctl_opts *o,
                  pie_backend **bk);

/* Waits until n forward calls have begun (the n-th holds the device). */
void wait_started(pie_backend *b, int32_t n);

/* Checks that ctl's queue is empty, then frees ctl and its backend b. */
void done_ctl(pie_ctl *ctl, pie_backend *b);

/* Opens a client of ctl with default options into each place given, in
 * order, up to a NULL. */
void open_clients(pie_ctl *ctl, pie_ctl_client **c, ...)
    __attribute__((sentinel));

/* A new client of ctl (options o, NULL: defaults) holding n new pages,
 * their handles in h. */
pie_ctl_client *open_holding(pie_ctl *ctl, const pie_ctl_client_opts *o,
                             int32_t n, uint32_t *h);

/* Closes the clients named, in order, up to a NULL. */
void close_clients(pie_ctl_client *c, ...) __attribute__((sentinel));

/* Checks that n of ctl's pages are free. */
void check_free(pie_ctl *ctl, int32_t n);

/* Checks that ctl holds no page (none used) and no export. */
void check_empty(pie_ctl *ctl);

/* c unexports the names given, in order, up to a NULL. */
void unexport_all(pie_ctl_client *c, ...) __attribute__((sentinel));

/* The reference continuation: n greedy tokens after prompt. */
void reference(const int32_t *prompt, int32_t np, int32_t n, int32_t *out);

/* n token ids below VOCAB into p, the same for the same seed. */
void make_prompt(int32_t *p, int32_t n, uint32_t seed);

/* Generates 3 tokens after the 13-token prompt of seed on ctl (timeout
 * 0) and checks them against the reference, what naming the run; returns
 * how many tokens the fake backend b computed for it. */
int64_t gen_run(pie_ctl *ctl, pie_backend *b, uint32_t seed,
                const char *what);

/* gen_run of seed as the first run on ctl, a fresh pool of 8 pages:
 * checks that it leaves its prompt's 3 full pages cached, all 8 free. */
void cache_prompt(pie_ctl *ctl, pie_backend *b, uint32_t seed);

/* Fails at the first of n steps where got differs from want, naming
 * what. */
void check_same(const int32_t *want, const int32_t *got, int32_t n,
                const char *what);

/* ---- one forward, by hand ---------------------------------------------- */

/* ctl_test_fwd (ctl_fwd.h) on the tests' page size, PS. */
int fwd_cb(pie_ctl_client *c, const int32_t *toks, int32_t n, int32_t pos0,
           const uint32_t *pages, pie_ctl_future *from, pie_ctl_done_fn done,
           void *user, pie_ctl_future **out);

/* fwd_cb without a callback. */
int fwd(pie_ctl_client *c, const int32_t *toks, int32_t n, int32_t pos0,
        const uint32_t *pages, pie_ctl_future *from, pie_ctl_future **out);

/* c's forward of toks (fwd) run to completion: returns its first output
 * token, its future released. */
int32_t fwd_token(pie_ctl_client *c, const int32_t *toks, int32_t n,
                  int32_t pos0, const uint32_t *pages);

/* Occupies the device: c's forward of toks, slowed to HOLD_US in the fake
 * backend, returned once it has begun. The delay stays set. */
pie_ctl_future *hold_device(pie_backend *b, pie_ctl_client *c,
                            const int32_t *toks, int32_t n, int32_t pos0,
                            const uint32_t *pages);

/* Waits (10 s at most) for f to complete and returns its first output
 * token; the caller still releases f. */
int32_t wait_token(pie_ctl_future *f);

#endif
