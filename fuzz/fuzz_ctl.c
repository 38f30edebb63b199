/*
 * fuzz_ctl.c — libFuzzer harness for the control layer: the bytes are a
 * program of up to 96 calls (open and close clients, allocate and free
 * pages, submit forwards with any fields and chains, copy pages, export,
 * import and unexport, save exports to a file and load it back, changed
 * or cut, resume clients, cancel, poll, wait and release futures, make the
 * backend fail or lose the device) run against a fresh pie_ctl over the
 * fake backend (tests/control/fake_backend.c: 16 pages of 4 slots, vocab
 * 64), under the policy the first byte picks. Every call may fail, but
 * only with a documented code; then every future is waited for, every
 * client closed and every name unexported, and the pool must be whole
 * again: no page used, the queue empty, within 10 s (a hang traps too).
 * A violation traps, so the fuzzer reports it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/pie_err.h"
#include "control/control.h"
#include "tests/control/fake_backend.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define PS      4
#define NPAGES  16
#define VOCAB   64
#define NCLI    3
#define NH      24      /* handles remembered per client */
#define NFUT    16
#define NOPS    96

typedef struct rd {
    const uint8_t *p;
    size_t         n;
} rd;

static uint32_t r8(rd *r)
{
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}

/* One program's state: clients, the handles they were given (and some
 * they were not), futures. */
typedef struct prog {
    pie_ctl         *ctl;
    pie_backend     *b;
    pie_ctl_client  *cli[NCLI];
    uint32_t         h[NCLI][NH];
    int              nh[NCLI];
    pie_ctl_future  *fut[NFUT];
    int              fut_cli[NFUT];
} prog;

static const char *NAMES[] = { "a", "b", "c" };

static int tracing(void)
{
    static int t = -1;
    if (t < 0) t = getenv("FUZZ_CTL_TRACE") != NULL;
    return t;
}

static void ok_or(int rc)
{
    switch (rc) {
    case 0: case PIE_EINVAL: case PIE_ENOMEM: case PIE_ERANGE: case PIE_EBUSY:
    case PIE_ECANCELED: case PIE_ELIMIT: case PIE_EAGAIN: case PIE_EIO:
    case PIE_ENOTFOUND: case PIE_EPERM: case PIE_EDEVLOST: case PIE_EFORMAT:
        return;
    default:
        if (rc > 0) return;     /* counts (imports) */
        fprintf(stderr, "fuzz_ctl: undocumented code %d (%s)\n", rc,
                pie_err_msg());
        __builtin_trap();
    }
}

/* A handle of client c: one it holds, or (1 in 8) any value. */
static uint32_t pick_h(prog *p, int c, rd *r)
{
    uint32_t x = r8(r);
    if (p->nh[c] == 0 || (x & 7) == 7) return r8(r) | r8(r) << 8;
    return p->h[c][x % (uint32_t)p->nh[c]];
}

static void keep_h(prog *p, int c, const uint32_t *h, int n)
{
    for (int i = 0; i < n; i++) {
        if (p->nh[c] < NH) p->h[c][p->nh[c]++] = h[i];
        else p->h[c][i % NH] = h[i];
    }
}

static void op_alloc(prog *p, int c, rd *r)
{
    uint32_t h[8];
    int n = (int)(r8(r) % 6);
    int rc = pie_ctl_page_alloc(p->cli[c], n, 0, h);
    if (tracing()) {
        fprintf(stderr, "  alloc %d -> %d:", n, rc);
        for (int i = 0; rc == 0 && i < n; i++) fprintf(stderr, " %u", h[i]);
        fprintf(stderr, "\n");
    }
    ok_or(rc);
    if (rc == 0) keep_h(p, c, h, n);
}

static void op_free(prog *p, int c, rd *r)
{
    uint32_t h = pick_h(p, c, r);
    int rc = pie_ctl_page_free(p->cli[c], 1, &h);
    if (tracing()) fprintf(stderr, "  free %u -> %d\n", h, rc);
    ok_or(rc);
    for (int i = 0; rc == 0 && i < p->nh[c]; i++)
        if (p->h[c][i] == h) {
            p->h[c][i] = p->h[c][--p->nh[c]];
            break;
        }
}

/* A forward of 0..6 tokens over 0..3 of c's pages (positions consistent
 * with them where a flag says so), masks, outputs, a chain. */
