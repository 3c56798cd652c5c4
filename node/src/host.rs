//! What this machine offers and uses, read from /proc for heartbeats.

use verge_api::wire::{Capacity, Usage};

/// Reads capacity and usage; remembers the CPU counters between calls to
/// report the busy cores averaged over the interval.
#[derive(Debug, Default)]
pub struct Host {
    last_cpu: Option<(u64, u64)>,
}

impl Host {
    /// All cores and all memory of the machine, unless overridden.
    pub fn capacity(cpu: Option<f64>, memory: Option<u64>) -> Capacity {
        Capacity {
            cpu: cpu.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
            }),
            memory: memory.unwrap_or_else(|| meminfo("MemTotal:").unwrap_or(0)),
        }
    }

    /// Usage now: busy cores since the previous call, memory in use.
    pub fn usage(&mut self, images: u64) -> Usage {
        let cpu = match (cpu_times(), self.last_cpu) {
            (Some((busy, total)), Some((b0, t0))) if total > t0 => {
                self.last_cpu = Some((busy, total));
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                (busy - b0) as f64 / (total - t0) as f64 * cores
            }
            (now, _) => {
                self.last_cpu = now;
                0.0
            }
        };
        let memory = match (meminfo("MemTotal:"), meminfo("MemAvailable:")) {
            (Some(t), Some(a)) => t.saturating_sub(a),
            _ => 0,
        };
        Usage {
            cpu,
            memory,
            images,
            volumes_free: 0,
        }
    }
}

/// A `/proc/meminfo` field in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (busy, total) jiffies of all CPUs from `/proc/stat`.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle + iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let cap = super::Host::capacity(None, None);
        assert!(cap.cpu >= 1.0 && cap.memory > 0);
        let mut h = super::Host::default();
        h.usage(0);
        let u = h.usage(7);
        assert!(u.memory > 0 && u.memory <= cap.memory);
        assert_eq!(u.images, 7);
    }
}
