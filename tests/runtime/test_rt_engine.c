/*
 * test_rt_engine.c — the engine host functions (runtime/host_engine.c)
 * against a hostile inferlet (inferlets/engine_hostile.c) on stories260K
 * through the CPU backend. Each case launches the inferlet on a fresh
 * server and checks that it ends as expected and that the server is left
 * whole: every page back in the pool, no client, an empty queue.
 *
 *   codes        bad counts (2^31-1, 2^32-1), handles (unknown, freed,
 *                read-only, the same page written twice), tokens,
 *                positions, masks (past kv_len or the vocabulary, summing
 *                past 2^32), sampler parameters (NaN, inf, negative, top_k
 *                past the vocabulary), futures (freed, cancelled, waited
 *                twice) and chains each return the documented code
 *   mask_indptr  an attention-mask indptr that jumps past its runs and
 *                comes back ([0, J, 2] over 2 runs) is refused by
 *                forward_mask; before, forward_submit summed runs[0..J)
 *                and read past the host's copy (a heap overflow under
 *                ASan; J = 2^24 crashed the server), and a good forward
 *                runs after it
 *   cancel_running
 *                a forward cancelled while the backend runs it: its
 *                future is done with PIE_ECANCELED, and so must
 *                forward_read_tokens / _values say at once; before, they
 *                said PIE_EAGAIN ("pending") until the step ended, so a
 *                guest that waited on the future and read again spun
 *   trap_leaks   kv_import and kv_export with a good name and a page
 *                buffer outside memory trap the instance; the host's copy
 *                of the name must not leak (LeakSanitizer in the ASan
 *                build: before, 12 bytes per call were lost)
 *   outputs      the forward results an instance's futures hold are
 *                bounded (its memory limit of 2 MiB here): submits of one
 *                LOGITS row each, never freed, fail with PIE_ELIMIT once
 *                the next would pass it, and the instance runs on;
 *                freeing a future makes room, a builder chaining from a
 *                freed future keeps its results counted, and a second
 *                instance has its own budget while the first holds its
 *                own full. Before, 4096 such submits all succeeded: a
 *                guest that never freed its futures made the host hold
 *                any amount of memory
 *   outputs_opt  the same bound set by pie_engine_opts.max_output_bytes
 *   inputs       the input copies a submitted forward keeps until its
 *                future is freed count against the same bound: forwards
 *                of one token with a 4096-run mask (16 KiB) and one
 *                greedy row, never freed, fail with PIE_ELIMIT once the
 *                next would pass 2 MiB (pie_ctl_forward_bytes each), the
 *                instance runs on and a freed future makes room. Before,
 *                only the 12 result bytes counted: all 4096 were held
 *                (64 MiB of masks in the host)
 *   copies       the page copies an instance has queued count against
 *                the same bound until they complete: kv_copy behind a
 *                long forward (each also behind the copy before it, on
 *                one destination page) fails with PIE_ELIMIT once the
 *                next would pass 2 MiB (pie_ctl_copy_bytes each, beside
 *                the forward's own bytes), the instance runs on, and a
 *                copy succeeds again once the queued ones ran. Before,
 *                kv_copy was never refused: 200,000 copies (about 60 MB
 *                of queued ops in the host) were queued behind one
 *                forward
 *   import_loop  kv_import of one 1-page export again and again stops
 *                with PIE_ELIMIT at the client's handle cap (65,536 live
 *                handles by default, its 4 pages included), and freeing
 *                one handle makes room; before, every import of the same
 *                export added a handle (1,000,000 imports all succeeded)
 *   import_quota kv_import of an export of 4 pages into an instance of
 *                max_pages 4 that holds 4 answers PIE_ELIMIT (control test import_quota
 *                checks that it takes nothing); before, it imported them:
 *                kv_import was never refused for the quota
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "control/control.h"
#include "model/model.h"
#include "runtime/host_engine.h"
#include "tests/runtime/rt_test_util.h"

typedef struct server {
    pie_model     *m;
    pie_backend   *b;
    pie_ctl       *ctl;
    pie_engine    *e;
    pie_rt        *rt;
    pie_rt_module *mod;
} server;

/* A server with engine options eo (NULL: defaults) and an instance memory
 * limit of mem bytes (0: the runtime's default). */
