//! Instance logs against real components: instances run by the process
//! runtime and its shim (the `verge-shim` binary), whose output the shim
//! captures into app records; system records written by the reconciler
//! (with a real registry, Debian's `docker-registry`, and the image store);
//! retention; and the reader the control plane's logs streams are served
//! from (filters, merging, following).
//!
//! Needs root (namespaces, mounts, cgroups) and a static busybox at
//! `/bin/busybox` (Debian's `busybox-static`), which makes the test image.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{eventually, require_root};
use tokio_util::sync::CancellationToken;
use verge_api::logs::{InstanceRecord, LogRecord, LogSource, LogStream, MAX_MESSAGE, Severity};
use verge_api::manifest::Restart;
use verge_api::wire::{
    DesiredSet, InstanceReport, InstanceSpec, InstanceState, Isolation, LogsFrame, LogsOpen,
};
use verge_node::logs::{LogLimits, Logs, Meta};
use verge_node::reconcile::Reconciler;
use verge_node::runtime::{Instance, LaunchSpec, ProcessRuntime};

/// A data dir with `instances/` and `logs/`, a busybox image layer, a
/// process runtime (isolation `namespaces`, cgroups under their own
/// parent) and the node's log store on `logs/`.
struct Fixture {
    tmp: tempfile::TempDir,
    rt: ProcessRuntime,
    logs: Logs,
    layer: PathBuf,
    cgroup_parent: String,
}

impl Fixture {
    fn new(limits: LogLimits) -> Fixture {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let layer = common::busybox_layer(tmp.path());
        let cgroup_parent = common::cgroup_parent();
        let rt = common::runtime(
            &tmp.path().join("instances"),
            &cgroup_parent,
            Isolation::Namespaces,
        )
        .with_log_limits(limits);
        let logs = Logs::new(tmp.path().join("logs"), limits, "n1");
        Fixture {
            tmp,
            rt,
            logs,
            layer,
            cgroup_parent,
        }
    }

    fn spec(&self, id: &str, script: &str) -> LaunchSpec {
        let argv = vec!["sh".into(), "-c".into(), script.into()];
        common::launch_spec(id, &self.layer, argv)
    }

    async fn start(&self, id: &str, script: &str) -> Instance {
        self.rt.start(self.spec(id, script)).await.expect("start")
    }

    /// Runs `script` to its end.
    async fn run(&self, id: &str, script: &str) -> Vec<LogRecord> {
        let inst = self.start(id, script).await;
        let exit = tokio::time::timeout(Duration::from_secs(30), inst.wait())
            .await
            .expect("the instance did not exit in 30 s");
        assert_eq!(exit.code, Some(0), "{exit:?}: {:?}", self.app(id));
        self.rt.remove(id).await.unwrap();
        self.app(id)
    }

