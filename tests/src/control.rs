//! A real `verge control` process on an ephemeral loopback port, on SQLite
//! (a file in a temporary data dir) or on a fresh PostgreSQL database.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::cli::Cli;

/// Which store backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What a start printed on stdout.
#[derive(Debug)]
pub struct Banner {
    pub server: String,
    /// `VERGE_CLUSTER=`: where nodes connect (UDP).
    pub cluster: Option<String>,
    /// Only on the very first start.
    pub token: Option<String>,
}

/// A running control plane and the state it keeps across restarts.
#[derive(Debug)]
pub struct ControlPlane {
    pub url: String,
    /// `host:port` (UDP) of the cluster endpoint nodes connect to.
    pub cluster: String,
    /// The admin token printed on first start.
    pub admin_token: String,
    pub data_dir: TempDir,
    /// Profiles of the CLI runs of this test.
    pub config_dir: TempDir,
    database: Option<String>,
    /// `127.0.0.1:0` until the first start; then the address it bound, so
    /// that restarts keep the URL clients use.
    listen: String,
    extra: Vec<String>,
    child: Option<Child>,
    stderr_log: std::path::PathBuf,
}

impl ControlPlane {
    pub async fn start(backend: Backend) -> ControlPlane {
        Self::start_with(backend, &[]).await
    }

