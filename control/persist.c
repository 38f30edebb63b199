/*
 * persist.c — named exports saved to disk and loaded back (after a restart
 * of pie, for example a system prompt's KV cache).
 *
 * File layout, little-endian, fixed-size fields:
 *
 *   header   magic "PIEKVEXP" (8 bytes), version u32 (1),
 *            model_id u64, page_size i32, n_pages i32, page_bytes u64,
 *            name_len u32, name (name_len bytes, no NUL)
 *   n_pages page records:
 *            fill i32, hashed u8, hash u64, prefix u64,
 *            page_size tokens i32, page_size positions i32,
 *            page_size mask hashes u64, page_size known u8
 *   KV       n_pages * page_bytes bytes (the backend's page format)
 *   trailer  XXH64 of every byte before it (u64, seed 0)
 *
 * Loading trusts nothing in the file. It opens without blocking (a FIFO
 * must not wait for a writer) and reads only a regular file no larger than
 * the biggest export this engine could hold; then checks the magic and
 * version, the checksum, that model id and page geometry match this engine,
 * that the size is exactly what the header implies, and every page record:
 * fill, tokens inside the vocabulary, and that a page hash describes the
 * record's tokens, positions and masks (a forged hash would otherwise
 * serve this KV to another prompt through prefix caching). Failures are
 * PIE_EFORMAT (PIE_EIO for what is not a readable file) with a message
 * naming the file; nothing is allocated from a size the file states before
 * it has been bounded. All of this, every record included, is checked
 * before a page is taken, so a load that fails for its file, its name,
 * the export cap or want of room changes nothing in the engine. (One the
 * device fails, its upload, gives its pages back, but the cached pages
 * that taking them evicted stay evicted: their KV was written over.)
 *
 * Saving writes a fresh temporary beside the target (created exclusively,
 * so a planted symlink is never written through), fsyncs it, renames it
 * over the target and fsyncs the folder: a crash leaves the old file or the
 * new one, never a mix; a torn temporary fails its checksum anyway.
 *
 * Aliases: one page may be listed by several exports (a name for pages
 * imported from another export) or twice by one, and the export cap counts
 * it once. Each file holds its own copy, so a load shares pages instead
 * of copying them where the copy would be exact: a record that repeats an
 * earlier one of the file, record and KV bytes alike, takes that record's
 * page (plan_repeats); one whose record and KV bytes equal those of a page
 * a live export lists (no write pending) takes that page (plan_aliases).
 * So names that shared pages when saved share them again, whichever loads
 * first, and the cap and the pool count them as before the restart.
 * Comparing the bytes themselves, not only the records, is what makes it
 * exact: a partial page's KV depends on pages before it that its record
 * does not describe. Records are grouped by a hash of record and KV bytes
 * together, each exported page is downloaded at most once, and a record
 * is compared byte by byte with a bounded number of others (SHARE_TRIES),
 * so the plan stays O(n log n) whatever a file holds: grouping by the
 * record alone made a file of alike records with distinct KV cost n^2/2
 * comparisons, and as many page downloads when loaded a second time.
 *
 * Pages are read and written while the device is idle and ctl->mu is held,
 * so no batch runs against them meanwhile.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/pie_err.h"
#include "common/pie_file.h"
#include "control/ctl_int.h"

static const char MAGIC[8] = { 'P', 'I', 'E', 'K', 'V', 'E', 'X', 'P' };
#define VERSION 1u
#define HEADER_FIXED (8 + 4 + 8 + 4 + 4 + 8 + 4)

typedef struct wbuf {
    unsigned char *p;
    size_t         n, cap;
    bool           oom;
} wbuf;

static void put(wbuf *w, const void *src, size_t n)
{
    if (w->oom) return;
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 4096;
        while (cap < w->n + n) cap *= 2;
        unsigned char *np = realloc(w->p, cap);
        if (!np) { w->oom = true; return; }
        w->p = np;
        w->cap = cap;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

static size_t rec_bytes(int32_t ps)
{
    return 4 + 1 + 8 + 8 + (size_t)ps * (4 + 4 + 8 + 1);
}

/* Waits (mu held) until no batch is on the device. */
void pie__wait_idle(pie_ctl *ctl)
{
    ctl->idle_waiters++;         /* no launch meanwhile (sched.c turn_over) */
    while (ctl->running) pthread_cond_wait(&ctl->idle_cv, &ctl->mu);
    ctl->idle_waiters--;
    pthread_cond_signal(&ctl->sched_cv);   /* launches once mu goes */
}

