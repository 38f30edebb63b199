/*
 * messaging.c — the `messaging` and `child` groups.
 *
 *   inbox      per instance: messages from the launcher (pie_rt_send) or
 *              from children; receive() futures wait in i->recv_waiters.
 *   topics     rt->topics: name -> list of subscriptions. A subscription is
 *              a handle (a never-completing future of kind SUB whose data
 *              is the pie_rt_sub); it buffers messages and queues
 *              subscription_next() futures. A topic exists while it has a
 *              subscription: the last one to go frees it.
 *   queues     rt->queues: name -> FIFO of messages + FIFO of pull futures;
 *              each message goes to exactly one puller. A queue exists
 *              while it holds a message or a waiter: the push or pull that
 *              empties it, or the cancel that takes its last waiter (the
 *              list knows its queue: waitq.queue), frees it at once, so an
 *              empty queue and a missing one are the same thing.
 *   modules    rt->modules: name -> module, for launch().
 * All of it is under rt->lock. Topic and queue names are looked up in two
 * chained hash tables (FNV-1a; buckets double past one entry each and
 * never shrink).
 *
 * Budgets. The number of names is not capped: each live name is held by
 * something that counts against one instance's budget, so no instance can
 * use up what the others need.
 *   - A message queued for a reader (a queue, a subscription, a parent's
 *     inbox) is charged to the instance that sent it, len + MSG_COST bytes
 *     (MSG_COST covers the message header plus a queue with a 255-byte
 *     name, so a message alone in its queue is paid for), from when it is
 *     queued until it is popped: read, or dropped with its subscription,
 *     inbox or the runtime. A message handed straight to a waiting future
 *     is not charged. An instance may have MAX_INST_BYTES charged at once;
 *     past that queue_push, publish and send fail PIE_ELIMIT. A publish
 *     is charged once per subscription that queues a copy and is all or
 *     nothing: past the budget it reaches no one.
 *   - Charges live in a pie_rt_acct, referenced by the instance until it
 *     ends and by each message charged to it. An ended instance's messages
 *     stay charged until read or dropped: to its account, which no one can
 *     add to any more, and to rt->queued_bytes, the sum of all charges,
 *     capped at MAX_TOTAL_BYTES, so instances launched one after another
 *     cannot pile up unread messages without bound (past it every sender
 *     gets PIE_ELIMIT until readers drain them). Messages from the embedder
 *     (pie_rt_send) are charged to no one; each inbox has its own cap.
 *   - An instance holds at most MAX_SUBS subscriptions (each holds a topic
 *     name) and MAX_PULLS pulls waiting on queues, over all names (each
 *     may hold a queue and its name alive): past that, subscribe returns
 *     PIE_ELIMIT and a pull that would wait completes PIE_ELIMIT (one that
 *     finds a message does not wait and always succeeds). A pull counts in
 *     i->n_pulls from waitq_push until waitq_unlink, whichever way it
 *     leaves its list: a message delivered to it, or a cancel or free
 *     (its own, or its instance's as it ends, killed or not).
 *   - Every queue, inbox and subscription holds at most MAX_QUEUED
 *     messages and MAX_QUEUED_BYTES bytes.
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
#include <stddef.h>
#include <string.h>

#include "runtime/rt_internal.h"
#include "pie_api_host.h"

#define PIE_RT_FUT_SUB 50
#define MAX_QUEUED       65536          /* messages per queue/inbox/sub   */
#define MAX_QUEUED_BYTES (64u << 20)    /* bytes per queue/inbox/sub      */
#define MAX_WAITERS      65536          /* pending futures per wait list  */
#define MAX_SUBS         4096           /* subscriptions per instance     */
/* Pulls waiting on queues per instance, over all names. As many as one
 * queue may hold, so an instance alone can still fill one queue's list.
 * Each may keep a queue with a 255-byte name alive, which MSG_COST prices
 * at 512 bytes: 32 MiB at most, an eighth of what the instance's message
 * budget (MAX_INST_BYTES) may keep alive with one-byte messages. The pulls
 * are not charged to that budget: an instance whose sent messages fill it
 * must still be able to wait for a reply. */
#define MAX_PULLS        MAX_WAITERS
#define MAX_INST_BYTES   ((size_t)256 << 20) /* charged per instance      */
#define MAX_TOTAL_BYTES  ((size_t)1 << 30)   /* charged in all            */
#define MSG_COST         512            /* charged per message beyond len */

