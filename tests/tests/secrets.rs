//! Secret delivery and env vars end to end, as root: a real control plane,
//! a real `verge node`, the `hello-debug` image and the real CLI. A
//! workload's secret bundles arrive as files on a tmpfs in the instance,
//! mode 0400, owned by its user, in the `env` or `json` format, in the
//! bundle version its release pins: rotating a secret changes nothing that
//! runs until the next deploy (which says so), and a rollback brings the
//! old version back. The env's and the manifest's env vars reach the
//! process as the release recorded them. Through all of it, the secret
//! values appear in no log (app, system, daemons'), event, API answer or
//! file on the node's disk.

use std::collections::BTreeMap;
use std::path::Path;

use rand::RngCore as _;
use serde_json::Value;
use verge_tests::cli::Run;
use verge_tests::cluster::{Cluster, DEADLINE};
use verge_tests::control::Backend;
use verge_tests::eventually;
use verge_tests::nodes::NodeHost;

struct World {
    c: Cluster,
    node: NodeHost,
    image: String,
    /// Everything the CLI printed, to search for secret values.
    seen: std::sync::Mutex<String>,
}

impl World {
    async fn verge(&self, args: &[&str]) -> Run {
        let run = self.c.cli.run(args).await;
        let mut seen = self.seen.lock().expect("not poisoned");
        seen.push_str(&run.stdout());
        seen.push_str(&run.stderr());
        run
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        self.verge(&args).await.json()
    }

    async fn deploy(&self) -> Run {
        let manifest = format!(
            "app = \"hello\"\n[env]\nFROM_MANIFEST = \"m1\"\n[workloads.web]\nimage = \"{}\"\n\
             count = 1\ncpu = 0.1\nmemory = \"64Mi\"\nsecrets = [\
             {{ bundle = \"app\", path = \"/run/secrets/app\" }}, \
             {{ bundle = \"app\", path = \"/etc/app/secrets.json\", format = \"json\" }}]\n",
            self.image
        );
        let path = self.c.dir.path().join("verge.toml");
        std::fs::write(&path, manifest).expect("manifest written");
        self.verge(&["deploy", "-f", path.to_str().expect("utf-8")])
            .await
    }

    /// The one running instance of release `number`.
    async fn running(&self, number: i64) -> String {
        eventually(DEADLINE, &format!("v{number} running"), || async {
            let s = self.c.json(&["status"]).await;
            if s["release"]["number"] != number || s["rollout"]["state"] != "completed" {
                return None;
            }
            let inst = s["workloads"][0]["instances"].as_array()?.clone();
            match inst.as_slice() {
                [i] if i["state"] == "running" => Some(i["id"].as_str()?.to_string()),
                _ => None,
            }
        })
        .await
    }

    /// Runs `script` in the instance; not recorded in `seen` (it prints
    /// secret values on purpose).
    async fn sh(&self, id: &str, script: &str) -> String {
        self.c
            .cli
            .run(&["exec", "--instance", id, "--", "sh", "-c", script])
            .await
            .ok()
    }

    async fn current(&self) -> i64 {
        self.c.json(&["status"]).await["release"]["number"]
            .as_i64()
            .expect("a current release")
    }
}

