/* pie_err.c — thread-local error messages (see pie_err.h). */
#include "pie_err.h"

#include <stdarg.h>
#include <string.h>

#define PIE_ERR_MSG_MAX 1024

static _Thread_local char err_msg[PIE_ERR_MSG_MAX];

int pie_err_set(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return code;
}

int pie_err_wrap(int code, const char *fmt, ...)
{
    char prefix[PIE_ERR_MSG_MAX], old[PIE_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err_msg, sizeof old);
    size_t n = strnlen(prefix, sizeof prefix - 1);
    memcpy(err_msg, prefix, n);
    if (n + 2 < sizeof err_msg) {
        err_msg[n++] = ':';
        err_msg[n++] = ' ';
    }
    size_t m = strnlen(old, sizeof old);
    if (m > sizeof err_msg - 1 - n) m = sizeof err_msg - 1 - n;
    memcpy(err_msg + n, old, m);
    err_msg[n + m] = 0;
    return code;
}

const char *pie_err_msg(void) { return err_msg; }
void pie_err_clear(void) { err_msg[0] = 0; }

const char *pie_err_name(int code)
{
    switch (code) {
    case PIE_OK: return "OK";
    case PIE_EINVAL: return "EINVAL";
    case PIE_ENOMEM: return "ENOMEM";
    case PIE_EIO: return "EIO";
    case PIE_EFORMAT: return "EFORMAT";
    case PIE_EUNSUPPORTED: return "EUNSUPPORTED";
    case PIE_ENOTFOUND: return "ENOTFOUND";
    case PIE_ERANGE: return "ERANGE";
    case PIE_EBUSY: return "EBUSY";
    case PIE_ECANCELED: return "ECANCELED";
    case PIE_ETRAP: return "ETRAP";
    case PIE_ELIMIT: return "ELIMIT";
    case PIE_EAGAIN: return "EAGAIN";
    case PIE_EDEVICE: return "EDEVICE";
    case PIE_EPERM: return "EPERM";
    case PIE_EDEVLOST: return "EDEVLOST";
    default: return "E?";
    }
}
