//! The composition root's adapters: hearth-core's ports implemented over the daemon's stores
//! (records, images, kernels), hearth-storage, hearth-net, the console captures and the agent
//! connections. `wire` builds the reconciler from them and the configured VMM provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hearth_api::status::from_status;
use hearth_core::ports::{
    Confinement, DiskState, Disks, Fetch, Guests, Images, Kernels, Keys, NetPlan, Network, RootFs,
    Sandbox, VmRepository, VolumeDisk,
};
use hearth_core::{Error, Ports, Reconciler, Result};
use hearth_types::agent::Ready;
use hearth_types::guest::GuestExit;
use hearth_types::{ImageRecord, NetworkMode, VmId, VmRecord, VmSpec, VolumeSource};
use tonic::Status;
use tracing::{info, warn};

use crate::daemon::Daemon;

// The adapter types the front ends stream through: the agent connection (exec, cp) and the
// console capture (logs, attach). Named here so this file is the one place hearthd picks its
// adapters.
pub use hearth_vmm::agent::{AgentClient, AgentError, Stream};
pub use hearth_vmm::console::{self as console_log, Console, LogLimits};
pub use hearth_vmm::VmmError;

/// The providers this daemon drives, configured from the environment.
pub fn providers() -> hearth_core::ports::Vmms {
    hearth_vmm::providers()
}

/// The cgroup name of a VM's VMM below `parent`.
pub fn cgroup_name(parent: &str, id: &VmId) -> String {
    hearth_vmm::cgroup::name(parent, id.as_str())
}

/// The accelerator a VM with `--accel auto` gets on this host, or why none is usable.
pub fn default_accel() -> std::result::Result<hearth_types::Accel, String> {
    hearth_vmm::resolve_accel(hearth_types::Accel::Auto).map(|(a, _)| a).map_err(|e| e.to_string())
}

/// Whether a guest config fits on its config disk.
pub fn check_config_fits(cfg: &hearth_types::GuestConfig) -> Result<()> {
    hearth_storage::check_config_fits(cfg).map_err(|e| Error::invalid(e.to_string()))
}

/// This host's facts for the host check, with the VMM's KVM verdict and the reflink probe.
pub fn host_facts(root: &Path) -> hearth_host::Facts {
    hearth_host::Facts::probe(root, kvm_unusable(), |dir| {
        hearth_storage::supports_reflink(dir).ok()
    })
}

/// Why KVM cannot run guests here, or `None`.
pub fn kvm_unusable() -> Option<String> {
    hearth_vmm::accel::kvm_unusable_here()
}

/// Replaces the bridge's NAT table with `rules`.
pub fn write_nat(
    bridge: &hearth_net::Bridge,
    rules: Vec<hearth_core::forwards::ForwardRule>,
) -> anyhow::Result<()> {
    let forwards: Vec<hearth_net::Forward> = rules
        .into_iter()
        .map(|r| hearth_net::Forward {
            host_ip: r.host_ip,
            host_port: r.host_port,
            guest_ip: r.guest_ip,
            guest_port: r.guest_port,
            protocol: r.protocol.to_string(),
            owner: r.owner,
        })
        .collect();
    hearth_net::write_nat(bridge, &forwards)?;
    Ok(())
}

/// The daemon as the ports' implementation.
#[derive(Debug)]
pub struct Host(pub Arc<Daemon>);

/// Builds the reconciler over `d` and hands it to the daemon.
pub fn wire(d: &Arc<Daemon>) -> Arc<Reconciler> {
    let host = Arc::new(Host(d.clone()));
    let ports = Ports {
        vmms: d.vmms.clone(),
        repo: host.clone(),
        disks: host.clone(),
        kernels: host.clone(),
        network: host.clone(),
        guests: host.clone(),
        sandbox: host.clone(),
        clock: Arc::new(hearth_core::ports::SystemClock),
        images: host.clone(),
        keys: host.clone(),
        snapshots: host,
    };
    let r = Reconciler::new(ports);
    d.set_reconciler(r.clone());
    r
}

fn core(s: Status) -> Error {
    from_status(&s)
}

