//! Volumes: this node's persistent storage for instances.
//!
//! It owns everything under `<data dir>/volumes` (see [`layout`]): making,
//! growing, snapshotting, restoring, deleting, exporting and importing
//! volumes when the control plane asks on a volume stream ([`serve`]),
//! bringing them back after a daemon restart or a reboot
//! ([`Volumes::recover`]), reporting their use for heartbeats, and which
//! instance mounts which volume ([`Volumes::claim`]), one at a time.
//!
//! Two backends. `loop`: a sparse `disk.img` of the volume's size holding
//! an ext4 filesystem, attached through a loop device ([`loopdev`]) and
//! mounted `nodev,nosuid` at `mnt/`: the size is enforced (a workload
//! writing past it gets `ENOSPC`), snapshots are consistent (the
//! filesystem is frozen while copied). `directory`, for hosts without loop
//! devices: `mnt/` is a plain directory, and the size is only recorded.
//!
//! It must not decide anything the control plane decides (which volume
//! goes where, when to snapshot), nor mount into instances: the runtime
//! bind-mounts the directory [`Volumes::claim`] returns. Filesystem work
//! runs on blocking threads, one operation at a time per volume.

mod copy;
mod dir;
mod error;
mod ext4;
mod layout;
mod loopdev;
mod loopvol;
mod mounts;
mod ops;
mod serve;
mod snapshots;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use verge_api::wire::VolumeUsage;

pub use error::VolumeError;
pub use serve::serve;
pub use transfer::Export;

use ext4::Ext4;
use layout::{Kind, Layout};

/// How new volumes are stored (`--volume-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Loop devices when the host has them and a test attach works, else
    /// directories.
    #[default]
    Auto,
    /// Loop devices, or the daemon does not start.
    Loop,
    /// Plain directories: sizes are recorded, not enforced.
    Directory,
}

/// This node's volumes. Cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct Volumes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    /// How new volumes are stored.
    kind: Kind,
    /// What loop volumes need; `Err` says why this host cannot use them.
    loops: Result<Ext4, String>,
    /// Whether a mounted filesystem can grow (else volumes grow unmounted,
    /// so only while no instance claims them).
    online_grow: bool,
    state: Mutex<State>,
    /// One operation at a time per volume (and per snapshot: `snapshot:<id>`).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Woken after each operation that changed a volume (for a heartbeat).
    changed: tokio::sync::Notify,
    /// Directory volumes' bytes as last measured (walking a tree takes
    /// time), and when.
    dir_sizes: Mutex<HashMap<String, (u64, Instant)>>,
    /// Whether directory volumes are being measured again.
    measuring: AtomicBool,
}

/// How often a directory volume's tree is walked again for reports.
const REMEASURE: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    /// Volume → the instance that mounts it.
    claims: HashMap<String, String>,
    /// Volumes mounted (or, directories, present) and claimable.
    ready: HashSet<String>,
    /// Volumes present but not usable, with why.
    unusable: HashMap<String, String>,
    /// Volumes being restored or deleted: not claimable meanwhile.
    busy: HashMap<String, &'static str>,
}

