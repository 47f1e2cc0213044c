//! Creating a VM: resolve its image and kernel, check everything a start would trip on, choose
//! its name and address, and persist its intent. Nothing is left behind when any check fails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hearth_types::{
    format_size, generate_name, size_flag, Accel, Desired, GuestConfig, ImageConfig, ImageRecord,
    LogOptions, NetworkMode, PortMapping, Provider, VmId, VmRecord, VmSpec, VmStatus, VolumeSource,
    VolumeSpec,
};

use crate::{Error, Reconciler, Result};

/// What `hearth run`, `hearth create` and a Flintlock microVM ask for, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVm {
    /// The image reference or id; it must be in the store.
    pub image: String,
    /// The kernel's name; the default kernel when `None`.
    pub kernel: Option<String>,
    /// An initrd of the VM's own, by its stored digest (Flintlock's `initrd`).
    pub initrd: Option<String>,
    /// A generated name (adjective_surname) when `None`.
    pub name: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub kernel_args: String,
    pub entrypoint: Option<Vec<String>>,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub accel: Accel,
    pub provider: Provider,
    pub auto_remove: bool,
    pub interactive: bool,
    pub tty: bool,
    pub network: NetworkMode,
    pub ports: Vec<PortMapping>,
    pub ssh: SshKey,
    pub mac: Option<String>,
    /// A bridge address asked for; allocated when `None` on the bridge.
    pub address: Option<Ipv4Addr>,
    pub cloud_init_network: Option<String>,
    /// The host interface of a macvtap network, and a static address there.
    pub macvtap_parent: Option<String>,
    pub lan: Option<hearth_types::LanAddress>,
    /// Network cards after the first; a bridge card's address is allocated when not asked for.
    pub nics: Vec<hearth_types::NicSpec>,
    pub volumes: Vec<NewVolume>,
    pub cloud_init: BTreeMap<String, hearth_types::Blob>,
    pub log: Option<LogOptions>,
    /// `--restart`; refused with `auto_remove`.
    pub restart: hearth_types::RestartPolicy,
    /// Fail the VM after this many quick restarts in a row (Flintlock microVMs).
    pub crash_loop_limit: Option<u32>,
}

/// How a VM gets SSH access.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SshKey {
    #[default]
    None,
    /// This public key is authorised.
    Given(String),
    /// A key pair is generated in the VM's directory.
    Generate,
}

/// An extra disk: made from an image, a host file or block device, or blank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVolume {
    pub id: String,
    pub source: VolumeSource,
    /// The image of an image volume.
    pub image: String,
    pub mount_point: Option<String>,
    pub read_only: bool,
}

impl Reconciler {
    /// Validates `req` and persists the new VM (stopped; `start` launches it).
    pub async fn create(self: &Arc<Self>, req: NewVm) -> Result<VmRecord> {
        let p = &self.ports;
        if req.image.is_empty() {
            return Err(Error::invalid("no image given: hearth run IMAGE [COMMAND...]"));
        }
        self.check_provider(&req)?;
        let image = p.images.find(&req.image)?.ok_or_else(|| not_pulled(&req.image))?;
        let kernel = match req.kernel.as_deref() {
            Some(k) => hearth_types::kernel_name(k).map_err(|e| Error::invalid(e.to_string()))?,
            None => p.kernels.default_kernel()?.ok_or_else(|| {
                Error::precondition(
                    "no kernel is imported: import one with `hearth kernel import FILE --name NAME`",
                )
            })?,
        };
        if !p.kernels.exists(&kernel)? {
            let fix = if hearth_types::kernel::is_reference(&kernel) {
                format!("pull it with `hearth kernel pull {kernel}` or `--pull missing`")
            } else {
                "see `hearth kernel ls`, or import it".to_owned()
            };
            return Err(Error::not_found(format!("kernel {kernel} does not exist: {fix}")));
        }
        self.check_kernel(&kernel, req.provider)?;
        let volumes = self.volumes(&req.volumes)?;
        // The image's root filesystem is built (once per image) before anything is recorded, so a
        // --size it does not fit in, or a USER it lacks, is refused here and no VM is left behind.
        let root_fs = p.images.root_fs(&image).await?;
        let _one_at_a_time = self.creating.lock().await;
        if p.images.find(image.id.hex())?.is_none() {
            return Err(Error::conflict(format!("image {} was removed meanwhile", req.image)));
        }
        self.check_host_volumes(&volumes)?;
        let name = self.unique_name(req.name.clone())?;
        let created_at = p.clock.now_millis() / 1000;
        let address = req.address;
        let ssh = req.ssh.clone();
        let mut spec = spec_of(req, &image, kernel, name, volumes, created_at);
        spec.address = self.address_for(spec.network, address, &[])?;
        let mut mine: Vec<Ipv4Addr> = spec.address.into_iter().collect();
        for nic in &mut spec.nics {
            nic.address = self.address_for(nic.network, nic.address, &mine)?;
            mine.extend(nic.address);
        }
        spec.validate().map_err(|e| Error::invalid(e.to_string()))?;
        self.check_fits(&spec, root_fs.bytes)?;
        let cfg = guest_config_for(&spec, &image.config, p.network.resolvers())?;
        p.disks.check_config(&cfg)?;
        check_user(&spec, &cfg, root_fs.users.as_ref())?;
        p.network.check_publishable(&spec)?;
        let mut rec = VmRecord { spec, desired: Desired::Stopped, status: VmStatus::default() };
        if ssh == SshKey::Generate {
            self.generate_key(&mut rec)?;
        }
        if let Err(e) = p.repo.save(&rec) {
            p.repo.discard(&rec.spec.id);
            return Err(e);
        }
        Ok(rec)
    }

