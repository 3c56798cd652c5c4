//! Env vars and secret bundles of an env: each change is a new version.
//!
//! `GET/POST .../envs/{env}/config`, `GET .../envs/{env}/secrets`,
//! `POST/DELETE .../envs/{env}/secrets/{bundle}` (`?version=N` deletes one
//! version). Secret values go in, sealed, and never come out: answers carry
//! key names, versions and digests only, and events name keys, not values.
//! Their events carry the release the env runs at the time of the change
//! (none before the first deploy): the audit trail says what it ran under.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde::Deserialize;
use verge_api::config::{ConfigReceipt, EnvConfig, SecretBundle, SecretReceipt, SecretVersion};
use verge_api::names;
use verge_api::requests::{ChangeConfig, ChangeSecrets};

use super::scope::{EnvCx, manifest_of, secrets_of};
use super::{AppState, Json, Path, Query};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::secrets::SecretsError;
use crate::store::SecretVersionRow;
use crate::time::{now_ms, rfc3339};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/config",
            get(get_config).post(change_config),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/secrets",
            get(list_secrets),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/secrets/{bundle}",
            post(change_secrets).delete(delete_secrets),
        )
}

type EnvPath = (String, String, String);

async fn get_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<EnvConfig>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let c = st.store.config(&cx.env.id).await?;
    Ok(axum::Json(EnvConfig {
        version: c.version,
        vars: c.vars,
        created_at: c.created_at.map(rfc3339),
    }))
}

/// Checks names of a set/unset request: valid, not both set and unset, not empty.
fn check_change(
    set: &BTreeMap<String, String>,
    unset: &[String],
    what: &str,
) -> Result<(), ApiError> {
    if set.is_empty() && unset.is_empty() {
        return Err(ApiError::bad_request(format!(
            "nothing to change: name at least one {what}"
        )));
    }
    for name in set.keys().chain(unset) {
        names::env_var(name).map_err(ApiError::bad_request)?;
    }
    if let Some(both) = unset.iter().find(|n| set.contains_key(*n)) {
        return Err(ApiError::bad_request(format!(
            "{both} is both set and unset in one request"
        )));
    }
    Ok(())
}

/// `old` with `set` and `unset` applied, and the names `set` gave a new value.
fn apply(
    old: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    unset: &[String],
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut new = old.clone();
    new.extend(set.clone());
    for name in unset {
        new.remove(name);
    }
    let changed = set
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    (new, changed)
}

/// `set A, B; unset C`: names only, never values.
fn summary(set: &[String], unset: &[String]) -> String {
    let mut parts = Vec::new();
    if !set.is_empty() {
        parts.push(format!("set {}", set.join(", ")));
    }
    if !unset.is_empty() {
        parts.push(format!("unset {}", unset.join(", ")));
    }
    parts.join("; ")
}

async fn change_config(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(body): Json<ChangeConfig>,
) -> Result<axum::Json<ConfigReceipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    check_change(&body.set, &body.unset, "env var")?;
    let mut m = st.store.mutation().await?;
    let old = m.config(&cx.env.id).await?;
    let not_set: Vec<&str> = body
        .unset
        .iter()
        .filter(|n| !old.vars.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !not_set.is_empty() {
        return Err(ApiError::bad_request(format!(
            "cannot unset {}: not set in {}",
            not_set.join(", "),
            cx.label()
        ))
        .next(format!("verge env list {}", cx.flags())));
    }
    let (vars, set) = apply(&old.vars, &body.set, &body.unset);
    let unchanged = vars == old.vars;
    let version = if unchanged {
        old.version
    } else {
        old.version + 1
    };
    if !unchanged {
        m.insert_config(&cx.env.id, version, &vars, &cx.actor)
            .await?;
        let message = format!("env config v{version}: {}", summary(&set, &body.unset));
        let running = m.current_release(&cx.env.id).await?.map(|r| r.id);
        m.emit(cx.event("config.changed", running.as_deref(), message))
            .await?;
        m.commit().await?;
        tracing::info!(env = %cx.env.id, version, "env config changed");
    }
    Ok(axum::Json(ConfigReceipt {
        env: cx.env.name.clone(),
        version,
        previous_version: old.version,
        set,
        unset: body.unset,
        unchanged,
        follow_ups: vec![format!(
            "verge deploy {}  (a release pins the config version it runs with)",
            cx.flags()
        )],
    }))
}

