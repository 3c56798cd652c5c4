//! `verge status`, `verge events [--follow]`: observed state of an env and
//! its event stream (`verge wait` is in [`super::wait`]).

use tokio::time::Instant;
use verge_api::client::{EventQuery, EventScope};
use verge_api::manifest::{Mode, Runtime};
use verge_api::status::{Event, InstanceStatus, Status, WorkloadStatus};

use super::follow::Reconnect;
use super::progress::event_line;
use super::rollouts::rollout_line;
use super::{Result, or_dash};
use crate::args::EventsArgs;
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
    let mut parts = match &s.release {
        None => vec![format!("{at}: no release yet: verge deploy")],
        Some(r) => vec![
            format!("{at}: release {}", r.label()),
            rollout_line(&s.rollout),
        ],
    };
    if !s.workloads.is_empty() {
        // The runtime column only when some workload is not a process.
        let wasm = s.workloads.iter().any(|w| w.runtime == Runtime::Wasm);
        let rows = s.workloads.iter().map(|w| {
            let mut row = vec![w.name.clone(), w.desired.to_string(), w.running.to_string()];
            if wasm {
                row.insert(1, runtime(w));
            }
            row
        });
        let headers: &[&str] = if wasm {
            &["workload", "runtime", "desired", "running"]
        } else {
            &["workload", "desired", "running"]
        };
        parts.push(String::new());
        parts.push(table(headers, rows));
    }
    let per_connection: Vec<&WorkloadStatus> = s
        .workloads
        .iter()
        .filter(|w| w.mode == Mode::PerConnection)
        .collect();
    if !per_connection.is_empty() {
        parts.push(String::new());
        parts.extend(per_connection.iter().map(|w| per_connection_line(w)));
    }
    if s.workloads.iter().any(|w| !w.instances.is_empty()) {
        parts.push(String::new());
        parts.push(instance_table(&s.workloads));
    }
    if s.workloads.iter().any(|w| !w.listeners.is_empty()) {
        parts.push(String::new());
        parts.push(listener_table(&s.workloads));
    }
    parts.join("\n")
}

/// `process`, `wasm`, or `wasm, per-connection`.
fn runtime(w: &WorkloadStatus) -> String {
    let r = match w.runtime {
        Runtime::Process => "process",
        Runtime::Wasm => "wasm",
    };
    match w.mode {
        Mode::PerConnection => format!("{r}, per-connection"),
        Mode::LongRunning => r.to_string(),
    }
}

/// `echo  wasm, per-connection: 0 running; answering on 2 nodes (n1, n2);
/// 3 active, 120 served, 1 failed (last: trap: ...)`.
pub fn per_connection_line(w: &WorkloadStatus) -> String {
    let nodes: Vec<&str> = w.answering().filter_map(|l| l.node.as_deref()).collect();
    let answering = match nodes.len() {
        0 => "answering on no node yet".to_string(),
        1 => format!("answering on 1 node ({})", nodes[0]),
        n => format!("answering on {n} nodes ({})", nodes.join(", ")),
    };
    let sum = |f: fn(&verge_api::status::ListenerStatus) -> u64| -> u64 {
        w.listeners.iter().map(f).sum()
    };
    let failed = sum(|l| l.failed);
    let last = match w.last_failure() {
        Some(l) if failed > 0 => format!(
            " (last: {}{})",
            l.last_failure.as_deref().unwrap_or("no details"),
            l.node
                .as_deref()
                .map(|n| format!(", on {n}"))
                .unwrap_or_default()
        ),
        _ => String::new(),
    };
    format!(
        "{}  {}: {} running; {answering}; {} active, {} served, {failed} failed{last}",
        w.name,
        runtime(w),
        w.running,
        sum(|l| l.active),
        sum(|l| l.served),
    )
}

/// LISTENER WORKLOAD RELEASE NODE STATE ADDRESS ACTIVE SERVED FAILED REASON.
pub fn listener_table(workloads: &[WorkloadStatus]) -> String {
    let rows = workloads.iter().flat_map(|w| {
        w.listeners.iter().map(|l| {
            vec![
                l.id.clone(),
                w.name.clone(),
                l.release.map_or_else(|| "-".into(), |n| format!("v{n}")),
                or_dash(l.node.as_deref()),
                l.state.clone(),
                or_dash(l.address.as_deref()),
                l.active.to_string(),
                l.served.to_string(),
                l.failed.to_string(),
                or_dash(l.reason.as_deref()),
            ]
        })
    });
    table(
        &[
            "listener", "workload", "release", "node", "state", "address", "active", "served",
            "failed", "reason",
        ],
        rows,
    )
}

