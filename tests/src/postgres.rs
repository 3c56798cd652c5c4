//! A fresh PostgreSQL database per test, on the server named by
//! `VERGE_TEST_POSTGRES` (an admin URL; `bash tests/run.sh` installs, starts
//! and exports one). Without it, PostgreSQL tests fail and say so.

use sqlx::Connection as _;

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

/// Creates an empty database `verge_test_<ulid>` and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_url();
    let name = format!(
        "verge_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let mut conn = sqlx::postgres::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to VERGE_TEST_POSTGRES ({admin}): {e}"));
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
