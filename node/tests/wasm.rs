//! The wasm runtime against real wasmtime: guests written inline in the
//! WebAssembly text format (modules importing WASI preview 1, and a
//! component importing WASI 0.2), compiled into a cache dir of the test's
//! own, run with streams, logs, preopened directories and limits.
//!
//! `fixture`: the setup; `guests`: the guests.

#[path = "wasm/fixture.rs"]
mod fixture;
#[path = "wasm/guests.rs"]
mod guests;

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fixture::{Fixture, pipe, run_within, runtime};
use guests::{
    COMPONENT, READ_ONCE, SPIN, args_env, echo, io_rounds, module, prompt, say_then, write_file,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use verge_api::logs::LogStream;
use verge_node::wasm::{Compiled, Kind, Outcome, Preopen, WasmConfig, WasmError, WasmRuntime};

#[tokio::test]
async fn echo_copies_stdin_to_stdout_over_tcp() {
    let f = Fixture::new();
    let program = f.load(&echo()).await;
    assert_eq!(program.kind(), Kind::Module);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (conn, _) = listener.accept().await.unwrap();
    let (r, w) = conn.into_split();
    let mut guest = f.guest();
    guest.stdin = Some(Box::new(r));
    guest.stdout = Some(Box::new(w));

    let text = "hello\nworld, ".repeat(500);
    let (outcome, echoed) = tokio::join!(run_within(&program, guest, 30), async {
        client.write_all(text.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        got
    });
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(echoed, text);
}

#[tokio::test]
async fn args_and_env_are_visible_and_output_goes_to_the_logs() {
    let f = Fixture::new();
    let program = f.load(&args_env()).await;
    let mut guest = f.guest();
    guest.args = vec!["prog".into(), "one".into(), "two words".into()];
    guest.env = vec![
        ("GREETING".into(), "hello".into()),
        ("EMPTY".into(), "".into()),
    ];
    assert_eq!(run_within(&program, guest, 30).await, Outcome::Exited(0));
    assert_eq!(
        f.lines(LogStream::Stdout),
        ["prog", "one", "two words", "!"]
    );
    assert_eq!(f.lines(LogStream::Stderr), ["GREETING=hello", "EMPTY="]);
}

#[tokio::test]
async fn preopened_dirs_are_writable_only_when_asked() {
    let f = Fixture::new();
    let program = f.load(&write_file()).await;
    for writable in [true, false] {
        let host = f.tmp.path().join(format!("data-{writable}"));
        fs::create_dir(&host).unwrap();
        let mut guest = f.guest();
        guest.preopens = vec![Preopen {
            host: host.clone(),
            guest: "/data".into(),
            writable,
        }];
        let outcome = run_within(&program, guest, 30).await;
        if writable {
            assert_eq!(outcome, Outcome::Exited(0));
            assert_eq!(
                fs::read_to_string(host.join("out.txt")).unwrap(),
                "written by wasm\n"
            );
        } else {
            assert_eq!(
                outcome,
                Outcome::Exited(2),
                "a read-only preopen took a write"
            );
            assert!(!host.join("out.txt").exists());
        }
    }
}

#[tokio::test]
async fn a_preopen_that_does_not_exist_fails_the_run() {
    let f = Fixture::new();
    let program = f.load(&write_file()).await;
    let mut guest = f.guest();
    guest.preopens = vec![Preopen {
        host: f.tmp.path().join("missing"),
        guest: "/data".into(),
        writable: false,
    }];
    match run_within(&program, guest, 30).await {
        Outcome::Failed { message } => assert!(message.contains("missing"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn growing_memory_past_the_limit_traps() {
    let f = Fixture::new();
    let greedy = f
        .load(
            r#"(module (memory (export "memory") 1)
              (func (export "_start")
                (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))"#,
        )
        .await;
    match run_within(&greedy, f.guest(), 30).await {
        Outcome::OutOfMemory { message } => {
            assert!(
                message.starts_with("memory limit of 32 MiB reached"),
                "{message}"
            );
            // 1 page, then 16 at a time: 513 pages asked for.
            assert!(
                message.ends_with(&format!("asked for {} bytes", 513 * 65536)),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    // 4 MiB, and a memory whose own maximum refuses growth: ordinary
    // `memory.grow` failure, no trap.
    let modest = f
        .load(
            r#"(module (memory (export "memory") 1 70)
              (func (export "_start")
                (if (i32.eq (memory.grow (i32.const 63)) (i32.const -1)) (then unreachable))
                (if (i32.ne (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))))"#,
        )
        .await;
    assert_eq!(run_within(&modest, f.guest(), 30).await, Outcome::Exited(0));

    // A memory that starts bigger than the limit: it cannot start.
    let big = f
        .load(r#"(module (memory (export "memory") 600) (func (export "_start")))"#)
        .await;
    match run_within(&big, f.guest(), 30).await {
        Outcome::OutOfMemory { message } => {
            assert!(
                message.ends_with(&format!("asked for {} bytes", 600 * 65536)),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unfinished_line_is_logged_while_the_guest_waits() {
    let f = Fixture::new();
    let program = f.load(&prompt()).await;
    let mut guest = f.guest();
    let (test, theirs) = tokio::io::duplex(64);
    guest.stdin = Some(Box::new(theirs));
    let (outcome, ()) = tokio::join!(run_within(&program, guest, 30), async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.lines(LogStream::Stdout).is_empty() {
            assert!(Instant::now() < deadline, "the prompt was not logged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.lines(LogStream::Stdout), ["name? "]);
        drop(test);
    });
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(f.lines(LogStream::Stdout), ["name? "], "written once");
}

/// The test runs on a current-thread runtime: the spinning guest must
/// yield for the counter to advance.
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_loop_is_stopped_and_does_not_hog_the_thread() {
    let f = Fixture::new();
    let program = f
        .load(&module(&format!("(func (export \"_start\") {SPIN})")))
        .await;
    let ticks = Arc::new(AtomicU64::new(0));
    let counter = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            loop {
                every.tick().await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut guest = f.guest();
    guest.max_cpu_time = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = run_within(&program, guest, 10).await;
    let took = started.elapsed();
    counter.abort();
    match outcome {
        Outcome::CpuExceeded { message } => {
            assert!(message.contains("max_cpu_time = 300ms"), "{message}");
            assert!(
                message.contains("without waiting for input or output"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let ticks = ticks.load(Ordering::Relaxed);
    assert!(ticks >= 10, "other tasks ran {ticks} times in {took:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_cpu_share_throttles_a_spinning_guest() {
    let f = Fixture::new();
    let program = f
        .load(&module(&format!("(func (export \"_start\") {SPIN})")))
        .await;
    let mut guest = f.guest();
    guest.cpu = 0.25;
    guest.max_cpu_time = Duration::from_millis(200);
    let started = Instant::now();
    let outcome = run_within(&program, guest, 20).await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Outcome::CpuExceeded { .. }),
        "{outcome:?}"
    );
    // 200 ms of CPU at a quarter of a core takes some 800 ms.
    assert!(took >= Duration::from_millis(600), "{took:?}");
}

#[tokio::test]
async fn waiting_for_input_resets_the_cpu_count() {
    let f = Fixture::new();
    let program = f.load(&io_rounds()).await;
    let mut guest = f.guest();
    guest.max_cpu_time = Duration::from_millis(300);
    let mut test = pipe(&mut guest);
    let (outcome, ()) = tokio::join!(run_within(&program, guest, 30), async {
        for _ in 0..4 {
            test.write_all(b"x").await.unwrap();
            let mut dot = [0u8];
            test.read_exact(&mut dot).await.unwrap();
        }
    });
    assert_eq!(outcome, Outcome::Exited(0));
}

#[tokio::test]
async fn stop_interrupts_a_spinning_guest() {
    let f = Fixture::new();
    let program = f.load(&say_then("spinning", SPIN)).await;
    let mut guest = f.guest();
    let stop = guest.stop.clone();
    let test = pipe(&mut guest);
    let (outcome, ()) = tokio::join!(run_within(&program, guest, 10), async {
        let mut lines = BufReader::new(test).lines();
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "spinning");
        stop.cancel();
    });
    assert_eq!(outcome, Outcome::Stopped);
}

#[tokio::test]
async fn stop_interrupts_a_guest_waiting_for_input() {
    let f = Fixture::new();
    let program = f.load(&say_then("waiting", READ_ONCE)).await;
    let mut guest = f.guest();
    let stop = guest.stop.clone();
    let test = pipe(&mut guest);
    let (outcome, _test) = tokio::join!(run_within(&program, guest, 10), async {
        let mut lines = BufReader::new(test);
        let mut line = String::new();
        lines.read_line(&mut line).await.unwrap();
        assert_eq!(line, "waiting\n");
        stop.cancel();
        lines // kept open: the guest would wait forever
    });
    assert_eq!(outcome, Outcome::Stopped);
}

#[tokio::test]
async fn compiled_code_is_cached_across_runtimes() {
    let f = Fixture::new();
    let wat = say_then("cached", "");
    let (_, first) = f.load_with(&f.rt, &wat).await;
    assert!(matches!(first, Compiled::Fresh(_)), "{first:?}");

    let (digest, _) = f.artifact(&wat);
    let file = f.rt.cache_path(&digest).unwrap();
    assert!(file.starts_with(f.tmp.path().join("cache")));
    assert!(file.exists(), "{file:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(f.tmp.path().join("cache"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    let rt2 = runtime(f.tmp.path(), 4);
    let (program, second) = f.load_with(&rt2, &wat).await;
    assert_eq!(second, Compiled::Cached);
    assert_eq!(
        run_within(&program, f.guest(), 30).await,
        Outcome::Exited(0)
    );
    assert_eq!(f.lines(LogStream::Stdout), ["cached"]);

    // Loaded code maps its file: it must be replaced, never rewritten in
    // place (as the node does); a corrupt file is replaced here too.
    drop(program);
    let junk = file.with_extension("junk");
    fs::write(&junk, b"\x7fELF but not really compiled code").unwrap();
    fs::rename(&junk, &file).unwrap();
    let (program, third) = f.load_with(&rt2, &wat).await;
    assert!(matches!(third, Compiled::Fresh(_)), "{third:?}");
    assert_eq!(
        run_within(&program, f.guest(), 30).await,
        Outcome::Exited(0)
    );
    let (_, fourth) = f.load_with(&rt2, &wat).await;
    assert_eq!(fourth, Compiled::Cached, "the corrupt file was replaced");
}

#[tokio::test]
async fn unreachable_is_a_trap_with_a_backtrace() {
    let f = Fixture::new();
    let program = f
        .load(r#"(module (func $deep unreachable) (func (export "_start") (call $deep)))"#)
        .await;
    match run_within(&program, f.guest(), 30).await {
        Outcome::Trapped { message } => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(message.contains("backtrace"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn proc_exit_is_the_exit_code() {
    let f = Fixture::new();
    let program = f
        .load(&say_then("bye", "(call $proc_exit (i32.const 3))"))
        .await;
    assert_eq!(
        run_within(&program, f.guest(), 30).await,
        Outcome::Exited(3)
    );
    assert_eq!(f.lines(LogStream::Stdout), ["bye"]);
}

#[tokio::test]
async fn unknown_imports_are_link_errors() {
    let f = Fixture::new();
    let (digest, path) =
        f.artifact(r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#);
    match f.rt.load(&digest, &path).await {
        Err(e @ WasmError::Link { .. }) => {
            let text = e.to_string();
            assert!(text.contains("env::launch_missiles"), "{text}");
        }
        other => panic!("{:?}", other.map(|(_, c)| c)),
    }
    let (digest, path) = f.artifact("(module (func (export \"main\")))");
    assert!(matches!(
        f.rt.load(&digest, &path).await,
        Err(WasmError::Link { .. })
    ));
    let (digest, path) = f.artifact("(component)");
    match f.rt.load(&digest, &path).await {
        Err(e @ WasmError::Link { .. }) => {
            let text = e.to_string();
            assert!(text.contains("wasi:cli/run"), "{text}");
        }
        other => panic!("{:?}", other.map(|(_, c)| c)),
    }
    let (digest, path) = f.artifact(
        r#"(component (import "acme:rockets/launch@1.0.0" (instance (export "go" (func)))))"#,
    );
    match f.rt.load(&digest, &path).await {
        Err(e @ WasmError::Link { .. }) => {
            let text = e.to_string();
            assert!(text.contains("acme:rockets/launch@1.0.0"), "{text}");
        }
        other => panic!("{:?}", other.map(|(_, c)| c)),
    }
    let (digest, path) = f.artifact("this is not wasm");
    assert!(matches!(
        f.rt.load(&digest, &path).await,
        Err(WasmError::Invalid { .. })
    ));
}

#[tokio::test]
async fn a_full_pool_fails_the_next_instance() {
    let f = Fixture::with_instances(1);
    let program = f.load(&say_then("waiting", READ_ONCE)).await;
    let mut first = f.guest();
    let test = pipe(&mut first);
    let (outcome, second) = tokio::join!(run_within(&program, first, 30), async {
        let mut lines = BufReader::new(test);
        let mut line = String::new();
        lines.read_line(&mut line).await.unwrap();
        assert_eq!(line, "waiting\n");
        let second = run_within(&program, f.guest(), 30).await;
        drop(lines); // EOF: the first ends
        second
    });
    assert_eq!(outcome, Outcome::Exited(0));
    match second {
        Outcome::Failed { message } => {
            assert!(message.contains("pool is full (1 instances)"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // A slot is free again.
    assert_eq!(
        run_within(&program, f.guest(), 30).await,
        Outcome::Exited(0)
    );
}

#[tokio::test]
async fn a_wasi_p2_component_runs() {
    let f = Fixture::new();
    let program = f.load(COMPONENT).await;
    assert_eq!(program.kind(), Kind::Component);
    assert_eq!(
        run_within(&program, f.guest(), 30).await,
        Outcome::Exited(0)
    );
    assert_eq!(f.lines(LogStream::Stdout), ["hello from a component"]);
}

#[test]
fn runs_are_send() {
    fn send<T: Send>(_: &T) {}
    let f = Fixture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let program = rt.block_on(f.load(&echo()));
    let run = program.run(f.guest());
    send(&run);
    send(&program);
    send(&f.rt);
}

/// The node's defaults: 1000 slots of up to 4 GiB (address space only).
#[test]
fn the_default_pool_can_be_reserved() {
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let rt = WasmRuntime::new(WasmConfig {
        cache_dir: tmp.path().join("cache"),
        max_instances: 1000,
        max_memory: 4 << 30,
    })
    .expect("runtime");
    drop(rt);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
