//! `verge dev`: prints VERGE_TOKEN and VERGE_SERVER, saves and selects the
//! `dev` profile, stops cleanly on Ctrl-C and keeps its state.

use tokio::process::Child;
use verge_tests::cli::Cli;
use verge_tests::control::{Banner, spawn_daemon, stop_daemon};

async fn start_dev(data: &std::path::Path, config: &std::path::Path) -> (Child, Banner) {
    let data = data.display().to_string();
    let config = config.display().to_string();
    spawn_daemon(
        &["dev", "--listen", "127.0.0.1:0", "--data-dir", &data],
        &[("VERGE_CONFIG_DIR", &config)],
    )
    .await
}

/// Ctrl-C, and the exit status.
async fn interrupt(child: Child) -> std::process::ExitStatus {
    stop_daemon(child, libc::SIGINT).await
}

#[tokio::test]
async fn dev_cluster_with_profile_and_clean_restart() {
    let data = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let (child, first) = start_dev(data.path(), config.path()).await;
    let token = first.token.clone().expect("VERGE_TOKEN line");

    // The next command in another shell just works: the dev profile is current.
    let cli = Cli::new(config.path());
    let profiles = std::fs::read_to_string(config.path().join("config.toml")).unwrap();
    assert!(profiles.contains("current = \"dev\""), "{profiles}");
    assert_eq!(cli.names(&["orgs", "list"]).await, ["dev"]);
    assert_eq!(cli.names(&["projects", "list"]).await, ["default"]);
    let app = cli
        .run(&["apps", "create", "hello", "-o", "json"])
        .await
        .json();
    assert_eq!(
        (app["org"].as_str(), app["project"].as_str()),
        (Some("dev"), Some("default"))
    );
    let listed = cli.run(&["profiles", "list", "-o", "json"]).await.json();
    assert_eq!(listed[0]["name"], "dev");
    assert_eq!(listed[0]["current"], true);

    let status = interrupt(child).await;
    assert!(status.success(), "verge dev exited with {status} on Ctrl-C");
    assert!(
        !cli.run(&["orgs", "list"]).await.success(),
        "still serving after Ctrl-C"
    );

    // State and token survive; the profile follows the new address.
    let (child, second) = start_dev(data.path(), config.path()).await;
    assert_eq!(second.token.as_deref(), Some(token.as_str()));
    assert_eq!(cli.names(&["apps", "list"]).await, ["hello"]);
    assert!(interrupt(child).await.success());
}
