//! Loop devices, through `/dev/loop-control` and the loop ioctls.
//!
//! - For a pool on files (`hearth host provision --dev`, [`attach`]): a file already attached is
//!   found again by its backing file in sysfs (so a second provision, or hearthd after a reboot,
//!   attaches nothing twice), else the first free device is configured with it.
//! - For a host file a jailed VMM opens as a block device ([`attach_held`]): a device of its own
//!   that detaches itself once the last descriptor to it closes (`LO_FLAGS_AUTOCLEAR`), so one a
//!   crash left behind cannot exist: the caller holds it until the VMM has opened it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
/// `sizeof(struct loop_config)`: fd, block size, `struct loop_info64` (232), 8 reserved u64.
const CONFIG: usize = 4 + 4 + 232 + 64;
/// Offset of `lo_flags` in `struct loop_config` (8 + its offset in `loop_info64`, 52).
const FLAGS_AT: usize = 8 + 52;
/// Offset of `lo_file_name` (64 bytes) in `struct loop_config`.
const NAME_AT: usize = 8 + 56;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// The loop device `file` is attached to, if any (`/sys/block/loopN/loop/backing_file`).
pub fn find(file: &Path) -> io::Result<Option<PathBuf>> {
    let file = std::fs::canonicalize(file)?;
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return Ok(None) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let backing =
            std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if Path::new(backing.trim_end_matches('\n')) == file {
            return Ok(Some(Path::new("/dev").join(name)));
        }
    }
    Ok(None)
}

/// Attaches `file` to a loop device (the one it is attached to already, if any), with direct
/// I/O so pages are not cached twice; returns the device.
pub fn attach(file: &Path) -> io::Result<PathBuf> {
    if let Some(dev) = find(file)? {
        return Ok(dev);
    }
    let backing = OpenOptions::new().read(true).write(true).open(file)?;
    configure_free(&backing, file, 0).map(|(dev, _)| dev)
}

/// Attaches `file` to a loop device of its own (read-only if asked) that detaches itself when
/// the returned descriptor and every later opener's are closed; returns the device and that
/// descriptor.
pub fn attach_held(file: &Path, read_only: bool) -> io::Result<(PathBuf, File)> {
    let backing = OpenOptions::new().read(true).write(!read_only).open(file)?;
    let flags = LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    configure_free(&backing, file, flags)
}

/// Configures the first free loop device with `backing` and `flags`; returns it, open.
fn configure_free(backing: &File, file: &Path, flags: u32) -> io::Result<(PathBuf, File)> {
    let control =
        OpenOptions::new().read(true).write(true).open("/dev/loop-control").map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("/dev/loop-control: {e} (load the loop module: modprobe loop)"),
            )
        })?;
    // Another attacher may take the free device first: then the configure fails with EBUSY
    // and the next free one is tried.
    for _ in 0..8 {
        let n = crate::ioctl_int(&control, LOOP_CTL_GET_FREE, 0)?;
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let f = open_node(&dev)?;
        match configure(&f, backing, file, flags) {
            Ok(()) => return Ok((dev, f)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dev.display()))),
        }
    }
    Err(io::Error::other("no free loop device stayed free"))
}

/// The loop device's node, waiting briefly for devtmpfs to make a new one.
fn open_node(dev: &Path) -> io::Result<File> {
    let mut tries = 0;
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn configure(dev: &File, backing: &File, path: &Path, flags: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let mut c = [0u8; CONFIG];
    c[0..4].copy_from_slice(&(backing.as_raw_fd() as u32).to_ne_bytes());
    c[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&(flags | LO_FLAGS_DIRECT_IO).to_ne_bytes());
    let name = path.as_os_str().as_bytes();
    let n = name.len().min(63);
    c[NAME_AT..NAME_AT + n].copy_from_slice(&name[..n]);
    match crate::ioctl_buf(dev, LOOP_CONFIGURE, &mut c) {
        // Direct I/O needs the file's filesystem to support it; without, plain buffered I/O.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            c[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&flags.to_ne_bytes());
            crate::ioctl_buf(dev, LOOP_CONFIGURE, &mut c).map(drop)
        }
        other => other.map(drop),
    }
}

/// Detaches the loop device `dev` from its file; `Ok(false)` when it had none.
pub fn detach(dev: &Path) -> io::Result<bool> {
    let f = OpenOptions::new().read(true).open(dev)?;
    match crate::ioctl_int(&f, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_layout_matches_the_kernels() {
        // struct loop_config is 304 bytes; lo_flags sits 52 bytes into loop_info64, after five
        // u64s and three u32s, and lo_file_name right after it.
        assert_eq!(CONFIG, 304);
        assert_eq!(FLAGS_AT, 8 + 5 * 8 + 3 * 4);
        assert_eq!(NAME_AT, FLAGS_AT + 4);
    }

    #[test]
    fn a_file_attached_nowhere_is_found_nowhere() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("data");
        std::fs::write(&f, b"").expect("write");
        assert_eq!(find(&f).expect("find"), None);
    }
}
