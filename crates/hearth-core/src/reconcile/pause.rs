//! `hearth pause` and `unpause`: a running guest's CPUs frozen, and let run again.

use std::sync::Arc;

use hearth_types::{Desired, VmId, VmRecord, VmState};

use super::Reconciler;
use crate::{Error, Result};

impl Reconciler {
    /// Freezes (`paused`) or resumes the guest of a running VM through its VMM, and records it.
    pub async fn set_paused(self: &Arc<Self>, id: &VmId, paused: bool) -> Result<VmRecord> {
        let p = &self.ports;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut rec) = p.repo.get(id)? else {
            return Err(Error::not_found(format!("no such VM: {id}")));
        };
        let name = &rec.spec.name;
        if rec.status.paused == paused {
            return Err(Error::precondition(match paused {
                true => format!("VM {name} is already paused"),
                false => format!("VM {name} is not paused"),
            }));
        }
        if rec.status.state != VmState::Running || rec.desired != Desired::Running {
            return Err(Error::precondition(format!(
                "VM {name} is {}: only a running VM can be paused",
                rec.status.state
            )));
        }
        let dir = p.repo.vm_dir(id);
        p.vmms.of(rec.spec.provider).set_paused(&dir, paused).await.map_err(|e| {
            let what = if paused { "pausing" } else { "resuming" };
            Error::precondition(format!("{what} VM {name}: {e}"))
        })?;
        rec.status.paused = paused;
        p.repo.save(&rec)?;
        Ok(rec)
    }
}
