//! File descriptors in tokio's reactor for the session's own I/O: the
//! terminal's master, the command's stdin pipe, the helper's socket.
//!
//! Writes never raise SIGPIPE, whatever the process's disposition of it
//! (the `verge` binary restores the default action, which would end the
//! daemon when a command closed its stdin): SIGPIPE is blocked on the
//! writing thread around the write, and one it raised is taken back, so a
//! closed reader is an `EPIPE` error only.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking fd, readable and writable. Cheap to clone: clones share
/// the fd (e.g. one reads, one writes).
#[derive(Debug, Clone)]
pub(crate) struct AsyncFile {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// `EIO` on reading is the end (a terminal's master once every slave
    /// fd is closed).
    eio_is_eof: bool,
}

impl AsyncFile {
    /// Registers `fd` (made non-blocking).
    pub fn new(fd: OwnedFd, eio_is_eof: bool) -> io::Result<AsyncFile> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the `OwnedFd` owns the open fd and moves into the
        // `AsyncFd`, which keeps it open and unchanged until it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(AsyncFile {
            fd: Arc::new(fd),
            eio_is_eof,
        })
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsyncRead for AsyncFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from));
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for AsyncFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| write_without_sigpipe(fd.get_ref(), buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A socket's writing side is shut down (its peer reads the end); other
    /// fds end when the last clone is dropped.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on an fd this file keeps open.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTSOCK) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `write(2)` with SIGPIPE blocked on this thread; a SIGPIPE it raised is
/// taken back (see the module's doc).
fn write_without_sigpipe(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let old = pipe.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let pending_before = sigpipe_pending();
    let result = nix::unistd::write(fd, buf);
    if result == Err(Errno::EPIPE) && !pending_before {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: sigtimedwait with a valid set, no siginfo, and a zero
        // timeout: it takes the pending SIGPIPE (blocked here) at once.
        unsafe { libc::sigtimedwait(pipe.as_ref(), std::ptr::null_mut(), &zero) };
    }
    let _ = old.thread_set_mask();
    result.map_err(io::Error::from)
}

fn sigpipe_pending() -> bool {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigpending fills the set it is given; it is read only when
    // the call succeeded.
    unsafe {
        libc::sigpending(set.as_mut_ptr()) == 0
            && libc::sigismember(set.as_ptr(), libc::SIGPIPE) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write to a pipe without a reader is EPIPE, even with SIGPIPE's
    /// default action (which would end this test process).
    #[tokio::test]
    async fn a_closed_reader_is_epipe_not_sigpipe() {
        use tokio::io::AsyncWriteExt as _;
        // SAFETY: restoring a default disposition runs no handler code.
        let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let mut w = AsyncFile::new(write, false).unwrap();
        let err = w.write(b"x").await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
        assert!(!sigpipe_pending());
        // SAFETY: as above.
        unsafe { libc::signal(libc::SIGPIPE, old) };
    }
}
