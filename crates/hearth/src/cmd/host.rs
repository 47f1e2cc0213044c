//! `hearth host check` and `hearth host init`: what this host has for running VMs, and how to
//! fix what it lacks. They look at the host directly (no daemon needed, nothing of hearth's
//! state is edited); `init` prepares the root directory and the bridge network.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::DEFAULT_ROOT;

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Check every host requirement and say how to fix what is missing.
    Check(CheckArgs),
    /// Prepare the host: the state directory, the storage check and the bridge network.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// State directory whose filesystem is checked (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Output format: table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// State directory to create (HEARTH_ROOT, default /var/lib/hearth).
    #[arg(long, env = "HEARTH_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Leave the network alone (no hearth0 bridge, no forwarding, no NAT table).
    #[arg(long)]
    no_network: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, with a limit worth knowing.
    Info,
    /// A feature needs this; the rest works.
    Warn,
    /// hearth cannot run VMs until this is fixed.
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    /// What to do, when the level is not ok.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(name: &str, level: Level, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), level, detail: detail.into(), fix: fix.into() }
}

/// Where a kernel module stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModState {
    Loaded,
    BuiltIn,
    /// In the running kernel (/sys/module), loaded or built in.
    Present,
    /// On disk, not loaded.
    Available,
    Missing,
    /// The kernel's module lists are not on this host (a container, say), and the running
    /// kernel does not show it.
    Unknown,
}

/// What the checks read, gathered once (a test builds one by hand).
#[derive(Debug, Default)]
pub struct Facts {
    pub euid: u32,
    pub arch: String,
    /// `None` when KVM is usable, else why not.
    pub kvm_unusable: Option<String>,
    /// Programs found on PATH, by name.
    pub programs: Vec<(String, Option<PathBuf>)>,
    pub proc_modules: String,
    pub modules_builtin: String,
    pub modules_dep: String,
    /// Whether /lib/modules/RELEASE/modules.dep was readable, so "missing" can be told.
    pub modules_known: bool,
    /// Entries of /sys/module.
    pub sys_modules: Vec<String>,
    /// sysctl values by dotted name, `None` when the file does not exist.
    pub sysctls: Vec<(String, Option<String>)>,
    pub device_nodes: Vec<(String, bool)>,
    /// Free bytes on the root's filesystem, and whether it clones by reflink.
    pub root_free: Option<u64>,
    pub reflink: Option<bool>,
}

const PROGRAMS: [&str; 6] =
    ["qemu-system-x86_64", "mkfs.ext4", "resize2fs", "nft", "firecracker", "cloud-hypervisor"];
const SYSCTLS: [&str; 2] = ["net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"];
const DEVICES: [&str; 3] = ["/dev/net/tun", "/dev/vhost-vsock", "/dev/vhost-net"];

