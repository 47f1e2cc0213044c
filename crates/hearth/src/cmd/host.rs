//! `hearth host check` and `hearth host init`: what this host has for running VMs, and how to
//! fix what it lacks. They look at the host directly (no daemon needed, nothing of hearth's
//! state is edited); `init` prepares the root directory and the bridge network.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_host::{evaluate, Check, Facts, Level};

use crate::client::DEFAULT_ROOT;

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Check every host requirement and say how to fix what is missing.
    Check(CheckArgs),
    /// Prepare the host: the state directory, the storage check and the bridge network.
    Init(InitArgs),
    /// Set up what a Flintlock host has: a device-mapper thin pool for VM disks (`--dev` on
    /// sparse files, `--direct-lvm --disk` on a disk), or with `--all` everything: packages,
    /// modules, sysctls, the pool, the bridge, hearthd's config and service. Idempotent;
    /// `--dry-run` prints the plan.
    Provision(Box<ProvisionArgs>),
}

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// Everything a host needs, as Flintlock's provision.sh `all`: the packages (apt), the
    /// kernel modules now and at boot, the sysctls now and at boot, the thin pool (on files,
    /// or on --disk through LVM), the bridge network, /etc/hearth/hearthd.toml with the options
    /// below and a hearthd systemd unit, enabled and started.
    #[arg(long, conflicts_with_all = ["dev", "direct_lvm"])]
    all: bool,
    /// With --all: serve Flintlock's API on this TCP address (hearthd --flintlock-listen).
    #[arg(long, value_name = "ADDR")]
    grpc_address: Option<String>,
    /// With --all: the host interface macvtap networks sit on (hearthd --parent-iface).
    #[arg(long, value_name = "IFACE")]
    parent_iface: Option<String>,
    /// With --all: serve --grpc-address in plaintext.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    insecure: bool,
    /// With --all: TLS certificate and key (PEM) for --grpc-address, and a CA for client
    /// certificates (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With --all: leave the network alone (no bridge; no tun and bridge modules).
    #[arg(long)]
    no_network: bool,
    /// With --all: the bridge's name (hearthd --bridge-name).
    #[arg(long, value_name = "NAME", default_value = hearth_types::net::BRIDGE_NAME)]
    bridge: String,
    /// The thin pool on sparse files in the state directory, on loop devices (Flintlock's dev
    /// mode; it comes back after a reboot when hearthd starts).
    #[arg(long, conflicts_with = "direct_lvm")]
    dev: bool,
    /// The thin pool on a whole disk through LVM (Flintlock's direct_lvm): a volume group on
    /// --disk, a thin pool on 95% of it (its metadata sized by LVM), an autoextend profile.
    #[arg(long, requires = "disk")]
    direct_lvm: bool,
    /// The disk for --direct-lvm. One that is mounted or in use is refused; one with partitions
    /// or a filesystem too, unless --force.
    #[arg(long, value_name = "DEV")]
    disk: Option<PathBuf>,
    /// With --direct-lvm: wipe the partitions or filesystem found on --disk.
    #[arg(long)]
    force: bool,
    /// With --direct-lvm: the volume group's name (the pool's device is VG-thinpool).
    #[arg(long, default_value = hearth_storage::lvm::DEFAULT_VG)]
    vg: String,
    /// Print what would be done, and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// State directory (HEARTH_ROOT, default /var/lib/hearth): the dev pool's files are in
    /// ROOT/pool.
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// The pool's device-mapper name (--dev), or its logical volume's name in the group
    /// (--direct-lvm, default thinpool).
    #[arg(long)]
    pool_name: Option<String>,
    /// The dev pool's data file size (sparse: it takes what VMs write).
    #[arg(long, default_value = "100G", value_parser = size)]
    data_size: u64,
    /// The dev pool's metadata file size (sparse).
    #[arg(long, default_value = "2G", value_parser = size)]
    metadata_size: u64,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// State directory whose filesystem is checked (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Output format: table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
    /// hearthd's config file, whose `thin-pool` is the pool checked (hearth host provision
    /// writes it).
    #[arg(long, value_name = "FILE", default_value = crate::cmd::provision::CONFIG)]
    config: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// State directory to create (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Leave the network alone (no hearth0 bridge, no forwarding, no NAT table).
    #[arg(long)]
    no_network: bool,
    /// The bridge's name (give hearthd the same --bridge-name).
    #[arg(long, value_name = "NAME", default_value = hearth_types::net::BRIDGE_NAME)]
    bridge: String,
}

