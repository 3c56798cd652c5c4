//! The QUIC path from an ingress to instances (ALPN `verge-ingress/1`):
//! the way to instances on nodes behind NAT, which only keep their
//! outbound session with the control plane.
//!
//! An ingress proves it holds a cluster admin token on its first stream
//! ([`IngressHello`], answered with a [`TunnelReply`]); then each of its
//! client connections is one bidirectional stream that starts with a
//! [`TunnelOpen`]. This side opens a stream on the named node's session
//! (the [`Sessions`] registry of this replica), forwards the `TunnelOpen`,
//! relays the node's `TunnelReply`, and from then on copies bytes both
//! ways without looking at them: a finished side finishes the other, a
//! reset resets it, a stop stops it.

use std::collections::HashMap;
use std::time::Duration;

use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::wire::io::Writer;
use verge_api::wire::{IngressHello, NodeStream, TunnelOpen, TunnelReply};

use super::Cluster;
use crate::auth::hash_token;

/// How long a peer may take to send a stream's first frame: an ingress its
/// hello or open, a node its answer (it connects with a 5 s timeout).
const FIRST_FRAME: Duration = Duration::from_secs(10);
/// How often an ingress's token is checked again, so a revocation ends its connection.
const RECHECK: Duration = Duration::from_secs(10);
/// The largest first frame taken on a tunnel stream (a hello or an open is tiny).
const MAX_OPEN_FRAME: usize = 64 * 1024;
/// Connection close code: the ingress's token is not (or no longer) a cluster admin token.
const CLOSE_REFUSED: u32 = 3;

/// The live session connection of each node connected to this replica.
pub(super) type Sessions = std::sync::Mutex<HashMap<String, quinn::Connection>>;

/// A node's session in [`Sessions`]; dropping it forgets the session,
/// unless a newer session of the same node replaced it meanwhile.
pub(super) struct Registered<'a> {
    cluster: &'a Cluster,
    node_id: String,
    stable_id: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut sessions = self.cluster.inner.sessions.lock().expect("not poisoned");
        if sessions
            .get(&self.node_id)
            .is_some_and(|c| c.stable_id() == self.stable_id)
        {
            sessions.remove(&self.node_id);
        }
    }
}

