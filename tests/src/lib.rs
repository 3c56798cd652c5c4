//! `verge-tests`: the end-to-end harness of Verge.
//!
//! Everything here runs the real thing: the `verge` binary as a child
//! process ([`control`]), the CLI as a user runs it ([`cli`]), a real
//! PostgreSQL database per test ([`postgres`]) and Debian's `docker-registry`
//! ([`registry`]). Tests wait with [`eventually`], polling with a deadline,
//! never with a fixed sleep.

pub mod cli;
pub mod control;
pub mod postgres;
pub mod registry;

use std::path::PathBuf;
use std::time::Duration;

/// The `verge` binary of this build (target/<profile>/verge), built by the
/// test command before the tests run.
pub fn verge_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("verge");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p verge` (bash tests/run.sh does)",
        bin.display()
    );
    bin
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what`
/// after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs the TLS provider every client in the tests uses.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
