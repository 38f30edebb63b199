;; Unbounded recursion that uses no shadow stack: exhausts the native stack.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func $rec (param i32) (result i32)
    (i32.add (call $rec (i32.add (local.get 0) (i32.const 1))) (local.get 0)))
  (func (export "_start") (drop (call $rec (i32.const 0)))))