/// A blocking closure on the blocking pool, its failure a failed precondition with its chain.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::precondition(format!("{e:#}")))
}

/// Runs blocking work (the `nft` tool, key generation) without stalling the async runtime's
/// other tasks: in place on a worker the runtime replaces meanwhile.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `hearth info`: the daemon's counts, defaults, storage (the thin pool's use, with a warning
/// past its threshold) and network, as JSON.
pub fn info(d: &Daemon) -> anyhow::Result<serde_json::Value> {
    use hearth_types::VmState;
    let vms = d.vms.list()?;
    let running = (vms.iter())
        .filter(|v| matches!(v.status.state, VmState::Running | VmState::Starting))
        .count();
    let storage = match &d.thin {
        Some(t) => {
            let pool =
                hearth_storage::dm::thin::Pool { dm: &t.control, name: t.disks.pool.clone() };
            serde_json::to_value(hearth_host::pool_check(&t.disks.pool, &pool.report()))?
        }
        None => {
            let reflink = hearth_storage::supports_reflink(&d.root.join("vms")).unwrap_or(false);
            serde_json::json!({
                "name": "files",
                "level": "ok",
                "detail": if reflink { "reflink copies of each image's base filesystem" } else { "sparse copies of each image's base filesystem" },
            })
        }
    };
    Ok(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "root": d.root.display().to_string(),
        "accel": default_accel().map(|a| a.to_string()).unwrap_or_else(|e| e),
        "default_vmm": d.default_vmm.to_string(),
        "parent_iface": d.parent_iface,
        "vms": { "total": vms.len(), "running": running },
        "images": d.images.list()?.len(),
        "kernels": d.kernels.list()?.len(),
        "default_kernel": d.kernels.default_name()?,
        "storage": storage,
    }))
}

/// Files of a VM's directory.
pub fn disk_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("disk.img")
}
pub fn config_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("config.img")
}
/// The VM's own copy of its `index`th (writable) volume.
pub fn volume_path(vm_dir: &Path, index: usize) -> PathBuf {
    vm_dir.join(format!("volume-{index}.img"))
}

impl Host {
    fn dir(&self, id: &VmId) -> PathBuf {
        self.0.vm_dir(id)
    }

    /// The image a VM was created from; it may have been removed with `image rm --force`.
    fn image_of(&self, rec: &VmRecord) -> Result<ImageRecord> {
        self.0.images.get(&rec.spec.image_id).map_err(Error::internal)?.ok_or_else(|| {
            Error::precondition(format!("image {} was removed; pull it again", rec.spec.image))
        })
    }

    /// Where each of a VM's volumes comes from, its images looked up.
    fn volume_sources(&self, rec: &VmRecord) -> Result<Vec<Volume>> {
        rec.spec
            .volumes
            .iter()
            .map(|v| match &v.source {
                VolumeSource::Host { path } => Ok(Volume::Host(path.into(), v.read_only)),
                VolumeSource::Share { path } => Ok(Volume::Share(path.into(), v.read_only)),
                VolumeSource::Blank { size_bytes } => Ok(Volume::Blank(*size_bytes)),
                VolumeSource::Image => {
                    let img = self.0.images.get(&v.image_id).map_err(Error::internal)?;
                    let img = img.ok_or_else(|| {
                        Error::precondition(format!(
                            "volume {}: image {} was removed; pull it again",
                            v.id, v.image
                        ))
                    })?;
                    Ok(Volume::Image(Box::new(img), v.read_only))
                }
            })
            .collect()
    }
}

/// A VM's volume as its disks are made and attached.
enum Volume {
    /// An image's filesystem: shared when read-only, else the VM's copy.
    Image(Box<ImageRecord>, bool),
    /// The host's file or device, read-only or not.
    Host(PathBuf, bool),
    /// The host's directory, shared read-only or not.
    Share(PathBuf, bool),
    /// A blank filesystem of the VM's own, of this size.
    Blank(u64),
}

