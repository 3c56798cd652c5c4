//! The JSON documents of an image: image index, image manifest, image
//! config. Parsed with small structs of our own that accept both the OCI
//! and the Docker v2 forms and ignore what the node does not use.

use serde::{Deserialize, Serialize};

/// A content descriptor: what a manifest says about a blob.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    platform: Option<Platform>,
}

/// An image index or an image manifest: one struct, told apart by which
/// fields are present (`mediaType` is optional in OCI).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Option<Vec<IndexEntry>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What the node asks a registry for, by digest.
pub(crate) const ACCEPTED: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// A fetched manifest, parsed.
pub(crate) enum Manifest {
    /// An index: the digest of the entry for this node's platform, or
    /// `Err(the platforms it lists)`.
    Index(Result<String, String>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// The platform this node runs images for, in OCI's words.
pub(crate) fn node_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// Parses a manifest or an index; an index is resolved to this node's entry.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if doc.schema_version != Some(2) {
        return Err(format!(
            "schemaVersion is {:?}, only 2 is supported",
            doc.schema_version
        ));
    }
    let media_type = doc.media_type.as_deref().unwrap_or_default();
    if let Some(entries) = doc.manifests {
        if !matches!(media_type, "" | OCI_INDEX | DOCKER_LIST) {
            return Err(format!("media type {media_type} with a manifests list"));
        }
        let (os, arch) = node_platform();
        let found = entries.iter().find(|e| {
            matches!(e.media_type.as_str(), "" | OCI_MANIFEST | DOCKER_MANIFEST)
                && e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == os && p.architecture == arch)
        });
        return Ok(Manifest::Index(match found {
            Some(entry) => Ok(entry.digest.clone()),
            None => Err(entries
                .iter()
                .map(|e| match &e.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "(no platform)".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")),
        }));
    }
    if !matches!(media_type, "" | OCI_MANIFEST | DOCKER_MANIFEST) {
        return Err(format!("unsupported manifest media type {media_type}"));
    }
    match (doc.config, doc.layers) {
        (Some(config), Some(layers)) => Ok(Manifest::Image { config, layers }),
        _ => Err("an image manifest needs `config` and `layers`".into()),
    }
}

/// How to run the image: what the runtime needs from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// `None` when the image leaves it empty (the runtime uses `/`).
    pub working_dir: Option<String>,
    /// `USER[:GROUP]`, names or numbers; `None` when empty (root).
    pub user: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    config: Option<RunConfig>,
    rootfs: Option<RootFs>,
}

/// A parsed image config: how to run it, and what to check.
pub(crate) struct Config {
    pub run: ImageConfig,
    /// `os/architecture`, as the config states them (may be empty).
    pub os: String,
    pub architecture: String,
    /// The digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<String>,
}

pub(crate) fn parse_config(bytes: &[u8]) -> Result<Config, String> {
    let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let run = file
        .config
        .map_or_else(ImageConfig::default, |c| ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.filter(|s| !s.is_empty()),
            user: c.user.filter(|s| !s.is_empty()),
        });
    Ok(Config {
        run,
        os: file.os,
        architecture: file.architecture,
        diff_ids: file.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

/// The hex part of a `sha256:<64 lowercase hex>` digest, or `None`. Digests
/// become file names in the store: nothing else is accepted.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_picks_this_nodes_platform() {
        let (os, arch) = node_platform();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:aa","size":1,"platform":{{"os":"linux","architecture":"s390x"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"sha256:bb","size":1,"platform":{{"os":"{os}","architecture":"{arch}"}}}}]}}"#
        );
        match parse_manifest(index.as_bytes()).unwrap() {
            Manifest::Index(Ok(d)) => assert_eq!(d, "sha256:bb"),
            _ => panic!("not resolved"),
        }
        let other = r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:aa","size":1,"platform":{"os":"windows","architecture":"amd64"}}]}"#;
        match parse_manifest(other.as_bytes()).unwrap() {
            Manifest::Index(Err(listed)) => assert_eq!(listed, "windows/amd64"),
            _ => panic!("resolved a foreign platform"),
        }
    }

    #[test]
    fn config_empty_strings_are_none() {
        let c = parse_config(
            br#"{"os":"linux","architecture":"amd64","config":{"Cmd":["a"],"WorkingDir":"","User":"1000:1000","Env":null},"rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#,
        )
        .unwrap();
        assert_eq!(c.run.cmd, vec!["a"]);
        assert_eq!(c.run.working_dir, None);
        assert_eq!(c.run.user.as_deref(), Some("1000:1000"));
        assert!(c.run.env.is_empty());
        assert_eq!(c.diff_ids, vec!["sha256:x"]);
    }

    #[test]
    fn digests_are_strict() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(digest_hex(&ok).is_some());
        for bad in [
            "sha256:../../etc",
            "sha512:aa",
            "sha256:",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(digest_hex(bad).is_none(), "{bad}");
        }
    }
}
