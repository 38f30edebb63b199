/*
 * messaging.c — the `messaging` and `child` groups.
 *
 *   inbox      per instance: messages from the launcher (pie_rt_send) or
 *              from children; receive() futures wait in i->recv_waiters.
 *   topics     rt->topics: name -> list of subscriptions. A subscription is
 *              a handle (a never-completing future of kind SUB whose data
 *              is the pie_rt_sub); it buffers messages and queues
 *              subscription_next() futures.
 *   queues     rt->queues: name -> FIFO of messages + FIFO of pull futures;
 *              each message goes to exactly one puller. Queues live as long
 *              as the runtime.
 *   modules    rt->modules: name -> module, for launch().
 * All of it is under rt->lock.
 *
 * Wait lists (pie_rt_waitq, doubly linked through the futures) hold only
 * pending futures, each with a reference owned by the list. Cancelling or
 * freeing a waiter unlinks it at once (pie__rt_waitq_remove_locked, called
 * by pie__rt_future_cancel), so a guest that abandons waiters in a loop
 * leaves nothing behind and delivery pops the head in O(1). An instance's
 * waiters leave their lists when it ends, as its handles are freed. A list
 * holds at most MAX_WAITERS; the future past that completes PIE_ELIMIT.
 */
#define _GNU_SOURCE
#include <string.h>

#include "runtime/rt_internal.h"
#include "pie_api_host.h"

#define PIE_RT_FUT_SUB 50
#define MAX_QUEUED       65536          /* messages per queue/inbox/sub   */
#define MAX_QUEUED_BYTES (64u << 20)    /* bytes per queue/inbox/sub      */
#define MAX_NAMES        65536          /* topics + queues per runtime    */
#define MAX_WAITERS      65536          /* pending futures per wait list  */

typedef struct Z_pie_instance_t I;

typedef struct pie_rt_sub {
    struct pie_rt_topic *topic;
    struct pie_rt_sub   *next;
    pie_rt_msgq          q;
    pie_rt_waitq         waiters;
} pie_rt_sub;

struct pie_rt_topic {
    struct pie_rt_topic *next;
    pie_rt_sub          *subs;
    char                 name[];
};

struct pie_rt_queue {
    struct pie_rt_queue *next;
    pie_rt_msgq          q;
    pie_rt_waitq         waiters;
    char                 name[];
};

struct pie_rt_named {
    struct pie_rt_named *next;
    pie_rt_module       *mod;
    char                 name[];
};

static void waitq_push(pie_rt_waitq *w, pie_rt_future *f)
{
    f->refs++;
    f->wq = w;
    f->wprev = w->tail;
    f->wnext = NULL;
    if (w->tail)
        w->tail->wnext = f;
    else
        w->head = f;
    w->tail = f;
    w->n++;
    f->rt->n_waiters++;
}

/* Takes f off its list; the list's reference passes to the caller. */
static void waitq_unlink(pie_rt_future *f)
{
    pie_rt_waitq *w = f->wq;
    if (f->wprev)
        f->wprev->wnext = f->wnext;
    else
        w->head = f->wnext;
    if (f->wnext)
        f->wnext->wprev = f->wprev;
    else
        w->tail = f->wprev;
    f->wq = NULL;
    f->wprev = f->wnext = NULL;
    w->n--;
    f->rt->n_waiters--;
}

/* Pops the oldest waiter, or NULL; the caller completes it and drops the
 * list's reference. */
static pie_rt_future *waitq_pop(pie_rt_waitq *w)
{
    pie_rt_future *f = w->head;
    if (f) {
        PIE_ASSERT(!f->done);   /* completing a waiter unlinks it first */
        waitq_unlink(f);
    }
    return f;
}

/* Under rt->lock, when f is cancelled or freed: leaves its wait list, if
 * on one, and drops the list's reference (the caller holds its own). */
void pie__rt_waitq_remove_locked(pie_rt_future *f)
{
    if (!f->wq)
        return;
    waitq_unlink(f);
    pie__rt_future_unref_locked(f);
}

static void waitq_clear(pie_rt_waitq *w)
{
    pie_rt_future *f;
    while ((f = waitq_pop(w))) {
        pie__rt_future_complete_locked(f, PIE_ECANCELED, NULL, 0);
        pie__rt_future_unref_locked(f);
    }
}