static void op_forward(prog *p, int c, rd *r)
{
    int32_t tok[8], pos[8], oi[4], ids[2] = { 1, 70 };
    uint32_t pg[4], mi[9], mr[16], li[5], lr[8];
    pie_sampler s[4];
    int n = (int)(r8(r) % 7), np = (int)(r8(r) % 4), no = (int)(r8(r) % 4);
    for (int i = 0; i < np; i++) pg[i] = pick_h(p, c, r);
    int32_t last = (int32_t)(r8(r) % (PS + 2)), fill = 0;
    int consistent = (int)(r8(r) % 3), masked = r8(r) % 4 == 0,
        lm = r8(r) % 4 == 0;
    /* (mode 2: append to the last page's written slots, as a decode does) */
    if (consistent == 2 && np > 0 &&
        pie_ctl_page_fill(p->cli[c], pg[np - 1], &fill) == 0 &&
        fill + n <= PS)
        last = fill + n;
    int64_t kv = (int64_t)(np - 1) * PS + last;
    mi[0] = 0;
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)(r8(r) % (VOCAB + 4));
        pos[i] = consistent ? (int32_t)(kv - n + i) : (int32_t)(r8(r) % 20) - 1;
        mr[2 * i] = r8(r) % 3;
        mr[2 * i + 1] = r8(r) % 20;
        mi[i + 1] = 2 * (uint32_t)(i + 1);
    }
    li[0] = 0;
    for (int o = 0; o < no; o++) {
        oi[o] = (int32_t)(r8(r) % (uint32_t)(n + 1));
        s[o] = (pie_sampler){ .kind = (int32_t)(r8(r) % 7),
                              .temperature = (float)(r8(r) % 3) * 0.5f,
                              .top_k = (int32_t)(r8(r) % 70) - 1,
                              .top_p = 1.0f, .ids = ids,
                              .n_ids = (int32_t)(r8(r) % 3) };
        lr[2 * o] = r8(r) % 40;
        lr[2 * o + 1] = r8(r) % 40;
        li[o + 1] = 2 * (uint32_t)(o + 1);
    }
    pie_ctl_chain ch = { (int32_t)(r8(r) % (uint32_t)(n + 1)),
                         p->fut[r8(r) % NFUT], (int32_t)(r8(r) % 3) };
    int chained = ch.from && (r8(r) & 1);
    pie_ctl_forward f = {
        .n_tokens = n, .tokens = tok, .positions = pos, .n_pages = np,
        .pages = pg, .last_page_len = last,
        .mask_indptr = masked ? mi : NULL, .mask_runs = masked ? mr : NULL,
        .n_outputs = no, .output_idx = oi, .samplers = s,
        .logit_mask_indptr = lm ? li : NULL, .logit_mask_runs = lm ? lr : NULL,
        .n_chains = chained, .chains = &ch };
    pie_ctl_future *fu = NULL;
    int rc = pie_ctl_forward_submit(p->cli[c], &f, NULL, NULL, &fu);
    if (tracing()) {
        fprintf(stderr, "  forward n %d pages", n);
        for (int i = 0; i < np; i++) fprintf(stderr, " %u", pg[i]);
        fprintf(stderr, " last %d pos0 %d outs %d chained %d mask %d -> %d "
                "(%s)\n", last, n ? pos[0] : -1, no, chained, masked, rc,
                rc ? pie_err_msg() : "");
    }
    ok_or(rc);
    if (rc == 0) {
        int k = (int)(r8(r) % NFUT);
        if (p->fut[k]) pie_ctl_future_release(p->fut[k]);
        p->fut[k] = fu;
        p->fut_cli[k] = c;
    }
}

static void op_copy(prog *p, int c, rd *r)
{
    uint32_t a = pick_h(p, c, r), b = pick_h(p, c, r);
    int so = (int)(r8(r) % 6) - 1, d = (int)(r8(r) % 6) - 1;
    int k = (int)(r8(r) % 6) - 1, rc = pie_ctl_page_copy(p->cli[c], a, so, b, d, k);
    if (tracing())
        fprintf(stderr, "  copy %u@%d -> %u@%d n %d -> %d\n", a, so, b, d, k, rc);
    ok_or(rc);
}

