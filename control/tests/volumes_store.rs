//! Volumes: the store's rows on SQLite and PostgreSQL, and the HTTP API of
//! a control plane without nodes (in process), on both backends too. The
//! operations that reach nodes are covered end to end in `tests/`.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use verge_api::wire::VolumeUsage;
use verge_control::store::{Backend, NewNode, NewVolume, OpEnd, SnapshotRow, Store, StoreError};

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
    volume_names_are_unique_per_env_and_listed_by_name,
    an_operation_runs_and_ends_with_what_the_node_said,
    heartbeats_record_the_use_of_known_volumes_only,
    snapshots_outlive_their_volume_and_stay_in_their_env,
    space_is_pending_until_the_next_heartbeat,
    the_api_lists_refuses_bad_input_and_explains_placement,
);

async fn database_url(backend: Backend, dir: &tempfile::TempDir) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("verge.db").display()),
        Backend::Postgres => verge_tests::postgres::fresh_database().await,
    }
}

async fn open(backend: Backend) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&database_url(backend, &dir).await)
        .await
        .expect("open store");
    (store, dir)
}

/// Two envs (`acme/shop/prod`, `acme/shop/dev`) and two nodes (`n_a`, `n_b`).
async fn seed(store: &Store) -> (String, String) {
    let org = store.create_org("acme").await.unwrap();
    let project = store.create_project(&org.id, "p").await.unwrap();
    let app = store.create_app(&org.id, &project, "shop").await.unwrap();
    let prod = store.create_env(&app, "prod").await.unwrap();
    let dev = store.create_env(&app, "dev").await.unwrap();
    let mut tx = store.mutation().await.unwrap();
    for (id, name) in [("n_a", "a"), ("n_b", "b")] {
        let node = NewNode {
            id,
            name,
            labels: "{}",
            cpu_millis: 1000,
            memory: 1 << 30,
            isolation: "namespaces",
            version: "test",
            cert_sha256: id,
            join_token_id: "jt",
        };
        tx.insert_node(&node, |i| Some(format!("fd00:{i}::/64")))
            .await
            .unwrap()
            .unwrap();
    }
    tx.commit().await.unwrap();
    (prod.id, dev.id)
}

async fn insert(store: &Store, env: &str, name: &str, node: &str, size: i64) -> String {
    let mut tx = store.mutation().await.unwrap();
    let new = NewVolume {
        env_id: env,
        name,
        node_id: node,
        size,
        state: "creating",
        op: "create",
    };
    let row = tx.insert_volume(&new).await.unwrap();
    tx.commit().await.unwrap();
    row.id
}

async fn volume_names_are_unique_per_env_and_listed_by_name(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let (prod, dev) = seed(&store).await;
    let data = insert(&store, &prod, "data", "n_a", 1 << 30).await;
    assert!(data.starts_with("vol_"), "{data}");
    insert(&store, &prod, "cache", "n_b", 64 << 20).await;
    // The same name in another env is another volume.
    insert(&store, &dev, "data", "n_b", 1 << 30).await;
    let mut tx = store.mutation().await.unwrap();
    let again = NewVolume {
        env_id: &prod,
        name: "data",
        node_id: "n_b",
        size: 1 << 20,
        state: "creating",
        op: "create",
    };
    assert!(matches!(
        tx.insert_volume(&again).await,
        Err(StoreError::Conflict)
    ));
    drop(tx);
    let names: Vec<String> = store
        .volumes(&prod)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["cache", "data"]);
    let row = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!(
        (row.id.as_str(), row.node_id.as_str(), row.size),
        (data.as_str(), "n_a", 1 << 30)
    );
    assert_eq!(
        (row.state.as_str(), row.op.as_deref()),
        ("creating", Some("create"))
    );
    assert!(row.op_started.is_some());
    assert!(store.volume_by_name(&prod, "nope").await.unwrap().is_none());
    let on_b: Vec<String> = store
        .node_volumes("n_b")
        .await
        .unwrap()
        .into_iter()
        .map(|v| format!("{}:{}", v.env_id == dev, v.name))
        .collect();
    assert_eq!(on_b, ["false:cache", "true:data"]);
    let mut tx = store.mutation().await.unwrap();
    tx.delete_volume(&data).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.volume_by_name(&prod, "data").await.unwrap().is_none());
}

