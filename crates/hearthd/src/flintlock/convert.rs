//! Flintlock's spec checked, defaulted and turned into hearth's create request.

use super::*;

/// Checks a spec and fills Flintlock's defaults; returns it ready to store.
pub(super) fn validate(
    mut spec: fl::MicroVmSpec,
    nets: impl Into<Nets>,
) -> Result<fl::MicroVmSpec, Status> {
    if spec.id.is_empty() {
        return bad("microvm id (its name) is required".into());
    }
    if spec.namespace.is_empty() {
        spec.namespace = DEFAULT_NAMESPACE.into();
    }
    for (what, v) in [("id", &spec.id), ("namespace", &spec.namespace)] {
        if v.len() > MAX_NAME || v.chars().any(|c| c.is_control() || c == '/') {
            return bad(format!(
                "microvm {what} {v:?}: at most {MAX_NAME} bytes, without '/' or control characters"
            ));
        }
    }
    size(&mut spec)?;
    boot_and_root(&spec)?;
    volumes(&spec.additional_volumes)?;
    interfaces(&spec.interfaces, nets.into())?;
    match provider(&spec) {
        Err(e) => return bad(format!("provider: {e}, or leave it empty")),
        Ok(Some(hearth_types::Provider::Firecracker))
            if spec.additional_volumes.iter().any(|v| !volume_share(v).is_empty()) =>
        {
            return bad("virtiofs_source volumes need provider cloudhypervisor or qemu: Firecracker has no virtio-fs".into());
        }
        Ok(_) => {}
    }
    metadata(&spec.metadata)?;
    Ok(spec)
}

fn bad<T>(m: String) -> Result<T, Status> {
    Err(Status::invalid_argument(m))
}

/// vCPUs and memory, Flintlock's defaults where not given.
fn size(spec: &mut fl::MicroVmSpec) -> Result<(), Status> {
    if spec.vcpu == 0 {
        spec.vcpu = DEFAULT_VCPU;
    }
    if spec.memory_in_mb == 0 {
        spec.memory_in_mb = DEFAULT_MEMORY_MB;
    }
    if !(1..=hearth_types::vm::MAX_CPUS as i32).contains(&spec.vcpu) {
        return bad(format!(
            "vcpu must be between 1 and {}, got {}",
            hearth_types::vm::MAX_CPUS,
            spec.vcpu
        ));
    }
    if i64::from(spec.memory_in_mb) < hearth_types::vm::MIN_MEMORY_MIB as i64 {
        return bad(format!(
            "memory_in_mb must be at least {}, got {}",
            hearth_types::vm::MIN_MEMORY_MIB,
            spec.memory_in_mb
        ));
    }
    Ok(())
}

/// The kernel image and the root filesystem's image.
fn boot_and_root(spec: &fl::MicroVmSpec) -> Result<(), Status> {
    match &spec.kernel {
        Some(k) if !k.image.is_empty() => {}
        _ => {
            return bad(
                "kernel.image is required: an OCI image holding the kernel (e.g. boot/vmlinux)"
                    .into(),
            )
        }
    }
    if spec.initrd.as_ref().is_some_and(|i| i.image.is_empty()) {
        return bad("initrd.image is required with an initrd: the OCI image holding it".into());
    }
    let root = spec
        .root_volume
        .as_ref()
        .and_then(|v| v.source.as_ref())
        .and_then(|s| s.container_source.as_deref())
        .unwrap_or("");
    if root.is_empty() {
        return bad(
            "root_volume.source.container_source is required: the OCI image of the root filesystem"
                .into(),
        );
    }
    if spec.root_volume.as_ref().is_some_and(|v| v.is_read_only) {
        return bad("a read-only root volume is not supported; set is_read_only false".into());
    }
    Ok(())
}

