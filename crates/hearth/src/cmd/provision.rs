//! `hearth host provision --all`: what Flintlock's provision.sh does for a whole host, natively
//! and idempotently: the packages hearth needs (apt, on Debian and Ubuntu), the kernel modules
//! loaded now and at boot (/etc/modules-load.d), the sysctls now and at boot (/etc/sysctl.d),
//! the thin pool (on files, or on `--disk` through LVM), the bridge network, hearthd's config
//! file with the options given, and a systemd unit for it, enabled and started where systemd
//! runs. Every step says what it did, or with `--dry-run` what it would do; a second run does
//! nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// What `--all` is asked for beyond the storage.
#[derive(Debug, Clone, Default)]
pub struct Service {
    pub root: PathBuf,
    pub thin_pool: String,
    pub grpc_address: Option<String>,
    pub parent_iface: Option<String>,
    pub insecure: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub network: bool,
    pub bridge: String,
}

pub const CONFIG: &str = "/etc/hearth/hearthd.toml";
pub const UNIT: &str = "/etc/systemd/system/hearthd.service";
const MODULES_FILE: &str = "/etc/modules-load.d/hearth.conf";
const SYSCTL_FILE: &str = "/etc/sysctl.d/90-hearth.conf";
const SYSCTLS: [(&str, &str); 1] = [("net.ipv4.ip_forward", "1")];

/// One step's outcome line: `did ...` or, on a dry run, `would ...`.
fn say(dry: bool, step: &str) {
    println!("{} {step}", if dry { "would" } else { "did" });
}

/// The packages of programs hearth runs that are not installed: (program, Debian package).
fn missing_packages(lvm: bool) -> Vec<(&'static str, &'static str)> {
    let mut want = vec![
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
        ("nft", "nftables"),
    ];
    if lvm {
        want.extend([("lvm", "lvm2"), ("thin_check", "thin-provisioning-tools")]);
    }
    want.into_iter()
        .filter(|(bin, _)| hearth_vmm::jail::on_path(Path::new(bin)).is_none())
        .collect()
}

/// Whether this is Debian or a relative (Ubuntu), whose packages `apt-get` installs.
fn debian_like() -> bool {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
            && (l.contains("debian") || l.contains("ubuntu"))
    })
}

pub fn packages(dry: bool, lvm: bool) -> anyhow::Result<()> {
    let missing = missing_packages(lvm);
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    if !debian_like() {
        println!(
            "skipped installing {}: not a Debian or Ubuntu host; install them with its package manager",
            names.join(", ")
        );
        return Ok(());
    }
    say(dry, &format!("install the packages {} (apt-get)", names.join(", ")));
    if !dry {
        // The package lists may be old or missing (a fresh host, an image's build): as
        // provision.sh does, update them first; a failed update still lets the install try.
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !updated.success() {
            eprintln!("hearth: warning: apt-get update failed ({updated}); installing from the lists there are");
        }
        let st = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        anyhow::ensure!(st.success(), "apt-get install {} failed ({st})", names.join(" "));
    }
    Ok(())
}

/// The modules loaded now (natively) and listed for loading at boot.
pub fn modules(dry: bool, s: &Service) -> anyhow::Result<()> {
    let mut names = vec!["loop", "dm_thin_pool"];
    if s.network {
        names.extend(["tun", "bridge"]);
    }
    if s.parent_iface.is_some() {
        names.push("macvtap");
    }
    let absent: Vec<&str> =
        names.iter().copied().filter(|m| !hearth_kernel::kmod::present(m)).collect();
    if !absent.is_empty() {
        say(dry, &format!("load the kernel modules {}", absent.join(", ")));
        if !dry {
            hearth_kernel::kmod::load(&hearth_kernel::kmod::tree(), &absent)
                .map_err(anyhow::Error::msg)?;
        }
    }
    let text =
        format!("# Kernel modules hearth needs (hearth host provision).\n{}\n", names.join("\n"));
    file(dry, Path::new(MODULES_FILE), &text, 0o644)
}

/// The sysctls set now and at boot.
pub fn sysctls(dry: bool) -> anyhow::Result<()> {
    let mut text = String::from("# hearth host provision: bridged VMs reach beyond the host.\n");
    for (key, value) in SYSCTLS {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value) {
            say(dry, &format!("set {key} = {value}"));
            if !dry {
                std::fs::write(&path, value).with_context(|| format!("setting {key}"))?;
            }
        }
        text.push_str(&format!("{key} = {value}\n"));
    }
    file(dry, Path::new(SYSCTL_FILE), &text, 0o644)
}

