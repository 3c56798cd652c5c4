//! `verge rollout list / cancel`, and how a rollout reads for people (in
//! `verge status`, `verge describe env` and the progress of `verge wait`).

use verge_api::status::{CancelRollout, Rollout};

use super::{Result, next_lines, or_dash};
use crate::args::RolloutCmd;
use crate::context::{Context, EnvNames};
use crate::output::Output;

pub async fn run(ctx: &Context, cmd: RolloutCmd, out: &Output) -> Result {
    let names = ctx.env_names().await?;
    match cmd {
        RolloutCmd::List => {
            let rollouts = ctx.client.list_rollouts(names.scope()).await?;
            out.list(
                &rollouts,
                &[
                    "release", "from", "kind", "state", "done", "failed", "category", "step",
                    "started",
                ],
                |r| {
                    vec![
                        release_label(r.release),
                        release_label(r.from_release),
                        or_dash(r.kind.as_deref()),
                        r.state.clone(),
                        format!("{}/{}", r.done, r.total),
                        r.failed.to_string(),
                        or_dash(failure_category(r)),
                        or_dash(r.step.as_deref()),
                        or_dash(r.started_at.as_deref()),
                    ]
                },
            );
        }
        RolloutCmd::Cancel { reason } => {
            let rollout = ctx
                .client
                .cancel_rollout(names.scope(), &CancelRollout { reason })
                .await?;
            out.one(&rollout, |r| canceled_text(&names, r));
        }
    }
    Ok(())
}

/// `v3`, or `-` for none.
fn release_label(number: Option<i64>) -> String {
    number.map_or_else(|| "-".into(), |n| format!("v{n}"))
}

/// What `verge rollout cancel` did: the canceled rollout, where the env
/// goes now, and what to run next.
pub fn canceled_text(names: &EnvNames, r: &Rollout) -> String {
    let label = names.label();
    let what = match r.release {
        Some(n) => format!("the rollout of v{n} to {label}"),
        None => format!("the rollout of {label}"),
    };
    let mut lines = vec![if r.state == "canceled" {
        format!("canceled {what}")
    } else {
        format!("{what} is {}", r.state)
    }];
    lines.push(rollout_line(r));
    let mut next = Vec::new();
    match r.from_release.filter(|f| Some(*f) != r.release) {
        Some(from) => {
            lines.push(format!("{label} goes back to v{from}"));
            next.push(format!("verge wait v{from}"));
        }
        None => lines.push(format!(
            "{label} has nothing to go back to: the instances started so far keep running"
        )),
    }
    next.extend(["verge status".to_string(), "verge events".to_string()]);
    lines.join("\n") + &next_lines(&next)
}

/// One line for a rollout: `rollout v3 (deploy from v2): in_progress 1/2
/// done, 0 failed — step: STEP`, with the failure category after the state
/// and the reason (of a pending or ended one) at the end. A rollout of a control plane
/// that sends no progress (no ID, no release) reads `rollout STATE: REASON`.
pub fn rollout_line(r: &Rollout) -> String {
    if r.id.is_none() && r.release.is_none() {
        return match &r.reason {
            Some(reason) => format!("rollout {}: {reason}", r.state),
            None => format!("rollout {}", r.state),
        };
    }
    let mut text = match r.release {
        Some(n) => format!("rollout v{n}"),
        None => "rollout".to_string(),
    };
    // A scale rolls out the release the env is on: no "from".
    let from = r.from_release.filter(|f| Some(*f) != r.release);
    match (r.kind.as_deref(), from) {
        (Some(kind), Some(from)) => text.push_str(&format!(" ({kind} from v{from})")),
        (Some(kind), None) => text.push_str(&format!(" ({kind})")),
        (None, Some(from)) => text.push_str(&format!(" (from v{from})")),
        (None, None) => {}
    }
    text.push_str(&format!(": {}", r.state));
    if let Some(category) = failure_category(r) {
        text.push_str(&format!(" ({category})"));
    }
    text.push_str(&format!(" {}", counts(r)));
    if let Some(step) = shown_step(r) {
        text.push_str(&format!(" — step: {step}"));
    }
    // An `in_progress` rollout's reason only repeats the counts.
    if let Some(reason) = &r.reason
        && !matches!(r.state.as_str(), "completed" | "in_progress")
    {
        text.push_str(&format!("; {reason}"));
    }
    text
}

/// The error category of a rollout that ended `failed`, `partial` or
/// `canceled`. An active rollout's category is the one it would fail with
/// at its step: not a failure, so not shown.
pub fn failure_category(r: &Rollout) -> Option<&str> {
    r.category.as_deref().filter(|_| r.is_final_failure())
}