static void server_start_with(server *s, const pie_engine_opts *eo,
                              uint64_t mem)
{
    memset(s, 0, sizeof *s);
    CHECK_OK(pie_model_load(test_shared_path("models/stories260K"), NULL, NULL,
                            &s->m));
    pie_backend_opts bo = { .page_size = 16, .n_pages = 64, .n_threads = 1 };
    CHECK_OK(pie_backend_cpu_create(s->m, &bo, &s->b));
    CHECK_OK(pie_ctl_create(s->b, NULL, &s->ctl));
    CHECK_OK(pie_engine_create(eo, &s->e));
    CHECK_OK(pie_engine_add_model(s->e, "stories260K", s->m, s->ctl));
    pie_rt_opts ro = { .n_workers = 2, .hooks = pie_engine_hooks(s->e),
                       .memory_limit = mem };
    s->rt = make_rt(&ro);
    s->mod = load_wasm(s->rt, "engine_hostile.wasm", NULL);
}

static void server_start(server *s) { server_start_with(s, NULL, 0); }

/* Runs the inferlet with argv (NULL-terminated, after its name); returns
 * its status, its messages in msg and its trap reason in reason. */
static int32_t run_inferlet(server *s, const char **args, char *msg,
                            size_t cap, char reason[256])
{
    const char *argv[8] = { "engine_hostile" };
    for (int k = 0; args[k] && k < 6; k++) argv[k + 1] = args[k];
    pie_rt_launch_cbs cbs;
    capture *c = cap_new(&cbs);
    pie_rt_instance *i = launch_v(s->rt, s->mod, &cbs, argv);
    reason[0] = 0;
    int32_t st = pie_rt_wait(i, reason, 256);
    pie_rt_instance_unref(i);
    size_t n = c->n_msg < cap - 1 ? c->n_msg : cap - 1;
    memcpy(msg, c->msg, n);
    msg[n] = 0;
    if (c->n_err) fprintf(stderr, "[inferlet stderr] %s", c->err);
    cap_free(c);
    return st;
}

/* Runs the hostile inferlet in mode `mode` (its one argument), which must
 * end normally; its messages go to msg (cap bytes). */
static void run_mode(server *s, const char *mode, char *msg, size_t cap)
{
    char reason[256];
    const char *args[] = { mode, NULL };
    int32_t st = run_inferlet(s, args, msg, cap, reason);
    CHECK(st == 0, "%s: status %d (%s): the instance must run on", mode, st,
          reason);
}

/* run_mode for a mode that sends "n N rc RC again A" (msg keeps the whole
 * message). */
static void run_counts(server *s, const char *mode, char msg[256], int *n,
                       int *rc, int *again)
{
    run_mode(s, mode, msg, 256);
    *n = -1, *rc = 1, *again = -1;
    CHECK(sscanf(msg, "n %d rc %d again %d", n, rc, again) == 3,
          "%s: sent '%s'", mode, msg);
}

/* Frees the server after checking that the instances left it whole. An
 * op on the device when its instance ended (a KV copy queued last) still
 * runs to its end, and only then gives its pages back: the check waits for
 * the queue to drain, up to 30 s. */
static void server_end(server *s, const char *what)
{
    pie_rt_module_unref(s->mod);
    pie_rt_free(s->rt);
    pie_ctl_stats cs;
    pie_ctl_get_stats(s->ctl, &cs);
    for (int k = 0; k < 30000 && cs.queue_depth > 0; k++) {
        usleep(1000);
        pie_ctl_get_stats(s->ctl, &cs);
    }
    CHECK(cs.pages_free == cs.pages_total && cs.clients == 0 &&
          cs.queue_depth == 0, "%s: %d of %d pages free, %d clients, queue "
          "depth %d after the instances ended", what, cs.pages_free,
          cs.pages_total, cs.clients, cs.queue_depth);
    pie_engine_free(s->e);
    pie_ctl_free(s->ctl);
    pie_backend_free(s->b);
    pie_model_free(s->m);
}

