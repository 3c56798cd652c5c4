//! Mounts of loop volumes: finding them in `/proc/self/mountinfo` (a
//! restarted daemon finds its volumes still mounted), mounting and
//! unmounting ext4, and freezing a filesystem while it is snapshotted.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// What is mounted at a mount point (the topmost mount there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub fstype: String,
    /// The mounted device, e.g. `/dev/loop3`.
    pub source: String,
}

/// What is mounted at `at` (an absolute, canonical path), if anything.
pub fn find(at: &Path) -> io::Result<Option<Mounted>> {
    Ok(parse(&std::fs::read_to_string(MOUNTINFO)?, at))
}

/// The last (topmost) entry of `mountinfo` whose mount point is `at`.
fn parse(mountinfo: &str, at: &Path) -> Option<Mounted> {
    let mut found = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source super-options
        let mut fields = line.split(' ');
        let Some(point) = fields.nth(4) else { continue };
        if Path::new(&unescape(point)) != at {
            continue;
        }
        let mut rest = fields.skip_while(|f| *f != "-").skip(1);
        if let (Some(fstype), Some(source)) = (rest.next(), rest.next()) {
            found = Some(Mounted {
                fstype: fstype.to_string(),
                source: unescape(source),
            });
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and tab,
/// newline, backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        if bytes[i] == b'\\'
            && let Some(octal) = octal
        {
            let v = octal
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts the ext4 filesystem on `device` at `at`, `nodev,nosuid`.
pub fn mount_ext4(device: &Path, at: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some(device),
        at,
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
}

/// Unmounts `at`; nothing mounted there is fine. `EBUSY` when something
/// still has files open in it.
pub fn unmount(at: &Path) -> nix::Result<()> {
    match nix::mount::umount2(at, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `FIFREEZE` and `FITHAW` of include/uapi/linux/fs.h: `_IOWR('X', 119, int)`
/// and `_IOWR('X', 120, int)`.
const FIFREEZE: u64 =
    nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<libc::c_int>()) as u64;
const FITHAW: u64 =
    nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<libc::c_int>()) as u64;

/// A frozen filesystem: writes to it block until this is dropped, which
/// thaws it (on every path out of a snapshot, errors and panics included).
#[derive(Debug)]
pub struct Frozen {
    dir: File,
}

impl Frozen {
    /// Freezes the filesystem mounted at `at` (flushing it first).
    pub fn freeze(at: &Path) -> io::Result<Frozen> {
        let dir = File::open(at)?;
        // SAFETY: FIFREEZE takes no argument; the fd is open.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        Errno::result(r).map_err(io::Error::from)?;
        Ok(Frozen { dir })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes no argument; the fd is open.
        let r = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) };
        if let Err(e) = Errno::result(r) {
            tracing::error!(error = %e, "thawing a volume after its snapshot failed: its writers stay blocked until it is thawed (fsfreeze -u)");
        }
    }
}

/// Thaws the filesystem mounted at `at` if a daemon killed mid-snapshot
/// left it frozen; `true` when it was frozen.
pub fn thaw(at: &Path) -> io::Result<bool> {
    let dir = File::open(at)?;
    // SAFETY: FITHAW takes no argument; the fd is open.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) };
    match Errno::result(r) {
        Ok(_) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_topmost_mount_and_unescapes() {
        let info = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
90 22 7:3 / /var/lib/verge\\040node/volumes/v1/mnt rw,nodev,nosuid shared:40 - ext4 /dev/loop3 rw
91 90 7:4 / /var/lib/verge\\040node/volumes/v1/mnt rw - ext4 /dev/loop4 rw
";
        let at = Path::new("/var/lib/verge node/volumes/v1/mnt");
        assert_eq!(
            parse(info, at),
            Some(Mounted {
                fstype: "ext4".into(),
                source: "/dev/loop4".into()
            })
        );
        assert_eq!(
            parse(info, Path::new("/var/lib/verge node/volumes/v2/mnt")),
            None
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    }
}
