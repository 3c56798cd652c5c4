//! What the shim does with the bytes it reads from the workload's stdout
//! and stderr pipes: app records in `app.log`, rotated by size. No thread,
//! no runtime: the shim calls it from its `poll` loop.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use verge_api::logs::{LogSource, LogStream, Severity};

use super::LogLimits;
use super::file::RotatingFile;
use super::line::{LineSplitter, app_records};

/// How long an unfinished line waits for its end before it is written as
/// a record of its own.
pub const QUIET: Duration = Duration::from_millis(250);

/// Microseconds since the epoch, now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
struct Output {
    stream: LogStream,
    lines: LineSplitter,
    /// The severity of the line being cut in pieces.
    severity: Severity,
    /// When bytes of the unfinished line last arrived (and that time in
    /// microseconds since the epoch, its record's time).
    last_data: Option<(Instant, u64)>,
}

/// The app records of one instance being written.
#[derive(Debug)]
pub struct Capture {
    file: RotatingFile,
    outputs: [Output; 2],
    /// The last record's time: times never go back within the file, even
    /// if the clock does.
    last_us: u64,
    /// The first write error, reported once.
    failed: bool,
}

impl Capture {
    /// Opens (creating it if needed) `app.log` in `dir`.
    pub fn open(dir: &Path, limits: LogLimits) -> io::Result<Capture> {
        let output = |stream| Output {
            stream,
            lines: LineSplitter::new(),
            severity: Severity::Info,
            last_data: None,
        };
        Ok(Capture {
            file: RotatingFile::open(dir, LogSource::App, limits)?,
            outputs: [output(LogStream::Stdout), output(LogStream::Stderr)],
            last_us: 0,
            failed: false,
        })
    }

    fn output(&mut self, stream: LogStream) -> usize {
        match stream {
            LogStream::Stdout => 0,
            LogStream::Stderr => 1,
        }
    }

    /// Takes bytes just read from `stream`.
    pub fn take(&mut self, stream: LogStream, bytes: &[u8], now: Instant) {
        let time = now_us();
        let i = self.output(stream);
        let mut records = Vec::new();
        let out = &mut self.outputs[i];
        let severity = &mut out.severity;
        out.lines.push(bytes, |piece| {
            records.extend(app_records(piece, stream, time, severity));
        });
        out.last_data = out.lines.has_partial().then_some((now, time));
        self.write(records);
    }

    /// Writes the unfinished line of `stream`, if any (at the end of the
    /// output), with the time its last bytes were read.
    pub fn flush_partial(&mut self, stream: LogStream) {
        let i = self.output(stream);
        let mut records = Vec::new();
        let out = &mut self.outputs[i];
        let time = out.last_data.map_or_else(now_us, |(_, t)| t);
        let severity = &mut out.severity;
        out.lines.flush(|piece| {
            records.extend(app_records(piece, stream, time, severity));
        });
        out.last_data = None;
        self.write(records);
    }

    /// When the next unfinished line is due to be written on its own.
    pub fn quiet_deadline(&self) -> Option<Instant> {
        self.outputs
            .iter()
            .filter_map(|o| o.last_data.map(|(t, _)| t))
            .min()
            .map(|t| t + QUIET)
    }

    /// Writes the unfinished lines that waited [`QUIET`] for their end.
    pub fn flush_quiet(&mut self, now: Instant) {
        for i in 0..self.outputs.len() {
            if self.outputs[i]
                .last_data
                .is_some_and(|(t, _)| now.duration_since(t) >= QUIET)
            {
                let stream = self.outputs[i].stream;
                self.flush_partial(stream);
            }
        }
    }

    fn write(&mut self, records: Vec<verge_api::logs::LogRecord>) {
        for mut r in records {
            r.time_us = r.time_us.max(self.last_us);
            self.last_us = r.time_us;
            let mut line = serde_json::to_vec(&r).expect("records serialise");
            line.push(b'\n');
            if let Err(e) = self.file.write_line(&line) {
                self.report(e);
            }
        }
    }

    /// Writes what is buffered to `app.log` (each round of the shim's loop).
    pub fn flush(&mut self) {
        if let Err(e) = self.file.flush() {
            self.report(e);
        }
    }

    fn report(&mut self, e: io::Error) {
        if !self.failed {
            // The shim's stderr is its shim.log.
            eprintln!("verge-shim: writing app.log: {e} (records are lost until it works again)");
            self.failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::logs::LogRecord;

    fn records(dir: &Path) -> Vec<LogRecord> {
        std::fs::read_to_string(dir.join("app.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn outputs_become_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Capture::open(dir.path(), LogLimits::default()).unwrap();
        let t0 = Instant::now();
        c.take(LogStream::Stdout, b"out one\nout tw", t0);
        c.take(LogStream::Stderr, b"err\n", t0);
        assert_eq!(c.quiet_deadline(), Some(t0 + QUIET));
        c.flush_quiet(t0 + QUIET / 2);
        c.take(LogStream::Stdout, b"o", t0 + QUIET / 2);
        c.flush_quiet(t0 + QUIET);
        c.flush();
        assert_eq!(records(dir.path()).len(), 2, "the partial line waits");
        c.flush_quiet(t0 + QUIET * 2);
        c.flush();
        let got = records(dir.path());
        let msgs: Vec<(&str, LogStream, Severity)> = got
            .iter()
            .map(|r| (r.message.as_str(), r.stream.unwrap(), r.severity))
            .collect();
        assert_eq!(
            msgs,
            vec![
                ("out one", LogStream::Stdout, Severity::Info),
                ("err", LogStream::Stderr, Severity::Warn),
                ("out two", LogStream::Stdout, Severity::Info),
            ]
        );
        assert!(got.windows(2).all(|w| w[0].time_us <= w[1].time_us));
        assert!(got[0].time_us > 1_600_000_000_000_000);
        assert_eq!(c.quiet_deadline(), None);
    }
}
