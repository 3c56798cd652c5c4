//! The command line, as clap parses it. `docs/cli.md` documents every command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Env of the app (needed by env, secrets, deploy, releases, status, ...)
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
    /// Run a node daemon: join the cluster (first start) and run the instances placed on it
    Node(NodeArgs),
    /// Run an ingress daemon: serve the cluster's endpoints (needs an admin --token)
    Ingress(IngressArgs),
    /// Nodes of the cluster (admin): join tokens, list, describe, drain, undrain
    #[command(subcommand)]
    Nodes(NodesCmd),
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
    /// Env vars of an env (versioned; a release pins the version it uses)
    #[command(subcommand)]
    Env(EnvCmd),
    /// Secret bundles of an env (versioned; values are never shown)
    #[command(subcommand)]
    Secrets(SecretsCmd),
    /// Validate verge.toml, create a release in the env and print the receipt
    Deploy(DeployArgs),
    /// Releases of the env, newest first, the current one marked with *
    Releases,
    /// Point the env at an earlier release (nothing is rebuilt)
    Rollback(RollbackArgs),
    /// Change the desired instance count or resources of workloads
    Scale(ScaleArgs),
    /// Rollouts of the env: list them, cancel the one in progress
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Desired vs running instances of the env (release, node, state and health, address) and its rollout
    Status,
    /// Everything the org exposes to the internet (--app/--env narrow it): endpoint, IPv6 address and ports, IPv4 if any, proxy protocol, target
    Endpoints,
    /// Show a release, an env, a workload or an endpoint in full
    #[command(subcommand)]
    Describe(DescribeCmd),
    /// Events of the env (with --all: everything the token sees, or one org's with --org); --follow streams them
    Events(EventsArgs),
    /// Block until the env converged on a release, or its rollout failed
    Wait(WaitArgs),
    /// Logs of the env's instances, app and system, merged in time order; --follow keeps streaming
    Logs(LogsArgs),
    /// Run a command in a running instance of the env; its exit code becomes verge's
    Exec(ExecArgs),
    /// Volumes of the env: persistent storage on one node, with snapshots
    #[command(subcommand)]
    Volumes(VolumesCmd),
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
    /// API address (loopback); the in-process node connects over UDP on the same address
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// How the dev node isolates instances [default: namespaces as root, none otherwise]
    #[arg(long, value_enum)]
    pub isolation: Option<IsolationArg>,
    /// Reach this registry (HOST:PORT) over plain HTTP although it is not on loopback (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Where the dev ingress serves Prometheus metrics (/metrics); port 0 picks a free one
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub ingress_metrics_listen: SocketAddr,
    /// The most `verge exec` sessions one instance has at once; more are refused
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub exec_max_sessions: u32,
    /// How volumes are stored: loop (ext4 on loop devices, sizes enforced), directory (plain directories, sizes NOT enforced), auto (loop when the host can)
    #[arg(long, value_enum, default_value_t = VolumeBackendArg::Auto)]
    pub volume_backend: VolumeBackendArg,
    /// The most wasm instances alive at once, long-running and per-connection together (the wasm engine's instance pool)
    #[arg(long, default_value_t = verge_node::daemon::DEFAULT_WASM_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(1..))]
    pub wasm_max_instances: u32,
    /// The largest memory one wasm instance may have (each pool slot reserves this much address space)
    #[arg(long, default_value = "4Gi", value_parser = parse_size)]
    pub wasm_max_memory: u64,
    #[command(flatten)]
    pub log_retention: LogRetentionArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct IngressArgs {
    /// This ingress's name in reports [default: the hostname]
    #[arg(long)]
    pub name: Option<String>,
    /// Node ID of the node on this machine: its instances get connections first
    #[arg(long, value_name = "NODE_ID")]
    pub node: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9070")]
    pub metrics_listen: SocketAddr,
    /// How long open connections may go on after SIGTERM
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: std::time::Duration,
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
    /// File holding the data key that seals secret bundles [default: secrets.key in the data dir, created on first start]
    #[arg(long, env = "VERGE_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// An older data key still accepted; values sealed with it are re-sealed with the current key on start (repeatable)
    #[arg(long = "secrets-previous-key-file", value_name = "FILE")]
    pub secrets_previous_key_files: Vec<PathBuf>,
    /// Reach this registry (HOST:PORT) over plain HTTP although it is not on loopback (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Registry credentials for pinning images, one per line: `HOST basic USER PASSWORD` or `HOST bearer TOKEN`
    #[arg(long, env = "VERGE_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// UDP address nodes connect to (QUIC) [default: the --listen address, over UDP]
    #[arg(long, env = "VERGE_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// HOST:PORT nodes should dial, shown by `verge nodes join-token` [default: the bound cluster address]
    #[arg(long, env = "VERGE_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,
    /// IPv6 prefix instance addresses come from; each node gets a /64 [default: fd76:6572:6765::/48]
    #[arg(long)]
    pub instance_prefix: Option<String>,
    /// IPv6 prefix endpoint addresses come from, one per endpoint; ::1/128 shares loopback [default: fd65:6e64:7074::/64]
    #[arg(long)]
    pub endpoint_prefix: Option<String>,
    /// IPv4 addresses of endpoints with ipv4 = true; a /32 is one shared address [default: 127.0.0.1/32]
    #[arg(long)]
    pub endpoint_ipv4_pool: Option<String>,
    /// Mark a node offline after this long without a heartbeat [default: 6s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub node_offline_after: Option<std::time::Duration>,
    /// Replace the instances of a node offline this long (after it was marked offline) on other nodes [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub reschedule_after: Option<std::time::Duration>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// HOST:PORT of the control plane's cluster endpoint (printed by `verge nodes join-token`); remembered after the join
    #[arg(long, env = "VERGE_NODE_SERVER")]
    pub server: Option<String>,
    /// Join token from `verge nodes join-token`; needed on the first start only
    #[arg(long, env = "VERGE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// State directory: identity, images, instances
    #[arg(
        long,
        env = "VERGE_NODE_DATA_DIR",
        default_value = "/var/lib/verge-node"
    )]
    pub data_dir: PathBuf,
    /// Node name [default: the hostname]
    #[arg(long)]
    pub name: Option<String>,
    /// A label KEY=VALUE the scheduler can match (repeatable), e.g. region=eu-west
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// How instances are isolated: namespaces (needs root) or none (plain host processes on loopback ports, for unprivileged development)
    #[arg(long, value_enum, default_value_t = IsolationArg::Namespaces)]
    pub isolation: IsolationArg,
    /// Reach this registry (HOST:PORT) over plain HTTP although it is not on loopback (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Registry credentials, one per line: `HOST basic USER PASSWORD` or `HOST bearer TOKEN` (keep the file 0600)
    #[arg(long, env = "VERGE_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// Disk budget of the image store; unused images beyond it are removed
    #[arg(long, default_value = "10Gi", value_parser = parse_size)]
    pub image_budget: u64,
    /// Time between SIGTERM and SIGKILL when stopping an instance
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: std::time::Duration,
    /// Cores offered to instances [default: all]
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory offered to instances, e.g. 8Gi [default: all]
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Private IPv4 range for instances' IPv4 addresses (reachable from this node only)
    #[arg(long, default_value = "10.89.0.0/16")]
    pub ipv4_range: ipnet::Ipv4Net,
    /// This node cannot be dialled (NAT, edge gateway): ingresses reach its instances through its connection to the control plane
    #[arg(long)]
    pub behind_nat: bool,
    /// The most `verge exec` sessions one instance has at once; more are refused
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub exec_max_sessions: u32,
    /// How volumes are stored: loop (ext4 on loop devices, sizes enforced), directory (plain directories, sizes NOT enforced), auto (loop when the host can)
    #[arg(long, value_enum, default_value_t = VolumeBackendArg::Auto)]
    pub volume_backend: VolumeBackendArg,
    /// The most wasm instances alive at once, long-running and per-connection together (the wasm engine's instance pool)
    #[arg(long, default_value_t = verge_node::daemon::DEFAULT_WASM_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(1..))]
    pub wasm_max_instances: u32,
    /// The largest memory one wasm instance may have (each pool slot reserves this much address space)
    #[arg(long, default_value = "4Gi", value_parser = parse_size)]
    pub wasm_max_memory: u64,
    #[command(flatten)]
    pub log_retention: LogRetentionArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    verge_api::manifest::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size: use a number with a unit, like 512Mi or 10Gi"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    Namespaces,
    None,
}