fn random_value(tag: &str) -> String {
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{tag}-{hex}")
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file()
                && std::fs::read(e.path())
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_arrive_as_tmpfs_files_pinned_per_release_and_are_never_shown() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let node = c.node(1, "n1", &[], false).await;
    let image = c.registry.push_debug().await;
    let w = World {
        c,
        node,
        image,
        seen: std::sync::Mutex::new(String::new()),
    };
    let v1 = random_value("first");
    let v2 = random_value("second");

    w.verge(&[
        "secrets",
        "set",
        "app",
        &format!("TOKEN={v1}"),
        &format!("DB_URL=postgres://u:{v1}@db/x"),
    ])
    .await
    .ok();
    w.verge(&["env", "set", "GREETING=hi"]).await.ok();
    w.deploy().await.ok();
    let first = w.current().await;
    let id = w.running(first).await;

    // The env format: sorted KEY=value lines; the json format: one object.
    assert_eq!(
        w.sh(&id, "cat /run/secrets/app").await,
        format!("DB_URL=postgres://u:{v1}@db/x\nTOKEN={v1}\n")
    );
    let json: BTreeMap<String, String> =
        serde_json::from_str(&w.sh(&id, "cat /etc/app/secrets.json").await).expect("json");
    assert_eq!(json["TOKEN"], v1);
    // Mode 0400, owned by the workload's user (root in this image), on a tmpfs.
    assert_eq!(
        w.sh(
            &id,
            "stat -c '%a %u %g' /run/secrets/app /etc/app/secrets.json"
        )
        .await,
        "400 0 0\n400 0 0\n"
    );
    assert_eq!(w.sh(&id, "stat -f -c %T /run/secrets/app").await, "tmpfs\n");
    // Env vars as the release recorded them; secrets only in files.
    let env = w.sh(&id, "env").await;
    assert!(env.contains("GREETING=hi\n"), "{env}");
    assert!(env.contains("FROM_MANIFEST=m1\n"), "{env}");
    assert!(!env.contains(&v1), "secrets are files, not env vars");

    // Rotation: a new version, which running instances do not see...
    w.verge(&["secrets", "set", "app", &format!("TOKEN={v2}")])
        .await
        .ok();
    w.verge(&["env", "set", "GREETING=hello"]).await.ok();
    assert!(w.sh(&id, "cat /run/secrets/app").await.contains(&v1));
    assert!(w.sh(&id, "env").await.contains("GREETING=hi\n"));
    // ...until a deploy, which says so.
    let out = w.deploy().await.ok();
    assert!(
        out.contains("secret bundle app: v2 takes effect with this release"),
        "{out}"
    );
    let second = w.current().await;
    let id2 = w.running(second).await;
    assert!(
        w.sh(&id2, "cat /run/secrets/app")
            .await
            .contains(&format!("TOKEN={v2}"))
    );
    assert!(w.sh(&id2, "env").await.contains("GREETING=hello\n"));

    // A rollback brings the previous version back, env vars too.
    w.verge(&["rollback", &format!("v{first}")]).await.ok();
    let id3 = w.running(first).await;
    assert!(
        w.sh(&id3, "cat /run/secrets/app")
            .await
            .contains(&format!("TOKEN={v1}"))
    );
    assert!(w.sh(&id3, "env").await.contains("GREETING=hi\n"));
    // The version the running release mounts cannot be deleted under it.
    let run = w
        .verge(&["secrets", "unset", "app", "--version", "1"])
        .await;
    assert!(!run.success());
    assert!(
        run.stderr().contains(&format!("release v{first} pins v1")),
        "{}",
        run.stderr()
    );
    let listed = w.json(&["secrets", "list"]).await;
    assert_eq!(
        listed[0]["versions"][0]["deleted"], false,
        "nothing deleted"
    );

    // Nowhere else: API answers, events, logs, the daemons' logs, the
    // node's disk, the control plane's database.
    for args in [
        &["status"][..],
        &["events"],
        &["releases"],
        &["secrets", "list"],
        &["describe", "env", "prod"],
        &["describe", "release", &format!("v{first}")],
        &["nodes", "describe", "n1"],
    ] {
        w.json(args).await;
    }
    // Logs: NDJSON and text, app and system, of every instance that ran.
    for args in [
        &["logs", "--previous", "-o", "json"][..],
        &["logs", "--previous"],
        &["logs", "--source", "system", "--previous"],
    ] {
        let run = w.verge(args).await;
        assert!(run.success(), "{}", run.stderr());
        assert!(run.stdout().contains("hello listening") || args.contains(&"system"));
    }
    let seen = w.seen.lock().expect("not poisoned").clone();
    for v in [&v1, &v2] {
        assert!(!seen.contains(v.as_str()), "a secret value in CLI output");
        assert!(
            !w.c.cp.log().contains(v.as_str()),
            "in the control plane's log"
        );
        assert!(!w.node.log().contains(v.as_str()), "in the node's log");
        assert_eq!(
            files_containing(w.node.data_dir.path(), v),
            Vec::<String>::new(),
            "in files on the node's disk"
        );
        assert_eq!(
            files_containing(w.c.cp.data_dir.path(), v),
            Vec::<String>::new(),
            "in the control plane's files (its database holds sealed values)"
        );
    }
}
