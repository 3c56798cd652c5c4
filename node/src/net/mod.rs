//! Instance networking: one named network namespace per instance, joined
//! to the node by a veth pair, with addresses from the node's prefixes.
//!
//! For instance `I`, [`Network::setup`] makes:
//!
//! - `<netns_dir>/I`: a network namespace bind-mounted on a file, as `ip
//!   netns add` does, so that it exists before the instance's process (which
//!   the runtime moves into it with `setns`) and after it;
//! - inside it: `lo` up; `eth0` up with the instance's IPv6 address (a /128
//!   from the node's prefix, no duplicate address detection) and IPv4
//!   address (a /32 from the node's range); default routes via `fe80::1`
//!   and, on-link, via `169.254.1.1`;
//! - on the node: the other end of the veth, named by [`host_veth_name`],
//!   up with `fe80::1/64` and `169.254.1.1/32`, and routes to the instance's
//!   two addresses through it.
//!
//! Instances reach each other and the outside through the node, which
//! therefore forwards packets ([`enable_forwarding`]; the daemon decides
//! whether to call it). Addresses come from [`Ipam`], which keeps them in a
//! file across restarts.
//!
//! The node's side is the network namespace of the thread that calls
//! [`Network::new`]. Namespace changes happen only on short-lived helper
//! threads, never on runtime threads.

mod error;
mod ipam;
mod link;
pub(crate) mod ns;
mod wiring;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

pub use error::NetError;
pub use ipam::Ipam;
use link::Rtnl;

/// Where instance network namespaces are mounted unless configured otherwise.
pub const DEFAULT_NETNS_DIR: &str = "/run/verge/netns";
/// The node-local IPv4 range instances get addresses from unless configured otherwise.
pub const DEFAULT_RANGE_V4: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 89, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("invalid default range"),
};
/// The instance's interface, inside its namespace.
pub const INSTANCE_IF: &str = "eth0";
/// The node's address on every host veth, the instances' IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The node's address on every host veth, the instances' IPv4 gateway.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Where instance networking keeps its state, and the node's address ranges.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Where namespaces are mounted ([`DEFAULT_NETNS_DIR`]).
    pub netns_dir: PathBuf,
    /// The address allocations file, under the node's data dir.
    pub ipam_file: PathBuf,
    /// The node's instance prefix, given by the control plane at join (a /64).
    pub prefix_v6: Ipv6Net,
    /// The node-local IPv4 range ([`DEFAULT_RANGE_V4`]).
    pub range_v4: Ipv4Net,
}

impl NetConfig {
    /// The defaults, with allocations in `<data_dir>/net/ipam.json`.
    pub fn new(data_dir: &Path, prefix_v6: Ipv6Net) -> NetConfig {
        NetConfig {
            netns_dir: PathBuf::from(DEFAULT_NETNS_DIR),
            ipam_file: data_dir.join("net").join("ipam.json"),
            prefix_v6,
            range_v4: DEFAULT_RANGE_V4,
        }
    }
}

/// One instance's network, as [`Network::setup`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNet {
    /// The namespace file, for `setns(CLONE_NEWNET)`.
    pub netns: PathBuf,
    /// The node's end of the veth pair.
    pub host_veth: String,
    pub v6: Ipv6Addr,
    pub v4: Ipv4Addr,
}

