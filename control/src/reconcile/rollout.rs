//! Rollout progress: how far an env is on its way to the release of its
//! rollout, and when the rollout ends. Pure, like the planner.
//!
//! `done` counts the release's current instances that are ready; `failed`
//! those that ended `failed`. A rollout completes when every instance is
//! done and nothing outgoing runs. It fails at once when an instance of the
//! release failed (crash loop, image pull given up, ...), and when it made
//! no progress (no new instance ready) for its deadline: `failed` if none
//! got ready, `partial` if some did. The step it was on and that step's
//! error category are kept.

use verge_api::manifest::Manifest;
use verge_api::status::RolloutInstance;

use super::plan::{self, Clock, EnvInput, Facts};
use crate::store::{InstanceRow, RolloutRow};
use crate::time::rfc3339;

/// Where a rollout stands now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub outgoing: i64,
    /// Of the release's instances, those on a node.
    pub placed: i64,
    /// What it waits for (or failed at), and its error category.
    pub step: Option<String>,
    pub category: Option<String>,
    /// The release's instances and how far each got.
    pub instances: Vec<RolloutInstance>,
}

/// The release's progress in `input` (whose `release_id` is the rollout's).
pub fn progress(input: &EnvInput<'_>, facts: &Facts, clock: Clock) -> Progress {
    let mut p = Progress::default();
    let mut first_failed: Option<(String, String)> = None;
    let mut first_waiting: Option<(String, Option<String>)> = None;
    let mut waiting_slots = 0;
    for (name, w) in &input.manifest.workloads {
        let s = plan::split(name, w, input, facts, clock);
        let checked = w.health.is_some();
        p.total += i64::from(w.count);
        p.outgoing += s.outgoing.len() as i64;
        waiting_slots += (0..i64::from(w.count))
            .filter(|k| !s.current.contains_key(k))
            .count();
        for i in s.current.values() {
            if i.node_id.is_some() {
                p.placed += 1;
            }
            let node = i.node_name.clone();
            let on = node
                .as_deref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default();
            let what = format!("instance {} of {name}{on}", i.id);
            let ready = plan::ready(i, checked, facts, clock.now_ms);
            let state = if ready && checked {
                "healthy".to_string()
            } else if i.state == "running" && i.healthy() == Some(false) {
                "unhealthy".to_string()
            } else {
                i.state.clone()
            };
            p.instances.push(RolloutInstance {
                id: i.id.clone(),
                workload: name.clone(),
                node,
                state,
                reason: i.message.clone(),
            });
            if ready {
                p.done += 1;
                continue;
            }
            if i.state == "failed" {
                p.failed += 1;
                if first_failed.is_none() {
                    let cat = i.category.clone().unwrap_or_else(|| "crash".into());
                    let msg = i.message.as_deref().unwrap_or("no details");
                    first_failed = Some((format!("{what} failed: {msg}"), cat));
                }
                continue;
            }
            if first_waiting.is_none() {
                first_waiting = Some(waiting_on(i, &what, checked, facts));
            }
        }
    }
    if let Some((step, cat)) = first_failed {
        p.step = Some(step);
        p.category = Some(cat);
    } else if let Some((step, cat)) = first_waiting {
        p.step = Some(step);
        p.category = cat;
    } else if waiting_slots > 0 {
        p.step = Some(format!(
            "waiting to start {waiting_slots} more instance(s) (bounded by max_surge, \
             or by a volume one instance at a time mounts)"
        ));
    } else if p.outgoing > 0 {
        p.step = Some(format!("stopping {} old instance(s)", p.outgoing));
    }
    p
}

/// The progress of rollout `row` of release `manifest` (scale applied),
/// given the env's `instances`.
pub fn progress_of(
    row: &RolloutRow,
    manifest: &Manifest,
    instances: &[InstanceRow],
    facts: &Facts,
    clock: Clock,
) -> Progress {
    let input = EnvInput {
        release_id: &row.release_id,
        manifest,
        instances,
        hold: false,
        since_ms: row.created_at,
        volumes: &super::plan::NO_VOLUMES,
    };
    progress(&input, facts, clock)
}