    /// The VMM asked for can run what is asked of it: the core asks its capabilities.
    fn check_provider(&self, req: &NewVm) -> Result<()> {
        let caps = self.ports.vmms.of(req.provider).capabilities();
        let vmm = req.provider;
        if req.network == NetworkMode::User && !caps.user_network {
            return Err(Error::invalid(format!(
                "--vmm {vmm} has no user-mode network: use --network bridge or --network none"
            )));
        }
        let macvtap = std::iter::once(req.network)
            .chain(req.nics.iter().map(|n| n.network))
            .any(|n| n == NetworkMode::Macvtap);
        if macvtap && !caps.macvtap {
            return Err(Error::invalid(format!(
                "--vmm {vmm} has no macvtap interfaces (it opens taps only by name): use --network bridge, or --vmm qemu or cloud-hypervisor"
            )));
        }
        if req.volumes.iter().any(|v| v.source.is_share()) && !caps.shares {
            return Err(Error::invalid(format!(
                "--vmm {vmm} cannot share host directories (it has no virtio-fs): give the VM a disk image or block device instead, or use --vmm qemu or cloud-hypervisor"
            )));
        }
        if req.accel != Accel::Auto && !caps.accels.contains(&req.accel) {
            return Err(Error::invalid(format!(
                "--vmm {vmm} cannot run guests with --accel {}: use --accel auto{}",
                req.accel,
                if req.accel == Accel::Tcg { ", or --vmm qemu for software emulation" } else { "" }
            )));
        }
        Ok(())
    }

    /// The VMM boots the kernel, as it is or converted (an ELF-only VMM gets the vmlinux inside
    /// a bzImage); else the refusal names the VMMs that do.
    fn check_kernel(&self, kernel: &str, vmm: hearth_types::Provider) -> Result<()> {
        use crate::ports::KernelFormat;
        let format = self.ports.kernels.format(kernel)?;
        if boots(self.ports.vmms.of(vmm).capabilities().kernel_formats, format) {
            return Ok(());
        }
        let what = match format {
            KernelFormat::Elf => "an ELF vmlinux without a PVH note",
            KernelFormat::ElfPvh => "an ELF vmlinux",
            KernelFormat::BzImage => "a bzImage",
        };
        let by: Vec<String> = (self.ports.vmms.all().iter())
            .map(|v| v.capabilities())
            .filter(|c| boots(c.kernel_formats, format))
            .map(|c| c.provider.to_string())
            .collect();
        Err(Error::invalid(match by.first() {
            Some(first) => format!(
                "kernel {kernel} is {what}: only {} boots it, not {vmm}; use --vmm {first} or a bzImage",
                by.join(" and ")
            ),
            None => format!("kernel {kernel} is {what}, which no VMM here boots: import a bzImage"),
        }))
    }

