//! Early boot: API filesystems, modules, finding the disks, switching to the root disk.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hearth_types::guest::{decode_record, CONFIG_MAGIC, MAX_RECORD, ROOT_SERIAL};
use hearth_types::{GuestConfig, GuestVolume};

use crate::sys;

pub fn mount_early() -> Result<(), String> {
    for (src, target, fs) in
        [("devtmpfs", "/dev", "devtmpfs"), ("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs")]
    {
        let _ = fs::create_dir_all(target);
        if let Err(e) = sys::mount(src, target, fs, 0, "") {
            // devtmpfs may already be mounted by the kernel.
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(format!("mounting {target}: {e}"));
            }
        }
    }
    Ok(())
}

/// Loads the modules listed in /hearth/modules, in order.
pub fn load_modules() {
    let list = fs::read_to_string("/hearth/modules").unwrap_or_default();
    for path in list.lines().filter(|l| !l.is_empty()) {
        let res = File::open(path).and_then(|f| sys::finit_module(&f));
        if let Err(e) = res {
            if e.raw_os_error() != Some(libc::EEXIST) {
                eprintln!("hearth-init: loading {path}: {e}");
            }
        }
    }
}

fn virtio_disks() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A virtio disk's serial, empty when it has none.
fn serial(dev: &str) -> String {
    fs::read_to_string(format!("/sys/block/{dev}/serial"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// How long the virtio disks get to appear.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// Opens `dev` and reads its config record if it is the config disk.
fn probe_config(dev: &str) -> Result<Option<(File, GuestConfig)>, String> {
    let path = format!("/dev/{dev}");
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(&path) else { return Ok(None) };
    let mut head = [0u8; 8];
    if f.read_exact(&mut head).is_err() || &head != CONFIG_MAGIC {
        return Ok(None);
    }
    let mut buf = vec![0u8; MAX_RECORD + 12];
    let n = f.read_at(&mut buf, 0).map_err(|e| format!("reading the config disk {path}: {e}"))?;
    match decode_record(CONFIG_MAGIC, &buf[..n]) {
        Ok(cfg) => Ok(Some((f, cfg))),
        Err(e) => Err(format!("the config disk {path} is unreadable ({e}): recreate the VM")),
    }
}

/// Waits for the virtio disks, identifies the config disk by its magic and the root disk as the
/// first other one. The config disk lands in `config_disk` as soon as it is found, so even a
/// missing root disk gets an exit record. Returns the config and the root disk's name.
pub fn find_disks(config_disk: &mut Option<File>) -> Result<(GuestConfig, String), String> {
    let deadline = Instant::now() + DISK_WAIT;
    let mut found: Option<(String, GuestConfig)> = None;
    loop {
        let disks = virtio_disks();
        if found.is_none() {
            for d in &disks {
                if let Some((f, cfg)) = probe_config(d)? {
                    *config_disk = Some(f);
                    found = Some((d.clone(), cfg));
                    break;
                }
            }
        }
        if let Some((cdev, _)) = &found {
            // The root disk by its serial; a VMM that sets none: the first disk that is neither
            // the config disk nor a volume.
            let others: Vec<&String> = disks.iter().filter(|d| *d != cdev).collect();
            let root = others
                .iter()
                .find(|d| serial(d) == ROOT_SERIAL)
                .or_else(|| others.iter().find(|d| !serial(d).starts_with("hearth_vol")));
            if let Some(root) = root {
                let root = (*root).clone();
                let cfg = found.map(|(_, c)| c).unwrap_or_default();
                return Ok((cfg, root));
            }
        }
        if Instant::now() > deadline {
            return Err(match found {
                Some(_) => format!(
                    "no root disk appeared within {DISK_WAIT:?} (virtio disks: {disks:?}): attach the root disk as a virtio block device"
                ),
                None => format!(
                    "no config disk appeared within {DISK_WAIT:?} (virtio disks: {disks:?}): attach config.img as a virtio block device"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mounts each volume (an ext4 disk found by its serial) at its mount point. A volume that
/// cannot be mounted is reported on the console; the VM boots without it.
pub fn mount_volumes(volumes: &[GuestVolume]) {
    for v in volumes {
        let flags = if v.read_only { libc::MS_RDONLY } else { 0 };
        if v.share {
            // A shared directory: virtio-fs, by its tag (the device is there at boot).
            let res =
                fs::create_dir_all(&v.mount_point).map_err(|e| e.to_string()).and_then(|()| {
                    sys::mount(&v.serial, &v.mount_point, "virtiofs", flags, "")
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = res {
                eprintln!(
                    "hearth-init: mounting shared directory {} on {}: {e}",
                    v.serial, v.mount_point
                );
            }
            continue;
        }
        let deadline = Instant::now() + DISK_WAIT;
        let dev = loop {
            if let Some(d) = virtio_disks().into_iter().find(|d| serial(d) == v.serial) {
                break Some(d);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let Some(dev) = dev else {
            eprintln!(
                "hearth-init: volume {} did not appear; {} is not mounted",
                v.serial, v.mount_point
            );
            continue;
        };
        let res = fs::create_dir_all(&v.mount_point)
            .map_err(|e| e.to_string())
            .and_then(|()| mount_any(&format!("/dev/{dev}"), &v.mount_point, flags));
        if let Err(e) = res {
            eprintln!("hearth-init: mounting volume /dev/{dev} on {}: {e}", v.mount_point);
        }
    }
}

/// Mounts `dev` with the first filesystem type the kernel has that takes it, ext4 first, as
/// mount(8) does without `-t` (a host volume may hold any filesystem).
fn mount_any(dev: &str, at: &str, flags: libc::c_ulong) -> Result<(), String> {
    let listed = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut types = vec!["ext4"];
    types.extend(block_filesystems(&listed).filter(|t| *t != "ext4"));
    let mut last = String::new();
    for t in types {
        match sys::mount(dev, at, t, flags, "") {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("{t}: {e}"),
        }
    }
    Err(format!("no filesystem of this kernel takes it (last: {last}); is it formatted?"))
}

/// The filesystem types in /proc/filesystems that need a device (not the `nodev` ones).
fn block_filesystems(listed: &str) -> impl Iterator<Item = &str> {
    listed.lines().filter(|l| !l.starts_with("nodev")).map(str::trim).filter(|t| !t.is_empty())
}

/// Mounts the root disk and makes it `/`, carrying /dev, /proc and /sys over.
pub fn switch_root(root_dev: &str) -> Result<(), String> {
    let newroot = "/newroot";
    // The modules are loaded: give their initramfs copies' memory back (the rootfs cannot be
    // unmounted, so whatever stays on it stays in RAM).
    let _ = fs::remove_dir_all("/lib/modules");
    let _ = fs::remove_file("/hearth/modules");
    let _ = fs::create_dir_all(newroot);
    sys::mount(&format!("/dev/{root_dev}"), newroot, "ext4", 0, "")
        .map_err(|e| format!("mounting the root disk /dev/{root_dev}: {e}"))?;
    for d in ["dev", "proc", "sys"] {
        let target = format!("{newroot}/{d}");
        let _ = fs::create_dir_all(&target);
        sys::mount(&format!("/{d}"), &target, "", libc::MS_MOVE, "")
            .map_err(|e| format!("moving /{d}: {e}"))?;
    }
    std::env::set_current_dir(newroot).map_err(|e| format!("chdir {newroot}: {e}"))?;
    sys::mount(".", "/", "", libc::MS_MOVE, "").map_err(|e| format!("moving the root: {e}"))?;
    sys::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// The mounts a workload expects beyond /dev, /proc, /sys.
pub fn mount_late() {
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 4] = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        ("shm", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("mqueue", "/dev/mqueue", "mqueue", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""),
    ];
    for (src, target, fs, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        if let Err(e) = sys::mount(src, target, fs, flags, data) {
            eprintln!("hearth-init: mounting {target}: {e}");
        }
    }
    if !Path::new("/dev/ptmx").exists() || fs::read_link("/dev/ptmx").is_err() {
        let _ = fs::remove_file("/dev/ptmx");
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_filesystems_on_devices_are_tried() {
        let listed = "nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text4\n\txfs\nnodev\toverlay\n\tvfat\n";
        let types: Vec<_> = super::block_filesystems(listed).collect();
        assert_eq!(types, ["ext3", "ext4", "xfs", "vfat"]);
    }
}