impl VmRepository for Host {
    fn get(&self, id: &VmId) -> Result<Option<VmRecord>> {
        self.0.get(id).map_err(core)
    }
    fn save(&self, rec: &VmRecord) -> Result<()> {
        self.0.save(rec).map_err(core)
    }
    fn remove(&self, rec: &VmRecord) -> Result<()> {
        self.0.forget(rec).map_err(core)
    }
    fn list(&self) -> Result<Vec<VmRecord>> {
        self.0.vms.list().map_err(Error::internal)
    }
    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.dir(id)
    }
    fn vms_dir(&self) -> PathBuf {
        self.0.root.join("vms")
    }
    fn discard(&self, id: &VmId) {
        // A failed create's disk: removed with its directory, on the pool as in it.
        if let Some(thin) = &self.0.thin {
            if let Err(e) = thin.disks.remove(&thin.control, &id.to_string()) {
                tracing::warn!(vm = %id, error = %e, "removing the VM's thin device failed");
            }
        }
        let _ = std::fs::remove_dir_all(self.dir(id));
    }
    fn name_holder(&self, name: &str) -> Option<VmId> {
        self.0.index().by_name(name).cloned()
    }
    fn address_holder(&self, a: std::net::Ipv4Addr) -> Option<String> {
        self.0.index().address_holder(a).map(str::to_owned)
    }
    fn used_addresses(&self) -> Vec<std::net::Ipv4Addr> {
        let reserved: Vec<_> = self
            .0
            .reserved_addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        self.0.index().addresses().chain(reserved).collect()
    }
    fn reserved_networks(&self) -> Vec<hearth_types::net::Ipv4Net> {
        self.0.reserved_networks.clone()
    }
}

/// Pulls for Flintlock's microVMs (http for loopback registries, as `hearth image pull`).
#[async_trait]
impl Fetch for Host {
    async fn pull(&self, reference: &str) -> Result<ImageRecord> {
        let r: hearth_types::ImageRef =
            reference.parse().map_err(|e| Error::invalid(format!("image {reference:?}: {e}")))?;
        if let Some(img) = self.0.images.get(reference).map_err(Error::internal)? {
            return Ok(img);
        }
        let d = self.0.clone();
        let pulled = tokio::task::spawn_blocking(move || {
            d.images.pull(&r, &d.pull_options(false), &hearth_image::NoProgress)
        })
        .await
        .map_err(Error::internal)?;
        pulled.map_err(|e| {
            // A refused or absent image stays so; a stalled or unreachable registry may not.
            use hearth_image::PullError as P;
            let permanent = matches!(
                e,
                P::Refused { .. } | P::NotFound { .. } | P::Platform { .. } | P::MediaType { .. }
            );
            let msg = format!("pulling {reference}: {:#}", anyhow::Error::from(e));
            if permanent {
                Error::precondition(msg)
            } else {
                Error::unavailable(msg)
            }
        })
    }

    async fn import_kernel(
        &self,
        image: &ImageRecord,
        file: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let (d, img, name) = (self.0.clone(), image.clone(), name.to_owned());
        let file = file.map(str::to_owned);
        blocking(move || {
            crate::service::kernel_from_image(&d, &img, &name, file.as_deref()).map(|_| ())
        })
        .await
    }

    async fn import_initrd(&self, image: &ImageRecord, file: &str) -> Result<String> {
        let (d, img, file) = (self.0.clone(), image.clone(), file.to_owned());
        blocking(move || crate::service::initrd_from_image(&d, &img, &file)).await
    }
}

#[async_trait]
impl Images for Host {
    fn find(&self, reference: &str) -> Result<Option<ImageRecord>> {
        self.0.images.get(reference).map_err(Error::internal)
    }

    async fn root_fs(&self, image: &ImageRecord) -> Result<RootFs> {
        let (d, img) = (self.0.clone(), image.clone());
        blocking(move || {
            let users = d
                .images
                .users(&img)?
                .map(|u| (u.passwd.unwrap_or_default(), u.group.unwrap_or_default()));
            Ok(RootFs { bytes: std::fs::metadata(d.images.rootfs_path(&img.id))?.len(), users })
        })
        .await
    }

