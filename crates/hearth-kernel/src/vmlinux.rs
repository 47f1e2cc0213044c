//! The ELF `vmlinux` inside a bzImage, for VMMs that boot only ELF kernels (Firecracker, and
//! Cloud Hypervisor without a firmware).
//!
//! A bzImage's setup header says where its compressed payload is (`payload_offset` and
//! `payload_length`, boot protocol 2.08+); the payload's first bytes say how it is compressed.
//! Every method the kernel's build offers is unpacked: gzip, zstd, the legacy LZ4 frame (Debian's),
//! xz (with the x86 branch filter the build adds), lzma and bzip2; LZO is named and refused. The
//! build appends the uncompressed size after the stream, so each decoder stops at its stream's
//! end. The output is bounded, so a hostile image cannot make hearth decompress without end.

use std::io::Read;

/// The largest kernel hearth unpacks (Debian's cloud vmlinux is about 40 MiB).
pub const MAX_VMLINUX: usize = 512 << 20;

/// Why no vmlinux could be taken out of a bzImage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmlinuxError {
    #[error("not a bzImage with a payload (boot protocol 2.08 or later is needed)")]
    NoPayload,
    #[error("the kernel's payload is compressed with {0}, which hearth does not unpack; use an ELF vmlinux or a kernel compressed with gzip, zstd, lz4, xz, lzma or bzip2")]
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

/// How a bzImage's payload is compressed: the methods the kernel's build offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Gzip,
    Zstd,
    Lz4,
    Xz,
    Lzma,
    Bzip2,
    Lzo,
}

