/*
 * runtime.h — the WebAssembly inferlet runtime: embedding API and the
 * interface for host functions.
 *
 * An inferlet is a wasm32-wasi command module. pie_rt_module_load() checks
 * its imports against the API table (runtime/api.def), translates it with
 * wasm2c, compiles it with gcc in a child process under CPU and memory
 * rlimits, caches the shared object by content hash and dlopen()s it. Each
 * pie_rt_launch() creates a fresh instance (its own linear memory) that runs
 * `_start` on a fiber; fibers run on a small pool of worker threads and park
 * when a host call waits (future_wait), so thousands of blocked inferlets
 * cost little. A trap (out-of-bounds access, stack exhaustion, unreachable,
 * division by zero, bad pointer given to a host call, CPU budget exceeded)
 * ends that instance only; the launcher learns the reason in on_exit.
 *
 * Ownership: pie_rt owns modules and instances. pie_rt_module_load returns a
 * module reference (release with pie_rt_module_unref; instances keep their
 * module alive). pie_rt_launch returns an instance reference held by the
 * caller (release with pie_rt_instance_unref); the instance itself runs on
 * until it ends, whether or not the caller keeps its reference.
 *
 * Linking: the dlopened inferlets bind to the runtime's wasm_rt_* and
 * Z_pieZ_* / Z_wasi_snapshot_preview1Z_* symbols in the executable, so an
 * executable must link with -rdynamic (an INTERFACE option of pie_runtime)
 * and pull the whole archive:
 *   target_link_libraries(x PRIVATE "$<LINK_LIBRARY:WHOLE_ARCHIVE,pie_runtime>")
 *
 * Signals: the runtime installs one SIGSEGV/SIGBUS handler (it traps only
 * faults inside a running instance's linear memory or stack guard and
 * re-raises anything else) and uses SIGUSR2 for the CPU watchdog. Under
 * ASan run with ASAN_OPTIONS=handle_segv=0:allow_user_segv_handler=1.
 *
 * Scheduling: fibers are cooperative. An instance gives up its worker when
 * it waits (future_wait*) or calls sched_yield; one that computes without
 * either keeps its worker until it ends or exceeds its CPU budget.
 *
 * Threads: every public function is thread-safe. Callbacks (on_output,
 * on_message, on_exit, hooks) run on a worker thread while the instance's
 * fiber is current, or (on_exit of a killed, never-started instance) on the
 * caller's thread; they must not block for long and must not call
 * pie_rt_free.
 */
#ifndef PIE_RUNTIME_H
#define PIE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

typedef struct pie_rt pie_rt;
typedef struct pie_rt_module pie_rt_module;
/* The instance is the context pointer wasm2c passes to every import. */
typedef struct Z_pie_instance_t pie_rt_instance;
typedef struct pie_rt_future pie_rt_future;

/* Embedder hooks, e.g. the control layer's per-instance engine state. */
typedef struct pie_rt_hooks {
    void *user;
    /* On the worker, before `_start` runs. May set pie_rt_set_engine_ctx.
     * A negative return ends the instance (status = that code). */
    int  (*on_instance_start)(void *user, pie_rt_instance *inst);
    /* On the worker after the instance ended (exit, trap or kill), before
     * on_exit: release everything the engine holds for it. Pending futures
     * of the instance have already been cancelled. */
    void (*on_instance_end)(void *user, pie_rt_instance *inst);
} pie_rt_hooks;

typedef struct pie_rt_opts {
    int32_t      n_workers;      /* worker threads running fibers (def. 2)  */
    uint64_t     memory_limit;   /* linear memory cap per instance, bytes
                                    (default 1 GiB)                         */
    double       cpu_limit_s;    /* CPU seconds per instance (default 60;
                                    < 0: unlimited)                         */
    const char  *cache_dir;      /* NULL: $PIE_CACHE_DIR or ~/.cache/pie    */
    double       compile_cpu_s;  /* rlimit of the compiler (default 60)     */
    uint64_t     compile_mem;    /* rlimit of the compiler (default 2 GiB)  */
    uint32_t     fiber_stack;    /* native stack per instance (def. 1 MiB)  */
    const char  *const *http_allow; /* hosts ("host" or "host:port") that
                                    http_request may reach; none by default */
    int32_t      n_http_allow;
    pie_rt_hooks hooks;
} pie_rt_opts;

/* Creates a runtime with its workers and watchdog. o may be NULL. */
int  pie_rt_create(const pie_rt_opts *o, pie_rt **out);
/* Kills every live instance, waits for them, joins the threads, frees. */
void pie_rt_free(pie_rt *rt);

/* Loads a module from wasm bytes: validates imports/exports against the
 * API (PIE_EFORMAT / PIE_EUNSUPPORTED with a message naming the offending
 * import), compiles or takes it from the cache, dlopens it. Blocks for the
 * compile (about a second for 30 KB of code). *cached says whether the
 * compiled object came from the cache (may be NULL). */
int  pie_rt_module_load(pie_rt *rt, const void *wasm, size_t len,
                        pie_rt_module **out, int *cached);
void pie_rt_module_ref(pie_rt_module *m);
void pie_rt_module_unref(pie_rt_module *m);
/* Names a module so inferlets can launch it as a child (launch()). The
 * registry holds its own reference; a later register replaces the name. */
