//! `verge-wasm-echo`: Verge's per-connection wasm example, in Rust.
//!
//! Built for `wasm32-wasip1` (`cargo build --release --target wasm32-wasip1
//! -p verge-wasm-echo`), it runs once per TCP connection with the
//! connection as its stdin and stdout: it writes the line `echo from rust
//! wasm`, then copies stdin to stdout until EOF and exits 0. It is plain
//! `std`, so it also builds and runs natively (try `echo hi | cargo run -p
//! verge-wasm-echo`).

use std::io::{ErrorKind, Read, Write};
use std::process::ExitCode;

/// The first line written, before any echo.
const GREETING: &[u8] = b"echo from rust wasm\n";

fn main() -> ExitCode {
    match echo(&mut std::io::stdin().lock(), &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-wasm-echo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the greeting, then copies `input` to `output` chunk by chunk,
/// flushing each, until `input` ends.
fn echo(input: &mut impl Read, output: &mut impl Write) -> std::io::Result<()> {
    output.write_all(GREETING)?;
    output.flush()?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&buf[..n])?;
        output.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_then_echoes_until_eof() {
        let mut out = Vec::new();
        echo(&mut &b"one\ntwo"[..], &mut out).unwrap();
        assert_eq!(out, b"echo from rust wasm\none\ntwo");
    }
}
