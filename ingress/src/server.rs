//! The ingress proper: applies routing tables to listening sockets and
//! serves each accepted connection.
//!
//! Applying a table ([`Server::apply`]) makes endpoint addresses bindable
//! (a `local` route for the table's prefixes, [`crate::net`]), opens a
//! listener per endpoint address and port that has none, closes those no
//! longer listed, and hands each endpoint's backends and limits to its
//! [`Pool`] and [`Gate`]. Established connections are never touched by a
//! table change: they hold their endpoint and backend lease, and end on
//! their own, at their idle timeout, or when their backend's drain
//! timeout passes after it left the table.
//!
//! A connection ([`serve`]) is admitted by the endpoint's gate (max
//! connections, per-source rate), then connected to a backend chosen by
//! the pool; a failed connect is retried on another backend (up to
//! [`CONNECT_TRIES`]) before any client byte was read, so none is lost.
//! Then the PROXY v2 header (when the endpoint asks for it) and the bytes
//! both ways: zero-copy between TCP sockets, buffered through a QUIC
//! stream for nodes behind NAT.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use verge_api::manifest::ProxyProtocol;
use verge_api::routing::{BindMode, Listener, Reach, Route, RoutingTable};
use verge_api::wire::TunnelOpen;

use crate::balance::{Lease, Pool};
use crate::limits::{Gate, Rejected};
use crate::metrics::{EndpointMetrics, Metrics};
use crate::net::LocalRoutes;
use crate::proxy::{self, Relay};
use crate::tunnel::Tunnel;

/// Backends tried for one connection before it is closed.
pub const CONNECT_TRIES: usize = 3;
/// How long one backend connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The ingress's sockets and endpoints; cheap to clone.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    local_node: Option<String>,
    metrics: Arc<Metrics>,
    /// The QUIC path to nodes behind NAT, once known.
    tunnel: RwLock<Option<Tunnel>>,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    listeners: Mutex<HashMap<SocketAddr, Listening>>,
    routes: tokio::sync::Mutex<Routes>,
    /// Cancelled when the ingress stops accepting.
    closing: CancellationToken,
    /// Cancelled when open connections must end too.
    stopping: CancellationToken,
    conns: TaskTracker,
}

/// The `local` routes the ingress added, and for which prefixes.
#[derive(Default)]
struct Routes {
    prefixes: Option<(Option<Ipv6Net>, Option<Ipv4Net>)>,
    added: Option<LocalRoutes>,
    /// Why the routes could not be added (listeners in them are not opened).
    error: Option<String>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("prefixes", &self.prefixes)
            .field("added", &self.added.is_some())
            .field("error", &self.error)
            .finish()
    }
}

/// One endpoint as the ingress serves it.
#[derive(Debug)]
struct Endpoint {
    route: RwLock<Arc<Route>>,
    pool: Pool,
    gate: Gate,
    metrics: Arc<EndpointMetrics>,
}

#[derive(Debug)]
struct Listening {
    endpoint: String,
    stop: CancellationToken,
    error: Option<String>,
}

impl Server {
    /// A server with no endpoints; `local_node` is the node ID whose
    /// instances it prefers.
    pub fn new(local_node: Option<String>, metrics: Arc<Metrics>) -> Server {
        Server {
            inner: Arc::new(Inner {
                local_node,
                metrics,
                tunnel: RwLock::new(None),
                endpoints: Mutex::new(HashMap::new()),
                listeners: Mutex::new(HashMap::new()),
                routes: tokio::sync::Mutex::new(Routes::default()),
                closing: CancellationToken::new(),
                stopping: CancellationToken::new(),
                conns: TaskTracker::new(),
            }),
        }
    }

    /// Sets the QUIC path used for backends with [`Reach::Tunnel`].
    pub fn set_tunnel(&self, tunnel: Tunnel) {
        *self.inner.tunnel.write().expect("not poisoned") = Some(tunnel);
    }

