//! `verge logs` end to end, as root: a real control plane, two real `verge
//! node` daemons in network namespaces, workloads that write to stdout and
//! stderr (the `hello-debug` image: hello plus a busybox shell), and the
//! real CLI. History merged across nodes in time order; filters by
//! workload, instance, source, severity and time returning exactly the
//! expected lines; `--follow` receiving a line written later; the logs of
//! a crashed, replaced instance still readable (also after a node daemon
//! restart); an offline node reported, not left out.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use verge_tests::cluster::{Cluster, DEADLINE};
use verge_tests::control::Backend;
use verge_tests::eventually;

const WORKER_UP: &str =
    "echo worker $VERGE_INSTANCE_ID up; echo 'WARN: disk low' >&2; exec sleep 3600";

fn manifest(image: &str, worker: &str, restart: &str) -> String {
    format!(
        "[workloads.web]\nimage = \"{image}\"\ncount = 2\ncpu = 0.1\nmemory = \"64Mi\"\n\
         [workloads.worker]\nimage = \"{image}\"\ncount = 1\ncpu = 0.1\nmemory = \"64Mi\"\n\
         restart = \"{restart}\"\ncommand = [\"/bin/sh\", \"-c\", \"{worker}\"]\n\
         rollout = {{ deadline = \"20s\" }}\n"
    )
}

/// `verge logs ARGS -o json`: its lines (stdout, NDJSON) and stderr.
async fn logs(c: &Cluster, args: &[&str]) -> (Vec<Value>, String) {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    all.extend(["-o", "json"]);
    let run = c.cli.run(&all).await;
    assert!(run.success(), "verge {all:?}: {}", run.stderr());
    let lines = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (lines, run.stderr())
}

