//! The ingress's data path against a direct connection and HAProxy.
//!
//! One backend (a small TCP server on its own thread and runtime, in this
//! process) serves every path; the same client code (on the main thread,
//! one runtime) measures, in one run on loopback:
//! - **bulk**: 1 GiB client → backend on one connection, until the
//!   backend acknowledged the last byte (GB/s, 10⁹ bytes);
//! - **connections**: 8 concurrent clients, each connect, one 64-byte
//!   request and its response, the backend closes, for a fixed time
//!   (conn/s);
//! - **latency**: one kept connection, 20,000 round trips of 64 bytes
//!   (p50 and p99 of the round trip, and what the path adds to direct's).
//!
//! The paths:
//! - (a) **direct** to the backend;
//! - (b) **Verge**: `verge_ingress::server::Server` serving a hand-built
//!   routing table (one endpoint, one backend, no control plane), on a
//!   runtime of its own with one worker per CPU, as `verge ingress` runs;
//! - (c) **HAProxy** (Debian's) in TCP mode with its defaults (buffered
//!   copies), one thread per CPU;
//! - (c2) the same HAProxy with `option splice-request` and
//!   `option splice-response` (zero copy, as Verge always does);
//! - (d) **Verge with PROXY v2**: the same, the endpoint writing a PROXY
//!   v2 header first, which the backend reads and skips (on a second
//!   port of the same server);
//! - (d2) the same HAProxy sending a PROXY v2 header (`send-proxy-v2`)
//!   to that port.
//!
//! Rounds interleave the paths; bulk and conn/s are the median of the
//! rounds, latency percentiles are over every round trip of every round.
//! The proxy's CPU time (Verge's ingress threads, or HAProxy's process,
//! from `schedstat`) is shown per GiB, per connection and per round trip,
//! and the backend's per connection.
//! Client, backend and proxy share the machine's cores.
//!
//! Run: `cargo bench -p verge-bench --bench ingress` (release build).
//! Needs HAProxy (`apt-get install haproxy`).

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use verge_api::manifest::{EndpointLimits, ProxyProtocol};
use verge_api::routing::{Backend, Reach, Route, RoutingTable};

const BULK_BYTES: u64 = 1 << 30;
/// What the client writes, and the backend reads, at a time.
const CHUNK: usize = 256 * 1024;
/// The request and response of the connection and latency tests.
const MSG: usize = 64;
const CONN_CLIENTS: usize = 8;
const CONN_TIME: Duration = Duration::from_millis(1500);
const ROUND_TRIPS: usize = 20_000;
const ROUNDS: usize = 5;
/// The first byte of a connection says what the backend does: count the
/// bytes to the end and answer the count, answer one message and close,
/// or answer every message.
const BULK: u8 = b'B';
const ONCE: u8 = b'C';
const ECHO: u8 = b'E';
/// The names of the ingress runtime's threads and of the backend's, to
/// find their CPU time.
const INGRESS_THREAD: &str = "verge-ingress";
const BACKEND_THREAD: &str = "bench-backend";
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

fn main() -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_start = loadavg();

    let backend = start_backend()?;
    let ingress_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus)
        .thread_name(INGRESS_THREAD)
        .enable_all()
        .build()?;
    let (verge, verge_pp) = ingress_rt.block_on(start_ingress(backend.plain, backend.proxied))?;
    let haproxy = Haproxy::start(&backend, cpus)?;

    let paths = [
        Target {
            name: "(a) direct",
            addr: backend.plain,
            cpu: Cpu::None,
        },
        Target {
            name: "(b) Verge ingress",
            addr: verge,
            cpu: Cpu::Ingress,
        },
        Target {
            name: "(c) HAProxy, tcp mode",
            addr: haproxy.plain,
            cpu: Cpu::Process(haproxy.pid()),
        },
        Target {
            name: "(c2) HAProxy, tcp + splice",
            addr: haproxy.splice,
            cpu: Cpu::Process(haproxy.pid()),
        },
        Target {
            name: "(d) Verge ingress + PROXY v2",
            addr: verge_pp,
            cpu: Cpu::Ingress,
        },
        Target {
            name: "(d2) HAProxy + PROXY v2",
            addr: haproxy.proxied,
            cpu: Cpu::Process(haproxy.pid()),
        },
    ];

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client.block_on(measure(&paths));
    let load_end = loadavg();
    let results = result?;
    drop(haproxy);
    ingress_rt.shutdown_timeout(Duration::from_secs(1));

    print_tables(&paths, &results);
    println!();
    println!(
        "{cpus} CPUs; load average (1, 5, 15 min) at start {load_start}, at end {load_end}; \
         {ROUNDS} rounds; bulk {} GiB, conn/s {CONN_CLIENTS} clients × {:?}, latency {ROUND_TRIPS} round trips of {MSG} B per round",
        BULK_BYTES >> 30,
        CONN_TIME,
    );
    Ok(())
}

