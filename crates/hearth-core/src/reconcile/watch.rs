//! Watching a running VMM: its exit, the guest's ready report, a graceful stop.

use std::sync::Arc;
use std::time::Duration;

use hearth_types::{VmId, VmRecord, VmSpec, VmState};
use tracing::{info, warn};

use super::{Options, Reconciler};
use crate::ports::VmmHandle;

/// How long the guest's agent gets to take a shutdown request.
const SHUTDOWN_ASK_TIMEOUT: Duration = Duration::from_secs(2);

impl Reconciler {
    /// Watches a VMM until it exits (then reconciles), and, while the guest boots, waits for
    /// hearth-init's ready report.
    pub(super) fn spawn_watchers(self: &Arc<Self>, spec: &VmSpec, h: VmmHandle, await_ready: bool) {
        let (r, id, id1) = (self.clone(), &spec.id, spec.id.clone());
        let vmm = self.ports.vmms.of(spec.provider);
        tokio::spawn(async move {
            vmm.wait_exit(h).await;
            info!(vm = %id1, pid = h.pid, "vmm exited");
            // Everything the guest wrote is in the log before the exit is recorded.
            r.ports.guests.console_closed(&id1).await;
            r.ports.guests.forget(&id1, false).await;
            if let Err(e) = r.reconcile(&id1, Options::default()).await {
                warn!(vm = %id1, error = %e, "reconcile after vmm exit failed");
            }
        });
        if await_ready {
            let (r, id2) = (self.clone(), id.clone());
            tokio::spawn(async move {
                match r.ports.guests.wait_ready(&id2, r.ready_timeout).await {
                    Ok(ready) => {
                        let failed = r.tell_identity(&id2).await;
                        r.mark_ready(&id2, h.pid, ready, failed).await
                    }
                    Err(e) => info!(vm = %id2, error = %e, "no ready report from the guest"),
                }
            });
        }
    }

    /// A guest restored from a snapshot is told who it is now, before it is reported ready (and
    /// so before anything is run in it). Returns why that failed, if it did.
    async fn tell_identity(&self, id: &VmId) -> Option<String> {
        let Ok(Some(rec)) = self.ports.repo.get(id) else { return None };
        if !rec.status.identity_pending {
            return None;
        }
        let identity = self.identity_of(&rec.spec);
        let e = self.ports.guests.reidentify(id, &identity).await.err()?;
        warn!(vm = %id, error = %e, "telling the restored guest its identity failed");
        Some(format!(
            "the restored guest may still have its snapshot's identity (hostname, MAC, address, random state): telling it its own failed: {e}"
        ))
    }

    /// Records the guest's ready report; `warning` (a restored guest that kept its snapshot's
    /// identity) is kept as the VM's reason.
    async fn mark_ready(
        &self,
        id: &VmId,
        pid: i32,
        ready: hearth_types::agent::Ready,
        warning: Option<String>,
    ) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Ok(Some(mut rec)) = self.ports.repo.get(id) else { return };
        if rec.status.pid != Some(pid) || rec.status.state != VmState::Starting {
            return;
        }
        rec.status.state = VmState::Running;
        rec.status.identity_pending = false;
        if let Some(w) = warning {
            rec.status.reason = w;
        }
        let now = self.ports.clock.now_millis();
        rec.status.ready_at = Some(now);
        rec.status.boot = Some(hearth_types::BootTimings {
            vmm_to_ready_ms: now.saturating_sub(rec.status.started_at.unwrap_or(now)),
            kernel_to_init_ms: ready.init_started_ms,
            init_to_ready_ms: ready.ready_ms.saturating_sub(ready.init_started_ms),
        });
        if let Err(e) = self.ports.repo.save(&rec) {
            warn!(vm = %id, error = %e, "recording readiness failed");
        }
    }

    /// Agent shutdown first (the guest flushes and unmounts), then the VMM's own power-off, then
    /// kill, all within `timeout`.
    pub(super) async fn stop_vmm(&self, rec: &VmRecord, h: VmmHandle, timeout: Duration) {
        let p = &self.ports;
        let id = &rec.spec.id;
        let vmm = p.vmms.of(rec.spec.provider);
        let deadline = tokio::time::Instant::now() + timeout;
        let asked = tokio::time::timeout(SHUTDOWN_ASK_TIMEOUT, p.guests.shutdown(id)).await;
        if matches!(asked, Ok(Ok(())))
            && tokio::time::timeout_at(deadline, vmm.wait_exit(h)).await.is_ok()
        {
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = vmm.stop(&p.repo.vm_dir(id), h, left).await {
            warn!(vm = %id, error = %e, "graceful stop failed; killing");
            self.kill_now(rec, h).await;
        }
    }
}
