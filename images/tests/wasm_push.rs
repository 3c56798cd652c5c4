//! Pushing the wasm examples to a real registry (Debian's `docker-registry`)
//! and reading them back as a node would: manifest, config, layer.

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use verge_images::{
    WASM_CONFIG_MEDIA_TYPE, WASM_EXAMPLES, WASM_LAYER_MEDIA_TYPE, WasmArtifact, push_wasm,
    sha256_digest, wasm_example,
};
use verge_tests::registry::Registry;

fn client(registry: &Registry) -> Client {
    verge_images::install_crypto_provider();
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.host().to_string()]),
        ..Default::default()
    })
}

#[tokio::test]
async fn every_example_round_trips_through_a_registry() {
    let registry = Registry::start().await.expect("registry starts");
    let client = client(&registry);
    for name in WASM_EXAMPLES {
        let wasm = wasm_example(name).unwrap();
        let reference = format!("{}/{name}-wasm:1", registry.host());
        let digest = push_wasm(&wasm, &reference)
            .await
            .unwrap_or_else(|e| panic!("push {reference}: {e}\n{}", registry.log_tail()));
        assert_eq!(digest, WasmArtifact::build(wasm.clone()).unwrap().digest);

        // Pull by the pinned reference.
        let pinned: Reference = format!("{reference}@{digest}").parse().unwrap();
        let (raw, pulled_digest) = client
            .pull_manifest_raw(&pinned, &RegistryAuth::Anonymous, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .unwrap();
        assert_eq!(pulled_digest, digest);
        assert_eq!(sha256_digest(&raw), digest);
        let manifest: OciImageManifest = serde_json::from_slice(&raw).unwrap();
        assert_eq!(manifest.config.media_type, WASM_CONFIG_MEDIA_TYPE);
        assert_eq!(manifest.layers.len(), 1);
        assert_eq!(manifest.layers[0].media_type, WASM_LAYER_MEDIA_TYPE);

        let mut layer = Vec::new();
        client
            .pull_blob(&pinned, &manifest.layers[0], &mut layer)
            .await
            .unwrap();
        assert_eq!(layer, wasm, "{name}: the layer is the .wasm itself");

        let mut config = Vec::new();
        client
            .pull_blob(&pinned, &manifest.config, &mut config)
            .await
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        let os = if *name == "tcp-echo" {
            "wasip2"
        } else {
            "wasip1"
        };
        assert_eq!(config["os"], os, "{name}");
        assert_eq!(config["architecture"], "wasm");
        assert_eq!(config["layerDigests"][0], sha256_digest(&wasm).as_str());
    }
}

#[tokio::test]
async fn pushing_again_gives_the_same_digest() {
    let registry = Registry::start().await.expect("registry starts");
    let wasm = wasm_example("echo").unwrap();
    let first = push_wasm(&wasm, &format!("{}/echo-wasm:1", registry.host()))
        .await
        .unwrap();
    let second = push_wasm(&wasm, &format!("{}/echo-wasm:2", registry.host()))
        .await
        .unwrap();
    assert_eq!(first, second);
}

#[tokio::test]
async fn invalid_wasm_is_refused_before_any_request() {
    let err = push_wasm(b"\0asm\x01\0\0\0\xff", "127.0.0.1:1/broken:1")
        .await
        .unwrap_err();
    assert!(
        matches!(err, verge_images::Error::InvalidWasm { .. }),
        "{err}"
    );
}
