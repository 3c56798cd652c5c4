//! The rtnetlink requests instance networking makes, on a connection bound
//! to one network namespace.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::error::netlink_io;
use super::ns;

/// An rtnetlink connection. Its socket belongs to the network namespace of
/// the thread that created it, whichever thread drives it afterwards.
pub(crate) struct Rtnl {
    pub(crate) handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Rtnl {
    /// A connection in the calling thread's network namespace.
    pub(crate) fn here() -> io::Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// A connection in the network namespace mounted on `netns`: its socket
    /// is opened by a helper thread that entered the namespace, and the
    /// connection then runs on the current runtime.
    pub(crate) async fn in_netns(netns: &Path) -> io::Result<Rtnl> {
        let runtime = tokio::runtime::Handle::current();
        let netns = netns.to_owned();
        let (conn, handle) = ns::on_thread(move || {
            ns::enter(&netns)?;
            // Registers the socket with the runtime's reactor.
            let _entered = runtime.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            io::Result::Ok((conn, handle))
        })
        .await??;
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// Closes the socket before returning.
    pub(crate) async fn close(self) {
        drop(self.handle);
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The link named `name`, if there is one.
pub(crate) async fn by_name(h: &Handle, name: &str) -> io::Result<Option<LinkMessage>> {
    let found = h.link().get().match_name(name).execute().try_next().await;
    match found.map_err(netlink_io) {
        Ok(link) => Ok(link),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The index of a veth's peer (in the peer's namespace), if `link` is a veth.
pub(crate) fn veth_peer(link: &LinkMessage) -> Option<u32> {
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    let peer = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    });
    peer.filter(|_| is_veth)
}

/// Deletes a link; Ok if it is already gone.
pub(crate) async fn delete(h: &Handle, index: u32) -> io::Result<()> {
    match h.link().del(index).execute().await.map_err(netlink_io) {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) => Err(e),
        _ => Ok(()),
    }
}

/// Creates a veth pair: `host` in this connection's namespace, `peer`
/// created directly in the namespace mounted on `netns`.
pub(crate) async fn add_veth(h: &Handle, host: &str, peer: &str, netns: &Path) -> io::Result<()> {
    let netns_file = std::fs::File::open(netns)?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer)
        .setns_by_fd(netns_file.as_raw_fd())
        .build();
    let veth = LinkVeth::new(host, "").set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
    let result = h
        .link()
        .add(veth.build())
        .execute()
        .await
        .map_err(netlink_io);
    drop(netns_file);
    result
}

pub(crate) async fn set_up(h: &Handle, index: u32) -> io::Result<()> {
    let up = LinkUnspec::new_with_index(index).up().build();
    h.link().set(up).execute().await.map_err(netlink_io)
}

/// Adds (or replaces) an address, without duplicate address detection.
pub(crate) async fn add_address(
    h: &Handle,
    index: u32,
    addr: IpAddr,
    prefix_len: u8,
) -> io::Result<()> {
    let mut req = h.address().add(index, addr, prefix_len).replace();
    if addr.is_ipv6() {
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    req.execute().await.map_err(netlink_io)
}

/// Adds (or replaces) the route `dst/len dev <index>`.
pub(crate) async fn add_device_route(
    h: &Handle,
    index: u32,
    dst: IpAddr,
    len: u8,
) -> io::Result<()> {
    let route = match dst {
        IpAddr::V6(dst) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, len)
            .output_interface(index)
            .build(),
        IpAddr::V4(dst) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, len)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
    };
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink_io)
}

/// Adds (or replaces) the default route `via <gateway> dev <index>`, on-link
/// for IPv4 (the gateway is in no subnet of the link).
pub(crate) async fn add_default_route(h: &Handle, index: u32, gateway: IpAddr) -> io::Result<()> {
    let route = match gateway {
        IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build(),
        IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .onlink()
            .build(),
    };
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink_io)
}
