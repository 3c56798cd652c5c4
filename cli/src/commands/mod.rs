//! One file per command family; [`run`] dispatches.

mod account;
mod daemons;
mod manifest;
mod nouns;
mod tokens;

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

pub async fn run(cli: Cli, out: &Output) -> Result {
    let target = &cli.target;
    match cli.command {
        Command::Dev(args) => daemons::dev(args, out).await,
        Command::Control(args) => daemons::control(args, out).await,
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
    }
}
