/*
 * http.c — the `http` group: one outbound HTTP/1.1 request per future, over
 * a plain TCP socket, on a short-lived detached thread (so the fiber only
 * parks). Only http:// URLs whose host ("host" or "host:port") is on the
 * runtime's allowlist are allowed; the list is empty by default. The
 * response body is capped at 16 MiB; chunked transfer encoding is decoded.
 *
 * Limits, so that a hostile inferlet (or server) cannot hold host threads
 * and memory: at most HTTP_MAX_INST requests in flight per instance and
 * HTTP_MAX_ALL per runtime (http_request fails with PIE_ELIMIT beyond), and
 * each request has one deadline for name lookup, connect, send and every
 * recv together (HTTP_DEADLINE_MS; rt->http_deadline_ms overrides it), past
 * which its future fails with PIE_ELIMIT.
 *
 * Name lookup: a numeric host needs none. A name is looked up (getaddrinfo,
 * or rt->http_resolve, which tests set) on a detached lookup thread of its
 * own, which the system resolver may block for as long as it likes: the
 * request waits for the lookup's done_fd as for any socket, under the same
 * deadline and cancel, and on either it abandons the lookup and completes
 * its future at once. An http_lookup is shared by the lookup thread and the
 * request, each holding one of l->refs (atomic); the last to drop it frees
 * it with any result left in it, so an abandoned lookup cleans up after
 * itself when the resolver returns. Lookup threads touch no runtime state
 * and may outlive their runtime (pie_rt_free does not wait for them); at
 * most HTTP_MAX_LOOKUPS run at once in the process, beyond which a request
 * fails with PIE_ELIMIT.
 *
 * Ownership: an http_req is shared by its thread and its future, each
 * holding one of r->refs (under rt->lock); the last to drop it frees it. The
 * thread owns the socket, the request body and the response buffer. The
 * future's cancel hook (future_cancel, future_free, the instance's end)
 * writes r->evfd, which every wait of the thread polls, so the thread stops
 * at once. An instance counts a request in i->n_http while r->inst points
 * at it; whichever of the thread's completion and the cancel hook comes
 * first clears r->inst (both on the instance's behalf while it lives: the
 * hook runs on its fiber, and the instance frees every future before it
 * ends). rt->n_http counts request threads (not lookup threads), and
 * pie_rt_free waits for it to be 0.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "runtime/rt_internal.h"
#include "pie_api_host.h"

#define MAX_RESPONSE     (16u << 20)
#define HTTP_MAX_INST    16          /* requests in flight per instance     */
#define HTTP_MAX_ALL     256         /* requests in flight per runtime      */
#define HTTP_DEADLINE_MS 30000       /* lookup + connect + send + receive   */
#define HTTP_MAX_LOOKUPS 256         /* lookup threads alive, per process   */

typedef struct Z_pie_instance_t I;

typedef struct http_req {
    pie_rt          *rt;
    pie_rt_future   *fut;        /* the thread's reference until it completes */
    pie_rt_instance *inst;       /* counted in inst->n_http while set (lock)  */
    int32_t          refs;       /* thread + future, under rt->lock           */
    int              evfd;       /* written by the cancel hook                */
    uint64_t         deadline;   /* CLOCK_MONOTONIC ns                        */
    char             host[256], port[8], *path, *method, *headers;
    void            *body;       /* freed by the thread once sent             */
    size_t           blen;
} http_req;

static void http_req_free(http_req *r)
{
    if (!r)
        return;
    if (r->evfd >= 0)
        close(r->evfd);
    free(r->path);
    free(r->method);
    free(r->headers);
    free(r->body);
    free(r);
}

static void http_req_unref_locked(http_req *r)
{
    if (--r->refs == 0)
        http_req_free(r);
}

/* Releases the instance's count of r, once (under rt->lock). */
static void http_uncount_locked(http_req *r)
{
    if (r->inst) {
        r->inst->n_http--;
        r->inst = NULL;
    }
}

/* Future hooks: cancel wakes the thread; destroy drops the future's ref
 * (called under rt->lock). */
static void http_cancel(void *data)
{
    http_req *r = data;
    uint64_t one = 1;
    ssize_t w = write(r->evfd, &one, sizeof one);
    (void)w;                     /* an eventfd write of 1 cannot fail here */
    pthread_mutex_lock(&r->rt->lock);
    http_uncount_locked(r);
    pthread_mutex_unlock(&r->rt->lock);
}

