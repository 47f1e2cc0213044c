//! `hearth run` and `hearth create`.

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::Args;
use hearth_api::v1 as pb;
use hearth_types::VmRecord;
use tonic::Code;

use crate::client::{self, Client};
use crate::output::parse_json;

/// Options shared by `create` and `run`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the VM (a random one when not given).
    #[arg(long)]
    name: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory, e.g. 512M or 1G (a plain number is MiB).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Root disk size, e.g. 4G.
    #[arg(long, default_value = "4G")]
    size: String,
    /// Kernel to boot: a kernel's name, or an Ignite-style kernel image's reference (pulled as
    /// --pull says, like the image). Default: the default kernel.
    #[arg(long, visible_alias = "kernel-image", value_name = "NAME|REF")]
    kernel: Option<String>,
    /// Kernel command-line arguments, merged over hearth's by key (`loglevel=7` replaces
    /// hearth's `loglevel=0`; the rest follow).
    #[arg(long, default_value = "")]
    kernel_args: String,
    /// Set environment variables (KEY=VALUE, or KEY to copy it from here).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Set labels (KEY=VALUE).
    #[arg(short = 'l', long = "label")]
    label: Vec<String>,
    /// Override the image's ENTRYPOINT (drops its CMD too, as docker does).
    #[arg(long)]
    entrypoint: Option<String>,
    /// How QEMU runs the guest: auto, kvm or tcg.
    #[arg(long, default_value = "auto", env = "HEARTH_ACCEL")]
    accel: String,
    /// The VMM that runs the VM: qemu, firecracker or cloud-hypervisor (the last two need KVM
    /// and --network bridge or none).
    /// The daemon's `--default-vmm` (QEMU unless set) when not given.
    #[arg(long, env = "HEARTH_VMM")]
    vmm: Option<String>,
    /// Remove the VM when it stops.
    #[arg(long)]
    rm: bool,
    /// Start the VM again when it ends on its own: no, on-failure[:N] (an exit code other than
    /// 0, or a VMM that died; at most N times in a row), always (also when hearthd starts, even
    /// after a stop by hand), unless-stopped (but not after a stop by hand). Back-off: 100 ms
    /// doubling up to a minute, from the start again after 10 s of running.
    #[arg(long, value_name = "POLICY", default_value = "no")]
    restart: String,
    /// Keep the console's stdin open.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the workload a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Network: user (NAT through the VMM, the default), bridge (the hearth0 bridge, an address
    /// of its own; needs root), macvtap[:IFACE] (on the host's LAN, its own MAC) or none. Given
    /// again, another network card: bridge (its own address) or macvtap[:IFACE] (DHCP); --ip,
    /// --gateway and --dns are the first card's.
    #[arg(long, default_value = "user")]
    network: Vec<String>,
    /// The VM's address: on the bridge network, one of its subnet (allocated when not given);
    /// on a macvtap network, a static LAN address with its prefix, A.B.C.D/N (DHCP when not
    /// given).
    #[arg(long, value_name = "ADDR")]
    ip: Option<String>,
    /// With --network macvtap and --ip: the LAN's gateway.
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// With --network macvtap and --ip: a resolver for the guest (repeatable).
    #[arg(long, value_name = "ADDR")]
    dns: Vec<String>,
    /// Attach an image's filesystem as a disk mounted at PATH, shared read-only with `:ro`, else
    /// a copy of the VM's own: IMAGE:PATH[:ro]. The image must be in the store (`image pull`).
    #[arg(long = "image-volume", value_name = "IMAGE:PATH[:ro]")]
    image_volume: Vec<String>,
    /// A disk: `/HOST/FILE-OR-DEVICE[:/PATH][:ro]` attaches the host's file or block device as
    /// it is (mounted at PATH when given); `NAME:/PATH` a blank ext4 volume of the VM's own
    /// (1G, or its --volume-size), removed with it.
    #[arg(short = 'v', long = "volume", value_name = "SRC[:/PATH][:ro]")]
    volume: Vec<String>,
    /// The size of a blank volume named with -v NAME:/PATH.
    #[arg(long = "volume-size", value_name = "NAME=SIZE")]
    volume_size: Vec<String>,
    /// Publish a guest port on the host: [IP:]HOST_PORT:GUEST_PORT[/tcp|/udp].
    #[arg(short = 'p', long = "publish", value_name = "PORT")]
    publish: Vec<String>,
    /// Allow `hearth ssh`: generate a key pair for this VM, or install the public key at PATH.
    #[arg(long, value_name = "PATH", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    ssh: Option<String>,
    /// Console log options, as docker's: max-size=SIZE (the log's files are rotated at this
    /// size), max-file=N (files kept, the current one included).
    #[arg(long = "log-opt", value_name = "KEY=VALUE")]
    log_opt: Vec<String>,
    /// Pull from a registry over plain http / without TLS verification.
    #[arg(long)]
    insecure: bool,
    /// When to pull the image: missing, always or never.
    #[arg(long, default_value = "missing")]
    pull: String,
    /// Make the VM from this snapshot (`hearth snapshot create`) instead of an image: its
    /// guest goes on where the snapshot's was, as a VM of its own (name, MAC, address, fresh
    /// randomness).
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// The image to boot.
    #[arg(required_unless_present = "snapshot")]
    image: Option<String>,
    /// Command and arguments, replacing the image's CMD.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `hearth run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run in the background and print the VM id.
    #[arg(short = 'd', long)]
    detach: bool,
    /// With -d, return as soon as the VMM runs instead of waiting for the guest to be ready.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    create: CreateArgs,
}

