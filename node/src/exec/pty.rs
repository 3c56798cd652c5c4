//! The terminal of an interactive session: a pseudo-terminal made in the
//! instance's own `devpts` (its `/dev/pts/ptmx`, reached through the
//! workload's root), so that the command sees it as `/dev/pts/N` in the
//! instance; the daemon keeps the master, the slave becomes the helper's
//! stdio and the command's controlling terminal.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use verge_api::exec::WinSize;

/// A pseudo-terminal's two sides.
#[derive(Debug)]
pub(crate) struct Pair {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal in the `devpts` under `root` (a directory fd of
/// the instance's root; `None`: the host's `/dev/ptmx`), sized `size`.
pub(crate) fn open(root: Option<&OwnedFd>, size: WinSize) -> io::Result<Pair> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = match root {
        // No symlink of the instance is followed: it is not trusted.
        Some(root) => openat2(
            root,
            "dev/pts/ptmx",
            OpenHow::new()
                .flags(flags)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS),
        )?,
        None => nix::fcntl::open("/dev/ptmx", flags, Mode::empty())?,
    };
    let unlock: libc::c_int = 0;
    // SAFETY: ioctl(TIOCSPTLCK) reads an int from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // The slave by the master, not by a path (TIOCGPTPEER).
    // SAFETY: ioctl(TIOCGPTPEER) takes open flags and returns a new fd.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave as RawFd) };
    resize(master.as_raw_fd(), size)?;
    Ok(Pair { master, slave })
}

/// Sets the terminal's size (the kernel sends SIGWINCH to its foreground
/// process group when it changed).
pub(crate) fn resize(master: RawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ioctl(TIOCSWINSZ) reads a winsize from the pointer, which is valid.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
