//! The routing table (`verge_api::routing`): every endpoint of every env's
//! current release, its addresses, and the instances that take its new
//! connections. Also what `verge endpoints` and `verge describe endpoint`
//! show, from the same facts.
//!
//! An instance is in rotation when it is wanted (goal `run`), `running`,
//! healthy (or has no health check) and on an online node. An endpoint of
//! a per-connection workload has no instances: its backends are the
//! listeners its nodes report for the current release, `listening`, on
//! online nodes (the ingress connects to a listener as to an instance).
//! Everything else is listed by `describe` with the reason it is out.
//!
//! It reads the store and must not change it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sha2::{Digest, Sha256};
use verge_api::manifest::{Endpoint, Manifest, Mode};
use verge_api::routing::{
    Backend, BackendState, ExposedEndpoint, IngressListener, IngressState, Reach, Route,
    RoutingTable,
};

use crate::endpoints::Addressing;
use crate::store::{
    EndpointAddressRow, EnvScope, InstanceRow, ListenerRow, NodeRow, Result, Store,
};

/// One endpoint with everything needed to route to it.
struct Facts {
    row: EndpointAddressRow,
    ipv6: Ipv6Addr,
    ipv4: Option<Ipv4Addr>,
    scope: EnvScope,
    endpoint: Endpoint,
    /// The workload has a health check: its instances take connections
    /// only once a check passed.
    has_check: bool,
    /// The env's instances of the endpoint's workload (when asked for).
    instances: Vec<InstanceRow>,
    /// The env's current release.
    release_id: String,
    /// The workload is per-connection: `listeners` are its backends.
    per_connection: bool,
    /// The listeners nodes report for the endpoint's workload, of any
    /// release (when asked for).
    listeners: Vec<ListenerRow>,
}

