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
 * it has been bounded, and a failed load changes nothing in the engine.
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
 * page; one whose record and KV bytes equal those of a page a live export
 * lists (no write pending) takes that page (plan_sharing). So names that
 * shared pages when saved share them again, whichever loads first, and the
 * cap and the pool count them as before the restart. Comparing the bytes
 * themselves, not only the records, is what makes it exact: a partial
 * page's KV depends on pages before it that its record does not describe.
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
    while (ctl->running) pthread_cond_wait(&ctl->idle_cv, &ctl->mu);
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
    int rc = ctl->b->ops->download(ctl->b, e->pages, e->n, w->p + at);
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
    if (!e) {
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

/* Restores page metadata from the next record into page (mu held). NULL,
 * or what is wrong with the record (the page is then released unhashed by
 * the caller). */
static const char *read_record(pie_ctl *ctl, rbuf *r, int32_t page)
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
    if (p->fill < 0 || p->fill > ps) return "fill out of range";
    if (hashed > 1) return "bad hashed flag";
    for (int32_t i = 0; i < ps; i++) {
        if (ctl->slot_known[base + i] > 1) return "bad slot flag";
        if (ctl->slot_known[base + i] && (ctl->slot_tok[base + i] < 0 ||
                                          ctl->slot_tok[base + i] >= ctl->vocab))
            return "token outside the vocabulary";
        if (hashed && !ctl->slot_known[base + i])
            return "hashed page with an unwritten slot";
    }
    if (hashed) {
        uint64_t h;
        if (p->fill != ps) return "hashed page not full";
        if (pie__pool_hash_of(ctl, page, p->prefix, &h) < 0)
            return "out of memory";
        if (h != p->hash) return "page hash does not match its tokens";
    }
    p->hashed = hashed == 1;
    return NULL;
}

typedef struct keyed {          /* a record's hash, and whose it is       */
    uint64_t key;
    int32_t  i;                 /* record index, or physical page         */
} keyed;

static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* The pages of a load that need no copy: for record k (records at rec,
 * their KV at kv), dup[k] = the first earlier record of the file with the
 * same record and KV bytes (a page the export listed twice), else -1; and
 * share[k] = a page a live export lists whose record and KV bytes are
 * those, else -1 (an alias saved under another name and loaded already;
 * never a page with a write pending). Returns how many records need a
 * page of their own, or PIE_ENOMEM. mu held, device idle (it downloads the
 * exported pages whose records match). Costs a hash of each record and of
 * each exported page's record, two sorts, and a page download per match. */
