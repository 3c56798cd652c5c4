//! Desired set → local instances.
//!
//! The reconciler keeps the last desired set (also on disk, so a restarted
//! daemon resumes without the control plane) and one supervisor task per
//! instance in it. A supervisor pulls the image, prepares the network,
//! starts the process, waits for it, applies the restart policy (exponential
//! backoff; five failures in a row without a minute of running is a crash
//! loop, and the instance ends `failed`), and stops it (SIGTERM, grace,
//! SIGKILL) when the instance leaves the set. While an instance with a
//! health check runs, its supervisor also checks it ([`crate::health`]):
//! the first pass makes it healthy; three failures in a row make it
//! unhealthy, and then it is stopped and handled as a failed exit (category
//! `health`). Every state change, and every change of health, is sent to
//! the agent as an [`InstanceReport`], and written as a system record in
//! the instance's logs ([`crate::logs`]), with its exits and restarts.
//!
//! On start, instances the previous daemon left running are re-adopted, not
//! restarted (with the address they had: the network's allocation, or the
//! loopback `PORT` they were started with); leftovers no longer desired are
//! stopped and cleaned up.
//!
//! Volumes: a supervisor claims its instance's volumes from the node's
//! [`Volumes`] before each start (a failed claim is a failed start, category
//! `start`), keeps them across restarts, and releases them once the
//! instance will not run again (removed, or ended for good). Re-adopted
//! instances claim theirs again (the runtime recorded them).
//!
//! Wasm (`runtime = "wasm"`): a supervisor pulls the artifact and loads
//! its program instead ([`crate::wasm::instance`]); the instance runs on a
//! thread of the daemon, behind the same [`Instance`] handle, so restarts,
//! health checks and reports are the same. Wasm instances cannot outlive
//! the daemon: they stop when it shuts down and a restarted daemon starts
//! them again. Per-connection listeners of the set are handed to
//! [`crate::wasm::listener`].
//!
//! Secret files: their contents live in memory only. The saved desired set
//! has them blanked, so after a daemon restart an instance with secret
//! files that must (re)start waits, `pending`, for the control plane to
//! send its set again (it does on every session). Reports, messages and
//! tracing name a secret file by bundle and path only.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::logs::Severity;
use verge_api::manifest::{Restart, Runtime, format_size};
use verge_api::wire::{
    DesiredSet, ErrorCategory, InstanceReport, InstanceSpec, InstanceState, Isolation,
    ListenerReport, SecretFile,
};

use crate::health::{Check, Checker, Verdict};
use crate::logs::{Logs, Meta};
use crate::net::Network;
use crate::pull::{ImageStore, PulledImage};
use crate::runtime::state::now_ms;
use crate::runtime::{
    Adopted, Attachments, Exit, Instance, LaunchSpec, ProcessRuntime, VolumeMount,
};
use crate::volumes::Volumes;
use crate::wasm::listener::{self, Listeners};
use crate::wasm::{Program, WasmRuntime, instance as wasm_instance};

/// Failures in a row (each after less than [`HEALTHY_RUN`] of running) that make a crash loop.
const CRASH_LOOP: u32 = 5;
/// A run this long resets the failure count.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Most processes an instance may have.
const PIDS_LIMIT: u64 = 1024;

/// What the reconciler works with.
#[derive(Debug, Clone)]
pub struct Parts {
    pub data_dir: PathBuf,
    pub images: ImageStore,
    pub runtime: ProcessRuntime,
    /// `None` with `--isolation none`.
    pub net: Option<Network>,
    pub isolation: Isolation,
    pub stop_grace: Duration,
    /// Stop every instance when the daemon shuts down (`verge dev`); a
    /// `verge node` leaves them running for its successor to re-adopt.
    pub stop_on_shutdown: bool,
    /// Instance logs: each instance's `meta.json` and system records
    /// (every state change, see [`Supervisor::report`]).
    pub logs: Logs,
    /// Runs wasm instances and listeners; `None`: they fail to start.
    pub wasm: Option<WasmRuntime>,
}

/// A handle on the reconciler; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    /// The node's volumes; `None`: instances with volumes fail to start.
    volumes: Option<Volumes>,
    reports: mpsc::Sender<InstanceReport>,
    state: Mutex<State>,
    /// Fires on daemon shutdown: supervisors end (stopping their instance
    /// only with `stop_on_shutdown`).
    shutdown: CancellationToken,
    supervisors: tokio_util::task::TaskTracker,
    /// The per-connection wasm listeners (their tasks are supervisors too).
    listeners: Listeners,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    slots: HashMap<String, Slot>,
}

#[derive(Debug)]
struct Slot {
    report: InstanceReport,
    /// The port its spec serves (what a tunnel may connect to).
    port: Option<u16>,
    /// A wasm instance (no exec).
    wasm: bool,
    /// Fires when the instance left the desired set.
    stop: CancellationToken,
    /// The latest secret files the control plane sent for it; `None` while
    /// unknown (its spec came from the saved set, which has no contents).
    secrets: watch::Sender<Option<Vec<SecretFile>>>,
}

/// The desired set as saved on disk, secret files without their contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    set: DesiredSet,
}

impl Reconciler {
    /// [`start_with_volumes`](Self::start_with_volumes) without volumes:
    /// instances that have some fail to start.
    pub async fn start(
        parts: Parts,
        shutdown: CancellationToken,
    ) -> (Reconciler, mpsc::Receiver<InstanceReport>) {
        Self::start_with_volumes(parts, None, shutdown).await
    }

