//! Wasm workloads through the node: OCI wasm artifacts pushed to a real
//! registry (Debian's `docker-registry`), pulled into the image store,
//! compiled by real wasmtime, run by the reconciler as long-running
//! instances and per-connection listeners, reached over real sockets (on
//! loopback with isolation `none`, and at their own addresses in network
//! namespaces of their own).
//!
//! The guests are WebAssembly text, inline (WASI preview 1 modules), and
//! the `tcp-echo` example of images/ (a WASI 0.2 component).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use verge_api::logs::{LogRecord, LogStream, Severity};
use verge_api::manifest::{Health, Restart, Runtime};
use verge_api::wire::{
    DesiredSet, ErrorCategory, InstanceReport, InstanceSpec, InstanceState, Isolation,
    ListenerReport, ListenerSpec, ListenerState, SecretFile,
};
use verge_node::logs::{LogLimits, Logs};
use verge_node::net::{NetConfig, Network};
use verge_node::pull::{ImageStore, PullError, PullOptions};
use verge_node::reconcile::{Parts, Reconciler};
use verge_node::wasm::{WasmConfig, WasmRuntime, cache_dir};
use verge_tests::registry::Registry;

const MIB: u64 = 1 << 20;
/// How long a test waits for any one thing.
const WAIT: Duration = Duration::from_secs(60);

/// Writes `hello from wasm` on stdout and returns from `_start`.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Traps at once.
const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#;

/// The body of a module with `$write-all (fd ptr len)` and `$copy (from)`
/// (fd `from` to stdout until EOF); memory: 0..12 scratch, 16..64 data,
/// 1024.. a buffer.
const COPY: &str = r#"
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open
    (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func $write-all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done (loop $more
      (br_if $done (i32.eqz (local.get $len)))
      (i32.store (i32.const 0) (local.get $ptr))
      (i32.store (i32.const 4) (local.get $len))
      (if (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 1))))
      (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
      (br $more))))
  (func $copy (param $from i32)
    (block $eof (loop $read
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 16384))
      (if (call $fd_read (local.get $from) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 1))))
      (br_if $eof (i32.eqz (i32.load (i32.const 8))))
      (call $write-all (i32.const 1) (i32.const 1024) (i32.load (i32.const 8)))
      (br $read))))"#;

/// 8 random bytes (one draw per instance), then stdin echoed to stdout;
/// `served` on stderr at the end.
fn echo() -> String {
    format!(
        r#"(module {COPY}
  (data (i32.const 32) "served\n")
  (func (export "_start")
    (drop (call $random_get (i32.const 16) (i32.const 8)))
    (call $write-all (i32.const 1) (i32.const 16) (i32.const 8))
    (call $copy (i32.const 0))
    (call $write-all (i32.const 2) (i32.const 32) (i32.const 7))))"#
    )
}

/// The file `token` of the first preopened directory, to stdout.
fn cat_token() -> String {
    format!(
        r#"(module {COPY}
  (data (i32.const 32) "token")
  (func (export "_start")
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 32) (i32.const 5)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 12))
      (then (call $proc_exit (i32.const 2))))
    (call $copy (i32.load (i32.const 12)))))"#
    )
}

/// Pushes `wat` as the wasm artifact `NAME:1`; its pinned reference.
async fn push(registry: &Registry, name: &str, wat: &str) -> String {
    let wasm = verge_images::wasm_from_wat(wat).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = format!("{}/{name}:1", registry.host());
    let digest = verge_images::push_wasm(&wasm, &reference)
        .await
        .unwrap_or_else(|e| panic!("push {reference}: {e}\n{}", registry.log_tail()));
    format!("{reference}@{digest}")
}

async fn registry() -> Registry {
    verge_tests::init_tls();
    Registry::start().await.expect("start the registry")
}

/// A reconciler on `data` with a wasm runtime of its own (and
/// networking when `net` is given), its reports and logs.
struct Node {
    r: Reconciler,
    reports: mpsc::Receiver<InstanceReport>,
    logs: Logs,
    shutdown: CancellationToken,
    cgroup_parent: String,
}

