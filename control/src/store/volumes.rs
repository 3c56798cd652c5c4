//! Volumes and their snapshots, as rows. The operations on nodes that go
//! with them (and the rules about when they may run) are in
//! [`crate::volumes`]; here only what the database guarantees: one volume
//! name per env, one operation at a time per volume (taken inside a
//! [`Mutation`], so it holds across replicas), and the usage nodes report.

use sqlx::{Any, Executor, FromRow};
use verge_api::wire::VolumeUsage;

use super::events::Mutation;
use super::{Result, Store, new_id};
use crate::time::now_ms;

/// A volume as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct VolumeRow {
    pub id: String,
    pub env_id: String,
    pub name: String,
    pub node_id: String,
    /// Bytes.
    pub size: i64,
    /// `creating`, `ready`, `resizing`, `restoring`, `deleting` or `failed`.
    pub state: String,
    /// Bytes in use, as the node last reported.
    pub used: Option<i64>,
    pub used_at: Option<i64>,
    /// `loop` or `directory`, as the node last reported.
    pub backend: Option<String>,
    pub message: Option<String>,
    /// The operation running now (`create`, `resize`, `snapshot`,
    /// `restore`, `delete`), if any, and since when.
    pub op: Option<String>,
    pub op_started: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

const VOLUME_COLUMNS: &str = "id, env_id, name, node_id, size, state, used, used_at, backend, \
    message, op, op_started, created_at, updated_at";

/// A snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct SnapshotRow {
    pub id: String,
    /// The volume it was taken of (which may be gone since).
    pub volume_id: String,
    pub volume_name: String,
    pub env_id: String,
    pub node_id: String,
    /// The volume's size when it was taken.
    pub size: i64,
    pub used: Option<i64>,
    pub created_at: i64,
}

const SNAPSHOT_COLUMNS: &str =
    "id, volume_id, volume_name, env_id, node_id, size, used, created_at";

/// A volume about to be made on its node.
#[derive(Debug, Clone)]
pub struct NewVolume<'a> {
    pub env_id: &'a str,
    pub name: &'a str,
    pub node_id: &'a str,
    pub size: i64,
    /// `creating`, or `restoring` for one made of a snapshot.
    pub state: &'a str,
    /// The operation that makes it (`create`, `restore`).
    pub op: &'a str,
}

/// How an operation on a volume ended.
#[derive(Debug, Clone, Default)]
pub struct OpEnd<'a> {
    pub state: &'a str,
    /// The size the node reported, when it did.
    pub size: Option<i64>,
    pub used: Option<i64>,
    pub backend: Option<&'a str>,
    /// Replaces the volume's message (`None` clears it).
    pub message: Option<String>,
}

async fn volumes_where<'e>(
    e: impl Executor<'e, Database = Any>,
    filter: &str,
    args: &[&str],
) -> Result<Vec<VolumeRow>> {
    let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE {filter} ORDER BY name, id");
    let mut q = sqlx::query_as(&sql);
    for a in args {
        q = q.bind(*a);
    }
    Ok(q.fetch_all(e).await?)
}

async fn snapshots_where<'e>(
    e: impl Executor<'e, Database = Any>,
    filter: &str,
    args: &[&str],
) -> Result<Vec<SnapshotRow>> {
    let sql = format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM volume_snapshots WHERE {filter} ORDER BY created_at, id"
    );
    let mut q = sqlx::query_as(&sql);
    for a in args {
        q = q.bind(*a);
    }
    Ok(q.fetch_all(e).await?)
}

