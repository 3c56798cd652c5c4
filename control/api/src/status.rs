//! Observed state: `verge status`, `verge describe env|workload`, events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::SecretBundle;
use crate::manifest::{Endpoint, Mode, Runtime, Workload};
use crate::release::{ReleaseRef, Target};

/// `GET .../envs/{env}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub target: Target,
    /// The env's current release; `None` before the first deploy.
    pub release: Option<ReleaseRef>,
    pub rollout: Rollout,
    pub workloads: Vec<WorkloadStatus>,
}

/// A rollout: the env moving to a release (deploy, rollback, scale), one
/// health-gated step at a time. `verge status` shows the latest one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `pending`, `in_progress`, `completed`, `failed`, `partial`, `canceled`.
    pub state: String,
    /// Why it is not `completed`, when it is not.
    pub reason: Option<String>,
    /// `None` only for an env without any rollout yet.
    #[serde(default)]
    pub id: Option<String>,
    /// The number of the release it rolls out.
    #[serde(default)]
    pub release: Option<i64>,
    /// The release the env was on before (`None` for the first).
    #[serde(default)]
    pub from_release: Option<i64>,
    /// `deploy`, `rollback`, `scale`, `auto_rollback`, `cancel` (back to
    /// `from_release` after `verge rollout cancel`).
    #[serde(default)]
    pub kind: Option<String>,
    /// The step it is on, or failed at (`pulling image of instance i_.. on n1`).
    #[serde(default)]
    pub step: Option<String>,
    /// The error category of a failure (`image_pull`, `health`, `placement`, ...).
    #[serde(default)]
    pub category: Option<String>,
    /// Instances the release asks for.
    #[serde(default)]
    pub total: u32,
    /// Of those, running and healthy.
    #[serde(default)]
    pub done: u32,
    /// Of those, failed.
    #[serde(default)]
    pub failed: u32,
    /// `done / total` (1.0 for an empty release).
    #[serde(default)]
    pub success_rate: f64,
    /// Instances of earlier releases (or leaving draining and lost nodes)
    /// still running.
    #[serde(default)]
    pub outgoing: u32,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub ended_at: Option<String>,
    /// Per instance of the release: its progress.
    #[serde(default)]
    pub instances: Vec<RolloutInstance>,
}

/// One instance of a rollout's release and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutInstance {
    pub id: String,
    pub workload: String,
    pub node: Option<String>,
    /// Instance state, or `healthy` once running and passing its check.
    pub state: String,
    pub reason: Option<String>,
}

impl Rollout {
    pub fn is_completed(&self) -> bool {
        self.state == "completed"
    }

    pub fn is_final_failure(&self) -> bool {
        matches!(self.state.as_str(), "failed" | "partial" | "canceled")
    }

    /// Still moving: `pending` or `in_progress`.
    pub fn is_active(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "in_progress")
    }
}

/// `POST .../envs/{env}/rollout/cancel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelRollout {
    /// Why, recorded in the env's events.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub desired: u32,
    pub running: u32,
    pub instances: Vec<InstanceStatus>,
    /// `process` or `wasm`.
    #[serde(default)]
    pub runtime: Runtime,
    /// `long-running`, or `per-connection`: no instances (`desired` and
    /// `running` are 0); every matching node answers its connections with
    /// a listener, which starts a fresh instance per connection.
    #[serde(default = "long_running")]
    pub mode: Mode,
    /// Per-connection workloads: the listener of each node that reported
    /// one, of the current release or an earlier one still draining.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
}

fn long_running() -> Mode {
    Mode::LongRunning
}

impl WorkloadStatus {
    /// Per-connection: the listeners that take connections now.
    pub fn answering(&self) -> impl Iterator<Item = &ListenerStatus> {
        self.listeners.iter().filter(|l| l.answering)
    }

