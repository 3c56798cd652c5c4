//! Volume operations: create, resize, delete, and the node-wide ones,
//! recovering at start and reporting use. Each public operation takes the
//! volume's lock and does its filesystem work on a blocking thread.

use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use verge_api::wire::VolumeUsage;

use super::layout::{DirMeta, Kind, read_json, valid_id, write_json};
use super::{Busy, Inner, VolumeError, Volumes, copy, dir};

/// Refuses an ID that cannot be a file name here.
pub(super) fn check_id(what: &'static str, id: &str) -> Result<(), VolumeError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(VolumeError::InvalidId {
            what,
            id: id.to_string(),
        })
    }
}

impl Volumes {
    /// A new empty volume of `size` bytes. An existing one of that size is
    /// success; of another size, an error.
    #[tracing::instrument(name = "volume_create", skip(self), fields(volume = %volume))]
    pub async fn create(&self, volume: &str, size: u64) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        let guard = self.lock(volume).await;
        let id = volume.to_string();
        self.blocking(format!("volume {volume}"), guard, move |inner| {
            inner.create(&id, size)
        })
        .await
    }

    /// Grows `volume` to `size` bytes, online (a daemon without
    /// `CAP_SYS_RESOURCE`: unmounted, so refused while claimed); refuses
    /// to shrink.
    #[tracing::instrument(name = "volume_resize", skip(self), fields(volume = %volume))]
    pub async fn resize(&self, volume: &str, size: u64) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        let guard = self.lock(volume).await;
        let id = volume.to_string();
        self.blocking(format!("volume {volume}"), guard, move |inner| {
            inner.resize(&id, size)
        })
        .await
    }

    /// Unmounts and removes `volume` (absent: success); its snapshots
    /// stay. Refused while an instance claims it.
    #[tracing::instrument(name = "volume_delete", skip(self), fields(volume = %volume))]
    pub async fn delete(&self, volume: &str) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        let guard = self.lock(volume).await;
        let busy = Busy::take(&self.inner, volume, "deleted")?;
        let id = volume.to_string();
        self.blocking(format!("volume {volume}"), (guard, busy), move |inner| {
            inner.delete(&id)
        })
        .await
    }
}

