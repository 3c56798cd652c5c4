//! Sealing secret bundles at rest.
//!
//! A bundle version's values (a JSON object) are encrypted with
//! ChaCha20-Poly1305 (ring's AEAD) under the cluster's data key, with a
//! random 96-bit nonce per version and the env, bundle and version as
//! associated data, so a sealed value cannot be moved to another row. Its
//! digest is an HMAC-SHA256 of the values under a key derived from the data
//! key: equal contents give equal digests, and the digest reveals nothing.
//!
//! The data key is 32 random bytes, hex-encoded, in `secrets.key` in the
//! data dir (created on first start, mode 0600) or in the file named by
//! `secrets_key_file`. Rotation: point `secrets_key_file` at a new key and
//! list the old file in `secrets_previous_key_files`; on start every version
//! sealed with a previous key is re-sealed with the new one, after which the
//! old file can go (docs/operations.md).
//!
//! Plain values exist only in memory while a request seals or merges them;
//! they are never logged, never in an event and never in an API answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest as _, Sha256};

use crate::store::{SecretVersionRow, Store, StoreError};

/// Why the keyring could not be loaded, or a value not opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "cannot read secrets key file {path}: {source}; set secrets_key_file to a readable file"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create secrets key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secrets key file {0} does not hold a key: expected 64 hex digits (32 bytes); \
         make one with `head -c 32 /dev/urandom | xxd -p -c 64`"
    )]
    BadKey(PathBuf),
    #[error(
        "secret bundle {bundle:?} v{version} was sealed with key {key_id}, which this control \
         plane does not have: add that key's file to secrets_previous_key_files"
    )]
    UnknownKey {
        bundle: String,
        version: i64,
        key_id: String,
    },
    #[error(
        "secret bundle {bundle:?} v{version} failed authentication: its sealed value was altered"
    )]
    Tampered { bundle: String, version: i64 },
    #[error(
        "this control plane's secrets key is {ours}, but the cluster's is {cluster}: every \
         replica must use the same secrets_key_file (to rotate, list the old key in \
         secrets_previous_key_files)"
    )]
    NotClusterKey { ours: String, cluster: String },
    #[error(
        "the cluster's sealed {name} cannot be opened with this control plane's keys: {why}; \
         every replica must use the same secrets_key_file"
    )]
    Fact { name: String, why: &'static str },
    #[error("re-sealing secrets with the current key failed: {0}")]
    Store(#[from] StoreError),
}

struct DataKey {
    id: String,
    aead: LessSafeKey,
    digest: hmac::Key,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({})", self.id)
    }
}

impl DataKey {
    fn from_bytes(bytes: &[u8; 32]) -> DataKey {
        let id = format!("k{}", &hex::encode(Sha256::digest(bytes))[..16]);
        let unbound =
            UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32 bytes is the key length");
        let mut derive = Sha256::new();
        derive.update(b"verge secret digest key\0");
        derive.update(bytes);
        DataKey {
            id,
            aead: LessSafeKey::new(unbound),
            digest: hmac::Key::new(hmac::HMAC_SHA256, &derive.finalize()),
        }
    }

    fn load(path: &Path) -> Result<DataKey, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SecretsError::BadKey(path.to_path_buf()))?;
        Ok(DataKey::from_bytes(&bytes))
    }
}

/// The sealed form of one bundle version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub nonce: String,
    pub ciphertext: String,
    pub digest: String,
}

/// The current data key and the previous ones still accepted for opening.
#[derive(Debug)]
pub struct Keyring {
    current: DataKey,
    previous: Vec<DataKey>,
    rng: SystemRandom,
}

impl Keyring {
    /// Loads the data key from `key_file`; when `create` and the file does
    /// not exist, makes a new random key there (mode 0600).
    pub fn load(
        key_file: &Path,
        create: bool,
        previous: &[PathBuf],
    ) -> Result<Keyring, SecretsError> {
        let rng = SystemRandom::new();
        if create && !key_file.exists() {
            let mut bytes = [0u8; 32];
            rng.fill(&mut bytes).expect("system randomness");
            write_new_key(key_file, &hex::encode(bytes)).map_err(|source| {
                SecretsError::Create {
                    path: key_file.to_path_buf(),
                    source,
                }
            })?;
        }
        Ok(Keyring {
            current: DataKey::load(key_file)?,
            previous: previous
                .iter()
                .map(|p| DataKey::load(p))
                .collect::<Result<_, _>>()?,
            rng,
        })
    }