    fn remove(&self, image: &ImageRecord) -> Result<ImageRecord> {
        let removed = off_runtime(|| self.0.images.remove(image.id.hex()))
            .map_err(|e| Error::precondition(format!("{:#}", anyhow::Error::from(e))))?;
        // Its base on the thin pool goes too: VMs' snapshots keep the blocks they share.
        if let Some(thin) = &self.0.thin {
            thin.disks.remove_base(&thin.control, image.id.hex()).map_err(Error::internal)?;
        }
        Ok(removed)
    }
}

impl Keys for Host {
    fn generate_ssh_key(&self, vm_dir: &Path, comment: &str) -> Result<(String, PathBuf)> {
        let public =
            off_runtime(|| crate::ssh::generate(vm_dir, comment)).map_err(Error::internal)?;
        Ok((public, crate::ssh::key_path(vm_dir)))
    }
}

#[async_trait]
impl Disks for Host {
    fn observe(&self, rec: &VmRecord) -> DiskState {
        let dir = self.dir(&rec.spec.id);
        let on_pool = self.0.thin.as_ref().is_some_and(|t| t.disks.has(&rec.spec.id.to_string()));
        DiskState {
            dir: dir.exists(),
            disk: on_pool || disk_path(&dir).exists(),
            config_disk: config_path(&dir).exists(),
        }
    }

    async fn create(&self, rec: &VmRecord) -> Result<PathBuf> {
        let image = self.image_of(rec)?;
        let volumes = self.volume_sources(rec)?;
        let (d, dir, size) = (self.0.clone(), self.dir(&rec.spec.id), rec.spec.disk_bytes);
        blocking(move || {
            // Volumes first: the root disk's existence marks the step done.
            for (i, v) in volumes.iter().enumerate() {
                let path = volume_path(&dir, i);
                match v {
                    Volume::Image(img, false) if !path.exists() => {
                        let base = d.images.rootfs(img)?;
                        let len = std::fs::metadata(&base)?.len();
                        hearth_storage::clone_disk(&base, &path, len)?;
                    }
                    Volume::Blank(bytes) if !path.exists() => {
                        hearth_storage::create_blank(&path, *bytes)?;
                    }
                    _ => {}
                }
            }
            let base = d.images.rootfs(&image)?;
            if let Some(thin) = &d.thin {
                let vm =
                    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let node = thin.disks.create(&thin.control, &vm, image.id.hex(), &base, size)?;
                info!(disk = %node.display(), "root disk: a thin snapshot of the image's base");
                return Ok(node);
            }
            let method = hearth_storage::clone_disk(&base, &disk_path(&dir), size)?;
            info!(?method, "root disk cloned");
            Ok(disk_path(&dir))
        })
        .await
    }

    async fn write_config(&self, rec: &VmRecord) -> Result<()> {
        let cfg = hearth_core::guest_config_for(
            &rec.spec,
            &self.image_of(rec)?.config,
            crate::net::host_resolvers(),
        )?;
        let path = config_path(&self.dir(&rec.spec.id));
        tokio::task::spawn_blocking(move || hearth_storage::create_config_disk(&path, &cfg))
            .await
            .map_err(Error::internal)?
            .map_err(Error::internal)
    }

    async fn attach(&self, rec: &VmRecord) -> Result<(PathBuf, PathBuf, Vec<VolumeDisk>)> {
        let (d, volumes, dir) = (self.0.clone(), self.volume_sources(rec)?, self.dir(&rec.spec.id));
        let ids: Vec<String> = rec.spec.volumes.iter().map(|v| v.id.clone()).collect();
        blocking(move || {
            let mut out = Vec::new();
            for (i, v) in volumes.into_iter().enumerate() {
                // Read-only image volumes share the image's cached filesystem; the others have
                // a copy; the host's own disks are used where they are.
                let gone = |path: &Path| {
                    anyhow::anyhow!(
                        "volume {}: {} is not on the host any more: put it back, or remove the VM",
                        ids[i],
                        path.display()
                    )
                };
                let (path, read_only, host, share) = match v {
                    Volume::Image(img, true) => (d.images.rootfs(&img)?, true, false, false),
                    Volume::Image(_, false) | Volume::Blank(_) => {
                        (volume_path(&dir, i), false, false, false)
                    }
                    Volume::Host(path, read_only) => {
                        std::fs::metadata(&path).map_err(|_| gone(&path))?;
                        (path, read_only, true, false)
                    }
                    Volume::Share(path, read_only) => {
                        if !path.is_dir() {
                            return Err(gone(&path));
                        }
                        (path, read_only, true, true)
                    }
                };
                out.push(VolumeDisk {
                    path,
                    serial: hearth_types::guest::volume_serial(i),
                    read_only,
                    host,
                    share,
                });
            }
            let vm = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let on_pool = match &d.thin {
                Some(thin) => thin.disks.attach(&thin.control, &vm)?,
                None => None,
            };
            Ok((on_pool.unwrap_or_else(|| disk_path(&dir)), config_path(&dir), out))
        })
        .await
    }