fn volumes(volumes: &[fl::Volume]) -> Result<(), Status> {
    for (i, v) in volumes.iter().enumerate() {
        let source = v.source.clone().unwrap_or_default();
        if let Some(dir) = source.virtiofs_source.as_deref().filter(|s| !s.is_empty()) {
            if source.container_source.as_deref().is_some_and(|c| !c.is_empty()) {
                return bad(format!(
                    "volume {}: give one of container_source and virtiofs_source",
                    v.id
                ));
            }
            if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
                return bad(format!(
                    "volume {}: virtiofs_source {dir:?} must be an absolute host directory without ..",
                    v.id
                ));
            }
            if v.mount_point.as_deref().unwrap_or("").is_empty() {
                return bad(format!(
                    "volume {}: a virtiofs_source needs the mount_point to mount it at",
                    v.id
                ));
            }
        } else if source.container_source.as_deref().unwrap_or("").is_empty() {
            return bad(format!(
                "volume {}: source.container_source (an OCI image, or a host device's absolute path) is required",
                v.id
            ));
        }
        // A network client names host block devices only, never a host file it could then
        // read through its VM (/etc/shadow); and no path that climbs out of /dev.
        let host = volume_disk_path(v);
        if !host.is_empty() && (!host.starts_with("/dev/") || host.split('/').any(|c| c == "..")) {
            return bad(format!(
                "volume {}: a host volume over the Flintlock API is a block device under /dev, not {host:?}",
                v.id
            ));
        }
        if v.id.is_empty() || volumes[..i].iter().any(|o| o.id == v.id) {
            return bad(format!("volume id {:?} must be given and unique", v.id));
        }
        if let Some(m) = v.mount_point.as_deref().filter(|m| !m.is_empty()) {
            if !m.starts_with('/') || m == "/" {
                return bad(format!(
                    "volume {}: mount_point {m:?} must be an absolute path other than /",
                    v.id
                ));
            }
        }
    }
    Ok(())
}

/// Up to hearth's cards, each with a device id of its own and a valid MAC; a static address
/// lies on the bridge, or on the LAN of a macvtap.
fn interfaces(interfaces: &[fl::NetworkInterface], nets: Nets) -> Result<(), Status> {
    use hearth_types::card::MAX_CARDS;
    if interfaces.len() > MAX_CARDS {
        return bad(format!(
            "{} network interfaces given: a microvm has at most {MAX_CARDS}",
            interfaces.len()
        ));
    }
    for (n, i) in interfaces.iter().enumerate() {
        if i.device_id.is_empty() {
            return bad("network interface device_id is required (e.g. eth1)".into());
        }
        if interfaces[..n].iter().any(|o| o.device_id == i.device_id) {
            return bad(format!("network interface device_id {:?} is given twice", i.device_id));
        }
        let network = nets.of(i);
        if n > 0 && !matches!(network, NetworkMode::Bridge | NetworkMode::Macvtap) {
            return bad(format!(
                "interface {}: a second interface needs the bridge network (hearthd --flintlock-network bridge), or type MACVTAP with hearthd --parent-iface",
                i.device_id
            ));
        }
        if let Some(mac) = i.guest_mac.as_deref().filter(|m| !m.is_empty()) {
            hearth_types::net::validate_mac(mac)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        if let Some(a) = &i.address {
            let checked = match network {
                NetworkMode::Bridge => static_address(a).map(drop),
                // On the LAN through a macvtap: any subnet, the guest configures it.
                NetworkMode::Macvtap => {
                    hearth_types::LanAddress::parse(&a.address, a.gateway.as_deref(), &a.nameservers)
                        .map(drop)
                }
                _ => return bad(format!(
                    "interface {}: static addresses need the bridge network (hearthd --flintlock-network bridge) or a macvtap (hearthd --parent-iface); leave address empty",
                    i.device_id
                )),
            };
            checked
                .map_err(|m| Status::invalid_argument(format!("interface {}: {m}", i.device_id)))?;
        }
    }
    Ok(())
}

/// The four cloud-init files, base64-encoded.
fn metadata(metadata: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    let mut total = 0;
    for (key, value) in metadata {
        if !hearth_types::vm::is_metadata_key(key) {
            return bad(format!("metadata key {key:?}: use 1-64 letters, digits, '.', '_' or '-'"));
        }
        let len = metadata_value(value).len();
        if len > hearth_types::vm::MAX_CLOUD_INIT_BYTES {
            return bad(format!(
                "metadata {key:?} is larger than {} KiB",
                hearth_types::vm::MAX_CLOUD_INIT_BYTES >> 10
            ));
        }
        total += len;
    }
    if metadata.len() > hearth_types::vm::MAX_METADATA_KEYS
        || total > hearth_types::vm::MAX_METADATA_BYTES
    {
        return bad(format!(
            "metadata: at most {} entries of {} KiB in all",
            hearth_types::vm::MAX_METADATA_KEYS,
            hearth_types::vm::MAX_METADATA_BYTES >> 10
        ));
    }
    Ok(())
}

/// A metadata value's bytes: base64 as Flintlock's clients mostly send it, else the value as it
/// is (the fl CLI sends files raw).
pub(super) fn metadata_value(value: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value)
        .unwrap_or_else(|_| value.as_bytes().to_vec())
}

