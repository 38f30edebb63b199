/*
 * probe — test inferlet for how `pie run` reports an instance's end:
 *
 *   probe exit N    returns N from main: any int, such as 256 (a shell
 *                   would read its low byte, 0) or -10 (PIE_ETRAP's value)
 *   probe trap      traps (unreachable)
 *   probe outputs   submits one-token forwards with one LOGITS row each on
 *                   the default model and frees none, until a submit fails
 *                   (at most 4096), and prints "held N rc R" (N accepted,
 *                   R the failing code, 0 if none failed): how many the
 *                   instance's forward budget (--max-output-bytes) holds
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie.h"

static int outputs(void)
{
    int32_t m = pie_model_open(0, 0), pg, n = 0, rc = 0;
    if (m < 0 || pie_kv_alloc(m, 1, &pg) != 0) return 3;
    while (n < 4096) {
        int32_t tok = 1, pos = 0, f = pie_forward_new(m);
        pie_forward_tokens(f, &tok, &pos, 1);
        pie_forward_pages(f, &pg, 1, 1);
        pie_forward_output(f, 0, PIE_PROBE_LOGITS, 1, 0, 1, 0, 0);
        int32_t fut = pie_forward_submit(f);
        if (fut < 0) { rc = fut; break; }
        n++;                                   /* held: never freed */
    }
    printf("held %d rc %d\n", n, rc);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "outputs"))
        return outputs();
    if (argc == 3 && !strcmp(argv[1], "exit"))
        return atoi(argv[2]);
    if (argc == 2 && !strcmp(argv[1], "trap"))
        __builtin_trap();
    fprintf(stderr, "usage: probe exit N | probe trap | probe outputs\n");
    return 2;
}