/// Sizes as users type them: `512M`, `1G`, `4096` (MiB when no unit).
fn mib(s: &str, flag: &str) -> anyhow::Result<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().with_context(|| format!("{flag} {s:?} is too large"));
    }
    let bytes = hearth_types::parse_size(s).with_context(|| format!("{flag} {s:?}"))?;
    Ok(bytes >> 20)
}

fn request(a: &CreateArgs) -> anyhow::Result<pb::CreateVmRequest> {
    let env = a
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some(_) => e.clone(),
            None => format!("{e}={}", std::env::var(e).unwrap_or_default()),
        })
        .collect();
    let labels: HashMap<String, String> =
        hearth_types::parse_labels(&a.label)?.into_iter().collect();
    let size = hearth_types::parse_size(&a.size).with_context(|| format!("--size {:?}", a.size))?;
    Ok(pb::CreateVmRequest {
        name: a.name.clone().unwrap_or_default(),
        image: a.image.clone().unwrap_or_default(),
        snapshot: a.snapshot.clone().unwrap_or_default(),
        kernel: a.kernel.clone().unwrap_or_default(),
        cpus: a.cpus,
        memory_mib: mib(&a.memory, "--memory")?,
        disk_bytes: size,
        kernel_args: a.kernel_args.clone(),
        has_entrypoint: a.entrypoint.is_some(),
        entrypoint: a.entrypoint.iter().filter(|e| !e.is_empty()).cloned().collect(),
        command: a.command.clone(),
        env,
        labels,
        accel: a.accel.clone(),
        vmm: a.vmm.clone().unwrap_or_default(),
        auto_remove: a.rm,
        interactive: a.interactive,
        tty: a.tty,
        pull: false,
        insecure: a.insecure,
        network: a.network.first().cloned().unwrap_or_default(),
        cards: (a.network.iter().skip(1))
            .map(|n| pb::NetworkCard { network: n.clone(), ..Default::default() })
            .collect(),
        ports: a.publish.clone(),
        ssh: a.ssh.is_some(),
        ssh_public_key: match a.ssh.as_deref() {
            None | Some("") => String::new(),
            Some(path) => read_public_key(path)?,
        },
        mac: String::new(),
        cloud_init: Default::default(),
        address: a.ip.clone().unwrap_or_default(),
        gateway: a.gateway.clone().unwrap_or_default(),
        dns: a.dns.clone(),
        cloud_init_network: String::new(),
        volumes: volumes(a)?,
        log_opts: a.log_opt.clone(),
        restart: a.restart.clone(),
        crash_loop_limit: 0,
    })
}

/// The volumes of --image-volume, then of -v, with the sizes of --volume-size.
fn volumes(a: &CreateArgs) -> anyhow::Result<Vec<pb::VolumeRequest>> {
    let mut sizes = HashMap::new();
    for arg in &a.volume_size {
        let Some((name, size)) = arg.split_once('=') else {
            anyhow::bail!("--volume-size {arg:?}: expected NAME=SIZE, e.g. data=10G");
        };
        let bytes =
            hearth_types::parse_size(size).with_context(|| format!("--volume-size {arg:?}"))?;
        sizes.insert(name.to_owned(), bytes);
    }
    let mut out: Vec<pb::VolumeRequest> = (a.image_volume.iter().enumerate())
        .map(|(i, v)| image_volume(i, v))
        .collect::<anyhow::Result<_>>()?;
    for v in &a.volume {
        let index = out.len();
        out.push(volume(index, v, &sizes)?);
    }
    if let Some(name) = sizes.keys().find(|n| !out.iter().any(|v| &v.id == *n && v.size_bytes > 0))
    {
        anyhow::bail!("--volume-size {name}=...: no -v {name}:/PATH names that volume");
    }
    Ok(out)
}

/// The default size of a blank volume.
const BLANK_VOLUME_BYTES: u64 = 1 << 30;