impl Volumes {
    /// Opens the volumes under `data_dir/volumes`, choosing the backend of
    /// new volumes. Mounts nothing yet: call [`Volumes::recover`].
    pub fn open(data_dir: &Path, backend: Backend) -> Result<Volumes, VolumeError> {
        let root = data_dir.join("volumes");
        for dir in [root.join("snapshots"), root.join(".staging")] {
            std::fs::create_dir_all(&dir).map_err(VolumeError::io("volumes", "creating", &dir))?;
        }
        let root = root
            .canonicalize()
            .map_err(VolumeError::io("volumes", "resolving", &root))?;
        let loops = Ext4::find().and_then(|ext4| loopdev::probe(&root).map(|()| ext4));
        let kind = match (backend, &loops) {
            (Backend::Directory, _) => {
                tracing::warn!(
                    "volume backend directory (--volume-backend directory): volume sizes are not enforced"
                );
                Kind::Directory
            }
            (Backend::Loop | Backend::Auto, Ok(_)) => {
                tracing::info!(
                    "volume backend loop: ext4 in sparse files on loop devices, sizes enforced"
                );
                if !ext4::can_grow_online() {
                    tracing::warn!(
                        "this daemon lacks CAP_SYS_RESOURCE, so it cannot grow a mounted volume: volumes grow only while no instance mounts them"
                    );
                }
                Kind::Loop
            }
            (Backend::Loop, Err(why)) => {
                return Err(VolumeError::Unsupported(format!(
                    "--volume-backend loop: this host cannot use loop devices: {why}; \
                     fix that, or use --volume-backend directory (sizes not enforced)"
                )));
            }
            (Backend::Auto, Err(why)) => {
                tracing::warn!(
                    reason = %why,
                    "volume backend directory: this host cannot use loop devices, so volume sizes are not enforced"
                );
                Kind::Directory
            }
        };
        Ok(Volumes {
            inner: Arc::new(Inner {
                layout: Layout { root },
                kind,
                loops,
                online_grow: ext4::can_grow_online(),
                state: Mutex::default(),
                locks: Mutex::default(),
                changed: tokio::sync::Notify::new(),
                dir_sizes: Mutex::default(),
                measuring: AtomicBool::new(false),
            }),
        })
    }

