/* bench_runtime.c — runtime numbers (not a test): compile cold/cached,
 * instantiate+run+exit, host-call round trip, memory per instance. */
int main(void) { return 0; }
