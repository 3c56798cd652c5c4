//! API tokens. Only a token's SHA-256 is stored; the secret is shown once.

use sqlx::{Any, FromRow, Transaction};

use super::{Backend, Result, Store, new_id};
use crate::time::now_ms;

/// A token with the name of its org (`None` for a cluster admin token).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct TokenRow {
    pub id: String,
    pub org_id: Option<String>,
    pub org: Option<String>,
    pub name: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

const TOKEN_COLUMNS: &str = "t.id, t.org_id, o.name AS org, t.name, t.created_at, t.revoked_at \
                             FROM tokens t LEFT JOIN orgs o ON o.id = t.org_id";

impl Store {
    /// Stores a token by its hash; `org_id` `None` makes it a cluster admin token.
    pub async fn create_token(
        &self,
        org_id: Option<&str>,
        name: &str,
        hash: &str,
    ) -> Result<TokenRow> {
        let mut tx = self.pool.begin().await?;
        let id = insert(&mut tx, org_id, name, hash).await?;
        tx.commit().await?;
        Ok(self.token_by_id(&id).await?.expect("just inserted"))
    }

    /// How many admin tokens are not revoked.
    pub async fn active_admin_tokens(&self) -> Result<i64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tokens WHERE org_id IS NULL AND revoked_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// The unrevoked token whose hash is `hash`.
    pub async fn active_token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} WHERE t.hash = $1 AND t.revoked_at IS NULL");
        let row = sqlx::query_as(&sql)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn token_by_id(&self, id: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} WHERE t.id = $1");
        let row = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// Tokens of one org, or all of them (admin tokens included) when `org_id` is `None`.
    pub async fn list_tokens(&self, org_id: Option<&str>) -> Result<Vec<TokenRow>> {
        let sql = format!(
            "SELECT {TOKEN_COLUMNS} WHERE ($1 IS NULL OR t.org_id = $1) ORDER BY t.created_at, t.id"
        );
        let rows = sqlx::query_as(&sql)
            .bind(org_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    /// Marks a token revoked; it fails authentication from the next request
    /// on. The last active admin token is never revoked: that would lock
    /// every admin out of the cluster.
    pub async fn revoke_token(&self, id: &str) -> Result<Revoke> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            // Serialise revocations of admin tokens, so that two racing
            // revocations cannot each see "another admin token remains".
            sqlx::query(
                "SELECT id FROM tokens WHERE org_id IS NULL AND revoked_at IS NULL FOR UPDATE",
            )
            .fetch_all(&mut *tx)
            .await?;
        }
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL AND \
             (org_id IS NOT NULL OR \
              (SELECT COUNT(*) FROM tokens WHERE org_id IS NULL AND revoked_at IS NULL) > 1)",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = self.token_by_id(id).await? else {
            return Ok(Revoke::NotFound);
        };
        if done.rows_affected() == 0 && row.revoked_at.is_none() {
            return Ok(Revoke::LastAdmin(row));
        }
        Ok(Revoke::Revoked(row))
    }
}

/// What [`Store::revoke_token`] did.
#[derive(Debug)]
pub enum Revoke {
    /// Revoked now, or already before (`revoked_at` keeps the first time).
    Revoked(TokenRow),
    /// Refused: it is the last active admin token.
    LastAdmin(TokenRow),
    NotFound,
}

/// Inserts a token row inside `tx`; returns its ID.
pub(super) async fn insert(
    tx: &mut Transaction<'static, Any>,
    org_id: Option<&str>,
    name: &str,
    hash: &str,
) -> Result<String> {
    let id = new_id("tok");
    sqlx::query(
        "INSERT INTO tokens (id, org_id, name, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(org_id)
    .bind(name)
    .bind(hash)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(id)
}
