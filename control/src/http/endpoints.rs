//! What is exposed to the internet (SPEC §4 `verge endpoints`):
//!
//! - `GET /v1/orgs/{org}/endpoints[?app=A[&env=E]]`: every endpoint of the
//!   org's current releases, with addresses, ports and proxy protocol;
//! - `GET /v1/orgs/{org}/apps/{app}/envs/{env}/endpoints/{name}`: one of
//!   them with its backends (each instance, in rotation or why not) and
//!   what every ingress listens on for it.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Deserialize;
use verge_api::routing::ExposedEndpoint;

use super::scope::EnvCx;
use super::{AppState, Path, Query};
use crate::auth::Caller;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orgs/{org}/endpoints", get(list))
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/endpoints/{name}",
            get(describe),
        )
}

#[derive(Debug, Deserialize)]
struct ListParams {
    app: Option<String>,
    env: Option<String>,
}

async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Query(q): Query<ListParams>,
) -> Result<axum::Json<Vec<ExposedEndpoint>>, ApiError> {
    let org = caller.org(&st.store, &org).await?;
    let apps = match &q.app {
        Some(name) => vec![super::nouns::find_app(&st.store, &org, name).await?],
        None => st.store.list_apps(&org.id, None).await?,
    };
    let mut envs = Vec::new();
    for app in &apps {
        for env in st.store.list_envs(&app.id).await? {
            if q.env.as_ref().is_none_or(|e| *e == env.name) {
                envs.push(env.id);
            }
        }
    }
    let mut out =
        crate::routing::exposed(&st.store, &envs, &st.cluster.addressing(), false).await?;
    out.sort_by(|a, b| (&a.app, &a.env, &a.name).cmp(&(&b.app, &b.env, &b.name)));
    Ok(axum::Json(out))
}

async fn describe(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<(String, String, String, String)>,
) -> Result<axum::Json<ExposedEndpoint>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &(org, app, env)).await?;
    let all = crate::routing::exposed(
        &st.store,
        std::slice::from_ref(&cx.env.id),
        &st.cluster.addressing(),
        true,
    )
    .await?;
    let names: Vec<String> = all.iter().map(|e| e.name.clone()).collect();
    all.into_iter()
        .find(|e| e.name == name)
        .map(axum::Json)
        .ok_or_else(|| {
            let mut err = ApiError::not_found("endpoint", &name);
            err = if names.is_empty() {
                err.next(format!(
                    "{} has no endpoints: add [[endpoints]] to verge.toml and deploy",
                    cx.label()
                ))
            } else {
                err.next(format!("endpoints of {}: {}", cx.label(), names.join(", ")))
            };
            err.next(format!("verge endpoints {}", cx.flags()))
        })
}