int  pie_rt_module_register(pie_rt *rt, const char *name, pie_rt_module *m);

typedef struct pie_rt_launch_cbs {
    void *user;
    /* Bytes the instance wrote to fd 1 or 2. */
    void (*on_output)(void *user, pie_rt_instance *i, int fd,
                      const char *buf, size_t len);
    /* A message the instance sent to its client (send()). */
    void (*on_message)(void *user, pie_rt_instance *i, const void *buf,
                       size_t len);
    /* The instance ended: status is its exit status, or PIE_ETRAP with
     * trap_reason set ("out of bounds memory access", "CPU time limit
     * exceeded", "killed: ...", ...). ret is its return value (set_return). */
    void (*on_exit)(void *user, pie_rt_instance *i, int32_t status,
                    const char *trap_reason, const void *ret, size_t ret_len);
} pie_rt_launch_cbs;

/* Launches a fresh instance of m with argv (argc >= 1: argv[0] is the
 * program name). cbs may be NULL. On success *out (if out != NULL) holds a
 * reference the caller must release with pie_rt_instance_unref. */
int  pie_rt_launch(pie_rt *rt, pie_rt_module *m, int argc,
                   const char *const *argv, const pie_rt_launch_cbs *cbs,
                   pie_rt_instance **out);
/* Blocks the calling (non-worker) thread until the instance ends; returns
 * its status (PIE_ETRAP for a trap; reason copied to reason[cap]). */
int32_t pie_rt_wait(pie_rt_instance *i, char *reason, size_t cap);
/* Queues a message for the instance's receive(). */
int  pie_rt_send(pie_rt_instance *i, const void *buf, size_t len);
/* Ends the instance with a trap whose reason is "killed: <reason>". */
int  pie_rt_kill(pie_rt_instance *i, const char *reason);
void pie_rt_instance_ref(pie_rt_instance *i);
void pie_rt_instance_unref(pie_rt_instance *i);
uint32_t pie_rt_instance_id(const pie_rt_instance *i);
/* Number of live (not yet ended) instances. */
int32_t pie_rt_live_instances(pie_rt *rt);

/* ---- For host functions (runtime/host_*.c) ---------------------------
 * Host functions run on the instance's fiber. A function that must report
 * a memory-safety violation calls pie_rt_trap(), which does not return:
 * check guest pointers BEFORE taking locks or allocating. */

void *pie_rt_engine_ctx(pie_rt_instance *i);
void  pie_rt_set_engine_ctx(pie_rt_instance *i, void *ctx);
pie_rt *pie_rt_of(pie_rt_instance *i);

/* Ends the running instance with a trap; reason is formatted like printf.
 * Only from a host function running on the instance's own fiber. */
__attribute__((noreturn, format(printf, 2, 3)))
void pie_rt_trap(pie_rt_instance *i, const char *fmt, ...);
/* Pointer to guest memory [off, off+len) or trap ("bad pointer"). Valid
 * until the next call into wasm or memory.grow: never keep it. */
void *pie_rt_guest_ptr(pie_rt_instance *i, uint32_t off, uint64_t len);
/* Bounds-checked copies (trap on a bad range); unaligned-safe. */
void  pie_rt_copy_in(pie_rt_instance *i, void *dst, uint32_t off,
                     uint64_t len);
void  pie_rt_copy_out(pie_rt_instance *i, uint32_t off, const void *src,
                      uint64_t len);

/* Futures. A future belongs to one instance and has a 32-bit handle in its
 * table. The producer (e.g. the scheduler) calls pie_rt_future_complete
 * exactly once, from any thread, even after a cancel; that wakes the fiber
 * parked on it. When the guest cancels or frees a pending future, or the
 * instance ends with it pending, the future completes with PIE_ECANCELED at
 * once (the producer's later completion is then ignored) and cancel(data)
 * is called on the instance's worker, outside runtime locks, to stop the
 * work; destroy(data) runs (under the runtime lock: it must not call back
 * into the runtime) when the last reference
 * (the handle's and the producer's) is gone. kind tags data so
 * pie_rt_future_data can check a handle's type. Returns the handle (> 0) or
 * a negative code; *out receives the producer's reference. */
int32_t pie_rt_future_new(pie_rt_instance *i, int32_t kind, void *data,
                          void (*cancel)(void *data),
                          void (*destroy)(void *data), pie_rt_future **out);
void  pie_rt_future_complete(pie_rt_future *f, int32_t status,
                             const void *payload, size_t len);
/* The data of handle h if it is a future of this kind, else NULL. */
void *pie_rt_future_data(pie_rt_instance *i, int32_t h, int32_t kind);
/* PIE_EAGAIN while pending, else the status; PIE_EINVAL for a bad handle. */
int32_t pie_rt_future_status(pie_rt_instance *i, int32_t h);
/* Parks the calling fiber until h completes; returns its status. */
int32_t pie_rt_future_wait(pie_rt_instance *i, int32_t h);

enum {                           /* future kinds; engine kinds from 100   */
    PIE_RT_FUT_SLEEP = 1,
    PIE_RT_FUT_MESSAGE,
    PIE_RT_FUT_CHILD,
    PIE_RT_FUT_HTTP,
    PIE_RT_FUT_ENGINE = 100,
};

#endif
