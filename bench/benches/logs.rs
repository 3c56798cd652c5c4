//! Log ingestion on a node: a workload printing as fast as it can, its
//! output captured by the real node path, beside the same output written
//! to a file with no capture and through a plain pipe reader.
//!
//! Two workloads, run with the static busybox of the `hello-debug` image
//! (the same binary on the host for the peers):
//! - **long lines**: `busybox yes "<100-byte line>" | busybox head -n N`;
//! - **short lines**: `busybox seq 1 N` (1–8 bytes a line).
//!
//! The paths, interleaved over [`ROUNDS`] rounds (after a small warm-up
//! of each):
//! - **Verge**: `ProcessRuntime::start` of an instance running the
//!   workload (namespaces, no CPU or memory limit), its shim re-executed
//!   from this binary as in production: the shim reads the workload's
//!   stdout and stderr pipes, cuts lines, stamps each, writes one JSON
//!   record per line to `<logs>/<id>/app.log`, rotated at the default
//!   8 MiB (with enough files kept that nothing is deleted). Timed from
//!   `start` until the exit is recorded (`Instance::wait`) and every one
//!   of the N records is in `app.log*`.
//! - **(a) `> file`** (the floor): `busybox sh -c '<workload>'` on the
//!   host, its stdout a file on the same filesystem.
//! - **(b) `| cat > file`**: the same, its stdout a pipe read by
//!   `busybox cat`, whose stdout is the file: a reader that only copies.
//!
//! CPU times come from `/proc/<pid>/stat` of the exited (not yet reaped)
//! processes: the reader's own (`utime + stime` of the shim, or of `cat`),
//! and the workload's (the shell's children, `cutime + cstime`, plus its
//! own). This process is a child subreaper so that the shim, which
//! detaches from the runtime with a double fork, exits as its child.
//!
//! Then the shim's capture code alone, in this process: the same output
//! from memory handed to `Capture` in 64 KiB reads (the shim's CPU without
//! pipes and `poll`), and step by step ([`STAGES`]: cutting lines,
//! escaping, severity and records, JSON), to show where its CPU goes.
//!
//! Run: `cargo bench -p verge-bench --bench logs` (release build, as root).
//! This binary is also the shim (`/proc/self/exe __verge-shim <dir>`).

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::wait::{Id, WaitPidFlag, waitid, waitpid};
use nix::unistd::Pid;
use verge_api::logs::{LogStream, Severity};
use verge_api::wire::Isolation;
use verge_node::logs::line::{LineSplitter, app_records, escape};
use verge_node::logs::{Capture, DEFAULT_FILE_SIZE, LogLimits, now_us};
use verge_node::runtime::{LaunchSpec, ProcessRuntime, RuntimeConfig, SHIM_ARG, shim_main};

/// Lines of each workload.
const LINES: u64 = 2_000_000;
/// Lines of the warm-up run of each path (also measures a record's size).
const WARM_UP_LINES: u64 = 20_000;
const ROUNDS: usize = 5;
const CGROUP_PARENT: &str = "verge-bench-logs";
/// The long line: 100 bytes and its newline.
const LONG_LINE: &str = "2026-11-22T21:00:00.000Z INFO request served method=GET path=/api/items status=200 took_ms=3 bytes=512";

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
    // The shim double-forks away from its parent; as a subreaper this
    // process gets it back as a child, whose CPU times it can read after
    // it exited and before reaping it.
    nix::sys::prctl::set_child_subreaper(true)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// One workload.
struct Workload {
    name: &'static str,
    /// The shell command, given the number of lines.
    command: fn(u64) -> String,
    /// Bytes of output for `n` lines.
    bytes: fn(u64) -> u64,
}

fn long_command(n: u64) -> String {
    format!("/bin/busybox yes '{LONG_LINE}' | /bin/busybox head -n {n}")
}

fn long_bytes(n: u64) -> u64 {
    n * (LONG_LINE.len() as u64 + 1)
}

