//! Volumes that are not images: blank filesystems of a VM's own, and the host's files and block
//! devices a VM is given (`hearth run -v /dev/sdX:/data`, `-v /srv/data.img:/data:ro`).

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::{io_err, run_tool, tmp_path, StorageError};

/// Why a host path cannot be a volume.
#[derive(Debug, thiserror::Error)]
pub enum HostDiskError {
    #[error("{0} does not exist on the host: give an existing file or block device (make a file with `truncate -s 1G FILE && mkfs.ext4 FILE`)")]
    Missing(String),
    #[error("{0} is a directory: a volume is a disk (a file or block device); copy files in with `hearth cp`, or make an image of them and use --image-volume")]
    Directory(String),
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(String),
    #[error("{0} is empty: a volume needs a filesystem (mkfs.ext4 {0})")]
    Empty(String),
    #[error(
        "{0} is one of hearth's own files: give a file or device outside hearth's state directory"
    )]
    Hearths(String),
    #[error("{0} is in use on the host (mounted, or held by device-mapper, LVM or another program): unmount or release it first")]
    InUse(String),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Why a host directory cannot be shared with a VM.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{0} does not exist on the host: make the directory first")]
    Missing(String),
    #[error(
        "{0} is not a directory: share a directory, or attach a file or block device as a disk"
    )]
    NotADirectory(String),
    #[error("{0} is, or holds, hearth's state directory {1}, whose disks, keys and records no guest may see: share a directory outside it")]
    Hearths(String, String),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Checks that `path` can be shared with a VM: an existing directory that is neither inside
/// hearth's state directory `hearth_root` nor above it. Returns its canonical path (symlinks
/// resolved now: the share stays where it was checked).
pub fn check_share_dir(path: &Path, hearth_root: &Path) -> Result<std::path::PathBuf, ShareError> {
    let shown = path.display().to_string();
    let real = fs::canonicalize(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ShareError::Missing(shown.clone()),
        _ => ShareError::Io { path: shown.clone(), source: e },
    })?;
    if !real.is_dir() {
        return Err(ShareError::NotADirectory(shown));
    }
    if let Ok(root) = fs::canonicalize(hearth_root) {
        if real.starts_with(&root) || root.starts_with(&real) {
            return Err(ShareError::Hearths(shown, root.display().to_string()));
        }
    }
    Ok(real)
}

/// What names the disk at `path` whatever the path to it: a block device's number, or a file's
/// filesystem and inode.
pub fn host_disk_id(path: &Path) -> Option<String> {
    let m = fs::metadata(path).ok()?;
    Some(if m.file_type().is_block_device() {
        format!("block:{}", m.rdev())
    } else {
        format!("file:{}:{}", m.dev(), m.ino())
    })
}

/// Checks that `path` can be a VM's volume: a non-empty regular file or a block device, outside
/// hearth's state directory `hearth_root`, and for a device, not in use on the host (opened
/// exclusively for a moment: the kernel refuses that for a mounted device, a device-mapper
/// table's or an LVM volume group's). Returns its [`host_disk_id`].
pub fn check_host_disk(path: &Path, hearth_root: &Path) -> Result<String, HostDiskError> {
    let shown = path.display().to_string();
    let m = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => HostDiskError::Missing(shown.clone()),
        _ => HostDiskError::Io { path: shown.clone(), source: e },
    })?;
    let real = fs::canonicalize(path)
        .map_err(|source| HostDiskError::Io { path: shown.clone(), source })?;
    if fs::canonicalize(hearth_root).is_ok_and(|root| real.starts_with(root)) {
        return Err(HostDiskError::Hearths(shown));
    }
    let t = m.file_type();
    if t.is_dir() {
        return Err(HostDiskError::Directory(shown));
    }
    if t.is_block_device() {
        let busy = OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&real);
        match busy {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(HostDiskError::InUse(shown))
            }
            Err(source) => return Err(HostDiskError::Io { path: shown, source }),
            Ok(_) => {}
        }
    } else if !t.is_file() {
        return Err(HostDiskError::NotADisk(shown));
    } else if m.len() == 0 {
        return Err(HostDiskError::Empty(shown));
    }
    host_disk_id(path).ok_or(HostDiskError::Missing(path.display().to_string()))
}