/// `-v SRC[:/PATH][:ro]`: an absolute SRC is the host's file or device, else the name of a blank
/// volume (which needs a PATH).
fn volume(
    index: usize,
    arg: &str,
    sizes: &HashMap<String, u64>,
) -> anyhow::Result<pb::VolumeRequest> {
    let (rest, read_only) = match arg.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (arg.strip_suffix(":rw").unwrap_or(arg), false),
    };
    let (src, mount_point) = match rest.rsplit_once(":/") {
        Some((src, path)) => (src, format!("/{path}")),
        None => (rest, String::new()),
    };
    anyhow::ensure!(!src.is_empty(), "-v {arg:?}: the source is missing before ':/'");
    if src.starts_with('/') {
        return Ok(pb::VolumeRequest {
            id: format!("vol{index}"),
            host_path: src.to_owned(),
            mount_point,
            read_only,
            ..Default::default()
        });
    }
    anyhow::ensure!(
        !src.contains('/'),
        "-v {arg:?}: a host file or device is given by its absolute path (/{src})"
    );
    anyhow::ensure!(
        !mount_point.is_empty(),
        "-v {arg:?}: expected /HOST/PATH[:/PATH][:ro] for a host file or device, or NAME:/PATH for a blank volume"
    );
    Ok(pb::VolumeRequest {
        id: src.to_owned(),
        size_bytes: sizes.get(src).copied().unwrap_or(BLANK_VOLUME_BYTES),
        mount_point,
        read_only,
        ..Default::default()
    })
}

/// `IMAGE:PATH[:ro]` (the image reference may hold colons itself: a tag, a registry's port).
fn image_volume(index: usize, arg: &str) -> anyhow::Result<pb::VolumeRequest> {
    let (rest, read_only) = match arg.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (arg.strip_suffix(":rw").unwrap_or(arg), false),
    };
    let Some((image, path)) = rest.rsplit_once(":/") else {
        anyhow::bail!("--image-volume {arg:?}: expected IMAGE:/ABSOLUTE/PATH[:ro], e.g. modules:1:/lib/modules:ro");
    };
    anyhow::ensure!(!image.is_empty(), "--image-volume {arg:?}: the image is missing before ':/'");
    Ok(pb::VolumeRequest {
        id: format!("vol{index}"),
        image: image.to_owned(),
        mount_point: format!("/{path}"),
        read_only,
        ..Default::default()
    })
}

