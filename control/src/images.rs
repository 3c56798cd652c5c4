//! Pinning image references to digests when a release is created.
//!
//! Each reference is resolved against its registry (a `HEAD` of its
//! manifest with oci-client); a reference that already carries a digest is
//! checked to exist. Registries on loopback are reached over plain HTTP, as
//! Docker does; others over HTTPS unless listed in `insecure_registries`.
//! Access is anonymous, except to registries given credentials
//! (`registry_auth_file`, see docs/operations.md).
//!
//! [`Pinner::artifact_kind`] tells a container image from an OCI wasm
//! artifact (by its manifest's config media type), so that a deploy can
//! refuse `runtime = "wasm"` on a container image and `runtime = "process"`
//! on a wasm artifact before any node tries to run it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use verge_api::error::cause_chain;
use verge_api::names::is_loopback_registry;
use verge_api::registry_auth::Credential;

/// Why an image reference could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("image {reference:?} is not a valid OCI reference: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("image {reference:?} not found: registry {registry} has no such repository or tag")]
    NotFound { reference: String, registry: String },
    #[error("cannot reach registry {registry} for image {reference:?}: {cause}")]
    Unreachable {
        reference: String,
        registry: String,
        cause: String,
    },
    #[error("registry {registry} refused access to image {reference:?}")]
    Unauthorized { reference: String, registry: String },
    #[error("registry {registry} failed to resolve image {reference:?}: {cause}")]
    Registry {
        reference: String,
        registry: String,
        cause: String,
    },
}

impl PinError {
    /// What to do about it.
    pub fn next(&self) -> Vec<String> {
        match self {
            PinError::Invalid { .. } => {
                vec!["write images as REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/hello:1.0".into()]
            }
            PinError::NotFound { .. } => vec![
                "push the image first, or fix the tag in verge.toml (or --image)".into(),
            ],
            PinError::Unreachable { registry, .. } => vec![
                format!("check that the registry {registry} is running and reachable from the control plane"),
                "a registry that speaks plain HTTP off loopback needs --insecure-registry HOST:PORT on the control plane".into(),
            ],
            PinError::Unauthorized { .. } => vec![
                "give the control plane credentials for this registry with --registry-auth-file (and the nodes too), or check the ones given".into(),
            ],
            PinError::Registry { .. } => vec!["retry; if it persists, check the registry's log".into()],
        }
    }
}

/// Config media type of an OCI wasm artifact (the CNCF TAG Runtime layout
/// that `verge-images wasm push` writes and nodes run): its one layer is
/// the `.wasm` (`application/wasm`).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";

/// Config media types of container images (OCI, Docker).
const CONTAINER_CONFIG_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Manifest media types asked for when classifying a reference.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// What an image reference points at, by its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactKind {
    /// A container image: an image manifest whose config is an OCI or
    /// Docker image config, or an image index (a multi-platform image).
    /// Runs with `runtime = "process"`.
    Container,
    /// An OCI wasm artifact: an image manifest whose config media type is
    /// [`WASM_CONFIG_MEDIA_TYPE`]. Runs with `runtime = "wasm"`.
    Wasm,
    /// Any other artifact (a Helm chart, another wasm packaging, ...): runs
    /// with neither runtime. Carries the config media type.
    Other { config_media_type: String },
}