fn messages(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect()
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// The env's instances once every one of them runs.
async fn all_running(c: &Cluster, n: usize) -> Vec<Value> {
    eventually(DEADLINE, &format!("{n} instances running"), || async {
        let s = c.json(&["status"]).await;
        let inst: Vec<Value> = s["workloads"]
            .as_array()?
            .iter()
            .flat_map(|w| {
                let name = w["name"].clone();
                w["instances"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |mut i| {
                        i["workload"] = name.clone();
                        i
                    })
            })
            .filter(|i| i["state"] == "running")
            .collect();
        (inst.len() == n && s["rollout"]["state"] == "completed").then_some(inst)
    })
    .await
}

/// Writes `line` to the stdout of the instance's workload (its PID 1).
async fn say(c: &Cluster, instance: &str, line: &str) {
    let script = format!("echo {line} > /proc/1/fd/1");
    c.cli
        .run(&["exec", "--instance", instance, "--", "sh", "-c", &script])
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn history_filters_follow_crashes_restarts_and_offline_nodes() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let mut n1 = c.node(1, "n1", &[], true).await;
    let mut n2 = c.node(2, "n2", &[], true).await;
    let image = c.registry.push_debug().await;
    let run = c
        .deploy_raw(&manifest(&image, WORKER_UP, "on-failure"))
        .await;
    assert!(run.success(), "{}", run.stderr());
    let instances = all_running(&c, 3).await;
    let of = |w: &str| -> Vec<String> {
        instances
            .iter()
            .filter(|i| i["workload"] == w)
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (web, worker) = (of("web"), of("worker")[0].clone());
    let nodes: Vec<&str> = instances
        .iter()
        .map(|i| i["node"].as_str().unwrap())
        .collect();
    assert!(
        nodes.contains(&"n1") && nodes.contains(&"n2"),
        "spread: {nodes:?}"
    );

    // The worker's two lines are there once the history has them.
    let app = eventually(DEADLINE, "the worker's app lines", || async {
        let (lines, _) = logs(&c, &["--workload", "worker", "--source", "app"]).await;
        (lines.len() == 2).then_some(lines)
    })
    .await;
    assert_eq!(app[0]["message"], format!("worker {worker} up"));
    assert_eq!(
        (app[0]["stream"].as_str(), app[0]["severity"].as_str()),
        (Some("stdout"), Some("info"))
    );
    assert_eq!(app[1]["message"], "WARN: disk low");
    assert_eq!(
        (app[1]["stream"].as_str(), app[1]["severity"].as_str()),
        (Some("stderr"), Some("warn"))
    );
    assert!(
        app.iter()
            .all(|l| l["instance"] == worker.as_str() && l["source"] == "app")
    );

    // The whole history: both nodes' instances, app and system lines,
    // merged in time order.
    let (all, _) = logs(&c, &[]).await;
    let times: Vec<&str> = all.iter().map(|l| l["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "time order: {times:?}"
    );
    for id in web.iter().chain([&worker]) {
        for source in ["app", "system"] {
            assert!(
                all.iter()
                    .any(|l| l["instance"] == id.as_str() && l["source"] == source),
                "{source} lines of {id}"
            );
        }
    }
    let seen: std::collections::BTreeSet<&str> =
        all.iter().map(|l| l["node"].as_str().unwrap()).collect();
    assert_eq!(seen, ["n1", "n2"].into());
    // The text format: time source workload instance message.
    let text = c
        .cli
        .run(&["logs", "--workload", "worker", "--source", "app"])
        .await
        .ok();
    let first = text.lines().next().unwrap();
    assert_eq!(
        first.split_whitespace().skip(1).collect::<Vec<_>>(),
        [
            "app",
            "worker",
            worker.as_str(),
            "worker",
            worker.as_str(),
            "up"
        ]
    );

    // Filters return exactly the expected lines.
    let (lines, _) = logs(
        &c,
        &[
            "--workload",
            "worker",
            "--source",
            "app",
            "--severity",
            "warn",
        ],
    )
    .await;
    assert_eq!(messages(&lines), ["WARN: disk low"]);
    let (lines, _) = logs(&c, &["--instance", &web[0], "--source", "app"]).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("hello listening on")
    );
    assert_eq!(lines[0]["instance"], web[0].as_str());
    // Bad input is refused, saying what is wrong.
    let run = c.cli.run(&["logs", "--since", "yesterday-ish"]).await;
    assert!(
        !run.success() && run.stderr().contains("RFC 3339"),
        "{}",
        run.stderr()
    );
    let run = c.cli.run(&["logs", "--follow", "--until", "1m"]).await;
    assert!(
        !run.success() && run.stderr().contains("--until"),
        "{}",
        run.stderr()
    );
    let vars: std::collections::HashMap<String, String> = c.cli.env_vars().into_iter().collect();
    let bad = reqwest::Client::new()
        .get(format!(
            "{}/v1/orgs/acme/apps/hello/envs/prod/logs?since=nope",
            vars["VERGE_SERVER"].trim_end_matches('/')
        ))
        .bearer_auth(&vars["VERGE_TOKEN"])
        .send()
        .await
        .expect("logs request");
    assert_eq!(bad.status(), 400);
    let body = bad.text().await.unwrap();
    assert!(
        body.contains("since=\\\"nope\\\" is not an RFC 3339 time"),
        "{body}"
    );
    let run = c
        .cli
        .run(&["logs", "--instance", &web[0], "--workload", "worker"])
        .await;
    assert!(!run.success());
    assert!(
        run.stderr().contains("is of workload web, not worker"),
        "{}",
        run.stderr()
    );
    let (lines, _) = logs(&c, &["--workload", "web", "--source", "system"]).await;
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l["workload"] == "web" && l["source"] == "system")
    );

    // Time: a line written between t0 and t1, another after t1.
    let t0 = now();
    say(&c, &worker, "marker-1").await;
    eventually(DEADLINE, "marker-1 in the logs", || async {
        let (lines, _) = logs(&c, &["--instance", &worker, "--since", &t0]).await;
        messages(&lines).contains(&"marker-1").then_some(())
    })
    .await;
    let t1 = now();
    say(&c, &worker, "marker-2").await;
    let window = [
        "--workload",
        "worker",
        "--source",
        "app",
        "--since",
        &t0,
        "--until",
        &t1,
    ];
    let (lines, _) = logs(&c, &window).await;
    assert_eq!(messages(&lines), ["marker-1"]);
    let after = eventually(DEADLINE, "marker-2 after t1", || async {
        let (lines, _) = logs(
            &c,
            &["--workload", "worker", "--source", "app", "--since", &t1],
        )
        .await;
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(messages(&after), ["marker-2"]);

    // --follow: the history, then a line written later.
    let mut follow = c
        .cli
        .command(&[
            "logs",
            "--follow",
            "--workload",
            "worker",
            "--source",
            "app",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("verge logs --follow starts");
    let mut out = BufReader::new(follow.stdout.take().unwrap()).lines();
    until(&mut out, "marker-2").await;
    say(&c, &worker, "marker-3").await;
    let live = until(&mut out, "marker-3").await;
    assert_eq!(live["instance"], worker.as_str());
    // Lines written in one write share their capture time: all of them come.
    let burst = r"printf 'burst-1\nburst-2\nburst-3\n' > /proc/1/fd/1";
    c.cli
        .run(&["exec", "--instance", &worker, "--", "sh", "-c", burst])
        .await
        .ok();
    for marker in ["burst-1", "burst-2", "burst-3"] {
        until(&mut out, marker).await;
    }

    // A crash: v2's worker exits 3 and is not restarted; v3 replaces it.
    let crash = "echo crashing $VERGE_INSTANCE_ID; exit 3";
    c.deploy_raw(&manifest(&image, crash, "never")).await;
    let crashed = eventually(DEADLINE, "the v2 worker failed", || async {
        let s = c.json(&["status"]).await;
        s["workloads"]
            .as_array()?
            .iter()
            .filter(|w| w["name"] == "worker")
            .flat_map(|w| w["instances"].as_array().cloned().unwrap_or_default())
            .find(|i| i["state"] == "failed")
            .map(|i| i["id"].as_str().unwrap().to_string())
    })
    .await;
    // The follow started before v2 picks up its new instance.
    let seen = until(&mut out, &format!("crashing {crashed}")).await;
    assert_eq!(seen["instance"], crashed.as_str());
    drop(follow);
    let fixed = WORKER_UP.replace("up;", "fixed;");
    let run = c.deploy_raw(&manifest(&image, &fixed, "on-failure")).await;
    assert!(run.success(), "{}", run.stderr());
    eventually(DEADLINE, "the crashed worker replaced", || async {
        let s = c.json(&["status"]).await;
        let ids = serde_json::to_string(&s["workloads"]).unwrap();
        (!ids.contains(&crashed) && s["rollout"]["state"] == "completed").then_some(())
    })
    .await;
    let check_crashed = || async {
        let (lines, _) = logs(&c, &["--previous", "--workload", "worker"]).await;
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["instance"] == crashed.as_str())
            .collect();
        assert!(
            mine.iter()
                .any(|l| l["source"] == "app" && l["message"] == format!("crashing {crashed}")),
            "the crashed instance's own line: {mine:?}"
        );
        assert!(
            mine.iter()
                .any(|l| l["source"] == "system"
                    && l["message"].as_str().unwrap().contains("code 3")),
            "the system line of its exit: {mine:?}"
        );
        let (by_id, _) = logs(&c, &["--instance", &crashed]).await;
        assert_eq!(by_id.len(), mine.len());
        mine.len()
    };
    let before = check_crashed().await;
    // Without --previous, only instances the env has now.
    let (now_lines, _) = logs(&c, &["--workload", "worker"]).await;
    assert!(now_lines.iter().all(|l| l["instance"] != crashed.as_str()));

    // Node daemons restart: the history is still all there.
    let server = n1.server_for(&c.cp.cluster);
    n1.stop().await;
    n1.start(&server, None, &[]).await;
    let server2 = n2.server_for(&c.cp.cluster);
    n2.stop().await;
    n2.start(&server2, None, &[]).await;
    all_running(&c, 3).await;
    let after = eventually(
        DEADLINE,
        "the crashed instance's logs after restarts",
        || async {
            let (lines, _) = logs(&c, &["--instance", &crashed]).await;
            (lines.len() >= before).then_some(lines.len())
        },
    )
    .await;
    assert!(after >= before);

    // An offline node is named, and the other node's lines still come.
    n2.kill9().await;
    eventually(Duration::from_secs(60), "n2 offline", || async {
        let nodes = c.json(&["nodes", "list"]).await;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == "n2" && n["state"] == "offline")
            .then_some(())
    })
    .await;
    let (lines, stderr) = logs(&c, &[]).await;
    assert!(
        stderr.contains("logs of instances on node n2 unavailable: offline since"),
        "{stderr}"
    );
    assert!(lines.iter().any(|l| l["node"] == "n1"));
    assert!(lines.iter().all(|l| l["node"] != "n2"));
}

/// Reads `verge logs --follow -o json` lines until the one saying `marker`.
async fn until(
    out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    marker: &str,
) -> Value {
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = out.next_line().await.expect("reading verge logs") {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["message"] == marker {
                return v;
            }
        }
        panic!("verge logs --follow ended before {marker}")
    })
    .await;
    found.unwrap_or_else(|_| panic!("{marker} never came through verge logs --follow"))
}

