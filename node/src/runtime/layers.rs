//! Looking a path up in a stack of unpacked image layers without mounting
//! them (isolation `none`): the top-most layer that has an entry wins, and
//! symbolic links are followed inside the stack, not on the host.
//!
//! Whiteouts hide lower entries, in both forms a layer dir may hold them
//! (overlayfs' 0/0 character device, or an OCI `.wh.<name>` file). Opaque
//! directories are not honoured: a lower layer's entries stay visible.

use std::collections::VecDeque;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Symbolic links followed at most (as the kernel's `ELOOP` limit).
const MAX_LINKS: usize = 40;

/// Where `path` (absolute in the image) is on the host, following symbolic
/// links inside the image. `layers` are bottom first.
pub fn lookup(layers: &[PathBuf], path: &str) -> Option<PathBuf> {
    let mut queue: VecDeque<String> = components(path).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = queue.pop_front() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        resolved.push(comp);
        let relative: PathBuf = resolved.iter().collect();
        let host = top_most(layers, &relative)?;
        let meta = fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            let target = target.to_str()?;
            resolved.pop();
            if target.starts_with('/') {
                resolved.clear();
            }
            for (i, c) in components(target).enumerate() {
                queue.insert(i, c);
            }
        }
    }
    let relative: PathBuf = resolved.iter().collect();
    top_most(layers, &relative)
}

/// Looks up a command the way `execvp` does: as a path when it has a `/`,
/// else in each directory of `path_var`. Only regular files count.
pub fn find_command(layers: &[PathBuf], command: &str, path_var: &str) -> Option<PathBuf> {
    let is_file = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file());
    if command.contains('/') {
        return lookup(layers, command).filter(|p| is_file(p));
    }
    path_var
        .split(':')
        .filter(|dir| dir.starts_with('/'))
        .find_map(|dir| lookup(layers, &format!("{dir}/{command}")).filter(|p| is_file(p)))
}

fn components(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split('/').filter(|c| !c.is_empty()).map(str::to_owned)
}

/// The host path of `relative` in the top-most layer that has it, or `None`
/// when no layer has it or a whiteout hides it.
fn top_most(layers: &[PathBuf], relative: &Path) -> Option<PathBuf> {
    if relative.as_os_str().is_empty() {
        return layers.last().cloned();
    }
    for layer in layers.iter().rev() {
        let host = layer.join(relative);
        if let Ok(meta) = fs::symlink_metadata(&host) {
            let whiteout = meta.file_type().is_char_device() && meta.rdev() == 0;
            return (!whiteout).then_some(host);
        }
        if let (Some(parent), Some(name)) = (host.parent(), host.file_name()) {
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(name);
            if parent.join(wh).exists() {
                return None;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn top_layer_wins_links_stay_in_the_stack_and_whiteouts_hide() {
        let tmp = tempfile::tempdir().unwrap();
        let (low, high) = (tmp.path().join("low"), tmp.path().join("high"));
        fs::create_dir_all(low.join("bin")).unwrap();
        fs::create_dir_all(high.join("usr/bin")).unwrap();
        fs::write(low.join("bin/busybox"), "low").unwrap();
        fs::write(low.join("bin/gone"), "low").unwrap();
        fs::write(high.join("usr/bin/tool"), "high").unwrap();
        // Absolute link: resolved in the stack, not on the host's /bin.
        symlink("/bin/busybox", high.join("usr/bin/sh")).unwrap();
        symlink("../../bin/busybox", high.join("usr/bin/rel")).unwrap();
        fs::create_dir_all(high.join("bin")).unwrap();
        fs::write(high.join("bin/.wh.gone"), "").unwrap();
        let layers = vec![low.clone(), high.clone()];

        assert_eq!(
            lookup(&layers, "/usr/bin/sh"),
            Some(low.join("bin/busybox"))
        );
        assert_eq!(
            lookup(&layers, "/usr/bin/rel"),
            Some(low.join("bin/busybox"))
        );
        assert_eq!(
            lookup(&layers, "/usr/bin/tool"),
            Some(high.join("usr/bin/tool"))
        );
        assert_eq!(lookup(&layers, "/bin/gone"), None);
        assert_eq!(lookup(&layers, "/nope"), None);
        assert_eq!(
            find_command(&layers, "sh", "/bin:/usr/bin"),
            Some(low.join("bin/busybox"))
        );
        assert_eq!(
            find_command(&layers, "bin", "/"),
            None,
            "a directory is not a command"
        );
    }
}
