//! The content-addressed store on disk, shared by all images of the node:
//!
//! ```text
//! <root>/lock                      flock'd by the one process using the store
//! <root>/blobs/sha256/<hex>        manifests, indexes, image configs
//! <root>/layers/<hex>/             unpacked layers (by compressed digest): overlayfs lowerdirs
//! <root>/images/<hex>.json         one record per image (by pinned digest)
//! <root>/tmp/                      downloads and unpacks in progress; emptied at open
//! ```
//!
//! Everything is written under `tmp/` and renamed into place, so whatever
//! sits under `blobs/` and `layers/` is complete; an image's record is
//! written last. Compressed layers are never stored: the download streams
//! into the unpacker, and the unpacked directory is what the runtime uses
//! and what a re-pull checks for.
//! Deletions rename into `tmp/` first, so a crash never leaves a partial
//! layer in place. The in-memory [`State`] mirrors the disk; in-flight pulls
//! pin what they use, so GC cannot delete it under them.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::PullError;
use super::manifest::digest_hex;

/// One piece of content, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Content {
    /// A manifest, index or config blob.
    Blob(String),
    /// An unpacked layer directory, by its compressed digest.
    Layer(String),
}

/// A digest with the size it takes on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sized {
    pub digest: String,
    pub size: u64,
}

/// What is known about one image: `<root>/images/<hex>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    /// The digest the reference pins (an index's, or the manifest's).
    pub digest: String,
    /// The reference it was last pulled by.
    pub reference: String,
    /// The image manifest's digest (the platform's entry for an index).
    pub manifest: String,
    pub config: String,
    /// Index (if any), manifest, config.
    pub blobs: Vec<Sized>,
    /// Bottom first.
    pub layers: Vec<Sized>,
    /// Milliseconds since the epoch of the last pull, unique in the store.
    pub last_used: u64,
    /// Bytes of all its content, shared content included.
    pub size: u64,
}

impl ImageRecord {
    pub fn contents(&self) -> impl Iterator<Item = Content> + '_ {
        let blobs = self.blobs.iter().map(|b| Content::Blob(b.digest.clone()));
        blobs.chain(self.layers.iter().map(|l| Content::Layer(l.digest.clone())))
    }
}

/// The store's state, mirrored from disk.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub images: HashMap<String, ImageRecord>,
    /// Content on disk and its size.
    pub content: HashMap<Content, u64>,
    /// Sum of `content`.
    pub usage: u64,
    /// Content an in-flight pull relies on (count of pulls).
    pub pins: HashMap<Content, usize>,
    /// Images being pulled (count of pulls).
    pub pulling: HashMap<String, usize>,
    /// The latest `last_used` handed out.
    pub last_used: u64,
}

impl State {
    fn add(&mut self, c: Content, size: u64) {
        if let Some(old) = self.content.insert(c, size) {
            self.usage -= old;
        }
        self.usage += size;
    }

    fn forget(&mut self, c: &Content) -> Option<u64> {
        let size = self.content.remove(c)?;
        self.usage -= size;
        Some(size)
    }

    /// A new `last_used`: now, and later than any handed out before.
    pub fn stamp(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_used = now.max(self.last_used + 1);
        self.last_used
    }
}

