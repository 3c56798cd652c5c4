//! Placement: which node an instance goes to. Pure functions over a
//! snapshot of the cluster, deterministic for the same inputs.
//!
//! Filters: the node is online and not draining, carries the labels the
//! workload's `constraints` ask for, has the free CPU and memory the
//! instance asks for, and is the node a volume pins the instance to (if
//! any). Scores, in order: fewest instances of the same workload on the
//! node (spread across nodes), then in the node's region (spread across
//! regions), then the smallest share of the node already reserved (fewest
//! resources used), then the name (a stable tie-break).
//!
//! [`Nodes`] keeps each region's schedulable nodes ordered by load across
//! placements, so [`place`] scans each region from its least loaded node
//! and stops at the first that fits without the workload: a placement
//! costs `O(regions × (skipped + log nodes))`, not `O(nodes)`. An instance that fits nowhere gets an explanation
//! naming each node's problem (summarised past a few nodes) and a fix.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use verge_api::manifest::human_size;

/// The label that names a node's region.
pub const REGION: &str = "region";

/// Nodes listed by name in an explanation before the rest are counted.
const NAMED: usize = 6;

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    /// `None` while online; when it went offline otherwise (RFC 3339).
    pub offline_since: Option<String>,
    /// Being drained: no new instances.
    pub draining: bool,
    pub labels: BTreeMap<String, String>,
    pub cpu_millis: i64,
    pub memory: i64,
    /// Reserved by the instances placed on it.
    pub used_cpu_millis: i64,
    pub used_memory: i64,
}

impl NodeView {
    /// The larger of the CPU and memory shares reserved, in thousandths.
    fn load_permille(&self) -> i64 {
        let share = |used: i64, cap: i64| {
            if cap <= 0 {
                1000
            } else {
                used.saturating_mul(1000) / cap
            }
        };
        share(self.used_cpu_millis, self.cpu_millis).max(share(self.used_memory, self.memory))
    }

    fn region(&self) -> &str {
        self.labels.get(REGION).map_or("", String::as_str)
    }
}

/// The cluster's nodes, addressable by ID, with what is reserved on them
/// and, per region, the schedulable ones (online, not draining) ordered by
/// load, kept up to date by [`Nodes::reserve`]: placing scans a region
/// from its least loaded node and usually stops at the first.
#[derive(Debug, Clone, Default)]
pub struct Nodes {
    views: Vec<NodeView>,
    by_id: HashMap<String, usize>,
    /// Region names, sorted; `region_of[i]` indexes it.
    regions: Vec<String>,
    region_of: Vec<usize>,
    /// Per region: `(load, index)` of each schedulable node.
    order: Vec<BTreeSet<(i64, usize)>>,
}

impl Nodes {
    pub fn new(mut views: Vec<NodeView>) -> Nodes {
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let by_id = views
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id.clone(), i))
            .collect();
        let regions: Vec<String> = views
            .iter()
            .map(|v| v.region().to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let region_of: Vec<usize> = views
            .iter()
            .map(|v| {
                regions
                    .binary_search_by(|r| r.as_str().cmp(v.region()))
                    .expect("every region is listed")
            })
            .collect();
        let mut order = vec![BTreeSet::new(); regions.len()];
        for (i, v) in views.iter().enumerate() {
            if schedulable(v) {
                order[region_of[i]].insert((v.load_permille(), i));
            }
        }
        Nodes {
            views,
            by_id,
            regions,
            region_of,
            order,
        }
    }

    pub fn get(&self, id: &str) -> Option<&NodeView> {
        self.by_id.get(id).map(|&i| &self.views[i])
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &NodeView> {
        self.views.iter()
    }

    /// The node's name, or the ID itself for a node that is gone.
    pub fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.get(id).map_or(id, |n| n.name.as_str())
    }

    /// Adds (negative: gives back) a reservation.
    pub fn reserve(&mut self, id: &str, cpu_millis: i64, memory: i64) {
        if let Some(&i) = self.by_id.get(id) {
            self.reserve_at(i, cpu_millis, memory);
        }
    }

    fn reserve_at(&mut self, i: usize, cpu_millis: i64, memory: i64) {
        let v = &mut self.views[i];
        let before = v.load_permille();
        v.used_cpu_millis += cpu_millis;
        v.used_memory += memory;
        let after = v.load_permille();
        let order = &mut self.order[self.region_of[i]];
        if order.remove(&(before, i)) {
            order.insert((after, i));
        }
    }
}

