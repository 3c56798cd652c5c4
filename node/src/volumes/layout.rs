//! Where volumes and snapshots live under `<data dir>/volumes`, and the
//! small JSON records kept beside them.
//!
//! ```text
//! volumes/<volume>/disk.img          loop: sparse file holding an ext4 filesystem
//! volumes/<volume>/mnt/              loop: its mount point; directory: the data
//! volumes/<volume>/volume.json       directory: the recorded size
//! volumes/snapshots/<snap>.img       loop: sparse copy of disk.img
//! volumes/snapshots/<snap>.tree/     directory: copy of the tree
//! volumes/snapshots/<snap>.json      what the snapshot is of
//! volumes/.staging/                  volumes being made (import, create): removed at start
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory under `volumes/` holding snapshots: never a volume ID.
const SNAPSHOTS: &str = "snapshots";

/// How a volume is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An ext4 filesystem in `disk.img`, mounted through a loop device.
    Loop,
    /// A plain directory.
    Directory,
}

impl Kind {
    /// As in [`verge_api::wire::VolumeUsage::backend`].
    pub fn name(self) -> &'static str {
        match self {
            Kind::Loop => "loop",
            Kind::Directory => "directory",
        }
    }
}

/// What a snapshot is of (`<snap>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub volume: String,
    /// The volume's size when taken.
    pub size: u64,
    /// Bytes in use when taken.
    pub used: u64,
    pub backend: Kind,
    /// Seconds since the epoch.
    pub created_unix: u64,
}

/// The directory backend's record of a volume's size (`volume.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirMeta {
    pub size: u64,
}

/// Paths under `<data dir>/volumes`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn volume(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }
    pub fn disk(&self, id: &str) -> PathBuf {
        self.volume(id).join("disk.img")
    }
    pub fn mnt(&self, id: &str) -> PathBuf {
        self.volume(id).join("mnt")
    }
    pub fn dir_meta(&self, id: &str) -> PathBuf {
        self.volume(id).join("volume.json")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join(SNAPSHOTS)
    }
    pub fn snapshot_img(&self, snap: &str) -> PathBuf {
        self.snapshots().join(format!("{snap}.img"))
    }
    pub fn snapshot_tree(&self, snap: &str) -> PathBuf {
        self.snapshots().join(format!("{snap}.tree"))
    }
    pub fn snapshot_meta(&self, snap: &str) -> PathBuf {
        self.snapshots().join(format!("{snap}.json"))
    }
    pub fn staging(&self) -> PathBuf {
        self.root.join(".staging")
    }

    /// How volume `id` is stored, from what its directory holds; `None`
    /// when there is no such volume (or only an unfinished one).
    pub fn kind(&self, id: &str) -> Option<Kind> {
        if self.disk(id).is_file() {
            Some(Kind::Loop)
        } else if self.dir_meta(id).is_file() && self.mnt(id).is_dir() {
            Some(Kind::Directory)
        } else {
            None
        }
    }

    /// The IDs of the volumes here (directories named like volume IDs).
    pub fn volume_ids(&self) -> std::io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if let Some(name) = entry.file_name().to_str().filter(|n| valid_id(n)) {
                ids.push(name.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Volume and snapshot IDs become file names: 1 to 128 of `[A-Za-z0-9_-]`,
/// never the snapshots directory.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id != SNAPSHOTS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Writes `value` as JSON to `path` atomically (a temporary file renamed
/// over it, synced).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads JSON written by [`write_json`].
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn ids_are_safe_file_names() {
        assert!(valid_id("vol_01JBX0Z8"));
        assert!(valid_id("snap-1"));
        for bad in [
            "",
            "snapshots",
            ".staging",
            "a/b",
            "..",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
