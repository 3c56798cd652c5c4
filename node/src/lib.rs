//! `verge-node`: the node daemon (`verge node`).
//!
//! It owns everything that happens on one machine of the cluster:
//! joining over QUIC with mutual TLS and keeping that session alive
//! (`agent`), reconciling the desired set of instances the control plane
//! sends (`reconcile`), pulling digest-pinned OCI images into a
//! content-addressed store (`pull`), running instances as namespaced
//! processes in cgroups (`runtime`), their networking (`net`) and
//! their TCP health checks (`health`), the streams ingresses reach
//! instances through, via the control plane (`tunnel`), and instances'
//! logs: captured by each instance's shim, kept on disk with bounded
//! retention, read back for `verge logs` (`logs`); and volumes: sized
//! ext4 filesystems on loop devices (or plain directories), their
//! snapshots, and which instance mounts which (`volumes`); and
//! WebAssembly workloads in wasmtime inside the daemon: compiled-code
//! cache, limits, long-running instances in their own network namespace,
//! and per-connection listeners that start an instance per connection
//! (`wasm`).
//! [`daemon`] puts these together for `verge node` (and `verge dev`);
//! [`identity`] keeps what the node got at join, [`host`] reads the
//! machine's capacity and usage for heartbeats.
//!
//! It must not decide placement or hold desired state of its own: the
//! control plane decides, the node converges and reports. It speaks to the
//! control plane only through the wire messages of `verge_api::wire`.

pub mod agent;
pub mod daemon;
pub mod exec;
pub mod health;
pub mod host;
pub mod identity;
pub mod logs;
pub mod net;
pub mod pull;
pub mod reconcile;
pub mod runtime;
pub mod streams;
mod tls;
pub mod tunnel;
pub mod volumes;
pub mod wasm;