    /// Loads the saved desired set, re-adopts running instances (claiming
    /// their volumes from `volumes` again), and starts supervising.
    /// Reports go to the returned receiver.
    pub async fn start_with_volumes(
        parts: Parts,
        volumes: Option<Volumes>,
        shutdown: CancellationToken,
    ) -> (Reconciler, mpsc::Receiver<InstanceReport>) {
        let (tx, rx) = mpsc::channel(1024);
        let saved = load_saved(&parts.data_dir).await;
        let adopted = match parts.runtime.adopt().await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "re-adopting instances failed");
                Vec::new()
            }
        };
        // Wasm instances and listeners of an earlier daemon ended with it.
        let data_dir = parts.data_dir.clone();
        let _ =
            tokio::task::spawn_blocking(move || wasm_instance::clean_leftovers(&data_dir)).await;
        let supervisors = tokio_util::task::TaskTracker::new();
        let listeners = Listeners::new(listener::Ctx::of(&parts, &shutdown, &supervisors));
        let r = Reconciler {
            inner: Arc::new(Inner {
                parts,
                volumes,
                reports: tx,
                state: Mutex::new(State::default()),
                shutdown,
                supervisors,
                listeners,
            }),
        };
        let mut adopted: HashMap<String, Adopted> = adopted
            .into_iter()
            .map(|a| (a.spec.instance_id.clone(), a))
            .collect();
        // Running with their volumes mounted: theirs until they stop.
        for (id, a) in &adopted {
            for m in &a.mounts {
                if let Err(e) = r.claim(&m.volume, id) {
                    tracing::warn!(instance = %id, volume = %m.volume, error = %e, "claiming a re-adopted instance's volume failed");
                }
            }
        }
        // Logs of instances that left while no daemon ran count as ended.
        r.inner.parts.logs.ended_except(
            saved
                .set
                .instances
                .iter()
                .map(|s| s.id.clone())
                .chain(saved.set.listeners.iter().map(|l| l.id.clone()))
                .chain(adopted.keys().cloned()),
        );
        tracing::info!(
            adopted = adopted.len(),
            desired = saved.set.instances.len(),
            listeners = saved.set.listeners.len(),
            "reconciler starting"
        );
        // Saved without the contents of their secret files.
        r.inner.listeners.apply(saved.set.listeners, false);
        {
            let mut st = r.inner.state.lock().expect("not poisoned");
            st.version = saved.set.version;
            for spec in saved.set.instances {
                let running = adopted.remove(&spec.id);
                // Saved without the contents of its secret files.
                let secrets = spec.secrets.is_empty().then(Vec::new);
                r.spawn_supervisor(&mut st, spec, running, secrets);
            }
        }
        let leftovers: Vec<String> = adopted.keys().cloned().collect();
        r.cleanup_orphans(&leftovers).await;
        for (id, leftover) in adopted {
            let r2 = r.clone();
            r.inner.supervisors.spawn(async move {
                tracing::info!(instance = %id, "stopping a leftover instance no longer desired");
                let logs = &r2.inner.parts.logs;
                logs.system(
                    &id,
                    Severity::Info,
                    "stopping: no longer desired on this node (found after a daemon restart)",
                );
                leftover.instance.stop(r2.inner.parts.stop_grace).await;
                r2.cleanup(&id).await;
                for m in &leftover.mounts {
                    r2.release(&m.volume, &id);
                }
                logs.system(&id, Severity::Info, "stopped");
                logs.instance_ended(&id);
            });
        }
        (r, rx)
    }

    /// Converges on `set`: starts what is new, stops what left.
    pub async fn apply(&self, mut set: DesiredSet) {
        if let Err(e) = save(&self.inner.parts.data_dir, &set).await {
            tracing::error!(error = %e, "saving the desired set failed");
        }
        self.inner
            .listeners
            .apply(std::mem::take(&mut set.listeners), true);
        let mut st = self.inner.state.lock().expect("not poisoned");
        st.version = set.version;
        let wanted: std::collections::HashSet<&str> =
            set.instances.iter().map(|s| s.id.as_str()).collect();
        for (id, slot) in &st.slots {
            if !wanted.contains(id.as_str()) {
                slot.stop.cancel();
            }
        }
        for spec in set.instances {
            match st.slots.get(&spec.id) {
                // The latest contents, for its next start (the saved set has none).
                Some(slot) => {
                    slot.secrets.send_if_modified(|known| {
                        let changed = known.as_ref() != Some(&spec.secrets);
                        if changed {
                            *known = Some(spec.secrets.clone());
                        }
                        changed
                    });
                }
                None => {
                    let secrets = Some(spec.secrets.clone());
                    self.spawn_supervisor(&mut st, spec, None, secrets);
                }
            }
        }
    }

    /// Waits until every supervisor ended (after shutdown), then releases
    /// the network namespace directory if no instance is left in it.
    pub async fn stopped(&self) {
        self.inner.supervisors.close();
        self.inner.supervisors.wait().await;
        if let Some(net) = &self.inner.parts.net
            && let Err(e) = net.close().await
        {
            tracing::warn!(error = %e, "releasing the network namespace directory failed");
        }
    }

    /// Every instance's current report (for `Hello`).
    pub fn snapshot(&self) -> Vec<InstanceReport> {
        let st = self.inner.state.lock().expect("not poisoned");
        st.slots.values().map(|s| s.report.clone()).collect()
    }

    /// Every listener's report, with its counters (for
    /// `NodeMsg::Listeners`).
    pub fn listeners(&self) -> Vec<ListenerReport> {
        self.inner.listeners.reports()
    }

    /// Changes whenever a listener changes state.
    pub fn listener_changes(&self) -> watch::Receiver<()> {
        self.inner.listeners.subscribe()
    }

    pub fn applied_version(&self) -> u64 {
        self.inner.state.lock().expect("not poisoned").version
    }

    /// Bytes used by the image store.
    pub fn images_usage(&self) -> u64 {
        self.inner.parts.images.disk_usage()
    }

    /// `secrets`: the contents of the spec's secret files, `None` when
    /// unknown (a spec from the saved set).
    fn spawn_supervisor(
        &self,
        st: &mut State,
        spec: InstanceSpec,
        running: Option<Adopted>,
        secrets: Option<Vec<SecretFile>>,
    ) {
        let stop = CancellationToken::new();
        let (secrets, secrets_rx) = watch::channel(secrets);
        let reach = running
            .as_ref()
            .and_then(|a| self.readopted_reach(&spec.id, &a.spec));
        let report = InstanceReport {
            id: spec.id.clone(),
            state: if running.is_some() {
                InstanceState::Running
            } else {
                InstanceState::Pending
            },
            category: None,
            message: None,
            address: reach.map(|r| r.address(spec.port)),
            restarts: 0,
            at_ms: now_ms(),
            healthy: None,
        };
        st.slots.insert(
            spec.id.clone(),
            Slot {
                report,
                port: spec.port,
                wasm: spec.runtime == Runtime::Wasm,
                stop: stop.clone(),
                secrets,
            },
        );
        self.inner.parts.logs.instance_started(Meta::of(&spec));
        let span = tracing::info_span!(
            "instance",
            org = %spec.org, app = %spec.app, env = %spec.env,
            release = %spec.release, instance = %spec.id
        );
        let sup = Supervisor {
            r: self.clone(),
            spec,
            stop,
            secrets: secrets_rx,
            restarts: 0,
            reach,
            healthy: None,
            readopted: false,
        };
        self.inner
            .supervisors
            .spawn(sup.run(running.map(|a| a.instance)).instrument(span));
    }

    /// Where a re-adopted instance is reached, as `launch` decided when it
    /// started it: the IPv6 address the network allocated to it, or the
    /// loopback `PORT` it was started with.
    fn readopted_reach(&self, id: &str, launched: &LaunchSpec) -> Option<Reach> {
        let reach = match &self.inner.parts.net {
            Some(net) => net.addresses(id).map(|(v6, _)| Reach::Own(v6)),
            None => launched
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PORT")
                .and_then(|(_, v)| v.parse().ok())
                .map(Reach::Loopback),
        };
        if reach.is_none() {
            tracing::warn!(
                instance = %id,
                "the re-adopted instance's address is unknown (no address allocation, or no PORT); it is reported without one, and not health checked"
            );
        }
        reach
    }

    /// Records and sends a state change.
    fn report(&self, r: InstanceReport) {
        let mut st = self.inner.state.lock().expect("not poisoned");
        if let Some(slot) = st.slots.get_mut(&r.id) {
            slot.report = r.clone();
        }
        drop(st);
        // A full queue means the agent is disconnected; the next Hello carries the state.
        let _ = self.inner.reports.try_send(r);
    }

    /// Claims volume `volume` for instance `id`: the host dir it is mounted
    /// on. (Claims are bookkeeping in memory: nothing to wait for.)
    fn claim(&self, volume: &str, id: &str) -> Result<PathBuf, String> {
        match &self.inner.volumes {
            Some(volumes) => volumes.claim(volume, id).map_err(|e| e.to_string()),
            None => Err("this node daemon has no volume manager".into()),
        }
    }

    /// Releases instance `id`'s claim on `volume` (if it has one).
    fn release(&self, volume: &str, id: &str) {
        if let Some(volumes) = &self.inner.volumes {
            volumes.release(volume, id);
        }
    }

    fn forget(&self, id: &str) {
        self.inner
            .state
            .lock()
            .expect("not poisoned")
            .slots
            .remove(id);
    }

    /// Removes what an instance left on the node (cgroup, rootfs, network).
    async fn cleanup(&self, id: &str) {
        if let Err(e) = self.inner.parts.runtime.remove(id).await {
            tracing::warn!(instance = %id, error = %e, "removing the instance's runtime state failed");
        }
        if let Some(net) = &self.inner.parts.net
            && let Err(e) = net.remove(id).await
        {
            tracing::warn!(instance = %id, error = %e, "removing the instance's network failed");
        }
    }

    /// Network namespaces of instances that are neither desired nor running.
    async fn cleanup_orphans(&self, leftovers: &[String]) {
        let Some(net) = &self.inner.parts.net else {
            return;
        };
        let mut known: Vec<String> = self
            .inner
            .state
            .lock()
            .expect("not poisoned")
            .slots
            .keys()
            .cloned()
            .collect();
        // Running, about to be stopped (and cleaned up) by their own task.
        known.extend(leftovers.iter().cloned());
        known.extend(self.inner.listeners.ids());
        if let Ok(ids) = net.list().await {
            for id in ids.into_iter().filter(|i| !known.contains(i)) {
                tracing::info!(instance = %id, "removing a leftover instance network");
                let _ = net.remove(&id).await;
            }
        }
    }

    /// The directory of instance `id` while it runs on this node, for an
    /// exec session in it. `Err` says why not, after "instance ID ", e.g.
    /// `is pulling, not running`.
    pub fn exec_dir(&self, id: &str) -> Result<PathBuf, String> {
        let st = self.inner.state.lock().expect("not poisoned");
        let slot = st.slots.get(id).ok_or("does not run on this node")?;
        if slot.stop.is_cancelled() {
            return Err("is leaving this node".into());
        }
        if slot.report.state != InstanceState::Running {
            return Err(format!("is {}, not running", slot.report.state));
        }
        if slot.wasm {
            return Err("is a wasm instance: exec runs commands in process instances only".into());
        }
        Ok(self.inner.parts.runtime.instance_dir(id))
    }

    /// Where a tunnel to `port` of instance `id` connects: the running
    /// instance's address, and only for its own port (the spec's `port`;
    /// on loopback the node's port stands in for it). `Err` says why not,
    /// after "instance ID ", e.g. `is pulling, not running`. A listener's
    /// ID is the listener's address on `port`, one of its spec's ports.
    pub fn tunnel_target(&self, id: &str, port: u16) -> Result<SocketAddr, String> {
        if let Some(target) = self.inner.listeners.target(id, port) {
            return target;
        }
        let (report, serves) = {
            let st = self.inner.state.lock().expect("not poisoned");
            let slot = st.slots.get(id).ok_or("does not run on this node")?;
            if slot.stop.is_cancelled() {
                return Err("is leaving this node".into());
            }
            (slot.report.clone(), slot.port)
        };
        if report.state != InstanceState::Running {
            return Err(format!("is {}, not running", report.state));
        }
        match serves {
            Some(p) if p == port => {}
            Some(p) => return Err(format!("serves port {p}, not {port}")),
            None => return Err(format!("serves no port (asked for {port})")),
        }
        // `[v6]:port` with networking, `127.0.0.1:<node's port>` without.
        report
            .address
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "has no known address".to_string())
    }
}

