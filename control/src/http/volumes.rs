//! Volumes of an env (SPEC §4 `verge volumes`), below
//! `/v1/orgs/{org}/apps/{app}/envs/{env}`:
//!
//! - `GET .../volumes`, `POST .../volumes` (create);
//! - `GET .../volumes/{name}` (with snapshots and the commands that act on
//!   it), `DELETE .../volumes/{name}[?snapshots=true]`;
//! - `POST .../volumes/{name}/resize`;
//! - `GET` and `POST .../volumes/{name}/snapshots` (list, take one);
//! - `POST .../volumes/restore`; `DELETE .../snapshots/{id}`.
//!
//! The work is in [`crate::volumes`]. An operation that reaches a node runs
//! on a task of its own: a client that goes away does not cut it short,
//! so the volume's row always learns how it ended.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde::Deserialize;
use tracing::Instrument;
use verge_api::ErrorKind;
use verge_api::volumes::{CreateVolume, ResizeVolume, RestoreSnapshot, Snapshot, Volume};

use super::scope::EnvCx;
use super::{AppState, Json, Path, Query};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::EnvScope;
use crate::volumes::{EnvVolumes, VolumeError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/volumes",
            get(list).post(create),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/volumes/restore",
            post(restore),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/volumes/{name}",
            get(describe).delete(remove),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/volumes/{name}/resize",
            post(resize),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/volumes/{name}/snapshots",
            get(snapshots).post(snapshot),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/snapshots/{id}",
            delete(delete_snapshot),
        )
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Refused {
                kind,
                message,
                next,
            } => {
                let mut err = ApiError::new(kind, message);
                err.0.next = next;
                err
            }
            VolumeError::Store(e) => e.into(),
        }
    }
}

type EnvPath = (String, String, String);
type NamedPath = (String, String, String, String);

/// The env's volumes as the caller acts on them.
async fn volumes(st: &AppState, caller: &Caller, path: &EnvPath) -> Result<EnvVolumes, ApiError> {
    let cx = EnvCx::resolve(st, caller, path).await?;
    Ok(EnvVolumes {
        store: st.store.clone(),
        cluster: st.cluster.clone(),
        scope: EnvScope {
            org_id: cx.org.id.clone(),
            org: cx.org.name.clone(),
            app_id: cx.app.id.clone(),
            app: cx.app.name.clone(),
            env_id: cx.env.id.clone(),
            env: cx.env.name.clone(),
        },
        actor: cx.actor,
    })
}

/// Runs an operation that may reach a node on a task of its own, in a
/// span naming its org, app, env and volume.
async fn run<T, F>(
    vols: &EnvVolumes,
    op: &'static str,
    volume: &str,
    work: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, VolumeError>> + Send + 'static,
{
    let s = &vols.scope;
    let span = tracing::info_span!(
        "volume", op, org = %s.org_id, app = %s.app_id, env = %s.env_id, volume = %volume,
    );
    match tokio::spawn(work.instrument(span)).await {
        Ok(result) => Ok(result?),
        Err(e) => {
            tracing::error!(error = %e, op, "a volume operation's task failed");
            Err(ApiError::new(
                ErrorKind::Internal,
                format!("internal error: the {op} of volume {volume} broke off; its state shows how far it got"),
            )
            .next(format!(
                "verge volumes describe {volume} --app {} --env {}",
                s.app, s.env
            )))
        }
    }
}

async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<Vec<Volume>>, ApiError> {
    let vols = volumes(&st, &caller, &path).await?;
    Ok(axum::Json(vols.list().await?))
}

async fn describe(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<NamedPath>,
) -> Result<axum::Json<Volume>, ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    Ok(axum::Json(vols.describe(&name).await?))
}

async fn create(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(req): Json<CreateVolume>,
) -> Result<(StatusCode, axum::Json<Volume>), ApiError> {
    let vols = volumes(&st, &caller, &path).await?;
    let name = req.name.clone();
    let v = vols.clone();
    let created = run(&vols, "create", &name, async move { v.create(&req).await }).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

async fn resize(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<NamedPath>,
    Json(req): Json<ResizeVolume>,
) -> Result<axum::Json<Volume>, ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    let (v, n) = (vols.clone(), name.clone());
    let resized = run(
        &vols,
        "resize",
        &name,
        async move { v.resize(&n, &req).await },
    )
    .await?;
    Ok(axum::Json(resized))
}

async fn snapshot(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<NamedPath>,
) -> Result<(StatusCode, axum::Json<Snapshot>), ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    let (v, n) = (vols.clone(), name.clone());
    let taken = run(
        &vols,
        "snapshot",
        &name,
        async move { v.snapshot(&n).await },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(taken)))
}

async fn snapshots(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<NamedPath>,
) -> Result<axum::Json<Vec<Snapshot>>, ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    Ok(axum::Json(vols.snapshots(&name).await?))
}

/// `201` with the new volume when the snapshot went into a new one, `200`
/// with the volume whose data it replaced otherwise.
async fn restore(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(req): Json<RestoreSnapshot>,
) -> Result<(StatusCode, axum::Json<Volume>), ApiError> {
    let vols = volumes(&st, &caller, &path).await?;
    let target = req.into.clone().unwrap_or_else(|| req.snapshot.clone());
    let v = vols.clone();
    let (volume, new) = run(
        &vols,
        "restore",
        &target,
        async move { v.restore(&req).await },
    )
    .await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(volume)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    /// Also delete every snapshot taken of the volume.
    #[serde(default)]
    snapshots: bool,
}

async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<NamedPath>,
    Query(q): Query<DeleteParams>,
) -> Result<axum::Json<Volume>, ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    let (v, n) = (vols.clone(), name.clone());
    let deleted = run(&vols, "delete", &name, async move {
        v.delete(&n, q.snapshots).await
    })
    .await?;
    Ok(axum::Json(deleted))
}

async fn delete_snapshot(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, id)): Path<NamedPath>,
) -> Result<axum::Json<Snapshot>, ApiError> {
    let vols = volumes(&st, &caller, &(org, app, env)).await?;
    let v = vols.clone();
    let snap = id.clone();
    let deleted = run(&vols, "delete_snapshot", &id, async move {
        v.delete_snapshot(&snap).await
    })
    .await?;
    Ok(axum::Json(deleted))
}
