//! hearth's kernel store.
//!
//! Kernels are imported from a file (bzImage or ELF vmlinux) with an optional modules tree, or
//! from an unpacked Ignite-style kernel image (`/boot/vmlinux`, `/lib/modules`). Per kernel,
//! hearth builds an initramfs holding hearth-init and the closure of the modules the guest needs,
//! so a distro kernel with virtio as modules boots like one with everything built in.
#![forbid(unsafe_code)]

pub mod cpio;
pub mod initramfs;
pub mod initrd;
pub mod kmod;
pub mod modules;
pub mod pvh;
pub mod version;
pub mod vmlinux;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_types::{Digest, KernelRecord};
use sha2::{Digest as _, Sha256};

pub use initramfs::InitramfsError;
pub use modules::{ModuleError, GUEST_MODULES};
pub use version::{Format, VersionError};

/// Why a kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("invalid kernel name {0:?}: use letters, digits, '.', '_' and '-' (at most 63, starting alphanumeric), or an image reference (like weaveworks/ignite-kernel:5.10.51)")]
    Name(String),
    #[error("a kernel named {0} already exists: remove it with `hearth kernel rm {0}` first")]
    Exists(String),
    #[error("no kernel named {0} (see `hearth kernel ls`)")]
    NotFound(String),
    #[error(
        "no modules for kernel {version} under {dir}: pass its lib/modules/{version} directory"
    )]
    NoModules { version: String, dir: PathBuf },
    #[error("the modules under {dir} are for kernel {found}, not {version}: pass the matching lib/modules directory")]
    WrongModules { dir: PathBuf, found: String, version: String },
    #[error("the kernel image has no file {file} (links are followed inside the image only)")]
    NoKernelFile { file: String },
    #[error("the initrd image has no file {file} (links are followed inside the image only)")]
    NoInitrdFile { file: String },
    #[error("initrd {file} is {bytes} bytes; at most 1 GiB is taken")]
    InitrdTooLarge { file: String, bytes: u64 },
    #[error("no stored initrd {digest}: its image is pulled again by the next attempt")]
    NoInitrd { digest: String },
    #[error("{dir} holds no kernel: expected /boot/vmlinux, /boot/vmlinuz* or /boot/bzImage")]
    NoKernelInImage { dir: PathBuf },
    #[error("kernel record {0} is corrupt: remove the kernel with `hearth kernel rm` and import it again")]
    Corrupt(PathBuf),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("kernel {name}: {source}")]
    Vmlinux {
        name: String,
        #[source]
        source: vmlinux::VmlinuxError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io { path: path.to_owned(), source }
}

/// The kernels of one hearth root (`ROOT/kernels`; see docs/layout.md).
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KernelError> {
    hearth_fs::atomic_write(path, bytes).map_err(io_err(path))
}

/// Hard-links `src` to `dst`, copying when the link cannot be made (other filesystem).
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), KernelError> {
    if fs::hard_link(src, dst).is_err() {
        fs::copy(src, dst).map_err(io_err(dst))?;
    }
    Ok(())
}

/// Where a tree being imported comes from: the host (a path the user gave) or an unpacked image,
/// whose links must resolve inside the image and never reach the host.
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    Host,
    Image(&'a Path),
}

impl Origin<'_> {
    /// What a symbolic link in the tree names: on the host, whatever the link names; in an
    /// image, the file it names inside the image (`None` when that is outside or missing).
    fn follow(&self, link: &Path) -> Option<PathBuf> {
        match self {
            Origin::Host => fs::canonicalize(link).ok(),
            Origin::Image(root) => {
                hearth_fs::resolve_in_root(root, link.strip_prefix(root).ok()?).ok()
            }
        }
    }
}

