//! What every operation that changes a volume shares: taking the
//! volume's operation slot ([`EnvVolumes::begin`]), asking the node
//! ([`EnvVolumes::ask`]), recording the outcome with an event
//! ([`EnvVolumes::finish`]), and the refusals they have in common. The
//! operations are in `create.rs`, `snapshot.rs` and `delete.rs`; the
//! rules in the module above.

use verge_api::volumes::Volume;
use verge_api::wire::VolumeOp;

use super::node::{self, Outcome};
use super::place::Candidate;
use super::{EnvVolumes, Result, VolumeError, bytes, doing, running_op, size_text};
use crate::store::{NewVolume, NodeRow, OpEnd, StoreError, VolumeRow};
use crate::time::now_ms;

impl EnvVolumes {
    /// Asks the node, with a log line of the outcome.
    pub(super) async fn ask(&self, node: &NodeRow, op: VolumeOp) -> Outcome {
        let name = op.name();
        let outcome = node::ask(&self.cluster, node, op).await;
        log_outcome(name, node, &outcome);
        outcome
    }

    /// Refuses when another operation runs on the volume.
    pub(super) fn idle(&self, v: &VolumeRow) -> Result<()> {
        match running_op(v, now_ms()) {
            Some(op) => Err(self.busy(&v.name, op)),
            None => Ok(()),
        }
    }

    pub(super) fn busy(&self, name: &str, op: &str) -> VolumeError {
        VolumeError::conflict(format!(
            "volume {name} is busy ({}); try again when it is ready",
            doing(op)
        ))
        .next(format!("verge volumes describe {name} {}", self.flags()))
    }

    pub(super) fn attached(
        &self,
        name: &str,
        i: &crate::store::InstanceRow,
        done: &str,
    ) -> VolumeError {
        let w = &i.workload;
        VolumeError::conflict(format!(
            "volume {name} is attached to instance {} of workload {w}: it cannot be {done} while mounted",
            i.id
        ))
        .next(format!(
            "detach it: deploy without the mount of {name} in workload {w}, or scale it to 0 (`verge scale {w}=0 {}`), then try again",
            self.flags()
        ))
    }

    pub(super) fn exists(&self, v: &VolumeRow) -> VolumeError {
        VolumeError::conflict(format!(
            "volume {} already exists in {} ({}, {})",
            v.name,
            self.label(),
            size_text(v.size),
            v.state
        ))
        .next(format!(
            "verge volumes describe {} {}",
            v.name,
            self.flags()
        ))
    }

    /// Takes the volume's operation slot for `op`, moving it to `state`;
    /// refused when another operation runs or its state is not one of
    /// `from`. The row as it is now.
    pub(super) async fn begin(
        &self,
        v: &VolumeRow,
        op: &str,
        state: &str,
        from: &[&str],
    ) -> Result<VolumeRow> {
        let mut tx = self.store.mutation().await?;
        let Some(now) = tx.volume(&v.id).await? else {
            return Err(VolumeError::conflict(format!(
                "volume {} was deleted meanwhile",
                v.name
            )));
        };
        if let Some(running) = running_op(&now, now_ms()) {
            return Err(self.busy(&now.name, running));
        }
        if !from.contains(&now.state.as_str()) {
            return Err(self.wrong_state(&now, op));
        }
        tx.start_volume_op(&now.id, op, state).await?;
        tx.commit().await?;
        Ok(now)
    }

    pub(super) fn wrong_state(&self, v: &VolumeRow, op: &str) -> VolumeError {
        let name = &v.name;
        let flags = self.flags();
        let why = v
            .message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default();
        match v.state.as_str() {
            "failed" => VolumeError::conflict(format!(
                "volume {name} is failed{why}: it can be restored from a snapshot or deleted, not {}",
                doing(op)
            ))
            .next(format!("verge volumes delete {name} {flags}")),
            "creating" => VolumeError::conflict(format!(
                "volume {name} was never finished: its creation was abandoned; delete it and create it again"
            ))
            .next(format!("verge volumes delete {name} {flags}")),
            other => VolumeError::conflict(format!(
                "volume {name} is {other}: it cannot be {} now",
                match op {
                    "snapshot" => "snapshotted".to_string(),
                    op => format!("{op}d"),
                }
            ))
            .next(format!("verge volumes describe {name} {flags}")),
        }
    }

