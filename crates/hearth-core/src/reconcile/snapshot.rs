//! Snapshots (docs/adr/0026-snapshots.md): a running VM's guest state and disk copies, taken
//! with its CPUs stopped; new VMs made from one start where it was, with an identity of their
//! own.

use std::net::Ipv4Addr;
use std::sync::Arc;

use hearth_types::snapshot::{validate_snapshot_name, SnapshotRecord};
use hearth_types::{Desired, VmId, VmRecord, VmSpec, VmState, VmStatus, VolumeSource};
use tracing::{info, warn};

use super::Reconciler;
use crate::ports::VmmHandle;
use crate::{Error, Result};

/// Bytes of fresh host randomness a restored guest mixes into its pool.
const ENTROPY_BYTES: usize = 64;

/// A VM to make from a snapshot (`hearth run --snapshot`).
#[derive(Debug, Clone, Default)]
pub struct FromSnapshot {
    pub snapshot: String,
    pub name: Option<String>,
    /// Labels over the snapshot's VM's.
    pub labels: std::collections::BTreeMap<String, String>,
    /// A kernel asked for: refused unless it is the snapshot's.
    pub kernel: Option<String>,
}

impl Reconciler {
    /// Takes a snapshot `name` of a running VM: its CPUs stopped, the guest's memory and device
    /// state saved by its VMM, its own disks copied; the guest then runs on (stays paused if it
    /// was). Nothing is left of a snapshot that failed.
    pub async fn snapshot_create(
        self: &Arc<Self>,
        id: &VmId,
        name: &str,
    ) -> Result<SnapshotRecord> {
        validate_snapshot_name(name).map_err(Error::invalid)?;
        let p = &self.ports;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let Some(rec) = p.repo.get(id)? else {
            return Err(Error::not_found(format!("no such VM: {id}")));
        };
        let vm = &rec.spec.name;
        let vmm = p.vmms.of(rec.spec.provider);
        if !vmm.capabilities().snapshots {
            return Err(Error::invalid(format!(
                "VM {vm} runs under {}, which hearth cannot snapshot yet: use --vmm qemu",
                rec.spec.provider
            )));
        }
        let (Some(pid), Some(start_time), VmState::Running, Desired::Running) =
            (rec.status.pid, rec.status.pid_start_time, rec.status.state, rec.desired)
        else {
            return Err(Error::precondition(format!(
                "VM {vm} is {}: only a running VM (its guest ready) can be snapshotted",
                rec.status.state
            )));
        };
        if let Some(v) =
            rec.spec.volumes.iter().find(|v| {
                matches!(v.source, VolumeSource::Host { .. } | VolumeSource::Share { .. })
            })
        {
            return Err(Error::invalid(format!(
                "VM {vm} has the host's {} as volume {}: a snapshot holds copies of the VM's own disks only, and a restore would share the host's with it",
                if v.source.is_share() { "directory" } else { "disk" },
                v.id
            )));
        }
        let (kernel_id, init_id) = p.snapshots.boot_ids(&rec.spec.kernel)?;
        let state = p.snapshots.begin(name)?;
        let dir = p.repo.vm_dir(id);
        let h = VmmHandle { pid, start_time };
        let taken = async {
            let version = vmm
                .save_state(&dir, h, &state)
                .await
                .map_err(|e| Error::precondition(format!("saving VM {vm}'s state: {e}")))?;
            let size = p.snapshots.copy_disks(name, &rec).await?;
            let snap = SnapshotRecord {
                name: name.to_owned(),
                spec: rec.spec.clone(),
                kernel_id,
                vmm_version: version,
                accel: rec.status.accel.clone(),
                init_id,
                created_at: p.clock.now_millis(),
                size_bytes: size,
            };
            p.snapshots.commit(&snap)?;
            Ok::<_, Error>(snap)
        }
        .await;
        if let Err(e) = &taken {
            warn!(vm = %id, snapshot = name, error = %e, "snapshot failed; removing what it made");
            if let Err(r) = p.snapshots.remove(name) {
                warn!(snapshot = name, error = %r, "removing the failed snapshot");
            }
        }
        // The guest runs on, unless it was paused before.
        if !rec.status.paused {
            if let Err(e) = vmm.set_paused(&dir, false).await {
                warn!(vm = %id, error = %e, "resuming the guest after its snapshot failed");
                return Err(Error::precondition(format!(
                    "the snapshot was {}, but VM {vm} could not be resumed: {e}",
                    if taken.is_ok() { "taken" } else { "not taken" }
                )));
            }
        }
        let snap = taken?;
        info!(vm = %id, snapshot = name, bytes = snap.size_bytes, "snapshot taken");
        Ok(snap)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.ports.snapshots.list()
    }

