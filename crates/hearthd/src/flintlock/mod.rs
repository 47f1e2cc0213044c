//! Flintlock's `microvm.services.api.v1alpha1.MicroVM` service on top of hearth's own VMs, so
//! Flintlock's clients (CAPMVM, hammertime, fl, grpcurl) drive a hearth host unchanged.
//!
//! A create is accepted at once (uid + PENDING, as Flintlock does) and its intent persisted as a
//! record under `ROOT/flintlock/`; a task per microVM then pulls the kernel and root images,
//! creates a hearth VM labelled with the uid and starts it. The reported state is derived from
//! that VM, so it reflects the real VMM and hearth-init's readiness. Tasks of one microVM run
//! under its lock, a delete marks the record first so an in-flight create stops at its next
//! step, and `resume` restarts whatever a crash interrupted. See docs/adr/0008-flintlock-api.md.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hearth_api::flintlock::types as fl;
use hearth_api::microvm::services::api::v1alpha1::{self as fpb, micro_vm_server::MicroVm};
use hearth_api::status::to_status;
use hearth_api::v1 as pb;
use hearth_core::Options;
use hearth_types::net::{tap_name, BRIDGE_GATEWAY, BRIDGE_PREFIX};
use hearth_types::{ImageRef, NetworkMode, VmRecord, VmState};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::daemon::KeyedLocks;
use crate::daemon::{internal, now_secs, Daemon};
use crate::service::Streamed;

/// Label tying a hearth VM to its Flintlock microVM.
pub const UID_LABEL: &str = "hearth.flintlock/uid";
/// Kernel images imported for microVMs are named after this prefix and the image id.
const KERNEL_PREFIX: &str = "fl-";
/// Attempts at provisioning before a microVM is FAILED (a registry can be away for minutes).
const MAX_ATTEMPTS: i32 = 10;
/// Flintlock's defaults.
const DEFAULT_VCPU: i32 = 2;
const DEFAULT_MEMORY_MB: i32 = 1024;
const DEFAULT_NAMESPACE: &str = "default";

mod auth;
mod convert;
mod records;
mod service;
mod status;
#[cfg(test)]
mod tests;

