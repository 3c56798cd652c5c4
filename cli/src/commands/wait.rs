//! `verge wait` and `--wait`: following an env's rollout until it ends,
//! with live progress, and explaining how it ended.

use std::time::Duration;

use tokio::time::Instant;
use verge_api::client::{ClientError, EventQuery, EventScope};
use verge_api::release::ReleaseRef;
use verge_api::status::{Rollout, Status};
use verge_api::{ErrorDetail, ErrorKind};

use super::progress::Progress;
use super::rollouts::{counts, failure_category, mentions_release, rollout_line};
use super::{Failure, Result, releases};
use crate::args::WaitArgs;
use crate::context::{Context, EnvNames};
use crate::output::Output;

pub async fn wait(ctx: &Context, args: WaitArgs, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    let goal = match &args.release {
        Some(name) => {
            releases::check_release_name(name)?;
            let r = ctx.client.get_release(names.scope(), name).await?;
            Some(ReleaseRef {
                id: r.id,
                number: r.number,
                env: r.env,
            })
        }
        None => None,
    };
    let status = wait_for(ctx, &names, goal, args.timeout, out).await?;
    out.one(&status, |s| converged(&names, s));
    Ok(())
}

/// `APP/ENV converged on vN`.
pub fn converged(names: &EnvNames, status: &Status) -> String {
    let number = status.release.as_ref().map_or(0, |r| r.number);
    format!("{} converged on v{number}", names.label())
}

/// Polls the env's status every 500 ms until the rollout of `goal` (the
/// current release when `None`) completed: the last status. A failed
/// rollout, another release becoming current, or the deadline fail; when
/// the release stopped being current because its rollout failed (and was
/// rolled back automatically) or was canceled, the failure says so.
/// Progress goes to stderr (see [`Progress`]); nothing under `-o json`.
pub async fn wait_for(
    ctx: &Context,
    names: &EnvNames,
    mut goal: Option<ReleaseRef>,
    timeout: Duration,
    out: &Output,
) -> Result<Status> {
    const POLL: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + timeout;
    let label = names.label();
    let mut progress = Progress::new(out, &label, "done");
    let mut tail = EventTail::default();
    let mut last: Option<Status> = None;
    // The ID of the goal's rollout, once seen.
    let mut rollout_id: Option<String> = None;
    let mut first = true;
    let mut unreachable = String::new();
    loop {
        match tokio::time::timeout_at(deadline, ctx.client.status(names.scope())).await {
            Ok(Ok(status)) => {
                unreachable.clear();
                let Some(current) = status.release.clone() else {
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::NotFound,
                            format!("{label} has no release yet"),
                        )
                        .with_next("verge deploy"),
                    ));
                };
                let target = goal.get_or_insert_with(|| current.clone()).clone();
                if first {
                    progress.set_prefix(&format!("v{} to {label}", target.number));
                }
                let ours = current.id == target.id && is_rollout_of(&status.rollout, &target);
                if ours && let Some(id) = &status.rollout.id {
                    rollout_id = Some(id.clone());
                }
                let completed = ours && status.rollout.is_completed();
                // Events tell what happened meanwhile; not the history of
                // a rollout that had already completed.
                if progress.wants_events() && !(first && completed) {
                    tail.show(ctx, names, &status.rollout, ours, deadline, &progress)
                        .await;
                }
                first = false;
                if current.id != target.id {
                    return Err(
                        superseded(ctx, names, &target, &current, rollout_id.as_deref()).await,
                    );
                }
                if completed {
                    return Ok(status);
                }
                if ours && status.rollout.is_final_failure() {
                    return Err(rollout_failed(&label, target.number, &status.rollout, None));
                }
                show(&mut progress, &label, &target, &status, ours);
                last = Some(status);
            }
            // The control plane may be restarting: keep trying until the deadline.
            Ok(Err(e @ ClientError::Connect { .. })) => progress.retrying(&e, &mut unreachable),
            Ok(Err(e)) => return Err(e.into()),
            Err(_elapsed) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out(&label, goal.as_ref(), last.as_ref(), timeout));
        }
        tokio::time::sleep_until((now + POLL).min(deadline)).await;
    }
}

/// Whether `r` rolls out `target` (a control plane that does not say
/// which release a rollout is of: yes).
fn is_rollout_of(r: &Rollout, target: &ReleaseRef) -> bool {
    r.release.is_none_or(|n| n == target.number)
}

/// Whether `r` came from a control plane that reports no rollout progress
/// (no ID, release or counts): then instances are counted instead.
fn without_progress(r: &Rollout) -> bool {
    r.id.is_none() && r.release.is_none()
}

