//! Pinning image references to digests when a release is created.
//!
//! Each reference is resolved against its registry (a `HEAD` of its
//! manifest with oci-client); a reference that already carries a digest is
//! checked to exist. Registries on loopback are reached over plain HTTP, as
//! Docker does; others over HTTPS unless listed in `insecure_registries`.
//! Access is anonymous, except to registries given credentials
//! (`registry_auth_file`, see docs/operations.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
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
