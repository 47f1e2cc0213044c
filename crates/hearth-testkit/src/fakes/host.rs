//! The host's side in memory: records, disks, claims on ports and uids, guests.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hearth_core::ports::{
    Confinement, DiskState, Disks, Guests, Images, Kernels, Keys, NetLaunch, NetPlan, Network,
    RootFs, Sandbox, VmRepository, VolumeDisk,
};
use hearth_core::{Error, Result};
use hearth_types::agent::Ready;
use hearth_types::guest::GuestExit;
use hearth_types::{
    Digest, GuestConfig, ImageConfig, ImageRecord, NetworkMode, VmId, VmRecord, VmSpec,
};

use super::FakeVmm;

/// Where the fake VM directories are.
const VMS: &str = "/fake/vms";

#[derive(Debug, Default)]
struct State {
    records: HashMap<VmId, VmRecord>,
    removed: Vec<VmId>,
    dirs: HashSet<VmId>,
    disks: HashSet<VmId>,
    configs: HashSet<VmId>,
    exits: HashMap<VmId, GuestExit>,
    fail_saves: bool,
    fail_disks: Option<String>,
    fail_console: bool,
    never_ready: bool,
    ignore_shutdown: bool,
    port_claims: HashSet<VmId>,
    attached: HashSet<VmId>,
    released: Vec<(VmId, bool)>,
    uids: HashSet<u32>,
    next_uid: u32,
    images: Vec<(ImageRecord, RootFs)>,
    kernels: Vec<String>,
    /// Kernels that are not bzImages, by name.
    kernel_formats: HashMap<String, hearth_core::ports::KernelFormat>,
    capacity: Option<u64>,
    keys_made: Vec<PathBuf>,
    discarded: Vec<VmId>,
    fail_keys: bool,
    /// Host paths a volume may attach, with the disk each names (two paths may name one).
    host_disks: HashMap<String, String>,
    /// Snapshots: committed records, and names begun (files made).
    snapshots: HashMap<String, hearth_types::snapshot::SnapshotRecord>,
    snapshots_begun: HashSet<String>,
    /// VMs given a snapshot's disks, and the identities guests were told.
    restored_disks: Vec<(VmId, String)>,
    identities: Vec<(VmId, hearth_types::agent::Identity)>,
}

/// Records, disks, network, guests and sandbox, in memory.
#[derive(Debug)]
pub struct FakeHost {
    state: Mutex<State>,
    vmm: Arc<FakeVmm>,
}

impl FakeHost {
    fn state_file_of(&self, name: &str) -> PathBuf {
        Path::new("/fake/snapshots").join(name).join(hearth_core::ports::snapshots::STATE_FILE)
    }

    /// The identities guests restored from snapshots were told, in order.
    pub fn identities(&self) -> Vec<(VmId, hearth_types::agent::Identity)> {
        self.state().identities.clone()
    }

    /// The VMs given a snapshot's disks, with the snapshot.
    pub fn restored_disks(&self) -> Vec<(VmId, String)> {
        self.state().restored_disks.clone()
    }

