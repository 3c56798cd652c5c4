//! From an env's current release to instances on nodes, one rolling step
//! at a time, and from a node's instances to the desired set it is sent.
//!
//! [`reconcile_env`] is level-triggered: it plans the env's next actions
//! with [`plan`] (create and place new instances within `max_surge`, stop
//! outgoing ones while `count - max_unavailable` stay ready, replace
//! instances of lost nodes, move instances off draining nodes), applies
//! them with an event each, advances the env's rollout ([`rollout`]:
//! counts, step, `completed`/`failed`/`partial`, automatic rollback), and
//! bumps the desired-set version of every node whose set changed. Running
//! it twice changes nothing the second time. The plan is first made
//! without the mutation lock: most runs find nothing to do and take no lock.
//!
//! Per-connection workloads have no instances: [`listeners`] decides which
//! nodes answer them, and [`reconcile_all`] bumps the desired-set version
//! of every node whose listeners changed.
//!
//! The cluster's reconciler task runs it for envs that changed (deploys,
//! instance reports) as they change, for envs with an active rollout every
//! tick, and for every env periodically (which also covers changes made
//! through another replica, drain deadlines and reschedule graces).

pub mod listeners;
pub mod plan;
pub mod rollout;
mod spec;
pub mod volumes;

use std::collections::BTreeSet;

use verge_api::manifest::Manifest;
use verge_api::release::{Plan, PlannedPlacement, PlannedStop, WorkloadPlan};

use crate::desired::apply_scale;
use crate::scheduler::{NodeView, Nodes};
use crate::store::{
    EnvScope, InstanceRow, Mutation, NewEvent, NewInstance, NewRollout, NodeRow, ReleaseRow,
    Result, RolloutRow, Store, StoreError,
};
use crate::time::{now_ms, rfc3339};
use plan::{Action, Clock, EnvInput, Facts, NodeFacts};
pub use spec::desired_set;

/// Timings the reconciler works with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Instances of a node offline this long are replaced elsewhere.
    pub reschedule_after_ms: i64,
    /// Where endpoint addresses come from (an automatic rollback moves them).
    pub addressing: crate::endpoints::Addressing,
}

/// The cluster as one reconcile pass sees it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub nodes: Nodes,
    pub facts: Facts,
}

impl ClusterView {
    pub fn new(rows: Vec<NodeRow>, now_ms: i64) -> ClusterView {
        let mut facts = Facts::new();
        let mut views = Vec::with_capacity(rows.len());
        for n in rows {
            let online = n.state == "online";
            let draining = n.drain.as_deref() == Some("draining");
            facts.insert(
                n.id.clone(),
                NodeFacts {
                    online,
                    offline_at: (!online).then_some(n.state_since),
                    draining,
                    drain_overdue: draining && n.drain_deadline.is_some_and(|d| now_ms >= d),
                },
            );
            views.push(NodeView {
                offline_since: (!online).then(|| rfc3339(n.state_since)),
                draining: n.drain.is_some(),
                labels: serde_json::from_str(&n.labels).unwrap_or_default(),
                cpu_millis: n.cpu_millis,
                memory: n.memory,
                used_cpu_millis: n.used_cpu_millis,
                used_memory: n.used_memory,
                id: n.id,
                name: n.name,
            });
        }
        ClusterView {
            nodes: Nodes::new(views),
            facts,
        }
    }

    pub async fn read(store: &Store) -> Result<ClusterView> {
        Ok(ClusterView::new(store.nodes().await?, now_ms()))
    }
}

/// What one env's reconcile did.
#[derive(Debug, Clone, Default)]
pub struct EnvOutcome {
    /// Nodes whose desired set changed.
    pub changed: Vec<String>,
    /// Its rollout is still active (check it again soon).
    pub active: bool,
}

/// The env's state, read in one place for both the lock-free check and the
/// locked pass.
struct EnvState {
    release: ReleaseRow,
    /// The release's manifest as stored, and with `verge scale` applied.
    snapshot: Manifest,
    manifest: Manifest,
    instances: Vec<InstanceRow>,
    rollout: Option<RolloutRow>,
    /// The env's volumes (empty when the release mounts none).
    volumes: plan::Volumes,
}

