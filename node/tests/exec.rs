//! Exec sessions against the real kernel: a real instance (namespaces,
//! overlayfs, cgroup) of a busybox image, and commands run in it through
//! the exec helper (the `verge-shim` binary of this package, whose `main`
//! calls `exec_main` as the `verge` binary's does). The session's frames
//! go over an in-memory duplex stream instead of QUIC.
//!
//! Needs root and a static busybox at `/bin/busybox` (Debian's
//! `busybox-static`).

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{is_alive, require_root};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use verge_api::exec::codec::ExecCodec;
use verge_api::exec::{Frame, MAX_PAYLOAD, WinSize};
use verge_api::wire::{ExecOpen, Isolation};
use verge_node::exec::{Ended, Exec, ExecConfig, Refusal, Session};
use verge_node::runtime::{Instance, LaunchSpec, ProcessRuntime};

const MIB: u64 = 1024 * 1024;
const HELPER: &str = env!("CARGO_BIN_EXE_verge-shim");
/// The workload of every test instance.
const WORKLOAD: &[&str] = &["sleep", "1000000"];
const TIMEOUT: Duration = Duration::from_secs(30);

/// A busybox image layer, a runtime whose cgroups live under their own
/// `verge/test-exec-...` parent (removed on drop), and an [`Exec`].
struct Fixture {
    _tmp: tempfile::TempDir,
    rt: ProcessRuntime,
    layer: PathBuf,
    cgroup_parent: String,
    exec: Exec,
    shutdown: CancellationToken,
}

impl Fixture {
    fn new(isolation: Isolation) -> Fixture {
        Fixture::with_config(isolation, ExecConfig::new(HELPER))
    }

    fn with_config(isolation: Isolation, cfg: ExecConfig) -> Fixture {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let layer = common::busybox_layer(tmp.path());
        let cgroup_parent = common::cgroup_parent();
        let rt = common::runtime(&tmp.path().join("instances"), &cgroup_parent, isolation);
        let shutdown = CancellationToken::new();
        Fixture {
            _tmp: tmp,
            rt,
            layer,
            cgroup_parent,
            exec: Exec::new(cfg, shutdown.clone()),
            shutdown,
        }
    }

    fn spec(&self, id: &str) -> LaunchSpec {
        LaunchSpec {
            instance_id: id.into(),
            layers: vec![self.layer.clone()],
            argv: WORKLOAD.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("GREETING".into(), "hello from the spec".into()),
            ],
            working_dir: None,
            user: None,
            hostname: format!("{id}-host"),
            cpu: 0.0,
            memory: 256 * MIB,
            pids: 0,
            netns: None,
        }
    }

    /// Starts an instance and checks that its workload runs.
    async fn running(&self, spec: LaunchSpec) -> Instance {
        let id = spec.instance_id.clone();
        let inst = self.rt.start(spec).await.expect("start");
        assert!(inst.try_exit().is_none(), "{id}: {:?}", inst.try_exit());
        assert!(inst.pid() > 0);
        inst
    }

    async fn remove(&self, inst: Instance) {
        inst.stop(Duration::from_secs(1)).await;
        self.rt.remove(inst.id()).await.unwrap();
    }

    async fn start(&self, open: &ExecOpen) -> Result<Session, Refusal> {
        let dir = self.rt.instance_dir(&open.instance);
        tokio::time::timeout(TIMEOUT, self.exec.start(open, &dir))
            .await
            .expect("start took too long")
    }

    /// The processes in the instance's cgroup.
    fn cgroup_procs(&self, id: &str) -> Vec<i32> {
        let mut procs: Vec<i32> = self
            .rt
            .cgroup_file(id, "pids", "cgroup.procs")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        procs.sort();
        procs
    }

    /// Waits until only the workload is left in the instance's cgroup.
    async fn only_the_workload_left(&self, inst: &Instance) {
        eventually("only the workload in the cgroup", || {
            self.cgroup_procs(inst.id()) == [inst.pid()]
        })
        .await;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::remove_cgroup_parent(&self.cgroup_parent);
    }
}

fn open(id: &str, command: &[&str]) -> ExecOpen {
    ExecOpen {
        instance: id.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        stdin: false,
        tty: false,
        size: None,
        term: None,
    }
}

async fn eventually(what: &str, check: impl FnMut() -> bool) {
    common::eventually(what, Duration::from_secs(10), check).await;
}

