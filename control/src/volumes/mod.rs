//! Volumes (SPEC §2, §4 `verge volumes`): persistent storage of one env on
//! one node, with snapshots kept on the same node.
//!
//! The store holds what the control plane knows ([`crate::store::VolumeRow`]);
//! the node holds the data. Every operation is a [`VolumeOp`] sent to the
//! volume's node on a stream of its session ([`node::ask`]), answered with
//! one `VolumeReply`; a snapshot restored into a new volume is exported by
//! its node and imported by the target node, the data relayed through this
//! control plane ([`node::copy_snapshot`]). The rules:
//!
//! - One operation per volume at a time: it is taken in a store mutation
//!   before the node is asked (so across replicas too), and given back when
//!   the node answered. A second one is refused as busy. An operation
//!   whose control plane stopped mid-way is taken for abandoned after
//!   [`ABANDONED_AFTER_MS`].
//! - A node that is offline, or connected to another replica, is not
//!   asked: the answer says so and nothing changes.
//! - The node's refusal is passed through, and changes nothing. An answer
//!   that never came leaves the outcome unknown: the volume says so in its
//!   `message` (and is `failed` when its data may be half-made).
//! - A volume attached to an instance ([`attachments`]) is neither
//!   deleted nor restored over.
//!
//! Each outcome is an event on the env's stream: `volume.created`,
//! `volume.resized`, `volume.snapshot`, `volume.restored`,
//! `volume.deleted`, `volume.snapshot_deleted`, `volume.failed`.

mod attach;
mod create;
mod delete;
pub mod node;
mod ops;
pub mod place;
mod snapshot;
mod view;

use std::collections::HashMap;

use verge_api::ErrorKind;
use verge_api::manifest::{format_size, human_size};
use verge_api::names;

use crate::cluster::Cluster;
use crate::scheduler::REGION;
use crate::store::{EnvScope, NewEvent, NodeRow, SnapshotRow, Store, StoreError, VolumeRow};
use crate::time::rfc3339;
pub use attach::{attached_instances, attachments};
use view::{copy_name, snapshot_api};

/// The smallest volume: ext4 needs room for its journal and metadata.
pub const MIN_SIZE: u64 = 16 << 20;
/// The largest volume.
pub const MAX_SIZE: u64 = 16 << 40;
/// An operation started this long ago (and not touched since) was
/// abandoned by its control plane: longer than any wait for a node.
pub const ABANDONED_AFTER_MS: i64 = node::OP_TIMEOUT.as_millis() as i64 + 60_000;
/// How often an unchanged heartbeat report is written anyway (`used_at`).
const USAGE_REFRESH_MS: i64 = 60_000;
/// A name the API's routes keep (`POST .../volumes/restore`).
const RESERVED: &str = "restore";

