//! Pulling digest-pinned OCI images into the node's content-addressed store.
//!
//! [`ImageStore::pull`] takes `registry/repository[:tag]@sha256:...`,
//! resolves an image index to this node's platform (linux/amd64 here),
//! checks the digest of every manifest and blob as its bytes arrive, and
//! unpacks each layer into its own directory, ready to be stacked as
//! overlayfs lowerdirs by the runtime. Content is shared by all images: a
//! layer is downloaded and unpacked once, also when two pulls want it at
//! the same time, and a pull whose content is all local makes no request.
//! [`ImageStore::gc`] keeps the store under its disk budget.
//! [`ImageStore::pull_wasm`] pulls OCI wasm artifacts into the same store
//! (their one layer kept as a blob, see `wasm.rs`). The layout on
//! disk is described in `store.rs`, unpacking (whiteouts) in `unpack.rs`,
//! registries and credentials in `registry.rs`.

mod error;
mod gc;
mod manifest;
mod registry;
mod store;
mod unpack;
#[cfg(test)]
mod unpack_tests;
mod wasm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt, stream};
use tracing::Instrument;

pub use error::{PullError, PullErrorKind};
pub use manifest::ImageConfig;
pub use wasm::{PulledWasm, WASM_CONFIG, WASM_LAYER};

use manifest::{Descriptor, Manifest, digest_hex, node_platform};
use registry::{Registries, Target};
use store::{Content, ImageRecord, Sized, Store};
use unpack::Compression;

/// How the node reaches registries.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// `host[:port]` of registries reached over plain HTTP although they are
    /// not on loopback (loopback registries always are).
    pub insecure_registries: Vec<String>,
    /// Credentials by registry `host[:port]`; others are pulled anonymously.
    pub auth: Vec<(String, RegistryAuth)>,
    /// Layers of one image downloaded at once (at least 1).
    pub max_concurrent_layers: usize,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions {
            insecure_registries: Vec::new(),
            auth: Vec::new(),
            max_concurrent_layers: 4,
        }
    }
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    Anonymous,
    /// Sent as HTTP basic auth to registries that ask for it, and to the
    /// token service of registries that ask for a bearer token.
    Basic {
        username: String,
        password: String,
    },
    /// A token sent as is (`Authorization: Bearer ...`).
    Bearer {
        token: String,
    },
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryAuth::Anonymous => write!(f, "Anonymous"),
            RegistryAuth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            RegistryAuth::Bearer { .. } => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The digest the reference pins, `sha256:...` (an index's when the
    /// reference names an index). The image's name in [`ImageStore::gc`].
    pub digest: String,
    /// The image manifest's digest: `digest`, or the index's entry for this
    /// node's platform.
    pub manifest: String,
    pub config: ImageConfig,
    /// Unpacked layer directories, bottom first (overlayfs wants them top
    /// first in `lowerdir=`).
    pub layers: Vec<PathBuf>,
    /// Bytes of all its content on disk, shared layers included.
    pub size: u64,
}

/// What [`ImageStore::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Digests of the images removed, least recently used first.
    pub removed_images: Vec<String>,
    pub freed_bytes: u64,
    /// Bytes the store holds now.
    pub usage_bytes: u64,
    pub budget_bytes: u64,
}

impl GcReport {
    /// Images in use (or being pulled) alone exceed the budget.
    pub fn over_budget(&self) -> bool {
        self.usage_bytes > self.budget_bytes
    }
}

/// The node's image store. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.store.root())
            .field("budget", &self.inner.budget)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Store,
    registries: Registries,
    budget: u64,
    max_concurrent_layers: usize,
    /// One GC at a time.
    gc: tokio::sync::Mutex<()>,
}

