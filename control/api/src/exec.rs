//! Exec sessions (SPEC §4 `verge exec`, §5 Exec): a command run inside a
//! running instance, with its input and output streamed.
//!
//! The CLI sends an [`ExecRequest`] to `POST …/envs/{env}/exec` with
//! `Connection: upgrade` and `Upgrade: verge-exec/1`. The control plane
//! checks the caller, the instance and its runtime, asks the instance's
//! node over a QUIC stream of its session ([`crate::wire::ExecOpen`]),
//! and, once the node started the command, answers `101 Switching
//! Protocols` with an [`ExecStarted`] in the `verge-exec-started` header.
//! From then on the connection carries [`Frame`]s both ways, which the
//! control plane relays to and from the node's stream without reading
//! them. Every refusal before that is an ordinary HTTP error.
//!
//! A frame is a kind byte, a big-endian `u32` length, and the payload.

use serde::{Deserialize, Serialize};

/// The `Upgrade` token of an exec connection.
pub const UPGRADE: &str = "verge-exec/1";
/// The response header carrying the [`ExecStarted`] JSON.
pub const STARTED_HEADER: &str = "verge-exec-started";
/// The largest frame payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The exit code reported when the session ended without the command's
/// own (the node lost it): like a shell's "command not found" range, above
/// what signals give.
pub const EXIT_LOST: i32 = 255;

/// What to run, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command and its arguments (looked up in the instance's `PATH`).
    pub command: Vec<String>,
    /// The instance; without it, the workload's (or env's) only running instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Keep the command's stdin open and fed by `Stdin` frames; without
    /// it, stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal (stdout and stderr are then one stream).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size at the start (with `tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<WinSize>,
    /// `TERM` for the command (with `tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub cols: u16,
    pub rows: u16,
}

/// Where a session runs, told to the CLI before any output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    pub instance: String,
    pub workload: String,
    pub node: String,
}

/// One frame of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → command: bytes for its stdin (or the terminal's input).
    Stdin(Vec<u8>),
    /// Client → command: no more input (stdin is closed).
    StdinEof,
    /// Client → command: the terminal changed size.
    Resize(WinSize),
    /// Client → command: deliver this signal to the command's process group.
    Signal(i32),
    /// Command → client.
    Stdout(Vec<u8>),
    /// Command → client.
    Stderr(Vec<u8>),
    /// Command → client, last: its exit code (`128 + n` for signal n).
    Exit(i32),
    /// Command → client, last: the session broke (said for people).
    Error(String),
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("exec frame of unknown kind {0}")]
    Kind(u8),
    #[error("exec frame of {0} bytes, more than {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("exec frame of kind {kind} with a malformed payload of {len} bytes")]
    Malformed { kind: u8, len: usize },
}

mod kind {
    pub const STDIN: u8 = 0;
    pub const STDIN_EOF: u8 = 1;
    pub const RESIZE: u8 = 2;
    pub const SIGNAL: u8 = 3;
    pub const STDOUT: u8 = 10;
    pub const STDERR: u8 = 11;
    pub const EXIT: u8 = 12;
    pub const ERROR: u8 = 13;
}

/// Bytes of a frame's header: kind and length.
pub const HEADER: usize = 5;