/// Why a volume operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Refused with an API error kind, a message and what to do next.
    #[error("{message}")]
    Refused {
        kind: ErrorKind,
        message: String,
        next: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VolumeError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> VolumeError {
        VolumeError::Refused {
            kind,
            message: message.into(),
            next: Vec::new(),
        }
    }

    /// Bad input (400): nothing changed.
    pub fn invalid(message: impl Into<String>) -> VolumeError {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> VolumeError {
        Self::new(ErrorKind::NotFound, message)
    }

    /// The volume's or the cluster's state does not allow it now (409).
    pub fn conflict(message: impl Into<String>) -> VolumeError {
        Self::new(ErrorKind::Conflict, message)
    }

    /// The node could not be asked, or did not answer (503).
    pub fn unavailable(message: impl Into<String>) -> VolumeError {
        Self::new(ErrorKind::Unavailable, message)
    }

    pub fn next(mut self, step: impl Into<String>) -> VolumeError {
        if let VolumeError::Refused { next, .. } = &mut self {
            next.push(step.into());
        }
        self
    }
}

type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Checks a volume name: the naming rule, and not the reserved one.
pub fn check_name(name: &str) -> Result<()> {
    names::validate("volume", name).map_err(VolumeError::invalid)?;
    if name == RESERVED {
        return Err(VolumeError::invalid(format!(
            "volume name {name:?} is reserved (the API restores snapshots at .../volumes/{name}): choose another"
        )));
    }
    Ok(())
}

/// Checks a size in bytes: between [`MIN_SIZE`] and [`MAX_SIZE`].
pub fn check_size(size: u64) -> Result<()> {
    if size < MIN_SIZE {
        return Err(VolumeError::invalid(format!(
            "size {} is too small: a volume needs at least {} (its ext4 filesystem needs room for \
             its journal and metadata)",
            shown(size),
            format_size(MIN_SIZE)
        ))
        .next(format!("pass --size {} or more", format_size(MIN_SIZE))));
    }
    if size > MAX_SIZE {
        return Err(VolumeError::invalid(format!(
            "size {} is too large: a volume holds at most {}",
            shown(size),
            format_size(MAX_SIZE)
        ))
        .next("use several volumes, or a smaller --size"));
    }
    Ok(())
}

/// A size as given: exact (`1Gi`, `1000000`) with its bytes when that is not obvious.
fn shown(bytes: u64) -> String {
    let exact = format_size(bytes);
    if exact == bytes.to_string() {
        format!("{bytes} bytes")
    } else {
        exact
    }
}

/// The operation running on `v` now, unless it was abandoned.
fn running_op(v: &VolumeRow, now: i64) -> Option<&str> {
    match (&v.op, v.op_started) {
        (Some(op), Some(t)) if now - t < ABANDONED_AFTER_MS => Some(op),
        _ => None,
    }
}

/// `resizing`, `snapshotting`, ...: what a busy volume is doing.
fn doing(op: &str) -> &'static str {
    match op {
        "create" => "creating",
        "resize" => "resizing",
        "snapshot" => "snapshotting",
        "restore" => "restoring",
        "delete" => "deleting",
        _ => "busy",
    }
}

/// Records a node's heartbeat report of its volumes; failures are logged
/// (the next heartbeat reports again).
pub async fn record_usage(store: &Store, node: &NodeRow, volumes: &[verge_api::wire::VolumeUsage]) {
    if let Err(e) = store
        .record_volume_usage(&node.id, volumes, USAGE_REFRESH_MS)
        .await
    {
        tracing::warn!(node = %node.id, error = %e, "recording the node's volume usage failed");
    }
}

/// The volumes of one env, as one caller acts on them.
#[derive(Debug, Clone)]
pub struct EnvVolumes {
    pub store: Store,
    pub cluster: Cluster,
    pub scope: EnvScope,
    /// Who asks, for events: `token-name (tok_...)`.
    pub actor: String,
}

/// Node names and regions by ID.
type NodeNames = HashMap<String, (String, Option<String>)>;

impl EnvVolumes {
    /// `--app A --env E`, for suggested commands.
    fn flags(&self) -> String {
        format!("--app {} --env {}", self.scope.app, self.scope.env)
    }

    /// `app/env`, as messages name the env.
    fn label(&self) -> String {
        format!("{}/{}", self.scope.app, self.scope.env)
    }

