//! Rollouts: one row per change of what an env should run (deploy,
//! rollback, scale, automatic rollback, cancel). The latest row of an env
//! is its rollout; the reconciler moves it from `pending` to `completed`,
//! `failed`, `partial` or `canceled` and keeps its counts.

use sqlx::{Any, Executor, FromRow};

use super::events::Mutation;
use super::{Result, Store, new_id};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct RolloutRow {
    pub id: String,
    pub env_id: String,
    pub release_id: String,
    pub from_release_id: Option<String>,
    pub kind: String,
    pub state: String,
    pub reason: Option<String>,
    pub step: Option<String>,
    pub category: Option<String>,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub outgoing: i64,
    pub deadline_ms: i64,
    pub progress_at: i64,
    pub created_at: i64,
    pub created_by: Option<String>,
    pub ended_at: Option<i64>,
}

impl RolloutRow {
    /// `pending` or `in_progress`: the reconciler still moves it.
    pub fn is_active(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "in_progress")
    }

    /// Ended without reaching its release everywhere: the reconciler holds
    /// the env where it is instead of replacing more instances.
    pub fn holds(&self) -> bool {
        matches!(self.state.as_str(), "failed" | "partial" | "canceled")
    }
}

/// A rollout to start.
#[derive(Debug, Clone)]
pub struct NewRollout<'a> {
    pub env_id: &'a str,
    pub release_id: &'a str,
    pub from_release_id: Option<&'a str>,
    pub kind: &'a str,
    pub deadline_ms: i64,
    pub created_by: Option<&'a str>,
}

const COLUMNS: &str = "id, env_id, release_id, from_release_id, kind, state, reason, step, \
    category, total, done, failed, outgoing, deadline_ms, progress_at, created_at, created_by, \
    ended_at";

async fn latest<'e>(
    e: impl Executor<'e, Database = Any>,
    env_id: &str,
) -> Result<Option<RolloutRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rollouts WHERE env_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1"
    );
    Ok(sqlx::query_as(&sql).bind(env_id).fetch_optional(e).await?)
}

impl Store {
    /// The env's rollout: its latest.
    pub async fn latest_rollout(&self, env_id: &str) -> Result<Option<RolloutRow>> {
        latest(&self.pool, env_id).await
    }

    /// The env's rollouts, newest first.
    pub async fn rollouts(&self, env_id: &str, limit: i64) -> Result<Vec<RolloutRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM rollouts WHERE env_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        );
        Ok(sqlx::query_as(&sql)
            .bind(env_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}

impl Mutation<'_> {
    pub async fn latest_rollout(&mut self, env_id: &str) -> Result<Option<RolloutRow>> {
        latest(self.conn(), env_id).await
    }

    /// Starts a rollout; the env's active one, if any, ends `canceled`
    /// (superseded) and is returned.
    pub async fn start_rollout(
        &mut self,
        new: &NewRollout<'_>,
        superseded_by: &str,
    ) -> Result<(String, Option<RolloutRow>)> {
        let before = self.latest_rollout(new.env_id).await?;
        // Strictly after the latest, so "latest" never depends on ID order.
        let now = now_ms().max(before.as_ref().map_or(0, |b| b.created_at + 1));
        let superseded = match before {
            Some(mut r) if r.is_active() => {
                r.state = "canceled".into();
                r.reason = Some(format!("superseded by {superseded_by}"));
                r.ended_at = Some(now);
                self.update_rollout(&r).await?;
                Some(r)
            }
            _ => None,
        };
        let id = new_id("ro");
        sqlx::query(
            "INSERT INTO rollouts (id, env_id, release_id, from_release_id, kind, state, \
             deadline_ms, progress_at, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $7, $8)",
        )
        .bind(&id)
        .bind(new.env_id)
        .bind(new.release_id)
        .bind(new.from_release_id)
        .bind(new.kind)
        .bind(new.deadline_ms)
        .bind(now)
        .bind(new.created_by)
        .execute(self.conn())
        .await?;
        Ok((id, superseded))
    }

    /// Stores a rollout's state, step and counts.
    pub async fn update_rollout(&mut self, r: &RolloutRow) -> Result<()> {
        sqlx::query(
            "UPDATE rollouts SET state = $2, reason = $3, step = $4, category = $5, total = $6, \
             done = $7, failed = $8, outgoing = $9, progress_at = $10, ended_at = $11 \
             WHERE id = $1",
        )
        .bind(&r.id)
        .bind(&r.state)
        .bind(&r.reason)
        .bind(&r.step)
        .bind(&r.category)
        .bind(r.total)
        .bind(r.done)
        .bind(r.failed)
        .bind(r.outgoing)
        .bind(r.progress_at)
        .bind(r.ended_at)
        .execute(self.conn())
        .await?;
        Ok(())
    }
}
