use super::*;
use crate::scheduler::NodeView;

const NOW: i64 = 1_000_000;
const CLOCK: Clock = Clock {
    now_ms: NOW,
    reschedule_after_ms: 30_000,
};

fn manifest(extra: &str) -> Manifest {
    verge_api::manifest::parse(
        "verge.toml",
        &format!(
            "app = \"a\"\n[workloads.web]\nimage = \"r/i:1\"\ncount = 2\ncpu = 0.25\n\
             memory = \"64Mi\"\n{extra}"
        ),
    )
    .unwrap()
}

fn nodes(names: &[&str]) -> (Nodes, Facts) {
    cluster(names, &[], &[])
}

/// Nodes by name; `offline` ones since the given time, `draining` ones.
fn cluster(names: &[&str], offline: &[(&str, i64)], draining: &[&str]) -> (Nodes, Facts) {
    let since = |n: &str| offline.iter().find(|(o, _)| *o == n).map(|(_, t)| *t);
    let views = names
        .iter()
        .map(|n| NodeView {
            id: n.to_string(),
            name: n.to_string(),
            offline_since: since(n).map(|t| t.to_string()),
            draining: draining.contains(n),
            labels: BTreeMap::new(),
            cpu_millis: 4000,
            memory: 4 << 30,
            used_cpu_millis: 0,
            used_memory: 0,
        })
        .collect();
    let facts = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                NodeFacts {
                    online: since(n).is_none(),
                    offline_at: since(n),
                    draining: draining.contains(n),
                    drain_overdue: false,
                },
            )
        })
        .collect();
    (Nodes::new(views), facts)
}

/// An instance of workload `web` (0.25 cores, 64Mi) with goal `run`.
pub(crate) fn inst(id: &str, release: &str, slot: i64, node: &str, state: &str) -> InstanceRow {
    InstanceRow {
        id: id.into(),
        env_id: "e".into(),
        release_id: release.into(),
        workload: "web".into(),
        slot,
        node_id: Some(node.into()),
        node_name: Some(node.into()),
        goal: "run".into(),
        state: state.into(),
        category: None,
        message: None,
        address: None,
        restarts: 0,
        cpu_millis: 250,
        memory: 64 << 20,
        created_at: slot,
        updated_at: 0,
        healthy: None,
    }
}

fn run(m: &Manifest, instances: &[InstanceRow], names: &[&str], hold: bool) -> Vec<Action> {
    let (mut n, f) = nodes(names);
    run_with(m, instances, &mut n, &f, hold)
}

fn run_with(
    m: &Manifest,
    instances: &[InstanceRow],
    nodes: &mut Nodes,
    facts: &Facts,
    hold: bool,
) -> Vec<Action> {
    run_since(m, instances, nodes, facts, hold, 0)
}

fn run_since(
    m: &Manifest,
    instances: &[InstanceRow],
    nodes: &mut Nodes,
    facts: &Facts,
    hold: bool,
    since_ms: i64,
) -> Vec<Action> {
    let input = EnvInput {
        release_id: "r2",
        manifest: m,
        instances,
        hold,
        since_ms,
        volumes: &NO_VOLUMES,
    };
    plan(&input, nodes, facts, CLOCK)
}

fn creates(actions: &[Action]) -> Vec<(i64, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Create {
                slot,
                release,
                node,
                ..
            } if release.is_none() => Some((*slot, node.clone().unwrap())),
            _ => None,
        })
        .collect()
}

