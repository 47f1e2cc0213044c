//! Filesystem and process primitives every hearth adapter shares, each written once:
//!
//! - [`atomic_write`]: readers see the old content or the new, never a mix; the temporary is
//!   named per attempt ([`temp_beside`]), so a writer a dead daemon left behind never renames
//!   over the next attempt's file.
//! - [`resolve_in_root`]: a path inside an untrusted tree (an unpacked image) resolved as if the
//!   tree were `/`: symbolic links are followed, but never out of it.
//! - [`die_with_parent`]: a tool started for a build dies with the thread that started it.
//! - [`loopdev`]: loop devices, for a pool on files and for host files a jailed VMM opens.
//!
//! A base crate like hearth-types: it depends on no other hearth crate, and every layer may use it.
#![deny(unsafe_code)]

// The only module with raw system calls (the crate denies unsafe code everywhere else).
pub mod elf;
pub mod loopdev;
#[allow(unsafe_code)]
mod sys;
mod tree;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use sys::{default_sigpipe, die_with_parent, ioctl_buf, ioctl_int};
pub use tree::{open_in_root, resolve_in_root};

/// A temporary name beside `path`, unique to this attempt: `.NAME.<random>.tmp`.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()))
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix, and a
/// crash leaves one of the two: a per-attempt temporary, fsynced, renamed over `path`, and the
/// directory fsynced. On error nothing is left behind.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = temp_beside(path);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_and_leaves_no_temporary() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("record.json");
        atomic_write(&p, b"one").expect("write");
        atomic_write(&p, b"two").expect("overwrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(t.path()).expect("dir").count(), 1);
        let e = atomic_write(&t.path().join("missing/x"), b"x").expect_err("no directory");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn temporaries_are_per_attempt_and_hidden() {
        let p = Path::new("/r/vms/a/disk.img");
        let (a, b) = (temp_beside(p), temp_beside(p));
        assert_ne!(a, b);
        let name = a.file_name().expect("name").to_string_lossy().into_owned();
        assert!(name.starts_with(".disk.img.") && name.ends_with(".tmp"), "{name}");
        assert_eq!(a.parent(), p.parent());
    }
}
