/*
 * wasm_rt.c — pie's own implementation of wabt 1.0.32's wasm-rt.h, exported
 * from the server binary (-rdynamic) to the dlopened inferlets.
 *
 * Debian's libwasm-rt-impl is unusable in a threaded server (see
 * ../shared/design/inferlet-runtime.md): one global jmp_buf, a sigaltstack
 * only on the initialising thread, every SIGSEGV turned into a trap, a leak
 * of the 8 GiB reservation. Here:
 *
 *   trap target   the running instance (thread-local `tls_cur`, set on every
 *                 fiber switch) holds the sigjmp_buf of its fiber's entry
 *                 frame; wasm_rt_trap and the signal handlers siglongjmp
 *                 there. Handlers use SA_NODEFER and sigsetjmp(jb, 0), so no
 *                 signal mask is saved or restored (no syscall per entry).
 *   SIGSEGV/BUS   trap only if the fault address lies in the running
 *                 instance's memory reservation (out of bounds) or its fiber
 *                 stack's guard (native stack exhausted) and, for the guard,
 *                 only while the instance is in guest code (i->in_guest:
 *                 the module's code or a libc/libm leaf it called, such as
 *                 memmove or floor) or the faulting PC is in the entry
 *                 section pie_rt_entry (rt_internal.h): host code that
 *                 overflows may hold a lock, and unwinding it would hang
 *                 the server. Anything else is a host bug: the default
 *                 action is restored and the fault re-executes, so it still
 *                 crashes loudly. Host entries check the remaining stack
 *                 first (pie__rt_entry_check), so a guest cannot get there.
 *   CPU signal    sent by the watchdog to a worker whose instance is over
 *                 its CPU budget or killed; it unwinds only while the
 *                 instance is in guest code (i->in_guest), which includes
 *                 a long memmove from memory.copy (no lock held), never
 *                 from a host function; otherwise the watchdog signals
 *                 again on its next tick.
 *   memory        reserve 8 GiB PROT_NONE|MAP_NORESERVE (every u32 address
 *                 plus u32 offset lands inside), commit with mprotect, free
 *                 the whole reservation. max_pages is clamped to the
 *                 runtime's memory_limit; growing past it returns -1 (so
 *                 malloc returns NULL in the guest) instead of aborting.
 *   types         the function-type registry is guarded by a mutex.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <wasm-rt.h>

#include "runtime/rt_internal.h"

#if !WASM_RT_MEMCHECK_SIGNAL_HANDLER || WASM_RT_USE_STACK_DEPTH_COUNT
#error "pie's runtime implements the guard-page (signal handler) mode only"
#endif

#define RESERVE_BYTES  (8ull << 30)
#define PAGE_BYTES     65536ull
#define TABLE_MAX      (1u << 20)     /* elements, initial or grown        */
#define TRAP_STACK     (8u << 10)     /* what trap_with needs to unwind    */

/* Bounds of section pie_rt_entry (the linker defines them). */
extern const char __start_pie_rt_entry[], __stop_pie_rt_entry[];

static __thread pie_rt_instance *tls_cur;
static bool rt_initialized;

void pie__rt_set_current(pie_rt_instance *i) { tls_cur = i; }
pie_rt_instance *pie__rt_current(void) { return tls_cur; }

/* ---- traps -------------------------------------------------------------- */

const char *wasm_rt_strerror(wasm_rt_trap_t trap)
{
    switch (trap) {
    case WASM_RT_TRAP_NONE:          return "no error";
    case WASM_RT_TRAP_OOB:           return "out of bounds memory access";
    case WASM_RT_TRAP_INT_OVERFLOW:  return "integer overflow";
    case WASM_RT_TRAP_DIV_BY_ZERO:   return "integer divide by zero";
    case WASM_RT_TRAP_INVALID_CONVERSION: return "invalid conversion to integer";
    case WASM_RT_TRAP_UNREACHABLE:   return "unreachable executed";
    case WASM_RT_TRAP_CALL_INDIRECT: return "indirect call type mismatch or null";
    case WASM_RT_TRAP_UNCAUGHT_EXCEPTION: return "uncaught exception";
    case WASM_RT_TRAP_EXHAUSTION:    return "call stack exhausted";
    }
    return "unknown trap";
}

/* Records the reason and unwinds to the running fiber's entry frame. Uses
 * little stack (no printf): guest code traps with its stack nearly full. */
