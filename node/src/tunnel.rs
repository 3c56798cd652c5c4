//! Tunnel streams: the control plane opens a bidirectional stream on the
//! node's session for each client connection an ingress sends this way
//! (the QUIC path, for nodes behind NAT; it works for every node). The
//! stream starts with a [`TunnelOpen`]; the node checks that it runs the
//! instance and that the port is the instance's, connects to the instance
//! (at most [`CONNECT_TIMEOUT`]), answers a [`TunnelReply`], then copies
//! bytes both ways without looking at them (a PROXY v2 header, when the
//! endpoint has one, is just the first bytes). A finished stream side
//! half-closes the TCP connection and the other way round; a reset or stop
//! on either side resets both.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use verge_api::wire::io::Writer;
use verge_api::wire::{TunnelOpen, TunnelReply};

use crate::reconcile::Reconciler;

/// How long connecting to an instance may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the instance at a time.
const BUFFER: usize = 64 * 1024;

/// One tunnel stream, its [`TunnelOpen`] read: the instance's connection,
/// then bytes both ways.
pub async fn stream(
    open: TunnelOpen,
    mut send: SendStream,
    recv: RecvStream,
    reconciler: &Reconciler,
    node: &str,
) {
    let tcp = match connect(&open, reconciler, node).await {
        Ok(tcp) => tcp,
        Err(message) => {
            tracing::info!(instance = %open.instance, port = open.port, %message, "tunnel refused");
            let _ = Writer::new(&mut send)
                .send(&TunnelReply::Refused { message })
                .await;
            let _ = send.finish();
            return;
        }
    };
    if Writer::new(&mut send)
        .send(&TunnelReply::Connected)
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(instance = %open.instance, port = open.port, "tunnel open");
    relay(tcp, send, recv).await;
}

/// The instance's TCP connection, or the refusal's message.
async fn connect(
    open: &TunnelOpen,
    reconciler: &Reconciler,
    node: &str,
) -> Result<TcpStream, String> {
    let id = &open.instance;
    let addr: SocketAddr = reconciler
        .tunnel_target(id, open.port)
        .map_err(|why| format!("instance {id} {why} (node {node})"))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            format!("instance {id} on node {node}: connecting to {addr} timed out after {CONNECT_TIMEOUT:?}")
        })?
        .map_err(|e| format!("instance {id} on node {node}: cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Copies both ways until both directions ended; an abnormal end of
/// either (reset, stop, TCP error) resets everything.
async fn relay(tcp: TcpStream, mut send: SendStream, mut recv: RecvStream) {
    let (mut r, mut w) = tcp.into_split();
    let clean = {
        let up = to_instance(&mut recv, &mut w);
        let down = from_instance(&mut r, &mut send);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                ok = &mut up, if !up_done => if ok { up_done = true } else { break false },
                ok = &mut down, if !down_done => if ok { down_done = true } else { break false },
            }
            if up_done && down_done {
                break true;
            }
        }
    };
    if !clean {
        let _ = send.reset(VarInt::from_u32(0));
        let _ = recv.stop(VarInt::from_u32(0));
        if let Ok(tcp) = r.reunite(w) {
            // Dropped with SO_LINGER 0: the instance sees a reset, not an end.
            let _ = tcp.set_zero_linger();
        }
    }
}

/// Stream → instance; `true` when the stream finished and the TCP write
/// side was shut down.
async fn to_instance(recv: &mut RecvStream, w: &mut OwnedWriteHalf) -> bool {
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                if w.write_all(&chunk.bytes).await.is_err() {
                    return false;
                }
            }
            Ok(None) => return w.shutdown().await.is_ok(),
            Err(_) => return false,
        }
    }
}

/// Instance → stream; `true` when the instance ended its side and the
/// stream was finished.
async fn from_instance(r: &mut OwnedReadHalf, send: &mut SendStream) -> bool {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return send.finish().is_ok(),
            Ok(n) => {
                if send.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}