fn schedulable(v: &NodeView) -> bool {
    v.offline_since.is_none() && !v.draining
}

/// What each instance of a batch asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask<'a> {
    pub workload: &'a str,
    pub cpu_millis: i64,
    pub memory: i64,
    /// Labels the node must carry (the workload's `constraints`).
    pub constraints: &'a BTreeMap<String, String>,
    /// The only node the instance may go to, and what is there (`volume
    /// data`: the workload mounts that volume).
    pub pin: Option<(&'a str, &'a str)>,
}

/// Places `n` instances of one workload. `existing` are the node IDs of
/// the workload's instances already placed (one entry per instance), so
/// the new ones spread around them. Chosen nodes' reservations are
/// updated. Each result is a node ID or why no node fits.
pub fn place(
    nodes: &mut Nodes,
    ask: &Ask<'_>,
    existing: &[&str],
    n: usize,
) -> Vec<Result<String, String>> {
    let mut on_node: HashMap<usize, u32> = HashMap::new();
    let mut in_region = vec![0u32; nodes.regions.len()];
    for id in existing {
        if let Some(&i) = nodes.by_id.get(*id) {
            *on_node.entry(i).or_default() += 1;
            in_region[nodes.region_of[i]] += 1;
        }
    }
    // Only the regions that can fit: the constrained or pinned one, or all.
    let regions: Vec<usize> = match (ask.pin, ask.constraints.get(REGION)) {
        (Some((pin, _)), _) => nodes
            .by_id
            .get(pin)
            .map(|&i| nodes.region_of[i])
            .into_iter()
            .collect(),
        (None, Some(want)) => nodes.regions.binary_search(want).ok().into_iter().collect(),
        (None, None) => (0..nodes.regions.len()).collect(),
    };
    let mut out = Vec::with_capacity(n);
    let mut explanation: Option<String> = None;
    for _ in 0..n {
        // The best node: fewest of the workload on it, then in its region,
        // then least loaded, then first by name.
        let mut best: Option<(u32, u32, i64, usize)> = None;
        for &r in &regions {
            for &(load, i) in &nodes.order[r] {
                if !fits(&nodes.views[i], ask) {
                    continue;
                }
                let count = on_node.get(&i).copied().unwrap_or(0);
                let key = (count, in_region[r], load, i);
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
                // Later nodes of the region are loaded at least as much:
                // none can beat a node without the workload.
                if count == 0 {
                    break;
                }
            }
        }
        match best {
            Some((_, _, _, i)) => {
                nodes.reserve_at(i, ask.cpu_millis, ask.memory);
                *on_node.entry(i).or_default() += 1;
                in_region[nodes.region_of[i]] += 1;
                out.push(Ok(nodes.views[i].id.clone()));
            }
            None => {
                let why = explanation.get_or_insert_with(|| explain(nodes, ask));
                out.push(Err(why.clone()));
            }
        }
    }
    out
}

/// Whether `n` can take the instance (the fast check; [`unfit`] says why not).
fn fits(n: &NodeView, ask: &Ask<'_>) -> bool {
    ask.pin.is_none_or(|(pin, _)| pin == n.id)
        && schedulable(n)
        && ask
            .constraints
            .iter()
            .all(|(k, want)| n.labels.get(k) == Some(want))
        && ask.memory <= n.memory - n.used_memory
        && ask.cpu_millis <= n.cpu_millis - n.used_cpu_millis
}

/// Why a node cannot take the instance, by kind, for summaries and fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    Pinned,
    Offline,
    Draining,
    Label,
    Memory,
    Cpu,
}

fn unfit(n: &NodeView, ask: &Ask<'_>) -> Option<(Problem, String)> {
    if let Some((pin, why)) = ask.pin
        && pin != n.id
    {
        return Some((Problem::Pinned, format!("not the node of {why}")));
    }
    if let Some(since) = &n.offline_since {
        return Some((Problem::Offline, format!("offline since {since}")));
    }
    if n.draining {
        return Some((Problem::Draining, "draining".into()));
    }
    for (k, want) in ask.constraints {
        match n.labels.get(k) {
            Some(have) if have == want => {}
            Some(have) => {
                return Some((
                    Problem::Label,
                    format!("label {k}={have} does not match {want}"),
                ));
            }
            None => {
                return Some((
                    Problem::Label,
                    format!("no label {k} (the workload needs {k}={want})"),
                ));
            }
        }
    }
    let free_mem = n.memory - n.used_memory;
    if ask.memory > free_mem {
        return Some((
            Problem::Memory,
            format!(
                "insufficient memory (needs {}, {} free)",
                human_size(ask.memory.max(0) as u64),
                human_size(free_mem.max(0) as u64)
            ),
        ));
    }
    let free_cpu = n.cpu_millis - n.used_cpu_millis;
    if ask.cpu_millis > free_cpu {
        return Some((
            Problem::Cpu,
            format!(
                "insufficient cpu (needs {}, {} free)",
                cores(ask.cpu_millis),
                cores(free_cpu.max(0))
            ),
        ));
    }
    None
}

