/*
 * test_engine.c — the engine host functions (runtime/host_engine.c) end to
 * end: a wasm inferlet (inferlets/gen_raw.c) generating through the raw
 * API with chained decode steps on stories260K must send exactly the greedy
 * ids of reference.json, alone and as 32 concurrent instances; an inferlet
 * that stops early and exits holding pages and pending futures leaks
 * nothing; bad handles and arguments return the documented errors; a bad
 * pointer traps only that instance; an instance killed while kv_alloc
 * waits for a short pool leaks nothing (LeakSanitizer in the ASan build);
 * an inferlet that piles logit masks into a forward builder is refused at
 * its byte budget, gets the budget back when it submits, and the server
 * goes on; an inferlet swapped out (`suspend` policy) while idle parks in
 * forward_submit until the pool has room for its pages, without holding
 * the runtime's only worker thread, and then generates the same ids.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "common/pie_err.h"
#include "control/control.h"
#include "model/model.h"
#include "runtime/host_engine.h"
#include "runtime/runtime.h"
#include "tests/test_util.h"

typedef struct result {
    pthread_mutex_t mu;
    char            msg[8192];
    size_t          len;
} result;

static void on_message(void *user, pie_rt_instance *i, const void *buf,
                       size_t len)
{
    result *r = user;
    (void)i;
    pthread_mutex_lock(&r->mu);
    if (r->len + len < sizeof r->msg) {
        memcpy(r->msg + r->len, buf, len);
        r->len += len;
        r->msg[r->len] = 0;
    }
    pthread_mutex_unlock(&r->mu);
}

static void on_output(void *user, pie_rt_instance *i, int fd, const char *buf,
                      size_t len)
{
    (void)user, (void)i;
    fprintf(stderr, "[inferlet fd %d] %.*s", fd, (int)len, buf);
}

static char *ids_text(json_t *a, int32_t n, char sep)
{
    static char buf[4][4096];
    static int k;
    char *b = buf[k++ % 4];
    int len = 0;
    for (int32_t i = 0; i < n; i++)
    {
        if (i) b[len++] = sep;
        len += snprintf(b + len, 4096 - len, "%lld",
                        (long long)json_integer_value(json_array_get(a, i)));
    }
    b[len] = 0;
    return b;
}

static pie_rt_module *load_module(pie_rt *rt)
{
    FILE *f = fopen(TEST_WASM_DIR "/gen_raw.wasm", "rb");
    CHECK(f != NULL, "cannot open gen_raw.wasm");
    static unsigned char buf[1 << 20];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    pie_rt_module *m = NULL;
    CHECK_OK(pie_rt_module_load(rt, buf, len, &m, NULL));
    return m;
}

static int32_t launch_wait(pie_rt *rt, pie_rt_module *mod, int argc,
                           const char **argv, result *r, char *reason)
{
    pie_rt_launch_cbs cbs = { .user = r, .on_message = on_message,
                              .on_output = on_output };
    pie_rt_instance *inst = NULL;
    CHECK_OK(pie_rt_launch(rt, mod, argc, argv, &cbs, &inst));
    int32_t st = pie_rt_wait(inst, reason, 256);
    pie_rt_instance_unref(inst);
    return st;
}

/* An instance killed while kv_alloc waits for a short pool (8 pages, all
 * held by another instance) ends with its trap; kv_alloc's buffer of page
 * handles must not leak with it (LeakSanitizer checks at exit). */
