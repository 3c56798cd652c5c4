//! Nodes end to end, as root: a real control plane, real `verge node`
//! daemons each in a network namespace the test made, a real registry with
//! the `hello` image, real cgroups, namespaces, overlayfs and veths.
//!
//! Joining (and refusing bad tokens and a foreign CA), liveness (offline
//! within the grace period, online again), placement across two nodes,
//! connecting to each instance's private address, kill -9 of a node daemon
//! leaving its instances serving and re-adopted, an offline node returning
//! to a changed desired set, OOM kills reported as `oom`, and nothing left
//! behind.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use verge_images::{File, Image, ImageConfig, Layer};
use verge_tests::cluster::Cluster;
use verge_tests::control::Backend;
use verge_tests::eventually;
use verge_tests::nodes::{NodeHost, greet};

/// How long anything node-related may take before a test gives up.
const DEADLINE: Duration = verge_tests::cluster::DEADLINE;

/// The shared cluster harness, with this file's defaults: nodes routed,
/// `web` behind endpoint `public` with a 1 s drain.
struct World(Cluster);

impl std::ops::Deref for World {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl World {
    async fn new(backend: Backend) -> World {
        World(Cluster::new(backend, &[]).await)
    }

    /// A node joined with a fresh token and `labels`, its instance prefix routed.
    async fn node(&self, index: u8, name: &str, labels: &[&str]) -> NodeHost {
        let mut extra = Vec::new();
        for l in labels {
            extra.extend(["--label", l]);
        }
        self.0.node(index, name, &extra, true).await
    }

    async fn node_json(&self, name: &str) -> Value {
        self.json(&["nodes", "describe", name]).await
    }

    async fn wait_node_state(&self, name: &str, state: &str) {
        eventually(DEADLINE, &format!("node {name} {state}"), || async {
            (self.node_json(name).await["state"] == state).then_some(())
        })
        .await;
    }

    /// Deploys `web` with `extra` manifest lines; returns the receipt.
    async fn deploy(&self, image: &str, count: u32, extra: &str) -> Value {
        self.0
            .deploy(image, count, extra, "drain_timeout = \"1s\"")
            .await
    }

    async fn status(&self) -> Value {
        self.json(&["status"]).await
    }

    async fn events(&self) -> Vec<Value> {
        self.json(&["events"])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every event of the cluster (node events belong to no org).
    async fn cluster_events(&self) -> Vec<Value> {
        let run = self.cp.cli().run(&["events", "--all", "-o", "json"]).await;
        run.json().as_array().cloned().unwrap_or_default()
    }
}

verge_tests::on_both_backends!(
    two_nodes_join_and_serve_hello_on_private_addresses,
    a_killed_daemon_leaves_instances_serving_goes_offline_and_readopts_on_return,
);

async fn two_nodes_join_and_serve_hello_on_private_addresses(backend: Backend) {
    let w = World::new(backend).await;
    let n1 = w.node(1, "n1", &["region=eu-west"]).await;
    let n2 = w.node(2, "n2", &["region=us-east"]).await;
    let nodes = w.json(&["nodes", "list"]).await;
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}\n{}", w.cp.log());
    for n in nodes {
        assert_eq!(n["state"], "online", "{n}");
        assert_eq!(n["isolation"], "namespaces");
        assert!(
            n["cpu"].as_f64().unwrap() >= 1.0 && n["memory"].as_u64().unwrap() > 0,
            "{n}"
        );
        assert!(n["last_seen"].is_string(), "{n}");
    }
    assert_eq!(w.node_json("n1").await["labels"]["region"], "eu-west");
    let joined: Vec<Value> = w
        .cluster_events()
        .await
        .into_iter()
        .filter(|e| e["kind"] == "node.joined")
        .collect();
    assert_eq!(joined.len(), 2, "{joined:?}");

