//! The node's image puller against a real registry (Debian's
//! `docker-registry`) over real HTTP: images are pushed to it with
//! oci-client, pulled with `ImageStore`, and what the registry served is
//! read from its access log. Authentication is the registry's own:
//! htpasswd (basic), and token auth with a token service written here that
//! signs real JWTs the registry verifies. Run as root (unpacking sets
//! owners and creates whiteout devices; one test mounts overlayfs).

use std::collections::HashMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use verge_node::pull::{ImageStore, PullError, PullErrorKind, PullOptions, RegistryAuth};
use verge_tests::eventually;
use verge_tests::registry::Registry;

const GIB: u64 = 1 << 30;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the pull tests need root: layers are unpacked with their owners and \
         whiteout devices, and overlayfs is mounted; run them as root"
    );
    verge_tests::init_tls();
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A blob as pushed: media type, bytes, digest.
#[derive(Clone)]
struct Blob {
    media_type: String,
    data: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.into(),
            digest: sha256(&data),
            data,
        }
    }

    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// A tar of regular files (parents implied), root-owned, mode 0644.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

/// A layer of `files` with `media_type`'s compression; and its diff_id.
fn layer(media_type: &str, files: &[(&str, &[u8])]) -> (Blob, String) {
    use std::io::Write;
    let tar = tar_of(files);
    let data = match media_type {
        OCI_ZSTD => zstd::encode_all(&tar[..], 3).unwrap(),
        OCI_TAR => tar.clone(),
        _ => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        }
    };
    (Blob::new(media_type, data), sha256(&tar))
}

fn config(media_type: &str, arch: &str, diff_ids: &[String], run: Value) -> Blob {
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    Blob::new(media_type, serde_json::to_vec(&config).unwrap())
}

fn manifest(media_type: &str, config: &Blob, layers: &[&Blob]) -> Blob {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.descriptor()).collect::<Vec<_>>(),
    });
    Blob::new(media_type, serde_json::to_vec(&m).unwrap())
}

/// An OCI image of gzip'd layers, each a list of files.
struct Built {
    layers: Vec<Blob>,
    config: Blob,
    manifest: Blob,
}

fn image(layers: &[&[(&str, &[u8])]]) -> Built {
    let (layers, diff_ids): (Vec<Blob>, Vec<String>) =
        layers.iter().map(|files| layer(OCI_GZIP, files)).unzip();
    let config = config(OCI_CONFIG, host_arch(), &diff_ids, json!({"Cmd": ["/app"]}));
    let manifest = manifest(OCI_MANIFEST, &config, &layers.iter().collect::<Vec<_>>());
    Built {
        layers,
        config,
        manifest,
    }
}

fn push_client(host: &str) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![host.to_string()]),
        ..Default::default()
    })
}

/// Pushes `blobs` and `manifest` as `host/repo[:tag]`; returns the pinned
/// reference `host/repo[:tag]@sha256:...`.
async fn push_as(
    host: &str,
    repo: &str,
    tag: Option<&str>,
    auth: &OciAuth,
    blobs: &[&Blob],
    manifest: &Blob,
) -> anyhow::Result<String> {
    let target: Reference = match tag {
        Some(tag) => format!("{host}/{repo}:{tag}"),
        None => format!("{host}/{repo}@{}", manifest.digest),
    }
    .parse()?;
    let client = push_client(host);
    client
        .auth(&target, auth, RegistryOperation::Push)
        .await
        .context("auth for push")?;
    for blob in blobs {
        if !client.blob_exists(&target, &blob.digest).await? {
            client
                .push_blob(&target, blob.data.clone(), &blob.digest)
                .await
                .with_context(|| format!("pushing {}", blob.digest))?;
        }
    }
    let content_type = reqwest::header::HeaderValue::from_str(&manifest.media_type)?;
    client
        .push_manifest_raw(&target, manifest.data.clone(), content_type)
        .await
        .context("pushing the manifest")?;
    Ok(match tag {
        Some(tag) => format!("{host}/{repo}:{tag}@{}", manifest.digest),
        None => format!("{host}/{repo}@{}", manifest.digest),
    })
}

async fn push(registry: &Registry, repo: &str, built: &Built) -> String {
    let mut blobs: Vec<&Blob> = built.layers.iter().collect();
    blobs.push(&built.config);
    push_as(
        registry.host(),
        repo,
        Some("1"),
        &OciAuth::Anonymous,
        &blobs,
        &built.manifest,
    )
    .await
    .unwrap_or_else(|e| panic!("push {repo}: {e:#}\nregistry log:\n{}", registry.log_tail()))
}

