//! Admission of new connections to an endpoint: at most `max_connections`
//! open at once through this ingress, and at most `rate_limit` new ones per
//! second from one source, in bursts of as many (the endpoint's
//! [`EndpointLimits`]).
//!
//! Sources are keyed by address, except that IPv6 sources are keyed by
//! their /64 (one host usually owns a whole /64, so per-address limits
//! would be no limit at all), and IPv4-mapped IPv6 sources (`::ffff:a.b.c.d`
//! from a dual-stack listener) by their IPv4 address.
//!
//! The rate is checked first, so a connection refused for
//! `max_connections` still counts toward its source's rate (a source
//! retrying against a full endpoint is slowed down like any other), and
//! no refused connection holds a `max_connections` slot. A limit of 0
//! means no limit (the manifest allows 1 and up).
//!
//! Memory stays bounded under many sources: every [`HOUSEKEEPING_EVERY`]
//! admission attempts, and whenever [`Gate::housekeeping`] is called (the
//! server calls it every second, so that an idle endpoint also lets go),
//! sources whose state is back to a full burst are forgotten.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::time::Instant;
use verge_api::manifest::EndpointLimits;

/// Admission attempts between two forgettings of idle sources.
pub const HOUSEKEEPING_EVERY: u64 = 4096;

/// The admission state of one endpoint. `Send + Sync`.
pub struct Gate {
    max_connections: AtomicU32,
    rate: RwLock<Rate>,
    active: Arc<AtomicU64>,
    attempts: AtomicU64,
    clock: Clock,
}

/// One admitted connection: holds a `max_connections` slot until dropped.
pub struct Admission {
    active: Arc<AtomicU64>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("endpoint at its limit of {limit} open connections")]
    MaxConnections { limit: u32 },
    #[error("source over its limit of {per_second} new connections per second")]
    RateLimited { per_second: u32 },
}

type Limiter = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, Clock, NoOpMiddleware<Duration>>;

struct Rate {
    per_second: u32,
    /// `None` when `per_second` is 0.
    limiter: Option<Limiter>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.rate.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Gate")
            .field("max_connections", &self.max_connections)
            .field("rate_limit", &rate.per_second)
            .field("active", &self.active())
            .finish()
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(limits: &EndpointLimits) -> Gate {
        let clock = Clock::new();
        Gate {
            max_connections: AtomicU32::new(limits.max_connections),
            rate: RwLock::new(Rate::new(limits.rate_limit, &clock)),
            active: Arc::new(AtomicU64::new(0)),
            attempts: AtomicU64::new(0),
            clock,
        }
    }

    /// Applies limits from a new table. Connections admitted before stay,
    /// also above a lowered `max_connections`. A changed `rate_limit`
    /// starts every source afresh with a full burst.
    pub fn update(&self, limits: &EndpointLimits) {
        self.max_connections
            .store(limits.max_connections, Ordering::Relaxed);
        let mut rate = self.rate.write().unwrap_or_else(PoisonError::into_inner);
        if rate.per_second != limits.rate_limit {
            *rate = Rate::new(limits.rate_limit, &self.clock);
        }
    }

    /// Admits a new connection from `source`, or says why not.
    pub fn admit(&self, source: IpAddr) -> Result<Admission, Rejected> {
        if self.attempts.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY
            == HOUSEKEEPING_EVERY - 1
        {
            self.housekeeping();
        }
        {
            let rate = self.rate.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(limiter) = &rate.limiter
                && limiter.check_key(&source_key(source)).is_err()
            {
                return Err(Rejected::RateLimited {
                    per_second: rate.per_second,
                });
            }
        }
        let limit = self.max_connections.load(Ordering::Relaxed);
        if limit == 0 {
            self.active.fetch_add(1, Ordering::AcqRel);
        } else {
            self.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < u64::from(limit)).then_some(n + 1)
                })
                .map_err(|_| Rejected::MaxConnections { limit })?;
        }
        Ok(Admission {
            active: self.active.clone(),
        })
    }

    /// Open connections admitted now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    /// Forgets sources whose rate state is back to a full burst, and gives
    /// back the memory they held.
    pub fn housekeeping(&self) {
        let rate = self.rate.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(limiter) = &rate.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Sources the rate limiter remembers.
    pub fn sources(&self) -> usize {
        let rate = self.rate.read().unwrap_or_else(PoisonError::into_inner);
        rate.limiter.as_ref().map_or(0, |l| l.len())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Rate {
    fn new(per_second: u32, clock: &Clock) -> Rate {
        let limiter = NonZeroU32::new(per_second)
            .map(|n| RateLimiter::hashmap_with_clock(Quota::per_second(n), clock.clone()));
        Rate {
            per_second,
            limiter,
        }
    }
}

/// The key a source is limited under: an IPv6 address's /64, an IPv4
/// (or IPv4-mapped IPv6) address itself.
fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (!0u128 << 64))),
        v4 => v4,
    }
}