/// One instance's lifecycle.
struct Supervisor {
    r: Reconciler,
    spec: InstanceSpec,
    stop: CancellationToken,
    /// The contents of its secret files (see [`Slot::secrets`]).
    secrets: watch::Receiver<Option<Vec<SecretFile>>>,
    restarts: u32,
    /// Where the instance is reached, once known.
    reach: Option<Reach>,
    /// The health verdict of the current run (see [`InstanceReport::healthy`]).
    healthy: Option<bool>,
    /// The instance being reported running was re-adopted, not started.
    readopted: bool,
}

/// Where an instance is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Its own IPv6 address (with networking), on its own ports.
    Own(Ipv6Addr),
    /// A loopback port the node picked and passed as `PORT` (without
    /// networking, with isolation `none`).
    Loopback(u16),
}

impl Reach {
    /// The report's `address`; `port` is the instance spec's.
    fn address(self, port: Option<u16>) -> String {
        match (self, port) {
            (Reach::Own(v6), Some(p)) => format!("[{v6}]:{p}"),
            (Reach::Own(v6), None) => v6.to_string(),
            (Reach::Loopback(p), _) => format!("127.0.0.1:{p}"),
        }
    }

    /// Where a health check of port `tcp` connects. On loopback the node's
    /// port stands in for the spec's `port` (which the workload serves on
    /// as `PORT`); other ports are the workload's own.
    fn probe(self, port: Option<u16>, tcp: u16) -> SocketAddr {
        match self {
            Reach::Own(v6) => SocketAddr::new(v6.into(), tcp),
            Reach::Loopback(p) => {
                let p = if port == Some(tcp) { p } else { tcp };
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p)
            }
        }
    }
}

