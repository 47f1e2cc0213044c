//! Every check, from the facts: each section its own function, in the order they are printed.

use crate::{check, Check, Facts, Level, ModState};

/// Every check, in the order they are printed.
pub fn evaluate(f: &Facts) -> Vec<Check> {
    [machine(f), programs(f), modules(f), network(f), storage(f)].concat()
}

/// Root, the CPU, KVM.
fn machine(f: &Facts) -> Vec<Check> {
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
    out
}

/// The VMMs and the tools hearth runs.
fn programs(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    let tool = |name: &str, fail: Level, detail_missing: &str, fix: &str| match f.program(name) {
        Some(p) => check(name, Level::Ok, installed(f, name, p), ""),
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
    for (name, flag) in [("firecracker", "firecracker"), ("cloud-hypervisor", "cloud-hypervisor")] {
        out.push(kvm_vmm(f, name, flag));
    }
    out.push(tool(
        "virtiofsd",
        Level::Info,
        "not installed: shared directories (`-v DIR:PATH`, Flintlock's virtiofs_source) need it",
        "apt-get install virtiofsd (Debian 13, Ubuntu 24.04), or cargo install virtiofsd",
    ));
    out
}

/// Where a program is, with its version when it is a VMM.
fn installed(f: &Facts, name: &str, path: &std::path::Path) -> String {
    match f.version(name) {
        Some(v) => format!("{} ({v})", path.display()),
        None => path.display().to_string(),
    }
}

/// An optional KVM-only VMM: where it is, its version, and whether it can run guests here.
fn kvm_vmm(f: &Facts, name: &str, flag: &str) -> Check {
    let Some(path) = f.program(name) else {
        return check(
            name,
            Level::Info,
            format!("not installed: `--vmm {flag}` needs it (optional VMM)"),
            format!(
                "install {name} from its project's releases, or name it with HEARTH_{}",
                name.to_uppercase().replace('-', "_")
            ),
        );
    };
    match &f.kvm_unusable {
        None => {
            check(name, Level::Ok, format!("{}; runs guests here", installed(f, name, path)), "")
        }
        Some(why) => check(
            name,
            Level::Info,
            format!(
                "{}; cannot run guests here: {why} (it has no software emulation)",
                installed(f, name, path)
            ),
            "use --vmm qemu on this host, or run on one with hardware virtualisation",
        ),
    }
}

/// The kernel modules features need.
fn modules(f: &Facts) -> Vec<Check> {
    vec![
        module_check(f, "tun", "--network bridge (VM taps)", Level::Warn, "CONFIG_TUN"),
        module_check(f, "bridge", "--network bridge", Level::Warn, "CONFIG_BRIDGE"),
        module_check(f, "loop", "mounting disk images", Level::Info, "CONFIG_BLK_DEV_LOOP"),
        module_check(
            f,
            "macvtap",
            "macvtap networks (--network macvtap, Flintlock's MACVTAP interfaces)",
            Level::Info,
            "CONFIG_MACVTAP",
        ),
        module_check(
            f,
            "dm_thin_pool",
            "device-mapper thin-pool storage (`hearth host provision --dev`)",
            Level::Info,
            "CONFIG_DM_THIN_PROVISIONING",
        ),
        module_check(
            f,
            "vhost_vsock",
            "vhost-vsock devices (hearth needs none: QEMU's agent channel is virtio-serial, and Firecracker and Cloud Hypervisor serve hybrid vsock themselves)",
            Level::Info,
            "CONFIG_VHOST_VSOCK",
        ),
    ]
}

/// The tap device and the sysctls of the bridge network.
fn network(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
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
    out
}

/// Room and clone support where the state directory lives.
fn storage(f: &Facts) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match f.root_free {
        Some(free) if free >= 2 << 30 => {
            check("disk space", Level::Ok, format!("{} free", hearth_types::format_size(free)), "")
        }
        Some(free) => check(
            "disk space",
            Level::Warn,
            format!(
                "{} free where the state directory lives; images and VM disks need room",
                hearth_types::format_size(free)
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
    out.push(thin_pool(f));
    out
}

/// Past this much use of its data or metadata, a thin pool is reported as filling up.
const POOL_WARN_PERCENT: f64 = 80.0;

fn thin_pool(f: &Facts) -> Check {
    const MAKE: &str =
        "hearth host provision --dev makes one on sparse files, --direct-lvm --disk DEV on a disk";
    match (&f.thin_pool, &f.configured_pool) {
        (None, None) => check("thin pool", Level::Info, "no device-mapper thin pool", MAKE),
        (None, Some((pool, config))) => check(
            "thin pool",
            Level::Fail,
            format!(
                "hearthd's config {} names the thin pool {pool}, which device-mapper does not have",
                config.display()
            ),
            format!("{MAKE} (a dev pool also comes back when hearthd starts)"),
        ),
        (Some((pool, usage)), configured) => {
            let mut c = pool_check(pool, usage);
            c.detail.push_str(match configured {
                Some((named, _)) if named == pool => " (hearthd's, from its config)",
                _ => " (hearthd uses it only with --thin-pool)",
            });
            c
        }
    }
}

/// The thin pool `pool`'s report: its use, a warning past 80% or when it is not writable or
/// needs a check (`hearth host check`, `hearth info`).
pub fn pool_check(pool: &str, usage: &Result<crate::PoolUsage, String>) -> Check {
    let name = "thin pool";
    match usage {
        Err(e) => {
            check(name, Level::Warn, format!("{pool}: {e}"), "see `dmsetup status` for the pool")
        }
        Ok(u) if u.needs_check || u.mode != "rw" => check(
            name,
            Level::Warn,
            format!(
                "{pool} is {}{}",
                u.mode,
                if u.needs_check { " and needs a metadata check" } else { "" }
            ),
            "run thin_check on its metadata (thin-provisioning-tools), or grow a full pool",
        ),
        Ok(u) => {
            let detail = format!(
                "{pool}: data {:.1}% used of {}, metadata {:.1}%",
                u.data_percent,
                hearth_types::format_size(u.data_bytes),
                u.metadata_percent
            );
            if u.data_percent.max(u.metadata_percent) >= POOL_WARN_PERCENT {
                check(
                    name,
                    Level::Warn,
                    format!("{detail}: filling up"),
                    "grow the pool or remove VMs and images",
                )
            } else {
                check(name, Level::Ok, detail, "")
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::facts::{PoolUsage, PROGRAMS};

    fn host() -> Facts {
        Facts {
            euid: 0,
            arch: "x86_64".into(),
            kvm_unusable: None,
            programs: PROGRAMS.iter().map(|p| (p.to_string(), Some(PathBuf::from("/usr/bin").join(p)))).collect(),
            versions: vec![("firecracker".into(), "Firecracker v1.16.1".into())],
            proc_modules: "tun 61440 0 - Live 0x0\nbridge 311296 0 - Live 0x0\n".into(),
            modules_builtin: "kernel/drivers/block/loop.ko\n".into(),
            modules_dep: "kernel/drivers/net/macvtap.ko: kernel/drivers/net/macvlan.ko\nkernel/drivers/md/dm-thin-pool.ko.xz: kernel/drivers/md/dm-bio-prison.ko\n".into(),
            modules_known: true,
            sys_modules: vec!["vhost_vsock".into()],
            sysctls: vec![("net.ipv4.ip_forward".into(), Some("1".into())), ("net.bridge.bridge-nf-call-iptables".into(), None)],
            device_nodes: vec![("/dev/net/tun".into(), true)],
            root_free: Some(50 << 30),
            reflink: Some(true),
            thin_pool: None,
            configured_pool: None,
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
    fn each_vmm_is_reported_with_its_version_and_whether_it_runs_guests_here() {
        let fc = find(&evaluate(&host()), "firecracker").clone();
        assert_eq!(fc.level, Level::Ok);
        assert!(
            fc.detail.contains("Firecracker v1.16.1") && fc.detail.contains("runs guests here"),
            "{fc:?}"
        );
        let nested = Facts { kvm_unusable: Some("no vmx".into()), ..host() };
        let checks = evaluate(&nested);
        let fc = find(&checks, "firecracker");
        assert!(
            fc.detail.contains("cannot run guests here: no vmx") && fc.fix.contains("--vmm qemu"),
            "{fc:?}"
        );
        let mut missing = host();
        missing.programs.retain(|(n, _)| n != "cloud-hypervisor");
        let ch = find(&evaluate(&missing), "cloud-hypervisor").clone();
        assert_eq!(ch.level, Level::Info);
        assert!(
            ch.detail.contains("--vmm cloud-hypervisor")
                && ch.fix.contains("HEARTH_CLOUD_HYPERVISOR"),
            "{ch:?}"
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

    #[test]
    fn the_thin_pool_is_reported_with_its_usage_and_warned_about_when_full_or_damaged() {
        let mut f = host();
        let c = find(&evaluate(&f), "thin pool").clone();
        assert_eq!(c.level, Level::Info);
        assert!(c.fix.contains("hearth host provision --dev"), "{c:?}");
        let usage = PoolUsage {
            data_percent: 12.5,
            metadata_percent: 1.0,
            data_bytes: 100 << 30,
            mode: "rw".into(),
            needs_check: false,
        };
        f.thin_pool = Some(("hearth-thinpool".into(), Ok(usage.clone())));
        let c = find(&evaluate(&f), "thin pool").clone();
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("12.5%") && c.detail.contains("100.0 GiB"), "{c:?}");
        assert!(c.detail.ends_with("(hearthd uses it only with --thin-pool)"), "{c:?}");
        // The pool hearthd's config names: said to be its, or a failure when it is missing.
        let config = std::path::PathBuf::from("/etc/hearth/hearthd.toml");
        f.configured_pool = Some(("hearth-thinpool".into(), config.clone()));
        let c = find(&evaluate(&f), "thin pool").clone();
        assert!(c.level == Level::Ok && c.detail.ends_with("(hearthd's, from its config)"));
        f.configured_pool = Some(("vg-thinpool".into(), config));
        f.thin_pool = None;
        let c = find(&evaluate(&f), "thin pool").clone();
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.detail.contains("/etc/hearth/hearthd.toml names the thin pool vg-thinpool")
                && c.fix.contains("hearth host provision --dev"),
            "{c:?}"
        );
        f.configured_pool = None;
        f.thin_pool = Some(("p".into(), Ok(PoolUsage { metadata_percent: 91.0, ..usage.clone() })));
        assert_eq!(find(&evaluate(&f), "thin pool").level, Level::Warn);
        f.thin_pool =
            Some(("p".into(), Ok(PoolUsage { mode: "out_of_data_space".into(), ..usage })));
        let c = find(&evaluate(&f), "thin pool").clone();
        assert!(c.level == Level::Warn && c.detail.contains("out_of_data_space"), "{c:?}");
        f.thin_pool = Some(("p".into(), Err("status unreadable".into())));
        assert_eq!(find(&evaluate(&f), "thin pool").level, Level::Warn);
    }
}
