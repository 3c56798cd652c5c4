//! One file per command family; [`run`] dispatches.

mod account;
mod config;
mod daemons;
mod deploy;
mod endpoints;
mod exec;
mod follow;
mod logs;
mod manifest;
mod nodes;
mod nouns;
mod observe;
mod progress;
mod releases;
mod rollouts;
mod tokens;
mod volumes;
mod wait;

use verge_api::client::ClientError;
use verge_api::{ErrorDetail, ErrorKind};

use crate::args::{Cli, Command};
use crate::context::Context;
use crate::output::Output;

/// A failed command: what went wrong and what to do next.
#[derive(Debug)]
pub struct Failure(pub ErrorDetail);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure(e.detail())
    }
}

impl From<crate::profile::ProfileError> for Failure {
    fn from(e: crate::profile::ProfileError) -> Self {
        Failure(e.detail())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(ErrorDetail::new(ErrorKind::Internal, format!("{e:#}")))
    }
}

pub type Result<T = ()> = std::result::Result<T, Failure>;

/// A `bad_request` failure: input that the CLI refuses before sending.
pub fn bad_request(message: impl Into<String>) -> Failure {
    Failure(ErrorDetail::new(ErrorKind::BadRequest, message))
}

/// `ref@sha256:0123456789ab…`: a digest cut to 12 hex digits, for tables.
pub fn short_digest(text: &str) -> String {
    match text.rsplit_once(':') {
        Some((head, hex))
            if head.ends_with("sha256")
                && hex.len() > 12
                && hex.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            format!("{head}:{}…", &hex[..12])
        }
        _ => text.to_string(),
    }
}

/// `text`, or `-` for nothing.
pub fn or_dash(text: Option<&str>) -> String {
    text.unwrap_or("-").to_string()
}

pub async fn run(cli: Cli, out: &Output) -> Result {
    let target = &cli.target;
    match cli.command {
        Command::Dev(args) => daemons::dev(args, out).await,
        Command::Control(args) => daemons::control(args, out).await,
        Command::Node(args) => daemons::node(args, out).await,
        Command::Ingress(args) => daemons::ingress(target, args, out).await,
        Command::Endpoints => endpoints::list(&Context::new(target)?, out).await,
        Command::Nodes(cmd) => nodes::run(&Context::new(target)?, cmd, out).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "verge", &mut std::io::stdout());
            Ok(())
        }
        Command::Init { force } => manifest::init(force, out),
        Command::Login(args) => account::login(target, args, out).await,
        Command::Profiles(cmd) => account::profiles(target, cmd, out),
        Command::Whoami => account::whoami(&Context::new(target)?, out).await,
        Command::Orgs(cmd) => nouns::orgs(&Context::new(target)?, cmd, out).await,
        Command::Projects(cmd) => nouns::projects(&Context::new(target)?, cmd, out).await,
        Command::Apps(cmd) => nouns::apps(&Context::new(target)?, cmd, out).await,
        Command::Envs(cmd) => nouns::envs(&Context::new(target)?, cmd, out).await,
        Command::Tokens(cmd) => tokens::run(&Context::new(target)?, cmd, out).await,
        Command::Env(cmd) => config::env(&Context::new(target)?, cmd, out).await,
        Command::Secrets(cmd) => config::secrets(&Context::new(target)?, cmd, out).await,
        Command::Deploy(args) => deploy::deploy(&Context::new(target)?, args, out).await,
        Command::Releases => releases::list(&Context::new(target)?, out).await,
        Command::Rollback(args) => deploy::rollback(&Context::new(target)?, args, out).await,
        Command::Scale(args) => deploy::scale(&Context::new(target)?, args, out).await,
        Command::Rollout(cmd) => rollouts::run(&Context::new(target)?, cmd, out).await,
        Command::Status => observe::status(&Context::new(target)?, out).await,
        Command::Describe(cmd) => releases::describe(&Context::new(target)?, cmd, out).await,
        Command::Events(args) => observe::events(&Context::new(target)?, args, out).await,
        Command::Wait(args) => wait::wait(&Context::new(target)?, args, out).await,
        Command::Logs(args) => logs::logs(&Context::new(target)?, args, out).await,
        Command::Exec(args) => exec::exec(&Context::new(target)?, args, out).await,
        Command::Volumes(cmd) => volumes::run(&Context::new(target)?, cmd, out).await,
    }
}

/// `next:` and one indented line per follow-up; empty without any.
pub fn next_lines(follow_ups: &[String]) -> String {
    if follow_ups.is_empty() {
        return String::new();
    }
    let mut text = String::from("\nnext:");
    for f in follow_ups {
        text.push_str("\n  ");
        text.push_str(f);
    }
    text
}