fn stops(actions: &[Action]) -> Vec<(String, StopWhy)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { instance, why, .. } => Some((instance.clone(), *why)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_first_deploy_creates_every_slot_spread() {
    let actions = run(&manifest(""), &[], &["a", "b"], false);
    assert_eq!(creates(&actions), [(0, "a".into()), (1, "b".into())]);
    assert!(stops(&actions).is_empty());
}

#[test]
fn a_rollout_surges_then_stops_old_ones_only_when_new_ones_are_ready() {
    let m = manifest("");
    let old = [
        inst("o0", "r1", 0, "a", "running"),
        inst("o1", "r1", 1, "b", "running"),
    ];
    // max_surge 1, max_unavailable 0: one new instance, nothing stopped.
    let actions = run(&m, &old, &["a", "b", "c"], false);
    assert_eq!(creates(&actions), [(0, "c".into())]);
    assert!(stops(&actions).is_empty(), "{actions:?}");

    // The new one is still starting: nothing more happens.
    let mut now = old.to_vec();
    now.push(inst("n0", "r2", 0, "c", "starting"));
    assert!(run(&m, &now, &["a", "b", "c"], false).is_empty());

    // Ready: one old one stops, which makes room for the next new one.
    now[2].state = "running".into();
    let actions = run(&m, &now, &["a", "b", "c"], false);
    assert_eq!(stops(&actions), [("o0".into(), StopWhy::Replaced)]);
    assert_eq!(creates(&actions), [(1, "a".into())]);

    // Until that one is ready, the last old one keeps serving.
    now.remove(0);
    now.push(inst("n1", "r2", 1, "a", "pulling"));
    assert!(run(&m, &now, &["a", "b", "c"], false).is_empty());
    now[2].state = "running".into();
    assert_eq!(
        stops(&run(&m, &now, &["a", "b", "c"], false)),
        [("o1".into(), StopWhy::Replaced)]
    );
}

#[test]
fn health_checked_instances_count_only_when_healthy() {
    let m = manifest("health = { tcp = 8080 }\n");
    let mut now = vec![
        inst("o0", "r1", 0, "a", "running"),
        inst("o1", "r1", 1, "b", "running"),
        inst("n0", "r2", 0, "c", "running"),
    ];
    assert!(run(&m, &now, &["a", "b", "c"], false).is_empty());
    now[2].healthy = Some(0);
    assert!(run(&m, &now, &["a", "b", "c"], false).is_empty());
    now[2].healthy = Some(1);
    assert_eq!(stops(&run(&m, &now, &["a", "b", "c"], false)).len(), 1);
}

#[test]
fn max_unavailable_stops_first_without_surge() {
    let m = manifest("rollout = { max_surge = 0, max_unavailable = 1 }\n");
    let old = [
        inst("o0", "r1", 0, "a", "running"),
        inst("o1", "r1", 1, "b", "running"),
    ];
    let actions = run(&m, &old, &["a", "b"], false);
    assert_eq!(stops(&actions), [("o0".into(), StopWhy::Replaced)]);
    assert_eq!(creates(&actions).len(), 1, "{actions:?}");
}

#[test]
fn a_held_env_takes_no_rolling_steps() {
    let m = manifest("");
    let mut now = vec![
        inst("o0", "r1", 0, "a", "running"),
        inst("o1", "r1", 1, "b", "running"),
        inst("n0", "r2", 0, "c", "failed"),
    ];
    assert!(run(&m, &now, &["a", "b", "c"], true).is_empty());
    now[2].state = "running".into();
    assert!(run(&m, &now, &["a", "b", "c"], true).is_empty());
    // Only a drain's deadline still stops what is on the node, and the
    // env gets a copy of it elsewhere: same release, slot and resources.
    let (mut n, mut f) = cluster(&["a", "b", "c", "d"], &[], &["a"]);
    assert!(run_with(&m, &now, &mut n, &f, true).is_empty());
    f.get_mut("a").unwrap().drain_overdue = true;
    let actions = run_with(&m, &now, &mut n, &f, true);
    assert_eq!(stops(&actions), [("o0".into(), StopWhy::Replaced)]);
    assert_eq!(refills(&actions), [(0, "r1".into(), "d".into())]);
    // So does a lost node.
    let (mut n, f) = cluster(&["a", "b", "c", "d"], &[("b", NOW - 60_000)], &[]);
    let actions = run_with(&m, &now, &mut n, &f, true);
    assert_eq!(stops(&actions), [("o1".into(), StopWhy::Lost)]);
    assert_eq!(refills(&actions), [(1, "r1".into(), "d".into())]);
}

fn refills(actions: &[Action]) -> Vec<(i64, String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            // A copy of what a held env lost: an earlier release.
            Action::Create {
                slot,
                release,
                node: Ok(node),
                ..
            } => release
                .clone()
                .map(|release| (*slot, release, node.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn instances_of_a_lost_node_are_replaced_unless_pinned() {
    let m = manifest("");
    let now = [
        inst("i0", "r2", 0, "a", "running"),
        inst("i1", "r2", 1, "b", "running"),
    ];
    // Offline, but not for long yet: wait.
    let (mut n, f) = cluster(&["a", "b", "c"], &[("a", NOW - 1_000)], &[]);
    assert!(run_with(&m, &now, &mut n, &f, false).is_empty());
    let (mut n, f) = cluster(&["a", "b", "c"], &[("a", NOW - 60_000)], &[]);
    let actions = run_with(&m, &now, &mut n, &f, false);
    assert_eq!(stops(&actions), [("i0".into(), StopWhy::Lost)]);
    assert_eq!(creates(&actions), [(0, "c".into())]);

    let pinned = manifest("volumes = [{ name = \"data\", path = \"/data\" }]\n");
    let (mut n, f) = cluster(&["a", "b", "c"], &[("a", NOW - 60_000)], &[]);
    assert!(run_with(&pinned, &now, &mut n, &f, false).is_empty());
}

#[test]
fn a_drain_moves_instances_within_the_rollout_rules() {
    let m = manifest("");
    let mut now = vec![
        inst("i0", "r2", 0, "a", "running"),
        inst("i1", "r2", 1, "b", "running"),
    ];
    let (n, mut f) = cluster(&["a", "b", "c"], &[], &["a"]);
    let actions = run_with(&m, &now, &mut n.clone(), &f, false);
    assert_eq!(creates(&actions), [(0, "c".into())], "a replacement first");
    assert!(stops(&actions).is_empty());
    now.push(inst("r0", "r2", 0, "c", "running"));
    let actions = run_with(&m, &now, &mut n.clone(), &f, false);
    assert_eq!(stops(&actions), [("i0".into(), StopWhy::Drained)]);
    // Past the deadline, it goes whether or not its replacement is ready.
    now[2].state = "starting".into();
    assert!(run_with(&m, &now, &mut n.clone(), &f, false).is_empty());
    f.get_mut("a").unwrap().drain_overdue = true;
    let actions = run_with(&m, &now, &mut n.clone(), &f, false);
    assert_eq!(stops(&actions), [("i0".into(), StopWhy::Drained)]);
}

#[test]
fn scaling_down_stops_the_highest_slots() {
    let m = manifest("");
    let now = [
        inst("i0", "r2", 0, "a", "running"),
        inst("i1", "r2", 1, "b", "running"),
        inst("i2", "r2", 2, "c", "running"),
    ];
    let actions = run(&m, &now, &["a", "b", "c"], false);
    assert_eq!(stops(&actions), [("i2".into(), StopWhy::ScaledDown)]);
    assert!(creates(&actions).is_empty());
}

#[test]
fn unplaceable_slots_explain_and_do_not_repeat() {
    let m = manifest("constraints = { region = \"eu-west\" }\n");
    let actions = run(&m, &[], &["a"], false);
    let Action::Create { node: Err(why), .. } = &actions[0] else {
        panic!("{actions:?}")
    };
    assert!(why.contains("node a: no label region"), "{why}");
    // A pending instance with that very reason is left alone.
    let mut pending = inst("p0", "r2", 0, "a", "pending");
    pending.node_id = None;
    pending.message = Some(why.clone());
    let mut p1 = pending.clone();
    p1.id = "p1".into();
    p1.slot = 1;
    assert!(run(&m, &[pending, p1], &["a"], false).is_empty());
}

#[test]
fn instances_that_failed_before_the_rollout_are_replaced() {
    let m = manifest("");
    let mut failed = inst("f0", "r2", 0, "a", "failed");
    failed.updated_at = NOW - 60_000;
    let now = [failed, inst("i1", "r2", 1, "b", "running")];
    // Failed during this rollout: it holds its slot (the rollout fails).
    let (mut n, f) = nodes(&["a", "b"]);
    assert!(run_since(&m, &now, &mut n, &f, false, NOW - 120_000).is_empty());
    // Failed before it (a scale after a failed rollout): replaced.
    let actions = run_since(&m, &now, &mut n, &f, false, NOW - 1_000);
    assert_eq!(stops(&actions), [("f0".into(), StopWhy::Failed)]);
    assert_eq!(creates(&actions).len(), 1, "{actions:?}");
}

fn with_volumes(
    m: &Manifest,
    instances: &[InstanceRow],
    nodes: &mut Nodes,
    facts: &Facts,
    volumes: &Volumes,
) -> Vec<Action> {
    let input = EnvInput {
        release_id: "r2",
        manifest: m,
        instances,
        hold: false,
        since_ms: 0,
        volumes,
    };
    plan(&input, nodes, facts, CLOCK)
}

fn data_on(node: &str, attached_to: Option<&str>) -> Volumes {
    BTreeMap::from([(
        "data".to_string(),
        VolumeFact {
            node_id: node.into(),
            state: "ready".into(),
            attached_to: attached_to.map(Into::into),
        },
    )])
}

fn db() -> Manifest {
    manifest("volumes = [{ name = \"data\", path = \"/data\" }]\n[workloads.web.rollout]\nmax_surge = 1\nmax_unavailable = 0\n")
        .tap_count(1)
}

trait TapCount {
    fn tap_count(self, n: u32) -> Self;
}

impl TapCount for Manifest {
    fn tap_count(mut self, n: u32) -> Self {
        self.workloads.get_mut("web").unwrap().count = n;
        self
    }
}

/// The node-or-reason of every placement in `actions`.
fn placements(actions: &[Action]) -> Vec<Result<String, String>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Create { node, .. } | Action::Place { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_volume_pins_its_instance_to_its_node() {
    let (mut n, f) = nodes(&["a", "b", "c"]);
    let actions = with_volumes(&db(), &[], &mut n, &f, &data_on("c", None));
    assert_eq!(placements(&actions), [Ok("c".to_string())]);
    // A missing volume: pending, with the fix.
    let (mut n, f) = nodes(&["a"]);
    let actions = with_volumes(&db(), &[], &mut n, &f, &NO_VOLUMES);
    let why = placements(&actions).pop().unwrap().unwrap_err();
    assert!(
        why.contains("verge volumes create data --size SIZE"),
        "{why}"
    );
}

#[test]
fn a_new_release_stops_the_old_instance_before_the_new_one_mounts_the_volume() {
    let (mut n, f) = nodes(&["a", "b"]);
    // v1's instance runs on a with the volume; max_surge = 1 is overridden.
    let old = vec![inst("i1", "r1", 0, "a", "running")];
    let vols = data_on("a", Some("i1"));
    let actions = with_volumes(&db(), &old, &mut n, &f, &vols);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Stop { instance, .. } if instance == "i1")),
        "the old instance stops at once: {actions:?}"
    );
    let why = placements(&actions).pop().unwrap().unwrap_err();
    assert!(
        why.contains("waiting for volume data to be released") && why.contains("i1"),
        "{why}"
    );
    // Once it is gone (detached), the new one goes to the volume's node.
    let (mut n, f) = nodes(&["a", "b"]);
    let mut pending = inst("i2", "r2", 0, "a", "pending");
    pending.node_id = None;
    pending.message = Some(why);
    let actions = with_volumes(&db(), &[pending], &mut n, &f, &data_on("a", None));
    assert_eq!(placements(&actions), [Ok("a".to_string())]);
}

#[test]
fn an_offline_volume_node_is_explained_before_the_attachment() {
    let (mut n, f) = cluster(&["a", "b"], &[("a", NOW - 1_000)], &[]);
    let old = vec![{
        let mut i = inst("i1", "r1", 0, "a", "running");
        i.goal = "stop".into();
        i
    }];
    let actions = with_volumes(&db(), &old, &mut n, &f, &data_on("a", Some("i1")));
    let why = placements(&actions).pop().unwrap().unwrap_err();
    assert!(
        why.starts_with("volume data is on node a (offline since"),
        "{why}"
    );
    assert!(why.contains("verge volumes snapshot data"), "{why}");
    // Lost past the reschedule grace: still pinned, never moved.
    let (mut n, f) = cluster(&["a", "b"], &[("a", NOW - 60_000)], &[]);
    let running = vec![inst("i1", "r2", 0, "a", "running")];
    let actions = with_volumes(&db(), &running, &mut n, &f, &data_on("a", Some("i1")));
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn long_running_wasm_workloads_are_placed_and_reserve_like_processes() {
    let m = manifest("runtime = \"wasm\"\nmax_cpu_time = \"2s\"");
    assert_eq!(
        m.workloads["web"].runtime,
        verge_api::manifest::Runtime::Wasm
    );
    let (mut n, f) = nodes(&["a", "b"]);
    let actions = run_with(&m, &[], &mut n, &f, false);
    assert_eq!(creates(&actions), [(0, "a".into()), (1, "b".into())]);
    for node in ["a", "b"] {
        let v = n.get(node).unwrap();
        assert_eq!(
            (v.used_cpu_millis, v.used_memory),
            (250, 64 << 20),
            "{node}"
        );
    }
}

#[test]
fn per_connection_workloads_get_no_instances_and_reserve_nothing() {
    let m = verge_api::manifest::parse(
        "verge.toml",
        "app = \"a\"\n[workloads.echo]\nruntime = \"wasm\"\nimage = \"r/echo:1\"\n\
         mode = \"per-connection\"\nmemory = \"32Mi\"\n\
         [[endpoints]]\nname = \"e\"\nworkload = \"echo\"\nport = 7\ninternal_port = 7000\n",
    )
    .unwrap();
    assert_eq!(m.workloads["echo"].count, 0);
    let (mut n, f) = nodes(&["a", "b"]);
    assert!(run_with(&m, &[], &mut n, &f, false).is_empty());
    assert!(
        n.iter()
            .all(|v| v.used_cpu_millis == 0 && v.used_memory == 0)
    );
    // A `verge scale echo=3` stored somehow changes nothing.
    let scaled = crate::desired::apply_scale(
        &m,
        &BTreeMap::from([(
            "echo".to_string(),
            crate::store::ScaleRow {
                count: Some(3),
                ..Default::default()
            },
        )]),
    );
    assert_eq!(scaled.workloads["echo"].count, 0);
    // Even a count slipped past both: no instance; a stray one is stopped.
    let mut forced = m.clone();
    forced.workloads.get_mut("echo").unwrap().count = 2;
    let mut stray = inst("s0", "r2", 0, "a", "running");
    stray.workload = "echo".into();
    let actions = run_with(&forced, &[stray], &mut n, &f, false);
    assert!(creates(&actions).is_empty(), "{actions:?}");
    assert_eq!(stops(&actions), [("s0".to_string(), StopWhy::ScaledDown)]);
}
