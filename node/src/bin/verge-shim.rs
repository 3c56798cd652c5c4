//! `verge-shim`: the instance shim and the exec helper as a binary of
//! their own.
//!
//! The `verge` binary is both in production (`RuntimeConfig::shim_exe`
//! is `/proc/self/exe` and its `main` calls `shim_main` on
//! `__verge-shim`, `exec_main` on `__verge-exec`). This binary does only
//! that, so that the runtime's and exec's integration tests
//! (`CARGO_BIN_EXE_verge-shim`) can run instances and sessions without
//! the CLI. Usage: `verge-shim __verge-shim <instance dir>`, or
//! `verge-shim __verge-exec <instance dir> <options> <command>...`.

use std::ffi::OsString;
use std::path::Path;

use verge_node::exec::{EXEC_ARG, exec_main};
use verge_node::runtime::{SHIM_ARG, shim_main};

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    match args.as_slice() {
        [_, arg, dir] if arg == SHIM_ARG => shim_main(Path::new(dir)),
        [_, arg, rest @ ..] if arg == EXEC_ARG => exec_main(rest),
        _ => {
            eprintln!(
                "usage: verge-shim {SHIM_ARG} <instance dir> | {EXEC_ARG} <instance dir> <options> <command>..."
            );
            std::process::exit(2);
        }
    }
}
