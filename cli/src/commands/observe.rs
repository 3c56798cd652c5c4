//! `verge status`, `verge events [--follow]`, `verge wait`: observed state
//! of an env, its event stream, and waiting for a rollout to end.

use std::time::Duration;

use tokio::time::Instant;
use verge_api::client::{ClientError, EventQuery, EventScope};
use verge_api::release::ReleaseRef;
use verge_api::status::{Event, Status, WorkloadStatus};
use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result, or_dash, releases};
use crate::args::{EventsArgs, WaitArgs};
use crate::context::{Context, EnvNames};
use crate::output::{Output, table};

pub async fn status(ctx: &Context, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let status = ctx.client.status(names.scope()).await?;
    out.one(&status, status_text);
    Ok(())
}

fn status_text(s: &Status) -> String {
    let at = format!("{}/{}", s.target.app, s.target.env);
    let mut parts = vec![match &s.release {
        None => format!("{at}: no release yet: verge deploy"),
        Some(r) => {
            let mut head = format!("{at}: release {}, rollout {}", r.label(), s.rollout.state);
            if let Some(reason) = &s.rollout.reason {
                head = format!("{head}: {reason}");
            }
            head
        }
    }];
    if !s.workloads.is_empty() {
        let rows = s
            .workloads
            .iter()
            .map(|w| vec![w.name.clone(), w.desired.to_string(), w.running.to_string()]);
        parts.push(String::new());
        parts.push(table(&["workload", "desired", "running"], rows));
    }
    if s.workloads.iter().any(|w| !w.instances.is_empty()) {
        parts.push(String::new());
        parts.push(instance_table(&s.workloads));
    }
    parts.join("\n")
}

/// INSTANCE WORKLOAD NODE STATE ADDRESS REASON, `-` where there is none.
pub fn instance_table(workloads: &[WorkloadStatus]) -> String {
    let rows = workloads.iter().flat_map(|w| {
        w.instances.iter().map(|i| {
            vec![
                i.id.clone().unwrap_or_else(|| "(unplaced)".into()),
                w.name.clone(),
                or_dash(i.node.as_deref()),
                i.state.clone(),
                or_dash(i.address.as_deref()),
                or_dash(i.reason.as_deref()),
            ]
        })
    });
    table(
        &["instance", "workload", "node", "state", "address", "reason"],
        rows,
    )
}

pub async fn events(ctx: &Context, args: EventsArgs, out: &Output) -> Result {
    enum Whose {
        Cluster,
        Org(String),
        Env(EnvNames),
    }
    // --all: one org's events with --org, else all the token may see.
    let whose = match (args.all, ctx.explicit_org()) {
        (true, Some(org)) => Whose::Org(org),
        (true, None) => Whose::Cluster,
        (false, _) => Whose::Env(ctx.env_names().await?),
    };
    let scope = match &whose {
        Whose::Cluster => EventScope::Cluster,
        Whose::Org(org) => EventScope::Org(org),
        Whose::Env(names) => EventScope::Env(names.scope()),
    };
    let query = EventQuery {
        after: args.after,
        since: args.since,
    };
    if args.follow {
        return follow(ctx, scope, query, args.all, out).await;
    }
    let events = ctx.client.events(scope, &query).await?;
    let mut headers = vec!["time", "kind", "message", "release"];
    if args.all {
        headers.insert(2, "env");
    }
    out.list(&events, &headers, |e| {
        let mut row = vec![
            e.time.clone(),
            e.kind.clone(),
            e.message.clone(),
            or_dash(e.release.as_deref()),
        ];
        if args.all {
            row.insert(2, where_(e));
        }
        row
    });
    Ok(())
}

/// `org/app/env` of an event, as far as it has them; `-` for the cluster's own.
fn where_(e: &Event) -> String {
    let parts: Vec<&str> = [&e.org, &e.app, &e.env]
        .into_iter()
        .map_while(|p| p.as_deref())
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("/")
    }
}

/// Prints events as they come, forever. A stream that ends or breaks is
/// resumed after the last cursor printed: nothing twice, nothing missed.
async fn follow(
    ctx: &Context,
    scope: EventScope<'_>,
    mut query: EventQuery,
    all: bool,
    out: &Output,
) -> Result {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);
    let line = |e: &Event| {
        let mut text = format!("{} {}", e.time, e.kind);
        if all {
            text = format!("{text} {}", where_(e));
        }
        text = format!("{text} {}", e.message);
        if let Some(r) = &e.release {
            text = format!("{text} [release {r}]");
        }
        text
    };
    // A first connection that fails is an error: wrong server, token, env.
    let mut stream = ctx.client.follow_events(scope, &query).await?;
    let mut backoff = FIRST;
    loop {
        let connected = Instant::now();
        let mut received = false;
        let mut why = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    query.after = Some(event.cursor);
                    received = true;
                    out.stream_item(&event, line);
                }
                Some(Err(e)) => break e.to_string(),
                None => break "the server ended the event stream".to_string(),
            }
        };
        if received || connected.elapsed() >= MAX {
            backoff = FIRST;
        }
        stream = loop {
            // Under -o json, stderr is kept for the one JSON error line.
            if !out.is_json() {
                eprintln!(
                    "{why}; reconnecting in {}...",
                    humantime::format_duration(backoff)
                );
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX);
            match ctx.client.follow_events(scope, &query).await {
                Ok(stream) => break stream,
                Err(e) if !transient(&e) => return Err(e.into()),
                Err(e) => why = e.to_string(),
            }
        };
    }
}

