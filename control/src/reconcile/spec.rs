//! What instance specs nodes get: a node's desired set, built from the
//! instances placed on it and the releases they belong to.

use std::collections::BTreeMap;

use verge_api::manifest::Manifest;
use verge_api::wire::{DesiredSet, InstanceSpec, SecretFile, VolumeAttach};

use crate::secrets::Keyring;
use crate::store::{EnvScope, InstanceRow, NodeRow, Result, Store};

/// A pinned bundle version opened: its number and values, or why it
/// cannot be (never a value).
type Opened = std::result::Result<(i64, BTreeMap<String, String>), String>;

/// What instance specs take from their release.
struct ReleaseParts {
    manifest: Manifest,
    /// Workload → digest-pinned image.
    images: BTreeMap<String, String>,
    /// The env vars of the config version the release pins.
    vars: BTreeMap<String, String>,
    /// Bundle → (version, values) of the secret versions the release pins;
    /// `Err` names a version that cannot be opened (never a value).
    secrets: BTreeMap<String, Opened>,
    /// The env's volumes: name → ID.
    volumes: BTreeMap<String, String>,
}

async fn release_parts(
    store: &Store,
    keyring: &Keyring,
    env_id: &str,
    release_id: &str,
) -> Result<Option<ReleaseParts>> {
    let Some(r) = store.release_by_id(env_id, release_id).await? else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_str::<Manifest>(&r.manifest) else {
        return Ok(None);
    };
    let pinned: BTreeMap<String, i64> = serde_json::from_str(&r.secrets).unwrap_or_default();
    let mut secrets = BTreeMap::new();
    for (bundle, version) in pinned {
        let rows = store.secret_versions(env_id, Some(&bundle)).await?;
        let opened = match rows.iter().find(|row| row.version == version) {
            None => Err(format!(
                "secret bundle {bundle:?} v{version} does not exist"
            )),
            Some(row) => match keyring.open(env_id, row) {
                Ok(Some(values)) => Ok((version, values)),
                Ok(None) => Err(format!("secret bundle {bundle:?} v{version} was deleted")),
                Err(e) => Err(e.to_string()),
            },
        };
        secrets.insert(bundle, opened);
    }
    // Most releases mount none: no query for them.
    let volumes = if manifest.workloads.values().any(|w| !w.volumes.is_empty()) {
        store
            .volumes(env_id)
            .await?
            .into_iter()
            .map(|v| (v.name, v.id))
            .collect()
    } else {
        BTreeMap::new()
    };
    Ok(Some(ReleaseParts {
        manifest,
        images: serde_json::from_str(&r.images).unwrap_or_default(),
        vars: store.config_vars_at(env_id, r.config_version).await?,
        secrets,
        volumes,
    }))
}

/// The desired set of one node: every instance placed on it with goal `run`.
pub async fn desired_set(store: &Store, keyring: &Keyring, node: &NodeRow) -> Result<DesiredSet> {
    let mut releases: BTreeMap<String, Option<ReleaseParts>> = BTreeMap::new();
    let mut scopes: BTreeMap<String, Option<EnvScope>> = BTreeMap::new();
    let mut specs = Vec::new();
    for i in store.node_instances(&node.id).await? {
        if i.goal != "run" {
            continue;
        }
        if !releases.contains_key(&i.release_id) {
            let parts = release_parts(store, keyring, &i.env_id, &i.release_id).await?;
            releases.insert(i.release_id.clone(), parts);
        }
        if !scopes.contains_key(&i.env_id) {
            scopes.insert(i.env_id.clone(), store.env_scope(&i.env_id).await?);
        }
        let (Some(Some(r)), Some(Some(scope))) =
            (releases.get(&i.release_id), scopes.get(&i.env_id))
        else {
            continue;
        };
        match instance_spec(&i, r, scope) {
            Ok(Some(spec)) => specs.push(spec),
            Ok(None) => {}
            // Without its secrets or volumes the instance cannot run: it
            // stays out of the set (the reason names no secret value).
            Err(why) => {
                tracing::error!(instance = %i.id, env = %i.env_id, "cannot send instance spec: {why}")
            }
        }
    }
    Ok(DesiredSet {
        version: node.desired_version as u64,
        instances: specs,
        listeners: Vec::new(),
    })
}

/// What a node needs to run instance `i`: `Ok(None)` when its release has
/// no such workload, `Err` when a secret or volume it mounts is missing.
fn instance_spec(
    i: &InstanceRow,
    r: &ReleaseParts,
    scope: &EnvScope,
) -> std::result::Result<Option<InstanceSpec>, String> {
    let Some(w) = r.manifest.workloads.get(&i.workload) else {
        return Ok(None);
    };
    let mut secrets = Vec::new();
    for m in &w.secrets {
        let (version, values) = match r.secrets.get(&m.bundle) {
            Some(Ok(opened)) => opened,
            Some(Err(why)) => return Err(why.clone()),
            None => {
                return Err(format!(
                    "the release pins no version of secret bundle {:?}",
                    m.bundle
                ));
            }
        };
        secrets.push(SecretFile {
            bundle: m.bundle.clone(),
            version: *version,
            path: m.path.clone(),
            contents: m.format.render(values),
        });
    }
    let mut volumes = Vec::new();
    for m in &w.volumes {
        let Some(id) = r.volumes.get(&m.name) else {
            return Err(format!("volume {:?} does not exist in the env", m.name));
        };
        volumes.push(VolumeAttach {
            volume: id.clone(),
            name: m.name.clone(),
            path: m.path.clone(),
        });
    }
    let fronts = || {
        r.manifest
            .endpoints
            .iter()
            .filter(|e| e.workload == i.workload)
    };
    let port = fronts()
        .next()
        .map(|e| e.internal_port)
        .or(w.health.map(|h| h.tcp));
    let drain_ms = fronts()
        .map(|e| e.limits.drain_timeout_ms)
        .max()
        .unwrap_or(0);
    let proxy_protocol = fronts().any(|e| e.proxy_protocol.is_some());
    // The manifest's env, then the env's own vars (operators override), then Verge's.
    let mut env_vars = r.manifest.env.clone();
    env_vars.extend(r.vars.clone());
    for (k, v) in [
        ("VERGE_INSTANCE_ID", &i.id),
        ("VERGE_APP", &scope.app),
        ("VERGE_ENV", &scope.env),
        ("VERGE_WORKLOAD", &i.workload),
        ("VERGE_RELEASE", &i.release_id),
    ] {
        env_vars.insert(k.to_string(), v.clone());
    }
    if proxy_protocol {
        // Connections from the ingress start with a PROXY v2 header.
        env_vars.insert("VERGE_PROXY_PROTOCOL".into(), "v2".into());
    }
    Ok(Some(InstanceSpec {
        id: i.id.clone(),
        org: scope.org.clone(),
        app: scope.app.clone(),
        env: scope.env.clone(),
        release: i.release_id.clone(),
        workload: i.workload.clone(),
        image: r
            .images
            .get(&i.workload)
            .cloned()
            .unwrap_or_else(|| w.image.clone()),
        command: w.command.clone(),
        env_vars,
        cpu: i.cpu_millis as f64 / 1000.0,
        memory: i.memory as u64,
        restart: w.restart,
        port,
        health: w.health,
        drain_ms,
        volumes,
        secrets,
        runtime: w.runtime,
        max_cpu_time_ms: w.max_cpu_time_ms,
    }))
}
