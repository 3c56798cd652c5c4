//! The daemon's side of one exec session: starting the helper
//! ([`super::helper`]) and relaying the command's input and output as
//! [`Frame`]s over any byte stream (a QUIC stream in production).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use verge_api::exec::codec::ExecCodec;
use verge_api::exec::{Frame, MAX_PAYLOAD, WinSize};
use verge_api::wire::{ExecOpen, Isolation};

use super::fdio::AsyncFile;
use super::helper::{self, CONTROL_FD, EXEC_ARG, Report, Request};
use super::{Permit, Refusal, procs, pty};
use crate::runtime::cgroup::InstanceCgroup;
use crate::runtime::state::{self, Launch, ProcId};

/// How long the helper may take to start the command.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After the command exited, how long output still held open (by
/// processes it left behind) is relayed before `Exit`.
pub const DRAIN: Duration = Duration::from_secs(1);
/// How long the helper may take to kill the session and exit.
const HELPER_EXIT: Duration = Duration::from_secs(10);
/// How long the last frame (`Exit` or `Error`) may take to be sent.
const LAST_FRAME: Duration = Duration::from_secs(10);
/// The terminal's size when the client gave none.
const DEFAULT_SIZE: WinSize = WinSize { cols: 80, rows: 24 };
/// The longest report line of the helper.
const MAX_LINE: usize = 64 * 1024;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The command exited with this code (`128 + n` for signal n), sent
    /// as `Exit`.
    Exited(i32),
    /// The client's side ended or broke first (or stopped taking output):
    /// the command was killed, nothing more was sent.
    ClientGone,
    /// The session broke, sent as `Error` (e.g. the node shuts down).
    Failed(String),
}

/// The command's input: a pipe, or the terminal.
type Input = Box<dyn AsyncWrite + Unpin + Send>;
/// The command's output: a pipe, or the terminal.
type Output = Box<dyn AsyncRead + Unpin + Send>;

/// A started command, ready to be relayed with [`Session::run`]. Dropping
/// it (or the `run` future) kills the command and every process it
/// started.
pub struct Session {
    instance: String,
    helper: Helper,
    /// The command's stdin (a pipe or the terminal); `None` without `stdin`.
    stdin: Option<Input>,
    stdout: Option<Output>,
    /// `None` with a terminal (one stream).
    stderr: Option<Output>,
    /// The terminal's master.
    pty: Option<AsyncFile>,
    shutdown: CancellationToken,
    _running: TaskTrackerToken,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("instance", &self.instance)
            .field("pid", &self.helper.leader)
            .field("tty", &self.pty.is_some())
            .finish()
    }
}

/// The helper process and its socket; on drop (a session that did not
/// finish), the socket's end makes the helper kill the session, and a
/// task reaps it.
struct Helper {
    child: Option<Child>,
    reports: Option<FramedRead<AsyncFile, LinesCodec>>,
    requests: Option<FramedWrite<AsyncFile, LinesCodec>>,
    /// The socket (shared with `reports` and `requests`).
    ctl: AsyncFile,
    /// The command's host PID (its session ID); 0 before it started.
    leader: i32,
    cgroup: Option<String>,
    permit: Option<Permit>,
    tracker: TaskTracker,
}

/// What [`start`] needs from the [`super::Exec`].
pub(super) struct Context<'a> {
    pub helper_exe: &'a Path,
    pub permit: Permit,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Starts `open.command` in the instance whose directory is `dir`.
