//! Why a pull (or the image store) failed, grouped so the caller can report
//! every one of them under the category `image_pull`.

use std::path::PathBuf;

/// Which side failed: the reference given, the registry (or the way to
/// it), the image's content, or this node's own disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullErrorKind {
    /// The reference itself is unusable: fix what was deployed.
    Reference,
    /// The registry refused, failed or could not be reached.
    Registry,
    /// The registry served content that is not a usable image for this node.
    Image,
    /// The node's image store (disk, permissions, lock).
    Local,
}

/// A failed pull, GC or store open. Messages name the image, the registry
/// and the blob; [`PullError::next`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image reference {reference:?} is invalid: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error(
        "image reference {reference:?} is not pinned to a digest: \
         nodes pull only REGISTRY/REPOSITORY[:TAG]@sha256:DIGEST"
    )]
    NotPinned { reference: String },
    #[error(
        "registry {registry} refused the credentials given for repository {repository} \
         (image {reference}): check the node's credentials for {registry} (--registry-auth)"
    )]
    CredentialsRefused {
        registry: String,
        repository: String,
        reference: String,
    },
    #[error(
        "registry {registry} requires credentials for repository {repository} \
         (image {reference}) and the node has none for it: add them (--registry-auth)"
    )]
    CredentialsNeeded {
        registry: String,
        repository: String,
        reference: String,
    },
    #[error("registry {registry} has no {what} for image {reference}")]
    NotFound {
        registry: String,
        reference: String,
        what: String,
    },
    #[error("cannot reach registry {registry} for image {reference}: {cause}")]
    Unreachable {
        registry: String,
        reference: String,
        cause: String,
    },
    #[error(
        "registry {registry} did not complete a TLS handshake for image {reference} \
         (a registry serving plain HTTP must be listed with --insecure-registry {registry}): {cause}"
    )]
    Tls {
        registry: String,
        reference: String,
        cause: String,
    },
    #[error("registry {registry} failed serving {what} of image {reference}: {cause}")]
    Registry {
        registry: String,
        reference: String,
        what: String,
        cause: String,
    },
    #[error(
        "{what} of image {reference} does not match its digest: expected {expected}, got {actual}; \
         it was refused (the registry, or something between it and this node, altered it)"
    )]
    DigestMismatch {
        reference: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error("image {reference} has no manifest for {wanted}; its index lists {available}")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("image {reference} is built for {found}; this node runs {wanted}")]
    WrongPlatform {
        reference: String,
        found: String,
        wanted: String,
    },
    #[error("image {reference}: {what} is not usable: {reason}")]
    InvalidImage {
        reference: String,
        what: String,
        reason: String,
    },
    #[error(
        "{reference} is {found}, not a wasm artifact: runtime = \"wasm\" needs an OCI wasm artifact \
         (config application/vnd.wasm.config.v0+json, one application/wasm layer); \
         push one with verge-images wasm push"
    )]
    NotWasm { reference: String, found: String },
    #[error(
        "{reference} is a wasm artifact, not a container image: runtime = \"process\" needs an OCI \
         container image; deploy the artifact with runtime = \"wasm\""
    )]
    NotImage { reference: String },
    #[error("image {reference}: layer {layer} cannot be unpacked: {reason}")]
    Layer {
        reference: String,
        layer: String,
        reason: String,
    },
    #[error("image store: {what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image store {} is in use by another process (it holds {})", root.display(), root.join("lock").display())]
    Locked { root: PathBuf },
}

impl PullError {
    /// The category every pull error is reported under.
    pub const CATEGORY: &'static str = "image_pull";

    /// Always [`PullError::CATEGORY`]: one category for the caller's report.
    pub fn category(&self) -> &'static str {
        Self::CATEGORY
    }

    /// Which side failed.
    pub fn kind(&self) -> PullErrorKind {
        use PullError::*;
        match self {
            InvalidReference { .. } | NotPinned { .. } => PullErrorKind::Reference,
            CredentialsRefused { .. }
            | CredentialsNeeded { .. }
            | NotFound { .. }
            | Unreachable { .. }
            | Tls { .. }
            | Registry { .. } => PullErrorKind::Registry,
            DigestMismatch { .. }
            | NoPlatform { .. }
            | WrongPlatform { .. }
            | InvalidImage { .. }
            | NotWasm { .. }
            | NotImage { .. }
            | Layer { .. } => PullErrorKind::Image,
            Io { .. } | Locked { .. } => PullErrorKind::Local,
        }
    }

    /// Whether the same pull may succeed later without anyone changing
    /// anything (the registry was down, the connection dropped).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PullError::Unreachable { .. } | PullError::Registry { .. } | PullError::Io { .. }
        )
    }

    /// What to do about it.
    pub fn next(&self) -> Vec<String> {
        use PullError::*;
        match self {
            InvalidReference { .. } | NotPinned { .. } => vec![
                "deploy images through the control plane, which pins them to digests".into(),
            ],
            CredentialsRefused { registry, .. } => {
                vec![format!("check the node's credentials for {registry} (--registry-auth)")]
            }
            CredentialsNeeded { registry, .. } => vec![format!(
                "give the node credentials for {registry} (--registry-auth), or make the repository public"
            )],
            NotFound { .. } => vec![
                "the image was deleted from the registry, or the digest is wrong: push it again, or deploy another".into(),
            ],
            Unreachable { registry, .. } => vec![format!(
                "check that the registry {registry} is running and reachable from this node; the pull is retried"
            )],
            Tls { registry, .. } => vec![format!(
                "if {registry} serves plain HTTP, start the node with --insecure-registry {registry}; otherwise fix its certificate"
            )],
            Registry { .. } => vec!["retry; if it persists, check the registry's log".into()],
            DigestMismatch { .. } => vec![
                "check the registry's storage and any proxy in between; the node never uses altered content".into(),
            ],
            NoPlatform { .. } | WrongPlatform { .. } => {
                vec!["build and push the image for linux/amd64".into()]
            }
            NotWasm { .. } => vec![
                "push the module or component as an OCI wasm artifact (verge-images wasm push), or deploy the image with runtime = \"process\"".into(),
            ],
            NotImage { .. } => vec![
                "set runtime = \"wasm\" on the workload, or deploy a container image".into(),
            ],
            InvalidImage { .. } | Layer { .. } => {
                vec!["rebuild the image with a standard tool (docker, buildah) and push it again".into()]
            }
            Io { .. } => vec!["check the node's disk (space, permissions) under its data dir".into()],
            Locked { .. } => vec!["run one node per data dir".into()],
        }
    }

    pub(crate) fn io(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> PullError {
        let (what, path) = (what.into(), path.into());
        move |source| PullError::Io { what, path, source }
    }
}
