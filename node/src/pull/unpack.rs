//! Unpacking one layer (a tar, maybe gzip'd or zstd'd) into its own
//! directory, in the form overlayfs reads as a lowerdir.
//!
//! - OCI whiteouts become overlayfs ones: `.wh.NAME` a character device 0/0
//!   named `NAME`, `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on
//!   its directory. Other `.wh..wh.*` entries (aufs metadata) are skipped.
//! - Nothing is created outside the layer directory: every path is walked
//!   component by component with `openat(O_NOFOLLOW)` from the layer's root
//!   fd, and created with the `*at` calls relative to its parent, so `..`
//!   is refused and a symlink is never followed (one in a parent path fails
//!   the layer). Hardlinks must point inside the layer.
//! - Modes (with setuid/setgid/sticky), numeric uid/gid (when running as
//!   root), mtimes, symlinks, hardlinks, devices and fifos are kept, and
//!   PAX xattrs other than `trusted.*` (an image must not forge overlayfs
//!   metadata) on files and directories.
//!
//! The uncompressed stream is hashed on the way and checked against the
//! layer's `diff_id` from the image config.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fstatat, futimens, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, linkat, symlinkat};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// `None` for a media type that is not a layer this node can unpack.
    pub fn for_media_type(media_type: &str) -> Option<Compression> {
        Some(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UnpackError {
    #[error("entry {path:?} is refused: {reason}")]
    Unsafe { path: String, reason: String },
    #[error("entry {path:?}: {source}")]
    Entry { path: String, source: io::Error },
    #[error("reading the layer: {0}")]
    Read(io::Error),
    #[error("creating {}: {source}", path.display())]
    Dest { path: PathBuf, source: io::Error },
    #[error("its uncompressed content is {actual}, the image config says {expected}")]
    DiffId { expected: String, actual: String },
}

/// Unpacks the layer read from `blob` into `dest` (created here, must not
/// exist), checks its `diff_id`, syncs the filesystem. Returns the bytes of
/// file data written. `blob` is read to its end.
pub(crate) fn unpack(
    blob: impl Read,
    compression: Compression,
    dest: &Path,
    diff_id: &str,
) -> Result<u64, UnpackError> {
    let buffered = BufReader::with_capacity(1 << 20, blob);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Read)?)
        }
    };
    let hashing = Hashing {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let dest_err = |source| UnpackError::Dest {
        path: dest.into(),
        source,
    };
    std::fs::create_dir(dest).map_err(dest_err)?;
    let root = nix::fcntl::open(
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| dest_err(e.into()))?;
    // The root of the image unless the layer says otherwise; not the umask's.
    nix::sys::stat::fchmod(&root, Mode::from_bits_truncate(0o755))
        .map_err(|e| dest_err(e.into()))?;
    let mut unpacker = Unpacker {
        root,
        dest: dest.to_path_buf(),
        chown: nix::unistd::geteuid().is_root(),
        bytes: 0,
        dir_times: Vec::new(),
        buf: vec![0; 256 * 1024],
    };
    let mut archive = tar::Archive::new(hashing);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        unpacker.entry(entry.map_err(UnpackError::Read)?)?;
    }
    unpacker.finish_dirs()?;
    // Past the end-of-archive blocks: padding, hashed too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
    let actual = format!("sha256:{}", hex::encode(rest.hasher.finalize()));
    if actual != diff_id {
        return Err(UnpackError::DiffId {
            expected: diff_id.into(),
            actual,
        });
    }
    nix::unistd::syncfs(&unpacker.root).map_err(|e| dest_err(e.into()))?;
    Ok(unpacker.bytes)
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A blocking reader over chunks sent from the async side (a download).
/// An `Err` sent ends the read with that error; a closed channel is EOF.
pub(crate) struct Chunks {
    rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl Chunks {
    pub fn new(rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>) -> Chunks {
        Chunks {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Why one entry failed, before its path is attached.
enum Failure {
    Unsafe(String),
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl From<Errno> for Failure {
    fn from(e: Errno) -> Failure {
        Failure::Io(e.into())
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

struct Unpacker {
    root: OwnedFd,
    dest: PathBuf,
    chown: bool,
    bytes: u64,
    /// Directories and their mtimes, set once everything is in them.
    dir_times: Vec<(PathBuf, u64)>,
    buf: Vec<u8>,
}

/// What the header says about ownership and times.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let shown = path.display().to_string();
        self.entry_at(&path, &mut entry).map_err(|f| match f {
            Failure::Unsafe(reason) => UnpackError::Unsafe {
                path: shown,
                reason,
            },
            Failure::Io(source) => UnpackError::Entry {
                path: shown,
                source,
            },
        })
    }

    fn entry_at<R: Read>(
        &mut self,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), Failure> {
        let comps = components(path)?;
        let header = entry.header();
        let kind = header.entry_type();
        let meta = Meta {
            mode: header.mode()? & 0o7777,
            uid: u32::try_from(header.uid()?)
                .map_err(|_| Failure::Unsafe("uid out of range".into()))?,
            gid: u32::try_from(header.gid()?)
                .map_err(|_| Failure::Unsafe("gid out of range".into()))?,
            mtime: header.mtime()?,
        };
        let Some((name, parents)) = comps.split_last() else {
            // The layer's root itself ("./").
            if kind == EntryType::Directory {
                self.owner_and_mode(self.root.as_fd(), &meta)?;
                self.dir_times.push((PathBuf::new(), meta.mtime));
            }
            return Ok(());
        };
        let dir = self.open_dir(parents, true)?;
        if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
            return self.whiteout(&dir, parents, hidden, &meta);
        }
        match kind {
            EntryType::Directory => {
                let st = fstatat(&dir, *name, AtFlags::AT_SYMLINK_NOFOLLOW);
                if !st.is_ok_and(|st| {
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                }) {
                    self.remove(parents, name)?;
                    mkdirat(&dir, *name, Mode::from_bits_truncate(0o755))?;
                }
                let fd = openat(&dir, *name, DIR_FLAGS, Mode::empty())?;
                self.owner_and_mode(fd.as_fd(), &meta)?;
                xattrs(fd.as_fd(), entry)?;
                self.dir_times.push((comps.iter().collect(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove(parents, name)?;
                let flags = OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC;
                let mut file =
                    File::from(openat(&dir, *name, flags, Mode::from_bits_truncate(0o600))?);
                loop {
                    let n = entry.read(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&self.buf[..n])?;
                    self.bytes += n as u64;
                }
                self.owner_and_mode(file.as_fd(), &meta)?;
                xattrs(file.as_fd(), entry)?;
                let t = timespec(meta.mtime);
                futimens(&file, &t, &t)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| Failure::Unsafe("symlink without a target".into()))?;
                self.remove(parents, name)?;
                symlinkat(target.as_ref(), &dir, *name)?;
                self.owner_at(&dir, name, &meta)?;
                let t = timespec(meta.mtime);
                utimensat(&dir, *name, &t, &t, UtimensatFlags::NoFollowSymlink)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| Failure::Unsafe("hardlink without a target".into()))?;
                let target_comps = components(&target)?;
                let Some((target_name, target_parents)) = target_comps.split_last() else {
                    return Err(Failure::Unsafe("hardlink to the layer's root".into()));
                };
                if target_comps == comps {
                    return Ok(());
                }
                let target_dir = self.open_dir(target_parents, false).map_err(|_| {
                    Failure::Unsafe(format!(
                        "hardlink to {}, which is not in this layer",
                        target.display()
                    ))
                })?;
                if fstatat(&target_dir, *target_name, AtFlags::AT_SYMLINK_NOFOLLOW).is_err() {
                    return Err(Failure::Unsafe(format!(
                        "hardlink to {}, which is not in this layer",
                        target.display()
                    )));
                }
                self.remove(parents, name)?;
                linkat(&target_dir, *target_name, &dir, *name, AtFlags::empty())?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let kind_flag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let (major, minor) = if kind == EntryType::Fifo {
                    (0, 0)
                } else {
                    (
                        header.device_major()?.unwrap_or(0),
                        header.device_minor()?.unwrap_or(0),
                    )
                };
                self.remove(parents, name)?;
                mknodat(
                    &dir,
                    *name,
                    kind_flag,
                    Mode::from_bits_truncate(meta.mode),
                    libc::makedev(major, minor),
                )?;
                self.owner_at(&dir, name, &meta)?;
                // After chown, which clears setuid/setgid; umask applied too.
                nix::sys::stat::fchmodat(
                    &dir,
                    *name,
                    Mode::from_bits_truncate(meta.mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
            }
            // PAX and GNU long-name headers are folded into entries by `tar`.
            other => {
                tracing::debug!(entry = %path.display(), kind = ?other, "skipping a tar entry of unsupported type");
            }
        }
        Ok(())
    }

    /// `.wh..wh..opq` marks `dir` opaque; `.wh.NAME` hides `NAME`.
    fn whiteout(
        &mut self,
        dir: &OwnedFd,
        parents: &[&OsStr],
        hidden: &[u8],
        meta: &Meta,
    ) -> Result<(), Failure> {
        if hidden == b".wh..opq" {
            return set_xattr(dir.as_fd(), c"trusted.overlay.opaque", b"y").map_err(Failure::Io);
        }
        if hidden.starts_with(b".wh.") {
            return Ok(());
        }
        let name = OsStr::from_bytes(hidden);
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Failure::Unsafe("whiteout of no name".into()));
        }
        self.remove(parents, name)?;
        mknodat(
            dir,
            name,
            SFlag::S_IFCHR,
            Mode::empty(),
            libc::makedev(0, 0),
        )?;
        self.owner_at(dir, name, meta)
    }

    /// Opens the directory `comps` below the root without following any
    /// symlink; creates missing ones (mode 0755, root's) if `create`.
    fn open_dir(&self, comps: &[&OsStr], create: bool) -> Result<OwnedFd, Failure> {
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps.iter().enumerate() {
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = match openat(at, *c, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(at, *c, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let fd = openat(at, *c, DIR_FLAGS, Mode::empty())?;
                    // Not the process's umask: an implied parent is 0755.
                    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755))?;
                    fd
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let through: PathBuf = comps[..=i].iter().collect();
                    return Err(Failure::Unsafe(format!(
                        "its parent {} is a symlink or a file in this layer",
                        through.display()
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => Ok(self.root.try_clone()?),
        }
    }

    /// Removes whatever is at `parents/name`, a tree included (parents were
    /// checked to be real directories, and nothing else writes here).
    fn remove(&self, parents: &[&OsStr], name: &OsStr) -> Result<(), Failure> {
        let path: PathBuf = self
            .dest
            .iter()
            .chain(parents.iter().copied())
            .chain([name])
            .collect();
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
            Ok(m) if m.is_dir() => Ok(std::fs::remove_dir_all(&path)?),
            Ok(_) => Ok(std::fs::remove_file(&path)?),
        }
    }

    fn owner_and_mode(&self, fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Failure> {
        if self.chown {
            fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )?;
        }
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.mode))?;
        Ok(())
    }

    fn owner_at(&self, dir: &OwnedFd, name: &OsStr, meta: &Meta) -> Result<(), Failure> {
        if self.chown {
            fchownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    /// Sets directory mtimes, now that nothing more is created in them.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let comps: Vec<&OsStr> = path.iter().collect();
            // A later entry may have replaced or whited it out.
            let Ok(fd) = self.open_dir(&comps, false) else {
                continue;
            };
            let t = timespec(mtime);
            futimens(&fd, &t, &t).map_err(|e| UnpackError::Entry {
                path: path.display().to_string(),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// The normal components of an entry path; `/` and `.` are dropped (paths
/// are relative to the layer), `..` is refused.
fn components(path: &Path) -> Result<Vec<&OsStr>, Failure> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(Failure::Unsafe("`..` would leave the layer".into()));
            }
            Component::Prefix(_) => return Err(Failure::Unsafe("path prefix".into())),
        }
    }
    Ok(out)
}

fn timespec(secs: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0)
}

/// The PAX `SCHILY.xattr.*` records of an entry, set on `fd`; `trusted.*`
/// names are never taken from an image.
fn xattrs<R: Read>(fd: BorrowedFd<'_>, entry: &mut tar::Entry<'_, R>) -> Result<(), Failure> {
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext?;
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if name.starts_with(b"trusted.") {
            tracing::debug!(xattr = %String::from_utf8_lossy(name), "ignoring a trusted xattr of an image");
            continue;
        }
        let Ok(name) = CString::new(name) else {
            continue;
        };
        match set_xattr(fd, &name, ext.value_bytes()) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::warn!(xattr = ?name, "the image store's filesystem does not support this xattr");
            }
            other => other?,
        }
    }
    Ok(())
}

fn set_xattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `name` is a NUL-terminated string and `value` a valid slice of
    // `value.len()` bytes, both alive for the call; `fd` is an open fd.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