async fn an_operation_runs_and_ends_with_what_the_node_said(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let (prod, _) = seed(&store).await;
    let id = insert(&store, &prod, "data", "n_a", 1 << 30).await;
    let mut tx = store.mutation().await.unwrap();
    let end = OpEnd {
        state: "ready",
        size: Some(1_073_741_824),
        used: Some(4096),
        backend: Some("loop"),
        message: None,
    };
    tx.end_volume_op(&id, &end).await.unwrap();
    tx.commit().await.unwrap();
    let v = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!((v.state.as_str(), v.op.as_deref()), ("ready", None));
    assert_eq!((v.used, v.backend.as_deref()), (Some(4096), Some("loop")));
    assert!(v.used_at.is_some() && v.op_started.is_none());

    let mut tx = store.mutation().await.unwrap();
    tx.start_volume_op(&id, "resize", "resizing").await.unwrap();
    tx.commit().await.unwrap();
    store.touch_volume_op(&id).await.unwrap();
    let v = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!(
        (v.state.as_str(), v.op.as_deref()),
        ("resizing", Some("resize"))
    );
    // A refusal keeps size and use, and says why.
    let mut tx = store.mutation().await.unwrap();
    let end = OpEnd {
        state: "ready",
        message: Some("resizing failed: no space".into()),
        ..OpEnd::default()
    };
    tx.end_volume_op(&id, &end).await.unwrap();
    tx.commit().await.unwrap();
    let after = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!(after.size, 1 << 30);
    assert_eq!(after.used, Some(4096));
    assert_eq!(after.used_at, v.used_at);
    assert_eq!(after.message.as_deref(), Some("resizing failed: no space"));
    assert_eq!(after.op, None);
}

async fn heartbeats_record_the_use_of_known_volumes_only(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let (prod, _) = seed(&store).await;
    let data = insert(&store, &prod, "data", "n_a", 1 << 30).await;
    let other = insert(&store, &prod, "other", "n_b", 1 << 30).await;
    let mut tx = store.mutation().await.unwrap();
    tx.end_volume_op(
        &data,
        &OpEnd {
            state: "ready",
            ..OpEnd::default()
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = |volume: &str, size: u64, used: u64| VolumeUsage {
        volume: volume.into(),
        size,
        used,
        backend: "directory".into(),
    };
    let reported = [
        report(&data, 2 << 30, 100),
        // Another node's volume and an unknown one are ignored.
        report(&other, 1 << 30, 7),
        report("vol_unknown", 1 << 30, 7),
    ];
    let written = store
        .record_volume_usage("n_a", &reported, 60_000)
        .await
        .unwrap();
    assert_eq!(written, 1);
    let v = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!(
        (v.used, v.backend.as_deref()),
        (Some(100), Some("directory"))
    );
    // A resize whose answer was lost: the node's larger size is taken.
    assert_eq!(v.size, 2 << 30);
    let o = store.volume_by_name(&prod, "other").await.unwrap().unwrap();
    assert_eq!(o.used, None);
    // The same report again within the refresh interval writes nothing.
    let written = store
        .record_volume_usage("n_a", &reported[..1], 60_000)
        .await
        .unwrap();
    assert_eq!(written, 0);
    // While an operation runs, the size is the operation's to set.
    let mut tx = store.mutation().await.unwrap();
    tx.start_volume_op(&data, "resize", "resizing")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    store
        .record_volume_usage("n_a", &[report(&data, 3 << 30, 200)], 60_000)
        .await
        .unwrap();
    let v = store.volume_by_name(&prod, "data").await.unwrap().unwrap();
    assert_eq!((v.size, v.used), (2 << 30, Some(200)));
}

async fn snapshots_outlive_their_volume_and_stay_in_their_env(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let (prod, dev) = seed(&store).await;
    let data = insert(&store, &prod, "data", "n_a", 1 << 30).await;
    let mut tx = store.mutation().await.unwrap();
    let mut ids = Vec::new();
    for at in [2_000, 1_000] {
        let id = verge_control::store::new_snapshot_id();
        assert!(id.starts_with("snap_"), "{id}");
        tx.insert_snapshot(&SnapshotRow {
            id: id.clone(),
            volume_id: data.clone(),
            volume_name: "data".into(),
            env_id: prod.clone(),
            node_id: "n_a".into(),
            size: 1 << 30,
            used: Some(10),
            created_at: at,
        })
        .await
        .unwrap();
        ids.push(id);
    }
    tx.delete_volume(&data).await.unwrap();
    tx.commit().await.unwrap();
    // Oldest first, still there without their volume.
    let listed: Vec<String> = store
        .snapshots(&prod, Some("data"))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, [ids[1].clone(), ids[0].clone()]);
    assert_eq!(store.snapshots(&prod, None).await.unwrap().len(), 2);
    assert!(
        store
            .snapshots(&prod, Some("other"))
            .await
            .unwrap()
            .is_empty()
    );
    let s = store.snapshot(&prod, &ids[0]).await.unwrap().unwrap();
    assert_eq!((s.volume_id.as_str(), s.used), (data.as_str(), Some(10)));
    // Another env does not see them.
    assert!(store.snapshot(&dev, &ids[0]).await.unwrap().is_none());
    assert!(store.snapshots(&dev, None).await.unwrap().is_empty());
    let mut tx = store.mutation().await.unwrap();
    tx.delete_snapshot(&ids[0]).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.snapshot(&prod, &ids[0]).await.unwrap().is_none());
}

