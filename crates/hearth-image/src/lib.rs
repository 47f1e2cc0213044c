//! hearth's image store.
//!
//! Blobs (layers, configs, manifests) are content-addressed under `images/blobs/sha256/` and
//! verified as they are written. An image record (`images/records/<id>.json`) names its config
//! (the image id), manifest and layers. The base root filesystem of an image is built once per
//! image id: layers are unpacked in order into a staging directory by [`unpack`] (which never
//! writes outside it), then `mkfs.ext4 -d` makes `images/rootfs/<id>.ext4`.

pub mod import;
pub mod oci;
pub mod registry;
pub mod rootfs;
mod sys;
#[cfg(feature = "testutil")]
pub mod testutil;
pub mod unpack;

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_types::{Digest, ImageRecord, ImageRef};
use sha2::{Digest as _, Sha256};

pub use registry::PullOptions;
pub use unpack::UnpackError;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the registry or file is corrupt")]
    DigestMismatch { what: String, expected: String, actual: String },
    #[error("no such image: {0} (see `hearth image ls`)")]
    NotFound(String),
    #[error("{0} matches several images; give more of the id")]
    Ambiguous(String),
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

/// Pull progress, per blob.
pub trait Progress: Send + Sync {
    fn start(&self, digest: &str, total: u64);
    fn advance(&self, digest: &str, bytes: u64);
    fn finish(&self, digest: &str);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, _: &str) {}
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp{:08x}", rand::random::<u32>()));
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The images of one hearth root (`ROOT/images`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let dir = root.join("images");
        for sub in ["blobs/sha256", "records", "rootfs", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { dir })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).exists()
    }

    /// A fresh staging path under `images/tmp`.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.dir.join("tmp").join(format!("{what}-{:016x}", rand::random::<u64>()))
    }

    /// Streams `reader` into the blob store, verifying it hashes to `expected` (when given).
    /// Returns the digest and size. Nothing is left behind on a mismatch.
    pub fn put_blob(&self, mut reader: impl Read, expected: Option<&Digest>, on_bytes: &dyn Fn(u64)) -> Result<(Digest, u64), ImageError> {
        let tmp = self.tmp_path("blob");
        let result = (|| {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(io_err(&tmp))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                f.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                total += n as u64;
                on_bytes(n as u64);
            }
            f.sync_all().map_err(io_err(&tmp))?;
            let actual = Digest::from_hex(&hex::encode(h.finalize())).map_err(|e| ImageError::Format(e.to_string()))?;
            if let Some(exp) = expected {
                if *exp != actual {
                    return Err(ImageError::DigestMismatch { what: "blob".into(), expected: exp.to_string(), actual: actual.to_string() });
                }
            }
            let dest = self.blob_path(&actual);
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            Ok((actual, total))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(d);
        fs::read(&p).map_err(io_err(&p))
    }

    fn record_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("records").join(format!("{}.json", id.hex()))
    }

    /// Stores a record; the names it carries move away from any other image.
    pub fn save(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        for mut other in self.list()? {
            if other.id != rec.id && other.names.iter().any(|n| rec.names.contains(n)) {
                other.names.retain(|n| !rec.names.contains(n));
                self.write_record(&other)?;
            }
        }
        let mut merged = rec.clone();
        if let Ok(Some(old)) = self.by_id(&rec.id) {
            for n in old.names {
                if !merged.names.contains(&n) {
                    merged.names.push(n);
                }
            }
        }
        self.write_record(&merged)
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| ImageError::Format(e.to_string()))?;
        write_atomic(&self.record_path(&rec.id), &bytes)
    }

    fn by_id(&self, id: &Digest) -> Result<Option<ImageRecord>, ImageError> {
        let p = self.record_path(id);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| ImageError::Format(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io { path: p, source }),
        }
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.dir.join("records");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else { continue };
            let Ok(id) = Digest::from_hex(hex) else { continue };
            if let Some(r) = self.by_id(&id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.hex().cmp(b.id.hex())));
        Ok(out)
    }

    /// By reference (as typed, normalised), by id, or by unique id prefix (4+ hex digits).
    pub fn get(&self, name_or_id: &str) -> Result<Option<ImageRecord>, ImageError> {
        let all = self.list()?;
        if let Ok(r) = name_or_id.parse::<ImageRef>() {
            let full = r.to_string();
            if let Some(rec) = all.iter().find(|i| i.names.contains(&full)) {
                return Ok(Some(rec.clone()));
            }
            if let Some(d) = &r.digest {
                if let Some(rec) = all.iter().find(|i| i.manifest_digest.as_ref() == Some(d)) {
                    return Ok(Some(rec.clone()));
                }
            }
        }
        let hex = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let m: Vec<_> = all.iter().filter(|i| i.id.hex().starts_with(hex)).collect();
            match m.as_slice() {
                [one] => return Ok(Some((*one).clone())),
                [] => {}
                _ => return Err(ImageError::Ambiguous(name_or_id.to_owned())),
            }
        }
        Ok(None)
    }

    /// Removes an image: its record, cached rootfs, and blobs no other image uses.
    pub fn remove(&self, name_or_id: &str) -> Result<ImageRecord, ImageError> {
        let rec = self.get(name_or_id)?.ok_or_else(|| ImageError::NotFound(name_or_id.to_owned()))?;
        let p = self.record_path(&rec.id);
        fs::remove_file(&p).map_err(io_err(&p))?;
        let _ = fs::remove_file(self.rootfs_path(&rec.id));
        let others = self.list()?;
        let mut mine: Vec<Digest> = rec.layers.clone();
        mine.push(rec.id.clone());
        mine.extend(rec.manifest_digest.clone());
        for d in mine {
            let used = others.iter().any(|o| o.id == d || o.layers.contains(&d) || o.manifest_digest.as_ref() == Some(&d));
            if !used {
                let _ = fs::remove_file(self.blob_path(&d));
            }
        }
        Ok(rec)
    }

    pub fn rootfs_path(&self, id: &Digest) -> PathBuf {
        self.dir.join("rootfs").join(format!("{}.ext4", id.hex()))
    }

    /// The image's base ext4, built on first use.
    pub fn rootfs(&self, image: &ImageRecord) -> Result<PathBuf, ImageError> {
        let out = self.rootfs_path(&image.id);
        if out.exists() {
            return Ok(out);
        }
        let staging = self.tmp_path("rootfs");
        let result = (|| {
            self.unpack_to(image, &staging)?;
            rootfs::build_ext4(&staging, &out)
        })();
        let _ = fs::remove_dir_all(&staging);
        result.map(|_| out)
    }

    /// Unpacks all layers of `image`, in order, into `dir`.
    pub fn unpack_to(&self, image: &ImageRecord, dir: &Path) -> Result<(), ImageError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        for layer in &image.layers {
            let p = self.blob_path(layer);
            let f = fs::File::open(&p).map_err(io_err(&p))?;
            unpack::unpack_layer(rootfs::decompress(io::BufReader::new(f)).map_err(io_err(&p))?, dir)?;
        }
        Ok(())
    }
}
