//! `verge exec` end to end, as root: a real control plane, a real `verge
//! node` in a network namespace, the `hello` workload with a busybox shell
//! (`hello-debug`), and the real CLI: exit codes, separate output, stdin
//! streamed (10 MiB round trip), the instance's identity, the choice of
//! instance, the recorded event, an interactive session driven through
//! tmux, the session limit, no process left behind by a killed CLI, and
//! wasm workloads refused.

use std::process::Stdio;
use std::time::Duration;

use rand::RngCore as _;
use serde_json::Value;
use verge_tests::cluster::{Cluster, DEADLINE};
use verge_tests::control::Backend;
use verge_tests::eventually;
use verge_tests::nodes::NodeHost;

/// The cluster, one node (at most two exec sessions per instance) and two
/// `web` instances of hello-debug.
struct World {
    c: Cluster,
    _node: NodeHost,
    image: String,
    /// The two instances' IDs.
    ids: Vec<String>,
}

impl World {
    async fn new() -> World {
        let c = Cluster::new(Backend::Sqlite, &[]).await;
        let node = c.node(1, "n1", &["--exec-max-sessions", "2"], true).await;
        let image = c.registry.push_debug().await;
        c.deploy(&image, 2, "", "").await;
        let ids = c
            .running(2)
            .await
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect();
        World {
            c,
            _node: node,
            image,
            ids,
        }
    }

    async fn exec(&self, args: &[&str]) -> verge_tests::cli::Run {
        let mut all = vec!["exec"];
        all.extend_from_slice(args);
        self.c.cli.run(&all).await
    }

