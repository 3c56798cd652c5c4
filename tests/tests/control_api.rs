//! The control plane's API through the real `verge` binary and raw HTTP,
//! each scenario on SQLite and on PostgreSQL.

use serde_json::{Value, json};
use verge_tests::control::{Backend, ControlPlane};

verge_tests::on_both_backends!(
    bootstrap_token_is_printed_once_and_works,
    nouns_are_created_and_listed,
    another_orgs_token_gets_404_and_no_data,
    wrong_token_gets_401_with_a_clear_message,
    revoked_token_fails_on_the_next_request,
    bad_and_oversized_bodies_are_refused_and_change_nothing,
    restart_keeps_everything,
    health_and_metrics_are_served,
    malformed_names_in_paths_are_404_or_400_as_json,
    a_crash_loses_nothing_that_was_accepted,
    tokens_are_stored_only_as_their_sha256,
);

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

/// Creates org `acme` with project `web`, app `shop` and env `prod`.
async fn seed(cp: &ControlPlane) {
    let cli = cp.cli();
    cli.run(&["orgs", "create", "acme"]).await.ok();
    cli.run(&["projects", "create", "web", "--org", "acme"])
        .await
        .ok();
    cli.run(&[
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
    cli.run(&["envs", "create", "prod", "--org", "acme", "--app", "shop"])
        .await
        .ok();
}

async fn bootstrap_token_is_printed_once_and_works(backend: Backend) {
    let mut cp = ControlPlane::start(backend).await;
    assert!(cp.admin_token.starts_with("vrg_"), "{}", cp.admin_token);
    let who = cp.cli().run(&["whoami", "-o", "json"]).await.json();
    assert_eq!(who["admin"], json!(true));
    assert_eq!(who["org"], Value::Null);
    let again = cp.restart().await;
    assert_eq!(
        again.token, None,
        "the admin token must be printed on the first start only"
    );
    // Stored hashed: the secret itself is nowhere in the database file or log.
    if backend == Backend::Sqlite {
        let db = std::fs::read(cp.data_dir.path().join("verge.db")).unwrap();
        let secret = cp.admin_token.as_bytes();
        assert!(
            !db.windows(secret.len()).any(|w| w == secret),
            "token stored in clear"
        );
    }
    assert!(
        !cp.log().contains(&cp.admin_token),
        "token written to the log"
    );
    cp.cli().run(&["whoami"]).await.ok();
}

async fn nouns_are_created_and_listed(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let cli = cp.cli();
    let org = cli
        .run(&["orgs", "create", "acme", "-o", "json"])
        .await
        .json();
    assert_eq!(org["name"], "acme");
    assert!(org["id"].as_str().unwrap().starts_with("org_"));
    let project = cli
        .run(&["projects", "create", "web", "--org", "acme", "-o", "json"])
        .await
        .json();
    assert_eq!(
        (project["name"].as_str(), project["org"].as_str()),
        (Some("web"), Some("acme"))
    );
    let app = cli
        .run(&[
            "apps",
            "create",
            "shop",
            "--org",
            "acme",
            "--project",
            "web",
            "-o",
            "json",
        ])
        .await
        .json();
    assert_eq!(
        (app["name"].as_str(), app["project"].as_str()),
        (Some("shop"), Some("web"))
    );
    let env = cli
        .run(&[
            "envs", "create", "prod", "--org", "acme", "--app", "shop", "-o", "json",
        ])
        .await
        .json();
    assert_eq!(
        (env["name"].as_str(), env["app"].as_str()),
        (Some("prod"), Some("shop"))
    );
    cli.run(&[
        "envs", "create", "staging", "--org", "acme", "--app", "shop",
    ])
    .await
    .ok();

    assert_eq!(cli.names(&["orgs", "list"]).await, ["acme"]);
    assert_eq!(
        cli.names(&["projects", "list", "--org", "acme"]).await,
        ["web"]
    );
    assert_eq!(
        cli.names(&["apps", "list", "--org", "acme"]).await,
        ["shop"]
    );
    let envs = cli
        .run(&[
            "envs", "list", "--org", "acme", "--app", "shop", "-o", "json",
        ])
        .await
        .json();
    assert_eq!(names(&envs), ["prod", "staging"]);
    for key in ["id", "name", "org", "app", "created_at"] {
        assert!(envs[0].get(key).is_some(), "envs list lacks {key}: {envs}");
    }
    // Human output is a table with the names in it.
    let table = cli
        .run(&["envs", "list", "--org", "acme", "--app", "shop"])
        .await
        .ok();
    assert!(table.lines().next().unwrap().contains("NAME"), "{table}");
    assert!(table.contains("staging"), "{table}");

    // Duplicates and invalid names are refused, with the reason and a next step.
    let dup = cli
        .run(&[
            "apps",
            "create",
            "shop",
            "--org",
            "acme",
            "--project",
            "web",
            "-o",
            "json",
        ])
        .await;
    let err = dup.error_json();
    assert_eq!(err["kind"], "conflict");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("app \"shop\" already exists"),
        "{err}"
    );
    let human = cli.run(&["orgs", "create", "acme"]).await.failed();
    assert!(
        human.starts_with("error: org \"acme\" already exists"),
        "{human}"
    );
    assert!(human.contains("try: verge orgs list"), "{human}");
    let bad = cli.run(&["orgs", "create", "Bad_Name"]).await.failed();
    assert!(
        bad.contains("org name \"Bad_Name\" must start with a lower-case letter"),
        "{bad}"
    );
    let missing = cli
        .run(&["apps", "create", "x", "--org", "acme", "--project", "nope"])
        .await
        .failed();
    assert!(missing.contains("project \"nope\" not found"), "{missing}");
}

async fn another_orgs_token_gets_404_and_no_data(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    let admin = cp.cli();
    admin.run(&["orgs", "create", "rival"]).await.ok();
    let rival = admin
        .run(&["tokens", "create", "--org", "rival", "-o", "json"])
        .await
        .json();
    assert_eq!(rival["org"], "rival");
    let token = rival["token"].as_str().unwrap();
    let cli = cp.cli_as(token);

    // Through the CLI: 404, never 403, and nothing of acme's.
    for args in [
        vec!["apps", "list", "--org", "acme", "-o", "json"],
        vec![
            "envs", "list", "--org", "acme", "--app", "shop", "-o", "json",
        ],
        vec!["projects", "create", "x", "--org", "acme", "-o", "json"],
    ] {
        let run = cli.run(&args).await;
        let err = run.error_json();
        assert_eq!(err["kind"], "not_found", "{args:?}: {err}");
        assert_eq!(err["message"], "org \"acme\" not found");
        assert!(!run.stderr().contains("shop") && !run.stdout().contains("shop"));
    }
    // Its own org works, and lists show only its own org.
    assert_eq!(cli.names(&["orgs", "list"]).await, ["rival"]);
    cli.run(&["projects", "create", "mine"]).await.ok();

    // Raw HTTP: same status and body for "exists elsewhere" and "does not exist".
    let http = cp.http();
    let get = |path: &str| http.get(cp.endpoint(path)).bearer_auth(token).send();
    let theirs = get("/v1/orgs/acme/apps/shop").await.unwrap();
    assert_eq!(theirs.status(), 404);
    let theirs_body: Value = theirs.json().await.unwrap();
    let nobody = get("/v1/orgs/nobody/apps/shop").await.unwrap();
    assert_eq!(nobody.status(), 404);
    let nobody_body: Value = nobody.json().await.unwrap();
    // Identical but for the name asked about: nothing tells "exists elsewhere" apart.
    let normalised: Value =
        serde_json::from_str(&theirs_body.to_string().replace("acme", "nobody")).unwrap();
    assert_eq!(normalised, nobody_body);
    assert!(
        !theirs_body.to_string().contains("app_"),
        "leaks an ID: {theirs_body}"
    );
    // An org token cannot act as an admin.
    let forbidden = cli
        .run(&["orgs", "create", "third", "-o", "json"])
        .await
        .error_json();
    assert_eq!(forbidden["kind"], "forbidden");
}

async fn wrong_token_gets_401_with_a_clear_message(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let wrong = "vrg_0000000000000000000000000000000000000000000000000000000000000000";
    let run = cp.cli_as(wrong).run(&["orgs", "list"]).await;
    let stderr = run.failed();
    assert!(
        stderr.starts_with("error: invalid or revoked API token"),
        "{stderr}"
    );
    assert!(stderr.contains("try: verge login"), "{stderr}");
    let err = cp
        .cli_as(wrong)
        .run(&["orgs", "list", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "unauthorized");

    let http = cp.http();
    let resp = http
        .get(cp.endpoint("/v1/orgs"))
        .bearer_auth(wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http.get(cp.endpoint("/v1/orgs")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing API token"),
        "{body}"
    );
}

async fn revoked_token_fails_on_the_next_request(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    let created = cp
        .cli()
        .run(&[
            "tokens", "create", "--org", "acme", "--name", "ci", "-o", "json",
        ])
        .await
        .json();
    let token = created["token"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    let user = cp.cli_as(token);
    assert_eq!(user.names(&["apps", "list"]).await, ["shop"]);

    let listed = cp
        .cli()
        .run(&["tokens", "list", "--org", "acme", "-o", "json"])
        .await
        .json();
    assert_eq!(names(&listed), ["ci"]);
    assert!(
        !listed.to_string().contains(token),
        "token list shows a secret"
    );
    let revoked = cp
        .cli()
        .run(&["tokens", "revoke", id, "-o", "json"])
        .await
        .json();
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    let err = user.run(&["apps", "list", "-o", "json"]).await.error_json();
    assert_eq!(err["kind"], "unauthorized");
    // Only admins manage tokens.
    let other = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    let err = cp
        .cli_as(other["token"].as_str().unwrap())
        .run(&["tokens", "list", "-o", "json"])
        .await
        .error_json();
    assert_eq!(err["kind"], "forbidden");
}

async fn bad_and_oversized_bodies_are_refused_and_change_nothing(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    // A client per request: the server closes a connection whose body it refused.
    let post = |path: &str, body: Vec<u8>| {
        cp.http()
            .post(cp.endpoint(path))
            .bearer_auth(&cp.admin_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        (
            "/v1/orgs",
            b"{\"name\": ".to_vec(),
            400,
            "invalid request body",
        ),
        (
            "/v1/orgs",
            b"{\"nam\": \"x\"}".to_vec(),
            400,
            "unknown field `nam`",
        ),
        ("/v1/orgs", b"[1,2]".to_vec(), 400, "invalid request body"),
        (
            "/v1/orgs/acme/apps",
            b"{\"name\": \"x\"}".to_vec(),
            400,
            "missing field `project`",
        ),
        (
            "/v1/orgs",
            format!("{{\"name\": \"{}\"}}", "a".repeat(2 << 20)).into_bytes(),
            413,
            "larger than",
        ),
    ];
    for (path, body, status, needle) in cases {
        let resp = post(path, body).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {needle}");
        let err: Value = resp.json().await.unwrap();
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{path}: {message}");
    }
    let wrong_method = cp
        .http()
        .delete(cp.endpoint("/v1/orgs"))
        .bearer_auth(&cp.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: Value = wrong_method.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("method DELETE is not allowed"), "{body}");
    let no_type = cp
        .http()
        .post(cp.endpoint("/v1/orgs"))
        .bearer_auth(&cp.admin_token)
        .body("{\"name\":\"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), 400);
    // Nothing changed.
    let cli = cp.cli();
    assert_eq!(cli.names(&["orgs", "list"]).await, ["acme"]);
    assert_eq!(
        cli.names(&["apps", "list", "--org", "acme"]).await,
        ["shop"]
    );
}

async fn restart_keeps_everything(backend: Backend) {
    let mut cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    let token = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    let snapshot = async |cp: &ControlPlane| {
        let cli = cp.cli();
        [
            cli.run(&["orgs", "list", "-o", "json"]).await.json(),
            cli.run(&["projects", "list", "--org", "acme", "-o", "json"])
                .await
                .json(),
            cli.run(&["apps", "list", "--org", "acme", "-o", "json"])
                .await
                .json(),
            cli.run(&[
                "envs", "list", "--org", "acme", "--app", "shop", "-o", "json",
            ])
            .await
            .json(),
            cli.run(&["tokens", "list", "-o", "json"]).await.json(),
        ]
    };
    let before = snapshot(&cp).await;
    cp.restart().await;
    let after = snapshot(&cp).await;
    assert_eq!(before, after);
    // Both tokens still authenticate after the restart.
    cp.cli_as(token["token"].as_str().unwrap())
        .run(&["apps", "list"])
        .await
        .ok();
}

async fn health_and_metrics_are_served(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let http = cp.http();
    let health = http.get(cp.endpoint("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    cp.cli().run(&["orgs", "list"]).await.ok();
    let _ = cp.cli_as("vrg_bad").run(&["orgs", "list"]).await;
    let text = http
        .get(cp.endpoint("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"verge_http_requests_total{method="GET",route="/v1/orgs",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/v1/orgs",status="401"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("verge_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "not OpenMetrics text");
}

#[tokio::test]
async fn logs_are_structured_json_with_request_context() {
    let cp = ControlPlane::start_with(Backend::Sqlite, &["--log-format", "json"]).await;
    cp.cli().run(&["orgs", "create", "acme"]).await.ok();
    cp.cli()
        .run(&["projects", "create", "web", "--org", "acme"])
        .await
        .ok();
    let org_id = cp.cli().run(&["orgs", "list", "-o", "json"]).await.json()[0]["id"].clone();
    let log = cp.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    let created = lines
        .iter()
        .find(|l| l["message"] == "project created")
        .unwrap_or_else(|| panic!("no 'project created' event in\n{log}"));
    assert_eq!(created["span"]["org"], org_id, "{created}");
    assert!(
        created["span"]["token"]
            .as_str()
            .unwrap()
            .starts_with("tok_"),
        "{created}"
    );
    assert!(
        !log.contains(&cp.admin_token),
        "a token secret reached the log"
    );
}

async fn malformed_names_in_paths_are_404_or_400_as_json(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    let http = cp.http();
    let get = async |path: &str| {
        let resp = http
            .get(cp.endpoint(path))
            .bearer_auth(&cp.admin_token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path}: not a JSON body: {e}"));
        (status, body)
    };
    // NUL bytes and other names that cannot exist: 404 on both backends, never 500.
    for path in [
        "/v1/orgs/a%00b/projects",
        "/v1/orgs/acme/apps/sh%00op/envs",
        "/v1/orgs/acme/apps?project=w%00eb",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["kind"], "not_found", "{path}");
    }
    // Undecodable paths and queries: 400 with the JSON error body.
    for path in [
        "/v1/orgs/%FF/projects",
        "/v1/orgs/acme/apps?project=a&project=b",
    ] {
        let (status, body) = get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["kind"], "bad_request", "{path}");
    }
    let resp = http
        .delete(cp.endpoint("/v1/tokens/tok_%00"))
        .bearer_auth(&cp.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

async fn a_crash_loses_nothing_that_was_accepted(backend: Backend) {
    let mut cp = ControlPlane::start(backend).await;
    seed(&cp).await;
    let token = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    // SIGKILL right after the last answer: no shutdown, no checkpoint.
    cp.kill();
    cp.restart_after_exit().await;
    let cli = cp.cli();
    assert_eq!(cli.names(&["orgs", "list"]).await, ["acme"]);
    assert_eq!(
        cli.names(&["envs", "list", "--org", "acme", "--app", "shop"])
            .await,
        ["prod"]
    );
    cp.cli_as(token["token"].as_str().unwrap())
        .run(&["apps", "list"])
        .await
        .ok();
}

async fn tokens_are_stored_only_as_their_sha256(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let created = cp
        .cli()
        .run(&["tokens", "create", "--org", "dev-null", "-o", "json"])
        .await;
    assert!(!created.success(), "no such org yet");
    cp.cli().run(&["orgs", "create", "acme"]).await.ok();
    let org_token = cp
        .cli()
        .run(&["tokens", "create", "--org", "acme", "-o", "json"])
        .await
        .json();
    let secrets = [
        cp.admin_token.clone(),
        org_token["token"].as_str().unwrap().to_string(),
    ];
    let stored = verge_tests::store::stored_token_hashes(&cp.database_url()).await;
    assert_eq!(stored.len(), 2);
    for secret in &secrets {
        let digest = sha256_hex(secret);
        assert!(
            stored.contains(&digest),
            "no SHA-256 of a token among {stored:?}"
        );
        assert!(
            !stored.iter().any(|h| h.contains(secret.as_str())),
            "a token stored in clear"
        );
    }
}

/// SHA-256 in lower-case hex, with `sha256sum` as an independent implementation.
fn sha256_hex(text: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
