;; memhog: shows the memory limit, a WASI preview 1 core module.
;;
;; Writes `memhog: growing memory by 1 MiB at a time` on stdout, then grows
;; its memory by 16 pages (1 MiB) at a time forever, writing to every new
;; page so that it is really used. When the runtime refuses to grow (a
;; memory limit: memory.grow returns -1) it executes `unreachable`, a trap.
;; A runtime configured to trap on a refused grow traps there instead.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "memhog: growing memory by 1 MiB at a time\n")

  (func (export "_start")
    (local $page i32) (local $end i32)
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 42))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $grow
      ;; memory.grow returns the old size in pages: the first new page.
      (local.set $page (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $page) (i32.const -1))
        (then unreachable))
      (local.set $end (i32.add (local.get $page) (i32.const 16)))
      (loop $touch
        (i32.store (i32.shl (local.get $page) (i32.const 16)) (local.get $page))
        (local.set $page (i32.add (local.get $page) (i32.const 1)))
        (br_if $touch (i32.lt_u (local.get $page) (local.get $end))))
      (br $grow)))
)
