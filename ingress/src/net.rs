//! Making endpoint addresses bindable, and listening on them.
//!
//! The control plane gives every endpoint a dedicated IPv6 address from a
//! configured prefix, and endpoints with `ipv4 = true` an IPv4 address from a
//! configured pool. Instead of configuring each address on an interface, the
//! ingress adds one `local` route per prefix ([`add_local_routes`], what
//! `ip -6 route add local PREFIX dev lo` does): the kernel then accepts
//! traffic for every address in it, and [`listen`] binds any of them with
//! `IP_FREEBIND`.
//!
//! Routes are made in the network namespace of the calling thread, over a
//! netlink socket that [`LocalRoutes`] keeps for removing them again.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use socket2::{Domain, Protocol, Socket, Type};

/// `RT_TABLE_LOCAL`: the table `local` routes live in.
const TABLE_LOCAL: u8 = 255;
/// The listen backlog of [`listen`].
const BACKLOG: i32 = 4096;

/// A failure to add or remove local routes. Messages name the prefix and,
/// where the cause is common, say what to do.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{action} for local routes: {source}{hint}", hint = hint(.source))]
    Netlink {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{action} local route for {prefix} (table local, dev lo): {source}{hint}", hint = hint(.source))]
    Route {
        action: &'static str,
        prefix: IpNet,
        #[source]
        source: io::Error,
    },
    #[error(
        "table local already has another route for {prefix} ({existing}): remove it (`ip route del table local {prefix}`) or configure another prefix"
    )]
    Conflict { prefix: IpNet, existing: String },
}

impl NetError {
    /// The OS error code behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetError::Netlink { source, .. } | NetError::Route { source, .. } => {
                source.raw_os_error()
            }
            NetError::Conflict { .. } => None,
        }
    }
}

/// What to do about the common causes, as a suffix of the message.
fn hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => ": run the ingress as root or with CAP_NET_ADMIN",
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP) => {
            ": the kernel lacks this address family (IPv6 disabled?); enable it or configure no prefix of that family"
        }
        _ => "",
    }
}

/// Converts an rtnetlink error into the `io::Error` it stands for.
fn netlink_io(err: rtnetlink::Error) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// Adds `local` routes (table local, type local, scope host, dev lo — what
/// `ip -6 route add local PREFIX dev lo` does) for the prefixes in the
/// current network namespace, so that any address in them can be bound
/// (with `IP_FREEBIND`) and receives traffic. Host bits of a prefix are
/// ignored. Idempotent: an existing identical route is fine (and then not
/// removed later); another route for the same prefix in table local is a
/// [`NetError::Conflict`]. On error, routes this call added are removed.
pub async fn add_local_routes(
    v6: Option<Ipv6Net>,
    v4: Option<Ipv4Net>,
) -> Result<LocalRoutes, NetError> {
    let prefixes: Vec<IpNet> = v6
        .map(|p| IpNet::V6(p.trunc()))
        .into_iter()
        .chain(v4.map(|p| IpNet::V4(p.trunc())))
        .collect();
    if prefixes.is_empty() {
        return Ok(LocalRoutes {
            rtnl: None,
            added: Vec::new(),
        });
    }
    let rtnl = Rtnl::here().map_err(|source| NetError::Netlink {
        action: "opening rtnetlink",
        source,
    })?;
    let lo = match loopback_index(&rtnl.handle).await {
        Ok(lo) => lo,
        Err(source) => {
            rtnl.close().await;
            return Err(NetError::Netlink {
                action: "looking up interface lo",
                source,
            });
        }
    };
    let mut routes = LocalRoutes {
        rtnl: Some((rtnl, lo)),
        added: Vec::new(),
    };
    for prefix in prefixes {
        match add(&routes.handle(), lo, prefix).await {
            Ok(true) => {
                tracing::info!(%prefix, "added local route");
                routes.added.push(prefix);
            }
            Ok(false) => tracing::info!(%prefix, "local route already present, keeping it"),
            Err(e) => {
                if let Err(undo) = routes.remove().await {
                    tracing::warn!(error = %undo, "removing local routes after a failure");
                }
                return Err(e);
            }
        }
    }
    Ok(routes)
}

/// The routes one [`add_local_routes`] call added. Dropping it leaves them
/// in place; [`LocalRoutes::remove`] deletes them.
pub struct LocalRoutes {
    /// The netlink connection and the index of `lo`; none without prefixes.
    rtnl: Option<(Rtnl, u32)>,
    added: Vec<IpNet>,
}

impl LocalRoutes {
    /// Removes the routes this call added (those already gone are fine),
    /// in the namespace they were added in.
    pub async fn remove(mut self) -> Result<(), NetError> {
        let Some((rtnl, lo)) = self.rtnl.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        // Newest first, so that a partial failure leaves the oldest.
        while let Some(prefix) = self.added.pop() {
            let del = rtnl.handle.route().del(local_route(prefix, lo));
            match del.execute().await.map_err(netlink_io) {
                Ok(()) => tracing::info!(%prefix, "removed local route"),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) => {}
                Err(source) => {
                    if result.is_ok() {
                        result = Err(NetError::Route {
                            action: "removing",
                            prefix,
                            source,
                        });
                    }
                }
            }
        }
        rtnl.close().await;
        result
    }

    /// True when this call added no route (no prefix, or all were there).
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
    }

    fn handle(&self) -> Handle {
        let (rtnl, _) = self
            .rtnl
            .as_ref()
            .expect("routes are added over a connection");
        rtnl.handle.clone()
    }
}

