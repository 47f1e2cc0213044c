//! hearth's thin pool on files (Flintlock's `--dev` mode): sparse data and metadata files in a
//! directory, each on a loop device, under a `thin-pool` table. [`DevPool::ensure`] is
//! idempotent and is what a host reboot needs too: files kept (never truncated), loop devices
//! found again or attached, the pool's device found live or made again from its metadata, which
//! the files keep. [`DevPool::plan`] says what it would do, changing nothing.

use std::io;
use std::path::{Path, PathBuf};

use super::{thin, Control};
use hearth_fs::loopdev;

/// The pool's device-mapper name unless configured otherwise.
pub const DEFAULT_NAME: &str = "hearth-thinpool";

/// Where and how large a pool on files is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPool {
    /// The directory of its `data` and `metadata` files.
    pub dir: PathBuf,
    /// Its device-mapper name.
    pub name: String,
    pub data_bytes: u64,
    pub metadata_bytes: u64,
}

/// One step of a set-up, for a plan or a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    MakeFile { path: PathBuf, bytes: u64 },
    Attach { file: PathBuf },
    CreatePool { name: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::MakeFile { path, bytes } => {
                write!(
                    f,
                    "make the sparse file {} ({})",
                    path.display(),
                    hearth_types::format_size(*bytes)
                )
            }
            Step::Attach { file } => write!(f, "attach {} to a loop device", file.display()),
            Step::CreatePool { name } => write!(f, "create the thin pool {name} (device-mapper)"),
        }
    }
}

impl DevPool {
    pub fn data_file(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn metadata_file(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    /// What [`Self::ensure`] would do now; `dm` is `None` where device-mapper is not there
    /// (the plan then includes the pool).
    pub fn plan(&self, dm: Option<&Control>) -> io::Result<Vec<Step>> {
        let mut steps = Vec::new();
        for (file, bytes) in
            [(self.metadata_file(), self.metadata_bytes), (self.data_file(), self.data_bytes)]
        {
            let exists = file.is_file();
            if !exists {
                steps.push(Step::MakeFile { path: file.clone(), bytes });
            }
            if !exists || loopdev::find(&file)?.is_none() {
                steps.push(Step::Attach { file });
            }
        }
        let live = match dm {
            Some(dm) => dm.info(&self.name)?.is_some_and(|i| i.active),
            None => false,
        };
        if !live {
            steps.push(Step::CreatePool { name: self.name.clone() });
        }
        Ok(steps)
    }

    /// Makes what is missing of the pool; returns the steps it took (none when all was there).
    /// A live pool of this name on other devices is refused, never replaced.
    pub fn ensure(&self, dm: &Control) -> io::Result<Vec<Step>> {
        let steps = self.plan(Some(dm))?;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for s in &steps {
            if let Step::MakeFile { path, bytes } = s {
                make_sparse(path, *bytes)?;
            }
        }
        let metadata = loopdev::attach(&self.metadata_file())?;
        let data = loopdev::attach(&self.data_file())?;
        let data_len = std::fs::metadata(self.data_file())?.len();
        let (meta_dev, data_dev) = (block_dev(&metadata)?, block_dev(&data)?);
        let table =
            thin::pool_table(&super::dev_name(meta_dev), &super::dev_name(data_dev), data_len);
        match dm.info(&self.name)? {
            Some(info) if info.active => {
                let live = dm.status(&self.name, true)?;
                let same = live.first().is_some_and(|t| {
                    t.kind == "thin-pool"
                        && t.params
                            .split_whitespace()
                            .take(2)
                            .eq(table.params.split_whitespace().take(2))
                });
                if !same {
                    return Err(io::Error::other(format!(
                        "a device-mapper device {} exists on other devices ({live:?}): remove it (dmsetup remove {}) or name another pool",
                        self.name, self.name
                    )));
                }
            }
            found => {
                if found.is_none() {
                    dm.create(&self.name, "")?;
                }
                if let Err(e) = dm.load(&self.name, &[table]).and_then(|()| dm.resume(&self.name)) {
                    let _ = dm.remove(&self.name);
                    return Err(e);
                }
            }
        }
        Ok(steps)
    }

    /// The pool, for thin devices and usage.
    pub fn pool<'a>(&self, dm: &'a Control) -> thin::Pool<'a> {
        thin::Pool { dm, name: self.name.clone() }
    }
}

/// A new sparse file of `bytes` (created, never truncating one that exists).
fn make_sparse(path: &Path, bytes: u64) -> io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.set_len(bytes)?;
    f.sync_all()
}

/// The device number of a block device node.
fn block_dev(node: &Path) -> io::Result<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(node)?;
    if !m.file_type().is_block_device() {
        return Err(io::Error::other(format!("{} is not a block device", node.display())));
    }
    Ok(m.rdev())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_of_a_pool_not_made_yet_is_every_step_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = DevPool {
            dir: dir.path().join("pool"),
            name: "hearth-test-pool".into(),
            data_bytes: 1 << 30,
            metadata_bytes: 16 << 20,
        };
        let steps = p.plan(None).expect("plan");
        assert_eq!(steps.len(), 5, "{steps:?}");
        assert_eq!(steps[0], Step::MakeFile { path: p.metadata_file(), bytes: 16 << 20 });
        assert_eq!(steps[4], Step::CreatePool { name: "hearth-test-pool".into() });
        assert!(steps[1].to_string().contains("loop device"));
        assert!(!p.dir.exists(), "a plan makes nothing");
    }
}
