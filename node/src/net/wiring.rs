//! Making and removing one instance's namespace, veth pair, addresses and
//! routes (see the parent module for the layout).

use std::net::IpAddr;
use std::path::Path;

use rtnetlink::Handle;

use super::link::{self, Rtnl};
use super::{GATEWAY_V4, GATEWAY_V6, INSTANCE_IF, InstanceNet, NetError, host_veth_name, ns};

/// Makes sure a namespace is mounted on `path`; true if it made it.
pub(super) async fn ensure_netns(instance: &str, path: &Path) -> Result<bool, NetError> {
    let state = ns::state(path)
        .map_err(|e| NetError::instance(instance, format!("checking {}", path.display()), e))?;
    match state {
        ns::State::Mounted => return Ok(false),
        ns::State::Missing => {}
        ns::State::Stale => ns::remove(path).map_err(|e| {
            NetError::instance(
                instance,
                format!("removing stale network namespace file {}", path.display()),
                e,
            )
        })?,
    }
    let owned = path.to_owned();
    ns::on_thread(move || ns::create(&owned))
        .await
        .map_err(|e| {
            NetError::instance(
                instance,
                "starting a thread to create its network namespace",
                e,
            )
        })?
        .map_err(|(action, e)| NetError::instance(instance, action, e))?;
    Ok(true)
}

pub(super) async fn configure(
    node: &Handle,
    instance: &str,
    net: &InstanceNet,
) -> Result<(), NetError> {
    let inside = Rtnl::in_netns(&net.netns).await.map_err(|e| {
        NetError::instance(
            instance,
            format!(
                "opening rtnetlink in network namespace {}",
                net.netns.display()
            ),
            e,
        )
    })?;
    let result = configure_with(node, &inside.handle, instance, net).await;
    inside.close().await;
    result
}

async fn configure_with(
    node: &Handle,
    inside: &Handle,
    instance: &str,
    net: &InstanceNet,
) -> Result<(), NetError> {
    let host = &net.host_veth;
    let err = |action: String| move |e| NetError::instance(instance, action, e);

    // The veth pair: kept if both ends exist and are each other's peer.
    let host_link = link::by_name(node, host)
        .await
        .map_err(err(format!("looking up {host}")))?;
    let eth0 = link::by_name(inside, INSTANCE_IF)
        .await
        .map_err(err(format!("looking up {INSTANCE_IF} in its namespace")))?;
    let paired = match (&host_link, &eth0) {
        (Some(h), Some(e)) => {
            link::veth_peer(h) == Some(e.header.index) && link::veth_peer(e) == Some(h.header.index)
        }
        _ => false,
    };
    if !paired {
        if let Some(h) = &host_link {
            link::delete(node, h.header.index)
                .await
                .map_err(err(format!("deleting stale {host}")))?;
        }
        if let Some(e) = &eth0 {
            link::delete(inside, e.header.index)
                .await
                .map_err(err(format!(
                    "deleting stale {INSTANCE_IF} in its namespace"
                )))?;
        }
        link::add_veth(node, host, INSTANCE_IF, &net.netns)
            .await
            .map_err(err(format!(
                "creating veth {host} (peer {INSTANCE_IF} in {})",
                net.netns.display()
            )))?;
    }
    let index = async |h, name: &str, whose: &str| {
        match link::by_name(h, name).await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(std::io::Error::from_raw_os_error(libc::ENODEV)),
            Err(e) => Err(e),
        }
        .map_err(err(format!("looking up {name} {whose}")))
    };
    let host_index = index(node, host, "on the node").await?;
    let eth0_index = index(inside, INSTANCE_IF, "in its namespace").await?;
    let lo_index = index(inside, "lo", "in its namespace").await?;

    for (h, i, name) in [
        (node, host_index, host.as_str()),
        (inside, lo_index, "lo"),
        (inside, eth0_index, INSTANCE_IF),
    ] {
        link::set_up(h, i)
            .await
            .map_err(err(format!("setting {name} up")))?;
    }
    let addresses = [
        (node, host_index, host.as_str(), IpAddr::V6(GATEWAY_V6), 64),
        (node, host_index, host.as_str(), IpAddr::V4(GATEWAY_V4), 32),
        (inside, eth0_index, INSTANCE_IF, IpAddr::V6(net.v6), 128),
        (inside, eth0_index, INSTANCE_IF, IpAddr::V4(net.v4), 32),
    ];
    for (h, i, name, addr, len) in addresses {
        link::add_address(h, i, addr, len)
            .await
            .map_err(err(format!("adding address {addr}/{len} to {name}")))?;
    }
    for (addr, len) in [(IpAddr::V6(net.v6), 128), (IpAddr::V4(net.v4), 32)] {
        link::add_device_route(node, host_index, addr, len)
            .await
            .map_err(err(format!("adding route {addr}/{len} dev {host}")))?;
    }
    for gateway in [IpAddr::V6(GATEWAY_V6), IpAddr::V4(GATEWAY_V4)] {
        link::add_default_route(inside, eth0_index, gateway)
            .await
            .map_err(err(format!(
                "adding default route via {gateway} dev {INSTANCE_IF} in its namespace"
            )))?;
    }
    Ok(())
}

/// Deletes the host veth (its peer goes with it) and the namespace.
pub(super) async fn teardown(node: &Handle, instance: &str, path: &Path) -> Result<(), NetError> {
    let host = host_veth_name(instance);
    if let Some(link) = link::by_name(node, &host)
        .await
        .map_err(|e| NetError::instance(instance, format!("looking up {host}"), e))?
    {
        link::delete(node, link.header.index)
            .await
            .map_err(|e| NetError::instance(instance, format!("deleting {host}"), e))?;
    }
    ns::remove(path).map_err(|e| {
        NetError::instance(
            instance,
            format!("removing network namespace {}", path.display()),
            e,
        )
    })
}
