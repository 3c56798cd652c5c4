//! `verge deploy`, `verge rollback`, `verge scale`: changes of an env's
//! desired state. Each prints the server's receipt (SPEC §4) and, with
//! `--wait`, then waits like `verge wait` for the receipt's release.

use std::collections::BTreeMap;

use verge_api::manifest::{self, Manifest};
use verge_api::names;
use verge_api::release::{Action, Change, ChangeKind, Plan, Receipt};
use verge_api::requests::{Deploy, Rollback, Scale};
use verge_api::status::ScaleOverride;
use verge_api::{ErrorDetail, ErrorKind};

use super::{Failure, Result, bad_request, next_lines, releases, wait};
use crate::args::{DeployArgs, RollbackArgs, ScaleArgs, WaitOpts};
use crate::context::{Context, EnvNames};
use crate::output::Output;

pub async fn deploy(ctx: &Context, args: DeployArgs, out: &Output) -> Result {
    let file = args.file.display().to_string();
    let text = std::fs::read_to_string(&args.file).map_err(|e| {
        let mut d = ErrorDetail::new(ErrorKind::BadRequest, format!("cannot read {file}: {e}"));
        if e.kind() == std::io::ErrorKind::NotFound {
            d = d
                .with_next("pass -f FILE naming the manifest")
                .with_next("verge init to write an example verge.toml");
        }
        Failure(d)
    })?;
    let manifest = manifest::parse(&file, &text).map_err(|errors| Failure(errors.detail(&file)))?;
    if let Some(app) = ctx.explicit_app()
        && app != manifest.app
    {
        return Err(Failure(
            ErrorDetail::new(
                ErrorKind::BadRequest,
                format!(
                    "--app {app} (or VERGE_APP) differs from app = {:?} in {file}",
                    manifest.app
                ),
            )
            .with_next(format!(
                "drop --app (and unset VERGE_APP): {file} deploys app {}",
                manifest.app
            )),
        ));
    }
    let images = images(&manifest, &file, &args.images)?;
    // The app is the manifest's, whatever ./verge.toml or the profile says.
    let names = ctx
        .env_names_for(ctx.org().await?, manifest.app.clone())
        .await?;
    // The server refuses the deploy (409) if another one became current since.
    let base = ctx
        .client
        .describe_env(names.scope())
        .await?
        .release
        .map(|r| r.id)
        .unwrap_or_default();
    let body = Deploy {
        manifest: text,
        file,
        images,
        base: Some(base),
        dry_run: args.dry_run,
    };
    let receipt = ctx.client.deploy(names.scope(), &body).await?;
    if args.dry_run && !receipt.dry_run {
        // A control plane that ignored the flag made the change: say so loudly.
        out.one(&receipt, render_receipt);
        return Err(Failure(
            ErrorDetail::new(
                ErrorKind::Internal,
                format!(
                    "the control plane did not honour --dry-run: release {} was deployed to {}",
                    receipt.release.label(),
                    names.label()
                ),
            )
            .with_next("verge status")
            .with_next("verge releases"),
        ));
    }
    finish(ctx, &names, receipt, &args.wait, out).await
}

/// `--image` values as workload → image, checked against the manifest.
fn images(manifest: &Manifest, file: &str, args: &[String]) -> Result<BTreeMap<String, String>> {
    let workloads: Vec<&str> = manifest.workloads.keys().map(String::as_str).collect();
    let listed = workloads.join(", ");
    let mut images = BTreeMap::new();
    for arg in args {
        let (workload, image) = match arg.split_once('=') {
            Some((w, image)) => {
                if !manifest.workloads.contains_key(w) {
                    return Err(bad_request(format!(
                        "--image {arg}: {file} has no workload {w:?}; its workloads: {listed}"
                    )));
                }
                (w.to_string(), image.to_string())
            }
            None => match workloads.as_slice() {
                [only] => (only.to_string(), arg.clone()),
                _ => {
                    return Err(Failure(
                        ErrorDetail::new(
                            ErrorKind::BadRequest,
                            format!(
                                "--image {arg} names no workload, and {file} has {}: {listed}",
                                workloads.len()
                            ),
                        )
                        .with_next("pass --image WORKLOAD=IMAGE"),
                    ));
                }
            },
        };
        if image.trim().is_empty() {
            return Err(bad_request(format!("--image {arg}: the image is empty")));
        }
        if images.insert(workload.clone(), image).is_some() {
            return Err(bad_request(format!(
                "--image is given twice for workload {workload}"
            )));
        }
    }
    Ok(images)
}

pub async fn rollback(ctx: &Context, args: RollbackArgs, out: &Output) -> Result {
    releases::check_release_name(&args.release)?;
    let names = ctx.env_names().await?;
    let body = Rollback {
        release: args.release,
        reason: args.reason,
    };
    let receipt = ctx.client.rollback(names.scope(), &body).await?;
    finish(ctx, &names, receipt, &args.wait, out).await
}