fn short_command(n: u64) -> String {
    format!("/bin/busybox seq 1 {n}")
}

/// Bytes of `seq 1 n`.
fn short_bytes(n: u64) -> u64 {
    let mut total = 0;
    let mut low = 1;
    let mut digits = 1;
    while low <= n {
        let high = (low * 10 - 1).min(n);
        total += (high - low + 1) * (digits + 1);
        low *= 10;
        digits += 1;
    }
    total
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "long (101 B)",
        command: long_command,
        bytes: long_bytes,
    },
    Workload {
        name: "short (seq)",
        command: short_command,
        bytes: short_bytes,
    },
];

const PATHS: [&str; 3] = [
    "Verge: shim → app.log (JSON)",
    "(a) `> file` (floor)",
    "(b) `| cat > file`",
];

/// One run of one path.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    wall: f64,
    /// The reader's CPU seconds (shim or cat; 0 for the floor), user and
    /// system.
    reader_user: f64,
    reader_sys: f64,
    /// The workload's CPU seconds (the shell and its children).
    workload_cpu: f64,
    /// Bytes written to the file(s).
    on_disk: u64,
}

async fn run() -> anyhow::Result<()> {
    let load_start = loadavg();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hello = tokio::task::spawn_blocking(move || verge_images::build_hello(&root)).await??;
    let image = verge_images::debug_image(&hello, Path::new("/bin/busybox"))?;
    let tmp = tempfile::tempdir()?;
    let layer = tmp.path().join("layer");
    verge_images::unpack_layer(&image.layers[0].data, &layer)?;
    let rt = ProcessRuntime::new(RuntimeConfig {
        root: tmp.path().join("verge/instances"),
        cgroup_parent: CGROUP_PARENT.into(),
        isolation: Isolation::Namespaces,
        shim_exe: "/proc/self/exe".into(),
    })?;
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out)?;

    let mut results: Vec<Vec<Vec<Run>>> = WORKLOADS
        .iter()
        .map(|_| PATHS.iter().map(|_| Vec::new()).collect())
        .collect();
    // Per workload, per round: the capture code alone (wall s, CPU s).
    let mut alone: Vec<Vec<(f64, f64)>> = WORKLOADS.iter().map(|_| Vec::new()).collect();
    // Per workload, per stage of the capture code: CPU s of each round.
    let mut stages: Vec<Vec<Vec<f64>>> = WORKLOADS
        .iter()
        .map(|_| STAGES.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut seq = 0;
    for (w, workload) in WORKLOADS.iter().enumerate() {
        // Warm-up: every path once, small; the Verge run tells a record's
        // size, hence how many files to keep so that nothing is deleted.
        let warm = verge_run(&rt, &layer, workload, WARM_UP_LINES, 1_000, &mut seq).await?;
        let per_record = warm.on_disk as f64 / WARM_UP_LINES as f64;
        let files =
            ((per_record * LINES as f64 * 1.2) / DEFAULT_FILE_SIZE as f64).ceil() as u32 + 2;
        file_run(&out, workload, WARM_UP_LINES, false)?;
        file_run(&out, workload, WARM_UP_LINES, true)?;
        let output = workload_output(workload, LINES)?;
        for round in 0..ROUNDS {
            let runs = [
                verge_run(&rt, &layer, workload, LINES, files, &mut seq).await?,
                file_run(&out, workload, LINES, false)?,
                file_run(&out, workload, LINES, true)?,
            ];
            for (p, r) in runs.iter().enumerate() {
                eprintln!(
                    "{} round {round} {:<30} {:6.3} s, reader CPU {:.2} + {:.2} s, workload CPU {:.2} s, {} B on disk",
                    workload.name,
                    PATHS[p],
                    r.wall,
                    r.reader_user,
                    r.reader_sys,
                    r.workload_cpu,
                    r.on_disk
                );
                results[w][p].push(*r);
            }
            let a = capture_alone(&out, &output, files)?;
            eprintln!(
                "{} round {round} Capture alone                  {:6.3} s, CPU {:.2} s",
                workload.name, a.0, a.1
            );
            alone[w].push(a);
            for (i, cpu) in stages[w].iter_mut().enumerate() {
                cpu.push(stage_cpu(&output, i)?);
            }
        }
    }
    let load_end = loadavg();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(hierarchy.path().join(CGROUP_PARENT));
    }

    println!();
    println!(
        "| workload, path                              | wall s | M lines/s |   MB/s | × floor | reader CPU s (user + sys) | reader CPU s / M lines | workload CPU s | on disk / output |"
    );
    println!(
        "|---------------------------------------------|--------|-----------|--------|---------|---------------------------|------------------------|----------------|------------------|"
    );
    let million = LINES as f64 / 1e6;
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let floor = median(results[w][1].iter().map(|r| r.wall));
        let bytes = (workload.bytes)(LINES) as f64;
        for (p, path) in PATHS.iter().enumerate() {
            let runs = &results[w][p];
            let wall = median(runs.iter().map(|r| r.wall));
            let user = median(runs.iter().map(|r| r.reader_user));
            let sys = median(runs.iter().map(|r| r.reader_sys));
            let total = median(runs.iter().map(|r| r.reader_user + r.reader_sys));
            let work = median(runs.iter().map(|r| r.workload_cpu));
            let disk = median(runs.iter().map(|r| r.on_disk as f64));
            println!(
                "| {:<43} | {wall:>6.3} | {:>9.2} | {:>6.1} | {:>7.2} | {:>25} | {:>22.3} | {work:>14.3} | {:>16.2} |",
                format!("{}: {path}", workload.name),
                million / wall,
                bytes / wall / 1e6,
                floor / wall,
                format!("{total:.2} ({user:.2} + {sys:.2})"),
                total / million,
                disk / bytes,
            );
        }
        let wall = median(alone[w].iter().map(|a| a.0));
        let cpu = median(alone[w].iter().map(|a| a.1));
        println!(
            "| {:<43} | {wall:>6.3} | {:>9.2} | {:>6.1} |       – | {:>25} | {:>22.3} |              – |                – |",
            format!("{}: Capture alone, in process", workload.name),
            million / wall,
            bytes / wall / 1e6,
            format!("{cpu:.2}"),
            cpu / million,
        );
    }
    println!();
    println!(
        "| the capture code in process, cumulative       | long: CPU s / M lines | short: CPU s / M lines |"
    );
    println!(
        "|-----------------------------------------------|-----------------------|------------------------|"
    );
    for (i, stage) in STAGES.iter().enumerate() {
        println!(
            "| {stage:<45} | {:>21.3} | {:>22.3} |",
            median(stages[0][i].iter().copied()) / million,
            median(stages[1][i].iter().copied()) / million,
        );
    }
    println!();
    println!(
        "{} CPUs; load average (1, 5, 15 min) at start {load_start}, at end {load_end}; \
         {LINES} lines per run, {ROUNDS} rounds, medians; MB = 10^6 bytes of the workload's output",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// The capture code's steps, each including the ones before.
const STAGES: [&str; 4] = [
    "cut lines (LineSplitter)",
    "+ escape (UTF-8 check, message String)",
    "+ severity, records (app_records)",
    "+ JSON (serde_json::to_vec per record)",
];

/// CPU seconds of this thread.
fn thread_cpu() -> anyhow::Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
    Ok(t(u.user_time()) + t(u.system_time()))
}

