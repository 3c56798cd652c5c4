//! Volumes as the API shows them (`verge volumes ...`, SPEC §2, §4).
//!
//! A volume is persistent storage of one env, with a size, on one node: it
//! pins the instance that mounts it to that node. One instance at a time
//! mounts it. Its snapshots are point-in-time copies kept on the same node;
//! a snapshot restores into its own volume or into a new one, on the same
//! node or (copied through the control plane) on another.

use serde::{Deserialize, Serialize};

/// A volume in `verge volumes list` / `describe`. The first five fields are
/// the SPEC §4 JSON contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// The node's name.
    pub node: String,
    /// The instance it is attached to (mounted by, or about to be).
    pub attached_to: Option<String>,
    /// `creating`, `ready`, `resizing`, `restoring`, `deleting` or `failed`.
    pub state: String,
    pub id: String,
    pub node_id: String,
    pub app: String,
    pub env: String,
    /// The node's `region` label, when it has one.
    pub region: Option<String>,
    /// Bytes in use, as the node last reported them.
    pub used: Option<u64>,
    /// Whether the node enforces the size (`loop`: an ext4 filesystem of
    /// that size; `directory`: the fallback without loop devices, which
    /// enforces nothing).
    pub backend: Option<String>,
    /// Why the volume is `failed`, or what its last operation could not do.
    pub message: Option<String>,
    pub created_at: String,
    pub snapshots: Vec<Snapshot>,
    /// The commands for what can be done next (resize, snapshot, restore).
    #[serde(default)]
    pub operations: Vec<String>,
}

/// A point-in-time copy of a volume, kept on the volume's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    /// The volume it was taken of.
    pub volume: String,
    pub node: String,
    /// The volume's size when it was taken (bytes).
    pub size: u64,
    /// Bytes the volume had in use when it was taken.
    pub used: Option<u64>,
    pub created_at: String,
}

/// `POST .../envs/{env}/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Only nodes with this `region` label.
    #[serde(default)]
    pub region: Option<String>,
    /// This node (name or ID).
    #[serde(default)]
    pub node: Option<String>,
}

/// `POST .../volumes/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    /// The new size in bytes: larger than the current one.
    pub size: u64,
}

/// `POST .../volumes/restore`: a snapshot back into its volume (`into`
/// absent or the volume's name: the volume must not be attached) or into a
/// new volume `into`, on the snapshot's node or on `node`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSnapshot {
    pub snapshot: String,
    #[serde(default)]
    pub into: Option<String>,
    /// For a new volume: the node (name or ID); default the snapshot's.
    #[serde(default)]
    pub node: Option<String>,
}
