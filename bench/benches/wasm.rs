//! WebAssembly workloads: per-connection instantiation, and connections
//! through the ingress, beside processes.
//!
//! **Instantiate** (in this process): the `echo` example (a WASI preview 1
//! module) loaded once through the node's `WasmRuntime` (compiled code,
//! pooling allocator, pre-instantiation), then N times
//! `Program::run` with an empty stdin: a fresh instance from the pool,
//! WASI context, `_start` (the greeting, EOF, return) and teardown: what a
//! per-connection workload does for each connection. Peer: what a process
//! per connection costs (inetd-style): `posix_spawn` of the static
//! `/bin/busybox cat` with the same empty stdin, until it exited. Each
//! one-at-a-time (latency p50/p99) and on 8 concurrent tasks (runs/s).
//!
//! **Through the ingress** (a real cluster: control plane, `verge node` in
//! its own network namespace, `verge ingress`, the registry; what
//! tests/tests/wasm.rs runs): three workloads behind three endpoints:
//! - **process**: `hello` (a process greeting then echoing);
//! - **wasm per-connection**: `echo`, a fresh instance per connection;
//! - **wasm long-running**: `tcp-echo`, one component instance serving
//!   with WASI sockets (it serves one connection at a time by design).
//!
//! Each connection: connect to the endpoint, read the greeting line, send
//! 64 bytes, read them back, close. One client in sequence (p50/p99 of the
//! whole connection, conn/s), then 8 concurrent clients for a fixed time
//! (conn/s; not for tcp-echo, which serves one at a time).
//!
//! Cold start of a wasm instance beside a process and runc is in the
//! `start` benchmark.
//!
//! Run: `cargo build --release -p verge && cargo bench -p verge-bench
//! --bench wasm` (release build, as root: namespaces, the registry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use verge_node::logs::{Capture, LogLimits};
use verge_node::wasm::{Guest, Outcome, Program, WasmConfig, WasmRuntime};
use verge_tests::cluster::{Cluster, DEADLINE, v6};
use verge_tests::control::Backend;
use verge_tests::eventually;

const RUNS: usize = 2_000;
const CONCURRENT: usize = 8;
const CONNECTIONS: usize = 500;
const TIMED: Duration = Duration::from_secs(5);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(label: &str, rate: f64, lat: &mut [Duration]) {
    lat.sort();
    println!(
        "| {label:<44} | {rate:>9.0} | {:>8.1} | {:>8.1} |",
        percentile(lat, 0.5).as_secs_f64() * 1e6,
        percentile(lat, 0.99).as_secs_f64() * 1e6
    );
}

fn guest(logs: &Arc<Mutex<Capture>>) -> Guest {
    Guest {
        args: vec!["echo".into()],
        env: Vec::new(),
        preopens: Vec::new(),
        memory: 16 << 20,
        cpu: 1.0,
        max_cpu_time: Duration::from_secs(10),
        network: false,
        stdin: Some(Box::new(tokio::io::empty())),
        stdout: Some(Box::new(tokio::io::sink())),
        logs: logs.clone(),
        stop: CancellationToken::new(),
    }
}

async fn run_wasm(program: &Program, logs: &Arc<Mutex<Capture>>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    match program.run(guest(logs)).await {
        Outcome::Exited(0) => Ok(t.elapsed()),
        other => anyhow::bail!("echo ended {other:?}"),
    }
}

async fn run_process() -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = tokio::process::Command::new("/bin/busybox")
        .arg("cat")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "busybox cat: {status}");
    Ok(t.elapsed())
}

/// One-at-a-time latencies, then runs/s on [`CONCURRENT`] tasks.
async fn series<F, Fut>(op: F) -> anyhow::Result<(Vec<Duration>, f64)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Duration>> + Send,
{
    for _ in 0..50 {
        op().await?;
    }
    let mut lat = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        lat.push(op().await?);
    }
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        let op = op.clone();
        tasks.spawn(async move {
            for _ in 0..RUNS / CONCURRENT {
                op().await?;
            }
            anyhow::Ok(())
        });
    }
    for r in tasks.join_all().await {
        r?;
    }
    let rate = (RUNS / CONCURRENT * CONCURRENT) as f64 / t.elapsed().as_secs_f64();
    Ok((lat, rate))
}

