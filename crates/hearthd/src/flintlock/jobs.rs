//! The microVM records as the core's provisioner sees them: a pending record's spec becomes
//! its job, and each attempt's outcome lands in the record (phase, retry count, reason), which
//! is what Get shows while the next attempt waits.

use hearth_api::status::from_status;
use hearth_core::ports::{Job, Jobs, Outcome};

use super::*;

/// [`Records`] behind the core's [`Jobs`] port; addresses promised to a pending microVM are
/// released once it is created, failed or gone.
#[derive(Debug)]
pub(super) struct MicroVmJobs {
    pub(super) d: Arc<Daemon>,
    pub(super) records: Arc<Records>,
    pub(super) network: NetworkMode,
}

impl Jobs for MicroVmJobs {
    fn pending(&self, uid: &str) -> hearth_core::Result<Option<Job>> {
        let Some(rec) = self.records.get(uid).map_err(|s| from_status(&s))? else {
            return Ok(None);
        };
        if rec.phase != Phase::Pending {
            return Ok(None);
        }
        let spec = rec.spec();
        let kernel = spec.kernel.clone().unwrap_or_default();
        let nets = super::convert::Nets::new(self.network, self.d.parent_iface.as_deref());
        let mut req = create_request(&spec, uid, "", nets).map_err(|s| from_status(&s))?;
        super::convert::confine_shares(&mut req, &self.d.virtiofs_roots)
            .map_err(hearth_core::Error::invalid)?;
        if req.vmm.is_empty() {
            req.vmm = self.d.default_vmm.to_string();
        }
        let mut images = vec![req.image.clone()];
        images.extend(spec.additional_volumes.iter().map(volume_image).filter(|i| !i.is_empty()));
        let initrd = spec.initrd.as_ref().map(|i| {
            let file = i.filename.clone().filter(|f| !f.is_empty());
            (i.image.clone(), file.unwrap_or_else(|| super::convert::DEFAULT_INITRD_FILE.into()))
        });
        Ok(Some(Job {
            kernel_image: kernel.image,
            kernel_file: kernel.filename,
            initrd,
            images,
            vm: crate::create::new_vm(&self.d, req)?,
            failures: rec.retry.max(0) as u32,
        }))
    }

    fn deleting(&self, uid: &str) -> hearth_core::Result<bool> {
        let rec = self.records.get(uid).map_err(|s| from_status(&s))?;
        Ok(rec.is_none_or(|r| r.phase == Phase::Deleting))
    }

    fn record(&self, uid: &str, outcome: &Outcome) -> hearth_core::Result<()> {
        let saved = self.records.update(uid, |rec| match outcome {
            Outcome::Created => {
                rec.phase = Phase::Created;
                rec.retry = 0;
                rec.reason.clear();
            }
            Outcome::Retrying { failures, reason } | Outcome::Failed { failures, reason } => {
                rec.retry = *failures as i32;
                rec.reason = reason.clone();
                if matches!(outcome, Outcome::Failed { .. }) {
                    rec.phase = Phase::Failed;
                }
            }
        });
        let saved = saved.map_err(|s| from_status(&s))?;
        if saved.is_none_or(|r| r.phase != Phase::Pending) {
            // Its VM holds the address now, or it will never need it.
            release_address(&self.d, uid);
        }
        Ok(())
    }

    fn remove(&self, uid: &str) -> hearth_core::Result<()> {
        self.records.remove(uid).map_err(|s| from_status(&s))?;
        release_address(&self.d, uid);
        Ok(())
    }
}

/// Drops the address promised to a pending microVM.
pub(super) fn release_address(d: &Daemon, uid: &str) {
    d.reserved_addresses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, holder| holder != uid);
}
