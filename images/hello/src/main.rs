//! `hello`: Verge's example workload, a tiny TCP greeter and echo server.
//!
//! It is built statically (see `verge-images`) so that it runs alone in an
//! otherwise empty root filesystem. Usage:
//!
//! ```text
//! hello [--port N] [--listen ADDR]
//! ```
//!
//! `--port` defaults to `$PORT`, else 8080. `--listen` defaults to `[::]`
//! (dual-stack), falling back to `0.0.0.0` when IPv6 is unavailable.
//!
//! On each connection (one thread per connection) it writes one greeting line,
//!
//! ```text
//! hello from instance <VERGE_INSTANCE_ID or "unknown">; env: K1=V1 K2=V2
//! ```
//!
//! listing its environment sorted by name (minus shell noise such as `PATH`),
//! then echoes back every byte it receives until the peer closes.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

/// Environment variables left out of the greeting: set by shells and init
/// systems, not by whoever configured the workload.
const HIDDEN_ENV: &[&str] = &["PATH", "HOME", "HOSTNAME", "TERM", "PWD", "SHLVL", "_"];

const USAGE: &str = "usage: hello [--port N] [--listen ADDR]";

fn main() -> ExitCode {
    let (listen, port) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("hello: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match bind(listen, port) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hello: cannot listen on port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("hello listening on {addr}"),
        Err(_) => println!("hello listening on port {port}"),
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    let peer = match stream.peer_addr() {
                        Ok(addr) => addr.to_string(),
                        Err(_) => "unknown peer".into(),
                    };
                    if let Err(e) = serve(stream) {
                        eprintln!("hello: connection from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("hello: accept failed: {e}");
                // Back off so that e.g. running out of file descriptors does
                // not turn into a busy loop.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}

/// Parses `--port N` / `--listen ADDR` (also `--flag=value`).
fn parse_args(args: impl Iterator<Item = String>) -> Result<(Option<IpAddr>, u16), String> {
    let mut listen = None;
    let mut port = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--port" => port = Some(parse_port(&value()?)?),
            "--listen" => {
                let v = value()?;
                let ip = v.trim_start_matches('[').trim_end_matches(']');
                listen = Some(
                    ip.parse()
                        .map_err(|_| format!("--listen: {v:?} is not an IP address"))?,
                );
            }
            "-h" | "--help" => return Err("help requested".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let port = match port {
        Some(port) => port,
        None => match std::env::var("PORT") {
            Ok(p) => parse_port(&p).map_err(|e| format!("$PORT: {e}"))?,
            Err(_) => 8080,
        },
    };
    Ok((listen, port))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("{s:?} is not a port number"))
}

/// Binds the requested address, or `[::]` falling back to `0.0.0.0`.
fn bind(listen: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    match listen {
        Some(ip) => TcpListener::bind(SocketAddr::new(ip, port)),
        None => TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            .or_else(|_| TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))),
    }
}

/// The greeting line, newline included.
fn greeting() -> String {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .filter(|(k, _)| !HIDDEN_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    let instance = std::env::var("VERGE_INSTANCE_ID").unwrap_or_else(|_| "unknown".into());
    let env: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("hello from instance {instance}; env: {}\n", env.join(" "))
}

/// Greets the peer, then echoes until it closes its side.
fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(greeting().as_bytes())?;
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    match stream.shutdown(Shutdown::Write) {
        // The peer may already have closed both directions: nothing to report.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}
