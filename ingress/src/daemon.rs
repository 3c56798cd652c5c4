//! `verge ingress` (and the ingress inside `verge dev`): the long-lived
//! tasks around a [`Server`].
//!
//! - `routing_watch`: streams the routing table from the control plane
//!   (`GET /v1/ingress/routes?watch=true`) and applies each new version.
//!   When the stream breaks, or carries nothing for three keep-alive
//!   periods, it reconnects with backoff; meanwhile the last table keeps
//!   serving.
//! - `ingress_report`: reports listeners and the table version to the
//!   control plane after each change and every keep-alive period.
//! - `quic_path`: learns where the cluster's QUIC endpoint is and sets up
//!   the path to nodes behind NAT.
//! - `ingress_metrics`: serves `/metrics` when asked to.
//! - `limits_housekeeping`: bounds the rate limiters' memory.
//!
//! All end when the shutdown token fires; open connections then get
//! [`IngressConfig::shutdown_grace`] to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::client::{Client, ClientError};
use verge_api::routing::{BindMode, IngressReport, KEEPALIVE_MS};

use crate::metrics::Metrics;
use crate::server::Server;
use crate::tunnel::Tunnel;

/// What `verge ingress` runs with.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// The control plane's URL.
    pub server: String,
    /// A cluster admin token.
    pub token: String,
    /// The CA that signs the control plane's HTTPS certificate, if private.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// How this ingress names itself in reports.
    pub name: String,
    /// The node ID this ingress runs beside: its instances are preferred.
    pub node: Option<String>,
    /// Where `/metrics` is served (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// How long open connections may go on after shutdown begins.
    pub shutdown_grace: Duration,
}

/// Why the ingress did not start.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the control plane refused this ingress: {0}")]
    Refused(String),
    #[error("cannot serve /metrics on {addr}: {source} (choose another --metrics-listen)")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running ingress.
#[derive(Debug)]
pub struct Started {
    pub server: Server,
    /// Where `/metrics` is served.
    pub metrics_addr: Option<SocketAddr>,
    /// Ends once every task ended and open connections finished.
    pub task: tokio::task::JoinHandle<()>,
}

/// Checks the token, starts the tasks and returns; they run until
/// `shutdown`.
pub async fn start(
    config: IngressConfig,
    shutdown: CancellationToken,
) -> Result<Started, IngressError> {
    let client = Client::new(
        &config.server,
        Some(&config.token),
        config.ca_cert_pem.as_deref(),
    )?;
    // A wrong or org-scoped token fails now, not in a retry loop; an
    // unreachable control plane is waited for by the watch.
    match client.routing_table().await {
        Err(ClientError::Api(d)) => return Err(IngressError::Refused(d.message)),
        Err(e) => tracing::warn!(error = %e, "the control plane is not reachable yet; will retry"),
        Ok(_) => {}
    }
    let metrics = Arc::new(Metrics::default());
    let server = Server::new(config.node.clone(), metrics.clone());
    let mut tasks = JoinSet::new();
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| IngressError::Metrics { addr, source })?;
            let bound = listener.local_addr().ok();
            tasks.spawn(
                serve_metrics(listener, metrics, shutdown.clone())
                    .instrument(tracing::info_span!("ingress_metrics")),
            );
            bound
        }
        None => None,
    };
    let (applied, _) = tokio::sync::watch::channel(Applied::default());
    let applied = Arc::new(applied);
    tasks.spawn(
        watch_routes(
            client.clone(),
            server.clone(),
            applied.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("routing_watch")),
    );
    tasks.spawn(
        report(
            client.clone(),
            config.name.clone(),
            server.clone(),
            applied,
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("ingress_report")),
    );
    tasks.spawn(
        quic_path(client, config.clone(), server.clone(), shutdown.clone())
            .instrument(tracing::info_span!("quic_path")),
    );
    let housekeeping = server.clone();
    let stop = shutdown.clone();
    tasks.spawn(
        async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => housekeeping.housekeeping(),
                    () = stop.cancelled() => return,
                }
            }
        }
        .instrument(tracing::info_span!("limits_housekeeping")),
    );
    let grace = config.shutdown_grace;
    let s = server.clone();
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        while tasks.join_next().await.is_some() {}
        s.shutdown(grace).await;
        tracing::info!("ingress stopped");
    });
    Ok(Started {
        server,
        metrics_addr,
        task,
    })
}

/// What the ingress serves now.
#[derive(Debug, Default, Clone)]
struct Applied {
    version: String,
    mode: Option<BindMode>,
}

