//! Per-connection wasm workloads in the control plane, on SQLite and
//! PostgreSQL: the listener rows nodes report, the listeners each node's
//! desired set carries (and the desired-set versions that follow them),
//! and the routing table's backends of a per-connection endpoint. The
//! node's side and the whole path are covered end to end in `tests/`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use verge_api::manifest::{Manifest, Runtime};
use verge_api::wire::{ListenerSpec, SecretFile};
use verge_control::endpoints::Addressing;
use verge_control::reconcile::{desired_set, listeners};
use verge_control::secrets::Keyring;
use verge_control::store::{
    Backend, Hello, ListenerRow, NewEvent, NewInstance, NewNode, ReleaseRow, ScaleRow,
    SecretVersionRow, Store,
};

/// Runs each scenario once per backend, as `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
    };
}

on_both_backends!(
    listener_rows_are_replaced_per_node_and_read_by_env,
    desired_sets_carry_listeners_for_matching_online_nodes_only,
    a_per_connection_endpoint_routes_to_listening_listeners,
    status_shows_per_connection_workloads_with_their_listeners,
);

async fn open(backend: Backend) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("verge.db").display()),
        Backend::Postgres => verge_tests::postgres::fresh_database().await,
    };
    (Store::open(&url).await.expect("open store"), dir)
}

fn pools() -> Addressing {
    Addressing::parse(
        "fd65:6e64:7074::/64",
        "203.0.113.0/28",
        "fd76:6572:6765::/48".parse().unwrap(),
    )
    .unwrap()
}

const MANIFEST: &str = r#"
app = "shop"
[env]
GREETING = "hi"
[workloads.web]
image = "r/web:1"
count = 1
[workloads.echo]
runtime = "wasm"
image = "r/echo:1"
mode = "per-connection"
command = ["--greet"]
cpu = 0.5
memory = "32Mi"
concurrency = 7
max_cpu_time = "2s"
constraints = { region = "eu" }
secrets = [{ bundle = "app", path = "/run/secrets/app" }]
[workloads.api]
runtime = "wasm"
image = "r/api:1"
max_cpu_time = "3s"
[workloads.lonely]
runtime = "wasm"
image = "r/lonely:1"
mode = "per-connection"
[[endpoints]]
name = "a"
workload = "echo"
port = 7
internal_port = 7000
proxy_protocol = "v2"
drain_timeout = "45s"
[[endpoints]]
name = "b"
workload = "echo"
ports = [8, 9]
internal_port = 7001
[[endpoints]]
name = "c"
workload = "echo"
port = 10
internal_port = 7000
"#;

/// `acme/shop/prod`: its ID.
async fn env(store: &Store) -> String {
    let org = store.create_org("acme").await.unwrap();
    let project = store.create_project(&org.id, "p").await.unwrap();
    let app = store.create_app(&org.id, &project, "shop").await.unwrap();
    store.create_env(&app, "prod").await.unwrap().id
}

