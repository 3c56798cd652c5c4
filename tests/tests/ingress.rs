//! The ingress end to end, as root: a real control plane, real nodes in
//! network namespaces, the `hello` workload, and a real `verge ingress`
//! listening on each endpoint's own IPv6 address (a `local` route for the
//! cluster's endpoint prefix) and on IPv4 only when asked.
//!
//! Traffic over IPv6 on every external port; nothing on IPv4 until
//! `ipv4 = true`; PROXY v2 headers carrying the real client address and the
//! endpoint's address, checked by what hello received, on the direct path
//! and on the QUIC path to a node behind NAT; `verge endpoints`, `describe
//! endpoint` and `/metrics`; port conflicts refused at deploy time.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use verge_tests::cluster::{Cluster, DEADLINE, v6};
use verge_tests::control::Backend;
use verge_tests::eventually;

/// Connects to `addr` and reads the greeting; returns it with the local
/// address the connection came from.
async fn greeting(addr: SocketAddr) -> Option<(String, SocketAddr)> {
    let connect = tokio::net::TcpStream::connect(addr);
    let mut s = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    let local = s.local_addr().ok()?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| (String::from_utf8_lossy(&buf[..n]).to_string(), local))
}

/// Waits for a greeting from instance `id` at `addr`.
async fn greeted_by(addr: SocketAddr, id: &str) -> (String, SocketAddr) {
    eventually(
        DEADLINE,
        &format!("a greeting from {id} at {addr}"),
        || async {
            greeting(addr)
                .await
                .filter(|(g, _)| g.contains(&format!("hello from instance {id}")))
        },
    )
    .await
}

/// `[ip]` of a JSON address.
fn ip_of(v: &Value) -> String {
    v.as_str().expect("an address").to_string()
}

