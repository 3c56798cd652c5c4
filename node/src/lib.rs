//! `verge-node`: the node daemon (`verge node`), built out by later issues.
//!
//! It will own everything that happens on one machine of the cluster:
//! joining over QUIC with mutual TLS and keeping that session alive
//! (`agent`), reconciling the desired set of instances the control plane
//! sends (`reconcile`), pulling digest-pinned OCI images (`pull`), running
//! instances as namespaced processes in cgroups or as WebAssembly
//! (`runtime`), their networking (`net`), volumes, secrets, logs and exec.
//!
//! It must not decide placement or hold desired state of its own: the
//! control plane decides, the node converges and reports. It speaks to the
//! control plane only through the wire messages of `verge-api`.
//!
//! Nothing is implemented yet: this crate exists so that the workspace shows
//! the architecture from the start (see `docs/architecture.md`).
