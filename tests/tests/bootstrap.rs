//! The admin token is never lost: a failed first start creates none, and
//! `--new-admin-token` mints another when the first one is gone.

use verge_tests::cli::Cli;
use verge_tests::control::{Backend, ControlPlane, spawn_daemon};

#[tokio::test]
async fn a_failed_first_start_creates_no_token() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().display().to_string();
    let cli = Cli::new(data.path());
    let err = cli
        .run(&["control", "--listen", &addr, "--data-dir", &d])
        .await
        .failed();
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");

    // The next start on a free port is still the first: it prints the token.
    let (_child, banner) = spawn_daemon(
        &["control", "--listen", "127.0.0.1:0", "--data-dir", &d],
        &[],
    )
    .await;
    let token = banner
        .token
        .expect("the first successful start prints the admin token");
    cli.target(&banner.server, &token)
        .run(&["whoami"])
        .await
        .ok();
}

#[tokio::test]
async fn new_admin_token_recovers_access() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let mut cp = ControlPlane::start(backend).await;
        let banner = cp.restart_with(&["--new-admin-token"]).await;
        let second = banner.token.expect("--new-admin-token prints a token");
        assert_ne!(second, cp.admin_token);
        let who = cp
            .cli_as(&second)
            .run(&["whoami", "-o", "json"])
            .await
            .json();
        assert_eq!(who["admin"], true);
        // The first one still works too; both are listed.
        cp.cli().run(&["whoami"]).await.ok();
        let tokens = cp.cli().run(&["tokens", "list", "-o", "json"]).await.json();
        assert_eq!(tokens.as_array().unwrap().len(), 2);
        // Without the flag, restarts print no token.
        assert!(cp.restart_with(&[]).await.token.is_none());
    }
}