    /// A keyring of one given key (tests).
    pub fn from_key(bytes: [u8; 32]) -> Keyring {
        Keyring {
            current: DataKey::from_bytes(&bytes),
            previous: Vec::new(),
            rng: SystemRandom::new(),
        }
    }

    /// The current key's ID, as stored with each sealed value.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// The digest of `values`, stable for equal contents under one key.
    pub fn digest(&self, values: &BTreeMap<String, String>) -> String {
        let plain = serde_json::to_vec(values).expect("a string map serialises");
        let tag = hmac::sign(&self.current.digest, &plain);
        format!("hmac-sha256:{}", hex::encode(tag.as_ref()))
    }

    /// Seals `values` for one version of one bundle of one env.
    pub fn seal(
        &self,
        env_id: &str,
        bundle: &str,
        version: i64,
        values: &BTreeMap<String, String>,
    ) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("system randomness");
        let mut data = serde_json::to_vec(values).expect("a string map serialises");
        self.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(env_id, bundle, version)),
                &mut data,
            )
            .expect("sealing into a Vec cannot fail");
        Sealed {
            key_id: self.current.id.clone(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(data),
            digest: self.digest(values),
        }
    }

    /// Opens a stored version: `Ok(None)` when it was deleted.
    pub fn open(
        &self,
        env_id: &str,
        row: &SecretVersionRow,
    ) -> Result<Option<BTreeMap<String, String>>, SecretsError> {
        let (Some(key_id), Some(nonce), Some(ciphertext)) =
            (&row.key_id, &row.nonce, &row.ciphertext)
        else {
            return Ok(None);
        };
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| &k.id == key_id)
            .ok_or_else(|| SecretsError::UnknownKey {
                bundle: row.bundle.clone(),
                version: row.version,
                key_id: key_id.clone(),
            })?;
        let tampered = || SecretsError::Tampered {
            bundle: row.bundle.clone(),
            version: row.version,
        };
        let nonce: [u8; NONCE_LEN] = hex::decode(nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(tampered)?;
        let mut data = hex::decode(ciphertext).map_err(|_| tampered())?;
        let plain = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(env_id, &row.bundle, row.version)),
                &mut data,
            )
            .map_err(|_| tampered())?;
        serde_json::from_slice(plain)
            .map(Some)
            .map_err(|_| tampered())
    }

    /// Makes this key the cluster's: the first start records its ID; later
    /// starts must have the recorded key as the current one, or among the
    /// previous ones (a rotation: every version is re-sealed, then the
    /// current key is recorded). Returns how many versions were re-sealed.
    /// So replicas with different keys refuse to start instead of sealing
    /// values the others cannot open.
    pub async fn adopt(&self, store: &Store) -> Result<usize, SecretsError> {
        const FACT: &str = "secrets_key_id";
        if store.claim_once(FACT, self.key_id()).await? {
            return self.rotate(store).await;
        }
        let cluster = store.cluster_fact(FACT).await?.unwrap_or_default();
        if cluster == self.key_id() {
            return self.rotate(store).await;
        }
        if !self.previous.iter().any(|k| k.id == cluster) {
            return Err(SecretsError::NotClusterKey {
                ours: self.key_id().to_string(),
                cluster,
            });
        }
        let resealed = self.rotate(store).await?;
        store.update_cluster_fact(FACT, self.key_id()).await?;
        Ok(resealed)
    }

    /// Re-seals with the current key every version sealed with a previous
    /// one; returns how many. A version sealed with an unknown key is an
    /// error: the control plane would not be able to deliver it.
    pub async fn rotate(&self, store: &Store) -> Result<usize, SecretsError> {
        let mut resealed = 0;
        for (env_id, row) in store.sealed_secrets().await? {
            if row.key_id.as_deref() == Some(self.key_id()) {
                continue;
            }
            let Some(values) = self.open(&env_id, &row)? else {
                continue;
            };
            let sealed = self.seal(&env_id, &row.bundle, row.version, &values);
            store
                .reseal_secret(
                    &env_id,
                    &row.bundle,
                    row.version,
                    &sealed.key_id,
                    &sealed.nonce,
                    &sealed.ciphertext,
                )
                .await?;
            resealed += 1;
        }
        Ok(resealed)
    }
}

