//! Cutting a workload's output into app records: one record per line,
//! messages of at most [`MAX_MESSAGE`] bytes, bytes that are not UTF-8
//! written as `\xNN`. Pure: the shim feeds it what it reads from the
//! workload's pipes ([`super::capture`]).

use std::fmt::Write as _;

use verge_api::logs::{LogRecord, LogSource, LogStream, MAX_MESSAGE, Severity};

/// A piece of output ready to become records: a whole line (without its
/// newline, and without a `\r` before it), or a part of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    pub bytes: &'a [u8],
    /// Not the first piece of its line (the line was longer than
    /// [`MAX_MESSAGE`], or it was flushed before its end).
    pub continued: bool,
}

/// Splits a byte stream into lines. It keeps at most [`MAX_MESSAGE`] bytes
/// of an unfinished line: a longer line is handed out in pieces of at most
/// that size, cut between UTF-8 characters when it is UTF-8.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    /// Part of the pending line was already handed out.
    continued: bool,
}

impl LineSplitter {
    pub fn new() -> LineSplitter {
        LineSplitter::default()
    }

    /// Takes `bytes` and hands out each line they complete, and pieces of
    /// lines too long to wait for.
    pub fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(Piece<'_>)) {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            let line = &bytes[..nl];
            bytes = &bytes[nl + 1..];
            if self.pending.is_empty() {
                self.emit_line(line, &mut emit);
            } else {
                let mut whole = std::mem::take(&mut self.pending);
                whole.extend_from_slice(line);
                self.emit_line(&whole, &mut emit);
                whole.clear();
                self.pending = whole;
            }
        }
        self.pending.extend_from_slice(bytes);
        while self.pending.len() > MAX_MESSAGE {
            let cut = cut_point(&self.pending, MAX_MESSAGE);
            emit(Piece {
                bytes: &self.pending[..cut],
                continued: self.continued,
            });
            self.continued = true;
            self.pending.drain(..cut);
        }
    }

    /// Whether part of a line waits for its end.
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hands out the unfinished line, if any (after a quiet time, or at the
    /// end of the output). What follows it starts a new line.
    pub fn flush(&mut self, mut emit: impl FnMut(Piece<'_>)) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        self.emit_line(&pending, &mut emit);
        self.pending = pending;
        self.pending.clear();
    }

    fn emit_line(&mut self, mut line: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        let mut continued = std::mem::take(&mut self.continued);
        loop {
            let cut = cut_point(line, MAX_MESSAGE);
            emit(Piece {
                bytes: &line[..cut],
                continued,
            });
            line = &line[cut..];
            continued = true;
            if line.is_empty() {
                return;
            }
        }
    }
}

/// Where to cut `bytes` so the first part has at most `max` bytes: at
/// `max`, or a little before when that is inside a UTF-8 character.
pub fn cut_point(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    let continuation = |b: u8| b & 0xC0 == 0x80;
    let mut i = max;
    for _ in 0..3 {
        if i > 0 && continuation(bytes[i]) {
            i -= 1;
        } else {
            break;
        }
    }
    // `bytes[i]` starts a multi-byte character that would be cut: cut
    // before it. Anything else (ASCII, or not UTF-8 anyway): cut at `max`.
    if i < max && bytes[i] >= 0xC0 { i } else { max }
}

/// `bytes` as text: UTF-8 as is, any other byte as `\xNN` (lowercase hex),
/// in messages of at most [`MAX_MESSAGE`] bytes (more than one only when
/// escaping made it longer). Backslashes are not escaped.
pub fn escape(bytes: &[u8]) -> Vec<String> {
    escape_max(bytes, MAX_MESSAGE)
}

fn escape_max(bytes: &[u8], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::with_capacity(bytes.len().min(max));
    for chunk in bytes.utf8_chunks() {
        let mut valid = chunk.valid();
        while !valid.is_empty() {
            let room = max - cur.len();
            if valid.len() <= room {
                cur.push_str(valid);
                break;
            }
            let mut cut = room;
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            cur.push_str(&valid[..cut]);
            valid = &valid[cut..];
            out.push(std::mem::take(&mut cur));
        }
        for b in chunk.invalid() {
            if cur.len() + 4 > max {
                out.push(std::mem::take(&mut cur));
            }
            let _ = write!(cur, "\\x{b:02x}");
        }
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// The severity of an app line: the one it declares, else `info` on
/// stdout and `warn` on stderr.
pub fn app_severity(message: &str, stream: LogStream) -> Severity {
    Severity::declared_by(message).unwrap_or(match stream {
        LogStream::Stdout => Severity::Info,
        LogStream::Stderr => Severity::Warn,
    })
}

/// The records of one piece of app output read at `time_us`. A continued
/// piece keeps `severity` (the severity of its line's first piece); the
/// first piece of a line sets it.
pub fn app_records(
    piece: Piece<'_>,
    stream: LogStream,
    time_us: u64,
    severity: &mut Severity,
) -> Vec<LogRecord> {
    let messages = escape(piece.bytes);
    if !piece.continued {
        *severity = app_severity(&messages[0], stream);
    }
    messages
        .into_iter()
        .map(|message| LogRecord {
            time_us,
            source: LogSource::App,
            stream: Some(stream),
            severity: *severity,
            message,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], flush: bool) -> Vec<(Vec<u8>, bool)> {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |p| out.push((p.bytes.to_vec(), p.continued)));
        }
        if flush {
            s.flush(|p| out.push((p.bytes.to_vec(), p.continued)));
        }
        out
    }

    #[test]
    fn lines_are_framed_across_reads() {
        let out = split(&[b"one\ntw", b"o\r\n\nthr", b"ee"], false);
        assert_eq!(
            out,
            vec![
                (b"one".to_vec(), false),
                (b"two".to_vec(), false),
                (b"".to_vec(), false),
            ]
        );
        let out = split(&[b"one\ntw", b"o\r\n\nthr", b"ee"], true);
        assert_eq!(out.last().unwrap(), &(b"three".to_vec(), false));
        // After a flush, what follows is a new line.
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        s.push(b"par", |p| out.push(p.bytes.to_vec()));
        assert!(s.has_partial());
        s.flush(|p| out.push(p.bytes.to_vec()));
        assert!(!s.has_partial());
        s.push(b"tial\n", |p| out.push(p.bytes.to_vec()));
        assert_eq!(out, vec![b"par".to_vec(), b"tial".to_vec()]);
    }

    #[test]
    fn long_lines_are_cut_and_memory_stays_bounded() {
        let line = vec![b'a'; MAX_MESSAGE * 2 + 10];
        // In one read.
        let mut whole = line.clone();
        whole.push(b'\n');
        let out = split(&[&whole], false);
        let sizes: Vec<(usize, bool)> = out.iter().map(|(b, c)| (b.len(), *c)).collect();
        assert_eq!(
            sizes,
            vec![(MAX_MESSAGE, false), (MAX_MESSAGE, true), (10, true)]
        );
        // Byte by byte: the pending part never holds more than the maximum.
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        for b in &whole {
            s.push(std::slice::from_ref(b), |p| {
                out.push((p.bytes.len(), p.continued))
            });
            assert!(s.pending.len() <= MAX_MESSAGE);
        }
        assert_eq!(out, sizes);
        // The next line starts fresh.
        let out = split(&[&whole, b"next\n"], false);
        assert_eq!(out.last().unwrap(), &(b"next".to_vec(), false));
    }

    #[test]
    fn cuts_fall_between_utf8_characters() {
        // "é" is two bytes: a cut at an odd offset would split one.
        let text = "é".repeat(MAX_MESSAGE);
        let out = split(&[text.as_bytes(), b"\n"], false);
        assert!(out.iter().all(|(b, _)| std::str::from_utf8(b).is_ok()));
        assert_eq!(out.iter().map(|(b, _)| b.len()).sum::<usize>(), text.len());
        assert_eq!(cut_point("aé".as_bytes(), 2), 1);
        assert_eq!(cut_point("aé".as_bytes(), 3), 3);
        assert_eq!(cut_point(b"abc", 2), 2);
        assert_eq!(cut_point(&[0x80, 0x80, 0x80, 0x80, 0x80], 2), 2);
        assert_eq!(cut_point("a€b".as_bytes(), 2), 1);
    }

    #[test]
    fn bytes_that_are_not_utf8_are_escaped() {
        assert_eq!(escape(b"plain \\ text"), vec!["plain \\ text"]);
        assert_eq!(escape(b"a\xffb\xc3"), vec!["a\\xffb\\xc3"]);
        assert_eq!(escape("héllo".as_bytes()), vec!["héllo"]);
        assert_eq!(escape(b""), vec![""]);
        // Escaping can make a message longer than allowed: it is split,
        // never inside an escape or a character.
        let parts = escape_max(b"ab\xff\xfe\xfdc", 6);
        assert_eq!(parts, vec!["ab\\xff", "\\xfe", "\\xfdc"]);
        let parts = escape_max("aaaaaé".as_bytes(), 6);
        assert_eq!(parts, vec!["aaaaa", "é"]);
        let binary: Vec<u8> = (0..=255u8).cycle().take(MAX_MESSAGE).collect();
        let parts = escape(&binary);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| p.len() <= MAX_MESSAGE));
    }

    #[test]
    fn severities_come_from_the_line_or_the_stream() {
        let mut sev = Severity::Debug;
        let piece = Piece {
            bytes: b"hello",
            continued: false,
        };
        let r = app_records(piece, LogStream::Stdout, 7, &mut sev);
        assert_eq!((r[0].severity, r[0].time_us), (Severity::Info, 7));
        assert_eq!(r[0].stream, Some(LogStream::Stdout));
        let r = app_records(piece, LogStream::Stderr, 7, &mut sev);
        assert_eq!(r[0].severity, Severity::Warn);
        let err = Piece {
            bytes: b"level=error boom",
            continued: false,
        };
        let r = app_records(err, LogStream::Stdout, 7, &mut sev);
        assert_eq!(r[0].severity, Severity::Error);
        // A continued piece keeps its line's severity.
        let r = app_records(
            Piece {
                bytes: b"info: not a new line",
                continued: true,
            },
            LogStream::Stdout,
            8,
            &mut sev,
        );
        assert_eq!(r[0].severity, Severity::Error);
    }
}