    fn clear_exit(&self, rec: &VmRecord) -> Result<()> {
        hearth_storage::clear_exit_record(&config_path(&self.dir(&rec.spec.id)))
            .map_err(Error::internal)
    }

    fn read_exit(&self, rec: &VmRecord) -> Result<Option<GuestExit>> {
        hearth_storage::read_exit_record(&config_path(&self.dir(&rec.spec.id)))
            .map_err(Error::internal)
    }

    fn capacity(&self) -> Option<u64> {
        let fs = nix::sys::statvfs::statvfs(&self.0.root.join("vms")).ok()?;
        Some(fs.blocks().saturating_mul(fs.fragment_size()))
    }

    fn check_config(&self, cfg: &hearth_types::GuestConfig) -> Result<()> {
        check_config_fits(cfg)
    }

    fn check_host_volume(&self, path: &str) -> Result<String> {
        use hearth_storage::HostDiskError as E;
        hearth_storage::check_host_disk(Path::new(path), &self.0.root).map_err(|e| match e {
            E::Missing(_) => Error::not_found(e.to_string()),
            E::InUse(_) => Error::precondition(e.to_string()),
            E::Io { .. } => Error::precondition(e.to_string()),
            E::Directory(_) | E::NotADisk(_) | E::Empty(_) | E::Hearths(_) => {
                Error::invalid(e.to_string())
            }
        })
    }

    fn host_volume_id(&self, path: &str) -> Option<String> {
        hearth_storage::host_disk_id(Path::new(path))
    }

    fn check_share(&self, path: &str) -> Result<String> {
        use hearth_storage::ShareError as E;
        match hearth_storage::check_share_dir(Path::new(path), &self.0.root) {
            Ok(real) => real
                .to_str()
                .map(str::to_owned)
                .ok_or_else(|| Error::invalid(format!("{path}: its real path is not UTF-8"))),
            Err(e @ E::Missing(_)) => Err(Error::not_found(e.to_string())),
            Err(e @ (E::NotADirectory(_) | E::Hearths(..))) => Err(Error::invalid(e.to_string())),
            Err(e @ E::Io { .. }) => Err(Error::precondition(e.to_string())),
        }
    }
}

#[async_trait]
impl Kernels for Host {
    async fn boot_files(
        &self,
        kernel: &str,
        formats: &[hearth_core::ports::KernelFormat],
        initrd: Option<&str>,
    ) -> Result<(PathBuf, PathBuf)> {
        use hearth_core::ports::KernelFormat;
        let (d, name, initrd) = (self.0.clone(), kernel.to_owned(), initrd.map(str::to_owned));
        // A VMM that boots a bzImage takes the imported file; one that boots only plain ELF
        // gets the vmlinux inside it.
        let elf_only = !formats.contains(&KernelFormat::BzImage);
        blocking(move || {
            if d.kernels.get(&name)?.is_none() {
                anyhow::bail!(
                    "kernel {name} was removed; import it again with `hearth kernel import`"
                );
            }
            let image =
                if elf_only { d.kernels.vmlinux(&name)? } else { d.kernels.kernel_path(&name) };
            let initramfs = match &initrd {
                Some(digest) => d.kernels.initramfs_with(&name, &d.init_binary, digest)?,
                None => d.kernels.initramfs(&name, &d.init_binary)?,
            };
            Ok((image, initramfs))
        })
        .await
    }

    fn default_kernel(&self) -> Result<Option<String>> {
        self.0.kernels.default_name().map_err(Error::internal)
    }

