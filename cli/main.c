/*
 * main.c — the `pie` command: dispatches to one subcommand per file
 * (cmd_*.c). Every subcommand accepts --help.
 */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"

typedef struct {
    const char *name;
    int (*fn)(int, char **);
    const char *about;
} pie_subcmd;

static const pie_subcmd cmds[] = {
    { "generate",   pie_cmd_generate,   "generate text from a prompt (no inferlet)" },
    { "tokenize",   pie_cmd_tokenize,   "print the token ids of a text" },
    { "detokenize", pie_cmd_detokenize, "print the text of token ids" },
    { "bench",      pie_cmd_bench,      "benchmarks (bench forward, bench generate)" },
    { "run",        pie_cmd_run,        "run an inferlet on a model in this process" },
    { "build",      pie_cmd_build,      "compile a C inferlet to .wasm with the SDK" },
};

static void usage(FILE *f)
{
    fprintf(f, "usage: pie COMMAND [OPTIONS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        fprintf(f, "  %-12s %s\n", cmds[i].name, cmds[i].about);
    fprintf(f, "\n'pie COMMAND --help' describes a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(argv[1], cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "pie: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
