//! The process runtime against the real kernel: namespaces, overlayfs,
//! cgroups, signals. Needs root and a static busybox (Debian's
//! `busybox-static`, at `/bin/busybox`), which makes the test image.
//!
//! The shim is the `verge-shim` binary of this package (its `main` calls
//! `shim_main`, as the `verge` binary's does).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{eventually, is_alive, require_root};
use verge_api::logs::{LogRecord, LogStream};
use verge_api::wire::{ErrorCategory, Isolation};
use verge_node::runtime::{Exit, Instance, LaunchSpec, ProcessRuntime};

const MIB: u64 = 1024 * 1024;

/// A temp dir with an instances root, a busybox image layer, and a runtime
/// whose cgroups live under their own `verge/test-...` parent (removed on drop).
struct Fixture {
    tmp: tempfile::TempDir,
    rt: ProcessRuntime,
    layer: PathBuf,
    cgroup_parent: String,
}

impl Fixture {
    fn new(isolation: Isolation) -> Fixture {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let layer = common::busybox_layer(tmp.path());
        let cgroup_parent = common::cgroup_parent();
        let rt = common::runtime(&tmp.path().join("instances"), &cgroup_parent, isolation);
        Fixture {
            tmp,
            rt,
            layer,
            cgroup_parent,
        }
    }

    fn spec(&self, id: &str, argv: &[&str]) -> LaunchSpec {
        let argv = argv.iter().map(|s| s.to_string()).collect();
        common::launch_spec(id, &self.layer, argv)
    }

    async fn start(&self, spec: LaunchSpec) -> Instance {
        self.rt.start(spec).await.expect("start")
    }

    async fn run(&self, id: &str, script: &str) -> (Exit, String) {
        let inst = self.start(self.spec(id, &["sh", "-c", script])).await;
        let exit = tokio::time::timeout(Duration::from_secs(30), inst.wait())
            .await
            .expect("the instance did not exit in 30 s");
        (exit, self.stdout(id))
    }

    /// The workload's stdout so far: the messages of its app records
    /// from stdout, a line each (the shim writes them in its logs dir).
    fn stdout(&self, id: &str) -> String {
        self.output(id, LogStream::Stdout)
    }

    fn stderr(&self, id: &str) -> String {
        self.output(id, LogStream::Stderr)
    }

    fn output(&self, id: &str, stream: LogStream) -> String {
        let app = fs::read_to_string(self.rt.logs_dir(id).join("app.log")).unwrap_or_default();
        app.lines()
            .filter_map(|l| serde_json::from_str::<LogRecord>(l).ok())
            .filter(|r| r.stream == Some(stream))
            .map(|r| r.message + "\n")
            .collect()
    }

