//! A VMM's chroot of its own (Firecracker's jailer's, docs/adr/0016-firecracker-jailer.md, and
//! the one hearth makes for Cloud Hypervisor, docs/adr/0017-cloud-hypervisor-confined.md): what
//! goes in ([`Chroot::prepare`]), where hearth finds the VMM's files in it ([`host_path`]), how
//! it reaches them without following what the VMM may have put there ([`connect`],
//! [`open_nofollow`]), and its removal ([`remove`]).
//!
//! The chroot holds what the VMM opens after it drops privileges, each at a fixed name: the
//! kernel and initrd (hard links, or copies across filesystems; shared and read-only), the VM's
//! own disks (hard links, owned by the VM's uid), read-only volumes, the files it writes, its
//! sockets, and, for a dynamically linked VMM, its loader and libraries. No bind mounts:
//! removing the jail is removing a directory tree.
//!
//! A dynamically linked VMM (a distribution's or a source build's, against glibc) cannot even
//! be executed in an empty chroot, because its program interpreter and shared libraries are not
//! there. They are found natively from the binary's ELF headers (`PT_INTERP`, then `DT_NEEDED`
//! of it and of every library, resolved in the system's library directories, as the dynamic
//! loader would without a cache) and linked into the chroot at the same paths. A static binary
//! needs none.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use hearth_fs::elf::{u64_at, Elf, PT_DYNAMIC, PT_INTERP};

use crate::{LaunchSpec, VmmError, VolumeDisk};

/// The chroots a VM's VMM may run in, under the VM's directory: Firecracker's (its jailer's
/// `<base>/<exec name>/<id>/root`) and Cloud Hypervisor's. A VM has one VMM, so at most one.
const ROOTS: [&str; 2] = ["firecracker/jail/root", "cloud-hypervisor/jail/root"];

/// The chroot the VM's VMM runs (or ran) in, if it has one.
pub fn root_of(vm_dir: &Path) -> Option<PathBuf> {
    ROOTS
        .iter()
        .map(|r| vm_dir.join(r))
        .find(|r| std::fs::symlink_metadata(r).is_ok_and(|m| m.is_dir()))
}

/// Where hearth finds one of the VMM's files (its sockets): at its chroot's root when it has
/// one, else in the VM's directory.
pub fn host_path(vm_dir: &Path, name: &str) -> PathBuf {
    root_of(vm_dir).unwrap_or_else(|| vm_dir.to_owned()).join(name)
}

/// Descriptors a launch holds until its guest has started ([`crate::Launched::held`]).
pub type Held = Vec<std::sync::Arc<std::os::fd::OwnedFd>>;

/// A chroot to make for one VM's VMM.
#[derive(Debug, Clone)]
pub struct Chroot<'a> {
    pub root: PathBuf,
    /// The VMM's name, for errors.
    pub vmm: &'static str,
    /// The kernel's name at the chroot's root.
    pub kernel: &'static str,
    /// Empty files the VMM writes (its log, its metrics), made for its uid.
    pub files: &'a [&'a str],
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = path.to_owned();
    move |source| VmmError::Io { path, source }
}

