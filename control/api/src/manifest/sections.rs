//! The rules of each section of the manifest: which keys it has, which are
//! required, their defaults, and the checks across sections.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::check::{Cx, Value, default_rollout, env_var_name, join, no_check, opt};
use super::units::parse_size;
use super::{
    Endpoint, EndpointLimits, Health, Manifest, Mode, ProxyProtocol, Require, Restart, Rollout,
    Runtime, SecretFormat, SecretMount, VolumeMount, Workload, defaults,
};

/// Paths Verge mounts in every instance: no volume or secret goes there.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev"];

/// `path` is `dir` or below it (both without a trailing `/`).
fn under(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

impl Cx<'_> {
    pub(super) fn manifest(&mut self, doc: &DeTable<'_>, span: Range<usize>) -> Option<Manifest> {
        self.known_keys(
            "",
            doc,
            &["app", "env", "require", "workloads", "endpoints"],
        );
        let app = match doc.get("app") {
            Some(v) => self.checked("app", v, |s| crate::names::validate("app", s)),
            None => {
                self.error(
                    span.start..span.start,
                    "app: missing; add a line like app = \"hello\"".into(),
                );
                None
            }
        };
        let env = doc
            .get("env")
            .map_or(Some(BTreeMap::new()), |v| self.env(v));
        let require = doc
            .get("require")
            .map_or(Some(Require::default()), |v| self.require(v));
        let workloads = match doc.get("workloads") {
            Some(v) => self.workloads(v),
            None => {
                self.error(
                    span.start..span.start,
                    "workloads: missing; add at least one [workloads.NAME] table".into(),
                );
                None
            }
        };
        // References are checked against the declared names, even when a
        // workload has errors of its own, so that those are reported too.
        let declared: Option<Vec<String>> = match doc.get("workloads").map(|v| v.get_ref()) {
            Some(DeValue::Table(t)) => Some(t.keys().map(|k| k.get_ref().to_string()).collect()),
            _ => None,
        };
        let endpoints = doc
            .get("endpoints")
            .map_or(Some(Vec::new()), |v| self.endpoints(v, declared.as_deref()));
        Some(Manifest {
            app: app?,
            env: env?,
            require: require?,
            workloads: workloads?,
            endpoints: endpoints?,
        })
    }

    fn env(&mut self, v: &Value<'_>) -> Option<BTreeMap<String, String>> {
        self.string_table("env", v, env_var_name)
    }

    fn require(&mut self, v: &Value<'_>) -> Option<Require> {
        let table = self.table("require", v)?;
        self.known_keys("require", table, &["env", "secrets"]);
        let mut list = |key: &str, check: fn(&str) -> Result<(), String>| match table.get(key) {
            None => Some(Vec::new()),
            Some(v) => self.strings(&join("require", key), v, check),
        };
        let env = list("env", env_var_name);
        let secrets = list("secrets", |s| crate::names::validate("secret bundle", s));
        Some(Require {
            env: env?,
            secrets: secrets?,
        })
    }

    fn workloads(&mut self, v: &Value<'_>) -> Option<BTreeMap<String, Workload>> {
        let table = self.table("workloads", v)?;
        if table.is_empty() {
            self.error(
                v.span(),
                "workloads: empty; add at least one [workloads.NAME] table".into(),
            );
            return None;
        }
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join("workloads", name);
            if let Err(why) = crate::names::validate("workload", name) {
                self.error(key.span(), format!("{path}: {why}"));
                ok = false;
            }
            match self.workload(&path, value) {
                Some(w) => {
                    for v in &w.volumes {
                        let other = out
                            .iter()
                            .find(|(_, o): &(&String, &Workload)| {
                                o.volumes.iter().any(|ov| ov.name == v.name)
                            })
                            .map(|(n, _)| n.clone());
                        if let Some(other) = other {
                            self.error(
                                key.span(),
                                format!(
                                    "{path}.volumes: volume {:?} is also mounted by workload \
                                     {other}; a volume is attached to one instance at a time: \
                                     give each workload its own volume",
                                    v.name
                                ),
                            );
                            ok = false;
                        }
                    }
                    out.insert(name.to_string(), w);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn workload(&mut self, path: &str, v: &Value<'_>) -> Option<Workload> {
        const KEYS: &[&str] = &[
            "runtime",
            "image",
            "command",
            "count",
            "cpu",
            "memory",
            "restart",
            "mode",
            "health",
            "volumes",
            "secrets",
            "constraints",
            "rollout",
            "concurrency",
            "max_cpu_time",
        ];
        let t = self.table(path, v)?;
        self.known_keys(path, t, KEYS);
        let p = |key: &str| join(path, key);
        let runtime = opt(t.get("runtime"), Runtime::Process, |v| {
            self.choice(
                &p("runtime"),
                v,
                &[("process", Runtime::Process), ("wasm", Runtime::Wasm)],
            )
        });
        let image = match t.get("image") {
            Some(v) => self.checked(&p("image"), v, |s| {
                if s.is_empty() || s.contains(char::is_whitespace) {
                    Err("expected an image reference like \"registry.example/app:1.0\"".into())
                } else {
                    Ok(())
                }
            }),
            None => {
                self.error(
                    v.span(),
                    format!("{}: missing; every workload needs an image", p("image")),
                );
                None
            }
        };
        let command = match t.get("command") {
            None => Some(None),
            Some(v) => self.strings(&p("command"), v, no_check).map(Some),
        };
        let cpu = opt(t.get("cpu"), defaults::CPU, |v| self.cpu(&p("cpu"), v));
        let memory = opt(t.get("memory"), defaults::MEMORY, |v| {
            let s = self.string(&p("memory"), v)?;
            let bytes = parse_size(&s);
            if bytes.is_none() {
                self.error(
                    v.span(),
                    format!(
                        "{}: expected a size like \"256Mi\", found {s:?}",
                        p("memory")
                    ),
                );
            }
            bytes
        });
        let restart = opt(t.get("restart"), Restart::Always, |v| {
            let choices = [
                ("always", Restart::Always),
                ("on-failure", Restart::OnFailure),
                ("never", Restart::Never),
            ];
            self.choice(&p("restart"), v, &choices)
        });
        let mut mode = opt(t.get("mode"), Mode::LongRunning, |v| {
            self.choice(
                &p("mode"),
                v,
                &[
                    ("long-running", Mode::LongRunning),
                    ("per-connection", Mode::PerConnection),
                ],
            )
        });
        if let (Some(Mode::PerConnection), Some(Runtime::Process), Some(v)) =
            (mode, runtime, t.get("mode"))
        {
            self.error(
                v.span(),
                format!("{}: \"per-connection\" needs runtime = \"wasm\"", p("mode")),
            );
            mode = None;
        }
        let per_connection = mode == Some(Mode::PerConnection);
        // Per-connection workloads keep no instances: each connection gets
        // its own, on every node that matches.
        let count = match t.get("count") {
            Some(v) if per_connection => {
                let n = self.integer(&p("count"), v, 0..10_001, "a count from 0 to 10000");
                if n.is_some_and(|n| n != 0) {
                    self.error(
                        v.span(),
                        format!(
                            "{}: a per-connection workload keeps no instances running: every \
                             matching node starts a fresh instance for each connection; remove \
                             count (or set count = 0)",
                            p("count")
                        ),
                    );
                    None
                } else {
                    Some(0)
                }
            }
            None if per_connection => Some(0),
            _ => opt(t.get("count"), defaults::COUNT, |v| {
                self.integer(&p("count"), v, 0..10_001, "a count from 0 to 10000")
                    .map(|n| n as u32)
            }),
        };
        let concurrency = match t.get("concurrency") {
            Some(v) if !per_connection => {
                self.error(
                    v.span(),
                    format!(
                        "{}: only per-connection workloads have a concurrency limit; set \
                         mode = \"per-connection\" or remove it",
                        p("concurrency")
                    ),
                );
                None
            }
            v => opt(v, defaults::CONCURRENCY, |v| {
                self.integer(
                    &p("concurrency"),
                    v,
                    1..100_001,
                    "a number of connections from 1 to 100000",
                )
                .map(|n| n as u32)
            }),
        };
        let max_cpu_time = match t.get("max_cpu_time") {
            Some(v) if runtime == Some(Runtime::Process) => {
                self.error(
                    v.span(),
                    format!(
                        "{}: only wasm workloads have a CPU time limit (processes get cpu = \
                         cores); remove it or set runtime = \"wasm\"",
                        p("max_cpu_time")
                    ),
                );
                None
            }
            v => opt(v, defaults::MAX_CPU_TIME_MS, |v| {
                let ms = self.duration_ms(&p("max_cpu_time"), v)?;
                if (10..=3_600_000).contains(&ms) {
                    Some(ms)
                } else {
                    self.error(
                        v.span(),
                        format!("{}: expected a duration from 10ms to 1h", p("max_cpu_time")),
                    );
                    None
                }
            }),
        };
        let health = match t.get("health") {
            Some(v) if per_connection => {
                self.error(
                    v.span(),
                    format!(
                        "{}: a per-connection workload has no standing instance to check: \
                         the node watches its listener itself; remove health",
                        p("health")
                    ),
                );
                None
            }
            None => Some(None),
            Some(v) => self.health(&p("health"), v).map(Some),
        };
        let volumes = opt(t.get("volumes"), Vec::new(), |v| {
            self.mounts(&p("volumes"), v, "name", &[], |_, _, _, name, path| {
                Some(VolumeMount { name, path })
            })
        });
        let secrets = opt(t.get("secrets"), Vec::new(), |v| {
            self.mounts(
                &p("secrets"),
                v,
                "bundle",
                &["format"],
                |cx, ipath, t, bundle, path| {
                    let format = opt(t.get("format"), SecretFormat::Env, |v| {
                        cx.choice(
                            &join(ipath, "format"),
                            v,
                            &[("env", SecretFormat::Env), ("json", SecretFormat::Json)],
                        )
                    })?;
                    Some(SecretMount {
                        bundle,
                        path,
                        format,
                    })
                },
            )
        });
        let constraints = opt(t.get("constraints"), BTreeMap::new(), |v| {
            self.string_table(&p("constraints"), v, no_check)
        });
        let rollout = opt(t.get("rollout"), default_rollout(), |v| {
            self.rollout(&p("rollout"), v)
        });
        if let (true, Some(v), Some(vols)) = (per_connection, t.get("volumes"), &volumes)
            && !vols.is_empty()
        {
            self.error(
                v.span(),
                format!(
                    "{}: a per-connection workload runs many instances at once, and a volume \
                     has one writer: use a long-running workload for the volume",
                    p("volumes")
                ),
            );
        }
        if let (Some(vols), Some(secs)) = (&volumes, &secrets) {
            self.check_mounts(path, t, vols, secs);
        }
        Some(Workload {
            runtime: runtime?,
            image: image?,
            command: command?,
            count: count?,
            cpu: cpu?,
            memory: memory?,
            restart: restart?,
            mode: mode?,
            health: health?,
            volumes: volumes?,
            secrets: secrets?,
            constraints: constraints?,
            rollout: rollout?,
            concurrency: concurrency?,
            max_cpu_time_ms: max_cpu_time?,
        })
    }

    /// Mount paths that do not collide. (A count above 1 with volumes is
    /// refused at deploy time, with the env's volumes at hand.)
    fn check_mounts(
        &mut self,
        path: &str,
        t: &DeTable<'_>,
        volumes: &[VolumeMount],
        secrets: &[SecretMount],
    ) {
        let span = |key: &str| t.get(key).map_or(0..0, |v| v.span());
        let mut seen: Vec<(&str, &str)> = Vec::new();
        let mounts = volumes
            .iter()
            .map(|v| ("volumes", v.path.as_str()))
            .chain(secrets.iter().map(|s| ("secrets", s.path.as_str())));
        for (key, p) in mounts {
            let norm = p.trim_end_matches('/');
            if norm.is_empty() || RESERVED.iter().any(|r| under(norm, r)) {
                self.error(
                    span(key),
                    format!(
                        "{path}.{key}: path {p:?} is the root or under /proc, /sys or /dev, \
                         which Verge mounts itself; choose another path like \"/data\""
                    ),
                );
                continue;
            }
            for (other_key, other) in &seen {
                if norm == *other
                    || (key == "secrets" && *other_key == "volumes" && under(norm, other))
                    || (key == "volumes" && *other_key == "secrets" && under(other, norm))
                {
                    self.error(
                        span(key),
                        format!(
                            "{path}.{key}: path {p:?} collides with {other:?} of {other_key}: \
                             each mount needs its own path, and secret files cannot live on a volume"
                        ),
                    );
                }
            }
            seen.push((key, norm));
        }
    }

    fn health(&mut self, path: &str, v: &Value<'_>) -> Option<Health> {
        let t = self.table(path, v)?;
        self.known_keys(path, t, &["tcp", "interval", "timeout"]);
        let tcp = match t.get("tcp") {
            Some(v) => self.port(&join(path, "tcp"), v),
            None => {
                self.error(
                    v.span(),
                    format!("{path}.tcp: missing; the port to check, like tcp = 8080"),
                );
                None
            }
        };
        let interval = opt(t.get("interval"), defaults::HEALTH_INTERVAL_MS, |v| {
            self.duration_ms(&join(path, "interval"), v)
        });
        let timeout = opt(t.get("timeout"), defaults::HEALTH_TIMEOUT_MS, |v| {
            self.duration_ms(&join(path, "timeout"), v)
        });
        Some(Health {
            tcp: tcp?,
            interval_ms: interval?,
            timeout_ms: timeout?,
        })
    }

    /// `[{ KEY = "...", path = "/abs", EXTRA... }, ...]` (volumes, secrets);
    /// `make` reads the extra keys.
    fn mounts<T>(
        &mut self,
        path: &str,
        v: &Value<'_>,
        key: &str,
        extra: &[&str],
        make: impl Fn(&mut Self, &str, &DeTable<'_>, String, String) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.array(
            path,
            v,
            &format!("an array like [{{ {key} = \"...\", path = \"/...\" }}]"),
        )?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ipath = format!("{path}[{i}]");
            let Some(t) = self.table(&ipath, item) else {
                ok = false;
                continue;
            };
            let known: Vec<&str> = [key, "path"].iter().chain(extra).copied().collect();
            self.known_keys(&ipath, t, &known);
            let name = self.required(&ipath, item, t, key, |s| crate::names::validate(key, s));
            let mount = self.required(&ipath, item, t, "path", |s| {
                if s.starts_with('/') && !s.split('/').any(|c| c == "..") {
                    Ok(())
                } else {
                    Err(format!(
                        "expected an absolute path without \"..\", found {s:?}"
                    ))
                }
            });
            match (name, mount) {
                (Some(n), Some(m)) => match make(self, &ipath, t, n, m) {
                    Some(item) => out.push(item),
                    None => ok = false,
                },
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn rollout(&mut self, path: &str, v: &Value<'_>) -> Option<Rollout> {
        let t = self.table(path, v)?;
        self.known_keys(
            path,
            t,
            &["max_surge", "max_unavailable", "auto_rollback", "deadline"],
        );
        let small = |cx: &mut Self, key: &str, default: u32| {
            opt(t.get(key), default, |v| {
                cx.integer(&join(path, key), v, 0..10_001, "a count from 0 to 10000")
                    .map(|n| n as u32)
            })
        };
        let max_surge = small(self, "max_surge", defaults::MAX_SURGE);
        let max_unavailable = small(self, "max_unavailable", defaults::MAX_UNAVAILABLE);
        let auto_rollback = opt(t.get("auto_rollback"), false, |v| {
            self.boolean(&join(path, "auto_rollback"), v)
        });
        let deadline = opt(t.get("deadline"), defaults::ROLLOUT_DEADLINE_MS, |v| {
            self.duration_ms(&join(path, "deadline"), v)
        });
        if max_surge == Some(0) && max_unavailable == Some(0) {
            self.error(v.span(), format!("{path}: max_surge and max_unavailable cannot both be 0: the rollout could never progress"));
            return None;
        }
        Some(Rollout {
            max_surge: max_surge?,
            max_unavailable: max_unavailable?,
            auto_rollback: auto_rollback?,
            deadline_ms: deadline?,
        })
    }

    fn endpoints(&mut self, v: &Value<'_>, workloads: Option<&[String]>) -> Option<Vec<Endpoint>> {
        let items = self.array("endpoints", v, "[[endpoints]] tables")?;
        let mut out: Vec<Endpoint> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.endpoint(&format!("endpoints[{i}]"), item, workloads) {
                Some(e) if out.iter().any(|o| o.name == e.name) => {
                    self.error(
                        item.span(),
                        format!(
                            "endpoints[{i}].name: {:?} is used by another endpoint",
                            e.name
                        ),
                    );
                    ok = false;
                }
                Some(e) => out.push(e),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn endpoint(
        &mut self,
        path: &str,
        v: &Value<'_>,
        workloads: Option<&[String]>,
    ) -> Option<Endpoint> {
        const KEYS: &[&str] = &[
            "name",
            "workload",
            "port",
            "ports",
            "internal_port",
            "ipv4",
            "proxy_protocol",
            "idle_timeout",
            "max_connections",
            "rate_limit",
            "drain_timeout",
        ];
        let t = self.table(path, v)?;
        self.known_keys(path, t, KEYS);
        let name = self.required(path, v, t, "name", |s| {
            crate::names::validate("endpoint", s)
        });
        let workload = self.required(path, v, t, "workload", |s| match workloads {
            Some(w) if !w.iter().any(|n| n == s) => {
                Err(format!("no workload {s:?}; workloads: {}", w.join(", ")))
            }
            _ => Ok(()),
        });
        let ports = match (t.get("port"), t.get("ports")) {
            (Some(p), None) => self.port(&join(path, "port"), p).map(|p| vec![p]),
            (None, Some(ps)) => {
                let ppath = join(path, "ports");
                let items = self.array(&ppath, ps, "an array of ports")?;
                let out: Vec<Option<u16>> = items
                    .iter()
                    .enumerate()
                    .map(|(i, p)| self.port(&format!("{ppath}[{i}]"), p))
                    .collect();
                match out.into_iter().collect::<Option<Vec<u16>>>() {
                    Some(list) if list.is_empty() => {
                        self.error(ps.span(), format!("{ppath}: empty; list at least one port"));
                        None
                    }
                    other => other,
                }
            }
            (Some(p), Some(_)) => {
                self.error(p.span(), format!("{path}: use port or ports, not both"));
                None
            }
            (None, None) => {
                self.error(
                    v.span(),
                    format!("{path}.port: missing; the external port, like port = 443"),
                );
                None
            }
        };
        let internal_port = match t.get("internal_port") {
            Some(p) => self.port(&join(path, "internal_port"), p),
            None => {
                self.error(v.span(), format!("{path}.internal_port: missing; the workload's port, like internal_port = 8080"));
                None
            }
        };
        let ipv4 = opt(t.get("ipv4"), false, |v| {
            self.boolean(&join(path, "ipv4"), v)
        });
        let proxy_protocol = match t.get("proxy_protocol") {
            None => Some(None),
            Some(p) => self
                .choice(
                    &join(path, "proxy_protocol"),
                    p,
                    &[("v2", ProxyProtocol::V2)],
                )
                .map(Some),
        };
        let idle_timeout = opt(t.get("idle_timeout"), defaults::IDLE_TIMEOUT_MS, |v| {
            self.duration_ms(&join(path, "idle_timeout"), v)
        });
        let drain_timeout = opt(t.get("drain_timeout"), defaults::DRAIN_TIMEOUT_MS, |v| {
            self.duration_ms(&join(path, "drain_timeout"), v)
        });
        let max_connections = opt(t.get("max_connections"), defaults::MAX_CONNECTIONS, |v| {
            self.integer(
                &join(path, "max_connections"),
                v,
                1..1_000_001,
                "a number of connections from 1 to 1000000",
            )
            .map(|n| n as u32)
        });
        let rate_limit = opt(t.get("rate_limit"), defaults::RATE_LIMIT, |v| {
            self.integer(
                &join(path, "rate_limit"),
                v,
                1..1_000_001,
                "new connections per second per source address, from 1 to 1000000",
            )
            .map(|n| n as u32)
        });
        Some(Endpoint {
            name: name?,
            workload: workload?,
            ports: ports?,
            internal_port: internal_port?,
            ipv4: ipv4?,
            proxy_protocol: proxy_protocol?,
            limits: EndpointLimits {
                idle_timeout_ms: idle_timeout?,
                max_connections: max_connections?,
                rate_limit: rate_limit?,
                drain_timeout_ms: drain_timeout?,
            },
        })
    }
}