/// Every node's problem with `ask` (the first few by name, then counts),
/// and the fix for the most common problem.
fn explain(nodes: &Nodes, ask: &Ask<'_>) -> String {
    if let Some((pin, what)) = ask.pin {
        return explain_pinned(nodes, ask, pin, what);
    }
    if nodes.is_empty() {
        return "no nodes have joined the cluster; to fix: join one with `verge nodes join-token`"
            .into();
    }
    let problems: Vec<(&str, Problem, String)> = nodes
        .iter()
        .filter_map(|n| unfit(n, ask).map(|(p, why)| (n.name.as_str(), p, why)))
        .collect();
    summarise(&problems, problem_name, |p| fix(p, ask))
}

/// `node NAME: why` for each of the first few `problems` (in order), the
/// rest counted by kind, then the fix for the most common kind (ties: the
/// first kind). Shared by instance and volume placement.
pub(crate) fn summarise<P: Copy + Ord>(
    problems: &[(&str, P, String)],
    name: impl Fn(P) -> &'static str,
    fix: impl Fn(P) -> String,
) -> String {
    let mut parts: Vec<String> = problems
        .iter()
        .take(NAMED)
        .map(|(n, _, why)| format!("node {n}: {why}"))
        .collect();
    if problems.len() > NAMED {
        let mut rest: BTreeMap<P, usize> = BTreeMap::new();
        for (_, p, _) in &problems[NAMED..] {
            *rest.entry(*p).or_default() += 1;
        }
        let summary: Vec<String> = rest
            .iter()
            .map(|(p, c)| format!("{c} {}", name(*p)))
            .collect();
        parts.push(format!(
            "and {} more nodes ({})",
            problems.len() - NAMED,
            summary.join(", ")
        ));
    }
    let mut counts: BTreeMap<P, usize> = BTreeMap::new();
    for (_, p, _) in problems {
        *counts.entry(*p).or_default() += 1;
    }
    let mut text = parts.join("; ");
    if let Some((&p, _)) = counts.iter().max_by_key(|(p, c)| (**c, Reverse(**p))) {
        text.push_str("; to fix: ");
        text.push_str(&fix(p));
    }
    text
}

/// Why the one node the instance may go to cannot take it, and the two
/// ways out: wait for that node, or move what pins the instance there.
fn explain_pinned(nodes: &Nodes, ask: &Ask<'_>, pin: &str, what: &str) -> String {
    let volume = what.strip_prefix("volume ").unwrap_or(what);
    let moving = format!(
        "or move it: `verge volumes snapshot {volume}`, then `verge volumes restore SNAPSHOT \
         --to NEW --node OTHER`, and mount NEW instead of {volume}"
    );
    let Some(n) = nodes.get(pin) else {
        return format!(
            "{what} is on node {pin}, which has left the cluster, and the instance can run only there; to fix: restore a snapshot \
             of it onto another node (`verge volumes restore SNAPSHOT --to NEW --node OTHER`) \
             and mount that"
        );
    };
    let (problem, why) = unfit(n, &Ask { pin: None, ..*ask })
        .unwrap_or((Problem::Pinned, "not able to take it".into()));
    let wait = match problem {
        Problem::Offline => format!(
            "bring node {} back (the instance starts there when it is)",
            n.name
        ),
        Problem::Draining => format!("undrain node {} (`verge nodes undrain {}`)", n.name, n.name),
        Problem::Memory | Problem::Cpu | Problem::Label => fix(problem, ask),
        Problem::Pinned => format!("wait for node {}", n.name),
    };
    format!(
        "{what} is on node {} ({why}), and the instance can run only there; to fix: {wait}, {moving}",
        n.name
    )
}

