//! Setup shared by the node's integration tests that run instances: the
//! root check, a busybox image layer, cgroup parents of their own, the
//! process runtime over this package's `verge-shim` binary, and a
//! reconciler on a data dir.
//!
//! Each test file that uses it declares `mod common;`; items that some of
//! those files do not use are marked `#[allow(dead_code)]`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use verge_api::wire::{InstanceReport, Isolation};
use verge_node::logs::{LogLimits, Logs};
use verge_node::pull::{ImageStore, PullOptions};
use verge_node::reconcile::{Parts, Reconciler};
use verge_node::runtime::{LaunchSpec, ProcessRuntime, RuntimeConfig};
use verge_tests::registry::Registry;

const BUSYBOX: &str = "/bin/busybox";
/// The applets [`busybox_layer`] links in `/bin`: what the tests' commands
/// and scripts call.
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "printf", "sleep", "id", "hostname", "ps", "grep", "head", "tr",
    "seq", "test", "true", "wc", "env", "pwd", "tty", "stty", "kill",
];

/// Fails the test unless it runs as root and the host has a static busybox
/// (which makes the test image).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the node's instance tests create namespaces, mounts and cgroups: run them as root"
    );
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install busybox-static)"
    );
}

/// Makes a busybox image layer at `dir/layers/busybox` and returns its
/// path: `/bin/busybox` and its applets' links, `/etc/passwd` and
/// `/etc/group` (`root`, `app` 1000 with home `/home/app`, and `app` also
/// in `extra` 2000).
#[allow(dead_code)]
pub fn busybox_layer(dir: &Path) -> PathBuf {
    let layer = dir.join("layers/busybox");
    for d in ["bin", "etc", "home/app"] {
        fs::create_dir_all(layer.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, layer.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("/bin/busybox", layer.join("bin").join(applet)).unwrap();
    }
    fs::write(
        layer.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        layer.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )
    .unwrap();
    layer
}

/// Instance `id` of `layer` running `argv`: `PATH=/bin`, hostname `id`,
/// half a CPU and 64 MiB.
#[allow(dead_code)]
pub fn launch_spec(id: &str, layer: &Path, argv: Vec<String>) -> LaunchSpec {
    LaunchSpec {
        instance_id: id.into(),
        layers: vec![layer.to_path_buf()],
        argv,
        env: vec![("PATH".into(), "/bin".into())],
        working_dir: None,
        user: None,
        hostname: id.into(),
        cpu: 0.5,
        memory: 64 << 20,
        pids: 0,
        netns: None,
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup parent of the test's own, `verge/test-<test file>-<pid>-<n>`;
/// [`remove_cgroup_parent`] removes it.
pub fn cgroup_parent() -> String {
    format!(
        "verge/test-{}-{}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the (empty) cgroup parent from every hierarchy.
pub fn remove_cgroup_parent(cgroup_parent: &str) {
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = fs::remove_dir(h.path().join(cgroup_parent));
        }
    }
}

/// A process runtime on `root` (its instances dir) whose shim is this
/// package's `verge-shim` binary.
pub fn runtime(root: &Path, cgroup_parent: &str, isolation: Isolation) -> ProcessRuntime {
    ProcessRuntime::new(RuntimeConfig {
        root: root.to_path_buf(),
        cgroup_parent: cgroup_parent.to_owned(),
        isolation,
        shim_exe: env!("CARGO_BIN_EXE_verge-shim").into(),
    })
    .expect("the process runtime")
}

/// A running registry (after installing the TLS provider) holding the
/// image `Registry::push_busybox` pushes, and that image's pinned reference.
#[allow(dead_code)]
pub async fn busybox_registry() -> (Registry, String) {
    verge_tests::init_tls();
    let registry = Registry::start().await.expect("start the registry");
    let image = registry
        .push_busybox()
        .await
        .unwrap_or_else(|e| panic!("push: {e:#}\nregistry log:\n{}", registry.log_tail()));
    (registry, image)
}

/// A reconciler on data dir `dir` with isolation `none` and no networking,
/// its reports, and its log store (`dir/logs`, of node `n1`).
#[allow(dead_code)]
pub async fn reconciler(
    dir: &Path,
    cgroup_parent: &str,
    shutdown: &CancellationToken,
    stop_grace: Duration,
    stop_on_shutdown: bool,
) -> (Reconciler, mpsc::Receiver<InstanceReport>, Logs) {
    let images = ImageStore::open(dir.join("images"), 1 << 30, PullOptions::default())
        .await
        .expect("open the image store");
    let rt = runtime(&dir.join("instances"), cgroup_parent, Isolation::None);
    let logs = Logs::new(dir.join("logs"), LogLimits::default(), "n1");
    let parts = Parts {
        data_dir: dir.to_path_buf(),
        images,
        runtime: rt,
        net: None,
        isolation: Isolation::None,
        stop_grace,
        stop_on_shutdown,
        logs: logs.clone(),
        wasm: None,
    };
    let (r, reports) = Reconciler::start(parts, shutdown.clone()).await;
    (r, reports, logs)
}

/// Waits until `check` passes, failing the test after `timeout`.
#[allow(dead_code)]
pub async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` exists and is not a zombie.
#[allow(dead_code)]
pub fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
