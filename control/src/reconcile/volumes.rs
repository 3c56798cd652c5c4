//! Which instance each volume of an env is attached to, and the facts the
//! planner needs about the volumes of the workloads it places.
//!
//! A volume is *attached* to an instance of the env that has a node (rows
//! are deleted once their node reports them stopped) and whose own
//! release's workload mounts it; an instance with goal `run` wins over one
//! that is stopping, then the newest. One instance at a time: the planner
//! places no other instance mounting the volume while it is attached.

use std::collections::BTreeMap;

use verge_api::manifest::Manifest;

use super::plan::{VolumeFact, Volumes};
use crate::store::{InstanceRow, Result, Store, VolumeRow};

/// Volume name → the instance it is attached to. `manifests` holds the
/// manifest of each release the placed `instances` belong to.
pub fn holders<'a>(
    instances: &'a [InstanceRow],
    manifests: &BTreeMap<String, Manifest>,
) -> BTreeMap<String, &'a InstanceRow> {
    let mut best: BTreeMap<String, &InstanceRow> = BTreeMap::new();
    for i in instances.iter().filter(|i| i.node_id.is_some()) {
        let Some(w) = manifests
            .get(&i.release_id)
            .and_then(|m| m.workloads.get(&i.workload))
        else {
            continue;
        };
        for v in &w.volumes {
            match best.get(&v.name) {
                Some(b) if !wins(i, b) => {}
                _ => {
                    best.insert(v.name.clone(), i);
                }
            }
        }
    }
    best
}

/// Whether `a` holds a volume rather than `b`: goal `run` over `stop`,
/// then the newer, then the larger ID (a stable tie-break).
fn wins(a: &InstanceRow, b: &InstanceRow) -> bool {
    let key = |i: &InstanceRow| (i.goal == "run", i.created_at, i.id.clone());
    key(a) > key(b)
}

/// The planner's view of the env's volumes: where each is and what it is
/// attached to, given the env's `instances` (read inside or outside a
/// mutation: releases are immutable, and a volume's node never changes).
/// Empty (and no query) when `current` mounts none.
pub async fn facts(
    store: &Store,
    env_id: &str,
    current: &Manifest,
    instances: &[InstanceRow],
) -> Result<Volumes> {
    if !mounts_any(current) {
        return Ok(Volumes::new());
    }
    let mut manifests = BTreeMap::new();
    for id in placed_releases(instances) {
        if let Some(m) = store
            .release_by_id(env_id, &id)
            .await?
            .and_then(|r| serde_json::from_str(&r.manifest).ok())
        {
            manifests.insert(id, m);
        }
    }
    Ok(combine(store.volumes(env_id).await?, instances, &manifests))
}

fn mounts_any(m: &Manifest) -> bool {
    m.workloads.values().any(|w| !w.volumes.is_empty())
}

fn placed_releases(instances: &[InstanceRow]) -> std::collections::BTreeSet<String> {
    instances
        .iter()
        .filter(|i| i.node_id.is_some())
        .map(|i| i.release_id.clone())
        .collect()
}

fn combine(
    rows: Vec<VolumeRow>,
    instances: &[InstanceRow],
    manifests: &BTreeMap<String, Manifest>,
) -> Volumes {
    let mut attached: BTreeMap<String, String> = holders(instances, manifests)
        .into_iter()
        .map(|(v, i)| (v, i.id.clone()))
        .collect();
    rows.into_iter()
        .map(|v| {
            let fact = VolumeFact {
                node_id: v.node_id,
                state: v.state,
                attached_to: attached.remove(&v.name),
            };
            (v.name, fact)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_to_run_beats_one_stopping_then_the_newest_wins() {
        let inst = |id: &str, goal: &str, created_at: i64| {
            let mut i = super::super::plan::tests::inst(id, "r", 0, "n", "running");
            i.goal = goal.into();
            i.created_at = created_at;
            i
        };
        let m: Manifest = verge_api::manifest::parse(
            "verge.toml",
            "app = \"a\"\n[workloads.web]\nimage = \"i\"\nvolumes = [{ name = \"data\", path = \"/d\" }]\n",
        )
        .unwrap();
        let manifests = BTreeMap::from([("r".to_string(), m)]);
        let holder = |rows: &[InstanceRow]| holders(rows, &manifests)["data"].id.clone();
        let (old_run, new_stop, new_run) = (
            inst("i_1", "run", 1),
            inst("i_2", "stop", 2),
            inst("i_3", "run", 3),
        );
        assert_eq!(holder(&[old_run.clone(), new_stop.clone()]), "i_1");
        assert_eq!(holder(&[new_stop.clone(), old_run.clone(), new_run]), "i_3");
        let mut unplaced = inst("i_4", "run", 4);
        unplaced.node_id = None;
        assert_eq!(
            holder(&[new_stop, unplaced]),
            "i_2",
            "an unplaced instance holds nothing"
        );
    }
}
