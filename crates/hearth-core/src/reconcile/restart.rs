//! Restart policies: when a VM's VMM ended on its own, whether and when the VM starts again
//! (docker's `--restart`, with its back-off), and the timers that start it.

use std::sync::Arc;
use std::time::Duration;

use hearth_types::restart::{delay, STEADY_RUN};
use hearth_types::{Desired, VmId, VmRecord, VmState};
use tracing::{info, warn};

use super::{Options, Reconciler};

impl Reconciler {
    /// Settles a VM that ended on its own with `exit_code` (`None`: the guest did not say) by
    /// its restart policy: a restart after its back-off (the VM stays meant to run), a failure
    /// when it crash-loops past its limit, else nothing (it stays stopped).
    pub(super) fn apply_restart_policy(&self, rec: &mut VmRecord, exit_code: Option<i32>) {
        let now = self.ports.clock.now_millis();
        let ran = now.saturating_sub(rec.status.started_at.unwrap_or(now));
        // A steady run counts the restarts in a row, and their back-off, from the start again.
        let before = if u128::from(ran) >= STEADY_RUN.as_millis() {
            0
        } else {
            rec.status.restarts_in_a_row
        };
        rec.status.restarts_in_a_row = before;
        if !rec.spec.restart.restarts_after(exit_code, before) {
            return;
        }
        if let Some(limit) = rec.spec.crash_loop_limit.filter(|&l| before >= l) {
            rec.status.state = VmState::Failed;
            rec.status.reason = format!(
                "crash loop: restarted {limit} times in a row, each run shorter than {}s; the last ended: {}",
                STEADY_RUN.as_secs(),
                last_end(rec, exit_code)
            );
            rec.desired = Desired::Stopped;
            return;
        }
        let n = before + 1;
        rec.status.restarts_in_a_row = n;
        rec.status.restart_count += 1;
        rec.status.restarting = true;
        rec.status.restart_at = Some(now + u64::try_from(delay(n).as_millis()).unwrap_or(u64::MAX));
        rec.desired = Desired::Running;
        info!(vm = %rec.spec.id, policy = %rec.spec.restart, restart = n, "restarting after its back-off");
    }

    /// Starts the VM of `rec` once its pending restart is due (now, when it already is).
    pub(super) fn schedule_restart(self: &Arc<Self>, rec: &VmRecord) {
        let Some(at) = rec.status.restart_at.filter(|_| rec.status.restarting) else { return };
        let wait = Duration::from_millis(at.saturating_sub(self.ports.clock.now_millis()));
        let (r, id) = (self.clone(), rec.spec.id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if let Err(e) = r.restart_due(&id, at).await {
                warn!(vm = %id, error = %e, "restarting the VM failed");
            }
        });
    }

    /// The restart due at `at` is due: started, unless the VM was started, stopped or removed
    /// meanwhile.
    async fn restart_due(self: &Arc<Self>, id: &VmId, at: u64) -> crate::Result<()> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut rec) = self.ports.repo.get(id)? else { return Ok(()) };
        if !rec.status.restarting || rec.status.restart_at != Some(at) {
            return Ok(());
        }
        rec.status.restart_at = None;
        self.ports.repo.save(&rec)?;
        self.reconcile_locked(id, Options::default()).await.map(drop)
    }
}

/// How a VM's last run ended, for the reason of a crash loop.
fn last_end(rec: &VmRecord, exit_code: Option<i32>) -> String {
    match exit_code {
        Some(c) => format!("exit code {c}"),
        None if !rec.status.reason.is_empty() => rec.status.reason.clone(),
        None => "the VMM ended".into(),
    }
}
