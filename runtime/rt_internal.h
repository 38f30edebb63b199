/*
 * rt_internal.h — the runtime's internal structures (not for embedders).
 *
 * pie_rt            one per server: workers, watchdog/timer thread, module
 *                   registry, messaging registries, one mutex `lock` that
 *                   guards every future, park/wake and messaging state.
 * pie_rt_module     a dlopened compiled inferlet; refcounted (each live
 *                   instance holds one reference, so dlclose waits for it).
 * pie_rt_instance   one launch: its wasm2c instance, linear memory, fiber,
 *                   handle table of futures, inbox, return value. States:
 *                   NEW -> RUNNABLE <-> RUNNING <-> PARKED -> DONE. An
 *                   instance is pinned to one worker for its whole life
 *                   (generated code may cache TLS addresses across a switch).
 * pie_rt_future     status + payload, referenced by its handle slot and by
 *                   its producer until pie_rt_future_complete.
 */
#ifndef PIE_RT_INTERNAL_H
#define PIE_RT_INTERNAL_H

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "common/pie_err.h"
#include "runtime/runtime.h"


/* One allowlisted import (generated from runtime/api.def). */
typedef struct pie_rt_api_import {
    const char *module;
    const char *name;
    const char *params;          /* "i32,i32,i64"                           */
    const char *result;          /* "i32" or "" for none                    */
    void (*fn)(void);            /* host implementation (NULL: absent)      */
} pie_rt_api_import;

extern const pie_rt_api_import pie_rt_api_imports[];
extern const int pie_rt_api_n_imports;
extern const int pie_rt_api_version;
extern const char pie_rt_api_digest[];

#define PIE_RT_MAX_MSG (1u << 20)

/* A byte message in an intrusive singly linked FIFO. While queued it may
 * be charged to its sender's account (messaging.c); popping it releases
 * the charge. */
typedef struct pie_rt_msg {
    struct pie_rt_msg *next;
    struct pie_rt_acct *acct;     /* charged for it, or NULL               */
    size_t             len;
    unsigned char      data[];
} pie_rt_msg;

typedef struct pie_rt_msgq {
    pie_rt_msg *head, *tail;
    int32_t     n;
    size_t      bytes;
} pie_rt_msgq;

/* A wait list of pending futures (receive, queue_pull, subscription_next),
 * doubly linked through the futures so a cancelled one leaves at once. */
typedef struct pie_rt_waitq {
    struct pie_rt_future *head, *tail;
    int32_t               n;
    struct pie_rt_queue  *queue;  /* the named queue it belongs to, or NULL:
                                     freed once it has no message or waiter */
} pie_rt_waitq;

/* A name -> topic or queue table (messaging.c): chained hash buckets. */
typedef struct pie_rt_names {
    struct pie_rt_name **b;       /* mask + 1 chains (NULL until first use)  */
    uint32_t             mask, n;
} pie_rt_names;

struct pie_rt_future {
    pie_rt          *rt;
    pie_rt_instance *inst;       /* owner (NULL once the owner ended)       */
    int32_t          kind;
    int32_t          status;     /* valid when done                         */
    bool             done;
    bool             cancelled;
    int32_t          refs;       /* under rt->lock                          */
    unsigned char   *payload;
    size_t           payload_len;
    void            *data;
    void           (*cancel)(void *data);
    void           (*destroy)(void *data);
    /* on a wait list (receive, queue_pull, subscription_next): the list
     * holds a reference; cancel/free unlink it (pie__rt_waitq_remove)     */
    pie_rt_waitq    *wq;         /* the list it is on, NULL if none         */
    struct pie_rt_future *wprev, *wnext;
    int32_t          theap;      /* index in rt->timers, -1 if not there    */
};

struct pie_rt_module {
    pie_rt        *rt;
    atomic_int     refs;
    void          *dl;
    size_t         inst_size;
    void         (*instantiate)(void *inst, void *ctx);
    void         (*free_inst)(void *inst);
    void        *(*memory)(void *inst);   /* wasm_rt_memory_t *          */
    void         (*start)(void *inst);
    uintptr_t      text_lo, text_hi;       /* generated code, for watchdog */
    char           key[65];
};

enum { INST_NEW, INST_RUNNABLE, INST_RUNNING, INST_PARKED, INST_DONE };

typedef struct pie_rt_worker pie_rt_worker;