    /// Per-connection: the listener whose connection failed last, if any did.
    pub fn last_failure(&self) -> Option<&ListenerStatus> {
        self.listeners
            .iter()
            .filter(|l| l.last_failure.is_some())
            .max_by(|a, b| a.last_failure_at.cmp(&b.last_failure_at))
    }
}

/// A node's listener for a per-connection workload, with its connection
/// counters since it started on that node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// `lst-<release id>-<workload>`: also the name of its logs.
    pub id: String,
    /// The node's name.
    pub node: Option<String>,
    /// `starting`, `listening` or `failed` (could not start; the node retries).
    pub state: String,
    /// Where it listens: an IP address (on the endpoints' internal
    /// ports), or `127.0.0.1:port` on a node without networking.
    pub address: Option<String>,
    /// Whether the ingress sends it new connections: the current release,
    /// listening, on an online node.
    pub answering: bool,
    /// Why not, when it does not (or what the node said).
    pub reason: Option<String>,
    /// The number of the release it answers for.
    pub release: Option<i64>,
    /// Connections being served now, each by its own instance.
    pub active: u64,
    /// Connections served to the end.
    pub served: u64,
    /// Connections whose instance failed (trap, memory or CPU time limit).
    pub failed: u64,
    /// The latest of those failures, for people, and its category (`crash`, `oom`).
    pub last_failure: Option<String>,
    pub last_failure_category: Option<String>,
    /// When the control plane learnt of it (RFC 3339).
    pub last_failure_at: Option<String>,
}

/// An instance of the env: `node` is `None` while it is `pending` without a
/// node (then `reason` says why). `id` is always set by this version; it is
/// optional for clients of older control planes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: Option<String>,
    pub node: Option<String>,
    pub state: String,
    pub address: Option<String>,
    pub reason: Option<String>,
    /// `healthy` or `unhealthy` for a running instance with a health
    /// check once checked; `None` otherwise.
    #[serde(default)]
    pub health: Option<String>,
    /// The number of the release it runs.
    #[serde(default)]
    pub release: Option<i64>,
    /// The error category its node last reported (`crash`, `oom`,
    /// `image_pull`, ...), also at the start of `reason`.
    #[serde(default)]
    pub category: Option<String>,
    /// What its node (or the scheduler) last said about it, alone.
    #[serde(default)]
    pub message: Option<String>,
}

/// `verge describe env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvDetail {
    pub id: String,
    pub target: Target,
    pub created_at: String,
    pub release: Option<ReleaseRef>,
    pub releases: i64,
    pub config_version: i64,
    /// Names of the env vars (values: `verge env list`).
    pub vars: Vec<String>,
    pub secrets: Vec<SecretBundle>,
    /// Workload → scale set by `verge scale`, kept across deploys.
    pub scale: BTreeMap<String, ScaleOverride>,
    pub rollout: Rollout,
}

/// What `verge scale` set for a workload; `None` fields follow the manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleOverride {
    pub count: Option<u32>,
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
}

impl ScaleOverride {
    pub fn is_empty(&self) -> bool {
        self.count.is_none() && self.cpu.is_none() && self.memory.is_none()
    }
}

/// `verge describe workload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadDetail {
    pub name: String,
    pub target: Target,
    pub release: ReleaseRef,
    /// The effective spec: the release's manifest with `scale` applied.
    pub spec: Workload,
    pub scale: ScaleOverride,
    pub endpoints: Vec<Endpoint>,
    pub status: WorkloadStatus,
}

/// One entry of the event stream. `cursor` orders events and resumes a
/// stream (`?after=CURSOR`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub cursor: i64,
    pub time: String,
    pub kind: String,
    pub message: String,
    /// `None` for an event of the cluster itself (nodes).
    pub org: Option<String>,
    pub app: Option<String>,
    pub env: Option<String>,
    pub release: Option<String>,
    pub instance: Option<String>,
    pub node: Option<String>,
    /// The token that caused it, `name (id)`; `None` for the system.
    pub actor: Option<String>,
}