    /// Every hierarchy's directory of the cgroup parent.
    fn cgroup_parent_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .filter_map(|e| Some(e.ok()?.path().join(&self.cgroup_parent)))
            .filter(|p| p.is_dir())
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::remove_cgroup_parent(&self.cgroup_parent);
        let _ = &self.tmp;
    }
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn shim_pid(f: &Fixture, id: &str) -> i32 {
    let text = fs::read_to_string(f.rt.instance_dir(id).join("shim.pid")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// The workload is PID 1 of its own PID namespace and sees only its own
/// processes; its hostname is its own; /tmp is a tmpfs; / is the overlay,
/// whose writes land in the upper dir and leave the image layer as it was;
/// /dev is minimal; the capability set is reduced.
#[tokio::test]
async fn namespaces_rootfs_and_devices() {
    let f = Fixture::new(Isolation::Namespaces);
    let script = "echo pid=$$; echo host=$(hostname); \
                  echo procs=$(ls /proc | grep '^[0-9]*$' | tr '\\n' ' '); \
                  grep ' /tmp ' /proc/mounts; grep ' / ' /proc/mounts; \
                  test -c /dev/null && test -c /dev/urandom && test -c /dev/tty && echo dev-ok; \
                  ls /dev/pts/ptmx >/dev/null && echo pts-ok; \
                  grep CapEff /proc/self/status; \
                  echo cgroups-elsewhere=$(grep -v ':/$' /proc/self/cgroup | wc -l); \
                  echo data > /written; echo tmp > /tmp/in-tmp";
    let (exit, out) = f.run("ns1", script).await;
    assert_eq!(
        exit.code,
        Some(0),
        "{exit:?}\nstdout: {out}\nstderr: {}",
        f.stderr("ns1")
    );
    assert!(out.contains("pid=1\n"), "{out}");
    assert!(out.contains("host=ns1\n"), "{out}");
    let procs = out.lines().find_map(|l| l.strip_prefix("procs=")).unwrap();
    let pids: BTreeSet<u32> = procs
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1), "{procs}");
    assert!(
        pids.len() <= 6 && pids.iter().all(|p| *p < 20),
        "sees other processes: {procs}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("tmpfs /tmp tmpfs")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("overlay / overlay")),
        "{out}"
    );
    assert!(
        out.contains("dev-ok\n") && out.contains("pts-ok\n"),
        "{out}"
    );
    // Docker's default capabilities less CAP_MKNOD.
    assert!(out.contains("CapEff:\t00000000a00425fb"), "{out}");
    // Its own cgroup is the root of its cgroup namespace.
    assert!(out.contains("cgroups-elsewhere=0\n"), "{out}");

    let dir = f.rt.instance_dir("ns1");
    assert_eq!(
        fs::read_to_string(dir.join("upper/written")).unwrap(),
        "data\n"
    );
    assert!(
        !dir.join("upper/tmp/in-tmp").exists(),
        "/tmp is not the overlay"
    );
    assert!(
        !f.layer.join("written").exists(),
        "the image layer was written to"
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(dir.to_str().unwrap()),
        "the rootfs is mounted on the host"
    );
    f.rt.remove("ns1").await.unwrap();
}

/// A workload allocating past its memory limit is OOM-killed and reported so.
#[tokio::test]
async fn memory_limit_oom_kills() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut spec = f.spec(
        "oom1",
        &[
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    spec.memory = 32 * MIB;
    let inst = f.start(spec).await;
    let exit = tokio::time::timeout(Duration::from_secs(60), inst.wait())
        .await
        .unwrap();
    assert!(exit.oom, "{exit:?}, stdout: {}", f.stdout("oom1"));
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert_eq!(exit.category(), Some(ErrorCategory::Oom));
    assert_eq!(exit.describe(), "killed: out of memory");
    assert!(!f.stdout("oom1").contains("survived"));

    // Within the limit: no OOM.
    let (exit, out) = f
        .run(
            "oom2",
            "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo survived",
        )
        .await;
    assert!(!exit.oom && exit.code == Some(0), "{exit:?}");
    assert!(out.contains("survived"));
    for id in ["oom1", "oom2"] {
        f.rt.remove(id).await.unwrap();
    }
}

/// CPU quota, memory and pids limits are in the instance's cgroup, which
/// holds the workload; the pids limit stops forks.
#[tokio::test]
async fn cgroup_limits_are_applied() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut spec = f.spec("cg1", &["sleep", "1000"]);
    spec.cpu = 1.5;
    spec.memory = 48 * MIB;
    spec.pids = 77;
    let inst = f.start(spec).await;
    let read = |ctrl: &str, file: &str| {
        f.rt.cgroup_file("cg1", ctrl, file)
            .unwrap_or_else(|| panic!("no {file}"))
            .trim()
            .to_string()
    };
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert_eq!(read("cpu", "cpu.max"), "150000 100000");
        assert_eq!(read("memory", "memory.max"), (48 * MIB).to_string());
    } else {
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (48 * MIB).to_string()
        );
    }
    assert_eq!(read("pids", "pids.max"), "77");
    let procs = read("pids", "cgroup.procs");
    assert!(
        procs.lines().any(|p| p == inst.pid().to_string()),
        "{procs}"
    );
    inst.stop(Duration::from_secs(1)).await;
    f.rt.remove("cg1").await.unwrap();

    // 4 processes at most: sh and 3 sleeps; the rest cannot fork.
    let mut spec = f.spec(
        "cg2",
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do sleep 5 & done; echo forked; wait",
        ],
    );
    spec.pids = 4;
    let inst = f.start(spec).await;
    eventually("a refused fork", Duration::from_secs(10), || {
        f.stderr("cg2").contains("can't fork")
    })
    .await;
    inst.stop(Duration::from_secs(0)).await;
    let err = f.stderr("cg2");
    assert!(
        err.contains("can't fork") || err.contains("Resource temporarily unavailable"),
        "stderr: {err}"
    );
    f.rt.remove("cg2").await.unwrap();
}

