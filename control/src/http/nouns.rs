//! Orgs, projects, apps and envs: create and list.
//!
//! `POST/GET /v1/orgs`, `/v1/orgs/{org}/projects`, `/v1/orgs/{org}/apps`
//! (`?project=` filters), `GET /v1/orgs/{org}/apps/{app}`,
//! `POST/GET /v1/orgs/{org}/apps/{app}/envs`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Deserialize;
use verge_api::names;
use verge_api::requests::{CreateApp, CreateNamed};
use verge_api::resources::{App, Env, Org, Project};

use super::{AppState, Json, Path, Query};
use crate::auth::Caller;
use crate::error::{ApiError, OrConflict};
use crate::store::{AppRow, EnvRow, OrgRow, ProjectRow, Store};
use crate::time::rfc3339;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orgs", get(list_orgs).post(create_org))
        .route(
            "/orgs/{org}/projects",
            get(list_projects).post(create_project),
        )
        .route("/orgs/{org}/apps", get(list_apps).post(create_app))
        .route("/orgs/{org}/apps/{app}", get(get_app))
        .route(
            "/orgs/{org}/apps/{app}/envs",
            get(list_envs).post(create_env),
        )
}

type Created<T> = Result<(StatusCode, axum::Json<T>), ApiError>;
type Listed<T> = Result<axum::Json<Vec<T>>, ApiError>;

fn valid_name(kind: &str, name: &str) -> Result<(), ApiError> {
    names::validate(kind, name).map_err(ApiError::bad_request)
}

fn org(row: OrgRow) -> Org {
    Org {
        id: row.id,
        name: row.name,
        created_at: rfc3339(row.created_at),
    }
}

fn project(org: &OrgRow, row: ProjectRow) -> Project {
    Project {
        id: row.id,
        name: row.name,
        org: org.name.clone(),
        created_at: rfc3339(row.created_at),
    }
}

fn app(org: &OrgRow, row: AppRow) -> App {
    App {
        id: row.id,
        name: row.name,
        org: org.name.clone(),
        project: row.project,
        created_at: rfc3339(row.created_at),
    }
}

fn env(org: &OrgRow, app: &AppRow, row: EnvRow) -> Env {
    Env {
        id: row.id,
        name: row.name,
        org: org.name.clone(),
        app: app.name.clone(),
        created_at: rfc3339(row.created_at),
    }
}

/// The project `name` of `org`, or a 404 naming it.
async fn find_project(store: &Store, org: &OrgRow, name: &str) -> Result<ProjectRow, ApiError> {
    let missing =
        || ApiError::not_found("project", name).next(format!("verge projects create {name}"));
    if names::validate("project", name).is_err() {
        return Err(missing());
    }
    store
        .project_by_name(&org.id, name)
        .await?
        .ok_or_else(missing)
}

/// The app `name` of `org`, or a 404 naming it.
pub(super) async fn find_app(store: &Store, org: &OrgRow, name: &str) -> Result<AppRow, ApiError> {
    if names::validate("app", name).is_err() {
        return Err(ApiError::not_found("app", name));
    }
    store
        .app_by_name(&org.id, name)
        .await?
        .ok_or_else(|| ApiError::not_found("app", name).next(format!("verge apps create {name}")))
}

async fn create_org(
    State(st): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateNamed>,
) -> Created<Org> {
    caller.require_admin("creating an org")?;
    valid_name("org", &body.name)?;
    let row = st.store.create_org(&body.name).await.or_conflict(
        || format!("org {:?} already exists", body.name),
        "verge orgs list",
    )?;
    tracing::info!(org = %row.id, name = %row.name, "org created");
    Ok((StatusCode::CREATED, axum::Json(org(row))))
}

/// All orgs for an admin; only its own for an org token.
async fn list_orgs(State(st): State<AppState>, caller: Caller) -> Listed<Org> {
    let rows = st.store.list_orgs().await?;
    Ok(axum::Json(
        rows.into_iter()
            .filter(|o| caller.sees_org(&o.id))
            .map(org)
            .collect(),
    ))
}

