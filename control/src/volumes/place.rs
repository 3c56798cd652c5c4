//! Which node a new volume goes to. Pure and deterministic, like
//! [`crate::scheduler`]: the node is online and not draining, carries the
//! asked `region` label, and has the free space (as its last heartbeat
//! reported it, less volumes made since); among those, the one with the
//! most free space, then the first by name. When none fits, the answer
//! names each node's problem and the fix for the most common one.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use verge_api::manifest::human_size;

use crate::scheduler::REGION;
use crate::store::NodeRow;
use crate::time::rfc3339;

/// A node as volume placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    /// `None` while online; when it went offline otherwise (RFC 3339).
    pub offline_since: Option<String>,
    /// Draining or drained: no new volumes.
    pub draining: bool,
    pub region: Option<String>,
    /// Bytes free for new volumes; `None` before its first heartbeat.
    pub free: Option<u64>,
}

impl Candidate {
    /// The node as stored, less `pending` bytes of volumes made since its
    /// last heartbeat.
    pub fn of(n: &NodeRow, pending: u64) -> Candidate {
        let labels: BTreeMap<String, String> = serde_json::from_str(&n.labels).unwrap_or_default();
        let free = n
            .usage
            .as_deref()
            .and_then(|u| serde_json::from_str::<verge_api::wire::Usage>(u).ok())
            .map(|u| u.volumes_free.saturating_sub(pending));
        Candidate {
            id: n.id.clone(),
            name: n.name.clone(),
            offline_since: (n.state != "online").then(|| rfc3339(n.state_since)),
            draining: n.drain.is_some(),
            region: labels.get(REGION).cloned(),
            free,
        }
    }
}

/// Why a node cannot take the volume, by kind, for summaries and fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    Offline,
    Draining,
    Region,
    Unreported,
    Space,
}

fn unfit(n: &Candidate, size: u64, region: Option<&str>) -> Option<(Problem, String)> {
    if let Some(since) = &n.offline_since {
        return Some((Problem::Offline, format!("offline since {since}")));
    }
    if n.draining {
        return Some((Problem::Draining, "draining".into()));
    }
    if let Some(want) = region
        && n.region.as_deref() != Some(want)
    {
        let why = match &n.region {
            Some(have) => format!("region={have} not {want}"),
            None => format!("no region label (asked region={want})"),
        };
        return Some((Problem::Region, why));
    }
    match n.free {
        None => Some((
            Problem::Unreported,
            "has not reported its free space yet (no heartbeat since it joined)".into(),
        )),
        Some(free) if free < size => Some((
            Problem::Space,
            format!(
                "only {} free of {} asked",
                human_size(free),
                human_size(size)
            ),
        )),
        Some(_) => None,
    }
}

/// The node for a volume of `size` bytes (in `region` when given), or
/// why there is none.
pub fn choose<'a>(
    nodes: &'a [Candidate],
    size: u64,
    region: Option<&str>,
) -> Result<&'a Candidate, String> {
    nodes
        .iter()
        .filter(|n| unfit(n, size, region).is_none())
        .min_by_key(|n| (Reverse(n.free), &n.name))
        .ok_or_else(|| explain(nodes, size, region))
}

/// Every node's problem (the first few by name, then counts), and the fix
/// for the most common one.
fn explain(nodes: &[Candidate], size: u64, region: Option<&str>) -> String {
    if nodes.is_empty() {
        return "no nodes have joined the cluster; to fix: join one with `verge nodes join-token`"
            .into();
    }
    let mut sorted: Vec<&Candidate> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let problems: Vec<(&str, Problem, String)> = sorted
        .into_iter()
        .filter_map(|n| unfit(n, size, region).map(|(p, why)| (n.name.as_str(), p, why)))
        .collect();
    crate::scheduler::summarise(&problems, problem_name, |p| fix(p, size, region))
}

fn problem_name(p: Problem) -> &'static str {
    match p {
        Problem::Offline => "offline",
        Problem::Draining => "draining",
        Problem::Region => "in another region",
        Problem::Unreported => "without a report",
        Problem::Space => "without the space",
    }
}

