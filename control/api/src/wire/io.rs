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
    #[error("peer sent a frame of {0} bytes, more than this side accepts")]
    TooLarge(usize),
}

/// Reads exactly one message of at most `max` bytes, and nothing past it
/// (a [`Reader`] buffers ahead): for the first frame of a stream whose
/// remaining bytes are not frames, like a tunnel stream. The end of the
/// stream before a whole frame is an `UnexpectedEof` I/O error.
pub async fn read_one<T: DeserializeOwned, R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    use tokio::io::AsyncReadExt as _;
    let len = stream.read_u32().await? as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(serde_json::from_slice(&buf)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_one_takes_one_frame_and_leaves_the_rest() {
        use tokio::io::AsyncReadExt as _;
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Writer::new(a);
        w.send(&serde_json::json!({"x": 1})).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(w.get_mut(), b"raw bytes")
            .await
            .unwrap();
        drop(w);
        let v: serde_json::Value = read_one(&mut b, 64).await.unwrap();
        assert_eq!(v["x"], 1);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw bytes");

        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Writer::new(a);
        w.send(&"x".repeat(100)).await.unwrap();
        let err = read_one::<String, _>(&mut b, 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(102)), "{err}");
    }
}
