//! Starting an instance, beside runc starting the same rootfs.
//!
//! The `hello` image is built and its layer unpacked once (a cached image).
//! Then, interleaved, N times each:
//! - **Verge**: `ProcessRuntime::start` (shim, namespaces, cgroup with
//!   limits, overlayfs, /dev, /proc, pivot_root, exec) until `hello`
//!   accepts a TCP connection; then `stop` + `remove`.
//! - **Peer (runc)**: mounting the same overlayfs (what containerd's
//!   snapshotter does before runc) and `runc run -d` of an OCI bundle with
//!   the same namespaces, limits and capabilities, until `hello` accepts a
//!   connection; then `runc delete --force`, unmount, remove the dirs.
//!
//! Both run on the host network (no network namespace), each instance on
//! its own port. A third, Verge-only series adds what an assignment costs
//! on a node on top of the cached image: the instance's network namespace,
//! veth pair and addresses (`net::Network::setup`), then `start` in that
//! namespace until `hello` accepts on the instance's private IPv6 address;
//! and `stop` + `remove` + `Network::remove`. Needs root and Debian's `runc`.
//!
//! A fourth series starts a wasm instance as the node does (compiled code
//! from its cache, a pooled instance, the `tcp-echo` component's
//! `wasi:cli/run` on a task) until it accepts on `[::1]:PORT`, then stops it.
//!
//! Run: `cargo bench -p verge-bench --bench start` (release build). This
//! binary is also the shim (`/proc/self/exe __verge-shim <dir>`), as the
//! `verge` binary is in production.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use verge_api::wire::Isolation;
use verge_node::logs::{Capture, LogLimits};
use verge_node::net::{NetConfig, Network};
use verge_node::runtime::{LaunchSpec, ProcessRuntime, RuntimeConfig, SHIM_ARG, shim_main};
use verge_node::wasm::{Guest, LogSink, Outcome, WasmConfig, WasmRuntime};

const RUNS: usize = 20;
const MEMORY: u64 = 256 * 1024 * 1024;
const CPU: f64 = 1.0;
const PIDS: u64 = 1024;
const VERGE_CGROUP_PARENT: &str = "verge-bench";
const RUNC_CGROUP_PARENT: &str = "verge-bench-runc";
/// The capabilities Verge keeps (Docker's default set less CAP_MKNOD).
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, arg, dir] = args.as_slice()
        && arg == SHIM_ARG
    {
        shim_main(Path::new(dir));
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("this benchmark creates namespaces, mounts and cgroups: run it as root");
    }
    let runc = Command::new("runc").arg("--version").output();
    if !runc.is_ok_and(|o| o.status.success()) {
        bail!("runc is missing: apt-get install runc");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = tokio::task::spawn_blocking(move || verge_images::build_hello(&root)).await??;
    let image = verge_images::hello_image(&binary)?;
    let tmp = tempfile::tempdir()?;
    let layer = tmp.path().join("layer");
    verge_images::unpack_layer(&image.layers[0].data, &layer)?;

    let rt = ProcessRuntime::new(RuntimeConfig {
        root: tmp.path().join("verge/instances"),
        cgroup_parent: VERGE_CGROUP_PARENT.into(),
        isolation: Isolation::Namespaces,
        shim_exe: "/proc/self/exe".into(),
    })?;
    let runc_root = tmp.path().join("runc");
    std::fs::create_dir_all(&runc_root)?;

    let net = Network::new(NetConfig {
        netns_dir: tmp.path().join("netns"),
        ..NetConfig::new(tmp.path(), "fd76:6265:6e63:1::/64".parse()?)
    })
    .await?;

    let wasm = WasmRuntime::new(WasmConfig {
        cache_dir: tmp.path().join("wasm-cache"),
        max_instances: 100,
        max_memory: 1 << 30,
    })?;
    let component = verge_images::wasm_example("tcp-echo")?;
    let component_path = tmp.path().join("tcp-echo.wasm");
    std::fs::write(&component_path, &component)?;
    let digest = verge_images::sha256_digest(&component);
    let compile = Instant::now();
    wasm.load(&digest, &component_path).await?;
    let compiled = compile.elapsed();
    std::fs::create_dir_all(tmp.path().join("wasm-logs"))?;
    let logs = Arc::new(Mutex::new(Capture::open(
        &tmp.path().join("wasm-logs"),
        LogLimits::default(),
    )?));

    let mut verge = Samples::default();
    let mut runc = Samples::default();
    let mut networked = Samples::default();
    let mut wasm_runs = Samples::default();
    // One warm-up of each, not counted.
    for i in 0..=RUNS {
        let v = verge_once(&rt, &layer, i, None).await?;
        let r = runc_once(&runc_root, &layer, i)?;
        let n = verge_once(&rt, &layer, i + RUNS + 1, Some(&net)).await?;
        let w = wasm_once(&wasm, &digest, &component_path, &logs).await?;
        if i > 0 {
            verge.push(v);
            runc.push(r);
            networked.push(n);
            wasm_runs.push(w);
        }
    }
    // The parents of both sides' cgroups, in every hierarchy.
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        for parent in [VERGE_CGROUP_PARENT, RUNC_CGROUP_PARENT] {
            let _ = std::fs::remove_dir(hierarchy.path().join(parent));
        }
    }
    println!("| operation                                    | runs |  p50 ms |  p90 ms |");
    println!("|----------------------------------------------|------|---------|---------|");
    row(
        "verge: start() returned (command executed)",
        &mut verge.returned,
    );
    row(
        "runc (peer): mount + `runc run -d` returned",
        &mut runc.returned,
    );
    row("verge: start until hello accepts", &mut verge.accepting);
    row(
        "runc (peer): start until hello accepts",
        &mut runc.accepting,
    );
    row("verge: stop + remove", &mut verge.stopped);
    row("runc (peer): delete --force + cleanup", &mut runc.stopped);
    row(
        "verge + netns/veth: assignment until accepts",
        &mut networked.accepting,
    );
    row(
        "verge + netns/veth: stop + remove all",
        &mut networked.stopped,
    );
    row(
        "wasm: load (cached) + instantiate returned",
        &mut wasm_runs.returned,
    );
    row(
        "wasm: start until tcp-echo accepts",
        &mut wasm_runs.accepting,
    );
    row("wasm: stop (interrupt) + teardown", &mut wasm_runs.stopped);
    println!(
        "\nwasm: compiling tcp-echo the first time (a cache miss) took {:.1} ms",
        compiled.as_secs_f64() * 1e3
    );
    Ok(())
}