/// The step worth showing: none once completed, nor when the reason
/// already names it.
pub fn shown_step(r: &Rollout) -> Option<&str> {
    let step = r.step.as_deref()?;
    let repeated = r
        .reason
        .as_deref()
        .is_some_and(|reason| reason.contains(step));
    (!r.is_completed() && !repeated).then_some(step)
}

/// Whether `text` names release `vN` (not `vN0`, ...).
pub fn mentions_release(text: &str, number: i64) -> bool {
    let label = format!("v{number}");
    text.match_indices(&label).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + label.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

/// `1/2 done, 0 failed` and, while some remain, `, 1 old still running`.
pub fn counts(r: &Rollout) -> String {
    let mut text = format!("{}/{} done, {} failed", r.done, r.total, r.failed);
    if r.outgoing > 0 {
        text.push_str(&format!(", {} old still running", r.outgoing));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(state: &str) -> Rollout {
        Rollout {
            state: state.into(),
            id: Some("ro_1".into()),
            release: Some(3),
            from_release: Some(2),
            kind: Some("deploy".into()),
            total: 2,
            ..Rollout::default()
        }
    }

    #[test]
    fn an_active_rollout_shows_counts_and_step() {
        let mut r = rollout("in_progress");
        r.done = 1;
        r.step = Some("starting instance i_2 on dev".into());
        r.reason = Some("1 of 2 instance(s) ready".into());
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (deploy from v2): in_progress 1/2 done, 0 failed — step: starting instance i_2 on dev"
        );
        r.outgoing = 1;
        r.step = None;
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (deploy from v2): in_progress 1/2 done, 0 failed, 1 old still running"
        );
    }

    #[test]
    fn a_failed_rollout_shows_category_step_and_reason() {
        let mut r = rollout("failed");
        r.failed = 1;
        r.done = 1;
        r.category = Some("health".into());
        r.step = Some("waiting for i_2 on dev to be healthy".into());
        r.reason = Some("instance i_2 of web is unhealthy: tcp 8080: connection refused".into());
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (deploy from v2): failed (health) 1/2 done, 1 failed — step: waiting for i_2 on dev to be healthy; instance i_2 of web is unhealthy: tcp 8080: connection refused"
        );
    }

    #[test]
    fn an_active_rollout_hides_its_would_be_category_and_a_repeated_step() {
        let mut r = rollout("in_progress");
        r.category = Some("image_pull".into());
        r.step = Some("pulling the image of i_2".into());
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (deploy from v2): in_progress 0/2 done, 0 failed — step: pulling the image of i_2"
        );
        r.state = "pending".into();
        r.reason = Some("nothing placed yet: pulling the image of i_2".into());
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (deploy from v2): pending 0/2 done, 0 failed; nothing placed yet: pulling the image of i_2"
        );
    }

    #[test]
    fn releases_are_named_whole() {
        assert!(mentions_release(
            "rolled back automatically to v2 (auto_rollback)",
            2
        ));
        assert!(mentions_release("v2", 2));
        assert!(!mentions_release("rolled back to v21", 2));
        assert!(!mentions_release("rev2", 2));
        assert!(!mentions_release("nothing", 2));
    }

    #[test]
    fn a_completed_rollout_hides_step_and_reason() {
        let mut r = rollout("completed");
        r.done = 2;
        r.kind = Some("scale".into());
        r.from_release = Some(3);
        r.step = Some("done".into());
        assert_eq!(
            rollout_line(&r),
            "rollout v3 (scale): completed 2/2 done, 0 failed"
        );
    }

    #[test]
    fn a_rollout_without_progress_reads_as_before() {
        let r = Rollout {
            state: "pending".into(),
            reason: Some("nothing deployed yet: verge deploy".into()),
            ..Rollout::default()
        };
        assert_eq!(
            rollout_line(&r),
            "rollout pending: nothing deployed yet: verge deploy"
        );
    }

    #[test]
    fn cancel_says_where_the_env_goes() {
        let names = EnvNames {
            org: "dev".into(),
            app: "hello".into(),
            env: "prod".into(),
        };
        let mut r = rollout("canceled");
        r.done = 1;
        let text = canceled_text(&names, &r);
        assert_eq!(
            text,
            "canceled the rollout of v3 to hello/prod\n\
             rollout v3 (deploy from v2): canceled 1/2 done, 0 failed\n\
             hello/prod goes back to v2\n\
             next:\n  verge wait v2\n  verge status\n  verge events"
        );
        r.from_release = None;
        assert!(canceled_text(&names, &r).contains("hello/prod has nothing to go back to"),);
    }
}