async fn watch_routes(
    client: Client,
    server: Server,
    applied: Arc<tokio::sync::watch::Sender<Applied>>,
    shutdown: CancellationToken,
) {
    let silence = Duration::from_millis(3 * KEEPALIVE_MS);
    let mut backoff = Duration::from_millis(250);
    loop {
        let stream = tokio::select! {
            s = client.watch_routing_table() => s,
            () = shutdown.cancelled() => return,
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the routing table; serving the last one");
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!("watching the routing table");
        loop {
            let line = tokio::select! {
                l = tokio::time::timeout(silence, stream.next_line()) => l,
                () = shutdown.cancelled() => return,
            };
            let line = match line {
                Err(_) => {
                    tracing::warn!("the routing table stream went silent; reconnecting");
                    break;
                }
                Ok(None) => {
                    tracing::warn!(
                        "the control plane ended the routing table stream; reconnecting"
                    );
                    break;
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "the routing table stream broke; reconnecting");
                    break;
                }
                Ok(Some(Ok(line))) if line.is_empty() => continue,
                Ok(Some(Ok(line))) => line,
            };
            backoff = Duration::from_millis(250);
            let table: verge_api::routing::RoutingTable = match serde_json::from_slice(&line) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "a routing table this ingress does not understand; keeping the last one");
                    continue;
                }
            };
            if applied.borrow().version == table.version {
                continue;
            }
            let mode = server.apply(&table).await;
            tracing::info!(
                version = table.version,
                endpoints = table.endpoints.len(),
                "routing table applied"
            );
            applied.send_replace(Applied {
                version: table.version.clone(),
                mode: Some(mode),
            });
        }
        if !pause(&mut backoff, &shutdown).await {
            return;
        }
    }
}

/// Sleeps `backoff` with full jitter, doubling it up to 10 s; false on shutdown.
async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let wait = rand::rng().random_range(Duration::ZERO..=*backoff);
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = shutdown.cancelled() => false,
    }
}

async fn report(
    client: Client,
    name: String,
    server: Server,
    applied: Arc<tokio::sync::watch::Sender<Applied>>,
    shutdown: CancellationToken,
) {
    let mut changes = applied.subscribe();
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(KEEPALIVE_MS)) => {}
            () = shutdown.cancelled() => return,
        }
        let applied = changes.borrow_and_update().clone();
        let Some(mode) = applied.mode else {
            continue;
        };
        let r = IngressReport {
            name: name.clone(),
            version: applied.version,
            mode,
            listeners: server.listeners(),
        };
        if let Err(e) = client.report_ingress(&r).await {
            tracing::debug!(error = %e, "reporting to the control plane failed; will retry");
        }
    }
}

async fn quic_path(
    client: Client,
    config: IngressConfig,
    server: Server,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let info = tokio::select! {
            i = client.ingress_cluster() => i,
            () = shutdown.cancelled() => return,
        };
        match info.map_err(|e| e.to_string()).and_then(|mut info| {
            info.quic = reachable(&info.quic, &config.server);
            Tunnel::new(info, config.token.clone(), config.name.clone()).map_err(|e| e.to_string())
        }) {
            Ok(t) => {
                server.set_tunnel(t);
                tracing::info!("QUIC path to nodes behind NAT ready");
                return;
            }
            Err(e) => {
                tracing::warn!(error = e, "QUIC path not ready; will retry");
                if !pause(&mut backoff, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// The QUIC endpoint's address as this ingress can dial it: a control
/// plane that listens on every address (`[::]:7070`, no `--cluster-advertise`)
/// is dialled at the host of its HTTP URL instead.
fn reachable(quic: &str, server: &str) -> String {
    let Ok(addr) = quic.parse::<SocketAddr>() else {
        return quic.to_string();
    };
    if !addr.ip().is_unspecified() {
        return quic.to_string();
    }
    let host = reqwest::Url::parse(server)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string));
    match host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{}", addr.port()),
        Some(h) => format!("{h}:{}", addr.port()),
        None => quic.to_string(),
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "the metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unspecified_quic_address_takes_the_server_host() {
        use super::reachable;
        assert_eq!(
            reachable("[::]:7000", "http://127.0.0.1:7070"),
            "127.0.0.1:7000"
        );
        assert_eq!(
            reachable("0.0.0.0:7000", "https://[fd00::1]:443/"),
            "[fd00::1]:7000"
        );
        assert_eq!(
            reachable("10.0.0.5:7000", "http://127.0.0.1:7070"),
            "10.0.0.5:7000"
        );
        assert_eq!(
            reachable("cp.example:7000", "http://127.0.0.1:7070"),
            "cp.example:7000"
        );
    }
}