impl Keyring {
    /// Seals a cluster-wide value (such as the cluster CA's private key) for
    /// storage under `name`: `key_id:nonce:ciphertext`, hex.
    pub fn seal_fact(&self, name: &str, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("system randomness");
        let mut data = plain.as_bytes().to_vec();
        self.current
            .aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(fact_aad(name)),
                &mut data,
            )
            .expect("sealing into a Vec cannot fail");
        format!(
            "{}:{}:{}",
            self.current.id,
            hex::encode(nonce),
            hex::encode(data)
        )
    }

    /// Opens what [`seal_fact`](Self::seal_fact) made; also says whether it
    /// was sealed with a previous key (then the caller re-seals it).
    pub fn open_fact(&self, name: &str, sealed: &str) -> Result<(String, bool), SecretsError> {
        let err = |why| SecretsError::Fact {
            name: name.to_string(),
            why,
        };
        let mut parts = sealed.splitn(3, ':');
        let (Some(key_id), Some(nonce), Some(ciphertext)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(err("it is malformed"));
        };
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| err("it was sealed with a key this control plane does not have"))?;
        let nonce: [u8; NONCE_LEN] = hex::decode(nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| err("it is malformed"))?;
        let mut data = hex::decode(ciphertext).map_err(|_| err("it is malformed"))?;
        let plain = key
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(fact_aad(name)),
                &mut data,
            )
            .map_err(|_| err("it failed authentication"))?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| err("it is malformed"))?;
        Ok((text, key.id != self.current.id))
    }
}

fn fact_aad(name: &str) -> Vec<u8> {
    format!("verge/cluster/{name}").into_bytes()
}

fn aad(env_id: &str, bundle: &str, version: i64) -> Vec<u8> {
    format!("verge/secret/{env_id}/{bundle}/{version}").into_bytes()
}

/// Writes a new key file readable only by its owner; never replaces one.
fn write_new_key(path: &Path, hex_key: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{hex_key}\n").as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<String, String> {
        BTreeMap::from([("DB_PASSWORD".to_string(), "hunter2".to_string())])
    }

    fn row(sealed: &Sealed, bundle: &str, version: i64) -> SecretVersionRow {
        SecretVersionRow {
            bundle: bundle.into(),
            version,
            keys: "[\"DB_PASSWORD\"]".into(),
            digest: sealed.digest.clone(),
            key_id: Some(sealed.key_id.clone()),
            nonce: Some(sealed.nonce.clone()),
            ciphertext: Some(sealed.ciphertext.clone()),
            created_at: 0,
            deleted_at: None,
        }
    }

    #[test]
    fn seals_opens_and_binds_to_the_row() {
        let keys = Keyring::from_key([7; 32]);
        let sealed = keys.seal("env_1", "app", 1, &values());
        assert!(!sealed.ciphertext.contains(&hex::encode("hunter2")));
        assert_eq!(
            keys.open("env_1", &row(&sealed, "app", 1)).unwrap(),
            Some(values())
        );
        // Moved to another version, bundle or env: refused.
        assert!(matches!(
            keys.open("env_1", &row(&sealed, "app", 2)),
            Err(SecretsError::Tampered { .. })
        ));
        assert!(keys.open("env_2", &row(&sealed, "app", 1)).is_err());
        assert!(keys.open("env_1", &row(&sealed, "other", 1)).is_err());
        // Same values, same digest; a fresh nonce each time.
        let again = keys.seal("env_1", "app", 1, &values());
        assert_eq!(again.digest, sealed.digest);
        assert_ne!(again.nonce, sealed.nonce);
        assert!(!sealed.digest.contains("hunter2"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let sealed = Keyring::from_key([1; 32]).seal("env_1", "app", 1, &values());
        let other = Keyring::from_key([2; 32]);
        let err = other.open("env_1", &row(&sealed, "app", 1)).unwrap_err();
        assert!(err.to_string().contains(&sealed.key_id), "{err}");
    }
}