/* Delivers m to the first pending waiter, else queues it. Takes m. */
static int deliver_locked(pie_rt_waitq *w, pie_rt_msgq *q, pie_rt_msg *m)
{
    pie_rt_future *f = waitq_pop(w);
    if (f) {
        pie__rt_future_complete_locked(f, 0, m->data, m->len);
        pie__rt_future_unref_locked(f);
        free(m);
        return 0;
    }
    if (q->n >= MAX_QUEUED || q->bytes + m->len > MAX_QUEUED_BYTES) {
        free(m);
        return PIE_ELIMIT;
    }
    pie__rt_msgq_push(q, m);
    return 0;
}

/* Completes f now from q, or queues it in w (PIE_ELIMIT if w is full). */
static void receive_from(pie_rt_waitq *w, pie_rt_msgq *q, pie_rt_future *f)
{
    pie_rt_msg *m = pie__rt_msgq_pop(q);
    if (m) {
        pie__rt_future_complete_locked(f, 0, m->data, m->len);
        free(m);
    } else if (w->n >= MAX_WAITERS) {
        pie__rt_future_complete_locked(f, PIE_ELIMIT, NULL, 0);
    } else {
        waitq_push(w, f);
    }
}

/* ---- launcher messages -------------------------------------------------- */

int pie_rt_send(pie_rt_instance *i, const void *buf, size_t len)
{
    if (len > PIE_RT_MAX_MSG)
        return pie_err_set(PIE_ELIMIT, "message of %zu bytes exceeds 1 MiB", len);
    pie_rt_msg *m = pie__rt_msg_new(buf, len);
    if (!m)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    pthread_mutex_lock(&i->rt->lock);
    int rc = 0;
    if (i->closed) {
        free(m);
        rc = pie_err_set(PIE_ENOTFOUND, "instance %u has ended", i->id);
    } else {
        rc = deliver_locked(&i->recv_waiters, &i->inbox, m);
        if (rc)
            pie_err_set(rc, "inbox of instance %u is full", i->id);
    }
    pthread_mutex_unlock(&i->rt->lock);
    return rc;
}

uint32_t Z_pieZ_send(I *i, uint32_t buf, uint32_t len)
{
    if (len > PIE_RT_MAX_MSG)
        return (uint32_t)PIE_ELIMIT;
    const void *p = pie_rt_guest_ptr(i, buf, len);
    if (i->cbs.on_message)
        i->cbs.on_message(i->cbs.user, i, p, len);
    else if (i->parent)
        return pie_rt_send(i->parent, p, len) < 0 ? (uint32_t)PIE_ENOTFOUND : 0;
    return 0;
}

uint32_t Z_pieZ_receive(I *i)
{
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_MESSAGE, NULL, NULL, NULL, &f);
    if (h < 0)
        return (uint32_t)h;
    pthread_mutex_lock(&i->rt->lock);
    receive_from(&i->recv_waiters, &i->inbox, f);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

/* ---- topics ------------------------------------------------------------- */

static struct pie_rt_topic *topic_find(pie_rt *rt, const char *name,
                                       uint32_t len, bool create)
{
    for (struct pie_rt_topic *t = rt->topics; t; t = t->next)
        if (strlen(t->name) == len && !memcmp(t->name, name, len))
            return t;
    if (!create || rt->n_names >= MAX_NAMES)
        return NULL;
    struct pie_rt_topic *t = calloc(1, sizeof *t + len + 1);
    if (!t)
        return NULL;
    rt->n_names++;
    memcpy(t->name, name, len);
    t->next = rt->topics;
    rt->topics = t;
    return t;
}

/* Guest strings: copied to a NUL-terminated host buffer (max 255 bytes). */
static int guest_name(I *i, uint32_t p, uint32_t len, char out[256])
{
    const char *s = pie_rt_guest_ptr(i, p, len);
    if (len == 0 || len > 255 || memchr(s, 0, len))
        return PIE_EINVAL;
    memcpy(out, s, len);
    out[len] = 0;
    return 0;
}