impl EnvState {
    fn input(&self) -> EnvInput<'_> {
        EnvInput {
            release_id: &self.release.id,
            manifest: &self.manifest,
            instances: &self.instances,
            hold: self.own_rollout().is_some_and(RolloutRow::holds),
            since_ms: self.own_rollout().map_or(0, |r| r.created_at),
            volumes: &self.volumes,
        }
    }

    /// Nothing changed between two reads.
    fn same_as(&self, other: &EnvState) -> bool {
        self.release.id == other.release.id
            && self.manifest == other.manifest
            && self.instances == other.instances
            && self.rollout == other.rollout
            && self.volumes == other.volumes
    }

    /// The rollout the reconciler moves: the latest, when it is for the
    /// current release.
    fn own_rollout(&self) -> Option<&RolloutRow> {
        self.rollout
            .as_ref()
            .filter(|r| r.release_id == self.release.id)
    }
}

fn parse_manifest(release: &ReleaseRow) -> Option<Manifest> {
    match serde_json::from_str::<Manifest>(&release.manifest) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(release = %release.id, error = %e, "release manifest does not parse; not reconciling");
            None
        }
    }
}

async fn read_env(store: &Store, env_id: &str) -> Result<Option<EnvState>> {
    let Some(release) = store.current_release(env_id).await? else {
        return Ok(None);
    };
    let Some(snapshot) = parse_manifest(&release) else {
        return Ok(None);
    };
    let instances = store.env_instances(env_id).await?;
    Ok(Some(EnvState {
        manifest: apply_scale(&snapshot, &store.scale_overrides(env_id).await?),
        volumes: volumes::facts(store, env_id, &snapshot, &instances).await?,
        snapshot,
        instances,
        rollout: store.latest_rollout(env_id).await?,
        release,
    }))
}

async fn read_env_locked(
    store: &Store,
    tx: &mut Mutation<'_>,
    env_id: &str,
) -> Result<Option<EnvState>> {
    let Some(release) = tx.current_release(env_id).await? else {
        return Ok(None);
    };
    let Some(snapshot) = parse_manifest(&release) else {
        return Ok(None);
    };
    let instances = tx.env_instances(env_id).await?;
    Ok(Some(EnvState {
        manifest: apply_scale(&snapshot, &tx.scale_overrides(env_id).await?),
        volumes: volumes::facts(store, env_id, &snapshot, &instances).await?,
        snapshot,
        instances,
        rollout: tx.latest_rollout(env_id).await?,
        release,
    }))
}

/// Brings one env a step closer to its current release. `view` is the
/// cluster as this pass knows it, with the reservations of what the pass
/// placed so far; the store checks every reservation against the node's
/// capacity, and a plan made on a stale view (another replica placed on
/// the same node) is made again on a fresh one.
pub async fn reconcile_env(
    store: &Store,
    env_id: &str,
    view: &mut ClusterView,
    settings: Settings,
) -> Result<EnvOutcome> {
    let mut attempts = 0;
    loop {
        let clock = Clock {
            now_ms: now_ms(),
            reschedule_after_ms: settings.reschedule_after_ms,
        };
        // Most runs find nothing to do: check that without the mutation
        // lock, which every replica's writes wait for. A plan without
        // actions leaves `view` untouched.
        let Some(seen) = read_env(store, env_id).await? else {
            return Ok(EnvOutcome::default());
        };
        let actions = plan::plan(&seen.input(), &mut view.nodes, &view.facts, clock);
        let advanced = seen.own_rollout().and_then(|r| {
            let p = rollout::progress(&seen.input(), &view.facts, clock);
            rollout::advance(r, &p, clock.now_ms)
        });
        if actions.is_empty() && advanced.is_none() {
            return Ok(EnvOutcome {
                changed: Vec::new(),
                active: seen.own_rollout().is_some_and(RolloutRow::is_active),
            });
        }
        match locked(
            store,
            env_id,
            &seen,
            actions,
            view,
            clock,
            &settings.addressing,
        )
        .await
        {
            Err(StoreError::Conflict) if attempts < 2 => {
                attempts += 1;
                tracing::debug!(
                    env = env_id,
                    "placed on a stale view of the nodes; planning again"
                );
                *view = ClusterView::read(store).await?;
            }
            other => return other,
        }
    }
}