/// The client's end of a session, run on a task over a duplex stream.
struct Client {
    tx: FramedWrite<WriteHalf<DuplexStream>, ExecCodec>,
    rx: FramedRead<ReadHalf<DuplexStream>, ExecCodec>,
    task: tokio::task::JoinHandle<Ended>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// How a session looked from the client.
#[derive(Debug)]
struct Output {
    stdout: String,
    stderr: String,
    /// `Exit`'s code, or `Error`'s message.
    end: Result<i32, String>,
}

impl Client {
    fn connect(session: Session) -> Client {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (server_read, server_write) = tokio::io::split(server);
        let task = tokio::spawn(session.run(server_read, server_write));
        let (read, write) = tokio::io::split(client);
        Client {
            tx: FramedWrite::new(write, ExecCodec),
            rx: FramedRead::new(read, ExecCodec),
            task,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.tx.send(frame).await.expect("the session takes frames");
    }

    /// The next frame; output is collected, `None` for the last ones.
    async fn next(&mut self) -> Option<Result<i32, String>> {
        let frame = tokio::time::timeout(TIMEOUT, self.rx.next())
            .await
            .expect("no frame within 30 s");
        match frame {
            Some(Ok(Frame::Stdout(b))) => self.stdout.extend(b),
            Some(Ok(Frame::Stderr(b))) => self.stderr.extend(b),
            Some(Ok(Frame::Exit(code))) => return Some(Ok(code)),
            Some(Ok(Frame::Error(message))) => return Some(Err(message)),
            Some(Ok(other)) => panic!("the node sent {other:?}"),
            Some(Err(e)) => panic!("bad frame: {e}"),
            None => panic!("the stream ended without Exit or Error"),
        }
        None
    }

    /// Reads until stdout holds `needle`; panics if the session ends first.
    async fn wait_for(&mut self, needle: &str) {
        while !String::from_utf8_lossy(&self.stdout).contains(needle) {
            if let Some(end) = self.next().await {
                panic!(
                    "ended ({end:?}) before {needle:?}; stdout: {}",
                    String::from_utf8_lossy(&self.stdout)
                );
            }
        }
    }

    /// Reads to the end; the session then finished the stream.
    async fn finish(mut self) -> Output {
        let end = loop {
            if let Some(end) = self.next().await {
                break end;
            }
        };
        assert!(self.rx.next().await.is_none(), "frames after the last one");
        let ended = self.task.await.unwrap();
        match (&end, &ended) {
            (Ok(c), Ended::Exited(e)) => assert_eq!(c, e),
            (Err(m), Ended::Failed(f)) => assert_eq!(m, f),
            _ => panic!("sent {end:?}, ended {ended:?}"),
        }
        Output {
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            end,
        }
    }
}

async fn run(f: &Fixture, open: &ExecOpen) -> Output {
    let session = f.start(open).await.expect("exec started");
    Client::connect(session).finish().await
}

/// Exit codes (and 128 + signal) come through; stdout and stderr stay
/// apart; without `stdin` the command reads /dev/null.
#[tokio::test]
async fn exit_codes_and_separate_output() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("codes")).await;

    let out = run(&f, &open("codes", &["sh", "-c", "exit 3"])).await;
    assert_eq!(out.end, Ok(3), "{out:?}");

    let script = "echo to-out; echo to-err >&2; echo more-out; exit 0";
    let out = run(&f, &open("codes", &["sh", "-c", script])).await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    assert_eq!(out.stdout, "to-out\nmore-out\n");
    assert_eq!(out.stderr, "to-err\n");

    let out = run(&f, &open("codes", &["sh", "-c", "kill -TERM $$"])).await;
    assert_eq!(out.end, Ok(128 + libc::SIGTERM), "{out:?}");

    let out = run(&f, &open("codes", &["cat"])).await;
    assert_eq!((out.end, out.stdout.as_str()), (Ok(0), ""));

    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
}