pub async fn host(c: HostCmd) -> anyhow::Result<i32> {
    match c {
        HostCmd::Check(a) => {
            let checks = evaluate(&probe(&a.root, &a.config)?);
            print_checks(&checks, &a.output)?;
            Ok(if checks.iter().any(|c| c.level == Level::Fail) { 1 } else { 0 })
        }
        HostCmd::Init(a) => init(a).await,
        HostCmd::Provision(a) if a.all => provision_all(*a).await,
        HostCmd::Provision(a) => provision(*a),
    }
}

fn print_checks(checks: &[Check], format: &str) -> anyhow::Result<()> {
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(checks)?),
        "table" => {
            let rows: Vec<Vec<String>> = checks
                .iter()
                .map(|c| {
                    let level = serde_json::to_value(c.level)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_uppercase))
                        .unwrap_or_default();
                    let detail = if c.fix.is_empty() || c.level == Level::Ok {
                        c.detail.clone()
                    } else {
                        format!("{} — fix: {}", c.detail, c.fix)
                    };
                    vec![c.name.clone(), level, detail]
                })
                .collect();
            crate::output::table(&["CHECK", "STATUS", "DETAIL"], &rows);
            let fails = checks.iter().filter(|c| c.level == Level::Fail).count();
            let warns = checks.iter().filter(|c| c.level == Level::Warn).count();
            println!(
                "\n{fails} failed, {warns} warnings: {}",
                if fails == 0 { "this host can run VMs" } else { "fix the failures to run VMs" }
            );
        }
        other => anyhow::bail!("-o {other:?}: use table or json"),
    }
    Ok(())
}

async fn init(a: InitArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "hearth host init must run as root");
    std::fs::create_dir_all(&a.root).with_context(|| format!("creating {}", a.root.display()))?;
    println!("state directory: {}", a.root.display());
    if a.no_network {
        println!("network: left alone (--no-network); --network user needs nothing");
    } else {
        let bridge = hearth_net::Bridge { name: a.bridge.clone(), ..hearth_net::Bridge::hearth0() };
        hearth_net::ensure_bridge(&bridge)
            .await
            .context("setting up the bridge network (or pass --no-network)")?;
        println!(
            "network: bridge {} at {}/{}, forwarding on, NAT for {} in nftables table ip {}",
            bridge.name,
            bridge.gateway,
            bridge.prefix,
            bridge.subnet(),
            hearth_net::NFT_TABLE
        );
    }
    let checks = evaluate(&probe(&a.root, std::path::Path::new(crate::cmd::provision::CONFIG))?);
    if let Some(storage) = checks.iter().find(|c| c.name == "storage") {
        println!("storage: {}", storage.detail);
    }
    let fails: Vec<&Check> = checks.iter().filter(|c| c.level == Level::Fail).collect();
    for c in &fails {
        println!("still failing: {}: {} — fix: {}", c.name, c.detail, c.fix);
    }
    println!(
        "{}",
        if fails.is_empty() {
            "ready: this host can run VMs (`hearth host check` for details)"
        } else {
            "not ready yet"
        }
    );
    Ok(if fails.is_empty() { 0 } else { 1 })
}

/// A size flag (`100G`, `512M`).
fn size(s: &str) -> Result<u64, String> {
    hearth_types::parse_size(s).map_err(|e| e.to_string())
}

/// Kernel modules a thin pool on files needs.
const POOL_MODULES: [&str; 2] = ["dm_thin_pool", "loop"];

fn provision(a: ProvisionArgs) -> anyhow::Result<i32> {
    if a.direct_lvm {
        return direct_lvm(&a);
    }
    anyhow::ensure!(
        a.dev,
        "say what to provision: --dev (a thin pool on sparse files), --direct-lvm --disk DEV (on a disk, through LVM), or --all"
    );
    dev_pool(&a)
}

