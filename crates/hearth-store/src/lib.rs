//! hearth's state store.
//!
//! One directory per VM under `ROOT/vms/<id>/`, holding `record.json` (spec, desired state and
//! observed status) beside the VM's files. Every write goes to a temporary file that is fsynced
//! and renamed over the old one, then the directory is fsynced: a crash leaves either the old or
//! the new record, never a torn one (docs/adr/0001-json-state-store.md).
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hearth_types::{VmId, VmRecord};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record {path} is corrupt; hearth leaves this VM alone: repair the file, or remove its directory once no VMM runs for it")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    hearth_fs::atomic_write(path, bytes)
        .map_err(|source| StoreError::Io { path: path.to_owned(), source })
}

/// The VM records of one hearth root.
#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
    /// Corrupt records already reported, so each is logged once, not on every listing.
    reported: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
}

impl VmStore {
    /// Opens (creating) `ROOT/vms`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("vms");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir, reported: Default::default() })
    }

    /// The directory that holds a VM's record and files.
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    /// Persists a record (creating the VM's directory on first save).
    pub fn save(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let dir = self.vm_dir(&rec.spec.id);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join("record.json");
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        atomic_write(&path, &bytes)
    }

    /// Loads one record; `None` when the VM does not exist.
    pub fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        let path = self.vm_dir(id).join("record.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Every record, oldest first. Directories without a record (a crash before the first save)
    /// are skipped, and so are corrupt records: one bad file must not stop listings and recovery
    /// of every other VM. Each corrupt record is logged once, with what to do about it.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let Ok(id) = entry.file_name().to_string_lossy().parse::<VmId>() else { continue };
            match self.get(&id) {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(e @ StoreError::Corrupt { .. }) => {
                    let path = self.vm_dir(&id).join("record.json");
                    if self.reported.lock().unwrap_or_else(|p| p.into_inner()).insert(path) {
                        tracing::warn!(vm = %id, error = %e, "skipping a corrupt VM record");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| {
            (a.spec.created_at, a.spec.id.as_str()).cmp(&(b.spec.created_at, b.spec.id.as_str()))
        });
        Ok(out)
    }

    /// Removes the VM's directory and everything in it. Removing what is already gone succeeds.
    pub fn remove(&self, id: &VmId) -> Result<(), StoreError> {
        let dir = self.vm_dir(id);
        // Remove the record last-but-atomically: rename the dir away first so a crash mid-way
        // never leaves a record pointing at half-deleted files.
        let trash = self.dir.join(format!(".{}.deleting", id.as_str()));
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path: dir, source }),
        }
        match fs::remove_dir_all(&trash) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path: trash, source }),
        }
    }

    /// Clears what a crash left: finishes interrupted deletions, removes VM directories that
    /// never got a record (a crash before the first save) and temporary files in VM directories.
    /// Only for a daemon start, when nothing else writes. Returns the paths removed.
    pub fn sweep(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().map_err(io_err(&p))?.is_dir();
            if name.ends_with(".deleting")
                || (is_dir && name.parse::<VmId>().is_ok() && !p.join("record.json").exists())
            {
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
                removed.push(p);
            } else if is_dir && name.parse::<VmId>().is_ok() {
                for f in fs::read_dir(&p).map_err(io_err(&p))? {
                    let f = f.map_err(io_err(&p))?;
                    if f.file_name().to_string_lossy().ends_with(".tmp")
                        && f.file_type().is_ok_and(|t| t.is_file())
                    {
                        fs::remove_file(f.path()).map_err(io_err(&f.path()))?;
                        removed.push(f.path());
                    }
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_types::Desired;

    fn record(n: u8, created_at: u64) -> VmRecord {
        let mut r = hearth_testkit::record(n, Desired::Running, Default::default());
        r.spec.created_at = created_at;
        r
    }

    #[test]
    fn save_get_list_remove() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = VmStore::open(root.path()).expect("open");
        let (a, b) = (record(2, 10), record(1, 20));
        store.save(&b).expect("save");
        store.save(&a).expect("save");
        assert_eq!(store.get(&a.spec.id).expect("get"), Some(a.clone()));
        let names: Vec<_> = store.list().expect("list").into_iter().map(|r| r.spec.name).collect();
        assert_eq!(names, ["vm2", "vm1"]);
        store.remove(&a.spec.id).expect("remove");
        store.remove(&a.spec.id).expect("remove twice");
        assert_eq!(store.get(&a.spec.id).expect("get"), None);
        assert!(!store.vm_dir(&a.spec.id).exists());
    }

    #[test]
    fn overwrite_leaves_no_temp_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = VmStore::open(root.path()).expect("open");
        let mut a = record(3, 1);
        store.save(&a).expect("save");
        a.desired = Desired::Stopped;
        store.save(&a).expect("save again");
        let files: Vec<_> = fs::read_dir(store.vm_dir(&a.spec.id))
            .expect("dir")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(files, ["record.json"]);
        assert_eq!(store.get(&a.spec.id).expect("get").map(|r| r.desired), Some(Desired::Stopped));
    }

    #[test]
    fn sweep_removes_crash_leftovers_and_keeps_vms() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = VmStore::open(root.path()).expect("open");
        let kept = record(5, 1);
        store.save(&kept).expect("save");
        let dir = store.vm_dir(&kept.spec.id);
        fs::write(dir.join("disk.img"), b"disk").expect("disk");
        fs::write(dir.join("disk.img.0123.tmp"), b"half").expect("tmp");
        fs::write(dir.join(".record.json.77.tmp"), b"{").expect("tmp");
        let orphan = store.vm_dir(&record(6, 1).spec.id);
        fs::create_dir_all(orphan.join("ssh")).expect("orphan");
        fs::create_dir_all(root.path().join("vms/.x.deleting/sub")).expect("deleting");
        let removed = store.sweep().expect("sweep");
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(!orphan.exists() && !root.path().join("vms/.x.deleting").exists());
        let mut left: Vec<_> =
            fs::read_dir(&dir).expect("dir").map(|e| e.expect("e").file_name()).collect();
        left.sort();
        assert_eq!(left, ["disk.img", "record.json"]);
        assert_eq!(store.get(&kept.spec.id).expect("get"), Some(kept));
    }

    #[test]
    fn corrupt_record_is_named() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = VmStore::open(root.path()).expect("open");
        let a = record(4, 1);
        store.save(&a).expect("save");
        fs::write(store.vm_dir(&a.spec.id).join("record.json"), b"{").expect("write");
        let err = store.get(&a.spec.id).expect_err("corrupt");
        assert!(err.to_string().contains("record.json"), "{err}");
        // Listings skip it and keep every other VM.
        let b = record(5, 2);
        store.save(&b).expect("save");
        let listed = store.list().expect("a corrupt record does not fail the listing");
        assert_eq!(listed, [b]);
    }
}