static void test_codes(void)
{
    server s;
    server_start(&s);
    char msg[4096];
    run_mode(&s, "codes", msg, sizeof msg);
    CHECK(strcmp(msg, "ok") == 0, "codes: mismatches: %s", msg);
    server_end(&s, "codes");
    printf("codes: every hostile call returned its documented code\n");
}

static void test_mask_indptr(void)
{
    server s;
    server_start(&s);
    const char *jumps[] = { "16777216", "100" };
    for (int k = 0; k < 2; k++) {
        char msg[256], reason[256];
        const char *args[] = { "mask_indptr", jumps[k], NULL };
        int32_t st = run_inferlet(&s, args, msg, sizeof msg, reason);
        int set = 1, sub = 1, good = 1;
        CHECK(st == 0 && sscanf(msg, "set %d submit %d good %d", &set, &sub,
                                &good) == 3,
              "indptr [0, %s, 2]: status %d (%s), sent '%s'", jumps[k], st,
              reason, msg);
        CHECK(set == PIE_EINVAL && sub == 0 && good == 0,
              "indptr [0, %s, 2] over 2 runs: forward_mask returned %d "
              "(expected %d), the submit %d (expected 0: no mask), a good "
              "forward after it %d", jumps[k], set, PIE_EINVAL, sub, good);
    }
    server_end(&s, "mask_indptr");
    printf("mask_indptr: an indptr jumping past its runs is refused with "
           "PIE_EINVAL; the server runs on\n");
}

static void test_cancel_running(void)
{
    server s;
    server_start(&s);
    char msg[256];
    run_mode(&s, "cancel_running", msg, sizeof msg);
    int fst = 1, rd = 1, rv = 1;
    CHECK(sscanf(msg, "status %d read %d values %d", &fst, &rd, &rv) == 3,
          "cancel_running: sent '%s'", msg);
    CHECK(fst == PIE_ECANCELED && rd == PIE_ECANCELED && rv == PIE_ECANCELED,
          "a forward cancelled while it ran: future_status %d, "
          "forward_read_tokens %d, forward_read_values %d (expected %d, "
          "PIE_ECANCELED, for all three)", fst, rd, rv, PIE_ECANCELED);
    server_end(&s, "cancel_running");
    printf("cancel_running: a forward cancelled while it runs reads as "
           "PIE_ECANCELED at once, as its future says\n");
}

static void test_trap_leaks(void)
{
    server s;
    server_start(&s);
    const char *modes[] = { "import_badptr", "export_badptr" };
    for (int k = 0; k < 2; k++) {
        char msg[256], reason[256];
        const char *args[] = { modes[k], NULL };
        int32_t st = run_inferlet(&s, args, msg, sizeof msg, reason);
        CHECK(st == PIE_ETRAP && strstr(reason, "bad pointer"),
              "%s: status %d (%s), expected a trap on the bad pointer",
              modes[k], st, reason);
    }
    /* the export that import_badptr made outlives it: take it back */
    pie_ctl_client *c = NULL;
    CHECK_OK(pie_ctl_client_open(s.ctl, NULL, &c));
    CHECK_OK(pie_ctl_unexport(c, "hostile_imp"));
    pie_ctl_client_close(c);
    server_end(&s, "trap_leaks");
    printf("trap_leaks: kv_import and kv_export with a bad page buffer trap "
           "(leaks: LeakSanitizer at exit)\n");
}

/* Launches the inferlet with args (NULL-terminated, after its name);
 * the caller waits for it and frees c. */
