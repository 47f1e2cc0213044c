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
    /// A bzImage's payload compression (`gzip`, `zstd`, `lz4`, `xz`, `lzma`, `bzip2`, `lzo`),
    /// read at import; `None` for an ELF and for kernels imported before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Whether an ELF has the PVH note QEMU and Cloud Hypervisor boot it by, read at import;
    /// `None` for a bzImage and for kernels imported before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvh: Option<bool>,
    /// Number of modules shipped with it.
    pub modules: usize,
    /// Unix seconds.
    pub created_at: u64,
}

impl KernelRecord {
    /// Its format as `kernel ls` shows it: `bzimage (zstd)`, `elf (pvh)`, `elf (no pvh)`.
    pub fn format_detail(&self) -> String {
        match (&self.compression, self.pvh) {
            (Some(c), _) => format!("{} ({c})", self.format),
            (None, Some(true)) => format!("{} (pvh)", self.format),
            (None, Some(false)) => format!("{} (no pvh)", self.format),
            (None, None) => self.format.clone(),
        }
    }
}
