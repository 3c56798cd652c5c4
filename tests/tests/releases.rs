//! Releases end to end: the real `verge` binary against a real control
//! plane (SQLite and PostgreSQL) and a real registry holding the images.
//! Env config and secrets, gates, digest-pinned releases, receipts with
//! diffs, idempotent and racing deploys, rollback, scale, events and wait.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use verge_images::{File, Image, ImageConfig, Layer};
use verge_tests::cli::{Cli, Run};
use verge_tests::control::{Backend, ControlPlane};
use verge_tests::registry::Registry;

verge_tests::on_both_backends!(
    deploy_receipt_releases_rollback_scale_events,
    gate_refuses_listing_every_missing_item_and_creates_nothing,
    manifest_errors_are_all_reported_with_line_and_column,
    unknown_tags_and_unreachable_registries_create_no_release,
    racing_deploys_never_make_the_loser_current_silently,
    the_database_refuses_to_change_releases_and_events,
    events_follower_resumes_with_no_gap_and_no_duplicate,
    rollback_to_a_release_with_a_deleted_secret_version_is_refused,
    secret_key_rotation_reseals_every_version,
    the_manifest_verge_init_writes_deploys_as_is,
    receipts_show_removed_workloads_changed_endpoints_and_cpu,
    secret_keys_and_whole_bundles_are_unset,
);

/// A secret value that must never show up anywhere but in the request that sets it.
const SECRET: &str = "s3cr3t-pa55word-7f1d9c";

/// An org `acme`, project `web`, app `hello`, env `prod`; a registry with
/// two `hello` tags; a directory for manifests; every CLI run recorded.
struct World {
    cp: ControlPlane,
    registry: Registry,
    cli: Cli,
    dir: tempfile::TempDir,
    transcript: Arc<Mutex<String>>,
    digests: Vec<String>,
}

impl World {
    async fn new(backend: Backend) -> World {
        World::with(backend, &[]).await
    }

    async fn with(backend: Backend, extra: &[&str]) -> World {
        let cp = ControlPlane::start_with(backend, extra).await;
        let registry = Registry::start().await.expect("registry starts");
        let cli = cp.acme_hello_prod().await;
        let mut digests = Vec::new();
        for tag in ["1", "2"] {
            digests.push(push_image(&registry, &format!("hello:{tag}"), tag).await);
        }
        World {
            cp,
            registry,
            cli,
            dir: tempfile::tempdir().expect("temp dir"),
            transcript: Arc::default(),
            digests,
        }
    }

    /// Runs `verge ARGS`, recording what it printed.
    async fn run(&self, args: &[&str]) -> Run {
        let run = self.cli.run(args).await;
        let mut t = self.transcript.lock().unwrap();
        // Only what it printed: the arguments themselves hold the secrets set.
        t.push_str(&run.stdout());
        t.push_str(&run.stderr());
        run
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        self.run(&args).await.json()
    }

    /// Runs `verge ARGS -o json`, asserts failure, returns the error body.
    async fn error(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        self.run(&args).await.error_json()
    }

    /// Writes a manifest file and returns its path.
    fn manifest(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write manifest");
        path
    }

    fn image(&self, tag: &str) -> String {
        format!("{}/hello:{tag}", self.registry.host())
    }

    /// A manifest for app `hello` with one workload `web`.
    fn hello(&self, tag: &str, web_extra: &str, top_extra: &str) -> String {
        format!(
            "app = \"hello\"\n{top_extra}\n[workloads.web]\nimage = \"{}\"\ncount = 2\n{web_extra}\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n",
            self.image(tag)
        )
    }

    async fn deploy(&self, path: &Path) -> Value {
        self.json(&["deploy", "-f", path.to_str().unwrap()]).await
    }

    async fn releases(&self) -> Vec<Value> {
        self.json(&["releases"]).await.as_array().unwrap().clone()
    }

    async fn events(&self) -> Vec<Value> {
        self.json(&["events"]).await.as_array().unwrap().clone()
    }
}

