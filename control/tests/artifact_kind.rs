//! `Pinner::artifact_kind` against a real registry (Debian's
//! `docker-registry`): wasm artifacts, container images and other artifacts
//! are told apart by their manifest's config media type.

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use verge_control::images::{ArtifactKind, PinError, Pinner, WASM_CONFIG_MEDIA_TYPE};
use verge_tests::registry::Registry;

/// Pushes `repo:1` with one layer and a config of the given media types;
/// returns the tag reference.
async fn push(
    registry: &Registry,
    repo: &str,
    config_media_type: &str,
    config: &[u8],
    layer_media_type: &str,
    layer: &[u8],
) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let reference = format!("{}/{repo}:1", registry.host());
    let parsed: Reference = reference.parse().unwrap();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.host().to_string()]),
        ..Default::default()
    });
    let layers = [ImageLayer::new(
        layer.to_vec(),
        layer_media_type.to_string(),
        None,
    )];
    let config = Config::new(config.to_vec(), config_media_type.to_string(), None);
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.into());
    client
        .push(
            &parsed,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .unwrap_or_else(|e| panic!("push {reference}: {e}\n{}", registry.log_tail()));
    reference
}

#[tokio::test]
async fn wasm_artifacts_containers_and_other_artifacts_are_told_apart() {
    let registry = Registry::start().await.expect("registry starts");
    let pinner = Pinner::default();

    // A wasm artifact as `verge-images wasm push` makes it: the smallest
    // core module as its one `application/wasm` layer.
    let wasm = push(
        &registry,
        "echo-wasm",
        WASM_CONFIG_MEDIA_TYPE,
        br#"{"architecture":"wasm","os":"wasip1"}"#,
        "application/wasm",
        b"\0asm\x01\0\0\0",
    )
    .await;
    let container = push(
        &registry,
        "hello",
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        b"not really a tarball",
    )
    .await;
    let other = push(
        &registry,
        "chart",
        "application/vnd.cncf.helm.config.v1+json",
        b"{}",
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
        b"chart",
    )
    .await;

    // Pinned, as a release holds them.
    let wasm_pinned = pinner.pin(&wasm).await.unwrap();
    let container_pinned = pinner.pin(&container).await.unwrap();
    let other_pinned = pinner.pin(&other).await.unwrap();
    assert_eq!(
        pinner.artifact_kind(&wasm_pinned).await.unwrap(),
        ArtifactKind::Wasm
    );
    assert_eq!(
        pinner.artifact_kind(&container_pinned).await.unwrap(),
        ArtifactKind::Container
    );
    assert_eq!(
        pinner.artifact_kind(&other_pinned).await.unwrap(),
        ArtifactKind::Other {
            config_media_type: "application/vnd.cncf.helm.config.v1+json".into()
        }
    );
    // A tag works too.
    assert_eq!(
        pinner.artifact_kind(&wasm).await.unwrap(),
        ArtifactKind::Wasm
    );

    // What a deploy would refuse.
    let kind = pinner.artifact_kind(&container_pinned).await.unwrap();
    let why = kind.runtime_mismatch("wasm", &container_pinned).unwrap();
    assert!(why.contains("is a container image"), "{why}");
    assert!(
        kind.runtime_mismatch("process", &container_pinned)
            .is_none()
    );
}

#[tokio::test]
async fn artifact_kind_of_a_missing_image_is_not_found() {
    let registry = Registry::start().await.expect("registry starts");
    let pinner = Pinner::default();
    let missing = format!("{}/nothing:1", registry.host());
    let err = pinner.artifact_kind(&missing).await.unwrap_err();
    assert!(matches!(err, PinError::NotFound { .. }), "{err:?}");
    let err = pinner.artifact_kind("not a reference").await.unwrap_err();
    assert!(matches!(err, PinError::Invalid { .. }), "{err:?}");
}