pub(super) async fn start(
    ctx: Context<'_>,
    open: &ExecOpen,
    dir: &Path,
) -> Result<Session, Refusal> {
    let id = &open.instance;
    let refused = |message: String| Refusal {
        message,
        busy: false,
    };
    let not_running = || refused(format!("instance {id} is not running"));
    let launch: Launch = state::read_json(&dir.join(state::LAUNCH)).map_err(|_| not_running())?;
    let workload = ProcId::read(&dir.join(state::PID)).map_err(|_| not_running())?;
    if !workload.alive() {
        return Err(not_running());
    }

    let terminal = if open.tty {
        let pair = open_terminal(
            launch.isolation,
            workload,
            open.size.unwrap_or(DEFAULT_SIZE),
        )
        .map_err(|e| match e {
            TerminalError::Gone => not_running(),
            TerminalError::Io(e) => {
                refused(format!("cannot open a terminal in instance {id}: {e}"))
            }
        })?;
        let master = AsyncFile::new(pair.master, true)
            .map_err(|e| refused(format!("cannot poll the terminal: {e}")))?;
        Some((master, pair.slave))
    } else {
        None
    };

    let (ours, theirs) =
        StdUnixStream::pair().map_err(|e| refused(format!("cannot make a socket pair: {e}")))?;
    let options = helper::Options {
        tty: open.tty,
        term: open.term.clone(),
        daemon: std::process::id() as i32,
    };
    let options = serde_json::to_string(&options).expect("options serialise");
    let mut cmd = tokio::process::Command::new(ctx.helper_exe);
    cmd.arg(EXEC_ARG)
        .arg(dir)
        .arg(options)
        .args(&open.command)
        .env_clear()
        .current_dir("/")
        // Away from the daemon's terminal: a Ctrl-C there is the daemon's.
        .process_group(0)
        .kill_on_drop(false);
    match &terminal {
        Some((_, slave)) => {
            let stdio = || {
                slave
                    .try_clone()
                    .map(Stdio::from)
                    .map_err(|e| refused(format!("cannot duplicate the terminal: {e}")))
            };
            cmd.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        }
        None => {
            cmd.stdin(if open.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
    }
    let theirs = OwnedFd::from(theirs);
    let fd = theirs.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe functions (dup2, fcntl) on `fd`, which stays open
    // until `spawn` returned (`theirs` lives until then).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == CONTROL_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CONTROL_FD)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let spawned = cmd.spawn();
    // The helper's copies only: the terminal must end when its slave fds do.
    drop(cmd);
    drop(theirs);
    let pty_master = terminal.map(|(master, _slave)| master);
    let mut child = spawned.map_err(|e| {
        refused(format!(
            "cannot run the exec helper {}: {e}",
            ctx.helper_exe.display()
        ))
    })?;
    let ctl = AsyncFile::new(OwnedFd::from(ours), false)
        .map_err(|e| refused(format!("cannot poll the exec helper's socket: {e}")))?;
    let stdin_pipe = match child.stdin.take().map(|s| s.into_owned_fd()) {
        Some(Ok(fd)) => Some(
            AsyncFile::new(fd, false)
                .map_err(|e| refused(format!("cannot poll the command's stdin: {e}")))?,
        ),
        Some(Err(e)) => return Err(refused(format!("the command's stdin: {e}"))),
        None => None,
    };

    let (stdin, stdout, stderr): (Option<Input>, Option<Output>, Option<Output>) = match &pty_master
    {
        Some(m) => (
            open.stdin.then(|| Box::new(m.clone()) as _),
            Some(Box::new(m.clone())),
            None,
        ),
        None => (
            stdin_pipe.map(|s| Box::new(s) as _),
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ),
    };
    let mut helper = Helper {
        child: Some(child),
        reports: Some(FramedRead::new(
            ctl.clone(),
            LinesCodec::new_with_max_length(MAX_LINE),
        )),
        requests: Some(FramedWrite::new(ctl.clone(), LinesCodec::new())),
        ctl,
        leader: 0,
        cgroup: launch.cgroup,
        permit: Some(ctx.permit),
        tracker: ctx.tracker.clone(),
    };
    match tokio::time::timeout(START_TIMEOUT, helper.next_report()).await {
        Ok(Some(Report::Started { pid })) => helper.leader = pid,
        Ok(Some(Report::Failed { message })) => {
            helper.finish().await;
            return Err(refused(message));
        }
        Ok(other) => {
            let status = helper.finish().await;
            let why = match other {
                None => format!("it ended ({status})"),
                Some(r) => format!("it said {r:?} first"),
            };
            return Err(refused(format!(
                "the exec helper did not start the command: {why}"
            )));
        }
        Err(_) => {
            helper.finish().await;
            return Err(refused(format!(
                "the exec helper did not start the command within {START_TIMEOUT:?}"
            )));
        }
    }
    tracing::info!(instance = %id, pid = helper.leader, tty = open.tty, "exec session started");
    Ok(Session {
        instance: id.clone(),
        helper,
        stdin,
        stdout,
        stderr,
        pty: pty_master,
        shutdown: ctx.shutdown,
        _running: ctx.tracker.token(),
    })
}

enum TerminalError {
    /// The workload is gone.
    Gone,
    Io(io::Error),
}

/// A terminal in the instance's `devpts` (isolation `namespaces`) or the
/// host's.
fn open_terminal(
    isolation: Isolation,
    workload: ProcId,
    size: WinSize,
) -> Result<pty::Pair, TerminalError> {
    match isolation {
        Isolation::None => pty::open(None, size).map_err(TerminalError::Io),
        Isolation::Namespaces => {
            let root = nix::fcntl::open(
                format!("/proc/{}/root", workload.pid).as_str(),
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|_| TerminalError::Gone)?;
            // Opened before checking: it is the workload's root, not a PID reuser's.
            if !workload.alive() {
                return Err(TerminalError::Gone);
            }
            pty::open(Some(&root), size).map_err(TerminalError::Io)
        }
    }
}

impl Session {
    /// The command's host PID (the ID of its session).
    pub fn pid(&self) -> i32 {
        self.helper.leader
    }

    /// Relays frames until the command exited and its output ended (or
    /// [`DRAIN`] passed), the client went away, or the node shuts down;
    /// then kills what is left of the session, sends the last frame
    /// (`Exit` or `Error`) and shuts `output` down.
    pub async fn run<R, W>(mut self, input: R, output: W) -> Ended
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut frames = FramedRead::new(input, ExecCodec);
        let mut out = FramedWrite::new(output, ExecCodec);
        let ended = self.relay(&mut frames, &mut out).await;
        self.helper.finish().await;
        let last = match &ended {
            Ended::Exited(code) => Some(Frame::Exit(*code)),
            Ended::Failed(message) => Some(Frame::Error(message.clone())),
            Ended::ClientGone => None,
        };
        if let Some(frame) = last {
            let sent = tokio::time::timeout(LAST_FRAME, async {
                out.send(frame).await?;
                out.close().await
            });
            if !matches!(sent.await, Ok(Ok(()))) {
                tracing::debug!(instance = %self.instance, "the last exec frame was not sent");
            }
        }
        tracing::info!(instance = %self.instance, pid = self.helper.leader, ?ended, "exec session ended");
        ended
    }

    async fn relay<R, W>(
        &mut self,
        frames: &mut FramedRead<R, ExecCodec>,
        out: &mut FramedWrite<W, ExecCodec>,
    ) -> Ended
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out_buf = vec![0u8; MAX_PAYLOAD];
        let mut err_buf = vec![0u8; MAX_PAYLOAD];
        // Input taken from one Stdin frame and not written yet: at most one
        // frame is held, so the client's frames wait in the stream meanwhile.
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut close_stdin = false;
        let mut code: Option<i32> = None;
        let mut deadline = Instant::now();
        // The client's frames ended after the command exited: the output
        // is still relayed.
        let mut input_done = false;
        let shutdown = self.shutdown.clone();
        loop {
            if let Some(code) = code
                && self.stdout.is_none()
                && self.stderr.is_none()
            {
                return Ended::Exited(code);
            }
            if close_stdin && at >= pending.len() {
                close_stdin = false;
                if let Some(mut stdin) = self.stdin.take() {
                    let _ = stdin.shutdown().await;
                }
            }
            let writing = at < pending.len();
            tokio::select! {
                () = shutdown.cancelled() => return shutting_down(),
                report = self.helper.next_report(), if code.is_none() => match report {
                    Some(Report::Exited { code: c }) => {
                        code = Some(c);
                        deadline = Instant::now() + DRAIN;
                    }
                    Some(other) => {
                        tracing::debug!(report = ?other, "unexpected exec helper report");
                    }
                    None => {
                        return Ended::Failed("the exec helper ended unexpectedly".into());
                    }
                },
                () = tokio::time::sleep_until(deadline), if code.is_some() => {
                    tracing::debug!("output still open {DRAIN:?} after the command exited");
                    return Ended::Exited(code.unwrap_or_default());
                }
                frame = frames.next(), if !writing && !input_done => match frame {
                    None | Some(Err(_)) if code.is_some() => input_done = true,
                    None => return Ended::ClientGone,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "exec input broke");
                        return Ended::ClientGone;
                    }
                    Some(Ok(Frame::Stdin(data))) => {
                        if self.stdin.is_some() && !close_stdin {
                            pending = data;
                            at = 0;
                        }
                    }
                    Some(Ok(Frame::StdinEof)) => {
                        if self.pty.is_some() {
                            // The terminal's end-of-file character (VEOF, ^D).
                            if self.stdin.is_some() {
                                pending = vec![4];
                                at = 0;
                            }
                        } else {
                            close_stdin = true;
                        }
                    }
                    Some(Ok(Frame::Resize(size))) => {
                        if let Some(pty) = &self.pty
                            && let Err(e) = pty::resize(pty.as_raw_fd(), size)
                        {
                            tracing::debug!(error = %e, "resizing the terminal failed");
                        }
                    }
                    Some(Ok(Frame::Signal(signal))) => self.helper.signal(signal).await,
                    // Output frames from the client mean nothing.
                    Some(Ok(_)) => {}
                },
                n = write_some(&mut self.stdin, &pending[at.min(pending.len())..]), if writing => match n {
                    Ok(n) => at += n,
                    Err(_) => {
                        // The command closed its stdin: input goes nowhere.
                        pending.clear();
                        at = 0;
                        self.stdin = None;
                    }
                },
                n = read_some(&mut self.stdout, &mut out_buf), if self.stdout.is_some() => match n {
                    Ok(0) | Err(_) => self.stdout = None,
                    Ok(n) => {
                        if let Some(ended) = emit(out, Frame::Stdout(out_buf[..n].to_vec()), &shutdown).await {
                            return ended;
                        }
                    }
                },
                n = read_some(&mut self.stderr, &mut err_buf), if self.stderr.is_some() => match n {
                    Ok(0) | Err(_) => self.stderr = None,
                    Ok(n) => {
                        if let Some(ended) = emit(out, Frame::Stderr(err_buf[..n].to_vec()), &shutdown).await {
                            return ended;
                        }
                    }
                },
            }
        }
    }
}

