//! `verge nodes join-token / list / describe / drain / undrain` (cluster
//! admin).

use std::time::Duration;

use tokio::time::Instant;
use verge_api::client::ClientError;
use verge_api::manifest::human_size;
use verge_api::names;
use verge_api::nodes::{Node, NodeDetail};
use verge_api::{ErrorDetail, ErrorKind};

use super::progress::Progress;
use super::{Failure, Result, bad_request, next_lines};
use crate::args::NodesCmd;
use crate::context::Context;
use crate::output::{Output, table};

pub async fn run(ctx: &Context, cmd: NodesCmd, out: &Output) -> Result {
    match cmd {
        NodesCmd::JoinToken { ttl, uses } => {
            let t = ctx
                .client
                .create_join_token(Some(ttl.as_secs().max(1)), Some(uses))
                .await?;
            out.one(&t, |t| {
                format!(
                    "join token {} (valid until {} for {} join{}; it pins the cluster CA sha256:{})\n\n    {}\n\n\
                     It is shown only now. On the new machine, as root:\n\n    {}",
                    t.id,
                    t.expires_at,
                    t.uses,
                    if t.uses == 1 { "" } else { "s" },
                    t.ca_sha256,
                    t.token,
                    t.command
                )
            });
        }
        NodesCmd::List => {
            let nodes = ctx.client.list_nodes().await?;
            out.list(
                &nodes,
                &[
                    "name",
                    "state",
                    "labels",
                    "cpu",
                    "memory",
                    "instances",
                    "last seen",
                    "isolation",
                ],
                |n| {
                    vec![
                        n.name.clone(),
                        node_state(n),
                        labels(n),
                        format!("{}/{}", n.cpu_reserved, n.cpu),
                        format!("{}/{}", human_size(n.memory_reserved), human_size(n.memory)),
                        n.instances.to_string(),
                        n.last_seen.clone().unwrap_or_else(|| "never".into()),
                        n.isolation.clone(),
                    ]
                },
            );
        }
        NodesCmd::Describe { name } => {
            let d = ctx.client.describe_node(&name).await?;
            out.one(&d, |d| {
                let n = &d.node;
                let usage = n.usage.map_or("-".into(), |u| {
                    format!(
                        "{:.2} cores, {} memory, {} images",
                        u.cpu,
                        human_size(u.memory),
                        human_size(u.images)
                    )
                });
                let isolation = if n.isolation == "none" {
                    "none: instances are plain host processes on loopback ports (no namespaces, rootfs or private addresses)".to_string()
                } else {
                    n.isolation.clone()
                };
                let drain = match (&n.drain, &n.drain_deadline) {
                    (Some(d), Some(deadline)) if d == "draining" => {
                        format!(", {d} (deadline {deadline})")
                    }
                    (Some(d), _) => format!(", {d}"),
                    (None, _) => String::new(),
                };
                let mut text = format!(
                    "node {} ({})\nstate:           {} since {}{drain}\nlabels:          {}\nisolation:       {isolation}\n\
                     capacity:        {} cores, {} memory\nreserved:        {} cores, {} memory\nusage:           {usage}\n\
                     last seen:       {}\ninstance prefix: {}\njoined:          {}\nversion:         {}\n",
                    n.name,
                    n.id,
                    n.state,
                    n.state_since,
                    labels(n),
                    n.cpu,
                    human_size(n.memory),
                    n.cpu_reserved,
                    human_size(n.memory_reserved),
                    n.last_seen.clone().unwrap_or_else(|| "never".into()),
                    n.instance_prefix,
                    d.joined_at,
                    n.version,
                );
                text.push_str(&format!("instances ({}):\n", d.instances_detail.len()));
                if !d.instances_detail.is_empty() {
                    text.push_str(&table(
                        &["instance", "app", "env", "workload", "state", "address"],
                        d.instances_detail.iter().map(|i| {
                            vec![
                                i.id.clone(),
                                format!("{}/{}", i.org, i.app),
                                i.env.clone(),
                                i.workload.clone(),
                                match &i.category {
                                    Some(c) => format!("{} ({c})", i.state),
                                    None => i.state.clone(),
                                },
                                i.address.clone().unwrap_or_else(|| "-".into()),
                            ]
                        }),
                    ));
                }
                text
            });
        }
        NodesCmd::Drain {
            name,
            deadline,
            wait,
            timeout,
        } => {
            names::validate("node", &name).map_err(bad_request)?;
            let node = ctx
                .client
                .drain_node(&name, deadline.map(|d| d.as_secs().max(1)))
                .await?;
            if !wait {
                out.one(&node, drain_text);
                return Ok(());
            }
            // Under -o json the one document is the node once drained.
            if !out.is_json() {
                println!("{}", drain_text(&node));
            }
            let timeout = timeout.unwrap_or_else(|| {
                deadline.unwrap_or(DEFAULT_DRAIN_DEADLINE) + Duration::from_secs(60)
            });
            let drained = wait_drained(ctx, &name, timeout, out).await?;
            out.one(&drained.node, |n| {
                format!("node {} is drained: no instances left on it", n.name)
            });
        }
        NodesCmd::Undrain { name } => {
            names::validate("node", &name).map_err(bad_request)?;
            let node = ctx.client.undrain_node(&name).await?;
            out.one(&node, |n| {
                format!(
                    "node {} takes new instances again (state: {})",
                    n.name,
                    node_state(n)
                )
            });
        }
    }
    Ok(())
}