/// CPU seconds of the capture code's steps up to `stage` ([`STAGES`])
/// over `output`, in reads of 64 KiB; nothing is written.
fn stage_cpu(output: &[u8], stage: usize) -> anyhow::Result<f64> {
    let cpu = thread_cpu()?;
    let mut splitter = LineSplitter::new();
    let mut severity = Severity::Info;
    let (mut lines, mut bytes) = (0u64, 0u64);
    for chunk in output.chunks(64 * 1024) {
        let time = now_us();
        splitter.push(chunk, |piece| {
            lines += 1;
            match stage {
                0 => bytes += piece.bytes.len() as u64,
                1 => bytes += escape(piece.bytes).len() as u64,
                2 => {
                    let records = app_records(piece, LogStream::Stdout, time, &mut severity);
                    bytes += records.len() as u64;
                }
                _ => {
                    for r in app_records(piece, LogStream::Stdout, time, &mut severity) {
                        let mut line = serde_json::to_vec(&r).expect("records serialise");
                        line.push(b'\n');
                        bytes += line.len() as u64;
                    }
                }
            }
        });
    }
    let cpu = thread_cpu()? - cpu;
    ensure!(lines > 0 && std::hint::black_box(bytes) > 0);
    Ok(cpu)
}

/// What the workload prints for `n` lines, from the host's busybox.
fn workload_output(workload: &Workload, n: u64) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("/bin/busybox")
        .args(["sh", "-c", &(workload.command)(n)])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.stdout.len() as u64 == (workload.bytes)(n),
        "the workload printed {} bytes",
        out.stdout.len()
    );
    Ok(out.stdout)
}