    /// Removes a snapshot no VM still waits to be restored from.
    pub fn snapshot_remove(&self, name: &str) -> Result<()> {
        if self.ports.snapshots.get(name)?.is_none() {
            return Err(Error::not_found(format!(
                "no snapshot named {name} (see `hearth snapshot ls`)"
            )));
        }
        let waiting = self
            .ports
            .repo
            .list()?
            .into_iter()
            .find(|r| r.status.restore_pending && r.spec.snapshot.as_deref() == Some(name));
        if let Some(vm) = waiting {
            return Err(Error::precondition(format!(
                "VM {} is to be restored from snapshot {name} at its first start: start or remove it first",
                vm.spec.name
            )));
        }
        self.ports.snapshots.remove(name)
    }

    /// A new VM made from a snapshot, stopped (`start` restores it): the snapshot's VM with a
    /// name, id, MACs and addresses of its own, its disks copies of the snapshot's. Refused when
    /// anything the guest's state depends on changed since (the kernel, hearth-init, the VMM).
    pub async fn create_from_snapshot(self: &Arc<Self>, req: FromSnapshot) -> Result<VmRecord> {
        let p = &self.ports;
        let name = &req.snapshot;
        let snap = p.snapshots.get(name)?.ok_or_else(|| {
            Error::not_found(format!("no snapshot named {name} (see `hearth snapshot ls`)"))
        })?;
        let old = &snap.spec;
        if let Some(k) = req.kernel.as_deref().filter(|k| *k != old.kernel) {
            return Err(Error::invalid(format!(
                "snapshot {name} was taken with kernel {}: a guest's state restores only onto the kernel it ran, not {k}; leave --kernel out",
                old.kernel
            )));
        }
        if !p.kernels.exists(&old.kernel)? {
            return Err(Error::precondition(format!(
                "snapshot {name} needs kernel {}, which was removed: import it again, or take a new snapshot",
                old.kernel
            )));
        }
        let (kernel_id, init_id) = p.snapshots.boot_ids(&old.kernel)?;
        if kernel_id != snap.kernel_id {
            return Err(Error::precondition(format!(
                "kernel {} is not the one snapshot {name} was taken with (it was imported again): a guest's state restores only onto the kernel it ran; take a new snapshot",
                old.kernel
            )));
        }
        if init_id != snap.init_id {
            return Err(Error::precondition(format!(
                "snapshot {name} was taken with another hearth-init or module set than this hearthd boots: take a new snapshot"
            )));
        }
        if !p.vmms.of(old.provider).capabilities().snapshots {
            return Err(Error::invalid(format!(
                "snapshot {name} is {}'s, which hearth cannot restore here",
                old.provider
            )));
        }
        if p.images.find(&old.image_id)?.is_none() {
            return Err(Error::precondition(format!(
                "snapshot {name}'s image {} was removed: pull it again",
                old.image
            )));
        }
        let _one_at_a_time = self.creating.lock().await;
        let vm_name = self.unique_name(req.name.clone())?;
        let mut labels = old.labels.clone();
        labels.extend(req.labels.clone());
        let mut spec = VmSpec {
            id: VmId::from_bytes(rand::random()),
            name: vm_name,
            labels,
            // Its own MACs (derived from its id), addresses and published ports.
            mac: None,
            address: None,
            ports: vec![],
            auto_remove: false,
            snapshot: Some(name.clone()),
            created_at: p.clock.now_millis() / 1000,
            ..old.clone()
        };
        spec.address = self.address_for(spec.network, None, &[])?;
        let mut mine: Vec<Ipv4Addr> = spec.address.into_iter().collect();
        for nic in &mut spec.nics {
            nic.mac = None;
            nic.address = self.address_for(nic.network, None, &mine)?;
            mine.extend(nic.address);
        }
        spec.validate().map_err(|e| Error::invalid(e.to_string()))?;
        let status = VmStatus { restore_pending: true, ..VmStatus::default() };
        let rec = VmRecord { spec, desired: Desired::Stopped, status };
        p.repo.save(&rec)?;
        if let Err(e) = p.snapshots.restore_disks(name, &rec).await {
            let _ = p.repo.remove(&rec);
            p.repo.discard(&rec.spec.id);
            return Err(e.context(format!("copying snapshot {name}'s disks")));
        }
        info!(vm = %rec.spec.id, snapshot = name, "VM made from a snapshot");
        Ok(rec)
    }

    /// Who a guest restored from a snapshot is now: its VM's name, cards and clock, and fresh
    /// randomness.
    pub(super) fn identity_of(&self, spec: &VmSpec) -> hearth_types::agent::Identity {
        let mut entropy = vec![0u8; ENTROPY_BYTES];
        for b in &mut entropy {
            *b = rand::random();
        }
        hearth_types::agent::Identity {
            hostname: spec.name.clone(),
            network: crate::guest_network(spec),
            cards: crate::guest::guest_cards(spec),
            entropy,
            now_ms: self.ports.clock.now_millis(),
        }
    }
}