/// Instance networking on this node. Cheap to clone.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NetConfig,
    ipam: Mutex<Ipam>,
    /// Bound to the node's network namespace.
    node: Rtnl,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Loads the address allocations, makes the netns directory a shared
    /// mount point and opens rtnetlink in the calling thread's network
    /// namespace, which is the node's side from then on.
    pub async fn new(cfg: NetConfig) -> Result<Network, NetError> {
        let ipam = {
            let cfg = cfg.clone();
            blocking(move || Ipam::load(&cfg.ipam_file, cfg.prefix_v6, cfg.range_v4)).await?
        };
        ns::prepare_dir(&cfg.netns_dir).map_err(|e| {
            NetError::node(
                format!(
                    "preparing network namespace directory {}",
                    cfg.netns_dir.display()
                ),
                e,
            )
        })?;
        let node = Rtnl::here().map_err(|e| NetError::node("opening an rtnetlink socket", e))?;
        Ok(Network {
            inner: Arc::new(Inner {
                cfg,
                ipam: Mutex::new(ipam),
                node,
            }),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.inner.cfg
    }

    /// The namespace file of `instance` (whether or not it exists).
    pub fn netns_path(&self, instance: &str) -> PathBuf {
        self.inner.cfg.netns_dir.join(instance)
    }

    /// Allocates the instance's addresses and makes its network (see the
    /// module documentation). Idempotent: on an instance already set up it
    /// checks every piece, repairs what is missing and returns the same
    /// [`InstanceNet`]. If it fails on an instance that had no namespace, it
    /// removes what it made (the addresses stay allocated).
    pub async fn setup(&self, instance: &str) -> Result<InstanceNet, NetError> {
        check_id(instance)?;
        let (v6, v4) = {
            let inner = self.inner.clone();
            let id = instance.to_owned();
            blocking(move || lock(&inner.ipam).allocate(&id)).await?
        };
        let net = InstanceNet {
            netns: self.netns_path(instance),
            host_veth: host_veth_name(instance),
            v6,
            v4,
        };
        let created = wiring::ensure_netns(instance, &net.netns).await?;
        let result = wiring::configure(&self.inner.node.handle, instance, &net).await;
        if result.is_err() && created {
            let _ = wiring::teardown(&self.inner.node.handle, instance, &net.netns).await;
        }
        result.map(|()| net)
    }

    /// Removes the instance's veth pair and namespace, and frees its
    /// addresses. Ok when some or all of it is already gone.
    pub async fn remove(&self, instance: &str) -> Result<(), NetError> {
        check_id(instance)?;
        let netns = self.netns_path(instance);
        wiring::teardown(&self.inner.node.handle, instance, &netns).await?;
        let inner = self.inner.clone();
        let id = instance.to_owned();
        blocking(move || lock(&inner.ipam).release(&id)).await
    }

    /// On shutdown: unmounts and removes the netns directory when no
    /// instance namespace is left in it (a node that stopped its instances,
    /// such as `verge dev`'s, leaves no mount behind).
    pub async fn close(&self) -> Result<(), NetError> {
        let dir = self.inner.cfg.netns_dir.clone();
        tokio::task::spawn_blocking(move || ns::release_dir(&dir))
            .await
            .expect("releasing the netns dir does not panic")
            .map_err(|e| {
                NetError::node(
                    format!("releasing {}", self.inner.cfg.netns_dir.display()),
                    e,
                )
            })
    }

    /// The instances with a file in the netns directory, mounted or not
    /// (a leftover to remove or an instance to adopt), in order.
    pub async fn list(&self) -> Result<Vec<String>, NetError> {
        let dir = &self.inner.cfg.netns_dir;
        let err = |e| {
            NetError::node(
                format!("listing network namespaces in {}", dir.display()),
                e,
            )
        };
        let mut ids = Vec::new();
        let mut entries = match tokio::fs::read_dir(dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(err(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(err)? {
            if let Some(name) = entry.file_name().to_str()
                && check_id(name).is_ok()
            {
                ids.push(name.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Whether a network namespace is mounted for `instance`.
    pub async fn exists(&self, instance: &str) -> Result<bool, NetError> {
        check_id(instance)?;
        let path = self.netns_path(instance);
        match ns::state(&path) {
            Ok(state) => Ok(state == ns::State::Mounted),
            Err(e) => Err(NetError::instance(
                instance,
                format!("checking {}", path.display()),
                e,
            )),
        }
    }

    /// The addresses allocated to `instance`, if any.
    pub fn addresses(&self, instance: &str) -> Option<(Ipv6Addr, Ipv4Addr)> {
        lock(&self.inner.ipam).get(instance)
    }
}

/// Turns on IPv6 and IPv4 forwarding in the calling thread's network
/// namespace, which instances need to reach each other and the outside.
///
/// With IPv6 forwarding on, Linux ignores router advertisements on
/// interfaces whose `accept_ra` is 1: a node that learns its IPv6 default
/// route from them needs `accept_ra=2` on its uplink. This function does not
/// change that, nor set up NAT for instance addresses that are not routed
/// to the node.
pub fn enable_forwarding() -> Result<(), NetError> {
    for sysctl in [
        "/proc/sys/net/ipv6/conf/all/forwarding",
        "/proc/sys/net/ipv4/ip_forward",
    ] {
        ns::write_sysctl(sysctl, "1")
            .map_err(|e| NetError::node(format!("writing 1 to {sysctl}"), e))?;
    }
    Ok(())
}

/// The node's end of the instance's veth pair: `vg` and 11 hex digits of
/// the SHA-256 of the instance id (interface names have at most 15 bytes).
pub fn host_veth_name(instance: &str) -> String {
    let digest = Sha256::digest(instance.as_bytes());
    let mut name = String::from("vg");
    name.push_str(&hex::encode(&digest[..6])[..11]);
    name
}

/// Instance ids become file names: 1 to 128 of `[A-Za-z0-9._-]`, no leading dot.
fn check_id(instance: &str) -> Result<(), NetError> {
    let ok = (1..=128).contains(&instance.len())
        && !instance.starts_with('.')
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NetError::BadInstanceId(instance.to_owned()))
    }
}

fn lock(ipam: &Mutex<Ipam>) -> std::sync::MutexGuard<'_, Ipam> {
    ipam.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs file work (the allocations file is synced to disk) off the runtime.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, NetError> + Send + 'static,
) -> Result<R, NetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::node("allocating addresses", std::io::Error::other(e)))?
}
