//! Flintlock's `microvm.services.api.v1alpha1.MicroVM` service on top of hearth's own VMs, so
//! Flintlock's clients (CAPMVM, hammertime, fl, grpcurl) drive a hearth host unchanged.
//!
//! A create is accepted at once (uid + PENDING, as Flintlock does) and its intent persisted as a
//! record under `ROOT/flintlock/`; the core's [`Provisioner`] then pulls the kernel and root
//! images, creates a hearth VM labelled with the uid and starts it, retrying what may pass as
//! delayed re-queues. The reported state is derived from that VM, so it reflects the real VMM
//! and hearth-init's readiness. A delete marks the record first, so an attempt in flight stops
//! at its next step, and `resume` re-queues whatever a crash interrupted. See
//! docs/adr/0008-flintlock-api.md.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hearth_api::flintlock::types as fl;
use hearth_api::microvm::services::api::v1alpha1::{self as fpb, micro_vm_server::MicroVm};
use hearth_api::v1 as pb;
use hearth_core::{Provisioner, RetryPolicy};
use hearth_types::net::{BRIDGE_GATEWAY, BRIDGE_PREFIX};
use hearth_types::{NetworkMode, VmRecord, VmState};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::daemon::{internal, now_secs, Daemon};
use crate::service::Streamed;

/// Label tying a hearth VM to its Flintlock microVM.
pub use hearth_core::provision::OWNER_LABEL as UID_LABEL;
/// Flintlock's defaults.
const DEFAULT_VCPU: i32 = 2;
const DEFAULT_MEMORY_MB: i32 = 1024;
const DEFAULT_NAMESPACE: &str = "default";

mod auth;
mod convert;
mod jobs;
mod records;
mod service;
mod status;
#[cfg(test)]
mod tests;

pub use auth::check_basic_auth;
use convert::*;
use jobs::{release_address, MicroVmJobs};
use records::*;
use status::*;

/// The service.
#[derive(Debug, Clone)]
pub struct Flintlock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    d: Arc<Daemon>,
    records: Arc<Records>,
    /// Serialises creates, so two requests cannot take the same namespace/name.
    create: tokio::sync::Mutex<()>,
    /// Runs each microVM's provisioning and deletion.
    provisioner: Arc<Provisioner>,
    /// The network microVMs' interfaces are put on (`--flintlock-network`).
    network: NetworkMode,
}

