//! Running instances as isolated processes (SPEC §5).
//!
//! Instances outlive the daemon: [`ProcessRuntime::start`] starts a
//! per-instance *shim* by executing the node binary again
//! (`<shim_exe> __verge-shim <instance dir>`, see [`shim_main`]); the shim
//! detaches, supervises the workload and records its exit in the instance
//! dir, whether or not the daemon is alive. A restarted daemon finds its
//! instances again with [`ProcessRuntime::adopt`].
//!
//! With isolation `namespaces` the workload is PID 1 of its own PID, mount,
//! UTS and IPC namespaces (and joins the network namespace it is given), on
//! an overlayfs of the image layers, with capabilities reduced to Docker's
//! default set less `CAP_MKNOD`, in a cgroup `<cgroup_parent>/<id>` with its
//! CPU, memory and pids limits. With isolation `none` it is a plain host
//! process (see [`RuntimeConfig::isolation`]).
//!
//! [`ProcessRuntime::start_with`] also mounts volumes into the instance and
//! delivers secret files on a tmpfs ([`Attachments`], isolation
//! `namespaces` only): volumes are recorded in `launch.json`; secret files
//! go to the shim through a memfd and are never written to the instance's
//! files, its logs or any message (see `attach` and `mounts`).
//!
//! Each instance has a directory `<root>/<id>/`: `spec.json`,
//! `launch.json`, `shim.pid`, `pid`, `shim.log`, `exit.json`, the
//! overlay's `upper/`, `work/`, `rootfs/`, and `secrets/` (empty on the
//! host: the workload's process stages secret files on a tmpfs there).
//! Its logs dir is `<root>/../logs/<id>/` ([`ProcessRuntime::logs_dir`]):
//! the shim reads the workload's stdout and stderr from pipes and writes
//! them there as app records in `app.log`, rotated by size
//! ([`crate::logs`]), from the start and whether or not the daemon runs. [`ProcessRuntime::remove`]
//! keeps the last `exit.json` and `shim.log` there too and removes the
//! instance dir.

mod attach;
pub(crate) mod cgroup;
pub(crate) mod child;
mod instance;
mod layers;
pub(crate) mod mounts;
mod rootfs;
mod shim;
mod spec;
pub(crate) mod state;
mod user;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use verge_api::wire::Isolation;

use crate::logs::LogLimits;

pub use attach::{Attachments, SecretFile, VolumeMount};
pub use cgroup::CPU_PERIOD_US;
pub use instance::Instance;
pub use shim::shim_main;
pub use spec::{Exit, LaunchSpec};

use cgroup::InstanceCgroup;
use state::{Launch, ProcId};

/// The first argument that makes the node binary a shim: `main` must call
/// [`shim_main`] with the second argument, before starting any thread.
pub const SHIM_ARG: &str = "__verge-shim";
/// The pids limit when a spec gives none.
pub const DEFAULT_PIDS: u64 = 1024;
/// How long `start` waits for the shim to report.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `adopt` waits for a live shim to write the workload's PID.
const ADOPT_PID_WAIT: Duration = Duration::from_secs(2);
/// Why an instance with volumes or secret files does not start with
/// isolation `none`.
const NEEDS_NAMESPACES: &str =
    "volumes and secret files need isolation = namespaces: run the node as root";

/// Where and how instances run.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The instances dir: one subdirectory per instance. Instance logs
    /// live in its sibling `logs/`.
    pub root: PathBuf,
    /// Cgroup under which each instance gets `<cgroup_parent>/<id>`,
    /// relative to the hierarchy roots (`verge`).
    pub cgroup_parent: String,
    /// `namespaces` needs root. `none` runs the command as a host process
    /// (for unprivileged development): the command is looked up in the
    /// image layers and run from the host path it has there, with
    /// `<instance dir>/cwd` as working directory and the daemon's user
    /// (or the image user, which needs root); no namespaces, no rootfs, no
    /// hostname, host network and host `/`; the image's `working_dir` and
    /// the spec's `netns` are ignored. It is still put in a cgroup with its
    /// limits when one can be created; otherwise it runs without limits
    /// (with a warning) and processes it leaves behind are not killed.
    pub isolation: Isolation,
    /// The program run as the shim, with [`SHIM_ARG`] and the instance dir.
    /// `/proc/self/exe` for the node binary; tests and benchmarks point it
    /// at a binary whose `main` calls [`shim_main`].
    pub shim_exe: PathBuf,
}

