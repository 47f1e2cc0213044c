//! Finding the kernel modules a guest needs and the order to load them in.
//!
//! Dependencies come from `modules.dep` when the tree has one, else from each module's ELF
//! `.modinfo` section (`depends=`), since distro packages ship modules without running depmod.
//! Modules may be plain `.ko` or zstd-compressed `.ko.zst`; xz and gzip ones are refused with a
//! hint, because the initramfs always carries plain `.ko` files that any kernel can load.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Modules the guest needs for its disks, console, agent channel and network. Missing ones are
/// assumed built in (ext4 is listed for kernels that build it as a module).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "ext4",
    // Shared directories (virtio-fs); it brings fuse.
    "virtiofs",
];

/// Why modules could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read modules under {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {0} is {1}-compressed; hearth reads plain and zstd modules: decompress them first (e.g. `find . -name '*.ko.xz' -exec unxz {{}} +`)")]
    Compressed(String, &'static str),
    #[error("module {0} is not a valid 64-bit little-endian ELF object: pass a module tree built for x86_64")]
    BadElf(String),
    #[error("module {name} is built for kernel {found:?}, not {version}: its modules tree belongs to another kernel")]
    WrongVersion { name: String, found: String, version: String },
    #[error("cannot decompress module {name}: re-extract the kernel package")]
    Zstd {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
    Gzip,
}

impl Compression {
    /// The compression of a module file name, `None` when the name is not a module at all.
    pub fn of(file_name: &str) -> Option<Self> {
        if file_name.ends_with(".ko") {
            Some(Self::None)
        } else if file_name.ends_with(".ko.zst") {
            Some(Self::Zstd)
        } else if file_name.ends_with(".ko.xz") {
            Some(Self::Xz)
        } else if file_name.ends_with(".ko.gz") {
            Some(Self::Gzip)
        } else {
            None
        }
    }
}

/// `virtio-pci` and `virtio_pci` name the same module.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/drivers/virtio/virtio-pci.ko.zst`.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    Compression::of(file)?;
    file.split(".ko").next().map(canonical)
}

/// `dir/virtio.ko.zst` → `dir/virtio.ko`: where a module lands once decompressed.
pub fn plain_path(rel: &Path) -> PathBuf {
    let s = rel.to_string_lossy();
    match s.rfind(".ko") {
        Some(at) => PathBuf::from(format!("{}.ko", &s[..at])),
        None => rel.to_owned(),
    }
}

/// Reads a module file, decompressing zstd; refuses xz and gzip with a hint.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let name = path.display().to_string();
    let bytes =
        std::fs::read(path).map_err(|source| ModuleError::Io { path: path.to_owned(), source })?;
    decompress(bytes, &name)
}

/// Detects the compression by magic, so a mislabelled file is still handled right.
fn decompress(bytes: Vec<u8>, name: &str) -> Result<Vec<u8>, ModuleError> {
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return zstd::stream::decode_all(bytes.as_slice())
            .map_err(|source| ModuleError::Zstd { name: name.to_owned(), source });
    }
    if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(ModuleError::Compressed(name.to_owned(), "xz"));
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err(ModuleError::Compressed(name.to_owned(), "gzip"));
    }
    Ok(bytes)
}

/// Every module in a `lib/modules/<version>` tree: name → path relative to the tree.
pub fn index(tree: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|source| ModuleError::Io { path: dir.clone(), source })?;
        for e in rd {
            let e = e.map_err(|source| ModuleError::Io { path: dir.clone(), source })?;
            let p = e.path();
            let ft = e.file_type().map_err(|source| ModuleError::Io { path: p.clone(), source })?;
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            // Links are never followed here (a link in an image's tree could name a host file).
            if !ft.is_file() {
                continue;
            }
            let Some(name) = module_name(&p) else { continue };
            let rel = p.strip_prefix(tree).map(Path::to_owned).unwrap_or_else(|_| p.clone());
            out.insert(name, rel);
        }
    }
    Ok(out)
}

