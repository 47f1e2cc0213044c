//! hearth's kernel store.
//!
//! Kernels are imported from a file (bzImage or ELF vmlinux) with an optional modules tree, or
//! from an unpacked Ignite-style kernel image (`/boot/vmlinux`, `/lib/modules`). Per kernel,
//! hearth builds an initramfs holding hearth-init and the closure of the modules the guest needs,
//! so a distro kernel with virtio as modules boots like one with everything built in.
#![forbid(unsafe_code)]

pub mod cpio;
pub mod modules;
pub mod version;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_types::{Digest, KernelRecord};
use sha2::{Digest as _, Sha256};

pub use modules::{ModuleError, GUEST_MODULES};

/// Why a kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    Format(PathBuf),
    #[error("cannot read the kernel version from {0}")]
    Version(PathBuf),
    #[error("a kernel named {0} already exists: remove it with `hearth kernel rm {0}` first")]
    Exists(String),
    #[error("no kernel named {0} (see `hearth kernel ls`)")]
    NotFound(String),
    #[error("no modules for kernel {version} under {dir}: pass the lib/modules/{version} directory")]
    NoModules { version: String, dir: PathBuf },
    #[error("{dir} holds no kernel: expected /boot/vmlinux, /boot/vmlinuz* or /boot/bzImage")]
    NoKernelInImage { dir: PathBuf },
    #[error("kernel record {0} is corrupt")]
    Corrupt(PathBuf),
    #[error(transparent)]
    Modules(#[from] ModuleError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io { path: path.to_owned(), source }
}

/// The kernels of one hearth root (`ROOT/kernels`).
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KernelError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Copies a tree, hard-linking files where the filesystem allows.
fn link_tree(src: &Path, dst: &Path) -> Result<usize, KernelError> {
    fs::create_dir_all(dst).map_err(io_err(dst))?;
    let mut count = 0;
    for e in fs::read_dir(src).map_err(io_err(src))? {
        let e = e.map_err(io_err(src))?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().map_err(io_err(&s))?;
        if ft.is_dir() {
            count += link_tree(&s, &d)?;
        } else if ft.is_file() {
            if fs::hard_link(&s, &d).is_err() {
                fs::copy(&s, &d).map_err(io_err(&d))?;
            }
            if e.file_name().to_string_lossy().contains(".ko") {
                count += 1;
            }
        }
    }
    Ok(count)
}