/// Lines the backpressure test's workload writes before it says so.
const FLOOD: usize = 400_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_slows_the_stream_and_memory_stays_bounded() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &["--log-file-size", "512Mi"], true).await;
    let image = c.registry.push_debug().await;
    // ~100-byte lines as fast as the shell can, then a last line.
    let line = "x".repeat(96);
    let flood = format!("yes {line} | head -n {FLOOD}; echo flood-done; exec sleep 3600");
    let run = c
        .deploy_raw(&format!(
            "[workloads.flood]\nimage = \"{image}\"\ncount = 1\ncpu = 0.5\nmemory = \"64Mi\"\n\
             command = [\"/bin/sh\", \"-c\", \"{flood}\"]\n"
        ))
        .await;
    assert!(run.success(), "{}", run.stderr());
    all_running(&c, 1).await;
    let vars: std::collections::HashMap<String, String> = c.cli.env_vars().into_iter().collect();
    let url = format!(
        "{}/v1/orgs/acme/apps/hello/envs/prod/logs?source=app",
        vars["VERGE_SERVER"].trim_end_matches('/')
    );
    let http = reqwest::Client::new();
    let get = || http.get(&url).bearer_auth(&vars["VERGE_TOKEN"]).send();
    // Every line captured: the last one is there.
    eventually(DEADLINE, "the flood captured", || async {
        let text = get().await.ok()?.text().await.ok()?;
        text.contains("flood-done").then_some(())
    })
    .await;

    // A reader that takes one chunk, then stops reading for a while.
    let before = c.cp.rss();
    let mut resp = get().await.expect("logs request");
    assert!(resp.status().is_success());
    let first = resp
        .chunk()
        .await
        .expect("a first chunk")
        .expect("not empty");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = c.cp.rss();
    // The history is ~80 MB of NDJSON; a control plane that buffered it
    // for the stalled reader would grow by that much.
    assert!(
        held.saturating_sub(before) < 24 << 20,
        "the control plane grew by {} MiB while the reader stalled",
        held.saturating_sub(before) >> 20
    );
    // Then everything arrives, in order, nothing lost.
    let mut buf = first.to_vec();
    let mut lines = 0usize;
    let mut bytes = buf.len();
    let mut done = false;
    loop {
        while let Some(at) = buf.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = buf.drain(..=at).collect();
            let v: Value = serde_json::from_slice(&l).expect("an NDJSON line");
            match v["message"].as_str() {
                Some(m) if m == line => lines += 1,
                Some("flood-done") => done = true,
                other => panic!("unexpected line {other:?}"),
            }
        }
        match resp.chunk().await.expect("reading the stream") {
            Some(chunk) => {
                bytes += chunk.len();
                buf.extend_from_slice(&chunk);
            }
            None => break,
        }
    }
    assert_eq!(lines, FLOOD);
    assert!(done, "the last line came last");
    assert!(bytes > 64 << 20, "the history was {} MiB", bytes >> 20);
}

