//! PROXY protocol v2 interop: a real HAProxy (`accept-proxy`) reads the
//! headers [`v2_header`] writes, as a backend behind the ingress would,
//! and behind the ingress's own `Server`.
//!
//! Each test starts its own `haproxy -db` in TCP mode, with a frontend on
//! 127.0.0.1 and [::1] that takes a PROXY header on every connection, logs
//! the client and destination addresses the header claimed to stdout, and
//! forwards to an echo server run by the test. HAProxy must be installed
//! (`apt-get install haproxy`; tests/run.sh does it).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use verge_ingress::proxy_protocol::v2_header;
use verge_tests::eventually;

const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn haproxy_takes_the_client_address_from_an_ipv4_header() -> anyhow::Result<()> {
    relay_through_haproxy(
        "203.0.113.7:40000".parse()?,
        "198.51.100.1:443".parse()?,
        "client=203.0.113.7:40000 dst=198.51.100.1:443",
    )
    .await
}

#[tokio::test]
async fn haproxy_takes_the_client_address_from_an_ipv6_header() -> anyhow::Result<()> {
    relay_through_haproxy(
        "[2001:db8::7]:40000".parse()?,
        "[2001:db8::1]:443".parse()?,
        "client=2001:db8::7:40000 dst=2001:db8::1:443",
    )
    .await
}

/// The whole ingress in front of HAProxy: a client connects to Verge's
/// `Server` (an endpoint with `proxy_protocol = "v2"` on `[::1]` and
/// `127.0.0.1`, HAProxy's `accept-proxy` bind its only backend), and
/// HAProxy logs the client's own source address and the endpoint's
/// address, for both families.
#[tokio::test]
async fn haproxy_behind_the_ingress_logs_the_real_client_address() -> anyhow::Result<()> {
    use verge_api::manifest::{EndpointLimits, ProxyProtocol};
    use verge_api::routing::{Backend, Reach, Route, RoutingTable};

    let echo = echo_server().await?;
    let mut haproxy = Haproxy::start(echo).await?;
    haproxy.connect(haproxy.v6).await?; // up; this connection logs no header
    let port = free_port(Ipv6Addr::LOCALHOST.into())?;
    let route = Route {
        id: "ep_1".into(),
        name: "public".into(),
        org: "acme".into(),
        app: "hello".into(),
        env: "prod".into(),
        workload: "web".into(),
        ipv6: Ipv6Addr::LOCALHOST,
        ipv4: Some(Ipv4Addr::LOCALHOST),
        ports: vec![port],
        internal_port: haproxy.v6.port(),
        proxy_protocol: Some(ProxyProtocol::V2),
        limits: EndpointLimits::default(),
        backends: vec![Backend {
            instance: "i_1".into(),
            node: "n_1".into(),
            node_name: "n1".into(),
            address: haproxy.v6,
            reach: Reach::Direct,
        }],
    };
    let table = RoutingTable {
        version: "1".into(),
        ipv6_prefix: None,
        ipv4_pool: None,
        endpoints: vec![route],
    };
    let server = verge_ingress::server::Server::new(None, Default::default());
    server.apply(&table).await;
    for endpoint in [
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
    ] {
        let mut conn = TcpStream::connect(endpoint).await?;
        let client = conn.local_addr()?;
        conn.write_all(b"ping").await?;
        let mut echoed = [0u8; 4];
        tokio::time::timeout(DEADLINE, conn.read_exact(&mut echoed))
            .await
            .context("waiting for the echo through the ingress and HAProxy")??;
        assert_eq!(&echoed, b"ping");
        let want = format!(
            "client={}:{} dst={}:{}",
            client.ip(),
            client.port(),
            endpoint.ip(),
            endpoint.port()
        );
        let logs = haproxy.logs.clone();
        eventually(DEADLINE, &format!("HAProxy to log {want:?}"), || {
            let (logs, want) = (logs.clone(), want.clone());
            async move {
                logs.lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.trim() == want)
                    .then_some(())
            }
        })
        .await;
    }
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