/// A wasm instance of `tcp-echo` (a WASI preview 2 component serving with
/// WASI sockets on the host's network here), as the node starts one: the
/// compiled code from the cache, a pooled instance, `wasi:cli/run` on a
/// task, until it accepts on `[::1]:PORT`; then stopped.
async fn wasm_once(
    wasm: &WasmRuntime,
    digest: &str,
    path: &Path,
    logs: &LogSink,
) -> anyhow::Result<Sample> {
    let port = free_port()?;
    let start = Instant::now();
    let (program, _) = wasm.load(digest, path).await?;
    let stop = CancellationToken::new();
    let guest = Guest {
        args: vec!["tcp-echo".into()],
        env: vec![("PORT".into(), port.to_string())],
        preopens: Vec::new(),
        memory: MEMORY,
        cpu: CPU,
        max_cpu_time: Duration::from_secs(10),
        network: true,
        stdin: None,
        stdout: None,
        logs: logs.clone(),
        stop: stop.clone(),
    };
    let run = tokio::spawn(async move { program.run(guest).await });
    let returned = start.elapsed();
    let addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    tokio::task::spawn_blocking(move || wait_for(addr)).await??;
    let accepting = start.elapsed();
    let t = Instant::now();
    stop.cancel();
    let outcome = run.await?;
    anyhow::ensure!(outcome == Outcome::Stopped, "tcp-echo ended {outcome:?}");
    Ok(Sample {
        returned,
        accepting,
        stopped: t.elapsed(),
    })
}

/// One run: when the start call returned, when the port accepted, and how
/// long stopping and cleaning up took.
struct Sample {
    returned: Duration,
    accepting: Duration,
    stopped: Duration,
}

#[derive(Default)]
struct Samples {
    returned: Vec<Duration>,
    accepting: Vec<Duration>,
    stopped: Vec<Duration>,
}

impl Samples {
    fn push(&mut self, s: Sample) {
        self.returned.push(s.returned);
        self.accepting.push(s.accepting);
        self.stopped.push(s.stopped);
    }
}

