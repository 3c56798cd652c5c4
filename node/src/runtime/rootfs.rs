//! The root filesystem of an isolated instance, built by its PID 1 inside its
//! own mount namespace (so none of these mounts exists on the host, and they
//! all vanish with the namespace): overlayfs of the image layers with an
//! upper dir in the instance dir, a minimal `/dev`, `/proc` of the new PID
//! namespace, tmpfs `/tmp`, the instance's volumes and secret files
//! ([`super::mounts`]), then `pivot_root`.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{chdir, pivot_root};

use super::attach::{SecretFile, VolumeMount};
use super::user::User;
use super::{LaunchSpec, mounts, state};

/// The longest mount option string `mount(2)` takes (one page).
const MAX_MOUNT_DATA: usize = 4095;

/// `/dev` character devices: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// `/dev` symbolic links: name, target.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Parts of `/proc` made read-only: they configure the host kernel.
const PROC_READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Parts of `/proc` hidden: they reveal host kernel memory or state.
const PROC_MASKED: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/acpi",
    "/proc/scsi",
];

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: &str) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| err(format!("creating {}", target.display()), e))?;
    mount(Some(fstype), target, Some(fstype), flags, Some(data))
        .map_err(|e| err(format!("mounting {fstype} on {}", target.display()), e))
}

/// Builds the rootfs of the instance in `dir` from the spec's layers
/// (bottom first) and makes it the root, with `/etc/hostname` saying the
/// spec's hostname (and an `/etc/hosts` naming it when the image has none),
/// `volumes` mounted and `secrets` delivered. Returns the workload's user,
/// resolved from the image before the volumes and secrets are given to it.
/// Must run in a fresh mount namespace, in the new PID namespace (for
/// `/proc`).
pub fn enter(
    dir: &Path,
    spec: &LaunchSpec,
    volumes: &[VolumeMount],
    secrets: &[SecretFile],
) -> Result<User, String> {
    let (layers, hostname) = (&spec.layers, spec.hostname.as_str());
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("making the mounts private", e))?;
    let root = dir.join(state::ROOTFS);
    mount_overlay(dir, layers, &root)?;
    write_identity(&root, hostname)?;

    let dev = root.join("dev");
    mount_fs(
        "tmpfs",
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(|e| err(format!("creating /dev/{name}"), e))?;
        // mknod applies the umask.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .map_err(|e| err(format!("chmod /dev/{name}"), e))?;
    }
    for (name, target) in DEV_LINKS {
        symlink(target, dev.join(name)).map_err(|e| err(format!("linking /dev/{name}"), e))?;
    }
    mount_fs(
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount_fs(
        "tmpfs",
        &dev.join("shm"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "mode=1777,size=65536k",
    )?;
    mount_fs(
        "proc",
        &root.join("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;
    mount_fs(
        "tmpfs",
        &root.join("tmp"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777",
    )?;
    let root_fd = mounts::open_root(&root)?;
    let user = mounts::resolve_user(&root_fd, spec.user.as_deref())?;
    mounts::attach(dir, &root_fd, volumes, secrets, &user)?;
    drop(root_fd);

    chdir(&root).map_err(|e| err(format!("chdir {}", root.display()), e))?;
    // Stack the old root under the new one, then detach it: no directory
    // for the old root is needed.
    pivot_root(".", ".").map_err(|e| err("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detaching the host's root", e))?;
    chdir("/").map_err(|e| err("chdir /", e))?;
    protect_proc()?;
    Ok(user)
}

/// `/etc/hostname` (the instance's, whatever the image had) and, when the
/// image has none, an `/etc/hosts` with localhost and the hostname; in the
/// overlay's upper dir, so the image's layers are untouched.
///
/// This runs as host root before `pivot_root`, so nothing of the image may
/// redirect it: an `/etc` that is not a plain directory, or a name that is
/// a symbolic link, is left alone (opened with `O_NOFOLLOW`; nothing else
/// runs in the rootfs yet to swap them).
fn write_identity(root: &Path, hostname: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let etc = root.join("etc");
    match fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(_) => fs::create_dir(&etc).map_err(|e| err("creating /etc", e))?,
    }
    let write = |name: &str, text: &str, replace: bool| -> Result<(), String> {
        let path = etc.join(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => return Ok(()),
            Ok(_) if !replace => return Ok(()),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| err(format!("writing /etc/{name}"), e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| err(format!("writing /etc/{name}"), e))
    };
    write("hostname", &format!("{hostname}\n"), true)?;
    write(
        "hosts",
        &format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{hostname}\n"),
        false,
    )
}

fn mount_overlay(dir: &Path, layers: &[PathBuf], root: &Path) -> Result<(), String> {
    if layers.is_empty() {
        return Err("the image has no layers".into());
    }
    let (upper, work) = (dir.join(state::UPPER), dir.join(state::WORK));
    for d in [&upper, &work, &root.to_path_buf()] {
        fs::create_dir_all(d).map_err(|e| err(format!("creating {}", d.display()), e))?;
    }
    let mut lower = Vec::with_capacity(layers.len());
    for layer in layers.iter().rev() {
        let s = layer
            .to_str()
            .filter(|s| !s.contains([':', ',']))
            .ok_or_else(|| {
                format!(
                    "layer dir {} has a ':' or ',' overlayfs cannot take",
                    layer.display()
                )
            })?;
        if !layer.is_dir() {
            return Err(format!("layer dir {} does not exist", layer.display()));
        }
        lower.push(s);
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(format!(
            "the overlayfs options for {} layers are {} bytes, more than mount(2) takes ({MAX_MOUNT_DATA})",
            layers.len(),
            data.len()
        ));
    }
    mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| err("mounting the overlay rootfs", e))
}

/// Read-only and masked parts of `/proc` (after `pivot_root`). The
/// workload has no `CAP_SYS_ADMIN` to undo them.
fn protect_proc() -> Result<(), String> {
    for path in PROC_READ_ONLY {
        if !Path::new(path).exists() {
            continue;
        }
        mount(
            Some(*path),
            *path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err(format!("binding {path}"), e))?;
        mount(
            None::<&str>,
            *path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err(format!("making {path} read-only"), e))?;
    }
    for path in PROC_MASKED {
        let Ok(meta) = fs::metadata(path) else {
            continue;
        };
        let res = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                *path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some(""),
            )
        } else {
            mount(
                Some("/dev/null"),
                *path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        res.map_err(|e| err(format!("masking {path}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_files_never_follow_the_images_links() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, elsewhere) = (tmp.path().join("root"), tmp.path().join("host-etc"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();

        // An image whose /etc points out of the rootfs: nothing is written there.
        symlink(&elsewhere, root.join("etc")).unwrap();
        write_identity(&root, "i_1").unwrap();
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

        // A plain /etc: hostname is the instance's; a linked hosts is left alone.
        fs::remove_file(root.join("etc")).unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/hostname"), "from-the-image\n").unwrap();
        symlink(elsewhere.join("hosts"), root.join("etc/hosts")).unwrap();
        write_identity(&root, "i_1").unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "i_1\n"
        );
        assert!(!elsewhere.join("hosts").exists());

        // No /etc at all: both are made.
        let bare = tmp.path().join("bare");
        fs::create_dir_all(&bare).unwrap();
        write_identity(&bare, "i_2").unwrap();
        assert!(
            fs::read_to_string(bare.join("etc/hosts"))
                .unwrap()
                .contains("i_2")
        );
    }
}
