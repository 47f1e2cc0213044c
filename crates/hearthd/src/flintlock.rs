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
use hearth_api::v1 as pb;
use hearth_types::net::{tap_name, BRIDGE_GATEWAY, BRIDGE_PREFIX};
use hearth_types::{ImageRef, NetworkMode, VmRecord, VmState};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::daemon::KeyedLocks;
use crate::daemon::{internal, now_secs, Daemon};
use crate::service::{Api, Streamed};

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

/// Where a microVM's life stands, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// Images being pulled, VM being created.
    Pending,
    /// The hearth VM exists and was started: its state is the microVM's.
    Created,
    /// Provisioning gave up; `reason` says why.
    Failed,
    /// Delete requested; the record goes once the VM is gone.
    Deleting,
}

/// A microVM's persisted intent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    uid: String,
    /// The spec as accepted (uid and instance_id filled in), protobuf-encoded in base64: echoed
    /// back field for field.
    spec: String,
    phase: Phase,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    retry: i32,
    created_at: u64,
    updated_at: u64,
}

impl Record {
    fn spec(&self) -> fl::MicroVmSpec {
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.spec).unwrap_or_default();
        fl::MicroVmSpec::decode(bytes.as_slice()).unwrap_or_default()
    }
}

/// The microVM records, one JSON file per uid.
#[derive(Debug)]
struct Records {
    dir: PathBuf,
    /// Serialises read-modify-write of records.
    write: Mutex<()>,
}

