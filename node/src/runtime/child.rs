//! The workload's process between `fork` and `execve`: it waits until the
//! shim has put it in its cgroup, sets up its namespaces, root filesystem
//! and user, and executes the command. Any failure is written to the error
//! pipe (close-on-exec, so a successful `execve` closes it empty) and the
//! process exits with 127.
//!
//! This runs in a child of the single-threaded shim, so allocating is safe.
//! The pieces after the namespaces are set up (environment, user, working
//! dir, program lookup, capabilities, `execve`) are shared with exec
//! sessions (`crate::exec`), whose commands run like the workload.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{Gid, Uid, chdir, execve, setgid, setgroups, sethostname, setuid};

use verge_api::wire::Isolation;

use super::attach::{SecretFile, VolumeMount};
use super::{LaunchSpec, layers, rootfs, state, user};

/// `PATH` when the spec's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities an isolated workload keeps: Docker's default set less
/// `CAP_MKNOD` (no devices cgroup is configured, so it would reach host
/// devices). Numbers from `linux/capability.h`.
const KEPT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// What the child needs, prepared by the shim before `fork`.
pub struct Child<'a> {
    pub spec: &'a LaunchSpec,
    pub dir: &'a Path,
    pub isolation: Isolation,
    /// Mounted into the rootfs (isolation `namespaces` only).
    pub volumes: &'a [VolumeMount],
    /// Delivered on a tmpfs (isolation `namespaces` only).
    pub secrets: &'a [SecretFile],
    /// stdin, stdout, stderr of the workload.
    pub stdio: [OwnedFd; 3],
    /// One byte arrives here once the shim placed this process in its cgroup.
    pub go: OwnedFd,
    /// Where a setup failure is written.
    pub errors: OwnedFd,
}

/// Runs in the forked child; never returns.
pub fn run(child: Child<'_>) -> ! {
    let message = match setup_and_exec(&child) {
        Ok(never) => match never {},
        Err(message) => message,
    };
    let _ = nix::unistd::write(&child.errors, message.as_bytes());
    // SAFETY: _exit ends this forked child at once, without running the
    // shim's atexit handlers or flushing its stdio buffers a second time.
    unsafe { libc::_exit(127) }
}

fn setup_and_exec(c: &Child<'_>) -> Result<std::convert::Infallible, String> {
    reset_signals();
    // If the shim dies, so does the instance: nobody would record its exit.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl: {e}"))?;
    let mut byte = [0u8; 1];
    match nix::unistd::read(&c.go, &mut byte) {
        Ok(1) => {}
        // The shim is gone or gave up: nothing to report to.
        _ => {
            // SAFETY: as in `run`.
            unsafe { libc::_exit(1) }
        }
    }
    umask(Mode::from_bits_truncate(0o022));
    for (fd, target) in c.stdio.iter().zip(0..) {
        // SAFETY: dup2 onto 0, 1, 2 of this process; `fd` is open.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(format!("redirecting stdio: {}", Errno::last()));
        }
    }

    let spec = c.spec;
    let env = environment(&spec.env);
    let path_var = path_of(&env);
    let argv0 = spec.argv.first().ok_or("the command is empty")?;

    let prepared = match c.isolation {
        Isolation::Namespaces => {
            if let Some(netns) = &spec.netns {
                let file = fs::File::open(netns)
                    .map_err(|e| format!("opening network namespace {}: {e}", netns.display()))?;
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("joining network namespace {}: {e}", netns.display()))?;
            }
            // Already in its cgroup: a new cgroup namespace makes it its root.
            let flags = CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWCGROUP;
            unshare(flags).map_err(|e| format!("unshare: {e}"))?;
            let user = rootfs::enter(c.dir, spec, c.volumes, c.secrets)?;
            sethostname(&spec.hostname)
                .map_err(|e| format!("sethostname {:?}: {e}", spec.hostname))?;
            prepare_in_root_as(spec, user, argv0, &path_var)?
        }
        Isolation::None if !c.volumes.is_empty() || !c.secrets.is_empty() => {
            return Err(super::NEEDS_NAMESPACES.into());
        }
        Isolation::None => prepare_on_host(spec, c.dir, argv0, &path_var)?,
    };
    Err(exec_as(&prepared, &spec.argv, env, c.isolation))
}