/// Makes `dest`, a sparse file of `size` bytes holding an empty ext4 filesystem (no blocks
/// reserved for root: it is a data volume). Built beside it and linked into place, so `dest`
/// either does not exist or is whole, and a `dest` that exists already (a volume holding data)
/// is never replaced.
pub fn create_blank(dest: &Path, size: u64) -> Result<(), StorageError> {
    let tmp = tmp_path(dest);
    let made = (|| {
        let f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err(&tmp))?;
        f.set_len(size).map_err(io_err(&tmp))?;
        drop(f);
        run_tool(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"],
            &tmp,
            &[0],
        )?;
        fs::hard_link(&tmp, dest).map_err(io_err(dest))
    })();
    let _ = fs::remove_file(&tmp);
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_a_directory_away_from_hearths_state_kept_by_its_real_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (root, data) = (tmp.path().join("hearth"), tmp.path().join("data"));
        fs::create_dir_all(root.join("vms")).expect("root");
        fs::create_dir(&data).expect("data");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&data, &link).expect("symlink");
        let real = fs::canonicalize(&data).expect("real");
        assert_eq!(check_share_dir(&link, &root).expect("through a link"), real);
        assert!(matches!(check_share_dir(&root.join("vms"), &root), Err(ShareError::Hearths(..))));
        assert!(matches!(check_share_dir(tmp.path(), &root), Err(ShareError::Hearths(..))));
        assert!(matches!(
            check_share_dir(&tmp.path().join("nope"), &root),
            Err(ShareError::Missing(_))
        ));
        let file = tmp.path().join("f");
        fs::write(&file, b"x").expect("file");
        assert!(matches!(check_share_dir(&file, &root), Err(ShareError::NotADirectory(_))));
    }

    #[test]
    fn host_paths_that_are_not_disks_are_refused_by_what_they_are() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("hearth");
        fs::create_dir_all(root.join("vms/a")).expect("root");
        let own = root.join("vms/a/disk.img");
        fs::write(&own, b"disk").expect("own");
        let empty = dir.path().join("empty.img");
        fs::write(&empty, b"").expect("empty");
        let data = dir.path().join("data.img");
        fs::write(&data, vec![1u8; 4096]).expect("data");
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&data, &link).expect("link");
        let link_in = dir.path().join("into-hearth.img");
        std::os::unix::fs::symlink(&own, &link_in).expect("link");

        let check = |p: &Path| check_host_disk(p, &root);
        assert!(matches!(check(&dir.path().join("nope")), Err(HostDiskError::Missing(_))));
        assert!(matches!(check(dir.path()), Err(HostDiskError::Directory(_))));
        assert!(matches!(check(&empty), Err(HostDiskError::Empty(_))));
        assert!(matches!(check(&own), Err(HostDiskError::Hearths(_))));
        assert!(matches!(check(&link_in), Err(HostDiskError::Hearths(_))), "through a link too");
        assert!(matches!(check(Path::new("/dev/null")), Err(HostDiskError::NotADisk(_))));
        let id = check(&data).expect("a file");
        assert_eq!(check(&link).expect("its link"), id, "one disk, one identity");
        assert_eq!(host_disk_id(&data), Some(id));
        let e = check(&empty).expect_err("empty").to_string();
        assert!(e.contains("mkfs.ext4"), "{e}");
    }

    #[test]
    fn a_blank_volume_is_a_sparse_ext4_of_its_size_and_nothing_else_is_left() {
        if std::process::Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: mkfs.ext4 is not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("volume-0.img");
        create_blank(&dest, 256 << 20).expect("blank");
        let m = fs::metadata(&dest).expect("made");
        assert_eq!(m.len(), 256 << 20);
        assert!(m.blocks() * 512 < 64 << 20, "sparse: {} bytes allocated", m.blocks() * 512);
        let out = std::process::Command::new("dumpe2fs").arg("-h").arg(&dest).output();
        let text = String::from_utf8_lossy(&out.expect("dumpe2fs").stdout).into_owned();
        assert!(text.contains("Reserved block count:     0"), "{text}");
        let names: Vec<_> = fs::read_dir(dir.path()).expect("ls").flatten().collect();
        assert_eq!(names.len(), 1, "no temporary left: {names:?}");
        // A second make of a made volume is refused: it is never formatted again.
        let before = fs::metadata(&dest).expect("made").ino();
        assert!(create_blank(&dest, 256 << 20).is_err());
        assert_eq!(fs::metadata(&dest).expect("kept").ino(), before);
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