    /// The app records of `id`, oldest first, straight from its files.
    fn app(&self, id: &str) -> Vec<LogRecord> {
        let dir = self.rt.logs_dir(id);
        let mut files: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n = match name.strip_prefix("app.log") {
                    Some("") => 0,
                    Some(rest) => rest.strip_prefix('.')?.parse().ok()?,
                    None => return None,
                };
                Some((n, e.path()))
            })
            .collect();
        files.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        files
            .iter()
            .flat_map(|(_, p)| {
                fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    // A line being written may be cut short.
                    .filter_map(|l| serde_json::from_str::<LogRecord>(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Reads `open` through the node's log reader (what a logs stream sends
    /// before `HistoryEnd`), off the runtime.
    async fn read(&self, open: LogsOpen) -> Vec<LogsFrame> {
        self.logs.sync().await;
        let logs = self.logs.clone();
        tokio::task::spawn_blocking(move || {
            let mut r = logs.reader(&open);
            std::iter::from_fn(|| r.next_history()).collect()
        })
        .await
        .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::remove_cgroup_parent(&self.cgroup_parent);
    }
}

fn open(instances: &[&str]) -> LogsOpen {
    LogsOpen {
        instances: instances.iter().map(|s| s.to_string()).collect(),
        ..LogsOpen::default()
    }
}

fn records(frames: &[LogsFrame]) -> Vec<InstanceRecord> {
    frames
        .iter()
        .flat_map(|f| match f {
            LogsFrame::Records { records } => records.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn messages(frames: &[LogsFrame]) -> Vec<String> {
    records(frames)
        .into_iter()
        .map(|r| r.record.message)
        .collect()
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// stdout and stderr lines become records with the stream they came from,
/// stamped when read, with the severity they declare or their stream's.
#[tokio::test]
async fn captures_lines_with_times_and_streams() {
    let f = Fixture::new(LogLimits::default());
    let before = now_us();
    let got = f
        .run(
            "cap1",
            "echo out1; echo err1 >&2; sleep 0.3; echo 'level=error out2'; echo '[DEBUG] err2' >&2",
        )
        .await;
    let after = now_us();
    let seen: Vec<(&str, LogStream, Severity)> = got
        .iter()
        .map(|r| (r.message.as_str(), r.stream.unwrap(), r.severity))
        .collect();
    let stdout: Vec<_> = seen.iter().filter(|s| s.1 == LogStream::Stdout).collect();
    let stderr: Vec<_> = seen.iter().filter(|s| s.1 == LogStream::Stderr).collect();
    assert_eq!(
        stdout,
        [
            &("out1", LogStream::Stdout, Severity::Info),
            &("level=error out2", LogStream::Stdout, Severity::Error)
        ]
    );
    assert_eq!(
        stderr,
        [
            &("err1", LogStream::Stderr, Severity::Warn),
            &("[DEBUG] err2", LogStream::Stderr, Severity::Debug)
        ]
    );
    assert!(got.iter().all(|r| r.source == LogSource::App));
    assert!(
        got.iter().all(|r| (before..=after).contains(&r.time_us)),
        "{got:?}"
    );
    assert!(got.windows(2).all(|w| w[0].time_us <= w[1].time_us));
    let t = |m: &str| got.iter().find(|r| r.message.ends_with(m)).unwrap().time_us;
    assert!(
        t("out2") - t("err1") >= 250_000,
        "stamped when read: {got:?}"
    );
    // The runtime dir is gone; the logs, the exit record and shim.log stay.
    let dir = f.rt.logs_dir("cap1");
    assert!(!f.rt.instance_dir("cap1").exists());
    assert!(dir.join("exit.json").exists() && dir.join("shim.log").exists());
    assert!(!dir.join("stdout.log").exists());
}

/// A line longer than the maximum message is cut into records; bytes that
/// are not UTF-8 are escaped; an unfinished line is written after a quiet
/// time, and at the end of the output.
#[tokio::test]
async fn long_lines_binary_and_partial_lines() {
    let f = Fixture::new(LogLimits::default());
    let got = f
        .run(
            "long1",
            "head -c 40000 /dev/zero | tr '\\0' a; echo; \
             printf 'bin\\377\\001ary\\n'; \
             printf 'part'; sleep 1; printf 'ial\\n'; printf 'no newline'",
        )
        .await;
    let msgs: Vec<&str> = got.iter().map(|r| r.message.as_str()).collect();
    let long: Vec<&&str> = msgs.iter().filter(|m| m.starts_with('a')).collect();
    assert_eq!(
        long.len(),
        3,
        "{:?}",
        long.iter().map(|m| m.len()).collect::<Vec<_>>()
    );
    assert!(
        long.iter()
            .all(|m| m.len() <= MAX_MESSAGE && m.bytes().all(|b| b == b'a'))
    );
    assert_eq!(long.iter().map(|m| m.len()).sum::<usize>(), 40000);
    let rest: Vec<&str> = msgs
        .iter()
        .filter(|m| !m.starts_with('a'))
        .copied()
        .collect();
    assert_eq!(rest, ["bin\\xff\u{1}ary", "part", "ial", "no newline"]);
    let t = |m: &str| got.iter().find(|r| r.message == m).unwrap().time_us;
    let gap = t("ial") - t("part");
    assert!(
        (500_000..1_500_000).contains(&gap),
        "part flushed after the quiet time: {gap} µs"
    );
}

/// With small limits, app.log rotates and the number of files stays
/// bounded; the newest records are kept in order.
#[tokio::test]
async fn rotation_keeps_files_bounded() {
    let limits = LogLimits {
        file_size: 4096,
        files: 3,
        ..LogLimits::default()
    };
    let f = Fixture::new(limits);
    let got = f.run("rot1", "seq 1 5000").await;
    let dir = f.rt.logs_dir("rot1");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("app.log"))
        .collect();
    names.sort();
    assert_eq!(names, ["app.log", "app.log.1", "app.log.2"]);
    for n in &names {
        let size = fs::metadata(dir.join(n)).unwrap().len();
        assert!(size <= 4096, "{n}: {size} bytes");
    }
    let numbers: Vec<u32> = got.iter().map(|r| r.message.parse().unwrap()).collect();
    assert_eq!(*numbers.last().unwrap(), 5000);
    assert!(numbers.len() < 300, "{} records kept", numbers.len());
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or disorder"
    );
    // The reader reads them across the files, in order too.
    let frames = f.read(open(&["rot1"])).await;
    let read: Vec<u32> = messages(&frames)
        .iter()
        .map(|m| m.parse().unwrap())
        .collect();
    assert_eq!(read, numbers);
}

/// The shim captures output while no daemon-side object exists (the
/// daemon died); a new runtime re-adopts the instance and every line is
/// there.
#[tokio::test]
async fn capture_goes_on_without_the_daemon() {
    let f = Fixture::new(LogLimits::default());
    let cfg = f.rt.config().clone();
    {
        let inst = f
            .start(
                "alone1",
                "echo before; sleep 1; echo during; exec sleep 1000",
            )
            .await;
        assert!(inst.pid() > 0);
        // Every handle goes: as if the daemon died.
    }
    eventually(
        "a line written with no daemon",
        Duration::from_secs(10),
        || f.app("alone1").iter().any(|r| r.message == "during"),
    )
    .await;
    let rt = ProcessRuntime::new(cfg).unwrap();
    let adopted = rt.adopt().await.unwrap();
    assert_eq!(adopted.len(), 1);
    adopted[0].instance.stop(Duration::from_secs(1)).await;
    rt.remove("alone1").await.unwrap();
    let msgs: Vec<String> = f.app("alone1").into_iter().map(|r| r.message).collect();
    assert_eq!(msgs, ["before", "during"]);
}

/// Filters on the merged app and system records select exactly: source,
/// least severity, since (inclusive) and until (exclusive).
#[tokio::test]
async fn reading_with_filters() {
    let f = Fixture::new(LogLimits::default());
    f.logs.instance_started(Meta {
        instance: "flt1".into(),
        workload: "web".into(),
        ..Meta::default()
    });
    f.logs.system("flt1", Severity::Info, "starting");
    f.logs.sync().await;
    f.run(
        "flt1",
        "echo one; sleep 0.05; echo 'WARN: two' >&2; sleep 0.05; echo 'level=error three'; sleep 0.05; echo four",
    )
    .await;
    f.logs
        .system("flt1", Severity::Error, "exited with code 0?");
    let frames = f.read(open(&["flt1", "never"])).await;
    assert_eq!(
        frames[0],
        LogsFrame::Missing {
            instance: "never".into(),
            reason: "no logs of instance never on node n1 (never ran here, or pruned)".into(),
        }
    );
    let all = records(&frames);
    let msgs: Vec<&str> = all.iter().map(|r| r.record.message.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "starting",
            "one",
            "WARN: two",
            "level=error three",
            "four",
            "exited with code 0?"
        ]
    );
    assert!(
        all.iter()
            .all(|r| r.instance == "flt1" && r.workload == "web")
    );
    let time = |m: &str| {
        all.iter()
            .find(|r| r.record.message == m)
            .unwrap()
            .record
            .time_us
    };

    let f = &f;
    let read = |o: LogsOpen| async move { messages(&f.read(o).await) };
    let base = open(&["flt1"]);
    assert_eq!(
        read(LogsOpen {
            source: Some(LogSource::App),
            ..base.clone()
        })
        .await,
        ["one", "WARN: two", "level=error three", "four"]
    );
    assert_eq!(
        read(LogsOpen {
            source: Some(LogSource::System),
            ..base.clone()
        })
        .await,
        ["starting", "exited with code 0?"]
    );
    assert_eq!(
        read(LogsOpen {
            min_severity: Some(Severity::Warn),
            ..base.clone()
        })
        .await,
        ["WARN: two", "level=error three", "exited with code 0?"]
    );
    assert_eq!(
        read(LogsOpen {
            since_us: Some(time("WARN: two")),
            until_us: Some(time("four")),
            ..base.clone()
        })
        .await,
        ["WARN: two", "level=error three"]
    );
    assert_eq!(
        read(LogsOpen {
            source: Some(LogSource::App),
            min_severity: Some(Severity::Error),
            since_us: Some(time("one")),
            ..base.clone()
        })
        .await,
        ["level=error three"]
    );
}

/// Records of two instances are merged by time.
#[tokio::test]
async fn two_instances_merge_in_time_order() {
    let f = Fixture::new(LogLimits::default());
    let a = f
        .start("mrg-a", "for i in 1 2 3; do echo a$i; sleep 0.4; done")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = f
        .start("mrg-b", "for i in 1 2 3; do echo b$i; sleep 0.4; done")
        .await;
    a.wait().await;
    b.wait().await;
    let frames = f.read(open(&["mrg-b", "mrg-a"])).await;
    let all = records(&frames);
    let got: Vec<(String, String)> = all
        .iter()
        .map(|r| (r.instance.clone(), r.record.message.clone()))
        .collect();
    let want: Vec<(String, String)> = ["a1", "b1", "a2", "b2", "a3", "b3"]
        .iter()
        .map(|m| (format!("mrg-{}", &m[..1]), m.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(
        all.windows(2)
            .all(|w| w[0].record.time_us <= w[1].record.time_us)
    );
    for id in ["mrg-a", "mrg-b"] {
        f.rt.remove(id).await.unwrap();
    }
}

/// Following: after the history, a line the workload writes later comes.
#[tokio::test]
async fn follow_receives_later_lines() {
    let f = Fixture::new(LogLimits::default());
    let inst = f
        .start(
            "fol1",
            "echo first; sleep 1.5; echo second; exec sleep 1000",
        )
        .await;
    eventually("the first line", Duration::from_secs(10), || {
        f.app("fol1").iter().any(|r| r.message == "first")
    })
    .await;
    let logs = f.logs.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let follower = std::thread::spawn(move || {
        let mut r = logs.reader(&LogsOpen {
            follow: true,
            ..open(&["fol1"])
        });
        while let Some(frame) = r.next_history() {
            if tx.blocking_send(("history", messages(&[frame]))).is_err() {
                return;
            }
        }
        loop {
            let batch: Vec<String> = r
                .next_live()
                .into_iter()
                .map(|r| r.record.message)
                .collect();
            if !batch.is_empty() && tx.blocking_send(("live", batch)).is_err() {
                return;
            }
            if tx.is_closed() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let first = rx.recv().await.unwrap();
    assert_eq!(first, ("history", vec!["first".to_string()]));
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the later line within 10 s")
        .unwrap();
    assert_eq!(next, ("live", vec!["second".to_string()]));
    drop(rx);
    follower.join().unwrap();
    inst.stop(Duration::from_secs(1)).await;
    f.rt.remove("fol1").await.unwrap();
}

/// Retention keeps the newest ended instances per (env, workload) and
/// never deletes a live instance's logs.
#[tokio::test]
async fn pruning_keeps_the_last_ended_instances() {
    let limits = LogLimits {
        keep_instances: 2,
        ..LogLimits::default()
    };
    let f = Fixture::new(limits);
    let meta = |id: &str, workload: &str| Meta {
        instance: id.into(),
        workload: workload.into(),
        env: "env1".into(),
        ..Meta::default()
    };
    // Five ended instances of web (one with a real run), one of worker,
    // one live web instance.
    f.logs.instance_started(meta("web0", "web"));
    f.logs.sync().await;
    f.run("web0", "echo hi").await;
    f.logs.instance_ended("web0");
    for i in 1..5 {
        let id = format!("web{i}");
        f.logs.instance_started(meta(&id, "web"));
        f.logs.system(&id, Severity::Info, "started: running");
        f.logs.sync().await;
        // Distinct end times.
        tokio::time::sleep(Duration::from_millis(5)).await;
        f.logs.instance_ended(&id);
    }
    f.logs.instance_started(meta("worker0", "worker"));
    f.logs.instance_ended("worker0");
    f.logs.instance_started(meta("live", "web"));
    f.logs.system("live", Severity::Info, "started: running");
    f.logs.prune().await;
    let mut left: Vec<String> = fs::read_dir(f.tmp.path().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["live", "web3", "web4", "worker0"]);
    let frames = f.read(open(&["web0", "web4"])).await;
    assert!(
        matches!(&frames[0], LogsFrame::Missing { instance, .. } if instance == "web0"),
        "{frames:?}"
    );
    assert_eq!(messages(&frames), ["started: running"]);
}

// --- System records through the reconciler -------------------------------

/// A reconciler with isolation `none` and no networking on `dir` (stop
/// grace 2 s; its instances outlive it).
async fn reconciler(
    dir: &Path,
    cgroup_parent: &str,
    shutdown: &CancellationToken,
) -> (
    Reconciler,
    tokio::sync::mpsc::Receiver<InstanceReport>,
    Logs,
) {
    common::reconciler(dir, cgroup_parent, shutdown, Duration::from_secs(2), false).await
}

async fn wait_report(
    reports: &mut tokio::sync::mpsc::Receiver<InstanceReport>,
    what: &str,
    wanted: impl Fn(&InstanceReport) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(r)) if wanted(&r) => return,
            Ok(Some(_)) => {}
            _ => panic!("no report of {what} within 30 s"),
        }
    }
}

/// An instance killed for memory and one failing its health check leave
/// `error` and `warn` system records that say so.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_memory_and_failing_health_are_system_records() {
    require_root();
    let (_registry, image) = common::busybox_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    let cgroup_parent = common::cgroup_parent();
    let spec = |id: &str, script: &str| InstanceSpec {
        id: id.into(),
        org: "o".into(),
        app: "a".into(),
        env: "e".into(),
        release: "r1".into(),
        workload: "web".into(),
        image: image.clone(),
        command: Some(vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ]),
        env_vars: BTreeMap::new(),
        cpu: 0.5,
        memory: 32 << 20,
        restart: Restart::Never,
        port: Some(8080),
        health: None,
        drain_ms: 0,
        volumes: Vec::new(),
        secrets: Vec::new(),
        runtime: Default::default(),
        max_cpu_time_ms: 10_000,
    };
    // A string that doubles until the 32 MiB limit kills it.
    let hog = spec("hog", "x=0123456789abcdef; while :; do x=$x$x; done");
    // Never listens on the port its check probes.
    let sick = InstanceSpec {
        health: Some(verge_api::manifest::Health {
            tcp: 8080,
            interval_ms: 100,
            timeout_ms: 1_000,
        }),
        ..spec("sick", "exec /bin/busybox sleep 1000")
    };
    let shutdown = CancellationToken::new();
    let (r, mut reports, logs) = reconciler(tmp.path(), &cgroup_parent, &shutdown).await;
    r.apply(DesiredSet {
        version: 1,
        instances: vec![hog, sick],
        listeners: Vec::new(),
    })
    .await;
    let mut failed = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while failed.len() < 2 {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(r)) if r.state == InstanceState::Failed => {
                failed.insert(r.id);
            }
            Ok(Some(_)) => {}
            _ => panic!("both instances did not fail within 60 s: {failed:?}"),
        }
    }
    logs.sync().await;
    let system = |id: &str| -> Vec<(Severity, String)> {
        fs::read_to_string(tmp.path().join(format!("logs/{id}/system.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<LogRecord>(l).unwrap())
            .map(|r| (r.severity, r.message))
            .collect()
    };
    let hog = system("hog");
    assert!(
        hog.contains(&(Severity::Error, "killed: out of memory (limit 32Mi)".into())),
        "{hog:#?}"
    );
    let sick = system("sick");
    assert!(
        sick.iter().any(|(sev, m)| *sev == Severity::Warn
            && m.starts_with("unhealthy: health check failed 3 times in a row")),
        "{sick:#?}"
    );
    assert!(
        sick.iter()
            .any(|(sev, m)| *sev == Severity::Error && m.starts_with("failed")),
        "{sick:#?}"
    );
    shutdown.cancel();
    r.stopped().await;
    common::remove_cgroup_parent(&cgroup_parent);
}

/// The system records of an instance's lifecycle: pulled, started, its
/// crash and the restart, re-adoption by a restarted daemon, stopping and
/// stopped; with severities; and its logs end when it leaves the node.
#[tokio::test]
async fn system_records_of_the_lifecycle() {
    require_root();
    let (_registry, image) = common::busybox_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    let cgroup_parent = common::cgroup_parent();
    // The instance crashes once (a marker file remembers), then runs.
    let marker = tmp.path().join("crashed-once");
    let script = format!(
        "if [ ! -e {m} ]; then echo crashing; /bin/busybox touch {m}; exit 3; fi; echo up; exec /bin/busybox sleep 1000",
        m = marker.display()
    );
    let spec = InstanceSpec {
        id: "sys1".into(),
        org: "o".into(),
        app: "a".into(),
        env: "e".into(),
        release: "r1".into(),
        workload: "web".into(),
        image,
        command: Some(vec![
            "/bin/busybox".into(),
            "sh".into(),
            "-c".into(),
            script,
        ]),
        env_vars: BTreeMap::new(),
        cpu: 0.5,
        memory: 64 << 20,
        restart: Restart::OnFailure,
        port: None,
        health: None,
        drain_ms: 0,
        volumes: Vec::new(),
        secrets: Vec::new(),
        runtime: Default::default(),
        max_cpu_time_ms: 10_000,
    };
    let shutdown = CancellationToken::new();
    let (r, mut reports, logs) = reconciler(tmp.path(), &cgroup_parent, &shutdown).await;
    r.apply(DesiredSet {
        version: 1,
        instances: vec![spec.clone()],
        listeners: Vec::new(),
    })
    .await;
    // Running after one restart.
    wait_report(&mut reports, "running after a restart", |r| {
        r.state == InstanceState::Running && r.restarts == 1
    })
    .await;
    // The daemon goes (leaving the instance running) and a new one adopts it.
    shutdown.cancel();
    r.stopped().await;
    drop((r, reports, logs));
    let shutdown = CancellationToken::new();
    let (r, mut reports, logs) = reconciler(tmp.path(), &cgroup_parent, &shutdown).await;
    wait_report(&mut reports, "re-adopted", |r| {
        r.state == InstanceState::Running
    })
    .await;
    // It leaves the node.
    r.apply(DesiredSet {
        version: 2,
        instances: Vec::new(),
        listeners: Vec::new(),
    })
    .await;
    wait_report(&mut reports, "stopped", |r| {
        r.state == InstanceState::Stopped
    })
    .await;
    let meta_path = tmp.path().join("logs/sys1/meta.json");
    let ended = || {
        serde_json::from_slice::<Meta>(&fs::read(&meta_path).unwrap_or_default())
            .is_ok_and(|m| m.ended_ms.is_some())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ended() {
        assert!(Instant::now() < deadline, "the instance's logs never ended");
        logs.sync().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let frames = tokio::task::spawn_blocking({
        let logs = logs.clone();
        move || {
            let mut r = logs.reader(&open(&["sys1"]));
            std::iter::from_fn(|| r.next_history()).collect::<Vec<_>>()
        }
    })
    .await
    .unwrap();
    let all = records(&frames);
    let system: Vec<(Severity, String)> = all
        .iter()
        .filter(|r| r.record.source == LogSource::System)
        .map(|r| (r.record.severity, r.record.message.clone()))
        .collect();
    let texts: Vec<&str> = system.iter().map(|(_, m)| m.as_str()).collect();
    let expected_prefixes = [
        (Severity::Info, "pulling "),
        (Severity::Info, "starting"),
        (Severity::Info, "started"),
        (Severity::Error, "exited with code 3"),
        (Severity::Warn, "restarting in 1.0s (failure 1 in a row)"),
        (Severity::Info, "pulling "),
        (Severity::Info, "starting"),
        (Severity::Info, "started"),
        (Severity::Info, "re-adopted by a restarted node daemon"),
        (Severity::Info, "stopping"),
        (Severity::Info, "stopped"),
    ];
    assert_eq!(system.len(), expected_prefixes.len(), "{texts:#?}");
    for ((sev, msg), (want_sev, want)) in system.iter().zip(expected_prefixes) {
        assert!(msg.starts_with(want) && *sev == want_sev, "{texts:#?}");
    }
    // App records of both runs are there too, in time order with them.
    let app: Vec<&str> = all
        .iter()
        .filter(|r| r.record.source == LogSource::App)
        .map(|r| r.record.message.as_str())
        .collect();
    assert_eq!(app, ["crashing", "up"]);
    assert!(
        all.windows(2)
            .all(|w| w[0].record.time_us <= w[1].record.time_us)
    );
    assert!(all.iter().all(|r| r.workload == "web"));
    // meta.json says what it was, and that it ended.
    let meta: Meta = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    assert_eq!(
        (
            meta.workload.as_str(),
            meta.env.as_str(),
            meta.release.as_str()
        ),
        ("web", "e", "r1")
    );
    assert!(meta.ended_ms.is_some() && meta.started_ms > 0);

    shutdown.cancel();
    r.stopped().await;
    common::remove_cgroup_parent(&cgroup_parent);
}

// --- Serving a logs stream over QUIC -------------------------------------

/// A QUIC server endpoint (the node's side here) with a self-signed
/// certificate for `localhost`, and a client endpoint (the control
/// plane's side) that trusts it.
fn quic_pair() -> (quinn::Endpoint, quinn::Endpoint) {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use std::sync::Arc;
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let server_tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)
        .unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls).unwrap())),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).unwrap(),
    )));
    (server, client)
}