/// Applies the env's plan in one mutation: `planned` was made on `seen`;
/// when the env changed meanwhile it is made again on what is locked.
async fn locked(
    store: &Store,
    env_id: &str,
    seen: &EnvState,
    planned: Vec<Action>,
    view: &mut ClusterView,
    clock: Clock,
    pools: &crate::endpoints::Addressing,
) -> Result<EnvOutcome> {
    let mut tx = store.mutation().await?;
    let Some(env) = read_env_locked(store, &mut tx, env_id).await? else {
        return Ok(EnvOutcome::default());
    };
    let Some(scope) = tx.env_scope(env_id).await? else {
        return Ok(EnvOutcome::default());
    };
    let actions = if env.same_as(seen) {
        planned
    } else {
        plan::undo(&seen.input(), &planned, &mut view.nodes);
        plan::plan(&env.input(), &mut view.nodes, &view.facts, clock)
    };
    let changed = apply(&mut tx, &scope, &env, &actions, view).await?;
    let mut active = false;
    if let Some(r) = env.own_rollout() {
        let p = rollout::progress(&env.input(), &view.facts, clock);
        if let Some(mut next) = rollout::advance(r, &p, clock.now_ms) {
            tx.update_rollout(&next).await?;
            rollout_events(&mut tx, &scope, &env.release, r, &next).await?;
            active = next.is_active();
            if next.holds() && rollout::auto_rollback(&env.manifest) && rollout::goes_back(&next) {
                // The rollback's own rollout needs the next passes.
                active = roll_back(&mut tx, &scope, &env, &mut next, pools).await?;
                tx.update_rollout(&next).await?;
            }
        } else {
            active = r.is_active();
        }
    }
    let changed: Vec<String> = changed.into_iter().collect();
    tx.bump_desired(&changed).await?;
    tx.commit().await?;
    Ok(EnvOutcome { changed, active })
}

/// Applies a plan's actions with an event each; returns the nodes whose
/// desired set changed.
async fn apply(
    tx: &mut Mutation<'_>,
    scope: &EnvScope,
    env: &EnvState,
    actions: &[Action],
    view: &ClusterView,
) -> Result<BTreeSet<String>> {
    let mut changed = BTreeSet::new();
    let rows = plan::by_id(&env.instances);
    let row = |id: &str| rows.get(id).copied();
    for a in actions {
        match a {
            Action::Create {
                workload,
                slot,
                release,
                cpu_millis,
                memory,
                node,
            } => {
                let release = release.as_deref().unwrap_or(&env.release.id);
                let new = NewInstance {
                    env_id: &scope.env_id,
                    release_id: release,
                    workload,
                    slot: *slot,
                    node_id: node.as_ref().ok().map(String::as_str),
                    cpu_millis: *cpu_millis,
                    memory: *memory,
                    message: node.as_ref().err().cloned(),
                };
                let id = tx.insert_instance(&new).await?;
                placed_event(tx, scope, release, &id, workload, node, view).await?;
                if let Ok(n) = node {
                    changed.insert(n.clone());
                }
            }
            Action::Place { instance, node } => {
                let Some(i) = row(instance) else { continue };
                tx.place_instance(
                    instance,
                    node.as_ref().ok().map(String::as_str),
                    node.as_ref().err().map(String::as_str),
                )
                .await?;
                placed_event(tx, scope, &i.release_id, instance, &i.workload, node, view).await?;
                if let Ok(n) = node {
                    changed.insert(n.clone());
                }
            }
            Action::Stop {
                instance,
                node,
                why,
            } => {
                let Some(i) = row(instance) else { continue };
                tx.stop_instance(instance).await?;
                changed.insert(node.clone());
                let message = format!(
                    "instance {instance} of {} on {}: {}",
                    i.workload,
                    view.nodes.name(node),
                    why.describe()
                );
                tx.emit(event(
                    scope,
                    &i.release_id,
                    why.event_kind(),
                    Some(instance),
                    Some(node),
                    message,
                ))
                .await?;
            }
            Action::Delete { instance } => tx.delete_instance(instance).await?,
        }
    }
    Ok(changed)
}