impl Flintlock {
    pub fn new(d: Arc<Daemon>, network: NetworkMode) -> anyhow::Result<Self> {
        let dir = d.root.join("flintlock");
        std::fs::create_dir_all(&dir)?;
        // Temporary records a crash left (the daemon holds the root's lock; nothing else writes).
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                std::fs::remove_file(e.path())?;
            }
        }
        let records = Arc::new(Records { dir, write: Mutex::new(()) });
        let jobs = MicroVmJobs { d: d.clone(), records: records.clone(), network };
        let fetch = Arc::new(crate::adapters::Host(d.clone()));
        let provisioner = Provisioner::start(
            d.reconciler().clone(),
            Arc::new(jobs),
            fetch,
            RetryPolicy::default(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                d,
                records,
                create: tokio::sync::Mutex::const_new(()),
                provisioner,
                network,
            }),
        })
    }

    /// Restarts the work a crash or restart interrupted.
    pub fn resume(&self) {
        let Ok(list) = self.inner.records.list() else { return };
        for r in list {
            match r.phase {
                Phase::Pending => {
                    if let Err(e) = self.reserve_address(&r.spec(), &r.uid) {
                        warn!(uid = r.uid, error = %e.message(), "the microvm's static address is no longer free");
                    }
                    self.inner.provisioner.submit(&r.uid)
                }
                Phase::Deleting => self.inner.provisioner.delete(&r.uid),
                Phase::Created | Phase::Failed => {}
            }
        }
    }

    /// Holds a pending microVM's static bridge addresses against the allocator until its VM
    /// exists. Fails when another VM or pending microVM has one.
    fn reserve_address(&self, spec: &fl::MicroVmSpec, uid: &str) -> Result<(), Status> {
        let nets = Nets::new(self.inner.network, self.inner.d.parent_iface.as_deref());
        let ips = (spec.interfaces.iter())
            .filter(|i| nets.of(i) == NetworkMode::Bridge)
            .filter_map(|i| i.address.as_ref())
            .map(|a| static_address(a).map_err(Status::invalid_argument))
            .collect::<Result<Vec<_>, _>>()?;
        if ips.is_empty() {
            return Ok(());
        }
        let vms = self.inner.d.vms.list().map_err(internal)?;
        for ip in &ips {
            if let Some(vm) = vms.iter().find(|r| {
                r.spec.bridge_addresses().contains(ip)
                    && r.spec.labels.get(UID_LABEL).map(String::as_str) != Some(uid)
            }) {
                return Err(Status::already_exists(format!(
                    "address {ip} is taken by VM {}; choose another",
                    vm.spec.name
                )));
            }
        }
        let mut reserved =
            self.inner.d.reserved_addresses.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ip, holder)) =
            ips.iter().find_map(|ip| reserved.get(ip).filter(|h| *h != uid).map(|h| (ip, h)))
        {
            return Err(Status::already_exists(format!(
                "address {ip} is promised to microvm {holder}; choose another"
            )));
        }
        for ip in ips {
            reserved.insert(ip, uid.to_owned());
        }
        Ok(())
    }

    /// Whether `uid` names a microVM.
    pub fn has_microvm(&self, uid: &str) -> bool {
        self.inner.records.get(uid).is_ok_and(|r| r.is_some())
    }

    /// The hearth VM of a microVM, if it exists.
    fn vm_of(&self, uid: &str) -> Result<Option<VmRecord>, Status> {
        Ok(self.vms_by_uid()?.remove(uid))
    }

    /// Every hearth VM that belongs to a microVM, by uid (one read of the store for a listing).
    fn vms_by_uid(&self) -> Result<HashMap<String, VmRecord>, Status> {
        let vms = self.inner.d.vms.list().map_err(internal)?;
        Ok(vms
            .into_iter()
            .filter_map(|r| r.spec.labels.get(UID_LABEL).cloned().map(|u| (u, r)))
            .collect())
    }

    /// The wire form of a record, with its state derived from its hearth VM (`vm`).
    fn microvm(&self, rec: &Record, vm: Option<&VmRecord>) -> fl::MicroVm {
        let mut spec = rec.spec();
        spec.created_at = Some(timestamp(rec.created_at));
        spec.updated_at = Some(timestamp(rec.updated_at));
        let (state, reason) = observed_state(rec, vm);
        let mut status = fl::MicroVmStatus {
            state: state as i32,
            retry: rec.retry,
            reason,
            ..Default::default()
        };
        if let Some(vm) = vm {
            // Each card's tap on the bridge or macvtap on the LAN, and its interface index (a
            // macvtap's character device is /dev/tapINDEX); none for user-mode NAT.
            for (i, card) in spec.interfaces.iter().zip(vm.spec.cards()) {
                let host_device_name = if card.has_link() { card.link } else { String::new() };
                let index =
                    std::fs::read_to_string(format!("/sys/class/net/{host_device_name}/ifindex"))
                        .ok()
                        .filter(|_| !host_device_name.is_empty())
                        .and_then(|i| i.trim().parse().ok())
                        .unwrap_or(0);
                let iface =
                    fl::NetworkInterfaceStatus { host_device_name, index, mac_address: card.mac };
                status.network_interfaces.insert(i.device_id.clone(), iface);
            }
            if let Some(disk) = &vm.status.disk_path {
                let id = spec
                    .root_volume
                    .as_ref()
                    .map(|v| v.id.clone())
                    .unwrap_or_else(|| "root".into());
                let mount = fl::Mount {
                    r#type: fl::mount::MountType::Hostpath as i32,
                    source: disk.clone(),
                };
                status.volumes.insert(id, fl::VolumeStatus { mount: Some(mount) });
            }
            // Additional volumes: the shared cached filesystem when read-only, else the VM's
            // copy; a host device or shared directory where it is.
            for (i, v) in vm.spec.volumes.iter().enumerate() {
                use hearth_types::VolumeSource::{Host, Share};
                let path =
                    match (&v.source, v.read_only, hearth_types::Digest::from_hex(&v.image_id)) {
                        (Host { path } | Share { path }, ..) => path.into(),
                        (_, true, Ok(id)) => self.inner.d.images.rootfs_path(&id),
                        _ => crate::adapters::volume_path(&self.inner.d.vm_dir(&vm.spec.id), i),
                    };
                let mount = fl::Mount {
                    r#type: fl::mount::MountType::Hostpath as i32,
                    source: path.display().to_string(),
                };
                status.volumes.insert(v.id.clone(), fl::VolumeStatus { mount: Some(mount) });
            }
            let kernel = self.inner.d.kernels.kernel_path(&vm.spec.kernel);
            status.kernel_mount = Some(fl::Mount {
                r#type: fl::mount::MountType::Hostpath as i32,
                source: kernel.display().to_string(),
            });
        }
        let version = self.version_of(rec, &status);
        fl::MicroVm { version, spec: Some(spec), status: Some(status) }
    }

    /// The microVM's version for `status`: the record's, one more (and recorded) when `status`
    /// differs from the one last reported.
    fn version_of(&self, rec: &Record, status: &fl::MicroVmStatus) -> i32 {
        let seen = fingerprint(&canonical(status));
        if rec.reported == seen {
            return rec.version;
        }
        let bumped = self.inner.records.update(&rec.uid, |r| {
            if r.reported != seen {
                r.version += 1;
                r.reported = seen.clone();
            }
        });
        match bumped {
            Ok(Some(r)) => r.version,
            // Gone meanwhile, or not writable: what it was, plus this change.
            _ => rec.version + 1,
        }
    }

    /// The wire form of several records, reading the VM store once.
    fn microvms(&self, records: &[Record]) -> Result<Vec<fl::MicroVm>, Status> {
        let vms = self.vms_by_uid()?;
        Ok(records.iter().map(|r| self.microvm(r, vms.get(&r.uid))).collect())
    }

    fn records_in(&self, namespace: &str, name: Option<&str>) -> Result<Vec<Record>, Status> {
        let all = self.inner.records.list()?;
        Ok(all
            .into_iter()
            .filter(|r| {
                let s = r.spec();
                (namespace.is_empty() || s.namespace == namespace) && name.is_none_or(|n| s.id == n)
            })
            .collect())
    }
}

/// A status's bytes in one order whatever its maps' (a HashMap iterates in an order of its own).
fn canonical(status: &fl::MicroVmStatus) -> Vec<u8> {
    let mut s = status.clone();
    let ifaces: BTreeMap<_, _> = std::mem::take(&mut s.network_interfaces).into_iter().collect();
    let volumes: BTreeMap<_, _> = std::mem::take(&mut s.volumes).into_iter().collect();
    let mut out = s.encode_to_vec();
    for (name, i) in ifaces {
        out.extend(name.into_bytes());
        out.extend(i.encode_to_vec());
    }
    for (id, v) in volumes {
        out.extend(id.into_bytes());
        out.extend(v.encode_to_vec());
    }
    out
}

/// A stable fingerprint of bytes (FNV-1a, 64 bits), to tell a reported status from the last.
fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}
