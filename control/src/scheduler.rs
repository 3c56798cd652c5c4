//! Placement: which node an instance goes to. Pure functions over a
//! snapshot of the cluster, deterministic for the same inputs.
//!
//! Filters: the node is online, carries the labels the workload's
//! `constraints` ask for, and has the free CPU and memory the instance asks
//! for. Score: fewest instances of the same workload (spread),
//! then the most free memory, then the name (a stable tie-break). An
//! instance that fits nowhere gets a reason naming each node's problem.

use std::collections::BTreeMap;

use verge_api::manifest::human_size;

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub online: bool,
    pub labels: BTreeMap<String, String>,
    pub cpu_millis: i64,
    pub memory: i64,
    /// Reserved by the instances placed on it.
    pub used_cpu_millis: i64,
    pub used_memory: i64,
    /// `(env id, workload)` of each instance placed on it.
    pub workloads: Vec<(String, String)>,
}

impl NodeView {
    fn count_of(&self, env_id: &str, workload: &str) -> usize {
        self.workloads
            .iter()
            .filter(|(e, w)| e == env_id && w == workload)
            .count()
    }
}

/// What an instance asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ask<'a> {
    pub env_id: &'a str,
    pub workload: &'a str,
    pub cpu_millis: i64,
    pub memory: i64,
    /// Labels the node must carry (the workload's `constraints`).
    pub constraints: &'a BTreeMap<String, String>,
}

/// Picks a node for `ask`, or says why none fits. On success the chosen
/// node's reservations are updated, so successive calls spread.
pub fn place(nodes: &mut [NodeView], ask: Ask<'_>) -> Result<String, String> {
    if nodes.is_empty() {
        return Err(
            "no nodes have joined the cluster: join one with `verge nodes join-token`".into(),
        );
    }
    let mut reasons = Vec::new();
    let mut best: Option<usize> = None;
    for (i, n) in nodes.iter().enumerate() {
        if let Some(why) = unfit(n, &ask) {
            reasons.push(format!("node {}: {why}", n.name));
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let (cur, cand) = (&nodes[b], n);
                let key = |v: &NodeView| {
                    (
                        v.count_of(ask.env_id, ask.workload),
                        std::cmp::Reverse(v.memory - v.used_memory),
                    )
                };
                (key(cand), &cand.name) < (key(cur), &cur.name)
            }
        };
        if better {
            best = Some(i);
        }
    }
    let Some(i) = best else {
        return Err(reasons.join("; "));
    };
    let n = &mut nodes[i];
    n.used_cpu_millis += ask.cpu_millis;
    n.used_memory += ask.memory;
    n.workloads
        .push((ask.env_id.to_string(), ask.workload.to_string()));
    Ok(n.id.clone())
}

fn unfit(n: &NodeView, ask: &Ask<'_>) -> Option<String> {
    if !n.online {
        return Some("offline".into());
    }
    for (k, want) in ask.constraints {
        match n.labels.get(k) {
            Some(have) if have == want => {}
            Some(have) => return Some(format!("label {k}={have} does not match {want}")),
            None => return Some(format!("no label {k} (the workload needs {k}={want})")),
        }
    }
    let free_mem = n.memory - n.used_memory;
    if ask.memory > free_mem {
        return Some(format!(
            "insufficient memory (needs {}, {} free)",
            human_size(ask.memory.max(0) as u64),
            human_size(free_mem.max(0) as u64)
        ));
    }
    let free_cpu = n.cpu_millis - n.used_cpu_millis;
    if ask.cpu_millis > free_cpu {
        return Some(format!(
            "insufficient cpu (needs {}, {} free)",
            cores(ask.cpu_millis),
            cores(free_cpu.max(0))
        ));
    }
    None
}

fn cores(millis: i64) -> String {
    format!("{} cores", millis as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, online: bool, cpu: i64, mem: i64) -> NodeView {
        NodeView {
            id: format!("id-{name}"),
            name: name.into(),
            online,
            labels: BTreeMap::from([("region".to_string(), name.to_string())]),
            cpu_millis: cpu,
            memory: mem,
            used_cpu_millis: 0,
            used_memory: 0,
            workloads: Vec::new(),
        }
    }

    static NONE: BTreeMap<String, String> = BTreeMap::new();
    const ASK: Ask<'static> = Ask {
        env_id: "e",
        workload: "web",
        cpu_millis: 250,
        memory: 64 << 20,
        constraints: &NONE,
    };

    #[test]
    fn constraints_filter_by_label_and_say_which() {
        let mut nodes = vec![
            node("a", true, 2000, 1 << 30),
            node("b", true, 2000, 1 << 30),
        ];
        let want = BTreeMap::from([("region".to_string(), "b".to_string())]);
        let ask = Ask {
            constraints: &want,
            ..ASK
        };
        assert_eq!(place(&mut nodes, ask).unwrap(), "id-b");
        assert_eq!(
            place(&mut nodes, ask).unwrap(),
            "id-b",
            "constraints beat spreading"
        );
        let other = BTreeMap::from([("zone".to_string(), "z1".to_string())]);
        let err = place(
            &mut nodes,
            Ask {
                constraints: &other,
                ..ASK
            },
        )
        .unwrap_err();
        assert!(
            err.contains("node a: no label zone (the workload needs zone=z1)"),
            "{err}"
        );
        let wrong = BTreeMap::from([("region".to_string(), "c".to_string())]);
        let err = place(
            &mut nodes,
            Ask {
                constraints: &wrong,
                ..ASK
            },
        )
        .unwrap_err();
        assert!(
            err.contains("node a: label region=a does not match c"),
            "{err}"
        );
    }

    #[test]
    fn spreads_one_workload_across_nodes() {
        let mut nodes = vec![
            node("a", true, 2000, 1 << 30),
            node("b", true, 2000, 1 << 30),
        ];
        let first = place(&mut nodes, ASK).unwrap();
        let second = place(&mut nodes, ASK).unwrap();
        assert_ne!(first, second);
        assert_eq!(first, "id-a", "ties break by name");
    }

    #[test]
    fn skips_offline_and_full_nodes_and_explains() {
        let mut nodes = vec![
            node("a", false, 2000, 1 << 30),
            node("b", true, 100, 32 << 20),
        ];
        let err = place(&mut nodes, ASK).unwrap_err();
        assert!(err.contains("node a: offline"), "{err}");
        assert!(
            err.contains("node b: insufficient memory (needs 64Mi, 32Mi free)"),
            "{err}"
        );
        nodes[1].memory = 1 << 30;
        let err = place(&mut nodes, ASK).unwrap_err();
        assert!(
            err.contains("node b: insufficient cpu (needs 0.25 cores, 0.1 cores free)"),
            "{err}"
        );
    }

    #[test]
    fn reserves_what_it_places() {
        let mut nodes = vec![node("a", true, 500, 1 << 30)];
        place(&mut nodes, ASK).unwrap();
        place(&mut nodes, ASK).unwrap();
        assert!(
            place(&mut nodes, ASK)
                .unwrap_err()
                .contains("insufficient cpu")
        );
    }

    #[test]
    fn no_nodes_says_how_to_add_one() {
        assert!(
            place(&mut [], ASK)
                .unwrap_err()
                .contains("verge nodes join-token")
        );
    }
}
