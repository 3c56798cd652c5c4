//! PROXY protocol v2 headers (HAProxy's `proxy-protocol.txt`, section 2.2):
//! what an endpoint with `proxy_protocol = "v2"` writes first on every
//! backend connection, so the backend sees the real client address. The
//! encoding is the `ppp` crate's; this module only decides what goes in.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;

/// The binary v2 header of a proxied TCP connection from `client` to the
/// endpoint address it reached (`endpoint`): signature, `PROXY` command,
/// `TCP over IPv4` or `TCP over IPv6`, then both addresses and ports. When
/// the families differ (an IPv4 client on a dual-stack listener), both are
/// written as IPv6, the IPv4 one mapped (`::ffff:a.b.c.d`).
pub fn v2_header(client: SocketAddr, endpoint: SocketAddr) -> Vec<u8> {
    let (client, endpoint) = match (client.ip(), endpoint.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (client, endpoint),
        _ => (mapped(client), mapped(endpoint)),
    };
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, endpoint),
    )
    .build()
    .expect("a header without TLVs always fits")
}

fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

    #[test]
    fn an_ipv6_header_is_byte_exact() {
        let client: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
        let endpoint: SocketAddr = "[fd00::80]:443".parse().unwrap();
        let h = v2_header(client, endpoint);
        assert_eq!(h[..12], SIGNATURE);
        assert_eq!(h[12], 0x21, "version 2, command PROXY");
        assert_eq!(h[13], 0x21, "AF_INET6, STREAM");
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        let ip = |b: &[u8]| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
        assert_eq!(
            ip(&h[16..32]),
            "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ip(&h[32..48]),
            "fd00::80".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(u16::from_be_bytes([h[48], h[49]]), 50000);
        assert_eq!(u16::from_be_bytes([h[50], h[51]]), 443);
    }

    #[test]
    fn an_ipv4_header_is_byte_exact() {
        let h = v2_header(
            "203.0.113.7:40000".parse().unwrap(),
            "198.51.100.1:80".parse().unwrap(),
        );
        assert_eq!(h[..12], SIGNATURE);
        assert_eq!(
            &h[12..16],
            &[0x21, 0x11, 0, 12],
            "PROXY, AF_INET STREAM, 12 bytes"
        );
        assert_eq!(&h[16..20], &[203, 0, 113, 7]);
        assert_eq!(&h[20..24], &[198, 51, 100, 1]);
        assert_eq!(&h[24..28], &[0x9c, 0x40, 0, 80]);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn mixed_families_become_mapped_ipv6_and_parse_back() {
        let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let endpoint: SocketAddr = "[fd00::80]:443".parse().unwrap();
        let h = v2_header(client, endpoint);
        let parsed = v2::Header::try_from(h.as_slice()).expect("ppp parses what it built");
        match parsed.addresses {
            v2::Addresses::IPv6(a) => {
                assert_eq!(
                    a.source_address,
                    "::ffff:203.0.113.7".parse::<std::net::Ipv6Addr>().unwrap()
                );
                assert_eq!(a.source_port, 40000);
                assert_eq!(a.destination_port, 443);
            }
            other => panic!("expected IPv6 addresses, got {other:?}"),
        }
        assert_eq!(parsed.command, v2::Command::Proxy);
        assert_eq!(parsed.protocol, v2::Protocol::Stream);
    }
}