static void http_destroy(void *data)
{
    http_req_unref_locked(data);
}

static bool allowed(pie_rt *rt, const char *host, const char *port)
{
    char hp[300];
    snprintf(hp, sizeof hp, "%s:%s", host, port);
    for (int k = 0; k < rt->o.n_http_allow; k++)
        if (!strcasecmp(rt->http_allow[k], host) ||
            !strcasecmp(rt->http_allow[k], hp))
            return true;
    return false;
}

/* http://host[:port][/path] -> parts; 0 or PIE_EINVAL. */
static int parse_url(const char *url, http_req *r)
{
    if (strncmp(url, "http://", 7))
        return PIE_EINVAL;
    const char *h = url + 7, *e = h + strcspn(h, ":/");
    if (e == h || e - h >= (long)sizeof r->host)
        return PIE_EINVAL;
    memcpy(r->host, h, e - h);
    r->host[e - h] = 0;
    snprintf(r->port, sizeof r->port, "80");
    if (*e == ':') {
        const char *p = e + 1, *pe = p + strcspn(p, "/");
        if (pe == p || pe - p > 5)
            return PIE_EINVAL;
        memcpy(r->port, p, pe - p);
        r->port[pe - p] = 0;
        e = pe;
    }
    r->path = strdup(*e ? e : "/");
    return r->path ? 0 : PIE_ENOMEM;
}

static int dechunk(char *b, size_t n, size_t *out)
{
    size_t r = 0, w = 0;
    for (;;) {
        char *end;
        if (r >= n)
            return -1;
        unsigned long len = strtoul(b + r, &end, 16);
        char *nl = memmem(b + r, n - r, "\r\n", 2);
        if (!nl || end > nl)
            return -1;
        r = nl - b + 2;
        if (len == 0)
            break;
        if (len > n - r)
            return -1;
        memmove(b + w, b + r, len);
        w += len;
        r += len + 2;
    }
    *out = w;
    return 0;
}

/* Waits until fd is ready for ev; 0, PIE_ECANCELED once the future was
 * cancelled, or PIE_ELIMIT past the request's deadline. */
static int wait_fd(http_req *r, int fd, short ev)
{
    for (;;) {
        uint64_t now = pie__rt_now_ns();
        if (now >= r->deadline)
            return PIE_ELIMIT;
        struct pollfd p[2] = {{.fd = fd, .events = ev},
                              {.fd = r->evfd, .events = POLLIN}};
        int ms = (int)((r->deadline - now + 999999) / 1000000);
        int n = poll(p, 2, ms);
        if (n < 0 && errno != EINTR)
            return PIE_EIO;
        if (n > 0 && p[1].revents)
            return PIE_ECANCELED;
        if (n > 0 && p[0].revents)
            return 0;
    }
}

/* Sends all of buf on the non-blocking socket; 0 or a PIE_E code. */
static int send_all(http_req *r, int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t k = send(fd, buf, len, MSG_NOSIGNAL);
        if (k < 0 && errno != EAGAIN && errno != EINTR)
            return PIE_EIO;
        if (k < 0) {
            int rc = wait_fd(r, fd, POLLOUT);
            if (rc)
                return rc;
            continue;
        }
        buf += k;
        len -= (size_t)k;
    }
    return 0;
}

/* One name lookup, shared by its lookup thread and its request (see the
 * top of the file). */
typedef struct http_lookup {
    atomic_int        refs;      /* lookup thread + request                  */
    atomic_bool       done;      /* rc and ai are set; then done_fd written  */
    int               done_fd;   /* eventfd the request waits on             */
    pie_rt_resolve_fn fn;        /* a copy: the thread may outlive the rt    */
    char              host[256], port[8];
    int               rc;        /* fn's result                              */
    struct addrinfo  *ai;        /* fn's list, until the request takes it    */
} http_lookup;

static const struct addrinfo http_hints = {.ai_socktype = SOCK_STREAM,
                                           .ai_flags = AI_NUMERICSERV};
static atomic_int n_lookups;     /* lookup threads alive, all runtimes      */

/* The lookup threads alive in the process (tests wait for 0). */
int32_t pie__rt_http_lookups(void)
{
    return atomic_load(&n_lookups);
}

static void lookup_unref(http_lookup *l)
{
    if (atomic_fetch_sub(&l->refs, 1) != 1)
        return;
    if (l->ai)
        freeaddrinfo(l->ai);
    close(l->done_fd);
    free(l);
}

