//! From an env's current release to instances on nodes, and from a node's
//! instances to the desired set it is sent.
//!
//! [`reconcile_env`] is level-triggered: it compares what the current
//! release (with `verge scale` applied) asks for with the instance rows,
//! creates the missing ones (placed by [`crate::scheduler`]), marks the ones
//! no longer wanted `stop`, retries placing pending ones, and bumps the
//! desired-set version of every node whose set changed. Running it twice
//! changes nothing the second time. It runs after every deploy, rollback and
//! scale, when nodes come and go, and periodically (which also covers
//! changes made through another replica).
//!
//! Rollouts here replace instances at once; the rollout issue makes them
//! rolling and health-gated.

use std::collections::{BTreeMap, BTreeSet};

use verge_api::manifest::{Manifest, Runtime, Workload};
use verge_api::wire::{DesiredSet, InstanceSpec};

use crate::desired::apply_scale;
use crate::scheduler::{self, Ask, NodeView};
use crate::store::{EnvScope, InstanceRow, NewEvent, NewInstance, NodeRow, Result, Store};

/// Brings one env's instances in line with its current release; returns
/// the IDs of nodes whose desired set changed.
pub async fn reconcile_env(store: &Store, env_id: &str) -> Result<Vec<String>> {
    let Some(scope) = store.env_scope(env_id).await? else {
        return Ok(Vec::new());
    };
    // Most runs find nothing to do: check that without the mutation lock,
    // which every replica's writes wait for.
    if let Some(release) = store.current_release(env_id).await?
        && let Ok(snapshot) = serde_json::from_str::<Manifest>(&release.manifest)
    {
        let manifest = apply_scale(&snapshot, &store.scale_overrides(env_id).await?);
        if settled(&manifest, &release.id, &store.env_instances(env_id).await?) {
            return Ok(Vec::new());
        }
    }
    let mut tx = store.mutation().await?;
    let Some(release) = tx.current_release(env_id).await? else {
        return Ok(Vec::new());
    };
    let Ok(snapshot) = serde_json::from_str::<Manifest>(&release.manifest) else {
        tracing::error!(release = %release.id, "release manifest does not parse; not reconciling");
        return Ok(Vec::new());
    };
    let manifest = apply_scale(&snapshot, &tx.scale_overrides(env_id).await?);
    let instances = tx.env_instances(env_id).await?;
    let mut changed = BTreeSet::new();

    // Stop what the current release no longer asks for.
    let mut kept: BTreeMap<(&str, i64), &InstanceRow> = BTreeMap::new();
    for i in instances.iter().filter(|i| i.goal == "run") {
        if wanted(i, &release.id, &manifest) && !kept.contains_key(&(i.workload.as_str(), i.slot)) {
            kept.insert((i.workload.as_str(), i.slot), i);
            continue;
        }
        match &i.node_id {
            Some(node) => {
                tx.stop_instance(&i.id).await?;
                changed.insert(node.clone());
                let why = format!(
                    "instance {} of {} is no longer wanted: stopping",
                    i.id, i.workload
                );
                tx.emit(ev(
                    &scope,
                    &release.id,
                    "instance.stopping",
                    Some(&i.id),
                    Some(node),
                    why,
                ))
                .await?;
            }
            None => tx.delete_instance(&i.id).await?,
        }
    }
    // After the stops: what is reserved now.
    let mut nodes = node_views(tx.nodes().await?, tx.placed_instances().await?);

    for (name, w) in &manifest.workloads {
        for slot in 0..i64::from(w.count) {
            let ask = Ask {
                env_id,
                workload: name,
                cpu_millis: cpu_millis(w),
                memory: w.memory as i64,
                constraints: &w.constraints,
            };
            match kept.get(&(name.as_str(), slot)) {
                Some(i) if i.node_id.is_some() => {}
                Some(i) => {
                    // Pending without a node: try again.
                    match place(&mut nodes, ask, w) {
                        Ok(node) => {
                            tx.place_instance(&i.id, Some(&node), None).await?;
                            changed.insert(node.clone());
                            let msg = format!(
                                "instance {} of {name} placed on {}",
                                i.id,
                                node_name(&nodes, &node)
                            );
                            tx.emit(ev(
                                &scope,
                                &release.id,
                                "instance.placed",
                                Some(&i.id),
                                Some(&node),
                                msg,
                            ))
                            .await?;
                        }
                        Err(why) if i.message.as_deref() != Some(why.as_str()) => {
                            tx.place_instance(&i.id, None, Some(&why)).await?;
                            let msg =
                                format!("instance {} of {name} cannot be placed: {why}", i.id);
                            tx.emit(ev(
                                &scope,
                                &release.id,
                                "instance.unplaced",
                                Some(&i.id),
                                None,
                                msg,
                            ))
                            .await?;
                        }
                        Err(_) => {}
                    }
                }
                None => {
                    let placed = place(&mut nodes, ask, w);
                    let new = NewInstance {
                        env_id,
                        release_id: &release.id,
                        workload: name,
                        slot,
                        node_id: placed.as_ref().ok().map(String::as_str),
                        cpu_millis: ask.cpu_millis,
                        memory: ask.memory,
                        message: placed.as_ref().err().cloned(),
                    };
                    let id = tx.insert_instance(&new).await?;
                    match placed {
                        Ok(node) => {
                            let msg = format!(
                                "instance {id} of {name} placed on {}",
                                node_name(&nodes, &node)
                            );
                            tx.emit(ev(
                                &scope,
                                &release.id,
                                "instance.placed",
                                Some(&id),
                                Some(&node),
                                msg,
                            ))
                            .await?;
                            changed.insert(node);
                        }
                        Err(why) => {
                            let msg = format!("instance {id} of {name} cannot be placed: {why}");
                            tx.emit(ev(
                                &scope,
                                &release.id,
                                "instance.unplaced",
                                Some(&id),
                                None,
                                msg,
                            ))
                            .await?;
                        }
                    }
                }
            }
        }
    }
    let changed: Vec<String> = changed.into_iter().collect();
    tx.bump_desired(&changed).await?;
    tx.commit().await?;
    Ok(changed)
}