/// The progress bar or line for one status.
fn show(progress: &mut Progress, label: &str, target: &ReleaseRef, s: &Status, ours: bool) {
    let waiting = format!("waiting for {label} to converge on v{}", target.number);
    if !ours {
        let line = format!("{waiting}: its rollout has not started yet");
        progress.waiting("waiting for its rollout to start", &line);
        return;
    }
    let r = &s.rollout;
    if without_progress(r) {
        let desired: u32 = s.workloads.iter().map(|w| w.desired).sum();
        let running: u32 = s.workloads.iter().map(|w| w.running).sum();
        let text = progress_text(s);
        let line = format!("{waiting}: {text}");
        progress.update(running.into(), desired.into(), &text, &line, &line);
        return;
    }
    // A line is printed when the state or counts change; the step and the
    // events between show the rest.
    let key = format!(
        "{} {:?} {}/{} {} {}",
        r.state, r.category, r.done, r.total, r.failed, r.outgoing
    );
    let line = format!("{waiting}: {}", rollout_line(r));
    progress.update(r.done.into(), r.total.into(), &bar_message(r), &key, &line);
}

/// The line below the bar: `0 failed — STEP`.
fn bar_message(r: &Rollout) -> String {
    let mut text = format!("{} failed", r.failed);
    if r.outgoing > 0 {
        text.push_str(&format!(", {} old still running", r.outgoing));
    }
    if let Some(step) = &r.step {
        text.push_str(&format!(" — {step}"));
    } else if let Some(reason) = &r.reason {
        text.push_str(&format!(" — {reason}"));
    }
    text
}

/// The env's events since the wait began (or since the rollout it waits
/// for started), printed once each: the first query asks `since`, later
/// ones `after` the last cursor printed.
#[derive(Debug, Default)]
struct EventTail {
    after: Option<i64>,
    since: Option<String>,
}

impl EventTail {
    async fn show(
        &mut self,
        ctx: &Context,
        names: &EnvNames,
        rollout: &Rollout,
        ours: bool,
        deadline: Instant,
        progress: &Progress,
    ) {
        if self.after.is_none() && self.since.is_none() {
            let started = rollout.started_at.clone().filter(|_| ours);
            self.since = Some(started.unwrap_or_else(|| {
                // Server time is not known: a little slack for the clocks.
                let at = std::time::SystemTime::now() - Duration::from_secs(2);
                humantime::format_rfc3339_seconds(at).to_string()
            }));
        }
        let query = EventQuery {
            after: self.after,
            since: if self.after.is_none() {
                self.since.clone()
            } else {
                None
            },
        };
        let scope = EventScope::Env(names.scope());
        // Events only decorate the wait: a failure to read them is not one of the wait.
        let Ok(Ok(events)) =
            tokio::time::timeout_at(deadline, ctx.client.events(scope, &query)).await
        else {
            return;
        };
        for e in &events {
            progress.event(e);
            self.after = Some(e.cursor);
        }
    }
}

/// Why the awaited release is no longer current: its rollout failed and
/// was rolled back, or was canceled (from the env's rollouts), else only
/// that another release is current.
async fn superseded(
    ctx: &Context,
    names: &EnvNames,
    target: &ReleaseRef,
    current: &ReleaseRef,
    rollout_id: Option<&str>,
) -> Failure {
    let label = names.label();
    if let Ok(rollouts) = ctx.client.list_rollouts(names.scope()).await
        && let Some(failure) = explain_superseded(&label, target.number, &rollouts, rollout_id)
    {
        return failure;
    }
    Failure(
        ErrorDetail::new(
            ErrorKind::Conflict,
            format!(
                "release v{} is not current: {label} is on v{}",
                target.number, current.number
            ),
        )
        .with_next("verge releases")
        .with_next("verge events"),
    )
}

/// From the env's rollouts (newest first): the failure of the rollout of
/// release `number` (the one with `rollout_id` when it was seen), with the
/// rollout that took over from it; `None` when that rollout did not fail
/// or cannot be told.
fn explain_superseded(
    label: &str,
    number: i64,
    rollouts: &[Rollout],
    rollout_id: Option<&str>,
) -> Option<Failure> {
    let by_id = rollout_id.and_then(|id| rollouts.iter().position(|r| r.id.as_deref() == Some(id)));
    let index = by_id.or_else(|| rollouts.iter().position(|r| r.release == Some(number)))?;
    let failed = &rollouts[index];
    if !failed.is_final_failure() {
        return None;
    }
    // The next newer rollout; found by release alone, it must start from this one.
    let then = index.checked_sub(1).map(|i| &rollouts[i]);
    if by_id.is_none() && then.is_none_or(|t| t.from_release != Some(number)) {
        return None;
    }
    Some(rollout_failed(label, number, failed, then))
}

