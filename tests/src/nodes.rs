//! Real `verge node` processes, each in a network namespace of its own that
//! the test creates, linked to the test's namespace by a veth pair:
//!
//! ```text
//!  test netns (control plane)            node netns "vt<tag>n<i>"
//!  vt<tag>h<i>  fdee:<tag>:<i>::1/64 ─── eth0  fdee:<tag>:<i>::2/64
//!  route <instance prefix> via ::2        default via ::1
//! ```
//!
//! The control plane listens for nodes on `[::]`, so each node dials
//! `[fdee:<tag>:<i>::1]:PORT`. [`NodeHost::route_instances`] adds the route
//! that makes a node's instance prefix reachable from the test. Needs root
//! (namespaces, cgroups): [`require_root`] says so loudly.
//!
//! Dropping a `NodeHost` kills its daemon and every instance it left (their
//! shims and processes, cgroups and network namespaces), then removes the
//! namespace and the veth.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

/// Panics unless the tests run as root: nodes need namespaces and cgroups.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs real nodes (network namespaces, cgroups, overlayfs, veth): run it as root (CI does)"
    );
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a `verge node` in it.
#[derive(Debug)]
pub struct NodeHost {
    pub name: String,
    pub netns: String,
    /// The test side of the link: what the node dials.
    pub host_addr: Ipv6Addr,
    /// The node side: where instance prefixes are routed.
    pub node_addr: Ipv6Addr,
    host_if: String,
    pub data_dir: TempDir,
    child: Option<Child>,
    log: PathBuf,
    routes: Vec<String>,
    relays: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeHost {
    /// Creates the namespace and link; `tag` distinguishes concurrent tests.
    pub fn create(tag: u16, index: u8, name: &str) -> NodeHost {
        require_root();
        let netns = format!("vt{tag:04x}n{index}");
        let host_if = format!("vt{tag:04x}h{index}");
        let host_addr: Ipv6Addr = format!("fdee:{tag:x}:{index}::1").parse().expect("valid");
        let node_addr: Ipv6Addr = format!("fdee:{tag:x}:{index}::2").parse().expect("valid");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .output();
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{host_addr}/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec!["-n", netns.as_str()];
            full.extend_from_slice(args);
            ip(&full);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&[
            "-6",
            "addr",
            "add",
            &format!("{node_addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &host_addr.to_string(),
        ]);
        let data_dir = tempfile::tempdir().expect("node data dir");
        let log = data_dir.path().join("node.log");
        NodeHost {
            name: name.to_string(),
            netns,
            host_addr,
            node_addr,
            host_if,
            data_dir,
            child: None,
            log,
            routes: Vec::new(),
            relays: Vec::new(),
        }
    }

    /// `[host addr]:port` of a control plane's cluster endpoint bound on `[::]:port`.
    pub fn server_for(&self, cluster: &str) -> String {
        let port = cluster.rsplit(':').next().expect("host:port");
        format!("[{}]:{port}", self.host_addr)
    }

    /// Starts `verge node` in the namespace (joining when `token` is given)
    /// and waits for its `VERGE_NODE=` line.
    pub async fn start(&mut self, server: &str, token: Option<&str>, extra: &[&str]) {
        let out = self.spawn(server, token, extra);
        let mut child = out;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        match line {
            Ok(Ok(Some(l))) if l.starts_with("VERGE_NODE=") => {}
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "verge node {} did not start ({other:?})\n--- node log ---\n{}",
                    self.name,
                    self.log()
                );
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Starts `verge node` and returns the process without waiting (for
    /// runs expected to fail).
    pub fn spawn(&self, server: &str, token: Option<&str>, extra: &[&str]) -> Child {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("node log");
        // Not `ip netns exec`: that also remounts /sys, hiding the cgroup
        // hierarchies from the node. Only the network namespace changes.
        let ns = std::fs::File::open(format!("/run/netns/{}", self.netns)).expect("open netns");
        let ns_fd = std::os::fd::AsRawFd::as_raw_fd(&ns);
        let mut cmd = crate::verge_command();
        cmd.args([
            "node",
            "--server",
            server,
            "--name",
            &self.name,
            "--data-dir",
        ])
        .arg(self.data_dir.path())
        .args(["--stop-grace", "2s"])
        .args(extra);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(logf);
        // SAFETY: between fork and exec only setns(2), a plain system call, runs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().expect("spawn verge node");
        drop(ns);
        child
    }

    /// The node daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` of the daemon (its instances keep running).
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            let status = crate::control::stop_daemon(child, libc::SIGTERM).await;
            assert!(
                status.success(),
                "verge node exited with {status}\n{}",
                self.log()
            );
        }
    }

    /// Routes `prefix` (the node's instance prefix) from the test's
    /// namespace to the node.
    pub fn route_instances(&mut self, prefix: &str) {
        ip(&[
            "-6",
            "route",
            "replace",
            prefix,
            "via",
            &self.node_addr.to_string(),
        ]);
        self.routes.push(prefix.to_string());
    }

    /// Makes `127.0.0.1:port` inside the node's namespace reach
    /// `127.0.0.1:port` of the test's (where the test registry listens, and
    /// what the control plane pins image references to): a TCP relay whose
    /// listening socket lives in the node's namespace and whose upstream
    /// connections are made from the test's.
    pub fn forward_loopback(&mut self, port: u16) {
        let netns = format!("/run/netns/{}", self.netns);
        let listener = std::thread::spawn(move || {
            let ns = std::fs::File::open(&netns).expect("open netns");
            // SAFETY: setns(2) on this short-lived thread only; the socket it
            // creates stays in that namespace after the thread ends.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {netns}");
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(lo.is_ok());
            let l =
                std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind relay in node netns");
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .expect("relay listener thread");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        self.relays.push(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                    }
                });
            }
        }));
    }

    /// Where the node keeps its instances' network namespaces
    /// (`/run/verge/netns/<node id>`), once it has joined.
    pub fn netns_dir(&self) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.data_dir.path().join("identity/node.json")).ok()?;
        let id: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(Path::new("/run/verge/netns").join(id["node_id"].as_str()?))
    }

    /// The instance dirs the node's runtime keeps.
    pub fn instance_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data_dir.path().join("instances"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The first number in a pid file (`<pid>` or `<pid> <start time>`).
fn read_pid(path: &Path) -> Option<libc::pid_t> {
    std::fs::read_to_string(path)
        .ok()?
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

impl Drop for NodeHost {
    fn drop(&mut self) {
        for r in &self.relays {
            r.abort();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        for dir in self.instance_dirs() {
            for file in ["pid", "shim.pid"] {
                if let Some(pid) = read_pid(&dir.join(file)).filter(|p| *p > 1) {
                    // SAFETY: kill(2) on a pid this test's node started; a
                    // stale pid at worst hits nothing (ESRCH).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            // In every hierarchy (cgroup v1 makes the instance's cgroup in
            // each), retrying while the killed processes exit.
            let cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.path().join("verge").join(&id))
                        .collect()
                })
                .unwrap_or_default();
            for _ in 0..250 {
                let left: Vec<&PathBuf> = cgroups
                    .iter()
                    .filter(|cg| cg.exists() && std::fs::remove_dir(cg).is_err())
                    .collect();
                if left.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        release_volumes(self.data_dir.path());
        // Every network namespace the node made (also of instances that
        // failed or were still stopping), and its namespace directory.
        if let Some(dir) = self.netns_dir() {
            for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = nix_umount(&f.path());
                let _ = std::fs::remove_file(f.path());
            }
            let _ = nix_umount(&dir);
            let _ = std::fs::remove_dir(&dir);
        }
        for r in &self.routes {
            let _ = std::process::Command::new("ip")
                .args(["-6", "route", "del", r])
                .output();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Unmounts what is mounted under `dir` (a node's volumes), deepest first,
/// and detaches the loop devices whose backing files are there, so a test
/// leaves no mount or loop device behind.
pub fn release_volumes(dir: &std::path::Path) {
    let prefix = dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(prefix.as_str()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix_umount(std::path::Path::new(p));
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let backing = std::fs::read_to_string(entry.path().join("loop/backing_file"));
        if name.starts_with("loop") && backing.is_ok_and(|b| b.starts_with(prefix.as_str())) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &format!("/dev/{name}")])
                .output();
        }
    }
}

/// The named network namespace of instance `id`, if one exists: nodes keep
/// them in `/run/verge/netns/<node id>/<instance id>`.
pub fn instance_netns(id: &str) -> Option<PathBuf> {
    std::fs::read_dir("/run/verge/netns")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(id))
        .find(|p| p.exists())
}

fn nix_umount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; MNT_DETACH has no other preconditions.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects to an instance at `address` and reads its greeting line;
/// `None` when nothing answers within 2 s.
pub async fn greet(address: &str) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let connect = tokio::net::TcpStream::connect(address);
    let mut stream = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf));
    let n = read.await.ok()?.ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

/// A tag for this test's namespaces, links and prefixes: distinct across
/// concurrent tests (and runs), at most 16 bits.
pub fn test_tag() -> u16 {
    let u = ulid::Ulid::new().0;
    ((u ^ (u >> 16) ^ (u >> 32) ^ (u >> 48) ^ u64::from(std::process::id()) as u128) & 0xffff)
        as u16
}
