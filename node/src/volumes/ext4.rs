//! The ext4 filesystem of a loop volume, through e2fsprogs: made once in
//! the new `disk.img` (`mkfs.ext4`), grown online (`resize2fs`), checked
//! before an imported one is mounted (`e2fsck`). Blocking: call these on a
//! blocking thread.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::VolumeError;

/// Where e2fsprogs is looked for besides `PATH` (daemons often run with a
/// `PATH` without the sbin directories).
const SBIN: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// The e2fsprogs programs, found on this host.
#[derive(Debug, Clone)]
pub struct Ext4 {
    mkfs: PathBuf,
    resize2fs: PathBuf,
    e2fsck: PathBuf,
}

impl Ext4 {
    /// Finds the programs; `Err` names what is missing and what to install.
    pub fn find() -> Result<Ext4, String> {
        let find = |name: &str| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain(SBIN.iter().map(PathBuf::from))
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| format!("{name} not found (install e2fsprogs)"))
        };
        Ok(Ext4 {
            mkfs: find("mkfs.ext4")?,
            resize2fs: find("resize2fs")?,
            e2fsck: find("e2fsck")?,
        })
    }

    /// Makes an empty ext4 filesystem filling `image`. No root reserve
    /// (`-m 0`): the workload gets the whole size. The inode tables and the
    /// journal are left to read as zeros (the file is new and sparse)
    /// rather than written, so a new volume takes little disk.
    pub fn mkfs(&self, subject: &str, image: &Path) -> Result<(), VolumeError> {
        run(
            subject,
            &self.mkfs,
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
                image.as_os_str(),
            ],
            |code| code == 0,
        )
    }

    /// Grows the filesystem to fill `device`: online when it is a mounted
    /// loop device, else an unmounted image (checked first, as resize2fs
    /// requires). Nothing to do (already that size) is success.
    pub fn grow(&self, subject: &str, device: &Path) -> Result<(), VolumeError> {
        run(subject, &self.resize2fs, &[device.as_os_str()], |code| {
            code == 0
        })
    }

    /// Checks (and repairs what is safe to) the filesystem in an unmounted
    /// `image`.
    pub fn check(&self, subject: &str, image: &Path) -> Result<(), VolumeError> {
        // 0: clean; 1: errors corrected.
        run(
            subject,
            &self.e2fsck,
            &["-f".as_ref(), "-p".as_ref(), image.as_os_str()],
            |code| code <= 1,
        )
    }
}

/// Whether this process may grow a mounted ext4 filesystem: the kernel's
/// online resize wants `CAP_SYS_RESOURCE`, which some containers drop
/// even for root. Without it, volumes grow unmounted.
pub fn can_grow_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn run(
    subject: &str,
    program: &Path,
    args: &[&std::ffi::OsStr],
    ok: impl Fn(i32) -> bool,
) -> Result<(), VolumeError> {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let failed = |detail: String| VolumeError::Command {
        subject: subject.to_string(),
        command: command.clone(),
        detail,
    };
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    match out.status.code() {
        Some(code) if ok(code) => {
            tracing::debug!(%command, "done");
            Ok(())
        }
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let text = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            Err(failed(format!("{}: {}", out.status, text.trim())))
        }
    }
}
