//! `verge control` and `verge dev`: run the control plane in this process
//! until SIGINT or SIGTERM, then shut down gracefully.
//!
//! Both print `VERGE_SERVER=<url>` on stdout, last, once they serve; the admin
//! token (`VERGE_TOKEN=...`) is printed by `verge control` on its first start
//! only, and by `verge dev` on every start, which keeps its copy in the data
//! dir (mode 0600) because a dev cluster is a single user's.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use verge_api::registry_auth::Credential;
use verge_api::{ErrorDetail, ErrorKind};
use verge_control::store::{Store, StoreError};
use verge_control::{Config, StartError, auth};

use super::{Failure, Result};
use crate::args::{ControlArgs, DevArgs, LogArgs, LogFormat};
use crate::output::Output;
use crate::profile::{Profile, ProfileFile};

fn init_logging(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match log.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn start_failed(e: StartError) -> Failure {
    let (kind, next): (ErrorKind, &[&str]) = match &e {
        StartError::Config(_) => (
            ErrorKind::BadRequest,
            &["fix the configuration; every key is in docs/operations.md"],
        ),
        StartError::DataDir { .. } => (
            ErrorKind::BadRequest,
            &["pass --data-dir DIR naming a directory this user can write"],
        ),
        StartError::Tls(_) => (
            ErrorKind::BadRequest,
            &[
                "check that --tls-cert and --tls-key are PEM files of a certificate chain and its private key",
            ],
        ),
        StartError::Bind { .. } => (
            ErrorKind::Conflict,
            &["stop the process using that address, or pick another with --listen"],
        ),
        StartError::Cluster(verge_control::cluster::ClusterError::Bind { .. }) => (
            ErrorKind::Conflict,
            &["stop the process using that UDP address, or pick another with --cluster-listen"],
        ),
        StartError::Cluster(_) => (
            ErrorKind::Internal,
            &[
                "the cluster CA could not be loaded or used: check the secrets key (every replica needs the same one)",
            ],
        ),
        StartError::RegistryAuth(_) => (
            ErrorKind::BadRequest,
            &[
                "fix --registry-auth-file: one `HOST basic USER PASSWORD` or `HOST bearer TOKEN` per line",
            ],
        ),
        StartError::Secrets(_) => (
            ErrorKind::BadRequest,
            &["check the secrets key files; key rotation is described in docs/operations.md"],
        ),
        StartError::Store(StoreError::Migrate(_)) => (
            ErrorKind::Internal,
            &[
                "the database holds a schema this version does not know: check which Verge version wrote it",
            ],
        ),
        StartError::Store(_) => (
            ErrorKind::Unavailable,
            &[
                "check that the database in --database is running and reachable with these credentials",
            ],
        ),
    };
    let mut detail = ErrorDetail::new(kind, format!("control plane did not start: {e}"));
    detail.next.extend(next.iter().map(|n| n.to_string()));
    Failure(detail)
}

/// Cancels `token` on the first SIGINT or SIGTERM (graceful: drain, then
/// exit); a second one exits at once, as an impatient operator expects.
fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down (again to stop at once)"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down (again to stop at once)"),
        }
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Committed state is safe: the store acknowledges only durable commits.
        tracing::warn!("second signal: exiting without waiting for open requests");
        std::process::exit(130);
    });
    Ok(())
}

/// What a daemon prints on stdout once it serves: `VERGE_TOKEN=` (when
/// there is one to show), `VERGE_CLUSTER=` (where nodes connect), then
/// `VERGE_SERVER=`, last, which tells scripts the server is ready; under
/// `-o json`, one object `{"server", "token", "cluster"}`.
fn print_banner(out: &Output, server: &str, token: Option<&str>, cluster: &str) {
    if out.is_json() {
        println!(
            "{}",
            serde_json::json!({ "server": server, "token": token, "cluster": cluster })
        );
        return;
    }
    if let Some(token) = token {
        println!("VERGE_TOKEN={token}");
    }
    println!("VERGE_CLUSTER={cluster}");
    println!("VERGE_SERVER={server}");
}