/// The shim's capture code alone, in this process: `output` handed to
/// `Capture::take` in reads of 64 KiB (the shim's buffer), flushed every
/// 16 reads (the most the shim reads from one output per round), into
/// `app.log` in a fresh dir. Wall and CPU seconds of the thread.
fn capture_alone(out: &Path, output: &[u8], files: u32) -> anyhow::Result<(f64, f64)> {
    let dir = out.join("capture");
    let limits = LogLimits {
        files,
        ..LogLimits::default()
    };
    let cpu = thread_cpu()?;
    let t = Instant::now();
    let mut capture = Capture::open(&dir, limits)?;
    for (i, chunk) in output.chunks(64 * 1024).enumerate() {
        capture.take(LogStream::Stdout, chunk, Instant::now());
        if i % 16 == 15 {
            capture.flush();
        }
    }
    capture.flush_partial(LogStream::Stdout);
    capture.flush();
    drop(capture);
    let (wall, cpu) = (t.elapsed().as_secs_f64(), thread_cpu()? - cpu);
    let lines = output.iter().filter(|&&b| b == b'\n').count() as u64;
    let (records, _) = count_records(&dir)?;
    ensure!(records == lines, "{records} records for {lines} lines");
    std::fs::remove_dir_all(&dir)?;
    Ok((wall, cpu))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU seconds of an exited, unreaped process: its own (`utime`,
/// `stime`) and its reaped children's (`cutime + cstime`).
fn cpu_of(pid: i32) -> anyhow::Result<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // After the command's name, which ends with the last ')': field 3 on.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14–17 (index 11–14 here).
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(Cpu {
        user: f[11] as f64 / tick,
        sys: f[12] as f64 / tick,
        children: (f[13] + f[14]) as f64 / tick,
    })
}

/// CPU seconds of a process, from its `stat`.
struct Cpu {
    user: f64,
    sys: f64,
    /// Its reaped children's, user and system.
    children: f64,
}

/// Waits until child `pid` exited, without reaping it.
fn wait_exited(pid: i32) -> anyhow::Result<()> {
    waitid(
        Id::Pid(Pid::from_raw(pid)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
    )
    .with_context(|| format!("waiting for {pid}"))?;
    Ok(())
}

/// The first number in a file (`shim.pid` is `<pid> <start>`).
fn first_number(path: &Path) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no pid in {}", path.display()))
}

/// `app.log*` in `dir`: lines (records) and bytes.
fn count_records(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut lines, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("app.log") {
            continue;
        }
        let data = std::fs::read(entry.path())?;
        lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += data.len() as u64;
    }
    Ok((lines, bytes))
}

