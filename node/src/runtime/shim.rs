//! The per-instance supervisor: a fresh, single-threaded execution of the
//! node's binary (`<exe> __verge-shim <instance dir>`), started by the
//! daemon and detached from it, so the instance outlives a daemon restart.
//!
//! 1. It calls `setsid` and forks; the first process exits (the daemon
//!    reaps it), the second, the shim proper, is re-parented to init.
//! 2. The shim writes `shim.pid`, reads the instance's secret files from
//!    its stdin (a memfd the daemon filled, see [`super::attach`]; they stay
//!    in its memory only, for the workload's process to write to a tmpfs),
//!    opens `app.log` in the instance's logs
//!    dir ([`Launch::logs_dir`]), makes a pipe for the workload's stdout
//!    and one for its stderr (stdin is `/dev/null`), and (isolation
//!    `namespaces`) unshares a PID namespace, then forks the workload's
//!    process, which is PID 1 there ([`super::child`]).
//! 3. It writes `pid`, moves the child into the instance's cgroup, lets it
//!    go, and reads its error pipe: empty at `execve` means started.
//! 4. It reports one JSON line ([`Report`]) on its stdout, a pipe the daemon
//!    reads (and is gone from then on: a dead daemon costs nothing).
//! 5. It `poll`s both pipes and a pidfd of the workload: every line read
//!    becomes an app record in `app.log` (stamped when read, see
//!    [`crate::logs::Capture`]; an unfinished line is written after
//!    [`QUIET`](crate::logs::QUIET) without more output), written out each
//!    round and rotated by size. Nothing waits for the daemon.
//! 6. When the pidfd says the workload exited, it reaps it, removes the
//!    cgroup (killing anything left), reads what is left in the pipes (to
//!    their end, at most [`DRAIN`]), writes `exit.json` and exits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, pipe2, setsid};
use serde::{Deserialize, Serialize};

use verge_api::logs::LogStream;
use verge_api::wire::Isolation;

use crate::logs::Capture;

use super::attach;
use super::cgroup::InstanceCgroup;
use super::child::{self, Child};
use super::state::{self, Launch, ProcId};
use super::{Exit, LaunchSpec};

/// How long the shim reads what is left in the workload's pipes after it
/// exited (a process it left behind without a cgroup to kill it may keep
/// them open).
pub const DRAIN: Duration = Duration::from_secs(1);

/// What the shim tells the daemon once the workload started or failed to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub shim: ProcId,
    /// The workload's PID 1, on the host; `None` when it failed to start.
    pub workload: Option<ProcId>,
    pub failed: Option<String>,
}

/// The shim's entry point: the node binary calls it when its first argument
/// is [`super::SHIM_ARG`], before starting any thread (no tokio runtime).
pub fn shim_main(instance_dir: &Path) -> ! {
    // A report written after the daemon died must not kill the shim.
    // SAFETY: setting SIG_IGN runs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
    if let Err(e) = setsid() {
        eprintln!("verge-shim: setsid: {e}");
        std::process::exit(1);
    }
    // SAFETY: this process is a fresh exec and single-threaded: nothing can
    // hold a lock across the fork.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
        Err(e) => {
            eprintln!("verge-shim: fork: {e}");
            std::process::exit(1);
        }
    }
    let code = match supervise(instance_dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("verge-shim {}: {e}", instance_dir.display());
            1
        }
    };
    std::process::exit(code)
}

