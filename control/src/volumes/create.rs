//! Making a volume (on the node it is placed on) and growing it.

use std::collections::HashMap;

use verge_api::manifest::human_size;
use verge_api::names;
use verge_api::volumes::{CreateVolume, ResizeVolume, Volume};
use verge_api::wire::VolumeOp;

use super::node::Outcome;
use super::ops::{done, failed, kept, not_asked, unchanged};
use super::place::{self, Candidate};
use super::{EnvVolumes, Result, VolumeError, bytes, check_name, check_size, size_text};
use crate::scheduler::REGION;
use crate::store::NodeRow;

impl EnvVolumes {
    /// A new volume on the node `req` names, or on the online node (of
    /// its region) with the most free space.
    pub async fn create(&self, req: &CreateVolume) -> Result<Volume> {
        check_name(&req.name)?;
        check_size(req.size)?;
        if let Some(r) = &req.region {
            names::label(REGION, r).map_err(VolumeError::invalid)?;
        }
        if req.region.is_some() && req.node.is_some() {
            return Err(VolumeError::invalid(
                "give a region or a node, not both: a node has its own region",
            ));
        }
        if let Some(v) = self
            .store
            .volume_by_name(&self.scope.env_id, &req.name)
            .await?
        {
            return Err(self.exists(&v));
        }
        let node = self.place(req).await?;
        let row = self
            .insert(&req.name, &node, bytes(req.size), "creating", "create")
            .await?;
        let what = format!("volume {} ({})", req.name, human_size(req.size));
        tracing::info!(volume = %row.id, node = %node.name, size = req.size, "creating volume");
        let op = VolumeOp::Create {
            volume: row.id.clone(),
            size: req.size,
        };
        match self.ask(&node, op).await {
            Outcome::Done(u) => {
                let message = format!(
                    "{what} created on node {} ({} backend)",
                    node.name, u.backend
                );
                self.finish(&row, done("ready", &u), Some(("volume.created", message)))
                    .await?;
                self.present_by_name(&req.name).await
            }
            Outcome::NotAsked(why) => {
                self.forget(&row, None).await?;
                Err(not_asked(&why, &node))
            }
            Outcome::Failed(why) => {
                let message = format!("creating {what} on node {} failed: {why}", node.name);
                self.forget(&row, Some(message)).await?;
                Err(
                    VolumeError::conflict(format!("{why}; nothing was created")).next(format!(
                        "verge volumes create {} --size SIZE --node NODE {}  (another node)",
                        req.name,
                        self.flags()
                    )),
                )
            }
            Outcome::Unknown(why) => {
                let message = format!(
                    "creating {what} on node {} was not confirmed: {why}; it may exist there \
                     or not: delete this volume and create it again",
                    node.name
                );
                self.finish(
                    &row,
                    failed(&message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                Err(VolumeError::unavailable(message).next(format!(
                    "verge volumes delete {} {}",
                    req.name,
                    self.flags()
                )))
            }
        }
    }

    /// The node for a new volume: the named one if it fits, else the best
    /// that fits; otherwise why none does.
    async fn place(&self, req: &CreateVolume) -> Result<NodeRow> {
        let rows = self.store.nodes().await?;
        let pending: HashMap<String, i64> = self
            .store
            .volume_bytes_since_heartbeat()
            .await?
            .into_iter()
            .collect();
        let pending_of = |id: &str| pending.get(id).copied().unwrap_or(0).max(0) as u64;
        let mut pool: Vec<Candidate> = rows
            .iter()
            .map(|n| Candidate::of(n, pending_of(&n.id)))
            .collect();
        if let Some(want) = &req.node {
            pool.retain(|c| &c.name == want || &c.id == want);
            if pool.is_empty() {
                return Err(VolumeError::not_found(format!(
                    "node {want:?} not found in the cluster"
                ))
                .next("omit --node to let the control plane choose")
                .next("verge nodes list  (cluster admins)"));
            }
        }
        let chosen = place::choose(&pool, req.size, req.region.as_deref()).map_err(|why| {
            VolumeError::conflict(format!(
                "no node can take volume {} ({}): {why}",
                req.name,
                human_size(req.size)
            ))
        })?;
        Ok(rows
            .into_iter()
            .find(|n| n.id == chosen.id)
            .expect("every candidate is a node row"))
    }

    /// Grows a volume, online.
    pub async fn resize(&self, name: &str, req: &ResizeVolume) -> Result<Volume> {
        check_size(req.size)?;
        let v = self.named(name).await?;
        self.idle(&v)?;
        let size = bytes(req.size);
        if size == v.size {
            return Err(VolumeError::invalid(format!(
                "volume {name} is already {}: nothing to resize",
                size_text(size)
            )));
        }
        if size < v.size {
            return Err(VolumeError::invalid(format!(
                "volume {name} is {} and {} is smaller: volumes cannot shrink: ext4 on a loop \
                 device only grows; to get a smaller volume, create one and copy the data",
                size_text(v.size),
                size_text(size)
            ))
            .next(format!(
                "verge volumes create {} --size {} {}",
                super::copy_name(name),
                verge_api::manifest::format_size(req.size),
                self.flags()
            )));
        }
        let node = self
            .online_node(&v.node_id, &format!("volume {name}"))
            .await?;
        let grow = (size - v.size) as u64;
        if let Some(free) = self.free_on(&node).await?
            && free < grow
        {
            return Err(VolumeError::conflict(format!(
                "node {} has only {} free for volumes; growing volume {name} from {} to {} needs {} more",
                node.name,
                human_size(free),
                size_text(v.size),
                size_text(size),
                human_size(grow)
            ))
            .next("ask for less, or free space on the node (delete unused volumes and snapshots)")
            .next(format!(
                "or move it: verge volumes snapshot {name}, then verge volumes restore SNAPSHOT --to NEW --node OTHER {}",
                self.flags()
            )));
        }
        let v = self.begin(&v, "resize", "resizing", &["ready"]).await?;
        let op = VolumeOp::Resize {
            volume: v.id.clone(),
            size: req.size,
        };
        let to = human_size(req.size);
        match self.ask(&node, op).await {
            Outcome::Done(u) => {
                let message = format!(
                    "volume {name} resized from {} to {} on node {}",
                    size_text(v.size),
                    human_size(u.size),
                    node.name
                );
                self.finish(&v, done("ready", &u), Some(("volume.resized", message)))
                    .await?;
            }
            Outcome::NotAsked(why) => {
                self.finish(&v, unchanged(&v), None).await?;
                return Err(not_asked(&why, &node));
            }
            Outcome::Failed(why) => {
                let message = format!("resizing volume {name} to {to} failed: {why}");
                self.finish(
                    &v,
                    kept("ready", &message),
                    Some(("volume.failed", message)),
                )
                .await?;
                return Err(VolumeError::conflict(format!(
                    "{why}; the volume is unchanged"
                )));
            }
            Outcome::Unknown(why) => {
                let message = format!(
                    "resizing volume {name} to {to} was not confirmed: {why}; its size shows \
                     what the node reports next"
                );
                self.finish(
                    &v,
                    kept("ready", &message),
                    Some(("volume.failed", message.clone())),
                )
                .await?;
                return Err(VolumeError::unavailable(message)
                    .next(format!("verge volumes describe {name} {}", self.flags())));
            }
        }
        self.present_by_name(name).await
    }
}
