//! `verge dev`: prints VERGE_TOKEN and VERGE_SERVER, saves and selects the
//! `dev` profile, stops cleanly on Ctrl-C and keeps its state.

use tokio::process::Child;
use verge_tests::cli::Cli;
use verge_tests::control::{Banner, spawn_daemon, stop_daemon};
use verge_tests::nodes::greet;

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

/// `verge dev` + `verge deploy` of the hello image: a running instance at
/// the address `verge status` shows, answering with its greeting; Ctrl-C
/// stops it. `isolation` is `namespaces` (root: a private IPv6 address) or
/// `none` (a loopback port; the command must honour `$PORT`).
async fn dev_serves_hello(isolation: &str, command: &str) {
    verge_tests::nodes::require_root();
    let registry = verge_tests::registry::Registry::start().await.unwrap();
    let image = registry.push_hello().await;
    let data = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let (child, _) = spawn_daemon(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.path().display().to_string(),
            "--isolation",
            isolation,
        ],
        &[("VERGE_CONFIG_DIR", &config.path().display().to_string())],
    )
    .await;
    let cli = Cli::new(config.path());
    cli.run(&["apps", "create", "hello"]).await.ok();
    cli.run(&["envs", "create", "prod", "--app", "hello"])
        .await
        .ok();
    let manifest = data.path().join("verge.toml");
    std::fs::write(
        &manifest,
        format!(
            "app = \"hello\"\n[workloads.web]\nimage = \"{image}\"\n{command}\ncount = 1\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n"
        ),
    )
    .unwrap();
    let cli = cli
        .with_env("VERGE_APP", "hello")
        .with_env("VERGE_ENV", "prod");
    let receipt = cli
        .run(&["deploy", "-f", manifest.to_str().unwrap()])
        .await
        .ok();
    // The receipt says what to try: `endpoint public: nc ADDR 80  (IPv6)`.
    let try_line = receipt
        .lines()
        .find(|l| l.contains("endpoint public: nc "))
        .unwrap_or_else(|| panic!("the receipt names the endpoint's address\n{receipt}"));
    let mut words = try_line.split("nc ").nth(1).unwrap().split_whitespace();
    let (ip, port) = (words.next().unwrap(), words.next().unwrap());
    assert!(
        ip.starts_with("fd65:"),
        "a ULA endpoint address as root: {try_line}"
    );
    let endpoint = format!("[{ip}]:{port}");
    let deadline = std::time::Duration::from_secs(60);
    let (id, address) = verge_tests::eventually(deadline, "a running instance", || async {
        let s = cli.run(&["status", "-o", "json"]).await.json();
        let i = &s["workloads"][0]["instances"][0];
        (i["state"] == "running").then(|| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["address"].as_str().unwrap().to_string(),
            )
        })
    })
    .await;
    let human = cli.run(&["status"]).await.ok();
    assert!(
        human.contains(&address) && human.contains("running"),
        "{human}"
    );
    let greeting = verge_tests::eventually(deadline, "the greeting", || greet(&address)).await;
    assert!(
        greeting.contains(&format!("hello from instance {id}")),
        "{greeting}"
    );
    // And through the dev ingress, at the endpoint's own address.
    let through = verge_tests::eventually(deadline, "the greeting through the ingress", || async {
        greet(&endpoint)
            .await
            .filter(|g| g.contains(&format!("hello from instance {id}")))
    })
    .await;
    assert!(through.contains("VERGE_ENV=prod"), "{through}");
    let listed = cli.run(&["endpoints", "-o", "json"]).await.json();
    assert_eq!(listed[0]["ipv6"], ip, "{listed}");
    assert_eq!(listed[0]["ports"][0], 80, "{listed}");
    if isolation == "none" {
        assert!(address.starts_with("127.0.0.1:"), "{address}");
        let node = cli.run(&["nodes", "describe", "dev"]).await.ok();
        assert!(
            node.contains("isolation:       none: instances are plain host processes"),
            "{node}"
        );
    } else {
        assert!(address.starts_with("[fd76:"), "{address}");
    }
    assert!(interrupt(child).await.success());
    assert!(
        greet(&address).await.is_none(),
        "Ctrl-C stops the dev cluster's instances"
    );
}

