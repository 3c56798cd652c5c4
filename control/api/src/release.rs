//! Releases and receipts: what a deploy, rollback or scale returns, and the
//! diff between two desired states that every receipt carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Endpoint, Manifest, Workload, format_size};

/// Where a change went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub org: String,
    pub project: String,
    pub app: String,
    pub env: String,
}

/// A release, briefly: `{"id", "number", "env"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    pub id: String,
    pub number: i64,
    pub env: String,
}

impl ReleaseRef {
    /// `v3 (rel_...)`.
    pub fn label(&self) -> String {
        format!("v{} ({})", self.number, self.id)
    }
}

/// A release as `verge releases` and `verge describe release` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub id: String,
    pub number: i64,
    pub env: String,
    pub app: String,
    pub current: bool,
    pub created_at: String,
    /// Token name (and ID) of whoever created it.
    pub created_by: String,
    /// Per workload, the image pinned by digest (`ref@sha256:...`).
    pub images: BTreeMap<String, String>,
    /// The env-var version it uses.
    pub config_version: i64,
    /// Secret bundle → the version it uses.
    pub secrets: BTreeMap<String, i64>,
    /// The release that was current when this one was made.
    pub parent: Option<ReleaseRef>,
    /// The manifest snapshot, images pinned; only in `describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// What a mutation of desired state was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deploy,
    Rollback,
    Scale,
}

/// The receipt of a deploy, rollback or scale (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub action: Action,
    pub target: Target,
    /// The env's current release after the change.
    pub release: ReleaseRef,
    /// The release that was current before.
    pub previous: Option<ReleaseRef>,
    /// Nothing differed: no release was created and nothing changed.
    pub unchanged: bool,
    pub diff: Diff,
    /// Per workload, the desired instances after the change.
    pub desired: BTreeMap<String, u32>,
    pub follow_ups: Vec<String>,
    /// `verge deploy --dry-run`: nothing was changed; `plan` says what would be.
    #[serde(default)]
    pub dry_run: bool,
    /// Where the release's instances would go (dry runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
}

/// What a deploy would do to instances: per workload, where each instance
/// of the new release would be placed and which running ones it replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub workloads: Vec<WorkloadPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadPlan {
    pub name: String,
    pub count: u32,
    pub placements: Vec<PlannedPlacement>,
    /// Running instances the release replaces (stopped once the new ones are healthy).
    pub replaces: Vec<PlannedStop>,
}

/// Slot `slot` of a workload: the node it would go to, or why none fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPlacement {
    pub slot: u32,
    pub node: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStop {
    pub instance: String,
    pub node: Option<String>,
    pub release: Option<i64>,
}

/// Changes between two desired states.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub workloads: Vec<Change>,
    pub endpoints: Vec<Change>,
    /// Env vars of the manifest, the env's config version, secret bundle versions.
    pub config: Vec<FieldChange>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.endpoints.is_empty() && self.config.is_empty()
    }
}

/// A workload or endpoint that was added, removed or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub name: String,
    pub change: ChangeKind,
    /// Every field that differs; for added and removed, every field.
    pub fields: Vec<FieldChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One field: `old → new`; `None` where it did not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        write!(
            f,
            "{}: {} → {}",
            self.field,
            show(&self.old),
            show(&self.new)
        )
    }
}

/// One side of a diff: an effective manifest (scale applied) and the
/// config versions it runs with.
#[derive(Debug, Clone, Copy)]
pub struct DesiredState<'a> {
    pub manifest: &'a Manifest,
    pub config_version: i64,
    pub secrets: &'a BTreeMap<String, i64>,
}

/// The diff from `old` (nothing, for an env's first release) to `new`.
pub fn diff(old: Option<DesiredState<'_>>, new: DesiredState<'_>) -> Diff {
    let empty = BTreeMap::new();
    let (old_workloads, old_endpoints) = match old {
        Some(o) => (
            o.manifest.workloads.clone(),
            o.manifest
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), e.clone()))
                .collect(),
        ),
        None => (BTreeMap::new(), BTreeMap::new()),
    };
    let new_endpoints: BTreeMap<String, Endpoint> = new
        .manifest
        .endpoints
        .iter()
        .map(|e| (e.name.clone(), e.clone()))
        .collect();
    let mut config = Vec::new();
    let old_env = old.map_or(&empty, |o| &o.manifest.env);
    config.extend(map_changes("env.", old_env, &new.manifest.env));
    let old_version = old.map(|o| o.config_version);
    if old_version != Some(new.config_version) {
        config.push(FieldChange {
            field: "config_version".into(),
            old: old_version.map(|v| v.to_string()),
            new: Some(new.config_version.to_string()),
        });
    }
    let num = |m: &BTreeMap<String, i64>| -> BTreeMap<String, String> {
        m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
    };
    let old_secrets = old.map_or_else(BTreeMap::new, |o| num(o.secrets));
    config.extend(map_changes("secrets.", &old_secrets, &num(new.secrets)));
    Diff {
        workloads: changes(&old_workloads, &new.manifest.workloads, workload_fields),
        endpoints: changes(&old_endpoints, &new_endpoints, endpoint_fields),
        config,
    }
}

fn map_changes(
    prefix: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<FieldChange> {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| FieldChange {
            field: format!("{prefix}{k}"),
            old: old.get(k).cloned(),
            new: new.get(k).cloned(),
        })
        .collect()
}