/// The bundles of an env, from all their version rows (sorted by bundle, version).
pub fn bundles(rows: &[SecretVersionRow]) -> Vec<SecretBundle> {
    let mut out: Vec<SecretBundle> = Vec::new();
    for row in rows {
        if out.last().is_none_or(|b| b.name != row.bundle) {
            out.push(SecretBundle {
                name: row.bundle.clone(),
                version: None,
                keys: Vec::new(),
                digest: None,
                versions: Vec::new(),
            });
        }
        let b = out.last_mut().expect("pushed above");
        let deleted = row.deleted_at.is_some();
        if !deleted {
            b.version = Some(row.version);
            b.keys = row.key_names();
            b.digest = Some(row.digest.clone());
        }
        b.versions.push(SecretVersion {
            version: row.version,
            keys: row.key_names(),
            digest: row.digest.clone(),
            created_at: rfc3339(row.created_at),
            deleted,
        });
    }
    out
}

/// Newest live version of each bundle.
pub fn live_versions(rows: &[SecretVersionRow]) -> BTreeMap<String, i64> {
    rows.iter()
        .filter(|r| r.deleted_at.is_none())
        .map(|r| (r.bundle.clone(), r.version))
        .collect()
}

async fn list_secrets(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<Vec<SecretBundle>>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let rows = st.store.secret_versions(&cx.env.id, None).await?;
    Ok(axum::Json(bundles(&rows)))
}

fn sealed_error(e: SecretsError) -> ApiError {
    tracing::error!(error = %e, "cannot open a secret bundle");
    ApiError::new(verge_api::ErrorKind::Internal, e.to_string()).next(
        "operators: check secrets_key_file and secrets_previous_key_files (docs/operations.md)",
    )
}

async fn change_secrets(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, bundle)): Path<(String, String, String, String)>,
    Json(body): Json<ChangeSecrets>,
) -> Result<axum::Json<SecretReceipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &(org, app, env)).await?;
    names::validate("secret bundle", &bundle).map_err(ApiError::bad_request)?;
    check_change(&body.set, &body.unset, "key")?;
    let mut m = st.store.mutation().await?;
    let rows = m.secret_versions(&cx.env.id, Some(&bundle)).await?;
    let latest = rows.iter().rev().find(|r| r.deleted_at.is_none());
    let old_values = match latest {
        Some(row) => st
            .keyring
            .open(&cx.env.id, row)
            .map_err(sealed_error)?
            .unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let missing: Vec<&str> = body
        .unset
        .iter()
        .filter(|k| !old_values.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "cannot unset {}: not in secret bundle {bundle:?} of {}",
            missing.join(", "),
            cx.label()
        ))
        .next(format!("verge secrets list {}", cx.flags())));
    }
    let (values, set) = apply(&old_values, &body.set, &body.unset);
    if values.is_empty() {
        return Err(ApiError::bad_request(format!(
            "this would leave secret bundle {bundle:?} with no keys"
        ))
        .next(format!(
            "verge secrets unset {bundle} {}  (deletes the bundle)",
            cx.flags()
        )));
    }
    let previous = latest.map(|r| r.version);
    let unchanged = latest.is_some() && values == old_values;
    let (version, digest) = if unchanged {
        let row = latest.expect("checked");
        (row.version, row.digest.clone())
    } else {
        let version = rows.last().map_or(1, |r| r.version + 1);
        let sealed = st.keyring.seal(&cx.env.id, &bundle, version, &values);
        let row = SecretVersionRow {
            bundle: bundle.clone(),
            version,
            keys: serde_json::to_string(&values.keys().collect::<Vec<_>>()).expect("strings"),
            digest: sealed.digest.clone(),
            key_id: Some(sealed.key_id),
            nonce: Some(sealed.nonce),
            ciphertext: Some(sealed.ciphertext),
            created_at: now_ms(),
            deleted_at: None,
        };
        m.insert_secret_version(&cx.env.id, &row, &cx.actor).await?;
        let message = format!(
            "secret bundle {bundle} v{version}: {}",
            summary(&set, &body.unset)
        );
        let running = m.current_release(&cx.env.id).await?.map(|r| r.id);
        m.emit(cx.event("secrets.changed", running.as_deref(), message))
            .await?;
        m.commit().await?;
        tracing::info!(env = %cx.env.id, %bundle, version, "secret bundle changed");
        (version, sealed.digest)
    };
    Ok(axum::Json(SecretReceipt {
        env: cx.env.name.clone(),
        bundle,
        version: Some(version),
        previous_version: previous,
        keys: values.into_keys().collect(),
        digest: Some(digest),
        set,
        unset: body.unset,
        deleted_versions: Vec::new(),
        unchanged,
        follow_ups: vec![format!(
            "verge deploy {}  (a release pins the bundle versions it runs with)",
            cx.flags()
        )],
    }))
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

