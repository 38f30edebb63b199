/*
 * lm.c — SDK basics: the last error message, opened models and their
 * facts, text <-> ids, growing buffers and JSON strings.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

static char err_msg[256];

const char *pie_sdk_error(void) { return err_msg; }

int pie_sdk_fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return code;
}

int pie_lm_open(pie_lm *m, const char *name)
{
    memset(m, 0, sizeof *m);
    uint32_t len = name ? (uint32_t)strlen(name) : 0;
    int32_t h = pie_model_open(len ? name : "", len);
    if (h < 0)
        return pie_sdk_fail(h, "cannot open model '%s' (%d)",
                            len ? name : "(default)", h);
    m->h = h;
    m->vocab = pie_model_vocab_size(h);
    m->page_size = pie_model_page_size(h);
    m->bos = pie_model_bos_id(h);
    int32_t n = pie_model_eos_ids(h, m->eos, PIE_SDK_MAX_EOS);
    m->n_eos = n < 0 ? 0 : n > PIE_SDK_MAX_EOS ? PIE_SDK_MAX_EOS : n;
    int32_t nl = pie_model_name(h, m->name, sizeof m->name - 1);
    m->name[nl < 0 ? 0 : nl < (int32_t)sizeof m->name ? nl
                                  : (int32_t)sizeof m->name - 1] = 0;
    if (m->vocab <= 0 || m->page_size <= 0) {
        int32_t v = m->vocab, ps = m->page_size;
        pie_lm_close(m);
        return pie_sdk_fail(PIE_EINVAL, "model reports vocab %d, page size %d",
                            v, ps);
    }
    return 0;
}

void pie_lm_close(pie_lm *m)
{
    if (m->h > 0) pie_model_close(m->h);
    m->h = 0;
}

bool pie_lm_is_eos(const pie_lm *m, int32_t id)
{
    for (int32_t i = 0; i < m->n_eos; i++)
        if (m->eos[i] == id) return true;
    return false;
}

void pie_lm_add_eos(pie_lm *m, int32_t id)
{
    if (id >= 0 && !pie_lm_is_eos(m, id) && m->n_eos < PIE_SDK_MAX_EOS)
        m->eos[m->n_eos++] = id;
}

/* Largest element count whose byte size (count * elem, plus one) fits
 * size_t and uint32_t: buffers the host fills are addressed with 32 bits,
 * and size_t is 32 bits on wasm32, where count * elem would wrap. */
static uint32_t max_elems(size_t elem)
{
    size_t lim = (SIZE_MAX < UINT32_MAX ? SIZE_MAX : UINT32_MAX) - 1;
    return (uint32_t)(lim / elem);
}

int pie_lm_encode(const pie_lm *m, const char *text, size_t len,
                  bool add_special, int32_t **ids)
{
    *ids = NULL;
    if (len > max_elems(sizeof(int32_t)) - 8)
        return pie_sdk_fail(PIE_ENOMEM, "text of %zu bytes is too long to "
                            "encode", len);
    uint32_t cap = (uint32_t)len + 8;
    for (int tries = 0; tries < 2; tries++) {
        if (cap > max_elems(sizeof(int32_t)))
            return pie_sdk_fail(PIE_ENOMEM, "tokenize needs %u ids, too "
                                "many for memory", cap);
        int32_t *v = malloc(sizeof(int32_t) * (size_t)cap);
        if (!v) return pie_sdk_fail(PIE_ENOMEM, "out of memory encoding");
        int32_t n = pie_tokenize(m->h, text, (uint32_t)len, add_special, v,
                                 cap);
        if (n < 0) {
            free(v);
            return pie_sdk_fail(n, "tokenize failed (%d)", n);
        }
        if ((uint32_t)n <= cap) {
            *ids = v;
            return n;
        }
        free(v);
        cap = (uint32_t)n;
    }
    return pie_sdk_fail(PIE_EINVAL, "tokenize gave inconsistent lengths");
}

int pie_lm_decode(const pie_lm *m, const int32_t *ids, int32_t n,
                  bool skip_special, char **text)
{
    *text = NULL;
    if (n < 0) return pie_sdk_fail(PIE_EINVAL, "decode of %d ids", n);
    /* a first guess (8 bytes an id), capped; the host tells the exact
     * length when it is longer */
    uint64_t guess = (uint64_t)n * 8 + 16;
    uint32_t cap = guess > (1u << 24) ? 1u << 24 : (uint32_t)guess;
    for (int tries = 0; tries < 2; tries++) {
        if (cap > max_elems(1))
            return pie_sdk_fail(PIE_ENOMEM, "detokenize needs %u bytes, too "
                                "many for memory", cap);
        char *s = malloc((size_t)cap + 1);
        if (!s) return pie_sdk_fail(PIE_ENOMEM, "out of memory decoding");
        int32_t len = pie_detokenize(m->h, ids, (uint32_t)n, skip_special, s,
                                     cap);
        if (len < 0) {
            free(s);
            return pie_sdk_fail(len, "detokenize failed (%d)", len);
        }
        if ((uint32_t)len <= cap) {
            s[len] = 0;
            *text = s;
            return len;
        }
        free(s);
        cap = (uint32_t)len;
    }
    return pie_sdk_fail(PIE_EINVAL, "detokenize gave inconsistent lengths");
}

int32_t pie_wait_free(int32_t fut)
{
    int32_t st = pie_future_wait(fut);
    pie_future_free(fut);
    return st;
}

int pie_send_str(const char *s) { return pie_send(s, (uint32_t)strlen(s)); }

int pie_buf_append(char **buf, size_t *len, size_t *cap, const char *s,
                   size_t n)
{
    if (n > SIZE_MAX - 1 - *len)
        return pie_sdk_fail(PIE_ENOMEM, "out of memory (buffer of %zu + %zu "
                            "bytes)", *len, n);
    if (*len + n + 1 > *cap) {
        size_t nc = *cap ? *cap : 64;
        while (nc < *len + n + 1)
            nc = nc > SIZE_MAX / 2 ? *len + n + 1 : nc * 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return pie_sdk_fail(PIE_ENOMEM, "out of memory");
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

int pie_json_str(char **buf, size_t *len, size_t *cap, const char *s,
                 size_t n)
{
    int rc = pie_buf_append(buf, len, cap, "\"", 1);
    for (size_t i = 0; i < n && rc == 0; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c;
            rc = pie_buf_append(buf, len, cap, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            rc = pie_buf_append(buf, len, cap, esc, 6);
        } else {
            rc = pie_buf_append(buf, len, cap, (const char *)&s[i], 1);
        }
    }
    return rc ? rc : pie_buf_append(buf, len, cap, "\"", 1);
}

int pie_json_ids_text(char **buf, size_t *len, size_t *cap,
                      const int32_t *ids, int32_t n, const char *text,
                      size_t text_len)
{
    char num[16];
    int rc = pie_buf_append(buf, len, cap, "\"ids\":[", 7);
    for (int32_t i = 0; i < n && rc == 0; i++) {
        int k = snprintf(num, sizeof num, "%s%d", i ? "," : "", ids[i]);
        rc = pie_buf_append(buf, len, cap, num, (size_t)k);
    }
    if (rc == 0) rc = pie_buf_append(buf, len, cap, "],\"text\":", 9);
    return rc ? rc : pie_json_str(buf, len, cap, text ? text : "",
                                  text ? text_len : 0);
}
