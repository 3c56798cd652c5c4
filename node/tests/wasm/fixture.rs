//! The tests' setup: a runtime over a dir of the test's own, artifacts,
//! guests, their logs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::DuplexStream;
use tokio_util::sync::CancellationToken;
use verge_api::logs::{LogRecord, LogStream};
use verge_node::logs::{Capture, LogLimits};
use verge_node::wasm::{Compiled, Guest, LogSink, Outcome, Program, WasmConfig, WasmRuntime};

pub const MIB: u64 = 1 << 20;

/// A test's dir: the cache, the wasm files, the logs.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub rt: WasmRuntime,
    pub logs: LogSink,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_instances(8)
    }

    pub fn with_instances(max_instances: u32) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let rt = runtime(tmp.path(), max_instances);
        let logs_dir = tmp.path().join("logs");
        fs::create_dir_all(&logs_dir).unwrap();
        let capture = Capture::open(&logs_dir, LogLimits::default()).unwrap();
        Fixture {
            tmp,
            rt,
            logs: Arc::new(Mutex::new(capture)),
        }
    }

    /// Loads `wat` as an artifact of its own.
    pub async fn load(&self, wat: &str) -> Program {
        self.load_with(&self.rt, wat).await.0
    }

    pub async fn load_with(&self, rt: &WasmRuntime, wat: &str) -> (Program, Compiled) {
        let (digest, path) = self.artifact(wat);
        rt.load(&digest, &path).await.expect("load")
    }

    /// Writes `wat` as a file; its digest and path.
    pub fn artifact(&self, wat: &str) -> (String, PathBuf) {
        let hex = hex::encode(Sha256::digest(wat.as_bytes()));
        let path = self.tmp.path().join(format!("{}.wat", &hex[..16]));
        fs::write(&path, wat).unwrap();
        (format!("sha256:{hex}"), path)
    }

    pub fn guest(&self) -> Guest {
        Guest {
            args: vec!["prog".into()],
            env: vec![],
            preopens: vec![],
            memory: 32 * MIB,
            cpu: 1.0,
            max_cpu_time: Duration::from_secs(10),
            network: false,
            stdin: None,
            stdout: None,
            logs: self.logs.clone(),
            stop: CancellationToken::new(),
        }
    }

    /// The app records written so far.
    pub fn app(&self) -> Vec<LogRecord> {
        fs::read_to_string(self.tmp.path().join("logs/app.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn lines(&self, stream: LogStream) -> Vec<String> {
        self.app()
            .into_iter()
            .filter(|r| r.stream == Some(stream))
            .map(|r| r.message)
            .collect()
    }
}

pub fn runtime(dir: &Path, max_instances: u32) -> WasmRuntime {
    WasmRuntime::new(WasmConfig {
        cache_dir: dir.join("cache"),
        max_instances,
        max_memory: 64 * MIB,
    })
    .expect("runtime")
}

/// A guest's stdin and stdout over one in-memory pipe: the test's end.
pub fn pipe(guest: &mut Guest) -> DuplexStream {
    let (test, theirs) = tokio::io::duplex(4096);
    let (r, w) = tokio::io::split(theirs);
    guest.stdin = Some(Box::new(r));
    guest.stdout = Some(Box::new(w));
    test
}

/// Runs `program` for `guest`, failing the test after `secs`.
pub async fn run_within(program: &Program, guest: Guest, secs: u64) -> Outcome {
    tokio::time::timeout(Duration::from_secs(secs), program.run(guest))
        .await
        .unwrap_or_else(|_| panic!("the guest did not end in {secs} s"))
}
