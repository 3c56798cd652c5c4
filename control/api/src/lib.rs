//! `verge-api`: the contract between Verge's parts.
//!
//! This crate owns the shapes that cross a process boundary: the resource
//! types the HTTP API returns ([`resources`]), the request bodies it accepts
//! ([`requests`]), env config and secret bundle shapes ([`config`]),
//! releases, receipts and their diffs ([`release`]), status and events
//! ([`status`]), the error body every failure carries ([`error`]), the
//! naming rules both sides check ([`names`]), nodes ([`nodes`]), registry
//! credentials files ([`registry_auth`]), the
//! manifest (`verge.toml`) and its validation ([`manifest`]), the routing
//! table ingresses watch ([`routing`]), logs ([`logs`]), exec sessions
//! ([`exec`]) and volumes ([`volumes`]), and the
//! control ⇄ node protocol carried over QUIC ([`wire`]). Behind features:
//! the typed HTTP client the CLI uses (`client`: [`client`]) and framed
//! reading and writing of wire messages on async streams (`wire-io`:
//! `wire::io`).
//!
//! Without features it must not depend on a server, a database or a
//! runtime: the node, the
//! ingress and the CLI all link it, and the JSON it defines is a stable
//! contract (see `docs/cli.md`). Fields may be added; none may be renamed.

pub mod config;
pub mod error;
pub mod exec;
pub mod logs;
pub mod manifest;
pub mod names;
pub mod nodes;
pub mod registry_auth;
pub mod release;
pub mod requests;
pub mod resources;
pub mod routing;
pub mod status;
pub mod volumes;
pub mod wire;

#[cfg(feature = "client")]
pub mod client;

pub use error::{ErrorBody, ErrorDetail, ErrorKind};
