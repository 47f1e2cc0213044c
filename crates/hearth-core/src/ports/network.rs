//! The VM's network: its card, the bridge and tap, published ports.

use async_trait::async_trait;
use hearth_types::VmSpec;

use super::NetLaunch;
use crate::Result;

/// The network a launch gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    /// Every card, the first one first (only it has forwards).
    pub cards: Vec<NetLaunch>,
    /// The host port forwarded to the guest's SSH, if any.
    pub ssh_port: Option<u16>,
}

#[async_trait]
pub trait Network: Send + Sync {
    /// The card and forwards of a VM, or `None` when it has no network.
    fn plan(&self, spec: &VmSpec) -> Result<Option<NetPlan>>;
    /// Before a launch: the bridge exists (when the VM uses it) and the VM's published ports
    /// are claimed. [`Network::settle`] ends the claim.
    async fn prepare(&self, spec: &VmSpec) -> Result<()>;
    /// After a launch: the claim becomes the record's (`failed`: it is given back).
    fn settle(&self, spec: &VmSpec, failed: bool);
    /// Puts the VM's tap on the bridge (idempotent; nothing without a tap).
    async fn attach(&self, spec: &VmSpec) -> Result<()>;
    /// The VMM is gone: its port forwards go; with `remove`, its tap too.
    async fn release(&self, spec: &VmSpec, remove: bool);
    /// Rebuilds the host's forwarding rules from the records (after a daemon start).
    fn resync(&self);
    /// Refuses a new VM whose published ports are in use on the host or held by another VM.
    fn check_publishable(&self, spec: &VmSpec) -> Result<()>;
    /// The DNS servers guests on the bridge are given (the host's own, loopback ones left out).
    fn resolvers(&self) -> Vec<String>;
}