/// Stop sends SIGTERM, then SIGKILL after the grace period; a PID 1
/// without a SIGTERM handler is killed at once; exit codes come through.
#[tokio::test]
async fn stop_and_exit_codes() {
    let f = Fixture::new(Isolation::Namespaces);
    let ready = |id: &str| {
        let id = id.to_owned();
        let f = &f;
        move || f.stdout(&id).contains("ready")
    };

    // Handles SIGTERM by exiting 0.
    let inst = f
        .start(f.spec(
            "stop1",
            &[
                "sh",
                "-c",
                "trap 'echo term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        ))
        .await;
    eventually("stop1 ready", Duration::from_secs(10), ready("stop1")).await;
    let t = Instant::now();
    let exit = inst.stop(Duration::from_secs(10)).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(f.stdout("stop1").contains("term"));

    // Catches SIGTERM and carries on: SIGKILL after the grace period.
    let inst = f
        .start(f.spec(
            "stop2",
            &[
                "sh",
                "-c",
                "trap 'echo ignored' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        ))
        .await;
    eventually("stop2 ready", Duration::from_secs(10), ready("stop2")).await;
    let t = Instant::now();
    let exit = inst.stop(Duration::from_secs(1)).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(f.stdout("stop2").contains("ignored"));
    assert_eq!(exit.category(), Some(ErrorCategory::Crash));

    // No SIGTERM handler: PID 1 would never see it, so SIGKILL at once.
    let inst = f.start(f.spec("stop3", &["sleep", "1000"])).await;
    let t = Instant::now();
    let exit = inst.stop(Duration::from_secs(30)).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!is_alive(inst.pid()));

    // A crash: exit code 3. Many waiters see the same exit.
    let inst = f
        .start(f.spec("crash", &["sh", "-c", "sleep 0.2; exit 3"]))
        .await;
    let other = inst.clone();
    let (a, b) = tokio::join!(inst.wait(), other.wait());
    assert_eq!(a, b);
    assert_eq!(a.code, Some(3));
    assert_eq!(a.category(), Some(ErrorCategory::Crash));
    assert_eq!(a.describe(), "exited with code 3");
    // Stopping an exited instance returns its exit.
    assert_eq!(inst.stop(Duration::from_secs(1)).await, a);

    for id in ["stop1", "stop2", "stop3", "crash"] {
        f.rt.remove(id).await.unwrap();
    }
}

/// The image's user is resolved in its /etc/passwd and /etc/group.
#[tokio::test]
async fn runs_as_the_image_user() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut spec = f.spec(
        "user1",
        &[
            "sh",
            "-c",
            "id; echo home=$HOME; grep CapEff /proc/self/status",
        ],
    );
    spec.user = Some("app".into());
    let inst = f.start(spec).await;
    let exit = inst.wait().await;
    assert_eq!(exit.code, Some(0), "{exit:?} {}", f.stderr("user1"));
    let out = f.stdout("user1");
    assert!(
        out.contains("uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)"),
        "{out}"
    );
    assert!(out.contains("home=/home/app"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");

    let mut spec = f.spec("user2", &["id"]);
    spec.user = Some("4242:77".into());
    let exit = f.start(spec).await.wait().await;
    assert_eq!(exit.code, Some(0));
    assert!(
        f.stdout("user2").contains("uid=4242 gid=77 groups=77"),
        "{}",
        f.stdout("user2")
    );

    let mut spec = f.spec("user3", &["id"]);
    spec.user = Some("ghost".into());
    let exit = f.start(spec).await.wait().await;
    assert!(exit.start_failed, "{exit:?}");
    assert_eq!(
        exit.message.as_deref(),
        Some("user \"ghost\" is not in the image's /etc/passwd")
    );
    for id in ["user1", "user2", "user3"] {
        f.rt.remove(id).await.unwrap();
    }
}

/// A new runtime (a restarted daemon) adopts a running instance (same PID)
/// and can stop it; an instance that died while no daemon watched is
/// adopted with its exit.
#[tokio::test]
async fn adoption_after_a_daemon_restart() {
    let f = Fixture::new(Isolation::Namespaces);
    let cfg = f.rt.config().clone();
    let (pid, dead_pid, orphan_pid) = {
        let inst = f.start(f.spec("adopt1", &["sleep", "1000"])).await;
        let dead = f.start(f.spec("adopt2", &["sleep", "1000"])).await;
        let orphan = f.start(f.spec("adopt3", &["sleep", "1000"])).await;
        (inst.pid(), dead.pid(), orphan.pid())
        // The handles go: as if the daemon died.
    };
    // The shim is not our child: nothing ties it to this process.
    let shim = shim_pid(&f, "adopt1");
    let stat = fs::read_to_string(format!("/proc/{shim}/stat")).unwrap();
    let ppid: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(ppid, std::process::id(), "the shim is the daemon's child");
    // While no daemon watches, adopt2 is killed.
    kill9(dead_pid);
    let exit_file = f.rt.instance_dir("adopt2").join("exit.json");
    eventually("adopt2's exit record", Duration::from_secs(10), || {
        exit_file.exists()
    })
    .await;
    // adopt3's shim is killed: its workload dies with it (nobody would
    // record its exit), and adoption reports it lost.
    kill9(shim_pid(&f, "adopt3"));
    eventually(
        "adopt3's workload to die with its shim",
        Duration::from_secs(10),
        || !is_alive(orphan_pid),
    )
    .await;

    let rt = ProcessRuntime::new(cfg).unwrap();
    let mut adopted = rt.adopt().await.unwrap();
    adopted.sort_by(|a, b| a.spec.instance_id.cmp(&b.spec.instance_id));
    assert_eq!(adopted.len(), 3);
    let lost = adopted[2].instance.try_exit().expect("adopt3 exited");
    assert_eq!(
        lost.message.as_deref(),
        Some("the instance's shim died without recording its exit")
    );
    assert_eq!(lost.category(), Some(ErrorCategory::Crash));
    let running = &adopted[0];
    assert_eq!(running.spec.instance_id, "adopt1");
    assert_eq!(running.spec.argv, ["sleep", "1000"]);
    assert_eq!(running.instance.pid(), pid);
    assert!(running.instance.try_exit().is_none());
    let exited = adopted[1].instance.try_exit().expect("adopt2 exited");
    assert_eq!(exited.signal, Some(libc::SIGKILL));

    let exit = running.instance.stop(Duration::from_secs(5)).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(!is_alive(pid));
    for id in ["adopt1", "adopt2", "adopt3"] {
        rt.remove(id).await.unwrap();
    }
    assert!(rt.adopt().await.unwrap().is_empty());
}

/// 20 start/stop/remove cycles leave no cgroup, mount, process or instance
/// dir behind; the logs are kept.
#[tokio::test]
async fn no_leaks_after_many_cycles() {
    let f = Fixture::new(Isolation::Namespaces);
    let mut pids = Vec::new();
    for i in 0..20 {
        let id = format!("cycle{i}");
        let inst = f
            .start(f.spec(&id, &["sh", "-c", "echo started; sleep 1000"]))
            .await;
        pids.push(shim_pid(&f, &id));
        pids.push(inst.pid());
        eventually("the workload's output", Duration::from_secs(10), || {
            f.stdout(&id).contains("started")
        })
        .await;
        inst.stop(Duration::from_secs(1)).await;
        f.rt.remove(&id).await.unwrap();
        assert!(f.rt.logs_dir(&id).join("exit.json").exists());
    }
    for dir in f.cgroup_parent_dirs() {
        let children: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        assert!(children.is_empty(), "leftover cgroups: {children:?}");
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(f.tmp.path().to_str().unwrap()),
        "leftover mounts"
    );
    // Shims exit right after recording the exit; give them a moment.
    eventually(
        "every shim and workload to be gone",
        Duration::from_secs(5),
        || pids.iter().all(|p| !is_alive(*p)),
    )
    .await;
    assert_eq!(
        fs::read_dir(&f.rt.config().root).unwrap().count(),
        0,
        "leftover instance dirs"
    );
    assert!(f.stdout("cycle7").contains("started"), "logs were not kept");
}

/// A command missing from the image is a start failure with a clear message.
#[tokio::test]
async fn start_failures_are_reported() {
    let f = Fixture::new(Isolation::Namespaces);
    let inst = f.start(f.spec("fail1", &["/hello"])).await;
    let exit = inst.wait().await;
    assert!(exit.start_failed, "{exit:?}");
    assert_eq!(
        exit.message.as_deref(),
        Some("exec /hello: no such file in the image")
    );
    assert_eq!(exit.category(), Some(ErrorCategory::Start));
    assert_eq!(
        exit.describe(),
        "failed to start: exec /hello: no such file in the image"
    );

    let exit = f.start(f.spec("fail2", &["hello"])).await.wait().await;
    assert_eq!(
        exit.message.as_deref(),
        Some("exec hello: not found in the image's PATH (/bin)")
    );

    let mut spec = f.spec("fail3", &["/bin/sh"]);
    spec.layers = vec!["/nonexistent/layer".into()];
    let exit = f.start(spec).await.wait().await;
    assert!(exit.start_failed);
    assert!(
        exit.message
            .unwrap()
            .contains("layer dir /nonexistent/layer does not exist")
    );

    // The same id twice is refused while the first exists.
    let err = f.rt.start(f.spec("fail1", &["true"])).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    for id in ["fail1", "fail2", "fail3"] {
        f.rt.remove(id).await.unwrap();
    }
}

/// Isolation `none`: the command is found in the image layers and runs on
/// the host, from the instance's own working directory, in its cgroup.
#[tokio::test]
async fn isolation_none_runs_from_the_layers() {
    let f = Fixture::new(Isolation::None);
    let (exit, out) = f.run("none1", "echo pid=$$; pwd; hostname").await;
    assert_eq!(exit.code, Some(0), "{exit:?} {}", f.stderr("none1"));
    let pid_line = out.lines().next().unwrap();
    assert_ne!(pid_line, "pid=1", "isolation none has no PID namespace");
    let cwd = f.rt.instance_dir("none1").join("cwd");
    assert!(out.contains(&format!("{}\n", cwd.display())), "{out}");
    let host = nix::unistd::gethostname().unwrap();
    assert!(out.contains(host.to_str().unwrap()), "{out}");
    let exit = f.start(f.spec("none2", &["nothere"])).await.wait().await;
    assert_eq!(
        exit.message.as_deref(),
        Some("exec nothere: not found in the image's PATH (/bin)")
    );
    for id in ["none1", "none2"] {
        f.rt.remove(id).await.unwrap();
    }
    // /dev/null of the host is still a device (nothing was mounted over it).
    assert!(
        fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
}
