;; Recurses DEPTH (argv[1]) frames deep, then runs OP (argv[2]) at the
;; bottom: "sqrt" f64.sqrt(-1) (a libm call with errno handling, unless
;; compiled with -fno-math-errno), "copy" a memory.copy (memmove),
;; "nearest" f64.nearest (nearbyint), "floor" f32.floor. Each may run libc
;; or libm code with the fiber's stack guard just below.
(module
  (import "pie" "arg_get" (func $arg (param i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $x (mut f64) (f64.const -1))
  (global $op (mut i32) (i32.const 0))
  (func $num (param $k i32) (result i32) (local $n i32) (local $i i32) (local $r i32)
    (local.set $n (call $arg (local.get $k) (i32.const 16) (i32.const 16)))
    (block $done (loop $l
      (br_if $done (i32.ge_s (local.get $i) (local.get $n)))
      (local.set $r (i32.add (i32.mul (local.get $r) (i32.const 10))
                    (i32.sub (i32.load8_u offset=16 (local.get $i)) (i32.const 48))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $r))
  (func $bottom (result f64)
    (if (result f64) (i32.eq (global.get $op) (i32.const 115))   ;; 's'
      (then (f64.sqrt (global.get $x)))
      (else
        (if (result f64) (i32.eq (global.get $op) (i32.const 99)) ;; 'c'
          (then (memory.copy (i32.const 4096) (i32.const 64) (i32.const 60000))
                (f64.const 0))
          (else
            (if (result f64) (i32.eq (global.get $op) (i32.const 110)) ;; 'n'
              (then (f64.nearest (global.get $x)))
              (else (f64.promote_f32 (f32.floor (f32.demote_f64 (global.get $x)))))))))))
  (func $f (param $d i32) (result f64)
    (if (result f64) (i32.eqz (local.get $d))
      (then (call $bottom))
      (else (f64.add (call $f (i32.sub (local.get $d) (i32.const 1))) (f64.const 1)))))
  (func (export "_start")
    (drop (call $arg (i32.const 2) (i32.const 0) (i32.const 1)))
    (global.set $op (i32.load8_u (i32.const 0)))
    (drop (call $f (call $num (i32.const 1))))))
