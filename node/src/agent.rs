//! The node's connection to the control plane: join once, then keep a QUIC
//! session (mutual TLS) alive for as long as the daemon runs.
//!
//! A session sends `Hello` with every instance's current state, then
//! heartbeats (each followed by the listeners' reports), instance reports
//! and listener reports whenever a listener changes state; it receives desired sets and hands them
//! to the reconciler. Alongside, the control plane may open a stream per
//! client connection of an ingress ([`crate::tunnel`]), served while the
//! session lasts. When the connection drops, the agent reconnects with
//! exponential backoff and full jitter (0.5 s doubling up to 30 s, reset
//! after a session that lasted 30 s). Instances keep running meanwhile: the
//! reconciler works from the last desired set it received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::wire::io::{Reader, Writer};
use verge_api::wire::{
    Capacity, ControlMsg, InstanceReport, Isolation, JoinRequest, JoinResponse, JoinToken, NodeMsg,
};

use crate::host::Host;
use crate::identity::{Assigned, Identity, IdentityError};
use crate::reconcile::Reconciler;
use crate::{streams, tls};

/// Why the node could not join or connect.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "this node has not joined a cluster yet: pass --server HOST:PORT and --join-token TOKEN \
         (from `verge nodes join-token` on the control plane)"
    )]
    NotJoined,
    #[error(transparent)]
    BadToken(#[from] verge_api::wire::BadJoinToken),
    #[error("cannot resolve control plane address {server:?}: {why}")]
    Resolve { server: String, why: String },
    #[error("join refused by the control plane: {0}")]
    Refused(String),
    #[error("{0}")]
    CaMismatch(String),
    #[error("cannot reach the control plane at {server}: {why}")]
    Unreachable { server: String, why: String },
    #[error("tls: {0}")]
    Tls(String),
}

/// What the agent needs to join.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub server: Option<String>,
    pub token: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub isolation: Isolation,
}

/// `host:port` from `host:port` or `quic://host:port`, resolved.
pub async fn resolve(server: &str) -> Result<SocketAddr, AgentError> {
    let hostport = server
        .strip_prefix("quic://")
        .unwrap_or(server)
        .trim_end_matches('/');
    let err = |why: String| AgentError::Resolve {
        server: server.to_string(),
        why,
    };
    tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| err(format!("{e} (expected HOST:PORT of the cluster endpoint)")))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

fn client_endpoint(server: SocketAddr) -> Result<quinn::Endpoint, AgentError> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    quinn::Endpoint::client(bind).map_err(|e| AgentError::Unreachable {
        server: server.to_string(),
        why: format!("cannot open a UDP socket: {e}"),
    })
}

/// The saved identity, or a new one from joining with the token.
pub async fn identity(data_dir: &Path, p: &JoinParams) -> Result<Identity, AgentError> {
    if let Some(id) = Identity::load(data_dir)? {
        if p.token.is_some() {
            tracing::info!(node = %id.assigned.node_id, "already joined; --join-token is not needed any more");
        }
        return Ok(id);
    }
    let (Some(server), Some(token)) = (&p.server, &p.token) else {
        return Err(AgentError::NotJoined);
    };
    let token: JoinToken = token.parse()?;
    let key = rcgen::KeyPair::generate().map_err(|e| AgentError::Tls(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, p.name.clone());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    let request = JoinRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        csr_pem: csr,
        name: p.name.clone(),
        labels: p.labels.clone(),
        capacity: p.capacity,
        isolation: p.isolation,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let addr = resolve(server).await?;
    let endpoint = client_endpoint(addr)?;
    let (config, failure) = tls::join_config(&token.ca_sha256).map_err(AgentError::Tls)?;
    let unreachable = |why: String| AgentError::Unreachable {
        server: server.clone(),
        why,
    };
    let mut backoff = Backoff::default();
    let conn = loop {
        let attempt = endpoint
            .connect_with(config.clone(), addr, tls::SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(conn)) => break conn,
            Ok(Err(e)) => {
                if let Some(why) = failure.lock().expect("not poisoned").take() {
                    return Err(AgentError::CaMismatch(why));
                }
                if backoff.attempts >= 5 {
                    return Err(unreachable(e.to_string()));
                }
                tracing::warn!(error = %e, "join attempt failed; retrying");
            }
            Err(_) if backoff.attempts >= 5 => return Err(unreachable("timed out".into())),
            Err(_) => tracing::warn!("join attempt timed out; retrying"),
        }
        tokio::time::sleep(backoff.next()).await;
    };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut reader, mut writer) = (Reader::new(recv), Writer::new(send));
    writer
        .send(&request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let answer: JoinResponse = reader
        .next()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .ok_or_else(|| unreachable("the control plane closed the join without answering".into()))?;
    conn.close(0u32.into(), b"joined");
    let joined = match answer {
        JoinResponse::Refused { message } => return Err(AgentError::Refused(message)),
        JoinResponse::Accepted(j) => j,
    };
    let id = Identity::save(
        data_dir,
        Assigned {
            node_id: joined.node_id,
            name: joined.name,
            instance_prefix: joined.instance_prefix,
            server: server.clone(),
        },
        &key.serialize_pem(),
        &joined.cert_pem,
        &joined.ca_pem,
    )?;
    tracing::info!(node = %id.assigned.node_id, name = %id.assigned.name, prefix = %id.assigned.instance_prefix, "joined the cluster");
    Ok(id)
}

