//! `verge volumes create / list / describe / resize / snapshot / snapshots
//! / restore / delete / delete-snapshot`: persistent storage of an env on
//! one node, and its snapshots.

use verge_api::manifest::human_size;
use verge_api::names;
use verge_api::volumes::{CreateVolume, ResizeVolume, RestoreSnapshot, Snapshot, Volume};

use super::{Result, bad_request, next_lines, or_dash};
use crate::args::VolumesCmd;
use crate::context::{Context, EnvNames};
use crate::output::{Output, table};

pub async fn run(ctx: &Context, cmd: VolumesCmd, out: &Output) -> Result {
    check(&cmd)?;
    let names = ctx.env_names().await?;
    let scope = names.scope();
    let client = &ctx.client;
    match cmd {
        VolumesCmd::Create {
            name,
            size,
            region,
            node,
        } => {
            let create = CreateVolume {
                name,
                size,
                region,
                node,
            };
            let v = client.create_volume(scope, &create).await?;
            out.one(&v, |v| created(&names, v));
        }
        VolumesCmd::List => {
            let list = client.list_volumes(scope).await?;
            out.list(
                &list,
                &["name", "size", "used", "node", "attached to", "state"],
                |v| {
                    vec![
                        v.name.clone(),
                        human_size(v.size),
                        v.used.map_or_else(|| "-".into(), human_size),
                        v.node.clone(),
                        or_dash(v.attached_to.as_deref()),
                        v.state.clone(),
                    ]
                },
            );
        }
        VolumesCmd::Describe { name } => {
            let v = client.describe_volume(scope, &name).await?;
            out.one(&v, |v| describe(&names, v));
        }
        VolumesCmd::Resize { name, size } => {
            let v = client
                .resize_volume(scope, &name, &ResizeVolume { size })
                .await?;
            out.one(&v, |v| {
                let lead = format!("volume {} of {} is now", v.name, names.label());
                on_node(&lead, &names, v)
            });
        }
        VolumesCmd::Snapshot { name } => {
            let s = client.snapshot_volume(scope, &name).await?;
            out.one(&s, |s| {
                let f = flags(&names);
                format!(
                    "snapshot {} of volume {} taken on node {} ({} used of {}){}",
                    s.id,
                    s.volume,
                    s.node,
                    s.used.map_or_else(|| "?".into(), human_size),
                    human_size(s.size),
                    next_lines(&[
                        format!(
                            "verge volumes restore {} {f}  (over the volume's data)",
                            s.id
                        ),
                        format!(
                            "verge volumes restore {} --to NEW-NAME {f}  (into a new volume)",
                            s.id
                        ),
                        format!("verge volumes snapshots {} {f}", s.volume),
                    ])
                )
            });
        }
        VolumesCmd::Snapshots { name } => {
            let list = client.list_snapshots(scope, &name).await?;
            out.list(
                &list,
                &["snapshot", "volume", "size", "used", "node", "taken"],
                snapshot_row,
            );
        }
        VolumesCmd::Restore { snapshot, to, node } => {
            let restore = RestoreSnapshot {
                snapshot: snapshot.clone(),
                into: to,
                node,
            };
            let v = client.restore_snapshot(scope, &restore).await?;
            out.one(&v, |v| {
                let lead = format!(
                    "snapshot {snapshot} restored into volume {} of {}:",
                    v.name,
                    names.label()
                );
                on_node(&lead, &names, v)
            });
        }
        VolumesCmd::Delete { name, snapshots } => {
            let v = client.delete_volume(scope, &name, snapshots).await?;
            out.one(&v, |v| {
                let kept = if v.snapshots.is_empty() {
                    String::new()
                } else {
                    match v.snapshots.len() {
                        1 => format!("; its snapshot stays on node {}", v.node),
                        n => format!("; its {n} snapshots stay on node {}", v.node),
                    }
                };
                let f = flags(&names);
                let next: Vec<String> = v
                    .snapshots
                    .last()
                    .map(|s| {
                        vec![
                            format!("verge volumes restore {} {f}  (bring it back)", s.id),
                            format!("verge volumes delete-snapshot {} {f}", s.id),
                        ]
                    })
                    .unwrap_or_default();
                format!(
                    "volume {} of {} deleted from node {}{kept}{}",
                    v.name,
                    names.label(),
                    v.node,
                    next_lines(&next)
                )
            });
        }
        VolumesCmd::DeleteSnapshot { id } => {
            let s = client.delete_snapshot(scope, &id).await?;
            out.one(&s, |s| {
                format!(
                    "snapshot {} of volume {} deleted from node {}",
                    s.id, s.volume, s.node
                )
            });
        }
    }
    Ok(())
}

