//! Volumes end to end, as root: a real control plane, two real `verge
//! node` daemons in network namespaces, real loop devices with ext4, the
//! `hello-debug` image and the real CLI. A volume keeps its data across
//! redeploys, rollbacks and node daemon restarts; its size is enforced
//! (ENOSPC inside the instance) and grows online; snapshots restore in
//! place and onto another node; an instance that mounts a volume runs only
//! on the volume's node and waits, explained, while that node is down;
//! a volume is attached to one instance at a time and cannot be deleted
//! while attached.

use serde_json::Value;
use verge_tests::cli::Run;
use verge_tests::cluster::{Cluster, DEADLINE};
use verge_tests::control::Backend;
use verge_tests::eventually;
use verge_tests::nodes::NodeHost;

const MIB: u64 = 1024 * 1024;

struct World {
    c: Cluster,
    n1: NodeHost,
    _n2: NodeHost,
    image: String,
}

impl World {
    async fn new() -> World {
        let c = Cluster::new(Backend::Sqlite, &[]).await;
        let n1 = c.node(1, "n1", &[], false).await;
        let n2 = c.node(2, "n2", &[], false).await;
        let image = c.registry.push_debug().await;
        World {
            c,
            n1,
            _n2: n2,
            image,
        }
    }

    async fn verge(&self, args: &[&str]) -> Run {
        self.c.cli.run(args).await
    }

    /// Deploys workload `db` of hello-debug mounting `volume` at /data,
    /// with `count` instances; `mark` makes each deploy a new release.
    async fn deploy(&self, volume: &str, count: u32, mark: &str) -> Run {
        self.c
            .deploy_raw(&format!(
                "[env]\nMARK = \"{mark}\"\n[workloads.db]\nimage = \"{}\"\ncount = {count}\n\
                 cpu = 0.1\nmemory = \"64Mi\"\nvolumes = [{{ name = \"{volume}\", path = \"/data\" }}]\n",
                self.image
            ))
            .await
    }