typedef struct Z_pie_instance_t I;

/* An entry of a name table; the first member of a topic or queue. */
typedef struct pie_rt_name {
    struct pie_rt_name *next;   /* in its bucket                           */
    uint32_t            hash;
    uint32_t            len;
    const char         *s;      /* the owner's name[] (NUL-terminated)     */
} pie_rt_name;

typedef struct pie_rt_sub {
    pie_rt_instance     *inst;  /* owner (it frees the handle before it ends) */
    struct pie_rt_topic *topic; /* NULL until linked                       */
    struct pie_rt_sub   *next;
    pie_rt_msgq          q;
    pie_rt_waitq         waiters;
} pie_rt_sub;

struct pie_rt_topic {
    pie_rt_name          nm;
    pie_rt_sub          *subs;  /* never NULL while the topic is in the table */
    char                 name[];
};

struct pie_rt_queue {
    pie_rt_name          nm;
    pie_rt_msgq          q;
    pie_rt_waitq         waiters;   /* .queue points back here             */
    char                 name[];
};
#define QUEUE_IS_EMPTY(q) ((q)->q.n == 0 && (q)->waiters.n == 0)

_Static_assert(sizeof(struct pie_rt_queue) + 256 + sizeof(pie_rt_msg) + 64
               <= MSG_COST, "MSG_COST must pay for a queue of one message");

struct pie_rt_named {
    struct pie_rt_named *next;
    pie_rt_module       *mod;
    char                 name[];
};

/* What one instance has queued for others; see "Budgets" above. */
struct pie_rt_acct {
    pie_rt              *rt;
    size_t               bytes;     /* charged for its queued messages     */
    int32_t              refs;      /* its instance until it ends, + one a
                                       charged message                     */
};

/* ---- name tables -------------------------------------------------------- */

static uint32_t name_hash(const char *s, uint32_t len)
{
    uint32_t h = 2166136261u;
    for (uint32_t k = 0; k < len; k++)
        h = (h ^ (unsigned char)s[k]) * 16777619u;
    return h;
}

static pie_rt_name *names_find(pie_rt_names *t, const char *s, uint32_t len,
                               uint32_t h)
{
    if (!t->b)
        return NULL;
    for (pie_rt_name *e = t->b[h & t->mask]; e; e = e->next)
        if (e->hash == h && e->len == len && !memcmp(e->s, s, len))
            return e;
    return NULL;
}

/* Adds e (whose name is not in t); 0 or PIE_ENOMEM. Doubles the buckets
 * past one entry each (where that allocation fails, chains grow instead). */
static int names_add(pie_rt_names *t, pie_rt_name *e)
{
    if (!t->b || t->n > t->mask) {
        uint32_t nb = t->b ? 2 * (t->mask + 1) : 16;
        pie_rt_name **b = calloc(nb, sizeof *b);
        if (!b && !t->b)
            return PIE_ENOMEM;
        if (b) {
            for (uint32_t k = 0; t->b && k <= t->mask; k++)
                while (t->b[k]) {
                    pie_rt_name *x = t->b[k];
                    t->b[k] = x->next;
                    x->next = b[x->hash & (nb - 1)];
                    b[x->hash & (nb - 1)] = x;
                }
            free(t->b);
            t->b = b;
            t->mask = nb - 1;
        }
    }
    e->next = t->b[e->hash & t->mask];
    t->b[e->hash & t->mask] = e;
    t->n++;
    return 0;
}

static void names_remove(pie_rt_names *t, pie_rt_name *e)
{
    pie_rt_name **pp = &t->b[e->hash & t->mask];
    while (*pp != e)
        pp = &(*pp)->next;      /* e is in t: the walk ends at it */
    *pp = e->next;
    t->n--;
}

/* Pops every entry of t (NULL when empty), then frees the buckets. */
static pie_rt_name *names_pop(pie_rt_names *t)
{
    for (uint32_t k = 0; t->b && k <= t->mask; k++)
        if (t->b[k]) {
            pie_rt_name *e = t->b[k];
            t->b[k] = e->next;
            t->n--;
            return e;
        }
    free(t->b);
    t->b = NULL;
    t->mask = 0;
    return NULL;
}

/* Allocates an object of `size` bytes whose name[] starts at `off`, with
 * its pie_rt_name first, and adds it to t; NULL if out of memory. */
