;; Recurses DEPTH (argv[1], decimal) frames deep, then returns. With a second
;; argument it first subscribes to topic "t", and at the bottom of the
;; recursion publishes 4 KiB to it: a host call that mallocs under the
;; runtime's lock, as close to the stack guard as DEPTH puts it.
(module
  (import "pie" "arg_count" (func $argc (result i32)))
  (import "pie" "arg_get" (func $arg (param i32 i32 i32) (result i32)))
  (import "pie" "subscribe" (func $sub (param i32 i32) (result i32)))
  (import "pie" "publish" (func $pub (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "t")
  (global $publish (mut i32) (i32.const 0))
  ;; argv[1] as a decimal number (read at offset 16)
  (func $depth (result i32) (local $n i32) (local $k i32) (local $v i32)
    (local.set $n (call $arg (i32.const 1) (i32.const 16) (i32.const 16)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_s (local.get $k) (local.get $n)))
        (local.set $v (i32.add (i32.mul (local.get $v) (i32.const 10))
          (i32.sub (i32.load8_u offset=16 (local.get $k)) (i32.const 48))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $next)))
    (local.get $v))
  ;; xor/rotl after the call: no tail call, no accumulator the C compiler
  ;; could turn into a loop
  (func $rec (param $d i32) (result i32)
    (if (result i32) (i32.eqz (local.get $d))
      (then
        (if (result i32) (global.get $publish)
          (then (call $pub (i32.const 0) (i32.const 1)
                           (i32.const 4096) (i32.const 4096)))
          (else (i32.const 0))))
      (else
        (i32.xor (i32.rotl (call $rec (i32.sub (local.get $d) (i32.const 1)))
                           (i32.const 1))
                 (local.get $d)))))
  (func (export "_start")
    (if (i32.ge_s (call $argc) (i32.const 3))
      (then (drop (call $sub (i32.const 0) (i32.const 1)))
            (global.set $publish (i32.const 1))))
    (drop (call $rec (call $depth)))))
