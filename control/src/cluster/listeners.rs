//! What nodes report about their listeners (`NodeMsg::Listeners`: the
//! whole list, on every change and with every heartbeat): stored per node,
//! replacing what it said before, with an event when a listener starts
//! listening, fails to start, or its connections' instances failed since
//! the previous report (at most one such event per listener per report).

use std::collections::BTreeMap;

use verge_api::wire::{ListenerReport, ListenerState};

use super::Cluster;
use crate::reconcile::listeners::parse_listener_id;
use crate::store::{ListenerRow, NewEvent, NodeRow, Result};
use crate::time::now_ms;

/// An event a report calls for: its kind, the listener's row and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenerEvent {
    pub kind: &'static str,
    pub listener: String,
    pub message: String,
}

impl Cluster {
    /// Records a node's listener report; events in the same mutation.
    pub(super) async fn apply_listeners(
        &self,
        node: &NodeRow,
        reports: &[ListenerReport],
    ) -> Result<()> {
        let store = &self.inner.store;
        let before = store.node_listeners(&node.id).await?;
        // Release → env, for the listeners' IDs.
        let mut envs: BTreeMap<String, Option<String>> = BTreeMap::new();
        for r in reports {
            if let Some((release, _)) = parse_listener_id(&r.id)
                && !envs.contains_key(release)
            {
                envs.insert(release.to_string(), store.release_env(release).await?);
            }
        }
        let rows = rows(node, reports, &before, &envs, now_ms());
        if same(&before, &rows) {
            return Ok(());
        }
        let events = events(node, &before, &rows);
        if events.is_empty() {
            return store.replace_listeners(&node.id, &rows).await;
        }
        let mut tx = store.mutation().await?;
        tx.replace_listeners(&node.id, &rows).await?;
        for e in &events {
            let Some(row) = rows.iter().find(|r| r.id == e.listener) else {
                continue;
            };
            let scope = tx.env_scope(&row.env_id).await?;
            tx.emit(NewEvent {
                org_id: scope.as_ref().map(|s| s.org_id.as_str()),
                app_id: scope.as_ref().map(|s| s.app_id.as_str()),
                env_id: Some(&row.env_id),
                release_id: Some(&row.release_id),
                instance_id: Some(&row.id),
                node_id: Some(&node.id),
                kind: e.kind,
                message: e.message.clone(),
                actor: None,
            })
            .await?;
        }
        tx.commit().await
    }
}

/// The rows a report makes: one per listener whose ID names a release the
/// store has (`envs`: release → env). Counters carry `last_failure_at`
/// over from `before` unless `failed` grew; `updated_at` moves when the
/// state changes.
pub(crate) fn rows(
    node: &NodeRow,
    reports: &[ListenerReport],
    before: &[ListenerRow],
    envs: &BTreeMap<String, Option<String>>,
    now: i64,
) -> Vec<ListenerRow> {
    let mut out: Vec<ListenerRow> = Vec::new();
    for r in reports {
        let Some((release, workload)) = parse_listener_id(&r.id) else {
            tracing::debug!(listener = %r.id, "a listener ID that names no release; ignored");
            continue;
        };
        let Some(Some(env_id)) = envs.get(release) else {
            tracing::debug!(listener = %r.id, "a listener of an unknown release; ignored");
            continue;
        };
        if out.iter().any(|o| o.id == r.id) {
            continue;
        }
        let prev = before.iter().find(|b| b.id == r.id);
        let state = r.state.to_string();
        let failed = i64::try_from(r.failed).unwrap_or(i64::MAX);
        let grew = new_failures(prev, failed) > 0;
        out.push(ListenerRow {
            node_id: node.id.clone(),
            node_name: Some(node.name.clone()),
            id: r.id.clone(),
            env_id: env_id.clone(),
            release_id: release.to_string(),
            workload: workload.to_string(),
            message: r.message.clone(),
            address: r.address.clone(),
            active: i64::from(r.active),
            served: i64::try_from(r.served).unwrap_or(i64::MAX),
            failed,
            last_failure: r.last_failure.clone(),
            last_failure_category: r.last_failure_category.map(|c| c.as_str().to_string()),
            last_failure_at: if grew {
                Some(now)
            } else {
                prev.and_then(|p| p.last_failure_at)
            },
            updated_at: match prev {
                Some(p) if p.state == state => p.updated_at,
                _ => now,
            },
            state,
        });
    }
    out
}

/// Failures since the previous report: the growth of the counter, or all
/// of it when the listener is new to the control plane or restarted on
/// its node (its counters started again).
fn new_failures(prev: Option<&ListenerRow>, failed: i64) -> i64 {
    match prev {
        Some(p) if failed >= p.failed => failed - p.failed,
        _ => failed,
    }
}

/// Nothing but the time of the report differs.
fn same(before: &[ListenerRow], after: &[ListenerRow]) -> bool {
    let key = |r: &ListenerRow| {
        let mut r = r.clone();
        r.node_name = None;
        r
    };
    let mut a: Vec<ListenerRow> = before.iter().map(key).collect();
    let mut b: Vec<ListenerRow> = after.iter().map(key).collect();
    a.sort_by(|x, y| x.id.cmp(&y.id));
    b.sort_by(|x, y| x.id.cmp(&y.id));
    a == b
}

