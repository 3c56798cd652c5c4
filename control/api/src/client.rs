//! The typed HTTP client for the `/v1` API, used by the CLI and the tests.
//!
//! Every call returns the resource types of [`crate::resources`] or a
//! [`ClientError`] that carries the server's [`ErrorDetail`] when there is
//! one, so callers can print the server's own explanation and next steps.

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigReceipt, EnvConfig, SecretBundle, SecretReceipt};
use crate::error::{ErrorBody, ErrorDetail, ErrorKind};
use crate::release::{Receipt, Release};
use crate::requests::{
    ChangeConfig, ChangeSecrets, CreateApp, CreateNamed, CreateToken, Deploy, Rollback, Scale,
};
use crate::resources::{App, CreatedToken, Env, Org, Project, Token, WhoAmI};
use crate::status::{EnvDetail, Event, Status, WorkloadDetail};

/// An env, addressed by the names of its org and app.
#[derive(Debug, Clone, Copy)]
pub struct EnvScope<'a> {
    pub org: &'a str,
    pub app: &'a str,
    pub env: &'a str,
}

/// Whose events to read.
#[derive(Debug, Clone, Copy)]
pub enum EventScope<'a> {
    /// One env.
    Env(EnvScope<'a>),
    /// Every env of an org, and the org's own events.
    Org(&'a str),
    /// Everything the token may see: the whole cluster for an admin, its
    /// own org for an org token.
    Cluster,
}

/// Which events: after a cursor, and not older than a time.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only events with a cursor above this one.
    pub after: Option<i64>,
    /// Only events at or after this RFC 3339 time.
    pub since: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{0}")]
    Api(ErrorDetail),
    /// The server could not be reached (refused, timed out, TLS failed).
    #[error("cannot reach the control plane at {server}: {cause}")]
    Connect { server: String, cause: String },
    /// The server URL is not a valid http(s) URL.
    #[error("invalid server URL {server:?}: {reason}")]
    BadServer { server: String, reason: String },
    /// The CA certificate file could not be used.
    #[error("invalid CA certificate: {0}")]
    BadCaCert(String),
    /// The server answered something that is not the expected JSON.
    #[error("unexpected answer from {url} (HTTP {status}): {detail}")]
    Decode {
        url: String,
        status: u16,
        detail: String,
    },
}

impl ClientError {
    /// The error as the `{kind, message, next}` detail the CLI prints.
    pub fn detail(&self) -> ErrorDetail {
        match self {
            ClientError::Api(d) => d.clone(),
            ClientError::Connect { server, cause } => {
                let d = ErrorDetail::new(ErrorKind::Unavailable, self.to_string());
                if cause.contains("certificate") {
                    d.with_next(
                        "pass --ca-cert FILE (or set VERGE_CA_CERT) naming the CA that signed the server's certificate",
                    )
                } else {
                    d.with_next(format!(
                        "check that the control plane at {server} is running"
                    ))
                    .with_next("start a local one with `verge dev`")
                }
            }
            ClientError::BadServer { .. } => {
                ErrorDetail::new(ErrorKind::BadRequest, self.to_string())
                    .with_next("pass --server http://HOST:PORT or set VERGE_SERVER")
            }
            ClientError::BadCaCert(_) => ErrorDetail::new(ErrorKind::BadRequest, self.to_string())
                .with_next(
                    "pass --ca-cert with a PEM file holding the control plane's CA certificate",
                ),
            ClientError::Decode { status, .. } => {
                ErrorDetail::new(ErrorKind::from_status(*status), self.to_string())
                    .with_next("check that --server points at a Verge control plane")
            }
        }
    }
}

/// The causes under a transport error, innermost last ("client error
/// (Connect): invalid peer certificate: UnknownIssuer"), without reqwest's
/// own "error sending request for url" line, which only repeats the URL.
fn cause_chain(e: &reqwest::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), crate::error::cause_chain)
}

