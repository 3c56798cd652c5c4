//! The node's identity: its private key (made here, never sent anywhere),
//! the certificate the cluster CA signed for it, the CA certificate, and
//! what the control plane assigned at join (ID, name, instance prefix).
//! Kept in `<data dir>/identity/`, the key readable only by root.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// What the control plane assigned at join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub node_id: String,
    pub name: String,
    pub instance_prefix: String,
    /// The cluster endpoint joined through, dialled again on restart.
    pub server: String,
}

/// A joined node's credentials.
#[derive(Clone)]
pub struct Identity {
    pub assigned: Assigned,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

/// Why the identity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the node identity in {0} is damaged; move the directory away and join again with a new token"
    )]
    Damaged(PathBuf),
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

impl Identity {
    /// The identity saved in `data_dir`, if the node joined before.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let dir = dir(data_dir);
        let assigned_path = dir.join("node.json");
        let text = match std::fs::read_to_string(&assigned_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IdentityError::Io {
                    what: "reading",
                    path: assigned_path,
                    source,
                });
            }
        };
        let damaged = || IdentityError::Damaged(dir.clone());
        let assigned: Assigned = serde_json::from_str(&text).map_err(|_| damaged())?;
        let ca = CertificateDer::from_pem_file(dir.join("ca.crt")).map_err(|_| damaged())?;
        let cert = CertificateDer::from_pem_file(dir.join("node.crt")).map_err(|_| damaged())?;
        let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).map_err(|_| damaged())?;
        Ok(Some(Identity {
            assigned,
            ca,
            cert,
            key: Arc::new(key),
        }))
    }

    /// Saves a new identity; `node.json` last, so a half-written identity
    /// is never mistaken for a whole one.
    pub fn save(
        data_dir: &Path,
        assigned: Assigned,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<Identity, IdentityError> {
        let dir = dir(data_dir);
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { what, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        write_private(&dir.join("node.key"), key_pem)
            .map_err(io("writing", &dir.join("node.key")))?;
        for (name, text) in [("node.crt", cert_pem), ("ca.crt", ca_pem)] {
            write_durably(&dir.join(name), text.as_bytes(), 0o644)
                .map_err(io("writing", &dir.join(name)))?;
        }
        let json = serde_json::to_string_pretty(&assigned).expect("identity serialises");
        let path = dir.join("node.json");
        write_durably(&path, json.as_bytes(), 0o644).map_err(io("writing", &path))?;
        Identity::load(data_dir)?.ok_or(IdentityError::Damaged(dir))
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    write_durably(path, text.as_bytes(), 0o600)
}

/// Replaces `path` with `bytes` so that a crash or power loss leaves the old
/// content or the new, never a mix: a temp file with `mode`, synced,
/// renamed over `path`, then the directory synced.
pub(crate) fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