impl Cluster {
    /// Records `conn` as the session of `node_id` (replacing an older one)
    /// until the returned guard is dropped.
    pub(super) fn register_session(
        &self,
        node_id: &str,
        conn: &quinn::Connection,
    ) -> Registered<'_> {
        self.inner
            .sessions
            .lock()
            .expect("not poisoned")
            .insert(node_id.to_string(), conn.clone());
        Registered {
            cluster: self,
            node_id: node_id.to_string(),
            stable_id: conn.stable_id(),
        }
    }

    fn node_session(&self, node_id: &str) -> Option<quinn::Connection> {
        self.inner
            .sessions
            .lock()
            .expect("not poisoned")
            .get(node_id)
            .cloned()
    }

    /// Serves one ingress connection until it ends or `shutdown` fires.
    pub(super) async fn ingress(&self, conn: quinn::Connection, shutdown: CancellationToken) {
        let Some((name, hash)) = self.admit_ingress(&conn).await else {
            return;
        };
        let span = tracing::info_span!("ingress", name = %name);
        span.in_scope(|| tracing::info!("ingress connected"));
        let mut streams = JoinSet::new();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        let why = loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let cluster = self.clone();
                        streams.spawn(
                            async move { cluster.tunnel(send, recv).await }
                                .instrument(tracing::info_span!(parent: &span, "tunnel")),
                        );
                    }
                    Err(e) => break e.to_string(),
                },
                Some(_) = streams.join_next() => {}
                _ = recheck.tick() => match self.inner.store.active_token_by_hash(&hash).await {
                    Ok(Some(t)) if t.org_id.is_none() => {}
                    Ok(_) => {
                        conn.close(CLOSE_REFUSED.into(), b"the ingress's token was revoked");
                        break "its token was revoked".into();
                    }
                    Err(e) => span.in_scope(|| tracing::warn!(error = %e, "checking the ingress's token again failed")),
                },
                () = shutdown.cancelled() => {
                    conn.close(0u32.into(), b"control plane shutting down");
                    break "control plane shutting down".into();
                }
            }
        };
        span.in_scope(|| tracing::info!(reason = %why, "ingress disconnected"));
    }

    /// Reads the ingress's hello and checks its token: its name and the
    /// token's hash when admitted; otherwise it was told why and closed.
    async fn admit_ingress(&self, conn: &quinn::Connection) -> Option<(String, String)> {
        let (mut send, mut recv) = match tokio::time::timeout(FIRST_FRAME, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "ingress left before its hello");
                return None;
            }
            Err(_) => {
                conn.close(CLOSE_REFUSED.into(), b"no hello");
                return None;
            }
        };
        let hello: IngressHello = match first_frame(&mut recv).await {
            Ok(h) => h,
            Err(why) => {
                tracing::info!(error = %why, "ingress hello unreadable");
                conn.close(CLOSE_REFUSED.into(), b"no valid hello");
                return None;
            }
        };
        let hash = hash_token(&hello.token);
        let refusal = match self.inner.store.active_token_by_hash(&hash).await {
            Ok(Some(t)) if t.org_id.is_none() => None,
            Ok(Some(t)) => Some(format!(
                "the ingress needs a cluster admin token; this token ({}) is scoped to org {:?}",
                t.id,
                t.org.unwrap_or_default()
            )),
            Ok(None) => Some(
                "the ingress needs a cluster admin token; this token is unknown or revoked".into(),
            ),
            Err(e) => Some(format!(
                "cannot check the ingress's token now ({e}); try again"
            )),
        };
        let reply = match &refusal {
            None => TunnelReply::Connected,
            Some(message) => TunnelReply::Refused {
                message: message.clone(),
            },
        };
        let sent = Writer::new(&mut send).send(&reply).await;
        let _ = send.finish();
        match refusal {
            None if sent.is_ok() => Some((hello.name, hash)),
            None => None,
            Some(message) => {
                tracing::info!(ingress = %hello.name, %message, "ingress refused");
                // Let the answer arrive before the connection closes.
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                conn.close(CLOSE_REFUSED.into(), message.as_bytes());
                None
            }
        }
    }

    /// One client connection: to the node, then bytes both ways.
    async fn tunnel(&self, mut send: SendStream, mut recv: RecvStream) {
        let open: TunnelOpen = match first_frame(&mut recv).await {
            Ok(o) => o,
            Err(why) => {
                tracing::info!(error = %why, "tunnel stream without a valid open");
                let _ = send.reset(0u32.into());
                return;
            }
        };
        let (mut node_send, mut node_recv) = match self.to_node(&open).await {
            Ok(streams) => streams,
            Err(message) => {
                tracing::info!(instance = %open.instance, node = %open.node, %message, "tunnel refused");
                let _ = Writer::new(&mut send)
                    .send(&TunnelReply::Refused { message })
                    .await;
                let _ = send.finish();
                return;
            }
        };
        let reply = first_frame(&mut node_recv)
            .await
            .unwrap_or_else(|why| TunnelReply::Refused {
                message: format!(
                    "node {} gave no answer for instance {}: {why}",
                    open.node, open.instance
                ),
            });
        if Writer::new(&mut send).send(&reply).await.is_err() {
            let _ = node_send.reset(0u32.into());
            return;
        }
        if let TunnelReply::Refused { message } = &reply {
            tracing::info!(instance = %open.instance, node = %open.node, %message, "tunnel refused");
            let _ = send.finish();
            let _ = node_send.reset(0u32.into());
            return;
        }
        tracing::debug!(instance = %open.instance, node = %open.node, "tunnel open");
        let (up, down) = tokio::join!(
            pipe(&mut recv, &mut node_send),
            pipe(&mut node_recv, &mut send)
        );
        tracing::debug!(instance = %open.instance, up, down, "tunnel closed");
    }

    /// A stream on the node's session with `open` sent on it; `Err` is the refusal.
    async fn to_node(&self, open: &TunnelOpen) -> Result<(SendStream, RecvStream), String> {
        self.open_node_stream(&open.node, &NodeStream::Tunnel(open.clone()))
            .await
    }

    /// Opens a stream on the session of node `node_id` (connected to this
    /// replica) and sends `open` on it; `Err` says why not, naming the node.
    pub(crate) async fn open_node_stream(
        &self,
        node_id: &str,
        open: &NodeStream,
    ) -> Result<(SendStream, RecvStream), String> {
        let Some(node) = self.node_session(node_id) else {
            let who = match self.inner.store.node(node_id).await {
                Ok(Some(n)) => n.name,
                _ => node_id.to_string(),
            };
            return Err(format!(
                "node {who} is not connected to this control-plane replica: it is offline, \
                 or its session is with another replica (retry shortly)"
            ));
        };
        let lost = |e: &dyn std::fmt::Display| format!("node {node_id}: session lost: {e}");
        let (mut send, recv) = tokio::time::timeout(FIRST_FRAME, node.open_bi())
            .await
            .map_err(|_| format!("node {node_id}: too many streams open at once"))?
            .map_err(|e| lost(&e))?;
        Writer::new(&mut send)
            .send(open)
            .await
            .map_err(|e| lost(&e))?;
        Ok((send, recv))
    }
}

/// Copies `from` to `to` until `from` ends, passing its end on: finished
/// finishes `to`, reset resets it; `to` stopped stops `from`. The bytes copied.
async fn pipe(from: &mut RecvStream, to: &mut SendStream) -> u64 {
    let mut copied = 0u64;
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                if let Err(e) = to.write_chunk(chunk.bytes).await {
                    let code = match e {
                        WriteError::Stopped(code) => code,
                        _ => VarInt::from_u32(0),
                    };
                    let _ = from.stop(code);
                    return copied;
                }
                copied += n;
            }
            Ok(None) => {
                let _ = to.finish();
                return copied;
            }
            Err(ReadError::Reset(code)) => {
                let _ = to.reset(code);
                return copied;
            }
            Err(_) => {
                let _ = to.reset(VarInt::from_u32(0));
                return copied;
            }
        }
    }
}

/// Reads exactly one frame (a big-endian `u32` length, then JSON) and
/// nothing after it: what follows a tunnel's first frames is the client's
/// raw bytes, which a buffering reader ([`verge_api::wire::io::Reader`])
/// would swallow.
async fn first_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, String> {
    let read = async {
        verge_api::wire::io::read_one(recv, MAX_OPEN_FRAME)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(FIRST_FRAME, read)
        .await
        .map_err(|_| format!("no frame within {FIRST_FRAME:?}"))?
}
