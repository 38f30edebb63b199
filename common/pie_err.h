/*
 * pie_err.h — error codes and the per-thread error message.
 *
 * Every fallible pie function returns int: 0 on success or a negative PIE_E*
 * code. The function that detects a problem records a human-readable message
 * with pie_err_set(); callers read it with pie_err_msg() and may prefix
 * context with pie_err_wrap(). The message lives in thread-local storage, so
 * it is valid until the next pie_err_set() on the same thread.
 *
 * PIE_ASSERT is for programmer errors only (broken invariants), never for bad
 * input: bad input returns an error.
 */
#ifndef PIE_ERR_H
#define PIE_ERR_H

#include <stdio.h>
#include <stdlib.h>

enum {
    PIE_OK           = 0,
    PIE_EINVAL       = -1,  /* bad argument                                */
    PIE_ENOMEM       = -2,  /* allocation failed                           */
    PIE_EIO          = -3,  /* read/write/open failed                      */
    PIE_EFORMAT      = -4,  /* malformed file or message                   */
    PIE_EUNSUPPORTED = -5,  /* valid but not supported (architecture ...)  */
    PIE_ENOTFOUND    = -6,  /* missing file, tensor, name                  */
    PIE_ERANGE       = -7,  /* index or size out of range                  */
    PIE_EBUSY        = -8,  /* resource in use / pool exhausted            */
    PIE_ECANCELED    = -9,  /* operation cancelled                         */
    PIE_ETRAP        = -10, /* an inferlet trapped                         */
    PIE_ELIMIT       = -11, /* a quota or limit was exceeded               */
    PIE_EAGAIN       = -12, /* not ready yet                               */
    PIE_EDEVICE      = -13, /* accelerator error                           */
    PIE_EPERM        = -14, /* not allowed                                 */
    PIE_EDEVLOST     = -15, /* the accelerator's context is lost: nothing  */
                            /* more runs on it until the process restarts */
};

/* Records a printf-style message for the current thread; returns code. */
int pie_err_set(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Prefixes the current message with "context: "; returns code. */
int pie_err_wrap(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The last message recorded on this thread ("" if none). */
const char *pie_err_msg(void);
/* Symbolic name of a code ("EINVAL"). */
const char *pie_err_name(int code);
void pie_err_clear(void);

#define PIE_ASSERT(x)                                                        \
    do {                                                                     \
        if (!(x)) {                                                          \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__,       \
                    __LINE__, #x);                                           \
            abort();                                                         \
        }                                                                    \
    } while (0)

#endif