async fn open(root: &Path, budget: u64, opts: PullOptions) -> ImageStore {
    ImageStore::open(root.to_path_buf(), budget, opts)
        .await
        .expect("open the image store")
}

/// GETs of blob `digest` in `repos`, once the access log has them all:
/// waits for at least `at_least`, then lets the log settle.
async fn blob_gets(registry: &Registry, repos: &[&str], digest: &str, at_least: usize) -> usize {
    let count = || {
        repos
            .iter()
            .map(|r| registry.requests("GET", &format!("/v2/{r}/blobs/{digest}")))
            .sum::<usize>()
    };
    eventually(
        Duration::from_secs(5),
        "the registry's access log",
        || async { (count() >= at_least).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    count()
}

/// `len` bytes that do not compress.
fn noise(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn layer_dir(store: &ImageStore, digest: &str) -> PathBuf {
    store
        .root()
        .join("layers")
        .join(digest.trim_start_matches("sha256:"))
}

fn tmp_is_empty(store: &ImageStore) -> bool {
    std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

#[tokio::test]
async fn shared_layer_is_downloaded_and_unpacked_once() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let big = noise(2_000_000);
    let shared: &[(&str, &[u8])] = &[("usr/lib/big", &big)];
    let one = image(&[shared, &[("one", b"1")]]);
    let two = image(&[shared, &[("two", b"2")]]);
    let three = image(&[&[("three", b"3")], shared]);
    let shared_digest = one.layers[0].digest.clone();
    assert_eq!(two.layers[0].digest, shared_digest);
    let refs = [
        push(&registry, "one", &one).await,
        push(&registry, "two", &two).await,
        push(&registry, "three", &three).await,
    ];

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10 * GIB, PullOptions::default()).await;
    // Two pulls wanting the shared layer at once.
    let (a, b) = tokio::join!(store.pull(&refs[0]), store.pull(&refs[1]));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.layers[0], b.layers[0],
        "one directory for the shared layer"
    );
    assert_eq!(a.layers[0], layer_dir(&store, &shared_digest));
    assert_eq!(std::fs::read(a.layers[0].join("usr/lib/big")).unwrap(), big);
    // A later pull reuses it.
    let c = store.pull(&refs[2]).await.unwrap();
    assert_eq!(c.layers[1], a.layers[0]);
    assert_eq!(std::fs::read(c.layers[0].join("three")).unwrap(), b"3");

    let repos = ["one", "two", "three"];
    assert_eq!(
        blob_gets(&registry, &repos, &shared_digest, 1).await,
        1,
        "the shared layer was downloaded once"
    );
    assert_eq!(
        blob_gets(&registry, &["one"], &one.layers[1].digest, 1).await,
        1
    );
    assert_eq!(
        std::fs::read_dir(store.root().join("layers"))
            .unwrap()
            .count(),
        4
    );
    assert!(tmp_is_empty(&store));
    assert_eq!(store.images().len(), 3);
    assert_eq!(a.config.cmd, vec!["/app"]);
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and alive; `buf` is writable
    // for its length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

#[tokio::test]
async fn whiteouts_and_opaque_dirs_work_under_overlayfs() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let built = image(&[
        &[
            ("etc/keep", b"k"),
            ("etc/gone", b"g"),
            ("opq/old", b"o"),
            ("opq/sub/old2", b"o2"),
        ],
        &[
            ("etc/.wh.gone", b""),
            ("opq/.wh..wh..opq", b""),
            ("opq/new", b"n"),
        ],
    ]);
    let reference = push(&registry, "wh", &built).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"), GIB, PullOptions::default()).await;
    let pulled = store.pull(&reference).await.unwrap();
    let (lower, upper) = (&pulled.layers[0], &pulled.layers[1]);

    let gone = std::fs::symlink_metadata(upper.join("etc/gone")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "whiteout is a 0/0 char device"
    );
    assert!(!upper.join("etc/.wh.gone").exists());
    assert_eq!(
        xattr(&upper.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!upper.join("opq/.wh..wh..opq").exists());
    assert!(
        lower.join("etc/gone").is_file(),
        "the lower layer is untouched"
    );

    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let options = format!("lowerdir={}:{}", upper.display(), lower.display());
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .expect("mount overlayfs");
    let _mounted = Mounted(merged.clone());
    assert_eq!(std::fs::read(merged.join("etc/keep")).unwrap(), b"k");
    assert!(
        !merged.join("etc/gone").exists(),
        "the whited-out file is gone"
    );
    let mut opq: Vec<String> = std::fs::read_dir(merged.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opq.sort();
    assert_eq!(
        opq,
        vec!["new"],
        "the opaque dir hides the lower layer's content"
    );
}

#[tokio::test]
async fn zstd_and_plain_tar_layers_and_the_image_config() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let (zst, zst_diff) = layer(OCI_ZSTD, &[("bin/app", b"zstd'd app")]);
    let (plain, plain_diff) = layer(OCI_TAR, &[("etc/app.conf", b"plain")]);
    let run = json!({
        "Entrypoint": ["/bin/app", "--serve"],
        "Cmd": ["--port", "8080"],
        "Env": ["PATH=/bin", "MODE=prod"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "ExposedPorts": {"8080/tcp": {}},
    });
    let config = config(OCI_CONFIG, host_arch(), &[zst_diff, plain_diff], run);
    let manifest = manifest(OCI_MANIFEST, &config, &[&zst, &plain]);
    let reference = push_as(
        registry.host(),
        "zstd",
        Some("1"),
        &OciAuth::Anonymous,
        &[&zst, &plain, &config],
        &manifest,
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    let pulled = store.pull(&reference).await.unwrap();
    assert_eq!(pulled.digest, manifest.digest);
    assert_eq!(pulled.manifest, manifest.digest);
    assert_eq!(
        std::fs::read(pulled.layers[0].join("bin/app")).unwrap(),
        b"zstd'd app"
    );
    assert_eq!(
        std::fs::read(pulled.layers[1].join("etc/app.conf")).unwrap(),
        b"plain"
    );
    let c = &pulled.config;
    assert_eq!(c.entrypoint, vec!["/bin/app", "--serve"]);
    assert_eq!(c.cmd, vec!["--port", "8080"]);
    assert_eq!(c.env, vec!["PATH=/bin", "MODE=prod"]);
    assert_eq!(c.working_dir.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    let blobs = (manifest.data.len() + config.data.len()) as u64;
    assert_eq!(
        pulled.size,
        blobs + 10 + 5,
        "blobs plus unpacked file bytes"
    );
    assert_eq!(store.disk_usage(), pulled.size);
}

#[tokio::test]
async fn image_index_resolves_to_this_nodes_platform() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let mut pushed = Vec::new();
    let mut entries = Vec::new();
    // The other platform first, so that "first entry" would be wrong.
    let other = if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    for arch in [other, host_arch()] {
        let (l, diff) = layer(DOCKER_GZIP, &[("arch", arch.as_bytes())]);
        let c = config(
            DOCKER_CONFIG,
            arch,
            &[diff],
            json!({"Cmd": [format!("/{arch}")]}),
        );
        let m = manifest(DOCKER_MANIFEST, &c, &[&l]);
        push_as(
            registry.host(),
            "multi",
            None,
            &OciAuth::Anonymous,
            &[&l, &c],
            &m,
        )
        .await
        .unwrap();
        entries.push(json!({
            "mediaType": DOCKER_MANIFEST, "digest": m.digest, "size": m.data.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        pushed.push((l, m));
    }
    let list = Blob::new(
        DOCKER_LIST,
        serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}),
        )
        .unwrap(),
    );
    let reference = push_as(
        registry.host(),
        "multi",
        Some("1"),
        &OciAuth::Anonymous,
        &[],
        &list,
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    let pulled = store.pull(&reference).await.unwrap();
    let (ours, theirs) = (&pushed[1], &pushed[0]);
    assert_eq!(
        pulled.digest, list.digest,
        "named by the digest the reference pins"
    );
    assert_eq!(pulled.manifest, ours.1.digest);
    assert_eq!(
        std::fs::read(pulled.layers[0].join("arch")).unwrap(),
        host_arch().as_bytes()
    );
    assert_eq!(pulled.config.cmd, vec![format!("/{}", host_arch())]);
    assert_eq!(blob_gets(&registry, &["multi"], &ours.0.digest, 1).await, 1);
    assert_eq!(
        blob_gets(&registry, &["multi"], &theirs.0.digest, 0).await,
        0,
        "the other platform's layer is never fetched"
    );
    assert_eq!(
        registry.requests("GET", &format!("/v2/multi/manifests/{}", theirs.1.digest)),
        0
    );
}

#[tokio::test]
async fn altered_content_and_unknown_digests_are_refused() {
    require_root();
    let registry = Registry::start().await.unwrap();
    // Several MiB, so that the unpacker meets the damage long before the
    // download ends.
    let big = noise(8 << 20);
    let built = image(&[&[("a", &big)]]);
    let reference = push(&registry, "tamper", &built).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;

    // A digest the registry does not have.
    let unknown = format!("{}/tamper:1@sha256:{}", registry.host(), "0".repeat(64));
    let err = store.pull(&unknown).await.unwrap_err();
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(registry.host()), "{err}");

    // A layer altered in the registry's storage, same length: its first
    // deflate block header (right after the 10-byte gzip header) broken.
    let layer = &built.layers[0];
    let path = registry.blob_data_path(&layer.digest);
    let mut altered = std::fs::read(&path).unwrap();
    for byte in &mut altered[10..14] {
        *byte ^= 0xff;
    }
    std::fs::write(&path, &altered).unwrap();
    let err = store.pull(&reference).await.unwrap_err();
    assert!(matches!(err, PullError::DigestMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&layer.digest) && message.contains("refused"),
        "{message}"
    );
    assert_eq!(err.kind(), PullErrorKind::Image);
    assert_eq!(err.category(), "image_pull");
    assert!(
        !layer_dir(&store, &layer.digest).exists(),
        "nothing of the altered layer is kept"
    );
    assert!(tmp_is_empty(&store));
    assert!(store.images().is_empty());

    // An altered manifest, served under the digest the reference pins.
    let other = image(&[&[("b", b"another layer")]]);
    let reference = push(&registry, "tamper2", &other).await;
    let path = registry.blob_data_path(&other.manifest.digest);
    let mut text = std::fs::read(&path).unwrap();
    let at = text.len() - 2;
    text.insert(at, b' ');
    std::fs::write(&path, &text).unwrap();
    let err = store.pull(&reference).await.unwrap_err();
    assert!(matches!(err, PullError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&other.manifest.digest), "{err}");
    assert!(store.images().is_empty());
}

#[tokio::test]
async fn references_must_be_pinned() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    let err = store.pull("127.0.0.1:5000/hello:1.0").await.unwrap_err();
    assert!(matches!(err, PullError::NotPinned { .. }), "{err}");
    assert_eq!(err.kind(), PullErrorKind::Reference);
    let err = store
        .pull("127.0.0.1:5000/hello@sha256:abc")
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::InvalidReference { .. }), "{err}");
}

use verge_tests::registry::{BASIC_PASSWORD as PASSWORD, HTPASSWD};

fn basic(user: &str, password: &str) -> RegistryAuth {
    RegistryAuth::Basic {
        username: user.into(),
        password: password.into(),
    }
}

/// Pulls `reference` into a fresh store under `root` with `auth` for `host`.
async fn pull_with(
    root: &tempfile::TempDir,
    host: &str,
    reference: &str,
    auth: RegistryAuth,
) -> Result<verge_node::pull::PulledImage, PullError> {
    let opts = PullOptions {
        auth: vec![(host.to_string(), auth)],
        ..PullOptions::default()
    };
    let root = root.path().join(ulid::Ulid::new().to_string());
    open(&root, GIB, opts).await.pull(reference).await
}

#[tokio::test]
async fn basic_auth_registry() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("verge:{HTPASSWD}\n")).unwrap();
    let registry = Registry::start_with_auth(&format!(
        "  htpasswd:\n    realm: verge\n    path: '{}'\n",
        htpasswd.display()
    ))
    .await
    .unwrap();
    let built = image(&[&[("private", b"p")]]);
    let mut blobs: Vec<&Blob> = built.layers.iter().collect();
    blobs.push(&built.config);
    let creds = OciAuth::Basic("verge".into(), PASSWORD.into());
    let reference = push_as(
        registry.host(),
        "private",
        Some("1"),
        &creds,
        &blobs,
        &built.manifest,
    )
    .await
    .unwrap();

    let pulled = pull_with(&dir, registry.host(), &reference, basic("verge", PASSWORD))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(pulled.layers[0].join("private")).unwrap(),
        b"p"
    );

    let err = pull_with(&dir, registry.host(), &reference, RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::CredentialsNeeded { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(registry.host()) && message.contains("private"),
        "{message}"
    );
    let err = pull_with(&dir, registry.host(), &reference, basic("verge", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::CredentialsRefused { .. }), "{err}");
    assert!(
        err.next()[0].contains("--registry-auth"),
        "{:?}",
        err.next()
    );
}