    /// Ends the volume's operation, with an event.
    pub(super) async fn finish(
        &self,
        v: &VolumeRow,
        end: OpEnd<'_>,
        event: Option<(&str, String)>,
    ) -> Result<()> {
        let mut tx = self.store.mutation().await?;
        tx.end_volume_op(&v.id, &end).await?;
        if let Some((kind, message)) = event {
            tx.emit(self.event(kind, &v.node_id, message)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes a volume the node never made, with a `volume.failed` event
    /// when the node refused.
    pub(super) async fn forget(&self, v: &VolumeRow, failure: Option<String>) -> Result<()> {
        let mut tx = self.store.mutation().await?;
        tx.delete_volume(&v.id).await?;
        if let Some(message) = failure {
            tx.emit(self.event("volume.failed", &v.node_id, message))
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn emit(&self, kind: &str, node_id: &str, message: String) -> Result<()> {
        let mut tx = self.store.mutation().await?;
        tx.emit(self.event(kind, node_id, message)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A new volume row with its first operation running.
    pub(super) async fn insert(
        &self,
        name: &str,
        node: &NodeRow,
        size: i64,
        state: &str,
        op: &str,
    ) -> Result<VolumeRow> {
        let mut tx = self.store.mutation().await?;
        let new = NewVolume {
            env_id: &self.scope.env_id,
            name,
            node_id: &node.id,
            size,
            state,
            op,
        };
        let row = match tx.insert_volume(&new).await {
            Ok(row) => row,
            Err(StoreError::Conflict) => {
                drop(tx);
                let existing = self.store.volume_by_name(&self.scope.env_id, name).await?;
                return Err(match existing {
                    Some(v) => self.exists(&v),
                    None => VolumeError::conflict(format!(
                        "volume {name} was being created by another request; try again"
                    )),
                });
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(row)
    }

    pub(super) async fn present_by_name(&self, name: &str) -> Result<Volume> {
        let v = self.named(name).await?;
        self.present(&v).await
    }

    /// Bytes of the node's volumes made since its last heartbeat.
    pub(super) async fn pending_on(&self, node_id: &str) -> Result<u64> {
        Ok(self
            .store
            .volume_bytes_since_heartbeat()
            .await?
            .into_iter()
            .find(|(id, _)| id == node_id)
            .map_or(0, |(_, b)| b.max(0) as u64))
    }

    /// What the node has free for volumes, when it reported it.
    pub(super) async fn free_on(&self, node: &NodeRow) -> Result<Option<u64>> {
        let pending = self.pending_on(&node.id).await?;
        Ok(Candidate::of(node, pending).free)
    }
}

/// The end of an operation the node did: its report of the volume.
pub(super) fn done<'a>(state: &'a str, u: &'a verge_api::wire::VolumeUsage) -> OpEnd<'a> {
    OpEnd {
        state,
        size: Some(bytes(u.size)),
        used: Some(bytes(u.used)),
        backend: Some(&u.backend),
        message: None,
    }
}

/// The end of an operation the node was never asked for: as before.
pub(super) fn unchanged(v: &VolumeRow) -> OpEnd<'_> {
    OpEnd {
        state: &v.state,
        message: v.message.clone(),
        ..OpEnd::default()
    }
}

/// The end of an operation that left the volume in `state`, saying why.
pub(super) fn kept<'a>(state: &'a str, message: &str) -> OpEnd<'a> {
    OpEnd {
        state,
        message: Some(message.to_string()),
        ..OpEnd::default()
    }
}

/// The end of an operation that may have left the volume half-made.
pub(super) fn failed(message: &str) -> OpEnd<'static> {
    OpEnd {
        state: "failed",
        message: Some(message.to_string()),
        ..OpEnd::default()
    }
}

/// A node that could not be asked: nothing changed, and when to retry.
pub(super) fn not_asked(why: &str, node: &NodeRow) -> VolumeError {
    VolumeError::unavailable(format!("{why}; nothing was changed")).next(format!(
        "retry when node {} is online and connected",
        node.name
    ))
}

pub(super) fn log_outcome(op: &str, node: &NodeRow, outcome: &Outcome) {
    match outcome {
        Outcome::Done(u) => {
            tracing::info!(op, node = %node.name, size = u.size, used = u.used, backend = %u.backend, "volume operation done");
        }
        Outcome::NotAsked(why) => {
            tracing::info!(op, node = %node.name, %why, "volume operation not sent")
        }
        Outcome::Failed(why) => {
            tracing::info!(op, node = %node.name, %why, "volume operation refused by the node")
        }
        Outcome::Unknown(why) => {
            tracing::warn!(op, node = %node.name, %why, "volume operation outcome unknown")
        }
    }
}
