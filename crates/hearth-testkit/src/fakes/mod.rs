//! Fakes of hearth-core's ports. [`FakeVmm`] is scripted (launches that fail, VMMs that exit on
//! demand or ignore a power-off); [`FakeHost`] keeps records, disks and claims in memory and
//! counts what was done to them; [`ManualClock`] moves only when told. [`ports`] wires them.

mod host;
mod provision;
mod vmm;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hearth_core::ports::Clock;
use hearth_core::{Ports, Reconciler};

pub use host::FakeHost;
pub use provision::{Answer, FakeFetch, FakeJobs, Phase};
pub use vmm::{FakeVmm, Launch};

/// A clock that stands still until [`ManualClock::advance`].
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A reconciler over fresh fakes, and the fakes, for a test to script and inspect.
#[derive(Debug)]
pub struct Harness {
    pub reconciler: Arc<Reconciler>,
    pub vmm: Arc<FakeVmm>,
    pub host: Arc<FakeHost>,
    pub clock: Arc<ManualClock>,
}

/// Builds a [`Harness`].
pub fn harness() -> Harness {
    let vmm = Arc::new(FakeVmm::default());
    let host = Arc::new(FakeHost::new(vmm.clone()));
    let clock = Arc::new(ManualClock(AtomicU64::new(1_000)));
    let ports = Ports {
        vmms: hearth_core::ports::Vmms::new(vec![vmm.clone()]),
        repo: host.clone(),
        disks: host.clone(),
        kernels: host.clone(),
        network: host.clone(),
        guests: host.clone(),
        sandbox: host.clone(),
        clock: clock.clone(),
        images: host.clone(),
        keys: host.clone(),
        snapshots: host.clone(),
    };
    Harness { reconciler: Reconciler::new(ports), vmm, host, clock }
}

impl Harness {
    /// Polls (in paused time) until `cond` holds for the VM's record, or fails after a minute.
    pub async fn until(
        &self,
        id: &hearth_types::VmId,
        what: &str,
        cond: impl Fn(Option<&hearth_types::VmRecord>) -> bool,
    ) -> Option<hearth_types::VmRecord> {
        for _ in 0..600 {
            let r = self.host.record(id);
            if cond(r.as_ref()) {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{what}: never; the record is {:?}", self.host.record(id));
    }

    /// Stores `rec` and reconciles it once; the record after.
    pub async fn reconciled(&self, rec: hearth_types::VmRecord) -> hearth_types::VmRecord {
        let id = rec.spec.id.clone();
        self.host.put(rec);
        self.reconciler
            .reconcile(&id, hearth_core::Options::default())
            .await
            .expect("reconcile")
            .expect("record")
    }

    /// A new VM `n` that is to run, reconciled (its VMM launched).
    pub async fn run(&self, n: u8) -> hearth_types::VmRecord {
        let rec = crate::record(n, hearth_types::Desired::Running, hearth_types::VmState::Created);
        self.reconciled(rec).await
    }
}