/// What a not-yet-ready instance waits for, and the category it would fail with.
fn waiting_on(
    i: &InstanceRow,
    what: &str,
    checked: bool,
    facts: &Facts,
) -> (String, Option<String>) {
    let detail = i
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let offline = plan::node_of(i, facts).is_some_and(|f| !f.online);
    let (step, fallback) = if i.node_id.is_none() {
        (format!("placing {what}{detail}"), "placement")
    } else if offline {
        (format!("{what}: its node is offline"), "node_lost")
    } else {
        match i.state.as_str() {
            "pulling" => (format!("pulling the image of {what}"), "image_pull"),
            "running" if checked => (
                format!("waiting for {what} to pass its health check{detail}"),
                "health",
            ),
            "pending" if i.category.is_some() => (format!("{what} is restarting{detail}"), "start"),
            "pending" => (format!("{what} is pending{detail}"), "start"),
            other => (format!("{what} is {other}{detail}"), "start"),
        }
    };
    (step, Some(i.category.clone().unwrap_or(fallback.into())))
}

/// The rollout's next state given `p`, or `None` when nothing changed
/// worth storing. Only active rollouts move.
pub fn advance(row: &RolloutRow, p: &Progress, now_ms: i64) -> Option<RolloutRow> {
    if !row.is_active() {
        return None;
    }
    let mut next = row.clone();
    next.total = p.total;
    next.failed = p.failed;
    next.outgoing = p.outgoing;
    next.step = p.step.clone();
    next.category = p.category.clone();
    if p.done > row.done {
        next.progress_at = now_ms;
    }
    next.done = p.done;
    if p.done == p.total && p.outgoing == 0 {
        next.state = "completed".into();
        next.reason = None;
        next.step = None;
        next.category = None;
        next.ended_at = Some(now_ms);
    } else if p.failed > 0 {
        end_unsuccessful(&mut next, p, now_ms, "an instance of the release failed");
    } else if now_ms - next.progress_at > row.deadline_ms {
        let why = format!(
            "no progress for {}",
            humantime::format_duration(std::time::Duration::from_millis(row.deadline_ms as u64))
        );
        end_unsuccessful(&mut next, p, now_ms, &why);
    } else if p.placed == 0 && p.total > 0 {
        next.state = "pending".into();
        next.reason = Some(match &p.step {
            Some(step) => format!("nothing placed yet: {step}"),
            None => "nothing placed yet".into(),
        });
    } else {
        next.state = "in_progress".into();
        next.reason = Some(format!(
            "{} of {} instance(s) ready{}",
            p.done,
            p.total,
            if p.outgoing > 0 {
                format!("; {} old instance(s) still running", p.outgoing)
            } else {
                String::new()
            }
        ));
    }
    // Steps and categories of a rollout in progress change often; store
    // them only with a change of state or counts.
    let moved = next.state != row.state
        || (next.state == "pending" && next.reason != row.reason)
        || next.done != row.done
        || next.failed != row.failed
        || next.outgoing != row.outgoing
        || next.total != row.total;
    moved.then_some(next)
}

fn end_unsuccessful(next: &mut RolloutRow, p: &Progress, now_ms: i64, why: &str) {
    next.state = if p.done > 0 { "partial" } else { "failed" }.into();
    let step = p.step.as_deref().unwrap_or("unknown step");
    let category = p.category.as_deref().unwrap_or("unknown");
    let serving = if p.done > 0 || p.outgoing > 0 {
        "; the env keeps serving from what runs"
    } else {
        ""
    };
    next.reason = Some(format!(
        "{why}: {} of {} instance(s) ready; failed at: {step} ({category}){serving}",
        p.done, p.total
    ));
    next.ended_at = Some(now_ms);
}

