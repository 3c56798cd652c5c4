//! WebAssembly workloads end to end, as root: a real control plane, a real
//! `verge node` in its own network namespace running wasmtime, the wasm
//! examples of images/ pushed as OCI wasm artifacts to Debian's
//! `docker-registry`, a real `verge ingress`, and the real CLI.
//!
//! - A long-running WASI preview 2 component (`tcp-echo`) serves TCP with
//!   WASI sockets in its instance's network namespace, health-checked, and
//!   is reached through an endpoint of the ingress; its stdout is in
//!   `verge logs`; `verge exec` is refused.
//! - A per-connection WASI preview 1 module (`echo`) answers through its
//!   endpoint with no instance running: 100 connections held open at once
//!   each get their own instance (each greets with its own random ID), and
//!   once they close nothing runs.
//! - The memory limit traps a module that grows its memory (`oom`), an
//!   infinite loop is stopped at its `max_cpu_time` (`crash`), a trap is a
//!   `crash` with the trap in the system logs; a per-connection instance
//!   over its memory is counted and reported as an event.
//! - A release's arguments, env vars (the manifest's and the env's), a
//!   volume preopened writable at its path (kept across restarts) and a
//!   secret file preopened read-only reach a wasm instance (`probe.wat`).
//! - Rollback from a wasm release to a process release and back, through
//!   the ingress; compiled code comes from the node's cache after a
//!   rollback and after a node restart (its system log says so).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use verge_tests::cluster::{Cluster, DEADLINE, v6};
use verge_tests::control::Backend;
use verge_tests::eventually;

