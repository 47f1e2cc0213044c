//! Finding the kernel modules a guest needs and the order to load them in.
//!
//! Dependencies come from `modules.dep` when the tree has one, else from each module's ELF
//! `.modinfo` section (`depends=`), since distro packages ship modules without running depmod.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Modules the guest needs for its disks, console, agent channel and network. Missing ones are
/// assumed built in.
pub const GUEST_MODULES: &[&str] =
    &["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "vmw_vsock_virtio_transport", "ext4"];

/// Why modules could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading modules under {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {0} is compressed; hearth reads uncompressed .ko files: decompress the modules (e.g. `unxz`/`unzstd`) first")]
    Compressed(String),
    #[error("module {0} is not a valid ELF object")]
    BadElf(String),
}

/// `virtio-pci` and `virtio_pci` name the same module.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Every module in a `lib/modules/<version>` tree: name → path relative to the tree.
pub fn index(tree: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|source| ModuleError::Io { path: dir.clone(), source })?;
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().map_err(|source| ModuleError::Io { path: p.clone(), source })?;
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(base) = name.split(".ko").next().filter(|_| name.contains(".ko")) else { continue };
            let rel = p.strip_prefix(tree).map(Path::to_owned).unwrap_or(p.clone());
            out.insert(canonical(base), rel);
        }
    }
    Ok(out)
}

/// The `depends=` list from a module's `.modinfo` section.
pub fn modinfo_depends(ko: &[u8], name: &str) -> Result<Vec<String>, ModuleError> {
    let bad = || ModuleError::BadElf(name.to_owned());
    if !ko.starts_with(b"\x7fELF") {
        if ko.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) || ko.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) || ko.starts_with(&[0x1f, 0x8b]) {
            return Err(ModuleError::Compressed(name.to_owned()));
        }
        return Err(bad());
    }
    let u16_at = |o: usize| ko.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| ko.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let u64_at = |o: usize| ko.get(o..o + 8).and_then(|b| b.try_into().ok()).map(|b| u64::from_le_bytes(b) as usize);
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3a).ok_or_else(bad)?;
    let shnum = u16_at(0x3c).ok_or_else(bad)?;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)?;
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let (_, stroff, _) = section(shstrndx).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or_else(bad)?;
        let sname = ko.get(stroff + name_off..).and_then(|s| s.split(|&b| b == 0).next()).ok_or_else(bad)?;
        if sname != b".modinfo" {
            continue;
        }
        let data = ko.get(off..off.checked_add(size).ok_or_else(bad)?).ok_or_else(bad)?;
        for field in data.split(|&b| b == 0) {
            if let Some(deps) = field.strip_prefix(b"depends=") {
                return Ok(String::from_utf8_lossy(deps).split(',').filter(|d| !d.is_empty()).map(canonical).collect());
            }
        }
        return Ok(Vec::new());
    }
    Ok(Vec::new())
}

/// Dependencies from a `modules.dep` file: module name → dependency names.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    let name_of = |p: &str| {
        canonical(Path::new(p).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default().split(".ko").next().unwrap_or(""))
    };
    text.lines().filter_map(|l| l.split_once(':')).map(|(m, deps)| (name_of(m), deps.split_whitespace().map(name_of).collect())).collect()
}

/// The modules to load for `roots`, dependencies first, as paths relative to `tree`.
pub fn closure(tree: &Path, roots: &[&str]) -> Result<Vec<PathBuf>, ModuleError> {
    let idx = index(tree)?;
    let dep_file = std::fs::read_to_string(tree.join("modules.dep")).ok().map(|t| parse_modules_dep(&t));
    let deps_of = |name: &str| -> Result<Vec<String>, ModuleError> {
        if let Some(d) = &dep_file {
            return Ok(d.get(name).cloned().unwrap_or_default());
        }
        let Some(rel) = idx.get(name) else { return Ok(Vec::new()) };
        let p = tree.join(rel);
        let bytes = std::fs::read(&p).map_err(|source| ModuleError::Io { path: p, source })?;
        modinfo_depends(&bytes, name)
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS: a module is emitted after all its dependencies.
    for root in roots {
        let root = canonical(root);
        if !idx.contains_key(&root) {
            continue;
        }
        let mut stack: Vec<(String, bool)> = vec![(root, false)];
        while let Some((m, expanded)) = stack.pop() {
            if expanded {
                if let Some(rel) = idx.get(&m) {
                    if !order.contains(rel) {
                        order.push(rel.clone());
                    }
                }
                continue;
            }
            if !seen.insert(m.clone()) {
                continue;
            }
            stack.push((m.clone(), true));
            for d in deps_of(&m)?.into_iter().rev() {
                if !seen.contains(&d) && idx.contains_key(&d) {
                    stack.push((d, false));
                }
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_wins_and_order_is_deps_first() {
        let dir = tempfile::tempdir().expect("tmp");
        for m in ["a.ko", "b.ko", "c.ko", "unused.ko"] {
            std::fs::write(dir.path().join(m), b"not elf").expect("write");
        }
        std::fs::write(dir.path().join("modules.dep"), "a.ko: b.ko c.ko\nb.ko: c.ko\nc.ko:\nunused.ko:\n").expect("write");
        let order = closure(dir.path(), &["a", "missing-builtin"]).expect("closure");
        assert_eq!(order, [PathBuf::from("c.ko"), PathBuf::from("b.ko"), PathBuf::from("a.ko")]);
    }

    #[test]
    fn debian_modules_without_depmod_when_present() {
        let tree = Path::new("/tmp/kpkg/root/lib/modules/6.1.0-56-cloud-amd64");
        if !tree.exists() {
            eprintln!("skipping: {} not present", tree.display());
            return;
        }
        let order = closure(tree, GUEST_MODULES).expect("closure");
        let names: Vec<String> = order.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"));
        assert!(pos("virtio_ring.ko") < pos("virtio.ko") || pos("virtio.ko") < pos("virtio_blk.ko"));
        assert!(pos("virtio.ko") < pos("virtio_blk.ko"));
        assert!(pos("virtio_pci.ko") > pos("virtio.ko"));
        assert!(pos("vmw_vsock_virtio_transport_common.ko") < pos("vmw_vsock_virtio_transport.ko"));
    }

    #[test]
    fn compressed_modules_are_named() {
        let e = modinfo_depends(&[0xfd, b'7', b'z', b'X', b'Z', 0], "virtio").expect_err("xz");
        assert!(e.to_string().contains("decompress"), "{e}");
    }
}
