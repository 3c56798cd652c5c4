;; probe: a WASI preview 1 module that shows what a wasm instance of a
;; release gets, on stdout (its app logs), then exits 0:
;;   args: ARGV joined by spaces
;;   env: the environment, joined by spaces
;;   secret: the file `app` of the preopened directory /run/secrets
;;   runs: the file `runs` of the preopened directory /data, after one
;;         more `x` was appended to it (so each run shows one x more)
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func $fd_seek (param i32 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $fd_prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))

  ;; 0..8 iovec; 8..12 count; 16 argc; 20 argv size; 24 envc; 28 env size;
  ;; 32 opened fd; 40..48 prestat; 48..56 offset; 100.. texts; 256.. a
  ;; preopen's name; 1024 argv pointers; 2048 argv; 8192 env pointers;
  ;; 10240 env; 20000 a line with a file's contents (written at once, so
  ;; that it is one log record).
  (memory (export "memory") 1)
  (data (i32.const 100) "args: ")
  (data (i32.const 110) "env: ")
  (data (i32.const 120) "secret: ")
  (data (i32.const 130) "runs: ")
  (data (i32.const 140) "\n")
  (data (i32.const 150) "/data")
  (data (i32.const 160) "/run/secrets")
  (data (i32.const 180) "app")
  (data (i32.const 190) "runs")
  (data (i32.const 200) "x")
  (data (i32.const 210) "missing\n")

  (func $fd-write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $out (param $ptr i32) (param $len i32)
    (call $fd-write (i32.const 1) (local.get $ptr) (local.get $len)))
  ;; Reads up to 4096 bytes of `fd` at `to`; how many.
  (func $read (param $fd i32) (param $to i32) (result i32)
    (i32.store (i32.const 0) (local.get $to))
    (i32.store (i32.const 4) (i32.const 4096))
    (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (return (i32.const 0))))
    (i32.load (i32.const 8)))
  ;; NUL separators to spaces.
  (func $spaces (param $ptr i32) (param $len i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $len)))
        (if (i32.eqz (i32.load8_u (local.get $ptr)))
          (then (i32.store8 (local.get $ptr) (i32.const 32))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next))))
  (func $same (param $a i32) (param $b i32) (param $len i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.const 0))
  ;; The preopened directory named like the `len` bytes at `name`, or -1.
  (func $preopen (param $name i32) (param $len i32) (result i32) (local $fd i32)
    (local.set $fd (i32.const 3))
    (block $none
      (loop $next
        (br_if $none (i32.gt_u (local.get $fd) (i32.const 32)))
        (if (i32.eqz (call $fd_prestat_get (local.get $fd) (i32.const 40)))
          (then
            (if (i32.eq (i32.load (i32.const 44)) (local.get $len))
              (then
                (if (i32.eqz (call $fd_prestat_dir_name (local.get $fd) (i32.const 256) (local.get $len)))
                  (then
                    (if (call $same (i32.const 256) (local.get $name) (local.get $len))
                      (then (return (local.get $fd))))))))))
        (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
        (br $next)))
    (i32.const -1))
  ;; Opens `len` bytes at `path` in directory `dir` (oflags, fdflags): the fd, or -1.
  ;; `rights`: 0x2 to read; 0x46 to read, seek and write.
  (func $open (param $dir i32) (param $path i32) (param $len i32) (param $oflags i32) (param $fdflags i32)
      (param $rights i64) (result i32)
    (if (i32.lt_s (local.get $dir) (i32.const 0)) (then (return (i32.const -1))))
    (if (call $path_open (local.get $dir) (i32.const 0) (local.get $path) (local.get $len)
          (local.get $oflags) (local.get $rights) (i64.const 0) (local.get $fdflags) (i32.const 32))
      (then (return (i32.const -1))))
    (i32.load (i32.const 32)))

  (func (export "_start") (local $fd i32) (local $n i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (call $spaces (i32.const 2048) (i32.load (i32.const 20)))
    (call $out (i32.const 100) (i32.const 6))
    (call $out (i32.const 2048) (i32.sub (i32.load (i32.const 20)) (i32.const 1)))
    (call $out (i32.const 140) (i32.const 1))

    (drop (call $environ_sizes_get (i32.const 24) (i32.const 28)))
    (drop (call $environ_get (i32.const 8192) (i32.const 10240)))
    (call $spaces (i32.const 10240) (i32.load (i32.const 28)))
    (call $out (i32.const 110) (i32.const 5))
    (call $out (i32.const 10240) (i32.load (i32.const 28)))
    (call $out (i32.const 140) (i32.const 1))

    ;; "secret: " and the file, at once.
    (memory.copy (i32.const 20000) (i32.const 120) (i32.const 8))
    (local.set $fd (call $open (call $preopen (i32.const 160) (i32.const 12)) (i32.const 180) (i32.const 3)
      (i32.const 0) (i32.const 0) (i64.const 0x2)))
    (if (i32.lt_s (local.get $fd) (i32.const 0))
      (then (memory.copy (i32.const 20008) (i32.const 210) (i32.const 8)) (local.set $n (i32.const 8)))
      (else (local.set $n (call $read (local.get $fd) (i32.const 20008)))))
    (call $out (i32.const 20000) (i32.add (local.get $n) (i32.const 8)))

    ;; One more x to /data/runs (O_CREAT, APPEND), then "runs: " and the file.
    (memory.copy (i32.const 20000) (i32.const 130) (i32.const 6))
    (local.set $fd (call $open (call $preopen (i32.const 150) (i32.const 5)) (i32.const 190) (i32.const 4)
      (i32.const 1) (i32.const 1) (i64.const 0x46)))
    (if (i32.lt_s (local.get $fd) (i32.const 0))
      (then (call $out (i32.const 20000) (i32.const 6)) (call $out (i32.const 210) (i32.const 8)) (return)))
    (call $fd-write (local.get $fd) (i32.const 200) (i32.const 1))
    (drop (call $fd_seek (local.get $fd) (i64.const 0) (i32.const 0) (i32.const 48)))
    (local.set $n (call $read (local.get $fd) (i32.const 20006)))
    (i32.store8 (i32.add (i32.const 20006) (local.get $n)) (i32.const 10))
    (call $out (i32.const 20000) (i32.add (local.get $n) (i32.const 7))))
)