fn fix(p: Problem, size: u64, region: Option<&str>) -> String {
    match p {
        Problem::Offline => {
            "bring the offline nodes back (or join another node: `verge nodes join-token`)".into()
        }
        Problem::Draining => "undrain a node (`verge nodes undrain NODE`) or join another".into(),
        Problem::Region => format!(
            "join a node with --label region={}, or create the volume in another region (--region)",
            region.unwrap_or("REGION")
        ),
        Problem::Unreported => "wait a few seconds for the nodes' heartbeats and retry".into(),
        Problem::Space => format!(
            "ask for less (--size), free space on a node (delete unused volumes and snapshots), \
             or join a node with {} free for volumes",
            human_size(size)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, region: Option<&str>, free: Option<u64>) -> Candidate {
        Candidate {
            id: format!("id-{name}"),
            name: name.into(),
            offline_since: None,
            draining: false,
            region: region.map(String::from),
            free,
        }
    }

    #[test]
    fn picks_the_most_free_space_then_the_name() {
        let nodes = [
            node("c", None, Some(5 * GI)),
            node("a", None, Some(5 * GI)),
            node("b", None, Some(2 * GI)),
        ];
        assert_eq!(choose(&nodes, GI, None).unwrap().name, "a");
        assert_eq!(choose(&nodes[2..], GI, None).unwrap().name, "b");
    }

    #[test]
    fn explains_each_node_and_fixes_the_most_common_problem() {
        let mut off = node("a", Some("eu"), Some(10 * GI));
        off.offline_since = Some("2026-11-22T10:00:00Z".into());
        let mut drain = node("b", Some("eu"), Some(10 * GI));
        drain.draining = true;
        let nodes = [
            off,
            drain,
            node("c", Some("us"), Some(10 * GI)),
            node("d", Some("eu"), Some(512 << 20)),
            node("e", Some("eu"), Some(256 << 20)),
            node("f", Some("eu"), None),
        ];
        let err = choose(&nodes, GI, Some("eu")).unwrap_err();
        assert!(
            err.contains("node a: offline since 2026-11-22T10:00:00Z; node b: draining"),
            "{err}"
        );
        assert!(err.contains("node c: region=us not eu"), "{err}");
        assert!(
            err.contains("node d: only 512Mi free of 1Gi asked"),
            "{err}"
        );
        assert!(
            err.contains("node f: has not reported its free space"),
            "{err}"
        );
        assert!(err.contains("to fix: ask for less (--size)"), "{err}");
        let err = choose(&nodes[2..3], GI, Some("ap")).unwrap_err();
        assert!(
            err.contains("to fix: join a node with --label region=ap"),
            "{err}"
        );
    }

    #[test]
    fn no_nodes_says_how_to_add_one() {
        let err = choose(&[], GI, None).unwrap_err();
        assert!(err.contains("no nodes have joined the cluster"), "{err}");
        assert!(err.contains("verge nodes join-token"), "{err}");
    }

    #[test]
    fn summarises_large_clusters() {
        let nodes: Vec<Candidate> = (0..40)
            .map(|i| node(&format!("n{i:02}"), None, Some(GI / 2)))
            .collect();
        let err = choose(&nodes, GI, None).unwrap_err();
        assert!(
            err.contains("and 34 more nodes (34 without the space)"),
            "{err}"
        );
        assert!(err.len() < 800, "{err}");
    }

    #[test]
    fn free_space_comes_from_the_last_heartbeat_less_what_is_pending() {
        let row = NodeRow {
            id: "n_1".into(),
            name: "one".into(),
            labels: r#"{"region":"eu"}"#.into(),
            cpu_millis: 1000,
            memory: GI as i64,
            usage: Some(r#"{"cpu":0.1,"memory":1,"images":0,"volumes_free":3221225472}"#.into()),
            isolation: "namespaces".into(),
            version: "t".into(),
            state: "online".into(),
            state_since: 0,
            last_seen: Some(0),
            prefix_index: 1,
            instance_prefix: "fd00::/64".into(),
            cert_sha256: "x".into(),
            joined_at: 0,
            desired_version: 0,
            applied_version: 0,
            drain: None,
            drain_deadline: None,
            used_cpu_millis: 0,
            used_memory: 0,
            behind_nat: 0,
        };
        let c = Candidate::of(&row, GI);
        assert_eq!(c.free, Some(2 * GI));
        assert_eq!(c.region.as_deref(), Some("eu"));
        assert_eq!(c.offline_since, None);
        let old = NodeRow {
            usage: Some(r#"{"cpu":0.1,"memory":1,"images":0}"#.into()),
            ..row
        };
        assert_eq!(Candidate::of(&old, 0).free, Some(0));
    }
}
