//! Deploys, rollbacks, scale and the release list: every change of what an
//! env runs, each answered with a receipt.
//!
//! `POST .../envs/{env}/deploys`, `POST .../rollback`, `POST .../scale`,
//! `GET .../releases`, `GET .../releases/{release}` (`v3`, `3` or an ID).
//!
//! A deploy checks the manifest, then the gates, then pins every image to a
//! digest, and only then, in one [`Mutation`](crate::store::Mutation),
//! creates the release and moves the env's current-release pointer by
//! compare-and-set against the release the client saw (`base`).

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use futures_util::future::join_all;
use verge_api::ErrorKind;
use verge_api::manifest::{self, Manifest, Mode, Runtime};
use verge_api::release::{self, Action, DesiredState, Diff, Receipt, Release};
use verge_api::requests::{Deploy, Rollback, Scale};

use super::config::live_versions;
use super::scope::{EnvCx, manifest_of, secrets_of};
use super::{AppState, Json, Path};
use crate::auth::Caller;
use crate::desired::{apply_scale, bundles_used, carry_scale, fingerprint, gate, volume_problems};
use crate::error::ApiError;
use crate::store::{ReleaseRow, ScaleRow, new_id};
use crate::time::now_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/orgs/{org}/apps/{app}/envs/{env}/deploys", post(deploy))
        .route("/orgs/{org}/apps/{app}/envs/{env}/rollback", post(rollback))
        .route("/orgs/{org}/apps/{app}/envs/{env}/scale", post(scale))
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/releases",
            get(list_releases),
        )
        .route(
            "/orgs/{org}/apps/{app}/envs/{env}/releases/{release}",
            get(get_release),
        )
}

type EnvPath = (String, String, String);

/// What an env runs: a release's manifest with scale applied, and its versions.
struct Effective {
    manifest: Manifest,
    config_version: i64,
    secrets: BTreeMap<String, i64>,
}

impl Effective {
    fn of(row: &ReleaseRow, scale: &BTreeMap<String, ScaleRow>) -> Result<Effective, ApiError> {
        Ok(Effective {
            manifest: apply_scale(&manifest_of(row)?, scale),
            config_version: row.config_version,
            secrets: secrets_of(row)?,
        })
    }

    fn side(&self) -> DesiredState<'_> {
        DesiredState {
            manifest: &self.manifest,
            config_version: self.config_version,
            secrets: &self.secrets,
        }
    }
}

fn diff(old: Option<&Effective>, new: &Effective) -> Diff {
    release::diff(old.map(Effective::side), new.side())
}

/// `unchanged`: no release was created and nothing about the env changed.
fn receipt(
    cx: &EnvCx,
    action: Action,
    unchanged: bool,
    current: &ReleaseRow,
    previous: Option<&ReleaseRow>,
    diff: Diff,
    now: &Effective,
) -> Receipt {
    let flags = cx.flags();
    let mut follow_ups = vec![
        format!("verge wait {flags}"),
        format!("verge events --follow {flags}"),
        format!("verge status {flags}"),
    ];
    if let Some(p) = previous.filter(|p| p.id != current.id) {
        follow_ups.push(format!("verge rollback v{} {flags}  (to undo)", p.number));
    }
    Receipt {
        action,
        target: cx.target(),
        release: cx.release_ref(current),
        previous: previous.map(|p| cx.release_ref(p)),
        unchanged,
        diff,
        desired: now
            .manifest
            .workloads
            .iter()
            .map(|(n, w)| (n.clone(), w.count))
            .collect(),
        follow_ups,
        dry_run: false,
        plan: None,
    }
}

