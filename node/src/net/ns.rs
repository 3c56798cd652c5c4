//! Named network namespaces, as `ip netns add` makes them: a file in the
//! netns directory with the namespace bind-mounted on it, so that it lives
//! on without any process in it.
//!
//! Namespace changes (`unshare`, `setns`) happen only on threads started
//! for that purpose, which end right after: no runtime thread ever leaves
//! the node's network namespace.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

/// What is at a netns path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Missing,
    /// A network namespace is mounted on it.
    Mounted,
    /// A file with nothing mounted on it (a crash between creating the file
    /// and mounting, or a reboot emptied the mounts but not the directory).
    Stale,
}

pub(crate) fn state(path: &Path) -> io::Result<State> {
    match statfs(path) {
        Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => Ok(State::Mounted),
        Ok(_) => Ok(State::Stale),
        Err(Errno::ENOENT) => Ok(State::Missing),
        Err(e) => Err(e.into()),
    }
}

/// Makes `dir` a mount point with shared propagation, as iproute2 does for
/// `/run/netns`: namespace mounts made and removed in it then reach the
/// mount namespaces copied from this one (an instance's, before it pivots
/// away), instead of pinning namespaces there after they are removed here.
pub(crate) fn prepare_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(shared()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates a network namespace and mounts it on `path`. Runs on a thread of
/// its own ([`on_thread`]), which it leaves in the new namespace. An error
/// says which step failed.
pub(crate) fn create(path: &Path) -> Result<(), (String, io::Error)> {
    unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| ("creating a network namespace".to_owned(), e.into()))?;
    // Interfaces created in this namespace skip duplicate address detection
    // (sysctls under /proc/sys/net are those of the calling thread's
    // namespace): nothing else is on an instance's link, and its link-local
    // address is then usable at once.
    for conf in ["all", "default"] {
        let sysctl = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
        write_sysctl(&sysctl, "0").map_err(|e| {
            (
                format!("writing 0 to {sysctl} in the new network namespace"),
                e,
            )
        })?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|e| {
            (
                format!("creating network namespace file {}", path.display()),
                e,
            )
        })?;
    let bound = mount(
        Some("/proc/thread-self/ns/net"),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
    if let Err(e) = bound {
        let _ = fs::remove_file(path);
        return Err((
            format!("mounting the network namespace on {}", path.display()),
            e.into(),
        ));
    }
    Ok(())
}

/// Moves the calling thread into the network namespace mounted on `path`.
/// Only for threads started by [`on_thread`].
pub(crate) fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    setns(&file, CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// Undoes [`prepare_dir`] when nothing is left in `dir`: unmounts it and
/// removes it. Ok when it is already gone, or still holds namespaces.
pub(crate) fn release_dir(dir: &Path) -> io::Result<()> {
    let empty = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(mut entries) => entries.next().is_none(),
    };
    if !empty {
        return Ok(());
    }
    match umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Unmounts the namespace on `path` and removes the file. Ok when either is
/// already gone.
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    // More than one mount may be stacked on the file (two racing creators).
    for _ in 0..16 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL) => break,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes a sysctl of the calling thread's network namespace.
pub(crate) fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
}

/// Runs `f` on a new thread, which ends with it, and awaits its result; for
/// work that changes the thread's namespaces.
pub(crate) async fn on_thread<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> io::Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("verge-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("the network namespace helper thread panicked"))
}
