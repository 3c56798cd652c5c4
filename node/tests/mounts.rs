//! Volumes and secret files in instances, against the real process runtime
//! and its shim (the `verge-shim` binary): a host directory stands in for
//! a volume's mounted filesystem; the workload reports what it sees by
//! writing into that directory, so no secret value goes through its logs.
//!
//! Needs root (namespaces, mounts, cgroups) and a static busybox at
//! `/bin/busybox` (Debian's `busybox-static`), which makes the test image.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{eventually, require_root};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use verge_api::manifest::Restart;
use verge_api::wire::{
    self, DesiredSet, ErrorCategory, InstanceReport, InstanceSpec, InstanceState, Isolation,
    VolumeAttach,
};
use verge_node::logs::{LogLimits, Logs};
use verge_node::pull::{ImageStore, PullOptions};
use verge_node::reconcile::{Parts, Reconciler};
use verge_node::runtime::{
    Attachments, Exit, LaunchSpec, ProcessRuntime, RuntimeError, SecretFile, VolumeMount,
};
use verge_node::volumes::{Backend, Volumes};

/// A data dir `node/` (instances in `node/instances`, their logs in
/// `node/logs`), volumes' host dirs beside it in `volumes/`, a busybox
/// image layer, and a process runtime with isolation `namespaces`.
struct Fixture {
    tmp: tempfile::TempDir,
    rt: ProcessRuntime,
    layer: PathBuf,
    cgroup_parent: String,
}