    pub fn new(vmm: Arc<FakeVmm>) -> Self {
        Self { state: Mutex::new(State::default()), vmm }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a record as it was before a crash (no waking, no checks).
    pub fn put(&self, rec: VmRecord) {
        let mut s = self.state();
        s.dirs.insert(rec.spec.id.clone());
        s.records.insert(rec.spec.id.clone(), rec);
    }

    /// Marks a VM's disks as made (a VM created before a crash).
    pub fn with_disks(&self, id: &VmId) {
        let mut s = self.state();
        s.disks.insert(id.clone());
        s.configs.insert(id.clone());
    }

    pub fn record(&self, id: &VmId) -> Option<VmRecord> {
        self.state().records.get(id).cloned()
    }

    /// VMs whose record was removed.
    pub fn removed(&self) -> Vec<VmId> {
        self.state().removed.clone()
    }

    /// The guest's workload ends with `exit_code` (hearth-init writes its exit record).
    pub fn guest_exit(&self, id: &VmId, exit_code: i32) {
        self.state().exits.insert(id.clone(), GuestExit { exit_code, signal: None, error: None });
    }

    /// A file or block device on the host at `path`, the disk `disk` (give two paths one disk
    /// for a link and its target).
    pub fn host_disk(&self, path: &str, disk: &str) {
        self.state().host_disks.insert(path.to_owned(), disk.to_owned());
    }

    pub fn fail_saves(&self, fail: bool) {
        self.state().fail_saves = fail;
    }
    pub fn fail_disks(&self, why: &str) {
        self.state().fail_disks = Some(why.to_owned());
    }
    pub fn fail_console(&self) {
        self.state().fail_console = true;
    }
    /// Guests never report ready.
    pub fn never_ready(&self) {
        self.state().never_ready = true;
    }
    /// Guests ignore the agent's shutdown request.
    pub fn ignore_shutdown(&self) {
        self.state().ignore_shutdown = true;
    }

    /// VMs whose launch still holds a claim on published ports.
    pub fn port_claims(&self) -> usize {
        self.state().port_claims.len()
    }
    /// VMM uids held by launches in flight.
    pub fn uid_claims(&self) -> usize {
        self.state().uids.len()
    }
    /// Network releases so far: (VM, whether it was removed).
    pub fn released(&self) -> Vec<(VmId, bool)> {
        self.state().released.clone()
    }
    /// Whether the VM's tap was put on the bridge.
    pub fn attached(&self, id: &VmId) -> bool {
        self.state().attached.contains(id)
    }
}

/// Stores, for create.
impl FakeHost {
    /// Adds an image `name` whose root filesystem is `bytes` long, with `users` (passwd,
    /// group) when it has a passwd file.
    pub fn add_image(
        &self,
        name: &str,
        config: ImageConfig,
        bytes: u64,
        users: Option<(&str, &str)>,
    ) -> ImageRecord {
        let mut s = self.state();
        let n = s.images.len() as u8 + 1;
        let hex: String = std::iter::repeat_n(format!("{n:02x}"), 32).collect();
        let image = ImageRecord {
            names: vec![name.to_owned()],
            id: Digest::from_hex(&hex).unwrap_or_else(|e| panic!("{e}")),
            manifest_digest: None,
            layers: vec![],
            config,
            size: bytes,
            created_at: 0,
        };
        let users = users.map(|(p, g)| (p.to_owned(), g.to_owned()));
        s.images.push((image.clone(), RootFs { bytes, users }));
        image
    }

    /// Adds a kernel; the first is the default.
    pub fn add_kernel(&self, name: &str) {
        self.state().kernels.push(name.to_owned());
    }

    /// A kernel of another format than a bzImage.
    pub fn add_kernel_of(&self, name: &str, format: hearth_core::ports::KernelFormat) {
        let mut s = self.state();
        s.kernels.push(name.to_owned());
        s.kernel_formats.insert(name.to_owned(), format);
    }

    /// The size of the filesystem disks are made on.
    pub fn set_capacity(&self, bytes: u64) {
        self.state().capacity = Some(bytes);
    }

    pub fn fail_keys(&self) {
        self.state().fail_keys = true;
    }

    /// The VMs whose directories a failed create discarded.
    pub fn discarded(&self) -> Vec<VmId> {
        self.state().discarded.clone()
    }

