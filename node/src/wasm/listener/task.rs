//! One listener's task: load, bind and serve its spec, again with every
//! new spec (connections of the old one drain meanwhile), with backoff
//! after failures, until it leaves the set.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use verge_api::logs::Severity;
use verge_api::wire::{ListenerSpec, ListenerState};

use super::conn::{Conn, accept, bind};
use super::{Ctx, Listeners, Status, lock};
use crate::runtime::state::now_ms;
use crate::wasm::LogSink;
use crate::wasm::instance::{self, SecretsTmpfs};

/// One listener's task.
pub(super) struct Listener {
    l: Listeners,
    id: String,
    spec: watch::Receiver<(ListenerSpec, bool)>,
    stop: CancellationToken,
    status: Arc<Mutex<Status>>,
    /// Counts the specs served, naming their secret files' tmpfs.
    generation: u64,
    /// Its app log (its instances' stderr), opened once.
    sink: Option<LogSink>,
    /// Connections of earlier specs, draining.
    draining: TaskTracker,
}

/// Why serving a spec ended.
enum Ended {
    Stop,
    Shutdown,
    /// A new spec came.
    Changed,
    Failed(String),
}

/// A spec ready to serve: its bound sockets and what its connections share.
struct Ready {
    sockets: Vec<TcpListener>,
    conn: Arc<Conn>,
    tmpfs: Option<SecretsTmpfs>,
}

impl Listener {
    pub(super) fn new(
        l: Listeners,
        spec: watch::Receiver<(ListenerSpec, bool)>,
        stop: CancellationToken,
        status: Arc<Mutex<Status>>,
    ) -> Listener {
        let id = spec.borrow().0.id.clone();
        Listener {
            l,
            id,
            spec,
            stop,
            status,
            generation: 0,
            sink: None,
            draining: TaskTracker::new(),
        }
    }

    fn ctx(&self) -> &Ctx {
        &self.l.inner.ctx
    }

    fn set(&self, state: ListenerState, message: Option<String>, address: Option<String>) {
        tracing::info!(%state, message = message.as_deref().unwrap_or(""), "listener state");
        let mut st = lock(&self.status);
        st.report.state = state;
        st.report.message = message;
        st.report.address = address;
        st.report.at_ms = now_ms();
        if state != ListenerState::Listening {
            st.targets.clear();
        }
        drop(st);
        self.l.inner.changed.send_replace(());
    }

    fn system(&self, severity: Severity, message: impl Into<String>) {
        self.ctx().logs.system(&self.id, severity, message);
    }