/* Writes page's record (fill, hashed, hash, prefix, then its slots'
 * tokens, positions, mask hashes and known flags) to out, rec_bytes(ps)
 * bytes, as the file holds it. */
static void record_write(const pie_ctl *ctl, int32_t page, unsigned char *out)
{
    int32_t ps = ctl->ps;
    const ctl_page *p = &ctl->pages[page];
    size_t base = (size_t)page * ps;
    uint8_t hashed = p->hashed;
    memcpy(out, &p->fill, 4), out += 4;
    memcpy(out, &hashed, 1), out += 1;
    memcpy(out, &p->hash, 8), out += 8;
    memcpy(out, &p->prefix, 8), out += 8;
    memcpy(out, ctl->slot_tok + base, ps * 4), out += ps * 4;
    memcpy(out, ctl->slot_pos + base, ps * 4), out += ps * 4;
    memcpy(out, ctl->slot_mask + base, ps * 8), out += ps * 8;
    memcpy(out, ctl->slot_known + base, ps);
}

/* Serializes export e into w (mu held, device idle). */
static int serialize(pie_ctl *ctl, const ctl_export *e, wbuf *w)
{
    int32_t ps = ctl->ps;
    uint64_t pb = ctl->b->page_bytes;
    unsigned char *rec = malloc(rec_bytes(ps));
    if (!rec) return pie_err_set(PIE_ENOMEM, "control: out of memory");
    uint32_t ver = VERSION, nl = (uint32_t)strlen(e->name);
    put(w, MAGIC, 8);
    put(w, &ver, 4);
    put(w, &ctl->o.model_id, 8);
    put(w, &ps, 4);
    put(w, &e->n, 4);
    put(w, &pb, 8);
    put(w, &nl, 4);
    put(w, e->name, nl);
    for (int32_t k = 0; k < e->n; k++) {
        record_write(ctl, e->pages[k], rec);
        put(w, rec, rec_bytes(ps));
    }
    free(rec);
    size_t at = w->n;
    if (!w->oom) {
        size_t need = at + (size_t)e->n * pb;
        if (need > w->cap) {
            unsigned char *np = realloc(w->p, need);
            if (!np) w->oom = true;
            else w->p = np, w->cap = need;
        }
    }
    if (w->oom) return pie_err_set(PIE_ENOMEM, "control: out of memory");
    int rc = pie__backend_rc(ctl, ctl->b->ops->download(ctl->b, e->pages,
                                                        e->n, w->p + at));
    if (rc < 0) return pie_err_wrap(rc, "control: reading KV pages");
    w->n = at + (size_t)e->n * pb;
    return 0;
}

