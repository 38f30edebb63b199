;; Does nothing: launch + instantiate + exit cost.
(module
  (memory (export "memory") 1)
  (func (export "_start")))
