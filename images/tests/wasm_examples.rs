//! Runs the wasm examples in wasmtime with wasmtime-wasi, as a node would:
//! preview 1 modules with `p1::add_to_linker_async`, the preview 2
//! component with `p2::add_to_linker_async` and `wasi:cli/run`.

use std::net::{Ipv6Addr, SocketAddr};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use verge_images::wasm_example;
use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::cli::AsyncStdoutStream;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::Command;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

fn engine(tweak: impl FnOnce(&mut Config)) -> Engine {
    // Async host calls need no switch: `Config::async_support` is a
    // deprecated no-op in wasmtime 48.
    let mut config = Config::new();
    tweak(&mut config);
    Engine::new(&config).expect("engine")
}

/// A preview 1 run's state: WASI and, optionally, memory limits.
struct P1 {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// What a preview 1 run left: its result, stdout and stderr.
struct P1Run {
    result: wasmtime::Result<()>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs example `name`'s `_start` with `stdin`, in a store set up by
/// `setup` (limits, fuel), on an engine set up by `tweak`.
async fn run_p1(
    name: &str,
    stdin: &[u8],
    tweak: impl FnOnce(&mut Config),
    setup: impl FnOnce(&mut Store<P1>),
) -> P1Run {
    let engine = engine(tweak);
    let module = Module::new(&engine, wasm_example(name).unwrap()).expect("module compiles");
    let mut linker: Linker<P1> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| &mut s.wasi).unwrap();
    let stdout = MemoryOutputPipe::new(1 << 20);
    let stderr = MemoryOutputPipe::new(1 << 20);
    let wasi = WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(stdin.to_vec()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .build_p1();
    let mut store = Store::new(
        &engine,
        P1 {
            wasi,
            limits: StoreLimits::default(),
        },
    );
    setup(&mut store);
    let instance = linker
        .instantiate_async(&mut store, &module)
        .await
        .expect("instantiates");
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .expect("_start");
    let result = start.call_async(&mut store, ()).await;
    drop(store);
    P1Run {
        result,
        stdout: stdout.contents().to_vec(),
        stderr: stderr.contents().to_vec(),
    }
}

#[tokio::test]
async fn echo_module_greets_then_echoes_stdin_until_eof() {
    // More than one 16 KiB read's worth, to go round the loop.
    let input: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let run = run_p1("echo", &input, |_| {}, |_| {}).await;
    run.result.expect("returns from _start at EOF");
    let (greeting, echoed) = run.stdout.split_at(GREETING_LEN);
    instance_id(greeting);
    assert_eq!(echoed, &input[..]);
    assert!(run.stderr.is_empty());
}

#[tokio::test]
async fn echo_module_with_empty_stdin_only_greets() {
    let run = run_p1("echo", b"", |_| {}, |_| {}).await;
    run.result.expect("returns from _start at EOF");
    let first = instance_id(&run.stdout);
    // Another instance draws another ID.
    let again = run_p1("echo", b"", |_| {}, |_| {}).await;
    again.result.expect("returns from _start at EOF");
    assert_ne!(instance_id(&again.stdout), first);
}

/// `echo from wasm instance ` and 16 hex digits and a newline.
const GREETING_LEN: usize = 41;

/// The ID of an echo greeting (the whole of `greeting`), checked.
fn instance_id(greeting: &[u8]) -> String {
    let text = std::str::from_utf8(greeting).expect("utf-8 greeting");
    let id = text
        .strip_prefix("echo from wasm instance ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("an echo greeting: {text:?}"));
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "16 hex digits: {id:?}"
    );
    id.to_string()
}

#[tokio::test]
async fn memhog_traps_at_the_memory_limit() {
    const LIMIT: usize = 8 << 20;
    let run = run_p1(
        "memhog",
        b"",
        |_| {},
        |store| {
            store.data_mut().limits = StoreLimitsBuilder::new().memory_size(LIMIT).build();
            store.limiter(|s| &mut s.limits);
        },
    )
    .await;
    let err = run.result.expect_err("memhog never returns");
    assert_eq!(
        err.downcast_ref::<Trap>(),
        Some(&Trap::UnreachableCodeReached),
        "{err:?}"
    );
    assert_eq!(run.stdout, b"memhog: growing memory by 1 MiB at a time\n");
}

#[tokio::test]
async fn memhog_traps_on_the_grow_when_the_limiter_says_so() {
    let run = run_p1(
        "memhog",
        b"",
        |_| {},
        |store| {
            store.data_mut().limits = StoreLimitsBuilder::new()
                .memory_size(4 << 20)
                .trap_on_grow_failure(true)
                .build();
            store.limiter(|s| &mut s.limits);
        },
    )
    .await;
    let err = run.result.expect_err("memhog never returns");
    assert!(
        format!("{err:?}").contains("forcing trap when growing memory"),
        "{err:?}"
    );
}

#[tokio::test]
async fn spin_is_stopped_by_running_out_of_fuel() {
    let run = run_p1(
        "spin",
        b"",
        |config| {
            config.consume_fuel(true);
        },
        |store| store.set_fuel(5_000_000).unwrap(),
    )
    .await;
    let err = run.result.expect_err("spin never returns");
    assert_eq!(
        err.downcast_ref::<Trap>(),
        Some(&Trap::OutOfFuel),
        "{err:?}"
    );
    assert_eq!(run.stdout, b"spinning\n");
}

#[tokio::test]
async fn spin_is_stopped_by_an_epoch_deadline() {
    // The deadline is already due: the first check in the loop traps. No
    // timer is involved.
    let run = run_p1(
        "spin",
        b"",
        |config| {
            config.epoch_interruption(true);
        },
        |store| {
            store.set_epoch_deadline(1);
            store.engine().increment_epoch();
        },
    )
    .await;
    let err = run.result.expect_err("spin never returns");
    assert_eq!(
        err.downcast_ref::<Trap>(),
        Some(&Trap::Interrupt),
        "{err:?}"
    );
}

#[tokio::test]
async fn crash_writes_to_stderr_then_traps() {
    let run = run_p1("crash", b"", |_| {}, |_| {}).await;
    let err = run.result.expect_err("crash traps");
    assert_eq!(
        err.downcast_ref::<Trap>(),
        Some(&Trap::UnreachableCodeReached),
        "{err:?}"
    );
    assert!(err.downcast_ref::<I32Exit>().is_none());
    assert_eq!(run.stderr, b"about to trap\n");
    assert!(run.stdout.is_empty());
}

/// A preview 2 run's state.
struct P2 {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for P2 {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// A port free on [::1] right now.
fn free_ipv6_port() -> u16 {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .expect("bind [::1]:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A started tcp-echo: its stdout as lines, its stderr, and the task
/// running its `wasi:cli/run`.
struct TcpEcho {
    stdout: tokio::io::Lines<BufReader<tokio::io::DuplexStream>>,
    stderr: MemoryOutputPipe,
    task: tokio::task::JoinHandle<wasmtime::Result<Result<(), ()>>>,
}

/// Starts tcp-echo with `env`.
async fn start_tcp_echo(env: &[(&str, String)]) -> TcpEcho {
    let engine = engine(|_| {});
    let component =
        Component::new(&engine, wasm_example("tcp-echo").unwrap()).expect("component compiles");
    let mut linker: ComponentLinker<P2> = ComponentLinker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();

    // stdout goes into a pipe the test reads: "listening" says it is ready.
    let (stdout_writer, stdout_reader) = tokio::io::duplex(4096);
    let stderr = MemoryOutputPipe::new(4096);
    let mut builder = WasiCtxBuilder::new();
    builder
        .inherit_network()
        // wasmtime-wasi 48 denies TCP unless allowed (access-denied).
        .allow_tcp(true)
        .stdout(AsyncStdoutStream::new(4096, stdout_writer))
        .stderr(stderr.clone());
    for (k, v) in env {
        builder.env(k, v);
    }
    let mut store = Store::new(
        &engine,
        P2 {
            ctx: builder.build(),
            table: ResourceTable::new(),
        },
    );
    let command = Command::instantiate_async(&mut store, &component, &linker)
        .await
        .expect("instantiates with wasmtime-wasi's p2 linker");
    let task = tokio::spawn(async move { command.wasi_cli_run().call_run(&mut store).await });
    TcpEcho {
        stdout: BufReader::new(stdout_reader).lines(),
        stderr,
        task,
    }
}

/// Connects, reads the greeting, checks the echo of `payload`, closes.
async fn echo_round(addr: SocketAddr, payload: &[u8]) {
    let stream = TcpStream::connect(addr).await.expect("connects");
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut greeting = String::new();
    reader.read_line(&mut greeting).await.unwrap();
    assert_eq!(greeting, "hello from wasm\n");
    writer.write_all(payload).await.unwrap();
    let mut echoed = vec![0; payload.len()];
    reader.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, payload);
    // Closing our side ends the server's read: it closes the connection.
    writer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "unexpected bytes after the echo: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_component_serves_connections_one_after_another() {
    let port = free_ipv6_port();
    let TcpEcho {
        mut stdout,
        stderr,
        task,
    } = start_tcp_echo(&[("PORT", port.to_string())]).await;
    let line = stdout.next_line().await.unwrap();
    assert_eq!(
        line.as_deref(),
        Some(format!("tcp-echo: listening on [::]:{port}").as_str()),
        "stderr: {}",
        String::from_utf8_lossy(&stderr.contents())
    );

    let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    echo_round(addr, b"first connection\n").await;
    // Larger than one 4096-byte read, to go round the echo loop.
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    echo_round(addr, &big).await;

    assert!(!task.is_finished(), "tcp-echo stopped: {:?}", task.await);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_component_reports_a_port_in_use() {
    // Hold the port, so that the bind fails.
    let held = std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("bind [::]:0");
    let port = held.local_addr().unwrap().port();
    let TcpEcho {
        mut stdout,
        stderr,
        task,
    } = start_tcp_echo(&[("PORT", port.to_string())]).await;
    let result = task.await.expect("task").expect("no trap");
    assert_eq!(result, Err(()), "wasi:cli/run returns err");
    assert_eq!(
        String::from_utf8_lossy(&stderr.contents()),
        "tcp-echo: start-bind failed: address-in-use\n"
    );
    assert_eq!(stdout.next_line().await.unwrap(), None, "no listening line");
    drop(held);
}
