//! Snapshots (docs/adr/0026-snapshots.md): a running VM's memory and device state, taken with
//! its VMM paused, and copies of its disks, from which new VMs start where it was.

use serde::{Deserialize, Serialize};

use crate::VmSpec;

/// A stored snapshot: what it was taken of, and what a restore must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// The VM's spec when it was taken; a restore is a VM with this spec and an identity of its
    /// own.
    pub spec: VmSpec,
    /// The kernel's content id (a kernel imported again under the same name is another).
    pub kernel_id: String,
    /// The VMM that took it, and its version: state files are read only by the same.
    pub vmm_version: String,
    /// The accelerator the VM ran with (a TCG guest's state does not restore under KVM).
    pub accel: String,
    /// The initramfs's content id (hearth-init and the modules it loads).
    pub init_id: String,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Bytes of its files (state and disks, as allocated).
    #[serde(default)]
    pub size_bytes: u64,
}

/// Why a snapshot name is refused.
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid snapshot name {name:?}: use letters, digits, '.', '_' and '-' (at most 63, starting alphanumeric)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_plain_and_start_alphanumeric() {
        for ok in ["base", "web-1.warm", "A_b"] {
            assert!(validate_snapshot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "../x", &"x".repeat(64)] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
    }
}
