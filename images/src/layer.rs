//! Image layers: a deterministic gzip'd tar of files, and unpacking one.
//!
//! Deterministic means the same files always give the same bytes, hence the
//! same digest: entries sorted by path, parent directories included, mtime 0,
//! uid/gid 0, and a gzip header without timestamp or file name.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use oci_client::client::ImageLayer;

use crate::{Error, Result, sha256_digest};

/// A regular file to put in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Path in the image, e.g. `/hello` (the leading `/` is optional).
    pub path: String,
    pub contents: Vec<u8>,
    /// Unix permission bits, e.g. `0o755`.
    pub mode: u32,
    /// A symbolic link to this target instead of a regular file.
    pub symlink: Option<String>,
}

impl File {
    pub fn new(path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> File {
        File {
            path: path.into(),
            contents: contents.into(),
            mode,
            symlink: None,
        }
    }

    /// A symbolic link at `path` to `target`.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> File {
        File {
            path: path.into(),
            contents: Vec::new(),
            mode: 0o777,
            symlink: Some(target.into()),
        }
    }
}

/// A built layer: `application/vnd.oci.image.layer.v1.tar+gzip` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The gzip'd tar.
    pub data: Vec<u8>,
    /// `sha256:` of `data`, the digest registries know the layer by.
    pub digest: String,
    /// `sha256:` of the uncompressed tar, listed in the image config.
    pub diff_id: String,
}

/// What sits at a path in the layer.
enum Entry<'a> {
    Dir,
    File(&'a File),
}

impl Layer {
    /// Builds a layer holding `files` and their parent directories (mode 0755).
    pub fn from_files(files: &[File]) -> Result<Layer> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for file in files {
            let path = normalize(&file.path)?;
            let conflict = |reason: &str| Error::InvalidPath {
                path: file.path.clone(),
                reason: reason.into(),
            };
            // Every proper prefix ending before a '/' is a parent directory.
            for (i, _) in path.match_indices('/') {
                if let Some(Entry::File(_)) = entries.get(&path[..i]) {
                    return Err(conflict("a parent of it is also a file"));
                }
                entries.insert(path[..i].to_string(), Entry::Dir);
            }
            if entries.insert(path, Entry::File(file)).is_some() {
                return Err(conflict("another file or a directory has the same path"));
            }
        }
        // Sorted by path, parents come first: "a" < "a/b".
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            let (name, contents, mode) = match entry {
                Entry::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    (format!("{path}/"), &[][..], 0o755)
                }
                Entry::File(file) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    (path.clone(), &file.contents[..], file.mode & 0o7777)
                }
            };
            header.set_mode(mode);
            header.set_size(contents.len() as u64);
            let added = match entry {
                Entry::File(File {
                    symlink: Some(target),
                    ..
                }) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    tar.append_link(&mut header, &name, target)
                }
                _ => tar.append_data(&mut header, &name, contents),
            };
            added.map_err(Error::io(format!("adding {path} to the layer")))?;
        }
        let uncompressed = tar
            .into_inner()
            .map_err(Error::io("finishing the layer tar"))?;
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(&uncompressed)
            .map_err(Error::io("compressing the layer"))?;
        let data = gz.finish().map_err(Error::io("compressing the layer"))?;
        Ok(Layer {
            digest: sha256_digest(&data),
            diff_id: sha256_digest(&uncompressed),
            data,
        })
    }

    /// The layer as `oci-client` pushes it.
    pub fn to_image_layer(&self) -> ImageLayer {
        ImageLayer::oci_v1_gzip(self.data.clone(), None)
    }
}

/// `/a/b` or `a/b` → `a/b`; rejects empty, `.` and `..` components.
fn normalize(path: &str) -> Result<String> {
    let relative = path.strip_prefix('/').unwrap_or(path);
    let bad = relative.is_empty()
        || relative
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Error::InvalidPath {
            path: path.into(),
            reason: "needs non-empty components, none of them `.` or `..`".into(),
        });
    }
    Ok(relative.to_string())
}

/// Unpacks a gzip'd tar layer into `dest`, keeping permission bits. Paths
/// escaping `dest` are refused by the `tar` crate.
pub fn unpack_layer(gzipped: &[u8], dest: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(GzDecoder::new(gzipped));
    archive.set_preserve_permissions(true);
    archive.unpack(dest).map_err(Error::io(format!(
        "unpacking a layer into {}",
        dest.display()
    )))
}

/// The `sha256:` of the uncompressed tar inside a gzip'd layer (its diff_id).
pub fn diff_id(gzipped: &[u8]) -> Result<String> {
    let mut tar = Vec::new();
    GzDecoder::new(gzipped)
        .read_to_end(&mut tar)
        .map_err(Error::io("decompressing a layer"))?;
    Ok(sha256_digest(&tar))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<File> {
        vec![
            File::new("/usr/bin/tool", b"tool".to_vec(), 0o755),
            File::new("/hello", b"hi".to_vec(), 0o755),
            File::new("etc/motd", b"motd".to_vec(), 0o644),
        ]
    }

    #[test]
    fn same_files_same_digest_in_any_order() {
        let a = Layer::from_files(&files()).unwrap();
        let mut reversed = files();
        reversed.reverse();
        let b = Layer::from_files(&reversed).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.digest, sha256_digest(&a.data));
        assert_eq!(a.diff_id, diff_id(&a.data).unwrap());
        assert_ne!(a.digest, a.diff_id);
    }

    #[test]
    fn entries_are_sorted_with_parents_and_zeroed_metadata() {
        let layer = Layer::from_files(&files()).unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(&layer.data[..]));
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(
                (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                (0, 0, 0)
            );
            seen.push((
                entry.path().unwrap().display().to_string(),
                h.mode().unwrap(),
            ));
        }
        let want = [
            ("etc/", 0o755),
            ("etc/motd", 0o644),
            ("hello", 0o755),
            ("usr/", 0o755),
            ("usr/bin/", 0o755),
            ("usr/bin/tool", 0o755),
        ];
        let want: Vec<_> = want.iter().map(|(p, m)| (p.to_string(), *m)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn rejects_bad_and_conflicting_paths() {
        for bad in ["", "/", "a//b", "a/../b", "./a", "a/"] {
            let err = Layer::from_files(&[File::new(bad, vec![], 0o644)]);
            assert!(matches!(err, Err(Error::InvalidPath { .. })), "{bad:?}");
        }
        let dup = [
            File::new("/a", vec![], 0o644),
            File::new("a", vec![], 0o644),
        ];
        assert!(Layer::from_files(&dup).is_err());
        let file_as_dir = [
            File::new("/a", vec![], 0o644),
            File::new("/a/b", vec![], 0o644),
        ];
        assert!(Layer::from_files(&file_as_dir).is_err());
        let dir_as_file = [
            File::new("/a/b", vec![], 0o644),
            File::new("/a", vec![], 0o644),
        ];
        assert!(Layer::from_files(&dir_as_file).is_err());
    }
}