    let image = w.registry.push_hello().await;
    w.deploy(&image, 2, "").await;
    let running = w.running(2).await;
    let on: std::collections::BTreeSet<&str> = running
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert_eq!(on.len(), 2, "one instance per node: {running:?}");
    for inst in &running {
        let addr = inst["address"].as_str().unwrap();
        assert!(addr.starts_with("[fd76:"), "a private IPv6 address: {addr}");
        let id = inst["id"].as_str().unwrap();
        let greeting = eventually(DEADLINE, &format!("greeting from {addr}"), || greet(addr)).await;
        assert!(
            greeting.contains(&format!("hello from instance {id}")),
            "{greeting}"
        );
        assert!(greeting.contains("VERGE_ENV=prod"), "{greeting}");
    }
    let kinds: Vec<String> = w
        .events()
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for k in ["instance.placed", "instance.state", "instance.running"] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
    let d = w.node_json("n1").await;
    assert_eq!(d["instances"], 1, "{d}");
    assert_eq!(d["instances_detail"][0]["state"], "running", "{d}");

    // Constraints pick nodes by label, or explain per node why none fits.
    w.deploy(&image, 2, "constraints = { region = \"eu-west\" }")
        .await;
    let placed = w.running(2).await;
    assert!(
        placed.iter().all(|i| i["node"] == "n1"),
        "both on the eu-west node: {placed:?}"
    );
    w.deploy(&image, 1, "constraints = { region = \"mars\" }")
        .await;
    let pending = eventually(DEADLINE, "an unplaceable instance", || async {
        let s = w.status().await;
        let unplaced = s["workloads"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["node"].is_null())
            .cloned();
        unplaced.map(|i| (s["rollout"].clone(), i))
    })
    .await;
    let reason = pending.1["reason"].as_str().unwrap();
    assert!(
        reason.contains("node n1: label region=eu-west does not match mars"),
        "{reason}"
    );
    assert!(
        reason.contains("node n2: label region=us-east does not match mars"),
        "{reason}"
    );
    drop((n1, n2));
}

async fn a_killed_daemon_leaves_instances_serving_goes_offline_and_readopts_on_return(
    backend: Backend,
) {
    let w = World::new(backend).await;
    let mut n1 = w.node(1, "n1", &[]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&image, 1, "").await;
    let before = w.running(1).await.remove(0);
    let addr = before["address"].as_str().unwrap().to_string();
    eventually(DEADLINE, "greeting", || greet(&addr)).await;

    n1.kill9().await;
    let greeting = greet(&addr)
        .await
        .expect("the instance still serves with its node daemon dead");
    assert!(greeting.contains(before["id"].as_str().unwrap()));
    let killed_at = std::time::Instant::now();
    w.wait_node_state("n1", "offline").await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "offline detected within 10s: {:?}",
        killed_at.elapsed()
    );
    let status = w.status().await;
    let reason = status["workloads"][0]["instances"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("node n1 offline since"), "{status}");

    n1.start(&n1.server_for(&w.cp.cluster), None, &[]).await;
    w.wait_node_state("n1", "online").await;
    let after = w.running(1).await.remove(0);
    assert_eq!(
        after["id"], before["id"],
        "the same instance, not a replacement"
    );
    assert!(
        greet(&addr)
            .await
            .unwrap()
            .contains(before["id"].as_str().unwrap())
    );
    assert!(
        n1.log().contains("adopted=1"),
        "the new daemon re-adopted the instance\n{}",
        n1.log()
    );
    let cluster: Vec<String> = w
        .cluster_events()
        .await
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        cluster
            .iter()
            .any(|e| e.starts_with("node.offline node n1 is offline")),
        "{cluster:?}"
    );
    assert!(
        cluster
            .iter()
            .any(|e| e.starts_with("node.online node n1 is online")),
        "{cluster:?}"
    );
}