pub use auth::check_basic_auth;
use convert::*;
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
    records: Records,
    /// One lock per microVM: its provisioning steps and its deletion never interleave.
    locks: KeyedLocks<String>,
    /// Serialises creates, so two requests cannot take the same namespace/name.
    create: tokio::sync::Mutex<()>,
    /// Serialises kernel imports (two microVMs often share one kernel image).
    kernels: tokio::sync::Mutex<()>,
    /// Set (true) when a microVM's deletion begins, so its provisioning stops waiting on pulls.
    deleting: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
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
        Ok(Self {
            inner: Arc::new(Inner {
                d,
                records: Records { dir, write: Mutex::new(()) },
                locks: KeyedLocks::default(),
                create: tokio::sync::Mutex::const_new(()),
                kernels: tokio::sync::Mutex::const_new(()),
                deleting: Mutex::new(HashMap::new()),
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
                    self.spawn_provision(r.uid)
                }
                Phase::Deleting => self.spawn_delete(r.uid),
                Phase::Created | Phase::Failed => {}
            }
        }
    }

    fn spawn_provision(&self, uid: String) {
        let me = self.clone();
        tokio::spawn(async move { me.provision(&uid).await });
    }

    /// Deletes until it succeeds (a VM that will not stop is retried with backoff).
    fn spawn_delete(&self, uid: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut attempt = 0u32;
            while let Err(e) = me.delete(&uid).await {
                attempt += 1;
                warn!(uid, attempt, error = %e.message(), "deleting microvm failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
        });
    }

    /// Holds a pending microVM's static address against the allocator until its VM exists.
    /// Fails when another VM or pending microVM has it.
    fn reserve_address(&self, spec: &fl::MicroVmSpec, uid: &str) -> Result<(), Status> {
        let Some(a) = spec.interfaces.first().and_then(|i| i.address.as_ref()) else {
            return Ok(());
        };
        let ip = static_address(a).map_err(Status::invalid_argument)?;
        let vms = self.inner.d.vms.list().map_err(internal)?;
        if let Some(vm) = vms.iter().find(|r| {
            r.spec.address == Some(ip)
                && r.spec.labels.get(UID_LABEL).map(String::as_str) != Some(uid)
        }) {
            return Err(Status::already_exists(format!(
                "address {ip} is taken by VM {}; choose another",
                vm.spec.name
            )));
        }
        let mut reserved =
            self.inner.d.reserved_addresses.lock().unwrap_or_else(|e| e.into_inner());
        match reserved.get(&ip) {
            Some(holder) if holder != uid => Err(Status::already_exists(format!(
                "address {ip} is promised to microvm {holder}; choose another"
            ))),
            _ => {
                reserved.insert(ip, uid.to_owned());
                Ok(())
            }
        }
    }

    fn release_address(&self, uid: &str) {
        self.inner
            .d
            .reserved_addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, holder| holder != uid);
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

    /// Pulls, creates and starts, retrying with backoff. Each attempt holds the microVM's lock;
    /// the waits between attempts do not, so a delete goes ahead there, and wins.
    async fn provision(&self, uid: &str) {
        let mut failures = 0u32;
        loop {
            let outcome = {
                let lock = self.inner.locks.get(&uid.to_owned());
                let _g = lock.lock().await;
                match self.inner.records.get(uid) {
                    Ok(Some(rec)) if rec.phase == Phase::Pending => self.provision_once(&rec).await,
                    Ok(_) => return,
                    Err(e) => Err(e),
                }
            };
            let saved = self.inner.records.update(uid, |rec| match &outcome {
                Ok(()) => {
                    rec.phase = Phase::Created;
                    rec.reason.clear();
                }
                Err(e) => {
                    rec.retry += 1;
                    rec.reason = e.message().to_owned();
                    // Pulls fail with UNAVAILABLE and are retried; a bad spec or image is final.
                    let permanent = !hearth_api::status::from_status(e).is_retryable();
                    if permanent || rec.retry >= MAX_ATTEMPTS {
                        rec.phase = Phase::Failed;
                    }
                }
            });
            match saved {
                Ok(Some(rec)) if rec.phase == Phase::Pending => {
                    warn!(uid, attempt = rec.retry, reason = %rec.reason, "provisioning microvm failed; retrying");
                }
                Ok(Some(rec)) => {
                    // Created (the VM holds the address now), failed or being deleted.
                    self.release_address(uid);
                    match rec.phase {
                        Phase::Created => info!(uid, "microvm created"),
                        Phase::Failed => warn!(uid, reason = %rec.reason, "microvm failed"),
                        Phase::Pending | Phase::Deleting => {}
                    }
                    return;
                }
                Ok(None) => {
                    self.release_address(uid);
                    return;
                }
                Err(e) => {
                    warn!(uid, error = %e.message(), "recording microvm state failed; retrying")
                }
            }
            failures += 1;
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    async fn provision_once(&self, rec: &Record) -> Result<(), Status> {
        let spec = rec.spec();
        let d = &self.inner.d;
        let kernel_spec = spec.kernel.clone().unwrap_or_default();
        let kernel_img = self.until_deleted(&rec.uid, pull(d, &kernel_spec.image)).await?;
        self.check_not_deleting(&rec.uid)?;
        let filename = kernel_spec.filename.clone().filter(|f| !f.is_empty());
        let kernel = kernel_name(&kernel_img.id.hex()[..12], filename.as_deref());
        {
            let _k = self.inner.kernels.lock().await;
            if d.kernels.get(&kernel).map_err(internal)?.is_none() {
                let (d2, name) = (d.clone(), kernel.clone());
                tokio::task::spawn_blocking(move || {
                    crate::service::kernel_from_image(&d2, &kernel_img, &name, filename.as_deref())
                })
                .await
                .map_err(internal)?
                .map_err(|e| {
                    Status::failed_precondition(format!(
                        "kernel image {}: {e:#}",
                        kernel_spec.image
                    ))
                })?;
            }
        }
        let root = spec
            .root_volume
            .as_ref()
            .and_then(|v| v.source.as_ref())
            .and_then(|s| s.container_source.clone())
            .unwrap_or_default();
        self.until_deleted(&rec.uid, pull(d, &root)).await?;
        for v in &spec.additional_volumes {
            self.until_deleted(&rec.uid, pull(d, &volume_image(v))).await?;
            self.check_not_deleting(&rec.uid)?;
        }
        self.check_not_deleting(&rec.uid)?;
        let vm = match self.vm_of(&rec.uid)? {
            Some(vm) => vm,
            None => {
                let req = create_request(&spec, &rec.uid, &kernel, self.inner.network)?;
                crate::create::create(d, req).await?
            }
        };
        self.check_not_deleting(&rec.uid)?;
        if !matches!(vm.status.state, VmState::Starting | VmState::Running) {
            d.reconciler().start(&vm.spec.id).await.map_err(to_status)?;
        }
        Ok(())
    }

    /// Runs `work` (a pull) until it ends or the microVM's deletion begins, whichever is first:
    /// a delete never waits behind a registry that stalls. Left behind, a pull only fills the
    /// image store.
    async fn until_deleted<T>(
        &self,
        uid: &str,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let mut deleting = {
            let mut map = self.inner.deleting.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(uid.to_owned())
                .or_insert_with(|| tokio::sync::watch::channel(false).0)
                .subscribe()
        };
        // A delete that began before the subscription is seen in the record.
        self.check_not_deleting(uid)?;
        tokio::select! {
            r = work => r,
            _ = deleting.wait_for(|d| *d) => Err(Status::aborted("the microvm is being deleted")),
        }
    }

    /// Tells a provisioning in progress that its microVM is being deleted.
    fn signal_deleting(&self, uid: &str) {
        let map = self.inner.deleting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(uid) {
            tx.send_replace(true);
        }
    }

    fn check_not_deleting(&self, uid: &str) -> Result<(), Status> {
        match self.inner.records.get(uid)? {
            Some(r) if r.phase != Phase::Deleting => Ok(()),
            _ => Err(Status::aborted("the microvm is being deleted")),
        }
    }

    /// Removes the VM (stopping it), then the record.
    async fn delete(&self, uid: &str) -> Result<(), Status> {
        let lock = self.inner.locks.get(&uid.to_owned());
        let _g = lock.lock().await;
        if let Some(vm) = self.vm_of(uid)? {
            let (r, id) = (self.inner.d.reconciler().clone(), vm.spec.id.clone());
            // Carried to its end even if this task is dropped between two steps.
            crate::service::detached(async move {
                r.set_desired(&id, hearth_types::Desired::Deleted, Options::default())
                    .await
                    .map_err(to_status)
            })
            .await?;
        }
        self.inner.records.remove(uid)?;
        self.release_address(uid);
        self.inner.locks.forget(&uid.to_owned());
        self.inner.deleting.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
        info!(uid, "microvm deleted");
        Ok(())
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
            if let (Some(i), true) = (spec.interfaces.first(), vm.spec.network != NetworkMode::None)
            {
                let host_device_name = if vm.spec.network == NetworkMode::Bridge {
                    tap_name(&vm.spec.id)
                } else {
                    String::new()
                };
                let iface = fl::NetworkInterfaceStatus {
                    host_device_name,
                    index: 0,
                    mac_address: vm.spec.mac(),
                };
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
            // Additional volumes: the shared cached filesystem when read-only, else the VM's copy.
            for (i, v) in vm.spec.volumes.iter().enumerate() {
                let path = match (v.read_only, hearth_types::Digest::from_hex(&v.image_id)) {
                    (true, Ok(id)) => self.inner.d.images.rootfs_path(&id),
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
        fl::MicroVm { version: 1, spec: Some(spec), status: Some(status) }
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
