//! Scheduling, rollouts and node loss end to end, as root (issue 5): a real
//! control plane, up to three real `verge node` daemons with different
//! labels and capacities, each in a network namespace the test made, a real
//! registry with the `hello` image.
//!
//! - placement: spread across nodes, a region constraint, an unplaceable
//!   instance explained node by node (and the `instance.unplaced` event),
//!   a rollout that cannot place ending `failed` (`placement`) while the old
//!   release serves, and `verge deploy --dry-run` (a plan, no release);
//! - rollouts: a broken image (pinned by the control plane, refused to the
//!   nodes) fails with category `image_pull` while the old release keeps
//!   serving; `verge rollout cancel` returns to the old release; new
//!   instances failing their health check end the rollout `failed` with
//!   category `health`, and auto-rollback restores the previous release;
//! - node loss: `kill -9` of a node daemon, its instances replaced elsewhere
//!   within the offline + reschedule grace, and its stale copies stopped
//!   when it returns;
//! - drain: every instance moves off a node while some instance of the
//!   workload answers at every moment (its addresses are polled throughout),
//!   the node ends `drained`, takes no new instances until undrained.
//!
//! On failure every test prints the env's status, rollouts and events, the
//! cluster's nodes and events, and the logs of the control plane and nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use verge_tests::cli::{Cli, Run};
use verge_tests::control::{Backend, ControlPlane};
use verge_tests::nodes::{NodeHost, require_root, test_tag};
use verge_tests::registry::Registry;

/// How long anything node-related may take before a test gives up.
const DEADLINE: Duration = Duration::from_secs(60);

/// `--node-offline-after` and `--reschedule-after` of every control plane
/// here (heartbeats come every 2 s).
const OFFLINE_AFTER: Duration = Duration::from_secs(5);
const RESCHEDULE_AFTER: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_secs(2);

/// A health check the `hello` image passes (it listens on 8080).
const HEALTHY: &str = "health = { tcp = 8080, interval = \"500ms\", timeout = \"200ms\" }";
/// One it fails: nothing listens on 9999.
const UNHEALTHY: &str = "health = { tcp = 9999, interval = \"500ms\", timeout = \"200ms\" }";
const SMALL: &str = "memory = \"64Mi\"";

/// Fails the test with `msg` (a format string) and the cluster's state.
macro_rules! fail {
    ($w:expr, $($fmt:tt)+) => {{
        let msg = format!($($fmt)+);
        panic!("{msg}\n{}", $w.context().await)
    }};
}

/// Like `assert!`, with the cluster's state on failure.
macro_rules! ensure {
    ($w:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            fail!($w, $($fmt)+);
        }
    };
}

struct World {
    cp: ControlPlane,
    registry: Registry,
    /// Scoped to org acme, app hello, env prod.
    cli: Cli,
    tag: u16,
    /// Every node, with the extra arguments it starts with.
    nodes: Vec<(NodeHost, Vec<String>)>,
    /// Loopback ports forwarded into every node's namespace (registries).
    forwarded: Vec<u16>,
    dir: tempfile::TempDir,
    manifests: AtomicU32,
}

impl World {
    /// A control plane with the offline and reschedule graces above and
    /// `extra` arguments, a registry and org/app/env acme/hello/prod.
    async fn new(backend: Backend, extra: &[&str]) -> World {
        require_root();
        let tag = test_tag();
        let prefix = format!("fd76:{tag:x}:{:x}::/48", tag.rotate_left(5));
        let offline = format!("{}s", OFFLINE_AFTER.as_secs());
        let reschedule = format!("{}s", RESCHEDULE_AFTER.as_secs());
        let mut args = vec![
            "--cluster-listen",
            "[::]:0",
            "--instance-prefix",
            &prefix,
            "--node-offline-after",
            &offline,
            "--reschedule-after",
            &reschedule,
        ];
        args.extend_from_slice(extra);
        let cp = ControlPlane::start_with(backend, &args).await;
        let registry = Registry::start().await.expect("registry starts");
        let cli = cp.acme_hello_prod().await;
        let port = registry.port();
        World {
            cp,
            registry,
            cli,
            tag,
            nodes: Vec::new(),
            forwarded: vec![port],
            dir: tempfile::tempdir().expect("temp dir"),
            manifests: AtomicU32::new(0),
        }
    }

