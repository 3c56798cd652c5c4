//! Manifest parsing: the SPEC §3 example, defaults, and error reporting.

use super::*;

const SPEC_EXAMPLE: &str = r#"app = "hello"

[env]
RUST_LOG = "info"

[require]
env = ["DATABASE_URL"]
secrets = ["app"]

[workloads.web]
runtime = "process"
image = "127.0.0.1:5000/hello:1.0"
command = ["/hello", "--port", "8080"]
count = 2
cpu = 0.5
memory = "256Mi"
restart = "always"
health = { tcp = 8080, interval = "2s", timeout = "1s" }
volumes = [{ name = "data", path = "/data" }]
secrets = [{ bundle = "app", path = "/run/secrets/app" }]
constraints = { region = "eu-west" }
rollout = { max_surge = 1, max_unavailable = 0, auto_rollback = true }

[workloads.echo]
runtime = "wasm"
image = "127.0.0.1:5000/echo-wasm:1"
mode = "per-connection"
count = 0
memory = "32Mi"

[[endpoints]]
name = "public"
workload = "web"
port = 443
internal_port = 8080
ipv4 = false
proxy_protocol = "v2"
"#;

fn errors(text: &str) -> Vec<String> {
    parse("verge.toml", text)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn the_spec_example_parses_completely() {
    let m = parse("verge.toml", SPEC_EXAMPLE).unwrap();
    assert_eq!(m.app, "hello");
    assert_eq!(m.env["RUST_LOG"], "info");
    assert_eq!(m.require.env, ["DATABASE_URL"]);
    assert_eq!(m.require.secrets, ["app"]);
    let web = &m.workloads["web"];
    assert_eq!(web.runtime, Runtime::Process);
    assert_eq!(
        web.command.as_deref().unwrap(),
        ["/hello", "--port", "8080"]
    );
    assert_eq!((web.count, web.cpu, web.memory), (2, 0.5, 256 << 20));
    assert_eq!(
        web.health,
        Some(Health {
            tcp: 8080,
            interval_ms: 2000,
            timeout_ms: 1000
        })
    );
    assert_eq!(
        web.volumes,
        [VolumeMount {
            name: "data".into(),
            path: "/data".into()
        }]
    );
    assert_eq!(web.secrets[0].bundle, "app");
    assert_eq!(web.constraints["region"], "eu-west");
    assert!(web.rollout.auto_rollback);
    let echo = &m.workloads["echo"];
    assert_eq!(
        (echo.runtime, echo.mode, echo.count),
        (Runtime::Wasm, Mode::PerConnection, 0)
    );
    assert_eq!(m.endpoints[0].ports, [443]);
    assert_eq!(m.endpoints[0].proxy_protocol, Some(ProxyProtocol::V2));
    // A release stores the snapshot as JSON; it must come back the same.
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
}

#[test]
fn the_init_example_parses_and_has_no_gates() {
    let m = parse("verge.toml", EXAMPLE).unwrap();
    assert!(m.require.env.is_empty() && m.require.secrets.is_empty());
    assert_eq!(m.endpoints[0].workload, "web");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let m = parse(
        "verge.toml",
        "app = \"a\"\n[workloads.w]\nimage = \"r/i:1\"\n",
    )
    .unwrap();
    let w = &m.workloads["w"];
    assert_eq!(
        (w.runtime, w.mode, w.restart),
        (Runtime::Process, Mode::LongRunning, Restart::Always)
    );
    assert_eq!(
        (w.count, w.cpu, w.memory),
        (defaults::COUNT, defaults::CPU, defaults::MEMORY)
    );
    assert_eq!(w.command, None);
    assert!(m.endpoints.is_empty());
}

#[test]
fn three_errors_are_reported_at_once_with_line_and_column() {
    let text = "app = \"hello\"\n\
                [workloads.web]\n\
                image = \"r/hello:1\"\n\
                memory = \"lots\"\n\
                cout = 2\n\
                restart = \"sometimes\"\n";
    assert_eq!(
        errors(text),
        [
            "verge.toml:4:10: workloads.web.memory: expected a size like \"256Mi\", found \"lots\"",
            "verge.toml:5:1: workloads.web.cout: unknown key; did you mean \"count\"?",
            "verge.toml:6:11: workloads.web.restart: expected one of \"always\", \"on-failure\", \"never\", found \"sometimes\"",
        ]
    );
}

#[test]
fn unknown_keys_get_a_suggestion_or_the_list() {
    let e = errors("ap = \"x\"\n[workloads.w]\nimage = \"i\"\nzzz = 1\n");
    assert!(
        e.contains(&"verge.toml:1:1: ap: unknown key; did you mean \"app\"?".to_string()),
        "{e:?}"
    );
    assert!(
        e.iter().any(|l| l.starts_with(
            "verge.toml:4:1: workloads.w.zzz: unknown key; expected one of: runtime, image"
        )),
        "{e:?}"
    );
    assert!(e.iter().any(|l| l.contains("app: missing")), "{e:?}");
}

#[test]
fn cross_references_and_ranges_are_checked() {
    let text = r#"app = "a"
[workloads.web]
image = "i"
mode = "per-connection"
count = -1
health = { interval = "2s" }
volumes = [{ name = "data", path = "data" }]
[[endpoints]]
name = "public"
workload = "api"
port = 70000
internal_port = 8080
"#;
    let e = errors(text);
    let expect = [
        "verge.toml:4:8: workloads.web.mode: \"per-connection\" needs runtime = \"wasm\"",
        "verge.toml:5:9: workloads.web.count: expected a count from 0 to 10000, found -1",
        "verge.toml:6:10: workloads.web.health.tcp: missing; the port to check, like tcp = 8080",
        "verge.toml:7:36: workloads.web.volumes[0].path: expected an absolute path without \"..\", found \"data\"",
        "verge.toml:10:12: endpoints[0].workload: no workload \"api\"; workloads: web",
        "verge.toml:11:8: endpoints[0].port: expected a port from 1 to 65535, found 70000",
    ];
    assert_eq!(e, expect);
}

#[test]
fn syntax_errors_are_positioned_too() {
    let e = errors("app = \"a\"\n[workloads.web\nimage = \"i\"\n");
    assert!(e[0].starts_with("verge.toml:2:"), "{e:?}");
    assert!(e[0].contains("invalid TOML"), "{e:?}");
}

#[test]
fn env_names_and_required_items_are_checked() {
    let text = "app = \"a\"\n[env]\n1BAD = \"x\"\nOK = 3\n[require]\nenv = [\"FINE\", \"no-dash\"]\nsecrets = [\"Bad\"]\n[workloads.w]\nimage = \"i\"\n";
    let e = errors(text);
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(
        e[0].starts_with("verge.toml:3:1: env.1BAD: \"1BAD\" is not an environment variable name"),
        "{e:?}"
    );
    assert_eq!(e[1], "verge.toml:4:6: env.OK: expected a string, found 3");
    assert!(
        e[2].starts_with(
            "verge.toml:6:16: require.env[1]: \"no-dash\" is not an environment variable name"
        ),
        "{e:?}"
    );
    assert!(
        e[3].starts_with("verge.toml:7:12: require.secrets[0]: secret bundle name \"Bad\""),
        "{e:?}"
    );
}

#[test]
fn mounts_need_their_own_paths_and_volumes_their_own_workload() {
    let base = "app = \"a\"\n[workloads.db]\nimage = \"i\"\n";
    let e = errors(&format!(
        "{base}volumes = [{{ name = \"data\", path = \"/data\" }}]\n\
         secrets = [{{ bundle = \"s\", path = \"/data/s\" }}]\n"
    ));
    assert!(
        e[0].contains("secret files cannot live on a volume"),
        "{e:?}"
    );
    let e = errors(&format!(
        "{base}volumes = [{{ name = \"data\", path = \"/proc/x\" }}]\n"
    ));
    assert!(e[0].contains("under /proc, /sys or /dev"), "{e:?}");
    let e = errors(&format!(
        "{base}secrets = [{{ bundle = \"s\", path = \"/run/s\" }}, {{ bundle = \"t\", path = \"/run/s/\" }}]\n"
    ));
    assert!(e[0].contains("collides with"), "{e:?}");
    let e = errors(&format!(
        "{base}volumes = [{{ name = \"data\", path = \"/data\" }}]\n\
         [workloads.web]\nimage = \"i\"\nvolumes = [{{ name = \"data\", path = \"/d\" }}]\n"
    ));
    assert!(e[0].contains("also mounted by workload db"), "{e:?}");
    let e = errors(&format!(
        "{base}secrets = [{{ bundle = \"s\", path = \"/run/s\", format = \"yaml\" }}]\n"
    ));
    assert!(e[0].contains("format"), "{e:?}");
    let m = parse(
        "verge.toml",
        &format!("{base}secrets = [{{ bundle = \"s\", path = \"/run/s\", format = \"json\" }}]\n"),
    )
    .unwrap();
    assert_eq!(m.workloads["db"].secrets[0].format, SecretFormat::Json);
}

#[test]
fn secret_files_render_as_env_lines_or_json() {
    let values = BTreeMap::from([
        ("B".to_string(), "two words".to_string()),
        ("A".to_string(), "line1\nline2 \"q\" \\".to_string()),
        ("C".to_string(), "\"quoted\"".to_string()),
    ]);
    assert_eq!(
        SecretFormat::Env.render(&values),
        "A=\"line1\\nline2 \\\"q\\\" \\\\\"\nB=two words\nC=\"\\\"quoted\\\"\"\n"
    );
    let json: BTreeMap<String, String> =
        serde_json::from_str(&SecretFormat::Json.render(&values)).unwrap();
    assert_eq!(json, values);
}
