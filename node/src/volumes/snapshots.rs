//! Snapshots: point-in-time copies of a volume kept on this node, restored
//! into their volume (or a new one), deleted. A loop volume's snapshot is a
//! sparse copy of its `disk.img` taken with the filesystem frozen; a
//! directory volume's, a copy of its tree, taken only while no instance
//! mounts it (nothing freezes a directory, and the copy, done as root,
//! must not race a workload changing the tree).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use verge_api::wire::VolumeUsage;

use super::layout::{DirMeta, Kind, SnapshotMeta, read_json, write_json};
use super::mounts::Frozen;
use super::ops::check_id;
use super::{Busy, Inner, VolumeError, Volumes, copy, dir};

impl Volumes {
    /// Snapshot `snapshot` of `volume`, consistent while it is written (a
    /// directory volume: refused while an instance claims it, and claims
    /// wait meanwhile). The same snapshot of the same volume again is
    /// success.
    #[tracing::instrument(name = "volume_snapshot", skip(self), fields(volume = %volume, snapshot = %snapshot))]
    pub async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        check_id("snapshot", snapshot)?;
        let guards = (
            self.lock(volume).await,
            self.lock(&format!("snapshot:{snapshot}")).await,
        );
        let (id, snap) = (volume.to_string(), snapshot.to_string());
        self.blocking(format!("snapshot {snapshot}"), guards, move |inner| {
            inner.snapshot(&id, &snap)
        })
        .await
    }

    /// Replaces `volume`'s data by the snapshot's (making the volume if it
    /// is not here); it grows to the snapshot's size if smaller. Refused
    /// while an instance claims it.
    #[tracing::instrument(name = "volume_restore", skip(self), fields(volume = %volume, snapshot = %snapshot))]
    pub async fn restore(&self, volume: &str, snapshot: &str) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        check_id("snapshot", snapshot)?;
        let guards = (
            self.lock(volume).await,
            self.lock(&format!("snapshot:{snapshot}")).await,
        );
        let busy = Busy::take(&self.inner, volume, "restored")?;
        let (id, snap) = (volume.to_string(), snapshot.to_string());
        self.blocking(format!("volume {volume}"), (guards, busy), move |inner| {
            inner.restore(&id, &snap)
        })
        .await
    }

    /// Removes `snapshot` (absent: success). The answer is what it was of.
    #[tracing::instrument(name = "volume_delete_snapshot", skip(self), fields(snapshot = %snapshot))]
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<VolumeUsage, VolumeError> {
        check_id("snapshot", snapshot)?;
        let guard = self.lock(&format!("snapshot:{snapshot}")).await;
        let snap = snapshot.to_string();
        self.blocking(format!("snapshot {snapshot}"), guard, move |inner| {
            inner.delete_snapshot(&snap)
        })
        .await
    }
}

