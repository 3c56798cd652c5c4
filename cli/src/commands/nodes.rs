//! `verge nodes join-token / list / describe` (cluster admin).

use verge_api::manifest::human_size;
use verge_api::nodes::Node;

use super::Result;
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
                        n.state.clone(),
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
                let mut text = format!(
                    "node {} ({})\nstate:           {} since {}\nlabels:          {}\nisolation:       {isolation}\n\
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
    }
    Ok(())
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