fn problem_name(p: Problem) -> &'static str {
    match p {
        Problem::Pinned => "not the pinned node",
        Problem::Offline => "offline",
        Problem::Draining => "draining",
        Problem::Label => "without the labels",
        Problem::Memory => "without the memory",
        Problem::Cpu => "without the cpu",
    }
}

fn fix(p: Problem, ask: &Ask<'_>) -> String {
    let w = ask.workload;
    match p {
        Problem::Pinned => {
            "bring the volume's node back, or snapshot the volume and restore it onto another node"
                .into()
        }
        Problem::Offline => {
            "bring the offline nodes back (or join another node: `verge nodes join-token`)".into()
        }
        Problem::Draining => "undrain a node (`verge nodes undrain NODE`) or join another".into(),
        Problem::Label => {
            let want: Vec<String> = ask
                .constraints
                .iter()
                .map(|(k, v)| format!("--label {k}={v}"))
                .collect();
            format!(
                "join a node with {}, or change the constraints of {w}",
                want.join(" ")
            )
        }
        Problem::Memory => format!(
            "lower the memory of {w} (`verge scale {w} --memory SIZE`), stop other instances, \
             or join a node with {} free",
            human_size(ask.memory.max(0) as u64)
        ),
        Problem::Cpu => format!(
            "lower the cpu of {w} (`verge scale {w} --cpu CORES`), stop other instances, \
             or join a node with {} free",
            cores(ask.cpu_millis)
        ),
    }
}

