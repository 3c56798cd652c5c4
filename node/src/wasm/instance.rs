//! Long-running wasm instances: each on a thread of its own, in the
//! instance's network namespace (where its WASI sockets bind), on a
//! current-thread tokio runtime, behind the same
//! [`crate::runtime::Instance`] handle as processes.
//!
//! Also what long-running instances and per-connection listeners share:
//! loading an artifact ([`load`]: pull, compile or take from the cache, and
//! say which in the system log), secret files on a private tmpfs
//! ([`SecretsTmpfs`], never on disk) and entering a network namespace.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use verge_api::logs::Severity;
use verge_api::wire::{ErrorCategory, InstanceSpec, SecretFile};

use super::{Compiled, Guest, Outcome, Preopen, Program, WasmRuntime};

mod host;
use crate::logs::{Capture, LogLimits, Logs};
use crate::pull::ImageStore;
use crate::runtime::state::now_ms;
use crate::runtime::{Exit, Instance, VolumeMount};
pub(crate) use host::{SecretsTmpfs, clean_leftovers, run_dir};

/// Pulls the wasm artifact `image` and loads it, writing to the system
/// log of `id` (an instance or a listener) whether its compiled code came
/// from the cache or was compiled now. The error's category is
/// `image_pull` for the pull, `start` for the rest.
pub(crate) async fn load(
    images: &ImageStore,
    wasm: Option<&WasmRuntime>,
    logs: &Logs,
    id: &str,
    image: &str,
) -> Result<Program, (ErrorCategory, String)> {
    let Some(wasm) = wasm else {
        return Err((
            ErrorCategory::Start,
            "this node daemon runs no wasm engine".into(),
        ));
    };
    let pulled = images
        .pull_wasm(image)
        .await
        .map_err(|e| (ErrorCategory::ImagePull, e.to_string()))?;
    let (program, compiled) = wasm
        .load(&pulled.digest, &pulled.path)
        .await
        .map_err(|e| (ErrorCategory::Start, e.to_string()))?;
    let digest = &pulled.digest;
    let line = match compiled {
        Compiled::Cached => format!("loaded compiled code from the cache ({digest})"),
        Compiled::Fresh(took) => format!(
            "compiled {digest} in {}ms (cached for next restarts)",
            took.as_millis()
        ),
    };
    tracing::info!(%digest, ?compiled, "wasm program loaded");
    logs.system(id, Severity::Info, line);
    Ok(program)
}

/// What a long-running instance runs with, besides its program.
pub(crate) struct Start<'a> {
    pub data_dir: &'a Path,
    pub logs: &'a Logs,
    /// The instance's network namespace; `None`: the node's (isolation
    /// `none`, on the loopback `port`).
    pub netns: Option<PathBuf>,
    /// Passed as `PORT`.
    pub port: Option<u16>,
    /// Claimed volumes: writable preopens.
    pub volumes: &'a [VolumeMount],
    pub secrets: &'a [SecretFile],
}

/// Starts instance `spec` of `program` on a thread of its own and returns
/// its handle; whatever fails on that thread (secret files, logs, the
/// network namespace, instantiation) is the instance's exit, a failed
/// start. `Err` only when no thread could be started.
pub(crate) fn start(
    spec: &InstanceSpec,
    program: Program,
    s: Start<'_>,
) -> Result<Instance, String> {
    let mut env: Vec<(String, String)> = spec
        .env_vars
        .iter()
        .filter(|(k, _)| k.as_str() != "PORT" || s.port.is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(p) = s.port {
        env.push(("PORT".into(), p.to_string()));
    }
    let preopens = s
        .volumes
        .iter()
        .map(|v| Preopen {
            host: v.source.clone(),
            guest: v.target.clone(),
            writable: true,
        })
        .collect();
    let job = Job {
        id: spec.id.clone(),
        program,
        args: args(&spec.workload, spec.command.as_deref()),
        env,
        preopens,
        memory: spec.memory,
        cpu: spec.cpu,
        max_cpu_time: Duration::from_millis(spec.max_cpu_time_ms),
        netns: s.netns,
        secrets: s.secrets.to_vec(),
        run_dir: run_dir(s.data_dir, &spec.id),
        logs_dir: s.logs.instance_dir(&spec.id),
        limits: s.logs.limits(),
    };
    let (tx, rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("verge-wasm".into())
        .spawn(move || {
            let _entered = span.enter();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(token)));
            let exit = ran.unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                exit(
                    None,
                    false,
                    Some(format!("the wasm engine panicked: {why}")),
                    false,
                )
            });
            let _ = tx.send(Some(exit));
        })
        .map_err(|e| format!("cannot start a thread for the instance: {e}"))?;
    Ok(Instance::in_daemon(&spec.id, rx, stop))
}

