//! An image's own initrd (Flintlock's `initrd`), kept beside the kernels by the SHA-256 of its
//! bytes, and joined to a kernel's initramfs: the kernel unpacks concatenated archives in
//! order, so the image's files (modules, firmware) are in the guest's early root filesystem and
//! hearth's, unpacked last, keep /init hearth-init (which reports the guest ready, serves the
//! agent and mounts the root disk).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::{io_err, readable_by_all, KernelError, KernelStore};

/// The directory of initrds in the kernel store (a dot keeps it from being taken for a kernel).
pub(crate) const INITRDS: &str = ".initrds";
/// The largest initrd taken.
pub const MAX_INITRD: u64 = 1 << 30;

fn is_digest(d: &str) -> bool {
    d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl KernelStore {
    fn initrds(&self) -> PathBuf {
        self.dir.join(INITRDS)
    }

    /// The stored initrd of `digest`, when there is one.
    pub fn initrd_path(&self, digest: &str) -> Option<PathBuf> {
        let p = self.initrds().join(digest);
        (is_digest(digest) && p.is_file()).then_some(p)
    }

    /// Stores the file `file` of the unpacked image `dir` (links followed inside it only) as an
    /// initrd; returns its digest. The same bytes are stored once.
    pub fn import_initrd(&self, dir: &Path, file: &str) -> Result<String, KernelError> {
        let src = hearth_fs::resolve_in_root(dir, Path::new(file.trim_start_matches('/')))
            .ok()
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
            .ok_or_else(|| KernelError::NoInitrdFile { file: file.to_owned() })?;
        let len = fs::metadata(&src).map_err(io_err(&src))?.len();
        if len > MAX_INITRD {
            return Err(KernelError::InitrdTooLarge { file: file.to_owned(), bytes: len });
        }
        let store = self.initrds();
        fs::create_dir_all(&store).map_err(io_err(&store))?;
        let tmp = hearth_fs::temp_beside(&store.join("initrd"));
        let copied = (|| {
            let mut from = fs::File::open(&src).map_err(io_err(&src))?;
            let mut to = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = from.read(&mut buf).map_err(io_err(&src))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                to.write_all(&buf[..n]).map_err(io_err(&tmp))?;
            }
            to.sync_all().map_err(io_err(&tmp))?;
            fs::set_permissions(&tmp, readable_by_all()).map_err(io_err(&tmp))?;
            let digest = hex::encode(h.finalize());
            let out = store.join(&digest);
            fs::rename(&tmp, &out).map_err(io_err(&out))?;
            Ok(digest)
        })();
        if copied.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        copied
    }

    /// `name`'s initramfs for `init_binary` with the initrd `digest` unpacked before it; built
    /// once per pair, beside the initramfs (and gone with it when hearth-init changes).
    pub fn initramfs_with(
        &self,
        name: &str,
        init_binary: &Path,
        digest: &str,
    ) -> Result<PathBuf, KernelError> {
        let extra = self
            .initrd_path(digest)
            .ok_or_else(|| KernelError::NoInitrd { digest: digest.to_owned() })?;
        let base = self.initramfs(name, init_binary)?;
        let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let out = base.with_file_name(format!("{stem}+{}.img", &digest[..16]));
        if out.is_file() {
            return Ok(out);
        }
        let tmp = hearth_fs::temp_beside(&out);
        let joined = (|| {
            let mut to = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            for part in [&extra, &base] {
                let mut from = fs::File::open(part).map_err(io_err(part))?;
                io::copy(&mut from, &mut to).map_err(io_err(&tmp))?;
            }
            to.sync_all().map_err(io_err(&tmp))?;
            fs::set_permissions(&tmp, readable_by_all()).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &out).map_err(io_err(&out))
        })();
        if joined.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        joined.map(|()| out)
    }

    /// Removes the stored initrds no VM uses (`keep`), and what a crash left; for a daemon start.
    pub fn sweep_initrds(&self, keep: &HashSet<String>) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(rd) = fs::read_dir(self.initrds()) else { return removed };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) && fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initrd_is_stored_once_by_its_digest_and_joined_before_the_initramfs() {
        let root = tempfile::tempdir().expect("tmp");
        let store = KernelStore::open(root.path()).expect("store");
        let image = root.path().join("image");
        fs::create_dir_all(image.join("boot")).expect("mkdir");
        fs::write(image.join("boot/initrd.img"), b"user archive").expect("initrd");
        std::os::unix::fs::symlink("/etc/shadow", image.join("boot/escape")).expect("link");
        let digest = store.import_initrd(&image, "/boot/initrd.img").expect("import");
        assert_eq!(digest, hex::encode(Sha256::digest(b"user archive")));
        assert_eq!(store.import_initrd(&image, "boot/initrd.img").expect("again"), digest);
        let stored = store.initrd_path(&digest).expect("stored");
        assert_eq!(fs::read(&stored).expect("read"), b"user archive");
        // A link out of the image is not followed; a missing file is named.
        for bad in ["boot/escape", "boot/none"] {
            let e = store.import_initrd(&image, bad).expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(store.initrd_path("../../etc/passwd").is_none());
        let keep: HashSet<String> = [digest.clone()].into();
        assert!(store.sweep_initrds(&keep).is_empty(), "kept while a VM uses it");
        assert!(store.sweep_initrds(&HashSet::new()).contains(&stored));
        assert!(store.initrd_path(&digest).is_none(), "swept once no VM uses it");
    }
}
