//! VM disks on a thin pool: each image's base filesystem written once into a thin device of
//! its own, each VM's root disk a thin snapshot of it, so a VM's disk costs the same whatever
//! the image's size.
//!
//! What exists is recorded in `devices.json` beside the pool's files, written atomically
//! *before* each device is made and marked ready after: a crash between any two steps leaves
//! an entry that is not ready, and [`ThinDisks::recover`] deletes its device (whether or not
//! the crash came before the device was made) and the entry. So there is never a thin device
//! without an entry, nor a ready entry without its device.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::thin::Pool;
use super::Control;

/// One thin device of the pool: its id, its size, whether it is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dev {
    pub id: u32,
    pub bytes: u64,
    pub ready: bool,
}

/// `devices.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Devices {
    pub next_id: u32,
    /// Base filesystems, by image id.
    pub bases: BTreeMap<String, Dev>,
    /// Root disks, by VM id, with the base they were made from.
    pub vms: BTreeMap<String, Dev>,
}

/// VM disks on the thin pool `pool`, recorded in `state`.
#[derive(Debug)]
pub struct ThinDisks {
    pub pool: String,
    pub state: PathBuf,
    lock: Mutex<()>,
}

fn base_name(image: &str) -> String {
    format!("hearth-base-{}", &image[..image.len().min(16)])
}
fn vm_name(vm: &str) -> String {
    format!("hearth-vm-{vm}")
}

impl ThinDisks {
    pub fn new(pool: &str, state: PathBuf) -> Self {
        Self { pool: pool.to_owned(), state, lock: Mutex::new(()) }
    }

    fn load(&self) -> io::Result<Devices> {
        match std::fs::read(&self.state) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| io::Error::other(format!("{}: {e}", self.state.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Devices::default()),
            Err(e) => Err(e),
        }
    }

    fn save(&self, d: &Devices) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(d).map_err(io::Error::other)?;
        hearth_fs::atomic_write(&self.state, &json)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is recorded.
    pub fn devices(&self) -> io::Result<Devices> {
        let _g = self.guard();
        self.load()
    }

    /// Deletes every device a crash left half made, and its entry; returns their names.
    pub fn recover(&self, dm: &Control) -> io::Result<Vec<String>> {
        let _g = self.guard();
        let mut d = self.load()?;
        let pool = Pool { dm, name: self.pool.clone() };
        let mut cleaned = Vec::new();
        let half: Vec<(bool, String, Dev)> = (d.bases.iter().map(|(k, v)| (true, k.clone(), *v)))
            .chain(d.vms.iter().map(|(k, v)| (false, k.clone(), *v)))
            .filter(|(_, _, v)| !v.ready)
            .collect();
        for (base, key, dev) in half {
            let name = if base { base_name(&key) } else { vm_name(&key) };
            pool.deactivate(&name)?;
            pool.delete(dev.id)?;
            if base {
                d.bases.remove(&key);
            } else {
                d.vms.remove(&key);
            }
            self.save(&d)?;
            cleaned.push(name);
        }
        Ok(cleaned)
    }

    /// Records a new device under `key` (not ready) and returns its id.
    fn reserve(&self, d: &mut Devices, base: bool, key: &str, bytes: u64) -> io::Result<u32> {
        let id = d.next_id;
        d.next_id =
            d.next_id.checked_add(1).ok_or_else(|| io::Error::other("thin ids exhausted"))?;
        let dev = Dev { id, bytes, ready: false };
        if base {
            d.bases.insert(key.to_owned(), dev);
        } else {
            d.vms.insert(key.to_owned(), dev);
        }
        self.save(d)?;
        Ok(id)
    }

    /// Drops a device that failed half way: deactivated, deleted, its entry gone.
    fn undo(&self, pool: &Pool<'_>, d: &mut Devices, base: bool, key: &str, id: u32) {
        let name = if base { base_name(key) } else { vm_name(key) };
        let _ = pool.deactivate(&name);
        let _ = pool.delete(id);
        if base {
            d.bases.remove(key);
        } else {
            d.vms.remove(key);
        }
        let _ = self.save(d);
    }

    /// The thin device holding image `image`'s base filesystem (the file `base`), written once.
    fn base(&self, pool: &Pool<'_>, d: &mut Devices, image: &str, base: &Path) -> io::Result<Dev> {
        if let Some(dev) = d.bases.get(image).filter(|b| b.ready) {
            return Ok(*dev);
        }
        let src = File::open(base)?;
        let bytes = src.metadata()?.len();
        let id = self.reserve(d, true, image, bytes)?;
        let made = (|| {
            pool.create_thin(id)?;
            let node = pool.activate(&base_name(image), id, bytes)?;
            let dst = OpenOptions::new().write(true).open(&node)?;
            crate::copy_data(&src, &dst, bytes)?;
            dst.sync_all()?;
            drop(dst);
            pool.deactivate(&base_name(image))?;
            Ok(())
        })();
        if let Err(e) = made {
            self.undo(pool, d, true, image, id);
            return Err(e);
        }
        let dev = Dev { id, bytes, ready: true };
        d.bases.insert(image.to_owned(), dev);
        self.save(d)?;
        Ok(dev)
    }

