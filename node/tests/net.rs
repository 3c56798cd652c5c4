//! Instance networking against the real kernel: network namespaces, veth
//! pairs, addresses, routes and TCP connections.
//!
//! Every test but the IPAM one runs as root, as "the node": on a thread with
//! a network namespace of its own and a private mount namespace, so that it
//! touches neither the machine's network nor its mounts, nor other tests.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::link::LinkAttribute;
use verge_node::net::{
    GATEWAY_V4, GATEWAY_V6, InstanceNet, Ipam, NetConfig, NetError, Network, enable_forwarding,
    host_veth_name,
};

const PREFIX: &str = "fd76:6572:6765:1::/64";
/// The node's own addresses (::1 and .1 are never given to instances).
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd76, 0x6572, 0x6765, 1, 0, 0, 0, 1);
const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 1);

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the instance networking tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): they create network namespaces, veth pairs and mounts; run them as root"
    );
}

/// The test's temporary directory, seen from its node thread.
struct Node {
    dir: PathBuf,
}

impl Node {
    fn config(&self) -> NetConfig {
        NetConfig {
            netns_dir: self.dir.join("netns"),
            ipam_file: self.dir.join("data/net/ipam.json"),
            prefix_v6: PREFIX.parse().unwrap(),
            range_v4: "10.89.0.0/16".parse().unwrap(),
        }
    }
}

/// Runs `body` on a thread in a new network namespace (with `lo` up) and a
/// new private mount namespace, on a current-thread runtime. Threads it
/// starts inherit both namespaces.
fn on_node<F, Fut>(body: F)
where
    F: FnOnce(Node) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let result = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNET | CLONE_NEWNS)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("making / private in the test's mount namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let lo = link_index("lo").await.expect("lo");
            let (conn, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);
            handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .unwrap();
            body(Node { dir }).await;
        });
    })
    .join();
    // The namespaces, and the mounts in them, ended with the thread.
    drop(tmp);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The links of the calling thread's network namespace: (name, index).
async fn links() -> Vec<(String, u32)> {
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    let task = tokio::spawn(conn);
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(link) = stream.try_next().await.unwrap() {
        for attr in &link.attributes {
            if let LinkAttribute::IfName(name) = attr {
                out.push((name.clone(), link.header.index));
            }
        }
    }
    task.abort();
    let _ = task.await;
    out
}

async fn link_index(name: &str) -> Option<u32> {
    links()
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, i)| i)
}

/// Gives the node its own addresses, on `lo`.
async fn add_node_addresses() {
    let lo = link_index("lo").await.unwrap();
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    for (addr, len) in [(IpAddr::V6(NODE_V6), 128), (IpAddr::V4(NODE_V4), 32)] {
        handle.address().add(lo, addr, len).execute().await.unwrap();
    }
}

/// Runs `f` on a thread in the network namespace mounted on `netns`.
/// Sockets it opens belong to that namespace.
fn in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> R {
    let file = std::fs::File::open(netns).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the instance's namespace");
            f()
        })
        .join()
        .unwrap()
    })
}

/// `ip ARGS` in the network namespace mounted on `netns`.
fn ip_in(netns: &Path, args: &[&str]) -> String {
    in_netns(netns, || {
        let out = Command::new("ip").args(args).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
}

/// Connects `from` (a socket made in the caller's namespace) to `listener`,
/// sends a message both ways and returns the peer address the listener saw.
fn exchange(
    listener: &TcpListener,
    to: SocketAddr,
    connect: impl FnOnce(SocketAddr) -> TcpStream,
) -> SocketAddr {
    let mut client = connect(to);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"ping").unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    peer
}

fn connect(to: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"))
}

/// Binds a listener on `addr`, port 0, inside the instance's namespace.
fn listen_in(net: &InstanceNet, addr: IpAddr) -> TcpListener {
    in_netns(&net.netns, || {
        TcpListener::bind((addr, 0))
            .unwrap_or_else(|e| panic!("binding {addr} in the instance: {e}"))
    })
}

/// The index of interface `name` in the calling thread's network namespace.
fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    index
}