    fn event<'a>(&'a self, kind: &'a str, node_id: &'a str, message: String) -> NewEvent<'a> {
        NewEvent {
            org_id: Some(&self.scope.org_id),
            app_id: Some(&self.scope.app_id),
            env_id: Some(&self.scope.env_id),
            node_id: Some(node_id),
            kind,
            message,
            actor: Some(&self.actor),
            ..NewEvent::default()
        }
    }

    async fn node_names(&self) -> Result<NodeNames> {
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|n| {
                let labels: std::collections::BTreeMap<String, String> =
                    serde_json::from_str(&n.labels).unwrap_or_default();
                (n.id, (n.name, labels.get(REGION).cloned()))
            })
            .collect())
    }

    /// The env's volume `name`, or 404 naming the env's volumes.
    async fn named(&self, name: &str) -> Result<VolumeRow> {
        if names::validate("volume", name).is_ok()
            && let Some(v) = self.store.volume_by_name(&self.scope.env_id, name).await?
        {
            return Ok(v);
        }
        let all = self.store.volumes(&self.scope.env_id).await?;
        let err = VolumeError::not_found(format!("volume {name:?} not found in {}", self.label()));
        Err(if all.is_empty() {
            err.next(format!(
                "{} has no volumes: verge volumes create {name} --size 1Gi {}",
                self.label(),
                self.flags()
            ))
        } else {
            let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
            err.next(format!("volumes of {}: {}", self.label(), names.join(", ")))
        })
    }

    /// The env's snapshot `id`, or 404.
    async fn snapshot_row(&self, id: &str) -> Result<SnapshotRow> {
        self.store
            .snapshot(&self.scope.env_id, id)
            .await?
            .ok_or_else(|| {
                VolumeError::not_found(format!("snapshot {id:?} not found in {}", self.label()))
                    .next(format!("verge volumes snapshots VOLUME {}", self.flags()))
            })
    }

    /// The node of a volume or snapshot, when it is online; otherwise why
    /// nothing can be done now.
    async fn online_node(&self, node_id: &str, holds: &str) -> Result<NodeRow> {
        let Some(n) = self.store.node(node_id).await? else {
            return Err(VolumeError::conflict(format!(
                "the node that holds {holds} ({node_id}) is no longer part of the cluster"
            )));
        };
        if n.state != "online" {
            return Err(VolumeError::unavailable(format!(
                "node {} holds {holds} and is offline since {}: nothing was changed",
                n.name,
                rfc3339(n.state_since)
            ))
            .next(format!("retry when node {} is online again", n.name)));
        }
        Ok(n)
    }
}

/// Bytes as stored (`BIGINT`); sizes are capped far below `i64::MAX`.
fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `1Gi` / `23.5Gi`, for messages.
fn size_text(bytes: i64) -> String {
    human_size(bytes.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names_are_checked_with_the_fix() {
        assert!(check_size(16 << 20).is_ok());
        let err = check_size(1 << 20).unwrap_err().to_string();
        assert!(err.contains("size 1Mi is too small"), "{err}");
        assert!(err.contains("at least 16Mi"), "{err}");
        let err = check_size(1000).unwrap_err().to_string();
        assert!(err.contains("size 1000 bytes"), "{err}");
        let err = check_size(17 << 40).unwrap_err().to_string();
        assert!(err.contains("size 17Ti is too large"), "{err}");
        assert!(check_name("data").is_ok());
        let err = check_name("Data").unwrap_err().to_string();
        assert!(err.contains("volume name \"Data\""), "{err}");
        assert!(check_name("restore").is_err());
    }

    #[test]
    fn an_operation_is_abandoned_after_the_longest_wait() {
        let mut v = VolumeRow {
            id: "vol_1".into(),
            env_id: "e".into(),
            name: "data".into(),
            node_id: "n".into(),
            size: 1 << 30,
            state: "resizing".into(),
            used: None,
            used_at: None,
            backend: None,
            message: None,
            op: Some("resize".into()),
            op_started: Some(1_000),
            created_at: 0,
            updated_at: 0,
        };
        assert_eq!(running_op(&v, 2_000), Some("resize"));
        assert_eq!(running_op(&v, 1_000 + ABANDONED_AFTER_MS), None);
        v.op = None;
        assert_eq!(running_op(&v, 2_000), None);
        assert_eq!(doing("resize"), "resizing");
    }

    #[test]
    fn copy_names_stay_valid() {
        assert_eq!(copy_name("data"), "data-copy");
        let long = format!("a{}", "-b".repeat(40));
        let c = copy_name(&long);
        assert!(names::validate("volume", &c).is_ok(), "{c}");
    }
}