impl ImageStore {
    /// Opens the store under `root` (created if missing). Only one process
    /// may use a root at a time. `budget_bytes` is what [`ImageStore::gc`]
    /// aims for.
    pub async fn open(
        root: PathBuf,
        budget_bytes: u64,
        opts: PullOptions,
    ) -> Result<ImageStore, PullError> {
        // oci-client's TLS needs a process-wide provider; harmless if set.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = tokio::task::spawn_blocking(move || Store::open(&root))
            .await
            .map_err(joined)??;
        Ok(ImageStore {
            inner: Arc::new(Inner {
                store,
                registries: Registries::new(opts.insecure_registries, opts.auth),
                budget: budget_bytes,
                max_concurrent_layers: opts.max_concurrent_layers.max(1),
                gc: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Bytes of content in the store.
    pub fn disk_usage(&self) -> u64 {
        self.inner.store.state().usage
    }

    /// Digests of the images in the store, sorted.
    pub fn images(&self) -> Vec<String> {
        let mut digests: Vec<String> = self.inner.store.state().images.keys().cloned().collect();
        digests.sort();
        digests
    }

    pub fn root(&self) -> &Path {
        self.inner.store.root()
    }

    /// Pulls `reference` (`registry/repository[:tag]@sha256:...`): what is
    /// already in the store is checked on disk and used, the rest fetched.
    pub async fn pull(&self, reference: &str) -> Result<PulledImage, PullError> {
        let span = tracing::info_span!("image_pull", image = %reference);
        self.pull_in_span(reference).instrument(span).await
    }

    async fn pull_in_span(&self, reference: &str) -> Result<PulledImage, PullError> {
        let started = Instant::now();
        let t = Arc::new(Target::parse(reference)?);
        let store = &self.inner.store;
        let mut hold = store.hold(&t.digest);
        let invalid = |what: &str| {
            let what = what.to_string();
            let reference = t.reference.clone();
            move |reason: String| PullError::InvalidImage {
                reference,
                what,
                reason,
            }
        };

        hold.pin(Content::Blob(t.digest.clone()));
        let top = self.manifest(&t, &t.digest).await?;
        let mut blobs = vec![sized(&t.digest, top.len())];
        let (manifest_digest, config_desc, layers) =
            match manifest::parse_manifest(&top).map_err(invalid("the manifest"))? {
                Manifest::Image { config, layers } => (t.digest.clone(), config, layers),
                Manifest::Index(Err(available)) => {
                    let (os, arch) = node_platform();
                    return Err(PullError::NoPlatform {
                        reference: t.reference.clone(),
                        wanted: format!("{os}/{arch}"),
                        available,
                    });
                }
                Manifest::Index(Ok(digest)) => {
                    check_digest(&digest).map_err(invalid("the index"))?;
                    hold.pin(Content::Blob(digest.clone()));
                    let bytes = self.manifest(&t, &digest).await?;
                    blobs.push(sized(&digest, bytes.len()));
                    match manifest::parse_manifest(&bytes)
                        .map_err(invalid("the platform's manifest"))?
                    {
                        Manifest::Image { config, layers } => (digest, config, layers),
                        Manifest::Index(_) => {
                            return Err(invalid("the index")("it names another index".into()));
                        }
                    }
                }
            };
        if wasm::is_wasm(&config_desc, &layers) {
            return Err(PullError::NotImage {
                reference: t.reference.clone(),
            });
        }
        check_digest(&config_desc.digest).map_err(invalid("the manifest's config"))?;
        let mut compressions = Vec::with_capacity(layers.len());
        for layer in &layers {
            check_digest(&layer.digest).map_err(invalid("a layer"))?;
            let compression = Compression::for_media_type(&layer.media_type).ok_or_else(|| {
                invalid(&format!("layer {}", layer.digest))(format!(
                    "media type {:?} is not a tar layer (plain, gzip or zstd)",
                    layer.media_type
                ))
            })?;
            compressions.push(compression);
        }

        if config_desc.size > MAX_CONFIG_BYTES {
            return Err(invalid("the image config")(format!(
                "it is {} bytes; the node reads configs of at most {MAX_CONFIG_BYTES}",
                config_desc.size
            )));
        }
        hold.pin(Content::Blob(config_desc.digest.clone()));
        let config_bytes = self.config(&t, &config_desc).await?;
        blobs.push(sized(&config_desc.digest, config_bytes.len()));
        let config = manifest::parse_config(&config_bytes).map_err(invalid("the image config"))?;
        let (os, arch) = node_platform();
        if (!config.os.is_empty() && config.os != os)
            || (!config.architecture.is_empty() && config.architecture != arch)
        {
            return Err(PullError::WrongPlatform {
                reference: t.reference.clone(),
                found: format!("{}/{}", config.os, config.architecture),
                wanted: format!("{os}/{arch}"),
            });
        }
        if config.diff_ids.len() != layers.len() {
            return Err(invalid("the image config")(format!(
                "it lists {} diff_ids for {} layers",
                config.diff_ids.len(),
                layers.len()
            )));
        }

        for layer in &layers {
            hold.pin(Content::Layer(layer.digest.clone()));
        }
        let jobs = layers.iter().zip(&config.diff_ids).zip(compressions).map(
            |((desc, diff_id), compression)| {
                let job = self
                    .clone()
                    .layer(t.clone(), desc.clone(), diff_id.clone(), compression);
                let span = tracing::info_span!("layer", digest = %desc.digest);
                async move {
                    // Spawned: a started download finishes (and lands in the
                    // store) even if this pull is dropped.
                    tokio::spawn(job.instrument(span)).await.map_err(joined)?
                }
            },
        );
        // Collected first: a lazy map over borrowed iterators makes this
        // future fail the higher-ranked `Send` check when a spawned task
        // awaits `pull` (rust-lang/rust#102211).
        let jobs: Vec<_> = jobs.collect();
        let layer_sizes: Vec<u64> = stream::iter(jobs)
            .buffered(self.inner.max_concurrent_layers)
            .try_collect()
            .await?;

        let layer_entries: Vec<Sized> = layers
            .iter()
            .zip(&layer_sizes)
            .map(|(l, size)| Sized {
                digest: l.digest.clone(),
                size: *size,
            })
            .collect();
        let size = blobs.iter().chain(&layer_entries).map(|s| s.size).sum();
        let record = ImageRecord {
            digest: t.digest.clone(),
            reference: t.reference.clone(),
            manifest: manifest_digest.clone(),
            config: config_desc.digest.clone(),
            blobs,
            layers: layer_entries,
            last_used: store.state().stamp(),
            size,
        };
        self.blocking(move |s| s.save_record(record)).await?;
        drop(hold);
        tracing::info!(
            digest = %t.digest,
            layers = layers.len(),
            bytes = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image pulled"
        );
        Ok(PulledImage {
            digest: t.digest.clone(),
            manifest: manifest_digest,
            config: config.run,
            layers: layers
                .iter()
                .map(|l| store.path(&Content::Layer(l.digest.clone())))
                .collect(),
            size,
        })
    }

    /// A manifest or index by digest: from the store, else the registry.
    async fn manifest(&self, t: &Target, digest: &str) -> Result<Vec<u8>, PullError> {
        let d = digest.to_string();
        if let Some(bytes) = self.blocking(move |s| s.read_blob(&d)).await? {
            return Ok(bytes);
        }
        let _producing = self
            .inner
            .store
            .produce(&Content::Blob(digest.into()))
            .await;
        let d = digest.to_string();
        if let Some(bytes) = self.blocking(move |s| s.read_blob(&d)).await? {
            return Ok(bytes);
        }
        let bytes = self.inner.registries.manifest(t, digest).await?;
        let (d, b) = (digest.to_string(), bytes.clone());
        self.blocking(move |s| s.write_blob(&d, &b)).await?;
        Ok(bytes)
    }

    /// The image config blob: from the store, else the registry.
    async fn config(&self, t: &Target, desc: &Descriptor) -> Result<Vec<u8>, PullError> {
        let d = desc.digest.clone();
        if let Some(bytes) = self.blocking(move |s| s.read_blob(&d)).await? {
            return Ok(bytes);
        }
        let c = Content::Blob(desc.digest.clone());
        let _producing = self.inner.store.produce(&c).await;
        let d = desc.digest.clone();
        if let Some(bytes) = self.blocking(move |s| s.read_blob(&d)).await? {
            return Ok(bytes);
        }
        let tmp = self.inner.store.temp();
        self.inner
            .registries
            .blob_to_file(t, desc, "config", &tmp.0)
            .await?;
        let size = desc.size;
        self.blocking(move |s| {
            let bytes = std::fs::read(&tmp.0).map_err(PullError::io("reading", &tmp.0))?;
            s.commit(c, &tmp, size)?;
            Ok(bytes)
        })
        .await
    }

    /// Makes sure layer `desc` is unpacked in the store; returns its size.
    async fn layer(
        self,
        t: Arc<Target>,
        desc: Descriptor,
        diff_id: String,
        compression: Compression,
    ) -> Result<u64, PullError> {
        let store = &self.inner.store;
        let c = Content::Layer(desc.digest.clone());
        if let Some(size) = store.present(&c) {
            return Ok(size);
        }
        let _producing = store.produce(&c).await;
        if let Some(size) = store.present(&c) {
            tracing::debug!("unpacked by a concurrent pull");
            return Ok(size);
        }
        // The download streams into the unpacker (off the runtime); the
        // layer is committed only once both the blob's digest and the
        // uncompressed diff_id are checked.
        let started = Instant::now();
        let mut blob = self.inner.registries.blob(&t, &desc, "layer").await?;
        let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
        let dir = store.temp();
        let dest = dir.0.clone();
        let unpacking = tokio::task::spawn_blocking(move || {
            unpack::unpack(unpack::Chunks::new(rx), compression, &dest, &diff_id)
        });
        let downloaded = loop {
            match blob.chunk().await {
                // Once the unpacker has stopped (its error says why), the
                // rest is still read: a blob altered in transit must be
                // reported as such, not as a broken layer.
                Ok(Some(chunk)) => {
                    if !tx.is_closed() {
                        let _ = tx.send(Ok(chunk)).await;
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other("download failed"))).await;
                    break Err(e);
                }
            }
        };
        drop(tx);
        let unpacked = unpacking.await.map_err(joined)?;
        let result = match (downloaded, unpacked) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(layer_error(&t.reference, &desc.digest, e)),
            (Ok(()), Ok(size)) => Ok(size),
        };
        let digest = desc.digest.clone();
        // Off the runtime: on failure, dropping `dir` deletes a partial tree.
        let size = self
            .blocking(move |s| {
                let size = result?;
                s.commit(Content::Layer(digest), &dir, size)?;
                Ok(size)
            })
            .await?;
        tracing::info!(
            bytes = desc.size,
            unpacked = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer pulled"
        );
        Ok(size)
    }

    /// Removes images not in `in_use` (by [`PulledImage::digest`]), least
    /// recently pulled first, until the store is within its budget; and
    /// content no image references, always. Images in use, and anything a
    /// pull in flight relies on, stay even if the budget cannot be met.
    pub async fn gc(&self, in_use: &[String]) -> Result<GcReport, PullError> {
        let _one_at_a_time = self.inner.gc.lock().await;
        let in_use: HashSet<&str> = in_use.iter().map(String::as_str).collect();
        let budget = self.inner.budget;
        let (images, trash, freed) = self.inner.store.collect(&in_use, budget)?;
        // Deleting trees can take a while: off the runtime.
        self.blocking(move |_| {
            drop(trash);
            Ok(())
        })
        .await?;
        let report = GcReport {
            removed_images: images,
            freed_bytes: freed,
            usage_bytes: self.disk_usage(),
            budget_bytes: budget,
        };
        if report.freed_bytes > 0 {
            tracing::info!(
                removed = report.removed_images.len(),
                freed = report.freed_bytes,
                usage = report.usage_bytes,
                budget,
                "image store garbage-collected"
            );
        }
        if report.over_budget() {
            tracing::warn!(
                usage = report.usage_bytes,
                budget,
                "images in use exceed the image store's budget"
            );
        }
        Ok(report)
    }

    /// Runs `f` on the store off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, PullError> + Send + 'static,
    ) -> Result<T, PullError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner.store))
            .await
            .map_err(joined)?
    }
}

