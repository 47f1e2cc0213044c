//! The initramfs hearth boots every guest with: hearth-init as `/init` and the module closure.
//!
//! Layout: `/init` (0755), `/dev/console` (char 5,1, so the kernel opens a console before
//! devtmpfs is mounted), empty `/dev /proc /sys /newroot`, the modules at
//! `/lib/modules/<version>/<relpath>` (always plain `.ko`: zstd ones are decompressed here) and
//! `/hearth/modules` listing their absolute paths in load order, one per line.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cpio::Cpio;
use crate::modules::{self, ModuleError};

/// Path of the load-order list inside the initramfs.
pub const MODULE_LIST: &str = "hearth/modules";

/// Why an initramfs could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot write the initramfs {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Modules(#[from] ModuleError),
}

/// Writes the archive for a kernel `version` to `out`. `tree` is the kernel's
/// `lib/modules/<version>` directory, when it has modules; `roots` the modules wanted.
pub fn write(
    out: impl Write,
    out_path: &Path,
    init: &[u8],
    version: &str,
    tree: Option<&Path>,
    roots: &[&str],
) -> Result<Vec<PathBuf>, InitramfsError> {
    let werr = |source| InitramfsError::Write { path: out_path.to_owned(), source };
    let order = match tree {
        Some(t) => modules::closure(t, roots)?,
        None => Vec::new(),
    };
    let mut c = Cpio::new(out);
    for d in ["dev", "proc", "sys", "newroot", "hearth", "lib", "lib/modules"] {
        c.dir(d).map_err(werr)?;
    }
    c.char_dev("dev/console", 0o600, 5, 1).map_err(werr)?;
    c.file("init", 0o755, init).map_err(werr)?;
    let base = format!("lib/modules/{version}");
    c.dir(&base).map_err(werr)?;
    let mut made = BTreeSet::new();
    let mut list = String::new();
    let mut placed = Vec::new();
    for rel in &order {
        let plain = modules::plain_path(rel);
        let mut acc = base.clone();
        for comp in plain.parent().into_iter().flat_map(|p| p.components()) {
            acc = format!("{acc}/{}", comp.as_os_str().to_string_lossy());
            if made.insert(acc.clone()) {
                c.dir(&acc).map_err(werr)?;
            }
        }
        let Some(tree) = tree else { break };
        let data = modules::read_module(&tree.join(rel))?;
        // Only what really is a module of this kernel goes into every guest of it.
        let name = rel.display().to_string();
        match modules::vermagic(&data, &name)? {
            Some(v) if v == version => {}
            found => {
                return Err(ModuleError::WrongVersion {
                    name,
                    found: found.unwrap_or_default(),
                    version: version.to_owned(),
                }
                .into())
            }
        }
        let dest = format!("{base}/{}", plain.display());
        c.file(&dest, 0o644, &data).map_err(werr)?;
        list.push('/');
        list.push_str(&dest);
        list.push('\n');
        placed.push(PathBuf::from(format!("/{dest}")));
    }
    c.file(MODULE_LIST, 0o644, list.as_bytes()).map_err(werr)?;
    c.finish().map_err(werr)?;
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::parse;
    use crate::cpio::{S_IFCHR, S_IFREG};
    use crate::modules::tests::fake_ko;

    #[test]
    fn layout_and_load_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let sub = dir.path().join("kernel/drivers/virtio");
        std::fs::create_dir_all(&sub).expect("mkdir");
        const V: &str = "vermagic=6.9.9 SMP mod_unload";
        std::fs::write(sub.join("virtio_ring.ko"), fake_ko(&["depends=", V])).expect("write");
        let zst = zstd::stream::encode_all(fake_ko(&["depends=virtio_ring", V]).as_slice(), 3)
            .expect("zstd");
        std::fs::write(sub.join("virtio.ko.zst"), zst).expect("write");
        std::fs::write(sub.join("virtio_blk.ko"), fake_ko(&["depends=virtio,virtio_ring", V]))
            .expect("write");
        std::fs::write(sub.join("unrelated.ko"), fake_ko(&[])).expect("write");
        let mut out = Vec::new();
        let placed = write(
            &mut out,
            Path::new("mem"),
            b"INIT",
            "6.9.9",
            Some(dir.path()),
            &["virtio_blk", "virtio_pci"],
        )
        .expect("write");
        let entries = parse(&out);
        let get =
            |n: &str| entries.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!((get("init").1, get("init").3.as_slice()), (S_IFREG | 0o755, &b"INIT"[..]));
        assert_eq!((get("dev/console").1, get("dev/console").2), (S_IFCHR | 0o600, (5, 1)));
        for d in ["dev", "proc", "sys", "newroot", "lib/modules/6.9.9/kernel/drivers/virtio"] {
            get(d);
        }
        let list = String::from_utf8(get(MODULE_LIST).3.clone()).expect("utf8");
        let expect = ["virtio_ring", "virtio", "virtio_blk"]
            .map(|m| format!("/lib/modules/6.9.9/kernel/drivers/virtio/{m}.ko"))
            .join("\n")
            + "\n";
        assert_eq!(list, expect);
        assert_eq!(placed.len(), 3);
        // The zstd module is stored decompressed, as an ELF object.
        assert!(get("lib/modules/6.9.9/kernel/drivers/virtio/virtio.ko").3.starts_with(b"\x7fELF"));
        assert!(!entries.iter().any(|e| e.0.contains("unrelated")));
    }

    #[test]
    fn kernel_without_modules_gets_an_empty_list() {
        let mut out = Vec::new();
        write(&mut out, Path::new("mem"), b"INIT", "6.9.9", None, modules::GUEST_MODULES)
            .expect("write");
        let entries = parse(&out);
        assert!(entries.iter().any(|e| e.0 == MODULE_LIST && e.3.is_empty()));
    }
}