/// The events from `before` to `after` on `node`.
pub(crate) fn events(
    node: &NodeRow,
    before: &[ListenerRow],
    after: &[ListenerRow],
) -> Vec<ListenerEvent> {
    let mut out = Vec::new();
    for r in after {
        let prev = before.iter().find(|b| b.id == r.id);
        let was = prev.map(|p| p.state.as_str());
        let what = format!("listener {} of {} on {}", r.id, r.workload, node.name);
        if r.state != was.unwrap_or("") {
            if r.state == ListenerState::Listening.to_string() {
                let at = r
                    .address
                    .as_deref()
                    .map(|a| format!(" at {a}"))
                    .unwrap_or_default();
                out.push(ListenerEvent {
                    kind: "listener.listening",
                    listener: r.id.clone(),
                    message: format!("{what}: listening{at}"),
                });
            } else if r.state == ListenerState::Failed.to_string() {
                let why = r.message.as_deref().unwrap_or("no details");
                out.push(ListenerEvent {
                    kind: "listener.failed",
                    listener: r.id.clone(),
                    message: format!(
                        "{what}: could not start: {why} (the node retries; see `verge logs --instance {}`)",
                        r.id
                    ),
                });
            }
        }
        let n = new_failures(prev, r.failed);
        if n > 0 {
            let category = r
                .last_failure_category
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let last = r.last_failure.as_deref().unwrap_or("no details");
            let plural = if n == 1 { "" } else { "s" };
            out.push(ListenerEvent {
                kind: "listener.connection_failed",
                listener: r.id.clone(),
                message: format!(
                    "per-connection instance of {} on node {} failed{category}: {last} \
                     ({n} failure{plural} since the last report)",
                    r.workload, node.name
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_api::wire::ErrorCategory;

    fn node() -> NodeRow {
        NodeRow {
            id: "n_1".into(),
            name: "n1".into(),
            labels: "{}".into(),
            cpu_millis: 1000,
            memory: 1 << 30,
            usage: None,
            isolation: "namespaces".into(),
            version: "test".into(),
            state: "online".into(),
            state_since: 0,
            last_seen: None,
            prefix_index: 1,
            instance_prefix: "fd00:1::/64".into(),
            cert_sha256: "c".into(),
            joined_at: 0,
            desired_version: 0,
            applied_version: 0,
            drain: None,
            drain_deadline: None,
            used_cpu_millis: 0,
            used_memory: 0,
            behind_nat: 0,
        }
    }

    fn report(id: &str, state: ListenerState, failed: u64) -> ListenerReport {
        ListenerReport {
            id: id.into(),
            state,
            message: (state == ListenerState::Failed).then(|| "no such artifact".into()),
            address: Some("fd00:1::2".into()),
            active: 1,
            served: 10,
            failed,
            last_failure: (failed > 0).then(|| "trap: unreachable".into()),
            last_failure_category: (failed > 0).then_some(ErrorCategory::Crash),
            at_ms: 0,
        }
    }

    #[test]
    fn reports_make_rows_of_known_releases_and_events_when_things_change() {
        let n = node();
        let envs = BTreeMap::from([
            ("rel_1".to_string(), Some("env_1".to_string())),
            ("rel_gone".to_string(), None),
        ]);
        let first = [
            report("lst-rel_1-echo", ListenerState::Starting, 0),
            report("lst-rel_gone-echo", ListenerState::Listening, 0),
            report("i_123", ListenerState::Listening, 0),
        ];
        let rows1 = rows(&n, &first, &[], &envs, 100);
        assert_eq!(rows1.len(), 1, "{rows1:?}");
        assert_eq!(
            (
                rows1[0].env_id.as_str(),
                rows1[0].release_id.as_str(),
                rows1[0].workload.as_str()
            ),
            ("env_1", "rel_1", "echo")
        );
        assert!(events(&n, &[], &rows1).is_empty(), "starting says nothing");

        let listening = [report("lst-rel_1-echo", ListenerState::Listening, 0)];
        let rows2 = rows(&n, &listening, &rows1, &envs, 200);
        assert_eq!(rows2[0].updated_at, 200);
        let ev = events(&n, &rows1, &rows2);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, "listener.listening");
        assert_eq!(
            ev[0].message,
            "listener lst-rel_1-echo of echo on n1: listening at fd00:1::2"
        );
        // The same again: no event, and nothing to write but the time.
        let rows3 = rows(&n, &listening, &rows2, &envs, 300);
        assert!(events(&n, &rows2, &rows3).is_empty());
        assert!(same(&rows2, &rows3));

        // Three connections failed since: one event, with the count.
        let failing = [report("lst-rel_1-echo", ListenerState::Listening, 3)];
        let rows4 = rows(&n, &failing, &rows3, &envs, 400);
        assert_eq!(rows4[0].last_failure_at, Some(400));
        assert_eq!(rows4[0].updated_at, 200, "the state did not change");
        let ev = events(&n, &rows3, &rows4);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].kind, "listener.connection_failed");
        assert_eq!(
            ev[0].message,
            "per-connection instance of echo on node n1 failed (crash): trap: unreachable \
             (3 failures since the last report)"
        );
        // No new failure: no event, the time of the last one kept.
        let rows5 = rows(&n, &failing, &rows4, &envs, 500);
        assert!(events(&n, &rows4, &rows5).is_empty());
        assert_eq!(rows5[0].last_failure_at, Some(400));
        // The listener restarted on its node (counters from 0): 1 new.
        let restarted = [report("lst-rel_1-echo", ListenerState::Listening, 1)];
        let rows6 = rows(&n, &restarted, &rows5, &envs, 600);
        let ev = events(&n, &rows5, &rows6);
        assert!(ev[0].message.ends_with("(1 failure since the last report)"));

        // It could not start: one event.
        let failed = [report("lst-rel_1-echo", ListenerState::Failed, 1)];
        let rows7 = rows(&n, &failed, &rows6, &envs, 700);
        let ev = events(&n, &rows6, &rows7);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, "listener.failed");
        assert!(
            ev[0].message.contains("could not start: no such artifact"),
            "{}",
            ev[0].message
        );
    }
}
