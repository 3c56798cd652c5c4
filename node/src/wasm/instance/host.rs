//! What the host gives a wasm instance or listener: its network namespace
//! (entered by threads made for it) and its secret files, on a tmpfs of
//! their own under `<data>/wasm/run/<id>`, never on disk.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, umount2};
use verge_api::wire::SecretFile;

use crate::wasm::Preopen;

/// `<data>/wasm/run/<id>`: where an instance's or listener's secret
/// files are mounted.
pub(crate) fn run_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("wasm").join("run").join(id)
}

/// Removes what wasm instances and listeners of an earlier daemon left
/// under `<data>/wasm/run` (they ended with it): unmounts their secret
/// tmpfs and deletes the directories.
pub(crate) fn clean_leftovers(data_dir: &Path) {
    let root = data_dir.join("wasm").join("run");
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            tracing::info!(
                mount = p,
                "unmounting the secret files of a wasm instance of an earlier daemon"
            );
            let _ = umount2(p, MntFlags::MNT_DETACH);
        }
    }
    if let Err(e) = fs::remove_dir_all(&root)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %root.display(), error = %e, "cannot remove the leftovers of wasm instances");
    }
}

/// Secret files on a tmpfs of their own (mode 0700, never swapped where
/// the kernel can say so), unmounted when dropped: one directory per
/// guest parent directory, each file mode 0400, preopened read-only.
pub(crate) struct SecretsTmpfs {
    dir: PathBuf,
    mounted: PathBuf,
}

impl SecretsTmpfs {
    /// Mounts the tmpfs at `<dir>/secrets` and writes `secrets` to it;
    /// `None` without secret files. Blocking.
    pub(crate) fn mount(
        dir: &Path,
        secrets: &[SecretFile],
    ) -> io::Result<Option<(SecretsTmpfs, Vec<Preopen>)>> {
        if secrets.is_empty() {
            return Ok(None);
        }
        // Checked before anything is made.
        let mut parents: BTreeMap<&str, Vec<(&str, &SecretFile)>> = BTreeMap::new();
        for s in secrets {
            let (parent, name) = split_guest_path(&s.path).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "secret file path {:?} (bundle {}) is not an absolute file path",
                        s.path, s.bundle
                    ),
                )
            })?;
            parents.entry(parent).or_default().push((name, s));
        }
        let mounted = dir.join("secrets");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&mounted)?;
        let tmpfs = SecretsTmpfs {
            dir: dir.to_path_buf(),
            mounted,
        };
        let bytes: usize = secrets.iter().map(|s| s.contents.len()).sum();
        tmpfs.mount_tmpfs(bytes)?;
        let mut preopens = Vec::new();
        for (n, (parent, files)) in parents.into_iter().enumerate() {
            let host = tmpfs.mounted.join(n.to_string());
            fs::DirBuilder::new().mode(0o700).create(&host)?;
            for (name, s) in files {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o400)
                    .open(host.join(name))?;
                f.write_all(s.contents.as_bytes())?;
            }
            preopens.push(Preopen {
                host,
                guest: parent.to_owned(),
                writable: false,
            });
        }
        Ok(Some((tmpfs, preopens)))
    }

    fn mount_tmpfs(&self, bytes: usize) -> io::Result<()> {
        // Room for the files and their directories, at least 1 MiB.
        let size = (bytes * 2).max(1 << 20);
        crate::runtime::mounts::mount_staging(&self.mounted, size)
            .map_err(|e| io::Error::other(format!("{e} (secret files need root)")))
    }
}

impl Drop for SecretsTmpfs {
    fn drop(&mut self) {
        match umount2(&self.mounted, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                tracing::warn!(dir = %self.mounted.display(), error = %e, "cannot unmount the secret files")
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `/run/secrets/db` → (`/run/secrets`, `db`); `None` unless the path is
/// absolute and ends in a plain file name.
fn split_guest_path(path: &str) -> Option<(&str, &str)> {
    let p = Path::new(path);
    if !p.is_absolute() || !matches!(p.components().next_back(), Some(Component::Normal(_))) {
        return None;
    }
    let (parent, name) = path.trim_end_matches('/').rsplit_once('/')?;
    Some((if parent.is_empty() { "/" } else { parent }, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_split_into_parent_and_name() {
        assert_eq!(
            split_guest_path("/run/secrets/db"),
            Some(("/run/secrets", "db"))
        );
        assert_eq!(split_guest_path("/db"), Some(("/", "db")));
        assert_eq!(split_guest_path("run/db"), None);
        assert_eq!(split_guest_path("/run/.."), None);
        assert_eq!(split_guest_path("/"), None);
    }
}
