//! What every provider's launch and stop share: absolute paths, the VMM's cgroup, starting a
//! VMM and setting it up through its API (killed, with the tail of its log in the error, when
//! that fails), the runtime files it leaves, and the kill that ends a stop.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hearth_types::Accel;

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

/// A KVM-only VMM's refusal of `--accel tcg`, and its warning where KVM may not run guests.
pub(crate) fn kvm_only(vmm: &str, spec: &LaunchSpec) -> Result<Option<String>, VmmError> {
    if spec.accel == Accel::Tcg {
        return Err(VmmError::Accel(format!(
            "{vmm} runs guests only with KVM: --accel tcg is QEMU's; use --vmm qemu"
        )));
    }
    Ok(crate::accel::kvm_unusable_here()
        .map(|why| format!("KVM may not run guests here ({why}); {vmm} has no software emulation")))
}

/// `path` emptied and opened for appending: a VMM's log, fresh per boot so a start error quotes
/// this boot's messages only.
pub(crate) fn fresh_log(path: &Path) -> Result<File, VmmError> {
    let io = |source| VmmError::Io { path: path.to_owned(), source };
    std::fs::write(path, b"").map_err(io)?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(io)
}

/// One VMM process to start and set up.
pub(crate) struct Start<'a> {
    /// The VMM's name in errors.
    pub vmm: &'static str,
    /// How to get the binary, for a spawn error.
    pub fix: &'static str,
    pub binary: &'a Path,
    pub vm_dir: &'a Path,
    /// Its pid file, in `vm_dir`, written once it runs.
    pub pid_file: &'static str,
    /// Its log, quoted when the set-up fails.
    pub log: &'a Path,
    /// What it leaves in `vm_dir`, removed when the start fails.
    pub runtime_files: &'a [&'a str],
    /// For a launcher that forks the VMM and exits (Firecracker's jailer, into a PID namespace):
    /// where the VMM's pid is read from once the launcher is done, given the VM's directory.
    pub forks: Option<fn(&Path) -> Option<i32>>,
    /// A chroot to enter and the (uid, gid) to become before executing (a VMM hearth confines
    /// itself: Cloud Hypervisor).
    pub confine: Option<(&'a Path, (u32, u32))>,
}

/// How long a launcher may take to fork its VMM and exit.
const LAUNCHER_WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) for a launcher child to exit; true when it exited successfully.
fn launcher_done(child: &mut std::process::Child) -> bool {
    let deadline = std::time::Instant::now() + LAUNCHER_WAIT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return false,
        }
    }
    false
}

impl Start<'_> {
    /// Spawns `cmd` as a session leader of its own in `group`, writes the pid file, and runs
    /// `set_up(pid, start_time)`. When anything fails the VMM is killed, its runtime files and
    /// the group are removed, and the error quotes its log. Returns (pid, start time).
    pub fn run(
        &self,
        cmd: Command,
        group: Option<&crate::cgroup::Group>,
        set_up: impl FnOnce(i32, u64) -> Result<(), VmmError>,
    ) -> Result<(i32, u64), VmmError> {
        let started = self.spawn_and_set_up(cmd, group, set_up);
        if started.is_err() {
            remove_files(self.vm_dir, self.runtime_files);
            if let Some(g) = group {
                g.remove();
            }
        }
        started
    }

    fn spawn_and_set_up(
        &self,
        mut cmd: Command,
        group: Option<&crate::cgroup::Group>,
        set_up: impl FnOnce(i32, u64) -> Result<(), VmmError>,
    ) -> Result<(i32, u64), VmmError> {
        crate::sys::detach_and_join(
            &mut cmd,
            group.map(|g| g.join_fds()).unwrap_or_default(),
            vec![],
        );
        if let Some((root, ids)) = self.confine {
            crate::sys::chroot_and_drop(&mut cmd, root, ids)
                .map_err(|source| VmmError::Io { path: root.to_owned(), source })?;
        }
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.binary.display().to_string(),
            fix: self.fix,
            source,
        })?;
        let pid = match self.forks {
            None => child.id() as i32,
            Some(forked) => {
                match launcher_done(&mut child).then(|| forked(self.vm_dir)).flatten() {
                    Some(pid) => pid,
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(VmmError::Start {
                            vmm: self.vmm,
                            log: format!(
                                "{} did not start it; {}:\n{}",
                                self.binary.display(),
                                self.log.display(),
                                tail(self.log)
                            ),
                        });
                    }
                }
            }
        };
        let mut started_at = None;
        let configured = (|| -> Result<u64, VmmError> {
            let start = crate::start_time(pid).ok_or_else(|| VmmError::Control {
                api: self.vmm,
                message: "it exited right after starting".into(),
            })?;
            started_at = Some(start);
            let pid_file = self.vm_dir.join(self.pid_file);
            hearth_fs::atomic_write(&pid_file, pid.to_string().as_bytes())
                .map_err(|source| VmmError::Io { path: pid_file, source })?;
            set_up(pid, start)?;
            Ok(start)
        })();
        match configured {
            Ok(start) => {
                // Not waited for here: reaped when its exit is seen (crate::process::wait_exit).
                drop(child);
                Ok((pid, start))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // A forked VMM is no child of ours: killed by pid and start time, waited for.
                if let (Some(_), Some(start)) = (self.forks, started_at) {
                    kill(pid, start, libc::SIGKILL);
                    crate::process::wait_exit_blocking(pid, start, KILL_TIMEOUT);
                }
                Err(VmmError::Start {
                    vmm: self.vmm,
                    log: format!("{e}; {}:\n{}", self.log.display(), tail(self.log)),
                })
            }
        }
    }
}

/// Removes `names` from `vm_dir`, and the `agent.sock_PORT` sockets a hybrid vsock device makes
/// for connections the guest opens (Firecracker's, Cloud Hypervisor's).
pub(crate) fn remove_files(vm_dir: &Path, names: &[&str]) {
    for name in names {
        let _ = std::fs::remove_file(vm_dir.join(name));
    }
    if let Ok(rd) = std::fs::read_dir(vm_dir) {
        for e in rd.flatten() {
            if e.file_name().as_bytes().starts_with(b"agent.sock_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A stop: when there is a grace period, `ask` the guest to end and wait up to `grace` for the
/// exit; then SIGKILL. The runtime files go once the process is gone.
pub(crate) async fn stop(
    vmm: &'static str,
    (pid, start): (i32, u64),
    grace: Duration,
    ask: impl std::future::Future<Output = Result<(), VmmError>>,
    remove_runtime_files: impl FnOnce(),
) -> Result<(), VmmError> {
    if crate::process::is_alive(pid, start) {
        let ended = !grace.is_zero()
            && ask.await.is_ok()
            && tokio::time::timeout(grace, wait_exit(pid, start)).await.is_ok();
        if !ended {
            kill_and_wait(vmm, pid, start).await?;
        }
    }
    remove_runtime_files();
    Ok(())
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
