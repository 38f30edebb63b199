;; The smallest useful inferlet: waits for one message, then exits.
;; With argv[1] given... no libc: measures the runtime's own per-instance cost.
(module
  (import "pie" "receive" (func $recv (result i32)))
  (import "pie" "future_wait" (func $wait (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $wait (call $recv)))))
