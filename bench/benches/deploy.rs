//! The cost of a deploy over the registry round trip it cannot avoid.
//!
//! Starts a real control plane in this process (SQLite in a temp dir; and
//! PostgreSQL when `VERGE_BENCH_POSTGRES` names a fresh database) and a real
//! registry (Debian's `docker-registry`, as the tests run it), pushes one
//! image, then measures:
//! - `POST .../deploys` of an unchanged manifest (parse, gate, pin the image
//!   against the registry, compare fingerprints: the idempotent path), 4
//!   concurrent clients, against
//! - the peer: the registry `HEAD` of the same manifest that pinning makes,
//!   with oci-client, 4 concurrent clients;
//! - `POST .../deploys` that each create a release (count alternates): one
//!   client, as deploys to one env are serialised by design.
//!
//! Run: `cargo bench -p verge-bench --bench deploy` (release build).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use serde_json::json;
use verge_bench::Figures;
use verge_images::{File, Image, ImageConfig, Layer};
use verge_tests::registry::Registry;

const WORKERS: usize = 4;
const PER_WORKER: usize = 100;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = Registry::start().await?;
    let reference = format!("{}/bench:1", registry.host());
    let layer = Layer::from_files(&[File::new("/v", b"1".to_vec(), 0o644)])?;
    let image = Image::build(
        &ImageConfig {
            entrypoint: vec!["/v".into()],
            cmd: Vec::new(),
            env: Vec::new(),
            exposed_ports: Vec::new(),
        },
        vec![layer],
    )?;
    verge_images::push(&image, &reference).await?;
    println!("{}", Figures::header());
    let dir = tempfile::tempdir()?;
    run("sqlite", None, dir.path(), &reference).await?;
    if let Ok(url) = std::env::var("VERGE_BENCH_POSTGRES") {
        run("postgres", Some(url), dir.path(), &reference).await?;
    }
    Ok(())
}

async fn run(
    label: &str,
    database: Option<String>,
    dir: &std::path::Path,
    reference: &str,
) -> anyhow::Result<()> {
    let (cp, shutdown) = verge_bench::start_control(label, database, dir).await?;
    let token = Arc::new(cp.admin_token.clone().expect("fresh database"));
    let store = cp.store.clone();
    let org = store.create_org("acme").await?;
    let project = store.create_project(&org.id, "web").await?;
    let app = store.create_app(&org.id, &project, "hello").await?;
    store.create_env(&app, "prod").await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(WORKERS)
        .build()?;
    let url = Arc::new(format!(
        "{}/v1/orgs/acme/apps/hello/envs/prod/deploys",
        cp.url
    ));
    let parsed: Arc<Reference> = Arc::new(reference.parse()?);
    let reference = reference.to_string();
    let manifest = move |count: u32| {
        format!(
            "app = \"hello\"\n[workloads.web]\nimage = \"{reference}\"\ncount = {count}\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n"
        )
    };
    let deploy = {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        move |text: String| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let resp = http
                    .post(url.as_str())
                    .bearer_auth(token.as_str())
                    .json(&json!({ "manifest": text }))
                    .send()
                    .await
                    .expect("request");
                let status = resp.status();
                let body = resp.text().await.expect("body");
                assert!(status.is_success(), "{status}: {body}");
                body
            }
        }
    };

    // New releases, one after the other.
    let count = Arc::new(AtomicU32::new(1));
    let creating = {
        let (deploy, manifest) = (deploy.clone(), manifest.clone());
        move || {
            let (deploy, manifest, count) = (deploy.clone(), manifest.clone(), count.clone());
            async move {
                let body = deploy(manifest(count.fetch_add(1, Ordering::Relaxed) % 50 + 1)).await;
                assert!(body.contains("\"unchanged\":false"), "{body}");
            }
        }
    };
    Figures::measure(1, 20, creating.clone()).await;
    let created = Figures::measure(1, PER_WORKER, creating).await;

    // The same manifest again: idempotent, no release.
    let text = manifest(7);
    deploy(text.clone()).await;
    let unchanged = {
        let deploy = deploy.clone();
        move || {
            let (deploy, text) = (deploy.clone(), text.clone());
            async move {
                let body = deploy(text).await;
                assert!(body.contains("\"unchanged\":true"), "{body}");
            }
        }
    };
    Figures::measure(WORKERS, 20, unchanged.clone()).await;
    let idempotent = Figures::measure(WORKERS, PER_WORKER, unchanged).await;

    // The peer: the registry round trip a pin makes.
    let client = verge_images::client_for(&parsed);
    let head = move || {
        let (client, parsed) = (client.clone(), parsed.clone());
        async move {
            let digest = client
                .fetch_manifest_digest(&parsed, &RegistryAuth::Anonymous)
                .await
                .expect("HEAD manifest");
            assert!(digest.starts_with("sha256:"));
        }
    };
    Figures::measure(WORKERS, 20, head.clone()).await;
    let registry_head = Figures::measure(WORKERS, PER_WORKER, head).await;

    println!(
        "{}",
        created.row(&format!("{label}: deploy, new release (1 client)"))
    );
    println!(
        "{}",
        idempotent.row(&format!("{label}: deploy, unchanged (4 clients)"))
    );
    println!(
        "{}",
        registry_head.row(&format!("{label}: registry HEAD (peer, 4 clients)"))
    );
    shutdown.cancel();
    cp.wait().await;
    Ok(())
}