pub async fn control(args: ControlArgs, out: &Output) -> Result {
    init_logging(&args.log);
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)
            .map_err(|e| Failure(ErrorDetail::new(ErrorKind::BadRequest, e.to_string())))?,
        None => Config::default(),
    };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.database {
        config.database = Some(v);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(verge_control::config::TlsConfig { cert, key });
    }
    if let Some(v) = args.max_body_bytes {
        config.max_body_bytes = v;
    }
    config.new_admin_token = args.new_admin_token;
    if let Some(key) = args.secrets_key_file {
        config.secrets_key_file = Some(key);
    }
    if !args.secrets_previous_key_files.is_empty() {
        config.secrets_previous_key_files = args.secrets_previous_key_files;
    }
    if !args.insecure_registries.is_empty() {
        config.insecure_registries = args.insecure_registries;
    }
    if let Some(v) = args.registry_auth_file {
        config.registry_auth_file = Some(v);
    }
    if let Some(v) = args.cluster_listen {
        config.cluster_listen = Some(v);
    }
    if let Some(v) = args.cluster_advertise {
        config.cluster_advertise = Some(v);
    }
    if let Some(v) = args.instance_prefix {
        config.instance_prefix = v;
    }
    if let Some(v) = args.endpoint_prefix {
        config.endpoint_prefix = v;
    }
    if let Some(v) = args.endpoint_ipv4_pool {
        config.endpoint_ipv4_pool = v;
    }
    if let Some(v) = args.node_offline_after {
        config.node_offline_after_secs = v.as_secs().max(1);
    }
    if let Some(v) = args.reschedule_after {
        config.reschedule_after_secs = v.as_secs().max(1);
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let started = verge_control::start(&config, shutdown)
        .await
        .map_err(start_failed)?;
    print_banner(
        out,
        &started.url,
        started.admin_token.as_deref(),
        &started.cluster.advertise(),
    );
    if started.admin_token.is_some() {
        // Through the log, so that `--log-format json` stays one JSON object per line.
        tracing::warn!(
            "the cluster admin token printed on stdout is shown only now \
             (`verge control --new-admin-token` mints another)"
        );
    }
    started.wait().await;
    Ok(())
}

fn default_dev_dir() -> anyhow::Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(xdg).join("verge").join("dev"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set: pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/verge/dev"))
}

/// The dev cluster's admin token: new on first start, else the saved copy
/// while it is still an active admin token, else a freshly minted one (the
/// copy was revoked or lost, or the data dir was made by `verge control`).
async fn dev_token(
    store: &Store,
    first: Option<String>,
    data_dir: &Path,
) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("dev-admin-token");
    let token = match first {
        Some(t) => t,
        None => {
            let saved = match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
            };
            if let Some(t) = saved.filter(|t| !t.is_empty()) {
                let row = store.active_token_by_hash(&auth::hash_token(&t)).await?;
                if row.is_some_and(|r| r.org_id.is_none()) {
                    return Ok(t);
                }
                tracing::warn!(path = %path.display(), "saved dev admin token is revoked; minting a new one");
            }
            auth::create_admin_token(store, "dev").await?
        }
    };
    // Atomically: a crash never leaves a truncated token behind.
    let tmp = data_dir.join(".dev-admin-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(token)
}

