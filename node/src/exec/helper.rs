//! The exec helper: a fresh, single-threaded execution of the node's binary
//! (`<exe> __verge-exec <instance dir> <options> <command>...`), started
//! by the daemon for each exec session and its child for the session's
//! length. Its stdio is the command's (pipes, or the terminal's slave);
//! fd 3 is a Unix socket to the daemon carrying JSON lines: [`Report`]s
//! from the helper, [`Request`]s to it.
//!
//! 1. It reads `spec.json`, `launch.json` and `pid` of the instance, opens
//!    the workload's namespaces (isolation `namespaces`) and joins its PID
//!    namespace (which only its children enter).
//! 2. It forks the command's process, puts it in the instance's cgroup and
//!    lets it go: it joins the IPC, UTS, network, cgroup and mount
//!    namespaces, starts a session (with the terminal as its controlling
//!    one), and executes the command as the workload would be
//!    ([`crate::runtime::child`]: user, environment, working dir,
//!    capabilities). A failure comes back on a close-on-exec error pipe:
//!    `Failed`; an empty pipe at `execve` means `Started`.
//! 3. It forwards SIGTERM, SIGHUP and SIGINT, and `Signal` requests, to the
//!    command's process group, and reports `Exited` when the command exits
//!    (without reaping it yet, so that its PID, the session's ID, cannot be
//!    reused).
//! 4. When the daemon's requests end (it finished the session, or died:
//!    its socket's end, or the helper's parent-death signal and a parent
//!    that is not the daemon any more), it kills every process of the
//!    command's session, reaps the command, reports `Swept` and exits with
//!    the command's code.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigHandler, SigSet, Signal, signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, getppid, pipe2, setsid};
use serde::{Deserialize, Serialize};
use verge_api::exec::EXIT_LOST;
use verge_api::wire::Isolation;

use super::procs;
use crate::runtime::LaunchSpec;
use crate::runtime::cgroup::InstanceCgroup;
use crate::runtime::child;
use crate::runtime::state::{self, Launch, ProcId};

/// The first argument that makes the node binary an exec helper: `main`
/// must call [`exec_main`] with the arguments after it, before starting
/// any thread.
pub const EXEC_ARG: &str = "__verge-exec";
/// The helper's parent-death signal (not forwarded to the command).
const PARENT_GONE: Signal = Signal::SIGUSR2;
/// The helper's end of its socket to the daemon.
pub(crate) const CONTROL_FD: RawFd = 3;

/// How the command runs (the helper's second argument, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Options {
    /// The command's stdio is a terminal.
    pub tty: bool,
    /// `TERM` with `tty`; default `xterm`.
    pub term: Option<String>,
    /// The daemon's PID: the helper ends the session when its parent is
    /// another.
    pub daemon: i32,
}

/// The helper's lines to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub(crate) enum Report {
    /// The command executed; `pid` is its host PID (and session ID).
    Started { pid: i32 },
    /// The command did not start (said for people).
    Failed { message: String },
    /// The command exited: its code, or 128 + the signal that killed it.
    Exited { code: i32 },
    /// The session's processes were killed (`all`: none is left).
    Swept { all: bool },
}

/// The daemon's lines to the helper. The end of them ends the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Deliver this signal to the command's process group.
    Signal { signal: i32 },
}

/// The helper's entry point: the node binary calls it when its first
/// argument is [`EXEC_ARG`], with the arguments after it, before starting
/// any thread (no tokio runtime).
pub fn exec_main(args: &[OsString]) -> ! {
    // A report written after the daemon died must not kill the helper.
    // SAFETY: setting SIG_IGN runs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
    // SAFETY: fcntl(F_GETFD) on an fd number only reads its flags.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } < 0 {
        eprintln!(
            "verge: {EXEC_ARG} is run by the node daemon for `verge exec`, with its socket on fd {CONTROL_FD}"
        );
        std::process::exit(2);
    }
    // SAFETY: fd 3 is open (checked above) and nothing else in this fresh
    // process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let mut ctl = Control {
        fd,
        buf: Vec::new(),
    };
    let code = match start(args, &ctl) {
        Ok(started) => supervise(started, &mut ctl),
        Err(message) => {
            ctl.send(&Report::Failed { message });
            127
        }
    };
    std::process::exit(code)
}

/// The socket to the daemon (blocking).
struct Control {
    fd: OwnedFd,
    /// A partial request line.
    buf: Vec<u8>,
}

impl Control {
    fn send(&self, report: &Report) {
        let mut line = serde_json::to_vec(report).unwrap_or_default();
        line.push(b'\n');
        let mut at = 0;
        while at < line.len() {
            match nix::unistd::write(&self.fd, &line[at..]) {
                Ok(n) => at += n,
                Err(Errno::EINTR) => {}
                // The daemon is gone: nobody to tell.
                Err(_) => return,
            }
        }
    }

