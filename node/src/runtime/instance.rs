//! A handle on a started (or adopted) instance: waiting for its exit and
//! stopping it, without being its parent.
//!
//! The daemon is never the parent of an instance's processes, so it waits
//! with pidfds: the shim's pidfd becomes readable when the shim exits, which
//! it does right after writing `exit.json`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use verge_api::wire::Isolation;

use super::Exit;
use super::state::{self, ProcId};

/// A running or exited instance. Cheap to clone; all clones see the same exit.
#[derive(Clone)]
pub struct Instance {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    isolation: Isolation,
    workload: Option<ProcId>,
    exit: watch::Receiver<Option<Exit>>,
    /// An instance that runs inside the daemon (wasm): stopped by this
    /// token, not by signals.
    stop: Option<CancellationToken>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.inner.id)
            .field("pid", &self.pid())
            .field("exit", &self.try_exit())
            .finish()
    }
}

impl Instance {
    /// Watches the instance in `dir` whose shim is `shim` (`None`: known to
    /// be gone). Needs a tokio runtime.
    pub(crate) fn watch(
        id: &str,
        dir: &Path,
        isolation: Isolation,
        shim: Option<ProcId>,
        workload: Option<ProcId>,
    ) -> Instance {
        let (tx, rx) = watch::channel(None);
        match shim.and_then(|s| s.pidfd()).map(register) {
            Some(Ok(pidfd)) => {
                let dir = dir.to_path_buf();
                tokio::spawn(async move {
                    // Readable once the shim has exited.
                    let _ = pidfd.readable().await;
                    let _ = tx.send(Some(read_exit(&dir)));
                });
            }
            Some(Err(e)) => {
                tracing::warn!(instance = id, error = %e, "cannot poll the shim's pidfd");
                let dir = dir.to_path_buf();
                let shim = shim.expect("pidfd came from the shim");
                tokio::spawn(async move {
                    while shim.alive() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = tx.send(Some(read_exit(&dir)));
                });
            }
            None => {
                let _ = tx.send(Some(read_exit(dir)));
            }
        }
        Instance {
            inner: Arc::new(Inner {
                id: id.to_owned(),
                isolation,
                workload,
                exit: rx,
                stop: None,
            }),
        }
    }

    /// An instance that runs inside the daemon (a wasm instance on a
    /// thread of its own): its exit arrives on `exit`, and [`stop`](Self::stop)
    /// fires `stop`. It has no PID.
    pub fn in_daemon(
        id: &str,
        exit: watch::Receiver<Option<Exit>>,
        stop: CancellationToken,
    ) -> Instance {
        Instance {
            inner: Arc::new(Inner {
                id: id.to_owned(),
                isolation: Isolation::None,
                workload: None,
                exit,
                stop: Some(stop),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The host PID of the workload's first process (PID 1 in its namespace
    /// with isolation `namespaces`); 0 if it never started.
    pub fn pid(&self) -> i32 {
        self.inner.workload.map_or(0, |w| w.pid)
    }

    /// The exit, if the instance has exited.
    pub fn try_exit(&self) -> Option<Exit> {
        self.inner.exit.borrow().clone()
    }

    /// Waits for the instance to exit. Cancel-safe; any number of tasks may
    /// wait at once.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.inner.exit.clone();
        let result = rx.wait_for(Option::is_some).await.map(|e| e.clone());
        match result {
            Ok(Some(exit)) => exit,
            // The watcher is gone (its runtime shut down): say so.
            _ => Exit::lost("the node stopped watching the instance".into()),
        }
    }

    /// Stops the instance: SIGTERM, then SIGKILL after `grace` (an
    /// instance inside the daemon: its stop token, at once).
    ///
    /// With isolation `namespaces` the workload is PID 1 of its PID
    /// namespace, and the kernel does not deliver to it signals it has no
    /// handler for (no default action, so an uncaught SIGTERM would simply be
    /// lost). So when its `SigCgt` mask shows no SIGTERM handler, it gets
    /// SIGKILL at once instead of waiting out the grace period for nothing.
    pub async fn stop(&self, grace: Duration) -> Exit {
        if let Some(exit) = self.try_exit() {
            return exit;
        }
        if let Some(stop) = &self.inner.stop {
            // Interrupted at once: there is no signal to catch.
            stop.cancel();
            return self.wait().await;
        }
        let pidfd = self
            .inner
            .workload
            .and_then(|w| w.pidfd().map(|fd| (w, fd)));
        let Some((workload, pidfd)) = pidfd else {
            return self.wait().await;
        };
        let catches_term = match self.inner.isolation {
            Isolation::None => true,
            Isolation::Namespaces => {
                state::catches_signal(workload.pid, libc::SIGTERM).unwrap_or(false)
            }
        };
        if catches_term {
            signal(&pidfd, libc::SIGTERM, &self.inner.id);
            if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
                return exit;
            }
        }
        signal(&pidfd, libc::SIGKILL, &self.inner.id);
        self.wait().await
    }
}

/// A pidfd in tokio's reactor (readable once the process exited).
fn register(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` owns an open pidfd and moves into the `AsyncFd`,
    // which keeps it open and unchanged until it is dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }.map_err(Into::into)
}

fn signal(pidfd: &OwnedFd, signal: i32, id: &str) {
    if let Err(e) = state::pidfd_send_signal(pidfd.as_raw_fd(), signal) {
        // ESRCH: it exited meanwhile.
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(instance = id, signal, error = %e, "cannot signal the instance");
        }
    }
}

/// `exit.json` of the instance in `dir`, or a "lost" exit if the shim died
/// without writing it.
pub(crate) fn read_exit(dir: &Path) -> Exit {
    let path: PathBuf = dir.join(state::EXIT);
    match state::read_json::<Exit>(&path) {
        Ok(exit) => exit,
        Err(e) => Exit::lost(format!(
            "the instance's shim ended without recording its exit ({e}); see {}",
            dir.join(state::SHIM_LOG).display()
        )),
    }
}
