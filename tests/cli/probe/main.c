/*
 * probe — test inferlet for how `pie run` reports an instance's end:
 *
 *   probe exit N    returns N from main: any int, such as 256 (a shell
 *                   would read its low byte, 0) or -10 (PIE_ETRAP's value)
 *   probe trap      traps (unreachable)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "exit"))
        return atoi(argv[2]);
    if (argc == 2 && !strcmp(argv[1], "trap"))
        __builtin_trap();
    fprintf(stderr, "usage: probe exit N | probe trap\n");
    return 2;
}