impl ArtifactKind {
    /// Classifies the manifest `bytes` (as a registry serves them). `None`
    /// if they are not a JSON image manifest or index.
    pub fn of_manifest(bytes: &[u8]) -> Option<ArtifactKind> {
        let manifest: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let media_type = manifest.get("mediaType").and_then(|m| m.as_str());
        let is_index = matches!(
            media_type,
            Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE)
        ) || (media_type.is_none() && manifest.get("manifests").is_some());
        if is_index {
            return Some(ArtifactKind::Container);
        }
        let config_media_type = manifest.get("config")?.get("mediaType")?.as_str()?;
        Some(if config_media_type == WASM_CONFIG_MEDIA_TYPE {
            ArtifactKind::Wasm
        } else if CONTAINER_CONFIG_MEDIA_TYPES.contains(&config_media_type) {
            ArtifactKind::Container
        } else {
            ArtifactKind::Other {
                config_media_type: config_media_type.to_string(),
            }
        })
    }

    /// The workload runtime that runs this kind: `process` or `wasm`.
    pub fn runtime(&self) -> Option<&'static str> {
        match self {
            ArtifactKind::Container => Some("process"),
            ArtifactKind::Wasm => Some("wasm"),
            ArtifactKind::Other { .. } => None,
        }
    }

    /// Why `reference` (of this kind) cannot run with workload runtime
    /// `runtime` (`"process"` or `"wasm"`), or `None` if it can.
    pub fn runtime_mismatch(&self, runtime: &str, reference: &str) -> Option<String> {
        if self.runtime() == Some(runtime) {
            return None;
        }
        Some(match self {
            ArtifactKind::Container => format!(
                "image {reference} is a container image, but the workload has runtime = \"{runtime}\": \
                 use runtime = \"process\", or push the program as an OCI wasm artifact \
                 (config media type {WASM_CONFIG_MEDIA_TYPE})"
            ),
            ArtifactKind::Wasm => format!(
                "image {reference} is a wasm artifact, but the workload has runtime = \"{runtime}\": \
                 use runtime = \"wasm\", or give a container image"
            ),
            ArtifactKind::Other { config_media_type } => format!(
                "image {reference} is neither a container image nor a wasm artifact \
                 (its config media type is {config_media_type}): runtime = \"{runtime}\" cannot run it"
            ),
        })
    }
}

/// Most registries whose clients are kept at once.
const MAX_CLIENTS: usize = 64;

/// Resolves references to `registry/repository[:tag]@sha256:...`.
#[derive(Clone, Default)]
pub struct Pinner {
    /// `host:port` of registries reached over plain HTTP although off loopback.
    insecure_registries: Vec<String>,
    /// Credentials by registry `host[:port]`.
    auth: Arc<Vec<(String, Credential)>>,
    /// One client per registry, kept: its connections (and TLS sessions and
    /// bearer tokens) are reused by the next deploy.
    clients: Arc<Mutex<HashMap<String, Client>>>,
}

impl std::fmt::Debug for Pinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinner")
            .field("insecure_registries", &self.insecure_registries)
            .finish_non_exhaustive()
    }
}

impl Pinner {
    pub fn new(insecure_registries: Vec<String>, auth: Vec<(String, Credential)>) -> Pinner {
        Pinner {
            insecure_registries,
            auth: Arc::new(auth),
            clients: Arc::default(),
        }
    }