/// Reads the endpoints of `envs` (every env when `None`), with their
/// instances when `with_instances`.
async fn facts(store: &Store, envs: Option<&[String]>, with_instances: bool) -> Result<Vec<Facts>> {
    let mut rows = store.all_endpoint_addresses().await?;
    if let Some(envs) = envs {
        rows.retain(|r| envs.contains(&r.env_id));
    }
    let mut by_env: BTreeMap<String, Vec<EndpointAddressRow>> = BTreeMap::new();
    for r in rows {
        by_env.entry(r.env_id.clone()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (env_id, rows) in by_env {
        let (Some(scope), Some(release)) = (
            store.env_scope(&env_id).await?,
            store.current_release(&env_id).await?,
        ) else {
            continue;
        };
        let Ok(manifest) = serde_json::from_str::<Manifest>(&release.manifest) else {
            tracing::error!(
                env = env_id,
                release = release.id,
                "a stored release does not decode"
            );
            continue;
        };
        let instances = if with_instances {
            store.env_instances(&env_id).await?
        } else {
            Vec::new()
        };
        let per_connection = |w: &str| {
            manifest
                .workloads
                .get(w)
                .is_some_and(|w| w.mode == Mode::PerConnection)
        };
        let listeners = if with_instances
            && manifest
                .endpoints
                .iter()
                .any(|e| per_connection(&e.workload))
        {
            store.env_listeners(&env_id).await?
        } else {
            Vec::new()
        };
        for row in rows {
            let Some(endpoint) = manifest.endpoints.iter().find(|e| e.name == row.name) else {
                continue;
            };
            let ipv4 = row.ipv4.as_deref().map(str::parse).transpose();
            let (Ok(ipv6), Ok(ipv4)) = (row.ipv6.parse(), ipv4) else {
                tracing::error!(
                    endpoint = row.id,
                    "a stored endpoint address does not parse"
                );
                continue;
            };
            out.push(Facts {
                ipv6,
                ipv4,
                has_check: manifest
                    .workloads
                    .get(&endpoint.workload)
                    .is_some_and(|w| w.health.is_some()),
                scope: scope.clone(),
                endpoint: endpoint.clone(),
                instances: instances
                    .iter()
                    .filter(|i| i.workload == endpoint.workload)
                    .cloned()
                    .collect(),
                release_id: release.id.clone(),
                per_connection: per_connection(&endpoint.workload),
                listeners: listeners
                    .iter()
                    .filter(|l| l.workload == endpoint.workload)
                    .cloned()
                    .collect(),
                row,
            });
        }
    }
    Ok(out)
}

/// Why an instance takes no new connections (`None`: it does).
fn out_of_rotation(i: &InstanceRow, has_check: bool, node: Option<&NodeRow>) -> Option<String> {
    if i.goal != "run" {
        return Some("leaving: open connections drain, no new ones".into());
    }
    if i.state != "running" {
        return Some(format!("{}, not running", i.state));
    }
    match (node, i.healthy()) {
        (None, _) => Some("not placed".into()),
        (Some(n), _) if n.state != "online" => Some(format!("node {} is {}", n.name, n.state)),
        (_, Some(false)) => Some("failing its health check".into()),
        (_, None) if has_check => Some("health not checked yet".into()),
        _ => None,
    }
}

/// Why a listener takes no new connections (`None`: it does).
fn listener_out(l: &ListenerRow, current: &str, node: Option<&NodeRow>) -> Option<String> {
    if l.release_id != current {
        return Some("leaving: an earlier release; open connections drain, no new ones".into());
    }
    match (l.state.as_str(), node) {
        ("listening", Some(n)) if n.state == "online" => None,
        ("listening", Some(n)) => Some(format!("node {} is {}", n.name, n.state)),
        ("listening", None) => Some("its node is gone".into()),
        ("failed", _) => Some(format!(
            "could not start: {}",
            l.message.as_deref().unwrap_or("no details")
        )),
        (state, _) => Some(format!("{state}, not listening yet")),
    }
}

/// Where the ingress connects for `i`: its private address and the
/// endpoint's internal port; a loopback address (a node without
/// namespaces) keeps the port the node gave the instance.
fn backend_address(i: &InstanceRow, internal_port: u16) -> Option<SocketAddr> {
    address_with_port(i.address.as_deref(), internal_port)
}

/// An instance's or listener's reported address with the endpoint's
/// internal port, or as it is when it is a loopback `ip:port`.
fn address_with_port(address: Option<&str>, internal_port: u16) -> Option<SocketAddr> {
    let a = address?;
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Some(if sa.ip().is_loopback() {
            sa
        } else {
            SocketAddr::new(sa.ip(), internal_port)
        });
    }
    let ip: IpAddr = a.trim_matches(['[', ']']).parse().ok()?;
    Some(SocketAddr::new(ip, internal_port))
}

fn reach(node: Option<&NodeRow>) -> Reach {
    match node {
        Some(n) if n.behind_nat != 0 => Reach::Tunnel,
        _ => Reach::Direct,
    }
}

/// The whole routing table.
pub async fn table(store: &Store, pools: &Addressing) -> Result<RoutingTable> {
    let nodes: BTreeMap<String, NodeRow> = store
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.id.clone(), n))
        .collect();
    let mut endpoints = Vec::new();
    for f in facts(store, None, true).await? {
        let mut backends: Vec<Backend> = f
            .instances
            .iter()
            .filter_map(|i| {
                let node = i.node_id.as_ref().and_then(|n| nodes.get(n));
                if out_of_rotation(i, f.has_check, node).is_some() {
                    return None;
                }
                let node = node?;
                Some(Backend {
                    instance: i.id.clone(),
                    node: node.id.clone(),
                    node_name: node.name.clone(),
                    address: backend_address(i, f.endpoint.internal_port)?,
                    reach: reach(Some(node)),
                })
            })
            .collect();
        if f.per_connection {
            backends.extend(f.listeners.iter().filter_map(|l| {
                let node = nodes.get(&l.node_id);
                if listener_out(l, &f.release_id, node).is_some() {
                    return None;
                }
                let node = node?;
                Some(Backend {
                    instance: l.id.clone(),
                    node: node.id.clone(),
                    node_name: node.name.clone(),
                    address: address_with_port(l.address.as_deref(), f.endpoint.internal_port)?,
                    reach: reach(Some(node)),
                })
            }));
        }
        endpoints.push(Route {
            id: f.row.id.clone(),
            name: f.endpoint.name.clone(),
            org: f.scope.org.clone(),
            app: f.scope.app.clone(),
            env: f.scope.env.clone(),
            workload: f.endpoint.workload.clone(),
            ipv6: f.ipv6,
            ipv4: f.ipv4,
            ports: f.endpoint.ports.clone(),
            internal_port: f.endpoint.internal_port,
            proxy_protocol: f.endpoint.proxy_protocol,
            limits: f.endpoint.limits,
            backends,
        });
    }
    let (ipv6_prefix, ipv4_pool) = pools.routed();
    let mut t = RoutingTable {
        version: String::new(),
        ipv6_prefix,
        ipv4_pool,
        endpoints,
    };
    t.version = version(&t);
    Ok(t)
}