/// One way to the backend.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    cpu: Cpu,
}

/// Whose CPU time is the proxy's.
#[derive(Clone, Copy)]
enum Cpu {
    None,
    /// The threads of the ingress runtime in this process.
    Ingress,
    Process(u32),
}

impl Cpu {
    /// CPU seconds spent so far.
    fn seconds(self) -> f64 {
        match self {
            Cpu::None => 0.0,
            Cpu::Ingress => task_cpu(Path::new("/proc/self/task"), Some(INGRESS_THREAD)),
            Cpu::Process(pid) => task_cpu(&PathBuf::from(format!("/proc/{pid}/task")), None),
        }
    }
}

/// The CPU time of the threads under `tasks` (`/proc/PID/task`), only
/// those named `name` if given, from `schedstat` (nanoseconds).
fn task_cpu(tasks: &Path, name: Option<&str>) -> f64 {
    let Ok(dir) = std::fs::read_dir(tasks) else {
        return 0.0;
    };
    let mut ns = 0u64;
    for task in dir.flatten() {
        let path = task.path();
        if let Some(name) = name {
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
        }
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// The CPU time of the backend's thread.
fn backend_cpu() -> f64 {
    task_cpu(Path::new("/proc/self/task"), Some(BACKEND_THREAD))
}

fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Everything measured on one path.
#[derive(Default)]
struct Results {
    /// Per round: seconds for [`BULK_BYTES`], proxy CPU seconds.
    bulk: Vec<(f64, f64)>,
    /// Per round: connections, seconds, proxy and backend CPU seconds.
    conns: Vec<(u64, f64, f64, f64)>,
    /// Every round trip, in nanoseconds.
    rtt: Vec<u64>,
    /// Proxy CPU seconds over the round trips.
    rtt_cpu: f64,
}

impl Results {
    fn gbps(&self) -> f64 {
        median(self.bulk.iter().map(|&(s, _)| BULK_BYTES as f64 / s / 1e9))
    }

    fn cpu_per_gib(&self) -> f64 {
        median(self.bulk.iter().map(|&(_, cpu)| cpu))
    }

    fn conn_rate(&self) -> f64 {
        median(self.conns.iter().map(|&(n, s, _, _)| n as f64 / s))
    }

    fn cpu_per_conn_us(&self) -> f64 {
        median(
            self.conns
                .iter()
                .map(|&(n, _, cpu, _)| cpu / n as f64 * 1e6),
        )
    }

    fn backend_cpu_per_conn_us(&self) -> f64 {
        median(
            self.conns
                .iter()
                .map(|&(n, _, _, cpu)| cpu / n as f64 * 1e6),
        )
    }

    /// The `q` quantile of the round trips in µs (`rtt` sorted).
    fn rtt_us(&self, q: f64) -> f64 {
        let i = ((self.rtt.len() as f64 * q) as usize).min(self.rtt.len() - 1);
        self.rtt[i] as f64 / 1e3
    }

    fn cpu_per_rtt_us(&self) -> f64 {
        self.rtt_cpu / self.rtt.len() as f64 * 1e6
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn measure(paths: &[Target]) -> anyhow::Result<Vec<Results>> {
    // Warm-up, not counted: every path answers, caches and pools are hot.
    for p in paths {
        bulk(p.addr, 64 << 20)
            .await
            .with_context(|| format!("{}: bulk", p.name))?;
        connections(p.addr, Duration::from_millis(200))
            .await
            .with_context(|| format!("{}: connections", p.name))?;
        round_trips(p.addr, 1000)
            .await
            .with_context(|| format!("{}: round trips", p.name))?;
    }
    let mut results: Vec<Results> = paths.iter().map(|_| Results::default()).collect();
    for round in 0..ROUNDS {
        for (p, r) in paths.iter().zip(&mut results) {
            let cpu = p.cpu.seconds();
            let t = bulk(p.addr, BULK_BYTES).await?;
            let cpu = p.cpu.seconds() - cpu;
            eprintln!(
                "round {round} {:<30} bulk {:6.2} GB/s, proxy CPU {cpu:.2} s",
                p.name,
                BULK_BYTES as f64 / t.as_secs_f64() / 1e9
            );
            r.bulk.push((t.as_secs_f64(), cpu));
        }
        for (p, r) in paths.iter().zip(&mut results) {
            let (cpu, backend) = (p.cpu.seconds(), backend_cpu());
            let (n, t) = connections(p.addr, CONN_TIME).await?;
            let (cpu, backend) = (p.cpu.seconds() - cpu, backend_cpu() - backend);
            eprintln!(
                "round {round} {:<30} {:8.0} conn/s",
                p.name,
                n as f64 / t.as_secs_f64()
            );
            r.conns.push((n, t.as_secs_f64(), cpu, backend));
        }
        for (p, r) in paths.iter().zip(&mut results) {
            let cpu = p.cpu.seconds();
            let mut rtt = round_trips(p.addr, ROUND_TRIPS).await?;
            r.rtt_cpu += p.cpu.seconds() - cpu;
            rtt.sort_unstable();
            eprintln!(
                "round {round} {:<30} rtt p50 {:6.1} µs, p99 {:6.1} µs",
                p.name,
                rtt[rtt.len() / 2] as f64 / 1e3,
                rtt[rtt.len() * 99 / 100] as f64 / 1e3
            );
            r.rtt.extend(rtt);
        }
    }
    for r in &mut results {
        r.rtt.sort_unstable();
    }
    Ok(results)
}

fn print_tables(paths: &[Target], results: &[Results]) {
    let direct = (
        results[0].gbps(),
        results[0].conn_rate(),
        results[0].rtt_us(0.5),
        results[0].rtt_us(0.99),
    );
    println!(
        "| path                         | bulk GB/s | × direct |  conn/s | × direct | p50 µs | p99 µs | added p50 µs | added p99 µs |"
    );
    println!(
        "|------------------------------|-----------|----------|---------|----------|--------|--------|--------------|--------------|"
    );
    for (p, r) in paths.iter().zip(results) {
        let (gbps, rate, p50, p99) = (r.gbps(), r.conn_rate(), r.rtt_us(0.5), r.rtt_us(0.99));
        println!(
            "| {:<28} | {gbps:>9.2} | {:>8.2} | {rate:>7.0} | {:>8.2} | {p50:>6.1} | {p99:>6.1} | {:>12.1} | {:>12.1} |",
            p.name,
            gbps / direct.0,
            rate / direct.1,
            p50 - direct.2,
            p99 - direct.3,
        );
    }
    println!();
    println!(
        "| CPU time                     | proxy s per GiB (bulk) | proxy µs per conn | proxy µs per round trip | backend µs per conn |"
    );
    println!(
        "|------------------------------|------------------------|-------------------|-------------------------|---------------------|"
    );
    for (p, r) in paths.iter().zip(results) {
        println!(
            "| {:<28} | {:>22.2} | {:>17.1} | {:>23.1} | {:>19.1} |",
            p.name,
            r.cpu_per_gib(),
            r.cpu_per_conn_us(),
            r.cpu_per_rtt_us(),
            r.backend_cpu_per_conn_us(),
        );
    }
}

// ---- The client: the same code for every path.

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `bytes` and waits for the backend's count of them.
async fn bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut chunk = vec![0x5a; CHUNK];
    chunk[0] = BULK;
    let started = Instant::now();
    let mut s = connect(addr).await?;
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
        chunk[0] = 0x5a;
    }
    s.shutdown().await?;
    let got = s.read_u64().await.context("reading the backend's count")?;
    let took = started.elapsed();
    ensure!(got == bytes, "the backend got {got} bytes of {bytes}");
    Ok(took)
}

/// `CONN_CLIENTS` clients connecting, exchanging one message and closing,
/// until `time` passed: how many connections, in how long. The backend
/// closes first (as an HTTP/1.0 server would): a client closing first
/// would leave a TIME_WAIT per connection on the 28k ephemeral ports
/// toward one address, and later connects would pay for finding a port.
async fn connections(addr: SocketAddr, time: Duration) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let until = started + time;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CONN_CLIENTS {
        clients.spawn(async move {
            let mut msg = [0x5a; MSG];
            msg[0] = ONCE;
            let mut n = 0u64;
            while Instant::now() < until {
                let mut s = connect(addr).await?;
                s.write_all(&msg).await?;
                let mut back = [0; MSG];
                s.read_exact(&mut back).await.context("reading the echo")?;
                ensure!(back == msg, "the echo differs");
                // The server closes first, so that TIME_WAIT is on its
                // side and the client's ports are free again at once.
                ensure!(s.read(&mut back).await? == 0, "more than the echo");
                drop(s);
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(n) = clients.join_next().await {
        total += n??;
    }
    Ok((total, started.elapsed()))
}

/// `n` round trips of one message on one connection, each in nanoseconds.
async fn round_trips(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut s = connect(addr).await?;
    let mut msg = [0x5a; MSG];
    msg[0] = ECHO;
    let mut back = [0; MSG];
    let mut rtt = Vec::with_capacity(n);
    for i in 0..n {
        msg[1..9].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        rtt.push(t.elapsed().as_nanos() as u64);
        ensure!(back == msg, "the echo differs");
    }
    Ok(rtt)
}

// ---- The backend: one server for every path.

struct BackendAddrs {
    /// Plain connections.
    plain: SocketAddr,
    /// Connections that start with a PROXY v2 header.
    proxied: SocketAddr,
}

/// Starts the backend on a thread and runtime of its own (one thread, as
/// the client has); it runs until the process ends.
fn start_backend() -> anyhow::Result<BackendAddrs> {
    let plain = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let proxied = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addrs = BackendAddrs {
        plain: plain.local_addr()?,
        proxied: proxied.local_addr()?,
    };
    plain.set_nonblocking(true)?;
    proxied.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(BACKEND_THREAD.into())
        .spawn(move || {
            rt.block_on(async move {
                let plain = TcpListener::from_std(plain).expect("in a runtime");
                let proxied = TcpListener::from_std(proxied).expect("in a runtime");
                tokio::join!(accept(plain, false), accept(proxied, true));
            });
        })?;
    Ok(addrs)
}

async fn accept(listener: TcpListener, proxy_header: bool) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, proxy_header).await {
                        eprintln!("backend: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("backend: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A connection's first message says what it is: bulk (count every byte
/// to the end, answer the count), once (send it back and close) or echo
/// (every message sent back).
async fn serve(mut s: TcpStream, proxy_header: bool) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    if proxy_header {
        skip_proxy_header(&mut s).await?;
    }
    let mut msg = [0; MSG];
    match s.read_exact(&mut msg).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if msg[0] == BULK {
        let mut buf = vec![0; CHUNK];
        let mut total = MSG as u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_u64(total).await?;
        s.shutdown().await?;
        return Ok(());
    }
    if msg[0] == ONCE {
        s.write_all(&msg).await?;
        s.shutdown().await?;
        return Ok(());
    }
    loop {
        s.write_all(&msg).await?;
        match s.read_exact(&mut msg).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a PROXY v2 header: 12-byte signature, version and command,
/// family, the length of the rest (big endian), the rest.
async fn skip_proxy_header(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut fixed = [0; 16];
    s.read_exact(&mut fixed)
        .await
        .context("reading the PROXY header")?;
    ensure!(fixed[..12] == SIGNATURE, "no PROXY v2 signature");
    ensure!(
        fixed[12] == 0x21,
        "not a v2 PROXY command: {:#x}",
        fixed[12]
    );
    let mut rest = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut buf = [0; 256];
    while rest > 0 {
        let n = rest.min(buf.len());
        s.read_exact(&mut buf[..n]).await?;
        rest -= n;
    }
    Ok(())
}

// ---- Verge's ingress, in this process.

/// Applies a table of two endpoints (plain and PROXY v2) to a new server;
/// returns their IPv4 addresses.
async fn start_ingress(
    backend: SocketAddr,
    backend_proxied: SocketAddr,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let server = verge_ingress::server::Server::new(
        None,
        Arc::new(verge_ingress::metrics::Metrics::default()),
    );
    let route = |id: &str, port: u16, backend: SocketAddr, pp: Option<ProxyProtocol>| Route {
        id: id.into(),
        name: id.into(),
        org: "bench".into(),
        app: "bench".into(),
        env: "bench".into(),
        workload: "echo".into(),
        ipv6: Ipv6Addr::LOCALHOST,
        ipv4: Some(Ipv4Addr::LOCALHOST),
        ports: vec![port],
        internal_port: backend.port(),
        proxy_protocol: pp,
        limits: EndpointLimits {
            idle_timeout_ms: 60_000,
            max_connections: 100_000,
            // Per source and second: high enough never to refuse here, but
            // set, so that admission does the limiter's work as it would.
            rate_limit: 1_000_000,
            drain_timeout_ms: 1_000,
        },
        backends: vec![Backend {
            instance: format!("{id}-0"),
            node: "node".into(),
            node_name: "node".into(),
            address: backend,
            reach: Reach::Direct,
        }],
    };
    let (port, port_pp) = (free_port()?, free_port()?);
    let table = RoutingTable {
        version: "bench".into(),
        ipv6_prefix: None,
        ipv4_pool: None,
        endpoints: vec![
            route("plain", port, backend, None),
            route("proxied", port_pp, backend_proxied, Some(ProxyProtocol::V2)),
        ],
    };
    server.apply(&table).await;
    let addrs = (
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port_pp),
    );
    for l in server.listeners() {
        if l.address == addrs.0 || l.address == addrs.1 {
            ensure!(
                l.error.is_none(),
                "the ingress does not listen on {}: {:?}",
                l.address,
                l.error
            );
        }
    }
    // As the daemon does: bounds the rate limiter's memory.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            server.housekeeping();
        }
    });
    Ok(addrs)
}

/// A port free on both 127.0.0.1 and ::1 right now.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let v4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = v4.local_addr()?.port();
        if std::net::TcpListener::bind((IpAddr::V6(Ipv6Addr::LOCALHOST), port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free on both 127.0.0.1 and ::1")
}

// ---- HAProxy, as a child.

/// A running `haproxy -db`, killed when dropped.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    plain: SocketAddr,
    splice: SocketAddr,
    /// Sends a PROXY v2 header to the backend first.
    proxied: SocketAddr,
}

impl Haproxy {
    fn start(backend: &BackendAddrs, threads: usize) -> anyhow::Result<Haproxy> {
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| {
                let path = std::env::var_os("PATH")?;
                std::env::split_paths(&path)
                    .map(|d| d.join("haproxy"))
                    .find(|p| p.is_file())
            })
            .context("haproxy is missing: apt-get install haproxy")?;
        let plain = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
        let splice = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
        let proxied = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
        let (to, to_proxied) = (backend.plain, backend.proxied);
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n\
                 \x20   maxconn 4000\n\
                 \x20   nbthread {threads}\n\
                 defaults\n\
                 \x20   mode tcp\n\
                 \x20   maxconn 4000\n\
                 \x20   timeout connect 5s\n\
                 \x20   timeout client 60s\n\
                 \x20   timeout server 60s\n\
                 frontend plain\n\
                 \x20   bind {plain}\n\
                 \x20   default_backend plain\n\
                 backend plain\n\
                 \x20   server b {to}\n\
                 frontend splice\n\
                 \x20   bind {splice}\n\
                 \x20   option splice-request\n\
                 \x20   option splice-response\n\
                 \x20   default_backend splice\n\
                 backend splice\n\
                 \x20   option splice-request\n\
                 \x20   option splice-response\n\
                 \x20   server b {to}\n\
                 frontend proxied\n\
                 \x20   bind {proxied}\n\
                 \x20   default_backend proxied\n\
                 backend proxied\n\
                 \x20   server b {to_proxied} send-proxy-v2\n"
            ),
        )?;
        let log = dir.path().join("haproxy.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut haproxy = Haproxy {
            child,
            dir,
            plain,
            splice,
            proxied,
        };
        let until = Instant::now() + Duration::from_secs(10);
        for addr in [plain, splice, proxied] {
            loop {
                if let Some(status) = haproxy.child.try_wait()? {
                    bail!("haproxy exited ({status}):\n{}", haproxy.output());
                }
                match std::net::TcpStream::connect(addr) {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= until => {
                        bail!(
                            "haproxy does not listen on {addr} ({e}):\n{}",
                            haproxy.output()
                        )
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Ok(haproxy)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("haproxy.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
