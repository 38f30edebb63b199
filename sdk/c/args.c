/*
 * args.c — a small --name VALUE / --name=VALUE parser for inferlets'
 * main(argc, argv), driven by a table like the CLI's.
 *
 * Values are parsed strictly: a number is the whole string, with no
 * leading space (strtol would skip it) and no sign for PIE_ARG_U64; a
 * float is finite. A flag takes no value (--json) or an explicit boolean
 * (--json=false; true/false, 1/0, yes/no, on/off).
 */
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pie.h"

static void usage(const char *prog, const pie_arg *a, const char *about)
{
    printf("usage: %s [OPTIONS]\n%s%s\n", prog, about ? about : "",
           about ? "\n" : "");
    for (; a->name; a++)
        printf("  --%-16s %s\n", a->name, a->help ? a->help : "");
}

/* A flag's explicit value; 0 or -1 if v is not a boolean. */
static int flag_value(const char *v, bool *out)
{
    static const char *const t[] = { "true", "1", "yes", "on" };
    static const char *const f[] = { "false", "0", "no", "off" };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        if (!strcasecmp(v, t[i])) { *out = true; return 0; }
        if (!strcasecmp(v, f[i])) { *out = false; return 0; }
    }
    return -1;
}

/* Parses v into a's variable; 0, or -1 with a's variable unchanged. */
static int set_value(const pie_arg *a, const char *v)
{
    char *end;
    if (a->type == PIE_ARG_STR) {
        *(const char **)a->ptr = v;
        return 0;
    }
    if (a->type == PIE_ARG_FLAG) return flag_value(v, (bool *)a->ptr);
    if (!*v || isspace((unsigned char)*v)) return -1;
    errno = 0;
    switch (a->type) {
    case PIE_ARG_INT: {
        long x = strtol(v, &end, 10);
        if (*end || errno || x < -2147483647L || x > 2147483647L) return -1;
        *(int32_t *)a->ptr = (int32_t)x;
        return 0;
    }
    case PIE_ARG_FLOAT: {
        float x = strtof(v, &end);
        if (*end || errno || !(x >= -FLT_MAX && x <= FLT_MAX)) return -1;
        *(float *)a->ptr = x;
        return 0;
    }
    case PIE_ARG_U64: {
        if (!isdigit((unsigned char)*v)) return -1;   /* "-1", "+1" */
        unsigned long long x = strtoull(v, &end, 10);
        if (*end || errno) return -1;
        *(uint64_t *)a->ptr = x;
        return 0;
    }
    default:
        return -1;
    }
}

static const char *expected(pie_arg_type t)
{
    switch (t) {
    case PIE_ARG_INT:   return "an integer";
    case PIE_ARG_FLOAT: return "a finite number";
    case PIE_ARG_U64:   return "an unsigned integer";
    case PIE_ARG_FLAG:  return "no value, or true/false, 1/0, yes/no, on/off";
    default:            return "text";
    }
}

int pie_args_parse(int argc, char **argv, const pie_arg *args,
                   const char *about)
{
    const char *prog = argc > 0 ? argv[0] : "inferlet";
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            usage(prog, args, about);
            return 1;
        }
        if (strncmp(s, "--", 2)) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, s);
            return -1;
        }
        const char *eq = strchr(s + 2, '=');
        size_t nl = eq ? (size_t)(eq - s - 2) : strlen(s + 2);
        const pie_arg *a = args;
        while (a->name && (strlen(a->name) != nl || strncmp(a->name, s + 2, nl)))
            a++;
        if (!a->name) {
            fprintf(stderr, "%s: unknown option '%s' (try --help)\n", prog, s);
            return -1;
        }
        if (a->type == PIE_ARG_FLAG && !eq) {
            *(bool *)a->ptr = true;
            continue;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v) {
            fprintf(stderr, "%s: --%s needs a value (%s)\n", prog, a->name,
                    expected(a->type));
            return -1;
        }
        if (set_value(a, v)) {
            fprintf(stderr, "%s: bad value '%s' for --%s (expected %s)\n",
                    prog, v, a->name, expected(a->type));
            return -1;
        }
    }
    return 0;
}
