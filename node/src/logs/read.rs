//! Reading instances' logs back: the stored history of a [`LogsOpen`],
//! merged by time across files, sources and instances, in batches; then
//! (to follow) what is written after it.
//!
//! Blocking file I/O: run it on a thread of its own. Memory stays bounded:
//! files are read line by line, never whole, with one file per source of
//! each instance open at a time (one buffer, one line and one record each).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use verge_api::logs::{InstanceRecord, LogRecord, LogSource};
use verge_api::wire::{LogsFrame, LogsOpen};

use super::Meta;
use super::file::{self, META};

/// At most this many records per batch.
pub const BATCH_RECORDS: usize = 256;
/// About this many bytes of messages per batch, at most.
pub const BATCH_BYTES: usize = 64 * 1024;
/// What a record adds to a frame besides its message, about.
const RECORD_OVERHEAD: usize = 128;

/// Which records a reader keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub source: Option<LogSource>,
    pub min_severity: Option<verge_api::logs::Severity>,
    /// Inclusive.
    pub since_us: Option<u64>,
    /// Exclusive.
    pub until_us: Option<u64>,
}

impl Filter {
    pub fn of(open: &LogsOpen) -> Filter {
        Filter {
            source: open.source,
            min_severity: open.min_severity,
            since_us: open.since_us,
            until_us: open.until_us,
        }
    }

    pub fn keeps(&self, r: &LogRecord) -> bool {
        self.source.is_none_or(|s| s == r.source)
            && self.min_severity.is_none_or(|s| r.severity >= s)
            && self.since_us.is_none_or(|t| r.time_us >= t)
            && self.until_us.is_none_or(|t| r.time_us < t)
    }
}

/// Whether `id` may name an instance's dir (no path tricks).
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// One source of one instance.
#[derive(Debug)]
struct Stream {
    instance: String,
    workload: String,
    dir: PathBuf,
    source: LogSource,
}

/// Read buffer per open file.
const BUFFER: usize = 16 * 1024;

/// A file being read line by line.
#[derive(Debug)]
struct FileIter {
    reader: BufReader<File>,
    /// Offset just past the last whole line read.
    pos: u64,
    head: Option<LogRecord>,
    line: Vec<u8>,
}

impl FileIter {
    fn new(file: File) -> FileIter {
        FileIter {
            reader: BufReader::with_capacity(BUFFER, file),
            pos: 0,
            head: None,
            line: Vec::new(),
        }
    }

    /// Reads up to the next record `filter` keeps (in `head`), or to the
    /// end of the file's whole lines (`head` is `None`).
    fn advance(&mut self, filter: &Filter) {
        self.head = None;
        while let Some(r) = next_record(&mut self.reader, &mut self.line, &mut self.pos) {
            if filter.keeps(&r) {
                self.head = Some(r);
                return;
            }
        }
    }

    /// The first record of the file, whatever the filter.
    fn first_time(path: &Path) -> Option<u64> {
        let mut reader = BufReader::new(File::open(path).ok()?);
        let (mut line, mut pos) = (Vec::new(), 0);
        next_record(&mut reader, &mut line, &mut pos).map(|r| r.time_us)
    }
}

/// The next record of whole lines from `reader` (lines that do not parse
/// are skipped); `None` at the end of the whole lines, where `pos` is left
/// (an unfinished last line is not consumed: `line` keeps it).
fn next_record(reader: &mut impl BufRead, line: &mut Vec<u8>, pos: &mut u64) -> Option<LogRecord> {
    loop {
        match reader.read_until(b'\n', line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            // The end of the file in the middle of a line: it is not
            // whole yet; keep what was read of it for the next try.
            return None;
        }
        *pos += line.len() as u64;
        let parsed = serde_json::from_slice::<LogRecord>(&line[..line.len() - 1]);
        line.clear();
        if let Ok(r) = parsed {
            return Some(r);
        }
    }
}

