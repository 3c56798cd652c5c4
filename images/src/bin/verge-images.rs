//! `verge-images`: build Verge's example workloads into OCI images and push them.
//!
//! ```text
//! verge-images push hello REF         # e.g. REF = 127.0.0.1:5000/hello:1.0
//! verge-images push hello-debug REF   # hello plus /bin/busybox and its applets
//! verge-images wasm push NAME REF      # a wasm example as an OCI wasm artifact
//! verge-images wasm push FILE.wasm REF # any .wasm, packaged the same way
//! verge-images wasm build NAME OUT     # write the example's .wasm to OUT
//! verge-images wasm list               # the wasm examples
//! ```
//!
//! Wasm examples: echo, tcp-echo, memhog, spin, crash (WebAssembly text in
//! images/wasm/) and rust-echo (images/wasm-echo-rs, built for
//! wasm32-wasip1 when that target is installed).
//!
//! `push` prints the manifest digest, then the pinned reference
//! `REF@sha256:...`. Run it from anywhere inside the workspace (or with
//! cargo run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: verge-images push hello|hello-debug REF   (e.g. 127.0.0.1:5000/hello:1.0)
       verge-images wasm push NAME|FILE.wasm REF  (e.g. echo 127.0.0.1:5000/echo-wasm:1)
       verge-images wasm build NAME OUT.wasm
       verge-images wasm list
wasm examples: echo, tcp-echo, memhog, spin, crash, rust-echo";
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
        ["wasm", "push", name, reference] => push_wasm(name, reference).await,
        ["wasm", "build", name, out] => build_wasm(name, Path::new(out)).await,
        ["wasm", "list"] => {
            for name in wasm_names() {
                println!("{name}");
            }
            Ok(())
        }
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

/// The wasm examples: those in WebAssembly text, then the Rust one.
fn wasm_names() -> impl Iterator<Item = &'static str> {
    verge_images::WASM_EXAMPLES
        .iter()
        .copied()
        .chain([verge_images::RUST_WASM_EXAMPLE])
}

/// The `.wasm` bytes of example `name`, or of the file `name` if it ends
/// in `.wasm`. `Ok(None)` when the Rust example was skipped (its target is
/// not installed; the library said so on stderr).
async fn wasm_bytes(name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    if name.ends_with(".wasm") {
        let bytes = std::fs::read(name).with_context(|| format!("reading {name}"))?;
        return Ok(Some(bytes));
    }
    if name == verge_images::RUST_WASM_EXAMPLE {
        let root = workspace_root();
        if verge_images::wasm_target_installed()? {
            eprintln!(
                "building {} for {}...",
                verge_images::RUST_WASM_PACKAGE,
                verge_images::WASM_TARGET
            );
        }
        let Some(path) = tokio::task::spawn_blocking(move || verge_images::build_rust_wasm(&root))
            .await
            .context("build task panicked")??
        else {
            return Ok(None);
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        return Ok(Some(bytes));
    }
    if !wasm_names().any(|n| n == name) {
        bail!(
            "no wasm example named {name:?} (there are: {}; or give a FILE.wasm)",
            wasm_names().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(Some(verge_images::wasm_example(name)?))
}

/// Builds wasm example `name` (or reads FILE.wasm) and pushes it as an OCI
/// wasm artifact to `reference`.
async fn push_wasm(name: &str, reference: &str) -> anyhow::Result<()> {
    reference
        .parse::<oci_client::Reference>()
        .with_context(|| format!("invalid image reference {reference:?}"))?;
    let Some(bytes) = wasm_bytes(name).await? else {
        bail!("nothing pushed");
    };
    let artifact = verge_images::WasmArtifact::build(bytes)?;
    eprintln!(
        "pushing {name} ({}, {} bytes) to {reference}...",
        artifact.kind.os(),
        artifact.wasm.len()
    );
    let digest = artifact
        .push(reference, &oci_client::secrets::RegistryAuth::Anonymous)
        .await?;
    println!("{digest}");
    println!("{reference}@{digest}");
    Ok(())
}

/// Writes wasm example `name`'s bytes to `out`.
async fn build_wasm(name: &str, out: &Path) -> anyhow::Result<()> {
    let Some(bytes) = wasm_bytes(name).await? else {
        bail!("nothing built");
    };
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} bytes)", out.display(), bytes.len());
    Ok(())
}