impl Fixture {
    fn new() -> Fixture {
        require_root();
        captured();
        let tmp = tempfile::tempdir().unwrap();
        let layer = common::busybox_layer(tmp.path());
        let cgroup_parent = common::cgroup_parent();
        let rt = common::runtime(
            &tmp.path().join("node/instances"),
            &cgroup_parent,
            Isolation::Namespaces,
        );
        Fixture {
            tmp,
            rt,
            layer,
            cgroup_parent,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("node")
    }

    /// A fresh volume's host dir: owned by root, holding only `lost+found`.
    fn volume(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("volumes").join(name);
        fs::create_dir_all(dir.join("lost+found")).unwrap();
        dir
    }

    fn spec(&self, id: &str, user: Option<&str>, script: &str) -> LaunchSpec {
        let argv = vec!["sh".into(), "-c".into(), script.into()];
        let mut spec = common::launch_spec(id, &self.layer, argv);
        spec.user = user.map(str::to_owned);
        spec
    }

    /// Runs `spec` to its end with `attach`, and removes it.
    async fn run(&self, spec: LaunchSpec, attach: Attachments) -> Exit {
        let id = spec.instance_id.clone();
        let inst = self.rt.start_with(spec, attach).await.expect("start");
        let exit = tokio::time::timeout(Duration::from_secs(30), inst.wait())
            .await
            .expect("the instance did not exit in 30 s");
        self.rt.remove(&id).await.unwrap();
        exit
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        common::remove_cgroup_parent(&self.cgroup_parent);
    }
}

fn volume(source: &Path, target: &str) -> VolumeMount {
    VolumeMount {
        volume: "vol_test".into(),
        name: "data".into(),
        source: source.to_path_buf(),
        target: target.into(),
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether the host's mount table names `path` (as a mount point or root).
fn mounted_on_host(path: &Path) -> bool {
    read(Path::new("/proc/self/mountinfo")).contains(&*path.to_string_lossy())
}

/// `<what>-<pid>-<nanoseconds>`: a value no other run has.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

/// A file written by the workload lands in the volume's host dir, and the
/// next start of the instance (same ID, same volume) finds it; the mount
/// is `nosuid,nodev`, and nothing of it is mounted on the host.
#[tokio::test]
async fn volume_writes_reach_the_host_and_survive_a_restart() {
    let f = Fixture::new();
    let vol = f.volume("v1");
    let attach = Attachments {
        volumes: vec![volume(&vol, "/data")],
        secrets: vec![],
    };
    let first = f.spec("vol-1", None, "echo one >> /data/log");
    let exit = f.run(first, attach.clone()).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(read(&vol.join("log")), "one\n");

    let again = f.spec(
        "vol-1",
        None,
        "echo two >> /data/log && grep ' /data ' /proc/self/mountinfo > /data/mountinfo",
    );
    let exit = f.run(again, attach).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(read(&vol.join("log")), "one\ntwo\n");
    let info = read(&vol.join("mountinfo"));
    let options = info.split(' ').nth(5).unwrap_or_default();
    assert!(
        options.contains("nosuid") && options.contains("nodev"),
        "{info}"
    );
    assert!(!mounted_on_host(&vol), "the volume is mounted on the host");
    // A root workload leaves a fresh volume's root to root.
    assert_eq!(fs::metadata(&vol).unwrap().uid(), 0);
}

/// A non-root image user gets a fresh volume (root's, only `lost+found`)
/// and can write to it; a volume with contents keeps its owner.
#[tokio::test]
async fn a_non_root_user_can_write_to_a_fresh_volume() {
    let f = Fixture::new();
    let fresh = f.volume("fresh");
    let attach = Attachments {
        volumes: vec![volume(&fresh, "/srv/data")],
        secrets: vec![],
    };
    let spec = f.spec("vol-user", Some("app"), "id -u > /srv/data/uid");
    let exit = f.run(spec, attach).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(read(&fresh.join("uid")), "1000\n");
    let meta = fs::metadata(&fresh).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(fs::metadata(fresh.join("uid")).unwrap().uid(), 1000);

    let used = f.volume("used");
    fs::write(used.join("root-data"), "kept\n").unwrap();
    let attach = Attachments {
        volumes: vec![volume(&used, "/data")],
        secrets: vec![],
    };
    let spec = f.spec(
        "vol-used",
        Some("app"),
        "if echo x > /data/new 2>/dev/null; then exit 3; fi; cat /data/root-data",
    );
    let exit = f.run(spec, attach).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(fs::metadata(&used).unwrap().uid(), 0);
    assert!(!used.join("new").exists());
}

/// A volume or secret path through a link of the image (here to `/`) is
/// refused, naming it; nothing is made or mounted on the host.
#[tokio::test]
async fn a_target_through_an_image_link_is_refused() {
    let f = Fixture::new();
    let evil = f.tmp.path().join("layers/evil");
    fs::create_dir_all(&evil).unwrap();
    symlink("/", evil.join("escape")).unwrap();
    let vol = f.volume("v-evil");
    let escaped = format!("verge-mounts-test-{}", std::process::id());
    let host = Path::new("/").join(&escaped);

    let cases = [
        (
            "evil-vol",
            Attachments {
                volumes: vec![volume(&vol, &format!("/escape/{escaped}"))],
                secrets: vec![],
            },
            format!(
                "volume data (vol_test) at /escape/{escaped}: /escape is a symbolic link in the image"
            ),
        ),
        (
            "evil-link",
            Attachments {
                volumes: vec![volume(&vol, "/escape")],
                secrets: vec![],
            },
            "/escape is a symbolic link in the image".into(),
        ),
        (
            "evil-secret",
            Attachments {
                volumes: vec![],
                secrets: vec![SecretFile {
                    bundle: "db".into(),
                    version: 1,
                    path: format!("/escape/{escaped}"),
                    contents: "nothing".into(),
                }],
            },
            format!("secret file /escape/{escaped} of bundle db: /escape is a symbolic link"),
        ),
    ];
    for (id, attach, expected) in cases {
        let mut spec = f.spec(id, None, "exit 0");
        spec.layers.push(evil.clone());
        let exit = f.run(spec, attach).await;
        assert!(exit.start_failed, "{id}: {exit:?}");
        let message = exit.message.unwrap_or_default();
        assert!(message.contains(&expected), "{id}: {message}");
        assert!(message.contains("refusing to follow it"), "{id}: {message}");
        assert!(
            !host.exists(),
            "{id}: {} was made on the host",
            host.display()
        );
        assert!(
            !mounted_on_host(&vol),
            "{id}: the volume is mounted on the host"
        );
    }
    assert_eq!(fs::read_dir(&vol).unwrap().count(), 1, "only lost+found");
}

/// Secret files as root and as the image's `app` user: the exact contents
/// (JSON, byte for byte), mode 0400, owned by the workload's user, on a
/// tmpfs, read-only; given again to the next start. Afterwards the value is
/// in no file under the node's data dir and in no tracing output.
#[tokio::test]
async fn secret_files_are_exact_private_and_never_on_disk() {
    let f = Fixture::new();
    let value = unique("s3cr3t");
    let contents = format!(
        "{{\"password\": \"{value}\",\n  \"note\": \"tab\\t, quote \\\", ünïcödé\",\n  \"n\": [1, 2.5e3, null]}}"
    );
    for (id, user, uid) in [("sec-root", None, 0), ("sec-app", Some("app"), 1000)] {
        let out = f.volume(id);
        let attach = Attachments {
            volumes: vec![volume(&out, "/out")],
            secrets: vec![
                SecretFile {
                    bundle: "db".into(),
                    version: 1,
                    path: "/run/secrets/app".into(),
                    contents: contents.clone(),
                },
                SecretFile {
                    bundle: "tls".into(),
                    version: 1,
                    path: "/etc/app/key.pem".into(),
                    contents: "-----BEGIN KEY-----\n".into(),
                },
            ],
        };
        let script = "cat /run/secrets/app > /out/copy; \
                      /bin/busybox stat -c '%a %u' /run/secrets/app > /out/mode; \
                      /bin/busybox stat -f -c %T /run/secrets/app > /out/fstype; \
                      cat /etc/app/key.pem > /out/key; \
                      if echo x 2>/dev/null > /run/secrets/app; then echo writable > /out/ro; fi; \
                      ls /etc/app > /out/etc-app";
        for run in 0..2 {
            let exit = f.run(f.spec(id, user, script), attach.clone()).await;
            assert!(exit.success(), "{id} run {run}: {exit:?}");
            assert_eq!(
                fs::read(out.join("copy")).unwrap(),
                contents.as_bytes(),
                "{id}"
            );
            assert_eq!(read(&out.join("mode")), format!("400 {uid}\n"), "{id}");
            assert_eq!(read(&out.join("fstype")), "tmpfs\n", "{id}");
            assert_eq!(read(&out.join("key")), "-----BEGIN KEY-----\n", "{id}");
            assert!(
                !out.join("ro").exists(),
                "{id}: the secret file is writable"
            );
            assert_eq!(read(&out.join("etc-app")), "key.pem\n", "{id}");
            fs::remove_file(out.join("copy")).unwrap();
        }
    }
    // Only the workload saw it: not the instance dirs, spec.json,
    // launch.json, shim.log, exit.json, the logs, nor tracing.
    let found = files_holding(&f.data_dir(), value.as_bytes());
    assert!(found.is_empty(), "the secret is on disk in {found:?}");
    let logged = captured().lock().unwrap().clone();
    assert!(
        !logged.contains(&value),
        "the secret is in the tracing output"
    );
}

/// While an instance runs, its secret is on a tmpfs of its own: the
/// instance's files on the host hold none of it, and the staging tmpfs
/// is not mounted anywhere.
#[tokio::test]
async fn a_running_instance_keeps_its_secret_off_the_host() {
    let f = Fixture::new();
    let value = unique("running-secret");
    let attach = Attachments {
        volumes: vec![],
        secrets: vec![SecretFile {
            bundle: "api".into(),
            version: 1,
            path: "/run/secrets/token".into(),
            contents: value.clone(),
        }],
    };
    let spec = f.spec("sec-live", None, "sleep 60");
    let inst = f.rt.start_with(spec, attach).await.expect("start");
    assert!(inst.try_exit().is_none(), "{:?}", inst.try_exit());
    let dir = f.rt.instance_dir("sec-live");
    let staging = fs::read_to_string(format!("/proc/{}/mountinfo", inst.pid())).unwrap();
    assert!(
        !staging.contains(&*dir.join("secrets").to_string_lossy()),
        "the staging tmpfs is still mounted in the instance: {staging}"
    );
    assert!(staging.contains(" /run/secrets/token "), "{staging}");
    assert_eq!(fs::read_dir(dir.join("secrets")).unwrap().count(), 0);
    let found = files_holding(&f.data_dir(), value.as_bytes());
    assert!(found.is_empty(), "the secret is on disk in {found:?}");
    inst.stop(Duration::from_secs(1)).await;
    f.rt.remove("sec-live").await.unwrap();
}

/// Isolation `none` refuses volumes and secret files, saying what to do.
#[tokio::test]
async fn isolation_none_refuses_volumes_and_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroup_parent = common::cgroup_parent();
    let rt = common::runtime(
        &tmp.path().join("instances"),
        &cgroup_parent,
        Isolation::None,
    );
    let spec = common::launch_spec("none-1", tmp.path(), vec!["true".into()]);
    let attach = Attachments {
        volumes: vec![volume(tmp.path(), "/data")],
        secrets: vec![],
    };
    let err = rt.start_with(spec, attach).await.unwrap_err();
    assert!(matches!(err, RuntimeError::NeedsNamespaces(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("none-1")
            && message.contains("need isolation = namespaces: run the node as root"),
        "{message}"
    );
    assert!(!rt.instance_dir("none-1").exists());
}

/// Through the reconciler, with the node's volumes (directory backend) and
/// images from a real registry: an instance claims its volume (another
/// instance wanting it fails to start, category `start`, saying who has
/// it), every start by the restart policy gets the secret file; a restarted
/// daemon re-adopts the instance and claims its volume again, and, since
/// the saved desired set has no secret contents, waits for the control
/// plane's set before restarting it; leaving the set releases the volume.
/// The secret value is in no file under the data dir, nor in tracing.
#[tokio::test]
async fn the_reconciler_claims_volumes_and_redelivers_secrets() {
    let f = Fixture::new();
    let (_registry, image) = common::busybox_registry().await;
    let data = f.data_dir();
    let volumes = Volumes::open(&data, Backend::Directory).unwrap();
    volumes.recover().await;
    volumes.create("vol_e2e", 64 << 20).await.unwrap();
    let seen = volumes.mount_dir("vol_e2e").join("seen");

    let value = unique("e2e-secret");
    let contents = format!("{{\"token\": \"{value}\"}}");
    let digest = hex::encode(Sha256::digest(contents.as_bytes()));
    // Records the secret's hash; from its second run on, keeps running.
    let script = "/bin/busybox sha256sum /run/secrets/app >> /data/seen; \
                  [ $(/bin/busybox wc -l < /data/seen) -ge 2 ] && exec /bin/busybox sleep 1000; exit 0";
    let spec = |id: &str| InstanceSpec {
        id: id.into(),
        org: "o".into(),
        app: "a".into(),
        env: "e".into(),
        release: "r1".into(),
        workload: "web".into(),
        image: image.clone(),
        command: Some(
            ["/bin/busybox", "sh", "-c", script]
                .map(String::from)
                .to_vec(),
        ),
        env_vars: Default::default(),
        cpu: 0.5,
        memory: 32 << 20,
        restart: Restart::Always,
        port: None,
        health: None,
        drain_ms: 0,
        volumes: vec![VolumeAttach {
            volume: "vol_e2e".into(),
            name: "data".into(),
            path: "/data".into(),
        }],
        secrets: vec![wire::SecretFile {
            bundle: "app".into(),
            version: 3,
            path: "/run/secrets/app".into(),
            contents: contents.clone(),
        }],
        runtime: Default::default(),
        max_cpu_time_ms: 10_000,
    };
    let set = |version, ids: &[&str]| DesiredSet {
        version,
        instances: ids.iter().map(|id| spec(id)).collect(),
        listeners: Vec::new(),
    };
    let lines = |seen: &Path| -> Vec<String> {
        fs::read_to_string(seen)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let expected_line = format!("{digest}  /run/secrets/app");

    let shutdown = CancellationToken::new();
    let (r, mut reports) = reconciler(&f, &data, &volumes, &shutdown).await;
    r.apply(set(1, &["e2e-1"])).await;
    eventually("two runs of e2e-1", Duration::from_secs(60), || {
        lines(&seen).len() >= 2
    })
    .await;
    wait_report(&mut reports, "e2e-1 running its second run", |r| {
        r.id == "e2e-1" && r.state == InstanceState::Running && r.restarts == 1
    })
    .await;
    assert_eq!(lines(&seen), [expected_line.clone(), expected_line.clone()]);

    // The volume is e2e-1's: e2e-2 fails to start, saying so.
    r.apply(set(2, &["e2e-1", "e2e-2"])).await;
    let refused = wait_report(&mut reports, "e2e-2 refused the volume", |r| {
        r.id == "e2e-2" && r.category == Some(ErrorCategory::Start)
    })
    .await;
    let message = refused.message.unwrap_or_default();
    assert!(
        message.contains("volume data at /data") && message.contains("mounted by instance e2e-1"),
        "{message}"
    );
    r.apply(set(3, &["e2e-1"])).await;
    wait_report(&mut reports, "e2e-2 gone", |r| {
        r.id == "e2e-2" && r.state == InstanceState::Stopped
    })
    .await;

    // The daemon goes, leaving e2e-1 running; a new one re-adopts it and
    // claims its volume again.
    shutdown.cancel();
    r.stopped().await;
    drop((r, reports));
    let volumes = Volumes::open(&data, Backend::Directory).unwrap();
    volumes.recover().await;
    let shutdown = CancellationToken::new();
    let (r, mut reports) = reconciler(&f, &data, &volumes, &shutdown).await;
    let e = volumes
        .claim("vol_e2e", "intruder")
        .unwrap_err()
        .to_string();
    assert!(e.contains("mounted by instance e2e-1"), "{e}");

    // Its workload dies: the restart waits for the secret's contents.
    let pid: i32 = read(&f.rt.instance_dir("e2e-1").join("pid"))
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("e2e-1's pid");
    // SAFETY: kill with a PID and a signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_report(&mut reports, "e2e-1 waiting for its secret", |r| {
        r.id == "e2e-1"
            && r.state == InstanceState::Pending
            && r.message
                .as_deref()
                .is_some_and(|m| m.contains("waiting for the control plane"))
    })
    .await;
    assert_eq!(lines(&seen).len(), 2, "started without its secret");
    r.apply(set(4, &["e2e-1"])).await;
    eventually("the third run of e2e-1", Duration::from_secs(60), || {
        lines(&seen).len() >= 3
    })
    .await;
    assert!(
        lines(&seen).iter().all(|l| *l == expected_line),
        "{:?}",
        lines(&seen)
    );
    // The saved set names the secret file, without its contents.
    let saved = read(&data.join("desired.json"));
    assert!(saved.contains("/run/secrets/app"), "{saved}");
    let found = files_holding(&data, value.as_bytes());
    assert!(found.is_empty(), "the secret is on disk in {found:?}");

    // Leaving the set releases the volume.
    r.apply(set(5, &[])).await;
    wait_report(&mut reports, "e2e-1 stopped", |r| {
        r.id == "e2e-1" && r.state == InstanceState::Stopped
    })
    .await;
    volumes.claim("vol_e2e", "next").expect("released");
    volumes.release("vol_e2e", "next");
    shutdown.cancel();
    r.stopped().await;

    let found = files_holding(&data, value.as_bytes());
    assert!(found.is_empty(), "the secret is on disk in {found:?}");
    let logged = captured().lock().unwrap().clone();
    assert!(
        !logged.contains(&value),
        "the secret is in the tracing output"
    );
}

/// A reconciler on `data` with isolation `namespaces`, no networking, the
/// fixture's runtime and `volumes`.
async fn reconciler(
    f: &Fixture,
    data: &Path,
    volumes: &Volumes,
    shutdown: &CancellationToken,
) -> (Reconciler, mpsc::Receiver<InstanceReport>) {
    let images = ImageStore::open(data.join("images"), 1 << 30, PullOptions::default())
        .await
        .expect("open the image store");
    let parts = Parts {
        data_dir: data.to_path_buf(),
        images,
        runtime: f.rt.clone(),
        net: None,
        isolation: Isolation::Namespaces,
        stop_grace: Duration::from_secs(1),
        stop_on_shutdown: false,
        logs: Logs::new(data.join("logs"), LogLimits::default(), "n1"),
        wasm: None,
    };
    Reconciler::start_with_volumes(parts, Some(volumes.clone()), shutdown.clone()).await
}

/// The first report that passes `check`, within a minute.
async fn wait_report(
    reports: &mut mpsc::Receiver<InstanceReport>,
    what: &str,
    check: impl Fn(&InstanceReport) -> bool,
) -> InstanceReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(r)) if check(&r) => return r,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the reports ended before {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
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

/// Everything traced in this test binary (every event's and span's
/// fields), from the first fixture on.
fn captured() -> &'static Arc<Mutex<String>> {
    static TEXT: OnceLock<Arc<Mutex<String>>> = OnceLock::new();
    TEXT.get_or_init(|| {
        let text = Arc::new(Mutex::new(String::new()));
        tracing::subscriber::set_global_default(Capture(text.clone()))
            .expect("no other tracing subscriber");
        text
    })
}

struct Capture(Arc<Mutex<String>>);

struct Fields<'a>(&'a Mutex<String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let mut text = self.0.lock().unwrap();
        let _ = write!(text, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut Fields(&self.0));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut Fields(&self.0));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut Fields(&self.0));
        self.0.lock().unwrap().push('\n');
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
