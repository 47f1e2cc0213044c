//! The reconcile loop: observe, [`plan`](crate::plan), execute one step, persist, repeat.
//!
//! A [`Reconciler`] owns the per-VM locks and drives the ports; every change to a VM goes
//! through it under the VM's lock, so loops and API mutations of one VM never interleave.

mod pause;
mod recover;
mod restart;
mod snapshot;
pub use snapshot::FromSnapshot;
mod steps;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use hearth_types::{Desired, VmId, VmRecord, VmState};
use tracing::{info_span, Instrument};

use crate::locks::KeyedLocks;
use crate::ports::{
    Clock, Disks, Guests, Images, Kernels, Keys, Network, Sandbox, Snapshots, VmRepository,
    VmmHandle, Vmms,
};
use crate::{plan, Error, Observed, Result, Step, MAX_ITERATIONS};

/// How long a guest gets to stop by itself before it is killed, unless `stop -t` says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest may take from VMM start to hearth-init's ready report.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// How long `kill` waits for a signalled VMM to go before reconciling anyway.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Per-call knobs for a reconcile run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub stop_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { stop_timeout: DEFAULT_STOP_TIMEOUT }
    }
}

/// The adapters the reconciler drives.
#[derive(Clone)]
pub struct Ports {
    pub vmms: Vmms,
    pub repo: Arc<dyn VmRepository>,
    pub disks: Arc<dyn Disks>,
    pub kernels: Arc<dyn Kernels>,
    pub network: Arc<dyn Network>,
    pub guests: Arc<dyn Guests>,
    pub sandbox: Arc<dyn Sandbox>,
    pub clock: Arc<dyn Clock>,
    pub images: Arc<dyn Images>,
    pub keys: Arc<dyn Keys>,
    pub snapshots: Arc<dyn Snapshots>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").field("vmms", &self.vmms).finish_non_exhaustive()
    }
}

/// Brings VMs to their desired state.
#[derive(Debug)]
pub struct Reconciler {
    pub ports: Ports,
    locks: KeyedLocks<VmId>,
    /// Serialises creates, so two cannot take one name or address.
    pub(crate) creating: tokio::sync::Mutex<()>,
    /// How long a guest may take to report ready ([`READY_TIMEOUT`] unless a test says).
    pub ready_timeout: Duration,
}

impl Reconciler {
    pub fn new(ports: Ports) -> Arc<Self> {
        Arc::new(Self {
            ports,
            locks: KeyedLocks::default(),
            creating: tokio::sync::Mutex::const_new(()),
            ready_timeout: READY_TIMEOUT,
        })
    }

    /// The lock that serialises all changes to one VM.
    pub fn lock_for(&self, id: &VmId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.get(id)
    }

