//! Image pull throughput against a plain HTTP download of the same blobs.
//!
//! Starts a real registry (Debian's `docker-registry` on loopback, as the
//! tests run it), pushes one image of 8 gzip'd layers of incompressible
//! data (160 MiB), then, in rounds that alternate the two:
//! - Verge: `ImageStore::pull` into a cold store (a new root each round):
//!   manifest, config, layers 4 at a time, each streamed from the registry
//!   into its unpacker with its sha256 checked on the way, gunzipped, its
//!   diff_id checked, unpacked into its own directory, the filesystem
//!   synced before the directory is renamed into place;
//! - the peer: the same layer blobs fetched with plain `GET
//!   /v2/<repo>/blobs/<digest>` (reqwest, 4 at a time, one kept client),
//!   written to files: no checks, no unpacking, no syncing. The floor of any
//!   pull over this registry.
//!
//! The CPU time of the benchmark's process is shown beside each (the
//! registry's is not). Then the re-pull of the image when all of it is
//! local (no request).
//!
//! Run: `cargo bench -p verge-bench --bench pull` (release build), as root
//! like a node (otherwise files are unpacked without their owners).

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use verge_images::{File, Image, ImageConfig, Layer};
use verge_node::pull::{ImageStore, PullOptions};
use verge_tests::registry::Registry;

const LAYERS: usize = 8;
const FILES_PER_LAYER: usize = 4;
const FILE_BYTES: usize = 5 << 20;
const CONCURRENCY: usize = 4;
const ROUNDS: usize = 5;
const MIB: f64 = (1 << 20) as f64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = Registry::start().await?;
    let started = Instant::now();
    let layers = tokio::task::spawn_blocking(build_layers).await??;
    let bytes: u64 = layers.iter().map(|l| l.data.len() as u64).sum();
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let image = Image::build(
        &ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: Vec::new(),
            env: Vec::new(),
            exposed_ports: Vec::new(),
        },
        layers,
    )?;
    let reference = format!("{}/bench:1", registry.host());
    let digest = verge_images::push(&image, &reference).await?;
    let pinned = format!("{reference}@{digest}");
    eprintln!(
        "built and pushed {LAYERS} layers, {:.0} MiB, in {:.1?}",
        bytes as f64 / MIB,
        started.elapsed()
    );

    let http = reqwest::Client::builder().no_proxy().build()?;
    let dir = tempfile::tempdir()?;
    let (mut verge, mut peer) = (Run::default(), Run::default());
    for round in 0..ROUNDS {
        let root = dir.path().join(format!("verge-{round}"));
        let (t, cpu) = (Instant::now(), cpu_seconds());
        let store = ImageStore::open(root.clone(), u64::MAX, PullOptions::default()).await?;
        let pulled = store.pull(&pinned).await?;
        verge.add(t, cpu);
        anyhow::ensure!(pulled.layers.len() == LAYERS);

        let out = dir.path().join(format!("peer-{round}"));
        std::fs::create_dir(&out)?;
        let (t, cpu) = (Instant::now(), cpu_seconds());
        download(&http, registry.host(), &digests, &out).await?;
        peer.add(t, cpu);

        // The next round starts cold: free the disk of this one.
        drop(store);
        std::fs::remove_dir_all(&root)?;
        std::fs::remove_dir_all(&out)?;
    }

    // Everything local: what a restarted instance's pull costs.
    let store = ImageStore::open(dir.path().join("warm"), u64::MAX, PullOptions::default()).await?;
    store.pull(&pinned).await?;
    let t = Instant::now();
    let repulls = 20;
    for _ in 0..repulls {
        store.pull(&pinned).await?;
    }
    let repull = t.elapsed() / repulls;

    println!(
        "| operation ({:.0} MiB, {LAYERS} gzip layers)            | MiB/s (median) | MiB/s (best) | CPU s (median) |",
        bytes as f64 / MIB
    );
    println!(
        "|----------------------------------------------|----------------|--------------|----------------|"
    );
    println!(
        "{}",
        verge.row("Verge: ImageStore::pull, cold store", bytes)
    );
    println!(
        "{}",
        peer.row("peer: plain HTTP GET of the blobs to files", bytes)
    );
    println!(
        "re-pull with everything local: {:.2} ms",
        repull.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Wall and CPU times of the rounds of one side.
#[derive(Default)]
struct Run {
    wall: Vec<Duration>,
    cpu: Vec<f64>,
}

impl Run {
    fn add(&mut self, started: Instant, cpu_before: f64) {
        self.wall.push(started.elapsed());
        self.cpu.push(cpu_seconds() - cpu_before);
    }

    fn row(&mut self, name: &str, bytes: u64) -> String {
        self.wall.sort();
        self.cpu.sort_by(f64::total_cmp);
        let rate = |d: Duration| bytes as f64 / MIB / d.as_secs_f64();
        format!(
            "| {name:<44} | {:>14.0} | {:>12.0} | {:>14.2} |",
            rate(self.wall[self.wall.len() / 2]),
            rate(self.wall[0]),
            self.cpu[self.cpu.len() / 2]
        )
    }
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat`
/// (clock ticks of 1/100 s, Linux's `USER_HZ`). The registry's CPU, the
/// same work for both sides, is not counted.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15; `fields[0]` is field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Layers of pseudo-random (incompressible) files, built on all cores.
fn build_layers() -> anyhow::Result<Vec<Layer>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..LAYERS)
            .map(|layer| {
                s.spawn(move || {
                    let files: Vec<File> = (0..FILES_PER_LAYER)
                        .map(|f| {
                            let seed = (layer * FILES_PER_LAYER + f) as u64 + 1;
                            File::new(format!("/data/{layer}/{f}"), noise(seed, FILE_BYTES), 0o644)
                        })
                        .collect();
                    Layer::from_files(&files)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("layer builder panicked")
                    .map_err(Into::into)
            })
            .collect()
    })
}

/// `len` bytes of xorshift64* output.
fn noise(mut state: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// GETs every blob, `CONCURRENCY` at a time, each into its own file.
async fn download(
    http: &reqwest::Client,
    host: &str,
    digests: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for digest in digests {
        let permit = semaphore.clone().acquire_owned().await?;
        let (http, url) = (
            http.clone(),
            format!("http://{host}/v2/bench/blobs/{digest}"),
        );
        let path = out.join(digest.trim_start_matches("sha256:"));
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut resp = http.get(&url).send().await?.error_for_status()?;
            let file = tokio::fs::File::create(&path).await?;
            let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
            while let Some(chunk) = resp.chunk().await? {
                file.write_all(&chunk).await?;
            }
            file.flush().await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
