//! The daemon's state: stores, per-VM locks, change notification, and lookups.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::adapters::{AgentClient, AgentError};
use anyhow::Context;
use hearth_core::ports::AgentTransport;
use hearth_image::ImageStore;
use hearth_kernel::KernelStore;
use hearth_store::VmStore;
use hearth_types::{VmId, VmRecord};
use tokio::sync::watch;
use tonic::Status;

/// Everything the API handlers and the reconciler share.
/// The thin pool VM disks are on, and device-mapper.
#[derive(Debug)]
pub struct Thin {
    pub control: hearth_storage::dm::Control,
    pub disks: hearth_storage::dm::disks::ThinDisks,
}

pub struct Daemon {
    pub root: PathBuf,
    pub vms: VmStore,
    pub images: ImageStore,
    pub kernels: KernelStore,
    pub init_binary: PathBuf,
    /// The VMM providers; each VM runs under the one its spec names.
    pub vmms: hearth_core::ports::Vmms,
    /// The use-cases over this daemon's adapters (set once by `adapters::wire`).
    reconciler: std::sync::OnceLock<Arc<hearth_core::Reconciler>>,
    /// Bumped on every record change; waiters re-read the store.
    changes: watch::Sender<u64>,
    /// Names, ids and addresses of the records, so lookups and creates list nothing.
    index: Mutex<hearth_core::VmIndex>,
    /// How removed VMs ended, so `wait` after an automatic `--rm` still gets the exit code.
    tombstones: Mutex<HashMap<VmId, VmRecord>>,
    /// The one agent connection per running VM (QEMU's chardev takes a single client).
    agents: tokio::sync::Mutex<HashMap<VmId, Arc<AgentClient>>>,
    /// Bridge addresses promised to VMs not created yet (a Flintlock microVM's static address
    /// while its images are pulled), by holder: the allocator skips them.
    pub reserved_addresses: Mutex<HashMap<std::net::Ipv4Addr, String>>,
    /// Bridge networks the allocator never hands out (`--flintlock-reserve`).
    pub reserved_networks: Vec<hearth_types::net::Ipv4Net>,
    /// Directories under which Flintlock clients may share host directories
    /// (`virtiofs_source`); none when empty.
    pub virtiofs_roots: Vec<PathBuf>,
    /// Published host ports of launches in flight, and the lock for the bridge's table.
    pub ports: crate::net::Ports,
    /// How long a registry may stay silent during a pull (`--registry-timeout`).
    pub registry_timeout: std::time::Duration,
    /// The console captures of running VMs.
    pub consoles: crate::console::Consoles,
    /// How VMMs are confined: the first of the VMs' own uids (0: VMMs run as root) and the
    /// cgroup their groups go under (empty: none).
    pub vmm_uid_base: u32,
    pub cgroup_parent: String,
    /// VM root disks on a device-mapper thin pool (`--thin-pool`), else reflink or sparse
    /// copies.
    pub thin: Option<Thin>,
    /// The VMM of VMs that name none (`--default-vmm`).
    pub default_vmm: hearth_types::Provider,
    /// The host interface macvtap networks sit on when none is named (`--parent-iface`).
    pub parent_iface: Option<String>,
    /// The bridge of `--network bridge` VMs (`--bridge-name`, hearth0 by default).
    pub bridge: hearth_net::Bridge,
    /// VMM uids handed to launches in flight (the running VMs' records carry theirs).
    launching_uids: Mutex<std::collections::HashSet<u32>>,
}

