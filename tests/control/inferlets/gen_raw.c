/*
 * gen_raw.c — test inferlet for the engine host functions: greedy
 * generation through the raw API with decode steps chained k ahead.
 *
 *   argv: MODE PROMPT_IDS(comma-separated) N_TOKENS LOOKAHEAD
 *   MODE  ok        generate; send the ids as "id id id ..."
 *         stop      like ok, but cancel everything queued after 5 tokens
 *                   and leave the pages allocated (the host must free them)
 *         pause     like ok (use LOOKAHEAD 0), but after N_TOKENS / 2
 *                   tokens, with nothing in flight, send "p" and wait for
 *                   a message before going on
 *         badptr    pass an out-of-bounds pointer to kv_alloc (must trap)
 *         badargs   call with bad handles/arguments; send "ok" if every call
 *                   returned the expected error code
 *   argv: hold N    allocate N pages (waiting for the pool if it is short),
 *                   then wait for a message
 *   argv: masks     add output rows with a 4 MiB logit mask each, from one
 *                   buffer, until refused (at most 128); then submit the
 *                   builder and set one more mask on a new builder; send
 *                   "refused at K: RC; after submit: RC2" or "no refusal"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie_api.h"

#define MAXT 512

static int32_t parse_ids(const char *s, int32_t *ids)
{
    int32_t n = 0;
    while (*s && n < MAXT) {
        ids[n++] = (int32_t)strtol(s, (char **)&s, 10);
        if (*s == ',') s++;
    }
    return n;
}

static int badargs(int32_t m)
{
    int32_t pages[2], tok = 1, pos = 0, bad = 12345;
    int fails = 0;
    fails += pie_model_vocab_size(77) != PIE_EINVAL;
    fails += pie_kv_alloc(99, 1, pages) != PIE_EINVAL;
    fails += pie_kv_free(m, &bad, 1) != PIE_EINVAL;
    fails += pie_kv_alloc(m, 1, pages) != 0;
    int32_t f = pie_forward_new(m);
    pie_forward_tokens(f, &tok, &pos, 1);
    pie_forward_pages(f, pages, 1, 2);          /* fill 2 but one token: ok */
    pie_forward_output(f, 5, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);   /* row */
    fails += pie_forward_submit(f) != PIE_ERANGE;
    fails += pie_forward_submit(f) != PIE_EINVAL;  /* consumed */
    f = pie_forward_new(m);
    pie_forward_tokens(f, &tok, &pos, 1);
    pie_forward_pages(f, pages, 1, 1);
    fails += pie_forward_token_from(f, 4242, 0, 1) != PIE_EINVAL;
    fails += pie_forward_read_tokens(4242, &tok, 1) != PIE_EINVAL;
    pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0, 0);
    int32_t fut = pie_forward_submit(f);
    fails += fut <= 0;
    fails += pie_future_wait(fut) != 0;
    fails += pie_forward_read_tokens(fut, &tok, 1) != 1;
    fails += pie_forward_read_values(fut, 3, 0, 0, 0) != PIE_ERANGE;
    fails += pie_kv_import(m, "none", 4, pages, 2) != PIE_ENOTFOUND;
    fails += pie_kv_export(m, "e1", 2, pages, 1) != 0;
    fails += pie_kv_export(m, "e1", 2, pages, 1) != PIE_EBUSY;
    fails += pie_kv_import(m, "e1", 2, NULL, 0) != 1;
    fails += pie_kv_unexport(m, "e1", 2) != 0;
    pie_future_free(fut);
    if (fails) printf("badargs: %d failures\n", fails);
    return fails;
}

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    int32_t m = pie_model_open(0, 0);
    if (m < 0) return 3;
    if (strcmp(argv[1], "badptr") == 0)
        return pie_kv_alloc(m, 4, (int32_t *)0x7ffffff0);
    if (strcmp(argv[1], "hold") == 0 && argc > 2) {
        static int32_t held[MAXT];
        int32_t n = atoi(argv[2]);
        if (n > MAXT || pie_kv_alloc(m, (uint32_t)n, held) != 0) return 4;
        return pie_future_wait(pie_receive()) < 0 ? 5 : 0;
    }
    if (strcmp(argv[1], "masks") == 0) {
        static uint32_t runs[1 << 20];          /* 4 MiB, passed each time */
        char msg[128];
        int32_t f = pie_forward_new(m), rc = 0, k;
        for (k = 0; k < 128 && rc == 0; k++) {
            int32_t row = pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1,
                                             0, 0);
            rc = row < 0 ? row
                         : pie_forward_logit_mask(f, (uint32_t)row, runs,
                                                  1u << 20);
        }
        if (rc == 0) {
            pie_send("no refusal", 10);
            return 0;
        }
        int32_t fut = pie_forward_submit(f);    /* no tokens: fails, frees */
        if (fut > 0) pie_future_free(fut);
        f = pie_forward_new(m);
        int32_t row = pie_forward_output(f, 0, PIE_SAMPLER_GREEDY, 0, 0, 1, 0,
                                         0);
        int rc2 = row < 0 ? row
                          : pie_forward_logit_mask(f, (uint32_t)row, runs,
                                                   1u << 20);
        int len = snprintf(msg, sizeof msg, "refused at %d: %d; after submit: "
                           "%d", k - 1, rc, rc2);
        pie_send(msg, (uint32_t)len);
        return 0;
    }
    if (strcmp(argv[1], "badargs") == 0) {
        int fails = badargs(m);
        if (!fails) pie_send("ok", 2);
        return fails;
    }
    if (argc < 5) return 2;
    static int32_t prompt[MAXT], out[MAXT], pages[MAXT];
    int32_t np = parse_ids(argv[2], prompt), n = atoi(argv[3]);
    int32_t ahead = atoi(argv[4]), ps = pie_model_page_size(m);
    int stop_early = strcmp(argv[1], "stop") == 0;
    int pause = strcmp(argv[1], "pause") == 0;
    int32_t need = (np + n + ps - 1) / ps;
    if (pie_kv_alloc(m, (uint32_t)need, pages) != 0) return 4;
    int32_t ring[65], next = 0, done = 0;
    if (ahead > 64) ahead = 64;
    while (done < n) {
        if (pause && done == n / 2 && next == done) {
            pie_send("p", 1);
            if (pie_future_wait(pie_receive()) < 0) return 8;
            pause = 0;
        }
        while (next < n && next - done <= ahead) {
            int32_t f = pie_forward_new(m), first = next ? np + next - 1 : 0;
            int32_t cnt = next ? 1 : np, kv = first + cnt;
            int32_t pos[MAXT];
            for (int32_t t = 0; t < cnt; t++) pos[t] = first + t;
            if (next == 0) pie_forward_tokens(f, prompt, pos, (uint32_t)np);
            else if (next - 1 < done)
                pie_forward_tokens(f, &out[next - 1], pos, 1);
            else
                pie_forward_token_from(f, ring[(next - 1) % 65], 0, pos[0]);
            int32_t npg = (kv + ps - 1) / ps;
            pie_forward_pages(f, pages, (uint32_t)npg,
                              (uint32_t)(kv - (npg - 1) * ps));
            pie_forward_output(f, (uint32_t)(cnt - 1), PIE_SAMPLER_GREEDY, 0, 0,
                               1, 0, 0);
            ring[next % 65] = pie_forward_submit(f);
            if (ring[next % 65] == PIE_EAGAIN) return 9;   /* swapped out */
            if (ring[next % 65] < 0) return 5;
            next++;
        }
        int32_t fut = ring[done % 65];
        if (pie_future_wait(fut) != 0) return 6;
        if (pie_forward_read_tokens(fut, &out[done], 1) != 1) return 7;
        pie_future_free(fut);
        done++;
        if (stop_early && done == 5) {
            for (int32_t k = done; k < next; k++) pie_future_cancel(ring[k % 65]);
            break;
        }
    }
    char buf[MAXT * 8];
    int len = 0;
    for (int32_t i = 0; i < done; i++)
        len += snprintf(buf + len, sizeof buf - len, i ? " %d" : "%d", out[i]);
    pie_send(buf, (uint32_t)len);
    if (!stop_early) pie_kv_free(m, pages, (uint32_t)need);
    return 0;
}
