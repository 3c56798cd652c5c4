//! Asking a node for one volume operation over a stream of its session
//! ([`Cluster::open_node_stream`] with [`NodeStream::Volume`]), and
//! relaying a snapshot's data from one node's `Export` to another's (or
//! the same node's) `Import`.
//!
//! Every answer is an [`Outcome`] that says what the control plane knows
//! afterwards: done, not asked (nothing changed), refused by the node, or
//! unknown (asked, but the answer never came).

use std::time::Duration;

use quinn::{ReadError, RecvStream, SendStream, VarInt};
use verge_api::wire::io::read_one;
use verge_api::wire::{NodeStream, VolumeOp, VolumeReply, VolumeUsage};

use crate::cluster::Cluster;
use crate::store::{NodeRow, Store};

/// How long a node may take over one operation: making a large
/// filesystem, freezing and copying a volume, importing a snapshot.
pub const OP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a copy between nodes may go without a byte before it is
/// given up.
const COPY_IDLE: Duration = Duration::from_secs(60);
/// How often a copy between nodes marks its volume's operation as alive.
const TOUCH_EVERY: Duration = Duration::from_secs(30);
/// The largest answer frame taken (an answer is tiny).
const MAX_REPLY: usize = 64 * 1024;

/// What the control plane knows after asking a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; the volume (or snapshot) as the node has it now.
    Done(VolumeUsage),
    /// The node was not asked (offline, not connected to this replica,
    /// session lost): nothing changed.
    NotAsked(String),
    /// The node answered that it could not: nothing changed on it.
    Failed(String),
    /// The node was asked but its answer never came: it may or may not
    /// have done it.
    Unknown(String),
}

/// Asks `node` for `op` and waits up to [`OP_TIMEOUT`] for its answer.
pub async fn ask(cluster: &Cluster, node: &NodeRow, op: VolumeOp) -> Outcome {
    let (mut send, mut recv) = match cluster
        .open_node_stream(&node.id, &NodeStream::Volume(op))
        .await
    {
        Ok(streams) => streams,
        Err(why) => return Outcome::NotAsked(why),
    };
    let _ = send.finish();
    answer(&node.name, &mut recv).await
}

/// The node's one [`VolumeReply`] on `recv`, as an outcome.
async fn answer(node: &str, recv: &mut RecvStream) -> Outcome {
    match tokio::time::timeout(OP_TIMEOUT, read_one::<VolumeReply, _>(recv, MAX_REPLY)).await {
        Err(_) => Outcome::Unknown(format!(
            "node {node} did not answer within {}",
            humantime::format_duration(OP_TIMEOUT)
        )),
        Ok(Err(e)) => Outcome::Unknown(format!("node {node}'s answer was lost: {e}")),
        Ok(Ok(VolumeReply::Done { usage })) => Outcome::Done(usage),
        // Changed, then failed: not "nothing changed".
        Ok(Ok(VolumeReply::Failed {
            message,
            damaged: true,
        })) => Outcome::Unknown(format!("node {node}: {message}")),
        Ok(Ok(VolumeReply::Failed { message, .. })) => {
            Outcome::Failed(format!("node {node}: {message}"))
        }
        Ok(Ok(VolumeReply::Exporting { .. })) => Outcome::Unknown(format!(
            "node {node} answered with export data where it should have answered done or failed"
        )),
    }
}

