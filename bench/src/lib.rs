//! `verge-bench`: Verge's benchmarks, each a `harness = false` program that
//! prints its figures beside a peer's measured in the same run. Figures are
//! recorded in `bench/README.md`. This library holds what they share.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A control plane started in this process for a benchmark: SQLite in
/// `dir/label`, or the PostgreSQL `database` given. Cancel the token, then
/// `wait()` on the handle, to stop it.
pub async fn start_control(
    label: &str,
    database: Option<String>,
    dir: &std::path::Path,
) -> anyhow::Result<(verge_control::Started, CancellationToken)> {
    let config = verge_control::Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.join(label),
        database,
        ..verge_control::Config::default()
    };
    let shutdown = CancellationToken::new();
    let started = verge_control::start(&config, shutdown.clone()).await?;
    Ok((started, shutdown))
}

/// Latencies of one measured run.
#[derive(Debug)]
pub struct Figures {
    pub requests: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Figures {
    /// Runs `op` `per_worker` times on each of `workers` concurrent tasks.
    pub async fn measure<F, Fut>(workers: usize, per_worker: usize, op: F) -> Figures
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let start = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_worker);
                    for _ in 0..per_worker {
                        let t = Instant::now();
                        op().await;
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(workers * per_worker);
        for t in tasks {
            latencies.extend(t.await.expect("benchmark worker panicked"));
        }
        latencies.sort();
        Figures {
            requests: latencies.len(),
            elapsed: start.elapsed(),
            latencies,
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    /// One table row: name, ops/s, p50, p99.
    pub fn row(&self, name: &str) -> String {
        format!(
            "| {name:<44} | {:>9.0} | {:>8.1} | {:>8.1} |",
            self.requests as f64 / self.elapsed.as_secs_f64(),
            self.percentile(0.50).as_secs_f64() * 1e6,
            self.percentile(0.99).as_secs_f64() * 1e6,
        )
    }

    pub fn header() -> &'static str {
        "| operation                                    |     ops/s |  p50 µs |  p99 µs |\n\
         |----------------------------------------------|-----------|---------|---------|"
    }
}
