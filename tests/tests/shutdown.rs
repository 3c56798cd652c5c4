//! Graceful shutdown: on SIGTERM the control plane stops accepting, lets a
//! request already in flight finish, and what it accepted survives.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use verge_tests::control::{Backend, ControlPlane};

#[tokio::test]
async fn sigterm_drains_the_request_in_flight() {
    let mut cp = ControlPlane::start(Backend::Sqlite).await;
    let addr = cp.url.trim_start_matches("http://").to_string();
    let body = br#"{"name": "late"}"#;
    let head = format!(
        "POST /v1/orgs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        cp.admin_token,
        body.len()
    );
    // Half a request: headers and the first bytes of the body.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body[..5]).await.unwrap();
    conn.flush().await.unwrap();
    // Accepted and in its handler, not still in the kernel's accept queue
    // (a queued connection is reset when the listener closes).
    cp.wait_in_flight(1).await;

    cp.signal(libc::SIGTERM);
    // Shutdown has begun once new connections are refused.
    cp.wait_listener_closed().await;

    // The request in flight still completes.
    conn.write_all(&body[5..]).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut response))
        .await
        .expect("response within 10s")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let status = cp.wait_exit().await;
    assert!(
        status.success(),
        "exit {status} after draining\n{}",
        cp.log()
    );

    // And what it accepted is there after a restart.
    cp.restart_after_exit().await;
    assert_eq!(cp.cli().names(&["orgs", "list"]).await, ["late"]);
}
