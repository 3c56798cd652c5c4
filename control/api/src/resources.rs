//! Resource types as the API returns them. Times are RFC 3339 strings in UTC.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub org: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub name: String,
    pub org: String,
    pub project: String,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    pub id: String,
    pub name: String,
    pub org: String,
    pub app: String,
    pub created_at: String,
}

/// A token as listed: never its secret, which is shown once at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub name: String,
    /// The org the token is scoped to; `None` for a cluster admin token.
    pub org: Option<String>,
    pub admin: bool,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// The answer to `POST /v1/tokens`: the only time the secret is returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub org: String,
    pub token: String,
}

/// `GET /v1/whoami`: who the presented token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub token_id: String,
    pub token_name: String,
    pub admin: bool,
    pub org: Option<String>,
}