static int32_t plan_sharing(pie_ctl *ctl, const unsigned char *rec,
                            const unsigned char *kv, int32_t n,
                            int32_t *dup, int32_t *share)
{
    size_t rb = rec_bytes(ctl->ps), pb = ctl->b->page_bytes;
    int32_t m = 0, fresh = 0;
    for (const ctl_export *e = ctl->exports; e; e = e->next) m += e->n;
    keyed *fk = malloc((size_t)n * sizeof *fk);
    keyed *ck = malloc(((size_t)m + 1) * sizeof *ck);
    unsigned char *buf = malloc(rb + pb);
    if (!fk || !ck || !buf) {
        free(fk), free(ck), free(buf);
        return pie_err_set(PIE_ENOMEM, "control: out of memory");
    }
    for (int32_t k = 0; k < n; k++) {
        fk[k] = (keyed){ XXH64(rec + k * rb, rb, 0), k };
        dup[k] = share[k] = -1;
    }
    m = 0;
    for (const ctl_export *e = ctl->exports; e; e = e->next)
        for (int32_t k = 0; k < e->n; k++) {
            if (ctl->pages[e->pages[k]].last_writer) continue;
            record_write(ctl, e->pages[k], buf);
            ck[m++] = (keyed){ XXH64(buf, rb, 0), e->pages[k] };
        }
    qsort(fk, n, sizeof *fk, keyed_cmp);
    qsort(ck, m, sizeof *ck, keyed_cmp);
    /* repeats: within a run of one key, in record order */
    for (int32_t a = 0, b; a < n; a = b) {
        for (b = a + 1; b < n && fk[b].key == fk[a].key; b++) {}
        for (int32_t x = a + 1; x < b; x++) {
            int32_t k = fk[x].i;
            for (int32_t y = a; y < x && dup[k] < 0; y++) {
                int32_t j = fk[y].i;
                if (dup[j] < 0 &&
                    memcmp(rec + j * rb, rec + k * rb, rb) == 0 &&
                    memcmp(kv + j * pb, kv + k * pb, pb) == 0)
                    dup[k] = j;
            }
        }
    }
    /* aliases: the run of exported pages with the record's key */
    for (int32_t x = 0, lo = 0; x < n; x++) {
        int32_t k = fk[x].i;
        while (lo < m && ck[lo].key < fk[x].key) lo++;
        for (int32_t y = lo; y < m && ck[y].key == fk[x].key; y++) {
            if (dup[k] >= 0 || share[k] >= 0) break;
            record_write(ctl, ck[y].i, buf);
            if (memcmp(buf, rec + k * rb, rb) == 0 &&
                ctl->b->ops->download(ctl->b, &ck[y].i, 1, buf + rb) == 0 &&
                memcmp(buf + rb, kv + k * pb, pb) == 0)
                share[k] = ck[y].i;
        }
        if (dup[k] < 0 && share[k] < 0) fresh++;
    }
    free(fk), free(ck), free(buf);
    return fresh;
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
    rc = check_file(ctl, path, &r, &h);
    if (rc == 0 && name && (!*name || strlen(name) > 255))
        rc = pie_err_set(PIE_EINVAL, "control: export name must be 1..255 "
                         "bytes");
    const char *nm = name ? name : h.name;
    /* h.n is bounded by the pool only once check_file succeeded */
    ctl_export *e = rc == 0 ? calloc(1, sizeof *e) : NULL;
    int32_t *pages = rc == 0 ? calloc(h.n, sizeof *pages) : NULL;
    int32_t *plan = rc == 0 ? calloc(3 * (size_t)h.n, sizeof *plan) : NULL;
    char *nmc = rc == 0 ? strdup(nm) : NULL;
    if (rc == 0 && (!e || !pages || !plan || !nmc))
        rc = pie_err_set(PIE_ENOMEM, "control: out of memory");
    if (rc < 0) goto out;
    /* per record: the earlier one it repeats, the exported page it
     * shares (plan_sharing); the fresh pages, in record order */
    int32_t *dup = plan, *share = plan + h.n, *own = plan + 2 * h.n;
    size_t rb = rec_bytes(ctl->ps), pb = ctl->b->page_bytes;
    size_t rec0 = r.at, kv0 = rec0 + (size_t)h.n * rb;
    int32_t fresh = 0;
    pthread_mutex_lock(&ctl->mu);
    pie__wait_idle(ctl);   /* drops mu: before the name check, not after */
    for (ctl_export *x = ctl->exports; x && rc == 0; x = x->next)
        if (strcmp(x->name, nm) == 0)
            rc = pie_err_set(PIE_EBUSY, "control: export name '%s' already "
                             "in use", nm);
    if (rc == 0 && (rc = plan_sharing(ctl, data + rec0, data + kv0, h.n, dup,
                                      share)) >= 0)
        fresh = rc, rc = 0;
    if (rc == 0) rc = pie__export_cap_check(ctl, nm, NULL, fresh);
    if (rc == 0 && ctl->n_free + ctl->n_cached < fresh)
        rc = pie_err_set(PIE_EBUSY, "control: %d free pages needed to load "
                         "%s", fresh, path);
    if (rc == 0) {
        /* fresh pages get their records, and their KV packed in order */
        int32_t taken = 0;
        for (int32_t k = 0; k < h.n && rc == 0; k++) {
            if (dup[k] >= 0 || share[k] >= 0) continue;
            pages[k] = own[taken] = pie__page_take(ctl);
            r.at = rec0 + (size_t)k * rb;
            const char *why = read_record(ctl, &r, pages[k]);
            if (why)
                rc = pie_err_set(PIE_EFORMAT, "%s: page record %d is "
                                 "invalid: %s", path, k, why);
            if (taken != k)
                memmove(data + kv0 + (size_t)taken * pb,
                        data + kv0 + (size_t)k * pb, pb);
            taken++;
        }
        if (rc == 0 && fresh > 0)
            rc = ctl->b->ops->upload(ctl->b, own, fresh, data + kv0);
        if (rc < 0) {
            for (int32_t i = 0; i < taken; i++) {
                ctl->pages[own[i]].hashed = false;
                pie__page_unref(ctl, own[i]);
            }
        } else {
            /* repeats and aliases take a reference of their own, as an
             * export holds one per entry */
            for (int32_t k = 0; k < h.n; k++) {
                if (dup[k] >= 0) pages[k] = pages[dup[k]];
                else if (share[k] >= 0) pages[k] = share[k];
                if (dup[k] >= 0 || share[k] >= 0)
                    pie__page_ref(ctl, pages[k]);
                ctl->pages[pages[k]].shared++;
                pie__table_insert_if_new(ctl, pages[k]);
            }
            *e = (ctl_export){ .name = nmc, .n = h.n, .pages = pages,
                               .next = ctl->exports };
            ctl->exports = e;
            ctl->n_exports++;
            e = NULL, pages = NULL, nmc = NULL;
            pthread_cond_broadcast(&ctl->pool_cv);   /* recheck cycles */
        }
    }
    pthread_mutex_unlock(&ctl->mu);
out:
    free(e);
    free(pages);
    free(plan);
    free(nmc);
    free(data);
    return rc;
}
