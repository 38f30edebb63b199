/*
 * args.c — a small --name VALUE / --name=VALUE parser for inferlets'
 * main(argc, argv), driven by a table like the CLI's.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

static void usage(const char *prog, const pie_arg *a, const char *about)
{
    printf("usage: %s [OPTIONS]\n%s%s\n", prog, about ? about : "",
           about ? "\n" : "");
    for (; a->name; a++)
        printf("  --%-16s %s\n", a->name, a->help ? a->help : "");
}

static int set_value(const pie_arg *a, const char *v)
{
    char *end;
    errno = 0;
    switch (a->type) {
    case PIE_ARG_STR:
        *(const char **)a->ptr = v;
        return 0;
    case PIE_ARG_INT: {
        long x = strtol(v, &end, 10);
        if (*end || end == v || errno || x < -2147483647L || x > 2147483647L)
            return -1;
        *(int32_t *)a->ptr = (int32_t)x;
        return 0;
    }
    case PIE_ARG_FLOAT: {
        float x = strtof(v, &end);
        if (*end || end == v || errno) return -1;
        *(float *)a->ptr = x;
        return 0;
    }
    case PIE_ARG_U64: {
        unsigned long long x = strtoull(v, &end, 10);
        if (*end || end == v || errno || *v == '-') return -1;
        *(uint64_t *)a->ptr = x;
        return 0;
    }
    default:
        return -1;
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
        if (a->type == PIE_ARG_FLAG) {
            *(bool *)a->ptr = true;
            continue;
        }
        const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!v || set_value(a, v)) {
            fprintf(stderr, "%s: bad or missing value for --%s\n", prog,
                    a->name);
            return -1;
        }
    }
    return 0;
}