/// The command runs in the instance: its root filesystem, hostname, PID
/// namespace (the workload is PID 1), cgroup (the root of its cgroup
/// namespace), user, environment and working dir, with the workload's
/// capabilities.
#[tokio::test]
async fn runs_inside_the_instance() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut spec = f.spec("inside");
    spec.user = Some("app".into());
    spec.working_dir = Some("/home/app".into());
    let inst = f.running(spec).await;

    let script = "echo host=$(hostname); cat /proc/sys/kernel/hostname; id; \
                  echo greeting=$GREETING; echo home=$HOME; echo path=$PATH; echo term=${TERM-unset}; pwd; \
                  echo pid1=$(cat /proc/1/cmdline | tr '\\0' ' '); echo me=$$; ps; \
                  grep ' / ' /proc/mounts; \
                  echo cgroups-elsewhere=$(grep -v ':/$' /proc/self/cgroup | wc -l); \
                  grep CapBnd /proc/self/status";
    let out = run(&f, &open("inside", &["sh", "-c", script])).await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    let s = &out.stdout;
    assert!(s.contains("host=inside-host\ninside-host\n"), "{s}");
    assert!(
        s.contains("uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)"),
        "{s}"
    );
    assert!(s.contains("greeting=hello from the spec\n"), "{s}");
    assert!(s.contains("home=/home/app\n"), "{s}");
    assert!(s.contains("path=/bin\n"), "{s}");
    assert!(s.contains("term=unset\n"), "{s}");
    assert!(s.contains("\n/home/app\n"), "{s}");
    assert!(s.contains("pid1=sleep 1000000\n"), "{s}");
    let me: u32 = s
        .lines()
        .find_map(|l| l.strip_prefix("me="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        me > 1 && me < 100,
        "not in the instance's PID namespace: {me}"
    );
    assert!(
        s.lines()
            .any(|l| l.split_whitespace().next() == Some("1") && l.ends_with("sleep 1000000")),
        "ps does not show the workload as PID 1: {s}"
    );
    assert!(s.lines().any(|l| l.starts_with("overlay / overlay")), "{s}");
    assert!(s.contains("cgroups-elsewhere=0\n"), "{s}");
    // Docker's default capabilities less CAP_MKNOD, like the workload.
    assert!(s.contains("CapBnd:\t00000000a00425fb"), "{s}");

    // While it runs, the command is in the instance's cgroup.
    let session = f
        .start(&open(
            "inside",
            &["sh", "-c", "echo ready; exec sleep 1000"],
        ))
        .await
        .unwrap();
    let pid = session.pid();
    let mut client = Client::connect(session);
    client.wait_for("ready").await;
    let procs = f.cgroup_procs("inside");
    assert!(procs.contains(&pid), "{pid} not in {procs:?}");
    drop(client);
    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
}

/// With `stdin`, input is streamed as it comes and closed at `StdinEof`.
#[tokio::test]
async fn stdin_is_streamed() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("stdin")).await;
    let mut o = open("stdin", &["cat"]);
    o.stdin = true;
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.send(Frame::Stdin(b"hello\n".to_vec())).await;
    client.wait_for("hello\n").await;
    client.send(Frame::Stdin(b"world\n".to_vec())).await;
    client.wait_for("hello\nworld\n").await;
    client.send(Frame::StdinEof).await;
    let out = client.finish().await;
    assert_eq!(out.end, Ok(0));
    assert_eq!(out.stdout, "hello\nworld\n");
    f.remove(inst).await;
}

/// Input for a command that stopped reading it goes nowhere: the daemon
/// gets EPIPE, never SIGPIPE (here with its default action, as in the
/// `verge` binary, which would end the process).
#[tokio::test]
async fn input_after_the_command_closed_its_stdin() {
    // SAFETY: setting a default disposition runs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("epipe")).await;
    let mut o = open(
        "epipe",
        &[
            "sh",
            "-c",
            "head -c 2; exec 0<&-; echo; echo closed; sleep 0.3",
        ],
    );
    o.stdin = true;
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.send(Frame::Stdin(b"ab".to_vec())).await;
    client.wait_for("closed").await;
    for _ in 0..64 {
        client.send(Frame::Stdin(vec![b'x'; MAX_PAYLOAD])).await;
    }
    client.send(Frame::StdinEof).await;
    let out = client.finish().await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    assert_eq!(out.stdout, "ab\nclosed\n");
    f.remove(inst).await;
}