impl Chroot<'_> {
    /// Makes the chroot for `spec` run as `(uid, gid)` by `binary` (whose loader and libraries
    /// it gets), where no chroot is left (the launch removes the last one first, and this one
    /// when anything fails); returns the spec as the VMM sees it from inside (every path at the
    /// chroot's root), and what the launch must hold until the guest has started.
    pub fn prepare(
        &self,
        spec: &LaunchSpec,
        binary: &Path,
        (uid, gid): (u32, u32),
    ) -> Result<(LaunchSpec, Held), VmmError> {
        let root = &self.root;
        std::fs::create_dir_all(root).map_err(io_at(root))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_at(root))?;
        let libs = runtime_files(binary).map_err(|m| VmmError::Control {
            api: self.vmm,
            message: format!("{m}; use a static {} from its releases", self.vmm),
        })?;
        for lib in libs {
            place(root, &lib).map_err(io_at(&lib))?;
        }
        let chown = |at: &Path| std::os::unix::fs::chown(at, Some(uid), Some(gid));
        // Shared, read-only inputs: linked when others may read them, else a copy of its own.
        let shared = |from: &Path, name: &str| -> Result<PathBuf, VmmError> {
            let at = root.join(name);
            let meta = std::fs::metadata(from).map_err(io_at(from))?;
            if meta.mode() & 0o004 == 0 || std::fs::hard_link(from, &at).is_err() {
                std::fs::copy(from, &at).map_err(io_at(from))?;
                chown(&at).map_err(io_at(&at))?;
            }
            Ok(Path::new("/").join(name))
        };
        // The VM's own disks: linked (writes must reach the VM's file) and handed to its uid; a
        // disk that is a block device (a thin pool's) gets a node of its own in the chroot.
        let own = |from: &Path, name: &str| -> Result<PathBuf, VmmError> {
            use std::os::unix::fs::FileTypeExt;
            let at = root.join(name);
            let meta = std::fs::metadata(from).map_err(io_at(from))?;
            if meta.file_type().is_block_device() {
                crate::sys::mknod_block(&at, 0o600, meta.rdev()).map_err(io_at(&at))?;
            } else {
                std::fs::hard_link(from, &at).map_err(io_at(from))?;
            }
            chown(&at).map_err(io_at(&at))?;
            Ok(Path::new("/").join(name))
        };
        let mut volumes = Vec::new();
        let mut held = Vec::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            // A share is its virtiofsd's, which serves it on a socket in the chroot.
            if v.share {
                volumes.push(v.clone());
                continue;
            }
            let name = format!("volume-{i}.img");
            let path = match (v.host, v.read_only) {
                (true, _) => {
                    let (_, hold) = host_disk(v, &root.join(&name), (uid, gid))?;
                    held.extend(hold);
                    Path::new("/").join(&name)
                }
                (false, true) => shared(&v.path, &name)?,
                (false, false) => own(&v.path, &name)?,
            };
            volumes.push(VolumeDisk { path, ..v.clone() });
        }
        for name in self.files {
            let at = root.join(name);
            std::fs::write(&at, b"").map_err(io_at(&at))?;
            chown(&at).map_err(io_at(&at))?;
        }
        let inside = LaunchSpec {
            vm_dir: "/".into(),
            kernel: shared(&spec.kernel, self.kernel)?,
            initrd: shared(&spec.initrd, "initrd")?,
            root_disk: own(&spec.root_disk, "disk.img")?,
            config_disk: own(&spec.config_disk, "config.img")?,
            volumes,
            ..spec.clone()
        };
        Ok((inside, held))
    }
}

/// A host volume in the chroot, `at`: a block device node of the VM's uid for the device, or
/// for a file, the node of a loop device attached to it, held open until the VMM has opened
/// it (the loop device goes when both are closed). The host's file or device itself is never
/// linked, copied or re-owned.
fn host_disk(
    v: &VolumeDisk,
    at: &Path,
    (uid, gid): (u32, u32),
) -> Result<(PathBuf, Option<std::sync::Arc<std::os::fd::OwnedFd>>), VmmError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(&v.path).map_err(io_at(&v.path))?;
    let (rdev, hold) = if meta.file_type().is_block_device() {
        (meta.rdev(), None)
    } else {
        let (dev, fd) = hearth_fs::loopdev::attach_held(&v.path, v.read_only)
            .map_err(|e| VmmError::Io { path: v.path.clone(), source: e })?;
        let rdev = std::fs::metadata(&dev).map_err(io_at(&dev))?.rdev();
        (rdev, Some(std::sync::Arc::new(std::os::fd::OwnedFd::from(fd))))
    };
    crate::sys::mknod_block(at, 0o600, rdev).map_err(io_at(at))?;
    std::os::unix::fs::chown(at, Some(uid), Some(gid)).map_err(io_at(at))?;
    Ok((at.to_owned(), hold))
}

