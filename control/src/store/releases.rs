//! Releases (immutable rows: the database refuses UPDATE and DELETE), the
//! env's current-release pointer, and scale overrides.

use std::collections::BTreeMap;

use sqlx::{Any, Executor, FromRow};
use verge_api::manifest::Manifest;

use super::events::Mutation;
use super::{Result, Store};

/// A release as stored. JSON columns are kept as text.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ReleaseRow {
    pub id: String,
    pub env_id: String,
    pub number: i64,
    /// The manifest snapshot (JSON of `verge_api::manifest::Manifest`), images pinned.
    pub manifest: String,
    /// JSON object workload → `ref@sha256:...`.
    pub images: String,
    pub config_version: i64,
    /// JSON object bundle → version.
    pub secrets: String,
    /// Hash of everything above that defines it: equal for an unchanged deploy.
    pub fingerprint: String,
    pub parent_id: Option<String>,
    pub created_at: i64,
    pub created_by: String,
}

/// What `verge scale` set for one workload; `None` follows the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScaleRow {
    pub count: Option<i64>,
    pub cpu_millis: Option<i64>,
    pub memory: Option<i64>,
}

const RELEASE_COLUMNS: &str = "id, env_id, number, manifest, images, config_version, secrets, \
                               fingerprint, parent_id, created_at, created_by";

async fn current_release<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<Option<ReleaseRow>> {
    let sql = format!(
        "SELECT {RELEASE_COLUMNS} FROM releases \
         WHERE id = (SELECT current_release FROM envs WHERE id = $1)"
    );
    Ok(sqlx::query_as(&sql).bind(env_id).fetch_optional(e).await?)
}

async fn scale_overrides<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<BTreeMap<String, ScaleRow>> {
    // workload, count, cpu_millis, memory
    type Row = (String, Option<i64>, Option<i64>, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT workload, count, cpu_millis, memory FROM scale_overrides WHERE env_id = $1",
    )
    .bind(env_id)
    .fetch_all(e)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(w, count, cpu_millis, memory)| {
            (
                w,
                ScaleRow {
                    count,
                    cpu_millis,
                    memory,
                },
            )
        })
        .collect())
}

impl Store {
    pub async fn current_release(&self, env_id: &str) -> Result<Option<ReleaseRow>> {
        current_release(&self.pool, env_id).await
    }

    /// The current release of every env that has one, by env ID.
    pub async fn current_releases(&self) -> Result<Vec<ReleaseRow>> {
        let columns = RELEASE_COLUMNS
            .split(", ")
            .map(|c| format!("r.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM releases r JOIN envs e ON e.current_release = r.id \
             ORDER BY r.env_id"
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Releases of an env, newest first.
    pub async fn list_releases(&self, env_id: &str) -> Result<Vec<ReleaseRow>> {
        let sql = format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 ORDER BY number DESC"
        );
        Ok(sqlx::query_as(&sql)
            .bind(env_id)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Release ID → number, for every release of the env.
    pub async fn release_numbers(&self, env_id: &str) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT id, number FROM releases WHERE env_id = $1")
                .bind(env_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// How many releases the env has had.
    pub async fn count_releases(&self, env_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM releases WHERE env_id = $1")
                .bind(env_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn release_by_number(&self, env_id: &str, number: i64) -> Result<Option<ReleaseRow>> {
        let sql =
            format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 AND number = $2");
        Ok(sqlx::query_as(&sql)
            .bind(env_id)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn release_by_id(&self, env_id: &str, id: &str) -> Result<Option<ReleaseRow>> {
        let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 AND id = $2");
        Ok(sqlx::query_as(&sql)
            .bind(env_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn scale_overrides(&self, env_id: &str) -> Result<BTreeMap<String, ScaleRow>> {
        scale_overrides(&self.pool, env_id).await
    }
}

impl Mutation<'_> {
    pub async fn release_by_id(&mut self, env_id: &str, id: &str) -> Result<Option<ReleaseRow>> {
        let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 AND id = $2");
        Ok(sqlx::query_as(&sql)
            .bind(env_id)
            .bind(id)
            .fetch_optional(self.conn())
            .await?)
    }

    /// The env's current release, as of now inside this mutation.
    pub async fn current_release(&mut self, env_id: &str) -> Result<Option<ReleaseRow>> {
        current_release(self.conn(), env_id).await
    }

    pub async fn next_release_number(&mut self, env_id: &str) -> Result<i64> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT MAX(number) FROM releases WHERE env_id = $1")
                .bind(env_id)
                .fetch_one(self.conn())
                .await?;
        Ok(max.unwrap_or(0) + 1)
    }

    pub async fn insert_release(&mut self, row: &ReleaseRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO releases ({RELEASE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&row.id)
        .bind(&row.env_id)
        .bind(row.number)
        .bind(&row.manifest)
        .bind(&row.images)
        .bind(row.config_version)
        .bind(&row.secrets)
        .bind(&row.fingerprint)
        .bind(row.parent_id.as_deref())
        .bind(row.created_at)
        .bind(&row.created_by)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Points the env at `release_id` (manifest `to`), keeping those of
    /// its scale overrides `scale` that still apply after moving from
    /// manifest `from` (`desired::carry_scale`; none without a `from`);
    /// returns the overrides kept. Gives `to`'s endpoints their addresses
    /// from `pools` ([`super::StoreError::Endpoint`] when a port is taken).
    pub async fn make_current(
        &mut self,
        env_id: &str,
        release_id: &str,
        from: Option<&Manifest>,
        to: &Manifest,
        scale: &BTreeMap<String, ScaleRow>,
        pools: &crate::endpoints::Addressing,
    ) -> Result<BTreeMap<String, ScaleRow>> {
        self.assign_endpoints(env_id, to, pools).await?;
        let kept = from
            .map(|f| crate::desired::carry_scale(f, to, scale))
            .unwrap_or_default();
        self.replace_scale_overrides(env_id, &kept).await?;
        sqlx::query("UPDATE envs SET current_release = $2 WHERE id = $1")
            .bind(env_id)
            .bind(release_id)
            .execute(self.conn())
            .await?;
        Ok(kept)
    }

    pub async fn scale_overrides(&mut self, env_id: &str) -> Result<BTreeMap<String, ScaleRow>> {
        scale_overrides(self.conn(), env_id).await
    }

    /// Replaces the env's scale overrides with `overrides` (empty rows dropped).
    pub async fn replace_scale_overrides(
        &mut self,
        env_id: &str,
        overrides: &BTreeMap<String, ScaleRow>,
    ) -> Result<()> {
        sqlx::query("DELETE FROM scale_overrides WHERE env_id = $1")
            .bind(env_id)
            .execute(self.conn())
            .await?;
        for (workload, s) in overrides {
            if *s == ScaleRow::default() {
                continue;
            }
            sqlx::query(
                "INSERT INTO scale_overrides (env_id, workload, count, cpu_millis, memory, \
                 updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(env_id)
            .bind(workload)
            .bind(s.count)
            .bind(s.cpu_millis)
            .bind(s.memory)
            .bind(crate::time::now_ms())
            .execute(self.conn())
            .await?;
        }
        Ok(())
    }
}
