//! Checking that an executable is static: an ELF file without a `PT_INTERP`
//! program header (static-pie included), so it needs no dynamic loader.

use std::path::Path;

use crate::{Error, Result};

/// Program header type naming the dynamic loader.
const PT_INTERP: u32 = 3;

/// Fails with [`Error::NotStatic`] unless `path` is an ELF executable that
/// needs no dynamic loader.
pub fn ensure_static(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    match interpreter(&bytes) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => Err(Error::NotStatic {
            path: path.into(),
            reason: format!("it asks for the dynamic loader {interp}"),
        }),
        Err(reason) => Err(Error::NotStatic {
            path: path.into(),
            reason: reason.into(),
        }),
    }
}

/// The `PT_INTERP` path of an ELF file, if it has one.
fn interpreter(elf: &[u8]) -> Result<Option<String>, &'static str> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("it is not an ELF file");
    }
    let wide = match elf.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("unknown ELF class"),
    };
    let little = match elf.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err("unknown ELF byte order"),
    };
    let r = Reader { elf, little };
    let truncated = "truncated ELF header";
    // e_phoff, e_phentsize, e_phnum; offsets differ between ELF32 and ELF64.
    let (phoff, phentsize, phnum) = if wide {
        (r.u64(0x20), r.u16(0x36), r.u16(0x38))
    } else {
        (r.u32(0x1c).map(u64::from), r.u16(0x2a), r.u16(0x2c))
    };
    let (phoff, phentsize, phnum) = (
        phoff.ok_or(truncated)? as usize,
        phentsize.ok_or(truncated)? as usize,
        phnum.ok_or(truncated)? as usize,
    );
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if r.u32(ph).ok_or("truncated program header")? != PT_INTERP {
            continue;
        }
        // p_offset, p_filesz
        let (offset, size) = if wide {
            (r.u64(ph + 8), r.u64(ph + 32))
        } else {
            (r.u32(ph + 4).map(u64::from), r.u32(ph + 16).map(u64::from))
        };
        let (offset, size) = (
            offset.ok_or(truncated)? as usize,
            size.ok_or(truncated)? as usize,
        );
        let raw = elf
            .get(offset..offset.saturating_add(size))
            .ok_or("PT_INTERP points outside the file")?;
        let name = String::from_utf8_lossy(raw)
            .trim_end_matches('\0')
            .to_string();
        return Ok(Some(name));
    }
    Ok(None)
}

/// Reads fixed-size integers in the file's byte order; `None` past the end.
struct Reader<'a> {
    elf: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.elf.get(at..at.checked_add(N)?)?.try_into().ok()
    }
    fn u16(&self, at: usize) -> Option<u16> {
        let b = self.bytes(at)?;
        Some(if self.little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let b = self.bytes(at)?;
        Some(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let b = self.bytes(at)?;
        Some(if self.little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        // Test binaries are built without crt-static, so they have a loader.
        let me = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&me).unwrap();
        let interp = interpreter(&bytes).unwrap();
        assert!(interp.is_some_and(|i| i.contains("ld-")), "{me:?}");
        assert!(matches!(ensure_static(&me), Err(Error::NotStatic { .. })));
    }

    #[test]
    fn rejects_non_elf_and_truncated_files() {
        assert!(interpreter(b"#!/bin/sh\n").is_err());
        assert!(interpreter(b"\x7fELF\x02\x01\x01").is_err());
    }
}