pub(crate) struct Store {
    root: PathBuf,
    state: Mutex<State>,
    /// One async lock per content being produced: a second pull of the same
    /// layer waits for the first instead of downloading it again.
    keys: Mutex<HashMap<Content, Weak<tokio::sync::Mutex<()>>>>,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating) the store at `root`: takes its lock, empties
    /// `tmp/`, loads the image records and sizes what is on disk.
    pub fn open(root: &Path) -> Result<Store, PullError> {
        for dir in ["blobs/sha256", "layers", "images", "tmp"] {
            let dir = root.join(dir);
            fs::create_dir_all(&dir).map_err(PullError::io("creating", &dir))?;
        }
        let lock_path = root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(PullError::io("opening", &lock_path))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| PullError::Locked {
                root: root.to_path_buf(),
            })?;
        let tmp = root.join("tmp");
        fs::remove_dir_all(&tmp).map_err(PullError::io("emptying", &tmp))?;
        fs::create_dir(&tmp).map_err(PullError::io("creating", &tmp))?;

        let mut state = State::default();
        load_records(root, &mut state)?;
        let blobs = root.join("blobs/sha256");
        for (hex, meta) in list(&blobs)? {
            if meta.is_file() {
                state.add(Content::Blob(format!("sha256:{hex}")), meta.len());
            }
        }
        let known: HashMap<String, u64> = state
            .images
            .values()
            .flat_map(|r| r.layers.iter().map(|l| (l.digest.clone(), l.size)))
            .collect();
        let layers = root.join("layers");
        for (hex, meta) in list(&layers)? {
            if meta.is_dir() {
                let digest = format!("sha256:{hex}");
                let size = match known.get(&digest) {
                    Some(size) => *size,
                    None => tree_size(&layers.join(&hex)),
                };
                state.add(Content::Layer(digest), size);
            }
        }
        state.last_used = state
            .images
            .values()
            .map(|r| r.last_used)
            .max()
            .unwrap_or(0);
        tracing::info!(
            root = %root.display(),
            images = state.images.len(),
            bytes = state.usage,
            "image store opened"
        );
        Ok(Store {
            root: root.to_path_buf(),
            state: Mutex::new(state),
            keys: Mutex::default(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self, c: &Content) -> PathBuf {
        match c {
            Content::Blob(d) => self.root.join("blobs/sha256").join(hex(d)),
            Content::Layer(d) => self.root.join("layers").join(hex(d)),
        }
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", hex(digest)))
    }

    /// A fresh path under `tmp/`, removed (file or tree) when dropped.
    pub fn temp(&self) -> TempPath {
        TempPath(self.root.join("tmp").join(ulid::Ulid::new().to_string()))
    }

    /// Its size if `c` is in the store, checked on disk (content deleted
    /// behind the store's back is forgotten, and fetched again).
    pub fn present(&self, c: &Content) -> Option<u64> {
        let mut state = self.state();
        let size = *state.content.get(c)?;
        if fs::symlink_metadata(self.path(c)).is_ok() {
            return Some(size);
        }
        tracing::warn!(content = ?c, "content missing from the image store's disk; fetching it again");
        state.forget(c);
        None
    }

    /// Waits until no one else produces `c`; hold the guard while producing it.
    pub async fn produce(&self, c: &Content) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.len() > 256 {
                keys.retain(|_, w| w.strong_count() > 0);
            }
            match keys.get(c).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    keys.insert(c.clone(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Moves the finished `tmp` (file or directory) into place as `c`.
    pub fn commit(&self, c: Content, tmp: &TempPath, size: u64) -> Result<(), PullError> {
        let dest = self.path(&c);
        {
            let mut state = self.state();
            fs::rename(&tmp.0, &dest).map_err(PullError::io("moving into place", &dest))?;
            state.add(c, size);
        }
        sync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// Writes a small blob (manifest) whose digest was checked.
    pub fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), PullError> {
        let tmp = self.temp();
        write_synced(&tmp.0, bytes)?;
        self.commit(Content::Blob(digest.into()), &tmp, bytes.len() as u64)
    }

    /// A small blob's bytes if present and intact; a blob whose bytes no
    /// longer match its digest is removed (and fetched again by the caller).
    pub fn read_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, PullError> {
        let c = Content::Blob(digest.into());
        if self.present(&c).is_none() {
            return Ok(None);
        }
        let path = self.path(&c);
        let bytes = fs::read(&path).map_err(PullError::io("reading", &path))?;
        if super::registry::sha256_digest(&bytes) == digest {
            return Ok(Some(bytes));
        }
        tracing::warn!(path = %path.display(), "blob in the image store does not match its digest; fetching it again");
        let trash = self.temp();
        {
            let mut state = self.state();
            state.forget(&c);
            fs::rename(&path, &trash.0).map_err(PullError::io("removing", &path))?;
        }
        Ok(None)
    }

    /// Writes the image's record, then lists it.
    pub fn save_record(&self, record: ImageRecord) -> Result<(), PullError> {
        let json = serde_json::to_vec_pretty(&record).map_err(|e| PullError::Io {
            what: "encoding the record of".into(),
            path: self.record_path(&record.digest),
            source: e.into(),
        })?;
        let tmp = self.temp();
        write_synced(&tmp.0, &json)?;
        let dest = self.record_path(&record.digest);
        fs::rename(&tmp.0, &dest).map_err(PullError::io("moving into place", &dest))?;
        self.state().images.insert(record.digest.clone(), record);
        Ok(())
    }

    /// Plans a GC ([`super::gc::plan`]) and carries it out under one hold of
    /// the state lock: records are unlinked and content renamed into `tmp/`.
    /// Returns the images removed, the trash to delete, and the bytes freed.
    pub fn collect(
        &self,
        in_use: &HashSet<&str>,
        budget: u64,
    ) -> Result<(Vec<String>, Vec<TempPath>, u64), PullError> {
        let mut state = self.state();
        let plan = super::gc::plan(&state, in_use, budget);
        for digest in &plan.images {
            let path = self.record_path(digest);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(PullError::io("removing", path)(e)),
            }
            state.images.remove(digest);
        }
        let mut trash = Vec::new();
        let mut freed = 0;
        for c in &plan.content {
            let path = self.path(c);
            let tmp = self.temp();
            match fs::rename(&path, &tmp.0) {
                Ok(()) => trash.push(tmp),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(PullError::io("removing", path)(e)),
            }
            freed += state.forget(c).unwrap_or(0);
        }
        Ok((plan.images, trash, freed))
    }

    /// Marks the pull of `image` in flight until the hold is dropped.
    pub fn hold(&self, image: &str) -> Hold<'_> {
        *self.state().pulling.entry(image.into()).or_default() += 1;
        Hold {
            store: self,
            image: image.into(),
            pins: Vec::new(),
        }
    }
}

/// An in-flight pull: its image and the content it pinned.
pub(crate) struct Hold<'a> {
    store: &'a Store,
    image: String,
    pins: Vec<Content>,
}

