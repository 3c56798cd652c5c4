//! `verge`: the one binary of Verge.
//!
//! Client commands (`orgs`, `apps`, `tokens`, ...) talk to a control plane
//! over its HTTP API through `verge_api::client`; daemon commands (`dev`,
//! `control`) run the libraries in this process. This crate only parses
//! arguments, resolves where to connect (flags, environment, profile,
//! `verge.toml`) and renders results: tables for people, `-o json` for
//! scripts. Logic that is not about the command line belongs in a library.

mod args;
mod commands;
mod context;
mod output;
mod profile;

use clap::Parser;
use clap::error::ErrorKind as ClapKind;

use crate::args::Cli;
use crate::output::Output;

fn main() -> std::process::ExitCode {
    // An instance's shim, or an exec session's helper: this binary
    // re-executed by the node daemon (`/proc/self/exe __verge-shim DIR`,
    // `/proc/self/exe __verge-exec DIR ...`); it must not start a runtime.
    let mut argv = std::env::args_os();
    match argv.nth(1) {
        Some(a) if a == verge_node::runtime::SHIM_ARG => {
            let dir = argv
                .next()
                .map(std::path::PathBuf::from)
                .unwrap_or_default();
            verge_node::runtime::shim_main(&dir);
        }
        Some(a) if a == verge_node::exec::EXEC_ARG => {
            let rest: Vec<std::ffi::OsString> = argv.collect();
            verge_node::exec::exec_main(&rest);
        }
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Client commands get the default action back, so that `verge ... |
    // head` ends quietly instead of panicking on EPIPE. Daemons keep it
    // ignored (Rust's default): a peer that closes a socket mid-write
    // (splice(2) in the ingress has no MSG_NOSIGNAL) must cost one
    // connection, not the process.
    if !cli.command.is_daemon() {
        // SAFETY: before any thread exists (the runtime starts below).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // One TLS implementation for every HTTPS and QUIC connection of the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let out = Output::new(cli.output);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli, &out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            out.error(&failure);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Usage errors: clap's own text, or the JSON error body under `-o json`.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    let wants_json = {
        let args: Vec<String> = std::env::args().collect();
        args.windows(2)
            .any(|w| matches!(w[0].as_str(), "-o" | "--output") && w[1] == "json")
            || args.iter().any(|a| a == "-ojson" || a == "--output=json")
    };
    let is_usage = !matches!(
        e.kind(),
        ClapKind::DisplayHelp
            | ClapKind::DisplayVersion
            | ClapKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !(wants_json && is_usage) {
        e.exit();
    }
    let text = e
        .kind()
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| e.to_string());
    let rendered = e.to_string();
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or(&text).trim_start_matches("error: ");
    // "the following required arguments were not provided:" and the
    // indented arguments under it make one line.
    let message = if first.ends_with(':') {
        let more: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        format!("{first} {}", more.join(", "))
    } else {
        first.to_string()
    };
    let detail = verge_api::ErrorDetail::new(verge_api::ErrorKind::BadRequest, message)
        .with_next("verge --help");
    Output::new(args::Format::Json).error(&commands::Failure(detail));
    std::process::ExitCode::from(2)
}