impl Records {
    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    fn get(&self, uid: &str) -> Result<Option<Record>, Status> {
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(None);
        }
        match std::fs::read(self.path(uid)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(internal),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(internal(e)),
        }
    }

    fn save(&self, rec: &mut Record) -> Result<(), Status> {
        rec.updated_at = now_secs();
        let bytes = serde_json::to_vec_pretty(rec).map_err(internal)?;
        hearth_store::atomic_write(&self.path(&rec.uid), &bytes).map_err(internal)
    }

    /// Reads, changes and saves a record as one step against other updates. A record marked for
    /// deletion keeps that mark whatever `change` does. `None` when there is no such record.
    fn update(&self, uid: &str, change: impl FnOnce(&mut Record)) -> Result<Option<Record>, Status> {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut rec) = self.get(uid)? else { return Ok(None) };
        let deleting = rec.phase == Phase::Deleting;
        change(&mut rec);
        if deleting {
            rec.phase = Phase::Deleting;
        }
        self.save(&mut rec)?;
        Ok(Some(rec))
    }

    /// Removes a record; under the same lock as [`Records::update`], so an update racing the
    /// removal can never write the record back.
    fn remove(&self, uid: &str) -> Result<(), Status> {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(self.path(uid)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(internal(e)),
            _ => Ok(()),
        }
    }

    fn list(&self) -> Result<Vec<Record>, Status> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(internal)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(uid) = name.strip_suffix(".json") {
                match self.get(uid) {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => {}
                    // One unreadable record must not hide every other microVM.
                    Err(e) => warn!(uid, error = %e.message(), "skipping an unreadable microvm record"),
                }
            }
        }
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(out)
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct Flintlock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    d: Arc<Daemon>,
    api: Api,
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
        let api = Api::new(d.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                d,
                api,
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
        let Some(a) = spec.interfaces.first().and_then(|i| i.address.as_ref()) else { return Ok(()) };
        let ip = static_address(a).map_err(Status::invalid_argument)?;
        let vms = self.inner.d.vms.list().map_err(internal)?;
        if let Some(vm) = vms.iter().find(|r| r.spec.address == Some(ip) && r.spec.labels.get(UID_LABEL).map(String::as_str) != Some(uid)) {
            return Err(Status::already_exists(format!("address {ip} is taken by VM {}; choose another", vm.spec.name)));
        }
        let mut reserved = self.inner.d.reserved_addresses.lock().unwrap_or_else(|e| e.into_inner());
        match reserved.get(&ip) {
            Some(holder) if holder != uid => {
                Err(Status::already_exists(format!("address {ip} is promised to microvm {holder}; choose another")))
            }
            _ => {
                reserved.insert(ip, uid.to_owned());
                Ok(())
            }
        }
    }

    fn release_address(&self, uid: &str) {
        self.inner.d.reserved_addresses.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, holder| holder != uid);
    }

    /// The hearth VM of a microVM, if it exists.
    fn vm_of(&self, uid: &str) -> Result<Option<VmRecord>, Status> {
        Ok(self.vms_by_uid()?.remove(uid))
    }

    /// Every hearth VM that belongs to a microVM, by uid (one read of the store for a listing).
    fn vms_by_uid(&self) -> Result<HashMap<String, VmRecord>, Status> {
        let vms = self.inner.d.vms.list().map_err(internal)?;
        Ok(vms.into_iter().filter_map(|r| r.spec.labels.get(UID_LABEL).cloned().map(|u| (u, r))).collect())
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
                    let permanent = !matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown);
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
                Err(e) => warn!(uid, error = %e.message(), "recording microvm state failed; retrying"),
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
                tokio::task::spawn_blocking(move || crate::service::kernel_from_image(&d2, &kernel_img, &name, filename.as_deref()))
                    .await
                    .map_err(internal)?
                    .map_err(|e| Status::failed_precondition(format!("kernel image {}: {e:#}", kernel_spec.image)))?;
            }
        }
        let root = spec.root_volume.as_ref().and_then(|v| v.source.as_ref()).and_then(|s| s.container_source.clone()).unwrap_or_default();
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
            let start = pb::StartVmRequest { r#ref: vm.spec.id.as_str().to_owned(), wait_ready: false };
            hearth_api::v1::hearth_server::Hearth::start_vm(&self.inner.api, Request::new(start)).await?;
        }
        Ok(())
    }

    /// Runs `work` (a pull) until it ends or the microVM's deletion begins, whichever is first:
    /// a delete never waits behind a registry that stalls. Left behind, a pull only fills the
    /// image store.
    async fn until_deleted<T>(&self, uid: &str, work: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let mut deleting = {
            let mut map = self.inner.deleting.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(uid.to_owned()).or_insert_with(|| tokio::sync::watch::channel(false).0).subscribe()
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
            let opts = crate::reconcile::Options::default();
            self.inner.api.set_desired(vm.spec.id.as_str(), hearth_types::Desired::Deleted, opts).await?;
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
        let mut status = fl::MicroVmStatus { state: state as i32, retry: rec.retry, reason, ..Default::default() };
        if let Some(vm) = vm {
            if let (Some(i), true) = (spec.interfaces.first(), vm.spec.network != NetworkMode::None) {
                let host_device_name = if vm.spec.network == NetworkMode::Bridge { tap_name(&vm.spec.id) } else { String::new() };
                let iface = fl::NetworkInterfaceStatus { host_device_name, index: 0, mac_address: vm.spec.mac() };
                status.network_interfaces.insert(i.device_id.clone(), iface);
            }
            if let Some(disk) = &vm.status.disk_path {
                let id = spec.root_volume.as_ref().map(|v| v.id.clone()).unwrap_or_else(|| "root".into());
                let mount = fl::Mount { r#type: fl::mount::MountType::Hostpath as i32, source: disk.clone() };
                status.volumes.insert(id, fl::VolumeStatus { mount: Some(mount) });
            }
            // Additional volumes: the shared cached filesystem when read-only, else the VM's copy.
            for (i, v) in vm.spec.volumes.iter().enumerate() {
                let path = match (v.read_only, hearth_types::Digest::from_hex(&v.image_id)) {
                    (true, Ok(id)) => self.inner.d.images.rootfs_path(&id),
                    _ => crate::adapters::volume_path(&self.inner.d.vm_dir(&vm.spec.id), i),
                };
                let mount = fl::Mount { r#type: fl::mount::MountType::Hostpath as i32, source: path.display().to_string() };
                status.volumes.insert(v.id.clone(), fl::VolumeStatus { mount: Some(mount) });
            }
            let kernel = self.inner.d.kernels.kernel_path(&vm.spec.kernel);
            status.kernel_mount = Some(fl::Mount { r#type: fl::mount::MountType::Hostpath as i32, source: kernel.display().to_string() });
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

/// PENDING until the guest is up, CREATED while it runs, FAILED with a reason otherwise.
fn observed_state(rec: &Record, vm: Option<&VmRecord>) -> (fl::micro_vm_status::MicroVmState, String) {
    use fl::micro_vm_status::MicroVmState as S;
    match (rec.phase, vm) {
        (Phase::Deleting, _) => (S::Deleting, String::new()),
        (Phase::Failed, _) => (S::Failed, rec.reason.clone()),
        (Phase::Pending, _) => (S::Pending, rec.reason.clone()),
        (Phase::Created, None) => (S::Failed, "the VM was removed outside the Flintlock API (hearth rm)".into()),
        (Phase::Created, Some(vm)) => match vm.status.state {
            VmState::Running => (S::Created, String::new()),
            VmState::Created | VmState::Starting => (S::Pending, String::new()),
            VmState::Stopping | VmState::Stopped | VmState::Failed => {
                let why = if vm.status.reason.is_empty() { format!("the VM is {}", vm.status.state) } else { vm.status.reason.clone() };
                (S::Failed, why)
            }
        },
    }
}

/// 2, 4, 8 … seconds, at most 32.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1 << attempt.clamp(1, 5))
}

fn timestamp(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: secs as i64, nanos: 0 }
}

/// The image from the store, pulled first when it is not there (http for loopback registries,
/// as `hearth image pull`).
async fn pull(d: &Arc<Daemon>, reference: &str) -> Result<hearth_types::ImageRecord, Status> {
    let r: ImageRef = reference.parse().map_err(|e| Status::invalid_argument(format!("image {reference:?}: {e}")))?;
    if let Some(img) = d.images.get(reference).map_err(internal)? {
        return Ok(img);
    }
    let d = d.clone();
    let what = reference.to_owned();
    tokio::task::spawn_blocking(move || d.images.pull(&r, &d.pull_options(false), &hearth_image::NoProgress))
        .await
        .map_err(internal)?
        .map_err(|e| {
            // A refused or absent image stays so; a stalled or unreachable registry may not.
            use hearth_image::PullError as P;
            let permanent = matches!(e, P::Refused { .. } | P::NotFound { .. } | P::Platform { .. } | P::MediaType { .. });
            let msg = format!("pulling {what}: {:#}", anyhow::Error::from(e));
            if permanent {
                Status::failed_precondition(msg)
            } else {
                Status::unavailable(msg)
            }
        })
}

/// A kernel's store name: the image id, and the file when it is not Ignite's layout.
fn kernel_name(image_id12: &str, filename: Option<&str>) -> String {
    match filename {
        None => format!("{KERNEL_PREFIX}{image_id12}"),
        Some(f) => {
            let slug: String = f.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
            let mut n = format!("{KERNEL_PREFIX}{image_id12}-{}", slug.trim_matches('-'));
            n.truncate(63);
            n
        }
    }
}

/// Checks a spec and fills Flintlock's defaults; returns it ready to store.
fn validate(mut spec: fl::MicroVmSpec, network: NetworkMode) -> Result<fl::MicroVmSpec, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if spec.id.is_empty() {
        return bad("microvm id (its name) is required".into());
    }
    if spec.namespace.is_empty() {
        spec.namespace = DEFAULT_NAMESPACE.into();
    }
    if let Err(e) = hearth_types::validate_name(&vm_name(&spec)) {
        return bad(format!("microvm {}/{}: {e} (hearth names the VM ID.NAMESPACE)", spec.namespace, spec.id));
    }
    if spec.vcpu == 0 {
        spec.vcpu = DEFAULT_VCPU;
    }
    if spec.memory_in_mb == 0 {
        spec.memory_in_mb = DEFAULT_MEMORY_MB;
    }
    if !(1..=hearth_types::vm::MAX_CPUS as i32).contains(&spec.vcpu) {
        return bad(format!("vcpu must be between 1 and {}, got {}", hearth_types::vm::MAX_CPUS, spec.vcpu));
    }
    if i64::from(spec.memory_in_mb) < hearth_types::vm::MIN_MEMORY_MIB as i64 {
        return bad(format!("memory_in_mb must be at least {}, got {}", hearth_types::vm::MIN_MEMORY_MIB, spec.memory_in_mb));
    }
    match &spec.kernel {
        Some(k) if !k.image.is_empty() => {}
        _ => return bad("kernel.image is required: an OCI image holding the kernel (e.g. boot/vmlinux)".into()),
    }
    if spec.initrd.is_some() {
        return bad("initrd is not supported: hearth boots its own initramfs with hearth-init; drop the initrd".into());
    }
    let root = spec.root_volume.as_ref().and_then(|v| v.source.as_ref()).and_then(|s| s.container_source.as_deref()).unwrap_or("");
    if root.is_empty() {
        return bad("root_volume.source.container_source is required: the OCI image of the root filesystem".into());
    }
    if spec.root_volume.as_ref().is_some_and(|v| v.is_read_only) {
        return bad("a read-only root volume is not supported; set is_read_only false".into());
    }
    for (i, v) in spec.additional_volumes.iter().enumerate() {
        let source = v.source.clone().unwrap_or_default();
        if source.virtiofs_source.as_deref().is_some_and(|s| !s.is_empty()) {
            return bad(format!("volume {}: virtiofs sources are not supported (Cloud Hypervisor only); use container_source", v.id));
        }
        if source.container_source.as_deref().unwrap_or("").is_empty() {
            return bad(format!("volume {}: source.container_source (an OCI image) is required", v.id));
        }
        if v.id.is_empty() || spec.additional_volumes[..i].iter().any(|o| o.id == v.id) {
            return bad(format!("volume id {:?} must be given and unique", v.id));
        }
        if let Some(m) = v.mount_point.as_deref().filter(|m| !m.is_empty()) {
            if !m.starts_with('/') || m == "/" {
                return bad(format!("volume {}: mount_point {m:?} must be an absolute path other than /", v.id));
            }
        }
    }
    if spec.interfaces.len() > 1 {
        return bad(format!("{} network interfaces given: hearth gives a microvm one network card for now", spec.interfaces.len()));
    }
    for i in &spec.interfaces {
        if i.device_id.is_empty() {
            return bad("network interface device_id is required (e.g. eth1)".into());
        }
        if let Some(mac) = i.guest_mac.as_deref().filter(|m| !m.is_empty()) {
            hearth_types::net::validate_mac(mac).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if let Some(a) = &i.address {
            if network != NetworkMode::Bridge {
                return bad(format!(
                    "interface {}: static addresses need the bridge network (hearthd --flintlock-network bridge); leave address empty",
                    i.device_id
                ));
            }
            static_address(a).map_err(|m| Status::invalid_argument(format!("interface {}: {m}", i.device_id)))?;
        }
    }
    match spec.provider.as_deref() {
        None | Some("" | "qemu") => {}
        Some(p) => return bad(format!("provider {p:?} is not available on this host; leave it empty or use \"qemu\"")),
    }
    for (key, value) in &spec.metadata {
        if !hearth_types::vm::CLOUD_INIT_FILES.contains(&key.as_str()) {
            return bad(format!("metadata key {key:?} is not one of meta-data, user-data, vendor-data, network-config"));
        }
        if base64::engine::general_purpose::STANDARD.decode(value).is_err() {
            return bad(format!("metadata {key:?} is not base64"));
        }
    }
    Ok(spec)
}

/// The image of a container-sourced volume.
fn volume_image(v: &fl::Volume) -> String {
    v.source.as_ref().and_then(|s| s.container_source.clone()).unwrap_or_default()
}

/// The hearth VM's name for a microVM.
fn vm_name(spec: &fl::MicroVmSpec) -> String {
    format!("{}.{}", spec.id, spec.namespace)
}

/// Sets `instance_id` (and cloud-init's own `instance-id`) in the meta-data, as Flintlock does.
fn inject_instance_id(spec: &mut fl::MicroVmSpec, uid: &str) -> Result<(), Status> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let current = spec.metadata.get("meta-data").map(|v| b64.decode(v).unwrap_or_default()).unwrap_or_default();
    let mut doc: serde_yaml::Mapping = if current.iter().all(u8::is_ascii_whitespace) {
        serde_yaml::Mapping::new()
    } else {
        serde_yaml::from_slice(&current).map_err(|e| Status::invalid_argument(format!("metadata meta-data is not a YAML mapping: {e}")))?
    };
    doc.insert("instance_id".into(), uid.into());
    if !doc.contains_key("instance-id") {
        doc.insert("instance-id".into(), uid.into());
    }
    let text = serde_yaml::to_string(&doc).map_err(internal)?;
    spec.metadata.insert("meta-data".into(), b64.encode(text));
    Ok(())
}

/// The guest address of a static interface address, which must lie on hearth's bridge.
fn static_address(a: &fl::StaticAddress) -> Result<std::net::Ipv4Addr, String> {
    let (ip, prefix) = a.address.split_once('/').ok_or_else(|| format!("address {:?} is not CIDR (like 10.61.0.50/16)", a.address))?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| format!("address {:?} is not an IPv4 CIDR", a.address))?;
    if prefix != BRIDGE_PREFIX.to_string() {
        return Err(format!("address {}: the bridge network is {BRIDGE_GATEWAY}/{BRIDGE_PREFIX}; use /{BRIDGE_PREFIX}", a.address));
    }
    hearth_types::net::check_bridge_address(ip).map_err(|e| e.to_string())?;
    if let Some(gw) = a.gateway.as_deref().filter(|g| !g.is_empty()) {
        if gw.split('/').next() != Some(&BRIDGE_GATEWAY.to_string()) {
            return Err(format!("gateway {gw}: the bridge's gateway is {BRIDGE_GATEWAY}"));
        }
    }
    Ok(ip)
}

/// The hearth VM for a microVM: its image's own init as PID 1, cloud-init seeded.
fn create_request(spec: &fl::MicroVmSpec, uid: &str, kernel: &str, network: NetworkMode) -> Result<pb::CreateVmRequest, Status> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let mut cloud_init: HashMap<String, String> = HashMap::new();
    for (k, v) in &spec.metadata {
        let bytes = b64.decode(v).map_err(|_| Status::invalid_argument(format!("metadata {k:?} is not base64")))?;
        cloud_init.insert(k.clone(), String::from_utf8_lossy(&bytes).into_owned());
    }
    let iface = spec.interfaces.first();
    let mac = iface.and_then(|i| i.guest_mac.clone()).filter(|m| !m.is_empty()).unwrap_or_default();
    let kernel_spec = spec.kernel.clone().unwrap_or_default();
    // The network-config is written when the VM starts, from the address it was given.
    let cloud_init_network = iface.filter(|_| kernel_spec.add_network_config).map(|i| i.device_id.clone()).unwrap_or_default();
    let address = match iface.and_then(|i| i.address.as_ref()) {
        Some(a) => static_address(a).map_err(Status::invalid_argument)?.to_string(),
        None => String::new(),
    };
    let cmdline: BTreeMap<_, _> = kernel_spec.cmdline.iter().collect();
    let kernel_args =
        cmdline.iter().map(|(k, v)| if v.is_empty() { (*k).clone() } else { format!("{k}={v}") }).collect::<Vec<_>>().join(" ");
    let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
    labels.insert(UID_LABEL.into(), uid.into());
    let root = spec.root_volume.clone().unwrap_or_default();
    let size = root.size_in_mb.filter(|&s| s > 0).map(|s| s as u64 * (1 << 20)).unwrap_or(hearth_types::vm::DEFAULT_DISK_BYTES);
    Ok(pb::CreateVmRequest {
        name: vm_name(spec),
        image: root.source.and_then(|s| s.container_source).unwrap_or_default(),
        kernel: kernel.into(),
        cpus: spec.vcpu as u32,
        memory_mib: spec.memory_in_mb as u64,
        disk_bytes: size,
        kernel_args,
        has_entrypoint: true,
        entrypoint: vec!["/sbin/init".into()],
        labels,
        network: if iface.is_some() { network.to_string() } else { NetworkMode::None.to_string() },
        mac,
        cloud_init,
        address,
        cloud_init_network,
        volumes: spec
            .additional_volumes
            .iter()
            .map(|v| pb::VolumeRequest {
                id: v.id.clone(),
                image: volume_image(v),
                mount_point: v.mount_point.clone().unwrap_or_default(),
                read_only: v.is_read_only,
            })
            .collect(),
        ..Default::default()
    })
}

fn not_found(uid: &str) -> Status {
    // CAPMVM matches "not found" in the text; the code is a real NOT_FOUND.
    Status::not_found(format!("microvm spec {uid} not found"))
}

#[tonic::async_trait]
impl MicroVm for Flintlock {
    async fn create_micro_vm(&self, req: Request<fpb::CreateMicroVmRequest>) -> Result<Response<fpb::CreateMicroVmResponse>, Status> {
        let spec = req.into_inner().microvm.ok_or_else(|| Status::invalid_argument("microvm spec is required"))?;
        let mut spec = validate(spec, self.inner.network)?;
        let uid = ulid::Ulid::new().to_string();
        spec.uid = Some(uid.clone());
        inject_instance_id(&mut spec, &uid)?;
        // Fill in the MAC now, so the card keeps it for the VM's life and the client sees it.
        for i in &mut spec.interfaces {
            if i.guest_mac.as_deref().unwrap_or("").is_empty() {
                let bytes: [u8; 5] = rand::random();
                i.guest_mac = Some(format!("02:{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")));
            }
        }
        let mut rec = Record {
            uid: uid.clone(),
            spec: base64::engine::general_purpose::STANDARD.encode(spec.encode_to_vec()),
            phase: Phase::Pending,
            reason: String::new(),
            retry: 0,
            created_at: now_secs(),
            updated_at: 0,
        };
        {
            let _g = self.inner.create.lock().await;
            if let Some(other) = self.records_in(&spec.namespace, Some(&spec.id))?.first() {
                let name = format!("{}/{}", spec.namespace, spec.id);
                return Err(if other.phase == Phase::Deleting {
                    // Its VM still holds the name and address: a retry after it is gone succeeds.
                    Status::unavailable(format!("microvm {name} (uid {}) is being deleted; create it again once it is gone", other.uid))
                } else {
                    Status::already_exists(format!("microvm {name} already exists (uid {}); delete it or choose another id", other.uid))
                });
            }
            self.reserve_address(&spec, &uid)?;
            if let Err(e) = self.inner.records.save(&mut rec) {
                self.release_address(&uid);
                return Err(e);
            }
        }
        info!(uid, namespace = %spec.namespace, name = %spec.id, "microvm accepted");
        self.spawn_provision(uid);
        // A new record has no VM yet: the answer is PENDING, as Flintlock's.
        Ok(Response::new(fpb::CreateMicroVmResponse { microvm: Some(self.microvm(&rec, None)) }))
    }

    async fn delete_micro_vm(&self, req: Request<fpb::DeleteMicroVmRequest>) -> Result<Response<()>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(Status::invalid_argument("uid is required"));
        }
        self.inner.records.update(&uid, |rec| rec.phase = Phase::Deleting)?.ok_or_else(|| not_found(&uid))?;
        self.signal_deleting(&uid);
        // Deleting is idempotent under the microVM's lock: a repeated Delete starts it again.
        self.spawn_delete(uid);
        Ok(Response::new(()))
    }

    async fn get_micro_vm(&self, req: Request<fpb::GetMicroVmRequest>) -> Result<Response<fpb::GetMicroVmResponse>, Status> {
        let uid = req.into_inner().uid;
        if uid.is_empty() {
            return Err(Status::invalid_argument("uid is required"));
        }
        let rec = self.inner.records.get(&uid)?.ok_or_else(|| not_found(&uid))?;
        let vm = self.vm_of(&uid)?;
        Ok(Response::new(fpb::GetMicroVmResponse { microvm: Some(self.microvm(&rec, vm.as_ref())) }))
    }

    async fn list_micro_v_ms(&self, req: Request<fpb::ListMicroVMsRequest>) -> Result<Response<fpb::ListMicroVMsResponse>, Status> {
        let req = req.into_inner();
        let name = req.name.as_deref().filter(|n| !n.is_empty());
        let list = self.records_in(&req.namespace, name)?;
        let microvm = self.microvms(&list)?;
        Ok(Response::new(fpb::ListMicroVMsResponse { microvm }))
    }

    type ListMicroVMsStreamStream = Streamed<fpb::ListMessage>;
    async fn list_micro_v_ms_stream(
        &self,
        req: Request<fpb::ListMicroVMsRequest>,
    ) -> Result<Response<Self::ListMicroVMsStreamStream>, Status> {
        let req = req.into_inner();
        if req.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let list = self.records_in(&req.namespace, None)?;
        let items: Vec<Result<fpb::ListMessage, Status>> =
            self.microvms(&list)?.into_iter().map(|m| Ok(fpb::ListMessage { microvm: Some(m) })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// Checks `authorization: Basic <base64(token)>` (scheme case-insensitive), as Flintlock's
/// `--basic-auth-token`.
pub fn check_basic_auth(token: &str, req: &Request<()>) -> Result<(), Status> {
    let expected = base64::engine::general_purpose::STANDARD.encode(token);
    let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    match given.split_once(' ') {
        Some((scheme, value)) if scheme.eq_ignore_ascii_case("basic") && constant_time_eq(value.trim().as_bytes(), expected.as_bytes()) => {
            Ok(())
        }
        _ => Err(Status::unauthenticated("missing or wrong authorization: send \"authorization: Basic <base64 of the token>\"")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> fl::MicroVmSpec {
        fl::MicroVmSpec {
            id: "mvm0".into(),
            kernel: Some(fl::Kernel { image: "reg/kernel:1".into(), ..Default::default() }),
            root_volume: Some(fl::Volume {
                id: "root".into(),
                source: Some(fl::VolumeSource { container_source: Some("reg/os:1".into()), ..Default::default() }),
                ..Default::default()
            }),
            interfaces: vec![fl::NetworkInterface { device_id: "eth1".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn validation_fills_flintlocks_defaults() {
        let s = validate(good(), NetworkMode::User).expect("valid");
        assert_eq!((s.namespace.as_str(), s.vcpu, s.memory_in_mb), ("default", 2, 1024));
    }

    #[test]
    fn validation_names_what_is_wrong() {
        type Change = Box<dyn Fn(&mut fl::MicroVmSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.id.clear()), "id"),
            (Box::new(|s| s.kernel = None), "kernel.image"),
            (Box::new(|s| s.root_volume = None), "container_source"),
            (Box::new(|s| s.vcpu = 65), "vcpu"),
            (Box::new(|s| s.memory_in_mb = 16), "memory_in_mb"),
            (Box::new(|s| s.initrd = Some(fl::Initrd::default())), "initrd"),
            (Box::new(|s| s.provider = Some("firecracker".into())), "provider"),
            (Box::new(|s| s.interfaces[0].guest_mac = Some("01:00:00:00:00:01".into())), "MAC"),
            (Box::new(|s| s.metadata.insert("userdata".into(), String::new()).map(drop).unwrap_or(())), "userdata"),
            (Box::new(|s| s.metadata.insert("user-data".into(), "not base64!".into()).map(drop).unwrap_or(())), "base64"),
            (Box::new(|s| s.id = "bad name".into()), "bad name"),
            (Box::new(|s| s.additional_volumes.push(fl::Volume { id: "v".into(), ..Default::default() })), "container_source"),
            (
                Box::new(|s| {
                    let src = fl::VolumeSource { virtiofs_source: Some("/srv".into()), ..Default::default() };
                    s.additional_volumes.push(fl::Volume { id: "v".into(), source: Some(src), ..Default::default() })
                }),
                "virtiofs",
            ),
        ];
        for (change, needle) in cases {
            let mut s = good();
            change(&mut s);
            let e = validate(s, NetworkMode::User).expect_err(needle);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
    }

    #[test]
    fn instance_id_is_injected_and_the_rest_of_the_meta_data_kept() {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let mut s = good();
        s.metadata.insert("meta-data".into(), b64.encode("local_hostname: node1\ninstance_id: client-chose-this\n"));
        inject_instance_id(&mut s, "01ABC").expect("inject");
        let text = String::from_utf8(b64.decode(&s.metadata["meta-data"]).expect("b64")).expect("utf8");
        let doc: serde_yaml::Mapping = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(doc.get("instance_id").and_then(|v| v.as_str()), Some("01ABC"));
        assert_eq!(doc.get("instance-id").and_then(|v| v.as_str()), Some("01ABC"));
        assert_eq!(doc.get("local_hostname").and_then(|v| v.as_str()), Some("node1"));
        let mut empty = good();
        inject_instance_id(&mut empty, "01XYZ").expect("inject");
        assert!(String::from_utf8(b64.decode(&empty.metadata["meta-data"]).expect("b64")).expect("utf8").contains("instance_id: 01XYZ"));
    }

    #[test]
    fn the_create_request_carries_cloud_init_the_mac_and_kernel_arguments() {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let mut s = validate(good(), NetworkMode::User).expect("valid");
        s.interfaces[0].guest_mac = Some("02:00:00:00:00:07".into());
        let k = s.kernel.as_mut().expect("kernel");
        k.add_network_config = true;
        k.cmdline.insert("console".into(), "ttyS0".into());
        k.cmdline.insert("quiet".into(), String::new());
        s.metadata.insert("user-data".into(), b64.encode("#cloud-config\n"));
        s.labels.insert("cluster-name".into(), "c1".into());
        let req = create_request(&s, "01ABC", "fl-0123", NetworkMode::User).expect("request");
        assert_eq!(req.name, "mvm0.default");
        assert_eq!(req.image, "reg/os:1");
        assert_eq!((req.cpus, req.memory_mib), (2, 1024));
        assert_eq!(req.entrypoint, vec!["/sbin/init"]);
        assert_eq!(req.mac, "02:00:00:00:00:07");
        assert_eq!(req.kernel_args, "console=ttyS0 quiet");
        assert_eq!(req.cloud_init["user-data"], "#cloud-config\n");
        assert_eq!(req.cloud_init_network, "eth1", "network-config is generated for eth1 at start");
        assert_eq!(req.labels[UID_LABEL], "01ABC");
        assert_eq!(req.labels["cluster-name"], "c1");
        assert_eq!(req.network, "user");
    }

    #[test]
    fn static_addresses_need_the_bridge_and_must_lie_on_it() {
        let with = |address: &str, gateway: Option<&str>| {
            let mut s = good();
            let a = fl::StaticAddress { address: address.into(), gateway: gateway.map(Into::into), nameservers: vec![] };
            s.interfaces[0].address = Some(a);
            s
        };
        let e = validate(with("10.61.0.50/16", None), NetworkMode::User).expect_err("user mode");
        assert!(e.message().contains("--flintlock-network bridge"), "{}", e.message());
        let ok = validate(with("10.61.0.50/16", Some("10.61.0.1/16")), NetworkMode::Bridge).expect("on the bridge");
        let req = create_request(&ok, "01ABC", "fl-0", NetworkMode::Bridge).expect("request");
        assert_eq!((req.address.as_str(), req.network.as_str()), ("10.61.0.50", "bridge"));
        for (address, gateway, needle) in [
            ("192.168.1.5/24", None, "/16"),
            ("192.168.1.5/16", None, "not a host address"),
            ("10.61.0.1/16", None, "not a host address"),
            ("10.61.0.50", None, "CIDR"),
            ("10.61.0.50/16", Some("10.61.0.254"), "gateway"),
        ] {
            let e = validate(with(address, gateway), NetworkMode::Bridge).expect_err(address);
            assert!(e.message().contains(needle), "{address}: {}", e.message());
        }
    }

    #[test]
    fn the_state_follows_the_vm() {
        use fl::micro_vm_status::MicroVmState as S;
        let rec = |phase| Record {
            uid: "u".into(),
            spec: String::new(),
            phase,
            reason: "pull failed".into(),
            retry: 0,
            created_at: 0,
            updated_at: 0,
        };
        let vm = |state| hearth_testkit::record(1, hearth_types::Desired::Running, state);
        assert_eq!(observed_state(&rec(Phase::Pending), None).0, S::Pending);
        assert_eq!(observed_state(&rec(Phase::Failed), None), (S::Failed, "pull failed".into()));
        assert_eq!(observed_state(&rec(Phase::Deleting), Some(&vm(VmState::Running))).0, S::Deleting);
        assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Starting))).0, S::Pending);
        assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Running))).0, S::Created);
        assert_eq!(observed_state(&rec(Phase::Created), Some(&vm(VmState::Stopped))).0, S::Failed);
        assert!(observed_state(&rec(Phase::Created), None).1.contains("removed"));
    }

    #[test]
    fn basic_auth_wants_the_base64_token_under_any_case_of_basic() {
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().expect("header"));
            r
        };
        let token = base64::engine::general_purpose::STANDARD.encode("s3cret");
        assert!(check_basic_auth("s3cret", &with(&format!("Basic {token}"))).is_ok());
        assert!(check_basic_auth("s3cret", &with(&format!("basic {token}"))).is_ok());
        assert_eq!(check_basic_auth("s3cret", &with("Basic czNjcmV")).expect_err("wrong").code(), tonic::Code::Unauthenticated);
        assert_eq!(check_basic_auth("s3cret", &with(&format!("Bearer {token}"))).expect_err("scheme").code(), tonic::Code::Unauthenticated);
        assert!(check_basic_auth("s3cret", &Request::new(())).is_err());
    }

    #[test]
    fn kernel_names_are_valid_store_names() {
        assert_eq!(kernel_name("0123456789ab", None), "fl-0123456789ab");
        let n = kernel_name("0123456789ab", Some("/boot/vmlinux-6.1"));
        assert_eq!(n, "fl-0123456789ab-boot-vmlinux-6-1");
        assert!(hearth_types::validate_name(&n).is_ok());
    }
}
