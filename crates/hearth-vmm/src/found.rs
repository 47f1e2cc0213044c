//! Finding a provider's VMM again, the same way for every provider: by the recorded pid and
//! start time while the process still names the VM, else from the VMM's own files, else (after
//! a predecessor died before the pid file) from /proc.

use std::path::{Path, PathBuf};

use hearth_core::ports::VmmHandle;

/// How one provider recognises its VMM.
#[derive(Debug, Clone, Copy)]
pub struct Finder {
    /// The VMM its pid file names, if that process still names the VM.
    pub find_running: fn(&Path) -> Option<(i32, u64)>,
    /// Whether `pid` started at `start` is still this VM's VMM.
    pub is_vmm_of: fn(&Path, i32, u64) -> bool,
    /// Live VMMs under a VMs directory, from /proc.
    pub scan: fn(&Path) -> Vec<(PathBuf, i32)>,
    /// The pid file, in the VM's directory.
    pub pid_file: &'static str,
}

impl Finder {
    pub fn find(&self, vm_dir: &Path, recorded: Option<VmmHandle>) -> Option<(VmmHandle, bool)> {
        if let Some(h) = recorded {
            if (self.is_vmm_of)(vm_dir, h.pid, h.start_time) {
                return Some((h, true));
            }
        }
        (self.find_running)(vm_dir).map(|(pid, start_time)| (VmmHandle { pid, start_time }, false))
    }

    /// Writes the pid file of every VMM found only in /proc, so it is found (and adopted).
    pub fn recover_orphans(&self, vms_dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for (dir, pid) in (self.scan)(vms_dir) {
            if (self.find_running)(&dir).is_none_or(|(p, _)| p != pid) {
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
        let ours = (self.is_vmm_of)(vm_dir, vmm.pid, vmm.start_time);
        if ours {
            crate::process::kill(vmm.pid, vmm.start_time, signal);
        }
        ours
    }
}
