//! Rollouts of an env: `GET .../envs/{env}/rollouts` (newest first) and
//! `POST .../envs/{env}/rollout/cancel`; and [`begin`], which every change
//! of an env's desired state (deploy, rollback, scale) calls in its
//! mutation to start a rollout, superseding the one in progress.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use verge_api::status::{CancelRollout, Rollout};

use super::scope::{EnvCx, manifest_of};
use super::{AppState, Json, Path};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::reconcile::{ClusterView, rollout};
use crate::store::{Mutation, NewRollout, ReleaseRow, RolloutRow, Store};
use crate::time::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orgs/{org}/apps/{app}/envs/{env}/rollouts", get(list))
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/rollout/cancel",
            post(cancel),
        )
}

type EnvPath = (String, String, String);

/// Starts a rollout of `release` (from `from`) in the caller's mutation,
/// with events; the env's rollout in progress, if any, ends `canceled`.
pub async fn begin(
    tx: &mut Mutation<'_>,
    cx: &EnvCx,
    release: &ReleaseRow,
    from: Option<&ReleaseRow>,
    kind: &str,
) -> Result<(), ApiError> {
    let manifest = manifest_of(release)?;
    let what = format!("v{} ({kind})", release.number);
    // A scale during a rollout of the same release keeps that rollout's
    // way back: the release the env came from, not the one it goes to.
    let kept = match tx.latest_rollout(&cx.env.id).await? {
        Some(r) if r.is_active() && r.release_id == release.id => match &r.from_release_id {
            Some(id) => tx.release_by_id(&cx.env.id, id).await?,
            None => None,
        },
        _ => None,
    };
    let from = kept.as_ref().or(from);
    let (_, superseded) = tx
        .start_rollout(
            &NewRollout {
                env_id: &cx.env.id,
                release_id: &release.id,
                from_release_id: from.map(|f| f.id.as_str()),
                kind,
                deadline_ms: rollout::deadline_ms(&manifest),
                created_by: Some(&cx.actor),
            },
            &what,
        )
        .await?;
    if let Some(old) = superseded {
        tx.emit(cx.event(
            "rollout.canceled",
            Some(&old.release_id),
            format!(
                "rollout {} ({}) canceled: superseded by {what} before it finished ({} of {} ready)",
                old.id, old.kind, old.done, old.total
            ),
        ))
        .await?;
    }
    let from = from.map_or("nothing".into(), |f| format!("v{}", f.number));
    tx.emit(cx.event(
        "rollout.pending",
        Some(&release.id),
        format!("rollout of {what} from {from} started"),
    ))
    .await?;
    Ok(())
}

/// The API view of `row`. `live` is its progress now, when it is active
/// (see [`live_progress`]): then it also shows the state the reconciler
/// stores on its next look (within a second), so status never shows an
/// ended rollout as still moving. `numbers`: the env's release numbers.
pub fn view(
    row: &RolloutRow,
    numbers: &BTreeMap<String, i64>,
    live: Option<&rollout::Progress>,
) -> Rollout {
    let now = live.and_then(|p| rollout::advance(row, p, now_ms()));
    let number = |id: &String| numbers.get(id).copied();
    rollout::view(
        now.as_ref().unwrap_or(row),
        number(&row.release_id),
        row.from_release_id.as_ref().and_then(number),
        live,
    )
}

/// The progress of `row` now, read from the store, when it is active.
pub async fn live_progress(
    store: &Store,
    env_id: &str,
    row: &RolloutRow,
    reschedule_after_ms: i64,
) -> Result<Option<rollout::Progress>, ApiError> {
    if !row.is_active() {
        return Ok(None);
    }
    let Some(release) = store.release_by_id(env_id, &row.release_id).await? else {
        return Ok(None);
    };
    let manifest = crate::desired::apply_scale(
        &manifest_of(&release)?,
        &store.scale_overrides(env_id).await?,
    );
    let instances = store.env_instances(env_id).await?;
    let view = ClusterView::read(store).await?;
    let clock = crate::reconcile::plan::Clock {
        now_ms: now_ms(),
        reschedule_after_ms,
    };
    Ok(Some(rollout::progress_of(
        row,
        &manifest,
        &instances,
        &view.facts,
        clock,
    )))
}

async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<Vec<Rollout>>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let reschedule = st.cluster.settings().reschedule_after_ms;
    let numbers = st.store.release_numbers(&cx.env.id).await?;
    let mut out = Vec::new();
    for row in st.store.rollouts(&cx.env.id, 100).await? {
        let live = live_progress(&st.store, &cx.env.id, &row, reschedule).await?;
        out.push(view(&row, &numbers, live.as_ref()));
    }
    Ok(axum::Json(out))
}

/// Ends the env's active rollout `canceled` and points the env back at the
/// release it was rolling from (a rollout of kind `cancel`).
async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(body): Json<CancelRollout>,
) -> Result<axum::Json<Rollout>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let reschedule = st.cluster.settings().reschedule_after_ms;
    // A rollout that has just reached its end (the reconciler stores it on
    // its next look) is not canceled: status already shows it ended.
    let ended = match st.store.latest_rollout(&cx.env.id).await? {
        Some(r) => live_progress(&st.store, &cx.env.id, &r, reschedule)
            .await?
            .and_then(|p| rollout::advance(&r, &p, now_ms()))
            .filter(|next| !next.is_active())
            .map(|_| r.id),
        None => None,
    };
    let mut tx = st.store.mutation().await?;
    let latest = tx.latest_rollout(&cx.env.id).await?;
    let Some(mut row) = latest.filter(|r| r.is_active() && ended.as_ref() != Some(&r.id)) else {
        return Err(ApiError::conflict(format!(
            "{} has no rollout in progress to cancel",
            cx.label()
        ))
        .next(format!("verge rollout list {}", cx.flags()))
        .next(format!("verge status {}", cx.flags())));
    };
    let why = body.reason.as_deref().unwrap_or("no reason given");
    let release = tx.release_by_id(&cx.env.id, &row.release_id).await?;
    // A way back (an automatic rollback or a cancel) is not itself undone.
    let from = match &row.from_release_id {
        Some(id) if rollout::goes_back(&row) => tx.release_by_id(&cx.env.id, id).await?,
        _ => None,
    };
    row.state = "canceled".into();
    row.ended_at = Some(now_ms());
    row.reason = Some(match &from {
        Some(f) => format!(
            "canceled by {}: {why}; the env goes back to v{}",
            cx.actor, f.number
        ),
        None => format!(
            "canceled by {}: {why}; nothing to go back to: the instances started so far keep running",
            cx.actor
        ),
    });
    tx.update_rollout(&row).await?;
    tx.emit(cx.event(
        "rollout.canceled",
        Some(&row.release_id),
        format!(
            "rollout {} of v{} {}",
            row.id,
            release.as_ref().map_or(0, |r| r.number),
            row.reason.as_deref().unwrap_or_default()
        ),
    ))
    .await?;
    if let (Some(from), Some(release)) = (&from, &release) {
        let scale = tx.scale_overrides(&cx.env.id).await?;
        tx.make_current(
            &cx.env.id,
            &from.id,
            Some(&manifest_of(release)?),
            &manifest_of(from)?,
            &scale,
            &st.cluster.addressing(),
        )
        .await?;
        begin(&mut tx, &cx, from, Some(release), "cancel").await?;
    }
    tx.commit().await?;
    st.cluster.poke();
    let numbers = st.store.release_numbers(&cx.env.id).await?;
    Ok(axum::Json(view(&row, &numbers, None)))
}
