//! The base root filesystem of an image: layers unpacked in order into a staging directory,
//! then e2fsprogs' `mkfs.ext4 -d` makes `images/rootfs/<id>.ext4`, once per image id.
//!
//! Staging is `images/tmp/<id>-<random>/root`, removed on success and failure alike. The ext4
//! is sized to content * 1.3 + 64 MiB (content counts 4 KiB blocks per file and the inode
//! table), with `-N` inodes for every file plus a quarter, built at `<id>.ext4.<random>.tmp` and
//! renamed into place. A build holds `rootfs/<id>.lock`
//! (removed afterwards), so concurrent callers wait for one build. The image content is not
//! changed, except that missing mount points (`/dev /proc /sys /run` 0755, `/tmp` 1777) are
//! created.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use hearth_types::{Digest, ImageRecord};

use crate::store::{lock_file, sync_dir, ImageStore, StoreError};
use crate::unpack::{self, UnpackError};

/// Why a base root filesystem could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("building the root filesystem at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read layer {digest}; pull or import the image again")]
    Layer {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("cannot apply layer {digest}")]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    #[error("layer {digest} unpacks to {actual}, but the image config promises {expected}; the image is corrupt or was tampered with")]
    DiffId { digest: Digest, expected: String, actual: String },
    #[error(
        "the image config {0} has no usable rootfs.diff_ids for its layers; the image is malformed"
    )]
    NoDiffIds(Digest),
    #[error("mkfs.ext4 failed building {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("cannot run mkfs.ext4; install e2fsprogs")]
    MkfsMissing(#[source] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io { path: path.to_owned(), source }
}

/// Wraps a layer stream in the right decompressor, sniffed from its magic bytes: gzip
/// (`1f 8b`), zstd (`28 b5 2f fd`), else a plain tar.
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

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Bytes (in 4 KiB blocks, as ext4 will store them) and inodes under `dir`; hard links once.
fn usage(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (BLOCK, 1u64);
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let path = e?.path();
            let m = path.symlink_metadata()?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            let ft = m.file_type();
            bytes += if ft.is_file() || ft.is_dir() {
                // Small files still take a block; large ones need extent/index blocks too.
                round_up(m.len().max(1), BLOCK) + m.len() / 1024
            } else if ft.is_symlink() && m.len() >= 60 {
                BLOCK
            } else {
                0
            };
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok((bytes, inodes))
}

/// (size in MiB, inode count) for an ext4 holding `bytes` in `inodes` inodes.
fn ext4_geometry(bytes: u64, inodes: u64) -> (u64, u64) {
    let inodes = (inodes + inodes / 4 + 1024).max(4096);
    let content = bytes + inodes * INODE_SIZE;
    let total = content + content * 3 / 10 + 64 * MIB;
    (total.div_ceil(MIB), inodes)
}

