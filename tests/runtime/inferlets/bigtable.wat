;; Two tables of 50,000,000 elements declared by a ~100-byte module: host
;; memory is allocated per element at instantiation, so the runtime must
;; refuse initial tables above its cap (as table.grow does).
(module
  (table 50000000 funcref)
  (table 50000000 externref)
  (memory (export "memory") 1)
  (func (export "_start")))