    fn format(&self, kernel: &str) -> Result<hearth_core::ports::KernelFormat> {
        use hearth_core::ports::KernelFormat;
        Ok(match self.0.kernels.elf_pvh(kernel).map_err(Error::internal)? {
            None => KernelFormat::BzImage,
            Some(true) => KernelFormat::ElfPvh,
            Some(false) => KernelFormat::Elf,
        })
    }

    fn exists(&self, kernel: &str) -> Result<bool> {
        Ok(self.0.kernels.get(kernel).map_err(Error::internal)?.is_some())
    }

    fn remove(&self, kernel: &str) -> Result<hearth_types::KernelRecord> {
        off_runtime(|| self.0.kernels.remove(kernel))
            .map_err(|e| Error::precondition(format!("{:#}", anyhow::Error::from(e))))
    }
}

#[async_trait]
impl Network for Host {
    fn plan(&self, spec: &VmSpec) -> Result<Option<NetPlan>> {
        crate::net::plan(spec).map_err(core)
    }

    async fn prepare(&self, spec: &VmSpec) -> Result<()> {
        let cards = spec.cards();
        if cards.iter().any(|c| c.network == NetworkMode::Macvtap) {
            // Loaded natively where it is a module (nothing may run modprobe for the kernel).
            off_runtime(|| hearth_kernel::kmod::load(&hearth_kernel::kmod::tree(), &["macvtap"]))
                .map_err(|e| {
                    Error::precondition(format!(
                        "the VM's macvtap: {e}; use a kernel with macvtap (CONFIG_MACVTAP), or --network bridge"
                    ))
                })?;
        }
        if cards.iter().any(|c| c.network == NetworkMode::Bridge) {
            hearth_net::ensure_bridge(&self.0.bridge)
                .await
                .map_err(|e| Error::precondition(format!("setting up the bridge network: {e}")))?;
        }
        let creates_tap = self.0.vmms.of(spec.provider).capabilities().creates_tap;
        for card in &cards {
            let name = card.link.clone();
            match card.network {
                // On the host's interface, with the card's MAC; kept while the VM exists.
                NetworkMode::Macvtap => {
                    let parent = card.macvtap_parent.clone().unwrap_or_default();
                    let dev = hearth_net::ensure_macvtap(&name, &parent, &card.mac).await.map_err(
                        |e| Error::precondition(format!("the VM's macvtap on {parent}: {e}")),
                    )?;
                    info!(macvtap = name, parent, device = %dev.display(), "macvtap ready");
                }
                // A VMM that opens an existing tap gets one made for it (removed with the VM).
                NetworkMode::Bridge if !creates_tap => {
                    off_runtime(|| hearth_net::create_tap(&name, None))
                        .map_err(|e| Error::precondition(e.to_string()))?;
                }
                _ => {}
            }
        }
        off_runtime(|| crate::net::claim(&self.0, spec)).map_err(core)
    }

    fn settle(&self, spec: &VmSpec, failed: bool) {
        if let Err(e) = off_runtime(|| crate::net::settle(&self.0, spec, failed)) {
            warn!(error = %e.message(), "settling the launch's port forwards failed");
        }
    }

    async fn attach(&self, spec: &VmSpec) -> Result<()> {
        for card in spec.cards().iter().filter(|c| c.network == NetworkMode::Bridge) {
            hearth_net::attach(&card.link, &self.0.bridge.name).await.map_err(|e| {
                Error::precondition(format!("attaching the VM's tap to the bridge: {e}"))
            })?;
        }
        Ok(())
    }

    async fn release(&self, spec: &VmSpec, remove: bool) {
        for card in spec.cards() {
            let name = card.link;
            match card.network {
                NetworkMode::Macvtap if remove => {
                    if let Err(e) = hearth_net::remove_macvtap(&name).await {
                        warn!(macvtap = name, error = %e, "removing the VM's macvtap failed");
                    }
                }
                // The VMM is gone; its tap goes with it a moment later, or is deleted here.
                NetworkMode::Bridge if remove => {
                    if let Err(e) = hearth_net::remove_tap(&name, Duration::from_secs(2)).await {
                        warn!(tap = name, error = %e, "removing the VM's tap failed");
                    }
                }
                _ => {}
            }
        }
        if spec.network == NetworkMode::Bridge && !spec.ports.is_empty() {
            // Its ports go with it.
            if let Err(e) = off_runtime(|| crate::net::sync_nat(&self.0, Some(&spec.id))) {
                warn!(error = %e.message(), "removing the VM's port forwards failed");
            }
        }
    }

