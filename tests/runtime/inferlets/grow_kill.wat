;; grow_kill: spins argv[1] * 1e7 iterations (argv[1] one digit), then grows
;; its memory a page at a time until memory.grow fails, then spins: a
;; CPU limit ends it somewhere, often inside a grow.
(module
  (import "pie" "arg_get" (func $arg (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32) (local $k i32)
    (drop (call $arg (i32.const 1) (i32.const 0) (i32.const 1)))
    (local.set $n (i32.mul (i32.sub (i32.load8_u (i32.const 0)) (i32.const 48))
                           (i32.const 10000000)))
    (block $d (loop $l (br_if $d (i32.ge_u (local.get $k) (local.get $n)))
      (local.set $k (i32.add (local.get $k) (i32.const 1))) (br $l)))
    (block $d2 (loop $g
      (br_if $d2 (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
      (br $g)))
    (loop $s (br $s))))
