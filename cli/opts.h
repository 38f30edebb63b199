/*
 * opts.h — declarative command-line options for pie's subcommands.
 *
 * Each subcommand describes its options in a table of pie_opt. The parser
 * fills the target variables from, in increasing precedence: the default
 * already stored in the variable, the environment variable PIE_<NAME>
 * (upper-cased, '-' -> '_'), and the command line (--name VALUE or
 * --name=VALUE; flags take no value). Arguments that are not options are
 * collected as positionals; "--" ends option parsing (the rest are
 * positionals too, and *dashdash is set to their start).
 *
 * Values are checked for form only: OPT_INT must fit an int, OPT_U64 takes
 * no sign ("-1" would wrap to 2^64-1), OPT_FLOAT must be finite (no "nan",
 * "inf"). Ranges are the command's to check (pie_cli_check_int in cli.h).
 */
#ifndef PIE_CLI_OPTS_H
#define PIE_CLI_OPTS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

typedef enum { OPT_STR, OPT_INT, OPT_FLOAT, OPT_FLAG, OPT_U64 } pie_opt_type;

typedef struct pie_opt {
    const char  *name;     /* long name without "--"                    */
    char         shrt;     /* short letter or 0                         */
    pie_opt_type type;
    void        *ptr;      /* const char **, int *, float *, bool *, uint64_t * */
    const char  *help;
} pie_opt;

typedef struct pie_cmd_usage {
    const char    *name;     /* "generate"                               */
    const char    *synopsis; /* "--model DIR (--prompt TEXT | ...)"       */
    const char    *about;    /* one paragraph                             */
    const pie_opt *opts;     /* terminated by a {0} entry                 */
} pie_cmd_usage;

/*
 * Parses argv[1..argc) for command u. Positionals (and everything after
 * "--") are stored in pos[0..*npos) (max_pos capacity); *dashdash is the
 * index in pos of the first argument after "--" (or *npos if none).
 * Returns 0, 1 when --help was printed, or -1 after printing an error.
 */
int  pie_opts_parse(const pie_cmd_usage *u, int argc, char **argv,
                    char **pos, int max_pos, int *npos, int *dashdash);
void pie_opts_usage(const pie_cmd_usage *u, FILE *f);

#endif
