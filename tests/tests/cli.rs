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

#[tokio::test]
async fn a_profile_token_is_never_sent_to_another_server() {
    let home = ControlPlane::start(Backend::Sqlite).await;
    let other = ControlPlane::start(Backend::Sqlite).await;
    let cli = Cli::new(home.config_dir.path());
    cli.run(&["login", "--server", &home.url, "--token", &home.admin_token])
        .await
        .ok();
    // --server names another cluster: the profile (and its token) does not apply there.
    let err = cli
        .run(&["--server", &other.url, "whoami", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "unauthorized");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("missing API token"),
        "{err}"
    );
    // The same server, spelled with a trailing slash, keeps the profile.
    let same = format!("{}/", home.url);
    cli.run(&["--server", &same, "whoami"]).await.ok();
}

#[tokio::test]
async fn tokens_need_an_explicit_org_and_lists_are_not_filtered_by_default() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let admin = cp.cli();
    admin.run(&["orgs", "create", "acme"]).await.ok();
    for p in ["web", "ops"] {
        admin
            .run(&["projects", "create", p, "--org", "acme"])
            .await
            .ok();
    }
    admin
        .run(&[
            "apps",
            "create",
            "shop",
            "--org",
            "acme",
            "--project",
            "web",
        ])
        .await
        .ok();
    admin
        .run(&[
            "apps",
            "create",
            "cron",
            "--org",
            "acme",
            "--project",
            "ops",
        ])
        .await
        .ok();
    // A profile with defaults (org acme, project web).
    let cli = Cli::new(cp.config_dir.path());
    cli.run(&[
        "login",
        "--server",
        &cp.url,
        "--token",
        &cp.admin_token,
        "--org",
        "acme",
        "--project",
        "web",
    ])
    .await
    .ok();
    let err = cli
        .run(&["tokens", "create", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["message"], "verge tokens create needs --org ORG");
    assert_eq!(
        cli.run(&["tokens", "list", "-o", "json"])
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let all = cli.run(&["apps", "list", "-o", "json"]).await.json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let web = cli
        .run(&["apps", "list", "--project", "web", "-o", "json"])
        .await
        .json();
    assert_eq!(web[0]["name"], "shop");
    assert_eq!(web.as_array().unwrap().len(), 1);
    // The profile's project is the default for creating.
    let created = cli
        .run(&["apps", "create", "blog", "-o", "json"])
        .await
        .json();
    assert_eq!(created["project"], "web");
}

#[tokio::test]
async fn usage_errors_and_pipes_behave() {
    let config = tempfile::tempdir().unwrap();
    let cli = Cli::new(config.path());
    let run = cli.run(&["orgs", "frobnicate", "-o", "json"]).await;
    assert_eq!(run.output.status.code(), Some(2));
    let err = run.error_json();
    assert_eq!(err["kind"], "bad_request");
    assert!(
        err["message"].as_str().unwrap().contains("frobnicate"),
        "{err}"
    );
    // A broken pipe ends the process by SIGPIPE, not by a panic message.
    let mut sh = std::process::Command::new("sh");
    let out = verge_tests::isolate_env(&mut sh)
        .arg("-c")
        .arg(format!(
            "{} completions bash | head -c 10 >/dev/null; echo $?",
            verge_tests::verge_bin().display()
        ))
        .env("VERGE_CONFIG_DIR", config.path())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn wait_flags_that_cannot_go_together_are_usage_errors() {
    let config = tempfile::tempdir().unwrap();
    let cli = Cli::new(config.path());
    for (args, flags) in [
        (
            &["deploy", "--dry-run", "--wait", "-o", "json"][..],
            &["--dry-run", "--wait"][..],
        ),
        (
            &["nodes", "drain", "n1", "--timeout", "1m", "-o", "json"][..],
            &["not provided: --wait"][..],
        ),
    ] {
        let run = cli.run(args).await;
        assert_eq!(run.output.status.code(), Some(2), "{args:?}");
        let err = run.error_json();
        assert_eq!(err["kind"], "bad_request", "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(flags.iter().all(|f| message.contains(f)), "{err}");
    }
}

#[tokio::test]
async fn parallel_logins_keep_every_profile() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let cli = Cli::new(cp.config_dir.path());
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let (cli, url, token) = (cli.clone(), cp.url.clone(), cp.admin_token.clone());
            tokio::spawn(async move {
                cli.run(&[
                    "login",
                    "--server",
                    &url,
                    "--token",
                    &token,
                    "--name",
                    &format!("p{i}"),
                ])
                .await
                .ok();
            })
        })
        .collect();
    for r in runs {
        r.await.unwrap();
    }
    let mut names = cli.names(&["profiles", "list"]).await;
    names.sort();
    assert_eq!(names, (0..8).map(|i| format!("p{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn names_profiles_and_manifests_are_checked_before_use() {
    let cp = ControlPlane::start(Backend::Sqlite).await;
    let cli = cp.cli();
    cli.run(&["orgs", "create", "acme"]).await.ok();
    // ".." would otherwise vanish from the URL path.
    let err = cli
        .run(&["envs", "list", "--org", "acme", "--app", "..", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "bad_request");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("app name \"..\""),
        "{err}"
    );
    // A named profile never silently gives way to another --server.
    let bare = Cli::new(cp.config_dir.path());
    bare.run(&[
        "login",
        "--server",
        &cp.url,
        "--token",
        &cp.admin_token,
        "--name",
        "home",
    ])
    .await
    .ok();
    let other = bare
        .run(&[
            "--profile",
            "home",
            "--server",
            "http://127.0.0.1:9",
            "whoami",
        ])
        .await
        .failed();
    assert!(other.contains("profile \"home\" belongs to"), "{other}");
    // A broken verge.toml is reported, not taken for a missing app.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("verge.toml"), "app = [\n").unwrap();
    let out = verge_tests::verge_command()
        .args(["envs", "list", "--org", "acme"])
        .current_dir(dir.path())
        .env("VERGE_CONFIG_DIR", cp.config_dir.path())
        .env("VERGE_SERVER", &cp.url)
        .env("VERGE_TOKEN", &cp.admin_token)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("verge.toml is not valid TOML"), "{stderr}");
    // login checks the defaults it saves.
    let err = bare
        .run(&[
            "login",
            "--server",
            &cp.url,
            "--token",
            &cp.admin_token,
            "--org",
            "nope",
            "-o",
            "json",
        ])
        .await
        .error_json();
    assert_eq!(err["kind"], "not_found");
}

#[tokio::test]
async fn daemons_print_one_json_object_under_o_json() {
    let data = tempfile::tempdir().unwrap();
    let mut child = verge_tests::verge_command()
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.path().display().to_string(),
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("a line within 30s")
        .unwrap()
        .expect("a line");
    let banner: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(
        banner["server"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(banner["token"].as_str().unwrap().starts_with("vrg_"));
}

#[tokio::test]
async fn init_writes_a_valid_manifest_and_keeps_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &'static [&'static str]| {
        let mut cmd = verge_tests::verge_command();
        cmd.args(args)
            .current_dir(dir.path())
            .env("VERGE_CONFIG_DIR", dir.path());
        async move { cmd.output().await.unwrap() }
    };
    let first = run(&["init", "-o", "json"]).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let path = dir.path().join("verge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let manifest = verge_api::manifest::parse("verge.toml", &text)
        .expect("verge init writes a valid manifest");
    assert_eq!(manifest.app, "hello");
    // A hand-edited file survives a second init.
    std::fs::write(&path, text.replace("app = \"hello\"", "app = \"mine\"")).unwrap();
    let again = run(&["init"]).await;
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("verge.toml already exists here"),
        "{stderr}"
    );
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("app = \"mine\""),
        "init overwrote the file"
    );
    assert!(run(&["init", "--force"]).await.status.success());
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("app = \"hello\"")
    );
}
