(module
  (import "env" "system" (func $s (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $s (i32.const 0)))))
