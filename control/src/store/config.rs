//! Versioned env vars and secret bundles of an env. Rows are only inserted
//! (a new version per change), except that deleting a secret version wipes
//! its sealed value and marks it deleted.

use std::collections::BTreeMap;

use sqlx::{Any, Executor, FromRow};

use super::events::Mutation;
use super::{Result, Store};
use crate::time::now_ms;

/// One version of an env's vars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    /// 0: the empty config every env starts with.
    pub version: i64,
    pub vars: BTreeMap<String, String>,
    pub created_at: Option<i64>,
}

/// One version of a secret bundle. `sealed` is `None` once deleted.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct SecretVersionRow {
    pub bundle: String,
    pub version: i64,
    /// JSON array of key names.
    pub keys: String,
    pub digest: String,
    pub key_id: Option<String>,
    pub nonce: Option<String>,
    pub ciphertext: Option<String>,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

impl SecretVersionRow {
    pub fn key_names(&self) -> Vec<String> {
        serde_json::from_str(&self.keys).unwrap_or_default()
    }
}

async fn latest_config<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<ConfigVersion> {
    let row: Option<(i64, String, i64)> = sqlx::query_as(
        "SELECT version, vars, created_at FROM config_versions WHERE env_id = $1 \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(env_id)
    .fetch_optional(e)
    .await?;
    Ok(match row {
        None => ConfigVersion {
            version: 0,
            vars: BTreeMap::new(),
            created_at: None,
        },
        Some((version, vars, created_at)) => ConfigVersion {
            version,
            vars: serde_json::from_str(&vars).unwrap_or_default(),
            created_at: Some(created_at),
        },
    })
}

const SECRET_COLUMNS: &str =
    "bundle, version, keys, digest, key_id, nonce, ciphertext, created_at, deleted_at";

async fn secret_versions<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
    bundle: Option<&str>,
) -> Result<Vec<SecretVersionRow>> {
    let sql = format!(
        "SELECT {SECRET_COLUMNS} FROM secret_versions WHERE env_id = $1 \
         AND ($2 IS NULL OR bundle = $2) ORDER BY bundle, version"
    );
    let rows = sqlx::query_as(&sql)
        .bind(env_id)
        .bind(bundle)
        .fetch_all(e)
        .await?;
    Ok(rows)
}

impl Store {
    /// The env's newest config version.
    pub async fn config(&self, env_id: &str) -> Result<ConfigVersion> {
        latest_config(&self.pool, env_id).await
    }

    /// The env vars of one config version (a release records which).
    pub async fn config_vars_at(
        &self,
        env_id: &str,
        version: i64,
    ) -> Result<BTreeMap<String, String>> {
        let vars: Option<String> = sqlx::query_scalar(
            "SELECT vars FROM config_versions WHERE env_id = $1 AND version = $2",
        )
        .bind(env_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(vars
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default())
    }

    /// Every version of every bundle of the env (of one bundle when given),
    /// by bundle then version.
    pub async fn secret_versions(
        &self,
        env_id: &str,
        bundle: Option<&str>,
    ) -> Result<Vec<SecretVersionRow>> {
        secret_versions(&self.pool, env_id, bundle).await
    }

    /// Every sealed secret version, for re-sealing under a new key.
    pub async fn sealed_secrets(&self) -> Result<Vec<(String, SecretVersionRow)>> {
        let sql = format!(
            "SELECT env_id, {SECRET_COLUMNS} FROM secret_versions WHERE ciphertext IS NOT NULL"
        );
        let rows: Vec<sqlx::any::AnyRow> = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                use sqlx::Row as _;
                Ok((r.try_get("env_id")?, SecretVersionRow::from_row(r)?))
            })
            .collect()
    }

    /// Replaces the sealed value of one version (key rotation only).
    pub async fn reseal_secret(
        &self,
        env_id: &str,
        bundle: &str,
        version: i64,
        key_id: &str,
        nonce: &str,
        ciphertext: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE secret_versions SET key_id = $4, nonce = $5, ciphertext = $6 \
             WHERE env_id = $1 AND bundle = $2 AND version = $3 AND ciphertext IS NOT NULL",
        )
        .bind(env_id)
        .bind(bundle)
        .bind(version)
        .bind(key_id)
        .bind(nonce)
        .bind(ciphertext)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl Mutation<'_> {
    pub async fn config(&mut self, env_id: &str) -> Result<ConfigVersion> {
        latest_config(self.conn(), env_id).await
    }

    pub async fn insert_config(
        &mut self,
        env_id: &str,
        version: i64,
        vars: &BTreeMap<String, String>,
        created_by: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO config_versions (env_id, version, vars, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(env_id)
        .bind(version)
        .bind(serde_json::to_string(vars).expect("a string map serialises"))
        .bind(now_ms())
        .bind(created_by)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    pub async fn secret_versions(
        &mut self,
        env_id: &str,
        bundle: Option<&str>,
    ) -> Result<Vec<SecretVersionRow>> {
        secret_versions(self.conn(), env_id, bundle).await
    }

    pub async fn insert_secret_version(
        &mut self,
        env_id: &str,
        row: &SecretVersionRow,
        created_by: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO secret_versions (env_id, bundle, version, keys, digest, key_id, nonce, \
             ciphertext, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(env_id)
        .bind(&row.bundle)
        .bind(row.version)
        .bind(&row.keys)
        .bind(&row.digest)
        .bind(row.key_id.as_deref())
        .bind(row.nonce.as_deref())
        .bind(row.ciphertext.as_deref())
        .bind(row.created_at)
        .bind(created_by)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Wipes the sealed value of one version and marks it deleted.
    pub async fn delete_secret_version(
        &mut self,
        env_id: &str,
        bundle: &str,
        version: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE secret_versions SET key_id = NULL, nonce = NULL, ciphertext = NULL, \
             deleted_at = $4 WHERE env_id = $1 AND bundle = $2 AND version = $3",
        )
        .bind(env_id)
        .bind(bundle)
        .bind(version)
        .bind(now_ms())
        .execute(self.conn())
        .await?;
        Ok(())
    }
}
