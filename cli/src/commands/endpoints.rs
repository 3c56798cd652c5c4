//! `verge endpoints` and `verge describe endpoint`: what is exposed to the
//! internet, and how one endpoint is served.

use verge_api::names;
use verge_api::routing::ExposedEndpoint;

use super::{Result, bad_request};
use crate::context::Context;
use crate::output::Output;

/// Every endpoint of the org (of `--app`, `--env` when given).
pub async fn list(ctx: &Context, out: &Output) -> Result {
    let org = ctx.org().await?;
    let app = ctx.explicit_app();
    let env = ctx.explicit_env();
    let endpoints = ctx
        .client
        .list_endpoints(&org, app.as_deref(), env.as_deref())
        .await?;
    out.list(
        &endpoints,
        &[
            "endpoint", "app/env", "ipv6", "ipv4", "ports", "proxy", "target",
        ],
        |e| {
            vec![
                e.name.clone(),
                format!("{}/{}", e.app, e.env),
                format!("[{}]", e.ipv6),
                e.ipv4.map_or_else(|| "-".into(), |a| a.to_string()),
                ports(&e.ports),
                proxy(e),
                format!("{}:{}", e.workload, e.internal_port),
            ]
        },
    );
    if !out.is_json() && endpoints.iter().any(|e| e.loopback) {
        println!(
            "note: endpoints listen on loopback (::1, 127.0.0.1): only this machine reaches them. \
             The control plane has no endpoint prefix to give out (an unprivileged `verge dev`); \
             run it as root, or set --endpoint-prefix on `verge control`."
        );
    }
    Ok(())
}

/// One endpoint with its backends and listeners.
pub async fn describe(ctx: &Context, name: &str, out: &Output) -> Result {
    names::validate("endpoint", name).map_err(bad_request)?;
    let names = ctx.env_names().await?;
    let e = ctx.client.describe_endpoint(names.scope(), name).await?;
    out.one(&e, text);
    Ok(())
}

fn ports(ports: &[u16]) -> String {
    let p: Vec<String> = ports.iter().map(u16::to_string).collect();
    p.join(",")
}

fn proxy(e: &ExposedEndpoint) -> String {
    e.proxy_protocol.map_or_else(|| "-".into(), |_| "v2".into())
}

fn text(e: &ExposedEndpoint) -> String {
    let l = &e.limits;
    let mut lines = vec![
        format!("endpoint: {}", e.name),
        format!("app: {}/{}", e.app, e.env),
        format!("target: workload {} port {}", e.workload, e.internal_port),
        format!("ipv6: [{}] ports {}", e.ipv6, ports(&e.ports)),
        format!(
            "ipv4: {}",
            e.ipv4.map_or_else(
                || "- (ipv4 = false)".into(),
                |a| format!("{a} ports {}", ports(&e.ports))
            )
        ),
        format!("proxy protocol: {}", proxy(e)),
        format!(
            "limits: idle timeout {}, max {} connections, {} new connections/s per source, drain timeout {}",
            humantime::format_duration(std::time::Duration::from_millis(l.idle_timeout_ms)),
            l.max_connections,
            l.rate_limit,
            humantime::format_duration(std::time::Duration::from_millis(l.drain_timeout_ms)),
        ),
    ];
    if e.loopback {
        lines.push("note: on loopback, reachable from this machine only".into());
    }
    lines.push("backends:".into());
    if e.backends.is_empty() {
        lines.push("  (no instances)".into());
    }
    for b in &e.backends {
        let why = match (&b.in_rotation, &b.reason) {
            (true, _) => "in rotation".to_string(),
            (false, Some(r)) => format!("out: {r}"),
            (false, None) => "out".to_string(),
        };
        lines.push(format!(
            "  {} on {} at {}: {}, {}; {}{}",
            b.instance,
            b.node.as_deref().unwrap_or("-"),
            b.address.as_deref().unwrap_or("-"),
            b.state,
            if b.listener {
                "per-connection listener"
            } else {
                &b.health
            },
            why,
            if b.reach == verge_api::routing::Reach::Tunnel {
                " (through the node's QUIC connection: behind NAT)"
            } else {
                ""
            }
        ));
    }
    lines.push("listeners:".into());
    if e.listeners.is_empty() {
        lines.push("  (no ingress has reported)".into());
    }
    for l in &e.listeners {
        lines.push(format!(
            "  ingress {} on {}: {} (reported {})",
            l.ingress,
            l.address,
            l.error.as_deref().unwrap_or("listening"),
            l.seen_at
        ));
    }
    lines.join("\n")
}