/// Nodes `(id, labels)`; `online` ones have a session (behind NAT when
/// `nat` names them).
async fn nodes(store: &Store, all: &[(&str, &str)], online: &[&str], nat: &[&str]) {
    let mut tx = store.mutation().await.unwrap();
    for (id, labels) in all {
        let node = NewNode {
            id,
            name: id,
            labels,
            cpu_millis: 1000,
            memory: 1 << 30,
            isolation: "namespaces",
            version: "test",
            cert_sha256: id,
            join_token_id: "jt",
        };
        let row = tx
            .insert_node(&node, |i| Some(format!("fd00:{i}::/64")))
            .await
            .unwrap()
            .unwrap();
        if online.contains(id) {
            let hello = Hello {
                labels,
                cpu_millis: 1000,
                memory: 1 << 30,
                isolation: "namespaces",
                version: "test",
                applied_version: 0,
                behind_nat: nat.contains(id),
            };
            tx.node_online(&row, &hello).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// Stores release `id` (number `n`) of `manifest` with secret bundle
/// `app` v1 pinned, and makes it current.
async fn release(store: &Store, env: &str, id: &str, n: i64, manifest: &Manifest) {
    let images: BTreeMap<String, String> = manifest
        .workloads
        .iter()
        .map(|(w, spec)| (w.clone(), format!("{}@sha256:{:064}", spec.image, n)))
        .collect();
    let row = ReleaseRow {
        id: id.into(),
        env_id: env.into(),
        number: n,
        manifest: serde_json::to_string(manifest).unwrap(),
        images: serde_json::to_string(&images).unwrap(),
        config_version: 0,
        secrets: r#"{"app": 1}"#.into(),
        fingerprint: format!("f{n}"),
        parent_id: None,
        created_at: n,
        created_by: "test".into(),
    };
    let mut tx = store.mutation().await.unwrap();
    let from = tx
        .current_release(env)
        .await
        .unwrap()
        .map(|r| serde_json::from_str::<Manifest>(&r.manifest).unwrap());
    tx.insert_release(&row).await.unwrap();
    tx.make_current(env, id, from.as_ref(), manifest, &BTreeMap::new(), &pools())
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn seal_bundle(store: &Store, keyring: &Keyring, env: &str) {
    let values = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
    let sealed = keyring.seal(env, "app", 1, &values);
    let row = SecretVersionRow {
        bundle: "app".into(),
        version: 1,
        keys: r#"["TOKEN"]"#.into(),
        digest: sealed.digest,
        key_id: Some(sealed.key_id),
        nonce: Some(sealed.nonce),
        ciphertext: Some(sealed.ciphertext),
        created_at: 0,
        deleted_at: None,
    };
    let mut tx = store.mutation().await.unwrap();
    tx.insert_secret_version(env, &row, "test").await.unwrap();
    tx.commit().await.unwrap();
}

async fn listeners_of(store: &Store, keyring: &Keyring, node: &str) -> Vec<ListenerSpec> {
    let row = store.node(node).await.unwrap().unwrap();
    let set = desired_set(store, keyring, &row).await.unwrap();
    assert_eq!(set.version, row.desired_version as u64);
    set.listeners
}

async fn version(store: &Store, node: &str) -> i64 {
    store.node(node).await.unwrap().unwrap().desired_version
}

async fn desired_sets_carry_listeners_for_matching_online_nodes_only(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let keyring = Keyring::from_key([7; 32]);
    let env = env(&store).await;
    let eu = r#"{"region": "eu"}"#;
    nodes(
        &store,
        &[
            ("n_eu", eu),
            ("n_eu2", eu),
            ("n_us", r#"{"region": "us"}"#),
            ("n_off", eu),
        ],
        &["n_eu", "n_eu2", "n_us"],
        &[],
    )
    .await;
    seal_bundle(&store, &keyring, &env).await;
    let m = verge_api::manifest::parse("verge.toml", MANIFEST).unwrap();
    release(&store, &env, "rel_1", 1, &m).await;

    // The matching online nodes answer echo; `lonely` has no endpoint.
    let specs = listeners_of(&store, &keyring, "n_eu").await;
    assert_eq!(specs.len(), 1, "{specs:?}");
    let s = &specs[0];
    assert_eq!(s.id, "lst-rel_1-echo");
    assert_eq!(
        (s.org.as_str(), s.app.as_str(), s.env.as_str()),
        ("acme", "shop", "prod")
    );
    assert_eq!((s.release.as_str(), s.workload.as_str()), ("rel_1", "echo"));
    assert_eq!(s.image, format!("r/echo:1@sha256:{:064}", 1));
    assert_eq!(s.command, Some(vec!["--greet".to_string()]));
    assert_eq!(s.ports, [7000, 7001], "distinct internal ports");
    assert_eq!(s.drain_ms, 45_000, "the longest drain timeout");
    assert_eq!((s.cpu, s.memory), (0.5, 32 << 20));
    assert_eq!((s.concurrency, s.max_cpu_time_ms), (7, 2_000));
    assert_eq!(
        s.secrets,
        [SecretFile {
            bundle: "app".into(),
            version: 1,
            path: "/run/secrets/app".into(),
            contents: "TOKEN=s3cret\n".into(),
        }]
    );
    for (k, v) in [
        ("GREETING", "hi"),
        ("VERGE_INSTANCE_ID", "lst-rel_1-echo"),
        ("VERGE_APP", "shop"),
        ("VERGE_ENV", "prod"),
        ("VERGE_WORKLOAD", "echo"),
        ("VERGE_RELEASE", "rel_1"),
        ("VERGE_PROXY_PROTOCOL", "v2"),
    ] {
        assert_eq!(s.env_vars.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(listeners_of(&store, &keyring, "n_eu2").await, specs);
    // A long-running wasm workload's instance: its spec says how it runs.
    let mut tx = store.mutation().await.unwrap();
    let new = NewInstance {
        env_id: &env,
        release_id: "rel_1",
        workload: "api",
        slot: 0,
        node_id: Some("n_eu"),
        cpu_millis: 250,
        memory: 256 << 20,
        message: None,
    };
    let api = tx.insert_instance(&new).await.unwrap();
    tx.commit().await.unwrap();
    let node = store.node("n_eu").await.unwrap().unwrap();
    let set = desired_set(&store, &keyring, &node).await.unwrap();
    assert_eq!(set.instances.len(), 1);
    let i = &set.instances[0];
    assert_eq!(
        (i.id.as_str(), i.runtime, i.max_cpu_time_ms),
        (api.as_str(), Runtime::Wasm, 3_000)
    );
    assert_eq!(set.listeners, specs, "beside its instances");
    assert!(listeners_of(&store, &keyring, "n_us").await.is_empty());
    assert!(listeners_of(&store, &keyring, "n_off").await.is_empty());

    // The versions of the nodes whose listeners changed move, once.
    let mut bumped = listeners::sync(&store).await.unwrap();
    bumped.sort();
    assert_eq!(bumped, ["n_eu", "n_eu2"]);
    assert_eq!(version(&store, "n_eu").await, 1);
    assert_eq!(version(&store, "n_us").await, 0);
    assert!(listeners::sync(&store).await.unwrap().is_empty());

    // A drain takes them away.
    let mut tx = store.mutation().await.unwrap();
    tx.set_drain("n_eu2", Some("draining"), Some(i64::MAX))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(listeners::sync(&store).await.unwrap(), ["n_eu2"]);
    assert!(listeners_of(&store, &keyring, "n_eu2").await.is_empty());

    // More cpu for each connection's instance: the same listener, changed.
    let mut tx = store.mutation().await.unwrap();
    let scale = BTreeMap::from([(
        "echo".to_string(),
        ScaleRow {
            cpu_millis: Some(1000),
            ..Default::default()
        },
    )]);
    tx.replace_scale_overrides(&env, &scale).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(listeners::sync(&store).await.unwrap(), ["n_eu"]);
    let specs = listeners_of(&store, &keyring, "n_eu").await;
    assert_eq!(
        (specs[0].id.as_str(), specs[0].cpu),
        ("lst-rel_1-echo", 1.0)
    );

    // A new release replaces the listener at once.
    release(&store, &env, "rel_2", 2, &m).await;
    assert_eq!(listeners::sync(&store).await.unwrap(), ["n_eu"]);
    let ids: Vec<String> = listeners_of(&store, &keyring, "n_eu")
        .await
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["lst-rel_2-echo"]);

    // An offline node answers nothing.
    let lost = store.mark_lost_nodes(i64::MAX, i64::MIN).await.unwrap();
    assert_eq!(lost.len(), 3, "n_eu, n_eu2 and n_us");
    assert_eq!(listeners::sync(&store).await.unwrap(), ["n_eu"]);
    assert!(listeners_of(&store, &keyring, "n_eu").await.is_empty());
    assert!(listeners::sync(&store).await.unwrap().is_empty());
}

fn row(node: &str, id: &str, env: &str, release: &str, state: &str, address: &str) -> ListenerRow {
    ListenerRow {
        node_id: node.into(),
        node_name: None,
        id: id.into(),
        env_id: env.into(),
        release_id: release.into(),
        workload: "echo".into(),
        state: state.into(),
        message: None,
        address: Some(address.into()),
        active: 2,
        served: 40,
        failed: 1,
        last_failure: Some("trap: unreachable".into()),
        last_failure_category: Some("crash".into()),
        last_failure_at: Some(5),
        updated_at: 6,
    }
}

async fn listener_rows_are_replaced_per_node_and_read_by_env(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let env = env(&store).await;
    nodes(
        &store,
        &[("n_a", "{}"), ("n_b", "{}")],
        &["n_a", "n_b"],
        &[],
    )
    .await;
    let m = verge_api::manifest::parse("verge.toml", MANIFEST).unwrap();
    release(&store, &env, "rel_1", 1, &m).await;
    release(&store, &env, "rel_2", 2, &m).await;
    assert_eq!(
        store.release_env("rel_2").await.unwrap().as_deref(),
        Some(env.as_str())
    );
    assert_eq!(store.release_env("rel_none").await.unwrap(), None);
    let current: Vec<String> = store
        .current_releases()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(current, ["rel_2"]);

    let old = row(
        "n_a",
        "lst-rel_1-echo",
        &env,
        "rel_1",
        "listening",
        "fd00:1::2",
    );
    let mut big = row(
        "n_a",
        "lst-rel_2-echo",
        &env,
        "rel_2",
        "starting",
        "fd00:1::3",
    );
    big.served = i64::MAX;
    store
        .replace_listeners("n_a", &[old.clone(), big.clone()])
        .await
        .unwrap();
    let on_b = row(
        "n_b",
        "lst-rel_2-echo",
        &env,
        "rel_2",
        "listening",
        "fd00:2::3",
    );
    // In a mutation, with the event of its change.
    let mut tx = store.mutation().await.unwrap();
    tx.replace_listeners("n_b", std::slice::from_ref(&on_b))
        .await
        .unwrap();
    tx.emit(NewEvent {
        env_id: Some(&env),
        instance_id: Some("lst-rel_2-echo"),
        node_id: Some("n_b"),
        kind: "listener.listening",
        message: "listening".into(),
        ..NewEvent::default()
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let named = |mut r: ListenerRow, name: &str| {
        r.node_name = Some(name.into());
        r
    };
    assert_eq!(
        store.env_listeners(&env).await.unwrap(),
        [
            named(old.clone(), "n_a"),
            named(big.clone(), "n_a"),
            named(on_b.clone(), "n_b"),
        ]
    );
    // The next report replaces the node's rows, and only that node's.
    let mut listening = big.clone();
    listening.state = "listening".into();
    store
        .replace_listeners("n_a", std::slice::from_ref(&listening))
        .await
        .unwrap();
    assert_eq!(
        store.node_listeners("n_a").await.unwrap(),
        [named(listening, "n_a")]
    );
    assert_eq!(
        store.node_listeners("n_b").await.unwrap(),
        [named(on_b, "n_b")]
    );
    store.replace_listeners("n_a", &[]).await.unwrap();
    assert!(store.node_listeners("n_a").await.unwrap().is_empty());
    assert_eq!(store.env_listeners(&env).await.unwrap().len(), 1);

    // The digest moves a node's version only when it changes.
    assert!(store.sync_listener_digest("n_a", "d1").await.unwrap());
    assert!(!store.sync_listener_digest("n_a", "d1").await.unwrap());
    assert!(store.sync_listener_digest("n_a", "").await.unwrap());
    assert!(!store.sync_listener_digest("n_b", "").await.unwrap());
    assert_eq!(version(&store, "n_a").await, 2);
    assert_eq!(
        store.listener_digests().await.unwrap(),
        BTreeMap::from([
            ("n_a".to_string(), Some(String::new())),
            ("n_b".to_string(), None),
        ])
    );
}

async fn a_per_connection_endpoint_routes_to_listening_listeners(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let env = env(&store).await;
    let eu = r#"{"region": "eu"}"#;
    nodes(
        &store,
        &[("n1", eu), ("n2", eu), ("n3", eu), ("n4", eu)],
        &["n1", "n2", "n4"],
        &["n2"],
    )
    .await;
    let m = verge_api::manifest::parse("verge.toml", MANIFEST).unwrap();
    release(&store, &env, "rel_1", 1, &m).await;
    release(&store, &env, "rel_2", 2, &m).await;
    let cur = "lst-rel_2-echo";
    let rows = [
        // An IP address: the endpoint's internal port; reached directly.
        (
            "n1",
            row("n1", cur, &env, "rel_2", "listening", "fd00:1::5"),
        ),
        // The previous release's, still draining: out.
        (
            "n1",
            row(
                "n1",
                "lst-rel_1-echo",
                &env,
                "rel_1",
                "listening",
                "fd00:1::4",
            ),
        ),
        // Loopback `ip:port` kept as is; behind NAT: through the tunnel.
        (
            "n2",
            row("n2", cur, &env, "rel_2", "listening", "127.0.0.1:41000"),
        ),
        // Offline node: out.
        (
            "n3",
            row("n3", cur, &env, "rel_2", "listening", "fd00:3::5"),
        ),
        // Not listening yet: out.
        ("n4", row("n4", cur, &env, "rel_2", "starting", "fd00:4::5")),
    ];
    for n in ["n1", "n2", "n3", "n4"] {
        let mine: Vec<ListenerRow> = rows
            .iter()
            .filter(|(node, _)| *node == n)
            .map(|(_, r)| r.clone())
            .collect();
        store.replace_listeners(n, &mine).await.unwrap();
    }

    let table = verge_control::routing::table(&store, &pools())
        .await
        .unwrap();
    let route = |name: &str| {
        table
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("endpoint {name} in {table:?}"))
    };
    let a = route("a");
    let backends: Vec<(String, String, String, String)> = a
        .backends
        .iter()
        .map(|b| {
            (
                b.instance.clone(),
                b.node_name.clone(),
                b.address.to_string(),
                format!("{:?}", b.reach),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            (
                cur.to_string(),
                "n1".to_string(),
                "[fd00:1::5]:7000".to_string(),
                "Direct".to_string()
            ),
            (
                cur.to_string(),
                "n2".to_string(),
                "127.0.0.1:41000".to_string(),
                "Tunnel".to_string()
            ),
        ]
    );
    // Endpoint b fronts the same workload on another internal port.
    assert_eq!(
        route("b").backends[0].address.to_string(),
        "[fd00:1::5]:7001"
    );

    // `verge describe endpoint` lists every listener, with why it is out.
    let exposed =
        verge_control::routing::exposed(&store, std::slice::from_ref(&env), &pools(), true)
            .await
            .unwrap();
    let a = exposed.iter().find(|e| e.name == "a").unwrap();
    assert!(a.backends.iter().all(|b| b.listener), "{a:?}");
    let states: Vec<(Option<String>, String, bool, Option<String>)> = a
        .backends
        .iter()
        .map(|b| {
            (
                b.node.clone(),
                b.state.clone(),
                b.in_rotation,
                b.reason.clone(),
            )
        })
        .collect();
    let out = |r: &str| Some(r.to_string());
    assert_eq!(
        states,
        [
            (
                out("n1"),
                "listening".into(),
                false,
                out("leaving: an earlier release; open connections drain, no new ones")
            ),
            (out("n1"), "listening".into(), true, None),
            (out("n2"), "listening".into(), true, None),
            (
                out("n3"),
                "listening".into(),
                false,
                out("node n3 is offline")
            ),
            (
                out("n4"),
                "starting".into(),
                false,
                out("starting, not listening yet")
            ),
        ]
    );
}

async fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, payload) = text.split_once("\r\n\r\n").expect("headers end");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}"));
    (status, json)
}

/// `verge status` (and `describe workload`) of a per-connection workload:
/// no instances, its listeners with their counters; `verge scale` refuses
/// it a count.
async fn status_shows_per_connection_workloads_with_their_listeners(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let config = verge_control::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: dir.path().to_path_buf(),
        database: match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(verge_tests::postgres::fresh_database().await),
        },
        ..verge_control::Config::default()
    };
    let shutdown = CancellationToken::new();
    let started = verge_control::start(&config, shutdown.clone())
        .await
        .expect("control plane starts");
    let (addr, token) = (started.local_addr, started.admin_token.clone().unwrap());
    let api = |method: &'static str, path: String, body: Option<Value>| {
        let token = token.clone();
        async move { call(addr, &token, method, &path, body).await }
    };
    for (path, body) in [
        ("/v1/orgs", json!({"name": "acme"})),
        ("/v1/orgs/acme/projects", json!({"name": "p"})),
        (
            "/v1/orgs/acme/apps",
            json!({"name": "shop", "project": "p"}),
        ),
        ("/v1/orgs/acme/apps/shop/envs", json!({"name": "prod"})),
    ] {
        let (status, answer) = api("POST", path.into(), Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }
    let store = &started.store;
    let org = store.org_by_name("acme").await.unwrap().unwrap();
    let app = store.app_by_name(&org.id, "shop").await.unwrap().unwrap();
    let env = store
        .env_by_name(&app.id, "prod")
        .await
        .unwrap()
        .unwrap()
        .id;
    let eu = r#"{"region": "eu"}"#;
    nodes(store, &[("n1", eu), ("n2", eu)], &["n1", "n2"], &[]).await;
    let m = verge_api::manifest::parse("verge.toml", MANIFEST).unwrap();
    release(store, &env, "rel_1", 1, &m).await;
    let mut n1 = row(
        "n1",
        "lst-rel_1-echo",
        &env,
        "rel_1",
        "listening",
        "fd00:1::5",
    );
    n1.last_failure_at = Some(2_000_000_000_000);
    let mut n2 = row("n2", "lst-rel_1-echo", &env, "rel_1", "failed", "fd00:2::5");
    n2.message = Some("pulling r/echo:1: not found".into());
    (n2.active, n2.served, n2.failed) = (0, 0, 0);
    (
        n2.last_failure,
        n2.last_failure_category,
        n2.last_failure_at,
    ) = (None, None, None);
    store.replace_listeners("n1", &[n1]).await.unwrap();
    store.replace_listeners("n2", &[n2]).await.unwrap();

    let e = "/v1/orgs/acme/apps/shop/envs/prod";
    let (status, s) = api("GET", format!("{e}/status"), None).await;
    assert_eq!(status, 200, "{s}");
    let workload = |name: &str| {
        s["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {s}"))
    };
    let echo = workload("echo");
    assert_eq!(
        (
            &echo["runtime"],
            &echo["mode"],
            &echo["desired"],
            &echo["running"],
            &echo["instances"]
        ),
        (
            &json!("wasm"),
            &json!("per-connection"),
            &json!(0),
            &json!(0),
            &json!([])
        ),
        "{echo}"
    );
    assert_eq!(
        echo["listeners"],
        json!([
            {
                "id": "lst-rel_1-echo", "node": "n1", "state": "listening",
                "address": "fd00:1::5", "answering": true, "reason": null, "release": 1,
                "active": 2, "served": 40, "failed": 1, "last_failure": "trap: unreachable",
                "last_failure_category": "crash", "last_failure_at": "2033-05-18T03:33:20Z",
            },
            {
                "id": "lst-rel_1-echo", "node": "n2", "state": "failed", "address": "fd00:2::5",
                "answering": false, "reason": "pulling r/echo:1: not found", "release": 1,
                "active": 0, "served": 0, "failed": 0, "last_failure": null,
                "last_failure_category": null, "last_failure_at": null,
            },
        ])
    );
    let web = workload("web");
    assert_eq!(
        (&web["runtime"], &web["mode"], &web["listeners"]),
        (&json!("process"), &json!("long-running"), &json!([]))
    );
    let (status, d) = api("GET", format!("{e}/workloads/echo"), None).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], echo);

    // A count for a per-connection workload is refused, nothing changed.
    let (status, err) = api(
        "POST",
        format!("{e}/scale"),
        Some(json!({"workloads": {"echo": {"count": 2}}})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("echo is a per-connection workload, which keeps no instances"),
        "{message}"
    );
    assert!(store.scale_overrides(&env).await.unwrap().is_empty());

    shutdown.cancel();
    started.wait().await;
}