    /// The processes of an instance, as its own `ps` lists them.
    async fn ps(&self, id: &str) -> String {
        self.exec(&["--instance", id, "--", "ps", "-o", "pid,args"])
            .await
            .ok()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_the_instance_with_its_exit_code_output_and_input() {
    let w = World::new().await;
    let a = w.ids[0].as_str();

    // The exit code becomes verge's.
    let run = w.exec(&["--instance", a, "--", "sh", "-c", "exit 3"]).await;
    assert_eq!(run.output.status.code(), Some(3), "{}", run.stderr());

    // In the instance: its hostname is its ID, its workload is PID 1 of
    // its own PID namespace, and it has the release's environment.
    let run = w
        .exec(&["--instance", a, "--", "cat", "/etc/hostname"])
        .await;
    assert_eq!(run.ok().trim(), a);
    let ps = w.ps(a).await;
    assert!(
        ps.lines()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("/hello")),
        "the workload is PID 1 of the PID namespace exec ran in:\n{ps}"
    );
    let env = w.exec(&["--instance", a, "--", "env"]).await.ok();
    assert!(env.contains(&format!("VERGE_INSTANCE_ID={a}")), "{env}");

    // stdout and stderr stay apart.
    let run = w
        .exec(&[
            "--instance",
            a,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 0",
        ])
        .await;
    assert_eq!(run.ok(), "out\n");
    assert_eq!(run.stderr(), "err\n");

    // 10 MiB of random bytes through `cat` and back, exactly.
    let mut input = vec![0u8; 10 * 1024 * 1024];
    rand::rng().fill_bytes(&mut input);
    let run =
        w.c.cli
            .run_with_stdin(&["exec", "-i", "--instance", a, "--", "cat"], input.clone())
            .await;
    assert!(run.success(), "{}", run.stderr());
    assert_eq!(run.output.stdout.len(), input.len());
    assert!(run.output.stdout == input, "the bytes came back changed");

    // Several instances and no terminal: refused, listing them.
    let run = w.exec(&["--", "true"]).await;
    assert!(!run.success());
    for id in &w.ids {
        assert!(run.stderr().contains(id.as_str()), "{}", run.stderr());
    }
    assert!(run.stderr().contains("--instance"), "{}", run.stderr());

    // A command the image does not have: refused, saying so.
    let run = w.exec(&["--instance", a, "--", "no-such-tool"]).await;
    assert!(!run.success());
    assert!(run.stderr().contains("no-such-tool"), "{}", run.stderr());

    // An unknown instance is 404-like, naming it.
    let run = w.exec(&["--instance", "nope", "--", "true"]).await;
    assert!(!run.success());
    assert!(run.stderr().contains("nope"), "{}", run.stderr());

    // The session is an event: who, which instance, the command; never
    // its output.
    let events = w.c.json(&["events"]).await;
    let events = events.as_array().expect("events");
    let started: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "exec.started" && e["instance"] == a)
        .collect();
    assert!(
        started.iter().any(
            |e| e["message"].as_str().unwrap().contains("sh -c 'exit 3'")
                && e["actor"].as_str().is_some_and(|a| !a.is_empty())
        ),
        "{started:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "exec.ended"
                && e["message"].as_str().unwrap().contains("exit code 3")),
        "exec.ended with the exit code"
    );
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains("out\\n") && !all.contains(&format!("{a}\\n")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_cli_leaves_no_process_and_sessions_are_bounded() {
    let w = World::new().await;
    let a = w.ids[0].as_str();

    // Two sessions are the node's limit (--exec-max-sessions 2): a third is refused.
    let errors: Vec<std::path::PathBuf> = (0..2)
        .map(|n| w.c.dir.path().join(format!("exec-{n}.err")))
        .collect();
    let mut long: Vec<tokio::process::Child> = errors
        .iter()
        .map(|err| {
            w.c.cli
                .command(&[
                    "exec",
                    "--instance",
                    a,
                    "--",
                    "sh",
                    "-c",
                    "sleep 1000 & sleep 1001",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(err).expect("stderr file"))
                .kill_on_drop(true)
                .spawn()
                .expect("verge exec starts")
        })
        .collect();
    let said = || {
        errors
            .iter()
            .map(|e| std::fs::read_to_string(e).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let sleeping = |ps: &str| ps.lines().filter(|l| l.contains("sleep 100")).count();
    // Both sessions run (each a shell with two sleeps).
    // Both run once the host sees their two `sleep 1001` (looking from the
    // host: an exec to look would take a session itself).
    let sessions = || sleepers_on_host("sleep 1001", a);
    tokio::time::timeout(DEADLINE, async {
        while sessions() < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the two sessions never both ran; they said:\n{}", said()));
    let run = w.exec(&["--instance", a, "--", "true"]).await;
    assert!(!run.success(), "a third session at once was not refused");
    let third = run.stderr();
    assert!(third.contains("exec sessions"), "{third}");
    assert!(third.contains(a), "{third}");

    // Killing the CLIs (SIGKILL: no goodbye) ends their commands and
    // everything those started.
    for child in &mut long {
        child.start_kill().expect("kill verge exec");
        let _ = child.wait().await;
    }
    let ps = eventually(DEADLINE, "no sleep left in the instance", || async {
        let ps = w.ps(a).await;
        (sleeping(&ps) == 0).then_some(ps)
    })
    .await;
    assert!(
        ps.contains("/hello"),
        "the workload itself still runs:\n{ps}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_session_through_tmux_runs_commands_and_restores_the_terminal() {
    let w = World::new().await;
    let session = format!("verge-exec-{}", w.c.tag);
    let tmux = Tmux::start(&session, &w.c.cli.env_vars()).await;
    // The pane's shell in a known state: canonical mode with echo.
    tmux.keys(&["stty sane; PS1='outer$ '", "Enter"]).await;
    tmux.screen_has("outer$", "the outer shell's prompt").await;
    let verge = verge_tests::verge_bin().display().to_string();
    // No --instance, two running: verge lists them and asks.
    tmux.keys(&[&format!("{verge} exec -it -- sh"), "Enter"])
        .await;
    let screen = tmux
        .screen_has("instance [1-2]:", "the choice of instance")
        .await;
    let first = screen
        .lines()
        .find_map(|l| l.trim().strip_prefix("1) "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no numbered list of instances:\n{screen}"))
        .to_string();
    assert!(w.ids.contains(&first), "{first} is not one of {:?}", w.ids);
    let a = first.as_str();
    tmux.keys(&["1", "Enter"]).await;
    // busybox sh prompts with `/ #` (root in /).
    tmux.screen_has("/ #", "the remote shell's prompt").await;

    tmux.keys(&["echo $((6 * 7)) $(hostname)", "Enter"]).await;
    tmux.screen_has(&format!("42 {a}"), "the command's output")
        .await;

    // The remote terminal has the window's size, and follows a resize.
    tmux.keys(&["stty size", "Enter"]).await;
    tmux.screen_has("30 100", "the initial window size").await;
    tmux.run(&["resize-window", "-t", &session, "-x", "120", "-y", "40"])
        .await;
    tmux.keys(&["clear; stty size", "Enter"]).await;
    tmux.screen_has("40 120", "the resized window").await;

    // Ctrl-C reaches the remote foreground process, not verge.
    tmux.keys(&["sleep 300; echo after-sleep", "Enter"]).await;
    tmux.keys(&["C-c"]).await;
    tmux.keys(&["echo still-$((40 + 2))", "Enter"]).await;
    tmux.screen_has("still-42", "the remote shell after Ctrl-C")
        .await;

    // Exit: verge ends with the shell's code, and the terminal is back in
    // canonical mode with echo (not raw).
    tmux.keys(&["exit 7", "Enter"]).await;
    tmux.screen_has("outer$", "the outer prompt after the session")
        .await;
    tmux.keys(&[
        "c=$?; clear; echo code=$c; stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; echo done-$((1+1))",
        "Enter",
    ])
    .await;
    let screen = tmux.screen_has("done-2", "the terminal's flags").await;
    assert!(screen.contains("code=7"), "verge's exit code:\n{screen}");
    let flags: Vec<&str> = screen.lines().map(str::trim).collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "the terminal is restored (icanon and echo on):\n{screen}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_into_a_wasm_workload_is_refused() {
    let w = World::new().await;
    let image = &w.image;
    let wasm = w.c.registry.push_wasm("tcp-echo").await;
    let run = w
        .c
        .deploy_raw(&format!(
            "[workloads.web]\nimage = \"{image}\"\ncount = 2\ncpu = 0.1\nmemory = \"64Mi\"\n\
             [workloads.edge]\nruntime = \"wasm\"\nimage = \"{wasm}\"\ncount = 1\ncpu = 0.1\nmemory = \"64Mi\"\n\
             [[endpoints]]\nname = \"public\"\nworkload = \"web\"\nport = 80\ninternal_port = 8080\n"
        ))
        .await;
    assert!(run.success(), "{}", run.stderr());
    let run = w.exec(&["--workload", "edge", "--", "true"]).await;
    assert!(!run.success());
    assert!(
        run.stderr().contains("not supported for wasm workloads"),
        "{}",
        run.stderr()
    );
}

/// A detached tmux session of 100×30 cells running `sh` with the CLI's
/// environment; killed when dropped.
struct Tmux {
    session: String,
}

impl Tmux {
    async fn start(session: &str, env: &[(String, String)]) -> Tmux {
        let mut args: Vec<String> = ["new-session", "-d", "-s", session, "-x", "100", "-y", "30"]
            .map(String::from)
            .to_vec();
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(["-e".into(), "TERM=xterm".into(), "sh".into()]);
        let t = Tmux {
            session: session.to_string(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.run(&args).await;
        // No status line: the pane is the whole window.
        t.run(&["set-option", "-t", session, "status", "off"]).await;
        t
    }

    async fn run(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("tmux")
            .args(args)
            .output()
            .await
            .expect("tmux runs (apt-get install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        self.run(&args).await;
    }

    /// Waits until the pane shows `text`; returns the screen.
    async fn screen_has(&self, text: &str, what: &str) -> String {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let screen = self.run(&["capture-pane", "-p", "-t", &self.session]).await;
                if screen.contains(text) {
                    return screen;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        match found {
            Ok(screen) => screen,
            Err(_) => {
                let screen = self.run(&["capture-pane", "-p", "-t", &self.session]).await;
                panic!("{what}: {text:?} never showed; the screen:\n{screen}")
            }
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

/// Host processes whose command line is `cmdline` (spaces for NULs) and
/// whose cgroup names the instance `id`.
fn sleepers_on_host(cmdline: &str, id: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            cmd.trim() == cmdline && cgroup.contains(id)
        })
        .count()
}