/// Whether retrying may help: the server is down or overloaded, not
/// refusing this request.
fn transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Decode { .. } => true,
        ClientError::Api(d) => matches!(
            d.kind,
            ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::Timeout
        ),
        ClientError::BadServer { .. } | ClientError::BadCaCert(_) => false,
    }
}

pub async fn wait(ctx: &Context, args: WaitArgs, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let goal = match &args.release {
        Some(name) => {
            releases::check_release_name(name)?;
            let r = ctx.client.get_release(names.scope(), name).await?;
            Some(ReleaseRef {
                id: r.id,
                number: r.number,
                env: r.env,
            })
        }
        None => None,
    };
    let status = wait_for(ctx, &names, goal, args.timeout, out).await?;
    out.one(&status, |s| converged(&names, s));
    Ok(())
}

/// `APP/ENV converged on vN`.
pub fn converged(names: &EnvNames, status: &Status) -> String {
    let number = status.release.as_ref().map_or(0, |r| r.number);
    format!("{} converged on v{number}", names.label())
}

/// Polls the env's status every 500 ms until the rollout of `goal` (the
/// current release when `None`) completed: the last status. A failed
/// rollout, another release becoming current, or the deadline fail.
/// Progress goes to stderr whenever it changes (not under `-o json`).
pub async fn wait_for(
    ctx: &Context,
    names: &EnvNames,
    mut goal: Option<ReleaseRef>,
    timeout: Duration,
    out: &Output,
) -> Result<Status> {
    const POLL: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + timeout;
    let label = names.label();
    let mut last: Option<Status> = None;
    let mut shown = String::new();
    loop {
        match tokio::time::timeout_at(deadline, ctx.client.status(names.scope())).await {
            Ok(Ok(status)) => {
                let Some(current) = status.release.clone() else {
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::NotFound,
                            format!("{label} has no release yet"),
                        )
                        .with_next("verge deploy"),
                    ));
                };
                let target = goal.get_or_insert_with(|| current.clone()).clone();
                if current.id != target.id {
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::Conflict,
                            format!(
                                "release v{} is not current: {label} is on v{}",
                                target.number, current.number
                            ),
                        )
                        .with_next("verge releases")
                        .with_next("verge events"),
                    ));
                }
                if status.rollout.is_completed() {
                    return Ok(status);
                }
                if status.rollout.is_final_failure() {
                    let reason = status
                        .rollout
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default();
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::Conflict,
                            format!(
                                "rollout of v{} to {label} {}{reason}",
                                target.number, status.rollout.state
                            ),
                        )
                        .with_next("verge events")
                        .with_next("verge status"),
                    ));
                }
                let now = progress(&status);
                if now != shown {
                    out.note(&format!(
                        "waiting for {label} to converge on v{}: {now}",
                        target.number
                    ));
                    shown = now;
                }
                last = Some(status);
            }
            // The control plane may be restarting: keep trying until the deadline.
            Ok(Err(e @ ClientError::Connect { .. })) => {
                let now = e.to_string();
                if now != shown {
                    out.note(&format!("{now}; retrying"));
                    shown = now;
                }
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_elapsed) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out(&label, goal.as_ref(), last.as_ref(), timeout));
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
    }
}

/// `rollout in_progress; web 1/2 running (pending: no node with 512Mi free)`.
fn progress(s: &Status) -> String {
    let mut text = format!("rollout {}", s.rollout.state);
    if let Some(reason) = &s.rollout.reason {
        text = format!("{text} ({reason})");
    }
    let workloads = workload_summary(s);
    if !workloads.is_empty() {
        text = format!("{text}; {workloads}");
    }
    text
}

/// `web 0/2 running (pending: REASON), worker 1/1 running`.
fn workload_summary(s: &Status) -> String {
    let parts: Vec<String> = s
        .workloads
        .iter()
        .map(|w| {
            let mut part = format!("{} {}/{} running", w.name, w.running, w.desired);
            if let Some(i) = w
                .instances
                .iter()
                .find(|i| i.state != "running" && i.reason.is_some())
            {
                let reason = i.reason.as_deref().unwrap_or_default();
                part = format!("{part} ({}: {reason})", i.state);
            }
            part
        })
        .collect();
    parts.join(", ")
}

fn timed_out(
    label: &str,
    goal: Option<&ReleaseRef>,
    last: Option<&Status>,
    timeout: Duration,
) -> Failure {
    let on = goal.map_or_else(
        || "its current release".to_string(),
        |g| format!("v{}", g.number),
    );
    let state = match last {
        Some(s) if !s.workloads.is_empty() => workload_summary(s),
        Some(s) => progress(s),
        None => "the control plane did not answer".into(),
    };
    Failure(
        ErrorDetail::new(
            ErrorKind::Timeout,
            format!(
                "timed out after {} waiting for {label} to converge on {on}: {state}",
                humantime::format_duration(timeout)
            ),
        )
        .with_next("verge status")
        .with_next("verge events --follow"),
    )
}
