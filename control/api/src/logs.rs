//! Logs (SPEC §4 `verge logs`, §5 Logs): what nodes record per instance,
//! what they send the control plane, and the lines `verge logs` prints.
//!
//! A node keeps, per instance, *app* records (the workload's stdout and
//! stderr, one record per line, stamped when the node read it) and
//! *system* records (Verge's own lifecycle of the instance: pulling,
//! started, exited, OOM-killed, unhealthy, restarting). Both are
//! [`LogRecord`]s. The control plane turns them into [`LogLine`]s, the
//! stable JSON of `verge logs -o json`, and streams them as NDJSON of
//! [`LogItem`]s: lines, and [`LogNotice`]s for what could not be read
//! (an offline node, pruned history), which are never left out silently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest message of one record, in bytes: a longer line is cut into
/// several records of at most this size.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// Where a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The workload's own output.
    App,
    /// Verge's account of the instance's lifecycle.
    System,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::App => "app",
            LogSource::System => "system",
        }
    }
}

impl fmt::Display for LogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "app" => Ok(LogSource::App),
            "system" => Ok(LogSource::System),
            other => Err(format!("unknown log source {other:?}: use app or system")),
        }
    }
}

/// Which output of the workload an app record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// How serious a record is, least first: `--severity S` keeps S and above.
///
/// System records carry their own. App records get one from the line when
/// it says (`level=warn`, `"level":"error"`, `[ERROR]`, a leading `WARN:`),
/// otherwise `info` from stdout and `warn` from stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Debug,
    Info,
    Warn,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Debug => "debug",
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Error => "error",
        }
    }

    /// The severity an app line declares, if any (see [`Severity`]): a
    /// `level=`, `"level":`, `severity=`, `"severity":` or `lvl=` key in its
    /// first 256 bytes, or a first word like `[ERROR]` or `WARN:`. Called
    /// for every captured line, so it allocates nothing.
    pub fn declared_by(line: &str) -> Option<Severity> {
        let head = &line.as_bytes()[..line.len().min(256)];
        if head.iter().any(|b| matches!(b, b'=' | b':')) {
            const KEYS: [&[u8]; 5] = [
                b"level=",
                b"\"level\":",
                b"severity=",
                b"\"severity\":",
                b"lvl=",
            ];
            for key in KEYS {
                let Some(at) = find_ignore_case(head, key) else {
                    continue;
                };
                let rest = &head[at + key.len()..];
                let start = rest
                    .iter()
                    .position(|b| !matches!(b, b' ' | b'"'))
                    .unwrap_or(rest.len());
                let rest = &rest[start..];
                let len = rest
                    .iter()
                    .position(|b| !b.is_ascii_alphabetic())
                    .unwrap_or(rest.len());
                if let Some(s) = Self::named(&rest[..len]) {
                    return Some(s);
                }
            }
        }
        // `[ERROR] …`, `WARN: …`; a bare word (`error happened`) is too vague.
        let first = head
            .split(u8::is_ascii_whitespace)
            .find(|w| !w.is_empty())?;
        let bracketed = first.starts_with(b"[") && first.ends_with(b"]");
        let tagged = first.ends_with(b":");
        if !(bracketed || tagged) {
            return None;
        }
        let start = first.iter().position(u8::is_ascii_alphabetic)?;
        let end = first.iter().rposition(u8::is_ascii_alphabetic)? + 1;
        Self::named(&first[start..end])
    }

    /// A level's name, in any case.
    fn named(word: &[u8]) -> Option<Severity> {
        const NAMES: [(&[u8], Severity); 14] = [
            (b"debug", Severity::Debug),
            (b"trace", Severity::Debug),
            (b"info", Severity::Info),
            (b"notice", Severity::Info),
            (b"warn", Severity::Warn),
            (b"warning", Severity::Warn),
            (b"error", Severity::Error),
            (b"err", Severity::Error),
            (b"fatal", Severity::Error),
            (b"critical", Severity::Error),
            (b"crit", Severity::Error),
            (b"panic", Severity::Error),
            (b"emerg", Severity::Error),
            (b"alert", Severity::Error),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map(|(_, s)| *s)
    }
}

/// Where `needle` first occurs in `hay`, ignoring ASCII case.
fn find_ignore_case(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle.first()?.to_ascii_lowercase();
    (0..hay.len().saturating_sub(needle.len() - 1)).find(|&i| {
        hay[i].to_ascii_lowercase() == first
            && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "debug" => Ok(Severity::Debug),
            "info" => Ok(Severity::Info),
            "warn" | "warning" => Ok(Severity::Warn),
            "error" => Ok(Severity::Error),
            other => Err(format!(
                "unknown severity {other:?}: use debug, info, warn or error"
            )),
        }
    }
}

