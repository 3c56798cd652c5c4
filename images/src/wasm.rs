//! WebAssembly workloads: the examples under `images/wasm/`, and packaging
//! wasm as an OCI artifact.
//!
//! The artifact follows the CNCF TAG Runtime "Wasm OCI Artifact" layout: an
//! OCI image manifest (`application/vnd.oci.image.manifest.v1+json`) whose
//! config blob has media type [`WASM_CONFIG_MEDIA_TYPE`] and whose one layer
//! is the raw `.wasm` with media type [`WASM_LAYER_MEDIA_TYPE`]. The config:
//!
//! ```json
//! {"architecture":"wasm","author":"verge-images",
//!  "component":{"exports":["wasi:cli/run@0.2.12"],"imports":["wasi:io/error@0.2.12", ...]},
//!  "created":"1970-01-01T00:00:00Z","layerDigests":["sha256:..."],"os":"wasip2"}
//! ```
//!
//! `os` is `wasip2` for a component and `wasip1` for a core module;
//! `component` (its top-level import and export names, in order) is only
//! there for components. `created` is fixed, and the JSON canonical (keys
//! sorted, no whitespace), so the same wasm always gives the same digest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use serde_json::json;

use crate::oci::canonical_json;
use crate::push::push_blobs_and_manifest;
use crate::{Error, Result, sha256_digest};

/// Media type of a wasm artifact's config blob.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Media type of a wasm artifact's layer: the raw `.wasm`.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// `author` in the artifact config.
pub const WASM_AUTHOR: &str = "verge-images";
/// `created` in the artifact config: fixed, for reproducible digests.
pub const WASM_CREATED: &str = "1970-01-01T00:00:00Z";

/// The WebAssembly text examples, by name (`images/wasm/NAME.wat`).
const WAT_EXAMPLES: &[(&str, &str)] = &[
    ("echo", include_str!("../wasm/echo.wat")),
    ("tcp-echo", include_str!("../wasm/tcp-echo.wat")),
    ("memhog", include_str!("../wasm/memhog.wat")),
    ("spin", include_str!("../wasm/spin.wat")),
    ("crash", include_str!("../wasm/crash.wat")),
];

/// Names of the examples [`wasm_example`] compiles, in the order of
/// `images/README.md`.
pub const WASM_EXAMPLES: &[&str] = &["echo", "tcp-echo", "memhog", "spin", "crash"];

/// The example built from Rust ([`build_rust_wasm`]), not from text.
pub const RUST_WASM_EXAMPLE: &str = "rust-echo";
/// Cargo package (and binary) of [`RUST_WASM_EXAMPLE`].
pub const RUST_WASM_PACKAGE: &str = "verge-wasm-echo";
/// The target [`build_rust_wasm`] builds for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// What a `.wasm` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module: WASI preview 1, run by its `_start`.
    Module,
    /// A component: WASI preview 2, run by its `wasi:cli/run` export.
    Component,
}

impl WasmKind {
    /// Reads the kind from the preamble: `\0asm`, then version 1 for a core
    /// module or the component encoding (`0x0d 0x00`, layer `0x01 0x00`).
    pub fn detect(wasm: &[u8]) -> Result<WasmKind> {
        let invalid = |reason: &str| Error::InvalidWasm {
            reason: reason.into(),
        };
        let Some(header) = wasm.get(..8) else {
            return Err(invalid("shorter than the 8-byte wasm preamble"));
        };
        if &header[..4] != b"\0asm" {
            return Err(invalid("does not start with the wasm magic \\0asm"));
        }
        match &header[4..8] {
            [1, 0, 0, 0] => Ok(WasmKind::Module),
            [_, _, 1, 0] => Ok(WasmKind::Component),
            other => Err(Error::InvalidWasm {
                reason: format!("unknown wasm version/layer {other:02x?}"),
            }),
        }
    }

