//! Deploying wasm workloads through the HTTP API of a control plane (in
//! process, without nodes) against a real registry (Debian's
//! `docker-registry`): a release whose pinned image does not suit its
//! workload's runtime is refused before it is created; a per-connection
//! workload is released with no instances to place.

use std::net::SocketAddr;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use verge_control::images::WASM_CONFIG_MEDIA_TYPE;
use verge_tests::registry::Registry;

/// Pushes `repo:1`, one layer, config of the given media type; its reference.
async fn push(registry: &Registry, repo: &str, wasm: bool) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reference = format!("{}/{repo}:1", registry.host());
    let parsed: Reference = reference.parse().unwrap();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.host().to_string()]),
        ..Default::default()
    });
    let (config_type, config, layer_type, layer): (&str, &[u8], &str, &[u8]) = if wasm {
        (
            WASM_CONFIG_MEDIA_TYPE,
            br#"{"architecture":"wasm","os":"wasip1"}"#,
            "application/wasm",
            b"\0asm\x01\0\0\0",
        )
    } else {
        (
            "application/vnd.oci.image.config.v1+json",
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            b"not really a tarball",
        )
    };
    let layers = [ImageLayer::new(
        layer.to_vec(),
        layer_type.to_string(),
        None,
    )];
    let config = Config::new(config.to_vec(), config_type.to_string(), None);
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.into());
    client
        .push(
            &parsed,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .unwrap_or_else(|e| panic!("push {reference}: {e}\n{}", registry.log_tail()));
    reference
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

#[tokio::test]
async fn runtimes_must_suit_their_artifacts_and_per_connection_workloads_deploy() {
    let registry = Registry::start().await.expect("registry starts");
    let wasm = push(&registry, "echo-wasm", true).await;
    let container = push(&registry, "hello", false).await;

    let dir = tempfile::tempdir().unwrap();
    let config = verge_control::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: dir.path().to_path_buf(),
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
    let e = "/v1/orgs/acme/apps/shop/envs/prod";
    let deploy = |manifest: String| {
        api(
            "POST",
            format!("{e}/deploys"),
            Some(json!({"manifest": manifest})),
        )
    };
    let workload = |name: &str, runtime: &str, image: &str| {
        format!("[workloads.{name}]\nruntime = \"{runtime}\"\nimage = \"{image}\"\n")
    };

    // A wasm artifact as a process, a container image as wasm: refused,
    // each named with its fix; no release.
    let (status, err) = deploy(format!(
        "app = \"shop\"\n{}{}",
        workload("web", "process", &wasm),
        workload("api", "wasm", &container)
    ))
    .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["kind"], "image", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2 workloads cannot run the images they name: no release was created"),
        "{message}"
    );
    let details: Vec<&str> = err["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(
        details[0].starts_with("workload api: image ")
            && details[0].contains("is a container image, but the workload has runtime = \"wasm\""),
        "{details:?}"
    );
    assert!(
        details[1].starts_with("workload web: image ")
            && details[1]
                .contains("is a wasm artifact, but the workload has runtime = \"process\""),
        "{details:?}"
    );
    assert!(
        err["error"]["next"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("--image web=IMAGE")),
        "{err}"
    );
    let (status, releases) = api("GET", format!("{e}/releases"), None).await;
    assert_eq!((status, releases), (200, json!([])));

    // The right runtimes: released; the per-connection workload has no
    // instances to place.
    let (status, receipt) = deploy(format!(
        "app = \"shop\"\n{}{}mode = \"per-connection\"\n\
         [[endpoints]]\nname = \"echo\"\nworkload = \"echo\"\nport = 7\ninternal_port = 7000\n",
        workload("web", "process", &container),
        workload("echo", "wasm", &wasm)
    ))
    .await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(
        receipt["desired"],
        json!({"echo": 0, "web": 1}),
        "{receipt}"
    );
    let (status, s) = api("GET", format!("{e}/status"), None).await;
    assert_eq!(status, 200, "{s}");
    let echo = s["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "echo")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            &echo["runtime"],
            &echo["mode"],
            &echo["instances"],
            &echo["listeners"]
        ),
        (
            &json!("wasm"),
            &json!("per-connection"),
            &json!([]),
            &json!([])
        ),
        "no node yet: no listener"
    );

    shutdown.cancel();
    started.wait().await;
}