/* Runs the lookup, however long it blocks, then wakes the request (if it
 * still waits) and drops the thread's reference. */
static void *lookup_thread(void *arg)
{
    http_lookup *l = arg;
    struct addrinfo *ai = NULL;
    l->rc = l->fn(l->host, l->port, &http_hints, &ai);
    l->ai = l->rc == 0 ? ai : NULL;  /* on an error, ai is not a list */
    atomic_store(&l->done, true);
    uint64_t one = 1;
    ssize_t w = write(l->done_fd, &one, sizeof one);
    (void)w;                     /* an eventfd write of 1 cannot fail here */
    lookup_unref(l);
    atomic_fetch_sub(&n_lookups, 1);
    return NULL;
}

/* Starts a lookup of r's host on its own thread: 0 with *out (one of its
 * references is the caller's), PIE_ELIMIT with HTTP_MAX_LOOKUPS lookups
 * already running, PIE_ENOMEM or PIE_EIO. */
static int lookup_start(http_req *r, http_lookup **out)
{
    if (atomic_fetch_add(&n_lookups, 1) >= HTTP_MAX_LOOKUPS) {
        atomic_fetch_sub(&n_lookups, 1);
        return PIE_ELIMIT;
    }
    http_lookup *l = calloc(1, sizeof *l);
    int rc = l ? 0 : PIE_ENOMEM;
    if (!rc && (l->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        rc = PIE_EIO;
    if (rc)
        goto err;
    l->fn = r->rt->http_resolve ? r->rt->http_resolve : getaddrinfo;
    memcpy(l->host, r->host, sizeof l->host);
    memcpy(l->port, r->port, sizeof l->port);
    atomic_init(&l->refs, 2);    /* the lookup thread's and the caller's */
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &at, lookup_thread, l) != 0)
        rc = PIE_EIO;
    pthread_attr_destroy(&at);
    if (rc) {
        close(l->done_fd);
        goto err;
    }
    *out = l;
    return 0;
err:
    free(l);
    atomic_fetch_sub(&n_lookups, 1);
    return rc;
}

/* Looks r's host up within r's deadline and cancel: 0 with *ai (the caller
 * frees it with freeaddrinfo), or a PIE_E code with *ai NULL: PIE_EIO if
 * the name does not resolve, PIE_ELIMIT past the deadline (or from
 * lookup_start), PIE_ECANCELED. A numeric host is converted at once; a
 * name is looked up on a lookup thread, which this waits for only in
 * wait_fd: on a deadline or cancel it leaves the lookup to that thread. */
static int resolve(http_req *r, struct addrinfo **ai)
{
    struct addrinfo numeric = http_hints;
    numeric.ai_flags |= AI_NUMERICHOST;          /* no I/O: never blocks */
    if (getaddrinfo(r->host, r->port, &numeric, ai) == 0)
        return 0;
    *ai = NULL;
    http_lookup *l;
    int rc = lookup_start(r, &l);
    if (rc)
        return rc;
    rc = wait_fd(r, l->done_fd, POLLIN);
    if (rc == 0) {               /* done_fd is written only once done is set */
        PIE_ASSERT(atomic_load(&l->done));
        rc = l->ai ? 0 : PIE_EIO;
        *ai = l->ai;             /* taken: no longer freed with l */
        l->ai = NULL;
    }
    lookup_unref(l);
    return rc;
}

/* Connects a non-blocking socket to r's host; the fd or a PIE_E code. */
static int connect_to(http_req *r)
{
    struct addrinfo *ai;
    int rc = resolve(r, &ai);
    if (rc)
        return rc;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
                    0);
    rc = fd < 0 ? PIE_EIO : 0;
    if (!rc && connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        rc = errno == EINPROGRESS ? wait_fd(r, fd, POLLOUT) : PIE_EIO;
        int err = 0;
        socklen_t el = sizeof err;
        if (!rc && (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) || err))
            rc = PIE_EIO;
    }
    freeaddrinfo(ai);
    if (rc && fd >= 0)
        close(fd);
    return rc ? rc : fd;
}

/* "HTTP/1.x NNN ..." -> NNN in 100..599, else -1. */
static int parse_status(const char *s)
{
    if (strncmp(s, "HTTP/1.", 7) || !isdigit((unsigned char)s[7]) ||
        s[8] != ' ')
        return -1;
    for (int k = 9; k < 12; k++)
        if (!isdigit((unsigned char)s[k]))
            return -1;
    if (s[12] != ' ' && s[12] != '\r')
        return -1;
    int code = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    return code >= 100 && code <= 599 ? code : -1;
}