/// The rate limiter's time source: Tokio's clock (so that it follows
/// `tokio::time::pause` like the rest of the ingress), as the time since
/// the gate was made. Tests stop it and move it by hand.
#[derive(Debug, Clone)]
struct Clock {
    origin: Instant,
    #[cfg(test)]
    stopped: Arc<std::sync::Mutex<Option<Duration>>>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            origin: Instant::now(),
            #[cfg(test)]
            stopped: Arc::default(),
        }
    }

    /// Stops the clock, then moves it forward by `by`.
    #[cfg(test)]
    fn advance(&self, by: Duration) {
        let mut stopped = self.stopped.lock().unwrap();
        *stopped = Some(stopped.unwrap_or_else(|| self.origin.elapsed()) + by);
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        #[cfg(test)]
        if let Some(now) = *self.stopped.lock().unwrap() {
            return now;
        }
        self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn limits(max_connections: u32, rate_limit: u32) -> EndpointLimits {
        EndpointLimits {
            max_connections,
            rate_limit,
            ..EndpointLimits::default()
        }
    }

    /// A gate whose clock moves only when the test says.
    fn manual(limits: EndpointLimits) -> Gate {
        let gate = Gate::new(&limits);
        gate.clock.advance(Duration::ZERO);
        gate
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn max_connections_rejects_one_over_and_admits_after_a_drop() {
        let gate = manual(limits(3, 0));
        let mut open: Vec<Admission> = (1..=3)
            .map(|i| gate.admit(ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        assert_eq!(gate.active(), 3);
        let err = gate.admit(ip("192.0.2.9")).err().unwrap();
        assert_eq!(err, Rejected::MaxConnections { limit: 3 });
        assert_eq!(gate.active(), 3);
        open.pop();
        assert_eq!(gate.active(), 2);
        open.push(gate.admit(ip("192.0.2.9")).unwrap());
        assert_eq!(gate.active(), 3);
        drop(open);
        assert_eq!(gate.active(), 0);
    }

    #[test]
    fn a_source_over_its_burst_is_rejected_but_another_is_not() {
        let gate = manual(limits(1000, 5));
        let a = ip("198.51.100.1");
        let open: Vec<Admission> = (0..5).map(|_| gate.admit(a).unwrap()).collect();
        let err = gate.admit(a).err().unwrap();
        assert_eq!(err, Rejected::RateLimited { per_second: 5 });
        assert_eq!(
            err.to_string(),
            "source over its limit of 5 new connections per second"
        );
        // Rejections hold no slot.
        assert_eq!(gate.active(), 5);
        assert!(gate.admit(ip("198.51.100.2")).is_ok());
        drop(open);
    }

    #[test]
    fn the_rate_refills_with_time() {
        let gate = manual(limits(1000, 4));
        let a = ip("2001:db8::1");
        for _ in 0..4 {
            gate.admit(a).unwrap();
        }
        assert!(gate.admit(a).is_err());
        // One connection's worth of time (a quarter second) buys one more.
        gate.clock.advance(Duration::from_millis(250));
        assert!(gate.admit(a).is_ok());
        assert!(gate.admit(a).is_err());
        // A whole second refills the whole burst, not more.
        gate.clock.advance(Duration::from_secs(1));
        for _ in 0..4 {
            gate.admit(a).unwrap();
        }
        assert!(gate.admit(a).is_err());
    }

    #[test]
    fn ipv6_sources_share_a_limit_per_64_and_mapped_ipv4_counts_per_address() {
        let gate = manual(limits(1000, 2));
        gate.admit(ip("2001:db8:0:1::1")).unwrap();
        gate.admit(ip("2001:db8:0:1:ffff::2")).unwrap();
        assert!(gate.admit(ip("2001:db8:0:1::3")).is_err());
        assert!(gate.admit(ip("2001:db8:0:2::1")).is_ok());
        // Mapped IPv4 sources are not one /64: each address on its own,
        // and the same as the plain IPv4 address.
        gate.admit(ip("::ffff:192.0.2.1")).unwrap();
        gate.admit(ip("192.0.2.1")).unwrap();
        assert!(gate.admit(ip("::ffff:192.0.2.1")).is_err());
        assert!(gate.admit(ip("::ffff:192.0.2.2")).is_ok());
    }

    #[test]
    fn update_changes_limits_and_keeps_admitted_connections() {
        let gate = manual(limits(4, 2));
        let a = ip("203.0.113.1");
        let open: Vec<Admission> = (0..2).map(|_| gate.admit(a).unwrap()).collect();
        assert!(gate.admit(a).is_err());
        gate.update(&limits(1, 3));
        assert_eq!(gate.active(), 2);
        // A new rate starts afresh; the lowered maximum refuses until
        // enough connections closed.
        assert_eq!(
            gate.admit(a).err(),
            Some(Rejected::MaxConnections { limit: 1 })
        );
        drop(open);
        let _one = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_err());
        gate.update(&limits(10, 3));
        assert_eq!(
            gate.admit(a).err(),
            Some(Rejected::RateLimited { per_second: 3 })
        );
        // Limits of 0: none.
        gate.update(&limits(0, 0));
        let many: Vec<Admission> = (0..100).map(|_| gate.admit(a).unwrap()).collect();
        assert_eq!(gate.active(), 101);
        drop(many);
    }

    #[test]
    fn housekeeping_forgets_idle_sources() {
        let gate = manual(limits(100_000, 10));
        for i in 0..1000u32 {
            gate.admit(IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 | i)))
                .unwrap();
        }
        assert_eq!(gate.sources(), 1000);
        gate.housekeeping();
        assert_eq!(gate.sources(), 1000, "recent sources stay");
        gate.clock.advance(Duration::from_secs(1));
        gate.housekeeping();
        assert_eq!(gate.sources(), 0);
        // Without being asked, every HOUSEKEEPING_EVERY attempts.
        let gate = manual(limits(1, 10));
        for i in 0..HOUSEKEEPING_EVERY as u32 - 1 {
            let _ = gate.admit(IpAddr::V4(Ipv4Addr::from_bits(0x0b00_0000 | i)));
        }
        assert_eq!(gate.sources(), HOUSEKEEPING_EVERY as usize - 1);
        gate.clock.advance(Duration::from_secs(1));
        let _ = gate.admit(ip("192.0.2.1"));
        assert!(gate.sources() <= 1, "{} sources left", gate.sources());
    }
}
