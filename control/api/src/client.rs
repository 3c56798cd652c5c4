//! The typed HTTP client for the `/v1` API, used by the CLI and the tests.
//!
//! Every call returns the resource types of [`crate::resources`] or a
//! [`ClientError`] that carries the server's [`ErrorDetail`] when there is
//! one, so callers can print the server's own explanation and next steps.

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ErrorBody, ErrorDetail, ErrorKind};
use crate::requests::{CreateApp, CreateNamed, CreateToken};
use crate::resources::{App, CreatedToken, Env, Org, Project, Token, WhoAmI};

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
    let mut parts: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
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
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("verge/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            // A server that accepts but never answers must not hang the CLI.
            .read_timeout(std::time::Duration::from_secs(60));
        if let Some(pem) = ca_cert_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClientError::BadCaCert(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::BadCaCert("no PEM certificate found".into()));
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::BadCaCert(e.to_string()))?;
        Ok(Client {
            http,
            base,
            token: token.map(str::to_string),
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

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let mut req = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let connect = |e: reqwest::Error| ClientError::Connect {
            server: self.server().to_string(),
            cause: cause_chain(&e),
        };
        let resp = req.send().await.map_err(connect)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(connect)?;
        let decode_err = |detail: String| ClientError::Decode {
            url: url.to_string(),
            status: status.as_u16(),
            detail,
        };
        if !status.is_success() {
            return match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => Err(ClientError::Api(body.error)),
                Err(_) => Err(decode_err(
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                )),
            };
        }
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