async fn create_project(
    State(st): State<AppState>,
    caller: Caller,
    Path(org_name): Path<String>,
    Json(body): Json<CreateNamed>,
) -> Created<Project> {
    let o = caller.org(&st.store, &org_name).await?;
    valid_name("project", &body.name)?;
    let row = st
        .store
        .create_project(&o.id, &body.name)
        .await
        .or_conflict(
            || format!("project {:?} already exists in org {:?}", body.name, o.name),
            "verge projects list",
        )?;
    tracing::info!(org = %o.id, project = %row.id, "project created");
    Ok((StatusCode::CREATED, axum::Json(project(&o, row))))
}

async fn list_projects(
    State(st): State<AppState>,
    caller: Caller,
    Path(org_name): Path<String>,
) -> Listed<Project> {
    let o = caller.org(&st.store, &org_name).await?;
    let rows = st.store.list_projects(&o.id).await?;
    Ok(axum::Json(
        rows.into_iter().map(|r| project(&o, r)).collect(),
    ))
}

async fn create_app(
    State(st): State<AppState>,
    caller: Caller,
    Path(org_name): Path<String>,
    Json(body): Json<CreateApp>,
) -> Created<App> {
    let o = caller.org(&st.store, &org_name).await?;
    valid_name("app", &body.name)?;
    let p = find_project(&st.store, &o, &body.project).await?;
    let row = st
        .store
        .create_app(&o.id, &p, &body.name)
        .await
        .or_conflict(
            || format!("app {:?} already exists in org {:?}", body.name, o.name),
            "verge apps list",
        )?;
    tracing::info!(org = %o.id, app = %row.id, "app created");
    Ok((StatusCode::CREATED, axum::Json(app(&o, row))))
}

#[derive(Debug, Deserialize)]
struct AppFilter {
    project: Option<String>,
}

async fn list_apps(
    State(st): State<AppState>,
    caller: Caller,
    Path(org_name): Path<String>,
    Query(filter): Query<AppFilter>,
) -> Listed<App> {
    let o = caller.org(&st.store, &org_name).await?;
    let project_id = match &filter.project {
        None => None,
        Some(name) => Some(find_project(&st.store, &o, name).await?.id),
    };
    let rows = st.store.list_apps(&o.id, project_id.as_deref()).await?;
    Ok(axum::Json(rows.into_iter().map(|r| app(&o, r)).collect()))
}

async fn get_app(
    State(st): State<AppState>,
    caller: Caller,
    Path((org_name, app_name)): Path<(String, String)>,
) -> Result<axum::Json<App>, ApiError> {
    let o = caller.org(&st.store, &org_name).await?;
    let row = find_app(&st.store, &o, &app_name).await?;
    Ok(axum::Json(app(&o, row)))
}

async fn create_env(
    State(st): State<AppState>,
    caller: Caller,
    Path((org_name, app_name)): Path<(String, String)>,
    Json(body): Json<CreateNamed>,
) -> Created<Env> {
    let o = caller.org(&st.store, &org_name).await?;
    let a = find_app(&st.store, &o, &app_name).await?;
    valid_name("env", &body.name)?;
    let row = st.store.create_env(&a, &body.name).await.or_conflict(
        || format!("env {:?} already exists in app {:?}", body.name, a.name),
        "verge envs list",
    )?;
    tracing::info!(org = %o.id, app = %a.id, env = %row.id, "env created");
    Ok((StatusCode::CREATED, axum::Json(env(&o, &a, row))))
}

async fn list_envs(
    State(st): State<AppState>,
    caller: Caller,
    Path((org_name, app_name)): Path<(String, String)>,
) -> Listed<Env> {
    let o = caller.org(&st.store, &org_name).await?;
    let a = find_app(&st.store, &o, &app_name).await?;
    let rows = st.store.list_envs(&a.id).await?;
    Ok(axum::Json(
        rows.into_iter().map(|r| env(&o, &a, r)).collect(),
    ))
}
