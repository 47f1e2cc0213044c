//! `CreateVm`: resolve the image and kernel, validate, and persist the new VM's intent.

use std::sync::Arc;

use hearth_api::v1 as pb;
use hearth_types::{generate_name, NetworkMode, VmRecord, VmSpec};
use tonic::Status;

use crate::daemon::{internal, Daemon};
use crate::service::{created_now, new_id, new_record};

/// Serialises creations so two requests cannot take the same name.
static CREATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn create(d: &Arc<Daemon>, req: pb::CreateVmRequest) -> Result<VmRecord, Status> {
    if req.image.is_empty() {
        return Err(Status::invalid_argument("no image given: hearth run IMAGE [COMMAND...]"));
    }
    let reference = req.image.parse::<hearth_types::ImageRef>().map(|_| ());
    let image = match d.images.get(&req.image).map_err(internal)? {
        Some(i) => i,
        None => {
            // A malformed reference is reported as such; a well-formed one as not pulled.
            if let Err(e) = reference {
                return Err(Status::invalid_argument(e.to_string()));
            }
            return Err(Status::not_found(format!(
                "image {} is not in the store: pull it with `hearth image pull {}`",
                req.image, req.image
            )));
        }
    };
    let kernel = if req.kernel.is_empty() {
        d.kernels.default_name().map_err(internal)?.ok_or_else(|| {
            Status::failed_precondition(
                "no kernel is imported: import one with `hearth kernel import FILE --name NAME`",
            )
        })?
    } else {
        req.kernel.clone()
    };
    if d.kernels.get(&kernel).map_err(internal)?.is_none() {
        return Err(Status::not_found(format!(
            "kernel {kernel} does not exist: see `hearth kernel ls`, or import it"
        )));
    }
    let accel = req
        .accel
        .parse()
        .map_err(|e: hearth_types::VmSpecError| Status::invalid_argument(e.to_string()))?;
    let provider = match req.vmm.as_str() {
        "" => hearth_types::Provider::default(),
        v => v
            .parse()
            .map_err(|e: hearth_types::VmSpecError| Status::invalid_argument(e.to_string()))?,
    };
    let bad = |e: hearth_types::NetError| Status::invalid_argument(e.to_string());
    let network = req.network.parse().map_err(bad)?;
    let ports = req.ports.iter().map(|p| p.parse()).collect::<Result<Vec<_>, _>>().map_err(bad)?;
    let given_key = Some(req.ssh_public_key.trim().to_owned()).filter(|k| !k.is_empty());
    let labels = req.labels.into_iter().collect();
    let mut volumes = Vec::new();
    for v in &req.volumes {
        let img = d.images.get(&v.image).map_err(internal)?.ok_or_else(|| {
            Status::not_found(format!(
                "volume {}: image {} is not in the store: pull it with `hearth image pull {}`",
                v.id, v.image, v.image
            ))
        })?;
        volumes.push(hearth_types::VolumeSpec {
            id: v.id.clone(),
            image: v.image.clone(),
            image_id: img.id.hex().to_owned(),
            mount_point: Some(v.mount_point.clone()).filter(|m| !m.is_empty()),
            read_only: v.read_only,
        });
    }
    // The image's root filesystem is built (once per image) before anything is recorded, so a
    // --size it does not fit in, or a USER it lacks, is refused here and no VM is left behind.
    let (base_bytes, users) = {
        let (d2, img) = (d.clone(), image.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let users = d2.images.users(&img)?;
            Ok((std::fs::metadata(d2.images.rootfs_path(&img.id))?.len(), users))
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?
    };
    let requested_address = match req.address.as_str() {
        "" => None,
        a => Some(a.parse::<std::net::Ipv4Addr>().map_err(|_| {
            Status::invalid_argument(format!("address {a:?} is not an IPv4 address"))
        })?),
    };
    let _g = CREATE.lock().await;
    let name = if req.name.is_empty() {
        let ix = d.index();
        let mut n = generate_name(rand::random());
        while ix.by_name(&n).is_some() {
            n = generate_name(rand::random());
        }
        n
    } else {
        req.name.clone()
    };
    if let Some(other) = d.index().by_name(&name) {
        return Err(Status::already_exists(format!(
            "the name {name} is already used by VM {other}: remove it or choose another --name"
        )));
    }
    let mut spec = VmSpec {
        id: new_id(),
        name,
        image: image.names.first().cloned().unwrap_or_else(|| req.image.clone()),
        image_id: image.id.hex().to_owned(),
        kernel,
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        disk_bytes: req.disk_bytes,
        kernel_args: req.kernel_args,
        entrypoint: req.has_entrypoint.then_some(req.entrypoint),
        command: req.command,
        env: req.env,
        labels,
        accel,
        provider,
        auto_remove: req.auto_remove,
        interactive: req.interactive,
        tty: req.tty,
        network,
        ports,
        // A placeholder for the key generated below, so validation sees that SSH is wanted.
        ssh_public_key: given_key
            .clone()
            .or_else(|| req.ssh.then(|| "ssh-ed25519 AAAA".to_owned())),
        mac: Some(req.mac).filter(|m| !m.is_empty()),
        address: None,
        cloud_init_network: Some(req.cloud_init_network).filter(|d| !d.is_empty()),
        volumes,
        cloud_init: req.cloud_init.into_iter().collect(),
        log: hearth_types::LogOptions::parse(&req.log_opts)
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
        created_at: created_now(),
    };
    // Bridge addresses come from the records themselves, under the create lock: nothing to leak.
    let reserved: Vec<_> =
        d.reserved_addresses.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
    let used: Vec<_> = d.index().addresses().chain(reserved).collect();
    spec.address = match (spec.network, requested_address) {
        (hearth_types::NetworkMode::Bridge, Some(a)) => {
            hearth_types::net::check_bridge_address(a)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if let Some(other) = d.index().address_holder(a) {
                return Err(Status::already_exists(format!(
                    "address {a} is taken by VM {other}; choose another or leave it empty"
                )));
            }
            Some(a)
        }
        (hearth_types::NetworkMode::Bridge, None) => Some(
            hearth_types::net::allocate_bridge_address(&used)
                .map_err(|e| Status::resource_exhausted(e.to_string()))?,
        ),
        (_, Some(a)) => {
            return Err(Status::invalid_argument(format!("address {a} needs --network bridge")))
        }
        (_, None) => None,
    };
    spec.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    check_fits(d, &spec, base_bytes)?;
    let cfg = guest_config_for(&spec, &image.config)?;
    crate::adapters::check_config_fits(&cfg).map_err(|e| Status::invalid_argument(e.message))?;
    if let (false, Some(users)) = (cfg.init_system || cfg.process.user.is_empty(), &users) {
        let (passwd, group) =
            (users.passwd.as_deref().unwrap_or(""), users.group.as_deref().unwrap_or(""));
        hearth_types::user::resolve(&cfg.process.user, passwd, group).map_err(|why| {
            Status::invalid_argument(format!(
                "image {} runs as USER {:?}, but {why}: fix the image's USER",
                spec.image, cfg.process.user
            ))
        })?;
    }
    crate::net::check_ports_free(&spec)?;
    crate::net::check_unclaimed(d, &spec)?;
    let mut rec = new_record(spec);
    if req.ssh && given_key.is_none() {
        let dir = d.vm_dir(&rec.spec.id);
        let comment = format!("hearth@{}", rec.spec.name);
        match crate::adapters::off_runtime(|| crate::ssh::generate(&dir, &comment)) {
            Ok(public) => rec.spec.ssh_public_key = Some(public),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(internal(e.context("generating the VM's SSH key pair")));
            }
        }
        rec.status.ssh_key_path = Some(crate::ssh::key_path(&dir).display().to_string());
    }
    if let Err(e) = d.save(&rec) {
        let _ = std::fs::remove_dir_all(d.vm_dir(&rec.spec.id));
        return Err(e);
    }
    Ok(rec)
}

