//! Exec sessions on the node (SPEC §5 Exec): a command run inside a
//! running instance, its input and output relayed as
//! [`verge_api::exec::Frame`]s.
//!
//! The control plane opens a stream per session with an [`ExecOpen`];
//! [`Exec::serve`] checks that the instance runs here and that it has
//! fewer than [`ExecConfig::max_sessions`] sessions, starts the command
//! ([`Exec::start`]), answers one [`ExecReply`], and relays
//! ([`Session::run`]) until the command exited (`Exit`), the session broke
//! (`Error`) or the stream ended.
//!
//! The command runs like the instance's own processes: in its namespaces
//! (mount, so its root filesystem; PID, UTS, IPC, network, cgroup), in
//! its cgroup, as its user, with its environment and working dir, with its
//! capabilities. A helper process ([`exec_main`], the node binary run
//! again as `<exe> __verge-exec …`) sets it up and supervises it; see
//! [`helper`]. With `tty`, the command gets a pseudo-terminal of the
//! instance's own `/dev/pts`, whose master the daemon keeps.
//!
//! Whatever way a session ends (the command exited, the stream ended or
//! was reset, the node shuts down, the daemon died), the command and every
//! process of its session are killed: nothing it started is left in the
//! instance.

mod fdio;
mod helper;
mod procs;
mod pty;
mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quinn::{RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use verge_api::wire::io::Writer;
use verge_api::wire::{ExecOpen, ExecReply};

use crate::reconcile::Reconciler;

pub use helper::{EXEC_ARG, exec_main};
pub use session::{DRAIN, Ended, Session};

/// The most exec sessions an instance has at once, by default.
pub const DEFAULT_MAX_SESSIONS: usize = 8;

/// How exec sessions run.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The most sessions of one instance at once (`--exec-max-sessions`).
    pub max_sessions: usize,
    /// The program run as the helper, with [`EXEC_ARG`]: the node binary
    /// (`/proc/self/exe`, like the shim), or in tests a binary whose
    /// `main` calls [`exec_main`].
    pub helper_exe: PathBuf,
}

impl ExecConfig {
    /// [`DEFAULT_MAX_SESSIONS`], helper `helper_exe`.
    pub fn new(helper_exe: impl Into<PathBuf>) -> ExecConfig {
        ExecConfig {
            max_sessions: DEFAULT_MAX_SESSIONS,
            helper_exe: helper_exe.into(),
        }
    }
}

/// Why a session was not started (the [`ExecReply::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// For people, e.g. `exec foo: not found in the image's PATH (/bin)`.
    pub message: String,
    /// The instance has as many sessions as it may have at once.
    pub busy: bool,
}

/// Exec sessions of this node's instances, and their limits. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Exec {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: ExecConfig,
    /// Sessions by instance.
    sessions: Mutex<HashMap<String, usize>>,
    /// Fires on daemon shutdown: sessions end with an `Error`.
    shutdown: CancellationToken,
    /// Running sessions, and the cleanups of dropped ones.
    tracker: TaskTracker,
}

/// One session's place in its instance's count.
#[derive(Debug)]
struct Permit {
    inner: Arc<Inner>,
    instance: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut sessions = self.inner.sessions.lock().expect("not poisoned");
        if let Some(n) = sessions.get_mut(&self.instance) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.instance);
            }
        }
    }
}

impl Exec {
    /// Sessions end when `shutdown` fires.
    pub fn new(cfg: ExecConfig, shutdown: CancellationToken) -> Exec {
        Exec {
            inner: Arc::new(Inner {
                cfg,
                sessions: Mutex::new(HashMap::new()),
                shutdown,
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// How many sessions `instance` has now (until their cleanup ended).
    pub fn sessions(&self, instance: &str) -> usize {
        let sessions = self.inner.sessions.lock().expect("not poisoned");
        sessions.get(instance).copied().unwrap_or(0)
    }

    /// Serves one exec stream (see [`ExecOpen`]): the reply, then the
    /// session's frames; a refusal finishes the stream after the reply,
    /// a client that went away gets it reset.
    pub async fn serve(
        &self,
        open: ExecOpen,
        mut send: SendStream,
        recv: RecvStream,
        reconciler: &Reconciler,
        node: &str,
    ) {
        let started = match reconciler.exec_dir(&open.instance) {
            Ok(dir) => self.start(&open, &dir).await,
            Err(why) => Err(Refusal {
                message: format!("instance {} {why} (node {node})", open.instance),
                busy: false,
            }),
        };
        let session = match started {
            Ok(session) => session,
            Err(Refusal { message, busy }) => {
                tracing::info!(instance = %open.instance, %message, "exec refused");
                let _ = Writer::new(&mut send)
                    .send(&ExecReply::Refused { message, busy })
                    .await;
                let _ = send.finish();
                return;
            }
        };
        // A failed reply drops the session, which kills the command.
        if Writer::new(&mut send)
            .send(&ExecReply::Started)
            .await
            .is_err()
        {
            return;
        }
        match session.run(recv, &mut send).await {
            Ended::ClientGone => {
                let _ = send.reset(VarInt::from_u32(0));
            }
            // `run` finished the stream after the last frame.
            Ended::Exited(_) | Ended::Failed(_) => {}
        }
    }

    /// Starts `open.command` in the instance whose directory is `dir`
    /// (which the caller found running): a [`Session`] once the command
    /// was executed, or why not. The instance's session count includes it
    /// until it ended and was cleaned up.
    pub async fn start(&self, open: &ExecOpen, dir: &Path) -> Result<Session, Refusal> {
        if open.command.first().is_none_or(String::is_empty) {
            return Err(Refusal {
                message: "the command is empty".into(),
                busy: false,
            });
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(Refusal {
                message: "the node is shutting down".into(),
                busy: false,
            });
        }
        let permit = self.permit(&open.instance)?;
        let ctx = session::Context {
            helper_exe: &self.inner.cfg.helper_exe,
            permit,
            shutdown: self.inner.shutdown.clone(),
            tracker: self.inner.tracker.clone(),
        };
        session::start(ctx, open, dir).await
    }

    /// Waits until every session ended and was cleaned up (after shutdown).
    pub async fn stopped(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    fn permit(&self, instance: &str) -> Result<Permit, Refusal> {
        let max = self.inner.cfg.max_sessions;
        let mut sessions = self.inner.sessions.lock().expect("not poisoned");
        let n = sessions.get(instance).copied().unwrap_or(0);
        if n >= max {
            return Err(Refusal {
                message: format!(
                    "instance {instance} already has {max} exec sessions (the most at once, --exec-max-sessions)"
                ),
                busy: true,
            });
        }
        sessions.insert(instance.to_owned(), n + 1);
        Ok(Permit {
            inner: self.inner.clone(),
            instance: instance.to_owned(),
        })
    }
}
