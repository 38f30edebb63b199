;; Grows a funcref table by 300,000 elements (7.2 MB) ARG times in a row
;; (argv[1][0] - '0'); exits with the number of grows that failed. Under a
;; 16 MiB memory limit the third grow must fail: table bytes are charged.
(module
  (import "pie" "arg_get" (func $arg (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (table $t 0 funcref)
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32) (local $fail i32)
    (drop (call $arg (i32.const 1) (i32.const 0) (i32.const 1)))
    (local.set $n (i32.sub (i32.load8_u (i32.const 0)) (i32.const 48)))
    (block $done (loop $l
      (br_if $done (i32.eqz (local.get $n)))
      (if (i32.eq (table.grow $t (ref.null func) (i32.const 300000)) (i32.const -1))
        (then (local.set $fail (i32.add (local.get $fail) (i32.const 1)))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $l)))
    (call $exit (local.get $fail))))