/// What an instance runs.
enum Artifact {
    Image(PulledImage),
    Wasm(Program),
}

/// How a wait ended.
enum Woke<T> {
    Done(T),
    /// The instance left the desired set.
    Stop,
    /// The daemon is shutting down: leave the instance as it is.
    Shutdown,
}

/// How a run ended.
enum Ended {
    Exited(Exit),
    /// Its health check failed too often; what the last failure said.
    Unhealthy(String),
}

impl Supervisor {
    fn report(
        &self,
        state: InstanceState,
        category: Option<ErrorCategory>,
        message: Option<String>,
    ) {
        if let Some(m) = &message {
            tracing::info!(%state, category = ?category, message = %m, "instance state");
        } else {
            tracing::info!(%state, "instance state");
        }
        if let Some((severity, text)) = self.state_record(state, category, message.as_deref()) {
            self.system(severity, text);
        }
        self.r.report(InstanceReport {
            id: self.spec.id.clone(),
            state,
            category,
            message,
            address: self.reach.map(|r| r.address(self.spec.port)),
            restarts: self.restarts,
            at_ms: now_ms(),
            // A verdict is about a running instance only.
            healthy: if state == InstanceState::Running {
                self.healthy
            } else {
                None
            },
        });
    }

    /// The system record of a state change, if it makes one. Exits,
    /// failed starts and restarts are recorded where they happen (the
    /// `pending` report that follows them says it all at once).
    fn state_record(
        &self,
        state: InstanceState,
        category: Option<ErrorCategory>,
        message: Option<&str>,
    ) -> Option<(Severity, String)> {
        let with = |what: &str| match message {
            Some(m) => format!("{what}: {m}"),
            None => what.to_owned(),
        };
        Some(match state {
            InstanceState::Pulling => (Severity::Info, format!("pulling {}", self.spec.image)),
            InstanceState::Starting => (Severity::Info, "starting".into()),
            InstanceState::Running => match (category, self.healthy) {
                (Some(ErrorCategory::Health), _) => (Severity::Warn, with("unhealthy")),
                (_, Some(true)) => (Severity::Info, "healthy".into()),
                _ if self.readopted => (
                    Severity::Info,
                    "re-adopted by a restarted node daemon".into(),
                ),
                _ => (Severity::Info, "started".into()),
            },
            InstanceState::Pending => return None,
            InstanceState::Stopping => (Severity::Info, "stopping".into()),
            InstanceState::Stopped => (Severity::Info, with("stopped")),
            InstanceState::Failed => (Severity::Error, with("failed")),
        })
    }