    /// The requests that arrived; `None` at the end of them.
    fn read(&mut self) -> Option<Vec<Request>> {
        let mut chunk = [0u8; 4096];
        let n = match nix::unistd::read(&self.fd, &mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => return Some(Vec::new()),
            Err(_) => return None,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        let mut requests = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            // An unknown request is skipped: a newer daemon may say more.
            if let Ok(r) = serde_json::from_slice(&line) {
                requests.push(r);
            }
        }
        Some(requests)
    }
}

/// A started command.
struct Started {
    leader: Pid,
    daemon: i32,
    signals: SignalFd,
}

/// What the command's process needs, prepared before `fork`.
struct CommandChild<'a> {
    spec: &'a LaunchSpec,
    dir: &'a Path,
    isolation: Isolation,
    command: &'a [String],
    options: &'a Options,
    /// Namespaces to join, by name, after the cgroup (the PID namespace
    /// is the helper's already).
    namespaces: &'a [(&'static str, CloneFlags, File)],
    go: OwnedFd,
    errors: OwnedFd,
}

fn start(args: &[OsString], ctl: &Control) -> Result<Started, String> {
    let [dir, options, command @ ..] = args else {
        return Err(format!(
            "usage: {EXEC_ARG} <instance dir> <options> <command>..."
        ));
    };
    let options: Options = options
        .to_str()
        .and_then(|o| serde_json::from_str(o).ok())
        .ok_or("the exec helper's options do not parse")?;
    let command: Vec<String> = command
        .iter()
        .map(|a| a.to_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or("the command is not UTF-8")?;
    if command.first().is_none_or(String::is_empty) {
        return Err("the command is empty".into());
    }
    // Sent when the thread that started the helper ends: the daemon may
    // be gone (then its PID is not the parent's any more).
    nix::sys::prctl::set_pdeathsig(PARENT_GONE).map_err(|e| format!("prctl: {e}"))?;
    if getppid().as_raw() != options.daemon {
        return Err("the node daemon is gone".into());
    }

    let dir = Path::new(dir);
    let spec: LaunchSpec = state::read_json(&dir.join(state::SPEC))
        .map_err(|e| format!("reading the instance's spec: {e}"))?;
    let launch: Launch = state::read_json(&dir.join(state::LAUNCH))
        .map_err(|e| format!("reading the instance's launch: {e}"))?;
    let not_running = || format!("instance {} is not running", spec.instance_id);
    let workload = ProcId::read(&dir.join(state::PID)).map_err(|_| not_running())?;
    if !workload.alive() {
        return Err(not_running());
    }
    let mut namespaces = Vec::new();
    if launch.isolation == Isolation::Namespaces {
        let open = |name: &str| {
            File::open(format!("/proc/{}/ns/{name}", workload.pid)).map_err(|e| {
                if workload.alive() {
                    format!("opening the instance's {name} namespace: {e}")
                } else {
                    not_running()
                }
            })
        };
        let pid_ns = open("pid")?;
        for (name, flag) in [
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("cgroup", CloneFlags::CLONE_NEWCGROUP),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            namespaces.push((name, flag, open(name)?));
        }
        // Opened before checking: they are the workload's, not a PID reuser's.
        if !workload.alive() {
            return Err(not_running());
        }
        setns(&pid_ns, CloneFlags::CLONE_NEWPID)
            .map_err(|e| format!("joining the instance's pid namespace: {e}"))?;
    }
    let cgroup = launch.cgroup.as_deref().map(InstanceCgroup::load);

    // SIGCHLD and the forwarded signals arrive on a signalfd; the command's
    // process resets its mask.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        PARENT_GONE,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;
    let ((go_read, go_write), (err_read, err_write)) = pipe2(OFlag::O_CLOEXEC)
        .and_then(|go| pipe2(OFlag::O_CLOEXEC).map(|err| (go, err)))
        .map_err(|e| format!("pipe: {e}"))?;
    // Processes of the instance cannot read this one's memory or fds.
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;

    // SAFETY: the helper is a fresh exec and single-threaded: nothing can
    // hold a lock across the fork.
    let leader = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop((go_write, err_read, signals));
            command_child(CommandChild {
                spec: &spec,
                dir,
                isolation: launch.isolation,
                command: &command,
                options: &options,
                namespaces: &namespaces,
                go: go_read,
                errors: err_write,
            })
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(format!("fork: {e}")),
    };
    drop((go_read, err_write, namespaces));
    // The stdio is the command's: its end (EOF, or EIO on the terminal)
    // must not wait for the helper.
    stdio_to_null();

    if let Some(cg) = &cgroup
        && let Err(e) = cg.add(leader.as_raw())
    {
        // Dropping `go_write` unsent makes the child exit.
        drop(go_write);
        reap(leader);
        return Err(format!("joining the instance's cgroup: {e}"));
    }
    let _ = nix::unistd::write(&go_write, b"g");
    drop(go_write);
    let mut message = Vec::new();
    let _ = File::from(err_read).read_to_end(&mut message);
    if !message.is_empty() {
        reap(leader);
        return Err(String::from_utf8_lossy(&message).into_owned());
    }
    ctl.send(&Report::Started {
        pid: leader.as_raw(),
    });
    Ok(Started {
        leader,
        daemon: options.daemon,
        signals,
    })
}

