//! Rules of desired state that do not touch the database: deploy gates,
//! release fingerprints, and how `verge scale` overrides combine with the
//! manifests of later releases.
//!
//! Scale and deploys: `verge scale` records per-workload overrides of
//! `count`, `cpu` and `memory` beside the env's current release. A later
//! deploy or rollback keeps an override as long as the new release's
//! manifest leaves that field as the previous release had it; when the
//! manifest changes the field (or drops the workload), the manifest wins and
//! the override is dropped. So `count = 2` → `verge scale web=5` → a deploy
//! that only changes the image keeps 5 instances; a deploy that sets
//! `count = 3` runs 3.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest as _, Sha256};
use verge_api::manifest::{Manifest, Mode};

use crate::store::ScaleRow;

/// Secret bundles a manifest needs: `[require] secrets` and every bundle a
/// workload mounts.
pub fn bundles_used(m: &Manifest) -> BTreeSet<String> {
    m.require
        .secrets
        .iter()
        .cloned()
        .chain(
            m.workloads
                .values()
                .flat_map(|w| w.secrets.iter().map(|s| s.bundle.clone())),
        )
        .collect()
}

/// What a deploy gate found missing in the target env.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Missing {
    pub env: Vec<String>,
    pub secrets: Vec<String>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.secrets.is_empty()
    }

    /// One line per missing item.
    pub fn items(&self) -> Vec<String> {
        let env = self
            .env
            .iter()
            .map(|n| format!("env var {n} (required by [require] env)"));
        let secrets = self
            .secrets
            .iter()
            .map(|b| format!("secret bundle {b:?} (required by the manifest)"));
        env.chain(secrets).collect()
    }

    /// The command that fixes each item.
    pub fn commands(&self, app: &str, env: &str) -> Vec<String> {
        let env_cmds = self
            .env
            .iter()
            .map(|n| format!("verge env set {n}=VALUE --app {app} --env {env}"));
        let secret_cmds = self
            .secrets
            .iter()
            .map(|b| format!("verge secrets set {b} KEY=VALUE --app {app} --env {env}"));
        env_cmds.chain(secret_cmds).collect()
    }
}

/// The gate: required env vars not in `vars`, used bundles not in `bundles`
/// (bundle → newest live version).
pub fn gate(
    m: &Manifest,
    vars: &BTreeMap<String, String>,
    bundles: &BTreeMap<String, i64>,
) -> Missing {
    Missing {
        env: m
            .require
            .env
            .iter()
            .filter(|n| !vars.contains_key(*n))
            .cloned()
            .collect(),
        secrets: bundles_used(m)
            .into_iter()
            .filter(|b| !bundles.contains_key(b))
            .collect(),
    }
}

/// What stops manifest `m` (scale applied) from mounting its volumes:
/// a volume missing from the env (`volumes`: name → node name), one
/// workload's volumes on different nodes, or a count above one for a
/// workload with volumes (one instance at a time mounts a volume). One
/// line per problem, each with its fix.
pub fn volume_problems(m: &Manifest, volumes: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, w) in &m.workloads {
        if w.volumes.is_empty() {
            continue;
        }
        if w.count > 1 {
            let names: Vec<&str> = w.volumes.iter().map(|v| v.name.as_str()).collect();
            out.push(format!(
                "workload {name} mounts volume {}, which one instance at a time can use, but its \
                 count is {}: set count = 1 (or 0); Verge has no per-instance volume templates",
                names.join(", "),
                w.count
            ));
        }
        let mut nodes: BTreeMap<&str, &str> = BTreeMap::new();
        for v in &w.volumes {
            match volumes.get(&v.name) {
                None => out.push(format!(
                    "workload {name} mounts volume {}, which does not exist in this env: create it \
                     first with `verge volumes create {} --size SIZE`",
                    v.name, v.name
                )),
                Some(node) => {
                    nodes.entry(node.as_str()).or_insert(v.name.as_str());
                }
            }
        }
        if nodes.len() > 1 {
            let list: Vec<String> = nodes.iter().map(|(n, v)| format!("{v} on {n}")).collect();
            out.push(format!(
                "workload {name} mounts volumes on different nodes ({}), and an instance runs on \
                 one node: restore a snapshot of one onto the other's node \
                 (`verge volumes restore SNAPSHOT --to NEW --node NODE`) and mount that",
                list.join(", ")
            ));
        }
    }
    out
}

/// Identifies what a release runs: equal for an unchanged deploy.
pub fn fingerprint(
    snapshot: &Manifest,
    config_version: i64,
    secrets: &BTreeMap<String, i64>,
) -> String {
    let canonical = serde_json::json!({
        "manifest": snapshot,
        "config_version": config_version,
        "secrets": secrets,
    });
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.to_string()))
    )
}

/// `m` with the scale overrides applied: what the env should run.
pub fn apply_scale(m: &Manifest, overrides: &BTreeMap<String, ScaleRow>) -> Manifest {
    let mut m = m.clone();
    for (name, s) in overrides {
        if let Some(w) = m.workloads.get_mut(name) {
            // Per-connection workloads keep no instances: their count stays 0.
            if let Some(c) = s.count.filter(|_| w.mode != Mode::PerConnection) {
                w.count = c as u32;
            }
            if let Some(c) = s.cpu_millis {
                w.cpu = c as f64 / 1000.0;
            }
            if let Some(b) = s.memory {
                w.memory = b as u64;
            }
        }
    }
    m
}