/// One record as a node stores it (one JSON line in the instance's log
/// files) and sends it. Times are microseconds since the Unix epoch on the
/// node's clock, taken when the line was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    #[serde(rename = "t")]
    pub time_us: u64,
    #[serde(rename = "src")]
    pub source: LogSource,
    /// App records: which output.
    #[serde(rename = "out", default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<LogStream>,
    #[serde(rename = "sev")]
    pub severity: Severity,
    /// The line without its newline; bytes that are not UTF-8 are written
    /// as `\xNN`.
    #[serde(rename = "msg")]
    pub message: String,
}

/// A record with the instance it belongs to, as a node sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: String,
    pub workload: String,
    #[serde(flatten)]
    pub record: LogRecord,
}

/// One line of `verge logs` (SPEC §4: NDJSON of `{"time", "source",
/// "workload", "instance", "severity", "message"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// RFC 3339 UTC with microseconds.
    pub time: String,
    pub source: LogSource,
    pub workload: String,
    pub instance: String,
    pub severity: Severity,
    pub message: String,
    /// App lines: `stdout` or `stderr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<LogStream>,
    /// The node that recorded it (by name).
    #[serde(default)]
    pub node: String,
}

impl fmt::Display for LogLine {
    /// The stable text format: `time source workload instance message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            self.time, self.source, self.workload, self.instance, self.message
        )
    }
}

/// Something `verge logs` could not show, said in the stream where the
/// lines would have been.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogNotice {
    /// For people: `logs of instances on node n2 unavailable: offline since …`.
    pub notice: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The instances it is about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
}

/// One item of the control plane's log stream (NDJSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogItem {
    Notice(LogNotice),
    Line(LogLine),
}

/// The query of `GET …/envs/{env}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<LogSource>,
    /// The least severity shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// RFC 3339; not with `follow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Also earlier instances of the env's workloads (crashed, replaced),
    /// as far as their nodes still keep them.
    #[serde(default)]
    pub previous: bool,
    /// After the history, keep streaming new records.
    #[serde(default)]
    pub follow: bool,
}

/// Microseconds since the epoch as RFC 3339 UTC with microseconds.
pub fn rfc3339_micros(time_us: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(time_us);
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities_declared_by_lines() {
        let cases = [
            ("level=warn msg=x", Some(Severity::Warn)),
            (r#"{"level":"error","msg":"x"}"#, Some(Severity::Error)),
            ("[DEBUG] starting", Some(Severity::Debug)),
            ("WARNING: low disk", Some(Severity::Warn)),
            ("error: cannot open", Some(Severity::Error)),
            ("listening on :8080", None),
            ("ts=1 LEVEL=Info msg=ok", Some(Severity::Info)),
            (r#"{"severity": "CRITICAL"}"#, Some(Severity::Error)),
            ("ERROR: x", Some(Severity::Error)),
            ("[warn]", Some(Severity::Warn)),
            ("level= bogus", None),
            ("an error happened", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(Severity::declared_by(line), want, "{line}");
        }
        assert!(Severity::Debug < Severity::Info && Severity::Warn < Severity::Error);
    }

    #[test]
    fn records_and_items_round_trip() {
        let r = LogRecord {
            time_us: 1_700_000_000_123_456,
            source: LogSource::App,
            stream: Some(LogStream::Stderr),
            severity: Severity::Warn,
            message: "hi".into(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"t":1700000000123456,"src":"app","out":"stderr","sev":"warn","msg":"hi"}"#
        );
        assert_eq!(serde_json::from_str::<LogRecord>(&json).unwrap(), r);
        let line = LogItem::Line(LogLine {
            time: rfc3339_micros(r.time_us),
            source: r.source,
            workload: "web".into(),
            instance: "i1".into(),
            severity: r.severity,
            message: r.message.clone(),
            stream: r.stream,
            node: "n1".into(),
        });
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(serde_json::from_str::<LogItem>(&text).unwrap(), line);
        let notice = LogItem::Notice(LogNotice {
            notice: "offline".into(),
            node: Some("n2".into()),
            instances: vec!["i2".into()],
        });
        let text = serde_json::to_string(&notice).unwrap();
        assert_eq!(serde_json::from_str::<LogItem>(&text).unwrap(), notice);
        assert_eq!(rfc3339_micros(r.time_us), "2023-11-14T22:13:20.123456Z");
    }
}
