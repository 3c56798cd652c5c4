//! Health checks through the reconciler: a real image pushed to a real
//! registry (Debian's `docker-registry`), pulled and run with isolation
//! `none` (host processes, served on loopback ports the node picks), checked
//! over real sockets; the reports are what the agent would send.
//!
//! Needs root (instances get cgroups) and a static busybox at
//! `/bin/busybox` (Debian's `busybox-static`), which the image carries.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::require_root;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use verge_api::manifest::{Health, Restart};
use verge_api::wire::{DesiredSet, ErrorCategory, InstanceReport, InstanceSpec, InstanceState};
use verge_node::reconcile::Reconciler;
use verge_tests::registry::Registry;

/// How long a test waits for one report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// A reconciler with isolation `none` and no networking, as `verge dev`
/// runs it without root, and the registry its image is in.
struct Node {
    reconciler: Reconciler,
    reports: mpsc::Receiver<InstanceReport>,
    /// Every report received so far, for failure messages.
    seen: Vec<InstanceReport>,
    /// Per instance, where in `seen` its next report is looked for.
    cursors: HashMap<String, usize>,
    shutdown: CancellationToken,
    image: String,
    cgroup_parent: String,
    _registry: Registry,
    /// Before `tmp`: kills what a failed test left running in it.
    _reaper: Reaper,
    tmp: tempfile::TempDir,
}

/// Kills the processes of the instances left in an instances dir (by a
/// test that failed before stopping its node), so that they do not outlive
/// the test.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(dirs) = fs::read_dir(&self.0) else {
            return;
        };
        for dir in dirs.flatten() {
            // The workload, then its shim: "PID START" each.
            for file in ["pid", "shim.pid"] {
                let pid = fs::read_to_string(dir.path().join(file))
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse().ok());
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Node {
    /// A node whose daemon stops its instances when it shuts down (as
    /// `verge dev`'s does) unless `leave_running`.
    async fn start(leave_running: bool) -> Node {
        require_root();
        let (registry, image) = common::busybox_registry().await;
        let tmp = tempfile::tempdir().unwrap();
        let cgroup_parent = common::cgroup_parent();
        let shutdown = CancellationToken::new();
        let (reconciler, reports) =
            daemon(tmp.path(), &cgroup_parent, &shutdown, !leave_running).await;
        Node {
            reconciler,
            reports,
            seen: Vec::new(),
            cursors: HashMap::new(),
            shutdown,
            image,
            cgroup_parent,
            _registry: registry,
            _reaper: Reaper(tmp.path().join("instances")),
            tmp,
        }
    }

    /// Shuts the daemon down and starts another on the same data, which
    /// stops its instances when it shuts down.
    async fn restart(self) -> Node {
        self.shutdown.cancel();
        self.reconciler.stopped().await;
        // The image store is locked until the old daemon's reconciler is gone.
        drop(self.reconciler);
        let shutdown = CancellationToken::new();
        let (reconciler, reports) =
            daemon(self.tmp.path(), &self.cgroup_parent, &shutdown, true).await;
        Node {
            reconciler,
            reports,
            seen: Vec::new(),
            cursors: HashMap::new(),
            shutdown,
            ..self
        }
    }

    /// An instance running `script` with `sh -c`, checked every 100 ms.
    fn spec(&self, id: &str, script: &str, port: Option<u16>, tcp: u16) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            org: "o".into(),
            app: "a".into(),
            env: "e".into(),
            release: "r1".into(),
            workload: "web".into(),
            image: self.image.clone(),
            command: Some(vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
            ]),
            env_vars: BTreeMap::new(),
            cpu: 0.5,
            memory: 64 << 20,
            restart: Restart::OnFailure,
            port,
            health: Some(Health {
                tcp,
                interval_ms: 100,
                timeout_ms: 1_000,
            }),
            drain_ms: 0,
            volumes: Vec::new(),
            secrets: Vec::new(),
            runtime: Default::default(),
            max_cpu_time_ms: 10_000,
        }
    }

    fn instances_dir(&self, id: &str) -> PathBuf {
        self.tmp.path().join("instances").join(id)
    }

    /// The first report of `id` that `wanted` accepts, after the one this
    /// returned last for `id` (reports of other instances received
    /// meanwhile are kept for them).
    async fn report(
        &mut self,
        id: &str,
        what: &str,
        wanted: impl Fn(&InstanceReport) -> bool,
    ) -> InstanceReport {
        let from = self.cursors.get(id).copied().unwrap_or(0);
        let mut found = self.seen[from..]
            .iter()
            .position(|r| r.id == id && wanted(r))
            .map(|i| from + i);
        let deadline = tokio::time::Instant::now() + REPORT_TIMEOUT;
        while found.is_none() {
            let next = tokio::time::timeout_at(deadline, self.reports.recv()).await;
            let Ok(Some(report)) = next else {
                panic!(
                    "no report of {id} {what} within {REPORT_TIMEOUT:?}; reports so far:\n{:#?}\nnow: {:#?}",
                    self.seen,
                    self.reconciler.snapshot()
                );
            };
            if report.id == id && wanted(&report) {
                found = Some(self.seen.len());
            }
            self.seen.push(report);
        }
        let at = found.expect("found");
        self.cursors.insert(id.to_owned(), at + 1);
        self.seen[at].clone()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.reconciler.stopped().await;
        common::remove_cgroup_parent(&self.cgroup_parent);
    }
}

/// The daemon's reconciler on `dir`, with isolation `none` and no
/// networking (stop grace 5 s).
async fn daemon(
    dir: &Path,
    cgroup_parent: &str,
    shutdown: &CancellationToken,
    stop_on_shutdown: bool,
) -> (Reconciler, mpsc::Receiver<InstanceReport>) {
    let (reconciler, reports, _logs) = common::reconciler(
        dir,
        cgroup_parent,
        shutdown,
        Duration::from_secs(5),
        stop_on_shutdown,
    )
    .await;
    (reconciler, reports)
}

