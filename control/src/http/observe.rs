//! What an env runs and what happened to it: status, describe, events.
//!
//! `GET .../envs/{env}` (describe), `.../status`, `.../workloads/{name}`,
//! `.../events`, `GET /v1/orgs/{org}/events` (every env of the org) and
//! `GET /v1/events` (the whole cluster for an admin; an org token's own org).
//! Events take `?after=CURSOR`, `?since=RFC3339` and `?follow=true`; a
//! follow answers NDJSON, one event per line, with a blank line every
//! [`KEEPALIVE`] of silence, until the client leaves or the server shuts down.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use verge_api::manifest::Mode;
use verge_api::release::ReleaseRef;
use verge_api::status::{
    EnvDetail, Event, InstanceStatus, ListenerStatus, Rollout, ScaleOverride, Status,
    WorkloadDetail, WorkloadStatus,
};

use super::scope::{EnvCx, manifest_of};
use super::{AppState, Path, Query};
use crate::auth::Caller;
use crate::desired::apply_scale;
use crate::error::ApiError;
use crate::reconcile::plan::Clock;
use crate::reconcile::{ClusterView, rollout};
use crate::store::{EventFilter, EventRow, InstanceRow, ListenerRow, ScaleRow};
use crate::time::{now_ms, rfc3339};

/// Longest silence on a followed event stream.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a follower looks for events other replicas committed.
const POLL: Duration = Duration::from_secs(1);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orgs/{org}/apps/{app}/envs/{env}", get(describe_env))
        .route("/orgs/{org}/apps/{app}/envs/{env}/status", get(status))
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/workloads/{workload}",
            get(describe_workload),
        )
        .route("/orgs/{org}/apps/{app}/envs/{env}/events", get(env_events))
        .route("/orgs/{org}/events", get(org_events))
        .route("/events", get(cluster_events))
}

type EnvPath = (String, String, String);

/// The env's current release with scale applied, per workload status.
struct Observed {
    release: Option<ReleaseRef>,
    rollout: Rollout,
    workloads: Vec<WorkloadStatus>,
    scale: BTreeMap<String, ScaleRow>,
    manifest: Option<verge_api::manifest::Manifest>,
}

async fn observe(st: &AppState, cx: &EnvCx) -> Result<Observed, ApiError> {
    let current = st.store.current_release(&cx.env.id).await?;
    let scale = st.store.scale_overrides(&cx.env.id).await?;
    let Some(row) = current else {
        return Ok(Observed {
            release: None,
            rollout: Rollout {
                state: "pending".into(),
                reason: Some(format!("nothing deployed yet: verge deploy {}", cx.flags())),
                ..Default::default()
            },
            workloads: Vec::new(),
            scale,
            manifest: None,
        });
    };
    let m = apply_scale(&manifest_of(&row)?, &scale);
    let instances = st.store.env_instances(&cx.env.id).await?;
    let numbers = st.store.release_numbers(&cx.env.id).await?;
    let nodes = ClusterView::read(&st.store).await?;
    let offline: BTreeMap<String, String> = nodes
        .nodes
        .iter()
        .filter_map(|n| Some((n.id.clone(), n.offline_since.clone()?)))
        .collect();
    let reschedule = st.cluster.settings().reschedule_after_ms;
    let latest = st.store.latest_rollout(&cx.env.id).await?;
    let listeners = if m.workloads.values().any(|w| w.mode == Mode::PerConnection) {
        st.store.env_listeners(&cx.env.id).await?
    } else {
        Vec::new()
    };
    let workloads: Vec<WorkloadStatus> = m
        .workloads
        .iter()
        .map(|(name, w)| {
            let mine: Vec<&InstanceRow> =
                instances.iter().filter(|i| &i.workload == name).collect();
            let pinned = !w.volumes.is_empty();
            WorkloadStatus {
                name: name.clone(),
                desired: w.count,
                running: mine
                    .iter()
                    .filter(|i| i.goal == "run" && i.release_id == row.id && serving(i, &offline))
                    .count() as u32,
                instances: mine
                    .iter()
                    .map(|i| instance_status(i, &offline, &numbers, pinned, reschedule))
                    .collect(),
                runtime: w.runtime,
                mode: w.mode,
                listeners: listeners
                    .iter()
                    .filter(|l| &l.workload == name)
                    .map(|l| listener_status(l, &row.id, &offline, &numbers))
                    .collect(),
            }
        })
        .collect();
    let rollout = match latest {
        Some(r) => {
            // Its progress from what was just read: status is what `verge
            // wait` polls.
            let live = if r.is_active() && r.release_id == row.id {
                let clock = Clock {
                    now_ms: now_ms(),
                    reschedule_after_ms: reschedule,
                };
                Some(rollout::progress_of(
                    &r,
                    &m,
                    &instances,
                    &nodes.facts,
                    clock,
                ))
            } else {
                super::rollouts::live_progress(&st.store, &cx.env.id, &r, reschedule).await?
            };
            super::rollouts::view(&r, &numbers, live.as_ref())
        }
        None => Rollout {
            state: "completed".into(),
            ..Default::default()
        },
    };
    Ok(Observed {
        release: Some(cx.release_ref(&row)),
        rollout,
        workloads,
        scale,
        manifest: Some(m),
    })
}

