//! Per-connection workloads (`mode = "per-connection"`): no instances, but
//! a listener on every node that answers them. A node answers a
//! per-connection workload of an env's *current* release when it is
//! online, not drained (nor draining) and carries the labels the
//! workload's constraints ask for, and when some endpoint points at the
//! workload (its internal ports are what the node listens on). Each such
//! listener is a [`ListenerSpec`] in the node's desired set.
//!
//! Listeners need no placement, so the planner never sees them: what a
//! node should listen on is computed from the current releases and the
//! node's facts whenever its desired set is built ([`for_node`]). So that
//! the node is sent a new set when that changes (a deploy, a rollback, a
//! scale of cpu or memory, the node going offline, draining or changing
//! labels), every full reconcile pass computes a digest of each node's
//! listeners and bumps the node's desired-set version when it moved
//! ([`sync`]). A new release replaces the listeners at once: the old
//! release's listener leaves the set (the node drains it) as the new one
//! enters it.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use verge_api::manifest::{Mode, Workload};
use verge_api::wire::ListenerSpec;

use super::spec::{self, ReleaseParts};
use crate::desired::apply_scale;
use crate::secrets::Keyring;
use crate::store::{NodeRow, Result, Store};

const PREFIX: &str = "lst-";

/// The ID of the listener of `workload` in release `release_id`: stable
/// for the release's workload, unique on a node, and safe as a file name
/// (release IDs are `rel_` and lower-case letters and digits, workload
/// names lower-case letters, digits and `-`).
pub fn listener_id(release_id: &str, workload: &str) -> String {
    format!("{PREFIX}{release_id}-{workload}")
}

/// The release ID and workload a listener ID names.
pub fn parse_listener_id(id: &str) -> Option<(&str, &str)> {
    let (release, workload) = id.strip_prefix(PREFIX)?.split_once('-')?;
    (!release.is_empty() && !workload.is_empty()).then_some((release, workload))
}

/// Whether `node` answers connections of workload `w`: online, not
/// draining or drained, and with every label `w`'s constraints ask for.
pub fn answers(node: &NodeRow, w: &Workload) -> bool {
    if node.state != "online" || node.drain.is_some() {
        return false;
    }
    let labels: BTreeMap<String, String> = serde_json::from_str(&node.labels).unwrap_or_default();
    w.constraints
        .iter()
        .all(|(k, want)| labels.get(k) == Some(want))
}

/// One listener the cluster wants: its spec (the same for every node) and
/// the workload it answers for (constraints).
#[derive(Debug, Clone)]
pub struct Wanted {
    pub spec: ListenerSpec,
    pub env_id: String,
    pub workload: Workload,
}

/// Every listener of the per-connection workloads of every env's current
/// release (scale applied). With `node`, only those that node answers.
/// Without `keyring`, secret files have their bundle, version and path but
/// no contents (for digests). A workload no endpoint points at needs no
/// listener; one whose secrets cannot be opened is left out (logged).
pub async fn wanted(
    store: &Store,
    keyring: Option<&Keyring>,
    node: Option<&NodeRow>,
) -> Result<Vec<Wanted>> {
    let mut out = Vec::new();
    for release in store.current_releases().await? {
        let Ok(snapshot) = serde_json::from_str::<verge_api::manifest::Manifest>(&release.manifest)
        else {
            continue;
        };
        if !snapshot
            .workloads
            .values()
            .any(|w| w.mode == Mode::PerConnection)
        {
            continue;
        }
        let manifest = apply_scale(&snapshot, &store.scale_overrides(&release.env_id).await?);
        let mut parts: Option<(ReleaseParts, crate::store::EnvScope)> = None;
        for (name, w) in &manifest.workloads {
            if w.mode != Mode::PerConnection || node.is_some_and(|n| !answers(n, w)) {
                continue;
            }
            let fronts = spec::fronts(&manifest, name);
            if fronts.ports.is_empty() {
                continue;
            }
            if parts.is_none() {
                let (Some(p), Some(scope)) = (
                    spec::parts_of(store, keyring, &release).await?,
                    store.env_scope(&release.env_id).await?,
                ) else {
                    break;
                };
                parts = Some((p, scope));
            }
            let (r, scope) = parts.as_ref().expect("just read");
            let secrets = match spec::secret_files(w, r) {
                Ok(s) => s,
                Err(why) => {
                    tracing::error!(env = %release.env_id, workload = %name, "cannot send listener spec: {why}");
                    continue;
                }
            };
            let id = listener_id(&release.id, name);
            let env_vars = spec::env_vars(r, scope, &id, name, &release.id, fronts.proxy_protocol);
            out.push(Wanted {
                spec: ListenerSpec {
                    org: scope.org.clone(),
                    app: scope.app.clone(),
                    env: scope.env.clone(),
                    release: release.id.clone(),
                    workload: name.clone(),
                    // The artifact the release pinned.
                    image: r.image(name, w),
                    command: w.command.clone(),
                    env_vars,
                    cpu: w.cpu,
                    memory: w.memory,
                    max_cpu_time_ms: w.max_cpu_time_ms,
                    concurrency: w.concurrency,
                    ports: fronts.ports,
                    drain_ms: fronts.drain_ms,
                    secrets,
                    id,
                },
                env_id: release.env_id.clone(),
                workload: w.clone(),
            });
        }
    }
    Ok(out)
}

/// The listeners `node` should run, of those `wanted`, by ID.
pub fn for_node(wanted: &[Wanted], node: &NodeRow) -> Vec<ListenerSpec> {
    let mut specs: Vec<ListenerSpec> = wanted
        .iter()
        .filter(|w| answers(node, &w.workload))
        .map(|w| w.spec.clone())
        .collect();
    specs.sort_by(|a, b| a.id.cmp(&b.id));
    specs
}

/// Identifies a listener set: empty for none, else a SHA-256 of the specs.
/// Computed from specs without secret contents (secret versions are
/// immutable, so the bundle and version stand for them).
pub fn digest(specs: &[ListenerSpec]) -> String {
    if specs.is_empty() {
        return String::new();
    }
    let json = serde_json::to_vec(specs).expect("listener specs serialise");
    hex::encode(Sha256::digest(&json))
}

/// Bumps the desired-set version of every node whose listeners changed
/// since the last pass (by [`digest`]); returns those nodes.
pub async fn sync(store: &Store) -> Result<Vec<String>> {
    let wanted = wanted(store, None, None).await?;
    let recorded = store.listener_digests().await?;
    let mut changed = Vec::new();
    for node in store.nodes().await? {
        let d = digest(&for_node(&wanted, &node));
        let was = recorded
            .get(&node.id)
            .cloned()
            .flatten()
            .unwrap_or_default();
        if d != was && store.sync_listener_digest(&node.id, &d).await? {
            changed.push(node.id);
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_ids_name_their_release_and_workload() {
        let id = listener_id("rel_01jabc", "echo-v2");
        assert_eq!(id, "lst-rel_01jabc-echo-v2");
        assert_eq!(parse_listener_id(&id), Some(("rel_01jabc", "echo-v2")));
        assert_eq!(parse_listener_id("i_01jabc"), None);
        assert_eq!(parse_listener_id("lst-rel_1"), None);
        assert_eq!(parse_listener_id("lst--echo"), None);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "a file name anywhere: {id}"
        );
    }
}