    fn resync(&self) {
        if let Err(e) = off_runtime(|| crate::net::sync_nat(&self.0, None)) {
            warn!(error = %e.message(), "rebuilding the bridge's port forwards failed");
        }
    }

    fn check_publishable(&self, spec: &VmSpec) -> Result<()> {
        crate::net::check_ports_free(spec).map_err(core)?;
        crate::net::check_unclaimed(&self.0, spec).map_err(core)
    }

    fn resolvers(&self) -> Vec<String> {
        crate::net::host_resolvers()
    }
}

#[async_trait]
impl Guests for Host {
    async fn capture_console(&self, spec: &VmSpec) -> Result<()> {
        crate::console::capture(&self.0, spec).await.map_err(Error::internal)
    }
    async fn console_closed(&self, id: &VmId) {
        crate::console::closed(&self.0, id).await;
    }
    fn console_offset(&self, id: &VmId) -> u64 {
        crate::console::log_end(&self.0, id)
    }
    async fn forget(&self, id: &VmId, removed: bool) {
        self.0.forget_agent(id).await;
        if removed {
            crate::console::forget(&self.0, id).await;
        }
    }
    async fn shutdown(&self, id: &VmId) -> Result<()> {
        let agent = self.0.agent(id).await.map_err(|e| Error::unavailable(e.to_string()))?;
        agent.shutdown().await.map_err(|e| Error::unavailable(e.to_string()))
    }
    async fn wait_ready(&self, id: &VmId, timeout: Duration) -> Result<Ready> {
        let deadline = tokio::time::Instant::now() + timeout;
        let agent = self.0.agent(id).await.map_err(|e| Error::unavailable(e.to_string()))?;
        agent.wait_ready(deadline).await.map_err(|e| Error::unavailable(e.to_string()))
    }
    async fn reidentify(&self, id: &VmId, identity: &hearth_types::agent::Identity) -> Result<()> {
        let agent = self.0.agent(id).await.map_err(|e| Error::unavailable(e.to_string()))?;
        agent.reidentify(identity).await.map_err(|e| Error::unavailable(e.to_string()))
    }
}

impl Sandbox for Host {
    fn claim(&self, spec: &VmSpec) -> Result<Confinement> {
        let uid = self.0.claim_uid().map_err(core)?;
        Ok(Confinement { run_as: uid.map(|u| (u, u)), cgroup: self.0.cgroup_of(&spec.id) })
    }
    fn settle(&self, c: &Confinement) {
        self.0.settle_uid(c.run_as.map(|(u, _)| u));
    }
    fn of(&self, spec: &VmSpec) -> Confinement {
        Confinement { run_as: None, cgroup: self.0.cgroup_of(&spec.id) }
    }
}

/// Snapshots under `ROOT/snapshots/NAME/` (private): `snapshot.json`, the guest's `state`, and
/// copies of the VM's own disks named as in a VM's directory (`disk.img`, `volume-N.img`).
impl Host {
    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.0.root.join("snapshots").join(name)
    }

    /// The VM's own disks a snapshot copies and a restore gives back: (file name, source).
    fn own_disks(&self, rec: &VmRecord) -> Vec<(String, PathBuf)> {
        let dir = self.dir(&rec.spec.id);
        let mut out = vec![("disk.img".to_owned(), disk_path(&dir))];
        for (i, v) in rec.spec.volumes.iter().enumerate() {
            let own = matches!(v.source, VolumeSource::Blank { .. })
                || (v.source.is_image() && !v.read_only);
            if own {
                out.push((format!("volume-{i}.img"), volume_path(&dir, i)));
            }
        }
        out
    }
}

