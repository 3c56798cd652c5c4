//! The `/v1` HTTP API: one file per noun, plus health and metrics.
//!
//! Every handler authenticates with [`Caller`](crate::auth::Caller), resolves
//! names to rows through the caller's org scope, and answers JSON (the types
//! of `verge_api::resources`) or an [`ApiError`].

mod config;
mod endpoints;
mod exec;
mod health;
mod ingress;
mod logs;
mod nodes;
mod nouns;
mod observe;
mod releases;
mod rollouts;
mod scope;
mod tokens;
mod volumes;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use axum::routing::get;
use tower_http::trace::TraceLayer;
use verge_api::ErrorKind;

use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::images::Pinner;
use crate::metrics::Metrics;
use crate::secrets::Keyring;
use crate::store::Store;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// Seals and opens secret bundle values.
    pub keyring: Arc<Keyring>,
    /// Pins image references to digests.
    pub pinner: Pinner,
    /// The cluster side: nodes, placements, join tokens.
    pub cluster: crate::cluster::Cluster,
    /// Fires on shutdown: long-lived streams end so the drain can finish.
    pub shutdown: CancellationToken,
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/whoami", get(health::whoami))
        .merge(nouns::routes())
        .merge(config::routes())
        .merge(releases::routes())
        .merge(rollouts::routes())
        .merge(observe::routes())
        .merge(tokens::routes())
        .merge(nodes::routes())
        .merge(endpoints::routes())
        .merge(ingress::routes())
        .merge(logs::routes())
        .merge(exec::routes())
        .merge(volumes::routes());
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .nest("/v1", v1)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                token = tracing::field::Empty,
                org = tracing::field::Empty,
                app = tracing::field::Empty,
                env = tracing::field::Empty,
                release = tracing::field::Empty,
            )
        }))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no API route {method} {}", uri.path()),
    )
    .next("see docs/cli.md for the API the CLI uses")
}

async fn wrong_method(method: Method, uri: Uri) -> (axum::http::StatusCode, ApiError) {
    let err = ApiError::new(
        ErrorKind::BadRequest,
        format!("method {method} is not allowed on {}", uri.path()),
    )
    .next("see docs/cli.md for the methods each route takes");
    (axum::http::StatusCode::METHOD_NOT_ALLOWED, err)
}

/// A JSON request body whose every rejection is an [`ApiError`]: 413 when it
/// is over the size limit, 400 with the parser's reason otherwise.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) if rejection.status().as_u16() == 413 => Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                "request body is larger than the control plane accepts (max_body_bytes)",
            )
            .next("send a smaller body, or raise max_body_bytes in the control plane's config")),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "invalid request body: {}",
                rejection.body_text()
            ))
            .next("send a JSON object with Content-Type: application/json (see docs/cli.md)")),
        }
    }
}

/// Path parameters whose every rejection is a 400 [`ApiError`].
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    axum::extract::Path<T>:
        FromRequestParts<S, Rejection = axum::extract::rejection::PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "invalid path: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Query parameters whose every rejection is a 400 [`ApiError`].
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    axum::extract::Query<T>:
        FromRequestParts<S, Rejection = axum::extract::rejection::QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "invalid query string: {}",
                rejection.body_text()
            ))),
        }
    }
}
