//! Importing images from files: an OCI layout directory, a `docker save` archive, or a plain
//! root filesystem tar (optionally gzip/zstd compressed).

use std::fs;
use std::io::{BufReader, Read};
use std::path::Path;

use hearth_types::{Digest, ImageRecord, ImageRef};
use serde::Deserialize;

use crate::oci::{self, Manifest};
use crate::{now, ImageError, ImageStore};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

/// The config a plain rootfs tar gets: a shell, and the usual PATH.
const ROOTFS_CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

/// Does this tar hold a top-level `manifest.json` (a docker archive)?
fn is_docker_archive(path: &Path) -> Result<bool, ImageError> {
    let f = fs::File::open(path).map_err(io(path))?;
    let Ok(r) = crate::rootfs::decompress(BufReader::new(f)) else { return Ok(false) };
    let mut ar = tar::Archive::new(r);
    let Ok(entries) = ar.entries() else { return Ok(false) };
    for e in entries {
        let Ok(e) = e else { return Ok(false) };
        if e.path().map(|p| p == Path::new("manifest.json") || p == Path::new("./manifest.json")).unwrap_or(false) {
            return Ok(true);
        }
    }
    Ok(false)
}

impl ImageStore {
    /// Imports `path` under `name`, detecting its kind.
    pub fn import(&self, path: &Path, name: &ImageRef) -> Result<ImageRecord, ImageError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        let rec = if meta.is_dir() {
            if !path.join("oci-layout").exists() || !path.join("index.json").exists() {
                return Err(ImageError::Format(format!(
                    "{} is a directory but not an OCI layout (no oci-layout and index.json)",
                    path.display()
                )));
            }
            self.import_oci_layout(path, name)?
        } else if is_docker_archive(path)? {
            self.import_docker_archive(path, name)?
        } else {
            self.import_rootfs_tar(path, name)?
        };
        self.save(&rec)?;
        Ok(self.get(&rec.id.to_string())?.unwrap_or(rec))
    }

    fn put_file(&self, path: &Path, expected: Option<&Digest>) -> Result<(Digest, u64), ImageError> {
        let f = fs::File::open(path).map_err(io(path))?;
        self.put_blob(f, expected, &|_| {})
    }

    fn import_oci_layout(&self, dir: &Path, name: &ImageRef) -> Result<ImageRecord, ImageError> {
        let blob = |d: &str| -> Result<(Digest, std::path::PathBuf), ImageError> {
            let dg: Digest = d.parse().map_err(|_| ImageError::Format(format!("bad digest {d} in the OCI layout")))?;
            let p = dir.join("blobs/sha256").join(dg.hex());
            Ok((dg, p))
        };
        let index_path = dir.join("index.json");
        let index: Manifest = serde_json::from_slice(&fs::read(&index_path).map_err(io(&index_path))?)
            .map_err(|e| ImageError::Format(format!("index.json: {e}")))?;
        let first = index.manifests.first().ok_or_else(|| ImageError::Format("index.json lists no manifests".into()))?;
        let (mut mdg, mut mpath) = blob(&first.digest)?;
        self.put_file(&mpath, Some(&mdg))?;
        let mut m: Manifest = serde_json::from_slice(&self.read_blob(&mdg)?).map_err(|e| ImageError::Format(format!("manifest: {e}")))?;
        if m.is_index() {
            (mdg, mpath) = blob(&m.pick_amd64().map_err(ImageError::Format)?.digest.clone())?;
            self.put_file(&mpath, Some(&mdg))?;
            m = serde_json::from_slice(&self.read_blob(&mdg)?).map_err(|e| ImageError::Format(format!("manifest: {e}")))?;
        }
        let config = m.config.clone().ok_or_else(|| ImageError::Format("manifest has no config".into()))?;
        let (cdg, cpath) = blob(&config.digest)?;
        self.put_file(&cpath, Some(&cdg))?;
        let mut layers = Vec::new();
        let mut size = 0;
        for l in &m.layers {
            let (dg, p) = blob(&l.digest)?;
            let (_, n) = self.put_file(&p, Some(&dg))?;
            layers.push(dg);
            size += n;
        }
        let cfg = oci::parse_config(&self.read_blob(&cdg)?).map_err(|e| ImageError::Format(format!("image config: {e}")))?;
        Ok(ImageRecord { names: vec![name.to_string()], id: cdg, manifest_digest: Some(mdg), layers, config: cfg, size, created_at: now() })
    }

    fn import_docker_archive(&self, path: &Path, name: &ImageRef) -> Result<ImageRecord, ImageError> {
        let staging = self.tmp_path("docker-archive");
        let result = (|| {
            fs::create_dir_all(&staging).map_err(io(&staging))?;
            let f = fs::File::open(path).map_err(io(path))?;
            let mut ar = tar::Archive::new(crate::rootfs::decompress(BufReader::new(f)).map_err(io(path))?);
            // The archive's own files only (manifest, config, layer tars): unpack_in refuses
            // paths that would leave the staging directory.
            for e in ar.entries().map_err(io(path))? {
                let mut e = e.map_err(io(path))?;
                if !e.unpack_in(&staging).map_err(io(path))? {
                    return Err(ImageError::Format(format!("{}: archive entry escapes; refused", path.display())));
                }
            }
            let mpath = staging.join("manifest.json");
            let manifests: Vec<DockerManifest> = serde_json::from_slice(&fs::read(&mpath).map_err(io(&mpath))?)
                .map_err(|e| ImageError::Format(format!("manifest.json: {e}")))?;
            let m = manifests.first().ok_or_else(|| ImageError::Format("manifest.json lists no image".into()))?;
            let inside = |rel: &str| -> Result<std::path::PathBuf, ImageError> {
                if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
                    return Err(ImageError::Format(format!("manifest.json names {rel}, outside the archive")));
                }
                Ok(staging.join(rel))
            };
            let (cdg, _) = self.put_file(&inside(&m.config)?, None)?;
            let mut layers = Vec::new();
            let mut size = 0;
            for l in &m.layers {
                let (dg, n) = self.put_file(&inside(l)?, None)?;
                layers.push(dg);
                size += n;
            }
            let cfg = oci::parse_config(&self.read_blob(&cdg)?).map_err(|e| ImageError::Format(format!("image config: {e}")))?;
            Ok(ImageRecord { names: vec![name.to_string()], id: cdg, manifest_digest: None, layers, config: cfg, size, created_at: now() })
        })();
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn import_rootfs_tar(&self, path: &Path, name: &ImageRef) -> Result<ImageRecord, ImageError> {
        // Check it really is a tar before storing it.
        let f = fs::File::open(path).map_err(io(path))?;
        let mut r = crate::rootfs::decompress(BufReader::new(f)).map_err(io(path))?;
        let mut block = [0u8; 512];
        r.read_exact(&mut block)
            .map_err(|_| ImageError::Format(format!("{} is not a tar archive, OCI layout or docker archive", path.display())))?;
        if &block[257..262] != b"ustar" {
            return Err(ImageError::Format(format!("{} is not a tar archive, OCI layout or docker archive", path.display())));
        }
        let (layer, size) = self.put_file(path, None)?;
        let (cdg, _) = self.put_blob(ROOTFS_CONFIG.as_bytes(), None, &|_| {})?;
        let cfg = oci::parse_config(ROOTFS_CONFIG.as_bytes()).map_err(|e| ImageError::Format(e.to_string()))?;
        // The same config for every rootfs tar would give them all one id: mix in the layer.
        let id_src = format!("{}\n{}", ROOTFS_CONFIG, layer);
        let (id, _) = self.put_blob(id_src.as_bytes(), None, &|_| {})?;
        let _ = cdg;
        Ok(ImageRecord {
            names: vec![name.to_string()],
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
mod tests {
    use super::*;

    fn rootfs_tar(dir: &Path) -> std::path::PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "bin/hello", &b"hello"[..]).expect("append");
        let p = dir.join("rootfs.tar");
        fs::write(&p, b.into_inner().expect("tar")).expect("write");
        p
    }

    #[test]
    fn rootfs_tar_import_and_lookup() {
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(&t.path().join("root")).expect("open");
        let name: ImageRef = "demo:1".parse().expect("ref");
        let rec = s.import(&rootfs_tar(t.path()), &name).expect("import");
        assert_eq!(rec.config.cmd, ["/bin/sh"]);
        assert_eq!(s.get("demo:1").expect("get").map(|r| r.id.clone()), Some(rec.id.clone()));
        assert_eq!(s.get(&rec.id.hex()[..8]).expect("prefix").map(|r| r.id), Some(rec.id.clone()));
        let dir = t.path().join("out");
        s.unpack_to(&rec, &dir).expect("unpack");
        assert_eq!(fs::read(dir.join("bin/hello")).expect("file"), b"hello");
        s.remove("demo:1").expect("rm");
        assert!(s.list().expect("list").is_empty());
        assert!(!s.blob_path(&rec.layers[0]).exists(), "unused blobs are removed");
    }

    #[test]
    fn junk_is_refused_clearly() {
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(&t.path().join("root")).expect("open");
        let p = t.path().join("junk");
        fs::write(&p, vec![7u8; 2048]).expect("write");
        let e = s.import(&p, &"x:1".parse().expect("ref")).expect_err("junk");
        assert!(e.to_string().contains("not a tar archive"), "{e}");
        assert!(s.list().expect("list").is_empty());
    }
}

#[cfg(test)]
mod docker_archive_tests {
    use super::*;

    #[test]
    fn docker_save_archive_import() {
        let t = tempfile::tempdir().expect("tmp");
        let s = ImageStore::open(&t.path().join("root")).expect("open");
        let mut layer = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        layer.append_data(&mut h, "etc/x", &b"hi"[..]).expect("append");
        let layer = layer.into_inner().expect("layer");
        let config = br#"{"config":{"Entrypoint":["/bin/app"],"WorkingDir":"/srv"}}"#;
        let manifest = br#"[{"Config":"cfg.json","RepoTags":["app:1"],"Layers":["l1/layer.tar"]}]"#;
        let mut ar = tar::Builder::new(Vec::new());
        for (name, data) in [("manifest.json", &manifest[..]), ("cfg.json", &config[..]), ("l1/layer.tar", &layer[..])] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            ar.append_data(&mut h, name, data).expect("append");
        }
        let p = t.path().join("saved.tar");
        fs::write(&p, ar.into_inner().expect("archive")).expect("write");
        let rec = s.import(&p, &"app:1".parse().expect("ref")).expect("import");
        assert_eq!((rec.config.entrypoint.clone(), rec.config.working_dir.as_str()), (vec!["/bin/app".to_string()], "/srv"));
        let out = t.path().join("out");
        s.unpack_to(&rec, &out).expect("unpack");
        assert_eq!(fs::read(out.join("etc/x")).expect("x"), b"hi");
        assert!(fs::read_dir(t.path().join("root/images/tmp")).expect("tmp").next().is_none(), "staging removed");
    }
}