/// Makes the directories the guest init mounts on, when the image lacks them.
fn ensure_mount_points(dir: &Path) -> Result<(), RootfsError> {
    for (d, mode) in
        [("dev", 0o755), ("proc", 0o755), ("sys", 0o755), ("run", 0o755), ("tmp", 0o1777)]
    {
        let p = dir.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).map_err(io_err(&p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// `mkfs.ext4 -d staging` into `out`, sized to the content plus headroom. Builds
/// `out.tmp`, fsyncs it and renames it into place.
pub fn build_ext4(staging: &Path, out: &Path) -> Result<(), RootfsError> {
    ensure_mount_points(staging)?;
    let (bytes, inodes) = usage(staging).map_err(io_err(staging))?;
    let (size_mib, inodes) = ext4_geometry(bytes, inodes);
    // A name of this build's own: a build a dead daemon left running never writes what this
    // one renames.
    let tmp = out.with_extension(format!("ext4.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let output = hearth_fs::die_with_parent(&mut Command::new("mkfs.ext4"))
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-L",
                "hearth-root",
                "-E",
                "root_owner=0:0",
                "-N",
                &inodes.to_string(),
                "-d",
            ])
            .arg(staging)
            .arg(&tmp)
            .arg(format!("{size_mib}M"))
            .output()
            .map_err(RootfsError::MkfsMissing)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(RootfsError::Mkfs { path: out.to_owned(), stderr });
        }
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
        let dir = out.parent().unwrap_or(Path::new("."));
        sync_dir(dir).map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The account files of an image (`/etc/passwd`, `/etc/group`), kept beside its base ext4 so a
/// VM's USER can be checked at create without reading the layers again.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageUsers {
    pub passwd: Option<String>,
    pub group: Option<String>,
}

/// Largest account file read from an image.
const MAX_ACCOUNT_FILE: u64 = 1 << 20;

impl ImageUsers {
    /// Reads them from an unpacked tree, following links inside it only.
    fn read(root: &Path) -> Self {
        let read = |p: &str| -> Option<String> {
            let mut s = String::new();
            hearth_fs::open_in_root(root, Path::new(p))
                .ok()?
                .take(MAX_ACCOUNT_FILE)
                .read_to_string(&mut s)
                .ok()?;
            Some(s)
        };
        Self { passwd: read("etc/passwd"), group: read("etc/group") }
    }
}

/// A reader that hashes what passes through it (the uncompressed layer, for its diff_id).
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl ImageStore {
    /// The image's base ext4 (`images/rootfs/<id>.ext4`), built on first use. Concurrent
    /// callers for one image wait for a single build.
    pub fn rootfs(&self, image: &ImageRecord) -> Result<PathBuf, RootfsError> {
        let out = self.rootfs_path(&image.id);
        if out.is_file() {
            return Ok(out);
        }
        let lock = lock_file(&self.rootfs_lock_path(&image.id))?;
        if out.is_file() {
            lock.remove();
            return Ok(out);
        }
        let staging = self.tmp_path(image.id.hex());
        let root = staging.join("root");
        let result = self.unpack_to(image, &root).and_then(|_| {
            // The account files first: a finished ext4 always has them beside it.
            let users = serde_json::to_vec(&ImageUsers::read(&root)).unwrap_or_default();
            let path = self.users_path(&image.id);
            crate::store::write_atomic(&path, &users)?;
            build_ext4(&root, &out)
        });
        let _ = fs::remove_dir_all(&staging);
        // Only finished images stay in rootfs/.
        lock.remove();
        result.map(|_| out)
    }

    /// The image's account files, from beside its base ext4 (building it first if need be);
    /// `None` for an ext4 built by a hearth that did not keep them.
    pub fn users(&self, image: &ImageRecord) -> Result<Option<ImageUsers>, RootfsError> {
        self.rootfs(image)?;
        let path = self.users_path(&image.id);
        match fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RootfsError::Io { path, source }),
        }
    }

    fn users_path(&self, id: &Digest) -> PathBuf {
        self.rootfs_path(id).with_extension("users")
    }

    /// Unpacks all layers of `image`, bottom first, into `dir` (created if missing, mode 0755),
    /// checking each uncompressed layer against the config's `rootfs.diff_ids` as containerd
    /// does: a layer whose content is not what the image promises is refused.
    pub fn unpack_to(&self, image: &ImageRecord, dir: &Path) -> Result<(), RootfsError> {
        let config = self.read_blob(&image.id)?;
        let diff_ids =
            crate::oci::diff_ids(&config).ok().flatten().filter(|d| d.len() == image.layers.len());
        let diff_ids = diff_ids.ok_or_else(|| RootfsError::NoDiffIds(image.id.clone()))?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
        for (layer, expected) in image.layers.iter().zip(&diff_ids) {
            let path = self.blob_path(layer);
            let layer_err = |source| RootfsError::Layer { digest: layer.clone(), source };
            let file = fs::File::open(&path).map_err(layer_err)?;
            let reader =
                decompress(BufReader::with_capacity(256 << 10, file)).map_err(layer_err)?;
            let mut hashed = Hashing { inner: reader, hasher: sha2::Digest::new() };
            unpack::unpack_layer(&mut hashed, dir)
                .map_err(|source| RootfsError::Unpack { digest: layer.clone(), source })?;
            // What follows the tar's end-of-archive blocks counts too.
            io::copy(&mut hashed, &mut io::sink()).map_err(layer_err)?;
            let actual = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hashed.hasher)));
            if actual != *expected {
                return Err(RootfsError::DiffId {
                    digest: layer.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_failed_build_leaves_nothing_and_concurrent_builds_build_once() {
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(t.path()).expect("open");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "ok", &b"x"[..]).expect("append");
        let (good, _) = s.put_blob(&b.into_inner().expect("tar")[..], None, &|_| {}).expect("blob");
        let (bad, _) = s.put_blob(&[0x42u8; 1024][..], None, &|_| {}).expect("blob");
        // An image of these layers, its config promising their own (uncompressed) digests.
        let rec = |layers: Vec<Digest>, seed: &str| {
            let ids: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
            let config =
                serde_json::json!({"seed": seed, "rootfs": {"type": "layers", "diff_ids": ids}})
                    .to_string();
            let (id, _) = s.put_blob(config.as_bytes(), None, &|_| {}).expect("config");
            ImageRecord {
                names: vec![],
                id,
                manifest_digest: None,
                layers,
                config: Default::default(),
                size: 0,
                created_at: 0,
            }
        };
        let broken = rec(vec![good.clone(), bad], "broken");
        assert!(matches!(s.rootfs(&broken), Err(RootfsError::Unpack { .. })));
        let listing = |d: &str| fs::read_dir(t.path().join("images").join(d)).expect("dir").count();
        assert_eq!((listing("rootfs"), listing("tmp")), (0, 0), "nothing left behind");

        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipping the build half: no mkfs.ext4");
            return;
        }
        let fine = rec(vec![good], "fine");
        let paths: Vec<PathBuf> = std::thread::scope(|sc| {
            let hs: Vec<_> =
                (0..3).map(|_| sc.spawn(|| s.rootfs(&fine).expect("rootfs"))).collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        assert!(paths.iter().all(|p| *p == s.rootfs_path(&fine.id) && p.is_file()));
        assert_eq!(
            (listing("rootfs"), listing("tmp")),
            (2, 0),
            "one image and its account files, no lock or staging left"
        );
    }

    #[test]
    fn a_layer_that_is_not_what_the_config_promises_is_refused_and_account_files_are_kept() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipping: no mkfs.ext4");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(t.path()).expect("open");
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("etc/passwd", &b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"[..]),
            ("etc/group", b"app:x:1000:\n"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).expect("append");
        }
        let layer = b.into_inner().expect("tar");
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&layer).expect("gz");
            e.finish().expect("gz")
        };
        let (blob, _) = s.put_blob(&gz[..], None, &|_| {}).expect("blob");
        let image = |diff_id: &str| {
            let config = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [diff_id]}})
                .to_string();
            let (id, _) = s.put_blob(config.as_bytes(), None, &|_| {}).expect("config");
            ImageRecord {
                names: vec![],
                id,
                manifest_digest: None,
                layers: vec![blob.clone()],
                config: Default::default(),
                size: 0,
                created_at: 0,
            }
        };
        // The config promises other content than the (compressed, digest-verified) blob holds.
        let lying = image(&format!("sha256:{}", "0".repeat(64)));
        let e = s.rootfs(&lying).expect_err("wrong diff_id");
        assert!(
            matches!(e, RootfsError::DiffId { .. }) && e.to_string().contains("tampered"),
            "{e}"
        );
        assert!(!s.rootfs_path(&lying.id).exists());
        let honest = image(&crate::store::digest_of(&layer).to_string());
        let users = s.users(&honest).expect("build").expect("kept beside the ext4");
        assert!(users.passwd.as_deref().is_some_and(|p| p.contains("app:x:1000")), "{users:?}");
        assert_eq!(users.group.as_deref(), Some("app:x:1000:\n"));
    }

    #[test]
    fn decompress_sniffs_gzip_zstd_and_plain() {
        let plain = b"0123456789".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).expect("gz");
        let gz = gz.finish().expect("gz");
        let zst = zstd::encode_all(&plain[..], 3).expect("zstd");
        for input in [&plain[..], &gz[..], &zst[..]] {
            let mut out = Vec::new();
            decompress(input).expect("sniff").read_to_end(&mut out).expect("read");
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn geometry_has_headroom_and_enough_inodes() {
        let (mib, inodes) = ext4_geometry(100 * MIB, 10_000);
        assert!((130 + 64..220).contains(&mib), "{mib}");
        assert!(inodes >= 10_000 + 2_500);
        let (mib, inodes) = ext4_geometry(0, 1);
        assert_eq!((mib, inodes), (66, 4096));
    }

    #[test]
    fn usage_counts_blocks_inodes_and_hard_links_once() {
        let t = tempfile::tempdir().expect("tmp");
        fs::write(t.path().join("a"), vec![1u8; 5000]).expect("a");
        fs::hard_link(t.path().join("a"), t.path().join("b")).expect("b");
        fs::create_dir(t.path().join("d")).expect("d");
        std::os::unix::fs::symlink("a", t.path().join("l")).expect("l");
        let (bytes, inodes) = usage(t.path()).expect("usage");
        assert_eq!(inodes, 4, "root, a (once), d, l");
        assert!(bytes >= 8192 + 4096 + 4096, "{bytes}");
    }

    #[test]
    fn mount_points_are_made_with_their_modes_but_existing_ones_kept() {
        let t = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink("/run", t.path().join("run")).expect("link");
        ensure_mount_points(t.path()).expect("mount points");
        for (d, mode) in [("dev", 0o755), ("proc", 0o755), ("sys", 0o755), ("tmp", 0o1777)] {
            assert_eq!(fs::metadata(t.path().join(d)).expect(d).mode() & 0o7777, mode, "{d}");
        }
        assert!(fs::symlink_metadata(t.path().join("run")).expect("run").file_type().is_symlink());
    }
}
