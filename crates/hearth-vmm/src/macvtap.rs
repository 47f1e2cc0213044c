//! A macvtap's character device, opened for the VMM that is handed it (QEMU inherits it,
//! Cloud Hypervisor is sent it over its API socket). The node is checked against what sysfs
//! says the macvtap's device is, so a node that is not the macvtap's is never opened.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::VmmError;

/// Opens `/dev/tapN` of the macvtap `name` (N its interface index), read-write.
pub fn open(name: &str) -> Result<File, VmmError> {
    let sys = Path::new("/sys/class/net").join(name);
    let fail = |what: String| VmmError::Control { api: "macvtap", message: what };
    let index = std::fs::read_to_string(sys.join("ifindex"))
        .map_err(|e| fail(format!("the macvtap {name} is not there ({e})")))?;
    let index = index.trim();
    let want = std::fs::read_to_string(sys.join("macvtap").join(format!("tap{index}")).join("dev"))
        .map_err(|e| fail(format!("{name} is not a macvtap ({e})")))?;
    let node = PathBuf::from(format!("/dev/tap{index}"));
    let m =
        std::fs::metadata(&node).map_err(|source| VmmError::Io { path: node.clone(), source })?;
    let seen = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
    if !m.file_type().is_char_device() || seen != want.trim() {
        return Err(fail(format!("{} is not {name}'s device ({})", node.display(), want.trim())));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .map_err(|source| VmmError::Io { path: node, source })
}