/// A token service for docker-registry's `token` auth: checks basic
/// credentials and answers a JWT (ES256, certificate in `x5c`) granting the
/// scope asked for.
struct TokenService {
    key: ring::signature::EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
    authorization: String,
}

const ISSUER: &str = "verge-tests";
const SERVICE: &str = "verge-registry";

impl TokenService {
    fn new(user: &str, password: &str) -> TokenService {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["verge-tests-token".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        TokenService {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            authorization: format!(
                "Basic {}",
                base64(format!("{user}:{password}").as_bytes(), false)
            ),
        }
    }

    /// A signed token granting `scope` (`repository:NAME:ACTIONS`).
    fn token(&self, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let access: Vec<Value> = scope
            .split(' ')
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = json!({"alg": "ES256", "typ": "JWT", "x5c": [base64(&self.cert_der, false)]});
        let claims = json!({
            "iss": ISSUER, "sub": "verge", "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": ulid::Ulid::new().to_string(), "access": access,
        });
        let input = format!(
            "{}.{}",
            base64(header.to_string().as_bytes(), true),
            base64(claims.to_string().as_bytes(), true)
        );
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", base64(signature.as_ref(), true))
    }
}

/// Standard base64 (padded), or base64url without padding.
fn base64(bytes: &[u8], url: bool) -> String {
    let table: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url {
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
    }
    out
}

async fn serve_tokens(service: Arc<TokenService>) -> SocketAddr {
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    async fn token(
        State(s): State<Arc<TokenService>>,
        Query(q): Query<HashMap<String, String>>,
        headers: HeaderMap,
    ) -> axum::response::Response {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(s.authorization.as_str()) {
            return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
        }
        let token = s.token(q.get("scope").map(String::as_str).unwrap_or_default());
        axum::Json(json!({"token": token, "access_token": token, "expires_in": 300}))
            .into_response()
    }
    let app = axum::Router::new()
        .route("/token", axum::routing::get(token))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn bearer_token_registry() {
    require_root();
    let service = Arc::new(TokenService::new("verge", PASSWORD));
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("token.pem");
    std::fs::write(&bundle, &service.cert_pem).unwrap();
    let addr = serve_tokens(service.clone()).await;
    let auth = format!(
        "  token:\n    realm: http://{addr}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: '{}'\n",
        bundle.display()
    );
    let registry = Registry::start_with_auth(&auth).await.unwrap();
    let built = image(&[&[("tokened", b"t")]]);
    let mut blobs: Vec<&Blob> = built.layers.iter().collect();
    blobs.push(&built.config);
    let creds = OciAuth::Basic("verge".into(), PASSWORD.into());
    let reference = push_as(
        registry.host(),
        "tokened",
        Some("1"),
        &creds,
        &blobs,
        &built.manifest,
    )
    .await
    .unwrap_or_else(|e| panic!("push: {e:#}\n{}", registry.log_tail()));

    // Credentials exchanged for a token at the realm the registry names.
    let pulled = pull_with(&dir, registry.host(), &reference, basic("verge", PASSWORD))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(pulled.layers[0].join("tokened")).unwrap(),
        b"t"
    );
    // A token given as is.
    let token = service.token("repository:tokened:pull");
    let pulled = pull_with(
        &dir,
        registry.host(),
        &reference,
        RegistryAuth::Bearer { token },
    )
    .await
    .unwrap();
    assert_eq!(pulled.digest, built.manifest.digest);

    let err = pull_with(&dir, registry.host(), &reference, RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::CredentialsNeeded { .. }), "{err}");
    assert!(err.to_string().contains("tokened"), "{err}");
    let err = pull_with(&dir, registry.host(), &reference, basic("verge", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::CredentialsRefused { .. }), "{err}");
    let err = pull_with(
        &dir,
        registry.host(),
        &reference,
        RegistryAuth::Bearer {
            token: "forged".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PullError::CredentialsRefused { .. }), "{err}");
}

