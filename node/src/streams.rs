//! Streams the control plane opens on this node's session: each starts
//! with a [`NodeStream`] frame saying what it is for, and is served by a
//! task of its own until it ends or the session does.
//!
//! - [`NodeStream::Tunnel`]: a client connection to an instance ([`crate::tunnel`]);
//! - [`NodeStream::Logs`]: log records of instances ([`crate::logs`]);
//! - [`NodeStream::Exec`]: a command run in an instance ([`crate::exec`]);
//! - [`NodeStream::Volume`]: an operation on the node's volumes ([`crate::volumes`]).

use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::task::JoinSet;
use tracing::Instrument;
use verge_api::wire::NodeStream;

use crate::reconcile::Reconciler;

/// How long the control plane may take to send a stream's first frame.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest first frame taken (an exec's command line is the largest).
const MAX_OPEN_FRAME: usize = 256 * 1024;
/// Logs streams served at once (each reads files on a thread of its own):
/// beyond it, a stream is answered that the node is busy.
pub const MAX_LOGS_STREAMS: usize = 64;

/// What serving streams needs.
#[derive(Debug, Clone)]
pub struct Streams {
    pub reconciler: Reconciler,
    /// This node's name, for refusals.
    pub node: String,
    pub logs: crate::logs::Logs,
    pub exec: crate::exec::Exec,
    /// Places for logs streams ([`MAX_LOGS_STREAMS`]).
    pub logs_streams: std::sync::Arc<tokio::sync::Semaphore>,
    pub volumes: crate::volumes::Volumes,
}

impl Streams {
    pub fn new(
        reconciler: Reconciler,
        node: String,
        logs: crate::logs::Logs,
        exec: crate::exec::Exec,
        volumes: crate::volumes::Volumes,
    ) -> Streams {
        Streams {
            reconciler,
            node,
            logs,
            exec,
            logs_streams: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LOGS_STREAMS)),
            volumes,
        }
    }
}

/// Accepts the control plane's streams on `conn`, one task each, until the
/// connection ends; dropping the future ends them all.
pub async fn serve(conn: quinn::Connection, ctx: Streams) {
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let ctx = ctx.clone();
                    streams.spawn(async move { stream(send, recv, &ctx).await });
                }
                Err(_) => return,
            },
            Some(_) = streams.join_next() => {}
        }
    }
}

/// One stream: its first frame, then the part that serves it.
async fn stream(mut send: SendStream, mut recv: RecvStream, ctx: &Streams) {
    let read = verge_api::wire::io::read_one::<NodeStream, _>(&mut recv, MAX_OPEN_FRAME);
    let open = match tokio::time::timeout(OPEN_TIMEOUT, read).await {
        Ok(Ok(open)) => open,
        Ok(Err(why)) => {
            tracing::info!(error = %why, "stream without a valid first frame");
            let _ = send.reset(VarInt::from_u32(0));
            return;
        }
        Err(_) => {
            tracing::info!("stream without a first frame within {OPEN_TIMEOUT:?}");
            let _ = send.reset(VarInt::from_u32(0));
            return;
        }
    };
    match open {
        NodeStream::Tunnel(open) => {
            let span = tracing::info_span!("tunnel", instance = %open.instance);
            crate::tunnel::stream(open, send, recv, &ctx.reconciler, &ctx.node)
                .instrument(span)
                .await;
        }
        NodeStream::Volume(op) => {
            // Its own span (op, volume, snapshot).
            match crate::volumes::serve(op, &mut send, &mut recv, &ctx.volumes).await {
                Ok(()) => {
                    let _ = send.finish();
                }
                Err(e) => {
                    tracing::info!(error = %e, "volume stream broken");
                    let _ = send.reset(VarInt::from_u32(0));
                }
            }
        }
        NodeStream::Logs(open) => {
            let span = tracing::info_span!("logs", instances = open.instances.len());
            let Ok(_place) = ctx.logs_streams.clone().try_acquire_owned() else {
                busy(open, send, &ctx.node).instrument(span).await;
                return;
            };
            ctx.logs.serve(open, send, recv).instrument(span).await;
        }
        NodeStream::Exec(open) => {
            let span = tracing::info_span!("exec", instance = %open.instance);
            ctx.exec
                .serve(open, send, recv, &ctx.reconciler, &ctx.node)
                .instrument(span)
                .await;
        }
    }
}

/// Answers a logs stream the node has no place for: each instance missing,
/// saying why.
async fn busy(open: verge_api::wire::LogsOpen, mut send: SendStream, node: &str) {
    tracing::warn!("refusing a logs stream: {MAX_LOGS_STREAMS} already open");
    let mut writer = verge_api::wire::io::Writer::new(&mut send);
    for instance in open.instances {
        let reason = format!(
            "logs of instance {instance} unavailable: node {node} serves {MAX_LOGS_STREAMS} log streams already; try again shortly"
        );
        let frame = verge_api::wire::LogsFrame::Missing { instance, reason };
        if writer.send(&frame).await.is_err() {
            return;
        }
    }
    let _ = writer.send(&verge_api::wire::LogsFrame::HistoryEnd).await;
    let _ = send.finish();
}
