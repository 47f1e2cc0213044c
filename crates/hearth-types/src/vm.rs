//! VMs: the desired spec, the observed status, and the record hearthd persists.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{validate_name, VmId};
use crate::net::{NetworkMode, PortMapping};

/// Ignite's defaults: 1 vCPU, 512 MiB, 4 GiB disk.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
pub const DEFAULT_DISK_BYTES: u64 = 4 << 30;
/// Bounds the VMMs accept.
pub const MAX_CPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_KERNEL_ARGS: usize = 1024;
/// Root disks are files on the host: 16 MiB up to ext4's largest file (16 TiB with 4 KiB blocks).
pub const MIN_DISK_BYTES: u64 = 16 << 20;
pub const MAX_DISK_BYTES: u64 = 16 << 40;

/// How QEMU runs the guest: hardware KVM, software TCG, or whatever really works here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = VmSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" | "" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(VmSpecError::Accel(other.to_owned())),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The VMMs hearth can drive (`--vmm`). Closed: adding one is a new variant, a folder in
/// hearth-vmm and nothing else (docs/design.md, "Adding a provider").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    Qemu,
    Firecracker,
    #[serde(rename = "cloud-hypervisor")]
    CloudHypervisor,
}

impl Provider {
    /// Every provider, in the order they are offered.
    pub const ALL: &'static [Provider] =
        &[Provider::Qemu, Provider::Firecracker, Provider::CloudHypervisor];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Qemu => "qemu",
            Provider::Firecracker => "firecracker",
            Provider::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Provider {
    type Err = VmSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| VmSpecError::Provider(s.to_owned()))
    }
}

fn provider_names() -> String {
    Provider::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
}

/// Why a spec was refused. Each message names the flag to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmSpecError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u32),
    #[error("--memory must be between {MIN_MEMORY_MIB} MiB and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u64),
    #[error("--size must be between 16 MiB and 16 TiB (the largest disk file ext4 holds), got {shown} ({0} bytes)", shown = crate::size::format_size(*.0))]
    Disk(u64),
    #[error("--kernel-args is longer than {MAX_KERNEL_ARGS} bytes")]
    KernelArgs,
    #[error("--accel must be auto, kvm or tcg, got {0:?}")]
    Accel(String),
    #[error("--vmm {0:?} is not a VMM hearth drives; use one of: {names}", names = provider_names())]
    Provider(String),
    #[error("environment entry {0:?} is not KEY=VALUE with a non-empty KEY")]
    Env(String),
    #[error("label {0:?} is not KEY=VALUE with a non-empty KEY")]
    Label(String),
    #[error("{0}")]
    Volume(String),
    #[error("{0}")]
    Card(String),
    #[error("interface name {0:?} must be 1-15 letters, digits, '_', '.' or '-'")]
    InterfaceName(String),
    #[error("--network macvtap needs the host interface to sit on (macvtap:IFACE, 1-15 letters, digits, '_', '.' or '-'), and only it takes one; got {0:?}")]
    Macvtap(String),
    #[error(
        "metadata key {0:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.' (cloud-init's files are meta-data, user-data, vendor-data, network-config)"
    )]
    CloudInitKey(String),
    #[error("metadata {0:?} is larger than {kib} KiB", kib = MAX_CLOUD_INIT_BYTES >> 10)]
    CloudInitSize(String),
    #[error("metadata: at most {MAX_METADATA_KEYS} entries of {kib} KiB in all", kib = MAX_METADATA_BYTES >> 10)]
    MetadataTotal,
    #[error("--log-opt {0:?}: use max-size=SIZE (4K to 1G) or max-file=N (1 to 100)")]
    LogOpt(String),
    #[error("initrd {0:?} is not the digest of a stored initrd")]
    Initrd(String),
    #[error("--rm cannot be combined with --restart {0}: a VM removed when it stops is never started again")]
    RemoveAndRestart(crate::RestartPolicy),
    #[error(transparent)]
    Name(#[from] crate::id::IdError),
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
}