/// Reconciles every env that has a release; returns the nodes whose set changed.
pub async fn reconcile_all(store: &Store) -> Result<Vec<String>> {
    let mut changed = BTreeSet::new();
    for env in store.envs_with_release().await? {
        changed.extend(reconcile_env(store, &env).await?);
    }
    Ok(changed.into_iter().collect())
}

/// An event about an instance of the env `scope`.
fn ev<'a>(
    scope: &'a EnvScope,
    release: &'a str,
    kind: &'a str,
    instance: Option<&'a str>,
    node: Option<&'a str>,
    message: String,
) -> NewEvent<'a> {
    NewEvent {
        org_id: Some(&scope.org_id),
        app_id: Some(&scope.app_id),
        env_id: Some(&scope.env_id),
        release_id: Some(release),
        instance_id: instance,
        node_id: node,
        kind,
        message,
        actor: None,
    }
}

/// Whether instance `i` (goal `run`) is one the release asks for: its
/// release, a slot below the count, the workload's CPU and memory.
fn wanted(i: &InstanceRow, release: &str, manifest: &Manifest) -> bool {
    manifest.workloads.get(&i.workload).is_some_and(|w| {
        i.release_id == release
            && i.slot < i64::from(w.count)
            && i.cpu_millis == cpu_millis(w)
            && i.memory == w.memory as i64
    })
}

/// Whether [`reconcile_env`] would change nothing: every instance with
/// goal `run` is wanted, placed, and alone in its slot, and every slot of
/// every workload has one.
fn settled(manifest: &Manifest, release: &str, instances: &[InstanceRow]) -> bool {
    let mut slots = BTreeSet::new();
    for i in instances.iter().filter(|i| i.goal == "run") {
        if !wanted(i, release, manifest)
            || i.node_id.is_none()
            || !slots.insert((&i.workload, i.slot))
        {
            return false;
        }
    }
    let desired: usize = manifest.workloads.values().map(|w| w.count as usize).sum();
    slots.len() == desired
}

/// The scheduler's choice, or why there is none.
fn place(
    nodes: &mut [NodeView],
    ask: Ask<'_>,
    w: &Workload,
) -> std::result::Result<String, String> {
    if w.runtime == Runtime::Wasm {
        return Err(
            "no node runs WebAssembly workloads yet: nodes run runtime = \"process\" only".into(),
        );
    }
    scheduler::place(nodes, ask)
}

fn cpu_millis(w: &Workload) -> i64 {
    (w.cpu * 1000.0).round() as i64
}

fn node_name<'a>(nodes: &'a [NodeView], id: &'a str) -> &'a str {
    nodes.iter().find(|n| n.id == id).map_or(id, |n| &n.name)
}

fn node_views(nodes: Vec<NodeRow>, placed: Vec<InstanceRow>) -> Vec<NodeView> {
    nodes
        .into_iter()
        .map(|n| {
            let mine: Vec<&InstanceRow> = placed
                .iter()
                .filter(|i| i.node_id.as_deref() == Some(&n.id))
                .collect();
            NodeView {
                online: n.state == "online",
                labels: serde_json::from_str(&n.labels).unwrap_or_default(),
                cpu_millis: n.cpu_millis,
                memory: n.memory,
                used_cpu_millis: mine.iter().map(|i| i.cpu_millis).sum(),
                used_memory: mine.iter().map(|i| i.memory).sum(),
                workloads: mine
                    .iter()
                    .map(|i| (i.env_id.clone(), i.workload.clone()))
                    .collect(),
                id: n.id,
                name: n.name,
            }
        })
        .collect()
}

/// What instance specs take from their release.
struct ReleaseParts {
    manifest: Manifest,
    /// Workload → digest-pinned image.
    images: BTreeMap<String, String>,
    /// The env vars of the config version the release pins.
    vars: BTreeMap<String, String>,
}