/// 10 MiB of random bytes through `cat` come back exactly, read and
/// written at once (the session holds at most a frame of each).
#[tokio::test]
async fn ten_mib_round_trip() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("bulk")).await;
    let mut data = vec![0u8; 10 * MIB as usize];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let mut o = open("bulk", &["cat"]);
    o.stdin = true;
    let session = f.start(&o).await.unwrap();
    let (client, server) = tokio::io::duplex(256 * 1024);
    let (server_read, server_write) = tokio::io::split(server);
    let task = tokio::spawn(session.run(server_read, server_write));
    let (read, write) = tokio::io::split(client);
    let mut tx = FramedWrite::new(write, ExecCodec);
    let mut rx = FramedRead::new(read, ExecCodec);
    let started = Instant::now();
    let send = async {
        for chunk in data.chunks(MAX_PAYLOAD) {
            tx.send(Frame::Stdin(chunk.to_vec())).await.unwrap();
        }
        tx.send(Frame::StdinEof).await.unwrap();
    };
    let receive = async {
        let mut got = Vec::with_capacity(data.len());
        loop {
            match tokio::time::timeout(TIMEOUT, rx.next()).await.unwrap() {
                Some(Ok(Frame::Stdout(b))) => {
                    assert!(b.len() <= MAX_PAYLOAD);
                    got.extend(b);
                }
                Some(Ok(Frame::Exit(code))) => return (got, code),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let ((), (got, code)) = tokio::join!(send, receive);
    assert_eq!(code, 0);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
    assert_eq!(task.await.unwrap(), Ended::Exited(0));
    eprintln!("10 MiB round trip in {:?}", started.elapsed());
    f.remove(inst).await;
}

/// With `tty`, the command's stdio is a terminal of the instance's own
/// /dev/pts, of the given size, which `Resize` changes; `TERM` is the
/// client's.
#[tokio::test]
async fn tty_size_resize_and_term() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut spec = f.spec("tty");
    spec.user = Some("app".into());
    let inst = f.running(spec).await;
    let script = "tty; stty size; echo term=$TERM; ls -ln $(tty); echo ready; read line; stty size; echo got=$line";
    let mut o = open("tty", &["sh", "-c", script]);
    o.tty = true;
    o.stdin = true;
    o.size = Some(WinSize {
        cols: 100,
        rows: 30,
    });
    o.term = Some("vt100".into());
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.wait_for("ready").await;
    let so_far = String::from_utf8_lossy(&client.stdout).into_owned();
    assert!(so_far.contains("/dev/pts/"), "{so_far}");
    assert!(so_far.contains("30 100\r\n"), "{so_far}");
    assert!(so_far.contains("term=vt100\r\n"), "{so_far}");
    // The terminal is the user's.
    assert!(so_far.contains(" 1000 "), "{so_far}");
    client
        .send(Frame::Resize(WinSize {
            cols: 120,
            rows: 40,
        }))
        .await;
    client.send(Frame::Stdin(b"typed\r".to_vec())).await;
    let out = client.finish().await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    assert!(out.stdout.contains("40 120\r\n"), "{}", out.stdout);
    assert!(out.stdout.contains("got=typed\r\n"), "{}", out.stdout);
    assert_eq!(out.stderr, "", "a terminal has one stream");

    // Without a size: 80x24; TERM defaults to xterm.
    let mut o = open("tty", &["sh", "-c", "stty size; echo term=$TERM"]);
    o.tty = true;
    let out = run(&f, &o).await;
    assert_eq!(out.end, Ok(0));
    assert!(out.stdout.contains("24 80\r\n"), "{}", out.stdout);
    assert!(out.stdout.contains("term=xterm\r\n"), "{}", out.stdout);
    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
}

/// Ctrl-C on a terminal (byte 0x03) interrupts the foreground command;
/// a `Signal` frame signals the command's process group.
#[tokio::test]
async fn ctrl_c_and_signals() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("sig")).await;

    let mut o = open("sig", &["sh", "-c", "echo ready; exec sleep 1000"]);
    o.tty = true;
    o.stdin = true;
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.wait_for("ready").await;
    // Until `exec sleep` happened, SIGINT would end sh the same way.
    client.send(Frame::Stdin(vec![3])).await;
    let out = client.finish().await;
    assert_eq!(out.end, Ok(128 + libc::SIGINT), "{out:?}");

    let o = open("sig", &["sh", "-c", "echo ready; exec sleep 1000"]);
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.wait_for("ready").await;
    client.send(Frame::Signal(libc::SIGTERM)).await;
    let out = client.finish().await;
    assert_eq!(out.end, Ok(128 + libc::SIGTERM), "{out:?}");
    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
}