static __attribute__((noreturn)) void trap_with(pie_rt_instance *i,
                                                const char *reason)
{
    if (!i || !i->trap_jb) {
        fprintf(stderr, "pie runtime: trap outside an instance: %s\n", reason);
        abort();
    }
    i->in_guest = 0;             /* host code from here on (fiber_main)   */
    if (!i->trapped) {
        i->trapped = true;
        size_t n = 0;
        for (; reason[n] && n < sizeof i->reason - 1; n++)
            i->reason[n] = reason[n];
        i->reason[n] = 0;
    }
    siglongjmp(*i->trap_jb, 1);
}

PIE_RT_ENTRY void wasm_rt_trap(wasm_rt_trap_t code)
{
    pie__rt_entry_check(tls_cur, TRAP_STACK);
    trap_with(tls_cur, wasm_rt_strerror(code));
}

void pie_rt_trap(pie_rt_instance *i, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    trap_with(i, buf);
}

/* ---- signals ------------------------------------------------------------ */

static bool addr_in(uintptr_t a, const void *base, uint64_t len)
{
    return base && a >= (uintptr_t)base && a - (uintptr_t)base < len;
}

/* The interrupted or faulting instruction's address. */
static uintptr_t signal_pc(void *ucv)
{
    ucontext_t *uc = ucv;
#if defined(__x86_64__)
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    return (uintptr_t)uc->uc_mcontext.pc;
#else
#error "unsupported architecture"
#endif
}

static bool pc_in_module(pie_rt_instance *i, uintptr_t pc)
{
    return i->mod && pc >= i->mod->text_lo && pc < i->mod->text_hi;
}

static bool pc_in_entry(uintptr_t pc)
{
    return pc >= (uintptr_t)__start_pie_rt_entry &&
           pc < (uintptr_t)__stop_pie_rt_entry;
}

/* A fault in the fiber's stack guard: a trap if it comes from guest code
 * (the module's, or a libc/libm leaf it called) or from an entry (none
 * holds a lock); else a host bug, reported before the caller lets it
 * crash. */
static void stack_fault(pie_rt_instance *i, void *ucv)
{
    uintptr_t pc = signal_pc(ucv);
    if (pc_in_entry(pc))
        trap_with(i, "native stack exhausted (too little left for a host "
                     "call)");
    if (i->in_guest || pc_in_module(i, pc))
        trap_with(i, "native stack exhausted (call stack too deep)");
    static const char msg[] = "pie runtime: host code overflowed an "
                              "inferlet's fiber stack\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
}

static void segv_handler(int sig, siginfo_t *si, void *ucv)
{
    pie_rt_instance *i = tls_cur;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (i && i->trap_jb) {
        wasm_rt_memory_t *m = i->mem;
        if (m && addr_in(a, m->data, RESERVE_BYTES))
            trap_with(i, wasm_rt_strerror(WASM_RT_TRAP_OOB));
        if (addr_in(a, i->stack, PIE_RT_STACK_GUARD))
            stack_fault(i, ucv);
    }
    /* Not an inferlet fault: crash the way we would without a handler. */
    signal(sig, SIG_DFL);
}

static void cpu_handler(int sig, siginfo_t *si, void *ucv)
{
    (void)sig; (void)si; (void)ucv;
    int saved = errno;
    pie_rt_instance *i = tls_cur;
    if (i && i->trap_jb && i->mod &&
        (atomic_load(&i->cpu_over) || atomic_load(&i->kill_req))) {
        if (i->in_guest) {
            if (atomic_load(&i->kill_req)) {
                char r[160];
                snprintf(r, sizeof r, "killed: %s", i->kill_reason);
                trap_with(i, r);
            }
            trap_with(i, "CPU time limit exceeded");
        }
    }
    errno = saved;
}

static pthread_once_t sig_once = PTHREAD_ONCE_INIT;

static void install_handlers(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    sa.sa_sigaction = cpu_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
    sigaction(PIE_RT_SIG_CPU, &sa, NULL);
}

void pie__rt_signals_init(void) { pthread_once(&sig_once, install_handlers); }

