//! The cost of the control plane's API over the store it fronts.
//!
//! Starts a real control plane in this process (SQLite in a temp dir; and
//! PostgreSQL when `VERGE_BENCH_POSTGRES` names a fresh database), seeds one
//! org with 20 apps, then measures with the same concurrency:
//! - `GET /v1/orgs/acme/apps` over HTTP/1.1 keep-alive (token lookup, org
//!   scoping, query, JSON), against
//! - the peer: the same `list_apps` query called directly on the store.
//!
//! Run: `cargo bench -p verge-bench --bench api` (release build).

use std::sync::Arc;

use verge_bench::Figures;

const WORKERS: usize = 8;
const PER_WORKER: usize = 500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!("{}", Figures::header());
    let dir = tempfile::tempdir()?;
    run("sqlite", None, dir.path()).await?;
    if let Ok(url) = std::env::var("VERGE_BENCH_POSTGRES") {
        run("postgres", Some(url), dir.path()).await?;
    }
    Ok(())
}

async fn run(label: &str, database: Option<String>, dir: &std::path::Path) -> anyhow::Result<()> {
    let (cp, shutdown) = verge_bench::start_control(label, database, dir).await?;
    let token = cp.admin_token.clone().expect("fresh database");
    let store = cp.store.clone();
    let org = store.create_org("acme").await?;
    let project = store.create_project(&org.id, "web").await?;
    for i in 0..20 {
        store
            .create_app(&org.id, &project, &format!("app-{i}"))
            .await?;
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(WORKERS)
        .build()?;
    let url = Arc::new(format!("{}/v1/orgs/acme/apps", cp.url));
    let token = Arc::new(token);
    let api = move || {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        async move {
            let resp = http
                .get(url.as_str())
                .bearer_auth(token.as_str())
                .send()
                .await
                .expect("request");
            assert!(resp.status().is_success());
            resp.bytes().await.expect("body");
        }
    };
    // Warm up connections and caches, then measure.
    Figures::measure(WORKERS, 50, api.clone()).await;
    let via_api = Figures::measure(WORKERS, PER_WORKER, api).await;

    let org_id = Arc::new(org.id.clone());
    let direct = move || {
        let (store, org_id) = (store.clone(), org_id.clone());
        async move {
            let apps = store.list_apps(&org_id, None).await.expect("query");
            assert_eq!(apps.len(), 20);
        }
    };
    Figures::measure(WORKERS, 50, direct.clone()).await;
    let via_store = Figures::measure(WORKERS, PER_WORKER, direct).await;

    println!(
        "{}",
        via_api.row(&format!("{label}: GET /v1/orgs/acme/apps (HTTP)"))
    );
    println!(
        "{}",
        via_store.row(&format!("{label}: store.list_apps (peer: direct)"))
    );
    shutdown.cancel();
    cp.wait().await;
    Ok(())
}