/// Removes a jail (`dir`, with its chroot `root`), once its VMM is gone; the files named in
/// `keep` are moved beside the VM's other files first (moved, not read: they may be anything
/// the VMM put there), for the exit reason.
pub fn remove(vm_dir: &Path, dir: &Path, root: &Path, keep: &[&str]) {
    if std::fs::symlink_metadata(dir).is_err() {
        return;
    }
    for name in keep {
        let _ = std::fs::rename(root.join(name), vm_dir.join(name));
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a VMM's jail failed");
    }
}

/// `binary` as the file a chroot is made from (found on PATH when it has no slash); a missing
/// one is the VMM's spawn error, with `fix`.
pub fn binary_file(binary: &Path, fix: &'static str) -> Result<PathBuf, VmmError> {
    on_path(binary).ok_or_else(|| VmmError::Spawn {
        binary: binary.display().to_string(),
        fix,
        source: std::io::ErrorKind::NotFound.into(),
    })
}

/// Where the loader looks when it has no cache (glibc's trusted directories on a multiarch
/// distribution first).
const LIB_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
/// Bounds on what is read of one file and on how many libraries a binary may pull in.
const MAX_DYNAMIC: u64 = 64 << 10;
const MAX_STRTAB: u64 = 1 << 20;
const MAX_LIBS: usize = 64;

const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;

/// The program interpreter and every shared library `binary` needs, as the paths the loader
/// opens (which the chroot must have); empty for a static binary.
pub fn runtime_files(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let read = |p: &Path| {
        Elf::open(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .ok_or_else(|| format!("{} is not an ELF64 file hearth can read", p.display()))
    };
    let elf = read(binary)?;
    let Some(interp) = interpreter(&elf) else { return Ok(Vec::new()) };
    let mut files = vec![interp];
    let mut queue = needed(&elf);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = queue.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if seen.len() > MAX_LIBS {
            return Err(format!("{} needs more than {MAX_LIBS} libraries", binary.display()));
        }
        let lib = resolve(&name).ok_or_else(|| {
            format!("{} needs {name}, found in none of {}", binary.display(), LIB_DIRS.join(", "))
        })?;
        queue.extend(needed(&read(&lib)?));
        if !files.contains(&lib) {
            files.push(lib);
        }
    }
    Ok(files)
}

fn interpreter(elf: &Elf) -> Option<PathBuf> {
    let seg = elf.of_kind(PT_INTERP).next()?;
    let bytes = elf.contents(seg, 4096)?;
    let path = bytes.split(|&b| b == 0).next()?;
    (path.first() == Some(&b'/')).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(path)))
}

