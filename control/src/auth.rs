//! Tokens and org scoping.
//!
//! A token is `vrg_` and 64 hex digits of randomness; the store keeps only its
//! SHA-256 (a fast hash fits: the secret has 256 bits of entropy, unlike a
//! password). Every request looks its token up again, so a revocation takes
//! effect on the very next request. A token is either the cluster admin's
//! (created on first start) or scoped to one org. A scoped token asking for
//! another org's resource gets the same 404 as for a resource that does not
//! exist: names of other orgs never leak.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use verge_api::ErrorKind;

use crate::error::ApiError;
use crate::http::AppState;
use crate::store::{OrgRow, Store, StoreError, TokenRow};

/// A fresh token secret.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("vrg_{}", hex::encode(bytes))
}

/// What the store keeps of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Creates the cluster admin token if none was ever created, and returns it;
/// `None` on every later start. Safe against replicas starting together.
pub async fn bootstrap(store: &Store) -> Result<Option<String>, StoreError> {
    let token = generate_token();
    let created = store
        .bootstrap_admin_token("admin", &hash_token(&token))
        .await?;
    Ok(created.then_some(token))
}

/// Mints another cluster admin token: for `verge dev` when it has lost its
/// copy, and for `verge control --new-admin-token`.
pub async fn create_admin_token(store: &Store, name: &str) -> Result<String, StoreError> {
    let token = generate_token();
    store.create_token(None, name, &hash_token(&token)).await?;
    Ok(token)
}

/// Who is calling: the authenticated token of the request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: TokenRow,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.token.org_id.is_none()
    }

    /// Who this is, for events and records: `name (id)`.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.token.name, self.token.id)
    }

    /// Refuses non-admin tokens for cluster-wide actions (`what`: "creating orgs").
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.is_admin() {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::Forbidden,
            format!("{what} needs a cluster admin token; this token is scoped to org {:?}",
                self.token.org.as_deref().unwrap_or_default()),
        )
        .next("ask a cluster admin, or use the admin token printed on the control plane's first start"))
    }

    /// May this caller see rows of `org_id`?
    pub fn sees_org(&self, org_id: &str) -> bool {
        self.token.org_id.as_deref().is_none_or(|own| own == org_id)
    }

    /// The org named `name`, if this caller may see it; 404 otherwise, the
    /// same answer whether it does not exist or belongs to someone else.
    pub async fn org(&self, store: &Store, name: &str) -> Result<OrgRow, ApiError> {
        // A name that breaks the naming rules cannot exist: answer without a query.
        if verge_api::names::validate("org", name).is_err() {
            return Err(ApiError::not_found("org", name));
        }
        match store.org_by_name(name).await? {
            Some(org) if self.sees_org(&org.id) => {
                tracing::Span::current().record("org", org.id.as_str());
                Ok(org)
            }
            _ => Err(ApiError::not_found("org", name)),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |message: &str| {
            ApiError::new(ErrorKind::Unauthorized, message)
                .next("pass --token or set VERGE_TOKEN")
                .next("verge login --server URL --token TOKEN")
        };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing API token: send Authorization: Bearer TOKEN"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("malformed Authorization header: expected Bearer TOKEN"))?;
        let row = state.store.active_token_by_hash(&hash_token(token)).await?;
        let token = row.ok_or_else(|| unauthorized("invalid or revoked API token"))?;
        tracing::Span::current().record("token", token.id.as_str());
        Ok(Caller { token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with("vrg_") && a.len() == 68, "{a}");
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(hash_token(&a).len(), 64);
    }
}