/// Whether two server URLs name the same control plane: same scheme, host
/// and port after URL normalisation (case, default ports, trailing slash).
pub fn same_server(a: &str, b: &str) -> bool {
    let key = |s: &str| {
        Url::parse(s).ok().map(|u| {
            (
                u.scheme().to_string(),
                u.host_str().map(str::to_string),
                u.port_or_known_default(),
            )
        })
    };
    match (key(a), key(b)) {
        (Some(ka), Some(kb)) => ka == kb,
        _ => a.trim_end_matches('/') == b.trim_end_matches('/'),
    }
}

/// A client of one control plane, authenticated with one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    /// The CA trusted instead of the platform's, for the exec client.
    ca_cert_pem: Option<Vec<u8>>,
}

impl Client {
    /// A client for `server` (`http://` or `https://`). With `ca_cert_pem`,
    /// only that CA is trusted; otherwise the platform's trust store is.
    pub fn new(
        server: &str,
        token: Option<&str>,
        ca_cert_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadServer {
            server: server.to_string(),
            reason: reason.to_string(),
        };
        let base = Url::parse(server).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("it needs a host, like http://127.0.0.1:7070"));
        }
        let builder = reqwest::Client::builder()
            // A server that accepts but never answers must not hang the CLI.
            .read_timeout(std::time::Duration::from_secs(60));
        let http = http_client(builder, ca_cert_pem)?;
        Ok(Client {
            http,
            base,
            token: token.map(str::to_string),
            ca_cert_pem: ca_cert_pem.map(<[u8]>::to_vec),
        })
    }

    /// The server URL this client talks to.
    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("checked in new()");
            path.pop_if_empty().push("v1").extend(segments);
        }
        url
    }

    fn connect_error(&self, e: reqwest::Error) -> ClientError {
        ClientError::Connect {
            server: self.server().to_string(),
            cause: cause_chain(&e),
        }
    }

    /// The [`ClientError`] a non-2xx answer stands for.
    async fn error_of(&self, resp: reqwest::Response, url: &Url) -> ClientError {
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return self.connect_error(e),
        };
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => ClientError::Api(body.error),
            Err(_) => ClientError::Decode {
                url: url.to_string(),
                status: status.as_u16(),
                detail: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        }
    }

    /// Sends a request; a non-2xx answer becomes its [`ClientError`].
    async fn send(
        &self,
        method: Method,
        url: &Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.connect_error(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.error_of(resp, url).await)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, &url, body).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.connect_error(e))?;
        let decode_err = |detail: String| ClientError::Decode {
            url: url.to_string(),
            status: status.as_u16(),
            detail,
        };
        let bytes = if status == StatusCode::NO_CONTENT || bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| decode_err(e.to_string()))
    }

    async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, ClientError> {
        self.call(Method::GET, url, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        url: Url,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, ClientError> {
        self.call(Method::POST, url, Some(body)).await
    }

    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.get(self.url(&["whoami"])).await
    }

    pub async fn create_org(&self, name: &str) -> Result<Org, ClientError> {
        let body = CreateNamed { name: name.into() };
        self.post(self.url(&["orgs"]), &body).await
    }

    pub async fn list_orgs(&self) -> Result<Vec<Org>, ClientError> {
        self.get(self.url(&["orgs"])).await
    }

    pub async fn create_project(&self, org: &str, name: &str) -> Result<Project, ClientError> {
        let body = CreateNamed { name: name.into() };
        self.post(self.url(&["orgs", org, "projects"]), &body).await
    }

    pub async fn list_projects(&self, org: &str) -> Result<Vec<Project>, ClientError> {
        self.get(self.url(&["orgs", org, "projects"])).await
    }

    pub async fn create_app(
        &self,
        org: &str,
        project: &str,
        name: &str,
    ) -> Result<App, ClientError> {
        let body = CreateApp {
            name: name.into(),
            project: project.into(),
        };
        self.post(self.url(&["orgs", org, "apps"]), &body).await
    }

    /// Apps of `org`, of one project when `project` is given.
    pub async fn list_apps(
        &self,
        org: &str,
        project: Option<&str>,
    ) -> Result<Vec<App>, ClientError> {
        let mut url = self.url(&["orgs", org, "apps"]);
        if let Some(p) = project {
            url.query_pairs_mut().append_pair("project", p);
        }
        self.get(url).await
    }

    pub async fn get_app(&self, org: &str, app: &str) -> Result<App, ClientError> {
        self.get(self.url(&["orgs", org, "apps", app])).await
    }

    pub async fn create_env(&self, org: &str, app: &str, name: &str) -> Result<Env, ClientError> {
        let body = CreateNamed { name: name.into() };
        self.post(self.url(&["orgs", org, "apps", app, "envs"]), &body)
            .await
    }

    pub async fn list_envs(&self, org: &str, app: &str) -> Result<Vec<Env>, ClientError> {
        self.get(self.url(&["orgs", org, "apps", app, "envs"]))
            .await
    }

    pub async fn create_token(
        &self,
        org: &str,
        name: Option<&str>,
    ) -> Result<CreatedToken, ClientError> {
        let body = CreateToken {
            org: org.into(),
            name: name.map(str::to_string),
        };
        self.post(self.url(&["tokens"]), &body).await
    }

    /// Mints a join token for nodes (admin).
    pub async fn create_join_token(
        &self,
        ttl_secs: Option<u64>,
        uses: Option<u64>,
    ) -> Result<crate::nodes::JoinTokenCreated, ClientError> {
        let body = crate::nodes::CreateJoinToken { ttl_secs, uses };
        self.post(self.url(&["nodes", "join-tokens"]), &body).await
    }

    /// Every node of the cluster (admin).
    pub async fn list_nodes(&self) -> Result<Vec<crate::nodes::Node>, ClientError> {
        self.get(self.url(&["nodes"])).await
    }

    /// One node, with its instances (admin).
    pub async fn describe_node(&self, name: &str) -> Result<crate::nodes::NodeDetail, ClientError> {
        self.get(self.url(&["nodes", name])).await
    }

    /// Moves every instance off a node and keeps new ones away (admin).
    pub async fn drain_node(
        &self,
        name: &str,
        deadline_secs: Option<u64>,
    ) -> Result<crate::nodes::Node, ClientError> {
        let body = crate::nodes::DrainNode { deadline_secs };
        self.post(self.url(&["nodes", name, "drain"]), &body).await
    }

    /// Makes a drained (or draining) node schedulable again (admin).
    pub async fn undrain_node(&self, name: &str) -> Result<crate::nodes::Node, ClientError> {
        self.post(self.url(&["nodes", name, "undrain"]), &()).await
    }

    /// Tokens of the cluster, or of one org.
    pub async fn list_tokens(&self, org: Option<&str>) -> Result<Vec<Token>, ClientError> {
        let mut url = self.url(&["tokens"]);
        if let Some(o) = org {
            url.query_pairs_mut().append_pair("org", o);
        }
        self.get(url).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<Token, ClientError> {
        self.call(Method::DELETE, self.url(&["tokens", id]), None::<&()>)
            .await
    }

    fn env_url(&self, scope: EnvScope<'_>, rest: &[&str]) -> Url {
        let mut segments = vec!["orgs", scope.org, "apps", scope.app, "envs", scope.env];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// Everything about an env: current release, config and secret
    /// versions, scale.
    pub async fn describe_env(&self, scope: EnvScope<'_>) -> Result<EnvDetail, ClientError> {
        self.get(self.env_url(scope, &[])).await
    }

    pub async fn get_config(&self, scope: EnvScope<'_>) -> Result<EnvConfig, ClientError> {
        self.get(self.env_url(scope, &["config"])).await
    }

    /// Sets and unsets env vars: one new config version.
    pub async fn change_config(
        &self,
        scope: EnvScope<'_>,
        change: &ChangeConfig,
    ) -> Result<ConfigReceipt, ClientError> {
        self.post(self.env_url(scope, &["config"]), change).await
    }

    pub async fn list_secrets(
        &self,
        scope: EnvScope<'_>,
    ) -> Result<Vec<SecretBundle>, ClientError> {
        self.get(self.env_url(scope, &["secrets"])).await
    }

    /// Sets and unsets keys of a bundle: one new bundle version.
    pub async fn change_secrets(
        &self,
        scope: EnvScope<'_>,
        bundle: &str,
        change: &ChangeSecrets,
    ) -> Result<SecretReceipt, ClientError> {
        self.post(self.env_url(scope, &["secrets", bundle]), change)
            .await
    }

    /// Deletes one version of a bundle, or (`None`) all of them.
    pub async fn delete_secrets(
        &self,
        scope: EnvScope<'_>,
        bundle: &str,
        version: Option<i64>,
    ) -> Result<SecretReceipt, ClientError> {
        let mut url = self.env_url(scope, &["secrets", bundle]);
        if let Some(v) = version {
            url.query_pairs_mut().append_pair("version", &v.to_string());
        }
        self.call(Method::DELETE, url, None::<&()>).await
    }

    pub async fn deploy(
        &self,
        scope: EnvScope<'_>,
        deploy: &Deploy,
    ) -> Result<Receipt, ClientError> {
        self.post(self.env_url(scope, &["deploys"]), deploy).await
    }

    /// Releases of the env, newest first.
    pub async fn list_releases(&self, scope: EnvScope<'_>) -> Result<Vec<Release>, ClientError> {
        self.get(self.env_url(scope, &["releases"])).await
    }

    /// One release (`v3`, `3` or its ID), with its manifest snapshot.
    pub async fn get_release(
        &self,
        scope: EnvScope<'_>,
        release: &str,
    ) -> Result<Release, ClientError> {
        self.get(self.env_url(scope, &["releases", release])).await
    }

    pub async fn rollback(
        &self,
        scope: EnvScope<'_>,
        rollback: &Rollback,
    ) -> Result<Receipt, ClientError> {
        self.post(self.env_url(scope, &["rollback"]), rollback)
            .await
    }

    pub async fn scale(&self, scope: EnvScope<'_>, scale: &Scale) -> Result<Receipt, ClientError> {
        self.post(self.env_url(scope, &["scale"]), scale).await
    }

    /// Stops the env's rollout in progress and returns the env to the
    /// release it was rolling from: the canceled rollout.
    pub async fn cancel_rollout(
        &self,
        scope: EnvScope<'_>,
        cancel: &crate::status::CancelRollout,
    ) -> Result<crate::status::Rollout, ClientError> {
        self.post(self.env_url(scope, &["rollout", "cancel"]), cancel)
            .await
    }

    /// The env's rollouts, newest first.
    pub async fn list_rollouts(
        &self,
        scope: EnvScope<'_>,
    ) -> Result<Vec<crate::status::Rollout>, ClientError> {
        self.get(self.env_url(scope, &["rollouts"])).await
    }

    pub async fn status(&self, scope: EnvScope<'_>) -> Result<Status, ClientError> {
        self.get(self.env_url(scope, &["status"])).await
    }

    pub async fn describe_workload(
        &self,
        scope: EnvScope<'_>,
        workload: &str,
    ) -> Result<WorkloadDetail, ClientError> {
        self.get(self.env_url(scope, &["workloads", workload]))
            .await
    }

    fn events_url(&self, scope: EventScope<'_>, query: &EventQuery, follow: bool) -> Url {
        let mut url = match scope {
            EventScope::Env(env) => self.env_url(env, &["events"]),
            EventScope::Org(org) => self.url(&["orgs", org, "events"]),
            EventScope::Cluster => self.url(&["events"]),
        };
        {
            let mut q = url.query_pairs_mut();
            if let Some(after) = query.after {
                q.append_pair("after", &after.to_string());
            }
            if let Some(since) = &query.since {
                q.append_pair("since", since);
            }
            if follow {
                q.append_pair("follow", "true");
            }
        }
        url
    }

    /// Events recorded so far, oldest first.
    pub async fn events(
        &self,
        scope: EventScope<'_>,
        query: &EventQuery,
    ) -> Result<Vec<Event>, ClientError> {
        self.get(self.events_url(scope, query, false)).await
    }

    /// A live stream of events: those recorded so far, then each new one as
    /// it happens. Reconnect with `after` = the last cursor seen to resume
    /// with no gap and no duplicate.
    pub async fn follow_events(
        &self,
        scope: EventScope<'_>,
        query: &EventQuery,
    ) -> Result<EventStream, ClientError> {
        let url = self.events_url(scope, query, true);
        let resp = self.send(Method::GET, &url, None::<&()>).await?;
        Ok(self.lines(resp, &url))
    }

    fn lines<T>(&self, resp: reqwest::Response, url: &Url) -> LineStream<T> {
        LineStream {
            resp,
            buf: Vec::new(),
            server: self.server().to_string(),
            url: url.to_string(),
            item: std::marker::PhantomData,
        }
    }

    /// The env's logs (SPEC §4 `verge logs`): history merged in time order,
    /// then with `follow` new lines as they are written; notices say what
    /// could not be read.
    pub async fn logs(
        &self,
        scope: EnvScope<'_>,
        query: &crate::logs::LogQuery,
    ) -> Result<LineStream<crate::logs::LogItem>, ClientError> {
        let mut url = self.env_url(scope, &["logs"]);
        {
            let mut q = url.query_pairs_mut();
            let mut pair = |k: &str, v: Option<&str>| {
                if let Some(v) = v {
                    q.append_pair(k, v);
                }
            };
            pair("workload", query.workload.as_deref());
            pair("instance", query.instance.as_deref());
            pair("source", query.source.map(|s| s.as_str()));
            pair("severity", query.severity.map(|s| s.as_str()));
            pair("since", query.since.as_deref());
            pair("until", query.until.as_deref());
            pair("previous", query.previous.then_some("true"));
            pair("follow", query.follow.then_some("true"));
        }
        let url = Url::parse(url.as_str().trim_end_matches('?')).unwrap_or(url);
        let resp = self.send(Method::GET, &url, None::<&()>).await?;
        Ok(self.lines(resp, &url))
    }

    /// Starts an exec session (SPEC §4 `verge exec`): on success the
    /// connection carries [`crate::exec::Frame`]s both ways.
    pub async fn exec(
        &self,
        scope: EnvScope<'_>,
        request: &crate::exec::ExecRequest,
    ) -> Result<ExecSession, ClientError> {
        // HTTP/1.1 only (an upgrade), and no read timeout: a session may
        // be quiet for as long as its user is.
        let http = http_client(
            reqwest::Client::builder().http1_only(),
            self.ca_cert_pem.as_deref(),
        )?;
        let url = self.env_url(scope, &["exec"]);
        let mut req = http
            .post(url.clone())
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, crate::exec::UPGRADE)
            .json(request);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| self.connect_error(e))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            if resp.status().is_success() {
                return Err(ClientError::Decode {
                    url: url.to_string(),
                    status: resp.status().as_u16(),
                    detail:
                        "the server did not switch to the exec protocol (is a proxy in between?)"
                            .into(),
                });
            }
            return Err(self.error_of(resp, &url).await);
        }
        let started = resp
            .headers()
            .get(crate::exec::STARTED_HEADER)
            .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
            .ok_or_else(|| ClientError::Decode {
                url: url.to_string(),
                status: 101,
                detail: format!("no valid {} header", crate::exec::STARTED_HEADER),
            })?;
        let io = resp.upgrade().await.map_err(|e| self.connect_error(e))?;
        Ok(ExecSession { started, io })
    }

    /// What is exposed in `org` (SPEC §4 `verge endpoints`), optionally of
    /// one app or one env only.
    pub async fn list_endpoints(
        &self,
        org: &str,
        app: Option<&str>,
        env: Option<&str>,
    ) -> Result<Vec<crate::routing::ExposedEndpoint>, ClientError> {
        let mut url = self.url(&["orgs", org, "endpoints"]);
        {
            let mut q = url.query_pairs_mut();
            if let Some(app) = app {
                q.append_pair("app", app);
            }
            if let Some(env) = env {
                q.append_pair("env", env);
            }
        }
        url.set_query(
            url.query()
                .filter(|q| !q.is_empty())
                .map(str::to_owned)
                .as_deref(),
        );
        self.get(url).await
    }

    /// One endpoint with its backends and listeners.
    pub async fn describe_endpoint(
        &self,
        scope: EnvScope<'_>,
        name: &str,
    ) -> Result<crate::routing::ExposedEndpoint, ClientError> {
        self.get(self.url(&[
            "orgs",
            scope.org,
            "apps",
            scope.app,
            "envs",
            scope.env,
            "endpoints",
            name,
        ]))
        .await
    }

    /// The routing table (ingresses; needs a cluster admin token).
    pub async fn routing_table(&self) -> Result<crate::routing::RoutingTable, ClientError> {
        self.get(self.url(&["ingress", "routes"])).await
    }

    /// The routing table now and each time it changes.
    pub async fn watch_routing_table(
        &self,
    ) -> Result<LineStream<crate::routing::RoutingTable>, ClientError> {
        let mut url = self.url(&["ingress", "routes"]);
        url.set_query(Some("watch=true"));
        let resp = self.send(Method::GET, &url, None::<&()>).await?;
        Ok(self.lines(resp, &url))
    }

    /// Reports what an ingress listens on.
    pub async fn report_ingress(
        &self,
        report: &crate::routing::IngressReport,
    ) -> Result<(), ClientError> {
        self.post(self.url(&["ingress", "status"]), report).await
    }

    /// Where an ingress's QUIC path connects.
    pub async fn ingress_cluster(&self) -> Result<crate::routing::ClusterInfo, ClientError> {
        self.get(self.url(&["ingress", "cluster"])).await
    }
}