#[tokio::test]
async fn gc_keeps_images_in_use_and_shared_layers_within_budget() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let shared = vec![7u8; 20_000];
    let a = image(&[&[("shared", &shared)], &[("a", &[1u8; 5_000])]]);
    let b = image(&[&[("shared", &shared)], &[("b", &[2u8; 6_000])]]);
    let c = image(&[&[("c", &[3u8; 7_000])]]);
    let refs = [
        push(&registry, "a", &a).await,
        push(&registry, "b", &b).await,
        push(&registry, "c", &c).await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");

    let store = open(&root, 10 * GIB, PullOptions::default()).await;
    let mut pulled = Vec::new();
    for r in &refs {
        pulled.push(store.pull(r).await.unwrap());
    }
    let total = store.disk_usage();
    let a_own = pulled[0].size - 20_000;
    assert_eq!(
        total,
        pulled[0].size + pulled[1].size + pulled[2].size - 20_000
    );
    // Within budget: nothing goes.
    let report = store.gc(&[]).await.unwrap();
    assert!(
        report.removed_images.is_empty() && report.freed_bytes == 0,
        "{report:?}"
    );
    drop(store);

    // A budget that needs the oldest image (a) gone; c is in use.
    let store = open(&root, total - a_own, PullOptions::default()).await;
    assert_eq!(store.disk_usage(), total, "sizes survive a restart");
    let in_use = [pulled[2].digest.clone()];
    let report = store.gc(&in_use).await.unwrap();
    assert_eq!(report.removed_images, vec![pulled[0].digest.clone()]);
    assert_eq!(
        (report.freed_bytes, report.usage_bytes),
        (a_own, total - a_own)
    );
    assert!(!report.over_budget());
    assert!(!pulled[0].layers[1].exists(), "a's own layer is gone");
    assert!(pulled[0].layers[0].exists(), "the layer b shares is kept");
    assert!(
        pulled[1]
            .layers
            .iter()
            .chain(&pulled[2].layers)
            .all(|l| l.exists())
    );
    let mut kept = vec![pulled[1].digest.clone(), pulled[2].digest.clone()];
    kept.sort();
    assert_eq!(store.images(), kept);
    drop(store);

    // Nothing fits: everything not in use goes, the image in use stays.
    let store = open(&root, 0, PullOptions::default()).await;
    let report = store.gc(&in_use).await.unwrap();
    assert_eq!(report.removed_images, vec![pulled[1].digest.clone()]);
    assert!(report.over_budget());
    assert_eq!(store.disk_usage(), pulled[2].size);
    assert!(
        !pulled[1].layers[0].exists(),
        "the shared layer goes with its last image"
    );
    assert!(pulled[2].layers[0].exists());
    assert_eq!(store.images(), vec![pulled[2].digest.clone()]);
    assert_eq!(std::fs::read_dir(root.join("layers")).unwrap().count(), 1);
    assert!(tmp_is_empty(&store));
    // What GC removed is pulled again on demand.
    let again = store.pull(&refs[0]).await.unwrap();
    assert_eq!(
        std::fs::read(again.layers[1].join("a")).unwrap(),
        vec![1u8; 5_000]
    );
}