/// A source of an instance followed: its current file, read as it grows,
/// through rotations.
#[derive(Debug)]
struct Tail {
    stream: usize,
    /// The current file's path.
    path: PathBuf,
    reader: Option<BufReader<File>>,
    /// The reader is on the current file (not a rotated one read on the
    /// way), which had this identity when opened.
    id: Option<(u64, u64)>,
    /// The current file was replaced: read the old one to its end once
    /// more, then move on.
    replaced: bool,
    /// Rotated files to read before the new current one.
    queue: VecDeque<PathBuf>,
    line: Vec<u8>,
    pos: u64,
}

fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// A file of a stream as listed when the reader was opened; found again
/// by its identity if a rotation renamed it meanwhile.
#[derive(Debug)]
struct Listed {
    path: PathBuf,
    id: (u64, u64),
    /// It was the current file.
    current: bool,
}

impl Listed {
    fn open(&self) -> Option<File> {
        let is_it = |f: &File| f.metadata().is_ok_and(|m| file_id(&m) == self.id);
        if let Some(f) = File::open(&self.path).ok().filter(is_it) {
            return Some(f);
        }
        // Renamed by a rotation: look for it among its neighbours.
        std::fs::read_dir(self.path.parent()?)
            .ok()?
            .flatten()
            .filter(|e| e.metadata().is_ok_and(|m| file_id(&m) == self.id))
            .find_map(|e| File::open(e.path()).ok().filter(is_it))
    }
}

/// The history of one stream: its files read one after the other, one
/// open at a time.
#[derive(Debug)]
struct StreamIter {
    files: VecDeque<Listed>,
    cur: Option<FileIter>,
    /// `cur` is the file that was current when listed.
    cur_current: bool,
}

impl StreamIter {
    /// Moves to the stream's next record `filter` keeps; `false` at the end
    /// of its files (where the current file stays open, for following).
    fn advance(&mut self, filter: &Filter) -> bool {
        loop {
            if let Some(cur) = &mut self.cur {
                cur.advance(filter);
                if cur.head.is_some() {
                    return true;
                }
                if self.cur_current {
                    return false;
                }
            }
            let Some(next) = self.files.pop_front() else {
                self.cur = None;
                return false;
            };
            self.cur = next.open().map(FileIter::new);
            self.cur_current = next.current;
        }
    }

    fn head_time(&self) -> Option<u64> {
        self.cur.as_ref()?.head.as_ref().map(|h| h.time_us)
    }
}

impl Tail {
    fn new(stream: usize, path: PathBuf, from: Option<FileIter>) -> Tail {
        let (reader, id, pos, line) = match from {
            Some(f) => {
                let mut file = f.reader.into_inner();
                let id = file.metadata().ok().map(|m| file_id(&m));
                // Back to the end of the whole lines (the reader may have
                // buffered past it).
                let _ = file.seek(SeekFrom::Start(f.pos));
                (
                    Some(BufReader::with_capacity(BUFFER, file)),
                    id,
                    f.pos,
                    Vec::new(),
                )
            }
            None => (None, None, 0, Vec::new()),
        };
        Tail {
            stream,
            path,
            reader,
            id,
            replaced: false,
            queue: VecDeque::new(),
            line,
            pos,
        }
    }

    /// Reads new records into `out` until it holds `max`; `true` if it
    /// stopped there (more may be waiting).
    fn poll(&mut self, filter: &Filter, out: &mut Vec<(usize, LogRecord)>, max: usize) -> bool {
        loop {
            if let Some(reader) = &mut self.reader {
                while out.len() < max {
                    match next_record(reader, &mut self.line, &mut self.pos) {
                        Some(r) if filter.keeps(&r) => out.push((self.stream, r)),
                        Some(_) => {}
                        None => break,
                    }
                }
                if out.len() >= max {
                    return true;
                }
            }
            // At the end of what the reader has.
            if self.reader.is_some() && self.id.is_none() {
                // A rotated file read on the way: it is complete.
                self.next_file();
                continue;
            }
            let now = std::fs::metadata(&self.path).ok().map(|m| file_id(&m));
            if now.is_some() && now == self.id {
                return false;
            }
            if now.is_none() && self.reader.is_none() {
                return false;
            }
            if self.reader.is_some() && !self.replaced {
                // Replaced (rotated or deleted): what the writer wrote
                // before that may have come after the read above.
                self.replaced = true;
                continue;
            }
            self.queue = self.newer_rotated();
            self.next_file();
            if self.reader.is_none() {
                return false;
            }
        }
    }

