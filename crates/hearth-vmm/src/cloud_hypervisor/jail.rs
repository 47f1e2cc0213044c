//! Cloud Hypervisor confined by hearth (docs/adr/0017-cloud-hypervisor-confined.md): it has no
//! jailer, so hearth makes the chroot itself at `VM_DIR/cloud-hypervisor/jail/root` the way
//! [`crate::jail`] makes every VMM's, adds the binary and the three device nodes it opens
//! (`/dev/kvm`, `/dev/net/tun`, `/dev/urandom`, owned by the VM's uid, so the host's own nodes
//! can stay root's), and starts it there as the VM's uid and gid with no capabilities
//! ([`crate::sys::chroot_and_drop`]), its seccomp filter on, in hearth's cgroup for the VM. The
//! tap is the VM's uid's already (hearth-net makes it with that owner), which is all Cloud
//! Hypervisor needs to open it by name.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{LaunchSpec, VmmError};

/// The binary's name at the chroot's root.
pub const BINARY: &str = "/cloud-hypervisor";

/// Device nodes Cloud Hypervisor opens: (path in the chroot, major, minor).
const DEVICES: [(&str, u32, u32); 3] =
    [("dev/kvm", 10, 232), ("dev/net/tun", 10, 200), ("dev/urandom", 1, 9)];

/// The jail's directory (removed whole) and its chroot.
pub fn dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("cloud-hypervisor")
}
pub fn root(vm_dir: &Path) -> PathBuf {
    dir(vm_dir).join("jail").join("root")
}

/// Makes the chroot for `spec` to run `binary` as `ids`; returns the spec as Cloud Hypervisor
/// sees it from inside, and what to hold until its guest has started.
pub fn prepare(
    spec: &LaunchSpec,
    binary: &Path,
    (uid, gid): (u32, u32),
) -> Result<(LaunchSpec, crate::jail::Held), VmmError> {
    let root = root(&spec.vm_dir);
    let chroot = crate::jail::Chroot {
        root: root.clone(),
        vmm: "Cloud Hypervisor",
        kernel: "kernel",
        files: &[],
    };
    let (inside, held) = chroot.prepare(spec, binary, (uid, gid))?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { path, source }
    };
    let at = root.join(BINARY.trim_start_matches('/'));
    let real = std::fs::canonicalize(binary).map_err(io(binary))?;
    if std::fs::hard_link(&real, &at).is_err() {
        std::fs::copy(&real, &at).map_err(io(&real))?;
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).map_err(io(&at))?;
    }
    for (name, major, minor) in DEVICES {
        let node = root.join(name);
        let parent = node.parent().unwrap_or(&root);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(io(parent))?;
        crate::sys::mknod_char(&node, 0o600, major, minor).map_err(io(&node))?;
        std::os::unix::fs::chown(&node, Some(uid), Some(gid)).map_err(io(&node))?;
    }
    // Its root is where it makes its sockets.
    std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(io(&root))?;
    Ok((inside, held))
}

/// Removes the jail, once its VMM is gone (its log is outside: its standard error).
pub fn remove(vm_dir: &Path) {
    crate::jail::remove(vm_dir, &dir(vm_dir), &root(vm_dir), &[]);
}