/* Gives the calling worker thread its own alternate signal stack. */
int pie__rt_thread_signals(pie_rt_worker *w)
{
    size_t sz = 64 << 10;
    void *p = mmap(NULL, sz, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return pie_err_set(PIE_ENOMEM, "sigaltstack: %s", strerror(errno));
    stack_t ss = {.ss_sp = p, .ss_size = sz, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) {
        munmap(p, sz);
        return pie_err_set(PIE_EIO, "sigaltstack: %s", strerror(errno));
    }
    w->altstack = p;
    return 0;
}

/* ---- init, types, exceptions -------------------------------------------- */

void wasm_rt_init(void) { pie__rt_signals_init(); rt_initialized = true; }
bool wasm_rt_is_initialized(void) { return rt_initialized; }
void wasm_rt_free(void) {}

typedef struct { uint32_t np, nr; wasm_rt_type_t t[]; } func_type;
static pthread_mutex_t types_lock = PTHREAD_MUTEX_INITIALIZER;
static func_type **types;
static uint32_t n_types, cap_types;

static uint32_t register_func_type(uint32_t params, uint32_t results,
                                   va_list ap);

/* Host code called from generated code (instantiate): takes types_lock. */
uint32_t wasm_rt_register_func_type(uint32_t params, uint32_t results, ...)
{
    int g = pie__rt_host_enter(tls_cur);
    va_list ap;
    va_start(ap, results);
    uint32_t id = register_func_type(params, results, ap);
    va_end(ap);
    pie__rt_host_leave(tls_cur, g);
    return id;
}

static uint32_t register_func_type(uint32_t params, uint32_t results,
                                   va_list ap)
{
    uint32_t n = params + results;
    func_type *ft = malloc(sizeof *ft + n * sizeof(wasm_rt_type_t));
    if (!ft)
        wasm_rt_trap(WASM_RT_TRAP_EXHAUSTION);
    ft->np = params;
    ft->nr = results;
    for (uint32_t k = 0; k < n; k++)
        ft->t[k] = va_arg(ap, int);
    pthread_mutex_lock(&types_lock);
    for (uint32_t k = 0; k < n_types; k++) {
        if (types[k]->np == params && types[k]->nr == results &&
            !memcmp(types[k]->t, ft->t, n * sizeof(wasm_rt_type_t))) {
            pthread_mutex_unlock(&types_lock);
            free(ft);
            return k + 1;
        }
    }
    if (n_types == cap_types) {
        uint32_t c = cap_types ? 2 * cap_types : 64;
        func_type **t = realloc(types, c * sizeof *t);
        if (!t) {
            pthread_mutex_unlock(&types_lock);
            free(ft);
            wasm_rt_trap(WASM_RT_TRAP_EXHAUSTION);
        }
        types = t;
        cap_types = c;
    }
    types[n_types++] = ft;
    uint32_t id = n_types;
    pthread_mutex_unlock(&types_lock);
    return id;
}

static atomic_uint next_tag;
uint32_t wasm_rt_register_tag(uint32_t size) { (void)size; return ++next_tag; }
void wasm_rt_load_exception(uint32_t tag, uint32_t size, const void *values)
{
    (void)tag; (void)size; (void)values;
}
void wasm_rt_throw(void) { wasm_rt_trap(WASM_RT_TRAP_UNCAUGHT_EXCEPTION); }
static __thread WASM_RT_UNWIND_TARGET *tls_unwind;
WASM_RT_UNWIND_TARGET *wasm_rt_get_unwind_target(void) { return tls_unwind; }
void wasm_rt_set_unwind_target(WASM_RT_UNWIND_TARGET *t) { tls_unwind = t; }
uint32_t wasm_rt_exception_tag(void) { return 0; }
uint32_t wasm_rt_exception_size(void) { return 0; }
void *wasm_rt_exception(void) { return NULL; }

/* ---- linear memory ------------------------------------------------------ */

/* Pages the running instance may have: its memory_limit less what its
 * tables hold. */
static uint32_t page_cap(void)
{
    pie_rt_instance *i = tls_cur;
    uint64_t lim = i ? i->rt->o.memory_limit : (1ull << 30);
    lim = i && i->table_bytes < lim ? lim - i->table_bytes : i ? 0 : lim;
    uint64_t p = lim / PAGE_BYTES;
    return p > 65536 ? 65536 : (uint32_t)p;
}

/* Freed reservations are kept for reuse, their committed prefix zeroed and
 * left read-write: mmap/munmap of 8 GiB and every mprotect that removes
 * access (a TLB shootdown across all threads) cost far more than a memset.
 * A reused reservation is trimmed or extended to the new initial size, so
 * exactly [0, size) is accessible. Bounded, so mappings stay flat. */
#define POOL_MAX 64
#define POOL_MEMSET_MAX (1u << 20)
typedef struct { uint8_t *p; uint64_t committed; } pooled;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pooled pool[POOL_MAX];
static int n_pool;

/* A reservation with exactly [0, bytes) read-write and zero, or NULL. */
static uint8_t *reserve(uint64_t bytes)
{
    pooled e = {NULL, 0};
    pthread_mutex_lock(&pool_lock);
    for (int k = n_pool - 1; k >= 0; k--)
        if (pool[k].committed == bytes || k == 0) {
            e = pool[k];
            pool[k] = pool[--n_pool];
            break;
        }
    pthread_mutex_unlock(&pool_lock);
    if (!e.p) {
        void *p = mmap(NULL, RESERVE_BYTES, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
        e.p = p;
    }
    int rc = 0;
    if (e.committed < bytes)
        rc = mprotect(e.p + e.committed, bytes - e.committed,
                      PROT_READ | PROT_WRITE);
    else if (e.committed > bytes)
        rc = mprotect(e.p + bytes, e.committed - bytes, PROT_NONE);
    if (rc != 0) {
        munmap(e.p, RESERVE_BYTES);
        return NULL;
    }
    return e.p;
}

static void release(uint8_t *p, uint64_t committed)
{
    pthread_mutex_lock(&pool_lock);
    bool full = n_pool == POOL_MAX;
    pthread_mutex_unlock(&pool_lock);
    if (!full) {
        if (committed <= POOL_MEMSET_MAX)
            memset(p, 0, committed);
        else
            madvise(p, committed, MADV_DONTNEED);
        pthread_mutex_lock(&pool_lock);
        if (n_pool < POOL_MAX) {
            pool[n_pool++] = (pooled){p, committed};
            p = NULL;
        }
        pthread_mutex_unlock(&pool_lock);
    }
    if (p)
        munmap(p, RESERVE_BYTES);
}

void wasm_rt_allocate_memory(wasm_rt_memory_t *m, uint32_t initial,
                             uint32_t max_pages)
{
    int g = pie__rt_host_enter(tls_cur);    /* takes pool_lock */
    memset(m, 0, sizeof *m);
    uint32_t cap = page_cap();
    if (max_pages > cap)
        max_pages = cap;
    if (initial > max_pages)
        trap_with(tls_cur, "memory limit: the module's initial memory "
                           "exceeds the per-instance cap");
    uint64_t bytes = (uint64_t)initial * PAGE_BYTES;
    uint8_t *p = reserve(bytes);
    if (!p)
        trap_with(tls_cur, "out of address space for linear memory");
    m->data = p;
    m->pages = initial;
    m->max_pages = max_pages;
    m->size = (uint32_t)(bytes > UINT32_MAX ? UINT32_MAX : bytes);
    pie__rt_host_leave(tls_cur, g);
}

/* Host code (in_guest 0) from the check to the new size: a CPU-limit or
 * kill signal landing between the mprotect and m->pages would otherwise
 * unwind with a page read-write that the pool's records do not count, and
 * a later instance reusing the reservation would reach it without a trap
 * (and see this one's bytes). */
PIE_RT_ENTRY uint32_t wasm_rt_grow_memory(wasm_rt_memory_t *m, uint32_t delta)
{
    pie__rt_entry_check(tls_cur, PIE_RT_HOST_STACK);
    uint32_t old = m->pages;
    if (delta == 0)
        return old;
    pie_rt_instance *i = tls_cur;
    int g = pie__rt_host_enter(i);
    uint32_t r = (uint32_t)-1;
    uint64_t nb = (uint64_t)(old + (uint64_t)delta) * PAGE_BYTES;
    uint64_t ob = (uint64_t)old * PAGE_BYTES;
    if ((uint64_t)old + delta <= m->max_pages &&
        !(i && nb + i->table_bytes > i->rt->o.memory_limit) &&
        mprotect(m->data + ob, nb - ob, PROT_READ | PROT_WRITE) == 0) {
        m->pages = old + delta;
        /* 65536 pages = 4 GiB does not fit u32: clamp; bounds live in
         * guards. */
        m->size = (uint32_t)(nb > UINT32_MAX ? UINT32_MAX : nb);
        r = old;
    }
    pie__rt_host_leave(i, g);
    return r;
}

void wasm_rt_free_memory(wasm_rt_memory_t *m)
{
    int g = pie__rt_host_enter(tls_cur);
    if (m->data)
        release(m->data, (uint64_t)m->pages * PAGE_BYTES);
    m->data = NULL;
    pie__rt_host_leave(tls_cur, g);
}

/* ---- tables ------------------------------------------------------------- */

/* Initial tables are capped like grown ones: each element is host memory,
 * allocated and written here, however small the module that asks. Table
 * bytes are charged, with linear memory, to the instance's memory_limit
 * (i->table_bytes; page_cap and wasm_rt_grow_memory count them too), and
 * the loader caps the number of tables, so tables cannot escape the limit.
 * Each function brackets itself with pie__rt_host_enter: calloc/realloc
 * take malloc's locks. */
static uint64_t mem_bytes(pie_rt_instance *i)
{
    const wasm_rt_memory_t *m = i ? i->mem : NULL;
    return m ? (uint64_t)m->pages * PAGE_BYTES : 0;
}

/* Whether `more` table bytes fit the instance's memory limit. */
static bool table_charge_ok(pie_rt_instance *i, uint64_t more)
{
    return !i || i->table_bytes + more + mem_bytes(i) <= i->rt->o.memory_limit;
}

#define TABLE_IMPL(type, null)                                                \
    void wasm_rt_allocate_##type##_table(wasm_rt_##type##_table_t *t,        \
                                         uint32_t n, uint32_t max)           \
    {                                                                         \
        pie_rt_instance *i = tls_cur;                                         \
        int g = pie__rt_host_enter(i);                                        \
        uint64_t bytes = (uint64_t)n * sizeof(wasm_rt_##type##_t);            \
        if (n > TABLE_MAX)                                                    \
            pie_rt_trap(i, "table limit: the module's initial " #type         \
                        " table has %u elements, the cap is %u", n,           \
                        TABLE_MAX);                                           \
        if (!table_charge_ok(i, bytes))                                       \
            pie_rt_trap(i, "table limit: the module's tables need more than " \
                        "the instance's memory limit of %llu bytes",          \
                        (unsigned long long)i->rt->o.memory_limit);           \
        t->size = n;                                                          \
        t->max_size = max;                                                    \
        t->data = n ? calloc(n, sizeof(wasm_rt_##type##_t)) : NULL;          \
        if (n && !t->data)                                                    \
            trap_with(i, "out of memory allocating a table");                \
        for (uint32_t k = 0; k < n; k++)                                      \
            t->data[k] = null;                                                \
        if (i)                                                                \
            i->table_bytes += bytes;                                          \
        pie__rt_host_leave(i, g);                                             \
    }                                                                         \
    void wasm_rt_free_##type##_table(wasm_rt_##type##_table_t *t)            \
    {                                                                         \
        int g = pie__rt_host_enter(tls_cur);                                  \
        free(t->data);                                                        \
        t->data = NULL;                                                       \
        pie__rt_host_leave(tls_cur, g);                                       \
    }                                                                         \
    PIE_RT_ENTRY uint32_t wasm_rt_grow_##type##_table(                       \
        wasm_rt_##type##_table_t *t, uint32_t delta, wasm_rt_##type##_t init) \
    {                                                                         \
        pie_rt_instance *i = tls_cur;                                         \
        pie__rt_entry_check(i, PIE_RT_HOST_STACK);                            \
        uint32_t old = t->size;                                               \
        uint64_t n = (uint64_t)old + delta;                                   \
        uint64_t more = (uint64_t)delta * sizeof(wasm_rt_##type##_t);         \
        if (n > t->max_size || n > TABLE_MAX || !table_charge_ok(i, more))    \
            return (uint32_t)-1;                                              \
        if (delta == 0)                                                       \
            return old;                                                       \
        int g = pie__rt_host_enter(i);                                        \
        wasm_rt_##type##_t *d = realloc(t->data, n * sizeof *d);             \
        if (d) {                                                              \
            for (uint64_t k = old; k < n; k++)                                \
                d[k] = init;                                                  \
            t->data = d;                                                      \
            t->size = (uint32_t)n;                                            \
            if (i)                                                            \
                i->table_bytes += more;                                       \
        }                                                                     \
        pie__rt_host_leave(i, g);                                             \
        return d ? old : (uint32_t)-1;                                        \
    }

TABLE_IMPL(funcref, wasm_rt_funcref_null_value)
TABLE_IMPL(externref, wasm_rt_externref_null_value)
