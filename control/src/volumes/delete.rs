//! Deleting a volume (and, when asked, its snapshots) or one snapshot.

use verge_api::volumes::{Snapshot, Volume};
use verge_api::wire::VolumeOp;

use super::node::Outcome;
use super::ops::{failed, kept, not_asked, unchanged};
use super::{EnvVolumes, Result, VolumeError, attached_instances, size_text, snapshot_api};
use crate::store::SnapshotRow;

impl EnvVolumes {
    /// Deletes a volume from its node, and then, with `snapshots`, every
    /// snapshot taken of it; otherwise they stay. The volume as it was.
    pub async fn delete(&self, name: &str, snapshots: bool) -> Result<Volume> {
        let v = self.named(name).await?;
        self.idle(&v)?;
        if let Some(i) = attached_instances(&self.store, &self.scope.env_id)
            .await?
            .get(name)
        {
            return Err(self.attached(name, i, "deleted"));
        }
        let node = self
            .online_node(&v.node_id, &format!("volume {name}"))
            .await?;
        let mut before = self.present(&v).await?;
        let any = &[
            "ready",
            "failed",
            "creating",
            "resizing",
            "restoring",
            "deleting",
        ];
        let v = self.begin(&v, "delete", "deleting", any).await?;
        match self
            .ask(
                &node,
                VolumeOp::Delete {
                    volume: v.id.clone(),
                },
            )
            .await
        {
            Outcome::Done(_) => {}
            Outcome::NotAsked(why) => {
                self.finish(&v, unchanged(&v), None).await?;
                return Err(not_asked(&why, &node));
            }
            Outcome::Failed(why) => {
                let message = format!("deleting volume {name} failed: {why}");
                self.finish(
                    &v,
                    kept(&v.state, &message),
                    Some(("volume.failed", message)),
                )
                .await?;
                return Err(VolumeError::conflict(why));
            }
            Outcome::Unknown(why) => {
                let message =
                    format!("deleting volume {name} was not confirmed: {why}; delete it again");
                self.finish(
                    &v,
                    failed(&message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                return Err(VolumeError::unavailable(message)
                    .next(format!("verge volumes delete {name} {}", self.flags())));
            }
        }
        let own: Vec<SnapshotRow> = self
            .store
            .snapshots(&self.scope.env_id, Some(name))
            .await?
            .into_iter()
            .filter(|s| s.volume_id == v.id)
            .collect();
        let stay = if snapshots || own.is_empty() {
            String::new()
        } else {
            let kept = match own.len() {
                1 => "snapshot stays".to_string(),
                n => format!("{n} snapshots stay"),
            };
            format!("; its {kept} (verge volumes snapshots {name})")
        };
        let message = format!(
            "volume {name} ({}) deleted from node {}{stay}",
            size_text(v.size),
            node.name
        );
        let mut tx = self.store.mutation().await?;
        tx.delete_volume(&v.id).await?;
        tx.emit(self.event("volume.deleted", &v.node_id, message))
            .await?;
        tx.commit().await?;
        tracing::info!(volume = %v.id, "volume deleted");
        before.state = "deleted".into();
        before.attached_to = None;
        before.operations = Vec::new();
        if snapshots {
            let mut left = Vec::new();
            for s in &own {
                if let Err(e) = self.drop_snapshot(s).await {
                    left.push(format!("{}: {e}", s.id));
                }
            }
            if !left.is_empty() {
                return Err(VolumeError::unavailable(format!(
                    "volume {name} was deleted, but {} of its snapshots were not: {}",
                    left.len(),
                    left.join("; ")
                ))
                .next(format!("verge volumes delete-snapshot ID {}", self.flags())));
            }
            before.snapshots.clear();
        }
        Ok(before)
    }

    /// Deletes one snapshot from its node.
    pub async fn delete_snapshot(&self, id: &str) -> Result<Snapshot> {
        let snap = self.snapshot_row(id).await?;
        self.drop_snapshot(&snap).await?;
        let nodes = self.node_names().await?;
        Ok(snapshot_api(&snap, &nodes))
    }

    async fn drop_snapshot(&self, snap: &SnapshotRow) -> Result<()> {
        let id = &snap.id;
        let node = self
            .online_node(&snap.node_id, &format!("snapshot {id}"))
            .await?;
        let op = VolumeOp::DeleteSnapshot {
            snapshot: id.clone(),
        };
        match self.ask(&node, op).await {
            Outcome::Done(_) => {
                let message = format!(
                    "snapshot {id} of volume {} deleted from node {}",
                    snap.volume_name, node.name
                );
                let mut tx = self.store.mutation().await?;
                tx.delete_snapshot(id).await?;
                tx.emit(self.event("volume.snapshot_deleted", &snap.node_id, message))
                    .await?;
                tx.commit().await?;
                Ok(())
            }
            Outcome::NotAsked(why) => Err(not_asked(&why, &node)),
            Outcome::Failed(why) => {
                let message = format!("deleting snapshot {id} failed: {why}");
                self.emit("volume.failed", &snap.node_id, message).await?;
                Err(VolumeError::conflict(why))
            }
            Outcome::Unknown(why) => {
                let message =
                    format!("deleting snapshot {id} was not confirmed: {why}; delete it again");
                self.emit("volume.failed", &snap.node_id, message.clone())
                    .await?;
                Err(VolumeError::unavailable(message))
            }
        }
    }
}