async fn space_is_pending_until_the_next_heartbeat(backend: Backend) {
    let (store, _dir) = open(backend).await;
    let (prod, _) = seed(&store).await;
    insert(&store, &prod, "a1", "n_a", 1 << 30).await;
    insert(&store, &prod, "a2", "n_a", 2 << 30).await;
    insert(&store, &prod, "b1", "n_b", 1 << 20).await;
    let mut pending = store.volume_bytes_since_heartbeat().await.unwrap();
    pending.sort();
    assert_eq!(
        pending,
        [("n_a".to_string(), 3 << 30), ("n_b".to_string(), 1 << 20)]
    );
    // A heartbeat after them counts them in the node's free space.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let a = store.node("n_a").await.unwrap().unwrap();
    store.node_heartbeat(&a, 1000, 1 << 30, "{}").await.unwrap();
    let pending = store.volume_bytes_since_heartbeat().await.unwrap();
    assert_eq!(pending, [("n_b".to_string(), 1 << 20)]);
}

/// A raw HTTP/1.1 request to the control plane: status and JSON body.
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
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let json = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}"))
    };
    (status, json)
}

async fn the_api_lists_refuses_bad_input_and_explains_placement(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let config = verge_control::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: dir.path().to_path_buf(),
        database: match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(database_url(backend, &dir).await),
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
        ("/v1/orgs/acme/projects", json!({"name": "web"})),
        (
            "/v1/orgs/acme/apps",
            json!({"name": "shop", "project": "web"}),
        ),
        ("/v1/orgs/acme/apps/shop/envs", json!({"name": "prod"})),
    ] {
        let (status, answer) = api("POST", path.into(), Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }
    let e = "/v1/orgs/acme/apps/shop/envs/prod";

    let (status, list) = api("GET", format!("{e}/volumes"), None).await;
    assert_eq!((status, list), (200, json!([])));

    // No node: the placement explanation says how to get one.
    let gi = 1u64 << 30;
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "data", "size": gi})),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no node can take volume data (1Gi)"),
        "{message}"
    );
    assert!(
        message.contains("no nodes have joined the cluster"),
        "{message}"
    );
    assert!(message.contains("verge nodes join-token"), "{message}");

    // Bad input names the field and changes nothing.
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "Data", "size": gi})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("volume name \"Data\""),
        "{err}"
    );
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "data", "size": 1000})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("size 1000 bytes is too small"),
        "{message}"
    );
    assert_eq!(err["error"]["next"][0], "pass --size 16Mi or more");
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "data", "size": gi, "sise": 1})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "data", "size": gi, "node": "n1", "region": "eu"})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "data", "size": gi, "node": "n1"})),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node \"n1\" not found"),
        "{err}"
    );
    let (_, list) = api("GET", format!("{e}/volumes"), None).await;
    assert_eq!(list, json!([]));

    // Unknown volumes and snapshots are 404 with what to do.
    let (status, err) = api("GET", format!("{e}/volumes/data"), None).await;
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"]["next"][0]
            .as_str()
            .unwrap()
            .contains("verge volumes create data"),
        "{err}"
    );
    for (method, path, body) in [
        (
            "POST",
            format!("{e}/volumes/data/resize"),
            Some(json!({"size": gi})),
        ),
        ("POST", format!("{e}/volumes/data/snapshots"), None),
        ("GET", format!("{e}/volumes/data/snapshots"), None),
        ("DELETE", format!("{e}/volumes/data"), None),
        (
            "POST",
            format!("{e}/volumes/restore"),
            Some(json!({"snapshot": "snap_x"})),
        ),
        ("DELETE", format!("{e}/snapshots/snap_x"), None),
    ] {
        let (status, err) = api(method, path.clone(), body).await;
        assert_eq!(status, 404, "{method} {path}: {err}");
        assert_eq!(err["error"]["kind"], "not_found", "{method} {path}: {err}");
    }
    // Another org's token sees no volumes of acme: 404 like a missing env.
    let (status, _) = api("POST", "/v1/orgs".into(), Some(json!({"name": "other"}))).await;
    assert_eq!(status, 201);
    let (status, created) = api("POST", "/v1/tokens".into(), Some(json!({"org": "other"}))).await;
    assert_eq!(status, 201, "{created}");
    let other = created["token"].as_str().unwrap().to_string();
    let (status, err) = call(addr, &other, "GET", &format!("{e}/volumes"), None).await;
    assert_eq!(status, 404, "{err}");
    let (status, _) = call(
        addr,
        &other,
        "POST",
        &format!("{e}/volumes"),
        Some(json!({"name": "data", "size": gi})),
    )
    .await;
    assert_eq!(status, 404);
    // The reserved name.
    let (status, err) = api(
        "POST",
        format!("{e}/volumes"),
        Some(json!({"name": "restore", "size": gi})),
    )
    .await;
    assert_eq!(status, 400, "{err}");

    shutdown.cancel();
    started.wait().await;
}