static void kill_in_kv_alloc(pie_model *m)
{
    pie_backend_opts bo = { .page_size = 16, .n_pages = 8, .n_threads = 1 };
    pie_backend *b = NULL;
    CHECK_OK(pie_backend_cpu_create(m, &bo, &b));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    pie_engine *e = NULL;
    CHECK_OK(pie_engine_create(NULL, &e));
    CHECK_OK(pie_engine_add_model(e, "stories260K", m, ctl));
    pie_rt_opts ro = { .n_workers = 2, .cache_dir = TEST_CACHE_DIR,
                       .hooks = pie_engine_hooks(e) };
    pie_rt *rt = NULL;
    CHECK_OK(pie_rt_create(&ro, &rt));
    pie_rt_module *mod = load_module(rt);
    const char *all[] = { "gen_raw", "hold", "8" };
    const char *some[] = { "gen_raw", "hold", "4" };
    pie_rt_instance *holder = NULL, *waiter = NULL;
    CHECK_OK(pie_rt_launch(rt, mod, 3, all, NULL, &holder));
    pie_ctl_stats cs;
    for (int k = 0; k < 15000; k++) {    /* until the holder has the pool */
        pie_ctl_get_stats(ctl, &cs);
        if (cs.pages_free == 0) break;
        usleep(2000);
    }
    CHECK(cs.pages_free == 0, "holder: %d pages still free", cs.pages_free);
    CHECK_OK(pie_rt_launch(rt, mod, 3, some, NULL, &waiter));
    usleep(100000);                      /* the waiter parks in kv_alloc */
    pie_rt_kill(waiter, "test");
    char reason[256] = "";
    int32_t st = pie_rt_wait(waiter, reason, sizeof reason);
    pie_rt_instance_unref(waiter);
    CHECK(st == PIE_ETRAP && strcmp(reason, "killed: test") == 0,
          "waiter: status %d (%s)", st, reason);
    printf("kv_alloc: an instance killed while it waited for pages ended "
           "(%s)\n", reason);
    CHECK_OK(pie_rt_send(holder, "x", 1));
    st = pie_rt_wait(holder, reason, sizeof reason);
    pie_rt_instance_unref(holder);
    CHECK(st == 0, "holder: status %d (%s)", st, reason);
    pie_rt_module_unref(mod);
    pie_rt_free(rt);
    pie_engine_free(e);
    pie_ctl_free(ctl);
    pie_backend_free(b);
}

/* What the suspend tests share: an 8-page pool under the suspend policy,
 * one worker, instance A (gen_raw pause) paused halfway with its pages
 * idle, then a native priority-0 client, the hog, taking the whole pool
 * (which swaps A out). */
typedef struct suspend_fix {
    pie_backend     *b;
    pie_ctl         *ctl;
    pie_engine      *e;
    pie_rt          *rt;
    pie_rt_module   *mod;
    pie_rt_instance *a;
    pie_ctl_client  *hog;
} suspend_fix;

static result sus_ra;       /* A's messages (its callbacks' user data) */

static void suspend_start(suspend_fix *f, pie_model *m, const char *prompt,
                          int32_t alloc_timeout_ms)
{
    pie_backend_opts bo = { .page_size = 16, .n_pages = 8, .n_threads = 1 };
    CHECK_OK(pie_backend_cpu_create(m, &bo, &f->b));
    pie_ctl_opts co = { .policy = PIE_CTL_POLICY_SUSPEND };
    CHECK_OK(pie_ctl_create(f->b, &co, &f->ctl));
    pie_engine_opts eo = { .client = { .priority = 3 },
                           .alloc_timeout_ms = alloc_timeout_ms };
    CHECK_OK(pie_engine_create(&eo, &f->e));
    CHECK_OK(pie_engine_add_model(f->e, "stories260K", m, f->ctl));
    pie_rt_opts ro = { .n_workers = 1, .cache_dir = TEST_CACHE_DIR,
                       .hooks = pie_engine_hooks(f->e) };
    CHECK_OK(pie_rt_create(&ro, &f->rt));
    f->mod = load_module(f->rt);
    result *ra = &sus_ra;
    pthread_mutex_init(&ra->mu, NULL);
    ra->len = 0;
    ra->msg[0] = 0;
    const char *av_a[] = { "gen_raw", "pause", prompt, "20", "0" };
    pie_rt_launch_cbs cbs = { .user = ra, .on_message = on_message,
                              .on_output = on_output };
    CHECK_OK(pie_rt_launch(f->rt, f->mod, 5, av_a, &cbs, &f->a));
    for (int k = 0; k < 15000; k++) {
        pthread_mutex_lock(&ra->mu);
        size_t len = ra->len;
        pthread_mutex_unlock(&ra->mu);
        if (len > 0) break;
        usleep(2000);
    }
    CHECK(strcmp(ra->msg, "p") == 0, "A never paused (sent '%s')", ra->msg);
    pie_ctl_client_opts ho = { .priority = 0, .name = "hog" };
    uint32_t hh[8];
    CHECK_OK(pie_ctl_client_open(f->ctl, &ho, &f->hog));
    CHECK_OK(pie_ctl_page_alloc(f->hog, 8, 0, hh));  /* swaps A out */
}

