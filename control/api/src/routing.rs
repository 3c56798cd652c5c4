//! The routing table: what the control plane tells ingress daemons
//! (SPEC §5 Ingress), and what ingresses report back.
//!
//! An ingress watches `GET /v1/ingress/routes?watch=true`: a stream of
//! newline-delimited JSON, one whole [`RoutingTable`] per line whenever it
//! changes (level-triggered, like node desired sets), and an empty line
//! every [`KEEPALIVE_MS`] so that a dead connection is noticed. The table
//! lists every endpoint of every env's current release with the addresses
//! it listens on and its *backends*: the instances that are running,
//! healthy and not leaving. An instance that leaves the table (rollout,
//! scale-down, stop, failed health) gets no new connections; its open ones
//! go on until the endpoint's drain timeout.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::manifest::{EndpointLimits, ProxyProtocol};

/// How often a watch stream carries a keepalive line when nothing changed.
pub const KEEPALIVE_MS: u64 = 10_000;

/// Every endpoint the ingress should serve.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Identifies the content: equal tables have equal versions (a digest of
    /// the endpoints, not a counter, so that every control-plane replica
    /// computes the same version for the same state).
    pub version: String,
    /// The prefix endpoint IPv6 addresses come from; the ingress adds a
    /// `local` route for it so that it can listen on any of them. `None`
    /// when endpoints share the loopback address `::1`.
    pub ipv6_prefix: Option<Ipv6Net>,
    /// Likewise for IPv4 addresses of endpoints with `ipv4 = true`.
    pub ipv4_pool: Option<Ipv4Net>,
    pub endpoints: Vec<Route>,
}

/// Where an ingress reaches the control plane's cluster endpoint for the
/// QUIC path (`GET /v1/ingress/cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// `host:port` of the QUIC cluster endpoint.
    pub quic: String,
    /// The cluster CA certificate that signs the endpoint's certificate.
    pub ca_pem: String,
}

/// One endpoint: where it listens and where it sends connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The endpoint's allocation ID (stable across releases of its env).
    pub id: String,
    pub name: String,
    pub org: String,
    pub app: String,
    pub env: String,
    pub workload: String,
    /// The endpoint's own IPv6 address (or the shared loopback `::1` when
    /// the control plane has no ingress prefix to allocate from).
    pub ipv6: Ipv6Addr,
    /// Only for endpoints with `ipv4 = true`.
    pub ipv4: Option<Ipv4Addr>,
    /// External ports, listened on at every address of the endpoint.
    pub ports: Vec<u16>,
    /// The instances' port (what a QUIC tunnel stream asks the node for).
    pub internal_port: u16,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub limits: EndpointLimits,
    /// Instances that take new connections: running, healthy, staying.
    pub backends: Vec<Backend>,
}

/// One instance behind an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub instance: String,
    /// The node's ID (what an ingress started with `--node` compares to
    /// prefer instances on its own machine, and what the QUIC path names).
    pub node: String,
    pub node_name: String,
    /// The instance's address and the endpoint's internal port.
    pub address: SocketAddr,
    pub reach: Reach,
}

/// How the ingress gets to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// A TCP connection to the instance's private address (the cluster's
    /// instance prefixes are routed to the ingress).
    Direct,
    /// A QUIC stream through the node's session with the control plane,
    /// which the node hands to the instance: for nodes behind NAT.
    Tunnel,
}

/// What an ingress reports to `POST /v1/ingress/status` after it applied a
/// table (and every [`KEEPALIVE_MS`] while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngressReport {
    /// The ingress's name (`--name`, its hostname by default).
    pub name: String,
    /// The table version it serves.
    pub version: String,
    /// How endpoint addresses became bindable.
    pub mode: BindMode,
    pub listeners: Vec<Listener>,
}

/// How the ingress binds endpoint addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindMode {
    /// A `local` route for the ingress prefix (added with netlink): every
    /// endpoint listens on its own address.
    LocalRoute,
    /// Without the privilege to add routes: every endpoint listens on `::1`
    /// (and `127.0.0.1`), reachable from this machine only.
    Loopback,
}

/// One listening socket of an ingress, or why it is not listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// The endpoint's allocation ID.
    pub endpoint: String,
    pub address: SocketAddr,
    /// Why it could not bind (`None`: listening).
    pub error: Option<String>,
}

/// What the control plane knows of one ingress (for `verge endpoints` and
/// `verge describe endpoint`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngressState {
    #[serde(flatten)]
    pub report: IngressReport,
    /// When its last report arrived (RFC 3339).
    pub seen_at: String,
}

/// One line of `verge endpoints` (SPEC §4 JSON), and with `backends` and
/// `listeners` filled, `verge describe endpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposedEndpoint {
    pub name: String,
    pub app: String,
    pub env: String,
    pub workload: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub ports: Vec<u16>,
    pub internal_port: u16,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub limits: EndpointLimits,
    /// True when the address is the shared loopback (`::1`): the control
    /// plane has no ingress prefix, so only this machine can connect.
    pub loopback: bool,
    /// Every instance of the workload, and whether it takes connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendState>,
    /// What each ingress reported for this endpoint's sockets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<IngressListener>,
}

/// An instance (or a per-connection workload's listener) behind an
/// endpoint as `verge describe endpoint` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    pub instance: String,
    pub node: Option<String>,
    pub address: Option<String>,
    pub state: String,
    /// `healthy`, `unhealthy` or `unchecked` (no health check).
    pub health: String,
    /// Whether the ingress sends it new connections, and if not, why.
    pub in_rotation: bool,
    pub reason: Option<String>,
    pub reach: Reach,
    /// A per-connection workload's listener on its node (`instance` is the
    /// listener's ID, `state` its state; each connection it accepts gets a
    /// fresh instance), not an instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listener: bool,
}

/// One ingress's socket for an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressListener {
    pub ingress: String,
    pub address: SocketAddr,
    pub error: Option<String>,
    pub seen_at: String,
}