/// `rollout of v3 to APP/ENV failed (health): REASON (step: STEP; 1/2
/// done, 1 failed)`, with what happened next when `then` took over
/// (`; automatically rolled back to v2`), and the next actions.
fn rollout_failed(label: &str, number: i64, r: &Rollout, then: Option<&Rollout>) -> Failure {
    let ended = match r.state.as_str() {
        "canceled" => "was canceled",
        "partial" => "ended partial",
        state => state,
    };
    let mut message = format!("rollout of v{number} to {label} {ended}");
    if let Some(category) = failure_category(r) {
        message.push_str(&format!(" ({category})"));
    }
    if let Some(reason) = &r.reason {
        message.push_str(&format!(": {reason}"));
    }
    // A reason that names the step (the control plane's do) says enough.
    let repeated = r.step.as_deref().is_some_and(|step| {
        r.reason
            .as_deref()
            .is_some_and(|reason| reason.contains(step))
    });
    let mut context = Vec::new();
    if let Some(step) = &r.step
        && !repeated
    {
        context.push(format!("step: {step}"));
    }
    if !without_progress(r) && !repeated {
        context.push(counts(r));
    }
    if !context.is_empty() {
        message.push_str(&format!(" ({})", context.join("; ")));
    }
    // What took over, unless the reason already says so.
    if let Some(t) = then {
        let said = t.release.is_some_and(|n| {
            r.reason
                .as_deref()
                .is_some_and(|reason| mentions_release(reason, n))
        });
        let to = t.release.map_or_else(String::new, |n| format!(" to v{n}"));
        let back = t
            .release
            .map_or_else(String::new, |n| format!(" back to v{n}"));
        if !said {
            message.push_str(&match t.kind.as_deref() {
                Some("auto_rollback") => format!("; automatically rolled back{to}"),
                Some("cancel") => format!("; {label} went{back}"),
                Some(kind) => format!("; then a {kind}{to}"),
                None => format!("; then a rollout{to}"),
            });
        }
    }
    let mut detail = ErrorDetail::new(ErrorKind::Conflict, message);
    if then.is_some() {
        detail = detail.with_next("verge rollout list");
    }
    detail = detail.with_next("verge events").with_next("verge status");
    if then.is_none()
        && r.state != "canceled"
        && let Some(from) = r.from_release.filter(|f| *f != number)
    {
        detail = detail.with_next(format!("verge rollback v{from}  (to go back)"));
    }
    Failure(detail)
}

/// For control planes without rollout progress: `rollout in_progress (1
/// of 2 instance(s) running); web 1/2 running (pending: REASON)`.
fn progress_text(s: &Status) -> String {
    let mut text = format!("rollout {}", s.rollout.state);
    if let Some(reason) = &s.rollout.reason {
        text = format!("{text} ({reason})");
    }
    let workloads = workload_summary(s);
    if !workloads.is_empty() {
        text = format!("{text}; {workloads}");
    }
    text
}

/// `web 0/2 running (pending: REASON), worker 1/1 running`.
fn workload_summary(s: &Status) -> String {
    let parts: Vec<String> = s
        .workloads
        .iter()
        .map(|w| {
            let mut part = format!("{} {}/{} running", w.name, w.running, w.desired);
            if let Some(i) = w
                .instances
                .iter()
                .find(|i| i.state != "running" && i.reason.is_some())
            {
                let reason = i.reason.as_deref().unwrap_or_default();
                part = format!("{part} ({}: {reason})", i.state);
            }
            part
        })
        .collect();
    parts.join(", ")
}

