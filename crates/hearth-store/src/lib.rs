//! hearth's state store.
//!
//! One directory per VM under `ROOT/vms/<id>/`, holding `record.json` (spec, desired state and
//! observed status) beside the VM's files. Every write goes to a temporary file that is fsynced
//! and renamed over the old one, then the directory is fsynced: a crash leaves either the old or
//! the new record, never a torn one (docs/adr/0001-json-state-store.md).
#![forbid(unsafe_code)]

use std::fs::{self, File};
use std::io::{self, Write};
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
    #[error("record {path} is corrupt; move it away to let hearthd start")]
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
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(())
}

/// The VM records of one hearth root.
#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
}

impl VmStore {
    /// Opens (creating) `ROOT/vms`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("vms");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self { dir })
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
        let bytes = serde_json::to_vec_pretty(rec).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        atomic_write(&path, &bytes)
    }

    /// Loads one record; `None` when the VM does not exist.
    pub fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        let path = self.vm_dir(id).join("record.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Every record, oldest first. Directories without a record (a crash before the first save)
    /// are skipped.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let Ok(id) = entry.file_name().to_string_lossy().parse::<VmId>() else { continue };
            if let Some(rec) = self.get(&id)? {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| (a.spec.created_at, a.spec.id.as_str()).cmp(&(b.spec.created_at, b.spec.id.as_str())));
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

    /// Finishes deletions a crash interrupted.
    pub fn sweep(&self) -> Result<(), StoreError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if entry.file_name().to_string_lossy().ends_with(".deleting") {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
        Ok(())
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
        let files: Vec<_> = fs::read_dir(store.vm_dir(&a.spec.id)).expect("dir").map(|e| e.expect("e").file_name()).collect();
        assert_eq!(files, ["record.json"]);
        assert_eq!(store.get(&a.spec.id).expect("get").map(|r| r.desired), Some(Desired::Stopped));
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
    }
}