impl Node {
    async fn start(data: &Path, net: Option<Network>) -> Node {
        let images = ImageStore::open(data.join("images"), 1 << 30, PullOptions::default())
            .await
            .expect("open the image store");
        let wasm = WasmRuntime::new(WasmConfig {
            cache_dir: cache_dir(data),
            max_instances: 64,
            max_memory: 256 * MIB,
        })
        .expect("the wasm runtime");
        let logs = Logs::new(data.join("logs"), LogLimits::default(), "n1");
        let cgroup_parent = common::cgroup_parent();
        let parts = Parts {
            data_dir: data.to_path_buf(),
            images,
            runtime: common::runtime(&data.join("instances"), &cgroup_parent, Isolation::None),
            isolation: if net.is_some() {
                Isolation::Namespaces
            } else {
                Isolation::None
            },
            net,
            stop_grace: Duration::from_secs(1),
            stop_on_shutdown: false,
            logs: logs.clone(),
            wasm: Some(wasm),
        };
        let shutdown = CancellationToken::new();
        let (r, reports) = Reconciler::start(parts, shutdown.clone()).await;
        Node {
            r,
            reports,
            logs,
            shutdown,
            cgroup_parent,
        }
    }

    /// Shuts the daemon down; its logs are on disk.
    async fn stop(self) {
        self.shutdown.cancel();
        self.r.stopped().await;
        self.logs.sync().await;
        common::remove_cgroup_parent(&self.cgroup_parent);
    }

    async fn report(
        &mut self,
        what: &str,
        check: impl Fn(&InstanceReport) -> bool,
    ) -> InstanceReport {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) if check(&r) => return r,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the reports ended before {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// The listener `id`'s report once `check` passes.
    async fn listener(&self, id: &str, check: impl Fn(&ListenerReport) -> bool) -> ListenerReport {
        let find = || self.r.listeners().into_iter().find(|l| l.id == id);
        common::eventually(&format!("listener {id}"), WAIT, || {
            find().is_some_and(|l| check(&l))
        })
        .await;
        find().expect("just found")
    }
}

fn instance(id: &str, image: &str, memory: u64) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        org: "o".into(),
        app: "a".into(),
        env: "e".into(),
        release: "r1".into(),
        workload: "w".into(),
        image: image.into(),
        command: None,
        env_vars: BTreeMap::new(),
        cpu: 0.5,
        memory,
        restart: Restart::Never,
        port: None,
        health: None,
        drain_ms: 0,
        volumes: Vec::new(),
        secrets: Vec::new(),
        runtime: Runtime::Wasm,
        max_cpu_time_ms: 10_000,
    }
}

fn listener(id: &str, image: &str, concurrency: u32, ports: &[u16]) -> ListenerSpec {
    ListenerSpec {
        id: id.into(),
        org: "o".into(),
        app: "a".into(),
        env: "e".into(),
        release: "r1".into(),
        workload: "echo".into(),
        image: image.into(),
        command: None,
        env_vars: BTreeMap::new(),
        cpu: 0.5,
        memory: 16 * MIB,
        max_cpu_time_ms: 10_000,
        concurrency,
        ports: ports.to_vec(),
        drain_ms: 0,
        secrets: Vec::new(),
    }
}

fn set(version: u64, instances: Vec<InstanceSpec>, listeners: Vec<ListenerSpec>) -> DesiredSet {
    DesiredSet {
        version,
        instances,
        listeners,
    }
}

/// The records of `logs/<id>/<file>` (`app.log`, `system.log`).
fn records(data: &Path, id: &str, file: &str) -> Vec<LogRecord> {
    fs::read_to_string(data.join("logs").join(id).join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a log record"))
        .collect()
}

fn messages(data: &Path, id: &str, file: &str) -> Vec<String> {
    records(data, id, file)
        .into_iter()
        .map(|r| r.message)
        .collect()
}

/// Connects, sends `payload`, ends its side and reads to the end.
async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.write_all(payload).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut got))
        .await
        .expect("an answer in time")
        .unwrap();
    got
}

/// Whether anything is mounted under `dir`.
fn mounted_under(dir: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p).starts_with(dir))
}