/// Image configs are read into memory: a bound on what a registry can make
/// the node allocate.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Chunks of a layer download queued for its unpacker.
const CHUNKS_IN_FLIGHT: usize = 64;

fn layer_error(reference: &str, digest: &str, e: unpack::UnpackError) -> PullError {
    match e {
        unpack::UnpackError::DiffId { expected, actual } => PullError::DigestMismatch {
            reference: reference.into(),
            what: format!("the uncompressed content (diff_id) of layer {digest}"),
            expected,
            actual,
        },
        other => PullError::Layer {
            reference: reference.into(),
            layer: digest.into(),
            reason: other.to_string(),
        },
    }
}

fn sized(digest: &str, len: usize) -> Sized {
    Sized {
        digest: digest.into(),
        size: len as u64,
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    match digest_hex(digest) {
        Some(_) => Ok(()),
        None => Err(format!(
            "digest {digest:?} is not sha256:<64 lowercase hex digits>"
        )),
    }
}

/// A task that did not finish: a panic is passed on; a cancelled task
/// means the runtime is shutting down.
fn joined(e: tokio::task::JoinError) -> PullError {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    PullError::Io {
        what: "a task was cancelled (the runtime is shutting down) while working in".into(),
        path: PathBuf::from("the image store"),
        source: std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers spawn pulls and GCs: their futures must be `Send` (checked
    /// at compile time, as `tokio::spawn` checks them).
    #[test]
    fn futures_are_send() {
        fn spawnable<F: Future + Send + 'static>(_: F) {}
        fn check(store: ImageStore) {
            spawnable(async move {
                let reference = String::from("r");
                let _ = store.pull(&reference).await;
                let _ = store.gc(&[reference]).await;
            });
        }
        let _ = check;
    }
}
