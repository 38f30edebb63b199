/*
 * ctl_fwd.h — one forward submitted by hand, for the control layer's
 * tests: n (at most 256; 0 or fewer for the bad-input tests) tokens at positions pos0.. into pages of ps slots
 * (the KV ends at pos0 + n), a greedy output at the last token, chained
 * from `from` (its output 0 as token 0) when non-NULL; done(user) on
 * completion where given.
 */
#ifndef PIE_TEST_CTL_FWD_H
#define PIE_TEST_CTL_FWD_H

#include "control/control.h"
#include "tests/test_util.h"

static inline int ctl_test_fwd(pie_ctl_client *c, int32_t ps,
                               const int32_t *toks, int32_t n, int32_t pos0,
                               const uint32_t *pages, pie_ctl_future *from,
                               pie_ctl_done_fn done, void *user,
                               pie_ctl_future **out)
{
    int32_t pos[256], kv = pos0 + n, np = (kv + ps - 1) / ps, oi = n - 1;
    CHECK(n <= 256, "ctl_test_fwd takes at most 256 tokens, not %d", n);
    for (int32_t i = 0; i < n; i++) pos[i] = pos0 + i;
    pie_sampler s = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_chain ch = { 0, from, 0 };
    pie_ctl_forward f = {
        .n_tokens = n, .tokens = toks, .positions = pos, .n_pages = np,
        .pages = pages, .last_page_len = kv - (np - 1) * ps, .n_outputs = 1,
        .output_idx = &oi, .samplers = &s, .n_chains = from != NULL,
        .chains = &ch,
    };
    return pie_ctl_forward_submit(c, &f, done, user, out);
}

#endif