impl Inner {
    /// What `snap` is of; `SnapshotNotFound` when absent.
    pub(super) fn snapshot_meta(&self, snap: &str) -> Result<SnapshotMeta, VolumeError> {
        let path = self.layout.snapshot_meta(snap);
        match read_json(&path) {
            Ok(meta) => Ok(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::SnapshotNotFound {
                    snapshot: snap.into(),
                })
            }
            Err(e) => Err(VolumeError::io(
                &format!("snapshot {snap}"),
                "reading",
                &path,
            )(e)),
        }
    }

    fn snapshot(self: &Arc<Self>, id: &str, snap: &str) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("snapshot {snap}");
        match self.snapshot_meta(snap) {
            Ok(meta) if meta.volume == id => return Ok(meta_usage(&meta)),
            Ok(meta) => {
                return Err(VolumeError::SnapshotExists {
                    snapshot: snap.into(),
                    of: meta.volume,
                    volume: id.into(),
                });
            }
            Err(VolumeError::SnapshotNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let Some(kind) = self.layout.kind(id) else {
            return Err(VolumeError::NotHere { volume: id.into() });
        };
        // A directory is copied as it is, not frozen, and its tree is the
        // workload's to change: only while no instance mounts it, and no
        // instance may claim it until copied.
        let _busy = match kind {
            Kind::Loop => None,
            Kind::Directory => match Busy::take(self, id, "snapshotted") {
                Ok(busy) => Some(busy),
                Err(VolumeError::Claimed { volume, instance }) => {
                    return Err(VolumeError::DirectoryClaimed { volume, instance });
                }
                Err(e) => return Err(e),
            },
        };
        let (usage, may_take) = self.usage_of(id)?;
        // The copy takes what the volume takes now: its allocated blocks
        // (loop), its tree (directory, which may exceed the size).
        let need = match kind {
            Kind::Loop => usage.size.saturating_sub(may_take),
            Kind::Directory => usage.used,
        };
        self.need_space(id, need)?;
        let mut used = usage.used;
        let (path, tmp) = match kind {
            Kind::Loop => (
                self.layout.snapshot_img(snap),
                self.layout.snapshot_img(snap).with_extension("img.tmp"),
            ),
            Kind::Directory => (
                self.layout.snapshot_tree(snap),
                self.layout.snapshot_tree(snap).with_extension("tree.tmp"),
            ),
        };
        remove_any(&tmp);
        let mnt = self.layout.mnt(id);
        let copied = match kind {
            Kind::Loop => {
                // Frozen (flushed, writes held) for the copy; thawed when
                // `frozen` drops, on every way out.
                let frozen = if self.is_mounted(id) {
                    let frozen = Frozen::freeze(&mnt)
                        .map_err(VolumeError::io(&subject, "freezing", &mnt))?;
                    Some(frozen)
                } else {
                    None
                };
                if frozen.is_some()
                    && let Ok((now, _)) = self.usage_of(id)
                {
                    used = now.used;
                }
                let copied = copy::copy_sparse(&self.layout.disk(id), &tmp);
                drop(frozen);
                copied
            }
            Kind::Directory => dir::copy_tree(&mnt, &tmp),
        };
        if let Err(e) = copied {
            remove_any(&tmp);
            return Err(VolumeError::io(&subject, "copying the volume to", tmp)(e));
        }
        std::fs::rename(&tmp, &path).map_err(VolumeError::io(
            &subject,
            "moving into place",
            &path,
        ))?;
        let meta = SnapshotMeta {
            volume: id.into(),
            size: usage.size,
            used,
            backend: kind,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let meta_path = self.layout.snapshot_meta(snap);
        write_json(&meta_path, &meta).map_err(VolumeError::io(&subject, "writing", &meta_path))?;
        tracing::info!(size = meta.size, used, "snapshot taken");
        Ok(meta_usage(&meta))
    }

    fn restore(&self, id: &str, snap: &str) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("volume {id}");
        let meta = self.snapshot_meta(snap)?;
        let current = self.layout.kind(id);
        if current.is_some_and(|k| k != meta.backend) {
            return Err(VolumeError::Unsupported(format!(
                "snapshot {snap} is of a {} volume and volume {id} is a {} volume: restore it into a new volume",
                meta.backend.name(),
                current.map_or("", |k| k.name())
            )));
        }
        if current.is_none() {
            return self.restore_new(id, snap, &meta);
        }
        let (usage, _) = self.usage_of(id)?;
        let size = usage.size.max(meta.size);
        // The growth, and the copy made beside the volume's data until it
        // replaces it.
        let copy = self.snapshot_bytes(snap, &meta)?;
        self.need_space(id, (size - usage.size).saturating_add(copy))?;
        match meta.backend {
            Kind::Loop => {
                let disk = self.layout.disk(id);
                let new = disk.with_extension("img.restore");
                let _ = std::fs::remove_file(&new);
                let copied =
                    copy::copy_sparse(&self.layout.snapshot_img(snap), &new).and_then(|()| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&new)?
                            .set_len(size)
                    });
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&new);
                    return Err(VolumeError::io(&subject, "copying the snapshot to", &new)(
                        e,
                    ));
                }
                if let Err(e) = self.bring_down(id) {
                    let _ = std::fs::remove_file(&new);
                    self.bring_back(id);
                    return Err(e);
                }
                if let Err(e) = std::fs::rename(&new, &disk) {
                    let _ = std::fs::remove_file(&new);
                    self.bring_back(id);
                    return Err(VolumeError::io(&subject, "moving into place", &disk)(e));
                }
                // The data is the snapshot's now: a failure from here on
                // leaves the volume changed.
                let up = if size > meta.size {
                    self.grow_disk(id, size)
                } else {
                    self.bring_up(id)
                };
                if let Err(e) = up {
                    let mounted = self.mounted(id);
                    let e = VolumeError::RestoreIncomplete {
                        volume: id.into(),
                        snapshot: snap.into(),
                        failed: if mounted {
                            "its filesystem could not be grown back to the volume's size"
                        } else {
                            "it could not be mounted again"
                        },
                        then: if mounted {
                            "it is mounted, with the snapshot's size: check the node's log, then resize the volume again \
                             (to its size), or restore the snapshot again"
                        } else {
                            UNUSABLE
                        },
                        source: Box::new(e),
                    };
                    tracing::error!(error = %e, "restore failed after replacing the volume's data");
                    self.set_ready(id, if mounted { Ok(()) } else { Err(&e) });
                    return Err(e);
                }
                self.set_ready(id, Ok(()));
            }
            Kind::Directory => {
                let vol = self.layout.volume(id);
                let new = vol.join("mnt.restore");
                let _ = std::fs::remove_dir_all(&new);
                if let Err(e) = dir::copy_tree(&self.layout.snapshot_tree(snap), &new) {
                    let _ = std::fs::remove_dir_all(&new);
                    return Err(VolumeError::io(&subject, "copying the snapshot to", &new)(
                        e,
                    ));
                }
                let (mnt, old) = (self.layout.mnt(id), vol.join("mnt.old"));
                if let Err(e) = swap_in(&subject, &mnt, &new, &old) {
                    let _ = std::fs::remove_dir_all(&new);
                    if !mnt.is_dir() {
                        // Not even moved back: recovery will.
                        self.set_ready(id, Err(&e));
                    }
                    return Err(e);
                }
                // The data is the snapshot's now.
                let recorded = if size == usage.size {
                    Ok(())
                } else {
                    let path = self.layout.dir_meta(id);
                    write_json(&path, &DirMeta { size })
                        .map_err(VolumeError::io(&subject, "writing", path))
                };
                self.finish_dir_restore(id);
                if let Err(e) = recorded {
                    let e = VolumeError::RestoreIncomplete {
                        volume: id.into(),
                        snapshot: snap.into(),
                        failed: "its new size could not be recorded",
                        then: UNUSABLE,
                        source: Box::new(e),
                    };
                    tracing::error!(error = %e, "restore failed after replacing the volume's data");
                    self.set_ready(id, Err(&e));
                    return Err(e);
                }
                self.set_ready(id, Ok(()));
            }
        }
        tracing::info!(size, "volume restored");
        Ok(self.usage_of(id)?.0)
    }

    /// Restores `snap` into a volume `id` not on this node yet.
    fn restore_new(
        &self,
        id: &str,
        snap: &str,
        meta: &SnapshotMeta,
    ) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("volume {id}");
        // A tree may take more than its size.
        self.need_space(id, meta.size.max(self.snapshot_bytes(snap, meta)?))?;
        let final_dir = self.layout.volume(id);
        let _ = std::fs::remove_dir_all(&final_dir);
        let staging = self
            .layout
            .staging()
            .join(format!("{id}-{}", ulid::Ulid::new()));
        let made = std::fs::create_dir(&staging).and_then(|()| match meta.backend {
            Kind::Loop => {
                copy::copy_sparse(&self.layout.snapshot_img(snap), &staging.join("disk.img"))
            }
            Kind::Directory => {
                dir::copy_tree(&self.layout.snapshot_tree(snap), &staging.join("mnt")).and_then(
                    |()| write_json(&staging.join("volume.json"), &DirMeta { size: meta.size }),
                )
            }
        });
        if let Err(e) = made.and_then(|()| std::fs::rename(&staging, &final_dir)) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(VolumeError::io(
                &subject,
                "copying the snapshot to",
                &final_dir,
            )(e));
        }
        if meta.backend == Kind::Loop
            && let Err(e) = self.bring_up(id)
        {
            let _ = self.bring_down(id);
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e);
        }
        self.set_ready(id, Ok(()));
        tracing::info!(size = meta.size, "volume made from the snapshot");
        Ok(self.usage_of(id)?.0)
    }

    /// Bytes of disk a copy of `snap` takes.
    fn snapshot_bytes(&self, snap: &str, meta: &SnapshotMeta) -> Result<u64, VolumeError> {
        let subject = format!("snapshot {snap}");
        match meta.backend {
            Kind::Loop => {
                let img = self.layout.snapshot_img(snap);
                std::fs::metadata(&img)
                    .map(|m| copy::allocated(&m))
                    .map_err(VolumeError::io(&subject, "reading", img))
            }
            Kind::Directory => {
                let tree = self.layout.snapshot_tree(snap);
                dir::tree_size(&tree).map_err(VolumeError::io(&subject, "measuring", tree))
            }
        }
    }

    /// After a failed restore had brought `id` down, with its data
    /// unchanged: mounted again, or marked unusable with why.
    fn bring_back(&self, id: &str) {
        if let Err(e) = self.bring_up(id) {
            tracing::error!(error = %e, "volume cannot be mounted again after a failed restore");
            self.set_ready(id, Err(&e));
        }
    }

    /// Completes or undoes a directory restore interrupted between its
    /// renames: `mnt` back if missing, the copies removed.
    pub(super) fn finish_dir_restore(&self, id: &str) {
        let vol = self.layout.volume(id);
        let (mnt, old) = (self.layout.mnt(id), vol.join("mnt.old"));
        if !mnt.exists() && old.exists() {
            let _ = std::fs::rename(&old, &mnt);
        }
        for leftover in [old, vol.join("mnt.restore")] {
            if leftover.exists()
                && let Err(e) = std::fs::remove_dir_all(&leftover)
            {
                tracing::warn!(path = %leftover.display(), error = %e, "removing a restore's leftover");
            }
        }
    }

    fn delete_snapshot(&self, snap: &str) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("snapshot {snap}");
        let meta = self.snapshot_meta(snap).ok();
        let (img, tree, json) = (
            self.layout.snapshot_img(snap),
            self.layout.snapshot_tree(snap),
            self.layout.snapshot_meta(snap),
        );
        let absent = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        absent(std::fs::remove_file(&img)).map_err(VolumeError::io(&subject, "removing", &img))?;
        absent(std::fs::remove_dir_all(&tree))
            .map_err(VolumeError::io(&subject, "removing", &tree))?;
        absent(std::fs::remove_file(&json))
            .map_err(VolumeError::io(&subject, "removing", &json))?;
        tracing::info!("snapshot deleted");
        Ok(meta.as_ref().map_or_else(
            || VolumeUsage {
                volume: String::new(),
                size: 0,
                used: 0,
                backend: self.kind.name().into(),
            },
            meta_usage,
        ))
    }
}

