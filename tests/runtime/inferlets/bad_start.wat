;; _start takes a parameter: rejected before translation.
(module
  (memory (export "memory") 1)
  (func (export "_start") (param i32)))
