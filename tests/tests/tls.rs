//! `verge control` serves HTTPS with rustls when given a certificate, and
//! refuses plain HTTP anywhere but loopback.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use verge_tests::cli::Cli;
use verge_tests::control::{Backend, ControlPlane, spawn_daemon};

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost,
/// written as PEM files into `dir`. Returns (ca, cert, key) paths.
fn make_pki(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = ["ca.pem", "cert.pem", "key.pem"].map(|f| dir.join(f));
    std::fs::write(&paths[0], ca.pem()).unwrap();
    std::fs::write(&paths[1], leaf.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn https_with_a_configured_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let [ca, cert, key] = make_pki(pki.path());
    let (cert, key, ca) = (
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string(),
    );
    let cp =
        ControlPlane::start_with(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key]).await;
    assert!(cp.url.starts_with("https://127.0.0.1:"), "{}", cp.url);

    // Trusting the cluster's CA, the CLI works over TLS.
    let cli = cp.cli().with_env("VERGE_CA_CERT", &ca);
    cli.run(&["orgs", "create", "acme"]).await.ok();
    assert!(cli.run(&["orgs", "list"]).await.ok().contains("acme"));

    // Without it, the certificate is refused and the error says where.
    let untrusted = cp.cli().run(&["orgs", "list"]).await.failed();
    assert!(
        untrusted.contains("cannot reach the control plane at https://127.0.0.1"),
        "{untrusted}"
    );
    assert!(
        untrusted.contains("invalid peer certificate"),
        "the TLS cause is lost: {untrusted}"
    );

    // Plain HTTP to the TLS port gets no API answer.
    let plain = cp.url.replacen("https://", "http://", 1);
    let resp = cp.http().get(format!("{plain}/healthz")).send().await;
    assert!(
        resp.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP answered on the TLS port"
    );
}

#[tokio::test]
async fn plain_http_off_loopback_and_broken_config_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let cli = Cli::new(data.path());
    let d = data.path().display().to_string();
    let run = cli
        .run(&["control", "--listen", "0.0.0.0:0", "--data-dir", &d])
        .await;
    let err = run.failed();
    assert!(
        err.contains("refusing to serve plain HTTP on 0.0.0.0:0"),
        "{err}"
    );
    assert!(
        !data.path().join("verge.db").exists(),
        "a refused start created a database"
    );

    let config = data.path().join("control.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlisten_port = 7\n").unwrap();
    let err = cli
        .run(&["control", "--config", &config.display().to_string()])
        .await
        .failed();
    assert!(err.contains("unknown field `listen_port`"), "{err}");
    assert!(err.contains(&config.display().to_string()), "{err}");

    let err = cli
        .run(&[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &d,
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ])
        .await
        .failed();
    assert!(
        err.contains("certificate file /nonexistent.pem does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn a_config_file_is_read_and_flags_override_it() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"{}\"\nmax_body_bytes = 64\n",
            data.path().join("state").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let (_child, banner) = spawn_daemon(
        &["control", "--config", &config, "--listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    // --listen overrode the file's port 1; data_dir and max_body_bytes came from the file.
    assert!(!banner.server.ends_with(":1"), "{}", banner.server);
    assert!(data.path().join("state/verge.db").exists());
    verge_tests::init_tls();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/orgs", banner.server))
        .bearer_auth(banner.token.unwrap())
        .json(&serde_json::json!({"name": "a-name-longer-than-sixty-four-bytes-of-json-body-in-total"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn environment_overrides_the_file_and_flags_override_the_environment() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("control.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:1\"\ndata_dir = \"/nonexistent/verge\"\n",
    )
    .unwrap();
    let env_dir = data.path().join("from-env");
    let flag_dir = data.path().join("from-flag");
    let (config, env_d, flag_d) = (
        config.display().to_string(),
        env_dir.display().to_string(),
        flag_dir.display().to_string(),
    );
    let env = [
        ("VERGE_LISTEN", "127.0.0.1:0"),
        ("VERGE_DATA_DIR", env_d.as_str()),
    ];
    let (_child, banner) = spawn_daemon(&["control", "--config", &config], &env).await;
    assert!(
        !banner.server.ends_with(":1"),
        "VERGE_LISTEN did not override the file: {}",
        banner.server
    );
    assert!(
        env_dir.join("verge.db").exists(),
        "VERGE_DATA_DIR did not override the file"
    );
    spawn_daemon(
        &["control", "--config", &config, "--data-dir", &flag_d],
        &env,
    )
    .await;
    assert!(
        flag_dir.join("verge.db").exists(),
        "--data-dir did not override VERGE_DATA_DIR"
    );
}
