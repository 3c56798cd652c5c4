//! Choosing a backend for each new connection of an endpoint, and draining
//! the backends that leave the routing table.
//!
//! The ingress keeps one [`Pool`] per endpoint across table updates. The
//! table lists only instances that are running, healthy and staying; the
//! pool adds what only the ingress sees:
//!
//! - *Least outstanding connections with two random choices*: two distinct
//!   eligible backends are drawn at random and the one with fewer open
//!   connections through this ingress wins (ties go to the first drawn).
//! - *Locality*: when any eligible backend runs on the ingress's own node,
//!   only those are drawn.
//! - *Passive ejection*: a failed connect ejects the instance for
//!   [`EJECT_BASE`], doubling on consecutive ejections up to [`EJECT_MAX`];
//!   a successful connect resets it. When every backend is ejected, the
//!   pick is made among the ejected ones ("panic mode") rather than
//!   refusing the connection.
//! - *Retries*: the caller passes the instances it already tried, so a
//!   failed connect is retried elsewhere before any client byte is read.
//! - *Draining*: a backend that leaves the table gets no new connections;
//!   its open connections' [`Lease::drained`] token fires after the drain
//!   timeout, unless the backend comes back first.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use rand::Rng;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use verge_api::routing::Backend;

/// Consecutive failed connects that eject an instance. One: the table only
/// lists healthy instances, so a refused or timed-out connect almost always
/// means the instance is going away before the table says so.
pub const EJECT_AFTER_FAILURES: u32 = 1;
/// How long a first ejection lasts.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
/// The longest ejection: each consecutive ejection (no successful connect
/// in between) lasts twice the previous one, up to this.
pub const EJECT_MAX: Duration = Duration::from_secs(60);

/// The backends of one endpoint. `Send + Sync`; picks take a shared lock.
pub struct Pool {
    local_node: Option<String>,
    /// Backends that take new connections, in table order.
    active: RwLock<Vec<Arc<Slot>>>,
    /// Backends that left the table, until their drain deadline passed and
    /// their last connection closed.
    draining: Mutex<Vec<Draining>>,
    /// Where ejection deadlines count from.
    origin: Instant,
}

/// One backend as [`Pool::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStats {
    pub instance: String,
    pub node: String,
    pub address: SocketAddr,
    /// Connections through this ingress that hold a [`Lease`] on it.
    pub outstanding: u64,
    /// When its ejection ends, if it is ejected now.
    pub ejected_until: Option<Instant>,
    /// It left the table; its connections close at the drain deadline.
    pub draining: bool,
}

/// One connection's hold on a backend: it counts as outstanding while the
/// lease lives.
pub struct Lease {
    slot: Arc<Slot>,
}

struct Slot {
    backend: Backend,
    local: bool,
    origin: Instant,
    outstanding: AtomicU64,
    /// The end of the last ejection in nanoseconds since `origin` (0: never
    /// ejected, or reset by a success). Ejected while it lies in the future.
    ejected_until: AtomicU64,
    ejection: Mutex<Ejection>,
    /// Decides, with `drained`, whether a drain timer may still fire.
    drain: Mutex<DrainState>,
    drained: CancellationToken,
}

#[derive(Default)]
struct Ejection {
    /// Failed connects since the last ejection or success.
    failures: u32,
    /// Ejections since the last success.
    ejections: u32,
}

#[derive(Default)]
struct DrainState {
    /// Counts drains, so that a timer of an earlier drain (aborted, but
    /// perhaps already running) cannot end a later one early.
    epoch: u64,
    draining: bool,
}

struct Draining {
    slot: Arc<Slot>,
    timer: Option<AbortHandle>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("local_node", &self.local_node)
            .field("backends", &self.snapshot())
            .finish()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("instance", &self.slot.backend.instance)
            .field("address", &self.slot.backend.address)
            .finish()
    }
}

impl Pool {
    /// A pool without backends. `local_node`: the node ID this ingress runs
    /// on (its instances are preferred), if any.
    pub fn new(local_node: Option<String>) -> Pool {
        Pool {
            local_node,
            active: RwLock::new(Vec::new()),
            draining: Mutex::new(Vec::new()),
            origin: Instant::now(),
        }
    }

