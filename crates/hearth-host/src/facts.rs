//! What the checks read, gathered once from the host.

use std::path::{Path, PathBuf};

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
    /// The first line each installed VMM prints for `--version`, by program name.
    pub versions: Vec<(String, String)>,
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
    /// hearth's device-mapper thin pool, when it exists (filled by the caller, which speaks
    /// device-mapper): its name and usage, or why its usage could not be read.
    pub thin_pool: Option<(String, Result<PoolUsage, String>)>,
    /// The thin pool hearthd's config file names (`thin-pool`), and that file.
    pub configured_pool: Option<(String, std::path::PathBuf)>,
}

pub use hearth_types::size::PoolUsage;

pub(crate) const PROGRAMS: [&str; 7] = [
    "qemu-system-x86_64",
    "mkfs.ext4",
    "resize2fs",
    "nft",
    "firecracker",
    "cloud-hypervisor",
    "virtiofsd",
];
/// The VMMs whose versions are reported.
pub(crate) const VMMS: [&str; 3] = ["qemu-system-x86_64", "firecracker", "cloud-hypervisor"];
const SYSCTLS: [&str; 2] = ["net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"];
const DEVICES: [&str; 3] = ["/dev/net/tun", "/dev/vhost-vsock", "/dev/vhost-net"];

impl Facts {
    /// Reads this host. The probes that need a VMM's or the storage's own knowledge come from
    /// the caller: why KVM cannot run guests (`None`: it can), and whether a directory clones
    /// by reflink (asked only of an existing state directory, as probing writes scratch files).
    pub fn probe(
        root: &Path,
        kvm_unusable: Option<String>,
        reflink: impl FnOnce(&Path) -> Option<bool>,
    ) -> Self {
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
            kvm_unusable,
            programs: PROGRAMS.iter().map(|p| (p.to_string(), which(p))).collect(),
            versions: VMMS
                .iter()
                .filter_map(|p| Some((p.to_string(), version(&which(p)?)?)))
                .collect(),
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
            reflink: if root.is_dir() { reflink(root) } else { None },
            thin_pool: None,
            configured_pool: None,
        }
    }

    pub(crate) fn program(&self, name: &str) -> Option<&PathBuf> {
        self.programs.iter().find(|(n, _)| n == name).and_then(|(_, p)| p.as_ref())
    }

    pub(crate) fn version(&self, name: &str) -> Option<&str> {
        self.versions.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn sysctl(&self, name: &str) -> Option<&str> {
        self.sysctls.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    pub(crate) fn device(&self, path: &str) -> bool {
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

/// The first line `binary --version` prints, bounded (a VMM is asked, not trusted).
fn version(binary: &Path) -> Option<String> {
    let out = std::process::Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(120).collect())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        // Where distributions put helpers (Debian's virtiofsd) outside PATH.
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/libexec".into(), "/usr/lib/qemu".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
