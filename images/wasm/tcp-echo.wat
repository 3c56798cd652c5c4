;; tcp-echo: a long-running TCP echo server, as a WASI preview 2 component.
;;
;; It serves TCP itself with wasi:sockets, so it is a `mode = "long-running"`
;; workload (the default). On start it
;;
;;   1. reads PORT from its environment (wasi:cli/environment); a missing,
;;      empty or invalid PORT (not a number in 1-65535) means 8080;
;;   2. creates an IPv6 TCP socket, binds it to [::]:PORT and listens; WASI
;;      IPv6 sockets are IPv6-only, so it is reached over IPv6 (the
;;      instance's private address, or [::1] in tests);
;;   3. prints `tcp-echo: listening on [::]:PORT` on stdout;
;;   4. accepts connections one at a time, forever: to each it writes
;;      `hello from wasm\n`, then echoes what it reads until the client
;;      closes (or the connection fails), then drops the connection and
;;      accepts the next. While it serves one connection, the others wait in
;;      the listen backlog.
;;
;; A failing step (create, bind, listen, accept) is reported on stderr as
;; `tcp-echo: STEP failed: ERROR-CODE` and ends the program with an error
;; (wasi:cli/run returns err, exit status 1). Accept failures that concern a
;; single connection (connection-aborted, connection-reset) are skipped.
;;
;; Imports use exactly the WIT of wasmtime-wasi 48 (wasi:*@0.2.12), declaring
;; only the functions used; it exports wasi:cli/run@0.2.12.
;;
;; Layout: a tiny core module `$libc` owns the memory and a bump allocator
;; (`realloc`, `reset`), so the canonical ABI lowerings can use them before
;; the main module is instantiated. The main module resets the heap after
;; each use of lowered results (environment, each read).
(component $tcp-echo
  ;; ---------------------------------------------------------------- imports
  (import "wasi:io/error@0.2.12" (instance $wasi-io-error
    (export "error" (type (sub resource)))
  ))
  (alias export $wasi-io-error "error" (type $error))

  (import "wasi:io/poll@0.2.12" (instance $wasi-io-poll
    (export "pollable" (type $pollable (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $pollable))))
  ))
  (alias export $wasi-io-poll "pollable" (type $pollable))

  (import "wasi:io/streams@0.2.12" (instance $wasi-io-streams
    (alias outer $tcp-echo $error (type $error'))
    (export "error" (type $error-e (eq $error')))
    (type $stream-error' (variant
      (case "last-operation-failed" (own $error-e))
      (case "closed")))
    (export "stream-error" (type $stream-error (eq $stream-error')))
    (export "input-stream" (type $input-stream (sub resource)))
    (export "output-stream" (type $output-stream (sub resource)))
    (export "[method]input-stream.blocking-read"
      (func (param "self" (borrow $input-stream)) (param "len" u64)
        (result (result (list u8) (error $stream-error)))))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $output-stream)) (param "contents" (list u8))
        (result (result (error $stream-error)))))
  ))
  (alias export $wasi-io-streams "input-stream" (type $input-stream))
  (alias export $wasi-io-streams "output-stream" (type $output-stream))

  (import "wasi:cli/environment@0.2.12" (instance $wasi-cli-environment
    (export "get-environment" (func (result (list (tuple string string)))))
  ))

  (import "wasi:cli/stdout@0.2.12" (instance $wasi-cli-stdout
    (alias outer $tcp-echo $output-stream (type $output-stream'))
    (export "output-stream" (type $output-stream-e (eq $output-stream')))
    (export "get-stdout" (func (result (own $output-stream-e))))
  ))

  (import "wasi:cli/stderr@0.2.12" (instance $wasi-cli-stderr
    (alias outer $tcp-echo $output-stream (type $output-stream'))
    (export "output-stream" (type $output-stream-e (eq $output-stream')))
    (export "get-stderr" (func (result (own $output-stream-e))))
  ))

  (import "wasi:sockets/network@0.2.12" (instance $wasi-sockets-network
    (export "network" (type (sub resource)))
    (type $error-code' (enum
      "unknown"
      "access-denied"
      "not-supported"
      "invalid-argument"
      "out-of-memory"
      "timeout"
      "concurrency-conflict"
      "not-in-progress"
      "would-block"
      "invalid-state"
      "new-socket-limit"
      "address-not-bindable"
      "address-in-use"
      "remote-unreachable"
      "connection-refused"
      "connection-reset"
      "connection-aborted"
      "datagram-too-large"
      "name-unresolvable"
      "temporary-resolver-failure"
      "permanent-resolver-failure"))
    (export "error-code" (type (eq $error-code')))
    (type $ip-address-family' (enum "ipv4" "ipv6"))
    (export "ip-address-family" (type (eq $ip-address-family')))
    (type $ipv4-address' (tuple u8 u8 u8 u8))
    (export "ipv4-address" (type $ipv4-address (eq $ipv4-address')))
    (type $ipv6-address' (tuple u16 u16 u16 u16 u16 u16 u16 u16))
    (export "ipv6-address" (type $ipv6-address (eq $ipv6-address')))
    (type $ipv4-socket-address' (record
      (field "port" u16)
      (field "address" $ipv4-address)))
    (export "ipv4-socket-address" (type $ipv4-socket-address (eq $ipv4-socket-address')))
    (type $ipv6-socket-address' (record
      (field "port" u16)
      (field "flow-info" u32)
      (field "address" $ipv6-address)
      (field "scope-id" u32)))
    (export "ipv6-socket-address" (type $ipv6-socket-address (eq $ipv6-socket-address')))
    (type $ip-socket-address' (variant
      (case "ipv4" $ipv4-socket-address)
      (case "ipv6" $ipv6-socket-address)))
    (export "ip-socket-address" (type (eq $ip-socket-address')))
  ))
  (alias export $wasi-sockets-network "network" (type $network))
  (alias export $wasi-sockets-network "error-code" (type $error-code))
  (alias export $wasi-sockets-network "ip-address-family" (type $ip-address-family))
  (alias export $wasi-sockets-network "ip-socket-address" (type $ip-socket-address))

  (import "wasi:sockets/instance-network@0.2.12" (instance $wasi-sockets-instance-network
    (alias outer $tcp-echo $network (type $network'))
    (export "network" (type $network-e (eq $network')))
    (export "instance-network" (func (result (own $network-e))))
  ))

  (import "wasi:sockets/tcp@0.2.12" (instance $wasi-sockets-tcp
    (alias outer $tcp-echo $input-stream (type $input-stream'))
    (export "input-stream" (type $input-stream-e (eq $input-stream')))
    (alias outer $tcp-echo $output-stream (type $output-stream'))
    (export "output-stream" (type $output-stream-e (eq $output-stream')))
    (alias outer $tcp-echo $pollable (type $pollable'))
    (export "pollable" (type $pollable-e (eq $pollable')))
    (alias outer $tcp-echo $network (type $network'))
    (export "network" (type $network-e (eq $network')))
    (alias outer $tcp-echo $error-code (type $error-code'))
    (export "error-code" (type $error-code-e (eq $error-code')))
    (alias outer $tcp-echo $ip-socket-address (type $ip-socket-address'))
    (export "ip-socket-address" (type $ip-socket-address-e (eq $ip-socket-address')))
    (export "tcp-socket" (type $tcp-socket (sub resource)))
    (export "[method]tcp-socket.start-bind"
      (func (param "self" (borrow $tcp-socket)) (param "network" (borrow $network-e))
        (param "local-address" $ip-socket-address-e)
        (result (result (error $error-code-e)))))
    (export "[method]tcp-socket.finish-bind"
      (func (param "self" (borrow $tcp-socket)) (result (result (error $error-code-e)))))
    (export "[method]tcp-socket.start-listen"
      (func (param "self" (borrow $tcp-socket)) (result (result (error $error-code-e)))))
    (export "[method]tcp-socket.finish-listen"
      (func (param "self" (borrow $tcp-socket)) (result (result (error $error-code-e)))))
    (export "[method]tcp-socket.accept"
      (func (param "self" (borrow $tcp-socket))
        (result (result
          (tuple (own $tcp-socket) (own $input-stream-e) (own $output-stream-e))
          (error $error-code-e)))))
    (export "[method]tcp-socket.subscribe"
      (func (param "self" (borrow $tcp-socket)) (result (own $pollable-e))))
  ))
  (alias export $wasi-sockets-tcp "tcp-socket" (type $tcp-socket))

  (import "wasi:sockets/tcp-create-socket@0.2.12" (instance $wasi-sockets-tcp-create-socket
    (alias outer $tcp-echo $error-code (type $error-code'))
    (export "error-code" (type $error-code-e (eq $error-code')))
    (alias outer $tcp-echo $ip-address-family (type $ip-address-family'))
    (export "ip-address-family" (type $ip-address-family-e (eq $ip-address-family')))
    (alias outer $tcp-echo $tcp-socket (type $tcp-socket'))
    (export "tcp-socket" (type $tcp-socket-e (eq $tcp-socket')))
    (export "create-tcp-socket"
      (func (param "address-family" $ip-address-family-e)
        (result (result (own $tcp-socket-e) (error $error-code-e)))))
  ))

  ;; ------------------------------------------------- memory and allocator
  (core module $libc
    (memory (export "memory") 1)
    ;; Below 4096: the main module's static data. The heap starts above.
    (global $bump (mut i32) (i32.const 4096))

    ;; The canonical ABI's allocator: a bump allocator, freed all at once
    ;; by `reset`.
    (func (export "realloc")
      (param $old i32) (param $old-size i32) (param $align i32) (param $new-size i32)
      (result i32)
      (local $ptr i32) (local $end i32) (local $have i32)
      (local.set $ptr
        (i32.and
          (i32.add (global.get $bump) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $ptr) (local.get $new-size)))
      (local.set $have (i32.shl (memory.size) (i32.const 16)))
      (if (i32.gt_u (local.get $end) (local.get $have))
        (then
          (if (i32.eq
                (memory.grow
                  (i32.shr_u
                    (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                    (i32.const 16)))
                (i32.const -1))
            (then unreachable))))
      (global.set $bump (local.get $end))
      (if (local.get $old)
        (then
          (memory.copy (local.get $ptr) (local.get $old)
            (select (local.get $old-size) (local.get $new-size)
              (i32.lt_u (local.get $old-size) (local.get $new-size))))))
      (local.get $ptr))

    (func (export "reset")
      (global.set $bump (i32.const 4096)))
  )
  (core instance $libc (instantiate $libc))

  ;; --------------------------------------------------- lowered imports
  (core func $instance-network
    (canon lower (func $wasi-sockets-instance-network "instance-network")))
  (core func $create-tcp-socket
    (canon lower (func $wasi-sockets-tcp-create-socket "create-tcp-socket")
      (memory (core memory $libc "memory"))))
  (core func $start-bind
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.start-bind")
      (memory (core memory $libc "memory"))))
  (core func $finish-bind
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.finish-bind")
      (memory (core memory $libc "memory"))))
  (core func $start-listen
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.start-listen")
      (memory (core memory $libc "memory"))))
  (core func $finish-listen
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.finish-listen")
      (memory (core memory $libc "memory"))))
  (core func $accept
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.accept")
      (memory (core memory $libc "memory"))))
  (core func $subscribe
    (canon lower (func $wasi-sockets-tcp "[method]tcp-socket.subscribe")))
  (core func $block
    (canon lower (func $wasi-io-poll "[method]pollable.block")))
  (core func $blocking-read
    (canon lower (func $wasi-io-streams "[method]input-stream.blocking-read")
      (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core func $blocking-write-and-flush
    (canon lower (func $wasi-io-streams "[method]output-stream.blocking-write-and-flush")
      (memory (core memory $libc "memory"))))
  (core func $get-environment
    (canon lower (func $wasi-cli-environment "get-environment")
      (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core func $get-stdout (canon lower (func $wasi-cli-stdout "get-stdout")))
  (core func $get-stderr (canon lower (func $wasi-cli-stderr "get-stderr")))
  (core func $drop-tcp-socket (canon resource.drop $tcp-socket))
  (core func $drop-input-stream (canon resource.drop $input-stream))
  (core func $drop-output-stream (canon resource.drop $output-stream))
  (core func $drop-pollable (canon resource.drop $pollable))
  (core func $drop-error (canon resource.drop $error))

  ;; ------------------------------------------------------------ the program
  (core module $main
    (import "libc" "memory" (memory 1))
    (import "libc" "reset" (func $reset))
    (import "wasi" "instance-network" (func $instance-network (result i32)))
    ;; (address-family, retptr)
    (import "wasi" "create-tcp-socket" (func $create-tcp-socket (param i32 i32)))
    ;; (self, network, ip-socket-address: case + 11 flat fields, retptr)
    (import "wasi" "start-bind" (func $start-bind
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
    (import "wasi" "finish-bind" (func $finish-bind (param i32 i32)))
    (import "wasi" "start-listen" (func $start-listen (param i32 i32)))
    (import "wasi" "finish-listen" (func $finish-listen (param i32 i32)))
    (import "wasi" "accept" (func $accept (param i32 i32)))
    (import "wasi" "subscribe" (func $subscribe (param i32) (result i32)))
    (import "wasi" "block" (func $block (param i32)))
    ;; (self, len, retptr)
    (import "wasi" "blocking-read" (func $blocking-read (param i32 i64 i32)))
    ;; (self, ptr, len, retptr)
    (import "wasi" "blocking-write-and-flush" (func $blocking-write-and-flush
      (param i32 i32 i32 i32)))
    (import "wasi" "get-environment" (func $get-environment (param i32)))
    (import "wasi" "get-stdout" (func $get-stdout (result i32)))
    (import "wasi" "get-stderr" (func $get-stderr (result i32)))
    (import "wasi" "drop-tcp-socket" (func $drop-tcp-socket (param i32)))
    (import "wasi" "drop-input-stream" (func $drop-input-stream (param i32)))
    (import "wasi" "drop-output-stream" (func $drop-output-stream (param i32)))
    (import "wasi" "drop-pollable" (func $drop-pollable (param i32)))
    (import "wasi" "drop-error" (func $drop-error (param i32)))

    ;; Memory map (below the heap at 4096):
    ;;   16..32     return area of lowered calls
    ;;   256..      constant strings
    ;;   1024..2048 the line being formatted
    (global $ret i32 (i32.const 16))
    (global $line i32 (i32.const 1024))
    ;; wasi:sockets error-code values used here.
    (global $would-block i32 (i32.const 8))
    (global $connection-reset i32 (i32.const 15))
    (global $connection-aborted i32 (i32.const 16))
    ;; Most bytes one blocking-write-and-flush takes (WASI's limit), hence
    ;; the most read at once.
    (global $chunk i32 (i32.const 4096))

    (data (i32.const 256) "hello from wasm\n")                 ;; 16 bytes
    (data (i32.const 288) "tcp-echo: ")                        ;; 10
    (data (i32.const 304) "listening on [::]:")                ;; 18
    (data (i32.const 336) " failed: ")                         ;; 9
    (data (i32.const 352) "create-tcp-socket")                 ;; 17
    (data (i32.const 384) "start-bind")                        ;; 10
    (data (i32.const 400) "finish-bind")                       ;; 11
    (data (i32.const 416) "start-listen")                      ;; 12
    (data (i32.const 432) "finish-listen")                     ;; 13
    (data (i32.const 448) "accept")                            ;; 6
    ;; error-code names in enum order, separated by spaces.
    (data (i32.const 512)
      "unknown access-denied not-supported invalid-argument out-of-memory "
      "timeout concurrency-conflict not-in-progress would-block invalid-state "
      "new-socket-limit address-not-bindable address-in-use remote-unreachable "
      "connection-refused connection-reset connection-aborted datagram-too-large "
      "name-unresolvable temporary-resolver-failure permanent-resolver-failure ")

    ;; ---- the line buffer

    ;; Appends `len` bytes at `src` to the line at `at`; returns the new end.
    (func $append (param $at i32) (param $src i32) (param $len i32) (result i32)
      (memory.copy (local.get $at) (local.get $src) (local.get $len))
      (i32.add (local.get $at) (local.get $len)))

    ;; Appends `n` in decimal at `at`; returns the new end.
    (func $append-u32 (param $at i32) (param $n i32) (result i32)
      (local $digits i32) (local $rest i32) (local $end i32)
      ;; count digits
      (local.set $digits (i32.const 1))
      (local.set $rest (local.get $n))
      (block $counted
        (loop $count
          (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
          (br_if $counted (i32.eqz (local.get $rest)))
          (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
          (br $count)))
      (local.set $end (i32.add (local.get $at) (local.get $digits)))
      ;; write them from the last
      (local.set $rest (local.get $end))
      (loop $write
        (local.set $rest (i32.sub (local.get $rest) (i32.const 1)))
        (i32.store8 (local.get $rest)
          (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
        (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
        (br_if $write (i32.gt_u (local.get $rest) (local.get $at))))
      (local.get $end))

    ;; Appends the name of error-code `code` at `at`; returns the new end.
    (func $append-error-code (param $at i32) (param $code i32) (result i32)
      (local $p i32) (local $start i32)
      (local.set $p (i32.const 512))
      ;; skip `code` names
      (block $found
        (loop $skip
          (br_if $found (i32.eqz (local.get $code)))
          (loop $to-space
            (local.set $p (i32.add (local.get $p) (i32.const 1)))
            (br_if $to-space (i32.ne (i32.load8_u (local.get $p)) (i32.const 32))))
          (local.set $p (i32.add (local.get $p) (i32.const 1)))
          (local.set $code (i32.sub (local.get $code) (i32.const 1)))
          (br $skip)))
      (local.set $start (local.get $p))
      (loop $to-end
        (if (i32.ne (i32.load8_u (local.get $p)) (i32.const 32))
          (then
            (local.set $p (i32.add (local.get $p) (i32.const 1)))
            (br $to-end))))
      (call $append (local.get $at) (local.get $start)
        (i32.sub (local.get $p) (local.get $start))))

    ;; Writes the line from `$line` to `end`, plus "\n", to `stream`
    ;; (best effort: a failure to write a log line is ignored).
    (func $emit (param $stream i32) (param $end i32)
      (i32.store8 (local.get $end) (i32.const 10))
      (call $blocking-write-and-flush (local.get $stream) (global.get $line)
        (i32.sub (i32.add (local.get $end) (i32.const 1)) (global.get $line))
        (global.get $ret))
      (drop (call $forget-stream-error))
      (call $drop-output-stream (local.get $stream)))

    ;; After a lowered call returning result<_, stream-error> or
    ;; result<T, stream-error> at $ret: 1 if it failed (dropping the error
    ;; resource it may carry), else 0.
    (func $forget-stream-error (result i32)
      (if (i32.eqz (i32.load8_u (global.get $ret)))
        (then (return (i32.const 0))))
      ;; stream-error: case 0 `last-operation-failed(error)`, case 1 `closed`.
      (if (i32.eqz (i32.load8_u offset=4 (global.get $ret)))
        (then (call $drop-error (i32.load offset=8 (global.get $ret)))))
      (i32.const 1))

    ;; Reports `tcp-echo: STEP failed: CODE` on stderr; returns 1 (err).
    (func $fail (param $step i32) (param $step-len i32) (param $code i32) (result i32)
      (local $end i32)
      (local.set $end (call $append (global.get $line) (i32.const 288) (i32.const 10)))
      (local.set $end (call $append (local.get $end) (local.get $step) (local.get $step-len)))
      (local.set $end (call $append (local.get $end) (i32.const 336) (i32.const 9)))
      (local.set $end (call $append-error-code (local.get $end) (local.get $code)))
      (call $emit (call $get-stderr) (local.get $end))
      (i32.const 1))

    ;; ---- configuration

    ;; PORT parsed from `len` bytes at `p`, or 0 if it is not in 1-65535.
    (func $parse-port (param $p i32) (param $len i32) (result i32)
      (local $end i32) (local $n i32) (local $digit i32)
      (if (i32.or (i32.eqz (local.get $len)) (i32.gt_u (local.get $len) (i32.const 5)))
        (then (return (i32.const 0))))
      (local.set $end (i32.add (local.get $p) (local.get $len)))
      (loop $next
        (local.set $digit (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (if (i32.gt_u (local.get $digit) (i32.const 9))
          (then (return (i32.const 0))))
        (local.set $n
          (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $digit)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br_if $next (i32.lt_u (local.get $p) (local.get $end))))
      (if (i32.gt_u (local.get $n) (i32.const 65535))
        (then (return (i32.const 0))))
      (local.get $n))

    ;; The port to listen on: $PORT if valid, else 8080.
    (func $port (result i32)
      (local $list i32) (local $count i32) (local $entry i32) (local $i i32)
      (local $port i32)
      (call $get-environment (global.get $ret))
      (local.set $list (i32.load (global.get $ret)))
      (local.set $count (i32.load offset=4 (global.get $ret)))
      ;; Each entry is tuple<string, string>: key ptr, key len, value ptr,
      ;; value len.
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
          (local.set $entry
            (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 4))))
          (if (i32.eq (i32.load offset=4 (local.get $entry)) (i32.const 4))
            (then
              ;; "PORT", as a little-endian i32
              (if (i32.eq (i32.load (i32.load (local.get $entry))) (i32.const 0x54524f50))
                (then
                  (local.set $port
                    (call $parse-port
                      (i32.load offset=8 (local.get $entry))
                      (i32.load offset=12 (local.get $entry))))
                  (br $done)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (call $reset)
      (select (local.get $port) (i32.const 8080) (local.get $port)))

    ;; ---- serving

    ;; Greets, then echoes `in` to `out` until the stream closes or fails.
    (func $serve (param $in i32) (param $out i32)
      (call $blocking-write-and-flush
        (local.get $out) (i32.const 256) (i32.const 16) (global.get $ret))
      (if (call $forget-stream-error) (then (return)))
      (loop $echo
        (call $reset)
        (call $blocking-read
          (local.get $in) (i64.extend_i32_u (global.get $chunk)) (global.get $ret))
        (if (call $forget-stream-error) (then (return)))
        ;; ok: list<u8> at offset 4 (pointer) and 8 (length)
        (call $blocking-write-and-flush
          (local.get $out)
          (i32.load offset=4 (global.get $ret))
          (i32.load offset=8 (global.get $ret))
          (global.get $ret))
        (if (call $forget-stream-error) (then (return)))
        (br $echo)))

    ;; wasi:cli/run: returns 0 (ok) never, 1 (err) when a step fails.
    (func (export "run") (result i32)
      (local $port i32) (local $network i32) (local $listener i32)
      (local $ready i32) (local $code i32)
      (local $client i32) (local $in i32) (local $out i32)
      (local.set $port (call $port))
      (local.set $network (call $instance-network))

      ;; create-tcp-socket(ipv6): result<own<tcp-socket>, error-code>
      (call $create-tcp-socket (i32.const 1) (global.get $ret))
      (if (i32.load8_u (global.get $ret))
        (then (return (call $fail (i32.const 352) (i32.const 17)
          (i32.load8_u offset=4 (global.get $ret))))))
      (local.set $listener (i32.load offset=4 (global.get $ret)))

      ;; start-bind(network, ipv6 { port, flow-info 0, address ::, scope-id 0 })
      (call $start-bind (local.get $listener) (local.get $network)
        (i32.const 1) (local.get $port) (i32.const 0)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
        (i32.const 0)
        (global.get $ret))
      (if (i32.load8_u (global.get $ret))
        (then (return (call $fail (i32.const 384) (i32.const 10)
          (i32.load8_u offset=1 (global.get $ret))))))
      (local.set $ready (call $subscribe (local.get $listener)))
      (block $bound
        (loop $finish
          (call $finish-bind (local.get $listener) (global.get $ret))
          (br_if $bound (i32.eqz (i32.load8_u (global.get $ret))))
          (local.set $code (i32.load8_u offset=1 (global.get $ret)))
          (if (i32.ne (local.get $code) (global.get $would-block))
            (then (return (call $fail (i32.const 400) (i32.const 11) (local.get $code)))))
          (call $block (local.get $ready))
          (br $finish)))

      (call $start-listen (local.get $listener) (global.get $ret))
      (if (i32.load8_u (global.get $ret))
        (then (return (call $fail (i32.const 416) (i32.const 12)
          (i32.load8_u offset=1 (global.get $ret))))))
      (block $listening
        (loop $finish
          (call $finish-listen (local.get $listener) (global.get $ret))
          (br_if $listening (i32.eqz (i32.load8_u (global.get $ret))))
          (local.set $code (i32.load8_u offset=1 (global.get $ret)))
          (if (i32.ne (local.get $code) (global.get $would-block))
            (then (return (call $fail (i32.const 432) (i32.const 13) (local.get $code)))))
          (call $block (local.get $ready))
          (br $finish)))
      ;; The pollable's readiness was for bind and listen: take a fresh one
      ;; for accepting.
      (call $drop-pollable (local.get $ready))
      (local.set $ready (call $subscribe (local.get $listener)))

      ;; "tcp-echo: listening on [::]:PORT" on stdout
      (call $emit (call $get-stdout)
        (call $append-u32
          (call $append
            (call $append (global.get $line) (i32.const 288) (i32.const 10))
            (i32.const 304) (i32.const 18))
          (local.get $port)))

      (loop $accept-next
        ;; accept: result<tuple<tcp-socket, input-stream, output-stream>, error-code>
        (call $accept (local.get $listener) (global.get $ret))
        (if (i32.load8_u (global.get $ret))
          (then
            (local.set $code (i32.load8_u offset=4 (global.get $ret)))
            (if (i32.eq (local.get $code) (global.get $would-block))
              (then
                (call $block (local.get $ready))
                (br $accept-next)))
            (if (i32.or
                  (i32.eq (local.get $code) (global.get $connection-aborted))
                  (i32.eq (local.get $code) (global.get $connection-reset)))
              (then (br $accept-next)))
            (return (call $fail (i32.const 448) (i32.const 6) (local.get $code)))))
        (local.set $client (i32.load offset=4 (global.get $ret)))
        (local.set $in (i32.load offset=8 (global.get $ret)))
        (local.set $out (i32.load offset=12 (global.get $ret)))
        (call $serve (local.get $in) (local.get $out))
        ;; The streams are children of the socket: drop them first.
        (call $drop-input-stream (local.get $in))
        (call $drop-output-stream (local.get $out))
        (call $drop-tcp-socket (local.get $client))
        (br $accept-next))
      unreachable)
  )
  (core instance $main (instantiate $main
    (with "libc" (instance $libc))
    (with "wasi" (instance
      (export "instance-network" (func $instance-network))
      (export "create-tcp-socket" (func $create-tcp-socket))
      (export "start-bind" (func $start-bind))
      (export "finish-bind" (func $finish-bind))
      (export "start-listen" (func $start-listen))
      (export "finish-listen" (func $finish-listen))
      (export "accept" (func $accept))
      (export "subscribe" (func $subscribe))
      (export "block" (func $block))
      (export "blocking-read" (func $blocking-read))
      (export "blocking-write-and-flush" (func $blocking-write-and-flush))
      (export "get-environment" (func $get-environment))
      (export "get-stdout" (func $get-stdout))
      (export "get-stderr" (func $get-stderr))
      (export "drop-tcp-socket" (func $drop-tcp-socket))
      (export "drop-input-stream" (func $drop-input-stream))
      (export "drop-output-stream" (func $drop-output-stream))
      (export "drop-pollable" (func $drop-pollable))
      (export "drop-error" (func $drop-error))
    ))
  ))

  ;; ---------------------------------------------------------------- exports
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.12" (instance $run-instance))
)