fn mountinfo_mentions(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

#[test]
fn setup_makes_netns_and_veth_and_the_node_reaches_the_instance() {
    on_node(|node| async move {
        let net = Network::new(node.config()).await.unwrap();
        let inst = net.setup("inst-a").await.unwrap();

        assert_eq!(inst.netns, node.dir.join("netns/inst-a"));
        assert_eq!(inst.host_veth, host_veth_name("inst-a"));
        assert_eq!(inst.host_veth.len(), 13);
        assert_eq!(inst.v6, "fd76:6572:6765:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(inst.v4, Ipv4Addr::new(10, 89, 0, 2));
        assert!(net.exists("inst-a").await.unwrap());
        assert_eq!(net.list().await.unwrap(), ["inst-a"]);
        assert!(
            mountinfo_mentions(&inst.netns),
            "the namespace is mounted on its file"
        );
        assert!(
            link_index(&inst.host_veth).await.is_some(),
            "host veth on the node"
        );

        // Inside: eth0 and lo up, the addresses (no DAD: not tentative), the default routes.
        let addrs = ip_in(&inst.netns, &["-o", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("inet6 {}/128", inst.v6)), "{addrs}");
        assert!(addrs.contains(&format!("inet {}/32", inst.v4)), "{addrs}");
        let global = addrs
            .lines()
            .find(|l| l.contains(&inst.v6.to_string()))
            .unwrap();
        assert!(!global.contains("tentative"), "{addrs}");
        let link = ip_in(&inst.netns, &["-o", "link", "show"]);
        assert!(link.contains("lo: <LOOPBACK,UP,LOWER_UP>"), "{link}");
        assert!(
            link.contains("eth0@") && link.contains(",UP,LOWER_UP>"),
            "{link}"
        );
        let r6 = ip_in(&inst.netns, &["-6", "route", "show", "default"]);
        assert!(r6.contains("default via fe80::1 dev eth0"), "{r6}");
        let r4 = ip_in(&inst.netns, &["-4", "route", "show", "default"]);
        assert!(
            r4.contains("default via 169.254.1.1 dev eth0") && r4.contains("onlink"),
            "{r4}"
        );

        // On the node: the gateway addresses and the host routes.
        let host_addrs = String::from_utf8(
            Command::new("ip")
                .args(["-o", "addr", "show", "dev", &inst.host_veth])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(host_addrs.contains("inet6 fe80::1/64"), "{host_addrs}");
        assert!(host_addrs.contains("inet 169.254.1.1/32"), "{host_addrs}");
        let routes = String::from_utf8(
            Command::new("ip")
                .args(["-6", "route"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            routes.contains(&format!("{} dev {}", inst.v6, inst.host_veth)),
            "{routes}"
        );

        // Real TCP from the node into the instance, on both families.
        for addr in [IpAddr::V6(inst.v6), IpAddr::V4(inst.v4)] {
            let listener = listen_in(&inst, addr);
            let to = listener.local_addr().unwrap();
            exchange(&listener, to, connect);
        }
        net.remove("inst-a").await.unwrap();
    });
}

#[test]
fn instance_reaches_the_node() {
    on_node(|node| async move {
        add_node_addresses().await;
        let net = Network::new(node.config()).await.unwrap();
        let inst = net.setup("inst-a").await.unwrap();
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();

        // The gateway, link-local on eth0.
        let peer = exchange(&listener, SocketAddr::from((GATEWAY_V6, port)), |to| {
            in_netns(&inst.netns, || {
                let eth0 = ifindex("eth0");
                let SocketAddr::V6(to) = to else {
                    unreachable!()
                };
                connect(SocketAddrV6::new(*to.ip(), to.port(), 0, eth0).into())
            })
        });
        assert!(
            matches!(peer.ip(), IpAddr::V6(ip) if ip.segments()[0] == 0xfe80 || ip == inst.v6),
            "{peer}"
        );

        // The node's own addresses, through the default routes; the node
        // sees the instance's addresses.
        for (to, from) in [
            (IpAddr::V6(NODE_V6), IpAddr::V6(inst.v6)),
            (IpAddr::V4(NODE_V4), IpAddr::V4(inst.v4)),
            (IpAddr::V4(GATEWAY_V4), IpAddr::V4(inst.v4)),
        ] {
            let peer = exchange(&listener, SocketAddr::from((to, port)), |to| {
                in_netns(&inst.netns, || connect(to))
            });
            let seen = match peer.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            assert_eq!(seen, from, "connecting to {to}");
        }
        net.remove("inst-a").await.unwrap();
    });
}

#[test]
fn two_instances_reach_each_other() {
    on_node(|node| async move {
        enable_forwarding().unwrap();
        let net = Network::new(node.config()).await.unwrap();
        let a = net.setup("inst-a").await.unwrap();
        let b = net.setup("inst-b").await.unwrap();
        assert_ne!(a.v6, b.v6);
        assert_ne!(a.v4, b.v4);
        assert_ne!(a.host_veth, b.host_veth);

        for (from, to) in [(&a, &b), (&b, &a)] {
            for (listen, source) in [
                (IpAddr::V6(to.v6), IpAddr::V6(from.v6)),
                (IpAddr::V4(to.v4), IpAddr::V4(from.v4)),
            ] {
                let listener = listen_in(to, listen);
                let addr = listener.local_addr().unwrap();
                let peer = exchange(&listener, addr, |addr| {
                    in_netns(&from.netns, || connect(addr))
                });
                assert_eq!(peer.ip(), source, "{} → {}", from.host_veth, to.host_veth);
            }
        }
        net.remove("inst-a").await.unwrap();
        net.remove("inst-b").await.unwrap();
    });
}

#[test]
fn remove_leaves_nothing_and_is_idempotent() {
    on_node(|node| async move {
        let net = Network::new(node.config()).await.unwrap();
        let inst = net.setup("inst-a").await.unwrap();
        assert!(net.addresses("inst-a").is_some());

        net.remove("inst-a").await.unwrap();
        let names: Vec<String> = links().await.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["lo"], "no veth left on the node");
        assert!(!inst.netns.exists(), "namespace file removed");
        assert!(!mountinfo_mentions(&inst.netns), "namespace unmounted");
        assert!(net.list().await.unwrap().is_empty());
        assert!(!net.exists("inst-a").await.unwrap());
        assert_eq!(net.addresses("inst-a"), None, "addresses freed");

        net.remove("inst-a").await.unwrap();
        net.remove("never-set-up").await.unwrap();
        assert!(matches!(
            net.remove("../etc").await,
            Err(NetError::BadInstanceId(_))
        ));

        // A leftover file with nothing mounted on it (a crash between
        // creating and mounting): listed, and removed.
        std::fs::write(net.netns_path("stale"), "").unwrap();
        assert_eq!(net.list().await.unwrap(), ["stale"]);
        assert!(!net.exists("stale").await.unwrap());
        net.remove("stale").await.unwrap();
        assert!(net.list().await.unwrap().is_empty());
    });
}

#[test]
fn setup_is_idempotent_and_repairs() {
    on_node(|node| async move {
        let net = Network::new(node.config()).await.unwrap();
        let first = net.setup("inst-a").await.unwrap();
        let inode = std::fs::metadata(&first.netns).unwrap().ino();
        let again = net.setup("inst-a").await.unwrap();
        assert_eq!(first, again);
        assert_eq!(
            std::fs::metadata(&again.netns).unwrap().ino(),
            inode,
            "same namespace kept"
        );

        // A lost veth pair is made again, in the same namespace.
        let out = Command::new("ip")
            .args(["link", "del", &first.host_veth])
            .output()
            .unwrap();
        assert!(out.status.success());
        let repaired = net.setup("inst-a").await.unwrap();
        assert_eq!(repaired, first);
        assert_eq!(std::fs::metadata(&repaired.netns).unwrap().ino(), inode);
        let listener = listen_in(&repaired, IpAddr::V6(repaired.v6));
        exchange(&listener, listener.local_addr().unwrap(), connect);

        // A new Network (a restarted daemon) adopts it with the same addresses.
        let restarted = Network::new(node.config()).await.unwrap();
        assert_eq!(restarted.list().await.unwrap(), ["inst-a"]);
        assert_eq!(restarted.setup("inst-a").await.unwrap(), first);
        restarted.remove("inst-a").await.unwrap();
        assert_eq!(links().await.len(), 1);
    });
}

#[test]
fn ipam_allocates_uniquely_persists_reuses_and_reports_exhaustion() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("data/net/ipam.json");
    // 6 usable IPv6 addresses (::2 to ::7), 5 usable IPv4 ones (.2 to .6).
    let prefix: Ipv6Net = "fd00:1::/125".parse().unwrap();
    let range: Ipv4Net = "10.1.0.0/29".parse().unwrap();
    let v6 = |last: u16| Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, last);
    let v4 = |last: u8| Ipv4Addr::new(10, 1, 0, last);

    let mut ipam = Ipam::load(&file, prefix, range).unwrap();
    assert_eq!(ipam.allocate("a").unwrap(), (v6(2), v4(2)));
    assert_eq!(ipam.allocate("b").unwrap(), (v6(3), v4(3)));
    assert_eq!(ipam.allocate("c").unwrap(), (v6(4), v4(4)));
    assert_eq!(ipam.allocate("b").unwrap(), (v6(3), v4(3)), "idempotent");

    // Survives a reload.
    let mut ipam = Ipam::load(&file, prefix, range).unwrap();
    assert_eq!(ipam.get("a"), Some((v6(2), v4(2))));
    assert_eq!(ipam.instances().collect::<Vec<_>>(), ["a", "b", "c"]);

    // Freed addresses are reused, lowest first.
    ipam.release("b").unwrap();
    ipam.release("b").unwrap();
    assert_eq!(ipam.allocate("d").unwrap(), (v6(3), v4(3)));
    assert_eq!(ipam.allocate("e").unwrap(), (v6(5), v4(5)));
    assert_eq!(ipam.allocate("f").unwrap(), (v6(6), v4(6)));

    // IPv4 runs out first (.7 is the broadcast address).
    let err = ipam.allocate("g").unwrap_err();
    assert!(
        matches!(err, NetError::Exhausted { family: "IPv4", .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("10.1.0.0/29") && msg.contains("instance g"),
        "{msg}"
    );
    assert_eq!(ipam.get("g"), None, "nothing half-allocated");
    assert_eq!(Ipam::load(&file, prefix, range).unwrap().get("g"), None);

    // Another prefix (the node joined again): allocations move into it.
    let other: Ipv6Net = "fd00:2::/64".parse().unwrap();
    let mut moved = Ipam::load(&file, other, range).unwrap();
    assert_eq!(
        moved.allocate("a").unwrap(),
        ("fd00:2::2".parse().unwrap(), v4(2))
    );

    // Ranges without room, and a damaged file, are errors that say so.
    let err = Ipam::load(&file, "fd00::/127".parse().unwrap(), range).unwrap_err();
    assert!(err.to_string().contains("fd00::/127"), "{err}");
    let err = Ipam::load(&file, prefix, "10.0.0.0/31".parse().unwrap()).unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/31"), "{err}");
    std::fs::write(&file, "{not json").unwrap();
    let err = Ipam::load(&file, prefix, range).unwrap_err();
    assert!(
        matches!(err, NetError::IpamCorrupt { .. }) && err.to_string().contains("ipam.json"),
        "{err}"
    );
}

/// The inode of a thread's network namespace.
fn netns_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    let target = target.to_str()?;
    target
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Whether any thread of this process is in the namespace with `inode`.
fn a_thread_is_in(inode: u64) -> bool {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .any(|task| netns_inode(&task.path().join("ns/net")) == Some(inode))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn setup_remove_cycles_leave_no_leaks() {
    on_node(|node| async move {
        let net = Network::new(node.config()).await.unwrap();
        // Warm up (lazily opened resources), then count.
        net.setup("warm-up").await.unwrap();
        net.remove("warm-up").await.unwrap();
        let fds = open_fds();

        for i in 0..20 {
            let id = format!("cycle-{i}");
            let inst = net.setup(&id).await.unwrap();
            assert_eq!(
                inst.v4,
                Ipv4Addr::new(10, 89, 0, 2),
                "freed addresses are reused"
            );
            // No thread stays in the instance's namespace (helper threads end).
            let inode = std::fs::metadata(&inst.netns).unwrap().ino();
            let deadline = Instant::now() + Duration::from_secs(5);
            while a_thread_is_in(inode) {
                assert!(
                    Instant::now() < deadline,
                    "a thread stayed in the namespace of {id}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            net.remove(&id).await.unwrap();
        }

        let names: Vec<String> = links().await.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["lo"], "no veth left");
        let netns_dir = node.dir.join("netns");
        assert_eq!(
            std::fs::read_dir(&netns_dir).unwrap().count(),
            0,
            "no namespace file left"
        );
        let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let prefix = format!("{}/", netns_dir.display());
        assert!(
            !mountinfo.contains(&prefix),
            "no namespace mount left:\n{mountinfo}"
        );
        let ipam = std::fs::read_to_string(&node.config().ipam_file).unwrap();
        assert!(!ipam.contains("cycle-"), "no allocation left: {ipam}");
        // Each test runs in its own process under nextest; with `cargo test`
        // other tests open descriptors concurrently.
        if std::env::var_os("NEXTEST").is_some() {
            assert_eq!(
                open_fds(),
                fds,
                "no file descriptor (netlink socket, namespace file) left open"
            );
        }
    });
}
