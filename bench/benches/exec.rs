//! Exec sessions through the whole real path, beside the tools that enter
//! a container's namespaces directly.
//!
//! A real cluster ([`verge_tests::cluster::Cluster`]: the `verge` control
//! plane on SQLite, one `verge node` in its network namespace, a registry
//! with `hello-debug`, the hello workload with a static busybox), one
//! instance of it. Then, in one run:
//!
//! - **Round trip**: one long session of `cat` with stdin on each path,
//!   and [`ROUND_TRIPS`] one-byte round trips in [`ROUNDS`] interleaved
//!   rounds (after [`WARM_UP`] not counted): write one byte, wait until
//!   it came back. The client of every path is this process's one thread
//!   (a current-thread Tokio runtime).
//!   - Verge: `Client::exec` (the CLI's client: HTTP/1.1 upgrade to the
//!     control plane, a QUIC stream to the node, the node's exec helper,
//!     `cat` in the instance's namespaces and cgroup); `Stdin` frame of
//!     one byte out, `Stdout` frame of one byte back.
//!   - (a) a local `/bin/busybox cat` child over pipes (tokio process):
//!     the floor of any one-byte round trip between two processes.
//!   - (b) `nsenter --target <workload pid> --mount --uts --ipc --net --pid
//!     -- /bin/cat` (util-linux): what `docker exec` / `runc exec` do at
//!     their core, with the pipes straight to the command.
//!   - (c) `runc exec <id> /bin/cat` in a runc container of the same
//!     rootfs (runc passes its stdio straight to the command).
//! - **Session start**: [`SESSIONS`] sessions of `true` on each path,
//!   interleaved, from the request until the exit is known: Verge until
//!   its `Exit(0)` frame (and, separately, until the `101` that says the
//!   command started); nsenter and runc until the process exited; a local
//!   `/bin/busybox true` as the floor of starting any process.
//!
//! Needs root, `nsenter`, Debian's `docker-registry`, a static
//! `/bin/busybox`, and a release build of `verge` next to this binary
//! (`cargo build --release -p verge`); `runc` is optional (its rows are
//! skipped without it).
//!
//! Run: `cargo bench -p verge-bench --bench exec` (release build).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use verge_api::client::{Client, EnvScope};
use verge_api::exec::{ExecRequest, Frame};
use verge_tests::cluster::Cluster;
use verge_tests::control::Backend;