/// `--volume-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VolumeBackendArg {
    Auto,
    Loop,
    Directory,
}

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// Mint a join token (it pins the cluster CA) and print the command that joins a node
    JoinToken {
        /// How long the token stays valid
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many nodes may join with it
        #[arg(long, default_value_t = 1)]
        uses: u64,
    },
    /// Nodes with state, labels, capacity, last heartbeat and instance count
    List,
    /// One node in full, with its instances
    Describe { name: String },
    /// Move every instance off a node and keep new ones away (rolling: replacements first)
    Drain {
        /// The node's name
        name: String,
        /// After this long, stop what is still on the node even if its replacements are not healthy [default: 5m, the server's]
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        deadline: Option<Duration>,
        /// Then wait until the node is drained
        #[arg(long)]
        wait: bool,
        /// How long --wait waits [default: the deadline plus 1m]
        #[arg(long, value_name = "DURATION", value_parser = duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Make a drained (or draining) node take new instances again
    Undrain {
        /// The node's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// The env's rollouts, newest first: release, kind, state, progress, failing step
    List,
    /// Stop the rollout in progress; the env goes back to the release it was rolling from
    Cancel {
        /// Why, recorded in the env's events
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format on stderr (filter with RUST_LOG)
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "VERGE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// How much instance log a node keeps (`<data-dir>/logs`).
#[derive(Debug, Clone, Args)]
pub struct LogRetentionArgs {
    /// Size of one instance log file before it rotates
    #[arg(long, default_value = "8Mi", value_parser = parse_log_file_size)]
    pub log_file_size: u64,
    /// Log files kept per instance and source (app, system), the current one included
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub log_files: u32,
    /// Rotated instance log files older than this are deleted
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub log_max_age: Duration,
    /// Logs of ended instances kept per workload and env (for `verge logs --previous`)
    #[arg(long, default_value_t = 5)]
    pub log_keep_instances: u32,
}

fn parse_log_file_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("a log file size must be more than 0".into()),
        n => Ok(n),
    }
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

#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Set env vars: one new config version
    Set {
        /// KEY=VALUE (split at the first '=')
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
    },
    /// Remove env vars: one new config version
    Unset {
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// List the env vars of the newest config version
    List,
}

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Set keys of a bundle: one new bundle version (KEY=VALUE arguments win over --from-file)
    Set {
        /// Bundle name (created by its first set)
        bundle: String,
        /// KEY=VALUE (split at the first '='); other local users can see arguments in `ps`, a file they cannot read is safer
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Read KEY=VALUE lines from a dotenv file (`-`: stdin): # comments and quotes allowed, $NAME never expanded
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// List bundles: version, key names and digest (never values)
    List,
    /// Remove keys (a new version), delete one version (--version N), or, with neither, delete the whole bundle
    Unset {
        /// Bundle name
        bundle: String,
        /// Keys to remove
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
        /// Delete this version of the bundle
        #[arg(long, value_name = "N", conflicts_with = "keys")]
        version: Option<i64>,
    },
}

/// `--wait` and `--timeout` of deploy, rollback and scale.
#[derive(Debug, Clone, Args)]
pub struct WaitOpts {
    /// Then wait until the env converged on the release (like `verge wait`)
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (30s, 5m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The manifest to deploy
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = "verge.toml"
    )]
    pub file: PathBuf,
    /// Image replacing the manifest's: WORKLOAD=IMAGE, or IMAGE when there is one workload (repeatable)
    #[arg(long = "image", value_name = "[WORKLOAD=]IMAGE")]
    pub images: Vec<String>,
    /// Check, pin images and plan placements only: print the diff and the plan, create no release
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitOpts,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The release to go back to: v3, 3 or its ID
    pub release: String,
    /// Why, recorded in the env's events
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub wait: WaitOpts,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// WORKLOAD=N, or WORKLOAD alone with --cpu/--memory
    #[arg(required = true, value_name = "WORKLOAD[=N]")]
    pub workloads: Vec<String>,
    /// Cores per instance of every named workload (0.5 = half a core)
    #[arg(long, value_name = "CORES", value_parser = cpu)]
    pub cpu: Option<f64>,
    /// Memory per instance of every named workload (256Mi, 1Gi)
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub memory: Option<u64>,
    #[command(flatten)]
    pub wait: WaitOpts,
}

#[derive(Debug, Subcommand)]
pub enum DescribeCmd {
    /// A release (v3, 3 or its ID): images, config and secret versions, manifest snapshot
    Release { name: String },
    /// An env [default: --env]: current release, rollout, config and secret versions, scale
    Env { name: Option<String> },
    /// A workload of the env's current release: effective spec, endpoints, instances and why pending
    Workload { name: String },
    /// An endpoint of the env: addresses, limits, backends and their health, ingress listeners
    Endpoint { name: String },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep streaming new events as they happen (reconnects by itself)
    #[arg(long)]
    pub follow: bool,
    /// Only events at or after T: an RFC 3339 UTC time (2025-01-31T12:00:00Z) or an age (10m, 2h)
    #[arg(long, value_name = "T", value_parser = since)]
    pub since: Option<String>,
    /// Only events after this cursor (the `cursor` field of -o json)
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<i64>,
    /// Not one env's: everything the token may see (the whole cluster for an admin), or one org's with --org
    #[arg(long)]
    pub all: bool,
}

impl Command {
    /// `dev`, `control`, `node`, `ingress`: long-running daemons.
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::Dev(_) | Command::Control(_) | Command::Node(_) | Command::Ingress(_)
        )
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// After the history, keep streaming new lines (reconnects by itself)
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only this workload's instances
    #[arg(long, value_name = "W")]
    pub workload: Option<String>,
    /// Only this instance (current or earlier)
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Only app output (stdout/stderr) or only Verge's system lines
    #[arg(long, value_name = "SOURCE", value_parser = ["app", "system"])]
    pub source: Option<String>,
    /// Only lines at least this severe: debug, info, warn or error
    #[arg(long, value_name = "S", value_parser = ["debug", "info", "warn", "error"])]
    pub severity: Option<String>,
    /// Only lines at or after T: an RFC 3339 UTC time (2025-01-31T12:00:00Z) or an age (10m, 2h)
    #[arg(long, value_name = "T", value_parser = since)]
    pub since: Option<String>,
    /// Only lines before T: an RFC 3339 UTC time or an age (not with --follow)
    #[arg(long, value_name = "T", value_parser = since, conflicts_with = "follow")]
    pub until: Option<String>,
    /// Also earlier instances of the env (crashed or replaced), as far as their nodes keep them
    #[arg(long)]
    pub previous: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Run in an instance of this workload
    #[arg(long, value_name = "W")]
    pub workload: Option<String>,
    /// Run in this instance (see verge status); required without a terminal when several run
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Keep stdin open and stream it to the command
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Give the command a terminal (with -i: an interactive shell)
    #[arg(long, short = 't')]
    pub tty: bool,
    /// The command and its arguments, after --
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum VolumesCmd {
    /// Create a volume on a node: --node, or the online node (of --region) with the most free space
    Create {
        /// The volume's name (the manifest mounts it by this name)
        name: String,
        /// Its size (1Gi, 512Mi; at least 16Mi)
        #[arg(long, value_name = "SIZE", value_parser = size)]
        size: u64,
        /// Only nodes with this `region` label
        #[arg(long, value_name = "R", conflicts_with = "node")]
        region: Option<String>,
        /// This node (name or ID)
        #[arg(long, value_name = "N")]
        node: Option<String>,
    },
    /// Volumes of the env: size, use, node, attached instance, state
    List,
    /// One volume in full: node, size, use, backend, attached instance, snapshots, what to do next
    Describe { name: String },
    /// Grow a volume, also while it is mounted (volumes never shrink)
    Resize {
        name: String,
        /// The new size, larger than the current one (2Gi)
        #[arg(long, value_name = "SIZE", value_parser = size)]
        size: u64,
    },
    /// Take a point-in-time snapshot of a volume (kept on its node)
    Snapshot { name: String },
    /// Snapshots of a volume (also of a deleted volume of that name), oldest first
    Snapshots { name: String },
    /// Restore a snapshot: over its volume's data (not while attached), or into a new volume with --to
    Restore {
        /// The snapshot's ID (see `verge volumes snapshots NAME`)
        snapshot: String,
        /// Into a new volume of this name instead
        #[arg(long, value_name = "NAME")]
        to: Option<String>,
        /// Put the new volume on this node (name or ID) [default: the snapshot's]; the data is copied there
        #[arg(long, value_name = "N", requires = "to")]
        node: Option<String>,
    },
    /// Delete a volume (not while attached); its snapshots stay unless --snapshots
    Delete {
        name: String,
        /// Also delete every snapshot taken of it
        #[arg(long)]
        snapshots: bool,
    },
    /// Delete one snapshot
    DeleteSnapshot {
        /// The snapshot's ID
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// v3, 3 or a release ID [default: the env's current release]
    pub release: Option<String>,
    /// How long to wait (30s, 5m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub timeout: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}: expected a duration like \"30s\", \"5m\" or \"1h\""))
}

fn cpu(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
        _ => Err("expected a number of cores above 0, like \"0.5\" or \"2\"".into()),
    }
}

fn size(text: &str) -> Result<u64, String> {
    verge_api::manifest::parse_size(text)
        .ok_or_else(|| "expected a size like \"256Mi\" or \"1Gi\"".into())
}

/// `--since`: an age (`10m`: that long ago) or an RFC 3339 UTC time, sent
/// to the server as an RFC 3339 UTC time.
fn since(text: &str) -> Result<String, String> {
    if let Ok(age) = humantime::parse_duration(text) {
        let at = std::time::SystemTime::now()
            .checked_sub(age)
            .ok_or_else(|| format!("{text} ago is before 1970"))?;
        return Ok(humantime::format_rfc3339_seconds(at).to_string());
    }
    humantime::parse_rfc3339_weak(text)
        .map(|t| humantime::format_rfc3339(t).to_string())
        .map_err(|_| {
            "expected an RFC 3339 UTC time like \"2025-01-31T12:00:00Z\" or an age like \"10m\" or \"2h\"".into()
        })
}
