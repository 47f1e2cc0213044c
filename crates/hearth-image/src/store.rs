//! The store itself: verified content-addressed blobs, atomic image records, lookup and removal.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_types::{Digest, ImageRecord, ImageRef};
use sha2::{Digest as _, Sha256};

use crate::sys;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the source is corrupt or was tampered with")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("image record {path} is unreadable; delete it and pull or import the image again")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the blob from its source failed")]
    Source(#[source] io::Error),
    #[error(
        "blob {0} of the image vanished while it was stored (removed concurrently?); try again"
    )]
    BlobVanished(Digest),
    #[error("no such image: {0} (see `hearth image ls`)")]
    NotFound(String),
    #[error("{0:?} matches several images; give more of the id")]
    Ambiguous(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn digest_of(bytes: &[u8]) -> Digest {
    hex_digest(Sha256::digest(bytes).as_slice())
}

pub(crate) fn hex_digest(raw: &[u8]) -> Digest {
    // 32 bytes of sha256 always make 64 lowercase hex digits.
    Digest::from_hex(&hex::encode(raw))
        .unwrap_or_else(|_| unreachable!("sha256 hex is always valid"))
}

/// Fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically (hearth_fs::atomic_write).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    hearth_fs::atomic_write(path, bytes).map_err(io_err(path))
}

/// The images of one hearth root (`ROOT/images`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub(crate) dir: PathBuf,
}

/// An exclusive `flock` on a lock file, held until dropped.
#[derive(Debug)]
pub(crate) struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Deletes the lock file, then releases the lock. Safe because [`lock_file`] re-checks that
    /// the file it locked is still the one at the path.
    pub(crate) fn remove(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Locks `path` (creating it), waiting for other holders.
pub(crate) fn lock_file(path: &Path) -> Result<Lock, StoreError> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        sys::lock_exclusive(&file).map_err(io_err(path))?;
        // A holder may have removed the file meanwhile; then lock the new one instead.
        let held = file.metadata().map_err(io_err(path))?;
        if fs::metadata(path).is_ok_and(|now| now.ino() == held.ino() && now.dev() == held.dev()) {
            return Ok(Lock { file, path: path.to_owned() });
        }
    }
}