    /// Starts with extra `verge control` arguments (e.g. TLS flags).
    pub async fn start_with(backend: Backend, extra: &[&str]) -> ControlPlane {
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(crate::postgres::fresh_database().await),
        };
        let data_dir = tempfile::tempdir().expect("temp data dir");
        let stderr_log = data_dir.path().join("control.log");
        let mut cp = ControlPlane {
            url: String::new(),
            cluster: String::new(),
            admin_token: String::new(),
            data_dir,
            config_dir: tempfile::tempdir().expect("temp config dir"),
            database,
            listen: "127.0.0.1:0".into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            stderr_log,
        };
        let banner = cp.launch().await;
        cp.admin_token = banner
            .token
            .unwrap_or_else(|| panic!("first start printed no VERGE_TOKEN line\n{}", cp.log()));
        cp
    }

    /// The control plane's log so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The `verge control` command line this plane runs with.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "control".to_string(),
            "--listen".into(),
            self.listen.clone(),
            "--data-dir".into(),
            self.data_dir.path().display().to_string(),
        ];
        if let Some(db) = &self.database {
            args.extend(["--database".into(), db.clone()]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The URL of this plane's database, to inspect it directly (see
    /// [`crate::store`]): `sqlite://<data_dir>/verge.db` on SQLite, the
    /// test's own `postgres://.../verge_test_<ulid>` on PostgreSQL.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_dir.path().join("verge.db").display()
            ),
        }
    }

    async fn launch(&mut self) -> Banner {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("control log file");
        // No inherited VERGE_* (a developer's VERGE_DATABASE would move a
        // SQLite test onto their server, VERGE_LOG_FORMAT would change the
        // log) nor RUST_LOG: the harness's own level below.
        let mut child = crate::verge_command()
            .args(self.args())
            .env_remove("RUST_LOG")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn verge control");
        let stdout = child.stdout.take().expect("piped stdout");
        let banner = match read_banner_until(stdout, BANNER_TIMEOUT).await {
            Ok(banner) => banner,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!("verge control {e}\n--- control log ---\n{}", self.log())
            }
        };
        self.url = banner.server.clone();
        self.cluster = banner.cluster.clone().unwrap_or_default();
        // Restarts keep the cluster port too, so that nodes reconnect.
        if let (Some(at), Some(port)) = (
            self.extra.iter().position(|a| a == "--cluster-listen"),
            self.cluster.rsplit(':').next(),
        ) && let Some(listen) = self.extra.get_mut(at + 1)
            && let Some(host) = listen.strip_suffix(":0")
        {
            *listen = format!("{host}:{port}");
        }
        if let Some(addr) = banner.server.split("://").nth(1) {
            self.listen = addr.trim_end_matches('/').to_string();
        }
        self.child = Some(child);
        banner
    }

    /// The resident memory of the running control plane, in bytes
    /// (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss(&self) -> u64 {
        let child = self.child.as_ref().expect("control plane is running");
        let pid = child.id().expect("child pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS in /proc/<pid>/status")
            * 1024
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the running control plane.
    pub fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("control plane is running");
        let pid = child.id().expect("child pid") as libc::pid_t;
        // SAFETY: kill(2) with a valid signal on the pid of our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Waits (at most 30 s) for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("control plane is running");
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(status) => status.expect("wait for control plane"),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "control plane did not exit within 30s (killed)\n--- control log ---\n{}",
                    self.log()
                )
            }
        }
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it. The
    /// data dir and database stay: [`restart_after_exit`](Self::restart_after_exit)
    /// starts again on them.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("control plane is running");
        child.start_kill().expect("SIGKILL the control plane");
        // SIGKILL cannot be caught: the exit is immediate, the wait short.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => panic!("control plane not reaped 10s after SIGKILL"),
                Err(e) => panic!("wait for the killed control plane: {e}"),
            }
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit().await
    }

    /// Stops gracefully (asserting a clean exit) and starts again on the same
    /// data dir and database. Returns what the new start printed.
    pub async fn restart(&mut self) -> Banner {
        let status = self.stop().await;
        assert!(
            status.success(),
            "control plane exited with {status} on SIGTERM\n{}",
            self.log()
        );
        self.launch().await
    }

    /// Starts again after the process exited by itself (see
    /// [`wait_exit`](Self::wait_exit)) or was killed ([`kill`](Self::kill)).
    pub async fn restart_after_exit(&mut self) -> Banner {
        assert!(self.child.is_none(), "still running: use restart()");
        self.launch().await
    }

    /// Like [`restart`](Self::restart), with `extra` replacing the extra arguments.
    pub async fn restart_with(&mut self, extra: &[&str]) -> Banner {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart().await
    }

    /// Creates org `acme`, project `web`, app `hello` and its env `prod`
    /// (what many tests start from); returns the admin CLI scoped to them
    /// through `VERGE_ORG`, `VERGE_APP` and `VERGE_ENV`.
    pub async fn acme_hello_prod(&self) -> Cli {
        let admin = self.cli();
        admin.run(&["orgs", "create", "acme"]).await.ok();
        admin
            .run(&["projects", "create", "web", "--org", "acme"])
            .await
            .ok();
        admin
            .run(&[
                "apps",
                "create",
                "hello",
                "--org",
                "acme",
                "--project",
                "web",
            ])
            .await
            .ok();
        admin
            .run(&["envs", "create", "prod", "--org", "acme", "--app", "hello"])
            .await
            .ok();
        admin
            .with_env("VERGE_ORG", "acme")
            .with_env("VERGE_APP", "hello")
            .with_env("VERGE_ENV", "prod")
    }

    /// The CLI, as the admin.
    pub fn cli(&self) -> Cli {
        self.cli_as(&self.admin_token)
    }

    /// The CLI, as the holder of `token`.
    pub fn cli_as(&self, token: &str) -> Cli {
        Cli::new(self.config_dir.path()).target(&self.url, token)
    }

    /// A plain HTTP client for raw requests to this plane.
    pub fn http(&self) -> reqwest::Client {
        crate::init_tls();
        reqwest::Client::new()
    }

    /// Waits until the server is handling at least `n` requests besides the
    /// `/metrics` request that asks (its `verge_http_requests_in_flight`
    /// gauge), so that a test knows a request it sent is being served.
    pub async fn wait_in_flight(&self, n: i64) {
        let http = self.http();
        let url = self.endpoint("/metrics");
        crate::eventually(
            Duration::from_secs(10),
            &format!("{n} request(s) in flight"),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                    let gauge = text
                        .lines()
                        .find_map(|l| l.strip_prefix("verge_http_requests_in_flight "))?
                        .trim()
                        .parse::<i64>()
                        .ok()?;
                    (gauge > n).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits until the listener refuses connections: shutdown has begun.
    pub async fn wait_listener_closed(&self) {
        let addr = self
            .url
            .split("://")
            .nth(1)
            .expect("URL with a scheme")
            .to_string();
        crate::eventually(Duration::from_secs(10), "the listener to close", || {
            let addr = addr.clone();
            async move {
                tokio::net::TcpStream::connect(&addr)
                    .await
                    .is_err()
                    .then_some(())
            }
        })
        .await;
    }

    /// `{url}/{path}` for raw HTTP requests.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// Runs `verge ARGS` with `env` (isolated from the test's own `VERGE_*`)
/// until it prints `VERGE_SERVER=`; returns the process and its banner.
/// Its stderr is discarded; use [`ControlPlane`] when the log matters.
pub async fn spawn_daemon(args: &[&str], env: &[(&str, &str)]) -> (Child, Banner) {
    let mut cmd = crate::verge_command();
    // VERGE_TEST_DAEMON_LOG=FILE keeps the daemon's log (appended), for debugging.
    let stderr = match std::env::var_os("VERGE_TEST_DAEMON_LOG") {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
        None => Stdio::null(),
    };
    cmd.args(args).stdout(Stdio::piped()).stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn verge");
    let banner =
        read_banner_within(child.stdout.take().expect("piped stdout"), BANNER_TIMEOUT).await;
    (child, banner)
}

/// Sends `signal` to a daemon of [`spawn_daemon`] and waits (at most 30 s)
/// for its exit status.
pub async fn stop_daemon(mut child: Child, signal: libc::c_int) -> ExitStatus {
    let pid = child.id().expect("daemon still running") as libc::pid_t;
    // SAFETY: kill(2) with a valid signal on the pid of our own child, not yet reaped.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({signal}) failed");
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the daemon did not exit within 30s")
        .expect("wait for the daemon")
}

/// How long a start may take to print `VERGE_SERVER=`.
pub const BANNER_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a daemon's stdout until `VERGE_SERVER=`; `None` if it ends first.
///
/// Never hangs: past 60 s without the line it panics (prefer
/// [`read_banner_within`], which takes the deadline and panics on EOF too).
pub async fn read_banner(stdout: tokio::process::ChildStdout) -> Option<Banner> {
    match read_banner_until(stdout, Duration::from_secs(60)).await {
        Ok(banner) => Some(banner),
        Err(e @ BannerError::TimedOut { .. }) => panic!("verge {e}"),
        Err(BannerError::Eof { .. }) => None,
    }
}

/// Reads a daemon's stdout until `VERGE_SERVER=` and returns what it printed.
/// Panics, quoting the lines read so far, if the line does not come within
/// `deadline` or stdout ends first (the process exited).
pub async fn read_banner_within(stdout: tokio::process::ChildStdout, deadline: Duration) -> Banner {
    read_banner_until(stdout, deadline)
        .await
        .unwrap_or_else(|e| panic!("verge {e}"))
}

/// Why no banner came; `Display` reads after "verge ".
#[derive(Debug)]
enum BannerError {
    TimedOut { after: Duration, seen: Vec<String> },
    Eof { seen: Vec<String> },
}

impl std::fmt::Display for BannerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seen = match self {
            BannerError::TimedOut { after, seen } => {
                write!(f, "printed no VERGE_SERVER line within {after:?}")?;
                seen
            }
            BannerError::Eof { seen } => {
                write!(f, "closed stdout (exited?) before printing VERGE_SERVER")?;
                seen
            }
        };
        // Token lines are secrets of the test cluster only, but keep them out.
        write!(f, "\n--- stdout so far ---")?;
        if seen.is_empty() {
            write!(f, "\n(nothing)")?;
        }
        for line in seen {
            if line.starts_with("VERGE_TOKEN=") {
                write!(f, "\nVERGE_TOKEN=<redacted>")?;
            } else {
                write!(f, "\n{line}")?;
            }
        }
        Ok(())
    }
}

async fn read_banner_until(
    stdout: tokio::process::ChildStdout,
    deadline: Duration,
) -> Result<Banner, BannerError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut lines = BufReader::new(stdout).lines();
    let mut token = None;
    let mut cluster = None;
    let mut seen = Vec::new();
    loop {
        // `next_line` is cancel-safe: a timeout loses no line.
        let line = match tokio::time::timeout_at(until, lines.next_line()).await {
            Err(_) => {
                return Err(BannerError::TimedOut {
                    after: deadline,
                    seen,
                });
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) => return Err(BannerError::Eof { seen }),
        };
        if let Some(t) = line.strip_prefix("VERGE_TOKEN=") {
            token = Some(t.to_string());
        } else if let Some(c) = line.strip_prefix("VERGE_CLUSTER=") {
            cluster = Some(c.to_string());
        } else if let Some(s) = line.strip_prefix("VERGE_SERVER=") {
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(Banner {
                server: s.to_string(),
                token,
                cluster,
            });
        }
        seen.push(line);
    }
}
