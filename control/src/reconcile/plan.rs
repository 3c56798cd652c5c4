//! The rolling planner: what one env's instances should do next, as a list
//! of [`Action`]s. Pure: it reads a snapshot and changes nothing, so
//! `reconcile_env` applies its actions, `verge deploy --dry-run` shows them,
//! and the scale benchmark drives it over simulated clusters.
//!
//! Per workload, each instance with goal `run` is either *current* (the
//! release's spec, slot below the count, first in its slot, on a node that
//! is neither draining nor lost) or *outgoing* (an earlier release, scaled
//! away, a duplicate, or on a draining node). Then:
//!
//! 1. Instances of a node offline longer than the reschedule grace are
//!    stopped (`node_lost`) and their slots refilled elsewhere, unless the
//!    workload mounts volumes: then they are pinned and wait for the node.
//! 2. Outgoing instances that do not serve are stopped; serving ones are
//!    stopped while the workload keeps at least `count - max_unavailable`
//!    ready (running, and healthy when it has a check) instances; those on
//!    a node past its drain deadline are stopped regardless.
//! 3. Missing slots get new instances while the workload has at most
//!    `count + max_surge` instances.
//!
//! A *held* env (its rollout failed or was canceled) takes no rolling
//! steps: it keeps serving from what it runs. Lost instances are still
//! stopped, and a drain's deadline still stops what is left on the node;
//! each is refilled elsewhere as it was (its release, slot and resources),
//! so the env keeps its capacity.
//!
//! Long-running wasm workloads are planned like processes (the scheduler
//! reserves their cpu and memory). Per-connection workloads have no
//! instances to plan: nodes answer them with listeners
//! ([`super::listeners`]), which reserve nothing.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use verge_api::manifest::{Manifest, Mode, Workload};

use crate::scheduler::{self, Ask, Nodes};
use crate::store::InstanceRow;

/// Why an instance is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Another release (or other resources) replaces it.
    Replaced,
    /// Its slot is above the count, or its workload is gone.
    ScaledDown,
    /// Two instances in one slot.
    Duplicate,
    /// Its node is draining.
    Drained,
    /// Its node has been offline longer than the reschedule grace.
    Lost,
    /// It failed before the env's current rollout started.
    Failed,
}

impl StopWhy {
    /// What its event says after `instance I of W on N: `.
    pub fn describe(self) -> &'static str {
        match self {
            StopWhy::Replaced => "stopping: replaced (another release, or other cpu or memory)",
            StopWhy::Failed => "stopping: failed before this rollout: replaced",
            StopWhy::ScaledDown => "stopping: no longer wanted (scaled down or removed)",
            StopWhy::Duplicate => "stopping: a duplicate of its slot",
            StopWhy::Drained => "stopping: moved off its draining node",
            StopWhy::Lost => {
                "node_lost: the node has been offline longer than the reschedule grace; \
                 replacing it on another node (the node stops this copy if it returns)"
            }
        }
    }

    /// The kind of its event.
    pub fn event_kind(self) -> &'static str {
        match self {
            StopWhy::Lost => "instance.lost",
            _ => "instance.stopping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new instance in `slot`: on a node, or pending with why not. Its
    /// release is the env's (`None`), or, in a held env, that of the
    /// instance a lost node or a drain took away (refilled as it was,
    /// resources included).
    Create {
        workload: String,
        slot: i64,
        release: Option<String>,
        cpu_millis: i64,
        memory: i64,
        node: Result<String, String>,
    },
    /// A pending instance without a node: placed now, or a new reason why not.
    Place {
        instance: String,
        node: Result<String, String>,
    },
    /// Goal `stop` for a placed instance.
    Stop {
        instance: String,
        node: String,
        why: StopWhy,
    },
    /// Forget an instance that never got a node.
    Delete { instance: String },
}

/// What the planner needs to know besides the instances.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now_ms: i64,
    /// Instances of a node offline this long are lost.
    pub reschedule_after_ms: i64,
}

