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

use verge_api::manifest::{Manifest, Workload};
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
        let wanted = manifest.workloads.get(&i.workload).is_some_and(|w| {
            i.release_id == release.id
                && i.slot < i64::from(w.count)
                && i.cpu_millis == cpu_millis(w)
                && i.memory == w.memory as i64
        });
        if wanted && !kept.contains_key(&(i.workload.as_str(), i.slot)) {
            kept.insert((i.workload.as_str(), i.slot), i);
            continue;
        }
        match &i.node_id {
            Some(node) => {
                tx.stop_instance(&i.id).await?;
                changed.insert(node.clone());
                let why = format!("instance {} of {} is no longer wanted: stopping", i.id, i.workload);
                tx.emit(ev(&scope, &release.id, "instance.stopping", Some(&i.id), Some(node), why)).await?;
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
            };
            match kept.get(&(name.as_str(), slot)) {
                Some(i) if i.node_id.is_some() => {}
                Some(i) => {
                    // Pending without a node: try again.
                    match scheduler::place(&mut nodes, ask) {
                        Ok(node) => {
                            tx.place_instance(&i.id, Some(&node), None).await?;
                            changed.insert(node.clone());
                            let msg = format!("instance {} of {name} placed on {}", i.id, node_name(&nodes, &node));
                            tx.emit(ev(&scope, &release.id, "instance.placed", Some(&i.id), Some(&node), msg)).await?;
                        }
                        Err(why) if i.message.as_deref() != Some(why.as_str()) => {
                            tx.place_instance(&i.id, None, Some(&why)).await?;
                            let msg = format!("instance {} of {name} cannot be placed: {why}", i.id);
                            tx.emit(ev(&scope, &release.id, "instance.unplaced", Some(&i.id), None, msg)).await?;
                        }
                        Err(_) => {}
                    }
                }
                None => {
                    let placed = scheduler::place(&mut nodes, ask);
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
                            let msg = format!("instance {id} of {name} placed on {}", node_name(&nodes, &node));
                            tx.emit(ev(&scope, &release.id, "instance.placed", Some(&id), Some(&node), msg)).await?;
                            changed.insert(node);
                        }
                        Err(why) => {
                            let msg = format!("instance {id} of {name} cannot be placed: {why}");
                            tx.emit(ev(&scope, &release.id, "instance.unplaced", Some(&id), None, msg)).await?;
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

/// The desired set of one node: every instance placed on it with goal `run`.
pub async fn desired_set(store: &Store, node: &NodeRow) -> Result<DesiredSet> {
    let mut releases: BTreeMap<String, Option<(Manifest, BTreeMap<String, String>, BTreeMap<String, String>)>> =
        BTreeMap::new();
    let mut scopes = BTreeMap::new();
    let mut specs = Vec::new();
    for i in store.node_instances(&node.id).await? {
        if i.goal != "run" {
            continue;
        }
        if !releases.contains_key(&i.release_id) {
            let loaded = match store.release_by_id(&i.env_id, &i.release_id).await? {
                Some(r) => {
                    let manifest = serde_json::from_str::<Manifest>(&r.manifest).ok();
                    let images: BTreeMap<String, String> = serde_json::from_str(&r.images).unwrap_or_default();
                    let vars = store.config_vars_at(&i.env_id, r.config_version).await?;
                    manifest.map(|m| (m, images, vars))
                }
                None => None,
            };
            releases.insert(i.release_id.clone(), loaded);
        }
        if !scopes.contains_key(&i.env_id) {
            scopes.insert(i.env_id.clone(), store.env_scope(&i.env_id).await?);
        }
        let (Some(Some((m, images, vars))), Some(Some(scope))) =
            (releases.get(&i.release_id), scopes.get(&i.env_id))
        else {
            continue;
        };
        let Some(w) = m.workloads.get(&i.workload) else {
            continue;
        };
        let port = m
            .endpoints
            .iter()
            .find(|e| e.workload == i.workload)
            .map(|e| e.internal_port)
            .or(w.health.map(|h| h.tcp));
        let mut env_vars = m.env.clone();
        env_vars.extend(vars.clone());
        for (k, v) in [
            ("VERGE_INSTANCE_ID", &i.id),
            ("VERGE_APP", &scope.app),
            ("VERGE_ENV", &scope.env),
            ("VERGE_WORKLOAD", &i.workload),
            ("VERGE_RELEASE", &i.release_id),
        ] {
            env_vars.insert(k.to_string(), v.clone());
        }
        specs.push(InstanceSpec {
            id: i.id.clone(),
            org: scope.org.clone(),
            app: scope.app.clone(),
            env: scope.env.clone(),
            release: i.release_id.clone(),
            workload: i.workload.clone(),
            image: images.get(&i.workload).cloned().unwrap_or_else(|| w.image.clone()),
            command: w.command.clone(),
            env_vars,
            cpu: i.cpu_millis as f64 / 1000.0,
            memory: i.memory as u64,
            restart: w.restart,
            port,
        });
    }
    Ok(DesiredSet {
        version: node.desired_version as u64,
        instances: specs,
    })
}
