//! The guest's side of a running VM: its console and hearth-init's agent.

use std::time::Duration;

use async_trait::async_trait;
use hearth_types::agent::Ready;
use hearth_types::{VmId, VmSpec};

use crate::Result;

#[async_trait]
pub trait Guests: Send + Sync {
    /// Starts capturing the VM's serial console into its log.
    async fn capture_console(&self, spec: &VmSpec) -> Result<()>;
    /// The VMM exited: waits until everything the guest wrote is in the log.
    async fn console_closed(&self, id: &VmId);
    /// Where the log ends now: the next boot's output starts there.
    fn console_offset(&self, id: &VmId) -> u64;
    /// Drops what is kept for a VM's console and agent (the VMM exited, or the VM is removed).
    async fn forget(&self, id: &VmId, removed: bool);
    /// Asks hearth-init to stop the workload and power off.
    async fn shutdown(&self, id: &VmId) -> Result<()>;
    /// Waits up to `timeout` for hearth-init's ready report.
    async fn wait_ready(&self, id: &VmId, timeout: Duration) -> Result<Ready>;
    /// Tells hearth-init of a guest restored from a snapshot who it is now (before anything
    /// else is asked of it).
    async fn reidentify(&self, id: &VmId, identity: &hearth_types::agent::Identity) -> Result<()>;
}