async fn placed_event(
    tx: &mut Mutation<'_>,
    scope: &EnvScope,
    release: &str,
    id: &str,
    workload: &str,
    node: &std::result::Result<String, String>,
    view: &ClusterView,
) -> Result<()> {
    let (kind, node_id, message) = match node {
        Ok(n) => (
            "instance.placed",
            Some(n.as_str()),
            format!(
                "instance {id} of {workload} placed on {}",
                view.nodes.name(n)
            ),
        ),
        Err(why) => (
            "instance.unplaced",
            None,
            format!("instance {id} of {workload} cannot be placed: {why}"),
        ),
    };
    tx.emit(event(scope, release, kind, Some(id), node_id, message))
        .await?;
    Ok(())
}

/// Points the env back at the release its failed rollout came from, with a
/// rollout of kind `auto_rollback`; notes it in `failed`'s reason. `false`
/// when there is nothing to go back to.
async fn roll_back(
    tx: &mut Mutation<'_>,
    scope: &EnvScope,
    env: &EnvState,
    failed: &mut RolloutRow,
    pools: &crate::endpoints::Addressing,
) -> Result<bool> {
    let Some(from_id) = failed
        .from_release_id
        .clone()
        .filter(|f| *f != env.release.id)
    else {
        return Ok(false);
    };
    let Some(target) = tx.release_by_id(&scope.env_id, &from_id).await? else {
        return Ok(false);
    };
    let Some(target_manifest) = parse_manifest(&target) else {
        return Ok(false);
    };
    let scale = tx.scale_overrides(&scope.env_id).await?;
    match tx
        .make_current(
            &scope.env_id,
            &target.id,
            Some(&env.snapshot),
            &target_manifest,
            &scale,
            pools,
        )
        .await
    {
        Ok(_) => {}
        // Its endpoints' ports were taken since: it cannot go back
        // (nothing was changed), and says why.
        Err(StoreError::Endpoint(why)) => {
            let reason = failed.reason.clone().unwrap_or_default();
            failed.reason = Some(format!(
                "{reason}; cannot roll back automatically to v{}: {why}",
                target.number
            ));
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    let why = failed.reason.clone().unwrap_or_default();
    failed.reason = Some(format!(
        "{why}; rolled back automatically to v{} (auto_rollback)",
        target.number
    ));
    let (_, _) = tx
        .start_rollout(
            &NewRollout {
                env_id: &scope.env_id,
                release_id: &target.id,
                from_release_id: Some(&env.release.id),
                kind: "auto_rollback",
                deadline_ms: rollout::deadline_ms(&target_manifest),
                created_by: None,
            },
            "an automatic rollback",
        )
        .await?;
    let message = format!(
        "rollout of v{} {} ({}); rolled back automatically to v{}",
        env.release.number,
        failed.state,
        failed.category.as_deref().unwrap_or("unknown"),
        target.number
    );
    tx.emit(event(
        scope,
        &target.id,
        "rollout.auto_rollback",
        None,
        None,
        message,
    ))
    .await?;
    Ok(true)
}

async fn rollout_events(
    tx: &mut Mutation<'_>,
    scope: &EnvScope,
    release: &ReleaseRow,
    before: &RolloutRow,
    next: &RolloutRow,
) -> Result<()> {
    let v = release.number;
    let (kind, message) = if next.state != before.state {
        let message = match next.state.as_str() {
            "in_progress" => format!(
                "rollout of v{v} ({}) in progress: {} of {} ready",
                next.kind, next.done, next.total
            ),
            "completed" => format!(
                "rollout of v{v} ({}) completed: {} of {} instance(s) ready",
                next.kind, next.done, next.total
            ),
            _ => format!(
                "rollout of v{v} ({}) {}{}: {}",
                next.kind,
                next.state,
                next.category
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default(),
                next.reason.as_deref().unwrap_or("")
            ),
        };
        (format!("rollout.{}", next.state), message)
    } else {
        (
            "rollout.progress".to_string(),
            format!(
                "rollout of v{v}: {} of {} ready, {} failed, {} old still running",
                next.done, next.total, next.failed, next.outgoing
            ),
        )
    };
    tx.emit(event(scope, &release.id, &kind, None, None, message))
        .await?;
    Ok(())
}

/// Reconciles every env that has a release, then finishes drains and
/// brings every node's listeners up to date ([`listeners::sync`]).
pub async fn reconcile_all(store: &Store, settings: Settings) -> Result<PassOutcome> {
    let mut view = ClusterView::read(store).await?;
    let envs = store.envs_with_release().await?;
    let mut out = reconcile_envs(store, &envs, &mut view, settings).await?;
    out.drained = finish_drains(store, &view).await?;
    // Listeners follow current releases and node facts, not plans.
    for node in listeners::sync(store).await? {
        if !out.changed.contains(&node) {
            out.changed.push(node);
        }
    }
    Ok(out)
}

/// What a pass over several envs did.
#[derive(Debug, Clone, Default)]
pub struct PassOutcome {
    /// Nodes whose desired set changed.
    pub changed: Vec<String>,
    /// Envs whose rollout is still active.
    pub active: Vec<String>,
    /// Nodes whose drain finished.
    pub drained: Vec<String>,
}

/// Reconciles the given envs with one view of the cluster.
pub async fn reconcile_envs(
    store: &Store,
    envs: &[String],
    view: &mut ClusterView,
    settings: Settings,
) -> Result<PassOutcome> {
    let mut changed = BTreeSet::new();
    let mut active = Vec::new();
    for env in envs {
        // One env that cannot be reconciled does not stop the others.
        let o = match reconcile_env(store, env, view, settings).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(env = %env, error = %e, "reconciling the env failed; will retry");
                active.push(env.clone());
                continue;
            }
        };
        changed.extend(o.changed);
        if o.active {
            active.push(env.clone());
        }
    }
    Ok(PassOutcome {
        changed: changed.into_iter().collect(),
        active,
        drained: Vec::new(),
    })
}

