;; echo: Verge's per-connection example, a WASI preview 1 core module.
;;
;; In `mode = "per-connection"` the node starts one instance per TCP
;; connection, with the connection as stdin and stdout. It writes the line
;; `echo from wasm instance ID` first (ID: 16 hex digits from random_get,
;; drawn when the instance starts, so every instance has its own), so that
;; a client sees it is served, and by which instance, before it sends
;; anything, then copies stdin to stdout chunk by chunk until EOF
;; (fd_read reads 0 bytes) and returns from _start (exit status 0). A read
;; or write error exits with status 1.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "random_get"
    (func $random_get (param i32 i32) (result i32)))

  ;; 0..8: one iovec; 8..12: bytes read or written; 16..: the greeting;
  ;; 1024..17408: the buffer.
  (memory (export "memory") 1)
  (data (i32.const 16) "echo from wasm instance 0000000000000000\n")
  (data (i32.const 96) "0123456789abcdef")
  (global $greeting i32 (i32.const 16))
  (global $greeting-len i32 (i32.const 41))
  (global $buf i32 (i32.const 1024))
  (global $buf-len i32 (i32.const 16384))

  ;; Writes `len` bytes at `ptr` to `fd`, all of them; exits 1 on error.
  (func $write-all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 1))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  ;; The instance's ID into the greeting: 8 random bytes as 16 hex digits.
  (func $draw-id (local $i i32) (local $b i32)
    (if (call $random_get (i32.const 64) (i32.const 8))
      (then (call $proc_exit (i32.const 1))))
    (block $done
      (loop $next
        (br_if $done (i32.eq (local.get $i) (i32.const 8)))
        (local.set $b (i32.load8_u (i32.add (i32.const 64) (local.get $i))))
        (i32.store8 (i32.add (i32.const 40) (i32.shl (local.get $i) (i32.const 1)))
          (i32.load8_u (i32.add (i32.const 96) (i32.shr_u (local.get $b) (i32.const 4)))))
        (i32.store8 (i32.add (i32.const 41) (i32.shl (local.get $i) (i32.const 1)))
          (i32.load8_u (i32.add (i32.const 96) (i32.and (local.get $b) (i32.const 15)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))

  (func (export "_start")
    (call $draw-id)
    (call $write-all (i32.const 1) (global.get $greeting) (global.get $greeting-len))
    (block $eof
      (loop $read
        (i32.store (i32.const 0) (global.get $buf))
        (i32.store (i32.const 4) (global.get $buf-len))
        (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
          (then (call $proc_exit (i32.const 1))))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (call $write-all (i32.const 1) (global.get $buf) (i32.load (i32.const 8)))
        (br $read))))
)
