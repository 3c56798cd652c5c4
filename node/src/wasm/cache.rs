//! Compiled code on disk, `<data>/wasm/cache/`.
//!
//! One file per artifact digest and engine: `<digest>-<engine>.cwasm`,
//! where `<engine>` hashes [`Engine::precompile_compatibility_hash`] (the
//! wasmtime version, the compiler's settings and the engine's tunables),
//! so code compiled by another wasmtime or for another configuration is
//! never loaded; it is simply not found. Files are written whole (a
//! temporary file renamed into place), by the node only, in a directory
//! only root may enter (0700). Loaded code maps its file: a file must be
//! replaced (renamed over) or removed, never rewritten in place, or the
//! programs using it crash (`SIGBUS`).

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Module, Precompiled};

use super::WasmError;

/// Compiled code, as loaded or compiled.
#[derive(Clone)]
pub(crate) enum Code {
    Module(Module),
    Component(Component),
}

/// The cache directory for one engine.
#[derive(Debug)]
pub(crate) struct Cache {
    dir: PathBuf,
    /// Hex of the hash of the engine's compatibility hash.
    engine_hash: String,
}

/// A [`Hasher`] over SHA-256: stable across Rust releases (unlike the
/// standard library's), so cache names survive a toolchain upgrade.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }
}

impl Cache {
    /// Opens (creating it, 0700) the cache directory `dir` for `engine`.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Cache, WasmError> {
        let err = |cause: String| WasmError::Cache {
            path: dir.to_path_buf(),
            cause,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(format!("cannot create it: {e}")))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| err(format!("cannot make it private (0700): {e}")))?;
        let mut h = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = hex::encode(&h.0.finalize()[..8]);
        Ok(Cache {
            dir: dir.to_path_buf(),
            engine_hash,
        })
    }

    /// Where code compiled from the artifact `digest` is kept.
    pub(crate) fn path(&self, digest: &str) -> Result<PathBuf, WasmError> {
        let ok = !digest.is_empty()
            && digest.len() <= 200
            && digest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.'))
            && !digest.starts_with('.');
        if !ok {
            return Err(WasmError::Invalid {
                what: format!("artifact digest {digest:?}"),
                cause: "a content digest is `algorithm:hex` (like `sha256:…`)".into(),
            });
        }
        let name = format!("{}-{}.cwasm", digest.replace(':', "_"), self.engine_hash);
        Ok(self.dir.join(name))
    }

    /// The code cached at `path`, if there is usable code there. A file
    /// that is not code this engine can load is reported and ignored (the
    /// caller compiles again and replaces it).
    pub(crate) fn read(engine: &Engine, path: &Path) -> Option<Code> {
        let kind = match Engine::detect_precompiled_file(path) {
            Ok(Some(kind)) => kind,
            Ok(None) => {
                tracing::warn!(path = %path.display(), "the compiled-code cache file is not compiled wasm; compiling again");
                return None;
            }
            Err(e) if is_not_found(&e) => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read the compiled-code cache file ({e:#}); compiling again");
                return None;
            }
        };
        // The safety argument for both: deserializing trusts the file to be
        // code wasmtime compiled. The node wrote this file itself (compiled
        // by this engine, serialized, written to a temporary file and
        // renamed into place, never modified afterwards) in a directory
        // owned by root and private to it (0700): no one else could have
        // put or changed code there. The file name includes the engine's
        // compatibility hash, and wasmtime checks the header and the
        // engine's settings again, rejecting code from another version.
        let loaded = match kind {
            Precompiled::Module => {
                // SAFETY: the node wrote this file in its private cache dir
                // (see above).
                unsafe { Module::deserialize_file(engine, path) }.map(Code::Module)
            }
            Precompiled::Component => {
                // SAFETY: the node wrote this file in its private cache dir
                // (see above).
                unsafe { Component::deserialize_file(engine, path) }.map(Code::Component)
            }
        };
        match loaded {
            Ok(code) => Some(code),
            Err(e) => {
                tracing::warn!(path = %path.display(), "the compiled-code cache file cannot be loaded ({e:#}); compiling again");
                None
            }
        }
    }

    /// Writes `bytes` (serialized code) to `path` atomically.
    pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), WasmError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let err = |cause: String| WasmError::Cache {
            path: path.to_path_buf(),
            cause,
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("code");
        let tmp = path.with_file_name(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err(format!("cannot write compiled code: {e}")));
        }
        Ok(())
    }
}

fn is_not_found(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}