/// Sends output as fast as the client takes it (or until the node shuts
/// down); how the session ended if it cannot.
async fn emit<W: AsyncWrite + Unpin>(
    out: &mut FramedWrite<W, ExecCodec>,
    frame: Frame,
    shutdown: &CancellationToken,
) -> Option<Ended> {
    tokio::select! {
        // A frame cut short stays in the buffer, ahead of the last one.
        sent = out.send(frame) => sent.err().map(|_| Ended::ClientGone),
        () = shutdown.cancelled() => Some(shutting_down()),
    }
}

fn shutting_down() -> Ended {
    Ended::Failed("the node is shutting down".into())
}

async fn read_some(src: &mut Option<Output>, buf: &mut [u8]) -> io::Result<usize> {
    match src {
        Some(src) => src.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_some(dst: &mut Option<Input>, data: &[u8]) -> io::Result<usize> {
    match dst {
        Some(dst) => dst.write(data).await,
        None => Err(io::ErrorKind::BrokenPipe.into()),
    }
}

impl Helper {
    /// The helper's next report; `None` when it is gone. Cancel-safe.
    async fn next_report(&mut self) -> Option<Report> {
        let reports = self.reports.as_mut()?;
        loop {
            match reports.next().await {
                Some(Ok(line)) => match serde_json::from_str(&line) {
                    Ok(report) => return Some(report),
                    Err(_) => tracing::debug!(%line, "unknown exec helper report"),
                },
                _ => return None,
            }
        }
    }

    /// The end of the requests tells the helper to end the session.
    fn end_requests(&mut self) {
        self.requests = None;
        // SAFETY: shutdown(2) on the socket `ctl` keeps open.
        unsafe { libc::shutdown(self.ctl.as_raw_fd(), libc::SHUT_WR) };
    }

    async fn signal(&mut self, signal: i32) {
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        let line = serde_json::to_string(&Request::Signal { signal }).expect("serialises");
        if requests.send(line).await.is_err() {
            tracing::debug!("the exec helper does not take requests");
        }
    }

    /// Ends the session: the helper kills what is left of it and exits.
    /// Returns the helper's exit status, for messages.
    async fn finish(&mut self) -> String {
        self.end_requests();
        let Some(child) = self.child.take() else {
            return "already finished".into();
        };
        let status = cleanup(child, self.reports.take(), self.leader, self.cgroup.take()).await;
        self.permit = None;
        status
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.end_requests();
        let Some(child) = self.child.take() else {
            return;
        };
        let (reports, leader, cgroup, permit) = (
            self.reports.take(),
            self.leader,
            self.cgroup.take(),
            self.permit.take(),
        );
        // Without a runtime (the daemon is exiting), the helper still ends
        // the session by itself: its socket's end is the sign.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(async move {
                cleanup(child, reports, leader, cgroup).await;
                drop(permit);
            });
        }
    }
}