    /// Applies `table`: routes, endpoints, listeners. Returns how endpoint
    /// addresses are bound.
    pub async fn apply(&self, table: &RoutingTable) -> BindMode {
        let (mode, route_error) = self.apply_routes(table).await;
        let mut wanted: HashMap<SocketAddr, String> = HashMap::new();
        {
            let mut endpoints = self.inner.endpoints.lock().expect("not poisoned");
            for r in &table.endpoints {
                let drain = Duration::from_millis(r.limits.drain_timeout_ms);
                let ep = endpoints.entry(r.id.clone()).or_insert_with(|| {
                    Arc::new(Endpoint {
                        route: RwLock::new(Arc::new(r.clone())),
                        pool: Pool::new(self.inner.local_node.clone()),
                        gate: Gate::new(&r.limits),
                        metrics: self
                            .inner
                            .metrics
                            .endpoint(&format!("{}/{}/{}/{}", r.org, r.app, r.env, r.name)),
                    })
                });
                *ep.route.write().expect("not poisoned") = Arc::new(r.clone());
                ep.pool.update(&r.backends, drain);
                ep.gate.update(&r.limits);
                let ips = std::iter::once(IpAddr::V6(r.ipv6)).chain(r.ipv4.map(IpAddr::V4));
                for ip in ips {
                    for &port in &r.ports {
                        wanted.insert(SocketAddr::new(ip, port), r.id.clone());
                    }
                }
            }
            // Endpoints gone from the table: their open connections drain.
            let listed: HashSet<&str> = table.endpoints.iter().map(|r| r.id.as_str()).collect();
            endpoints.retain(|id, ep| {
                let keep = listed.contains(id.as_str());
                if !keep {
                    let drain = ep
                        .route
                        .read()
                        .expect("not poisoned")
                        .limits
                        .drain_timeout_ms;
                    ep.pool.update(&[], Duration::from_millis(drain));
                }
                keep
            });
        }
        let routed = |ip: IpAddr| match ip {
            IpAddr::V6(a) => table.ipv6_prefix.is_some_and(|p| p.contains(&a)),
            IpAddr::V4(a) => table.ipv4_pool.is_some_and(|p| p.contains(&a)),
        };
        let mut listeners = self.inner.listeners.lock().expect("not poisoned");
        listeners.retain(|addr, l| {
            let keep = wanted.get(addr) == Some(&l.endpoint) && l.error.is_none();
            if !keep {
                l.stop.cancel();
            }
            keep
        });
        for (addr, endpoint) in wanted {
            if listeners.contains_key(&addr) {
                continue;
            }
            let error = match (&route_error, routed(addr.ip())) {
                (Some(e), true) => Some(e.clone()),
                _ => match crate::net::listen(addr) {
                    Ok(l) => {
                        let stop = self.inner.closing.child_token();
                        self.spawn_accept(l, addr, endpoint.clone(), stop.clone());
                        listeners.insert(
                            addr,
                            Listening {
                                endpoint,
                                stop,
                                error: None,
                            },
                        );
                        continue;
                    }
                    Err(e) => Some(format!("cannot listen on {addr}: {e}")),
                },
            };
            tracing::warn!(%addr, error = error.as_deref(), "endpoint not listening");
            listeners.insert(
                addr,
                Listening {
                    endpoint,
                    stop: CancellationToken::new(),
                    error,
                },
            );
        }
        mode
    }

    /// Adds `local` routes for the table's prefixes when they changed;
    /// returns the bind mode, and why the routes are missing if they are.
    async fn apply_routes(&self, table: &RoutingTable) -> (BindMode, Option<String>) {
        let prefixes = (table.ipv6_prefix, table.ipv4_pool);
        let mode = if prefixes == (None, None) {
            BindMode::Loopback
        } else {
            BindMode::LocalRoute
        };
        let mut routes = self.inner.routes.lock().await;
        if routes.prefixes == Some(prefixes) {
            return (mode, routes.error.clone());
        }
        if let Some(old) = routes.added.take()
            && let Err(e) = old.remove().await
        {
            tracing::warn!(error = %e, "removing the old local routes failed");
        }
        routes.prefixes = Some(prefixes);
        routes.error = None;
        if prefixes != (None, None) {
            match crate::net::add_local_routes(prefixes.0, prefixes.1).await {
                Ok(added) => {
                    tracing::info!(v6 = ?prefixes.0, v4 = ?prefixes.1, "endpoint prefixes bindable");
                    routes.added = Some(added);
                }
                Err(e) => {
                    tracing::error!(error = %e, "endpoint addresses cannot be made bindable");
                    routes.error = Some(e.to_string());
                }
            }
        }
        (mode, routes.error.clone())
    }