/// Connects to HAProxy's bind of `client`'s family as the ingress would
/// (header, then payload), and checks that HAProxy logs `want` and that the
/// payload comes back from the echo server intact, without the header.
async fn relay_through_haproxy(
    client: SocketAddr,
    endpoint: SocketAddr,
    want: &str,
) -> anyhow::Result<()> {
    let echo = echo_server().await?;
    let mut haproxy = Haproxy::start(echo).await?;
    let bind = if client.is_ipv4() {
        haproxy.v4
    } else {
        haproxy.v6
    };
    let mut conn = haproxy.connect(bind).await?;
    let peer = conn.local_addr()?;
    assert_ne!(
        peer.ip(),
        client.ip(),
        "the claimed client must not be the real peer"
    );

    // Bytes that look like a header, and every byte value.
    let mut payload = b"payload after the header \r\n\r\n\0\r\nQUIT\n".to_vec();
    payload.extend(0..=255u8);
    let mut sent = v2_header(client, endpoint);
    sent.extend(&payload);
    conn.write_all(&sent).await?;
    let mut echoed = vec![0; payload.len()];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut echoed))
        .await
        .context("waiting for the echo through HAProxy")??;
    assert_eq!(echoed, payload, "the payload comes back intact");
    conn.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, conn.read_to_end(&mut rest))
        .await
        .context("waiting for HAProxy to close")??;
    assert!(
        rest.is_empty(),
        "nothing more than the payload came back: {rest:?}"
    );

    let logs = haproxy.logs.clone();
    eventually(DEADLINE, &format!("HAProxy to log {want:?}"), || {
        let logs = logs.clone();
        async move {
            let logs = logs.lock().unwrap();
            logs.iter().any(|l| l.trim() == want).then_some(())
        }
    })
    .await;
    // One connection, one line: none with the real peer {peer}.
    let logs = haproxy.logs.lock().unwrap();
    let lines: Vec<&String> = logs.iter().filter(|l| l.starts_with("client=")).collect();
    assert_eq!(lines, [want], "HAProxy's log (the real peer was {peer})");
    Ok(())
}

/// A TCP echo server on 127.0.0.1; runs until the test's runtime ends.
async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A port free on `ip` right now (bound to port 0, then released).
fn free_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}"))?;
    Ok(listener.local_addr()?.port())
}

/// The `haproxy` binary: on PATH, else Debian's /usr/sbin/haproxy.
fn haproxy_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|bin| bin.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy not found (on PATH or in /usr/sbin): these tests need it; install it with `apt-get install haproxy`, or run tests/run.sh, which does"
            )
        })
}

/// A running `haproxy -db`, killed when dropped, and the lines it logged.
struct Haproxy {
    child: Child,
    config: PathBuf,
    v4: SocketAddr,
    v6: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    async fn start(backend: SocketAddr) -> anyhow::Result<Haproxy> {
        let bin = haproxy_bin();
        let v4 = SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            free_port(Ipv4Addr::LOCALHOST.into())?,
        );
        let v6 = SocketAddr::new(
            Ipv6Addr::LOCALHOST.into(),
            free_port(Ipv6Addr::LOCALHOST.into())?,
        );
        let config = std::env::temp_dir().join(format!(
            "verge-haproxy-{}-{}.cfg",
            std::process::id(),
            v4.port()
        ));
        std::fs::write(&config, config_text(v4, v6, backend))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let logs = collect_lines(child.stdout.take());
        let stderr = collect_lines(child.stderr.take());
        Ok(Haproxy {
            child,
            config,
            v4,
            v6,
            logs,
            stderr,
        })
    }

    /// Connects to `bind`, retrying while HAProxy starts.
    async fn connect(&mut self, bind: SocketAddr) -> anyhow::Result<TcpStream> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the readers take in what it said.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!("haproxy exited ({status}):\n{}", self.output());
            }
            match TcpStream::connect(bind).await {
                Ok(conn) => return Ok(conn),
                Err(e) if Instant::now() >= until => {
                    bail!(
                        "HAProxy does not listen on {bind} ({e}):\n{}",
                        self.output()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn output(&self) -> String {
        let mut lines = self.stderr.lock().unwrap().clone();
        lines.extend(self.logs.lock().unwrap().iter().cloned());
        lines.join("\n")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGKILL, then reap: poll briefly, it exits at once.
        let _ = self.child.start_kill();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

/// TCP mode; every connection through the frontend logged (as soon as the
/// backend is connected) with the addresses the PROXY header claimed.
fn config_text(v4: SocketAddr, v6: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global\n\
         \x20   log stdout format raw local0\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   log global\n\
         \x20   option logasap\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         frontend ingress\n\
         \x20   bind {v4} accept-proxy\n\
         \x20   bind {v6} accept-proxy\n\
         \x20   log-format \"client=%ci:%cp dst=%fi:%fp\"\n\
         \x20   default_backend echo\n\
         backend echo\n\
         \x20   server echo {backend}\n"
    )
}

/// Gathers the lines of a child's pipe as they come.
fn collect_lines(
    pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    if let Some(pipe) = pipe {
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
    }
    lines
}