static void *names_new(pie_rt *rt, pie_rt_names *t, size_t size, size_t off,
                       const char *s, uint32_t len, uint32_t h)
{
    char *o = calloc(1, size + len + 1);
    if (!o)
        return NULL;
    pie_rt_name *e = (pie_rt_name *)o;
    memcpy(o + off, s, len);
    e->s = o + off;
    e->len = len;
    e->hash = h;
    if (names_add(t, e)) {
        free(o);
        return NULL;
    }
    rt->n_names++;
    return o;
}

/* ---- budgets ------------------------------------------------------------ */

/* 0 if `from` may be charged `cost` more bytes (creating its account),
 * else PIE_ELIMIT or PIE_ENOMEM with a message. Under rt->lock. */
static int budget_check(I *from, size_t cost)
{
    pie_rt *rt = from->rt;
    size_t have = from->acct ? from->acct->bytes : 0;
    if (have + cost > MAX_INST_BYTES)
        return pie_err_set(PIE_ELIMIT, "instance %u has %zu bytes of messages "
                           "queued; %zu more would pass its %zu MiB: wait "
                           "until readers take some", from->id, have, cost,
                           MAX_INST_BYTES >> 20);
    if (rt->queued_bytes + cost > MAX_TOTAL_BYTES)
        return pie_err_set(PIE_ELIMIT, "the server holds %zu bytes of queued "
                           "messages; %zu more would pass %zu MiB",
                           rt->queued_bytes, cost, MAX_TOTAL_BYTES >> 20);
    if (!from->acct) {
        from->acct = calloc(1, sizeof *from->acct);
        if (!from->acct)
            return pie_err_set(PIE_ENOMEM, "out of memory");
        from->acct->rt = rt;
        from->acct->refs = 1;
    }
    return 0;
}

static void acct_unref(struct pie_rt_acct *a)
{
    if (--a->refs == 0)
        free(a);
}

/* Charges m to `from` (budget_check passed for it). */
static void msg_charge(I *from, pie_rt_msg *m)
{
    size_t cost = m->len + MSG_COST;
    m->acct = from->acct;
    m->acct->refs++;
    m->acct->bytes += cost;
    from->rt->queued_bytes += cost;
}

/* Under rt->lock, as m leaves its queue (pie__rt_msgq_pop): releases its
 * charge, and its account with the last one. */
void pie__rt_msg_uncharge(pie_rt_msg *m)
{
    struct pie_rt_acct *a = m->acct;
    size_t cost = m->len + MSG_COST;
    a->bytes -= cost;
    a->rt->queued_bytes -= cost;
    m->acct = NULL;
    acct_unref(a);
}

/* ---- wait lists --------------------------------------------------------- */

static void queue_gc(pie_rt *rt, struct pie_rt_queue *q);

/* A named queue's waiters are pulls, each counted against its instance
 * (MAX_PULLS) while on the list. A waiter's instance is set until it
 * leaves: pie__rt_future_free clears it only after the cancel that
 * unlinks it. */
#define WAITQ_IS_PULLS(w) ((w)->queue != NULL)

