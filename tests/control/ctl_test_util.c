/*
 * ctl_test_util.c — the helpers the control layer's fake-backend tests
 * share; ctl_test_util.h states what each one does. They CHECK as the
 * tests do, into this file's own count (test_util.h's counter is static),
 * which ctl_test_run() adds to each executable's total.
 */
#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/ctl_fwd.h"
#include "tests/control/ctl_test_util.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

void ctl_test_run(int argc, char **argv, const ctl_test *tests, size_t n,
                  int *checks)
{
    for (int a = 1; a < argc; a++) {
        int32_t k = 0;
        while (k < n && strcmp(tests[k].name, argv[a]) != 0) k++;
        CHECK(k < n, "no test named '%s'", argv[a]);
        tests[k].fn();
    }
    for (int32_t k = 0; argc == 1 && k < n; k++) tests[k].fn();
    *checks += test_n_checks;
}

double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

pie_ctl *make_ctl(int32_t n_pages, int32_t delay_us,
                  const pie_ctl_opts *o, pie_backend **bk)
{
    CHECK_OK(fake_backend_create(VOCAB, PS, n_pages, delay_us, bk));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(*bk, o, &ctl));
    return ctl;
}

void wait_started(pie_backend *b, int32_t n)
{
    for (int k = 0; k < 30000 && fake_backend_started(b) < n; k++) usleep(1000);
    CHECK(fake_backend_started(b) >= n, "forward %d never started", n);
}

void done_ctl(pie_ctl *ctl, pie_backend *b)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.queue_depth == 0, "queue depth %d at end", st.queue_depth);
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

void open_clients(pie_ctl *ctl, pie_ctl_client **c, ...)
{
    va_list ap;
    va_start(ap, c);
    for (; c; c = va_arg(ap, pie_ctl_client **))
        CHECK_OK(pie_ctl_client_open(ctl, NULL, c));
    va_end(ap);
}

pie_ctl_client *open_holding(pie_ctl *ctl, const pie_ctl_client_opts *o,
                             int32_t n, uint32_t *h)
{
    pie_ctl_client *c;
    CHECK_OK(pie_ctl_client_open(ctl, o, &c));
    CHECK_OK(pie_ctl_page_alloc(c, n, 0, h));
    return c;
}

void close_clients(pie_ctl_client *c, ...)
{
    va_list ap;
    va_start(ap, c);
    for (; c; c = va_arg(ap, pie_ctl_client *)) pie_ctl_client_close(c);
    va_end(ap);
}

void check_free(pie_ctl *ctl, int32_t n)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_free == n, "pages free %d, expected %d", st.pages_free, n);
}

void check_empty(pie_ctl *ctl)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_used == 0 && st.exports == 0, "at the end: %d pages "
          "used, %d exports; expected 0 and 0", st.pages_used, st.exports);
}

void unexport_all(pie_ctl_client *c, ...)
{
    va_list ap;
    va_start(ap, c);
    for (const char *nm; (nm = va_arg(ap, const char *));)
        CHECK_OK(pie_ctl_unexport(c, nm));
    va_end(ap);
}

void reference(const int32_t *prompt, int32_t np, int32_t n, int32_t *out)
{
    fake_expected_gen(prompt, np, n, VOCAB, out);
}

void make_prompt(int32_t *p, int32_t n, uint32_t seed)
{
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 8) % VOCAB);
    }
}

int64_t gen_run(pie_ctl *ctl, pie_backend *b, uint32_t seed,
                const char *what)
{
    int32_t prompt[13], want[3], got[3], n;
    make_prompt(prompt, 13, seed);
    reference(prompt, 13, 3, want);
    pie_ctl_gen_opts o = { .prompt = prompt, .n_prompt = 13, .max_tokens = 3,
                           .timeout_ms = 0 };
    int64_t t0 = fake_backend_stats(b)->total_tokens;
    CHECK_OK(pie_ctl_generate(ctl, &o, got, 3, &n));
    check_same(want, got, 3, what);
    return fake_backend_stats(b)->total_tokens - t0;
}

void cache_prompt(pie_ctl *ctl, pie_backend *b, uint32_t seed)
{
    gen_run(ctl, b, seed, "first run");
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.pages_cached == 3 && st.pages_free == 8, "after the first run: "
          "%d cached, %d free; expected 3 and 8", st.pages_cached,
          st.pages_free);
}

void check_same(const int32_t *want, const int32_t *got, int32_t n,
                const char *what)
{
    for (int32_t i = 0; i < n; i++)
        CHECK(want[i] == got[i], "%s: expected %d, got %d at step %d", what,
              want[i], got[i], i);
}

/* ---- one forward, by hand ---------------------------------------------- */

int fwd_cb(pie_ctl_client *c, const int32_t *toks, int32_t n,
           int32_t pos0, const uint32_t *pages, pie_ctl_future *from,
           pie_ctl_done_fn done, void *user, pie_ctl_future **out)
{
    return ctl_test_fwd(c, PS, toks, n, pos0, pages, from, done, user, out);
}

int fwd(pie_ctl_client *c, const int32_t *toks, int32_t n, int32_t pos0,
        const uint32_t *pages, pie_ctl_future *from,
        pie_ctl_future **out)
{
    return fwd_cb(c, toks, n, pos0, pages, from, NULL, NULL, out);
}

int32_t fwd_token(pie_ctl_client *c, const int32_t *toks, int32_t n,
                  int32_t pos0, const uint32_t *pages)
{
    pie_ctl_future *f;
    CHECK_OK(fwd(c, toks, n, pos0, pages, NULL, &f));
    int32_t tok = wait_token(f);
    pie_ctl_future_release(f);
    return tok;
}

pie_ctl_future *hold_device(pie_backend *b, pie_ctl_client *c,
                            const int32_t *toks, int32_t n,
                            int32_t pos0, const uint32_t *pages)
{
    int32_t s0 = fake_backend_started(b);
    fake_backend_set_delay(b, HOLD_US);
    pie_ctl_future *f;
    CHECK_OK(fwd(c, toks, n, pos0, pages, NULL, &f));
    wait_started(b, s0 + 1);
    return f;
}

int32_t wait_token(pie_ctl_future *f)
{
    CHECK_OK(pie_ctl_future_wait(f, 10000));
    const pie_forward_out *o;
    CHECK_OK(pie_ctl_future_result(f, &o, NULL));
    return o->tokens[0];
}
