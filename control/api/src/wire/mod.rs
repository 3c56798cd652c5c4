//! The control plane ⇄ node protocol, carried over QUIC (SPEC §5 Nodes).
//!
//! Two kinds of connection reach the control plane's cluster endpoint,
//! told apart by ALPN:
//!
//! - [`ALPN_JOIN`]: a node without an identity. It has verified the server's
//!   certificate against the CA hash pinned in its [`JoinToken`] before
//!   sending anything; it sends one [`JoinRequest`] on a bidirectional
//!   stream and reads one [`JoinResponse`].
//! - [`ALPN_NODE`]: a node that presents the client certificate it received
//!   at join (mutual TLS). It opens one bidirectional *session stream*, sends
//!   [`NodeMsg::Hello`], and from then on both sides exchange messages on
//!   it: heartbeats and instance reports from the node, desired sets from the
//!   control plane.
//!
//! Every message is one JSON document in a frame prefixed by its length as a
//! big-endian `u32`, at most [`MAX_FRAME`] bytes. Desired sets are
//! level-triggered: each carries the node's *whole* desired instance set and
//! a version, so a node that missed messages (offline, restarted) only needs
//! the latest one.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::manifest::{Restart, Runtime};

#[cfg(feature = "wire-io")]
pub mod io;

/// ALPN of a joining node's connection (no client certificate).
pub const ALPN_JOIN: &[u8] = b"verge-join/1";
/// ALPN of a joined node's session (client certificate required).
pub const ALPN_NODE: &[u8] = b"verge-node/1";
/// ALPN of an ingress's connection: it carries client connections to
/// instances on nodes behind NAT (see [`TunnelOpen`]).
pub const ALPN_INGRESS: &[u8] = b"verge-ingress/1";
/// The longest a node waits between attempts to reconnect to the control
/// plane (its backoff's cap). A control plane that just started gives
/// nodes this long to come back before it marks any of them offline.
pub const RECONNECT_MAX_MS: u64 = 30_000;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A join token: `vjt1.<id>.<secret>.<sha256 of the cluster CA certificate, hex>`.
///
/// The ID finds the stored token, the secret proves possession (the control
/// plane keeps only its hash), and the CA hash lets the node authenticate the
/// control plane before it sends the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    /// SHA-256 of the DER of the cluster CA certificate, lower-case hex.
    pub ca_sha256: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_sha256", &self.ca_sha256)
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vjt1.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid join token: {0}; a join token looks like vjt1.<id>.<secret>.<ca hash>: copy it whole from `verge nodes join-token`"
)]
pub struct BadJoinToken(pub &'static str);

impl FromStr for JoinToken {
    type Err = BadJoinToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some("vjt1") {
            return Err(BadJoinToken("it does not start with \"vjt1.\""));
        }
        let (Some(id), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadJoinToken("it does not have four dot-separated parts"));
        };
        let alnum = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        if !alnum(id) || !alnum(secret) {
            return Err(BadJoinToken(
                "its id or secret is empty or not alphanumeric",
            ));
        }
        if ca.len() != 64 || !ca.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadJoinToken("its CA hash is not 64 hex digits"));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }
}

/// How a node isolates instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Own mount, PID, UTS, IPC and network namespaces, overlayfs rootfs,
    /// cgroup limits, a veth with private addresses.
    Namespaces,
    /// No namespaces (unprivileged development): host processes on loopback
    /// ports, in cgroups when possible.
    None,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isolation::Namespaces => "namespaces",
            Isolation::None => "none",
        })
    }
}

/// What a node offers to instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Cores.
    pub cpu: f64,
    /// Bytes of memory.
    pub memory: u64,
}

/// What a node currently uses (whole machine, as the node sees it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Cores busy, averaged since the previous heartbeat.
    pub cpu: f64,
    /// Bytes of memory in use.
    pub memory: u64,
    /// Bytes used by the node's image store.
    pub images: u64,
    /// Bytes free for new volumes: free space of the volumes' filesystem,
    /// less what existing volumes may still grow into.
    #[serde(default)]
    pub volumes_free: u64,
}

/// The first and only message of a join connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token_id: String,
    pub token_secret: String,
    /// A PKCS#10 request for the node's key, made on the node; the key never leaves it.
    pub csr_pem: String,
    /// The name the node asks for (its hostname by default).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub isolation: Isolation,
    pub version: String,
}

