//! Nodes (cluster admin only): `POST /v1/nodes/join-tokens` mints a join
//! token, `GET /v1/nodes` lists nodes, `GET /v1/nodes/{name}` describes one,
//! `POST /v1/nodes/{name}/drain` and `.../undrain` start and end a drain.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use std::time::Duration;
use verge_api::ErrorKind;
use verge_api::nodes::{
    CreateJoinToken, DrainNode, JoinTokenCreated, Node, NodeDetail, NodeInstance,
};

use super::{AppState, Json, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{InstanceRow, NewEvent, NodeRow};
use crate::time::{now_ms, rfc3339};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/nodes", get(list))
        .route("/nodes/join-tokens", post(create_join_token))
        .route("/nodes/{name}", get(describe))
        .route("/nodes/{name}/drain", post(drain))
        .route("/nodes/{name}/undrain", post(undrain))
}

/// How long a drain waits for replacements by default before it stops
/// what is left.
const DRAIN_DEADLINE_SECS: u64 = 300;

async fn named(st: &AppState, name: &str) -> Result<NodeRow, ApiError> {
    st.store.node_by_name(name).await?.ok_or_else(|| {
        ApiError::new(ErrorKind::NotFound, format!("no node named {name:?}"))
            .next("verge nodes list")
    })
}

/// Keeps new instances off the node and moves its instances to others,
/// each workload within its rollout limits; at the deadline whatever is
/// left is stopped. The reconciler marks it `drained` when it is empty.
async fn drain(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(body): Json<DrainNode>,
) -> Result<axum::Json<Node>, ApiError> {
    caller.require_admin("draining a node")?;
    let secs = body.deadline_secs.unwrap_or(DRAIN_DEADLINE_SECS);
    if secs == 0 || secs > 7 * 24 * 3600 {
        return Err(ApiError::bad_request(format!(
            "a drain deadline must be between 1 second and 7 days, not {secs} seconds"
        ))
        .next(format!("verge nodes drain {name} --deadline 10m")));
    }
    let n = named(&st, &name).await?;
    if n.drain.is_none() {
        let deadline = now_ms() + (secs * 1000) as i64;
        let mut tx = st.store.mutation().await?;
        tx.set_drain(&n.id, Some("draining"), Some(deadline))
            .await?;
        let message = format!(
            "node {} draining by {}: its instances move to other nodes; what is left at {} is stopped",
            n.name,
            caller.actor(),
            rfc3339(deadline)
        );
        tx.emit(NewEvent::about_node(&n.id, "node.draining", message))
            .await?;
        tx.commit().await?;
        tracing::info!(node = %n.id, name = %n.name, secs, "node draining");
        st.cluster.poke();
    }
    let n = named(&st, &name).await?;
    let instances = st.store.node_instances(&n.id).await?;
    Ok(axum::Json(node(n, &instances)))
}

/// Makes the node schedulable again.
async fn undrain(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Node>, ApiError> {
    caller.require_admin("undraining a node")?;
    let n = named(&st, &name).await?;
    if n.drain.is_some() {
        let mut tx = st.store.mutation().await?;
        tx.set_drain(&n.id, None, None).await?;
        let message = format!(
            "node {} schedulable again (undrained by {})",
            n.name,
            caller.actor()
        );
        tx.emit(NewEvent::about_node(&n.id, "node.undrained", message))
            .await?;
        tx.commit().await?;
        tracing::info!(node = %n.id, name = %n.name, "node undrained");
        st.cluster.poke();
    }
    let n = named(&st, &name).await?;
    let instances = st.store.node_instances(&n.id).await?;
    Ok(axum::Json(node(n, &instances)))
}

/// Longest a join token may live: a week.
const MAX_TTL_SECS: u64 = 7 * 24 * 3600;

async fn create_join_token(
    State(st): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateJoinToken>,
) -> Result<(StatusCode, axum::Json<JoinTokenCreated>), ApiError> {
    caller.require_admin("minting a join token")?;
    let ttl = body.ttl_secs.unwrap_or(3600);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "a join token's ttl must be between 1 second and 7 days, not {ttl} seconds"
        )));
    }
    let uses = body.uses.unwrap_or(1);
    if uses == 0 || uses > 10_000 {
        return Err(ApiError::bad_request(format!(
            "a join token's uses must be between 1 and 10000, not {uses}"
        )));
    }
    let minted = st
        .cluster
        .mint_join_token(Duration::from_secs(ttl), uses as i64, &caller.actor())
        .await?;
    let (token, expires_at) = (minted.token, minted.expires_at);
    let id = token.id.clone();
    let server = st.cluster.advertise();
    tracing::info!(token = %id, ttl, "join token minted");
    Ok((
        StatusCode::CREATED,
        axum::Json(JoinTokenCreated {
            command: format!(
                "verge node --server {server} --join-token {token} --data-dir /var/lib/verge-node --label region=..."
            ),
            id,
            token: token.to_string(),
            expires_at: rfc3339(expires_at),
            uses,
            server,
            ca_sha256: token.ca_sha256,
        }),
    ))
}

async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Node>>, ApiError> {
    caller.require_admin("listing nodes")?;
    let mut out = Vec::new();
    for n in st.store.nodes().await? {
        let instances = st.store.node_instances(&n.id).await?;
        out.push(node(n, &instances));
    }
    Ok(axum::Json(out))
}

async fn describe(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<NodeDetail>, ApiError> {
    caller.require_admin("describing nodes")?;
    let n = named(&st, &name).await?;
    let instances = st.store.node_instances(&n.id).await?;
    let mut detail = Vec::new();
    for i in &instances {
        let scope = st.store.env_scope(&i.env_id).await?;
        let (org, app, env) = scope.map(|s| (s.org, s.app, s.env)).unwrap_or_default();
        detail.push(NodeInstance {
            id: i.id.clone(),
            org,
            app,
            env,
            workload: i.workload.clone(),
            release: i.release_id.clone(),
            state: i.state.clone(),
            category: i.category.clone(),
            address: i.address.clone(),
            restarts: i.restarts as u32,
        });
    }
    let joined_at = rfc3339(n.joined_at);
    Ok(axum::Json(NodeDetail {
        node: node(n, &instances),
        joined_at,
        instances_detail: detail,
    }))
}

fn node(n: NodeRow, instances: &[InstanceRow]) -> Node {
    let placed: Vec<&InstanceRow> = instances.iter().filter(|i| i.goal == "run").collect();
    Node {
        labels: serde_json::from_str::<BTreeMap<String, String>>(&n.labels).unwrap_or_default(),
        cpu: n.cpu_millis as f64 / 1000.0,
        memory: n.memory.max(0) as u64,
        cpu_reserved: placed.iter().map(|i| i.cpu_millis).sum::<i64>() as f64 / 1000.0,
        memory_reserved: placed.iter().map(|i| i.memory).sum::<i64>().max(0) as u64,
        usage: n
            .usage
            .as_deref()
            .and_then(|u| serde_json::from_str(u).ok()),
        last_seen: n.last_seen.map(rfc3339),
        state_since: rfc3339(n.state_since),
        instances: instances.len() as u32,
        id: n.id,
        name: n.name,
        state: n.state,
        isolation: n.isolation,
        instance_prefix: n.instance_prefix,
        version: n.version,
        drain: n.drain,
        drain_deadline: n.drain_deadline.map(rfc3339),
    }
}
