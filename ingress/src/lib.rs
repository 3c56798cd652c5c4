//! `verge-ingress`: the L4 TCP ingress (`verge ingress`, also inside `verge dev`).
//!
//! It owns the path of end-user traffic: watching the versioned routing
//! table (endpoints → healthy instance addresses) from the control plane
//! ([`daemon`]), making endpoint addresses bindable and listening on them
//! ([`net`], [`server`]), admitting connections ([`limits`]), choosing a
//! healthy backend and draining old ones ([`balance`]), reaching instances
//! on nodes behind NAT through the control plane ([`tunnel`]), copying bytes
//! ([`proxy`]), writing PROXY protocol v2 headers ([`proxy_protocol`]) and
//! counting it all ([`metrics`]).
//!
//! It must not hold desired state or talk to the store: it serves the last
//! table it received, also while the control plane is unreachable.

pub mod balance;
pub mod daemon;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod proxy_protocol;
pub mod server;
pub mod tunnel;