/* Sends the request and reads the whole response (the server closes);
 * the status code with *body, *blen (inside *resp), or a PIE_E code. */
static int exchange(http_req *r, int fd, char **resp, char **body,
                    size_t *blen)
{
    char *head = NULL;
    int hl = asprintf(&head, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close"
                      "\r\nContent-Length: %zu\r\n%s\r\n", r->method, r->path,
                      r->host, r->blen, r->headers);
    if (hl < 0)
        return PIE_ENOMEM;
    int rc = send_all(r, fd, head, (size_t)hl);
    free(head);
    if (!rc)
        rc = send_all(r, fd, r->body, r->blen);
    free(r->body);               /* not needed any more: give it back now */
    r->body = NULL;
    if (rc)
        return rc;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 > cap) {
            if (cap >= MAX_RESPONSE)
                return PIE_EIO;
            cap = cap ? cap * 2 : 16384;
            char *t = realloc(*resp, cap + 1);
            if (!t)
                return PIE_ENOMEM;
            *resp = t;
        }
        ssize_t got = recv(fd, *resp + n, cap - n, 0);
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) {
            if ((rc = wait_fd(r, fd, POLLIN)))
                return rc;
            continue;
        }
        if (got < 0)
            return PIE_EIO;
        if (got == 0)
            break;
        n += got;
    }
    char *text = *resp;
    text[n] = 0;
    char *hend = memmem(text, n, "\r\n\r\n", 4);
    int code = hend ? parse_status(text) : -1;
    if (code < 0)
        return PIE_EIO;
    *hend = 0;
    *body = hend + 4;
    *blen = n - (*body - text);
    if (strcasestr(text, "\r\ntransfer-encoding: chunked") &&
        dechunk(*body, *blen, blen) != 0)
        return PIE_EIO;
    return code;
}

static void *http_thread(void *arg)
{
    http_req *r = arg;
    char *resp = NULL, *body = NULL;
    size_t blen = 0;
    int fd = connect_to(r);
    int status = fd < 0 ? fd : exchange(r, fd, &resp, &body, &blen);
    if (fd >= 0)
        close(fd);
    pie_rt *rt = r->rt;
    pthread_mutex_lock(&rt->lock);
    pie__rt_future_complete_locked(r->fut, status, status >= 0 ? body : NULL,
                                   status >= 0 ? blen : 0);
    pie__rt_future_unref_locked(r->fut);
    r->fut = NULL;
    http_uncount_locked(r);
    http_req_unref_locked(r);
    rt->n_http--;                /* pie_rt_free waits for this */
    pthread_cond_broadcast(&rt->live_cv);
    pthread_mutex_unlock(&rt->lock);
    free(resp);
    return NULL;
}

static char *dup_guest(I *i, uint32_t p, uint32_t len)
{
    const char *s = pie_rt_guest_ptr(i, p, len);
    char *d = malloc((size_t)len + 1);
    if (d) {
        memcpy(d, s, len);
        d[len] = 0;
    }
    return d;
}

/* Takes one of the instance's and one of the runtime's request slots for r
 * (0), or fails with PIE_ELIMIT. */
static int http_count(I *i, http_req *r)
{
    pie_rt *rt = i->rt;
    int rc = 0;
    pthread_mutex_lock(&rt->lock);
    if (i->n_http >= HTTP_MAX_INST)
        rc = pie_err_set(PIE_ELIMIT, "http_request: %d requests in flight "
                         "(the limit per instance)", HTTP_MAX_INST);
    else if (rt->n_http >= HTTP_MAX_ALL)
        rc = pie_err_set(PIE_ELIMIT, "http_request: %d requests in flight "
                         "(the limit per server)", HTTP_MAX_ALL);
    if (!rc) {
        i->n_http++;
        rt->n_http++;
        r->inst = i;
    }
    pthread_mutex_unlock(&rt->lock);
    return rc;
}

/* Gives new request r its runtime, cancel eventfd and copies of the
 * guest's method, headers and body (bl bytes, not yet filled); a failed
 * allocation leaves that field NULL (evfd negative) for the caller to
 * check. */
