//! The files of an instance's logs dir and their rotation.
//!
//! Per source, the current file (`app.log`, `system.log`) and rotated ones
//! (`app.log.1`, `app.log.2`, …; a higher number is older). One JSON
//! [`LogRecord`](verge_api::logs::LogRecord) per line. Each file has one
//! writer: the shim writes `app.log`, the daemon's log writer
//! `system.log`. A writer rotates before a line would take the current
//! file past [`LogLimits::file_size`]: every rotated file moves one number
//! up, those beyond [`LogLimits::files`] are deleted, and the current one
//! becomes `.1`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use verge_api::logs::LogSource;

use super::LogLimits;

/// The instance's description ([`super::Meta`]).
pub const META: &str = "meta.json";

/// The current file of `source`: `app.log` or `system.log`.
pub fn base_name(source: LogSource) -> &'static str {
    match source {
        LogSource::App => "app.log",
        LogSource::System => "system.log",
    }
}

/// File `n` of `source`: 0 is the current file, 1 the newest rotated one.
pub fn file_name(source: LogSource, n: u32) -> String {
    match n {
        0 => base_name(source).to_owned(),
        n => format!("{}.{n}", base_name(source)),
    }
}

/// Which file of which source `name` is, if it is one.
pub fn parse_name(name: &str) -> Option<(LogSource, u32)> {
    for source in [LogSource::App, LogSource::System] {
        let base = base_name(source);
        if name == base {
            return Some((source, 0));
        }
        if let Some(n) = name
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('.'))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n > 0)
        {
            return Some((source, n));
        }
    }
    None
}

/// The files of `source` in `dir`, oldest first (the current file last):
/// `(n, path)`.
pub fn files(dir: &Path, source: LogSource) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let (s, n) = parse_name(name.to_str()?)?;
            (s == source).then(|| (n, e.path()))
        })
        .collect();
    // Oldest (highest number) first; the current file (0) last.
    found.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    found
}

/// Rotates the files of `source` in `dir`: keeps at most `keep` files in
/// all, the current one becoming `.1` (with `keep` 1 it is deleted).
pub fn rotate(dir: &Path, source: LogSource, keep: u32) -> io::Result<()> {
    let keep = keep.max(1);
    for (n, path) in files(dir, source) {
        if n > 0 && n + 1 >= keep {
            remove_if_there(&path)?;
        }
    }
    for n in (1..keep.saturating_sub(1)).rev() {
        let from = dir.join(file_name(source, n));
        match fs::rename(&from, dir.join(file_name(source, n + 1))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let current = dir.join(file_name(source, 0));
    if keep == 1 {
        return remove_if_there(&current);
    }
    match fs::rename(&current, dir.join(file_name(source, 1))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The one writer of a source's files in an instance's logs dir. Lines
/// are buffered until [`flush`](Self::flush) (or a rotation).
#[derive(Debug)]
pub struct RotatingFile {
    dir: PathBuf,
    source: LogSource,
    limits: LogLimits,
    file: Option<BufWriter<File>>,
    /// Bytes in the current file, buffered ones included.
    size: u64,
}

impl RotatingFile {
    /// Opens (creating `dir` and the file if needed) the current file of
    /// `source` in `dir`, to append to it.
    pub fn open(dir: &Path, source: LogSource, limits: LogLimits) -> io::Result<RotatingFile> {
        fs::create_dir_all(dir)?;
        let mut f = RotatingFile {
            dir: dir.to_owned(),
            source,
            limits,
            file: None,
            size: 0,
        };
        f.reopen()?;
        Ok(f)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(base_name(self.source)))?;
        self.size = file.metadata()?.len();
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    /// Appends `line` (one JSON record and its newline), rotating first if
    /// it would take the file past its size. A line longer than the limit
    /// still goes in, alone.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.file.is_none() || (self.size > 0 && self.size + len > self.limits.file_size) {
            self.rotate()?;
        }
        let file = self.file.as_mut().expect("opened");
        file.write_all(line)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
            rotate(&self.dir, self.source, self.limits.files)?;
        }
        self.reopen()
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_parse_and_sort_oldest_first() {
        assert_eq!(file_name(LogSource::App, 0), "app.log");
        assert_eq!(file_name(LogSource::System, 3), "system.log.3");
        assert_eq!(parse_name("app.log"), Some((LogSource::App, 0)));
        assert_eq!(parse_name("app.log.12"), Some((LogSource::App, 12)));
        assert_eq!(parse_name("system.log.1"), Some((LogSource::System, 1)));
        for bad in [
            "app.log.",
            "app.log.0",
            "app.log.x",
            "app.logs",
            "meta.json",
            "app.log.1.tmp",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "app.log",
            "app.log.2",
            "app.log.10",
            "app.log.1",
            "system.log.1",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        let got: Vec<u32> = files(dir.path(), LogSource::App)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, vec![10, 2, 1, 0]);
        let got: Vec<u32> = files(dir.path(), LogSource::System)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, vec![1]);
        assert!(files(&dir.path().join("none"), LogSource::App).is_empty());
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            file_size: 12,
            files: 3,
            ..LogLimits::default()
        };
        let mut f = RotatingFile::open(dir.path(), LogSource::App, limits).unwrap();
        for i in 0..6 {
            f.write_line(format!("line{i}...\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(names(dir.path()), vec!["app.log", "app.log.1", "app.log.2"]);
        let read = |n| fs::read_to_string(dir.path().join(file_name(LogSource::App, n))).unwrap();
        assert_eq!(read(0), "line5...\n");
        assert_eq!(read(1), "line4...\n");
        assert_eq!(read(2), "line3...\n");

        // Reopening appends and counts what is there.
        let mut f = RotatingFile::open(dir.path(), LogSource::App, limits).unwrap();
        f.write_line(b"x\n").unwrap();
        f.flush().unwrap();
        assert_eq!(read(0), "line5...\nx\n");
        f.write_line(b"y\n").unwrap();
        f.flush().unwrap();
        assert_eq!(read(0), "y\n");
        assert_eq!(read(1), "line5...\nx\n");

        // One file: rotation starts it over.
        let one = LogLimits { files: 1, ..limits };
        let dir = tempfile::tempdir().unwrap();
        let mut f = RotatingFile::open(dir.path(), LogSource::System, one).unwrap();
        for line in ["aaaaaaaa\n", "bbbbbbbb\n"] {
            f.write_line(line.as_bytes()).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(names(dir.path()), vec!["system.log"]);
    }

    #[test]
    fn rotation_drops_files_beyond_a_lowered_count() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "app.log",
            "app.log.1",
            "app.log.2",
            "app.log.3",
            "app.log.7",
        ] {
            fs::write(dir.path().join(name), name).unwrap();
        }
        rotate(dir.path(), LogSource::App, 3).unwrap();
        assert_eq!(names(dir.path()), vec!["app.log.1", "app.log.2"]);
        assert_eq!(
            fs::read_to_string(dir.path().join("app.log.1")).unwrap(),
            "app.log"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("app.log.2")).unwrap(),
            "app.log.1"
        );
    }
}
