//! Fixtures for tests against a real KVM-only VMM binary (Firecracker, Cloud Hypervisor): why
//! such a test cannot run here, a VM directory with Debian's kernel and dummy disks, and a
//! network namespace with a tap, so no test touches the host's own network.

use std::path::Path;
use std::process::Command;

use hearth_core::ports::LaunchSpec;
use hearth_types::Accel;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether `binary --version` runs.
pub fn runs(binary: &str) -> bool {
    Command::new(binary).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Why a test of `binary` against KVM cannot run here; `None` when it can.
pub fn skip_reason(binary: &str) -> Option<String> {
    if !is_root() {
        Some(format!("not root ({binary} needs /dev/kvm and hearth's VM directories)"))
    } else if !Path::new("/dev/kvm").exists() {
        Some("no /dev/kvm".into())
    } else if !runs(binary) {
        Some(format!("{binary} is not on PATH (.ci/run puts ../shared/vmm/bin there)"))
    } else if std::env::var_os("HEARTH_TEST_KERNEL").is_none() {
        Some("HEARTH_TEST_KERNEL is not set (cargo xtask kernel fetches one)".into())
    } else {
        None
    }
}

/// A VM directory for `binary` with the test kernel (as `kernel` makes it from Debian's
/// bzImage), an initramfs that is not a valid cpio (the kernel says so after its first lines,
/// which is all these tests need) and zeroed disks; `None`, saying why, where it cannot run.
pub fn vm_dir(
    binary: &str,
    kernel: impl FnOnce(&[u8]) -> Vec<u8>,
    extra_cmdline: &str,
) -> Option<(tempfile::TempDir, LaunchSpec)> {
    if let Some(why) = skip_reason(binary) {
        eprintln!("skipped: {why}");
        return None;
    }
    let bz = std::fs::read(std::env::var_os("HEARTH_TEST_KERNEL")?).expect("kernel");
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("kernel"), kernel(&bz)).expect("kernel");
    std::fs::write(d.join("initrd.img"), vec![0u8; 4096]).expect("initrd");
    std::fs::write(d.join("disk.img"), vec![0u8; 1 << 20]).expect("disk");
    std::fs::write(d.join("config.img"), vec![0u8; 1 << 20]).expect("config");
    let spec = LaunchSpec {
        kernel: d.join("kernel"),
        cmdline: extra_cmdline.into(),
        memory_mib: 256,
        accel: Accel::Auto,
        ..crate::launch_spec(d)
    };
    Some((dir, spec))
}

/// A network namespace of the test's own with a tap in it, removed when dropped.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// A namespace of its own holding the tap `tap`; `None` where namespaces or taps cannot be
    /// made.
    pub fn with_tap(prefix: &str, tap: &str) -> Option<Self> {
        Self::with_taps(prefix, &[tap])
    }

    /// A namespace of its own holding the taps `taps`.
    pub fn with_taps(prefix: &str, taps: &[&str]) -> Option<Self> {
        let name = format!("{prefix}-{}", std::process::id());
        let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Self(name);
        (taps.iter())
            .all(|tap| ok(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]))
            .then_some(ns)
    }

    /// An executable in `dir` that runs `binary` inside the namespace, where its tap is.
    pub fn wrapper(&self, dir: &Path, binary: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{binary}-in-netns"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexec ip netns exec {} {binary} \"$@\"\n", self.0),
        )
        .expect("wrapper");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        path
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

/// The cgroup filesystems a VMM's group may be in (cgroup v1's controllers, or v2's root).
const CGROUP_MOUNTS: [&str; 4] =
    ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"];

/// Asserts that the VMM `pid` runs as `uid` (its gid the same) with no capabilities, chrooted
/// in `root` (compared as the same directory, by device and inode: a root pivoted to in a mount
/// namespace of its own shows as "/" in /proc), in the cgroup `group` with a memory limit of
/// `memory` bytes. Returns its /proc status.
pub fn assert_confined(pid: i32, uid: u32, root: &Path, group: &str, memory: u64) -> String {
    use std::os::unix::fs::MetadataExt;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |key: &str| {
        status.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_owned())
    };
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(field("Uid:"), Some(ids.clone()), "{status}");
    assert_eq!(field("Gid:"), Some(ids), "{status}");
    assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"), "{status}");
    let (seen, made) = (
        std::fs::metadata(format!("/proc/{pid}/root/")).expect("its root"),
        std::fs::metadata(root).expect("chroot"),
    );
    assert_eq!((seen.dev(), seen.ino()), (made.dev(), made.ino()), "chrooted in {root:?}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cgroups.lines().any(|l| l.ends_with(&format!("/{group}"))), "{cgroups}");
    let limit = CGROUP_MOUNTS
        .iter()
        .map(|m| Path::new(m).join(group))
        .find_map(|d| {
            std::fs::read_to_string(d.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(d.join("memory.max")))
                .ok()
        })
        .expect("memory limit");
    assert_eq!(limit.trim(), memory.to_string());
    status
}

