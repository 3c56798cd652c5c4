//! Running WebAssembly workloads in wasmtime (SPEC §2 runtime `wasm`).
//!
//! Instances run inside the node daemon, not in a shim: one
//! [`WasmRuntime`] holds the wasmtime engine (pooling allocator, epoch
//! interruption), the compiled-code cache and the epoch ticker. A
//! [`Program`] is an OCI wasm artifact's module (WASI preview 1) or
//! component (WASI preview 2), compiled once per digest and wasmtime
//! version and pre-instantiated; [`Program::run`] runs one instance of it
//! to its end, with the arguments, environment, preopened directories and
//! standard streams of a [`Guest`], under its memory limit (a resource
//! limiter) and CPU limit (epoch interruption).
//!
//! - `engine`: the engine's configuration and the epoch ticker;
//! - `cache`: compiled code on disk, `<data>/wasm/cache/`;
//! - `limits`: the memory limiter and the CPU meter;
//! - `wasi`: WASI contexts (args, env, preopens, stdio into the logs);
//! - `program`: loading, pre-instantiating and running;
//! - `instance`: a long-running instance on a thread of its own, in the
//!   instance's network namespace (where its WASI sockets bind), behind
//!   the same [`crate::runtime::Instance`] handle as processes;
//! - `listener`: per-connection workloads: a listener per
//!   [`verge_api::wire::ListenerSpec`] that runs a fresh instance for
//!   every connection, the connection as its stdin and stdout.
//!
//! Runs need a Tokio runtime with its timer enabled (throttling sleeps,
//! the log flush of unfinished lines); wasm runs on the thread that polls
//! [`Program::run`], yielding to the runtime every epoch tick (10 ms).
//!
//! It must not decide what runs: the reconciler does.

mod cache;
mod engine;
mod limits;
mod program;
mod wasi;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::logs::Capture;

pub(crate) mod instance;
pub(crate) mod listener;

/// How the node runs wasm.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// Where compiled code is kept (`<data>/wasm/cache`).
    pub cache_dir: PathBuf,
    /// Most wasm instances alive at once on the node (the pooling
    /// allocator's slots), long-running and per-connection together.
    pub max_instances: u32,
    /// The largest memory any one instance may have (the pool's slot
    /// size); each instance's own limit is its workload's `memory`.
    pub max_memory: u64,
}

/// Why wasm could not be loaded or set up.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("the wasm engine cannot start: {0}")]
    Engine(String),
    #[error("{what} is not a valid WebAssembly module or component: {cause}")]
    Invalid { what: String, cause: String },
    #[error("{what} cannot be instantiated: {cause}")]
    Link { what: String, cause: String },
    #[error("compiled-code cache at {path}: {cause}")]
    Cache { path: PathBuf, cause: String },
}

/// The node's wasm engine and compiled-code cache. Cheap to clone.
#[derive(Clone)]
pub struct WasmRuntime {
    shared: Arc<program::Shared>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime").finish_non_exhaustive()
    }
}

/// How a [`Program`] was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Loaded from the cache: no compilation.
    Cached,
    /// Compiled now (and cached for next time), in this long.
    Fresh(Duration),
}

/// What kind of wasm a program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A core module importing WASI preview 1, run by calling `_start`.
    Module,
    /// A component exporting `wasi:cli/run`, with WASI preview 2.
    Component,
}

impl WasmRuntime {
    /// Starts the engine and its epoch ticker (a thread).
    ///
    /// The pool of [`WasmConfig::max_instances`] slots of up to
    /// [`WasmConfig::max_memory`] each is reserved (address space, not
    /// memory) now. The ticker ends when the last clone of this runtime
    /// and the last [`Program`] loaded by it are dropped.
    pub fn new(cfg: WasmConfig) -> Result<WasmRuntime, WasmError> {
        Ok(WasmRuntime {
            shared: Arc::new(program::Shared::new(&cfg)?),
        })
    }

    /// Loads the artifact `wasm` (its bytes at that path) whose content
    /// digest is `digest` (`sha256:...`): from the cache when it holds code
    /// compiled for this digest by this engine, else compiled (off the
    /// runtime threads) and cached. The file may also be WebAssembly text.
    ///
    /// Imports are resolved now: a program importing anything the node
    /// does not provide is a [`WasmError::Link`].
    pub async fn load(&self, digest: &str, wasm: &Path) -> Result<(Program, Compiled), WasmError> {
        let (loaded, compiled) = program::load(&self.shared, digest, wasm).await?;
        let program = Program {
            inner: Arc::new(loaded),
        };
        Ok((program, compiled))
    }

    /// Where compiled code of the artifact `digest` is (or would be)
    /// cached by this runtime.
    pub fn cache_path(&self, digest: &str) -> Result<PathBuf, WasmError> {
        self.shared.cache.path(digest)
    }
}

/// A compiled, pre-instantiated module or component. Cheap to clone.
#[derive(Clone)]
pub struct Program {
    inner: Arc<program::Loaded>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").finish_non_exhaustive()
    }
}

/// A directory the guest sees.
#[derive(Debug, Clone)]
pub struct Preopen {
    pub host: PathBuf,
    /// Absolute path in the guest.
    pub guest: String,
    pub writable: bool,
}

/// Where a guest's output goes.
pub type LogSink = Arc<Mutex<Capture>>;

/// A byte stream for a guest's stdin or stdout (a TCP connection's halves
/// for per-connection instances).
pub type ReadHalf = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// One instance's setup.
pub struct Guest {
    /// `argv`; the first is the program's name (the workload's).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub preopens: Vec<Preopen>,
    /// Bytes.
    pub memory: u64,
    /// Cores: the guest yields whenever it used its share.
    pub cpu: f64,
    /// CPU time without waiting for I/O after which it is stopped
    /// (checked every epoch tick); `Duration::ZERO`: no limit.
    pub max_cpu_time: Duration,
    /// May it use WASI sockets (long-running instances: bind, listen,
    /// accept and connect in the thread's network namespace)?
    pub network: bool,
    /// `None`: an empty stdin.
    pub stdin: Option<ReadHalf>,
    /// `None`: stdout into `logs` as the stdout stream.
    pub stdout: Option<WriteHalf>,
    /// stdout (unless given) and stderr records.
    pub logs: LogSink,
    /// Fires to stop the instance (it is interrupted at once).
    pub stop: CancellationToken,
}

/// How one run of a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `proc_exit(code)` or `wasi:cli/exit`, or the end of `_start` / `run`
    /// (0, or 1 for a `run` that returned an error).
    Exited(i32),
    /// A trap; `message` is wasmtime's, with the wasm backtrace.
    Trapped { message: String },
    /// Its memory limit was hit (`memory` bytes): the limiter trapped it.
    OutOfMemory { message: String },
    /// It used `max_cpu_time` of CPU without waiting for I/O.
    CpuExceeded { message: String },
    /// `stop` fired.
    Stopped,
    /// It could not be instantiated (a missing import, the node's instance
    /// pool full, ...).
    Failed { message: String },
}

impl Program {
    /// The program's kind.
    pub fn kind(&self) -> Kind {
        self.inner.kind()
    }

    /// Runs one instance to its end, on the calling task.
    ///
    /// Unfinished lines of the guest's output are written to its logs at
    /// the end (and, while it runs, after [`crate::logs::QUIET`]).
    pub async fn run(&self, guest: Guest) -> Outcome {
        program::run(&self.inner, guest).await
    }
}

/// Where the node's wasm files go under its data dir.
pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wasm").join("cache")
}
