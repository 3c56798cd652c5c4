//! The cluster side of the control plane: the cluster CA ([`ca`]), the QUIC
//! endpoint nodes join and keep their sessions on ([`join`], [`session`]),
//! and the loops that watch liveness and keep placements converged.
//!
//! Long-lived tasks, each named and stopped by the shutdown token:
//! - `cluster_endpoint`: accepts QUIC connections, one task per connection:
//!   joins, node sessions, and ingresses' tunnels ([`tunnel`]);
//! - `node_liveness`: marks nodes offline after the grace period;
//! - `reconciler`: runs [`crate::reconcile`] over every env when poked
//!   (deploy, rollback, scale, drain, node online/offline) and every
//!   [`FULL_PASS`]; over the envs that changed (instance reports) and
//!   those with an active rollout on every [`TICK`].
//!
//! It must not hold desired state of its own: everything lives in the
//! store, so any replica can serve any node.

pub mod ca;
mod join;
mod listeners;
mod session;
mod tunnel;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::wire::{ALPN_INGRESS, ALPN_JOIN, ALPN_NODE};

use crate::secrets::Keyring;
use crate::store::Store;
use crate::time::now_ms;
pub use ca::{CaError, ClusterCa};
pub use join::Minted;

/// What the cluster endpoint is configured with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub instance_prefix: ipnet::Ipv6Net,
    pub heartbeat: Duration,
    pub offline_after: Duration,
    /// How long a node stays offline before its instances are replaced.
    pub reschedule_after: Duration,
    /// Where endpoint addresses come from.
    pub addressing: crate::endpoints::Addressing,
}

/// Why the cluster endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cluster endpoint tls: {0}")]
    Tls(String),
    #[error(
        "cannot listen for nodes on udp {addr}: {source} (is another control plane running? set --cluster-listen)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Streams an ingress may have open at once (one per client connection).
const MAX_TUNNELS: u32 = 10_000;

/// How often the reconciler looks at envs with an active rollout.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the reconciler looks at every env.
pub const FULL_PASS: Duration = Duration::from_secs(5);

/// A handle on the cluster side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// Opens the secret bundle versions releases pin, for desired sets.
    keyring: Arc<Keyring>,
    ca: ClusterCa,
    config: ClusterConfig,
    local_addr: SocketAddr,
    /// Poked when placements may need to change.
    poke: Notify,
    /// The next pass covers every env.
    full: AtomicBool,
    /// Envs the next pass covers (changed since the last one).
    dirty: Mutex<BTreeSet<String>>,
    /// Bumped after the reconciler changed some node's desired set.
    desired: watch::Sender<u64>,
    /// The live session of each node connected to this replica, where
    /// ingresses' tunnels go.
    sessions: tunnel::Sessions,
}

