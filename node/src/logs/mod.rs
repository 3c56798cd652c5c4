//! Instance logs on the node (SPEC §5 Logs).
//!
//! Every instance has a logs dir, `<data dir>/logs/<instance id>/`, from
//! its first launch until retention deletes it ([`prune`]):
//!
//! - `meta.json`: the instance's [`Meta`] (workload, org, app, env,
//!   release, when it started and ended), written by the daemon;
//! - `app.log`, `app.log.1`, … : the workload's stdout and stderr, one
//!   record per line ([`line`]), written by the instance's shim
//!   ([`capture`]), which outlives the daemon, so nothing the workload
//!   writes while no daemon runs is lost;
//! - `system.log`, `system.log.1`, … : Verge's account of the instance's
//!   lifecycle (pulling, starting, started, healthy, unhealthy, exited,
//!   OOM-killed, restarting, failed, stopping, stopped, re-adopted),
//!   written by the daemon's log writer thread ([`Logs::system`]);
//! - `exit.json` and `shim.log` of the last run, kept when its runtime dir
//!   is removed.
//!
//! Each line of the `.log` files is one [`LogRecord`] as JSON. Files
//! rotate by size ([`file`]); [`LogLimits`] bounds them. The control
//! plane reads them on a logs stream ([`Logs::serve`], [`read`]).

mod capture;
pub mod file;
pub mod line;
pub mod prune;
pub mod read;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use verge_api::logs::{LogRecord, LogSource, Severity};
use verge_api::wire::io::Writer;
use verge_api::wire::{InstanceSpec, LogsFrame, LogsOpen};

use crate::runtime::state;

pub use capture::{Capture, QUIET, now_us};
pub use read::{BATCH_BYTES, BATCH_RECORDS, Filter, Reader};

/// Default of [`LogLimits::file_size`]: 8 MiB.
pub const DEFAULT_FILE_SIZE: u64 = 8 << 20;
/// Default of [`LogLimits::files`].
pub const DEFAULT_FILES: u32 = 4;
/// Default of [`LogLimits::max_age`]: 7 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of [`LogLimits::keep_instances`].
pub const DEFAULT_KEEP_INSTANCES: u32 = 5;
/// How often retention runs (also at start and whenever an instance ends).
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often a followed stream looks for new records.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// How much log the node keeps (`verge node --log-file-size`,
/// `--log-files`, `--log-max-age`, `--log-keep-instances`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogLimits {
    /// Bytes of one file, before it rotates (a single longer line still
    /// goes in). Default 8 MiB.
    pub file_size: u64,
    /// Files kept per source of an instance, the current one included
    /// (at least 1). Default 4: at most 4 × 8 MiB of app logs and as much
    /// of system logs per instance.
    pub files: u32,
    /// Rotated files not written for this long are deleted. Default 7 days.
    pub max_age: Duration,
    /// Logs of ended instances kept per (env, workload): the newest this
    /// many; older ones are deleted whole. Default 5.
    pub keep_instances: u32,
}

impl Default for LogLimits {
    fn default() -> LogLimits {
        LogLimits {
            file_size: DEFAULT_FILE_SIZE,
            files: DEFAULT_FILES,
            max_age: DEFAULT_MAX_AGE,
            keep_instances: DEFAULT_KEEP_INSTANCES,
        }
    }
}

/// An instance's `meta.json`: what its records belong to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub instance: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub org: String,
    #[serde(default)]
    pub app: String,
    #[serde(default)]
    pub env: String,
    #[serde(default)]
    pub release: String,
    /// First launch on this node, milliseconds since the epoch.
    #[serde(default)]
    pub started_ms: i64,
    /// When it left the node (stopped and removed); `None` while it is
    /// live. Ended instances are subject to `keep_instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
}

impl Meta {
    pub fn of(spec: &InstanceSpec) -> Meta {
        Meta {
            instance: spec.id.clone(),
            workload: spec.workload.clone(),
            org: spec.org.clone(),
            app: spec.app.clone(),
            env: spec.env.clone(),
            release: spec.release.clone(),
            started_ms: state::now_ms(),
            ended_ms: None,
        }
    }
}

