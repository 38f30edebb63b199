;; Calls pie.instance_id N times (N = 10,000,000) and exits: host-call cost.
(module
  (import "pie" "instance_id" (func $id (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local i32)
    (local.set 0 (i32.const 10000000))
    (loop $l
      (drop (call $id))
      (local.tee 0 (i32.sub (local.get 0) (i32.const 1)))
      (br_if $l))))