/// The API's view of a rollout row (with live progress when it is active).
pub fn view(
    row: &RolloutRow,
    release: Option<i64>,
    from: Option<i64>,
    live: Option<&Progress>,
) -> verge_api::status::Rollout {
    let (total, done, failed, outgoing) = match live {
        Some(p) if row.is_active() => (p.total, p.done, p.failed, p.outgoing),
        _ => (row.total, row.done, row.failed, row.outgoing),
    };
    let (step, category) = match live {
        Some(p) if row.is_active() => (p.step.clone(), p.category.clone()),
        _ => (row.step.clone(), row.category.clone()),
    };
    verge_api::status::Rollout {
        state: row.state.clone(),
        reason: row.reason.clone(),
        id: Some(row.id.clone()),
        release,
        from_release: from,
        kind: Some(row.kind.clone()),
        step,
        category,
        total: total as u32,
        done: done as u32,
        failed: failed as u32,
        success_rate: if total == 0 {
            1.0
        } else {
            done as f64 / total as f64
        },
        outgoing: outgoing as u32,
        started_at: Some(rfc3339(row.created_at)),
        ended_at: row.ended_at.map(rfc3339),
        instances: live.map(|p| p.instances.clone()).unwrap_or_default(),
    }
}

/// The most lenient progress deadline of the release's workloads.
pub fn deadline_ms(m: &Manifest) -> i64 {
    m.workloads
        .values()
        .map(|w| w.rollout.deadline_ms as i64)
        .max()
        .unwrap_or(verge_api::manifest::defaults::ROLLOUT_DEADLINE_MS as i64)
}

/// Whether a rollout that ended unsuccessfully may go back to where it
/// came from: not a way back itself (an automatic rollback or a cancel),
/// or the env would bounce between two releases.
pub fn goes_back(r: &RolloutRow) -> bool {
    !matches!(r.kind.as_str(), "auto_rollback" | "cancel")
        && r.from_release_id
            .as_ref()
            .is_some_and(|f| *f != r.release_id)
}