/// Asserts that no cgroup filesystem has `group` any more (removing the test's parent group
/// where it is left empty).
pub fn assert_cgroup_gone(group: &str) {
    for m in CGROUP_MOUNTS {
        assert!(!Path::new(m).join(group).exists(), "cgroup {group} left in {m}");
    }
    if let Some((parent, _)) = group.split_once('/') {
        for m in CGROUP_MOUNTS {
            let _ = std::fs::remove_dir(Path::new(m).join(parent));
        }
    }
}

/// Host volumes for a jailed VMM, in `dir`: a file of another user's (uid 4321, mode 0640,
/// known bytes) to attach writable, and a block device (a loop device on a second file,
/// detached on drop) to attach read-only.
#[derive(Debug)]
pub struct HostVolumes {
    pub file: std::path::PathBuf,
    pub device: std::path::PathBuf,
}

impl HostVolumes {
    pub fn new(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join("user-data.img");
        std::fs::write(&file, vec![7u8; 1 << 20]).expect("host file");
        std::os::unix::fs::chown(&file, Some(4321), Some(4321)).expect("chown");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let backing = dir.join("device-backing.img");
        std::fs::write(&backing, vec![0u8; 1 << 20]).expect("device backing");
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output();
        let out = out.expect("losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = String::from_utf8_lossy(&out.stdout).trim().into();
        Self { file, device }
    }

    /// The volumes as a launch takes them: the file writable, the device read-only.
    pub fn disks(&self) -> Vec<hearth_core::ports::VolumeDisk> {
        [(&self.file, false), (&self.device, true)]
            .into_iter()
            .enumerate()
            .map(|(i, (path, read_only))| hearth_core::ports::VolumeDisk {
                path: path.clone(),
                serial: hearth_types::guest::volume_serial(i),
                read_only,
                host: true,
                share: false,
            })
            .collect()
    }

    /// The host's file kept its owner, mode and content; in the chroot `root`, each volume is
    /// a block device node of the VM's `uid` (the file's through a loop device backed by it).
    pub fn assert_in_jail(&self, root: &Path, uid: u32) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        self.assert_untouched();
        for i in 0..2 {
            let at = root.join(format!("volume-{i}.img"));
            let m = std::fs::symlink_metadata(&at).expect("volume node");
            assert!(m.file_type().is_block_device(), "{at:?} is a block device node");
            assert_eq!(m.uid(), uid, "{at:?} is the VM's");
        }
        let device = std::fs::metadata(&self.device).expect("device").rdev();
        let node = std::fs::metadata(root.join("volume-1.img")).expect("node").rdev();
        assert_eq!(node, device, "the host's device itself");
        assert!(self.loop_of_file().is_some(), "a loop device backs the host file meanwhile");
    }

    pub fn assert_untouched(&self) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.file).expect("host file");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4321, 4321, 0o640), "owner and mode");
        let bytes = std::fs::read(&self.file).expect("read");
        assert!(bytes.len() == 1 << 20 && bytes.iter().all(|&b| b == 7), "content");
    }

    /// Once the VMM is gone, no loop device is left on the host file.
    pub fn assert_released(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.loop_of_file().is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(self.loop_of_file(), None, "the host file's loop device detached itself");
        self.assert_untouched();
    }

    fn loop_of_file(&self) -> Option<std::path::PathBuf> {
        hearth_fs::loopdev::find(&self.file).ok().flatten()
    }
}

impl Drop for HostVolumes {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Held by a test while its guest runs: under this machine kind's nested KVM a guest shows its
/// first console lines after about 20 s alone, and far later beside another on two cores, so
/// the tests of one binary boot their guests one at a time.
pub async fn one_guest_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static GUESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    GUESTS.lock().await
}