    /// The rotated files newer than the one being read (oldest first):
    /// written while the follower was not looking.
    fn newer_rotated(&self) -> VecDeque<PathBuf> {
        let Some(id) = self.id else {
            return VecDeque::new();
        };
        let Some(dir) = self.path.parent() else {
            return VecDeque::new();
        };
        let source = file::parse_name(
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default(),
        )
        .map_or(LogSource::App, |(s, _)| s);
        let files = file::files(dir, source);
        let at = files
            .iter()
            .position(|(_, p)| std::fs::metadata(p).is_ok_and(|m| file_id(&m) == id));
        match at {
            Some(at) => files[at + 1..]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(_, p)| p.clone())
                .collect(),
            None => VecDeque::new(),
        }
    }

    /// Opens the next rotated file queued, else the current file.
    fn next_file(&mut self) {
        self.line.clear();
        self.pos = 0;
        self.replaced = false;
        while let Some(path) = self.queue.pop_front() {
            if let Ok(f) = File::open(&path) {
                self.reader = Some(BufReader::with_capacity(BUFFER, f));
                self.id = None;
                return;
            }
        }
        match File::open(&self.path) {
            Ok(f) => {
                self.id = f.metadata().ok().map(|m| file_id(&m));
                self.reader = Some(BufReader::with_capacity(BUFFER, f));
            }
            Err(_) => {
                self.reader = None;
                self.id = None;
            }
        }
    }
}

/// The records of a [`LogsOpen`]: first the stored history
/// ([`next_history`](Self::next_history)), then what is written after it
/// ([`next_live`](Self::next_live)). At most one file per source of each
/// instance is open at a time.
#[derive(Debug)]
pub struct Reader {
    filter: Filter,
    streams: Vec<Stream>,
    iters: Vec<StreamIter>,
    /// Heads of the streams, least time first; equal times in the order
    /// of the streams.
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    missing: VecDeque<LogsFrame>,
    tails: Vec<Tail>,
    /// Where the next live poll starts, for fairness.
    next_tail: usize,
}

impl Reader {
    /// Lists the files of the instances `open` asks for, in the logs dir
    /// `root` of node `node` (for the reasons of instances it has no logs
    /// of), and reads up to the first record of each source.
    pub fn open(root: &Path, node: &str, open: &LogsOpen) -> Reader {
        let filter = Filter::of(open);
        let mut r = Reader {
            filter,
            streams: Vec::new(),
            iters: Vec::new(),
            heap: BinaryHeap::new(),
            missing: VecDeque::new(),
            tails: Vec::new(),
            next_tail: 0,
        };
        let sources: Vec<LogSource> = match open.source {
            Some(s) => vec![s],
            None => vec![LogSource::App, LogSource::System],
        };
        let mut seen = std::collections::HashSet::new();
        for id in &open.instances {
            if !seen.insert(id.as_str()) {
                continue;
            }
            let dir = root.join(id);
            if !valid_instance_id(id) || !dir.is_dir() {
                r.missing.push_back(LogsFrame::Missing {
                    instance: id.clone(),
                    reason: format!(
                        "no logs of instance {id} on node {node} (never ran here, or pruned)"
                    ),
                });
                continue;
            }
            let workload = super::state::read_json::<Meta>(&dir.join(META))
                .map(|m| m.workload)
                .unwrap_or_default();
            for &source in &sources {
                let files = file::files(&dir, source);
                let mut listed = VecDeque::new();
                for (i, (n, path)) in files.iter().enumerate() {
                    // A rotated file whose successor starts before `since`
                    // holds nothing from `since` on (times do not go back
                    // within a source).
                    if let (Some(since), Some((_, next))) = (r.filter.since_us, files.get(i + 1))
                        && FileIter::first_time(next).is_some_and(|t| t < since)
                    {
                        continue;
                    }
                    if let Ok(m) = std::fs::metadata(path) {
                        listed.push_back(Listed {
                            path: path.clone(),
                            id: file_id(&m),
                            current: *n == 0,
                        });
                    }
                }
                let stream = r.streams.len();
                r.streams.push(Stream {
                    instance: id.clone(),
                    workload: workload.clone(),
                    dir: dir.clone(),
                    source,
                });
                let mut iter = StreamIter {
                    files: listed,
                    cur: None,
                    cur_current: false,
                };
                if let Some(t) = iter.advance(&r.filter).then(|| iter.head_time()).flatten() {
                    r.heap.push(Reverse((t, stream)));
                }
                r.iters.push(iter);
            }
        }
        r
    }