#[tokio::test]
async fn endpoints_serve_ipv6_on_every_port_ipv4_only_when_asked_with_proxy_v2() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let image = c.registry.push_hello().await;
    let ingress = c.ingress().await;
    c.deploy(
        &image,
        1,
        "",
        "ports = [80, 8443]\nproxy_protocol = \"v2\"\ndrain_timeout = \"1s\"\nidle_timeout = \"2s\"",
    )
    .await;
    let id = c.running(1).await[0]["id"].as_str().unwrap().to_string();

    let listed = c.json(&["endpoints"]).await;
    let e = &listed[0];
    assert_eq!(
        (&e["name"], &e["app"], &e["env"], &e["workload"]),
        (
            &"public".into(),
            &"hello".into(),
            &"prod".into(),
            &"web".into()
        ),
        "{listed}"
    );
    assert_eq!(e["ports"], serde_json::json!([80, 8443]), "{listed}");
    assert_eq!(e["internal_port"], 8080, "{listed}");
    assert_eq!(e["proxy_protocol"], "v2", "{listed}");
    assert!(e["ipv4"].is_null(), "no IPv4 unless asked: {listed}");
    let ipv6 = ip_of(&e["ipv6"]);
    let prefix: ipnet::Ipv6Net = c.endpoint_prefix.parse().unwrap();
    assert!(
        prefix.contains(&ipv6.parse::<std::net::Ipv6Addr>().unwrap()),
        "{ipv6} comes from {prefix}"
    );

    // Every external port, over IPv6; hello saw the PROXY v2 header with
    // this connection's own source address and the endpoint's address.
    for port in [80, 8443] {
        let (g, local) = greeted_by(v6(&ipv6, port), &id).await;
        assert!(
            g.contains(&format!("client: {local} to [{ipv6}]:{port} (proxy v2)")),
            "the header names the real client {local} and [{ipv6}]:{port}: {g}"
        );
    }
    // hello never closes a connection: the ingress does, once it has been
    // quiet for the endpoint's idle_timeout.
    let mut quiet = tokio::net::TcpStream::connect(v6(&ipv6, 80)).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = quiet.read(&mut buf).await.unwrap();
    assert!(n > 0, "a greeting first");
    let opened = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(30), quiet.read(&mut buf))
        .await
        .expect("the ingress closes a quiet connection at its idle timeout");
    assert!(
        matches!(end, Ok(0)) && opened.elapsed() >= Duration::from_secs(1),
        "closed after the 2s idle timeout: {end:?} after {:?}",
        opened.elapsed()
    );
    let human = c.cli.run(&["endpoints"]).await.ok();
    assert!(
        human.contains(&format!("[{ipv6}]"))
            && human.contains("80,8443")
            && human.contains("web:8080"),
        "{human}"
    );

    // Nothing listens on the IPv4 address.
    let v4 = SocketAddr::new(c.endpoint_ipv4.into(), 80);
    assert!(
        tokio::net::TcpStream::connect(v4).await.is_err(),
        "nothing listens on {v4} before ipv4 = true"
    );
    // Until the endpoint asks for it.
    c.deploy(
        &image,
        1,
        "",
        "ports = [80, 8443]\nproxy_protocol = \"v2\"\nipv4 = true\ndrain_timeout = \"1s\"\nidle_timeout = \"2s\"",
    )
    .await;
    let e = c.endpoint("public").await;
    assert_eq!(e["ipv4"], c.endpoint_ipv4.to_string(), "{e}");
    assert_eq!(ip_of(&e["ipv6"]), ipv6, "the IPv6 address stays: {e}");
    let (g, local) = greeted_by(v4, &id).await;
    assert!(
        g.contains(&format!("client: {local} to {v4} (proxy v2)")),
        "IPv4 header: {g}"
    );

    // describe endpoint: the backend in rotation, the ingress listening.
    let e = c.endpoint("public").await;
    let b = &e["backends"][0];
    assert_eq!(
        (&b["instance"], &b["in_rotation"], &b["reach"]),
        (
            &Value::from(id.as_str()),
            &Value::from(true),
            &Value::from("direct")
        ),
        "{e}"
    );
    let listeners = eventually(
        DEADLINE,
        "the ingress to report its four sockets",
        || async {
            let e = c.endpoint("public").await;
            let l = e["listeners"].as_array().cloned().unwrap_or_default();
            (l.len() == 4 && l.iter().all(|l| l["error"].is_null())).then_some(l)
        },
    )
    .await;
    assert!(
        listeners
            .iter()
            .any(|l| l["address"] == format!("[{ipv6}]:8443")),
        "{listeners:?}"
    );
    let text = c.cli.run(&["describe", "endpoint", "public"]).await.ok();
    assert!(
        text.contains(&id) && text.contains("in rotation") && text.contains("listening"),
        "{text}"
    );

    // /metrics: per endpoint, with bytes and connect latency.
    let m = ingress.metrics().await;
    let label = "endpoint=\"acme/hello/prod/public\"";
    for family in [
        "verge_ingress_connections_total",
        "verge_ingress_backend_connect_seconds_count",
    ] {
        let line = m
            .lines()
            .find(|l| l.starts_with(family) && l.contains(label))
            .unwrap_or_else(|| panic!("{family} in\n{m}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 3.0, "{line}");
    }
    assert!(
        m.lines().any(|l| l.starts_with("verge_ingress_bytes_total")
            && l.contains("to_client")
            && !l.ends_with(" 0")),
        "{m}"
    );
}

#[tokio::test]
async fn a_node_behind_nat_is_reached_through_its_quic_connection_with_proxy_v2() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    // Its instance prefix is not routed: only its session reaches it.
    let _edge = c.node(1, "edge1", &["--behind-nat"], false).await;
    let image = c.registry.push_hello().await;
    let _ingress = c.ingress().await;
    c.deploy(
        &image,
        1,
        "",
        "proxy_protocol = \"v2\"\ndrain_timeout = \"1s\"",
    )
    .await;
    let inst = &c.running(1).await[0];
    let id = inst["id"].as_str().unwrap().to_string();
    let direct = inst["address"].as_str().unwrap().to_string();
    assert!(
        verge_tests::nodes::greet(&direct).await.is_none(),
        "the instance's own address {direct} is not reachable from here"
    );
    let e = c.endpoint("public").await;
    assert_eq!(e["backends"][0]["reach"], "tunnel", "{e}");
    let ipv6 = ip_of(&e["ipv6"]);
    let (g, local) = greeted_by(v6(&ipv6, 80), &id).await;
    assert!(
        g.contains(&format!("client: {local} to [{ipv6}]:80 (proxy v2)")),
        "the QUIC path carries the header: {g}"
    );
    // Bytes both ways through the stream: hello echoes.
    let mut s = tokio::net::TcpStream::connect(v6(&ipv6, 80)).await.unwrap();
    let mut greeting = vec![0u8; 1024];
    let _ = s.read(&mut greeting).await.unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        w.write_all(&send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .expect("the echo ends after the half-close")
        .unwrap();
    writer.await.unwrap();
    assert!(
        back == payload,
        "{} bytes echoed of {}",
        back.len(),
        payload.len()
    );
}

verge_tests::on_both_backends!(port_conflicts_are_refused_at_deploy_and_change_nothing);

async fn port_conflicts_are_refused_at_deploy_and_change_nothing(backend: Backend) {
    let c = Cluster::new(backend, &[]).await;
    let image = c.registry.push_hello().await;
    let web = format!("[workloads.web]\nimage = \"{image}\"\ncount = 0\n");
    let endpoint = |name: &str, port: u16, ipv4: bool| {
        format!(
            "[[endpoints]]\nname = \"{name}\"\nworkload = \"web\"\nport = {port}\ninternal_port = 8080\nipv4 = {ipv4}\n"
        )
    };
    c.deploy_raw(&format!("{web}{}", endpoint("public", 80, true)))
        .await
        .ok();
    let v4 = c.endpoint_ipv4;

    // Another env wants port 80 on the shared IPv4 address.
    c.cli
        .run(&["envs", "create", "staging", "--app", "hello"])
        .await
        .ok();
    let staging = c.cli.with_env("VERGE_ENV", "staging");
    let path = c.dir.path().join("staging.toml");
    std::fs::write(
        &path,
        format!("app = \"hello\"\n{web}{}", endpoint("public", 80, true)),
    )
    .unwrap();
    let run = staging.run(&["deploy", "-f", path.to_str().unwrap()]).await;
    assert!(!run.success(), "a taken port is refused");
    let err = run.stderr();
    assert!(
        err.contains(&format!(
            "port 80 is taken on the shared address ({v4}:80 is endpoint public of hello/prod)"
        )) && err.contains("verge endpoints"),
        "{err}"
    );
    let releases = staging.run(&["releases", "-o", "json"]).await.json();
    assert!(
        releases
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["current"] == false),
        "nothing became current in staging: {releases}"
    );
    // IPv6 addresses are the endpoint's own: the same port is fine there.
    std::fs::write(
        &path,
        format!("app = \"hello\"\n{web}{}", endpoint("public", 80, false)),
    )
    .unwrap();
    staging
        .run(&["deploy", "-f", path.to_str().unwrap()])
        .await
        .ok();
    // The whole org (the acme CLI is scoped to prod: ask as the admin).
    let all =
        c.cp.cli()
            .run(&["endpoints", "--org", "acme", "-o", "json"])
            .await
            .json();
    let addrs: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ipv6"].as_str().unwrap())
        .collect();
    assert_eq!(addrs.len(), 2, "{all}");
    assert_ne!(addrs[0], addrs[1], "each endpoint has its own IPv6 address");

    // Two endpoints of one release on one IPv4 port.
    let run = c
        .deploy_raw(&format!(
            "{web}{}{}",
            endpoint("public", 80, true),
            endpoint("admin", 80, true)
        ))
        .await;
    assert!(!run.success());
    assert!(
        run.stderr()
            .contains("endpoints public and admin both want port 80 on the shared address"),
        "{}",
        run.stderr()
    );
    // The refused deploy left prod's endpoint as it was.
    let prod = c.json(&["endpoints", "--env", "prod"]).await;
    assert_eq!(prod.as_array().unwrap().len(), 1, "{prod}");
    assert_eq!(prod[0]["ipv4"], v4.to_string(), "{prod}");
}

/// The routing table and the ingress are for cluster admins: an org token
/// is refused by the API and by `verge ingress` at its start.
#[tokio::test]
async fn an_ingress_needs_a_cluster_admin_token() {
    let cp = verge_tests::control::ControlPlane::start(Backend::Sqlite).await;
    cp.acme_hello_prod().await;
    let org = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    let token = org["token"].as_str().expect("org token");
    let answer = cp
        .http()
        .get(cp.endpoint("/v1/ingress/routes"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    let body = answer.text().await.unwrap();
    assert!(body.contains("needs a cluster admin token"), "{body}");
    let run = cp
        .cli()
        .run(&[
            "ingress",
            "--server",
            &cp.url,
            "--token",
            token,
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .await;
    assert!(
        !run.success(),
        "verge ingress starts only with an admin token"
    );
    assert!(
        run.stderr()
            .contains("ingress did not start: the control plane refused this ingress: watching the routing table needs a cluster admin token"),
        "{}",
        run.stderr()
    );
    // With the admin token the table is there (empty: nothing deployed).
    let table: Value = cp
        .http()
        .get(cp.endpoint("/v1/ingress/routes"))
        .bearer_auth(&cp.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(table["endpoints"], serde_json::json!([]), "{table}");
}
