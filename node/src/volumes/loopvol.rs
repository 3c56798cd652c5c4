//! A loop volume's life on the host: its `disk.img` made, attached and
//! mounted, grown, unmounted and detached. Blocking; called with the
//! volume's operation lock held.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::errno::Errno;

use super::loopdev::{self, LoopDevice};
use super::{Inner, VolumeError, mounts};

/// Creates `disk` (which must not exist) as a sparse file of `size` bytes,
/// open for writing.
pub(super) fn sparse_file(subject: &str, disk: &Path, size: u64) -> Result<File, VolumeError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(disk)
        .map_err(VolumeError::io(subject, "creating", disk))?;
    file.set_len(size)
        .map_err(VolumeError::io(subject, "sizing", disk))?;
    Ok(file)
}

impl Inner {
    /// Makes `dir/disk.img`: a sparse file of `size` bytes holding an
    /// empty ext4 filesystem.
    pub(super) fn make_disk(&self, volume: &str, dir: &Path, size: u64) -> Result<(), VolumeError> {
        let subject = format!("volume {volume}");
        let ext4 = self.ext4(volume)?;
        let disk = dir.join("disk.img");
        drop(sparse_file(&subject, &disk, size)?);
        ext4.mkfs(&subject, &disk)
    }

    /// Makes sure `volume` is attached and mounted (each step only when
    /// not done already), and thaws it if a daemon killed mid-snapshot
    /// left it frozen.
    pub(super) fn bring_up(&self, volume: &str) -> Result<(), VolumeError> {
        let subject = format!("volume {volume}");
        self.ext4(volume)?;
        let (disk, mnt) = (self.layout.disk(volume), self.layout.mnt(volume));
        std::fs::create_dir_all(&mnt).map_err(VolumeError::io(&subject, "creating", &mnt))?;
        match mounts::find(&mnt).map_err(VolumeError::io(
            &subject,
            "reading the mounts for",
            &mnt,
        ))? {
            Some(m) if m.fstype == "ext4" => {
                if mounts::thaw(&mnt).map_err(VolumeError::io(&subject, "thawing", &mnt))? {
                    tracing::warn!("volume was left frozen (a snapshot interrupted): thawed");
                }
                return Ok(());
            }
            Some(m) => {
                return Err(VolumeError::Unavailable {
                    volume: volume.to_string(),
                    reason: format!(
                        "{} is mounted at {} instead of its filesystem: unmount it",
                        m.source,
                        mnt.display()
                    ),
                });
            }
            None => {}
        }
        let found = loopdev::find(&disk).map_err(VolumeError::io(
            &subject,
            "looking for the loop device of",
            &disk,
        ))?;
        let device = match found {
            Some(path) => {
                tracing::info!(device = %path.display(), "reusing the loop device still attached");
                LoopDevice::open(&path).map_err(VolumeError::io(&subject, "opening", &path))?
            }
            None => loopdev::attach(&disk).map_err(VolumeError::io(
                &subject,
                "attaching a loop device to",
                &disk,
            ))?,
        };
        // The device stays attached while mounted (autoclear: detached if
        // the mount fails and `device` closes).
        mounts::mount_ext4(&device.path, &mnt).map_err(VolumeError::sys(
            &subject,
            format!(
                "mounting {} (ext4) at {}",
                device.path.display(),
                mnt.display()
            ),
        ))?;
        tracing::info!(device = %device.path.display(), "volume mounted");
        Ok(())
    }

    /// Unmounts `volume` and detaches its loop device (each when needed).
    pub(super) fn bring_down(&self, volume: &str) -> Result<(), VolumeError> {
        let subject = format!("volume {volume}");
        let (disk, mnt) = (self.layout.disk(volume), self.layout.mnt(volume));
        // Stacked mounts (someone mounted over it): all of them.
        for _ in 0..8 {
            let mounted = mounts::find(&mnt).map_err(VolumeError::io(
                &subject,
                "reading the mounts for",
                &mnt,
            ))?;
            if mounted.is_none() {
                break;
            }
            let _ = mounts::thaw(&mnt);
            mounts::unmount(&mnt).map_err(|e| match e {
                Errno::EBUSY => VolumeError::Unavailable {
                    volume: volume.to_string(),
                    reason: format!(
                        "{} is still in use on the host (a process has files open in it, or it is bind-mounted somewhere): \
                         stop what uses it and try again",
                        mnt.display()
                    ),
                },
                e => VolumeError::sys(&subject, format!("unmounting {}", mnt.display()))(e),
            })?;
        }
        if disk.exists()
            && let Some(device) = loopdev::find(&disk).map_err(VolumeError::io(
                &subject,
                "looking for the loop device of",
                &disk,
            ))?
        {
            loopdev::detach(&device).map_err(VolumeError::io(&subject, "detaching", &device))?;
        }
        tracing::info!("volume unmounted");
        Ok(())
    }

    /// Whether `volume`'s filesystem is mounted at its `mnt`, as
    /// `/proc/self/mountinfo` says (unreadable: not).
    pub(super) fn mounted(&self, volume: &str) -> bool {
        matches!(
            mounts::find(&self.layout.mnt(volume)),
            Ok(Some(m)) if m.fstype == "ext4"
        )
    }

    /// Grows `volume` to `size` bytes: the file, the loop device, then the
    /// filesystem, online; or, where this daemon cannot grow a mounted
    /// filesystem ([`Inner::online_grow`]), unmounted (the caller made sure
    /// no instance claims it). Done again when already that size
    /// (finishing an interrupted grow).
    pub(super) fn grow_disk(&self, volume: &str, size: u64) -> Result<(), VolumeError> {
        let subject = format!("volume {volume}");
        let ext4 = self.ext4(volume)?;
        let disk = self.layout.disk(volume);
        if !self.online_grow {
            self.bring_down(volume)?;
            let grown = set_len_at_least(&subject, &disk, size)
                .and_then(|()| ext4.check(&subject, &disk))
                .and_then(|()| ext4.grow(&subject, &disk));
            // Mounted again also when growing failed: as it was.
            let up = self.bring_up(volume);
            return grown.and(up);
        }
        set_len_at_least(&subject, &disk, size)?;
        self.bring_up(volume)?;
        let device = loopdev::find(&disk)
            .map_err(VolumeError::io(
                &subject,
                "looking for the loop device of",
                &disk,
            ))?
            .ok_or_else(|| VolumeError::Unavailable {
                volume: volume.to_string(),
                reason: "mounted, but no loop device backs its disk.img".into(),
            })?;
        LoopDevice::open(&device)
            .and_then(|d| d.set_capacity())
            .map_err(VolumeError::io(&subject, "updating the size of", &device))?;
        ext4.grow(&subject, &device)
    }
}

/// Makes the file at `path` at least `size` bytes long (the new part a hole).
fn set_len_at_least(subject: &str, path: &Path, size: u64) -> Result<(), VolumeError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(VolumeError::io(subject, "opening", path))?;
    let len = file
        .metadata()
        .map_err(VolumeError::io(subject, "reading", path))?
        .len();
    if len < size {
        file.set_len(size)
            .map_err(VolumeError::io(subject, "growing", path))?;
    }
    Ok(())
}