    /// `loop` or `directory`: how new volumes are stored.
    pub fn backend(&self) -> &'static str {
        self.inner.kind.name()
    }

    /// Brings every volume back at daemon start: its loop device attached
    /// (the one still backing it after a restart, a new one after a
    /// reboot) and mounted, leftovers of interrupted operations removed. A
    /// volume that cannot be mounted is logged and refused to claims with
    /// the reason.
    pub async fn recover(&self) {
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        if let Err(e) =
            tokio::task::spawn_blocking(move || span.in_scope(|| inner.recover_all())).await
        {
            tracing::error!(error = %e, "recovering volumes: the task was lost");
        }
    }

    /// Claims `volume` for `instance`, the one instance that mounts it,
    /// and returns the host directory to bind into it. Claiming it again
    /// for the same instance is fine (re-adoption after a restart).
    pub fn claim(&self, volume: &str, instance: &str) -> Result<PathBuf, VolumeError> {
        ops::check_id("volume", volume)?;
        let mut state = self.inner.state();
        if let Some(doing) = state.busy.get(volume) {
            return Err(VolumeError::Busy {
                volume: volume.to_string(),
                doing,
            });
        }
        match state.claims.get(volume) {
            Some(owner) if owner == instance => return Ok(self.mount_dir(volume)),
            Some(owner) => {
                return Err(VolumeError::Claimed {
                    volume: volume.to_string(),
                    instance: owner.clone(),
                });
            }
            None => {}
        }
        if state.ready.contains(volume) {
            state
                .claims
                .insert(volume.to_string(), instance.to_string());
            tracing::debug!(volume, instance, "volume claimed");
            return Ok(self.mount_dir(volume));
        }
        if let Some(reason) = state.unusable.get(volume) {
            return Err(VolumeError::Unavailable {
                volume: volume.to_string(),
                reason: reason.clone(),
            });
        }
        drop(state);
        if self.inner.layout.volume(volume).exists() {
            return Err(VolumeError::NotReady {
                volume: volume.to_string(),
            });
        }
        Err(VolumeError::NotHere {
            volume: volume.to_string(),
        })
    }

    /// Ends `instance`'s claim of `volume` (none: nothing to do).
    pub fn release(&self, volume: &str, instance: &str) {
        let mut state = self.inner.state();
        if state
            .claims
            .get(volume)
            .is_some_and(|owner| owner == instance)
        {
            state.claims.remove(volume);
            tracing::debug!(volume, instance, "volume released");
        }
    }

    /// Where `volume`'s data is on the host (mounted there, for loop volumes).
    pub fn mount_dir(&self, volume: &str) -> PathBuf {
        self.inner.layout.mnt(volume)
    }

    /// Every volume with its size and use, for heartbeats.
    pub async fn usage(&self) -> Vec<VolumeUsage> {
        self.report().await.0
    }

    /// Bytes free for new volumes: the volumes filesystem's available
    /// space, less what existing volumes may still grow into.
    pub async fn free_bytes(&self) -> u64 {
        self.report().await.1
    }

    /// [`Volumes::usage`] and [`Volumes::free_bytes`] from one look. A
    /// directory volume's use is as last measured (walking its tree takes
    /// time): measured again in the background once that is older than
    /// [`REMEASURE`].
    pub async fn report(&self) -> (Vec<VolumeUsage>, u64) {
        let inner = self.inner.clone();
        let report = tokio::task::spawn_blocking(move || inner.report()).await;
        self.remeasure();
        match report {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading volume usage");
                (Vec::new(), 0)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading volume usage: the task was lost");
                (Vec::new(), 0)
            }
        }
    }

    /// Measures again, on a blocking thread, the directory volumes
    /// measured longer than [`REMEASURE`] ago (one such walk at a time).
    fn remeasure(&self) {
        let stale = self.inner.measured_before(REMEASURE);
        if stale.is_empty() || self.inner.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            /// Done measuring, also on a panic.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _done = Done(&inner.measuring);
            for id in stale {
                // Deleted meanwhile, or mid-restore: measured when next seen.
                if let Err(e) = span.in_scope(|| inner.measure(&id, true)) {
                    tracing::debug!(volume = %id, error = %e, "measuring a directory volume");
                }
            }
        });
    }

    /// Completes after an operation changed a volume since the last call
    /// (for a heartbeat with the new usage).
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Takes the operation lock of `key` (a volume ID, or `snapshot:<id>`).
    async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        self.inner.lock_for(key).lock_owned().await
    }

    /// Runs `f` on a blocking thread, in the current span, holding
    /// `guards` until it ends (also when the caller stops waiting), then
    /// wakes [`Volumes::changed`].
    async fn blocking<T, G>(
        &self,
        subject: String,
        guards: G,
        f: impl FnOnce(&Arc<Inner>) -> Result<T, VolumeError> + Send + 'static,
    ) -> Result<T, VolumeError>
    where
        T: Send + 'static,
        G: Send + 'static,
    {
        let inner = self.inner.clone();
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _guards = guards;
            let result = span.in_scope(|| f(&inner));
            inner.changed.notify_one();
            result
        })
        .await;
        result.map_err(|e| VolumeError::Task {
            subject,
            detail: e.to_string(),
        })?
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `volume` usable (or not, with why).
    fn set_ready(&self, volume: &str, result: Result<(), &VolumeError>) {
        let mut state = self.state();
        match result {
            Ok(()) => {
                state.unusable.remove(volume);
                state.ready.insert(volume.to_string());
            }
            Err(e) => {
                state.ready.remove(volume);
                state.unusable.insert(volume.to_string(), e.to_string());
            }
        }
    }

    /// Forgets `volume` (deleted).
    fn forget(&self, volume: &str) {
        let mut state = self.state();
        state.ready.remove(volume);
        state.unusable.remove(volume);
        drop(state);
        self.dir_sizes().remove(volume);
    }

    fn dir_sizes(&self) -> MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.dir_sizes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What loop volumes need, or why this host has none.
    fn ext4(&self, volume: &str) -> Result<&Ext4, VolumeError> {
        self.loops.as_ref().map_err(|why| VolumeError::Unavailable {
            volume: volume.to_string(),
            reason: format!(
                "it is a loop volume, and this host cannot use loop devices now: {why}"
            ),
        })
    }
}

/// Marks a volume busy (refusing claims) while restored or deleted.
struct Busy {
    inner: Arc<Inner>,
    volume: String,
}

impl Busy {
    /// Refused while an instance claims `volume`.
    fn take(inner: &Arc<Inner>, volume: &str, doing: &'static str) -> Result<Busy, VolumeError> {
        let mut state = inner.state();
        if let Some(instance) = state.claims.get(volume) {
            return Err(VolumeError::Claimed {
                volume: volume.to_string(),
                instance: instance.clone(),
            });
        }
        state.busy.insert(volume.to_string(), doing);
        Ok(Busy {
            inner: inner.clone(),
            volume: volume.to_string(),
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.inner.state().busy.remove(&self.volume);
    }
}
