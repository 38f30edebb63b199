/* opts.c — option parsing for pie's subcommands (see opts.h). */
#include "cli/opts.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const pie_opt *find_long(const pie_opt *o, const char *name, size_t n)
{
    for (; o->name; o++)
        if (strlen(o->name) == n && strncmp(o->name, name, n) == 0) return o;
    return NULL;
}

static const pie_opt *find_short(const pie_opt *o, char c)
{
    for (; o->name; o++)
        if (o->shrt == c) return o;
    return NULL;
}

/* Stores text into the option's variable; returns 0 or -1 (message printed). */
static int opt_store(const pie_cmd_usage *u, const pie_opt *o, const char *v,
                     const char *from)
{
    char *end = NULL;
    errno = 0;
    switch (o->type) {
    case OPT_STR: *(const char **)o->ptr = v; return 0;
    case OPT_FLAG:
        if (!v) { *(bool *)o->ptr = true; return 0; }
        if (!strcmp(v, "1") || !strcmp(v, "true") || !strcmp(v, "yes")) {
            *(bool *)o->ptr = true; return 0;
        }
        if (!strcmp(v, "0") || !strcmp(v, "false") || !strcmp(v, "no")) {
            *(bool *)o->ptr = false; return 0;
        }
        break;
    case OPT_INT: {
        long x = strtol(v, &end, 10);
        if (!errno && end != v && !*end && x >= -2147483647L && x <= 2147483647L) {
            *(int *)o->ptr = (int)x; return 0;
        }
        break;
    }
    case OPT_U64: {
        /* strtoull takes "-1" as 2^64-1: refuse a sign after the blanks */
        const char *s = v;
        while (isspace((unsigned char)*s)) s++;
        if (*s == '-') break;
        unsigned long long x = strtoull(v, &end, 10);
        if (!errno && end != v && !*end) { *(uint64_t *)o->ptr = x; return 0; }
        break;
    }
    case OPT_FLOAT: {
        float x = strtof(v, &end);
        if (!errno && end != v && !*end && isfinite(x)) {
            *(float *)o->ptr = x; return 0;
        }
        break;
    }
    }
    static const char *const want[] = {
        [OPT_STR] = "", [OPT_FLAG] = ": expected true or false",
        [OPT_INT] = ": expected a whole number in -2147483647..2147483647",
        [OPT_FLOAT] = ": expected a finite number",
        [OPT_U64] = ": expected a whole number >= 0",
    };
    fprintf(stderr, "pie %s: invalid value '%s' for --%s (from %s)%s\n",
            u->name, v ? v : "", o->name, from, want[o->type]);
    return -1;
}

static int apply_env(const pie_cmd_usage *u)
{
    for (const pie_opt *o = u->opts; o->name; o++) {
        char env[128] = "PIE_";
        size_t k = 4;
        for (const char *p = o->name; *p && k < sizeof env - 1; p++)
            env[k++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
        env[k] = 0;
        const char *v = getenv(env);
        if (v && opt_store(u, o, v, env) != 0) return -1;
    }
    return 0;
}

/* Handles one "--name[=v]" or "-x" at argv[*i]; advances *i past a value. */
static int parse_one(const pie_cmd_usage *u, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    const pie_opt *o;
    const char *val = NULL;
    if (a[1] == '-') {
        const char *eq = strchr(a + 2, '=');
        size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        o = find_long(u->opts, a + 2, n);
        if (eq) val = eq + 1;
    } else {
        o = a[2] ? NULL : find_short(u->opts, a[1]);
    }
    if (!o) {
        fprintf(stderr, "pie %s: unknown option '%s' (see pie %s --help)\n",
                u->name, a, u->name);
        return -1;
    }
    if (o->type != OPT_FLAG && !val) {
        if (*i + 1 >= argc) {
            fprintf(stderr, "pie %s: option --%s needs a value\n", u->name,
                    o->name);
            return -1;
        }
        val = argv[++*i];
    }
    return opt_store(u, o, val, "command line");
}

int pie_opts_parse(const pie_cmd_usage *u, int argc, char **argv, char **pos,
                   int max_pos, int *npos, int *dashdash)
{
    *npos = 0;
    *dashdash = -1;
    if (apply_env(u) != 0) return -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (*dashdash < 0 && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
            pie_opts_usage(u, stdout);
            return 1;
        }
        if (!strcmp(a, "--") && *dashdash < 0) {
            *dashdash = *npos;
            continue;
        }
        if (*dashdash < 0 && a[0] == '-' && a[1] && !isdigit((unsigned char)a[1])) {
            if (parse_one(u, argc, argv, &i) != 0) return -1;
            continue;
        }
        if (*npos >= max_pos) {
            fprintf(stderr, "pie %s: too many arguments\n", u->name);
            return -1;
        }
        pos[(*npos)++] = argv[i];
    }
    if (*dashdash < 0) *dashdash = *npos;
    return 0;
}

void pie_opts_usage(const pie_cmd_usage *u, FILE *f)
{
    fprintf(f, "usage: pie %s %s\n\n%s\n\noptions:\n", u->name, u->synopsis,
            u->about);
    for (const pie_opt *o = u->opts; o->name; o++) {
        char left[64];
        const char *arg = o->type == OPT_FLAG ? "" : o->type == OPT_STR ? " S"
                        : o->type == OPT_FLOAT ? " X" : " N";
        if (o->shrt)
            snprintf(left, sizeof left, "-%c, --%s%s", o->shrt, o->name, arg);
        else
            snprintf(left, sizeof left, "    --%s%s", o->name, arg);
        fprintf(f, "  %-28s %s\n", left, o->help);
    }
    fprintf(f, "  %-28s %s\n", "-h, --help", "show this help");
    fprintf(f, "\nEvery option can also be set by an environment variable "
               "PIE_<NAME> (e.g. PIE_MODEL).\n");
}
