//! The directory backend's file work, for hosts without loop devices: a
//! volume is a plain directory, its snapshot a copy of the tree. Nothing
//! here enforces a size. Blocking.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;

/// Copies the tree at `src` to `dst` (which must not exist): directories,
/// files, symlinks and FIFOs, with their modes, owners and modification
/// times. Hard links become separate files; sockets and device nodes are
/// skipped (logged).
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let kind = meta.file_type();
    if kind.is_dir() {
        std::fs::create_dir(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else if kind.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
        return Ok(());
    } else if kind.is_file() {
        std::fs::copy(src, dst)?;
    } else if kind.is_fifo() {
        nix::unistd::mkfifo(dst, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    } else {
        tracing::warn!(path = %src.display(), "snapshot skips a socket or device node");
        return Ok(());
    }
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    // After chown, which clears set-user-ID bits.
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let modified = meta.modified()?;
    if kind.is_dir() || kind.is_file() {
        std::fs::File::open(dst)?.set_modified(modified)?;
    }
    Ok(())
}

/// Bytes of disk the tree at `root` takes (hard-linked files once).
pub fn tree_size(root: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed while walking: the workload is writing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            match std::fs::read_dir(&path) {
                Ok(entries) => {
                    for entry in entries {
                        stack.push(entry?.path());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_modes_links_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), b"hello").unwrap();
        std::fs::set_permissions(src.join("sub/file"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();

        let dst = dir.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("sub/file")).unwrap(), b"hello");
        let mode = std::fs::metadata(dst.join("sub/file")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            Path::new("sub/file")
        );
        assert!(
            std::fs::symlink_metadata(dst.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert!(tree_size(&dst).unwrap() > 0);
        assert!(
            copy_tree(&src, &dst).is_err(),
            "copied over an existing tree"
        );
    }
}