fn row(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let at =
        |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "| {name:<44} | {:>4} | {:>7.1} | {:>7.1} |",
        samples.len(),
        at(0.5),
        at(0.9)
    );
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls until something accepts on `port` of loopback (10 s at most).
fn wait_for_port(port: u16) -> anyhow::Result<()> {
    wait_for(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Polls until something accepts at `addr` (10 s at most).
fn wait_for(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing accepted on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// One Verge run; with `net`, in the instance's own network namespace,
/// timed from before `Network::setup` and probed on its private address.
async fn verge_once(
    rt: &ProcessRuntime,
    layer: &Path,
    i: usize,
    net: Option<&Network>,
) -> anyhow::Result<Sample> {
    let id = format!("bench{i}");
    let t = Instant::now();
    let (netns, addr) = match net {
        Some(net) => {
            let n = net.setup(&id).await?;
            (Some(n.netns), std::net::SocketAddr::from((n.v6, 8080)))
        }
        None => (
            None,
            std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        ),
    };
    let spec = LaunchSpec {
        instance_id: id.clone(),
        layers: vec![layer.to_path_buf()],
        argv: vec!["/hello".into(), "--port".into(), addr.port().to_string()],
        env: vec![("VERGE_INSTANCE_ID".into(), id.clone())],
        working_dir: None,
        user: None,
        hostname: id.clone(),
        cpu: CPU,
        memory: MEMORY,
        pids: PIDS,
        netns,
    };
    let instance = rt.start(spec).await?;
    let returned = t.elapsed();
    tokio::task::spawn_blocking(move || wait_for(addr)).await??;
    let accepting = t.elapsed();
    let t = Instant::now();
    let exit = instance.stop(Duration::from_secs(5)).await;
    rt.remove(&id).await?;
    if let Some(net) = net {
        net.remove(&id).await?;
    }
    let stopped = t.elapsed();
    if exit.start_failed {
        bail!("verge: {}", exit.describe());
    }
    Ok(Sample {
        returned,
        accepting,
        stopped,
    })
}

fn runc_once(state: &Path, layer: &Path, i: usize) -> anyhow::Result<Sample> {
    let id = format!("runc-bench{i}");
    let port = free_port()?;
    let bundle = state.join(format!("bundle{i}"));
    let rootfs = bundle.join("rootfs");
    for d in [&rootfs, &bundle.join("upper"), &bundle.join("work")] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        bundle.join("config.json"),
        oci_config(&id, port).to_string(),
    )?;
    let log = std::fs::File::create(bundle.join("stdout.log"))?;

    let t = Instant::now();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        layer.display(),
        bundle.join("upper").display(),
        bundle.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .context("mounting the overlay for runc")?;
    let status = Command::new("runc")
        .arg("--root")
        .arg(state.join("state"))
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    if !status.success() {
        bail!(
            "runc run failed: {}",
            std::fs::read_to_string(bundle.join("stdout.log"))?
        );
    }
    let returned = t.elapsed();
    wait_for_port(port)?;
    let accepting = t.elapsed();

    let t = Instant::now();
    let status = Command::new("runc")
        .arg("--root")
        .arg(state.join("state"))
        .args(["delete", "--force", &id])
        .status()?;
    if !status.success() {
        bail!("runc delete failed");
    }
    nix::mount::umount2(&rootfs, nix::mount::MntFlags::empty())
        .context("unmounting runc's overlay")?;
    std::fs::remove_dir_all(&bundle)?;
    Ok(Sample {
        returned,
        accepting,
        stopped: t.elapsed(),
    })
}

/// An OCI runtime config like what Verge sets up: PID, mount, IPC and UTS
/// namespaces (host network), the same mounts, limits and capabilities.
fn oci_config(id: &str, port: u16) -> serde_json::Value {
    let quota = (CPU * 100_000.0) as i64;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/hello", "--port", port.to_string()],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                format!("VERGE_INSTANCE_ID={id}"),
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": CAPS,
                "effective": CAPS,
                "permitted": CAPS,
            },
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "cgroupsPath": format!("/{RUNC_CGROUP_PARENT}/{id}"),
            "resources": {
                "memory": {"limit": MEMORY, "swap": MEMORY},
                "cpu": {"quota": quota, "period": 100_000},
                "pids": {"limit": PIDS},
            },
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats", "/proc/acpi", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    })
}
