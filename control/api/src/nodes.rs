//! Nodes as the API shows them (`verge nodes ...`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::Usage;

/// `POST /v1/nodes/join-tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateJoinToken {
    /// Seconds until the token expires; default one hour.
    pub ttl_secs: Option<u64>,
    /// How many nodes may join with it; default one.
    #[serde(default)]
    pub uses: Option<u64>,
}

/// A new join token and how to use it. The token is shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenCreated {
    pub id: String,
    pub token: String,
    pub expires_at: String,
    /// How many nodes may join with it.
    pub uses: u64,
    /// `host:port` of the cluster endpoint nodes dial.
    pub server: String,
    /// SHA-256 of the cluster CA certificate, also inside the token.
    pub ca_sha256: String,
    /// The command that joins a node with this token.
    pub command: String,
}

/// A node in `verge nodes list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    /// `online` or `offline`.
    pub state: String,
    /// Since when it is in that state.
    pub state_since: String,
    pub labels: BTreeMap<String, String>,
    /// `namespaces` or `none`.
    pub isolation: String,
    /// Capacity: cores and bytes.
    pub cpu: f64,
    pub memory: u64,
    /// Reserved by instances placed on it.
    pub cpu_reserved: f64,
    pub memory_reserved: u64,
    /// From the last heartbeat.
    pub usage: Option<Usage>,
    pub last_seen: Option<String>,
    pub instance_prefix: String,
    pub instances: u32,
    pub version: String,
    /// `draining` (instances moving away) or `drained`; `None` when schedulable.
    #[serde(default)]
    pub drain: Option<String>,
    /// When a drain stops whatever is left.
    #[serde(default)]
    pub drain_deadline: Option<String>,
}

/// `verge nodes describe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: Node,
    pub joined_at: String,
    pub instances_detail: Vec<NodeInstance>,
}

/// An instance as seen from its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInstance {
    pub id: String,
    pub org: String,
    pub app: String,
    pub env: String,
    pub workload: String,
    pub release: String,
    pub state: String,
    pub category: Option<String>,
    pub address: Option<String>,
    pub restarts: u32,
}

/// `POST /v1/nodes/{name}/drain`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainNode {
    /// After this long, instances still on the node are stopped even when
    /// their replacements are not healthy yet; `None`: the default (5 min).
    #[serde(default)]
    pub deadline_secs: Option<u64>,
}
