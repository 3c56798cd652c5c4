//! Volumes and secret files put into an instance's rootfs by the
//! workload's process, as host root, in its own mount namespace (made
//! private first), before `pivot_root`; and the workload's user, resolved
//! from the image's `/etc/passwd` then, since both are given to it.
//!
//! The rootfs is the image's, untrusted. A path in it is resolved one
//! component at a time from a descriptor of the rootfs (`openat` with
//! `O_NOFOLLOW`): a symbolic link is refused, a missing directory is made
//! (`0755`, root), and the mount goes onto `/proc/self/fd/<n>` of the
//! descriptor found, so nothing can redirect it out of the rootfs.
//!
//! - A volume is a bind mount of its host directory, remounted
//!   `nosuid,nodev`. A fresh volume is given to the workload: when its user
//!   is not root and the volume's root directory is owned by root and holds
//!   nothing but `lost+found` (what `mkfs` leaves), that directory is
//!   chowned to the user's uid:gid, so the workload can write to it. A
//!   volume with contents keeps its owners.
//! - Secret files are written to a tmpfs mounted on `<instance dir>/secrets`
//!   (mode `0700`, `noswap` where the kernel has it) in this mount
//!   namespace only, mode `0400` and owned by the workload's user; each is
//!   bind-mounted read-only (`nosuid,nodev,noexec`) onto an empty file made
//!   at its path in the rootfs (that empty file is all the overlay's upper
//!   dir gets), then the staging mount is detached: only the bind mounts
//!   remain, and the tmpfs with them.

use std::fs;
use std::io::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, fchown};

use super::attach::{SecretFile, VolumeMount, components};
use super::state;
use super::user::{self, User};

/// The staging tmpfs is at least this big (bytes).
const STAGING_MIN: usize = 1 << 20;
const PAGE: usize = 4096;

/// A descriptor of the rootfs at `root` (the host's path, trusted).
pub fn open_root(root: &Path) -> Result<OwnedFd, String> {
    open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the rootfs {}: {e}", root.display()))
}

/// Resolves the workload's user (`spec`, `None`: root) with the image's
/// `/etc/passwd` and `/etc/group`, read as if `root` were `/` (links in
/// them resolve inside the rootfs, as they would after `pivot_root`).
pub fn resolve_user(root: &OwnedFd, spec: Option<&str>) -> Result<User, String> {
    user::resolve(
        spec,
        read_in_root(root, "etc/passwd").as_deref(),
        read_in_root(root, "etc/group").as_deref(),
    )
}

/// Mounts `volumes` (parents first), then delivers `secrets`, in the
/// rootfs `root` of the instance in `dir`, for the workload's `user`.
pub fn attach(
    dir: &Path,
    root: &OwnedFd,
    volumes: &[VolumeMount],
    secrets: &[SecretFile],
    user: &User,
) -> Result<(), String> {
    let mut ordered: Vec<&VolumeMount> = volumes.iter().collect();
    ordered.sort_by_key(|v| components(&v.target).map_or(0, |c| c.len()));
    for v in ordered {
        let what = format!("volume {} ({}) at {}", v.name, v.volume, v.target);
        mount_volume(root, v, user).map_err(|e| format!("{what}: {e}"))?;
    }
    if !secrets.is_empty() {
        deliver_secrets(dir, root, secrets, user)?;
    }
    Ok(())
}

