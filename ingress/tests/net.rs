//! `verge_ingress::net` against the kernel: each test runs in a network
//! namespace of its own (root needed), where it adds local routes, listens
//! and connects, and checks the routing table with iproute2's `ip`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use futures_util::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::LinkUnspec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use verge_ingress::net::{NetError, add_local_routes, listen};

const V6: &str = "fd00:5:6:7::/64";
const V4: &str = "198.18.7.0/24";

/// Runs `test` on a thread of its own moved into a new network namespace
/// (only `lo`, up), on a current-thread runtime: the sockets and netlink
/// connections it makes belong to that namespace, which goes away with the
/// thread.
fn in_new_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only the
        // calling thread (this test's own) into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            panic!(
                "cannot create a network namespace for the test ({e}): these tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN); run them as root, e.g. with tests/run.sh"
            );
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a runtime");
        runtime.block_on(async {
            lo_up().await;
            test().await
        });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn lo_up() {
    let (conn, handle, _) = rtnetlink::new_connection().expect("open rtnetlink");
    let task = tokio::spawn(conn);
    let lo = handle
        .link()
        .get()
        .match_name("lo")
        .execute()
        .try_next()
        .await
        .expect("look up lo")
        .expect("a new namespace has lo");
    handle
        .link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .expect("set lo up");
    task.abort();
}

/// `ip -4` and `ip -6 route show table local` in the calling thread's
/// namespace.
fn local_table() -> String {
    let mut out = String::new();
    for family in ["-4", "-6"] {
        let shown = Command::new("ip")
            .args([family, "route", "show", "table", "local"])
            .output()
            .expect("run `ip` (install iproute2, or run tests/run.sh)");
        assert!(shown.status.success(), "ip route show failed: {shown:?}");
        out.push_str(&String::from_utf8_lossy(&shown.stdout));
    }
    out
}

/// Whether table local has `local PREFIX dev lo`.
fn has_local_route(table: &str, prefix: &str) -> bool {
    let want = format!("local {prefix} dev lo ");
    table.lines().any(|l| l.starts_with(&want))
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("run `ip` (install iproute2, or run tests/run.sh)");
    assert!(status.success(), "ip {args:?} failed");
}

fn random_v6(prefix: &str) -> Ipv6Addr {
    let net: Ipv6Net = prefix.parse().unwrap();
    let host = rand::random::<u64>() | 1;
    Ipv6Addr::from(u128::from(net.network()) | u128::from(host))
}

fn random_v4(prefix: &str) -> Ipv4Addr {
    let net: Ipv4Net = prefix.parse().unwrap();
    let host = rand::random_range(1..255u32);
    Ipv4Addr::from(u32::from(net.network()) | host)
}

/// Connects to `listener`, which accepts; bytes go both ways.
async fn assert_connects(listener: &TcpListener) {
    let addr = listener.local_addr().unwrap();
    let mut client = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let (mut server, peer) = listener.accept().await.expect("accept");
    assert_eq!(peer, client.local_addr().unwrap());
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// A connection to `addr` fails (nothing routes there, or nothing listens).
async fn assert_no_connection(addr: SocketAddr) {
    let connected = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
    assert!(
        !matches!(connected, Ok(Ok(_))),
        "connected to {addr}, which should get no connection"
    );
}

#[test]
fn any_address_in_the_prefixes_is_bindable_and_reachable() {
    in_new_netns(|| async {
        // Bound before the route exists: IP_FREEBIND.
        let v6 = listen(SocketAddr::new(IpAddr::V6(random_v6(V6)), 0)).expect("listen on v6");
        let v4 = listen(SocketAddr::new(IpAddr::V4(random_v4(V4)), 0)).expect("listen on v4");
        assert_no_connection(v6.local_addr().unwrap()).await;

        let routes = add_local_routes(Some(V6.parse().unwrap()), Some(V4.parse().unwrap()))
            .await
            .expect("add local routes");
        assert!(!routes.is_empty());
        assert_connects(&v6).await;
        assert_connects(&v4).await;
        // Listening after the route was added works as well.
        let later = listen(SocketAddr::new(IpAddr::V6(random_v6(V6)), 0)).unwrap();
        assert_connects(&later).await;
        routes.remove().await.expect("remove routes");
    });
}

#[test]
fn addresses_outside_the_prefixes_get_no_connection() {
    in_new_netns(|| async {
        let routes = add_local_routes(Some(V6.parse().unwrap()), Some(V4.parse().unwrap()))
            .await
            .expect("add local routes");
        for outside in [
            IpAddr::V6(random_v6("fd00:5:6:8::/64")),
            IpAddr::V4(random_v4("198.18.8.0/24")),
        ] {
            let listener = listen(SocketAddr::new(outside, 0)).expect("freebind listen");
            assert_no_connection(listener.local_addr().unwrap()).await;
        }
        routes.remove().await.expect("remove routes");
    });
}

#[test]
fn an_ipv6_listener_does_not_accept_ipv4() {
    in_new_netns(|| async {
        let any = listen("[::]:0".parse().unwrap()).expect("listen on [::]");
        let port = any.local_addr().unwrap().port();
        assert_connects(&any).await;
        assert_no_connection(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).await;
        // The port is still free for IPv4.
        let v4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).expect("v4 listen");
        assert_connects(&v4).await;
    });
}

#[test]
fn remove_deletes_the_routes_it_added_and_keeps_existing_ones() {
    in_new_netns(|| async {
        let first = add_local_routes(Some(V6.parse().unwrap()), Some(V4.parse().unwrap()))
            .await
            .expect("add local routes");
        let table = local_table();
        assert!(has_local_route(&table, V6), "{table}");
        assert!(has_local_route(&table, V4), "{table}");

        // Again: nothing new, and removing that keeps the routes.
        let second = add_local_routes(Some(V6.parse().unwrap()), Some(V4.parse().unwrap()))
            .await
            .expect("add the same routes again");
        assert!(second.is_empty());
        second.remove().await.unwrap();
        let table = local_table();
        assert!(has_local_route(&table, V6) && has_local_route(&table, V4));

        first.remove().await.expect("remove routes");
        let table = local_table();
        assert!(!has_local_route(&table, V6), "{table}");
        assert!(!has_local_route(&table, V4), "{table}");

        // A route someone else added (here `ip`, as a operator would) is
        // used and left alone; host bits of the prefix are ignored.
        ip(&["-6", "route", "add", "local", "fd00:9::/64", "dev", "lo"]);
        let theirs = add_local_routes(Some("fd00:9::1/64".parse().unwrap()), None)
            .await
            .expect("add over an identical route");
        assert!(theirs.is_empty());
        theirs.remove().await.unwrap();
        assert!(has_local_route(&local_table(), "fd00:9::/64"));

        let none = add_local_routes(None, None).await.unwrap();
        assert!(none.is_empty());
        none.remove().await.unwrap();
    });
}

#[test]
fn another_route_for_the_prefix_is_a_conflict_and_nothing_stays() {
    in_new_netns(|| async {
        ip(&[
            "route",
            "add",
            "blackhole",
            "198.18.10.0/24",
            "table",
            "local",
        ]);
        let err = add_local_routes(
            Some(V6.parse().unwrap()),
            Some("198.18.10.0/24".parse().unwrap()),
        )
        .await
        .map(|_| ())
        .expect_err("a blackhole route is in the way");
        assert!(matches!(err, NetError::Conflict { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "table local already has another route for 198.18.10.0/24 (type blackhole"
            ),
            "{msg}"
        );
        assert!(
            !has_local_route(&local_table(), V6),
            "the v6 route is rolled back"
        );
    });
}