    /// Writes a system record of the instance.
    fn system(&self, severity: Severity, message: impl Into<String>) {
        self.r
            .inner
            .parts
            .logs
            .system(&self.spec.id, severity, message);
    }

    /// The instance's health check, when it has one and its address is known.
    fn check(&self) -> Option<Check> {
        let health = self.spec.health?;
        let addr = self.reach?.probe(self.spec.port, health.tcp);
        Some(Check::new(addr, &health))
    }

    async fn until<T>(&self, fut: impl std::future::Future<Output = T>) -> Woke<T> {
        tokio::select! {
            v = fut => Woke::Done(v),
            () = self.stop.cancelled() => Woke::Stop,
            () = self.r.inner.shutdown.cancelled() => Woke::Shutdown,
        }
    }

    async fn run(mut self, mut running: Option<Instance>) {
        let mut failures: u32 = 0;
        loop {
            self.readopted = running.is_some();
            let inst = match running.take() {
                Some(i) => i,
                None => match self.launch().await {
                    Woke::Done(Ok(i)) if self.stop.is_cancelled() => {
                        return self.finish(Some(i)).await;
                    }
                    Woke::Done(Ok(i)) => i,
                    Woke::Done(Err((category, message))) => {
                        let what = match category {
                            ErrorCategory::ImagePull => "pulling the image failed",
                            _ => "starting failed",
                        };
                        self.system(Severity::Error, format!("{what}: {message}"));
                        failures += 1;
                        if !self.back_off(failures, Some(category), message).await {
                            return;
                        }
                        continue;
                    }
                    Woke::Stop => return self.finish(None).await,
                    Woke::Shutdown => return,
                },
            };
            self.healthy = None;
            self.report(InstanceState::Running, None, None);
            self.readopted = false;
            let started = Instant::now();
            let ended = match self.watch(&inst).await {
                Woke::Done(ended) => ended,
                Woke::Stop => return self.finish(Some(inst)).await,
                Woke::Shutdown if self.r.inner.parts.stop_on_shutdown => {
                    return self.finish(Some(inst)).await;
                }
                // It runs inside the daemon: it cannot be left running.
                Woke::Shutdown if self.spec.runtime == Runtime::Wasm => {
                    inst.stop(self.r.inner.parts.stop_grace).await;
                    self.system(Severity::Info, "stopped: the node daemon is shutting down (a wasm instance runs inside it; the next daemon starts it again)");
                    return;
                }
                Woke::Shutdown => return,
            };
            // A long run resets the count, unless it never passed its health check.
            if started.elapsed() >= HEALTHY_RUN
                && (self.check().is_none() || self.healthy == Some(true))
            {
                failures = 0;
            }
            let (category, message) = match ended {
                Ended::Exited(exit) => {
                    let (category, message) = classify(&exit, self.spec.memory);
                    self.system(exit_severity(category), message.clone());
                    (category, message)
                }
                Ended::Unhealthy(message) => {
                    self.healthy = Some(false);
                    self.report(
                        InstanceState::Running,
                        Some(ErrorCategory::Health),
                        Some(message.clone()),
                    );
                    tracing::info!("stopping the unhealthy instance");
                    let exit = inst.stop(self.r.inner.parts.stop_grace).await;
                    self.system(
                        Severity::Warn,
                        format!("stopped for failing its health check ({})", exit.describe()),
                    );
                    (Some(ErrorCategory::Health), message)
                }
            };
            self.healthy = None;
            if let Err(e) = self.r.inner.parts.runtime.remove(&self.spec.id).await {
                tracing::warn!(error = %e, "removing the exited instance's runtime state failed");
            }
            let failed = category.is_some();
            let restart = match self.spec.restart {
                Restart::Always => true,
                Restart::OnFailure => failed,
                Restart::Never => false,
            };
            if !restart {
                let state = if failed {
                    InstanceState::Failed
                } else {
                    InstanceState::Stopped
                };
                self.report(state, category, Some(message));
                return self.idle_until_removed().await;
            }
            if failed {
                failures += 1;
            }
            if !self.back_off(failures, category, message).await {
                return;
            }
        }
    }

