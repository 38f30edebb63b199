/* isolate MODE: misbehaves in one way (the runtime must end this instance
 * alone), or "compute N" which prints a checksum the test recomputes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pie_api.h"

static volatile int zero = 0;
static void *volatile sink;

__attribute__((noinline)) static int shadow(int d)
{
    volatile char big[4096];
    big[d % 4096] = (char)d;
    return shadow(d + 1) + big[0];
}

static uint32_t checksum(uint32_t n)
{
    uint32_t h = 2166136261u;
    for (uint32_t k = 0; k < n; k++)
        h = (h ^ (k * 2654435761u)) * 16777619u;
    return h;
}

int main(int argc, char **argv)
{
    const char *m = argc > 1 ? argv[1] : "";
    if (!strcmp(m, "compute")) {
        uint32_t n = (uint32_t)strtoul(argv[2], NULL, 10);
        printf("%u\n", checksum(n));
        return 0;
    }
    if (!strcmp(m, "oob_read")) {
        volatile uint8_t *p = (uint8_t *)(uintptr_t)0xfffffff0u;
        return *p;
    }
    if (!strcmp(m, "oob_write")) {
        volatile uint32_t *p = (uint32_t *)(uintptr_t)(300u << 20);
        *p = 1;
        return 0;
    }
    if (!strcmp(m, "shadow"))
        return shadow(0);
    if (!strcmp(m, "unreachable"))
        __builtin_trap();
    if (!strcmp(m, "div0"))
        return 10 / zero;
    if (!strcmp(m, "badptr"))
        return pie_send((const void *)(uintptr_t)0xffffff00u, 4096);
    if (!strcmp(m, "badhandle")) {
        int a = pie_future_wait(12345), b = pie_future_payload(-1, 0, 0);
        printf("%d %d\n", a, b);
        return a == PIE_EINVAL && b == PIE_EINVAL ? 0 : 1;
    }
    if (!strcmp(m, "memcap")) {
        size_t total = 0;
        for (;;) {
            void *p = malloc(1 << 20);
            if (!p)
                break;
            memset(p, 1, 1 << 20);
            *(void **)p = sink;          /* keep a list: malloc cannot be elided */
            sink = p;
            total += 1 << 20;
        }
        printf("malloc returned NULL after %zu MiB\n", total >> 20);
        return 0;
    }
    if (!strcmp(m, "spin")) {
        for (volatile uint64_t k = 0;; k++)
            ;
    }
    return 2;
}