    /// Runs `verge ARGS -o json` in the env; fails the test when it fails.
    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let run = self.cli.run(&args).await;
        self.parse(&args, &run).await
    }

    /// The same as the cluster admin, without the env scope (nodes).
    async fn admin_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let run = self.cp.cli().run(&args).await;
        self.parse(&args, &run).await
    }

    async fn parse(&self, args: &[&str], run: &Run) -> Value {
        if !run.success() {
            fail!(
                self,
                "verge {args:?} failed ({}):\n{}{}",
                run.output.status,
                run.stderr(),
                run.stdout()
            );
        }
        match serde_json::from_str(&run.stdout()) {
            Ok(v) => v,
            Err(e) => fail!(
                self,
                "verge {args:?} printed no JSON ({e}):\n{}",
                run.stdout()
            ),
        }
    }

    /// Joins node `name` (namespace `index`) with a fresh token and `extra`
    /// arguments (labels, capacity), routes its instance prefix, forwards
    /// the registries into its namespace, and waits until it is online.
    async fn add_node(&mut self, index: u8, name: &str, extra: &[&str]) {
        let mut node = NodeHost::create(self.tag, index, name);
        let token = self.admin_json(&["nodes", "join-token"]).await["token"]
            .as_str()
            .expect("a join token")
            .to_string();
        for port in &self.forwarded {
            node.forward_loopback(*port);
        }
        node.start(&node.server_for(&self.cp.cluster), Some(&token), extra)
            .await;
        let d = self.node_json(name).await;
        node.route_instances(d["instance_prefix"].as_str().expect("instance prefix"));
        self.nodes
            .push((node, extra.iter().map(|s| s.to_string()).collect()));
        // Its daemon printed its line once joined; placement needs its session.
        self.wait_node_state(name, "online").await;
    }

    fn node_mut(&mut self, name: &str) -> &mut NodeHost {
        &mut self
            .nodes
            .iter_mut()
            .find(|(n, _)| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this test"))
            .0
    }

    /// `kill -9` of node `name`'s daemon.
    async fn kill9(&mut self, name: &str) {
        self.node_mut(name).kill9().await;
    }

    /// Starts node `name`'s daemon again, with the arguments it joined with.
    async fn restart_node(&mut self, name: &str) {
        let cluster = self.cp.cluster.clone();
        let (node, extra) = self
            .nodes
            .iter_mut()
            .find(|(n, _)| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this test"));
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        node.start(&node.server_for(&cluster), None, &extra).await;
    }

    async fn node_json(&self, name: &str) -> Value {
        self.admin_json(&["nodes", "describe", name]).await
    }

    async fn wait_node_state(&self, name: &str, state: &str) {
        self.until(DEADLINE, &format!("node {name} to be {state}"), || async {
            (self.node_json(name).await["state"] == state).then_some(())
        })
        .await;
    }

    /// Writes `text` to a manifest file of its own; returns its path.
    fn manifest_file(&self, text: &str) -> String {
        let n = self.manifests.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.path().join(format!("verge-{n}.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// `verge deploy -f <manifest> -o json FLAGS...`, not checked.
    async fn deploy_run(&self, manifest: &str, flags: &[&str]) -> Run {
        let path = self.manifest_file(manifest);
        let mut args = vec!["deploy", "-f", &path, "-o", "json"];
        args.extend_from_slice(flags);
        self.cli.run(&args).await
    }

    /// Deploys `manifest`; returns the receipt.
    async fn deploy(&self, manifest: &str) -> Value {
        let path = self.manifest_file(manifest);
        self.json(&["deploy", "-f", &path]).await
    }

    async fn status(&self) -> Value {
        self.json(&["status"]).await
    }

    async fn rollouts(&self) -> Vec<Value> {
        self.json(&["rollout", "list"])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn events(&self) -> Vec<Value> {
        self.json(&["events"])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn releases(&self) -> Vec<Value> {
        self.json(&["releases"])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the env runs release `release` (any when `None`) with
    /// rollout `completed` and exactly `n` instances, each running and
    /// healthy, of that release; returns the status and the instances.
    async fn converged(&self, n: usize, release: Option<i64>) -> (Value, Vec<Value>) {
        let what = match release {
            Some(r) => format!("v{r} converged: {n} running, healthy instances, rollout completed"),
            None => format!("{n} running, healthy instances, rollout completed"),
        };
        self.until(DEADLINE, &what, || async {
            let s = self.status().await;
            let current = s["release"]["number"].as_i64();
            if release.is_some() && current != release {
                return None;
            }
            let inst = instances(&s);
            let ok = s["rollout"]["state"] == "completed"
                && inst.len() == n
                && inst.iter().all(|i| {
                    i["state"] == "running"
                        && i["health"] == "healthy"
                        && i["release"].as_i64() == current
                });
            ok.then_some((s, inst))
        })
        .await
    }

    /// Polls `check` every 200 ms until it returns `Some`; after `within`
    /// fails the test naming `what`, with the cluster's state.
    async fn until<T, F, Fut>(&self, within: Duration, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if start.elapsed() > within {
                fail!(self, "timed out after {within:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What a failure message shows: the env's status, rollouts and events,
    /// the nodes, the cluster's events, and the tails of every log.
    async fn context(&self) -> String {
        let mut out = String::from("\n========== cluster state ==========\n");
        let env_runs: [&[&str]; 3] = [
            &["status", "-o", "json"],
            &["rollout", "list", "-o", "json"],
            &["events", "-o", "json"],
        ];
        for args in env_runs {
            let run = self.cli.run(args).await;
            out.push_str(&shown(args, &run));
        }
        let admin_runs: [&[&str]; 2] = [
            &["nodes", "list", "-o", "json"],
            &["events", "--all", "-o", "json"],
        ];
        for args in admin_runs {
            let run = self.cp.cli().run(args).await;
            out.push_str(&shown(args, &run));
        }
        for (node, _) in &self.nodes {
            out.push_str(&format!(
                "--- node {} log (tail) ---\n{}\n",
                node.name,
                tail(&node.log(), 60)
            ));
        }
        out.push_str(&format!(
            "--- control plane log (tail) ---\n{}\n",
            tail(&self.cp.log(), 120)
        ));
        out
    }
}

/// A CLI run for a failure message; event lists one line per event.
fn shown(args: &[&str], run: &Run) -> String {
    let mut out = format!("--- verge {} ---\n", args.join(" "));
    match serde_json::from_str::<Value>(&run.stdout()) {
        Ok(Value::Array(events)) if args[0] == "events" => {
            for e in events {
                out.push_str(&format!(
                    "{} {} {} [instance {} node {}]\n",
                    e["time"].as_str().unwrap_or("-"),
                    e["kind"].as_str().unwrap_or("-"),
                    e["message"].as_str().unwrap_or("-"),
                    e["instance"].as_str().unwrap_or("-"),
                    e["node"].as_str().unwrap_or("-"),
                ));
            }
        }
        Ok(v) => out.push_str(&format!("{v:#}\n")),
        Err(_) => out.push_str(&format!(
            "({}) {}{}\n",
            run.output.status,
            run.stdout(),
            run.stderr()
        )),
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn hello_image() -> verge_images::Image {
    let bin = verge_tests::hello_binary().await;
    verge_images::hello_image(&bin).expect("hello image")
}

/// `hello` with another digest than [`hello_image`]'s (an extra file, an
/// extra env var): a node that has `hello` cannot run it without pulling.
async fn private_hello_image() -> verge_images::Image {
    let bin = verge_tests::hello_binary().await;
    let layer = verge_images::Layer::from_files(&[
        verge_images::File::new("/hello".to_string(), std::fs::read(&bin).unwrap(), 0o755),
        verge_images::File::new("/private".to_string(), b"private\n".to_vec(), 0o644),
    ])
    .unwrap();
    let config = verge_images::ImageConfig {
        entrypoint: vec!["/hello".into()],
        cmd: vec!["--port".into(), "8080".into()],
        env: vec!["IMAGE=private".into()],
        exposed_ports: vec!["8080/tcp".into()],
    };
    verge_images::Image::build(&config, vec![layer]).unwrap()
}

/// A manifest of app hello with one workload `web` (`count`, 0.1 cores,
/// the given `lines`) behind endpoint `public` (port 80 → 8080).
fn web(image: &str, count: u32, lines: &[&str]) -> String {
    format!(
        "app = \"hello\"\n\n[workloads.web]\nimage = \"{image}\"\ncount = {count}\ncpu = 0.1\n{}\n\n\
         [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\ndrain_timeout = \"1s\"\n",
        lines.join("\n")
    )
}

/// The instances of workload `web` in a status.
fn instances(status: &Value) -> Vec<Value> {
    status["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == "web")
        .flat_map(|w| w["instances"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn ids(instances: &[Value]) -> BTreeSet<String> {
    instances
        .iter()
        .map(|i| i["id"].as_str().unwrap_or("-").to_string())
        .collect()
}

fn nodes_of(instances: &[Value]) -> Vec<String> {
    instances
        .iter()
        .map(|i| i["node"].as_str().unwrap_or("-").to_string())
        .collect()
}

fn addr(instance: &Value) -> String {
    instance["address"]
        .as_str()
        .unwrap_or_else(|| panic!("an address: {instance}"))
        .to_string()
}

/// Connects to `address` and returns the instance ID of its greeting
/// (`hello from instance <id>; ...`); `None` when nothing greets within
/// `within`.
async fn greeter(address: &str, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut stream = tokio::time::timeout(within, tokio::net::TcpStream::connect(address))
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let rest = text.strip_prefix("hello from instance ")?;
    Some(
        rest.split(|c: char| c == ';' || c.is_whitespace())
            .next()?
            .to_string(),
    )
}

/// Waits until `instance` answers at its address with its own ID.
async fn wait_greeting(w: &World, instance: &Value) {
    let (a, id) = (addr(instance), instance["id"].as_str().unwrap().to_string());
    w.until(
        DEADLINE,
        &format!("instance {id} to greet at {a}"),
        || async {
            (greeter(&a, Duration::from_secs(2)).await.as_deref() == Some(id.as_str()))
                .then_some(())
        },
    )
    .await;
}

/// Waits until nothing answers at `address` any more.
async fn wait_silent(w: &World, address: &str, what: &str) {
    w.until(DEADLINE, what, || async {
        greeter(address, Duration::from_secs(1))
            .await
            .is_none()
            .then_some(())
    })
    .await;
}

/// One round of a [`Watcher`]: which instances answered, of which addresses.
#[derive(Debug)]
struct Sample {
    at: Duration,
    tried: BTreeSet<String>,
    answered: BTreeSet<String>,
}

/// Polls the env's instances all the time: each round reads `verge status`,
/// then connects to every address of this status and of the previous one
/// (an instance that left between two reads is still tried once).
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Watcher {
    fn start(cli: Cli) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut previous = BTreeSet::new();
            while !stopping.load(Ordering::SeqCst) {
                let run = cli.run(&["status", "-o", "json"]).await;
                let Ok(status) = serde_json::from_str::<Value>(&run.stdout()) else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let current: BTreeSet<String> = instances(&status)
                    .iter()
                    .filter_map(|i| i["address"].as_str().map(str::to_string))
                    .collect();
                let tried: BTreeSet<String> = current.union(&previous).cloned().collect();
                let mut set = tokio::task::JoinSet::new();
                for a in tried.clone() {
                    set.spawn(async move { greeter(&a, Duration::from_secs(1)).await });
                }
                let mut answered = BTreeSet::new();
                while let Some(r) = set.join_next().await {
                    if let Ok(Some(id)) = r {
                        answered.insert(id);
                    }
                }
                samples.push(Sample {
                    at: start.elapsed(),
                    tried,
                    answered,
                });
                previous = current;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        });
        Watcher { stop, task }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("watcher task")
    }
}

/// The samples in which nothing answered, and every instance seen answering.
fn silences(samples: &[Sample]) -> (Vec<&Sample>, BTreeSet<String>) {
    let silent = samples.iter().filter(|s| s.answered.is_empty()).collect();
    let seen = samples
        .iter()
        .flat_map(|s| s.answered.iter().cloned())
        .collect();
    (silent, seen)
}

// ---------------------------------------------------------------------------
// Placement: spread, regions, explanations, dry runs.
// ---------------------------------------------------------------------------

verge_tests::on_both_backends!(placement_spreads_follows_regions_explains_and_dry_runs);

async fn placement_spreads_follows_regions_explains_and_dry_runs(backend: Backend) {
    let mut w = World::new(backend, &[]).await;
    w.add_node(1, "n1", &["--label", "region=eu-west", "--memory", "256Mi"])
        .await;
    w.add_node(2, "n2", &["--label", "region=eu-west", "--memory", "384Mi"])
        .await;
    w.add_node(3, "n3", &["--label", "region=us-east"]).await;
    let image = w.registry.push_hello().await;

    // Spread: three instances, one per node.
    w.deploy(&web(&image, 3, &[SMALL, HEALTHY])).await;
    let (_, v1) = w.converged(3, Some(1)).await;
    let on: BTreeSet<String> = nodes_of(&v1).into_iter().collect();
    ensure!(
        w,
        on == BTreeSet::from(["n1".into(), "n2".into(), "n3".into()]),
        "3 instances spread one per node over n1, n2, n3; they are on {:?}",
        nodes_of(&v1)
    );
    for i in &v1 {
        wait_greeting(&w, i).await;
    }

    // A dry run plans the region-constrained deploy and changes nothing.
    let eu = web(
        &image,
        2,
        &[SMALL, HEALTHY, "constraints = { region = \"eu-west\" }"],
    );
    let releases_before = w.releases().await.len();
    let run = w.deploy_run(&eu, &["--dry-run"]).await;
    let plan = w.parse(&["deploy", "--dry-run"], &run).await;
    ensure!(
        w,
        plan["dry_run"] == true,
        "a dry-run receipt says \"dry_run\": true: {plan:#}"
    );
    let wp = &plan["plan"]["workloads"][0];
    ensure!(
        w,
        wp["name"] == "web" && wp["count"] == 2,
        "the plan has workload web with count 2: {plan:#}"
    );
    let planned: Vec<String> = wp["placements"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["node"].as_str().unwrap_or("(none)").to_string())
        .collect();
    let planned_set: BTreeSet<String> = planned.iter().cloned().collect();
    ensure!(
        w,
        planned.len() == 2 && planned_set == BTreeSet::from(["n1".into(), "n2".into()]),
        "the plan places the 2 eu-west instances one on n1 and one on n2 (not n3, region us-east); planned {planned:?}: {plan:#}"
    );
    let replaced: BTreeSet<String> = wp["replaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["instance"].as_str().unwrap_or("-").to_string())
        .collect();
    ensure!(
        w,
        replaced == ids(&v1),
        "the plan replaces the 3 running instances {:?}; it lists {replaced:?}",
        ids(&v1)
    );
    let after = w.status().await;
    ensure!(
        w,
        w.releases().await.len() == releases_before
            && after["release"]["number"] == 1
            && ids(&instances(&after)) == ids(&v1),
        "a dry run creates no release and touches no instance (still v1 with {:?})",
        ids(&v1)
    );
    // A dry run of something unplaceable says why, node by node.
    let run = w
        .deploy_run(
            &web(
                &image,
                1,
                &[
                    "memory = \"512Mi\"",
                    HEALTHY,
                    "constraints = { region = \"eu-west\" }",
                ],
            ),
            &["--dry-run"],
        )
        .await;
    let plan = w.parse(&["deploy", "--dry-run"], &run).await;
    let p = &plan["plan"]["workloads"][0]["placements"][0];
    let reason = p["reason"].as_str().unwrap_or_default();
    ensure!(
        w,
        p["node"].is_null()
            && reason.contains("node n1: insufficient memory (needs 512Mi")
            && reason.contains("node n2: insufficient memory (needs 512Mi")
            && reason.contains("node n3: label region=us-east does not match eu-west"),
        "an unplaceable planned slot has no node and a reason per node \
         (n1, n2: insufficient memory; n3: label region=us-east does not match eu-west): {p}"
    );
    ensure!(
        w,
        w.releases().await.len() == releases_before,
        "dry runs create no release"
    );

    // The region constraint, for real: both instances on eu-west nodes.
    w.deploy(&eu).await;
    let (_, v2) = w.converged(2, Some(2)).await;
    let on: BTreeSet<String> = nodes_of(&v2).into_iter().collect();
    ensure!(
        w,
        on == BTreeSet::from(["n1".into(), "n2".into()]),
        "constraint region=eu-west: one instance on n1 and one on n2, none on n3 (us-east); they are on {:?}",
        nodes_of(&v2)
    );
    let on_n3 = v1.iter().find(|i| i["node"] == "n3").unwrap();
    wait_silent(
        &w,
        &addr(on_n3),
        "the v1 instance on n3 (us-east) to stop serving",
    )
    .await;
    for i in &v2 {
        wait_greeting(&w, i).await;
    }

    // Unplaceable (as many instances as v2 has, so that none of v2's is
    // surplus): explained per node, an event, the old release serves, and
    // after the rollout deadline the rollout fails with `placement`.
    w.deploy(&web(
        &image,
        2,
        &[
            "memory = \"512Mi\"",
            HEALTHY,
            "constraints = { region = \"eu-west\" }",
            "rollout = { max_surge = 1, max_unavailable = 0, deadline = \"8s\" }",
        ],
    ))
    .await;
    let pending = w
        .until(
            DEADLINE,
            "an unplaced (pending, no node) instance of v3",
            || async {
                instances(&w.status().await)
                    .into_iter()
                    .find(|i| i["release"] == 3 && i["node"].is_null())
            },
        )
        .await;
    let reason = pending["reason"].as_str().unwrap_or_default();
    for expected in [
        "node n1: insufficient memory (needs 512Mi",
        "node n2: insufficient memory (needs 512Mi",
        "node n3: label region=us-east does not match eu-west",
    ] {
        ensure!(
            w,
            pending["state"] == "pending" && reason.contains(expected),
            "the unplaced instance is pending with a reason containing {expected:?}: {pending}"
        );
    }
    ensure!(
        w,
        reason.contains("to fix: lower the memory of web"),
        "the explanation ends with a fix for the most common problem (memory): {reason}"
    );
    let described = w.json(&["describe", "workload", "web"]).await["status"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|i| i["id"] == pending["id"])
        .unwrap_or_default();
    ensure!(
        w,
        described["reason"] == pending["reason"],
        "`verge describe workload web` explains the pending instance as status does: {described}"
    );
    let unplaced = w
        .events()
        .await
        .into_iter()
        .find(|e| e["kind"] == "instance.unplaced" && e["instance"] == pending["id"]);
    ensure!(
        w,
        unplaced.is_some(),
        "an instance.unplaced event for {}",
        pending["id"]
    );
    let failed = w
        .until(
            DEADLINE,
            "the v3 rollout to end failed (deadline 8s)",
            || async {
                let s = w.status().await;
                (s["rollout"]["release"] == 3 && s["rollout"]["state"] == "failed").then_some(s)
            },
        )
        .await;
    ensure!(
        w,
        failed["rollout"]["category"] == "placement",
        "a rollout that could not place fails with category placement: {:#}",
        failed["rollout"]
    );
    for i in &v2 {
        ensure!(
            w,
            greeter(&addr(i), Duration::from_secs(2)).await.as_deref() == i["id"].as_str(),
            "v2 instance {} still serves after v3 could not be placed",
            i["id"]
        );
    }
}

// ---------------------------------------------------------------------------
// Rollouts: a broken image, cancel, failing health with auto-rollback.
// ---------------------------------------------------------------------------

/// A `hello` image the control plane can pin (it has credentials for the
/// private registry) but the nodes cannot pull (they have none: 401).
#[tokio::test]
async fn a_broken_image_fails_with_image_pull_and_cancel_returns_to_the_old_release() {
    require_root();
    let private = Registry::start_with_basic_auth()
        .await
        .expect("private registry");
    let secrets = tempfile::tempdir().unwrap();
    let auth = secrets.path().join("registry-auth");
    private.write_basic_auth_file(&auth);
    let auth_arg = auth.display().to_string();
    let mut w = World::new(Backend::Sqlite, &["--registry-auth-file", &auth_arg]).await;
    w.forwarded.push(private.port());
    w.add_node(1, "n1", &["--label", "region=eu-west"]).await;
    w.add_node(2, "n2", &["--label", "region=eu-west"]).await;
    let image = w.registry.push_hello().await;
    let broken = format!("{}/private/hello:1", private.host());
    let creds = oci_client::secrets::RegistryAuth::Basic(
        verge_tests::registry::BASIC_USER.into(),
        verge_tests::registry::BASIC_PASSWORD.into(),
    );
    let private_digest =
        verge_images::push_with_auth(&private_hello_image().await, &broken, &creds)
            .await
            .expect("push to the private registry");
    // The same push again: answers the digest of what is there.
    let public_digest = verge_images::push(&hello_image().await, &image)
        .await
        .expect("push hello again");
    assert_ne!(
        public_digest, private_digest,
        "the private image must not be one the nodes already hold"
    );

    w.deploy(&web(&image, 2, &[SMALL, HEALTHY])).await;
    let (_, v1) = w.converged(2, Some(1)).await;
    for i in &v1 {
        wait_greeting(&w, i).await;
    }

    // Cancel: v2 cannot be placed (100Gi), so its rollout stays active
    // until canceled; a `deploy --wait` on it ends non-zero.
    let path = w.manifest_file(&web(&image, 2, &["memory = \"100Gi\"", HEALTHY]));
    let cli = w.cli.clone();
    let waiting = tokio::spawn(async move {
        cli.run(&[
            "deploy",
            "-f",
            &path,
            "-o",
            "json",
            "--wait",
            "--timeout",
            "50s",
        ])
        .await
    });
    w.until(
        DEADLINE,
        "the v2 rollout to be active (pending or in_progress)",
        || async {
            let s = w.status().await;
            (s["release"]["number"] == 2
                && matches!(
                    s["rollout"]["state"].as_str(),
                    Some("pending" | "in_progress")
                ))
            .then_some(())
        },
    )
    .await;
    let canceled = w.json(&["rollout", "cancel"]).await;
    ensure!(
        w,
        canceled["state"] == "canceled"
            && canceled["release"] == 2
            && canceled["from_release"] == 1,
        "`verge rollout cancel` answers the v2 rollout (from v1), now canceled: {canceled:#}"
    );
    let started = Instant::now();
    let run = tokio::time::timeout(DEADLINE, waiting)
        .await
        .unwrap_or_else(|_| {
            panic!("`verge deploy --wait` still waits {DEADLINE:?} after the cancel")
        })
        .unwrap();
    ensure!(
        w,
        !run.success() && started.elapsed() < Duration::from_secs(30),
        "`verge deploy --wait` of the canceled v2 exits non-zero soon after the cancel \
         (exit {}, after {:?}); stderr: {}",
        run.output.status,
        started.elapsed(),
        run.stderr()
    );
    let (_, back) = w.converged(2, Some(1)).await;
    ensure!(
        w,
        ids(&back) == ids(&v1),
        "after the cancel the env is back on v1 with its instances untouched: {:?}, expected {:?}",
        ids(&back),
        ids(&v1)
    );
    let rollouts = w.rollouts().await;
    let pos_canceled = rollouts
        .iter()
        .position(|r| r["release"] == 2 && r["state"] == "canceled");
    let pos_back = rollouts
        .iter()
        .position(|r| r["kind"] == "cancel" && r["release"] == 1 && r["from_release"] == 2);
    ensure!(
        w,
        matches!((pos_back, pos_canceled), (Some(b), Some(c)) if b < c),
        "`verge rollout list` (newest first) shows the cancel rollout back to v1 before the \
         canceled v2 rollout: positions {pos_back:?} and {pos_canceled:?}"
    );
    let again = w.cli.run(&["rollout", "cancel", "-o", "json"]).await;
    ensure!(
        w,
        !again.success(),
        "`verge rollout cancel` without an active rollout fails; it printed {}",
        again.stdout()
    );

    // A broken image: pinned by the control plane, refused to the nodes.
    let run = w
        .deploy_run(
            &web(
                &broken,
                2,
                &[
                    SMALL,
                    HEALTHY,
                    "rollout = { max_surge = 1, max_unavailable = 0, deadline = \"20s\" }",
                ],
            ),
            &["--wait", "--timeout", "50s"],
        )
        .await;
    ensure!(
        w,
        !run.success(),
        "`verge deploy --wait` of an image the nodes cannot pull exits non-zero; stdout: {}",
        run.stdout()
    );
    ensure!(
        w,
        !run.stderr().contains("timed out"),
        "`verge deploy --wait` ends because the rollout failed, not on its timeout: {}",
        run.stderr()
    );
    let s = w.status().await;
    let number = s["release"]["number"].as_i64().unwrap_or_default();
    ensure!(
        w,
        number >= 3
            && s["rollout"]["release"] == number
            && s["rollout"]["state"] == "failed"
            && s["rollout"]["category"] == "image_pull",
        "the rollout of the broken image ends failed with category image_pull: {:#}",
        s["rollout"]
    );
    let new: Vec<Value> = instances(&s)
        .into_iter()
        .filter(|i| i["release"] == number)
        .collect();
    ensure!(
        w,
        new.iter().any(|i| i["state"] == "failed"
            && i["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("image_pull")),
        "an instance of the broken release failed with reason image_pull: ...: {new:?}"
    );
    for i in &v1 {
        ensure!(
            w,
            greeter(&addr(i), Duration::from_secs(2)).await.as_deref() == i["id"].as_str(),
            "v1 instance {} keeps serving while the broken image fails to pull",
            i["id"]
        );
    }
    let old_running: BTreeSet<String> = instances(&s)
        .into_iter()
        .filter(|i| i["release"] == 1 && i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    ensure!(
        w,
        old_running == ids(&v1),
        "status still shows both v1 instances running: {old_running:?}"
    );
    ensure!(
        w,
        !w.rollouts()
            .await
            .iter()
            .any(|r| r["kind"] == "auto_rollback"),
        "without auto_rollback no auto_rollback rollout happens"
    );

    // Supersede: a deploy while a rollout is in progress takes over; the
    // earlier rollout ends canceled, naming its successor, and the new one
    // completes with full counts.
    let stuck = w
        .deploy(&web(&image, 2, &["memory = \"100Gi\"", HEALTHY]))
        .await;
    let stuck_number = stuck["release"]["number"].as_i64().unwrap();
    w.until(DEADLINE, "the unplaceable rollout to be active", || async {
        let s = w.status().await;
        (s["rollout"]["release"] == stuck_number
            && matches!(
                s["rollout"]["state"].as_str(),
                Some("pending" | "in_progress")
            ))
        .then_some(())
    })
    .await;
    // Without a terminal, `--wait` prints the env's events as lines.
    let path = w.manifest_file(&web(
        &image,
        2,
        &[SMALL, HEALTHY, "restart = \"on-failure\""],
    ));
    let run = w.cli.run(&["deploy", "-f", &path, "--wait"]).await;
    ensure!(
        w,
        run.success()
            && run.stderr().contains(" instance.placed ")
            && run.stderr().contains(" rollout.completed "),
        "`verge deploy --wait` without a terminal succeeds and prints the events \
         (instance.placed, rollout.completed) as lines; stderr: {}",
        run.stderr()
    );
    let good_number = w.status().await["release"]["number"].as_i64().unwrap();
    let (s, _) = w.converged(2, Some(good_number)).await;
    ensure!(
        w,
        s["rollout"]["release"] == good_number
            && s["rollout"]["done"] == 2
            && s["rollout"]["total"] == 2
            && s["rollout"]["failed"] == 0
            && s["rollout"]["success_rate"] == 1.0,
        "the superseding rollout completes with 2 of 2 done: {:#}",
        s["rollout"]
    );
    let rollouts = w.rollouts().await;
    let superseded = rollouts
        .iter()
        .find(|r| r["release"] == stuck_number)
        .cloned()
        .unwrap_or_default();
    ensure!(
        w,
        superseded["state"] == "canceled"
            && superseded["reason"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("superseded by v{good_number}")),
        "the rollout in progress ends canceled, superseded by v{good_number}: {superseded:#}"
    );

    // On a terminal, `--wait` draws a progress bar (done of total) instead.
    let path = w.manifest_file(&web(&image, 2, &[SMALL, HEALTHY]));
    let run = w
        .cli
        .run_on_terminal(&["deploy", "-f", &path, "--wait"])
        .await;
    let shown = run.stdout();
    ensure!(
        w,
        run.success() && shown.contains("/2 done") && !shown.contains(" instance.placed "),
        "`verge deploy --wait` on a terminal succeeds with a progress bar (\"N/2 done\") and \
         no event lines; it showed: {shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_new_instances_fail_with_health_and_auto_rollback_restores_the_old_release() {
    let mut w = World::new(Backend::Sqlite, &[]).await;
    w.add_node(1, "n1", &[]).await;
    w.add_node(2, "n2", &[]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&web(&image, 2, &[SMALL, HEALTHY])).await;
    let (_, v1) = w.converged(2, Some(1)).await;
    for i in &v1 {
        wait_greeting(&w, i).await;
    }

    let watcher = Watcher::start(w.cli.clone());
    let run = w
        .deploy_run(
            &web(
                &image,
                2,
                &[
                    SMALL,
                    UNHEALTHY,
                    "rollout = { max_surge = 1, max_unavailable = 0, auto_rollback = true, deadline = \"15s\" }",
                ],
            ),
            &["--wait", "--timeout", "50s"],
        )
        .await;
    ensure!(
        w,
        !run.success(),
        "`verge deploy --wait` of a release whose instances fail health exits non-zero; stdout: {}",
        run.stdout()
    );
    let failed = w
        .until(DEADLINE, "the v2 rollout to end failed", || async {
            w.rollouts()
                .await
                .into_iter()
                .find(|r| r["release"] == 2 && r["state"] == "failed")
        })
        .await;
    ensure!(
        w,
        failed["category"] == "health",
        "the v2 rollout failed with category health: {failed:#}"
    );
    let back = w
        .until(
            DEADLINE,
            "an auto_rollback rollout from v2 back to v1",
            || async {
                w.rollouts()
                    .await
                    .into_iter()
                    .find(|r| r["kind"] == "auto_rollback")
            },
        )
        .await;
    ensure!(
        w,
        back["release"] == 1 && back["from_release"] == 2,
        "auto-rollback rolls from v2 back to v1: {back:#}"
    );
    let (_, restored) = w.converged(2, Some(1)).await;
    let samples = watcher.finish().await;
    for i in &restored {
        wait_greeting(&w, i).await;
    }
    let events = w.events().await;
    ensure!(
        w,
        events.iter().any(|e| e["kind"] == "rollout.auto_rollback"),
        "a rollout.auto_rollback event"
    );
    let (silent, _) = silences(&samples);
    ensure!(
        w,
        !samples.is_empty() && silent.is_empty(),
        "some instance answered at every moment of the failed rollout and the auto-rollback \
         ({} polls); nothing answered in: {silent:?}",
        samples.len()
    );
}

// ---------------------------------------------------------------------------
// Node loss.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_lost_node_is_replaced_elsewhere_and_its_stale_copies_stop_when_it_returns() {
    let mut w = World::new(Backend::Sqlite, &[]).await;
    w.add_node(1, "n1", &["--label", "region=eu-west"]).await;
    w.add_node(2, "n2", &["--label", "region=eu-west"]).await;
    w.add_node(3, "n3", &["--label", "region=us-east"]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&web(&image, 2, &[SMALL, HEALTHY])).await;
    let (_, before) = w.converged(2, Some(1)).await;
    let on: BTreeSet<String> = nodes_of(&before).into_iter().collect();
    ensure!(
        w,
        on.len() == 2,
        "2 instances on 2 different nodes: {:?}",
        nodes_of(&before)
    );
    for i in &before {
        wait_greeting(&w, i).await;
    }
    let stale = before[0].clone();
    let victim = stale["node"].as_str().unwrap().to_string();
    let stale_addr = addr(&stale);

    w.kill9(&victim).await;
    let killed = Instant::now();
    ensure!(
        w,
        greeter(&stale_addr, Duration::from_secs(2))
            .await
            .as_deref()
            == stale["id"].as_str(),
        "the instance on {victim} serves on with its node daemon killed"
    );
    // Offline after the grace (plus a heartbeat), then replaced after the
    // reschedule grace: allow that, plus time to pull, start and pass health.
    let bound = OFFLINE_AFTER + HEARTBEAT + RESCHEDULE_AFTER + Duration::from_secs(20);
    let replaced = w
        .until(
            bound,
            &format!("the instance on {victim} to be replaced by a running, healthy one elsewhere"),
            || async {
                let s = w.status().await;
                let elsewhere: Vec<Value> = instances(&s)
                    .into_iter()
                    .filter(|i| {
                        i["node"] != victim.as_str()
                            && i["state"] == "running"
                            && i["health"] == "healthy"
                    })
                    .collect();
                (elsewhere.len() == 2).then_some(elsewhere)
            },
        )
        .await;
    let took = killed.elapsed();
    ensure!(
        w,
        w.node_json(&victim).await["state"] == "offline",
        "{victim} is offline once its instance was replaced"
    );
    let spread: BTreeSet<String> = nodes_of(&replaced).into_iter().collect();
    ensure!(
        w,
        spread.len() == 2 && !spread.contains(&victim),
        "the replacement goes to the node without an instance of web (spread), not {victim}: {:?}",
        nodes_of(&replaced)
    );
    eprintln!("replaced {took:?} after kill -9 (bound {bound:?})");
    for i in &replaced {
        wait_greeting(&w, i).await;
    }
    let replacement = replaced
        .iter()
        .find(|i| !ids(&before).contains(i["id"].as_str().unwrap()))
        .cloned();
    ensure!(
        w,
        replacement.is_some(),
        "a new instance replaced {}: {replaced:?}",
        stale["id"]
    );

    // The node returns: its stale copy stops, nothing runs on it.
    w.restart_node(&victim).await;
    w.wait_node_state(&victim, "online").await;
    wait_silent(
        &w,
        &stale_addr,
        &format!("the stale copy {} on {victim} to stop serving", stale["id"]),
    )
    .await;
    let (_, after) = w.converged(2, Some(1)).await;
    ensure!(
        w,
        ids(&after) == ids(&replaced),
        "after {victim} returned the env keeps the 2 instances running elsewhere {:?} and \
         the stale {} is gone; status has {:?}",
        ids(&replaced),
        stale["id"],
        ids(&after)
    );
    w.until(
        DEADLINE,
        &format!("{victim} to hold no instance"),
        || async { (w.node_json(&victim).await["instances"] == 0).then_some(()) },
    )
    .await;
    let stopped = w
        .events()
        .await
        .into_iter()
        .any(|e| e["kind"] == "instance.stopped" && e["instance"] == stale["id"]);
    ensure!(
        w,
        stopped,
        "an instance.stopped event for the stale copy {}",
        stale["id"]
    );
}

// ---------------------------------------------------------------------------
// Drain.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_moves_everything_off_it_without_a_moment_of_zero_healthy() {
    let mut w = World::new(Backend::Sqlite, &[]).await;
    // Both instances land on n1, the only node at deploy time.
    w.add_node(1, "n1", &[]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&web(&image, 2, &[SMALL, HEALTHY])).await;
    let (_, before) = w.converged(2, Some(1)).await;
    ensure!(
        w,
        nodes_of(&before).iter().all(|n| n == "n1"),
        "both instances on n1, the only node: {:?}",
        nodes_of(&before)
    );
    w.add_node(2, "n2", &[]).await;
    w.add_node(3, "n3", &[]).await;
    for i in &before {
        wait_greeting(&w, i).await;
    }
    let on_n1: Vec<Value> = instances(&w.status().await)
        .into_iter()
        .filter(|i| i["node"] == "n1")
        .collect();
    ensure!(
        w,
        !on_n1.is_empty(),
        "instances still on n1 after n2 and n3 joined"
    );

    let watcher = Watcher::start(w.cli.clone());
    let drain = w
        .admin_json(&["nodes", "drain", "n1", "--deadline", "1m"])
        .await;
    ensure!(
        w,
        matches!(drain["drain"].as_str(), Some("draining" | "drained")),
        "`verge nodes drain n1` answers the node, draining: {drain:#}"
    );
    w.until(DEADLINE, "n1 to be drained", || async {
        let list = w.admin_json(&["nodes", "list"]).await;
        list.as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == "n1" && n["drain"] == "drained")
            .then_some(())
    })
    .await;
    let (_, after) = w.converged(2, Some(1)).await;
    let samples = watcher.finish().await;
    let on: BTreeSet<String> = nodes_of(&after).into_iter().collect();
    ensure!(
        w,
        on == BTreeSet::from(["n2".into(), "n3".into()]),
        "after the drain one instance on n2 and one on n3, none on n1: {:?}",
        nodes_of(&after)
    );
    ensure!(
        w,
        w.node_json("n1").await["instances"] == 0,
        "drained n1 holds no instance"
    );
    for i in &after {
        wait_greeting(&w, i).await;
    }
    for i in &on_n1 {
        wait_silent(&w, &addr(i), "the drained instance to stop serving").await;
    }
    let (silent, seen) = silences(&samples);
    let moved: BTreeSet<String> = ids(&on_n1).union(&ids(&after)).cloned().collect();
    ensure!(
        w,
        silent.is_empty(),
        "some instance of web answered at every moment of the drain ({} polls); \
         nothing answered in: {silent:?}",
        samples.len()
    );
    ensure!(
        w,
        samples.len() >= 5 && moved.is_subset(&seen),
        "the drain was watched: {} polls saw {seen:?} answer, expected the drained {:?} and their \
         replacements {:?}",
        samples.len(),
        ids(&on_n1),
        ids(&after)
    );
    let timeline: BTreeMap<u128, (usize, usize)> = samples
        .iter()
        .map(|s| (s.at.as_millis(), (s.answered.len(), s.tried.len())))
        .collect();
    eprintln!("over the drain, ms → (instances answering, addresses tried): {timeline:?}");

    // Drained: new instances go elsewhere; undrained: it takes them again.
    w.json(&["scale", "web=4"]).await;
    let (_, four) = w.converged(4, Some(1)).await;
    ensure!(
        w,
        !nodes_of(&four).contains(&"n1".to_string()),
        "no new instance on drained n1: {:?}",
        nodes_of(&four)
    );
    let undrained = w.admin_json(&["nodes", "undrain", "n1"]).await;
    ensure!(
        w,
        undrained["drain"].is_null(),
        "`verge nodes undrain n1` makes it schedulable (drain null): {undrained:#}"
    );
    w.json(&["scale", "web=5"]).await;
    let (_, five) = w.converged(5, Some(1)).await;
    ensure!(
        w,
        nodes_of(&five).contains(&"n1".to_string()),
        "the fifth instance goes to the undrained, empty n1 (spread): {:?}",
        nodes_of(&five)
    );
}