    /// Every listener and why it is not listening, for reports.
    pub fn listeners(&self) -> Vec<Listener> {
        let listeners = self.inner.listeners.lock().expect("not poisoned");
        let mut out: Vec<Listener> = listeners
            .iter()
            .map(|(addr, l)| Listener {
                endpoint: l.endpoint.clone(),
                address: *addr,
                error: l.error.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.endpoint, a.address).cmp(&(&b.endpoint, b.address)));
        out
    }

    /// Connections open now, over every endpoint.
    pub fn active(&self) -> u64 {
        let endpoints = self.inner.endpoints.lock().expect("not poisoned");
        endpoints.values().map(|e| e.gate.active()).sum()
    }

    /// Once a second: bounds the rate limiters' memory.
    pub fn housekeeping(&self) {
        let endpoints: Vec<Arc<Endpoint>> = {
            let endpoints = self.inner.endpoints.lock().expect("not poisoned");
            endpoints.values().cloned().collect()
        };
        for e in endpoints {
            e.gate.housekeeping();
        }
    }

    /// Stops accepting, lets open connections finish for up to `grace`,
    /// ends the rest, and removes the routes it added.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.closing.cancel();
        self.inner.conns.close();
        if tokio::time::timeout(grace, self.inner.conns.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.active(),
                "ending connections still open after the grace"
            );
            self.inner.stopping.cancel();
            self.inner.conns.wait().await;
        }
        let mut routes = self.inner.routes.lock().await;
        if let Some(added) = routes.added.take()
            && let Err(e) = added.remove().await
        {
            tracing::warn!(error = %e, "removing local routes failed");
        }
    }

    fn spawn_accept(
        &self,
        listener: TcpListener,
        addr: SocketAddr,
        endpoint: String,
        stop: CancellationToken,
    ) {
        let server = self.clone();
        tokio::spawn(
            async move {
                tracing::info!("listening");
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        () = stop.cancelled() => break,
                    };
                    match accepted {
                        Ok((stream, peer)) => server.accepted(stream, peer, addr, &endpoint),
                        Err(e) => {
                            // Out of file descriptors and the like: back off.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                tracing::info!("stopped listening");
            }
            .instrument(tracing::info_span!("listener", %addr)),
        );
    }

    fn accepted(&self, stream: TcpStream, peer: SocketAddr, local: SocketAddr, endpoint: &str) {
        let ep = self
            .inner
            .endpoints
            .lock()
            .expect("not poisoned")
            .get(endpoint)
            .cloned();
        let Some(ep) = ep else {
            return; // Removed between accept and now: the close is the answer.
        };
        let inner = self.inner.clone();
        self.inner.conns.spawn(async move {
            serve(&inner, &ep, stream, peer, local).await;
        });
    }
}