impl RuntimeConfig {
    /// Isolation `namespaces`, cgroup parent `verge`, shim `/proc/self/exe`.
    pub fn new(root: impl Into<PathBuf>) -> RuntimeConfig {
        RuntimeConfig {
            root: root.into(),
            cgroup_parent: "verge".into(),
            isolation: Isolation::Namespaces,
            shim_exe: "/proc/self/exe".into(),
        }
    }
}

/// An instance found by [`ProcessRuntime::adopt`]: running, or exited while
/// the daemon was away (then `instance.try_exit()` is `Some`).
#[derive(Debug, Clone)]
pub struct Adopted {
    pub instance: Instance,
    pub spec: LaunchSpec,
    /// Its volumes, as it was started with them.
    pub mounts: Vec<VolumeMount>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid instance: {0}")]
    InvalidSpec(String),
    #[error(
        "isolation \"namespaces\" needs root; run the node as root, or with isolation \"none\""
    )]
    NotRoot,
    #[error("instance {0} already exists on this node")]
    Exists(String),
    #[error("instance {0} is still running; stop it first")]
    Running(String),
    #[error("instance {0}: {msg}", msg = NEEDS_NAMESPACES)]
    NeedsNamespaces(String),
    #[error("instance {id}: {source}")]
    Cgroup {
        id: String,
        #[source]
        source: cgroup::CgroupError,
    },
    #[error("instance {id}: the shim failed: {message}")]
    Shim { id: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Runs instances as processes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    cfg: std::sync::Arc<RuntimeConfig>,
    log_limits: LogLimits,
}

impl ProcessRuntime {
    pub fn new(cfg: RuntimeConfig) -> Result<ProcessRuntime, RuntimeError> {
        if cfg.isolation == Isolation::Namespaces && !nix::unistd::geteuid().is_root() {
            return Err(RuntimeError::NotRoot);
        }
        fs::create_dir_all(&cfg.root)
            .map_err(io_err(format!("creating {}", cfg.root.display())))?;
        Ok(ProcessRuntime {
            cfg: std::sync::Arc::new(cfg),
            log_limits: LogLimits::default(),
        })
    }

    /// The limits the shims of instances started from now on rotate
    /// `app.log` with (default [`LogLimits::default`]).
    pub fn with_log_limits(mut self, limits: LogLimits) -> ProcessRuntime {
        self.log_limits = limits;
        self
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    /// `<root>/<id>`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join(id)
    }

    /// The instance's logs dir, `<root>/../logs/<id>`: its shim writes
    /// `app.log` there from the start, and [`remove`](Self::remove) keeps
    /// the last `exit.json` and `shim.log` there.
    pub fn logs_dir(&self, id: &str) -> PathBuf {
        let parent = self.cfg.root.parent().unwrap_or(Path::new("/"));
        parent.join("logs").join(id)
    }