/* Writes all n bytes of p to fd, retrying short writes; 0 or -1 (errno). */
static int write_full(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Flushes the folder holding path so that a rename into it is durable.
 * Best effort: some filesystems refuse fsync on a directory. */
static void sync_dir(const char *path)
{
    char *d = strdup(path);
    if (!d) return;
    int fd = open(dirname(d), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(d);
}

/* Replaces path with the n bytes at p atomically: a fresh temporary
 * PATH.tmpXXXXXX (O_EXCL: never an existing file or a symlink) is written,
 * fsynced and renamed over path. On failure path is untouched and the
 * temporary removed; PIE_EIO with the reason. */
static int write_atomic(const char *path, const unsigned char *p, size_t n)
{
    size_t pl = strlen(path);
    char *tmp = malloc(pl + sizeof ".tmpXXXXXX");
    if (!tmp) return pie_err_set(PIE_ENOMEM, "control: out of memory");
    memcpy(tmp, path, pl);
    memcpy(tmp + pl, ".tmpXXXXXX", sizeof ".tmpXXXXXX");
    int fd = mkstemp(tmp), rc = 0;   /* mode 0600: KV reveals the prompt */
    if (fd >= 0) (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (fd < 0 || write_full(fd, p, n) != 0 || fsync(fd) != 0)
        rc = pie_err_set(PIE_EIO, "control: cannot write %s: %s", path,
                         strerror(errno));
    if (fd >= 0 && close(fd) != 0 && rc == 0)
        rc = pie_err_set(PIE_EIO, "control: cannot write %s: %s", path,
                         strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = pie_err_set(PIE_EIO, "control: cannot write %s: %s", path,
                         strerror(errno));
    if (rc < 0 && fd >= 0) unlink(tmp);
    if (rc == 0) sync_dir(path);
    free(tmp);
    return rc;
}

int pie_ctl_export_save(pie_ctl *ctl, const char *name, const char *path)
{
    if (!name || !path) return pie_err_set(PIE_EINVAL, "control: NULL name");
    wbuf w = { 0 };
    pthread_mutex_lock(&ctl->mu);
    pie__wait_idle(ctl);   /* drops mu: before the lookup, not after */
    ctl_export *e = ctl->exports;
    while (e && strcmp(e->name, name) != 0) e = e->next;
    int rc = 0;
    if (ctl->lost) {            /* its KV is gone with the device */
        rc = pie__lost_err(ctl);
    } else if (!e) {
        rc = pie_err_set(PIE_ENOTFOUND, "control: no export named '%s'", name);
    } else {
        for (int32_t k = 0; k < e->n && rc == 0; k++)
            if (ctl->pages[e->pages[k]].last_writer)
                rc = pie_err_set(PIE_EBUSY, "control: export '%s' has a "
                                 "pending write; wait for it", name);
        if (rc == 0) rc = serialize(ctl, e, &w);
    }
    pthread_mutex_unlock(&ctl->mu);
    uint64_t sum = XXH64(w.p, w.n, 0);
    if (rc == 0) put(&w, &sum, 8);
    if (rc == 0 && w.oom) rc = pie_err_set(PIE_ENOMEM, "control: out of memory");
    if (rc == 0) rc = write_atomic(path, w.p, w.n);
    free(w.p);
    return rc;
}

/* ---- load ----------------------------------------------------------------- */

typedef struct rbuf {
    const unsigned char *p;
    size_t               n, at;
} rbuf;

static bool get(rbuf *r, void *dst, size_t n)
{
    if (r->n - r->at < n) return false;
    memcpy(dst, r->p + r->at, n);
    r->at += n;
    return true;
}

/* Largest file an export for this engine can be: every page of the pool. */
static uint64_t max_file_bytes(const pie_ctl *ctl)
{
    return HEADER_FIXED + 255 + (uint64_t)ctl->n_pages *
           (rec_bytes(ctl->ps) + ctl->b->page_bytes) + 8;
}

/* Reads the regular file at path into *data (malloc'd, caller frees) and
 * *len. Never blocks on a FIFO or device; refuses a file larger than any
 * export this engine could hold before allocating. 0, or PIE_EIO /
 * PIE_EFORMAT with a message. */
static int read_file(const pie_ctl *ctl, const char *path,
                     unsigned char **data, size_t *len)
{
    char *b = NULL;
    *data = NULL;
    int rc = pie__file_read(path, max_file_bytes(ctl), &b, len);
    if (rc == PIE_ERANGE)       /* (the size check is what refused it) */
        return pie_err_set(PIE_EFORMAT, "%s: larger than any export this "
                           "engine can hold (%llu bytes); not a KV export "
                           "for this model", path,
                           (unsigned long long)max_file_bytes(ctl));
    if (rc == PIE_ENOTFOUND)    /* (callers see every open failure as EIO) */
        return pie_err_wrap(PIE_EIO, "control");
    *data = (unsigned char *)b;
    return rc;
}

typedef struct file_hdr {
    uint64_t model_id, page_bytes;
    int32_t  ps, n;
    char     name[256];
} file_hdr;

/* Checks everything about the file that needs no lock. */
static int check_file(pie_ctl *ctl, const char *path, rbuf *r, file_hdr *h)
{
    char magic[8];
    uint32_t ver, nl;
    uint64_t sum = 0;
    if (!get(r, magic, 8) || memcmp(magic, MAGIC, 8) != 0)
        return pie_err_set(PIE_EFORMAT, "%s: not a pie KV export (%zu bytes, "
                           "no PIEKVEXP magic)", path, r->n);
    if (!get(r, &ver, 4))
        return pie_err_set(PIE_EFORMAT, "%s: truncated header", path);
    if (ver != VERSION)
        return pie_err_set(PIE_EFORMAT, "%s: version %u, this pie reads %u",
                           path, ver, VERSION);
    if (r->n >= 8) memcpy(&sum, r->p + r->n - 8, 8);
    if (r->n < HEADER_FIXED + 8 || XXH64(r->p, r->n - 8, 0) != sum)
        return pie_err_set(PIE_EFORMAT, "%s: truncated or corrupt (checksum "
                           "mismatch)", path);
    get(r, &h->model_id, 8);
    get(r, &h->ps, 4);
    get(r, &h->n, 4);
    get(r, &h->page_bytes, 8);
    get(r, &nl, 4);
    if (h->model_id != ctl->o.model_id || h->ps != ctl->ps ||
        h->page_bytes != ctl->b->page_bytes)
        return pie_err_set(PIE_EFORMAT, "%s: saved for another model or page "
                           "layout (page size %d, %llu bytes per page)", path,
                           h->ps, (unsigned long long)h->page_bytes);
    if (nl == 0 || nl > 255 || !get(r, h->name, nl))
        return pie_err_set(PIE_EFORMAT, "%s: bad export name", path);
    h->name[nl] = 0;
    if (memchr(h->name, 0, nl))
        return pie_err_set(PIE_EFORMAT, "%s: bad export name", path);
    uint64_t need = (uint64_t)r->at + (uint64_t)h->n *
                    (rec_bytes(h->ps) + h->page_bytes) + 8;
    if (h->n < 1 || h->n > ctl->n_pages || need != r->n)
        return pie_err_set(PIE_EFORMAT, "%s: %d pages do not match the file "
                           "size", path, h->n);
    return 0;
}

/* What is wrong with the page record at rec (rec_bytes(ps) bytes, laid
 * out as in the file), or NULL: fill, flags, tokens inside the
 * vocabulary, and that a hash describes the record's tokens, positions
 * and masks. Reads only the record (no lock). */
static const char *record_check(const pie_ctl *ctl, const unsigned char *rec)
{
    int32_t ps = ctl->ps, fill, tok;
    uint8_t hashed = rec[4];
    uint64_t hash, prefix, h;
    const unsigned char *toks = rec + 21, *known = toks + (size_t)ps * 16;
    memcpy(&fill, rec, 4);
    memcpy(&hash, rec + 5, 8);
    memcpy(&prefix, rec + 13, 8);
    if (fill < 0 || fill > ps) return "fill out of range";
    if (hashed > 1) return "bad hashed flag";
    for (int32_t i = 0; i < ps; i++) {
        memcpy(&tok, toks + (size_t)i * 4, 4);
        if (known[i] > 1) return "bad slot flag";
        if (known[i] && (tok < 0 || tok >= ctl->vocab))
            return "token outside the vocabulary";
        if (hashed && !known[i]) return "hashed page with an unwritten slot";
    }
    if (hashed) {
        if (fill != ps) return "hashed page not full";
        if (pie__pool_hash_bytes(ctl, prefix, toks, toks + (size_t)ps * 4,
                                 toks + (size_t)ps * 8, &h) < 0)
            return "out of memory";
        if (h != hash) return "page hash does not match its tokens";
    }
    return NULL;
}

/* Restores page metadata from the next record (record_check passed it)
 * into page (mu held). */
static void read_record(pie_ctl *ctl, rbuf *r, int32_t page)
{
    int32_t ps = ctl->ps;
    ctl_page *p = &ctl->pages[page];
    size_t base = (size_t)page * ps;
    uint8_t hashed = 0;
    get(r, &p->fill, 4);
    get(r, &hashed, 1);
    get(r, &p->hash, 8);
    get(r, &p->prefix, 8);
    get(r, ctl->slot_tok + base, ps * 4);
    get(r, ctl->slot_pos + base, ps * 4);
    get(r, ctl->slot_mask + base, ps * 8);
    get(r, ctl->slot_known + base, ps);
    p->version++;
    p->hashed = hashed == 1;
}

typedef struct keyed {          /* a hash, and whose it is                */
    uint64_t key;
    int32_t  i;                 /* record index, or physical page         */
} keyed;

static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* First of the n entries of sorted ks whose key is at least key. */
static size_t keyed_lower(const keyed *ks, size_t n, uint64_t key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ks[mid].key < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Byte-by-byte comparisons that one run of equal keys may cost a record
 * (or a live page): equal keys of different bytes are hash collisions,
 * so past this many, a record takes a page of its own instead of
 * looking further (a crafted file cannot make the plan quadratic). */
#define SHARE_TRIES 4

/* How a load shares pages instead of copying them (see the header:
 * Aliases). A record's key hashes its record bytes and then its KV bytes
 * (seed: the record's hash), so records are grouped by both; equal keys
 * are then confirmed byte by byte. */
typedef struct share_plan {
    keyed    *reps;             /* (n_reps) key, record: records that
                                   repeat no earlier one, by key          */
    uint64_t *rhash;            /* (n_reps) their record hashes, sorted   */
    int32_t   n_reps;
    uint64_t  compares;         /* byte-by-byte comparisons made          */
} share_plan;

static void share_plan_free(share_plan *sp)
{
    free(sp->reps);
    free(sp->rhash);
    *sp = (share_plan){ 0 };
}

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Fills dup[k] for the n records at rec (their KV at kv): the first
 * earlier record of the file with the same record and KV bytes (a page
 * the export listed twice), else -1; and sp with the others, for
 * plan_aliases. Reads only the file (no lock). 0 or PIE_ENOMEM. Costs a
 * hash of every byte, a sort, and at most SHARE_TRIES comparisons of a
 * record with others (one where no hashes collide). */
static int plan_repeats(const pie_ctl *ctl, const unsigned char *rec,
                        const unsigned char *kv, int32_t n, int32_t *dup,
                        share_plan *sp)
{
    size_t rb = rec_bytes(ctl->ps), pb = ctl->b->page_bytes;
    *sp = (share_plan){ 0 };
    keyed *fk = malloc((size_t)n * sizeof *fk);
    uint64_t *rh = malloc((size_t)n * sizeof *rh);
    sp->reps = malloc((size_t)n * sizeof *sp->reps);
    sp->rhash = malloc((size_t)n * sizeof *sp->rhash);
    if (!fk || !rh || !sp->reps || !sp->rhash) {
        free(fk), free(rh), share_plan_free(sp);
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    }
    for (int32_t k = 0; k < n; k++) {
        rh[k] = XXH64(rec + k * rb, rb, 0);
        fk[k] = (keyed){ XXH64(kv + k * pb, pb, rh[k]), k };
        dup[k] = -1;
    }
    qsort(fk, n, sizeof *fk, keyed_cmp);
    /* within a run of one key, in record order: each record is compared
     * with the run's first distinct records (one, unless keys collide) */
    for (int32_t a = 0, b; a < n; a = b) {
        int32_t first[SHARE_TRIES], nf = 0;
        for (b = a; b < n && fk[b].key == fk[a].key; b++) {
            int32_t k = fk[b].i;
            for (int32_t y = 0; y < nf && dup[k] < 0; y++) {
                int32_t j = first[y];
                sp->compares++;
                if (memcmp(rec + j * rb, rec + k * rb, rb) == 0 &&
                    memcmp(kv + j * pb, kv + k * pb, pb) == 0)
                    dup[k] = j;
            }
            if (dup[k] >= 0) continue;
            if (nf < SHARE_TRIES) first[nf++] = k;
            sp->rhash[sp->n_reps] = rh[k];
            sp->reps[sp->n_reps++] = fk[b];     /* (still sorted) */
        }
    }
    qsort(sp->rhash, sp->n_reps, sizeof *sp->rhash, u64_cmp);
    free(fk), free(rh);
    return 0;
}

/* Fills share[k] for the records plan_repeats left (sp): a page a live
 * export lists whose record and KV bytes are record k's, else -1 (an
 * alias saved under another name and loaded already; never a page with a
 * write pending). Returns how many records need a page of their own, or
 * PIE_ENOMEM. mu held, device idle: it downloads each exported page
 * whose record hash is that of a record of the file, once (its key then
 * finds the records it may equal). Costs a hash of each exported page's
 * record, a sort, those downloads, and at most SHARE_TRIES comparisons
 * per page downloaded (one where no hashes collide). */
static int32_t plan_aliases(pie_ctl *ctl, const unsigned char *rec,
                            const unsigned char *kv, int32_t n,
                            const int32_t *dup, share_plan *sp,
                            int32_t *share)
{
    size_t rb = rec_bytes(ctl->ps), pb = ctl->b->page_bytes, m = 0;
    for (int32_t k = 0; k < n; k++) share[k] = -1;
    for (const ctl_export *e = ctl->exports; e; e = e->next) m += e->n;
    keyed *ck = m < SIZE_MAX / sizeof *ck ? malloc((m + 1) * sizeof *ck)
                                          : NULL;
    unsigned char *buf = malloc(rb + pb);
    if (!ck || !buf) {
        free(ck), free(buf);
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    }
    m = 0;
    for (const ctl_export *e = ctl->exports; e; e = e->next)
        for (int32_t k = 0; k < e->n; k++) {
            if (ctl->pages[e->pages[k]].last_writer) continue;
            record_write(ctl, e->pages[k], buf);
            ck[m++] = (keyed){ XXH64(buf, rb, 0), e->pages[k] };
        }
    qsort(ck, m, sizeof *ck, keyed_cmp);
    for (size_t y = 0; y < m; y++) {
        int32_t page = ck[y].i;
        if (y > 0 && ck[y - 1].i == page) continue;   /* listed again */
        if (!bsearch(&ck[y].key, sp->rhash, sp->n_reps, sizeof *sp->rhash,
                     u64_cmp))
            continue;
        record_write(ctl, page, buf);
        if (pie__backend_rc(ctl, ctl->b->ops->download(ctl->b, &page, 1,
                                                       buf + rb)) < 0)
            continue;
        uint64_t key = XXH64(buf + rb, pb, ck[y].key);
        size_t x = keyed_lower(sp->reps, sp->n_reps, key);
        for (int32_t t = 0; t < SHARE_TRIES && x < (size_t)sp->n_reps &&
                            sp->reps[x].key == key; t++, x++) {
            int32_t k = sp->reps[x].i;
            if (share[k] >= 0) continue;
            sp->compares++;
            if (memcmp(buf, rec + k * rb, rb) == 0 &&
                memcmp(buf + rb, kv + k * pb, pb) == 0)
                share[k] = page;
        }
    }
    int32_t fresh = 0;
    for (int32_t k = 0; k < n; k++)
        if (dup[k] < 0 && share[k] < 0) fresh++;
    ctl->load_compares += sp->compares;
    free(ck), free(buf);
    return fresh;
}

/* Checks the file, the name given and every page record; 0 or a PIE_E error. */
static int load_check(pie_ctl *ctl, const char *path, const char *name,
                      rbuf *r, file_hdr *h)
{
    int rc = check_file(ctl, path, r, h);
    if (rc == 0 && name && (!*name || strlen(name) > 255))
        rc = pie_err_set(PIE_EINVAL, "control: export name must be 1..255 "
                         "bytes");
    size_t rb = rec_bytes(ctl->ps);
    /* every record before any page is taken: taking one may evict a
     * cached page, and a failed load changes nothing */
    for (int32_t k = 0; k < h->n && rc == 0; k++) {
        const char *why = record_check(ctl, r->p + r->at + k * rb);
        if (why)
            rc = pie_err_set(PIE_EFORMAT, "%s: page record %d is invalid: "
                             "%s", path, k, why);
    }
    return rc;
}

/* Allocates a load's export, pages, plan and name; 0 or PIE_ENOMEM. */
static int load_alloc(int32_t n, const char *nm, ctl_export **e,
                      int32_t **pages, int32_t **plan, char **nmc)
{
    *e = calloc(1, sizeof **e);
    *pages = calloc(n, sizeof **pages);
    *plan = calloc(3 * (size_t)n, sizeof **plan);
    *nmc = strdup(nm);
    if (!*e || !*pages || !*plan || !*nmc)
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    return 0;
}

/* mu held, device idle: checks the name is free and the cap and pool have
 * room, filling share (plan_aliases); fresh pages needed, or a PIE_E error. */
static int32_t load_admit(pie_ctl *ctl, const char *path, const char *nm,
                          const unsigned char *rec, const unsigned char *kv,
                          int32_t n, const int32_t *dup, share_plan *sp,
                          int32_t *share)
{
    if (ctl->lost) return pie__lost_err(ctl);
    for (ctl_export *x = ctl->exports; x; x = x->next)
        if (strcmp(x->name, nm) == 0)
            return pie_err_set(PIE_EBUSY, "control: export name '%s' already "
                               "in use", nm);
    int32_t fresh = plan_aliases(ctl, rec, kv, n, dup, sp, share);
    if (fresh < 0) return fresh;
    int rc = pie__export_cap_check(ctl, nm, NULL, fresh);
    if (rc != 0) return rc;
    if (ctl->n_free + ctl->n_cached < fresh)
        return pie_err_set(PIE_EBUSY, "control: %d free pages needed to load "
                           "%s", fresh, path);
    return fresh;
}

/* mu held: takes a page per fresh record, packing their KV; how many (own). */
static int32_t load_take(pie_ctl *ctl, rbuf *r, size_t rec0, unsigned char *kv,
                         int32_t n, const int32_t *dup, const int32_t *share,
                         int32_t *pages, int32_t *own)
{
    size_t rb = rec_bytes(ctl->ps), pb = ctl->b->page_bytes;
    int32_t taken = 0;
    for (int32_t k = 0; k < n; k++) {
        if (dup[k] >= 0 || share[k] >= 0) continue;
        pages[k] = own[taken] = pie__page_take(ctl);
        r->at = rec0 + (size_t)k * rb;
        read_record(ctl, r, pages[k]);
        if (taken != k)
            memmove(kv + (size_t)taken * pb, kv + (size_t)k * pb, pb);
        taken++;
    }
    return taken;
}

/* mu held: uploads own's KV; on failure unrefs them and returns the error. */
static int load_upload(pie_ctl *ctl, const int32_t *own, int32_t fresh,
                       int32_t taken, const unsigned char *kv)
{
    int rc = 0;
    if (fresh > 0)
        rc = pie__backend_rc(ctl, ctl->b->ops->upload(ctl->b, own, fresh, kv));
    if (rc < 0) {
        for (int32_t i = 0; i < taken; i++) {
            ctl->pages[own[i]].hashed = false;
            pie__page_unref(ctl, own[i]);
        }
    }
    return rc;
}

/* mu held: publishes export e (owns nmc and pages), one ref per entry. */
static void load_publish(pie_ctl *ctl, int32_t n, const int32_t *dup,
                         const int32_t *share, int32_t *pages,
                         ctl_export *e, char *nmc)
{
    /* repeats and aliases take a reference of their own, as an
     * export holds one per entry */
    for (int32_t k = 0; k < n; k++) {
        if (dup[k] >= 0) pages[k] = pages[dup[k]];
        else if (share[k] >= 0) pages[k] = share[k];
        if (dup[k] >= 0 || share[k] >= 0)
            pie__page_ref(ctl, pages[k]);
        ctl->pages[pages[k]].shared++;
        pie__table_insert_if_new(ctl, pages[k]);
    }
    *e = (ctl_export){ .name = nmc, .n = n, .pages = pages,
                       .next = ctl->exports };
    ctl->exports = e;
    ctl->n_exports++;
    pthread_cond_broadcast(&ctl->pool_cv);   /* recheck cycles */
}

int pie_ctl_export_load(pie_ctl *ctl, const char *path, const char *name)
{
    if (!path) return pie_err_set(PIE_EINVAL, "control: NULL path");
    size_t len;
    unsigned char *data;
    int rc = read_file(ctl, path, &data, &len);
    if (rc < 0) return rc;
    rbuf r = { data, len, 0 };
    file_hdr h = { 0 };
    share_plan sp = { 0 };
    ctl_export *e = NULL;
    int32_t *pages = NULL, *plan = NULL;
    char *nmc = NULL;
    rc = load_check(ctl, path, name, &r, &h);
    const char *nm = name ? name : h.name;
    /* h.n is bounded by the pool only once check_file succeeded */
    if (rc == 0) rc = load_alloc(h.n, nm, &e, &pages, &plan, &nmc);
    if (rc < 0) goto out;
    size_t rec0 = r.at, kv0 = rec0 + (size_t)h.n * rec_bytes(ctl->ps);
    /* per record: the earlier one it repeats (plan_repeats), the exported
     * page it shares (plan_aliases); the fresh pages, in record order */
    int32_t *dup = plan, *share = plan + h.n, *own = plan + 2 * h.n;
    if ((rc = plan_repeats(ctl, data + rec0, data + kv0, h.n, dup, &sp)) < 0)
        goto out;
    pthread_mutex_lock(&ctl->mu);
    pie__wait_idle(ctl);   /* drops mu: before the name check, not after */
    int32_t fresh = load_admit(ctl, path, nm, data + rec0, data + kv0, h.n,
                               dup, &sp, share);
    if (fresh >= 0) {
        /* fresh pages get their records, and their KV packed in order */
        int32_t taken = load_take(ctl, &r, rec0, data + kv0, h.n, dup, share,
                                  pages, own);
        rc = load_upload(ctl, own, fresh, taken, data + kv0);
        if (rc >= 0) {
            load_publish(ctl, h.n, dup, share, pages, e, nmc);
            e = NULL, pages = NULL, nmc = NULL;
        }
    } else {
        rc = fresh;
    }
    pthread_mutex_unlock(&ctl->mu);
out:
    share_plan_free(&sp);
    free(e);
    free(pages);
    free(plan);
    free(nmc);
    free(data);
    return rc;
}