/// Running, as last reported by a node that is online.
fn serving(i: &InstanceRow, offline: &BTreeMap<String, String>) -> bool {
    i.state == "running" && !i.node_id.as_ref().is_some_and(|n| offline.contains_key(n))
}

fn instance_status(
    i: &InstanceRow,
    offline: &BTreeMap<String, String>,
    numbers: &BTreeMap<String, i64>,
    pinned: bool,
    reschedule_after_ms: i64,
) -> InstanceStatus {
    let mut reason = match (&i.category, &i.message) {
        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
        (None, Some(m)) => Some(m.clone()),
        (Some(c), None) => Some(c.clone()),
        (None, None) => None,
    };
    if let Some(since) = i.node_id.as_ref().and_then(|n| offline.get(n)) {
        let node = i.node_name.clone().unwrap_or_default();
        let next = if i.goal == "stop" {
            "replaced; the node stops this copy when it returns".to_string()
        } else if pinned {
            "pinned to the node by the workload's volumes: not rescheduled; it resumes when the \
             node returns (or snapshot and restore the volume onto another node)"
                .to_string()
        } else {
            format!(
                "replaced on another node once it has been offline for {}",
                humantime::format_duration(Duration::from_millis(reschedule_after_ms as u64))
            )
        };
        reason = Some(format!(
            "node {node} offline since {since}; last reported {}; {next}",
            i.state
        ));
    }
    let health = match (i.state.as_str(), i.healthy()) {
        ("running", Some(true)) => Some("healthy".to_string()),
        ("running", Some(false)) => Some("unhealthy".to_string()),
        _ => None,
    };
    InstanceStatus {
        id: Some(i.id.clone()),
        node: i.node_name.clone(),
        state: if i.goal == "stop" && i.state == "running" {
            "stopping".into()
        } else {
            i.state.clone()
        },
        address: i.address.clone(),
        reason,
        health,
        release: numbers.get(&i.release_id).copied(),
        category: i.category.clone(),
        message: i.message.clone(),
    }
}

/// A node's listener of a per-connection workload (`current`: the env's
/// current release).
fn listener_status(
    l: &ListenerRow,
    current: &str,
    offline: &BTreeMap<String, String>,
    numbers: &BTreeMap<String, i64>,
) -> ListenerStatus {
    let node = l.node_name.clone().unwrap_or_else(|| l.node_id.clone());
    let reason = if let Some(since) = offline.get(&l.node_id) {
        Some(format!(
            "node {node} offline since {since}; last reported {}",
            l.state
        ))
    } else if l.release_id != current {
        Some("leaving: an earlier release; open connections drain, no new ones".into())
    } else {
        l.message.clone()
    };
    let answering =
        l.release_id == current && l.state == "listening" && !offline.contains_key(&l.node_id);
    let count = |n: i64| n.max(0) as u64;
    ListenerStatus {
        id: l.id.clone(),
        node: Some(node),
        state: l.state.clone(),
        address: l.address.clone(),
        answering,
        reason,
        release: numbers.get(&l.release_id).copied(),
        active: count(l.active),
        served: count(l.served),
        failed: count(l.failed),
        last_failure: l.last_failure.clone(),
        last_failure_category: l.last_failure_category.clone(),
        last_failure_at: l.last_failure_at.map(rfc3339),
    }
}

async fn status(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<Status>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let o = observe(&st, &cx).await?;
    Ok(axum::Json(Status {
        target: cx.target(),
        release: o.release,
        rollout: o.rollout,
        workloads: o.workloads,
    }))
}

fn scale_override(s: &ScaleRow) -> ScaleOverride {
    ScaleOverride {
        count: s.count.map(|c| c as u32),
        cpu: s.cpu_millis.map(|c| c as f64 / 1000.0),
        memory: s.memory.map(|m| m as u64),
    }
}

async fn describe_env(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<EnvDetail>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let o = observe(&st, &cx).await?;
    let config = st.store.config(&cx.env.id).await?;
    let rows = st.store.secret_versions(&cx.env.id, None).await?;
    let releases = st.store.count_releases(&cx.env.id).await?;
    Ok(axum::Json(EnvDetail {
        id: cx.env.id.clone(),
        target: cx.target(),
        created_at: rfc3339(cx.env.created_at),
        release: o.release,
        releases,
        config_version: config.version,
        vars: config.vars.into_keys().collect(),
        secrets: super::config::bundles(&rows),
        scale: o
            .scale
            .iter()
            .map(|(w, s)| (w.clone(), scale_override(s)))
            .collect(),
        rollout: o.rollout,
    }))
}

