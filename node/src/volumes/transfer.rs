//! Export and import: a loop snapshot's data regions sent as
//! [`volume_data`] chunks (holes and all-zero blocks skipped), and a new
//! volume made of such chunks. The file work runs on a blocking thread,
//! fed through a small channel, so a slow peer holds little memory.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use verge_api::wire::{VolumeUsage, volume_data};

use super::copy::{self, DataRegions};
use super::layout::Kind;
use super::loopvol::sparse_file;
use super::ops::check_id;
use super::{Inner, VolumeError, Volumes};

/// Chunks in flight between the network and the file.
const IN_FLIGHT: usize = 4;

enum Chunk {
    Data(u64, Vec<u8>),
    /// All sent (export) or the end marker read (import).
    End,
    Failed(VolumeError),
}

/// A snapshot being exported: its size, then its chunks ([`Export::send`]).
#[derive(Debug)]
pub struct Export {
    pub size: u64,
    snapshot: String,
    chunks: mpsc::Receiver<Chunk>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Data(offset, data) => write!(f, "Data({offset}, {} bytes)", data.len()),
            Chunk::End => f.write_str("End"),
            Chunk::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

fn unsupported(what: &str) -> VolumeError {
    VolumeError::Unsupported(format!(
        "{what}: this node stores volumes as directories and cannot export or import volume data; \
         restore on the same node, or give the node loop devices (--volume-backend loop)"
    ))
}

impl Volumes {
    /// Starts exporting `snapshot`: its size now, its data through
    /// [`Export::send`]. Holds the snapshot (no delete) until sent.
    #[tracing::instrument(name = "volume_export", skip(self), fields(snapshot = %snapshot))]
    pub async fn export(&self, snapshot: &str) -> Result<Export, VolumeError> {
        check_id("snapshot", snapshot)?;
        let guard = self.lock(&format!("snapshot:{snapshot}")).await;
        let snap = snapshot.to_string();
        let (file, size) = self
            .blocking(format!("snapshot {snapshot}"), (), move |inner| {
                inner.open_export(&snap)
            })
            .await?;
        let (tx, chunks) = mpsc::channel(IN_FLIGHT);
        let subject = format!("snapshot {snapshot}");
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            span.in_scope(|| read_chunks(&subject, &file, size, &tx));
        });
        Ok(Export {
            size,
            snapshot: snapshot.to_string(),
            chunks,
        })
    }

    /// Makes volume `volume` of `size` bytes from [`volume_data`] chunks
    /// read from `data` (an export of a loop snapshot), and mounts it.
    /// Every chunk must lie within `size` and the end marker must come; a
    /// failed import leaves nothing behind.
    #[tracing::instrument(name = "volume_import", skip(self, data), fields(volume = %volume))]
    pub async fn import<R: AsyncRead + Unpin>(
        &self,
        volume: &str,
        size: u64,
        data: &mut R,
    ) -> Result<VolumeUsage, VolumeError> {
        check_id("volume", volume)?;
        if self.inner.kind != Kind::Loop {
            return Err(unsupported(&format!("volume {volume}")));
        }
        if size == 0 {
            return Err(VolumeError::ZeroSize {
                volume: volume.into(),
            });
        }
        let guard = self.lock(volume).await;
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let id = volume.to_string();
        let writer = self.blocking(format!("volume {volume}"), guard, move |inner| {
            inner.import(&id, size, rx)
        });
        let reader = async move {
            let result = read_import(volume, size, data, &tx).await;
            if let Err(e) = result {
                // The writer stops and cleans up on a failure, not on an
                // end (which it takes as the import incomplete).
                let _ = tx.send(Chunk::Failed(e)).await;
            }
        };
        let (written, ()) = tokio::join!(writer, reader);
        written
    }
}

impl Export {
    /// Writes the chunks to `out`, then the end marker. An `Err` means the
    /// export is incomplete: the stream must not look finished.
    pub async fn send<W: AsyncWrite + Unpin>(mut self, out: &mut W) -> Result<(), VolumeError> {
        let broken = |e: std::io::Error| VolumeError::Stream {
            subject: format!("snapshot {}", self.snapshot),
            source: e,
        };
        loop {
            match self.chunks.recv().await {
                Some(Chunk::Data(offset, data)) => {
                    out.write_all(&volume_data::header(offset, data.len() as u32))
                        .await
                        .map_err(broken)?;
                    out.write_all(&data).await.map_err(broken)?;
                }
                Some(Chunk::End) => break,
                Some(Chunk::Failed(e)) => return Err(e),
                None => {
                    return Err(VolumeError::Task {
                        subject: format!("snapshot {}", self.snapshot),
                        detail: "the export's reader ended early".into(),
                    });
                }
            }
        }
        out.write_all(&volume_data::header(self.size, 0))
            .await
            .map_err(broken)?;
        out.flush().await.map_err(broken)
    }
}