pub async fn scale(ctx: &Context, args: ScaleArgs, out: &Output) -> Result {
    let resources_only = args.cpu.is_some() || args.memory.is_some();
    let mut workloads = BTreeMap::new();
    for arg in &args.workloads {
        let (name, count) = match arg.split_once('=') {
            Some((name, n)) => {
                let count = n.parse::<u32>().map_err(|_| {
                    bad_request(format!(
                        "{arg}: the count must be a whole number from 0, like {name}=3"
                    ))
                })?;
                (name, Some(count))
            }
            None if resources_only => (arg.as_str(), None),
            None => {
                return Err(Failure(
                    ErrorDetail::new(
                        ErrorKind::BadRequest,
                        format!("{arg} gives no instance count"),
                    )
                    .with_next(format!("verge scale {arg}=N"))
                    .with_next(format!(
                        "verge scale {arg} --cpu C --memory M to change only resources"
                    )),
                ));
            }
        };
        names::validate("workload", name).map_err(bad_request)?;
        let change = ScaleOverride {
            count,
            cpu: args.cpu,
            memory: args.memory,
        };
        if workloads.insert(name.to_string(), change).is_some() {
            return Err(bad_request(format!("workload {name} is given twice")));
        }
    }
    let names = ctx.env_names().await?;
    let receipt = ctx
        .client
        .scale(names.scope(), &Scale { workloads })
        .await?;
    finish(ctx, &names, receipt, &args.wait, out).await
}

/// Prints the receipt; with `--wait`, then waits for its release. Under
/// `-o json` the receipt stays the one document on stdout.
async fn finish(
    ctx: &Context,
    names: &EnvNames,
    receipt: Receipt,
    wait: &WaitOpts,
    out: &Output,
) -> Result {
    out.one(&receipt, render_receipt);
    if wait.wait {
        let status =
            wait::wait_for(ctx, names, Some(receipt.release.clone()), wait.timeout, out).await?;
        if !out.is_json() {
            println!("{}", wait::converged(names, &status));
        }
    }
    Ok(())
}

/// The receipt for people: what happened, the diff, desired scale, next
/// steps; for a dry run, first that nothing changed, and the plan.
pub fn render_receipt(r: &Receipt) -> String {
    let at = format!("{}/{}", r.target.app, r.target.env);
    let release = r.release.label();
    let mut lines = if r.dry_run {
        let now = r.previous.as_ref().map_or_else(
            || "no release yet".to_string(),
            |p| format!("now on v{}", p.number),
        );
        vec![
            "dry run: nothing was changed, no release created".to_string(),
            if r.unchanged {
                format!("a deploy would change nothing: {at} stays on {release}")
            } else {
                format!("a deploy to {at} ({now}) would change:")
            },
        ]
    } else {
        vec![match (r.action, r.unchanged) {
            (Action::Scale, true) => {
                format!("unchanged: {at} stays on {release}; nothing to change")
            }
            (_, true) => format!("unchanged: {at} stays on {release}; no release was created"),
            (Action::Deploy, false) => format!("deployed {at}: release {release}"),
            (Action::Rollback, false) => format!("rolled back {at} to {release}"),
            (Action::Scale, false) => format!("scaled {at} (release v{})", r.release.number),
        }]
    };
    changes("workloads", &r.diff.workloads, &mut lines);
    changes("endpoints", &r.diff.endpoints, &mut lines);
    if !r.diff.config.is_empty() {
        lines.push("config:".into());
        lines.extend(r.diff.config.iter().map(|c| format!("  {c}")));
        // A bundle version reaches instances only through a release: say
        // when, since `verge secrets set` alone changed nothing that runs.
        for c in r
            .diff
            .config
            .iter()
            .filter(|c| c.field.starts_with("secrets."))
        {
            let bundle = &c.field["secrets.".len()..];
            let version =
                |v: &Option<String>| v.as_ref().map_or("none".into(), |v| format!("v{v}"));
            lines.push(format!(
                "  secret bundle {bundle}: {} takes effect with this release's instances (until they replace the running ones, those keep {})",
                version(&c.new),
                version(&c.old)
            ));
        }
    }
    if !r.desired.is_empty() {
        let desired: Vec<String> = r.desired.iter().map(|(w, n)| format!("{w}={n}")).collect();
        lines.push(format!("desired: {}", desired.join(", ")));
    }
    if let Some(plan) = &r.plan {
        plan_lines(plan, &mut lines);
    }
    lines.join("\n") + &next_lines(&r.follow_ups)
}

