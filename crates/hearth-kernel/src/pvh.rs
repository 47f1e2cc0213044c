//! Whether an ELF `vmlinux` carries a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY` in a `Xen`
//! note), which QEMU and Cloud Hypervisor need to boot an uncompressed kernel directly;
//! Firecracker boots ELF kernels without one. Read with bounded positioned reads: the kernel is
//! an imported file, never trusted to be well formed.

use std::path::Path;

use hearth_fs::elf::{u32_at, Elf, PT_NOTE};

/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const PHYS32_ENTRY: u32 = 18;
/// The most note bytes read.
const MAX_NOTES: u64 = 1 << 20;

/// Whether the ELF64 file at `path` has a PVH note; `false` for anything malformed.
pub fn has_pvh_note(path: &Path) -> std::io::Result<bool> {
    let Some(elf) = Elf::open(path)? else { return Ok(false) };
    let found = elf
        .of_kind(PT_NOTE)
        .any(|s| elf.contents(s, MAX_NOTES).is_some_and(|n| notes_have_pvh(&n)));
    Ok(found)
}

/// Walks one note segment: (namesz, descsz, type, name, desc), each padded to 4 bytes.
fn notes_have_pvh(notes: &[u8]) -> bool {
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, at), u32_at(notes, at + 4), u32_at(notes, at + 8))
        else {
            return false;
        };
        let name_at = at + 12;
        let Some(name) = notes.get(name_at..name_at + namesz as usize) else { return false };
        if kind == PHYS32_ENTRY && name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" {
            return true;
        }
        at = name_at + pad(namesz as usize) + pad(descsz as usize);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    fn elf(notes: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..];
        ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[0x08..0x10].copy_from_slice(&120u64.to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        f.extend_from_slice(notes);
        f
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend((desc.len() as u32).to_le_bytes());
        n.extend(kind.to_le_bytes());
        n.extend(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    fn check(bytes: &[u8]) -> bool {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("vmlinux");
        std::fs::write(&p, bytes).expect("write");
        has_pvh_note(&p).expect("read")
    }

    #[test]
    fn the_pvh_note_is_found_among_others_and_only_under_xens_name() {
        let gnu = note(b"GNU\0", 3, &[1; 20]);
        let pvh = note(b"Xen\0", PHYS32_ENTRY, &0x100_0000u32.to_le_bytes());
        assert!(check(&elf(&[gnu.clone(), pvh].concat())));
        assert!(!check(&elf(&gnu)), "no PVH note");
        assert!(!check(&elf(&note(b"Linux\0", PHYS32_ENTRY, &[0; 4]))), "another owner's type 18");
    }

    #[test]
    fn malformed_files_are_no_pvh_kernels() {
        assert!(!check(b"not an elf"));
        let mut truncated = elf(&note(b"Xen\0", PHYS32_ENTRY, &[0; 4]));
        truncated.truncate(100);
        assert!(!check(&truncated));
        let mut huge = elf(&[]);
        huge[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(!check(&huge), "too many program headers");
        let mut lying = note(b"Xen\0", 1, &[]);
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!check(&elf(&lying)), "a name longer than the segment");
    }

    #[test]
    fn debians_vmlinux_has_the_pvh_note() {
        let Some(kernel) = std::env::var_os("HEARTH_TEST_KERNEL") else {
            eprintln!("skipped: HEARTH_TEST_KERNEL is not set (cargo xtask kernel fetches one)");
            return;
        };
        let elf =
            crate::vmlinux::from_bzimage(&std::fs::read(kernel).expect("kernel")).expect("elf");
        assert!(check(&elf));
    }
}
