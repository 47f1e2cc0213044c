//! Firecracker under its jailer (docs/adr/0016-firecracker-jailer.md): a chroot per VM at
//! `VM_DIR/firecracker/jail/root` (the jailer's `<base>/<exec name>/<id>/root` with the VM's
//! directory as the base), the VM's unprivileged uid and gid, a PID namespace of its own, and
//! hearth's cgroup for the VM, which the jailer joins before it executes.
//!
//! The chroot holds what Firecracker opens after it drops privileges, each at a fixed name:
//! the kernel and initrd (hard links, or copies across filesystems; shared and read-only), the
//! VM's own disks (hard links, owned by the VM's uid), read-only volumes, its log and metrics
//! files, its API and agent sockets, and, for a dynamically linked Firecracker, its loader and
//! libraries. No bind mounts: removing the jail is removing a directory tree. Everything in
//! the chroot is the VMM's to change, so hearth reaches its sockets and log without following
//! links (`crate::jail::connect`, `crate::jail::open_nofollow`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{LaunchSpec, VmmError, VolumeDisk};

/// The jail's id, the middle of its path (the VM's directory already names the VM).
pub const ID: &str = "jail";
/// The jailer's record of the VMM's pid in its PID namespace's parent (ours).
pub const JAILER_PID: &str = "firecracker.pid";

/// The jail's directory (removed whole) and its chroot.
pub fn dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("firecracker")
}
pub fn root(vm_dir: &Path) -> PathBuf {
    dir(vm_dir).join(ID).join("root")
}

/// Whether the VM's Firecracker runs (or ran) jailed.
pub fn is_jailed(vm_dir: &Path) -> bool {
    std::fs::symlink_metadata(root(vm_dir)).is_ok_and(|m| m.is_dir())
}

/// Where hearth finds one of Firecracker's files: in the chroot when jailed.
pub fn host_path(vm_dir: &Path, name: &str) -> PathBuf {
    if is_jailed(vm_dir) {
        root(vm_dir).join(name)
    } else {
        vm_dir.join(name)
    }
}

/// Makes the chroot for `spec` run as `(uid, gid)` by `binary`, where no jail is left (the
/// launch removes the last one first, and this one when anything fails); returns the spec as
/// Firecracker sees it from inside (every path at the chroot's root).
pub fn prepare(
    spec: &LaunchSpec,
    binary: &Path,
    (uid, gid): (u32, u32),
) -> Result<LaunchSpec, VmmError> {
    let root = root(&spec.vm_dir);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { path, source }
    };
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).map_err(io(&root))?;
    let libs = crate::jail::runtime_files(binary).map_err(|m| VmmError::Control {
        api: "jailer",
        message: format!("{m}; use a static Firecracker from its releases"),
    })?;
    for lib in libs {
        crate::jail::place(&root, &lib).map_err(io(&lib))?;
    }
    // Shared, read-only inputs: linked when others may read them, else a copy of its own.
    let shared = |from: &Path, name: &str| -> Result<PathBuf, VmmError> {
        let at = root.join(name);
        let meta = std::fs::metadata(from).map_err(io(from))?;
        if meta.mode() & 0o004 == 0 || std::fs::hard_link(from, &at).is_err() {
            std::fs::copy(from, &at).map_err(io(from))?;
            std::os::unix::fs::chown(&at, Some(uid), Some(gid)).map_err(io(&at))?;
        }
        Ok(Path::new("/").join(name))
    };
    // The VM's own disks: linked (writes must reach the VM's file) and handed to its uid.
    let own = |from: &Path, name: &str| -> Result<PathBuf, VmmError> {
        let at = root.join(name);
        std::fs::hard_link(from, &at).map_err(io(from))?;
        std::os::unix::fs::chown(&at, Some(uid), Some(gid)).map_err(io(&at))?;
        Ok(Path::new("/").join(name))
    };
    let mut volumes = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let name = format!("volume-{i}.img");
        let path = if v.read_only { shared(&v.path, &name)? } else { own(&v.path, &name)? };
        volumes.push(VolumeDisk { path, ..v.clone() });
    }
    for name in [super::LOG, super::METRICS] {
        let at = root.join(name);
        std::fs::write(&at, b"").map_err(io(&at))?;
        std::os::unix::fs::chown(&at, Some(uid), Some(gid)).map_err(io(&at))?;
    }
    Ok(LaunchSpec {
        vm_dir: "/".into(),
        kernel: shared(&spec.kernel, "vmlinux")?,
        initrd: shared(&spec.initrd, "initrd")?,
        root_disk: own(&spec.root_disk, "disk.img")?,
        config_disk: own(&spec.config_disk, "config.img")?,
        volumes,
        ..spec.clone()
    })
}

/// The binary the jailer is given: it names the chroot after the file (`<base>/<name>/<id>`), so
/// one named otherwise is linked (or copied) as `firecracker` into the jail's directory first.
pub fn exec_file(vm_dir: &Path, binary: &Path) -> Result<PathBuf, VmmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { path, source }
    };
    let real = std::fs::canonicalize(binary).map_err(io(binary))?;
    if real.file_name() == Some("firecracker".as_ref()) {
        return Ok(real);
    }
    let at = dir(vm_dir).join("firecracker");
    let _ = std::fs::remove_file(&at);
    if std::fs::hard_link(&real, &at).is_err() {
        std::fs::copy(&real, &at).map_err(io(&real))?;
    }
    Ok(at)
}

/// The pid the jailer wrote for the VMM it forked into its PID namespace (read without
/// following links, at most a few bytes).
pub fn forked_pid(vm_dir: &Path) -> Option<i32> {
    use std::io::Read;
    let mut text = String::new();
    crate::jail::open_nofollow(&root(vm_dir).join(JAILER_PID))
        .ok()?
        .take(32)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok().filter(|&p| p > 1)
}

/// Removes the jail, once its VMM is gone; its log is kept beside the VM's other files first
/// (moved, not read: it may be anything the VMM put there), for the exit reason.
pub fn remove(vm_dir: &Path) {
    let dir = dir(vm_dir);
    if std::fs::symlink_metadata(&dir).is_err() {
        return;
    }
    let _ = std::fs::rename(root(vm_dir).join(super::LOG), vm_dir.join(super::LOG));
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a Firecracker jail failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_core::ports::Vmm;

    /// A VMM that escaped into its jail owns it: it can put links where hearth looks for its
    /// socket and log. hearth neither talks to what they point at nor reads it for the reason.
    #[test]
    fn links_a_jailed_vmm_plants_are_never_followed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let vm = tmp.path();
        let root = root(vm);
        std::fs::create_dir_all(&root).expect("jail");
        let secret = vm.join("secret");
        std::fs::write(&secret, "[x:ERROR] the host's secret\n").expect("secret");
        std::os::unix::fs::symlink(&secret, root.join(super::super::LOG)).expect("log link");
        let elsewhere = vm.join("other.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&elsewhere).expect("bind");
        std::os::unix::fs::symlink(&elsewhere, root.join(super::super::API_SOCK)).expect("link");

        assert!(is_jailed(vm));
        let api = crate::http::Api::firecracker(&host_path(vm, super::super::API_SOCK));
        assert!(api.get("/").is_err(), "another service's socket is never spoken to");
        remove(vm);
        assert!(!dir(vm).exists(), "the jail is removed");
        let fc = super::super::Firecracker::default();
        assert_eq!(fc.exit_reason(vm), None, "the planted log is not read");
        assert!(secret.exists(), "what the link named is left alone");
    }
}
