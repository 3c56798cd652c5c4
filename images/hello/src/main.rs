//! `hello`: Verge's example workload, a tiny TCP greeter and echo server.
//!
//! It is built statically (see `verge-images`) so that it runs alone in an
//! otherwise empty root filesystem. Usage:
//!
//! ```text
//! hello [--port N] [--listen ADDR]
//! ```
//!
//! `--port` defaults to `$PORT`, else 8080. `--listen` defaults to `[::]`
//! (dual-stack), falling back to `0.0.0.0` when IPv6 is unavailable.
//!
//! On each connection (one thread per connection) it writes one greeting line,
//!
//! ```text
//! hello from instance <VERGE_INSTANCE_ID or "unknown">; env: K1=V1 K2=V2
//! ```
//!
//! listing its environment sorted by name (minus shell noise such as `PATH`),
//! then echoes back every byte it receives until the peer closes.
//!
//! With `VERGE_PROXY_PROTOCOL=v2` (set by the control plane for instances
//! behind an endpoint with `proxy_protocol = "v2"`), every connection must
//! start with a binary PROXY protocol v2 header (HAProxy's
//! `proxy-protocol.txt`, section 2.2), parsed here by hand so that it checks
//! the ingress's encoder independently. The greeting then names the original
//! client and the address it reached,
//!
//! ```text
//! hello from instance <id>; client: 203.0.113.7:40000 to 198.51.100.1:443 (proxy v2); env: ...
//! hello from instance <id>; client: local (proxy v2); env: ...
//! ```
//!
//! (the second for a `LOCAL` header, e.g. the proxy's own health check).
//! Only TCP over IPv4 and TCP over IPv6 are accepted; TLVs are skipped. A
//! connection that does not start with a valid header within 10 s gets the
//! single line `hello: expected a PROXY v2 header: <why>` and is closed; one
//! closed before sending any byte (a TCP health check) is closed quietly.
//! Any other value of `VERGE_PROXY_PROTOCOL` than `v2` (or empty) stops
//! `hello` at start.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

/// Environment variables left out of the greeting: set by shells and init
/// systems, not by whoever configured the workload.
const HIDDEN_ENV: &[&str] = &["PATH", "HOME", "HOSTNAME", "TERM", "PWD", "SHLVL", "_"];

const USAGE: &str = "usage: hello [--port N] [--listen ADDR]";

/// The PROXY protocol v2 signature, the first 12 bytes of every header.
const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// How long a connection may take to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let (listen, port) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("hello: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let proxy_v2 = match std::env::var("VERGE_PROXY_PROTOCOL").as_deref() {
        Ok("v2") => true,
        Ok("") | Err(std::env::VarError::NotPresent) => false,
        Ok(other) => {
            eprintln!(
                "hello: VERGE_PROXY_PROTOCOL={other:?} is not supported: set it to v2 or leave it unset"
            );
            return ExitCode::from(2);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("hello: VERGE_PROXY_PROTOCOL is not UTF-8: set it to v2 or leave it unset");
            return ExitCode::from(2);
        }
    };
    let listener = match bind(listen, port) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hello: cannot listen on port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let expecting = if proxy_v2 {
        " (expecting PROXY v2 headers)"
    } else {
        ""
    };
    match listener.local_addr() {
        Ok(addr) => println!("hello listening on {addr}{expecting}"),
        Err(_) => println!("hello listening on port {port}{expecting}"),
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    let peer = match stream.peer_addr() {
                        Ok(addr) => addr.to_string(),
                        Err(_) => "unknown peer".into(),
                    };
                    if let Err(e) = serve(stream, proxy_v2) {
                        eprintln!("hello: connection from {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("hello: accept failed: {e}");
                // Back off so that e.g. running out of file descriptors does
                // not turn into a busy loop.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ExitCode::SUCCESS
}

/// Parses `--port N` / `--listen ADDR` (also `--flag=value`).
fn parse_args(args: impl Iterator<Item = String>) -> Result<(Option<IpAddr>, u16), String> {
    let mut listen = None;
    let mut port = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--port" => port = Some(parse_port(&value()?)?),
            "--listen" => {
                let v = value()?;
                let ip = v.trim_start_matches('[').trim_end_matches(']');
                listen = Some(
                    ip.parse()
                        .map_err(|_| format!("--listen: {v:?} is not an IP address"))?,
                );
            }
            "-h" | "--help" => return Err("help requested".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let port = match port {
        Some(port) => port,
        None => match std::env::var("PORT") {
            Ok(p) => parse_port(&p).map_err(|e| format!("$PORT: {e}"))?,
            Err(_) => 8080,
        },
    };
    Ok((listen, port))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("{s:?} is not a port number"))
}

/// Binds the requested address, or `[::]` falling back to `0.0.0.0`.
fn bind(listen: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    match listen {
        Some(ip) => TcpListener::bind(SocketAddr::new(ip, port)),
        None => TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            .or_else(|_| TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))),
    }
}

