//! Where VM records live.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use hearth_types::{VmId, VmRecord};

use crate::Result;

pub trait VmRepository: Send + Sync {
    fn get(&self, id: &VmId) -> Result<Option<VmRecord>>;
    /// Persists a record (atomically: a crash leaves the old one or the new one) and wakes
    /// whoever waits for changes.
    fn save(&self, rec: &VmRecord) -> Result<()>;
    /// Removes a VM's record and its directory, remembering how it ended for `wait`.
    fn remove(&self, rec: &VmRecord) -> Result<()>;
    fn list(&self) -> Result<Vec<VmRecord>>;
    /// The VM's directory: its disks, the VMM's files.
    fn vm_dir(&self, id: &VmId) -> PathBuf;
    /// The directory all VM directories are in.
    fn vms_dir(&self) -> PathBuf;
    /// Removes what a create left in the directory of a VM whose record was never saved.
    fn discard(&self, id: &VmId);
    /// The id of the VM named `name`, if there is one (indexed: no listing).
    fn name_holder(&self, name: &str) -> Option<VmId>;
    /// Who holds a bridge address: a VM's name or a reservation's holder.
    fn address_holder(&self, a: Ipv4Addr) -> Option<String>;
    /// Every bridge address in use or promised.
    fn used_addresses(&self) -> Vec<Ipv4Addr>;
    /// Networks of the bridge the allocator never hands out (`--flintlock-reserve`).
    fn reserved_networks(&self) -> Vec<hearth_types::net::Ipv4Net> {
        Vec::new()
    }
}