/// `--all`: see [`super::provision`].
async fn provision_all(a: ProvisionArgs) -> anyhow::Result<i32> {
    use super::provision as p;
    let dry = a.dry_run;
    anyhow::ensure!(
        dry || nix::unistd::geteuid().is_root(),
        "hearth host provision must run as root"
    );
    anyhow::ensure!(
        a.grpc_address.is_none() || a.insecure || a.tls_cert.is_some(),
        "--grpc-address needs TLS (--tls-cert and --tls-key) or --insecure for plaintext"
    );
    let lvm = a.disk.is_some();
    let thin_pool = match &a.disk {
        Some(disk) => hearth_storage::lvm::DirectLvm {
            disk: disk.clone(),
            vg: a.vg.clone(),
            lv: a.pool_name.clone().unwrap_or_else(|| hearth_storage::lvm::DEFAULT_LV.into()),
            force: a.force,
        }
        .dm_name(),
        None => {
            a.pool_name.clone().unwrap_or_else(|| hearth_storage::dm::pool::DEFAULT_NAME.into())
        }
    };
    let svc = p::Service {
        root: a.root.clone(),
        thin_pool,
        grpc_address: a.grpc_address.clone(),
        parent_iface: a.parent_iface.clone(),
        insecure: a.insecure,
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        tls_client_ca: a.tls_client_ca.clone(),
        network: !a.no_network,
        bridge: a.bridge.clone(),
    };
    p::packages(dry, lvm)?;
    p::modules(dry, &svc)?;
    p::sysctls(dry)?;
    if lvm {
        direct_lvm(&a)?;
    } else {
        dev_pool(&a)?;
    }
    if svc.network {
        let bridge = hearth_net::Bridge { name: a.bridge.clone(), ..hearth_net::Bridge::hearth0() };
        let there = std::path::Path::new("/sys/class/net").join(&bridge.name).exists();
        if !there {
            println!(
                "{} create the bridge {} at {}/{} with NAT",
                if dry { "would" } else { "did" },
                bridge.name,
                bridge.gateway,
                bridge.prefix
            );
        }
        if !dry {
            hearth_net::ensure_bridge(&bridge).await.map_err(|e| {
                anyhow::anyhow!("setting up the bridge network (or pass --no-network): {e}")
            })?;
        }
    }
    p::service(dry, &svc, &p::hearthd_binary())?;
    Ok(0)
}

/// `--dev`: the pool on sparse files in ROOT/pool.
fn dev_pool(a: &ProvisionArgs) -> anyhow::Result<i32> {
    let pool = hearth_storage::dm::pool::DevPool {
        dir: a.root.join("pool"),
        name: a.pool_name.clone().unwrap_or_else(|| hearth_storage::dm::pool::DEFAULT_NAME.into()),
        data_bytes: a.data_size,
        metadata_bytes: a.metadata_size,
    };
    if a.dry_run {
        let dm = hearth_storage::dm::Control::open().ok();
        let mut plan: Vec<String> = POOL_MODULES
            .iter()
            .filter(|m| !hearth_kernel::kmod::present(m))
            .map(|m| format!("load the kernel module {m}"))
            .collect();
        plan.extend(pool.plan(dm.as_ref())?.iter().map(ToString::to_string));
        print_plan(&plan, &pool.name);
        return Ok(0);
    }
    load_modules(&POOL_MODULES)?;
    let dm = hearth_storage::dm::Control::open()?;
    let steps =
        pool.ensure(&dm).with_context(|| format!("setting up the thin pool {}", pool.name))?;
    for step in &steps {
        println!("did {step}");
    }
    report_pool(&pool.pool(&dm), steps.is_empty())?;
    Ok(0)
}

