//! Reading a kernel's format and version from the image itself.

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

/// Detects the format; `None` for anything else.
pub fn detect(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"\x7fELF") {
        return Some(Format::Elf);
    }
    if bytes.len() > 0x206 && &bytes[0x202..0x206] == b"HdrS" {
        return Some(Format::BzImage);
    }
    None
}

/// The kernel release (`6.1.0-56-cloud-amd64`), read from the setup header of a bzImage or the
/// `Linux version ...` banner of an ELF vmlinux.
pub fn version(bytes: &[u8], format: Format) -> Option<String> {
    match format {
        Format::BzImage => {
            let ptr = u16::from_le_bytes([*bytes.get(0x20e)?, *bytes.get(0x20f)?]) as usize;
            let start = 0x200 + ptr;
            let tail = bytes.get(start..)?;
            let s = &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len()).min(256)];
            String::from_utf8_lossy(s).split_whitespace().next().map(str::to_owned)
        }
        Format::Elf => {
            let needle = b"Linux version ";
            let at = bytes.windows(needle.len()).position(|w| w == needle)?;
            let rest = &bytes[at + needle.len()..];
            let end = rest.iter().position(|&b| b == b' ' || b == 0).unwrap_or(rest.len()).min(128);
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_banner() {
        let mut b = b"\x7fELF........".to_vec();
        b.extend_from_slice(b"\0Linux version 6.1.0-test (gcc) #1 SMP\0");
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