/// A node's liveness and drain, as the planner needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub online: bool,
    /// Since when it is offline (ms), when it is.
    pub offline_at: Option<i64>,
    pub draining: bool,
    /// Draining and past the drain deadline.
    pub drain_overdue: bool,
}

/// One env at one moment.
#[derive(Debug, Clone, Copy)]
pub struct EnvInput<'a> {
    pub release_id: &'a str,
    /// The release's manifest with `verge scale` applied.
    pub manifest: &'a Manifest,
    /// Every instance of the env, in (workload, slot, created_at) order.
    pub instances: &'a [InstanceRow],
    /// The rollout ended without success: take no rolling steps.
    pub hold: bool,
    /// When the env's rollout started: instances of the release that
    /// failed before it are replaced (a new scale or deploy retries them).
    pub since_ms: i64,
    /// The env's volumes, for the workloads that mount some.
    pub volumes: &'a Volumes,
}

/// Liveness and drain of nodes, by ID.
pub type Facts = BTreeMap<String, NodeFacts>;

/// A volume of the env, as placement needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFact {
    /// The node that holds it.
    pub node_id: String,
    /// `ready` or `resizing` (instances may mount it), or `creating`,
    /// `restoring`, `deleting`, `failed`.
    pub state: String,
    /// The instance it is attached to (see [`crate::volumes::attachments`]).
    pub attached_to: Option<String>,
}

/// The env's volumes by name.
pub type Volumes = BTreeMap<String, VolumeFact>;

/// No volumes (an env without any, or a test).
pub static NO_VOLUMES: Volumes = BTreeMap::new();

pub fn cpu_millis(w: &Workload) -> i64 {
    (w.cpu * 1000.0).round() as i64
}

/// Whether `i` runs the release's spec of its workload (release, slot,
/// resources), ignoring where.
pub fn matches(i: &InstanceRow, release: &str, w: &Workload) -> bool {
    i.release_id == release
        && i.slot < i64::from(w.count)
        && i.cpu_millis == cpu_millis(w)
        && i.memory == w.memory as i64
}

/// How long an instance without a health check must have been running to
/// count as ready: one that crashes at once never does.
pub const MIN_READY_MS: i64 = 2_000;

/// The facts of the node `i` is placed on, if any.
pub fn node_of<'f>(i: &InstanceRow, facts: &'f Facts) -> Option<&'f NodeFacts> {
    i.node_id.as_ref().and_then(|n| facts.get(n))
}

/// Running on a node that is online, and healthy when `checked` (else
/// running for [`MIN_READY_MS`]).
pub fn ready(i: &InstanceRow, checked: bool, facts: &Facts, now_ms: i64) -> bool {
    node_of(i, facts).is_some_and(|f| f.online)
        && i.state == "running"
        && match i.healthy() {
            Some(h) => h,
            None => !checked && now_ms - i.updated_at >= MIN_READY_MS,
        }
}

/// Lost: on a node offline for longer than the reschedule grace.
pub fn lost(i: &InstanceRow, facts: &Facts, clock: Clock) -> bool {
    node_of(i, facts)
        .and_then(|f| f.offline_at)
        .is_some_and(|at| clock.now_ms - at >= clock.reschedule_after_ms)
}

/// A workload's instances split by role.
#[derive(Debug, Default)]
pub struct Split<'a> {
    /// Slot → the instance that holds it.
    pub current: BTreeMap<i64, &'a InstanceRow>,
    pub outgoing: Vec<(&'a InstanceRow, StopWhy)>,
    /// Lost instances to stop (their slots are free again).
    pub lost: Vec<&'a InstanceRow>,
    /// Lost but pinned by volumes: kept, waiting for their node.
    pub pinned: Vec<&'a InstanceRow>,
}

