//! `verge-images`: build Verge's example workloads into OCI images and push them.
//!
//! ```text
//! verge-images push hello REF         # e.g. REF = 127.0.0.1:5000/hello:1.0
//! verge-images push hello-debug REF   # hello plus /bin/busybox and its applets
//! ```
//!
//! Prints the manifest digest, then the pinned reference `REF@sha256:...`.
//! Run it from anywhere inside the workspace (or with cargo run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: verge-images push hello|hello-debug REF   (e.g. 127.0.0.1:5000/hello:1.0)";
/// The static busybox `hello-debug` carries (Debian's `busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// The workspace this binary was built from: where `hello` is built.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-images: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes that an outer
/// message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["push", "hello", reference] => push_hello(reference, false).await,
        ["push", "hello-debug", reference] => push_hello(reference, true).await,
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

/// Builds hello and pushes its image (with `debug`, `hello-debug`).
async fn push_hello(reference: &str, debug: bool) -> anyhow::Result<()> {
    // Fail on a bad reference before spending time on the build.
    reference
        .parse::<oci_client::Reference>()
        .with_context(|| format!("invalid image reference {reference:?}"))?;
    let root = workspace_root();
    eprintln!("building {} statically...", verge_images::HELLO_PACKAGE);
    let binary = tokio::task::spawn_blocking(move || verge_images::build_hello(&root))
        .await
        .context("build task panicked")??;
    let image = if debug {
        if !Path::new(BUSYBOX).exists() {
            bail!(
                "{BUSYBOX} is missing: install a static busybox (apt-get install busybox-static)"
            );
        }
        verge_images::debug_image(&binary, Path::new(BUSYBOX))?
    } else {
        verge_images::hello_image(&binary)?
    };
    eprintln!("pushing {} to {reference}...", binary.display());
    let digest = verge_images::push(&image, reference).await?;
    println!("{digest}");
    println!("{reference}@{digest}");
    Ok(())
}
