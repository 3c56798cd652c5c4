//! `verge-control`: the Verge control plane, as a library the `verge` binary runs.
//!
//! It owns desired state: the store of orgs, projects, apps, envs and tokens
//! ([`store`]), who may touch what ([`auth`]), the `/v1` HTTP API
//! ([`http`]), its metrics ([`metrics`]) and the listener with TLS and graceful
//! shutdown ([`server`]); env config and secret bundles sealed at rest
//! ([`secrets`]), image pinning ([`images`]) and the rules of releases and
//! scale ([`desired`]); the cluster CA, node joins and QUIC sessions
//! ([`cluster`]), placement ([`scheduler`]) and the reconciler that turns
//! current releases into instances on nodes ([`reconcile`]), and volumes on
//! nodes with their snapshots ([`volumes`]).
//!
//! It must not run workloads or proxy traffic (that is `verge-node` and
//! `verge-ingress`), must not print to stdout (the binary decides what the
//! user sees), and must not keep state outside the store: a restarted
//! control plane, or a second replica on the same PostgreSQL, sees all of it.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod desired;
pub mod endpoints;
pub mod error;
pub mod http;
pub mod images;
pub mod metrics;
pub mod reconcile;
pub mod routing;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod store;
mod time;
pub mod volumes;

pub use config::Config;
pub use server::{StartError, Started, start};
