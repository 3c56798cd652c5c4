;; crash: shows how a trap is reported, a WASI preview 1 core module.
;;
;; Writes `about to trap` on stderr, then executes `unreachable`.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "about to trap\n")

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $crash))

  ;; A function of its own, so the backtrace names it.
  (func $crash
    unreachable)
)