/// How long a volume operation's answer may take: the control plane
/// answers once the node did (it gives a node minutes to make a large
/// filesystem, and a snapshot copied between nodes as long as its bytes
/// keep flowing).
const VOLUME_OP_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Volumes of an env (SPEC §4 `verge volumes`).
impl Client {
    fn volumes_url(&self, scope: EnvScope<'_>, rest: &[&str]) -> Url {
        let mut segments = vec!["volumes"];
        segments.extend_from_slice(rest);
        self.env_url(scope, &segments)
    }

    /// A call that waits for a node: like [`Client::call`], with a read
    /// timeout of [`VOLUME_OP_WAIT`] instead of a minute.
    async fn volume_op<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let http = http_client(
            reqwest::Client::builder().read_timeout(VOLUME_OP_WAIT),
            self.ca_cert_pem.as_deref(),
        )?;
        let mut req = http.request(method, url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.connect_error(e))?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp, &url).await);
        }
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.connect_error(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            status,
            detail: e.to_string(),
        })
    }

    /// The env's volumes, by name.
    pub async fn list_volumes(
        &self,
        scope: EnvScope<'_>,
    ) -> Result<Vec<crate::volumes::Volume>, ClientError> {
        self.get(self.volumes_url(scope, &[])).await
    }

    /// Creates a volume on a node (the one named, or the online one of the
    /// region with the most free space); answers once the node made it.
    pub async fn create_volume(
        &self,
        scope: EnvScope<'_>,
        create: &crate::volumes::CreateVolume,
    ) -> Result<crate::volumes::Volume, ClientError> {
        let url = self.volumes_url(scope, &[]);
        self.volume_op(Method::POST, url, Some(create)).await
    }

    /// One volume with its snapshots and the commands that act on it.
    pub async fn describe_volume(
        &self,
        scope: EnvScope<'_>,
        name: &str,
    ) -> Result<crate::volumes::Volume, ClientError> {
        self.get(self.volumes_url(scope, &[name])).await
    }

    /// Grows a volume.
    pub async fn resize_volume(
        &self,
        scope: EnvScope<'_>,
        name: &str,
        resize: &crate::volumes::ResizeVolume,
    ) -> Result<crate::volumes::Volume, ClientError> {
        let url = self.volumes_url(scope, &[name, "resize"]);
        self.volume_op(Method::POST, url, Some(resize)).await
    }

    /// Takes a snapshot of a volume.
    pub async fn snapshot_volume(
        &self,
        scope: EnvScope<'_>,
        name: &str,
    ) -> Result<crate::volumes::Snapshot, ClientError> {
        let url = self.volumes_url(scope, &[name, "snapshots"]);
        self.volume_op(Method::POST, url, None::<&()>).await
    }

    /// Snapshots of the volume named `name` (also of an earlier, deleted
    /// volume of that name), oldest first.
    pub async fn list_snapshots(
        &self,
        scope: EnvScope<'_>,
        name: &str,
    ) -> Result<Vec<crate::volumes::Snapshot>, ClientError> {
        self.get(self.volumes_url(scope, &[name, "snapshots"]))
            .await
    }

    /// Restores a snapshot into its volume or into a new one: the volume.
    pub async fn restore_snapshot(
        &self,
        scope: EnvScope<'_>,
        restore: &crate::volumes::RestoreSnapshot,
    ) -> Result<crate::volumes::Volume, ClientError> {
        let url = self.volumes_url(scope, &["restore"]);
        self.volume_op(Method::POST, url, Some(restore)).await
    }

    /// Deletes a volume (with `snapshots`, its snapshots too): the volume
    /// as it was, with state `deleted`.
    pub async fn delete_volume(
        &self,
        scope: EnvScope<'_>,
        name: &str,
        snapshots: bool,
    ) -> Result<crate::volumes::Volume, ClientError> {
        let mut url = self.volumes_url(scope, &[name]);
        if snapshots {
            url.set_query(Some("snapshots=true"));
        }
        self.volume_op(Method::DELETE, url, None::<&()>).await
    }

    /// Deletes one snapshot.
    pub async fn delete_snapshot(
        &self,
        scope: EnvScope<'_>,
        id: &str,
    ) -> Result<crate::volumes::Snapshot, ClientError> {
        let url = self.env_url(scope, &["snapshots", id]);
        self.volume_op(Method::DELETE, url, None::<&()>).await
    }
}