    /// The volumes' images, resolved to what the VM keeps using.
    fn volumes(&self, asked: &[NewVolume]) -> Result<Vec<VolumeSpec>> {
        asked
            .iter()
            .map(|v| {
                if !v.source.is_image() {
                    // A shared directory is kept by its canonical path.
                    let source = match &v.source {
                        VolumeSource::Share { path } => VolumeSource::Share {
                            path: (self.ports.disks.check_share(path))
                                .map_err(|e| e.context(format!("volume {}", v.id)))?,
                        },
                        other => other.clone(),
                    };
                    return Ok(VolumeSpec {
                        id: v.id.clone(),
                        source,
                        image: String::new(),
                        image_id: String::new(),
                        mount_point: v.mount_point.clone(),
                        read_only: v.read_only,
                    });
                }
                let img = self.ports.images.find(&v.image)?.ok_or_else(|| {
                    Error::not_found(format!(
                        "volume {}: image {} is not in the store: pull it with `hearth image pull {}`",
                        v.id, v.image, v.image
                    ))
                })?;
                Ok(VolumeSpec {
                    id: v.id.clone(),
                    source: VolumeSource::Image,
                    image: v.image.clone(),
                    image_id: img.id.hex().to_owned(),
                    mount_point: v.mount_point.clone(),
                    read_only: v.read_only,
                })
            })
            .collect()
    }

    /// Each host volume is a file or block device the host may give (the port checks it), and
    /// no two writers share one: not two VMs, not two volumes of this one, unless all read.
    fn check_host_volumes(&self, volumes: &[VolumeSpec]) -> Result<()> {
        let disks = &self.ports.disks;
        let host_path = |v: &VolumeSpec| match &v.source {
            VolumeSource::Host { path } => Some(path.clone()),
            _ => None,
        };
        let mut taken: Vec<(String, bool, String)> = Vec::new();
        for rec in self.ports.repo.list()? {
            for v in &rec.spec.volumes {
                if let Some(key) = host_path(v).and_then(|p| disks.host_volume_id(&p)) {
                    taken.push((key, v.read_only, format!("VM {}", rec.spec.name)));
                }
            }
        }
        for v in volumes {
            let Some(path) = host_path(v) else { continue };
            let key = disks
                .check_host_volume(&path)
                .map_err(|e| e.context(format!("volume {}", v.id)))?;
            let shared = taken.iter().find(|(k, ro, _)| *k == key && !(*ro && v.read_only));
            if let Some((_, _, holder)) = shared {
                return Err(Error::conflict(format!(
                    "volume {}: {path} is attached to {holder} already, and two writers of one disk corrupt it: attach it read-only (:ro) everywhere, or remove the other",
                    v.id
                )));
            }
            taken.push((key, v.read_only, format!("volume {} of this VM", v.id)));
        }
        Ok(())
    }

    /// A key pair in the VM's directory, recorded on the VM; the directory goes if it fails.
    fn generate_key(&self, rec: &mut VmRecord) -> Result<()> {
        let dir = self.ports.repo.vm_dir(&rec.spec.id);
        let comment = format!("hearth@{}", rec.spec.name);
        match self.ports.keys.generate_ssh_key(&dir, &comment) {
            Ok((public, path)) => {
                rec.spec.ssh_public_key = Some(public);
                rec.status.ssh_key_path = Some(path.display().to_string());
                Ok(())
            }
            Err(e) => {
                self.ports.repo.discard(&rec.spec.id);
                Err(e.context("generating the VM's SSH key pair"))
            }
        }
    }

    /// The name asked for if no VM has it, else a generated one no VM has.
    pub(crate) fn unique_name(&self, asked: Option<String>) -> Result<String> {
        let repo = &self.ports.repo;
        let name = asked.unwrap_or_else(|| {
            let mut n = generate_name(rand::random());
            while repo.name_holder(&n).is_some() {
                n = generate_name(rand::random());
            }
            n
        });
        if let Some(other) = repo.name_holder(&name) {
            return Err(Error::conflict(format!(
                "the name {name} is already used by VM {other}: remove it or choose another --name"
            )));
        }
        Ok(name)
    }

