//! Running the `verge` CLI as a user would, isolated from the machine's own
//! profiles by a per-test `VERGE_CONFIG_DIR`.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// A way to run `verge` with a fixed environment.
#[derive(Debug, Clone)]
pub struct Cli {
    env: Vec<(String, String)>,
    config_dir: PathBuf,
}

impl Cli {
    /// A CLI whose profiles live in `config_dir`, with no server or token set.
    pub fn new(config_dir: &Path) -> Cli {
        Cli {
            env: Vec::new(),
            config_dir: config_dir.to_path_buf(),
        }
    }

    /// The same CLI with `VERGE_SERVER` and `VERGE_TOKEN` set.
    pub fn target(&self, server: &str, token: &str) -> Cli {
        self.with_env("VERGE_SERVER", server)
            .with_env("VERGE_TOKEN", token)
    }

    pub fn with_env(&self, key: &str, value: &str) -> Cli {
        let mut c = self.clone();
        c.env.push((key.into(), value.into()));
        c
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Runs `verge ARGS... -o json`, asserts success, and returns the `name`
    /// of every element of the JSON array it prints.
    pub async fn names(&self, args: &[&str]) -> Vec<String> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let list = self.run(&args).await.json();
        list.as_array()
            .unwrap_or_else(|| panic!("verge {args:?} printed no JSON array: {list}"))
            .iter()
            .map(|v| {
                v["name"]
                    .as_str()
                    .expect("every element has a name")
                    .to_string()
            })
            .collect()
    }

    /// Runs `verge ARGS...` to completion.
    pub async fn run(&self, args: &[&str]) -> Run {
        let mut cmd = tokio::process::Command::new(crate::verge_bin());
        cmd.args(args)
            .env_remove("VERGE_SERVER")
            .env_remove("VERGE_TOKEN")
            .env_remove("VERGE_PROFILE")
            .env_remove("VERGE_ORG")
            .env_remove("VERGE_PROJECT")
            .env_remove("VERGE_APP")
            .env("VERGE_CONFIG_DIR", &self.config_dir)
            .stdin(std::process::Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let output = cmd.output().await.expect("run verge");
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            output,
        }
    }
}

/// A finished `verge` run.
#[derive(Debug)]
pub struct Run {
    args: Vec<String>,
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// Asserts the command succeeded and returns its stdout.
    pub fn ok(&self) -> String {
        assert!(
            self.success(),
            "verge {:?} failed ({}):\n{}",
            self.args,
            self.output.status,
            self.stderr()
        );
        self.stdout()
    }

    /// Asserts success and parses stdout as JSON.
    pub fn json(&self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("verge {:?}: stdout is not JSON ({e}):\n{out}", self.args))
    }

    /// Asserts failure and parses stderr as the `{"error": {...}}` body.
    pub fn error_json(&self) -> Value {
        assert!(
            !self.success(),
            "verge {:?} succeeded but should have failed:\n{}",
            self.args,
            self.stdout()
        );
        let err = self.stderr();
        let v: Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| {
            panic!(
                "verge {:?}: stderr is not a JSON error ({e}):\n{err}",
                self.args
            )
        });
        v["error"].clone()
    }

    /// Asserts failure and returns stderr.
    pub fn failed(&self) -> String {
        assert!(
            !self.success(),
            "verge {:?} succeeded but should have failed:\n{}",
            self.args,
            self.stdout()
        );
        self.stderr()
    }
}