async fn release_parts(
    store: &Store,
    env_id: &str,
    release_id: &str,
) -> Result<Option<ReleaseParts>> {
    let Some(r) = store.release_by_id(env_id, release_id).await? else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_str::<Manifest>(&r.manifest) else {
        return Ok(None);
    };
    Ok(Some(ReleaseParts {
        manifest,
        images: serde_json::from_str(&r.images).unwrap_or_default(),
        vars: store.config_vars_at(env_id, r.config_version).await?,
    }))
}

/// The desired set of one node: every instance placed on it with goal `run`.
pub async fn desired_set(store: &Store, node: &NodeRow) -> Result<DesiredSet> {
    let mut releases: BTreeMap<String, Option<ReleaseParts>> = BTreeMap::new();
    let mut scopes: BTreeMap<String, Option<EnvScope>> = BTreeMap::new();
    let mut specs = Vec::new();
    for i in store.node_instances(&node.id).await? {
        if i.goal != "run" {
            continue;
        }
        if !releases.contains_key(&i.release_id) {
            let parts = release_parts(store, &i.env_id, &i.release_id).await?;
            releases.insert(i.release_id.clone(), parts);
        }
        if !scopes.contains_key(&i.env_id) {
            scopes.insert(i.env_id.clone(), store.env_scope(&i.env_id).await?);
        }
        let (Some(Some(r)), Some(Some(scope))) =
            (releases.get(&i.release_id), scopes.get(&i.env_id))
        else {
            continue;
        };
        if let Some(spec) = instance_spec(&i, r, scope) {
            specs.push(spec);
        }
    }
    Ok(DesiredSet {
        version: node.desired_version as u64,
        instances: specs,
    })
}

/// What a node needs to run instance `i`.
fn instance_spec(i: &InstanceRow, r: &ReleaseParts, scope: &EnvScope) -> Option<InstanceSpec> {
    let w = r.manifest.workloads.get(&i.workload)?;
    let port = r
        .manifest
        .endpoints
        .iter()
        .find(|e| e.workload == i.workload)
        .map(|e| e.internal_port)
        .or(w.health.map(|h| h.tcp));
    // The manifest's env, then the env's own vars (operators override), then Verge's.
    let mut env_vars = r.manifest.env.clone();
    env_vars.extend(r.vars.clone());
    for (k, v) in [
        ("VERGE_INSTANCE_ID", &i.id),
        ("VERGE_APP", &scope.app),
        ("VERGE_ENV", &scope.env),
        ("VERGE_WORKLOAD", &i.workload),
        ("VERGE_RELEASE", &i.release_id),
    ] {
        env_vars.insert(k.to_string(), v.clone());
    }
    Some(InstanceSpec {
        id: i.id.clone(),
        org: scope.org.clone(),
        app: scope.app.clone(),
        env: scope.env.clone(),
        release: i.release_id.clone(),
        workload: i.workload.clone(),
        image: r
            .images
            .get(&i.workload)
            .cloned()
            .unwrap_or_else(|| w.image.clone()),
        command: w.command.clone(),
        env_vars,
        cpu: i.cpu_millis as f64 / 1000.0,
        memory: i.memory as u64,
        restart: w.restart,
        port,
        health: w.health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(slot: i64, node: Option<&str>, goal: &str) -> InstanceRow {
        InstanceRow {
            id: format!("i{slot}"),
            env_id: "e".into(),
            release_id: "r1".into(),
            workload: "web".into(),
            slot,
            node_id: node.map(str::to_string),
            node_name: None,
            goal: goal.into(),
            state: "running".into(),
            category: None,
            message: None,
            address: None,
            restarts: 0,
            cpu_millis: 250,
            memory: 64 << 20,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn settled_only_when_every_slot_is_placed_once() {
        let m = verge_api::manifest::parse(
            "verge.toml",
            "app = \"a\"\n[workloads.web]\nimage = \"r/i:1\"\ncount = 2\ncpu = 0.25\nmemory = \"64Mi\"\n",
        )
        .unwrap();
        let both = [
            instance(0, Some("n1"), "run"),
            instance(1, Some("n2"), "run"),
        ];
        assert!(settled(&m, "r1", &both));
        // Stopping ones do not count; a missing slot, an unplaced one, a
        // duplicate, another release or other resources all need work.
        let mut more = both.to_vec();
        more.push(instance(5, Some("n1"), "stop"));
        assert!(settled(&m, "r1", &more));
        assert!(!settled(&m, "r1", &both[..1]));
        assert!(!settled(
            &m,
            "r1",
            &[instance(0, Some("n1"), "run"), instance(1, None, "run")]
        ));
        assert!(!settled(
            &m,
            "r1",
            &[
                instance(0, Some("n1"), "run"),
                instance(0, Some("n2"), "run")
            ]
        ));
        assert!(!settled(&m, "r2", &both));
        let mut bigger = both.to_vec();
        bigger[1].memory = 128 << 20;
        assert!(!settled(&m, "r1", &bigger));
    }
}