/// Regular files under `root` (links not followed) whose bytes hold `needle`.
fn files_holding(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file()
                && fs::read(entry.path())
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn pull_wasm_keeps_artifacts_in_the_store_and_refuses_container_images() {
    let registry = registry().await;
    let reference = push(&registry, "hello", HELLO).await;
    let wasm = verge_images::wasm_from_wat(HELLO).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = ImageStore::open(root.clone(), 0, PullOptions::default())
        .await
        .unwrap();

    let pulled = store
        .pull_wasm(&reference)
        .await
        .expect("pull the artifact");
    assert_eq!(pulled.digest, verge_images::sha256_digest(&wasm));
    assert_eq!(
        Some(pulled.manifest.as_str()),
        reference.rsplit_once('@').map(|(_, d)| d)
    );
    assert_eq!(
        fs::read(&pulled.path).unwrap(),
        wasm,
        "the blob is the module, not unpacked"
    );
    assert!(pulled.path.starts_with(&root));
    let gets = || registry.requests("GET", &format!("/v2/hello/blobs/{}", pulled.digest));
    assert_eq!(gets(), 1);
    assert_eq!(store.pull_wasm(&reference).await.unwrap(), pulled);
    assert_eq!(gets(), 1, "a local artifact is not fetched again");
    assert_eq!(store.images(), vec![pulled.manifest.clone()]);

    // In use, it stays even over the budget (0); not in use, it goes.
    store
        .gc(std::slice::from_ref(&pulled.manifest))
        .await
        .unwrap();
    assert!(pulled.path.exists());
    let report = store.gc(&[]).await.unwrap();
    assert_eq!(report.removed_images, vec![pulled.manifest.clone()]);
    assert!(!pulled.path.exists());
    assert_eq!(store.disk_usage(), 0);

    let image = registry.push_busybox().await.unwrap();
    let err = store.pull_wasm(&image).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PullError::NotWasm { .. }), "{err:?}");
    assert!(
        msg.contains(&format!("{image} is a container image")),
        "{msg}"
    );
    assert!(
        msg.contains("application/vnd.wasm.config.v0+json")
            && msg.contains("verge-images wasm push"),
        "{msg}"
    );
    let err = store.pull(&reference).await.unwrap_err();
    assert!(matches!(err, PullError::NotImage { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("is a wasm artifact, not a container image"),
        "{err}"
    );
}

#[tokio::test]
async fn a_long_running_wasm_instance_runs_and_its_code_is_cached_across_daemon_restarts() {
    let registry = registry().await;
    let hello = push(&registry, "hello", HELLO).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let mut node = Node::start(data, None).await;
    node.r
        .apply(set(1, vec![instance("w1", &hello, 16 * MIB)], Vec::new()))
        .await;
    let r = node
        .report("w1 ended", |r| {
            r.id == "w1" && matches!(r.state, InstanceState::Stopped | InstanceState::Failed)
        })
        .await;
    assert_eq!(
        (r.state, r.category),
        (InstanceState::Stopped, None),
        "{r:?}"
    );
    node.stop().await;
    let app = records(data, "w1", "app.log");
    assert!(
        app.iter()
            .any(|r| r.message == "hello from wasm" && r.stream == Some(LogStream::Stdout)),
        "{app:?}"
    );
    let system = messages(data, "w1", "system.log");
    assert!(system.iter().any(|m| m.starts_with("compiled sha256:") && m.ends_with("(cached for next restarts)")), "{system:?}");

    // A new daemon starts it again from the saved set (nothing to re-adopt), from the cache.
    let mut node = Node::start(data, None).await;
    let r = node
        .report("w1 ended again", |r| {
            r.id == "w1" && matches!(r.state, InstanceState::Stopped | InstanceState::Failed)
        })
        .await;
    assert_eq!(r.state, InstanceState::Stopped, "{r:?}");
    node.stop().await;
    let system = messages(data, "w1", "system.log");
    assert!(
        system
            .iter()
            .any(|m| m.starts_with("loaded compiled code from the cache (sha256:")),
        "{system:?}"
    );
    assert_eq!(
        messages(data, "w1", "app.log")
            .iter()
            .filter(|m| *m == "hello from wasm")
            .count(),
        2
    );
}

#[tokio::test]
async fn a_trap_is_a_crash_and_memory_over_the_limit_is_oom() {
    let registry = registry().await;
    let trap = push(&registry, "trap", TRAP).await;
    let memhog = verge_images::wasm_example_source("memhog").unwrap();
    let hog = push(&registry, "memhog", memhog).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let mut node = Node::start(data, None).await;
    let specs = vec![
        instance("trap", &trap, 16 * MIB),
        instance("hog", &hog, 4 * MIB),
    ];
    node.r.apply(set(1, specs, Vec::new())).await;
    let t = node
        .report("trap failed", |r| {
            r.id == "trap" && r.state == InstanceState::Failed
        })
        .await;
    let h = node
        .report("hog failed", |r| {
            r.id == "hog" && r.state == InstanceState::Failed
        })
        .await;
    node.stop().await;
    assert_eq!(t.category, Some(ErrorCategory::Crash), "{t:?}");
    assert!(
        t.message
            .as_deref()
            .unwrap_or_default()
            .starts_with("trapped: "),
        "{t:?}"
    );
    let trapped = records(data, "trap", "system.log");
    assert!(
        trapped
            .iter()
            .any(|r| r.severity == Severity::Error && r.message.starts_with("trapped: ")),
        "{trapped:?}"
    );
    assert_eq!(h.category, Some(ErrorCategory::Oom), "{h:?}");
    assert!(
        h.message
            .as_deref()
            .unwrap_or_default()
            .contains("out of memory"),
        "{h:?}"
    );
}

#[tokio::test]
async fn a_listener_runs_an_instance_per_connection_and_stops_when_removed() {
    common::require_root(); // secret files are mounted on a tmpfs
    let registry = registry().await;
    let (echo, trap, cat) = (
        push(&registry, "echo", &echo()).await,
        push(&registry, "trap", TRAP).await,
        push(&registry, "cat", &cat_token()).await,
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let node = Node::start(data, None).await;
    let secret = "s3cr3t-only-in-memory".to_string();
    let mut with_secret = listener("lst-cat", &cat, 4, &[9000]);
    with_secret.secrets = vec![SecretFile {
        bundle: "b".into(),
        version: 1,
        path: "/run/secrets/token".into(),
        contents: secret.clone(),
    }];
    let listeners = vec![
        listener("lst-echo", &echo, 32, &[8080]),
        listener("lst-trap", &trap, 4, &[8081]),
        with_secret,
    ];
    node.r.apply(set(1, Vec::new(), listeners)).await;
    let listening = |l: &ListenerReport| l.state == ListenerState::Listening;
    let addr =
        |l: ListenerReport| -> SocketAddr { l.address.expect("an address").parse().unwrap() };
    let (e, t, c) = (
        addr(node.listener("lst-echo", listening).await),
        addr(node.listener("lst-trap", listening).await),
        addr(node.listener("lst-cat", listening).await),
    );
    assert!(e.ip().is_loopback(), "{e}");
    assert_eq!(node.r.tunnel_target("lst-echo", 8080), Ok(e));
    assert!(node.r.tunnel_target("lst-echo", 8081).is_err());

    // 24 connections at once, each answered by an instance of its own.
    let conns = (0..24).map(|i| {
        tokio::spawn(async move { (i, exchange(e, format!("connection {i}").as_bytes()).await) })
    });
    let mut draws = HashSet::new();
    for conn in conns {
        let (i, got) = conn.await.unwrap();
        assert_eq!(&got[8..], format!("connection {i}").as_bytes());
        draws.insert(got[..8].to_vec());
    }
    assert_eq!(
        draws.len(),
        24,
        "every connection had an instance of its own"
    );
    let l = node
        .listener("lst-echo", |l| l.served == 24 && l.active == 0)
        .await;
    assert_eq!((l.failed, l.last_failure), (0, None));

    // The instance traps before reading anything: the connection just ends.
    let mut trapped = TcpStream::connect(t).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, trapped.read_to_end(&mut got))
        .await
        .expect("an end in time");
    assert!(got.is_empty());
    let l = node.listener("lst-trap", |l| l.failed == 1).await;
    assert_eq!(l.last_failure_category, Some(ErrorCategory::Crash));
    assert!(
        l.last_failure
            .as_deref()
            .unwrap_or_default()
            .starts_with("trapped: "),
        "{l:?}"
    );
    assert_eq!(exchange(c, b"").await, secret.as_bytes());
    let run = data.join("wasm/run/lst-cat");
    assert!(mounted_under(&run), "the secret files are on a tmpfs");

    node.r.apply(set(2, Vec::new(), Vec::new())).await;
    common::eventually("the listeners gone", WAIT, || node.r.listeners().is_empty()).await;
    assert!(
        TcpStream::connect(e).await.is_err(),
        "still accepting on {e}"
    );
    assert!(!mounted_under(&run) && !run.exists());
    node.stop().await;
    let trap_log = messages(data, "lst-trap", "system.log");
    assert!(
        trap_log
            .iter()
            .any(|m| m.starts_with("connection from 127.0.0.1:") && m.contains(": trapped: ")),
        "{trap_log:?}"
    );
    let echo_log = messages(data, "lst-echo", "system.log");
    assert!(
        echo_log.iter().any(|m| m.starts_with("compiled sha256:")),
        "{echo_log:?}"
    );
    assert_eq!(
        echo_log.last().map(String::as_str),
        Some("stopped"),
        "{echo_log:?}"
    );
    let stderr = records(data, "lst-echo", "app.log");
    assert_eq!(
        stderr
            .iter()
            .filter(|r| r.message == "served" && r.stream == Some(LogStream::Stderr))
            .count(),
        24
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(data.join("logs/lst-echo/meta.json")).unwrap()).unwrap();
    assert_eq!(
        (meta["workload"].as_str(), meta["ended_ms"].is_i64()),
        (Some("echo"), true),
        "{meta}"
    );
    let on_disk = files_holding(data, secret.as_bytes());
    assert!(on_disk.is_empty(), "the secret is on disk in {on_disk:?}");
}

#[tokio::test]
async fn after_a_daemon_restart_listeners_come_back_and_wait_for_their_secret_files() {
    common::require_root(); // secret files are mounted on a tmpfs
    let registry = registry().await;
    let (echo, cat) = (
        push(&registry, "echo", &echo()).await,
        push(&registry, "cat", &cat_token()).await,
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let secret = "only-sent-by-the-control-plane".to_string();
    let mut with_secret = listener("lst-cat", &cat, 4, &[9000]);
    with_secret.secrets = vec![SecretFile {
        bundle: "b".into(),
        version: 1,
        path: "/token".into(),
        contents: secret.clone(),
    }];
    let desired = set(
        1,
        Vec::new(),
        vec![listener("lst-echo", &echo, 4, &[8080]), with_secret],
    );
    let node = Node::start(data, None).await;
    node.r.apply(desired.clone()).await;
    node.listener("lst-cat", |l| l.state == ListenerState::Listening)
        .await;
    node.stop().await;
    let saved = fs::read_to_string(data.join("desired.json")).unwrap();
    assert!(
        saved.contains("lst-cat") && !saved.contains(&secret),
        "{saved}"
    );

    // From the saved set: one serves at once, the other waits for its secret.
    let node = Node::start(data, None).await;
    let l = node
        .listener("lst-echo", |l| l.state == ListenerState::Listening)
        .await;
    let addr: SocketAddr = l.address.unwrap().parse().unwrap();
    assert_eq!(&exchange(addr, b"back").await[8..], b"back");
    let waiting = node.listener("lst-cat", |l| l.message.is_some()).await;
    assert_eq!(waiting.state, ListenerState::Starting, "{waiting:?}");
    assert!(waiting.message.unwrap().contains("secret files"));
    node.r.apply(desired).await;
    let l = node
        .listener("lst-cat", |l| l.state == ListenerState::Listening)
        .await;
    let addr: SocketAddr = l.address.unwrap().parse().unwrap();
    assert_eq!(exchange(addr, b"").await, secret.as_bytes());
    node.stop().await;
    let on_disk = files_holding(data, secret.as_bytes());
    assert!(on_disk.is_empty(), "the secret is on disk in {on_disk:?}");
}

#[tokio::test]
async fn a_listener_serves_at_most_its_concurrency_at_once() {
    let registry = registry().await;
    let echo = push(&registry, "echo", &echo()).await;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(tmp.path(), None).await;
    node.r
        .apply(set(
            1,
            Vec::new(),
            vec![listener("lst-2", &echo, 2, &[8080])],
        ))
        .await;
    let l = node
        .listener("lst-2", |l| l.state == ListenerState::Listening)
        .await;
    let addr: SocketAddr = l.address.unwrap().parse().unwrap();

    // Five connections held open: each learns when its instance answered.
    let (tx, mut answered) = mpsc::channel(5);
    let mut ends: Vec<Option<tokio::sync::oneshot::Sender<()>>> = Vec::new();
    for i in 0..5 {
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        ends.push(Some(end_tx));
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut draw = [0; 8];
            c.read_exact(&mut draw).await.unwrap();
            tx.send(i).await.unwrap();
            let _ = end_rx.await;
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
        });
    }
    let mut served = Vec::new();
    for _ in 0..2 {
        served.push(
            tokio::time::timeout(WAIT, answered.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let l = node.listener("lst-2", |l| l.active == 2).await;
    assert_eq!(l.served, 0);
    // Each end lets one more in, never more than two at once.
    let mut max_active = 2;
    for round in 0..5 {
        let i = served[round];
        let _ = ends[i].take().expect("one end each").send(());
        if round + 2 < 5 {
            served.push(
                tokio::time::timeout(WAIT, answered.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let l = node
            .listener("lst-2", |l| l.served == round as u64 + 1)
            .await;
        max_active = max_active.max(l.active);
        assert!(l.active <= 2, "{l:?}");
    }
    assert_eq!(max_active, 2);
    node.listener("lst-2", |l| l.served == 5 && l.active == 0)
        .await;
    node.stop().await;
}

/// Runs `body` on a thread in a new network namespace (`lo` up) and a new
/// private mount namespace, the node's, on a current-thread runtime.
fn on_node<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    use nix::sched::{CloneFlags, unshare};
    let result = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("making / private in the node's mount namespace");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body());
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn wasm_runs_in_network_namespaces_at_the_instances_own_addresses() {
    common::require_root();
    let host = tokio::runtime::Runtime::new().unwrap();
    let _in_host = host.enter();
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("data");
    // Pulled on the host: the node's namespace cannot reach the registry.
    let (registry, echo, tcp_echo) = host.block_on(async {
        let registry = registry().await;
        let echo = push(&registry, "echo", &echo()).await;
        let tcp_echo = verge_images::wasm_example_source("tcp-echo").unwrap();
        let tcp_echo = push(&registry, "tcp-echo", tcp_echo).await;
        let store = ImageStore::open(data.join("images"), 1 << 30, PullOptions::default())
            .await
            .unwrap();
        for r in [&echo, &tcp_echo] {
            store.pull_wasm(r).await.unwrap();
        }
        (registry, echo, tcp_echo)
    });
    let netns_dir = tmp.path().join("netns");
    on_node(move || async move {
        let net = Network::new(NetConfig {
            netns_dir,
            ipam_file: data.join("net/ipam.json"),
            prefix_v6: "fd76:6572:6765:1::/64".parse().unwrap(),
            range_v4: "10.89.0.0/16".parse().unwrap(),
        })
        .await
        .expect("instance networking");
        let mut node = Node::start(&data, Some(net.clone())).await;
        let mut server = instance("tcp", &tcp_echo, 16 * MIB);
        server.restart = Restart::Always;
        server.port = Some(8080);
        server.health = Some(Health {
            tcp: 8080,
            interval_ms: 100,
            timeout_ms: 1000,
        });
        let listeners = vec![listener("lst-ns", &echo, 4, &[8080, 8081])];
        node.r.apply(set(1, vec![server], listeners)).await;

        let r = node
            .report("tcp healthy", |r| r.id == "tcp" && r.healthy == Some(true))
            .await;
        let at: SocketAddr = r.address.expect("an address").parse().unwrap();
        assert!(
            matches!(at.ip(), IpAddr::V6(v6) if v6 != Ipv6Addr::LOCALHOST),
            "{at}"
        );
        let mut c = TcpStream::connect(at).await.unwrap();
        let mut hello = [0; 16];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello from wasm\n");

        let l = node
            .listener("lst-ns", |l| l.state == ListenerState::Listening)
            .await;
        let ip: Ipv6Addr = l.address.expect("an address").parse().unwrap();
        for port in [8080, 8081] {
            let to = SocketAddr::new(ip.into(), port);
            assert_eq!(&exchange(to, b"hi").await[8..], b"hi");
        }
        assert_eq!(
            node.r.tunnel_target("lst-ns", 8081),
            Ok(SocketAddr::new(ip.into(), 8081))
        );
        assert!(net.exists("lst-ns").await.unwrap());

        node.r.apply(set(2, Vec::new(), Vec::new())).await;
        node.report("tcp stopped", |r| {
            r.id == "tcp" && r.state == InstanceState::Stopped
        })
        .await;
        common::eventually("the listener gone", WAIT, || node.r.listeners().is_empty()).await;
        assert!(!net.exists("lst-ns").await.unwrap());
        assert!(!net.exists("tcp").await.unwrap());
        node.stop().await;
    });
    drop(registry);
}
