//! Finding a provider's VMM again, the same way for every provider: by the recorded pid and
//! start time while the process still names the VM, else from the VMM's own files, else (after
//! a predecessor died before the pid file) from /proc.

use std::path::{Path, PathBuf};

use hearth_core::ports::VmmHandle;

/// How one provider recognises its VMM: hearth's pid file in the VM's directory, and a flag
/// on the VMM's command line whose value is a file of that directory (QEMU's `-pidfile
/// VM_DIR/qemu.pid`, Firecracker's `--api-sock VM_DIR/firecracker.sock`).
#[derive(Debug, Clone, Copy)]
pub struct Finder {
    /// The pid file, in the VM's directory.
    pub pid_file: &'static str,
    /// The command-line flag that names the VM's directory.
    pub flag: &'static [u8],
    /// The file in the VM's directory that the flag's value names.
    pub named: &'static str,
    /// A jailed VMM's chroot for a VM directory, when this provider's VMM can be jailed: its
    /// flag then names the file at its own root (`/firecracker.sock`), and its root must be
    /// that directory.
    pub jail: Option<fn(&Path) -> PathBuf>,
}

impl Finder {
    /// The VMM its pid file names, as (pid, start time), if that process still names the VM.
    pub fn find_running(&self, vm_dir: &Path) -> Option<(i32, u64)> {
        let (pid, start) = crate::process::read_pidfile(&vm_dir.join(self.pid_file))?;
        self.names_vm(pid, vm_dir).then_some((pid, start))
    }

    /// True when `pid`, started at `start`, is still this VM's VMM: alive, not a zombie, the
    /// same start time, and a command line that names the VM's directory. A recorded pid is
    /// trusted only after this check: after a kill, an OOM kill or a reboot it may name anything.
    pub fn is_vmm_of(&self, vm_dir: &Path, pid: i32, start: u64) -> bool {
        crate::process::is_alive(pid, start) && self.names_vm(pid, vm_dir)
    }

    fn names_vm(&self, pid: i32, vm_dir: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Some(arg) = crate::process::arg_of(pid, self.flag) else { return false };
        if arg == vm_dir.join(self.named).as_os_str().as_bytes() {
            return true;
        }
        self.jail.is_some_and(|jail| {
            arg == Path::new("/").join(self.named).as_os_str().as_bytes()
                && same_file(&format!("/proc/{pid}/root/"), &jail(vm_dir))
        })
    }

    /// Every live VMM whose flag names a file in a directory right under `vms_dir`, as (VM
    /// directory, pid), found from /proc alone (a predecessor may have died before the pid file).
    pub fn scan(&self, vms_dir: &Path) -> Vec<(PathBuf, i32)> {
        let mut found = crate::process::scan_vmms(vms_dir, self.flag, self.named);
        if let Some(jail) = self.jail {
            found.extend(self.scan_jails(vms_dir, jail));
        }
        found
    }

    /// Jailed VMMs: the live processes whose flag names the file at their own root, each
    /// matched to the VM directory whose jail is its root.
    fn scan_jails(&self, vms_dir: &Path, jail: fn(&Path) -> PathBuf) -> Vec<(PathBuf, i32)> {
        let inside = Path::new("/").join(self.named);
        let pids = crate::process::with_arg(self.flag, inside.as_os_str().as_encoded_bytes());
        if pids.is_empty() {
            return Vec::new();
        }
        let Ok(dirs) = std::fs::read_dir(vms_dir) else { return Vec::new() };
        let mut found = Vec::new();
        for dir in dirs.flatten().map(|e| e.path()) {
            let root = jail(&dir);
            let pid = pids.iter().find(|p| same_file(&format!("/proc/{p}/root/"), &root));
            if let Some(&pid) = pid {
                found.push((dir, pid));
            }
        }
        found
    }

    pub fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        if let Some(h) = recorded {
            if self.is_vmm_of(vm_dir, h.pid, h.start_time) {
                return Some((h, true));
            }
        }
        self.find_running(vm_dir).map(|(pid, start_time)| (VmmHandle { pid, start_time }, false))
    }

    /// Writes the pid file of every VMM found only in /proc, so it is found (and adopted).
    pub fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for (dir, pid) in self.scan(vms_dir) {
            if self.find_running(&dir).is_none_or(|(p, _)| p != pid) {
                let file = dir.join(self.pid_file);
                match hearth_fs::atomic_write(&file, pid.to_string().as_bytes()) {
                    Ok(()) => found.push(dir),
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "writing the found VMM's pid file failed")
                    }
                }
            }
        }
        found
    }

    /// Signals the VMM only while it is still this VM's.
    pub fn signal(&self, vm_dir: &Path, vmm: VmmHandle, signal: i32) -> bool {
        let ours = self.is_vmm_of(vm_dir, vmm.pid, vmm.start_time);
        if ours {
            crate::process::kill(vmm.pid, vmm.start_time, signal);
        }
        ours
    }
}

/// Whether two paths are one directory (device and inode): a process's root seen through /proc.
fn same_file(a: &str, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}
