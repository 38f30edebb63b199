/*
 * http.c — the `http` group: one outbound HTTP/1.1 request per future, over
 * a plain TCP socket, on a short-lived detached thread (so the fiber only
 * parks). Only http:// URLs whose host ("host" or "host:port") is on the
 * runtime's allowlist are allowed; the list is empty by default. The
 * response body is capped at 16 MiB; chunked transfer encoding is decoded.
 */
#define _GNU_SOURCE
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "runtime/rt_internal.h"
#include "pie_api_host.h"

#define MAX_RESPONSE (16u << 20)

typedef struct Z_pie_instance_t I;

typedef struct http_req {
    pie_rt_future *fut;
    char host[256], port[8], *path, *method, *headers;
    void *body;
    size_t blen;
} http_req;

static void http_req_free(http_req *r)
{
    if (!r)
        return;
    free(r->path);
    free(r->method);
    free(r->headers);
    free(r->body);
    free(r);
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

static void *http_thread(void *arg)
{
    http_req *r = arg;
    int status = PIE_EIO, fd = -1;
    char *resp = NULL, *body = NULL;
    size_t n = 0, blen = 0;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(r->host, r->port, &hints, &ai) != 0 || !ai)
        goto done;
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {10, 0};
    if (fd < 0)
        goto done;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0)
        goto done;
    char *head = NULL;
    int hl = asprintf(&head, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close"
                      "\r\nContent-Length: %zu\r\n%s\r\n", r->method, r->path,
                      r->host, r->blen, r->headers);
    if (hl < 0)
        goto done;
    bool ok = send(fd, head, hl, MSG_NOSIGNAL) == hl &&
              (!r->blen || send(fd, r->body, r->blen, MSG_NOSIGNAL) ==
                               (ssize_t)r->blen);
    free(head);
    if (!ok)
        goto done;
    size_t cap = 0;
    for (;;) {
        if (n + 4096 > cap) {
            if (cap >= MAX_RESPONSE)
                goto done;
            cap = cap ? cap * 2 : 16384;
            char *t = realloc(resp, cap + 1);
            if (!t)
                goto done;
            resp = t;
        }
        ssize_t got = recv(fd, resp + n, cap - n, 0);
        if (got < 0)
            goto done;
        if (got == 0)
            break;
        n += got;
    }
    if (!resp)
        goto done;
    resp[n] = 0;
    int code;
    char *hend = memmem(resp, n, "\r\n\r\n", 4);
    if (!hend || sscanf(resp, "HTTP/1.%*d %d", &code) != 1)
        goto done;
    *hend = 0;
    body = hend + 4;
    blen = n - (body - resp);
    if (strcasestr(resp, "\r\ntransfer-encoding: chunked") &&
        dechunk(body, blen, &blen) != 0)
        goto done;
    status = code;
done:
    if (ai)
        freeaddrinfo(ai);
    if (fd >= 0)
        close(fd);
    pie_rt *rt = r->fut->rt;
    pie_rt_future_complete(r->fut, status, status >= 0 ? body : NULL,
                           status >= 0 ? blen : 0);
    pthread_mutex_lock(&rt->lock);       /* pie_rt_free waits for this */
    rt->n_http--;
    pthread_cond_broadcast(&rt->live_cv);
    pthread_mutex_unlock(&rt->lock);
    free(resp);
    http_req_free(r);
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
    if (r) {
        r->method = dup_guest(i, mp, ml);
        r->headers = dup_guest(i, hp, hl);
        r->body = malloc(bl ? bl : 1);
    }
    int32_t rc = 0;
    if (!r || !url || !r->method || !r->headers || !r->body)
        rc = PIE_ENOMEM;
    if (!rc) {
        memcpy(r->body, pie_rt_guest_ptr(i, bp, bl), bl);
        r->blen = bl;
        for (const char *c = r->method; *c; c++)
            if (*c < 'A' || *c > 'Z')
                rc = PIE_EINVAL;
        if (strpbrk(url, " \r\n") || strlen(url) != ul ||
            strlen(r->headers) != hl || strstr(r->headers, "\r\n\r\n") ||
            (hl && (hl < 2 || strcmp(r->headers + hl - 2, "\r\n"))))
            rc = PIE_EINVAL;
    }
    if (!rc)
        rc = parse_url(url, r);
    if (!rc && !allowed(i->rt, r->host, r->port))
        rc = PIE_EPERM;
    free(url);
    int32_t h = rc;
    if (!rc)
        h = pie_rt_future_new(i, PIE_RT_FUT_HTTP, NULL, NULL, NULL, &r->fut);
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    /* once its thread runs, r is the thread's: it may finish and free r
     * before pthread_create returns here, so r is not read after that */
    bool handed = false;
    if (h > 0) {
        pthread_mutex_lock(&i->rt->lock);
        i->rt->n_http++;
        pthread_mutex_unlock(&i->rt->lock);
        handed = pthread_create(&t, &at, http_thread, r) == 0;
        if (!handed) {
            pthread_mutex_lock(&i->rt->lock);
            i->rt->n_http--;
            pthread_mutex_unlock(&i->rt->lock);
            pie_rt_future_complete(r->fut, PIE_EIO, NULL, 0);
        }
    }
    pthread_attr_destroy(&at);
    if (!handed)
        http_req_free(r);
    return (uint32_t)h;
}
