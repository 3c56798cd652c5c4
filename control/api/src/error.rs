//! The error body of every failed API request and every failed CLI command
//! under `-o json`: `{"error": {"kind", "message", "next": [..]}}`.

use serde::{Deserialize, Serialize};

/// The category of a failure. Stable: scripts match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed (bad JSON, invalid name, missing field).
    BadRequest,
    /// No or an invalid/revoked token.
    Unauthorized,
    /// The token is valid but may not do this (e.g. an org token creating orgs).
    Forbidden,
    /// The resource does not exist, or belongs to another org.
    NotFound,
    /// The resource already exists, or a concurrent change won.
    Conflict,
    /// The request body is larger than the server accepts.
    PayloadTooLarge,
    /// A deploy gate refused: env vars or secret bundles the manifest
    /// requires are missing in the target env (`details` lists each).
    MissingConfig,
    /// An image reference could not be pinned: unknown repository or tag,
    /// or the registry refused or could not be reached.
    Image,
    /// A wait ran out of time before what it waited for happened.
    Timeout,
    /// The server could not be reached or answered something unexpected.
    Unavailable,
    /// A bug or an unexpected failure inside the server.
    Internal,
    /// A kind this version does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The HTTP status code the API answers with for this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::MissingConfig | ErrorKind::Image => 422,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal | ErrorKind::Unknown => 500,
        }
    }

    /// The kind for an HTTP status code the server answered with.
    pub fn from_status(status: u16) -> Self {
        match status {
            400 => ErrorKind::BadRequest,
            422 => ErrorKind::MissingConfig,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            413 => ErrorKind::PayloadTooLarge,
            504 => ErrorKind::Timeout,
            502 | 503 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

/// What went wrong, in one line, and what to do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub kind: ErrorKind,
    /// One line: what failed, on what.
    pub message: String,
    /// Commands or actions that would help, most useful first.
    #[serde(default)]
    pub next: Vec<String>,
    /// One line per item when a failure has several parts: every error of
    /// a manifest, every missing env var and secret bundle of a gate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// The JSON envelope: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorDetail {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorDetail {
            kind,
            message: message.into(),
            next: Vec::new(),
            details: Vec::new(),
        }
    }

    pub fn with_next(mut self, next: impl Into<String>) -> Self {
        self.next.push(next.into());
        self
    }
}

impl std::fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorDetail {}

/// An error and its sources as one line, `outer: inner: ...`, leaving out
/// a source whose text an earlier part already contains (libraries often
/// repeat their source in their own message).
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