/// The networks a microVM's interfaces are put on: a macvtap on the daemon's `--parent-iface`
/// for an interface of type MACVTAP (the enum's zero, Flintlock's default) when the daemon has
/// one, as Flintlock does; else (TAP, or no parent) the daemon's `--flintlock-network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Nets {
    pub default: NetworkMode,
    /// The daemon has a `--parent-iface`.
    pub macvtap: bool,
}

impl Nets {
    pub fn new(default: NetworkMode, parent: Option<&str>) -> Self {
        Self { default, macvtap: parent.is_some() }
    }

    /// The network of `iface`.
    pub fn of(&self, iface: &fl::NetworkInterface) -> NetworkMode {
        let macvtap = iface.r#type == fl::network_interface::IfaceType::Macvtap as i32;
        if macvtap && self.macvtap {
            NetworkMode::Macvtap
        } else {
            self.default
        }
    }
}

/// Every interface on `default`.
impl From<NetworkMode> for Nets {
    fn from(default: NetworkMode) -> Self {
        Self { default, macvtap: false }
    }
}

/// The hearth provider a microVM asks for by Flintlock's name (`firecracker`,
/// `cloudhypervisor`); `None` for the daemon's default.
pub(super) fn provider(
    spec: &fl::MicroVmSpec,
) -> Result<Option<hearth_types::Provider>, hearth_types::VmSpecError> {
    match spec.provider.as_deref().unwrap_or_default() {
        "" => Ok(None),
        "cloudhypervisor" => "cloud-hypervisor".parse().map(Some),
        p => p.parse().map(Some),
    }
}

/// A volume's `container_source`: an OCI image, or (hearth's extension: no OCI reference
/// starts with '/') a block device or file on the host, by absolute path.
fn volume_source(v: &fl::Volume) -> String {
    v.source.as_ref().and_then(|s| s.container_source.clone()).unwrap_or_default()
}

/// The image of a container-sourced volume; empty for a host device.
pub(super) fn volume_image(v: &fl::Volume) -> String {
    Some(volume_source(v)).filter(|s| !s.starts_with('/')).unwrap_or_default()
}

/// The host path of a volume whose `container_source` is one (a block device).
fn volume_disk_path(v: &fl::Volume) -> String {
    Some(volume_source(v)).filter(|s| s.starts_with('/')).unwrap_or_default()
}

/// The host path of a volume: its block device's, or its `virtiofs_source`.
fn volume_host_path(v: &fl::Volume) -> String {
    Some(volume_disk_path(v)).filter(|p| !p.is_empty()).unwrap_or_else(|| volume_share(v).into())
}

/// A volume's `virtiofs_source`: a host directory shared live; empty for the others.
pub(super) fn volume_share(v: &fl::Volume) -> &str {
    v.source.as_ref().and_then(|s| s.virtiofs_source.as_deref()).unwrap_or_default()
}