/// The answer to a [`JoinRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum JoinResponse {
    Accepted(Box<Joined>),
    Refused { message: String },
}

/// A node's new identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub node_id: String,
    pub name: String,
    /// The node's certificate, signed by the cluster CA.
    pub cert_pem: String,
    pub ca_pem: String,
    /// The node's instance prefix, e.g. `fd76:6572:6765:1::/64`.
    pub instance_prefix: String,
}

/// Node → control plane, on the session stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMsg {
    /// First message of every session: what the node is and what it runs now.
    Hello {
        version: String,
        labels: BTreeMap<String, String>,
        capacity: Capacity,
        isolation: Isolation,
        /// The desired-set version the node last applied (0: none).
        applied_version: u64,
        instances: Vec<InstanceReport>,
        /// The node cannot be dialled (behind NAT, like most edge gateways):
        /// ingresses reach its instances through this session (see
        /// [`TunnelOpen`]), never by their addresses.
        #[serde(default)]
        behind_nat: bool,
    },
    Heartbeat {
        capacity: Capacity,
        usage: Usage,
        /// Every volume the node holds, with its use.
        #[serde(default)]
        volumes: Vec<VolumeUsage>,
    },
    /// An instance changed state.
    Report(InstanceReport),
    /// Every listener of the node with its counters: sent when one changes
    /// state, and with every heartbeat.
    Listeners { listeners: Vec<ListenerReport> },
}

/// Control plane → node, on the session stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMsg {
    /// The answer to `Hello`.
    Welcome {
        node_id: String,
        name: String,
        /// How often the node should send heartbeats.
        heartbeat_ms: u64,
    },
    Desired(DesiredSet),
}

/// Everything a node should run, replacing any earlier set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredSet {
    /// Increases with every change of this node's set.
    pub version: u64,
    pub instances: Vec<InstanceSpec>,
    /// The per-connection wasm workloads this node answers.
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
}

/// One instance a node should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub id: String,
    pub org: String,
    pub app: String,
    pub env: String,
    pub release: String,
    pub workload: String,
    /// Digest-pinned image reference (`registry/repo:tag@sha256:...`).
    pub image: String,
    /// Replaces the image's entrypoint and command when set.
    pub command: Option<Vec<String>>,
    /// Environment for the process, on top of the image's.
    pub env_vars: BTreeMap<String, String>,
    /// Cores.
    pub cpu: f64,
    /// Bytes.
    pub memory: u64,
    pub restart: Restart,
    /// The port the workload serves on, when the release says (endpoint
    /// `internal_port` or health check port); passed as `PORT`.
    pub port: Option<u16>,
    /// The workload's TCP health check, run by the node against the
    /// instance's address; `None` when it has none (then running is ready).
    #[serde(default)]
    pub health: Option<crate::manifest::Health>,
    /// Milliseconds the node waits, once the instance left its desired set,
    /// before it stops it: the longest drain timeout of the endpoints in
    /// front of the workload, so that connections the ingress no longer
    /// adds to can finish. 0 without endpoints.
    #[serde(default)]
    pub drain_ms: u64,
    /// Volumes to mount, each at its path in the instance.
    #[serde(default)]
    pub volumes: Vec<VolumeAttach>,
    /// Secret files to deliver on a tmpfs in the instance (never to disk).
    #[serde(default)]
    pub secrets: Vec<SecretFile>,
    /// How the instance runs: a process from an OCI image, or a
    /// WebAssembly module or component from an OCI wasm artifact (then
    /// `command` is its arguments and volumes and secret files are
    /// preopened directories).
    #[serde(default)]
    pub runtime: Runtime,
    /// Wasm: the most CPU time the instance may use without waiting for
    /// input or output before it is stopped as a runaway loop.
    #[serde(default = "default_max_cpu_time_ms")]
    pub max_cpu_time_ms: u64,
}

fn default_max_cpu_time_ms() -> u64 {
    crate::manifest::defaults::MAX_CPU_TIME_MS
}

