//! Building the base ext4 with e2fsprogs' `mkfs.ext4 -d`.

use std::fs;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::ImageError;

/// Wraps a layer stream in the right decompressor, by its magic bytes.
pub fn decompress<'a, R: BufRead + 'a>(mut r: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r)?))
    } else {
        Ok(Box::new(r))
    }
}

/// Bytes and inodes under `dir` (hard links counted once).
fn usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// Makes the directories the guest init mounts on, when the image lacks them.
fn ensure_mount_points(dir: &Path) -> Result<(), ImageError> {
    for (d, mode) in [("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777)] {
        let p = dir.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p)
                .and_then(|_| fs::set_permissions(&p, fs::Permissions::from_mode(mode)))
                .map_err(|source| ImageError::Io { path: p, source })?;
        }
    }
    Ok(())
}

/// `mkfs.ext4 -d staging` into `out`, sized to the content plus headroom; atomic.
pub fn build_ext4(staging: &Path, out: &Path) -> Result<(), ImageError> {
    ensure_mount_points(staging)?;
    let (bytes, inodes) = usage(staging);
    let size_mib = ((bytes as f64 * 1.3) as u64 >> 20) + 64;
    let inodes = (inodes * 2).max(4096);
    let tmp = out.with_extension("ext4.tmp");
    let _ = fs::remove_file(&tmp);
    let res = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "hearth-root", "-E", "root_owner=0:0", "-N", &inodes.to_string(), "-d"])
        .arg(staging)
        .arg(&tmp)
        .arg(format!("{size_mib}M"))
        .output();
    let out_ok = match res {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(ImageError::Mkfs(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
        Err(e) => Err(ImageError::Mkfs(format!("cannot run it ({e}); install e2fsprogs"))),
    };
    if let Err(e) = out_ok {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|source| ImageError::Io { path: tmp.clone(), source })?;
    fs::rename(&tmp, out).map_err(|source| ImageError::Io { path: out.to_owned(), source })
}