/// A started exec session: where it runs, and the connection that
/// carries its frames.
#[derive(Debug)]
pub struct ExecSession {
    pub started: crate::exec::ExecStarted,
    pub io: reqwest::Upgraded,
}

/// A reqwest client with Verge's user agent and connect timeout, trusting
/// only `ca_cert_pem` when given.
fn http_client(
    builder: reqwest::ClientBuilder,
    ca_cert_pem: Option<&[u8]>,
) -> Result<reqwest::Client, ClientError> {
    let mut builder = builder
        .user_agent(concat!("verge/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(pem) = ca_cert_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::BadCaCert(e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientError::BadCaCert("no PEM certificate found".into()));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| ClientError::BadCaCert(e.to_string()))
}

/// Events arriving as NDJSON, one per line.
pub type EventStream = LineStream<Event>;

/// A long-lived answer of NDJSON, one `T` per line; blank lines are
/// keep-alives.
#[derive(Debug)]
pub struct LineStream<T> {
    resp: reqwest::Response,
    buf: Vec<u8>,
    server: String,
    url: String,
    item: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> LineStream<T> {
    /// The next item, past keep-alives; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            match self.next_line().await? {
                Ok(line) if line.is_empty() => continue,
                Ok(line) => {
                    return Some(
                        serde_json::from_slice(&line).map_err(|e| ClientError::Decode {
                            url: self.url.clone(),
                            status: 200,
                            detail: e.to_string(),
                        }),
                    );
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next line, keep-alives included (empty); `None` at the end.
    pub async fn next_line(&mut self) -> Option<Result<Vec<u8>, ClientError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(Ok(line.trim_ascii().to_vec()));
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(e) => {
                    return Some(Err(ClientError::Connect {
                        server: self.server.clone(),
                        cause: cause_chain(&e),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_server;

    #[test]
    fn same_server_normalises_urls() {
        assert!(same_server(
            "http://127.0.0.1:7070",
            "http://127.0.0.1:7070/"
        ));
        assert!(same_server(
            "https://Control.Example",
            "https://control.example:443"
        ));
        assert!(!same_server(
            "http://127.0.0.1:7070",
            "http://127.0.0.1:7071"
        ));
        assert!(!same_server(
            "http://localhost:7070",
            "http://127.0.0.1:7070"
        ));
        assert!(!same_server("http://h:7070", "https://h:7070"));
    }
}
