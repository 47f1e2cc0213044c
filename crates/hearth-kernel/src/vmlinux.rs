//! The ELF `vmlinux` inside a bzImage, for VMMs that boot only ELF kernels (Firecracker, and
//! Cloud Hypervisor without a firmware).
//!
//! A bzImage's setup header says where its compressed payload is (`payload_offset` and
//! `payload_length`, boot protocol 2.08+); the payload's first bytes say how it is compressed.
//! Distros use gzip, zstd or (Debian) the legacy LZ4 frame; the output is bounded, so a hostile
//! image cannot make hearth decompress without end.

use std::io::Read;

/// The largest kernel hearth unpacks (Debian's cloud vmlinux is about 40 MiB).
pub const MAX_VMLINUX: usize = 512 << 20;

/// Why no vmlinux could be taken out of a bzImage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmlinuxError {
    #[error("not a bzImage with a payload (boot protocol 2.08 or later is needed)")]
    NoPayload,
    #[error("the kernel's payload is compressed with {0}, which hearth does not unpack; use an ELF vmlinux or a gzip, zstd or lz4 kernel")]
    Compression(&'static str),
    #[error("the kernel's payload does not decompress: {0}")]
    Corrupt(String),
    #[error("the kernel's payload decompresses to more than {} MiB", .0 >> 20)]
    TooLarge(usize),
    #[error("the kernel's payload is not an ELF image")]
    NotElf,
}

/// The ELF vmlinux of bzImage `bytes`.
pub fn from_bzimage(bytes: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    within(bytes, MAX_VMLINUX)
}

/// As [`from_bzimage`], decompressing at most `max` bytes.
fn within(bytes: &[u8], max: usize) -> Result<Vec<u8>, VmlinuxError> {
    let payload = payload(bytes)?;
    let out = match payload {
        [0x1f, 0x8b, ..] => read_bounded(flate2::read::GzDecoder::new(payload), max)?,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            let d = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| VmlinuxError::Corrupt(e.to_string()))?;
            read_bounded(d, max)?
        }
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(&payload[4..], max)?,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => return Err(VmlinuxError::Compression("xz")),
        [b'B', b'Z', b'h', ..] => return Err(VmlinuxError::Compression("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(VmlinuxError::Compression("lzo")),
        [0x5d, 0, 0, ..] => return Err(VmlinuxError::Compression("lzma")),
        _ => return Err(VmlinuxError::Compression("an unknown method")),
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf);
    }
    Ok(out)
}

/// The compressed payload, from the setup header.
fn payload(bytes: &[u8]) -> Result<&[u8], VmlinuxError> {
    if bytes.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuxError::NoPayload);
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let version = u16_at(0x206).ok_or(VmlinuxError::NoPayload)?;
    if version < 0x0208 {
        return Err(VmlinuxError::NoPayload);
    }
    // The protected-mode code starts after the setup sectors (0 means the historical 4).
    let setup_sects = match bytes.get(0x1f1).copied().ok_or(VmlinuxError::NoPayload)? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(0x248).ok_or(VmlinuxError::NoPayload)?;
    let length = u32_at(0x24c).ok_or(VmlinuxError::NoPayload)?;
    let start = (setup_sects + 1) * 512 + offset;
    bytes
        .get(start..start.checked_add(length).ok_or(VmlinuxError::NoPayload)?)
        .ok_or(VmlinuxError::NoPayload)
}

fn read_bounded(r: impl Read, max: usize) -> Result<Vec<u8>, VmlinuxError> {
    let mut out = Vec::new();
    r.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| VmlinuxError::Corrupt(e.to_string()))?;
    if out.len() > max {
        return Err(VmlinuxError::TooLarge(max));
    }
    Ok(out)
}

