/*
 * host_engine.h — served models for inferlets: the registry that the
 * `model`, `kv` and `forward` host functions (runtime/host_engine.c) use,
 * and the runtime hooks that give each instance its engine state.
 *
 * An embedder (pie run, pie serve) loads each model, creates its backend and
 * control layer, registers them here under a name (the first is the
 * default), and passes pie_engine_hooks() in pie_rt_opts.hooks. Each
 * instance then gets one control-layer client per model it uses, opened
 * with the engine's quotas; when the instance ends (exit, trap, kill) every
 * client is closed, which cancels its pending forwards and returns all its
 * pages. What its forwards keep until it frees their futures (results and
 * input copies) and its queued page copies are bounded per instance
 * (max_output_bytes).
 */
#ifndef PIE_HOST_ENGINE_H
#define PIE_HOST_ENGINE_H

#include "control/control.h"
#include "model/model.h"
#include "runtime/runtime.h"

#define PIE_ENGINE_MAX_MODELS 8

typedef struct pie_engine pie_engine;

typedef struct pie_engine_opts {
    pie_ctl_client_opts client;   /* quotas and priority per instance        */
    int32_t alloc_timeout_ms;     /* kv_alloc waits this long for a full
                                     pool (default 5000; < 0: fail at once) */
    uint64_t max_output_bytes;    /* what an instance's submitted forwards
                                     keep until their futures are freed:
                                     results (sampled tokens, probe values
                                     and ids) and input copies
                                     (pie_ctl_forward_bytes), and its
                                     page copies until they run
                                     (pie_ctl_copy_bytes each);
                                     forward_submit and kv_copy fail
                                     with PIE_ELIMIT past it (0 =
                                     default 256 MiB; at most the
                                     instance's memory limit)               */
} pie_engine_opts;

int  pie_engine_create(const pie_engine_opts *o, pie_engine **out);
/* Registers a served model (not owned: free ctl, then its backend and m,
 * after pie_engine_free and after the runtime is freed). */
int  pie_engine_add_model(pie_engine *e, const char *name, pie_model *m,
                          pie_ctl *ctl);
void pie_engine_free(pie_engine *e);
/* Hooks for pie_rt_opts.hooks. */
pie_rt_hooks pie_engine_hooks(pie_engine *e);

#endif
