//! The manifest, `verge.toml` (SPEC §3): what an app declares about itself.
//!
//! [`parse`] turns the text into a [`Manifest`] or into *every* problem of
//! the file at once, each with `file:line:column`, the key's path and what
//! was expected (`verge.toml:14:9: workloads.web.memory: expected a size
//! like "256Mi", found "lots"`). Unknown keys are errors with a did-you-mean
//! suggestion. The types serialise to JSON: a release stores its manifest
//! snapshot that way.

mod check;
mod sections;
#[cfg(test)]
mod tests;
mod units;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use check::{ManifestError, ManifestErrors, parse};
pub use units::{format_size, human_size, parse_size};

/// A commented example manifest, as `verge init` writes it.
pub const EXAMPLE: &str = include_str!("example.toml");

/// A parsed, validated `verge.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub app: String,
    /// Plain environment variables baked into the release.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What must be set in the target env before a deploy.
    #[serde(default)]
    pub require: Require,
    pub workloads: BTreeMap<String, Workload>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// Gates: env vars and secret bundles that must exist in the target env.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Require {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// One process type of the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub runtime: Runtime,
    /// An OCI reference; pinned to a digest when a release is created.
    pub image: String,
    /// Overrides the image's entrypoint and command.
    pub command: Option<Vec<String>>,
    pub count: u32,
    /// Cores (0.5 = half a core).
    pub cpu: f64,
    /// Bytes.
    pub memory: u64,
    pub restart: Restart,
    pub mode: Mode,
    pub health: Option<Health>,
    pub volumes: Vec<VolumeMount>,
    pub secrets: Vec<SecretMount>,
    /// Node labels an instance's node must carry.
    pub constraints: BTreeMap<String, String>,
    pub rollout: Rollout,
    /// Per-connection workloads: the most connections each node serves at
    /// once (each with its own instance); more wait in the listen queue.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    /// Wasm workloads: the most CPU time an instance may use without
    /// waiting for input or output (a runaway loop is stopped after it).
    #[serde(default = "defaults::max_cpu_time_ms")]
    pub max_cpu_time_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    #[default]
    Process,
    Wasm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `count` instances that run until stopped.
    LongRunning,
    /// A fresh instance per TCP connection (wasm only); can scale to zero.
    PerConnection,
}

/// A TCP health check, run on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub tcp: u16,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMount {
    pub bundle: String,
    pub path: String,
    /// How the file is written; default `env`.
    #[serde(default)]
    pub format: SecretFormat,
}

/// The format of a delivered secret file.
///
/// - `env`: one `KEY=value` line per key, sorted by key. A value with a
///   newline, a backslash or a double quote at either end is written
///   `KEY="..."` with `\n`, `\\` and `\"` escapes (dotenv style).
/// - `json`: one JSON object, `{"KEY": "value", ...}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretFormat {
    #[default]
    Env,
    Json,
}

impl SecretFormat {
    /// The file's contents for `values` (key → value, sorted).
    pub fn render(self, values: &std::collections::BTreeMap<String, String>) -> String {
        match self {
            SecretFormat::Json => {
                let mut s = serde_json::to_string_pretty(values).expect("a map serialises");
                s.push('\n');
                s
            }
            SecretFormat::Env => {
                let mut s = String::new();
                for (k, v) in values {
                    let plain = !v.contains(['\n', '\r'])
                        && !v.contains('\\')
                        && !v.starts_with('"')
                        && !v.ends_with('"');
                    s.push_str(k);
                    s.push('=');
                    if plain {
                        s.push_str(v);
                    } else {
                        s.push('"');
                        for c in v.chars() {
                            match c {
                                '\n' => s.push_str("\\n"),
                                '\r' => s.push_str("\\r"),
                                '\\' => s.push_str("\\\\"),
                                '"' => s.push_str("\\\""),
                                c => s.push(c),
                            }
                        }
                        s.push('"');
                    }
                    s.push('\n');
                }
                s
            }
        }
    }
}

/// How a rollout replaces instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub auto_rollback: bool,
    /// How long a rollout may go without progress (one more new instance
    /// ready) before it ends `failed`. Absent from releases made before it
    /// existed: those get the default.
    #[serde(default = "defaults::rollout_deadline_ms")]
    pub deadline_ms: u64,
}

/// An L4 ingress mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub name: String,
    pub workload: String,
    /// External ports (at least one).
    pub ports: Vec<u16>,
    pub internal_port: u16,
    pub ipv4: bool,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// What the ingress enforces per connection and per endpoint. Absent
    /// from releases made before it existed: those get the defaults.
    #[serde(default)]
    pub limits: EndpointLimits,
}

/// An endpoint's connection limits and timeouts (`idle_timeout`,
/// `max_connections`, `rate_limit`, `drain_timeout` in `[[endpoints]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointLimits {
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout_ms: u64,
    /// Connections open at once through one ingress; more are closed on accept.
    pub max_connections: u32,
    /// New connections per second from one source address (bursts of as
    /// many are allowed); more are closed on accept.
    pub rate_limit: u32,
    /// How long connections to an instance that left the routing table
    /// (rollout, scale-down, stop) may go on before they are closed; the
    /// node waits as long before it stops the instance.
    pub drain_timeout_ms: u64,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            idle_timeout_ms: defaults::IDLE_TIMEOUT_MS,
            max_connections: defaults::MAX_CONNECTIONS,
            rate_limit: defaults::RATE_LIMIT,
            drain_timeout_ms: defaults::DRAIN_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    V2,
}

/// Defaults of a workload's optional fields.
pub mod defaults {
    pub const COUNT: u32 = 1;
    pub const CPU: f64 = 0.25;
    pub const MEMORY: u64 = 256 * 1024 * 1024;
    pub const HEALTH_INTERVAL_MS: u64 = 5_000;
    pub const HEALTH_TIMEOUT_MS: u64 = 2_000;
    pub const MAX_SURGE: u32 = 1;
    pub const MAX_UNAVAILABLE: u32 = 0;
    pub const ROLLOUT_DEADLINE_MS: u64 = 5 * 60 * 1000;
    /// Consecutive failed health checks that make an instance unhealthy.
    pub const HEALTH_FAILURES: u32 = 3;
    /// Endpoint limits (see [`super::EndpointLimits`]).
    pub const IDLE_TIMEOUT_MS: u64 = 10 * 60 * 1000;
    pub const MAX_CONNECTIONS: u32 = 10_000;
    pub const RATE_LIMIT: u32 = 100;
    pub const DRAIN_TIMEOUT_MS: u64 = 30 * 1000;
    /// Per-connection workloads: connections served at once per node.
    pub const CONCURRENCY: u32 = 100;
    /// Wasm workloads: CPU time without waiting for I/O before an instance
    /// counts as a runaway loop and is stopped.
    pub const MAX_CPU_TIME_MS: u64 = 10_000;

    pub(crate) fn concurrency() -> u32 {
        CONCURRENCY
    }

    pub(crate) fn max_cpu_time_ms() -> u64 {
        MAX_CPU_TIME_MS
    }

    pub(crate) fn rollout_deadline_ms() -> u64 {
        ROLLOUT_DEADLINE_MS
    }
}
