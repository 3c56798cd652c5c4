//! End to end for example images: build `hello` statically, package it as an
//! OCI image, push it to a real registry, pull it back with `oci-client`,
//! unpack it and run it with nothing but its own environment.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use oci_client::Reference;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::timeout;
use verge_tests::registry::{Registry, free_port};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Bound on each network read, so a hang fails the test instead of stalling it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn hello_image_round_trips_through_a_registry_and_runs() -> anyhow::Result<()> {
    let started = Instant::now();
    let binary =
        tokio::task::spawn_blocking(|| verge_images::build_hello(Path::new(WORKSPACE))).await??;
    eprintln!("built {} in {:?}", binary.display(), started.elapsed());
    let image = verge_images::hello_image(&binary)?;

    let registry = Registry::start().await?;
    let reference = format!("{}/hello:test", registry.host());
    let pushed = verge_images::push(&image, &reference)
        .await
        .with_context(|| format!("registry log:\n{}", registry.log_tail()))?;
    assert!(pushed.starts_with("sha256:"), "{pushed}");
    assert_eq!(pushed, image.digest);

    // Pull it all back, as a node would.
    let tag: Reference = reference.parse()?;
    let client = verge_images::client_for(&tag);
    let auth = RegistryAuth::Anonymous;
    let (manifest, digest, config) = client.pull_manifest_and_config(&tag, &auth).await?;
    assert_eq!(digest, pushed);
    assert_eq!(manifest.layers.len(), 1);
    let config: serde_json::Value = serde_json::from_str(&config)?;
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], json!(["/hello"]));
    assert_eq!(config["config"]["Cmd"], json!(["--port", "8080"]));
    assert_eq!(config["config"]["ExposedPorts"], json!({"8080/tcp": {}}));

    let descriptor = &manifest.layers[0];
    assert_eq!(descriptor.media_type, IMAGE_LAYER_GZIP_MEDIA_TYPE);
    let mut layer = Vec::new();
    client.pull_blob(&tag, descriptor, &mut layer).await?;
    assert_eq!(verge_images::sha256_digest(&layer), descriptor.digest);
    assert_eq!(i64::try_from(layer.len())?, descriptor.size);
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([verge_images::diff_id(&layer)?])
    );

    // The pinned reference resolves to the same manifest.
    let pinned: Reference = format!("{}/hello@{pushed}", registry.host()).parse()?;
    let (_, pinned_digest) = client.pull_image_manifest(&pinned, &auth).await?;
    assert_eq!(pinned_digest, pushed);

    // A tag that was never pushed is an error, not an empty image.
    let missing: Reference = format!("{}/hello:never-pushed", registry.host()).parse()?;
    let result = client.pull_image_manifest(&missing, &auth).await;
    let manifest_unknown = match &result {
        Err(OciDistributionError::RegistryError { envelope, .. }) => envelope
            .errors
            .iter()
            .any(|e| e.code == OciErrorCode::ManifestUnknown),
        _ => false,
    };
    assert!(manifest_unknown, "pulling a missing tag gave {result:?}");

    // Unpack the layer and run /hello from it.
    let rootfs = tempfile::tempdir()?;
    verge_images::unpack_layer(&layer, rootfs.path())?;
    let hello = rootfs.path().join("hello");
    verge_images::ensure_static(&hello)?;
    let port = free_port()?;
    let mut child = Command::new(&hello)
        .args(["--port", &port.to_string()])
        .env_clear()
        .env("VERGE_INSTANCE_ID", "inst-test-1")
        .env("GREETING", "bonjour")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", hello.display()))?;
    let conversation = talk_to_hello(&mut child, port).await;
    child.kill().await?;
    conversation?;
    eprintln!("whole round trip took {:?}", started.elapsed());
    Ok(())
}

/// Connects to `hello`, checks the greeting, and that it echoes.
async fn talk_to_hello(child: &mut Child, port: u16) -> anyhow::Result<()> {
    let stream = connect(child, port).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut greeting = String::new();
    timeout(IO_TIMEOUT, read.read_line(&mut greeting))
        .await
        .context("no greeting in time")??;
    assert!(greeting.contains("inst-test-1"), "{greeting:?}");
    assert!(greeting.contains("GREETING=bonjour"), "{greeting:?}");
    assert_eq!(
        greeting,
        "hello from instance inst-test-1; env: GREETING=bonjour VERGE_INSTANCE_ID=inst-test-1\n"
    );

    write.write_all(b"ping\n").await?;
    let mut echo = String::new();
    timeout(IO_TIMEOUT, read.read_line(&mut echo))
        .await
        .context("no echo in time")??;
    assert_eq!(echo, "ping\n");

    // Once we stop sending, hello closes its side too.
    write.shutdown().await?;
    let mut rest = Vec::new();
    timeout(IO_TIMEOUT, read.read_to_end(&mut rest))
        .await
        .context("hello did not close in time")??;
    assert_eq!(rest, b"");
    Ok(())
}

/// Polls until `hello` accepts on 127.0.0.1:`port`, failing if it exits first.
async fn connect(child: &mut Child, port: u16) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("hello exited ({status}) before accepting connections");
        }
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => {
                bail!("hello did not accept on port {port} within 10s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn registry_harness_serves_and_refuses_bad_pushes() -> anyhow::Result<()> {
    let registry = Registry::start().await?;
    ensure!(
        registry.host().starts_with("127.0.0.1:"),
        "{}",
        registry.host()
    );
    // A reference that does not parse is refused before any network use.
    let layer = verge_images::Layer::from_files(&[verge_images::File::new("/x", *b"x", 0o644)])?;
    let image = verge_images::Image::build(&verge_images::ImageConfig::default(), vec![layer])?;
    let bad = verge_images::push(&image, "Not A Reference").await;
    assert!(
        matches!(bad, Err(verge_images::Error::InvalidReference { .. })),
        "{bad:?}"
    );
    // A well-formed one is accepted and tagged.
    let reference = format!("{}/tiny:1", registry.host());
    let digest = verge_images::push(&image, &reference).await?;
    let tag: Reference = reference.parse()?;
    let (_, pulled) = verge_images::client_for(&tag)
        .pull_image_manifest(&tag, &RegistryAuth::Anonymous)
        .await?;
    assert_eq!(pulled, digest);
    Ok(())
}
