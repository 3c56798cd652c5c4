//! API tokens (cluster admin only): `POST/GET /v1/tokens` (`?org=` filters),
//! `DELETE /v1/tokens/{id}` revokes.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use serde::Deserialize;
use verge_api::requests::CreateToken;
use verge_api::resources::{CreatedToken, Token};

use super::{AppState, Json, Path, Query};
use crate::auth::{Caller, generate_token, hash_token};
use crate::error::ApiError;
use crate::store::{Revoke, TokenRow};
use crate::time::rfc3339;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tokens", get(list).post(create))
        .route("/tokens/{id}", delete(revoke))
}

fn token(row: TokenRow) -> Token {
    Token {
        admin: row.org_id.is_none(),
        id: row.id,
        name: row.name,
        org: row.org,
        created_at: rfc3339(row.created_at),
        revoked_at: row.revoked_at.map(rfc3339),
    }
}

async fn create(
    State(st): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateToken>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    caller.require_admin("creating a token")?;
    let org = caller.org(&st.store, &body.org).await?;
    let name = body.name.unwrap_or_else(|| format!("{}-token", org.name));
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "token name must be 1 to 100 characters, none of them control characters",
        ));
    }
    let secret = generate_token();
    let row = st
        .store
        .create_token(Some(&org.id), &name, &hash_token(&secret))
        .await?;
    tracing::info!(org = %org.id, token = %row.id, "token created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            id: row.id,
            org: org.name,
            token: secret,
        }),
    ))
}

#[derive(Debug, Deserialize)]
struct TokenFilter {
    org: Option<String>,
}

async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(filter): Query<TokenFilter>,
) -> Result<axum::Json<Vec<Token>>, ApiError> {
    caller.require_admin("listing tokens")?;
    let org_id = match &filter.org {
        Some(name) => Some(caller.org(&st.store, name).await?.id),
        None => None,
    };
    let rows = st.store.list_tokens(org_id.as_deref()).await?;
    Ok(axum::Json(rows.into_iter().map(token).collect()))
}

async fn revoke(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<Token>, ApiError> {
    caller.require_admin("revoking a token")?;
    // IDs are `tok_` and a ULID; anything else cannot exist (and must not
    // reach the database: PostgreSQL refuses NUL bytes in text).
    let well_formed = id
        .strip_prefix("tok_")
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric()));
    if !well_formed {
        return Err(ApiError::not_found("token", &id));
    }
    match st.store.revoke_token(&id).await? {
        Revoke::Revoked(row) => {
            tracing::info!(token = %row.id, "token revoked");
            Ok(axum::Json(token(row)))
        }
        Revoke::LastAdmin(row) => Err(ApiError::conflict(format!(
            "token {} is the last active admin token: revoking it would lock every admin out",
            row.id
        ))
        .next("mint another first: restart with `verge control --new-admin-token`, then revoke this one")),
        Revoke::NotFound => Err(ApiError::not_found("token", &id)),
    }
}
