//! The QUIC path to instances: for nodes behind NAT, which only keep
//! their outbound session with the control plane, a client connection
//! travels as one QUIC stream to the control plane's cluster endpoint
//! (ALPN `verge-ingress/1`), which hands it to the node's session, and the
//! node to the instance.
//!
//! One connection to the control plane serves every open; it is made on
//! the first [`Tunnel::open`] and again after it dropped. Its server
//! certificate is verified against the cluster CA from
//! [`ClusterInfo`] (no client certificate: the ingress proves itself with
//! a cluster admin token in its first stream, [`IngressHello`]). Each open
//! sends a [`TunnelOpen`] and waits for the node's [`TunnelReply`]; after
//! `Connected` the stream is the connection's bytes (a PROXY v2 header
//! first, when the endpoint has one: nobody in between reads them).
//!
//! Every [`TunnelError`] of an open comes before any client byte was sent,
//! so trying another backend is always safe.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use verge_api::routing::ClusterInfo;
use verge_api::wire::io::Writer;
use verge_api::wire::{ALPN_INGRESS, IngressHello, TunnelOpen, TunnelReply};

/// The name the cluster endpoint's certificate carries, whatever address
/// is dialled (the control plane's `cluster::ca::SERVER_NAME`).
const SERVER_NAME: &str = "control.verge.internal";
/// How long connecting (handshake and hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the answer to an open may take: the control plane's relay
/// plus the node's connect (at most 5 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer frame taken.
const MAX_FRAME: usize = 64 * 1024;

/// Why an open failed. None of them sent client bytes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    /// The [`ClusterInfo`] is not usable (internal: fix the configuration).
    #[error("tunnel configuration: {0}")]
    Config(String),
    /// The control plane could not be reached, or the connection to it
    /// failed (the backend may be fine; another open reconnects).
    #[error("tunnel to the control plane at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// The control plane refused this ingress itself (its token).
    #[error("the control plane at {addr} refused this ingress: {message}")]
    Rejected { addr: String, message: String },
    /// The control plane or the node refused this one connection (node
    /// offline, instance not running there, wrong port, instance not
    /// accepting): another backend may take it.
    #[error("tunnel refused: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("tunnel to the control plane at {addr}: {what} timed out after {after:?}")]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
}

impl TunnelError {
    /// Whether the node or control plane refused this connection (as
    /// opposed to the tunnel itself failing).
    pub fn is_refused(&self) -> bool {
        matches!(self, TunnelError::Refused(_))
    }
}