static void waitq_push(pie_rt_waitq *w, pie_rt_future *f)
{
    PIE_ASSERT(f->inst);
    if (WAITQ_IS_PULLS(w))
        f->inst->n_pulls++;
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
    if (WAITQ_IS_PULLS(w)) {
        PIE_ASSERT(f->inst && f->inst->n_pulls > 0);
        f->inst->n_pulls--;
    }
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
 * on one, and drops the list's reference (the caller holds its own). A
 * queue left with no message and no waiter is freed. */
void pie__rt_waitq_remove_locked(pie_rt_future *f)
{
    pie_rt_waitq *w = f->wq;
    if (!w)
        return;
    waitq_unlink(f);
    if (w->queue)
        queue_gc(f->rt, w->queue);
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

/* Delivers m to the first pending waiter, else queues it, charged to
 * `from` (NULL: to no one). Takes m. 0, or PIE_ELIMIT (q is full or from's
 * budget is) / PIE_ENOMEM, with a message. */
static int deliver_locked(pie_rt_waitq *w, pie_rt_msgq *q, pie_rt_msg *m,
                          I *from)
{
    pie_rt_future *f = waitq_pop(w);
    if (f) {
        pie__rt_future_complete_locked(f, 0, m->data, m->len);
        pie__rt_future_unref_locked(f);
        free(m);
        return 0;
    }
    int rc = 0;
    if (q->n >= MAX_QUEUED || q->bytes + m->len > MAX_QUEUED_BYTES)
        rc = pie_err_set(PIE_ELIMIT, "%d messages (%zu bytes) already wait "
                         "there unread", q->n, q->bytes);
    else if (from)
        rc = budget_check(from, m->len + MSG_COST);
    if (rc) {
        free(m);
        return rc;
    }
    if (from)
        msg_charge(from, m);
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

/* A new message future of i, completed now from q or queued in w (under
 * the lock): its handle, or a PIE_E code. */
static uint32_t receive_future(I *i, pie_rt_waitq *w, pie_rt_msgq *q)
{
    pie_rt_future *f;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_MESSAGE, NULL, NULL, NULL, &f);
    if (h < 0)
        return (uint32_t)h;
    pthread_mutex_lock(&i->rt->lock);
    receive_from(w, q, f);
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

/* ---- launcher messages -------------------------------------------------- */

/* Sends buf to i's inbox, charged to `from` (NULL: the embedder). */
static int send_to(pie_rt_instance *i, const void *buf, size_t len, I *from)
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
        rc = deliver_locked(&i->recv_waiters, &i->inbox, m, from);
    }
    pthread_mutex_unlock(&i->rt->lock);
    return rc;
}

int pie_rt_send(pie_rt_instance *i, const void *buf, size_t len)
{
    return send_to(i, buf, len, NULL);
}

uint32_t Z_pieZ_send(I *i, uint32_t buf, uint32_t len)
{
    if (len > PIE_RT_MAX_MSG)
        return (uint32_t)PIE_ELIMIT;
    const void *p = pie_rt_guest_ptr(i, buf, len);
    if (i->cbs.on_message)
        i->cbs.on_message(i->cbs.user, i, p, len);
    else if (i->parent)
        return (uint32_t)send_to(i->parent, p, len, i);
    return 0;
}

uint32_t Z_pieZ_receive(I *i)
{
    return receive_future(i, &i->recv_waiters, &i->inbox);
}

/* ---- topics ------------------------------------------------------------- */

/* The topic called name, or NULL: missing and not `create`d, or out of
 * memory. A created topic must get a subscription before the lock drops. */
static struct pie_rt_topic *topic_find(pie_rt *rt, const char *name,
                                       uint32_t len, bool create)
{
    uint32_t h = name_hash(name, len);
    pie_rt_name *e = names_find(&rt->topics, name, len, h);
    if (e || !create)
        return (struct pie_rt_topic *)e;
    return names_new(rt, &rt->topics, sizeof(struct pie_rt_topic),
                     offsetof(struct pie_rt_topic, name), name, len, h);
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
    /* All or nothing: what the copies that will queue cost, first. */
    size_t cost = 0;
    for (pie_rt_sub *s = t ? t->subs : NULL; s; s = s->next)
        if (!s->waiters.n && s->q.n < MAX_QUEUED &&
            s->q.bytes + len <= MAX_QUEUED_BYTES)
            cost += len + MSG_COST;
    int32_t rc = cost ? budget_check(i, cost) : 0, n = 0;
    for (pie_rt_sub *s = t && rc == 0 ? t->subs : NULL; s; s = s->next) {
        pie_rt_msg *m = pie__rt_msg_new(p, len);
        if (m && deliver_locked(&s->waiters, &s->q, m, i) == 0)
            n++;
    }
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)(rc ? rc : n);
}