static pie_rt_instance *start_inferlet(server *s, const char **args,
                                       capture **c)
{
    const char *argv[8] = { "engine_hostile" };
    for (int k = 0; args[k] && k < 6; k++) argv[k + 1] = args[k];
    pie_rt_launch_cbs cbs;
    *c = cap_new(&cbs);
    return launch_v(s->rt, s->mod, &cbs, argv);
}

/* Checks one outputs report of an instance whose result budget is
 * budget bytes: as many one-LOGITS-row forwards as fit, then PIE_ELIMIT;
 * room again after a free, none while a builder holds a freed future. */
/* What the control layer keeps for the inferlet's forwards of one token
 * (id 1 at position 0, page handle 1 filled to 1) with one output row of
 * kind, and a mask of mask_runs runs (0: none): pie_ctl_forward_bytes. */
static uint64_t forward_bytes(server *s, int32_t kind, uint32_t mask_runs)
{
    static uint32_t runs[4096];
    int32_t tok = 1, pos = 0, idx = 0;
    uint32_t page = 1, indptr[2] = { 0, mask_runs };
    pie_sampler sm = { .kind = kind };
    pie_ctl_forward f = { .n_tokens = 1, .tokens = &tok, .positions = &pos,
                          .n_pages = 1, .pages = &page, .last_page_len = 1,
                          .mask_indptr = mask_runs ? indptr : NULL,
                          .mask_runs = runs, .n_outputs = 1,
                          .output_idx = &idx, .samplers = &sm };
    return pie_ctl_forward_bytes(s->ctl, &f);
}

static void check_outputs(const char *who, const char *msg, uint64_t budget,
                          uint64_t per)
{
    int n = -1, rc = 1, again = 1, held = 1, after = 1;
    CHECK(sscanf(msg, "n %d rc %d again %d held %d after %d", &n, &rc,
                 &again, &held, &after) == 5, "%s: sent '%s'", who, msg);
    /* at least the results: a token and an offset per row, one more
     * offset, a value and an id per logit; and the inputs' copies */
    int want = (int)(budget / per);
    CHECK(n == want && rc == PIE_ELIMIT, "%s: %d forwards of one LOGITS row "
          "(%llu bytes kept each) held, then %d; expected %d (a budget of "
          "%llu bytes) and PIE_ELIMIT (%d)", who, n, (unsigned long long)per,
          rc, want, (unsigned long long)budget, PIE_ELIMIT);
    CHECK(again == 0 && held == PIE_ELIMIT && after == 0, "%s: a submit "
          "after freeing a future %d (expected 0), while a builder chains "
          "from a freed one %d (expected %d), once it is dropped %d "
          "(expected 0)", who, again, held, PIE_ELIMIT, after);
}

static void test_outputs(void)
{
    server s;
    const uint64_t mem = 2u << 20;
    server_start_with(&s, NULL, mem);
    uint64_t per = forward_bytes(&s, PIE_PROBE_LOGITS, 0);
    /* a holds its futures (its budget full) while b runs */
    const char *hold[] = { "outputs", "hold", NULL };
    capture *ca;
    pie_rt_instance *a = start_inferlet(&s, hold, &ca);
    for (int k = 0; k < 6000; k++) {
        pthread_mutex_lock(&ca->lock);
        int got = ca->n_msgs;
        pthread_mutex_unlock(&ca->lock);
        if (got) break;
        usleep(10000);
    }
    pthread_mutex_lock(&ca->lock);
    char msg_a[256];
    snprintf(msg_a, sizeof msg_a, "%.200s", ca->msg);
    pthread_mutex_unlock(&ca->lock);
    char msg[256], reason[256];
    run_mode(&s, "outputs", msg, sizeof msg);        /* b */
    check_outputs("b, beside a holding its budget full", msg, mem, per);
    CHECK_OK(pie_rt_send(a, "go", 2));
    int32_t st = pie_rt_wait(a, reason, sizeof reason);
    pie_rt_instance_unref(a);
    cap_free(ca);
    CHECK(st == 0, "a: status %d (%s)", st, reason);
    check_outputs("a", msg_a, mem, per);
    printf("outputs: a: %s; b: %s; a forward past the instance's result "
           "budget is refused with PIE_ELIMIT\n", msg_a, msg);
    server_end(&s, "outputs");
}

