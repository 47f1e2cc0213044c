//! Daemon start: re-adopt live VMMs, record the ones that died while hearthd was down, finish
//! half-done work.

use std::sync::Arc;

use hearth_types::{Desired, NetworkMode, VmState};
use tracing::{info, warn};

use super::{Options, Reconciler};

impl Reconciler {
    pub async fn recover(self: &Arc<Self>) {
        let p = &self.ports;
        let records = match p.repo.list() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "listing VMs for recovery failed");
                return;
            }
        };
        // A VMM launched by a predecessor that died before recording it, or before the VMM
        // wrote its own files: made findable, so it is adopted, never launched twice.
        for vmm in p.vmms.all() {
            for dir in vmm.recover_orphans(&p.repo.vms_dir()) {
                info!(dir = %dir.display(), "found a VMM its predecessor never recorded");
            }
        }
        for rec in records {
            let id = rec.spec.id.clone();
            let (obs, vmm) = self.observe(&rec);
            if let (Some(h), true) = (vmm, obs.vmm_recorded) {
                info!(vm = %id, pid = h.pid, "re-adopting running VM");
                // A crash between launch and attach left the tap off the bridge; attaching is idempotent.
                if let Err(e) = p.network.attach(&rec.spec).await {
                    warn!(vm = %id, error = %e, "re-attaching the VM's tap to the bridge failed");
                }
                self.take_over(&rec, h).await;
                self.spawn_watchers(&rec.spec, h, rec.status.state == VmState::Starting);
                if rec.desired != Desired::Running || rec.status.state == VmState::Stopping {
                    // A stop or rm saved just before the crash is carried out now.
                    let r = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = r.reconcile(&id, Options::default()).await {
                            warn!(vm = %id, error = %e, "finishing an interrupted stop or rm failed");
                        }
                    });
                }
                continue;
            }
            if !obs.disk && rec.status.disk_path.is_some() {
                // Its disk was half made when a predecessor died, and removed since: the record
                // names no disk (the next start makes one).
                let mut r = rec.clone();
                r.status.disk_path = None;
                if let Err(e) = p.repo.save(&r) {
                    warn!(vm = %id, error = %e, "recording that the VM has no disk failed");
                }
            }
            // docker's `always`: started with the daemon, even after a stop by hand.
            if rec.spec.restart.starts_stopped_vms_with_the_daemon()
                && rec.desired == Desired::Stopped
                && rec.status.state == VmState::Stopped
            {
                info!(vm = %id, "starting a VM whose restart policy is always");
                if let Err(e) = self.start(&id).await {
                    warn!(vm = %id, error = %e, "starting a VM with the daemon failed");
                }
                continue;
            }
            match self.reconcile(&id, Options::default()).await {
                // A restart that was pending when the daemon went down, its back-off still
                // running: its timer again.
                Ok(Some(after)) if rec.status.restarting => self.schedule_restart(&after),
                Ok(_) => {}
                Err(e) => warn!(vm = %id, error = %e, "recovery reconcile failed"),
            }
        }
        // The host's rules may have been flushed (or lost with a reboot) while hearthd was down.
        let bridged_live = p
            .repo
            .list()
            .unwrap_or_default()
            .iter()
            .any(|r| r.spec.network == NetworkMode::Bridge && r.status.state.is_active());
        if bridged_live {
            p.network.resync();
        }
    }
}
