//! `verge node`: put the parts together and run until shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use verge_api::wire::Isolation;

use crate::agent::{self, Agent, AgentError, JoinParams};
use crate::host::Host;
use crate::net::{NetConfig, Network};
use crate::pull::{ImageStore, PullOptions};
use crate::reconcile::{Parts, Reconciler};
use crate::runtime::{ProcessRuntime, RuntimeConfig};

/// Everything `verge node` is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// `HOST:PORT` of the cluster endpoint; needed to join, optional later.
    pub server: Option<String>,
    pub join_token: Option<String>,
    /// Default: the hostname.
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub isolation: Isolation,
    /// The node cannot be dialled (NAT): ingresses reach its instances
    /// through its session with the control plane (`--behind-nat`).
    pub behind_nat: bool,
    /// Registries reached over plain HTTP although not on loopback.
    pub insecure_registries: Vec<String>,
    /// Credentials by registry `host[:port]`.
    pub registry_auth: Vec<(String, crate::pull::RegistryAuth)>,
    /// Disk budget of the image store.
    pub image_budget: u64,
    /// Between SIGTERM and SIGKILL when an instance stops.
    pub stop_grace: Duration,
    /// Capacity offered to instances; default the whole machine.
    pub cpu: Option<f64>,
    pub memory: Option<u64>,
    /// Private IPv4 range instance addresses come from (node-local).
    pub ipv4_range: ipnet::Ipv4Net,
    /// Where named network namespaces of instances live: a directory per
    /// node under it (`<netns_dir>/<node id>/<instance id>`), so that nodes
    /// sharing a machine (`verge dev` beside `verge node`, tests) never
    /// take each other's namespaces for leftovers.
    pub netns_dir: PathBuf,
    /// cgroup under which instance cgroups are made.
    pub cgroup_parent: String,
    /// Enable IP forwarding so other machines reach instances (off in `verge dev`).
    pub forwarding: bool,
    /// Stop instances when the daemon stops (`verge dev`).
    pub stop_on_shutdown: bool,
    /// The program that re-executes as an instance's shim (this binary),
    /// and as the helper of exec sessions.
    pub shim_exe: PathBuf,
    /// The most exec sessions an instance has at once (`--exec-max-sessions`).
    pub exec_max_sessions: usize,
    /// How much instance log is kept (`<data_dir>/logs`, see [`crate::logs`]).
    pub log_limits: crate::logs::LogLimits,
    /// How new volumes are stored (`--volume-backend`, see [`crate::volumes`]).
    pub volume_backend: crate::volumes::Backend,
    /// Most wasm instances alive at once, long-running and per-connection
    /// together (`--wasm-max-instances`, see [`crate::wasm::WasmConfig`]).
    pub wasm_max_instances: u32,
    /// The largest memory one wasm instance may have (`--wasm-max-memory`).
    pub wasm_max_memory: u64,
}

/// Default of [`NodeConfig::wasm_max_instances`].
pub const DEFAULT_WASM_MAX_INSTANCES: u32 = 1000;
/// Default of [`NodeConfig::wasm_max_memory`]: 4 GiB.
pub const DEFAULT_WASM_MAX_MEMORY: u64 = 4 << 30;

