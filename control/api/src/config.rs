//! An env's configuration as the API shows it: versioned env vars, and
//! versioned secret bundles of which only names, versions and digests ever
//! leave the control plane.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET .../envs/{env}/config`: the env vars of the env's newest config
/// version. Version 0 is the empty config every env starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvConfig {
    pub version: i64,
    pub vars: BTreeMap<String, String>,
    /// When this version was made; `None` for version 0.
    pub created_at: Option<String>,
}

/// The answer to `verge env set/unset`: the new version and what changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReceipt {
    pub env: String,
    pub version: i64,
    pub previous_version: i64,
    /// Names set to a new value (values are in `verge env list`).
    pub set: Vec<String>,
    pub unset: Vec<String>,
    /// Nothing differed from the previous version: no new version was made.
    pub unchanged: bool,
    pub follow_ups: Vec<String>,
}

/// A secret bundle: its newest live version, and every version kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBundle {
    pub name: String,
    /// The newest version that was not deleted; `None` when every version was.
    pub version: Option<i64>,
    /// Key names of that version (never values).
    pub keys: Vec<String>,
    /// Its digest: `hmac-sha256:...`, equal for equal contents.
    pub digest: Option<String>,
    pub versions: Vec<SecretVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    pub version: i64,
    pub keys: Vec<String>,
    pub digest: String,
    pub created_at: String,
    /// Deleted versions keep their number and digest; their values are gone.
    pub deleted: bool,
}

/// The answer to `verge secrets set/unset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretReceipt {
    pub env: String,
    pub bundle: String,
    /// The bundle's newest live version after the change; `None` once deleted.
    pub version: Option<i64>,
    pub previous_version: Option<i64>,
    pub keys: Vec<String>,
    pub digest: Option<String>,
    /// Key names given a value by this change.
    pub set: Vec<String>,
    pub unset: Vec<String>,
    /// Versions deleted by this change.
    pub deleted_versions: Vec<i64>,
    pub unchanged: bool,
    pub follow_ups: Vec<String>,
}