fn mount_volume(root: &OwnedFd, v: &VolumeMount, user: &User) -> Result<(), String> {
    let parts = components(&v.target)?;
    let (name, parents) = parts.split_last().ok_or("the path may not be /")?;
    let parent = open_dirs(root, parents)?;
    let target = step(&parent, name, Kind::Dir).map_err(|why| format!("{} {why}", v.target))?;
    let source = open(
        &v.source,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "its host directory {} cannot be opened ({e}): is the volume on this node and mounted?",
            v.source.display()
        )
    })?;
    give_fresh_volume(&source, user)
        .map_err(|e| format!("giving the fresh volume to uid {}: {e}", user.uid))?;
    mount(
        Some(&fd_path(&source)),
        &fd_path(&target),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting {}: {e}", v.source.display()))?;
    // The name now leads to the volume's root, which the remount needs.
    let mounted = step(&parent, name, Kind::Dir).map_err(|why| format!("{} {why}", v.target))?;
    remount(&mounted, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
}

/// Chowns a fresh volume's root to `user` (see the module doc).
fn give_fresh_volume(source: &OwnedFd, user: &User) -> Result<(), String> {
    if user.uid == 0 {
        return Ok(());
    }
    let st = fstat(source).map_err(|e| e.to_string())?;
    if st.st_uid != 0 {
        return Ok(());
    }
    let entries = fs::read_dir(fd_path(source)).map_err(|e| e.to_string())?;
    for entry in entries {
        if entry.map_err(|e| e.to_string())?.file_name() != "lost+found" {
            return Ok(());
        }
    }
    fchown(
        source,
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
    )
    .map_err(|e| e.to_string())
}

fn deliver_secrets(
    dir: &Path,
    root: &OwnedFd,
    secrets: &[SecretFile],
    user: &User,
) -> Result<(), String> {
    let staging = dir.join(state::SECRETS);
    match fs::create_dir(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", staging.display())),
    }
    let needed: usize = secrets
        .iter()
        .map(|s| s.contents.len().div_ceil(PAGE) * PAGE + PAGE)
        .sum();
    mount_staging(&staging, needed.max(STAGING_MIN))?;
    let delivered = secrets.iter().enumerate().try_for_each(|(i, s)| {
        let what = format!("secret file {} of bundle {}", s.path, s.bundle);
        deliver(root, &staging.join(i.to_string()), s, user).map_err(|e| format!("{what}: {e}"))
    });
    // The bind mounts keep the tmpfs; nothing else may reach it.
    let detached = umount2(&staging, MntFlags::MNT_DETACH)
        .map_err(|e| format!("detaching the secrets' staging tmpfs: {e}"));
    delivered.and(detached)
}

/// A tmpfs of `size` bytes on `staging`, mode 0700, `nosuid,nodev,noexec`;
/// not swapped where the kernel allows (`noswap`, Linux 6.4). Also the
/// tmpfs of a wasm instance's secret files.
pub(crate) fn mount_staging(staging: &Path, size: usize) -> Result<(), String> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let data = format!("size={size},mode=0700");
    let tmpfs = |data: &str| mount(Some("tmpfs"), staging, Some("tmpfs"), flags, Some(data));
    match tmpfs(&format!("{data},noswap")) {
        Err(Errno::EINVAL) => tmpfs(&data),
        other => other,
    }
    .map_err(|e| format!("mounting the secrets' tmpfs on {}: {e}", staging.display()))
}