/// A snapshot as a [`VolumeUsage`]: its volume, and that volume's size and
/// use when it was taken.
fn meta_usage(meta: &SnapshotMeta) -> VolumeUsage {
    VolumeUsage {
        volume: meta.volume.clone(),
        size: meta.size,
        used: meta.used,
        backend: meta.backend.name().into(),
    }
}

/// What to do about a volume left unusable by a restore.
const UNUSABLE: &str = "the volume is unusable until repaired: check the node's log, \
     then restore the snapshot again, or delete the volume";

/// Puts the tree `new` in place of `mnt`, which moves to `old`; `mnt` is
/// moved back if `new` cannot take its place.
fn swap_in(subject: &str, mnt: &Path, new: &Path, old: &Path) -> Result<(), VolumeError> {
    std::fs::rename(mnt, old).map_err(VolumeError::io(subject, "moving aside", mnt))?;
    if let Err(e) = std::fs::rename(new, mnt) {
        if let Err(back) = std::fs::rename(old, mnt) {
            tracing::error!(
                error = %back,
                from = %old.display(),
                "moving the volume's data back after a failed restore"
            );
        }
        return Err(VolumeError::io(subject, "moving into place", mnt)(e));
    }
    Ok(())
}

/// Removes a file or a tree, if there.
fn remove_any(path: &std::path::Path) {
    let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir_all(path));
}

#[cfg(test)]
mod tests {
    use super::swap_in;

    #[test]
    fn a_failed_swap_puts_the_data_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mnt, new, old) = (
            dir.path().join("mnt"),
            dir.path().join("mnt.restore"),
            dir.path().join("mnt.old"),
        );
        std::fs::create_dir(&mnt).unwrap();
        std::fs::write(mnt.join("data"), "v1").unwrap();
        // No new tree: the second rename fails.
        let err = swap_in("volume v", &mnt, &new, &old).unwrap_err();
        assert!(err.to_string().contains("moving into place"), "{err}");
        assert_eq!(std::fs::read_to_string(mnt.join("data")).unwrap(), "v1");
        assert!(!old.exists());

        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("data"), "v2").unwrap();
        swap_in("volume v", &mnt, &new, &old).unwrap();
        assert_eq!(std::fs::read_to_string(mnt.join("data")).unwrap(), "v2");
        assert_eq!(std::fs::read_to_string(old.join("data")).unwrap(), "v1");
        assert!(!new.exists());
    }
}
