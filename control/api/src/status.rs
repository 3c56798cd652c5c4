//! Observed state: `verge status`, `verge describe env|workload`, events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::SecretBundle;
use crate::manifest::{Endpoint, Workload};
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

/// Progress toward the current release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// `pending`, `in_progress`, `completed`, `failed`, `partial`, `canceled`.
    pub state: String,
    /// Why it is not `completed`, when it is not.
    pub reason: Option<String>,
}

impl Rollout {
    pub fn is_completed(&self) -> bool {
        self.state == "completed"
    }

    pub fn is_final_failure(&self) -> bool {
        matches!(self.state.as_str(), "failed" | "partial" | "canceled")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub desired: u32,
    pub running: u32,
    pub instances: Vec<InstanceStatus>,
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