/// A shared directory a Flintlock client asks for, checked against hearthd's `--virtiofs-root`
/// directories: its real path (symlinks resolved), which must be one of them or under one.
pub(super) fn share_path(dir: &str, roots: &[std::path::PathBuf]) -> Result<String, String> {
    if roots.is_empty() {
        return Err(format!(
            "virtiofs_source {dir:?}: this host shares no directories with Flintlock clients; start hearthd with --virtiofs-root DIR to allow those under DIR"
        ));
    }
    let real = std::fs::canonicalize(dir)
        .map_err(|e| format!("virtiofs_source {dir:?}: {e} (it must be an existing directory)"))?;
    let allowed =
        roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|r| real.starts_with(r));
    if !allowed {
        let roots: Vec<_> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(format!(
            "virtiofs_source {dir:?} is not under a directory hearthd shares (--virtiofs-root {})",
            roots.join(", ")
        ));
    }
    real.to_str().map(str::to_owned).ok_or_else(|| format!("virtiofs_source {dir:?}: not UTF-8"))
}

/// Each shared directory of `req` replaced by its real path, once checked by [`share_path`].
pub(super) fn confine_shares(
    req: &mut pb::CreateVmRequest,
    roots: &[std::path::PathBuf],
) -> Result<(), String> {
    for v in req.volumes.iter_mut().filter(|v| v.share) {
        v.host_path = share_path(&v.host_path, roots)?;
    }
    Ok(())
}

/// The initrd's file in its image when `initrd.filename` is not given.
pub(super) const DEFAULT_INITRD_FILE: &str = "boot/initrd";

/// A microVM's root disk when its spec gives no size (CAPMVM never does): Flintlock's
/// `base_image_size`, 10 GiB. Sparse, or a thin snapshot: it takes what the guest writes.
pub(super) const ROOT_DISK_BYTES: u64 = 10 << 30;

/// The longest microVM id or namespace taken (Kubernetes' longest names).
const MAX_NAME: usize = 253;

/// The hearth VM's name for a microVM: `ID.NAMESPACE` when that is a hearth name; else (too
/// long, or with characters hearth's names do not take) its first characters made one, ended
/// by the end of its uid, so two microVMs never map to one name.
pub(super) fn vm_name(spec: &fl::MicroVmSpec) -> String {
    let full = format!("{}.{}", spec.id, spec.namespace);
    if hearth_types::validate_name(&full).is_ok() {
        return full;
    }
    let uid = spec.uid.as_deref().unwrap_or_default().to_ascii_lowercase();
    let tag = &uid[uid.len().saturating_sub(UID_TAG)..];
    let clean: String = full
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .collect();
    let head = clean.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let head = &head[..head.len().min(hearth_types::id::MAX_NAME - 1 - tag.len())];
    if head.is_empty() {
        format!("mvm-{tag}")
    } else {
        format!("{head}-{tag}")
    }
}

/// The characters of a microVM's uid that end a derived VM name (a ULID's last 10: 50 random
/// bits).
const UID_TAG: usize = 10;

/// Sets `instance_id` (and cloud-init's own `instance-id`) in the meta-data to the uid, as
/// Flintlock does, unless the client gave its own.
pub(super) fn inject_instance_id(spec: &mut fl::MicroVmSpec, uid: &str) -> Result<(), Status> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let current = spec.metadata.get("meta-data").map(|v| metadata_value(v)).unwrap_or_default();
    let mut doc: serde_yaml::Mapping = if current.iter().all(u8::is_ascii_whitespace) {
        serde_yaml::Mapping::new()
    } else {
        serde_yaml::from_slice(&current).map_err(|e| {
            Status::invalid_argument(format!("metadata meta-data is not a YAML mapping: {e}"))
        })?
    };
    let id = doc.get("instance_id").cloned().unwrap_or_else(|| uid.into());
    doc.insert("instance_id".into(), id.clone());
    if !doc.contains_key("instance-id") {
        doc.insert("instance-id".into(), id);
    }
    let text = serde_yaml::to_string(&doc).map_err(internal)?;
    spec.metadata.insert("meta-data".into(), b64.encode(text));
    Ok(())
}

