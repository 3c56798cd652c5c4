//! The error every handler returns: an [`ErrorDetail`] rendered as the JSON
//! body `{"error": {"kind", "message", "next"}}` with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use verge_api::{ErrorBody, ErrorDetail, ErrorKind};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError(pub ErrorDetail);

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError(ErrorDetail::new(kind, message))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// "KIND NAME not found". Also the answer for another org's resources, so
    /// that their existence does not leak.
    pub fn not_found(kind: &str, name: &str) -> Self {
        let e = Self::new(ErrorKind::NotFound, format!("{kind} {name:?} not found"));
        // Only nouns with a `list` command; callers add the right next step for others.
        match kind {
            "org" | "project" | "app" | "env" | "token" => e.next(format!("verge {kind}s list")),
            _ => e,
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    pub fn next(mut self, next: impl Into<String>) -> Self {
        self.0.next.push(next.into());
        self
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ApiError::conflict("the resource already exists"),
            StoreError::Endpoint(message) => ApiError::conflict(message)
                .next("verge endpoints  (what is exposed, with addresses and ports)"),
            StoreError::Unavailable(e) => {
                tracing::error!(error = %e, "store unreachable");
                ApiError::new(
                    ErrorKind::Unavailable,
                    "the control plane cannot reach its database; the request may not have been applied",
                )
                .next("retry shortly; after a create, list first to see whether it was applied")
                .next("operators: check the database and the control plane's log")
            }
            e => {
                tracing::error!(error = %e, "store failure");
                ApiError::new(
                    ErrorKind::Internal,
                    "internal error: the control plane's store failed; the request may not have been applied",
                )
                .next("retry; if it persists, read the control plane's log")
            }
        }
    }
}

/// Maps a unique-key violation to a conflict that names what exists.
pub trait OrConflict<T> {
    /// `message` says what exists; `next` is the command that shows it.
    fn or_conflict(self, message: impl FnOnce() -> String, next: &str) -> Result<T, ApiError>;
}

impl<T> OrConflict<T> for Result<T, StoreError> {
    fn or_conflict(self, message: impl FnOnce() -> String, next: &str) -> Result<T, ApiError> {
        self.map_err(|e| match e {
            StoreError::Conflict => ApiError::conflict(message()).next(next),
            e => e.into(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody { error: self.0 })).into_response()
    }
}
