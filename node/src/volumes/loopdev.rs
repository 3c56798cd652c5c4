//! Loop devices: a volume's `disk.img` as a block device to mount.
//!
//! The ioctls are made here directly rather than through a crate: the
//! `loopdev` crates generate their bindings with bindgen, which needs
//! libclang at build time, for a handful of request numbers and two
//! structs that are stable kernel ABI (`include/uapi/linux/loop.h`).
//!
//! Devices are attached with `LO_FLAGS_AUTOCLEAR`: the kernel detaches one
//! when its last user goes, so unmounting a volume frees its device, and a
//! daemon killed between attaching and mounting leaks none. A mounted
//! volume keeps its device across daemon restarts; [`find`] finds it again
//! through `/sys/block/loop*/loop/backing_file`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use libc::c_ulong;
use nix::errno::Errno;

const LOOP_CONTROL: &str = "/dev/loop-control";
const SYS_BLOCK: &str = "/sys/block";

// Request numbers of include/uapi/linux/loop.h (plain numbers there, not
// _IO-encoded; libc does not define them).
const LOOP_SET_FD: c_ulong = 0x4C00;
const LOOP_CLR_FD: c_ulong = 0x4C01;
const LOOP_SET_STATUS64: c_ulong = 0x4C04;
const LOOP_GET_STATUS64: c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: c_ulong = 0x4C07;
/// Since Linux 5.8: `LOOP_SET_FD` and `LOOP_SET_STATUS64` in one call.
const LOOP_CONFIGURE: c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// The major number of loop block devices.
const LOOP_MAJOR: u64 = 7;
/// Attempts when another process takes the free device first.
const ATTACH_TRIES: usize = 8;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    /// Autoclear, with the backing file's name (truncated; for `losetup`).
    fn new(backing: &Path) -> LoopInfo64 {
        let mut lo_file_name = [0u8; LO_NAME_SIZE];
        let name = backing.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        lo_file_name[..n].copy_from_slice(&name[..n]);
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// An open loop device. While it is open, an autoclear device stays
/// attached; mount it before dropping this.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    file: File,
}

impl LoopDevice {
    /// Opens the loop device at `path` (attached or not).
    pub fn open(path: &Path) -> io::Result<LoopDevice> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(LoopDevice {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Makes the device take its backing file's current size (after the
    /// file grew).
    pub fn set_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is open.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_SET_CAPACITY as _, 0) };
        Errno::result(r).map(drop).map_err(io::Error::from)
    }

    /// Detaches the device (done already: fine). While the device is
    /// still open elsewhere (mounted), the kernel detaches it at its last
    /// close.
    pub fn detach(self) -> io::Result<()> {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is open.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        match Errno::result(r) {
            Ok(_) | Err(Errno::ENXIO) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The device and inode of the backing file; `None` when detached.
    fn backing_inode(&self) -> io::Result<Option<(u64, u64)>> {
        let mut info = LoopInfo64::new(Path::new(""));
        // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 (the layout
        // above, size checked) into `info`, which outlives the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                LOOP_GET_STATUS64 as _,
                &mut info as *mut LoopInfo64,
            )
        };
        match Errno::result(r) {
            Ok(_) => Ok(Some((info.lo_device, info.lo_inode))),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Attaches `backing` to a free loop device (autoclear).
pub fn attach(backing: &Path) -> io::Result<LoopDevice> {
    let file = OpenOptions::new().read(true).write(true).open(backing)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)?;
    let mut last = io::Error::from(Errno::EBUSY);
    for _ in 0..ATTACH_TRIES {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
        // number (adding a device when none is free).
        let r = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _, 0) };
        let n = Errno::result(r).map_err(io::Error::from)?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = match LoopDevice::open(&path) {
            Ok(d) => d,
            // A static /dev (some containers): make the node ourselves.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                make_node(&path, n as u64)?;
                LoopDevice::open(&path)?
            }
            // Being torn down by its last user as we opened it.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                last = e;
                continue;
            }
            Err(e) => return Err(e),
        };
        match configure(&device, &file, backing) {
            Ok(()) => return Ok(device),
            // Another process attached it between GET_FREE and here, or
            // its previous user is still detaching it.
            Err(e @ (Errno::EBUSY | Errno::ENXIO)) => {
                tracing::debug!(device = %path.display(), error = %e, "loop device taken meanwhile: another");
                last = e.into();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last)
}

fn configure(device: &LoopDevice, backing: &File, name: &Path) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64::new(name),
        reserved: [0; 8],
    };
    let fd = device.file.as_raw_fd();
    // SAFETY: LOOP_CONFIGURE reads one loop_config (the layout above, size
    // checked) from `config`, which outlives the call.
    let r = unsafe { libc::ioctl(fd, LOOP_CONFIGURE as _, &config as *const LoopConfig) };
    match Errno::result(r) {
        Ok(_) => return Ok(()),
        // Before Linux 5.8: the two older calls.
        Err(Errno::ENOTTY | Errno::EINVAL) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: LOOP_SET_FD takes the backing file's fd, open for the call.
    let r = unsafe { libc::ioctl(fd, LOOP_SET_FD as _, backing.as_raw_fd()) };
    Errno::result(r)?;
    // SAFETY: LOOP_SET_STATUS64 reads one loop_info64 from `config.info`,
    // which outlives the call.
    let r = unsafe {
        libc::ioctl(
            fd,
            LOOP_SET_STATUS64 as _,
            &config.info as *const LoopInfo64,
        )
    };
    if let Err(e) = Errno::result(r) {
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(fd, LOOP_CLR_FD as _, 0) };
        return Err(e);
    }
    Ok(())
}

fn make_node(path: &Path, n: u64) -> io::Result<()> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    match mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        makedev(LOOP_MAJOR, n),
    ) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The loop device `backing` is attached to, if any: its path in
/// `/sys/block/loop*/loop/backing_file`, confirmed by inode (the path
/// alone could name a file since replaced).
pub fn find(backing: &Path) -> io::Result<Option<PathBuf>> {
    let meta = std::fs::metadata(backing)?;
    let want = (meta.dev(), meta.ino());
    let entries = match std::fs::read_dir(SYS_BLOCK) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let file = Path::new(SYS_BLOCK).join(name).join("loop/backing_file");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // not attached
        };
        if Path::new(text.trim_end_matches('\n')) != backing {
            continue;
        }
        let path = Path::new("/dev").join(name);
        let Ok(device) = LoopDevice::open(&path) else {
            continue;
        };
        if device.backing_inode()? == Some(want) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Detaches the loop device at `path` (done already: fine).
pub fn detach(path: &Path) -> io::Result<()> {
    LoopDevice::open(path)?.detach()
}

/// Whether this host can attach loop devices: `/dev/loop-control` and a
/// test attach of a small file made in `dir`. `Err` says why not.
pub fn probe(dir: &Path) -> Result<(), String> {
    if !Path::new(LOOP_CONTROL).exists() {
        return Err(format!(
            "{LOOP_CONTROL} does not exist (no loop driver, or a container without it)"
        ));
    }
    let file = dir.join(format!(".loop-probe-{}", std::process::id()));
    let result = (|| {
        let f = File::create(&file)?;
        f.set_len(1 << 20)?;
        drop(f);
        attach(&file)?.detach()
    })();
    let _ = std::fs::remove_file(&file);
    result.map_err(|e| format!("a test attach of a loop device failed: {e}"))
}