    /// Applies the table's backend list. A backend no longer listed starts
    /// draining: no new connections, and its leases' [`Lease::drained`]
    /// token fires after `drain` (from a Tokio timer). A draining backend
    /// listed again before its deadline is taken back with its open
    /// connections. A backend is the same one when its instance ID,
    /// address and reach are; a changed address or reach counts as a new
    /// backend (the old one drains). Of duplicate instance IDs the first
    /// wins.
    ///
    /// # Panics
    /// Outside a Tokio runtime, when a backend starts draining with a
    /// nonzero `drain`.
    pub fn update(&self, backends: &[Backend], drain: Duration) {
        let mut draining = lock(&self.draining);
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        draining.retain(|d| !d.slot.drained.is_cancelled() || d.slot.outstanding() > 0);
        let mut next: Vec<Arc<Slot>> = Vec::with_capacity(backends.len());
        for b in backends {
            if next.iter().any(|s| s.backend.instance == b.instance) {
                continue;
            }
            let slot = if let Some(i) = active.iter().position(|s| s.same(b)) {
                active.swap_remove(i)
            } else if let Some(i) = draining
                .iter()
                .position(|d| d.slot.same(b) && !d.slot.drained.is_cancelled())
                && draining[i].slot.undrain()
            {
                let d = draining.swap_remove(i);
                if let Some(timer) = d.timer {
                    timer.abort();
                }
                tracing::debug!(instance = %b.instance, "backend back in the table, drain cancelled");
                d.slot
            } else {
                let local = self.local_node.as_deref() == Some(b.node.as_str());
                Arc::new(Slot::new(b.clone(), local, self.origin))
            };
            next.push(slot);
        }
        for slot in active.drain(..) {
            draining.push(Draining::start(slot, drain));
        }
        *active = next;
    }

    /// Chooses a backend for a new connection and takes a lease on it,
    /// skipping the instance IDs in `tried` (earlier attempts of the same
    /// connection). `None` when no backend is left.
    pub fn pick(&self, tried: &[&str]) -> Option<Lease> {
        self.pick_at(tried, Instant::now())
    }

    fn pick_at(&self, tried: &[&str], now: Instant) -> Option<Lease> {
        let now = since(self.origin, now);
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        let untried = || {
            active
                .iter()
                .filter(|s| !tried.contains(&s.backend.instance.as_str()))
        };
        // First pass: which class to draw from, and how many it has.
        let (mut local, mut healthy, mut any) = (0, 0, 0);
        for s in untried() {
            any += 1;
            if !s.ejected(now) {
                healthy += 1;
                local += usize::from(s.local);
            }
        }
        let (class, n): (fn(&Slot, u64) -> bool, usize) = if local > 0 {
            (|s, now| s.local && !s.ejected(now), local)
        } else if healthy > 0 {
            (|s, now| !s.ejected(now), healthy)
        } else {
            (|_, _| true, any)
        };
        if n == 0 {
            return None;
        }
        // Two distinct random members of the class.
        let mut rng = rand::rng();
        let i = rng.random_range(0..n);
        let j = match n {
            1 => i,
            _ => match rng.random_range(0..n - 1) {
                j if j >= i => j + 1,
                j => j,
            },
        };
        let (lo, hi) = (i.min(j), i.max(j));
        // Second pass: find them. An ejection by another connection in
        // between may shrink the class; then the last member seen stands in.
        let (mut at_lo, mut at_hi, mut last) = (None, None, None);
        for (k, s) in untried().filter(|s| class(s, now)).enumerate() {
            if k == lo {
                at_lo = Some(s);
            }
            if k == hi {
                at_hi = Some(s);
                break;
            }
            last = Some(s);
        }
        let at_lo = at_lo.or(last).or_else(|| untried().next())?;
        let at_hi = at_hi.unwrap_or(at_lo);
        let (first, second) = if i == lo {
            (at_lo, at_hi)
        } else {
            (at_hi, at_lo)
        };
        let chosen = if second.outstanding() < first.outstanding() {
            second
        } else {
            first
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            slot: chosen.clone(),
        })
    }

    /// Every backend, active ones first in table order, then draining ones.
    pub fn snapshot(&self) -> Vec<BackendStats> {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> Vec<BackendStats> {
        let draining = lock(&self.draining);
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        let stats = |s: &Slot, draining: bool| BackendStats {
            instance: s.backend.instance.clone(),
            node: s.backend.node.clone(),
            address: s.backend.address,
            outstanding: s.outstanding(),
            ejected_until: s.ejected_until(now),
            draining,
        };
        let active = active.iter().map(|s| stats(s, false));
        let gone = draining
            .iter()
            .filter(|d| !d.slot.drained.is_cancelled() || d.slot.outstanding() > 0)
            .map(|d| stats(&d.slot, true));
        active.chain(gone).collect()
    }
}