/// One Verge run of `n` lines, keeping `files` files of app logs.
async fn verge_run(
    rt: &ProcessRuntime,
    layer: &Path,
    workload: &Workload,
    n: u64,
    files: u32,
    seq: &mut usize,
) -> anyhow::Result<Run> {
    *seq += 1;
    let id = format!("logs{seq}");
    let rt = rt.clone().with_log_limits(LogLimits {
        files,
        ..LogLimits::default()
    });
    let spec = LaunchSpec {
        instance_id: id.clone(),
        layers: vec![layer.to_path_buf()],
        argv: vec!["/bin/sh".into(), "-c".into(), (workload.command)(n)],
        env: vec![("VERGE_INSTANCE_ID".into(), id.clone())],
        working_dir: None,
        user: None,
        hostname: id.clone(),
        cpu: 0.0,
        memory: 0,
        pids: 0,
        netns: None,
    };
    let t = Instant::now();
    let instance = rt.start(spec).await?;
    let shim = first_number(&rt.instance_dir(&id).join("shim.pid"))?;
    let exit = instance.wait().await;
    let logs = rt.logs_dir(&id);
    let mut counted = count_records(&logs)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while counted.0 < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
        counted = count_records(&logs)?;
    }
    let wall = t.elapsed().as_secs_f64();
    // The shim exited (its pidfd said so) and is this process's child now.
    let cpu = tokio::task::spawn_blocking(move || {
        wait_exited(shim)?;
        let cpu = cpu_of(shim);
        waitpid(Pid::from_raw(shim), None)?;
        cpu
    })
    .await??;
    ensure!(
        exit.code == Some(0),
        "the workload ended with {}",
        exit.describe()
    );
    ensure!(
        counted.0 == n,
        "{} records in {} for {n} lines",
        counted.0,
        logs.display()
    );
    rt.remove(&id).await?;
    std::fs::remove_dir_all(&logs)?;
    Ok(Run {
        wall,
        reader_user: cpu.user,
        reader_sys: cpu.sys,
        workload_cpu: cpu.children,
        on_disk: counted.1,
    })
}

/// One host run of `n` lines into a file, through `cat` if `piped`.
fn file_run(out: &Path, workload: &Workload, n: u64, piped: bool) -> anyhow::Result<Run> {
    let path: PathBuf = out.join("out.log");
    let file = std::fs::File::create(&path)?;
    let t = Instant::now();
    let mut sh = Command::new("/bin/busybox");
    sh.args(["sh", "-c", &(workload.command)(n)])
        .stdin(Stdio::null());
    let (mut sh, cat) = if piped {
        let mut sh = sh.stdout(Stdio::piped()).spawn()?;
        let cat = Command::new("/bin/busybox")
            .arg("cat")
            .stdin(sh.stdout.take().context("stdout")?)
            .stdout(file)
            .spawn()?;
        (sh, Some(cat))
    } else {
        (sh.stdout(file).spawn()?, None)
    };
    wait_exited(sh.id() as i32)?;
    let mut reader = (0.0, 0.0);
    if let Some(mut cat) = cat {
        wait_exited(cat.id() as i32)?;
        let cpu = cpu_of(cat.id() as i32)?;
        reader = (cpu.user, cpu.sys);
        let status = cat.wait()?;
        ensure!(status.success(), "cat: {status}");
    }
    let wall = t.elapsed().as_secs_f64();
    let workload_cpu = cpu_of(sh.id() as i32)?;
    let status = sh.wait()?;
    ensure!(
        status.success() || status.signal().is_some(),
        "sh: {status}"
    );
    let on_disk = std::fs::metadata(&path)?.len();
    ensure!(
        on_disk == (workload.bytes)(n),
        "{on_disk} bytes written, {} expected",
        (workload.bytes)(n)
    );
    std::fs::remove_file(&path)?;
    Ok(Run {
        wall,
        reader_user: reader.0,
        reader_sys: reader.1,
        workload_cpu: workload_cpu.user + workload_cpu.sys + workload_cpu.children,
        on_disk,
    })
}
