//! The guests of the wasm tests, in the WebAssembly text format.

const WASI: &str = r#"
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"#;

/// A module: the WASI imports above, `body` (more imports first), memory.
pub fn module(body: &str) -> String {
    format!("(module {WASI} {body} (memory (export \"memory\") 1))")
}

/// Copies stdin to stdout until EOF.
pub fn echo() -> String {
    module(
        r#"
        (func (export "_start")
          (local $n i32)
          (loop $l
            (i32.store (i32.const 0) (i32.const 64))
            (i32.store (i32.const 4) (i32.const 1024))
            (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16))
              (then unreachable))
            (local.set $n (i32.load (i32.const 16)))
            (if (i32.eqz (local.get $n)) (then return))
            (i32.store (i32.const 8) (i32.const 64))
            (i32.store (i32.const 12) (local.get $n))
            (if (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 20))
              (then unreachable))
            (br $l)))"#,
    )
}

/// Writes `text` (no quotes or backslashes) to stdout, then runs `then`.
pub fn say_then(text: &str, then: &str) -> String {
    let len = text.len() + 1;
    module(&format!(
        r#"
        (data (i32.const 512) "{text}\n")
        (func (export "_start")
          (i32.store (i32.const 0) (i32.const 512))
          (i32.store (i32.const 4) (i32.const {len}))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          {then})"#
    ))
}

pub const SPIN: &str = "(loop $spin (br $spin))";
pub const READ_ONCE: &str = r#"
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))"#;

/// Writes its arguments to stdout and its environment to stderr, a line
/// each, then `!` without a newline.
pub fn args_env() -> String {
    module(
        r#"
        (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
        ;; Writes [buf, buf+len) to fd, NULs made newlines.
        (func $emit (param $fd i32) (param $buf i32) (param $len i32)
          (local $i i32)
          (block $done (loop $l
            (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
            (if (i32.eqz (i32.load8_u (i32.add (local.get $buf) (local.get $i))))
              (then (i32.store8 (i32.add (local.get $buf) (local.get $i)) (i32.const 10))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $l)))
          (i32.store (i32.const 0) (local.get $buf))
          (i32.store (i32.const 4) (local.get $len))
          (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
        (func (export "_start")
          (drop (call $args_sizes (i32.const 16) (i32.const 20)))
          (drop (call $args_get (i32.const 1024) (i32.const 4096)))
          (call $emit (i32.const 1) (i32.const 4096) (i32.load (i32.const 20)))
          (drop (call $env_sizes (i32.const 16) (i32.const 20)))
          (drop (call $env_get (i32.const 1024) (i32.const 8192)))
          (call $emit (i32.const 2) (i32.const 8192) (i32.load (i32.const 20)))
          ;; An unfinished line, written at the end.
          (i32.store8 (i32.const 300) (i32.const 33))
          (i32.store (i32.const 0) (i32.const 300))
          (i32.store (i32.const 4) (i32.const 1))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))"#,
    )
}

/// Writes `name? ` (no newline) to stdout, then waits for input.
pub fn prompt() -> String {
    module(&format!(
        r#"
        (data (i32.const 512) "name? ")
        (func (export "_start")
          (i32.store (i32.const 0) (i32.const 512))
          (i32.store (i32.const 4) (i32.const 6))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          {READ_ONCE})"#
    ))
}

/// Four rounds of: wait for a byte, spin 150 ms, write a dot.
pub fn io_rounds() -> String {
    module(&format!(
        r#"
        (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
        (data (i32.const 300) ".")
        (func $now (result i64)
          (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 32)))
          (i64.load (i32.const 32)))
        (func (export "_start")
          (local $round i32) (local $until i64)
          (loop $rounds
            {READ_ONCE}
            (local.set $until (i64.add (call $now) (i64.const 150000000)))
            (loop $spin (br_if $spin (i64.lt_u (call $now) (local.get $until))))
            (i32.store (i32.const 8) (i32.const 300))
            (i32.store (i32.const 12) (i32.const 1))
            (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 20)))
            (local.set $round (i32.add (local.get $round) (i32.const 1)))
            (br_if $rounds (i32.lt_u (local.get $round) (i32.const 4)))))"#
    ))
}

/// Creates `out.txt` in the first preopen; exits 2 if it cannot.
pub fn write_file() -> String {
    module(
        r#"
        (import "wasi_snapshot_preview1" "path_open"
          (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
        (data (i32.const 100) "out.txt")
        (data (i32.const 200) "written by wasm\n")
        (func (export "_start")
          ;; O_CREAT|O_TRUNC, rights fd_write.
          (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 7)
                (i32.const 9) (i64.const 0x40) (i64.const 0) (i32.const 0) (i32.const 16))
            (then (call $proc_exit (i32.const 2))))
          (i32.store (i32.const 0) (i32.const 200))
          (i32.store (i32.const 4) (i32.const 16))
          (if (call $fd_write (i32.load (i32.const 16)) (i32.const 0) (i32.const 1) (i32.const 8))
            (then (call $proc_exit (i32.const 4))))
          (drop (call $fd_close (i32.load (i32.const 16)))))"#,
    )
}

/// A WASI 0.2 command: writes a line with `wasi:cli/stdout` and
/// `wasi:io/streams`, exports `wasi:cli/run`. Its imports are 0.2.0:
/// the node's 0.2.x serves them.
pub const COMPONENT: &str = r#"
(component
  (import "wasi:io/error@0.2.0" (instance $error
    (export "error" (type (sub resource)))))
  (alias export $error "error" (type $error-t))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (export "output-stream" (type $os (sub resource)))
    (alias outer 1 $error-t (type $e))
    (export "error" (type $err (eq $e)))
    (type $se (variant (case "last-operation-failed" (own $err)) (case "closed")))
    (export "stream-error" (type $se-x (eq $se)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $se-x)))))))
  (alias export $streams "output-stream" (type $os))
  (alias export $streams "[method]output-stream.blocking-write-and-flush" (func $write))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer 1 $os (type $o))
    (export "output-stream" (type $os-x (eq $o)))
    (export "get-stdout" (func (result (own $os-x))))))
  (alias export $stdout "get-stdout" (func $get-stdout))

  (core module $mem (memory (export "memory") 1))
  (core instance $mem-i (instantiate $mem))
  (alias core export $mem-i "memory" (core memory $memory))
  (core func $get-stdout-l (canon lower (func $get-stdout)))
  (core func $write-l (canon lower (func $write) (memory $memory)))
  (core func $drop-l (canon resource.drop $os))
  (core instance $host
    (export "get-stdout" (func $get-stdout-l))
    (export "write" (func $write-l))
    (export "drop" (func $drop-l))
    (export "memory" (memory $memory)))
  (core module $m
    (import "host" "get-stdout" (func $get_stdout (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "drop" (func $drop (param i32)))
    (import "host" "memory" (memory 1))
    (data (i32.const 16) "hello from a component\n")
    (func (export "run") (result i32)
      (local $s i32)
      (local.set $s (call $get_stdout))
      (call $write (local.get $s) (i32.const 16) (i32.const 23) (i32.const 64))
      (call $drop (local.get $s))
      (i32.load8_u (i32.const 64))))
  (core instance $main (instantiate $m (with "host" (instance $host))))
  (type $run-t (func (result (result))))
  (func $run (type $run-t) (canon lift (core func $main "run")))
  (instance $run-i (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-i)))
"#;