/// Splits the goal-`run` instances of workload `name` (spec `w`).
pub fn split<'a>(
    name: &str,
    w: &Workload,
    input: &EnvInput<'a>,
    facts: &Facts,
    clock: Clock,
) -> Split<'a> {
    let mut s = Split::default();
    for i in input
        .instances
        .iter()
        .filter(|i| i.goal == "run" && i.workload == name)
    {
        if lost(i, facts, clock) {
            if w.volumes.is_empty() {
                s.lost.push(i);
                continue;
            }
            s.pinned.push(i);
        }
        let draining = node_of(i, facts).is_some_and(|f| f.draining);
        let why = if !matches(i, input.release_id, w) {
            if i.release_id == input.release_id && i.slot >= i64::from(w.count) {
                StopWhy::ScaledDown
            } else {
                StopWhy::Replaced
            }
        } else if draining {
            StopWhy::Drained
        } else if i.state == "failed" && i.updated_at < input.since_ms {
            StopWhy::Failed
        } else if let Entry::Vacant(slot) = s.current.entry(i.slot) {
            slot.insert(i);
            continue;
        } else {
            StopWhy::Duplicate
        };
        s.outgoing.push((i, why));
    }
    s
}

/// The next actions for one env. `nodes` is the cluster (reservations are
/// updated for what this plan places); `facts` its liveness and drains.
pub fn plan(input: &EnvInput<'_>, nodes: &mut Nodes, facts: &Facts, clock: Clock) -> Vec<Action> {
    let mut actions = Vec::new();
    // Workloads the release no longer has: stop at once.
    for i in input
        .instances
        .iter()
        .filter(|i| i.goal == "run" && !input.manifest.workloads.contains_key(&i.workload))
    {
        actions.push(stop_or_delete(i, StopWhy::ScaledDown));
    }
    for (name, w) in &input.manifest.workloads {
        if w.mode == Mode::PerConnection && w.count > 0 {
            // Per-connection workloads keep no instances (nodes answer
            // their connections with listeners, `listeners.rs`); the
            // manifest and `verge scale` keep their count 0 anyway.
            let mut w = w.clone();
            w.count = 0;
            plan_workload(name, &w, input, nodes, facts, clock, &mut actions);
        } else if w.volumes.is_empty() {
            plan_workload(name, w, input, nodes, facts, clock, &mut actions);
        } else {
            // One instance at a time mounts a volume: the old instance stops
            // before the new one starts, whatever the rollout settings say.
            let mut w = w.clone();
            w.rollout.max_surge = 0;
            w.rollout.max_unavailable = w.rollout.max_unavailable.max(1);
            plan_workload(name, &w, input, nodes, facts, clock, &mut actions);
        }
    }
    // Give back what stopped instances reserved in this snapshot.
    let rows = by_id(input.instances);
    for a in &actions {
        if let Action::Stop { instance, node, .. } = a
            && let Some(i) = rows.get(instance.as_str())
        {
            nodes.reserve(node, -i.cpu_millis, -i.memory);
        }
    }
    actions
}

/// Instance rows by ID.
pub fn by_id(instances: &[InstanceRow]) -> HashMap<&str, &InstanceRow> {
    instances.iter().map(|i| (i.id.as_str(), i)).collect()
}

/// Takes back from `nodes` what [`plan`] reserved and gave back for
/// `actions` (when they will not be applied as planned).
pub fn undo(input: &EnvInput<'_>, actions: &[Action], nodes: &mut Nodes) {
    let rows = by_id(input.instances);
    for a in actions {
        match a {
            Action::Create {
                cpu_millis,
                memory,
                node: Ok(node),
                ..
            } => nodes.reserve(node, -cpu_millis, -memory),
            Action::Place {
                instance,
                node: Ok(node),
            } => {
                if let Some(i) = rows.get(instance.as_str()) {
                    nodes.reserve(node, -i.cpu_millis, -i.memory);
                }
            }
            Action::Stop { instance, node, .. } => {
                if let Some(i) = rows.get(instance.as_str()) {
                    nodes.reserve(node, i.cpu_millis, i.memory);
                }
            }
            _ => {}
        }
    }
}