impl Inner {
    fn create(&self, id: &str, size: u64) -> Result<VolumeUsage, VolumeError> {
        if size == 0 {
            return Err(VolumeError::ZeroSize { volume: id.into() });
        }
        if self.layout.kind(id).is_some() {
            let (usage, _) = self.usage_of(id)?;
            if usage.size != size {
                return Err(VolumeError::SizeMismatch {
                    volume: id.into(),
                    size: usage.size,
                    requested: size,
                });
            }
            // Idempotent, and a chance to mount one that failed before.
            self.recover_one(id);
            return Ok(usage);
        }
        self.need_space(id, size)?;
        let subject = format!("volume {id}");
        let final_dir = self.layout.volume(id);
        if final_dir.exists() {
            // A directory without disk.img or mnt: leftovers, not a volume.
            std::fs::remove_dir_all(&final_dir)
                .map_err(VolumeError::io(&subject, "removing", &final_dir))?;
        }
        let staging = self
            .layout
            .staging()
            .join(format!("{id}-{}", ulid::Ulid::new()));
        std::fs::create_dir(&staging).map_err(VolumeError::io(&subject, "creating", &staging))?;
        let made = match self.kind {
            Kind::Loop => self.make_disk(id, &staging, size),
            Kind::Directory => std::fs::create_dir(staging.join("mnt"))
                .and_then(|()| write_json(&staging.join("volume.json"), &DirMeta { size }))
                .map_err(VolumeError::io(&subject, "creating", &staging)),
        }
        .and_then(|()| {
            std::fs::rename(&staging, &final_dir).map_err(VolumeError::io(
                &subject,
                "moving into place",
                &final_dir,
            ))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if self.kind == Kind::Loop
            && let Err(e) = self.bring_up(id)
        {
            let _ = self.bring_down(id);
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e);
        }
        self.set_ready(id, Ok(()));
        tracing::info!(size, backend = self.kind.name(), "volume created");
        Ok(self.usage_of(id)?.0)
    }

    fn resize(self: &Arc<Self>, id: &str, size: u64) -> Result<VolumeUsage, VolumeError> {
        let Some(kind) = self.layout.kind(id) else {
            return Err(VolumeError::NotHere { volume: id.into() });
        };
        let (usage, _) = self.usage_of(id)?;
        if size < usage.size {
            return Err(VolumeError::Shrink {
                volume: id.into(),
                size: usage.size,
                requested: size,
            });
        }
        self.need_space(id, size - usage.size)?;
        // Growing unmounted: no instance may claim it meanwhile.
        let _busy = match (kind, self.online_grow) {
            (Kind::Loop, false) => match Busy::take(self, id, "resized") {
                Ok(busy) => Some(busy),
                Err(VolumeError::Claimed { .. }) if size == usage.size => return Ok(usage),
                Err(VolumeError::Claimed { volume, instance }) => {
                    return Err(VolumeError::Unsupported(format!(
                        "volume {volume} is mounted by instance {instance}, and this node cannot grow a mounted filesystem \
                         (the daemon lacks CAP_SYS_RESOURCE): stop the instance and resize again, or give the daemon CAP_SYS_RESOURCE"
                    )));
                }
                Err(e) => return Err(e),
            },
            _ => None,
        };
        match kind {
            Kind::Loop => {
                let was_mounted = self.mounted(id);
                if let Err(e) = self.grow_disk(id, size) {
                    // Still mounted: as usable as before, claims and all.
                    if self.mounted(id) {
                        return Err(e);
                    }
                    let e = if was_mounted {
                        VolumeError::ResizeUnmounted {
                            volume: id.into(),
                            source: Box::new(e),
                        }
                    } else {
                        e
                    };
                    self.set_ready(id, Err(&e));
                    return Err(e);
                }
                self.set_ready(id, Ok(()));
            }
            Kind::Directory => write_json(&self.layout.dir_meta(id), &DirMeta { size }).map_err(
                VolumeError::io(&format!("volume {id}"), "writing", self.layout.dir_meta(id)),
            )?,
        }
        tracing::info!(from = usage.size, to = size, "volume resized");
        Ok(self.usage_of(id)?.0)
    }

    fn delete(&self, id: &str) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("volume {id}");
        let kind = self.layout.kind(id);
        let dir = self.layout.volume(id);
        if kind == Some(Kind::Loop) {
            self.bring_down(id)?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!("volume deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VolumeError::io(&subject, "removing", &dir)(e)),
        }
        self.forget(id);
        Ok(VolumeUsage {
            volume: id.into(),
            size: 0,
            used: 0,
            backend: kind.unwrap_or(self.kind).name().into(),
        })
    }

    /// Refuses `need` more bytes beyond what the node has free for volumes.
    pub(super) fn need_space(&self, id: &str, need: u64) -> Result<(), VolumeError> {
        let (_, free) = self.report()?;
        if need > free {
            return Err(VolumeError::NoSpace {
                volume: id.into(),
                need,
                free,
            });
        }
        Ok(())
    }

    /// A volume's use, and the bytes it may still take on the host disk
    /// (its size less what it takes now).
    pub(super) fn usage_of(&self, id: &str) -> Result<(VolumeUsage, u64), VolumeError> {
        self.usage(id, false)
    }

    /// [`Inner::usage_of`]; with `cached`, a directory volume's use as last
    /// measured for a report (measured now, and kept, if never).
    fn usage(&self, id: &str, cached: bool) -> Result<(VolumeUsage, u64), VolumeError> {
        let subject = format!("volume {id}");
        let mnt = self.layout.mnt(id);
        let (kind, size, used, taken) = match self.layout.kind(id) {
            None => return Err(VolumeError::NotHere { volume: id.into() }),
            Some(Kind::Loop) => {
                let disk = self.layout.disk(id);
                let meta = std::fs::metadata(&disk)
                    .map_err(VolumeError::io(&subject, "reading", &disk))?;
                let allocated = copy::allocated(&meta);
                let used = if self.is_mounted(id) {
                    let fs = nix::sys::statvfs::statvfs(&mnt).map_err(VolumeError::sys(
                        &subject,
                        format!("statvfs {}", mnt.display()),
                    ))?;
                    (fs.blocks() as u64).saturating_sub(fs.blocks_free() as u64)
                        * fs.fragment_size() as u64
                } else {
                    allocated
                };
                (Kind::Loop, meta.len(), used, allocated)
            }
            Some(Kind::Directory) => {
                let path = self.layout.dir_meta(id);
                let meta: DirMeta =
                    read_json(&path).map_err(VolumeError::io(&subject, "reading", &path))?;
                let last = cached.then(|| self.measured(id)).flatten();
                let used = match last {
                    Some(used) => used,
                    None => self.measure(id, cached)?,
                };
                (Kind::Directory, meta.size, used, used)
            }
        };
        let usage = VolumeUsage {
            volume: id.into(),
            size,
            used,
            backend: kind.name().into(),
        };
        Ok((usage, size.saturating_sub(taken)))
    }

    /// Walks directory volume `id`'s tree for the bytes it takes, and
    /// keeps them for [`Inner::report`]: with `keep`, or when reports
    /// have them already (older).
    pub(super) fn measure(&self, id: &str, keep: bool) -> Result<u64, VolumeError> {
        let mnt = self.layout.mnt(id);
        let measured = dir::tree_size(&mnt);
        let mut sizes = self.dir_sizes();
        match measured {
            Ok(used) => {
                if keep || sizes.contains_key(id) {
                    sizes.insert(id.to_string(), (used, Instant::now()));
                }
                Ok(used)
            }
            Err(e) => {
                sizes.remove(id);
                Err(VolumeError::io(&format!("volume {id}"), "measuring", mnt)(
                    e,
                ))
            }
        }
    }

    /// Directory volume `id`'s bytes as last measured.
    fn measured(&self, id: &str) -> Option<u64> {
        self.dir_sizes().get(id).map(|(used, _)| *used)
    }

    /// The directory volumes measured longer than `age` ago.
    pub(super) fn measured_before(&self, age: Duration) -> Vec<String> {
        self.dir_sizes()
            .iter()
            .filter(|(_, (_, at))| at.elapsed() > age)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether something is mounted on the volume's `mnt` (a cheap check:
    /// another device than its parent's).
    pub(super) fn is_mounted(&self, id: &str) -> bool {
        match (
            std::fs::metadata(self.layout.mnt(id)),
            std::fs::metadata(self.layout.volume(id)),
        ) {
            (Ok(mnt), Ok(parent)) => mnt.dev() != parent.dev(),
            _ => false,
        }
    }

    /// Every volume's use, and the bytes free for new volumes; directory
    /// volumes' use as last measured (see [`Volumes::report`]).
    pub(super) fn report(&self) -> Result<(Vec<VolumeUsage>, u64), VolumeError> {
        let root = &self.layout.root;
        let ids = self
            .layout
            .volume_ids()
            .map_err(VolumeError::io("volumes", "listing", root))?;
        let fs = nix::sys::statvfs::statvfs(root).map_err(VolumeError::sys(
            "volumes",
            format!("statvfs {}", root.display()),
        ))?;
        let mut free = fs.blocks_available() as u64 * fs.fragment_size() as u64;
        let mut usage = Vec::with_capacity(ids.len());
        for id in ids {
            match self.usage(&id, true) {
                Ok((u, may_take)) => {
                    free = free.saturating_sub(may_take);
                    usage.push(u);
                }
                // Deleted meanwhile, or not a volume (yet).
                Err(VolumeError::NotHere { .. }) => {}
                Err(e) => tracing::warn!(volume = %id, error = %e, "reading volume usage"),
            }
        }
        Ok((usage, free))
    }

    /// See [`Volumes::recover`].
    pub(super) fn recover_all(&self) {
        self.remove_leftovers();
        let ids = match self.layout.volume_ids() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, root = %self.layout.root.display(), "listing volumes");
                return;
            }
        };
        let (mut ok, mut failed) = (0, 0);
        for id in ids {
            let _guard = self.lock_for(&id).blocking_lock_owned();
            let span = tracing::info_span!("volume_recover", volume = %id);
            if span.in_scope(|| self.recover_one(&id)) {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        tracing::info!(volumes = ok, unusable = failed, "volumes recovered");
        self.changed.notify_one();
    }

    /// Brings one volume back; `false` when it cannot be (logged, kept
    /// with the reason for claims).
    fn recover_one(&self, id: &str) -> bool {
        let result = match self.layout.kind(id) {
            Some(Kind::Loop) => {
                let _ = std::fs::remove_file(self.layout.volume(id).join("disk.img.restore"));
                self.bring_up(id)
            }
            Some(Kind::Directory) => {
                self.finish_dir_restore(id);
                Ok(())
            }
            None => Err(VolumeError::Unavailable {
                volume: id.into(),
                reason: "its directory holds neither disk.img nor mnt/ and volume.json (an interrupted create?): \
                         delete it and create it again"
                    .into(),
            }),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "volume cannot be mounted");
        }
        self.set_ready(id, result.as_ref().map(drop));
        result.is_ok()
    }

    /// Removes what interrupted operations left: staging directories and
    /// half-written snapshots.
    fn remove_leftovers(&self) {
        let staging = self.layout.staging();
        for dir in [&staging, &self.layout.snapshots(), &self.layout.root] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                let leftover = if *dir == staging {
                    true
                } else if *dir == self.layout.root {
                    // A killed daemon's loop test file (this one's is gone).
                    name.to_string_lossy().starts_with(".loop-probe-")
                } else {
                    path.extension().is_some_and(|e| e == "tmp")
                };
                if !leftover {
                    continue;
                }
                tracing::info!(path = %path.display(), "removing what an interrupted volume operation left");
                let removed = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                if let Err(e) = removed {
                    tracing::warn!(path = %path.display(), error = %e, "removing a leftover");
                }
            }
        }
    }

    /// The operation lock of `key` (see [`Volumes::lock`]).
    pub(super) fn lock_for(&self, key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }
}