/// All `key=value` fields of a module's `.modinfo` section, in order.
pub fn modinfo(ko: &[u8], name: &str) -> Result<Vec<(String, String)>, ModuleError> {
    let bad = || ModuleError::BadElf(name.to_owned());
    // ELF64 little-endian only: e_ident[EI_CLASS] = 2, e_ident[EI_DATA] = 1.
    if !ko.starts_with(b"\x7fELF") || ko.get(4) != Some(&2) || ko.get(5) != Some(&1) {
        return Err(bad());
    }
    let u16_at =
        |o: usize| ko.get(o..o.checked_add(2)?).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| {
        ko.get(o..o.checked_add(4)?).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u64_at = |o: usize| {
        let b: [u8; 8] = ko.get(o..o.checked_add(8)?)?.try_into().ok()?;
        usize::try_from(u64::from_le_bytes(b)).ok()
    };
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3a).ok_or_else(bad)?;
    let shnum = u16_at(0x3c).ok_or_else(bad)?;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)?;
    if shentsize < 0x40 || shstrndx >= shnum {
        return Err(bad());
    }
    // (sh_name, sh_offset, sh_size) of section `i`.
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h.checked_add(0x18)?)?, u64_at(h.checked_add(0x20)?)?))
    };
    let (_, stroff, strsize) = section(shstrndx).ok_or_else(bad)?;
    let strtab = ko.get(stroff..stroff.checked_add(strsize).ok_or_else(bad)?).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or_else(bad)?;
        let sname =
            strtab.get(name_off..).and_then(|s| s.split(|&b| b == 0).next()).ok_or_else(bad)?;
        if sname != b".modinfo" {
            continue;
        }
        let data = ko.get(off..off.checked_add(size).ok_or_else(bad)?).ok_or_else(bad)?;
        return Ok(data
            .split(|&b| b == 0)
            .filter_map(|field| {
                let s = String::from_utf8_lossy(field);
                s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect());
    }
    Ok(Vec::new())
}

/// The `depends=` list from a module's `.modinfo` section, canonicalised.
pub fn modinfo_depends(ko: &[u8], name: &str) -> Result<Vec<String>, ModuleError> {
    let fields = modinfo(ko, name)?;
    Ok(fields
        .iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .filter(|d| !d.is_empty())
        .map(canonical)
        .collect())
}

/// The kernel release a module was built for (first word of `vermagic=`).
pub fn vermagic(ko: &[u8], name: &str) -> Result<Option<String>, ModuleError> {
    Ok(modinfo(ko, name)?
        .into_iter()
        .find(|(k, _)| k == "vermagic")
        .and_then(|(_, v)| v.split_whitespace().next().map(str::to_owned)))
}

/// Dependencies from a `modules.dep` file: module name → dependency names.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(m, deps)| {
            let name = module_name(Path::new(m.trim()))?;
            Some((
                name,
                deps.split_whitespace().filter_map(|d| module_name(Path::new(d))).collect(),
            ))
        })
        .collect()
}