static void test_outputs_opt(void)
{
    server s;
    pie_engine_opts eo = { .max_output_bytes = 64u << 10 };
    server_start_with(&s, &eo, 0);
    char msg[256];
    run_mode(&s, "outputs", msg, sizeof msg);
    check_outputs("max_output_bytes 64 KiB", msg, eo.max_output_bytes,
                  forward_bytes(&s, PIE_PROBE_LOGITS, 0));
    server_end(&s, "outputs_opt");
    printf("outputs_opt: %s under max_output_bytes %llu\n", msg,
           (unsigned long long)eo.max_output_bytes);
}

static void test_inputs(void)
{
    server s;
    const uint64_t mem = 2u << 20;
    server_start_with(&s, NULL, mem);
    uint64_t per = forward_bytes(&s, PIE_SAMPLER_GREEDY, 4096);
    char msg[256];
    int n, rc, again;
    run_counts(&s, "inputs", msg, &n, &rc, &again);
    int want = (int)(mem / per);
    CHECK(n == want && rc == PIE_ELIMIT, "%d forwards of a 4096-run mask "
          "(%llu bytes kept each, 12 of them results) held, then %d; "
          "expected %d (a budget of %llu bytes) and PIE_ELIMIT (%d)", n,
          (unsigned long long)per, rc, want, (unsigned long long)mem,
          PIE_ELIMIT);
    CHECK(again == 0, "a submit after freeing a future: %d, expected 0",
          again);
    printf("inputs: %s; %llu bytes kept per forward: the input copies of "
           "held forwards are bounded\n", msg, (unsigned long long)per);
    server_end(&s, "inputs");
}

static void test_copies(void)
{
    server s;
    const uint64_t mem = 2u << 20;
    server_start_with(&s, NULL, mem);
    char msg[256];
    run_mode(&s, "copies", msg, sizeof msg);
    int n = -1, rc = 1, again = 1, pending = -1;
    CHECK(sscanf(msg, "n %d rc %d again %d pending %d", &n, &rc, &again,
                 &pending) == 4, "copies: sent '%s'", msg);
    CHECK(rc == PIE_ELIMIT, "%d copies queued behind one forward, then %d; "
          "expected PIE_ELIMIT (%d) once they pass the instance's %llu "
          "bytes", n, rc, PIE_ELIMIT, (unsigned long long)mem);
    /* the forward the inferlet holds: 896 tokens on 56 pages, 1 row */
    static int32_t tok[896], pos[896];
    uint32_t pages[56];
    int32_t row = 895;
    for (int32_t k = 0; k < 56; k++) pages[k] = (uint32_t)k + 1;
    pie_sampler g = { .kind = PIE_SAMPLER_GREEDY };
    pie_ctl_forward f = { .n_tokens = 896, .tokens = tok, .positions = pos,
                          .n_pages = 56, .pages = pages, .last_page_len = 16,
                          .n_outputs = 1, .output_idx = &row,
                          .samplers = &g };
    uint64_t fb = pie_ctl_forward_bytes(s.ctl, &f), per = pie_ctl_copy_bytes();
    /* exactly the budget's worth while the forward holds the copies back;
     * more where some ran already (on a loaded machine the forward may end
     * first: queued copies of one destination still run one a fire, far
     * slower than the loop queues them) */
    int want = (int)((mem - fb) / per);
    CHECK(n >= want && (pending == 0 || n == want), "%d copies queued beside "
          "a forward keeping %llu bytes (still pending: %d); expected %d "
          "(%llu bytes each, a budget of %llu)", n, (unsigned long long)fb,
          pending, want, (unsigned long long)per, (unsigned long long)mem);
    CHECK(again == 0, "a copy once the queued ones ran: %d, expected 0",
          again);
    printf("copies: %s; %llu bytes per queued copy: copies queued behind a "
           "forward are bounded, and their room comes back as they run\n",
           msg, (unsigned long long)per);
    server_end(&s, "copies");
}