/// What the log writer thread is asked to do, in order.
enum Cmd {
    Record {
        instance: String,
        record: LogRecord,
    },
    Started(Meta),
    Ended {
        instance: String,
        at_ms: i64,
    },
    /// Every instance not in the set that has not ended has ended.
    EndedExcept {
        live: HashSet<String>,
        at_ms: i64,
    },
    Prune,
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// The node's log store: where instance logs live, their limits, and the
/// writer of system records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Logs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    limits: LogLimits,
    node: String,
    writer: std_mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Record { .. } => "Record",
            Cmd::Started(_) => "Started",
            Cmd::Ended { .. } => "Ended",
            Cmd::EndedExcept { .. } => "EndedExcept",
            Cmd::Prune => "Prune",
            Cmd::Sync(_) => "Sync",
        })
    }
}

impl Logs {
    /// The store in `dir` (`<data dir>/logs`) of node `node` (its name, for
    /// messages). Starts the writer thread, which ends with the last clone.
    pub fn new(dir: impl Into<PathBuf>, limits: LogLimits, node: impl Into<String>) -> Logs {
        let dir = dir.into();
        let limits = LogLimits {
            files: limits.files.max(1),
            ..limits
        };
        let (tx, rx) = std_mpsc::channel();
        let root = dir.clone();
        std::thread::Builder::new()
            .name("logs-writer".into())
            .spawn(move || writer(root, limits, rx))
            .expect("spawning the log writer thread");
        Logs {
            inner: Arc::new(Inner {
                dir,
                limits,
                node: node.into(),
                writer: tx,
            }),
        }
    }

