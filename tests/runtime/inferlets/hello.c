/* hello: prints its argv, returns argv[1] as return value and exits with
 * status atoi(argv[2]). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie_api.h"

int main(int argc, char **argv)
{
    printf("hello");
    for (int k = 1; k < argc; k++)
        printf(" %s", argv[k]);
    printf(" argc=%d id_ok=%d\n", argc, pie_instance_id() > 0);
    fprintf(stderr, "to stderr %.2f\n", 3.25);
    char buf[64];
    int n = pie_arg_get(1, buf, sizeof buf);
    if (n >= 0)
        pie_set_return(buf, n < 64 ? n : 64);
    if (pie_arg_count() != argc || pie_arg_get(argc, buf, 4) != PIE_ERANGE)
        return 99;
    if (argc > 3 && !strcmp(argv[3], "exit"))
        pie_exit(atoi(argv[2]) + 1);
    return argc > 2 ? atoi(argv[2]) : 0;
}
