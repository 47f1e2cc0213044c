//! Kernels as hearth stores them.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// A kernel in the local store, with the initramfs hearth built for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    pub name: String,
    /// Digest of the kernel file as imported: its identity.
    pub id: Digest,
    /// Version string read from the kernel image itself (e.g. `6.1.0-56-cloud-amd64`).
    pub version: String,
    /// `elf` (vmlinux) or `bzimage`.
    pub format: String,
    /// Number of modules shipped with it.
    pub modules: usize,
    /// Unix seconds.
    pub created_at: u64,
}