impl KernelStore {
    pub fn open(root: &Path) -> Result<Self, KernelError> {
        let dir = root.join("kernels");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir })
    }

    fn kdir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The kernel file of a stored kernel.
    pub fn kernel_path(&self, name: &str) -> PathBuf {
        self.kdir(name).join("kernel")
    }

    /// Imports `kernel` (and its modules) under `name`.
    pub fn import(&self, kernel: &Path, modules: Option<&Path>, name: &str) -> Result<KernelRecord, KernelError> {
        let bytes = fs::read(kernel).map_err(io_err(kernel))?;
        let format = version::detect(&bytes).ok_or_else(|| KernelError::Format(kernel.to_owned()))?;
        let ver = version::version(&bytes, format).ok_or_else(|| KernelError::Version(kernel.to_owned()))?;
        let mod_tree = modules.map(|m| find_module_tree(m, &ver)).transpose()?;
        let dir = self.kdir(name);
        if dir.join("record.json").exists() {
            return Err(KernelError::Exists(name.to_owned()));
        }
        let staging = self.dir.join(format!(".{name}.importing"));
        let _ = fs::remove_dir_all(&staging);
        let result: Result<KernelRecord, KernelError> = (|| {
            fs::create_dir_all(&staging).map_err(io_err(&staging))?;
            fs::write(staging.join("kernel"), &bytes).map_err(io_err(&staging))?;
            let count = match &mod_tree {
                Some(t) => link_tree(t, &staging.join("modules").join(&ver))?,
                None => 0,
            };
            let rec = KernelRecord {
                name: name.to_owned(),
                id: Digest::from_hex(&hex::encode(Sha256::digest(&bytes))).map_err(|_| KernelError::Version(kernel.to_owned()))?,
                version: ver.clone(),
                format: format.as_str().to_owned(),
                modules: count,
                created_at: now(),
            };
            let json = serde_json::to_vec_pretty(&rec).map_err(|_| KernelError::Corrupt(staging.clone()))?;
            write_atomic(&staging.join("record.json"), &json)?;
            let _ = fs::remove_dir_all(&dir);
            fs::rename(&staging, &dir).map_err(io_err(&dir))?;
            Ok(rec)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        let rec = result?;
        if self.default_name()?.is_none() {
            self.set_default(name)?;
        }
        Ok(rec)
    }

    /// Imports from an unpacked kernel image: `/boot/vmlinux` (or vmlinuz*, bzImage) and
    /// `/lib/modules`.
    pub fn import_rootfs(&self, dir: &Path, name: &str) -> Result<KernelRecord, KernelError> {
        let boot = dir.join("boot");
        let mut candidates: Vec<PathBuf> = ["vmlinux", "bzImage", "vmlinuz"].iter().map(|n| boot.join(n)).collect();
        if let Ok(rd) = fs::read_dir(&boot) {
            let mut more: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinu")))
                .collect();
            more.sort();
            candidates.extend(more);
        }
        let kernel = candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| KernelError::NoKernelInImage { dir: dir.to_owned() })?;
        let modules = dir.join("lib/modules");
        self.import(&kernel, modules.is_dir().then_some(modules.as_path()), name)
    }

    pub fn get(&self, name: &str) -> Result<Option<KernelRecord>, KernelError> {
        if hearth_types::validate_name(name).is_err() {
            return Ok(None);
        }
        let p = self.kdir(name).join("record.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|_| KernelError::Corrupt(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KernelError::Io { path: p, source }),
        }
    }

    pub fn list(&self) -> Result<Vec<KernelRecord>, KernelError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))?.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Some(r) = self.get(&e.file_name().to_string_lossy())? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<KernelRecord, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        let dir = self.kdir(name);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        if self.default_name()?.as_deref() == Some(name) {
            let _ = fs::remove_file(self.dir.join(".default"));
        }
        Ok(rec)
    }

    pub fn set_default(&self, name: &str) -> Result<(), KernelError> {
        if self.get(name)?.is_none() {
            return Err(KernelError::NotFound(name.to_owned()));
        }
        write_atomic(&self.dir.join(".default"), name.as_bytes())
    }

    pub fn default_name(&self) -> Result<Option<String>, KernelError> {
        match fs::read_to_string(self.dir.join(".default")) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KernelError::Io { path: self.dir.join(".default"), source }),
        }
    }

    /// The initramfs for `name` with `init_binary` as /init, built once and cached.
    pub fn initramfs(&self, name: &str, init_binary: &Path) -> Result<PathBuf, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        let init = fs::read(init_binary).map_err(io_err(init_binary))?;
        let mut h = Sha256::new();
        h.update(rec.id.hex().as_bytes());
        h.update(&init);
        let hash = hex::encode(h.finalize());
        let out = self.kdir(name).join(format!("initramfs-{}.img", &hash[..16]));
        if out.exists() {
            return Ok(out);
        }
        let tree = self.kdir(name).join("modules").join(&rec.version);
        let order = if tree.is_dir() { modules::closure(&tree, GUEST_MODULES)? } else { Vec::new() };
        let mut c = cpio::Cpio::new();
        for d in ["dev", "proc", "sys", "newroot", "hearth", "lib", "lib/modules"] {
            c.dir(d);
        }
        c.char_dev("dev/console", 0o600, 5, 1);
        c.file("init", 0o755, &init);
        let base = format!("lib/modules/{}", rec.version);
        c.dir(&base);
        let mut made = std::collections::BTreeSet::new();
        let mut list = String::new();
        for rel in &order {
            let mut acc = base.clone();
            for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
                acc = format!("{acc}/{}", comp.as_os_str().to_string_lossy());
                if made.insert(acc.clone()) {
                    c.dir(&acc);
                }
            }
            let src = tree.join(rel);
            let data = fs::read(&src).map_err(io_err(&src))?;
            let dest = format!("{base}/{}", rel.display());
            c.file(&dest, 0o644, &data);
            list.push('/');
            list.push_str(&dest);
            list.push('\n');
        }
        c.file("hearth/modules", 0o644, list.as_bytes());
        let tmp = out.with_extension("tmp");
        let f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        c.finish(io::BufWriter::new(&f)).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &out).map_err(io_err(&out))?;
        // Older initramfs images of this kernel (other hearth-init builds) are obsolete.
        if let Ok(rd) = fs::read_dir(self.kdir(name)) {
            for e in rd.flatten() {
                let p = e.path();
                if p != out && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("initramfs-")) {
                    let _ = fs::remove_file(p);
                }
            }
        }
        Ok(out)
    }
}

/// Accepts `lib/modules/<ver>`, a directory holding `<ver>`, or a root holding `lib/modules/<ver>`.
fn find_module_tree(dir: &Path, version: &str) -> Result<PathBuf, KernelError> {
    let candidates = [dir.to_owned(), dir.join(version), dir.join("lib/modules").join(version)];
    for c in &candidates {
        if c.is_dir() && (c.join("kernel").is_dir() || c.join("modules.dep").is_file()) {
            return Ok(c.clone());
        }
    }
    Err(KernelError::NoModules { version: version.to_owned(), dir: dir.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel(dir: &Path) -> PathBuf {
        let mut b = b"\x7fELF".to_vec();
        b.extend_from_slice(b"\0Linux version 6.9.9-fake (x) #1\0");
        let p = dir.join("vmlinux");
        fs::write(&p, b).expect("write");
        p
    }

    #[test]
    fn import_list_default_remove() {
        let root = tempfile::tempdir().expect("tmp");
        let src = tempfile::tempdir().expect("tmp");
        let s = KernelStore::open(root.path()).expect("open");
        let k = fake_kernel(src.path());
        let rec = s.import(&k, None, "fake").expect("import");
        assert_eq!((rec.version.as_str(), rec.format.as_str()), ("6.9.9-fake", "elf"));
        assert_eq!(s.default_name().expect("default").as_deref(), Some("fake"));
        assert!(matches!(s.import(&k, None, "fake"), Err(KernelError::Exists(_))));
        assert_eq!(s.list().expect("list").len(), 1);
        let init = src.path().join("init");
        fs::write(&init, b"binary").expect("write");
        let img = s.initramfs("fake", &init).expect("initramfs");
        assert!(img.exists());
        s.remove("fake").expect("rm");
        assert!(s.list().expect("list").is_empty());
        assert_eq!(s.default_name().expect("default"), None);
    }

    #[test]
    fn not_a_kernel_is_named() {
        let root = tempfile::tempdir().expect("tmp");
        let s = KernelStore::open(root.path()).expect("open");
        let p = root.path().join("junk");
        fs::write(&p, b"junk").expect("write");
        let e = s.import(&p, None, "x").expect_err("junk");
        assert!(e.to_string().contains("neither an ELF vmlinux nor a bzImage"), "{e}");
        assert!(s.list().expect("list").is_empty());
    }
}