/// What the user asked for. Immutable once created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: VmId,
    pub name: String,
    /// The reference as the user gave it, normalised.
    pub image: String,
    /// The image id (config digest) resolved at create time; the VM keeps using it.
    pub image_id: String,
    /// Kernel name in the store.
    pub kernel: String,
    /// An initrd of the VM's own (Flintlock's `initrd`), by the digest it is stored under:
    /// unpacked before hearth's initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// Kernel command-line arguments, merged over hearth's by key.
    #[serde(default)]
    pub kernel_args: String,
    /// Overrides the image ENTRYPOINT when set (`--entrypoint`).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Overrides the image CMD when non-empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// `KEY=VALUE`, merged over the image ENV.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub accel: Accel,
    /// The VMM that runs it (`--vmm`); QEMU for records made before there was a choice.
    #[serde(default)]
    pub provider: Provider,
    /// Remove the VM once it stops (`--rm`).
    #[serde(default)]
    pub auto_remove: bool,
    /// Keep the console's stdin open (`-i`).
    #[serde(default)]
    pub interactive: bool,
    /// Give the workload a terminal (`-t`).
    #[serde(default)]
    pub tty: bool,
    /// How the VM reaches the network.
    #[serde(default)]
    pub network: NetworkMode,
    /// Host sockets forwarded to guest ports (`-p`).
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Public key hearth-init installs for root (`--ssh`); `hearth ssh` reaches the guest's port 22.
    #[serde(default)]
    pub ssh_public_key: Option<String>,
    /// The network card's MAC address; derived from the id when not given.
    #[serde(default)]
    pub mac: Option<String>,
    /// The card's IPv4 address on the bridge network, allocated at create (`--network bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// Extra disks made from images' filesystems, attached after the root disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// The host interface a macvtap network sits on (`--network macvtap:IFACE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macvtap_parent: Option<String>,
    /// Network cards after the first (the fields above describe the first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::NicSpec>,
    /// A static address on the LAN (macvtap network); without one the guest takes DHCP there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<LanAddress>,
    /// Generate cloud-init's network-config for the card, naming the interface this (Flintlock's
    /// `add_network_config`), unless `cloud_init` carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init_network: Option<String>,
    /// cloud-init NoCloud files (`meta-data`, `user-data`, `vendor-data`, `network-config`) that
    /// hearth-init seeds into the guest for the image's own cloud-init.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cloud_init: BTreeMap<String, crate::Blob>,
    /// The console log's limits, when not the daemon's (`--log-opt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogOptions>,
    /// When the VM is started again after it ended on its own (`--restart`).
    #[serde(default, skip_serializing_if = "is_no_restart")]
    pub restart: crate::RestartPolicy,
    /// Give up after this many restarts in a row, each after a run shorter than
    /// [`crate::restart::STEADY_RUN`]: the VM is then failed, saying it crash-looped (Flintlock
    /// microVMs; docker's policies have no such limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_loop_limit: Option<u32>,
    /// The snapshot the VM was made from (`hearth run --snapshot`): its first launch restores
    /// the guest from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
}

fn is_no_restart(p: &crate::RestartPolicy) -> bool {
    *p == crate::RestartPolicy::No
}

/// A VM's own console log limits (docker's `--log-opt max-size=..,max-file=..`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u32>,
}

/// Bounds of the console log options.
pub const MIN_LOG_SIZE: u64 = 4 << 10;
pub const MAX_LOG_SIZE: u64 = 1 << 30;
pub const MAX_LOG_FILES: u32 = 100;