/// The modules to load for `roots`, dependencies first, as paths relative to `tree`. Roots the
/// tree does not have are skipped (built in); a cycle cannot loop (each module is visited once).
pub fn closure(tree: &Path, roots: &[&str]) -> Result<Vec<PathBuf>, ModuleError> {
    let idx = index(tree)?;
    let dep_file = match std::fs::read_to_string(tree.join("modules.dep")) {
        Ok(t) => Some(parse_modules_dep(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(ModuleError::Io { path: tree.join("modules.dep"), source }),
    };
    let deps_of = |name: &str| -> Result<Vec<String>, ModuleError> {
        if let Some(d) = &dep_file {
            return Ok(d.get(name).cloned().unwrap_or_default());
        }
        let Some(rel) = idx.get(name) else { return Ok(Vec::new()) };
        modinfo_depends(&read_module(&tree.join(rel))?, name)
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative post-order DFS: a module is emitted once all its dependencies have been.
    for root in roots {
        let root = canonical(root);
        if !idx.contains_key(&root) {
            continue;
        }
        let mut stack: Vec<(String, bool)> = vec![(root, false)];
        while let Some((m, expanded)) = stack.pop() {
            if expanded {
                if let Some(rel) = idx.get(&m) {
                    order.push(rel.clone());
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
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 LE relocatable with a `.modinfo` section holding `fields`.
    pub(crate) fn fake_ko(fields: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for f in fields {
            modinfo.extend_from_slice(f.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let mut b = vec![0u8; 0x40];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little endian
        let modinfo_off = b.len();
        b.extend_from_slice(&modinfo);
        let str_off = b.len();
        b.extend_from_slice(&shstrtab);
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        let shoff = b.len();
        // Null section, .modinfo, .shstrtab.
        for (name, off, size) in
            [(0u32, 0usize, 0usize), (1, modinfo_off, modinfo.len()), (10, str_off, shstrtab.len())]
        {
            let mut h = vec![0u8; 0x40];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend_from_slice(&h);
        }
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        b
    }

    fn names(order: &[PathBuf]) -> Vec<String> {
        order.iter().filter_map(|p| module_name(p)).collect()
    }

    #[test]
    fn modules_dep_wins_and_order_is_deps_first() {
        let dir = tempfile::tempdir().expect("tmp");
        for m in ["a.ko", "b.ko", "c.ko", "unused.ko"] {
            std::fs::write(dir.path().join(m), b"not elf").expect("write");
        }
        std::fs::write(
            dir.path().join("modules.dep"),
            "a.ko: b.ko c.ko\nb.ko: c.ko\nc.ko:\nunused.ko:\n",
        )
        .expect("write");
        let order = closure(dir.path(), &["a", "missing-builtin"]).expect("closure");
        assert_eq!(order, [PathBuf::from("c.ko"), PathBuf::from("b.ko"), PathBuf::from("a.ko")]);
    }

    #[test]
    fn modinfo_closure_handles_diamonds_cycles_dashes_and_zstd() {
        let dir = tempfile::tempdir().expect("tmp");
        let sub = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let w =
            |f: &str, fields: &[&str]| std::fs::write(sub.join(f), fake_ko(fields)).expect("write");
        w("top.ko", &["license=GPL", "depends=left,right-mod", "vermagic=6.9.9 SMP"]);
        w("left.ko", &["depends=base"]);
        w("base.ko", &["depends="]);
        w("loop_a.ko", &["depends=loop_b"]);
        w("loop_b.ko", &["depends=loop_a"]);
        let zst = zstd::stream::encode_all(fake_ko(&["depends=base"]).as_slice(), 3).expect("zstd");
        std::fs::write(sub.join("right_mod.ko.zst"), zst).expect("write");
        let order = closure(dir.path(), &["top", "loop-a"]).expect("closure");
        assert_eq!(names(&order), ["base", "left", "right_mod", "top", "loop_b", "loop_a"]);
        assert_eq!(plain_path(&order[2]), PathBuf::from("kernel/drivers/right_mod.ko"));
        let top = std::fs::read(sub.join("top.ko")).expect("read");
        assert_eq!(vermagic(&top, "top").expect("vermagic").as_deref(), Some("6.9.9"));
    }

    #[test]
    fn debian_modules_without_depmod_when_present() {
        let tree = Path::new("/tmp/kpkg/root/lib/modules/6.1.0-56-cloud-amd64");
        if !tree.exists() {
            eprintln!("skipping: {} not present", tree.display());
            return;
        }
        let virtio = read_module(&tree.join("kernel/drivers/virtio/virtio.ko")).expect("read");
        assert_eq!(modinfo_depends(&virtio, "virtio").expect("modinfo"), ["virtio_ring"]);
        assert_eq!(
            vermagic(&virtio, "virtio").expect("vermagic").as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        let order = names(&closure(tree, GUEST_MODULES).expect("closure"));
        let pos = |n: &str| {
            order
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("{n} missing from {order:?}"))
        };
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_blk"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        for m in ["virtio_console", "virtio_net", "virtio_mmio"] {
            pos(m);
        }
        assert!(!order.contains(&"ext4".to_owned()), "ext4 is built into this kernel");
    }

    #[test]
    fn compressed_modules_are_named() {
        let e = decompress(vec![0xfd, b'7', b'z', b'X', b'Z', 0], "virtio.ko.xz").expect_err("xz");
        assert!(e.to_string().contains("decompress"), "{e}");
        let e = decompress(vec![0x1f, 0x8b, 8], "virtio.ko.gz").expect_err("gz");
        assert!(e.to_string().contains("gzip"), "{e}");
        assert!(matches!(modinfo(b"not an elf", "x"), Err(ModuleError::BadElf(_))));
        assert_eq!(module_name(Path::new("a/virtio-pci.ko.xz")).as_deref(), Some("virtio_pci"));
        assert_eq!(module_name(Path::new("modules.dep")), None);
    }

    #[test]
    fn modules_dep_lines_parse() {
        let d = parse_modules_dep("kernel/a.ko.zst: kernel/b-c.ko kernel/d.ko.xz\nkernel/e.ko:\n");
        assert_eq!(d["a"], ["b_c", "d"]);
        assert!(d["e"].is_empty());
    }
}
