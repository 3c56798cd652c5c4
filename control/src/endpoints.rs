//! Endpoint addresses (SPEC §5 Ingress): where each endpoint listens.
//!
//! Every endpoint gets its own IPv6 address from the configured
//! `endpoint_prefix`, and an IPv4 address from `endpoint_ipv4_pool` only
//! when it asks (`ipv4 = true`). A prefix of one address (`/128`, `/32`)
//! is a *shared* address: endpoints then share it and must use different
//! ports. `::1/128` is what an unprivileged `verge dev` uses, since it
//! cannot add the route that makes a prefix bindable.
//!
//! Addresses are assigned when a release becomes current (deploy,
//! rollback, cancel, automatic rollback: `Mutation::make_current`), kept
//! while the env's current release keeps the endpoint, and freed when it
//! drops it. The store's `endpoint_ports` key refuses two endpoints on one
//! address and port; [`crate::store`] turns that into a clear error.
//!
//! This module holds the rules only; it must not touch the store.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The address pools endpoints are given addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addressing {
    pub ipv6: Ipv6Net,
    pub ipv4: Ipv4Net,
}

/// Why the configured pools cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressingError {
    #[error(
        "endpoint_prefix {0:?} is not usable: give an IPv6 prefix from /48 to /128, e.g. fd65:6e64:7074::/64 \
         (or ::1/128 to share the loopback address)"
    )]
    BadPrefix(String),
    #[error(
        "endpoint_ipv4_pool {0:?} is not usable: give an IPv4 prefix from /16 to /32, e.g. 203.0.113.0/28 \
         (a /32 is one address shared by every IPv4 endpoint)"
    )]
    BadPool(String),
    #[error(
        "endpoint_prefix {endpoints} overlaps instance_prefix {instances}: endpoint and instance addresses must differ"
    )]
    Overlap {
        endpoints: Ipv6Net,
        instances: Ipv6Net,
    },
}

impl Addressing {
    /// Parses and checks the configured pools.
    pub fn parse(
        ipv6: &str,
        ipv4: &str,
        instances: Ipv6Net,
    ) -> Result<Addressing, AddressingError> {
        let v6 = ipv6
            .parse::<Ipv6Net>()
            .ok()
            .filter(|p| p.prefix_len() >= 48)
            .ok_or_else(|| AddressingError::BadPrefix(ipv6.to_string()))?
            .trunc();
        let v4 = ipv4
            .parse::<Ipv4Net>()
            .ok()
            .filter(|p| p.prefix_len() >= 16)
            .ok_or_else(|| AddressingError::BadPool(ipv4.to_string()))?
            .trunc();
        if v6.contains(&instances.network()) || instances.contains(&v6.network()) {
            return Err(AddressingError::Overlap {
                endpoints: v6,
                instances,
            });
        }
        Ok(Addressing { ipv6: v6, ipv4: v4 })
    }

    /// Endpoints share one IPv6 address (and differ by port).
    pub fn shared_ipv6(&self) -> bool {
        self.ipv6.prefix_len() == 128
    }

    /// Endpoints listen on the loopback address: only this machine reaches them.
    pub fn loopback(&self) -> bool {
        self.ipv6.addr().is_loopback()
    }

    /// IPv6 addresses an endpoint may get, in the order they are handed out:
    /// the shared address, or the prefix's addresses from `::1` of it on.
    pub fn ipv6_candidates(&self) -> impl Iterator<Item = Ipv6Addr> + Send + '_ {
        let base = u128::from(self.ipv6.network());
        let size = 1u128 << (128 - u32::from(self.ipv6.prefix_len()));
        let (first, count) = if size == 1 { (0, 1) } else { (1, size - 1) };
        (first..first + count).map(move |i| Ipv6Addr::from(base + i))
    }

    /// IPv4 addresses, likewise: the shared address, or the pool's hosts.
    pub fn ipv4_candidates(&self) -> impl Iterator<Item = Ipv4Addr> + Send + '_ {
        // `hosts()` of a /31 or /32 is every address.
        self.ipv4.hosts()
    }

    /// The prefixes an ingress needs `local` routes for (none on loopback).
    pub fn routed(&self) -> (Option<Ipv6Net>, Option<Ipv4Net>) {
        let v6 = (!self.ipv6.addr().is_loopback()).then_some(self.ipv6);
        let v4 = (!self.ipv4.addr().is_loopback()).then_some(self.ipv4);
        (v6, v4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances() -> Ipv6Net {
        "fd76:6572:6765::/48".parse().unwrap()
    }

    #[test]
    fn a_prefix_hands_out_its_addresses_from_one_and_a_128_shares_one() {
        let a = Addressing::parse("fd65:6e64:7074::/64", "203.0.113.0/30", instances()).unwrap();
        let v6: Vec<String> = a.ipv6_candidates().take(2).map(|a| a.to_string()).collect();
        assert_eq!(v6, ["fd65:6e64:7074::1", "fd65:6e64:7074::2"]);
        let v4: Vec<String> = a.ipv4_candidates().map(|a| a.to_string()).collect();
        assert_eq!(v4, ["203.0.113.1", "203.0.113.2"]);
        assert!(!a.shared_ipv6() && !a.loopback());
        assert_eq!(a.routed().0.unwrap().to_string(), "fd65:6e64:7074::/64");

        let lo = Addressing::parse("::1/128", "127.0.0.1/32", instances()).unwrap();
        assert_eq!(
            lo.ipv6_candidates().collect::<Vec<_>>(),
            [Ipv6Addr::LOCALHOST]
        );
        assert_eq!(
            lo.ipv4_candidates().collect::<Vec<_>>(),
            [Ipv4Addr::LOCALHOST]
        );
        assert!(lo.shared_ipv6() && lo.loopback());
        assert_eq!(lo.routed(), (None, None));
    }

    #[test]
    fn bad_and_overlapping_pools_are_named() {
        let e =
            Addressing::parse("fd76:6572:6765:9::/64", "127.0.0.1/32", instances()).unwrap_err();
        assert!(e.to_string().contains("overlaps instance_prefix"), "{e}");
        let e = Addressing::parse("nonsense", "127.0.0.1/32", instances()).unwrap_err();
        assert!(e.to_string().contains("\"nonsense\""), "{e}");
        let e = Addressing::parse("::1/128", "10.0.0.0/8", instances()).unwrap_err();
        assert!(e.to_string().contains("from /16 to /32"), "{e}");
    }
}