/// The server's drain deadline when none is given.
const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(300);

/// `online`, or `online, draining` / `offline, drained` while drained.
pub fn node_state(n: &Node) -> String {
    match &n.drain {
        Some(d) => format!("{}, {d}", n.state),
        None => n.state.clone(),
    }
}

/// What `verge nodes drain` did.
fn drain_text(n: &Node) -> String {
    let mut text = format!("node {}: {}", n.name, node_state(n));
    match n.drain.as_deref() {
        Some("drained") => text.push_str(": no instances left on it"),
        Some(_) => {
            text.push_str(&format!(
                ": {} instance(s) to move; new ones go elsewhere",
                n.instances
            ));
            if let Some(deadline) = &n.drain_deadline {
                text.push_str(&format!("; what is still there at {deadline} is stopped"));
            }
        }
        None => {}
    }
    let next = [
        format!("verge nodes describe {}", n.name),
        format!(
            "verge nodes undrain {}  (to take new instances again)",
            n.name
        ),
    ];
    text + &next_lines(&next)
}

/// Polls the node every second until it is drained: its detail then.
/// Progress (instances left) goes to stderr like `verge wait`'s.
async fn wait_drained(
    ctx: &Context,
    name: &str,
    timeout: Duration,
    out: &Output,
) -> Result<NodeDetail> {
    const POLL: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new(out, &format!("draining {name}"), "moved");
    let mut most = 0;
    let mut left: Option<u32> = None;
    let mut unreachable = String::new();
    loop {
        match tokio::time::timeout_at(deadline, ctx.client.describe_node(name)).await {
            Ok(Ok(d)) => {
                unreachable.clear();
                match d.node.drain.as_deref() {
                    Some("drained") => return Ok(d),
                    Some(_) => {}
                    None => {
                        return Err(Failure(
                            ErrorDetail::new(
                                ErrorKind::Conflict,
                                format!(
                                    "node {name} is no longer draining: it was undrained meanwhile"
                                ),
                            )
                            .with_next(format!("verge nodes describe {name}"))
                            .with_next(format!("verge nodes drain {name} --wait")),
                        ));
                    }
                }
                let now = d.node.instances;
                most = most.max(now);
                let text = format!("{now} instance(s) left");
                let line = format!("waiting for node {name} to drain: {text}");
                progress.update((most - now).into(), most.into(), &text, &text, &line);
                left = Some(now);
            }
            Ok(Err(e @ ClientError::Connect { .. })) => progress.retrying(&e, &mut unreachable),
            Ok(Err(e)) => return Err(e.into()),
            Err(_elapsed) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            let state = left.map_or_else(
                || "the control plane did not answer".to_string(),
                |n| format!("{n} instance(s) left"),
            );
            return Err(Failure(
                ErrorDetail::new(
                    ErrorKind::Timeout,
                    format!(
                        "timed out after {} waiting for node {name} to drain: {state}",
                        humantime::format_duration(timeout)
                    ),
                )
                .with_next(format!("verge nodes describe {name}"))
                .with_next("verge events --all --follow"),
            ));
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
    }
}

fn labels(n: &Node) -> String {
    if n.labels.is_empty() {
        return "-".into();
    }
    n.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(drain: Option<&str>) -> Node {
        Node {
            id: "n_1".into(),
            name: "n1".into(),
            state: "online".into(),
            state_since: "2026-11-22T13:07:15Z".into(),
            labels: Default::default(),
            isolation: "none".into(),
            cpu: 2.0,
            memory: 1 << 30,
            cpu_reserved: 0.0,
            memory_reserved: 0,
            usage: None,
            last_seen: None,
            instance_prefix: "fd76::/64".into(),
            instances: 3,
            version: "0.1.0".into(),
            drain: drain.map(str::to_string),
            drain_deadline: drain.map(|_| "2026-11-22T13:12:15Z".to_string()),
        }
    }

    #[test]
    fn the_state_says_draining_and_drained() {
        assert_eq!(node_state(&node(None)), "online");
        assert_eq!(node_state(&node(Some("draining"))), "online, draining");
        let mut n = node(Some("drained"));
        n.state = "offline".into();
        assert_eq!(node_state(&n), "offline, drained");
    }

    #[test]
    fn drain_says_what_moves_and_until_when() {
        assert_eq!(
            drain_text(&node(Some("draining"))),
            "node n1: online, draining: 3 instance(s) to move; new ones go elsewhere; \
             what is still there at 2026-11-22T13:12:15Z is stopped\n\
             next:\n  verge nodes describe n1\n  verge nodes undrain n1  (to take new instances again)"
        );
        let mut n = node(Some("drained"));
        n.instances = 0;
        assert!(drain_text(&n).starts_with("node n1: online, drained: no instances left on it\n"));
    }
}
