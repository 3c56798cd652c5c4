//! Join tokens, nodes and their liveness.

use sqlx::FromRow;

use super::events::{Mutation, NewEvent};
use super::{Result, Store, new_id};
use crate::time::now_ms;

/// A stored join token (the secret only as its hash).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct JoinTokenRow {
    pub id: String,
    pub secret_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
    pub uses: i64,
    pub max_uses: i64,
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    /// JSON object.
    pub labels: String,
    pub cpu_millis: i64,
    pub memory: i64,
    /// JSON of `verge_api::wire::Usage`, from the last heartbeat.
    pub usage: Option<String>,
    pub isolation: String,
    pub version: String,
    pub state: String,
    pub state_since: i64,
    pub last_seen: Option<i64>,
    pub prefix_index: i64,
    pub instance_prefix: String,
    pub cert_sha256: String,
    pub joined_at: i64,
    pub desired_version: i64,
    pub applied_version: i64,
    /// `None` (schedulable), `draining` or `drained`.
    pub drain: Option<String>,
    pub drain_deadline: Option<i64>,
    /// Reserved by its instances with goal `run`.
    pub used_cpu_millis: i64,
    pub used_memory: i64,
    /// 1 when the node said it is behind NAT (ingresses use its session).
    pub behind_nat: i64,
}

const NODE_COLUMNS: &str = "id, name, labels, cpu_millis, memory, usage, isolation, version, \
    state, state_since, last_seen, prefix_index, instance_prefix, cert_sha256, joined_at, \
    desired_version, applied_version, drain, drain_deadline, used_cpu_millis, used_memory, \
    behind_nat";

/// What a joining node becomes.
#[derive(Debug, Clone)]
pub struct NewNode<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub labels: &'a str,
    pub cpu_millis: i64,
    pub memory: i64,
    pub isolation: &'a str,
    pub version: &'a str,
    pub cert_sha256: &'a str,
    pub join_token_id: &'a str,
}

/// What a node says about itself when its session starts.
#[derive(Debug, Clone)]
pub struct Hello<'a> {
    pub labels: &'a str,
    pub cpu_millis: i64,
    pub memory: i64,
    pub isolation: &'a str,
    pub version: &'a str,
    pub applied_version: i64,
    pub behind_nat: bool,
}

