//! `verge-tests`: the end-to-end harness of Verge.
//!
//! Everything here runs the real thing: the `verge` binary as a child
//! process ([`control`]), the CLI as a user runs it ([`cli`]), a real
//! PostgreSQL database per test ([`postgres`]) and Debian's `docker-registry`
//! ([`registry`]). Tests wait with [`eventually`], polling with a deadline,
//! never with a fixed sleep.

pub mod cli;
pub mod cluster;
pub mod control;
pub mod nodes;
pub mod postgres;
pub mod registry;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

/// Runs each scenario `async fn NAME(backend: Backend)` once per store
/// backend, as the tests `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name($crate::control::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name($crate::control::Backend::Postgres).await } )*
        }
    };
}

/// The `hello` example workload's binary, built (off the runtime) the way
/// `images/` builds it.
pub async fn hello_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    tokio::task::spawn_blocking(move || verge_images::build_hello(&root))
        .await
        .expect("building hello does not panic")
        .expect("build hello")
}

/// The `verge` binary of this build (`target/<profile>/verge`), built by the
/// test command before the tests run; `VERGE_TEST_BIN` (read by the tests,
/// never passed to `verge`) names another one, e.g. a copy that builds
/// sharing the target dir cannot replace during a run.
pub fn verge_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VERGE_TEST_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "VERGE_TEST_BIN={} is not a file",
            bin.display()
        );
        return bin;
    }
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

/// A `verge` command isolated from the environment the tests run in: no
/// inherited `VERGE_*` variable (see [`isolate_env`]), stdin closed, killed
/// when dropped. PATH, HOME and the rest are kept. Set what the run needs
/// with `.env(...)` afterwards.
pub fn verge_command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(verge_bin());
    isolate_env(cmd.as_std_mut());
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// Removes from `cmd` every inherited environment variable whose name starts
/// with `VERGE_` (a developer's `VERGE_TOKEN`, `VERGE_DATABASE`,
/// `VERGE_LOG_FORMAT`, ... and the harness's own `VERGE_TEST_POSTGRES`), so
/// a `verge` child sees only what the test sets. Variables set with `.env()`
/// after this call are kept. For a `tokio::process::Command`, pass
/// `cmd.as_std_mut()`.
pub fn isolate_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"VERGE_") {
            cmd.env_remove(name);
        }
    }
    cmd
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