/// `plan:`, then per workload each slot's node (or why none fits) and the
/// running instances the release would replace.
fn plan_lines(plan: &Plan, lines: &mut Vec<String>) {
    lines.push("plan:".into());
    if plan.workloads.is_empty() {
        lines.push("  (no workloads)".into());
    }
    for w in &plan.workloads {
        lines.push(format!("  {}: {} instance(s)", w.name, w.count));
        for p in &w.placements {
            let to = match (&p.node, &p.reason) {
                (Some(node), _) => node.clone(),
                (None, Some(reason)) => format!("cannot place: {reason}"),
                (None, None) => "cannot place".into(),
            };
            lines.push(format!("    slot {} → {to}", p.slot));
        }
        for stop in &w.replaces {
            let mut text = format!("    replaces {}", stop.instance);
            if let Some(node) = &stop.node {
                text.push_str(&format!(" on {node}"));
            }
            if let Some(n) = stop.release {
                text.push_str(&format!(" (v{n})"));
            }
            lines.push(text);
        }
    }
}

/// `+ name` with its fields below, `- name`, `~ name: field: old → new, ...`.
fn changes(title: &str, list: &[Change], lines: &mut Vec<String>) {
    if list.is_empty() {
        return;
    }
    lines.push(format!("{title}:"));
    for c in list {
        match c.change {
            ChangeKind::Added => {
                lines.push(format!("  + {}", c.name));
                lines.extend(c.fields.iter().map(|f| {
                    format!(
                        "      {}: {}",
                        f.field,
                        f.new.as_deref().unwrap_or("(none)")
                    )
                }));
            }
            ChangeKind::Removed => lines.push(format!("  - {}", c.name)),
            ChangeKind::Changed => {
                let fields: Vec<String> = c.fields.iter().map(ToString::to_string).collect();
                lines.push(format!("  ~ {}: {}", c.name, fields.join(", ")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use verge_api::release::{
        Diff, FieldChange, PlannedPlacement, PlannedStop, ReleaseRef, Target, WorkloadPlan,
    };

    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            action: Action::Deploy,
            target: Target {
                org: "dev".into(),
                project: "default".into(),
                app: "hello".into(),
                env: "prod".into(),
            },
            release: ReleaseRef {
                id: "rel_3".into(),
                number: 3,
                env: "prod".into(),
            },
            previous: Some(ReleaseRef {
                id: "rel_2".into(),
                number: 2,
                env: "prod".into(),
            }),
            unchanged: false,
            diff: Diff {
                workloads: vec![Change {
                    name: "web".into(),
                    change: ChangeKind::Changed,
                    fields: vec![FieldChange {
                        field: "count".into(),
                        old: Some("1".into()),
                        new: Some("2".into()),
                    }],
                }],
                ..Diff::default()
            },
            desired: BTreeMap::from([("web".to_string(), 2)]),
            follow_ups: vec![],
            dry_run: true,
            plan: Some(Plan {
                workloads: vec![WorkloadPlan {
                    name: "web".into(),
                    count: 2,
                    placements: vec![
                        PlannedPlacement {
                            slot: 0,
                            node: Some("dev".into()),
                            reason: None,
                        },
                        PlannedPlacement {
                            slot: 1,
                            node: None,
                            reason: Some("node dev: insufficient memory".into()),
                        },
                    ],
                    replaces: vec![PlannedStop {
                        instance: "i_1".into(),
                        node: Some("dev".into()),
                        release: Some(2),
                    }],
                }],
            }),
        }
    }

    #[test]
    fn a_dry_run_says_nothing_changed_and_shows_the_plan() {
        assert_eq!(
            render_receipt(&receipt()),
            "dry run: nothing was changed, no release created\n\
             a deploy to hello/prod (now on v2) would change:\n\
             workloads:\n  ~ web: count: 1 → 2\n\
             desired: web=2\n\
             plan:\n  web: 2 instance(s)\n    slot 0 → dev\n    \
             slot 1 → cannot place: node dev: insufficient memory\n    \
             replaces i_1 on dev (v2)"
        );
    }

    #[test]
    fn an_unchanged_dry_run_changes_nothing() {
        let mut r = receipt();
        r.unchanged = true;
        r.release = r.previous.clone().unwrap();
        r.diff = Diff::default();
        r.plan = None;
        assert_eq!(
            render_receipt(&r),
            "dry run: nothing was changed, no release created\n\
             a deploy would change nothing: hello/prod stays on v2 (rel_2)\n\
             desired: web=2"
        );
    }

    #[test]
    fn a_real_deploy_reads_as_before() {
        let mut r = receipt();
        r.dry_run = false;
        r.plan = None;
        assert!(render_receipt(&r).starts_with("deployed hello/prod: release v3 (rel_3)\n"));
    }
}
