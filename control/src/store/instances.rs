//! Instances: what the control plane wants placed where (`goal`), and what
//! their nodes last reported (`state` and the columns after it).

use sqlx::{Any, Executor, FromRow};

use super::events::Mutation;
use super::{Result, Store, StoreError, new_id};
use crate::time::now_ms;

/// An instance as stored, with its node's name.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct InstanceRow {
    pub id: String,
    pub env_id: String,
    pub release_id: String,
    pub workload: String,
    pub slot: i64,
    pub node_id: Option<String>,
    pub node_name: Option<String>,
    /// `run` or `stop`.
    pub goal: String,
    pub state: String,
    pub category: Option<String>,
    pub message: Option<String>,
    pub address: Option<String>,
    pub restarts: i64,
    pub cpu_millis: i64,
    pub memory: i64,
    pub created_at: i64,
    /// When its state last changed (a report with the same state keeps it).
    pub updated_at: i64,
    /// The node's last health verdict: `None`, `Some(1)` healthy, `Some(0)` unhealthy.
    pub healthy: Option<i64>,
}

impl InstanceRow {
    pub fn healthy(&self) -> Option<bool> {
        self.healthy.map(|h| h != 0)
    }
}

const INSTANCE_SELECT: &str = "SELECT i.id, i.env_id, i.release_id, i.workload, i.slot, \
    i.node_id, n.name AS node_name, i.goal, i.state, i.category, i.message, i.address, \
    i.restarts, i.cpu_millis, i.memory, i.created_at, i.updated_at, i.healthy \
    FROM instances i LEFT JOIN nodes n ON n.id = i.node_id";

/// A new instance slot of a release's workload.
#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    pub env_id: &'a str,
    pub release_id: &'a str,
    pub workload: &'a str,
    pub slot: i64,
    pub node_id: Option<&'a str>,
    pub cpu_millis: i64,
    pub memory: i64,
    /// Why it has no node, when it has none.
    pub message: Option<String>,
}

/// What a node reported about one of its instances.
#[derive(Debug, Clone)]
pub struct Reported<'a> {
    pub state: &'a str,
    pub category: Option<&'a str>,
    pub message: Option<&'a str>,
    pub address: Option<&'a str>,
    pub restarts: i64,
    pub healthy: Option<bool>,
}

async fn select<'e>(
    e: impl Executor<'e, Database = Any>,
    filter: &str,
    arg: &str,
) -> Result<Vec<InstanceRow>> {
    let sql = format!("{INSTANCE_SELECT} WHERE {filter} ORDER BY i.workload, i.slot, i.created_at");
    Ok(sqlx::query_as(&sql).bind(arg).fetch_all(e).await?)
}

impl Store {
    /// Every instance of an env, wanted or still stopping.
    pub async fn env_instances(&self, env_id: &str) -> Result<Vec<InstanceRow>> {
        select(&self.pool, "i.env_id = $1", env_id).await
    }

    /// Every instance placed on a node, wanted or still stopping.
    pub async fn node_instances(&self, node_id: &str) -> Result<Vec<InstanceRow>> {
        select(&self.pool, "i.node_id = $1", node_id).await
    }

