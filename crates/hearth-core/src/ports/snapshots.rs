//! The `Snapshots` port: where snapshots are kept, and the disk copies they hold.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use hearth_types::snapshot::SnapshotRecord;
use hearth_types::VmRecord;

use crate::Result;

/// Stored snapshots: a record, the guest's state file and copies of the VM's disks each.
#[async_trait]
pub trait Snapshots: Send + Sync {
    /// Makes the (private, empty) directory of a new snapshot and returns where its state file
    /// goes; a name taken is a conflict.
    fn begin(&self, name: &str) -> Result<PathBuf>;
    /// Copies the VM's own disks (root and writable volumes; CoW where the filesystem can) into
    /// the snapshot's directory, and returns the bytes the snapshot takes in all. The VM's CPUs
    /// are stopped and its disks flushed meanwhile.
    async fn copy_disks(&self, name: &str, rec: &VmRecord) -> Result<u64>;
    /// Records a whole snapshot (its files are all there).
    fn commit(&self, snap: &SnapshotRecord) -> Result<()>;
    /// Removes a snapshot, whole or half-made.
    fn remove(&self, name: &str) -> Result<()>;
    fn get(&self, name: &str) -> Result<Option<SnapshotRecord>>;
    fn list(&self) -> Result<Vec<SnapshotRecord>>;
    /// The guest state file a restore loads.
    fn state_file(&self, name: &str) -> PathBuf;
    /// Gives a new VM copies of the snapshot's disks (CoW where the filesystem can), in its
    /// directory, so its disks count as made.
    async fn restore_disks(&self, name: &str, rec: &VmRecord) -> Result<()>;
    /// What identifies a kernel's content and the initramfs (hearth-init, modules) it boots
    /// with, so a restore onto anything else is refused.
    fn boot_ids(&self, kernel: &str) -> Result<(String, String)>;
}

/// The name of a snapshot's state file in its directory.
pub const STATE_FILE: &str = "state";

/// A snapshot's file `name` inside `dir`.
pub fn file_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
