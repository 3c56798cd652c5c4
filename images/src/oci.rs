//! OCI images: the image config and the image manifest over built layers.
//!
//! Both are encoded as canonical JSON (keys sorted, no whitespace) so that the
//! same inputs always give the same manifest digest.

use oci_client::client::{Config, ImageLayer};
use oci_client::config::{Architecture, ConfigFile, Os, ROOTFS_TYPE, Rootfs};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use serde_json::Value;

use crate::{Error, Layer, Result, sha256_digest};

/// How to run the image: the execution part of the OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// `PORT/tcp` or `PORT/udp` entries.
    pub exposed_ports: Vec<String>,
}

/// A complete single-platform OCI image, ready to push.
pub struct Image {
    pub layers: Vec<Layer>,
    /// The config blob (`application/vnd.oci.image.config.v1+json`).
    pub config: Config,
    pub manifest: OciImageManifest,
    /// The exact manifest bytes pushed; `digest` is their sha256.
    pub manifest_json: Vec<u8>,
    /// `sha256:` of `manifest_json`: the digest to pin the image by.
    pub digest: String,
}

impl Image {
    /// Builds the config and manifest for `layers` (bottom first), for the
    /// host's OS and architecture (what [`crate::build_static`] targets).
    pub fn build(run: &ImageConfig, layers: Vec<Layer>) -> Result<Image> {
        let config_file = ConfigFile {
            architecture: Architecture::default(),
            os: Os::default(),
            config: Some(oci_client::config::Config {
                entrypoint: Some(run.entrypoint.clone()),
                cmd: Some(run.cmd.clone()),
                env: Some(run.env.clone()),
                exposed_ports: Some(run.exposed_ports.iter().cloned().collect()),
                working_dir: Some("/".into()),
                ..Default::default()
            }),
            rootfs: Rootfs {
                r#type: ROOTFS_TYPE.into(),
                diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
            },
            ..Default::default()
        };
        let config = Config::oci_v1(canonical_json(&config_file, "the image config")?, None);
        let image_layers: Vec<ImageLayer> = layers.iter().map(Layer::to_image_layer).collect();
        let mut manifest = OciImageManifest::build(&image_layers, &config, None);
        manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.into());
        let manifest_json = canonical_json(&manifest, "the image manifest")?;
        Ok(Image {
            digest: sha256_digest(&manifest_json),
            layers,
            config,
            manifest,
            manifest_json,
        })
    }

    /// The parsed image config.
    pub fn config_file(&self) -> Result<ConfigFile> {
        serde_json::from_slice(&self.config.data).map_err(|source| Error::Json {
            what: "the image config",
            source,
        })
    }
}

/// Serializes `value` as JSON with object keys sorted at every level (sets
/// such as `ExposedPorts` are hash sets in `oci-client`, so their order would
/// otherwise vary between runs).
pub(crate) fn canonical_json(value: &impl serde::Serialize, what: &'static str) -> Result<Vec<u8>> {
    let json = |source| Error::Json { what, source };
    let value = serde_json::to_value(value).map_err(json)?;
    serde_json::to_vec(&sorted(value)).map_err(json)
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::File;

    fn image(ports: &[&str]) -> Image {
        let layer = Layer::from_files(&[File::new("/hello", b"x".to_vec(), 0o755)]).unwrap();
        let run = ImageConfig {
            entrypoint: vec!["/hello".into()],
            cmd: vec!["--port".into(), "8080".into()],
            env: vec!["A=1".into()],
            exposed_ports: ports.iter().map(|p| p.to_string()).collect(),
        };
        Image::build(&run, vec![layer]).unwrap()
    }

    #[test]
    fn config_and_manifest_have_the_oci_shape() {
        let img = image(&["8080/tcp"]);
        let config: Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"][0], "/hello");
        assert_eq!(config["config"]["Cmd"][1], "8080");
        assert_eq!(config["config"]["Env"][0], "A=1");
        assert_eq!(config["config"]["WorkingDir"], "/");
        assert!(config["config"]["ExposedPorts"]["8080/tcp"].is_object());
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            img.layers[0].diff_id.as_str()
        );

        let manifest: Value = serde_json::from_slice(&img.manifest_json).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        assert_eq!(
            manifest["config"]["digest"],
            sha256_digest(&img.config.data).as_str()
        );
        let layer = &manifest["layers"][0];
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(layer["digest"], img.layers[0].digest.as_str());
        assert_eq!(layer["size"], img.layers[0].data.len());
        assert_eq!(img.digest, sha256_digest(&img.manifest_json));
    }

    #[test]
    fn digest_is_deterministic() {
        let ports = [
            "1/tcp", "2/tcp", "3/udp", "4/tcp", "5/tcp", "6/tcp", "7/tcp", "8/tcp",
        ];
        let first = image(&ports).digest;
        for _ in 0..10 {
            assert_eq!(image(&ports).digest, first);
        }
        assert_ne!(image(&ports[..2]).digest, first);
    }
}