    /// Waits for the instance to exit while running its health check, if
    /// it has one: reports when it turns healthy, and ends when it turns
    /// unhealthy (still running).
    async fn watch(&mut self, inst: &Instance) -> Woke<Ended> {
        let Some(check) = self.check() else {
            return match self.until(inst.wait()).await {
                Woke::Done(exit) => Woke::Done(Ended::Exited(exit)),
                Woke::Stop => Woke::Stop,
                Woke::Shutdown => Woke::Shutdown,
            };
        };
        enum Event {
            Exited(Exit),
            Health(Verdict),
        }
        let mut checker = Checker::new(check);
        loop {
            // Both are cancel-safe: an exit is never missed, and the checker
            // keeps its timer and failure count from one turn to the next.
            let event = self.until(async {
                tokio::select! {
                    // An exit that is there wins over a verdict due at the same time.
                    biased;
                    exit = inst.wait() => Event::Exited(exit),
                    verdict = checker.next() => Event::Health(verdict),
                }
            });
            match event.await {
                Woke::Done(Event::Exited(exit)) => return Woke::Done(Ended::Exited(exit)),
                Woke::Done(Event::Health(Verdict::Healthy)) => {
                    tracing::info!(check = %check.addr, "instance healthy");
                    self.healthy = Some(true);
                    self.report(InstanceState::Running, None, None);
                }
                Woke::Done(Event::Health(Verdict::Unhealthy(message))) => {
                    tracing::info!(%message, "instance unhealthy");
                    return Woke::Done(Ended::Unhealthy(message));
                }
                Woke::Stop => return Woke::Stop,
                Woke::Shutdown => return Woke::Shutdown,
            }
        }
    }