async fn describe_workload(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<(String, String, String, String)>,
) -> Result<axum::Json<WorkloadDetail>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &(org, app, env)).await?;
    let o = observe(&st, &cx).await?;
    let not_found =
        || ApiError::not_found("workload", &name).next(format!("verge status {}", cx.flags()));
    let (Some(release), Some(m)) = (o.release, o.manifest) else {
        return Err(not_found());
    };
    let spec = m.workloads.get(&name).cloned().ok_or_else(not_found)?;
    let status = o
        .workloads
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(not_found)?;
    Ok(axum::Json(WorkloadDetail {
        target: cx.target(),
        release,
        spec,
        scale: o.scale.get(&name).map(scale_override).unwrap_or_default(),
        endpoints: m
            .endpoints
            .into_iter()
            .filter(|e| e.workload == name)
            .collect(),
        status,
        name,
    }))
}

#[derive(Debug, Deserialize)]
struct EventParams {
    after: Option<i64>,
    since: Option<String>,
    #[serde(default)]
    follow: bool,
}

async fn env_events(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Query(q): Query<EventParams>,
) -> Result<Response, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let filter = filter(Some(cx.org.id.clone()), Some(cx.env.id.clone()), &q)?;
    events(st, filter, q.follow).await
}

async fn org_events(
    State(st): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Query(q): Query<EventParams>,
) -> Result<Response, ApiError> {
    let org = caller.org(&st.store, &org).await?;
    let filter = filter(Some(org.id), None, &q)?;
    events(st, filter, q.follow).await
}

async fn cluster_events(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<EventParams>,
) -> Result<Response, ApiError> {
    let filter = filter(caller.token.org_id.clone(), None, &q)?;
    events(st, filter, q.follow).await
}

/// A time parameter of a query (`since=…`) as time since the epoch;
/// `None` when absent, 400 naming it when it is not RFC 3339.
pub(super) fn query_time(what: &str, text: Option<&String>) -> Result<Option<Duration>, ApiError> {
    let Some(t) = text else { return Ok(None) };
    let at = humantime::parse_rfc3339_weak(t).map_err(|e| {
        ApiError::bad_request(format!("{what}={t:?} is not an RFC 3339 time: {e}"))
            .next(format!("pass {what} like 2026-01-31T12:00:00Z"))
    })?;
    Ok(Some(
        at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
    ))
}

fn filter(
    org_id: Option<String>,
    env_id: Option<String>,
    q: &EventParams,
) -> Result<EventFilter, ApiError> {
    let since_ms = query_time("since", q.since.as_ref())?.map_or(0, |d| d.as_millis() as i64);
    Ok(EventFilter {
        org_id,
        env_id,
        after: q.after.unwrap_or(0),
        since_ms,
        limit: 1000,
    })
}

fn event(row: EventRow) -> Event {
    Event {
        cursor: row.cursor,
        time: rfc3339(row.created_at),
        kind: row.kind,
        message: row.message,
        org: row.org,
        app: row.app,
        env: row.env,
        release: row.release_id,
        instance: row.instance_id,
        node: row.node_id,
        actor: row.actor,
    }
}

async fn events(st: AppState, mut filter: EventFilter, follow: bool) -> Result<Response, ApiError> {
    if !follow {
        filter.limit = 10_000;
        let rows = st.store.events(&filter).await?;
        return Ok(axum::Json(rows.into_iter().map(event).collect::<Vec<_>>()).into_response());
    }
    // Fail before the 200 if the store is down; later errors end the stream.
    let first = st.store.events(&filter).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(follow_events(st, filter, first, tx));
    let body = Body::from_stream(tokio_stream_from(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// Sends `first`, then every later event, as NDJSON lines into `tx` until
/// the client goes away, the server shuts down or the store fails.
async fn follow_events(
    st: AppState,
    mut filter: EventFilter,
    mut batch: Vec<EventRow>,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
) {
    let mut committed = st.store.subscribe_events();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        if !batch.is_empty() {
            let mut lines = Vec::new();
            for row in batch.drain(..) {
                filter.after = row.cursor;
                serde_json::to_writer(&mut lines, &event(row)).expect("events serialise");
                lines.push(b'\n');
            }
            // Bounded channel: a slow reader slows this loop down.
            if tx.send(Ok(lines)).await.is_err() {
                return;
            }
            quiet_since = tokio::time::Instant::now();
        }
        let keepalive_at = quiet_since + KEEPALIVE;
        tokio::select! {
            () = st.shutdown.cancelled() => return,
            () = tx.closed() => return,
            _ = committed.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        if tokio::time::Instant::now() >= keepalive_at {
            if tx.send(Ok(b"\n".to_vec())).await.is_err() {
                return;
            }
            quiet_since = tokio::time::Instant::now();
        }
        match st.store.events(&filter).await {
            Ok(rows) => batch = rows,
            Err(e) => {
                tracing::warn!(error = %e, "event stream ends: store failed");
                return;
            }
        }
    }
}

/// A `Stream` over an mpsc receiver.
pub(super) fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