/// The workload `name` in `verge status -o json`.
async fn workload(c: &Cluster, name: &str) -> Value {
    let s = c.json(&["status"]).await;
    s["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The instance of `name` once it is in `state` (and, when `category` is
/// given, with that category: its `reason` is `CATEGORY: message`).
async fn instance_in(c: &Cluster, name: &str, state: &str, category: Option<&str>) -> Value {
    eventually(
        DEADLINE,
        &format!("an instance of {name} {state}"),
        || async {
            let w = workload(c, name).await;
            w["instances"].as_array()?.iter().find_map(|i| {
                let reason = i["reason"].as_str().unwrap_or_default();
                let in_category =
                    category.is_none_or(|cat| reason.starts_with(&format!("{cat}: ")));
                (i["state"] == state && in_category).then(|| i.clone())
            })
        },
    )
    .await
}

/// The external IPv6 address of endpoint `name`.
async fn endpoint_ip(c: &Cluster, name: &str) -> String {
    c.endpoint(name).await["ipv6"]
        .as_str()
        .expect("an IPv6 address")
        .to_string()
}

/// Connects and reads until the first newline (or `None` on failure).
async fn first_line(addr: SocketAddr) -> Option<(TcpStream, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        line.push(byte[0]);
    }
    Some((s, String::from_utf8_lossy(&line).to_string()))
}

/// Sends `msg` and reads back as many bytes.
async fn echoes(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == msg
}

/// `verge logs` lines of `workload` from `source` (app or system).
async fn logs(c: &Cluster, workload: &str, source: &str) -> String {
    c.cli
        .run(&[
            "logs",
            "--workload",
            workload,
            "--source",
            source,
            "--previous",
        ])
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_serves_through_the_ingress_and_per_connection_scales_to_zero() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let tcp = c.registry.push_wasm("tcp-echo").await;
    let echo = c.registry.push_wasm("echo").await;
    let _ingress = c.ingress().await;
    c.deploy_raw(&format!(
            "[workloads.tcp]\nruntime = \"wasm\"\nimage = \"{tcp}\"\ncount = 1\ncpu = 0.2\nmemory = \"32Mi\"\n\
             health = {{ tcp = 8080, interval = \"1s\" }}\n\
             [workloads.echo]\nruntime = \"wasm\"\nimage = \"{echo}\"\nmode = \"per-connection\"\n\
             memory = \"16Mi\"\nconcurrency = 200\n\
             [[endpoints]]\nname = \"tcp\"\nworkload = \"tcp\"\nport = 81\ninternal_port = 8080\n\
             [[endpoints]]\nname = \"echo\"\nworkload = \"echo\"\nport = 82\ninternal_port = 7000\n"
    ))
    .await
    .ok();

    // Long-running: a component serving with WASI sockets, healthy, behind
    // the ingress.
    let inst = eventually(DEADLINE, "tcp running and healthy", || async {
        let w = workload(&c, "tcp").await;
        let i = w["instances"].as_array()?.first()?.clone();
        (i["state"] == "running" && i["health"] == "healthy" && w["runtime"] == "wasm").then_some(i)
    })
    .await;
    let tcp_ip = endpoint_ip(&c, "tcp").await;
    let (mut s, greeting) = eventually(DEADLINE, "a greeting through the ingress", || {
        first_line(v6(&tcp_ip, 81))
    })
    .await;
    assert_eq!(greeting, "hello from wasm\n");
    assert!(echoes(&mut s, b"ping through the ingress\n").await);
    drop(s);
    let events = c.cli.run(&["events"]).await.ok();
    for kind in ["instance.placed", "instance.running", "instance.healthy"] {
        assert!(events.contains(kind), "{kind}: {events}");
    }
    let app = logs(&c, "tcp", "app").await;
    assert!(app.contains("tcp-echo: listening on [::]:8080"), "{app}");
    let exec = c
        .cli
        .run(&[
            "exec",
            "--instance",
            inst["id"].as_str().unwrap(),
            "--",
            "sh",
        ])
        .await;
    assert!(
        exec.stderr().contains("not supported for wasm"),
        "{}",
        exec.stderr()
    );

    // Per-connection: no instance runs, and the endpoint answers.
    let w = eventually(DEADLINE, "echo's listener answering", || async {
        let w = workload(&c, "echo").await;
        let answering = w["listeners"]
            .as_array()?
            .iter()
            .any(|l| l["answering"] == true && l["node"] == "n1");
        answering.then_some(w)
    })
    .await;
    assert_eq!(w["mode"], "per-connection", "{w}");
    assert_eq!(w["running"], 0, "{w}");
    assert_eq!(w["instances"].as_array().map(Vec::len), Some(0), "{w}");
    let echo_ip = endpoint_ip(&c, "echo").await;
    let addr = v6(&echo_ip, 82);
    eventually(DEADLINE, "echo answers through the ingress", || async {
        first_line(addr).await.map(|_| ())
    })
    .await;

    // 100 connections open at once: each is greeted by its own instance
    // (its own random ID), and each echoes its own bytes.
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..100 {
        opening.spawn(first_line(addr));
    }
    let mut conns: Vec<(TcpStream, String)> = opening
        .join_all()
        .await
        .into_iter()
        .map(|c| c.expect("every connection is greeted"))
        .collect();
    let ids: BTreeSet<String> = conns
        .iter()
        .map(|(_, g)| {
            g.strip_prefix("echo from wasm instance ")
                .unwrap_or_else(|| panic!("a greeting with an instance ID: {g:?}"))
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 100, "100 instances, 100 IDs: {ids:?}");
    let active = eventually(DEADLINE, "100 active connections reported", || async {
        let w = workload(&c, "echo").await;
        let l = w["listeners"].as_array()?.first()?.clone();
        (l["active"] == 100).then_some(l)
    })
    .await;
    assert_eq!(active["node"], "n1");
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        assert!(echoes(s, format!("connection {i}\n").as_bytes()).await);
    }
    drop(conns);
    // Closed: nothing runs, and every connection was counted.
    eventually(DEADLINE, "all served, none active", || async {
        let w = workload(&c, "echo").await;
        let l = w["listeners"].as_array()?.first()?.clone();
        (l["active"] == 0 && l["served"].as_u64()? >= 101 && l["failed"] == 0).then_some(())
    })
    .await;
    assert_eq!(workload(&c, "echo").await["running"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wasm_limits_stop_memory_hogs_runaway_loops_and_traps_and_say_so() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let memhog = c.registry.push_wasm("memhog").await;
    let spin = c.registry.push_wasm("spin").await;
    let crash = c.registry.push_wasm("crash").await;
    let _ingress = c.ingress().await;
    c.deploy_raw(&format!(
        "[workloads.hog]\nruntime = \"wasm\"\nimage = \"{memhog}\"\ncount = 1\nmemory = \"16Mi\"\nrestart = \"never\"\n\
         [workloads.spin]\nruntime = \"wasm\"\nimage = \"{spin}\"\ncount = 1\nmemory = \"16Mi\"\nrestart = \"never\"\n\
         max_cpu_time = \"500ms\"\n\
         [workloads.crash]\nruntime = \"wasm\"\nimage = \"{crash}\"\ncount = 1\nmemory = \"16Mi\"\nrestart = \"never\"\n\
         [workloads.perhog]\nruntime = \"wasm\"\nimage = \"{memhog}\"\nmode = \"per-connection\"\nmemory = \"16Mi\"\n\
         [[endpoints]]\nname = \"perhog\"\nworkload = \"perhog\"\nport = 83\ninternal_port = 7001\n"
    ))
    .await
    .ok();

    // The memory limit traps the module that grows past it.
    let hog = instance_in(&c, "hog", "failed", Some("oom")).await;
    let msg = hog["reason"].as_str().unwrap_or_default();
    assert!(msg.contains("memory limit of 16 MiB reached"), "{hog}");
    // The infinite loop is stopped at its CPU time limit, and reported.
    let spun = instance_in(&c, "spin", "failed", Some("crash")).await;
    let msg = spun["reason"].as_str().unwrap_or_default();
    assert!(msg.contains("without waiting"), "{spun}");
    let app = logs(&c, "spin", "app").await;
    assert!(app.contains("spinning"), "{app}");
    // A trap is a crash, with wasmtime's message in the system logs.
    instance_in(&c, "crash", "failed", Some("crash")).await;
    let system = logs(&c, "crash", "system").await;
    assert!(system.contains("unreachable"), "{system}");
    let app = logs(&c, "crash", "app").await;
    assert!(app.contains("about to trap"), "{app}");
    let system = logs(&c, "hog", "system").await;
    assert!(system.contains("memory limit"), "{system}");
    // Events as for processes: the failures, with their categories.
    let events = c.cli.run(&["events"]).await.ok();
    assert!(events.contains("instance.failed"), "{events}");
    assert!(
        events.contains("memory limit of 16 MiB reached"),
        "{events}"
    );

    // Per connection: the instance is stopped, the connection closed, the
    // failure counted and an event says so.
    let ip = endpoint_ip(&c, "perhog").await;
    eventually(DEADLINE, "perhog's listener answering", || async {
        let w = workload(&c, "perhog").await;
        w["listeners"]
            .as_array()?
            .iter()
            .any(|l| l["answering"] == true)
            .then_some(())
    })
    .await;
    eventually(DEADLINE, "a failed connection counted", || async {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(v6(&ip, 83))).await
        {
            let mut buf = [0u8; 64];
            // The instance dies at its limit: the connection ends.
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        }
        let w = workload(&c, "perhog").await;
        let l = w["listeners"].as_array()?.first()?.clone();
        (l["failed"].as_u64()? >= 1 && l["last_failure_category"] == "oom").then_some(())
    })
    .await;
    let events = c.cli.run(&["events"]).await.ok();
    assert!(events.contains("listener.connection_failed"), "{events}");
    let system = logs(&c, "perhog", "system").await;
    assert!(system.contains("memory limit"), "{system}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_between_wasm_and_process_and_compiled_code_from_the_cache() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let mut n1 = c.node(1, "n1", &[], true).await;
    let tcp = c.registry.push_wasm("tcp-echo").await;
    let hello = c.registry.push_hello().await;
    let _ingress = c.ingress().await;
    let web = |image: &str, runtime: &str| {
        format!(
            "[workloads.web]\nruntime = \"{runtime}\"\nimage = \"{image}\"\ncount = 1\ncpu = 0.1\nmemory = \"32Mi\"\n\
             health = {{ tcp = 8080, interval = \"1s\" }}\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n"
        )
    };
    let greets = |want: &'static str| {
        let c = &c;
        async move {
            let ip = endpoint_ip(c, "public").await;
            eventually(
                DEADLINE,
                &format!("a greeting starting {want:?}"),
                || async {
                    let (_, g) = first_line(v6(&ip, 80)).await?;
                    g.starts_with(want).then_some(())
                },
            )
            .await
        }
    };

    c.deploy_raw(&web(&tcp, "wasm")).await.ok();
    greets("hello from wasm").await;
    let system = logs(&c, "web", "system").await;
    assert!(system.contains("compiled sha256:"), "{system}");
    c.deploy_raw(&web(&hello, "process")).await.ok();
    greets("hello from instance").await;
    // Back to the wasm release: the same digest, compiled code from the cache.
    c.cli.run(&["rollback", "v1"]).await.ok();
    greets("hello from wasm").await;
    let cached = |s: &str| s.matches("loaded compiled code from the cache").count();
    let system = logs(&c, "web", "system").await;
    assert_eq!(cached(&system), 1, "{system}");
    // And forward again to the process release.
    c.cli.run(&["rollback", "v2"]).await.ok();
    greets("hello from instance").await;
    c.cli.run(&["rollback", "v1"]).await.ok();
    greets("hello from wasm").await;

    // A node restart starts the instance again, without compiling.
    n1.stop().await;
    n1.start(&n1.server_for(&c.cp.cluster), None, &[]).await;
    greets("hello from wasm").await;
    eventually(DEADLINE, "a cache hit after the node restart", || async {
        let system = logs(&c, "web", "system").await;
        (cached(&system) >= 3).then_some(())
    })
    .await;
    let system = logs(&c, "web", "system").await;
    assert_eq!(
        system.matches("compiled sha256:").count(),
        1,
        "compiled once, then always from the cache: {system}"
    );
}

/// A release's arguments, env vars, a volume and a secret file reach a
/// wasm instance: `probe` prints its args and env, reads the secret file
/// from the preopened `/run/secrets` and appends to a file of the volume
/// preopened at `/data`, so a restart (restart = "always" after its clean
/// exit) shows the volume kept what the previous run wrote.
#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_instance_gets_its_release_args_env_volume_and_secret_files() {
    let c = Cluster::new(Backend::Sqlite, &[]).await;
    let _n1 = c.node(1, "n1", &[], true).await;
    let wasm = verge_images::wasm_from_wat(include_str!("wasm/probe.wat")).expect("probe.wat");
    let probe = format!("{}/probe-wasm:1", c.registry.host());
    verge_images::push_wasm(&wasm, &probe)
        .await
        .expect("push probe");
    c.cli
        .run(&["secrets", "set", "app", "TOKEN=wasm-token-1"])
        .await
        .ok();
    c.cli.run(&["env", "set", "GREETING=hi"]).await.ok();
    c.cli
        .run(&[
            "volumes", "create", "data", "--size", "64Mi", "--node", "n1",
        ])
        .await
        .ok();
    c.deploy_raw(&format!(
        "[env]\nFROM_MANIFEST = \"m1\"\n\
         [workloads.probe]\nruntime = \"wasm\"\nimage = \"{probe}\"\ncommand = [\"one\", \"two\"]\n\
         count = 1\nmemory = \"16Mi\"\nrestart = \"always\"\n\
         volumes = [{{ name = \"data\", path = \"/data\" }}]\n\
         secrets = [{{ bundle = \"app\", path = \"/run/secrets/app\" }}]\n"
    ))
    .await
    .ok();

    let app = eventually(DEADLINE, "two runs of probe in its logs", || async {
        let app = logs(&c, "probe", "app").await;
        app.contains("runs: xx").then_some(app)
    })
    .await;
    assert!(app.contains("args: probe one two"), "{app}");
    for var in ["GREETING=hi", "FROM_MANIFEST=m1", "VERGE_WORKLOAD=probe"] {
        assert!(app.contains(var), "{var}: {app}");
    }
    assert!(app.contains("secret: TOKEN=wasm-token-1"), "{app}");
    // The first run wrote one x, the second found it and added another.
    assert!(
        app.contains("runs: x\n") || app.contains("runs: x "),
        "{app}"
    );
}
