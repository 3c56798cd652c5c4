//! Finding and killing the processes of an exec session: every process
//! whose session ID is the command's (host) PID. The command is a session
//! leader (`setsid`), so everything it starts is in its session unless it
//! made a session of its own.

use std::fs;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::runtime::state;

/// How often the processes are looked for again (each round kills what it
/// finds; killed processes cannot fork, so rounds converge).
const ROUNDS: usize = 300;
const ROUND_PAUSE: Duration = Duration::from_millis(10);

/// State (field 3) and session ID (field 6) of `/proc/<pid>/stat`.
fn state_and_session(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // ppid, pgrp, then the session.
    let session = fields.nth(2)?.parse().ok()?;
    Some((state, session))
}

fn live_in_session(pid: i32, sid: i32) -> bool {
    state_and_session(pid).is_some_and(|(st, s)| s == sid && st != 'Z' && st != 'X')
}

/// Live (not zombie) processes of session `sid`: among `candidates` when
/// given (PIDs in this process's PID namespace), else all of `/proc`.
pub(crate) fn members(sid: i32, candidates: Option<&[i32]>) -> Vec<i32> {
    let all: Vec<i32>;
    let pids = match candidates {
        Some(c) => c,
        None => {
            all = fs::read_dir("/proc")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            &all
        }
    };
    pids.iter()
        .copied()
        .filter(|p| live_in_session(*p, sid))
        .collect()
}

/// SIGKILLs every process of session `sid` until none is left; `true`
/// when none is. With `group`, the process group `sid` (the command's own,
/// most of a session) is killed first: only while the leader's PID cannot
/// have been reused (it is unreaped, or members are known to be alive).
/// `candidates` lists the PIDs to look among again at each round (the
/// instance's cgroup); without it, all of `/proc`.
pub(crate) fn kill_session(
    sid: i32,
    group: bool,
    candidates: &dyn Fn() -> Option<Vec<i32>>,
) -> bool {
    if sid <= 1 {
        return true;
    }
    if group {
        // SAFETY: kill(2) on a process group; no memory involved.
        unsafe { libc::kill(-sid, libc::SIGKILL) };
    }
    for _ in 0..ROUNDS {
        let found = members(sid, candidates().as_deref());
        if found.is_empty() {
            return true;
        }
        for pid in found {
            // The pidfd pins the process; checking its session after
            // opening it makes sure a reused PID is not killed.
            if let Ok(fd) = state::pidfd_open(pid)
                && live_in_session(pid, sid)
            {
                let _ = state::pidfd_send_signal(fd.as_raw_fd(), libc::SIGKILL);
            }
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    members(sid, candidates().as_deref()).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_session_is_found() {
        let me = std::process::id() as i32;
        let sid = nix::unistd::getsid(None).unwrap().as_raw();
        assert!(members(sid, None).contains(&me));
        assert!(members(sid, Some(&[me])).contains(&me));
        assert!(members(sid + 1_000_000, Some(&[me])).is_empty());
    }
}
