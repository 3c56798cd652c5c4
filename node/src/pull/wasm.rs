//! Pulling OCI wasm artifacts (SPEC §2, runtime `wasm`) into the same
//! content-addressed store as images.
//!
//! A wasm artifact is an OCI image manifest whose config has the media
//! type [`WASM_CONFIG`] and which has exactly one layer, of media type
//! [`WASM_LAYER`]: the module or component itself. Its manifest and its
//! layer are checked against their digests as for images; the layer is
//! kept as a blob (`blobs/sha256/<hex>`), not unpacked, and the artifact
//! gets an image record naming both, so that [`ImageStore::gc`] keeps it
//! while it is in use and collects it like any image when it is not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::manifest::{self, Manifest};
use super::registry::Target;
use super::store::{Content, ImageRecord};
use super::{ImageStore, PullError, check_digest, sized};

/// The config media type of an OCI wasm artifact.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The media type of its one layer: the module or component.
pub const WASM_LAYER: &str = "application/wasm";

/// A wasm artifact ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledWasm {
    /// The layer's digest, `sha256:...`: the module's or component's bytes.
    pub digest: String,
    /// The layer's blob in the content store.
    pub path: PathBuf,
    /// The artifact manifest's digest (the digest the reference pins, and
    /// the artifact's name in [`ImageStore::gc`]).
    pub manifest: String,
    /// Bytes of the module or component.
    pub size: u64,
}

impl ImageStore {
    /// Pulls the OCI wasm artifact `reference`
    /// (`registry/repository[:tag]@sha256:...`): what is already in the
    /// store is used, the rest fetched and checked. A container image is
    /// refused ([`PullError::NotWasm`]).
    pub async fn pull_wasm(&self, reference: &str) -> Result<PulledWasm, PullError> {
        let span = tracing::info_span!("wasm_pull", image = %reference);
        self.pull_wasm_in_span(reference).instrument(span).await
    }

    async fn pull_wasm_in_span(&self, reference: &str) -> Result<PulledWasm, PullError> {
        let started = Instant::now();
        let t = Arc::new(Target::parse(reference)?);
        let store = &self.inner.store;
        let mut hold = store.hold(&t.digest);
        let invalid = |what: &str, reason: String| PullError::InvalidImage {
            reference: t.reference.clone(),
            what: what.to_string(),
            reason,
        };

        hold.pin(Content::Blob(t.digest.clone()));
        let top = self.manifest(&t, &t.digest).await?;
        let (config, layers) =
            match manifest::parse_manifest(&top).map_err(|e| invalid("the manifest", e))? {
                Manifest::Image { config, layers } => (config, layers),
                Manifest::Index(_) => {
                    return Err(PullError::NotWasm {
                        reference: t.reference.clone(),
                        found: "an image index".into(),
                    });
                }
            };
        if config.media_type != WASM_CONFIG {
            let found = if config.media_type.is_empty() {
                "a container image".to_string()
            } else {
                format!("a container image (config {})", config.media_type)
            };
            return Err(PullError::NotWasm {
                reference: t.reference.clone(),
                found,
            });
        }
        let layer = match layers.as_slice() {
            [layer] if layer.media_type == WASM_LAYER => layer.clone(),
            _ => {
                let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
                return Err(invalid(
                    "the wasm artifact",
                    format!(
                        "it needs exactly one {WASM_LAYER} layer; it has {} layer(s) [{}]",
                        layers.len(),
                        types.join(", ")
                    ),
                ));
            }
        };
        check_digest(&config.digest).map_err(|e| invalid("the manifest's config", e))?;
        check_digest(&layer.digest).map_err(|e| invalid("the wasm layer", e))?;

        let blob = Content::Blob(layer.digest.clone());
        hold.pin(blob.clone());
        let size = match store.present(&blob) {
            Some(size) => size,
            None => self.wasm_layer(&t, &layer).await?,
        };
        let blobs = vec![
            sized(&t.digest, top.len()),
            sized(&layer.digest, size as usize),
        ];
        let record = ImageRecord {
            digest: t.digest.clone(),
            reference: t.reference.clone(),
            manifest: t.digest.clone(),
            config: config.digest.clone(),
            size: blobs.iter().map(|b| b.size).sum(),
            blobs,
            layers: Vec::new(),
            last_used: store.state().stamp(),
        };
        self.blocking(move |s| s.save_record(record)).await?;
        drop(hold);
        tracing::info!(
            digest = %layer.digest,
            bytes = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "wasm artifact pulled"
        );
        Ok(PulledWasm {
            path: store.path(&blob),
            digest: layer.digest,
            manifest: t.digest.clone(),
            size,
        })
    }

    /// Downloads the wasm layer `desc` into the store (once, also when two
    /// pulls want it at the same time); returns its size.
    async fn wasm_layer(&self, t: &Target, desc: &manifest::Descriptor) -> Result<u64, PullError> {
        let store = &self.inner.store;
        let c = Content::Blob(desc.digest.clone());
        let _producing = store.produce(&c).await;
        if let Some(size) = store.present(&c) {
            return Ok(size);
        }
        let tmp = store.temp();
        // Checked against the descriptor's size and digest as it arrives.
        self.inner
            .registries
            .blob_to_file(t, desc, "wasm layer", &tmp.0)
            .await?;
        let size = desc.size;
        self.blocking(move |s| s.commit(c, &tmp, size)).await?;
        Ok(size)
    }
}

/// Whether a manifest's config and layers are those of a wasm artifact
/// (for [`ImageStore::pull`], which refuses them).
pub(crate) fn is_wasm(config: &manifest::Descriptor, layers: &[manifest::Descriptor]) -> bool {
    config.media_type == WASM_CONFIG || layers.iter().any(|l| l.media_type == WASM_LAYER)
}
