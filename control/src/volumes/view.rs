//! Volumes as the API shows them: with the node's name and region, the
//! instance each is attached to, its snapshots, and (in `describe`) the
//! commands that act on it next.

use verge_api::manifest::format_size;
use verge_api::volumes::{Snapshot, Volume};

use super::{EnvVolumes, NodeNames, Result, attached_instances};
use crate::store::{InstanceRow, SnapshotRow, VolumeRow};
use crate::time::rfc3339;

impl EnvVolumes {
    /// Every volume of the env, by name, with its attachment and snapshots.
    pub async fn list(&self) -> Result<Vec<Volume>> {
        let rows = self.store.volumes(&self.scope.env_id).await?;
        let attached = attached_instances(&self.store, &self.scope.env_id).await?;
        let snapshots = self.store.snapshots(&self.scope.env_id, None).await?;
        let nodes = self.node_names().await?;
        Ok(rows
            .iter()
            .map(|v| {
                let snaps = snapshots
                    .iter()
                    .filter(|s| s.volume_name == v.name)
                    .map(|s| snapshot_api(s, &nodes))
                    .collect();
                self.volume_api(v, &nodes, attached.get(&v.name), snaps)
            })
            .collect())
    }

    /// One volume with its snapshots and the commands that act on it.
    pub async fn describe(&self, name: &str) -> Result<Volume> {
        let v = self.named(name).await?;
        self.present(&v).await
    }

    /// The volume as the API shows it, read again.
    pub(super) async fn present(&self, v: &VolumeRow) -> Result<Volume> {
        let attached = attached_instances(&self.store, &self.scope.env_id).await?;
        let nodes = self.node_names().await?;
        let snaps: Vec<Snapshot> = self
            .store
            .snapshots(&self.scope.env_id, Some(&v.name))
            .await?
            .iter()
            .map(|s| snapshot_api(s, &nodes))
            .collect();
        let attached = attached.get(&v.name);
        let mut out = self.volume_api(v, &nodes, attached, snaps);
        out.operations = self.operations(&out, attached);
        Ok(out)
    }

    /// Snapshots of the volume named `name` (current or deleted), oldest first.
    pub async fn snapshots(&self, name: &str) -> Result<Vec<Snapshot>> {
        let rows = self.store.snapshots(&self.scope.env_id, Some(name)).await?;
        if rows.is_empty() {
            // 404 for a volume that never existed; none yet is an empty list.
            self.named(name).await?;
        }
        let nodes = self.node_names().await?;
        Ok(rows.iter().map(|s| snapshot_api(s, &nodes)).collect())
    }

    pub(super) fn volume_api(
        &self,
        v: &VolumeRow,
        nodes: &NodeNames,
        attached: Option<&InstanceRow>,
        snapshots: Vec<Snapshot>,
    ) -> Volume {
        let (node, region) = nodes
            .get(&v.node_id)
            .cloned()
            .unwrap_or_else(|| (v.node_id.clone(), None));
        Volume {
            name: v.name.clone(),
            size: v.size.max(0) as u64,
            node,
            attached_to: attached.map(|i| i.id.clone()),
            state: v.state.clone(),
            id: v.id.clone(),
            node_id: v.node_id.clone(),
            app: self.scope.app.clone(),
            env: self.scope.env.clone(),
            region,
            used: v.used.map(|u| u.max(0) as u64),
            backend: v.backend.clone(),
            message: v.message.clone(),
            created_at: rfc3339(v.created_at),
            snapshots,
            operations: Vec::new(),
        }
    }

    /// The commands that act on the volume next, as its state allows.
    fn operations(&self, v: &Volume, attached: Option<&InstanceRow>) -> Vec<String> {
        let flags = self.flags();
        let name = &v.name;
        let newest = v.snapshots.last().map(|s| s.id.as_str());
        let detach = attached.map(|i| {
            format!(
                "  (after detaching it from {} of {}: deploy without the mount, or `verge scale {}=0`)",
                i.id, i.workload, i.workload
            )
        });
        let mut out = Vec::new();
        let ready = v.state == "ready";
        if ready {
            out.push(format!(
                "verge volumes resize {name} --size {} {flags}",
                format_size(v.size.saturating_mul(2))
            ));
            out.push(format!("verge volumes snapshot {name} {flags}"));
        }
        if ready || v.state == "failed" {
            if let Some(snap) = newest {
                out.push(format!(
                    "verge volumes restore {snap} {flags}{}",
                    detach.clone().unwrap_or_default()
                ));
                out.push(format!(
                    "verge volumes restore {snap} --to {} {flags}",
                    copy_name(name)
                ));
            }
            out.push(format!(
                "verge volumes delete {name} {flags}{}",
                detach.unwrap_or_default()
            ));
        }
        out
    }
}

/// `NAME-copy`, kept within the naming rule's 63 characters.
pub(super) fn copy_name(name: &str) -> String {
    let mut base: String = name.chars().take(63 - "-copy".len()).collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("{base}-copy")
}

pub(super) fn snapshot_api(s: &SnapshotRow, nodes: &NodeNames) -> Snapshot {
    Snapshot {
        id: s.id.clone(),
        volume: s.volume_name.clone(),
        node: nodes
            .get(&s.node_id)
            .map_or_else(|| s.node_id.clone(), |(n, _)| n.clone()),
        size: s.size.max(0) as u64,
        used: s.used.map(|u| u.max(0) as u64),
        created_at: rfc3339(s.created_at),
    }
}
