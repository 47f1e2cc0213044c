//! An ELF64 (little-endian) file's program headers, read with bounded positioned reads: the
//! files read this way (imported kernels, VMM binaries) are never trusted to be well formed, so
//! every length is checked against the file and a cap before anything is allocated.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const PT_LOAD: u32 = 1;
pub const PT_DYNAMIC: u32 = 2;
pub const PT_INTERP: u32 = 3;
pub const PT_NOTE: u32 = 4;

/// The most program headers read.
const MAX_PHDRS: u64 = 256;

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub kind: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

/// An open ELF64 file and its segments.
#[derive(Debug)]
pub struct Elf {
    file: File,
    pub segments: Vec<Segment>,
}

impl Elf {
    /// `Ok(None)` when the file is not a little-endian ELF64 whose headers can be read.
    pub fn open(path: &Path) -> std::io::Result<Option<Self>> {
        Ok(Self::from_file(File::open(path)?))
    }

    pub fn from_file(file: File) -> Option<Self> {
        let head = read_at(&file, 0, 64)?;
        if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
            return None;
        }
        let (phoff, phentsize, phnum) = (
            u64_at(&head, 0x20)?,
            u64::from(u16_at(&head, 0x36)?),
            u64::from(u16_at(&head, 0x38)?),
        );
        if phentsize < 56 || phnum > MAX_PHDRS {
            return None;
        }
        let phdrs = read_at(&file, phoff, phentsize.checked_mul(phnum)?)?;
        let segments = (0..phnum as usize)
            .map(|i| {
                let ph = phdrs.get(i * phentsize as usize..)?;
                Some(Segment {
                    kind: u32_at(ph, 0)?,
                    offset: u64_at(ph, 0x08)?,
                    vaddr: u64_at(ph, 0x10)?,
                    filesz: u64_at(ph, 0x20)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { file, segments })
    }

    /// The segments of one kind.
    pub fn of_kind(&self, kind: u32) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.kind == kind)
    }

    /// `len` bytes at `at`; `None` past the file's end or beyond `max`.
    pub fn read(&self, at: u64, len: u64, max: u64) -> Option<Vec<u8>> {
        (len <= max).then(|| read_at(&self.file, at, len))?
    }

    /// A segment's bytes in the file, at most `max`.
    pub fn contents(&self, s: &Segment, max: u64) -> Option<Vec<u8>> {
        self.read(s.offset, s.filesz, max)
    }

    /// The file offset of virtual address `vaddr`, through the loadable segments.
    pub fn offset_of(&self, vaddr: u64) -> Option<u64> {
        self.of_kind(PT_LOAD)
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            .and_then(|s| s.offset.checked_add(vaddr - s.vaddr))
    }
}

fn read_at(f: &File, at: u64, len: u64) -> Option<Vec<u8>> {
    let end = at.checked_add(len)?;
    if end > f.metadata().ok()?.len() {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    f.read_exact_at(&mut buf, at).ok()?;
    Some(buf)
}

pub fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(i..i.checked_add(2)?)?.try_into().ok()?))
}
pub fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i.checked_add(4)?)?.try_into().ok()?))
}
pub fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i.checked_add(8)?)?.try_into().ok()?))
}