    /// The VM directories key pairs were generated in.
    pub fn keys_made(&self) -> Vec<PathBuf> {
        self.state().keys_made.clone()
    }
}

#[async_trait]
impl Images for FakeHost {
    fn find(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let s = self.state();
        let found = s
            .images
            .iter()
            .find(|(i, _)| i.names.iter().any(|n| n == reference) || i.id.hex() == reference);
        Ok(found.map(|(i, _)| i.clone()))
    }
    async fn root_fs(&self, image: &ImageRecord) -> Result<RootFs> {
        let s = self.state();
        let found = s.images.iter().find(|(i, _)| i.id == image.id);
        found.map(|(_, r)| r.clone()).ok_or_else(|| Error::internal("no such fake image"))
    }
    fn remove(&self, image: &ImageRecord) -> Result<ImageRecord> {
        self.state().images.retain(|(i, _)| i.id != image.id);
        Ok(image.clone())
    }
}

impl Keys for FakeHost {
    fn generate_ssh_key(&self, vm_dir: &Path, comment: &str) -> Result<(String, PathBuf)> {
        let mut s = self.state();
        if s.fail_keys {
            return Err(Error::internal("ssh-keygen: out of entropy"));
        }
        s.keys_made.push(vm_dir.to_owned());
        Ok((format!("ssh-ed25519 AAAAfake {comment}"), vm_dir.join("id_ed25519")))
    }
}

impl VmRepository for FakeHost {
    fn get(&self, id: &VmId) -> Result<Option<VmRecord>> {
        Ok(self.state().records.get(id).cloned())
    }
    fn save(&self, rec: &VmRecord) -> Result<()> {
        let mut s = self.state();
        if s.fail_saves {
            return Err(Error::internal("saving the record: No space left on device"));
        }
        s.dirs.insert(rec.spec.id.clone());
        s.records.insert(rec.spec.id.clone(), rec.clone());
        Ok(())
    }
    fn remove(&self, rec: &VmRecord) -> Result<()> {
        let mut s = self.state();
        let id = &rec.spec.id;
        s.records.remove(id);
        s.dirs.remove(id);
        s.disks.remove(id);
        s.configs.remove(id);
        s.removed.push(id.clone());
        Ok(())
    }
    fn list(&self) -> Result<Vec<VmRecord>> {
        let mut v: Vec<_> = self.state().records.values().cloned().collect();
        v.sort_by(|a, b| a.spec.id.as_str().cmp(b.spec.id.as_str()));
        Ok(v)
    }
    fn vm_dir(&self, id: &VmId) -> PathBuf {
        PathBuf::from(VMS).join(id.as_str())
    }
    fn vms_dir(&self) -> PathBuf {
        PathBuf::from(VMS)
    }
    fn discard(&self, id: &VmId) {
        let mut s = self.state();
        s.dirs.remove(id);
        s.discarded.push(id.clone());
    }
    fn name_holder(&self, name: &str) -> Option<VmId> {
        let s = self.state();
        s.records.values().find(|r| r.spec.name == name).map(|r| r.spec.id.clone())
    }
    fn address_holder(&self, a: Ipv4Addr) -> Option<String> {
        let s = self.state();
        let mut all = s.records.values();
        all.find(|r| r.spec.bridge_addresses().contains(&a)).map(|r| r.spec.name.clone())
    }
    fn used_addresses(&self) -> Vec<Ipv4Addr> {
        self.state().records.values().flat_map(|r| r.spec.bridge_addresses()).collect()
    }
}

#[async_trait]
impl Disks for FakeHost {
    fn observe(&self, rec: &VmRecord) -> DiskState {
        let s = self.state();
        let id = &rec.spec.id;
        DiskState {
            dir: s.dirs.contains(id),
            disk: s.disks.contains(id),
            config_disk: s.configs.contains(id),
        }
    }
    async fn create(&self, rec: &VmRecord) -> Result<PathBuf> {
        let mut s = self.state();
        if let Some(why) = &s.fail_disks {
            return Err(Error::precondition(why.clone()));
        }
        s.disks.insert(rec.spec.id.clone());
        Ok(self.vm_dir(&rec.spec.id).join("disk.img"))
    }
    async fn write_config(&self, rec: &VmRecord) -> Result<()> {
        self.state().configs.insert(rec.spec.id.clone());
        Ok(())
    }
    async fn attach(&self, rec: &VmRecord) -> Result<(PathBuf, PathBuf, Vec<VolumeDisk>)> {
        let dir = self.vm_dir(&rec.spec.id);
        Ok((dir.join("disk.img"), dir.join("config.img"), vec![]))
    }
    fn clear_exit(&self, rec: &VmRecord) -> Result<()> {
        self.state().exits.remove(&rec.spec.id);
        Ok(())
    }
    fn read_exit(&self, rec: &VmRecord) -> Result<Option<GuestExit>> {
        Ok(self.state().exits.get(&rec.spec.id).cloned())
    }
    fn capacity(&self) -> Option<u64> {
        self.state().capacity
    }
    fn check_config(&self, _cfg: &GuestConfig) -> Result<()> {
        Ok(())
    }
    fn check_host_volume(&self, path: &str) -> Result<String> {
        self.host_volume_id(path)
            .ok_or_else(|| Error::not_found(format!("{path} does not exist on the host")))
    }
    fn host_volume_id(&self, path: &str) -> Option<String> {
        self.state().host_disks.get(path).cloned()
    }
    /// Any path but a host disk's is a directory; its canonical form has no trailing slash.
    fn check_share(&self, path: &str) -> Result<String> {
        if self.state().host_disks.contains_key(path) {
            return Err(Error::invalid(format!("{path} is not a directory")));
        }
        Ok(path.trim_end_matches('/').to_owned())
    }
}

#[async_trait]
impl Kernels for FakeHost {
    async fn boot_files(
        &self,
        kernel: &str,
        _formats: &[hearth_core::ports::KernelFormat],
        initrd: Option<&str>,
    ) -> Result<(PathBuf, PathBuf)> {
        let initramfs = match initrd {
            Some(d) => format!("/fake/kernels/{kernel}/initrd+{d}"),
            None => format!("/fake/kernels/{kernel}/initrd"),
        };
        Ok((PathBuf::from(format!("/fake/kernels/{kernel}/vmlinuz")), PathBuf::from(initramfs)))
    }
    fn default_kernel(&self) -> Result<Option<String>> {
        Ok(self.state().kernels.first().cloned())
    }
    fn format(&self, kernel: &str) -> Result<hearth_core::ports::KernelFormat> {
        let s = self.state();
        Ok(s.kernel_formats
            .get(kernel)
            .copied()
            .unwrap_or(hearth_core::ports::KernelFormat::BzImage))
    }
    fn exists(&self, kernel: &str) -> Result<bool> {
        Ok(self.state().kernels.iter().any(|k| k == kernel))
    }
    fn remove(&self, kernel: &str) -> Result<hearth_types::KernelRecord> {
        let mut s = self.state();
        let before = s.kernels.len();
        s.kernels.retain(|k| k != kernel);
        if s.kernels.len() == before {
            return Err(Error::precondition(format!("no such kernel: {kernel}")));
        }
        Ok(hearth_types::KernelRecord {
            name: kernel.to_owned(),
            id: Digest::from_hex(&"0".repeat(64)).unwrap_or_else(|e| panic!("{e}")),
            version: "6.1.0-fake".into(),
            format: "bzimage".into(),
            compression: Some("zstd".into()),
            pvh: None,
            modules: 0,
            created_at: 0,
        })
    }
}

#[async_trait]
impl Network for FakeHost {
    fn plan(&self, spec: &VmSpec) -> Result<Option<NetPlan>> {
        Ok((spec.network != NetworkMode::None).then(|| NetPlan {
            cards: (spec.cards().into_iter())
                .map(|c| NetLaunch {
                    forwards: if c.index == 0 { spec.ports.clone() } else { vec![] },
                    mac: c.mac,
                    tap: None,
                    macvtap: None,
                })
                .collect(),
            ssh_port: None,
        }))
    }
    async fn prepare(&self, spec: &VmSpec) -> Result<()> {
        if !spec.ports.is_empty() {
            self.state().port_claims.insert(spec.id.clone());
        }
        Ok(())
    }
    fn settle(&self, spec: &VmSpec, _failed: bool) {
        self.state().port_claims.remove(&spec.id);
    }
    async fn attach(&self, spec: &VmSpec) -> Result<()> {
        self.state().attached.insert(spec.id.clone());
        Ok(())
    }
    async fn release(&self, spec: &VmSpec, remove: bool) {
        self.state().released.push((spec.id.clone(), remove));
    }
    fn resync(&self) {}
    fn check_publishable(&self, spec: &VmSpec) -> Result<()> {
        let s = self.state();
        for p in &spec.ports {
            let taken = s.records.values().any(|r| {
                r.status.state.is_active()
                    && r.spec.ports.iter().any(|q| q.host_port == p.host_port)
            });
            if taken {
                return Err(Error::precondition(format!("host port {} is taken", p.host_port)));
            }
        }
        Ok(())
    }
    fn resolvers(&self) -> Vec<String> {
        vec!["192.0.2.53".into()]
    }
}

#[async_trait]
impl Guests for FakeHost {
    async fn capture_console(&self, _spec: &VmSpec) -> Result<()> {
        match self.state().fail_console {
            true => Err(Error::internal("console.sock: Connection refused")),
            false => Ok(()),
        }
    }
    async fn console_closed(&self, _id: &VmId) {}
    fn console_offset(&self, _id: &VmId) -> u64 {
        0
    }
    async fn forget(&self, _id: &VmId, _removed: bool) {}
    async fn shutdown(&self, id: &VmId) -> Result<()> {
        if self.state().ignore_shutdown {
            return Ok(());
        }
        let pid = self.state().records.get(id).and_then(|r| r.status.pid);
        if pid.is_some_and(|pid| self.vmm.frozen(pid)) {
            return Err(Error::unavailable("the guest's agent did not answer"));
        }
        // hearth-init stops the workload (SIGTERM), records how it ended and powers off.
        self.state()
            .exits
            .insert(id.clone(), GuestExit { exit_code: 143, signal: Some(15), error: None });
        if let Some(pid) = pid {
            self.vmm.exit(pid);
        }
        Ok(())
    }
    async fn wait_ready(&self, id: &VmId, timeout: Duration) -> Result<Ready> {
        if self.state().never_ready {
            tokio::time::sleep(timeout).await;
            return Err(Error::unavailable(format!("vm {id}: no ready report within {timeout:?}")));
        }
        Ok(Ready { init_started_ms: 300, ready_ms: 450 })
    }
    async fn reidentify(&self, id: &VmId, identity: &hearth_types::agent::Identity) -> Result<()> {
        self.state().identities.push((id.clone(), identity.clone()));
        Ok(())
    }
}

#[async_trait]
impl hearth_core::ports::Snapshots for FakeHost {
    fn begin(&self, name: &str) -> Result<PathBuf> {
        let mut s = self.state();
        if s.snapshots_begun.contains(name) {
            return Err(Error::conflict(format!("snapshot {name} exists")));
        }
        s.snapshots_begun.insert(name.to_owned());
        Ok(self.state_file_of(name))
    }
    async fn copy_disks(&self, _name: &str, _rec: &VmRecord) -> Result<u64> {
        Ok(64 << 20)
    }
    fn commit(&self, snap: &hearth_types::snapshot::SnapshotRecord) -> Result<()> {
        self.state().snapshots.insert(snap.name.clone(), snap.clone());
        Ok(())
    }
    fn remove(&self, name: &str) -> Result<()> {
        let mut s = self.state();
        s.snapshots.remove(name);
        s.snapshots_begun.remove(name);
        Ok(())
    }
    fn get(&self, name: &str) -> Result<Option<hearth_types::snapshot::SnapshotRecord>> {
        Ok(self.state().snapshots.get(name).cloned())
    }
    fn list(&self) -> Result<Vec<hearth_types::snapshot::SnapshotRecord>> {
        let mut all: Vec<_> = self.state().snapshots.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
    fn state_file(&self, name: &str) -> PathBuf {
        self.state_file_of(name)
    }
    async fn restore_disks(&self, name: &str, rec: &VmRecord) -> Result<()> {
        let mut s = self.state();
        s.restored_disks.push((rec.spec.id.clone(), name.to_owned()));
        s.dirs.insert(rec.spec.id.clone());
        s.disks.insert(rec.spec.id.clone());
        Ok(())
    }
    fn boot_ids(&self, kernel: &str) -> Result<(String, String)> {
        Ok((format!("kernel-{kernel}"), "init-1".into()))
    }
}

impl Sandbox for FakeHost {
    fn claim(&self, _spec: &VmSpec) -> Result<Confinement> {
        let mut s = self.state();
        s.next_uid += 1;
        let uid = 2_100_000_000 + s.next_uid;
        s.uids.insert(uid);
        Ok(Confinement { run_as: Some((uid, uid)), cgroup: None })
    }
    fn settle(&self, c: &Confinement) {
        if let Some((u, _)) = c.run_as {
            self.state().uids.remove(&u);
        }
    }
    fn of(&self, _spec: &VmSpec) -> Confinement {
        Confinement::default()
    }
}
