//! The ingress's choices end to end, as root: a real control plane, a real
//! `verge node` in a network namespace running `hello` instances, and a
//! real `verge ingress` listening on the endpoint's own addresses.
//!
//! Which instances get new connections (health, scale-down), a long-lived
//! connection across a rollout until its drain timeout, retries past a
//! backend that refuses connects, `max_connections` and `rate_limit`, and
//! serving the last table while the control plane is stopped.
//!
//! Faults are real: a backend is made to refuse connects, or to fail its
//! health check, with an `ip6tables` REJECT rule (a TCP reset) inside the
//! instance's own network namespace.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use verge_tests::cluster::{Cluster, DEADLINE, Ingress, v6};
use verge_tests::control::Backend;
use verge_tests::eventually;
use verge_tests::nodes::{NodeHost, greet, instance_netns};

/// For the tests not about rate limits: every test connection comes from
/// one source address, and the default (100 new connections a second)
/// would refuse some of a test's own bursts.
const NO_RATE_LIMIT: &str = "rate_limit = 1000000";

/// How long a refused connection may take to be closed (it must not hang).
const PROMPT: Duration = Duration::from_secs(2);

/// The `web` workload behind endpoint `public` (port 80 → 8080), with a
/// top-level `[env]` of `V = env_v`.
fn manifest(image: &str, count: u32, env_v: &str, web: &str, endpoint: &str) -> String {
    format!(
        "[env]\nV = \"{env_v}\"\n\
         [workloads.web]\nimage = \"{image}\"\ncount = {count}\ncpu = 0.1\nmemory = \"64Mi\"\n{web}\n\
         [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n{endpoint}\n"
    )
}

/// A cluster of one routed node serving `count` instances of `web`
/// through a running ingress.
struct World {
    c: Cluster,
    _node: NodeHost,
    ingress: Ingress,
    image: String,
    /// `[endpoint ipv6]:80`.
    addr: String,
    /// The instance IDs that run now.
    ids: Vec<String>,
}

impl World {
    async fn new(count: u32, web: &str, endpoint: &str) -> World {
        World::build(count, web, endpoint).await
    }

    async fn build(count: u32, web: &str, endpoint: &str) -> World {
        require_ip6tables();
        let c = Cluster::new(Backend::Sqlite, &[]).await;
        let node = c.node(1, "n1", &[], true).await;
        let image = c.registry.push_hello().await;
        c.deploy_raw(&manifest(&image, count, "1", web, endpoint))
            .await
            .json();
        let ids: Vec<String> = c
            .running(count as usize)
            .await
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect();
        let ep = c.endpoint("public").await;
        let addr = v6(ep["ipv6"].as_str().expect("ipv6"), 80).to_string();
        let ingress = c.ingress().await;
        let w = World {
            c,
            _node: node,
            ingress,
            image,
            addr,
            ids,
        };
        let ids = w.ids.clone();
        w.serves(&ids).await;
        w
    }

    /// Waits until greetings through the ingress came from each of `ids`.
    async fn serves(&self, ids: &[String]) {
        let seen = std::sync::Mutex::new(BTreeSet::new());
        eventually(DEADLINE, &format!("greetings from {ids:?}"), || {
            let seen = &seen;
            async move {
                if let Some(id) = greet(&self.addr).await.as_deref().and_then(instance_of) {
                    seen.lock().unwrap().insert(id);
                }
                let seen = seen.lock().unwrap();
                ids.iter().all(|i| seen.contains(i)).then_some(())
            }
        })
        .await;
    }

