//! Control-plane configuration: a TOML file (`verge control --config F`),
//! overridden field by field by flags and environment variables in the binary,
//! then checked as a whole by [`Config::validate`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `verge control` needs to start. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP API. Plain HTTP is only allowed on loopback.
    pub listen: SocketAddr,
    /// Where the SQLite database and other local state live.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; default: SQLite in `data_dir`.
    pub database: Option<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most concurrent client connections; more wait to be accepted.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_timeout_secs: u64,
    /// How long a client may take for a TLS handshake or a request's
    /// headers, and may stay idle between requests, before it is disconnected.
    pub client_timeout_secs: u64,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<TlsConfig>,
    /// The data key sealing secret bundles; default `secrets.key` in
    /// `data_dir`, created on first start. Every replica needs the same key.
    pub secrets_key_file: Option<PathBuf>,
    /// Old data keys, still accepted for opening; values sealed with them
    /// are re-sealed with the current key on start (key rotation).
    pub secrets_previous_key_files: Vec<PathBuf>,
    /// `host:port` of registries reached over plain HTTP although not on
    /// loopback (loopback registries always are).
    pub insecure_registries: Vec<String>,
    /// Registry credentials for pinning images (format in
    /// `verge_api::registry_auth`); read on start.
    pub registry_auth_file: Option<PathBuf>,
    /// UDP address of the cluster endpoint nodes join and connect to (QUIC,
    /// mutual TLS); default: the host and port of `listen`, over UDP.
    pub cluster_listen: Option<SocketAddr>,
    /// `host:port` nodes should dial, printed by `verge nodes join-token`;
    /// default: the bound cluster address.
    pub cluster_advertise: Option<String>,
    /// The IPv6 prefix instance addresses come from; each node gets the
    /// next /64 of it at join. At most /56.
    pub instance_prefix: String,
    /// The IPv6 prefix endpoint addresses come from (one per endpoint);
    /// ingresses add a `local` route for it. A /128 is one address shared
    /// by every endpoint (then ports must differ): `::1/128` keeps
    /// endpoints on loopback, for a `verge dev` without root.
    pub endpoint_prefix: String,
    /// IPv4 addresses of endpoints with `ipv4 = true`: each takes the
    /// first address where its ports are free; a /32 is one shared address.
    pub endpoint_ipv4_pool: String,
    /// How often nodes send heartbeats.
    pub heartbeat_secs: u64,
    /// A node without a heartbeat for this long is marked offline.
    pub node_offline_after_secs: u64,
    /// Instances of a node offline this long (after it was marked
    /// offline) are replaced on other nodes, unless pinned by a volume.
    pub reschedule_after_secs: u64,
    /// Mint another cluster admin token on this start (recovery when the
    /// first one is lost). A flag only: never read from the file.
    #[serde(skip)]
    pub new_admin_token: bool,
}

/// PEM files of the API's certificate chain and private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("/var/lib/verge"),
            database: None,
            max_body_bytes: 1024 * 1024,
            max_connections: 10_000,
            shutdown_timeout_secs: 30,
            client_timeout_secs: 10,
            tls: None,
            secrets_key_file: None,
            secrets_previous_key_files: Vec::new(),
            insecure_registries: Vec::new(),
            registry_auth_file: None,
            cluster_listen: None,
            cluster_advertise: None,
            instance_prefix: "fd76:6572:6765::/48".into(),
            endpoint_prefix: "fd65:6e64:7074::/64".into(),
            endpoint_ipv4_pool: "127.0.0.1/32".into(),
            heartbeat_secs: 2,
            node_offline_after_secs: 6,
            reschedule_after_secs: 30,
            new_admin_token: false,
        }
    }
}

