//! Importing images from files: an OCI image layout directory, a `docker save` archive, or a
//! plain root filesystem tar (optionally gzip/zstd compressed), told apart by their content.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use hearth_types::{Digest, ImageRecord, ImageRef};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::oci::{self, Manifest, REF_NAME};
use crate::rootfs::decompress;
use crate::store::{digest_of, hex_digest, now, ImageStore, StoreError};

/// Metadata files (manifests, indexes, configs) larger than this are refused.
const MAX_METADATA: u64 = 16 << 20;

/// The runtime config a plain rootfs tar gets.
const ROOTFS_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a tar archive, OCI layout or docker archive; import one of those")]
    Unrecognised { path: PathBuf },
    #[error("{path} looks like an OCI archive (a tar of an OCI layout); extract it and import the directory")]
    OciArchive { path: PathBuf },
    #[error("{path} is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error(
        "{path} has no linux/amd64 image (it has: {available}); hearth runs amd64 guests only"
    )]
    Platform { path: PathBuf, available: String },
    #[error("layer {digest} in {path} has media type {media_type:?}; only tar, tar+gzip and tar+zstd layers can be imported")]
    MediaType { path: PathBuf, digest: String, media_type: String },
    #[error("image {name} is refused")]
    Refused {
        name: String,
        #[source]
        source: crate::RootfsError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io { path: path.to_owned(), source }
}

/// An OCI image layout directory being imported; every blob read is checked against its digest.
struct Layout<'a> {
    dir: &'a Path,
}

impl Layout<'_> {
    fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    fn digest(&self, s: &str) -> Result<Digest, ImportError> {
        s.parse::<Digest>()
            .map_err(|_| malformed(self.dir, format!("{s:?} is not a sha256 digest")))
    }

    /// A metadata blob (bounded), verified against its digest.
    fn read_verified(&self, d: &Digest) -> Result<Vec<u8>, ImportError> {
        let p = self.blob_file(d);
        let mut bytes = Vec::new();
        File::open(&p)
            .map_err(io_err(&p))?
            .take(MAX_METADATA)
            .read_to_end(&mut bytes)
            .map_err(io_err(&p))?;
        let actual = digest_of(&bytes);
        if actual != *d {
            let what = p.display().to_string();
            return Err(StoreError::DigestMismatch { what, expected: d.clone(), actual }.into());
        }
        Ok(bytes)
    }

    fn parse(&self, bytes: &[u8], what: &str) -> Result<Manifest, ImportError> {
        serde_json::from_slice(bytes)
            .map_err(|e| malformed(self.dir, format!("{what} is not valid JSON: {e}")))
    }

    /// The image manifest (bytes, parse, digest) `name` picks: the tag asked for among several
    /// images, linux/amd64 among platforms, through at most three levels of index.
    fn manifest(&self, name: &ImageRef) -> Result<(Vec<u8>, Manifest, Digest), ImportError> {
        let index_path = self.dir.join("index.json");
        let mut bytes = fs::read(&index_path).map_err(io_err(&index_path))?;
        let mut index = self.parse(&bytes, "index.json")?;
        if index.manifests.is_empty() {
            return Err(malformed(self.dir, "index.json lists no manifests"));
        }
        // The top-level index may list several images: prefer the tag asked for.
        let tag = name.tag.clone().unwrap_or_default();
        let wanted = |d: &&oci::Descriptor| {
            d.annotations.get(REF_NAME).is_some_and(|r| *r == tag || *r == name.to_string())
        };
        if index.manifests.iter().all(|d| d.platform.is_none()) {
            let chosen = index.manifests.iter().find(wanted).unwrap_or(&index.manifests[0]).clone();
            index.manifests = vec![chosen];
        }
        for _ in 0..3 {
            let desc = match index.manifests.as_slice() {
                [only] if only.platform.is_none() => only.clone(),
                _ => index
                    .pick_amd64()
                    .map_err(|have| ImportError::Platform {
                        path: self.dir.to_owned(),
                        available: have.join(", "),
                    })?
                    .clone(),
            };
            let d = self.digest(&desc.digest)?;
            bytes = self.read_verified(&d)?;
            index = self.parse(&bytes, &format!("manifest {d}"))?;
            if !index.is_index() {
                return Ok((bytes, index, d));
            }
        }
        Err(malformed(self.dir, "indexes nest too deeply"))
    }
}

fn malformed(path: &Path, why: impl Into<String>) -> ImportError {
    ImportError::Malformed { path: path.to_owned(), why: why.into() }
}

