//! Reading and writing wire messages on a byte stream (a QUIC stream):
//! one JSON document per frame, prefixed by its length as a big-endian
//! `u32`, at most [`MAX_FRAME`] bytes. Behind the `wire-io` feature, so the
//! contract itself stays free of a runtime.

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::MAX_FRAME;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a message this side does not understand: {0}")]
    Decode(#[from] serde_json::Error),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .length_field_type::<u32>()
        .new_codec()
}

/// Reads messages of type `T` from a stream.
#[derive(Debug)]
pub struct Reader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(stream: R) -> Self {
        Reader {
            inner: FramedRead::new(stream, codec()),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(frame) => Ok(Some(serde_json::from_slice(&frame?)?)),
        }
    }
}

/// Writes messages to a stream.
#[derive(Debug)]
pub struct Writer<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(stream: W) -> Self {
        Writer {
            inner: FramedWrite::new(stream, codec()),
        }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = serde_json::to_vec(msg)?;
        self.inner.send(bytes.as_slice()).await?;
        Ok(())
    }

    /// The underlying stream (to finish it).
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}
