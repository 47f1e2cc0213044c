//! Firecracker under its jailer (docs/adr/0016-firecracker-jailer.md): a chroot per VM at
//! `VM_DIR/firecracker/jail/root` (the jailer's `<base>/<exec name>/<id>/root` with the VM's
//! directory as the base), the VM's unprivileged uid and gid, a PID namespace of its own, and
//! hearth's cgroup for the VM, which the jailer joins before it executes.
//!
//! The chroot is made as [`crate::jail`] makes every VMM's, with Firecracker's log and metrics
//! files; the jailer adds the device nodes. Everything in the chroot is the VMM's to change, so
//! hearth reaches its sockets and log without following links (`crate::jail::connect`,
//! `crate::jail::open_nofollow`).

use std::path::{Path, PathBuf};

pub use crate::jail::host_path;
use crate::{LaunchSpec, VmmError};

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

/// Makes the chroot for `spec` run as `ids` by `binary`; returns the spec as Firecracker sees
/// it from inside, and what to hold until its guest has started.
pub fn prepare(
    spec: &LaunchSpec,
    binary: &Path,
    ids: (u32, u32),
) -> Result<(LaunchSpec, crate::jail::Held), VmmError> {
    let chroot = crate::jail::Chroot {
        root: root(&spec.vm_dir),
        vmm: "Firecracker",
        kernel: "vmlinux",
        files: &[super::LOG, super::METRICS],
    };
    chroot.prepare(spec, binary, ids)
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

/// Removes the jail, once its VMM is gone, keeping its log for the exit reason.
pub fn remove(vm_dir: &Path) {
    crate::jail::remove(vm_dir, &dir(vm_dir), &root(vm_dir), &[super::LOG]);
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

        assert_eq!(crate::jail::root_of(vm), Some(root.clone()));
        let api = crate::http::Api::firecracker(&host_path(vm, super::super::API_SOCK));
        assert!(api.get("/").is_err(), "another service's socket is never spoken to");
        remove(vm);
        assert!(!dir(vm).exists(), "the jail is removed");
        let fc = super::super::Firecracker::default();
        assert_eq!(fc.exit_reason(vm), None, "the planted log is not read");
        assert!(secret.exists(), "what the link named is left alone");
    }
}