/// `argv`: the workload's name, then the command (the guest's arguments).
pub(crate) fn args(workload: &str, command: Option<&[String]>) -> Vec<String> {
    std::iter::once(workload.to_owned())
        .chain(command.unwrap_or_default().iter().cloned())
        .collect()
}

/// One instance's run, on its thread.
struct Job {
    id: String,
    program: Program,
    args: Vec<String>,
    env: Vec<(String, String)>,
    preopens: Vec<Preopen>,
    memory: u64,
    cpu: f64,
    max_cpu_time: Duration,
    netns: Option<PathBuf>,
    secrets: Vec<SecretFile>,
    run_dir: PathBuf,
    logs_dir: PathBuf,
    limits: LogLimits,
}

impl Job {
    fn run(mut self, stop: CancellationToken) -> Exit {
        let failed = |m: String| exit(None, false, Some(m), true);
        // On the tmpfs from now on, and nowhere else.
        let secrets = std::mem::take(&mut self.secrets);
        let mounted = SecretsTmpfs::mount(&self.run_dir, &secrets);
        drop(secrets);
        // Dropped (unmounted) before the exit is reported.
        let _secrets = match mounted {
            Ok(Some((tmpfs, preopens))) => {
                self.preopens.extend(preopens);
                Some(tmpfs)
            }
            Ok(None) => None,
            Err(e) => return failed(format!("delivering the secret files: {e}")),
        };
        let sink = match open_capture(&self.logs_dir, self.limits) {
            Ok(sink) => sink,
            Err(e) => return failed(e),
        };
        if let Some(netns) = &self.netns
            && let Err(e) = crate::net::ns::enter(netns)
        {
            return failed(format!(
                "entering the network namespace {}: {e}",
                netns.display()
            ));
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return failed(format!("cannot start the instance's runtime: {e}")),
        };
        tracing::info!(instance = %self.id, "wasm instance running");
        let outcome = rt.block_on(self.program.run(Guest {
            args: self.args,
            env: self.env,
            preopens: self.preopens,
            memory: self.memory,
            cpu: self.cpu,
            max_cpu_time: self.max_cpu_time,
            network: true,
            stdin: None,
            stdout: None,
            logs: sink.clone(),
            stop,
        }));
        drop(rt);
        tracing::info!(instance = %self.id, ?outcome, "wasm instance ended");
        exit_of(outcome)
    }
}

/// A capture on the logs dir `dir` (made if missing).
pub(crate) fn open_capture(dir: &Path, limits: LogLimits) -> Result<super::LogSink, String> {
    fs::create_dir_all(dir)
        .and_then(|()| Capture::open(dir, limits))
        .map(|c| Arc::new(Mutex::new(c)))
        .map_err(|e| format!("opening the logs in {}: {e}", dir.display()))
}

/// How a run ended, as the supervisor sees exits.
pub(crate) fn exit_of(outcome: Outcome) -> Exit {
    match outcome {
        Outcome::Exited(code) => exit(Some(code), false, None, false),
        Outcome::Trapped { message } => {
            exit(None, false, Some(format!("trapped: {message}")), false)
        }
        Outcome::OutOfMemory { message } => {
            exit(None, true, Some(format!("out of memory: {message}")), false)
        }
        Outcome::CpuExceeded { message } => exit(None, false, Some(message), false),
        Outcome::Stopped => exit(None, false, Some("stopped".into()), false),
        Outcome::Failed { message } => exit(None, false, Some(message), true),
    }
}

fn exit(code: Option<i32>, oom: bool, message: Option<String>, start_failed: bool) -> Exit {
    Exit {
        code,
        signal: None,
        oom,
        message,
        start_failed,
        at_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_become_exits() {
        let trap = exit_of(Outcome::Trapped {
            message: "unreachable".into(),
        });
        assert_eq!(trap.category(), Some(ErrorCategory::Crash));
        assert_eq!(trap.describe(), "trapped: unreachable");
        let oom = exit_of(Outcome::OutOfMemory {
            message: "memory limit 1Mi".into(),
        });
        assert_eq!(oom.category(), Some(ErrorCategory::Oom));
        assert_eq!(oom.describe(), "out of memory: memory limit 1Mi");
        let failed = exit_of(Outcome::Failed {
            message: "no _start".into(),
        });
        assert_eq!(failed.category(), Some(ErrorCategory::Start));
        assert_eq!(exit_of(Outcome::Exited(0)).category(), None);
        assert_eq!(exit_of(Outcome::Exited(3)).describe(), "exited with code 3");
        assert_eq!(
            args("web", Some(&["--x".to_string()])),
            vec!["web".to_string(), "--x".to_string()]
        );
    }
}