impl Hold<'_> {
    /// Keeps GC away from `c` until the pull ends. Pin before checking
    /// whether `c` is present.
    pub fn pin(&mut self, c: Content) {
        *self.store.state().pins.entry(c.clone()).or_default() += 1;
        self.pins.push(c);
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut state = self.store.state();
        let state = &mut *state;
        for c in self.pins.drain(..) {
            decrement(&mut state.pins, c);
        }
        decrement(&mut state.pulling, std::mem::take(&mut self.image));
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// A path under `tmp/`; whatever is there is removed on drop.
#[derive(Debug)]
pub(crate) struct TempPath(pub PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.0) {
            Ok(m) if m.is_dir() => {
                let _ = fs::remove_dir_all(&self.0);
            }
            Ok(_) => {
                let _ = fs::remove_file(&self.0);
            }
            Err(_) => {}
        }
    }
}

/// The hex part of a validated digest (digests are checked before they
/// reach the store; anything else maps to a name no digest has).
fn hex(digest: &str) -> &str {
    digest_hex(digest).unwrap_or("invalid-digest")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let mut file = File::create(path).map_err(PullError::io("creating", path))?;
    file.write_all(bytes)
        .map_err(PullError::io("writing", path))?;
    file.sync_all().map_err(PullError::io("syncing", path))
}

fn sync_dir(dir: &Path) -> Result<(), PullError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(PullError::io("syncing", dir))
}

/// Entries of `dir` named by a 64-hex digest (others are left alone).
fn list(dir: &Path) -> Result<Vec<(String, fs::Metadata)>, PullError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(PullError::io("listing", dir))? {
        let entry = entry.map_err(PullError::io("listing", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if digest_hex(&format!("sha256:{name}")).is_none() {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(PullError::io("reading", entry.path()))?;
        out.push((name, meta));
    }
    Ok(out)
}

fn load_records(root: &Path, state: &mut State) -> Result<(), PullError> {
    let dir = root.join("images");
    for entry in fs::read_dir(&dir).map_err(PullError::io("listing", &dir))? {
        let path = entry.map_err(PullError::io("listing", &dir))?.path();
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()))
            .and_then(|r| {
                let valid = digest_hex(&r.digest).is_some_and(|h| Some(h) == stem.as_deref())
                    && r.contents().all(|c| match &c {
                        Content::Blob(d) | Content::Layer(d) => digest_hex(d).is_some(),
                    });
                if valid {
                    Ok(r)
                } else {
                    Err("names no valid digests".into())
                }
            });
        match parsed {
            Ok(record) => {
                state.images.insert(record.digest.clone(), record);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "removing an unreadable image record");
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Bytes of regular files under `dir` (each inode once), not following symlinks.
pub(crate) fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                total += meta.len();
            }
        }
    }
    total
}