    pub(super) async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let (spec, known) = self.spec.borrow_and_update().clone();
            let ended = if known {
                self.serve(spec).await
            } else {
                self.set(ListenerState::Starting, Some("waiting for the control plane to send the listener's secret files again (the node never stores them)".into()), None);
                self.wait(None).await.unwrap_or(Ended::Changed)
            };
            match ended {
                Ended::Changed => failures = 0,
                Ended::Stop => return self.finish(true).await,
                Ended::Shutdown => {
                    let remove = self.ctx().stop_on_shutdown;
                    return self.finish(remove).await;
                }
                Ended::Failed(message) => {
                    failures += 1;
                    let delay = Duration::from_millis(500)
                        .saturating_mul(1 << failures.min(6))
                        .min(Duration::from_secs(30));
                    let message = format!("{message}; retrying in {:.1}s", delay.as_secs_f64());
                    self.system(Severity::Error, message.clone());
                    self.set(ListenerState::Failed, Some(message), None);
                    if let Some(ended @ (Ended::Stop | Ended::Shutdown)) =
                        self.wait(Some(delay)).await
                    {
                        let remove = matches!(ended, Ended::Stop) || self.ctx().stop_on_shutdown;
                        return self.finish(remove).await;
                    }
                }
            }
        }
    }

    /// Waits for a new spec, a stop or a shutdown, at most `delay`.
    async fn wait(&mut self, delay: Option<Duration>) -> Option<Ended> {
        let sleep = async {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let shutdown = self.ctx().shutdown.clone();
        tokio::select! {
            () = sleep => None,
            r = self.spec.changed() => Some(if r.is_ok() { Ended::Changed } else { Ended::Shutdown }),
            () = self.stop.cancelled() => Some(Ended::Stop),
            () = shutdown.cancelled() => Some(Ended::Shutdown),
        }
    }

    /// Serves `spec` until it ends: a permit of its concurrency before
    /// each `accept`, then a task per connection.
    async fn serve(&mut self, spec: ListenerSpec) -> Ended {
        let Ready {
            sockets,
            conn,
            tmpfs,
        } = match self.start(&spec).await {
            Ok(ready) => ready,
            Err(ended) => return ended,
        };
        let accepting = CancellationToken::new();
        let conns = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(spec.concurrency.max(1) as usize));
        let mut acceptors = JoinSet::new();
        for socket in sockets {
            let (p, a, c) = (permits.clone(), accepting.clone(), conns.clone());
            acceptors.spawn(accept(socket, p, a, c, conn.clone()).in_current_span());
        }
        let ended = self.wait(None).await.unwrap_or(Ended::Changed);
        // Nothing new from now on: the sockets are closed once these end.
        accepting.cancel();
        acceptors.join_all().await;
        let drain = Duration::from_millis(spec.drain_ms);
        let drained = drain_then_stop(conns, conn, tmpfs, drain, self.ctx().shutdown.clone());
        match ended {
            // The next spec is served meanwhile.
            Ended::Changed => {
                self.draining.spawn(drained.in_current_span());
            }
            _ => drained.await,
        }
        ended
    }

    /// Loads the program, makes the network, binds the ports and mounts
    /// the secret files: then it listens.
    async fn start(&mut self, spec: &ListenerSpec) -> Result<Ready, Ended> {
        self.set(ListenerState::Starting, None, None);
        self.system(Severity::Info, format!("pulling {}", spec.image));
        let ctx = self.ctx().clone();
        let load = instance::load(
            &ctx.images,
            ctx.wasm.as_ref(),
            &ctx.logs,
            &self.id,
            &spec.image,
        );
        let program = tokio::select! {
            loaded = load => loaded.map_err(|(_, message)| Ended::Failed(message))?,
            () = self.stop.cancelled() => return Err(Ended::Stop),
            () = ctx.shutdown.cancelled() => return Err(Ended::Shutdown),
        };
        let (netns, binds) = match &ctx.net {
            Some(net) => {
                let n = net
                    .setup(&self.id)
                    .await
                    .map_err(|e| Ended::Failed(e.to_string()))?;
                let at = |p: &u16| (*p, SocketAddr::new(n.v6.into(), *p));
                (Some(n.netns), spec.ports.iter().map(at).collect())
            }
            // Without networking: a free loopback port for the first port.
            None => {
                let first = spec.ports.first().copied().unwrap_or(0);
                (
                    None,
                    vec![(first, SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))],
                )
            }
        };
        let bound = bind(netns, binds).await.map_err(Ended::Failed)?;
        self.generation += 1;
        let dir = instance::run_dir(&ctx.data_dir, &self.id).join(self.generation.to_string());
        let secrets = spec.secrets.clone();
        let (logs_dir, limits, sink) = (
            ctx.logs.instance_dir(&self.id),
            ctx.logs.limits(),
            self.sink.clone(),
        );
        let prepared = tokio::task::spawn_blocking(move || {
            let mounted = SecretsTmpfs::mount(&dir, &secrets)
                .map_err(|e| format!("delivering the secret files: {e}"))?;
            let sink = match sink {
                Some(sink) => sink,
                None => instance::open_capture(&logs_dir, limits)?,
            };
            Ok::<_, String>((mounted, sink))
        })
        .await
        .unwrap_or_else(|e| Err(format!("preparing the listener: {e}")));
        let (mounted, sink) = prepared.map_err(Ended::Failed)?;
        self.sink = Some(sink.clone());
        let (tmpfs, preopens) = mounted.map_or((None, Vec::new()), |(t, p)| (Some(t), p));

        let targets: Vec<(u16, SocketAddr)> = bound.iter().map(|(p, _, a)| (*p, *a)).collect();
        let address = match (&ctx.net, targets.first()) {
            (Some(_), Some((_, a))) => Some(a.ip().to_string()),
            (None, Some((_, a))) => Some(a.to_string()),
            (_, None) => None,
        };
        let shown: Vec<String> = targets.iter().map(|(_, a)| a.to_string()).collect();
        self.system(Severity::Info, format!("listening on {}", shown.join(", ")));
        lock(&self.status).targets = targets;
        self.set(ListenerState::Listening, None, address);
        let conn = Arc::new(Conn {
            id: self.id.clone(),
            program,
            spec: spec.clone(),
            preopens,
            sink,
            logs: ctx.logs.clone(),
            stop: CancellationToken::new(),
            status: self.status.clone(),
        });
        let sockets = bound.into_iter().map(|(_, socket, _)| socket).collect();
        Ok(Ready {
            sockets,
            conn,
            tmpfs,
        })
    }

    /// Ends the listener: with `remove` (it left the set, or the daemon
    /// stops its workloads) its network and logs end too.
    async fn finish(self, remove: bool) {
        // Connections of earlier specs end first (drained, or shut down).
        self.draining.close();
        self.draining.wait().await;
        let ctx = self.ctx().clone();
        let run_dir = instance::run_dir(&ctx.data_dir, &self.id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(run_dir)).await;
        if remove {
            if let Some(net) = &ctx.net
                && let Err(e) = net.remove(&self.id).await
            {
                tracing::warn!(error = %e, "removing the listener's network failed");
            }
            self.system(Severity::Info, "stopped");
            ctx.logs.instance_ended(&self.id);
            crate::reconcile::collect_images(&ctx.data_dir, &ctx.images).await;
        } else {
            self.system(
                Severity::Info,
                "stopped: the node daemon is shutting down (the next one starts the listener again)",
            );
        }
        lock(&self.l.inner.entries).remove(&self.id);
        self.l.inner.changed.send_replace(());
        tracing::info!("listener stopped");
    }
}

/// Lets open connections finish, for at most `drain` (not at all once the
/// daemon shuts down), then stops them; their secret files go last.
async fn drain_then_stop(
    conns: TaskTracker,
    conn: Arc<Conn>,
    tmpfs: Option<SecretsTmpfs>,
    drain: Duration,
    shutdown: CancellationToken,
) {
    conns.close();
    if !drain.is_zero() && !shutdown.is_cancelled() {
        tokio::select! {
            _ = tokio::time::timeout(drain, conns.wait()) => {}
            () = shutdown.cancelled() => {}
        }
    }
    conn.stop.cancel();
    conns.wait().await;
    if let Some(tmpfs) = tmpfs {
        let _ = tokio::task::spawn_blocking(move || drop(tmpfs)).await;
    }
}