/// The pool's usage after a provision.
fn report_pool(pool: &hearth_storage::dm::thin::Pool, unchanged: bool) -> anyhow::Result<()> {
    let usage = pool.usage()?;
    println!(
        "thin pool {}: data {:.1}% used of {}, metadata {:.1}%{}",
        pool.name,
        usage.data_percent(),
        hearth_types::format_size(usage.data_total * hearth_storage::dm::thin::BLOCK_SECTORS * 512),
        usage.metadata_percent(),
        if unchanged { " (it was set up already: nothing changed)" } else { "" }
    );
    Ok(())
}

/// A dry run's plan for the pool `name`.
fn print_plan(plan: &[String], name: &str) {
    if plan.is_empty() {
        println!("nothing to do: the thin pool {name} is set up");
    }
    for step in plan {
        println!("would {step}");
    }
}

/// Loads the pool's modules (as root), saying which it loaded.
fn load_modules(names: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "hearth host provision must run as root");
    for m in hearth_kernel::kmod::load(&hearth_kernel::kmod::tree(), names)
        .map_err(anyhow::Error::msg)?
    {
        println!("loaded the kernel module {m}");
    }
    Ok(())
}

/// `--direct-lvm --disk DEV`: the pool through LVM on a whole disk.
fn direct_lvm(a: &ProvisionArgs) -> anyhow::Result<i32> {
    let lvm = hearth_storage::lvm::DirectLvm {
        disk: a.disk.clone().unwrap_or_default(),
        vg: a.vg.clone(),
        lv: a.pool_name.clone().unwrap_or_else(|| hearth_storage::lvm::DEFAULT_LV.into()),
        force: a.force,
    };
    let modules = ["dm_thin_pool"];
    if a.dry_run {
        let mut plan: Vec<String> = (modules.iter())
            .filter(|m| !hearth_kernel::kmod::present(m))
            .map(|m| format!("load the kernel module {m}"))
            .collect();
        plan.extend(lvm.plan().map_err(anyhow::Error::msg)?.iter().map(ToString::to_string));
        print_plan(&plan, &lvm.dm_name());
        return Ok(0);
    }
    load_modules(&modules)?;
    let steps = lvm.ensure().map_err(anyhow::Error::msg)?;
    for step in &steps {
        println!("did {step}");
    }
    let dm = hearth_storage::dm::Control::open()?;
    report_pool(
        &hearth_storage::dm::thin::Pool { dm: &dm, name: lvm.dm_name() },
        steps.is_empty(),
    )?;
    println!("start hearthd with --thin-pool {} to put VM disks on it", lvm.dm_name());
    Ok(0)
}

/// This host's facts, with the VMM's KVM verdict, the storage's reflink probe and the thin pool
/// hearthd's `config` names (else the default one).
fn probe(root: &std::path::Path, config: &std::path::Path) -> anyhow::Result<Facts> {
    let mut facts = Facts::probe(root, hearth_vmm::accel::kvm_unusable_here(), |dir| {
        hearth_storage::supports_reflink(dir).ok()
    });
    facts.configured_pool = configured_pool(config)?.map(|p| (p, config.to_owned()));
    let name = facts.configured_pool.as_ref().map(|(p, _)| p.as_str());
    facts.thin_pool = thin_pool(name.unwrap_or(hearth_storage::dm::pool::DEFAULT_NAME));
    Ok(facts)
}

/// The `thin-pool` of hearthd's config file, if the file exists and names one.
fn configured_pool(config: &std::path::Path) -> anyhow::Result<Option<String>> {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.display())),
    };
    let table: toml::Table =
        text.parse().with_context(|| format!("{} is not TOML", config.display()))?;
    match table.get("thin-pool") {
        None => Ok(None),
        Some(toml::Value::String(p)) => Ok(Some(p.clone())),
        Some(other) => {
            anyhow::bail!(
                "{}: thin-pool must be a string, not {}",
                config.display(),
                other.type_str()
            )
        }
    }
}

/// The thin pool `name` and its usage, when device-mapper has it.
fn thin_pool(name: &str) -> Option<(String, Result<hearth_host::PoolUsage, String>)> {
    let dm = hearth_storage::dm::Control::open().ok()?;
    dm.info(name).ok()??;
    let pool = hearth_storage::dm::thin::Pool { dm: &dm, name: name.to_owned() };
    Some((name.to_owned(), pool.report()))
}