fn changes<T>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    fields: fn(&T) -> Vec<(&'static str, String)>,
) -> Vec<Change> {
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let before = old.get(name).map(fields).unwrap_or_default();
        let after = new.get(name).map(fields).unwrap_or_default();
        let change = match (old.contains_key(name), new.contains_key(name)) {
            (false, _) => ChangeKind::Added,
            (_, false) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        };
        let lookup = |list: &[(&'static str, String)], f: &str| {
            list.iter().find(|(k, _)| *k == f).map(|(_, v)| v.clone())
        };
        let mut field_names: Vec<&'static str> = before.iter().map(|(k, _)| *k).collect();
        for (k, _) in &after {
            if !field_names.contains(k) {
                field_names.push(k);
            }
        }
        let fields: Vec<FieldChange> = field_names
            .into_iter()
            .map(|f| FieldChange {
                field: f.to_string(),
                old: lookup(&before, f),
                new: lookup(&after, f),
            })
            .filter(|c| c.old != c.new)
            .collect();
        if !fields.is_empty() {
            out.push(Change {
                name: name.clone(),
                change,
                fields,
            });
        }
    }
    out
}

/// A workload as `field = value` pairs; absent optional fields are left out.
fn workload_fields(w: &Workload) -> Vec<(&'static str, String)> {
    let mut f = vec![("runtime", json(&w.runtime)), ("image", w.image.clone())];
    if let Some(c) = &w.command {
        f.push(("command", json(c)));
    }
    f.extend([
        ("count", w.count.to_string()),
        ("cpu", w.cpu.to_string()),
        ("memory", format_size(w.memory)),
        ("restart", json(&w.restart)),
        ("mode", json(&w.mode)),
    ]);
    if let Some(h) = &w.health {
        f.push((
            "health",
            format!(
                "tcp {} every {}ms, timeout {}ms",
                h.tcp, h.interval_ms, h.timeout_ms
            ),
        ));
    }
    if !w.volumes.is_empty() {
        f.push(("volumes", json(&w.volumes)));
    }
    if !w.secrets.is_empty() {
        f.push(("secrets", json(&w.secrets)));
    }
    if !w.constraints.is_empty() {
        f.push(("constraints", json(&w.constraints)));
    }
    f.extend([
        ("rollout.max_surge", w.rollout.max_surge.to_string()),
        (
            "rollout.max_unavailable",
            w.rollout.max_unavailable.to_string(),
        ),
        ("rollout.auto_rollback", w.rollout.auto_rollback.to_string()),
        (
            "rollout.deadline",
            humantime::format_duration(std::time::Duration::from_millis(w.rollout.deadline_ms))
                .to_string(),
        ),
    ]);
    f
}

fn endpoint_fields(e: &Endpoint) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("workload", e.workload.clone()),
        (
            "ports",
            e.ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("internal_port", e.internal_port.to_string()),
        ("ipv4", e.ipv4.to_string()),
    ];
    if let Some(p) = e.proxy_protocol {
        f.push(("proxy_protocol", json(&p)));
    }
    f
}

/// Compact JSON of a value, without the quotes of a bare string.
fn json<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;

    fn manifest(extra: &str) -> Manifest {
        let text = format!(
            "app = \"hello\"\n[env]\nA = \"1\"\n[workloads.web]\nimage = \"r/hello:1\"\ncount = 2\n{extra}"
        );
        parse("verge.toml", &text).expect("valid manifest")
    }

    #[test]
    fn first_release_adds_everything() {
        let m = manifest("");
        let secrets = BTreeMap::from([("app".to_string(), 1)]);
        let d = diff(
            None,
            DesiredState {
                manifest: &m,
                config_version: 0,
                secrets: &secrets,
            },
        );
        assert_eq!(d.workloads.len(), 1);
        assert_eq!(d.workloads[0].change, ChangeKind::Added);
        assert!(
            d.workloads[0]
                .fields
                .iter()
                .any(|f| f.field == "count" && f.new.as_deref() == Some("2") && f.old.is_none())
        );
        let config: Vec<String> = d.config.iter().map(ToString::to_string).collect();
        assert_eq!(
            config,
            [
                "env.A: (none) → 1",
                "config_version: (none) → 0",
                "secrets.app: (none) → 1"
            ]
        );
    }

    #[test]
    fn changed_fields_show_old_and_new() {
        let old = manifest("");
        let mut new = manifest("memory = \"512Mi\"\n[workloads.worker]\nimage = \"r/w:1\"\n");
        new.env.insert("B".into(), "2".into());
        let none = BTreeMap::new();
        let side = |m| DesiredState {
            manifest: m,
            config_version: 3,
            secrets: &none,
        };
        let d = diff(Some(side(&old)), side(&new));
        let web = d.workloads.iter().find(|c| c.name == "web").unwrap();
        assert_eq!(web.change, ChangeKind::Changed);
        assert_eq!(
            web.fields
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["memory: 256Mi → 512Mi"]
        );
        let worker = d.workloads.iter().find(|c| c.name == "worker").unwrap();
        assert_eq!(worker.change, ChangeKind::Added);
        assert_eq!(
            d.config.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["env.B: (none) → 2"]
        );
        assert!(diff(Some(side(&new)), side(&new)).is_empty());
    }
}
