//! `verge-ingress`: the L4 TCP ingress (`verge ingress`), built out by later issues.
//!
//! It will own the path of end-user traffic: watching the versioned routing
//! table (endpoints → healthy instance addresses) from the control plane
//! (`table`), binding each endpoint's dedicated IPv6 address and optional
//! IPv4 (`listen`), choosing a healthy backend and draining old ones
//! (`balance`), copying bytes (`proxy`) and writing PROXY protocol v2
//! headers (`proxy_protocol`).
//!
//! It must not hold desired state or talk to the store: it serves the last
//! table it received, also while the control plane is unreachable.
//!
//! Built so far (issue 6 builds the rest): the byte path of a connection
//! ([`proxy`]) and PROXY protocol v2 headers ([`proxy_protocol`]).

pub mod proxy;
pub mod proxy_protocol;