impl Cluster {
    /// Loads (or on first start makes) the cluster CA, binds the QUIC
    /// endpoint and starts the cluster's tasks; they end when `shutdown` fires.
    pub async fn start(
        store: Store,
        keyring: Arc<Keyring>,
        config: ClusterConfig,
        shutdown: CancellationToken,
    ) -> Result<(Cluster, tokio::task::JoinHandle<()>), ClusterError> {
        let ca = ClusterCa::load_or_create(&store, &keyring).await?;
        let endpoint = endpoint(&ca, config.listen)?;
        let local_addr = endpoint.local_addr().map_err(|source| ClusterError::Bind {
            addr: config.listen,
            source,
        })?;
        let cluster = Cluster {
            inner: Arc::new(Inner {
                store,
                keyring,
                ca,
                config,
                local_addr,
                poke: Notify::new(),
                full: AtomicBool::new(true),
                dirty: Mutex::new(BTreeSet::new()),
                desired: watch::Sender::new(0),
                sessions: tunnel::Sessions::default(),
            }),
        };
        tracing::info!(addr = %local_addr, ca = cluster.ca_sha256(), "cluster endpoint listening");
        if local_addr.ip().is_unspecified() && cluster.inner.config.advertise.is_none() {
            tracing::warn!(
                addr = %local_addr,
                "the cluster endpoint listens on every address, so `verge nodes join-token` prints {local_addr}: \
                 set --cluster-advertise HOST:PORT to the address nodes dial"
            );
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(
            cluster
                .clone()
                .accept_loop(endpoint, shutdown.clone())
                .instrument(tracing::info_span!("cluster_endpoint")),
        );
        tasks.spawn(
            cluster
                .clone()
                .liveness_loop(shutdown.clone())
                .instrument(tracing::info_span!("node_liveness")),
        );
        tasks.spawn(
            cluster
                .clone()
                .reconcile_loop(shutdown)
                .instrument(tracing::info_span!("reconciler")),
        );
        let done = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        Ok((cluster, done))
    }

    /// The SHA-256 of the cluster CA certificate (what join tokens pin).
    pub fn ca_sha256(&self) -> &str {
        self.inner.ca.sha256()
    }

    /// The `host:port` nodes should dial.
    pub fn advertise(&self) -> String {
        self.inner
            .config
            .advertise
            .clone()
            .unwrap_or_else(|| self.inner.local_addr.to_string())
    }

    /// Where and how an ingress reaches the cluster endpoint for tunnels
    /// (`GET /v1/ingress/cluster`).
    pub fn quic_info(&self) -> verge_api::routing::ClusterInfo {
        verge_api::routing::ClusterInfo {
            quic: self.advertise(),
            ca_pem: self.inner.ca.cert_pem().to_string(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn offline_after(&self) -> Duration {
        self.inner.config.offline_after
    }

    /// Asks the reconciler to run over every env now (desired state or
    /// the cluster changed).
    pub fn poke(&self) {
        self.inner.full.store(true, Ordering::Relaxed);
        self.inner.poke.notify_one();
    }

    /// Asks the reconciler to look at one env now (its instances changed).
    pub fn poke_env(&self, env_id: &str) {
        self.inner
            .dirty
            .lock()
            .expect("not poisoned")
            .insert(env_id.to_string());
        self.inner.poke.notify_one();
    }

    /// What the reconciler works with.
    pub fn settings(&self) -> crate::reconcile::Settings {
        crate::reconcile::Settings {
            reschedule_after_ms: self.inner.config.reschedule_after.as_millis() as i64,
            addressing: self.inner.config.addressing,
        }
    }

    /// Where endpoint addresses come from.
    pub fn addressing(&self) -> crate::endpoints::Addressing {
        self.inner.config.addressing
    }

    async fn accept_loop(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut conns = JoinSet::new();
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
                () = shutdown.cancelled() => break,
            };
            let peer = incoming.remote_address();
            let cluster = self.clone();
            let stop = shutdown.clone();
            conns.spawn(
                async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::info!(error = %e, "node connection failed during handshake");
                            return;
                        }
                    };
                    match alpn(&conn).as_deref() {
                        Some(ALPN_JOIN) => cluster.join(conn).await,
                        Some(ALPN_NODE) => cluster.session(conn, stop).await,
                        Some(ALPN_INGRESS) => cluster.ingress(conn, stop).await,
                        other => {
                            tracing::info!(alpn = ?other, "unknown protocol; closing");
                            conn.close(1u32.into(), b"unknown protocol");
                        }
                    }
                }
                .instrument(tracing::info_span!("node_conn", %peer)),
            );
            while conns.try_join_next().is_some() {}
        }
        endpoint.close(0u32.into(), b"control plane shutting down");
        while conns.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("cluster endpoint closed");
    }

    async fn liveness_loop(self, shutdown: CancellationToken) {
        let tick = (self.inner.config.offline_after / 6).max(Duration::from_millis(200));
        // After a restart, nodes last seen before it are as silent as the
        // outage was long: give them the time their reconnect backoff may
        // take (and the grace) before calling them offline, or a restart
        // would empty the routing table of instances that never stopped
        // serving. Nodes seen since the start get the usual grace.
        let started_ms = now_ms();
        let settle_ms = (self.inner.config.offline_after.as_millis() as i64)
            .max(verge_api::wire::RECONNECT_MAX_MS as i64);
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = shutdown.cancelled() => return,
            }
            let now = now_ms();
            let seen_since = if now - started_ms < settle_ms {
                started_ms
            } else {
                i64::MIN
            };
            let cutoff = now - self.inner.config.offline_after.as_millis() as i64;
            match self.inner.store.mark_lost_nodes(cutoff, seen_since).await {
                Ok(lost) if !lost.is_empty() => {
                    for n in &lost {
                        tracing::warn!(node = %n.id, name = %n.name, "node offline");
                    }
                    self.poke();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checking node liveness failed"),
            }
        }
    }

    async fn reconcile_loop(self, shutdown: CancellationToken) {
        let mut active: BTreeSet<String> = BTreeSet::new();
        let mut last_full = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = self.inner.poke.notified() => {}
                () = tokio::time::sleep(TICK) => {}
                () = shutdown.cancelled() => return,
            }
            let full =
                self.inner.full.swap(false, Ordering::Relaxed) || last_full.elapsed() >= FULL_PASS;
            let dirty = std::mem::take(&mut *self.inner.dirty.lock().expect("not poisoned"));
            let store = &self.inner.store;
            let result = if full {
                last_full = tokio::time::Instant::now();
                crate::reconcile::reconcile_all(store, self.settings()).await
            } else {
                let envs: Vec<String> = dirty.union(&active).cloned().collect();
                async {
                    let mut view = crate::reconcile::ClusterView::read(store).await?;
                    crate::reconcile::reconcile_envs(store, &envs, &mut view, self.settings()).await
                }
                .await
            };
            match result {
                Ok(pass) => {
                    if !pass.changed.is_empty() {
                        tracing::debug!(nodes = ?pass.changed, "desired sets changed");
                        self.inner.desired.send_modify(|n| *n += 1);
                    }
                    // Every env that was active took part in this pass.
                    active = pass.active.into_iter().collect();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconciling failed; will retry");
                    self.inner.full.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The QUIC endpoint: TLS 1.3 with the CA-signed server certificate; client
/// certificates are verified against the CA when presented (joined nodes)
/// and optional (joining nodes and ingresses, told apart by ALPN and checked
/// by the session, or by the ingress's admin token).
fn endpoint(ca: &ClusterCa, listen: SocketAddr) -> Result<quinn::Endpoint, ClusterError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    let (certs, key) = ca.server_identity()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![
        ALPN_JOIN.to_vec(),
        ALPN_NODE.to_vec(),
        ALPN_INGRESS.to_vec(),
    ];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ClusterError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30s is a valid idle timeout"),
        ))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        // An ingress opens one stream per client connection.
        .max_concurrent_bidi_streams(MAX_TUNNELS.into());
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::server(server, listen).map_err(|source| ClusterError::Bind {
        addr: listen,
        source,
    })
}