/// Serves one client connection to its end.
async fn serve(
    inner: &Inner,
    ep: &Endpoint,
    client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let m = &ep.metrics;
    let _admitted = match ep.gate.admit(peer.ip()) {
        Ok(a) => a,
        Err(why) => {
            match why {
                Rejected::MaxConnections { .. } => m.rejected_max.inc(),
                Rejected::RateLimited { .. } => m.rejected_rate.inc(),
            };
            tracing::debug!(%peer, %why, "connection refused");
            close(client).await;
            return;
        }
    };
    m.total.inc();
    m.active.inc();
    let _active = scopeguard(&m.active);
    let route = ep.route.read().expect("not poisoned").clone();
    let Some((lease, backend)) = connect_some(inner, ep, &route).await else {
        m.rejected_backend.inc();
        tracing::info!(%peer, endpoint = route.name, "no backend could be reached: closing");
        close(client).await;
        return;
    };
    let _ = client.set_nodelay(true);
    let preface = match route.proxy_protocol {
        Some(ProxyProtocol::V2) => crate::proxy_protocol::v2_header(peer, local),
        None => Vec::new(),
    };
    let stop = CancellationToken::new();
    let opts = Relay {
        idle_timeout: Duration::from_millis(route.limits.idle_timeout_ms),
        stop: stop.clone(),
    };
    let drained = lease.drained();
    let relay = async {
        match backend {
            Conn::Tcp(b) => proxy::relay_tcp(client, b, &preface, &opts, &m.meter).await,
            Conn::Tunnel(b) => proxy::relay(client, b, &preface, &opts, &m.meter).await,
        }
    };
    tokio::pin!(relay);
    let result = tokio::select! {
        r = &mut relay => r,
        () = drained.cancelled() => { stop.cancel(); relay.await }
        () = inner.stopping.cancelled() => { stop.cancel(); relay.await }
    };
    match result {
        Ok(c) => tracing::debug!(
            %peer,
            instance = lease.backend().instance,
            to_backend = c.to_backend,
            to_client = c.to_client,
            ended = ?c.ended,
            "connection ended"
        ),
        Err(e) => tracing::debug!(%peer, error = %e, "connection failed"),
    }
}

/// A connected backend.
enum Conn {
    Tcp(TcpStream),
    Tunnel(crate::tunnel::TunnelStream),
}

/// Connects to a backend, trying others after a failure.
async fn connect_some(inner: &Inner, ep: &Endpoint, route: &Route) -> Option<(Lease, Conn)> {
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..CONNECT_TRIES {
        let names: Vec<&str> = tried.iter().map(String::as_str).collect();
        let lease = ep.pool.pick(&names)?;
        tried.push(lease.backend().instance.clone());
        let started = Instant::now();
        match connect(inner, route, &lease).await {
            Ok(conn) => {
                lease.connected();
                ep.metrics
                    .connect_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Some((lease, conn));
            }
            Err(e) => {
                lease.failed();
                ep.metrics.connect_errors.inc();
                tracing::info!(
                    instance = lease.backend().instance,
                    address = %lease.backend().address,
                    error = e,
                    "backend connect failed; trying another"
                );
            }
        }
    }
    None
}

async fn connect(inner: &Inner, route: &Route, lease: &Lease) -> Result<Conn, String> {
    let b = lease.backend();
    match b.reach {
        Reach::Direct => {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(b.address))
                .await
                .map_err(|_| format!("timed out after {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            Ok(Conn::Tcp(s))
        }
        Reach::Tunnel => {
            let tunnel = inner.tunnel.read().expect("not poisoned").clone();
            let Some(tunnel) = tunnel else {
                return Err(format!(
                    "node {} is behind NAT and the QUIC path to the control plane is not up yet",
                    b.node_name
                ));
            };
            let open = TunnelOpen {
                instance: b.instance.clone(),
                node: b.node.clone(),
                port: route.internal_port,
            };
            tokio::time::timeout(CONNECT_TIMEOUT, tunnel.open(&open))
                .await
                .map_err(|_| format!("timed out after {CONNECT_TIMEOUT:?}"))?
                .map(Conn::Tunnel)
                .map_err(|e| e.to_string())
        }
    }
}

/// Closes a connection the ingress will not serve: a FIN, not a hang.
async fn close(mut client: TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let _ = client.shutdown().await;
}

/// Decrements `gauge` when dropped.
fn scopeguard(gauge: &prometheus_client::metrics::gauge::Gauge) -> impl Drop + '_ {
    struct Dec<'a>(&'a prometheus_client::metrics::gauge::Gauge);
    impl Drop for Dec<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Dec(gauge)
}