fn timed_out(
    label: &str,
    goal: Option<&ReleaseRef>,
    last: Option<&Status>,
    timeout: Duration,
) -> Failure {
    let on = goal.map_or_else(
        || "its current release".to_string(),
        |g| format!("v{}", g.number),
    );
    let state = match last {
        Some(s) if !without_progress(&s.rollout) && s.rollout.step.is_some() => {
            let step = s.rollout.step.as_deref().unwrap_or_default();
            let mut text = format!("{}; step: {step}", counts(&s.rollout));
            if !s.workloads.is_empty() {
                text = format!("{}; {text}", workload_summary(s));
            }
            text
        }
        Some(s) if !s.workloads.is_empty() => workload_summary(s),
        Some(s) => progress_text(s),
        None => "the control plane did not answer".into(),
    };
    Failure(
        ErrorDetail::new(
            ErrorKind::Timeout,
            format!(
                "timed out after {} waiting for {label} to converge on {on}: {state}",
                humantime::format_duration(timeout)
            ),
        )
        .with_next("verge status")
        .with_next("verge events --follow"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(release: i64, kind: &str, state: &str) -> Rollout {
        Rollout {
            state: state.into(),
            id: Some(format!("ro_{release}_{kind}")),
            release: Some(release),
            from_release: Some(release - 1),
            kind: Some(kind.into()),
            total: 2,
            ..Rollout::default()
        }
    }

    fn failed_v3() -> Rollout {
        let mut r = rollout(3, "deploy", "failed");
        r.category = Some("health".into());
        r.reason = Some("instance i_2 of web is unhealthy".into());
        r.step = Some("waiting for i_2 on dev to be healthy".into());
        r.done = 1;
        r.failed = 1;
        r
    }

    #[test]
    fn a_failed_rollout_names_category_reason_step_and_way_back() {
        let f = rollout_failed("hello/prod", 3, &failed_v3(), None).0;
        assert_eq!(f.kind, ErrorKind::Conflict);
        assert_eq!(
            f.message,
            "rollout of v3 to hello/prod failed (health): instance i_2 of web is unhealthy \
             (step: waiting for i_2 on dev to be healthy; 1/2 done, 1 failed)"
        );
        assert_eq!(
            f.next,
            [
                "verge events",
                "verge status",
                "verge rollback v2  (to go back)"
            ]
        );
    }

    #[test]
    fn an_automatic_rollback_is_reported_instead_of_not_current() {
        let mut back = rollout(2, "auto_rollback", "in_progress");
        back.from_release = Some(3);
        let rollouts = [back.clone(), failed_v3(), rollout(2, "deploy", "completed")];
        // Seen while waiting (by ID), or found by release number.
        for id in [Some("ro_3_deploy"), None] {
            let f = explain_superseded("hello/prod", 3, &rollouts, id)
                .expect("explained")
                .0;
            assert!(
                f.message
                    .starts_with("rollout of v3 to hello/prod failed (health): ")
                    && f.message.ends_with("; automatically rolled back to v2"),
                "{}",
                f.message
            );
            assert_eq!(f.next[0], "verge rollout list");
            assert!(!f.next.iter().any(|n| n.starts_with("verge rollback")));
        }
        // A cancel.
        let mut canceled = failed_v3();
        canceled.state = "canceled".into();
        canceled.category = None;
        canceled.reason = Some("by admin: too slow".into());
        back.kind = Some("cancel".into());
        let f = explain_superseded("hello/prod", 3, &[back, canceled], None)
            .unwrap()
            .0;
        assert_eq!(
            f.message,
            "rollout of v3 to hello/prod was canceled: by admin: too slow \
             (step: waiting for i_2 on dev to be healthy; 1/2 done, 1 failed); hello/prod went back to v2"
        );
    }

    #[test]
    fn what_the_reason_already_says_is_not_repeated() {
        // As the control plane words them.
        let mut failed = failed_v3();
        failed.reason = Some(
            "no progress for 5m: 0 of 2 instance(s) ready; failed at: waiting for i_2 on dev \
             to be healthy (health); the env keeps serving from what was running; rolled back \
             automatically to v2 (auto_rollback)"
                .into(),
        );
        let mut back = rollout(2, "auto_rollback", "in_progress");
        back.from_release = Some(3);
        let f = explain_superseded("hello/prod", 3, &[back, failed.clone()], None)
            .unwrap()
            .0;
        assert_eq!(
            f.message,
            format!(
                "rollout of v3 to hello/prod failed (health): {}",
                failed.reason.unwrap()
            )
        );
        assert_eq!(
            f.next,
            ["verge rollout list", "verge events", "verge status"]
        );
    }

    #[test]
    fn a_release_replaced_otherwise_is_only_not_current() {
        // Its rollout completed; then another deploy.
        let rollouts = [
            rollout(4, "deploy", "in_progress"),
            rollout(3, "deploy", "completed"),
        ];
        assert!(explain_superseded("hello/prod", 3, &rollouts, Some("ro_3_deploy")).is_none());
        // An old failure of v3 that nothing took over from directly.
        let mut later = rollout(5, "deploy", "completed");
        later.from_release = Some(4);
        let rollouts = [later, failed_v3()];
        assert!(explain_superseded("hello/prod", 3, &rollouts, None).is_none());
        // No rollout of v3 at all (an older control plane).
        assert!(explain_superseded("hello/prod", 3, &[], None).is_none());
    }

    #[test]
    fn the_bar_shows_failures_and_the_step() {
        let mut r = failed_v3();
        r.state = "in_progress".into();
        r.outgoing = 1;
        assert_eq!(
            bar_message(&r),
            "1 failed, 1 old still running — waiting for i_2 on dev to be healthy"
        );
        r.step = None;
        assert_eq!(
            bar_message(&r),
            "1 failed, 1 old still running — instance i_2 of web is unhealthy"
        );
    }
}