impl Facts {
    /// Reads this host.
    pub fn probe(root: &Path) -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let moddir = Path::new("/lib/modules").join(&release);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        // The nearest existing ancestor: the root may not be created yet.
        let existing = root.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/"));
        Self {
            euid: nix::unistd::geteuid().as_raw(),
            arch: std::env::consts::ARCH.to_owned(),
            kvm_unusable: hearth_vmm::accel::kvm_unusable(&hearth_vmm::accel::HostFacts::probe()),
            programs: PROGRAMS.iter().map(|p| (p.to_string(), which(p))).collect(),
            proc_modules: read(Path::new("/proc/modules")),
            modules_builtin: read(&moddir.join("modules.builtin")),
            modules_dep: read(&moddir.join("modules.dep")),
            modules_known: moddir.join("modules.dep").is_file(),
            sys_modules: std::fs::read_dir("/sys/module")
                .map(|rd| {
                    rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default(),
            sysctls: SYSCTLS
                .iter()
                .map(|s| {
                    (
                        s.to_string(),
                        std::fs::read_to_string(Path::new("/proc/sys").join(s.replace('.', "/")))
                            .ok()
                            .map(|v| v.trim().to_owned()),
                    )
                })
                .collect(),
            device_nodes: DEVICES.iter().map(|d| (d.to_string(), Path::new(d).exists())).collect(),
            root_free: nix::sys::statvfs::statvfs(existing)
                .ok()
                .map(|s| s.blocks_available() * s.fragment_size()),
            // Probing writes two scratch files: only in the state directory itself.
            reflink: if root.is_dir() { hearth_storage::supports_reflink(root).ok() } else { None },
        }
    }

    fn program(&self, name: &str) -> Option<&PathBuf> {
        self.programs.iter().find(|(n, _)| n == name).and_then(|(_, p)| p.as_ref())
    }

    fn sysctl(&self, name: &str) -> Option<&str> {
        self.sysctls.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    fn device(&self, path: &str) -> bool {
        self.device_nodes.iter().any(|(d, present)| d == path && *present)
    }

    /// A module's state from /proc/modules, modules.builtin and modules.dep (names compare with
    /// `-` and `_` alike, as modprobe does).
    pub fn module(&self, name: &str) -> ModState {
        let norm = |s: &str| s.replace('-', "_");
        let want = norm(name);
        let file_is = |path: &str| {
            let file = path.rsplit('/').next().unwrap_or(path);
            let stem = file.split(".ko").next().unwrap_or(file);
            norm(stem) == want
        };
        if self
            .proc_modules
            .lines()
            .any(|l| l.split_whitespace().next().is_some_and(|m| norm(m) == want))
        {
            ModState::Loaded
        } else if self.modules_builtin.lines().any(|l| file_is(l.trim())) {
            ModState::BuiltIn
        } else if self.sys_modules.iter().any(|m| norm(m) == want) {
            ModState::Present
        } else if self.modules_dep.lines().any(|l| l.split(':').next().is_some_and(file_is)) {
            ModState::Available
        } else if self.modules_known {
            ModState::Missing
        } else {
            ModState::Unknown
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One check per kernel module: what needs it, and whether lacking it fails or limits.
fn module_check(
    f: &Facts,
    module: &str,
    needed_for: &str,
    level_if_missing: Level,
    package_hint: &str,
) -> Check {
    match f.module(module) {
        ModState::Loaded => check(&format!("module {module}"), Level::Ok, "loaded", ""),
        ModState::BuiltIn => check(&format!("module {module}"), Level::Ok, "built into the kernel", ""),
        ModState::Present => check(&format!("module {module}"), Level::Ok, "in the running kernel", ""),
        ModState::Unknown => check(
            &format!("module {module}"),
            Level::Info,
            format!("cannot tell: this kernel's module lists are not on this host (a container?); needed for {needed_for}"),
            format!("make sure the host kernel has {module} ({package_hint})"),
        ),
        ModState::Available => check(
            &format!("module {module}"),
            Level::Ok,
            format!("not loaded; loads on demand ({needed_for})"),
            format!("to load it now: modprobe {module}"),
        ),
        ModState::Missing => check(
            &format!("module {module}"),
            level_if_missing,
            format!("not in this kernel; needed for {needed_for}"),
            format!("use a kernel with {module} ({package_hint})"),
        ),
    }
}

/// Every check, in the order they are printed.
pub fn evaluate(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(if f.euid == 0 {
        check("root", Level::Ok, "running as root", "")
    } else {
        check(
            "root",
            Level::Fail,
            format!("running as uid {}", f.euid),
            "run hearth as root: it creates disks, taps and VMM processes",
        )
    });
    out.push(if f.arch == "x86_64" {
        check("cpu", Level::Ok, "x86_64", "")
    } else {
        check(
            "cpu",
            Level::Fail,
            format!("{} is not supported", f.arch),
            "run hearth on an x86_64 host",
        )
    });
    out.push(match &f.kvm_unusable {
        None => check("kvm", Level::Ok, "/dev/kvm opens and the CPU has vmx/svm: hardware virtualisation", ""),
        Some(why) => check(
            "kvm",
            Level::Warn,
            format!("not usable: {why}; VMs run under QEMU's TCG software emulation (much slower)"),
            "enable VT-x/AMD-V in the firmware (or nested virtualisation for a VM host), load kvm_intel or kvm_amd, and give access to /dev/kvm",
        ),
    });
    let tool = |name: &str, fail: Level, detail_missing: &str, fix: &str| match f.program(name) {
        Some(p) => check(name, Level::Ok, p.display().to_string(), ""),
        None => check(name, fail, detail_missing, fix),
    };
    out.push(tool(
        "qemu-system-x86_64",
        Level::Fail,
        "not installed: hearth's VMM",
        "apt-get install qemu-system-x86",
    ));
    out.push(tool(
        "mkfs.ext4",
        Level::Fail,
        "not installed: root filesystems are built with it",
        "apt-get install e2fsprogs",
    ));
    out.push(tool(
        "resize2fs",
        Level::Fail,
        "not installed: disks are grown to --size with it",
        "apt-get install e2fsprogs",
    ));
    out.push(tool(
        "nft",
        Level::Warn,
        "not installed: --network bridge needs it for outbound NAT",
        "apt-get install nftables",
    ));
    out.push(tool(
        "firecracker",
        Level::Info,
        "not installed (optional VMM; its provider is not enabled yet)",
        "install Firecracker from its releases",
    ));
    out.push(tool(
        "cloud-hypervisor",
        Level::Info,
        "not installed (optional VMM; its provider is not enabled yet)",
        "install Cloud Hypervisor from its releases",
    ));
    out.push(module_check(f, "tun", "--network bridge (VM taps)", Level::Warn, "CONFIG_TUN"));
    out.push(module_check(f, "bridge", "--network bridge", Level::Warn, "CONFIG_BRIDGE"));
    out.push(module_check(f, "loop", "mounting disk images", Level::Info, "CONFIG_BLK_DEV_LOOP"));
    out.push(module_check(
        f,
        "macvtap",
        "macvtap interfaces (not used yet)",
        Level::Info,
        "CONFIG_MACVTAP",
    ));
    out.push(module_check(
        f,
        "dm_thin_pool",
        "device-mapper thin-pool storage (not used yet: disks are reflink or sparse copies)",
        Level::Info,
        "CONFIG_DM_THIN_PROVISIONING",
    ));
    out.push(module_check(
        f,
        "vhost_vsock",
        "the agent channel of Firecracker and Cloud Hypervisor (QEMU uses virtio-serial)",
        Level::Info,
        "CONFIG_VHOST_VSOCK",
    ));
    out.push(if f.device("/dev/net/tun") {
        check("/dev/net/tun", Level::Ok, "present", "")
    } else {
        check(
            "/dev/net/tun",
            Level::Warn,
            "missing: --network bridge cannot create taps",
            "modprobe tun (and in a container, pass /dev/net/tun through)",
        )
    });
    out.push(match f.sysctl("net.ipv4.ip_forward") {
        Some("1") => check("net.ipv4.ip_forward", Level::Ok, "1", ""),
        _ => check(
            "net.ipv4.ip_forward",
            Level::Info,
            "0: bridged VMs reach the host and each other, not beyond; hearth turns it on when it creates the bridge",
            "sysctl -w net.ipv4.ip_forward=1 (or run `hearth host init`)",
        ),
    });
    out.push(match f.sysctl("net.bridge.bridge-nf-call-iptables") {
        None => check(
            "net.bridge.bridge-nf-call-iptables",
            Level::Ok,
            "br_netfilter not loaded: bridged traffic is not filtered by iptables",
            "",
        ),
        Some("0") => check("net.bridge.bridge-nf-call-iptables", Level::Ok, "0: bridged traffic is not filtered by iptables", ""),
        Some(v) => check(
            "net.bridge.bridge-nf-call-iptables",
            Level::Info,
            format!("{v}: traffic between VMs on hearth0 passes iptables' FORWARD chain (a DROP policy, as Docker sets, cuts it off)"),
            "allow it: iptables -I FORWARD -i hearth0 -o hearth0 -j ACCEPT (Kubernetes nodes need the sysctl at 1)",
        ),
    });
    out.push(match f.root_free {
        Some(free) if free >= 2 << 30 => {
            check("disk space", Level::Ok, format!("{} free", crate::output::human_bytes(free)), "")
        }
        Some(free) => check(
            "disk space",
            Level::Warn,
            format!(
                "{} free where the state directory lives; images and VM disks need room",
                crate::output::human_bytes(free)
            ),
            "free space there or choose another --root",
        ),
        None => check(
            "disk space",
            Level::Warn,
            "could not be read",
            "check that the state directory's filesystem is mounted",
        ),
    });
    out.push(match f.reflink {
        Some(true) => check("storage", Level::Ok, "reflink clones: a VM disk costs no copy, whatever the image size", ""),
        Some(false) => check(
            "storage",
            Level::Info,
            "no reflink on this filesystem: VM disks are sparse copies (time grows with the image's data)",
            "put the state directory on btrfs or XFS (reflink=1) for copy-free VM disks",
        ),
        None => check(
            "storage",
            Level::Info,
            "reflink support not probed: the state directory does not exist yet or is not writable",
            "create it with `hearth host init`",
        ),
    });
    out
}

pub async fn host(c: HostCmd) -> anyhow::Result<i32> {
    match c {
        HostCmd::Check(a) => {
            let checks = evaluate(&Facts::probe(&a.root));
            print_checks(&checks, &a.output)?;
            Ok(if checks.iter().any(|c| c.level == Level::Fail) { 1 } else { 0 })
        }
        HostCmd::Init(a) => init(a).await,
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
    use anyhow::Context;
    anyhow::ensure!(nix::unistd::geteuid().is_root(), "hearth host init must run as root");
    std::fs::create_dir_all(&a.root).with_context(|| format!("creating {}", a.root.display()))?;
    println!("state directory: {}", a.root.display());
    if a.no_network {
        println!("network: left alone (--no-network); --network user needs nothing");
    } else {
        let bridge = hearth_net::Bridge::hearth0();
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
    let checks = evaluate(&Facts::probe(&a.root));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Facts {
        Facts {
            euid: 0,
            arch: "x86_64".into(),
            kvm_unusable: None,
            programs: PROGRAMS.iter().map(|p| (p.to_string(), Some(PathBuf::from("/usr/bin").join(p)))).collect(),
            proc_modules: "tun 61440 0 - Live 0x0\nbridge 311296 0 - Live 0x0\n".into(),
            modules_builtin: "kernel/drivers/block/loop.ko\n".into(),
            modules_dep: "kernel/drivers/net/macvtap.ko: kernel/drivers/net/macvlan.ko\nkernel/drivers/md/dm-thin-pool.ko.xz: kernel/drivers/md/dm-bio-prison.ko\n".into(),
            modules_known: true,
            sys_modules: vec!["vhost_vsock".into()],
            sysctls: vec![("net.ipv4.ip_forward".into(), Some("1".into())), ("net.bridge.bridge-nf-call-iptables".into(), None)],
            device_nodes: vec![("/dev/net/tun".into(), true)],
            root_free: Some(50 << 30),
            reflink: Some(true),
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}"))
    }

    #[test]
    fn modules_are_found_loaded_built_in_or_on_disk() {
        let f = host();
        assert_eq!(f.module("tun"), ModState::Loaded);
        assert_eq!(f.module("loop"), ModState::BuiltIn);
        assert_eq!(f.module("macvtap"), ModState::Available);
        assert_eq!(
            f.module("dm_thin_pool"),
            ModState::Available,
            "dashes and underscores compare alike, .ko.xz too"
        );
        assert_eq!(f.module("vhost_vsock"), ModState::Present);
        assert_eq!(f.module("nbd"), ModState::Missing);
        let unknown = Facts { modules_known: false, ..host() };
        assert_eq!(
            unknown.module("nbd"),
            ModState::Unknown,
            "without module lists, absence proves nothing"
        );
    }

    #[test]
    fn a_complete_host_has_no_failures_or_warnings() {
        let checks = evaluate(&host());
        assert!(
            checks.iter().all(|c| c.level != Level::Fail && c.level != Level::Warn),
            "{checks:#?}"
        );
    }

    #[test]
    fn every_shortfall_is_named_with_its_fix() {
        let mut f = host();
        f.euid = 1000;
        f.kvm_unusable = Some("the CPU does not advertise vmx or svm".into());
        f.programs.retain(|(n, _)| n != "qemu-system-x86_64" && n != "nft");
        f.programs.push(("qemu-system-x86_64".into(), None));
        f.proc_modules.clear();
        f.modules_dep.clear();
        f.sys_modules.clear();
        f.device_nodes = vec![("/dev/net/tun".into(), false)];
        f.sysctls = vec![
            ("net.ipv4.ip_forward".into(), Some("0".into())),
            ("net.bridge.bridge-nf-call-iptables".into(), Some("1".into())),
        ];
        f.root_free = Some(100 << 20);
        f.reflink = Some(false);
        let checks = evaluate(&f);
        assert_eq!(find(&checks, "root").level, Level::Fail);
        assert_eq!(find(&checks, "qemu-system-x86_64").level, Level::Fail);
        assert!(find(&checks, "qemu-system-x86_64")
            .fix
            .contains("apt-get install qemu-system-x86"));
        let kvm = find(&checks, "kvm");
        assert!(
            kvm.level == Level::Warn && kvm.detail.contains("TCG") && kvm.fix.contains("VT-x"),
            "{kvm:?}"
        );
        assert_eq!(find(&checks, "nft").level, Level::Warn);
        assert!(find(&checks, "module tun").fix.contains("CONFIG_TUN"));
        assert_eq!(find(&checks, "/dev/net/tun").level, Level::Warn);
        assert!(find(&checks, "net.ipv4.ip_forward")
            .fix
            .contains("sysctl -w net.ipv4.ip_forward=1"));
        assert!(find(&checks, "net.bridge.bridge-nf-call-iptables").fix.contains("FORWARD"));
        assert_eq!(find(&checks, "disk space").level, Level::Warn);
        assert!(find(&checks, "storage").fix.contains("reflink"));
        for c in checks.iter().filter(|c| c.level != Level::Ok) {
            assert!(!c.fix.is_empty(), "{} has no fix", c.name);
        }
    }
}
