//! A VM's disks (made from its images) and the kernel it boots.

use std::path::PathBuf;

use async_trait::async_trait;
use hearth_types::guest::GuestExit;
use hearth_types::GuestConfig;
use hearth_types::VmRecord;

use super::VolumeDisk;
use crate::Result;

/// What exists of a VM's storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskState {
    /// The VM's directory exists.
    pub dir: bool,
    /// The writable root disk exists.
    pub disk: bool,
    /// The config disk exists.
    pub config_disk: bool,
}

#[async_trait]
pub trait Disks: Send + Sync {
    fn observe(&self, rec: &VmRecord) -> DiskState;
    /// Makes the VM's writable volumes, then its root disk from its image, sized to the spec;
    /// the root disk's existence marks the step done. Returns the root disk's path.
    async fn create(&self, rec: &VmRecord) -> Result<PathBuf>;
    /// Writes the config disk hearth-init reads (the process, network, cloud-init data).
    async fn write_config(&self, rec: &VmRecord) -> Result<()>;
    /// The root disk, the config disk and the volumes, in order, for a launch.
    async fn attach(&self, rec: &VmRecord) -> Result<(PathBuf, PathBuf, Vec<VolumeDisk>)>;
    /// Forgets the previous boot's exit record before a boot.
    fn clear_exit(&self, rec: &VmRecord) -> Result<()>;
    /// How the workload ended, as hearth-init wrote it on the config disk.
    fn read_exit(&self, rec: &VmRecord) -> Result<Option<GuestExit>>;
    /// The size of the filesystem VM disks are made on, when it can be read.
    fn capacity(&self) -> Option<u64>;
    /// Refuses a guest config too large for a config disk.
    fn check_config(&self, cfg: &GuestConfig) -> Result<()>;
    /// Refuses a host volume's path that is not a regular file or block device the VM may be
    /// given (hearth's own files, a device in use on the host); returns what identifies the
    /// disk ([`Self::host_volume_id`]). Blocking.
    fn check_host_volume(&self, path: &str) -> Result<String>;
    /// What identifies the disk at a host path, the same for every path to it; `None` when it
    /// cannot be read. Blocking.
    fn host_volume_id(&self, path: &str) -> Option<String>;
    /// Refuses a shared directory's path that is not a directory the VM may be given (hearth's
    /// own state, or a directory holding it); returns its canonical path, which the VM keeps
    /// (a symlink changed later never moves the share). Blocking.
    fn check_share(&self, path: &str) -> Result<String>;
}

#[async_trait]
pub trait Kernels: Send + Sync {
    /// The kernel image, in one of the `formats` the VMM boots (converted once where needed),
    /// and the initramfs (the kernel's modules plus hearth-init, after the stored `initrd` of
    /// that digest when the VM has one of its own) to boot.
    async fn boot_files(
        &self,
        kernel: &str,
        formats: &[super::KernelFormat],
        initrd: Option<&str>,
    ) -> Result<(PathBuf, PathBuf)>;
    /// The format of the imported kernel `kernel` (an ELF one read for its PVH note). Blocking.
    fn format(&self, kernel: &str) -> Result<super::KernelFormat>;
    /// The kernel VMs get when they name none.
    fn default_kernel(&self) -> Result<Option<String>>;
    fn exists(&self, kernel: &str) -> Result<bool>;
    /// Removes an imported kernel. Blocking.
    fn remove(&self, kernel: &str) -> Result<hearth_types::KernelRecord>;
}