    /// How to authenticate to `registry`.
    fn auth_for(&self, registry: &str) -> RegistryAuth {
        match self
            .auth
            .iter()
            .find(|(r, _)| r == registry)
            .map(|(_, c)| c)
        {
            Some(Credential::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credential::Bearer { token }) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    fn client(&self, registry: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        // Registry names come from users: keep the cache bounded.
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(registry) {
            clients.clear();
        }
        clients
            .entry(registry.to_string())
            .or_insert_with(|| {
                let plain_http = is_loopback_registry(registry)
                    || self.insecure_registries.iter().any(|r| r == registry);
                Client::new(ClientConfig {
                    protocol: if plain_http {
                        ClientProtocol::HttpsExcept(vec![registry.to_string()])
                    } else {
                        ClientProtocol::Https
                    },
                    connect_timeout: Some(Duration::from_secs(5)),
                    read_timeout: Some(Duration::from_secs(20)),
                    ..Default::default()
                })
            })
            .clone()
    }

    pub async fn pin(&self, reference: &str) -> Result<String, PinError> {
        let parsed: Reference =
            reference
                .parse()
                .map_err(|e: oci_client::ParseError| PinError::Invalid {
                    reference: reference.into(),
                    reason: e.to_string(),
                })?;
        let registry = parsed.resolve_registry().to_string();
        let client = self.client(&registry);
        let digest = client
            .fetch_manifest_digest(&parsed, &self.auth_for(&registry))
            .await
            .map_err(|e| classify(e, reference, &registry))?;
        // Keep the tag beside the digest (`repo:1.0@sha256:...`): readable,
        // and the digest alone decides what is pulled.
        let pinned = match parsed.tag() {
            Some(tag) => Reference::with_tag_and_digest(
                parsed.registry().to_string(),
                parsed.repository().to_string(),
                tag.to_string(),
                digest,
            ),
            None => parsed.clone_with_digest(digest),
        };
        Ok(pinned.whole())
    }

    /// What `pinned_ref` (best a digest-pinned reference from [`Pinner::pin`],
    /// though a tag works too) points at: fetches its manifest and looks at
    /// the config media type ([`ArtifactKind::of_manifest`]). Errors as
    /// [`Pinner::pin`]'s; a manifest that is not a JSON image manifest or
    /// index is a [`PinError::Registry`].
    pub async fn artifact_kind(&self, pinned_ref: &str) -> Result<ArtifactKind, PinError> {
        let parsed: Reference =
            pinned_ref
                .parse()
                .map_err(|e: oci_client::ParseError| PinError::Invalid {
                    reference: pinned_ref.into(),
                    reason: e.to_string(),
                })?;
        let registry = parsed.resolve_registry().to_string();
        let client = self.client(&registry);
        let (manifest, _digest) = client
            .pull_manifest_raw(&parsed, &self.auth_for(&registry), MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| classify(e, pinned_ref, &registry))?;
        ArtifactKind::of_manifest(&manifest).ok_or_else(|| PinError::Registry {
            reference: pinned_ref.into(),
            registry,
            cause: "its manifest is not a JSON OCI image manifest or index".into(),
        })
    }
}

fn classify(e: OciDistributionError, reference: &str, registry: &str) -> PinError {
    let reference = reference.to_string();
    let registry = registry.to_string();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => PinError::NotFound {
            reference,
            registry,
        },
        OciDistributionError::ServerError { code: 404, .. } => PinError::NotFound {
            reference,
            registry,
        },
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
                )
            }) =>
        {
            PinError::NotFound {
                reference,
                registry,
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => PinError::Unauthorized {
            reference,
            registry,
        },
        OciDistributionError::RequestError(e) => PinError::Unreachable {
            reference,
            registry,
            cause: cause_chain(&e),
        },
        other => PinError::Registry {
            reference,
            registry,
            cause: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(media_type: Option<&str>, config_media_type: &str) -> Vec<u8> {
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": config_media_type, "digest": "sha256:00", "size": 2},
            "layers": [],
        });
        if let Some(t) = media_type {
            m["mediaType"] = t.into();
        }
        serde_json::to_vec(&m).unwrap()
    }

    #[test]
    fn classifies_manifests_by_config_media_type() {
        let of = |m: Vec<u8>| ArtifactKind::of_manifest(&m);
        assert_eq!(
            of(manifest(Some(OCI_IMAGE_MEDIA_TYPE), WASM_CONFIG_MEDIA_TYPE)),
            Some(ArtifactKind::Wasm)
        );
        assert_eq!(
            of(manifest(None, WASM_CONFIG_MEDIA_TYPE)),
            Some(ArtifactKind::Wasm)
        );
        assert_eq!(
            of(manifest(
                Some(OCI_IMAGE_MEDIA_TYPE),
                "application/vnd.oci.image.config.v1+json"
            )),
            Some(ArtifactKind::Container)
        );
        assert_eq!(
            of(manifest(
                Some(IMAGE_MANIFEST_MEDIA_TYPE),
                "application/vnd.docker.container.image.v1+json"
            )),
            Some(ArtifactKind::Container)
        );
        // wasm-to-oci's older packaging is not what nodes run.
        assert_eq!(
            of(manifest(
                Some(OCI_IMAGE_MEDIA_TYPE),
                "application/vnd.wasm.config.v1+json"
            )),
            Some(ArtifactKind::Other {
                config_media_type: "application/vnd.wasm.config.v1+json".into()
            })
        );
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": [],
        });
        assert_eq!(
            of(serde_json::to_vec(&index).unwrap()),
            Some(ArtifactKind::Container)
        );
        assert_eq!(ArtifactKind::of_manifest(b"not json"), None);
        assert_eq!(ArtifactKind::of_manifest(b"{}"), None);
    }

    #[test]
    fn runtime_mismatch_explains_both_directions() {
        let r = "127.0.0.1:5000/x:1@sha256:ab";
        assert_eq!(ArtifactKind::Wasm.runtime_mismatch("wasm", r), None);
        assert_eq!(ArtifactKind::Container.runtime_mismatch("process", r), None);
        let why = ArtifactKind::Container.runtime_mismatch("wasm", r).unwrap();
        assert!(why.contains("is a container image"), "{why}");
        let why = ArtifactKind::Wasm.runtime_mismatch("process", r).unwrap();
        assert!(why.contains("is a wasm artifact"), "{why}");
        let other = ArtifactKind::Other {
            config_media_type: "application/x-helm".into(),
        };
        assert!(other.runtime_mismatch("process", r).is_some());
        assert!(other.runtime_mismatch("wasm", r).is_some());
    }
}