impl ImageStore {
    /// Opens (creating as needed) the store under `root/images`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("images");
        for sub in ["blobs/sha256", "records", "rootfs", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { dir })
    }

    /// Where the blob with digest `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// Whether the blob is stored (stored blobs were verified when written).
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A fresh, unused path under `images/tmp`.
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        self.dir.join("tmp").join(format!("{what}-{:016x}", rand::random::<u64>()))
    }

    /// Streams `reader` into the blob store, verifying it hashes to `expected` when given.
    /// Returns the digest and size. On any error, nothing is left behind.
    pub fn put_blob(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
        on_bytes: &dyn Fn(u64),
    ) -> Result<(Digest, u64), StoreError> {
        let tmp = self.tmp_path("blob");
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::Source(e)),
                };
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                total += n as u64;
                on_bytes(n as u64);
            }
            let actual = hex_digest(hasher.finalize().as_slice());
            if let Some(expected) = expected {
                if *expected != actual {
                    return Err(StoreError::DigestMismatch {
                        what: "blob".into(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            f.sync_all().map_err(io_err(&tmp))?;
            let dest = self.blob_path(&actual);
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            Ok((actual, total))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a whole (small) blob.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(d);
        fs::read(&p).map_err(io_err(&p))
    }

    fn record_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("records").join(format!("{}.json", id.hex()))
    }

    pub(crate) fn lock(&self) -> Result<Lock, StoreError> {
        lock_file(&self.dir.join(".lock"))
    }

    /// Stores `rec`, merging names with an existing record of the same id. The names it
    /// carries move away from any other image (which stays, nameless if need be).
    pub(crate) fn save(&self, rec: &ImageRecord) -> Result<ImageRecord, StoreError> {
        let _lock = self.lock()?;
        for d in rec.layers.iter().chain([&rec.id]).chain(&rec.manifest_digest) {
            if !self.has_blob(d) {
                return Err(StoreError::BlobVanished(d.clone()));
            }
        }
        for mut other in self.list()? {
            if other.id != rec.id && other.names.iter().any(|n| rec.names.contains(n)) {
                other.names.retain(|n| !rec.names.contains(n));
                self.write_record(&other)?;
            }
        }
        let mut merged = rec.clone();
        if let Some(old) = self.by_id(&rec.id)? {
            for n in old.names {
                if !merged.names.contains(&n) {
                    merged.names.push(n);
                }
            }
        }
        self.write_record(&merged)?;
        Ok(merged)
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&rec.id);
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|source| StoreError::Record { path: path.clone(), source })?;
        write_atomic(&path, &bytes)
    }

    fn by_id(&self, id: &Digest) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(id);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| StoreError::Record { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Every image, newest first.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.dir.join("records");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = e.map_err(io_err(&dir))?.file_name().to_string_lossy().into_owned();
            let Some(Ok(id)) = name.strip_suffix(".json").map(Digest::from_hex) else { continue };
            // A record removed since read_dir is simply not listed.
            if let Some(r) = self.by_id(&id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Finds an image by reference (normalised, so `alpine` finds
    /// `docker.io/library/alpine:latest`), by `name@digest` (manifest digest), by id, or by a
    /// unique id prefix of at least 4 hex digits (`sha256:` optional). Names win over ids.
    pub fn get(&self, name_or_id: &str) -> Result<Option<ImageRecord>, StoreError> {
        let all = self.list()?;
        if let Ok(r) = name_or_id.parse::<ImageRef>() {
            let full = r.to_string();
            if let Some(rec) = all.iter().find(|i| i.names.contains(&full)) {
                return Ok(Some(rec.clone()));
            }
            if let (Some(d), None) = (&r.digest, &r.tag) {
                let same_repo = |n: &String| {
                    n.parse::<ImageRef>()
                        .is_ok_and(|n| n.registry == r.registry && n.repository == r.repository)
                };
                if let Some(rec) = all.iter().find(|i| {
                    i.manifest_digest.as_ref() == Some(d) && i.names.iter().any(same_repo)
                }) {
                    return Ok(Some(rec.clone()));
                }
            }
        }
        let hex = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if hex.len() >= 4
            && hex.len() <= 64
            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            let found: Vec<_> = all.iter().filter(|i| i.id.hex().starts_with(hex)).collect();
            match found.as_slice() {
                [] => {}
                [one] => return Ok(Some((*one).clone())),
                _ => return Err(StoreError::Ambiguous(name_or_id.to_owned())),
            }
        }
        Ok(None)
    }

    /// Removes an image: its record, cached rootfs, and the blobs no other image uses.
    /// Whether a VM still uses it is the caller's concern.
    pub fn remove(&self, name_or_id: &str) -> Result<ImageRecord, StoreError> {
        let _lock = self.lock()?;
        let rec =
            self.get(name_or_id)?.ok_or_else(|| StoreError::NotFound(name_or_id.to_owned()))?;
        let path = self.record_path(&rec.id);
        fs::remove_file(&path).map_err(io_err(&path))?;
        let rootfs = self.rootfs_path(&rec.id);
        match fs::remove_file(&rootfs) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::Io { path: rootfs, source: e })
            }
            _ => {}
        }
        let others = self.list()?;
        let uses = |o: &ImageRecord, d: &Digest| {
            o.id == *d || o.layers.contains(d) || o.manifest_digest.as_ref() == Some(d)
        };
        for d in rec.layers.iter().chain([&rec.id]).chain(&rec.manifest_digest) {
            if !others.iter().any(|o| uses(o, d)) {
                let p = self.blob_path(d);
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(StoreError::Io { path: p, source: e })
                    }
                    _ => {}
                }
            }
        }
        Ok(rec)
    }

    /// Clears what a crash left: staging trees and partial downloads in `tmp/`, half-built
    /// filesystems and build locks in `rootfs/`, temporary records. Only for a daemon start,
    /// when nothing else uses the store. Returns the paths removed.
    pub fn sweep(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        let leftover = |dir: &str, name: &str| match dir {
            "tmp" => true,
            "rootfs" => name.ends_with(".tmp") || name.ends_with(".lock"),
            _ => name.starts_with('.') && name.contains(".tmp"),
        };
        for sub in ["tmp", "rootfs", "records"] {
            let dir = self.dir.join(sub);
            for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let e = e.map_err(io_err(&dir))?;
                let p = e.path();
                if !leftover(sub, &e.file_name().to_string_lossy()) {
                    continue;
                }
                let is_dir = e.file_type().map_err(io_err(&p))?.is_dir();
                if is_dir { fs::remove_dir_all(&p) } else { fs::remove_file(&p) }
                    .map_err(io_err(&p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// Where the image's base ext4 lives (whether or not it was built yet).
    pub fn rootfs_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("rootfs").join(format!("{}.ext4", id.hex()))
    }

    pub(crate) fn rootfs_lock_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("rootfs").join(format!("{}.lock", id.hex()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ImageStore) {
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(t.path()).expect("open");
        (t, s)
    }

    fn record(s: &ImageStore, seed: &str, names: &[&str], shared: &Digest) -> ImageRecord {
        let (id, _) = s.put_blob(seed.as_bytes(), None, &|_| {}).expect("config");
        let (own, _) =
            s.put_blob(format!("layer {seed}").as_bytes(), None, &|_| {}).expect("layer");
        let rec = ImageRecord {
            names: names.iter().map(|n| n.parse::<ImageRef>().expect("ref").to_string()).collect(),
            id,
            manifest_digest: None,
            layers: vec![shared.clone(), own],
            config: Default::default(),
            size: 1,
            created_at: now(),
        };
        s.save(&rec).expect("save")
    }

    #[test]
    fn open_creates_the_layout() {
        let (t, _) = store();
        for sub in ["blobs/sha256", "records", "rootfs", "tmp"] {
            assert!(t.path().join("images").join(sub).is_dir(), "{sub}");
        }
    }

    #[test]
    fn blobs_are_verified_and_mismatches_leave_nothing() {
        let (t, s) = store();
        let good = digest_of(b"hello");
        let (d, n) = s.put_blob(&b"hello"[..], Some(&good), &|_| {}).expect("good");
        assert_eq!((d.clone(), n), (good.clone(), 5));
        assert_eq!(s.read_blob(&d).expect("read"), b"hello");
        let err =
            s.put_blob(&b"evil"[..], Some(&digest_of(b"other")), &|_| {}).expect_err("mismatch");
        let msg = err.to_string();
        assert!(
            msg.contains("digest mismatch")
                && msg.contains(&digest_of(b"other").to_string())
                && msg.contains(&digest_of(b"evil").to_string()),
            "{msg}"
        );
        assert!(!s.has_blob(&digest_of(b"evil")));
        assert!(
            fs::read_dir(t.path().join("images/tmp")).expect("tmp").next().is_none(),
            "no partial blob left"
        );
    }

    #[test]
    fn lookup_by_name_familiar_name_id_and_prefix() {
        let (_t, s) = store();
        let (shared, _) = s.put_blob(&b"shared"[..], None, &|_| {}).expect("shared");
        let a = record(&s, "a", &["alpine", "127.0.0.1:5000/demo:1"], &shared);
        assert_eq!(a.names, ["docker.io/library/alpine:latest", "127.0.0.1:5000/demo:1"]);
        for q in [
            "alpine",
            "alpine:latest",
            "docker.io/library/alpine",
            "127.0.0.1:5000/demo:1",
            a.id.hex(),
            &a.id.hex()[..4],
            &a.id.to_string(),
        ] {
            assert_eq!(s.get(q).expect("get").map(|r| r.id), Some(a.id.clone()), "{q}");
        }
        assert_eq!(s.get("busybox").expect("get"), None);
        assert_eq!(s.get("abc").expect("too short a prefix"), None);
    }

    #[test]
    fn ambiguous_prefixes_are_errors() {
        let (_t, s) = store();
        for hex in ["abcd1".repeat(12) + "0000", "abcd2".repeat(12) + "0000"] {
            // Blob files named by hand: the record only needs them to exist.
            fs::write(s.dir.join("blobs/sha256").join(&hex), b"x").expect("blob");
            let id = Digest::from_hex(&hex).expect("hex");
            s.save(&ImageRecord {
                names: vec![],
                id,
                manifest_digest: None,
                layers: vec![],
                config: Default::default(),
                size: 0,
                created_at: 0,
            })
            .expect("save");
        }
        assert!(matches!(s.get("abcd"), Err(StoreError::Ambiguous(_))));
        assert!(s.get("sha256:abcd1").expect("unique").is_some());
    }

    #[test]
    fn a_moved_name_leaves_the_old_image_nameless_and_remove_keeps_shared_blobs() {
        let (_t, s) = store();
        let (shared, _) = s.put_blob(&b"shared"[..], None, &|_| {}).expect("shared");
        let old = record(&s, "old", &["app:1"], &shared);
        let new = record(&s, "new", &["app:1"], &shared);
        let old_now = s.get(old.id.hex()).expect("get").expect("old stays");
        assert!(old_now.names.is_empty(), "{:?}", old_now.names);
        assert_eq!(s.get("app:1").expect("get").map(|r| r.id), Some(new.id.clone()));
        assert_eq!(s.list().expect("list").len(), 2);

        let removed = s.remove("app:1").expect("rm");
        assert_eq!(removed.id, new.id);
        assert!(!s.has_blob(&new.id) && !s.has_blob(&new.layers[1]), "unused blobs go");
        assert!(s.has_blob(&shared), "blobs another image uses stay");
        s.remove(&old.id.hex()[..6]).expect("rm by prefix");
        assert!(!s.has_blob(&shared));
        assert!(s.list().expect("list").is_empty());
        assert!(matches!(s.remove("app:1"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn sweep_removes_staging_partial_builds_and_locks_only() {
        let (t, s) = store();
        let (kept, _) = s.put_blob(&b"kept"[..], None, &|_| {}).expect("blob");
        let images = t.path().join("images");
        fs::create_dir_all(images.join("tmp/abc-1/root/usr")).expect("staging");
        fs::write(images.join("tmp/blob-2"), b"partial").expect("partial");
        fs::write(images.join("rootfs/aa.ext4"), b"built").expect("built");
        fs::write(images.join("rootfs/bb.ext4.0f.tmp"), b"half").expect("half");
        fs::write(images.join("rootfs/bb.lock"), b"").expect("lock");
        fs::write(images.join("records/.cc.json.tmp-1234"), b"{").expect("record tmp");
        assert_eq!(s.sweep().expect("sweep").len(), 5);
        assert!(images.join("rootfs/aa.ext4").is_file() && s.has_blob(&kept));
        for d in ["tmp", "records"] {
            assert_eq!(fs::read_dir(images.join(d)).expect(d).count(), 0, "{d}");
        }
        assert_eq!(fs::read_dir(images.join("rootfs")).expect("rootfs").count(), 1);
    }

    #[test]
    fn saving_the_same_image_again_merges_names() {
        let (_t, s) = store();
        let (shared, _) = s.put_blob(&b"shared"[..], None, &|_| {}).expect("shared");
        record(&s, "x", &["a:1"], &shared);
        let again = record(&s, "x", &["b:1"], &shared);
        assert_eq!(again.names.len(), 2);
        assert_eq!(s.list().expect("list").len(), 1);
    }
}