    /// `n` new connections through the ingress, one after another: the
    /// instance each greeting named, `None` for a connection that got none.
    async fn greetings(&self, n: usize) -> Vec<Option<String>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(greet(&self.addr).await.as_deref().and_then(instance_of));
        }
        out
    }

    /// The control plane's routing table: its version and the instances
    /// endpoint `public` sends new connections to.
    async fn table(&self) -> (String, Vec<String>) {
        let t: Value = self
            .c
            .cp
            .http()
            .get(self.c.cp.endpoint("/v1/ingress/routes"))
            .bearer_auth(&self.c.cp.admin_token)
            .send()
            .await
            .expect("GET /v1/ingress/routes")
            .json()
            .await
            .expect("a routing table");
        let backends = t["endpoints"][0]["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| b["instance"].as_str().expect("instance").to_string())
            .collect();
        (
            t["version"].as_str().expect("version").to_string(),
            backends,
        )
    }

    /// Waits until the control plane's table has backends that satisfy
    /// `ok` and it is the table the ingress serves (the last one it
    /// applied); returns those backends.
    async fn ingress_has(&self, what: &str, ok: impl Fn(&[String]) -> bool) -> Vec<String> {
        eventually(
            DEADLINE,
            &format!("{what}, served by the ingress"),
            || async {
                let (version, backends) = self.table().await;
                let log = self.ingress.log();
                let serving = log
                    .lines()
                    .rfind(|l| l.contains("routing table applied"))
                    .is_some_and(|l| l.contains(&format!("version=\"{version}\"")));
                (ok(&backends) && serving).then_some(backends)
            },
        )
        .await
    }

    /// Endpoint `public`'s backend `id` as `verge describe endpoint` shows it.
    async fn described(&self, id: &str) -> Value {
        let ep = self.c.endpoint("public").await;
        ep["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["instance"] == id).cloned())
            .unwrap_or(Value::Null)
    }

    /// The value of the endpoint's metric `name` (with `reason` when given).
    async fn metric(&self, name: &str, reason: Option<&str>) -> f64 {
        let text = self.ingress.metrics().await;
        let reason = reason.map(|r| format!("reason=\"{r}\""));
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| reason.as_ref().is_none_or(|r| l.contains(r.as_str())))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// The instance ID a greeting names.
fn instance_of(greeting: &str) -> Option<String> {
    let rest = greeting.strip_prefix("hello from instance ")?;
    Some(rest.split(';').next()?.trim().to_string())
}

fn require_ip6tables() {
    let ok = std::process::Command::new("ip6tables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests make instances refuse connections with ip6tables: install it (apt-get install -y iptables)"
    );
}

/// Adds (or deletes) a rule in instance `id`'s network namespace that
/// answers TCP connects to port 8080 with a reset.
fn reject_8080(id: &str, add: bool) {
    let netns: PathBuf = instance_netns(id).unwrap_or_else(|| panic!("no netns for {id}"));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip6tables", if add { "-I" } else { "-D" }, "INPUT"])
        .args(["-p", "tcp", "--dport", "8080", "-j", "REJECT"])
        .args(["--reject-with", "tcp-reset"])
        .output()
        .expect("run nsenter ip6tables");
    assert!(
        out.status.success(),
        "ip6tables in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects straight to `address` (no ingress): whether it is refused.
async fn refused(address: &str) -> bool {
    let c = tokio::time::timeout(PROMPT, TcpStream::connect(address)).await;
    matches!(c, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn instances_that_stop_or_fail_health_get_no_new_connections() {
    let health = "[workloads.web.health]\ntcp = 8080\ninterval = \"200ms\"\ntimeout = \"500ms\"";
    let w = World::new(2, health, NO_RATE_LIMIT).await;
    let (x, y) = (w.ids[0].clone(), w.ids[1].clone());

    // X fails its health check: the table drops it, with a reason.
    reject_8080(&x, true);
    let out = eventually(DEADLINE, "X out of rotation", || async {
        let b = w.described(&x).await;
        (b["in_rotation"] == false).then_some(b)
    })
    .await;
    let reason = out["reason"].as_str().unwrap_or_default();
    assert!(
        !reason.is_empty(),
        "out of rotation without a reason: {out}"
    );
    let left = w
        .ingress_has("a table with only Y", |b| b == std::slice::from_ref(&y))
        .await;
    assert_eq!(left, std::slice::from_ref(&y));
    // The ingress does not even try X: no failed connect, all reach Y.
    let errors = w.metric("verge_ingress_connect_errors_total", None).await;
    let got = w.greetings(50).await;
    assert!(
        got.iter().all(|g| g.as_deref() == Some(y.as_str())),
        "every connection reaches {y}: {got:?}"
    );
    assert_eq!(
        w.metric("verge_ingress_connect_errors_total", None).await,
        errors,
        "a connect to the unhealthy instance was attempted"
    );

    // Healthy again (restarted, or replaced): both take connections.
    reject_8080(&x, false);
    let both = w.ingress_has("two backends again", |b| b.len() == 2).await;
    w.serves(&both).await;

    // Scaled to one: the leaving instance drains (it still answers on its
    // own address) but gets no new connection through the ingress.
    w.c.cli.run(&["scale", "web=1"]).await.ok();
    let kept = w.ingress_has("one backend", |b| b.len() == 1).await;
    let gone = both
        .iter()
        .find(|b| !kept.contains(b))
        .expect("one left")
        .clone();
    let gone_at = w.described(&gone).await["address"]
        .as_str()
        .expect("address")
        .to_string();
    let got = w.greetings(50).await;
    assert!(
        got.iter().all(|g| g.as_ref() == Some(&kept[0])),
        "every connection reaches {}: {got:?}",
        kept[0]
    );
    let direct = greet(&gone_at).await.unwrap_or_default();
    assert!(
        direct.contains(&format!("hello from instance {gone}")),
        "the leaving instance drains, still serving its own address: {direct:?}"
    );
}

/// A connection through the ingress that echoes.
struct Echo {
    r: BufReader<TcpStream>,
    sent: u64,
}

/// How one exchange on an [`Echo`] went.
#[derive(Debug, PartialEq)]
enum Exchanged {
    Echoed,
    /// EOF or an error: the connection was closed.
    Closed(String),
}

impl Echo {
    /// Connects and reads the greeting; returns the instance it names.
    async fn open(addr: &str) -> (Echo, String) {
        let s = TcpStream::connect(addr).await.expect("connect");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("a greeting within 5 s")
            .expect("read the greeting");
        let id = instance_of(&line).unwrap_or_else(|| panic!("not a greeting: {line:?}"));
        (Echo { r, sent: 0 }, id)
    }

    /// Sends a line and reads it back. A connection that neither echoes
    /// nor closes within 5 s fails the test.
    async fn exchange(&mut self) -> Exchanged {
        self.sent += 1;
        let msg = format!("ping {}\n", self.sent);
        if let Err(e) = self.r.get_mut().write_all(msg.as_bytes()).await {
            return Exchanged::Closed(e.to_string());
        }
        let mut back = vec![0u8; msg.len()];
        let read = tokio::time::timeout(Duration::from_secs(5), self.r.read_exact(&mut back));
        match read.await.expect("an echo or a close within 5 s") {
            Ok(_) => {
                assert_eq!(back, msg.as_bytes(), "echo of {msg:?}");
                Exchanged::Echoed
            }
            Err(e) => Exchanged::Closed(e.to_string()),
        }
    }
}

#[tokio::test]
async fn a_long_lived_connection_survives_a_rollout_until_the_drain_timeout() {
    let drain = Duration::from_secs(8);
    let endpoint = &format!("drain_timeout = \"8s\"\n{NO_RATE_LIMIT}");
    let w = World::new(1, "", endpoint).await;
    let a = w.ids[0].clone();
    let (mut conn, on) = Echo::open(&w.addr).await;
    assert_eq!(on, a);
    assert_eq!(conn.exchange().await, Exchanged::Echoed);

    // A new release (V=2) rolls out: a new instance serves new connections.
    w.c.deploy_raw(&manifest(&w.image, 1, "2", "", endpoint))
        .await
        .json();
    let b = eventually(DEADLINE, "a greeting from the new instance", || async {
        let g = greet(&w.addr).await?;
        let id = instance_of(&g)?;
        (id != a && g.contains("V=2")).then_some(id)
    })
    .await;
    assert_eq!(
        conn.exchange().await,
        Exchanged::Echoed,
        "the old connection still works once {b} serves"
    );

    // A leaves the table (draining); the connection keeps working.
    let until = Instant::now() + DEADLINE;
    let left = loop {
        assert_eq!(conn.exchange().await, Exchanged::Echoed);
        let d = w.described(&a).await;
        assert!(
            !d.is_null(),
            "A is gone from the endpoint before it drained"
        );
        if d["in_rotation"] == false {
            let reason = d["reason"].as_str().unwrap_or_default();
            assert!(reason.starts_with("leaving"), "{d}");
            break Instant::now();
        }
        assert!(Instant::now() < until, "A never left the table");
    };

    // Then the drain timeout ends it: closed, not hung.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let closed = loop {
        tick.tick().await;
        match conn.exchange().await {
            Exchanged::Echoed => assert!(
                left.elapsed() < drain + Duration::from_secs(30),
                "still open {:?} after A left the table",
                left.elapsed()
            ),
            Exchanged::Closed(why) => break (Instant::now(), why),
        }
    };
    let open_for = closed.0 - left;
    assert!(
        open_for >= drain - Duration::from_secs(1),
        "closed ({}) only {open_for:?} after A left the table, before its drain timeout of {drain:?}",
        closed.1
    );
    assert!(conn.sent > 3, "exchanges went on during the drain");
}

#[tokio::test]
async fn a_backend_refusing_connections_is_retried_with_zero_client_failures() {
    let w = World::new(2, "", NO_RATE_LIMIT).await;
    let (x, y) = (w.ids[0].clone(), w.ids[1].clone());
    let x_at = w.described(&x).await["address"]
        .as_str()
        .expect("address")
        .to_string();
    assert!(!refused(&x_at).await, "{x} accepts before the rule");
    reject_8080(&x, true);
    assert!(refused(&x_at).await, "{x} refuses connects now");
    // No health check: it stays in the table.
    assert_eq!(w.described(&x).await["in_rotation"], true);
    assert!(w.table().await.1.contains(&x));

    let errors = w.metric("verge_ingress_connect_errors_total", None).await;
    let got = w.greetings(100).await;
    let failed = got.iter().filter(|g| g.is_none()).count();
    assert_eq!(failed, 0, "client connections without a greeting: {got:?}");
    assert!(
        got.iter().all(|g| g.as_deref() == Some(y.as_str())),
        "all reach {y}: {got:?}"
    );
    let after = w.metric("verge_ingress_connect_errors_total", None).await;
    assert!(
        after > errors,
        "the refused connects were counted: {errors} → {after}\n{}",
        w.ingress.log()
    );
    assert_eq!(
        w.metric("verge_ingress_rejected_total", Some("no_backend"))
            .await,
        0.0
    );
}

/// Connects from `source` (any 127/8 address is local) to `to`; reads the
/// first bytes: `Some(greeting)`, or `None` when the ingress closed the
/// connection (EOF or reset) without a byte. A connection that stays open
/// and silent fails the test.
async fn attempt(source: Ipv4Addr, to: SocketAddr) -> (Option<String>, TcpStream) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .expect("bind a loopback source");
    let mut s = socket.connect(to).await.expect("connect");
    let mut buf = vec![0u8; 512];
    let read = tokio::time::timeout(PROMPT, s.read(&mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!("from {source}: neither a greeting nor a close within {PROMPT:?}")
        });
    let got = match read {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).to_string()),
    };
    (got, s)
}

#[tokio::test]
async fn rate_limit_and_max_connections_close_excess_cleanly() {
    let w = World::new(1, "", "ipv4 = true\nmax_connections = 3\nrate_limit = 5").await;
    let ep = w.c.endpoint("public").await;
    let v4: Ipv4Addr = ep["ipv4"].as_str().expect("ipv4").parse().expect("ipv4");
    let to = SocketAddr::new(IpAddr::V4(v4), 80);
    eventually(DEADLINE, "the IPv4 listener", || async {
        greet(&to.to_string())
            .await
            .filter(|g| g.starts_with("hello from instance"))
    })
    .await;
    let max = || w.metric("verge_ingress_rejected_total", Some("max_connections"));
    let rate = || w.metric("verge_ingress_rejected_total", Some("rate_limit"));
    let active = || w.metric("verge_ingress_active_connections", None);

    // max_connections: three open (each from its own source, so the rate
    // does not come in), the fourth closed at once without a greeting.
    let (max0, rate0) = (max().await, rate().await);
    let mut held = Vec::new();
    for i in 1..=3 {
        let (g, s) = attempt(Ipv4Addr::new(127, 0, 1, i), to).await;
        assert!(g.is_some_and(|g| g.starts_with("hello from instance")));
        held.push(s);
    }
    let (g, _) = attempt(Ipv4Addr::new(127, 0, 1, 4), to).await;
    assert_eq!(g, None, "the fourth connection got bytes");
    assert_eq!(max().await, max0 + 1.0);
    assert_eq!(rate().await, rate0);
    drop(held);
    eventually(DEADLINE, "no connection open", || async {
        (active().await == 0.0).then_some(())
    })
    .await;

    // rate_limit: one source, ten connections in a row, each held. The
    // first five pass the rate check (burst 5): three open, two hit
    // max_connections; the rest are over the rate, closed at once.
    let source = Ipv4Addr::new(127, 0, 2, 1);
    let started = Instant::now();
    let mut held = Vec::new();
    let mut greeted = Vec::new();
    for _ in 0..10 {
        let (g, s) = attempt(source, to).await;
        greeted.push(g.is_some());
        held.push(s);
    }
    let elapsed = started.elapsed();
    let (max_d, rate_d) = (max().await - max0 - 1.0, rate().await - rate0);
    assert_eq!(
        greeted,
        [
            true, true, true, false, false, false, false, false, false, false
        ],
        "which connections got a greeting"
    );
    assert_eq!(max_d + rate_d, 7.0, "each refusal has one reason");
    assert!(max_d >= 2.0, "{max_d} refused for max_connections");
    // At 5 per second, a token comes back every 200 ms.
    let passed = 10.0 - rate_d;
    let allowed = 5.0 + (elapsed.as_millis() / 200) as f64;
    assert!(
        rate_d >= 1.0 && passed <= allowed,
        "{passed} of 10 passed the rate check in {elapsed:?} ({rate_d} refused for rate_limit)"
    );
    drop(held);
    eventually(DEADLINE, "no connection open", || async {
        (active().await == 0.0).then_some(())
    })
    .await;
    let (g, _) = attempt(Ipv4Addr::new(127, 0, 3, 1), to).await;
    assert!(
        g.is_some_and(|g| g.starts_with("hello from instance")),
        "another source is admitted"
    );
}

#[tokio::test]
async fn routing_keeps_working_while_the_control_plane_is_stopped() {
    let mut w = World::build(2, "", NO_RATE_LIMIT).await;
    let ids: BTreeSet<String> = w.ids.iter().cloned().collect();
    let watching = |w: &World| {
        w.ingress
            .log()
            .matches("watching the routing table")
            .count()
    };
    let before = watching(&w);
    let lost = |w: &World| {
        let log = w.ingress.log();
        log.matches("reconnecting").count() + log.matches("serving the last one").count()
    };
    let lost0 = lost(&w);

    let status = w.c.cp.stop().await;
    assert!(status.success(), "control plane stop: {status}");
    let cp_addr =
        w.c.cp
            .url
            .split("://")
            .nth(1)
            .expect("host:port")
            .to_string();
    assert!(
        TcpStream::connect(&cp_addr).await.is_err(),
        "the control plane is down"
    );
    eventually(DEADLINE, "the ingress to lose its watch", || async {
        (lost(&w) > lost0).then_some(())
    })
    .await;
    let got = w.greetings(20).await;
    assert!(
        got.iter()
            .all(|g| g.as_ref().is_some_and(|g| ids.contains(g))),
        "served without the control plane: {got:?}\n{}",
        w.ingress.log()
    );

    let online = |w: &World| {
        w.c.cp
            .log()
            .matches("cluster::session: node online")
            .count()
    };
    let online0 = online(&w);
    w.c.cp.restart_after_exit().await;
    let got = w.greetings(20).await;
    assert!(
        got.iter()
            .all(|g| g.as_ref().is_some_and(|g| ids.contains(g))),
        "served right after the control plane restarted: {got:?}\n{}",
        w.ingress.log()
    );
    eventually(DEADLINE, "the node back in session", || async {
        (online(&w) > online0).then_some(())
    })
    .await;
    eventually(DEADLINE, "the ingress to watch again", || async {
        (watching(&w) > before).then_some(())
    })
    .await;
    w.ingress_has("both instances in the new table", |b| b.len() == 2)
        .await;
    let got = w.greetings(20).await;
    assert!(
        got.iter()
            .all(|g| g.as_ref().is_some_and(|g| ids.contains(g))),
        "served once the control plane is back: {got:?}\n{}",
        w.ingress.log()
    );
}

/// A control plane that was down longer than `--node-offline-after` comes
/// back and, at its first liveness check, marks the node offline before the
/// node's reconnect backoff brought its session back: the routing table
/// drops instances that never stopped serving, and an ingress that watches
/// again in that window closes new connections (`no_backend`).
#[tokio::test]
async fn a_long_control_plane_outage_keeps_serving_instances_in_the_table() {
    let mut w = World::build(2, "", NO_RATE_LIMIT).await;
    let online = |w: &World| {
        w.c.cp
            .log()
            .matches("cluster::session: node online")
            .count()
    };
    let online0 = online(&w);
    let status = w.c.cp.stop().await;
    assert!(status.success(), "control plane stop: {status}");
    // The outage outlasts --node-offline-after (3 s) and a heartbeat (2 s);
    // the ingress serves throughout.
    let down = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while down.elapsed() < Duration::from_secs(6) {
        tick.tick().await;
        let got = w.greetings(5).await;
        assert!(
            got.iter().all(Option::is_some),
            "during the outage: {got:?}"
        );
    }
    w.c.cp.restart_after_exit().await;
    // Until the node's session is back, its instances stay in the table.
    let until = Instant::now() + DEADLINE;
    while online(&w) == online0 {
        let (_, backends) = w.table().await;
        assert_eq!(
            backends.len(),
            2,
            "the restarted control plane dropped serving instances from the table\n{}",
            w.c.cp.log()
        );
        assert!(Instant::now() < until, "the node never came back");
    }
}