/// Where a workload's volumes pin its instances.
struct Pin {
    node: String,
    /// The first volume's name.
    volume: String,
    /// Why no new instance may mount the volumes yet: one is still
    /// attached to an instance that is stopping.
    busy: Option<String>,
}

/// The node the workload's volumes pin its instances to, `Ok(None)`
/// without volumes, or why no instance of it can be placed: a volume is
/// missing or not ready, or its volumes are on different nodes.
fn volume_pin(
    w: &Workload,
    input: &EnvInput<'_>,
    current: &BTreeMap<i64, &InstanceRow>,
) -> Result<Option<Pin>, String> {
    let mut pin: Option<Pin> = None;
    let mut busy = None;
    for m in &w.volumes {
        let Some(v) = input.volumes.get(&m.name) else {
            return Err(format!(
                "volume {} does not exist in this env; to fix: create it with \
                 `verge volumes create {} --size SIZE`",
                m.name, m.name
            ));
        };
        if !matches!(v.state.as_str(), "ready" | "resizing") {
            return Err(format!(
                "volume {} is {}; the instance starts when it is ready (see `verge volumes describe {}`)",
                m.name, v.state, m.name
            ));
        }
        if let Some(Pin {
            node,
            volume: first,
            ..
        }) = &pin
            && *node != v.node_id
        {
            return Err(format!(
                "volumes {first} and {} are on different nodes, and an instance runs on one; \
                 to fix: snapshot one and restore it onto the other's node \
                 (`verge volumes restore SNAPSHOT --to NEW --node NODE`), then mount NEW",
                m.name
            ));
        }
        if let Some(other) = &v.attached_to
            && !current.values().any(|i| &i.id == other)
        {
            busy.get_or_insert_with(|| {
                format!(
                    "waiting for volume {} to be released: it is still attached to instance \
                     {other}, which is stopping (one instance at a time mounts a volume)",
                    m.name
                )
            });
        }
        pin.get_or_insert_with(|| Pin {
            node: v.node_id.clone(),
            volume: m.name.clone(),
            busy: None,
        });
    }
    Ok(pin.map(|p| Pin { busy, ..p }))
}

fn stop_or_delete(i: &InstanceRow, why: StopWhy) -> Action {
    match &i.node_id {
        Some(node) => Action::Stop {
            instance: i.id.clone(),
            node: node.clone(),
            why,
        },
        None => Action::Delete {
            instance: i.id.clone(),
        },
    }
}

