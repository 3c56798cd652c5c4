//! Per-connection wasm workloads: one listener per [`ListenerSpec`] of the
//! desired set, which runs a fresh instance of its program for every
//! connection it accepts, the connection as the instance's stdin and
//! stdout, its stderr into the listener's logs (`Logs::instance_dir` of
//! the listener's ID, with a `meta.json` like an instance's).
//!
//! A listener has a network namespace of its own, like an instance (its
//! IPv6 address is reachable from the ingress), and binds every port of
//! its spec there; on a node without networking it binds a free loopback
//! port for its first port. At most `concurrency` connections are served
//! at once: a permit is taken *before* `accept`, so more wait in the
//! kernel's backlog. A listener that cannot start (pull, compile, bind)
//! reports `failed` and retries with backoff; one that leaves the desired
//! set stops accepting at once, gives open connections `drain_ms`, stops
//! them, and removes its namespace and secret files. Reports (state and
//! counters) are read with [`Listeners::reports`]; [`Listeners::subscribe`]
//! fires on every change of state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use verge_api::wire::{ListenerReport, ListenerSpec, ListenerState};

use super::WasmRuntime;
use crate::logs::{Logs, Meta};
use crate::net::Network;
use crate::pull::ImageStore;
use crate::reconcile::Parts;
use crate::runtime::state::now_ms;

mod conn;
mod task;

use task::Listener;

/// What listeners work with.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub images: ImageStore,
    pub wasm: Option<WasmRuntime>,
    pub net: Option<Network>,
    pub logs: Logs,
    pub data_dir: PathBuf,
    pub stop_on_shutdown: bool,
    pub shutdown: CancellationToken,
    /// Listener tasks (and connections still draining) run on it.
    pub tasks: TaskTracker,
}

impl Ctx {
    /// The reconciler's parts, its shutdown and its tracker of tasks.
    pub(crate) fn of(parts: &Parts, shutdown: &CancellationToken, tasks: &TaskTracker) -> Ctx {
        Ctx {
            images: parts.images.clone(),
            wasm: parts.wasm.clone(),
            net: parts.net.clone(),
            logs: parts.logs.clone(),
            data_dir: parts.data_dir.clone(),
            stop_on_shutdown: parts.stop_on_shutdown,
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        }
    }
}

/// The node's listeners. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Listeners {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: Ctx,
    entries: Mutex<HashMap<String, Entry>>,
    changed: watch::Sender<()>,
}

#[derive(Debug)]
struct Entry {
    /// The latest spec; `false` while its secret contents are unknown (a
    /// spec of the saved set).
    spec: watch::Sender<(ListenerSpec, bool)>,
    /// Fires when it left the desired set.
    stop: CancellationToken,
    status: Arc<Mutex<Status>>,
}

#[derive(Debug)]
struct Status {
    report: ListenerReport,
    /// Spec port → where it is bound, while listening.
    targets: Vec<(u16, SocketAddr)>,
}

impl Listeners {
    pub(crate) fn new(ctx: Ctx) -> Listeners {
        let (changed, _) = watch::channel(());
        let inner = Inner {
            ctx,
            entries: Mutex::default(),
            changed,
        };
        Listeners {
            inner: Arc::new(inner),
        }
    }

    /// Converges on `specs`: starts new listeners, gives running ones
    /// their latest spec, stops those not in it. `known`: the specs carry
    /// their secret files' contents (not so in the saved set).
    pub(crate) fn apply(&self, specs: Vec<ListenerSpec>, known: bool) {
        let mut entries = lock(&self.inner.entries);
        for (id, e) in entries.iter() {
            if !specs.iter().any(|s| &s.id == id) {
                e.stop.cancel();
            }
        }
        for spec in specs {
            let known = known || spec.secrets.is_empty();
            if let Some(e) = entries.get(&spec.id) {
                e.spec.send_if_modified(|cur| {
                    let changed = *cur != (spec.clone(), known) && known;
                    if changed {
                        *cur = (spec.clone(), known);
                    }
                    changed
                });
                continue;
            }
            let report = ListenerReport {
                id: spec.id.clone(),
                state: ListenerState::Starting,
                message: None,
                address: None,
                active: 0,
                served: 0,
                failed: 0,
                last_failure: None,
                last_failure_category: None,
                at_ms: now_ms(),
            };
            let status = Arc::new(Mutex::new(Status {
                report,
                targets: Vec::new(),
            }));
            let (tx, rx) = watch::channel((spec.clone(), known));
            let stop = CancellationToken::new();
            self.inner.ctx.logs.instance_started(meta(&spec));
            let span = tracing::info_span!(
                "listener",
                org = %spec.org, app = %spec.app, env = %spec.env,
                release = %spec.release, listener = %spec.id
            );
            let task = Listener::new(self.clone(), rx, stop.clone(), status.clone());
            self.inner.ctx.tasks.spawn(task.run().instrument(span));
            entries.insert(
                spec.id.clone(),
                Entry {
                    spec: tx,
                    stop,
                    status,
                },
            );
        }
        drop(entries);
        self.inner.changed.send_replace(());
    }

    /// Every listener's report, by ID.
    pub(crate) fn reports(&self) -> Vec<ListenerReport> {
        let entries = lock(&self.inner.entries);
        let mut out: Vec<ListenerReport> = entries
            .values()
            .map(|e| lock(&e.status).report.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Fires whenever a listener changes state (or one comes or goes).
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.inner.changed.subscribe()
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        lock(&self.inner.entries).keys().cloned().collect()
    }

    /// Where a tunnel to `port` of listener `id` connects; `None` when
    /// `id` is no listener of this node. `Err` says why not, after
    /// "instance ID ".
    pub(crate) fn target(&self, id: &str, port: u16) -> Option<Result<SocketAddr, String>> {
        let entries = lock(&self.inner.entries);
        let e = entries.get(id)?;
        if e.stop.is_cancelled() {
            return Some(Err("is leaving this node".into()));
        }
        let st = lock(&e.status);
        if st.report.state != ListenerState::Listening {
            return Some(Err(format!(
                "is a listener that is {}, not listening",
                st.report.state
            )));
        }
        Some(match st.targets.iter().find(|(p, _)| *p == port) {
            Some((_, addr)) => Ok(*addr),
            None => Err(format!("is a listener that does not listen on port {port}")),
        })
    }
}

fn meta(spec: &ListenerSpec) -> Meta {
    Meta {
        instance: spec.id.clone(),
        workload: spec.workload.clone(),
        org: spec.org.clone(),
        app: spec.app.clone(),
        env: spec.env.clone(),
        release: spec.release.clone(),
        started_ms: now_ms(),
        ended_ms: None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