/// Creates org `dev` and its project `default` unless they exist.
async fn dev_defaults(store: &Store) -> anyhow::Result<()> {
    let org = match store.create_org("dev").await {
        Ok(org) => org,
        Err(StoreError::Conflict) => store
            .org_by_name("dev")
            .await?
            .context("org dev vanished")?,
        Err(e) => return Err(e.into()),
    };
    match store.create_project(&org.id, "default").await {
        Ok(_) | Err(StoreError::Conflict) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn dev(args: DevArgs, out: &Output) -> Result {
    init_logging(&args.log);
    // A broken profile file would fail the dev setup after the start: refuse first.
    ProfileFile::load()?;
    let data_dir = match args.data_dir.clone() {
        Some(d) => d,
        None => default_dev_dir()?,
    };
    let config = Config {
        listen: args.listen,
        data_dir: data_dir.clone(),
        insecure_registries: args.insecure_registries.clone(),
        instance_prefix: dev_prefix(&data_dir),
        // Without root the ingress cannot add the route that makes a
        // prefix bindable: endpoints then share loopback.
        endpoint_prefix: if nix_is_root() {
            dev_endpoint_prefix(&data_dir)
        } else {
            "::1/128".into()
        },
        ..Config::default()
    };
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let started = verge_control::start(&config, shutdown.clone())
        .await
        .map_err(start_failed)?;
    let setup = async {
        let token = dev_token(&started.store, started.admin_token.clone(), &data_dir).await?;
        dev_defaults(&started.store).await?;
        let profile = Profile {
            server: started.url.clone(),
            token: token.clone(),
            ca_cert: None,
            org: Some("dev".into()),
            project: Some("default".into()),
        };
        let path =
            ProfileFile::save_current("dev", profile).map_err(|e| anyhow::anyhow!(e.detail()))?;
        anyhow::Ok((token, path))
    };
    let (token, profile_path) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            shutdown.cancel();
            started.wait().await;
            return Err(e.into());
        }
    };
    let node = match dev_node(&args, &data_dir, &started, shutdown.clone()).await {
        Ok(node) => node,
        Err(e) => {
            shutdown.cancel();
            started.wait().await;
            return Err(e);
        }
    };
    let ingress = verge_ingress::daemon::IngressConfig {
        server: started.url.clone(),
        token: token.clone(),
        ca_cert_pem: None,
        name: "dev".into(),
        node: Some(node.node_id.clone()),
        metrics_listen: Some(args.ingress_metrics_listen),
        shutdown_grace: std::time::Duration::from_secs(5),
    };
    let ingress = match verge_ingress::daemon::start(ingress, shutdown.clone()).await {
        Ok(i) => i,
        Err(e) => {
            shutdown.cancel();
            started.wait().await;
            return Err(ingress_failed(e));
        }
    };
    print_banner(
        out,
        &started.url,
        Some(&token),
        &started.cluster.advertise(),
    );
    if let Some(m) = ingress.metrics_addr {
        tracing::info!("dev ingress metrics at http://{m}/metrics");
    }
    tracing::info!(
        url = %started.url,
        data_dir = %data_dir.display(),
        profile = %profile_path.display(),
        "verge dev ready: profile \"dev\" (org \"dev\", project \"default\") saved and selected; \
         try `verge apps create hello` in another shell; Ctrl-C stops"
    );
    let _ = node.task.await;
    let _ = ingress.task.await;
    started.wait().await;
    Ok(())
}

/// A per-data-dir /64 for endpoint addresses, like [`dev_prefix`].
fn dev_endpoint_prefix(data_dir: &Path) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("endpoints", data_dir).hash(&mut h);
    format!("fd65:6e64:{:x}::/64", h.finish() as u16)
}

fn ingress_failed(e: verge_ingress::daemon::IngressError) -> Failure {
    use verge_ingress::daemon::IngressError;
    let next: &[&str] = match &e {
        IngressError::Refused(_) => {
            &["pass a cluster admin token with --token (org tokens cannot watch the routing table)"]
        }
        IngressError::Metrics { .. } => &["pick another address with --metrics-listen"],
        IngressError::Client(_) => &["check --server (the control plane's URL) and --ca-cert"],
    };
    let kind = match &e {
        IngressError::Refused(_) => ErrorKind::Forbidden,
        IngressError::Metrics { .. } => ErrorKind::Conflict,
        IngressError::Client(_) => ErrorKind::BadRequest,
    };
    let mut detail = ErrorDetail::new(kind, format!("ingress did not start: {e}"));
    detail.next.extend(next.iter().map(|n| n.to_string()));
    Failure(detail)
}

/// `verge ingress`: serves the cluster's endpoints until SIGINT/SIGTERM.
pub async fn ingress(
    target: &crate::args::Target,
    args: crate::args::IngressArgs,
    out: &Output,
) -> Result {
    init_logging(&args.log);
    let (Some(server), Some(token)) = (target.server.clone(), target.token.clone()) else {
        return Err(super::bad_request(
            "verge ingress needs --server URL and --token TOKEN (a cluster admin token), \
             or VERGE_SERVER and VERGE_TOKEN"
                .to_string(),
        ));
    };
    let ca_cert_pem = target
        .ca_cert
        .as_deref()
        .map(crate::context::read_ca_cert)
        .transpose()?;
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_ascii_lowercase().replace(['.', '_'], "-"))
            .filter(|h| verge_api::names::validate("ingress", h).is_ok())
            .unwrap_or_else(|| "ingress".into()),
    };
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let started = verge_ingress::daemon::start(
        verge_ingress::daemon::IngressConfig {
            server,
            token,
            ca_cert_pem,
            name: name.clone(),
            node: args.node,
            metrics_listen: Some(args.metrics_listen),
            shutdown_grace: args.shutdown_grace,
        },
        shutdown,
    )
    .await
    .map_err(ingress_failed)?;
    let metrics = started
        .metrics_addr
        .map(|a| format!("http://{a}/metrics"))
        .unwrap_or_default();
    if out.is_json() {
        println!(
            "{}",
            serde_json::json!({ "ingress": name, "metrics": metrics })
        );
    } else {
        println!("VERGE_INGRESS={name}");
        println!("VERGE_INGRESS_METRICS={metrics}");
    }
    let _ = started.task.await;
    Ok(())
}