impl Frame {
    /// Appends the frame's bytes to `out`. Payloads above [`MAX_PAYLOAD`]
    /// are the caller's to split (see [`Frame::data`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Stdin(b) => (kind::STDIN, b.into()),
            Frame::StdinEof => (kind::STDIN_EOF, (&[][..]).into()),
            Frame::Resize(s) => {
                let mut p = s.cols.to_be_bytes().to_vec();
                p.extend_from_slice(&s.rows.to_be_bytes());
                (kind::RESIZE, p.into())
            }
            Frame::Signal(n) => (kind::SIGNAL, n.to_be_bytes().to_vec().into()),
            Frame::Stdout(b) => (kind::STDOUT, b.into()),
            Frame::Stderr(b) => (kind::STDERR, b.into()),
            Frame::Exit(c) => (kind::EXIT, c.to_be_bytes().to_vec().into()),
            Frame::Error(m) => (kind::ERROR, m.as_bytes().into()),
        };
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
    }

    /// The frame at the start of `buf` and its length in bytes, or `None`
    /// when `buf` does not hold a whole frame yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let p = &buf[HEADER..HEADER + len];
        let malformed = || FrameError::Malformed { kind, len };
        let frame = match kind {
            kind::STDIN => Frame::Stdin(p.to_vec()),
            kind::STDIN_EOF => Frame::StdinEof,
            kind::RESIZE => {
                let b: [u8; 4] = p.try_into().map_err(|_| malformed())?;
                Frame::Resize(WinSize {
                    cols: u16::from_be_bytes([b[0], b[1]]),
                    rows: u16::from_be_bytes([b[2], b[3]]),
                })
            }
            kind::SIGNAL => {
                Frame::Signal(i32::from_be_bytes(p.try_into().map_err(|_| malformed())?))
            }
            kind::STDOUT => Frame::Stdout(p.to_vec()),
            kind::STDERR => Frame::Stderr(p.to_vec()),
            kind::EXIT => Frame::Exit(i32::from_be_bytes(p.try_into().map_err(|_| malformed())?)),
            kind::ERROR => Frame::Error(String::from_utf8_lossy(p).into_owned()),
            other => return Err(FrameError::Kind(other)),
        };
        Ok(Some((frame, HEADER + len)))
    }

    /// `data` as frames made by `make`, each at most [`MAX_PAYLOAD`] bytes.
    pub fn data(data: &[u8], make: fn(Vec<u8>) -> Frame, out: &mut Vec<u8>) {
        for chunk in data.chunks(MAX_PAYLOAD) {
            make(chunk.to_vec()).encode(out);
        }
    }
}

/// Frames on an async byte stream (tokio-util codec), for the CLI and the node.
#[cfg(feature = "wire-io")]
pub mod codec {
    use tokio_util::bytes::{Buf as _, BytesMut};
    use tokio_util::codec::{Decoder, Encoder};

    use super::{Frame, FrameError};

    /// Encodes and decodes [`Frame`]s.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct ExecCodec;

    impl Decoder for ExecCodec {
        type Item = Frame;
        type Error = std::io::Error;
        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
            match Frame::decode(src) {
                Ok(Some((frame, used))) => {
                    src.advance(used);
                    Ok(Some(frame))
                }
                Ok(None) => {
                    src.reserve(
                        super::HEADER + super::MAX_PAYLOAD
                            - src.len().min(super::HEADER + super::MAX_PAYLOAD),
                    );
                    Ok(None)
                }
                Err(e) => Err(invalid(e)),
            }
        }
    }

    impl Encoder<Frame> for ExecCodec {
        type Error = std::io::Error;
        fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
            let mut out = Vec::new();
            frame.encode(&mut out);
            if out.len() > super::HEADER + super::MAX_PAYLOAD {
                return Err(invalid(FrameError::TooLarge(out.len() - super::HEADER)));
            }
            dst.extend_from_slice(&out);
            Ok(())
        }
    }

    fn invalid(e: FrameError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_partial_input_waits() {
        let frames = [
            Frame::Stdin(b"abc".to_vec()),
            Frame::StdinEof,
            Frame::Resize(WinSize {
                cols: 120,
                rows: 40,
            }),
            Frame::Signal(2),
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(-1),
            Frame::Error("node lost".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let mut at = 0;
        for f in &frames {
            assert_eq!(Frame::decode(&buf[at..at + 3]).unwrap(), None);
            let (got, used) = Frame::decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(&got, f);
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(Frame::decode(&[99, 0, 0, 0, 0]), Err(FrameError::Kind(99)));
        assert_eq!(
            Frame::decode(&[0, 0, 2, 0, 0]),
            Err(FrameError::TooLarge(128 * 1024))
        );
        assert_eq!(
            Frame::decode(&[12, 0, 0, 0, 1, 7]),
            Err(FrameError::Malformed { kind: 12, len: 1 })
        );
        let mut out = Vec::new();
        Frame::data(&vec![7u8; MAX_PAYLOAD + 1], Frame::Stdin, &mut out);
        let (first, used) = Frame::decode(&out).unwrap().unwrap();
        assert_eq!(first, Frame::Stdin(vec![7; MAX_PAYLOAD]));
        assert_eq!(
            Frame::decode(&out[used..]).unwrap().unwrap().0,
            Frame::Stdin(vec![7])
        );
    }
}