/// The legacy LZ4 frame (`lz4 -l`, what the kernel's build uses): after the magic, blocks of a
/// little-endian u32 compressed size and the block, each decompressing to at most 8 MiB. It has
/// no end marker: the kernel appends the uncompressed size, which reads as a block size no
/// block can have.
fn lz4_legacy(mut rest: &[u8], max: usize) -> Result<Vec<u8>, VmlinuxError> {
    const BLOCK: usize = 8 << 20;
    const MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    let mut out = Vec::new();
    let mut block = vec![0u8; BLOCK];
    while rest.len() >= 4 {
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest[..4] == MAGIC {
            // Concatenated frames.
            rest = &rest[4..];
            continue;
        }
        let Some(data) = rest.get(4..4 + size) else {
            // The trailing size field, or padding.
            break;
        };
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| VmlinuxError::Corrupt(e.to_string()))?;
        if out.len() + n > max {
            return Err(VmlinuxError::TooLarge(max));
        }
        out.extend_from_slice(&block[..n]);
        rest = &rest[4 + size..];
    }
    if out.is_empty() {
        return Err(VmlinuxError::Corrupt("no LZ4 block".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage (protocol 2.15, one setup sector) around `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * 512];
        b[0x1f1] = 1;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(payload);
        b.extend_from_slice(b"trailing");
        b
    }

    fn elf() -> Vec<u8> {
        let mut e = b"\x7fELF\x02\x01\x01".to_vec();
        e.extend(std::iter::repeat_n(0xabu8, 100_000));
        e
    }

    #[test]
    fn gzip_zstd_and_legacy_lz4_payloads_come_out_as_the_elf() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf()).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(from_bzimage(&bzimage(&gz)), Ok(elf()));

        let zs = zstd::encode_all(&elf()[..], 1).expect("zstd");
        assert_eq!(from_bzimage(&bzimage(&zs)), Ok(elf()));

        let block = lz4_flex::block::compress(&elf());
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz.extend_from_slice(&block);
        lz.extend_from_slice(&(elf().len() as u32).to_le_bytes());
        assert_eq!(from_bzimage(&bzimage(&lz)), Ok(elf()));
    }

    #[test]
    fn a_payload_that_decompresses_past_the_bound_is_refused_in_every_format() {
        use std::io::Write;
        let bomb = vec![0u8; 3 << 20];
        let max = 1 << 20;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&bomb).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(within(&bzimage(&gz), max), Err(VmlinuxError::TooLarge(max)));
        let zs = zstd::encode_all(&bomb[..], 19).expect("zstd");
        assert_eq!(within(&bzimage(&zs), max), Err(VmlinuxError::TooLarge(max)));
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in bomb.chunks(1 << 20) {
            let block = lz4_flex::block::compress(chunk);
            lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
            lz.extend_from_slice(&block);
        }
        assert_eq!(within(&bzimage(&lz), max), Err(VmlinuxError::TooLarge(max)));
        // A block claiming more than a legacy block can hold is corrupt, not a reason to grow.
        let huge = lz4_flex::block::compress(&vec![0u8; 9 << 20]);
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        lz.extend_from_slice(&(huge.len() as u32).to_le_bytes());
        lz.extend_from_slice(&huge);
        assert!(matches!(from_bzimage(&bzimage(&lz)), Err(VmlinuxError::Corrupt(_))));
    }

    #[test]
    fn what_cannot_be_unpacked_says_why() {
        assert_eq!(from_bzimage(b"not a kernel"), Err(VmlinuxError::NoPayload));
        let xz = bzimage(b"\xfd7zXZ\0rest");
        assert_eq!(from_bzimage(&xz), Err(VmlinuxError::Compression("xz")));
        let zs = zstd::encode_all(&b"no elf here"[..], 1).expect("zstd");
        assert_eq!(from_bzimage(&bzimage(&zs)), Err(VmlinuxError::NotElf));
        let mut short = bzimage(b"\x1f\x8b");
        short.truncate(short.len() - 12);
        assert_eq!(from_bzimage(&short), Err(VmlinuxError::NoPayload), "payload past the end");
    }

    #[test]
    fn the_test_kernel_unpacks_to_its_elf() {
        let Some(path) = std::env::var_os("HEARTH_TEST_KERNEL") else {
            eprintln!("skipped: HEARTH_TEST_KERNEL is not set (cargo xtask kernel fetches one)");
            return;
        };
        let bytes = std::fs::read(path).expect("kernel");
        let vmlinux = from_bzimage(&bytes).expect("vmlinux");
        assert!(vmlinux.len() > bytes.len(), "decompressed is larger");
        assert_eq!(crate::version::detect(&vmlinux), Some(crate::version::Format::Elf));
    }
}