static void req_alloc(I *i, http_req *r, uint32_t mp, uint32_t ml,
                      uint32_t hp, uint32_t hl, uint32_t bl)
{
    r->rt = i->rt;
    r->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->method = dup_guest(i, mp, ml);
    r->headers = dup_guest(i, hp, hl);
    r->body = malloc(bl ? bl : 1);
}

/* Checks r's method (capitals only), its url (ul bytes: no NUL, space or
 * line break) and its headers (hl bytes: no NUL, no blank line, ending in
 * CRLF unless empty); 0 or PIE_EINVAL. */
static int req_check(const http_req *r, const char *url, uint32_t ul,
                     uint32_t hl)
{
    for (const char *c = r->method; *c; c++)
        if (*c < 'A' || *c > 'Z')
            return PIE_EINVAL;
    if (strpbrk(url, " \r\n") || strlen(url) != ul ||
        strlen(r->headers) != hl || strstr(r->headers, "\r\n\r\n") ||
        (hl && (hl < 2 || strcmp(r->headers + hl - 2, "\r\n"))))
        return PIE_EINVAL;
    return 0;
}

/* Undoes http_start for a request whose thread did not start (h: its
 * future's handle, or the negative code where no future was made): gives
 * back its request slots, then fails its future with PIE_EIO or, with no
 * future, frees r. */
static void http_start_undo(I *i, http_req *r, int32_t h)
{
    pthread_mutex_lock(&i->rt->lock);
    http_uncount_locked(r);
    i->rt->n_http--;
    pthread_cond_broadcast(&i->rt->live_cv);
    if (h > 0) {             /* the future keeps its ref; drop ours */
        pie__rt_future_complete_locked(r->fut, PIE_EIO, NULL, 0);
        pie__rt_future_unref_locked(r->fut);
        http_req_unref_locked(r);
    }
    pthread_mutex_unlock(&i->rt->lock);
    if (h < 0)
        http_req_free(r);
}

/* Gives counted request r its deadline and a future, and starts its
 * thread; returns the future's handle (the future failed with PIE_EIO
 * where the thread did not start), or pie_rt_future_new's negative code
 * with r freed. */
static int32_t http_start(I *i, http_req *r)
{
    uint32_t ms = i->rt->http_deadline_ms ? i->rt->http_deadline_ms
                                          : HTTP_DEADLINE_MS;
    r->deadline = pie__rt_now_ns() + (uint64_t)ms * 1000000;
    r->refs = 2;                 /* the thread's and the future's */
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_HTTP, r, http_cancel,
                                  http_destroy, &r->fut);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    /* once its thread runs, r is shared: it may complete the future before
     * pthread_create returns here, so r is only read here on failure */
    bool started = h > 0 && pthread_create(&t, &at, http_thread, r) == 0;
    pthread_attr_destroy(&at);
    if (!started)
        http_start_undo(i, r, h);
    return h;
}

uint32_t Z_pieZ_http_request(I *i, uint32_t mp, uint32_t ml, uint32_t up,
                             uint32_t ul, uint32_t hp, uint32_t hl,
                             uint32_t bp, uint32_t bl)
{
    pie_rt_guest_ptr(i, mp, ml);
    pie_rt_guest_ptr(i, up, ul);
    pie_rt_guest_ptr(i, hp, hl);
    pie_rt_guest_ptr(i, bp, bl);
    if (ml == 0 || ml > 16 || ul == 0 || ul > 8192 || hl > 65536 ||
        bl > (16u << 20))
        return (uint32_t)PIE_EINVAL;
    http_req *r = calloc(1, sizeof *r);
    char *url = dup_guest(i, up, ul);
    if (r)
        req_alloc(i, r, mp, ml, hp, hl, bl);
    int32_t rc = 0;
    if (!r || !url || !r->method || !r->headers || !r->body)
        rc = PIE_ENOMEM;
    else if (r->evfd < 0)
        rc = PIE_EIO;
    if (!rc) {
        memcpy(r->body, pie_rt_guest_ptr(i, bp, bl), bl);
        r->blen = bl;
        rc = req_check(r, url, ul, hl);
    }
    if (!rc)
        rc = parse_url(url, r);
    if (!rc && !allowed(i->rt, r->host, r->port))
        rc = PIE_EPERM;
    free(url);
    if (!rc)
        rc = http_count(i, r);
    if (rc) {
        http_req_free(r);
        return (uint32_t)rc;
    }
    return (uint32_t)http_start(i, r);
}