/// The root disk holds the image's filesystem and fits the filesystem it lives on.
fn check_fits(d: &Daemon, spec: &VmSpec, base_bytes: u64) -> Result<(), Status> {
    use hearth_types::{format_size, size_flag};
    if spec.disk_bytes < base_bytes {
        return Err(Status::invalid_argument(format!(
            "--size {} is smaller than the root filesystem of {} ({}): use --size {} or more",
            format_size(spec.disk_bytes),
            spec.image,
            format_size(base_bytes),
            size_flag(base_bytes)
        )));
    }
    let vms = d.root.join("vms");
    if let Ok(fs) = nix::sys::statvfs::statvfs(&vms) {
        let total = fs.blocks().saturating_mul(fs.fragment_size());
        if spec.disk_bytes > total {
            return Err(Status::invalid_argument(format!(
                "--size {} is larger than the whole filesystem holding {} ({}): choose a smaller --size",
                format_size(spec.disk_bytes),
                vms.display(),
                format_size(total)
            )));
        }
    }
    Ok(())
}

/// The guest config a VM's config disk holds: the image's process with the VM's overrides, the
/// host's resolvers on the bridge, cloud-init's network-config when asked for. Create checks it
/// (size, USER) with the same function that writes it.
pub fn guest_config_for(
    spec: &VmSpec,
    image: &hearth_types::ImageConfig,
) -> Result<hearth_types::GuestConfig, Status> {
    let mut cfg = hearth_core::guest_config(spec, image)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let (Some(net), NetworkMode::Bridge) = (cfg.network.as_mut(), spec.network) {
        net.dns = crate::net::host_resolvers();
    }
    if let (Some(device), Some(net)) = (&spec.cloud_init_network, &cfg.network) {
        cfg.cloud_init
            .entry("network-config".into())
            .or_insert_with(|| hearth_core::cloud_init_network_config(device, net));
    }
    Ok(cfg)
}