static void suspend_free(suspend_fix *f)
{
    pie_engine_free(f->e);
    pie_ctl_free(f->ctl);
    pie_backend_free(f->b);
}

/* The `suspend` policy through the runtime, on one worker thread: A
 * (priority 3) generates half its tokens and idles; a native client of
 * priority 0 takes the whole pool, swapping A out. A's next forward_submit
 * finds the pool full and must park, not block the worker: another
 * instance on it (one that traps at once) has to run meanwhile. Before, the
 * submit held the worker for up to 30 s. Once the native client leaves,
 * A's pages come back and A sends exactly the reference ids. */
static void suspend_in_runtime(pie_model *m, const char *prompt,
                               const char *want20)
{
    suspend_fix f;
    suspend_start(&f, m, prompt, 0);
    pie_ctl_stats cs;
    pie_ctl_get_stats(f.ctl, &cs);
    CHECK(cs.suspensions == 1, "suspensions %llu, expected 1",
          (unsigned long long)cs.suspensions);
    test_watchdog("a suspended inferlet parks in forward_submit", 20);
    CHECK_OK(pie_rt_send(f.a, "x", 1));  /* A's next step needs its pages */
    usleep(100000);
    char reason[256] = "";
    static result rc_;
    pthread_mutex_init(&rc_.mu, NULL);
    const char *av_c[] = { "gen_raw", "badptr" };
    int32_t st = launch_wait(f.rt, f.mod, 2, av_c, &rc_, reason);
    CHECK(st == PIE_ETRAP, "the other instance: status %d (%s)", st, reason);
    pie_ctl_client_close(f.hog);
    st = pie_rt_wait(f.a, reason, sizeof reason);
    pie_rt_instance_unref(f.a);
    test_watchdog_off();
    char want[4096];
    snprintf(want, sizeof want, "p%s", want20);
    CHECK(st == 0 && strcmp(sus_ra.msg, want) == 0, "A: status %d (%s), "
          "sent\n  %s\nexpected\n  %s", st, reason, sus_ra.msg, want);
    pie_ctl_get_stats(f.ctl, &cs);
    CHECK(cs.suspensions == 1 && cs.pages_free == cs.pages_total,
          "%llu suspensions, %d of %d pages free at the end",
          (unsigned long long)cs.suspensions, cs.pages_free, cs.pages_total);
    printf("suspend: an inferlet swapped out while idle parked (the worker "
           "ran another instance) until the pool had room, then matched the "
           "reference\n");
    pie_rt_module_unref(f.mod);
    pie_rt_free(f.rt);
    suspend_free(&f);
}

/* An inferlet whose pages the suspend policy swapped out, while the pool
 * stays full past the allocation timeout: forward_submit gives up with
 * PIE_EAGAIN (gen_raw exits 9), the instance ends cleanly and its pages
 * and swap are released. */
static void suspend_timeout(pie_model *m, const char *prompt)
{
    suspend_fix f;
    suspend_start(&f, m, prompt, 300);
    test_watchdog("a swapped-out inferlet's submit times out", 30);
    CHECK_OK(pie_rt_send(f.a, "x", 1));
    char reason[256] = "";
    int32_t st = pie_rt_wait(f.a, reason, sizeof reason);
    pie_rt_instance_unref(f.a);
    test_watchdog_off();
    CHECK(st == 9, "A: status %d (%s), expected 9 (forward_submit returned "
          "PIE_EAGAIN)", st, reason);
    pie_ctl_client_close(f.hog);
    pie_rt_module_unref(f.mod);
    pie_rt_free(f.rt);
    pie_ctl_stats cs;
    pie_ctl_get_stats(f.ctl, &cs);
    CHECK(cs.pages_free == cs.pages_total, "%d of %d pages free at the end",
          cs.pages_free, cs.pages_total);
    printf("suspend: a swapped-out inferlet's submit gives up with PIE_EAGAIN "
           "after the allocation timeout\n");
    suspend_free(&f);
}

