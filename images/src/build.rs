//! Building a workload binary statically with cargo.
//!
//! The binary is built for the host triple with `-C target-feature=+crt-static`
//! (glibc static-pie), which puts it under `target/<triple>/release`, apart
//! from the workspace's ordinary dynamically linked builds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result, ensure_static};

/// How many lines of cargo's stderr to keep in [`Error::BuildFailed`].
const STDERR_TAIL_LINES: usize = 40;

/// The host's target triple, from `rustc -vV` (honours `$RUSTC`).
pub fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|source| Error::Spawn {
            program: rustc,
            source,
        })?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(|triple| triple.trim().to_string())
        .ok_or(Error::NoHostTriple)
}

/// Builds `bin` of `package` statically in release mode, from the workspace
/// at `workspace_root`, and returns the path of the executable.
///
/// Honours `$CARGO` (set when running under cargo) and `$CARGO_TARGET_DIR`:
/// the path comes from cargo's own build report, not from a guess. Fails
/// with [`Error::NotStatic`] if the result still needs a dynamic loader.
pub fn build_static(workspace_root: &Path, package: &str, bin: &str) -> Result<PathBuf> {
    let triple = host_triple()?;
    let path = cargo_build(
        workspace_root,
        package,
        bin,
        &triple,
        Some("-C target-feature=+crt-static"),
    )?;
    ensure_static(&path)?;
    Ok(path)
}

/// Runs `cargo build --release -p PACKAGE --bin BIN --target TARGET` in
/// `workspace_root` (with `RUSTFLAGS=rustflags` if given) and returns the
/// executable cargo reports (for wasm targets, the `.wasm`).
pub(crate) fn cargo_build(
    workspace_root: &Path,
    package: &str,
    bin: &str,
    target: &str,
    rustflags: Option<&str>,
) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace_root)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .args(["-p", package, "--bin", bin, "--target", target])
        // Would override RUSTFLAGS if inherited from an outer cargo.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null());
    if let Some(flags) = rustflags {
        command.env("RUSTFLAGS", flags);
    }
    let out = command.output().map_err(|source| Error::Spawn {
        program: cargo,
        source,
    })?;
    if !out.status.success() {
        return Err(Error::BuildFailed {
            package: package.into(),
            status: out.status,
            stderr_tail: tail(&String::from_utf8_lossy(&out.stderr), STDERR_TAIL_LINES),
        });
    }
    executable_from_messages(&out.stdout, bin).ok_or_else(|| Error::NoExecutable {
        package: package.into(),
        bin: bin.into(),
    })
}

/// Finds the executable of `bin` in cargo's JSON messages (one per line).
fn executable_from_messages(stdout: &[u8], bin: &str) -> Option<PathBuf> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_among_messages() {
        let msgs = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"other"},"executable":"/t/other"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"hello"},"executable":"/t/hello"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable_from_messages(msgs.as_bytes(), "hello"),
            Some(PathBuf::from("/t/hello"))
        );
        assert_eq!(executable_from_messages(msgs.as_bytes(), "nope"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
