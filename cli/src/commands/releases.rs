//! `verge releases` and `verge describe release|env|workload`.

use verge_api::manifest::{Mode, Runtime, format_size};
use verge_api::names;
use verge_api::release::Release;
use verge_api::status::{EnvDetail, ScaleOverride, WorkloadDetail};

use super::rollouts::rollout_line;
use super::{Result, bad_request, observe, short_digest};
use crate::args::DescribeCmd;
use crate::context::{Context, EnvNames};
use crate::output::Output;

/// A release as the API addresses it (`v3`, `3`, an ID), checked before it
/// becomes a URL path segment.
pub fn check_release_name(name: &str) -> Result {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(bad_request(format!(
            "{name:?} is not a release: give v3, 3 or a release ID (see `verge releases`)"
        )))
    }
}

pub async fn list(ctx: &Context, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let releases = ctx.client.list_releases(names.scope()).await?;
    out.list(
        &releases,
        &["", "release", "id", "created", "by", "images"],
        |r| {
            let images: Vec<String> = r
                .images
                .iter()
                .map(|(w, image)| format!("{w}={}", short_digest(image)))
                .collect();
            vec![
                if r.current { "*" } else { " " }.into(),
                format!("v{}", r.number),
                r.id.clone(),
                r.created_at.clone(),
                r.created_by.clone(),
                images.join(" "),
            ]
        },
    );
    Ok(())
}

pub async fn describe(ctx: &Context, cmd: DescribeCmd, out: &Output) -> Result {
    match cmd {
        DescribeCmd::Release { name } => {
            check_release_name(&name)?;
            let names = ctx.env_names().await?;
            let release = ctx.client.get_release(names.scope(), &name).await?;
            out.one(&release, release_text);
        }
        DescribeCmd::Env { name } => {
            let names = match name {
                Some(env) => {
                    names::validate("env", &env).map_err(bad_request)?;
                    EnvNames {
                        org: ctx.org().await?,
                        app: ctx.app()?,
                        env,
                    }
                }
                None => ctx.env_names().await?,
            };
            let env = ctx.client.describe_env(names.scope()).await?;
            out.one(&env, env_text);
        }
        DescribeCmd::Workload { name } => {
            names::validate("workload", &name).map_err(bad_request)?;
            let names = ctx.env_names().await?;
            let workload = ctx.client.describe_workload(names.scope(), &name).await?;
            out.one(&workload, workload_text);
        }
        DescribeCmd::Endpoint { name } => super::endpoints::describe(ctx, &name, out).await?,
    }
    Ok(())
}

fn release_text(r: &Release) -> String {
    let mut lines = vec![
        format!("release: v{} ({})", r.number, r.id),
        format!("app: {}", r.app),
        format!("env: {}", r.env),
        format!("current: {}", if r.current { "yes" } else { "no" }),
        format!("created: {}", r.created_at),
        format!("by: {}", r.created_by),
        format!(
            "parent: {}",
            r.parent.as_ref().map_or_else(|| "-".into(), |p| p.label())
        ),
        format!("config version: {}", r.config_version),
    ];
    let secrets: Vec<String> = r.secrets.iter().map(|(b, v)| format!("{b} v{v}")).collect();
    lines.push(format!("secrets: {}", list_or_dash(&secrets)));
    lines.push("images:".into());
    lines.extend(r.images.iter().map(|(w, image)| format!("  {w}: {image}")));
    if let Some(m) = &r.manifest {
        // Stored form: images pinned, sizes in bytes, durations in ms.
        let text = toml::to_string_pretty(m)
            .or_else(|_| serde_json::to_string_pretty(m).map_err(|_| ()))
            .unwrap_or_default();
        lines.push("manifest snapshot:".into());
        lines.extend(text.trim_end().lines().map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("  {l}")
            }
        }));
    }
    lines.join("\n")
}

fn env_text(e: &EnvDetail) -> String {
    let t = &e.target;
    let mut lines = vec![
        format!("env: {}/{} ({})", t.app, t.env, e.id),
        format!("org: {}, project: {}", t.org, t.project),
        format!("created: {}", e.created_at),
        format!(
            "release: {} ({} in all)",
            e.release
                .as_ref()
                .map_or_else(|| "none yet".into(), |r| r.label()),
            e.releases
        ),
    ];
    lines.push(rollout_line(&e.rollout));
    if let Some(started) = &e.rollout.started_at {
        let ended = e.rollout.ended_at.as_deref().unwrap_or("-");
        lines.push(format!("rollout started: {started}, ended: {ended}"));
    }
    lines.push(format!(
        "config version: {} (vars: {})",
        e.config_version,
        list_or_dash(&e.vars)
    ));
    let secrets: Vec<String> = e
        .secrets
        .iter()
        .map(|b| match b.version {
            Some(v) => format!("{} v{v} (keys {})", b.name, b.keys.join(", ")),
            None => format!("{} (deleted)", b.name),
        })
        .collect();
    lines.push(format!("secrets: {}", list_or_dash(&secrets)));
    let scale: Vec<String> = e
        .scale
        .iter()
        .map(|(w, s)| format!("{w} {}", scale_text(s)))
        .collect();
    lines.push(format!("scale: {}", list_or_dash(&scale)));
    lines.join("\n")
}