/// Exponential backoff with full jitter.
#[derive(Debug, Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_millis(verge_api::wire::RECONNECT_MAX_MS);

    fn next(&mut self) -> Duration {
        let cap = Self::BASE
            .saturating_mul(1 << self.attempts.min(16))
            .min(Self::MAX);
        self.attempts += 1;
        cap.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// The long-lived session loop.
#[derive(Debug)]
pub struct Agent {
    pub identity: Identity,
    /// Overrides the server saved at join (`--server` on a later start).
    pub server: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub isolation: Isolation,
    /// Sent in `Hello`: ingresses reach this node's instances through the session.
    pub behind_nat: bool,
    pub reconciler: Reconciler,
    pub reports: mpsc::Receiver<InstanceReport>,
    /// What serves the streams the control plane opens on the session.
    pub streams: streams::Streams,
}

impl Agent {
    /// Sends a heartbeat: the machine's usage and the volumes'; then the
    /// listeners with their counters.
    async fn heartbeat(
        &self,
        host: &mut Host,
        writer: &mut Writer<quinn::SendStream>,
    ) -> Result<(), String> {
        let mut usage = host.usage(self.reconciler.images_usage());
        let (volumes, volumes_free) = self.streams.volumes.report().await;
        usage.volumes_free = volumes_free;
        writer
            .send(&NodeMsg::Heartbeat {
                capacity: self.capacity,
                usage,
                volumes,
            })
            .await
            .map_err(|e| e.to_string())?;
        self.send_listeners(writer).await
    }

    /// Sends every listener's report (per-connection wasm workloads).
    async fn send_listeners(&self, writer: &mut Writer<quinn::SendStream>) -> Result<(), String> {
        let listeners = self.reconciler.listeners();
        writer
            .send(&NodeMsg::Listeners { listeners })
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs sessions until `shutdown`, reconnecting as needed.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut host = Host::default();
        loop {
            let started = Instant::now();
            match self.session(&mut host, &shutdown).await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => tracing::warn!("the control plane ended the session"),
                Err(e) => tracing::warn!(error = %e, "session with the control plane lost"),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let delay = backoff.next();
            tracing::info!(?delay, "reconnecting");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn session(
        &mut self,
        host: &mut Host,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let addr = resolve(&self.server).await.map_err(|e| e.to_string())?;
        let endpoint = client_endpoint(addr).map_err(|e| e.to_string())?;
        let config = tls::session_config(&self.identity)?;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            endpoint.connect_with(config, addr, tls::SERVER_NAME).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| match e {
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 2u32.into() => format!(
                "the control plane does not know this node's certificate (was it joined to another cluster, or the cluster reset?): \
                 move {} away and join again with a new token",
                "the data dir's identity/"
            ),
            e => e.to_string(),
        })?;
        // Streams the control plane opens (tunnels, logs, exec), for as
        // long as this session lasts (dropping the set ends them).
        let mut streams = JoinSet::new();
        streams.spawn(
            streams::serve(conn.clone(), self.streams.clone())
                .instrument(tracing::info_span!("streams")),
        );
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let (mut reader, mut writer) = (Reader::new(recv), Writer::new(send));
        // Reports queued while disconnected are older than the snapshot below.
        while self.reports.try_recv().is_ok() {}
        writer
            .send(&NodeMsg::Hello {
                version: env!("CARGO_PKG_VERSION").to_string(),
                labels: self.labels.clone(),
                capacity: self.capacity,
                isolation: self.isolation,
                applied_version: self.reconciler.applied_version(),
                instances: self.reconciler.snapshot(),
                behind_nat: self.behind_nat,
            })
            .await
            .map_err(|e| e.to_string())?;
        let heartbeat = match reader
            .next::<ControlMsg>()
            .await
            .map_err(|e| e.to_string())?
        {
            Some(ControlMsg::Welcome {
                heartbeat_ms, name, ..
            }) => {
                tracing::info!(%name, "session with the control plane established");
                Duration::from_millis(heartbeat_ms.max(100))
            }
            // Not `{other:?}`: a desired set carries env vars, which may be secret.
            Some(_) => return Err("the control plane's first message was not welcome".into()),
            None => return Err("the control plane closed the session".into()),
        };
        let mut tick = tokio::time::interval(heartbeat);
        let volumes = self.streams.volumes.clone();
        let mut listeners = self.reconciler.listener_changes();
        loop {
            tokio::select! {
                msg = reader.next::<ControlMsg>() => match msg.map_err(|e| e.to_string())? {
                    Some(ControlMsg::Desired(set)) => {
                        tracing::info!(version = set.version, instances = set.instances.len(), "desired set received");
                        self.reconciler.apply(set).await;
                    }
                    Some(ControlMsg::Welcome { .. }) => {}
                    None => return Err("the control plane closed the session".into()),
                },
                Some(report) = self.reports.recv() => {
                    writer.send(&NodeMsg::Report(report)).await.map_err(|e| e.to_string())?;
                }
                // A listener changed state: all of them, now.
                Ok(()) = listeners.changed() => self.send_listeners(&mut writer).await?,
                _ = tick.tick() => self.heartbeat(host, &mut writer).await?,
                // A volume operation changed sizes or use: report it now.
                () = volumes.changed() => self.heartbeat(host, &mut writer).await?,
                () = shutdown.cancelled() => {
                    conn.close(0u32.into(), b"node shutting down");
                    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                    return Ok(());
                }
            }
        }
    }
}
