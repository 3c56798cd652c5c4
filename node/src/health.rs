//! TCP health checks of running instances.
//!
//! A check ([`Check`]) connects to one address of the instance every
//! interval, giving up on a connection after its timeout; a connection
//! that is established passes (it is closed at once, nothing is sent).
//! [`Verdicts`] turns the results into the instance's health: the first
//! pass makes it healthy, [`HEALTH_FAILURES`] failures in a row make it
//! unhealthy, and a pass resets the count. Failures before the first pass
//! count too: an instance that never accepts a connection ends unhealthy.
//! [`Checker`] runs the probes on a timer and yields only the changes of
//! verdict, for the supervisor (`reconcile`) to report and act on.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Interval, MissedTickBehavior};
use verge_api::manifest::Health;
use verge_api::manifest::defaults::HEALTH_FAILURES;

/// A TCP health check of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Where the instance serves the checked port.
    pub addr: SocketAddr,
    /// Time from one probe's start to the next one's.
    pub interval: Duration,
    /// How long one probe waits for the connection.
    pub timeout: Duration,
}

impl Check {
    /// The workload's `health` check, run against `addr`.
    pub fn new(addr: SocketAddr, health: &Health) -> Check {
        // The manifest refuses zero durations; a zero interval would make
        // `tokio::time::interval` panic.
        Check {
            addr,
            interval: Duration::from_millis(health.interval_ms.max(1)),
            timeout: Duration::from_millis(health.timeout_ms.max(1)),
        }
    }
}

/// A change of an instance's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A check passed (the first one, or the first since it was unhealthy).
    Healthy,
    /// [`HEALTH_FAILURES`] checks failed in a row; what the last one said.
    Unhealthy(String),
}

/// Counts check results into verdicts (see the module documentation).
#[derive(Debug, Default, Clone)]
pub struct Verdicts {
    /// Failures since the last pass.
    failures: u32,
    /// The current verdict; `None` before the first one.
    healthy: Option<bool>,
}

impl Verdicts {
    pub fn new() -> Verdicts {
        Verdicts::default()
    }

    /// Failures since the last pass.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The current verdict: `None` before the first.
    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Takes one check's result; returns the verdict when it changed.
    pub fn record(&mut self, result: Result<(), String>) -> Option<Verdict> {
        match result {
            Ok(()) => {
                self.failures = 0;
                (self.healthy != Some(true)).then(|| {
                    self.healthy = Some(true);
                    Verdict::Healthy
                })
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                (self.failures >= HEALTH_FAILURES && self.healthy != Some(false)).then(|| {
                    self.healthy = Some(false);
                    Verdict::Unhealthy(format!(
                        "health check failed {} times in a row: {error}",
                        self.failures
                    ))
                })
            }
        }
    }
}

/// Runs a [`Check`] every interval, the first at once.
#[derive(Debug)]
pub struct Checker {
    check: Check,
    ticks: Interval,
    verdicts: Verdicts,
}

impl Checker {
    /// Needs a tokio runtime (its timer).
    pub fn new(check: Check) -> Checker {
        let mut ticks = tokio::time::interval(check.interval);
        // A probe that takes longer than the interval (a timeout) delays
        // the next one rather than causing a burst to catch up.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Checker {
            check,
            ticks,
            verdicts: Verdicts::new(),
        }
    }

    pub fn check(&self) -> &Check {
        &self.check
    }

    /// The current verdict: `None` before the first.
    pub fn healthy(&self) -> Option<bool> {
        self.verdicts.healthy()
    }

    /// Probes on every tick until the verdict changes, and returns the new
    /// one. Cancel-safe in that dropping it loses at most the result of the
    /// probe under way; the timer and the failure count carry over to the
    /// next call.
    pub async fn next(&mut self) -> Verdict {
        loop {
            self.ticks.tick().await;
            let result = probe(self.check.addr, self.check.timeout).await;
            if let Err(e) = &result {
                tracing::debug!(
                    failures = self.verdicts.failures() + 1,
                    error = %e,
                    "health check failed"
                );
            }
            if let Some(verdict) = self.verdicts.record(result) {
                return verdict;
            }
        }
    }
}

/// One probe: connects to `addr` within `timeout` and closes the
/// connection. The error says what failed where, like `tcp
/// [fd00::2]:8080: connection refused`.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp {addr}: {}", describe(&e))),
        Err(_elapsed) => Err(format!(
            "tcp {addr}: no connection within {}",
            short(timeout)
        )),
    }
}

