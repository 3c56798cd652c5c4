//! What an instance gets besides its image ([`Attachments`]): volumes
//! bind-mounted into its rootfs, and secret files on a tmpfs.
//!
//! Volumes are recorded in `launch.json` ([`super::state::Launch::mounts`]):
//! their IDs are how a restarted daemon claims them again. Secret files
//! never reach the disk: the daemon hands them to the shim in a sealed
//! memfd (memory, not a file) as the shim's stdin ([`secrets_memfd`]); the
//! shim reads them before it forks the workload ([`read_secrets`]) and keeps
//! them in memory; the workload's process writes them to a tmpfs of its own
//! mount namespace (`super::mounts`). Every start of an instance is a new
//! shim, so every start is handed them again.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};

/// Volumes and secret files of an instance; both need isolation
/// `namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachments {
    /// Mounted parents first (by depth of their target), whatever the order here.
    pub volumes: Vec<VolumeMount>,
    /// Delivered after the volumes; one inside a volume's path leaves its
    /// (empty) mount point file in the volume.
    pub secrets: Vec<SecretFile>,
}

/// A volume bind-mounted into the instance (`nosuid,nodev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's ID, as the node's volume manager knows it.
    pub volume: String,
    /// Its name, for messages.
    pub name: String,
    /// The host directory holding the volume's filesystem.
    pub source: PathBuf,
    /// Absolute path in the instance; created (`0755`, root) when missing.
    pub target: String,
}

/// A secret file: read-only, mode `0400`, owned by the workload's user,
/// on a tmpfs. The contract's type: its `Debug` never shows the contents,
/// and it is never written to the instance's files.
pub use verge_api::wire::SecretFile;

impl Attachments {
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.secrets.is_empty()
    }

    /// Targets are absolute, plain (no `.`, `..` or NUL), not `/`, not in
    /// `/proc` or `/dev`, and all different; volume sources are absolute.
    pub(super) fn validate(&self) -> Result<(), String> {
        let mut seen: Vec<(Vec<&str>, String)> = Vec::new();
        let targets = self
            .volumes
            .iter()
            .map(|v| {
                (
                    v.target.as_str(),
                    format!("volume {} ({})", v.name, v.volume),
                )
            })
            .chain(self.secrets.iter().map(|s| {
                (
                    s.path.as_str(),
                    format!("secret file of bundle {}", s.bundle),
                )
            }));
        for (target, what) in targets {
            let parts = components(target).map_err(|why| format!("{what} at {target:?}: {why}"))?;
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == parts) {
                return Err(format!(
                    "{what} and {other} both go to {target}: give each its own path"
                ));
            }
            seen.push((parts, what));
        }
        if let Some(v) = self.volumes.iter().find(|v| !v.source.is_absolute()) {
            return Err(format!(
                "volume {} ({}): its host directory {} is not an absolute path",
                v.name,
                v.volume,
                v.source.display()
            ));
        }
        Ok(())
    }
}

/// The components of an absolute path in the instance, checked (see
/// [`Attachments::validate`]).
pub(super) fn components(path: &str) -> Result<Vec<&str>, String> {
    if !path.starts_with('/') {
        return Err("the path must be absolute".into());
    }
    if path.contains('\0') {
        return Err("the path has a NUL byte".into());
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err("the path may not have '.' or '..' components".into());
    }
    match parts.first() {
        None => Err("the path may not be /".into()),
        Some(&"proc") | Some(&"dev") => {
            Err("the path may not be in /proc or /dev, which the node provides".into())
        }
        Some(_) => Ok(parts),
    }
}

/// The secret files as the shim's stdin: JSON in a memfd (memory only,
/// close-on-exec, sealed against changes), read from its start.
pub(super) fn secrets_memfd(secrets: &[SecretFile]) -> io::Result<OwnedFd> {
    let fd = memfd_create(
        c"verge-secrets",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    let json = serde_json::to_vec(secrets).map_err(io::Error::other)?;
    file.write_all(&json)?;
    file.rewind()?;
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file.into())
}

/// In the shim: the secret files the daemon passed as stdin (none when
/// stdin is empty, e.g. `/dev/null`); stdin is then `/dev/null`, so the
/// memfd is gone once the shim forked. Errors never quote the input.
pub(super) fn read_secrets() -> Result<Vec<SecretFile>, String> {
    let mut bytes = Vec::new();
    let read = io::stdin().lock().read_to_end(&mut bytes);
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: dup2 onto fd 0, which this process owns; `null` is open.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
    read.map_err(|e| format!("reading the secret files from the daemon: {e}"))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let secrets = serde_json::from_slice(&bytes).map_err(|e| {
        // Line and column only: the message must not show any of the input.
        format!(
            "the secret files from the daemon do not parse (line {}, column {})",
            e.line(),
            e.column()
        )
    });
    bytes.fill(0);
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(path: &str) -> SecretFile {
        SecretFile {
            bundle: "db".into(),
            version: 1,
            path: path.into(),
            contents: "{\"password\": \"hunter2\"}\n".into(),
        }
    }

    fn volume(target: &str) -> VolumeMount {
        VolumeMount {
            volume: "vol_1".into(),
            name: "data".into(),
            source: "/var/lib/verge/volumes/vol_1/mnt".into(),
            target: target.into(),
        }
    }

    #[test]
    fn debug_never_shows_the_contents() {
        let shown = format!("{:?}", secret("/run/secrets/db"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("/run/secrets/db") && shown.contains("redacted"));
    }

    #[test]
    fn targets_are_checked() {
        let ok = Attachments {
            volumes: vec![volume("/data")],
            secrets: vec![secret("/run/secrets/db")],
        };
        ok.validate().unwrap();
        for bad in ["data", "/", "/a/../etc", "/./x", "/proc/x", "/dev", "/a\0b"] {
            let a = Attachments {
                volumes: vec![volume(bad)],
                secrets: vec![],
            };
            let e = a.validate().unwrap_err();
            assert!(e.contains("volume data (vol_1)"), "{bad:?}: {e}");
        }
        let twice = Attachments {
            volumes: vec![volume("/data")],
            secrets: vec![secret("/data/")],
        };
        assert!(twice.validate().unwrap_err().contains("both go to"));
        let relative = Attachments {
            volumes: vec![VolumeMount {
                source: "mnt".into(),
                ..volume("/data")
            }],
            secrets: vec![],
        };
        assert!(relative.validate().unwrap_err().contains("not an absolute"));
    }

    #[test]
    fn the_memfd_holds_exactly_the_secrets_and_is_sealed() {
        let secrets = vec![secret("/run/secrets/db"), secret("/etc/app.json")];
        let fd = secrets_memfd(&secrets).unwrap();
        let mut file = File::from(fd);
        assert!(file.write_all(b"more").is_err(), "sealed against writes");
        let mut json = Vec::new();
        file.read_to_end(&mut json).unwrap();
        let back: Vec<SecretFile> = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, secrets);
        // It is memory: the link names a memfd, not a file on a disk.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:verge-secrets"));
    }
}