fn supervise(dir: &Path) -> Result<(), String> {
    let me = ProcId::of(getpid().as_raw()).ok_or("cannot read my own /proc/<pid>/stat")?;
    me.write(&dir.join(state::SHIM_PID))
        .map_err(|e| format!("writing {}: {e}", state::SHIM_PID))?;
    let secrets = match attach::read_secrets() {
        Ok(secrets) => secrets,
        Err(e) => return fail(dir, me, None, e),
    };
    let loaded = state::read_json::<LaunchSpec>(&dir.join(state::SPEC)).and_then(|spec| {
        state::read_json::<Launch>(&dir.join(state::LAUNCH)).map(|launch| (spec, launch))
    });
    let (spec, launch) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return fail(dir, me, None, format!("reading the instance's spec: {e}")),
    };
    let cgroup = launch.cgroup.as_deref().map(InstanceCgroup::load);
    let logs = launch.logs_dir(dir);
    let mut capture = match Capture::open(&logs, launch.log_limits) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("opening app.log in {}: {e}", logs.display());
            return fail(dir, me, cgroup.as_ref(), message);
        }
    };
    let (stdio, mut outputs) = match open_stdio() {
        Ok(stdio) => stdio,
        Err(e) => return fail(dir, me, cgroup.as_ref(), e),
    };
    let pipes = pipe2(OFlag::O_CLOEXEC).and_then(|go| pipe2(OFlag::O_CLOEXEC).map(|err| (go, err)));
    let ((go_read, go_write), (err_read, err_write)) = match pipes {
        Ok(p) => p,
        Err(e) => return fail(dir, me, cgroup.as_ref(), format!("pipe: {e}")),
    };
    if launch.isolation == Isolation::Namespaces
        && let Err(e) = unshare(CloneFlags::CLONE_NEWPID)
    {
        let message = format!("unshare(CLONE_NEWPID): {e}");
        return fail(dir, me, cgroup.as_ref(), message);
    }
    // SAFETY: the shim is single-threaded (see `shim_main`).
    let pid = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop((go_write, err_read, outputs));
            child::run(Child {
                spec: &spec,
                dir,
                isolation: launch.isolation,
                volumes: &launch.mounts,
                secrets: &secrets,
                stdio,
                go: go_read,
                errors: err_write,
            })
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return fail(dir, me, cgroup.as_ref(), format!("fork: {e}")),
    };
    // The workload's process has its own copy of the secret files.
    drop((go_read, err_write, stdio, secrets));
    // Readable once the workload exited. The shim is its parent and has not
    // reaped it, so the PID is its own.
    let pidfd = state::pidfd_open(pid.as_raw())
        .map_err(|e| {
            eprintln!("verge-shim: pidfd_open: {e}; waiting for the end of the output instead")
        })
        .ok();

    let setup = (|| {
        let workload = ProcId::of(pid.as_raw()).ok_or("the workload's process vanished")?;
        workload
            .write(&dir.join(state::PID))
            .map_err(|e| format!("writing {}: {e}", state::PID))?;
        if let Some(cg) = &cgroup {
            cg.add(pid.as_raw()).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(workload)
    })();
    let oom_before = cgroup.as_ref().map_or(0, InstanceCgroup::oom_kills);
    let workload = match setup {
        // Dropping `go_write` unsent makes the child exit.
        Err(e) => {
            drop(go_write);
            let _ = wait(pid);
            drain(&mut outputs, &mut capture);
            return fail(dir, me, cgroup.as_ref(), e);
        }
        Ok(workload) => {
            let _ = nix::unistd::write(&go_write, b"g");
            drop(go_write);
            workload
        }
    };

    let mut message = Vec::new();
    let _ = File::from(err_read).read_to_end(&mut message);
    if !message.is_empty() {
        let _ = wait(pid);
        drain(&mut outputs, &mut capture);
        return fail(
            dir,
            me,
            cgroup.as_ref(),
            String::from_utf8_lossy(&message).into_owned(),
        );
    }
    report(&Report {
        shim: me,
        workload: Some(workload),
        failed: None,
    });

    // Until the workload exits (without a pidfd: until its output ends).
    pump(&mut outputs, &mut capture, pidfd.as_ref(), None);
    let status = wait(pid);
    let mut exit = Exit {
        code: None,
        signal: None,
        oom: false,
        message: None,
        start_failed: false,
        at_ms: 0,
    };
    match status {
        Ok(WaitStatus::Exited(_, code)) => exit.code = Some(code),
        Ok(WaitStatus::Signaled(_, sig, _)) => exit.signal = Some(sig as i32),
        other => exit.message = Some(format!("waiting for the workload: {other:?}")),
    }
    if let Some(cg) = &cgroup {
        let killed = exit.signal == Some(libc::SIGKILL) || exit.code == Some(128 + libc::SIGKILL);
        exit.oom = killed && cg.oom_kills() > oom_before;
        // Kills whatever the workload left behind, so the pipes end.
        cg.delete();
    }
    drain(&mut outputs, &mut capture);
    finish(dir, None, exit)
}

/// The read ends of the workload's stdout and stderr pipes (non-blocking),
/// `None` once ended.
type Outputs = [Option<OwnedFd>; 2];

const STREAMS: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