impl LogOptions {
    /// Parses docker's `--log-opt KEY=VALUE` list (`max-size`, `max-file`).
    pub fn parse(opts: &[String]) -> Result<Option<Self>, VmSpecError> {
        let mut out = Self::default();
        for o in opts {
            let bad = || VmSpecError::LogOpt(o.clone());
            let (k, v) = o.split_once('=').ok_or_else(bad)?;
            match k {
                "max-size" => out.max_size = Some(crate::size::parse_size(v).map_err(|_| bad())?),
                "max-file" => out.max_files = Some(v.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        out.validate()?;
        Ok((out != Self::default()).then_some(out))
    }

    pub fn validate(&self) -> Result<(), VmSpecError> {
        if self.max_size.is_some_and(|s| !(MIN_LOG_SIZE..=MAX_LOG_SIZE).contains(&s)) {
            return Err(VmSpecError::LogOpt(format!(
                "max-size={}",
                self.max_size.unwrap_or_default()
            )));
        }
        if self.max_files.is_some_and(|n| !(1..=MAX_LOG_FILES).contains(&n)) {
            return Err(VmSpecError::LogOpt(format!(
                "max-file={}",
                self.max_files.unwrap_or_default()
            )));
        }
        Ok(())
    }
}

impl VmSpec {
    /// Checks every field a user can set.
    pub fn validate(&self) -> Result<(), VmSpecError> {
        validate_name(&self.name)?;
        if let Some(d) = &self.initrd {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(VmSpecError::Initrd(d.clone()));
            }
        }
        if self.auto_remove && self.restart != crate::RestartPolicy::No {
            return Err(VmSpecError::RemoveAndRestart(self.restart));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(VmSpecError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(VmSpecError::Memory(self.memory_mib));
        }
        if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&self.disk_bytes) {
            return Err(VmSpecError::Disk(self.disk_bytes));
        }
        if self.kernel_args.len() > MAX_KERNEL_ARGS {
            return Err(VmSpecError::KernelArgs);
        }
        for e in &self.env {
            if !matches!(e.split_once('='), Some((k, _)) if !k.is_empty()) {
                return Err(VmSpecError::Env(e.clone()));
            }
        }
        crate::net::validate(self.network, &self.ports, self.ssh_public_key.as_deref())?;
        if let Some(mac) = &self.mac {
            crate::net::validate_mac(mac)?;
        }
        if self.lan.is_some() && self.network != NetworkMode::Macvtap {
            return Err(VmSpecError::Macvtap(
                "a static LAN address without --network macvtap".into(),
            ));
        }
        match (&self.macvtap_parent, self.network) {
            (Some(p), NetworkMode::Macvtap) if iface_ok(p) => {}
            (None, m) if m != NetworkMode::Macvtap => {}
            (p, _) => return Err(VmSpecError::Macvtap(p.clone().unwrap_or_default())),
        }
        if let Some(dev) = &self.cloud_init_network {
            if !iface_ok(dev) {
                return Err(VmSpecError::InterfaceName(dev.clone()));
            }
        }
        self.validate_nics()?;
        if self.volumes.len() > MAX_VOLUMES {
            return Err(VmSpecError::Volume(format!("more than {MAX_VOLUMES} volumes")));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let id_ok = !v.id.is_empty()
                && v.id.len() <= 63
                && v.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !id_ok || self.volumes[..i].iter().any(|o| o.id == v.id) {
                return Err(VmSpecError::Volume(format!(
                    "volume id {:?} must be unique, 1-63 letters, digits, '_', '.' or '-'",
                    v.id
                )));
            }
            v.source.validate(&v.id)?;
            if v.source.is_share() && v.mount_point.is_none() {
                return Err(VmSpecError::Volume(format!(
                    "volume {}: a shared directory needs the path to mount it at in the guest",
                    v.id
                )));
            }
            if let Some(m) = &v.mount_point {
                if !m.starts_with('/') || m == "/" || m.split('/').any(|c| c == "..") {
                    return Err(VmSpecError::Volume(format!(
                        "volume {}: mount point {m:?} must be an absolute path other than / without ..",
                        v.id
                    )));
                }
            }
        }
        if let Some(l) = &self.log {
            l.validate()?;
        }
        for (key, value) in &self.cloud_init {
            if !is_metadata_key(key) {
                return Err(VmSpecError::CloudInitKey(key.clone()));
            }
            if value.len() > MAX_CLOUD_INIT_BYTES {
                return Err(VmSpecError::CloudInitSize(key.clone()));
            }
        }
        let total: usize = self.cloud_init.values().map(crate::Blob::len).sum();
        if self.cloud_init.len() > MAX_METADATA_KEYS || total > MAX_METADATA_BYTES {
            return Err(VmSpecError::MetadataTotal);
        }
        Ok(())
    }

    /// The network card's MAC address.
    pub fn mac(&self) -> String {
        self.mac.clone().unwrap_or_else(|| crate::net::mac_for(&self.id))
    }
}

/// An extra disk: an image's filesystem (shared read-only, or a copy of the VM's own), a file
/// or block device of the host's, or a blank filesystem of the VM's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The volume's name (Flintlock's volume id); the disk's serial in the guest is derived.
    pub id: String,
    /// Where the disk comes from (an image's, in records made before there were others).
    #[serde(default, skip_serializing_if = "VolumeSource::is_image")]
    pub source: VolumeSource,
    /// For an image volume, the reference as given and the image id resolved at create time;
    /// empty for the others.
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub image_id: String,
    /// Where hearth-init mounts it in the guest; attached but not mounted when `None`.
    #[serde(default)]
    pub mount_point: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

/// A static IPv4 address on the host's LAN, for a macvtap card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanAddress {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Resolvers for the guest (IPv4 addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl LanAddress {
    /// `A.B.C.D/N`, with an optional gateway and resolvers; the gateway must be on the subnet.
    pub fn parse(cidr: &str, gateway: Option<&str>, dns: &[String]) -> Result<Self, String> {
        let (ip, prefix) = cidr.split_once('/').ok_or_else(|| {
            format!("address {cidr:?} needs its prefix on the LAN (like 192.168.1.50/24)")
        })?;
        let address: std::net::Ipv4Addr =
            ip.parse().map_err(|_| format!("address {cidr:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("address {cidr:?}: the prefix must be 1-32"))?;
        let gateway = match gateway.filter(|g| !g.is_empty()) {
            Some(g) => {
                let g = g.split('/').next().unwrap_or(g);
                let gw: std::net::Ipv4Addr =
                    g.parse().map_err(|_| format!("gateway {g:?} is not an IPv4 address"))?;
                let mask = u32::MAX << (32 - u32::from(prefix));
                if u32::from(gw) & mask != u32::from(address) & mask {
                    return Err(format!("gateway {gw} is not on {cidr}"));
                }
                Some(gw)
            }
            None => None,
        };
        let dns = dns
            .iter()
            .map(|d| d.parse().map_err(|_| format!("resolver {d:?} is not an IPv4 address")))
            .collect::<Result<_, _>>()?;
        Ok(Self { address, prefix, gateway, dns })
    }
}

/// A Linux interface name: 1-15 letters, digits, '_', '.' or '-'.
pub(crate) fn iface_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Where a volume's disk comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VolumeSource {
    /// An image's filesystem ([`VolumeSpec::image`]).
    #[default]
    Image,
    /// A regular file or block device on the host, attached as it is: the VM writes to it
    /// (unless read-only), and it stays when the VM is removed.
    Host { path: String },
    /// An empty ext4 filesystem of this size, made at create and removed with the VM.
    Blank { size_bytes: u64 },
    /// A directory of the host's, shared live with the guest through virtio-fs (a virtiofsd
    /// per share, confined to the directory): a bind mount, as `docker run -v DIR:PATH` is. The
    /// path is the directory's canonical one, resolved at create.
    Share { path: String },
}

impl VolumeSource {
    pub fn is_image(&self) -> bool {
        matches!(self, Self::Image)
    }

    /// A shared directory rather than a disk.
    pub fn is_share(&self) -> bool {
        matches!(self, Self::Share { .. })
    }

    /// A host path must be absolute, canonical-looking (no `..`, not `/`); a blank volume's
    /// size within bounds.
    fn validate(&self, id: &str) -> Result<(), VmSpecError> {
        match self {
            Self::Image => Ok(()),
            Self::Host { path } | Self::Share { path } => {
                let ok = path.starts_with('/')
                    && path != "/"
                    && path.len() <= 4096
                    && !path.split('/').any(|c| c == "..")
                    && !path.contains('\0');
                if ok {
                    Ok(())
                } else {
                    Err(VmSpecError::Volume(format!(
                        "volume {id}: host path {path:?} must be an absolute path other than / without .."
                    )))
                }
            }
            Self::Blank { size_bytes } => {
                if (MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(size_bytes) {
                    Ok(())
                } else {
                    Err(VmSpecError::Volume(format!(
                        "volume {id}: size {} is outside {} to {}",
                        crate::size::format_size(*size_bytes),
                        crate::size::format_size(MIN_VOLUME_BYTES),
                        crate::size::format_size(MAX_VOLUME_BYTES)
                    )))
                }
            }
        }
    }
}

/// The smallest and largest blank volume.
pub const MIN_VOLUME_BYTES: u64 = 1 << 20;
pub const MAX_VOLUME_BYTES: u64 = MAX_DISK_BYTES;

/// The most volumes a VM takes.
pub const MAX_VOLUMES: usize = 16;

/// The cloud-init NoCloud files a VM may carry.
pub const CLOUD_INIT_FILES: [&str; 4] = ["meta-data", "user-data", "vendor-data", "network-config"];
/// Bound on one cloud-init file (they travel in the guest config record).
pub const MAX_CLOUD_INIT_BYTES: usize = 96 << 10;
/// Metadata entries a VM may carry (cloud-init's files and others a metadata service serves).
pub const MAX_METADATA_KEYS: usize = 16;
/// Their bytes in all (they travel on the config disk).
pub const MAX_METADATA_BYTES: usize = 384 << 10;

/// A metadata entry's name: one of cloud-init's files, or another a metadata service serves
/// (Flintlock's clients send their own).
pub fn is_metadata_key(key: &str) -> bool {
    (1..=64).contains(&key.len())
        && !key.starts_with('.')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Splits `KEY=VALUE` labels given on the command line.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, VmSpecError> {
    items
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(VmSpecError::Label(l.clone())),
        })
        .collect()
}

/// What the VM should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
    Deleted,
}

/// What the VM is observed to be doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    #[default]
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    /// A VMM was started for it and has not been seen to exit: starting, running or stopping.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        })
    }
}