#[tokio::test]
async fn repull_of_a_local_image_needs_no_registry() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let built = image(&[&[("x", b"x")], &[("y", b"y")]]);
    let reference = push(&registry, "local", &built).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    let first = store.pull(&reference).await.unwrap();
    // The registry is gone (killed, its storage deleted).
    drop(registry);
    let again = store
        .pull(&reference)
        .await
        .expect("a local image pulls without its registry");
    assert_eq!(again, first);
    drop(store);
    // Also after a restart.
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    assert_eq!(store.pull(&reference).await.unwrap(), first);
}

#[tokio::test]
async fn leftovers_of_a_crash_are_cleaned_up() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let built = image(&[&[("x", b"x")], &[("y", b"y")]]);
    let reference = push(&registry, "crash", &built).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), GIB, PullOptions::default()).await;
    let first = store.pull(&reference).await.unwrap();
    drop(store);

    // What a crash can leave: a half-unpacked layer in tmp/, an unpacked
    // layer no record names yet, and (by hand) a layer gone from under its
    // image's record.
    let half = dir.path().join("tmp/01HALFUNPACKED/usr");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("half"), b"h").unwrap();
    let orphan = dir.path().join("layers").join("ab".repeat(32));
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("f"), vec![0u8; 1000]).unwrap();
    std::fs::remove_dir_all(&first.layers[1]).unwrap();

    let store = open(dir.path(), GIB, PullOptions::default()).await;
    assert!(tmp_is_empty(&store), "tmp/ is emptied at open");
    let again = store.pull(&reference).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(std::fs::read(again.layers[1].join("y")).unwrap(), b"y");
    let (intact, lost) = (&built.layers[0].digest, &built.layers[1].digest);
    assert_eq!(
        blob_gets(&registry, &["crash"], lost, 2).await,
        2,
        "the lost layer is fetched again"
    );
    assert_eq!(
        blob_gets(&registry, &["crash"], intact, 1).await,
        1,
        "the intact one is not"
    );

    // GC removes what no image references, whatever the budget.
    let report = store.gc(&[]).await.unwrap();
    assert!(!orphan.exists());
    assert_eq!(report.freed_bytes, 1000);
    assert!(report.removed_images.is_empty());
    assert_eq!(store.disk_usage(), first.size);
}