/// A configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "refusing to serve plain HTTP on {0}: tokens would cross the network in clear text; \
         set [tls] cert and key (or --tls-cert/--tls-key), or listen on a loopback address"
    )]
    PlainHttpNotLoopback(SocketAddr),
    #[error("tls: {what} file {path} does not exist")]
    TlsFileMissing { what: &'static str, path: PathBuf },
    #[error(
        "database {0:?} is not supported: use sqlite://PATH or postgres://USER:PASSWORD@HOST/DB"
    )]
    BadDatabase(String),
    #[error(
        "instance_prefix {0:?} is not usable: give an IPv6 prefix of length /56 or shorter, \
         e.g. fd76:6572:6765::/48 (each node gets a /64 of it)"
    )]
    BadInstancePrefix(String),
    #[error(
        "heartbeat_secs ({heartbeat}) must be shorter than node_offline_after_secs \
         ({offline_after}), or every node would be marked offline between heartbeats"
    )]
    HeartbeatTooSlow { heartbeat: u64, offline_after: u64 },
    #[error("{field} must be greater than 0")]
    Zero { field: &'static str },
    #[error(transparent)]
    Addressing(#[from] crate::endpoints::AddressingError),
}

impl Config {
    /// Reads a TOML config file. Unknown keys are errors, with their position.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// The secrets data key file, and whether it may be created (only the
    /// default one in the data dir is; a configured file must exist).
    pub fn secrets_key(&self) -> (PathBuf, bool) {
        match &self.secrets_key_file {
            Some(path) => (path.clone(), false),
            None => (self.data_dir.join("secrets.key"), true),
        }
    }

    /// The database URL: the configured one, or SQLite in the data dir.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(url) => url.clone(),
            None => {
                // Percent-encode what a URL would read as syntax ('%', '?', '#').
                let path = self.data_dir.join("verge.db").display().to_string();
                let path = path
                    .replace('%', "%25")
                    .replace('?', "%3F")
                    .replace('#', "%23");
                format!("sqlite://{path}")
            }
        }
    }

    /// Checks the configuration as a whole, before anything is started.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.tls {
            None if !self.listen.ip().is_loopback() => {
                return Err(ConfigError::PlainHttpNotLoopback(self.listen));
            }
            Some(tls) => {
                for (what, path) in [("certificate", &tls.cert), ("key", &tls.key)] {
                    if !path.exists() {
                        return Err(ConfigError::TlsFileMissing {
                            what,
                            path: path.clone(),
                        });
                    }
                }
            }
            None => {}
        }
        let url = self.database_url();
        if crate::store::Backend::of_url(&url).is_none() {
            return Err(ConfigError::BadDatabase(url));
        }
        for (field, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_connections", self.max_connections),
            ("client_timeout_secs", self.client_timeout_secs as usize),
            ("heartbeat_secs", self.heartbeat_secs as usize),
            (
                "node_offline_after_secs",
                self.node_offline_after_secs as usize,
            ),
            ("reschedule_after_secs", self.reschedule_after_secs as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        self.addressing()?;
        if self.heartbeat_secs >= self.node_offline_after_secs {
            return Err(ConfigError::HeartbeatTooSlow {
                heartbeat: self.heartbeat_secs,
                offline_after: self.node_offline_after_secs,
            });
        }
        Ok(())
    }

    /// The parsed [`instance_prefix`](Self::instance_prefix).
    pub fn instance_prefix(&self) -> Result<ipnet::Ipv6Net, ConfigError> {
        self.instance_prefix
            .parse::<ipnet::Ipv6Net>()
            .ok()
            .filter(|p| p.prefix_len() <= 56)
            .ok_or_else(|| ConfigError::BadInstancePrefix(self.instance_prefix.clone()))
    }

    /// The parsed endpoint address pools.
    pub fn addressing(&self) -> Result<crate::endpoints::Addressing, ConfigError> {
        Ok(crate::endpoints::Addressing::parse(
            &self.endpoint_prefix,
            &self.endpoint_ipv4_pool,
            self.instance_prefix()?,
        )?)
    }

    /// Where the cluster endpoint binds.
    pub fn cluster_listen(&self) -> SocketAddr {
        self.cluster_listen.unwrap_or(self.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_local() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.listen.ip().is_loopback());
        assert!(c.database_url().starts_with("sqlite:///var/lib/verge/"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse("listen = \"127.0.0.1:1\"\nlisten_addr = 1\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn plain_http_off_loopback_is_refused() {
        let c = parse("listen = \"0.0.0.0:7070\"").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("refusing to serve plain HTTP on 0.0.0.0:7070"),
            "{err}"
        );
        let v6 = parse("listen = \"[::1]:7070\"").unwrap();
        v6.validate().unwrap();
    }

    #[test]
    fn bad_database_and_missing_tls_files_are_named() {
        let c = parse("database = \"mysql://x\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mysql://x"));
        let c =
            parse("[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("certificate file /nonexistent/c.pem"), "{err}");
    }
}