    fn stamp(&self, stream: usize, record: LogRecord) -> InstanceRecord {
        let s = &self.streams[stream];
        InstanceRecord {
            instance: s.instance.clone(),
            workload: s.workload.clone(),
            record,
        }
    }

    /// The next frame of the history: [`LogsFrame::Missing`] for each
    /// instance without logs, then [`LogsFrame::Records`] in time order,
    /// at most [`BATCH_RECORDS`] records and about [`BATCH_BYTES`] each;
    /// `None` once the history is out.
    pub fn next_history(&mut self) -> Option<LogsFrame> {
        if let Some(m) = self.missing.pop_front() {
            return Some(m);
        }
        let mut records = Vec::new();
        let mut bytes = 0;
        while let Some(Reverse((_, stream))) = self.heap.pop() {
            let iter = &mut self.iters[stream];
            let Some(record) = iter.cur.as_mut().and_then(|c| c.head.take()) else {
                continue;
            };
            if let Some(t) = iter
                .advance(&self.filter)
                .then(|| iter.head_time())
                .flatten()
            {
                self.heap.push(Reverse((t, stream)));
            }
            bytes += record.message.len() + RECORD_OVERHEAD;
            records.push(self.stamp(stream, record));
            if records.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
                break;
            }
        }
        (!records.is_empty()).then_some(LogsFrame::Records { records })
    }

    /// Records written since the history (or the last call), at most
    /// [`BATCH_RECORDS`], in time order; empty when there is nothing new.
    /// Call again at once when it returned a full batch. Call only after
    /// [`next_history`](Self::next_history) returned `None`.
    pub fn next_live(&mut self) -> Vec<InstanceRecord> {
        if self.tails.is_empty() && !self.streams.is_empty() {
            self.start_tails();
        }
        let mut out = Vec::new();
        let n = self.tails.len();
        for k in 0..n {
            let i = (self.next_tail + k) % n;
            if self.tails[i].poll(&self.filter, &mut out, BATCH_RECORDS) {
                self.next_tail = i;
                break;
            }
        }
        out.sort_by_key(|(_, r)| r.time_us);
        out.into_iter().map(|(s, r)| self.stamp(s, r)).collect()
    }

    fn start_tails(&mut self) {
        self.heap.clear();
        for (stream, iter) in self.iters.iter_mut().enumerate() {
            let from = if iter.cur_current {
                iter.cur.take()
            } else {
                None
            };
            let s = &self.streams[stream];
            let path = s.dir.join(file::base_name(s.source));
            self.tails.push(Tail::new(stream, path, from));
        }
        self.iters.clear();
    }
}

