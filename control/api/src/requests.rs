//! Request bodies the API accepts. Unknown fields are rejected so that a typo
//! in a script fails loudly instead of being ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /v1/orgs`, `POST /v1/orgs/{org}/projects`, `POST /v1/orgs/{org}/apps/{app}/envs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNamed {
    pub name: String,
}

/// `POST /v1/orgs/{org}/apps`: an app belongs to one project of the org.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    pub project: String,
}

/// `POST /v1/tokens`: an org-scoped API token (admin only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub org: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST .../envs/{env}/config`: a new env-var version from the newest one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeConfig {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// `POST .../envs/{env}/secrets/{bundle}`: a new version of the bundle from
/// its newest one (keys in `set` added or replaced, keys in `unset` removed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSecrets {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// `POST .../envs/{env}/deploys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// The text of `verge.toml`, checked by the server with the same rules as
    /// the CLI.
    pub manifest: String,
    /// The file name errors are reported against.
    #[serde(default = "default_manifest_file")]
    pub file: String,
    /// Workload → image replacing the manifest's (`verge deploy --image`).
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// The release the client saw as current (`""`: none). When the env's
    /// current release is another one by the time this deploy would become
    /// current, the deploy answers 409 naming the winner.
    #[serde(default)]
    pub base: Option<String>,
    /// Check, pin and plan only: answer the receipt and placement plan
    /// without creating a release or changing anything.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_manifest_file() -> String {
    "verge.toml".into()
}

/// `POST .../envs/{env}/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// `v3`, `3` or a release ID.
    pub release: String,
    /// Why, recorded in the event.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST .../envs/{env}/scale`: per workload, what to change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub workloads: BTreeMap<String, crate::status::ScaleOverride>,
}
