//! The store: all desired state, in SQL, over sqlx.
//!
//! One interface, [`Store`], two real backends: SQLite (the embedded default,
//! one file in the data dir, WAL) and PostgreSQL (for several control-plane
//! replicas). Queries are written once in the SQL both dialects share and run
//! through sqlx's `Any` driver, with `$N` placeholders (which SQLite accepts
//! too). What the dialects do not share, such as triggers, lives in the
//! per-backend migrations under `control/migrations/{sqlite,postgres}`, which
//! run on start. The same test suite (`control/tests/store.rs`) runs against
//! both backends.
//!
//! Rules for queries here: integers are `BIGINT` (decoded as `i64`), times
//! are milliseconds since the epoch, booleans are stored as integers, and
//! every org-scoped query takes the org's ID so that isolation is enforced in
//! SQL, not only in the HTTP layer.

mod config;
mod endpoints;
mod events;
mod instances;
mod listeners;
mod nodes;
mod nouns;
mod releases;
mod rollouts;
mod tokens;
mod volumes;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection as _, Executor};

pub use config::{ConfigVersion, SecretVersionRow};
pub use endpoints::{EndpointAddressRow, IngressRow};
pub use events::{EventFilter, EventRow, Mutation, NewEvent, Placed};
pub use instances::{EnvScope, InstanceRow, NewInstance, Reported};
pub use listeners::ListenerRow;
pub use nodes::{Hello, JoinTokenRow, NewNode, NodeRow};
pub use nouns::{AppRow, EnvRow, OrgRow, ProjectRow};
pub use releases::{ReleaseRow, ScaleRow};
pub use rollouts::{NewRollout, RolloutRow};
pub use tokens::{Revoke, TokenRow};
pub use volumes::{NewVolume, OpEnd, SnapshotRow, VolumeRow, new_snapshot_id};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names, if it is one Verge supports.
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with the same unique key exists.
    #[error("already exists")]
    Conflict,
    #[error("cannot open database {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database could not be reached in time (down, network, pool exhausted).
    #[error("database unreachable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// An endpoint cannot have the address or port it needs; says which and why.
    #[error("{0}")]
    Endpoint(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            _ => StoreError::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Bumped after every commit that appended events (see [`Mutation`]).
    events_committed: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Store {
    /// Opens the database at `url` (creating a SQLite file if needed) and
    /// runs the migrations of its backend.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or_else(|| StoreError::UnsupportedUrl(url.into()))?;
        let connect_url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let connect_err = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let options = AnyConnectOptions::from_str(&connect_url).map_err(connect_err)?;
        // One direct connection first: the pool would retry until its acquire
        // timeout and report only "timed out", hiding the real cause.
        sqlx::AnyConnection::connect_with(&options)
            .await
            .map_err(connect_err)?
            .close()
            .await
            .map_err(connect_err)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Per connection: wait for the writer instead of failing,
                        // and enforce the REFERENCES clauses.
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        // Every commit reaches the disk before it is acknowledged.
                        conn.execute("PRAGMA synchronous = FULL").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        if backend == Backend::Sqlite {
            // Persistent in the file: readers never block the writer.
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        let store = Store {
            pool,
            backend,
            events_committed: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&store.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&store.pool).await?,
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A round trip to the database, for health checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection; on SQLite this checkpoints the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Records a one-time fact under `key`; true only for the first caller,
    /// even among replicas racing on one PostgreSQL.
    pub async fn claim_once(&self, key: &str, value: &str) -> Result<bool> {
        let done = sqlx::query(CLAIM)
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The value recorded under `key` by [`claim_once`](Self::claim_once), if any.
    pub async fn cluster_fact(&self, key: &str) -> Result<Option<String>> {
        let value = sqlx::query_scalar("SELECT value FROM cluster_meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(value)
    }

    /// Replaces the value of a fact recorded by `claim_once` (key rotation).
    pub async fn update_cluster_fact(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("UPDATE cluster_meta SET value = $2 WHERE key = $1")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The first start's admin token, atomically with the fact that it was
    /// made: true when this call created it (one replica wins a race), false
    /// when the cluster was bootstrapped before.
    pub async fn bootstrap_admin_token(&self, name: &str, hash: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(CLAIM)
            .bind("admin_token_created")
            .bind("true")
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if claimed {
            tokens::insert(&mut tx, None, name, hash).await?;
        }
        tx.commit().await?;
        Ok(claimed)
    }
}

const CLAIM: &str =
    "INSERT INTO cluster_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";

/// A new ID: `prefix_` and a lower-case ULID (sortable by creation time).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// A new node ID.
pub fn new_node_id() -> String {
    new_id("n")
}

/// `url` without its password, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            super::redact("postgres://verge:s3cret@db:5432/verge"),
            "postgres://verge:***@db:5432/verge"
        );
        assert_eq!(
            super::redact("sqlite:///var/lib/verge.db"),
            "sqlite:///var/lib/verge.db"
        );
    }
}