    /// `<data dir>/logs`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn limits(&self) -> LogLimits {
        self.inner.limits
    }

    /// `<data dir>/logs/<id>`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.inner.dir.join(id)
    }

    fn send(&self, cmd: Cmd) {
        // The thread ends only when every sender is gone.
        let _ = self.inner.writer.send(cmd);
    }

    /// Records a system record of `instance`, stamped now. Never blocks:
    /// the writer thread writes it.
    pub fn system(&self, instance: &str, severity: Severity, message: impl Into<String>) {
        self.send(Cmd::Record {
            instance: instance.to_owned(),
            record: LogRecord {
                time_us: now_us(),
                source: LogSource::System,
                stream: None,
                severity,
                message: message.into(),
            },
        });
    }

    /// The instance is (again) on this node: writes its `meta.json`, or
    /// marks it live again if it had ended.
    pub fn instance_started(&self, meta: Meta) {
        self.send(Cmd::Started(meta));
    }

    /// The instance left this node: its logs now count as an ended
    /// instance's, and retention runs.
    pub fn instance_ended(&self, instance: &str) {
        self.send(Cmd::Ended {
            instance: instance.to_owned(),
            at_ms: state::now_ms(),
        });
    }

    /// Marks ended every instance with logs here but not in `live` (for a
    /// daemon that starts: those left while no daemon ran).
    pub fn ended_except(&self, live: impl IntoIterator<Item = String>) {
        self.send(Cmd::EndedExcept {
            live: live.into_iter().collect(),
            at_ms: state::now_ms(),
        });
    }

    /// Waits until everything asked before is written (and pruned).
    pub async fn sync(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Cmd::Sync(tx));
        let _ = rx.await;
    }

    /// Runs retention now and waits for it.
    pub async fn prune(&self) {
        self.send(Cmd::Prune);
        self.sync().await;
    }

    /// Retention at start and every [`PRUNE_EVERY`], until `shutdown`.
    /// The daemon runs it as the task `logs_housekeeping`.
    pub async fn housekeeping(self, shutdown: CancellationToken) {
        loop {
            self.prune().await;
            tokio::select! {
                () = tokio::time::sleep(PRUNE_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// A reader of the records `open` asks for (see [`Reader`]). Blocking
    /// file I/O: call it, and the reader, off the async runtime.
    pub fn reader(&self, open: &LogsOpen) -> Reader {
        Reader::open(&self.inner.dir, &self.inner.node, open)
    }

    /// Serves one logs stream (see [`LogsOpen`]): the history as
    /// [`LogsFrame::Missing`] and [`LogsFrame::Records`] frames, then
    /// [`LogsFrame::HistoryEnd`]; then, with `follow`, new records as they
    /// are written, until the control plane stops the stream, resets or
    /// finishes its side of it, or the session ends. Without `follow` the
    /// stream is finished after `HistoryEnd`.
    ///
    /// A thread reads the files and hands frames over a channel of two:
    /// a slow reader on the other end (QUIC flow control) slows it down,
    /// and memory stays bounded.
    pub async fn serve(&self, open: LogsOpen, mut send: SendStream, mut recv: RecvStream) {
        // The system records of what happened so far are on disk.
        self.sync().await;
        let follow = open.follow;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<LogsFrame>(2);
        let logs = self.clone();
        let spawned = std::thread::Builder::new()
            .name("logs-reader".into())
            .spawn(move || produce(&logs, &open, &tx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a log reader thread");
            let _ = send.reset(VarInt::from_u32(0));
            return;
        }
        let stopped = send.stopped();
        tokio::pin!(stopped);
        let mut buf = [0u8; 512];
        let mut peer_open = true;
        let mut history_ended = false;
        loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    history_ended |= matches!(frame, LogsFrame::HistoryEnd);
                    if let Err(e) = Writer::new(&mut send).send(&frame).await {
                        tracing::debug!(error = %e, "logs stream ended by the peer");
                        return;
                    }
                }
                _ = &mut stopped => {
                    tracing::debug!("logs stream stopped by the peer");
                    return;
                }
                read = recv.read(&mut buf), if peer_open => match read {
                    // Nothing is expected from the control plane; ignored.
                    Ok(Some(_)) => {}
                    // The peer finished its side: that ends a followed
                    // stream once the history is out; a history is sent
                    // to its end regardless.
                    Ok(None) => {
                        peer_open = false;
                        if follow && history_ended {
                            break;
                        }
                    }
                    Err(_) => return,
                },
            }
            if follow && history_ended && !peer_open {
                break;
            }
        }
        let _ = send.finish();
    }
}

/// The reader thread of [`Logs::serve`]: frames until the history is out
/// (and, with `follow`, new records until the channel closes).
fn produce(logs: &Logs, open: &LogsOpen, tx: &tokio::sync::mpsc::Sender<LogsFrame>) {
    let mut reader = logs.reader(open);
    while let Some(frame) = reader.next_history() {
        if tx.blocking_send(frame).is_err() {
            return;
        }
    }
    if tx.blocking_send(LogsFrame::HistoryEnd).is_err() || !open.follow {
        return;
    }
    loop {
        let records = reader.next_live();
        let full = records.len() >= BATCH_RECORDS;
        if !records.is_empty() && tx.blocking_send(LogsFrame::Records { records }).is_err() {
            return;
        }
        if !full {
            if tx.is_closed() {
                return;
            }
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}

/// The log writer thread: system records, `meta.json` files, retention.
fn writer(root: PathBuf, limits: LogLimits, rx: std_mpsc::Receiver<Cmd>) {
    // Per instance, its last system record's time: times never go back
    // within a file, even if the clock does.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut failed = false;
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::Record {
                instance,
                mut record,
            } => {
                if !read::valid_instance_id(&instance) {
                    continue;
                }
                let t = last.entry(instance.clone()).or_default();
                record.time_us = record.time_us.max(*t);
                *t = record.time_us;
                let written = append_system(&root.join(&instance), &record, limits);
                match written {
                    Err(e) if !failed => {
                        tracing::warn!(instance = %instance, error = %e, "cannot write a system log record");
                        failed = true;
                    }
                    Err(_) => {}
                    Ok(()) => failed = false,
                }
            }
            Cmd::Started(meta) => {
                if let Err(e) = started(&root, meta) {
                    tracing::warn!(error = %e, "cannot write an instance's meta.json");
                }
            }
            Cmd::Ended { instance, at_ms } => {
                last.remove(&instance);
                if let Err(e) = ended(&root, &instance, at_ms) {
                    tracing::warn!(instance = %instance, error = %e, "cannot mark the instance's logs ended");
                }
                prune_now(&root, &limits);
            }
            Cmd::EndedExcept { live, at_ms } => {
                let ids: Vec<String> = std::fs::read_dir(&root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|id| !live.contains(id))
                    .collect();
                for id in ids {
                    let path = root.join(&id).join(file::META);
                    if state::read_json::<Meta>(&path).is_ok_and(|m| m.ended_ms.is_none()) {
                        let _ = ended(&root, &id, at_ms);
                    }
                }
            }
            Cmd::Prune => prune_now(&root, &limits),
            Cmd::Sync(done) => {
                let _ = done.send(());
            }
        }
    }
}

fn append_system(dir: &Path, record: &LogRecord, limits: LogLimits) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).expect("records serialise");
    line.push(b'\n');
    let mut f = file::RotatingFile::open(dir, LogSource::System, limits)?;
    f.write_line(&line)?;
    f.flush()
}