/// The `DT_NEEDED` names of the dynamic section (plain file names only: a name with a slash
/// is not searched for).
fn needed(elf: &Elf) -> Vec<String> {
    let Some(dynamic) = elf.of_kind(PT_DYNAMIC).next().and_then(|s| elf.contents(s, MAX_DYNAMIC))
    else {
        return Vec::new();
    };
    let entries: Vec<(u64, u64)> = dynamic
        .chunks_exact(16)
        .map_while(|e| Some((u64_at(e, 0)?, u64_at(e, 8)?)))
        .take_while(|(tag, _)| *tag != 0)
        .collect();
    let value = |tag| entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
    let (Some(strtab), Some(strsz)) = (value(DT_STRTAB), value(DT_STRSZ)) else {
        return Vec::new();
    };
    let Some(strings) = elf.offset_of(strtab).and_then(|at| elf.read(at, strsz, MAX_STRTAB)) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter(|(t, _)| *t == DT_NEEDED)
        .filter_map(|(_, at)| {
            let s = strings.get(usize::try_from(*at).ok()?..)?;
            let name = std::str::from_utf8(s.split(|&b| b == 0).next()?).ok()?;
            (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
        })
        .collect()
}

fn resolve(name: &str) -> Option<PathBuf> {
    LIB_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// `binary` as a path: as it is when it has a slash, else the first match on PATH (as exec
/// would find it).
pub fn on_path(binary: &Path) -> Option<PathBuf> {
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return Some(binary.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(binary)).find(|p| p.is_file())
}

/// Puts `file` at the same absolute path under `root`: a hard link where both are on one
/// filesystem, else a copy (the target's own content, links resolved). Its directories are
/// made as real directories (a host's `/lib64 -> usr/lib64` is not reproduced).
pub fn place(root: &Path, file: &Path) -> std::io::Result<PathBuf> {
    let rel = file.strip_prefix("/").unwrap_or(file);
    let at = root.join(rel);
    // Directories the VMM may pass through but not change (whatever hearthd's umask).
    std::fs::create_dir_all(root)?;
    let mut dir = root.to_owned();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        dir.push(part);
        if std::fs::symlink_metadata(&dir).is_err() {
            std::fs::create_dir(&dir)?;
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let real = std::fs::canonicalize(file)?;
    let _ = std::fs::remove_file(&at);
    if std::fs::hard_link(&real, &at).is_err() {
        std::fs::copy(&real, &at)?;
        std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    Ok(at)
}

/// Opens `path` for reading without following a symbolic link in its last component: a file in
/// a jail (the VMM's log) is the VMM's to replace, with a link to anything on the host.
pub fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Connects to the Unix socket at `path` only if it is one, never through a symbolic link in
/// its last component (a jailed VMM owns its chroot and could put a link to another service's
/// socket in its API socket's place). The socket is reached through its `O_PATH` descriptor,
/// which also lifts the 108-byte limit on socket paths.
pub fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_needs_its_loader_and_libraries_and_a_static_one_none() {
        // This test's own binary is linked against the host's glibc.
        let me = std::env::current_exe().expect("exe");
        let files = runtime_files(&me).expect("deps");
        assert!(
            files[0].to_string_lossy().contains("ld-linux"),
            "the loader comes first: {files:?}"
        );
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        assert!(files.iter().all(|f| f.is_absolute() && f.is_file()), "{files:?}");
        let dir = tempfile::tempdir().expect("tmp");
        let not_elf = dir.path().join("script");
        std::fs::write(&not_elf, "#!/bin/sh\n").expect("write");
        assert!(runtime_files(&not_elf).is_err_and(|e| e.contains("not an ELF64")));
    }

    #[test]
    fn sockets_are_reached_only_as_themselves_and_files_never_through_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(connect(&sock).is_ok());
        drop(listener.accept().expect("accepted"));
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).expect("symlink");
        assert!(connect(&link).is_err(), "a link to another socket is refused");
        let plain = dir.path().join("file");
        std::fs::write(&plain, b"x").expect("write");
        assert!(connect(&plain).is_err_and(|e| e.to_string().contains("not a socket")));
        let to_file = dir.path().join("log");
        std::os::unix::fs::symlink(&plain, &to_file).expect("symlink");
        assert!(open_nofollow(&to_file).is_err() && open_nofollow(&plain).is_ok());
    }

    #[test]
    fn a_truncated_binary_is_read_without_panic_or_a_large_allocation() {
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let dir = tempfile::tempdir().expect("tmp");
        for cut in [16, 64, 200, 4096, me.len() / 2] {
            let p = dir.path().join(format!("cut{cut}"));
            std::fs::write(&p, &me[..cut]).expect("write");
            let _ = runtime_files(&p);
        }
    }

    #[test]
    fn placed_files_keep_their_path_under_the_root_and_their_content() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("lib/libx.so");
        std::fs::create_dir_all(src.parent().expect("dir")).expect("mkdir");
        std::fs::write(&src, b"x").expect("write");
        let link = dir.path().join("alias.so");
        std::os::unix::fs::symlink(&src, &link).expect("symlink");
        let root = dir.path().join("root");
        let at = place(&root, &link).expect("place");
        assert_eq!(at, root.join(link.strip_prefix("/").expect("abs")));
        assert!(!at.is_symlink());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(at.parent().expect("dir")).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "passable by the VMM's uid whatever the umask");
        assert_eq!(std::fs::read(&at).expect("read"), b"x");
    }
}
