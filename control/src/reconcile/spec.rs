//! What instance specs nodes get: a node's desired set, built from the
//! instances placed on it and the releases they belong to.

use std::collections::BTreeMap;

use verge_api::manifest::{Manifest, Workload};
use verge_api::wire::{DesiredSet, InstanceSpec, SecretFile, VolumeAttach};

use crate::secrets::Keyring;
use crate::store::{EnvScope, InstanceRow, NodeRow, ReleaseRow, Result, Store};

/// A pinned bundle version opened: its number and values, or why it
/// cannot be (never a value).
type Opened = std::result::Result<(i64, BTreeMap<String, String>), String>;

/// What instance and listener specs take from their release.
pub(super) struct ReleaseParts {
    pub(super) manifest: Manifest,
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
    parts_of(store, Some(keyring), &r).await
}

/// The parts of release `r`. Without a keyring, the pinned secret
/// versions are not opened: each has no values (for digests of what
/// nodes get, which never hold a secret).
pub(super) async fn parts_of(
    store: &Store,
    keyring: Option<&Keyring>,
    r: &ReleaseRow,
) -> Result<Option<ReleaseParts>> {
    let env_id = r.env_id.as_str();
    let Ok(manifest) = serde_json::from_str::<Manifest>(&r.manifest) else {
        return Ok(None);
    };
    let pinned: BTreeMap<String, i64> = serde_json::from_str(&r.secrets).unwrap_or_default();
    let mut secrets = BTreeMap::new();
    for (bundle, version) in pinned {
        let Some(keyring) = keyring else {
            secrets.insert(bundle, Ok((version, BTreeMap::new())));
            continue;
        };
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

/// The desired set of one node: every instance placed on it with goal
/// `run`, and a listener for every per-connection workload it answers.
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
    let wanted = super::listeners::wanted(store, Some(keyring), Some(node)).await?;
    Ok(DesiredSet {
        version: node.desired_version as u64,
        instances: specs,
        listeners: super::listeners::for_node(&wanted, node),
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
    let secrets = secret_files(w, r)?;
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
    let fronts = fronts(&r.manifest, &i.workload);
    let port = fronts.ports.first().copied().or(w.health.map(|h| h.tcp));
    let env_vars = env_vars(
        r,
        scope,
        &i.id,
        &i.workload,
        &i.release_id,
        fronts.proxy_protocol,
    );
    Ok(Some(InstanceSpec {
        id: i.id.clone(),
        org: scope.org.clone(),
        app: scope.app.clone(),
        env: scope.env.clone(),
        release: i.release_id.clone(),
        workload: i.workload.clone(),
        image: r.image(&i.workload, w),
        command: w.command.clone(),
        env_vars,
        cpu: i.cpu_millis as f64 / 1000.0,
        memory: i.memory as u64,
        restart: w.restart,
        port,
        health: w.health,
        drain_ms: fronts.drain_ms,
        volumes,
        secrets,
        runtime: w.runtime,
        max_cpu_time_ms: w.max_cpu_time_ms,
    }))
}

impl ReleaseParts {
    /// The pinned image of `workload` (spec `w`).
    pub(super) fn image(&self, workload: &str, w: &Workload) -> String {
        self.images
            .get(workload)
            .cloned()
            .unwrap_or_else(|| w.image.clone())
    }
}

/// The secret files of workload `w`, rendered from the versions its release
/// pins; `Err` when one cannot be opened (the reason names no value).
pub(super) fn secret_files(
    w: &Workload,
    r: &ReleaseParts,
) -> std::result::Result<Vec<SecretFile>, String> {
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
    Ok(secrets)
}

/// What the endpoints in front of a workload ask of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Fronts {
    /// The distinct internal ports of its endpoints, in manifest order.
    pub(super) ports: Vec<u16>,
    /// The longest drain timeout of its endpoints; 0 without endpoints.
    pub(super) drain_ms: u64,
    /// Some endpoint sends PROXY v2 headers.
    pub(super) proxy_protocol: bool,
}

pub(super) fn fronts(m: &Manifest, workload: &str) -> Fronts {
    let mut f = Fronts::default();
    for e in m.endpoints.iter().filter(|e| e.workload == workload) {
        if !f.ports.contains(&e.internal_port) {
            f.ports.push(e.internal_port);
        }
        f.drain_ms = f.drain_ms.max(e.limits.drain_timeout_ms);
        f.proxy_protocol |= e.proxy_protocol.is_some();
    }
    f
}

/// The environment of an instance (or listener) `id` of `workload`: the
/// manifest's env, then the env's own vars (operators override), then
/// Verge's.
pub(super) fn env_vars(
    r: &ReleaseParts,
    scope: &EnvScope,
    id: &str,
    workload: &str,
    release: &str,
    proxy_protocol: bool,
) -> BTreeMap<String, String> {
    let mut env_vars = r.manifest.env.clone();
    env_vars.extend(r.vars.clone());
    for (k, v) in [
        ("VERGE_INSTANCE_ID", id),
        ("VERGE_APP", &scope.app),
        ("VERGE_ENV", &scope.env),
        ("VERGE_WORKLOAD", workload),
        ("VERGE_RELEASE", release),
    ] {
        env_vars.insert(k.to_string(), v.to_string());
    }
    if proxy_protocol {
        // Connections from the ingress start with a PROXY v2 header.
        env_vars.insert("VERGE_PROXY_PROTOCOL".into(), "v2".into());
    }
    env_vars
}