/// A per-data-dir /48, so that dev clusters side by side (tests) do not
/// hand out the same instance addresses.
fn dev_prefix(data_dir: &Path) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    format!("fd76:6572:{:x}::/48", h.finish() as u16)
}

/// The dev cluster's node, in this process: joined on first start with a
/// token minted here, stopping its instances when `verge dev` stops.
async fn dev_node(
    args: &DevArgs,
    data_dir: &Path,
    started: &verge_control::Started,
    shutdown: CancellationToken,
) -> Result<verge_node::daemon::StartedNode> {
    use crate::args::IsolationArg;
    let root = nix_is_root();
    let isolation = args.isolation.unwrap_or(if root {
        IsolationArg::Namespaces
    } else {
        IsolationArg::None
    });
    let node_dir = data_dir.join("node");
    let join_token = if node_dir.join("identity").exists() {
        None
    } else {
        let minted = started
            .cluster
            .mint_join_token(std::time::Duration::from_secs(600), 1, "verge dev")
            .await
            .map_err(anyhow::Error::from)?;
        Some(minted.token.to_string())
    };
    let node_args = crate::args::NodeArgs {
        server: Some(started.cluster.local_addr().to_string()),
        join_token,
        data_dir: node_dir,
        name: Some("dev".into()),
        labels: Vec::new(),
        isolation,
        insecure_registries: args.insecure_registries.clone(),
        registry_auth_file: None,
        image_budget: 10 << 30,
        stop_grace: std::time::Duration::from_secs(10),
        cpu: None,
        memory: None,
        ipv4_range: "10.89.0.0/16".parse().expect("valid"),
        behind_nat: false,
        exec_max_sessions: args.exec_max_sessions,
        volume_backend: args.volume_backend,
        wasm_max_instances: args.wasm_max_instances,
        wasm_max_memory: args.wasm_max_memory,
        log_retention: args.log_retention.clone(),
        log: LogArgs {
            log_format: args.log.log_format,
        },
    };
    let mut config = node_config(&node_args)?;
    config.forwarding = false;
    config.stop_on_shutdown = true;
    if isolation == IsolationArg::None {
        tracing::warn!(
            "dev node: isolation none (not root): instances run as plain processes on loopback ports"
        );
    }
    verge_node::daemon::start(config, shutdown)
        .await
        .map_err(node_failed)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn node_failed(e: verge_node::daemon::NodeError) -> Failure {
    use verge_node::agent::AgentError;
    use verge_node::daemon::NodeError;
    let (kind, next): (ErrorKind, &[&str]) = match &e {
        NodeError::Agent(AgentError::NotJoined | AgentError::BadToken(_)) => (
            ErrorKind::BadRequest,
            &[
                "on the control plane: verge nodes join-token; then start this node with the --server and --join-token it prints",
            ],
        ),
        NodeError::Agent(AgentError::Refused(_)) => (
            ErrorKind::Forbidden,
            &["mint a new token on the control plane: verge nodes join-token"],
        ),
        NodeError::Agent(AgentError::CaMismatch(_)) => (
            ErrorKind::Forbidden,
            &["check that --server points at the cluster the token came from"],
        ),
        NodeError::Agent(AgentError::Unreachable { .. } | AgentError::Resolve { .. }) => (
            ErrorKind::Unavailable,
            &[
                "check --server (HOST:PORT of the cluster endpoint, UDP) and that the control plane runs",
            ],
        ),
        NodeError::Runtime(_) | NodeError::Net(_) => (
            ErrorKind::BadRequest,
            &["run verge node as root, or with --isolation none for unprivileged development"],
        ),
        _ => (ErrorKind::Internal, &[]),
    };
    let mut detail = ErrorDetail::new(kind, format!("node did not start: {e}"));
    detail.next.extend(next.iter().map(|n| n.to_string()));
    Failure(detail)
}

fn labels(pairs: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(super::bad_request(format!(
                "--label {pair:?} is not KEY=VALUE, e.g. --label region=eu-west"
            )));
        };
        verge_api::names::label(k, v).map_err(super::bad_request)?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// Reads a `--registry-auth-file` (format: `verge_api::registry_auth`).
fn registry_auth(path: &Path) -> Result<Vec<(String, Credential)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        super::bad_request(format!(
            "cannot read --registry-auth-file {}: {e}",
            path.display()
        ))
    })?;
    verge_api::registry_auth::parse(&path.display().to_string(), &text).map_err(super::bad_request)
}

