//! The directory backend's file work, for hosts without loop devices: a
//! volume is a plain directory, its snapshot a copy of the tree. Nothing
//! here enforces a size. Blocking.
//!
//! The trees walked here may be written by a workload (a volume's tree
//! while it is measured), and the walks run as host root: every entry is
//! opened relative to its parent directory's descriptor, never through a
//! symlink (`O_NOFOLLOW` on a single name), and checked after it is
//! opened, so an entry swapped for a symlink, a FIFO or a device during
//! the walk is skipped, never followed or blocked on.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, IntoRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

/// Directories deeper than this are not copied (an error) nor measured
/// (not counted): each level holds descriptors open while walked.
pub const MAX_DEPTH: usize = 256;

/// How a directory of the walk is opened: never through a symlink.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Copies the tree at `src` (a directory) to `dst` (which must not
/// exist): directories, regular files, symlinks (as symlinks, never
/// followed) and FIFOs (made anew, never opened), with their modes,
/// owners and times. Hard links become separate files; sockets and device
/// nodes are skipped, and so is an entry that changes type during the
/// copy (all logged).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let from = nix::fcntl::open(src, dir_flags(), Mode::empty())?;
    let meta = nix::sys::stat::fstat(&from)?;
    std::fs::create_dir(dst)?;
    let to = nix::fcntl::open(dst, dir_flags(), Mode::empty())?;
    copy_dir(from.as_fd(), to.as_fd(), src, 1)?;
    set_attrs(to.as_fd(), &meta)
}

/// Copies the entries of `from` (at `path`, for logs) into `to`.
fn copy_dir(from: BorrowedFd<'_>, to: BorrowedFd<'_>, path: &Path, depth: usize) -> io::Result<()> {
    for name in names(from)? {
        copy_entry(from, to, &name, path, depth)?;
    }
    Ok(())
}

fn copy_entry(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    depth: usize,
) -> io::Result<()> {
    let skip = |why: &str| {
        let path = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        tracing::warn!(path = %path.display(), "snapshot skips {why}");
        Ok(())
    };
    let meta = match nix::sys::stat::fstatat(from, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(meta) => meta,
        // Removed since listed.
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    match kind(&meta) {
        SFlag::S_IFDIR => {
            if depth >= MAX_DEPTH {
                let path = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                return Err(io::Error::other(format!(
                    "{} is more than {MAX_DEPTH} directories deep",
                    path.display()
                )));
            }
            let dir = match nix::fcntl::openat(from, name, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return skip("a directory replaced during the copy");
                }
                Err(e) => return Err(e.into()),
            };
            // What was opened, not what was listed.
            let meta = nix::sys::stat::fstat(&dir)?;
            nix::sys::stat::mkdirat(to, name, Mode::from_bits_truncate(0o700))?;
            let out = nix::fcntl::openat(to, name, dir_flags(), Mode::empty())?;
            let sub = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            copy_dir(dir.as_fd(), out.as_fd(), &sub, depth + 1)?;
            set_attrs(out.as_fd(), &meta)
        }
        SFlag::S_IFREG => {
            // O_NONBLOCK: a FIFO swapped in since fstatat does not block
            // the open (and is then skipped).
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC;
            let file = match nix::fcntl::openat(from, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::ELOOP) => return skip("a file replaced by a symlink during the copy"),
                Err(e) => return Err(e.into()),
            };
            let meta = nix::sys::stat::fstat(&file)?;
            if kind(&meta) != SFlag::S_IFREG {
                return skip("a file replaced during the copy");
            }
            nix::fcntl::fcntl(&file, FcntlArg::F_SETFL(OFlag::empty()))?;
            let out = nix::fcntl::openat(
                to,
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            let (mut file, mut out) = (File::from(file), File::from(out));
            io::copy(&mut file, &mut out)?;
            set_attrs(out.as_fd(), &meta)
        }
        SFlag::S_IFLNK => {
            let target = match nix::fcntl::readlinkat(from, name) {
                Ok(target) => target,
                Err(Errno::ENOENT) => return Ok(()),
                Err(Errno::EINVAL) => return skip("a symlink replaced during the copy"),
                Err(e) => return Err(e.into()),
            };
            nix::unistd::symlinkat(target.as_os_str(), to, name)?;
            chown_at(to, name, &meta)
        }
        SFlag::S_IFIFO => {
            nix::unistd::mkfifoat(to, name, Mode::from_bits_truncate(0o600))?;
            chown_at(to, name, &meta)?;
            // Made here, in a tree only this walk writes: not a symlink.
            nix::sys::stat::fchmodat(
                to,
                name,
                Mode::from_bits_truncate(meta.st_mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )?;
            let (atime, mtime) = times(&meta);
            nix::sys::stat::utimensat(to, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)?;
            Ok(())
        }
        _ => skip("a socket or device node"),
    }
}

/// Gives `fd` the owner, mode and times of `meta` (the mode after the
/// owner, which clears set-user-ID bits).
fn set_attrs(fd: BorrowedFd<'_>, meta: &FileStat) -> io::Result<()> {
    nix::unistd::fchown(
        fd,
        Some(Uid::from_raw(meta.st_uid)),
        Some(Gid::from_raw(meta.st_gid)),
    )?;
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.st_mode & 0o7777))?;
    let (atime, mtime) = times(meta);
    nix::sys::stat::futimens(fd, &atime, &mtime)?;
    Ok(())
}

