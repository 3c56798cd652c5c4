//! `verge-shim`: the instance shim as a binary of its own.
//!
//! The `verge` binary is the shim in production (`RuntimeConfig::shim_exe`
//! is `/proc/self/exe` and its `main` calls `shim_main` on
//! `__verge-shim`). This binary does only that, so that the runtime's
//! integration tests (`CARGO_BIN_EXE_verge-shim`) can start instances
//! without the CLI. Usage: `verge-shim __verge-shim <instance dir>`.

use std::path::Path;

use verge_node::runtime::{SHIM_ARG, shim_main};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, arg, dir] if arg == SHIM_ARG => shim_main(Path::new(dir)),
        _ => {
            eprintln!("usage: verge-shim {SHIM_ARG} <instance dir>");
            std::process::exit(2);
        }
    }
}