/// Observed state, and the resources hearth made for the VM (so a delete removes exactly them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: VmState,
    /// Why the VM is in this state, when it is not the obvious one.
    #[serde(default)]
    pub reason: String,
    /// The workload's exit code, once the guest reported it.
    pub exit_code: Option<i32>,
    /// VMM process id and its start time (clock ticks since boot), to recognise it after a restart.
    pub pid: Option<i32>,
    pub pid_start_time: Option<u64>,
    /// Unix milliseconds.
    pub started_at: Option<u64>,
    pub ready_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// How many times the VM has been started.
    #[serde(default)]
    pub boots: u32,
    /// The accelerator the VMM really used.
    #[serde(default)]
    pub accel: String,
    /// Resources made for this VM, recorded as soon as they exist.
    #[serde(default)]
    pub disk_path: Option<String>,
    /// Size of the console log when the current boot started, so `run` streams only this boot.
    #[serde(default)]
    pub console_offset: u64,
    /// Where the last boot spent its time.
    #[serde(default)]
    pub boot: Option<BootTimings>,
    /// The guest's IP address while it runs with a network.
    #[serde(default)]
    pub ip: Option<String>,
    /// Loopback port on the host forwarded to the guest's SSH port, for `hearth ssh`.
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Private key hearth generated for `hearth ssh`, when it generated one.
    #[serde(default)]
    pub ssh_key_path: Option<String>,
    /// The unprivileged uid (and gid) the running VMM dropped to, the VM's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_uid: Option<u32>,
    /// The running guest's CPUs are frozen (`hearth pause`) until `hearth unpause`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The VM ended on its own and its restart policy starts it again at `restart_at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restarting: bool,
    /// When the pending restart is due (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at: Option<u64>,
    /// Restarts in a row, each after a run shorter than [`crate::restart::STEADY_RUN`]; a
    /// longer run, a start or a stop by hand counts again from 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts_in_a_row: u32,
    /// Restarts by the policy since the VM was created (docker's `RestartCount`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_count: u32,
    /// The next launch restores the guest from the snapshot the VM was made from
    /// ([`VmSpec::snapshot`]) instead of booting it; cleared once it has.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_pending: bool,
    /// A guest restored from a snapshot is still to be told its own identity (once its agent
    /// answers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity_pending: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Boot timings of the last start, from the host's clock and the guest's uptime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimings {
    /// Host: VMM started to hearth-init's ready report (milliseconds).
    pub vmm_to_ready_ms: u64,
    /// Guest uptime when the kernel handed over to hearth-init (milliseconds since kernel start).
    pub kernel_to_init_ms: u64,
    /// hearth-init start to the workload running (milliseconds).
    pub init_to_ready_ms: u64,
}