    /// Brings one VM to its desired state. Holds the VM's lock throughout.
    pub async fn reconcile(self: &Arc<Self>, id: &VmId, opts: Options) -> Result<Option<VmRecord>> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.reconcile_locked(id, opts).await
    }

    /// As [`Reconciler::reconcile`], for callers that already hold the VM's lock.
    pub async fn reconcile_locked(
        self: &Arc<Self>,
        id: &VmId,
        opts: Options,
    ) -> Result<Option<VmRecord>> {
        for attempt in 0..MAX_ITERATIONS {
            let Some(mut rec) = self.ports.repo.get(id)? else { return Ok(None) };
            let (obs, vmm) = self.observe(&rec);
            let steps = plan(&rec, &obs);
            let Some(step) = steps.first().copied() else { return Ok(Some(rec)) };
            let span = info_span!("step", vm = %id, name = %rec.spec.name, ?step, attempt);
            let done = self.execute(&mut rec, step, vmm, opts).instrument(span).await;
            if let Err(e) = done {
                // A failed start is recorded on the VM, so `ps` and `inspect` say why.
                if matches!(step, Step::Launch | Step::CreateDisk | Step::WriteConfigDisk) {
                    if let Ok(Some(mut cur)) = self.ports.repo.get(id) {
                        cur.status.state = VmState::Failed;
                        cur.status.reason = e.message().to_owned();
                        cur.desired = Desired::Stopped;
                        self.ports.repo.save(&cur)?;
                    }
                }
                return Err(e);
            }
        }
        Err(Error::internal(format!(
            "vm {id} did not settle after {MAX_ITERATIONS} reconcile rounds; see hearthd's log"
        )))
    }

    /// `start`, `stop`, `rm`: persists `desired` for the VM and brings it there. `None` when the
    /// VM is gone (removed, or it was never there).
    pub async fn set_desired(
        self: &Arc<Self>,
        id: &VmId,
        desired: Desired,
        opts: Options,
    ) -> Result<Option<VmRecord>> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut cur) = self.ports.repo.get(id)? else { return Ok(None) };
        cur.desired = desired;
        if desired != Desired::Running {
            // Stopped or removed by hand: a pending restart is off, and the count starts over.
            cur.status.restarting = false;
            cur.status.restart_at = None;
            cur.status.restarts_in_a_row = 0;
        }
        self.ports.repo.save(&cur)?;
        self.reconcile_locked(id, opts).await
    }

    /// `start`: the VM is to run; a failed one is retried from stopped. The record when it was
    /// already running (nothing to do), else `None` once the launch was carried out.
    pub async fn start(self: &Arc<Self>, id: &VmId) -> Result<Option<VmRecord>> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(mut cur) = self.ports.repo.get(id)? else {
            return Err(Error::not_found(format!("no such VM: {id}")));
        };
        if cur.status.state.is_active() {
            return Ok(Some(cur));
        }
        cur.desired = Desired::Running;
        // Started by hand: now, not after a pending restart's back-off, and counted from 0.
        cur.status.restarting = false;
        cur.status.restart_at = None;
        cur.status.restarts_in_a_row = 0;
        if cur.status.state == VmState::Failed {
            cur.status.state = VmState::Stopped;
        }
        self.ports.repo.save(&cur)?;
        self.reconcile_locked(id, Options::default()).await.map(|_| None)
    }

    /// `hearth kill`: the VM is to stay stopped, its VMM gets `signal` (if it is still the
    /// recorded one), and its exit is recorded.
    pub async fn kill(self: &Arc<Self>, id: &VmId, signal: i32) -> Result<Option<VmRecord>> {
        let p = &self.ports;
        let vmm = {
            let lock = self.lock_for(id);
            let _g = lock.lock().await;
            let Some(mut cur) = p.repo.get(id)? else { return Ok(None) };
            let provider = cur.spec.provider;
            let vmm = cur
                .status
                .pid
                .zip(cur.status.pid_start_time)
                .map(|(pid, start_time)| VmmHandle { pid, start_time });
            let Some(vmm) = vmm else {
                return Err(Error::precondition(format!("VM {} is not running", cur.spec.name)));
            };
            cur.desired = Desired::Stopped;
            p.repo.save(&cur)?;
            (provider, vmm)
        };
        let (provider, vmm) = vmm;
        let driver = p.vmms.of(provider);
        if driver.signal(&p.repo.vm_dir(id), vmm, signal) {
            let _ = tokio::time::timeout(KILL_WAIT, driver.wait_exit(vmm)).await;
        }
        self.reconcile(id, Options::default()).await
    }

    /// What exists of a VM on the host, and its live VMM.
    fn observe(&self, rec: &VmRecord) -> (Observed, Option<VmmHandle>) {
        let dir = self.ports.repo.vm_dir(&rec.spec.id);
        let recorded = rec
            .status
            .pid
            .zip(rec.status.pid_start_time)
            .map(|(pid, start_time)| VmmHandle { pid, start_time });
        let found = self.ports.vmms.of(rec.spec.provider).find(&dir, recorded);
        let disks = self.ports.disks.observe(rec);
        let obs = Observed {
            dir: disks.dir,
            disk: disks.disk,
            config_disk: disks.config_disk,
            vmm_alive: found.is_some(),
            vmm_recorded: found.is_some_and(|(_, r)| r),
            restart_later: rec.status.restarting
                && rec.status.restart_at.is_some_and(|at| at > self.ports.clock.now_millis()),
        };
        (obs, found.map(|(h, _)| h))
    }
}