uint32_t Z_pieZ_publish(I *i, uint32_t tp, uint32_t tl, uint32_t buf,
                        uint32_t len)
{
    char name[256];
    const void *p = pie_rt_guest_ptr(i, buf, len);
    if (guest_name(i, tp, tl, name) || len > PIE_RT_MAX_MSG)
        return (uint32_t)PIE_EINVAL;
    pthread_mutex_lock(&i->rt->lock);
    struct pie_rt_topic *t = topic_find(i->rt, name, tl, false);
    int32_t n = 0;
    for (pie_rt_sub *s = t ? t->subs : NULL; s; s = s->next) {
        pie_rt_msg *m = pie__rt_msg_new(p, len);
        if (m && deliver_locked(&s->waiters, &s->q, m) == 0)
            n++;
    }
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)n;
}

static void sub_destroy(void *data)   /* under rt->lock */
{
    pie_rt_sub *s = data;
    struct pie_rt_topic *t = s->topic;
    for (pie_rt_sub **pp = &t->subs; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    pie__rt_msgq_clear(&s->q);
    waitq_clear(&s->waiters);
    free(s);
}

uint32_t Z_pieZ_subscribe(I *i, uint32_t tp, uint32_t tl)
{
    char name[256];
    if (guest_name(i, tp, tl, name))
        return (uint32_t)PIE_EINVAL;
    pie_rt_sub *s = calloc(1, sizeof *s);
    if (!s)
        return (uint32_t)PIE_ENOMEM;
    pthread_mutex_lock(&i->rt->lock);
    struct pie_rt_topic *t = topic_find(i->rt, name, tl, true);
    pthread_mutex_unlock(&i->rt->lock);
    if (!t) {
        free(s);
        return (uint32_t)PIE_ENOMEM;
    }
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_SUB, s, NULL, sub_destroy,
                                  NULL);
    if (h < 0) {
        free(s);
        return (uint32_t)h;
    }
    pthread_mutex_lock(&i->rt->lock);
    s->topic = t;
    s->next = t->subs;
    t->subs = s;
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

uint32_t Z_pieZ_subscription_next(I *i, uint32_t sub)
{
    pie_rt_sub *s = pie_rt_future_data(i, (int32_t)sub, PIE_RT_FUT_SUB);
    if (!s)
        return (uint32_t)PIE_EINVAL;
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_MESSAGE, NULL, NULL, NULL, &f);
    if (h < 0)
        return (uint32_t)h;
    pthread_mutex_lock(&i->rt->lock);
    receive_from(&s->waiters, &s->q, f);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

uint32_t Z_pieZ_unsubscribe(I *i, uint32_t sub)
{
    if (!pie_rt_future_data(i, (int32_t)sub, PIE_RT_FUT_SUB))
        return (uint32_t)PIE_EINVAL;
    return (uint32_t)pie__rt_future_free(i, (int32_t)sub);
}

/* ---- queues ------------------------------------------------------------- */

static struct pie_rt_queue *queue_find(pie_rt *rt, const char *name,
                                       uint32_t len)
{
    for (struct pie_rt_queue *q = rt->queues; q; q = q->next)
        if (strlen(q->name) == len && !memcmp(q->name, name, len))
            return q;
    if (rt->n_names >= MAX_NAMES)
        return NULL;
    struct pie_rt_queue *q = calloc(1, sizeof *q + len + 1);
    if (!q)
        return NULL;
    rt->n_names++;
    memcpy(q->name, name, len);
    q->next = rt->queues;
    rt->queues = q;
    return q;
}

uint32_t Z_pieZ_queue_push(I *i, uint32_t np, uint32_t nl, uint32_t buf,
                           uint32_t len)
{
    char name[256];
    const void *p = pie_rt_guest_ptr(i, buf, len);
    if (guest_name(i, np, nl, name) || len > PIE_RT_MAX_MSG)
        return (uint32_t)PIE_EINVAL;
    pie_rt_msg *m = pie__rt_msg_new(p, len);
    if (!m)
        return (uint32_t)PIE_ENOMEM;
    pthread_mutex_lock(&i->rt->lock);
    struct pie_rt_queue *q = queue_find(i->rt, name, nl);
    int rc = q ? deliver_locked(&q->waiters, &q->q, m) : PIE_ENOMEM;
    if (!q)
        free(m);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)rc;
}

uint32_t Z_pieZ_queue_pull(I *i, uint32_t np, uint32_t nl)
{
    char name[256];
    if (guest_name(i, np, nl, name))
        return (uint32_t)PIE_EINVAL;
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_MESSAGE, NULL, NULL, NULL, &f);
    if (h < 0)
        return (uint32_t)h;
    pthread_mutex_lock(&i->rt->lock);
    struct pie_rt_queue *q = queue_find(i->rt, name, nl);
    if (q)
        receive_from(&q->waiters, &q->q, f);
    else
        pie__rt_future_complete_locked(f, PIE_ENOMEM, NULL, 0);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

