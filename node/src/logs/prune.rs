//! Retention: which logs the node deletes (see [`super::LogLimits`]).
//!
//! - Rotated files (`app.log.N`, `system.log.N`) last written more than
//!   `max_age` ago, of any instance.
//! - Whole logs dirs of *ended* instances beyond the newest
//!   `keep_instances` of their (env, workload), oldest end first. An
//!   instance has ended when its `meta.json` has `ended_ms`; a dir without
//!   `meta.json` (an instance of an older node, or one started without a
//!   supervisor) counts as ended at its last change unless the instance
//!   still has a runtime dir.
//!
//! Logs of a live instance are never deleted whole.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use verge_api::logs::LogSource;

use super::file::{self, META};
use super::{LogLimits, Meta};

/// What one pass deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Instances whose whole logs dir was deleted.
    pub instances: Vec<String>,
    /// Rotated files deleted for their age.
    pub files: Vec<PathBuf>,
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One pass over the logs dir `root` at time `now`; `running(id)` says
/// whether an instance without `meta.json` still runs.
pub fn prune(
    root: &Path,
    limits: &LogLimits,
    now: SystemTime,
    running: impl Fn(&str) -> bool,
) -> Pruned {
    let mut pruned = Pruned::default();
    let Ok(entries) = fs::read_dir(root) else {
        return pruned;
    };
    let too_old = now
        .checked_sub(limits.max_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // (env, workload) → [(ended_ms, id)]
    let mut ended: HashMap<(String, String), Vec<(i64, String)>> = HashMap::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let dir = entry.path();
        for source in [LogSource::App, LogSource::System] {
            for (n, path) in file::files(&dir, source) {
                let old = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < too_old);
                if n > 0 && old && fs::remove_file(&path).is_ok() {
                    pruned.files.push(path);
                }
            }
        }
        match super::state::read_json::<Meta>(&dir.join(META)) {
            Ok(meta) => {
                if let Some(at) = meta.ended_ms {
                    ended
                        .entry((meta.env, meta.workload))
                        .or_default()
                        .push((at, id));
                }
            }
            Err(_) if !running(&id) => {
                let at = last_change(&dir).map_or(0, millis);
                ended.entry(Default::default()).or_default().push((at, id));
            }
            Err(_) => {}
        }
    }
    for (_, mut list) in ended {
        // Newest first; ties by ID, so passes agree.
        list.sort_by(|a, b| b.cmp(a));
        for (_, id) in list.into_iter().skip(limits.keep_instances as usize) {
            match fs::remove_dir_all(root.join(&id)) {
                Ok(()) => pruned.instances.push(id),
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot delete the logs of an ended instance")
                }
            }
        }
    }
    pruned.instances.sort();
    pruned
}

/// The latest modification time of `dir` and its files.
fn last_change(dir: &Path) -> Option<SystemTime> {
    let mut latest = fs::metadata(dir).and_then(|m| m.modified()).ok();
    for e in fs::read_dir(dir).ok()?.flatten() {
        if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
            latest = latest.max(Some(t));
        }
    }
    latest
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sets a file's modification time `ago` before now.
    fn age(path: &Path, ago: Duration) {
        let t = SystemTime::now() - ago;
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(t).unwrap();
    }

    fn ended(root: &Path, id: &str, workload: &str, ended_ms: Option<i64>) {
        let dir = root.join(id);
        fs::create_dir_all(&dir).unwrap();
        let meta = Meta {
            instance: id.into(),
            workload: workload.into(),
            env: "env1".into(),
            started_ms: 1,
            ended_ms,
            ..Meta::default()
        };
        super::super::state::write_json(&dir.join(META), &meta).unwrap();
        fs::write(dir.join("app.log"), "").unwrap();
    }

    #[test]
    fn keeps_the_last_ended_instances_per_workload() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for i in 0..5 {
            ended(r, &format!("web{i}"), "web", Some(100 + i));
        }
        ended(r, "worker0", "worker", Some(1));
        ended(r, "live", "web", None);
        // No meta: ended unless running.
        fs::create_dir_all(r.join("old")).unwrap();
        fs::create_dir_all(r.join("running")).unwrap();
        let limits = LogLimits {
            keep_instances: 2,
            ..LogLimits::default()
        };
        let pruned = prune(r, &limits, SystemTime::now(), |id| id == "running");
        assert_eq!(pruned.instances, ["web0", "web1", "web2"]);
        let mut left: Vec<String> = fs::read_dir(r)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["live", "old", "running", "web3", "web4", "worker0"]);
        // Nothing more to do.
        assert_eq!(
            prune(r, &limits, SystemTime::now(), |id| id == "running"),
            Pruned::default()
        );
        let none = LogLimits {
            keep_instances: 0,
            ..limits
        };
        let pruned = prune(r, &none, SystemTime::now(), |id| id == "running");
        assert_eq!(pruned.instances, ["old", "web3", "web4", "worker0"]);
    }

    #[test]
    fn rotated_files_expire_current_ones_do_not() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("live");
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "app.log",
            "app.log.1",
            "app.log.2",
            "system.log",
            "system.log.1",
        ] {
            fs::write(dir.join(name), "x\n").unwrap();
            age(&dir.join(name), Duration::from_secs(10 * 86400));
        }
        age(&dir.join("app.log.1"), Duration::from_secs(86400));
        let limits = LogLimits::default();
        let pruned = prune(root.path(), &limits, SystemTime::now(), |_| true);
        let mut gone: Vec<String> = pruned
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        gone.sort();
        assert_eq!(gone, ["app.log.2", "system.log.1"]);
        assert!(pruned.instances.is_empty());
        assert!(dir.join("app.log").exists() && dir.join("app.log.1").exists());
    }
}
