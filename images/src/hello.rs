//! The `hello` example workload: its static build and its image.

use std::path::{Path, PathBuf};

use crate::{Error, File, Image, ImageConfig, Layer, Result, build_static, ensure_static};

/// Cargo package of the `hello` workload.
pub const HELLO_PACKAGE: &str = "verge-hello";
/// Binary name of the `hello` workload; it sits at `/hello` in the image.
pub const HELLO_BIN: &str = "hello";
/// Port `hello` listens on in its image.
pub const HELLO_PORT: u16 = 8080;

/// Builds `hello` statically from the workspace at `workspace_root`.
pub fn build_hello(workspace_root: &Path) -> Result<PathBuf> {
    build_static(workspace_root, HELLO_PACKAGE, HELLO_BIN)
}

/// The `hello` image: the static `binary` as `/hello`, run as
/// `/hello --port 8080`, exposing 8080/tcp.
pub fn hello_image(binary: &Path) -> Result<Image> {
    ensure_static(binary)?;
    let contents =
        std::fs::read(binary).map_err(Error::io(format!("reading {}", binary.display())))?;
    let layer = Layer::from_files(&[File::new(format!("/{HELLO_BIN}"), contents, 0o755)])?;
    let run = ImageConfig {
        entrypoint: vec![format!("/{HELLO_BIN}")],
        cmd: vec!["--port".into(), HELLO_PORT.to_string()],
        env: Vec::new(),
        exposed_ports: vec![format!("{HELLO_PORT}/tcp")],
    };
    Image::build(&run, vec![layer])
}

/// Busybox applets linked in [`debug_image`]'s `/bin`.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "ls",
    "ps",
    "sleep",
    "kill",
    "id",
    "env",
    "hostname",
    "stty",
    "tty",
    "head",
    "dd",
    "wc",
    "true",
    "false",
    "grep",
    "sha256sum",
    "pwd",
    "yes",
    "seq",
];

/// The `hello` image with a shell: `/hello` as in [`hello_image`], plus a
/// static busybox at `/bin/busybox` and its common applets linked in `/bin`
/// (`sh`, `cat`, `ps`, `sleep`, …), so that `verge exec` has tools to run.
pub fn debug_image(hello: &Path, busybox: &Path) -> Result<Image> {
    ensure_static(hello)?;
    ensure_static(busybox)?;
    let read = |p: &Path| std::fs::read(p).map_err(Error::io(format!("reading {}", p.display())));
    let mut files = vec![
        File::new(format!("/{HELLO_BIN}"), read(hello)?, 0o755),
        File::new("/bin/busybox", read(busybox)?, 0o755),
    ];
    files.extend(
        APPLETS
            .iter()
            .map(|a| File::symlink(format!("/bin/{a}"), "busybox")),
    );
    let run = ImageConfig {
        entrypoint: vec![format!("/{HELLO_BIN}")],
        cmd: vec!["--port".into(), HELLO_PORT.to_string()],
        env: vec!["PATH=/bin".into()],
        exposed_ports: vec![format!("{HELLO_PORT}/tcp")],
    };
    Image::build(&run, vec![Layer::from_files(&files)?])
}