impl Lease {
    pub fn backend(&self) -> &Backend {
        &self.slot.backend
    }

    /// The connect failed: after [`EJECT_AFTER_FAILURES`] in a row the
    /// instance is ejected (see the module documentation). A failure while
    /// it is already ejected (a connect begun earlier, or in panic mode)
    /// does not extend the ejection.
    pub fn failed(&self) {
        self.slot.failed(Instant::now());
    }

    /// The connect succeeded: failures and ejections are forgotten, and an
    /// ejection in force ends.
    pub fn connected(&self) {
        self.slot.connected();
    }

    /// Cancelled when the backend left the table and its drain deadline
    /// passed: the relay should close the connection then.
    pub fn drained(&self) -> CancellationToken {
        self.slot.drained.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slot {
    fn new(backend: Backend, local: bool, origin: Instant) -> Slot {
        Slot {
            backend,
            local,
            origin,
            outstanding: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            ejection: Mutex::default(),
            drain: Mutex::default(),
            drained: CancellationToken::new(),
        }
    }

    fn same(&self, b: &Backend) -> bool {
        let s = &self.backend;
        s.instance == b.instance && s.address == b.address && s.reach == b.reach
    }

    fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > since(self.origin, now)).then(|| self.origin + Duration::from_nanos(until))
    }

    fn failed(&self, now: Instant) {
        let now_ns = since(self.origin, now);
        let mut e = lock(&self.ejection);
        if self.ejected(now_ns) {
            return;
        }
        e.failures += 1;
        if e.failures < EJECT_AFTER_FAILURES {
            return;
        }
        e.failures = 0;
        e.ejections = e.ejections.saturating_add(1);
        let time = ejection_time(e.ejections);
        let until = now_ns.saturating_add(time.as_nanos() as u64);
        self.ejected_until.store(until, Ordering::Relaxed);
        tracing::info!(
            instance = %self.backend.instance,
            address = %self.backend.address,
            ejections = e.ejections,
            "backend ejected for {time:?} after a failed connect"
        );
    }

    fn connected(&self) {
        let mut e = lock(&self.ejection);
        e.failures = 0;
        e.ejections = 0;
        self.ejected_until.store(0, Ordering::Relaxed);
    }

    /// Ends a drain that has not fired yet; false when it fired.
    fn undrain(&self) -> bool {
        let mut d = lock(&self.drain);
        if self.drained.is_cancelled() {
            return false;
        }
        d.draining = false;
        true
    }

    /// The drain deadline of drain `epoch` passed.
    fn drain_deadline(&self, epoch: u64) {
        let d = lock(&self.drain);
        if d.draining && d.epoch == epoch {
            tracing::debug!(
                instance = %self.backend.instance,
                outstanding = self.outstanding(),
                "drain deadline passed, closing connections"
            );
            self.drained.cancel();
        }
    }
}

impl Draining {
    fn start(slot: Arc<Slot>, drain: Duration) -> Draining {
        let epoch = {
            let mut d = lock(&slot.drain);
            d.epoch += 1;
            d.draining = true;
            d.epoch
        };
        tracing::debug!(instance = %slot.backend.instance, outstanding = slot.outstanding(), "backend left the table, draining");
        if drain.is_zero() {
            slot.drain_deadline(epoch);
            return Draining { slot, timer: None };
        }
        let span = tracing::debug_span!("drain", instance = %slot.backend.instance);
        let timed = slot.clone();
        let timer = tokio::spawn(
            async move {
                tokio::time::sleep(drain).await;
                timed.drain_deadline(epoch);
            }
            .instrument(span),
        );
        Draining {
            slot,
            timer: Some(timer.abort_handle()),
        }
    }
}

/// [`EJECT_BASE`] doubled for every ejection after the first, at most
/// [`EJECT_MAX`].
fn ejection_time(ejections: u32) -> Duration {
    let factor = 1u32
        .checked_shl(ejections.saturating_sub(1))
        .unwrap_or(u32::MAX);
    EJECT_BASE.saturating_mul(factor).min(EJECT_MAX)
}

