//! Mutations and the event log.
//!
//! Every change of desired state runs in a [`Mutation`]: a transaction that
//! first takes the row lock of the `events` counter. That lock serialises
//! mutations across all replicas of one database, so a compare-and-set read
//! inside a mutation sees every earlier commit, and event cursors become
//! visible in the order they were taken: a follower reading `cursor > N`
//! never skips an event that commits later with a smaller cursor.

use sqlx::{Any, AnyConnection, FromRow, Transaction};

use super::{Result, Store};
use crate::time::now_ms;

/// An event to append, tied to what it is about.
#[derive(Debug, Clone, Default)]
pub struct NewEvent<'a> {
    /// `None`: an event of the cluster itself, seen only by admins.
    pub org_id: Option<&'a str>,
    pub app_id: Option<&'a str>,
    pub env_id: Option<&'a str>,
    pub release_id: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub node_id: Option<&'a str>,
    pub kind: &'a str,
    pub message: String,
    /// The token that caused it: `name (id)`.
    pub actor: Option<&'a str>,
}

impl<'a> NewEvent<'a> {
    /// An event about a node (a cluster event: no org sees it).
    pub fn about_node(node_id: &'a str, kind: &'a str, message: String) -> NewEvent<'a> {
        NewEvent {
            node_id: Some(node_id),
            kind,
            message,
            ..NewEvent::default()
        }
    }
}

/// An event as read back, with the names of its org, app and env.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct EventRow {
    pub cursor: i64,
    pub created_at: i64,
    pub kind: String,
    pub message: String,
    pub org: Option<String>,
    pub app: Option<String>,
    pub env: Option<String>,
    pub release_id: Option<String>,
    pub instance_id: Option<String>,
    /// The node's name (its ID if it has none).
    pub node_id: Option<String>,
    pub actor: Option<String>,
}

/// An instance placed on a node, from its `instance.placed` event.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Placed {
    pub instance_id: String,
    pub node_id: String,
    pub placed_at: i64,
}

/// Which events to read: all (cluster-wide), one org's, or one env's,
/// after a cursor.
#[derive(Debug, Clone)]
pub struct EventFilter {
    /// `None`: every event of the cluster (admins only).
    pub org_id: Option<String>,
    pub env_id: Option<String>,
    pub after: i64,
    pub since_ms: i64,
    pub limit: i64,
}

/// A transaction that changes desired state and appends its events.
#[derive(Debug)]
pub struct Mutation<'s> {
    tx: Transaction<'static, Any>,
    store: &'s Store,
    emitted: bool,
}

impl Store {
    /// Starts a mutation; waits for any other mutation on this database.
    pub async fn mutation(&self) -> Result<Mutation<'_>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE counters SET value = value WHERE name = 'events'")
            .execute(&mut *tx)
            .await?;
        Ok(Mutation {
            tx,
            store: self,
            emitted: false,
        })
    }

    /// Events matching `filter`, oldest first.
    pub async fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>> {
        let rows = sqlx::query_as(
            "SELECT e.cursor, e.created_at, e.kind, e.message, o.name AS org, a.name AS app, \
             v.name AS env, e.release_id, e.instance_id, COALESCE(n.name, e.node_id) AS node_id, \
             e.actor FROM events e LEFT JOIN orgs o ON o.id = e.org_id \
             LEFT JOIN apps a ON a.id = e.app_id LEFT JOIN envs v ON v.id = e.env_id \
             LEFT JOIN nodes n ON n.id = e.node_id \
             WHERE ($1 IS NULL OR e.org_id = $1) AND ($2 IS NULL OR e.env_id = $2) \
             AND e.cursor > $3 \
             AND e.created_at >= $4 ORDER BY e.cursor LIMIT $5",
        )
        .bind(filter.org_id.as_deref())
        .bind(filter.env_id.as_deref())
        .bind(filter.after)
        .bind(filter.since_ms)
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The instances of an env placed on a node, as recorded by their
    /// `instance.placed` events, with the node (ID) and when; newest first,
    /// at most `limit`. Earlier instances' logs are found through it.
    pub async fn placed_history(&self, env_id: &str, limit: i64) -> Result<Vec<Placed>> {
        let rows = sqlx::query_as(
            "SELECT instance_id, node_id, MAX(created_at) AS placed_at FROM events \
             WHERE env_id = $1 AND kind = 'instance.placed' \
             AND instance_id IS NOT NULL AND node_id IS NOT NULL \
             GROUP BY instance_id, node_id ORDER BY placed_at DESC LIMIT $2",
        )
        .bind(env_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// A receiver that changes whenever this process commits events; other
    /// replicas' events are found by polling.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_committed.subscribe()
    }
}

impl Mutation<'_> {
    /// The transaction's connection, for the store's queries.
    pub(crate) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Appends an event; returns its cursor.
    pub async fn emit(&mut self, event: NewEvent<'_>) -> Result<i64> {
        let cursor: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + 1 WHERE name = 'events' RETURNING value",
        )
        .fetch_one(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO events (cursor, org_id, app_id, env_id, release_id, instance_id, \
             node_id, kind, message, actor, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(cursor)
        .bind(event.org_id)
        .bind(event.app_id)
        .bind(event.env_id)
        .bind(event.release_id)
        .bind(event.instance_id)
        .bind(event.node_id)
        .bind(event.kind)
        .bind(&event.message)
        .bind(event.actor)
        .bind(now_ms())
        .execute(&mut *self.tx)
        .await?;
        self.emitted = true;
        Ok(cursor)
    }

    /// Commits, then wakes this process's event followers.
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        if self.emitted {
            self.store.events_committed.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}
