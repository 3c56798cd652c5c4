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

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};

use verge_api::manifest::{Manifest, Runtime, Workload};

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
}

/// Liveness and drain of nodes, by ID.
pub type Facts = BTreeMap<String, NodeFacts>;

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
        plan_workload(name, w, input, nodes, facts, clock, &mut actions);
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
    let pinned_to = s.pinned.first().and_then(|i| i.node_id.clone());
    let ask = Ask {
        workload: name,
        cpu_millis: cpu_millis(w),
        memory: w.memory as i64,
        constraints: &w.constraints,
        pin: pinned_to
            .as_deref()
            .map(|n| (n, "the workload's volumes are on")),
    };
    let wasm = (w.runtime == Runtime::Wasm)
        .then_some("no node runs WebAssembly workloads yet: nodes run runtime = \"process\" only");
    let mut placed = match wasm {
        Some(why) => vec![Err(why.to_string()); unplaced.len() + missing.len()],
        None => scheduler::place(nodes, &ask, &existing, unplaced.len() + missing.len()),
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
        let Some(Ok(node)) = wasm
            .is_none()
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