/// A per-connection wasm workload the node answers (`mode =
/// "per-connection"`): the node listens on the workload's internal ports
/// and starts a fresh instance of the module or component for every
/// connection it accepts, with the connection as its stdin and stdout (its
/// stderr goes to the listener's logs). Nothing runs between connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerSpec {
    /// Unique on the node, stable for a release's workload; also the name
    /// of its logs (like an instance ID).
    pub id: String,
    pub org: String,
    pub app: String,
    pub env: String,
    pub release: String,
    pub workload: String,
    /// Digest-pinned OCI wasm artifact reference.
    pub image: String,
    /// The instances' arguments (after the program name).
    pub command: Option<Vec<String>>,
    pub env_vars: BTreeMap<String, String>,
    /// Cores, for each instance's CPU share.
    pub cpu: f64,
    /// Bytes: each instance's memory limit.
    pub memory: u64,
    pub max_cpu_time_ms: u64,
    /// Most connections served at once (more wait to be accepted).
    pub concurrency: u32,
    /// The internal ports of the endpoints in front of the workload.
    pub ports: Vec<u16>,
    /// Milliseconds open connections may still take once the listener left
    /// the desired set (it accepts nothing new meanwhile).
    #[serde(default)]
    pub drain_ms: u64,
    /// Secret files, preopened read-only in every instance.
    #[serde(default)]
    pub secrets: Vec<SecretFile>,
}

/// Where a node's listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerState {
    /// Pulling and compiling, or binding.
    Starting,
    /// Accepting connections.
    Listening,
    /// It could not start (`message` says why); the node retries.
    Failed,
}

impl fmt::Display for ListenerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerState::Starting => "starting",
            ListenerState::Listening => "listening",
            ListenerState::Failed => "failed",
        })
    }
}

/// A listener as its node reports it, with its connection counters since
/// it started on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReport {
    pub id: String,
    pub state: ListenerState,
    pub message: Option<String>,
    /// Where it listens: an IP address (ports are the spec's), or
    /// `127.0.0.1:port` on a node without networking (its first port).
    pub address: Option<String>,
    /// Connections being served now (each by its own instance).
    pub active: u32,
    /// Connections served to the end.
    pub served: u64,
    /// Connections whose instance failed (trap, memory limit, CPU limit).
    pub failed: u64,
    /// The latest failure, for people: `trap: ...`.
    pub last_failure: Option<String>,
    /// Its category (`crash`, `oom`).
    pub last_failure_category: Option<ErrorCategory>,
    /// Milliseconds since the epoch, on the node's clock.
    pub at_ms: i64,
}

/// A volume mounted into an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttach {
    /// The volume's ID: the node keeps it under `<data>/volumes/<id>/`.
    pub volume: String,
    /// Its name, for messages.
    pub name: String,
    /// Absolute path in the instance.
    pub path: String,
}

/// A secret bundle version rendered as a file (see
/// [`crate::manifest::SecretFormat`]). Its `Debug` never shows the contents.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFile {
    pub bundle: String,
    pub version: i64,
    /// Absolute path of the file in the instance.
    pub path: String,
    pub contents: String,
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretFile")
            .field("bundle", &self.bundle)
            .field("version", &self.version)
            .field("path", &self.path)
            .field(
                "contents",
                &format_args!("<{} bytes redacted>", self.contents.len()),
            )
            .finish()
    }
}

/// One volume a node holds, in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub volume: String,
    /// Bytes.
    pub size: u64,
    pub used: u64,
    /// `loop` or `directory`.
    pub backend: String,
}

/// The first frame of a volume stream: one operation on the node's
/// volumes. The node answers with one [`VolumeReply`], except for
/// `Export` and `Import`, which carry a snapshot's data (see those).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum VolumeOp {
    /// A new empty volume of `size` bytes. Idempotent: an existing volume
    /// of that ID and size is `Done`.
    Create {
        volume: String,
        size: u64,
    },
    /// Grow to `size` bytes, online (mounted or not). Never shrinks.
    Resize {
        volume: String,
        size: u64,
    },
    /// A point-in-time copy of the volume, consistent even while it is
    /// written (the filesystem is frozen while it is copied).
    Snapshot {
        volume: String,
        snapshot: String,
    },
    /// The volume's data replaced by the snapshot's (the volume grows to
    /// the snapshot's size if smaller). Refused while an instance of this
    /// node mounts it.
    Restore {
        volume: String,
        snapshot: String,
    },
    /// Refused while an instance of this node mounts it. Snapshots stay.
    Delete {
        volume: String,
    },
    DeleteSnapshot {
        snapshot: String,
    },
    /// The node answers `Exporting`, then sends the snapshot's data as
    /// [`volume_data`] chunks and finishes the stream.
    Export {
        snapshot: String,
    },
    /// The control plane sends the data of an `Export` of a snapshot of
    /// `size` bytes as [`volume_data`] chunks and finishes its side; the node
    /// makes volume `volume` of it and answers one [`VolumeReply`].
    Import {
        volume: String,
        size: u64,
    },
}