/// The environment of a process of the instance: the spec's, with
/// [`DEFAULT_PATH`] when it has no `PATH`.
pub(crate) fn environment(spec_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = spec_env.to_vec();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env
}

/// `PATH` of `env` (empty when unset).
pub(crate) fn path_of(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// What a process of the instance runs, and as whom, once prepared.
pub(crate) struct Prepared {
    /// The program's path, in the current root.
    pub program: PathBuf,
    /// `None`: stay the current user (isolation `none` without root).
    pub user: Option<user::User>,
}

/// Isolation `namespaces`, in the instance's root (the current one): the
/// image user from the image's `/etc/passwd` and `/etc/group`, the working
/// dir (created when missing) entered, `argv0` looked up in `path_var`,
/// and the capability bounding set reduced.
pub(crate) fn prepare_in_root(
    spec: &LaunchSpec,
    argv0: &str,
    path_var: &str,
) -> Result<Prepared, String> {
    let user = user::resolve(
        spec.user.as_deref(),
        fs::read_to_string("/etc/passwd").ok().as_deref(),
        fs::read_to_string("/etc/group").ok().as_deref(),
    )?;
    prepare_in_root_as(spec, user, argv0, path_var)
}

/// [`prepare_in_root`] with the user already resolved (the workload's, by
/// [`rootfs::enter`]).
fn prepare_in_root_as(
    spec: &LaunchSpec,
    user: user::User,
    argv0: &str,
    path_var: &str,
) -> Result<Prepared, String> {
    let cwd = spec
        .working_dir
        .as_deref()
        .filter(|d| !d.is_empty())
        .unwrap_or("/");
    fs::create_dir_all(cwd).map_err(|e| format!("creating working dir {cwd}: {e}"))?;
    chdir(cwd).map_err(|e| format!("chdir {cwd}: {e}"))?;
    let program = find_in_root(argv0, path_var)?;
    drop_capabilities()?;
    Ok(Prepared {
        program,
        user: Some(user),
    })
}

/// Isolation `none`, on the host: the image user (only as root), the
/// working dir `<dir>/cwd`, `argv0` looked up in the image layers.
pub(crate) fn prepare_on_host(
    spec: &LaunchSpec,
    dir: &Path,
    argv0: &str,
    path_var: &str,
) -> Result<Prepared, String> {
    let read = |p: &str| layers::lookup(&spec.layers, p).and_then(|p| fs::read_to_string(p).ok());
    let user = match spec.user.as_deref() {
        // Without root the user cannot be switched: run as the daemon's.
        Some(u) if !nix::unistd::geteuid().is_root() => {
            eprintln!(
                "verge: isolation none without root: running as uid {} instead of the image user {u:?}",
                nix::unistd::geteuid()
            );
            None
        }
        Some(u) => Some(user::resolve(
            Some(u),
            read("/etc/passwd").as_deref(),
            read("/etc/group").as_deref(),
        )?),
        None => None,
    };
    let cwd = dir.join(state::CWD);
    fs::create_dir_all(&cwd).map_err(|e| format!("creating {}: {e}", cwd.display()))?;
    chdir(&cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
    let program = layers::find_command(&spec.layers, argv0, path_var)
        .ok_or_else(|| not_found(argv0, path_var))?;
    Ok(Prepared { program, user })
}

/// Becomes the prepared user (with `HOME` from its passwd entry unless
/// `env` has one), marks every other fd close-on-exec and executes
/// `argv` with `env`. Returns only on failure, with the message for
/// people. The parent-death signal (SIGKILL), which a change of user
/// clears, is set again just before.
pub(crate) fn exec_as(
    prepared: &Prepared,
    argv: &[String],
    mut env: Vec<(String, String)>,
    isolation: Isolation,
) -> String {
    match become_and_exec(prepared, argv, &mut env, isolation) {
        Ok(never) => match never {},
        Err(message) => message,
    }
}

fn become_and_exec(
    prepared: &Prepared,
    argv: &[String],
    env: &mut Vec<(String, String)>,
    isolation: Isolation,
) -> Result<std::convert::Infallible, String> {
    let Prepared { program, user } = prepared;
    let argv0 = argv.first().ok_or("the command is empty")?;
    if let Some(user) = user {
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), user.home.clone()));
        }
        let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).map_err(|e| format!("setgroups {:?}: {e}", user.groups))?;
        setgid(Gid::from_raw(user.gid)).map_err(|e| format!("setgid {}: {e}", user.gid))?;
        setuid(Uid::from_raw(user.uid)).map_err(|e| format!("setuid {}: {e}", user.uid))?;
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("prctl: {e}"))?;
    }
    close_other_fds();

    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} has a NUL byte"));
    let argv = argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let path = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| "NUL in the program path".to_string())?;
    let errno = match execve(&path, &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let shown = if isolation == Isolation::None {
        format!("{} ({})", argv0, program.display())
    } else {
        program.display().to_string()
    };
    Err(exec_error(
        &shown,
        program,
        errno,
        user.as_ref().map_or(0, |u| u.uid),
    ))
}