/// Reads what is left in the pipes of an exited workload, to their end or
/// for at most [`DRAIN`], and writes every unfinished line.
fn drain(outputs: &mut Outputs, capture: &mut Capture) {
    pump(outputs, capture, None, Some(Instant::now() + DRAIN));
    for stream in STREAMS {
        capture.flush_partial(stream);
    }
    capture.flush();
    *outputs = [None, None];
}

/// Reads the workload's outputs into `capture`, writing them out each
/// round, until `exited` (a pidfd) is readable, or both outputs ended
/// (and there is no `exited`), or `deadline`.
fn pump(
    outputs: &mut Outputs,
    capture: &mut Capture,
    exited: Option<&OwnedFd>,
    deadline: Option<Instant>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        capture.flush_quiet(now);
        capture.flush();
        if deadline.is_some_and(|d| now >= d)
            || (exited.is_none() && outputs.iter().all(Option::is_none))
        {
            return;
        }
        let wake = [capture.quiet_deadline(), deadline]
            .into_iter()
            .flatten()
            .min();
        let timeout = match wake {
            // Rounded up: waking early would only spin.
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let mut fds = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, fd) in outputs.iter().enumerate() {
            if let Some(fd) = fd {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(Some(i));
            }
        }
        if let Some(fd) = exited {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            which.push(None);
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("verge-shim: poll: {e}");
                return;
            }
        }
        let ready: Vec<Option<usize>> = fds
            .iter()
            .zip(&which)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);
        let mut done = false;
        for w in ready {
            match w {
                Some(i) => read_output(outputs, i, capture, &mut buf),
                None => done = true,
            }
        }
        if done {
            capture.flush();
            return;
        }
    }
}

/// Reads output `i` until it would block (or a bounded number of reads,
/// so one busy output does not starve the other), or ends.
fn read_output(outputs: &mut Outputs, i: usize, capture: &mut Capture, buf: &mut [u8]) {
    let stream = STREAMS[i];
    for _ in 0..16 {
        let Some(fd) = &outputs[i] else { return };
        match nix::unistd::read(fd, buf) {
            Ok(0) => {
                capture.flush_partial(stream);
                outputs[i] = None;
                return;
            }
            Ok(n) => capture.take(stream, &buf[..n], Instant::now()),
            Err(Errno::EAGAIN) => return,
            Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("verge-shim: reading the workload's {stream:?}: {e}");
                capture.flush_partial(stream);
                outputs[i] = None;
                return;
            }
        }
    }
}

/// Records a start failure, tells the daemon, and ends the shim.
fn fail(
    dir: &Path,
    me: ProcId,
    cgroup: Option<&InstanceCgroup>,
    message: String,
) -> Result<(), String> {
    let exit = Exit {
        code: None,
        signal: None,
        oom: false,
        message: Some(message.clone()),
        start_failed: true,
        at_ms: 0,
    };
    let written = finish(dir, cgroup, exit);
    report(&Report {
        shim: me,
        workload: None,
        failed: Some(message),
    });
    written
}

/// Removes the cgroup and writes `exit.json`.
fn finish(dir: &Path, cgroup: Option<&InstanceCgroup>, mut exit: Exit) -> Result<(), String> {
    if let Some(cg) = cgroup {
        cg.delete();
    }
    exit.at_ms = state::now_ms();
    state::write_json(&dir.join(state::EXIT), &exit)
        .map_err(|e| format!("writing {}: {e}", state::EXIT))
}

/// Writes the report on stdout, then points stdout at /dev/null so the
/// daemon's read ends.
fn report(report: &Report) {
    let mut line = serde_json::to_vec(report).unwrap_or_default();
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&line);
    let _ = out.flush();
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: dup2 onto fd 1, which this process owns.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn wait(pid: Pid) -> nix::Result<WaitStatus> {
    loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// The workload's stdin (`/dev/null`), stdout and stderr (write ends of
/// pipes), and the shim's read ends of those pipes, non-blocking.
fn open_stdio() -> Result<([OwnedFd; 3], Outputs), String> {
    let null = File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    let pipe = || -> Result<(OwnedFd, OwnedFd), String> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        // Only the shim's end: the workload's stays blocking.
        fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(|e| format!("fcntl O_NONBLOCK: {e}"))?;
        Ok((read, write))
    };
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    Ok((
        [null, out_write, err_write],
        [Some(out_read), Some(err_read)],
    ))
}