impl VolumeOp {
    /// What the operation is, for logs and spans: `create`, `resize`, ...
    pub fn name(&self) -> &'static str {
        match self {
            VolumeOp::Create { .. } => "create",
            VolumeOp::Resize { .. } => "resize",
            VolumeOp::Snapshot { .. } => "snapshot",
            VolumeOp::Restore { .. } => "restore",
            VolumeOp::Delete { .. } => "delete",
            VolumeOp::DeleteSnapshot { .. } => "delete_snapshot",
            VolumeOp::Export { .. } => "export",
            VolumeOp::Import { .. } => "import",
        }
    }
}

/// The node's answer to a [`VolumeOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum VolumeReply {
    /// Done; the volume (or snapshot) as it is now.
    Done { usage: VolumeUsage },
    /// An `Export` starts: `size` bytes of volume, then data chunks.
    Exporting { size: u64 },
    Failed {
        message: String,
        /// The operation failed after it had changed the volume (a restore
        /// that replaced the data but could not mount it again): the
        /// volume is unusable until repaired, not unchanged.
        #[serde(default)]
        damaged: bool,
    },
}

/// The data of an `Export` / `Import`: chunks, each a 12-byte header
/// (offset: u64 big-endian, length: u32 big-endian) and `length` bytes,
/// covering only the snapshot's data regions (holes are skipped); the last
/// chunk has length 0 and offset = the size.
pub mod volume_data {
    /// Header bytes of a chunk.
    pub const HEADER: usize = 12;
    /// The largest chunk length.
    pub const MAX_CHUNK: u32 = 1 << 20;

    pub fn header(offset: u64, len: u32) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(&offset.to_be_bytes());
        h[8..].copy_from_slice(&len.to_be_bytes());
        h
    }

    pub fn parse(h: &[u8; HEADER]) -> (u64, u32) {
        let offset = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[8..].try_into().expect("4 bytes"));
        (offset, len)
    }
}

/// The first frame of an ingress connection's first stream: the ingress
/// proves it holds a cluster admin token; the control plane answers with
/// a [`TunnelReply`] and accepts tunnel streams only after `Connected`.
#[derive(Clone, Serialize, Deserialize)]
pub struct IngressHello {
    pub token: String,
    /// The ingress's name, for logs.
    pub name: String,
}

impl fmt::Debug for IngressHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngressHello")
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .finish()
    }
}

/// The first frame of a tunnel stream: one client connection to one
/// instance. The ingress sends it to the control plane, which sends it on
/// to the instance's node on a stream of the node's session; the node
/// connects to the instance's address on `port` and answers with a
/// [`TunnelReply`]. After `Connected`, the stream carries the connection's
/// raw bytes both ways (PROXY v2 header first when the endpoint has one),
/// and finishing a side of the stream half-closes that side of the TCP
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelOpen {
    pub instance: String,
    /// The node that runs it (the control plane looks up its session).
    pub node: String,
    /// The instance port (the endpoint's `internal_port`).
    pub port: u16,
}

/// The first frame of every stream the control plane opens on a node's
/// session: what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "open", rename_all = "snake_case")]
pub enum NodeStream {
    /// A client connection to an instance (the QUIC path of an ingress).
    Tunnel(TunnelOpen),
    /// Log records of some instances of this node.
    Logs(LogsOpen),
    /// A command run in an instance.
    Exec(ExecOpen),
    /// An operation on the node's volumes.
    Volume(VolumeOp),
}