/// The overrides that survive moving from release manifest `old` to `new`.
pub fn carry_scale(
    old: &Manifest,
    new: &Manifest,
    overrides: &BTreeMap<String, ScaleRow>,
) -> BTreeMap<String, ScaleRow> {
    let mut kept = BTreeMap::new();
    for (name, s) in overrides {
        let (Some(o), Some(n)) = (old.workloads.get(name), new.workloads.get(name)) else {
            continue;
        };
        let carried = ScaleRow {
            count: s.count.filter(|_| o.count == n.count),
            cpu_millis: s.cpu_millis.filter(|_| o.cpu == n.cpu),
            memory: s.memory.filter(|_| o.memory == n.memory),
        };
        if carried != ScaleRow::default() {
            kept.insert(name.clone(), carried);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::manifest::parse;

    fn manifest(web: &str) -> Manifest {
        let text = format!(
            "app = \"hello\"\n[require]\nenv = [\"DATABASE_URL\", \"PORT\"]\nsecrets = [\"app\"]\n\
             [workloads.web]\nimage = \"r/hello:1\"\nsecrets = [{{ bundle = \"tls\", path = \"/run/tls\" }}]\n{web}"
        );
        parse("verge.toml", &text).expect("valid")
    }

    #[test]
    fn gate_lists_every_missing_item_with_its_fix() {
        let m = manifest("");
        let vars = BTreeMap::from([("PORT".to_string(), "80".to_string())]);
        let missing = gate(&m, &vars, &BTreeMap::new());
        assert_eq!(missing.env, ["DATABASE_URL"]);
        assert_eq!(missing.secrets, ["app", "tls"]);
        assert_eq!(
            missing.commands("hello", "prod"),
            [
                "verge env set DATABASE_URL=VALUE --app hello --env prod",
                "verge secrets set app KEY=VALUE --app hello --env prod",
                "verge secrets set tls KEY=VALUE --app hello --env prod",
            ]
        );
        let all = BTreeMap::from([("app".to_string(), 1), ("tls".to_string(), 2)]);
        let vars = BTreeMap::from([
            ("PORT".to_string(), "80".to_string()),
            ("DATABASE_URL".to_string(), "x".to_string()),
        ]);
        assert!(gate(&m, &vars, &all).is_empty());
    }

    #[test]
    fn volumes_must_exist_share_a_node_and_have_one_writer() {
        let text = "app = \"a\"\n[workloads.db]\nimage = \"i\"\ncount = 2\n\
                    volumes = [{ name = \"data\", path = \"/data\" }, { name = \"logs\", path = \"/logs\" }]\n";
        let m = parse("verge.toml", text).expect("valid");
        let p = volume_problems(&m, &BTreeMap::new());
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("its count is 2: set count = 1"), "{p:?}");
        assert!(p[1].contains("volume data, which does not exist"), "{p:?}");
        assert!(
            p[1].contains("`verge volumes create data --size SIZE`"),
            "{p:?}"
        );
        let two = BTreeMap::from([
            ("data".to_string(), "n1".to_string()),
            ("logs".to_string(), "n2".to_string()),
        ]);
        let mut one = m.clone();
        one.workloads.get_mut("db").unwrap().count = 1;
        let p = volume_problems(&one, &two);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("different nodes (data on n1, logs on n2)"),
            "{p:?}"
        );
        let same = BTreeMap::from([
            ("data".to_string(), "n1".to_string()),
            ("logs".to_string(), "n1".to_string()),
        ]);
        assert!(volume_problems(&one, &same).is_empty());
    }

    #[test]
    fn fingerprints_change_with_any_input() {
        let m = manifest("");
        let none = BTreeMap::new();
        let f = fingerprint(&m, 1, &none);
        assert_eq!(f, fingerprint(&manifest(""), 1, &none));
        assert_ne!(f, fingerprint(&m, 2, &none));
        assert_ne!(f, fingerprint(&manifest("count = 3"), 1, &none));
        assert_ne!(f, fingerprint(&m, 1, &BTreeMap::from([("app".into(), 1)])));
    }

    #[test]
    fn scale_survives_deploys_that_leave_the_field_alone() {
        let v1 = manifest("count = 2");
        let overrides = BTreeMap::from([(
            "web".to_string(),
            ScaleRow {
                count: Some(5),
                cpu_millis: Some(1500),
                memory: None,
            },
        )]);
        assert_eq!(apply_scale(&v1, &overrides).workloads["web"].count, 5);
        assert_eq!(apply_scale(&v1, &overrides).workloads["web"].cpu, 1.5);
        // Only memory changes (not overridden): both overrides stay.
        let v2 = manifest("count = 2\nmemory = \"64Mi\"");
        assert_eq!(carry_scale(&v1, &v2, &overrides), overrides);
        // The manifest changes count: count follows the manifest, cpu stays.
        let v3 = manifest("count = 3");
        let kept = carry_scale(&v1, &v3, &overrides);
        assert_eq!(kept["web"].count, None);
        assert_eq!(kept["web"].cpu_millis, Some(1500));
        assert_eq!(apply_scale(&v3, &kept).workloads["web"].count, 3);
    }
}