/// Checks names, IDs and sizes before anything is sent.
fn check(cmd: &VolumesCmd) -> Result {
    let volume = |n: &str| names::validate("volume", n).map_err(bad_request);
    let snapshot = |id: &str| {
        if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Ok(())
        } else {
            Err(bad_request(format!(
                "{id:?} is not a snapshot ID: IDs look like snap_01jx…; `verge volumes snapshots VOLUME` lists them"
            )))
        }
    };
    match cmd {
        VolumesCmd::Create { name, region, .. } => {
            volume(name)?;
            if let Some(r) = region {
                names::label("region", r).map_err(bad_request)?;
            }
            Ok(())
        }
        VolumesCmd::List => Ok(()),
        VolumesCmd::Describe { name }
        | VolumesCmd::Resize { name, .. }
        | VolumesCmd::Snapshot { name }
        | VolumesCmd::Snapshots { name }
        | VolumesCmd::Delete { name, .. } => volume(name),
        VolumesCmd::Restore {
            snapshot: id, to, ..
        } => {
            snapshot(id)?;
            to.as_deref().map_or(Ok(()), volume)
        }
        VolumesCmd::DeleteSnapshot { id } => snapshot(id),
    }
}

/// `--app A --env E`, for suggested commands.
fn flags(names: &EnvNames) -> String {
    format!("--app {} --env {}", names.app, names.env)
}

/// `LEAD SIZE on node N`, then how to look at the volume.
fn on_node(lead: &str, names: &EnvNames, v: &Volume) -> String {
    format!(
        "{lead} {} on node {}{}",
        human_size(v.size),
        v.node,
        next_lines(&[format!(
            "verge volumes describe {} {}",
            v.name,
            flags(names)
        )])
    )
}

fn created(names: &EnvNames, v: &Volume) -> String {
    let mut text = format!(
        "volume {} created in {}: {} on node {}{}",
        v.name,
        names.label(),
        human_size(v.size),
        v.node,
        v.backend
            .as_deref()
            .map(|b| format!(" ({b})"))
            .unwrap_or_default()
    );
    if let Some(w) = backend_warning(v) {
        text.push('\n');
        text.push_str(&w);
    }
    text.push_str(&next_lines(&[
        format!(
            "mount it: volumes = [{{ name = \"{}\", path = \"/data\" }}] in a workload of verge.toml, then verge deploy",
            v.name
        ),
        format!("verge volumes describe {} {}", v.name, flags(names)),
    ]));
    text
}

/// The warning for a volume whose node cannot enforce its size.
fn backend_warning(v: &Volume) -> Option<String> {
    (v.backend.as_deref() == Some("directory")).then(|| {
        format!(
            "warning: node {} has no loop devices, so this volume is a plain directory: its size \
             ({}) is not enforced and it shares the node's disk",
            v.node,
            human_size(v.size)
        )
    })
}

fn describe(names: &EnvNames, v: &Volume) -> String {
    let mut lines = vec![
        format!("volume {} ({}) of {}", v.name, v.id, names.label()),
        format!("state:     {}", v.state),
    ];
    if let Some(m) = &v.message {
        lines.push(format!("message:   {m}"));
    }
    lines.push(format!(
        "node:      {}{}",
        v.node,
        v.region
            .as_deref()
            .map(|r| format!(" (region {r})"))
            .unwrap_or_default()
    ));
    lines.push(format!(
        "size:      {} ({} bytes)",
        human_size(v.size),
        v.size
    ));
    lines.push(format!(
        "used:      {}",
        v.used.map_or_else(
            || "- (not reported yet)".into(),
            |u| format!("{} ({:.0}%)", human_size(u), percent(u, v.size))
        )
    ));
    lines.push(format!(
        "backend:   {}",
        v.backend.as_deref().unwrap_or("- (not reported yet)")
    ));
    if let Some(w) = backend_warning(v) {
        lines.push(w);
    }
    lines.push(format!(
        "attached:  {}",
        v.attached_to
            .as_deref()
            .unwrap_or("- (no instance mounts it)")
    ));
    lines.push(format!("created:   {}", v.created_at));
    lines.push(format!("snapshots ({}):", v.snapshots.len()));
    if !v.snapshots.is_empty() {
        let t = table(
            &["snapshot", "volume", "size", "used", "node", "taken"],
            v.snapshots.iter().map(snapshot_row),
        );
        lines.extend(t.lines().map(|l| format!("  {l}")));
    }
    let mut text = lines.join("\n");
    text.push_str(&next_lines(&v.operations));
    text
}

fn snapshot_row(s: &Snapshot) -> Vec<String> {
    vec![
        s.id.clone(),
        s.volume.clone(),
        human_size(s.size),
        s.used.map_or_else(|| "-".into(), human_size),
        s.node.clone(),
        s.created_at.clone(),
    ]
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}