fn workload_text(w: &WorkloadDetail) -> String {
    let s = &w.spec;
    let mut lines = vec![
        format!(
            "workload: {} of {}/{}, release {}",
            w.name,
            w.target.app,
            w.target.env,
            w.release.label()
        ),
        format!("runtime: {}", json(&s.runtime)),
        format!("mode: {}", json(&s.mode)),
    ];
    if s.runtime == Runtime::Wasm {
        lines.push(format!(
            "max cpu time: {} without waiting for input or output",
            humantime::format_duration(std::time::Duration::from_millis(s.max_cpu_time_ms))
        ));
    }
    if s.mode == Mode::PerConnection {
        lines.push(format!(
            "concurrency: {} connections at once per node, each with its own instance",
            s.concurrency
        ));
    }
    lines.extend([
        format!("image: {}", s.image),
        format!(
            "command: {}",
            s.command
                .as_ref()
                .map_or_else(|| "(image default)".into(), json)
        ),
        format!("count: {}", s.count),
        format!("cpu: {}", s.cpu),
        format!("memory: {}", format_size(s.memory)),
        format!("restart: {}", json(&s.restart)),
        format!(
            "health: {}",
            s.health.map_or_else(
                || "-".into(),
                |h| format!(
                    "tcp {} every {}ms, timeout {}ms",
                    h.tcp, h.interval_ms, h.timeout_ms
                )
            )
        ),
        format!(
            "rollout: max_surge {}, max_unavailable {}, auto_rollback {}",
            s.rollout.max_surge, s.rollout.max_unavailable, s.rollout.auto_rollback
        ),
    ]);
    let volumes: Vec<String> = s
        .volumes
        .iter()
        .map(|v| format!("{} at {}", v.name, v.path))
        .collect();
    lines.push(format!("volumes: {}", list_or_dash(&volumes)));
    let secrets: Vec<String> = s
        .secrets
        .iter()
        .map(|m| format!("{} at {}", m.bundle, m.path))
        .collect();
    lines.push(format!("secrets: {}", list_or_dash(&secrets)));
    let constraints: Vec<String> = s
        .constraints
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    lines.push(format!("constraints: {}", list_or_dash(&constraints)));
    let scale = if w.scale.is_empty() {
        "- (as in the manifest)".into()
    } else {
        scale_text(&w.scale)
    };
    lines.push(format!("scale: {scale}"));
    lines.push("endpoints:".into());
    if w.endpoints.is_empty() {
        lines.push("  -".into());
    }
    for e in &w.endpoints {
        let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
        let mut line = format!(
            "  {}: ports {} → {}, ipv4 {}",
            e.name,
            ports.join(","),
            e.internal_port,
            if e.ipv4 { "yes" } else { "no" }
        );
        if let Some(p) = e.proxy_protocol {
            line = format!("{line}, proxy protocol {}", json(&p));
        }
        lines.push(line);
    }
    lines.push(format!(
        "running: {}/{}",
        w.status.running, w.status.desired
    ));
    if !w.status.instances.is_empty() {
        lines.push(String::new());
        lines.push(observe::instance_table(std::slice::from_ref(&w.status)));
    }
    if s.mode == Mode::PerConnection {
        lines.push(observe::per_connection_line(&w.status));
    }
    if !w.status.listeners.is_empty() {
        lines.push(String::new());
        lines.push(observe::listener_table(std::slice::from_ref(&w.status)));
    }
    lines.join("\n")
}

/// `count=3 cpu=0.5 memory=512Mi`, only what was set.
fn scale_text(s: &ScaleOverride) -> String {
    let mut parts = Vec::new();
    if let Some(c) = s.count {
        parts.push(format!("count={c}"));
    }
    if let Some(c) = s.cpu {
        parts.push(format!("cpu={c}"));
    }
    if let Some(m) = s.memory {
        parts.push(format!("memory={}", format_size(m)));
    }
    parts.join(" ")
}

/// Compact JSON of a value, without the quotes of a bare string.
fn json<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => String::new(),
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}