impl Store {
    /// Stores a new join token; returns its ID.
    pub async fn create_join_token(
        &self,
        secret_hash: &str,
        expires_at: i64,
        max_uses: i64,
        created_by: &str,
    ) -> Result<String> {
        let id = new_id("jt").replace('_', "");
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, created_at, expires_at, max_uses, \
             created_by) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(secret_hash)
        .bind(now_ms())
        .bind(expires_at)
        .bind(max_uses)
        .bind(created_by)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRow>> {
        Ok(sqlx::query_as(
            "SELECT id, secret_hash, created_at, expires_at, created_by, uses, max_uses \
             FROM join_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name");
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    pub async fn node_by_name(&self, name: &str) -> Result<Option<NodeRow>> {
        self.node_where("name", name).await
    }

    pub async fn node(&self, id: &str) -> Result<Option<NodeRow>> {
        self.node_where("id", id).await
    }

    /// The node whose client certificate has this SHA-256 fingerprint.
    pub async fn node_by_cert(&self, cert_sha256: &str) -> Result<Option<NodeRow>> {
        self.node_where("cert_sha256", cert_sha256).await
    }

    /// The node whose unique `column` (a name from this file) is `value`.
    async fn node_where(&self, column: &'static str, value: &str) -> Result<Option<NodeRow>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE {column} = $1");
        Ok(sqlx::query_as(&sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Records a heartbeat: the node is alive now. A node marked offline
    /// (its heartbeats were late) is online again, with an event; returns
    /// whether that happened.
    pub async fn node_heartbeat(
        &self,
        node: &NodeRow,
        cpu_millis: i64,
        memory: i64,
        usage: &str,
    ) -> Result<bool> {
        sqlx::query(
            "UPDATE nodes SET last_seen = $2, cpu_millis = $3, memory = $4, usage = $5 \
             WHERE id = $1",
        )
        .bind(&node.id)
        .bind(now_ms())
        .bind(cpu_millis)
        .bind(memory)
        .bind(usage)
        .execute(&self.pool)
        .await?;
        let offline: Option<String> =
            sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1 AND state = 'offline'")
                .bind(&node.id)
                .fetch_optional(&self.pool)
                .await?;
        if offline.is_none() {
            return Ok(false);
        }
        let mut tx = self.mutation().await?;
        let back = tx.mark_online(node).await?;
        tx.commit().await?;
        Ok(back)
    }

    /// Marks `offline` every online node last seen before `cutoff_ms` (and
    /// not before `seen_since_ms`), with an event each; returns them. Safe
    /// to run on every replica at once: the conditional update lets exactly
    /// one of them win per node.
    pub async fn mark_lost_nodes(
        &self,
        cutoff_ms: i64,
        seen_since_ms: i64,
    ) -> Result<Vec<NodeRow>> {
        let sql = format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE state = 'online' \
             AND COALESCE(last_seen, 0) < $1 AND COALESCE(last_seen, 0) >= $2"
        );
        let candidates: Vec<NodeRow> = sqlx::query_as(&sql)
            .bind(cutoff_ms)
            .bind(seen_since_ms)
            .fetch_all(&self.pool)
            .await?;
        let mut lost = Vec::new();
        for node in candidates {
            let mut tx = self.mutation().await?;
            let now = now_ms();
            let done = sqlx::query(
                "UPDATE nodes SET state = 'offline', state_since = $2 \
                 WHERE id = $1 AND state = 'online' AND COALESCE(last_seen, 0) < $3",
            )
            .bind(&node.id)
            .bind(now)
            .bind(cutoff_ms)
            .execute(tx.conn())
            .await?;
            if done.rows_affected() == 1 {
                let silent = (now - node.last_seen.unwrap_or(node.state_since)) / 1000;
                let message = format!("node {} is offline: no heartbeat for {silent}s", node.name);
                tx.emit(NewEvent::about_node(&node.id, "node.offline", message))
                    .await?;
                tx.commit().await?;
                lost.push(node);
            }
        }
        Ok(lost)
    }
}

impl Mutation<'_> {
    pub async fn nodes(&mut self) -> Result<Vec<NodeRow>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name");
        Ok(sqlx::query_as(&sql).fetch_all(self.conn()).await?)
    }

    /// Adds a node with the next instance prefix index (`prefix_for` turns
    /// it into the prefix); returns it, or `None` when `prefix_for` has no
    /// prefix for that index (the cluster's prefix is used up).
    pub async fn insert_node(
        &mut self,
        n: &NewNode<'_>,
        prefix_for: impl Fn(i64) -> Option<String>,
    ) -> Result<Option<NodeRow>> {
        let index: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(prefix_index), 0) + 1 FROM nodes")
            .fetch_one(self.conn())
            .await?;
        let Some(prefix) = prefix_for(index) else {
            return Ok(None);
        };
        let now = now_ms();
        sqlx::query(
            "INSERT INTO nodes (id, name, labels, cpu_millis, memory, isolation, version, state, \
             state_since, prefix_index, instance_prefix, cert_sha256, joined_at, join_token_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'offline', $8, $9, $10, $11, $8, $12)",
        )
        .bind(n.id)
        .bind(n.name)
        .bind(n.labels)
        .bind(n.cpu_millis)
        .bind(n.memory)
        .bind(n.isolation)
        .bind(n.version)
        .bind(now)
        .bind(index)
        .bind(prefix)
        .bind(n.cert_sha256)
        .bind(n.join_token_id)
        .execute(self.conn())
        .await?;
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1");
        Ok(Some(
            sqlx::query_as(&sql)
                .bind(n.id)
                .fetch_one(self.conn())
                .await?,
        ))
    }

    /// Counts one use of a join token; `false` when it has none left.
    pub async fn use_join_token(&mut self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE join_tokens SET uses = uses + 1 WHERE id = $1 AND uses < max_uses")
                .bind(id)
                .execute(self.conn())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a node that joined but never connected (its join answer was
    /// lost, say) a new certificate and join details; `None` if the node
    /// has connected since, or does not exist.
    pub async fn rejoin_node(&mut self, n: &NewNode<'_>) -> Result<Option<NodeRow>> {
        let done = sqlx::query(
            "UPDATE nodes SET labels = $2, cpu_millis = $3, memory = $4, isolation = $5, \
             version = $6, cert_sha256 = $7, join_token_id = $8, joined_at = $9 \
             WHERE id = $1 AND last_seen IS NULL",
        )
        .bind(n.id)
        .bind(n.labels)
        .bind(n.cpu_millis)
        .bind(n.memory)
        .bind(n.isolation)
        .bind(n.version)
        .bind(n.cert_sha256)
        .bind(n.join_token_id)
        .bind(now_ms())
        .execute(self.conn())
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1");
        Ok(Some(
            sqlx::query_as(&sql)
                .bind(n.id)
                .fetch_one(self.conn())
                .await?,
        ))
    }

    /// A session started: record what the node says and mark it online.
    /// Returns whether it was offline before (an `online` event was emitted).
    pub async fn node_online(&mut self, node: &NodeRow, hello: &Hello<'_>) -> Result<bool> {
        let now = now_ms();
        let was_offline = self.mark_online(node).await?;
        sqlx::query(
            "UPDATE nodes SET labels = $2, cpu_millis = $3, memory = $4, isolation = $5, \
             version = $6, applied_version = $7, last_seen = $8, behind_nat = $9 WHERE id = $1",
        )
        .bind(&node.id)
        .bind(hello.labels)
        .bind(hello.cpu_millis)
        .bind(hello.memory)
        .bind(hello.isolation)
        .bind(hello.version)
        .bind(hello.applied_version)
        .bind(now)
        .bind(i64::from(hello.behind_nat))
        .execute(self.conn())
        .await?;
        Ok(was_offline)
    }

    /// Marks a node online (with an event) unless it is; true if it was not.
    async fn mark_online(&mut self, node: &NodeRow) -> Result<bool> {
        let changed = sqlx::query(
            "UPDATE nodes SET state = 'online', state_since = $2 WHERE id = $1 AND state <> 'online'",
        )
        .bind(&node.id)
        .bind(now_ms())
        .execute(self.conn())
        .await?
        .rows_affected()
            == 1;
        if changed {
            let message = format!("node {} is online", node.name);
            self.emit(NewEvent::about_node(&node.id, "node.online", message))
                .await?;
        }
        Ok(changed)
    }

    /// Starts (`Some("draining")`, with its deadline), finishes
    /// (`Some("drained")`) or ends (`None`) a node's drain.
    pub async fn set_drain(
        &mut self,
        node_id: &str,
        drain: Option<&str>,
        deadline: Option<i64>,
    ) -> Result<()> {
        sqlx::query("UPDATE nodes SET drain = $2, drain_deadline = $3 WHERE id = $1")
            .bind(node_id)
            .bind(drain)
            .bind(deadline)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Marks a draining node `drained` once it has no instance left (an
    /// offline node cannot confirm its stops: then none wanted is enough);
    /// `false` when it is not draining (any more) or not empty yet.
    pub async fn finish_drain(&mut self, node_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE nodes SET drain = 'drained', drain_deadline = NULL \
             WHERE id = $1 AND drain = 'draining' AND NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.node_id = $1 \
              AND (i.goal = 'run' OR nodes.state = 'online'))",
        )
        .bind(node_id)
        .execute(self.conn())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Bumps the desired-set version of each node; returns nothing (sessions re-read).
    pub async fn bump_desired(&mut self, node_ids: &[String]) -> Result<()> {
        for id in node_ids {
            sqlx::query("UPDATE nodes SET desired_version = desired_version + 1 WHERE id = $1")
                .bind(id)
                .execute(self.conn())
                .await?;
        }
        Ok(())
    }
}