static void sub_destroy(void *data)   /* under rt->lock */
{
    pie_rt_sub *s = data;
    struct pie_rt_topic *t = s->topic;
    if (t) {
        pie_rt_sub **pp = &t->subs;
        while (*pp != s)
            pp = &(*pp)->next;
        *pp = s->next;
        s->inst->n_subs--;
        if (!t->subs) {
            names_remove(&s->inst->rt->topics, &t->nm);
            s->inst->rt->n_names--;
            free(t);
        }
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
    pthread_mutex_lock(&i->rt->lock);
    int32_t n_subs = i->n_subs;
    pthread_mutex_unlock(&i->rt->lock);
    if (n_subs >= MAX_SUBS)
        return (uint32_t)pie_err_set(PIE_ELIMIT, "instance %u already has %d "
                                     "subscriptions", i->id, n_subs);
    pie_rt_sub *s = calloc(1, sizeof *s);
    if (!s)
        return (uint32_t)PIE_ENOMEM;
    s->inst = i;
    int32_t h = pie_rt_future_new(i, PIE_RT_FUT_SUB, s, NULL, sub_destroy,
                                  NULL);
    if (h < 0) {
        free(s);
        return (uint32_t)h;
    }
    /* Found or created and linked under one lock: a topic is never seen
     * without a subscription. */
    pthread_mutex_lock(&i->rt->lock);
    struct pie_rt_topic *t = topic_find(i->rt, name, tl, true);
    if (t) {
        s->topic = t;
        s->next = t->subs;
        t->subs = s;
        i->n_subs++;
    }
    pthread_mutex_unlock(&i->rt->lock);
    if (!t) {
        pie__rt_future_free(i, h);
        return (uint32_t)PIE_ENOMEM;
    }
    return (uint32_t)h;
}

uint32_t Z_pieZ_subscription_next(I *i, uint32_t sub)
{
    pie_rt_sub *s = pie_rt_future_data(i, (int32_t)sub, PIE_RT_FUT_SUB);
    if (!s)
        return (uint32_t)PIE_EINVAL;
    return receive_future(i, &s->waiters, &s->q);
}

uint32_t Z_pieZ_unsubscribe(I *i, uint32_t sub)
{
    if (!pie_rt_future_data(i, (int32_t)sub, PIE_RT_FUT_SUB))
        return (uint32_t)PIE_EINVAL;
    return (uint32_t)pie__rt_future_free(i, (int32_t)sub);
}

/* ---- queues ------------------------------------------------------------- */

/* The queue called name, created empty if missing (NULL: out of memory).
 * The caller calls queue_gc on it before the lock drops. */
static struct pie_rt_queue *queue_find(pie_rt *rt, const char *name,
                                       uint32_t len)
{
    uint32_t h = name_hash(name, len);
    pie_rt_name *e = names_find(&rt->queues, name, len, h);
    if (e)
        return (struct pie_rt_queue *)e;
    struct pie_rt_queue *q = names_new(rt, &rt->queues,
                                       sizeof(struct pie_rt_queue),
                                       offsetof(struct pie_rt_queue, name),
                                       name, len, h);
    if (q)
        q->waiters.queue = q;
    return q;
}

/* Frees q if it has no message and no waiter. */
static void queue_gc(pie_rt *rt, struct pie_rt_queue *q)
{
    if (!QUEUE_IS_EMPTY(q))
        return;
    names_remove(&rt->queues, &q->nm);
    rt->n_names--;
    free(q);
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
    int rc = PIE_ENOMEM;
    if (q) {
        rc = deliver_locked(&q->waiters, &q->q, m, i);
        queue_gc(i->rt, q);
    } else {
        free(m);
    }
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
    if (q) {
        if (q->q.n == 0 && i->n_pulls >= MAX_PULLS)
            pie__rt_future_complete_locked(f, pie_err_set(PIE_ELIMIT,
                "instance %u already has %d pulls waiting on queues",
                i->id, i->n_pulls), NULL, 0);
        else
            receive_from(&q->waiters, &q->q, f);
        queue_gc(i->rt, q);
    } else {
        pie__rt_future_complete_locked(f, PIE_ENOMEM, NULL, 0);
    }
    pie__rt_future_unref_locked(f);
    pthread_mutex_unlock(&i->rt->lock);
    return (uint32_t)h;
}

/* Under rt->lock, when an instance ends (its handles already freed): drop
 * its inbox and waiters, and its reference to its account (messages it
 * left queued keep theirs). */
void pie__rt_messaging_instance_end(pie_rt_instance *i)
{
    i->closed = true;
    pie__rt_msgq_clear(&i->inbox);
    waitq_clear(&i->recv_waiters);
    if (i->acct) {
        acct_unref(i->acct);
        i->acct = NULL;
    }
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
    pie_rt_name *e;
    while ((e = names_pop(&rt->topics)))
        free(e);                /* none left once every instance ended */
    while ((e = names_pop(&rt->queues))) {
        struct pie_rt_queue *q = (struct pie_rt_queue *)e;
        pie__rt_msgq_clear(&q->q);
        waitq_clear(&q->waiters);
        free(q);
    }
    rt->n_names = 0;
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