fn started(root: &Path, meta: Meta) -> std::io::Result<()> {
    if !read::valid_instance_id(&meta.instance) {
        return Ok(());
    }
    let dir = root.join(&meta.instance);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file::META);
    let meta = match state::read_json::<Meta>(&path) {
        Ok(old) if old.ended_ms.is_none() && !old.workload.is_empty() => return Ok(()),
        Ok(old) => Meta {
            started_ms: old.started_ms,
            ..meta
        },
        Err(_) => meta,
    };
    state::write_json(&path, &meta)
}

fn ended(root: &Path, instance: &str, at_ms: i64) -> std::io::Result<()> {
    if !read::valid_instance_id(instance) {
        return Ok(());
    }
    let dir = root.join(instance);
    if !dir.is_dir() {
        return Ok(());
    }
    let path = dir.join(file::META);
    let mut meta = state::read_json::<Meta>(&path).unwrap_or_else(|_| Meta {
        instance: instance.to_owned(),
        started_ms: at_ms,
        ..Meta::default()
    });
    if meta.ended_ms.is_some() {
        return Ok(());
    }
    meta.ended_ms = Some(at_ms);
    state::write_json(&path, &meta)
}

fn prune_now(root: &Path, limits: &LogLimits) {
    // An instance still has a runtime dir in `<data dir>/instances`.
    let instances = root
        .parent()
        .map(|p| p.join("instances"))
        .unwrap_or_default();
    let pruned = prune::prune(root, limits, std::time::SystemTime::now(), |id| {
        instances.join(id).exists()
    });
    if !pruned.instances.is_empty() {
        tracing::info!(instances = ?pruned.instances, "deleted the logs of ended instances beyond --log-keep-instances");
    }
    if !pruned.files.is_empty() {
        tracing::info!(
            files = pruned.files.len(),
            "deleted rotated log files older than --log-max-age"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn system_records_meta_and_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("logs");
        let logs = Logs::new(&root, LogLimits::default(), "n1");
        logs.instance_started(Meta {
            instance: "i1".into(),
            workload: "web".into(),
            env: "e".into(),
            started_ms: 5,
            ..Meta::default()
        });
        logs.system("i1", Severity::Info, "pulling image x");
        logs.system("i1", Severity::Error, "exited with code 3");
        logs.system("../evil", Severity::Info, "no");
        logs.sync().await;
        let open = LogsOpen {
            instances: vec!["i1".into()],
            ..LogsOpen::default()
        };
        let frames = read::read_all(&root, "n1", &open);
        let LogsFrame::Records { records } = &frames[0] else {
            panic!("{frames:?}")
        };
        let got: Vec<(&str, Severity, &str)> = records
            .iter()
            .map(|r| {
                (
                    r.workload.as_str(),
                    r.record.severity,
                    r.record.message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("web", Severity::Info, "pulling image x"),
                ("web", Severity::Error, "exited with code 3")
            ]
        );
        assert!(records[0].record.time_us <= records[1].record.time_us);
        assert!(!tmp.path().join("evil").exists());

        logs.instance_ended("i1");
        logs.sync().await;
        let meta: Meta = state::read_json(&root.join("i1/meta.json")).unwrap();
        assert!(meta.ended_ms.is_some() && meta.started_ms == 5);
        // Started again (the same instance back on the node): live again.
        logs.instance_started(Meta {
            instance: "i1".into(),
            workload: "web".into(),
            started_ms: 99,
            ..Meta::default()
        });
        logs.ended_except(["i1".to_string()]);
        logs.sync().await;
        let meta: Meta = state::read_json(&root.join("i1/meta.json")).unwrap();
        assert_eq!((meta.ended_ms, meta.started_ms), (None, 5));
        logs.ended_except(Vec::new());
        logs.sync().await;
        let meta: Meta = state::read_json(&root.join("i1/meta.json")).unwrap();
        assert!(meta.ended_ms.is_some());
    }
}