#[tokio::test]
async fn an_offline_node_returns_to_what_is_desired_now() {
    let w = World::new(Backend::Sqlite).await;
    let mut n1 = w.node(1, "n1", &[]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&image, 2, "").await;
    let two = w.running(2).await;
    n1.kill9().await;
    w.wait_node_state("n1", "offline").await;
    // Desired state changes while the node is away.
    w.cli.run(&["scale", "web=1"]).await.ok();
    n1.start(&n1.server_for(&w.cp.cluster), None, &[]).await;
    let one = w.running(1).await;
    let gone: Vec<&Value> = two.iter().filter(|i| i["id"] != one[0]["id"]).collect();
    assert_eq!(gone.len(), 1);
    let addr = gone[0]["address"].as_str().unwrap().to_string();
    eventually(DEADLINE, "the removed instance to stop serving", || async {
        greet(&addr).await.is_none().then_some(())
    })
    .await;
    // The node reports the stop after the process is gone, so the event can
    // trail the address going quiet by a report round trip.
    eventually(
        DEADLINE,
        "an instance.stopped event for the removed instance",
        || async {
            w.events()
                .await
                .into_iter()
                .any(|e| e["kind"] == "instance.stopped" && e["instance"] == gone[0]["id"])
                .then_some(())
        },
    )
    .await;
    // Its cgroups (in every hierarchy), network namespace and host veth are gone too.
    let id = gone[0]["id"].as_str().unwrap().to_string();
    eventually(DEADLINE, "cleanup of the removed instance", || async {
        let cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("verge").join(&id))
            .filter(|p| p.exists())
            .collect();
        let ns = verge_tests::nodes::instance_netns(&id).is_some();
        let links = std::process::Command::new("ip")
            .args(["-n", &n1.netns, "-o", "link"])
            .output()
            .unwrap();
        let veth = verge_node::net::host_veth_name(&id);
        let veth_left = String::from_utf8_lossy(&links.stdout).contains(&veth);
        (cgroups.is_empty() && !ns && !veth_left).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_tokens_and_a_foreign_ca_are_refused() {
    let w = World::new(Backend::Sqlite).await;
    let other = World::new(Backend::Sqlite).await;
    let node = NodeHost::create(w.tag, 1, "n1");
    let server = node.server_for(&w.cp.cluster);
    // What a failed `verge node` run printed (its stderr goes to the node log).
    let refused = |args: (&str, Option<String>)| {
        let (server, token) = args;
        let seen = node.log().len();
        let child = node.spawn(server, token.as_deref(), &[]);
        let node = &node;
        async move {
            let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
                .await
                .unwrap_or_else(|_| panic!("verge node did not give up within 60s\n{}", node.log()))
                .unwrap();
            assert!(!out.status.success(), "verge node must refuse");
            node.log()[seen..].to_string()
        }
    };
    let good = w.join_token().await;
    // Right CA, wrong secret.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[2] = "0".repeat(parts[2].len());
    let err = refused((&server, Some(parts.join(".")))).await;
    assert!(
        err.contains("join refused by the control plane: the join token is not valid"),
        "{err}"
    );
    // Not a token at all.
    let err = refused((&server, Some("garbage".into()))).await;
    assert!(err.contains("invalid join token"), "{err}");
    // No token, never joined.
    let err = refused((&server, None)).await;
    assert!(err.contains("has not joined a cluster yet"), "{err}");
    // A token of another cluster: its CA pin does not match this server.
    let foreign = other.join_token().await;
    let err = refused((&server, Some(foreign))).await;
    assert!(
        err.contains("the control plane's CA does not match the join token"),
        "{err}"
    );
    // Expired: a one-second token, used once it has expired.
    let t = w.json(&["nodes", "join-token", "--ttl", "1s"]).await;
    let token = t["token"].as_str().unwrap().to_string();
    let expires = humantime::parse_rfc3339(t["expires_at"].as_str().unwrap()).unwrap();
    // `expires_at` is shown to the second: past it by a second is past the real expiry.
    eventually(DEADLINE, "the token's expiry time", || async {
        (std::time::SystemTime::now() > expires + Duration::from_millis(1100)).then_some(())
    })
    .await;
    let err = refused((&server, Some(token))).await;
    assert!(err.contains("expired at"), "{err}");
    assert!(
        err.contains("mint a new one with `verge nodes join-token`"),
        "{err}"
    );
    assert!(
        w.json(&["nodes", "list"])
            .await
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing joined"
    );
    // A token is good for one join (by default): the second is refused.
    let mut n2 = NodeHost::create(w.tag, 2, "n2");
    n2.start(&n2.server_for(&w.cp.cluster), Some(&good), &[])
        .await;
    let err = refused((&server, Some(good.clone()))).await;
    assert!(err.contains("was already used (it allows 1 join)"), "{err}");
    assert_eq!(
        w.json(&["nodes", "list"]).await.as_array().unwrap().len(),
        1
    );
}

/// `src` compiled as a static program named `name` in `dir` (it runs alone
/// in an otherwise empty image).
fn static_c(dir: &std::path::Path, name: &str, src: &str) -> PathBuf {
    let source = dir.join(format!("{name}.c"));
    std::fs::write(&source, src).unwrap();
    let bin = dir.join(name);
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&source)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc -static: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Allocates and touches memory until killed.
const HOG: &str = "#include <stdlib.h>\n#include <string.h>\n\
    int main(void) { for (;;) { char *p = malloc(1 << 20); if (p) memset(p, 1, 1 << 20); } }\n";

/// Exits with code 3 at once.
const CRASH: &str = "int main(void) { return 3; }\n";

#[tokio::test]
async fn an_instance_over_its_memory_limit_is_oom_killed_and_reported() {
    let w = World::new(Backend::Sqlite).await;
    let _n1 = w.node(1, "n1", &[]).await;
    let reference = push_binary(&w, &static_c(w.dir.path(), "hog", HOG), "hog").await;
    w.deploy(&reference, 1, "restart = \"never\"").await;
    let inst = eventually(DEADLINE, "the hog to fail", || async {
        let s = w.status().await;
        let i = s["workloads"][0]["instances"][0].clone();
        (i["state"] == "failed").then_some((s, i))
    })
    .await;
    let (status, i) = inst;
    assert!(
        i["reason"]
            .as_str()
            .unwrap()
            .starts_with("oom: killed: out of memory (limit 64Mi)"),
        "{i}"
    );
    assert_eq!(status["rollout"]["state"], "failed", "{status}");
    let failed = w
        .events()
        .await
        .into_iter()
        .find(|e| e["kind"] == "instance.failed")
        .expect("an instance.failed event");
    assert!(
        failed["message"].as_str().unwrap().contains("failed (oom)"),
        "{failed}"
    );
}

async fn push_binary(w: &World, bin: &std::path::Path, name: &str) -> String {
    let file = format!("/{name}");
    let layer =
        Layer::from_files(&[File::new(file.clone(), std::fs::read(bin).unwrap(), 0o755)]).unwrap();
    let image = Image::build(
        &ImageConfig {
            entrypoint: vec![file],
            cmd: Vec::new(),
            env: Vec::new(),
            exposed_ports: Vec::new(),
        },
        vec![layer],
    )
    .unwrap();
    let reference = format!("{}/{name}:1", w.registry.host());
    verge_images::push(&image, &reference).await.unwrap();
    reference
}

#[tokio::test]
async fn a_crash_loop_is_restarted_with_backoff_then_fails_with_category_crash() {
    let w = World::new(Backend::Sqlite).await;
    let _n1 = w.node(1, "n1", &[]).await;
    let reference = push_binary(&w, &static_c(w.dir.path(), "crash", CRASH), "crash").await;
    w.deploy(&reference, 1, "restart = \"always\"").await;
    let i = eventually(DEADLINE, "the crash loop to end failed", || async {
        let i = w.status().await["workloads"][0]["instances"][0].clone();
        (i["state"] == "failed").then_some(i)
    })
    .await;
    let reason = i["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("crash: crash loop: failed 5 times in a row; last: exited with code 3"),
        "{i}"
    );
    let events = w.events().await;
    let restarts: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("exited with code 3; restarting in")
        })
        .collect();
    assert_eq!(
        restarts.len(),
        4,
        "four restarts with backoff before giving up: {events:?}"
    );
}