/// Whether a failed rollout of `m` rolls back by itself.
pub fn auto_rollback(m: &Manifest) -> bool {
    m.workloads.values().any(|w| w.rollout.auto_rollback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::plan::NodeFacts;

    const NOW: i64 = 1_000_000;
    const CLOCK: Clock = Clock {
        now_ms: NOW,
        reschedule_after_ms: 30_000,
    };

    fn manifest() -> Manifest {
        verge_api::manifest::parse(
            "verge.toml",
            "app = \"a\"\n[workloads.web]\nimage = \"r/i:1\"\ncount = 2\ncpu = 0.25\n\
             memory = \"64Mi\"\nhealth = { tcp = 8080 }\n",
        )
        .unwrap()
    }

    fn inst(id: &str, slot: i64, state: &str, healthy: Option<i64>) -> InstanceRow {
        InstanceRow {
            healthy,
            ..crate::reconcile::plan::tests::inst(id, "r2", slot, "n1", state)
        }
    }

    fn row(state: &str, done: i64, progress_at: i64) -> RolloutRow {
        RolloutRow {
            id: "ro".into(),
            env_id: "e".into(),
            release_id: "r2".into(),
            from_release_id: Some("r1".into()),
            kind: "deploy".into(),
            state: state.into(),
            reason: None,
            step: None,
            category: None,
            total: 2,
            done,
            failed: 0,
            outgoing: 0,
            deadline_ms: 10_000,
            progress_at,
            created_at: 0,
            created_by: None,
            ended_at: None,
        }
    }

    /// The progress of a rollout of release r2 with `instances` on node n1.
    fn on_n1(instances: &[InstanceRow]) -> Progress {
        let facts: Facts = [(
            "n1".to_string(),
            NodeFacts {
                online: true,
                ..NodeFacts::default()
            },
        )]
        .into();
        progress_of(
            &row("in_progress", 0, 0),
            &manifest(),
            instances,
            &facts,
            CLOCK,
        )
    }

    #[test]
    fn counts_done_and_names_the_step_with_its_category() {
        let p = on_n1(&[
            inst("a", 0, "running", Some(1)),
            inst("b", 1, "running", None),
        ]);
        assert_eq!((p.total, p.done, p.failed), (2, 1, 0));
        assert_eq!(
            p.step.as_deref(),
            Some("waiting for instance b of web on n1 to pass its health check")
        );
        assert_eq!(p.category.as_deref(), Some("health"));
        assert_eq!(p.instances[0].state, "healthy");
        let p = on_n1(&[inst("a", 0, "pulling", None)]);
        assert_eq!(p.category.as_deref(), Some("image_pull"));
    }

    #[test]
    fn completes_fails_fast_and_fails_or_is_partial_at_the_deadline() {
        let both = [
            inst("a", 0, "running", Some(1)),
            inst("b", 1, "running", Some(1)),
        ];
        let next = advance(&row("in_progress", 1, NOW), &on_n1(&both), NOW).unwrap();
        assert_eq!(next.state, "completed");
        assert_eq!(next.ended_at, Some(NOW));

        let mut failed = inst("b", 1, "failed", None);
        failed.category = Some("crash".into());
        failed.message = Some("exited with code 3".into());
        let p = on_n1(&[both[0].clone(), failed]);
        let next = advance(&row("in_progress", 1, NOW), &p, NOW).unwrap();
        assert_eq!(next.state, "partial", "one of two was done");
        assert_eq!(next.category.as_deref(), Some("crash"));
        assert!(
            next.reason
                .as_deref()
                .unwrap()
                .contains("exited with code 3"),
            "{next:?}"
        );

        // No progress within the deadline: failed when none got ready.
        let waiting = [inst("a", 0, "running", Some(0))];
        let p = on_n1(&waiting);
        let r = row("in_progress", 0, NOW - 5_000);
        assert!(
            advance(&r, &p, NOW).is_none(),
            "within the deadline nothing changes"
        );
        let next = advance(&row("in_progress", 0, NOW - 20_000), &p, NOW).unwrap();
        assert_eq!(next.state, "failed");
        assert_eq!(next.category.as_deref(), Some("health"));
        assert!(
            next.reason
                .as_deref()
                .unwrap()
                .starts_with("no progress for 10s")
        );

        // One more ready counts as progress and restarts the deadline.
        let next = advance(
            &row("in_progress", 0, NOW - 20_000),
            &on_n1(&both[..1]),
            NOW,
        )
        .unwrap();
        assert_eq!(
            (next.state.as_str(), next.progress_at),
            ("in_progress", NOW)
        );
    }

    #[test]
    fn ways_back_are_not_themselves_undone() {
        let mut r = row("failed", 0, 0);
        assert!(goes_back(&r));
        for kind in ["auto_rollback", "cancel"] {
            r.kind = kind.into();
            assert!(!goes_back(&r), "{kind}");
        }
        r.kind = "scale".into();
        r.from_release_id = Some(r.release_id.clone());
        assert!(!goes_back(&r), "nowhere to go back to");
    }

    #[test]
    fn ended_rollouts_do_not_move_and_unplaced_ones_are_pending() {
        let p = on_n1(&[inst("a", 0, "running", Some(1))]);
        assert!(advance(&row("failed", 0, 0), &p, NOW).is_none());
        let mut unplaced = inst("a", 0, "pending", None);
        unplaced.node_id = None;
        unplaced.message = Some("node n1: draining".into());
        let next = advance(&row("pending", 0, NOW), &on_n1(&[unplaced]), NOW).unwrap();
        assert_eq!(next.state, "pending");
        assert!(
            next.reason
                .as_deref()
                .unwrap()
                .contains("node n1: draining")
        );
    }
}