    /// IDs of envs that have a current release (the reconciler's work list).
    pub async fn envs_with_release(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM envs WHERE current_release IS NOT NULL ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

impl Mutation<'_> {
    pub async fn env_instances(&mut self, env_id: &str) -> Result<Vec<InstanceRow>> {
        select(self.conn(), "i.env_id = $1", env_id).await
    }

    /// Every instance that counts against its node's capacity (goal `run`, placed).
    pub async fn placed_instances(&mut self) -> Result<Vec<InstanceRow>> {
        select(self.conn(), "i.goal = $1 AND i.node_id IS NOT NULL", "run").await
    }

    pub async fn instance(&mut self, id: &str) -> Result<Option<InstanceRow>> {
        Ok(select(self.conn(), "i.id = $1", id).await?.pop())
    }

    /// Adds an instance; returns its ID.
    pub async fn insert_instance(&mut self, n: &NewInstance<'_>) -> Result<String> {
        let id = new_id("i");
        let now = now_ms();
        sqlx::query(
            "INSERT INTO instances (id, env_id, release_id, workload, slot, node_id, goal, \
             state, message, cpu_millis, memory, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'run', 'pending', $7, $8, $9, $10, $10)",
        )
        .bind(&id)
        .bind(n.env_id)
        .bind(n.release_id)
        .bind(n.workload)
        .bind(n.slot)
        .bind(n.node_id)
        .bind(n.message.as_deref())
        .bind(n.cpu_millis)
        .bind(n.memory)
        .bind(now)
        .execute(self.conn())
        .await?;
        if let Some(node) = n.node_id {
            self.reserve(node, n.cpu_millis, n.memory).await?;
        }
        Ok(id)
    }

    /// Adds to (or, negative, takes from) what a node has reserved. Adding
    /// more than the node has free is a [`StoreError::Conflict`]: the
    /// reconciler planned on a stale view (another replica placed there
    /// meanwhile) and plans again.
    async fn reserve(&mut self, node_id: &str, cpu_millis: i64, memory: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE nodes SET used_cpu_millis = used_cpu_millis + $2, \
             used_memory = used_memory + $3 WHERE id = $1 AND ($2 <= 0 AND $3 <= 0 \
             OR used_cpu_millis + $2 <= cpu_millis AND used_memory + $3 <= memory)",
        )
        .bind(node_id)
        .bind(cpu_millis)
        .bind(memory)
        .execute(self.conn())
        .await?;
        if done.rows_affected() == 0 && (cpu_millis > 0 || memory > 0) {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    /// Gives back what a placed instance with goal `run` reserved (before
    /// it stops counting: goal `stop`, or deleted).
    async fn unreserve(&mut self, id: &str) -> Result<()> {
        if let Some(i) = self.instance(id).await?
            && i.goal == "run"
            && let Some(node) = &i.node_id
        {
            self.reserve(node, -i.cpu_millis, -i.memory).await?;
        }
        Ok(())
    }

    /// Places a pending instance on a node (or records why it cannot be).
    pub async fn place_instance(
        &mut self,
        id: &str,
        node_id: Option<&str>,
        message: Option<&str>,
    ) -> Result<()> {
        self.unreserve(id).await?;
        sqlx::query(
            "UPDATE instances SET node_id = $2, message = $3, updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(node_id)
        .bind(message)
        .bind(now_ms())
        .execute(self.conn())
        .await?;
        if let Some(node) = node_id
            && let Some(i) = self.instance(id).await?
        {
            self.reserve(node, i.cpu_millis, i.memory).await?;
        }
        Ok(())
    }

    /// The control plane no longer wants this instance; its node stops it.
    pub async fn stop_instance(&mut self, id: &str) -> Result<()> {
        self.unreserve(id).await?;
        sqlx::query("UPDATE instances SET goal = 'stop', updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now_ms())
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Forgets an instance that is gone (stopped on its node, or never placed).
    pub async fn delete_instance(&mut self, id: &str) -> Result<()> {
        self.unreserve(id).await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    /// Records a node's report about one of *its* instances; `false` when
    /// the instance is not (or no longer) placed on that node.
    pub async fn report_instance(
        &mut self,
        node_id: &str,
        id: &str,
        r: &Reported<'_>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE instances SET state = $3, category = $4, message = $5, \
             address = COALESCE($6, address), restarts = $7, healthy = $9, \
             updated_at = CASE WHEN state = $3 THEN updated_at ELSE $8 END \
             WHERE id = $1 AND node_id = $2",
        )
        .bind(id)
        .bind(node_id)
        .bind(r.state)
        .bind(r.category)
        .bind(r.message)
        .bind(r.address)
        .bind(r.restarts)
        .bind(now_ms())
        .bind(r.healthy.map(i64::from))
        .execute(self.conn())
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// IDs and names around an env, for events and for instance specs.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct EnvScope {
    pub org_id: String,
    pub org: String,
    pub app_id: String,
    pub app: String,
    pub env_id: String,
    pub env: String,
}

async fn env_scope<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<Option<EnvScope>> {
    Ok(sqlx::query_as(
        "SELECT o.id AS org_id, o.name AS org, a.id AS app_id, a.name AS app, \
         e.id AS env_id, e.name AS env FROM envs e JOIN apps a ON a.id = e.app_id \
         JOIN orgs o ON o.id = a.org_id WHERE e.id = $1",
    )
    .bind(env_id)
    .fetch_optional(e)
    .await?)
}

impl Store {
    pub async fn env_scope(&self, env_id: &str) -> Result<Option<EnvScope>> {
        env_scope(&self.pool, env_id).await
    }
}

impl Mutation<'_> {
    /// The env's scope, read on the mutation's own connection (a second
    /// pool connection while holding the mutation lock could wait forever).
    pub async fn env_scope(&mut self, env_id: &str) -> Result<Option<EnvScope>> {
        env_scope(self.conn(), env_id).await
    }
}