/// Why the node daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image store: {0}")]
    Images(#[from] crate::pull::PullError),
    #[error("runtime: {0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("networking: {0}")]
    Net(#[from] crate::net::NetError),
    #[error("volumes: {0}")]
    Volumes(#[from] crate::volumes::VolumeError),
    #[error("wasm: {0}")]
    Wasm(#[from] crate::wasm::WasmError),
    #[error("the instance prefix {0:?} assigned at join does not parse")]
    BadPrefix(String),
}

/// A started node: its identity and the task running it.
#[derive(Debug)]
pub struct StartedNode {
    pub node_id: String,
    pub name: String,
    pub instance_prefix: String,
    pub task: tokio::task::JoinHandle<()>,
}

/// Joins (first start) or loads the identity, re-adopts instances and runs
/// the session loop until `shutdown`.
pub async fn start(cfg: NodeConfig, shutdown: CancellationToken) -> Result<StartedNode, NodeError> {
    tokio::fs::create_dir_all(&cfg.data_dir)
        .await
        .map_err(|source| NodeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
    let capacity = Host::capacity(cfg.cpu, cfg.memory);
    let name = cfg.name.clone().unwrap_or_else(hostname);
    let params = JoinParams {
        server: cfg.server.clone(),
        token: cfg.join_token.clone(),
        name,
        labels: cfg.labels.clone(),
        capacity,
        isolation: cfg.isolation,
    };
    let identity = agent::identity(&cfg.data_dir, &params).await?;
    let prefix: ipnet::Ipv6Net = identity
        .assigned
        .instance_prefix
        .parse()
        .map_err(|_| NodeError::BadPrefix(identity.assigned.instance_prefix.clone()))?;
    let images = ImageStore::open(
        cfg.data_dir.join("images"),
        cfg.image_budget,
        PullOptions {
            insecure_registries: cfg.insecure_registries.clone(),
            auth: cfg.registry_auth.clone(),
            ..PullOptions::default()
        },
    )
    .await?;
    let runtime = ProcessRuntime::new(RuntimeConfig {
        root: cfg.data_dir.join("instances"),
        cgroup_parent: cfg.cgroup_parent.clone(),
        isolation: cfg.isolation,
        shim_exe: cfg.shim_exe.clone(),
    })?
    .with_log_limits(cfg.log_limits);
    let logs = crate::logs::Logs::new(
        cfg.data_dir.join("logs"),
        cfg.log_limits,
        identity.assigned.name.clone(),
    );
    let net = match cfg.isolation {
        Isolation::Namespaces => {
            if cfg.forwarding {
                crate::net::enable_forwarding()?;
            }
            let mut nc = NetConfig::new(&cfg.data_dir, prefix);
            nc.range_v4 = cfg.ipv4_range;
            nc.netns_dir = cfg.netns_dir.join(&identity.assigned.node_id);
            Some(Network::new(nc).await?)
        }
        Isolation::None => {
            tracing::warn!(
                "isolation none: instances run as plain host processes on loopback ports, without namespaces, rootfs or private addresses"
            );
            None
        }
    };
    // volumes: opened once, here, and mounted again (after a restart or a
    // reboot) before the reconciler re-adopts or starts instances that
    // mount them; the reconciler (claims) and the streams (operations)
    // share this one `Volumes`.
    let volumes = crate::volumes::Volumes::open(&cfg.data_dir, cfg.volume_backend)?;
    volumes.recover().await;
    // One engine and compiled-code cache for every wasm instance and listener.
    let wasm = crate::wasm::WasmRuntime::new(crate::wasm::WasmConfig {
        cache_dir: crate::wasm::cache_dir(&cfg.data_dir),
        max_instances: cfg.wasm_max_instances,
        max_memory: cfg.wasm_max_memory,
    })?;
    let (reconciler, reports) = Reconciler::start_with_volumes(
        Parts {
            data_dir: cfg.data_dir.clone(),
            images,
            runtime,
            net,
            isolation: cfg.isolation,
            stop_grace: cfg.stop_grace,
            stop_on_shutdown: cfg.stop_on_shutdown,
            logs: logs.clone(),
            wasm: Some(wasm),
        },
        Some(volumes.clone()),
        shutdown.clone(),
    )
    .await;
    let assigned = identity.assigned.clone();
    let supervisors = reconciler.clone();
    let exec = crate::exec::Exec::new(
        crate::exec::ExecConfig {
            max_sessions: cfg.exec_max_sessions,
            helper_exe: cfg.shim_exe.clone(),
        },
        shutdown.clone(),
    );
    let agent = Agent {
        server: cfg
            .server
            .clone()
            .unwrap_or_else(|| assigned.server.clone()),
        identity,
        labels: cfg.labels.clone(),
        capacity,
        isolation: cfg.isolation,
        behind_nat: cfg.behind_nat,
        streams: crate::streams::Streams::new(
            reconciler.clone(),
            assigned.name.clone(),
            logs.clone(),
            exec.clone(),
            volumes,
        ),
        reconciler,
        reports,
    };
    let span = tracing::info_span!("node", node = %assigned.node_id, name = %assigned.name);
    // Log retention at start (after the reconciler marked the instances
    // that left while no daemon ran), then hourly.
    tokio::spawn(tracing::Instrument::instrument(
        logs.clone().housekeeping(shutdown.clone()),
        tracing::info_span!(parent: &span, "logs_housekeeping"),
    ));
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            agent.run(shutdown).await;
            exec.stopped().await;
            supervisors.stopped().await;
            // The last system records (`stopped`) are on disk.
            logs.sync().await;
            tracing::info!("node stopped");
        },
        span,
    ));
    Ok(StartedNode {
        node_id: assigned.node_id,
        name: assigned.name,
        instance_prefix: assigned.instance_prefix,
        task,
    })
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_ascii_lowercase().replace(['.', '_'], "-"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}
