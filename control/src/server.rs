//! Starting and stopping the control plane: open the store, bootstrap the
//! admin token, bind the listener (HTTPS with rustls when a certificate is
//! configured), serve until the cancellation token fires, then drain
//! in-flight requests and close the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError, TlsConfig};
use crate::http::{AppState, router};
use crate::images::Pinner;
use crate::metrics::Metrics;
use crate::secrets::Keyring;
use crate::store::{Store, StoreError};

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("registry credentials: {0}")]
    RegistryAuth(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("secrets: {0}")]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(
        "cannot listen on {addr}: {source} (is another control plane running? pick another --listen)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct Started {
    /// The base URL clients use, with the port actually bound.
    pub url: String,
    pub local_addr: SocketAddr,
    /// The cluster admin token: on the very first start, or when
    /// [`Config::new_admin_token`] asked for another one.
    pub admin_token: Option<String>,
    pub store: Store,
    pub cluster: Cluster,
    serve: JoinHandle<()>,
}

impl Started {
    /// Waits for the server to stop (after the cancellation token fired and
    /// in-flight requests drained), then closes the store.
    pub async fn wait(self) {
        if let Err(e) = self.serve.await {
            tracing::error!(error = %e, "http server task failed");
        }
        self.store.close().await;
        tracing::info!("control plane stopped");
    }
}

/// Starts the control plane described by `config`; it stops when `shutdown` is cancelled.
pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Started, StartError> {
    config.validate()?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
    // Everything that can fail for local reasons comes before the bootstrap,
    // so a first start that fails never creates an admin token it cannot print.
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let registry_auth = match &config.registry_auth_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StartError::RegistryAuth(format!("cannot read {}: {e}", path.display()))
            })?;
            verge_api::registry_auth::parse(&path.display().to_string(), &text)
                .map_err(StartError::RegistryAuth)?
        }
        None => Vec::new(),
    };
    let (key_file, create_key) = config.secrets_key();
    let previous_keys = config.secrets_previous_key_files.clone();
    let keyring =
        tokio::task::spawn_blocking(move || Keyring::load(&key_file, create_key, &previous_keys))
            .await
            .expect("loading the secrets key does not panic")?;
    let store = Store::open(&config.database_url()).await?;
    tracing::info!(backend = ?store.backend(), "store open, migrations applied");
    let resealed = keyring.adopt(&store).await?;
    if resealed > 0 {
        tracing::info!(
            resealed,
            key = keyring.key_id(),
            "secret versions re-sealed with the current key"
        );
    }
    // Before the bootstrap: a start that fails to bind the cluster endpoint
    // must not create an admin token it never prints.
    let cluster_config = crate::cluster::ClusterConfig {
        listen: config.cluster_listen(),
        advertise: config.cluster_advertise.clone(),
        instance_prefix: config.instance_prefix()?,
        heartbeat: Duration::from_secs(config.heartbeat_secs),
        offline_after: Duration::from_secs(config.node_offline_after_secs),
        reschedule_after: Duration::from_secs(config.reschedule_after_secs),
        addressing: config.addressing()?,
    };
    let keyring = Arc::new(keyring);
    let (cluster, cluster_tasks) = Cluster::start(
        store.clone(),
        keyring.clone(),
        cluster_config,
        shutdown.clone(),
    )
    .await?;
    let admin_token = match crate::auth::bootstrap(&store).await? {
        None if config.new_admin_token => {
            tracing::warn!("minting a new cluster admin token (--new-admin-token)");
            Some(crate::auth::create_admin_token(&store, "admin-recovery").await?)
        }
        None => {
            if store.active_admin_tokens().await? == 0 {
                tracing::warn!(
                    "no active cluster admin token exists: start once with `verge control --new-admin-token` to mint one"
                );
            }
            None
        }
        token => token,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local_addr}");
    let app = router(AppState {
        store: store.clone(),
        metrics: Metrics::new(),
        max_body_bytes: config.max_body_bytes,
        keyring,
        pinner: Pinner::new(config.insecure_registries.clone(), registry_auth),
        cluster: cluster.clone(),
        shutdown: shutdown.clone(),
    });
    let limits = Limits {
        connections: Arc::new(Semaphore::new(config.max_connections)),
        drain: Duration::from_secs(config.shutdown_timeout_secs),
        client_timeout: Duration::from_secs(config.client_timeout_secs),
    };
    tracing::info!(%url, "control plane listening");
    let http = tokio::spawn(
        serve(listener, tls, app, limits, shutdown).instrument(tracing::info_span!("http_server")),
    );
    let serve = tokio::spawn(async move {
        let _ = tokio::join!(http, cluster_tasks);
    });
    Ok(Started {
        url,
        local_addr,
        admin_token,
        store,
        cluster,
        serve,
    })
}

fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, StartError> {
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StartError::Tls(format!("certificate {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "no certificate in {}",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| StartError::Tls(format!("private key {}: {e}", tls.key.display())))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        StartError::Tls(format!(
            "{} and {}: {e}",
            tls.cert.display(),
            tls.key.display()
        ))
    })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

struct Limits {
    connections: Arc<Semaphore>,
    drain: Duration,
    /// How long a client may take to complete a TLS handshake or send a
    /// request's headers (also the idle limit between requests), so that
    /// slow or silent peers cannot hold connection slots or stall a drain.
    client_timeout: Duration,
}

/// The accept loop: one task per connection, HTTP/1.1 and HTTP/2, until
/// `shutdown`; then waits up to `limits.drain` for open requests to finish.
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.client_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.client_timeout)
        .keep_alive_timeout(limits.client_timeout);
    let handshake_timeout = limits.client_timeout;
    loop {
        let permit = tokio::select! {
            p = limits.connections.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let conn = async move {
            let _permit = permit;
            let result = match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("tls handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        };
        tokio::spawn(conn.instrument(tracing::debug_span!("connection", %peer)));
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, draining open requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(limits.drain) => {
            tracing::warn!(timeout = ?limits.drain, "drain timeout: closing remaining connections");
        }
    }
}