int main(void)
{
    json_error_t je;
    json_t *ref = json_load_file(test_shared_path("models/stories260K/"
                                                  "reference.json"), 0, &je);
    CHECK(ref, "reference.json: %s", je.text);
    json_t *p1 = json_array_get(json_object_get(ref, "prompts"), 1);
    json_t *in = json_object_get(p1, "input_ids");
    json_t *greedy = json_object_get(p1, "greedy_ids");
    int32_t n_gen = 60;
    char prompt[256], want[4096];
    snprintf(prompt, sizeof prompt, "%s",
             ids_text(in, (int32_t)json_array_size(in), ','));
    snprintf(want, sizeof want, "%s", ids_text(greedy, n_gen, ' '));

    pie_model *m = NULL;
    CHECK_OK(pie_model_load(test_shared_path("models/stories260K"), NULL, NULL,
                            &m));
    pie_backend_opts bo = { .page_size = 16, .n_pages = 1024, .n_threads = 1 };
    pie_backend *b = NULL;
    CHECK_OK(pie_backend_cpu_create(m, &bo, &b));
    pie_ctl *ctl = NULL;
    CHECK_OK(pie_ctl_create(b, NULL, &ctl));
    pie_engine *e = NULL;
    pie_engine_opts eo = { .client = { .max_pages = 64 } };
    CHECK_OK(pie_engine_create(&eo, &e));
    CHECK_OK(pie_engine_add_model(e, "stories260K", m, ctl));
    pie_rt_opts ro = { .n_workers = 2, .cache_dir = TEST_CACHE_DIR,
                       .hooks = pie_engine_hooks(e) };
    pie_rt *rt = NULL;
    CHECK_OK(pie_rt_create(&ro, &rt));
    pie_rt_module *mod = load_module(rt);
    char ns[16];
    snprintf(ns, sizeof ns, "%d", n_gen);
    char reason[256] = "";

    /* alone */
    static result r[32];
    for (int k = 0; k < 32; k++) pthread_mutex_init(&r[k].mu, NULL);
    const char *argv_ok[] = { "gen_raw", "ok", prompt, ns, "4" };
    int32_t st = launch_wait(rt, mod, 5, argv_ok, &r[0], reason);
    CHECK(st == 0, "instance exited %d (%s)", st, reason);
    CHECK(strcmp(r[0].msg, want) == 0, "inferlet sent\n  %s\nexpected\n  %s",
          r[0].msg, want);
    printf("alone: inferlet with chained decode reproduces %d reference ids\n",
           n_gen);

    /* 32 concurrent instances */
    pie_rt_instance *insts[32];
    const char *looks[] = { "1", "2", "4", "8" };
    for (int k = 0; k < 32; k++) {
        r[k].len = 0;
        r[k].msg[0] = 0;
        const char *av[] = { "gen_raw", "ok", prompt, ns, looks[k % 4] };
        pie_rt_launch_cbs cbs = { .user = &r[k], .on_message = on_message,
                                  .on_output = on_output };
        CHECK_OK(pie_rt_launch(rt, mod, 5, av, &cbs, &insts[k]));
    }
    for (int k = 0; k < 32; k++) {
        st = pie_rt_wait(insts[k], reason, sizeof reason);
        pie_rt_instance_unref(insts[k]);
        CHECK(st == 0, "instance %d exited %d (%s)", k, st, reason);
        CHECK(strcmp(r[k].msg, want) == 0, "instance %d sent %s", k, r[k].msg);
    }
    pie_ctl_stats cs;
    pie_ctl_get_stats(ctl, &cs);
    CHECK(cs.max_batch_reqs > 1, "largest fire %d", cs.max_batch_reqs);
    printf("concurrent: 32 inferlets all match; largest fire %d requests\n",
           cs.max_batch_reqs);

    /* exits early holding pages and cancelled futures: nothing leaks */
    r[0].len = 0;
    const char *argv_stop[] = { "gen_raw", "stop", prompt, ns, "8" };
    st = launch_wait(rt, mod, 5, argv_stop, &r[0], reason);
    CHECK(st == 0, "stop instance exited %d (%s)", st, reason);
    char want5[256];
    snprintf(want5, sizeof want5, "%s", ids_text(greedy, 5, ' '));
    CHECK(strcmp(r[0].msg, want5) == 0, "stop sent %s", r[0].msg);

    /* bad arguments: documented errors */
    r[0].len = 0;
    r[0].msg[0] = 0;
    const char *argv_bad[] = { "gen_raw", "badargs" };
    st = launch_wait(rt, mod, 2, argv_bad, &r[0], reason);
    CHECK(st == 0 && strcmp(r[0].msg, "ok") == 0, "badargs: status %d, "
          "sent '%s'", st, r[0].msg);

    /* host copies in forward builders are bounded: 4 MiB logit masks from
     * one guest buffer are refused at the budget (256 MiB), submitting
     * gives the bytes back, and other inferlets still run */
    r[0].len = 0;
    r[0].msg[0] = 0;
    const char *argv_masks[] = { "gen_raw", "masks" };
    st = launch_wait(rt, mod, 2, argv_masks, &r[0], reason);
    int at = -1, rc1 = 0, rc2 = 1;
    CHECK(st == 0 && sscanf(r[0].msg, "refused at %d: %d; after submit: %d",
                            &at, &rc1, &rc2) == 3,
          "masks: status %d (%s), sent '%s'", st, reason, r[0].msg);
    CHECK(rc1 == PIE_ELIMIT && rc2 == 0 && at >= 48 && at <= 64,
          "masks: refused at %d with %d (want 48..64, %d); after submit %d",
          at, rc1, PIE_ELIMIT, rc2);
    r[0].len = 0;
    st = launch_wait(rt, mod, 5, argv_ok, &r[0], reason);
    CHECK(st == 0 && strcmp(r[0].msg, want) == 0,
          "after masks: status %d, sent %s", st, r[0].msg);
    printf("builders: logit masks refused at %d x 4 MiB (%s); submit frees "
           "the budget; the next inferlet runs\n", at, pie_err_name(rc1));

    /* bad pointer: trap */
    const char *argv_ptr[] = { "gen_raw", "badptr" };
    st = launch_wait(rt, mod, 2, argv_ptr, &r[0], reason);
    CHECK(st == PIE_ETRAP, "bad pointer: status %d (%s)", st, reason);
    printf("errors: bad arguments return codes, bad pointer traps (%s)\n",
           reason);

    pie_ctl_get_stats(ctl, &cs);
    CHECK(cs.pages_free == cs.pages_total, "%d of %d pages free after all "
          "instances ended", cs.pages_free, cs.pages_total);
    CHECK(cs.clients == 0 && cs.queue_depth == 0, "%d clients, depth %d",
          cs.clients, cs.queue_depth);
    printf("no leaks: all %d pages free, no clients, empty queue\n",
           cs.pages_total);

    /* the runtime freed right after an inferlet that stopped early with
     * steps in flight: pie_rt_free returns only once their completions
     * (which lock the runtime) have run, so nothing is left behind */
    r[0].len = 0;
    st = launch_wait(rt, mod, 5, argv_stop, &r[0], reason);
    CHECK(st == 0, "stop instance exited %d (%s)", st, reason);
    pie_rt_module_unref(mod);
    pie_rt_free(rt);
    pie_ctl_get_stats(ctl, &cs);
    CHECK(cs.pages_free == cs.pages_total && cs.queue_depth == 0,
          "after pie_rt_free: %d of %d pages free, depth %d", cs.pages_free,
          cs.pages_total, cs.queue_depth);
    printf("shutdown: no step outlives pie_rt_free\n");
    kill_in_kv_alloc(m);
    char want20[1024];
    snprintf(want20, sizeof want20, "%s", ids_text(greedy, 20, ' '));
    suspend_in_runtime(m, prompt, want20);
    suspend_timeout(m, prompt);
    pie_engine_free(e);
    pie_ctl_free(ctl);
    pie_backend_free(b);
    pie_model_free(m);
    json_decref(ref);
    TEST_DONE();
}