impl Method {
    /// From the payload's first bytes.
    fn of(payload: &[u8]) -> Option<Self> {
        Some(match payload {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            [0x02, 0x21, 0x4c, 0x18, ..] => Self::Lz4,
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Self::Xz,
            [0x5d, 0, 0, ..] => Self::Lzma,
            [b'B', b'Z', b'h', ..] => Self::Bzip2,
            [0x89, b'L', b'Z', b'O', ..] => Self::Lzo,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
            Self::Xz => "xz",
            Self::Lzma => "lzma",
            Self::Bzip2 => "bzip2",
            Self::Lzo => "lzo",
        }
    }
}

/// How bzImage `bytes` has its payload compressed; `None` when it is no bzImage with a payload
/// or the method is unknown.
pub fn compression(bytes: &[u8]) -> Option<Method> {
    Method::of(payload(bytes).ok()?)
}

/// As [`from_bzimage`], decompressing at most `max` bytes.
fn within(bytes: &[u8], max: usize) -> Result<Vec<u8>, VmlinuxError> {
    use xz2::stream::Stream;
    let payload = payload(bytes)?;
    let corrupt = |e: std::io::Error| VmlinuxError::Corrupt(e.to_string());
    let out = match Method::of(payload) {
        Some(Method::Gzip) => read_bounded(flate2::read::GzDecoder::new(payload), max)?,
        Some(Method::Zstd) => {
            let d = zstd::stream::read::Decoder::new(payload).map_err(corrupt)?.single_frame();
            read_bounded(d, max)?
        }
        Some(Method::Lz4) => lz4_legacy(&payload[4..], max)?,
        Some(Method::Xz) => liblzma(Stream::new_stream_decoder(DECODER_MEMORY, 0), payload, max)?,
        Some(Method::Lzma) => liblzma(Stream::new_lzma_decoder(DECODER_MEMORY), payload, max)?,
        Some(Method::Bzip2) => read_bounded(bzip2::read::BzDecoder::new(payload), max)?,
        Some(m @ Method::Lzo) => return Err(VmlinuxError::Compression(m.as_str())),
        None => return Err(VmlinuxError::Compression("an unknown method")),
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

/// The most memory liblzma may use for a dictionary (the kernel's build uses 32 MiB at most).
const DECODER_MEMORY: u64 = 256 << 20;

/// An xz or lzma stream through liblzma, up to the stream's end (what follows is the kernel's
/// appended size), decompressing at most `max` bytes.
fn liblzma(
    stream: Result<xz2::stream::Stream, xz2::stream::Error>,
    input: &[u8],
    max: usize,
) -> Result<Vec<u8>, VmlinuxError> {
    let corrupt = |e: xz2::stream::Error| VmlinuxError::Corrupt(e.to_string());
    let mut stream = stream.map_err(corrupt)?;
    let mut out = Vec::new();
    loop {
        if out.len() == out.capacity() {
            if out.len() > max {
                return Err(VmlinuxError::TooLarge(max));
            }
            out.reserve((max + 1 - out.len()).min(4 << 20));
        }
        let (read, wrote) = (stream.total_in(), out.len());
        let rest = input.get(read as usize..).unwrap_or_default();
        let status =
            stream.process_vec(rest, &mut out, xz2::stream::Action::Run).map_err(corrupt)?;
        if out.len() > max {
            return Err(VmlinuxError::TooLarge(max));
        }
        match status {
            xz2::stream::Status::StreamEnd => return Ok(out),
            _ if stream.total_in() == read && out.len() == wrote && out.len() < out.capacity() => {
                return Err(VmlinuxError::Corrupt("the stream ends early".into()));
            }
            _ => {}
        }
    }
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

    /// `data` compressed as the kernel's build does it with each method it offers (xz with the
    /// x86 branch filter and CRC32, the legacy LZ4 frame), each followed by the uncompressed size
    /// the build appends: (method, payload).
    fn every_method(data: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        use std::io::Write;
        let size = (data.len() as u32).to_le_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).expect("gzip");
        let zs = zstd::encode_all(data, 1).expect("zstd");
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in data.chunks(8 << 20) {
            let block = lz4_flex::block::compress(chunk);
            lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
            lz.extend_from_slice(&block);
        }
        let xz_filters = {
            let mut f = xz2::stream::Filters::new();
            f.x86().lzma2(&xz2::stream::LzmaOptions::new_preset(0).expect("preset"));
            f
        };
        let xz = xz2::stream::MtStreamBuilder::new()
            .filters(xz_filters)
            .check(xz2::stream::Check::Crc32)
            .encoder()
            .expect("xz");
        let mut xz = xz2::write::XzEncoder::new_stream(Vec::new(), xz);
        xz.write_all(data).expect("xz");
        let lzma = xz2::stream::Stream::new_lzma_encoder(
            &xz2::stream::LzmaOptions::new_preset(0).expect("preset"),
        )
        .expect("lzma");
        let mut lzma = xz2::write::XzEncoder::new_stream(Vec::new(), lzma);
        lzma.write_all(data).expect("lzma");
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(data).expect("bzip2");
        let methods = [
            ("gzip", gz.finish().expect("gzip")),
            ("zstd", zs),
            ("lz4", lz),
            ("xz", xz.finish().expect("xz")),
            ("lzma", lzma.finish().expect("lzma")),
            ("bzip2", bz.finish().expect("bzip2")),
        ];
        methods
            .into_iter()
            .map(|(m, mut p)| {
                (m, {
                    p.extend_from_slice(&size);
                    p
                })
            })
            .collect()
    }

    #[test]
    fn every_payload_method_of_the_kernels_build_comes_out_as_the_elf() {
        for (method, payload) in every_method(&elf()) {
            let unpacked = from_bzimage(&bzimage(&payload));
            assert!(unpacked.as_ref().is_ok_and(|e| *e == elf()), "{method}: {:?}", unpacked.err());
        }
    }

    #[test]
    fn a_payload_that_decompresses_past_the_bound_is_refused_in_every_format() {
        let bomb = vec![0u8; 3 << 20];
        let max = 1 << 20;
        for (method, payload) in every_method(&bomb) {
            assert_eq!(
                within(&bzimage(&payload), max),
                Err(VmlinuxError::TooLarge(max)),
                "{method}"
            );
        }
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
        let lzo = bzimage(b"\x89LZO\0rest");
        assert_eq!(from_bzimage(&lzo), Err(VmlinuxError::Compression("lzo")));
        // Streams cut short or damaged are corrupt, whatever their method.
        for (method, payload) in every_method(&elf()) {
            let cut = &payload[..payload.len() / 2];
            assert!(
                matches!(from_bzimage(&bzimage(cut)), Err(VmlinuxError::Corrupt(_))),
                "{method} cut short"
            );
        }
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
        // Its vmlinux (its first 4 MiB: the ELF headers and the start of its code) packed with
        // every other method of the kernel's build comes out the same.
        let head = &vmlinux[..vmlinux.len().min(4 << 20)];
        for (method, payload) in every_method(head) {
            let unpacked = from_bzimage(&bzimage(&payload)).expect(method);
            assert!(unpacked == head, "{method}");
        }
    }
}