/// Makes volume `volume` on node `to` from snapshot `snapshot` of node
/// `from`: the exporter's data is copied to the importer as it comes,
/// through this control plane. While bytes flow, the volume's operation
/// is touched in the store so that it is not taken for abandoned.
pub async fn copy_snapshot(
    cluster: &Cluster,
    store: &Store,
    (from, snapshot): (&NodeRow, &str),
    (to, volume): (&NodeRow, &str),
) -> Outcome {
    let export = VolumeOp::Export {
        snapshot: snapshot.to_string(),
    };
    let (mut xsend, mut xrecv) = match cluster
        .open_node_stream(&from.id, &NodeStream::Volume(export))
        .await
    {
        Ok(streams) => streams,
        Err(why) => return Outcome::NotAsked(why),
    };
    let _ = xsend.finish();
    let read = read_one::<VolumeReply, _>(&mut xrecv, MAX_REPLY);
    let size = match tokio::time::timeout(OP_TIMEOUT, read).await {
        Ok(Ok(VolumeReply::Exporting { size })) => size,
        Ok(Ok(VolumeReply::Failed { message, .. })) => {
            return Outcome::Failed(format!("node {}: {message}", from.name));
        }
        Ok(Ok(VolumeReply::Done { .. })) => {
            return Outcome::Failed(format!(
                "node {} answered done instead of starting the export of snapshot {snapshot}",
                from.name
            ));
        }
        Ok(Err(e)) => {
            return Outcome::Failed(format!(
                "node {} did not start the export of snapshot {snapshot}: {e}",
                from.name
            ));
        }
        Err(_) => {
            let _ = xrecv.stop(VarInt::from_u32(0));
            return Outcome::Failed(format!(
                "node {} did not start the export of snapshot {snapshot} within {}",
                from.name,
                humantime::format_duration(OP_TIMEOUT)
            ));
        }
    };
    let import = VolumeOp::Import {
        volume: volume.to_string(),
        size,
    };
    let (mut isend, mut irecv) = match cluster
        .open_node_stream(&to.id, &NodeStream::Volume(import))
        .await
    {
        Ok(streams) => streams,
        Err(why) => {
            let _ = xrecv.stop(VarInt::from_u32(0));
            return Outcome::NotAsked(why);
        }
    };
    let copied = pipe(store, volume, &mut xrecv, &mut isend).await;
    match copied {
        Ok(bytes) => {
            let _ = isend.finish();
            tracing::debug!(bytes, from = %from.name, to = %to.name, "snapshot data relayed");
            answer(&to.name, &mut irecv).await
        }
        Err(Broke::Exporter(why)) => {
            let _ = isend.reset(VarInt::from_u32(0));
            Outcome::Failed(format!(
                "the export of snapshot {snapshot} from node {} broke: {why}",
                from.name
            ))
        }
        Err(Broke::Importer) => {
            let _ = xrecv.stop(VarInt::from_u32(0));
            // It stopped reading: its answer says why, if it gave one.
            match answer(&to.name, &mut irecv).await {
                Outcome::Done(_) | Outcome::Unknown(_) => Outcome::Failed(format!(
                    "node {} stopped taking the data of snapshot {snapshot}",
                    to.name
                )),
                other => other,
            }
        }
    }
}

/// Why a relay stopped early.
enum Broke {
    Exporter(String),
    Importer,
}

/// Copies the exporter's bytes to the importer until the exporter
/// finishes; the bytes copied.
async fn pipe(
    store: &Store,
    volume: &str,
    from: &mut RecvStream,
    to: &mut SendStream,
) -> Result<u64, Broke> {
    let mut copied = 0u64;
    let mut touch = tokio::time::interval(TOUCH_EVERY);
    touch.tick().await;
    let mut progress = tokio::time::Instant::now();
    loop {
        // `read_chunk` is cancel-safe: a touch in between loses nothing.
        let read = from.read_chunk(usize::MAX, true);
        let chunk = tokio::select! {
            c = tokio::time::timeout_at(progress + COPY_IDLE, read) => c,
            _ = touch.tick() => {
                if let Err(e) = store.touch_volume_op(volume).await {
                    tracing::warn!(error = %e, "marking a snapshot copy as alive failed");
                }
                continue;
            }
        };
        match chunk {
            Ok(Ok(Some(chunk))) => {
                let n = chunk.bytes.len() as u64;
                if to.write_chunk(chunk.bytes).await.is_err() {
                    return Err(Broke::Importer);
                }
                copied += n;
                progress = tokio::time::Instant::now();
            }
            Ok(Ok(None)) => return Ok(copied),
            Ok(Err(ReadError::Reset(code))) => {
                return Err(Broke::Exporter(format!(
                    "the node reset the stream (code {code}) after {copied} bytes"
                )));
            }
            Ok(Err(e)) => return Err(Broke::Exporter(format!("{e} after {copied} bytes"))),
            Err(_) => {
                return Err(Broke::Exporter(format!(
                    "no data for {} after {copied} bytes",
                    humantime::format_duration(COPY_IDLE)
                )));
            }
        }
    }
}
