//! Pushing images to a registry with `oci-client`.
//!
//! Registries on loopback addresses are reached over plain HTTP, as Docker
//! does; every other registry over HTTPS. Access is anonymous.

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::{Error, Image, Result};

/// Installs rustls' `ring` crypto provider for the process, if none is yet.
/// Needed before any `oci-client` use; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub use verge_api::names::is_loopback_registry;

/// An `oci-client` client for `reference`'s registry: plain HTTP if it is on
/// loopback, HTTPS otherwise. Installs the crypto provider first.
pub fn client_for(reference: &Reference) -> Client {
    install_crypto_provider();
    let registry = reference.resolve_registry();
    let protocol = if is_loopback_registry(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

/// Pushes `image` (layers, config, then manifest) to `reference`, e.g.
/// `127.0.0.1:5000/hello:1.0`, and returns the manifest digest `sha256:...`.
/// Blobs the registry already has are not uploaded again.
pub async fn push(image: &Image, reference: &str) -> Result<String> {
    push_with_auth(image, reference, &RegistryAuth::Anonymous).await
}

/// [`push`] to a registry that wants credentials.
pub async fn push_with_auth(image: &Image, reference: &str, auth: &RegistryAuth) -> Result<String> {
    let mut blobs: Vec<(&str, Vec<u8>)> = image
        .layers
        .iter()
        .map(|l| (l.digest.as_str(), l.data.clone()))
        .collect();
    blobs.push((&image.manifest.config.digest, image.config.data.to_vec()));
    push_blobs_and_manifest(reference, auth, &blobs, &image.manifest_json, &image.digest).await
}

/// Pushes `blobs` (`(digest, data)`, skipping those the registry has), then
/// the OCI image manifest `manifest_json` whose sha256 is `digest`, to
/// `reference`. Returns `digest`.
pub(crate) async fn push_blobs_and_manifest(
    reference: &str,
    auth: &RegistryAuth,
    blobs: &[(&str, Vec<u8>)],
    manifest_json: &[u8],
    digest: &str,
) -> Result<String> {
    let parsed: Reference = reference
        .parse()
        .map_err(|source| Error::InvalidReference {
            reference: reference.into(),
            source,
        })?;
    let failed = |source| Error::Push {
        reference: reference.into(),
        source,
    };
    let client = client_for(&parsed);
    client
        .store_auth_if_needed(parsed.resolve_registry(), auth)
        .await;

    for (blob_digest, data) in blobs {
        if !client
            .blob_exists(&parsed, blob_digest)
            .await
            .map_err(failed)?
        {
            client
                .push_blob(&parsed, data.clone(), blob_digest)
                .await
                .map_err(failed)?;
        }
    }

    let content_type = http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE);
    let location = client
        .push_manifest_raw(&parsed, manifest_json.to_vec(), content_type)
        .await
        .map_err(failed)?;
    // Registries answer with the manifest's URL by digest: it must be ours.
    if let Some(at) = location.rfind("sha256:") {
        let stored = location[at..].split(['?', '#']).next().unwrap_or_default();
        if stored != digest {
            return Err(Error::DigestMismatch {
                reference: reference.into(),
                location,
                expected: digest.into(),
            });
        }
    }
    Ok(digest.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_exception_is_keyed_on_host_and_port() {
        // `client_for` lists `resolve_registry()` as the HTTP exception.
        let r: Reference = "127.0.0.1:5000/hello:1.0".parse().unwrap();
        assert_eq!(r.resolve_registry(), "127.0.0.1:5000");
        assert!(is_loopback_registry(r.resolve_registry()));
    }
}
