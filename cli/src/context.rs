//! Resolving where a client command goes: flags and environment first (clap
//! merges those), then the selected profile, then `./verge.toml` for the app.

use verge_api::client::{Client, EnvScope, same_server};
use verge_api::{ErrorDetail, ErrorKind, names};

use crate::args::Target;
use crate::commands::Failure;
use crate::profile::{Profile, ProfileFile};

/// The org, app and env a command acts on.
#[derive(Debug, Clone)]
pub struct EnvNames {
    pub org: String,
    pub app: String,
    pub env: String,
}

impl EnvNames {
    pub fn scope(&self) -> EnvScope<'_> {
        EnvScope {
            org: &self.org,
            app: &self.app,
            env: &self.env,
        }
    }

    /// `app/env`, as messages name an env.
    pub fn label(&self) -> String {
        format!("{}/{}", self.app, self.env)
    }
}

/// A connected client and the defaults that go with it.
#[derive(Debug)]
pub struct Context {
    pub client: Client,
    target: Target,
    profile: Option<Profile>,
}

fn missing(what: &str, flag: &str, next: &[&str]) -> Failure {
    let mut d = ErrorDetail::new(ErrorKind::BadRequest, format!("no {what} given"));
    d.next.push(format!("pass {flag}"));
    d.next.extend(next.iter().map(|n| n.to_string()));
    Failure(d)
}