/// Bytes a file takes on its filesystem.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[async_trait]
impl hearth_core::ports::Snapshots for Host {
    fn begin(&self, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        hearth_types::snapshot::validate_snapshot_name(name).map_err(Error::invalid)?;
        let top = self.0.root.join("snapshots");
        let mut b = std::fs::DirBuilder::new();
        b.mode(0o700);
        b.recursive(true).create(&top).map_err(Error::internal)?;
        let dir = self.snapshot_dir(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir.join(hearth_core::ports::snapshots::STATE_FILE)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::conflict(
                format!("a snapshot named {name} exists (or is being taken): remove it with `hearth snapshot rm {name}`, or choose another name"),
            )),
            Err(e) => Err(Error::internal(e)),
        }
    }

    async fn copy_disks(&self, name: &str, rec: &VmRecord) -> Result<u64> {
        if self.0.thin.is_some() {
            return Err(Error::invalid(
                "snapshots of VMs whose disks are on the thin pool are not supported yet: run hearthd without --thin-pool to take them",
            ));
        }
        let (disks, dir) = (self.own_disks(rec), self.snapshot_dir(name));
        blocking(move || {
            for (file, from) in &disks {
                let len = std::fs::metadata(from)?.len();
                hearth_storage::clone_disk(from, &dir.join(file), len)?;
            }
            let total = std::fs::read_dir(&dir)?.flatten().map(|e| allocated(&e.path())).sum();
            Ok(total)
        })
        .await
    }

    fn commit(&self, snap: &hearth_types::snapshot::SnapshotRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(snap).map_err(Error::internal)?;
        hearth_fs::atomic_write(&self.snapshot_dir(&snap.name).join("snapshot.json"), &json)
            .map_err(Error::internal)
    }

    fn remove(&self, name: &str) -> Result<()> {
        hearth_types::snapshot::validate_snapshot_name(name).map_err(Error::invalid)?;
        match std::fs::remove_dir_all(self.snapshot_dir(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::internal(e)),
            _ => Ok(()),
        }
    }

    fn get(&self, name: &str) -> Result<Option<hearth_types::snapshot::SnapshotRecord>> {
        if hearth_types::snapshot::validate_snapshot_name(name).is_err() {
            return Ok(None);
        }
        match std::fs::read(self.snapshot_dir(name).join("snapshot.json")) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(Error::internal),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(e)),
        }
    }

    fn list(&self) -> Result<Vec<hearth_types::snapshot::SnapshotRecord>> {
        let Ok(rd) = std::fs::read_dir(self.0.root.join("snapshots")) else { return Ok(vec![]) };
        let mut all = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(snap) = hearth_core::ports::Snapshots::get(self, &name)? {
                all.push(snap);
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.snapshot_dir(name).join(hearth_core::ports::snapshots::STATE_FILE)
    }

    async fn restore_disks(&self, name: &str, rec: &VmRecord) -> Result<()> {
        if self.0.thin.is_some() {
            return Err(Error::invalid(
                "VMs from snapshots cannot have their disks on the thin pool yet: run hearthd without --thin-pool",
            ));
        }
        let (from, disks) = (self.snapshot_dir(name), self.own_disks(rec));
        let dir = self.dir(&rec.spec.id);
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            // The root disk last: its existence marks the VM's disks made.
            for (file, to) in disks.iter().rev() {
                let src = from.join(file);
                let len = std::fs::metadata(&src)?.len();
                hearth_storage::clone_disk(&src, to, len)?;
            }
            Ok(())
        })
        .await
    }

    fn boot_ids(&self, kernel: &str) -> Result<(String, String)> {
        use sha2::Digest as _;
        let rec = self.0.kernels.get(kernel).map_err(Error::internal)?.ok_or_else(|| {
            Error::not_found(format!("kernel {kernel} does not exist (see `hearth kernel ls`)"))
        })?;
        let init = std::fs::read(&self.0.init_binary).map_err(Error::internal)?;
        let mut h = sha2::Sha256::new();
        h.update(&init);
        h.update(hearth_kernel::GUEST_MODULES.join(",").as_bytes());
        Ok((rec.id.hex().to_owned(), hex::encode(h.finalize())))
    }
}
