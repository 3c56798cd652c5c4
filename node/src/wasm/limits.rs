//! The limits one run of a guest is held to: its memory (a resource
//! limiter that traps when the guest asks for more than its limit) and its
//! CPU (a meter fed by the epoch deadline callback and by a wrapper around
//! the run's future that reads the thread's CPU clock around each poll).
//!
//! Wasm runs on the thread that polls the run's future (wasmtime's async
//! fibers), so the thread's CPU time spent inside a poll is the guest's.
//! A poll that ends `Pending` for any other reason than our own yield is
//! the guest waiting for input or output: that resets the CPU time counted
//! against `max_cpu_time`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::{ResourceLimiter, UpdateDeadline};

/// A guest's CPU share is measured over a window: the CPU it used since the
/// window started against the wall time since then. A window at least
/// this old in which the guest is within its share starts afresh, so idle
/// time long past does not bank CPU for a long burst.
const SHARE_WINDOW: Duration = Duration::from_millis(100);

/// Why a run was ended by the node rather than by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The guest asked for `asked` bytes of memory; its limit is `limit`.
    Memory { limit: u64, asked: u64 },
    /// The guest used `used` of CPU without waiting for I/O.
    Cpu { used: Duration, max: Duration },
    /// The stop token fired.
    Stopped,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Memory { limit, asked } => write!(
                f,
                "memory limit of {} reached: the instance asked for {asked} bytes",
                human_bytes(*limit)
            ),
            Refusal::Cpu { used, max } => write!(
                f,
                "stopped: used {:.1}s of CPU without waiting for input or output \
                 (max_cpu_time = {max:?}); a runaway loop?",
                used.as_secs_f64()
            ),
            Refusal::Stopped => f.write_str("stopped"),
        }
    }
}

/// `n` bytes for people: `32 MiB`, `1.5 GiB`, `1000 bytes`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{:.1} {unit}", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// The CPU time the calling thread has used.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` that outlives the call;
    // `clock_gettime` only writes to it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[derive(Debug)]
struct Meter {
    /// The thread CPU time when CPU was last counted, while a poll runs.
    mark: Option<Duration>,
    /// CPU used since the guest last waited for I/O.
    since_io: Duration,
    /// Our own yield (or throttling sleep) is in progress: a `Pending` poll
    /// is not the guest waiting for I/O.
    in_yield: bool,
    /// The CPU share window: when it started and the CPU used in it.
    window_start: Instant,
    window_cpu: Duration,
}

impl Meter {
    /// Counts the CPU the thread used since the last mark.
    fn charge(&mut self, now: Duration) {
        if let Some(mark) = self.mark {
            let used = now.saturating_sub(mark);
            self.since_io += used;
            self.window_cpu += used;
        }
        self.mark = Some(now);
    }
}

/// The state of one run shared by its store (the limiter and the epoch
/// callback) and the wrapper around its future.
#[derive(Debug)]
pub(crate) struct Run {
    /// Cores; 1 or more (or not positive): never throttled.
    cpu: f64,
    /// `Duration::ZERO`: no limit.
    max_cpu_time: Duration,
    stop: CancellationToken,
    meter: Mutex<Meter>,
    refusal: Mutex<Option<Refusal>>,
}

impl Run {
    pub(crate) fn new(cpu: f64, max_cpu_time: Duration, stop: CancellationToken) -> Arc<Run> {
        Arc::new(Run {
            cpu,
            max_cpu_time,
            stop,
            meter: Mutex::new(Meter {
                mark: None,
                since_io: Duration::ZERO,
                in_yield: false,
                window_start: Instant::now(),
                window_cpu: Duration::ZERO,
            }),
            refusal: Mutex::new(None),
        })
    }

    fn meter(&self) -> MutexGuard<'_, Meter> {
        self.meter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the node ended the run, if it did.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records why the run ends and returns the trap to end it with.
    fn refuse(&self, why: Refusal) -> wasmtime::Error {
        let e = wasmtime::Error::msg(why.to_string());
        let mut r = self.refusal.lock().unwrap_or_else(PoisonError::into_inner);
        r.get_or_insert(why);
        e
    }

    /// The epoch deadline callback: runs on the guest's thread (inside a
    /// poll) every epoch tick while wasm runs. Stops the guest when told to
    /// or when it spun for too long, else yields to the executor, sleeping
    /// when the guest used more than its CPU share.
    pub(crate) fn on_tick(self: &Arc<Run>) -> wasmtime::Result<UpdateDeadline> {
        if self.stop.is_cancelled() {
            return Err(self.refuse(Refusal::Stopped));
        }
        let now = Instant::now();
        let mut m = self.meter();
        m.charge(thread_cpu_time());
        if !self.max_cpu_time.is_zero() && m.since_io > self.max_cpu_time {
            let why = Refusal::Cpu {
                used: m.since_io,
                max: self.max_cpu_time,
            };
            drop(m);
            return Err(self.refuse(why));
        }
        let elapsed = now.duration_since(m.window_start);
        let mut pause = None;
        if self.cpu > 0.0 && self.cpu < 1.0 {
            // The wall time in which the CPU used in this window would be
            // within the share.
            let due = m.window_cpu.div_f64(self.cpu);
            if due > elapsed {
                pause = Some(due - elapsed);
            }
        }
        if elapsed >= SHARE_WINDOW && pause.is_none() {
            m.window_start = now;
            m.window_cpu = Duration::ZERO;
        }
        m.in_yield = true;
        drop(m);
        let run = Arc::clone(self);
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                match pause {
                    Some(d) => tokio::time::sleep(d).await,
                    None => tokio::task::yield_now().await,
                }
                run.meter().in_yield = false;
            }),
        ))
    }

    fn begin_poll(&self) {
        self.meter().mark = Some(thread_cpu_time());
    }

    fn end_poll(&self, pending: bool) {
        let mut m = self.meter();
        m.charge(thread_cpu_time());
        m.mark = None;
        if pending && !m.in_yield {
            m.since_io = Duration::ZERO;
        }
    }
}

/// A run's future, its CPU time measured around each poll.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    run: Arc<Run>,
}

impl<F> Metered<F> {
    pub(crate) fn new(inner: F, run: Arc<Run>) -> Metered<F> {
        Metered {
            inner: Box::pin(inner),
            run,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.run.begin_poll();
        let r = self.inner.as_mut().poll(cx);
        self.run.end_poll(r.is_pending());
        r
    }
}

/// The memory limiter of a run's store: growing a memory past `limit`
/// traps (the spec allows `memory.grow` to fail with -1, but a guest that
/// ignores it fails later in confusing ways; a trap says what happened).
pub(crate) struct MemoryLimiter {
    limit: u64,
    run: Arc<Run>,
}

impl MemoryLimiter {
    pub(crate) fn new(limit: u64, run: Arc<Run>) -> MemoryLimiter {
        MemoryLimiter { limit, run }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let asked = desired as u64;
        if asked > self.limit {
            return Err(self.run.refuse(Refusal::Memory {
                limit: self.limit,
                asked,
            }));
        }
        // Within our limit but past the memory's own declared maximum:
        // ordinary wasm semantics, `memory.grow` returns -1.
        Ok(maximum.is_none_or(|max| desired <= max))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}
