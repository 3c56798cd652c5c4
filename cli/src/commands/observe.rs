//! `verge status`, `verge events [--follow]`: observed state of an env and
//! its event stream (`verge wait` is in [`super::wait`]).

use tokio::time::Instant;
use verge_api::client::{EventQuery, EventScope};
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
        };
        assert_eq!(instance_state(&i), "running");
        i.health = Some("healthy".into());
        assert_eq!(instance_state(&i), "running (healthy)");
        let table = instance_table(&[WorkloadStatus {
            name: "web".into(),
            desired: 1,
            running: 1,
            instances: vec![i],
        }]);
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split("  ").filter(|c| !c.trim().is_empty()).collect();
        assert_eq!(
            cells.iter().map(|c| c.trim()).collect::<Vec<_>>(),
            ["i_1", "web", "v3", "dev", "running (healthy)", "-", "-"]
        );
    }
}