    /// Before a restart: waits the backoff (growing with `failures`) and
    /// says so; `false` when the instance is done (five failures in a row
    /// end it `failed`, with the last failure's category; or it was
    /// removed, or the daemon shuts down). `category` is `None` for a clean
    /// exit restarted by `restart = "always"`.
    async fn back_off(
        &mut self,
        failures: u32,
        category: Option<ErrorCategory>,
        message: String,
    ) -> bool {
        if failures >= CRASH_LOOP {
            let what = match category {
                Some(ErrorCategory::Crash) | None => "crash loop",
                Some(_) => "giving up",
            };
            self.report(
                InstanceState::Failed,
                Some(category.unwrap_or(ErrorCategory::Crash)),
                Some(format!(
                    "{what}: failed {failures} times in a row; last: {message}"
                )),
            );
            self.idle_until_removed().await;
            return false;
        }
        let delay = Duration::from_millis(500)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(30));
        self.restarts += 1;
        let streak = match category {
            Some(_) => format!(" (failure {failures} in a row)"),
            None => String::new(),
        };
        self.system(
            Severity::Warn,
            format!("restarting in {}{streak}", humantime_short(delay)),
        );
        self.report(
            InstanceState::Pending,
            category,
            Some(format!(
                "{message}; restarting in {}",
                humantime_short(delay)
            )),
        );
        match self.until(tokio::time::sleep(delay)).await {
            Woke::Done(()) => true,
            Woke::Stop => {
                self.finish(None).await;
                false
            }
            Woke::Shutdown => false,
        }
    }

    /// Waits for its secret files' contents (when it has secret files and
    /// they are unknown), pulls, claims its volumes, prepares the network
    /// and starts the process.
    async fn launch(&mut self) -> Woke<Result<Instance, (ErrorCategory, String)>> {
        let parts = self.r.inner.parts.clone();
        let secrets = match self.secrets().await {
            Woke::Done(secrets) => secrets,
            Woke::Stop => return Woke::Stop,
            Woke::Shutdown => return Woke::Shutdown,
        };
        self.report(InstanceState::Pulling, None, None);
        let artifact = match self.until(self.pull()).await {
            Woke::Done(Ok(artifact)) => artifact,
            Woke::Done(Err(e)) => return Woke::Done(Err(e)),
            Woke::Stop => return Woke::Stop,
            Woke::Shutdown => return Woke::Shutdown,
        };
        self.report(InstanceState::Starting, None, None);
        let volumes = match self.claim_volumes() {
            Ok(v) => v,
            Err(e) => return Woke::Done(Err((ErrorCategory::Start, e))),
        };
        // Setting up the network and starting run to the end, never
        // cancelled half-way: a dropped start could leave a running shim
        // behind. A stop that came meanwhile is honoured right after.
        let (netns, port, reach) = match &parts.net {
            Some(net) => match net.setup(&self.spec.id).await {
                Ok(n) => (Some(n.netns), self.spec.port, Reach::Own(n.v6)),
                Err(e) => return Woke::Done(Err((ErrorCategory::Start, e.to_string()))),
            },
            None => match free_loopback_port() {
                Ok(p) => (None, Some(p), Reach::Loopback(p)),
                Err(e) => {
                    return Woke::Done(Err((
                        ErrorCategory::Start,
                        format!("no free loopback port: {e}"),
                    )));
                }
            },
        };
        self.reach = Some(reach);
        let image = match artifact {
            Artifact::Image(image) => image,
            Artifact::Wasm(program) => {
                let start = wasm_instance::Start {
                    data_dir: &parts.data_dir,
                    logs: &parts.logs,
                    netns,
                    port,
                    volumes: &volumes,
                    secrets: &secrets,
                };
                let started = wasm_instance::start(&self.spec, program, start);
                return Woke::Done(started.map_err(|e| (ErrorCategory::Start, e)));
            }
        };
        let launch = match launch_spec(&self.spec, &image, netns, port) {
            Ok(l) => l,
            Err(e) => return Woke::Done(Err((ErrorCategory::Start, e))),
        };
        let attach = Attachments { volumes, secrets };
        match parts.runtime.start_with(launch, attach).await {
            Ok(inst) => Woke::Done(Ok(inst)),
            Err(e) => Woke::Done(Err((ErrorCategory::Start, e.to_string()))),
        }
    }

    /// The image, or the wasm program (pulled and loaded).
    async fn pull(&self) -> Result<Artifact, (ErrorCategory, String)> {
        let (p, id, image) = (&self.r.inner.parts, &self.spec.id, &self.spec.image);
        match self.spec.runtime {
            Runtime::Process => p
                .images
                .pull(image)
                .await
                .map(Artifact::Image)
                .map_err(|e| (ErrorCategory::ImagePull, e.to_string())),
            Runtime::Wasm => wasm_instance::load(&p.images, p.wasm.as_ref(), &p.logs, id, image)
                .await
                .map(Artifact::Wasm),
        }
    }

    /// The contents of the instance's secret files; while unknown (after a
    /// daemon restart), reports `pending` and waits for the control plane.
    async fn secrets(&mut self) -> Woke<Vec<SecretFile>> {
        if self.spec.secrets.is_empty() {
            return Woke::Done(Vec::new());
        }
        if self.secrets.borrow().is_none() {
            self.report(
                InstanceState::Pending,
                None,
                Some("waiting for the control plane to send the instance's secret files again (the node never stores them)".into()),
            );
        }
        let mut rx = self.secrets.clone();
        match self.until(rx.wait_for(Option::is_some)).await {
            Woke::Done(Ok(known)) => Woke::Done(known.clone().unwrap_or_default()),
            // The slot (the sender) is gone only when the supervisor ends.
            Woke::Done(Err(_)) | Woke::Shutdown => Woke::Shutdown,
            Woke::Stop => Woke::Stop,
        }
    }

    /// Claims the instance's volumes (again, on a restart: claims are the
    /// instance's until [`release_volumes`](Self::release_volumes)).
    fn claim_volumes(&self) -> Result<Vec<VolumeMount>, String> {
        self.spec
            .volumes
            .iter()
            .map(|v| {
                let source = self
                    .r
                    .claim(&v.volume, &self.spec.id)
                    .map_err(|e| format!("volume {} at {}: {e}", v.name, v.path))?;
                Ok(VolumeMount {
                    volume: v.volume.clone(),
                    name: v.name.clone(),
                    source,
                    target: v.path.clone(),
                })
            })
            .collect()
    }

    /// Once the instance will not run again.
    fn release_volumes(&self) {
        for v in &self.spec.volumes {
            self.r.release(&v.volume, &self.spec.id);
        }
    }

    /// Stops the instance (when running), cleans up, reports `stopped`.
    /// Behind an endpoint, a running instance first drains: the routing
    /// table dropped it when it left the desired set, so the ingress sends
    /// it nothing new, and its open connections get the endpoint's drain
    /// timeout (`spec.drain_ms`) to finish. A daemon shutdown cuts it short.
    async fn finish(&self, inst: Option<Instance>) {
        self.report(InstanceState::Stopping, None, None);
        if let Some(inst) = inst {
            let shutdown = &self.r.inner.shutdown;
            if self.spec.drain_ms > 0 && !shutdown.is_cancelled() {
                tracing::info!(drain_ms = self.spec.drain_ms, "draining before the stop");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(self.spec.drain_ms)) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            inst.stop(self.r.inner.parts.stop_grace).await;
        }
        self.r.cleanup(&self.spec.id).await;
        self.release_volumes();
        self.report(InstanceState::Stopped, None, None);
        self.r.inner.parts.logs.instance_ended(&self.spec.id);
        self.r.forget(&self.spec.id);
        collect_images(&self.r.inner.parts.data_dir, &self.r.inner.parts.images).await;
    }

    /// A finished instance (exited without restart, or failed) stays
    /// visible until the control plane removes it from the set.
    async fn idle_until_removed(&self) {
        self.release_volumes();
        match self.until(std::future::pending::<()>()).await {
            Woke::Stop => self.finish(None).await,
            Woke::Done(()) | Woke::Shutdown => {}
        }
    }
}

/// What the process runtime is told to run.
fn launch_spec(
    spec: &InstanceSpec,
    image: &PulledImage,
    netns: Option<PathBuf>,
    port: Option<u16>,
) -> Result<LaunchSpec, String> {
    let argv: Vec<String> = match &spec.command {
        Some(cmd) => cmd.clone(),
        None => image
            .config
            .entrypoint
            .iter()
            .chain(&image.config.cmd)
            .cloned()
            .collect(),
    };
    if argv.is_empty() {
        return Err(format!(
            "image {} has no entrypoint or command, and the workload sets no command",
            spec.image
        ));
    }
    let mut env: Vec<(String, String)> = image
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    fn set(env: &mut Vec<(String, String)>, k: &str, v: String) {
        env.retain(|(k2, _)| k2 != k);
        env.push((k.to_string(), v));
    }
    for (k, v) in &spec.env_vars {
        set(&mut env, k, v.clone());
    }
    if let Some(p) = port {
        set(&mut env, "PORT", p.to_string());
    }
    Ok(LaunchSpec {
        instance_id: spec.id.clone(),
        layers: image.layers.clone(),
        argv,
        env,
        working_dir: image.config.working_dir.clone(),
        user: image.config.user.clone(),
        hostname: spec.id.clone(),
        cpu: spec.cpu,
        memory: spec.memory,
        pids: PIDS_LIMIT,
        netns,
    })
}