static void test_import_loop(void)
{
    server s;
    server_start(&s);
    pie_ctl_client *c = NULL;
    uint32_t h;
    CHECK_OK(pie_ctl_client_open(s.ctl, NULL, &c));
    CHECK_OK(pie_ctl_page_alloc(c, 1, 0, &h));
    CHECK_OK(pie_ctl_export(c, "loop_x", 1, &h));
    char msg[256];
    int n, rc, again;
    run_counts(&s, "import_loop", msg, &n, &rc, &again);
    /* the default cap, less the instance's 4 allocated pages */
    int want = PIE_CTL_MAX_HANDLES - 4;
    CHECK(n == want && rc == PIE_ELIMIT && again == 1, "%d imports of one "
          "1-page export, then %d, then %d after freeing one handle; "
          "expected %d, PIE_ELIMIT (%d), 1", n, rc, again, want, PIE_ELIMIT);
    CHECK_OK(pie_ctl_unexport(c, "loop_x"));
    CHECK_OK(pie_ctl_page_free(c, 1, &h));
    pie_ctl_client_close(c);
    pie_ctl_stats cs;
    pie_ctl_get_stats(s.ctl, &cs);
    CHECK(cs.pages_used == 0 && cs.exports == 0, "after the instance ended: "
          "%d pages used, %d exports; expected 0 and 0", cs.pages_used,
          cs.exports);
    printf("import_loop: %s: repeated imports stop at the handle cap\n", msg);
    server_end(&s, "import_loop");
}

static void test_import_quota(void)
{
    server s;
    pie_engine_opts eo = { .client = { .max_pages = 4 } };
    server_start_with(&s, &eo, 0);
    pie_ctl_client *c = NULL;
    uint32_t h[4];
    CHECK_OK(pie_ctl_client_open(s.ctl, NULL, &c));
    CHECK_OK(pie_ctl_page_alloc(c, 4, 0, h));
    CHECK_OK(pie_ctl_export(c, "quota_x", 4, h));
    CHECK_OK(pie_ctl_page_free(c, 4, h));
    char msg[256];
    run_mode(&s, "import_quota", msg, sizeof msg);
    int r = 0;
    CHECK(sscanf(msg, "import %d", &r) == 1, "import_quota: sent '%s'", msg);
    CHECK(r == PIE_ELIMIT, "kv_import of 4 pages into an instance of "
          "max_pages 4 holding 4 returned %d, expected PIE_ELIMIT (%d)", r,
          PIE_ELIMIT);
    CHECK_OK(pie_ctl_unexport(c, "quota_x"));
    pie_ctl_client_close(c);
    server_end(&s, "import_quota");
    printf("import_quota: kv_import past max_pages answers PIE_ELIMIT and "
           "takes nothing\n");
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "all";
    bool all = strcmp(t, "all") == 0;
    if (all || strcmp(t, "codes") == 0) test_codes();
    if (all || strcmp(t, "mask_indptr") == 0) test_mask_indptr();
    if (all || strcmp(t, "cancel_running") == 0) test_cancel_running();
    if (all || strcmp(t, "trap_leaks") == 0) test_trap_leaks();
    if (all || strcmp(t, "outputs") == 0) test_outputs();
    if (all || strcmp(t, "outputs_opt") == 0) test_outputs_opt();
    if (all || strcmp(t, "import_quota") == 0) test_import_quota();
    if (all || strcmp(t, "inputs") == 0) test_inputs();
    if (all || strcmp(t, "copies") == 0) test_copies();
    if (all || strcmp(t, "import_loop") == 0) test_import_loop();
    TEST_DONE();
}
