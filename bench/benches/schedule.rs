//! Scale to many nodes: placement and reconcile passes on large clusters.
//!
//! In memory, through the real code paths the reconciler runs: simulated
//! node rows become the pass's cluster view (`ClusterView::new`, as
//! `ClusterView::read` builds it from the store), then every env is planned
//! with `reconcile::plan::plan` against that one shared view, reservations
//! accumulating from env to env as in a reconcile pass (the planner calls
//! `scheduler::place` once per workload). For 1,000, 2,500, 5,000 and
//! 10,000 nodes (8 regions, 16 cores and 64 GiB each) it deploys 100
//! instances per node (100,000 … 1,000,000): envs of 1–3 workloads whose
//! counts run over 1..=200 deterministically, of 4 CPU and 4 memory sizes,
//! one workload in 10 constrained to a region. Then the created instances
//! become instance rows (running, as the store would return them) and a
//! second pass over the same envs is measured: it must plan nothing (the
//! steady-state cost of the periodic pass). Each size runs in its own
//! child process, so its memory figures (VmRSS, VmHWM) are its own.
//!
//! Then a large env on its own: one workload of N instances scaled to 1, so
//! the planner stops N - 1 of them in one plan.
//!
//! Then runs through the real store: SQLite in a temp dir with 50,000
//! instances in envs of the same shapes on 1,000 and on 5,000 nodes,
//! reconciled by `reconcile::reconcile_all` (plan, then every create
//! applied with its event, one transaction per env), then a converged
//! `reconcile_all`.
//!
//! Run: `cargo bench -p verge-bench --bench schedule` (release build).
//! `VERGE_BENCH_NODES=1000,10000` picks the simulated sizes;
//! `VERGE_BENCH_STORE=NODES,INSTANCES;...` the store runs (`0` skips them).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use verge_api::manifest::Manifest;
use verge_control::reconcile::plan::{self, Action, Clock, EnvInput};
use verge_control::reconcile::{self, ClusterView, Settings};
use verge_control::scheduler::{self, Ask, REGION};
use verge_control::store::{Hello, InstanceRow, NewNode, NodeRow, ReleaseRow, Store};

const SIZES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];
const PER_NODE: usize = 100;
const REGIONS: usize = 8;
const NODE_CPU_MILLIS: i64 = 16_000;
const NODE_MEMORY: i64 = 64 << 30;
/// Per workload, by `k % 4` and `(k / 4) % 4`: 0.125 cores and 480 MiB on
/// average, so 100 instances fill a node to about 78% and 73%.
const CPUS: [&str; 4] = ["0.05", "0.1", "0.1", "0.25"];
const MEMORIES: [&str; 4] = ["128Mi", "256Mi", "512Mi", "1Gi"];
/// Store runs: `NODES,INSTANCES;...`.
const STORE_RUNS: &str = "1000,50000;5000,50000";
const CHILD: &str = "VERGE_BENCH_SCHEDULE_CHILD";
const RESCHEDULE_AFTER_MS: i64 = 5 * 60 * 1000;

fn main() -> anyhow::Result<()> {
    if let Ok(what) = std::env::var(CHILD) {
        let result = match what.split_once(':') {
            Some(("sim", n)) => simulate(n.parse()?)?,
            Some(("env", n)) => large_env(n.parse()?)?,
            Some(("store", spec)) => {
                let (nodes, instances) = spec.split_once(',').expect("NODES,INSTANCES");
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?
                    .block_on(through_store(nodes.parse()?, instances.parse()?))?
            }
            _ => anyhow::bail!("unknown {CHILD}={what}"),
        };
        println!("RESULT {result}");
        return Ok(());
    }

    let sizes: Vec<usize> = match std::env::var("VERGE_BENCH_NODES") {
        Ok(s) => s
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let mut sims = Vec::new();
    for n in &sizes {
        eprintln!("simulating {n} nodes, {} instances ...", n * PER_NODE);
        sims.push(child(&format!("sim:{n}"))?);
    }
    print_simulated(&sims);

    let mut envs = Vec::new();
    for n in [1_250, 2_500, 5_000, 10_000] {
        eprintln!("one env of {n} instances scaled to 1 ...");
        envs.push(child(&format!("env:{n}"))?);
    }
    print_large_envs(&envs);

    let store = std::env::var("VERGE_BENCH_STORE").unwrap_or_else(|_| STORE_RUNS.into());
    let mut runs = Vec::new();
    for spec in store.split(';').filter(|s| *s != "0") {
        eprintln!("through the store: {spec} (nodes, instances) ...");
        runs.push(child(&format!("store:{spec}"))?);
    }
    if !runs.is_empty() {
        print_store(&runs);
    }
    Ok(())
}

/// Runs this program again with `CHILD=what`; returns its result.
fn child(what: &str) -> anyhow::Result<Value> {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD, what)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "child {what} failed: {}", out.status);
    let stdout = String::from_utf8(out.stdout)?;
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("child {what} printed no result"))?;
    Ok(serde_json::from_str(line)?)
}