static void op_export(prog *p, int c, rd *r)
{
    uint32_t h[3];
    int n = (int)(r8(r) % 4);
    for (int i = 0; i < n; i++) h[i] = pick_h(p, c, r);
    const char *nm = NAMES[r8(r) % 3];
    int rc = pie_ctl_export(p->cli[c], nm, n, h);
    if (tracing()) fprintf(stderr, "  export %s n %d -> %d\n", nm, n, rc);
    ok_or(rc);
}

static void op_import(prog *p, int c, rd *r)
{
    uint32_t h[NPAGES];
    int32_t n = 0;
    const char *nm = NAMES[r8(r) % 3];
    int rc = pie_ctl_import(p->cli[c], nm, (int32_t)(r8(r) % 8), h, &n);
    if (tracing()) fprintf(stderr, "  import %s -> %d (%d)\n", nm, rc, n);
    ok_or(rc);
    if (rc >= 0 && n > 0 && n <= NPAGES) keep_h(p, c, h, n);
}

static void op_future(prog *p, rd *r)
{
    int k = (int)(r8(r) % NFUT), what = (int)(r8(r) % 5);
    pie_ctl_future *f = p->fut[k];
    if (!f) return;
    if (tracing()) fprintf(stderr, "  future %d: %d\n", k, what);
    if (what == 0) pie_ctl_future_cancel(f);
    else if (what == 1) ok_or(pie_ctl_future_poll(f));
    else if (what == 2) ok_or(pie_ctl_future_wait(f, 1000));
    else if (what == 3) {
        const pie_forward_out *o;
        int32_t no;
        ok_or(pie_ctl_future_result(f, &o, &no));
    } else {
        pie_ctl_future_release(f);
        p->fut[k] = NULL;
    }
}

static void op_client(prog *p, int c, rd *r)
{
    if (!p->cli[c]) {
        pie_ctl_client_opts o = { .max_pages = (int32_t)(r8(r) % 12),
                                  .priority = (int32_t)(r8(r) % 2) };
        ok_or(pie_ctl_client_open(p->ctl, &o, &p->cli[c]));
        p->nh[c] = 0;
        return;
    }
    for (int k = 0; k < NFUT; k++)          /* its futures go first */
        if (p->fut[k] && p->fut_cli[k] == c) {
            pie_ctl_future_release(p->fut[k]);
            p->fut[k] = NULL;
        }
    pie_ctl_client_close(p->cli[c]);
    p->cli[c] = NULL;
    p->nh[c] = 0;
}

/* The byte at offset x of path xor y (y != 0), or (z) the file cut there. */
static void corrupt(const char *path, uint32_t x, uint32_t y, int z)
{
    FILE *f = fopen(path, "r+b");
    if (!f) return;
    long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : 0;
    if (n > 0) {
        long at = (long)(x % (uint32_t)n);
        if (z) {
            fclose(f);
            if (truncate(path, at)) { /* (nothing to corrupt then) */ }
            return;
        }
        int ch;
        if (fseek(f, at, SEEK_SET) == 0 && (ch = fgetc(f)) != EOF &&
            fseek(f, at, SEEK_SET) == 0)
            fputc(ch ^ (int)(y | 1), f);
    }
    fclose(f);
}

static char kv_path[64];     /* this process's export file */

static void kv_remove(void)
{
    unlink(kv_path);
}

/* Saves an export to this process's file, or loads the file under a
 * name, its bytes changed or cut first where r says so: a corrupt file
 * must be refused (PIE_EFORMAT), loading nothing. */
static void op_persist(prog *p, rd *r)
{
    const char *path = kv_path;
    if (!kv_path[0]) {
        snprintf(kv_path, sizeof kv_path, "/tmp/fuzz_ctl_%d.kv", (int)getpid());
        atexit(kv_remove);
    }
    const char *nm = NAMES[r8(r) % 3];
    int what = (int)(r8(r) % 4), rc;
    if (what == 0) {
        rc = pie_ctl_export_save(p->ctl, nm, path);
    } else {
        if (what >= 2) corrupt(path, r8(r) | r8(r) << 8, r8(r), what == 3);
        rc = pie_ctl_export_load(p->ctl, path, nm);
    }
    if (tracing()) fprintf(stderr, "  persist %d %s -> %d\n", what, nm, rc);
    ok_or(rc);
}

