//! Talking to registries with oci-client: one client per registry, its
//! credentials, plain HTTP only where allowed, manifests by digest (their
//! sha256 checked here), and blobs streamed with their size and digest
//! checked as the bytes arrive ([`BlobStream`]).
//!
//! Registries on loopback, and those listed as insecure, are reached over
//! plain HTTP; every other registry over HTTPS only, so a registry that
//! answers plain HTTP fails the TLS handshake ([`PullError::Tls`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use verge_api::error::cause_chain;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use verge_api::names::is_loopback_registry;

use super::manifest::{ACCEPTED, Descriptor};
use super::{PullError, RegistryAuth};

/// Most registries whose clients are kept at once.
const MAX_CLIENTS: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any read; a stalled transfer fails instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Write buffer of a blob being downloaded.
const WRITE_BUFFER: usize = 1 << 20;

/// The image one pull is about.
#[derive(Debug)]
pub(crate) struct Target {
    /// As given, for messages.
    pub reference: String,
    pub parsed: Reference,
    /// `host[:port]`, as requests address it.
    pub registry: String,
    /// The digest the reference pins.
    pub digest: String,
}

impl Target {
    pub fn parse(reference: &str) -> Result<Target, PullError> {
        let parsed: Reference =
            reference
                .parse()
                .map_err(|e: oci_client::ParseError| PullError::InvalidReference {
                    reference: reference.into(),
                    reason: e.to_string(),
                })?;
        let digest = parsed
            .digest()
            .ok_or_else(|| PullError::NotPinned {
                reference: reference.into(),
            })?
            .to_string();
        if super::manifest::digest_hex(&digest).is_none() {
            return Err(PullError::InvalidReference {
                reference: reference.into(),
                reason: format!("digest {digest} is not sha256:<64 lowercase hex digits>"),
            });
        }
        Ok(Target {
            reference: reference.into(),
            registry: parsed.resolve_registry().to_string(),
            parsed,
            digest,
        })
    }
}

/// The registries this node pulls from, and how.
pub(crate) struct Registries {
    insecure: Vec<String>,
    auth: Vec<(String, RegistryAuth)>,
    clients: Mutex<HashMap<String, Client>>,
}

impl Registries {
    pub fn new(insecure: Vec<String>, auth: Vec<(String, RegistryAuth)>) -> Registries {
        Registries {
            insecure,
            auth,
            clients: Mutex::default(),
        }
    }

    /// Whether requests to `registry` may use plain HTTP.
    pub fn plain_http(&self, registry: &str) -> bool {
        is_loopback_registry(registry) || self.insecure.iter().any(|r| r == registry)
    }