/// How serious an exit of `category` is in the system log: a clean exit
/// is `info`, a failed health check `warn`, any other failure `error`.
fn exit_severity(category: Option<ErrorCategory>) -> Severity {
    match category {
        None => Severity::Info,
        Some(ErrorCategory::Health) => Severity::Warn,
        Some(_) => Severity::Error,
    }
}

/// The category and message of an exit: `None` category for a clean exit.
fn classify(exit: &Exit, memory: u64) -> (Option<ErrorCategory>, String) {
    let message = if exit.oom && exit.message.is_none() {
        format!("killed: out of memory (limit {})", format_size(memory))
    } else {
        exit.describe()
    };
    (exit.category(), message)
}

fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn humantime_short(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `set` with every secret file's contents blanked (they never go to disk).
fn without_secret_contents(set: &DesiredSet) -> DesiredSet {
    let mut set = set.clone();
    let instances = set.instances.iter_mut().flat_map(|i| &mut i.secrets);
    let listeners = set.listeners.iter_mut().flat_map(|l| &mut l.secrets);
    for secret in instances.chain(listeners) {
        secret.contents = String::new();
    }
    set
}

/// Drops images no instance or listener of the saved desired set uses,
/// down to the store's budget.
pub(crate) async fn collect_images(data_dir: &Path, images: &ImageStore) {
    // Images are named by the digest their pinned reference carries.
    let saved = load_saved(data_dir).await;
    let in_use: Vec<String> = saved
        .set
        .instances
        .iter()
        .map(|s| &s.image)
        .chain(saved.set.listeners.iter().map(|l| &l.image))
        .filter_map(|image| image.rsplit_once('@').map(|(_, d)| d.to_string()))
        .collect();
    if let Err(e) = images.gc(&in_use).await {
        tracing::warn!(error = %e, "image garbage collection failed");
    }
}

fn saved_path(data_dir: &Path) -> PathBuf {
    data_dir.join("desired.json")
}

async fn load_saved(data_dir: &Path) -> Saved {
    match tokio::fs::read(saved_path(data_dir)).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the saved desired set does not parse; starting from none");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// Saves the desired set durably (see `identity::write_durably`), without
/// the contents of secret files.
async fn save(data_dir: &Path, set: &DesiredSet) -> std::io::Result<()> {
    let path = saved_path(data_dir);
    let bytes = serde_json::to_vec(&Saved {
        set: without_secret_contents(set),
    })
    .expect("desired set serialises");
    tokio::task::spawn_blocking(move || crate::identity::write_durably(&path, &bytes, 0o644))
        .await
        .expect("saving does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<i32>, signal: Option<i32>, oom: bool) -> Exit {
        Exit {
            code,
            signal,
            oom,
            message: None,
            start_failed: false,
            at_ms: 0,
        }
    }

    #[test]
    fn the_saved_set_has_no_secret_contents() {
        let spec = |id: &str| InstanceSpec {
            id: id.into(),
            org: "o".into(),
            app: "a".into(),
            env: "e".into(),
            release: "r1".into(),
            workload: "web".into(),
            image: "registry.example/app@sha256:00".into(),
            command: None,
            env_vars: Default::default(),
            cpu: 0.5,
            memory: 1 << 20,
            restart: Restart::Always,
            port: None,
            health: None,
            drain_ms: 0,
            volumes: Vec::new(),
            secrets: vec![SecretFile {
                bundle: "db".into(),
                version: 2,
                path: "/run/secrets/db".into(),
                contents: "hunter2-in-memory-only".into(),
            }],
            runtime: Default::default(),
            max_cpu_time_ms: 10_000,
        };
        let set = DesiredSet {
            version: 7,
            instances: vec![spec("i1"), spec("i2")],
            listeners: Vec::new(),
        };
        let saved = serde_json::to_string(&Saved {
            set: without_secret_contents(&set),
        })
        .unwrap();
        assert!(!saved.contains("hunter2"), "{saved}");
        assert!(saved.contains("/run/secrets/db"), "{saved}");
        // The set in memory keeps them.
        assert_eq!(
            set.instances[1].secrets[0].contents,
            "hunter2-in-memory-only"
        );
    }

    #[test]
    fn exits_are_categorised() {
        assert_eq!(classify(&exit(Some(0), None, false), 1).0, None);
        assert_eq!(
            classify(&exit(Some(3), None, false), 1),
            (Some(ErrorCategory::Crash), "exited with code 3".into())
        );
        let (c, m) = classify(&exit(None, Some(9), true), 64 << 20);
        assert_eq!(c, Some(ErrorCategory::Oom));
        assert_eq!(m, "killed: out of memory (limit 64Mi)");
        assert_eq!(
            classify(&exit(None, Some(11), false), 1).0,
            Some(ErrorCategory::Crash)
        );
        let start = Exit {
            start_failed: true,
            message: Some("exec /nope: no such file".into()),
            ..exit(None, None, false)
        };
        assert_eq!(classify(&start, 1).0, Some(ErrorCategory::Start));
    }
}
