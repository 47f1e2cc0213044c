//! A cgroup of its own for each VMM, with memory, CPU and process limits derived from the VM's
//! size, on cgroup v2 (unified) or v1 (a hierarchy per controller) as the host has them.
//!
//! The VMM is placed in its cgroup before it executes (its first thread writes `0`, "myself", to
//! the group's `cgroup.procs` between fork and exec), so everything it allocates is charged to
//! the group from the first page, and so is the daemon it forks with `-daemonize`.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where cgroup filesystems are mounted.
const MOUNT: &str = "/sys/fs/cgroup";
/// The CFS period quotas are expressed in (100 ms).
const PERIOD_US: u64 = 100_000;

/// The limits of one VMM's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Group path below the hierarchy's root, e.g. `hearth/vm-<id>`.
    pub name: String,
    pub memory_bytes: u64,
    /// CPU time per period, in microseconds of one CPU (`cpus * 100_000` for `cpus` cores).
    pub cpu_quota_us: u64,
    pub pids: u32,
}

impl Limits {
    /// The limits for a VM of `cpus` vCPUs and `memory_mib` of guest memory in group `name`:
    /// the guest's memory plus the VMM's own (a quarter more, at least 256 MiB, and 1 GiB for
    /// TCG's translation cache), one CPU beyond the vCPUs for the VMM's I/O threads, and room
    /// for the VMM's threads but not for a fork bomb.
    pub fn for_vm(name: &str, cpus: u32, memory_mib: u64, tcg: bool) -> Self {
        let guest = memory_mib << 20;
        let overhead = (guest / 4).max(256 << 20) + if tcg { 1 << 30 } else { 0 };
        Self {
            name: name.to_owned(),
            memory_bytes: guest + overhead,
            cpu_quota_us: u64::from(cpus + 1) * PERIOD_US,
            pids: 512,
        }
    }
}

/// How this host mounts cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// One unified hierarchy with the controllers.
    V2(PathBuf),
    /// A hierarchy per controller (memory, cpu, pids).
    V1 { memory: PathBuf, cpu: PathBuf, pids: PathBuf },
}

fn layout() -> Option<Layout> {
    let root = Path::new(MOUNT);
    if root.join("cgroup.controllers").is_file() {
        return Some(Layout::V2(root.to_owned()));
    }
    let (memory, cpu, pids) = (root.join("memory"), root.join("cpu"), root.join("pids"));
    (memory.join("cgroup.procs").is_file()
        && cpu.join("cgroup.procs").is_file()
        && pids.join("cgroup.procs").is_file())
    .then_some(Layout::V1 { memory, cpu, pids })
}

/// A VMM's group, made and limited, with its `cgroup.procs` files open for the VMM to join.
#[derive(Debug)]
pub struct Group {
    dirs: Vec<PathBuf>,
    /// One open `cgroup.procs` per hierarchy; [`Group::join_fds`] hands them to the child.
    procs: Vec<OwnedFd>,
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    fs::write(dir.join(file), value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl Group {
    /// Makes the group with its limits. `Ok(None)` when the host has no cgroup filesystem hearth
    /// can use (a container without one, say): the VMM then runs unconfined by cgroups.
    pub fn create(limits: &Limits) -> io::Result<Option<Self>> {
        let Some(layout) = layout() else { return Ok(None) };
        let mut g = Self { dirs: Vec::new(), procs: Vec::new() };
        let made = match layout {
            Layout::V2(root) => g.make_v2(&root, limits),
            Layout::V1 { memory, cpu, pids } => g.make_v1(&memory, &cpu, &pids, limits),
        };
        match made {
            Ok(()) => Ok(Some(g)),
            Err(e) => {
                g.remove();
                Err(e)
            }
        }
    }

    fn make_dir(&mut self, dir: PathBuf) -> io::Result<PathBuf> {
        fs::create_dir_all(&dir)?;
        self.dirs.push(dir.clone());
        self.procs.push(OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?.into());
        Ok(dir)
    }

    fn make_v2(&mut self, root: &Path, l: &Limits) -> io::Result<()> {
        // Each level below the root must hand the controllers down to the next.
        let mut at = root.to_owned();
        for part in Path::new(&l.name).parent().into_iter().flat_map(|p| p.components()) {
            write(&at, "cgroup.subtree_control", "+memory +cpu +pids")?;
            at.push(part);
            fs::create_dir_all(&at)?;
        }
        write(&at, "cgroup.subtree_control", "+memory +cpu +pids")?;
        let dir = self.make_dir(root.join(&l.name))?;
        write(&dir, "memory.max", &l.memory_bytes.to_string())?;
        write(&dir, "memory.swap.max", "0").or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        write(&dir, "cpu.max", &format!("{} {PERIOD_US}", l.cpu_quota_us))?;
        write(&dir, "pids.max", &l.pids.to_string())
    }

    fn make_v1(&mut self, memory: &Path, cpu: &Path, pids: &Path, l: &Limits) -> io::Result<()> {
        let m = self.make_dir(memory.join(&l.name))?;
        write(&m, "memory.limit_in_bytes", &l.memory_bytes.to_string())?;
        let c = self.make_dir(cpu.join(&l.name))?;
        write(&c, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
        write(&c, "cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
        let p = self.make_dir(pids.join(&l.name))?;
        write(&p, "pids.max", &l.pids.to_string())
    }

    /// The raw `cgroup.procs` descriptors the child writes `0` to before it executes.
    pub fn join_fds(&self) -> Vec<i32> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Removes the group's directories (they must be empty of processes).
    pub fn remove(&self) {
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Removes the group a VM's VMM had, once the VMM is gone (its processes left it with it).
pub fn remove(limits_name: &str) {
    let dirs: Vec<PathBuf> = match layout() {
        Some(Layout::V2(root)) => vec![root.join(limits_name)],
        Some(Layout::V1 { memory, cpu, pids }) => {
            vec![memory.join(limits_name), cpu.join(limits_name), pids.join(limits_name)]
        }
        None => vec![],
    };
    for d in dirs {
        match fs::remove_dir(&d) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(dir = %d.display(), error = %e, "removing a VMM's cgroup failed")
            }
            _ => {}
        }
    }
}

/// The group name of a VM under `parent`.
pub fn name(parent: &str, id: &str) -> String {
    format!("{}/vm-{id}", parent.trim_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vms_size() {
        let l = Limits::for_vm(&name("/hearth/", "abc"), 2, 512, false);
        assert_eq!(l.name, "hearth/vm-abc");
        assert_eq!(l.memory_bytes, (512 + 256) << 20);
        assert_eq!(l.cpu_quota_us, 300_000);
        let big = Limits::for_vm("hearth/vm-abc", 1, 8192, true);
        assert_eq!(big.memory_bytes, (8192 + 2048 + 1024) << 20);
    }
}