static void run_op(prog *p, rd *r)
{
    int op = (int)(r8(r) % 14), c = (int)(r8(r) % NCLI);
    if (tracing()) {
        pie_ctl_stats st;
        pie_ctl_get_stats(p->ctl, &st);
        fprintf(stderr, "op %d client %d (open %d): used %d free %d cached %d\n",
                op, c, p->cli[c] != NULL, st.pages_used, st.pages_free,
                st.pages_cached);
    }
    if (op == 0 || !p->cli[c]) { op_client(p, c, r); return; }
    switch (op) {
    case 1: case 2: op_alloc(p, c, r); break;
    case 3: op_free(p, c, r); break;
    case 4: case 5: case 6: op_forward(p, c, r); break;
    case 7: op_copy(p, c, r); break;
    case 8: op_export(p, c, r); break;
    case 9: op_import(p, c, r); break;
    case 10: op_future(p, r); break;
    case 12: op_persist(p, r); break;
    case 13: ok_or(pie_ctl_client_resume(p->cli[c], (int32_t)(r8(r) % 2)));
             break;
    default:
        if (r8(r) % 8 == 0) {
            ok_or(pie_ctl_unexport(p->cli[c], NAMES[r8(r) % 3]));
        } else if (r8(r) % 16 == 0) {
            if (tracing()) fprintf(stderr, "  next forward fails\n");
            fake_backend_fail_forwards(p->b, 1);
        } else if (r8(r) % 64 == 0) {
            if (tracing()) fprintf(stderr, "  device lost\n");
            fake_backend_lose(p->b);
        }
        break;
    }
}

/* FUZZ_CTL_STATS=1: programs run and the fires and forwards they made, at
 * exit (a corpus whose forwards never run tells little). */
static long n_prog, n_fires, n_fwd_ok;

static void print_stats(void)
{
    fprintf(stderr, "fuzz_ctl: %ld programs, %ld fires, %ld forwards "
            "completed\n", n_prog, n_fires, n_fwd_ok);
}

static void trace(prog *p, const char *what)
{
    if (!tracing()) return;
    pie_ctl_stats st;
    pie_ctl_get_stats(p->ctl, &st);
    fprintf(stderr, "%s: used %d free %d cached %d queue %d\n", what,
            st.pages_used, st.pages_free, st.pages_cached, st.queue_depth);
}

/* Everything released: the pool whole and the queue empty (10 s). */
static void wind_down(prog *p)
{
    for (int k = 0; k < NFUT; k++)
        if (p->fut[k]) {
            n_fwd_ok += pie_ctl_future_wait(p->fut[k], 10000) == 0;
            pie_ctl_future_release(p->fut[k]);
            trace(p, "future released");
        }
    for (int c = 0; c < NCLI; c++)
        if (p->cli[c]) {
            for (int i = 0; i < 3; i++) pie_ctl_unexport(p->cli[c], NAMES[i]);
            trace(p, "unexported");
            pie_ctl_client_close(p->cli[c]);
            trace(p, "client closed");
        }
    pie_ctl_client *z;
    if (pie_ctl_client_open(p->ctl, NULL, &z) == 0) {   /* any names left */
        for (int i = 0; i < 3; i++) pie_ctl_unexport(z, NAMES[i]);
        pie_ctl_client_close(z);
    }
    pie_ctl_stats st;
    for (int i = 0; i < 10000; i++) {
        pie_ctl_get_stats(p->ctl, &st);
        if (st.queue_depth == 0 && st.pages_used == 0) {
            n_fires += (long)st.fires;
            return;
        }
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "fuzz_ctl: after wind-down queue %d, pages used %d of "
            "%d\n", st.queue_depth, st.pages_used, st.pages_total);
    __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int stats;
    if (!stats++ && getenv("FUZZ_CTL_STATS")) atexit(print_stats);
    n_prog++;
    rd r = { data, size };
    prog p;
    memset(&p, 0, sizeof p);
    pie_ctl_opts o = { .policy = (int32_t)(r8(&r) % 3),
                       .max_batch_tokens = 4 + (int32_t)(r8(&r) % 16) };
    if (fake_backend_create(VOCAB, PS, NPAGES, 0, &p.b)) return 0;
    if (pie_ctl_create(p.b, &o, &p.ctl)) __builtin_trap();
    for (int i = 0; i < NOPS && r.n; i++) run_op(&p, &r);
    wind_down(&p);
    pie_ctl_free(p.ctl);
    pie_backend_free(p.b);
    return 0;
}