/// Marks `drained` every draining node that has no instance left
/// ([`Mutation::finish_drain`] decides, under the lock).
async fn finish_drains(store: &Store, view: &ClusterView) -> Result<Vec<String>> {
    let mut drained = Vec::new();
    let draining = view
        .nodes
        .iter()
        .filter(|n| view.facts.get(&n.id).is_some_and(|f| f.draining));
    for n in draining {
        let mut tx = store.mutation().await?;
        if !tx.finish_drain(&n.id).await? {
            continue;
        }
        tx.emit(NewEvent::about_node(
            &n.id,
            "node.drained",
            format!("node {} is drained: no instances left on it", n.name),
        ))
        .await?;
        tx.commit().await?;
        drained.push(n.id.clone());
    }
    Ok(drained)
}

/// An event about the env `scope`.
fn event<'a>(
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

/// What deploying `manifest` (scale applied) would do to the env's
/// instances, changing nothing: every slot placed while the instances it
/// replaces still run (as during the rollout's first steps).
pub async fn dry_run(
    store: &Store,
    env_id: &str,
    manifest: &Manifest,
    settings: Settings,
) -> Result<Plan> {
    let mut view = ClusterView::read(store).await?;
    let instances = store.env_instances(env_id).await?;
    let numbers = store.release_numbers(env_id).await?;
    let volume_facts = volumes::facts(store, env_id, manifest, &instances).await?;
    // Unbounded surge: every slot now, beside what runs.
    let mut m = manifest.clone();
    for w in m.workloads.values_mut() {
        w.rollout.max_surge = w.count.max(1);
        w.rollout.max_unavailable = 0;
    }
    let input = EnvInput {
        release_id: "(dry run)",
        manifest: &m,
        instances: &instances,
        hold: false,
        since_ms: 0,
        volumes: &volume_facts,
    };
    let clock = Clock {
        now_ms: now_ms(),
        reschedule_after_ms: settings.reschedule_after_ms,
    };
    let actions = plan::plan(&input, &mut view.nodes, &view.facts, clock);
    let mut plan = Plan::default();
    for (name, w) in &manifest.workloads {
        let placements = actions
            .iter()
            .filter_map(|a| match a {
                Action::Create {
                    workload,
                    slot,
                    node,
                    ..
                } if workload == name => Some(PlannedPlacement {
                    slot: *slot as u32,
                    node: node.as_ref().ok().map(|n| view.nodes.name(n).to_string()),
                    reason: node.as_ref().err().cloned(),
                }),
                _ => None,
            })
            .collect();
        let replaces = instances
            .iter()
            .filter(|i| i.goal == "run" && &i.workload == name)
            .map(|i| PlannedStop {
                instance: i.id.clone(),
                node: i.node_name.clone(),
                release: numbers.get(&i.release_id).copied(),
            })
            .collect();
        plan.workloads.push(WorkloadPlan {
            name: name.clone(),
            count: w.count,
            placements,
            replaces,
        });
    }
    Ok(plan)
}