/// A listening socket on `addr`: `SO_REUSEADDR`, `IPV6_V6ONLY` on IPv6,
/// `IP_FREEBIND` (`IPV6_FREEBIND`) so that binding works before or without
/// the address being configured, nonblocking, backlog 4096. Must be called
/// within a tokio runtime. Errors keep their kind and name `addr`.
pub fn listen(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let context = |step: &'static str| {
        move |e: io::Error| io::Error::new(e.kind(), format!("{step} {addr}: {e}"))
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(context("creating a socket for"))?;
    socket
        .set_reuse_address(true)
        .map_err(context("setting SO_REUSEADDR for"))?;
    match addr {
        SocketAddr::V6(_) => {
            socket
                .set_only_v6(true)
                .map_err(context("setting IPV6_V6ONLY for"))?;
            // IPV6_FREEBIND is Linux 4.15+; IP_FREEBIND works on IPv6
            // sockets of older kernels too.
            socket
                .set_freebind_v6(true)
                .or_else(|e| match e.raw_os_error() {
                    Some(libc::ENOPROTOOPT) => socket.set_freebind_v4(true),
                    _ => Err(e),
                })
                .map_err(context("setting IPV6_FREEBIND for"))?;
        }
        SocketAddr::V4(_) => socket
            .set_freebind_v4(true)
            .map_err(context("setting IP_FREEBIND for"))?,
    }
    socket
        .set_nonblocking(true)
        .map_err(context("setting O_NONBLOCK on the socket for"))?;
    socket.bind(&addr.into()).map_err(context("binding"))?;
    socket.listen(BACKLOG).map_err(context("listening on"))?;
    tokio::net::TcpListener::from_std(socket.into()).map_err(context("registering listener on"))
}

/// An rtnetlink connection in the calling thread's network namespace.
struct Rtnl {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Rtnl {
    fn here() -> io::Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// Closes the socket before returning.
    async fn close(self) {
        drop(self.handle);
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn loopback_index(h: &Handle) -> io::Result<u32> {
    let mut links = h.link().get().match_name("lo").execute();
    match links.try_next().await.map_err(netlink_io)? {
        Some(link) => Ok(link.header.index),
        None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
    }
}

/// `local PREFIX dev lo table local scope host`.
fn local_route(prefix: IpNet, lo: u32) -> RouteMessage {
    match prefix {
        IpNet::V6(p) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(p.network(), p.prefix_len())
            .output_interface(lo)
            .table_id(TABLE_LOCAL.into())
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
        IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.network(), p.prefix_len())
            .output_interface(lo)
            .table_id(TABLE_LOCAL.into())
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
    }
}

/// Adds the local route for `prefix`; false if an identical one exists.
async fn add(h: &Handle, lo: u32, prefix: IpNet) -> Result<bool, NetError> {
    let added = h.route().add(local_route(prefix, lo)).execute().await;
    let source = match added.map_err(netlink_io) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => e,
        Err(source) => {
            return Err(NetError::Route {
                action: "adding",
                prefix,
                source,
            });
        }
    };
    let existing = existing_routes(h, prefix)
        .await
        .map_err(|source| NetError::Route {
            action: "looking up the existing",
            prefix,
            source,
        })?;
    let identical = |r: &RouteMessage| {
        r.header.kind == RouteType::Local && r.attributes.contains(&RouteAttribute::Oif(lo))
    };
    match existing.first() {
        _ if existing.iter().any(identical) => Ok(false),
        Some(other) => Err(NetError::Conflict {
            prefix,
            existing: describe(other),
        }),
        // Gone again since: report what the kernel said.
        None => Err(NetError::Route {
            action: "adding",
            prefix,
            source,
        }),
    }
}

/// The routes for exactly `prefix` in table local.
async fn existing_routes(h: &Handle, prefix: IpNet) -> io::Result<Vec<RouteMessage>> {
    let table_local = TABLE_LOCAL.into();
    let query = match prefix {
        IpNet::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table_local)
            .build(),
        IpNet::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table_local)
            .build(),
    };
    let routes: Vec<RouteMessage> = h
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(netlink_io)?;
    Ok(routes
        .into_iter()
        .filter(|r| table(r) == u32::from(TABLE_LOCAL) && destination(r) == Some(prefix))
        .collect())
}

fn table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table.into())
}

fn destination(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        _ => None,
    });
    IpNet::new(dst?, len).ok()
}

/// A short description of a route, for messages.
fn describe(r: &RouteMessage) -> String {
    let dev = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let kind = format!("{:?}", r.header.kind).to_lowercase();
    match dev {
        Some(dev) => format!("type {kind}, interface index {dev}"),
        None => format!("type {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_prefix_and_say_what_to_do() {
        let err = NetError::Route {
            action: "adding",
            prefix: "fd00:1::/64".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("adding local route for fd00:1::/64 (table local, dev lo): "),
            "{msg}"
        );
        assert!(
            msg.ends_with(": run the ingress as root or with CAP_NET_ADMIN"),
            "{msg}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn routes_are_local_routes_on_lo_in_table_local() {
        let r = local_route("198.18.0.0/24".parse().unwrap(), 1);
        assert_eq!(r.header.kind, RouteType::Local);
        assert_eq!(r.header.scope, RouteScope::Host);
        assert_eq!(table(&r), 255);
        assert_eq!(destination(&r), Some("198.18.0.0/24".parse().unwrap()));
        assert!(r.attributes.contains(&RouteAttribute::Oif(1)));
        let r = local_route("fd00:1::/64".parse().unwrap(), 1);
        assert_eq!(destination(&r), Some("fd00:1::/64".parse().unwrap()));
    }
}
