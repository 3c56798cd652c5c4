//! CLI conventions: login writes a profile, env vars and flags override it,
//! failures print a cause and next steps, completions are generated.

use verge_tests::cli::Cli;
use verge_tests::control::{Backend, ControlPlane};

#[tokio::test]
async fn login_writes_a_profile_only_for_a_good_token() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    cp.cli().run(&["orgs", "create", "acme"]).await.ok();
    let created = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    let token = created["token"].as_str().unwrap();
    let bare = Cli::new(cp.config_dir.path());

    // A bad token writes nothing.
    let bad = bare
        .run(&["login", "--server", &cp.url, "--token", "vrg_nope"])
        .await
        .failed();
    assert!(bad.contains("invalid or revoked API token"), "{bad}");
    assert!(!cp.config_dir.path().join("config.toml").exists());

    let done = bare
        .run(&[
            "login", "--server", &cp.url, "--token", token, "--name", "acme", "-o", "json",
        ])
        .await
        .json();
    assert_eq!(
        (done["profile"].as_str(), done["org"].as_str()),
        (Some("acme"), Some("acme"))
    );
    let file = cp.config_dir.path().join("config.toml");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // With no server or token given, the profile is used; the org defaults to the token's.
    bare.run(&["projects", "create", "web"]).await.ok();
    let who = bare.run(&["whoami", "-o", "json"]).await.json();
    assert_eq!(who["org"], "acme");
    // VERGE_TOKEN overrides the profile's token.
    let err = bare
        .with_env("VERGE_TOKEN", "vrg_other")
        .run(&["whoami", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "unauthorized");
    // A second profile, and switching between them.
    bare.run(&[
        "login",
        "--server",
        &cp.url,
        "--token",
        &cp.admin_token,
        "--name",
        "admin",
    ])
    .await
    .ok();
    assert_eq!(
        bare.run(&["whoami", "-o", "json"]).await.json()["admin"],
        true
    );
    bare.run(&["profiles", "use", "acme"]).await.ok();
    assert_eq!(
        bare.run(&["whoami", "-o", "json"]).await.json()["admin"],
        false
    );
    assert_eq!(
        bare.run(&["--profile", "admin", "whoami", "-o", "json"])
            .await
            .json()["admin"],
        true
    );
    let missing = bare.run(&["profiles", "use", "nope"]).await.failed();
    assert!(missing.contains("profile \"nope\" not found"), "{missing}");
}

#[tokio::test]
async fn failures_name_the_cause_and_next_steps() {
    let config = tempfile::tempdir().unwrap();
    let cli = Cli::new(config.path());
    // No server anywhere.
    let err = cli.run(&["orgs", "list"]).await.failed();
    assert!(err.starts_with("error: no server given\n"), "{err}");
    assert!(
        err.contains("try: verge login --server URL --token TOKEN"),
        "{err}"
    );
    let json = cli.run(&["orgs", "list", "-o", "json"]).await.error_json();
    assert_eq!(json["kind"], "bad_request");
    assert!(!json["next"].as_array().unwrap().is_empty());

    // Nothing listening: unavailable, with the address.
    let port = verge_tests::registry::free_port().unwrap();
    let server = format!("http://127.0.0.1:{port}");
    let down = cli
        .target(&server, "vrg_x")
        .run(&["orgs", "list", "-o", "json"])
        .await
        .error_json();
    assert_eq!(down["kind"], "unavailable");
    assert!(
        down["message"].as_str().unwrap().contains(&server),
        "{down}"
    );
    // A malformed URL.
    let bad = cli
        .target("localhost:7070", "vrg_x")
        .run(&["orgs", "list"])
        .await
        .failed();
    assert!(
        bad.contains("invalid server URL \"localhost:7070\""),
        "{bad}"
    );
    // Usage errors come from clap with a non-zero exit.
    assert!(!cli.run(&["orgs", "frobnicate"]).await.success());
}

#[tokio::test]
async fn completions_for_every_shell() {
    let config = tempfile::tempdir().unwrap();
    let cli = Cli::new(config.path());
    for (shell, marker) in [
        ("bash", "_verge()"),
        ("zsh", "#compdef verge"),
        ("fish", "complete -c verge"),
    ] {
        let script = cli.run(&["completions", shell]).await.ok();
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(200)]
        );
        assert!(
            script.contains("tokens"),
            "{shell} completions lack the tokens command"
        );
    }
    assert!(!cli.run(&["completions", "tcsh"]).await.success());
}