/// At most 8 sessions per instance at once (by default): the 9th is
/// refused as busy, and a place frees up when a session ended.
#[tokio::test]
async fn the_session_limit_refuses_the_ninth() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("limit")).await;
    let other = f.running(f.spec("limit2")).await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(f.start(&open("limit", &["sleep", "1000"])).await.unwrap());
    }
    assert_eq!(f.exec.sessions("limit"), 8);
    let refusal = f
        .start(&open("limit", &["sleep", "1000"]))
        .await
        .unwrap_err();
    assert_eq!(
        refusal,
        Refusal {
            message:
                "instance limit already has 8 exec sessions (the most at once, --exec-max-sessions)"
                    .into(),
            busy: true,
        }
    );
    // Another instance has its own count.
    let out = run(&f, &open("limit2", &["true"])).await;
    assert_eq!(out.end, Ok(0));

    // Sessions dropped before they ran are cleaned up all the same.
    let pids: Vec<i32> = sessions.iter().map(Session::pid).collect();
    sessions.pop();
    eventually("a free place", || f.exec.sessions("limit") == 7).await;
    let out = run(&f, &open("limit", &["true"])).await;
    assert_eq!(out.end, Ok(0));
    drop(sessions);
    eventually("no sessions", || f.exec.sessions("limit") == 0).await;
    assert!(pids.iter().all(|p| !is_alive(*p)), "{pids:?}");
    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
    f.remove(other).await;
}

/// A client that goes away mid-command (the stream ends) ends the command
/// and every process it started, even in the background.
#[tokio::test]
async fn a_dropped_client_kills_the_whole_session() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("drop")).await;
    let o = open(
        "drop",
        &[
            "sh",
            "-c",
            "sleep 1000 & sleep 1001 & echo ready; sleep 1002",
        ],
    );
    let session = f.start(&o).await.unwrap();
    let mut client = Client::connect(session);
    client.wait_for("ready").await;
    // The workload and three sleeps (and sh, unless it execs the last one).
    eventually("the three sleeps in the cgroup", || {
        f.cgroup_procs("drop").len() >= 4
    })
    .await;
    let Client { tx, rx, task, .. } = client;
    drop((tx, rx));
    let ended = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
    assert_eq!(ended, Ended::ClientGone);
    // Cleaned up by the time the session ended.
    assert_eq!(f.cgroup_procs("drop"), [inst.pid()]);
    assert_eq!(f.exec.sessions("drop"), 0);
    f.remove(inst).await;
}

/// The helper dies (SIGKILL): the command dies with it, the session ends
/// with an `Error`, and the daemon kills what the command left in the
/// instance.
#[tokio::test]
async fn a_killed_helper_still_leaves_nothing() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("killed")).await;
    let o = open(
        "killed",
        &["sh", "-c", "sleep 1000 & echo ready; sleep 1001"],
    );
    let session = f.start(&o).await.unwrap();
    let leader = session.pid();
    let mut client = Client::connect(session);
    client.wait_for("ready").await;
    let helpers = children_running(verge_node::exec::EXEC_ARG);
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helpers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = client.finish().await;
    assert_eq!(out.end, Err("the exec helper ended unexpectedly".into()));
    assert!(!is_alive(leader));
    assert_eq!(f.cgroup_procs("killed"), [inst.pid()]);
    f.remove(inst).await;
}

/// The daemon dies (here a stand-in, `sh`, is SIGKILLed) while the
/// helper's socket to it stays open elsewhere: the helper's parent-death
/// signal ends the session, and nothing is left in the instance.
#[tokio::test]
async fn a_dead_daemon_ends_its_sessions() {
    use std::io::{BufRead as _, BufReader};
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;

    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("orphan")).await;
    let dir = f.rt.instance_dir("orphan");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    // The stand-in daemon runs the helper as its child, with itself as the
    // daemon, and waits.
    let script = format!(
        "{HELPER} {arg} {dir} '{{\"tty\":false,\"daemon\":'$$'}}' sh -c 'sleep 1000 & echo ready; sleep 1001' & wait",
        arg = verge_node::exec::EXEC_ARG,
        dir = dir.display(),
    );
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open until
    // `spawn` returned.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut daemon = cmd.spawn().unwrap();
    drop(theirs);
    let mut reports = BufReader::new(ours.try_clone().unwrap());
    let mut line = String::new();
    reports.read_line(&mut line).unwrap();
    assert!(line.contains("\"started\""), "{line}");
    let mut out = BufReader::new(daemon.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    assert!(f.cgroup_procs("orphan").len() >= 3);

    daemon.kill().unwrap();
    daemon.wait().unwrap();
    // Its socket is still open here: the parent-death signal did it.
    let rest: Vec<String> = reports.lines().map(Result::unwrap).collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("\"swept\"") && l.contains("true")),
        "{rest:?}"
    );
    f.only_the_workload_left(&inst).await;
    f.remove(inst).await;
}