// ---------------------------------------------------------------- the cluster

/// One workload of a generated env.
struct WorkloadSpec {
    name: String,
    count: usize,
    /// Its index among all generated workloads: picks sizes and constraints.
    k: usize,
}

/// One generated env with its current release.
struct Env {
    id: String,
    release_id: String,
    app: String,
    manifest: Manifest,
    /// The manifest's text (the store run makes releases from it).
    text: String,
    instances: usize,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Node rows as the store returns them: online, not draining, nothing reserved.
fn node_rows(n: usize, now: i64) -> Vec<NodeRow> {
    (0..n)
        .map(|i| NodeRow {
            id: node_id(i),
            name: node_name(i),
            labels: json!({ "region": region(i), "arch": "amd64" }).to_string(),
            cpu_millis: NODE_CPU_MILLIS,
            memory: NODE_MEMORY,
            usage: None,
            isolation: "full".into(),
            version: "0.1.0".into(),
            state: "online".into(),
            state_since: now - 3_600_000,
            last_seen: Some(now),
            prefix_index: i as i64 + 1,
            instance_prefix: format!("fd8a:6b1e:0:{:x}::/64", i + 1),
            cert_sha256: format!("{:064x}", i + 1),
            joined_at: now - 3_600_000,
            desired_version: 0,
            applied_version: 0,
            drain: None,
            drain_deadline: None,
            used_cpu_millis: 0,
            used_memory: 0,
            behind_nat: 0,
        })
        .collect()
}

/// IDs as long as the store's (`n_` and a 26-character ULID).
fn node_id(i: usize) -> String {
    format!("n_01jbench{i:017}")
}

fn node_name(i: usize) -> String {
    format!("edge-{i:05}")
}

fn region(i: usize) -> String {
    format!("r{}", i % REGIONS)
}

/// Envs of 1–3 workloads (by env index) with counts `1 + 73k mod 200`
/// (every value of 1..=200 once per 200 workloads), the last one trimmed
/// so the total is exactly `instances`.
fn generate_envs(instances: usize) -> Vec<Env> {
    let mut envs = Vec::new();
    let (mut k, mut total) = (0, 0);
    while total < instances {
        let e = envs.len();
        let mut workloads = Vec::new();
        for j in 0..1 + e % 3 {
            if total == instances {
                break;
            }
            let count = (1 + (k * 73) % 200).min(instances - total);
            workloads.push(WorkloadSpec {
                name: ["web", "worker", "cron"][j].to_string(),
                count,
                k,
            });
            total += count;
            k += 1;
        }
        let app = format!("app-{e:05}");
        let text = manifest_text(&app, &workloads, None);
        envs.push(Env {
            id: format!("env_01jbench{e:015}"),
            release_id: format!("rel_01jbench{e:015}"),
            manifest: verge_api::manifest::parse("verge.toml", &text).expect("valid manifest"),
            app,
            text,
            instances: workloads.iter().map(|w| w.count).sum(),
        });
    }
    envs
}

/// `count` overrides every workload's count (for the large env).
fn manifest_text(app: &str, workloads: &[WorkloadSpec], count: Option<usize>) -> String {
    let mut text = format!("app = \"{app}\"\n");
    for w in workloads {
        let k = w.k;
        text.push_str(&format!(
            "\n[workloads.{name}]\nimage = \"registry.example.com/{app}/{name}:1\"\n\
             count = {count}\ncpu = {cpu}\nmemory = \"{memory}\"\n",
            name = w.name,
            count = count.unwrap_or(w.count),
            cpu = CPUS[k % 4],
            memory = MEMORIES[(k / 4) % 4],
        ));
        if k % 10 == 9 {
            text.push_str(&format!(
                "constraints = {{ region = \"{}\" }}\n",
                region(k / 10)
            ));
        }
    }
    text
}

/// The rows the store would return for an env's created instances, running.
fn rows_of(
    env: &Env,
    actions: &[Action],
    view: &ClusterView,
    next: &mut usize,
) -> Vec<InstanceRow> {
    let now = now_ms();
    actions
        .iter()
        .map(|a| {
            let Action::Create {
                workload,
                slot,
                node: Ok(node),
                ..
            } = a
            else {
                panic!("a first pass only creates placed instances: {a:?}");
            };
            let w = &env.manifest.workloads[workload];
            *next += 1;
            InstanceRow {
                id: format!("i_01jbench{:017}", *next),
                env_id: env.id.clone(),
                release_id: env.release_id.clone(),
                workload: workload.clone(),
                slot: *slot,
                node_id: Some(node.clone()),
                node_name: Some(view.nodes.name(node).to_string()),
                goal: "run".into(),
                state: "running".into(),
                category: None,
                message: None,
                address: Some(format!("fd8a:6b1e:0:{:x}::{:x}", *next % 65_536, *slot)),
                restarts: 0,
                cpu_millis: plan::cpu_millis(w),
                memory: w.memory as i64,
                created_at: now,
                updated_at: now,
                healthy: None,
            }
        })
        .collect()
}

// ------------------------------------------------------------------- memory

/// (VmRSS, VmHWM) of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn rss() -> u64 {
    memory().0
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

// ----------------------------------------------------------------- in memory

fn simulate(n: usize) -> anyhow::Result<Value> {
    let clock = Clock {
        now_ms: now_ms(),
        reschedule_after_ms: RESCHEDULE_AFTER_MS,
    };
    let rss_start = rss();
    let envs = generate_envs(n * PER_NODE);
    let workloads: usize = envs.iter().map(|e| e.manifest.workloads.len()).sum();
    let rows = node_rows(n, clock.now_ms);
    let rss_generated = rss();

    // The pass's cluster view, as `ClusterView::read` builds it.
    let t = Instant::now();
    let mut view = ClusterView::new(rows.clone(), clock.now_ms);
    let view_time = t.elapsed();
    let rss_view = rss();

    // Placement pass: a fresh deploy of every env, one plan each.
    let mut latencies = Vec::with_capacity(envs.len());
    let mut plans = Vec::with_capacity(envs.len());
    let t = Instant::now();
    for env in &envs {
        let input = EnvInput {
            release_id: &env.release_id,
            manifest: &env.manifest,
            instances: &[],
            hold: false,
            since_ms: 0,
            volumes: &verge_control::reconcile::plan::NO_VOLUMES,
        };
        let t = Instant::now();
        let actions = plan::plan(&input, &mut view.nodes, &view.facts, clock);
        latencies.push(t.elapsed());
        plans.push(actions);
    }
    let pass = t.elapsed();
    let rss_planned = rss();

    // Check: every instance placed, nothing over capacity, spread.
    let placements: usize = plans.iter().map(Vec::len).sum();
    assert_eq!(placements, n * PER_NODE, "one create per instance");
    let mut most_on_one_node = 0;
    for (env, actions) in envs.iter().zip(&plans) {
        assert_eq!(actions.len(), env.instances);
        let mut per: HashMap<(&str, &str), usize> = HashMap::new();
        for a in actions {
            match a {
                Action::Create {
                    workload,
                    node: Ok(node),
                    ..
                } => *per.entry((workload, node)).or_default() += 1,
                other => panic!("unexpected action {other:?}"),
            }
        }
        most_on_one_node = most_on_one_node.max(per.values().copied().max().unwrap_or(0));
    }
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for v in view.nodes.iter() {
        assert!(v.used_cpu_millis <= v.cpu_millis && v.used_memory <= v.memory);
        let share = v.used_cpu_millis as f64 / v.cpu_millis as f64;
        lo = lo.min(share);
        hi = hi.max(share);
    }

    // The instances as rows, then the converged pass over a fresh view.
    let mut next = 0;
    let instance_rows: Vec<Vec<InstanceRow>> = envs
        .iter()
        .zip(&plans)
        .map(|(env, actions)| rows_of(env, actions, &view, &mut next))
        .collect();
    let rss_rows = rss();
    drop(plans);
    let mut used: HashMap<&str, (i64, i64)> = HashMap::new();
    for i in instance_rows.iter().flatten() {
        let u = used
            .entry(i.node_id.as_deref().expect("placed"))
            .or_default();
        u.0 += i.cpu_millis;
        u.1 += i.memory;
    }
    let reserved: Vec<NodeRow> = rows
        .iter()
        .map(|r| {
            let (cpu, memory) = used.get(r.id.as_str()).copied().unwrap_or_default();
            NodeRow {
                used_cpu_millis: cpu,
                used_memory: memory,
                ..r.clone()
            }
        })
        .collect();
    let t = Instant::now();
    let mut view = ClusterView::new(reserved, clock.now_ms);
    let view2_time = t.elapsed();
    let mut converged_latencies = Vec::with_capacity(envs.len());
    let t = Instant::now();
    for (env, instances) in envs.iter().zip(&instance_rows) {
        let input = EnvInput {
            release_id: &env.release_id,
            manifest: &env.manifest,
            instances,
            hold: false,
            since_ms: 0,
            volumes: &verge_control::reconcile::plan::NO_VOLUMES,
        };
        let t = Instant::now();
        let actions = plan::plan(&input, &mut view.nodes, &view.facts, clock);
        converged_latencies.push(t.elapsed());
        assert!(
            actions.is_empty(),
            "a converged pass plans nothing: {actions:?}"
        );
    }
    let converged = t.elapsed();
    let (rss_end, hwm) = memory();

    // The fixed cost of a workload's placement, whatever its count: `place`
    // of one instance on the filled cluster, unconstrained and constrained
    // to one region (median of 21, each on a copy of the view).
    let fixed = |constraints: &BTreeMap<String, String>| {
        let ask = Ask {
            workload: "probe",
            cpu_millis: 100,
            memory: 256 << 20,
            constraints,
            pin: None,
        };
        let mut times: Vec<Duration> = (0..21)
            .map(|_| {
                let mut nodes = view.nodes.clone();
                let t = Instant::now();
                let placed = scheduler::place(&mut nodes, &ask, &[], 1);
                let took = t.elapsed();
                assert!(placed[0].is_ok(), "{placed:?}");
                took
            })
            .collect();
        times.sort();
        times[10].as_secs_f64() * 1e6
    };
    let place_one_us = fixed(&BTreeMap::new());
    let place_one_constrained_us = fixed(&BTreeMap::from([(REGION.to_string(), region(3))]));
    let unconstrained: Vec<Duration> = {
        let mut l: Vec<Duration> = envs
            .iter()
            .zip(&latencies)
            .filter(|(e, _)| {
                e.manifest
                    .workloads
                    .values()
                    .all(|w| w.constraints.is_empty())
            })
            .map(|(_, l)| *l)
            .collect();
        l.sort();
        l
    };

    latencies.sort();
    converged_latencies.sort();
    let instances = (n * PER_NODE) as f64;
    Ok(json!({
        "nodes": n,
        "envs": envs.len(),
        "workloads": workloads,
        "instances": n * PER_NODE,
        "view_ms": view_time.as_secs_f64() * 1e3,
        "view2_ms": view2_time.as_secs_f64() * 1e3,
        "pass_s": pass.as_secs_f64(),
        "placements_per_s": instances / pass.as_secs_f64(),
        "us_per_workload": pass.as_secs_f64() * 1e6 / workloads as f64,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
        "max_us": percentile(&latencies, 1.0),
        "p99_unconstrained_us": percentile(&unconstrained, 0.99),
        "place_one_us": place_one_us,
        "place_one_constrained_us": place_one_constrained_us,
        "converged_ms": converged.as_secs_f64() * 1e3,
        "converged_p99_us": percentile(&converged_latencies, 0.99),
        "most_on_one_node": most_on_one_node,
        "cpu_share_min": lo,
        "cpu_share_max": hi,
        "rss_start": rss_start,
        "rss_generated": rss_generated,
        "rss_view": rss_view,
        "rss_planned": rss_planned,
        "rss_rows": rss_rows,
        "rss_end": rss_end,
        "hwm": hwm,
        "view_bytes_per_node": (rss_view - rss_generated) as f64 / n as f64,
        "plan_bytes_per_instance": (rss_planned - rss_view) as f64 / instances,
        "row_bytes_per_instance": (rss_rows - rss_planned) as f64 / instances,
    }))
}

fn print_simulated(sims: &[Value]) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("\nPlacement pass (every env planned once, fresh deploy) and converged pass:\n");
    println!(
        "| nodes  | envs  | workloads | instances | view ms | pass s | placements/s | µs/workload | p50 µs | p99 µs |  max µs | converged ms | ns/inst conv |"
    );
    println!(
        "|--------|-------|-----------|-----------|---------|--------|--------------|-------------|--------|--------|---------|--------------|--------------|"
    );
    for s in sims {
        println!(
            "| {:>6} | {:>5} | {:>9} | {:>9} | {:>7.1} | {:>6.2} | {:>12.0} | {:>11.1} | {:>6.0} | {:>6.0} | {:>7.0} | {:>12.1} | {:>12.0} |",
            u(s, "nodes"),
            u(s, "envs"),
            u(s, "workloads"),
            u(s, "instances"),
            f(s, "view_ms"),
            f(s, "pass_s"),
            f(s, "placements_per_s"),
            f(s, "us_per_workload"),
            f(s, "p50_us"),
            f(s, "p99_us"),
            f(s, "max_us"),
            f(s, "converged_ms"),
            f(s, "converged_ms") * 1e6 / f(s, "instances"),
        );
    }
    println!(
        "\nWhere placement time goes: `place` of one instance (the per-workload cost, whatever the count), on the filled cluster:\n"
    );
    println!(
        "| nodes  | place(1) µs | place(1), region constraint µs | env p99 µs, envs without constraints |"
    );
    println!(
        "|--------|-------------|--------------------------------|--------------------------------------|"
    );
    for s in sims {
        println!(
            "| {:>6} | {:>11.0} | {:>30.0} | {:>36.0} |",
            u(s, "nodes"),
            f(s, "place_one_us"),
            f(s, "place_one_constrained_us"),
            f(s, "p99_unconstrained_us"),
        );
    }
    println!("\nMemory (RSS of the size's own process; MiB unless noted):\n");
    println!(
        "| nodes  | start | envs+nodes | +view | +plans | +rows | end  | peak (HWM) | B/node view | B/inst plan | B/inst row | cpu share min–max | max per node |"
    );
    println!(
        "|--------|-------|------------|-------|--------|-------|------|------------|-------------|-------------|------------|-------------------|--------------|"
    );
    let mib = |v: &Value, k: &str| f(v, k) / (1 << 20) as f64;
    for s in sims {
        println!(
            "| {:>6} | {:>5.0} | {:>10.0} | {:>5.0} | {:>6.0} | {:>5.0} | {:>4.0} | {:>10.0} | {:>11.0} | {:>11.0} | {:>10.0} | {:>8.2} – {:>6.2} | {:>12} |",
            u(s, "nodes"),
            mib(s, "rss_start"),
            mib(s, "rss_generated"),
            mib(s, "rss_view"),
            mib(s, "rss_planned"),
            mib(s, "rss_rows"),
            mib(s, "rss_end"),
            mib(s, "hwm"),
            f(s, "view_bytes_per_node"),
            f(s, "plan_bytes_per_instance"),
            f(s, "row_bytes_per_instance"),
            f(s, "cpu_share_min"),
            f(s, "cpu_share_max"),
            u(s, "most_on_one_node"),
        );
    }
    if let (Some(a), Some(b)) = (sims.first(), sims.last())
        && sims.len() > 1
    {
        let ratio = |k: &str| f(b, k) / f(a, k);
        let per_instance = |v: &Value, k: &str| f(v, k) / f(v, "instances");
        println!(
            "\nGrowth from {} to {} nodes ({:.0}× nodes, {:.0}× instances):",
            a["nodes"],
            b["nodes"],
            ratio("nodes"),
            ratio("instances")
        );
        println!(
            "  placement pass time      {:>6.1}×   (time per placement {:.2}×)",
            ratio("pass_s"),
            per_instance(b, "pass_s") / per_instance(a, "pass_s")
        );
        println!(
            "  time per workload plan   {:>6.2}×",
            ratio("us_per_workload")
        );
        println!(
            "  env decision p50 / p99   {:>6.2}× / {:.2}×",
            ratio("p50_us"),
            ratio("p99_us")
        );
        println!(
            "  converged pass           {:>6.1}×   (per instance {:.2}×)",
            ratio("converged_ms"),
            per_instance(b, "converged_ms") / per_instance(a, "converged_ms")
        );
        println!("  cluster view build       {:>6.1}×", ratio("view_ms"));
        println!(
            "  peak RSS                 {:>6.1}×   (bytes per instance {:.2}×)",
            ratio("hwm"),
            per_instance(b, "hwm") / per_instance(a, "hwm")
        );
    }
}

