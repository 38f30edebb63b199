;; Two tables of 400,000 funcref elements (9.6 MB each): within the table
;; count and per-table limits, but over a 16 MiB memory limit together.
(module
  (table 400000 funcref)
  (table 400000 funcref)
  (memory (export "memory") 1)
  (func (export "_start")))
