//! `verge exec`: a command in a running instance, its exit code as ours.
//!
//! Which instance: `--instance`, or the only running one (of `--workload`).
//! With several and no `--instance`, a user at a terminal picks from a
//! list; without a terminal the control plane refuses and lists their IDs.
//!
//! Non-interactive, the command's stdout and stderr go to ours, and with
//! `-i` our stdin is streamed to it. With `-t`, our terminal is put in raw
//! mode (every key, Ctrl-C included, goes to the remote terminal), window
//! size changes are forwarded, and the terminal is restored however the
//! session ends.

use std::io::{IsTerminal as _, Write as _};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use verge_api::exec::codec::ExecCodec;
use verge_api::exec::{EXIT_LOST, ExecRequest, Frame, MAX_PAYLOAD, WinSize};

use super::{Failure, Result};
use crate::args::ExecArgs;
use crate::context::{Context, EnvNames};
use crate::output::Output;

pub async fn exec(ctx: &Context, args: ExecArgs, _out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let terminal = std::io::stdin().is_terminal();
    if args.tty && !terminal {
        return Err(super::bad_request(
            "-t needs a terminal, and stdin is not one: drop -t (and keep -i to stream stdin), or run verge exec from a terminal",
        ));
    }
    let instance = match args.instance {
        Some(id) => Some(id),
        None if terminal && std::io::stderr().is_terminal() => {
            pick(ctx, &names, args.workload.as_deref()).await?
        }
        // The control plane picks the only one, or refuses with the list.
        None => None,
    };
    let request = ExecRequest {
        command: args.command,
        instance,
        workload: args.workload,
        stdin: args.interactive,
        tty: args.tty,
        size: if args.tty { window_size() } else { None },
        term: args
            .tty
            .then(|| std::env::var("TERM").unwrap_or_else(|_| "xterm".into())),
    };
    let session = ctx.client.exec(names.scope(), &request).await?;
    let s = &session.started;
    if std::io::stderr().is_terminal() {
        eprintln!(
            "verge: exec in instance {} ({} on node {})",
            s.instance, s.workload, s.node
        );
    }
    // Raw only when keys go to the remote terminal (-it): with -t alone,
    // Ctrl-C stays a signal here and is passed on as one.
    let raw = if args.tty && args.interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if let Some(raw) = &raw {
        restore_on_signals(raw.saved.clone());
    }
    let code = run(session.io, args.interactive, raw.is_some()).await;
    drop(raw);
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// With several running instances, the user picks one; `None` leaves the
/// choice to the control plane (one or none running).
async fn pick(ctx: &Context, names: &EnvNames, workload: Option<&str>) -> Result<Option<String>> {
    let status = ctx.client.status(names.scope()).await?;
    let running: Vec<(String, String, String)> = status
        .workloads
        .iter()
        .filter(|w| workload.is_none_or(|name| w.name == name))
        .flat_map(|w| {
            w.instances
                .iter()
                .filter(|i| i.state.starts_with("running"))
                .filter_map(|i| {
                    Some((
                        i.id.clone()?,
                        w.name.clone(),
                        i.node.clone().unwrap_or_default(),
                    ))
                })
        })
        .collect();
    if running.len() < 2 {
        return Ok(None);
    }
    eprintln!("{} instances are running; which one?", running.len());
    for (n, (id, w, node)) in running.iter().enumerate() {
        eprintln!("  {}) {id}  {w} on {node}", n + 1);
    }
    let choice = tokio::task::spawn_blocking(move || -> std::result::Result<String, String> {
        loop {
            eprint!("instance [1-{}]: ", running.len());
            let mut line = String::new();
            match std::io::stdin().read_line(&mut line) {
                Ok(0) | Err(_) => return Err("no instance chosen".into()),
                Ok(_) => {}
            }
            let line = line.trim();
            if let Some((id, ..)) = running.iter().find(|(id, ..)| id == line) {
                return Ok(id.clone());
            }
            match line.parse::<usize>() {
                Ok(n) if (1..=running.len()).contains(&n) => return Ok(running[n - 1].0.clone()),
                _ => eprintln!("type a number from the list, or an instance ID"),
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?
    .map_err(super::bad_request)?;
    Ok(Some(choice))
}

/// Pumps the session until it ends; the exit code to leave with. `raw`:
/// our terminal is raw, its keys (Ctrl-C too) go to the remote terminal.
async fn run<IO>(io: IO, interactive: bool, raw: bool) -> i32
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(io);
    let mut frames = FramedRead::new(reader, ExecCodec);
    let (tx, mut rx) = mpsc::channel::<Frame>(16);
    let mut sink = FramedWrite::new(writer, ExecCodec);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(frame).await.is_err() {
                return;
            }
        }
    });
    if interactive {
        tokio::spawn(stdin(tx.clone()));
    }
    tokio::spawn(resizes(tx.clone()));
    if !raw {
        tokio::spawn(interrupts(tx.clone()));
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = loop {
        match frames.next().await {
            Some(Ok(Frame::Stdout(b))) => {
                if stdout.write_all(&b).await.is_err() || stdout.flush().await.is_err() {
                    break EXIT_LOST;
                }
            }
            Some(Ok(Frame::Stderr(b))) => {
                let _ = stderr.write_all(&b).await;
                let _ = stderr.flush().await;
            }
            Some(Ok(Frame::Exit(code))) => break code,
            Some(Ok(Frame::Error(why))) => {
                restore_line();
                eprintln!("verge: exec failed: {why}");
                break EXIT_LOST;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                restore_line();
                eprintln!("verge: exec connection broke: {e}");
                break EXIT_LOST;
            }
            None => {
                restore_line();
                eprintln!("verge: the exec session ended without an exit code (connection lost)");
                break EXIT_LOST;
            }
        }
    };
    writer.abort();
    code
}

/// In raw mode a message needs its own carriage return.
fn restore_line() {
    eprint!("\r");
}

/// Our stdin, as `Stdin` frames, then `StdinEof`.
async fn stdin(tx: mpsc::Sender<Frame>) {
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        match input.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(Frame::StdinEof).await;
                return;
            }
            Ok(n) => {
                if tx.send(Frame::Stdin(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Window size changes of our terminal, as `Resize` frames.
async fn resizes(tx: mpsc::Sender<Frame>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some(size) = window_size()
            && tx.send(Frame::Resize(size)).await.is_err()
        {
            return;
        }
    }
}

/// Without a raw terminal, Ctrl-C (SIGINT) and SIGTERM are passed on to
/// the remote command, which decides how to end; a second one ends `verge`
/// (closing the session, which stops the command and its processes).
async fn interrupts(tx: mpsc::Sender<Frame>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut passed = false;
    loop {
        let sig = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        if passed {
            eprintln!("verge: {} again: ending the session", signal_name(sig));
            std::process::exit(128 + sig);
        }
        passed = true;
        if tx.send(Frame::Signal(sig)).await.is_err() {
            return;
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "interrupted",
        libc::SIGTERM => "terminated",
        libc::SIGHUP => "hung up",
        _ => "signalled",
    }
}

/// In raw mode, SIGTERM, SIGHUP and SIGQUIT (which keys no longer send)
/// end `verge` with the terminal restored.
fn restore_on_signals(saved: nix::sys::termios::Termios) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut hup), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::quit()),
        ) else {
            return;
        };
        let sig = tokio::select! {
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = quit.recv() => libc::SIGQUIT,
        };
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &saved,
        );
        eprintln!("\r\nverge: {}: ending the session", signal_name(sig));
        std::process::exit(128 + sig);
    });
}

/// The size of the terminal on stdout (or stdin).
fn window_size() -> Option<WinSize> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a `winsize` into the struct we pass.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_col > 0 {
            return Some(WinSize {
                cols: ws.ws_col,
                rows: ws.ws_row,
            });
        }
    }
    None
}

/// The terminal in raw mode until dropped (also on a panic's unwind).
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)
            .map_err(|e| Failure::from(anyhow::anyhow!("reading the terminal's mode: {e}")))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)
            .map_err(|e| Failure::from(anyhow::anyhow!("setting the terminal raw: {e}")))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}