/// The first IPv4 address of this machine not on loopback.
fn non_loopback_ipv4() -> Option<Ipv4Addr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points to a sockaddr; its family says which.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_unspecified() {
                    found = Some(ip);
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs returned, once.
    unsafe { libc::freeifaddrs(addrs) };
    found
}

/// Connections open through a [`forward`], now and at most.
#[derive(Default)]
struct Connections {
    open: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// Forwards TCP connections to `bind:PORT` (a port picked here) to `to`.
async fn forward(bind: IpAddr, to: String) -> (SocketAddr, Arc<Connections>) {
    use std::sync::atomic::Ordering::SeqCst;
    let listener = tokio::net::TcpListener::bind((bind, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Connections::default());
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (to, c) = (to.clone(), counted.clone());
            let now = c.open.fetch_add(1, SeqCst) + 1;
            c.most.fetch_max(now, SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                c.open.fetch_sub(1, SeqCst);
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn layers_download_concurrently_within_the_bound() {
    require_root();
    let registry = Registry::start().await.unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6u32)
        .map(|i| (format!("l{i}"), noise(3_000_000 + i)))
        .collect();
    let layers: Vec<Vec<(&str, &[u8])>> = files
        .iter()
        .map(|(name, data)| vec![(name.as_str(), &data[..])])
        .collect();
    let layers: Vec<&[(&str, &[u8])]> = layers.iter().map(Vec::as_slice).collect();
    let built = image(&layers);
    let local = push(&registry, "wide", &built).await;
    let (front, connections) =
        forward(IpAddr::V4(Ipv4Addr::LOCALHOST), registry.host().to_string()).await;
    let reference = local.replace(registry.host(), &front.to_string());

    let dir = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        max_concurrent_layers: 2,
        ..PullOptions::default()
    };
    let pulled = open(dir.path(), GIB, opts)
        .await
        .pull(&reference)
        .await
        .unwrap();
    assert_eq!(pulled.layers.len(), 6);
    // One kept client: a connection per download in flight (and none idle
    // beyond them, as each is reused by the next layer).
    let most = connections.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=3).contains(&most),
        "{most} connections at once for 6 layers, 2 at a time"
    );
}

