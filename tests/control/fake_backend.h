/*
 * fake_backend.h — a deterministic stand-in for a compute backend, for the
 * control layer's tests.
 *
 * KV slot content is kv = mix(token, position). The "hidden state" of new
 * token t is a fold, in slot order, over the kv of every slot it attends to
 * (causal or its mask), mixed with its own token and position; so any
 * batching mistake (wrong pages, order, positions, fills, masks) changes it.
 * Greedy: next = state % vocab (then the first allowed id at or after it
 * under a logit mask); random: (state ^ seed-mix) % vocab. Probes write
 * values derived from the state. fake_expected_next() computes the same
 * function from a plain token history with no pages, as the independent
 * reference.
 */
#ifndef PIE_FAKE_BACKEND_H
#define PIE_FAKE_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"

typedef struct fake_stats {
    int32_t calls;          /* forward calls                                */
    int32_t max_reqs;       /* largest batch (requests)                     */
    int64_t total_reqs;
    int64_t total_tokens;
    int32_t copies;
    int32_t failed;         /* forward calls failed on demand               */
    int64_t downloads;      /* pages downloaded (all download calls)        */
    int32_t max_tokens;     /* largest forward that ran (tokens)            */
    int32_t refused;        /* forwards refused: over a token limit, or
                               holding the poisoned token                   */
    int32_t after_lost;     /* forward, copy, download and upload calls
                               begun after fake_backend_lose               */
    int32_t log[4096];      /* requests per call, first 4096 calls          */
} fake_stats;

/* vocab, page_size, n_pages; delay_us sleeps in each forward (device time) */
int  fake_backend_create(int32_t vocab, int32_t page_size, int32_t n_pages,
                         int32_t delay_us, pie_backend **out);
fake_stats *fake_backend_stats(pie_backend *b);
void fake_backend_set_delay(pie_backend *b, int32_t delay_us);
/* While on, a forward that starts (counted in fake_backend_started) waits
 * until it is turned off: a test holds the device as long as it needs. */
void fake_backend_hold(pie_backend *b, bool on);
/* Forward calls begun so far (counted before the delay: a test waits for
 * it to know that a forward holds the device, instead of sleeping). */
int32_t fake_backend_started(pie_backend *b);
/* The next n copy_slots calls fail with PIE_EIO (set before the copies are
 * submitted: the device thread reads it unlocked). */
void fake_backend_fail_copies(pie_backend *b, int32_t n);
/* The next n forward calls fail with PIE_EIO and produce no outputs, after
 * writing the KV of the first half (rounded down) of each request's new
 * tokens: as a device that faults midway leaves the KV partly written. A
 * call reads this when it starts (atomically: it may be set while another
 * forward runs, which then still succeeds). */
void fake_backend_fail_forwards(pie_backend *b, int32_t n);
/* The backend takes at most n tokens a forward, and says so
 * (b->max_tokens = n, as the CUDA backend does): a longer forward fails
 * with PIE_ELIMIT. 0: no limit. Set before pie_ctl_create reads it. */
void fake_backend_set_max_tokens(pie_backend *b, int32_t n);
/* The same limit without saying so (b->max_tokens stays as it is): a
 * forward of more than n tokens fails with PIE_ELIMIT, as a backend
 * whose whole batch passes a limit it did not report. 0: none. */
void fake_backend_fail_tokens_over(pie_backend *b, int32_t n);
/* Any forward that holds token id tok fails with PIE_EINVAL and writes
 * nothing: a request that fails in any batch, alone too. -1: none. */
void fake_backend_poison(pie_backend *b, int32_t tok);
/* The device is lost from now on: every forward, copy, download and
 * upload fails with PIE_EDEVLOST, a forward running now too as it ends
 * (stats.after_lost counts the calls begun after this). */
void fake_backend_lose(pie_backend *b);
/* The greedy next token after history[0..n) at positions 0..n-1. */
int32_t fake_expected_next(const int32_t *history, int32_t n, int32_t vocab);
/* The n greedy tokens after prompt[0..np) (the reference continuation). */
void fake_expected_gen(const int32_t *prompt, int32_t np, int32_t n,
                       int32_t vocab, int32_t *out);
uint64_t fake_mix(int32_t token, int32_t pos);

#endif