async fn deploy(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(body): Json<Deploy>,
) -> Result<axum::Json<Receipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let mut m = manifest::parse(&body.file, &body.manifest)
        .map_err(|errors| ApiError(errors.detail(&body.file)))?;
    if m.app != cx.app.name {
        return Err(ApiError::bad_request(format!(
            "{} is for app {:?}, not {:?}",
            body.file, m.app, cx.app.name
        ))
        .next(format!("deploy with --app {}", m.app)));
    }
    let declared = m.workloads.keys().cloned().collect::<Vec<_>>().join(", ");
    for (workload, image) in &body.images {
        let w = m.workloads.get_mut(workload).ok_or_else(|| {
            ApiError::bad_request(format!(
                "--image names workload {workload:?}, which {} does not declare",
                body.file
            ))
            .next(format!("use one of: {declared}"))
        })?;
        w.image = image.clone();
    }
    // The gate, before anything slow: nothing is created when it refuses.
    let vars = st.store.config(&cx.env.id).await?.vars;
    let live = live_versions(&st.store.secret_versions(&cx.env.id, None).await?);
    refuse_missing(&cx, &m, &vars, &live)?;
    let running = st.store.current_release(&cx.env.id).await?;
    let carried = match &running {
        Some(c) => carry_scale(
            &manifest_of(c)?,
            &m,
            &st.store.scale_overrides(&cx.env.id).await?,
        ),
        None => BTreeMap::new(),
    };
    refuse_volumes(
        &st,
        &cx,
        &format!("deploy to {}", cx.label()),
        &apply_scale(&m, &carried),
    )
    .await?;
    // The release this deploy goes on top of: the client's, else the current one now.
    let base = match body.base.as_deref() {
        Some("") => None,
        Some(id) => Some(id.to_string()),
        None => st.store.current_release(&cx.env.id).await?.map(|r| r.id),
    };
    // Pin every image, concurrently; report every failure.
    let pins = join_all(m.workloads.values().map(|w| st.pinner.pin(&w.image))).await;
    let mut failures = Vec::new();
    let mut images = BTreeMap::new();
    for ((name, w), pin) in m.workloads.iter_mut().zip(pins) {
        match pin {
            Ok(pinned) => {
                w.image = pinned.clone();
                images.insert(name.clone(), pinned);
            }
            Err(e) => failures.push((name.clone(), e)),
        }
    }
    if let Some((_, first)) = failures.first() {
        let mut e = ApiError::new(
            ErrorKind::Image,
            format!(
                "cannot pin the images of {}: no release was created",
                body.file
            ),
        );
        e.0.next = first.next();
        e.0.details = failures
            .iter()
            .map(|(w, err)| format!("workload {w}: {err}"))
            .collect();
        return Err(e);
    }
    refuse_runtime_mismatches(&st, &body.file, &m, &images).await?;

    let mut tx = st.store.mutation().await?;
    let config = tx.config(&cx.env.id).await?;
    let live = live_versions(&tx.secret_versions(&cx.env.id, None).await?);
    refuse_missing(&cx, &m, &config.vars, &live)?;
    let secrets: BTreeMap<String, i64> = bundles_used(&m)
        .into_iter()
        .filter_map(|b| live.get(&b).map(|v| (b, *v)))
        .collect();
    let fp = fingerprint(&m, config.version, &secrets);
    let current = tx.current_release(&cx.env.id).await?;
    let scale = tx.scale_overrides(&cx.env.id).await?;
    let old = current
        .as_ref()
        .map(|c| Effective::of(c, &scale))
        .transpose()?;
    if let Some(cur) = current.as_ref().filter(|c| c.fingerprint == fp) {
        let now = old.expect("current exists");
        tracing::info!(env = %cx.env.id, release = %cur.id, "deploy unchanged");
        let mut r = receipt(
            &cx,
            Action::Deploy,
            true,
            cur,
            Some(cur),
            Diff::default(),
            &now,
        );
        r.dry_run = body.dry_run;
        return Ok(axum::Json(r));
    }
    let row = ReleaseRow {
        id: new_id("rel"),
        env_id: cx.env.id.clone(),
        number: tx.next_release_number(&cx.env.id).await?,
        manifest: serde_json::to_string(&m).expect("a manifest serialises"),
        images: serde_json::to_string(&images).expect("a string map serialises"),
        config_version: config.version,
        secrets: serde_json::to_string(&secrets).expect("a map serialises"),
        fingerprint: fp,
        parent_id: current.as_ref().map(|c| c.id.clone()),
        created_at: now_ms(),
        created_by: cx.actor.clone(),
    };
    if body.dry_run {
        // Nothing is written: the mutation is dropped (rolled back) unused.
        drop(tx);
        let carried = match &current {
            Some(c) => carry_scale(&manifest_of(c)?, &m, &scale),
            None => BTreeMap::new(),
        };
        let now = Effective::of(&row, &carried)?;
        let d = diff(old.as_ref(), &now);
        let plan =
            crate::reconcile::dry_run(&st.store, &cx.env.id, &now.manifest, st.cluster.settings())
                .await?;
        let mut r = receipt(&cx, Action::Deploy, false, &row, current.as_ref(), d, &now);
        r.release.id = "dry-run".into();
        r.dry_run = true;
        r.plan = Some(plan);
        r.follow_ups = vec![format!("verge deploy {}  (to do it)", cx.flags())];
        return Ok(axum::Json(r));
    }
    tracing::Span::current().record("release", row.id.as_str());
    tx.insert_release(&row).await?;
    tx.emit(cx.event(
        "release.created",
        Some(&row.id),
        format!("release v{} created: {}", row.number, summary(&images)),
    ))
    .await?;
    let current_id = current.as_ref().map(|c| c.id.clone());
    if current_id != base {
        // Compare-and-set lost: keep the release, do not make it current.
        let winner = current.expect("a release became current after the base");
        tx.emit(cx.event(
            "deploy.conflict",
            Some(&row.id),
            format!(
                "release v{} not made current: v{} ({}) became current first",
                row.number, winner.number, winner.id
            ),
        ))
        .await?;
        tx.commit().await?;
        return Err(ApiError::conflict(format!(
            "{} moved to v{} ({}) while this deploy was in progress; release v{} ({}) was created but is not current",
            cx.label(),
            winner.number,
            winner.id,
            row.number,
            row.id
        ))
        .next(format!("verge releases {}", cx.flags()))
        .next(format!("verge rollback v{} {}  (to make yours current)", row.number, cx.flags()))
        .next("or deploy again, on top of the new current release"));
    }
    let from = current.as_ref().map(manifest_of).transpose()?;
    let scale = tx
        .make_current(
            &cx.env.id,
            &row.id,
            from.as_ref(),
            &m,
            &scale,
            &st.cluster.addressing(),
        )
        .await?;
    super::rollouts::begin(&mut tx, &cx, &row, current.as_ref(), "deploy").await?;
    let was = current
        .as_ref()
        .map_or("none".into(), |c| format!("v{}", c.number));
    tx.emit(cx.event(
        "deploy",
        Some(&row.id),
        format!("v{} is now current (was {was})", row.number),
    ))
    .await?;
    tx.commit().await?;
    st.cluster.poke();
    tracing::info!(env = %cx.env.id, release = %row.id, number = row.number, "deployed");
    let now = Effective::of(&row, &scale)?;
    let d = diff(old.as_ref(), &now);
    let mut r = receipt(&cx, Action::Deploy, false, &row, current.as_ref(), d, &now);
    r.follow_ups.extend(try_endpoints(&st, &cx, &m).await?);
    Ok(axum::Json(r))
}

