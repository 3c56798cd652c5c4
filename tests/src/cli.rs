//! Running the `verge` CLI as a user would, isolated from the machine's own
//! profiles by a per-test `VERGE_CONFIG_DIR` and from the test's environment
//! (no inherited `VERGE_*` variable), each run bounded by [`RUN_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A way to run `verge` with a fixed environment.
#[derive(Debug, Clone)]
pub struct Cli {
    env: Vec<(String, String)>,
    config_dir: PathBuf,
}

impl Cli {
    /// A CLI whose profiles live in `config_dir`, with no server or token set.
    pub fn new(config_dir: &Path) -> Cli {
        Cli {
            env: Vec::new(),
            config_dir: config_dir.to_path_buf(),
        }
    }

    /// The same CLI with `VERGE_SERVER` and `VERGE_TOKEN` set.
    pub fn target(&self, server: &str, token: &str) -> Cli {
        self.with_env("VERGE_SERVER", server)
            .with_env("VERGE_TOKEN", token)
    }

    pub fn with_env(&self, key: &str, value: &str) -> Cli {
        let mut c = self.clone();
        c.env.push((key.into(), value.into()));
        c
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Runs `verge ARGS... -o json`, asserts success, and returns the `name`
    /// of every element of the JSON array it prints.
    pub async fn names(&self, args: &[&str]) -> Vec<String> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let list = self.run(&args).await.json();
        list.as_array()
            .unwrap_or_else(|| panic!("verge {args:?} printed no JSON array: {list}"))
            .iter()
            .map(|v| {
                v["name"]
                    .as_str()
                    .expect("every element has a name")
                    .to_string()
            })
            .collect()
    }

    /// Runs `verge ARGS...` to completion, at most [`RUN_TIMEOUT`]: past it
    /// the process is killed and the test panics with the arguments and what
    /// the run printed so far.
    ///
    /// The run inherits no `VERGE_*` variable from the test's environment
    /// (see [`crate::isolate_env`]): only `VERGE_CONFIG_DIR` and what
    /// [`target`](Self::target) and [`with_env`](Self::with_env) set.
    pub async fn run(&self, args: &[&str]) -> Run {
        let mut cmd = crate::verge_command();
        cmd.args(args);
        // Boxed: callers await many runs in one test, and each inlined
        // state machine would add to the test thread's stack.
        Box::pin(self.run_command(cmd, args)).await
    }

    /// Runs `verge ARGS...` like [`run`](Self::run) but on a terminal: under
    /// `script(1)`, which gives it a pseudo-terminal (`TERM=xterm`). What it
    /// writes to stdout and stderr comes back as stdout, with the terminal's
    /// control sequences.
    pub async fn run_on_terminal(&self, args: &[&str]) -> Run {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut line = quote(&crate::verge_bin().display().to_string());
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let mut cmd = tokio::process::Command::new("script");
        crate::isolate_env(cmd.as_std_mut());
        cmd.args(["-qec", &line, "/dev/null"])
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        Box::pin(self.run_command(cmd, args)).await
    }

    /// `verge ARGS...` in this CLI's environment, not started, stdio
    /// inherited: for runs a test drives itself (long-lived, or fed stdin).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = crate::verge_command();
        cmd.args(args).env("VERGE_CONFIG_DIR", &self.config_dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The variables a `verge` run gets (`VERGE_CONFIG_DIR` and those set
    /// with [`target`](Self::target) or [`with_env`](Self::with_env)), for
    /// runs started by another program (a terminal multiplexer).
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![(
            "VERGE_CONFIG_DIR".to_string(),
            self.config_dir.display().to_string(),
        )];
        vars.extend(self.env.iter().cloned());
        vars
    }

    /// Runs `verge ARGS...` like [`run`](Self::run) with `input` on its stdin.
    pub async fn run_with_stdin(&self, args: &[&str], input: Vec<u8>) -> Run {
        use tokio::io::AsyncWriteExt as _;
        let mut cmd = crate::verge_command();
        cmd.args(args).stdin(Stdio::piped());
        let (tx, rx) = tokio::sync::oneshot::channel::<tokio::process::ChildStdin>();
        let feeder = tokio::spawn(async move {
            if let Ok(mut stdin) = rx.await {
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
            }
        });
        let run = Box::pin(self.run_command_fed(cmd, args, Some(tx))).await;
        let _ = feeder.await;
        run
    }

    /// Runs `cmd` (a `verge` run with `args`) to completion, at most
    /// [`RUN_TIMEOUT`], in this CLI's environment.
    async fn run_command(&self, cmd: tokio::process::Command, args: &[&str]) -> Run {
        self.run_command_fed(cmd, args, None).await
    }

    /// [`run_command`](Self::run_command), handing its stdin to `stdin` when given.
    async fn run_command_fed(
        &self,
        mut cmd: tokio::process::Command,
        args: &[&str],
        stdin: Option<tokio::sync::oneshot::Sender<tokio::process::ChildStdin>>,
    ) -> Run {
        cmd.env("VERGE_CONFIG_DIR", &self.config_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run verge {args:?}: {e}"));
        if let (Some(tx), Some(input)) = (stdin, child.stdin.take()) {
            let _ = tx.send(input);
        }
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let finished = tokio::time::timeout(RUN_TIMEOUT, async {
            // Both pipes to their end, then the exit status; a chunk read is
            // kept even if the deadline cancels the next one.
            let (_, _, status) = tokio::join!(
                drain(&mut stdout, &mut out),
                drain(&mut stderr, &mut err),
                child.wait()
            );
            status
        })
        .await;
        let status = match finished {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for verge {args:?}: {e}")),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "verge {args:?} did not finish within {RUN_TIMEOUT:?} (killed)\n\
                     --- stdout so far ---\n{}\n--- stderr so far ---\n{}",
                    shown(&out),
                    shown(&err)
                );
            }
        };
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            output: Output {
                status,
                stdout: out,
                stderr: err,
            },
        }
    }
}

/// How long one [`Cli::run`] may take before it is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Captured output for a message: lossy UTF-8, `(nothing)` when empty.
fn shown(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "(nothing)".into()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Appends everything `pipe` yields to `buf`, chunk by chunk (cancel-safe:
/// what was read before a cancellation stays in `buf`). Stops at EOF or on
/// a read error.
async fn drain(pipe: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A finished `verge` run.
#[derive(Debug)]
pub struct Run {
    args: Vec<String>,
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// Asserts the command succeeded and returns its stdout.
    pub fn ok(&self) -> String {
        assert!(
            self.success(),
            "verge {:?} failed ({}):\n{}",
            self.args,
            self.output.status,
            self.stderr()
        );
        self.stdout()
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("verge {:?}: stdout is not JSON ({e}):\n{out}", self.args))
    }

    /// Asserts failure and parses stderr as the `{"error": {...}}` body.
    pub fn error_json(&self) -> Value {
        assert!(
            !self.success(),
            "verge {:?} succeeded but should have failed:\n{}",
            self.args,
            self.stdout()
        );
        let err = self.stderr();
        let v: Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| {
            panic!(
                "verge {:?}: stderr is not a JSON error ({e}):\n{err}",
                self.args
            )
        });
        v["error"].clone()
    }

    /// Asserts failure and returns stderr.
    pub fn failed(&self) -> String {
        assert!(
            !self.success(),
            "verge {:?} succeeded but should have failed:\n{}",
            self.args,
            self.stdout()
        );
        self.stderr()
    }
}