/// Reads the data regions of `file` as chunks of at most
/// [`volume_data::MAX_CHUNK`] bytes, skipping all-zero ones, until done or
/// the receiver is gone.
fn read_chunks(subject: &str, file: &File, size: u64, tx: &mpsc::Sender<Chunk>) {
    let failed = |e: std::io::Error| {
        Chunk::Failed(VolumeError::Stream {
            subject: subject.into(),
            source: e,
        })
    };
    for region in DataRegions::new(file, size) {
        let (start, len) = match region {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(failed(e));
                return;
            }
        };
        let mut offset = start;
        while offset < start + len {
            let n = (start + len - offset).min(u64::from(volume_data::MAX_CHUNK)) as usize;
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact_at(&mut buf, offset) {
                let _ = tx.blocking_send(failed(e));
                return;
            }
            if !copy::is_zero(&buf) && tx.blocking_send(Chunk::Data(offset, buf)).is_err() {
                return; // the stream is gone
            }
            offset += n as u64;
        }
    }
    let _ = tx.blocking_send(Chunk::End);
}

/// Reads chunks from the peer until the end marker, checking each.
async fn read_import<R: AsyncRead + Unpin>(
    volume: &str,
    size: u64,
    data: &mut R,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), VolumeError> {
    let bad = |reason: String| VolumeError::Import {
        volume: volume.into(),
        reason,
    };
    loop {
        let mut header = [0u8; volume_data::HEADER];
        data.read_exact(&mut header)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    bad("the data ended before its end marker".into())
                }
                _ => bad(format!("reading the data: {e}")),
            })?;
        let (offset, len) = volume_data::parse(&header);
        if len == 0 {
            if offset != size {
                return Err(bad(format!(
                    "the end marker says {offset} bytes, not the size {size}"
                )));
            }
            let _ = tx.send(Chunk::End).await;
            return Ok(());
        }
        if len > volume_data::MAX_CHUNK {
            return Err(bad(format!(
                "a chunk of {len} bytes is larger than {}",
                volume_data::MAX_CHUNK
            )));
        }
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
        {
            return Err(bad(format!(
                "a chunk at {offset} of {len} bytes lies beyond the size {size}"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        data.read_exact(&mut buf)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => bad("the data ended inside a chunk".into()),
                _ => bad(format!("reading the data: {e}")),
            })?;
        if tx.send(Chunk::Data(offset, buf)).await.is_err() {
            // The writer failed: its error is the answer.
            return Ok(());
        }
    }
}

impl Inner {
    /// The image of a loop snapshot, to export, and its size.
    fn open_export(&self, snap: &str) -> Result<(File, u64), VolumeError> {
        let meta = self.snapshot_meta(snap)?;
        if meta.backend != Kind::Loop {
            return Err(unsupported(&format!("snapshot {snap}")));
        }
        let subject = format!("snapshot {snap}");
        let img = self.layout.snapshot_img(snap);
        let file = File::open(&img).map_err(VolumeError::io(&subject, "opening", &img))?;
        let size = file
            .metadata()
            .map_err(VolumeError::io(&subject, "reading", &img))?
            .len();
        Ok((file, size))
    }

    /// Writes an import into a staging `disk.img`, checks its filesystem,
    /// moves it into place and mounts it; removes everything on failure.
    fn import(
        &self,
        id: &str,
        size: u64,
        mut rx: mpsc::Receiver<Chunk>,
    ) -> Result<VolumeUsage, VolumeError> {
        let subject = format!("volume {id}");
        if self.layout.volume(id).exists() {
            return Err(VolumeError::Exists { volume: id.into() });
        }
        let ext4 = self.ext4(id)?;
        self.need_space(id, size)?;
        let staging = self
            .layout
            .staging()
            .join(format!("{id}-{}", ulid::Ulid::new()));
        let disk = staging.join("disk.img");
        let written = (|| {
            std::fs::create_dir(&staging)
                .map_err(VolumeError::io(&subject, "creating", &staging))?;
            let file = sparse_file(&subject, &disk, size)?;
            let mut chunks = 0u64;
            loop {
                match rx.blocking_recv() {
                    Some(Chunk::Data(offset, data)) => {
                        chunks += 1;
                        if !copy::is_zero(&data) {
                            file.write_all_at(&data, offset)
                                .map_err(VolumeError::io(&subject, "writing", &disk))?;
                        }
                    }
                    Some(Chunk::End) => break,
                    Some(Chunk::Failed(e)) => return Err(e),
                    None => {
                        return Err(VolumeError::Import {
                            volume: id.into(),
                            reason: "the stream ended before its end marker".into(),
                        });
                    }
                }
            }
            file.sync_all()
                .map_err(VolumeError::io(&subject, "syncing", &disk))?;
            drop(file);
            tracing::debug!(chunks, "import written");
            ext4.check(&subject, &disk)
        })();
        let final_dir: PathBuf = self.layout.volume(id);
        let placed = written.and_then(|()| {
            std::fs::rename(&staging, &final_dir).map_err(VolumeError::io(
                &subject,
                "moving into place",
                &final_dir,
            ))
        });
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if let Err(e) = self.bring_up(id) {
            let _ = self.bring_down(id);
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e);
        }
        self.set_ready(id, Ok(()));
        tracing::info!(size, "volume imported");
        Ok(self.usage_of(id)?.0)
    }
}