    /// The kept client of `registry`: its connections, and bearer tokens,
    /// are reused by the next pull.
    fn client(&self, t: &Target) -> Result<Client, PullError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&t.registry) {
            return Ok(client.clone());
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let protocol = if self.plain_http(&t.registry) {
            ClientProtocol::HttpsExcept(vec![t.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::try_from(ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            // Indexes are resolved by the store from the raw manifest.
            platform_resolver: None,
            ..Default::default()
        })
        .map_err(|e| PullError::Registry {
            registry: t.registry.clone(),
            reference: t.reference.clone(),
            what: "a client".into(),
            cause: e.to_string(),
        })?;
        clients.insert(t.registry.clone(), client.clone());
        Ok(client)
    }

    /// The credentials configured for the target's registry (by the host as
    /// written in the reference, or as resolved, e.g. `docker.io`).
    fn credentials(&self, t: &Target) -> Option<&RegistryAuth> {
        let host = t.parsed.registry();
        self.auth
            .iter()
            .find(|(r, _)| r == &t.registry || r == host)
            .map(|(_, a)| a)
            .filter(|a| !matches!(a, RegistryAuth::Anonymous))
    }

    fn oci_auth(&self, t: &Target) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth as Oci;
        match self.credentials(t) {
            None | Some(RegistryAuth::Anonymous) => Oci::Anonymous,
            Some(RegistryAuth::Basic { username, password }) => {
                Oci::Basic(username.clone(), password.clone())
            }
            Some(RegistryAuth::Bearer { token }) => Oci::Bearer(token.clone()),
        }
    }

    /// The manifest (or index) `digest` of the target's repository, checked
    /// against `digest`.
    pub async fn manifest(&self, t: &Target, digest: &str) -> Result<Vec<u8>, PullError> {
        let client = self.client(t)?;
        let what = format!("manifest {digest}");
        let by_digest = t.parsed.clone_with_digest(digest.to_string());
        let (body, _) = client
            .pull_manifest_raw(&by_digest, &self.oci_auth(t), ACCEPTED)
            .await
            .map_err(|e| self.classify(e, t, &what))?;
        let actual = sha256_digest(&body);
        if actual != digest {
            return Err(PullError::DigestMismatch {
                reference: t.reference.clone(),
                what,
                expected: digest.into(),
                actual,
            });
        }
        Ok(body.to_vec())
    }

    /// Starts the download of blob `desc` (`what`: "layer", "config").
    pub async fn blob(
        &self,
        t: &Target,
        desc: &Descriptor,
        what: &str,
    ) -> Result<BlobStream, PullError> {
        let client = self.client(t)?;
        // Blob requests alone (the manifest is local) need the credentials too.
        client
            .store_auth_if_needed(&t.registry, &self.oci_auth(t))
            .await;
        let what = format!("{what} {}", desc.digest);
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let stream = client
            .pull_blob_stream(&t.parsed, &oci_desc)
            .await
            .map_err(|e| self.classify(e, t, &what))?;
        let blob = BlobStream {
            reference: t.reference.clone(),
            registry: t.registry.clone(),
            what,
            digest: desc.digest.clone(),
            size: desc.size,
            stream,
            received: 0,
        };
        match blob.stream.content_length {
            Some(len) if len != desc.size => {
                Err(blob.size_mismatch(format!("{len} bytes (Content-Length)")))
            }
            _ => Ok(blob),
        }
    }

    /// Downloads blob `desc` into a new file at `path` and syncs it.
    pub async fn blob_to_file(
        &self,
        t: &Target,
        desc: &Descriptor,
        what: &str,
        path: &Path,
    ) -> Result<(), PullError> {
        let mut blob = self.blob(t, desc, what).await?;
        let file = tokio::fs::File::create(path)
            .await
            .map_err(PullError::io("creating", path))?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        while let Some(chunk) = blob.chunk().await? {
            out.write_all(&chunk)
                .await
                .map_err(PullError::io("writing", path))?;
        }
        out.flush().await.map_err(PullError::io("writing", path))?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(PullError::io("syncing", path))
    }

    fn classify(&self, e: OciDistributionError, t: &Target, what: &str) -> PullError {
        let registry = t.registry.clone();
        let reference = t.reference.clone();
        let credentials = || {
            let repository = t.parsed.repository().to_string();
            if self.credentials(t).is_some() {
                PullError::CredentialsRefused {
                    registry: registry.clone(),
                    repository,
                    reference: reference.clone(),
                }
            } else {
                PullError::CredentialsNeeded {
                    registry: registry.clone(),
                    repository,
                    reference: reference.clone(),
                }
            }
        };
        let not_found = || PullError::NotFound {
            registry: registry.clone(),
            reference: reference.clone(),
            what: what.to_string(),
        };
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => credentials(),
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => credentials(),
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let has = |codes: &[OciErrorCode]| {
                    envelope.errors.iter().any(|e| codes.contains(&e.code))
                };
                if has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]) {
                    credentials()
                } else if has(&[
                    OciErrorCode::ManifestUnknown,
                    OciErrorCode::BlobUnknown,
                    OciErrorCode::NameUnknown,
                    OciErrorCode::NotFound,
                ]) {
                    not_found()
                } else {
                    PullError::Registry {
                        registry,
                        reference,
                        what: what.into(),
                        cause: e.to_string(),
                    }
                }
            }
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => PullError::DigestMismatch {
                reference,
                what: what.into(),
                expected,
                actual,
            },
            OciDistributionError::RequestError(e) if is_tls(&e) => PullError::Tls {
                registry,
                reference,
                cause: cause_chain(&e),
            },
            OciDistributionError::RequestError(e) => PullError::Unreachable {
                registry,
                reference,
                cause: cause_chain(&e),
            },
            OciDistributionError::IoError(e) => PullError::Unreachable {
                registry,
                reference,
                cause: cause_chain(&e),
            },
            other => PullError::Registry {
                registry,
                reference,
                what: what.into(),
                cause: other.to_string(),
            },
        }
    }
}

/// A blob being downloaded. oci-client's `pull_blob_stream` hashes every
/// chunk as it passes and fails the stream's end when the digest is not
/// the descriptor's; this counts the bytes too (refusing more than the
/// descriptor's size at once) and names the blob in the error. The end of
/// the stream is reported only for a complete, verified blob. (Hashing a
/// second time here would cost a fifth of a pull's CPU.)
pub(crate) struct BlobStream {
    reference: String,
    registry: String,
    what: String,
    digest: String,
    size: u64,
    stream: oci_client::client::SizedStream,
    received: u64,
}

impl BlobStream {
    /// The next chunk; `None` at the end of a complete, verified blob.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, PullError> {
        match self.stream.next().await {
            Some(Ok(chunk)) => {
                self.received += chunk.len() as u64;
                if self.received > self.size {
                    return Err(self.size_mismatch(format!("more than {} bytes", self.size)));
                }
                Ok(Some(chunk))
            }
            Some(Err(e)) => match digest_error(&e) {
                Some(actual) => Err(PullError::DigestMismatch {
                    reference: self.reference.clone(),
                    what: self.what.clone(),
                    expected: self.digest.clone(),
                    actual,
                }),
                None => Err(PullError::Unreachable {
                    registry: self.registry.clone(),
                    reference: self.reference.clone(),
                    cause: format!(
                        "{} broke off after {} bytes: {}",
                        self.what,
                        self.received,
                        cause_chain(&e)
                    ),
                }),
            },
            None if self.received != self.size => {
                Err(self.size_mismatch(format!("{} bytes", self.received)))
            }
            None => Ok(None),
        }
    }

    fn size_mismatch(&self, got: String) -> PullError {
        PullError::DigestMismatch {
            reference: self.reference.clone(),
            what: format!("the size of {}", self.what),
            expected: format!("{} bytes", self.size),
            actual: got,
        }
    }
}

/// The digest a blob stream actually had, if its error is oci-client's
/// verification failure.
fn digest_error(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<DigestError>()? {
        DigestError::VerificationError { actual, .. } => Some(actual.clone()),
        _ => None,
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether a TLS error is somewhere in the chain (also inside `io::Error`s,
/// whose `source()` skips the error they wrap).
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}
