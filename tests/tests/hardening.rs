//! Defences against slow or silent clients, lock-outs, and unreachable
//! databases, through the real `verge` binary.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use verge_tests::cli::Cli;
use verge_tests::control::{Backend, Banner, ControlPlane, spawn_daemon, stop_daemon};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("control.toml");
    std::fs::write(&config, "client_timeout_secs = 1\n").unwrap();
    let config = config.display().to_string();
    let cp = ControlPlane::start_with(Backend::Sqlite, &["--config", &config]).await;
    let addr = cp.url.trim_start_matches("http://").to_string();
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The server hangs up (EOF or an error answer) instead of waiting forever.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a half-sent request kept its connection for 10s"
    );
    // Well-behaved clients are unaffected.
    cp.cli().run(&["whoami"]).await.ok();
}

#[tokio::test]
async fn the_last_admin_token_cannot_be_revoked() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let who = cp.cli().run(&["whoami", "-o", "json"]).await.json();
    let id = who["token_id"].as_str().unwrap();
    let err = cp
        .cli()
        .run(&["tokens", "revoke", id, "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "conflict");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("last active admin token"),
        "{err}"
    );
    assert!(
        err["next"][0]
            .as_str()
            .unwrap()
            .contains("--new-admin-token"),
        "{err}"
    );
    cp.cli().run(&["whoami"]).await.ok();
}

#[tokio::test]
async fn an_unreachable_database_is_named_quickly_with_next_steps() {
    let port = verge_tests::registry::free_port().unwrap();
    let data = tempfile::tempdir().unwrap();
    let cli = Cli::new(data.path());
    let db = format!("postgres://verge:secret@127.0.0.1:{port}/verge");
    let started = std::time::Instant::now();
    let run = cli
        .run(&[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.path().display().to_string(),
            "--database",
            &db,
            "-o",
            "json",
        ])
        .await;
    let err = run.error_json();
    assert_eq!(err["kind"], "unavailable", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("Connection refused"),
        "the cause is lost: {message}"
    );
    assert!(
        !message.contains("secret"),
        "the password leaked: {message}"
    );
    assert!(!err["next"].as_array().unwrap().is_empty(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?} to report a refused connection",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_second_signal_stops_without_waiting_for_the_drain() {
    let mut cp = ControlPlane::start(Backend::Sqlite).await;
    let addr = cp.url.trim_start_matches("http://").to_string();
    // A request that never completes would hold the drain for its full 30s.
    let mut hold = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/orgs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        cp.admin_token
    );
    hold.write_all(head.as_bytes()).await.unwrap();
    cp.wait_in_flight(1).await;
    cp.signal(libc::SIGTERM);
    cp.wait_listener_closed().await;
    cp.signal(libc::SIGTERM);
    let status = cp.wait_exit().await;
    assert_eq!(status.code(), Some(130), "{status}");
}

/// Runs `verge ARGS` with profiles in `config` until it serves.
async fn daemon(args: &[&str], config: &std::path::Path) -> (tokio::process::Child, Banner) {
    spawn_daemon(args, &[("VERGE_CONFIG_DIR", &config.display().to_string())]).await
}

/// SIGTERM, and a clean exit.
async fn stop(child: tokio::process::Child) {
    let status = stop_daemon(child, libc::SIGTERM).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn dev_replaces_a_revoked_saved_token() {
    let data = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let d = data.path().display().to_string();
    let dev_args = ["dev", "--listen", "127.0.0.1:0", "--data-dir", d.as_str()];
    let (child, first) = daemon(&dev_args, config.path()).await;
    let saved = first.token.expect("dev prints its token");
    stop(child).await;

    // An operator mints a second admin token and revokes the one dev saved.
    let control_args = [
        "control",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        d.as_str(),
        "--new-admin-token",
    ];
    let (child, control) = daemon(&control_args, config.path()).await;
    let admin =
        Cli::new(config.path()).target(&control.server, &control.token.expect("a new admin token"));
    let tokens = admin.run(&["tokens", "list", "-o", "json"]).await.json();
    let first_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "admin")
        .expect("the first admin token")["id"]
        .as_str()
        .unwrap()
        .to_string();
    admin.run(&["tokens", "revoke", &first_id]).await.ok();
    stop(child).await;

    // verge dev notices and prints (and saves in its profile) a working token.
    let (child, again) = daemon(&dev_args, config.path()).await;
    let token = again.token.expect("dev prints its token");
    assert_ne!(token, saved);
    let who = Cli::new(config.path())
        .run(&["whoami", "-o", "json"])
        .await
        .json();
    assert_eq!(who["admin"], true);
    stop(child).await;
}