/// A digest of the table's content (every replica computes the same).
fn version(t: &RoutingTable) -> String {
    let json = serde_json::to_vec(&(&t.ipv6_prefix, &t.ipv4_pool, &t.endpoints))
        .expect("a routing table serialises");
    hex::encode(&Sha256::digest(&json)[..8])
}

/// `verge endpoints` (and with `detail`, `verge describe endpoint`) for `envs`.
pub async fn exposed(
    store: &Store,
    envs: &[String],
    pools: &Addressing,
    detail: bool,
) -> Result<Vec<ExposedEndpoint>> {
    let nodes: BTreeMap<String, NodeRow> = if detail {
        store
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect()
    } else {
        BTreeMap::new()
    };
    let ingresses: Vec<IngressState> = if detail {
        store
            .ingress_reports()
            .await?
            .into_iter()
            .filter_map(|r| {
                Some(IngressState {
                    report: serde_json::from_str(&r.report).ok()?,
                    seen_at: crate::time::rfc3339(r.seen_at),
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for f in facts(store, Some(envs), detail).await? {
        // Empty without `detail`: no instances were read.
        let mut backends: Vec<BackendState> = f
            .instances
            .iter()
            .map(|i| {
                let node = i.node_id.as_ref().and_then(|n| nodes.get(n));
                let reason = out_of_rotation(i, f.has_check, node);
                BackendState {
                    instance: i.id.clone(),
                    node: i.node_name.clone(),
                    address: backend_address(i, f.endpoint.internal_port).map(|a| a.to_string()),
                    state: i.state.clone(),
                    health: match i.healthy() {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "unchecked",
                    }
                    .into(),
                    in_rotation: reason.is_none(),
                    reason,
                    reach: reach(node),
                    listener: false,
                }
            })
            .collect();
        if f.per_connection {
            backends.extend(f.listeners.iter().map(|l| {
                let node = nodes.get(&l.node_id);
                let reason = listener_out(l, &f.release_id, node);
                BackendState {
                    instance: l.id.clone(),
                    node: l.node_name.clone(),
                    address: address_with_port(l.address.as_deref(), f.endpoint.internal_port)
                        .map(|a| a.to_string()),
                    state: l.state.clone(),
                    // The node watches its listener; there is no check.
                    health: "unchecked".into(),
                    in_rotation: reason.is_none(),
                    reason,
                    reach: reach(node),
                    listener: true,
                }
            }));
        }
        let listeners = ingresses
            .iter()
            .flat_map(|g| {
                g.report
                    .listeners
                    .iter()
                    .filter(|l| l.endpoint == f.row.id)
                    .map(|l| IngressListener {
                        ingress: g.report.name.clone(),
                        address: l.address,
                        error: l.error.clone(),
                        seen_at: g.seen_at.clone(),
                    })
            })
            .collect();
        out.push(ExposedEndpoint {
            name: f.endpoint.name.clone(),
            app: f.scope.app.clone(),
            env: f.scope.env.clone(),
            workload: f.endpoint.workload.clone(),
            ipv6: f.ipv6,
            ipv4: f.ipv4,
            ports: f.endpoint.ports.clone(),
            internal_port: f.endpoint.internal_port,
            proxy_protocol: f.endpoint.proxy_protocol,
            limits: f.endpoint.limits,
            loopback: pools.loopback(),
            backends,
            listeners,
        });
    }
    Ok(out)
}