    /// The root disk of VM `vm`: a snapshot of image `image`'s base (made from the file `base`
    /// when the pool has none yet), of `bytes`, its filesystem grown to fill it; active, and
    /// returned as its device node. Made once: a second call activates what is there.
    pub fn create(
        &self,
        dm: &Control,
        vm: &str,
        image: &str,
        base: &Path,
        bytes: u64,
    ) -> Result<PathBuf, crate::StorageError> {
        let _g = self.guard();
        let pool = Pool { dm, name: self.pool.clone() };
        let io = |e: io::Error| crate::StorageError::Io { path: self.state.clone(), source: e };
        let mut d = self.load().map_err(io)?;
        if let Some(dev) = d.vms.get(vm).filter(|v| v.ready) {
            return pool.activate(&vm_name(vm), dev.id, dev.bytes).map_err(io);
        }
        if let Some(dev) = d.vms.get(vm).copied() {
            self.undo(&pool, &mut d, false, vm, dev.id);
        }
        let origin = self.base(&pool, &mut d, image, base).map_err(io)?;
        if bytes < origin.bytes {
            return Err(crate::StorageError::TooSmall { requested: bytes, base: origin.bytes });
        }
        let id = self.reserve(&mut d, false, vm, bytes).map_err(io)?;
        let made = (|| {
            pool.create_snap(id, origin.id).map_err(io)?;
            let node = pool.activate(&vm_name(vm), id, bytes).map_err(io)?;
            if bytes > origin.bytes {
                crate::grow_filesystem(&node)?;
            }
            Ok(node)
        })();
        match made {
            Ok(node) => {
                d.vms.insert(vm.to_owned(), Dev { id, bytes, ready: true });
                self.save(&d).map_err(io)?;
                Ok(node)
            }
            Err(e) => {
                self.undo(&pool, &mut d, false, vm, id);
                Err(e)
            }
        }
    }

    /// Whether VM `vm` has a whole root disk on the pool.
    pub fn has(&self, vm: &str) -> bool {
        self.devices().is_ok_and(|d| d.vms.get(vm).is_some_and(|v| v.ready))
    }

    /// The VM's root disk, activated (after a host reboot it is not), `None` when the pool
    /// has none for it.
    pub fn attach(&self, dm: &Control, vm: &str) -> io::Result<Option<PathBuf>> {
        let _g = self.guard();
        let d = self.load()?;
        let Some(dev) = d.vms.get(vm).filter(|v| v.ready) else { return Ok(None) };
        let pool = Pool { dm, name: self.pool.clone() };
        pool.activate(&vm_name(vm), dev.id, dev.bytes).map(Some)
    }

    /// Removes image `image`'s base from the pool (snapshots made from it keep the blocks they
    /// share: a thin snapshot does not need its origin); `Ok(false)` when it had none.
    pub fn remove_base(&self, dm: &Control, image: &str) -> io::Result<bool> {
        let _g = self.guard();
        let mut d = self.load()?;
        let Some(dev) = d.bases.get(image).copied() else { return Ok(false) };
        let pool = Pool { dm, name: self.pool.clone() };
        pool.deactivate(&base_name(image))?;
        pool.delete(dev.id)?;
        d.bases.remove(image);
        self.save(&d)?;
        Ok(true)
    }

    /// Removes VM `vm`'s root disk from the pool; `Ok(false)` when it had none there.
    pub fn remove(&self, dm: &Control, vm: &str) -> io::Result<bool> {
        let _g = self.guard();
        let mut d = self.load()?;
        let Some(dev) = d.vms.get(vm).copied() else { return Ok(false) };
        let pool = Pool { dm, name: self.pool.clone() };
        pool.deactivate(&vm_name(vm))?;
        pool.delete(dev.id)?;
        d.vms.remove(vm);
        self.save(&d)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_fit_device_mappers_limit() {
        assert_eq!(base_name(&"ab".repeat(32)), format!("hearth-base-{}", "ab".repeat(8)));
        assert!(vm_name(&"x".repeat(64)).len() < 128);
    }

    #[test]
    fn a_reservation_is_recorded_before_the_device_and_ids_never_repeat() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = ThinDisks::new("pool", dir.path().join("devices.json"));
        let mut d = Devices::default();
        let a = t.reserve(&mut d, false, "vm1", 1 << 30).expect("reserve");
        let b = t.reserve(&mut d, true, "img", 1 << 20).expect("reserve");
        assert_ne!(a, b);
        let saved = t.devices().expect("load");
        assert_eq!(saved.vms["vm1"], Dev { id: a, bytes: 1 << 30, ready: false });
        assert_eq!(saved.next_id, 2);
        assert!(!t.has("vm1"), "not ready until made");
    }
}