/// Waits for the helper to kill the session and exit (it was told by the
/// end of its requests); kills it if it takes too long, and then kills
/// what is left of the session from here. Returns its exit status.
async fn cleanup(
    mut child: Child,
    reports: Option<FramedRead<AsyncFile, LinesCodec>>,
    leader: i32,
    cgroup: Option<String>,
) -> String {
    let mut swept = false;
    if let Some(mut reports) = reports {
        let _ = tokio::time::timeout(HELPER_EXIT, async {
            while let Some(Ok(line)) = reports.next().await {
                if let Ok(Report::Swept { all }) = serde_json::from_str(&line) {
                    swept = all;
                }
            }
        })
        .await;
    }
    let status = match tokio::time::timeout(HELPER_EXIT, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(pid = leader, "the exec helper did not end; killing it");
            let _ = child.start_kill();
            child.wait().await
        }
    };
    if !swept && leader > 0 {
        tracing::info!(pid = leader, "killing what is left of an exec session");
        let killed = tokio::task::spawn_blocking(move || {
            let cgroup = cgroup.as_deref().map(InstanceCgroup::load);
            // The command is reaped: look only in the instance (its cgroup),
            // where a reused PID would be the instance's own.
            procs::kill_session(leader, false, &|| {
                cgroup.as_ref().map(InstanceCgroup::procs)
            })
        })
        .await;
        if !matches!(killed, Ok(true)) {
            tracing::warn!(pid = leader, "processes of an exec session survived");
        }
    }
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("waiting for it: {e}"),
    }
}