/// One image of a docker archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// What a tar file turned out to be.
enum TarKind {
    Docker { manifest: Vec<u8>, symlinks: HashMap<String, String> },
    Rootfs { diff_id: Digest },
}

/// An archive member path without `./` or leading `/`.
fn member(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Resolves `rel` against `base` (a member's directory), lexically, inside the archive.
fn join_member(base: &str, rel: &str) -> Option<String> {
    let mut parts: Vec<&str> = if rel.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn open_tar(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, ImportError> {
    let file = File::open(path).map_err(io_err(path))?;
    Ok(tar::Archive::new(
        decompress(BufReader::with_capacity(256 << 10, file)).map_err(io_err(path))?,
    ))
}

/// Reads a tar once to tell a docker archive from a plain rootfs tar (and non-tars).
fn sniff(path: &Path) -> Result<TarKind, ImportError> {
    let file = File::open(path).map_err(io_err(path))?;
    let inner = decompress(BufReader::with_capacity(256 << 10, file)).map_err(io_err(path))?;
    let mut ar = tar::Archive::new(Hashing { inner, hasher: Sha256::new() });
    let (mut count, mut manifest, mut oci_layout) = (0usize, None, false);
    let mut symlinks = HashMap::new();
    for entry in ar.entries().map_err(io_err(path))? {
        let mut entry = match entry {
            Ok(e) => e,
            Err(_) if count == 0 => {
                return Err(ImportError::Unrecognised { path: path.to_owned() })
            }
            Err(e) => {
                return Err(malformed(
                    path,
                    format!("the tar is damaged after {count} entries: {e}"),
                ))
            }
        };
        count += 1;
        let name = member(&entry.path_bytes());
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::Symlink {
            if let Some(link) = entry.link_name_bytes() {
                symlinks.insert(name.clone(), String::from_utf8_lossy(&link).into_owned());
            }
        }
        if name == "oci-layout" {
            oci_layout = true;
        }
        if name == "manifest.json" && kind.is_file() && entry.size() <= MAX_METADATA {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(io_err(path))?;
            manifest = Some(buf);
        }
    }
    if count == 0 {
        return Err(ImportError::Unrecognised { path: path.to_owned() });
    }
    if let Some(manifest) =
        manifest.filter(|m| serde_json::from_slice::<Vec<DockerManifest>>(m).is_ok())
    {
        return Ok(TarKind::Docker { manifest, symlinks });
    }
    if oci_layout {
        return Err(ImportError::OciArchive { path: path.to_owned() });
    }
    let mut hashing = ar.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err(path))?;
    Ok(TarKind::Rootfs { diff_id: hex_digest(hashing.hasher.finalize().as_slice()) })
}

impl ImageStore {
    /// Imports the image at `path` under `name`: an OCI layout directory (the linux/amd64 image,
    /// or the one whose ref name matches `name`'s tag), a `docker save` archive (its first
    /// image), or a plain root filesystem tar, which gets a config with `/bin/sh` and PATH.
    pub fn import(&self, path: &Path, name: &ImageRef) -> Result<ImageRecord, ImportError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let mut rec = if meta.is_dir() {
            if !path.join("oci-layout").is_file() || !path.join("index.json").is_file() {
                return Err(malformed(
                    path,
                    "a directory must be an OCI layout (with oci-layout and index.json)",
                ));
            }
            self.import_oci_layout(path, name)?
        } else {
            match sniff(path)? {
                TarKind::Docker { manifest, symlinks } => {
                    self.import_docker_archive(path, &manifest, &symlinks)?
                }
                TarKind::Rootfs { diff_id } => self.import_rootfs_tar(path, &diff_id)?,
            }
        };
        rec.names = vec![name.to_string()];
        // Verified before it is stored: an image whose layers would be refused at run (an
        // escape, a lying diff_id) never sits in the store as a good one.
        self.rootfs(&rec)
            .map_err(|source| ImportError::Refused { name: name.to_string(), source })?;
        Ok(self.save(&rec)?)
    }

    fn store_file(
        &self,
        file: &Path,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), ImportError> {
        let f = File::open(file).map_err(io_err(file))?;
        Ok(self.put_blob(f, expected, &|_| {})?)
    }

    fn import_oci_layout(&self, dir: &Path, name: &ImageRef) -> Result<ImageRecord, ImportError> {
        let layout = Layout { dir };
        let (bytes, m, mdg) = layout.manifest(name)?;
        let config = m
            .config
            .as_ref()
            .ok_or_else(|| malformed(dir, format!("manifest {mdg} has no config")))?;
        if let Some(l) = m.layers.iter().find(|l| !oci::is_layer_type(&l.media_type)) {
            return Err(ImportError::MediaType {
                path: dir.to_owned(),
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
            });
        }
        let config_digest = layout.digest(&config.digest)?;
        let config_bytes = layout.read_verified(&config_digest)?;
        let cfg = oci::parse_config(&config_bytes)
            .map_err(|e| malformed(dir, format!("the image config is not valid JSON: {e}")))?;
        self.put_blob(&config_bytes[..], Some(&config_digest), &|_| {})?;
        let (mut layers, mut size) = (Vec::new(), 0);
        for l in &m.layers {
            let d = layout.digest(&l.digest)?;
            let (_, n) = self.store_file(&layout.blob_file(&d), Some(&d))?;
            layers.push(d);
            size += n;
        }
        self.put_blob(&bytes[..], Some(&mdg), &|_| {})?;
        Ok(ImageRecord {
            names: vec![],
            id: config_digest,
            manifest_digest: Some(mdg),
            layers,
            config: cfg,
            size,
            created_at: now(),
        })
    }

    fn import_docker_archive(
        &self,
        path: &Path,
        manifest: &[u8],
        symlinks: &HashMap<String, String>,
    ) -> Result<ImageRecord, ImportError> {
        let manifests: Vec<DockerManifest> = serde_json::from_slice(manifest)
            .map_err(|e| malformed(path, format!("manifest.json: {e}")))?;
        let m = manifests.first().ok_or_else(|| malformed(path, "manifest.json lists no image"))?;
        // `docker save` links repeated layers to one copy: follow links (inside the archive).
        let resolve = |name: &str| -> Result<String, ImportError> {
            let mut cur = member(name.as_bytes());
            for _ in 0..16 {
                let Some(link) = symlinks.get(&cur) else { return Ok(cur) };
                let base = cur.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                cur = join_member(base, link)
                    .ok_or_else(|| malformed(path, format!("{name} links outside the archive")))?;
            }
            Err(malformed(path, format!("{name} is a symlink loop")))
        };
        let config_member = resolve(&m.config)?;
        let layer_members = m.layers.iter().map(|l| resolve(l)).collect::<Result<Vec<_>, _>>()?;
        let mut stored: HashMap<String, (Digest, u64)> = HashMap::new();
        let mut ar = open_tar(path)?;
        for entry in ar.entries().map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            let name = member(&entry.path_bytes());
            let wanted = name == config_member || layer_members.contains(&name);
            if wanted && entry.header().entry_type().is_file() && !stored.contains_key(&name) {
                stored.insert(name, self.put_blob(entry, None, &|_| {})?);
            }
        }
        let get = |member: &str| {
            stored.get(member).cloned().ok_or_else(|| {
                malformed(path, format!("manifest.json names {member}, which the archive lacks"))
            })
        };
        let (config_digest, _) = get(&config_member)?;
        let cfg = oci::parse_config(&self.read_blob(&config_digest)?)
            .map_err(|e| malformed(path, format!("the image config is not valid JSON: {e}")))?;
        let (mut layers, mut size) = (Vec::new(), 0);
        for l in &layer_members {
            let (d, n) = get(l)?;
            layers.push(d);
            size += n;
        }
        Ok(ImageRecord {
            names: vec![],
            id: config_digest,
            manifest_digest: None,
            layers,
            config: cfg,
            size,
            created_at: now(),
        })
    }

    fn import_rootfs_tar(&self, path: &Path, diff_id: &Digest) -> Result<ImageRecord, ImportError> {
        let (layer, size) = self.store_file(path, None)?;
        // The diff id makes the config (and so the image id) unique to this content.
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": [ROOTFS_ENV], "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids": [diff_id.to_string()] },
            "history": [{ "created_by": "hearth image import (root filesystem tar)" }],
        })
        .to_string();
        let (id, _) = self.put_blob(config.as_bytes(), None, &|_| {})?;
        let cfg = oci::parse_config(config.as_bytes())
            .map_err(|e| malformed(path, format!("synthesized config: {e}")))?;
        Ok(ImageRecord {
            names: vec![],
            id,
            manifest_digest: None,
            layers: vec![layer],
            config: cfg,
            size,
            created_at: now(),
        })
    }
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
