//! A volume stream ([`verge_api::wire::NodeStream::Volume`]): its
//! operation done, answered with one [`VolumeReply`] frame, except that an
//! `Export` answers `Exporting` and then sends the snapshot's data, and an
//! `Import` reads the data after its first frame before answering.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument as _;
use verge_api::wire::io::Writer;
use verge_api::wire::{VolumeOp, VolumeReply};

use super::{VolumeError, Volumes};

/// Serves `op` on a stream whose first frame was read exactly (so `recv`
/// holds an import's data from its first byte). `Err` when the stream
/// broke or an export stopped part-way: reset the stream rather than
/// finish it, so the peer cannot take it as complete.
pub async fn serve<W, R>(
    op: VolumeOp,
    send: &mut W,
    recv: &mut R,
    volumes: &Volumes,
) -> Result<(), VolumeError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let span = span(&op);
    async move {
        let mut writer = Writer::new(&mut *send);
        let result = match op {
            VolumeOp::Create { volume, size } => volumes.create(&volume, size).await,
            VolumeOp::Resize { volume, size } => volumes.resize(&volume, size).await,
            VolumeOp::Snapshot { volume, snapshot } => volumes.snapshot(&volume, &snapshot).await,
            VolumeOp::Restore { volume, snapshot } => volumes.restore(&volume, &snapshot).await,
            VolumeOp::Delete { volume } => volumes.delete(&volume).await,
            VolumeOp::DeleteSnapshot { snapshot } => volumes.delete_snapshot(&snapshot).await,
            VolumeOp::Import { volume, size } => volumes.import(&volume, size, recv).await,
            VolumeOp::Export { snapshot } => match volumes.export(&snapshot).await {
                Ok(export) => {
                    let size = export.size;
                    writer
                        .send(&VolumeReply::Exporting { size })
                        .await
                        .map_err(|e| broken(&snapshot, e))?;
                    let sent = export.send(writer.get_mut()).await;
                    match &sent {
                        Ok(()) => tracing::info!(size, "snapshot exported"),
                        Err(e) => tracing::warn!(error = %e, "export stopped part-way"),
                    }
                    return sent;
                }
                Err(e) => Err(e),
            },
        };
        let reply = match result {
            Ok(usage) => VolumeReply::Done { usage },
            Err(e) => {
                tracing::warn!(error = %e, "volume operation refused or failed");
                VolumeReply::Failed {
                    message: e.to_string(),
                    damaged: e.damaged(),
                }
            }
        };
        writer
            .send(&reply)
            .await
            .map_err(|e| broken("volume stream", e))
    }
    .instrument(span)
    .await
}

fn broken(subject: &str, e: verge_api::wire::io::FrameError) -> VolumeError {
    VolumeError::Stream {
        subject: subject.to_string(),
        source: std::io::Error::other(e),
    }
}

fn span(op: &VolumeOp) -> tracing::Span {
    match op {
        VolumeOp::Create { volume, size } | VolumeOp::Resize { volume, size } => {
            tracing::info_span!("volume_stream", op = op.name(), volume = %volume, size)
        }
        VolumeOp::Import { volume, size } => {
            tracing::info_span!("volume_stream", op = op.name(), volume = %volume, size)
        }
        VolumeOp::Snapshot { volume, snapshot } | VolumeOp::Restore { volume, snapshot } => {
            tracing::info_span!("volume_stream", op = op.name(), volume = %volume, snapshot = %snapshot)
        }
        VolumeOp::Delete { volume } => {
            tracing::info_span!("volume_stream", op = op.name(), volume = %volume)
        }
        VolumeOp::DeleteSnapshot { snapshot } | VolumeOp::Export { snapshot } => {
            tracing::info_span!("volume_stream", op = op.name(), snapshot = %snapshot)
        }
    }
}
