;; A start section that passes a valid pointer to a host call: linear
;; memory must be known to the host before _start.
(module
  (import "wasi_snapshot_preview1" "random_get" (func $r (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $rc (mut i32) (i32.const -1))
  (func $s (global.set $rc (call $r (i32.const 0) (i32.const 8))))
  (start $s)
  (func (export "_start") (call $exit (i32.add (global.get $rc) (i32.const 7)))))