/// Everything a reader returns for `open` at once (for tests and small
/// reads): the history's frames.
pub fn read_all(root: &Path, node: &str, open: &LogsOpen) -> Vec<LogsFrame> {
    let mut r = Reader::open(root, node, open);
    std::iter::from_fn(|| r.next_history()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use verge_api::logs::{LogStream, Severity};

    fn rec(t: u64, source: LogSource, sev: Severity, msg: &str) -> LogRecord {
        LogRecord {
            time_us: t,
            source,
            stream: (source == LogSource::App).then_some(LogStream::Stdout),
            severity: sev,
            message: msg.into(),
        }
    }

    fn append(path: &Path, records: &[LogRecord]) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for r in records {
            let mut line = serde_json::to_vec(r).unwrap();
            line.push(b'\n');
            f.write_all(&line).unwrap();
        }
    }

    fn records(frames: &[LogsFrame]) -> Vec<(String, String)> {
        frames
            .iter()
            .flat_map(|f| match f {
                LogsFrame::Records { records } => records.clone(),
                _ => Vec::new(),
            })
            .map(|r| (r.instance, r.record.message))
            .collect()
    }

    fn open(instances: &[&str]) -> LogsOpen {
        LogsOpen {
            instances: instances.iter().map(|s| s.to_string()).collect(),
            ..LogsOpen::default()
        }
    }

    /// Two instances, each with rotated app files and a system file.
    fn fixture() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let b = root.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let meta = |id: &str, workload: &str| Meta {
            instance: id.into(),
            workload: workload.into(),
            ..Meta::default()
        };
        super::super::state::write_json(&a.join(META), &meta("a", "web")).unwrap();
        use LogSource::{App, System};
        use Severity::*;
        append(
            &a.join("app.log.2"),
            &[rec(10, App, Info, "a10"), rec(20, App, Info, "a20")],
        );
        append(
            &a.join("app.log.1"),
            &[rec(30, App, Error, "a30"), rec(40, App, Info, "a40")],
        );
        append(
            &a.join("app.log"),
            &[rec(50, App, Info, "a50"), rec(70, App, Warn, "a70")],
        );
        append(
            &a.join("system.log"),
            &[rec(5, System, Info, "a5s"), rec(45, System, Error, "a45s")],
        );
        append(
            &b.join("app.log"),
            &[
                rec(15, App, Debug, "b15"),
                rec(40, App, Info, "b40"),
                rec(60, App, Info, "b60"),
            ],
        );
        root
    }

    #[test]
    fn history_is_merged_by_time() {
        let root = fixture();
        let frames = read_all(root.path(), "n1", &open(&["a", "b", "ghost"]));
        assert_eq!(
            frames[0],
            LogsFrame::Missing {
                instance: "ghost".into(),
                reason: "no logs of instance ghost on node n1 (never ran here, or pruned)".into()
            }
        );
        let got: Vec<String> = records(&frames).into_iter().map(|(_, m)| m).collect();
        assert_eq!(
            got,
            [
                "a5s", "a10", "b15", "a20", "a30", "a40", "b40", "a45s", "a50", "b60", "a70"
            ]
        );
        let LogsFrame::Records { records } = &frames[1] else {
            panic!("{frames:?}")
        };
        assert_eq!(records[0].workload, "web");
        assert_eq!(records[2].workload, "", "b has no meta.json");
    }

    #[test]
    fn filters_select_exactly() {
        let root = fixture();
        let msgs = |o: LogsOpen| -> Vec<String> {
            records(&read_all(root.path(), "n", &o))
                .into_iter()
                .map(|(_, m)| m)
                .collect()
        };
        let base = open(&["a", "b"]);
        assert_eq!(
            msgs(LogsOpen {
                source: Some(LogSource::System),
                ..base.clone()
            }),
            ["a5s", "a45s"]
        );
        assert_eq!(
            msgs(LogsOpen {
                min_severity: Some(Severity::Warn),
                ..base.clone()
            }),
            ["a30", "a45s", "a70"]
        );
        assert_eq!(
            msgs(LogsOpen {
                since_us: Some(40),
                until_us: Some(60),
                ..base.clone()
            }),
            ["a40", "b40", "a45s", "a50"]
        );
        assert_eq!(
            msgs(LogsOpen {
                since_us: Some(41),
                source: Some(LogSource::App),
                ..base.clone()
            }),
            ["a50", "b60", "a70"]
        );
        assert!(msgs(open(&["../a", ""])).is_empty());
        let frames = read_all(root.path(), "n", &open(&["../a"]));
        assert!(matches!(frames[0], LogsFrame::Missing { .. }));
    }

    #[test]
    fn batches_are_bounded() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("big");
        std::fs::create_dir_all(&dir).unwrap();
        let many: Vec<LogRecord> = (0..1000)
            .map(|i| rec(i, LogSource::App, Severity::Info, &"x".repeat(1000)))
            .collect();
        append(&dir.join("app.log"), &many);
        let frames = read_all(root.path(), "n", &open(&["big"]));
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| match f {
                LogsFrame::Records { records } => records.len(),
                _ => 0,
            })
            .collect();
        assert!(
            sizes
                .iter()
                .all(|s| *s > 0 && *s * 1000 <= BATCH_BYTES + 1128),
            "{sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
    }

    #[test]
    fn follow_reads_new_lines_through_rotation() {
        let root = fixture();
        let a = root.path().join("a");
        let mut r = Reader::open(root.path(), "n", &open(&["a"]));
        while r.next_history().is_some() {}
        assert!(r.next_live().is_empty());
        // An unfinished line waits for its end.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(a.join("app.log"))
            .unwrap();
        let line = serde_json::to_string(&rec(80, LogSource::App, Severity::Info, "a80")).unwrap();
        f.write_all(&line.as_bytes()[..10]).unwrap();
        assert!(r.next_live().is_empty());
        f.write_all(&line.as_bytes()[10..]).unwrap();
        f.write_all(b"\n").unwrap();
        let got: Vec<String> = r
            .next_live()
            .into_iter()
            .map(|r| r.record.message)
            .collect();
        assert_eq!(got, ["a80"]);
        // Two rotations between polls: nothing is lost.
        append(
            &a.join("app.log"),
            &[rec(90, LogSource::App, Severity::Info, "a90")],
        );
        file::rotate(&a, LogSource::App, 5).unwrap();
        append(
            &a.join("app.log"),
            &[rec(100, LogSource::App, Severity::Info, "a100")],
        );
        file::rotate(&a, LogSource::App, 5).unwrap();
        append(
            &a.join("app.log"),
            &[rec(110, LogSource::App, Severity::Info, "a110")],
        );
        append(
            &a.join("system.log"),
            &[rec(105, LogSource::System, Severity::Info, "a105s")],
        );
        let got: Vec<String> = r
            .next_live()
            .into_iter()
            .map(|r| r.record.message)
            .collect();
        assert_eq!(got, ["a90", "a100", "a105s", "a110"]);
        assert!(r.next_live().is_empty());
    }

    #[test]
    fn a_rotation_while_reading_loses_and_repeats_nothing() {
        let root = fixture();
        let a = root.path().join("a");
        let mut r = Reader::open(
            root.path(),
            "n",
            &LogsOpen {
                source: Some(LogSource::App),
                follow: true,
                ..open(&["a"])
            },
        );
        // Every file moves one number up; a new current file starts.
        file::rotate(&a, LogSource::App, 5).unwrap();
        append(
            &a.join("app.log"),
            &[rec(80, LogSource::App, Severity::Info, "a80")],
        );
        let frames: Vec<LogsFrame> = std::iter::from_fn(|| r.next_history()).collect();
        let got: Vec<String> = records(&frames).into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, ["a10", "a20", "a30", "a40", "a50", "a70"]);
        let live: Vec<String> = r
            .next_live()
            .into_iter()
            .map(|r| r.record.message)
            .collect();
        assert_eq!(live, ["a80"]);
    }

    #[test]
    fn follow_picks_up_files_created_later() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("new");
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Reader::open(root.path(), "n", &open(&["new"]));
        assert!(r.next_history().is_none());
        assert!(r.next_live().is_empty());
        append(
            &dir.join("app.log"),
            &[rec(1, LogSource::App, Severity::Info, "hello")],
        );
        let got: Vec<String> = r
            .next_live()
            .into_iter()
            .map(|r| r.record.message)
            .collect();
        assert_eq!(got, ["hello"]);
    }
}
