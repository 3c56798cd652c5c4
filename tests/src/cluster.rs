//! A whole cluster for end-to-end tests, as root: a real control plane,
//! real `verge node` daemons in network namespaces ([`crate::nodes`]), a
//! real registry with the `hello` image, and real `verge ingress` daemons.
//!
//! Each [`Cluster`] takes its own instance prefix, endpoint prefix and
//! IPv4 endpoint address from a per-test tag, so tests run side by side.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Child;

use crate::cli::Cli;
use crate::control::{Backend, ControlPlane};
use crate::eventually;
use crate::nodes::{NodeHost, require_root, test_tag};
use crate::registry::Registry;

/// How long anything cluster-related may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// A control plane, a registry, and the CLI scoped to org acme, app hello,
/// env prod.
pub struct Cluster {
    pub cp: ControlPlane,
    pub registry: Registry,
    pub cli: Cli,
    pub tag: u16,
    /// The cluster's instance prefix.
    pub prefix: String,
    /// Where endpoint IPv6 addresses come from.
    pub endpoint_prefix: String,
    /// The one (shared) IPv4 endpoint address.
    pub endpoint_ipv4: Ipv4Addr,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts the control plane with `extra` arguments.
    pub async fn new(backend: Backend, extra: &[&str]) -> Cluster {
        require_root();
        let tag = test_tag();
        let prefix = format!("fd76:{tag:x}:{:x}::/48", tag.rotate_left(7));
        let endpoint_prefix = format!("fd65:{tag:x}:{:x}::/64", tag.rotate_left(5));
        // 127.0.0.0/8 is all local: any of it binds without a route.
        let endpoint_ipv4 = Ipv4Addr::new(
            127,
            100 + (tag >> 12) as u8,
            (tag >> 4) as u8,
            1 + (tag & 0xf) as u8,
        );
        let pool = format!("{endpoint_ipv4}/32");
        let mut args = vec![
            "--cluster-listen",
            "[::]:0",
            "--instance-prefix",
            prefix.as_str(),
            "--endpoint-prefix",
            &endpoint_prefix,
            "--endpoint-ipv4-pool",
            &pool,
            "--node-offline-after",
            "3s",
        ];
        args.extend_from_slice(extra);
        let cp = ControlPlane::start_with(backend, &args).await;
        let registry = Registry::start().await.expect("registry starts");
        let cli = cp.acme_hello_prod().await;
        Cluster {
            cp,
            registry,
            cli,
            tag,
            prefix,
            endpoint_prefix,
            endpoint_ipv4,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `verge ARGS -o json` as the acme CLI.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        self.cli.run(&args).await.json()
    }

    /// A node joined with a fresh token; `extra` goes to `verge node`.
    /// With `routed`, its instance prefix is routed from the host (so the
    /// ingress reaches its instances directly); without, only through the
    /// node's session (a node behind NAT).
    pub async fn node(&self, index: u8, name: &str, extra: &[&str], routed: bool) -> NodeHost {
        let mut node = NodeHost::create(self.tag, index, name);
        let token = self.join_token().await;
        node.forward_loopback(self.registry.port());
        node.start(&node.server_for(&self.cp.cluster), Some(&token), extra)
            .await;
        if routed {
            let d = self.json(&["nodes", "describe", name]).await;
            node.route_instances(d["instance_prefix"].as_str().expect("prefix"));
        }
        node
    }

    /// A fresh join token.
    pub async fn join_token(&self) -> String {
        let t = self.json(&["nodes", "join-token"]).await;
        t["token"].as_str().expect("token").to_string()
    }

    /// Deploys a manifest (`app = "hello"` is prepended); returns the CLI run.
    pub async fn deploy_raw(&self, manifest: &str) -> crate::cli::Run {
        let path = self.dir.path().join("verge.toml");
        std::fs::write(&path, format!("app = \"hello\"\n{manifest}")).unwrap();
        self.cli
            .run(&["deploy", "-f", path.to_str().unwrap(), "-o", "json"])
            .await
    }

    /// Deploys `web` (hello, `count` instances, `web_extra` lines) behind
    /// endpoint `public` (port 80 → 8080, `endpoint_extra` lines).
    pub async fn deploy(
        &self,
        image: &str,
        count: u32,
        web_extra: &str,
        endpoint_extra: &str,
    ) -> Value {
        let run = self
            .deploy_raw(&format!(
                "[workloads.web]\nimage = \"{image}\"\ncount = {count}\ncpu = 0.1\nmemory = \"64Mi\"\n{web_extra}\n\
                 [[endpoints]]\nname = \"public\"\nworkload = \"web\"\n{port}internal_port = 8080\n{endpoint_extra}\n",
                port = if endpoint_extra.contains("ports =") { "" } else { "port = 80\n" },
            ))
            .await;
        run.json()
    }

    /// Waits until `n` instances of web run and the rollout completed.
    pub async fn running(&self, n: usize) -> Vec<Value> {
        eventually(DEADLINE, &format!("{n} running instances"), || async {
            let s = self.json(&["status"]).await;
            let inst: Vec<Value> = s["workloads"][0]["instances"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|i| i["state"] == "running")
                .collect();
            (inst.len() == n && s["rollout"]["state"] == "completed").then_some(inst)
        })
        .await
    }

    /// `verge describe endpoint NAME`.
    pub async fn endpoint(&self, name: &str) -> Value {
        self.json(&["describe", "endpoint", name]).await
    }

    /// Starts `verge ingress` with the admin token; waits until it serves
    /// endpoint `name` with `backends` instances in rotation.
    pub async fn ingress(&self) -> Ingress {
        Ingress::start(
            &self.cp.url,
            &self.cp.admin_token,
            &format!("ing{:x}", self.tag),
        )
        .await
    }
}

/// A `verge ingress` process.
pub struct Ingress {
    child: Option<Child>,
    pub metrics: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
    server: String,
    token: String,
    name: String,
}

impl Ingress {
    pub async fn start(server: &str, token: &str, name: &str) -> Ingress {
        let dir = tempfile::tempdir().expect("ingress dir");
        // VERGE_TEST_DAEMON_LOG=FILE keeps the log (appended), for debugging.
        let log = std::env::var_os("VERGE_TEST_DAEMON_LOG")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.path().join("ingress.log"));
        let mut i = Ingress {
            child: None,
            metrics: String::new(),
            log,
            _dir: dir,
            server: server.to_string(),
            token: token.to_string(),
            name: name.to_string(),
        };
        i.restart().await;
        i
    }

    /// (Re)starts the process and waits for its `VERGE_INGRESS_METRICS=` line.
    pub async fn restart(&mut self) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("ingress log");
        let mut child = crate::verge_command()
            .args([
                "ingress",
                "--server",
                &self.server,
                "--token",
                &self.token,
                "--name",
                &self.name,
                "--metrics-listen",
                "127.0.0.1:0",
                "--shutdown-grace",
                "1s",
            ])
            .env("RUST_LOG", "info,verge_ingress=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn verge ingress");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let metrics = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(m) = l.strip_prefix("VERGE_INGRESS_METRICS=") {
                    return Some(m.to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("verge ingress did not start\n{}", self.log()));
        self.metrics = metrics;
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of the metric line starting with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// SIGTERM, and the exit status.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.take().expect("running");
        crate::control::stop_daemon(child, libc::SIGTERM).await
    }
}

/// `[addr]:port` of an endpoint's IPv6 address.
pub fn v6(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse::<Ipv6Addr>().expect("ipv6").into(), port)
}
