//! Verge's example workload images: build them, package them as OCI images,
//! push them to a registry.
//!
//! This crate owns:
//! - building a workload binary statically with cargo ([`build_static`]) and
//!   checking that the result really is static ([`ensure_static`]), so it runs
//!   in an otherwise empty root filesystem;
//! - turning files into a deterministic OCI image: one gzip'd tar layer
//!   ([`Layer`]), the image config and the image manifest ([`Image`]);
//! - pushing an image to a registry with `oci-client` ([`push`]), reaching
//!   loopback registries over plain HTTP ([`client_for`]);
//! - unpacking a layer ([`unpack_layer`]), for tests and tools;
//! - the WebAssembly examples under `images/wasm/` ([`wasm_example`]), the
//!   Rust one built for `wasm32-wasip1` ([`build_rust_wasm`]), and packaging
//!   wasm as an OCI wasm artifact ([`WasmArtifact`], [`push_wasm`]).
//!
//! It must not: run workloads, pull images for nodes (that is the node's
//! job), hold registry credentials, or talk to the control plane. It is a
//! build-and-publish tool, used by `verge-images` and by the end-to-end tests.

mod build;
mod elf;
mod hello;
mod layer;
mod oci;
mod push;
mod wasm;

pub use build::{build_static, host_triple};
pub use elf::ensure_static;
pub use hello::{HELLO_BIN, HELLO_PACKAGE, HELLO_PORT, build_hello, debug_image, hello_image};
pub use layer::{File, Layer, diff_id, unpack_layer};
pub use oci::{Image, ImageConfig};
pub use push::{client_for, install_crypto_provider, is_loopback_registry, push, push_with_auth};
pub use wasm::{
    RUST_WASM_EXAMPLE, RUST_WASM_PACKAGE, WASM_AUTHOR, WASM_CONFIG_MEDIA_TYPE, WASM_CREATED,
    WASM_EXAMPLES, WASM_LAYER_MEDIA_TYPE, WASM_TARGET, WasmArtifact, WasmKind, build_rust_wasm,
    push_wasm, wasm_example, wasm_example_source, wasm_from_wat, wasm_target_installed,
};

use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What failed while building, packaging or pushing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper program (cargo, rustc) could not be run at all.
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// `rustc -vV` did not say which host it runs on.
    #[error("could not find the host triple in `rustc -vV` output")]
    NoHostTriple,
    /// `cargo build` exited with an error.
    #[error("cargo build of {package} failed ({status}); end of its output:\n{stderr_tail}")]
    BuildFailed {
        package: String,
        status: std::process::ExitStatus,
        stderr_tail: String,
    },
    /// `cargo build` succeeded but did not report the expected executable.
    #[error("cargo build of {package} reported no executable named {bin}")]
    NoExecutable { package: String, bin: String },
    /// The built binary needs a dynamic loader, so it cannot run in an empty rootfs.
    #[error("{} is not statically linked: {reason}", path.display())]
    NotStatic { path: PathBuf, reason: String },
    /// A file given to the layer builder has an unusable path.
    #[error("invalid path in image {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    /// Reading or writing local files (the binary, the layer, an unpack target).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Encoding the image config or manifest as JSON.
    #[error("encoding {what} as JSON: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    /// The image reference could not be parsed.
    #[error("invalid image reference {reference:?}: {source}")]
    InvalidReference {
        reference: String,
        source: oci_client::ParseError,
    },
    /// The registry refused the image, or could not be reached.
    #[error("push to {reference} failed: {source}")]
    Push {
        reference: String,
        source: oci_client::errors::OciDistributionError,
    },
    /// WebAssembly text that does not compile.
    #[error("invalid WebAssembly text: {message}")]
    Wat { message: String },
    /// Bytes that are not a valid wasm module or component.
    #[error("invalid wasm: {reason}")]
    InvalidWasm { reason: String },
    /// [`wasm_example`] was asked for an example it does not have.
    #[error("no wasm example named {name:?} (there are: {})", WASM_EXAMPLES.join(", "))]
    UnknownWasmExample { name: String },
    /// The registry stored the manifest under another digest than ours.
    #[error(
        "push to {reference}: registry stored the manifest as {location}, expected digest {expected}"
    )]
    DigestMismatch {
        reference: String,
        location: String,
        expected: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// `sha256:<hex>` of `bytes`, the OCI digest form.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