struct Z_pie_instance_t {
    pie_rt          *rt;
    struct pie_rt_module *mod;
    uint32_t         id;
    atomic_int       refs;
    int              state;      /* INST_*, under rt->lock                  */
    pie_rt_worker   *worker;
    struct Z_pie_instance_t *qnext;   /* worker run queue                  */
    struct Z_pie_instance_t *lprev, *lnext; /* rt->live list               */
    void            *wasm;       /* wasm2c instance struct                  */
    void            *mem;        /* wasm_rt_memory_t * (after instantiate)  */
    /* fiber */
    void            *stack;      /* mmap base (guard at the bottom)         */
    size_t           stack_size;
    void            *sp;         /* saved stack pointer while switched out  */
    void            *asan_fake;
    sigjmp_buf      *trap_jb;
    /* result */
    int32_t          status;
    bool             trapped;
    bool             exited;     /* exit()/proc_exit unwound the fiber      */
    char             reason[256];
    unsigned char   *ret;
    size_t           ret_len;
    /* launch */
    int              argc;
    char           **argv;
    pie_rt_launch_cbs cbs;
    struct Z_pie_instance_t *parent;  /* child launched by an inferlet     */
    struct Z_pie_instance_t *root;    /* the embedder-launched ancestor of
                                         a child (held through parent refs) */
    int32_t          n_tree;     /* as a root: live descendants (rt->lock)  */
    pie_rt_future   *child_fut;  /* completed with our status when we end   */
    void            *engine_ctx;
    /* futures: handle h -> futs[h - 1]                                     */
    pie_rt_future  **futs;
    int32_t          n_futs, cap_futs;
    int32_t         *free_slots; /* indexes of NULL slots in futs, a stack  */
    int32_t          n_free;
    /* parking */
    const int32_t   *wait_set;   /* handles the fiber waits for (host copy) */
    int32_t          n_wait;
    bool             wait_any_done;
    /* messaging, under rt->lock */
    pie_rt_msgq      inbox;
    bool             closed;     /* ending: accepts no more messages        */
    pie_rt_waitq     recv_waiters;
    struct pie_rt_acct *acct;    /* bytes it has queued for others (NULL
                                    until its first such message)           */
    int32_t          n_subs;     /* its live subscriptions                  */
    int32_t          n_pulls;    /* its pulls waiting on queues             */
    int32_t          n_http;     /* HTTP requests in flight (rt->lock)      */
    /* CPU accounting */
    uint64_t         cpu_ns;     /* CPU used in finished slices             */
    atomic_bool      cpu_over;
    atomic_bool      kill_req;
    uint64_t         table_bytes; /* host bytes its wasm tables hold,
                                    charged to memory_limit (wasm_rt.c)    */
    volatile sig_atomic_t in_guest;  /* 1 while guest code, or a libc/libm
                                    leaf it called, runs on the fiber; 0 in
                                    host code (pie__rt_host_enter): the
                                    signal handlers unwind only while 1   */
    char             kill_reason[128];
    /* completion for pie_rt_wait */
    pthread_cond_t   done_cv;
    bool             ended;
};

struct pie_rt_worker {
    pie_rt           *rt;
    int               idx;
    pthread_t         thread;
    pthread_mutex_t   lock;
    pthread_cond_t    cv;
    pie_rt_instance  *qhead, *qtail;
    bool              stop;
    void             *sched_sp;
    _Atomic(pie_rt_instance *) current;
    clockid_t         cpu_clock;
    uint64_t          slice_start;    /* thread CPU ns at switch-in          */
    void             *altstack;
    const void       *asan_bottom;    /* scheduler stack, for ASan switches  */
    size_t            asan_size;
    void             *asan_fake;
};

/* A name lookup with getaddrinfo's contract: 0 and *res (freed with
 * freeaddrinfo, so made by getaddrinfo), or an EAI_ code. It may block:
 * http.c runs it on a thread of its own, which the request abandons at its
 * deadline or cancel, so it may return after its runtime is freed. Called
 * for names only (a numeric host needs no lookup). */
struct addrinfo;
typedef int (*pie_rt_resolve_fn)(const char *host, const char *port,
                                 const struct addrinfo *hints,
                                 struct addrinfo **res);

typedef struct pie_rt_timer {
    uint64_t       when;              /* CLOCK_MONOTONIC ns                 */
    pie_rt_future *fut;
} pie_rt_timer;

struct pie_rt {
    pie_rt_opts      o;
    char            *cache_dir;
    char           **http_allow;
    pthread_mutex_t  lock;
    pthread_cond_t   live_cv;
    pie_rt_worker   *workers;
    int32_t          n_workers;
    atomic_uint      next_worker;
    atomic_uint      next_id;
    pie_rt_instance *live;            /* list of live instances             */
    int32_t          n_live;
    /* watchdog + timers */
    pthread_t        watchdog;
    pthread_cond_t   timer_cv;
    pie_rt_timer    *timers;          /* binary min-heap by when            */
    int32_t          n_timers, cap_timers;
    bool             stopping;        /* watchdog exits                     */
    bool             closing;         /* no new launches                    */
    /* registries, under lock */
    struct pie_rt_named  *modules;    /* name -> module                     */
    pie_rt_names     topics;          /* live topics (with subscriptions)   */
    pie_rt_names     queues;          /* live queues (messages or waiters)  */
    int32_t          n_names;         /* topics + queues                    */
    int32_t          n_waiters;       /* futures on all wait lists          */
    size_t           queued_bytes;    /* charged for queued messages, all   */
                                      /* senders (ended ones included)      */
    int32_t          n_http;          /* HTTP threads in flight             */
    uint32_t         http_deadline_ms; /* per request; 0: 30 s (tests set it) */
    pie_rt_resolve_fn http_resolve;   /* name lookup; NULL: getaddrinfo     */
                                      /* (tests set it to a slow one)       */
    int32_t          n_engine;        /* engine forwards whose completion   */
                                      /* callback has yet to run            */
};