fn plan_workload(
    name: &str,
    w: &Workload,
    input: &EnvInput<'_>,
    nodes: &mut Nodes,
    facts: &Facts,
    clock: Clock,
    actions: &mut Vec<Action>,
) {
    let s = split(name, w, input, facts, clock);
    // What a held env loses to lost nodes and drain deadlines, refilled as it was.
    let mut refill: Vec<&InstanceRow> = Vec::new();
    for i in &s.lost {
        actions.push(stop_or_delete(i, StopWhy::Lost));
        if input.hold && i.node_id.is_some() {
            refill.push(i);
        }
    }
    let count = i64::from(w.count);
    let checked = w.health.is_some();
    // Outgoing instances on a node, each with whether it serves and
    // whether its node's drain deadline passed.
    let mut outgoing: Vec<(&InstanceRow, StopWhy, bool, bool)> = Vec::new();
    for (i, why) in s.outgoing {
        let overdue = node_of(i, facts).is_some_and(|f| f.drain_overdue);
        if i.node_id.is_none() || (input.hold && overdue) {
            // Never placed: nothing runs, nothing to wait for. A held env
            // takes no rolling steps, but a drain's deadline still holds.
            actions.push(stop_or_delete(i, why));
            if i.node_id.is_some() {
                refill.push(i);
            }
        } else {
            outgoing.push((i, why, ready(i, false, facts, clock.now_ms), overdue));
        }
    }
    if !input.hold {
        let mut serving = s
            .current
            .values()
            .filter(|i| ready(i, checked, facts, clock.now_ms))
            .count() as i64
            + outgoing.iter().filter(|o| o.2).count() as i64;
        let keep = (count - i64::from(w.rollout.max_unavailable)).max(0);
        // Stop what does not serve first, then what serves, newest release last.
        outgoing.sort_by_key(|&(i, _, ready_now, _)| (ready_now, i.created_at));
        outgoing.retain(|&(i, why, ready_now, overdue)| {
            let stop = !ready_now || overdue || serving > keep;
            if stop {
                if ready_now {
                    serving -= 1;
                }
                actions.push(stop_or_delete(i, why));
            }
            !stop
        });
    }

    // Pending instances without a node, and new ones for missing slots.
    let unplaced: Vec<&InstanceRow> = s
        .current
        .values()
        .filter(|i| i.node_id.is_none())
        .copied()
        .collect();
    let mut missing: Vec<i64> = (0..count).filter(|k| !s.current.contains_key(k)).collect();
    if input.hold {
        missing.clear();
    } else {
        let total = (s.current.len() + outgoing.len()) as i64;
        let room = (count + i64::from(w.rollout.max_surge) - total).max(0);
        missing.truncate(room as usize);
    }
    if unplaced.is_empty() && missing.is_empty() && refill.is_empty() {
        return;
    }
    let existing: Vec<&str> = s
        .current
        .values()
        .chain(outgoing.iter().map(|o| &o.0))
        .filter_map(|i| i.node_id.as_deref())
        .collect();
    let pin = volume_pin(w, input, &s.current);
    let pin_label = match &pin {
        Ok(Some(p)) => format!("volume {}", p.volume),
        _ => String::new(),
    };
    let ask = Ask {
        workload: name,
        cpu_millis: cpu_millis(w),
        memory: w.memory as i64,
        constraints: &w.constraints,
        pin: match &pin {
            Ok(Some(p)) => Some((p.node.as_str(), pin_label.as_str())),
            _ => None,
        },
    };
    let n = unplaced.len() + missing.len();
    let mut placed = match &pin {
        Err(why) => vec![Err(why.clone()); n],
        Ok(pin) => {
            let mut placed = scheduler::place(nodes, &ask, &existing, n);
            // The node could take it, but the volume is still attached to
            // another instance: wait (a node problem is said first).
            if let Some(busy) = pin.as_ref().and_then(|p| p.busy.as_ref()) {
                for p in placed.iter_mut() {
                    if let Ok(node) = p {
                        nodes.reserve(node, -ask.cpu_millis, -ask.memory);
                        *p = Err(busy.clone());
                    }
                }
            }
            placed
        }
    }
    .into_iter();
    for i in unplaced {
        let node = placed.next().expect("one result per instance");
        if node.as_ref().err() != i.message.as_ref() {
            actions.push(Action::Place {
                instance: i.id.clone(),
                node,
            });
        }
    }
    for slot in missing {
        actions.push(Action::Create {
            workload: name.to_string(),
            slot,
            release: None,
            cpu_millis: ask.cpu_millis,
            memory: ask.memory,
            node: placed.next().expect("one result per slot"),
        });
    }
    for i in refill {
        let ask = Ask {
            cpu_millis: i.cpu_millis,
            memory: i.memory,
            ..ask
        };
        // Where nothing fits, a held env runs short until its next rollout.
        let Some(Ok(node)) = pin
            .is_ok()
            .then(|| scheduler::place(nodes, &ask, &existing, 1).pop())
            .flatten()
        else {
            continue;
        };
        actions.push(Action::Create {
            workload: name.to_string(),
            slot: i.slot,
            release: Some(i.release_id.clone()),
            cpu_millis: i.cpu_millis,
            memory: i.memory,
            node: Ok(node),
        });
    }
}

#[cfg(test)]
pub(crate) mod tests;