    /// The db instances as `verge status` shows them.
    async fn instances(&self) -> Vec<Value> {
        let s = self.c.json(&["status"]).await;
        s["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["name"] == "db")
            .flat_map(|w| w["instances"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until exactly one db instance runs, of release `number`, and
    /// returns (its ID, its node).
    async fn running(&self, number: i64) -> (String, String) {
        eventually(DEADLINE, &format!("db of v{number} running"), || async {
            let s = self.c.json(&["status"]).await;
            if s["release"]["number"] != number || s["rollout"]["state"] != "completed" {
                return None;
            }
            let all = self.instances().await;
            match all.as_slice() {
                [i] if i["state"] == "running" => Some((
                    i["id"].as_str()?.to_string(),
                    i["node"].as_str()?.to_string(),
                )),
                _ => None,
            }
        })
        .await
    }

    async fn sh(&self, id: &str, script: &str) -> Run {
        self.verge(&["exec", "--instance", id, "--", "sh", "-c", script])
            .await
    }

    async fn volume(&self, name: &str) -> Value {
        self.c.json(&["volumes", "describe", name]).await
    }

    async fn release_number(&self, run: &Run) -> i64 {
        run.json()["release"]["number"].as_i64().expect("number")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_keeps_its_data_enforces_its_size_and_restores_its_snapshots() {
    let mut w = World::new().await;

    // Bad input changes nothing, and says what to do.
    let run = w
        .verge(&["volumes", "create", "data", "--size", "1Mi"])
        .await;
    assert!(!run.success());
    assert!(run.stderr().contains("size"), "{}", run.stderr());
    let run = w
        .verge(&[
            "volumes", "create", "data", "--size", "64Mi", "--node", "nope",
        ])
        .await;
    assert!(!run.success());
    assert!(run.stderr().contains("nope"), "{}", run.stderr());
    let run = w.deploy("data", 1, "0").await;
    assert!(!run.success());
    assert!(
        run.stderr()
            .contains("verge volumes create data --size SIZE"),
        "a deploy mounting a missing volume is refused with the fix: {}",
        run.stderr()
    );
    assert_eq!(w.c.json(&["volumes", "list"]).await, serde_json::json!([]));

    // Created on n1, 64 MiB, detached.
    w.verge(&[
        "volumes", "create", "data", "--size", "64Mi", "--node", "n1",
    ])
    .await
    .ok();
    let list = w.c.json(&["volumes", "list"]).await;
    let v = &list[0];
    assert_eq!(v["name"], "data");
    assert_eq!(v["node"], "n1");
    assert_eq!(v["size"], 64 * MIB);
    assert_eq!(v["state"], "ready");
    assert_eq!(v["attached_to"], Value::Null);
    assert_eq!(w.volume("data").await["backend"], "loop");

    // One writer: two instances of a workload with a volume are refused.
    let run = w.deploy("data", 2, "0").await;
    assert!(!run.success());
    assert!(run.stderr().contains("set count = 1"), "{}", run.stderr());

    // The instance runs on the volume's node (of two), with it at /data.
    let run = w.deploy("data", 1, "1").await;
    assert!(run.success(), "{}", run.stderr());
    let v1 = w.release_number(&run).await;
    let (id, node) = w.running(v1).await;
    assert_eq!(node, "n1");
    w.sh(&id, "echo kept > /data/f && sync").await.ok();
    assert_eq!(w.volume("data").await["attached_to"], id.as_str());

    // Attached: no delete.
    let run = w.verge(&["volumes", "delete", "data"]).await;
    assert!(!run.success());
    assert!(
        run.stderr().contains(&id),
        "names the instance: {}",
        run.stderr()
    );

    // The size is enforced inside the instance: ENOSPC.
    let run = w
        .sh(&id, "dd if=/dev/zero of=/data/big bs=1M count=100")
        .await;
    assert!(!run.success());
    assert!(
        run.stderr().contains("No space left on device"),
        "{}",
        run.stderr()
    );
    w.sh(&id, "rm /data/big").await.ok();

    // Volumes never shrink. They grow online where the node may grow a
    // mounted ext4 (CAP_SYS_RESOURCE); otherwise the node says so and
    // nothing changes, and they grow while detached (below).
    let run = w
        .verge(&["volumes", "resize", "data", "--size", "32Mi"])
        .await;
    assert!(!run.success());
    assert!(run.stderr().contains("shrink"), "{}", run.stderr());
    let run = w
        .verge(&["volumes", "resize", "data", "--size", "160Mi"])
        .await;
    let grown_online = run.success();
    if grown_online {
        assert_eq!(w.volume("data").await["size"], 160 * MIB);
    } else {
        assert!(
            run.stderr().contains("CAP_SYS_RESOURCE"),
            "{}",
            run.stderr()
        );
        assert_eq!(w.volume("data").await["size"], 64 * MIB, "unchanged");
        eprintln!("note: this machine cannot grow a mounted ext4; growing it detached below");
    }

    // A redeploy replaces the instance; the data stays.
    let run = w.deploy("data", 1, "2").await;
    let v2 = w.release_number(&run).await;
    let (id2, node) = w.running(v2).await;
    assert_ne!(id2, id);
    assert_eq!(node, "n1");
    assert_eq!(w.sh(&id2, "cat /data/f").await.ok(), "kept\n");

    // So does a node daemon restart (kill -9).
    let server = w.n1.server_for(&w.c.cp.cluster);
    w.n1.kill9().await;
    w.n1.start(&server, None, &[]).await;
    assert_eq!(w.sh(&id2, "cat /data/f").await.ok(), "kept\n");

    // Snapshot, change, restore in place (detached only): the old data.
    let snap = w.c.json(&["volumes", "snapshot", "data"]).await;
    let snap = snap["id"].as_str().expect("snapshot id").to_string();
    let snaps = w.c.json(&["volumes", "snapshots", "data"]).await;
    assert_eq!(snaps[0]["id"], snap.as_str());
    assert_eq!(w.volume("data").await["snapshots"][0]["id"], snap.as_str());
    w.sh(&id2, "echo changed > /data/f && sync").await.ok();
    let run = w.verge(&["volumes", "restore", &snap]).await;
    assert!(!run.success(), "restoring an attached volume is refused");
    w.verge(&["scale", "db=0"]).await.ok();
    eventually(DEADLINE, "db stopped", || async {
        (w.instances().await.is_empty() && w.volume("data").await["attached_to"] == Value::Null)
            .then_some(())
    })
    .await;
    w.verge(&["volumes", "restore", &snap]).await.ok();
    if !grown_online {
        w.verge(&["volumes", "resize", "data", "--size", "160Mi"])
            .await
            .ok();
    }
    assert_eq!(w.volume("data").await["size"], 160 * MIB);
    w.verge(&["scale", "db=1"]).await.ok();
    let (id3, _) = w.running(v2).await;
    assert_eq!(w.sh(&id3, "cat /data/f").await.ok(), "kept\n");
    // The grown filesystem takes what the old size refused.
    w.sh(&id3, "dd if=/dev/zero of=/data/big bs=1M count=100 && sync")
        .await
        .ok();
    eventually(DEADLINE, "the node reports the used bytes", || async {
        (w.volume("data").await["used"].as_u64()? >= 100 * MIB).then_some(())
    })
    .await;
    w.sh(&id3, "rm /data/big").await.ok();

    // Restored into a new volume on the other node: the same data there.
    w.verge(&["volumes", "restore", &snap, "--to", "data2", "--node", "n2"])
        .await
        .ok();
    let d2 = w.volume("data2").await;
    assert_eq!(d2["node"], "n2");
    assert_eq!(d2["state"], "ready");
    let run = w.deploy("data2", 1, "3").await;
    let v3 = w.release_number(&run).await;
    let (id4, node) = w.running(v3).await;
    assert_eq!(node, "n2", "pinned to data2's node");
    assert_eq!(w.sh(&id4, "cat /data/f").await.ok(), "kept\n");

    // A rollback brings back v2's volume, with its data.
    w.verge(&["rollback", &format!("v{v2}")]).await.ok();
    let (id5, node) = w.running(v2).await;
    assert_eq!(node, "n1");
    assert_eq!(w.sh(&id5, "cat /data/f").await.ok(), "kept\n");

    // The volume's node stops: a new release's instance stays pending,
    // saying why and what to do, and starts there when the node is back.
    w.n1.stop().await;
    eventually(DEADLINE, "n1 offline", || async {
        let nodes = w.c.json(&["nodes", "list"]).await;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == "n1" && n["state"] == "offline")
            .then_some(())
    })
    .await;
    let run = w.deploy("data", 1, "4").await;
    let v4 = w.release_number(&run).await;
    let reason = eventually(DEADLINE, "a pending instance with a reason", || async {
        w.instances()
            .await
            .into_iter()
            .find(|i| i["state"] == "pending")
            .and_then(|i| i["reason"].as_str().map(str::to_string))
            .filter(|r| r.contains("offline"))
    })
    .await;
    assert!(reason.contains("volume data is on node n1"), "{reason}");
    assert!(reason.contains("verge volumes snapshot data"), "{reason}");
    w.n1.start(&server, None, &[]).await;
    let (id6, node) = w.running(v4).await;
    assert_eq!(node, "n1");
    assert_eq!(w.sh(&id6, "cat /data/f").await.ok(), "kept\n");

    // Without --node, the control plane chooses among the nodes that fit,
    // and explains each node when none does.
    let run = w
        .verge(&[
            "volumes", "create", "scratch", "--size", "32Mi", "-o", "json",
        ])
        .await;
    let placed = run.json();
    assert!(placed["node"] == "n1" || placed["node"] == "n2", "{placed}");
    assert_eq!(placed["state"], "ready");
    let run = w
        .verge(&[
            "volumes", "create", "far", "--size", "32Mi", "--region", "mars",
        ])
        .await;
    assert!(!run.success());
    for node in ["node n1: no region label", "node n2: no region label"] {
        assert!(run.stderr().contains(node), "{}", run.stderr());
    }
    let run = w
        .verge(&["volumes", "create", "huge", "--size", "16Ti"])
        .await;
    assert!(!run.success());
    for node in ["node n1: only", "node n2: only"] {
        assert!(run.stderr().contains(node), "{}", run.stderr());
    }
    assert!(
        run.stderr().contains("free of 16Ti asked"),
        "{}",
        run.stderr()
    );
    w.verge(&["volumes", "delete", "scratch"]).await.ok();

    // Detached, it can go.
    let run = w.verge(&["volumes", "delete", "data2"]).await;
    assert!(run.success(), "{}", run.stderr());
    let names: Vec<String> =
        w.c.json(&["volumes", "list"])
            .await
            .as_array()
            .expect("list")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_string())
            .collect();
    assert_eq!(names, ["data"]);
}
