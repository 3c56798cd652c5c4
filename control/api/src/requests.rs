//! Request bodies the API accepts. Unknown fields are rejected so that a typo
//! in a script fails loudly instead of being ignored.

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