/// A handle on the QUIC path; cheap to clone.
#[derive(Clone)]
pub struct Tunnel {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` of the cluster endpoint.
    addr: String,
    config: quinn::ClientConfig,
    token: String,
    name: String,
    conn: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    live: Option<(quinn::Endpoint, quinn::Connection)>,
    /// The last failed attempt: opens that waited for it share its error.
    failed: Option<(Instant, TunnelError)>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("addr", &self.inner.addr)
            .field("name", &self.inner.name)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Tunnel {
    /// Remembers where and how to connect; connects lazily on first open
    /// and again after the connection dropped. `token` must be a cluster
    /// admin token; `name` names this ingress in the control plane's logs.
    pub fn new(info: ClusterInfo, token: String, name: String) -> Result<Tunnel, TunnelError> {
        let addr = info
            .quic
            .strip_prefix("quic://")
            .unwrap_or(&info.quic)
            .trim_end_matches('/')
            .to_string();
        Ok(Tunnel {
            inner: Arc::new(Inner {
                addr,
                config: client_config(&info.ca_pem)?,
                token,
                name,
                conn: tokio::sync::Mutex::new(Slot::default()),
            }),
        })
    }

    /// Opens one stream to an instance, waiting for the node's answer.
    pub async fn open(&self, to: &TunnelOpen) -> Result<TunnelStream, TunnelError> {
        let (conn, fresh) = self.connection().await?;
        match self.open_on(&conn, to).await {
            // A connection that died unnoticed: once more on a new one.
            Err(TunnelError::Unreachable { .. }) if !fresh => {
                let (conn, _) = self.connection().await?;
                self.open_on(&conn, to).await
            }
            other => other,
        }
    }

    /// The live connection (`true`: made just now), connecting if there is none.
    async fn connection(&self) -> Result<(quinn::Connection, bool), TunnelError> {
        let asked = Instant::now();
        let mut slot = self.inner.conn.lock().await;
        if let Some((_, conn)) = &slot.live
            && conn.close_reason().is_none()
        {
            return Ok((conn.clone(), false));
        }
        if let Some((at, e)) = &slot.failed
            && *at >= asked
        {
            return Err(e.clone());
        }
        slot.live = None;
        match self.connect().await {
            Ok((endpoint, conn)) => {
                tracing::info!(addr = %self.inner.addr, "tunnel connected to the control plane");
                slot.live = Some((endpoint, conn.clone()));
                slot.failed = None;
                Ok((conn, true))
            }
            Err(e) => {
                tracing::warn!(error = %e, "tunnel connection failed");
                slot.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// A new connection, admitted by the control plane.
    async fn connect(&self) -> Result<(quinn::Endpoint, quinn::Connection), TunnelError> {
        let addr = &self.inner.addr;
        let unreachable = |why: String| TunnelError::Unreachable {
            addr: addr.clone(),
            why,
        };
        let to: SocketAddr = tokio::net::lookup_host(addr.as_str())
            .await
            .map_err(|e| unreachable(format!("cannot resolve it: {e}")))?
            .next()
            .ok_or_else(|| unreachable("it resolves to no address".into()))?;
        let bind: SocketAddr = if to.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| unreachable(format!("cannot open a UDP socket: {e}")))?;
        let hello = async {
            let conn = endpoint
                .connect_with(self.inner.config.clone(), to, SERVER_NAME)
                .map_err(|e| unreachable(e.to_string()))?
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let hello = IngressHello {
                token: self.inner.token.clone(),
                name: self.inner.name.clone(),
            };
            Writer::new(&mut send)
                .send(&hello)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = send.finish();
            let reply = read_frame::<TunnelReply>(&mut recv).await;
            Ok::<_, TunnelError>((conn, reply))
        };
        let (conn, reply) = tokio::time::timeout(CONNECT_TIMEOUT, hello)
            .await
            .map_err(|_| TunnelError::Timeout {
                addr: addr.clone(),
                what: "connecting",
                after: CONNECT_TIMEOUT,
            })??;
        match reply {
            Ok(TunnelReply::Connected) => Ok((endpoint, conn)),
            Ok(TunnelReply::Refused { message }) => {
                conn.close(0u32.into(), b"refused");
                Err(TunnelError::Rejected {
                    addr: addr.clone(),
                    message,
                })
            }
            // The refusal may come as the close reason only.
            Err(why) => Err(match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => TunnelError::Rejected {
                    addr: addr.clone(),
                    message: String::from_utf8_lossy(&c.reason).into_owned(),
                },
                _ => unreachable(format!("no answer to the hello: {why}")),
            }),
        }
    }

    /// One stream on `conn`, answered.
    async fn open_on(
        &self,
        conn: &quinn::Connection,
        to: &TunnelOpen,
    ) -> Result<TunnelStream, TunnelError> {
        let addr = &self.inner.addr;
        let unreachable = |why: String| TunnelError::Unreachable {
            addr: addr.clone(),
            why,
        };
        let timeout = |what| TunnelError::Timeout {
            addr: addr.clone(),
            what,
            after: ANSWER_TIMEOUT,
        };
        let (mut send, mut recv) = tokio::time::timeout(ANSWER_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| timeout("opening a stream (too many open?)"))?
            .map_err(|e| unreachable(e.to_string()))?;
        Writer::new(&mut send)
            .send(to)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let reply = tokio::time::timeout(ANSWER_TIMEOUT, read_frame::<TunnelReply>(&mut recv))
            .await
            .map_err(|_| {
                let _ = send.reset(VarInt::from_u32(0));
                timeout("waiting for the node's answer")
            })?
            .map_err(unreachable)?;
        match reply {
            TunnelReply::Connected => Ok(TunnelStream {
                send,
                recv,
                shut: false,
            }),
            TunnelReply::Refused { message } => Err(TunnelError::Refused(message)),
        }
    }
}

/// The QUIC client config: TLS 1.3, only the cluster CA as root, ALPN
/// `verge-ingress/1`; keep-alive 5 s, idle timeout 30 s.
fn client_config(ca_pem: &str) -> Result<quinn::ClientConfig, TunnelError> {
    let config = |why: String| TunnelError::Config(why);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| config(format!("the cluster CA is not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| config(format!("the cluster CA certificate is not usable: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config("the cluster CA PEM holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_INGRESS.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30s is a valid idle timeout"),
        ));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Reads exactly one frame (a big-endian `u32` length, then JSON) and
/// nothing after it: the instance's bytes follow a `Connected`, and a
/// buffering reader ([`verge_api::wire::io::Reader`]) would swallow them.
async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, String> {
    verge_api::wire::io::read_one(recv, MAX_FRAME)
        .await
        .map_err(|e| match e {
            verge_api::wire::io::FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the stream ended without an answer".to_string()
            }
            e => e.to_string(),
        })
}

/// One tunnelled connection: the instance's bytes in, the client's out.
/// [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown)
/// finishes the send side (the instance sees the end of its input);
/// dropped without it, the stream is reset (the instance sees a reset).
#[derive(Debug)]
pub struct TunnelStream {
    send: SendStream,
    recv: RecvStream,
    /// The send side was finished.
    shut: bool,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.get_mut().recv), cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = AsyncWrite::poll_shutdown(Pin::new(&mut this.send), cx);
        if matches!(done, Poll::Ready(Ok(()))) {
            this.shut = true;
        }
        done
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if !self.shut {
            let _ = self.send.reset(VarInt::from_u32(0));
        }
    }
}