#[tokio::test]
async fn nodes_reconnect_after_the_control_plane_restarts() {
    let mut w = World::new(Backend::Sqlite).await;
    let n1 = w.node(1, "n1", &[]).await;
    let image = w.registry.push_hello().await;
    w.deploy(&image, 1, "").await;
    let before = w.running(1).await.remove(0);
    // Same UDP port after the restart: the node dials what it joined through.
    let listen = format!("[::]:{}", w.cp.cluster.rsplit(':').next().unwrap());
    let prefix = w.prefix.clone();
    w.cp.restart_with(&["--cluster-listen", &listen, "--instance-prefix", &prefix])
        .await;
    eventually(DEADLINE, "the node's second session", || async {
        (n1.log()
            .matches("session with the control plane established")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert!(n1.log().contains("reconnecting"), "{}", n1.log());
    let after = w.running(1).await.remove(0);
    assert_eq!(
        after["id"], before["id"],
        "the instance kept running through the restart"
    );
}

#[tokio::test]
async fn a_private_registry_needs_credentials_on_the_control_plane_and_the_node() {
    let mut w = World::new(Backend::Sqlite).await;
    let private = verge_tests::registry::Registry::start_with_basic_auth()
        .await
        .unwrap();
    let bin = verge_tests::hello_binary().await;
    let image = format!("{}/private/hello:1", private.host());
    let creds = oci_client::secrets::RegistryAuth::Basic(
        verge_tests::registry::BASIC_USER.into(),
        verge_tests::registry::BASIC_PASSWORD.into(),
    );
    verge_images::push_with_auth(&verge_images::hello_image(&bin).unwrap(), &image, &creds)
        .await
        .expect("push with credentials");

    // Without credentials the control plane cannot pin, and says what to do.
    let path = w.dir.path().join("verge.toml");
    std::fs::write(
        &path,
        format!("app = \"hello\"\n[workloads.web]\nimage = \"{image}\"\ncount = 1\n"),
    )
    .unwrap();
    let err = w
        .cli
        .run(&["deploy", "-f", path.to_str().unwrap(), "-o", "json"])
        .await
        .error_json();
    let text = err.to_string();
    assert!(
        text.contains("refused access") && text.contains("--registry-auth-file"),
        "{text}"
    );

    // With a credentials file on both, the release pins and the node pulls.
    let auth = w.dir.path().join("registry-auth");
    private.write_basic_auth_file(&auth);
    let listen = format!("[::]:{}", w.cp.cluster.rsplit(':').next().unwrap());
    let (prefix, auth_arg) = (w.prefix.clone(), auth.display().to_string());
    w.cp.restart_with(&[
        "--cluster-listen",
        &listen,
        "--instance-prefix",
        &prefix,
        "--registry-auth-file",
        &auth_arg,
    ])
    .await;
    let mut n1 = NodeHost::create(w.tag, 1, "n1");
    n1.forward_loopback(private.port());
    let token = w.join_token().await;
    n1.start(
        &n1.server_for(&w.cp.cluster),
        Some(&token),
        &["--registry-auth-file", &auth_arg],
    )
    .await;
    let d = w.node_json("n1").await;
    n1.route_instances(d["instance_prefix"].as_str().unwrap());
    w.deploy(&image, 1, "").await;
    let inst = w.running(1).await.remove(0);
    let addr = inst["address"].as_str().unwrap().to_string();
    let greeting = eventually(DEADLINE, "greeting", || greet(&addr)).await;
    assert!(greeting.contains("hello from instance"), "{greeting}");
}
