//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry), on a free loopback port, storing into a tempdir.
//!
//! [`Registry::start`] returns once `GET /v2/` answers 200; dropping the
//! [`Registry`] kills and reaps the process and deletes its storage.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Where Debian's `docker-registry` package installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry gets to answer `GET /v2/` after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts, each on a new port, in case another process took the port.
const START_ATTEMPTS: usize = 3;
/// Lines of registry log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// A running `docker-registry`, anonymous and plain HTTP on 127.0.0.1.
pub struct Registry {
    child: Child,
    host: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free port and waits until it serves.
    pub async fn start() -> anyhow::Result<Registry> {
        Registry::launch(None).await
    }

    /// Writes a config (with `auth_yaml` as its `auth:` section, if any),
    /// spawns the registry on a free port, retrying on another port when
    /// the start fails, and waits until `GET /v2/` answers.
    async fn launch(auth_yaml: Option<&str>) -> anyhow::Result<Registry> {
        if !Path::new(REGISTRY_BIN).is_file() {
            bail!(
                "{REGISTRY_BIN} not found: the tests need a real OCI registry; \
                 install it with `apt-get install docker-registry` \
                 (or run the project's test script, which installs it)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("verge-registry-")
            .tempdir()
            .context("creating the registry's tempdir")?;
        let mut errors = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            let mut config = config_yaml(&dir.path().join("data"), port);
            if let Some(auth) = auth_yaml {
                config.push_str(&format!("auth:\n{auth}"));
            }
            match start_with_config(dir.path(), port, &config).await {
                Ok((child, log)) => {
                    return Ok(Registry {
                        child,
                        host: format!("127.0.0.1:{port}"),
                        log,
                        _dir: dir,
                    });
                }
                Err(e) => errors.push(format!("attempt {attempt} (port {port}): {e:#}")),
            }
        }
        bail!("docker-registry did not start:\n{}", errors.join("\n"))
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port it listens on (on loopback).
    pub fn port(&self) -> u16 {
        self.host
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the registry's host is HOST:PORT")
    }

    /// The registry's log file (its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the registry's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

/// The user of [`Registry::start_with_basic_auth`].
pub const BASIC_USER: &str = "verge";
/// Its password (stored in the registry's htpasswd as [`HTPASSWD`]).
pub const BASIC_PASSWORD: &str = "verge-secret";
/// The bcrypt hash of [`BASIC_PASSWORD`], as htpasswd keeps it.
pub const HTPASSWD: &str = "$2b$04$cihpcESUrrdVHicGS/XJAe.afLH/jHlRC3xMQH/NMpCsr2zzdhIGq";

/// Registries with authentication, and access to what they store.
impl Registry {
    /// Builds `hello` and pushes it as `hello:1`; returns the reference.
    pub async fn push_hello(&self) -> String {
        let bin = crate::hello_binary().await;
        let image = verge_images::hello_image(&bin).expect("hello image");
        self.push_as(&image, "hello:1").await
    }

    /// Pushes `hello-debug:1`: hello with the host's static busybox and its
    /// applets ([`verge_images::debug_image`]); returns the reference.
    pub async fn push_debug(&self) -> String {
        let bin = crate::hello_binary().await;
        let busybox = std::path::Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: install Debian's busybox-static (tests/run.sh does)"
        );
        let image = verge_images::debug_image(&bin, busybox).expect("debug image");
        self.push_as(&image, "hello-debug:1").await
    }

    /// Pushes the wasm example `name` of images/ (`echo`, `tcp-echo`,
    /// `memhog`, `spin`, `crash`) as the OCI wasm artifact `NAME-wasm:1`;
    /// returns the reference.
    pub async fn push_wasm(&self, name: &str) -> String {
        let wasm =
            verge_images::wasm_example(name).unwrap_or_else(|e| panic!("wasm example {name}: {e}"));
        let reference = format!("{}/{name}-wasm:1", self.host());
        verge_images::push_wasm(&wasm, &reference)
            .await
            .unwrap_or_else(|e| panic!("push {reference}: {e}"));
        reference
    }

    async fn push_as(&self, image: &verge_images::Image, name: &str) -> String {
        let reference = format!("{}/{name}", self.host());
        verge_images::push(image, &reference)
            .await
            .unwrap_or_else(|e| panic!("push {reference}: {e}"));
        reference
    }

    /// Pushes `busybox:1`: one layer holding the host's static busybox
    /// (Debian's `busybox-static`) as `/bin/busybox`, `PATH=/bin`, command
    /// `/bin/busybox true`. Returns its digest-pinned reference.
    pub async fn push_busybox(&self) -> anyhow::Result<String> {
        let busybox = std::fs::read("/bin/busybox").map_err(|e| {
            anyhow::anyhow!("reading /bin/busybox: {e} (apt-get install busybox-static)")
        })?;
        let layer = verge_images::Layer::from_files(&[verge_images::File::new(
            "/bin/busybox",
            busybox,
            0o755,
        )])?;
        let config = verge_images::ImageConfig {
            entrypoint: Vec::new(),
            cmd: vec!["/bin/busybox".into(), "true".into()],
            env: vec!["PATH=/bin".into()],
            exposed_ports: Vec::new(),
        };
        let image = verge_images::Image::build(&config, vec![layer])?;
        let reference = format!("{}/busybox:1", self.host());
        let digest = verge_images::push(&image, &reference).await?;
        Ok(format!("{reference}@{digest}"))
    }

    /// A registry that wants HTTP basic auth: [`BASIC_USER`] with
    /// [`BASIC_PASSWORD`].
    pub async fn start_with_basic_auth() -> anyhow::Result<Registry> {
        let htpasswd = tempfile::NamedTempFile::new().context("htpasswd file")?;
        std::fs::write(htpasswd.path(), format!("{BASIC_USER}:{HTPASSWD}\n"))?;
        // The registry reads the file on start; keep it for its life anyway.
        let (_, path) = htpasswd.keep().context("keeping the htpasswd file")?;
        Registry::start_with_auth(&format!(
            "  htpasswd:\n    realm: verge\n    path: '{}'\n",
            path.display()
        ))
        .await
    }

    /// Writes a registry credentials file (the format of
    /// `verge_api::registry_auth`) for this registry with [`BASIC_USER`]
    /// and [`BASIC_PASSWORD`] at `path`.
    pub fn write_basic_auth_file(&self, path: &std::path::Path) {
        let line = format!("{} basic {BASIC_USER} {BASIC_PASSWORD}\n", self.host());
        std::fs::write(path, line).expect("writing the registry credentials file");
    }

    /// Starts a registry like [`Registry::start`] whose config also has
    /// `auth_yaml` as its `auth:` section (e.g. `htpasswd:` or `token:`
    /// with their settings, indented by two spaces). Ready once `GET /v2/`
    /// answers 200 or 401.
    pub async fn start_with_auth(auth_yaml: &str) -> anyhow::Result<Registry> {
        Registry::launch(Some(auth_yaml)).await
    }

    /// Where the registry keeps the bytes of blob `sha256:<hex>` (for tests
    /// that alter them behind its back).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self._dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    /// How many requests `METHOD PATH` the registry's access log shows.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        let wanted = format!("\"{method} {path} HTTP/");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&wanted))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // SIGKILL, then reap: poll briefly, it exits at once.
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A port free on 127.0.0.1 right now (bound to port 0, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Anonymous, plain HTTP on loopback, deletes enabled, storage under `data`.
fn config_yaml(data: &Path, port: u16) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: verge-tests-only\n",
        yaml_string(&data.display().to_string())
    )
}

/// A single-quoted YAML scalar (quotes doubled).
fn yaml_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// Writes `config`, spawns the registry, waits for `GET /v2/` to answer
/// 200 or 401 (a registry with authentication answers 401).
async fn start_with_config(
    dir: &Path,
    port: u16,
    config: &str,
) -> anyhow::Result<(Child, PathBuf)> {
    let config_path = dir.join("config.yml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let log = dir.join("registry.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {REGISTRY_BIN}"))?;
    match wait_answering(&mut child, port).await {
        Ok(()) => Ok((child, log)),
        Err(e) => {
            let _ = child.kill().await;
            Err(e.context(format!("registry log tail:\n{}", log_tail(&log))))
        }
    }
}

/// Polls `GET http://127.0.0.1:PORT/v2/` until 200 or 401, the child exits, or the deadline.
async fn wait_answering(child: &mut Child, port: u16) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building an HTTP client")?;
    let url = format!("http://127.0.0.1:{port}/v2/");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("docker-registry exited ({status}) before serving {url}");
        }
        let last = match http.get(&url).send().await {
            Ok(resp)
                if matches!(
                    resp.status(),
                    reqwest::StatusCode::OK | reqwest::StatusCode::UNAUTHORIZED
                ) =>
            {
                return Ok(());
            }
            Ok(resp) => format!("status {}", resp.status()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 or 401 within {READY_TIMEOUT:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