/// The persisted unit: spec, desired state and observed status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: Desired,
    pub status: VmStatus,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            id: VmId::from_bytes([1; 8]),
            name: "t".into(),
            image: "x".into(),
            image_id: "y".into(),
            kernel: "k".into(),
            initrd: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disk_bytes: DEFAULT_DISK_BYTES,
            kernel_args: String::new(),
            entrypoint: None,
            command: vec![],
            env: vec!["A=1".into()],
            labels: BTreeMap::new(),
            accel: Accel::Auto,
            provider: Provider::Qemu,
            auto_remove: false,
            interactive: false,
            tty: false,
            network: NetworkMode::User,
            ports: vec![],
            ssh_public_key: None,
            mac: None,
            address: None,
            macvtap_parent: None,
            nics: vec![],
            lan: None,
            cloud_init_network: None,
            volumes: vec![],
            cloud_init: Default::default(),
            log: None,
            restart: Default::default(),
            crash_loop_limit: None,
            snapshot: None,
            created_at: 0,
        }
    }

    #[test]
    fn volumes_need_unique_ids_and_absolute_mount_points() {
        let vol = |id: &str, m: Option<&str>| VolumeSpec {
            id: id.into(),
            source: VolumeSource::Image,
            image: "i".into(),
            image_id: "x".into(),
            mount_point: m.map(Into::into),
            read_only: true,
        };
        let mut s = spec();
        s.volumes = vec![vol("modules", Some("/lib/modules")), vol("data", None)];
        assert!(s.validate().is_ok());
        for bad in [
            vec![vol("a", None), vol("a", None)],
            vec![vol("a b", None)],
            vec![vol("a", Some("relative"))],
            vec![vol("a", Some("/x/../etc"))],
            vec![vol("a", Some("/"))],
        ] {
            s.volumes = bad;
            assert!(matches!(s.validate(), Err(VmSpecError::Volume(_))), "{:?}", s.volumes);
        }
    }

    #[test]
    fn host_and_blank_volumes_are_checked_and_old_records_read_as_image_volumes() {
        let vol = |source| VolumeSpec {
            id: "data".into(),
            source,
            image: String::new(),
            image_id: String::new(),
            mount_point: Some("/data".into()),
            read_only: false,
        };
        let mut s = spec();
        for ok in [
            VolumeSource::Host { path: "/dev/vdb".into() },
            VolumeSource::Host { path: "/srv/data.img".into() },
            VolumeSource::Blank { size_bytes: 1 << 30 },
            VolumeSource::Share { path: "/srv/shared".into() },
        ] {
            s.volumes = vec![vol(ok)];
            assert!(s.validate().is_ok(), "{:?}", s.volumes);
        }
        for bad in [
            VolumeSource::Host { path: "relative.img".into() },
            VolumeSource::Host { path: "/".into() },
            VolumeSource::Host { path: "/srv/../etc/shadow".into() },
            VolumeSource::Blank { size_bytes: 4096 },
            VolumeSource::Blank { size_bytes: MAX_VOLUME_BYTES + 1 },
            VolumeSource::Share { path: "/".into() },
            VolumeSource::Share { path: "/srv/../etc".into() },
        ] {
            s.volumes = vec![vol(bad)];
            assert!(matches!(s.validate(), Err(VmSpecError::Volume(_))), "{:?}", s.volumes);
        }
        s.volumes = vec![VolumeSpec {
            mount_point: None,
            ..vol(VolumeSource::Share { path: "/srv/shared".into() })
        }];
        assert!(matches!(s.validate(), Err(VmSpecError::Volume(m)) if m.contains("mount")));
        let old: VolumeSpec = serde_json::from_str(
            r#"{"id":"m","image":"modules:1","image_id":"ab","mount_point":null,"read_only":true}"#,
        )
        .expect("an old record");
        assert_eq!(old.source, VolumeSource::Image);
        let host = vol(VolumeSource::Host { path: "/dev/vdb".into() });
        let back: VolumeSpec =
            serde_json::from_str(&serde_json::to_string(&host).expect("json")).expect("parse");
        assert_eq!(back, host);
    }

    #[test]
    fn a_macvtap_network_names_its_host_interface_and_only_it_does() {
        let mut s = spec();
        s.network = NetworkMode::Macvtap;
        s.macvtap_parent = Some("eth0".into());
        assert!(s.validate().is_ok());
        for (network, parent) in [
            (NetworkMode::Macvtap, None),
            (NetworkMode::Macvtap, Some("a/b")),
            (NetworkMode::Macvtap, Some("a-very-long-interface")),
            (NetworkMode::Bridge, Some("eth0")),
        ] {
            s.network = network;
            s.macvtap_parent = parent.map(Into::into);
            assert!(matches!(s.validate(), Err(VmSpecError::Macvtap(_))), "{network} {parent:?}");
        }
        assert_eq!("macvtap".parse::<NetworkMode>().expect("mode"), NetworkMode::Macvtap);
        // A static LAN address goes with a macvtap only.
        s.network = NetworkMode::Bridge;
        s.macvtap_parent = None;
        s.lan = Some(LanAddress::parse("192.168.1.50/24", None, &[]).expect("lan"));
        assert!(matches!(s.validate(), Err(VmSpecError::Macvtap(_))));
    }

    #[test]
    fn a_lan_address_is_a_cidr_with_its_gateway_on_the_subnet() {
        let dns = ["192.168.1.1".to_owned()];
        let l = LanAddress::parse("192.168.1.50/24", Some("192.168.1.1"), &dns).expect("ok");
        assert_eq!((l.address.to_string(), l.prefix), ("192.168.1.50".into(), 24));
        assert_eq!(l.gateway.map(|g| g.to_string()).as_deref(), Some("192.168.1.1"));
        assert_eq!(l.dns.len(), 1);
        // Flintlock sends the gateway as CIDR too.
        assert!(LanAddress::parse("10.0.0.5/8", Some("10.0.0.1/8"), &[]).is_ok());
        for (cidr, gw, why) in [
            ("192.168.1.50", None, "prefix"),
            ("192.168.1.50/33", None, "1-32"),
            ("host/24", None, "IPv4"),
            ("192.168.1.50/24", Some("192.168.2.1"), "not on"),
        ] {
            let e = LanAddress::parse(cidr, gw, &[]).expect_err(cidr);
            assert!(e.contains(why), "{cidr}: {e}");
        }
        assert!(LanAddress::parse("192.168.1.50/24", None, &["dns.example".into()]).is_err());
    }

    #[test]
    fn cloud_init_files_and_macs_are_checked() {
        let mut s = spec();
        s.cloud_init.insert("user-data".into(), "#cloud-config\n".into());
        s.mac = Some("02:00:00:00:00:09".into());
        assert!(s.validate().is_ok());
        assert_eq!(s.mac(), "02:00:00:00:00:09");
        s.cloud_init.insert("../etc/passwd".into(), "".into());
        assert_eq!(s.validate(), Err(VmSpecError::CloudInitKey("../etc/passwd".into())));
        s.cloud_init.remove("../etc/passwd");
        // Other metadata keys are taken (a metadata service serves them), within bounds.
        s.cloud_init.insert("capmvm-extra".into(), crate::Blob(vec![0x1f, 0x8b, 0]));
        assert!(s.validate().is_ok());
        for i in 0..MAX_METADATA_KEYS {
            s.cloud_init.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(s.validate(), Err(VmSpecError::MetadataTotal));
        s.cloud_init.retain(|k, _| !k.starts_with('k'));
        s.cloud_init.insert("meta-data".into(), "x".repeat(MAX_CLOUD_INIT_BYTES + 1).into());
        assert_eq!(s.validate(), Err(VmSpecError::CloudInitSize("meta-data".into())));
        s.cloud_init.clear();
        s.mac = Some("ff:ff:ff:ff:ff:ff".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn zero_resources_are_refused_with_the_flag_named() {
        let mut s = spec();
        s.cpus = 0;
        assert!(s.validate().expect_err("invalid").to_string().contains("--cpus"));
        let mut s = spec();
        s.memory_mib = 0;
        assert!(s.validate().expect_err("invalid").to_string().contains("--memory"));
        let mut s = spec();
        s.env = vec!["=x".into()];
        assert!(s.validate().is_err());
    }

    #[test]
    fn labels_parse() {
        let l = parse_labels(&["a=b".into(), "c=".into()]).expect("valid");
        assert_eq!(l.get("a").map(String::as_str), Some("b"));
        assert!(parse_labels(&["nokey".into()]).is_err());
    }
}
