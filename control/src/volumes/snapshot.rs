//! Snapshots: taking one, and restoring one over its volume's data or
//! into a new volume (copied between nodes when it goes to another).

use verge_api::manifest::human_size;
use verge_api::volumes::{RestoreSnapshot, Snapshot, Volume};
use verge_api::wire::VolumeOp;

use super::node::{self, Outcome};
use super::ops::{done, failed, kept, log_outcome, not_asked, unchanged};
use super::place::{self, Candidate};
use super::{EnvVolumes, Result, VolumeError, attached_instances, bytes, check_name, snapshot_api};
use crate::store::{OpEnd, SnapshotRow, VolumeRow};
use crate::time::{now_ms, rfc3339};

impl EnvVolumes {
    /// A point-in-time copy of a volume, kept on its node.
    pub async fn snapshot(&self, name: &str) -> Result<Snapshot> {
        let v = self.named(name).await?;
        self.idle(&v)?;
        let node = self
            .online_node(&v.node_id, &format!("volume {name}"))
            .await?;
        let v = self.begin(&v, "snapshot", "ready", &["ready"]).await?;
        let id = crate::store::new_snapshot_id();
        let op = VolumeOp::Snapshot {
            volume: v.id.clone(),
            snapshot: id.clone(),
        };
        match self.ask(&node, op).await {
            Outcome::Done(u) => {
                let row = SnapshotRow {
                    id: id.clone(),
                    volume_id: v.id.clone(),
                    volume_name: v.name.clone(),
                    env_id: v.env_id.clone(),
                    node_id: v.node_id.clone(),
                    size: bytes(u.size),
                    used: Some(bytes(u.used)),
                    created_at: now_ms(),
                };
                let message = format!(
                    "snapshot {id} of volume {name} taken on node {} ({} used of {})",
                    node.name,
                    human_size(u.used),
                    human_size(u.size)
                );
                let mut tx = self.store.mutation().await?;
                tx.end_volume_op(
                    &v.id,
                    &OpEnd {
                        state: "ready",
                        ..OpEnd::default()
                    },
                )
                .await?;
                tx.insert_snapshot(&row).await?;
                tx.emit(self.event("volume.snapshot", &v.node_id, message))
                    .await?;
                tx.commit().await?;
                let nodes = self.node_names().await?;
                Ok(snapshot_api(&row, &nodes))
            }
            Outcome::NotAsked(why) => {
                self.finish(&v, unchanged(&v), None).await?;
                Err(not_asked(&why, &node))
            }
            Outcome::Failed(why) => {
                let message = format!("snapshot of volume {name} failed: {why}");
                self.finish(
                    &v,
                    kept("ready", &message),
                    Some(("volume.failed", message)),
                )
                .await?;
                Err(VolumeError::conflict(why))
            }
            Outcome::Unknown(why) => {
                let message = format!(
                    "snapshot {id} of volume {name} was not confirmed: {why}; take another"
                );
                self.finish(
                    &v,
                    kept("ready", &message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                Err(VolumeError::unavailable(message)
                    .next(format!("verge volumes snapshot {name} {}", self.flags())))
            }
        }
    }

    /// Restores a snapshot into an existing volume of its node (its data
    /// replaced) or into a new volume; true when a new one was made.
    pub async fn restore(&self, req: &RestoreSnapshot) -> Result<(Volume, bool)> {
        let snap = self.snapshot_row(&req.snapshot).await?;
        let target = req.into.clone().unwrap_or_else(|| snap.volume_name.clone());
        check_name(&target)?;
        match self
            .store
            .volume_by_name(&self.scope.env_id, &target)
            .await?
        {
            Some(v) => {
                if req.node.is_some() {
                    return Err(VolumeError::invalid(format!(
                        "a node is for a restore into a new volume; volume {target} exists, so \
                         snapshot {} would replace its data on its own node",
                        snap.id
                    ))
                    .next(format!(
                        "verge volumes restore {} --to NEW-NAME --node NODE {}",
                        snap.id,
                        self.flags()
                    )));
                }
                Ok((self.restore_in_place(&snap, v).await?, false))
            }
            None => Ok((
                self.restore_new(&snap, &target, req.node.as_deref())
                    .await?,
                true,
            )),
        }
    }

    async fn restore_in_place(&self, snap: &SnapshotRow, v: VolumeRow) -> Result<Volume> {
        let name = v.name.clone();
        self.idle(&v)?;
        if v.node_id != snap.node_id {
            let nodes = self.node_names().await?;
            let node_name = |id: &str| nodes.get(id).map_or(id.to_string(), |(n, _)| n.clone());
            return Err(VolumeError::conflict(format!(
                "snapshot {} is on node {} and volume {name} on node {}: a snapshot restores in \
                 place only on its own node",
                snap.id,
                node_name(&snap.node_id),
                node_name(&v.node_id)
            ))
            .next(format!(
                "restore it into a new volume: verge volumes restore {} --to NEW-NAME [--node NODE] {}",
                snap.id,
                self.flags()
            )));
        }
        if let Some(i) = attached_instances(&self.store, &self.scope.env_id)
            .await?
            .get(&name)
        {
            return Err(self.attached(&name, i, "restored over").next(format!(
                "or restore into a new volume: verge volumes restore {} --to {} {}",
                snap.id,
                super::copy_name(&name),
                self.flags()
            )));
        }
        let node = self
            .online_node(&v.node_id, &format!("volume {name}"))
            .await?;
        let v = self
            .begin(&v, "restore", "restoring", &["ready", "failed"])
            .await?;
        let op = VolumeOp::Restore {
            volume: v.id.clone(),
            snapshot: snap.id.clone(),
        };
        let taken = rfc3339(snap.created_at);
        match self.ask(&node, op).await {
            Outcome::Done(u) => {
                let message = format!(
                    "volume {name} restored from snapshot {} (taken {taken}) on node {}",
                    snap.id, node.name
                );
                self.finish(&v, done("ready", &u), Some(("volume.restored", message)))
                    .await?;
                self.present_by_name(&name).await
            }
            Outcome::NotAsked(why) => {
                self.finish(&v, unchanged(&v), None).await?;
                Err(not_asked(&why, &node))
            }
            Outcome::Failed(why) => {
                let message = format!(
                    "restoring volume {name} from snapshot {} failed: {why}",
                    snap.id
                );
                self.finish(
                    &v,
                    kept(&v.state, &message),
                    Some(("volume.failed", message)),
                )
                .await?;
                Err(VolumeError::conflict(format!(
                    "{why}; the volume is unchanged"
                )))
            }
            Outcome::Unknown(why) => {
                let message = format!(
                    "restoring volume {name} from snapshot {} was not confirmed: {why}; its data \
                     is unknown: restore again, or delete it",
                    snap.id
                );
                self.finish(
                    &v,
                    failed(&message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                Err(VolumeError::unavailable(message).next(format!(
                    "verge volumes restore {} {}",
                    snap.id,
                    self.flags()
                )))
            }
        }
    }

    async fn restore_new(
        &self,
        snap: &SnapshotRow,
        name: &str,
        node: Option<&str>,
    ) -> Result<Volume> {
        let what = format!("snapshot {}", snap.id);
        let source = self.online_node(&snap.node_id, &what).await?;
        let target = match node {
            None => source.clone(),
            Some(want) => {
                let Some(n) = self
                    .store
                    .nodes()
                    .await?
                    .into_iter()
                    .find(|n| n.name == want || n.id == want)
                else {
                    return Err(VolumeError::not_found(format!(
                        "node {want:?} not found in the cluster"
                    ))
                    .next(format!(
                        "omit --node to restore on node {}, the snapshot's",
                        source.name
                    )));
                };
                n
            }
        };
        let size = snap.size.max(0) as u64;
        let pending = self.pending_on(&target.id).await?;
        place::choose(&[Candidate::of(&target, pending)], size, None).map_err(|why| {
            VolumeError::conflict(format!(
                "node {} cannot take volume {name} ({}): {why}",
                target.name,
                human_size(size)
            ))
        })?;
        let row = self
            .insert(name, &target, snap.size, "restoring", "restore")
            .await?;
        tracing::info!(
            volume = %row.id, snapshot = %snap.id, from = %source.name, to = %target.name,
            "restoring a snapshot into a new volume"
        );
        // On the snapshot's own node the node copies it locally (the only
        // way for directory-backed volumes); elsewhere the data is relayed.
        let outcome = if source.id == target.id {
            let op = VolumeOp::Restore {
                volume: row.id.clone(),
                snapshot: snap.id.clone(),
            };
            node::ask(&self.cluster, &target, op).await
        } else {
            node::copy_snapshot(
                &self.cluster,
                &self.store,
                (&source, &snap.id),
                (&target, &row.id),
            )
            .await
        };
        log_outcome("copy_snapshot", &target, &outcome);
        match outcome {
            Outcome::Done(u) => {
                let message = format!(
                    "snapshot {} of volume {} restored into new volume {name} ({}) on node {}{}",
                    snap.id,
                    snap.volume_name,
                    human_size(u.size),
                    target.name,
                    if source.id == target.id {
                        String::new()
                    } else {
                        format!(" (copied from node {})", source.name)
                    }
                );
                self.finish(&row, done("ready", &u), Some(("volume.restored", message)))
                    .await?;
                self.present_by_name(name).await
            }
            Outcome::NotAsked(why) => {
                self.forget(&row, None).await?;
                Err(
                    VolumeError::unavailable(format!("{why}; nothing was changed")).next(
                        "retry when both nodes are online and connected to the control plane",
                    ),
                )
            }
            Outcome::Failed(why) => {
                let message = format!(
                    "restoring snapshot {} into new volume {name} on node {} failed: {why}",
                    snap.id, target.name
                );
                self.forget(&row, Some(message)).await?;
                Err(VolumeError::conflict(format!("{why}; nothing was created")))
            }
            Outcome::Unknown(why) => {
                let message = format!(
                    "restoring snapshot {} into new volume {name} on node {} was not confirmed: \
                     {why}; delete this volume and restore again",
                    snap.id, target.name
                );
                self.finish(
                    &row,
                    failed(&message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                Err(VolumeError::unavailable(message)
                    .next(format!("verge volumes delete {name} {}", self.flags())))
            }
        }
    }
}