/// An I/O error without its `(os error N)` suffix and starting in lower
/// case, to sit inside a sentence: `connection refused`.
fn describe(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// `2s`, `1500ms`.
fn short(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};
    use tokio::net::TcpListener;

    const FAILURES: usize = HEALTH_FAILURES as usize;

    fn check(addr: SocketAddr) -> Check {
        Check::new(
            addr,
            &Health {
                tcp: addr.port(),
                interval_ms: 10,
                timeout_ms: 2_000,
            },
        )
    }

    /// A loopback port with nothing listening on it (bound, then closed).
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_listener_passes_and_a_closed_port_is_refused() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The kernel completes the handshake from the backlog; nobody needs to accept.
        assert_eq!(probe(addr, Duration::from_secs(2)).await, Ok(()));
        let (_conn, _) = listener.accept().await.unwrap();

        let closed = closed_port().await;
        let err = probe(closed, Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err, format!("tcp {closed}: connection refused"));
    }

    #[tokio::test]
    async fn an_accepting_instance_turns_healthy_at_the_first_check() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        let mut checker = Checker::new(check(addr));
        assert_eq!(checker.healthy(), None);
        let verdict = tokio::time::timeout(Duration::from_secs(10), checker.next())
            .await
            .expect("a verdict within 10 s");
        assert_eq!(verdict, Verdict::Healthy);
        assert_eq!(checker.healthy(), Some(true));
        accepted.await.unwrap().expect("the probe connected");
    }

    #[tokio::test]
    async fn a_closed_port_turns_unhealthy_after_three_failures() {
        let addr = closed_port().await;
        let mut checker = Checker::new(check(addr));
        let verdict = tokio::time::timeout(Duration::from_secs(10), checker.next())
            .await
            .expect("a verdict within 10 s");
        assert_eq!(
            verdict,
            Verdict::Unhealthy(format!(
                "health check failed {FAILURES} times in a row: tcp {addr}: connection refused"
            ))
        );
        assert_eq!(checker.healthy(), Some(false));
    }

    #[tokio::test]
    async fn a_pass_resets_the_failure_count() {
        let addr = closed_port().await;
        let mut verdicts = Verdicts::new();
        for _ in 1..FAILURES {
            assert_eq!(
                verdicts.record(probe(addr, Duration::from_secs(2)).await),
                None
            );
        }
        assert_eq!(verdicts.failures() as usize, FAILURES - 1);
        assert_eq!(verdicts.healthy(), None);

        // The port comes up: one pass makes the instance healthy and forgets the failures.
        let listener = TcpListener::bind(addr).await.unwrap();
        assert_eq!(
            verdicts.record(probe(addr, Duration::from_secs(2)).await),
            Some(Verdict::Healthy)
        );
        assert_eq!(verdicts.failures(), 0);
        // Passing again changes nothing.
        assert_eq!(
            verdicts.record(probe(addr, Duration::from_secs(2)).await),
            None
        );

        // It goes down again: it takes a whole run of failures to turn unhealthy.
        drop(listener);
        for _ in 1..FAILURES {
            assert_eq!(
                verdicts.record(probe(addr, Duration::from_secs(2)).await),
                None
            );
            assert_eq!(verdicts.healthy(), Some(true));
        }
        let Some(Verdict::Unhealthy(message)) =
            verdicts.record(probe(addr, Duration::from_secs(2)).await)
        else {
            panic!("not unhealthy after {FAILURES} failures");
        };
        assert!(message.contains("connection refused"), "{message}");
        assert_eq!(verdicts.healthy(), Some(false));
        // More failures do not repeat the verdict.
        assert_eq!(verdicts.record(Err("again".into())), None);
    }

    #[tokio::test]
    async fn a_connection_that_does_not_complete_times_out() {
        // A listener whose backlog is full leaves further handshakes
        // unanswered (Linux drops the SYN), so connecting hangs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Connections that passed stay in the (never accepted) queue.
        let timeout = Duration::from_millis(200);
        let mut passed = 0;
        let err = loop {
            match probe(addr, timeout).await {
                Ok(()) => {
                    passed += 1;
                    assert!(passed < 64, "the backlog never filled");
                }
                Err(e) => break e,
            }
        };
        assert_eq!(err, format!("tcp {addr}: no connection within 200ms"));
    }

    #[test]
    fn messages_read_as_sentences() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(describe(&e), "connection refused");
        assert_eq!(describe(&std::io::Error::other("Odd")), "odd");
        assert_eq!(short(Duration::from_secs(2)), "2s");
        assert_eq!(short(Duration::from_millis(1500)), "1500ms");
    }
}
