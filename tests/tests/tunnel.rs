//! The QUIC path end to end, as root: a real control plane, a real
//! `verge node` in a network namespace whose instance prefix is *not*
//! routed to the test (like a node behind NAT), the `hello` workload, and
//! `verge_ingress::tunnel::Tunnel` reaching it through the control plane's
//! cluster endpoint and the node's session.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use verge_api::routing::ClusterInfo;
use verge_api::wire::TunnelOpen;
use verge_ingress::tunnel::{Tunnel, TunnelError, TunnelStream};
use verge_tests::cluster::Cluster;
use verge_tests::control::Backend;
use verge_tests::nodes::{NodeHost, test_tag};

/// The control plane, the registry and one node running one `hello`
/// instance behind an endpoint with `internal_port = 8080`.
struct World {
    c: Cluster,
    node: NodeHost,
    /// The running instance's ID and its node's ID.
    instance: String,
    node_id: String,
}

impl World {
    async fn new() -> World {
        let c = Cluster::new(Backend::Sqlite, &[]).await;
        // Behind NAT: its instance prefix stays unrouted, only the tunnel
        // reaches them.
        let node = c.node(1, "edge1", &["--behind-nat"], false).await;
        let image = c.registry.push_hello().await;
        c.deploy(&image, 1, "", "").await;
        let instance = c.running(1).await[0]["id"]
            .as_str()
            .expect("id")
            .to_string();
        let identity = std::fs::read_to_string(node.data_dir.path().join("identity/node.json"))
            .expect("the node's identity");
        let identity: Value = serde_json::from_str(&identity).unwrap();
        let node_id = identity["node_id"].as_str().expect("node id").to_string();
        World {
            c,
            node,
            instance,
            node_id,
        }
    }

    /// What `GET /v1/ingress/cluster` answers: the cluster endpoint (on
    /// loopback, as it listens on `[::]`) and the cluster CA (as the node
    /// saved it at join).
    fn cluster_info(&self) -> ClusterInfo {
        let port = self.c.cp.cluster.rsplit(':').next().expect("host:port");
        let ca_pem = std::fs::read_to_string(self.node.data_dir.path().join("identity/ca.crt"))
            .expect("the cluster CA the node saved");
        ClusterInfo {
            quic: format!("[::1]:{port}"),
            ca_pem,
        }
    }

    fn tunnel(&self, token: &str) -> Tunnel {
        Tunnel::new(
            self.cluster_info(),
            token.to_string(),
            "test-ingress".into(),
        )
        .expect("a tunnel from the cluster info")
    }

    fn open(&self, port: u16) -> TunnelOpen {
        TunnelOpen {
            instance: self.instance.clone(),
            node: self.node_id.clone(),
            port,
        }
    }
}

/// Reads up to and including the first newline (the instance writes its
/// greeting before anything else, so nothing follows it yet).
async fn greeting(stream: &mut TunnelStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("the greeting within 10s")
            .expect("read the greeting");
        assert_eq!(n, 1, "the stream ended before the greeting: {line:?}");
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("a text greeting")
}

/// `len` bytes of xorshift noise.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test]
async fn an_ingress_reaches_an_instance_through_the_control_plane_and_the_node_session() {
    let w = World::new().await;
    let tunnel = w.tunnel(&w.c.cp.admin_token);

    // The greeting, 1 MiB echoed exactly, then a half-close seen through.
    let mut stream = tunnel.open(&w.open(8080)).await.unwrap_or_else(|e| {
        panic!(
            "open: {e}\n--- control log ---\n{}\n--- node log ---\n{}",
            w.c.cp.log(),
            w.node.log()
        )
    });
    let hello = greeting(&mut stream).await;
    assert!(
        hello.starts_with(&format!("hello from instance {}", w.instance)),
        "{hello}"
    );
    let sent = noise(1 << 20, u64::from(test_tag()) | 1);
    let (mut rx, mut tx) = tokio::io::split(stream);
    let write = async {
        tx.write_all(&sent).await.expect("send 1 MiB");
        tx.shutdown().await.expect("half-close");
    };
    let read = async {
        let mut got = Vec::new();
        rx.read_to_end(&mut got)
            .await
            .expect("read the echo to EOF");
        got
    };
    let (_, echoed) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
            .await
            .expect("the echo within 60s");
    assert_eq!(echoed.len(), sent.len(), "every byte echoed, then EOF");
    assert!(echoed == sent, "the echo is the bytes sent, in order");

    // Concurrent opens share the connection, each its own stream.
    let opens = (0..20).map(|_| {
        let (tunnel, to) = (tunnel.clone(), w.open(8080));
        tokio::spawn(async move {
            let mut s = tunnel.open(&to).await.expect("concurrent open");
            greeting(&mut s).await
        })
    });
    for g in futures_join(opens).await {
        assert!(g.contains(&w.instance), "{g}");
    }

    // Refusals name what is wrong.
    let refused = |r: Result<TunnelStream, TunnelError>| match r {
        Err(TunnelError::Refused(m)) => m,
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("expected a refusal, got a stream"),
    };
    let m = refused(tunnel.open(&w.open(9999)).await);
    assert!(
        m.contains(&w.instance) && m.contains("9999") && m.contains("8080"),
        "{m}"
    );
    let m = refused(
        tunnel
            .open(&TunnelOpen {
                instance: "in_nosuchinstance".into(),
                ..w.open(8080)
            })
            .await,
    );
    assert!(
        m.contains("in_nosuchinstance") && m.contains("does not run"),
        "{m}"
    );
    let m = refused(
        tunnel
            .open(&TunnelOpen {
                node: "nd_nosuchnode".into(),
                ..w.open(8080)
            })
            .await,
    );
    assert!(
        m.contains("nd_nosuchnode") && m.contains("is not connected to this control-plane replica"),
        "{m}"
    );
    // The tunnel still works after refusals.
    let mut again = tunnel.open(&w.open(8080)).await.expect("open again");
    assert!(greeting(&mut again).await.contains(&w.instance));

    // An org token is not enough; nor is a made-up one.
    let org =
        w.c.cp
            .cli()
            .run(&["tokens", "create", "--org", "acme", "-o", "json"])
            .await
            .json();
    let org_token = org["token"].as_str().expect("org token");
    for (token, why) in [
        (org_token, "scoped to org \"acme\""),
        ("vrg_0000", "unknown or revoked"),
    ] {
        match w.tunnel(token).open(&w.open(8080)).await {
            Err(TunnelError::Rejected { message, .. }) => {
                assert!(
                    message.contains("needs a cluster admin token") && message.contains(why),
                    "{message}"
                );
            }
            Err(e) => panic!("expected the ingress to be rejected, got {e:?}"),
            Ok(_) => panic!("an org token opened a tunnel"),
        }
    }
}

/// Awaits every task, in order.
async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}