// ---------------------------------------------------------------- large env

/// One env with one workload of `n` instances on 1,000 nodes, placed, then
/// scaled to 1: the plan that stops `n - 1` of them.
fn large_env(n: usize) -> anyhow::Result<Value> {
    let clock = Clock {
        now_ms: now_ms(),
        reschedule_after_ms: RESCHEDULE_AFTER_MS,
    };
    let nodes = 1_000;
    let spec = [WorkloadSpec {
        name: "web".into(),
        count: n,
        k: 0,
    }];
    let text = manifest_text("big", &spec, None);
    let env = Env {
        id: "env_big".into(),
        release_id: "rel_big".into(),
        app: "big".into(),
        manifest: verge_api::manifest::parse("verge.toml", &text)?,
        text,
        instances: n,
    };
    let mut view = ClusterView::new(node_rows(nodes, clock.now_ms), clock.now_ms);
    let input = EnvInput {
        release_id: &env.release_id,
        manifest: &env.manifest,
        instances: &[],
        hold: false,
        since_ms: 0,
        volumes: &verge_control::reconcile::plan::NO_VOLUMES,
    };
    let t = Instant::now();
    let actions = plan::plan(&input, &mut view.nodes, &view.facts, clock);
    let place = t.elapsed();
    assert_eq!(actions.len(), n);
    let rows = rows_of(&env, &actions, &view, &mut 0);

    let one = verge_api::manifest::parse("verge.toml", &manifest_text("big", &spec, Some(1)))?;
    let input = EnvInput {
        release_id: &env.release_id,
        manifest: &one,
        instances: &rows,
        hold: false,
        since_ms: 0,
        volumes: &verge_control::reconcile::plan::NO_VOLUMES,
    };
    let t = Instant::now();
    let actions = plan::plan(&input, &mut view.nodes, &view.facts, clock);
    let scale_down = t.elapsed();
    assert_eq!(actions.len(), n - 1, "every instance but one stops");
    Ok(json!({
        "instances": n,
        "place_ms": place.as_secs_f64() * 1e3,
        "scale_down_ms": scale_down.as_secs_f64() * 1e3,
    }))
}