async fn delete_secrets(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, bundle)): Path<(String, String, String, String)>,
    Query(q): Query<VersionQuery>,
) -> Result<axum::Json<SecretReceipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &(org, app, env)).await?;
    let not_found = || {
        ApiError::not_found("secret bundle", &bundle)
            .next(format!("verge secrets list {}", cx.flags()))
    };
    if names::validate("secret bundle", &bundle).is_err() {
        return Err(not_found());
    }
    let mut m = st.store.mutation().await?;
    let rows = m.secret_versions(&cx.env.id, Some(&bundle)).await?;
    let live: Vec<&SecretVersionRow> = rows.iter().filter(|r| r.deleted_at.is_none()).collect();
    let previous = live.last().map(|r| r.version);
    let doomed: Vec<i64> = match q.version {
        None if live.is_empty() => return Err(not_found()),
        None => live.iter().map(|r| r.version).collect(),
        Some(v) => match rows.iter().find(|r| r.version == v) {
            Some(r) if r.deleted_at.is_none() => vec![v],
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "secret bundle {bundle:?} v{v} is already deleted"
                )));
            }
            None => {
                return Err(ApiError::not_found(
                    "secret bundle version",
                    &format!("{bundle} v{v}"),
                )
                .next(format!("verge secrets list {}", cx.flags())));
            }
        },
    };
    // A version that a running release pins and mounts must stay: its
    // instances get their secret files from it at every start. (One only
    // required by `[require] secrets` reaches no instance.)
    let mut in_use: BTreeMap<String, i64> = BTreeMap::new();
    let current = m.current_release(&cx.env.id).await?;
    let mut releases: Vec<String> = current.iter().map(|r| r.id.clone()).collect();
    for i in m.env_instances(&cx.env.id).await? {
        if i.goal == "run" && !releases.contains(&i.release_id) {
            releases.push(i.release_id);
        }
    }
    for id in &releases {
        if let Some(r) = m.release_by_id(&cx.env.id, id).await?
            && secrets_of(&r)?
                .get(&bundle)
                .is_some_and(|v| doomed.contains(v))
            && manifest_of(&r)?
                .workloads
                .values()
                .any(|w| w.secrets.iter().any(|s| s.bundle == bundle))
        {
            in_use.insert(format!("v{}", r.number), secrets_of(&r)?[&bundle]);
        }
    }
    if !in_use.is_empty() {
        let uses: Vec<String> = in_use
            .iter()
            .map(|(release, v)| format!("release {release} pins v{v}"))
            .collect();
        return Err(ApiError::conflict(format!(
            "secret bundle {bundle:?} is in use: {}, and its instances read it at every \
             start; nothing was deleted",
            uses.join(", ")
        ))
        .next(format!(
            "verge secrets set {bundle} KEY=VALUE {}  (a new version), then verge deploy, then delete",
            cx.flags()
        )));
    }
    for v in &doomed {
        m.delete_secret_version(&cx.env.id, &bundle, *v).await?;
    }
    let list = doomed
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let running = current.map(|r| r.id);
    m.emit(cx.event(
        "secrets.deleted",
        running.as_deref(),
        format!("secret bundle {bundle}: deleted {list}"),
    ))
    .await?;
    m.commit().await?;
    tracing::info!(env = %cx.env.id, %bundle, versions = %list, "secret versions deleted");
    let remaining = live.iter().rev().find(|r| !doomed.contains(&r.version));
    Ok(axum::Json(SecretReceipt {
        env: cx.env.name.clone(),
        bundle,
        version: remaining.map(|r| r.version),
        previous_version: previous,
        keys: remaining.map(|r| r.key_names()).unwrap_or_default(),
        digest: remaining.map(|r| r.digest.clone()),
        set: Vec::new(),
        unset: Vec::new(),
        deleted_versions: doomed,
        unchanged: false,
        follow_ups: vec![
            format!("verge secrets list {}", cx.flags()),
            "releases that use a deleted version cannot be rolled back to".into(),
        ],
    }))
}