/// Bytes as stored (`BIGINT`); sizes beyond `i64` do not occur (volumes
/// are capped far below), so saturating is only a guard.
pub(crate) fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// The env's volumes, by name.
    pub async fn volumes(&self, env_id: &str) -> Result<Vec<VolumeRow>> {
        volumes_where(&self.pool, "env_id = $1", &[env_id]).await
    }

    pub async fn volume_by_name(&self, env_id: &str, name: &str) -> Result<Option<VolumeRow>> {
        Ok(
            volumes_where(&self.pool, "env_id = $1 AND name = $2", &[env_id, name])
                .await?
                .pop(),
        )
    }

    /// Every volume held by a node, of any env.
    pub async fn node_volumes(&self, node_id: &str) -> Result<Vec<VolumeRow>> {
        volumes_where(&self.pool, "node_id = $1", &[node_id]).await
    }

    /// Snapshots of the env, oldest first; of the volume named `volume`
    /// (current or deleted) when given.
    pub async fn snapshots(&self, env_id: &str, volume: Option<&str>) -> Result<Vec<SnapshotRow>> {
        match volume {
            Some(v) => {
                snapshots_where(&self.pool, "env_id = $1 AND volume_name = $2", &[env_id, v]).await
            }
            None => snapshots_where(&self.pool, "env_id = $1", &[env_id]).await,
        }
    }

    pub async fn snapshot(&self, env_id: &str, id: &str) -> Result<Option<SnapshotRow>> {
        Ok(
            snapshots_where(&self.pool, "env_id = $1 AND id = $2", &[env_id, id])
                .await?
                .pop(),
        )
    }

    /// Per node: the bytes of its volumes made since its last heartbeat,
    /// which the free space it reported does not count yet.
    pub async fn volume_bytes_since_heartbeat(&self) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT v.node_id, CAST(SUM(v.size) AS BIGINT) FROM volumes v \
             JOIN nodes n ON n.id = v.node_id \
             WHERE v.created_at >= COALESCE(n.last_seen, 0) GROUP BY v.node_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records what a node's heartbeat says about its volumes: use and
    /// backend, and a size larger than the stored one when no operation
    /// runs (a resize whose answer was lost). Volumes the store does not
    /// know on that node are ignored. Rows are written only when something
    /// changed, or the last report is older than `refresh_ms`.
    pub async fn record_volume_usage(
        &self,
        node_id: &str,
        reported: &[VolumeUsage],
        refresh_ms: i64,
    ) -> Result<usize> {
        if reported.is_empty() {
            return Ok(0);
        }
        let known = self.node_volumes(node_id).await?;
        let now = now_ms();
        let mut written = 0;
        for r in reported {
            let Some(row) = known.iter().find(|v| v.id == r.volume) else {
                continue;
            };
            let (used, size) = (bytes(r.used), bytes(r.size));
            let grown = row.op.is_none() && size > row.size;
            let same = row.used == Some(used) && row.backend.as_deref() == Some(r.backend.as_str());
            let fresh = row.used_at.is_some_and(|t| now - t < refresh_ms);
            if same && fresh && !grown {
                continue;
            }
            sqlx::query(
                "UPDATE volumes SET used = $3, backend = $4, used_at = $5, \
                 size = CASE WHEN op IS NULL AND size < $6 THEN $6 ELSE size END \
                 WHERE id = $1 AND node_id = $2",
            )
            .bind(&row.id)
            .bind(node_id)
            .bind(used)
            .bind(&r.backend)
            .bind(now)
            .bind(size)
            .execute(&self.pool)
            .await?;
            written += 1;
        }
        Ok(written)
    }
}

impl Mutation<'_> {
    pub async fn volume(&mut self, id: &str) -> Result<Option<VolumeRow>> {
        Ok(volumes_where(self.conn(), "id = $1", &[id]).await?.pop())
    }

    pub async fn volume_by_name(&mut self, env_id: &str, name: &str) -> Result<Option<VolumeRow>> {
        Ok(
            volumes_where(self.conn(), "env_id = $1 AND name = $2", &[env_id, name])
                .await?
                .pop(),
        )
    }

    /// Adds a volume with its first operation running; a taken name is
    /// [`StoreError::Conflict`](super::StoreError::Conflict).
    pub async fn insert_volume(&mut self, v: &NewVolume<'_>) -> Result<VolumeRow> {
        let id = new_id("vol");
        let now = now_ms();
        sqlx::query(
            "INSERT INTO volumes (id, env_id, name, node_id, size, state, op, op_started, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8)",
        )
        .bind(&id)
        .bind(v.env_id)
        .bind(v.name)
        .bind(v.node_id)
        .bind(v.size)
        .bind(v.state)
        .bind(v.op)
        .bind(now)
        .execute(self.conn())
        .await?;
        Ok(self
            .volume(&id)
            .await?
            .expect("inserted in this transaction"))
    }

    /// Marks `op` running on the volume, in `state`. The caller has
    /// checked, in this mutation, that no other operation runs.
    pub async fn start_volume_op(&mut self, id: &str, op: &str, state: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE volumes SET op = $2, op_started = $3, state = $4, updated_at = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(op)
        .bind(now)
        .bind(state)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Ends the running operation: the volume's new state, and what the
    /// node said about it.
    pub async fn end_volume_op(&mut self, id: &str, end: &OpEnd<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE volumes SET op = NULL, op_started = NULL, state = $2, \
             size = COALESCE($3, size), used = COALESCE($4, used), \
             used_at = CASE WHEN $4 IS NULL THEN used_at ELSE $7 END, \
             backend = COALESCE($5, backend), message = $6, updated_at = $7 WHERE id = $1",
        )
        .bind(id)
        .bind(end.state)
        .bind(end.size)
        .bind(end.used)
        .bind(end.backend)
        .bind(end.message.as_deref())
        .bind(now_ms())
        .execute(self.conn())
        .await?;
        Ok(())
    }

    pub async fn delete_volume(&mut self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM volumes WHERE id = $1")
            .bind(id)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Adds a snapshot the node has taken, with the ID it was taken under.
    pub async fn insert_snapshot(&mut self, s: &SnapshotRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO volume_snapshots (id, volume_id, volume_name, env_id, node_id, size, \
             used, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&s.id)
        .bind(&s.volume_id)
        .bind(&s.volume_name)
        .bind(&s.env_id)
        .bind(&s.node_id)
        .bind(s.size)
        .bind(s.used)
        .bind(s.created_at)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    pub async fn delete_snapshot(&mut self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM volume_snapshots WHERE id = $1")
            .bind(id)
            .execute(self.conn())
            .await?;
        Ok(())
    }
}

impl Store {
    /// Moves the start of a volume's running operation to now: a long
    /// operation (a copy between nodes) that is still making progress is
    /// not taken for abandoned.
    pub async fn touch_volume_op(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE volumes SET op_started = $2 WHERE id = $1 AND op IS NOT NULL")
            .bind(id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A new snapshot ID (the node keeps the snapshot under it).
pub fn new_snapshot_id() -> String {
    new_id("snap")
}