/// Runs in the forked child; never returns.
fn command_child(c: CommandChild<'_>) -> ! {
    let message = match setup_and_exec(&c) {
        Ok(never) => match never {},
        Err(message) => message,
    };
    let _ = nix::unistd::write(&c.errors, message.as_bytes());
    // SAFETY: _exit ends this forked child at once, without running the
    // helper's atexit handlers or flushing its stdio buffers a second time.
    unsafe { libc::_exit(127) }
}

fn setup_and_exec(c: &CommandChild<'_>) -> Result<std::convert::Infallible, String> {
    child::reset_signals();
    // If the helper dies, so does the command.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl: {e}"))?;
    let mut byte = [0u8; 1];
    if !matches!(nix::unistd::read(&c.go, &mut byte), Ok(1)) {
        // The helper is gone or gave up: nothing to report to.
        // SAFETY: as in `command_child`.
        unsafe { libc::_exit(1) }
    }
    umask(Mode::from_bits_truncate(0o022));
    for (name, flag, file) in c.namespaces {
        setns(file, *flag).map_err(|e| format!("joining the instance's {name} namespace: {e}"))?;
    }
    setsid().map_err(|e| format!("setsid: {e}"))?;
    if c.options.tty {
        // SAFETY: ioctl(TIOCSCTTY) on fd 0 with an integer argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "making the terminal the controlling one: {}",
                Errno::last()
            ));
        }
    }
    let mut env = child::environment(&c.spec.env);
    if c.options.tty {
        env.retain(|(k, _)| k != "TERM");
        let term = c.options.term.as_deref().filter(|t| !t.is_empty());
        env.push(("TERM".into(), term.unwrap_or("xterm").into()));
    }
    let path_var = child::path_of(&env);
    let argv0 = &c.command[0];
    let prepared = match c.isolation {
        Isolation::Namespaces => child::prepare_in_root(c.spec, argv0, &path_var)?,
        Isolation::None => child::prepare_on_host(c.spec, c.dir, argv0, &path_var)?,
    };
    if c.options.tty
        && let Some(user) = &prepared.user
    {
        // The terminal is the user's, as on a login.
        nix::unistd::fchown(
            std::io::stdin().as_fd(),
            Some(Uid::from_raw(user.uid)),
            Some(Gid::from_raw(user.gid)),
        )
        .map_err(|e| format!("giving the terminal to uid {}: {e}", user.uid))?;
    }
    Err(child::exec_as(&prepared, c.command, env, c.isolation))
}

/// Until the daemon is done with the session (or gone); then the session
/// is killed and the command reaped. Returns the exit code.
fn supervise(s: Started, ctl: &mut Control) -> i32 {
    let leader = s.leader;
    let mut code: Option<i32> = None;
    loop {
        if getppid().as_raw() != s.daemon {
            break;
        }
        let mut fds = [
            PollFd::new(ctl.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(s.signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break,
        }
        let ready = |fd: &PollFd<'_>| {
            fd.revents().is_some_and(|r| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            })
        };
        let (ctl_ready, signals_ready) = (ready(&fds[0]), ready(&fds[1]));
        if signals_ready {
            while let Ok(Some(info)) = s.signals.read_signal() {
                let signo = info.ssi_signo as i32;
                if signo == libc::SIGCHLD {
                    if code.is_none()
                        && let Some(c) = exited(leader)
                    {
                        code = Some(c);
                        ctl.send(&Report::Exited { code: c });
                    }
                } else if signo != PARENT_GONE as i32 && code.is_none() {
                    // SAFETY: kill(2) on the command's process group; the
                    // command is unreaped, so its PID is still its own.
                    unsafe { libc::kill(-leader.as_raw(), signo) };
                }
            }
        }
        if ctl_ready {
            let Some(requests) = ctl.read() else { break };
            for Request::Signal { signal } in requests {
                if (1..=64).contains(&signal) {
                    // SAFETY: as above.
                    unsafe { libc::kill(-leader.as_raw(), signal) };
                }
            }
        }
    }
    let all = procs::kill_session(leader.as_raw(), true, &|| None);
    let status = reap(leader);
    ctl.send(&Report::Swept { all });
    code.unwrap_or(status)
}

/// The command's exit code if it exited, leaving it unreaped.
fn exited(leader: Pid) -> Option<i32> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(leader), flags) {
        Ok(WaitStatus::Exited(_, c)) => Some(c),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Reaps the command; its exit code.
fn reap(pid: Pid) -> i32 {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(_) => return EXIT_LOST,
        }
    }
}

fn stdio_to_null() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto this process's own stdio fds.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
        }
    }
}
