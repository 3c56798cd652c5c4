//! Looking straight into a control plane's database, past the API: what is
//! really stored (see [`ControlPlane::database_url`](crate::control::ControlPlane::database_url)).

use sqlx::Connection as _;

/// The `hash` column of every row of `tokens`, oldest first, read from the
/// database at `url` (`sqlite://PATH` or `postgres://...`). Proves tokens
/// are stored hashed, never in clear, on both backends.
///
/// SQLite is opened read-only; the control plane may keep running.
pub async fn stored_token_hashes(url: &str) -> Vec<String> {
    sqlx::any::install_default_drivers();
    let open = read_only(url);
    let mut conn = sqlx::AnyConnection::connect(&open)
        .await
        .unwrap_or_else(|e| panic!("cannot open the database {}: {e}", redact(url)));
    let hashes = sqlx::query_scalar::<_, String>("SELECT hash FROM tokens ORDER BY created_at, id")
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("SELECT hash FROM tokens in {}: {e}", redact(url)));
    let _ = conn.close().await;
    hashes
}

/// `url`, read-only when it is SQLite (PostgreSQL URLs are unchanged).
fn read_only(url: &str) -> String {
    if !url.starts_with("sqlite:") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode=ro")
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_string();
    }
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Runs `sql` on the database at `url` with a writable connection, as an
/// operator with direct access would: the rows affected, or the database's
/// own error message. Proves what the database itself refuses.
pub async fn execute(url: &str, sql: &str) -> Result<u64, String> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot open the database {}: {e}", redact(url)));
    let result = sqlx::query(sql)
        .execute(&mut conn)
        .await
        .map(|done| done.rows_affected())
        .map_err(|e| e.to_string());
    let _ = conn.close().await;
    result
}

/// The first column of every row `sql` selects, as text (read-only on SQLite).
pub async fn select_text(url: &str, sql: &str) -> Vec<String> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&read_only(url))
        .await
        .unwrap_or_else(|e| panic!("cannot open the database {}: {e}", redact(url)));
    let rows = sqlx::query_scalar::<_, Option<String>>(sql)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql} in {}: {e}", redact(url)));
    let _ = conn.close().await;
    rows.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_open_read_only() {
        assert_eq!(
            read_only("sqlite:///d/verge.db"),
            "sqlite:///d/verge.db?mode=ro"
        );
        assert_eq!(
            read_only("sqlite:///d/verge.db?cache=shared"),
            "sqlite:///d/verge.db?cache=shared&mode=ro"
        );
        assert_eq!(read_only("postgres://u:p@h/db"), "postgres://u:p@h/db");
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("sqlite:///d/verge.db"), "sqlite:///d/verge.db");
    }
}
