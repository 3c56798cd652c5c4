//! What to run ([`LaunchSpec`], `spec.json`) and how it ended ([`Exit`],
//! `exit.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use verge_api::wire::ErrorCategory;

use super::DEFAULT_PIDS;
use super::cgroup::Limits;
use super::state;

/// One instance to run. Persisted as `<instance dir>/spec.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Letters, digits, `-`, `_`, `.`; at most 63 characters. Names the
    /// instance dir and the cgroup.
    pub instance_id: String,
    /// Unpacked image layer dirs, bottom first.
    pub layers: Vec<PathBuf>,
    /// The command; `argv[0]` is looked up in the image's `PATH` when it
    /// has no `/`.
    pub argv: Vec<String>,
    /// The whole environment (the image's and the instance's, merged by the
    /// caller). `PATH` is added when missing, and `HOME` from the user's
    /// `/etc/passwd` entry.
    pub env: Vec<(String, String)>,
    /// Default `/`; created when the image lacks it.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved with the image's
    /// `/etc/passwd` and `/etc/group`. Default root.
    pub user: Option<String>,
    pub hostname: String,
    /// Cores (CFS quota over a 100 ms period); 0: unlimited.
    pub cpu: f64,
    /// Bytes (swap does not extend it); 0: unlimited.
    pub memory: u64,
    /// Processes and threads; 0: [`DEFAULT_PIDS`].
    pub pids: u64,
    /// A network namespace to join (e.g. `/run/verge/netns/<node>/<id>`); `None`:
    /// the host's network.
    pub netns: Option<PathBuf>,
}

impl LaunchSpec {
    pub(super) fn validate(&self) -> Result<(), String> {
        let id = &self.instance_id;
        let id_ok = !id.is_empty()
            && id.len() <= 63
            && !id.starts_with(['.', '-'])
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return Err(format!(
                "instance id {id:?}: use 1 to 63 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
            ));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(
                "the command is empty: the image has no entrypoint or cmd, and none was given"
                    .into(),
            );
        }
        if self.layers.is_empty() || self.layers.iter().any(|l| !l.is_absolute()) {
            return Err("layers: at least one, all absolute paths".into());
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return Err(format!("hostname {:?}: 1 to 64 bytes", self.hostname));
        }
        if let Some((k, _)) = self
            .env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(format!(
                "environment variable name {k:?} is empty or has '=' or NUL"
            ));
        }
        if !(self.cpu.is_finite() && self.cpu >= 0.0) {
            return Err(format!("cpu {}: a number of cores >= 0", self.cpu));
        }
        Ok(())
    }

    pub(super) fn limits(&self) -> Limits {
        Limits {
            cpu: self.cpu,
            memory: self.memory,
            pids: if self.pids == 0 {
                DEFAULT_PIDS
            } else {
                self.pids
            },
        }
    }
}

/// How an instance ended. Persisted as `<instance dir>/exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code, when the process exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// The kernel killed it for exceeding its memory limit.
    pub oom: bool,
    /// Why it did not start, or why its exit is unknown.
    pub message: Option<String>,
    /// It never ran its command (bad image, missing binary, unknown user...).
    pub start_failed: bool,
    /// When the shim recorded it, milliseconds since the epoch.
    pub at_ms: i64,
}

impl Exit {
    /// An exit nobody recorded (the shim died, or the node was stopped
    /// while it started the instance).
    pub(super) fn lost(message: String) -> Exit {
        Exit {
            code: None,
            signal: None,
            oom: false,
            message: Some(message),
            start_failed: false,
            at_ms: state::now_ms(),
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.start_failed
    }

    /// The category of an exit nobody asked for: `start`, `oom`, or `crash`
    /// (any other end but code 0).
    pub fn category(&self) -> Option<ErrorCategory> {
        if self.start_failed {
            Some(ErrorCategory::Start)
        } else if self.oom {
            Some(ErrorCategory::Oom)
        } else if self.success() {
            None
        } else {
            Some(ErrorCategory::Crash)
        }
    }

    /// For people: `exited with code 3`, `killed: out of memory`, ...; a
    /// wasm instance's `message` when it has no code (`trapped: ...`).
    pub fn describe(&self) -> String {
        if let (true, Some(m)) = (self.start_failed, &self.message) {
            return format!("failed to start: {m}");
        }
        if self.oom {
            // A wasm instance's limiter says what it was refused.
            return match &self.message {
                Some(m) => m.clone(),
                None => "killed: out of memory".into(),
            };
        }
        match (self.code, self.signal, &self.message) {
            (Some(c), _, _) => format!("exited with code {c}"),
            (_, Some(s), _) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => format!("killed by signal {s} ({sig})"),
                Err(_) => format!("killed by signal {s}"),
            },
            (_, _, Some(m)) => m.clone(),
            _ => "exited".into(),
        }
    }
}