/// Copies a tree (hard-linking files where possible); returns how many modules it holds. The
/// copy holds no symbolic links: a link to a regular file becomes a copy of the file it names
/// (see [`Origin::follow`]); other links (Debian's build/source, links to directories) are
/// left out. So nothing read from the store later can lead anywhere else.
fn link_tree(src: &Path, dst: &Path, origin: Origin<'_>) -> Result<usize, KernelError> {
    fs::create_dir_all(dst).map_err(io_err(dst))?;
    let mut count = 0;
    for e in fs::read_dir(src).map_err(io_err(src))? {
        let e = e.map_err(io_err(src))?;
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().map_err(io_err(&s))?;
        let file = if ft.is_dir() {
            count += link_tree(&s, &d, origin)?;
            continue;
        } else if ft.is_file() {
            s.clone()
        } else if ft.is_symlink() {
            match origin.follow(&s).filter(|t| fs::symlink_metadata(t).is_ok_and(|m| m.is_file())) {
                Some(target) => target,
                None => continue,
            }
        } else {
            continue;
        };
        link_or_copy(&file, &d)?;
        if modules::module_name(&s).is_some() {
            count += 1;
        }
    }
    Ok(count)
}

/// The kernel's file in the store: a hard link when others may read it (never changing the
/// mode of a file that is also the user's), else a copy of its own, readable by all (0644:
/// the store is inside the private state directory, and a VMM's jail can then link it rather
/// than copy it).
fn shared_copy(src: &Path, dst: &Path) -> Result<(), KernelError> {
    use std::os::unix::fs::PermissionsExt;
    let readable = fs::metadata(src).map_err(io_err(src))?.permissions().mode() & 0o004 != 0;
    if !(readable && fs::hard_link(src, dst).is_ok()) {
        fs::copy(src, dst).map_err(io_err(dst))?;
        fs::set_permissions(dst, readable_by_all()).map_err(io_err(dst))?;
    }
    Ok(())
}

/// 0644, for what the store shares with VMMs' jails (kernels, their vmlinux, initramfs images).
fn readable_by_all() -> fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o644)
}

/// What the VMMs need to know of how the kernel at `path` boots: a bzImage's payload
/// compression, an ELF's PVH note.
fn boot_facts(path: &Path, format: Format) -> Result<(Option<String>, Option<bool>), KernelError> {
    match format {
        Format::Elf => pvh::has_pvh_note(path).map(|p| (None, Some(p))).map_err(io_err(path)),
        Format::BzImage => {
            let bytes = fs::read(path).map_err(io_err(path))?;
            Ok((vmlinux::compression(&bytes).map(|m| m.as_str().to_owned()), None))
        }
    }
}

/// Whether `name` is a kernel name as the store keeps it: plain, or a reference in its familiar
/// form ([`hearth_types::kernel_name`]).
fn is_name(name: &str) -> bool {
    hearth_types::kernel_name(name).is_ok_and(|n| n == name)
}

fn sha256_file(path: &Path) -> Result<String, KernelError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(hex::encode(h.finalize()))
}