fn since(origin: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(origin).as_nanos() as u64
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::routing::Reach;

    fn backend(instance: &str, node: &str, port: u16) -> Backend {
        Backend {
            instance: instance.into(),
            node: node.into(),
            node_name: format!("{node}-name"),
            address: SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], port)),
            reach: Reach::Direct,
        }
    }

    fn pool(local: Option<&str>, backends: &[Backend]) -> Pool {
        let p = Pool::new(local.map(String::from));
        p.update(backends, Duration::ZERO);
        p
    }

    fn three() -> Vec<Backend> {
        vec![
            backend("a", "n1", 1),
            backend("b", "n2", 2),
            backend("c", "n3", 3),
        ]
    }

    fn stats(p: &Pool, instance: &str) -> BackendStats {
        p.snapshot()
            .into_iter()
            .find(|s| s.instance == instance)
            .unwrap()
    }

    fn picked(p: &Pool, tried: &[&str]) -> String {
        p.pick(tried).unwrap().backend().instance.clone()
    }

    #[test]
    fn picks_avoid_the_most_loaded_backend() {
        let mut backends = three();
        backends.push(backend("d", "n4", 4));
        let p = pool(None, &backends);
        let held: Vec<Lease> = (0..50).map(|_| p.pick(&["b", "c", "d"]).unwrap()).collect();
        assert_eq!(stats(&p, "a").outstanding, 50);
        // Two distinct choices: the loaded one always loses to the other.
        for _ in 0..1000 {
            assert_ne!(picked(&p, &[]), "a");
        }
        // Held picks spread over the others and leave "a" alone.
        let more: Vec<Lease> = (0..90).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(stats(&p, "a").outstanding, 50);
        for id in ["b", "c", "d"] {
            let n = stats(&p, id).outstanding;
            assert!((15..=45).contains(&n), "{id} holds {n} of 90");
        }
        drop((held, more));
    }

    #[test]
    fn picks_without_load_spread_over_every_backend() {
        let p = pool(None, &three());
        let mut seen = std::collections::HashMap::new();
        for _ in 0..300 {
            *seen.entry(picked(&p, &[])).or_insert(0) += 1;
        }
        for id in ["a", "b", "c"] {
            assert!(seen.get(id).copied().unwrap_or(0) > 50, "{seen:?}");
        }
    }

    #[test]
    fn local_backends_come_first_while_healthy() {
        let p = pool(Some("n2"), &three());
        // Even when it holds every connection, the local one is chosen.
        let held: Vec<Lease> = (0..20).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(held.iter().all(|l| l.backend().instance == "b"));
        held[0].failed();
        for _ in 0..100 {
            assert_ne!(picked(&p, &[]), "b");
        }
        // Tried locally already: the others.
        let p = pool(Some("n2"), &three());
        assert_ne!(picked(&p, &["b"]), "b");
    }

    #[test]
    fn tried_instances_are_skipped() {
        let p = pool(None, &three());
        for _ in 0..100 {
            assert_eq!(picked(&p, &["a", "c"]), "b");
        }
        assert!(p.pick(&["a", "b", "c"]).is_none());
        assert!(Pool::new(None).pick(&[]).is_none());
    }

    #[test]
    fn ejected_backends_get_picks_only_when_all_are_ejected() {
        let p = pool(None, &three());
        p.pick(&["b", "c"]).unwrap().failed();
        for _ in 0..100 {
            assert_ne!(picked(&p, &[]), "a");
        }
        p.pick(&["a", "c"]).unwrap().failed();
        p.pick(&["a", "b"]).unwrap().failed();
        assert!(p.snapshot().iter().all(|s| s.ejected_until.is_some()));
        // Panic mode: every backend is ejected, one is still chosen...
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            seen.insert(picked(&p, &[]));
        }
        assert_eq!(seen.len(), 3);
        // ...but not one already tried.
        assert_eq!(picked(&p, &["a", "b"]), "c");
        assert!(p.pick(&["a", "b", "c"]).is_none());
    }

    #[test]
    fn ejection_expires_and_backs_off_until_a_success() {
        let p = pool(None, &three());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let slot = p.pick_at(&["b", "c"], t0).unwrap().slot.clone();
        let ejected_until = |now| slot.ejected_until(now).map(|u| u - t0);
        slot.failed(t0);
        assert_eq!(ejected_until(t0), Some(Duration::from_secs(5)));
        for _ in 0..50 {
            assert_ne!(p.pick_at(&[], at(4)).unwrap().backend().instance, "a");
        }
        // A failure during the ejection does not extend it.
        slot.failed(at(4));
        assert_eq!(ejected_until(at(4)), Some(Duration::from_secs(5)));
        // Expired: eligible again.
        assert_eq!(ejected_until(at(5)), None);
        let picks: Vec<String> = (0..100)
            .map(|_| p.pick_at(&[], at(5)).unwrap().backend().instance.clone())
            .collect();
        assert!(picks.iter().any(|i| i == "a"));
        // Consecutive ejections double: 10, 20, 40, then 60 at most.
        let mut now = 5;
        for secs in [10, 20, 40, 60, 60] {
            slot.failed(at(now));
            assert_eq!(
                ejected_until(at(now)),
                Some(Duration::from_secs(now + secs))
            );
            now += secs;
        }
        // A success ends the ejection and the backoff.
        slot.failed(at(now));
        slot.connected();
        assert_eq!(ejected_until(at(now)), None);
        slot.failed(at(now));
        assert_eq!(ejected_until(at(now)), Some(Duration::from_secs(now + 5)));
        assert_eq!(ejection_time(u32::MAX), EJECT_MAX);
    }

    #[test]
    fn dropping_a_lease_releases_it() {
        let p = pool(None, &three());
        let lease = p.pick(&["b", "c"]).unwrap();
        let other = p.pick(&["b", "c"]).unwrap();
        assert_eq!(stats(&p, "a").outstanding, 2);
        drop(lease);
        assert_eq!(stats(&p, "a").outstanding, 1);
        drop(other);
        assert_eq!(stats(&p, "a").outstanding, 0);
    }

    #[tokio::test]
    async fn a_backend_leaving_the_table_drains_after_the_timeout() {
        const DRAIN: Duration = Duration::from_millis(200);
        let p = pool(None, &three());
        let lease = p.pick(&["b", "c"]).unwrap();
        let drained = lease.drained();
        let start = Instant::now();
        p.update(&three()[1..], DRAIN);
        for _ in 0..100 {
            assert_ne!(picked(&p, &[]), "a");
        }
        assert!(p.pick(&["b", "c"]).is_none());
        let a = stats(&p, "a");
        assert!(a.draining && a.outstanding == 1, "{a:?}");
        assert!(!drained.is_cancelled());
        tokio::time::timeout(Duration::from_secs(10), drained.cancelled())
            .await
            .expect("drained fires");
        assert!(
            start.elapsed() >= DRAIN,
            "fired after {:?}",
            start.elapsed()
        );
        // Gone from the snapshot once its last connection closed.
        assert!(stats(&p, "a").draining);
        drop(lease);
        assert!(p.snapshot().iter().all(|s| s.instance != "a"));
    }

    #[tokio::test]
    async fn a_backend_back_before_its_deadline_is_taken_back() {
        let p = pool(None, &three());
        let lease = p.pick(&["b", "c"]).unwrap();
        p.update(&three()[1..], Duration::from_millis(100));
        assert!(stats(&p, "a").draining);
        p.update(&three(), Duration::from_millis(100));
        let again = p.pick(&["b", "c"]).unwrap();
        let a = stats(&p, "a");
        assert!(!a.draining && a.outstanding == 2, "{a:?}");
        assert_eq!(p.snapshot().len(), 3);
        let fired = tokio::time::timeout(
            Duration::from_millis(400),
            lease.drained().cancelled_owned(),
        );
        assert!(fired.await.is_err(), "the cancelled drain fired");
        // Leaving again drains again, on a fresh deadline.
        p.update(&three()[1..], Duration::ZERO);
        assert!(again.drained().is_cancelled());
    }

    #[tokio::test]
    async fn a_backend_back_after_its_deadline_is_a_new_one() {
        let p = pool(None, &three());
        let lease = p.pick(&["b", "c"]).unwrap();
        p.update(&three()[1..], Duration::ZERO);
        assert!(lease.drained().is_cancelled());
        p.update(&three(), Duration::ZERO);
        let fresh = p.pick(&["b", "c"]).unwrap();
        assert!(!fresh.drained().is_cancelled());
        assert_eq!(stats(&p, "a").outstanding, 1);
    }

    #[tokio::test]
    async fn a_backend_with_a_new_address_is_a_new_one() {
        let p = pool(None, &three());
        let old = p.pick(&["b", "c"]).unwrap();
        let mut moved = three();
        moved[0].address.set_port(9);
        p.update(&moved, Duration::ZERO);
        assert!(old.drained().is_cancelled());
        let new = p.pick(&["b", "c"]).unwrap();
        assert_eq!(new.backend().address.port(), 9);
        assert!(!new.drained().is_cancelled());
        let snapshot = p.snapshot();
        assert_eq!(snapshot.len(), 4, "{snapshot:?}");
        assert!(snapshot[3].instance == "a" && snapshot[3].draining);
    }
}