/// The guest address of a static interface address, which must lie on hearth's bridge.
pub(super) fn static_address(a: &fl::StaticAddress) -> Result<std::net::Ipv4Addr, String> {
    let (ip, prefix) = a
        .address
        .split_once('/')
        .ok_or_else(|| format!("address {:?} is not CIDR (like 10.61.0.50/16)", a.address))?;
    let ip: std::net::Ipv4Addr =
        ip.parse().map_err(|_| format!("address {:?} is not an IPv4 CIDR", a.address))?;
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

/// hearth's card for an interface on `network`; named in cloud-init's network-config when
/// `named` (`add_network_config`).
fn card(
    i: &fl::NetworkInterface,
    network: NetworkMode,
    named: bool,
) -> Result<pb::NetworkCard, Status> {
    let (address, gateway, dns) = match &i.address {
        Some(a) if network == NetworkMode::Macvtap => {
            (a.address.clone(), a.gateway.clone().unwrap_or_default(), a.nameservers.clone())
        }
        Some(a) => {
            let ip = static_address(a).map_err(Status::invalid_argument)?;
            (ip.to_string(), String::new(), vec![])
        }
        None => Default::default(),
    };
    Ok(pb::NetworkCard {
        network: network.to_string(),
        mac: i.guest_mac.clone().unwrap_or_default(),
        address,
        gateway,
        dns,
        guest_name: if named { i.device_id.clone() } else { String::new() },
    })
}

/// The hearth VM for a microVM: its image's own init as PID 1, cloud-init seeded.
pub(super) fn create_request(
    spec: &fl::MicroVmSpec,
    uid: &str,
    kernel: &str,
    nets: impl Into<Nets>,
) -> Result<pb::CreateVmRequest, Status> {
    let nets = nets.into();
    let cloud_init: HashMap<String, Vec<u8>> =
        spec.metadata.iter().map(|(k, v)| (k.clone(), metadata_value(v))).collect();
    let kernel_spec = spec.kernel.clone().unwrap_or_default();
    // The network-config is written when the VM starts, from the addresses the cards got.
    let mut cards = (spec.interfaces.iter())
        .map(|i| card(i, nets.of(i), kernel_spec.add_network_config))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    // No interface: no network at all.
    let first = cards.next().unwrap_or(pb::NetworkCard {
        network: NetworkMode::None.to_string(),
        ..Default::default()
    });
    let cmdline: BTreeMap<_, _> = kernel_spec.cmdline.iter().collect();
    let kernel_args = cmdline
        .iter()
        .map(|(k, v)| if v.is_empty() { (*k).clone() } else { format!("{k}={v}") })
        .collect::<Vec<_>>()
        .join(" ");
    let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
    labels.insert(UID_LABEL.into(), uid.into());
    let root = spec.root_volume.clone().unwrap_or_default();
    let size =
        root.size_in_mb.filter(|&s| s > 0).map(|s| s as u64 * (1 << 20)).unwrap_or(ROOT_DISK_BYTES);
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
        network: first.network,
        mac: first.mac,
        cloud_init,
        address: first.address,
        gateway: first.gateway,
        dns: first.dns,
        cloud_init_network: first.guest_name,
        cards: cards.collect(),
        vmm: provider(spec).ok().flatten().map(|p| p.to_string()).unwrap_or_default(),
        volumes: spec
            .additional_volumes
            .iter()
            .map(|v| pb::VolumeRequest {
                id: v.id.clone(),
                image: volume_image(v),
                host_path: volume_host_path(v),
                mount_point: v.mount_point.clone().unwrap_or_default(),
                read_only: v.is_read_only,
                size_bytes: 0,
                share: !volume_share(v).is_empty(),
            })
            .collect(),
        // As Flintlock relaunches a VMM that ended, until it crash-loops.
        restart: hearth_types::RestartPolicy::Always.to_string(),
        crash_loop_limit: CRASH_LOOP_LIMIT,
        ..Default::default()
    })
}

/// A microVM is FAILED after this many restarts in a row of runs shorter than
/// [`hearth_types::restart::STEADY_RUN`].
pub(super) const CRASH_LOOP_LIMIT: u32 = 5;

pub(super) fn not_found(uid: &str) -> Status {
    // CAPMVM matches "not found" in the text; the code is a real NOT_FOUND.
    Status::not_found(format!("microvm spec {uid} not found"))
}
