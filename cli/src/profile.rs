//! CLI profiles: named (server, token, defaults) sets in
//! `$VERGE_CONFIG_DIR/config.toml` (default `$XDG_CONFIG_HOME/verge`, then
//! `~/.config/verge`). The file holds tokens, so it is written 0600, and
//! atomically (write a temporary file, then rename).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use verge_api::{ErrorDetail, ErrorKind};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProfileFile {
    /// The profile used when none is named.
    pub current: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub server: String,
    pub token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// A profile file that cannot be used, and its path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProfileError(String, Option<PathBuf>);

impl ProfileError {
    pub fn detail(&self) -> ErrorDetail {
        let mut d = ErrorDetail::new(ErrorKind::BadRequest, self.0.clone());
        if let Some(path) = &self.1 {
            d.next.push(format!("fix or delete {}", path.display()));
        }
        d.next
            .push("pass --server and --token to bypass profiles".into());
        d
    }
}

/// The directory of the CLI's configuration.
pub fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VERGE_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(xdg).join("verge"));
    }
    let home = std::env::var_os("HOME").context("neither VERGE_CONFIG_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config").join("verge"))
}

fn path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("config.toml"))
}

impl ProfileFile {
    /// The profile file, or an empty one when there is none yet.
    pub fn load() -> Result<ProfileFile, ProfileError> {
        let path = path().map_err(|e| ProfileError(format!("{e:#}"), None))?;
        let invalid = |why: String| {
            ProfileError(
                format!("profile file {} {why}", path.display()),
                Some(path.clone()),
            )
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| invalid(format!("is invalid: {}", e.message().replace('\n', " ")))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProfileFile::default()),
            Err(e) => Err(invalid(format!("cannot be read: {e}"))),
        }
    }

    /// The profile named `name`, or the current one.
    pub fn select(&self, name: Option<&str>) -> Option<&Profile> {
        self.profiles.get(name.or(self.current.as_deref())?)
    }

    /// Saves `profile` as `name` and makes it current.
    pub fn save_current(name: &str, profile: Profile) -> Result<PathBuf, ProfileError> {
        ProfileFile::update(|file| {
            file.profiles.insert(name.to_string(), profile);
            file.current = Some(name.to_string());
            Ok::<(), ProfileError>(())
        })
    }

    /// Load, change, store, under an exclusive lock (`config.toml.lock`), so
    /// that concurrent `verge login`s and `verge dev`s lose no profile.
    pub fn update<E: From<ProfileError>>(
        change: impl FnOnce(&mut ProfileFile) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = path().map_err(|e| ProfileError(format!("{e:#}"), None))?;
        let dir = path.parent().expect("config.toml has a parent");
        let failed = |e: std::io::Error| {
            ProfileError(
                format!("cannot lock profile file {}: {e}", path.display()),
                Some(path.clone()),
            )
        };
        std::fs::create_dir_all(dir).map_err(failed)?;
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("config.toml.lock"))
            .map_err(failed)?;
        lock.lock().map_err(failed)?;
        let mut file = ProfileFile::load()?;
        change(&mut file)?;
        Ok(file.store()?)
        // The lock is released when `lock` is dropped.
    }

    /// Writes the file: a temporary file of this process, synced, then
    /// renamed over the old one. Callers hold the lock of [`update`](Self::update).
    fn store(&self) -> Result<PathBuf, ProfileError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = path().map_err(|e| ProfileError(format!("{e:#}"), None))?;
        let failed = |e: std::io::Error| {
            ProfileError(
                format!("cannot write profile file {}: {e}", path.display()),
                Some(path.clone()),
            )
        };
        let dir = path.parent().expect("config.toml has a parent");
        std::fs::create_dir_all(dir).map_err(failed)?;
        let tmp = dir.join(format!(".config.toml.{}.tmp", std::process::id()));
        let text = toml::to_string_pretty(self).expect("profiles encode as TOML");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(failed)?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(failed)?;
        std::fs::rename(&tmp, &path).map_err(failed)?;
        Ok(path)
    }
}
