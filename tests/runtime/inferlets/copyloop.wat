;; Copies 128 MiB with memory.copy forever: nearly all its time is spent in
;; libc's memmove, called from generated code. Only the CPU limit or a
;; kill ends it.
(module
  (memory (export "memory") 4096)
  (func (export "_start")
    (loop $l
      (memory.copy (i32.const 0) (i32.const 134217728) (i32.const 134217728))
      (br $l))))
