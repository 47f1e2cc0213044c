//! What every provider's launch and stop share: absolute paths, the VMM's cgroup, the tail of
//! its log in a start error, and the kill that ends a stop.

use std::path::Path;
use std::time::Duration;

use crate::process::{kill, wait_exit};
use crate::{LaunchSpec, VmmError};

/// Lines of a VMM's log quoted in a start error.
pub(crate) const TAIL_LINES: usize = 10;
/// How long a SIGKILLed process may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The last non-empty lines of a VMM's log, for a start error.
pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> =
        text.lines().filter(|l| !l.trim().is_empty()).rev().take(TAIL_LINES).collect();
    if lines.is_empty() {
        return format!("{} is empty", path.display());
    }
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// `spec` with every path absolute: a VMM may run from, or chroot into, any directory, and
/// Firecracker resolves the paths of its API calls itself.
pub(crate) fn absolute(spec: &LaunchSpec) -> Result<LaunchSpec, VmmError> {
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(|source| VmmError::Io { path: p.to_owned(), source })
    };
    Ok(LaunchSpec {
        vm_dir: abs(&spec.vm_dir)?,
        kernel: abs(&spec.kernel)?,
        initrd: abs(&spec.initrd)?,
        root_disk: abs(&spec.root_disk)?,
        config_disk: abs(&spec.config_disk)?,
        ..spec.clone()
    })
}

/// The VM's cgroup, with limits from its size (`tcg`: software emulation gets more CPU time),
/// when its confinement names one; `None` with a warning where no cgroup filesystem is usable.
pub(crate) fn cgroup(
    spec: &LaunchSpec,
    tcg: bool,
) -> Result<Option<crate::cgroup::Group>, VmmError> {
    let Some(name) = spec.confinement.cgroup.as_deref() else { return Ok(None) };
    let limits = crate::cgroup::Limits::for_vm(name, spec.cpus, spec.memory_mib, tcg);
    let group = crate::cgroup::Group::create(&limits)
        .map_err(|source| VmmError::Cgroup { name: limits.name.clone(), source })?;
    if group.is_none() {
        tracing::warn!("no usable cgroup filesystem at /sys/fs/cgroup: the VMM runs without memory and CPU limits");
    }
    Ok(group)
}

/// SIGKILL, then waits until the process is gone (bounded: a task stuck in the kernel is
/// reported, not waited on for ever).
pub(crate) async fn kill_and_wait(vmm: &'static str, pid: i32, start: u64) -> Result<(), VmmError> {
    kill(pid, start, libc::SIGKILL);
    tokio::time::timeout(KILL_TIMEOUT, wait_exit(pid, start))
        .await
        .map_err(|_| VmmError::Unkillable { vmm, pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("qemu.log");
        let text: String = (0..30).map(|i| format!("line {i}\n\n")).collect();
        std::fs::write(&p, text).expect("write");
        let t = tail(&p);
        assert_eq!(t.lines().count(), TAIL_LINES);
        assert!(t.starts_with("line 20") && t.ends_with("line 29"), "{t}");
        std::fs::write(&p, "").expect("write");
        assert!(tail(&p).contains("is empty"));
    }
}