/// This process's children whose command line has `arg`.
fn children_running(arg: &str) -> Vec<i32> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .nth(1);
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(me.as_str()) && cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
        })
        .collect()
}

/// A command that exits while processes it left hold its output open:
/// `Exit` comes after a short drain, and those processes are killed.
#[tokio::test]
async fn exit_comes_although_leftovers_hold_the_output() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("held")).await;
    let started = Instant::now();
    let out = run(
        &f,
        &open("held", &["sh", "-c", "sleep 1000 & echo done; exit 4"]),
    )
    .await;
    assert_eq!(out.end, Ok(4), "{out:?}");
    assert_eq!(out.stdout, "done\n");
    assert!(
        started.elapsed() < verge_node::exec::DRAIN + Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.cgroup_procs("held"), [inst.pid()]);
    f.remove(inst).await;
}

/// Commands that cannot start are refused with the workload's kind of
/// message; so is an instance that is not running.
#[tokio::test]
async fn start_failures_are_refused() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("fail")).await;
    let refused = |message: &str| Refusal {
        message: message.into(),
        busy: false,
    };
    assert_eq!(
        f.start(&open("fail", &["nothere"])).await.unwrap_err(),
        refused("exec nothere: not found in the image's PATH (/bin)")
    );
    assert_eq!(
        f.start(&open("fail", &["/bin/nothere"])).await.unwrap_err(),
        refused("exec /bin/nothere: no such file in the image")
    );
    assert_eq!(
        f.start(&open("fail", &["/etc/passwd"])).await.unwrap_err(),
        refused("exec /etc/passwd: permission denied (not executable, or not by uid 0)")
    );
    assert_eq!(
        f.start(&open("fail", &[])).await.unwrap_err(),
        refused("the command is empty")
    );
    assert_eq!(f.exec.sessions("fail"), 0);
    f.only_the_workload_left(&inst).await;

    inst.stop(Duration::from_secs(1)).await;
    assert_eq!(
        f.start(&open("fail", &["true"])).await.unwrap_err(),
        refused("instance fail is not running")
    );
    f.rt.remove("fail").await.unwrap();
    assert_eq!(
        f.start(&open("fail", &["true"])).await.unwrap_err(),
        refused("instance fail is not running")
    );
}

/// The node shutting down ends its sessions with an `Error`, and kills
/// their commands.
#[tokio::test]
async fn shutdown_ends_sessions() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.running(f.spec("down")).await;
    let o = open("down", &["sh", "-c", "sleep 1000 & echo ready; sleep 1001"]);
    let mut client = Client::connect(f.start(&o).await.unwrap());
    client.wait_for("ready").await;
    f.shutdown.cancel();
    let out = client.finish().await;
    assert_eq!(out.end, Err("the node is shutting down".into()));
    tokio::time::timeout(TIMEOUT, f.exec.stopped())
        .await
        .expect("sessions ended");
    assert_eq!(f.cgroup_procs("down"), [inst.pid()]);
    f.remove(inst).await;
}

/// A configured limit; isolation `none`: the command runs on the host from
/// the instance's working dir.
#[tokio::test]
async fn isolation_none_and_a_configured_limit() {
    let mut cfg = ExecConfig::new(HELPER);
    cfg.max_sessions = 1;
    let f = Fixture::with_config(Isolation::None, cfg);
    let inst = f.running(f.spec("none")).await;
    let held = f.start(&open("none", &["sleep", "1000"])).await.unwrap();
    let refusal = f.start(&open("none", &["true"])).await.unwrap_err();
    assert!(refusal.busy, "{refusal:?}");
    assert!(
        refusal.message.contains("already has 1 exec sessions"),
        "{refusal:?}"
    );
    drop(held);
    eventually("a free place", || f.exec.sessions("none") == 0).await;
    let out = run(&f, &open("none", &["sh", "-c", "pwd; echo $GREETING"])).await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    let cwd = f.rt.instance_dir("none").join("cwd");
    assert_eq!(
        out.stdout,
        format!("{}\nhello from the spec\n", cwd.display())
    );
    let mut o = open("none", &["sh", "-c", "tty >/dev/null && stty size"]);
    o.tty = true;
    let out = run(&f, &o).await;
    assert_eq!(out.end, Ok(0), "{out:?}");
    assert!(out.stdout.contains("24 80"), "{out:?}");
    f.remove(inst).await;
}