/// Refuses a release whose pinned images do not suit their workloads'
/// runtimes (a container image with `runtime = "wasm"`, a wasm artifact
/// with `runtime = "process"`), before it is created: a node could not run
/// it. Every mismatch is listed, each with its fix.
async fn refuse_runtime_mismatches(
    st: &AppState,
    file: &str,
    m: &Manifest,
    images: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let kinds = join_all(images.values().map(|r| st.pinner.artifact_kind(r))).await;
    let mut problems = Vec::new();
    let mut next = Vec::new();
    for ((name, pinned), kind) in images.iter().zip(kinds) {
        let Some(w) = m.workloads.get(name) else {
            continue;
        };
        let runtime = match w.runtime {
            Runtime::Process => "process",
            Runtime::Wasm => "wasm",
        };
        match kind {
            Ok(kind) => {
                if let Some(why) = kind.runtime_mismatch(runtime, pinned) {
                    problems.push(format!("workload {name}: {why}"));
                    next.push(format!(
                        "fix runtime or image of [workloads.{name}] in {file}, or deploy with \
                         --image {name}=IMAGE"
                    ));
                }
            }
            Err(e) => {
                problems.push(format!(
                    "workload {name}: cannot tell whether {pinned} is a container image or a \
                     wasm artifact: {e}"
                ));
                next.extend(e.next());
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut e = ApiError::new(
        ErrorKind::Image,
        format!(
            "{}: no release was created",
            if problems.len() == 1 {
                problems[0].clone()
            } else {
                format!(
                    "{} workloads cannot run the images they name",
                    problems.len()
                )
            }
        ),
    );
    next.dedup();
    e.0.next = next;
    e.0.details = problems;
    Err(e)
}

/// `endpoint public: nc fd65:6e64:7074::1 80`: what to try once the
/// release runs, one line per endpoint address.
async fn try_endpoints(st: &AppState, cx: &EnvCx, m: &Manifest) -> Result<Vec<String>, ApiError> {
    let rows = st.store.endpoint_addresses(&cx.env.id).await?;
    let mut out = Vec::new();
    for e in &m.endpoints {
        let Some(row) = rows.iter().find(|r| r.name == e.name) else {
            continue;
        };
        let port = e.ports[0];
        out.push(format!(
            "endpoint {}: nc {} {port}  (IPv6)",
            e.name, row.ipv6
        ));
        if let Some(v4) = &row.ipv4 {
            out.push(format!("endpoint {}: nc {v4} {port}  (IPv4)", e.name));
        }
    }
    Ok(out)
}

/// `web=127.0.0.1:5000/hello:1.0@sha256:0123456789ab…`, for event messages.
fn summary(images: &BTreeMap<String, String>) -> String {
    images
        .iter()
        .map(|(w, i)| format!("{w}={i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The deploy gate: 422 listing every missing env var and bundle (given the
/// env's vars and live bundle versions) with the command that fixes each.
fn refuse_missing(
    cx: &EnvCx,
    m: &Manifest,
    vars: &BTreeMap<String, String>,
    live: &BTreeMap<String, i64>,
) -> Result<(), ApiError> {
    let missing = gate(m, vars, live);
    if missing.is_empty() {
        return Ok(());
    }
    let items = missing.items();
    let mut e = ApiError::new(
        ErrorKind::MissingConfig,
        format!(
            "deploy to {} refused: {} required item{} missing; no release was created",
            cx.label(),
            items.len(),
            if items.len() == 1 { " is" } else { "s are" }
        ),
    );
    e.0.details = items;
    e.0.next = missing.commands(&cx.app.name, &cx.env.name);
    Err(e)
}

/// Refuses `what` when manifest `m` (scale applied) cannot mount its
/// volumes (see [`volume_problems`]); nothing is changed then.
async fn refuse_volumes(
    st: &AppState,
    cx: &EnvCx,
    what: &str,
    m: &Manifest,
) -> Result<(), ApiError> {
    if m.workloads.values().all(|w| w.volumes.is_empty()) {
        return Ok(());
    }
    let nodes = st.store.nodes().await?;
    let volumes: BTreeMap<String, String> = st
        .store
        .volumes(&cx.env.id)
        .await?
        .into_iter()
        .map(|v| {
            let node = nodes
                .iter()
                .find(|n| n.id == v.node_id)
                .map_or_else(|| v.node_id.clone(), |n| n.name.clone());
            (v.name, node)
        })
        .collect();
    let problems = volume_problems(m, &volumes);
    let Some(first) = problems.first() else {
        return Ok(());
    };
    let mut e = ApiError::bad_request(format!("{what} refused: {first}; nothing was changed"))
        .next(format!("verge volumes list {}", cx.flags()));
    e.0.details = problems.clone();
    Err(e)
}

/// The release `name` (`v3`, `3` or an ID) of the env, or a 404.
async fn find_release(st: &AppState, cx: &EnvCx, name: &str) -> Result<ReleaseRow, ApiError> {
    let number = name.strip_prefix('v').unwrap_or(name).parse::<i64>().ok();
    let row = match number {
        Some(n) => st.store.release_by_number(&cx.env.id, n).await?,
        None => st.store.release_by_id(&cx.env.id, name).await?,
    };
    row.ok_or_else(|| {
        ApiError::not_found("release", name).next(format!("verge releases {}", cx.flags()))
    })
}

async fn rollback(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(body): Json<Rollback>,
) -> Result<axum::Json<Receipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let target = find_release(&st, &cx, &body.release).await?;
    if let Some(running) = st.store.current_release(&cx.env.id).await? {
        let wanted = manifest_of(&target)?;
        let carried = carry_scale(
            &manifest_of(&running)?,
            &wanted,
            &st.store.scale_overrides(&cx.env.id).await?,
        );
        refuse_volumes(
            &st,
            &cx,
            &format!("rollback of {} to v{}", cx.label(), target.number),
            &apply_scale(&wanted, &carried),
        )
        .await?;
    }
    let mut tx = st.store.mutation().await?;
    // Every secret version the release uses must still exist.
    let versions = tx.secret_versions(&cx.env.id, None).await?;
    let gone: Vec<String> = secrets_of(&target)?
        .into_iter()
        .filter(|(b, v)| {
            !versions
                .iter()
                .any(|r| &r.bundle == b && r.version == *v && r.deleted_at.is_none())
        })
        .map(|(b, v)| format!("secret bundle {b:?} v{v}"))
        .collect();
    if !gone.is_empty() {
        let mut e = ApiError::conflict(format!(
            "cannot roll back {} to v{}: it uses {}, which {} deleted; its instances could not get their secrets",
            cx.label(),
            target.number,
            gone.join(" and "),
            if gone.len() == 1 { "was" } else { "were" }
        ))
        .next(format!("verge secrets list {}", cx.flags()))
        .next(format!("deploy the manifest of v{} again to use the bundles' current versions: verge deploy {}", target.number, cx.flags()));
        e.0.details = gone;
        return Err(e);
    }
    let current = tx.current_release(&cx.env.id).await?;
    let scale = tx.scale_overrides(&cx.env.id).await?;
    let old = current
        .as_ref()
        .map(|c| Effective::of(c, &scale))
        .transpose()?;
    if current.as_ref().is_some_and(|c| c.id == target.id) {
        let now = old.expect("current exists");
        return Ok(axum::Json(receipt(
            &cx,
            Action::Rollback,
            true,
            &target,
            Some(&target),
            Diff::default(),
            &now,
        )));
    }
    let from = current.as_ref().map(manifest_of).transpose()?;
    let scale = tx
        .make_current(
            &cx.env.id,
            &target.id,
            from.as_ref(),
            &manifest_of(&target)?,
            &scale,
            &st.cluster.addressing(),
        )
        .await?;
    super::rollouts::begin(&mut tx, &cx, &target, current.as_ref(), "rollback").await?;
    let was = current
        .as_ref()
        .map_or("none".into(), |c| format!("v{}", c.number));
    let why = body.reason.as_deref().unwrap_or("no reason given");
    tx.emit(cx.event(
        "rollback",
        Some(&target.id),
        format!(
            "rolled back to v{} (was {was}) by {}: {why}",
            target.number, cx.actor
        ),
    ))
    .await?;
    tx.commit().await?;
    st.cluster.poke();
    tracing::info!(env = %cx.env.id, release = %target.id, "rolled back");
    let now = Effective::of(&target, &scale)?;
    let d = diff(old.as_ref(), &now);
    Ok(axum::Json(receipt(
        &cx,
        Action::Rollback,
        false,
        &target,
        current.as_ref(),
        d,
        &now,
    )))
}

async fn scale(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
    Json(body): Json<Scale>,
) -> Result<axum::Json<Receipt>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    if body.workloads.is_empty() || body.workloads.values().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request(
            "nothing to scale: give each workload a count, cpu or memory",
        )
        .next(format!("verge scale web=3 {}", cx.flags())));
    }
    for (name, s) in &body.workloads {
        if let Some(c) = s.count.filter(|c| *c > 1000) {
            return Err(ApiError::bad_request(format!(
                "{name}: count {c} is above 1000 instances"
            )));
        }
        if let Some(cpu) = s
            .cpu
            .filter(|c| !(c.is_finite() && *c >= 0.001 && *c <= 1024.0))
        {
            return Err(ApiError::bad_request(format!(
                "{name}: cpu {cpu} is not a number of cores between 0.001 and 1024"
            )));
        }
        if let Some(m) = s.memory.filter(|m| *m < 1024 * 1024) {
            return Err(ApiError::bad_request(format!(
                "{name}: memory {m} bytes is below 1Mi"
            )));
        }
    }
    let mut tx = st.store.mutation().await?;
    let current = tx.current_release(&cx.env.id).await?.ok_or_else(|| {
        ApiError::conflict(format!("{} has no release to scale yet", cx.label()))
            .next(format!("verge deploy {}", cx.flags()))
    })?;
    let snapshot = manifest_of(&current)?;
    if let Some(unknown) = body
        .workloads
        .keys()
        .find(|w| !snapshot.workloads.contains_key(*w))
    {
        return Err(ApiError::bad_request(format!(
            "release v{} of {} has no workload {unknown:?}",
            current.number,
            cx.label()
        ))
        .next(format!(
            "workloads: {}",
            snapshot
                .workloads
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (name, s) in &body.workloads {
        let w = &snapshot.workloads[name];
        if let (Some(c @ 1..), Mode::PerConnection) = (s.count, w.mode) {
            return Err(ApiError::bad_request(format!(
                "{name}: count {c} refused: {name} is a per-connection workload, which keeps no \
                 instances: every matching node starts a fresh one for each connection; \
                 nothing was changed"
            ))
            .next(format!(
                "to change what each connection's instance gets: verge scale {name} --cpu CORES \
                 --memory SIZE {}",
                cx.flags()
            ))
            .next(format!(
                "to bound connections per node: set concurrency in [workloads.{name}] and deploy"
            )));
        }
        if let (Some(c @ 2..), Some(v)) = (s.count, w.volumes.first()) {
            return Err(ApiError::bad_request(format!(
                "{name}: count {c} refused: {name} mounts volume {}, which one instance at a \
                 time can use; nothing was changed",
                v.name
            ))
            .next(format!("verge scale {name}=1 {}", cx.flags())));
        }
    }
    let old_scale = tx.scale_overrides(&cx.env.id).await?;
    let mut new_scale = old_scale.clone();
    for (name, s) in &body.workloads {
        let entry = new_scale.entry(name.clone()).or_default();
        if let Some(c) = s.count {
            entry.count = Some(i64::from(c));
        }
        if let Some(c) = s.cpu {
            entry.cpu_millis = Some((c * 1000.0).round() as i64);
        }
        if let Some(m) = s.memory {
            entry.memory = Some(m as i64);
        }
    }
    let old = Effective::of(&current, &old_scale)?;
    let now = Effective::of(&current, &new_scale)?;
    let d = diff(Some(&old), &now);
    if !d.is_empty() {
        tx.replace_scale_overrides(&cx.env.id, &new_scale).await?;
        super::rollouts::begin(&mut tx, &cx, &current, Some(&current), "scale").await?;
        let changes: Vec<String> = d
            .workloads
            .iter()
            .map(|c| {
                let fields: Vec<String> = c.fields.iter().map(ToString::to_string).collect();
                format!("{}: {}", c.name, fields.join(", "))
            })
            .collect();
        tx.emit(cx.event(
            "scale",
            Some(&current.id),
            format!("scaled {}", changes.join("; ")),
        ))
        .await?;
        tx.commit().await?;
        st.cluster.poke();
        tracing::info!(env = %cx.env.id, release = %current.id, "scaled");
    }
    Ok(axum::Json(receipt(
        &cx,
        Action::Scale,
        d.is_empty(),
        &current,
        Some(&current),
        d,
        &now,
    )))
}

async fn list_releases(
    State(st): State<AppState>,
    caller: Caller,
    Path(path): Path<EnvPath>,
) -> Result<axum::Json<Vec<Release>>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &path).await?;
    let rows = st.store.list_releases(&cx.env.id).await?;
    let current = st.store.current_release(&cx.env.id).await?.map(|r| r.id);
    let by_id: BTreeMap<&str, &ReleaseRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let list = rows
        .iter()
        .map(|r| {
            let parent = r
                .parent_id
                .as_deref()
                .and_then(|p| by_id.get(p))
                .map(|p| cx.release_ref(p));
            cx.release(r, current.as_deref(), parent, false)
        })
        .collect::<Result<_, _>>()?;
    Ok(axum::Json(list))
}

async fn get_release(
    State(st): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<(String, String, String, String)>,
) -> Result<axum::Json<Release>, ApiError> {
    let cx = EnvCx::resolve(&st, &caller, &(org, app, env)).await?;
    let row = find_release(&st, &cx, &name).await?;
    let current = st.store.current_release(&cx.env.id).await?.map(|r| r.id);
    let parent = match &row.parent_id {
        Some(p) => st
            .store
            .release_by_id(&cx.env.id, p)
            .await?
            .map(|p| cx.release_ref(&p)),
        None => None,
    };
    Ok(axum::Json(cx.release(
        &row,
        current.as_deref(),
        parent,
        true,
    )?))
}