/// A followed stream outlives a quiet spell longer than the CLI's 60 s read
/// timeout (the control plane's keep-alives hold it open), then still
/// delivers the next line.
#[tokio::test(flavor = "multi_thread")]
async fn a_follow_survives_a_long_quiet_spell() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let image = c.registry.push_debug().await;
    let run = c
        .deploy_raw(&manifest(&image, WORKER_UP, "on-failure"))
        .await;
    assert!(run.success(), "{}", run.stderr());
    let worker = all_running(&c, 3)
        .await
        .into_iter()
        .find(|i| i["workload"] == "worker")
        .map(|i| i["id"].as_str().unwrap().to_string())
        .unwrap();
    // Relative times work too: the last hour holds the worker's first lines.
    eventually(DEADLINE, "the worker's lines in the last hour", || async {
        let (lines, _) = logs(
            &c,
            &["--workload", "worker", "--source", "app", "--since", "1h"],
        )
        .await;
        (lines.len() == 2).then_some(())
    })
    .await;
    let mut follow = c
        .cli
        .command(&[
            "logs",
            "--follow",
            "--instance",
            &worker,
            "--source",
            "app",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("verge logs --follow starts");
    let mut out = BufReader::new(follow.stdout.take().unwrap()).lines();
    until(&mut out, "WARN: disk low").await;
    // Quiet for longer than the client's read timeout: this wait is the
    // behaviour under test, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(75)).await;
    say(&c, &worker, "after-the-quiet").await;
    until(&mut out, "after-the-quiet").await;
    // It never had to reconnect.
    follow.start_kill().unwrap();
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut follow.stderr.take().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(!err.contains("reconnecting"), "{err}");
}