fn cores(millis: i64) -> String {
    format!("{} cores", millis as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, region: &str, cpu: i64, mem: i64) -> NodeView {
        NodeView {
            id: format!("id-{name}"),
            name: name.into(),
            offline_since: None,
            draining: false,
            labels: BTreeMap::from([(REGION.to_string(), region.to_string())]),
            cpu_millis: cpu,
            memory: mem,
            used_cpu_millis: 0,
            used_memory: 0,
        }
    }

    static NONE: BTreeMap<String, String> = BTreeMap::new();
    const ASK: Ask<'static> = Ask {
        workload: "web",
        cpu_millis: 250,
        memory: 64 << 20,
        constraints: &NONE,
        pin: None,
    };

    fn one(nodes: &mut Nodes, ask: &Ask<'_>) -> Result<String, String> {
        place(nodes, ask, &[], 1).pop().unwrap()
    }

    #[test]
    fn constraints_filter_by_label_and_say_which() {
        let mut nodes = Nodes::new(vec![
            node("a", "eu-west", 2000, 1 << 30),
            node("b", "us-east", 2000, 1 << 30),
        ]);
        let want = BTreeMap::from([(REGION.to_string(), "us-east".to_string())]);
        let ask = Ask {
            constraints: &want,
            ..ASK
        };
        let placed = place(&mut nodes, &ask, &[], 2);
        assert_eq!(
            placed,
            vec![Ok("id-b".to_string()), Ok("id-b".to_string())],
            "constraints beat spreading"
        );
        let other = BTreeMap::from([("zone".to_string(), "z1".to_string())]);
        let err = one(
            &mut nodes,
            &Ask {
                constraints: &other,
                ..ASK
            },
        )
        .unwrap_err();
        assert!(
            err.contains("node a: no label zone (the workload needs zone=z1)"),
            "{err}"
        );
        assert!(
            err.contains("to fix: join a node with --label zone=z1"),
            "{err}"
        );
        let wrong = BTreeMap::from([(REGION.to_string(), "ap-south".to_string())]);
        let err = one(
            &mut nodes,
            &Ask {
                constraints: &wrong,
                ..ASK
            },
        )
        .unwrap_err();
        assert!(
            err.contains("node a: label region=eu-west does not match ap-south; node b: label region=us-east does not match ap-south"),
            "{err}"
        );
    }

    #[test]
    fn spreads_across_nodes_then_regions() {
        // Three nodes in eu, one in us: the second instance goes to us.
        let mut nodes = Nodes::new(vec![
            node("a", "eu", 2000, 1 << 30),
            node("b", "eu", 2000, 1 << 30),
            node("c", "eu", 2000, 1 << 30),
            node("d", "us", 2000, 1 << 30),
        ]);
        let placed: Vec<String> = place(&mut nodes, &ASK, &[], 4)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(placed, ["id-a", "id-d", "id-b", "id-c"]);
        // A fifth: every node has one; eu has three, us one: back to us.
        assert_eq!(
            place(
                &mut nodes,
                &ASK,
                &placed.iter().map(String::as_str).collect::<Vec<_>>(),
                1
            ),
            vec![Ok("id-d".to_string())]
        );
    }

    #[test]
    fn prefers_the_least_loaded_node_and_is_deterministic() {
        let mk = || {
            let mut a = node("a", "", 1000, 1 << 30);
            a.used_memory = 512 << 20;
            let b = node("b", "", 1000, 1 << 30);
            Nodes::new(vec![a, b])
        };
        let (mut x, mut y) = (mk(), mk());
        assert_eq!(one(&mut mk(), &ASK).unwrap(), "id-b");
        assert_eq!(place(&mut x, &ASK, &[], 5), place(&mut y, &ASK, &[], 5));
    }

    #[test]
    fn skips_offline_draining_and_full_nodes_and_explains() {
        let mut a = node("a", "", 2000, 1 << 30);
        a.offline_since = Some("2026-11-22T10:00:00Z".into());
        let mut c = node("c", "", 2000, 1 << 30);
        c.draining = true;
        let mut nodes = Nodes::new(vec![a, node("b", "", 100, 32 << 20), c]);
        let err = one(&mut nodes, &ASK).unwrap_err();
        assert!(
            err.contains("node a: offline since 2026-11-22T10:00:00Z"),
            "{err}"
        );
        assert!(
            err.contains("node b: insufficient memory (needs 64Mi, 32Mi free)"),
            "{err}"
        );
        assert!(err.contains("node c: draining"), "{err}");
        assert!(err.contains("to fix: "), "{err}");
    }

    #[test]
    fn reserves_what_it_places_and_explains_the_rest() {
        let mut nodes = Nodes::new(vec![node("a", "", 500, 1 << 30)]);
        let placed = place(&mut nodes, &ASK, &[], 3);
        assert!(placed[0].is_ok() && placed[1].is_ok());
        let err = placed[2].as_ref().unwrap_err();
        assert!(
            err.contains("node a: insufficient cpu (needs 0.25 cores, 0 cores free)"),
            "{err}"
        );
        assert!(err.contains("verge scale web --cpu"), "{err}");
        assert_eq!(nodes.get("id-a").unwrap().used_cpu_millis, 500);
    }

    #[test]
    fn pins_to_one_node() {
        let mut nodes = Nodes::new(vec![
            node("a", "", 2000, 1 << 30),
            node("b", "", 2000, 1 << 30),
        ]);
        let ask = Ask {
            pin: Some(("id-b", "volume data")),
            ..ASK
        };
        assert_eq!(
            place(&mut nodes, &ask, &["id-b"], 1),
            vec![Ok("id-b".to_string())]
        );
        nodes.views[1].offline_since = Some("t".into());
        let err = one(&mut nodes, &ask).unwrap_err();
        assert!(
            err.starts_with("volume data is on node b (offline since t)"),
            "{err}"
        );
        assert!(err.contains("to fix: bring node b back"), "{err}");
        assert!(err.contains("`verge volumes snapshot data`"), "{err}");
        nodes.views[1].offline_since = None;
        nodes.views[1].used_memory = 1 << 30;
        let err = one(&mut nodes, &ask).unwrap_err();
        assert!(err.contains("(insufficient memory"), "{err}");
        assert!(
            !err.contains("node a"),
            "only the pinned node matters: {err}"
        );
    }

    #[test]
    fn summarises_large_clusters() {
        let views = (0..100)
            .map(|i| {
                let mut n = node(&format!("n{i:03}"), "", 100, 1 << 30);
                if i % 2 == 0 {
                    n.offline_since = Some("t".into());
                }
                n
            })
            .collect();
        let mut nodes = Nodes::new(views);
        let err = one(&mut nodes, &ASK).unwrap_err();
        assert!(
            err.contains("node n000: offline since t; node n001: insufficient cpu"),
            "{err}"
        );
        assert!(
            err.contains("and 94 more nodes (47 offline, 47 without the cpu)"),
            "{err}"
        );
        assert!(err.len() < 1000, "{err}");
    }

    #[test]
    fn no_nodes_says_how_to_add_one() {
        let mut nodes = Nodes::new(Vec::new());
        assert!(
            one(&mut nodes, &ASK)
                .unwrap_err()
                .contains("verge nodes join-token")
        );
    }
}