/* loader.c */
int  pie__rt_check_imports(const uint8_t *wasm, size_t len);
void pie__rt_cache_sweep(const char *dir);
/* instance.c */
void pie__rt_wake_locked(pie_rt_instance *i);
int32_t pie__rt_future_handle(pie_rt_instance *i, pie_rt_future *f);
pie_rt_future *pie__rt_future_get(pie_rt_instance *i, int32_t h);
void pie__rt_future_unref_locked(pie_rt_future *f);
void pie__rt_future_complete_locked(pie_rt_future *f, int32_t status,
                                    const void *payload, size_t len);
int32_t pie__rt_wait(pie_rt_instance *i, const int32_t *hs, int32_t n,
                     pie_rt_future *t);
void pie__rt_future_cancel(pie_rt_instance *i, pie_rt_future *f);
int32_t pie__rt_future_free(pie_rt_instance *i, int32_t h);
void pie__rt_yield(pie_rt_instance *i);
pie_rt_instance *pie__rt_current(void);
uint64_t pie__rt_now_ns(void);
void pie__rt_timer_add_locked(pie_rt *rt, uint64_t when, pie_rt_future *f);
void pie__rt_timer_cancel(void *future);
pie_rt_msg *pie__rt_msg_new(const void *buf, size_t len);
void pie__rt_msgq_push(pie_rt_msgq *q, pie_rt_msg *m);
pie_rt_msg *pie__rt_msgq_pop(pie_rt_msgq *q);
void pie__rt_msgq_clear(pie_rt_msgq *q);
void pie__rt_msg_uncharge(pie_rt_msg *m);   /* messaging.c */
int  pie__rt_launch(pie_rt *rt, struct pie_rt_module *m, int argc,
                    const char *const *argv, const pie_rt_launch_cbs *cbs,
                    pie_rt_instance *parent, pie_rt_future *child_fut,
                    pie_rt_instance **out);
/* wasm_rt.c */
/* Host code called from an inferlet runs on the fiber's stack, right below
 * the guest's frames. A host function that overflowed it would fault with
 * locks held (rt->lock, malloc's), so every entry from guest code (the
 * generated wrappers in pie_api_table.c, wasm_rt.c's grow and trap entries)
 * first checks that `need` bytes remain above the guard. Below that it
 * touches the guard itself: the SIGSEGV handler unwinds such a fault only
 * while the instance is in guest code (in_guest, below: the module's code
 * and the libc/libm leaves it calls hold no lock) or when it comes from
 * section pie_rt_entry, so the instance traps as on a guest overflow and no
 * host code runs on the little stack that is left. */
#define PIE_RT_STACK_GUARD (64u << 10)   /* PROT_NONE bottom of a fiber stack */
#define PIE_RT_HOST_STACK  (64u << 10)   /* stack a host function may use    */
#define PIE_RT_ENTRY __attribute__((section("pie_rt_entry"), noinline))
static inline __attribute__((always_inline)) void
pie__rt_entry_check(pie_rt_instance *i, uintptr_t need)
{
    uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
    uintptr_t lo = i && i->stack ? (uintptr_t)i->stack + PIE_RT_STACK_GUARD : 0;
    if (lo && sp - lo < need)     /* off the fiber, sp - lo is out of range */
        *(volatile char *)i->stack = 0;
}
/* Host code entered from guest code: marks the instance as in host code
 * (so the SIGSEGV and CPU handlers leave it alone: it may hold locks) and
 * returns what to restore on the way back out. Every function that
 * generated code calls (the entry wrappers, wasm_rt.c's runtime functions)
 * brackets its body with these. Guest code itself, and the libc/libm leaf
 * functions it calls (memmove, sqrt, floor...), run with in_guest 1: a
 * fault in the stack guard or a CPU signal there unwinds the fiber. */
static inline __attribute__((always_inline)) int
pie__rt_host_enter(pie_rt_instance *i)
{
    if (!i)
        return 0;
    int g = i->in_guest;
    i->in_guest = 0;
    atomic_signal_fence(memory_order_seq_cst);
    return g;
}
static inline __attribute__((always_inline)) void
pie__rt_host_leave(pie_rt_instance *i, int g)
{
    atomic_signal_fence(memory_order_seq_cst);
    if (i)
        i->in_guest = g;
}
void pie__rt_signals_init(void);
int  pie__rt_thread_signals(pie_rt_worker *w);
void pie__rt_set_current(pie_rt_instance *i);
#define PIE_RT_SIG_CPU SIGUSR2
/* messaging.c */
void pie__rt_messaging_instance_end(pie_rt_instance *i);
void pie__rt_messaging_free(pie_rt *rt);
void pie__rt_waitq_remove_locked(pie_rt_future *f);
int32_t pie__rt_waiter_count(pie_rt *rt);
/* http.c */
int32_t pie__rt_http_lookups(void);    /* lookup threads alive, process */
void pie__rt_http_start(pie_rt_instance *i, pie_rt_future *f, char *method,
                        char *url, char *headers, void *body, size_t blen);

#endif