/// The greeting line, newline included; `client` is what the PROXY header
/// said, if one was expected.
fn greeting(client: Option<&ProxyHeader>) -> String {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .filter(|(k, _)| !HIDDEN_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    let instance = std::env::var("VERGE_INSTANCE_ID").unwrap_or_else(|_| "unknown".into());
    let env: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let client = match client {
        None => String::new(),
        Some(ProxyHeader::Proxy { src, dst }) => format!("client: {src} to {dst} (proxy v2); "),
        Some(ProxyHeader::Local) => "client: local (proxy v2); ".into(),
    };
    format!(
        "hello from instance {instance}; {client}env: {}\n",
        env.join(" ")
    )
}

/// Reads the PROXY header if `proxy_v2`, greets the peer, then echoes until
/// it closes its side.
fn serve(mut stream: TcpStream, proxy_v2: bool) -> io::Result<()> {
    let header = if proxy_v2 {
        stream.set_read_timeout(Some(PROXY_HEADER_TIMEOUT))?;
        match read_proxy_v2(&mut stream) {
            Ok(Some(header)) => Some(header),
            // Connected and closed (a TCP health check): nothing to say.
            Ok(None) => return Ok(()),
            Err(HeaderError::Io(e)) => return Err(e),
            Err(HeaderError::Invalid(why)) => {
                stream
                    .write_all(format!("hello: expected a PROXY v2 header: {why}\n").as_bytes())?;
                // Closing with unread input would reset the connection and
                // could discard the line: end our side, then drain a little.
                stream.shutdown(Shutdown::Write)?;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                let _ = io::copy(&mut (&stream).take(64 * 1024), &mut io::sink());
                return Ok(());
            }
        }
    } else {
        None
    };
    stream.set_read_timeout(None)?;
    stream.write_all(greeting(header.as_ref()).as_bytes())?;
    let mut reader = stream.try_clone()?;
    io::copy(&mut reader, &mut stream)?;
    match stream.shutdown(Shutdown::Write) {
        // The peer may already have closed both directions: nothing to report.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// What a PROXY protocol v2 header says.
#[derive(Debug, PartialEq, Eq)]
enum ProxyHeader {
    /// `PROXY`: a relayed connection from `src` (the client) to `dst` (the
    /// address the client reached).
    Proxy { src: SocketAddr, dst: SocketAddr },
    /// `LOCAL`: the proxy's own connection (e.g. a health check).
    Local,
}

#[derive(Debug)]
enum HeaderError {
    /// Not a valid header (or none in time): the reason, for the peer.
    Invalid(String),
    /// The connection failed.
    Io(io::Error),
}

impl From<String> for HeaderError {
    fn from(why: String) -> Self {
        HeaderError::Invalid(why)
    }
}

/// Reads one PROXY protocol v2 header from `r`, exactly its bytes (what
/// follows stays unread): `None` if `r` ends before its first byte.
fn read_proxy_v2(r: &mut impl Read) -> Result<Option<ProxyHeader>, HeaderError> {
    // Signature (12), version and command, family and protocol, length (2).
    let mut fixed = [0u8; 16];
    let got = read_full(r, &mut fixed)?;
    if got == 0 {
        return Ok(None);
    }
    let sig_len = got.min(PROXY_V2_SIGNATURE.len());
    if fixed[..sig_len] != PROXY_V2_SIGNATURE[..sig_len] {
        return Err(if fixed[..got].starts_with(b"PROXY ") {
            "got a PROXY v1 (text) header, only v2 (binary) is accepted".to_string()
        } else {
            format!(
                "the first bytes are not the v2 signature (got {})",
                escape(&fixed[..got])
            )
        }
        .into());
    }
    if got < fixed.len() {
        return Err(format!("connection closed after {got} of the 16 fixed header bytes").into());
    }
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Err(format!("version {version} (byte 0x{:02x}), expected 2", fixed[12]).into());
    }
    let family = fixed[13];
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut rest = vec![0u8; len];
    let got = read_full(r, &mut rest)?;
    if got < len {
        return Err(format!(
            "connection closed after {got} of the {len} address and TLV bytes the header announced"
        )
        .into());
    }
    match command {
        // Addresses (if any) and TLVs are to be ignored.
        0x0 => return Ok(Some(ProxyHeader::Local)),
        0x1 => {}
        other => return Err(format!("unknown command {other} (byte 0x{:02x})", fixed[12]).into()),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (src, dst) = match family {
        0x11 if len >= 12 => {
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            (
                SocketAddr::new(ip(&rest[0..4]), port(&rest[8..10])),
                SocketAddr::new(ip(&rest[4..8]), port(&rest[10..12])),
            )
        }
        0x21 if len >= 36 => {
            let ip =
                |b: &[u8]| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")));
            (
                SocketAddr::new(ip(&rest[0..16]), port(&rest[32..34])),
                SocketAddr::new(ip(&rest[16..32]), port(&rest[34..36])),
            )
        }
        0x11 | 0x21 => {
            let (name, need) = if family == 0x11 {
                ("IPv4", 12)
            } else {
                ("IPv6", 36)
            };
            return Err(format!("{len} address bytes, TCP over {name} needs {need}").into());
        }
        other => {
            return Err(format!(
                "family and protocol 0x{other:02x}, expected 0x11 (TCP over IPv4) or 0x21 (TCP over IPv6)"
            )
            .into());
        }
    };
    // What follows the addresses (TLVs) is skipped: it was read with them.
    Ok(Some(ProxyHeader::Proxy { src, dst }))
}

/// Reads until `buf` is full or the stream ends (or is reset before the
/// first byte); the number of bytes read. A read timeout is an invalid
/// header (none arrived in time).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, HeaderError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Reset before sending anything (some TCP health checks): as
            // good as closed.
            Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeaderError::Invalid(format!(
                    "no complete header within {} s ({got} bytes received)",
                    PROXY_HEADER_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    Ok(got)
}

/// Bytes as an escaped string, e.g. `"GET / HTTP/1.1\r\n"`.
fn escape(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 header: `command` byte, `family` byte, then `body`.
    fn header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = PROXY_V2_SIGNATURE.to_vec();
        h.extend([command, family]);
        h.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend(body);
        h
    }

    fn parse(bytes: &[u8]) -> Result<Option<ProxyHeader>, String> {
        read_proxy_v2(&mut &bytes[..]).map_err(|e| match e {
            HeaderError::Invalid(why) => why,
            HeaderError::Io(e) => panic!("reading a slice: {e}"),
        })
    }

    fn invalid(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(why) => why,
            Ok(h) => panic!("parsed {h:?} from {}", escape(bytes)),
        }
    }

    #[test]
    fn ipv4() {
        let body = [203, 0, 113, 7, 198, 51, 100, 1, 0x9c, 0x40, 0x01, 0xbb];
        let h = parse(&header(0x21, 0x11, &body)).unwrap().unwrap();
        assert_eq!(
            h,
            ProxyHeader::Proxy {
                src: "203.0.113.7:40000".parse().unwrap(),
                dst: "198.51.100.1:443".parse().unwrap(),
            }
        );
        assert!(
            greeting(Some(&h))
                .contains("; client: 203.0.113.7:40000 to 198.51.100.1:443 (proxy v2); env: ")
        );
    }

    #[test]
    fn ipv6() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut body = Vec::new();
        body.extend(src.octets());
        body.extend(dst.octets());
        body.extend(40000u16.to_be_bytes());
        body.extend(443u16.to_be_bytes());
        let h = parse(&header(0x21, 0x21, &body)).unwrap().unwrap();
        assert_eq!(
            h,
            ProxyHeader::Proxy {
                src: "[2001:db8::7]:40000".parse().unwrap(),
                dst: "[2001:db8::1]:443".parse().unwrap(),
            }
        );
        assert!(
            greeting(Some(&h))
                .contains("; client: [2001:db8::7]:40000 to [2001:db8::1]:443 (proxy v2); ")
        );
    }

    #[test]
    fn local_ignores_addresses() {
        assert_eq!(
            parse(&header(0x20, 0x00, &[])).unwrap(),
            Some(ProxyHeader::Local)
        );
        let with_addresses = header(0x20, 0x11, &[127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2]);
        assert_eq!(parse(&with_addresses).unwrap(), Some(ProxyHeader::Local));
        assert!(greeting(Some(&ProxyHeader::Local)).contains("; client: local (proxy v2); env: "));
    }

    #[test]
    fn tlvs_are_skipped_and_the_payload_stays_unread() {
        let mut body = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x00, 0x50];
        // PP2_TYPE_AUTHORITY "example.com", then PP2_TYPE_NOOP of 3 bytes.
        body.extend([0x02, 0x00, 11]);
        body.extend(b"example.com");
        body.extend([0x04, 0x00, 3, 0, 0, 0]);
        let mut bytes = header(0x21, 0x11, &body);
        bytes.extend(b"payload");
        let mut r = &bytes[..];
        let h = read_proxy_v2(&mut r).unwrap().unwrap();
        assert_eq!(
            h,
            ProxyHeader::Proxy {
                src: "10.0.0.1:12345".parse().unwrap(),
                dst: "10.0.0.2:80".parse().unwrap(),
            }
        );
        assert_eq!(r, b"payload");
    }

    #[test]
    fn eof_or_reset_before_any_byte_is_no_header() {
        assert_eq!(parse(b"").unwrap(), None);
        struct Reset;
        impl Read for Reset {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        assert!(matches!(read_proxy_v2(&mut Reset), Ok(None)));
    }

    #[test]
    fn bad_signature() {
        let why = invalid(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            why.starts_with("the first bytes are not the v2 signature (got \"GET / HTTP"),
            "{why}"
        );
        let why = invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
        assert!(why.contains("PROXY v1 (text) header"), "{why}");
        // Closed early with the wrong bytes: still a bad signature.
        assert!(invalid(b"\r\n\r\nX").starts_with("the first bytes are not"));
    }

    #[test]
    fn truncated() {
        let full = header(0x21, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        for cut in [1, 12, 15] {
            let why = invalid(&full[..cut]);
            assert_eq!(
                why,
                format!("connection closed after {cut} of the 16 fixed header bytes")
            );
        }
        let why = invalid(&full[..20]);
        assert_eq!(
            why,
            "connection closed after 4 of the 12 address and TLV bytes the header announced"
        );
        // A length too short for the family's addresses.
        let why = invalid(&header(0x21, 0x21, &[0; 12]));
        assert_eq!(why, "12 address bytes, TCP over IPv6 needs 36");
    }

    #[test]
    fn other_versions_commands_and_families_are_refused() {
        let body = [0; 12];
        assert!(invalid(&header(0x11, 0x11, &body)).starts_with("version 1 (byte 0x11)"));
        assert!(invalid(&header(0x22, 0x11, &body)).starts_with("unknown command 2"));
        let why = invalid(&header(0x21, 0x12, &body));
        assert!(
            why.starts_with("family and protocol 0x12, expected 0x11"),
            "{why}"
        );
        assert!(invalid(&header(0x21, 0x31, &[0; 216])).starts_with("family and protocol 0x31"));
    }
}
