//! Reading a kernel's format and version from the image itself.

use std::path::{Path, PathBuf};

/// What kind of kernel image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// x86 boot protocol image (`vmlinuz`).
    BzImage,
    /// Uncompressed ELF `vmlinux`.
    Elf,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BzImage => "bzimage",
            Self::Elf => "elf",
        }
    }
}

/// Why a kernel file could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot read the kernel {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    Format(PathBuf),
    #[error("cannot find the kernel version in {0}: is it a complete kernel image?")]
    Version(PathBuf),
}

/// Detects the format; `None` for anything else.
pub fn detect(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"\x7fELF") {
        return Some(Format::Elf);
    }
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        return Some(Format::BzImage);
    }
    None
}

/// A kernel release looks like `6.1.0-56-cloud-amd64`: printable, starting with a digit.
fn release(raw: &[u8]) -> Option<String> {
    let end =
        raw.iter().position(|&b| b == b' ' || b == 0 || b == b'\n').unwrap_or(raw.len()).min(128);
    let s = std::str::from_utf8(&raw[..end]).ok()?;
    (s.starts_with(|c: char| c.is_ascii_digit()) && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

/// The kernel release (`6.1.0-56-cloud-amd64`), read from the setup header of a bzImage (the
/// `kernel_version` pointer at 0x20E, relative to 0x200) or from the `Linux version ...` banner
/// in an ELF vmlinux's .rodata.
pub fn version(bytes: &[u8], format: Format) -> Option<String> {
    match format {
        Format::BzImage => {
            let ptr = u16::from_le_bytes([*bytes.get(0x20e)?, *bytes.get(0x20f)?]) as usize;
            if ptr == 0 {
                return None;
            }
            release(bytes.get(0x200 + ptr..)?)
        }
        Format::Elf => {
            let needle = b"Linux version ";
            let mut from = 0;
            while let Some(at) = bytes.get(from..)?.windows(needle.len()).position(|w| w == needle)
            {
                let start = from + at + needle.len();
                if let Some(v) = release(&bytes[start..]) {
                    return Some(v);
                }
                from = start;
            }
            None
        }
    }
}

/// Reads a kernel file and returns its format and release.
pub fn read(path: &Path) -> Result<(Format, String), VersionError> {
    let bytes =
        std::fs::read(path).map_err(|source| VersionError::Io { path: path.to_owned(), source })?;
    let format = detect(&bytes).ok_or_else(|| VersionError::Format(path.to_owned()))?;
    let ver = version(&bytes, format).ok_or_else(|| VersionError::Version(path.to_owned()))?;
    Ok((format, ver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_banner() {
        let mut b = b"\x7fELF........".to_vec();
        b.extend_from_slice(b"\0Linux version %s\0Linux version 6.1.0-test (gcc) #1 SMP\0");
        assert_eq!(detect(&b), Some(Format::Elf));
        assert_eq!(version(&b, Format::Elf).as_deref(), Some("6.1.0-test"));
    }

    #[test]
    fn bzimage_header() {
        let mut b = vec![0u8; 0x1000];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        b[0x500..0x50f].copy_from_slice(b"6.1.0-x (root@h");
        assert_eq!(detect(&b), Some(Format::BzImage));
        assert_eq!(version(&b, Format::BzImage).as_deref(), Some("6.1.0-x"));
        assert_eq!(detect(b"hello"), None);
    }

    #[test]
    fn the_debian_kernel_when_present() {
        let p = std::path::Path::new("/tmp/kpkg/root/boot/vmlinuz-6.1.0-56-cloud-amd64");
        let Ok(b) = std::fs::read(p) else {
            eprintln!("skipping: {} not present", p.display());
            return;
        };
        assert_eq!(detect(&b), Some(Format::BzImage));
        assert_eq!(version(&b, Format::BzImage).as_deref(), Some("6.1.0-56-cloud-amd64"));
    }
}