    /// A card's bridge address: the one asked for if free, else the lowest free one; `mine`
    /// are those the VM's earlier cards took.
    pub(crate) fn address_for(
        &self,
        network: NetworkMode,
        asked: Option<Ipv4Addr>,
        mine: &[Ipv4Addr],
    ) -> Result<Option<Ipv4Addr>> {
        let repo = &self.ports.repo;
        match (network, asked) {
            (NetworkMode::Bridge, Some(a)) => {
                hearth_types::net::check_bridge_address(a)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                if let Some(other) = repo.address_holder(a) {
                    return Err(Error::conflict(format!(
                        "address {a} is taken by VM {other}; choose another or leave it empty"
                    )));
                }
                if mine.contains(&a) {
                    return Err(Error::invalid(format!(
                        "address {a} is given to two of the VM's cards; give each its own"
                    )));
                }
                Ok(Some(a))
            }
            (NetworkMode::Bridge, None) => hearth_types::net::allocate_bridge_address(
                &[repo.used_addresses(), mine.to_vec()].concat(),
                &repo.reserved_networks(),
            )
            .map(Some)
            .map_err(|e| Error::exhausted(e.to_string())),
            (_, Some(a)) => Err(Error::invalid(format!("address {a} needs --network bridge"))),
            (_, None) => Ok(None),
        }
    }

    /// The root disk holds the image's filesystem and fits the filesystem it lives on.
    fn check_fits(&self, spec: &VmSpec, base_bytes: u64) -> Result<()> {
        if spec.disk_bytes < base_bytes {
            return Err(Error::invalid(format!(
                "--size {} is smaller than the root filesystem of {} ({}): use --size {} or more",
                format_size(spec.disk_bytes),
                spec.image,
                format_size(base_bytes),
                size_flag(base_bytes)
            )));
        }
        match self.ports.disks.capacity() {
            Some(total) if spec.disk_bytes > total => Err(Error::invalid(format!(
                "--size {} is larger than the whole filesystem holding {} ({}): choose a smaller --size",
                format_size(spec.disk_bytes),
                self.ports.repo.vms_dir().display(),
                format_size(total)
            ))),
            _ => Ok(()),
        }
    }
}

/// The spec of a new VM; its address is chosen after.
fn spec_of(
    req: NewVm,
    image: &ImageRecord,
    kernel: String,
    name: String,
    volumes: Vec<VolumeSpec>,
    created_at: u64,
) -> VmSpec {
    VmSpec {
        id: VmId::from_bytes(rand::random()),
        name,
        image: image.names.first().cloned().unwrap_or_else(|| req.image.clone()),
        image_id: image.id.hex().to_owned(),
        kernel,
        initrd: req.initrd,
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        disk_bytes: req.disk_bytes,
        kernel_args: req.kernel_args,
        entrypoint: req.entrypoint,
        command: req.command,
        env: req.env,
        labels: req.labels,
        accel: req.accel,
        provider: req.provider,
        auto_remove: req.auto_remove,
        interactive: req.interactive,
        tty: req.tty,
        network: req.network,
        ports: req.ports,
        // A placeholder for a key generated later, so validation sees that SSH is wanted.
        ssh_public_key: match req.ssh {
            SshKey::None => None,
            SshKey::Given(k) => Some(k),
            SshKey::Generate => Some("ssh-ed25519 AAAA".to_owned()),
        },
        mac: req.mac,
        address: None,
        cloud_init_network: req.cloud_init_network,
        macvtap_parent: req.macvtap_parent,
        nics: req.nics,
        lan: req.lan,
        volumes,
        cloud_init: req.cloud_init,
        log: req.log,
        restart: req.restart,
        crash_loop_limit: req.crash_loop_limit,
        snapshot: None,
        created_at,
    }
}

fn not_pulled(reference: &str) -> Error {
    // A malformed reference is reported as such; a well-formed one as not pulled.
    if let Err(e) = reference.parse::<hearth_types::ImageRef>() {
        return Error::invalid(e.to_string());
    }
    Error::not_found(format!(
        "image {reference} is not in the store: pull it with `hearth image pull {reference}`"
    ))
}