impl KernelStore {
    /// Opens (creating) `ROOT/kernels`.
    pub fn open(root: &Path) -> Result<Self, KernelError> {
        let dir = root.join("kernels");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir })
    }

    /// A kernel's directory: its name, or for a kernel named by an image reference (which has
    /// slashes and colons) a readable slug of it and a digest of the whole, so two references
    /// never share one.
    fn kdir(&self, name: &str) -> PathBuf {
        if !hearth_types::kernel::is_reference(name) {
            return self.dir.join(name);
        }
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let digest = hex::encode(Sha256::digest(name.as_bytes()));
        self.dir.join(format!("ref-{}-{}", slug.trim_matches('-'), &digest[..16]))
    }

    /// The kernel file of a stored kernel.
    pub fn kernel_path(&self, name: &str) -> PathBuf {
        self.kdir(name).join("kernel")
    }

    /// Imports `kernel` (bzImage or ELF vmlinux) and its modules under `name`. `modules` may be
    /// a `lib/modules/<version>` directory, a directory of versions, or a root holding
    /// `lib/modules/<version>`; the version matching the kernel is picked. The first kernel
    /// imported becomes the default.
    pub fn import(
        &self,
        kernel: &Path,
        modules: Option<&Path>,
        name: &str,
    ) -> Result<KernelRecord, KernelError> {
        self.import_from(kernel, modules, name, Origin::Host)
    }

    fn import_from(
        &self,
        kernel: &Path,
        modules: Option<&Path>,
        name: &str,
        origin: Origin<'_>,
    ) -> Result<KernelRecord, KernelError> {
        if !is_name(name) {
            return Err(KernelError::Name(name.to_owned()));
        }
        let (format, ver) = version::read(kernel)?;
        let mod_tree = modules.map(|m| find_module_tree(m, &ver, origin)).transpose()?;
        let dir = self.kdir(name);
        if dir.join("record.json").exists() {
            return Err(KernelError::Exists(name.to_owned()));
        }
        let staging = self.dir.join(format!(".{name}.{}.importing", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        let result: Result<KernelRecord, KernelError> = (|| {
            fs::create_dir_all(&staging).map_err(io_err(&staging))?;
            let stored = staging.join("kernel");
            shared_copy(kernel, &stored)?;
            let id = sha256_file(&stored)?;
            let (compression, pvh) = boot_facts(&stored, format)?;
            let count = match &mod_tree {
                Some(t) => link_tree(t, &staging.join("modules").join(&ver), origin)?,
                None => 0,
            };
            let rec = KernelRecord {
                name: name.to_owned(),
                id: Digest::from_hex(&id).map_err(|_| KernelError::Corrupt(kernel.to_owned()))?,
                version: ver.clone(),
                format: format.as_str().to_owned(),
                compression,
                pvh,
                modules: count,
                created_at: now(),
            };
            let json = serde_json::to_vec_pretty(&rec)
                .map_err(|_| KernelError::Corrupt(staging.clone()))?;
            write_atomic(&staging.join("record.json"), &json)?;
            // A directory left by an interrupted removal has no record; replace it.
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

    /// Imports from an unpacked Ignite-style kernel image: `/boot/vmlinux` (or `/boot/bzImage`,
    /// `/boot/vmlinuz*`) and `/lib/modules`. Every path is resolved inside `dir` as the guest
    /// would resolve it (hearth_fs::resolve_in_root): a link in the image never reaches the host.
    pub fn import_rootfs(&self, dir: &Path, name: &str) -> Result<KernelRecord, KernelError> {
        let inside = |p: &str| hearth_fs::resolve_in_root(dir, Path::new(p)).ok();
        let mut candidates: Vec<String> =
            ["vmlinux", "bzImage", "vmlinuz"].iter().map(|n| format!("boot/{n}")).collect();
        if let Some(Ok(rd)) = inside("boot").map(fs::read_dir) {
            let mut more: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmlinu"))
                .map(|n| format!("boot/{n}"))
                .collect();
            more.sort();
            candidates.extend(more);
        }
        let kernel = candidates
            .iter()
            .filter_map(|c| inside(c))
            .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| KernelError::NoKernelInImage { dir: dir.to_owned() })?;
        let modules =
            inside("lib/modules").filter(|m| fs::symlink_metadata(m).is_ok_and(|m| m.is_dir()));
        self.import_from(&kernel, modules.as_deref(), name, Origin::Image(dir))
    }

    /// Imports the kernel file at `file` inside an unpacked image (Flintlock's `kernel.filename`),
    /// with the image's `/lib/modules` when it has one; resolved as [`Self::import_rootfs`] does.
    pub fn import_image_file(
        &self,
        dir: &Path,
        file: &str,
        name: &str,
    ) -> Result<KernelRecord, KernelError> {
        let kernel = hearth_fs::resolve_in_root(dir, Path::new(file))
            .ok()
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| KernelError::NoKernelFile { file: file.to_owned() })?;
        let modules = hearth_fs::resolve_in_root(dir, Path::new("lib/modules"))
            .ok()
            .filter(|m| fs::symlink_metadata(m).is_ok_and(|m| m.is_dir()));
        self.import_from(&kernel, modules.as_deref(), name, Origin::Image(dir))
    }

    /// Clears what a crash left: import staging (`.NAME.PID.importing`), temporary files, and
    /// kernel directories without a record (an interrupted removal). Only for a daemon start,
    /// when nothing else uses the store. Returns the paths removed.
    pub fn sweep(&self) -> Result<Vec<PathBuf>, KernelError> {
        let mut removed = Vec::new();
        let mut remove = |p: PathBuf, dir: bool| -> Result<(), KernelError> {
            if dir { fs::remove_dir_all(&p) } else { fs::remove_file(&p) }.map_err(io_err(&p))?;
            removed.push(p);
            Ok(())
        };
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            let is_dir = e.file_type().map_err(io_err(&p))?.is_dir();
            if name == initrd::INITRDS {
                // Initrds are kept (or swept) with the VMs that use them.
                continue;
            }
            if name.ends_with(".tmp") || name.ends_with(".importing") {
                remove(p, is_dir)?;
            } else if is_dir && !p.join("record.json").exists() {
                remove(p, true)?;
            } else if is_dir {
                for f in fs::read_dir(&p).map_err(io_err(&p))? {
                    let f = f.map_err(io_err(&p))?;
                    if f.file_name().to_string_lossy().ends_with(".tmp") {
                        remove(f.path(), false)?;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// The record of one kernel, `None` when there is no such kernel.
    pub fn get(&self, name: &str) -> Result<Option<KernelRecord>, KernelError> {
        if !is_name(name) {
            return Ok(None);
        }
        let p = self.kdir(name).join("record.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|_| KernelError::Corrupt(p)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KernelError::Io { path: p, source }),
        }
    }

    /// Every stored kernel, by name.
    pub fn list(&self) -> Result<Vec<KernelRecord>, KernelError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
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

    /// Removes a kernel (and its initramfs images); clears the default if it was the default.
    pub fn remove(&self, name: &str) -> Result<KernelRecord, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        let dir = self.kdir(name);
        // The record goes first, so an interrupted removal leaves no half kernel behind.
        let record = dir.join("record.json");
        fs::remove_file(&record).map_err(io_err(&record))?;
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        if self.default_name()?.as_deref() == Some(name) {
            let p = self.dir.join(".default");
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
        Ok(rec)
    }

    /// Makes `name` the kernel VMs get when they name none.
    pub fn set_default(&self, name: &str) -> Result<(), KernelError> {
        if self.get(name)?.is_none() {
            return Err(KernelError::NotFound(name.to_owned()));
        }
        write_atomic(&self.dir.join(".default"), name.as_bytes())
    }

    /// The default kernel's name, if one is set.
    pub fn default_name(&self) -> Result<Option<String>, KernelError> {
        let p = self.dir.join(".default");
        match fs::read_to_string(&p) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KernelError::Io { path: p, source }),
        }
    }

    /// The kernel as an ELF vmlinux, for VMMs that boot only ELF: the imported file when it is
    /// one, else the vmlinux inside the bzImage, taken out once and cached as
    /// `ROOT/kernels/<name>/vmlinux`.
    pub fn vmlinux(&self, name: &str) -> Result<PathBuf, KernelError> {
        self.vmlinux_of(name)
    }

    /// Whether the imported kernel `name` is an ELF vmlinux, and if so whether it has a PVH
    /// note: `None` for a bzImage, `Some(pvh)` for an ELF (read from its headers).
    pub fn elf_pvh(&self, name: &str) -> Result<Option<bool>, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        if rec.format != Format::Elf.as_str() {
            return Ok(None);
        }
        if rec.pvh.is_some() {
            return Ok(rec.pvh);
        }
        let kernel = self.kernel_path(name);
        pvh::has_pvh_note(&kernel).map(Some).map_err(io_err(&kernel))
    }

    fn vmlinux_of(&self, name: &str) -> Result<PathBuf, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        let kernel = self.kernel_path(name);
        if rec.format == Format::Elf.as_str() {
            return Ok(kernel);
        }
        let out = self.kdir(name).join("vmlinux");
        if out.is_file() {
            return Ok(out);
        }
        let bytes = fs::read(&kernel).map_err(io_err(&kernel))?;
        let elf = vmlinux::from_bzimage(&bytes)
            .map_err(|source| KernelError::Vmlinux { name: name.to_owned(), source })?;
        write_atomic(&out, &elf)?;
        fs::set_permissions(&out, readable_by_all()).map_err(io_err(&out))?;
        Ok(out)
    }

    /// The initramfs for `name` with `init_binary` as /init: built once per (kernel id, init
    /// binary) pair, written atomically, cached as `ROOT/kernels/<name>/initramfs-<hash>.img`.
    pub fn initramfs(&self, name: &str, init_binary: &Path) -> Result<PathBuf, KernelError> {
        let rec = self.get(name)?.ok_or_else(|| KernelError::NotFound(name.to_owned()))?;
        let init = fs::read(init_binary).map_err(io_err(init_binary))?;
        let mut h = Sha256::new();
        h.update(rec.id.hex().as_bytes());
        h.update([0]);
        h.update(&init);
        // The modules it carries: a hearth that wants others builds another.
        h.update(GUEST_MODULES.join(",").as_bytes());
        let hash = hex::encode(h.finalize());
        let out = self.kdir(name).join(format!("initramfs-{}.img", &hash[..16]));
        if out.is_file() {
            return Ok(out);
        }
        let tree = self.kdir(name).join("modules").join(&rec.version);
        let tree = tree.is_dir().then_some(tree.as_path());
        let tmp = hearth_fs::temp_beside(&out);
        let res = (|| {
            let f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let w = initramfs::write(
                io::BufWriter::new(&f),
                &tmp,
                &init,
                &rec.version,
                tree,
                GUEST_MODULES,
            )?;
            drop(w);
            f.sync_all().map_err(io_err(&tmp))?;
            fs::set_permissions(&tmp, readable_by_all()).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &out).map_err(io_err(&out))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res?;
        // Images built for other hearth-init binaries are obsolete (temporaries of concurrent
        // builds start with a dot and are left alone).
        if let Ok(rd) = fs::read_dir(self.kdir(name)) {
            for e in rd.flatten() {
                let p = e.path();
                let stale = p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("initramfs-") && n.ends_with(".img")
                });
                if stale && p != out {
                    let _ = fs::remove_file(p);
                }
            }
        }
        Ok(out)
    }
}

/// Accepts `lib/modules/<ver>`, a directory holding `<ver>`, or a root holding
/// `lib/modules/<ver>`, and checks a directory given directly against the modules' vermagic.
fn find_module_tree(dir: &Path, version: &str, origin: Origin<'_>) -> Result<PathBuf, KernelError> {
    for c in [dir.join(version), dir.join("lib/modules").join(version)] {
        let real = match origin {
            Origin::Host => Some(c),
            Origin::Image(root) => {
                c.strip_prefix(root).ok().and_then(|rel| hearth_fs::resolve_in_root(root, rel).ok())
            }
        };
        if let Some(real) = real.filter(|r| r.is_dir()) {
            return Ok(real);
        }
    }
    let idx = modules::index(dir)?;
    let Some(sample) = idx.values().next() else {
        return Err(KernelError::NoModules { version: version.to_owned(), dir: dir.to_owned() });
    };
    if dir.file_name().is_some_and(|n| n == version) {
        return Ok(dir.to_owned());
    }
    let bytes = modules::read_module(&dir.join(sample))?;
    match modules::vermagic(&bytes, &sample.display().to_string())? {
        Some(found) if found != version => Err(KernelError::WrongModules {
            dir: dir.to_owned(),
            found,
            version: version.to_owned(),
        }),
        _ => Ok(dir.to_owned()),
    }
}

#[cfg(test)]
mod tests;
