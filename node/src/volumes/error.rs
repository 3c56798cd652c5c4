//! Why a volume operation failed: each variant names the volume or
//! snapshot, and says what to do when there is something to do.

use std::path::PathBuf;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "{what} ID {id:?} is not valid: use 1 to 128 letters, digits, '_' or '-' (and not \"snapshots\")"
    )]
    InvalidId { what: &'static str, id: String },
    #[error(
        "volume data ({volume}) is not on this node: it was not created here, was deleted, or the node lost its data dir; \
         restore it from a snapshot, or move the instance to the volume's node"
    )]
    NotHere { volume: String },
    #[error("volume {volume} is on this node but not usable: {reason}")]
    Unavailable { volume: String, reason: String },
    #[error(
        "volume {volume} is not mounted yet: the node is still recovering its volumes; try again shortly"
    )]
    NotReady { volume: String },
    #[error(
        "volume {volume} is mounted by instance {instance} on this node: stop that instance first (one instance mounts a volume at a time)"
    )]
    Claimed { volume: String, instance: String },
    #[error(
        "volume {volume} is stored as a directory (no loop devices on this node) and is mounted by instance {instance}: \
         stop the instance (scale to 0) and snapshot again; directory snapshots need the volume detached"
    )]
    DirectoryClaimed { volume: String, instance: String },
    #[error("volume {volume} is being {doing}: try again once that is done")]
    Busy { volume: String, doing: &'static str },
    #[error("volume {volume} already exists on this node with {size} bytes, not {requested}")]
    SizeMismatch {
        volume: String,
        size: u64,
        requested: u64,
    },
    #[error(
        "volume {volume} already exists on this node: delete it first, or import into a new volume ID"
    )]
    Exists { volume: String },
    #[error(
        "volume {volume} cannot shrink from {size} to {requested} bytes: volumes only grow (snapshot, create a smaller volume and copy the data instead)"
    )]
    Shrink {
        volume: String,
        size: u64,
        requested: u64,
    },
    #[error("volume {volume}: a size of 0 bytes is not a volume")]
    ZeroSize { volume: String },
    #[error(
        "volume {volume} needs {need} more bytes, but the node's volume disk has {free} free (less what existing volumes may still grow into): \
         free space on the node, or put the volume on another node"
    )]
    NoSpace {
        volume: String,
        need: u64,
        free: u64,
    },
    #[error("snapshot {snapshot} is not on this node (deleted, or taken on another node)")]
    SnapshotNotFound { snapshot: String },
    #[error(
        "snapshot {snapshot} already exists on this node, taken of volume {of}, not of {volume}"
    )]
    SnapshotExists {
        snapshot: String,
        of: String,
        volume: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "volume {volume}: its data was replaced by snapshot {snapshot}'s, but {failed}: {source}; {then}"
    )]
    RestoreIncomplete {
        volume: String,
        snapshot: String,
        /// What failed after the data was replaced.
        failed: &'static str,
        /// What that leaves, and what to do.
        then: &'static str,
        source: Box<VolumeError>,
    },
    #[error(
        "volume {volume}: growing it failed and left it unmounted: {source}; \
         the volume is unusable until repaired: check the node's log, then resize it again"
    )]
    ResizeUnmounted {
        volume: String,
        source: Box<VolumeError>,
    },
    #[error("volume {volume}: import failed: {reason}; nothing was kept, send it again")]
    Import { volume: String, reason: String },
    #[error("{subject}: `{command}` failed: {detail}")]
    Command {
        subject: String,
        command: String,
        detail: String,
    },
    #[error("{subject}: {action} {}: {source}", path.display())]
    Io {
        subject: String,
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{subject}: {action}: {source}")]
    Sys {
        subject: String,
        action: String,
        source: nix::Error,
    },
    #[error("{subject}: the stream broke: {source}")]
    Stream {
        subject: String,
        source: std::io::Error,
    },
    #[error("{subject}: the task doing it was lost: {detail}")]
    Task { subject: String, detail: String },
}

impl VolumeError {
    /// Whether the operation failed after it had changed the volume,
    /// leaving it unusable until repaired (not unchanged):
    /// [`verge_api::wire::VolumeReply::Failed::damaged`].
    pub fn damaged(&self) -> bool {
        matches!(
            self,
            VolumeError::RestoreIncomplete { .. } | VolumeError::ResizeUnmounted { .. }
        )
    }

    /// An I/O error on `path` while doing `action` for `subject` (a volume
    /// or snapshot, as "volume vol_x").
    pub(crate) fn io(
        subject: &str,
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> VolumeError {
        let subject = subject.to_string();
        let path = path.into();
        move |source| VolumeError::Io {
            subject,
            action,
            path,
            source,
        }
    }

    /// A failed system call while doing `action` for `subject`.
    pub(crate) fn sys(
        subject: &str,
        action: impl Into<String>,
    ) -> impl FnOnce(nix::Error) -> VolumeError {
        let subject = subject.to_string();
        let action = action.into();
        move |source| VolumeError::Sys {
            subject,
            action,
            source,
        }
    }
}