async fn instantiate(dir: &Path) -> anyhow::Result<()> {
    let rt = WasmRuntime::new(WasmConfig {
        cache_dir: dir.join("cache"),
        max_instances: 1000,
        max_memory: 1 << 30,
    })?;
    let wasm = verge_images::wasm_example("echo")?;
    let path = dir.join("echo.wasm");
    std::fs::write(&path, &wasm)?;
    let digest = verge_images::sha256_digest(&wasm);
    let (program, _) = rt.load(&digest, &path).await?;
    let logs_dir = dir.join("logs");
    std::fs::create_dir_all(&logs_dir)?;
    let logs = Arc::new(Mutex::new(Capture::open(&logs_dir, LogLimits::default())?));

    println!("\nPer-connection instantiation, {RUNS} runs each:\n");
    println!(
        "| {:<44} | {:>9} | {:>8} | {:>8} |",
        "one connection's instance", "runs/s×8", "p50 µs", "p99 µs"
    );
    println!("|{:-<46}|{:-<11}|{:-<10}|{:-<10}|", "", "", "", "");
    let p = program.clone();
    let l = logs.clone();
    let (mut lat, rate) = series(move || {
        let (p, l) = (p.clone(), l.clone());
        async move { run_wasm(&p, &l).await }
    })
    .await?;
    row(
        "wasm: Program::run of echo (pooled instance)",
        rate,
        &mut lat,
    );
    let (mut lat, rate) = series(run_process).await?;
    row("peer: spawn /bin/busybox cat (a process)", rate, &mut lat);
    Ok(())
}

/// One connection: greeting line, 64 bytes there and back, close.
async fn connection(addr: SocketAddr) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        anyhow::ensure!(s.read(&mut b).await? == 1, "closed before the greeting");
        line.push(b[0]);
    }
    let msg = [b'x'; 64];
    s.write_all(&msg).await?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await?;
    anyhow::ensure!(back == msg, "not echoed");
    drop(s);
    Ok(t.elapsed())
}

async fn through_ingress() -> anyhow::Result<()> {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let hello = c.registry.push_hello().await;
    let echo = c.registry.push_wasm("echo").await;
    let tcp = c.registry.push_wasm("tcp-echo").await;
    let _ingress = c.ingress().await;
    c.deploy_raw(&format!(
        "[workloads.proc]\nimage = \"{hello}\"\ncount = 1\ncpu = 1\nmemory = \"64Mi\"\n\
         [workloads.per]\nruntime = \"wasm\"\nimage = \"{echo}\"\nmode = \"per-connection\"\nmemory = \"16Mi\"\ncpu = 1\nconcurrency = 1000\n\
         [workloads.long]\nruntime = \"wasm\"\nimage = \"{tcp}\"\ncount = 1\ncpu = 1\nmemory = \"32Mi\"\n\
         [[endpoints]]\nname = \"proc\"\nworkload = \"proc\"\nport = 80\ninternal_port = 8080\nmax_connections = 100000\nrate_limit = 100000\n\
         [[endpoints]]\nname = \"per\"\nworkload = \"per\"\nport = 81\ninternal_port = 7000\nmax_connections = 100000\nrate_limit = 100000\n\
         [[endpoints]]\nname = \"long\"\nworkload = \"long\"\nport = 82\ninternal_port = 8080\nmax_connections = 100000\nrate_limit = 100000\n"
    ))
    .await
    .ok();
    let mut addrs = BTreeMap::new();
    for (name, port) in [("proc", 80), ("per", 81), ("long", 82)] {
        let ip = c.endpoint(name).await["ipv6"]
            .as_str()
            .context("endpoint address")?
            .to_string();
        let addr = v6(&ip, port);
        eventually(DEADLINE, &format!("{name} answers"), || async {
            connection(addr).await.ok()
        })
        .await;
        addrs.insert(name, addr);
    }
    println!(
        "\nThrough the ingress, {CONNECTIONS} connections one at a time, then {CONCURRENT} clients for {TIMED:?}:\n"
    );
    println!(
        "| {:<44} | {:>9} | {:>9} | {:>8} | {:>8} |",
        "workload", "conn/s×1", "conn/s×8", "p50 µs", "p99 µs"
    );
    println!(
        "|{:-<46}|{:-<11}|{:-<11}|{:-<10}|{:-<10}|",
        "", "", "", "", ""
    );
    for (name, label) in [
        ("proc", "process (hello)"),
        ("per", "wasm per-connection (echo)"),
        ("long", "wasm long-running (tcp-echo)"),
    ] {
        let addr = addrs[name];
        for _ in 0..50 {
            connection(addr).await?;
        }
        let t = Instant::now();
        let mut lat = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            lat.push(connection(addr).await?);
        }
        let seq = CONNECTIONS as f64 / t.elapsed().as_secs_f64();
        let conc = if name == "long" {
            "-".to_string()
        } else {
            let t = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..CONCURRENT {
                tasks.spawn(async move {
                    let mut n = 0u64;
                    while t.elapsed() < TIMED {
                        connection(addr).await?;
                        n += 1;
                    }
                    anyhow::Ok(n)
                });
            }
            let mut n = 0;
            for r in tasks.join_all().await {
                n += r?;
            }
            format!("{:.0}", n as f64 / t.elapsed().as_secs_f64())
        };
        lat.sort();
        println!(
            "| {label:<44} | {seq:>9.0} | {conc:>9} | {:>8.1} | {:>8.1} |",
            percentile(&lat, 0.5).as_secs_f64() * 1e6,
            percentile(&lat, 0.99).as_secs_f64() * 1e6
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        instantiate(dir.path()).await?;
        through_ingress().await
    })
}