/// Which log records a node should send on a logs stream. The node answers
/// with [`LogsFrame`]s: the stored records that match, oldest first and
/// merged across the instances, then [`LogsFrame::HistoryEnd`], then (with
/// `follow`) new records as they are written, until the stream is stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsOpen {
    /// Instance IDs; those the node keeps no logs of are answered with
    /// [`LogsFrame::Missing`].
    pub instances: Vec<String>,
    #[serde(default)]
    pub source: Option<crate::logs::LogSource>,
    /// The least severity sent.
    #[serde(default)]
    pub min_severity: Option<crate::logs::Severity>,
    /// Microseconds since the epoch, inclusive.
    #[serde(default)]
    pub since_us: Option<u64>,
    /// Microseconds since the epoch, exclusive.
    #[serde(default)]
    pub until_us: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

/// A node's frames on a logs stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogsFrame {
    /// Records in time order (within the history, across frames too).
    Records {
        records: Vec<crate::logs::InstanceRecord>,
    },
    /// The stored history is complete; what follows is live.
    HistoryEnd,
    /// The node has no logs of this instance (never ran here, or pruned).
    Missing { instance: String, reason: String },
}

/// The first frame of an exec stream: run `command` in `instance`. The
/// node answers with an [`ExecReply`]; after `Started`, the stream carries
/// [`crate::exec::Frame`]s both ways, and ends with `Exit` or `Error`. A
/// stream that ends or is reset before that ends the command (and every
/// process it started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOpen {
    pub instance: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub size: Option<crate::exec::WinSize>,
    #[serde(default)]
    pub term: Option<String>,
}

/// The node's answer to an [`ExecOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ExecReply {
    Started,
    /// Not started; `busy` when the instance's concurrent session limit
    /// is reached.
    Refused {
        message: String,
        #[serde(default)]
        busy: bool,
    },
}

/// The answer to an [`IngressHello`] or a [`TunnelOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TunnelReply {
    Connected,
    Refused { message: String },
}

/// An instance's state (SPEC §5): `pending → pulling → starting → running → stopping → stopped | failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Pulling,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Pulling => "pulling",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an instance failed or restarted (SPEC §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCategory {
    ImagePull,
    Start,
    Crash,
    Health,
    Oom,
    Placement,
    NodeLost,
}

impl ErrorCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::ImagePull => "image_pull",
            ErrorCategory::Start => "start",
            ErrorCategory::Crash => "crash",
            ErrorCategory::Health => "health",
            ErrorCategory::Oom => "oom",
            ErrorCategory::Placement => "placement",
            ErrorCategory::NodeLost => "node_lost",
        }
    }
}

impl fmt::Display for ErrorCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance's state as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub id: String,
    pub state: InstanceState,
    /// Set when the instance failed, or exited and is being restarted.
    pub category: Option<ErrorCategory>,
    /// What happened, for people (`exited with code 3`, `killed: out of memory (limit 64Mi)`).
    pub message: Option<String>,
    /// Where the instance serves: `[addr]:port` or an IP address.
    pub address: Option<String>,
    pub restarts: u32,
    /// Milliseconds since the epoch, on the node's clock.
    pub at_ms: i64,
    /// The health verdict of a running instance with a health check:
    /// `Some(true)` once a check passed, `Some(false)` after
    /// [`crate::manifest::defaults::HEALTH_FAILURES`] failed in a row;
    /// `None` without a check, before the first verdict, or when not running.
    #[serde(default)]
    pub healthy: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_round_trips_and_rejects_garbage() {
        let t = JoinToken {
            id: "abc".into(),
            secret: "s3cret".into(),
            ca_sha256: "a".repeat(64),
        };
        assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains("s3cret"));
        for bad in [
            "",
            "vjt2.a.b.cc",
            "vjt1.a.b",
            "vjt1.a.b.c.d",
            "vjt1..b.aaaa",
            &format!("vjt1.a.b.{}", "z".repeat(64)),
        ] {
            let err = bad.parse::<JoinToken>().unwrap_err().to_string();
            assert!(err.contains("verge nodes join-token"), "{bad}: {err}");
        }
    }

    #[test]
    fn messages_are_tagged_json() {
        let msg = NodeMsg::Report(InstanceReport {
            id: "i1".into(),
            state: InstanceState::Failed,
            category: Some(ErrorCategory::Oom),
            message: None,
            address: None,
            restarts: 2,
            at_ms: 1,
            healthy: None,
        });
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(json["type"], "report");
        assert_eq!(json["state"], "failed");
        assert_eq!(json["category"], "oom");
    }
}