/// Default dispositions and an empty mask: the shim (and Rust's runtime)
/// ignore SIGPIPE, and ignored signals survive `execve`.
pub(crate) fn reset_signals() {
    for signal in Signal::iterator() {
        if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code; this process is
        // single-threaded.
        let _ = unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Looks `argv0` up like `execvp`, in the (new) root.
fn find_in_root(argv0: &str, path_var: &str) -> Result<PathBuf, String> {
    if argv0.contains('/') {
        return Ok(PathBuf::from(argv0));
    }
    path_var
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(argv0))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
        .ok_or_else(|| not_found(argv0, path_var))
}

fn not_found(argv0: &str, path_var: &str) -> String {
    if argv0.contains('/') {
        format!("exec {argv0}: no such file in the image")
    } else {
        format!("exec {argv0}: not found in the image's PATH ({path_var})")
    }
}

fn exec_error(shown: &str, program: &Path, errno: Errno, uid: u32) -> String {
    match errno {
        Errno::ENOENT if program.exists() => format!(
            "exec {shown}: its interpreter (dynamic loader or #! program) is missing from the image"
        ),
        Errno::ENOENT | Errno::ENOTDIR => format!("exec {shown}: no such file in the image"),
        Errno::EACCES => {
            format!("exec {shown}: permission denied (not executable, or not by uid {uid})")
        }
        Errno::ENOEXEC => format!("exec {shown}: not an executable format this machine runs"),
        e => format!("exec {shown}: {e}"),
    }
}

/// Drops every capability outside [`KEPT_CAPS`] from the bounding set, so
/// a root workload gets only those at `execve`, and clears ambient ones.
fn drop_capabilities() -> Result<(), String> {
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in (0..=last).filter(|c| !KEPT_CAPS.contains(c)) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 && Errno::last() != Errno::EINVAL {
            return Err(format!("dropping capability {cap}: {}", Errno::last()));
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Marks every fd above 2 close-on-exec, so nothing of the shim or the
/// daemon leaks into the workload. The error pipe is among them: it must
/// stay open until `execve` and close by it.
fn close_other_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        // Older kernels: mark them one by one.
        if let Ok(entries) = fs::read_dir("/proc/self/fd") {
            let fds: Vec<RawFd> = entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect();
            for fd in fds {
                // SAFETY: fcntl(F_SETFD) on an fd number; harmless if it is closed.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
    }
}
