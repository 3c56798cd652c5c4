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

use crate::args::Cli;
use crate::output::Output;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