/// How many VMs can have a VMM uid of their own at once.
pub const VMM_UIDS: u32 = 65_536;

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Locates the static hearth-init binary: the flag, else beside hearthd, else in the cargo
/// target directory of a source checkout.
pub fn find_init_binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        anyhow::ensure!(p.is_file(), "--init-binary {} does not exist", p.display());
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe().context("locating hearthd's own executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("hearth-init"),
        dir.join("../x86_64-unknown-linux-gnu/release/hearth-init"),
        dir.join("../../x86_64-unknown-linux-gnu/release/hearth-init"),
        PathBuf::from("/usr/lib/hearth/hearth-init"),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "hearth-init (the guest's static init) was not found beside {}; build it with `cargo xtask init` or pass --init-binary",
            exe.display()
        )
    })
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Daemon {
    /// Opens the stores of a root whose lock the caller holds, and clears what a crash left in
    /// them (nothing else runs yet, so anything temporary is a leftover).
    pub fn open(root: &Path, init_binary: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let (vms, images, kernels) =
            (VmStore::open(root)?, ImageStore::open(root)?, KernelStore::open(root)?);
        let mut swept = vms.sweep()?;
        swept.extend(images.sweep()?);
        swept.extend(kernels.sweep()?);
        // Initrds no VM boots with (a microVM still provisioning stores its own again).
        let in_use = vms.list()?.into_iter().filter_map(|r| r.spec.initrd).collect();
        swept.extend(kernels.sweep_initrds(&in_use));
        crate::root::keep_reserve(root);
        let tmp = crate::root::sweep_tmp(root)
            .with_context(|| format!("clearing {}", root.join("tmp").display()))?;
        if !swept.is_empty() || tmp > 0 {
            tracing::info!(count = swept.len() + tmp, first = ?swept.first(), "removed what an interrupted run left");
        }
        let index = Mutex::new(hearth_core::VmIndex::rebuild(&vms.list()?));
        Ok(Self {
            index,
            root: root.to_owned(),
            vms,
            images,
            kernels,
            init_binary,
            vmms: crate::adapters::providers(),
            reconciler: std::sync::OnceLock::new(),
            changes: watch::channel(0).0,
            tombstones: Mutex::new(HashMap::new()),
            agents: tokio::sync::Mutex::new(HashMap::new()),
            reserved_addresses: Mutex::new(HashMap::new()),
            reserved_networks: Vec::new(),
            virtiofs_roots: Vec::new(),
            ports: Default::default(),
            registry_timeout: hearth_image::registry::DEFAULT_TIMEOUT,
            consoles: Default::default(),
            vmm_uid_base: 0,
            cgroup_parent: String::new(),
            thin: None,
            default_vmm: hearth_types::Provider::Qemu,
            parent_iface: None,
            bridge: hearth_net::Bridge::hearth0(),
            launching_uids: Mutex::new(Default::default()),
        })
    }

    /// Puts VM root disks on the thin pool `name`: a dev pool on files in ROOT/pool is brought
    /// back first (after a reboot its loop devices and device are gone), then what a crash left
    /// half made is removed.
    pub fn use_thin_pool(&mut self, name: &str) -> anyhow::Result<()> {
        use hearth_storage::dm;
        let dir = self.root.join("pool");
        if dir.join("data").is_file() {
            hearth_kernel::kmod::load(&hearth_kernel::kmod::tree(), &["dm_thin_pool", "loop"])
                .map_err(anyhow::Error::msg)?;
            let control = dm::Control::open()?;
            let dev = dm::pool::DevPool {
                dir: dir.clone(),
                name: name.to_owned(),
                data_bytes: 0,
                metadata_bytes: 0,
            };
            let steps = dev
                .ensure(&control)
                .with_context(|| format!("bringing back the thin pool {name}"))?;
            if !steps.is_empty() {
                tracing::info!(pool = name, ?steps, "thin pool brought back");
            }
        }
        let control = dm::Control::open()?;
        anyhow::ensure!(
            control.info(name)?.is_some_and(|i| i.active),
            "no thin pool {name}: make one with `hearth host provision --dev` (on files) or `--direct-lvm --disk DEV` (on a disk); an LVM pool made before a reboot comes back with `vgchange -ay`"
        );
        let table = control.status(name, true)?;
        let kind = table.first().map(|t| t.kind.clone()).unwrap_or_default();
        anyhow::ensure!(
            kind == "thin-pool",
            "{name} is a device-mapper device but not a thin pool (its table is {kind:?}); an LVM pool with thin volumes of LVM's own is {name}-tpool"
        );
        std::fs::create_dir_all(&dir)?;
        let disks = dm::disks::ThinDisks::new(name, dir.join("devices.json"));
        let mut cleaned = disks.recover(&control)?;
        // Root disks of VMs whose record is gone (removed while the pool was not configured).
        let known: std::collections::HashSet<String> =
            self.vms.list()?.iter().map(|r| r.spec.id.to_string()).collect();
        for vm in
            disks.devices()?.vms.keys().filter(|v| !known.contains(*v)).cloned().collect::<Vec<_>>()
        {
            if disks.remove(&control, &vm)? {
                cleaned.push(format!("hearth-vm-{vm}"));
            }
        }
        if !cleaned.is_empty() {
            tracing::info!(?cleaned, "removed thin devices an interrupted create left");
        }
        tracing::info!(pool = name, "VM root disks are thin snapshots on the pool");
        self.thin = Some(Thin { control, disks });
        Ok(())
    }

    /// How pulls reach registries: `insecure` as asked, the daemon's timeout.
    pub fn pull_options(&self, insecure: bool) -> hearth_image::PullOptions {
        hearth_image::PullOptions { insecure, timeout: self.registry_timeout, ..Default::default() }
    }

    /// A VMM uid no running or launching VM has, for a launch; give it back with
    /// [`Daemon::settle_uid`] once the launch is recorded or failed. `None` when VMMs run as root.
    pub fn claim_uid(&self) -> Result<Option<u32>, Status> {
        if self.vmm_uid_base == 0 {
            return Ok(None);
        }
        let mut launching = self.launching_uids.lock().unwrap_or_else(|e| e.into_inner());
        let used: std::collections::HashSet<u32> = self
            .vms
            .list()
            .map_err(internal)?
            .iter()
            .filter_map(|r| r.status.vmm_uid)
            .chain(launching.iter().copied())
            .collect();
        let uid = (0..VMM_UIDS)
            .map(|n| self.vmm_uid_base.saturating_add(n))
            .find(|u| !used.contains(u))
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "all {VMM_UIDS} VMM uids from {} are in use",
                    self.vmm_uid_base
                ))
            })?;
        launching.insert(uid);
        Ok(Some(uid))
    }

    pub fn settle_uid(&self, uid: Option<u32>) {
        if let Some(u) = uid {
            self.launching_uids.lock().unwrap_or_else(|e| e.into_inner()).remove(&u);
        }
    }

    /// The cgroup name of a VM's VMM, when VMMs get one.
    pub fn cgroup_of(&self, id: &VmId) -> Option<String> {
        (!self.cgroup_parent.is_empty())
            .then(|| crate::adapters::cgroup_name(&self.cgroup_parent, id))
    }

    pub fn set_reconciler(&self, r: Arc<hearth_core::Reconciler>) {
        let _ = self.reconciler.set(r);
    }

    /// The reconciler; `adapters::wire` sets it before anything is served.
    #[allow(clippy::expect_used)]
    pub fn reconciler(&self) -> &Arc<hearth_core::Reconciler> {
        self.reconciler.get().expect("adapters::wire ran at start-up")
    }

    /// Persists a record and wakes waiters.
    pub fn save(&self, rec: &VmRecord) -> Result<(), Status> {
        match self.vms.save(rec) {
            Err(hearth_store::StoreError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC)
                    && crate::root::release_reserve(&self.root) =>
            {
                // A full disk must not keep hearthd from recording what it did.
                tracing::error!(vm = %rec.spec.id, "the disk holding the state directory is full: used hearthd's reserve to save the record; free some space");
                self.vms.save(rec).map_err(internal)?;
            }
            other => other.map_err(internal)?,
        }
        self.index().upsert(&rec.spec);
        self.changes.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Removes a VM's record and files, keeping a tombstone for `wait`.
    pub fn forget(&self, rec: &VmRecord) -> Result<(), Status> {
        // The tombstone first: a reader never finds neither the record nor how it ended.
        {
            let mut t = self.tombstones.lock().unwrap_or_else(|e| e.into_inner());
            if t.len() > 1024 {
                t.clear();
            }
            t.insert(rec.spec.id.clone(), rec.clone());
        }
        // The thin device before the record: a crash between them leaves a record to remove
        // again, never a device nothing names.
        if let Some(thin) = &self.thin {
            thin.disks.remove(&thin.control, &rec.spec.id.to_string()).map_err(internal)?;
        }
        self.vms.remove(&rec.spec.id).map_err(internal)?;
        self.index().remove(&rec.spec.id);
        self.changes.send_modify(|g| *g += 1);
        Ok(())
    }

    pub fn tombstone(&self, id: &VmId) -> Option<VmRecord> {
        self.tombstones.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// A removed VM by id, id prefix or name, when exactly one matches.
    pub fn tombstone_by_ref(&self, reference: &str) -> Option<VmRecord> {
        let t = self.tombstones.lock().unwrap_or_else(|e| e.into_inner());
        let m: Vec<&VmRecord> = t
            .values()
            .filter(|r| r.spec.name == reference || r.spec.id.as_str().starts_with(reference))
            .collect();
        match m.as_slice() {
            [one] if !reference.is_empty() => Some((*one).clone()),
            _ => None,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn get(&self, id: &VmId) -> Result<Option<VmRecord>, Status> {
        self.vms.get(id).map_err(internal)
    }

    /// The index of names, ids and addresses.
    pub fn index(&self) -> std::sync::MutexGuard<'_, hearth_core::VmIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a VM by exact name, exact id, or unique id prefix.
    pub fn resolve(&self, reference: &str) -> Result<VmRecord, Status> {
        let id = self.index().resolve(reference).map_err(hearth_api::status::to_status)?;
        self.get(&id)?.ok_or_else(|| {
            Status::not_found(format!("no such VM: {reference} (see `hearth ps -a`)"))
        })
    }

    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms.vm_dir(id)
    }

    /// The VM's agent connection, (re)connecting when there is none or it closed.
    pub async fn agent(&self, id: &VmId) -> Result<Arc<AgentClient>, AgentError> {
        let mut agents = self.agents.lock().await;
        if let Some(a) = agents.get(id) {
            if a.closed().is_none() {
                return Ok(a.clone());
            }
            if let Some(why) = a.closed() {
                tracing::warn!(vm = %id, why, "agent connection lost");
            }
        }
        let provider = self.get(id).ok().flatten().map(|r| r.spec.provider).unwrap_or_default();
        let vmm = self.vmms.of(provider);
        let path = vmm.endpoints(&self.vm_dir(id)).agent;
        let a = match vmm.capabilities().agent {
            AgentTransport::Serial => AgentClient::connect(&path).await?,
            AgentTransport::Vsock => {
                AgentClient::connect_hybrid_vsock(&path, hearth_types::guest::AGENT_VSOCK_PORT)
                    .await?
            }
        };
        let a = Arc::new(a);
        agents.insert(id.clone(), a.clone());
        Ok(a)
    }

    /// Drops the agent connection of a VM whose VMM exited.
    pub async fn forget_agent(&self, id: &VmId) {
        self.agents.lock().await.remove(id);
    }
}

/// Maps an internal error to a gRPC status carrying the whole chain.
pub fn internal(e: impl Into<anyhow::Error>) -> Status {
    let e: anyhow::Error = e.into();
    Status::internal(format!("{e:#}"))
}
