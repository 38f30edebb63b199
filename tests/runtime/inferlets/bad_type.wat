(module
  (import "pie" "send" (func $s (param i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $s (i64.const 0) (i32.const 0)))))