/// The node configuration every daemon shares; `verge dev` adjusts it.
fn node_config(args: &crate::args::NodeArgs) -> Result<verge_node::daemon::NodeConfig> {
    use crate::args::IsolationArg;
    Ok(verge_node::daemon::NodeConfig {
        data_dir: args.data_dir.clone(),
        server: args.server.clone(),
        join_token: args.join_token.clone(),
        name: args.name.clone(),
        labels: labels(&args.labels)?,
        isolation: match args.isolation {
            IsolationArg::Namespaces => verge_api::wire::Isolation::Namespaces,
            IsolationArg::None => verge_api::wire::Isolation::None,
        },
        insecure_registries: args.insecure_registries.clone(),
        registry_auth: match &args.registry_auth_file {
            Some(path) => registry_auth(path)?
                .into_iter()
                .map(|(host, c)| {
                    let auth = match c {
                        Credential::Basic { username, password } => {
                            verge_node::pull::RegistryAuth::Basic { username, password }
                        }
                        Credential::Bearer { token } => {
                            verge_node::pull::RegistryAuth::Bearer { token }
                        }
                    };
                    (host, auth)
                })
                .collect(),
            None => Vec::new(),
        },
        image_budget: args.image_budget,
        stop_grace: args.stop_grace,
        cpu: args.cpu,
        memory: args.memory,
        ipv4_range: args.ipv4_range,
        behind_nat: args.behind_nat,
        netns_dir: PathBuf::from(verge_node::net::DEFAULT_NETNS_DIR),
        cgroup_parent: "verge".into(),
        forwarding: true,
        stop_on_shutdown: false,
        shim_exe: PathBuf::from("/proc/self/exe"),
        exec_max_sessions: args.exec_max_sessions as usize,
        log_limits: verge_node::logs::LogLimits {
            file_size: args.log_retention.log_file_size,
            files: args.log_retention.log_files,
            max_age: args.log_retention.log_max_age,
            keep_instances: args.log_retention.log_keep_instances,
        },
        volume_backend: match args.volume_backend {
            crate::args::VolumeBackendArg::Auto => verge_node::volumes::Backend::Auto,
            crate::args::VolumeBackendArg::Loop => verge_node::volumes::Backend::Loop,
            crate::args::VolumeBackendArg::Directory => verge_node::volumes::Backend::Directory,
        },
        wasm_max_instances: args.wasm_max_instances,
        wasm_max_memory: args.wasm_max_memory,
    })
}

pub async fn node(args: crate::args::NodeArgs, out: &Output) -> Result {
    init_logging(&args.log);
    let config = node_config(&args)?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let started = verge_node::daemon::start(config, shutdown)
        .await
        .map_err(node_failed)?;
    if out.is_json() {
        println!(
            "{}",
            serde_json::json!({ "node": started.name, "id": started.node_id, "instance_prefix": started.instance_prefix })
        );
    } else {
        println!("VERGE_NODE={}", started.name);
    }
    tracing::info!(node = %started.node_id, name = %started.name, "node running; instances keep running when this daemon stops");
    let _ = started.task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_auth_file_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth");
        std::fs::write(&path, "# ok\nreg.example basic only-user\n").unwrap();
        let err = super::registry_auth(&path).unwrap_err().0.message;
        assert!(
            err.contains("auth:2: expected `HOST basic USER PASSWORD`"),
            "{err}"
        );
        let missing = super::registry_auth(&dir.path().join("nope"))
            .unwrap_err()
            .0
            .message;
        assert!(
            missing.contains("cannot read --registry-auth-file"),
            "{missing}"
        );
    }
}
