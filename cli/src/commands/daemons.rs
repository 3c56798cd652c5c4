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
/// there is one to show) then `VERGE_SERVER=`, last, which tells scripts the
/// server is ready; under `-o json`, one object `{"server", "token"}`.
fn print_banner(out: &Output, server: &str, token: Option<&str>) {
    if out.is_json() {
        println!(
            "{}",
            serde_json::json!({ "server": server, "token": token })
        );
        return;
    }
    if let Some(token) = token {
        println!("VERGE_TOKEN={token}");
    }
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
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let started = verge_control::start(&config, shutdown)
        .await
        .map_err(start_failed)?;
    print_banner(out, &started.url, started.admin_token.as_deref());
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
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_dev_dir()?,
    };
    let config = Config {
        listen: args.listen,
        data_dir: data_dir.clone(),
        insecure_registries: args.insecure_registries,
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
    print_banner(out, &started.url, Some(&token));
    tracing::info!(
        url = %started.url,
        data_dir = %data_dir.display(),
        profile = %profile_path.display(),
        "verge dev ready: profile \"dev\" (org \"dev\", project \"default\") saved and selected; \
         try `verge apps create hello` in another shell; Ctrl-C stops"
    );
    started.wait().await;
    Ok(())
}
