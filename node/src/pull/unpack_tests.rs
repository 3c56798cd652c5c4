//! Unpacking hand-made tars: metadata kept, whiteouts converted, escapes
//! refused. As root (chown, mknod and `trusted.*` xattrs need it).

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::unpack::{Compression, UnpackError, unpack};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root: unpacking sets owners, creates devices and trusted.* xattrs; run them as root"
    );
}

/// A tar built entry by entry, names written raw (so `..` can be tested).
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn add(
        &mut self,
        name: &str,
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&str>,
    ) -> &mut Tar {
        let mut h = Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(2000);
        h.set_mtime(1_000_000);
        h.set_size(data.len() as u64);
        if matches!(kind, EntryType::Char | EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
        self.add(name, EntryType::Regular, 0o644, data, None)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(tar)))
}

/// Unpacks `tar` (compressed as asked) into `dir/layer`.
fn run(dir: &Path, tar: &[u8], compression: Compression) -> Result<u64, UnpackError> {
    let blob = match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    };
    unpack(&blob[..], compression, &dir.join("layer"), &diff_id(tar))
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = [0u8; 64];
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

#[test]
fn keeps_files_modes_owners_links_and_devices() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::new();
    t.add("./", EntryType::Directory, 0o755, b"", None)
        .add("bin/", EntryType::Directory, 0o750, b"", None)
        .add("bin/tool", EntryType::Regular, 0o4755, b"#!tool", None)
        .add("bin/alias", EntryType::Link, 0o755, b"", Some("bin/tool"))
        .add(
            "bin/abs",
            EntryType::Symlink,
            0o777,
            b"",
            Some("/etc/passwd"),
        )
        .add("dev/null", EntryType::Char, 0o666, b"", None)
        .add("run/fifo", EntryType::Fifo, 0o600, b"", None)
        .file("/etc/motd", b"hello");
    let layer = dir.path().join("layer");
    let bytes = run(dir.path(), &t.bytes(), Compression::Gzip).unwrap();
    assert_eq!(bytes, 11);

    let tool = fs::metadata(layer.join("bin/tool")).unwrap();
    assert_eq!(
        tool.permissions().mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!((tool.uid(), tool.gid()), (1000, 2000));
    assert_eq!(tool.mtime(), 1_000_000);
    assert_eq!(fs::read(layer.join("bin/alias")).unwrap(), b"#!tool");
    assert_eq!(
        fs::metadata(layer.join("bin/alias")).unwrap().ino(),
        tool.ino(),
        "a hardlink"
    );
    let bin = fs::metadata(layer.join("bin")).unwrap();
    assert_eq!(
        (bin.permissions().mode() & 0o7777, bin.mtime()),
        (0o750, 1_000_000)
    );
    let abs = fs::symlink_metadata(layer.join("bin/abs")).unwrap();
    assert!(abs.file_type().is_symlink());
    assert_eq!(
        fs::read_link(layer.join("bin/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!((abs.uid(), abs.gid()), (1000, 2000));
    let null = fs::metadata(layer.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert!(
        fs::metadata(layer.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(fs::read(layer.join("etc/motd")).unwrap(), b"hello");
    assert_eq!(
        fs::metadata(layer.join("etc"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::new();
    t.file("etc/.wh.gone", b"")
        .add("opq/", EntryType::Directory, 0o755, b"", None)
        .file("opq/.wh..wh..opq", b"")
        .file("opq/new", b"n")
        .file("deep/er/.wh..wh..opq", b"")
        .file(".wh..wh.plnk", b"");
    run(dir.path(), &t.bytes(), Compression::Zstd).unwrap();
    let layer = dir.path().join("layer");
    let gone = fs::symlink_metadata(layer.join("etc/gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert!(!layer.join("etc/.wh.gone").exists());
    assert_eq!(
        xattr(&layer.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr(&layer.join("deep/er"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!layer.join("opq/.wh..wh..opq").exists());
    assert_eq!(fs::read(layer.join("opq/new")).unwrap(), b"n");
    assert!(!layer.join(".wh..wh.plnk").exists() && !layer.join(".wh.plnk").exists());
}

#[test]
fn pax_xattrs_are_kept_but_never_trusted_ones() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::new();
    t.0.append_pax_extensions([
        ("SCHILY.xattr.user.verge", &b"v"[..]),
        ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
    ])
    .unwrap();
    t.add("d/", EntryType::Directory, 0o755, b"", None);
    run(dir.path(), &t.bytes(), Compression::None).unwrap();
    let d = dir.path().join("layer/d");
    assert_eq!(xattr(&d, "user.verge").as_deref(), Some(&b"v"[..]));
    assert_eq!(xattr(&d, "trusted.overlay.opaque"), None);
}

#[test]
fn later_entries_replace_earlier_ones() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::new();
    t.file("a", b"first")
        .file("a", b"second")
        .file("b/c", b"in a dir")
        .file("b", b"now a file");
    run(dir.path(), &t.bytes(), Compression::None).unwrap();
    let layer = dir.path().join("layer");
    assert_eq!(fs::read(layer.join("a")).unwrap(), b"second");
    assert_eq!(fs::read(layer.join("b")).unwrap(), b"now a file");
}

#[test]
fn refuses_paths_leaving_the_layer() {
    require_root();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().display().to_string();
    let cases: Vec<(&str, Tar)> = vec![
        ("dot-dot", {
            let mut t = Tar::new();
            t.file("../escaped", b"x");
            t
        }),
        ("dot-dot inside", {
            let mut t = Tar::new();
            t.file("a/../../escaped", b"x");
            t
        }),
        ("through an absolute symlink", {
            let mut t = Tar::new();
            t.add("evil", EntryType::Symlink, 0o777, b"", Some(&target))
                .file("evil/escaped", b"x");
            t
        }),
        ("through a relative symlink", {
            let mut t = Tar::new();
            t.add("up", EntryType::Symlink, 0o777, b"", Some(".."))
                .file("up/escaped", b"x");
            t
        }),
        ("hardlink out", {
            let mut t = Tar::new();
            t.add(
                "pw",
                EntryType::Link,
                0o644,
                b"",
                Some("../../../../etc/passwd"),
            );
            t
        }),
        ("hardlink to a host path", {
            let mut t = Tar::new();
            t.add("pw", EntryType::Link, 0o644, b"", Some("/etc/passwd"));
            t
        }),
        ("hardlink through a symlink", {
            let mut t = Tar::new();
            t.add("etc", EntryType::Symlink, 0o777, b"", Some("/etc"))
                .add("pw", EntryType::Link, 0o644, b"", Some("etc/passwd"));
            t
        }),
        ("whiteout through a symlink", {
            let mut t = Tar::new();
            t.add("evil", EntryType::Symlink, 0o777, b"", Some(&target))
                .file("evil/.wh.victim", b"");
            t
        }),
    ];
    fs::write(outside.path().join("victim"), b"safe").unwrap();
    for (case, tar) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = run(dir.path(), &tar.bytes(), Compression::None).expect_err(case);
        assert!(matches!(err, UnpackError::Unsafe { .. }), "{case}: {err}");
        assert!(!outside.path().join("escaped").exists(), "{case}");
        assert!(!dir.path().join("escaped").exists(), "{case}");
    }
    assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"safe");
}

#[test]
fn wrong_diff_id_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tar::new();
    t.file("a", b"x");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = unpack(
        &t.bytes()[..],
        Compression::None,
        &dir.path().join("layer"),
        &wrong,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::DiffId { .. }), "{err}");
}

#[test]
fn media_types() {
    use Compression::*;
    for (mt, want) in [
        ("application/vnd.oci.image.layer.v1.tar", Some(None)),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Some(Gzip),
        ),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
        ("application/vnd.oci.image.config.v1+json", Option::None),
    ] {
        assert_eq!(Compression::for_media_type(mt), want, "{mt}");
    }
}