#[tokio::test]
async fn plain_http_off_loopback_needs_an_insecure_listing() {
    require_root();
    let ip = non_loopback_ipv4().expect("this test needs an IPv4 address not on loopback on this machine (it binds a plain HTTP registry front there)");
    let registry = Registry::start().await.unwrap();
    let built = image(&[&[("x", b"x")]]);
    let local = push(&registry, "remote", &built).await;
    // The same registry, plain HTTP, at an address that is not loopback.
    let (front, _) = forward(IpAddr::V4(ip), registry.host().to_string()).await;
    let reference = local.replace(registry.host(), &front.to_string());

    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"), GIB, PullOptions::default()).await;
    let err = store.pull(&reference).await.unwrap_err();
    assert!(matches!(err, PullError::Tls { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&front.to_string()) && message.contains("insecure"),
        "{message}"
    );
    assert_eq!(
        registry.requests(
            "GET",
            &format!("/v2/remote/blobs/{}", built.layers[0].digest)
        ),
        0
    );

    let opts = PullOptions {
        insecure_registries: vec![front.to_string()],
        ..PullOptions::default()
    };
    let store = open(&dir.path().join("b"), GIB, opts).await;
    let pulled = store
        .pull(&reference)
        .await
        .expect("pull from a registry listed as insecure");
    assert_eq!(std::fs::read(pulled.layers[0].join("x")).unwrap(), b"x");
}