/// Writes `secret` at `staged` (on the staging tmpfs) and binds it onto
/// its path in the rootfs. Messages never hold the contents.
fn deliver(root: &OwnedFd, staged: &Path, secret: &SecretFile, user: &User) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(staged)
        .map_err(|e| format!("staging it on the tmpfs: {e}"))?;
    file.write_all(secret.contents.as_bytes())
        .map_err(|e| format!("staging it on the tmpfs: {e}"))?;
    fchown(
        &file,
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
    )
    .map_err(|e| format!("giving it to uid {}: {e}", user.uid))?;
    file.set_permissions(fs::Permissions::from_mode(0o400))
        .map_err(|e| format!("chmod 0400: {e}"))?;
    drop(file);

    let parts = components(&secret.path)?;
    let (name, parents) = parts.split_last().ok_or("the path may not be /")?;
    let parent = open_dirs(root, parents)?;
    let target = step(&parent, name, Kind::File).map_err(|why| format!("{} {why}", secret.path))?;
    mount(
        Some(staged),
        &fd_path(&target),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting it: {e}"))?;
    let mounted =
        step(&parent, name, Kind::File).map_err(|why| format!("{} {why}", secret.path))?;
    remount(
        &mounted,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
}

/// Sets the flags of the bind mount whose root `fd` is.
fn remount(fd: &OwnedFd, flags: MsFlags) -> Result<(), String> {
    mount(
        None::<&str>,
        &fd_path(fd),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(|e| format!("remounting it {flags:?}: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// Opens the directory `parts` under `root`, making the missing ones.
fn open_dirs(root: &OwnedFd, parts: &[&str]) -> Result<OwnedFd, String> {
    let mut at = root
        .try_clone()
        .map_err(|e| format!("duplicating the rootfs descriptor: {e}"))?;
    for (i, name) in parts.iter().enumerate() {
        at = step(&at, name, Kind::Dir)
            .map_err(|why| format!("/{} {why}", parts[..=i].join("/")))?;
    }
    Ok(at)
}

/// Opens `name` in `parent` as a `kind`, never following a link; makes it
/// when missing (a directory `0755`, or an empty file `0400` as a mount
/// point). A file is opened `O_PATH`: nothing of the image is read. The
/// error completes "<path> ...".
fn step(parent: &OwnedFd, name: &str, kind: Kind) -> Result<OwnedFd, String> {
    let found = match fstatat(parent, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            check_kind(&st, kind)?;
            true
        }
        Err(Errno::ENOENT) => false,
        Err(e) => return Err(format!("cannot be examined: {e}")),
    };
    let nofollow = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let opened = match (kind, found) {
        (Kind::Dir, found) => {
            if !found {
                match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(format!("cannot be made: {e}")),
                }
            }
            openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | nofollow,
                Mode::empty(),
            )
        }
        (Kind::File, true) => openat(parent, name, OFlag::O_PATH | nofollow, Mode::empty()),
        (Kind::File, false) => openat(
            parent,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | nofollow,
            Mode::from_bits_truncate(0o400),
        ),
    };
    opened.map_err(|e| match e {
        Errno::ELOOP => "is a symbolic link in the image; refusing to follow it".to_string(),
        e => format!("cannot be opened: {e}"),
    })
}

fn check_kind(st: &FileStat, want: Kind) -> Result<(), String> {
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind == SFlag::S_IFLNK {
        return Err(
            "is a symbolic link in the image; refusing to follow it: mount paths may not go through links (change the path, or the image)"
                .into(),
        );
    }
    match (want, kind) {
        (Kind::Dir, SFlag::S_IFDIR) | (Kind::File, SFlag::S_IFREG) => Ok(()),
        (Kind::Dir, _) => Err("is not a directory in the image".into()),
        (Kind::File, SFlag::S_IFDIR) => {
            Err("is a directory in the image; a secret file needs a file path".into())
        }
        (Kind::File, _) => Err("is not a regular file in the image".into()),
    }
}

/// `/proc/self/fd/<fd>`: what a mount through the descriptor names.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The text of the regular file `path` (relative) of the rootfs, `None`
/// when it is missing or unreadable. Links resolve inside the rootfs
/// (`openat2` with `RESOLVE_IN_ROOT`); without `openat2` (before Linux
/// 5.6), no link is followed.
fn read_in_root(root: &OwnedFd, path: &str) -> Option<String> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(root, path, how) {
        Ok(fd) => fd,
        Err(Errno::ENOSYS) => {
            let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
            let mut at = root.try_clone().ok()?;
            for d in dirs.split('/').filter(|d| !d.is_empty()) {
                at = openat(
                    &at,
                    d,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .ok()?;
            }
            openat(&at, name, flags | OFlag::O_NOFOLLOW, Mode::empty()).ok()?
        }
        Err(_) => return None,
    };
    let st = fstat(&fd).ok()?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return None;
    }
    fs::read_to_string(fd_path(&fd)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root_user() -> User {
        User {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
        }
    }

    #[test]
    fn paths_are_made_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, root.join("link")).unwrap();
        symlink("/", root.join("slash")).unwrap();
        fs::write(root.join("etc/file"), "").unwrap();
        let fd = open_root(&root).unwrap();

        // Missing directories are made, 0755.
        open_dirs(&fd, &["a", "b"]).unwrap();
        let mode = fs::metadata(root.join("a/b")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);

        // Links are refused, wherever they are, and nothing is made beyond them.
        for parts in [&["link", "x"][..], &["slash", "tmp"], &["link"]] {
            let e = open_dirs(&fd, parts).unwrap_err();
            assert!(e.contains("is a symbolic link in the image"), "{e}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        let e = step(&fd, "link", Kind::File).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");

        // Kinds are checked.
        assert!(
            open_dirs(&fd, &["etc", "file"])
                .unwrap_err()
                .contains("not a directory")
        );
        let etc = open_dirs(&fd, &["etc"]).unwrap();
        step(&etc, "file", Kind::File).unwrap();
        assert!(
            step(&fd, "etc", Kind::File)
                .unwrap_err()
                .contains("is a directory")
        );

        // A missing file becomes an empty mount point.
        step(&etc, "new", Kind::File).unwrap();
        assert_eq!(fs::metadata(root.join("etc/new")).unwrap().len(), 0);
    }

    #[test]
    fn the_user_files_resolve_inside_the_rootfs() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("data")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("passwd"), "app:x:7:7::/:/bin/sh\n").unwrap();
        fs::write(
            root.join("data/passwd"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        // An absolute link is followed inside the rootfs, never to the host.
        symlink(outside.join("passwd"), root.join("etc/group")).unwrap();
        symlink("/data/passwd", root.join("etc/passwd")).unwrap();
        let fd = open_root(&root).unwrap();
        let user = resolve_user(&fd, Some("app")).unwrap();
        assert_eq!((user.uid, user.gid), (1000, 1000));
        assert_eq!(read_in_root(&fd, "etc/group"), None);
        assert_eq!(resolve_user(&fd, None).unwrap().uid, 0);
    }

    #[test]
    fn only_a_fresh_volume_changes_hands() {
        let tmp = tempfile::tempdir().unwrap();
        let app = User {
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/".into(),
        };
        let vol = tmp.path().join("vol");
        fs::create_dir_all(vol.join("lost+found")).unwrap();
        let fd = open_root(&vol).unwrap();
        give_fresh_volume(&fd, &root_user()).unwrap();
        assert_eq!(fstat(&fd).unwrap().st_uid, 0);

        fs::write(vol.join("kept"), "").unwrap();
        give_fresh_volume(&fd, &app).unwrap();
        assert_eq!(
            fstat(&fd).unwrap().st_uid,
            0,
            "a volume with contents keeps its owner"
        );

        fs::remove_file(vol.join("kept")).unwrap();
        give_fresh_volume(&fd, &app).unwrap();
        let st = fstat(&fd).unwrap();
        assert_eq!((st.st_uid, st.st_gid), (1000, 1000));
    }
}