fn running(r: &InstanceReport) -> bool {
    r.state == InstanceState::Running
}

/// Checks of the workload's `PORT` go to the loopback port the node gave
/// it; checks of another port go to that port on loopback. Every report
/// before the first pass says nothing of health.
#[tokio::test]
async fn instances_that_accept_turn_healthy() {
    let mut node = Node::start(false).await;
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    let set = DesiredSet {
        version: 1,
        instances: vec![
            node.spec(
                "web",
                "exec /bin/busybox httpd -f -p 127.0.0.1:$PORT",
                Some(8080),
                8080,
            ),
            node.spec("side", "exec /bin/busybox sleep 1000", None, other_port),
        ],
        listeners: Vec::new(),
    };
    node.reconciler.apply(set).await;

    let first = node.report("web", "running", running).await;
    assert_eq!(first.healthy, None, "{first:?}");
    let healthy = node.report("web", "healthy", |r| r.healthy.is_some()).await;
    assert_eq!(healthy.state, InstanceState::Running);
    assert_eq!(healthy.healthy, Some(true), "{healthy:?}");
    assert_eq!(healthy.category, None);
    let address = healthy.address.clone().expect("an address");
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    assert_ne!(address, "127.0.0.1:8080");
    // It is the workload that answered there.
    tokio::net::TcpStream::connect(&address).await.unwrap();

    let side = node
        .report("side", "healthy", |r| r.healthy.is_some())
        .await;
    assert_eq!(side.healthy, Some(true), "{side:?}");
    assert!(
        node.seen
            .iter()
            .filter(|r| r.state != InstanceState::Running)
            .all(|r| r.healthy.is_none()),
        "{:#?}",
        node.seen
    );
    node.stop().await;
}

/// An instance that never accepts turns unhealthy after three checks, is
/// stopped and handled as a failure of category `health`: restarted with
/// `on-failure`, failed with `never`.
#[tokio::test]
async fn instances_that_never_accept_are_stopped_as_unhealthy() {
    let mut node = Node::start(false).await;
    let silent = node.spec("silent", "exec /bin/busybox sleep 1000", Some(8080), 8080);
    let never = InstanceSpec {
        restart: Restart::Never,
        ..node.spec("never", "exec /bin/busybox sleep 1000", Some(8080), 8080)
    };
    node.reconciler
        .apply(DesiredSet {
            version: 1,
            instances: vec![silent, never],
            listeners: Vec::new(),
        })
        .await;

    let unhealthy = node
        .report("silent", "unhealthy", |r| r.healthy.is_some())
        .await;
    let address = unhealthy.address.clone().expect("an address");
    assert_eq!(unhealthy.state, InstanceState::Running);
    assert_eq!(unhealthy.healthy, Some(false));
    assert_eq!(unhealthy.category, Some(ErrorCategory::Health));
    assert_eq!(
        unhealthy.message.as_deref(),
        Some(
            format!("health check failed 3 times in a row: tcp {address}: connection refused")
                .as_str()
        )
    );
    let restarting = node.report("silent", "restarting", |r| !running(r)).await;
    assert_eq!(restarting.state, InstanceState::Pending, "{restarting:?}");
    assert_eq!(restarting.category, Some(ErrorCategory::Health));
    assert_eq!(restarting.healthy, None);
    assert_eq!(restarting.restarts, 1);
    let message = restarting.message.unwrap();
    assert!(
        message.starts_with("health check failed 3 times in a row: tcp ")
            && message.ends_with("; restarting in 1.0s"),
        "{message}"
    );
    let again = node.report("silent", "running again", running).await;
    assert_eq!((again.healthy, again.restarts), (None, 1), "{again:?}");

    let failed = node
        .report("never", "failed", |r| r.state == InstanceState::Failed)
        .await;
    assert_eq!(failed.category, Some(ErrorCategory::Health));
    assert_eq!(failed.healthy, None);
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("health check failed 3 times in a row: ")),
        "{failed:?}"
    );
    // Stopped, and its runtime state removed.
    assert!(!node.instances_dir("never").exists());
    assert!(
        node.seen
            .iter()
            .filter(|r| r.state != InstanceState::Running)
            .all(|r| r.healthy.is_none()),
        "{:#?}",
        node.seen
    );
    node.stop().await;
}

/// A daemon that restarts re-adopts its running instance with the address
/// it had (the loopback `PORT` it was started with), and checks it there.
#[tokio::test]
async fn a_readopted_instance_keeps_its_address_and_its_health_check() {
    let mut node = Node::start(true).await;
    let web = node.spec(
        "web",
        "exec /bin/busybox httpd -f -p 127.0.0.1:$PORT",
        Some(8080),
        8080,
    );
    node.reconciler
        .apply(DesiredSet {
            version: 1,
            instances: vec![web],
            listeners: Vec::new(),
        })
        .await;
    let before = node
        .report("web", "healthy", |r| r.healthy == Some(true))
        .await;

    let mut node = node.restart().await;
    let adopted = node.report("web", "running", running).await;
    assert_eq!(
        adopted.restarts, 0,
        "re-adopted, not restarted: {adopted:?}"
    );
    assert_eq!(adopted.address, before.address);
    assert_eq!(adopted.healthy, None);
    let healthy = node.report("web", "healthy", |r| r.healthy.is_some()).await;
    assert_eq!(
        (healthy.state, healthy.healthy, healthy.address),
        (InstanceState::Running, Some(true), before.address)
    );
    node.stop().await;
}