#[tokio::test]
async fn dev_runs_the_hello_image_in_namespaces() {
    dev_serves_hello("namespaces", "").await;
}

#[tokio::test]
async fn dev_runs_the_hello_image_without_isolation_on_a_loopback_port() {
    // hello listens on $PORT when not given --port.
    dev_serves_hello("none", "command = [\"/hello\"]").await;
}

/// `verge dev` without root (here as `nobody`, through setpriv(1)): no
/// namespaces and no route for an endpoint prefix, so endpoints share the
/// loopback address, `verge endpoints` says so, and a connection to `[::1]`
/// on the endpoint's port reaches the instance through the dev ingress.
#[tokio::test]
async fn an_unprivileged_dev_serves_endpoints_on_loopback_and_says_so() {
    use std::os::unix::fs::chown;
    use std::process::Stdio;
    verge_tests::nodes::require_root(); // to become nobody
    let registry = verge_tests::registry::Registry::start().await.unwrap();
    let image = registry.push_hello().await;
    let data = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    for dir in [data.path(), config.path()] {
        chown(dir, Some(65534), Some(65534)).unwrap();
    }
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(verge_tests::verge_bin())
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("VERGE_CONFIG_DIR", config.path())
        .env("HOME", data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    verge_tests::isolate_env(cmd.as_std_mut());
    cmd.env("VERGE_CONFIG_DIR", config.path());
    let mut child = cmd
        .spawn()
        .expect("setpriv (util-linux) runs verge dev as nobody");
    verge_tests::control::read_banner_within(
        child.stdout.take().unwrap(),
        verge_tests::control::BANNER_TIMEOUT,
    )
    .await;
    let cli = Cli::new(config.path());
    cli.run(&["apps", "create", "hello"]).await.ok();
    cli.run(&["envs", "create", "prod", "--app", "hello"])
        .await
        .ok();
    let manifest = config.path().join("verge.toml");
    std::fs::write(
        &manifest,
        format!(
            "app = \"hello\"\n[workloads.web]\nimage = \"{image}\"\ncommand = [\"/hello\"]\ncount = 1\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 18080\ninternal_port = 8080\n"
        ),
    )
    .unwrap();
    let cli = cli
        .with_env("VERGE_APP", "hello")
        .with_env("VERGE_ENV", "prod");
    let receipt = cli
        .run(&["deploy", "-f", manifest.to_str().unwrap()])
        .await
        .ok();
    assert!(
        receipt.contains("endpoint public: nc ::1 18080"),
        "the receipt names the loopback address: {receipt}"
    );
    let deadline = std::time::Duration::from_secs(60);
    let id = verge_tests::eventually(deadline, "a running instance", || async {
        let s = cli.run(&["status", "-o", "json"]).await.json();
        let i = &s["workloads"][0]["instances"][0];
        (i["state"] == "running").then(|| i["id"].as_str().unwrap().to_string())
    })
    .await;
    let listed = cli.run(&["endpoints", "-o", "json"]).await.json();
    assert_eq!(
        (&listed[0]["ipv6"], &listed[0]["loopback"]),
        (&"::1".into(), &true.into()),
        "{listed}"
    );
    let human = cli.run(&["endpoints"]).await.ok();
    assert!(
        human.contains("[::1]") && human.contains("note: endpoints listen on loopback"),
        "{human}"
    );
    let greeting =
        verge_tests::eventually(deadline, "the greeting through the ingress", || async {
            greet("[::1]:18080")
                .await
                .filter(|g| g.contains(&format!("hello from instance {id}")))
        })
        .await;
    assert!(greeting.contains("VERGE_ENV=prod"), "{greeting}");
    assert!(interrupt(child).await.success());
}