/* Under rt->lock, when an instance ends: drop its inbox and waiters. */
void pie__rt_messaging_instance_end(pie_rt_instance *i)
{
    i->closed = true;
    pie__rt_msgq_clear(&i->inbox);
    waitq_clear(&i->recv_waiters);
}

/* ---- child inferlets ---------------------------------------------------- */

int pie_rt_module_register(pie_rt *rt, const char *name, pie_rt_module *m)
{
    size_t len = strlen(name);
    struct pie_rt_named *n = calloc(1, sizeof *n + len + 1);
    if (!n)
        return pie_err_set(PIE_ENOMEM, "out of memory");
    memcpy(n->name, name, len);
    pie_rt_module_ref(m);
    n->mod = m;
    pthread_mutex_lock(&rt->lock);
    for (struct pie_rt_named **pp = &rt->modules; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->name, name)) {
            struct pie_rt_named *old = *pp;
            *pp = old->next;
            pie_rt_module_unref(old->mod);
            free(old);
            break;
        }
    n->next = rt->modules;
    rt->modules = n;
    pthread_mutex_unlock(&rt->lock);
    return 0;
}

static void child_cancel(void *data) { pie_rt_kill(data, "cancelled by parent"); }
static void child_destroy(void *data) { pie_rt_instance_unref(data); }

uint32_t Z_pieZ_launch(I *i, uint32_t np, uint32_t nl, uint32_t ap,
                       uint32_t al)
{
    char name[256];
    const char *args = pie_rt_guest_ptr(i, ap, al);
    if (guest_name(i, np, nl, name) || (al && args[al - 1] != 0))
        return (uint32_t)PIE_EINVAL;
    int argc = 1;
    for (uint32_t k = 0; k < al; k++)
        argc += args[k] == 0;
    if (argc > 4096)
        return (uint32_t)PIE_EINVAL;
    const char **argv = calloc(argc, sizeof *argv);
    if (!argv)
        return (uint32_t)PIE_ENOMEM;
    argv[0] = name;
    for (uint32_t k = 0, a = 1; k < al; k += strlen(args + k) + 1)
        argv[a++] = args + k;
    pthread_mutex_lock(&i->rt->lock);
    pie_rt_module *m = NULL;
    for (struct pie_rt_named *n = i->rt->modules; n; n = n->next)
        if (!strcmp(n->name, name)) {
            m = n->mod;
            pie_rt_module_ref(m);
        }
    pthread_mutex_unlock(&i->rt->lock);
    if (!m) {
        free(argv);
        return (uint32_t)PIE_ENOTFOUND;
    }
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_CHILD, NULL, child_cancel,
                                  child_destroy, &f);
    pie_rt_instance *child = NULL;
    int rc = h < 0 ? h : pie__rt_launch(i->rt, m, argc, argv, NULL, i, f,
                                        &child);
    free(argv);
    pie_rt_module_unref(m);
    if (h < 0)
        return (uint32_t)h;
    if (rc < 0) {
        pie_rt_future_complete(f, rc, NULL, 0);
        return (uint32_t)h;
    }
    f->data = child;     /* the future holds the child reference */
    return (uint32_t)h;
}

void pie__rt_messaging_free(pie_rt *rt)
{
    while (rt->topics) {
        struct pie_rt_topic *t = rt->topics;
        rt->topics = t->next;
        free(t);
    }
    while (rt->queues) {
        struct pie_rt_queue *q = rt->queues;
        rt->queues = q->next;
        pie__rt_msgq_clear(&q->q);
        waitq_clear(&q->waiters);
        free(q);
    }
    while (rt->modules) {
        struct pie_rt_named *n = rt->modules;
        rt->modules = n->next;
        pie_rt_module_unref(n->mod);
        free(n);
    }
}

/* Futures on all wait lists of rt (a white-box check for tests). */
int32_t pie__rt_waiter_count(pie_rt *rt)
{
    pthread_mutex_lock(&rt->lock);
    int32_t n = rt->n_waiters;
    pthread_mutex_unlock(&rt->lock);
    return n;
}