    /// The instance's cgroup, relative to the hierarchy roots.
    pub fn cgroup_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cfg.cgroup_parent.trim_matches('/'))
    }

    /// Reads a file of the instance's cgroup, e.g. `("pids", "pids.max")`;
    /// for diagnostics and tests.
    pub fn cgroup_file(&self, id: &str, controller: &str, file: &str) -> Option<String> {
        InstanceCgroup::load(&self.cgroup_path(id)).read(controller, file)
    }

    /// Starts an instance and returns once its command was executed or
    /// failed to be (then [`Instance::wait`] returns a start failure at
    /// once). An `Err` means nothing was started and nothing is left.
    pub async fn start(&self, spec: LaunchSpec) -> Result<Instance, RuntimeError> {
        self.start_with(spec, Attachments::default()).await
    }

    /// [`start`](Self::start) with volumes and secret files. A volume's
    /// or secret file's path that cannot be made in the image (a link on
    /// the way, a file where a directory should be) is a start failure
    /// naming it.
    pub async fn start_with(
        &self,
        spec: LaunchSpec,
        attach: Attachments,
    ) -> Result<Instance, RuntimeError> {
        spec.validate().map_err(RuntimeError::InvalidSpec)?;
        attach.validate().map_err(|e| {
            RuntimeError::InvalidSpec(format!("instance {}: {e}", spec.instance_id))
        })?;
        if self.cfg.isolation == Isolation::None && !attach.is_empty() {
            return Err(RuntimeError::NeedsNamespaces(spec.instance_id));
        }
        let id = spec.instance_id.clone();
        let dir = self.instance_dir(&id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::Exists(id));
            }
            Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
        }
        match self.launch(&spec, attach, &dir).await {
            Ok(instance) => Ok(instance),
            Err(e) => {
                self.discard(&id).await;
                Err(e)
            }
        }
    }

    async fn launch(
        &self,
        spec: &LaunchSpec,
        attach: Attachments,
        dir: &Path,
    ) -> Result<Instance, RuntimeError> {
        let id = &spec.instance_id;
        state::write_json(&dir.join(state::SPEC), spec)
            .map_err(io_err(format!("writing {id}'s spec")))?;
        let cgroup_path = self.cgroup_path(id);
        let cgroup = match InstanceCgroup::create(&cgroup_path, &spec.limits()) {
            Ok(_) => Some(cgroup_path),
            Err(e) if self.cfg.isolation == Isolation::None => {
                tracing::warn!(instance = %id, error = %e, "running without a cgroup: no cpu, memory or pids limits");
                None
            }
            Err(source) => {
                return Err(RuntimeError::Cgroup {
                    id: id.clone(),
                    source,
                });
            }
        };
        let logs = self.logs_dir(id);
        if let Err(e) = fs::create_dir_all(&logs) {
            if let Some(path) = &cgroup {
                InstanceCgroup::load(path).delete();
            }
            return Err(io_err(format!("creating {}", logs.display()))(e));
        }
        let launch = Launch {
            isolation: self.cfg.isolation,
            cgroup,
            logs: Some(logs),
            log_limits: self.log_limits,
            mounts: attach.volumes,
        };
        state::write_json(&dir.join(state::LAUNCH), &launch)
            .map_err(io_err(format!("writing {id}'s launch")))?;

        let shim_log =
            fs::File::create(dir.join(state::SHIM_LOG)).map_err(io_err("creating shim.log"))?;
        let stdin = if attach.secrets.is_empty() {
            Stdio::null()
        } else {
            let fd = attach::secrets_memfd(&attach.secrets)
                .map_err(io_err(format!("handing {id}'s secret files to its shim")))?;
            Stdio::from(fd)
        };
        drop(attach.secrets);
        let mut child = tokio::process::Command::new(&self.cfg.shim_exe)
            .arg(SHIM_ARG)
            .arg(dir)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(shim_log)
            .spawn()
            .map_err(io_err(format!(
                "running the shim {}",
                self.cfg.shim_exe.display()
            )))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut out = Vec::new();
        let read = tokio::time::timeout(START_TIMEOUT, stdout.read_to_end(&mut out)).await;
        // The first shim process exits right after forking the real one.
        let _ = child.wait().await;
        let shim_error = |message: String| RuntimeError::Shim {
            id: id.clone(),
            message,
        };
        match read {
            Err(_) => return Err(shim_error(format!("no report within {START_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(shim_error(format!("reading its report: {e}"))),
            Ok(Ok(_)) => {}
        }
        let report: shim::Report = serde_json::from_slice(&out).map_err(|_| {
            let log = fs::read_to_string(dir.join(state::SHIM_LOG)).unwrap_or_default();
            shim_error(format!(
                "it ended without reporting; shim.log: {}",
                log.trim()
            ))
        })?;
        if let Some(message) = &report.failed {
            tracing::info!(instance = %id, %message, "instance failed to start");
        }
        Ok(Instance::watch(
            id,
            dir,
            self.cfg.isolation,
            Some(report.shim),
            report.workload,
        ))
    }

    /// Finds the instances left by an earlier daemon: running ones (their
    /// shim is alive), exited ones (their `exit.json` is there), and ones
    /// whose shim died without recording an exit (their cgroup is emptied
    /// and they are reported exited with a message). Directories without a
    /// spec (a start interrupted early) are removed.
    pub async fn adopt(&self) -> Result<Vec<Adopted>, RuntimeError> {
        let entries = fs::read_dir(&self.cfg.root)
            .map_err(io_err(format!("reading {}", self.cfg.root.display())))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {}", self.cfg.root.display())))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(adopted) = self.adopt_one(&id).await {
                found.push(adopted);
            }
        }
        Ok(found)
    }

    async fn adopt_one(&self, id: &str) -> Option<Adopted> {
        let dir = self.instance_dir(id);
        let loaded = state::read_json::<LaunchSpec>(&dir.join(state::SPEC)).and_then(|spec| {
            state::read_json::<Launch>(&dir.join(state::LAUNCH)).map(|l| (spec, l))
        });
        let (spec, launch) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(instance = id, error = %e, "removing an instance dir left by an interrupted start");
                self.discard(id).await;
                return None;
            }
        };
        let shim = ProcId::read(&dir.join(state::SHIM_PID)).ok();
        let mut workload = ProcId::read(&dir.join(state::PID)).ok();
        if shim.is_some_and(|s| s.alive()) {
            let deadline = tokio::time::Instant::now() + ADOPT_PID_WAIT;
            while workload.is_none()
                && shim.is_some_and(|s| s.alive())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                workload = ProcId::read(&dir.join(state::PID)).ok();
            }
            tracing::info!(
                instance = id,
                pid = workload.map_or(0, |w| w.pid),
                "adopted a running instance"
            );
            let instance = Instance::watch(id, &dir, launch.isolation, shim, workload);
            return Some(Adopted {
                instance,
                spec,
                mounts: launch.mounts,
            });
        }
        if !dir.join(state::EXIT).exists() {
            // The shim died without recording an exit (or never ran): make
            // sure nothing of the instance is left running, then record it.
            if let Some(w) = workload.filter(ProcId::alive).and_then(|w| w.pidfd()) {
                let _ =
                    state::pidfd_send_signal(std::os::fd::AsRawFd::as_raw_fd(&w), libc::SIGKILL);
            }
            if let Some(path) = launch.cgroup.clone() {
                let _ =
                    tokio::task::spawn_blocking(move || InstanceCgroup::load(&path).delete()).await;
            }
            let mut exit = Exit::lost(match shim {
                Some(_) => "the instance's shim died without recording its exit".into(),
                None => "the node stopped while starting the instance".into(),
            });
            exit.start_failed = shim.is_none();
            if let Err(e) = state::write_json(&dir.join(state::EXIT), &exit) {
                tracing::warn!(instance = id, error = %e, "cannot record the exit");
            }
        }
        let instance = Instance::watch(id, &dir, launch.isolation, None, workload);
        Some(Adopted {
            instance,
            spec,
            mounts: launch.mounts,
        })
    }

    /// Removes an exited instance: its cgroup (if still there), its dir.
    /// Its `shim.log` and `exit.json` are kept in
    /// [`logs_dir`](Self::logs_dir), beside the logs its shim wrote there.
    /// Removing an unknown instance is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        if ProcId::read(&dir.join(state::SHIM_PID)).is_ok_and(|s| s.alive()) {
            return Err(RuntimeError::Running(id.to_owned()));
        }
        self.cleanup(id, true).await
    }

    /// Removes whatever a failed start left, killing its shim if needed.
    async fn discard(&self, id: &str) {
        let dir = self.instance_dir(id);
        if let Some(fd) = ProcId::read(&dir.join(state::SHIM_PID))
            .ok()
            .and_then(|s| s.pidfd())
        {
            let _ = state::pidfd_send_signal(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SIGKILL);
        }
        if let Err(e) = self.cleanup(id, false).await {
            tracing::warn!(instance = id, error = %e, "cannot clean up after a failed start");
        }
    }

    async fn cleanup(&self, id: &str, keep_logs: bool) -> Result<(), RuntimeError> {
        let dir = self.instance_dir(id);
        let path = self.cgroup_path(id);
        let gone = tokio::task::spawn_blocking({
            let path = path.clone();
            move || InstanceCgroup::load(&path).delete()
        })
        .await
        .unwrap_or(false);
        if !gone {
            return Err(RuntimeError::Cgroup {
                id: id.to_owned(),
                source: cgroup::CgroupError {
                    path,
                    what: "removing it".into(),
                    cause: "it still exists".into(),
                },
            });
        }
        unmount_under(&dir);
        if keep_logs {
            let logs = self.logs_dir(id);
            fs::create_dir_all(&logs).map_err(io_err(format!("creating {}", logs.display())))?;
            for name in [state::SHIM_LOG, state::EXIT] {
                let from = dir.join(name);
                if from.exists() {
                    move_file(&from, &logs.join(name))
                        .map_err(io_err(format!("keeping {}", from.display())))?;
                }
            }
        }
        tokio::task::spawn_blocking(move || fs::remove_dir_all(&dir))
            .await
            .map_err(|e| io_err("removing the instance dir")(io::Error::other(e)))?
            .or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err(format!(
                "removing {}",
                self.instance_dir(id).display()
            )))
    }
}

fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to)?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

/// Detaches any mount under `dir` in the daemon's mount namespace. The
/// rootfs is mounted in the instance's own namespace, so there should be
/// none; this is a safety net before deleting the dir.
fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        tracing::warn!(mount = p, "unmounting a leftover mount of an instance");
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}