    /// The artifact config's `os`: `wasip1` or `wasip2`.
    pub fn os(self) -> &'static str {
        match self {
            WasmKind::Module => "wasip1",
            WasmKind::Component => "wasip2",
        }
    }
}

/// A wasm OCI artifact, ready to push.
#[derive(Clone)]
pub struct WasmArtifact {
    /// The `.wasm`: the one layer.
    pub wasm: Vec<u8>,
    pub kind: WasmKind,
    /// `sha256:` of `wasm`.
    pub layer_digest: String,
    /// The config blob ([`WASM_CONFIG_MEDIA_TYPE`]).
    pub config: Config,
    pub manifest: OciImageManifest,
    /// The exact manifest bytes pushed; `digest` is their sha256.
    pub manifest_json: Vec<u8>,
    /// `sha256:` of `manifest_json`: the digest to pin the artifact by.
    pub digest: String,
}

impl std::fmt::Debug for WasmArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmArtifact")
            .field("kind", &self.kind)
            .field("wasm_len", &self.wasm.len())
            .field("layer_digest", &self.layer_digest)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl WasmArtifact {
    /// Validates `wasm` and builds its config and manifest.
    pub fn build(wasm: Vec<u8>) -> Result<WasmArtifact> {
        let kind = WasmKind::detect(&wasm)?;
        validate(&wasm)?;
        let layer_digest = sha256_digest(&wasm);
        let mut config = json!({
            "created": WASM_CREATED,
            "author": WASM_AUTHOR,
            "architecture": "wasm",
            "os": kind.os(),
            "layerDigests": [layer_digest],
        });
        if kind == WasmKind::Component {
            let (imports, exports) = component_names(&wasm)?;
            config["component"] = json!({ "imports": imports, "exports": exports });
        }
        let config = Config::new(
            canonical_json(&config, "the wasm artifact config")?,
            WASM_CONFIG_MEDIA_TYPE.into(),
            None,
        );
        let layer = ImageLayer::new(wasm, WASM_LAYER_MEDIA_TYPE.into(), None);
        let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
        manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.into());
        let manifest_json = canonical_json(&manifest, "the wasm artifact manifest")?;
        Ok(WasmArtifact {
            wasm: layer.data.to_vec(),
            kind,
            layer_digest,
            config,
            manifest,
            manifest_json: manifest_json.clone(),
            digest: sha256_digest(&manifest_json),
        })
    }

    /// Pushes the artifact (layer, config, then manifest) to `reference`
    /// and returns the manifest digest `sha256:...`.
    pub async fn push(&self, reference: &str, auth: &RegistryAuth) -> Result<String> {
        let blobs = [
            (self.layer_digest.as_str(), self.wasm.clone()),
            (
                self.manifest.config.digest.as_str(),
                self.config.data.to_vec(),
            ),
        ];
        push_blobs_and_manifest(reference, auth, &blobs, &self.manifest_json, &self.digest).await
    }
}

/// Checks that `wasm` is a valid module or component (wasmparser's default
/// features, which include the component model).
fn validate(wasm: &[u8]) -> Result<()> {
    wasmparser::Validator::new()
        .validate_all(wasm)
        .map(drop)
        .map_err(|e| Error::InvalidWasm {
            reason: e.to_string(),
        })
}

