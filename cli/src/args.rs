//! The command line, as clap parses it. `docs/cli.md` documents every command.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "verge",
    version,
    about = "Verge: run applications on machines at the edge"
)]
pub struct Cli {
    #[command(flatten)]
    pub target: Target,
    /// Output format: human tables, or one JSON document (NDJSON for streams).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

/// Where a client command goes, and as whom. Each falls back to the
/// environment, then the selected profile (`verge login`), then `verge.toml`.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Control-plane URL
    #[arg(long, global = true, env = "VERGE_SERVER")]
    pub server: Option<String>,
    /// API token
    #[arg(long, global = true, env = "VERGE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the control plane's certificate
    #[arg(long, global = true, env = "VERGE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Profile to use instead of the current one
    #[arg(long, global = true, env = "VERGE_PROFILE")]
    pub profile: Option<String>,
    /// Org [default: the profile's, else the token's own; `tokens` commands use only this flag]
    #[arg(long, global = true, env = "VERGE_ORG")]
    pub org: Option<String>,
    /// Project [default for creating apps: the profile's; `apps list` filters only by this flag]
    #[arg(long, global = true, env = "VERGE_PROJECT")]
    pub project: Option<String>,
    /// App (default: `app` in ./verge.toml)
    #[arg(long, global = true, env = "VERGE_APP")]
    pub app: Option<String>,
    /// Env of the app
    #[arg(long, global = true, env = "VERGE_ENV")]
    pub env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local single-machine cluster (control plane on SQLite) until Ctrl-C
    Dev(DevArgs),
    /// Run a control-plane replica
    Control(ControlArgs),
    /// Write a commented example verge.toml in the current directory
    Init {
        /// Replace an existing verge.toml
        #[arg(long)]
        force: bool,
    },
    /// Check a token against a server and save both as a profile
    Login(LoginArgs),
    /// Show which token and org the current settings use
    Whoami,
    /// Saved CLI profiles
    #[command(subcommand)]
    Profiles(ProfilesCmd),
    /// Orgs: isolation boundaries (creating one needs an admin token)
    #[command(subcommand)]
    Orgs(NounCmd),
    /// Projects of an org
    #[command(subcommand)]
    Projects(NounCmd),
    /// Apps of an org, each in a project
    #[command(subcommand)]
    Apps(NounCmd),
    /// Envs of an app (prod, staging, ...)
    #[command(subcommand)]
    Envs(NounCmd),
    /// Org-scoped API tokens (admin)
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// State directory, kept across restarts [default: ~/.local/share/verge/dev]
    #[arg(long, env = "VERGE_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API address (loopback)
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// TOML config file; flags and environment override its fields
    #[arg(long, env = "VERGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// API address [default: 127.0.0.1:7070]
    #[arg(long, env = "VERGE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// State directory [default: /var/lib/verge]
    #[arg(long, env = "VERGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB [default: SQLite in the data dir]
    #[arg(long, env = "VERGE_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// PEM certificate chain: serve HTTPS
    #[arg(long, env = "VERGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "VERGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest accepted request body in bytes [default: 1048576]
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Mint and print another cluster admin token (when the first one is lost)
    #[arg(long)]
    pub new_admin_token: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format on stderr (filter with RUST_LOG)
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "VERGE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Name of the profile to write
    #[arg(long = "name", default_value = "default")]
    pub profile_name: String,
}

#[derive(Debug, Subcommand)]
pub enum ProfilesCmd {
    /// List saved profiles, the current one marked
    List,
    /// Make a profile current
    Use { name: String },
}

#[derive(Debug, Subcommand)]
pub enum NounCmd {
    /// Create one
    Create { name: String },
    /// List them
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a token scoped to --org; it is printed once
    Create {
        /// A name to recognise it by
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (of --org, when given)
    List,
    /// Revoke a token by ID; it stops working on its next request
    Revoke { id: String },
}