/// Gives the entry `name` of `dir` (not following a symlink) the owner
/// of `meta`.
fn chown_at(dir: BorrowedFd<'_>, name: &CStr, meta: &FileStat) -> io::Result<()> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(meta.st_uid)),
        Some(Gid::from_raw(meta.st_gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn times(meta: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(meta.st_atime, meta.st_atime_nsec),
        TimeSpec::new(meta.st_mtime, meta.st_mtime_nsec),
    )
}

fn kind(meta: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(meta.st_mode & SFlag::S_IFMT.bits())
}

/// The names in the directory `dir`, without `.` and `..`.
fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    /// A directory stream, closed on drop.
    struct Stream(NonNull<libc::DIR>);
    impl Drop for Stream {
        fn drop(&mut self) {
            // SAFETY: the stream is open, and closed only here.
            unsafe { libc::closedir(self.0.as_ptr()) };
        }
    }
    // A description of its own: reading moves its offset.
    let fd: OwnedFd = nix::fcntl::openat(dir, c".", dir_flags(), Mode::empty())?;
    // SAFETY: `fd` is an open directory; on success the stream owns it.
    let stream = NonNull::new(unsafe { libc::fdopendir(fd.as_raw_fd()) })
        .ok_or_else(io::Error::last_os_error)?;
    let _ = fd.into_raw_fd();
    let stream = Stream(stream);
    let mut names = Vec::new();
    loop {
        Errno::clear();
        // SAFETY: the stream is open; the entry it returns stays valid
        // until the next readdir on it, and is copied before.
        let entry = unsafe { libc::readdir64(stream.0.as_ptr()) };
        if entry.is_null() {
            return match Errno::last_raw() {
                0 => Ok(names),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
        // SAFETY: d_name is a NUL-terminated name within the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
}

/// Bytes of disk the tree at `root` (a directory) takes, hard-linked files
/// once. Never follows a symlink; entries removed during the walk are not
/// counted, nor directories deeper than [`MAX_DEPTH`].
pub fn tree_size(root: &Path) -> io::Result<u64> {
    let fd = nix::fcntl::open(root, dir_flags(), Mode::empty())?;
    let mut total = blocks(&nix::sys::stat::fstat(&fd)?);
    size_dir(fd.as_fd(), 1, &mut HashSet::new(), &mut total)?;
    Ok(total)
}

fn size_dir(
    dir: BorrowedFd<'_>,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
    total: &mut u64,
) -> io::Result<()> {
    for name in names(dir)? {
        let meta = match nix::sys::stat::fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(meta) => meta,
            // Removed while walking: the workload is writing.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if kind(&meta) != SFlag::S_IFDIR {
            if meta.st_nlink > 1 && !seen.insert((meta.st_dev, meta.st_ino)) {
                continue;
            }
            *total += blocks(&meta);
            continue;
        }
        *total += blocks(&meta);
        if depth >= MAX_DEPTH {
            continue;
        }
        match nix::fcntl::openat(dir, name.as_c_str(), dir_flags(), Mode::empty()) {
            Ok(fd) => size_dir(fd.as_fd(), depth + 1, seen, total)?,
            // Removed, or swapped for something else, since listed.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn blocks(meta: &FileStat) -> u64 {
    meta.st_blocks as u64 * 512
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};

    use super::*;

    #[test]
    fn copies_modes_links_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), b"hello").unwrap();
        std::fs::set_permissions(src.join("sub/file"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        File::options()
            .write(true)
            .open(src.join("sub/file"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("sub/file")).unwrap(), b"hello");
        let meta = std::fs::metadata(dst.join("sub/file")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!(meta.modified().unwrap(), old);
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            Path::new("sub/file")
        );
        let fifo = std::fs::symlink_metadata(dst.join("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o777, 0o640);
        assert!(tree_size(&dst).unwrap() > 0);
        assert!(
            copy_tree(&src, &dst).is_err(),
            "copied over an existing tree"
        );
    }

    #[test]
    fn never_follows_symlinks_out_of_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        // Outside the tree: a directory with a big file, and a file.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), vec![7u8; 1 << 20]).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("mine"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, src.join("dir_link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), src.join("file_link")).unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
        // A socket: skipped.
        let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();

        let size = tree_size(&src).unwrap();
        assert!(size < 1 << 20, "followed a symlink: {size} bytes");

        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        for (link, target) in [
            ("dir_link", outside.clone()),
            ("file_link", outside.join("secret")),
            ("etc", "/etc".into()),
        ] {
            let meta = std::fs::symlink_metadata(dst.join(link)).unwrap();
            assert!(meta.file_type().is_symlink(), "{link} copied as a {meta:?}");
            assert_eq!(std::fs::read_link(dst.join(link)).unwrap(), target);
        }
        assert!(!dst.join("sock").exists());
        assert!(tree_size(&dst).unwrap() < 1 << 20);
    }

    #[test]
    fn too_deep_a_tree_is_not_copied_and_measured_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut deep = src.clone();
        for _ in 0..MAX_DEPTH + 4 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = copy_tree(&src, &dir.path().join("dst")).unwrap_err();
        assert!(err.to_string().contains("directories deep"), "{err}");
        assert!(tree_size(&src).unwrap() > 0);
    }
}
