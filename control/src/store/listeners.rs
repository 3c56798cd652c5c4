//! Listeners of per-connection workloads: what each node last reported
//! about the listeners it runs (replaced whole per node on every report),
//! and the digest of the listeners each node should run, which moves its
//! desired-set version.

use sqlx::{Any, AnyConnection, Executor, FromRow};

use super::events::Mutation;
use super::{Result, Store};

/// A listener as its node last reported it, with the node's name.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ListenerRow {
    pub node_id: String,
    /// Filled when read back (joined from `nodes`); ignored when written.
    pub node_name: Option<String>,
    pub id: String,
    pub env_id: String,
    pub release_id: String,
    pub workload: String,
    /// `starting`, `listening` or `failed`.
    pub state: String,
    pub message: Option<String>,
    pub address: Option<String>,
    /// Connections served now, to the end, and whose instance failed,
    /// since the listener started on its node.
    pub active: i64,
    pub served: i64,
    pub failed: i64,
    pub last_failure: Option<String>,
    pub last_failure_category: Option<String>,
    /// When the control plane last saw `failed` grow (ms).
    pub last_failure_at: Option<i64>,
    pub updated_at: i64,
}

const LISTENER_SELECT: &str = "SELECT l.node_id, n.name AS node_name, l.id, l.env_id, \
    l.release_id, l.workload, l.state, l.message, l.address, l.active, l.served, l.failed, \
    l.last_failure, l.last_failure_category, l.last_failure_at, l.updated_at \
    FROM listeners l LEFT JOIN nodes n ON n.id = l.node_id";

async fn select<'e>(
    e: impl Executor<'e, Database = Any>,
    column: &'static str,
    value: &str,
) -> Result<Vec<ListenerRow>> {
    let sql = format!("{LISTENER_SELECT} WHERE l.{column} = $1 ORDER BY l.workload, n.name, l.id");
    Ok(sqlx::query_as(&sql).bind(value).fetch_all(e).await?)
}

/// Replaces every listener row of `node_id` with `rows`.
async fn replace(conn: &mut AnyConnection, node_id: &str, rows: &[ListenerRow]) -> Result<()> {
    sqlx::query("DELETE FROM listeners WHERE node_id = $1")
        .bind(node_id)
        .execute(&mut *conn)
        .await?;
    for r in rows {
        sqlx::query(
            "INSERT INTO listeners (node_id, id, env_id, release_id, workload, state, message, \
             address, active, served, failed, last_failure, last_failure_category, \
             last_failure_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(node_id)
        .bind(&r.id)
        .bind(&r.env_id)
        .bind(&r.release_id)
        .bind(&r.workload)
        .bind(&r.state)
        .bind(r.message.as_deref())
        .bind(r.address.as_deref())
        .bind(r.active)
        .bind(r.served)
        .bind(r.failed)
        .bind(r.last_failure.as_deref())
        .bind(r.last_failure_category.as_deref())
        .bind(r.last_failure_at)
        .bind(r.updated_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl Store {
    /// The listeners a node last reported.
    pub async fn node_listeners(&self, node_id: &str) -> Result<Vec<ListenerRow>> {
        select(&self.pool, "node_id", node_id).await
    }

    /// The listeners of an env on every node, by workload, node and ID.
    pub async fn env_listeners(&self, env_id: &str) -> Result<Vec<ListenerRow>> {
        select(&self.pool, "env_id", env_id).await
    }

    /// Replaces the listeners of `node_id` with `rows`, in one transaction
    /// of its own (no events: see [`Mutation::replace_listeners`]).
    pub async fn replace_listeners(&self, node_id: &str, rows: &[ListenerRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        replace(&mut tx, node_id, rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The env a release belongs to.
    pub async fn release_env(&self, release_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT env_id FROM releases WHERE id = $1")
                .bind(release_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Each node's recorded listener digest (see [`Self::sync_listener_digest`]).
    pub async fn listener_digests(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>> {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT id, listeners_digest FROM nodes")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Records `digest` as what node `node_id` should listen on; when it
    /// differs from the recorded one, bumps the node's desired-set version
    /// too and returns true. One conditional update: replicas computing the
    /// same digest at once bump it once.
    pub async fn sync_listener_digest(&self, node_id: &str, digest: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE nodes SET listeners_digest = $2, desired_version = desired_version + 1 \
             WHERE id = $1 AND COALESCE(listeners_digest, '') <> $2",
        )
        .bind(node_id)
        .bind(digest)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Mutation<'_> {
    /// [`Store::replace_listeners`] inside a mutation (with its events).
    pub async fn replace_listeners(&mut self, node_id: &str, rows: &[ListenerRow]) -> Result<()> {
        replace(self.conn(), node_id, rows).await
    }
}