/// The top-level import and export names of a component, in order.
fn component_names(wasm: &[u8]) -> Result<(Vec<String>, Vec<String>)> {
    use wasmparser::{Parser, Payload};
    let invalid = |e: wasmparser::BinaryReaderError| Error::InvalidWasm {
        reason: e.to_string(),
    };
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    // Nested modules and components come as payloads too: count the depth.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 0 => {
                for import in section {
                    imports.push(import.map_err(invalid)?.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(section) if depth == 0 => {
                for export in section {
                    exports.push(export.map_err(invalid)?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

/// Compiles WebAssembly text (a module or a component) to binary.
pub fn wasm_from_wat(text: &str) -> Result<Vec<u8>> {
    wat::parse_str(text).map_err(|e| Error::Wat {
        message: e.to_string(),
    })
}

/// The text of the example `name` (one of [`WASM_EXAMPLES`]).
pub fn wasm_example_source(name: &str) -> Option<&'static str> {
    WAT_EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// The compiled bytes of the example `name` (one of [`WASM_EXAMPLES`]).
/// [`RUST_WASM_EXAMPLE`] is built with cargo instead: [`build_rust_wasm`].
pub fn wasm_example(name: &str) -> Result<Vec<u8>> {
    let text =
        wasm_example_source(name).ok_or_else(|| Error::UnknownWasmExample { name: name.into() })?;
    wasm_from_wat(text).map_err(|e| match e {
        Error::Wat { message } => Error::Wat {
            message: format!("images/wasm/{name}.wat: {message}"),
        },
        other => other,
    })
}

/// Packages `wasm` as an artifact ([`WasmArtifact::build`]) and pushes it
/// anonymously to `reference`, e.g. `127.0.0.1:5000/echo-wasm:1`. Returns
/// the manifest digest `sha256:...`; pin it as `REFERENCE@DIGEST`.
pub async fn push_wasm(wasm: &[u8], reference: &str) -> Result<String> {
    WasmArtifact::build(wasm.to_vec())?
        .push(reference, &RegistryAuth::Anonymous)
        .await
}

/// Whether rustc has the standard library for [`WASM_TARGET`]: its target
/// libdir (`rustc --print target-libdir --target wasm32-wasip1`, honouring
/// `$RUSTC`) holds a `libstd-*.rlib`.
pub fn wasm_target_installed() -> Result<bool> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: rustc,
            source,
        })?;
    if !out.status.success() {
        return Ok(false);
    }
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let Ok(entries) = std::fs::read_dir(&libdir) else {
        return Ok(false);
    };
    Ok(entries.filter_map(|e| e.ok()).any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with("libstd-") && name.ends_with(".rlib")
    }))
}

/// Builds the Rust example ([`RUST_WASM_PACKAGE`]) for `wasm32-wasip1` in
/// release mode from the workspace at `workspace_root` and returns its
/// `.wasm`; or, when that target is not installed, prints on stderr that it
/// skipped it and returns `Ok(None)`.
pub fn build_rust_wasm(workspace_root: &Path) -> Result<Option<PathBuf>> {
    if !wasm_target_installed()? {
        eprintln!(
            "skipped the Rust wasm example: the {WASM_TARGET} target is not installed \
             (rustup target add {WASM_TARGET})"
        );
        return Ok(None);
    }
    crate::build::cargo_build(
        workspace_root,
        RUST_WASM_PACKAGE,
        RUST_WASM_PACKAGE,
        WASM_TARGET,
        None,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_example_compiles_and_has_the_expected_kind() {
        assert_eq!(
            WASM_EXAMPLES,
            WAT_EXAMPLES.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
        for name in WASM_EXAMPLES {
            let wasm = wasm_example(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = if *name == "tcp-echo" {
                WasmKind::Component
            } else {
                WasmKind::Module
            };
            assert_eq!(WasmKind::detect(&wasm).unwrap(), want, "{name}");
            validate(&wasm).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_example_and_bad_text_are_errors() {
        assert!(matches!(
            wasm_example("nope"),
            Err(Error::UnknownWasmExample { .. })
        ));
        let err = wasm_from_wat("(module (func (export \"f\") (i32.nope)))").unwrap_err();
        assert!(matches!(err, Error::Wat { .. }), "{err}");
        let err = WasmArtifact::build(b"not wasm at all".to_vec()).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        // Well-formed header, invalid body.
        let mut broken = wasm_example("echo").unwrap();
        broken.truncate(broken.len() - 3);
        assert!(matches!(
            WasmArtifact::build(broken),
            Err(Error::InvalidWasm { .. })
        ));
    }

    #[test]
    fn module_artifact_has_the_cncf_layout() {
        let wasm = wasm_example("echo").unwrap();
        let artifact = WasmArtifact::build(wasm.clone()).unwrap();
        assert_eq!(artifact.kind, WasmKind::Module);

        let manifest: Value = serde_json::from_slice(&artifact.manifest_json).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], OCI_IMAGE_MEDIA_TYPE);
        assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG_MEDIA_TYPE);
        assert_eq!(
            manifest["config"]["digest"],
            sha256_digest(&artifact.config.data).as_str()
        );
        assert_eq!(manifest["config"]["size"], artifact.config.data.len());
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], WASM_LAYER_MEDIA_TYPE);
        assert_eq!(layers[0]["digest"], sha256_digest(&wasm).as_str());
        assert_eq!(layers[0]["size"], wasm.len());
        assert_eq!(artifact.digest, sha256_digest(&artifact.manifest_json));

        let config: Value = serde_json::from_slice(&artifact.config.data).unwrap();
        assert_eq!(
            config,
            json!({
                "created": "1970-01-01T00:00:00Z",
                "author": "verge-images",
                "architecture": "wasm",
                "os": "wasip1",
                "layerDigests": [sha256_digest(&wasm)],
            })
        );
        // Canonical: sorted keys, no whitespace.
        let text = String::from_utf8(artifact.config.data.to_vec()).unwrap();
        assert!(text.starts_with(r#"{"architecture":"wasm","author":"verge-images","#));
    }

    #[test]
    fn component_artifact_lists_its_imports_and_exports() {
        let artifact = WasmArtifact::build(wasm_example("tcp-echo").unwrap()).unwrap();
        assert_eq!(artifact.kind, WasmKind::Component);
        let config: Value = serde_json::from_slice(&artifact.config.data).unwrap();
        assert_eq!(config["os"], "wasip2");
        assert_eq!(
            config["component"]["exports"],
            json!(["wasi:cli/run@0.2.12"])
        );
        let imports: Vec<&str> = config["component"]["imports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(imports.contains(&"wasi:sockets/tcp@0.2.12"), "{imports:?}");
        assert!(
            imports.contains(&"wasi:cli/environment@0.2.12"),
            "{imports:?}"
        );
        // Only top-level names: not the core modules' `libc`/`wasi` imports.
        assert!(
            imports.iter().all(|i| i.starts_with("wasi:")),
            "{imports:?}"
        );
    }

    #[test]
    fn artifact_digest_is_deterministic() {
        let first = WasmArtifact::build(wasm_example("tcp-echo").unwrap()).unwrap();
        for _ in 0..5 {
            let again = WasmArtifact::build(wasm_example("tcp-echo").unwrap()).unwrap();
            assert_eq!(again.digest, first.digest);
            assert_eq!(again.manifest_json, first.manifest_json);
        }
        let other = WasmArtifact::build(wasm_example("spin").unwrap()).unwrap();
        assert_ne!(other.digest, first.digest);
    }

    #[test]
    fn detects_modules_and_components_from_the_preamble() {
        let module = wasm_from_wat("(module)").unwrap();
        let component = wasm_from_wat("(component)").unwrap();
        assert_eq!(WasmKind::detect(&module).unwrap(), WasmKind::Module);
        assert_eq!(WasmKind::detect(&component).unwrap(), WasmKind::Component);
        assert_eq!(WasmKind::Module.os(), "wasip1");
        assert_eq!(WasmKind::Component.os(), "wasip2");
        assert!(WasmKind::detect(b"\0asm").is_err());
        assert!(WasmKind::detect(b"\0asm\x02\0\0\0").is_err());
    }

    #[test]
    fn rust_example_is_skipped_without_the_target() {
        // This machine may or may not have wasm32-wasip1: either way the
        // answer must agree with the detection.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if wasm_target_installed().unwrap() {
            return; // building it is the end-to-end tests' business
        }
        assert_eq!(build_rust_wasm(&root).unwrap(), None);
    }
}