/// One-byte round trips per path, over all rounds.
const ROUND_TRIPS: usize = 2000;
/// Rounds the round trips are split in, each running every path in turn.
const ROUNDS: usize = 20;
/// Round trips per path before measuring, not counted.
const WARM_UP: usize = 200;
/// Sessions of `true` per path (after 5 not counted).
const SESSIONS: usize = 50;
const SCOPE: EnvScope<'static> = EnvScope {
    org: "acme",
    app: "hello",
    env: "prod",
};
const RUNC_CGROUP_PARENT: &str = "verge-bench-exec-runc";

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this benchmark runs a node (namespaces, cgroups, veth) and nsenter: run it as root");
    }
    // The cluster runs the `verge` next to this binary (target/release),
    // or VERGE_TEST_BIN.
    if std::env::var_os("VERGE_TEST_BIN").is_none() {
        let exe = std::env::current_exe()?;
        let verge = exe
            .parent()
            .and_then(Path::parent)
            .context("target dir")?
            .join("verge");
        ensure!(
            verge.is_file(),
            "{} is missing: `cargo build --release -p verge` first",
            verge.display()
        );
    }
    // One thread, as a CLI runs: every path's client is woken on the
    // thread that polls its socket or pipe.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    verge_tests::init_tls();
    let load_start = loadavg();
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let node = c.node(1, "n1", &[], true).await;
    let image = c.registry.push_debug().await;
    let run = c
        .deploy_raw(&format!(
            "[workloads.web]\nimage = \"{image}\"\ncount = 1\ncpu = 1.0\nmemory = \"128Mi\"\n"
        ))
        .await;
    ensure!(run.success(), "deploy failed: {}", run.stderr());
    let instances = c.running(1).await;
    let id = instances[0]["id"]
        .as_str()
        .context("the instance has an id")?
        .to_string();
    let pid_file = node.data_dir.path().join("instances").join(&id).join("pid");
    let pid = first_number(&pid_file)?;
    eprintln!("instance {id}, workload pid {pid}");

    let vars: std::collections::HashMap<String, String> = c.cli.env_vars().into_iter().collect();
    let client = Client::new(
        &vars["VERGE_SERVER"],
        Some(vars["VERGE_TOKEN"].as_str()),
        None,
    )?;

    let runc = Runc::start(c.dir.path()).await?;

    // ---- Round trips.
    let nsenter_args = |cmd: &str| -> Vec<String> {
        let mut a: Vec<String> = ["--target", &pid.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(
            ["--mount", "--uts", "--ipc", "--net", "--pid", "--", cmd]
                .iter()
                .map(|s| s.to_string()),
        );
        a
    };
    let mut verge = VergeCat::open(&client, &id).await?;
    let mut local = PipeCat::spawn("/bin/busybox", &["cat".into()])?;
    let mut nsenter = PipeCat::spawn("nsenter", &nsenter_args("/bin/cat"))?;
    let mut runc_cat = match &runc {
        Some(r) => Some(PipeCat::spawn(
            "runc",
            &r.args(&["exec", &r.id, "/bin/cat"]),
        )?),
        None => None,
    };
    verge.round_trips(WARM_UP).await?;
    local.round_trips(WARM_UP).await?;
    nsenter.round_trips(WARM_UP).await?;
    if let Some(r) = &mut runc_cat {
        r.round_trips(WARM_UP).await?;
    }
    let mut rtt: [Vec<Duration>; 4] = Default::default();
    for _ in 0..ROUNDS {
        let n = ROUND_TRIPS / ROUNDS;
        rtt[0].extend(local.round_trips(n).await?);
        rtt[1].extend(verge.round_trips(n).await?);
        rtt[2].extend(nsenter.round_trips(n).await?);
        if let Some(r) = &mut runc_cat {
            rtt[3].extend(r.round_trips(n).await?);
        }
    }
    verge.close().await?;
    local.close().await?;
    nsenter.close().await?;
    if let Some(r) = runc_cat {
        r.close().await?;
    }

    // ---- Session start.
    let mut starts: [Vec<Duration>; 5] = Default::default();
    let true_args = nsenter_args("/bin/true");
    for i in 0..SESSIONS + 5 {
        let t = Instant::now();
        run_to_exit("/bin/busybox", &["true".into()]).await?;
        let local = t.elapsed();
        let (verge_started, verge_exit) = verge_true(&client, &id).await?;
        let t = Instant::now();
        run_to_exit("nsenter", &true_args).await?;
        let nsenter = t.elapsed();
        let runc_exec = match &runc {
            Some(r) => {
                let t = Instant::now();
                run_to_exit("runc", &r.args(&["exec", &r.id, "/bin/true"])).await?;
                Some(t.elapsed())
            }
            None => None,
        };
        if i >= 5 {
            starts[0].push(local);
            starts[1].push(verge_started);
            starts[2].push(verge_exit);
            starts[3].push(nsenter);
            starts[4].extend(runc_exec);
        }
    }
    if let Some(r) = runc {
        r.stop().await?;
    }
    let load_end = loadavg();
    drop(node);
    drop(c);

    for v in rtt.iter_mut().chain(starts.iter_mut()) {
        v.sort_unstable();
    }
    let runc_missing = "(c) runc exec: skipped (runc is missing)";
    println!();
    println!(
        "| one-byte round trip                          |    n | p50 µs | p99 µs | mean µs | added p50 µs | added p99 µs |"
    );
    println!(
        "|----------------------------------------------|------|--------|--------|---------|--------------|--------------|"
    );
    let floor = (at(&rtt[0], 0.5), at(&rtt[0], 0.99));
    for (name, v) in [
        ("(a) local busybox cat, pipes (floor)", &rtt[0]),
        ("Verge: exec -i cat (client → CP → node)", &rtt[1]),
        ("(b) nsenter … /bin/cat, pipes", &rtt[2]),
        ("(c) runc exec … /bin/cat, pipes", &rtt[3]),
    ] {
        if v.is_empty() {
            println!("| {runc_missing:<44} |");
            continue;
        }
        us_row(name, v, floor);
    }
    println!();
    println!(
        "| session start, `true` until its exit         |    n | p50 ms | p99 ms | mean ms | added p50 ms | added p99 ms |"
    );
    println!(
        "|----------------------------------------------|------|--------|--------|---------|--------------|--------------|"
    );
    let floor = (at(&starts[0], 0.5), at(&starts[0], 0.99));
    for (name, v) in [
        ("(a) local busybox true, spawn + wait (floor)", &starts[0]),
        ("Verge: exec true → 101 (command started)", &starts[1]),
        ("Verge: exec true → Exit(0) frame", &starts[2]),
        ("(b) nsenter … /bin/true", &starts[3]),
        ("(c) runc exec … /bin/true", &starts[4]),
    ] {
        if v.is_empty() {
            println!("| {runc_missing:<44} |");
            continue;
        }
        ms_row(name, v, floor);
    }
    println!();
    println!(
        "{} CPUs; load average (1, 5, 15 min) at start {load_start}, at end {load_end}; \
         {ROUND_TRIPS} round trips per path in {ROUNDS} rounds, {SESSIONS} sessions per path",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// The `q` quantile of sorted `v`, in seconds.
fn at(v: &[Duration], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64()
}

fn mean(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64
}

fn us_row(name: &str, v: &[Duration], floor: (f64, f64)) {
    let (p50, p99) = (at(v, 0.5), at(v, 0.99));
    println!(
        "| {name:<44} | {:>4} | {:>6.1} | {:>6.1} | {:>7.1} | {:>12.1} | {:>12.1} |",
        v.len(),
        p50 * 1e6,
        p99 * 1e6,
        mean(v) * 1e6,
        (p50 - floor.0) * 1e6,
        (p99 - floor.1) * 1e6,
    );
}

fn ms_row(name: &str, v: &[Duration], floor: (f64, f64)) {
    let (p50, p99) = (at(v, 0.5), at(v, 0.99));
    println!(
        "| {name:<44} | {:>4} | {:>6.2} | {:>6.2} | {:>7.2} | {:>12.2} | {:>12.2} |",
        v.len(),
        p50 * 1e3,
        p99 * 1e3,
        mean(v) * 1e3,
        (p50 - floor.0) * 1e3,
        (p99 - floor.1) * 1e3,
    );
}

fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The first number in a file (the node's `pid` file is `<pid> <start>`).
fn first_number(path: &Path) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

/// The next frame on `io`, with `buf` holding what was read past the last.
async fn next_frame(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> anyhow::Result<Frame> {
    loop {
        if let Some((frame, used)) = Frame::decode(buf)? {
            buf.drain(..used);
            return Ok(frame);
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        ensure!(n > 0, "the exec connection ended without an exit");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn send(io: &mut (impl AsyncWrite + Unpin), frame: Frame) -> anyhow::Result<()> {
    let mut out = Vec::new();
    frame.encode(&mut out);
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(())
}

/// Reads frames until the exit; fails unless it is 0.
async fn until_exit(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> anyhow::Result<()> {
    loop {
        match next_frame(io, buf).await? {
            Frame::Exit(0) => return Ok(()),
            Frame::Exit(code) => bail!("the command exited with {code}"),
            Frame::Error(e) => bail!("the session broke: {e}"),
            Frame::Stderr(e) => eprintln!("exec stderr: {}", String::from_utf8_lossy(&e)),
            _ => {}
        }
    }
}

/// A Verge exec session of `cat` with stdin.
struct VergeCat {
    io: reqwest::Upgraded,
    buf: Vec<u8>,
}

impl VergeCat {
    async fn open(client: &Client, id: &str) -> anyhow::Result<VergeCat> {
        let request = ExecRequest {
            command: vec!["cat".into()],
            instance: Some(id.to_string()),
            stdin: true,
            ..ExecRequest::default()
        };
        let session = client.exec(SCOPE, &request).await?;
        Ok(VergeCat {
            io: session.io,
            buf: Vec::new(),
        })
    }

    async fn round_trips(&mut self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut frame = Vec::new();
        Frame::Stdin(vec![b'x']).encode(&mut frame);
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.io.write_all(&frame).await?;
            self.io.flush().await?;
            match next_frame(&mut self.io, &mut self.buf).await? {
                Frame::Stdout(b) if b == b"x" => {}
                other => bail!("expected one byte of stdout, got {other:?}"),
            }
            lat.push(t.elapsed());
        }
        Ok(lat)
    }

    async fn close(mut self) -> anyhow::Result<()> {
        send(&mut self.io, Frame::StdinEof).await?;
        until_exit(&mut self.io, &mut self.buf).await
    }
}

/// One Verge session of `true`: until the 101 (the command started) and
/// until its `Exit(0)` frame.
async fn verge_true(client: &Client, id: &str) -> anyhow::Result<(Duration, Duration)> {
    let request = ExecRequest {
        command: vec!["true".into()],
        instance: Some(id.to_string()),
        ..ExecRequest::default()
    };
    let t = Instant::now();
    let mut session = client.exec(SCOPE, &request).await?;
    let started = t.elapsed();
    until_exit(&mut session.io, &mut Vec::new()).await?;
    Ok((started, t.elapsed()))
}

/// A `cat`-like child echoing its stdin over pipes.
struct PipeCat {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl PipeCat {
    fn spawn(program: &str, args: &[String]) -> anyhow::Result<PipeCat> {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {program}"))?;
        Ok(PipeCat {
            stdin: child.stdin.take().context("stdin")?,
            stdout: child.stdout.take().context("stdout")?,
            child,
        })
    }

    async fn round_trips(&mut self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut lat = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for _ in 0..n {
            let t = Instant::now();
            self.stdin.write_all(b"x").await?;
            self.stdout.read_exact(&mut b).await?;
            lat.push(t.elapsed());
            ensure!(b == *b"x", "got {b:?} back");
        }
        Ok(lat)
    }

    async fn close(mut self) -> anyhow::Result<()> {
        drop(self.stdin);
        let status = self.child.wait().await?;
        ensure!(status.success(), "the cat ended with {status}");
        Ok(())
    }
}

/// Runs a program with stdio closed until it exits; fails unless 0.
/// Blocking (`waitpid` on this thread, as a shell would), so that the
/// time is the process's and not a runtime's child reaping.
async fn run_to_exit(program: &str, args: &[String]) -> anyhow::Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    ensure!(status.success(), "{program} {args:?}: {status}");
    Ok(())
}

/// A runc container of the same rootfs (hello-debug), sleeping.
struct Runc {
    state: PathBuf,
    bundle: PathBuf,
    id: String,
}

impl Runc {
    /// `None` (with a message) when runc is missing.
    async fn start(dir: &Path) -> anyhow::Result<Option<Runc>> {
        let version = std::process::Command::new("runc").arg("--version").output();
        if !version.is_ok_and(|o| o.status.success()) {
            eprintln!("runc is missing (apt-get install runc): its rows are skipped");
            return Ok(None);
        }
        let busybox = Path::new("/bin/busybox");
        let hello = verge_tests::hello_binary().await;
        let image = verge_images::debug_image(&hello, busybox)?;
        let bundle = dir.join("runc-bundle");
        let rootfs = bundle.join("rootfs");
        verge_images::unpack_layer(&image.layers[0].data, &rootfs)?;
        let id = format!("verge-bench-exec-{}", std::process::id());
        std::fs::write(bundle.join("config.json"), oci_config(&id).to_string())?;
        let runc = Runc {
            state: dir.join("runc-state"),
            bundle,
            id,
        };
        let log = std::fs::File::create(runc.bundle.join("runc.log"))?;
        let status = tokio::process::Command::new("runc")
            .args(runc.args(&["run", "-d", "--bundle"]))
            .arg(&runc.bundle)
            .arg(&runc.id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await?;
        if !status.success() {
            bail!(
                "runc run failed: {}",
                std::fs::read_to_string(runc.bundle.join("runc.log"))?
            );
        }
        Ok(Some(runc))
    }

    /// `--root <state> ARGS`.
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["--root".to_string(), self.state.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    async fn stop(self) -> anyhow::Result<()> {
        run_to_exit("runc", &self.args(&["delete", "--force", &self.id])).await?;
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
            let _ = std::fs::remove_dir(hierarchy.path().join(RUNC_CGROUP_PARENT));
        }
        std::fs::remove_dir_all(&self.bundle)?;
        Ok(())
    }
}

/// An OCI config like what a Verge instance runs with: PID, mount, IPC,
/// UTS and network namespaces, 1 core, 128 MiB.
fn oci_config(id: &str) -> serde_json::Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sleep", "1000000"],
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "cgroupsPath": format!("/{RUNC_CGROUP_PARENT}/{id}"),
            "resources": {
                "memory": {"limit": 128 << 20},
                "cpu": {"quota": 100_000, "period": 100_000},
            },
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
        },
    })
}
