//! What confines each VMM: a uid of its own, a cgroup.

use hearth_types::VmSpec;

use super::Confinement;
use crate::Result;

pub trait Sandbox: Send + Sync {
    /// The confinement of a launch: a VMM uid no other VM has (held until [`Sandbox::settle`]),
    /// the VM's cgroup.
    fn claim(&self, spec: &VmSpec) -> Result<Confinement>;
    /// The launch is recorded or failed: the uid is the record's now, or free again.
    fn settle(&self, confinement: &Confinement);
    /// The confinement a VM's VMM has, for cleaning up after it (its cgroup).
    fn of(&self, spec: &VmSpec) -> Confinement;
}