/// hearthd's config file for what was asked.
pub fn config_text(s: &Service) -> String {
    let q = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut t = String::from(
        "# hearthd's settings (hearth host provision); each key is one of `hearthd --help`'s flags.\n",
    );
    t.push_str(&format!("root = {}\n", q(&s.root.display().to_string())));
    t.push_str(&format!("thin-pool = {}\n", q(&s.thin_pool)));
    if let Some(a) = &s.grpc_address {
        t.push_str(&format!("flintlock-listen = {}\n", q(a)));
    }
    if s.insecure {
        t.push_str("insecure = true\n");
    }
    for (key, path) in
        [("tls-cert", &s.tls_cert), ("tls-key", &s.tls_key), ("tls-client-ca", &s.tls_client_ca)]
    {
        if let Some(p) = path {
            t.push_str(&format!("{key} = {}\n", q(&p.display().to_string())));
        }
    }
    if s.tls_client_ca.is_some() {
        // A client CA asked for is mutual TLS: every client presents a certificate it signed.
        t.push_str("tls-client-validate = true\n");
    }
    if let Some(i) = &s.parent_iface {
        t.push_str(&format!("parent-iface = {}\n", q(i)));
    }
    if !s.bridge.is_empty() && s.bridge != hearth_types::net::BRIDGE_NAME {
        t.push_str(&format!("bridge-name = {}\n", q(&s.bridge)));
    }
    t
}

/// The systemd unit that runs `hearthd` with the config file.
pub fn unit_text(hearthd: &Path) -> String {
    format!(
        "[Unit]\nDescription=hearth microVM host daemon (Flintlock API)\nAfter=network-online.target lvm2-activation.service\nWants=network-online.target\n\n[Service]\nExecStart={} --config {CONFIG}\nRestart=always\nRestartSec=2\nKillMode=process\nDelegate=yes\nLimitNOFILE=1048576\n\n[Install]\nWantedBy=multi-user.target\n",
        hearthd.display()
    )
}

/// Writes `path` with `text` unless it holds that already; says so.
pub fn file(dry: bool, path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    say(dry, &format!("write {}", path.display()));
    if !dry {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        hearth_fs::atomic_write(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The service: its config and unit written, then enabled and (re)started where systemd runs.
pub fn service(dry: bool, s: &Service, hearthd: &Path) -> anyhow::Result<()> {
    let (config, unit) = (config_text(s), unit_text(hearthd));
    let changed = std::fs::read_to_string(CONFIG).ok().as_deref() != Some(config.as_str())
        || std::fs::read_to_string(UNIT).ok().as_deref() != Some(unit.as_str());
    file(dry, Path::new(CONFIG), &config, 0o600)?;
    file(dry, Path::new(UNIT), &unit, 0o644)?;
    if !Path::new("/run/systemd/system").is_dir() {
        println!(
            "skipped starting hearthd: systemd is not running here; run `{} --config {CONFIG}`",
            hearthd.display()
        );
        return Ok(());
    }
    let systemctl = |args: &[&str]| -> anyhow::Result<bool> {
        let st = Command::new("systemctl").args(args).status().context("running systemctl")?;
        Ok(st.success())
    };
    let running = systemctl(&["--quiet", "is-active", "hearthd"])?
        && systemctl(&["--quiet", "is-enabled", "hearthd"])?;
    if running && !changed {
        return Ok(());
    }
    say(dry, "enable and (re)start the hearthd service (systemctl)");
    if !dry {
        for args in [&["daemon-reload"][..], &["enable", "hearthd"], &["restart", "hearthd"]] {
            anyhow::ensure!(systemctl(args)?, "systemctl {} failed", args.join(" "));
        }
    }
    Ok(())
}

/// hearthd beside this `hearth`, else on PATH.
pub fn hearthd_binary() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("hearthd")));
    beside
        .filter(|p| p.is_file())
        .or_else(|| hearth_vmm::jail::on_path(Path::new("hearthd")))
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/hearthd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_says_what_was_asked_in_hearthds_own_flags() {
        let s = Service {
            root: "/var/lib/hearth".into(),
            thin_pool: "hearth-thinpool".into(),
            grpc_address: Some("0.0.0.0:9090".into()),
            parent_iface: Some("eth0".into()),
            tls_cert: Some("/etc/hearth/tls/\"odd\".pem".into()),
            tls_client_ca: Some("/etc/hearth/tls/clients.pem".into()),
            bridge: "br-vms".into(),
            ..Default::default()
        };
        let text = config_text(&s);
        let table: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(table["thin-pool"].as_str(), Some("hearth-thinpool"));
        assert_eq!(table["flintlock-listen"].as_str(), Some("0.0.0.0:9090"));
        assert_eq!(table["parent-iface"].as_str(), Some("eth0"));
        assert_eq!(table["bridge-name"].as_str(), Some("br-vms"));
        assert_eq!(table["tls-cert"].as_str(), Some("/etc/hearth/tls/\"odd\".pem"));
        assert!(!table.contains_key("insecure"));
        assert_eq!(table["tls-client-ca"].as_str(), Some("/etc/hearth/tls/clients.pem"));
        assert_eq!(table["tls-client-validate"].as_bool(), Some(true), "a client CA is mutual TLS");
        let unit = unit_text(Path::new("/usr/local/bin/hearthd"));
        assert!(unit.contains("ExecStart=/usr/local/bin/hearthd --config /etc/hearth/hearthd.toml"));
    }
}
