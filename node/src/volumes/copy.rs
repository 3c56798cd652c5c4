//! Copying sparse disk images without filling their holes: a reflink
//! (`FICLONE`) where the filesystem shares extents (XFS, btrfs), else the
//! data regions only (`SEEK_DATA`/`SEEK_HOLE`) with `copy_file_range`.
//! Also the data regions read and written by export and import. Blocking.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use nix::errno::Errno;

/// Bytes copied by one read/write when `copy_file_range` is unavailable.
const BUF: usize = 1 << 20;

/// Copies `src` to a new file `dst` (which must not exist), keeping holes,
/// and syncs it.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source fd, open for the call.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE as _, from.as_raw_fd()) };
    match Errno::result(r) {
        Ok(_) => return to.sync_all(),
        // Not a reflinking filesystem (ext4), or across filesystems.
        Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY | Errno::EPERM) => {}
        Err(e) => return Err(e.into()),
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    for region in DataRegions::new(&from, len) {
        let (offset, n) = region?;
        copy_range(&from, &to, offset, n)?;
    }
    to.sync_all()
}

/// Copies `len` bytes at `offset` from one file to the same offset of the
/// other: in the kernel when it can, else through a buffer.
fn copy_range(from: &File, to: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (offset as libc::off64_t, offset as libc::off64_t);
    let end = offset + len;
    while (off_in as u64) < end {
        let want = (end - off_in as u64).min(1 << 30) as usize;
        // SAFETY: both fds are open; the offsets are valid pointers to
        // locals, which the kernel advances by the bytes copied.
        let r = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match Errno::result(r) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                return copy_buffered(from, to, off_in as u64, end);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_buffered(from: &File, to: &File, mut offset: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    while offset < end {
        let n = ((end - offset) as usize).min(BUF);
        from.read_exact_at(&mut buf[..n], offset)?;
        if !is_zero(&buf[..n]) {
            to.write_all_at(&buf[..n], offset)?;
        }
        offset += n as u64;
    }
    Ok(())
}

/// Whether a chunk is all zeros (worth leaving as a hole).
pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|b| *b == 0)
}

/// The data regions `(offset, length)` of a file of `len` bytes, in order.
/// Filesystems without `SEEK_DATA` report the whole file as data.
pub struct DataRegions<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> DataRegions<'a> {
    pub fn new(file: &'a File, len: u64) -> DataRegions<'a> {
        DataRegions { file, pos: 0, len }
    }

    fn seek(&self, whence: libc::c_int) -> Result<u64, Errno> {
        // SAFETY: lseek on an open fd; it moves only the file's offset,
        // which nothing else here uses (reads are positional).
        let r = unsafe { libc::lseek64(self.file.as_raw_fd(), self.pos as libc::off64_t, whence) };
        Errno::result(r).map(|o| o as u64)
    }
}

impl Iterator for DataRegions<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.len {
            return None;
        }
        let start = match self.seek(libc::SEEK_DATA) {
            Ok(s) if s < self.len => s,
            // No data past pos.
            Ok(_) | Err(Errno::ENXIO) => {
                self.pos = self.len;
                return None;
            }
            Err(e) => return Some(Err(e.into())),
        };
        self.pos = start;
        let end = match self.seek(libc::SEEK_HOLE) {
            Ok(e) => e.min(self.len),
            Err(e) => return Some(Err(e.into())),
        };
        self.pos = end;
        Some(Ok((start, end - start)))
    }
}

/// Bytes of disk a file takes (its blocks, not its length).
pub fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    meta.blocks() * 512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&vec![7u8; 300_000], 40 << 20).unwrap();
        f.sync_all().unwrap();
        let regions: Vec<_> = DataRegions::new(&f, 64 << 20).map(Result::unwrap).collect();
        assert!(regions.len() >= 2, "{regions:?}");
        assert!(
            regions.iter().map(|r| r.1).sum::<u64>() < 8 << 20,
            "{regions:?}"
        );

        copy_sparse(&src, &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(a == b, "copy differs");
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            allocated(&meta) < 8 << 20,
            "holes filled: {}",
            allocated(&meta)
        );
        assert!(
            copy_sparse(&src, &dst).is_err(),
            "overwrote an existing file"
        );
    }
}