/// An image's USER must exist in the image (unless its own init runs as PID 1).
fn check_user(spec: &VmSpec, cfg: &GuestConfig, users: Option<&(String, String)>) -> Result<()> {
    let (false, Some((passwd, group))) = (cfg.init_system || cfg.process.user.is_empty(), users)
    else {
        return Ok(());
    };
    hearth_types::user::resolve(&cfg.process.user, passwd, group).map(drop).map_err(|why| {
        Error::invalid(format!(
            "image {} runs as USER {:?}, but {why}: fix the image's USER",
            spec.image, cfg.process.user
        ))
    })
}

/// The guest config a VM's config disk holds: the image's process with the VM's overrides, the
/// host's `resolvers` on the bridge, cloud-init's network-config when asked for. Create checks it
/// (size, USER) with the same function that writes it.
pub fn guest_config_for(
    spec: &VmSpec,
    image: &ImageConfig,
    resolvers: Vec<String>,
) -> Result<GuestConfig> {
    let mut cfg = crate::guest_config(spec, image).map_err(|e| Error::invalid(e.to_string()))?;
    cfg.network = network_for(spec, resolvers.clone());
    cfg.cloud_init = cloud_init_bundle(spec, resolvers);
    cfg.cloud_init.retain(|name, _| hearth_types::vm::CLOUD_INIT_FILES.contains(&name.as_str()));
    Ok(cfg)
}

/// The VM's network as its guest is told it: the host's `resolvers` on the bridge.
fn network_for(spec: &VmSpec, resolvers: Vec<String>) -> Option<hearth_types::GuestNetwork> {
    let mut net = crate::guest_network(spec)?;
    if spec.network == NetworkMode::Bridge {
        net.dns = resolvers;
    }
    Some(net)
}

/// The metadata a VM is given: its own, plus the generated network-config when asked for (it
/// wins over one given: Flintlock's `add_network_config`), and an empty user-data when none is
/// given, so cloud-init's NoCloud source still finds the VM's seed. A VMM's metadata service
/// (Firecracker's MMDS) gets all of it, hearth-init's NoCloud seed cloud-init's own files.
pub fn cloud_init_bundle(
    spec: &VmSpec,
    resolvers: Vec<String>,
) -> BTreeMap<String, hearth_types::Blob> {
    let mut files = spec.cloud_init.clone();
    if !files.is_empty() || spec.cards().iter().any(|c| c.guest_name.is_some()) {
        files.entry("user-data".into()).or_default();
    }
    // Every card given a name in the guest (the first by `cloud_init_network`), in order.
    let first = network_for(spec, resolvers);
    let cards = spec.cards();
    let settings: Vec<_> = (cards.iter())
        .map(|c| if c.index == 0 { first.clone() } else { crate::guest::card_network(c) })
        .collect();
    let named: Vec<_> = (cards.iter().zip(&settings))
        .filter_map(|(c, net)| {
            let device = c.guest_name.as_deref()?;
            // A card with neither a static address nor the LAN's DHCP is left to the guest.
            (net.is_some() || c.network == NetworkMode::Macvtap).then_some(
                crate::guest::CloudInitCard { device, mac: &c.mac, network: net.as_ref() },
            )
        })
        .collect();
    if !named.is_empty() {
        let config = crate::cloud_init_network_config(&named);
        files.insert("network-config".into(), config.into());
    }
    files
}

/// Whether a VMM booting `formats` boots a `kernel` of that format, converting a bzImage to the
/// vmlinux inside it for an ELF-only VMM.
fn boots(formats: &[crate::ports::KernelFormat], kernel: crate::ports::KernelFormat) -> bool {
    use crate::ports::KernelFormat::{BzImage, Elf};
    formats.contains(&kernel) || (kernel == BzImage && formats.contains(&Elf))
}

#[cfg(test)]
mod tests {
    use super::boots;
    use crate::ports::KernelFormat::{BzImage, Elf, ElfPvh};

    #[test]
    fn each_vmm_boots_its_formats_and_an_elf_only_one_a_bzimage_converted() {
        let (qemu, firecracker) = (&[BzImage, ElfPvh][..], &[Elf, ElfPvh][..]);
        assert!(boots(qemu, BzImage) && boots(qemu, ElfPvh) && !boots(qemu, Elf));
        assert!(boots(firecracker, Elf) && boots(firecracker, ElfPvh));
        assert!(boots(firecracker, BzImage), "the vmlinux inside it is extracted");
        assert!(!boots(&[], BzImage));
    }
}
