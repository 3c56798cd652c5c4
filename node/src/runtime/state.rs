//! What an instance leaves on disk, in `<root>/<id>/`, and the process
//! identities the daemon and the shim share through it.
//!
//! The daemon may be killed and restarted at any time, so everything it needs
//! to find a running instance again is a file here, written atomically.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use verge_api::wire::Isolation;

/// The [`super::LaunchSpec`], as given to `start`.
pub const SPEC: &str = "spec.json";
/// The [`Launch`]: how the daemon prepared the instance.
pub const LAUNCH: &str = "launch.json";
/// The shim's [`ProcId`].
pub const SHIM_PID: &str = "shim.pid";
/// The workload's [`ProcId`] (host PID of its PID 1).
pub const PID: &str = "pid";
/// The [`super::Exit`], written by the shim once the workload is gone.
pub const EXIT: &str = "exit.json";
/// The shim's own diagnostics (its stderr).
pub const SHIM_LOG: &str = "shim.log";
/// overlayfs upper and work dirs, and the mount point of the rootfs.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";
pub const ROOTFS: &str = "rootfs";
/// The working directory of an instance run with isolation `none`.
pub const CWD: &str = "cwd";
/// Where the workload's process stages its secret files, on a tmpfs of its
/// own mount namespace (see `super::mounts`); an empty dir on the host.
pub const SECRETS: &str = "secrets";

/// How the daemon prepared an instance, for its shim and for adoption.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub isolation: Isolation,
    /// The instance's cgroup, relative to the hierarchy roots; `None` when
    /// it could not be created (isolation `none` only).
    pub cgroup: Option<String>,
    /// The instance's logs dir, where the shim writes `app.log`; `None`
    /// (a launch of an older daemon): `<instance dir>/../../logs/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<PathBuf>,
    /// How the shim rotates `app.log`.
    #[serde(default)]
    pub log_limits: crate::logs::LogLimits,
    /// The volumes mounted into the instance (their IDs are how a restarted
    /// daemon claims them again). Its secret files are never here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<super::attach::VolumeMount>,
}

impl Launch {
    /// Where the shim of the instance in `dir` writes its logs.
    pub fn logs_dir(&self, dir: &Path) -> PathBuf {
        match &self.logs {
            Some(logs) => logs.clone(),
            None => {
                let id = dir.file_name().unwrap_or_default();
                let root = dir
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("/"));
                root.join("logs").join(id)
            }
        }
    }
}

/// A process, named so that a recycled PID is not mistaken for it: its PID
/// and its start time (field 22 of `/proc/<pid>/stat`, in clock ticks
/// since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// The process `pid`, if it exists now.
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start| ProcId { pid, start })
    }

    /// Whether this very process still exists (zombies count as gone).
    pub fn alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some((state, start)) => start == self.start && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// A pidfd for this process, or `None` when it is gone. Checking the
    /// start time after opening closes the race with PID reuse: the pidfd
    /// refers to whatever process had the PID at `pidfd_open` time.
    pub fn pidfd(&self) -> Option<OwnedFd> {
        let fd = pidfd_open(self.pid).ok()?;
        self.alive().then_some(fd)
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, format!("{} {}\n", self.pid, self.start).as_bytes())
    }

    pub fn read(path: &Path) -> io::Result<ProcId> {
        let text = fs::read_to_string(path)?;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad {}", path.display()),
            )
        };
        let mut parts = text.split_whitespace();
        let pid = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let start = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        Ok(ProcId { pid, start })
    }
}

fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid).map(|(_, start)| start)
}

/// State (field 3) and start time (field 22) of `/proc/<pid>/stat`.
fn stat_fields(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip to the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3; field 22 is 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether `pid` has a handler for `signal` (its `SigCgt` mask in
/// `/proc/<pid>/status`). `None` when the process is gone.
pub fn catches_signal(pid: i32, signal: i32) -> Option<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
    let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
    Some(mask & (1u64 << (signal - 1)) != 0)
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`.
pub fn pidfd_send_signal(fd: RawFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags; `fd` is a
    // pidfd the caller holds open for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `path` through a temporary file in the same directory, synced and
/// renamed, so readers see the old contents or the new ones, never a part.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        assert!(me.pidfd().is_some());
        let other = ProcId {
            start: me.start + 1,
            ..me
        };
        assert!(!other.alive());
        assert!(other.pidfd().is_none());
    }

    #[test]
    fn proc_id_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = ProcId { pid: 42, start: 7 };
        id.write(&dir.path().join("pid")).unwrap();
        assert_eq!(ProcId::read(&dir.path().join("pid")).unwrap(), id);
    }
}