fn print_large_envs(envs: &[Value]) {
    println!("\nOne env, one workload on 1,000 nodes: deploy N, then scale to 1 (N - 1 stops):\n");
    println!("| instances | place ms | scale to 1 ms | µs per stop |");
    println!("|-----------|----------|---------------|-------------|");
    for e in envs {
        let n = e["instances"].as_f64().unwrap_or(f64::NAN);
        let down = e["scale_down_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {:>9} | {:>8.1} | {:>13.1} | {:>11.2} |",
            u(e, "instances"),
            e["place_ms"].as_f64().unwrap_or(f64::NAN),
            down,
            down * 1e3 / (n - 1.0),
        );
    }
}

// ------------------------------------------------------------- the store

async fn through_store(nodes: usize, instances: usize) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&format!(
        "sqlite://{}",
        dir.path().join("verge.db").display()
    ))
    .await?;
    let now = now_ms();

    // Nodes, joined and online, in one transaction.
    let t = Instant::now();
    let mut tx = store.mutation().await?;
    for r in node_rows(nodes, now) {
        let new = NewNode {
            id: &r.id,
            name: &r.name,
            labels: &r.labels,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            isolation: &r.isolation,
            version: &r.version,
            cert_sha256: &r.cert_sha256,
            join_token_id: "jt_bench",
        };
        let prefix = r.instance_prefix.clone();
        let row = tx
            .insert_node(&new, move |_| Some(prefix.clone()))
            .await?
            .expect("a prefix");
        let hello = Hello {
            labels: &r.labels,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            isolation: &r.isolation,
            version: &r.version,
            applied_version: 0,
            behind_nat: false,
        };
        tx.node_online(&row, &hello).await?;
    }
    tx.commit().await?;

    // An app and env per generated env, each with its current release.
    let envs = generate_envs(instances);
    let org = store.create_org("acme").await?;
    let project = store.create_project(&org.id, "edge").await?;
    let mut tx_envs = Vec::new();
    for e in &envs {
        let app = store.create_app(&org.id, &project, &e.app).await?;
        let env = store.create_env(&app, "prod").await?;
        tx_envs.push((env.id, e));
    }
    let pools = verge_control::Config::default().addressing()?;
    let mut tx = store.mutation().await?;
    for (env_id, e) in &tx_envs {
        let manifest = verge_api::manifest::parse("verge.toml", &e.text).expect("valid");
        tx.insert_release(&ReleaseRow {
            id: e.release_id.clone(),
            env_id: env_id.clone(),
            number: 1,
            manifest: serde_json::to_string(&manifest)?,
            images: "{}".into(),
            config_version: 0,
            secrets: "{}".into(),
            fingerprint: format!("bench-{}", e.release_id),
            parent_id: None,
            created_at: now,
            created_by: "bench".into(),
        })
        .await?;
        tx.make_current(
            env_id,
            &e.release_id,
            None,
            &manifest,
            &Default::default(),
            &pools,
        )
        .await?;
    }
    tx.commit().await?;
    let setup = t.elapsed();

    // What one cluster-view read costs (a pass reads it once; a placement
    // that loses to another replica's reads it again).
    let t = Instant::now();
    let reads = 20;
    for _ in 0..reads {
        ClusterView::read(&store).await?;
    }
    let view_read = t.elapsed() / reads;

    let settings = Settings {
        reschedule_after_ms: RESCHEDULE_AFTER_MS,
        addressing: pools,
    };
    let t = Instant::now();
    let out = reconcile::reconcile_all(&store, settings).await?;
    let pass = t.elapsed();
    let changed = out.changed.len();

    // Every instance placed.
    let mut placed = 0;
    for (env_id, _) in &tx_envs {
        for i in store.env_instances(env_id).await? {
            assert!(
                i.node_id.is_some(),
                "instance {} unplaced: {:?}",
                i.id,
                i.message
            );
            placed += 1;
        }
    }
    assert_eq!(placed, instances);

    let t = Instant::now();
    let again = reconcile::reconcile_all(&store, settings).await?;
    let converged = t.elapsed();
    assert!(again.changed.is_empty(), "a converged pass changes nothing");
    let (rss, hwm) = memory();
    store.close().await;
    Ok(json!({
        "nodes": nodes,
        "envs": envs.len(),
        "instances": instances,
        "setup_s": setup.as_secs_f64(),
        "pass_s": pass.as_secs_f64(),
        "instances_per_s": instances as f64 / pass.as_secs_f64(),
        "changed_nodes": changed,
        "view_read_ms": view_read.as_secs_f64() * 1e3,
        "converged_ms": converged.as_secs_f64() * 1e3,
        "rss": rss,
        "hwm": hwm,
    }))
}

fn print_store(runs: &[Value]) {
    let f = |s: &Value, k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    println!("\nThrough the store (SQLite, synchronous=FULL), reconcile_all:\n");
    println!(
        "| nodes  | envs | instances | placing pass s | instances/s | converged ms | converged µs/env | ClusterView::read ms | peak RSS MiB |"
    );
    println!(
        "|--------|------|-----------|----------------|-------------|--------------|------------------|----------------------|--------------|"
    );
    for s in runs {
        println!(
            "| {:>6} | {:>4} | {:>9} | {:>14.2} | {:>11.0} | {:>12.1} | {:>16.0} | {:>20.2} | {:>12.0} |",
            u(s, "nodes"),
            u(s, "envs"),
            u(s, "instances"),
            f(s, "pass_s"),
            f(s, "instances_per_s"),
            f(s, "converged_ms"),
            f(s, "converged_ms") * 1e3 / f(s, "envs"),
            f(s, "view_read_ms"),
            f(s, "hwm") / (1 << 20) as f64,
        );
    }
}