/// The public key at `path` (`~/` is the home directory). Given the private key of a pair,
/// uses the `.pub` beside it.
fn read_public_key(path: &str) -> anyhow::Result<String> {
    let path = match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => std::path::Path::new(&home).join(rest),
        _ => std::path::PathBuf::from(path),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--ssh: reading the public key {}", path.display()))?;
    if text.trim_start().starts_with("-----BEGIN") {
        let public = path.with_file_name(format!(
            "{}.pub",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        if public.exists() {
            return read_public_key(&public.display().to_string());
        }
        bail!("--ssh={}: this is a private key; give the public key (usually the same name with .pub)", path.display());
    }
    hearth_types::net::validate_ssh_key(&text)
        .with_context(|| format!("--ssh={}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Creates the VM, pulling its image (and its kernel, given by reference) first when the policy
/// says so: `always` before, `missing` when the daemon has not got them.
async fn create_vm(c: &mut Client, a: &CreateArgs) -> anyhow::Result<VmRecord> {
    let req = request(a)?;
    if a.snapshot.is_some() {
        // Everything the VM needs is the snapshot's.
        let r = c.create_vm(req).await?.into_inner();
        return parse_json(&r.json);
    }
    let image = a.image.clone().unwrap_or_default();
    let kernel_ref = a.kernel.as_deref().filter(|k| hearth_types::kernel::is_reference(k));
    match a.pull.as_str() {
        "always" => {
            crate::cmd::image::pull(c, &image, a.insecure, true).await?;
            if let Some(k) = kernel_ref {
                pull_kernel(c, k, a.insecure).await?;
            }
        }
        "missing" | "never" => {}
        other => bail!("--pull must be missing, always or never, got {other:?}"),
    }
    let (mut image_pulled, mut kernel_pulled) = (false, false);
    loop {
        let missing = match c.create_vm(req.clone()).await {
            Ok(r) => return parse_json(&r.into_inner().json),
            Err(s) if s.code() == Code::NotFound && a.pull == "missing" => s,
            Err(s) => return Err(s.into()),
        };
        if missing.message().starts_with("image ") && !image_pulled {
            eprintln!("Unable to find image '{image}' locally");
            crate::cmd::image::pull(c, &image, a.insecure, true).await?;
            image_pulled = true;
        } else if let Some(k) =
            kernel_ref.filter(|_| missing.message().starts_with("kernel ") && !kernel_pulled)
        {
            eprintln!("Unable to find kernel '{k}' locally");
            pull_kernel(c, k, a.insecure).await?;
            kernel_pulled = true;
        } else {
            return Err(missing.into());
        }
    }
}

async fn pull_kernel(c: &mut Client, reference: &str, insecure: bool) -> anyhow::Result<()> {
    let k = crate::cmd::kernel::pull(c, reference, None, insecure).await?;
    eprintln!("Pulled kernel {} ({})", k.name, k.version);
    Ok(())
}

pub async fn create(host: Option<String>, a: CreateArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let rec = create_vm(&mut c, &a).await?;
    println!("{}", rec.spec.id);
    Ok(0)
}

pub async fn run(host: Option<String>, a: RunArgs) -> anyhow::Result<i32> {
    let mut c = client::connect(host).await?;
    let rec = create_vm(&mut c, &a.create).await?;
    let id = rec.spec.id.to_string();
    let started = c
        .start_vm(pb::StartVmRequest { r#ref: id.clone(), wait_ready: a.detach && !a.no_wait })
        .await;
    let started = match started {
        Ok(s) => s.into_inner(),
        Err(s) => {
            if a.create.rm {
                let _ = c.remove_vm(pb::RemoveRequest { r#ref: id.clone(), force: true }).await;
            }
            return Err(s.into());
        }
    };
    if !started.warning.is_empty() {
        eprintln!("hearth: warning: {}", started.warning);
    }
    if a.detach {
        println!("{id}");
        return Ok(0);
    }
    if a.create.interactive {
        let (open, gate) = tokio::sync::oneshot::channel();
        let (mut c2, id2) = (c.clone(), id.clone());
        tokio::spawn(async move {
            // Input flows once hearth-init reports ready (or the VM already ended).
            loop {
                match c2.inspect_vm(pb::Ref { r#ref: id2.clone() }).await {
                    Ok(r)
                        if parse_json::<VmRecord>(&r.get_ref().json).map_or(true, |v| {
                            v.status.state != hearth_types::VmState::Starting
                        }) =>
                    {
                        break
                    }
                    Err(_) => break,
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
            let _ = open.send(());
        });
        crate::cmd::console::attach_stream(&mut c, &id, a.create.tty, Some(gate)).await?;
    } else {
        let follow = crate::cmd::console::follow_logs(c.clone(), id.clone(), true);
        let interrupted = tokio::select! {
            r = follow => { r?; false }
            _ = tokio::signal::ctrl_c() => true,
        };
        if interrupted {
            eprintln!("hearth: stopping {id}");
            c.stop_vm(pb::StopVmRequest { r#ref: id.clone(), timeout_secs: 10 }).await?;
        }
    }
    let w = c.wait_vm(pb::Ref { r#ref: id }).await?.into_inner();
    if w.exit_code < 0 {
        if !w.reason.is_empty() {
            eprintln!("hearth: the VM {}: {}", w.state, w.reason);
        }
        return Ok(125);
    }
    Ok(w.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_volumes_split_at_the_absolute_path() {
        let v = image_volume(0, "127.0.0.1:5000/mods:6.1:/lib/modules:ro").expect("parse");
        assert_eq!(
            (v.image.as_str(), v.mount_point.as_str(), v.read_only, v.id.as_str()),
            ("127.0.0.1:5000/mods:6.1", "/lib/modules", true, "vol0")
        );
        let v = image_volume(3, "data:1:/srv").expect("parse");
        assert_eq!(
            (v.image.as_str(), v.mount_point.as_str(), v.read_only, v.id.as_str()),
            ("data:1", "/srv", false, "vol3")
        );
        assert!(image_volume(0, "data:1:srv").is_err());
        assert!(image_volume(0, ":/srv").is_err());
    }

    #[test]
    fn volumes_are_host_disks_by_absolute_path_and_blank_ones_by_name() {
        let sizes: HashMap<String, u64> = [("data".to_owned(), 10 << 30)].into();
        let v = volume(1, "/srv/data.img:/data:ro", &sizes).expect("host file");
        assert_eq!(
            (v.host_path.as_str(), v.mount_point.as_str(), v.read_only, v.id.as_str()),
            ("/srv/data.img", "/data", true, "vol1")
        );
        let v = volume(0, "/dev/vdb", &sizes).expect("a device, not mounted");
        assert_eq!((v.host_path.as_str(), v.mount_point.as_str()), ("/dev/vdb", ""));
        let v = volume(0, "data:/var/lib/db", &sizes).expect("blank");
        assert_eq!((v.id.as_str(), v.size_bytes, v.host_path.as_str()), ("data", 10 << 30, ""));
        let v = volume(0, "cache:/cache", &sizes).expect("blank, default size");
        assert_eq!(v.size_bytes, BLANK_VOLUME_BYTES);
        for bad in ["cache", ":/data", "relative/path:/data"] {
            assert!(volume(0, bad, &sizes).is_err(), "{bad}");
        }
    }
}
