//! One cgroup per instance, `<parent>/<instance id>`, on cgroup v1 (every
//! mounted controller) or v2, through `cgroups-rs`.
//!
//! `cgroups-rs`' `Cgroup::apply` ignores write errors, so limits are set
//! controller by controller here and a failure is reported.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller, MaxValue, hierarchies};

/// CFS period: quotas are expressed per 100 ms.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts.
const CPU_MIN_QUOTA_US: i64 = 1_000;

/// An instance's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Cores; 0 means unlimited.
    pub cpu: f64,
    /// Bytes; 0 means unlimited.
    pub memory: u64,
    /// Processes and threads.
    pub pids: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {what}: {cause}")]
pub struct CgroupError {
    pub path: String,
    pub what: String,
    pub cause: String,
}

/// An instance's cgroup (in every hierarchy on v1).
#[derive(Debug)]
pub struct InstanceCgroup {
    cg: Cgroup,
    path: String,
}

impl InstanceCgroup {
    /// Creates `path` (e.g. `verge/<id>`) and sets `limits`.
    pub fn create(path: &str, limits: &Limits) -> Result<InstanceCgroup, CgroupError> {
        let cg = InstanceCgroup::load(path);
        if cg.cg.subsystems().is_empty() {
            return Err(cg.error("finding controllers", "no cgroup controller is mounted"));
        }
        cg.cg.create().map_err(|e| cg.error("creating it", e))?;
        if let Err(e) = cg.set_limits(limits) {
            cg.delete();
            return Err(e);
        }
        Ok(cg)
    }

    /// A handle on an existing (or vanished) cgroup.
    pub fn load(path: &str) -> InstanceCgroup {
        InstanceCgroup {
            cg: Cgroup::load(hierarchies::auto(), path),
            path: path.to_owned(),
        }
    }

    pub fn is_v2(&self) -> bool {
        self.cg.v2()
    }

    fn error(&self, what: &str, cause: impl ToString) -> CgroupError {
        CgroupError {
            path: self.path.clone(),
            what: what.to_owned(),
            cause: cause.to_string(),
        }
    }

    fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let mem: &MemController = self
            .cg
            .controller_of()
            .ok_or_else(|| self.error("memory limit", "no memory controller"))?;
        if limits.memory > 0 {
            let bytes = limits.memory as i64;
            mem.set_limit(bytes)
                .map_err(|e| self.error("setting the memory limit", e))?;
            // Swap must not extend the limit. v1: memory+swap = memory (the
            // file exists only with swap accounting on); v2: no swap at all.
            let swap = if self.is_v2() { 0 } else { bytes };
            if let Err(e) = mem.set_memswap_limit(swap) {
                tracing::debug!(cgroup = %self.path, error = %e, "no swap limit (no swap accounting)");
            }
        }
        if limits.cpu > 0.0 {
            let cpu: &CpuController = self
                .cg
                .controller_of()
                .ok_or_else(|| self.error("cpu quota", "no cpu controller"))?;
            let quota = ((limits.cpu * CPU_PERIOD_US as f64) as i64).max(CPU_MIN_QUOTA_US);
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|e| self.error("setting the cpu quota", e))?;
        }
        let pids: &PidController = self
            .cg
            .controller_of()
            .ok_or_else(|| self.error("pids limit", "no pids controller"))?;
        pids.set_pid_max(MaxValue::Value(limits.pids.min(i64::MAX as u64) as i64))
            .map_err(|e| self.error("setting the pids limit", e))?;
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        self.cg
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|e| self.error(&format!("adding process {pid}"), e))
    }

    /// The memory controller's directory.
    fn memory_dir(&self) -> Option<PathBuf> {
        let mem: &MemController = self.cg.controller_of()?;
        Some(mem.path().to_path_buf())
    }

    /// How many processes the kernel OOM-killed in this cgroup so far
    /// (v1: `memory.oom_control`, v2: `memory.events`, field `oom_kill`).
    pub fn oom_kills(&self) -> u64 {
        let file = if self.is_v2() {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let Some(dir) = self.memory_dir() else {
            return 0;
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// The processes in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        self.cg.procs().into_iter().map(|p| p.pid as i32).collect()
    }

    /// SIGKILLs every process in the cgroup until it is empty (or ~2 s
    /// passed). v2 has `cgroup.kill`; v1 is a loop, which converges because
    /// killed processes cannot fork and the pids limit bounds new ones.
    pub fn kill_all(&self) {
        if !self.cg.exists() {
            return;
        }
        if self.is_v2() {
            let _ = self.cg.kill();
        }
        for _ in 0..200 {
            let procs = self.procs();
            if procs.is_empty() {
                return;
            }
            for pid in procs {
                // SAFETY: kill(2) with a PID read from the cgroup; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(cgroup = %self.path, "processes survived SIGKILL");
    }

    /// Kills what is left and removes the cgroup (every hierarchy). Returns
    /// whether it is gone.
    pub fn delete(&self) -> bool {
        if !self.cg.exists() {
            return true;
        }
        self.kill_all();
        if let Err(e) = self.cg.delete() {
            tracing::warn!(cgroup = %self.path, error = %e, "cannot remove the cgroup");
        }
        !self.cg.exists()
    }

    /// A controller's file, e.g. `("cpu", "cpu.cfs_quota_us")` on v1 or
    /// `("cpu", "cpu.max")` on v2; for tests and diagnostics.
    pub fn read(&self, controller: &str, file: &str) -> Option<String> {
        self.cg
            .subsystems()
            .iter()
            .map(|s| s.to_controller())
            .find(|c| c.control_type().to_string() == controller)
            .and_then(|c| fs::read_to_string(c.path().join(file)).ok())
    }
}