/// `fut`'s output, if it comes within 10 s.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("no {what} within 10 s"))
}

/// `Logs::serve` on a real QUIC stream: `Missing`, the history, then
/// `HistoryEnd`; with `follow`, a record written later, until the control
/// plane finishes its side; without, the stream ends after `HistoryEnd`
/// even when the control plane finished its side at once.
#[tokio::test]
async fn serve_streams_history_and_follows() {
    use verge_api::wire::NodeStream;
    use verge_api::wire::io::{Reader, Writer, read_one};
    require_root();
    verge_tests::init_tls();
    let tmp = tempfile::tempdir().unwrap();
    let cgroup_parent = common::cgroup_parent();
    let shutdown = CancellationToken::new();
    let (_r, _reports, logs) = reconciler(tmp.path(), &cgroup_parent, &shutdown).await;
    logs.instance_started(Meta {
        instance: "sv1".into(),
        workload: "web".into(),
        ..Meta::default()
    });
    logs.system("sv1", Severity::Info, "one");
    logs.system("sv1", Severity::Warn, "two");

    let (server, client) = quic_pair();
    let addr = server.local_addr().unwrap();
    let node = tokio::spawn({
        let logs = logs.clone();
        async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut streams = tokio::task::JoinSet::new();
            for _ in 0..2 {
                let (send, mut recv) = conn.accept_bi().await.unwrap();
                let NodeStream::Logs(open) = read_one(&mut recv, 1 << 20).await.unwrap() else {
                    panic!("not a logs stream")
                };
                let logs = logs.clone();
                streams.spawn(async move { logs.serve(open, send, recv).await });
            }
            while let Some(done) = streams.join_next().await {
                done.unwrap();
            }
            conn
        }
    });
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();

    // Followed.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let open = LogsOpen {
        follow: true,
        ..open(&["sv1", "nope"])
    };
    Writer::new(&mut send)
        .send(&NodeStream::Logs(open.clone()))
        .await
        .unwrap();
    let mut frames = Reader::new(recv);
    let mut next = async || -> Option<LogsFrame> {
        within("a frame", frames.next::<LogsFrame>()).await.unwrap()
    };
    assert!(
        matches!(next().await, Some(LogsFrame::Missing { instance, .. }) if instance == "nope")
    );
    let history = next().await.unwrap();
    assert_eq!(messages(&[history]), ["one", "two"]);
    assert_eq!(next().await, Some(LogsFrame::HistoryEnd));
    logs.system("sv1", Severity::Error, "three");
    let live = next().await.unwrap();
    let LogsFrame::Records { records } = &live else {
        panic!("{live:?}")
    };
    assert_eq!(records[0].workload, "web");
    assert_eq!(messages(&[live]), ["three"]);
    // The control plane is done: the node finishes the stream.
    send.finish().unwrap();
    assert_eq!(next().await, None);

    // Not followed, the control plane's side finished at once.
    let (mut send, recv) = conn.open_bi().await.unwrap();
    Writer::new(&mut send)
        .send(&NodeStream::Logs(LogsOpen {
            follow: false,
            ..open
        }))
        .await
        .unwrap();
    send.finish().unwrap();
    let mut frames = Reader::new(recv);
    let mut all = Vec::new();
    while let Some(frame) = within("a frame", frames.next::<LogsFrame>()).await.unwrap() {
        all.push(frame);
    }
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(messages(&all), ["one", "two", "three"]);
    assert_eq!(all[2], LogsFrame::HistoryEnd);

    // Both streams were served to their end.
    within("the node's streams to end", node).await.unwrap();
    shutdown.cancel();
}
