//! A fresh PostgreSQL database per test, on the server named by
//! `VERGE_TEST_POSTGRES` (an admin URL; `bash tests/run.sh` installs, starts
//! and exports one). Without it, PostgreSQL tests fail and say so.

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// The server's admin URL, or a panic that says how to get one.
pub fn admin_url() -> String {
    std::env::var("VERGE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "VERGE_TEST_POSTGRES is not set: PostgreSQL tests need a server. \
             Run `bash tests/run.sh` (installs and starts one), or export \
             VERGE_TEST_POSTGRES=postgres://USER:PASSWORD@127.0.0.1:5432/postgres"
        )
    })
}

/// Test databases older than this are dropped by the next [`fresh_database`].
pub const STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Creates an empty database `verge_test_<ulid>` and returns its URL.
///
/// First drops, best effort, the `verge_test_<ulid>` databases created more
/// than [`STALE_AFTER`] ago (by the ULID's timestamp): what earlier runs
/// left. Younger ones may belong to a run still going and are never touched.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let name = format!(
        "verge_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let mut conn = connect(&admin).await;
    drop_stale_databases(&mut conn).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = conn.close().await;
    let (base, _db) = admin
        .rsplit_once('/')
        .expect("admin URL has a database path");
    format!("{base}/{name}")
}

async fn connect(admin: &str) -> PgConnection {
    PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to VERGE_TEST_POSTGRES ({admin}): {e}"))
}

/// Any number; the advisory lock keeps concurrent tests from all sweeping at once.
const SWEEP_LOCK: i64 = 0x7665_7267_655f_7478; // "verge_tx"

/// Drops the stale test databases, ignoring every error (a database still in
/// use stays; no `WITH (FORCE)`). Bounded in time, and skipped while another
/// test sweeps, so it never holds a test up for long.
async fn drop_stale_databases(conn: &mut PgConnection) {
    let sweep = async {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SWEEP_LOCK)
            .fetch_one(&mut *conn)
            .await
            .unwrap_or(false);
        if !locked {
            return;
        }
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'verge\\_test\\_%'",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_default();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for name in names.into_iter().filter(|n| is_stale(n, now_ms)) {
            // The name is `verge_test_` and a checked ULID: nothing to quote.
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut *conn)
                .await;
        }
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SWEEP_LOCK)
            .execute(&mut *conn)
            .await;
    };
    if tokio::time::timeout(Duration::from_secs(15), sweep)
        .await
        .is_err()
    {
        // A cancelled query leaves the connection unusable (and the lock
        // held until it closes): use a new one for the CREATE.
        let fresh = connect(&admin_url()).await;
        let old = std::mem::replace(conn, fresh);
        let _ = old.close().await;
    }
}

/// Whether `name` is `verge_test_<lower-case ULID>` created more than
/// [`STALE_AFTER`] before `now_ms`.
fn is_stale(name: &str, now_ms: u64) -> bool {
    let Some(id) = name.strip_prefix("verge_test_") else {
        return false;
    };
    if id.len() != 26
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return false;
    }
    match ulid::Ulid::from_string(&id.to_uppercase()) {
        Ok(ulid) => now_ms.saturating_sub(ulid.timestamp_ms()) > STALE_AFTER.as_millis() as u64,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_ulid_named_databases_are_stale() {
        let now = 1_800_000_000_000;
        let at = |ms: u64| {
            format!(
                "verge_test_{}",
                ulid::Ulid::from_parts(ms, 42).to_string().to_lowercase()
            )
        };
        assert!(is_stale(&at(now - 2 * 3_600_000), now));
        assert!(!is_stale(&at(now - 60_000), now));
        assert!(!is_stale(&at(now + 60_000), now), "clock skew: not stale");
        assert!(!is_stale("verge_test_", now));
        assert!(!is_stale("verge_test_keep", now));
        assert!(
            !is_stale("verge_test_0000000000000000000000000u", now),
            "not a ULID letter"
        );
        let upper = at(now - 2 * 3_600_000)
            .replace("verge_test_", "")
            .to_uppercase();
        assert!(
            !is_stale(&format!("verge_test_{upper}"), now),
            "names are lower-case"
        );
        assert!(!is_stale("postgres", now));
    }
}
