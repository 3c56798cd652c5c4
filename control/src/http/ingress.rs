//! What ingress daemons use (SPEC §5 Ingress), all behind a cluster admin
//! token:
//!
//! - `GET /v1/ingress/routes`: the routing table; with `?watch=true`, an
//!   NDJSON stream of whole tables, one line each time the table changes
//!   (instance reports and deploys commit events, which wake the stream;
//!   other replicas' changes are seen within [`POLL`]), and an empty line
//!   after [`KEEPALIVE_MS`] of silence;
//! - `POST /v1/ingress/status`: an ingress reports what it listens on;
//! - `GET /v1/ingress/cluster`: where its QUIC path to nodes behind NAT
//!   connects, and the CA that signs that endpoint.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use verge_api::routing::{ClusterInfo, IngressReport, KEEPALIVE_MS, RoutingTable};

use super::{AppState, Json, Query};
use crate::auth::Caller;
use crate::error::ApiError;

/// How often a watch recomputes the table without a local wake-up.
const POLL: Duration = Duration::from_secs(1);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ingress/routes", get(routes_table))
        .route("/ingress/status", post(status))
        .route("/ingress/cluster", get(cluster))
}

#[derive(Debug, Deserialize)]
struct WatchParams {
    #[serde(default)]
    watch: bool,
}

async fn routes_table(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<WatchParams>,
) -> Result<Response, ApiError> {
    caller.require_admin("watching the routing table")?;
    // Fail before the 200 if the store is down; later errors end the stream.
    let first = crate::routing::table(&st.store, &st.cluster.addressing()).await?;
    if !q.watch {
        return Ok(axum::Json(first).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(watch(st, first, tx));
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(super::observe::tokio_stream_from(rx)),
    )
        .into_response())
}

/// Sends `table`, then every changed table, until the ingress goes away,
/// the server shuts down or the store fails.
async fn watch(
    st: AppState,
    mut table: RoutingTable,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
) {
    let mut committed = st.store.subscribe_events();
    let keepalive = Duration::from_millis(KEEPALIVE_MS);
    let mut sent: Option<String> = None;
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        if sent.as_deref() != Some(table.version.as_str()) {
            let mut line = serde_json::to_vec(&table).expect("a routing table serialises");
            line.push(b'\n');
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
            sent = Some(table.version.clone());
            quiet_since = tokio::time::Instant::now();
        }
        tokio::select! {
            () = st.shutdown.cancelled() => return,
            () = tx.closed() => return,
            _ = committed.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        if quiet_since.elapsed() >= keepalive {
            if tx.send(Ok(b"\n".to_vec())).await.is_err() {
                return;
            }
            quiet_since = tokio::time::Instant::now();
        }
        match crate::routing::table(&st.store, &st.cluster.addressing()).await {
            Ok(t) => table = t,
            Err(e) => {
                tracing::warn!(error = %e, "routing table stream ends: store failed");
                return;
            }
        }
    }
}

async fn status(
    State(st): State<AppState>,
    caller: Caller,
    Json(report): Json<IngressReport>,
) -> Result<axum::http::StatusCode, ApiError> {
    caller.require_admin("reporting as an ingress")?;
    if verge_api::names::validate("ingress", &report.name).is_err() {
        return Err(ApiError::bad_request(format!(
            "ingress name {:?} is not a valid name",
            report.name
        ))
        .next("start the ingress with --name NAME (lower-case letters, digits and dashes)"));
    }
    let json = serde_json::to_string(&report).expect("a report serialises");
    st.store.put_ingress_report(&report.name, &json).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

async fn cluster(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<ClusterInfo>, ApiError> {
    caller.require_admin("connecting an ingress")?;
    Ok(axum::Json(st.cluster.quic_info()))
}