/// Pushes a one-file image whose content is `content`; returns its digest.
async fn push_image(registry: &Registry, name: &str, content: &str) -> String {
    let layer = Layer::from_files(&[File::new("/version", content.as_bytes().to_vec(), 0o644)])
        .expect("layer");
    let image = Image::build(
        &ImageConfig {
            entrypoint: vec!["/bin/true".into()],
            cmd: Vec::new(),
            env: Vec::new(),
            exposed_ports: Vec::new(),
        },
        vec![layer],
    )
    .expect("image");
    verge_images::push(&image, &format!("{}/{name}", registry.host()))
        .await
        .unwrap_or_else(|e| panic!("push {name}: {e}\n{}", registry.log_tail()))
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn field_change(receipt: &Value, section: &str, name: &str, field: &str) -> Option<(Value, Value)> {
    let changes = receipt["diff"][section].as_array()?;
    let change = changes.iter().find(|c| c["name"] == name)?;
    let f = change["fields"]
        .as_array()?
        .iter()
        .find(|f| f["field"] == field)?;
    Some((f["old"].clone(), f["new"].clone()))
}

async fn deploy_receipt_releases_rollback_scale_events(backend: Backend) {
    let w = World::new(backend).await;
    let gated = w.hello(
        "1",
        "secrets = [{ bundle = \"app\", path = \"/run/secrets/app\" }]",
        "[env]\nGREETING = \"hi\"\n[require]\nenv = [\"DATABASE_URL\"]\nsecrets = [\"app\"]",
    );
    let v1_path = w.manifest("v1.toml", &gated);

    // Config and secrets, each versioned; secret values never come back.
    let c = w
        .json(&["env", "set", "DATABASE_URL=postgres://db/hello", "LOG=info"])
        .await;
    assert_eq!(c["version"], 1);
    let c = w.json(&["env", "unset", "LOG"]).await;
    assert_eq!(
        (c["version"].as_i64(), c["previous_version"].as_i64()),
        (Some(2), Some(1))
    );
    let listed = w.json(&["env", "list"]).await;
    assert_eq!(
        listed["vars"],
        json!({"DATABASE_URL": "postgres://db/hello"})
    );
    let s = w
        .json(&["secrets", "set", "app", &format!("PASSWORD={SECRET}")])
        .await;
    assert_eq!(s["version"], 1);
    assert_eq!(s["keys"], json!(["PASSWORD"]));
    assert!(
        s["digest"].as_str().unwrap().starts_with("hmac-sha256:"),
        "{s}"
    );
    let from_file = w.manifest("secrets.env", &format!("API_KEY={SECRET}-2\n# comment\n"));
    let s = w
        .json(&[
            "secrets",
            "set",
            "app",
            "--from-file",
            from_file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(s["version"], 2);
    assert_eq!(s["keys"], json!(["API_KEY", "PASSWORD"]));
    let bundles = w.json(&["secrets", "list"]).await;
    assert_eq!(bundles[0]["name"], "app");
    assert_eq!(bundles[0]["version"], 2);

    // v1: every image pinned to the digest the registry holds.
    let r1 = w.deploy(&v1_path).await;
    assert_eq!(r1["release"]["number"], 1, "{r1}");
    assert_eq!(r1["unchanged"], false);
    assert_eq!(r1["diff"]["workloads"][0]["change"], "added");
    assert_eq!(r1["diff"]["endpoints"][0]["name"], "public");
    assert!(
        r1["follow_ups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with("verge wait"))
    );
    let releases = w.releases().await;
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0]["current"], true);
    assert_eq!(
        releases[0]["images"]["web"],
        format!("{}@{}", w.image("1"), w.digests[0])
    );
    let v1_id = r1["release"]["id"].as_str().unwrap().to_string();
    let described = w.json(&["describe", "release", "v1"]).await;
    assert_eq!(described["id"], v1_id.as_str());
    assert_eq!(described["config_version"], 2);
    assert_eq!(described["secrets"], json!({"app": 2}));
    assert_eq!(
        described["manifest"]["workloads"]["web"]["image"],
        releases[0]["images"]["web"]
    );

    // The same manifest and image again: no new release.
    let again = w.deploy(&v1_path).await;
    assert_eq!(again["unchanged"], true, "{again}");
    assert_eq!(again["release"]["id"], v1_id.as_str());
    assert_eq!(w.releases().await.len(), 1);

    // v2: another image and count; the receipt names both fields.
    let v2_path = w.manifest(
        "v2.toml",
        &gated
            .replace("hello:1", "hello:2")
            .replace("count = 2", "count = 3"),
    );
    let r2 = w.deploy(&v2_path).await;
    assert_eq!(r2["release"]["number"], 2);
    assert_eq!(r2["previous"]["number"], 1);
    assert_eq!(
        field_change(&r2, "workloads", "web", "count"),
        Some((json!("2"), json!("3")))
    );
    let (old_image, new_image) = field_change(&r2, "workloads", "web", "image").unwrap();
    assert!(
        old_image.as_str().unwrap().ends_with(&w.digests[0]),
        "{old_image}"
    );
    assert!(
        new_image.as_str().unwrap().ends_with(&w.digests[1]),
        "{new_image}"
    );
    let human = w
        .run(&["deploy", "-f", v2_path.to_str().unwrap()])
        .await
        .ok();
    assert!(human.contains("unchanged"), "{human}");

    // Scale: a receipt with old → new, the same release; status shows it pending.
    let sc = w.json(&["scale", "web=5", "--memory", "512Mi"]).await;
    assert_eq!(sc["release"]["number"], 2);
    assert_eq!(
        field_change(&sc, "workloads", "web", "count"),
        Some((json!("3"), json!("5")))
    );
    assert_eq!(
        field_change(&sc, "workloads", "web", "memory"),
        Some((json!("256Mi"), json!("512Mi")))
    );
    let st = w.json(&["status"]).await;
    assert_eq!(st["release"]["number"], 2);
    assert_eq!(st["workloads"][0]["desired"], 5);
    assert_eq!(st["workloads"][0]["running"], 0);
    assert_eq!(st["workloads"][0]["instances"].as_array().unwrap().len(), 5);
    assert_eq!(st["workloads"][0]["instances"][0]["state"], "pending");
    assert!(
        st["workloads"][0]["instances"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no nodes have joined")
    );
    let wl = w.json(&["describe", "workload", "web"]).await;
    assert_eq!(wl["spec"]["count"], 5);
    assert_eq!(wl["scale"]["count"], 5);
    assert_eq!(wl["endpoints"][0]["name"], "public");

    // A deploy that leaves count alone keeps the scaled count; one that changes it wins.
    let v3_path = w.manifest(
        "v3.toml",
        &std::fs::read_to_string(&v2_path)
            .unwrap()
            .replace("[env]\nGREETING = \"hi\"", "[env]\nGREETING = \"hello\""),
    );
    let r3 = w.deploy(&v3_path).await;
    assert_eq!(r3["release"]["number"], 3);
    assert_eq!(r3["desired"]["web"], 5, "{r3}");
    assert!(
        r3["diff"]["workloads"].as_array().unwrap().is_empty(),
        "{r3}"
    );
    assert_eq!(
        r3["diff"]["config"][0],
        json!({"field": "env.GREETING", "old": "hi", "new": "hello"})
    );
    let v4_path = w.manifest(
        "v4.toml",
        &std::fs::read_to_string(&v3_path)
            .unwrap()
            .replace("count = 3", "count = 4"),
    );
    let r4 = w.deploy(&v4_path).await;
    assert_eq!(r4["desired"]["web"], 4, "{r4}");
    assert_eq!(
        field_change(&r4, "workloads", "web", "count"),
        Some((json!("5"), json!("4")))
    );
    // memory was left alone by the manifest: still scaled.
    assert_eq!(
        w.json(&["describe", "workload", "web"]).await["spec"]["memory"],
        512 * 1024 * 1024
    );

    // Config versions in the receipt.
    w.json(&["env", "set", "DATABASE_URL=postgres://db2/hello"])
        .await;
    let r5 = w.deploy(&v4_path).await;
    assert_eq!(r5["release"]["number"], 5);
    assert!(
        r5["diff"]["config"]
            .as_array()
            .unwrap()
            .contains(&json!({"field": "config_version", "old": "2", "new": "3"})),
        "{r5}"
    );

    // Rollback re-points the env, creates nothing, records who and why.
    let rb = w
        .json(&["rollback", "v1", "--reason", "v5 is broken"])
        .await;
    assert_eq!(rb["release"]["id"], v1_id.as_str());
    assert_eq!(rb["previous"]["number"], 5);
    assert_eq!(
        field_change(&rb, "workloads", "web", "count"),
        Some((json!("4"), json!("2")))
    );
    let releases = w.releases().await;
    assert_eq!(releases.len(), 5, "rollback created no release");
    let current: Vec<&Value> = releases.iter().filter(|r| r["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["number"], 1);
    let human = w.run(&["releases"]).await.ok();
    assert!(
        human
            .lines()
            .any(|l| l.trim_start().starts_with('*') && l.contains("v1")),
        "{human}"
    );
    let env = w.json(&["describe", "env", "prod"]).await;
    assert_eq!(env["release"]["number"], 1);
    assert_eq!(env["releases"], 5);
    assert_eq!(env["vars"], json!(["DATABASE_URL"]));

    // Events: every mutation, in order, tied to its release.
    let events = w.events().await;
    let k = kinds(&events);
    for kind in [
        "config.changed",
        "secrets.changed",
        "release.created",
        "deploy",
        "scale",
        "rollback",
    ] {
        assert!(k.contains(&kind.to_string()), "no {kind} event in {k:?}");
    }
    let cursors: Vec<i64> = events
        .iter()
        .map(|e| e["cursor"].as_i64().unwrap())
        .collect();
    assert!(cursors.windows(2).all(|p| p[0] < p[1]), "{cursors:?}");
    let rollback = events.iter().find(|e| e["kind"] == "rollback").unwrap();
    assert_eq!(rollback["release"], v1_id.as_str());
    assert!(
        rollback["message"]
            .as_str()
            .unwrap()
            .contains("v5 is broken"),
        "{rollback}"
    );
    assert!(
        rollback["actor"].as_str().unwrap().contains("admin"),
        "{rollback}"
    );
    // Every event from the first deploy on is tied to a release; a config
    // change to the release running when it happened.
    let first = events
        .iter()
        .position(|e| e["kind"] == "release.created")
        .unwrap();
    for e in &events[first..] {
        assert!(
            e["release"].as_str().is_some_and(|r| r.starts_with("rel_")),
            "{e}"
        );
    }
    let later_config = events[first..]
        .iter()
        .find(|e| e["kind"] == "config.changed")
        .unwrap();
    let v4 = &releases.iter().find(|r| r["number"] == 4).unwrap()["id"];
    assert_eq!(&later_config["release"], v4, "{later_config}");
    let org_wide = w.json(&["events", "--all"]).await;
    assert_eq!(org_wide.as_array().unwrap().len(), events.len());
    let cluster =
        w.cp.cli()
            .run(&["events", "--all", "-o", "json"])
            .await
            .json();
    assert_eq!(cluster.as_array().unwrap().len(), events.len());
    // Another org's token sees none of them, not even cluster-wide.
    w.cp.cli().run(&["orgs", "create", "other"]).await.ok();
    let token =
        w.cp.cli()
            .run(&["tokens", "create", "--org", "other", "-o", "json"])
            .await
            .json();
    let stranger = w.cp.cli_as(token["token"].as_str().unwrap());
    let seen = stranger
        .run(&["events", "--all", "-o", "json"])
        .await
        .json();
    assert_eq!(seen, json!([]), "another org's token saw events");
    let denied = stranger
        .run(&[
            "events", "--org", "acme", "--app", "hello", "--env", "prod", "-o", "json",
        ])
        .await
        .error_json();
    assert_eq!(denied["kind"], "not_found");

    // wait: converged when nothing is desired; otherwise a timeout naming why.
    let timeout = w.error(&["wait", "--timeout", "1s"]).await;
    assert_eq!(timeout["kind"], "timeout", "{timeout}");
    assert!(
        timeout["message"]
            .as_str()
            .unwrap()
            .contains("no nodes have joined"),
        "{timeout}"
    );
    w.json(&["scale", "web=0"]).await;
    w.run(&["wait", "--timeout", "10s"]).await.ok();
    let superseded = w.error(&["wait", "v2", "--timeout", "10s"]).await;
    assert_eq!(superseded["kind"], "conflict", "{superseded}");

    // The secret never appeared in any output, log line, event or stored row.
    let transcript = w.transcript.lock().unwrap().clone();
    assert!(
        !transcript.contains(SECRET),
        "a secret leaked into CLI output"
    );
    assert!(
        !w.cp.log().contains(SECRET),
        "a secret leaked into the control plane log"
    );
    let raw_events = serde_json::to_string(&w.events().await).unwrap();
    assert!(!raw_events.contains(SECRET));
    let stored = verge_tests::store::select_text(
        &w.cp.database_url(),
        "SELECT ciphertext FROM secret_versions",
    )
    .await;
    assert_eq!(stored.len(), 2);
    let secret_hex: String = SECRET.bytes().map(|b| format!("{b:02x}")).collect();
    assert!(
        stored
            .iter()
            .all(|c| !c.contains(SECRET) && !c.contains(&secret_hex))
    );
    let http = w.cp.http();
    for path in ["secrets", "", "status", "releases/v1", "config"] {
        let url =
            w.cp.endpoint(&format!("/v1/orgs/acme/apps/hello/envs/prod/{path}"));
        let body = http
            .get(url)
            .bearer_auth(&w.cp.admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains(SECRET),
            "GET {path} returned a secret: {body}"
        );
    }
}

async fn gate_refuses_listing_every_missing_item_and_creates_nothing(backend: Backend) {
    let w = World::new(backend).await;
    let text = w.hello(
        "1",
        "secrets = [{ bundle = \"tls\", path = \"/run/tls\" }]",
        "[require]\nenv = [\"DATABASE_URL\", \"REDIS_URL\"]\nsecrets = [\"app\"]",
    );
    w.json(&["env", "set", "REDIS_URL=redis://r"]).await;
    let path = w.manifest("verge.toml", &text);
    let before = w.events().await.len();
    let err = w.error(&["deploy", "-f", path.to_str().unwrap()]).await;
    assert_eq!(err["kind"], "missing_config", "{err}");
    let details: Vec<&str> = err["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(details.len(), 3, "{details:?}");
    assert!(details[0].contains("DATABASE_URL"));
    assert!(
        details[1].contains("\"app\"") && details[2].contains("\"tls\""),
        "{details:?}"
    );
    let next: Vec<&str> = err["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(
        next,
        [
            "verge env set DATABASE_URL=VALUE --app hello --env prod",
            "verge secrets set app KEY=VALUE --app hello --env prod",
            "verge secrets set tls KEY=VALUE --app hello --env prod",
        ]
    );
    let human = w
        .run(&["deploy", "-f", path.to_str().unwrap()])
        .await
        .failed();
    assert!(
        human.contains("DATABASE_URL") && human.contains("verge secrets set tls"),
        "{human}"
    );
    assert!(
        w.releases().await.is_empty(),
        "a refused deploy created a release"
    );
    assert_eq!(
        w.events().await.len(),
        before,
        "a refused deploy emitted events"
    );
    assert!(w.json(&["status"]).await["release"].is_null());

    // The commands it suggests make the deploy pass.
    w.json(&["env", "set", "DATABASE_URL=postgres://db"]).await;
    w.json(&["secrets", "set", "app", "K=v"]).await;
    w.json(&["secrets", "set", "tls", "CERT=c"]).await;
    assert_eq!(w.deploy(&path).await["release"]["number"], 1);
}

async fn manifest_errors_are_all_reported_with_line_and_column(backend: Backend) {
    let w = World::new(backend).await;
    let text = format!(
        "app = \"hello\"\n\n[workloads.web]\nimage = \"{}\"\nmemory = \"lots\"\ncont = 2\nrestart = \"sometimes\"\n",
        w.image("1")
    );
    let path = w.manifest("verge.toml", &text);
    let err = w.error(&["deploy", "-f", path.to_str().unwrap()]).await;
    let details: Vec<String> = err["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(details.len(), 3, "{details:?}");
    assert!(
        err["message"].as_str().unwrap().contains("3 errors"),
        "{err}"
    );
    assert!(
        details[0].ends_with(
            ":5:10: workloads.web.memory: expected a size like \"256Mi\", found \"lots\""
        ),
        "{details:?}"
    );
    assert!(
        details[1].contains(":6:1:") && details[1].contains("did you mean \"count\"?"),
        "{details:?}"
    );
    assert!(
        details[2].contains(":7:11:") && details[2].contains("restart"),
        "{details:?}"
    );

    // The server applies the same checker to what it is sent.
    let url = w.cp.endpoint("/v1/orgs/acme/apps/hello/envs/prod/deploys");
    let resp =
        w.cp.http()
            .post(url)
            .bearer_auth(&w.cp.admin_token)
            .json(&json!({"manifest": text, "file": "verge.toml"}))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["details"].as_array().unwrap().len(),
        3,
        "{body}"
    );
    assert!(
        body["error"]["details"][0]
            .as_str()
            .unwrap()
            .starts_with("verge.toml:5:10:"),
        "{body}"
    );
    assert!(w.releases().await.is_empty());
}

async fn unknown_tags_and_unreachable_registries_create_no_release(backend: Backend) {
    let w = World::new(backend).await;
    let path = w.manifest("verge.toml", &w.hello("never-pushed", "", ""));
    let err = w.error(&["deploy", "-f", path.to_str().unwrap()]).await;
    assert_eq!(err["kind"], "image", "{err}");
    assert!(
        err["details"][0]
            .as_str()
            .unwrap()
            .contains("hello:never-pushed")
            && err["details"][0].as_str().unwrap().contains("not found"),
        "{err}"
    );

    let port = verge_tests::registry::free_port().unwrap();
    let unreachable = w
        .hello("1", "", "")
        .replace(w.registry.host(), &format!("127.0.0.1:{port}"));
    let path = w.manifest("unreachable.toml", &unreachable);
    let err = w.error(&["deploy", "-f", path.to_str().unwrap()]).await;
    assert_eq!(err["kind"], "image", "{err}");
    assert!(
        err["details"][0]
            .as_str()
            .unwrap()
            .contains("cannot reach registry"),
        "{err}"
    );
    assert!(w.releases().await.is_empty());

    // --image replaces the manifest's image (a tag that exists deploys).
    let r = w
        .json(&[
            "deploy",
            "-f",
            path.to_str().unwrap(),
            "--image",
            &w.image("2"),
        ])
        .await;
    assert_eq!(
        w.releases().await[0]["images"]["web"],
        format!("{}@{}", w.image("2"), w.digests[1]),
        "{r}"
    );
}

async fn racing_deploys_never_make_the_loser_current_silently(backend: Backend) {
    let w = World::new(backend).await;
    let v1 = w
        .deploy(&w.manifest("v1.toml", &w.hello("1", "", "")))
        .await;
    let v1_id = v1["release"]["id"].as_str().unwrap().to_string();

    // Two deploys that both started from v1: the second loses the compare-and-set.
    let url = w.cp.endpoint("/v1/orgs/acme/apps/hello/envs/prod/deploys");
    let http = w.cp.http();
    let send = |count: u32| {
        let body = json!({"manifest": w.hello("1", "", "").replace("count = 2", &format!("count = {count}")), "base": v1_id});
        http.post(&url)
            .bearer_auth(&w.cp.admin_token)
            .json(&body)
            .send()
    };
    let first = send(3).await.unwrap();
    assert_eq!(first.status(), 200);
    let winner: Value = first.json().await.unwrap();
    let second = send(4).await.unwrap();
    assert_eq!(second.status(), 409);
    let loser: Value = second.json().await.unwrap();
    let message = loser["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(winner["release"]["id"].as_str().unwrap()),
        "{message}"
    );
    assert!(
        message.contains("v3") && message.contains("not current"),
        "{message}"
    );
    let releases = w.releases().await;
    assert_eq!(releases.len(), 3, "both racing deploys created a release");
    let current: Vec<i64> = releases
        .iter()
        .filter(|r| r["current"] == true)
        .map(|r| r["number"].as_i64().unwrap())
        .collect();
    assert_eq!(current, [2]);
    assert!(kinds(&w.events().await).contains(&"deploy.conflict".to_string()));

    // Truly concurrent CLI deploys: whatever the interleaving, every success
    // went on top of the release current before it, and a failure is a
    // conflict naming the winner.
    for round in 0..3 {
        let a = w.manifest(
            "a.toml",
            &w.hello("1", "", "")
                .replace("count = 2", &format!("count = {}", 10 + round)),
        );
        let b = w.manifest(
            "b.toml",
            &w.hello("2", "", "")
                .replace("count = 2", &format!("count = {}", 20 + round)),
        );
        let args_a = ["deploy", "-f", a.to_str().unwrap(), "-o", "json"];
        let args_b = ["deploy", "-f", b.to_str().unwrap(), "-o", "json"];
        let (ra, rb) = tokio::join!(w.run(&args_a), w.run(&args_b));
        let mut won = Vec::new();
        for r in [&ra, &rb] {
            if r.success() {
                won.push(r.json());
            } else {
                let e = r.error_json();
                assert_eq!(e["kind"], "conflict", "{e}");
            }
        }
        assert!(!won.is_empty(), "one of two racing deploys must win");
        if won.len() == 2 {
            // They ran one after the other: the later went on top of the earlier.
            let (x, y) = (&won[0], &won[1]);
            assert!(
                x["previous"]["id"] == y["release"]["id"]
                    || y["previous"]["id"] == x["release"]["id"],
                "{x}\n{y}"
            );
        }
        let current = w.json(&["status"]).await["release"]["id"].clone();
        assert!(
            won.iter().any(|r| r["release"]["id"] == current),
            "current is not a winner"
        );
    }
}

async fn the_database_refuses_to_change_releases_and_events(backend: Backend) {
    let w = World::new(backend).await;
    w.deploy(&w.manifest("v1.toml", &w.hello("1", "", "")))
        .await;
    let url = w.cp.database_url();
    for sql in [
        "UPDATE releases SET number = 99",
        "UPDATE releases SET manifest = '{}'",
        "DELETE FROM releases",
        "UPDATE events SET message = 'rewritten'",
        "DELETE FROM events",
    ] {
        let err = verge_tests::store::execute(&url, sql)
            .await
            .expect_err(&format!("the database accepted {sql}"));
        assert!(
            err.contains("immutable") || err.contains("append-only"),
            "{sql}: {err}"
        );
    }
    let releases = w.releases().await;
    assert_eq!(releases[0]["number"], 1);
    assert!(!w.events().await.is_empty());
}

/// `verge events --follow -o json` as a child process, read line by line.
struct Follower {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Follower {
    async fn start(w: &World, after: Option<i64>) -> Follower {
        let mut cmd = verge_tests::verge_command();
        cmd.args(["events", "--follow", "-o", "json"])
            .env("VERGE_CONFIG_DIR", w.cp.config_dir.path())
            .env("VERGE_SERVER", &w.cp.url)
            .env("VERGE_TOKEN", &w.cp.admin_token)
            .env("VERGE_ORG", "acme")
            .env("VERGE_APP", "hello")
            .env("VERGE_ENV", "prod")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(after) = after {
            cmd.args(["--after", &after.to_string()]);
        }
        let mut child = cmd.spawn().expect("spawn verge events --follow");
        let stdout = child.stdout.take().unwrap();
        Follower {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next `n` events, each within 20 s.
    async fn take(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no event within 20s after {out:?}"))
                .expect("read")
                .expect("the follower ended");
            if !line.trim().is_empty() {
                out.push(serde_json::from_str(&line).expect("NDJSON line"));
            }
        }
        out
    }
}

async fn events_follower_resumes_with_no_gap_and_no_duplicate(backend: Backend) {
    let mut w = World::new(backend).await;
    w.json(&["env", "set", "A=1"]).await;
    let mut follower = Follower::start(&w, None).await;
    let mut seen = follower.take(1).await;
    // Live: events made while it follows arrive.
    w.json(&["env", "set", "B=2"]).await;
    w.json(&["env", "set", "C=3"]).await;
    seen.extend(follower.take(2).await);
    // Disconnect; more happens; reconnect with the last cursor.
    follower.child.kill().await.unwrap();
    w.json(&["env", "set", "D=4"]).await;
    w.json(&["secrets", "set", "app", "K=v"]).await;
    let last = seen.last().unwrap()["cursor"].as_i64().unwrap();
    let mut follower = Follower::start(&w, Some(last)).await;
    seen.extend(follower.take(2).await);
    // The control plane restarts (same address) under a running follower:
    // it reconnects by itself from its last cursor.
    let url = w.cp.url.clone();
    w.cp.restart().await;
    assert_eq!(w.cp.url, url, "a restart keeps the address");
    w.json(&["env", "set", "E=5"]).await;
    seen.extend(follower.take(1).await);
    let all = w.events().await;
    let cursors = |v: &[Value]| {
        v.iter()
            .map(|e| e["cursor"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cursors(&seen),
        cursors(&all),
        "followed events differ from the log"
    );
}

async fn rollback_to_a_release_with_a_deleted_secret_version_is_refused(backend: Backend) {
    let w = World::new(backend).await;
    let text = w.hello("1", "", "[require]\nsecrets = [\"app\"]");
    let path = w.manifest("verge.toml", &text);
    w.json(&["secrets", "set", "app", "K=one"]).await;
    w.deploy(&path).await;
    w.json(&["secrets", "set", "app", "K=two"]).await;
    let r2 = w.deploy(&path).await;
    assert_eq!(r2["release"]["number"], 2);
    assert!(
        r2["diff"]["config"]
            .as_array()
            .unwrap()
            .contains(&json!({"field": "secrets.app", "old": "1", "new": "2"})),
        "{r2}"
    );
    let del = w.json(&["secrets", "unset", "app", "--version", "1"]).await;
    assert_eq!(del["deleted_versions"], json!([1]));
    let err = w.error(&["rollback", "v1"]).await;
    assert_eq!(err["kind"], "conflict", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("\"app\" v1"),
        "{err}"
    );
    assert_eq!(
        w.json(&["status"]).await["release"]["number"],
        2,
        "a refused rollback changed the env"
    );
    let bundles = w.json(&["secrets", "list"]).await;
    assert_eq!(bundles[0]["versions"][0]["deleted"], true);
    assert_eq!(bundles[0]["version"], 2);
}

async fn secret_key_rotation_reseals_every_version(backend: Backend) {
    let mut w = World::new(backend).await;
    w.json(&["secrets", "set", "app", &format!("K={SECRET}")])
        .await;
    let url = w.cp.database_url();
    let old_ids = verge_tests::store::select_text(&url, "SELECT key_id FROM secret_versions").await;
    let old_key = w.cp.data_dir.path().join("secrets.key");
    let new_key = w.cp.data_dir.path().join("secrets-2.key");
    std::fs::write(&new_key, format!("{}\n", "ab".repeat(32))).unwrap();
    w.cp.restart_with(&[
        "--secrets-key-file",
        new_key.to_str().unwrap(),
        "--secrets-previous-key-file",
        old_key.to_str().unwrap(),
    ])
    .await;
    let new_ids = verge_tests::store::select_text(&url, "SELECT key_id FROM secret_versions").await;
    assert_ne!(old_ids, new_ids, "the version was not re-sealed");
    // The values survived: merging a new key opens the old version under the new key.
    let s = w.json(&["secrets", "set", "app", "L=2"]).await;
    assert_eq!(s["keys"], json!(["K", "L"]));
    // A replica with another key refuses to start instead of sealing
    // values the others cannot open.
    let stray = tempfile::tempdir().unwrap();
    let mut args = vec![
        "control".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        stray.path().display().to_string(),
    ];
    args.extend(["--database".into(), url.clone()]);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = w.cp.cli().run(&arg_refs).await.failed();
    assert!(
        refused.contains("every replica must use the same secrets_key_file"),
        "{refused}"
    );
    // Without the old key, the control plane now needs only the new one.
    w.cp.restart_with(&["--secrets-key-file", new_key.to_str().unwrap()])
        .await;
    assert_eq!(
        w.json(&["secrets", "set", "app", "M=3"]).await["version"],
        3
    );
}

async fn the_manifest_verge_init_writes_deploys_as_is(backend: Backend) {
    let w = World::new(backend).await;
    let init = verge_tests::verge_command()
        .args(["init"])
        .current_dir(w.dir.path())
        .env("VERGE_CONFIG_DIR", w.cp.config_dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let path = w.dir.path().join("verge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The example names a registry on 127.0.0.1:5000; this test's runs elsewhere.
    assert!(text.contains("127.0.0.1:5000/hello:1.0"), "{text}");
    std::fs::write(&path, text.replace("127.0.0.1:5000", w.registry.host())).unwrap();
    let digest = push_image(&w.registry, "hello:1.0", "example").await;
    let receipt = w.deploy(&path).await;
    assert_eq!(receipt["release"]["number"], 1, "{receipt}");
    assert_eq!(
        w.releases().await[0]["images"]["web"],
        format!("{}/hello:1.0@{digest}", w.registry.host())
    );
    assert_eq!(receipt["diff"]["endpoints"][0]["name"], "public");
}

async fn receipts_show_removed_workloads_changed_endpoints_and_cpu(backend: Backend) {
    let w = World::new(backend).await;
    let two = format!(
        "{}\n[workloads.worker]\nimage = \"{}\"\n[[endpoints]]\nname = \"admin\"\nworkload = \"web\"\nport = 9000\ninternal_port = 9000\n",
        w.hello("1", "", ""),
        w.image("1")
    );
    w.deploy(&w.manifest("v1.toml", &two)).await;
    // worker removed, public moved to ports 80 and 443, admin removed.
    let one = w
        .hello("1", "", "")
        .replace("port = 80\n", "ports = [80, 443]\n");
    let r = w.deploy(&w.manifest("v2.toml", &one)).await;
    let worker = r["diff"]["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "worker")
        .unwrap();
    assert_eq!(worker["change"], "removed", "{r}");
    assert!(
        worker["fields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["new"].is_null()),
        "{r}"
    );
    assert_eq!(
        field_change(&r, "endpoints", "public", "ports"),
        Some((json!("80"), json!("80,443")))
    );
    let admin = r["diff"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "admin")
        .unwrap();
    assert_eq!(admin["change"], "removed", "{r}");
    assert_eq!(r["desired"], json!({"web": 2}));
    // Scale cpu: old → new in the receipt, and in the effective spec.
    let sc = w.json(&["scale", "web", "--cpu", "0.5"]).await;
    assert_eq!(
        field_change(&sc, "workloads", "web", "cpu"),
        Some((json!("0.25"), json!("0.5")))
    );
    assert_eq!(
        w.json(&["describe", "workload", "web"]).await["spec"]["cpu"],
        0.5
    );
    // The same scale again changes nothing.
    assert_eq!(
        w.json(&["scale", "web", "--cpu", "0.5"]).await["unchanged"],
        true
    );
}

async fn secret_keys_and_whole_bundles_are_unset(backend: Backend) {
    let w = World::new(backend).await;
    let path = w.manifest(
        "verge.toml",
        &w.hello("1", "", "[require]\nsecrets = [\"app\"]"),
    );
    w.json(&["secrets", "set", "app", "K=1", "L=2"]).await;
    let s = w.json(&["secrets", "unset", "app", "L"]).await;
    assert_eq!(
        (s["version"].as_i64(), s["keys"].clone()),
        (Some(2), json!(["K"]))
    );
    assert_eq!(s["unset"], json!(["L"]));
    // A key that is not there, or the last key, is refused and changes nothing.
    let missing = w.error(&["secrets", "unset", "app", "NOPE"]).await;
    assert!(
        missing["message"].as_str().unwrap().contains("NOPE"),
        "{missing}"
    );
    let last = w.error(&["secrets", "unset", "app", "K"]).await;
    assert!(
        last["message"].as_str().unwrap().contains("no keys"),
        "{last}"
    );
    assert_eq!(w.json(&["secrets", "list"]).await[0]["version"], 2);
    w.deploy(&path).await;
    // The whole bundle: every version deleted; the gate then refuses.
    let gone = w.json(&["secrets", "unset", "app"]).await;
    assert_eq!(gone["deleted_versions"], json!([1, 2]));
    assert!(gone["version"].is_null());
    let listed = w.json(&["secrets", "list"]).await;
    assert!(listed[0]["version"].is_null(), "{listed}");
    assert!(
        listed[0]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["deleted"] == true)
    );
    let err = w
        .error(&[
            "deploy",
            "-f",
            path.to_str().unwrap(),
            "--image",
            &w.image("2"),
        ])
        .await;
    assert_eq!(err["kind"], "missing_config", "{err}");
    assert!(kinds(&w.events().await).contains(&"secrets.deleted".to_string()));
}
