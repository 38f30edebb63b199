/*
 * test_control_sched.c — the scheduler's hand-offs (control/sched.c) under
 * a device kept busy, against the fake backend (fake_backend.h) with 1 ms
 * forwards.
 *
 * A chained generation keeps a decode step ready whenever a batch ends, and
 * the device thread launches it at once (turn_over). Calls that need the
 * device idle (pie__wait_idle: a swap of the suspend policy, a client's
 * resume, export files) must still get it after the batch on the device:
 * before idle_waiters, they waited until the generation ended (2 s here),
 * a resume polled with timeout 0 included. Progress is counted in fires
 * (pie_ctl_stats), not timed: each call may see at most the batch that was
 * running plus one.
 *
 * Every test arms alarm(): a regression that hangs dies with SIGALRM.
 */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/fake_backend.h"
#include "tests/test_util.h"

#define VOCAB   1000
#define PS      16
#define TOKENS  1500    /* 1.5 s of 1 ms steps: far more than the calls */
#define MAX_FIRES 3     /* fires a waiting call may see */
#define GUARD_S 60

typedef struct gen_job {
    pie_ctl *ctl;
    int32_t  out[TOKENS], n;
    int      rc;
} gen_job;

static void *gen_main(void *arg)
{
    gen_job *j = arg;
    int32_t prompt[8];
    for (int i = 0; i < 8; i++) prompt[i] = 3 + i;
    pie_ctl_gen_opts o = { .prompt = prompt, .n_prompt = 8,
                           .max_tokens = TOKENS, .lookahead = 4,
                           .timeout_ms = 10000 };
    j->rc = pie_ctl_generate(j->ctl, &o, j->out, TOKENS, &j->n);
    return NULL;
}

static uint64_t fires(pie_ctl *ctl)
{
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    return st.fires;
}

/* Starts the generation and returns once it has fired 20 steps. */
static void start_gen(pie_ctl *ctl, gen_job *j, pthread_t *th)
{
    j->ctl = ctl;
    CHECK(pthread_create(th, NULL, gen_main, j) == 0, "cannot start");
    uint64_t f0 = fires(ctl);
    while (fires(ctl) < f0 + 20) usleep(1000);
}

static void end_gen(pthread_t th, gen_job *j, const char *what)
{
    pthread_join(th, NULL);
    CHECK(j->rc == 0 && j->n == TOKENS, "%s: the generation beside it: rc "
          "%d, %d of %d tokens (%s)", what, j->rc, j->n, TOKENS, pie_err_msg());
}

static void check_fires(uint64_t n, const char *what)
{
    CHECK(n <= MAX_FIRES, "%s waited through %llu fires of a busy device; "
          "expected at most %d (the running batch and one more)", what,
          (unsigned long long)n, MAX_FIRES);
    printf("%s: returned after %llu fires of a busy device\n", what,
           (unsigned long long)n);
}

/* An export file needs the device idle (persist.c): saving a name that does
 * not exist finds out after the wait. */
static void test_export_save(void)
{
    alarm(GUARD_S);
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, PS, 512, 1000, &b));
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    gen_job *j = calloc(1, sizeof *j);
    pthread_t th;
    start_gen(ctl, j, &th);
    uint64_t f0 = fires(ctl);
    int rc = pie_ctl_export_save(ctl, "absent", "/nonexistent/absent.kv");
    uint64_t n = fires(ctl) - f0;
    CHECK(rc == PIE_ENOTFOUND, "export_save of an absent name: %d (%s)", rc,
          pie_err_msg());
    check_fires(n, "export_save beside a chained generation");
    end_gen(th, j, "export_save");
    free(j);
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

/* The suspend policy swaps an idle client out for a request: the swap needs
 * the device idle (suspend.c), and so does the swapped client's resume,
 * here polled with timeout 0. */
static void test_suspend_resume(void)
{
    alarm(GUARD_S);
    pie_backend *b;
    pie_ctl *ctl;
    CHECK_OK(fake_backend_create(VOCAB, PS, 300, 1000, &b));
    pie_ctl_opts co = { .policy = PIE_CTL_POLICY_SUSPEND };
    CHECK_OK(pie_ctl_create(b, &co, &ctl));
    pie_ctl_client *v, *r;
    pie_ctl_client_opts vo = { .name = "victim" }, ro = { .name = "req" };
    CHECK_OK(pie_ctl_client_open(ctl, &vo, &v));
    CHECK_OK(pie_ctl_client_open(ctl, &ro, &r));
    static uint32_t hv[300], hr[300];
    CHECK_OK(pie_ctl_page_alloc(v, 100, 0, hv));          /* idle victim */
    gen_job *j = calloc(1, sizeof *j);
    pthread_t th;
    start_gen(ctl, j, &th);
    pie_ctl_stats st;
    pie_ctl_get_stats(ctl, &st);
    int32_t want = st.pages_free + 20;             /* only a swap makes room */
    uint64_t f0 = fires(ctl);
    CHECK_OK(pie_ctl_page_alloc(r, want, 2000, hr));
    check_fires(fires(ctl) - f0, "a suspend-policy allocation (a swap-out)");
    pie_ctl_get_stats(ctl, &st);
    CHECK(st.suspensions >= 1, "the allocation swapped nobody out");
    CHECK_OK(pie_ctl_page_free(r, want, hr));           /* room for v again */
    f0 = fires(ctl);
    int rc = pie_ctl_client_resume(v, 0);
    check_fires(fires(ctl) - f0, "a resume polled with timeout 0");
    CHECK(rc == 0, "resume with room: %d (%s)", rc, pie_err_msg());
    end_gen(th, j, "suspend and resume");
    free(j);
    pie_ctl_client_close(r);
    pie_ctl_client_close(v);
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

int main(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    test_export_save();
    test_suspend_resume();
    TEST_DONE();
}