/// INSTANCE WORKLOAD RELEASE NODE STATE ADDRESS REASON, `-` where there
/// is none; the state with its health check verdict (`running (healthy)`).
pub fn instance_table(workloads: &[WorkloadStatus]) -> String {
    let rows = workloads.iter().flat_map(|w| {
        w.instances.iter().map(|i| {
            vec![
                i.id.clone().unwrap_or_else(|| "(unplaced)".into()),
                w.name.clone(),
                i.release.map_or_else(|| "-".into(), |n| format!("v{n}")),
                or_dash(i.node.as_deref()),
                instance_state(i),
                or_dash(i.address.as_deref()),
                or_dash(i.reason.as_deref()),
            ]
        })
    });
    table(
        &[
            "instance", "workload", "release", "node", "state", "address", "reason",
        ],
        rows,
    )
}

/// `running (healthy)`, or the state alone before any health verdict.
pub fn instance_state(i: &InstanceStatus) -> String {
    match &i.health {
        Some(h) => format!("{} ({h})", i.state),
        None => i.state.clone(),
    }
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
pub fn where_(e: &Event) -> String {
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
    let line = |e: &Event| event_line(e, all);
    // A first connection that fails is an error: wrong server, token, env.
    let mut stream = ctx.client.follow_events(scope, &query).await?;
    let mut reconnect = Reconnect::new();
    loop {
        let connected = Instant::now();
        let mut received = false;
        let why = loop {
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
        reconnect.ended(connected.elapsed(), received);
        stream = reconnect
            .again(out, why, || ctx.client.follow_events(scope, &query))
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_show_health_next_to_state() {
        let mut i = InstanceStatus {
            id: Some("i_1".into()),
            node: Some("dev".into()),
            state: "running".into(),
            address: None,
            reason: None,
            health: None,
            release: Some(3),
            category: None,
            message: None,
        };
        assert_eq!(instance_state(&i), "running");
        i.health = Some("healthy".into());
        assert_eq!(instance_state(&i), "running (healthy)");
        let table = instance_table(&[WorkloadStatus {
            name: "web".into(),
            desired: 1,
            running: 1,
            instances: vec![i],
            runtime: Runtime::Process,
            mode: Mode::LongRunning,
            listeners: Vec::new(),
        }]);
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split("  ").filter(|c| !c.trim().is_empty()).collect();
        assert_eq!(
            cells.iter().map(|c| c.trim()).collect::<Vec<_>>(),
            ["i_1", "web", "v3", "dev", "running (healthy)", "-", "-"]
        );
    }

    #[test]
    fn per_connection_workloads_show_their_listeners() {
        use verge_api::status::ListenerStatus;
        let l = |node: &str, answering: bool, failed: u64, at: Option<&str>| ListenerStatus {
            id: format!("lst-rel_1-echo-{node}"),
            node: Some(node.into()),
            state: if answering { "listening" } else { "starting" }.into(),
            address: Some("fd00::2".into()),
            answering,
            reason: None,
            release: Some(3),
            active: 1,
            served: 60,
            failed,
            last_failure: at.map(|_| "trap: unreachable".to_string()),
            last_failure_category: at.map(|_| "crash".into()),
            last_failure_at: at.map(String::from),
        };
        let mut w = WorkloadStatus {
            name: "echo".into(),
            desired: 0,
            running: 0,
            instances: Vec::new(),
            runtime: Runtime::Wasm,
            mode: Mode::PerConnection,
            listeners: vec![
                l("n1", true, 1, Some("2026-01-01T00:00:02Z")),
                l("n2", true, 0, Some("2026-01-01T00:00:01Z")),
                l("n3", false, 0, None),
            ],
        };
        assert_eq!(
            per_connection_line(&w),
            "echo  wasm, per-connection: 0 running; answering on 2 nodes (n1, n2); \
             3 active, 180 served, 1 failed (last: trap: unreachable, on n1)"
        );
        w.listeners.clear();
        assert_eq!(
            per_connection_line(&w),
            "echo  wasm, per-connection: 0 running; answering on no node yet; \
             0 active, 0 served, 0 failed"
        );
    }
}