impl Context {
    pub fn new(target: &Target) -> Result<Context, Failure> {
        // Names given on the command line are checked before they become URL
        // path segments ("..", "a/b" and the like are refused here).
        for (kind, name) in [
            ("org", &target.org),
            ("project", &target.project),
            ("app", &target.app),
            ("env", &target.env),
        ] {
            if let Some(name) = name {
                names::validate(kind, name)
                    .map_err(|m| Failure(ErrorDetail::new(ErrorKind::BadRequest, m)))?;
            }
        }
        let explicit =
            target.server.is_some() && target.token.is_some() && target.profile.is_none();
        let file = match ProfileFile::load() {
            Ok(file) => file,
            // Everything needed was given: a broken profile file does not matter.
            Err(_) if explicit => ProfileFile::default(),
            Err(e) => return Err(Failure(e.detail())),
        };
        let mut profile = file.select(target.profile.as_deref()).cloned();
        if let (Some(name), None) = (&target.profile, &profile) {
            return Err(Failure(
                ErrorDetail::new(ErrorKind::NotFound, format!("profile {name:?} not found"))
                    .with_next("verge profiles list"),
            ));
        }
        // A profile belongs to its server: its token (and defaults) are never
        // sent to another one named by --server or VERGE_SERVER.
        if let (Some(server), Some(p)) = (&target.server, &profile)
            && !same_server(server, &p.server)
        {
            if let Some(name) = &target.profile {
                return Err(Failure(
                    ErrorDetail::new(
                        ErrorKind::BadRequest,
                        format!(
                            "profile {name:?} belongs to {}, not to --server {server}",
                            p.server
                        ),
                    )
                    .with_next(
                        "drop --server to use the profile, or drop --profile and pass --token",
                    ),
                ));
            }
            profile = None;
        }
        let server = target
            .server
            .clone()
            .or_else(|| profile.as_ref().map(|p| p.server.clone()))
            .ok_or_else(|| {
                missing(
                    "server",
                    "--server URL or set VERGE_SERVER",
                    &[
                        "verge login --server URL --token TOKEN",
                        "start a local cluster with `verge dev`",
                    ],
                )
            })?;
        let token = target
            .token
            .clone()
            .or_else(|| profile.as_ref().map(|p| p.token.clone()));
        let ca_path = target
            .ca_cert
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.ca_cert.clone()));
        let ca = ca_path.as_deref().map(read_ca_cert).transpose()?;
        let client = Client::new(&server, token.as_deref(), ca.as_deref())?;
        Ok(Context {
            client,
            target: target.clone(),
            profile,
        })
    }

    /// The org to act on: `--org`, the profile's, or the token's own.
    pub async fn org(&self) -> Result<String, Failure> {
        if let Some(org) = self
            .target
            .org
            .clone()
            .or_else(|| self.profile.as_ref()?.org.clone())
        {
            return Ok(org);
        }
        match self.client.whoami().await?.org {
            Some(org) => Ok(org),
            None => Err(missing(
                "org",
                "--org ORG or set VERGE_ORG",
                &["verge orgs list"],
            )),
        }
    }

    /// `--org` (or `VERGE_ORG`) only, without the profile's default.
    pub fn explicit_org(&self) -> Option<String> {
        self.target.org.clone()
    }

    /// `--project` (or `VERGE_PROJECT`) only, without the profile's default.
    pub fn explicit_project(&self) -> Option<String> {
        self.target.project.clone()
    }

    pub fn project(&self) -> Result<String, Failure> {
        self.target
            .project
            .clone()
            .or_else(|| self.profile.as_ref()?.project.clone())
            .ok_or_else(|| {
                missing(
                    "project",
                    "--project PROJECT or set VERGE_PROJECT",
                    &["verge projects list"],
                )
            })
    }

    /// `--app`, else `app = "..."` in `./verge.toml`.
    pub fn app(&self) -> Result<String, Failure> {
        if let Some(app) = &self.target.app {
            return Ok(app.clone());
        }
        app_from_manifest()?.ok_or_else(|| {
            missing(
                "app",
                "--app APP or set VERGE_APP",
                &["run in a directory with a verge.toml", "verge apps list"],
            )
        })
    }

    /// `--app` (or `VERGE_APP`) only, without `./verge.toml`.
    pub fn explicit_app(&self) -> Option<String> {
        self.target.app.clone()
    }

    /// `--env` (or `VERGE_ENV`) only.
    pub fn explicit_env(&self) -> Option<String> {
        self.target.env.clone()
    }

    /// `--env` (or `VERGE_ENV`). Without one, the error lists the app's envs
    /// when they can be read.
    pub async fn env(&self) -> Result<String, Failure> {
        if let Some(env) = &self.target.env {
            return Ok(env.clone());
        }
        let (org, app) = match (self.org().await, self.app()) {
            (Ok(org), Ok(app)) => (Some(org), Some(app)),
            _ => (None, None),
        };
        Err(self.missing_env(org.as_deref(), app.as_deref()).await)
    }

    async fn missing_env(&self, org: Option<&str>, app: Option<&str>) -> Failure {
        let mut d = ErrorDetail::new(ErrorKind::BadRequest, "no env given")
            .with_next("pass --env ENV or set VERGE_ENV");
        if let (Some(org), Some(app)) = (org, app)
            && let Ok(envs) = self.client.list_envs(org, app).await
        {
            if envs.is_empty() {
                d.next.push("verge envs create prod".into());
            } else {
                let names: Vec<&str> = envs.iter().map(|e| e.name.as_str()).collect();
                d.next
                    .push(format!("this app's envs: {}", names.join(", ")));
            }
        }
        Failure(d)
    }

    /// Org, app and env: `--org`/profile/token, `--app`/`./verge.toml`, `--env`.
    pub async fn env_names(&self) -> Result<EnvNames, Failure> {
        let org = self.org().await?;
        let app = self.app()?;
        let env = self.env().await?;
        Ok(EnvNames { org, app, env })
    }

    /// Like [`Context::env_names`], for an app known otherwise (a manifest's).
    pub async fn env_names_for(&self, org: String, app: String) -> Result<EnvNames, Failure> {
        let env = match &self.target.env {
            Some(env) => env.clone(),
            None => return Err(self.missing_env(Some(&org), Some(&app)).await),
        };
        Ok(EnvNames { org, app, env })
    }
}

/// The PEM bytes of a `--ca-cert` file, or an error naming it.
pub fn read_ca_cert(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| {
        Failure(ErrorDetail::new(
            ErrorKind::BadRequest,
            format!("cannot read CA certificate {}: {e}", path.display()),
        ))
    })
}

/// The `app` key of `./verge.toml`: `None` without the file; an error naming
/// the file when it cannot be read as TOML or its `app` is not a valid name.
fn app_from_manifest() -> Result<Option<String>, Failure> {
    let bad = |m: String| {
        Failure(
            ErrorDetail::new(ErrorKind::BadRequest, m)
                .with_next("fix verge.toml, or pass --app APP"),
        )
    };
    let text = match std::fs::read_to_string("verge.toml") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot read verge.toml: {e}"))),
    };
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| bad(format!("verge.toml is not valid TOML: {}", e.message())))?;
    match table.get("app") {
        None => Ok(None),
        Some(toml::Value::String(app)) => {
            names::validate("app", app).map_err(|m| bad(format!("verge.toml: {m}")))?;
            Ok(Some(app.clone()))
        }
        Some(other) => Err(bad(format!(
            "verge.toml: app must be a string, found {}",
            other.type_str()
        ))),
    }
}
